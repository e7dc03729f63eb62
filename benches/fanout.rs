//! Fan-out benchmark: N subscribers on one channel, publications through the
//! HTTP API, publish-to-deliver latency, ordering/loss checks and server CPU
//! per delivery.
//!
//! Phase 1: fixed rate (default 100 msg/s for 10 s).
//! Phase 2: ramp (rate x1.5 per step, 2 s per step) with open-loop publishers
//! over 1–4 keep-alive HTTP connections (bounded window of outstanding
//! requests). A step is sustained when there is no loss, reorder, disconnect
//! or publish error, the publishers reached 95 % of the target rate and p99 is
//! under the limit. The ramp stops at the first step with loss/reorder/
//! disconnect/errors or below 95 % of the target rate (saturation), or when
//! the step/time budget runs out.
//!
//! The server runs with `--shards 1` (executor pinned to core 0) and every
//! bench thread is pinned to the last core.
//!
//! `--redis` (output lines `fanout-redis ...`): the bench starts its own
//! `redis-server` on a free loopback port and two nodes A and B with
//! `--redis redis://127.0.0.1:P`, puts half of the subscribers on each node and
//! publishes through A's HTTP API only, so half of the deliveries cross nodes
//! through Redis (in Redis mode every publication goes publisher node → Redis →
//! every node, A's own subscribers included). Same phases and figures, plus
//! latency per node and CPU per delivery of both nodes and of redis-server.
//!
//! `--redis-cost` (lines `fanout-redis-cost ...`): what the Redis path itself costs the node,
//! standalone against Redis in ONE run. The bench starts a private `redis-server` pinned to
//! `--redis-cpu` (default the last CPU, where the bench's own threads and the node's Redis
//! multiplexer run too, so it never takes the shard's core 0 from the node) and two nodes with
//! the same `--shards` (shard executor pinned to core 0): S standalone and R with `--redis`.
//! `--subs` subscribers on each node (so 2 x `--subs` connections), then `--rounds` rounds
//! (default 3) of two `--secs` phases at `--rate` through the HTTP API: one through S only, one
//! through R only, in the order S,R then R,S (ABBA, so a drift of the machine's load does not
//! favour one). The idle node makes no syscalls meanwhile. Per phase: the publishing node's
//! CPU-s per million deliveries (utime+stime and schedstat), its context switches per
//! publication (the wake-ups of its threads), the server's frames per write, and in the R phase
//! redis-server's CPU, separately. Then the sums per mode and the ratio R/S. No ramp.
//!
//! `--floor` (line `fanout floor`): no server; the bench stands in for it, writing the same
//! frames at the same paced rate to as many loopback sockets with a bare `send()` loop from one
//! thread pinned to core 0, read by the same readers: the kernel floor of CPU per delivery.
//! `--with-floor` runs it right after the server's fixed-rate phase, in the same run, and
//! prints the ratio `fanout server/floor`.
//!
//! Every step also reports the server's own counters over the step (`deliveries` and `writes`
//! from /api/info: frames per write, "n/a" on a server without them) and the client's messages
//! per read(), so a max-rate figure shows whether the server coalesced and whether the reader
//! kept up.
//!
//! Run: `cargo bench --bench fanout [-- --subs 1000 --rate 100 --secs 10 ...]`,
//! `cargo bench --bench fanout -- --redis`, `cargo bench --bench fanout -- --redis-cost`,
//! `--help` for all options.

#[macro_use]
#[path = "common/modules.rs"]
mod modules;
common_modules!(
    "common";
    args, clock, connect, cpu, floor, hist, http, info, machine, net, pinning, reader, redis,
    safety, server, ws
);

use common::args::Args;
use common::clock::wait_until;
use common::connect::{connect_many, WsConn};
use common::cpu::{cpu_secs, ctx_switches, online_cpus, sched_ns, sched_ns_by_role, self_cpu_secs};
use common::floor::{Floor, Job};
use common::hist::{fmt_ns, Hist};
use common::http::HttpClient;
use common::info::{counter_delta, NodeInfo};
use common::machine::machine_cpu;
use common::net::raise_nofile;
use common::pinning::{
    client_cpus, own_thread_affinities, pin_bench_threads, pin_process, threads_of,
};
use common::reader::{unix_ns, Handler, Reader, ReaderLive};
use common::redis::RedisServer;
use common::safety::{fatal, install_safety_nets};
use common::server::{bench_server_args, Server};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const USAGE: &str = "\
cargo bench --bench fanout -- [options]
  --subs N           subscribers on bench:0 (default 1000)
  --shards N         server --shards (default 1; executor pinned to core 0)
  --rate R           fixed-rate phase, publications/s (default 100)
  --secs S           fixed-rate phase duration (default 10)
  --ramp-start R     first ramp step rate (default 2 x --rate)
  --ramp-factor F    rate multiplier per step (default 1.5)
  --step-secs S      ramp step duration (default 2)
  --max-steps N      ramp steps at most (default 10)
  --http-conns N     keep-alive publish connections in the ramp, 1..4 (default 2), each its
                     own publisher thread; --publishers N is the same option
  --pipeline W       outstanding (pipelined) requests per HTTP connection (default 4)
  --p99-limit-ms MS  a ramp step with p99 above this is not sustained (default 50)
  --drain-ms MS      wait for late deliveries after each step (default 3000)
  --payload B        approximate size of the published JSON data (default 64)
  --readers N        epoll reader threads (default 1)
  --reader-pause-us U  in the ramp, the readers sleep U µs between epoll batches so each
                     read() takes more frames (default 0; the fixed rate and floor never pause)
  --floor            no server: the kernel floor (bare send() loop from a thread pinned to
                     core 0 to --subs loopback sockets, same frames, same paced rate)
  --with-floor       the floor right after the server's fixed-rate phase, then the ratio line
  --client-cpus L    comma-separated CPUs for the bench threads (default: last CPU)
  --src-addrs N      source addresses 127.0.0.2.. for subscribers (default 2)
  --skip-fixed / --skip-ramp
  --deadline S       hard overall deadline in seconds (default 120)
  --server-args S    extra server arguments (whitespace separated)
  --no-bench-config  do not pass --config with the [namespaces.bench] section
  --history N        give bench:<n> a history of N publications with recovery (offsets on
                     every push; Redis mode publishes through the history script)
  --server-log       server stderr to our stderr (default: a log file under target/)
  --redis            Redis mode: start a private redis-server (free loopback port, no
                     persistence) and two nodes A and B with --redis (--shards each),
                     half of the subscribers on A, half on B, publish through A only;
                     output lines start with `fanout-redis ` and add latency for A vs B
                     and CPU per delivery of both nodes and of redis-server
  --redis-cost       the cost of the Redis path in one run: a standalone node S and a Redis
                     node R (same --shards, each with --subs subscribers), a private
                     redis-server pinned to --redis-cpu, --rounds rounds of one --secs phase
                     through S and one through R (ABBA order); output lines start with
                     `fanout-redis-cost `: node CPU-s per 1M deliveries per phase, context
                     switches per publication, redis-server CPU, and the ratio R/S
  --rounds N         --redis-cost rounds (default 3)
  --redis-cpu C      --redis-cost: the CPU redis-server is pinned to (default the last CPU)
env SHARDCAST_BIN overrides the server binary, REDIS_SERVER the redis-server binary.";

/// Stream 0 = fixed-rate publisher, 1..=4 = ramp publishers (one per HTTP
/// connection); each stream has its own gap-free seq sequence.
const MAX_STREAMS: usize = 6;
const MAX_STEPS: usize = 64;
/// The floor's stream and step slot (the ramp uses steps 1..MAX_STEPS-1 and streams 1..=4).
const FLOOR_STREAM: usize = MAX_STREAMS - 1;
const FLOOR_STEP: usize = MAX_STEPS - 1;

#[derive(Default, Clone)]
struct StepStats {
    delivered: u64,
    gaps: u64,
    reorder: u64,
    /// All deliveries; filled when the readers' stats are merged.
    hist: Hist,
    /// Per node (0 = A, the node published to; 1 = B); the readers record here.
    node_hist: [Hist; 2],
    last_ns: u64,
}

struct Shared {
    steps: Vec<Mutex<StepStats>>,
    delivered: Vec<AtomicU64>,
    malformed: AtomicU64,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            steps: (0..MAX_STEPS).map(|_| Mutex::default()).collect(),
            delivered: (0..MAX_STEPS).map(|_| AtomicU64::new(0)).collect(),
            malformed: AtomicU64::new(0),
        }
    }
}

