//! Heartbeat benchmark: memory and CPU a node spends on the app-level ping
//! rounds of idle subscribed WebSocket connections.
//!
//! Starts `shardcast` with a short `[ping] interval_secs` (default 5 s, pong
//! timeout 2 s), measures the server's CPU over an idle baseline window with
//! no connections, then opens (nearly) RLIMIT_NOFILE connections (connect +
//! subscribe, each reply verified) and holds them through `--rounds` ping
//! rounds, answering every `{}` ping with a masked `{}` text frame from epoll
//! reader thread(s) pinned to the last CPU. Reports pings received/answered,
//! connections closed by the server, server RSS before/after the rounds, and
//! the server CPU per connection per ping round (minus the idle baseline),
//! per connection per minute at the production interval (25 s) and
//! extrapolated to 500,000 connections.
//!
//! Run: `cargo bench --bench heartbeat [-- --ping-secs 5 --rounds 4 ...]`,
//! `--help` for all options.

#[macro_use]
#[path = "common/modules.rs"]
mod modules;
common_modules!(
    "common";
    args, clock, connect, cpu, machine, memory, net, pinning, reader, safety, server, ws
);

use common::args::{conns_under_nofile, Args};
use common::clock::wait_until;
use common::connect::connect_many;
use common::cpu::{cpu_secs, online_cpus, sched_ns, self_cpu_secs};
use common::machine::machine_cpu;
use common::memory::{mib, rss_bytes};
use common::net::raise_nofile;
use common::pinning::{client_cpus, own_thread_affinities, pin_bench_threads, threads_of};
use common::reader::{Handler, Reader};
use common::safety::{fatal, install_safety_nets};
use common::server::{bench_server_args, Server};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const USAGE: &str = "\
cargo bench --bench heartbeat -- [options]
  --conns N         connections to hold (default: RLIMIT_NOFILE hard limit - margin)
  --margin N        file descriptors kept free below the hard limit (default 300)
  --ping-secs N     server [ping] interval_secs (default 5; 25 = production default)
  --pong-secs M     server [ping] pong_timeout_secs, M < N (default: 2/5 of N, 1..8)
  --rounds R        ping rounds measured (default: 40 s / N, 1..4; 4 at 5 s, 1 at 25 s)
  --shards N        server --shards (default 1: executor pinned to core 0)
  --channels K      subscribe connection i to bench:<i % K> (default 1: all on bench:0)
  --readers N       epoll reader threads answering pings (default 1)
  --client-cpus L   comma-separated CPUs for the bench threads (default: last CPU)
  --threads N       connecting threads (default 8)
  --src-addrs N     number of source addresses 127.0.0.2.. (default: 1 per 10K conns, min 2)
  --settle-ms MS    settle time after start and after connecting (default 2000)
  --deadline S      hard overall deadline in seconds (default 120)
  --server-args S   extra server arguments (whitespace separated)
  --server-log      server stderr to our stderr (default: a log file under target/)
  --no-pong         self-test: never answer pings (the run must then fail with 3012 closes)
The server gets --config <target tmp>/shardcast-bench-heartbeat.toml ([namespaces.bench] + [ping]).
env SHARDCAST_BIN overrides the server binary.";

const PROD_INTERVAL_SECS: f64 = 25.0;
const PROJECT_CONNS: f64 = 500_000.0;
/// Connections opened per `connect_many` call; each batch goes to a reader at
/// once, so early connections answer their pings while later ones connect.
const BATCH: usize = 1000;
/// Seconds reserved in the plan for connecting all connections.
const CONNECT_BUDGET_SECS: u64 = 20;

// ---------------------------------------------------------------------------
// Ping answering readers
// ---------------------------------------------------------------------------

/// Counters shared between the readers' handlers and the main thread.
struct Live {
    /// Pings received per connection (global connection index).
    per_conn: Vec<AtomicU32>,
    /// App-level pings `{}` received, all connections.
    pings: AtomicU64,
    /// Pongs `{}` fully written.
    pongs: AtomicU64,
    /// Connections that got a Close frame or EOF from the server (or broke).
    closed: AtomicUsize,
    /// ... of which with close code 3012 (no pong).
    closed_3012: AtomicUsize,
    /// Anything other than `{}` / pong frames on an idle connection.
    unexpected: AtomicU64,
    errors: AtomicU64,
    first_issue: Mutex<Option<String>>,
    /// Pings per second since `origin` (for the burst size).
    per_sec: Vec<AtomicU64>,
    origin: Instant,
    /// Self-test: do not answer pings.
    no_pong: bool,
}

