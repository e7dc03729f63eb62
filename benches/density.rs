//! Connection-density benchmark: memory cost of idle subscribed WebSocket
//! connections.
//!
//! Starts `shardcast`, opens N idle connections (connect + subscribe, each
//! reply verified), in two stages (N/4, then the remaining 3N/4), and reports
//! server RSS and kernel memory before, at N/4 and at N, the per-connection
//! average and slope, and a projection to 500,000 connections.
//!
//! `--runs N` (default 3) repeats the whole measurement N times, each with a fresh server, and
//! ends with a summary line: the median and the spread (min..max) of the average (RSS growth
//! over the baseline, what the first connections add included) and of the N/4 -> N slope. Each
//! RSS line splits the growth into anonymous memory (heap, stacks, io_uring buffers) and
//! file-backed pages (the binary's code touched for the first time), and the fixed part
//! (intercept: growth at N minus slope x N) tells how much of the average is not per connection.
//!
//! Run: `cargo bench --bench density [-- --conns N --shards 2 ...]`, `--help`
//! for all options.

#[macro_use]
#[path = "common/modules.rs"]
mod modules;
common_modules!("common"; args, connect, http, info, kernel_memory, memory, net, reader, safety, server, ws);

use common::args::{conns_under_nofile, Args};
use common::connect::{connect_many_as, sse_connect_many};
use common::info::NodeInfo;
use common::kernel_memory::{meminfo, slabinfo, sockstat_tcp_mem_bytes};
use common::memory::{mib, rss_bytes, smaps_rollup_bytes, status_bytes};
use common::net::raise_nofile;
use common::reader::{Handler, Reader};
use common::safety::{fatal, install_safety_nets};
use common::server::{bench_server_args, Server};
use common::ws::Format;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const USAGE: &str = "\
cargo bench --bench density -- [options]
  --conns N         connections to hold (default: RLIMIT_NOFILE hard limit - margin)
  --margin N        file descriptors kept free below the hard limit (default 300)
  --shards N        server --shards (default 2)
  --channels K      subscribe connection i to bench:<i % K> (default 1: all on bench:0)
  --threads N       connecting threads (default 8)
  --protobuf        clients speak the protobuf protocol (centrifuge-protobuf, binary frames)
                    instead of JSON; compare the two runs' B/conn
  --transport T     websocket (default) or sse: idle SSE streams (GET /connection/sse, the
                    emulation's stream; the server gets [transports] sse = true and a 300 s
                    ping interval, since the bench has no /emulation path for pongs); or
                    sse,websocket: both in the same run (alternating, a fresh server each),
                    a summary for each and the ratio of their medians
  --src-addrs N     number of source addresses 127.0.0.2.. (default: 1 per 10K conns, min 2)
  --settle-ms MS    settle time before each measurement (default 3000)
  --runs N          measurements, each with a fresh server; summary with median and spread (default 3)
  --deadline S      hard overall deadline in seconds (default 60 + 60 per run and transport)
  --server-env L    environment for the server, comma-separated K=V (e.g. MIMALLOC_PURGE_DELAY=0)
  --no-thp          start the server with transparent huge pages disabled (PR_SET_THP_DISABLE,
                    inherited): its anonymous memory then grows by 4 KiB pages, not 2 MiB ones
  --server-args S   extra server arguments (whitespace separated)
  --no-bench-config do not pass --config with the [namespaces.bench] section
  --server-log      server stderr to our stderr (default: a log file under target/)
env SHARDCAST_BIN overrides the server binary.";

const TARGET_BYTES_PER_CONN: f64 = 1024.0;
const PROJECT_CONNS: f64 = 500_000.0;

/// Counts anything other than pings arriving on idle connections.
#[derive(Default)]
struct Idle {
    unexpected: u64,
    first: Option<String>,
}

impl Handler for Idle {
    fn on_line(&mut self, _conn: usize, line: &[u8], _now: u64) {
        self.unexpected += 1;
        if self.first.is_none() {
            self.first = Some(String::from_utf8_lossy(&line[..line.len().min(200)]).into());
        }
    }