struct Subs {
    /// Next expected seq per connection and stream.
    next: Vec<[u64; MAX_STREAMS]>,
    /// Connections `0..a_subs` are on node A (0), the rest on node B (1).
    a_subs: usize,
    shared: Arc<Shared>,
    pending: [u64; MAX_STEPS],
    first_malformed: Option<String>,
}

/// Finds `"key":<digits>` at or after `from` and parses the number; returns it and where it
/// ends (no allocation; this runs for every delivery on a single client core, so the keys are
/// looked up in their order, each search starting where the previous one ended).
fn find_num(line: &[u8], key: &[u8], from: usize) -> Option<(u64, usize)> {
    let rest = line.get(from..)?;
    let pos = from + rest.windows(key.len()).position(|w| w == key)?;
    let mut i = pos + key.len();
    while i < line.len() && line[i] == b' ' {
        i += 1;
    }
    let start = i;
    let mut v: u64 = 0;
    while i < line.len() && line[i].is_ascii_digit() {
        v = v.checked_mul(10)?.checked_add((line[i] - b'0') as u64)?;
        i += 1;
    }
    (i > start).then_some((v, i))
}

impl Handler for Subs {
    fn on_line(&mut self, conn: usize, line: &[u8], now: u64) {
        let parsed = (|| {
            if !line.starts_with(b"{\"push\":") {
                return None;
            }
            // The data's keys come in this order (see `data`).
            let (t, at) = find_num(line, b"\"t\":", 0)?;
            let (s, at) = find_num(line, b"\"s\":", at)?;
            let (seq, at) = find_num(line, b"\"seq\":", at)?;
            let (p, _) = find_num(line, b"\"p\":", at)?;
            let (s, p) = (s as usize, p as usize);
            (s < MAX_STREAMS && p < MAX_STEPS).then_some((t, s, seq, p))
        })();
        let Some((t, s, seq, p)) = parsed else {
            self.shared.malformed.fetch_add(1, Ordering::Relaxed);
            if self.first_malformed.is_none() {
                self.first_malformed =
                    Some(String::from_utf8_lossy(&line[..line.len().min(200)]).into());
            }
            return;
        };
        if conn >= self.next.len() {
            self.next.resize(conn + 1, [0; MAX_STREAMS]);
        }
        let exp = &mut self.next[conn][s];
        let mut st = self.shared.steps[p].lock().unwrap();
        match seq.cmp(exp) {
            std::cmp::Ordering::Equal => *exp = seq + 1,
            std::cmp::Ordering::Greater => {
                st.gaps += seq - *exp;
                *exp = seq + 1;
            }
            std::cmp::Ordering::Less => st.reorder += 1,
        }
        st.delivered += 1;
        let node = usize::from(conn >= self.a_subs);
        st.node_hist[node].record(now.saturating_sub(t));
        st.last_ns = st.last_ns.max(now);
        drop(st);
        self.pending[p] += 1;
    }

    fn flush(&mut self) {
        for (i, n) in self.pending.iter_mut().enumerate() {
            if *n > 0 {
                self.shared.delivered[i].fetch_add(*n, Ordering::Relaxed);
                *n = 0;
            }
        }
    }
}

/// One publish stream. A fresh keep-alive connection is opened for every step
/// (the server closes idle HTTP connections after its handshake timeout).
struct Publisher {
    http: Option<HttpClient>,
    stream: usize,
    seq: u64,
}

#[derive(Default)]
struct PubResult {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
}

/// The publication's data, stamped now: `{"t":..,"s":..,"seq":..,"p":..,"pad":"x.."}` of
/// about `payload` bytes.
fn data(stream: usize, seq: u64, step: usize, payload: usize) -> String {
    let t = unix_ns();
    let base = format!("{{\"t\":{t},\"s\":{stream},\"seq\":{seq},\"p\":{step},\"pad\":\"\"}}");
    let pad = payload.saturating_sub(base.len());
    format!(
        "{{\"t\":{t},\"s\":{stream},\"seq\":{seq},\"p\":{step},\"pad\":\"{}\"}}",
        "x".repeat(pad)
    )
}

/// The publish request's body.
fn body(stream: usize, seq: u64, step: usize, payload: usize) -> Vec<u8> {
    format!(
        "{{\"channel\":\"bench:0\",\"data\":{}}}",
        data(stream, seq, step, payload)
    )
    .into_bytes()
}

/// The push a subscriber of bench:0 receives for that publication, as the server writes it
/// (`offset` too when the channel has history): what the floor sends.
fn push(stream: usize, seq: u64, step: usize, payload: usize, history: bool) -> Vec<u8> {
    let offset = if history {
        format!(",\"offset\":{}", seq + 1)
    } else {
        String::new()
    };
    format!(
        "{{\"push\":{{\"channel\":\"bench:0\",\"pub\":{{\"data\":{}{offset}}}}}}}",
        data(stream, seq, step, payload)
    )
    .into_bytes()
}

/// Open-loop publisher: request k is due at start + k/rate; a late publisher
/// sends back to back (catching up) but never has more than `window`
/// requests outstanding on its connection.
fn publish_loop(
    p: &mut Publisher,
    rate: f64,
    dur: Duration,
    step: usize,
    window: usize,
    payload: usize,
) -> PubResult {
    let mut r = PubResult::default();
    let Some(mut http) = p.http.take() else {
        r.errors += 1;
        r.first_error = Some("no HTTP connection".into());
        return r;
    };
    let start = Instant::now();
    let end = start + dur;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut k: u32 = 0;
    let mut outstanding = 0usize;
    let fail = |r: &mut PubResult, e: String| {
        r.errors += 1;
        if r.first_error.is_none() {
            r.first_error = Some(e);
        }
    };
    loop {
        let now = Instant::now();
        let due = start + interval * k;
        let more = due < end;
        if more && outstanding < window && now >= due {
            let b = body(p.stream, p.seq, step, payload);
            if let Err(e) = http.send("POST", "/api/publish", &b) {
                fail(&mut r, format!("send: {e}"));
                break;
            }
            p.seq += 1;
            k += 1;
            outstanding += 1;
            continue;
        }
        if outstanding > 0 {
            // Window full, not yet due, or finishing: collect a response.
            match http.recv() {
                Ok((200, body)) if body.windows(8).any(|w| w == b"\"result\"") => r.ok += 1,
                Ok((code, body)) => {
                    fail(
                        &mut r,
                        format!("HTTP {code}: {}", String::from_utf8_lossy(&body).trim()),
                    );
                    if window == 1 {
                        // Not published: reuse the seq so subscribers see no gap.
                        p.seq -= 1;
                    }
                }
                Err(e) => {
                    fail(&mut r, format!("recv: {e}"));
                    break;
                }
            }
            outstanding -= 1;
            continue;
        }
        if !more {
            break;
        }
        let wait = due.saturating_duration_since(now);
        if wait > Duration::from_micros(50) {
            thread::sleep(wait);
        } else {
            std::hint::spin_loop();
        }
    }
    r
}

struct StepReport {
    name: String,
    target_rate: f64,
    pub_rate: f64,
    published: u64,
    pub_errors: u64,
    expected: u64,
    stats: StepStats,
    deliveries_per_s: f64,
    /// CPU of the server process(es): in Redis mode the sum over both nodes.
    server_cpu: f64,
    server_sched: f64,
    /// Redis mode only (else false / zeros): subscribers and CPU per node
    /// (A, B) and redis-server's CPU.
    redis_mode: bool,
    node_subs: [usize; 2],
    node_cpu: [f64; 2],
    redis_cpu: f64,
    /// redis-server from schedstat (ns resolution; its utime+stime is only a
    /// few clock ticks per step).
    redis_sched: f64,
    client_util: f64,
    foreign_util: f64,
    irq_cpu: f64,
    client_cores: usize,
    closed: usize,
    drained: bool,
    first_error: Option<String>,
    /// Server counters over the step (summed over nodes), `None` when /api/info lacks them.
    srv_deliveries: Option<u64>,
    srv_writes: Option<u64>,
    /// Client side: read() calls with data and WebSocket messages, over the step.
    client_reads: u64,
    client_messages: u64,
    reader_pause_us: u64,
}

impl StepReport {
    /// Frames per write from the server's counters, or "n/a".
    fn frames_per_write(&self) -> String {
        match (self.srv_deliveries, self.srv_writes) {
            (Some(d), Some(w)) if w > 0 => format!("{:.2}", d as f64 / w as f64),
            _ => "n/a".into(),
        }
    }

    fn messages_per_read(&self) -> f64 {
        self.client_messages as f64 / self.client_reads.max(1) as f64
    }

    fn client_saturated(&self) -> bool {
        self.client_util > 0.9 * self.client_cores as f64
    }

