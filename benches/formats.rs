//! Wire formats benchmark: what protobuf subscribers cost in fan-out, against JSON ones, in
//! the same run.
//!
//! One server (`--shards 1` by default, executor pinned to core 0), two channels with `--subs`
//! subscribers each, all connected for the whole run:
//! - `fmt-json`: every subscriber speaks JSON;
//! - `fmt-mixed`: half JSON, half protobuf (`centrifuge-protobuf`).
//!
//! The phases alternate (json, mixed, json, mixed, ... `--rounds` times), each publishing
//! `--rate` publications/s for `--secs` through the HTTP API to its channel only, so drift of
//! the machine falls on both alike. Per phase: the server's CPU (utime+stime, and schedstat
//! nanoseconds over its threads) divided by the deliveries counted by the readers, every
//! delivery checked (a JSON push line, or a binary protobuf message), and the broker's
//! `protobuf_encodes` and the shards' `protobuf_transcodes` from `/api/info`: a publication
//! to the mixed channel must be encoded to protobuf once for the node (1 encode per
//! publication), to the JSON channel never.
//!
//! Prints `formats <phase> ...` lines, then `formats ratio mixed/json <x>` (CPU per delivery).
//! Exits non-zero on a lost delivery, a closed subscriber or a dead server.
//!
//! Run: `cargo bench --bench formats [-- --subs 1000 --rate 100 --secs 5 --rounds 3]`.

#[macro_use]
#[path = "common/modules.rs"]
mod modules;
common_modules!(
    "common";
    args, connect, cpu, http, info, net, pinning, reader, safety, server, ws
);

use common::args::Args;
use common::connect::connect_many_as;
use common::cpu::{cpu_secs, online_cpus, sched_ns, self_cpu_secs};
use common::http::HttpClient;
use common::info::{counter_delta, NodeInfo};
use common::net::raise_nofile;
use common::pinning::{client_cpus, own_thread_affinities, pin_bench_threads, threads_of};
use common::reader::{Handler, Reader};
use common::safety::{fatal, install_safety_nets};
use common::server::Server;
use common::ws::Format;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const USAGE: &str = "\
cargo bench --bench formats -- [options]
  --subs N         subscribers per channel (default 1000; fmt-mixed has N/2 protobuf)
  --rate R         publications/s in each phase (default 100)
  --secs S         length of each phase (default 5)
  --rounds N       json+mixed phase pairs (default 3)
  --shards N       server --shards (default 1)
  --src-addrs N    source addresses 127.0.0.2.. for subscribers (default 2)
  --threads N      connecting threads (default 4)
  --margin N       file descriptors kept free below the hard limit (default 300)
  --deadline S     hard overall deadline in seconds (default 180)
  --server-log     server stderr to our stderr (default: a log file under target/)
env SHARDCAST_BIN overrides the server binary.";

const JSON_CHANNEL: &str = "fmt-json";
const MIXED_CHANNEL: &str = "fmt-mixed";

/// Deliveries seen by the reader: JSON pushes and protobuf messages, and anything else.
#[derive(Default)]
struct Counts {
    json: AtomicU64,
    protobuf: AtomicU64,
    unexpected: AtomicU64,
}

struct Count(Arc<Counts>);

