//! Connection-density benchmark: memory cost of idle subscribed WebSocket
//! connections.
//!
//! Starts `shardcast`, opens N idle connections (connect + subscribe, each
//! reply verified), in two stages (N/4, then the remaining 3N/4), and reports
//! server RSS and kernel memory before, at N/4 and at N, the per-connection
//! average and slope, and a projection to 500,000 connections.
//!
//! Run: `cargo bench --bench density [-- --conns N --shards 2 ...]`, `--help`
//! for all options.

mod common;

use common::*;
use std::collections::HashMap;
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
  --src-addrs N     number of source addresses 127.0.0.2.. (default: 1 per 10K conns, min 2)
  --settle-ms MS    settle time before each measurement (default 3000)
  --deadline S      hard overall deadline in seconds (default 120)
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

impl LineHandler for Idle {
    fn on_line(&mut self, _conn: usize, line: &[u8], _now: u64) {
        self.unexpected += 1;
        if self.first.is_none() {
            self.first = Some(String::from_utf8_lossy(&line[..line.len().min(200)]).into());
        }
    }
}

struct Snap {
    conns: usize,
    server_rss: u64,
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

fn main() {
    let args = Args::parse();
    if args.has("help") {
        println!("{USAGE}");
        return;
    }
    let deadline = Duration::from_secs(args.get("deadline", 120u64));
    install_safety_nets(deadline);
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
    if n < 4 {
        fatal("need at least 4 connections");
    }
    let shards: usize = args.get("shards", 2usize);
    let channels: usize = args.get("channels", 1usize).max(1);
    let threads: usize = args.get("threads", 8usize);
    let n_src: usize = args.get("src-addrs", n.div_ceil(10_000).max(2));
    let settle = Duration::from_millis(args.get("settle-ms", 3000u64));

    println!(
        "# density: conns={n} (RLIMIT_NOFILE hard={hard}, margin={margin}) shards={shards} \
         channels={channels} src_addrs=127.0.0.2..127.0.0.{} connect_threads={threads} settle={} ms",
        n_src + 1,
        settle.as_millis()
    );
    let server = Server::start(
        "density",
        shards,
        &args.server_args("density"),
        args.has("server-log"),
    );
    println!("# server: {}", server.describe());
    thread::sleep(settle);
    // The shards' receive buffers (provided-buffer rings) are part of the baseline: resident
    // only once written, so they show in the RSS as the first reads touch them.
    match HttpClient::connect(server.addr).and_then(|mut c| {
        c.send("POST", "/api/info", b"{}")?;
        c.recv()
    }) {
        Ok((200, body)) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let ring = v["result"]["nodes"][0]["gauges"]["recv_buffer_ring_bytes"]
                .as_u64()
                .unwrap_or(0);
            println!(
                "density recv-buffer-rings: {:.2} MiB in all ({shards} shards; /api/info gauge recv_buffer_ring_bytes) = {:.0} B/conn at {n} conns",
                mib(ring as f64),
                ring as f64 / n as f64
            );
        }
        other => println!("# /api/info unavailable: {other:?}"),
    }
    let base = Snap::take(server.pid, 0);
    println!(
        "density baseline: server RSS {:.2} MiB (after READY + {:.1} s settle)",
        mib(base.server_rss as f64),
        settle.as_secs_f64()
    );

    let keeper = Reader::spawn("keeper", Idle::default());
    let chan_fn: Arc<dyn Fn(usize) -> String + Send + Sync> =
        Arc::new(move |i| format!("bench:{}", i % channels));
    let n1 = n / 4;
    let mut snaps = vec![];
    for (first, count) in [(0, n1), (n1, n - n1)] {
        let t0 = Instant::now();
        let conns = match connect_many(server.addr, first, count, threads, n_src, chan_fn.clone()) {
            Ok(c) => c,
            Err(e) => fatal(&format!("connecting: {e}")),
        };
        let dt = t0.elapsed().as_secs_f64();
        let _ = keeper.add.send(conns);
        println!(
            "density connect: +{count} conns (connect+subscribe verified) in {dt:.2} s = {:.0} conn/s, total {}",
            count as f64 / dt,
            first + count
        );
        thread::sleep(settle);
        let closed = keeper
            .live
            .closed
            .load(std::sync::atomic::Ordering::Relaxed);
        if closed > 0 {
            fatal(&format!(
                "{closed} connections were closed by the server while idle"
            ));
        }
        let s = Snap::take(server.pid, first + count);
        println!(
            "density rss@{}: server RSS {:.2} MiB, Δ vs baseline {:+.2} MiB = {:.0} B/conn user-space (average)",
            s.conns,
            mib(s.server_rss as f64),
            mib(d(base.server_rss, s.server_rss) as f64),
            d(base.server_rss, s.server_rss) as f64 / s.conns as f64
        );
        snaps.push(s);
    }
    let (s1, s2) = (&snaps[0], &snaps[1]);
    let dn = (s2.conns - s1.conns) as f64;
    let n2 = s2.conns as f64;

    // --- user space -----------------------------------------------------
    let user_avg = d(base.server_rss, s2.server_rss) as f64 / n2;
    let user_slope = d(s1.server_rss, s2.server_rss) as f64 / dn;
    println!(
        "density user-slope: (RSS({}) - RSS({})) / {} = {:.0} B/conn user-space",
        s2.conns, s1.conns, dn as u64, user_slope
    );
    let rss_step = d(s1.server_rss, s2.server_rss).unsigned_abs();
    if rss_step < 8 << 20 {
        println!(
            "# WARNING: RSS moved only {:.2} MiB between N/4 and N: at this size allocator \
             reservations dominate and the slope is noise; use more connections (default: fd limit)",
            mib(rss_step as f64)
        );
    }

    // --- kernel ---------------------------------------------------------
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

    // --- projection -----------------------------------------------------
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

    let mut server = server;
    let alive = server.alive();
    let (stats, idle) = keeper.stop();
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
    if !alive || stats.closed > 0 {
        std::process::exit(1);
    }
}
