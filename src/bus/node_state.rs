//! What every thread of a node reads about the node: its identity, a few atomics (connections,
//! draining, the Redis link), the shards' once-a-second snapshots and the cluster view.
//!
//! Written by the node at start (identity), by the shards (connection count, snapshots), by the
//! multiplexer (Redis link, cluster) and read by the HTTP API, the metrics thread and the node's
//! drain. Everything is an atomic or behind a short `Mutex` taken once a second at most: never on
//! a per-message path, never held across anything that blocks.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// Node-wide facts every shard reads (set once at start, plus a few atomics).
#[derive(Debug)]
pub struct NodeInfo {
    /// Unique id of this node process.
    pub uid: String,
    pub name: String,
    /// Address clients reach this node at (the bound listener).
    pub address: String,
    pub started: Instant,
    /// WebSocket connections open on the node (for `limits.max_connections`).
    pub connections: AtomicUsize,
    /// Random prefix of client ids, so they are unique across nodes.
    pub nonce: u64,
    /// Set when the node drains: `/healthz` answers 503.
    pub draining: AtomicBool,
    /// The Redis link, as the multiplexer last saw it.
    pub redis_state: RedisLinkState,
    /// Times the Redis link was re-established.
    pub redis_reconnects: AtomicU64,
    /// Times the node moved to another Redis master: under Sentinel, it followed
    /// `+switch-master` or found a new master when it reconnected.
    pub redis_failovers: AtomicU64,
    /// Redis Cluster: the masters (`host:port`) of the last topology applied; `None` in the
    /// other modes (then `/api/info` shows no `mode`/`masters`).
    pub redis_masters: Mutex<Option<Vec<String>>>,
    /// Draining: the node's registry entry is gone (Redis confirmed, or there is none).
    pub left_registry: AtomicBool,
    /// Counters of the queues between shards and broker.
    pub bus: Arc<super::BusStats>,
    /// Each shard's figures as of its last tick (read by the metrics listener).
    pub shard_snapshots: Vec<Mutex<ShardSnapshot>>,
    /// RSS right after start-up, bytes (for bytes per connection).
    pub rss_baseline: AtomicU64,
    /// The cluster's registry entries as of the multiplexer's last lease refresh.
    pub cluster: Mutex<Vec<serde_json::Value>>,
    /// Until this many ms after `started`, a node missing from `cluster` may still be
    /// re-registering (the Redis link came back less than one lease refresh ago).
    pub cluster_settles_ms: AtomicU64,
    /// Where the metrics listener is, once bound.
    pub metrics_addr: OnceLock<String>,
    /// A receiving handle on the shards → broker queue, for its depth only (unlike a sender, it
    /// does not keep the queue open: the broker ends when the last shard's sender is gone).
    pub broker_queue: OnceLock<crossbeam_channel::Receiver<super::ToBroker>>,
    /// CPU use between readings, for `info`'s `process` (see [`super::process`]).
    pub cpu: super::process::CpuSampler,
}

impl NodeInfo {
    /// A node's identity; counters start at zero.
    pub fn new(uid: String, name: String, address: String, nonce: u64) -> NodeInfo {
        NodeInfo {
            uid,
            name,
            address,
            started: Instant::now(),
            connections: AtomicUsize::new(0),
            nonce,
            draining: AtomicBool::new(false),
            redis_state: RedisLinkState::default(),
            redis_reconnects: Default::default(),
            redis_failovers: Default::default(),
            redis_masters: Mutex::new(None),
            left_registry: AtomicBool::new(false),
            bus: Arc::default(),
            shard_snapshots: Vec::new(),
            rss_baseline: Default::default(),
            cluster: Default::default(),
            cluster_settles_ms: Default::default(),
            metrics_addr: Default::default(),
            broker_queue: Default::default(),
            cpu: Default::default(),
        }
    }