impl Live {
    fn new(conns: usize, secs: usize, no_pong: bool) -> Live {
        Live {
            per_conn: (0..conns).map(|_| AtomicU32::new(0)).collect(),
            pings: AtomicU64::new(0),
            pongs: AtomicU64::new(0),
            closed: AtomicUsize::new(0),
            closed_3012: AtomicUsize::new(0),
            unexpected: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_issue: Mutex::new(None),
            per_sec: (0..secs).map(|_| AtomicU64::new(0)).collect(),
            origin: Instant::now(),
            no_pong,
        }
    }

    fn issue(&self, msg: String) {
        let mut g = self.first_issue.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(msg);
        }
    }

    fn per_conn_snapshot(&self) -> Vec<u32> {
        self.per_conn
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    fn sec_bin(&self) -> usize {
        self.origin.elapsed().as_secs() as usize
    }
}

/// Counts every ping per connection and per second, lets the reader answer it with a masked
/// `{}` (unless `--no-pong`), and records anything else as an issue.
struct Pinger(Arc<Live>);

impl Handler for Pinger {
    fn on_line(&mut self, conn: usize, line: &[u8], _now_ns: u64) {
        self.0.unexpected.fetch_add(1, Ordering::Relaxed);
        self.0.issue(format!(
            "unexpected message on conn #{conn}: {}",
            String::from_utf8_lossy(&line[..line.len().min(200)])
        ));
    }

    fn on_pings(&mut self, conn: usize, n: u32) -> bool {
        let live = &self.0;
        live.per_conn[conn].fetch_add(n, Ordering::Relaxed);
        live.pings.fetch_add(u64::from(n), Ordering::Relaxed);
        if let Some(b) = live.per_sec.get(live.sec_bin()) {
            b.fetch_add(u64::from(n), Ordering::Relaxed);
        }
        !live.no_pong
    }

    fn on_pongs(&mut self, _conn: usize, n: u32) {
        self.0.pongs.fetch_add(u64::from(n), Ordering::Relaxed);
    }

    fn on_binary(&mut self, conn: usize, len: usize) {
        self.0.unexpected.fetch_add(1, Ordering::Relaxed);
        self.0.issue(format!(
            "unexpected binary message on conn #{conn}: len {len}"
        ));
    }

    fn on_error(&mut self, conn: usize, msg: &str) {
        self.0.errors.fetch_add(1, Ordering::Relaxed);
        self.0.issue(format!("{msg} on conn #{conn}"));
    }

    fn on_closed(&mut self, conn: usize, code: Option<u16>, eof: bool) {
        let live = &self.0;
        live.closed.fetch_add(1, Ordering::Relaxed);
        if code == Some(3012) {
            live.closed_3012.fetch_add(1, Ordering::Relaxed);
        }
        live.issue(if eof {
            format!("conn #{conn} got EOF from the server")
        } else {
            format!("conn #{conn} closed by the server with code {code:?}")
        });
    }
}

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct Snap {
    t: Instant,
    /// Server utime+stime, seconds.
    cpu: f64,
    /// Server on-CPU ns over its threads (schedstat).
    sched: u64,
    /// Machine-wide irq+softirq seconds.
    irq: f64,
    cpu_irq: Vec<f64>,
    /// Our own (bench) utime+stime.
    self_cpu: f64,
    rss: u64,
    pings: u64,
    pongs: u64,
}

impl Snap {
    fn take(pid: i32, live: Option<&Live>) -> Snap {
        let machine = machine_cpu();
        Snap {
            t: Instant::now(),
            cpu: cpu_secs(pid),
            sched: sched_ns(pid),
            irq: machine.irq,
            cpu_irq: machine.irq_per_cpu,
            self_cpu: self_cpu_secs(),
            rss: rss_bytes(pid),
            pings: live.map_or(0, |l| l.pings.load(Ordering::Relaxed)),
            pongs: live.map_or(0, |l| l.pongs.load(Ordering::Relaxed)),
        }
    }
}

