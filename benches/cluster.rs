//! Highly available Redis: how long the nodes take to follow a failover, and what a 3-master
//! Redis Cluster carries across nodes against one Redis.
//!
//! `--failover sentinel` (lines `sentinel failover ...`): per trial a fresh set of 1 master,
//! 1 replica and 3 sentinels (down after 1 s, failover timeout 3 s) and two nodes A and B on the
//! sentinels. A publisher on A's HTTP API publishes to channel X every `--every-ms` (10) with
//! sequence numbers; a subscriber on B receives. After `--warmup-ms` the master is killed
//! (SIGKILL). Measured from the kill: when Redis promoted the replica (its `ROLE`, polled every
//! 50 ms: Redis's own share), the first publication (sent after the kill) acknowledged
//! again, the first delivery on B of a publication sent after the kill, the publications
//! answered with an error meanwhile, and the acknowledged publications that never reached B
//! (expected 0: a publication is acknowledged by the master that also fans it out; one
//! acknowledged by a master that dies before it reached its subscribers would be lost, since
//! Redis pub/sub and replication are fire-and-forget).
//!
//! `--failover cluster` (lines `cluster failover ...`): the same on a 3-master cluster with one
//! replica each (node timeout 1 s), nodes on `--redis-cluster`; the killed master owns X's slot,
//! and channel Y, on another master, is published to throughout: its errors (expected 0) and its
//! longest gap between deliveries on B.
//!
//! `--fanout` (lines `fanout-ha ...`): cross-node fan-out through one Redis and through a
//! 3-master cluster, set up side by side and measured alternately, step by step: two nodes per
//! set-up, `--subs` subscribers spread over both nodes on `--channels` channels whose slots
//! cover every master, publishers on both nodes. A fixed rate gives node CPU per delivery; then
//! a ramp finds the publications/s each carries: every publication acknowledged, every
//! delivery made (none lost) and p99 publish→deliver latency under `--p99-limit-ms`.
//!
//! The cluster parts need a shardcast with `--redis-cluster`; `--fanout` measures one Redis only
//! (and says so) when the binary has none.
//!
//! Run: `cargo bench --bench cluster -- --failover sentinel`, `... --failover cluster`,
//! `... --fanout`; `--help` for every option.

#[macro_use]
#[path = "common/modules.rs"]
mod modules;
common_modules!(
    "common";
    args, clock, connect, cpu, hist, http, machine, net, reader, redis, redis_ha, safety,
    server, ws
);

use common::args::Args;
use common::clock::wait_until;
use common::connect::{connect_many, ws_upgrade};
use common::cpu::{cpu_secs, online_cpus, sched_ns, self_cpu_secs};
use common::hist::{fmt_ns, Hist};
use common::http::HttpClient;
use common::machine::machine_cpu;
use common::net::raise_nofile;
use common::reader::{unix_ns, Handler, Reader};
use common::redis::RedisServer;
use common::redis_ha::{
    is_master, redis_cli, remove_files, slot_of_channel, RedisCluster, SentinelSet, SENTINEL_MASTER,
};
use common::safety::{fatal, install_safety_nets};
use common::server::{bench_server_args, server_bin, Server};
use common::ws::{encode_client_frame, json_lines, WsDecoder, WsEvent};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const USAGE: &str = "\
cargo bench --bench cluster -- (--failover sentinel|cluster | --fanout) [options]

  --failover sentinel|cluster  time to follow a failover (fresh set-up per trial)
    --trials N          trials (default 3)
    --every-ms N        one publication per N ms on each channel (default 10)
    --warmup-ms N       publishing before the kill (default 2000)
    --max-secs N        give up on a trial N s after the kill (default 30)
  --fanout              cross-node fan-out, one Redis vs a 3-master cluster, alternating
    --subs N            subscribers, half on each node (default 1000; held under RLIMIT_NOFILE)
    --channels N        channels, covering every master's slots (default 12)
    --publishers N      HTTP publisher connections, spread over both nodes (default 4)
    --rate N            fixed rate for CPU per delivery, publications/s (default 200)
    --secs N            fixed-rate window, s (default 5)
    --ramp-start N      first ramp step, publications/s (default 250)
    --ramp-factor F     rate factor per step (default 1.5)
    --step-secs N       seconds per ramp step (default 3)
    --max-steps N       ramp steps at most (default 8)
    --p99-limit-ms N    latency bound of a carried step (default 50)
  --full-coverage yes|no the cluster's cluster-require-full-coverage (default: Redis's, yes)
  --history N           channels with a history of N publications and recovery (default 0)
  --shards N            shards per node (default 1)
  --deadline N          overall limit, s (default 900)
  --server-args \"...\"   more shardcast arguments";

fn main() {
    let Some(args) = Args::parse_or_help(USAGE) else {
        return;
    };
    install_safety_nets(Duration::from_secs(args.get("deadline", 900u64)));
    let hard = raise_nofile();
    print_machine(hard);
    match (args.str("failover").as_deref(), args.has("fanout")) {
        (Some("sentinel"), false) => failover(&args, Kind::Sentinel),
        (Some("cluster"), false) => {
            if !has_cluster_flag() {
                fatal("this shardcast has no --redis-cluster (needs branch i18-cluster)");
            }
            failover(&args, Kind::Cluster)
        }
        (None, true) => fanout(&args, hard),
        _ => {
            eprintln!("{USAGE}");
            fatal("choose one of --failover sentinel, --failover cluster, --fanout");
        }
    }
    remove_files();
}

/// Machine facts for the reader of the figures: CPUs, kernel, Redis version, load, limits.
fn print_machine(hard: u64) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let redis = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("redis-server --version failed: {e}"));
    println!(
        "# machine: {} CPUs online, kernel {}, load average {}, RLIMIT_NOFILE hard {hard}; {redis}",
        online_cpus(),
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "# caveat: nodes, Redis processes and the bench's clients share this machine's CPUs; \
         figures are for comparison within one run, not capacity planning"
    );
}