impl Handler for Count {
    fn on_line(&mut self, _conn: usize, line: &[u8], _now: u64) {
        let c = if line.starts_with(b"{\"push\":{\"channel\":") {
            &self.0.json
        } else {
            &self.0.unexpected
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
    fn on_binary(&mut self, _conn: usize, len: usize) {
        // A publication push: one varint-delimited Reply of a few dozen bytes (pings, one
        // empty reply, never reach here).
        let c = if len > 8 {
            &self.0.protobuf
        } else {
            &self.0.unexpected
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default, Clone, Copy)]
struct Totals {
    pubs: u64,
    deliveries: u64,
    expected: u64,
    cpu_s: f64,
    sched_ns: u64,
    encodes: u64,
    transcodes: u64,
    /// The bench's own CPU (its readers decode both formats), seconds.
    bench_cpu_s: f64,
}

fn main() {
    let Some(args) = Args::parse_or_help(USAGE) else {
        return;
    };
    install_safety_nets(Duration::from_secs(args.get("deadline", 180u64)));
    let subs: usize = args.get("subs", 1000usize);
    let rate: f64 = args.get("rate", 100.0f64);
    let secs: f64 = args.get("secs", 5.0f64);
    let rounds: usize = args.get("rounds", 3usize);
    let shards: usize = args.get("shards", 1usize);
    let n_src: usize = args.get("src-addrs", 2usize);
    let threads: usize = args.get("threads", 4usize);
    let margin: u64 = args.get("margin", 300u64);
    let hard = raise_nofile();
    if (2 * subs) as u64 + margin > hard {
        fatal(&format!(
            "--subs {subs} needs {} descriptors, over RLIMIT_NOFILE {hard} - margin {margin}",
            2 * subs
        ));
    }
    let ncpu = online_cpus();
    println!(
        "# formats: {subs} subscribers on {JSON_CHANNEL} (JSON) and {subs} on {MIXED_CHANNEL} ({} JSON, {} protobuf); {rate}/s for {secs} s per phase, {rounds} rounds; {shards} shard(s); {ncpu} CPUs (this machine only: compare the ratio, not the absolute figures, across machines)",
        subs - subs / 2,
        subs / 2
    );
    let server = Server::start(
        "formats",
        shards,
        &args.server_args(),
        args.has("server-log"),
    );
    pin_bench_threads(&client_cpus(&args, ncpu), shards);
    println!(
        "# pinning: server threads [{}]; bench threads [{}]",
        threads_of(server.pid),
        own_thread_affinities()
    );

    let counts = Arc::new(Counts::default());
    let reader = Reader::spawn("formats-reader", Count(counts.clone()));
    let half = subs / 2;
    let groups = [
        (0, subs, JSON_CHANNEL, Format::Json),
        (subs, subs - half, MIXED_CHANNEL, Format::Json),
        (2 * subs - half, half, MIXED_CHANNEL, Format::Protobuf),
    ];
    for (first, count, channel, format) in groups {
        let name: Arc<dyn Fn(usize) -> String + Send + Sync> = Arc::new(move |_| channel.into());
        match connect_many_as(server.addr, first, count, threads, n_src, name, format) {
            Ok(conns) => reader.add(conns),
            Err(e) => fatal(&format!("connecting {} subscribers: {e}", format.name())),
        }
    }
    // Let the reader take every connection before the first publication.
    let t0 = Instant::now();
    while reader.live.conns.load(Ordering::Relaxed) < 2 * subs {
        if t0.elapsed() > Duration::from_secs(20) {
            fatal("the reader did not take every connection");
        }
        thread::sleep(Duration::from_millis(10));
    }

    let mut json = Totals::default();
    let mut mixed = Totals::default();
    let mut seq = 0u64;
    for round in 0..rounds {
        for (phase, channel, totals) in [
            ("json", JSON_CHANNEL, &mut json),
            ("mixed", MIXED_CHANNEL, &mut mixed),
        ] {
            let t = run_phase(&server, &counts, channel, subs, rate, secs, &mut seq);
            println!(
                "formats {phase} round {}: {} publications, {} of {} deliveries, server CPU {:.3} s ({} µs/delivery by schedstat), bench CPU {:.3} s, protobuf encodes {} transcodes {}",
                round + 1,
                t.pubs,
                t.deliveries,
                t.expected,
                t.cpu_s,
                per_delivery_us(&t),
                t.bench_cpu_s,
                t.encodes,
                t.transcodes
            );
            totals.pubs += t.pubs;
            totals.deliveries += t.deliveries;
            totals.expected += t.expected;
            totals.cpu_s += t.cpu_s;
            totals.sched_ns += t.sched_ns;
            totals.encodes += t.encodes;
            totals.transcodes += t.transcodes;
        }
    }
    for (phase, t) in [("json", &json), ("mixed", &mixed)] {
        println!(
            "formats {phase}: {} µs server CPU per delivery (schedstat; utime+stime {:.3} µs), {} deliveries, protobuf encodes per publication {:.2}",
            per_delivery_us(t),
            t.cpu_s * 1e6 / t.deliveries.max(1) as f64,
            t.deliveries,
            t.encodes as f64 / t.pubs.max(1) as f64
        );
    }
    let ratio = (mixed.sched_ns as f64 / mixed.deliveries.max(1) as f64)
        / (json.sched_ns as f64 / json.deliveries.max(1) as f64);
    println!("formats ratio mixed/json {ratio:.3} (CPU per delivery, same run)");

    let (stats, _) = reader.stop();
    let unexpected = counts.unexpected.load(Ordering::Relaxed);
    let mut server = server;
    let alive = server.alive();
    println!(
        "# end: subscribers closed {}, reader errors {}, unexpected messages {unexpected}, server alive {alive}",
        stats.closed, stats.errors
    );
    let lost = (json.expected + mixed.expected) - (json.deliveries + mixed.deliveries);
    if lost > 0 || stats.closed > 0 || !alive || unexpected > 0 {
        println!("# FAILED: {lost} deliveries lost");
        std::process::exit(1);
    }
}

fn per_delivery_us(t: &Totals) -> String {
    format!(
        "{:.3}",
        t.sched_ns as f64 / 1e3 / t.deliveries.max(1) as f64
    )
}

/// Publishes to `channel` at `rate` for `secs`, waits for every delivery (at most 5 s more),
/// and measures the server over that window.
fn run_phase(
    server: &Server,
    counts: &Counts,
    channel: &str,
    subs: usize,
    rate: f64,
    secs: f64,
    seq: &mut u64,
) -> Totals {
    let delivered =
        || counts.json.load(Ordering::Relaxed) + counts.protobuf.load(Ordering::Relaxed);
    let info_before = NodeInfo::fetch(server.addr).ok();
    let base = delivered();
    let (cpu0, sched0, own0) = (cpu_secs(server.pid), sched_ns(server.pid), self_cpu_secs());
    let pubs = publish(server.addr, channel, rate, secs, seq);
    let expected = pubs * subs as u64;
    let t0 = Instant::now();
    while delivered() - base < expected && t0.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(5));
    }
    let (cpu1, sched1, own1) = (cpu_secs(server.pid), sched_ns(server.pid), self_cpu_secs());
    let info_after = NodeInfo::fetch(server.addr).ok();
    let delta = |name| counter_delta(info_before.as_ref(), info_after.as_ref(), name).unwrap_or(0);
    Totals {
        pubs,
        deliveries: delivered() - base,
        expected,
        cpu_s: cpu1 - cpu0,
        sched_ns: sched1 - sched0,
        encodes: delta("protobuf_encodes"),
        transcodes: delta("protobuf_transcodes"),
        bench_cpu_s: own1 - own0,
    }
}

/// Paced publishes on one keep-alive connection, each answered before the next (100/s is far
/// below what one connection carries); returns how many were accepted.
fn publish(addr: SocketAddr, channel: &str, rate: f64, secs: f64, seq: &mut u64) -> u64 {
    let mut http = HttpClient::connect(addr).unwrap_or_else(|e| fatal(&format!("API: {e}")));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let n = (rate * secs).round() as u64;
    let start = Instant::now();
    let mut ok = 0;
    for k in 0..n {
        let due = start + interval * k as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        *seq += 1;
        let body = format!(
            "{{\"channel\":\"{channel}\",\"data\":{{\"seq\":{},\"pad\":\"{}\"}}}}",
            *seq,
            "x".repeat(48)
        );
        http.send("POST", "/api/publish", body.as_bytes())
            .unwrap_or_else(|e| fatal(&format!("publish: {e}")));
        match http.recv() {
            Ok((200, b)) if !b.windows(8).any(|w| w == b"\"error\":") => ok += 1,
            Ok((code, b)) => fatal(&format!(
                "publish answered {code}: {}",
                String::from_utf8_lossy(&b)
            )),
            Err(e) => fatal(&format!("publish: {e}")),
        }
    }
    ok
}