/// Differences `b - a`: (seconds, server CPU s, schedstat s, irq s, bench CPU s).
fn deltas(a: &Snap, b: &Snap) -> (f64, f64, f64, f64, f64) {
    (
        (b.t - a.t).as_secs_f64(),
        b.cpu - a.cpu,
        b.sched.saturating_sub(a.sched) as f64 / 1e9,
        b.irq - a.irq,
        b.self_cpu - a.self_cpu,
    )
}

/// Sleeps until `t` (returns at once if it has passed).
pub fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

/// The run's settings, from the command line.
struct Opts {
    ping_secs: u32,
    pong_secs: u32,
    rounds: u32,
    settle: Duration,
    /// `rounds` ping intervals: the measured window.
    window: Duration,
    /// Wait after the last round, so its pongs must have arrived.
    tail: Duration,
    deadline_s: u64,
    n: usize,
    hard: u64,
    margin: u64,
    shards: usize,
    channels: usize,
    threads: usize,
    readers: usize,
    n_src: usize,
    ncpu: usize,
    client_cpus: Vec<usize>,
}

impl Opts {
    /// The timing options, checked against the deadline (before the safety nets are up).
    fn parse(args: &Args) -> Opts {
        let ping_secs: u32 = args.get("ping-secs", 5u32);
        if ping_secs < 2 {
            fatal("--ping-secs must be at least 2 (the pong timeout must be below it)");
        }
        let pong_secs: u32 = args.get("pong-secs", (ping_secs * 2 / 5).clamp(1, 8));
        if pong_secs == 0 || pong_secs >= ping_secs {
            fatal(&format!(
                "--pong-secs {pong_secs} must be in 1..{ping_secs} (below --ping-secs)"
            ));
        }
        let rounds: u32 = args.get("rounds", (40 / ping_secs).clamp(1, 4));
        if rounds == 0 {
            fatal("--rounds must be at least 1");
        }
        let settle = Duration::from_millis(args.get("settle-ms", 2000u64));
        let window = Duration::from_secs(u64::from(ping_secs * rounds));
        let tail = Duration::from_secs(u64::from(pong_secs) + 2);
        let deadline_s: u64 = args.get("deadline", 120u64);
        // start + settle + baseline + connect + settle + rounds + tail + teardown
        let plan = 1.0
            + settle.as_secs_f64() * 2.0
            + window.as_secs_f64() * 2.0
            + CONNECT_BUDGET_SECS as f64
            + tail.as_secs_f64()
            + 3.0;
        if plan > deadline_s as f64 {
            fatal(&format!(
                "plan ~{plan:.0} s (idle baseline + {rounds} rounds of {ping_secs} s each, \
                 + up to {CONNECT_BUDGET_SECS} s connecting) exceeds --deadline {deadline_s}: \
                 lower --rounds or raise --deadline"
            ));
        }
        Opts {
            ping_secs,
            pong_secs,
            rounds,
            settle,
            window,
            tail,
            deadline_s,
            n: 0,
            hard: 0,
            margin: 0,
            shards: args.get("shards", 1usize),
            channels: args.get("channels", 1usize).max(1),
            threads: args.get("threads", 8usize).max(1),
            readers: args.get("readers", 1usize).clamp(1, 16),
            n_src: 0,
            ncpu: online_cpus(),
            client_cpus: Vec::new(),
        }
    }

    /// The connection count (under the raised fd limit) and what depends on it.
    fn size(&mut self, args: &Args) {
        self.hard = raise_nofile();
        (self.n, self.margin) = conns_under_nofile(args, "conns", None, self.hard);
        if self.n < 1 {
            fatal("need at least 1 connection");
        }
        self.n_src = args.get("src-addrs", self.n.div_ceil(10_000).max(2));
        self.client_cpus = client_cpus(args, self.ncpu);
    }
}