/// Whether the server binary knows `--redis-cluster`.
fn has_cluster_flag() -> bool {
    std::process::Command::new(server_bin())
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--redis-cluster"))
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------
// Failover
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Sentinel,
    Cluster,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Sentinel => "sentinel",
            Kind::Cluster => "cluster",
        }
    }
}

/// One publication of a probe: its sequence number, and when it was answered and how.
struct Sent {
    seq: u64,
    answered: Instant,
    ok: bool,
}

/// Publishes `{"s":seq}` to `channel` through `addr` every `every` until `stop`, one request
/// in flight (no burst to catch up after a slow answer); records every outcome in `log`.
fn probe_publisher(
    addr: SocketAddr,
    channel: String,
    every: Duration,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Sent>>>,
    first_error: Arc<Mutex<Option<String>>>,
    current: Arc<AtomicU64>,
) {
    let mut http: Option<HttpClient> = None;
    let mut next = Instant::now();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        }
        next = (next + every).max(Instant::now());
        seq += 1;
        // Stored before sending: a kill sees the publication in flight as sent before it.
        current.store(seq, Ordering::SeqCst);
        let body = format!("{{\"channel\":\"{channel}\",\"data\":{{\"s\":{seq}}}}}");
        let outcome: Result<(), String> = (|| {
            if http.is_none() {
                http = Some(HttpClient::connect(addr).map_err(|e| format!("connect: {e}"))?);
            }
            let h = http.as_mut().expect("connected");
            h.send("POST", "/api/publish", body.as_bytes())
                .map_err(|e| format!("send: {e}"))?;
            let (code, reply) = h.recv().map_err(|e| format!("recv: {e}"))?;
            if published(code, &reply) {
                Ok(())
            } else {
                Err(format!("HTTP {code}: {}", String::from_utf8_lossy(&reply)))
            }
        })();
        let ok = outcome.is_ok();
        if let Err(e) = outcome {
            if e.starts_with("connect") || e.starts_with("send") || e.starts_with("recv") {
                http = None;
            }
            first_error.lock().unwrap().get_or_insert(e);
        }
        log.lock().unwrap().push(Sent {
            seq,
            answered: Instant::now(),
            ok,
        });
    }
}

/// Whether a `/api/publish` answer acknowledges the publication: HTTP 200 with a `result`
/// (empty, or with offset and epoch on a history channel) and no `error`.
fn published(code: u16, body: &[u8]) -> bool {
    code == 200
        && serde_json::from_slice::<serde_json::Value>(body)
            .is_ok_and(|v| v.get("result").is_some() && v.get("error").is_none())
}

/// One delivery on the subscriber: the channel's index, its sequence number, when.
type Arrival = (usize, u64, Instant);

/// What the probe subscriber saw besides deliveries.
#[derive(Default)]
struct ProbeStats {
    /// The connection ended and was opened again.
    reconnects: AtomicU64,
    /// Unsubscribe pushes with a code from 2500 (the node lost publications beyond repair):
    /// the probe subscribed again with recovery, as the SDKs do.
    resubscribes: AtomicU64,
    /// Recovering subscribes answered `recovered: false`.
    not_recovered: AtomicU64,
}