    /// The counters line of a step: server frames per write, client messages per read.
    fn print_io(&self) {
        let opt = |v: Option<u64>| v.map_or("n/a".to_string(), |v| v.to_string());
        println!(
            "fanout {} io: server counters deliveries {} writes {} = {} frames/write; client {} messages in {} reads = {:.2} messages/read (reader pause {} µs), client CPU {:.0}% of {} core(s){}",
            self.name,
            opt(self.srv_deliveries),
            opt(self.srv_writes),
            self.frames_per_write(),
            self.client_messages,
            self.client_reads,
            self.messages_per_read(),
            self.reader_pause_us,
            self.client_util * 100.0,
            self.client_cores,
            if self.client_saturated() {
                ": CLIENT SATURATED (figures are client-bound)"
            } else {
                ": client not saturated"
            }
        );
    }

    fn clone_summary(&self) -> StepReport {
        StepReport {
            name: self.name.clone(),
            stats: self.stats.clone(),
            first_error: self.first_error.clone(),
            ..*self
        }
    }

    fn missing(&self) -> u64 {
        self.expected.saturating_sub(self.stats.delivered)
    }

    fn print(&self, subs: usize) {
        let del = self.stats.delivered.max(1) as f64;
        let h = &self.stats.hist;
        if self.redis_mode {
            self.print_redis(subs);
        } else {
            println!(
                "fanout {}: {subs} subs x {:.0} msg/s target: published {} ({:.1} msg/s, {} errors), \
                 deliveries {}/{} = {:.0} deliveries/s, lost {} (gaps {}), reorder {}, disconnects {}; \
                 server CPU {:.3} s = {:.3} µs/delivery = {:.3} CPU-s per 1M deliveries (schedstat {:.3} µs/delivery; plus machine softirq {:.3} µs/delivery, unattributed); \
                 latency p50 {} p99 {} max {}; client CPU {:.0}%, other processes {:.0}% of a core",
                self.name,
                self.target_rate,
                self.published,
                self.pub_rate,
                self.pub_errors,
                self.stats.delivered,
                self.expected,
                self.deliveries_per_s,
                self.missing(),
                self.stats.gaps,
                self.stats.reorder,
                self.closed,
                self.server_cpu,
                self.server_cpu / del * 1e6,
                self.server_cpu / del * 1e6,
                self.server_sched / del * 1e6,
                self.irq_cpu / del * 1e6,
                fmt_ns(h.quantile(0.50)),
                fmt_ns(h.quantile(0.99)),
                fmt_ns(h.max),
                self.client_util * 100.0,
                self.foreign_util * 100.0
            );
        }
        self.print_io();
        if let Some(e) = &self.first_error {
            println!("# {}: first publish error: {e}", self.name);
        }
        if self.foreign_util > 0.1 {
            println!(
                "# {}: WARNING: other processes used {:.0}% of a CPU during this step (machine busy); numbers are perturbed",
                self.name,
                self.foreign_util * 100.0
            );
        }
        if self.client_saturated() {
            println!(
                "# {}: WARNING: bench client CPU saturated ({:.0}%), this step may be client-bound",
                self.name,
                self.client_util * 100.0
            );
        }
        if !self.drained {
            println!(
                "# {}: not all deliveries arrived within the drain time",
                self.name
            );
        }
    }

    /// The `fanout-redis` line: same figures as the standalone line, plus
    /// latency per node and CPU of both nodes and of redis-server.
    fn print_redis(&self, subs: usize) {
        let del = self.stats.delivered.max(1) as f64;
        let us = |cpu: f64| cpu / del * 1e6;
        let h = &self.stats.hist;
        let node = |i: usize| {
            let h = &self.stats.node_hist[i];
            format!(
                "p50 {} p99 {} max {}, {} deliveries",
                fmt_ns(h.quantile(0.50)),
                fmt_ns(h.quantile(0.99)),
                fmt_ns(h.max),
                h.n
            )
        };
        println!(
            "fanout-redis {}: {subs} subs ({} on A, {} on B) x {:.0} msg/s target via A: published {} ({:.1} msg/s, {} errors), \
             deliveries {}/{} = {:.0} deliveries/s, latency p50 {} p99 {} max {} (A: {}; B: {}), \
             nodes CPU {:.3} s = {:.3} µs/delivery (A {:.3} s, B {:.3} s; schedstat {:.3} µs/delivery), \
             redis CPU {:.3} s = {:.3} µs/delivery ({:.1} µs/publication; schedstat {:.3} µs/delivery), nodes+redis {:.3} µs/delivery \
             (plus machine softirq {:.3} µs/delivery, unattributed), \
             lost {} (gaps {}), reorder {}, disconnects {}; client CPU {:.0}%, other processes {:.0}% of a core",
            self.name,
            self.node_subs[0],
            self.node_subs[1],
            self.target_rate,
            self.published,
            self.pub_rate,
            self.pub_errors,
            self.stats.delivered,
            self.expected,
            self.deliveries_per_s,
            fmt_ns(h.quantile(0.50)),
            fmt_ns(h.quantile(0.99)),
            fmt_ns(h.max),
            node(0),
            node(1),
            self.server_cpu,
            us(self.server_cpu),
            self.node_cpu[0],
            self.node_cpu[1],
            us(self.server_sched),
            self.redis_cpu,
            us(self.redis_cpu),
            self.redis_cpu / self.published.max(1) as f64 * 1e6,
            us(self.redis_sched),
            us(self.server_cpu + self.redis_cpu),
            us(self.irq_cpu),
            self.missing(),
            self.stats.gaps,
            self.stats.reorder,
            self.closed,
            self.client_util * 100.0,
            self.foreign_util * 100.0
        );
    }

    /// Loss, reorder or disconnects: a correctness failure of the server (gaps
    /// are excused only when some publishes failed, since with pipelining a
    /// failed publish leaves a hole in its stream's seq sequence).
    fn broken(&self) -> bool {
        self.missing() > 0
            || self.stats.reorder > 0
            || self.closed > 0
            || (self.stats.gaps > 0 && self.pub_errors == 0)
    }

    fn sustained(&self, p99_limit_ns: u64) -> Result<(), String> {
        let mut why = vec![];
        if self.missing() > 0 || self.stats.gaps > 0 {
            why.push(format!("lost {}", self.missing().max(self.stats.gaps)));
        }
        if self.stats.reorder > 0 {
            why.push(format!("reorder {}", self.stats.reorder));
        }
        if self.closed > 0 {
            why.push(format!("{} disconnects", self.closed));
        }
        if self.pub_errors > 0 {
            why.push(format!("{} publish errors", self.pub_errors));
        }
        if self.pub_rate < 0.95 * self.target_rate {
            why.push(format!(
                "publisher reached only {:.0} of {:.0} msg/s",
                self.pub_rate, self.target_rate
            ));
        }
        let p99 = self.stats.hist.quantile(0.99);
        if p99 > p99_limit_ns {
            why.push(format!("p99 {} > {}", fmt_ns(p99), fmt_ns(p99_limit_ns)));
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join(", "))
        }
    }
}

struct Ctx<'a> {
    /// Where the publishers POST (node A in Redis mode).
    publish_to: std::net::SocketAddr,
    /// Server processes whose CPU is counted (A, then B in Redis mode).
    node_pids: Vec<i32>,
    /// redis-server (Redis mode only).
    redis_pid: Option<i32>,
    node_subs: [usize; 2],
    shared: &'a [Arc<Shared>],
    closed: &'a dyn Fn() -> usize,
    subs: usize,
    drain: Duration,
    payload: usize,
    window: usize,
    client_cores: usize,
    /// Every node's address, for its /api/info counters (empty for the floor).
    node_addrs: Vec<std::net::SocketAddr>,
    lives: Vec<Arc<ReaderLive>>,
    /// The floor stands in for the server (no HTTP publishers, CPU of its sender thread).
    floor: Option<&'a Floor>,
    history: bool,
}

/// The counters of every node (`None` for a node whose /api/info failed).
fn node_infos(addrs: &[std::net::SocketAddr]) -> Vec<Option<NodeInfo>> {
    addrs.iter().map(|&a| NodeInfo::fetch(a).ok()).collect()
}

/// A counter's delta summed over the nodes; `None` if any node lacks it.
fn nodes_delta(before: &[Option<NodeInfo>], after: &[Option<NodeInfo>], name: &str) -> Option<u64> {
    if before.is_empty() {
        return None;
    }
    before
        .iter()
        .zip(after)
        .map(|(b, a)| counter_delta(b.as_ref(), a.as_ref(), name))
        .sum()
}