fn main() {
    let Some(args) = Args::parse_or_help(USAGE) else {
        return;
    };
    let mut o = Opts::parse(&args);
    install_safety_nets(Duration::from_secs(o.deadline_s));
    let t_start = Instant::now();
    o.size(&args);
    let n = o.n;
    println!(
        "# heartbeat: conns={n} (RLIMIT_NOFILE hard={}, margin={}) shards={} \
         ping interval={} s pong timeout={} s rounds={} (window {} s) \
         channels={} src_addrs=127.0.0.2..127.0.0.{} connect_threads={} \
         readers={} settle={} ms deadline={} s",
        o.hard,
        o.margin,
        o.shards,
        o.ping_secs,
        o.pong_secs,
        o.rounds,
        o.window.as_secs(),
        o.channels,
        o.n_src + 1,
        o.threads,
        o.readers,
        o.settle.as_millis(),
        o.deadline_s
    );

    let ping = format!(
        "\n[ping]\ninterval_secs = {}\npong_timeout_secs = {}\n",
        o.ping_secs, o.pong_secs
    );
    let extra = bench_server_args(&args, "heartbeat", &ping);
    // Start the server before pinning ourselves (it resets its own affinity
    // in pre_exec anyway), then pin every bench thread to the client CPUs.
    let mut server = Server::start("heartbeat", o.shards, &extra, args.has("server-log"));
    println!("# server: {}", server.describe());
    pin_bench_threads(&o.client_cpus, o.shards);

    let baseline = idle_baseline(&o, server.pid);
    let secs_bins = o.deadline_s as usize + 60;
    let live = Arc::new(Live::new(n, secs_bins, args.has("no-pong")));
    let readers = connect_all(&o, &server, &live);
    thread::sleep(o.settle);
    let w = ping_rounds(&o, server.pid, &live, secs_bins);
    let alive = server.alive();
    let ctrl: u64 = readers.into_iter().map(|r| r.stop().0.ctrl_pings).sum();

    let ok = report(&o, &baseline, &w, &live, ctrl, alive);
    println!(
        "# result: {}; server alive at end: {alive}; elapsed {:.1} s",
        if ok { "ok" } else { "FAILED" },
        t_start.elapsed().as_secs_f64()
    );
    drop(server);
    if !ok {
        std::process::exit(1);
    }
}

/// The server with no connections over a window as long as the measured one:
/// (seconds, CPU s, schedstat s, irq s).
fn idle_baseline(o: &Opts, pid: i32) -> (f64, f64, f64, f64) {
    thread::sleep(o.settle);
    let b0 = Snap::take(pid, None);
    sleep_until(b0.t + o.window);
    let b1 = Snap::take(pid, None);
    let (b_dt, b_cpu, b_sched, b_irq, _) = deltas(&b0, &b1);
    println!(
        "heartbeat idle-baseline: server CPU {:.3} s utime+stime (schedstat {:.4} s) over {:.1} s with 0 connections \
         = {:.3}% of one core; server RSS {:.2} MiB; machine irq+softirq {:.3} s",
        b_cpu,
        b_sched,
        b_dt,
        100.0 * b_cpu / b_dt,
        mib(b1.rss as f64),
        b_irq
    );
    (b_dt, b_cpu, b_sched, b_irq)
}

/// Opens every connection, handing each batch to a reader at once (round robin), so that early
/// connections answer their pings while later ones connect.
fn connect_all(o: &Opts, server: &Server, live: &Arc<Live>) -> Vec<Reader<Pinger>> {
    let readers: Vec<Reader<Pinger>> = (0..o.readers)
        .map(|i| Reader::spawn(&format!("pinger{i}"), Pinger(live.clone())))
        .collect();
    let channels = o.channels;
    let chan_fn: Arc<dyn Fn(usize) -> String + Send + Sync> =
        Arc::new(move |i| format!("bench:{}", i % channels));
    let n = o.n;
    let t_conn = Instant::now();
    for (b, first) in (0..n).step_by(BATCH).enumerate() {
        let count = BATCH.min(n - first);
        let conns = connect_many(
            server.addr,
            first,
            count,
            o.threads,
            o.n_src,
            chan_fn.clone(),
        )
        .unwrap_or_else(|e| fatal(&format!("connecting: {e}")));
        readers[b % o.readers].add(conns);
    }
    let conn_secs = t_conn.elapsed().as_secs_f64();
    let registered = || -> usize {
        readers
            .iter()
            .map(|r| r.live.conns.load(Ordering::Relaxed))
            .sum()
    };
    if !wait_until(Duration::from_secs(5), || registered() == n) {
        fatal("readers did not register all connections");
    }
    println!(
        "heartbeat connect: {n} conns (connect+subscribe verified) in {conn_secs:.2} s = {:.0} conn/s; \
         {} pings answered while connecting",
        n as f64 / conn_secs,
        live.pongs.load(Ordering::Relaxed)
    );
    println!(
        "# pinning: {} CPUs; server --shards {} threads [{}]; bench threads pinned to CPU {:?} [{}]",
        o.ncpu,
        o.shards,
        threads_of(server.pid),
        o.client_cpus,
        own_thread_affinities()
    );
    readers
}