    fn on_binary(&mut self, _conn: usize, len: usize) {
        // Protobuf connections: anything but their pings (answered by the reader).
        self.unexpected += 1;
        if self.first.is_none() {
            self.first = Some(format!("a binary message of {len} bytes"));
        }
    }
}

struct Snap {
    conns: usize,
    server_rss: u64,
    /// RssAnon and RssFile of the server (/proc/<pid>/status), 0 when absent.
    server_anon: u64,
    server_file: u64,
    /// AnonHugePages (smaps_rollup): anonymous memory backed by 2 MiB transparent huge pages.
    server_thp: u64,
    client_rss: u64,
    mem_used: u64,
    slab: u64,
    tcp_mem: u64,
    page_tables: u64,
    slabs: HashMap<String, u64>,
}

impl Snap {
    fn take(pid: i32, conns: usize) -> Snap {
        let mi = meminfo();
        let g = |k: &str| mi.get(k).copied().unwrap_or(0);
        Snap {
            conns,
            server_rss: rss_bytes(pid),
            server_anon: status_bytes(pid, "RssAnon:").unwrap_or(0),
            server_file: status_bytes(pid, "RssFile:").unwrap_or(0),
            server_thp: smaps_rollup_bytes(pid, "AnonHugePages:").unwrap_or(0),
            // SAFETY: getpid has no preconditions.
            client_rss: rss_bytes(unsafe { libc::getpid() }),
            mem_used: g("MemTotal").saturating_sub(g("MemAvailable")),
            slab: g("Slab"),
            tcp_mem: sockstat_tcp_mem_bytes(),
            page_tables: g("PageTables"),
            slabs: slabinfo(),
        }
    }

    /// Kernel memory attributable to sockets: slab objects + TCP buffer pages,
    /// minus `proc_inode_cache`, which grows only because something (here: the
    /// sandbox's process monitor) walks /proc/<pid>/fd; a plain socketpair test
    /// with no /proc access from us shows the same ~700 B/socket there.
    fn kernel(&self) -> i64 {
        self.slab as i64 + self.tcp_mem as i64 - self.proc_inodes() as i64
    }

    fn proc_inodes(&self) -> u64 {
        self.slabs.get("proc_inode_cache").copied().unwrap_or(0)
    }
}

fn d(a: u64, b: u64) -> i64 {
    b as i64 - a as i64
}

/// The run's settings, from the command line.
#[derive(Clone)]
struct Opts {
    n: usize,
    hard: u64,
    margin: u64,
    shards: usize,
    channels: usize,
    /// The clients' wire format (`--protobuf`).
    format: Format,
    /// `--transport sse`: idle SSE streams instead of WebSockets (this run's).
    sse: bool,
    /// The transports to measure in turn, each run: false = WebSocket, true = SSE.
    transports: Vec<bool>,
    threads: usize,
    n_src: usize,
    settle: Duration,
    runs: usize,
}

impl Opts {
    fn parse(args: &Args) -> Opts {
        let hard = raise_nofile();
        let (n, margin) = conns_under_nofile(args, "conns", None, hard);
        if n < 4 {
            fatal("need at least 4 connections");
        }
        Opts {
            n,
            hard,
            margin,
            shards: args.get("shards", 2usize),
            channels: args.get("channels", 1usize).max(1),
            format: if args.has("protobuf") {
                Format::Protobuf
            } else {
                Format::Json
            },
            sse: false,
            transports: args
                .str("transport")
                .unwrap_or_else(|| "websocket".into())
                .split(',')
                .map(|t| match t.trim() {
                    "websocket" => false,
                    "sse" => true,
                    t => fatal(&format!(
                        "--transport {t}: want websocket, sse or both, comma separated"
                    )),
                })
                .collect(),
            threads: args.get("threads", 8usize),
            n_src: args.get("src-addrs", n.div_ceil(10_000).max(2)),
            settle: Duration::from_millis(args.get("settle-ms", 3000u64)),
            runs: args.get("runs", 3usize).max(1),
        }
    }
}

