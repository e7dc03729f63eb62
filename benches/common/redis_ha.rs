//! Highly available Redis set-ups for the cluster bench, each on ephemeral loopback ports and
//! torn down by PID: a Sentinel set (1 master, 1 replica, 3 sentinels) and a Redis Cluster made
//! by `redis-cli --cluster create`. Every process dies with the bench (PR_SET_PDEATHSIG through
//! `child_setup`) and is killed and reaped on drop; the redis-servers are also in the shared
//! registry that the safety nets empty. Runs on the bench's main thread; blocking.

use super::process;
use super::safety::fatal;
use super::server::{child_setup, scratch_dir};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Name of the master the sentinels monitor.
pub const SENTINEL_MASTER: &str = "benchmaster";

/// Numbers the working directories of this bench's processes.
static SEQ: AtomicUsize = AtomicUsize::new(0);

/// This run's directory for the processes' files (config, nodes.conf, logs).
fn run_dir() -> PathBuf {
    scratch_dir().join(format!("redis-ha-{}", std::process::id()))
}

/// Removes this run's files; call once every process of the run is gone. After a fatal
/// exit they stay, for their logs.
pub fn remove_files() {
    let _ = std::fs::remove_dir_all(run_dir());
}

/// A fresh directory under [`run_dir`], for one process's files.
fn own_dir(what: &str) -> PathBuf {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let dir = run_dir().join(format!("{what}-{n}"));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        fatal(&format!("cannot create {}: {e}", dir.display()));
    }
    dir
}

/// `redis-cli -p port args...`: its output lines (empty when it fails). Bounded by redis-cli's
/// own connect timeout on loopback, and by the bench's deadline.
pub fn redis_cli(port: u16, args: &[&str]) -> Vec<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
        Err(e) => fatal(&format!("cannot run redis-cli: {e}")),
    }
}

/// Whether the Redis on `port` answers `ROLE` as a master.
pub fn is_master(port: u16) -> bool {
    redis_cli(port, &["ROLE"]).first().map(String::as_str) == Some("master")
}

/// Whether the Redis on `port` is a master, or a replica whose link to its master is up.
fn in_sync(port: u16) -> bool {
    let info = redis_cli(port, &["INFO", "replication"]);
    let has = |l: &str| info.iter().any(|x| x.trim() == l);
    has("role:master") || has("master_link_status:up")
}

/// A redis-server with `extra` arguments in its own directory, logging there.
pub fn redis_with(what: &str, extra: Vec<String>) -> process::Redis {
    let dir = own_dir(what);
    let log = dir.join("redis.log");
    let opts = process::RedisOptions {
        bin: std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_string()),
        extra,
        log: Some(log.clone()),
        dir: Some(dir),
        prepare: child_setup,
        ready_within: Duration::from_secs(10),
        attempts: 3,
    };
    process::Redis::launch(opts).unwrap_or_else(|e| fatal(&format!("{e}; log {}", log.display())))
}

/// A `redis-server --sentinel` from a config file in its own directory; killed and reaped on
/// drop (and with the bench, by PR_SET_PDEATHSIG).
pub struct Sentinel {
    pub port: u16,
    child: Child,
}

