//! Reconnect-storm benchmark: N subscribers of a recoverable channel lose their
//! connections, miss M publications, and all come back at once with a
//! recovering subscribe (offset + epoch). Measures how long until every one of
//! them holds its `recovered: true` reply with exactly the M missed
//! publications in order, and what the storm costs in Redis commands and
//! stream reads.
//!
//! The bench starts its own `redis-server` (free loopback port, no
//! persistence) and one or two nodes (`--nodes`, default 2) in Redis mode with
//! a `[namespaces.feed]` section (`history_size`, `history_ttl_secs`,
//! `recover = true`), then:
//!
//! 1. connect: N clients (connect + subscribe to `feed:storm`, or
//!    `feed:storm-<k>` with `--channels C`) split between the nodes, each
//!    recording the epoch and offset of its subscribe reply; `--warm W`
//!    publications are then delivered live to every client (offsets checked);
//! 2. gone: every client sends a WebSocket close and drops its socket; once the
//!    nodes report 0 clients and Redis shows no node subscribed to the channels
//!    (`PUBSUB NUMSUB`), M publications per channel go through node A's
//!    `/api/publish`;
//! 3. storm: all N reconnect at once from other source addresses, nonblocking
//!    connects from one epoll thread, each sending connect + `subscribe` with
//!    `recover`, its offset and epoch in its first frame. A client is ok when
//!    its reply says `recovered: true`, `was_recovering: true`, the same epoch,
//!    its own offset, and carries exactly the M missed publications with
//!    contiguous offsets and the published data.
//!
//! Redis cost: `INFO commandstats` before and after the storm (EVALSHA calls,
//! XRANGE/XREVRANGE run inside the read script, every command), and the
//! nodes' `/api/info` counters (`stream_reads`, `recoveries_from_cache`,
//! `recoveries`, `repaired_publications`). The target is one stream read per
//! channel per node, not one per client.
//!
//! Run: `cargo bench --bench recovery [-- --clients 2000 --nodes 2 --missed 100 ...]`,
//! `--help` for all options.

mod storm;

#[macro_use]
#[path = "../common/modules.rs"]
mod modules;
common_modules!("../common"; args, clock, cpu, hist, http, net, redis, resp, safety, server, ws);

use common::args::{conns_under_nofile, Args};
use common::clock::wait_until;
use common::cpu::{cpu_secs, online_cpus, sched_ns, self_cpu_secs};
use common::hist::{fmt_ns, Hist};
use common::http::HttpClient;
use common::net::raise_nofile;
use common::redis::RedisServer;
use common::resp::{commandstats, pubsub_numsub};
use common::safety::{fatal, install_safety_nets};
use common::server::{write_config, Server};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};
use storm::{phase_src, Client, Phase, Storm};

const USAGE: &str = "\
cargo bench --bench recovery -- [options]
  --clients N        recovering clients (default 2000; at most RLIMIT_NOFILE hard limit - margin)
  --margin N         file descriptors kept free below the hard limit (default 300)
  --nodes N          shardcast nodes sharing the Redis, 1 or 2 (default 2); client i uses node i % N
  --shards N         --shards of each node (default: online CPUs)
  --channels C       client i subscribes to channel (i / nodes) % C: feed:storm (C = 1) or feed:storm-<k> (default 1)
  --missed M         publications per channel published while the clients are gone (default 100)
  --warm W           publications per channel delivered live before the clients leave (default 5)
  --history-size H   [namespaces.feed] history_size (default: max(1000, 2 x (M + W)))
  --inflight K       storm: connections being set up at once (default: all N at once)
  --connect-inflight K  initial connect phase: connections being set up at once (default 256)
  --launch-batch B   storm: connect() calls issued between two epoll_wait calls (default 256)
  --attempts A       connection attempts per client before it counts as failed (default 3)
  --src-addrs N      source addresses per phase (default: 1 per 10K clients, min 2); the initial
                     connections use 127.0.0.2.., the storm the next N addresses
  --deadline S       hard overall deadline in seconds (default 120)
  --server-args S    extra arguments for every node (whitespace separated)
  --server-log       node stderr to our stderr (default: log files under target/)