/// What the ping rounds left: snapshots at the window's start (`w0`), end (`w1`) and after the
/// tail (`t2`), pings per connection at each, RSS at each round's end, the largest 1-s burst.
struct Window {
    w0: Snap,
    w1: Snap,
    t2: Snap,
    per0: Vec<u32>,
    per1: Vec<u32>,
    per2: Vec<u32>,
    round_rss: Vec<u64>,
    peak_sec: u64,
}

fn ping_rounds(o: &Opts, pid: i32, live: &Live, secs_bins: usize) -> Window {
    let (n, rounds) = (o.n, o.rounds);
    let per0 = live.per_conn_snapshot();
    let w0 = Snap::take(pid, Some(live));
    let mut round_rss = Vec::new();
    for k in 1..=rounds {
        sleep_until(w0.t + Duration::from_secs(u64::from(o.ping_secs * k)));
        let s = Snap::take(pid, Some(live));
        println!(
            "# round {k}/{rounds} at +{:.1} s: pings {} (expected ≈ {}), pongs {}, closed {}, server RSS {:.2} MiB, server CPU {:.3} s",
            (s.t - w0.t).as_secs_f64(),
            s.pings - w0.pings,
            n as u64 * u64::from(k),
            s.pongs - w0.pongs,
            live.closed.load(Ordering::Relaxed),
            mib(s.rss as f64),
            s.cpu - w0.cpu
        );
        round_rss.push(s.rss);
    }
    let w1 = Snap::take(pid, Some(live));
    let per1 = live.per_conn_snapshot();
    let bin0 = (w0.t - live.origin).as_secs() as usize;
    let bin1 = ((w1.t - live.origin).as_secs() as usize).min(secs_bins);
    let peak_sec = live.per_sec[bin0.min(bin1)..bin1]
        .iter()
        .map(|b| b.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0);

    // Pongs for the last round must arrive in time: wait out the timeout.
    thread::sleep(o.tail);
    let t2 = Snap::take(pid, Some(live));
    let per2 = live.per_conn_snapshot();
    Window {
        w0,
        w1,
        t2,
        per0,
        per1,
        per2,
        round_rss,
        peak_sec,
    }
}

/// Every report line; true when the run is ok.
fn report(
    o: &Opts,
    baseline: &(f64, f64, f64, f64),
    w: &Window,
    live: &Live,
    ctrl: u64,
    alive: bool,
) -> bool {
    let counts_ok = report_counts(o, w, live, ctrl);
    report_rss(o, w);
    report_cpu(o, baseline, w);
    alive && counts_ok
}

