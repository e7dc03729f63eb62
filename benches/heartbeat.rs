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

mod common;

use common::*;
use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
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

/// Counters shared between the readers and the main thread.
struct Live {
    /// Pings received per connection (global connection index).
    per_conn: Vec<AtomicU32>,
    /// App-level pings `{}` received, all connections.
    pings: AtomicU64,
    /// Pongs `{}` fully written.
    pongs: AtomicU64,
    /// WebSocket control pings (opcode 9) answered with a pong frame (not expected).
    ctrl_pings: AtomicU64,
    registered: AtomicUsize,
    /// Connections that got a Close frame or EOF from the server.
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
            ctrl_pings: AtomicU64::new(0),
            registered: AtomicUsize::new(0),
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

struct Conn {
    stream: TcpStream,
    idx: usize,
    /// Bytes of an incomplete frame.
    pending: Vec<u8>,
    open: bool,
}

/// What a chunk of server bytes ended with.
enum Outcome {
    Open,
    /// Close frame with its code (None: no code in the frame).
    Closed(Option<u16>),
}

/// Decodes server frames in `data` (after `c.pending`), queues a masked `{}`
/// reply for every `{}` ping line into `out`, returns the number of pings.
fn decode(
    c: &mut Conn,
    data: &[u8],
    out: &mut Vec<u8>,
    live: &Live,
) -> Result<(u32, Outcome), String> {
    let joined;
    let buf: &[u8] = if c.pending.is_empty() {
        data
    } else {
        let mut p = std::mem::take(&mut c.pending);
        p.extend_from_slice(data);
        joined = p;
        &joined
    };
    let mut pos = 0;
    let mut pings = 0u32;
    let mut outcome = Outcome::Open;
    while let Some(h) = parse_frame_hdr(&buf[pos..])? {
        let start = pos + h.hdr_len;
        let end = start + h.len;
        if end > buf.len() {
            break;
        }
        if h.mask.is_some() {
            return Err("server sent a masked frame".into());
        }
        let payload = &buf[start..end];
        pos = end;
        match h.opcode {
            0x1 if h.fin => {
                for line in json_lines(payload) {
                    if is_ping_line(line) {
                        pings += 1;
                        encode_client_frame(out, 0x1, b"{}");
                    } else {
                        live.unexpected.fetch_add(1, Ordering::Relaxed);
                        live.issue(format!(
                            "unexpected message on conn #{}: {}",
                            c.idx,
                            String::from_utf8_lossy(&line[..line.len().min(200)])
                        ));
                    }
                }
            }
            0x8 => {
                let code =
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                outcome = Outcome::Closed(code);
                break;
            }
            0x9 => {
                live.ctrl_pings.fetch_add(1, Ordering::Relaxed);
                encode_client_frame(out, 0xA, payload);
            }
            0xA => {}
            op => {
                live.unexpected.fetch_add(1, Ordering::Relaxed);
                live.issue(format!(
                    "unexpected frame on conn #{}: opcode {op} fin {} len {}",
                    c.idx, h.fin, h.len
                ));
            }
        }
    }
    if pos < buf.len() && matches!(outcome, Outcome::Open) {
        c.pending.extend_from_slice(&buf[pos..]);
    }
    Ok((pings, outcome))
}

type Batch = Vec<(usize, TcpStream, WsDecoder)>;

/// One epoll reader: answers every ping of its connections with a masked `{}`.
fn reader_loop(rx: mpsc::Receiver<Batch>, stop: &AtomicBool, live: &Live) {
    // SAFETY: plain syscall.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        fatal(&format!("epoll_create1: {}", io::Error::last_os_error()));
    }
    let mut conns: Vec<Conn> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut buf = vec![0u8; 64 * 1024];
    let mut out: Vec<u8> = Vec::with_capacity(256);