The nodes get --config <target tmp>/shardcast-bench-recovery.toml ([namespaces.feed] with
history and recover, [ping] interval 600 s, registry lease refresh every 300 s so that none
falls in the storm window, metrics off) and --redis redis://127.0.0.1:<port>.
env SHARDCAST_BIN overrides the server binary, REDIS_SERVER the redis-server binary.";

const NODE_NAMES: [&str; 2] = ["A", "B"];

// ---------------------------------------------------------------------------
// Config, HTTP API, Redis
// ---------------------------------------------------------------------------

fn config_text(history_size: u64) -> String {
    format!(
        "# written by benches/recovery.rs: the storm channels are feed:storm[-<k>]\n\
         metrics_listen = \"\"\n\n\
         [redis_options]\n\
         # no lease refresh inside the storm window: its SET, ZADD and EVALSHA would\n\
         # blur the storm's Redis command count\n\
         lease_refresh_secs = 300\n\
         lease_ttl_secs = 900\n\n\
         [ping]\n\
         interval_secs = 600\n\
         pong_timeout_secs = 8\n\n\
         [namespaces.feed]\n\
         history_size = {history_size}\n\
         history_ttl_secs = 600\n\
         recover = true\n"
    )
}

/// One API request on `http` (keep-alive) → (status, body).
fn api(http: &mut HttpClient, path: &str, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
    http.send("POST", path, body)?;
    http.recv()
}

/// `POST /api/info` on a fresh connection → `result.nodes[0]` (the node asked).
fn node_info(addr: SocketAddr) -> Result<Value, String> {
    let mut http = HttpClient::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let (code, body) =
        api(&mut http, "/api/info", b"{}").map_err(|e| format!("/api/info on {addr}: {e}"))?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| format!("/api/info JSON: {e}"))?;
    match v.pointer("/result/nodes/0") {
        Some(n) if code == 200 => Ok(n.clone()),
        _ => Err(format!(
            "/api/info on {addr}: HTTP {code}: {}",
            String::from_utf8_lossy(&body)
        )),
    }
}