/// The connections, pings, pongs and closed-by-server lines; true when every count is right.
fn report_counts(o: &Opts, w: &Window, live: &Live, ctrl: u64) -> bool {
    let (n, rounds, ping_secs, tail) = (o.n, o.rounds, o.ping_secs, o.tail);
    let Window {
        w0,
        w1,
        t2,
        per0,
        per1,
        per2,
        ..
    } = w;
    let r = u64::from(rounds);
    let w_dt = (w1.t - w0.t).as_secs_f64();
    let pings = w1.pings - w0.pings;
    let pongs = w1.pongs - w0.pongs;
    let expected = n as u64 * r;
    let closed = live.closed.load(Ordering::Relaxed);
    let closed_3012 = live.closed_3012.load(Ordering::Relaxed);
    let unexpected = live.unexpected.load(Ordering::Relaxed);
    let errors = live.errors.load(Ordering::Relaxed);
    let mut dist = std::collections::BTreeMap::<u32, usize>::new();
    for (a, b) in per0.iter().zip(per1) {
        *dist.entry(b - a).or_default() += 1;
    }
    let dist_text: Vec<String> = dist
        .iter()
        .map(|(k, v)| format!("{k} pings: {v}"))
        .collect();
    let in_range = dist.keys().all(|&k| (u64::from(k)).abs_diff(r) <= 1);
    // The window is exactly `rounds` intervals long and starts after every
    // connection is up, so each one must also have had at least `rounds`
    // pings by the end of the tail (this catches a connection with no ping
    // at all, which ± 1 alone would let through at --rounds 1).
    let min_total = per0.iter().zip(per2).map(|(a, b)| b - a).min().unwrap_or(0);
    let count_ok = pings.abs_diff(expected) <= n as u64 && in_range && u64::from(min_total) >= r;

    println!(
        "heartbeat connections: {n} held through {rounds} round{} of {ping_secs} s, {} still open at the end",
        if rounds == 1 { "" } else { "s" },
        n - closed
    );
    println!(
        "heartbeat pings: {pings} received in the {w_dt:.1} s window = {:.3} per connection \
         (expected {n} x {rounds} = {expected} ± {n}: {}); per connection [{}]; \
         fewest per connection by the end of the tail: {min_total} (must be >= {rounds})",
        pings as f64 / n as f64,
        if count_ok { "ok" } else { "MISMATCH" },
        dist_text.join(", ")
    );
    println!(
        "heartbeat pongs: {pongs} answered in the window (masked text `{{}}`), {} unanswered; \
         whole run {} pings / {} pongs{}",
        pings as i64 - pongs as i64,
        t2.pings,
        t2.pongs,
        if ctrl > 0 {
            format!(", {ctrl} WebSocket control pings answered")
        } else {
            String::new()
        }
    );
    println!(
        "heartbeat closed-by-server: {closed} connections ({closed_3012} with 3012 no pong), \
         checked {:.0} s after the last round; unexpected messages {unexpected}, client errors {errors}{}",
        tail.as_secs_f64(),
        live.first_issue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|s| format!(" (first issue: {s})"))
            .unwrap_or_default()
    );
    closed == 0 && errors == 0 && unexpected == 0 && count_ok && pongs == pings
}

/// The RSS lines: over the rounds, and from round 2 on (growth that goes on would be a leak).
fn report_rss(o: &Opts, w: &Window) {
    let (n, rounds, tail) = (o.n, o.rounds, o.tail);
    let Window {
        w0,
        w1,
        t2,
        round_rss,
        ..
    } = w;
    let rss_d = w1.rss as i64 - w0.rss as i64;
    let round_text: Vec<String> = round_rss
        .iter()
        .map(|r| format!("{:.2}", mib(*r as f64)))
        .collect();
    println!(
        "heartbeat rss: server RSS before rounds {:.2} MiB, after {rounds} round(s) {:.2} MiB: Δ {:+.3} MiB = {:+.1} B/conn \
         over the rounds; at each round's end [{}] MiB; +{:.0} s later {:.2} MiB",
        mib(w0.rss as f64),
        mib(w1.rss as f64),
        mib(rss_d as f64),
        rss_d as f64 / n as f64,
        round_text.join(", "),
        tail.as_secs_f64(),
        mib(t2.rss as f64)
    );
    // The first rounds can raise the allocator's high-water mark (a tick pings
    // every connection that connected in the same second, all queued at once);
    // growth that goes on round after round is what would be a leak.
    if round_rss.len() >= 3 {
        let late = round_rss[round_rss.len() - 1] as i64 - round_rss[1] as i64;
        let per = late as f64 / n as f64;
        println!(
            "heartbeat rss-steady: end of round 2 → end of round {rounds}: Δ {:+.3} MiB = {per:+.1} B/conn over {} rounds \
             = {:+.2} B/conn per round ({})",
            mib(late as f64),
            rounds - 2,
            per / f64::from(rounds - 2),
            if per.abs() <= 32.0 {
                "flat: within ±32 B/conn"
            } else {
                "GROWING"
            }
        );
    } else {
        println!("# rss-steady: needs --rounds >= 3 to separate the first rounds' high-water mark from steady growth");
    }
}