    /// Milliseconds since the node started.
    pub fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Whether `uid` may be a live node: it is in the registry as last read, nothing was read
    /// yet, or the Redis link came back too recently for every node to have re-registered.
    pub fn may_be_live(&self, uid: &str) -> bool {
        if self.uptime_ms() < self.cluster_settles_ms.load(Ordering::Relaxed) {
            return true;
        }
        self.cluster
            .lock()
            .map(|nodes| nodes.is_empty() || nodes.iter().any(|n| n["uid"] == uid))
            .unwrap_or(false)
    }

    /// Room for `n` shards' snapshots.
    pub fn with_shards(mut self, n: usize) -> NodeInfo {
        self.shard_snapshots = (0..n).map(|_| Default::default()).collect();
        self
    }

    /// The Redis link as `/api/info` shows it.
    pub fn redis_link_json(&self) -> serde_json::Value {
        let state = match self.redis_state.get() {
            RedisLink::Standalone => return serde_json::Value::Null,
            RedisLink::Connected => "connected",
            RedisLink::Down => "down",
        };
        let mut v = serde_json::json!({
            "state": state,
            "reconnects": self.redis_reconnects.load(Ordering::Relaxed),
            "failovers": self.redis_failovers.load(Ordering::Relaxed),
        });
        if let Ok(m) = self.redis_masters.lock() {
            if let Some(masters) = m.as_ref() {
                v["mode"] = "cluster".into();
                v["masters"] = masters.clone().into();
            }
        }
        v
    }
}

/// What one shard published at its last tick.
#[derive(Debug, Default, Clone)]
pub struct ShardSnapshot {
    pub connections: u64,
    pub subscriptions: u64,
    pub channels: u64,
    /// Messages waiting in the shard's broker inbox.
    pub inbox_depth: u64,
    pub counters: Vec<(&'static str, u64)>,
    /// The shard's backend calls (`backend::ProxyStats::snapshot`).
    pub proxy: ProxySnapshot,
}

/// One shard's backend-call figures as of its last tick.
#[derive(Debug, Default, Clone)]
pub struct ProxySnapshot {
    /// Calls refused by `proxy.max_in_flight`.
    pub overloaded: u64,
    /// One entry per proxy kind (connect, refresh, ..., jwks).
    pub kinds: Vec<ProxyKindSnapshot>,
}

/// One proxy kind's latency histogram and error counters on one shard.
#[derive(Debug, Default, Clone)]
pub struct ProxyKindSnapshot {
    /// The `kind` label (`connect`, `sub_refresh`, `jwks`, ...).
    pub kind: &'static str,
    /// Upper bounds of the latency buckets, seconds.
    pub bounds_secs: &'static [f64],
    /// Calls per bucket, not cumulative: one entry per bound, then the calls above the last.
    pub buckets: Vec<u64>,
    /// Sum of the calls' latencies, seconds.
    pub sum_secs: f64,
    /// (error class label, count): `timeout`, `connect`, `tls`, `status`, `too_large`, `http`.
    pub errors: Vec<(&'static str, u64)>,
}

/// The node's link to Redis. The numbers are what the `redis_link_state` gauge shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum RedisLink {
    /// No link: standalone mode, or Redis mode before the multiplexer's first attempt.
    #[default]
    Standalone = 0,
    /// The multiplexer's connections are up.
    Connected = 1,
    /// The link is down; the multiplexer is reconnecting.
    Down = 2,
}

impl RedisLink {
    fn from_u8(v: u8) -> RedisLink {
        match v {
            0 => RedisLink::Standalone,
            1 => RedisLink::Connected,
            _ => RedisLink::Down,
        }
    }
}

/// A [`RedisLink`] shared between threads (one byte, relaxed: it is a status, ordering nothing).
#[derive(Debug, Default)]
pub struct RedisLinkState(AtomicU8);

impl RedisLinkState {
    pub fn get(&self) -> RedisLink {
        RedisLink::from_u8(self.0.load(Ordering::Relaxed))
    }