fn run_step(
    ctx: &Ctx,
    name: &str,
    step: usize,
    pubs: &mut [Publisher],
    rate: f64,
    dur: Duration,
) -> StepReport {
    if ctx.floor.is_none() {
        for p in pubs.iter_mut() {
            match HttpClient::connect(ctx.publish_to) {
                Ok(h) => p.http = Some(h),
                Err(e) => fatal(&format!("HTTP connect: {e}")),
            }
        }
    }
    let info0 = node_infos(&ctx.node_addrs);
    let io = || -> (u64, u64) {
        ctx.lives.iter().fold((0, 0), |(r, m), l| {
            (
                r + l.reads.load(Ordering::Relaxed),
                m + l.messages.load(Ordering::Relaxed),
            )
        })
    };
    let floor_cpu = || ctx.floor.map_or((0.0, 0), |f| f.cpu());
    let io0 = io();
    let f0 = floor_cpu();
    let closed0 = (ctx.closed)();
    let subs_live = ctx.subs - closed0;
    let node_cpu = || -> [f64; 2] {
        let mut c = [0.0; 2];
        for (i, &pid) in ctx.node_pids.iter().take(2).enumerate() {
            c[i] = cpu_secs(pid);
        }
        c
    };
    let node_sched = || -> u64 { ctx.node_pids.iter().map(|&p| sched_ns(p)).sum() };
    let redis_cpu = || ctx.redis_pid.map(cpu_secs).unwrap_or(0.0);
    let redis_sched = || ctx.redis_pid.map(sched_ns).unwrap_or(0);
    let cpu0 = node_cpu();
    let sch0 = node_sched();
    let rcpu0 = redis_cpu();
    let rsch0 = redis_sched();
    let self0 = self_cpu_secs();
    let sys0 = machine_cpu();
    let t0_ns = unix_ns();
    let t0 = Instant::now();
    let n = pubs.len();
    let (window, payload) = (ctx.window, ctx.payload);
    let results: Vec<PubResult> = match ctx.floor {
        Some(floor) => {
            let (mut seq, history) = (0u64, ctx.history);
            let sent = floor.run(Job {
                rate,
                dur,
                make: Box::new(move || {
                    seq += 1;
                    push(FLOOR_STREAM, seq - 1, step, payload, history)
                }),
            });
            println!(
                "# {name}: the floor thread sent {} frames of {} B in {} send() calls ({} partial, {} errors)",
                sent.publications * ctx.subs as u64,
                sent.frame_bytes,
                sent.sends,
                sent.partial,
                sent.errors
            );
            vec![PubResult {
                ok: sent.publications,
                errors: sent.errors,
                first_error: sent.first_error,
            }]
        }
        None => thread::scope(|sc| {
            let hs: Vec<_> = pubs
                .iter_mut()
                .map(|p| {
                    sc.spawn(move || publish_loop(p, rate / n as f64, dur, step, window, payload))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        }),
    };
    let pub_secs = t0.elapsed().as_secs_f64();
    let published: u64 = results.iter().map(|r| r.ok).sum();
    let pub_errors: u64 = results.iter().map(|r| r.errors).sum();
    let first_error = results.iter().find_map(|r| r.first_error.clone());
    let expected = published * subs_live as u64;
    let delivered = || -> u64 {
        ctx.shared
            .iter()
            .map(|s| s.delivered[step].load(Ordering::Relaxed))
            .sum()
    };
    let drained = wait_until(ctx.drain, || delivered() >= expected);
    // A little extra so duplicates/late extras would be seen too.
    thread::sleep(Duration::from_millis(20));
    let wall = t0.elapsed().as_secs_f64();
    let cpu1 = node_cpu();
    let node_cpu = [cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]];
    let f1 = floor_cpu();
    let floor_secs = f1.0 - f0.0;
    let cpu = node_cpu[0] + node_cpu[1] + floor_secs;
    let sch = (node_sched().saturating_sub(sch0) + f1.1.saturating_sub(f0.1)) as f64 / 1e9;
    let io1 = io();
    let rcpu = redis_cpu() - rcpu0;
    let rsch = (redis_sched().saturating_sub(rsch0)) as f64 / 1e9;
    // The floor's sender thread is the "server": not part of the client.
    let client_cpu = self_cpu_secs() - self0 - floor_secs;
    let client_util = client_cpu / wall;
    let sys1 = machine_cpu();
    let foreign_util = ((sys1.task - sys0.task) - cpu - rcpu - client_cpu).max(0.0) / wall;
    let irq_cpu = sys1.irq - sys0.irq;
    let mut stats = StepStats::default();
    for s in ctx.shared {
        let st = s.steps[step].lock().unwrap();
        stats.delivered += st.delivered;
        stats.gaps += st.gaps;
        stats.reorder += st.reorder;
        for (i, h) in st.node_hist.iter().enumerate() {
            stats.hist.merge(h);
            stats.node_hist[i].merge(h);
        }
        stats.last_ns = stats.last_ns.max(st.last_ns);
    }
    let span = (stats.last_ns.saturating_sub(t0_ns) as f64 / 1e9).max(1e-9);
    let info1 = node_infos(&ctx.node_addrs);
    StepReport {
        name: name.to_string(),
        target_rate: rate,
        pub_rate: published as f64 / pub_secs,
        published,
        pub_errors,
        expected,
        deliveries_per_s: stats.delivered as f64 / span,
        stats,
        server_cpu: cpu,
        server_sched: sch,
        redis_mode: ctx.redis_pid.is_some(),
        node_subs: ctx.node_subs,
        node_cpu,
        redis_cpu: rcpu,
        redis_sched: rsch,
        client_util,
        foreign_util,
        irq_cpu,
        client_cores: ctx.client_cores,
        closed: (ctx.closed)() - closed0,
        drained,
        first_error,
        srv_deliveries: nodes_delta(&info0, &info1, "deliveries"),
        srv_writes: nodes_delta(&info0, &info1, "writes"),
        client_reads: io1.0 - io0.0,
        client_messages: io1.1 - io0.1,
        reader_pause_us: ctx
            .lives
            .first()
            .map_or(0, |l| l.pause_us.load(Ordering::Relaxed)),
    }
}

/// The run's settings, from the command line.
struct Opts {
    subs: usize,
    shards: usize,
    rate: f64,
    secs: f64,
    ramp_start: f64,
    ramp_factor: f64,
    step_secs: f64,
    max_steps: usize,
    http_conns: usize,
    window: usize,
    p99_limit: Duration,
    drain: Duration,
    payload: usize,
    readers: usize,
    n_src: usize,
    ncpu: usize,
    client_cpus: Vec<usize>,
    redis_mode: bool,
    /// `--redis-cost`: a standalone node and a Redis node, alternating phases.
    redis_cost: bool,
    rounds: usize,
    /// `--floor`: no server, the floor only; `--with-floor`: after the fixed-rate phase.
    floor_only: bool,
    with_floor: bool,
    reader_pause_us: u64,
    history: bool,
    /// Output line prefix: `fanout` or `fanout-redis`.
    tag: &'static str,
    /// Subscribers per node: A (published to) gets the odd one; B none when standalone.
    node_subs: [usize; 2],
    deadline: Duration,
}

impl Opts {
    fn parse(args: &Args) -> Opts {
        let hard = raise_nofile();
        let subs: usize = args.get("subs", 1000usize);
        if subs as u64 + 300 > hard {
            fatal(&format!(
                "--subs {subs} needs more file descriptors than RLIMIT_NOFILE hard limit {hard} - 300"
            ));
        }
        let rate: f64 = args.get("rate", 100.0);
        let secs: f64 = args.get("secs", 10.0);
        let ramp_start: f64 = args.get("ramp-start", rate * 2.0);
        let ramp_factor: f64 = args.get("ramp-factor", 1.5);
        let step_secs: f64 = args.get("step-secs", 2.0);
        let ncpu = online_cpus();
        let client_cpus = client_cpus(args, ncpu);
        if rate <= 0.0 || secs <= 0.0 || ramp_start <= 0.0 || ramp_factor <= 1.0 || step_secs <= 0.0
        {
            fatal("rates and durations must be > 0 and --ramp-factor > 1");
        }
        let redis_mode = args.has("redis");
        if redis_mode && subs < 2 {
            fatal("--redis needs --subs >= 2 (half on each node)");
        }
        if args.has("floor") && (redis_mode || args.has("with-floor")) {
            fatal("--floor runs without a server: not with --redis or --with-floor");
        }
        let redis_cost = args.has("redis-cost");
        if redis_cost && (redis_mode || args.has("floor") || args.has("with-floor")) {
            fatal("--redis-cost runs its own two nodes: not with --redis, --floor or --with-floor");
        }
        if redis_cost && 2 * subs as u64 + 300 > hard {
            fatal(&format!(
                "--redis-cost puts --subs {subs} on each of two nodes: more file descriptors than RLIMIT_NOFILE hard limit {hard} - 300"
            ));
        }
        let rounds = args.get("rounds", 3usize).clamp(1, (MAX_STEPS - 2) / 2);
        let floor_pairs = usize::from(args.has("floor") || args.has("with-floor")) * 2 * subs;
        if (subs + floor_pairs) as u64 + 300 > hard {
            fatal(&format!(
                "--subs {subs} with the floor's {floor_pairs} sockets needs more file descriptors than RLIMIT_NOFILE hard limit {hard} - 300"
            ));
        }
        Opts {
            subs,
            shards: args.get("shards", 1usize),
            rate,
            secs,
            ramp_start,
            ramp_factor,
            step_secs,
            max_steps: args.get("max-steps", 10usize).min(MAX_STEPS - 2),
            http_conns: args
                .get("http-conns", args.get("publishers", 2usize))
                .clamp(1, MAX_STREAMS - 2),
            window: args.get("pipeline", 4usize).max(1),
            p99_limit: Duration::from_secs_f64(args.get("p99-limit-ms", 50.0) / 1e3),
            drain: Duration::from_millis(args.get("drain-ms", 3000u64)),
            payload: args.get("payload", 64usize),
            readers: args.get("readers", 1usize).max(1),
            n_src: args.get("src-addrs", 2usize),
            ncpu,
            client_cpus,
            redis_mode,
            redis_cost,
            rounds,
            floor_only: args.has("floor"),
            with_floor: args.has("with-floor"),
            reader_pause_us: args.get("reader-pause-us", 0u64),
            history: args.get("history", 0u32) > 0,
            tag: if redis_mode { "fanout-redis" } else { "fanout" },
            node_subs: if redis_mode {
                [subs - subs / 2, subs / 2]
            } else if redis_cost {
                [subs, subs]
            } else {
                [subs, 0]
            },
            deadline: Duration::from_secs(args.get("deadline", default_deadline(args))),
        }
    }

    fn print_header(&self) {
        let Opts {
            subs,
            shards,
            rate,
            secs,
            ramp_start,
            ramp_factor,
            step_secs,
            max_steps,
            http_conns,
            window,
            p99_limit,
            payload,
            readers,
            redis_mode,
            node_subs,
            ..
        } = self;
        if *redis_mode {
            println!(
            "# fanout-redis: subs={subs} ({} on A, {} on B) nodes=2 x shards={shards}, publishing through A only, fixed={rate} msg/s x {secs} s, ramp from {ramp_start} msg/s x{ramp_factor} per {step_secs} s step (max {max_steps} steps, p99 limit {} ms), http_conns={http_conns} pipeline={window} payload~{payload} B readers={readers}",
            node_subs[0],
            node_subs[1],
            p99_limit.as_millis()
        );
        } else {
            println!(
            "# fanout: subs={subs} shards={shards} fixed={rate} msg/s x {secs} s, ramp from {ramp_start} msg/s x{ramp_factor} per {step_secs} s step (max {max_steps} steps, p99 limit {} ms), http_conns={http_conns} pipeline={window} payload~{payload} B readers={readers}",
            p99_limit.as_millis()
        );
        }
        println!(
            "# reference (design doc): kernel floor ~2.5-2.7 µs CPU per send() of one frame; \
         uWebSockets.js 2.65 CPU-s per 1M deliveries at 1000 subs x 100 msg/s"
        );
    }
}

fn main() {
    let Some(args) = Args::parse_or_help(USAGE) else {
        return;
    };
    let deadline = Duration::from_secs(args.get("deadline", default_deadline(&args)));
    install_safety_nets(deadline);
    let t_start = Instant::now();
    let o = Opts::parse(&args);
    if o.redis_cost {
        std::process::exit(redis_cost(&o, &args, t_start));
    }
    o.print_header();

    // Spawn the server(s) (and redis-server) before pinning ourselves (they
    // also reset their own affinity in pre_exec), then pin every bench thread
    // to the client CPUs.
    let (redis, servers) = if o.floor_only {
        (None, Vec::new())
    } else {
        start_nodes(&o, &args)
    };
    pin_bench_threads(&o.client_cpus, o.shards);
    let (rdrs, shared) = connect_subscribers(&o, &servers);
    let floor = (o.floor_only || o.with_floor).then(|| {
        // The floor's client ends follow the server's subscribers (ids subs..) in the readers.
        let first = if o.floor_only { 0 } else { o.subs };
        let (floor, conns) = Floor::start(o.subs, first, o.n_src, 0);
        hand_to_readers(&rdrs, vec![conns], first + o.subs);
        println!(
            "# floor: {} loopback TCP pairs (client ends from 127.0.0.2..127.0.0.{}, read by the same readers); sender thread tid {} pinned to CPU {} (where the server's shard 0 runs), one blocking send() per socket per publication",
            o.subs,
            o.n_src + 1,
            floor.tid,
            floor.cpu
        );
        floor
    });
    if o.floor_only {
        println!(
            "# pinning: {} CPUs; no server (--floor); bench threads [{}]",
            o.ncpu,
            own_thread_affinities()
        );
    } else {
        print_pinning(&o, &servers, redis.as_ref());
    }

    let mut pub0 = vec![Publisher {
        http: None,
        stream: 0,
        seq: 0,
    }];
    let mut ramp_pubs: Vec<Publisher> = (1..=o.http_conns)
        .map(|s| Publisher {
            http: None,
            stream: s,
            seq: 0,
        })
        .collect();
    let lives: Vec<Arc<ReaderLive>> = rdrs.iter().map(|r| r.live.clone()).collect();
    let live = lives.clone();
    let closed = move || -> usize { live.iter().map(|l| l.closed.load(Ordering::Relaxed)).sum() };
    let ctx = Ctx {
        publish_to: servers
            .first()
            .map_or(std::net::SocketAddr::from(([127, 0, 0, 1], 0)), |s| s.addr),
        node_pids: servers.iter().map(|s| s.pid).collect(),
        redis_pid: redis.as_ref().map(|r| r.pid),
        node_subs: o.node_subs,
        shared: &shared,
        closed: &closed,
        subs: o.subs,
        drain: o.drain,
        payload: o.payload,
        window: o.window,
        client_cores: o.client_cpus.len(),
        node_addrs: servers.iter().map(|s| s.addr).collect(),
        lives: lives.clone(),
        floor: None,
        history: o.history,
    };
    let floor_ctx = floor.as_ref().map(|f| Ctx {
        node_pids: Vec::new(),
        redis_pid: None,
        node_addrs: Vec::new(),
        lives: lives.clone(),
        floor: Some(f),
        ..ctx
    });

    let mut failed = false;
    let mut fixed = None;
    if !o.floor_only && !args.has("skip-fixed") {
        let r = run_step(
            &ctx,
            "fixed-rate",
            0,
            &mut pub0,
            o.rate,
            Duration::from_secs_f64(o.secs),
        );
        r.print(o.subs);
        if let Err(why) = r.sustained(u64::MAX) {
            println!("# fixed-rate phase not sustained: {why}");
        }
        failed |= r.broken();
        fixed = Some(r);
    }
    if let Some(fctx) = &floor_ctx {
        let r = run_step(
            fctx,
            "floor",
            FLOOR_STEP,
            &mut [],
            o.rate,
            Duration::from_secs_f64(o.secs),
        );
        r.print(o.subs);
        failed |= r.broken();
        if let Some(s) = &fixed {
            print_ratio(s, &r);
        }
    }
    if !o.floor_only && !args.has("skip-ramp") {
        for l in &lives {
            l.pause_us.store(o.reader_pause_us, Ordering::Relaxed);
        }
        failed |= ramp(&o, &ctx, &mut ramp_pubs, t_start);
    }

    let mut servers = servers;
    let mut redis = redis;
    let alive_nodes: Vec<bool> = servers.iter_mut().map(|s| s.alive()).collect();
    let redis_alive = redis.as_mut().map(|r| r.alive());
    let alive = alive_nodes.iter().all(|&a| a) && redis_alive != Some(false);
    let alive_text = match redis_alive {
        None => format!("server alive {alive}"),
        Some(r) => format!(
            "node A alive {}, node B alive {}, redis-server alive {r}",
            alive_nodes[0], alive_nodes[1]
        ),
    };
    let mut total_closed = 0;
    let mut pings = 0;
    let mut errors = vec![];
    for r in rdrs {
        let (st, h) = r.stop();
        total_closed += st.closed;
        pings += st.pings;
        if let Some(e) = st.first_error {
            errors.push(e);
        }
        if let Some(m) = h.first_malformed {
            errors.push(format!("unexpected line: {m}"));
        }
    }
    let malformed: u64 = shared
        .iter()
        .map(|s| s.malformed.load(Ordering::Relaxed))
        .sum();
    println!(
        "# end: subscribers closed by server {total_closed}, pings answered {pings}, unexpected lines {malformed}{}; {alive_text}; elapsed {:.1} s",
        errors
            .first()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        t_start.elapsed().as_secs_f64()
    );
    drop(pub0);
    drop(ramp_pubs);
    // Nodes first, then the Redis they use; each is killed and reaped by PID.
    drop(servers);
    drop(redis);
    if failed || !alive || total_closed > 0 {
        std::process::exit(1);
    }
}

/// Starts redis-server and nodes A and B in Redis mode, else one server; prints what runs.
fn start_nodes(o: &Opts, args: &Args) -> (Option<RedisServer>, Vec<Server>) {
    let (redis_mode, shards) = (o.redis_mode, o.shards);
    let redis = redis_mode.then(|| RedisServer::start("fanout"));
    let mut servers: Vec<Server> = Vec::new();
    match &redis {
        None => servers.push(Server::start(
            "fanout",
            shards,
            &bench_server_args(args, "fanout", ""),
            args.has("server-log"),
        )),
        Some(r) => {
            println!("# redis-server: {}", r.describe());
            let mut extra = bench_server_args(args, "fanout-redis", "");
            extra.extend(["--redis".to_string(), r.url()]);
            for name in ["a", "b"] {
                servers.push(Server::start(
                    &format!("fanout-redis-{name}"),
                    shards,
                    &extra,
                    args.has("server-log"),
                ));
            }
        }
    }
    for (i, server) in servers.iter().enumerate() {
        if redis_mode {
            let name = ["A", "B"][i];
            println!("# node {name}: {}", server.describe());
        } else {
            println!("# server: {}", server.describe());
        }
    }
    (redis, servers)
}

/// The server's and the floor's CPU per delivery, side by side.
fn print_ratio(server: &StepReport, floor: &StepReport) {
    let us = |r: &StepReport, cpu: f64| cpu / r.stats.delivered.max(1) as f64 * 1e6;
    let (s, f) = (us(server, server.server_cpu), us(floor, floor.server_cpu));
    let (ss, fs) = (
        us(server, server.server_sched),
        us(floor, floor.server_sched),
    );
    println!(
        "fanout server/floor: CPU per delivery server {s:.3} µs / floor {f:.3} µs = {:.3} (schedstat {ss:.3} / {fs:.3} µs = {:.3}); latency p99 server {} vs floor {}; same {} subs x {:.0} msg/s",
        s / f.max(1e-9),
        ss / fs.max(1e-9),
        fmt_ns(server.stats.hist.quantile(0.99)),
        fmt_ns(floor.stats.hist.quantile(0.99)),
        server.expected / server.published.max(1),
        server.target_rate
    );
}

/// Hands connection batches to the readers round-robin and waits until they hold `total`.
fn hand_to_readers<H: Handler>(rdrs: &[Reader<H>], batches: Vec<Vec<WsConn>>, total: usize) {
    let mut per: Vec<Vec<WsConn>> = (0..rdrs.len()).map(|_| Vec::new()).collect();
    for conns in batches {
        for (i, c) in conns.into_iter().enumerate() {
            per[i % rdrs.len()].push(c);
        }
    }
    for (r, batch) in rdrs.iter().zip(per) {
        r.add(batch);
    }
    let all_registered = wait_until(Duration::from_secs(5), || {
        rdrs.iter()
            .map(|r| r.live.conns.load(Ordering::Relaxed))
            .sum::<usize>()
            == total
    });
    if !all_registered {
        fatal("readers did not register all subscribers");
    }
}

/// Connects the subscribers (all on the server, or `node_subs[0]` on A and `node_subs[1]` on
/// B: connection indexes 0.. on A, then the rest on B) and hands them to the readers. No
/// server (the floor only): the readers start empty.
fn connect_subscribers(o: &Opts, servers: &[Server]) -> (Vec<Reader<Subs>>, Vec<Arc<Shared>>) {
    let (subs, shards, n_src, readers, node_subs, redis_mode) = (
        o.subs,
        o.shards,
        o.n_src,
        o.readers,
        o.node_subs,
        o.redis_mode,
    );
    // Subscribers: all on the server, or node_subs[0] on A and node_subs[1]
    // on B (connection indexes 0.. on A, then the rest on B).
    let t0 = Instant::now();
    let mut node_conns = Vec::new();
    let mut first = 0;
    for (server, &count) in servers.iter().zip(&node_subs) {
        match connect_many(
            server.addr,
            first,
            count,
            4,
            n_src,
            Arc::new(|_| "bench:0".to_string()),
        ) {
            Ok(c) => node_conns.push(c),
            Err(e) => fatal(&format!("connecting subscribers to {}: {e}", server.addr)),
        }
        first += count;
    }
    if servers.is_empty() || o.redis_cost {
    } else if redis_mode {
        println!(
            "# {subs} subscribers connected+subscribed to bench:0 in {:.2} s: {} on node A {}, {} on node B {} (spread by SO_REUSEPORT over {shards} shard(s) each)",
            t0.elapsed().as_secs_f64(),
            node_subs[0],
            servers[0].addr,
            node_subs[1],
            servers[1].addr
        );
    } else {
        println!(
            "# {subs} subscribers connected+subscribed to bench:0 in {:.2} s (spread by SO_REUSEPORT over {shards} shard(s); per-shard placement is not visible to the client)",
            t0.elapsed().as_secs_f64()
        );
    }
    let shared: Vec<Arc<Shared>> = (0..readers).map(|_| Arc::new(Shared::new())).collect();
    let rdrs: Vec<Reader<Subs>> = shared
        .iter()
        .enumerate()
        .map(|(i, sh)| {
            Reader::spawn(
                &format!("reader{i}"),
                Subs {
                    next: Vec::new(),
                    a_subs: node_subs[0],
                    shared: sh.clone(),
                    pending: [0; MAX_STEPS],
                    first_malformed: None,
                },
            )
        })
        .collect();
    // Round-robin over the readers within each node; a connection's index tells its node.
    let total = node_conns.iter().map(Vec::len).sum();
    hand_to_readers(&rdrs, node_conns, total);
    (rdrs, shared)
}

/// The pinning report: every thread of the server(s), redis-server and the bench.
fn print_pinning(o: &Opts, servers: &[Server], redis: Option<&RedisServer>) {
    let (ncpu, shards, client_cpus) = (o.ncpu, o.shards, &o.client_cpus);
    let bench_threads = own_thread_affinities();
    match &redis {
        None => println!(
            "# pinning: {ncpu} CPUs; server --shards {shards} threads [{}]; bench threads pinned to CPU {client_cpus:?} via sched_setaffinity [{}]",
            threads_of(servers[0].pid),
            bench_threads
        ),
        Some(r) => {
            println!(
                "# pinning: {ncpu} CPUs; node A --shards {shards} threads [{}]; node B --shards {shards} threads [{}]; redis-server threads [{}]; bench threads pinned to CPU {client_cpus:?} via sched_setaffinity [{}]",
                threads_of(servers[0].pid),
                threads_of(servers[1].pid),
                threads_of(r.pid),
                bench_threads
            );
            println!(
                "# note: {ncpu} CPUs for two nodes (each: shard executor(s) pinned from core 0, Redis multiplexer thread on the next core when one is spare), redis-server and the bench; they share cores, so absolute figures are pessimistic and the comparison with the standalone run (`fanout` lines) is the point"
            );
            println!(
                "# note: in Redis mode every publication goes node A -> Redis -> both nodes, so A's own subscribers also pay the Redis round trip; B's extra latency over A is the cross-node part"
            );
        }
    }
}

/// The ramp: steps of rising rate until one loses, reorders, disconnects, errs or saturates
/// (a latency-only miss goes on), then the max-sustained and peak-delivered lines. Returns
/// whether a step was broken.
fn ramp(o: &Opts, ctx: &Ctx, ramp_pubs: &mut [Publisher], t_start: Instant) -> bool {
    let (subs, redis_mode, tag, deadline) = (o.subs, o.redis_mode, o.tag, o.deadline);
    let (ramp_start, ramp_factor, step_secs, max_steps, p99_limit, drain) = (
        o.ramp_start,
        o.ramp_factor,
        o.step_secs,
        o.max_steps,
        o.p99_limit,
        o.drain,
    );
    let mut failed = false;
    let mut best: Option<StepReport> = None;
    let mut peak: Option<StepReport> = None;
    let mut r_rate = ramp_start;
    let mut stop_reason = format!("{max_steps} steps done");
    for step in 1..=max_steps {
        let need = Duration::from_secs_f64(step_secs) + drain + Duration::from_secs(5);
        if t_start.elapsed() + need > deadline {
            stop_reason = "time budget (deadline) reached".into();
            break;
        }
        let name = format!("ramp-step{step}");
        let r = run_step(
            ctx,
            &name,
            step,
            ramp_pubs,
            r_rate,
            Duration::from_secs_f64(step_secs),
        );
        r.print(subs);
        failed |= r.broken();
        let clean = !r.broken() && r.pub_errors == 0;
        let verdict = r.sustained(p99_limit.as_nanos() as u64);
        let better = |b: &Option<StepReport>| {
            b.as_ref()
                .is_none_or(|b| r.deliveries_per_s > b.deliveries_per_s)
        };
        if clean && better(&peak) {
            peak = Some(r.clone_summary());
        }
        // Keep ramping past a latency-only miss (latency on a shared 2-core
        // box is noisy); stop on loss/disconnects/errors or saturation.
        let saturated = r.pub_rate < 0.95 * r.target_rate;
        match verdict {
            Ok(()) => best = Some(r),
            Err(why) => {
                if !clean || saturated {
                    stop_reason = format!("stopped at step {step} ({r_rate:.0} msg/s): {why}");
                    break;
                }
                println!("# {}: not sustained ({why}); continuing the ramp", r.name);
            }
        }
        r_rate *= ramp_factor;
    }
    match best {
        Some(b) if redis_mode => {
            let del = b.stats.delivered.max(1) as f64;
            let node = |i: usize| {
                let h = &b.stats.node_hist[i];
                format!(
                    "p50 {} p99 {}",
                    fmt_ns(h.quantile(0.5)),
                    fmt_ns(h.quantile(0.99))
                )
            };
            println!(
                "fanout-redis max-sustained: {:.0} msg/s x {subs} subs ({} on A, {} on B) = {:.0} deliveries/s, nodes CPU {:.3} µs/delivery, redis CPU {:.3} µs/delivery, nodes+redis {:.3} µs/delivery, latency p50 {} p99 {} max {} (A: {}; B: {}) [{}: {stop_reason}]",
                b.pub_rate,
                b.node_subs[0],
                b.node_subs[1],
                b.deliveries_per_s,
                b.server_cpu / del * 1e6,
                b.redis_cpu / del * 1e6,
                (b.server_cpu + b.redis_cpu) / del * 1e6,
                fmt_ns(b.stats.hist.quantile(0.5)),
                fmt_ns(b.stats.hist.quantile(0.99)),
                fmt_ns(b.stats.hist.max),
                node(0),
                node(1),
                b.name
            );
        }
        Some(b) => println!(
            "fanout max-sustained: {:.0} msg/s x {subs} subs = {:.0} deliveries/s, server {:.3} µs/delivery ({:.3} CPU-s per 1M), latency p50 {} p99 {} max {} [{}: {stop_reason}]",
            b.pub_rate,
            b.deliveries_per_s,
            b.server_cpu / b.stats.delivered.max(1) as f64 * 1e6,
            b.server_cpu / b.stats.delivered.max(1) as f64 * 1e6,
            fmt_ns(b.stats.hist.quantile(0.5)),
            fmt_ns(b.stats.hist.quantile(0.99)),
            fmt_ns(b.stats.hist.max),
            b.name
        ),
        None => println!("{tag} max-sustained: none of the ramp steps was sustained [{stop_reason}]"),
    }
    if let Some(b) = &peak {
        println!(
            "{tag} max-rate: {} publisher(s) x pipeline {}: {:.0} deliveries/s, server {:.3} µs/delivery, {} frames/write (server counters), client {:.2} messages/read, client CPU {:.0}%{} [{}]",
            o.http_conns,
            o.window,
            b.deliveries_per_s,
            b.server_cpu / b.stats.delivered.max(1) as f64 * 1e6,
            b.frames_per_write(),
            b.messages_per_read(),
            b.client_util * 100.0,
            if b.client_saturated() {
                " (CLIENT SATURATED: the server may go faster)"
            } else {
                ""
            },
            b.name
        );
    }
    if let Some(p) = peak {
        println!(
            "{tag} peak-delivered: {:.0} msg/s x {subs} subs = {:.0} deliveries/s with no loss/reorder/disconnect (p99 {}, publisher offered {:.0} of {:.0} msg/s; {})",
            p.pub_rate,
            p.deliveries_per_s,
            fmt_ns(p.stats.hist.quantile(0.99)),
            p.pub_rate,
            p.target_rate,
            p.name
        );
    }
    failed
}

/// The default `--deadline`: 120 s, or under `--redis-cost` enough for its rounds (each phase
/// `--secs` plus at most `--drain-ms`, plus start-up and connects).
fn default_deadline(args: &Args) -> u64 {
    if !args.has("redis-cost") {
        return 120;
    }
    let rounds: f64 = args.get("rounds", 3usize) as f64;
    let phase = args.get("secs", 10.0f64) + args.get("drain-ms", 3000u64) as f64 / 1e3 + 2.0;
    (60.0 + rounds * 2.0 * phase) as u64
}

/// One `--redis-cost` phase: the step's report, the publishing node's context switches, and
/// which node it was.
struct CostPhase {
    redis: bool,
    round: usize,
    report: StepReport,
    switches: u64,
    /// The publishing node's on-CPU ns over the phase: shards, broker thread, other threads.
    roles: [u64; 3],
}

impl CostPhase {
    fn mode(&self) -> &'static str {
        if self.redis {
            "redis"
        } else {
            "standalone"
        }
    }

    fn print(&self) {
        let r = &self.report;
        let del = r.stats.delivered.max(1) as f64;
        let per_m = |cpu: f64| cpu / del * 1e6;
        let h = &r.stats.hist;
        let redis = if self.redis {
            format!(
                "; redis-server CPU {:.3} s = {:.3} CPU-s per 1M deliveries ({:.1} µs/publication; schedstat {:.3})",
                r.redis_cpu,
                per_m(r.redis_cpu),
                r.redis_cpu / r.published.max(1) as f64 * 1e6,
                per_m(r.redis_sched)
            )
        } else {
            String::new()
        };
        println!(
            "fanout-redis-cost round{} {}: {} subs x {:.0} msg/s target: published {} ({:.1} msg/s, {} errors), deliveries {}/{}, lost {} (gaps {}), reorder {}, disconnects {}; \
             node CPU {:.3} s = {:.3} CPU-s per 1M deliveries (schedstat {:.3}: shard {:.3}, broker thread {:.3}, other {:.3}); {:.1} context switches/publication; {} frames/write{redis}; \
             latency p50 {} p99 {} max {}; client CPU {:.0}%, other processes {:.0}% of a core",
            self.round,
            self.mode(),
            r.expected / r.published.max(1),
            r.target_rate,
            r.published,
            r.pub_rate,
            r.pub_errors,
            r.stats.delivered,
            r.expected,
            r.missing(),
            r.stats.gaps,
            r.stats.reorder,
            r.closed,
            r.server_cpu,
            per_m(r.server_cpu),
            per_m(r.server_sched),
            per_m(self.roles[0] as f64 / 1e9),
            per_m(self.roles[1] as f64 / 1e9),
            per_m(self.roles[2] as f64 / 1e9),
            self.switches as f64 / r.published.max(1) as f64,
            r.frames_per_write(),
            fmt_ns(h.quantile(0.50)),
            fmt_ns(h.quantile(0.99)),
            fmt_ns(h.max),
            r.client_util * 100.0,
            r.foreign_util * 100.0
        );
        if r.foreign_util > 0.1 {
            println!(
                "# round{} {}: WARNING: other processes used {:.0}% of a CPU during this phase (machine busy); numbers are perturbed",
                self.round,
                self.mode(),
                r.foreign_util * 100.0
            );
        }
        if let Some(e) = &r.first_error {
            println!(
                "# round{} {}: first publish error: {e}",
                self.round,
                self.mode()
            );
        }
    }
}