/// One WebSocket on `addr` subscribed to `channels`: records every publication's `s` until
/// `stop`, answers the server's pings, subscribes again with recovery (from the last offset
/// and epoch seen) when the node says the subscription lost publications (unsubscribe push,
/// code 2500 and up, as the SDKs do), and reconnects (counting it) if the connection ends.
fn probe_subscriber(
    addr: SocketAddr,
    channels: Vec<String>,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Arrival>>>,
    subscribed: Arc<AtomicBool>,
    stats: Arc<ProbeStats>,
) {
    // Per channel: the last (offset, epoch) seen, for a recovering subscribe.
    let mut position: Vec<(u64, String)> = vec![(0, String::new()); channels.len()];
    while !stop.load(Ordering::Relaxed) {
        let (mut s, rest) = match ws_upgrade(addr, None, Duration::from_secs(5)) {
            Ok(x) => x,
            Err(_) => {
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let subscribe = |i: usize, id: u64, position: &[(u64, String)]| {
            let (offset, epoch) = &position[i];
            if epoch.is_empty() {
                format!(
                    "{{\"id\":{id},\"subscribe\":{{\"channel\":\"{}\"}}}}",
                    channels[i]
                )
            } else {
                format!(
                    "{{\"id\":{id},\"subscribe\":{{\"channel\":\"{}\",\"recover\":true,\"offset\":{offset},\"epoch\":\"{epoch}\"}}}}",
                    channels[i]
                )
            }
        };
        // Subscribe ids: channel i is id 2 + i, every time.
        let mut cmds = String::from("{\"id\":1,\"connect\":{}}");
        for i in 0..channels.len() {
            cmds.push('\n');
            cmds.push_str(&subscribe(i, 2 + i as u64, &position));
        }
        let mut out = Vec::new();
        encode_client_frame(&mut out, 1, cmds.as_bytes());
        if s.write_all(&out).is_err() {
            continue;
        }
        let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
        let mut dec = WsDecoder::default();
        let mut data = rest;
        let mut buf = vec![0u8; 64 * 1024];
        let mut replies = 0;
        let mut closed = false;
        while !stop.load(Ordering::Relaxed) && !closed {
            let mut pongs = 0;
            let now = Instant::now();
            let mut got = Vec::new();
            let mut again = Vec::new();
            let fed = dec.feed(&data, &mut |ev| match ev {
                WsEvent::Text(msg) => {
                    for line in json_lines(msg) {
                        if line == b"{}" {
                            pongs += 1;
                            continue;
                        }
                        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
                            continue;
                        };
                        if let Some(p) = v.get("push") {
                            let ch = p["channel"].as_str().unwrap_or_default();
                            let Some(i) = channels.iter().position(|c| c == ch) else {
                                continue;
                            };
                            if let Some(seq) = p["pub"]["data"]["s"].as_u64() {
                                got.push((i, seq, now));
                                if let Some(o) = p["pub"]["offset"].as_u64() {
                                    position[i].0 = o;
                                }
                            } else if p["unsubscribe"]["code"].as_u64().unwrap_or(0) >= 2500 {
                                again.push(i);
                            }
                        } else if let Some(id) = v["id"].as_u64() {
                            if v.get("error").is_none() {
                                replies += 1;
                            }
                            let sub = &v["subscribe"];
                            let i = (id as usize).wrapping_sub(2);
                            if i >= channels.len() || !sub.is_object() {
                                continue;
                            }
                            if let Some(e) = sub["epoch"].as_str() {
                                position[i].1 = e.to_string();
                            }
                            if let Some(o) = sub["offset"].as_u64() {
                                position[i].0 = o;
                            }
                            // `recovered` is left out when false.
                            if sub["was_recovering"] == serde_json::Value::Bool(true)
                                && sub["recovered"] != serde_json::Value::Bool(true)
                            {
                                stats.not_recovered.fetch_add(1, Ordering::Relaxed);
                            }
                            for p in sub["publications"].as_array().into_iter().flatten() {
                                if let Some(seq) = p["data"]["s"].as_u64() {
                                    got.push((i, seq, now));
                                }
                            }
                        }
                    }
                }
                WsEvent::Close(_) => closed = true,
                _ => {}
            });
            if fed.is_err() {
                break;
            }
            // The connect reply and one subscribe reply per channel.
            if replies > channels.len() {
                subscribed.store(true, Ordering::Relaxed);
            }
            log.lock().unwrap().extend(got);
            let mut out = Vec::new();
            for _ in 0..pongs {
                encode_client_frame(&mut out, 1, b"{}");
            }
            for i in again {
                stats.resubscribes.fetch_add(1, Ordering::Relaxed);
                let cmd = subscribe(i, 2 + i as u64, &position);
                encode_client_frame(&mut out, 1, cmd.as_bytes());
            }
            if !out.is_empty() && s.write_all(&out).is_err() {
                closed = true;
            }
            data.clear();
            match s.read(&mut buf) {
                Ok(0) => closed = true,
                Ok(n) => data.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => closed = true,
            }
        }
        if closed && !stop.load(Ordering::Relaxed) {
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What one failover trial measured (durations from the kill).
struct Trial {
    promoted: Option<Duration>,
    ack: Option<Duration>,
    deliver: Option<Duration>,
    errors: usize,
    lost: Vec<u64>,
    other_errors: Option<usize>,
    other_gap: Option<Duration>,
}

/// The Redis set-up of one trial (kept alive until the trial ends).
enum Ha {
    Sentinel(Box<SentinelSet>),
    Cluster(RedisCluster),
}

fn failover(args: &Args, kind: Kind) {
    let trials: usize = args.get("trials", 3);
    let every = Duration::from_millis(args.get("every-ms", 10u64));
    let warmup = Duration::from_millis(args.get("warmup-ms", 2000u64));
    let max = Duration::from_secs(args.get("max-secs", 30u64));
    let shards: usize = args.get("shards", 1);
    println!(
        "# {} failover: {trials} trials, one publication per {} ms per channel through node A's HTTP API, subscriber on node B, kill -9 of the master after {} ms, give up {} s after the kill, shards={shards}",
        kind.name(),
        every.as_millis(),
        warmup.as_millis(),
        max.as_secs()
    );
    let mut results = Vec::new();
    for t in 1..=trials {
        let r = failover_trial(args, kind, t, trials, every, warmup, max, shards);
        results.push(r);
    }
    let name = kind.name();
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    summary(
        &format!("{name} failover: replica promoted by Redis after the kill"),
        results.iter().map(|r| ms(r.promoted)).collect(),
        "ms",
    );
    summary(
        &format!("{name} failover: first publish acknowledged again after the kill"),
        results.iter().map(|r| ms(r.ack)).collect(),
        "ms",
    );
    summary(
        &format!("{name} failover: first delivery on the other node after the kill"),
        results.iter().map(|r| ms(r.deliver)).collect(),
        "ms",
    );
    summary(
        &format!("{name} failover: publications answered an error meanwhile"),
        results.iter().map(|r| Some(r.errors as f64)).collect(),
        "",
    );
    summary(
        &format!("{name} failover: acknowledged publications never delivered"),
        results.iter().map(|r| Some(r.lost.len() as f64)).collect(),
        "",
    );
    if kind == Kind::Cluster {
        summary(
            "cluster failover: errors on a channel of another master",
            results
                .iter()
                .map(|r| r.other_errors.map(|e| e as f64))
                .collect(),
            "",
        );
        summary(
            "cluster failover: longest delivery gap on a channel of another master",
            results.iter().map(|r| ms(r.other_gap)).collect(),
            "ms",
        );
    }
}

/// Prints `what: min/median/max` over the trials that have a value, and how many had none.
fn summary(what: &str, mut v: Vec<Option<f64>>, unit: &str) {
    let missing = v.iter().filter(|x| x.is_none()).count();
    let mut v: Vec<f64> = v.drain(..).flatten().collect();
    v.sort_by(|a, b| a.total_cmp(b));
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    if v.is_empty() {
        println!("{what}: no trial recovered ({missing} without a value)");
        return;
    }
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    println!(
        "{what}: min {:.0} / median {:.0} / max {:.0}{unit} over {} trials{}",
        v[0],
        median,
        v[v.len() - 1],
        v.len(),
        if missing > 0 {
            format!(" ({missing} more did not recover within the limit)")
        } else {
            String::new()
        }
    );
}

/// `--cluster-require-full-coverage yes|no` for the cluster's nodes (Redis's default: yes,
/// then while a failed master's slots have no master every master answers `CLUSTERDOWN` to
/// keyed commands, such as the history script of channels in other slots).
fn full_coverage(args: &Args) -> Vec<String> {
    match args.str("full-coverage").as_deref() {
        None => Vec::new(),
        Some(v @ ("yes" | "no")) => vec!["--cluster-require-full-coverage".into(), v.into()],
        Some(v) => fatal(&format!("--full-coverage yes|no, not {v:?}")),
    }
}

/// The first channel name `bench:<prefix><i>` whose slot `want` accepts.
fn channel_where(prefix: &str, want: impl Fn(u16) -> bool) -> String {
    (0..100_000)
        .map(|i| format!("bench:{prefix}{i}"))
        .find(|c| want(slot_of_channel(c)))
        .unwrap_or_else(|| fatal("no channel name found for the wanted slot"))
}

/// The node's `redis.failovers` from /api/info (None: absent or unreadable).
fn failovers_of(addr: SocketAddr) -> Option<u64> {
    let mut c = HttpClient::connect(addr).ok()?;
    c.send("POST", "/api/info", b"{}").ok()?;
    let (code, body) = c.recv().ok()?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v["result"]["nodes"][0]["redis"]["failovers"].as_u64()
}

#[allow(clippy::too_many_arguments)]
fn failover_trial(
    args: &Args,
    kind: Kind,
    trial: usize,
    trials: usize,
    every: Duration,
    warmup: Duration,
    max: Duration,
    shards: usize,
) -> Trial {
    let name = kind.name();
    // The Redis side, fresh for every trial, and the channels: X on the master to kill, Y (in
    // a cluster) on another master.
    let (mut ha, node_flags, victim, replica, channels) = match kind {
        Kind::Sentinel => {
            let set = SentinelSet::start();
            let flags = vec![
                "--redis-sentinel".to_string(),
                set.urls(),
                "--redis-sentinel-master".into(),
                SENTINEL_MASTER.into(),
            ];
            let victim = set.master.port;
            let replica = set.replica.port;
            println!(
                "# trial {trial}: master :{} replica :{} sentinels {}",
                set.master.port,
                set.replica.port,
                set.urls()
            );
            (
                Ha::Sentinel(Box::new(set)),
                flags,
                victim,
                replica,
                vec!["bench:x".to_string()],
            )
        }
        Kind::Cluster => {
            let mut c = RedisCluster::start(3, 1, &full_coverage(args));
            let masters = c.masters();
            let (m, other) = (masters[0].clone(), masters[1].clone());
            let x = channel_where("x", |s| m.owns(s));
            let y = channel_where("y", |s| other.owns(s));
            let key = format!("shardcast:ch:{{{x}}}");
            let slot = redis_cli(m.port, &["CLUSTER", "KEYSLOT", &key]);
            if slot.first().map(|s| s.trim()) != Some(&slot_of_channel(&x).to_string()) {
                fatal(&format!(
                    "CLUSTER KEYSLOT {key} = {slot:?}, the bench computed {}",
                    slot_of_channel(&x)
                ));
            }
            let flags = vec!["--redis-cluster".to_string(), c.urls()];
            let replica = c
                .replica_of(m.port)
                .unwrap_or_else(|| fatal(&format!("no replica of the master :{}", m.port)));
            (Ha::Cluster(c), flags, m.port, replica, vec![x, y])
        }
    };
    let mut extra = bench_server_args(args, "cluster", "");
    extra.extend(node_flags);
    let a = Server::start(&format!("{name}-failover-a-{trial}"), shards, &extra, false);
    let b = Server::start(&format!("{name}-failover-b-{trial}"), shards, &extra, false);
    println!("# trial {trial}: node A {}", a.describe());
    println!("# trial {trial}: node B {}", b.describe());

    // The publishers stop first; the subscriber after the last deliveries arrived.
    let stop = Arc::new(AtomicBool::new(false));
    let stop_sub = Arc::new(AtomicBool::new(false));
    let arrivals = Arc::new(Mutex::new(Vec::<Arrival>::new()));
    let subscribed = Arc::new(AtomicBool::new(false));
    let probe = Arc::new(ProbeStats::default());
    let sub = {
        let (stop, log, sd, rc, ch) = (
            stop_sub.clone(),
            arrivals.clone(),
            subscribed.clone(),
            probe.clone(),
            channels.clone(),
        );
        let addr = b.addr;
        thread::spawn(move || probe_subscriber(addr, ch, stop, log, sd, rc))
    };
    if !wait_until(Duration::from_secs(10), || {
        subscribed.load(Ordering::Relaxed)
    }) {
        fatal("the subscriber on node B was not subscribed within 10 s");
    }
    let logs: Vec<Arc<Mutex<Vec<Sent>>>> = channels.iter().map(|_| Arc::default()).collect();
    let first_errors: Vec<Arc<Mutex<Option<String>>>> =
        channels.iter().map(|_| Arc::default()).collect();
    let currents: Vec<Arc<AtomicU64>> = channels.iter().map(|_| Arc::default()).collect();
    let pubs: Vec<_> = channels
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (stop, log, fe, c, addr, cur) = (
                stop.clone(),
                logs[i].clone(),
                first_errors[i].clone(),
                c.clone(),
                a.addr,
                currents[i].clone(),
            );
            thread::spawn(move || probe_publisher(addr, c, every, stop, log, fe, cur))
        })
        .collect();
    // Cross-node delivery on every channel before the kill.
    if !wait_until(Duration::from_secs(10), || {
        let got = arrivals.lock().unwrap();
        (0..channels.len()).all(|i| got.iter().any(|a| a.0 == i))
    }) {
        fatal("no cross-node delivery on every channel within 10 s of the first publication");
    }
    thread::sleep(warmup);

    // Kill the master (of X's slot).
    match &mut ha {
        Ha::Sentinel(set) => set.master.kill(),
        Ha::Cluster(c) => c.node_mut(victim).kill(),
    }
    let killed = Instant::now();
    // When Redis itself promoted the replica (ROLE polled every 50 ms), to tell Redis's part
    // of the failover from the nodes'.
    let promoted = thread::spawn(move || {
        while killed.elapsed() < max {
            if is_master(replica) {
                return Some(killed.elapsed());
            }
            thread::sleep(Duration::from_millis(50));
        }
        None
    });
    // Publications of X numbered above `boundary` were sent after the kill.
    let boundary = currents[0].load(Ordering::SeqCst);
    let after = |seq: u64| seq > boundary;
    let since_kill = |at: Instant| at.checked_duration_since(killed);
    let mut done = false;
    while killed.elapsed() < max {
        let acked = logs[0]
            .lock()
            .unwrap()
            .iter()
            .rev()
            .any(|s| s.ok && after(s.seq));
        let delivered = arrivals
            .lock()
            .unwrap()
            .iter()
            .rev()
            .any(|a| a.0 == 0 && after(a.1));
        if acked && delivered {
            done = true;
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    if done {
        // Two more seconds of publishing after the recovery: late errors or losses show.
        thread::sleep(Duration::from_secs(2));
    }
    stop.store(true, Ordering::Relaxed);
    for p in pubs {
        let _ = p.join();
    }
    // Let the last deliveries arrive: until nothing new for 500 ms (at most 3 s).
    let drain_end = Instant::now() + Duration::from_secs(3);
    let mut seen = 0;
    let mut quiet_since = Instant::now();
    while Instant::now() < drain_end && quiet_since.elapsed() < Duration::from_millis(500) {
        let n = arrivals.lock().unwrap().len();
        if n != seen {
            seen = n;
            quiet_since = Instant::now();
        }
        thread::sleep(Duration::from_millis(20));
    }
    let failovers = (failovers_of(a.addr), failovers_of(b.addr));
    let promoted = promoted.join().ok().flatten();
    // The subscriber's thread ends within its 100 ms read timeout.
    stop_sub.store(true, Ordering::Relaxed);
    let _ = sub.join();
    let arrivals = std::mem::take(&mut *arrivals.lock().unwrap());

    let x_log = logs[0].lock().unwrap();
    let ack = x_log
        .iter()
        .filter(|s| s.ok && after(s.seq))
        .filter_map(|s| since_kill(s.answered))
        .min();
    let deliver = arrivals
        .iter()
        .filter(|a| a.0 == 0 && after(a.1))
        .filter_map(|a| since_kill(a.2))
        .min();
    // Failed publications answered after the kill (the one in flight at the kill included).
    let errors = x_log
        .iter()
        .filter(|s| !s.ok && s.answered >= killed)
        .count();
    let got_x: std::collections::HashSet<u64> =
        arrivals.iter().filter(|a| a.0 == 0).map(|a| a.1).collect();
    let lost: Vec<u64> = x_log
        .iter()
        .filter(|s| s.ok && !got_x.contains(&s.seq))
        .map(|s| s.seq)
        .collect();
    let acked_before = x_log.iter().filter(|s| s.ok && !after(s.seq)).count();
    let (other_errors, other_gap) = if channels.len() > 1 {
        let y_log = logs[1].lock().unwrap();
        let errs = y_log
            .iter()
            .filter(|s| !s.ok && s.answered >= killed)
            .count();
        let mut times: Vec<Instant> = arrivals.iter().filter(|a| a.0 == 1).map(|a| a.2).collect();
        times.sort();
        // The longest gap from the last delivery before the kill to the end.
        let from = times.iter().rposition(|t| *t < killed).unwrap_or(0);
        let gap = times[from..]
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        (Some(errs), Some(gap))
    } else {
        (None, None)
    };
    let fmt = |d: Option<Duration>| match d {
        Some(d) => format!("{} ms", d.as_millis()),
        None => format!("none within {} s", max.as_secs()),
    };
    let lost_note = if lost.is_empty() {
        String::new()
    } else {
        // Each lost publication with when it was acknowledged, from the kill: one acknowledged
        // by the new master before node B subscribed there is lost to B unless the channel has
        // history to repair from (`--history N`).
        let when: Vec<String> = lost
            .iter()
            .take(10)
            .map(|&seq| {
                let t = x_log
                    .iter()
                    .find(|s| s.seq == seq)
                    .map(|s| match since_kill(s.answered) {
                        Some(d) => format!("+{} ms", d.as_millis()),
                        None => format!("-{} ms", (killed - s.answered).as_millis()),
                    })
                    .unwrap_or_default();
                format!("#{seq} acknowledged {t}")
            })
            .collect();
        format!(
            " ({}{}; relative to the kill, first delivery on B +{} ms)",
            when.join(", "),
            if lost.len() > 10 { ", ..." } else { "" },
            deliver.map_or("?".into(), |d| d.as_millis().to_string())
        )
    };
    let other = match (other_errors, other_gap) {
        (Some(e), Some(g)) => format!(
            "; channel {} on another master: {e} errors{}, longest delivery gap {} ms",
            channels[1],
            first_errors[1]
                .lock()
                .unwrap()
                .as_ref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default(),
            g.as_millis()
        ),
        _ => String::new(),
    };
    println!(
        "{name} failover trial {trial}/{trials}: kill -9 of the master :{victim} (channel {}) -> replica :{replica} promoted by Redis {}, first publish acknowledged again {}, first delivery on node B {}; {errors} publications answered an error meanwhile (first: {}); acknowledged but never delivered {}{lost_note} of {} acknowledged ({acked_before} before the kill){other}; redis.failovers A={} B={}; subscriber: {} reconnects, {} told to recover, {} not recovered",
        channels[0],
        fmt(promoted),
        fmt(ack),
        fmt(deliver),
        first_errors[0]
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| "none".into()),
        lost.len(),
        x_log.iter().filter(|s| s.ok).count(),
        failovers.0.map_or("n/a".into(), |n| n.to_string()),
        failovers.1.map_or("n/a".into(), |n| n.to_string()),
        probe.reconnects.load(Ordering::Relaxed),
        probe.resubscribes.load(Ordering::Relaxed),
        probe.not_recovered.load(Ordering::Relaxed),
    );
    drop(x_log);
    drop((a, b));
    drop(ha);
    Trial {
        promoted,
        ack,
        deliver,
        errors,
        lost,
        other_errors,
        other_gap,
    }
}

// ---------------------------------------------------------------------------
// Fan-out: one Redis vs a 3-master cluster
// ---------------------------------------------------------------------------

/// Deliveries and their publish→deliver latency, as the reader thread of one set-up saw them.
#[derive(Default)]
struct Tally {
    delivered: AtomicU64,
    malformed: AtomicU64,
    hist: Mutex<Hist>,
}

/// The reader's handler: counts deliveries and records latency from the `ts` in the data,
/// merging into the shared [`Tally`] once per epoll batch.
struct Count {
    tally: Arc<Tally>,
    local: Hist,
    n: u64,
}

/// The number after `key` in `line`.
fn num_after(line: &[u8], key: &[u8]) -> Option<u64> {
    let at = line.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = line[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&line[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

impl Handler for Count {
    fn on_line(&mut self, _conn: usize, line: &[u8], now_ns: u64) {
        match num_after(line, b"\"ts\":") {
            Some(ts) if line.starts_with(b"{\"push\":") => {
                self.local.record(now_ns.saturating_sub(ts));
                self.n += 1;
            }
            _ => {
                self.tally.malformed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn flush(&mut self) {
        if self.n > 0 {
            self.tally.hist.lock().unwrap().merge(&self.local);
            self.local = Hist::new();
            self.tally.delivered.fetch_add(self.n, Ordering::Relaxed);
            self.n = 0;
        }
    }
}

/// One set-up under test: its Redis side, two nodes, the subscribers' reader.
struct Setup {
    name: &'static str,
    nodes: Vec<Server>,
    redis_pids: Vec<i32>,
    reader: Reader<Count>,
    tally: Arc<Tally>,
    single: Option<RedisServer>,
    cluster: Option<RedisCluster>,
}

/// What one measured window gave.
struct Step {
    target: f64,
    acked: u64,
    errors: u64,
    first_error: Option<String>,
    expected: u64,
    delivered: u64,
    p50: u64,
    p99: u64,
    max: u64,
    node_cpu_s: f64,
    redis_cpu_s: f64,
    secs: f64,
    others_pct: f64,
    /// Machine-wide irq + softirq time (loopback delivery work no process is charged for).
    irq_pct: f64,
}

impl Step {
    fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.delivered)
    }
    fn rate(&self) -> f64 {
        self.acked as f64 / self.secs
    }
}

struct FanOpts {
    subs: usize,
    channels: Vec<String>,
    publishers: usize,
    shards: usize,
}

fn fanout(args: &Args, hard: u64) {
    let mut subs: usize = args.get("subs", 1000);
    let n_channels: usize = args.get("channels", 12);
    let cluster_ok = has_cluster_flag();
    let setups = if cluster_ok { 2 } else { 1 };
    // The bench holds every subscriber of both set-ups: keep 200 descriptors for the rest.
    let room = (hard.saturating_sub(200) as usize) / setups;
    if subs > room {
        eprintln!(
            "# --subs {subs} x {setups} set-ups exceeds RLIMIT_NOFILE hard {hard} - 200; using {room}"
        );
        subs = room;
    }
    if subs < 2 * n_channels {
        fatal("--subs must be at least twice --channels (every channel on both nodes)");
    }
    let rate: f64 = args.get("rate", 200.0);
    let secs: f64 = args.get("secs", 5.0);
    let ramp_start: f64 = args.get("ramp-start", 250.0);
    let factor: f64 = args.get("ramp-factor", 1.5);
    let step_secs: f64 = args.get("step-secs", 3.0);
    let max_steps: usize = args.get("max-steps", 8);
    let p99_limit = Duration::from_millis(args.get("p99-limit-ms", 50u64));
    let shards: usize = args.get("shards", 1);
    let publishers: usize = args.get("publishers", 4);

    // The cluster first: the channels are chosen so that every master owns some of them.
    let cluster = cluster_ok.then(|| RedisCluster::start(3, 0, &full_coverage(args)));
    let channels: Vec<String> = match &cluster {
        Some(c) => {
            let masters = c.masters_seen_by(c.nodes[0].port);
            (0..n_channels)
                .map(|i| {
                    let m = &masters[i % masters.len()];
                    channel_where(&format!("f{i}_"), |s| m.owns(s))
                })
                .collect()
        }
        None => (0..n_channels).map(|i| format!("bench:f{i}_")).collect(),
    };
    let o = FanOpts {
        subs,
        channels,
        publishers,
        shards,
    };
    println!(
        "# fanout-ha: subs={subs} (half on each of 2 nodes) channels={} (slots on every master of the cluster) publishers={publishers} (HTTP keep-alive, one request in flight each, alternating nodes) shards={shards}; fixed {rate} pub/s x {secs} s; ramp from {ramp_start} pub/s x{factor} per {step_secs} s step, at most {max_steps} steps; a step is carried when every publication is acknowledged, none is lost and p99 <= {} ms",
        o.channels.len(),
        p99_limit.as_millis()
    );
    if !cluster_ok {
        println!("# fanout-ha: this shardcast has no --redis-cluster (branch i18-cluster not merged): one Redis only");
    }
    let mut all = Vec::new();
    let single = RedisServer::start("cluster-bench-single");
    println!("# single redis-server: {}", single.describe());
    all.push(start_setup(
        args,
        &o,
        "single",
        vec!["--redis".into(), single.url()],
        vec![single.pid],
        Some(single),
        None,
    ));
    if let Some(c) = cluster {
        let flags = vec!["--redis-cluster".into(), c.urls()];
        let pids = c.nodes.iter().map(|n| n.pid()).collect();
        all.push(start_setup(args, &o, "cluster", flags, pids, None, Some(c)));
    }

    // Fixed rate: CPU per delivery, alternating.
    for s in all.iter_mut() {
        let st = run_step(s, &o, rate, secs);
        print_step(s, &st, "fixed", p99_limit);
        let per_delivery_us = st.node_cpu_s * 1e6 / st.delivered.max(1) as f64;
        println!(
            "fanout-ha {} cpu: {:.2} µs of node CPU per delivery ({:.0} deliveries/s, both nodes), redis {:.1} µs CPU per publication at {rate} pub/s",
            s.name,
            per_delivery_us,
            st.delivered as f64 / st.secs,
            st.redis_cpu_s * 1e6 / st.acked.max(1) as f64,
        );
    }
    // Ramp: step by step, each set-up in turn, until each fails a step.
    let mut carried: Vec<Option<f64>> = vec![None; all.len()];
    let mut failed = vec![false; all.len()];
    let mut r = ramp_start;
    for _ in 0..max_steps {
        for (i, s) in all.iter_mut().enumerate() {
            if failed[i] {
                continue;
            }
            let st = run_step(s, &o, r, step_secs);
            let why = print_step(s, &st, "ramp", p99_limit);
            match why {
                None => carried[i] = Some(st.rate()),
                Some(_) => failed[i] = true,
            }
        }
        if failed.iter().all(|f| *f) {
            break;
        }
        r *= factor;
    }
    for (i, s) in all.iter().enumerate() {
        let more = if failed[i] {
            ""
        } else {
            " (the ramp ended before it failed a step)"
        };
        match carried[i] {
            Some(c) => println!(
                "fanout-ha {} carried: {c:.0} publications/s ({:.0} deliveries/s) across 2 nodes, {} subscribers on {} channels, p99 <= {} ms, nothing lost{more}",
                s.name,
                c * o.subs as f64 / o.channels.len() as f64,
                o.subs,
                o.channels.len(),
                p99_limit.as_millis()
            ),
            None => println!(
                "fanout-ha {} carried: not even the first step ({ramp_start} pub/s)",
                s.name
            ),
        }
    }
    for s in all {
        let closed = s.reader.live.closed.load(Ordering::Relaxed);
        let malformed = s.tally.malformed.load(Ordering::Relaxed);
        if closed > 0 || malformed > 0 {
            println!(
                "# fanout-ha {}: {closed} subscriber connections closed, {malformed} unexpected lines",
                s.name
            );
        }
        let _ = s.reader.stop();
    }
}

fn start_setup(
    args: &Args,
    o: &FanOpts,
    name: &'static str,
    flags: Vec<String>,
    redis_pids: Vec<i32>,
    single: Option<RedisServer>,
    cluster: Option<RedisCluster>,
) -> Setup {
    let mut extra = bench_server_args(args, "cluster", "");
    extra.extend(flags);
    let nodes: Vec<Server> = ["a", "b"]
        .iter()
        .map(|n| Server::start(&format!("cluster-{name}-{n}"), o.shards, &extra, false))
        .collect();
    for n in &nodes {
        println!("# {name} node: {}", n.describe());
    }
    let tally = Arc::new(Tally::default());
    let reader = Reader::spawn(
        &format!("reader-{name}"),
        Count {
            tally: tally.clone(),
            local: Hist::new(),
            n: 0,
        },
    );
    let channels = Arc::new(o.channels.clone());
    let half = o.subs / 2;
    for (k, node) in nodes.iter().enumerate() {
        let (first, count) = if k == 0 {
            (0, half)
        } else {
            (half, o.subs - half)
        };
        let ch = channels.clone();
        let conns = connect_many(
            node.addr,
            first,
            count,
            4,
            8,
            Arc::new(move |i| ch[i % ch.len()].clone()),
        )
        .unwrap_or_else(|e| fatal(&format!("{name}: subscribers on node {k}: {e}")));
        reader.add(conns);
    }
    // Every node subscribed on Redis: one publication per channel reaches every subscriber.
    let s = Setup {
        name,
        nodes,
        redis_pids,
        reader,
        tally,
        single,
        cluster,
    };
    let expected = o.subs as u64;
    let before = s.tally.delivered.load(Ordering::Relaxed);
    let mut http = HttpClient::connect(s.nodes[0].addr)
        .unwrap_or_else(|e| fatal(&format!("{name}: HTTP: {e}")));
    for c in &o.channels {
        let body = format!("{{\"channel\":\"{c}\",\"data\":{{\"ts\":{}}}}}", unix_ns());
        let _ = http.send("POST", "/api/publish", body.as_bytes());
        let _ = http.recv();
    }
    if !wait_until(Duration::from_secs(10), || {
        s.tally.delivered.load(Ordering::Relaxed) - before >= expected
    }) {
        fatal(&format!(
            "{name}: a publication per channel did not reach all {expected} subscribers within 10 s"
        ));
    }
    s
}

/// Publishes at `rate` for `secs` from `o.publishers` threads (alternating nodes, channels in
/// turn), then waits (up to 3 s) for the deliveries owed; measures CPU around it.
fn run_step(s: &mut Setup, o: &FanOpts, rate: f64, secs: f64) -> Step {
    let redis_up = match (&mut s.single, &mut s.cluster) {
        (Some(r), _) => r.alive(),
        (None, Some(c)) => c.nodes.iter_mut().all(|n| n.alive()),
        (None, None) => true,
    };
    if !redis_up {
        fatal(&format!("{}: a redis-server died", s.name));
    }
    let subs_on = |c: usize| (0..o.subs).filter(|i| i % o.channels.len() == c).count() as u64;
    let per_channel: Vec<u64> = (0..o.channels.len()).map(subs_on).collect();
    *s.tally.hist.lock().unwrap() = Hist::new();
    let d0 = s.tally.delivered.load(Ordering::Relaxed);
    let node_ns0: u64 = s.nodes.iter().map(|n| sched_ns(n.pid)).sum();
    let redis_cpu0: f64 = s.redis_pids.iter().map(|&p| cpu_secs(p)).sum();
    let self0 = self_cpu_secs();
    let m0 = machine_cpu();
    let t0 = Instant::now();
    let window = Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..o.publishers)
        .map(|p| {
            let addr = s.nodes[p % s.nodes.len()].addr;
            let channels = o.channels.clone();
            let every = Duration::from_secs_f64(o.publishers as f64 / rate);
            let n = channels.len();
            thread::spawn(move || {
                let mut acked = vec![0u64; n];
                let (mut errors, mut first_error) = (0u64, None);
                let mut http = match HttpClient::connect(addr) {
                    Ok(h) => h,
                    Err(e) => return (acked, 1, Some(format!("connect: {e}"))),
                };
                let start = Instant::now();
                let mut k = 0u64;
                while start.elapsed() < window {
                    let due = start + every.mul_f64(k as f64);
                    let now = Instant::now();
                    if due > now {
                        thread::sleep(due - now);
                    }
                    let c = (k as usize * o_stride(n) + p) % n;
                    k += 1;
                    let body = format!(
                        "{{\"channel\":\"{}\",\"data\":{{\"ts\":{}}}}}",
                        channels[c],
                        unix_ns()
                    );
                    let res = http
                        .send("POST", "/api/publish", body.as_bytes())
                        .and_then(|_| http.recv());
                    match res {
                        Ok((code, b)) if published(code, &b) => acked[c] += 1,
                        Ok((code, b)) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| {
                                format!("HTTP {code}: {}", String::from_utf8_lossy(&b))
                            });
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                            match HttpClient::connect(addr) {
                                Ok(h) => http = h,
                                Err(_) => break,
                            }
                        }
                    }
                }
                (acked, errors, first_error)
            })
        })
        .collect();
    let mut acked = vec![0u64; o.channels.len()];
    let (mut errors, mut first_error) = (0, None);
    for h in handles {
        let (a, e, fe) = h.join().expect("publisher thread");
        for (x, y) in acked.iter_mut().zip(a) {
            *x += y;
        }
        errors += e;
        if first_error.is_none() {
            first_error = fe;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let expected: u64 = acked.iter().zip(&per_channel).map(|(a, n)| a * n).sum();
    wait_until(Duration::from_secs(3), || {
        s.tally.delivered.load(Ordering::Relaxed) - d0 >= expected
    });
    let delivered = s.tally.delivered.load(Ordering::Relaxed) - d0;
    let node_cpu_s = (s.nodes.iter().map(|n| sched_ns(n.pid)).sum::<u64>() - node_ns0) as f64 / 1e9;
    let redis_cpu_s = s.redis_pids.iter().map(|&p| cpu_secs(p)).sum::<f64>() - redis_cpu0;
    let self_s = self_cpu_secs() - self0;
    let m1 = machine_cpu();
    let wall = t0.elapsed().as_secs_f64();
    let others = (m1.task - m0.task) - node_cpu_s - redis_cpu_s - self_s;
    let h = s.tally.hist.lock().unwrap();
    Step {
        target: rate,
        acked: acked.iter().sum(),
        errors,
        first_error,
        expected,
        delivered,
        p50: h.quantile(0.5),
        p99: h.quantile(0.99),
        max: h.max,
        node_cpu_s,
        redis_cpu_s,
        secs: elapsed,
        others_pct: (others / wall * 100.0).max(0.0),
        irq_pct: (m1.irq - m0.irq) / wall * 100.0,
    }
}

/// A stride through the channels coprime with their count, so that consecutive publications of
/// one publisher land on different channels (and masters).
fn o_stride(n: usize) -> usize {
    (1..=n)
        .rev()
        .find(|s| gcd(*s, n) == 1 && *s > 1)
        .unwrap_or(1)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Prints one step line; returns why the step was not carried (None: carried).
fn print_step(s: &Setup, st: &Step, phase: &str, p99_limit: Duration) -> Option<String> {
    let why = if st.errors > 0 {
        Some(format!(
            "{} publish errors (first: {})",
            st.errors,
            st.first_error.clone().unwrap_or_default()
        ))
    } else if st.lost() > 0 {
        Some(format!("{} deliveries lost", st.lost()))
    } else if st.rate() < 0.95 * st.target {
        Some(format!(
            "publishers reached {:.0} of {:.0} pub/s (acknowledgements too slow)",
            st.rate(),
            st.target
        ))
    } else if st.p99 > p99_limit.as_nanos() as u64 {
        Some(format!("p99 {} over the limit", fmt_ns(st.p99)))
    } else {
        None
    };
    if st.others_pct > 50.0 {
        println!(
            "# fanout-ha {} {phase}: WARNING: other processes used {:.0}% of a CPU during this step (machine busy); numbers are perturbed",
            s.name, st.others_pct
        );
    }
    println!(
        "fanout-ha {} {phase} {:.0} pub/s: acknowledged {:.0} pub/s, deliveries {}/{} (lost {}), latency p50 {} p99 {} max {}; node CPU {:.0}% of a core, redis {:.0}%, irq+softirq {:.0}%, other processes {:.0}% -> {}",
        s.name,
        st.target,
        st.rate(),
        st.delivered,
        st.expected,
        st.lost(),
        fmt_ns(st.p50),
        fmt_ns(st.p99),
        fmt_ns(st.max),
        st.node_cpu_s / st.secs * 100.0,
        st.redis_cpu_s / st.secs * 100.0,
        st.irq_pct,
        st.others_pct,
        why.as_deref().unwrap_or("carried")
    );
    why
}