    pub fn set(&self, link: RedisLink) {
        self.0.store(link as u8, Ordering::Relaxed);
    }
}

/// The figures a node-info entry reports; each caller counts them its own way (the API from a
/// fresh gather, the registry lease from the multiplexer's gather, the status page from the
/// shards' last snapshots).
#[derive(Debug, Default, Clone)]
pub struct NodeCounts {
    /// Connections held.
    pub clients: u64,
    /// Distinct users; `None` when the caller does not count them (`num_users` is left out).
    pub users: Option<u64>,
    /// Subscriptions (connection x channel).
    pub subs: u64,
    /// Channels with subscribers.
    pub channels: u64,
    /// Shard counters summed over the shards. When given, the entry also carries the broker's
    /// counters (`counters`) and gauges (`gauges`): the detail `/api/info` shows for the node
    /// that answers.
    pub counters: Option<Vec<(&'static str, u64)>>,
}

impl NodeInfo {
    /// This node as one entry of `/api/info`'s `nodes`, of the Redis node registry (lease) and
    /// of `/status.json`'s `node`: the one place that names a node's fields.
    ///
    /// First Centrifugo's node fields, with its names and types (`uid`, `name`, `version`,
    /// `num_clients`, `num_users`, `num_subs`, `num_channels`, `uptime` in seconds), so that
    /// its API clients decode them; then ours, none of which reuses a name Centrifugo gives a
    /// node field (its `metrics` and `process` are objects, so ours are `metrics_listen` and
    /// so on): `address`, `shards`, `broker`, `redis` (link state, `null` standalone),
    /// `metrics_listen` (`null` when off), `draining`, and with `counts.counters` also
    /// `counters` and `gauges`.
    pub fn info_entry(&self, redis_mode: bool, counts: NodeCounts) -> serde_json::Value {
        use serde_json::{json, Map, Value};
        let mut e = Map::new();
        e.insert("uid".into(), json!(self.uid));
        e.insert("name".into(), json!(self.name));
        e.insert("version".into(), json!(crate::VERSION));
        e.insert("num_clients".into(), json!(counts.clients));
        if let Some(users) = counts.users {
            e.insert("num_users".into(), json!(users));
        }
        e.insert("num_subs".into(), json!(counts.subs));
        e.insert("num_channels".into(), json!(counts.channels));
        e.insert("uptime".into(), json!(self.started.elapsed().as_secs()));
        // Centrifugo's `process` object: CPU percent and RSS bytes of this node's process.
        if let Some(p) = self.cpu.stats() {
            e.insert("process".into(), json!(p));
        }
        e.insert("address".into(), json!(self.address));
        e.insert("shards".into(), json!(self.shard_snapshots.len()));
        let broker = if redis_mode { "redis" } else { "memory" };
        e.insert("broker".into(), json!(broker));
        e.insert("redis".into(), self.redis_link_json());
        e.insert("metrics_listen".into(), json!(self.metrics_addr.get()));
        e.insert(
            "draining".into(),
            json!(self.draining.load(Ordering::Relaxed)),
        );
        if let Some(counters) = counts.counters {
            let counters: Map<String, Value> = counters
                .into_iter()
                .chain(self.bus.counters())
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            e.insert("counters".into(), Value::Object(counters));
            let gauges: Map<String, Value> = self
                .bus
                .gauges()
                .into_iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            e.insert("gauges".into(), Value::Object(gauges));
        }
        Value::Object(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_link_round_trips_and_shows_in_info() {
        let node = NodeInfo::new("u".into(), "n".into(), "a".into(), 1);
        assert_eq!(node.redis_state.get(), RedisLink::Standalone);
        assert!(node.redis_link_json().is_null());
        node.redis_state.set(RedisLink::Down);
        assert_eq!(node.redis_link_json()["state"], "down");
        node.redis_state.set(RedisLink::Connected);
        assert_eq!(node.redis_state.get(), RedisLink::Connected);
        assert_eq!(node.redis_link_json()["state"], "connected");
        assert_eq!(RedisLink::Down as u8, 2, "the gauge's documented value");
    }
}