    // Handles `data` read from connection `i`; false if it is finished.
    let handle = |c: &mut Conn, data: &[u8], out: &mut Vec<u8>| -> bool {
        out.clear();
        let (pings, outcome) = match decode(c, data, out, live) {
            Ok(x) => x,
            Err(e) => {
                live.errors.fetch_add(1, Ordering::Relaxed);
                live.issue(format!("protocol error on conn #{}: {e}", c.idx));
                return false;
            }
        };
        if pings > 0 {
            live.per_conn[c.idx].fetch_add(pings, Ordering::Relaxed);
            live.pings.fetch_add(pings as u64, Ordering::Relaxed);
            if let Some(b) = live.per_sec.get(live.sec_bin()) {
                b.fetch_add(pings as u64, Ordering::Relaxed);
            }
        }
        if live.no_pong {
            out.clear();
        }
        if !out.is_empty() {
            // A few bytes into an almost empty send buffer: one write, whole.
            match (&c.stream).write(out) {
                Ok(n) if n == out.len() => {
                    live.pongs.fetch_add(pings as u64, Ordering::Relaxed);
                }
                Ok(n) => {
                    live.errors.fetch_add(1, Ordering::Relaxed);
                    live.issue(format!(
                        "short pong write on conn #{}: {n} of {} bytes",
                        c.idx,
                        out.len()
                    ));
                }
                Err(e) => {
                    live.errors.fetch_add(1, Ordering::Relaxed);
                    live.issue(format!("pong write on conn #{}: {e}", c.idx));
                }
            }
        }
        match outcome {
            Outcome::Open => true,
            Outcome::Closed(code) => {
                if code == Some(3012) {
                    live.closed_3012.fetch_add(1, Ordering::Relaxed);
                }
                live.issue(format!(
                    "conn #{} closed by the server with code {code:?}",
                    c.idx
                ));
                false
            }
        }
    };
    let finish = |c: &mut Conn| {
        c.open = false;
        // SAFETY: valid epoll fd and socket fd.
        unsafe {
            libc::epoll_ctl(
                ep,
                libc::EPOLL_CTL_DEL,
                c.stream.as_raw_fd(),
                std::ptr::null_mut(),
            )
        };
        live.closed.fetch_add(1, Ordering::Relaxed);
    };

    loop {
        while let Ok(batch) = rx.try_recv() {
            let n = batch.len();
            for (idx, stream, dec) in batch {
                if let Err(e) = stream.set_nonblocking(true) {
                    fatal(&format!("set_nonblocking: {e}"));
                }
                let local = conns.len();
                let mut ev = libc::epoll_event {
                    events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
                    u64: local as u64,
                };
                // SAFETY: valid epoll fd, socket fd and event pointer.
                let rc = unsafe {
                    libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, stream.as_raw_fd(), &mut ev)
                };
                if rc != 0 {
                    fatal(&format!("epoll_ctl ADD: {}", io::Error::last_os_error()));
                }
                conns.push(Conn {
                    stream,
                    idx,
                    pending: Vec::new(),
                    open: true,
                });
                if !dec.pending.is_empty() {
                    // Bytes read past the subscribe reply during setup.
                    let c = &mut conns[local];
                    if !handle(c, &dec.pending, &mut out) {
                        finish(c);
                    }
                }
            }
            live.registered.fetch_add(n, Ordering::Relaxed);
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // SAFETY: the events buffer is valid for its length.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 20) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            fatal(&format!("epoll_wait: {e}"));
        }
        for ev in &events[..n as usize] {
            let c = &mut conns[ev.u64 as usize];
            if !c.open {
                continue;
            }
            let mut done = false;
            loop {
                // SAFETY: buf is valid for writes of its length.
                let r = unsafe {
                    libc::read(
                        c.stream.as_raw_fd(),
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                    )
                };
                if r == 0 {
                    live.issue(format!("conn #{} got EOF from the server", c.idx));
                    done = true;
                    break;
                }
                if r < 0 {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => {}
                        io::ErrorKind::Interrupted => continue,
                        _ => {
                            live.errors.fetch_add(1, Ordering::Relaxed);
                            live.issue(format!("read on conn #{}: {e}", c.idx));
                            done = true;
                        }
                    }
                    break;
                }
                let r = r as usize;
                if !handle(c, &buf[..r], &mut out) {
                    done = true;
                    break;
                }
                if r < buf.len() {
                    break;
                }
            }
            if done {
                finish(c);
            }
        }
    }
    // SAFETY: closing our own epoll fd.
    unsafe { libc::close(ep) };
}

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