/// `--redis-cost`: a standalone node S and a Redis node R side by side, their subscribers
/// connected once, then alternating phases through S and through R (ABBA); returns the exit
/// code (1 on loss, reorder, disconnects or a dead process).
fn redis_cost(o: &Opts, args: &Args, t_start: Instant) -> i32 {
    let redis_cpu: usize = args.get("redis-cpu", o.ncpu - 1);
    println!(
        "# fanout-redis-cost: subs={} on each of 2 nodes (S standalone, R --redis), shards={} each, {} round(s) of {} msg/s x {} s through S and through R (order S,R then R,S), payload~{} B readers={}",
        o.subs, o.shards, o.rounds, o.rate, o.secs, o.payload, o.readers
    );
    let mut redis = RedisServer::start("fanout-cost");
    if let Err(e) = pin_process(redis.pid, &[redis_cpu]) {
        fatal(&format!(
            "pinning redis-server to CPU {redis_cpu}: {e} (see --redis-cpu)"
        ));
    }
    println!("# redis-server: {}", redis.describe());
    let standalone = Server::start(
        "fanout-cost-standalone",
        o.shards,
        &bench_server_args(args, "fanout-cost-standalone", ""),
        args.has("server-log"),
    );
    let mut extra = bench_server_args(args, "fanout-cost-redis", "");
    extra.extend(["--redis".to_string(), redis.url()]);
    let via_redis = Server::start(
        "fanout-cost-redis",
        o.shards,
        &extra,
        args.has("server-log"),
    );
    println!("# node S (standalone): {}", standalone.describe());
    println!("# node R (redis): {}", via_redis.describe());
    let mut servers = vec![standalone, via_redis];
    pin_bench_threads(&o.client_cpus, o.shards);
    let (rdrs, shared) = connect_subscribers(o, &servers);
    println!(
        "# {} subscribers on bench:0 connected to each node ({} on S {}, {} on R {})",
        o.subs, o.subs, servers[0].addr, o.subs, servers[1].addr
    );
    println!(
        "# pinning: {} CPUs; node S threads [{}]; node R threads [{}]; redis-server threads [{}]; bench threads pinned to CPU {:?} [{}]",
        o.ncpu,
        threads_of(servers[0].pid),
        threads_of(servers[1].pid),
        threads_of(redis.pid),
        o.client_cpus,
        own_thread_affinities()
    );
    println!(
        "# note: redis-server is pinned to CPU {redis_cpu}, beside the node's shard on core 0 (with the bench and R's multiplexer when that is the last CPU): the shard has its core to itself in both modes, and redis-server's CPU is reported apart from the node's"
    );
    let lives: Vec<Arc<ReaderLive>> = rdrs.iter().map(|r| r.live.clone()).collect();
    let live = lives.clone();
    let closed = move || -> usize { live.iter().map(|l| l.closed.load(Ordering::Relaxed)).sum() };
    let ctx_of = |i: usize| Ctx {
        publish_to: servers[i].addr,
        node_pids: vec![servers[i].pid],
        redis_pid: (i == 1).then_some(redis.pid),
        node_subs: [o.subs, 0],
        shared: &shared,
        closed: &closed,
        subs: o.subs,
        drain: o.drain,
        payload: o.payload,
        window: o.window,
        client_cores: o.client_cpus.len(),
        node_addrs: vec![servers[i].addr],
        lives: lives.clone(),
        floor: None,
        history: o.history,
    };
    let ctxs = [ctx_of(0), ctx_of(1)];
    // Stream 0 publishes through S, stream 1 through R: each connection sees one gap-free
    // sequence.
    let mut pubs: Vec<Publisher> = (0..2)
        .map(|stream| Publisher {
            http: None,
            stream,
            seq: 0,
        })
        .collect();
    let mut phases: Vec<CostPhase> = Vec::new();
    let mut failed = false;
    let phase_need = Duration::from_secs_f64(o.secs) + o.drain + Duration::from_secs(2);
    'rounds: for round in 0..o.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for (k, &node) in order.iter().enumerate() {
            if t_start.elapsed() + phase_need > o.deadline {
                println!("# time budget (--deadline) reached: stopping before round {round}");
                break 'rounds;
            }
            let step = 1 + 2 * round + k;
            let mode = ["standalone", "redis"][node];
            let pid = servers[node].pid;
            let cs0 = ctx_switches(pid);
            let roles0 = sched_ns_by_role(pid);
            let report = run_step(
                &ctxs[node],
                &format!("round{round}-{mode}"),
                step,
                std::slice::from_mut(&mut pubs[node]),
                o.rate,
                Duration::from_secs_f64(o.secs),
            );
            let phase = CostPhase {
                redis: node == 1,
                round,
                switches: ctx_switches(pid).saturating_sub(cs0),
                roles: {
                    let r1 = sched_ns_by_role(pid);
                    [0, 1, 2].map(|i| r1[i].saturating_sub(roles0[i]))
                },
                report,
            };
            phase.print();
            failed |= phase.report.broken();
            phases.push(phase);
        }
    }
    print_cost_summary(&phases);
    let alive = servers.iter_mut().all(|s| s.alive()) && redis.alive();
    let mut total_closed = 0;
    for r in rdrs {
        let (st, _) = r.stop();
        total_closed += st.closed;
    }
    println!(
        "# end: subscribers closed by a server {total_closed}; nodes and redis-server alive {alive}; elapsed {:.1} s",
        t_start.elapsed().as_secs_f64()
    );
    drop(pubs);
    drop(servers);
    drop(redis);
    i32::from(failed || !alive || total_closed > 0)
}