fn main() {
    let Some(args) = Args::parse_or_help(USAGE) else {
        return;
    };
    let runs_hint = args.get("runs", 3u64).max(1);
    let transports_hint = args.str("transport").map_or(1, |t| t.split(',').count()) as u64;
    install_safety_nets(Duration::from_secs(
        args.get("deadline", 60 + 60 * runs_hint * transports_hint),
    ));
    let t_start = Instant::now();
    let o = Opts::parse(&args);
    set_server_env(&args);
    if args.has("no-thp") {
        // SAFETY: prctl with integer arguments; inherited by the server across fork and exec.
        if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
            fatal(&format!(
                "prctl(PR_SET_THP_DISABLE): {}",
                std::io::Error::last_os_error()
            ));
        }
        println!("# transparent huge pages disabled for the server (PR_SET_THP_DISABLE)");
    }
    println!(
        "# density: conns={} (RLIMIT_NOFILE hard={}, margin={}) shards={} \
         channels={} src_addrs=127.0.0.2..127.0.0.{} connect_threads={} settle={} ms runs={} \
         format={} transport={}",
        o.n,
        o.hard,
        o.margin,
        o.shards,
        o.channels,
        o.n_src + 1,
        o.threads,
        o.settle.as_millis(),
        o.runs,
        o.format.name(),
        args.str("transport").unwrap_or_else(|| "websocket".into())
    );
    let name = |sse: bool| if sse { "sse" } else { "websocket" };
    let mut results: Vec<Vec<RunResult>> = o.transports.iter().map(|_| Vec::new()).collect();
    let mut failed = false;
    for run in 1..=o.runs {
        for (i, &sse) in o.transports.iter().enumerate() {
            if o.runs > 1 || o.transports.len() > 1 {
                println!("# run {run}/{} ({})", o.runs, name(sse));
            }
            let this = Opts { sse, ..o.clone() };
            let (r, ok) = run_once(&this, &args, t_start);
            results[i].push(r);
            failed |= !ok;
        }
    }
    for (i, &sse) in o.transports.iter().enumerate() {
        if o.transports.len() > 1 {
            println!("# transport {}:", name(sse));
        }
        report_summary(&o, &results[i]);
    }
    if o.transports.len() == 2 {
        let med = |rs: &[RunResult], f: &dyn Fn(&RunResult) -> f64| {
            median_spread(rs.iter().map(f).collect()).0
        };
        println!(
            "density ratio {}/{}: average {:.3}, slope {:.3} (medians, same run)",
            name(o.transports[0]),
            name(o.transports[1]),
            med(&results[0], &|r| r.avg) / med(&results[1], &|r| r.avg),
            med(&results[0], &|r| r.slope) / med(&results[1], &|r| r.slope)
        );
    }
    if failed {
        std::process::exit(1);
    }
}

/// `--server-env K=V,...`: set in this process before the server starts, which inherits it.
fn set_server_env(args: &Args) {
    let Some(list) = args.str("server-env") else {
        return;
    };
    for kv in list.split(',').filter(|kv| !kv.trim().is_empty()) {
        let Some((k, v)) = kv.trim().split_once('=') else {
            fatal(&format!("bad --server-env entry {kv:?}: want K=V"));
        };
        std::env::set_var(k, v);
        println!("# server environment: {k}={v}");
    }
}

/// What one run measured, for the summary.
struct RunResult {
    /// (RSS(N) - RSS(baseline)) / N, B/conn.
    avg: f64,
    /// (RSS(N) - RSS(N/4)) / (3N/4), B/conn.
    slope: f64,
    /// RSS(N) - RSS(baseline) - slope x N: what is not per connection, bytes.
    intercept: f64,
    /// Anonymous share of the growth over the baseline, B/conn.
    anon_avg: f64,
    /// File-backed share of the growth over the baseline, B/conn.
    file_avg: f64,
    baseline: u64,
    kernel: f64,
}