/// The CPU lines: the window minus the idle baseline, per ping round, per minute, projected;
/// softirq and the bench's own CPU.
fn report_cpu(o: &Opts, baseline: &(f64, f64, f64, f64), w: &Window) {
    let (n, rounds, ping_secs) = (o.n, o.rounds, o.ping_secs);
    let &(b_dt, b_cpu, b_sched, b_irq) = baseline;
    let Window {
        w0, w1, peak_sec, ..
    } = w;
    let (w_dt, w_cpu, w_sched, w_irq, w_self) = deltas(w0, w1);
    let pings = w1.pings - w0.pings;
    // Baseline scaled to the window's exact length.
    let scale = w_dt / b_dt;
    let net_cpu = w_cpu - b_cpu * scale;
    let net_sched = w_sched - b_sched * scale;
    let per_ping = |s: f64| s * 1e6 / pings.max(1) as f64;
    let us = per_ping(net_cpu);
    let us_sched = per_ping(net_sched);
    println!(
        "heartbeat cpu-window: server CPU {w_cpu:.3} s utime+stime (schedstat {w_sched:.4} s) over {w_dt:.1} s \
         with {n} conns = {:.2}% of one core; idle baseline for the same length {:.3} s (schedstat {:.4} s)",
        100.0 * w_cpu / w_dt,
        b_cpu * scale,
        b_sched * scale
    );
    println!(
        "heartbeat cpu-per-round: ({w_cpu:.3} - {:.3}) s / {pings} pings = {us:.2} µs per connection per ping round \
         (schedstat: {us_sched:.2} µs)",
        b_cpu * scale
    );
    println!(
        "heartbeat cpu-per-minute: {:.2} µs per connection per minute at the production 25 s interval \
         (= {us:.2} µs x 60/25; schedstat {:.2} µs); {:.2} µs at this run's {ping_secs} s interval",
        us * 60.0 / PROD_INTERVAL_SECS,
        us_sched * 60.0 / PROD_INTERVAL_SECS,
        us * 60.0 / ping_secs as f64
    );
    let cpu_s_min = us * 60.0 / PROD_INTERVAL_SECS * PROJECT_CONNS / 1e6;
    let cpu_s_min_sched = us_sched * 60.0 / PROD_INTERVAL_SECS * PROJECT_CONNS / 1e6;
    println!(
        "heartbeat projection@500000: {cpu_s_min:.2} CPU-s per minute = {:.2}% of one core at the 25 s interval \
         (schedstat: {cpu_s_min_sched:.2} CPU-s/min = {:.2}%)",
        100.0 * cpu_s_min / 60.0,
        100.0 * cpu_s_min_sched / 60.0
    );
    let irq_net = w_irq - b_irq * scale;
    let cpu_irq: Vec<String> = w0
        .cpu_irq
        .iter()
        .zip(&w1.cpu_irq)
        .enumerate()
        .map(|(i, (a, b))| format!("cpu{i} {:.3} s", b - a))
        .collect();
    let irq_text = if irq_net >= 0.0 {
        format!(
            "= {:.2} µs per ping; server + all of it: {:.2} µs per ping",
            per_ping(irq_net),
            per_ping(net_cpu + irq_net)
        )
    } else {
        format!(
            "< 0: n/a, other load on the machine during the baseline (without subtracting: {:.2} µs per ping)",
            per_ping(w_irq)
        )
    };
    println!(
        "# softirq: machine-wide irq+softirq {w_irq:.3} s in the window ({}) - baseline {:.3} s {irq_text}; \
         on loopback the TCP receive work of both directions runs in softirq (not in any process's utime+stime), \
         the server's share of it (receiving pongs) mostly on the bench's CPU; machine-wide, so other load skews it",
        cpu_irq.join(", "),
        b_irq * scale
    );
    println!(
        "# bench (client) CPU in the window: {w_self:.3} s = {:.2} µs per ping answered; largest 1-s burst {peak_sec} pings; \
         ping-timer granularity: the server's wheel ticks once a second, so a connection gets {rounds} ± 1 pings in a {w_dt:.0} s window",
        per_ping(w_self)
    );
}