/// Per-CPU `irq + softirq` seconds from /proc/stat `cpuN` lines.
fn per_cpu_irq_secs() -> Vec<f64> {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let tck = clk_tck() as f64;
    s.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            (f.get(5).copied().unwrap_or(0) + f.get(6).copied().unwrap_or(0)) as f64 / tck
        })
        .collect()
}

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
        Snap {
            t: Instant::now(),
            cpu: cpu_secs(pid),
            sched: sched_ns(pid),
            irq: system_cpu_secs().1,
            cpu_irq: per_cpu_irq_secs(),
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

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

fn write_config(ping: u32, pong: u32) -> std::path::PathBuf {
    let path = scratch_dir().join("shardcast-bench-heartbeat.toml");
    let text = format!(
        "# written by benches/heartbeat.rs: the bench channels are bench:<n>\n\
         [namespaces.bench]\n\n\
         [ping]\n\
         interval_secs = {ping}\n\
         pong_timeout_secs = {pong}\n"
    );
    if let Err(e) = std::fs::write(&path, text) {
        fatal(&format!("cannot write {}: {e}", path.display()));
    }
    path
}

fn main() {
    let args = Args::parse();
    if args.has("help") {
        println!("{USAGE}");
        return;
    }
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
    install_safety_nets(Duration::from_secs(deadline_s));
    let t_start = Instant::now();

    let hard = raise_nofile();
    let margin: u64 = args.get("margin", 300u64);
    let max_conns = hard.saturating_sub(margin) as usize;
    let mut n: usize = args.get("conns", max_conns);
    if n > max_conns {
        eprintln!(
            "# --conns {n} exceeds RLIMIT_NOFILE hard limit {hard} - margin {margin}; using {max_conns}"
        );
        n = max_conns;
    }
    if n < 1 {
        fatal("need at least 1 connection");
    }
    let shards: usize = args.get("shards", 1usize);
    let channels: usize = args.get("channels", 1usize).max(1);
    let threads: usize = args.get("threads", 8usize).max(1);
    let readers: usize = args.get("readers", 1usize).clamp(1, 16);
    let n_src: usize = args.get("src-addrs", n.div_ceil(10_000).max(2));
    let ncpu = online_cpus();
    let client_cpus: Vec<usize> = match args.str("client-cpus") {
        Some(s) => s
            .split(',')
            .map(|c| {
                c.trim()
                    .parse()
                    .unwrap_or_else(|_| fatal(&format!("bad --client-cpus {s:?}")))
            })
            .collect(),
        None => vec![ncpu - 1],
    };

    println!(
        "# heartbeat: conns={n} (RLIMIT_NOFILE hard={hard}, margin={margin}) shards={shards} \
         ping interval={ping_secs} s pong timeout={pong_secs} s rounds={rounds} (window {} s) \
         channels={channels} src_addrs=127.0.0.2..127.0.0.{} connect_threads={threads} \
         readers={readers} settle={} ms deadline={deadline_s} s",
        window.as_secs(),
        n_src + 1,
        settle.as_millis()
    );

    let mut extra = vec![
        "--config".to_string(),
        write_config(ping_secs, pong_secs).display().to_string(),
    ];
    if let Some(s) = args.str("server-args") {
        extra.extend(s.split_whitespace().map(str::to_string));
    }
    // Start the server before pinning ourselves (it resets its own affinity
    // in pre_exec anyway), then pin every bench thread to the client CPUs.
    let mut server = Server::start("heartbeat", shards, &extra, args.has("server-log"));
    println!("# server: {}", server.describe());
    if let Err(e) = pin_all_threads(&client_cpus) {
        fatal(&format!("sched_setaffinity({client_cpus:?}): {e}"));
    }
    if client_cpus.iter().any(|&c| c < shards) {
        println!(
            "# WARNING: client CPUs {client_cpus:?} overlap the server's pinned executor cores 0..{}",
            shards - 1
        );
    }

    // --- idle baseline: the server with no connections, same length -------
    thread::sleep(settle);
    let b0 = Snap::take(server.pid, None);
    sleep_until(b0.t + window);
    let b1 = Snap::take(server.pid, None);
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

    // --- connect, handing each batch to a reader at once -----------------
    let secs_bins = deadline_s as usize + 60;
    let live = Arc::new(Live::new(n, secs_bins, args.has("no-pong")));
    let stop = Arc::new(AtomicBool::new(false));
    let mut txs = Vec::new();
    let mut handles = Vec::new();
    for i in 0..readers {
        let (tx, rx) = mpsc::channel::<Batch>();
        let (stop, live) = (stop.clone(), live.clone());
        txs.push(tx);
        handles.push(
            thread::Builder::new()
                .name(format!("pinger{i}"))
                .spawn(move || reader_loop(rx, &stop, &live))
                .expect("spawn reader"),
        );
    }
    let chan_fn: Arc<dyn Fn(usize) -> String + Send + Sync> =
        Arc::new(move |i| format!("bench:{}", i % channels));
    let t_conn = Instant::now();
    let mut first = 0;
    let mut b = 0;
    while first < n {
        let count = BATCH.min(n - first);
        let conns = match connect_many(server.addr, first, count, threads, n_src, chan_fn.clone()) {
            Ok(c) => c,
            Err(e) => fatal(&format!("connecting: {e}")),
        };
        let batch: Batch = conns
            .into_iter()
            .enumerate()
            .map(|(i, (s, d))| (first + i, s, d))
            .collect();
        if txs[b % readers].send(batch).is_err() {
            fatal("reader thread gone");
        }
        first += count;
        b += 1;
    }
    let conn_secs = t_conn.elapsed().as_secs_f64();
    if !wait_until(Duration::from_secs(5), || {
        live.registered.load(Ordering::Relaxed) == n
    }) {
        fatal("readers did not register all connections");
    }
    println!(
        "heartbeat connect: {n} conns (connect+subscribe verified) in {conn_secs:.2} s = {:.0} conn/s; \
         {} pings answered while connecting",
        n as f64 / conn_secs,
        live.pongs.load(Ordering::Relaxed)
    );
    let bench_threads = own_thread_affinities();
    println!(
        "# pinning: {ncpu} CPUs; server --shards {shards} threads [{}]; bench threads pinned to CPU {client_cpus:?} [{}]",
        threads_of(server.pid),
        bench_threads
    );
    thread::sleep(settle);

    // --- ping rounds ----------------------------------------------------
    let per0 = live.per_conn_snapshot();
    let w0 = Snap::take(server.pid, Some(&live));
    let mut round_rss = Vec::new();
    for k in 1..=rounds {
        sleep_until(w0.t + Duration::from_secs(u64::from(ping_secs * k)));
        let s = Snap::take(server.pid, Some(&live));
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
    let w1 = Snap::take(server.pid, Some(&live));
    let per1 = live.per_conn_snapshot();
    let bin0 = (w0.t - live.origin).as_secs() as usize;
    let bin1 = ((w1.t - live.origin).as_secs() as usize).min(secs_bins);
    let peak_sec = live.per_sec[bin0.min(bin1)..bin1]
        .iter()
        .map(|b| b.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0);

    // Pongs for the last round must arrive in time: wait out the timeout.
    thread::sleep(tail);
    let t2 = Snap::take(server.pid, Some(&live));
    let per2 = live.per_conn_snapshot();
    let alive = server.alive();
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        if h.join().is_err() {
            fatal("reader thread panicked");
        }
    }

    // --- report ---------------------------------------------------------
    let r = u64::from(rounds);
    let (w_dt, w_cpu, w_sched, w_irq, w_self) = deltas(&w0, &w1);
    let pings = w1.pings - w0.pings;
    let pongs = w1.pongs - w0.pongs;
    let expected = n as u64 * r;
    let closed = live.closed.load(Ordering::Relaxed);
    let closed_3012 = live.closed_3012.load(Ordering::Relaxed);
    let unexpected = live.unexpected.load(Ordering::Relaxed);
    let errors = live.errors.load(Ordering::Relaxed);
    let ctrl = live.ctrl_pings.load(Ordering::Relaxed);
    let mut dist = std::collections::BTreeMap::<u32, usize>::new();
    for (a, b) in per0.iter().zip(&per1) {
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
    let min_total = per0
        .iter()
        .zip(&per2)
        .map(|(a, b)| b - a)
        .min()
        .unwrap_or(0);
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

    let ok = alive && closed == 0 && errors == 0 && unexpected == 0 && count_ok && pongs == pings;
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