fn counter(node: &Value, k: &str) -> u64 {
    node.pointer(&format!("/counters/{k}"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Publishes `data` (a JSON object text) to `channel` → (offset, epoch).
fn publish(http: &mut HttpClient, channel: &str, data: &str) -> Result<(u64, String), String> {
    let body = format!(
        "{{\"channel\":{},\"data\":{data}}}",
        serde_json::to_string(channel).unwrap()
    );
    let (code, resp) =
        api(http, "/api/publish", body.as_bytes()).map_err(|e| format!("publish: {e}"))?;
    let v: Value = serde_json::from_slice(&resp).unwrap_or(Value::Null);
    match (
        v.pointer("/result/offset").and_then(Value::as_u64),
        v.pointer("/result/epoch").and_then(Value::as_str),
    ) {
        (Some(o), Some(e)) if code == 200 => Ok((o, e.to_string())),
        _ => Err(format!(
            "publish to {channel}: HTTP {code}: {}",
            String::from_utf8_lossy(&resp).trim()
        )),
    }
}

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

/// A recovering client's position: (node, channel index, offset, epoch).
type Position = (usize, usize, u64, String);

/// The run's settings and where its processes are, shared by the phases.
struct Run {
    n: usize,
    n_nodes: usize,
    n_chan: usize,
    missed: u64,
    warm: u64,
    inflight: usize,
    connect_inflight: usize,
    attempts: u32,
    launch_batch: usize,
    n_src: usize,
    ncpu: usize,
    shards: usize,
    /// Every phase ends by then (the deadline minus a margin for teardown).
    end_by: Instant,
    channels: Vec<String>,
    addrs: Vec<SocketAddr>,
    node_pids: Vec<i32>,
    /// Clients per node.
    per_node: Vec<usize>,
    redis_port: u16,
    redis_pid: i32,
}

/// `A x, B y` for per-node values.
fn node_text(v: &[String]) -> String {
    v.iter()
        .enumerate()
        .map(|(k, s)| format!("{} {s}", NODE_NAMES[k]))
        .collect::<Vec<_>>()
        .join(", ")
}

struct Snap {
    nodes: Vec<Value>,
    cmds: BTreeMap<String, u64>,
    node_cpu: Vec<f64>,
    node_sched: Vec<u64>,
    redis_sched: u64,
    self_cpu: f64,
}

/// The storm's Redis commands lie between the two `INFO commandstats`: before
/// the storm the nodes' `/api/info` (which reads the node registry in Redis)
/// comes first, after it last, so neither snapshot's own commands count.
fn take_snap(
    addrs: &[SocketAddr],
    node_pids: &[i32],
    redis_port: u16,
    redis_pid: i32,
    after: bool,
) -> Snap {
    let infos = || -> Vec<Value> {
        addrs
            .iter()
            .map(|a| node_info(*a).unwrap_or_else(|e| fatal(&e)))
            .collect()
    };
    let stats = || commandstats(redis_port).unwrap_or_else(|e| fatal(&e));
    let node_cpu = node_pids.iter().map(|&p| cpu_secs(p)).collect();
    let node_sched = node_pids.iter().map(|&p| sched_ns(p)).collect();
    let redis_sched = sched_ns(redis_pid);
    let self_cpu = self_cpu_secs();
    let (nodes, cmds) = if after {
        let c = stats();
        (infos(), c)
    } else {
        let n = infos();
        (n, stats())
    };
    Snap {
        nodes,
        cmds,
        node_cpu,
        node_sched,
        redis_sched,
        self_cpu,
    }
}

fn main() {
    let Some(args) = Args::parse_or_help(USAGE) else {
        return;
    };
    let deadline_s: u64 = args.get("deadline", 120u64);
    let deadline = Duration::from_secs(deadline_s);
    install_safety_nets(deadline);
    let t_start = Instant::now();
    let end_by = t_start + deadline - Duration::from_secs(5).min(deadline / 4);

    let hard = raise_nofile();
    let (n, margin) = conns_under_nofile(&args, "clients", Some(2000), hard);
    let n_nodes: usize = args.get("nodes", 2usize);
    if !(1..=2).contains(&n_nodes) {
        fatal("--nodes must be 1 or 2");
    }
    if n < n_nodes {
        fatal("need at least one client per node");
    }
    let ncpu = online_cpus();
    let shards: usize = args.get("shards", ncpu).max(1);
    let n_chan: usize = args.get("channels", 1usize).max(1);
    let missed: u64 = args.get("missed", 100u64);
    let warm: u64 = args.get("warm", 5u64);
    let history_size: u64 = args
        .get("history-size", (2 * (missed + warm)).max(1000))
        .min(1_000_000);
    let inflight: usize = args.get("inflight", n).max(1);
    let connect_inflight: usize = args.get("connect-inflight", 256usize).max(1);
    let attempts: u32 = args.get("attempts", 3u32).max(1);
    let launch_batch: usize = args.get("launch-batch", 256usize).max(1);
    let n_src: usize = args
        .get("src-addrs", n.div_ceil(10_000).max(2))
        .clamp(1, 120);
    let channels: Vec<String> = (0..n_chan)
        .map(|k| {
            if n_chan == 1 {
                "feed:storm".to_string()
            } else {
                format!("feed:storm-{k}")
            }
        })
        .collect();

    println!(
        "# recovery: clients={n} (RLIMIT_NOFILE hard={hard}, margin={margin}) nodes={n_nodes} x shards={shards} \
         channels={n_chan} missed={missed} warm={warm} history_size={history_size} storm_inflight={inflight} launch_batch={launch_batch} \
         connect_inflight={connect_inflight} attempts={attempts} src_addrs={n_src}+{n_src} \
         (initial 127.0.0.2..127.0.0.{}, storm 127.0.0.{}..127.0.0.{}) deadline={deadline_s} s",
        n_src + 1,
        n_src + 2,
        2 * n_src + 1
    );

    let redis = RedisServer::start("recovery");
    println!("# redis-server: {}", redis.describe());
    let mut extra = vec![
        "--config".to_string(),
        write_config("shardcast-bench-recovery.toml", &config_text(history_size))
            .display()
            .to_string(),
        "--redis".to_string(),
        redis.url(),
    ];
    extra.extend(args.server_args());
    let mut servers: Vec<Server> = (0..n_nodes)
        .map(|k| {
            Server::start(
                &format!("recovery-{}", NODE_NAMES[k].to_lowercase()),
                shards,
                &extra,
                args.has("server-log"),
            )
        })
        .collect();
    for (k, s) in servers.iter().enumerate() {
        println!("# node {}: {}", NODE_NAMES[k], s.describe());
    }
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let node_pids: Vec<i32> = servers.iter().map(|s| s.pid).collect();
    let per_node: Vec<usize> = (0..n_nodes)
        .map(|k| (0..n).filter(|i| i % n_nodes == k).count())
        .collect();
    let run = Run {
        n,
        n_nodes,
        n_chan,
        missed,
        warm,
        inflight,
        connect_inflight,
        attempts,
        launch_batch,
        n_src,
        ncpu,
        shards,
        end_by,
        channels,
        addrs,
        node_pids,
        per_node,
        redis_port: redis.port,
        redis_pid: redis.pid,
    };
    let (st, positions, mut top) = connect_and_warm(&run);
    leave_and_publish(&run, st, &mut top);
    let sr = storm(&run, &positions);
    let (failed, extra_pushes, closed) = report_clients(&run, &sr, &positions);
    let target_met = report_redis_and_nodes(&run, &sr, &positions);
    report_cpu(&run, &sr);
    let StormRun { mut st, all, .. } = sr;

    let unexpected = st.unexpected;
    st.close_all();
    drop(st);
    let alive_nodes: Vec<bool> = servers.iter_mut().map(|s| s.alive()).collect();
    let mut redis = redis;
    let redis_alive = redis.alive();
    let alive = alive_nodes.iter().all(|&a| a) && redis_alive;
    let result_ok =
        alive && all && failed == 0 && extra_pushes == 0 && closed == 0 && unexpected == 0;
    println!(
        "# result: {}{}; nodes alive {}, redis-server alive {redis_alive}; elapsed {:.1} s",
        if result_ok { "ok" } else { "FAILED" },
        if target_met {
            ""
        } else {
            " (stream reads over target)"
        },
        node_text(
            &alive_nodes
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
        ),
        t_start.elapsed().as_secs_f64()
    );
    // Nodes first, then the Redis they use; each is killed and reaped by PID.
    drop(servers);
    drop(redis);
    if !result_ok {
        std::process::exit(1);
    }
}

/// Phase 1: every client connects and subscribes (recording its position), then `warm`
/// publications per channel are delivered live. Returns the clients, their positions (each at
/// its channel's top) and each channel's top (offset, epoch).
fn connect_and_warm(run: &Run) -> (Storm, Vec<Position>, Vec<(u64, String)>) {
    let (n, n_nodes, n_chan, n_src, warm, end_by) = (
        run.n,
        run.n_nodes,
        run.n_chan,
        run.n_src,
        run.warm,
        run.end_by,
    );
    let (connect_inflight, attempts) = (run.connect_inflight, run.attempts);
    let (channels, addrs, per_node) = (&run.channels, &run.addrs, &run.per_node);
    let clients: Vec<Client> = (0..n)
        .map(|i| Client::new(i % n_nodes, (i / n_nodes) % n_chan, phase_src(0, i, n_src)))
        .collect();
    let mut st = Storm::new(
        Phase::Initial,
        addrs.clone(),
        channels.clone(),
        0,
        clients,
        connect_inflight,
        attempts,
    );
    let t0 = Instant::now();
    let phase_end = (t0 + Duration::from_secs(40)).min(end_by);
    if !st.run(phase_end, |s| s.settled == s.clients.len()) {
        st.time_out();
    }
    let t_conn = t0.elapsed().as_secs_f64();
    if st.failed > 0 {
        let first = st.clients.iter().find_map(|c| c.fail.clone());
        fatal(&format!(
            "initial connect: {} of {n} clients failed; first: {first:?}",
            st.failed
        ));
    }
    let epoch0 = st.clients[0].epoch.clone();
    let same_epoch = st
        .clients
        .iter()
        .all(|c| c.epoch == st.clients.iter().find(|d| d.chan == c.chan).unwrap().epoch);
    let mut http = HttpClient::connect(addrs[0]).unwrap_or_else(|e| fatal(&format!("{e}")));
    let mut top: Vec<(u64, String)> = Vec::new();
    for ch in channels {
        let first = st
            .clients
            .iter()
            .find(|c| &channels[c.chan] == ch)
            .map(|c| (c.offset, c.epoch.clone()))
            .unwrap_or_default();
        top.push(first);
    }
    let sub_offset = top[0].0;
    let tw = Instant::now();
    for j in 1..=warm {
        for (k, ch) in channels.iter().enumerate() {
            let (o, e) =
                publish(&mut http, ch, &format!("{{\"w\":{j}}}")).unwrap_or_else(|e| fatal(&e));
            if o != top[k].0 + 1 || e != top[k].1 {
                println!(
                    "# WARNING: warm-up publish to {ch} got offset {o} epoch {e}, expected offset {} epoch {}",
                    top[k].0 + 1,
                    top[k].1
                );
            }
            top[k] = (o, e);
        }
    }
    let tops: Vec<u64> = top.iter().map(|t| t.0).collect();
    let warm_ok = st.run(
        (Instant::now() + Duration::from_secs(10)).min(end_by),
        |s| s.clients.iter().all(|c| c.offset >= tops[c.chan]),
    );
    let t_warm = tw.elapsed().as_secs_f64();
    let (gaps, dups, closed): (u64, u64, usize) = st.clients.iter().fold((0, 0, 0), |a, c| {
        (
            a.0 + c.gaps,
            a.1 + c.dups,
            a.2 + c.closed_by_server as usize,
        )
    });
    println!(
        "recovery connect: {n} clients connected+subscribed ({}) in {t_conn:.2} s ({} retries); \
         {} epoch {epoch0} offset {}{}; warm-up: {warm} publication(s) per channel delivered live to {} of {n} clients in {t_warm:.2} s \
         (gaps {gaps}, duplicates {dups}, closed by server {closed})",
        node_text(&per_node.iter().map(|c| format!("{c}")).collect::<Vec<_>>()),
        st.retries,
        channels[0],
        sub_offset,
        if same_epoch { "" } else { " (EPOCHS DIFFER between clients of one channel)" },
        st.clients
            .iter()
            .filter(|c| c.offset >= tops[c.chan])
            .count(),
    );
    if !warm_ok || gaps > 0 || dups > 0 || closed > 0 || !same_epoch || st.unexpected > 0 {
        fatal(&format!(
            "warm-up phase broken (all delivered {warm_ok}, unexpected lines {}: {:?})",
            st.unexpected, st.first_unexpected
        ));
    }
    // Every client is now at its channel's top: its recovery position.
    let positions: Vec<(usize, usize, u64, String)> = st
        .clients
        .iter()
        .map(|c| (c.node, c.chan, c.offset, c.epoch.clone()))
        .collect();

    (st, positions, top)
}

/// Phase 2: every client leaves; once the nodes report no clients and no node is subscribed in
/// Redis, `missed` publications per channel go through node A.
fn leave_and_publish(run: &Run, mut st: Storm, top: &mut [(u64, String)]) {
    let (n, missed, end_by) = (run.n, run.missed, run.end_by);
    let (channels, addrs) = (&run.channels, &run.addrs);
    let tg = Instant::now();
    st.close_all();
    drop(st);
    let mut last_seen = (0u64, 0u64);
    let gone = wait_until(
        Duration::from_secs(15).min(end_by.saturating_duration_since(Instant::now())),
        || {
            let clients: u64 = addrs
                .iter()
                .map(|a| {
                    node_info(*a)
                        .map(|v| v["num_clients"].as_u64().unwrap_or(0))
                        .unwrap_or(u64::MAX / 4)
                })
                .sum();
            let subs = pubsub_numsub(run.redis_port, channels).unwrap_or(u64::MAX / 4);
            last_seen = (clients, subs);
            let ok = clients == 0 && subs == 0;
            if !ok {
                thread::sleep(Duration::from_millis(50));
            }
            ok
        },
    );
    if !gone {
        fatal(&format!(
            "after closing every client the nodes still report {} clients and Redis {} channel subscriptions",
            last_seen.0, last_seen.1
        ));
    }
    let t_gone = tg.elapsed().as_secs_f64();
    let mut http = HttpClient::connect(addrs[0]).unwrap_or_else(|e| fatal(&format!("{e}")));
    let tp = Instant::now();
    for j in 1..=missed {
        for (k, ch) in channels.iter().enumerate() {
            let data = format!("{{\"m\":{j},\"c\":{k},\"pad\":\"missed-while-away\"}}");
            let (o, e) = publish(&mut http, ch, &data).unwrap_or_else(|e| fatal(&e));
            if o != top[k].0 + 1 || e != top[k].1 {
                fatal(&format!(
                    "publish #{j} to {ch}: offset {o} epoch {e}, expected offset {} epoch {}",
                    top[k].0 + 1,
                    top[k].1
                ));
            }
            top[k] = (o, e);
        }
    }
    let t_pub = tp.elapsed().as_secs_f64();
    drop(http);
    println!(
        "recovery gone: {n} clients closed (WebSocket close + socket closed); nodes at 0 clients and PUBSUB NUMSUB 0 after {t_gone:.2} s; \
         {missed} publication(s) per channel published through node A while away in {t_pub:.2} s ({} now at offset {}, epoch {})",
        channels[0], top[0].0, top[0].1
    );
}

/// Phase 3 as measured: the storm, with snapshots of Redis and the nodes before and after.
struct StormRun {
    st: Storm,
    before: Snap,
    after: Snap,
    /// Burst start.
    ts: Instant,
    /// Until every client had its reply (or the storm's time ran out).
    t_all: Duration,
    /// Every client had a reply in time.
    all: bool,
    /// Seconds from the burst start to the last client's first connect().
    t_launch: f64,
    /// Burst start to the after-snapshot.
    storm_wall: f64,
}

/// Phase 3: all clients reconnect at once with a recovering subscribe.
fn storm(run: &Run, positions: &[Position]) -> StormRun {
    let (n_src, missed, inflight, attempts, launch_batch, end_by) = (
        run.n_src,
        run.missed,
        run.inflight,
        run.attempts,
        run.launch_batch,
        run.end_by,
    );
    let (channels, addrs, node_pids) = (&run.channels, &run.addrs, &run.node_pids);
    let clients: Vec<Client> = positions
        .iter()
        .enumerate()
        .map(|(i, (node, chan, off, ep))| {
            let mut c = Client::new(*node, *chan, phase_src(1, i, n_src));
            c.offset = *off;
            c.epoch = ep.clone();
            c
        })
        .collect();
    let before = take_snap(addrs, node_pids, run.redis_port, run.redis_pid, false);
    let mut st = Storm::new(
        Phase::Recover,
        addrs.clone(),
        channels.clone(),
        missed,
        clients,
        inflight,
        attempts,
    );
    st.launch_batch = launch_batch;
    let ts = Instant::now();
    let storm_end = (ts + Duration::from_secs(60)).min(end_by);
    let all = st.run(storm_end, |s| s.settled == s.clients.len());
    let t_all = ts.elapsed();
    if !all {
        st.time_out();
    }
    let t_launch = st
        .last_launch
        .map(|t| t.duration_since(ts).as_secs_f64())
        .unwrap_or(f64::NAN);
    // Anything arriving late (duplicates, strays) in a short quiet window.
    let quiet_end = (Instant::now() + Duration::from_millis(300)).min(end_by);
    st.run(quiet_end, |_| false);
    let after = take_snap(addrs, node_pids, run.redis_port, run.redis_pid, true);
    let storm_wall = ts.elapsed().as_secs_f64();

    StormRun {
        st,
        before,
        after,
        ts,
        t_all,
        all,
        t_launch,
        storm_wall,
    }
}

/// The storm and latency lines; returns (failed clients, pushes after the replies, closed by
/// server).
fn report_clients(run: &Run, sr: &StormRun, positions: &[Position]) -> (usize, u64, usize) {
    let (n, missed) = (run.n, run.missed);
    let channels = &run.channels;
    let StormRun {
        st,
        ts,
        t_all,
        all,
        t_launch,
        ..
    } = sr;
    let (ts, t_all, all, t_launch) = (*ts, *t_all, *all, *t_launch);
    let mut h_burst = Hist::new();
    let mut h_own = Hist::new();
    let mut fails: BTreeMap<String, usize> = BTreeMap::new();
    let mut first_fail: Option<String> = None;
    let (mut extra_pushes, mut closed, mut ok) = (0u64, 0usize, 0usize);
    for (i, c) in st.clients.iter().enumerate() {
        extra_pushes += c.pushes;
        closed += c.closed_by_server as usize;
        match (&c.fail, c.t_reply) {
            (None, Some(t)) => {
                ok += 1;
                h_burst.record(t.duration_since(ts).as_nanos() as u64);
                h_own.record(t.duration_since(c.t_start.unwrap_or(ts)).as_nanos() as u64);
            }
            (Some((kind, msg)), _) => {
                *fails.entry(format!("{kind:?}")).or_default() += 1;
                if first_fail.is_none() {
                    first_fail = Some(format!(
                        "client #{i} (node {}, {}, attempts {}): {msg}",
                        NODE_NAMES[c.node], channels[c.chan], c.attempts
                    ));
                }
            }
            (None, None) => *fails.entry("NoOutcome".into()).or_default() += 1,
        }
    }
    let failed = n - ok;
    let fail_text = if fails.is_empty() {
        "none".to_string()
    } else {
        fails
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "recovery storm: {n} clients reconnected at once (connect + recovering subscribe, offset {} epoch {} on {}), \
         last connect() issued at {t_launch:.3} s; {} in {:.3} s; ok {ok}, failed {failed} ({fail_text}); \
         retries {}; pushes after the replies {extra_pushes} (expected 0), unexpected lines {}, closed by server {closed}",
        positions[0].2,
        positions[0].3,
        channels[0],
        if all && ok == n {
            format!("every client recovered all {missed} missed publications")
        } else if all {
            "every client had its reply (NOT all recovered)".to_string()
        } else {
            "NOT every client had its reply".to_string()
        },
        t_all.as_secs_f64(),
        st.retries,
        st.unexpected
    );
    if let Some(f) = &first_fail {
        println!("# first failure: {f}");
    }
    if let Some(u) = &st.first_unexpected {
        println!("# first unexpected line: {u}");
    }
    println!(
        "recovery latency: burst start -> verified recovered reply p50 {} p99 {} max {}; \
         per client (its own connect() -> reply) p50 {} p99 {} max {} ({} clients)",
        fmt_ns(h_burst.quantile(0.50)),
        fmt_ns(h_burst.quantile(0.99)),
        fmt_ns(h_burst.max),
        fmt_ns(h_own.quantile(0.50)),
        fmt_ns(h_own.quantile(0.99)),
        fmt_ns(h_own.max),
        h_own.n
    );

    (failed, extra_pushes, closed)
}

/// The Redis command lines and the nodes' counters; returns whether the stream-read target
/// (one per channel per node) was met.
fn report_redis_and_nodes(run: &Run, sr: &StormRun, positions: &[Position]) -> bool {
    let (n, n_nodes, n_chan) = (run.n, run.n_nodes, run.n_chan);
    let StormRun {
        before,
        after,
        t_all,
        ..
    } = sr;
    // Redis commands over the storm (INFO itself excluded).
    let mut delta: Vec<(String, u64)> = after
        .cmds
        .iter()
        .map(|(k, v)| (k.clone(), v - before.cmds.get(k).copied().unwrap_or(0)))
        .filter(|(k, v)| *v > 0 && k != "info")
        .collect();
    delta.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let d = |k: &str| delta.iter().find(|x| x.0 == k).map_or(0, |x| x.1);
    let total: u64 = delta.iter().map(|x| x.1).sum();
    let (evalsha, xrange, xrevrange) = (d("evalsha"), d("xrange"), d("xrevrange"));
    println!(
        "recovery redis: over the storm ({:.2} s incl. the quiet window): EVALSHA {evalsha}, XRANGE {xrange} + XREVRANGE {xrevrange} (run inside the read script), \
         {total} commands in all (INFO excluded) = {:.4} commands per recovering client ({:.4} EVALSHA, {:.4} XRANGE per client)",
        t_all.as_secs_f64() + 0.3,
        total as f64 / n as f64,
        evalsha as f64 / n as f64,
        xrange as f64 / n as f64
    );
    println!(
        "# redis command breakdown (Δcalls): {} (lease refreshes are set to every 300 s, so none should be in here ({} ZADD); the snapshots' /api/info registry reads are outside the window)",
        delta
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        d("zadd")
    );
    let cd = |k: &str| -> Vec<u64> {
        (0..n_nodes)
            .map(|j| counter(&after.nodes[j], k).saturating_sub(counter(&before.nodes[j], k)))
            .collect()
    };
    let fmt_nodes = |v: &[u64]| node_text(&v.iter().map(|x| x.to_string()).collect::<Vec<_>>());
    let reads = cd("stream_reads");
    // Channels with recovering clients on each node: the target is one read each.
    let node_chans: Vec<u64> = (0..n_nodes)
        .map(|k| {
            let mut seen = vec![false; n_chan];
            for p in positions.iter().filter(|p| p.0 == k) {
                seen[p.1] = true;
            }
            seen.iter().filter(|&&x| x).count() as u64
        })
        .collect();
    let target_met = reads.iter().zip(&node_chans).all(|(r, c)| r <= c);
    println!(
        "recovery nodes: stream_reads Δ {} (target: one per channel per node = {}: {}); \
         recoveries_from_cache Δ {}; recoveries Δ {} (shards' counter, sum {}); recoveries_failed Δ {}; \
         repaired_publications Δ {}; insufficient_state Δ {}",
        fmt_nodes(&reads),
        fmt_nodes(&node_chans),
        if target_met { "met" } else { "MISSED" },
        fmt_nodes(&cd("recoveries_from_cache")),
        fmt_nodes(&cd("recoveries")),
        cd("recoveries").iter().sum::<u64>(),
        fmt_nodes(&cd("recoveries_failed")),
        fmt_nodes(&cd("repaired_publications")),
        fmt_nodes(&cd("insufficient_state")),
    );
    target_met
}

/// The CPU line and the machine note.
fn report_cpu(run: &Run, sr: &StormRun) {
    let (n, n_nodes, ncpu, shards, missed) = (run.n, run.n_nodes, run.ncpu, run.shards, run.missed);
    let StormRun {
        before,
        after,
        storm_wall,
        ..
    } = sr;
    let node_cpu: Vec<f64> = (0..n_nodes)
        .map(|j| after.node_cpu[j] - before.node_cpu[j])
        .collect();
    let node_sched: Vec<f64> = (0..n_nodes)
        .map(|j| (after.node_sched[j] - before.node_sched[j]) as f64 / 1e9)
        .collect();
    let redis_sched = (after.redis_sched - before.redis_sched) as f64 / 1e9;
    println!(
        "recovery cpu: nodes {} s utime+stime (schedstat {} s) = {:.1} µs per recovering client; redis-server {:.3} s (schedstat) = {:.2} µs per client; \
         bench client {:.3} s = {:.1} µs per client (wall {:.2} s incl. snapshots and 0.3 s quiet window)",
        node_text(&node_cpu.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>()),
        node_text(&node_sched.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>()),
        node_sched.iter().sum::<f64>() / n as f64 * 1e6,
        redis_sched,
        redis_sched / n as f64 * 1e6,
        after.self_cpu - before.self_cpu,
        (after.self_cpu - before.self_cpu) / n as f64 * 1e6,
        storm_wall
    );
    println!(
        "# machine: {ncpu} CPUs, everything on one box over loopback: redis-server, {n_nodes} node(s) x {shards} shard(s) \
         (executors pinned from core 0, each node's Redis multiplexer on a spare core if any) and this single-threaded \
         epoll client (unpinned) share the cores, so times are pessimistic and include the client's own work \
         (JSON-parsing {n} replies of {missed} publications); the Redis command and stream-read counts do not depend on the machine"
    );
}