/// One measurement with a fresh server; returns its figures and whether it went cleanly.
fn run_once(o: &Opts, args: &Args, t_start: Instant) -> (RunResult, bool) {
    let mut server = Server::start(
        "density",
        o.shards,
        &bench_server_args(
            args,
            "density",
            if o.sse {
                "[transports]\nsse = true\n[ping]\ninterval_secs = 300\npong_timeout_secs = 60\n"
            } else {
                ""
            },
        ),
        args.has("server-log"),
    );
    println!("# server: {}", server.describe());
    thread::sleep(o.settle);
    // The shards' receive buffers (provided-buffer rings) are part of the baseline: resident
    // only once written, so they show in the RSS as the first reads touch them.
    match NodeInfo::fetch(server.addr) {
        Ok(info) => match info.gauge("recv_buffer_ring_bytes") {
            Some(ring) => println!(
                "density recv-buffer-rings: {:.2} MiB in all ({} shards; /api/info gauge recv_buffer_ring_bytes) = {:.0} B/conn at {} conns",
                mib(ring as f64),
                o.shards,
                ring as f64 / o.n as f64,
                o.n
            ),
            None => println!(
                "density recv-buffer-rings: n/a (this server's /api/info has no gauge recv_buffer_ring_bytes)"
            ),
        },
        Err(e) => println!("density recv-buffer-rings: n/a (/api/info unavailable: {e})"),
    }
    let base = Snap::take(server.pid, 0);
    println!(
        "density baseline: server RSS {:.2} MiB (anon {:.2} of which huge pages {:.2}, file {:.2}; after READY + {:.1} s settle)",
        mib(base.server_rss as f64),
        mib(base.server_anon as f64),
        mib(base.server_thp as f64),
        mib(base.server_file as f64),
        o.settle.as_secs_f64()
    );

    let keeper = Reader::spawn("keeper", Idle::default());
    let sse_held = std::sync::Mutex::new(Vec::new());
    let [s1, s2] = connect_in_two_stages(o, server.addr, server.pid, &keeper, &sse_held, &base);
    let user = report_user(&base, &s1, &s2);
    let k_slope = report_kernel(&base, &s1, &s2);
    report_projection(&base, user, k_slope);

    let alive = server.alive();
    let (stats, idle) = keeper.stop();
    let sse_held = sse_held.into_inner().unwrap();
    let (sse_closed, _) = sse_idle_check(&sse_held);
    if o.sse {
        println!(
            "# SSE streams held: {} (closed by server: {sse_closed})",
            sse_held.len()
        );
    }
    drop(sse_held);
    println!(
        "# connections held: {} (closed by server: {}, pings answered: {}, unexpected messages: {}{}, errors: {}{}); server alive at end: {alive}; elapsed {:.1} s",
        stats.conns,
        stats.closed,
        stats.pings,
        idle.unexpected,
        idle.first.map(|f| format!(" first={f}")).unwrap_or_default(),
        stats.errors,
        stats.first_error.map(|e| format!(" first={e}")).unwrap_or_default(),
        t_start.elapsed().as_secs_f64()
    );
    drop(server);
    let n2 = s2.conns as f64;
    let (user_slope, user_avg) = user;
    let r = RunResult {
        avg: user_avg,
        slope: user_slope,
        intercept: d(base.server_rss, s2.server_rss) as f64 - user_slope * n2,
        anon_avg: d(base.server_anon, s2.server_anon) as f64 / n2,
        file_avg: d(base.server_file, s2.server_file) as f64 / n2,
        baseline: base.server_rss,
        kernel: k_slope,
    };
    (r, alive && stats.closed == 0 && sse_closed == 0)
}