/// The sums per mode over every round, and the ratio redis/standalone of node CPU per delivery
/// (overall and per round).
fn print_cost_summary(phases: &[CostPhase]) {
    let sum = |redis: bool| {
        phases.iter().filter(|p| p.redis == redis).fold(
            (0.0, 0.0, 0.0, 0u64, 0u64, 0u64, [0u64; 3]),
            |a, p| {
                let r = &p.report;
                (
                    a.0 + r.server_cpu,
                    a.1 + r.server_sched,
                    a.2 + r.redis_cpu,
                    a.3 + r.stats.delivered,
                    a.4 + p.switches,
                    a.5 + r.published,
                    [0, 1, 2].map(|i| a.6[i] + p.roles[i]),
                )
            },
        )
    };
    let (s, r) = (sum(false), sum(true));
    if s.3 == 0 || r.3 == 0 {
        println!("fanout-redis-cost: no complete pair of phases");
        return;
    }
    let per_m = |cpu: f64, del: u64| cpu / del as f64 * 1e6;
    let per_pub = |n: u64, p: u64| n as f64 / p.max(1) as f64;
    let ratio = per_m(r.0, r.3) / per_m(s.0, s.3).max(1e-12);
    let ratio_sched = per_m(r.1, r.3) / per_m(s.1, s.3).max(1e-12);
    let rounds: Vec<String> = phases
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| {
            let (sp, rp) = if c[0].redis {
                (&c[1], &c[0])
            } else {
                (&c[0], &c[1])
            };
            let cost =
                |p: &CostPhase| per_m(p.report.server_sched, p.report.stats.delivered.max(1));
            format!("{:.3}", cost(rp) / cost(sp).max(1e-12))
        })
        .collect();
    println!(
        "fanout-redis-cost summary: node CPU per 1M deliveries standalone {:.3} CPU-s (schedstat {:.3}), redis {:.3} CPU-s (schedstat {:.3}); ratio redis/standalone {:.3} (schedstat {:.3}; per round, schedstat: {}); context switches/publication standalone {:.1}, redis {:.1}; µs/publication standalone shard {:.1} broker {:.1}, redis shard {:.1} broker {:.1}; redis-server {:.3} CPU-s per 1M deliveries on top (not in the node's figure); {}",
        per_m(s.0, s.3),
        per_m(s.1, s.3),
        per_m(r.0, r.3),
        per_m(r.1, r.3),
        ratio,
        ratio_sched,
        rounds.join(" "),
        per_pub(s.4, s.5),
        per_pub(r.4, r.5),
        s.6[0] as f64 / 1e3 / s.5.max(1) as f64,
        s.6[1] as f64 / 1e3 / s.5.max(1) as f64,
        r.6[0] as f64 / 1e3 / r.5.max(1) as f64,
        r.6[1] as f64 / 1e3 / r.5.max(1) as f64,
        per_m(r.2, r.3),
        if ratio <= 1.05 && ratio_sched <= 1.05 {
            "within 5%"
        } else {
            "NOT within 5%"
        }
    );
    // On a shared box the per-round ratios spread far more than 5%: say so next to the verdict.
    let busy = phases
        .iter()
        .filter(|p| p.report.foreign_util > 0.1)
        .count();
    if busy > 0 {
        println!(
            "# fanout-redis-cost: {busy} of {} phases ran while other processes used over 10% of a CPU; the per-round ratios above show the spread, and a verdict needs a quiet machine",
            phases.len()
        );
    }
}