impl Sentinel {
    /// Monitors the master at 127.0.0.1:`master_port` with a quorum of 2, down after 1 s,
    /// failover timeout 3 s; waits (up to 10 s) until it answers PING.
    pub fn start(master_port: u16) -> Sentinel {
        let dir = own_dir("sentinel");
        let port = process::free_port().unwrap_or_else(|e| fatal(&format!("no free port: {e}")));
        let conf = dir.join("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndir {}\n\
             sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
             sentinel failover-timeout {SENTINEL_MASTER} 3000\n",
            dir.display()
        );
        if let Err(e) = std::fs::write(&conf, text) {
            fatal(&format!("cannot write {}: {e}", conf.display()));
        }
        let log = std::fs::File::create(dir.join("sentinel.log")).ok();
        let mut cmd = Command::new("redis-server");
        cmd.arg(&conf).arg("--sentinel").stdin(Stdio::null());
        match log.and_then(|f| Some((f.try_clone().ok()?, f))) {
            Some((out, err)) => cmd.stdout(out).stderr(err),
            None => cmd.stdout(Stdio::null()).stderr(Stdio::null()),
        };
        child_setup(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| fatal(&format!("cannot start redis-server --sentinel: {e}")));
        let s = Sentinel { port, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis_cli(port, &["PING"]).first().map(String::as_str) != Some("PONG") {
            if Instant::now() > deadline {
                fatal(&format!(
                    "sentinel on port {port} did not answer PING in 10 s; see {}",
                    dir.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// A numeric field of `SENTINEL master NAME` (0 when absent).
    pub fn master_field(&self, key: &str) -> u64 {
        let lines = redis_cli(self.port, &["SENTINEL", "master", SENTINEL_MASTER]);
        lines
            .iter()
            .position(|l| l == key)
            .and_then(|i| lines.get(i + 1))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 1 master, 1 replica, 3 sentinels that know each other and the replica.
pub struct SentinelSet {
    pub master: process::Redis,
    pub replica: process::Redis,
    pub sentinels: Vec<Sentinel>,
}

impl SentinelSet {
    /// Starts the set and waits (up to 20 s) until every sentinel sees 2 others and 1 replica,
    /// so that a failover can be agreed on as soon as the master dies.
    pub fn start() -> SentinelSet {
        let quick_sync = || vec!["--repl-diskless-sync-delay".to_string(), "0".into()];
        let master = redis_with("master", quick_sync());
        let mut args = quick_sync();
        args.extend([
            "--replicaof".into(),
            "127.0.0.1".into(),
            master.port.to_string(),
        ]);
        let replica = redis_with("replica", args);
        let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(master.port)).collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !in_sync(replica.port)
            || !sentinels.iter().all(|s| {
                s.master_field("num-other-sentinels") == 2 && s.master_field("num-slaves") == 1
            })
        {
            if Instant::now() > deadline {
                fatal("the replica did not sync or the sentinels did not see each other and the replica within 20 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        SentinelSet {
            master,
            replica,
            sentinels,
        }
    }

    /// The value of `--redis-sentinel`.
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}", s.port))
            .collect();
        urls.join(",")
    }
}

/// The hash slot of a shardcast channel: its Redis keys carry the channel as hash tag
/// (`shardcast:ch:{<channel>}`), so the slot is CRC16 (XMODEM) of the channel name mod 16384
/// (the Redis Cluster spec: "123456789" is in slot 12739). The bench checks it against
/// `CLUSTER KEYSLOT` once per cluster.
pub fn slot_of_channel(channel: &str) -> u16 {
    let mut crc: u16 = 0;
    for &b in channel.as_bytes() {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// One master of the cluster as `CLUSTER NODES` shows it.
#[derive(Debug, Clone)]
pub struct ClusterMaster {
    pub port: u16,
    /// Slot ranges, inclusive.
    pub slots: Vec<(u16, u16)>,
}

impl ClusterMaster {
    pub fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

/// A Redis Cluster of `masters` masters with `replicas` replicas each, made by
/// `redis-cli --cluster create`, node timeout 1 s.
pub struct RedisCluster {
    pub nodes: Vec<process::Redis>,
}

impl RedisCluster {
    /// Starts the nodes (with `extra` server arguments), creates the cluster and waits (up to
    /// 30 s) until every node reports `cluster_state:ok`, sees every master and every replica
    /// is in sync.
    pub fn start(masters: usize, replicas: usize, extra: &[String]) -> RedisCluster {
        let nodes: Vec<process::Redis> = (0..masters * (1 + replicas))
            .map(|_| {
                redis_with(
                    "cluster",
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1000",
                        // Replicas sync at once: one that never synced does not fail over.
                        "--repl-diskless-sync-delay",
                        "0",
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .chain(extra.iter().cloned())
                    .collect(),
                )
            })
            .collect();
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for n in &nodes {
            cmd.arg(format!("127.0.0.1:{}", n.port));
        }
        cmd.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        child_setup(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| fatal(&format!("cannot run redis-cli --cluster create: {e}")));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(st)) if st.success() => break,
                Ok(Some(st)) => fatal(&format!("redis-cli --cluster create failed: {st}")),
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    fatal("redis-cli --cluster create did not finish within 30 s");
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => fatal(&format!("waiting for redis-cli: {e}")),
            }
        }
        let c = RedisCluster { nodes };
        let ok = |c: &RedisCluster| {
            c.nodes.iter().all(|n| {
                redis_cli(n.port, &["CLUSTER", "INFO"])
                    .iter()
                    .any(|l| l.trim() == "cluster_state:ok")
                    && c.masters_seen_by(n.port).len() == masters
                    && in_sync(n.port)
            })
        };
        while !ok(&c) {
            if Instant::now() > deadline {
                fatal("the cluster did not reach cluster_state:ok with every replica in sync on every node within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    /// The value of `--redis-cluster`: every node as a seed.
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect();
        urls.join(",")
    }

    /// The masters with slots, as node `port` sees them (not failed).
    pub fn masters_seen_by(&self, port: u16) -> Vec<ClusterMaster> {
        redis_cli(port, &["CLUSTER", "NODES"])
            .iter()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let flags = *f.get(2)?;
                if !flags.contains("master") || flags.contains("fail") {
                    return None;
                }
                let addr = f.get(1)?.split('@').next()?;
                let port = addr.rsplit(':').next()?.parse().ok()?;
                let slots: Vec<(u16, u16)> = f
                    .iter()
                    .skip(8)
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|s| match s.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => {
                            let x = s.parse().ok()?;
                            Some((x, x))
                        }
                    })
                    .collect();
                (!slots.is_empty()).then_some(ClusterMaster { port, slots })
            })
            .collect()
    }

    /// The port of a replica of the master on `master_port`, as that master sees it.
    pub fn replica_of(&self, master_port: u16) -> Option<u16> {
        let lines = redis_cli(master_port, &["CLUSTER", "NODES"]);
        let fields: Vec<Vec<&str>> = lines.iter().map(|l| l.split_whitespace().collect()).collect();
        let port_of = |f: &[&str]| -> Option<u16> {
            f.get(1)?.split('@').next()?.rsplit(':').next()?.parse().ok()
        };
        let id = fields.iter().find(|f| port_of(f) == Some(master_port))?[0];
        fields
            .iter()
            .find(|f| f.get(2).is_some_and(|fl| fl.contains("slave")) && f.get(3) == Some(&id))
            .and_then(|f| port_of(f))
    }

    /// The masters as the first live node sees them.
    pub fn masters(&mut self) -> Vec<ClusterMaster> {
        let port = self
            .nodes
            .iter_mut()
            .find_map(|n| n.alive().then_some(n.port))
            .unwrap_or_else(|| fatal("no cluster node alive"));
        self.masters_seen_by(port)
    }

    /// The node on `port`.
    pub fn node_mut(&mut self, port: u16) -> &mut process::Redis {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| fatal(&format!("no cluster node on port {port}")))
    }
}