/// The median (upper of the two middle ones for an even count) and the range.
fn median_spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// The summary over the runs: median and spread of the average and of the slope.
fn report_summary(o: &Opts, rs: &[RunResult]) {
    let stat = |f: &dyn Fn(&RunResult) -> f64| median_spread(rs.iter().map(f).collect());
    let (avg, avg_lo, avg_hi) = stat(&|r| r.avg);
    let (slope, slope_lo, slope_hi) = stat(&|r| r.slope);
    println!(
        "density summary: {} runs at {} conns ({} shards): average {avg:.0} B/conn median (spread {avg_lo:.0}..{avg_hi:.0}; RSS growth over the baseline, start-up included); slope N/4->N {slope:.0} B/conn median (spread {slope_lo:.0}..{slope_hi:.0})",
        rs.len(),
        o.n,
        o.shards
    );
    let list = |f: &dyn Fn(&RunResult) -> String| rs.iter().map(f).collect::<Vec<_>>().join(", ");
    println!(
        "# per run: average B/conn [{}]; slope [{}]; fixed part (intercept) MiB [{}]; average anon/file B/conn [{}]; baseline MiB [{}]; kernel B/server socket [{}]",
        list(&|r| format!("{:.0}", r.avg)),
        list(&|r| format!("{:.0}", r.slope)),
        list(&|r| format!("{:.2}", mib(r.intercept))),
        list(&|r| format!("{:.0}/{:.0}", r.anon_avg, r.file_avg)),
        list(&|r| format!("{:.2}", mib(r.baseline as f64))),
        list(&|r| format!("{:.0}", r.kernel)),
    );
}

/// Opens N/4 connections, then the remaining 3N/4, handing them to the keeper; after each
/// stage and a settle time, takes a snapshot and prints its RSS line.
fn connect_in_two_stages(
    o: &Opts,
    addr: SocketAddr,
    pid: i32,
    keeper: &Reader<Idle>,
    sse_held: &std::sync::Mutex<Vec<std::net::TcpStream>>,
    base: &Snap,
) -> [Snap; 2] {
    let channels = o.channels;
    let chan_fn: Arc<dyn Fn(usize) -> String + Send + Sync> =
        Arc::new(move |i| format!("bench:{}", i % channels));
    let n1 = o.n / 4;
    [(0, n1), (n1, o.n - n1)].map(|(first, count)| {
        let t0 = Instant::now();
        if o.sse {
            let streams = match sse_connect_many(addr, first, count, o.threads, o.n_src, chan_fn.clone()) {
                Ok(s) => s,
                Err(e) => fatal(&format!("connecting SSE streams: {e}")),
            };
            let dt = t0.elapsed().as_secs_f64();
            println!(
                "density connect: +{count} SSE streams (connect+subscribe verified) in {dt:.2} s = {:.0} conn/s, total {}",
                count as f64 / dt,
                first + count
            );
            sse_held.lock().unwrap().extend(streams);
            thread::sleep(o.settle);
            let (closed, unexpected) = sse_idle_check(&sse_held.lock().unwrap());
            if closed > 0 || unexpected > 0 {
                fatal(&format!(
                    "{closed} SSE streams were closed by the server while idle, {unexpected} got unexpected data"
                ));
            }
            return snap_line(pid, first + count, base);
        }
        let conns = match connect_many_as(
            addr,
            first,
            count,
            o.threads,
            o.n_src,
            chan_fn.clone(),
            o.format,
        ) {
            Ok(c) => c,
            Err(e) => fatal(&format!("connecting: {e}")),
        };
        let dt = t0.elapsed().as_secs_f64();
        keeper.add(conns);
        println!(
            "density connect: +{count} conns (connect+subscribe verified) in {dt:.2} s = {:.0} conn/s, total {}",
            count as f64 / dt,
            first + count
        );
        thread::sleep(o.settle);
        let closed = keeper.live.closed.load(Ordering::Relaxed);
        if closed > 0 {
            fatal(&format!(
                "{closed} connections were closed by the server while idle"
            ));
        }
        snap_line(pid, first + count, base)
    })
}

/// Idle SSE streams may get pings only (`data: {}`): (closed, with other data).
fn sse_idle_check(streams: &[std::net::TcpStream]) -> (usize, usize) {
    use std::io::Read;
    let (mut closed, mut unexpected) = (0, 0);
    let mut buf = [0u8; 4096];
    for s in streams {
        s.set_nonblocking(true).ok();
        match (&*s).read(&mut buf) {
            Ok(0) => closed += 1,
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                if text.split("\n\n").any(|e| !e.is_empty() && e != "data: {}") {
                    unexpected += 1;
                }
            }
            Err(_) => {}
        }
        s.set_nonblocking(false).ok();
    }
    (closed, unexpected)
}

/// Takes a snapshot at `conns` connections and prints its RSS line.
fn snap_line(pid: i32, conns: usize, base: &Snap) -> Snap {
    {
        let s = Snap::take(pid, conns);
        println!(
            "density rss@{}: server RSS {:.2} MiB, Δ vs baseline {:+.2} MiB = {:.0} B/conn user-space (average; anon {:+.2} MiB of which huge pages {:+.2} MiB, file-backed {:+.2} MiB)",
            s.conns,
            mib(s.server_rss as f64),
            mib(d(base.server_rss, s.server_rss) as f64),
            d(base.server_rss, s.server_rss) as f64 / s.conns as f64,
            mib(d(base.server_anon, s.server_anon) as f64),
            mib(d(base.server_thp, s.server_thp) as f64),
            mib(d(base.server_file, s.server_file) as f64)
        );
        s
    }
}

/// The user-space lines (RSS slope between the stages); returns (slope, average) in B/conn.
fn report_user(base: &Snap, s1: &Snap, s2: &Snap) -> (f64, f64) {
    let dn = (s2.conns - s1.conns) as f64;
    let n2 = s2.conns as f64;
    let user_avg = d(base.server_rss, s2.server_rss) as f64 / n2;
    let user_slope = d(s1.server_rss, s2.server_rss) as f64 / dn;
    println!(
        "density user-slope: (RSS({}) - RSS({})) / {} = {:.0} B/conn user-space",
        s2.conns, s1.conns, dn as u64, user_slope
    );
    println!(
        "density user-fixed: RSS({}) - RSS(baseline) - slope x {} = {:+.2} MiB not per connection (what the first connections add: code pages, allocator heaps, tables); anon slope {:.0} B/conn, file-backed slope {:.0} B/conn",
        s2.conns,
        s2.conns,
        mib(d(base.server_rss, s2.server_rss) as f64 - user_slope * n2),
        d(s1.server_anon, s2.server_anon) as f64 / dn,
        d(s1.server_file, s2.server_file) as f64 / dn
    );
    let rss_step = d(s1.server_rss, s2.server_rss).unsigned_abs();
    if rss_step < 8 << 20 {
        println!(
            "# WARNING: RSS moved only {:.2} MiB between N/4 and N: at this size allocator \
             reservations dominate and the slope is noise; use more connections (default: fd limit)",
            mib(rss_step as f64)
        );
    }
    (user_slope, user_avg)
}

/// The kernel lines (slab + TCP buffers per socket); returns B per server-side socket.
fn report_kernel(base: &Snap, s1: &Snap, s2: &Snap) -> f64 {
    let dn = (s2.conns - s1.conns) as f64;
    let n2 = s2.conns as f64;
    // Both ends of every connection live on this machine and each end holds
    // mostly the same kernel objects (tcp_sock, socket inode, file, dentry), so
    // kernel memory is divided by 2 sockets per connection to get the cost of
    // one server-side socket (corrected below for what only one end holds).
    let k_avg = (s2.kernel() - base.kernel()) as f64 / (2.0 * n2);
    let k_slope = (s2.kernel() - s1.kernel()) as f64 / (2.0 * dn);
    println!(
        "density kernel@{}: ΔSlab {:+.2} MiB - Δproc_inode_cache {:+.2} MiB + ΔTCP buffers (sockstat mem) {:+.2} MiB over {} sockets = {:.0} B/socket (average)",
        s2.conns,
        mib(d(base.slab, s2.slab) as f64),
        mib(d(base.proc_inodes(), s2.proc_inodes()) as f64),
        mib(d(base.tcp_mem, s2.tcp_mem) as f64),
        2 * s2.conns,
        k_avg
    );
    println!(
        "density kernel-slope: (K({}) - K({})) / (2 x {}) = {:.0} B/socket (K = Slab - proc_inode_cache + sockstat TCP mem)",
        s2.conns, s1.conns, dn as u64, k_slope
    );
    println!(
        "# kernel division: each connection has 2 local sockets (bench client end + server end) holding \
         the same objects, so kernel Δ / (2 x conns) = one server-side socket; a server with remote clients pays one"
    );
    // Both ends hold the same objects except two: an epoll registration (eventpoll_epi), which
    // only the bench's end holds (the server has no epoll set: its sockets are on io_uring), and
    // io_kiocb (the armed multishot receive), which only the server's end holds:
    // server end = (K - epi - io) / 2 + io = (K - epi + io) / 2.
    let slab_d = |k: &str| {
        d(
            s1.slabs.get(k).copied().unwrap_or(0),
            s2.slabs.get(k).copied().unwrap_or(0),
        )
    };
    let (epi, io) = (slab_d("eventpoll_epi"), slab_d("io_kiocb"));
    let k_server = if s1.slabs.is_empty() {
        k_slope
    } else {
        ((s2.kernel() - s1.kernel()) - epi + io) as f64 / (2.0 * dn)
    };
    println!(
        "density kernel-server-socket: {k_server:.0} B/socket = (ΔK - Δeventpoll_epi + Δio_kiocb) / (2 x {2}); \
         eventpoll_epi {0:+.0} B/conn (the bench's epoll entries), io_kiocb {1:+.0} B/conn on the server end (its armed receive)",
        epi as f64 / dn,
        io as f64 / dn,
        dn as u64
    );
    let k_slope = k_server;
    if !s1.slabs.is_empty() {
        let mut per: Vec<(String, f64)> = s2
            .slabs
            .iter()
            .map(|(k, v)| {
                let before = s1.slabs.get(k).copied().unwrap_or(0);
                (k.clone(), d(before, *v) as f64 / (2.0 * dn))
            })
            .filter(|(_, b)| b.abs() >= 8.0)
            .collect();
        per.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
        let list: Vec<String> = per
            .iter()
            .take(10)
            .map(|(k, b)| format!("{k} {b:.0}"))
            .collect();
        println!(
            "# slab slope per socket (B, /proc/slabinfo): {}",
            list.join(", ")
        );
    }
    let other = d(s1.mem_used, s2.mem_used)
        - d(s1.server_rss, s2.server_rss)
        - d(s1.client_rss, s2.client_rss);
    println!(
        "# cross-check (N/4 -> N): ΔMemUsed {:+.2} MiB - Δserver RSS - Δclient RSS {:+.2} MiB = {:.0} B/socket non-RSS (kernel+page tables); ΔPageTables {:+.2} MiB; client RSS slope {:.0} B/conn",
        mib(d(s1.mem_used, s2.mem_used) as f64),
        mib(d(s1.client_rss, s2.client_rss) as f64),
        other as f64 / (2.0 * dn),
        mib(d(s1.page_tables, s2.page_tables) as f64),
        d(s1.client_rss, s2.client_rss) as f64 / dn
    );
    k_slope
}

/// The projection to 500,000 connections and the verdict against the 1 KiB target.
fn report_projection(base: &Snap, user: (f64, f64), k_slope: f64) {
    let (user_slope, user_avg) = user;
    let user_p = base.server_rss as f64 + user_slope * PROJECT_CONNS;
    let kern_p = k_slope * PROJECT_CONNS;
    println!(
        "density projection@500000: user {:.0} MiB (baseline {:.1} MiB + {:.0} B/conn slope) + kernel {:.0} MiB ({:.0} B/server socket) = {:.0} MiB, {:.0} B/conn all-in",
        mib(user_p),
        mib(base.server_rss as f64),
        user_slope,
        mib(kern_p),
        k_slope,
        mib(user_p + kern_p),
        (user_p + kern_p) / PROJECT_CONNS
    );
    let verdict = |b: f64| {
        if b <= TARGET_BYTES_PER_CONN {
            "within"
        } else {
            "OVER"
        }
    };
    println!(
        "density target: user-space {:.0} B/conn (slope; average {:.0}) vs 1024 B/conn target: {} ({:.2}x); user+kernel {:.0} B/conn: {} ({:.2}x)",
        user_slope,
        user_avg,
        verdict(user_slope),
        user_slope / TARGET_BYTES_PER_CONN,
        user_slope + k_slope,
        verdict(user_slope + k_slope),
        (user_slope + k_slope) / TARGET_BYTES_PER_CONN
    );
}
