//! A shard: one glommio executor on one core, owning its listener, its connections, its channel
//! index, its timer wheel and its broker inbox. Inside, everything is `Rc`/`RefCell`; nothing is
//! shared with other shards except the messages of [`crate::bus`].
//!
//! Tasks of a shard: the accept loop, one task per connection while it is in its HTTP phase
//! (request head, API call, upgrade), the I/O loop that services upgraded WebSocket sockets from
//! the shard's epoll set ([`poller`]), the broker inbox, and the one-second sweep (timer wheel,
//! drain). The I/O loop and the inbox are woken through a socketpair byte at most once per
//! batch. None of them blocks, and no `RefCell` borrow is held across an `.await`.

pub mod connection;
pub mod index;
pub mod poller;
pub mod timer;

use crate::bus::BrokerTx;
use crate::bus::{
    BrokerError, BrokerReply, HistoryQuery, Part, PositionAnswer, Query, ReplyTo, ShardCommand,
    ShardId, ShardInbox, StreamPos, ToBroker, ToShard,
};
use crate::config::{Config, InsufficientAction};
use crate::conn::session::{
    Ack, ChanId, ClientId, Deferred, Host, Identity, Recovery, Refusal, SubExpiries,
};
use crate::conn::ConnKey;
use crate::protocol::reply::{self, ClientInfo, PresenceStats};
use crate::protocol::token::TokenVerifier;
use crate::protocol::{Disconnect, ErrorCode};
use crate::ws::{self, FrameBuf, OP_TEXT};
use connection::Connection;
use crossbeam_channel::TrySendError;
use futures_lite::AsyncReadExt;
use glommio::channels::local_channel::{self, LocalSender};
use glommio::net::TcpListener;
use index::{Added, ChannelIndex, Waiting, Want};
use serde_json::value::RawValue;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use timer::TimerWheel;

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
    /// Redis link: 0 = standalone, 1 = connected, 2 = down (set by the multiplexer).
    pub redis_state: std::sync::atomic::AtomicU8,
    /// Times the Redis link was re-established.
    pub redis_reconnects: std::sync::atomic::AtomicU64,
    /// Draining: the node's registry entry is gone (Redis confirmed, or there is none).
    pub left_registry: AtomicBool,
    /// Counters of the queues between shards and broker.
    pub bus: Arc<crate::bus::BusStats>,
    /// Each shard's figures as of its last tick (read by the metrics listener).
    pub shard_snapshots: Vec<std::sync::Mutex<crate::metrics::ShardSnapshot>>,
    /// RSS right after start-up, bytes (for bytes per connection).
    pub rss_baseline: std::sync::atomic::AtomicU64,
    /// The cluster's registry entries as of the multiplexer's last lease refresh.
    pub cluster: std::sync::Mutex<Vec<serde_json::Value>>,
    /// Where the metrics listener is, once bound.
    pub metrics_addr: std::sync::OnceLock<String>,
    /// The shards → broker queue, for its depth.
    pub broker_queue: std::sync::OnceLock<crate::bus::BrokerTx>,
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
            redis_state: Default::default(),
            redis_reconnects: Default::default(),
            left_registry: AtomicBool::new(false),
            bus: Arc::default(),
            shard_snapshots: Vec::new(),
            rss_baseline: Default::default(),
            cluster: Default::default(),
            metrics_addr: Default::default(),
            broker_queue: Default::default(),
        }
    }

    /// Room for `n` shards' snapshots.
    pub fn with_shards(mut self, n: usize) -> NodeInfo {
        self.shard_snapshots = (0..n).map(|_| Default::default()).collect();
        self
    }

    /// The Redis link as `/api/info` shows it.
    pub fn redis_link_json(&self) -> serde_json::Value {
        let state = match self.redis_state.load(Ordering::Relaxed) {
            0 => return serde_json::Value::Null,
            1 => "connected",
            _ => "down",
        };
        serde_json::json!({
            "state": state,
            "reconnects": self.redis_reconnects.load(Ordering::Relaxed),
        })
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
        e.insert("version".into(), json!(crate::conn::session::VERSION));
        e.insert("num_clients".into(), json!(counts.clients));
        if let Some(users) = counts.users {
            e.insert("num_users".into(), json!(users));
        }
        e.insert("num_subs".into(), json!(counts.subs));
        e.insert("num_channels".into(), json!(counts.channels));
        e.insert("uptime".into(), json!(self.started.elapsed().as_secs()));
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

/// Per-shard counters (plain cells: one thread).
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: Cell<u64>,
    pub ws_opened: Cell<u64>,
    pub http_requests: Cell<u64>,
    /// Connections closed because their outbox passed `limits.max_outbox_bytes`.
    pub slow_disconnects: Cell<u64>,
    /// Connections closed for not answering pings.
    pub no_pong_disconnects: Cell<u64>,
    /// WebSocket protocol violations (closed with 1002/1007/1009).
    pub protocol_violations: Cell<u64>,
    /// Upgrades refused with 503 because the node was full.
    pub refused_full: Cell<u64>,
    /// Commands refused because the broker queue was full.
    pub broker_queue_full: Cell<u64>,
    /// Frames queued to connections by fan-out.
    pub deliveries: Cell<u64>,
    /// Commands refused by the per-connection rate limit (error 111).
    pub rate_limited: Cell<u64>,
    /// Subscribes refused by `limits.max_channels_per_connection` (error 106).
    pub channel_limit_refusals: Cell<u64>,
    /// Subscribes refused by `limits.max_channel_name_bytes` (error 107).
    pub channel_name_refusals: Cell<u64>,
    /// WebSocket messages received from clients.
    pub messages_in: Cell<u64>,
    /// Bytes written to WebSocket clients.
    pub bytes_out: Cell<u64>,
    /// send(2) calls to WebSocket clients (each carries every frame queued at the time).
    pub writes: Cell<u64>,
    /// Subscribes that recovered everything the client missed.
    pub recoveries: Cell<u64>,
    /// Subscribes that asked to recover and could not (`recovered: false` or error 112).
    pub recoveries_failed: Cell<u64>,
    /// Subscribers told to recover (unsubscribe 2500, or close 3010 with
    /// `insufficient_state = "disconnect"`).
    pub insufficient_unsubscribes: Cell<u64>,
    /// HTTP requests cut with 408: head and body not complete within
    /// `limits.handshake_timeout_secs`.
    pub request_timeouts: Cell<u64>,
    /// WebSocket upgrades refused with 403: an `Origin` neither the request's host nor in
    /// `allowed_origins`.
    pub origin_refusals: Cell<u64>,
    /// Subscriptions ended because their token expired without a `sub_refresh` (push 2501).
    pub sub_expired_unsubscribes: Cell<u64>,
}

impl Counters {
    /// Name → value, for `/api/info`.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("accepted", self.accepted.get()),
            ("ws_opened", self.ws_opened.get()),
            ("http_requests", self.http_requests.get()),
            ("slow_disconnects", self.slow_disconnects.get()),
            ("no_pong_disconnects", self.no_pong_disconnects.get()),
            ("protocol_violations", self.protocol_violations.get()),
            ("refused_full", self.refused_full.get()),
            ("broker_queue_full", self.broker_queue_full.get()),
            ("deliveries", self.deliveries.get()),
            ("rate_limited", self.rate_limited.get()),
            ("channel_limit_refusals", self.channel_limit_refusals.get()),
            ("channel_name_refusals", self.channel_name_refusals.get()),
            ("messages_in", self.messages_in.get()),
            ("bytes_out", self.bytes_out.get()),
            ("writes", self.writes.get()),
            ("recoveries", self.recoveries.get()),
            ("recoveries_failed", self.recoveries_failed.get()),
            (
                "insufficient_unsubscribes",
                self.insufficient_unsubscribes.get(),
            ),
            ("request_timeouts", self.request_timeouts.get()),
            ("origin_refusals", self.origin_refusals.get()),
            (
                "sub_expired_unsubscribes",
                self.sub_expired_unsubscribes.get(),
            ),
        ]
    }
}

fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

/// A connect reply waiting for the positions of its server-side subscriptions.
pub struct PendingConnect {
    id: u32,
    /// The serialised connect result, without `subs`.
    base: Vec<u8>,
    subs: std::collections::BTreeMap<String, (reply::SubscribeResult, Vec<bytes::Bytes>)>,
    waiting: u32,
}

/// Who waits for a broker answer.
enum Pending {
    /// A client command: reply to command `id` of connection `conn`.
    Client {
        conn: ConnKey,
        id: u32,
        kind: ClientWait,
    },
    /// An HTTP API request, awaiting on a local channel.
    Api(LocalSender<BrokerReply>),
}

#[derive(Clone, Copy)]
enum ClientWait {
    Publish,
    Gather(Deferred),
    History,
}

/// Connections of the shard, with generations so stale keys miss.
#[derive(Default)]
pub struct ConnTable {
    entries: Vec<(u32, Option<Rc<Connection>>)>,
    free: Vec<u32>,
    len: usize,
}

impl ConnTable {
    fn insert_with(&mut self, make: impl FnOnce(ConnKey) -> Rc<Connection>) -> Rc<Connection> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.entries.push((0, None));
                (self.entries.len() - 1) as u32
            }
        };
        let entry = &mut self.entries[slot as usize];
        let key = ConnKey {
            slot,
            generation: entry.0,
        };
        let conn = make(key);
        entry.1 = Some(conn.clone());
        self.len += 1;
        conn
    }

    pub fn get(&self, key: ConnKey) -> Option<&Rc<Connection>> {
        match self.entries.get(key.slot as usize) {
            Some((gen, Some(c))) if *gen == key.generation => Some(c),
            _ => None,
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(entry) = self.entries.get_mut(key.slot as usize) {
            if entry.0 == key.generation && entry.1.take().is_some() {
                entry.0 = entry.0.wrapping_add(1);
                self.free.push(key.slot);
                self.len -= 1;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn all(&self) -> Vec<Rc<Connection>> {
        self.entries.iter().filter_map(|(_, c)| c.clone()).collect()
    }
}

/// Size of the shard's shared read buffer: one read never holds more than this, bytes.
pub const SCRATCH_BYTES: usize = 64 * 1024;
/// Most bytes coalesced into one write (one syscall for many queued frames), bytes.
pub const CORK_BYTES: usize = 64 * 1024;

/// The shard's state, shared by its tasks through `Rc`.
pub struct Shard {
    pub id: ShardId,
    pub cfg: Arc<Config>,
    pub node: Arc<NodeInfo>,
    verifier: Option<TokenVerifier>,
    to_broker: BrokerTx,
    pub conns: RefCell<ConnTable>,
    pub index: RefCell<ChannelIndex>,
    pub wheel: RefCell<TimerWheel>,
    pending: RefCell<HashMap<u64, Pending>>,
    /// Must-deliver messages waiting for room in the broker queue (see `send_broker_must`).
    backlog: RefCell<std::collections::VecDeque<ToBroker>>,
    next_token: Cell<u64>,
    /// Shared read buffer (DESIGN §3: no per-connection read buffer).
    pub scratch: RefCell<Vec<u8>>,
    /// Shared write-coalescing buffer.
    pub cork: RefCell<Vec<u8>>,
    /// Connect replies waiting for server-side subscriptions' positions.
    pub connects: RefCell<HashMap<ConnKey, PendingConnect>>,
    /// Deadlines of subscriptions made with expiring tokens (only connections that have one).
    pub sub_expiries: RefCell<SubExpiries>,
    /// Connections per signed-in user (anonymous ones are not tracked: nothing targets them).
    users: RefCell<HashMap<Rc<str>, smallvec::SmallVec<[ConnKey; 1]>>>,
    /// The one shared name of every anonymous user.
    anonymous: Rc<str>,
    client_seq: Cell<u64>,
    pub counters: Counters,
    pub decoder: ws::Decoder,
    /// The epoll set of the shard's WebSocket sockets.
    pub poller: poller::Poller,
    /// Its relay's queue, until the I/O task takes it.
    ready: RefCell<Option<poller::ReadyInbox>>,
    /// Connections with frames queued since the last flush (flushed at the end of each batch).
    pub dirty: RefCell<Vec<ConnKey>>,
    /// Connections that may have more to read (their read budget ran out).
    pub again: RefCell<Vec<ConnKey>>,
    /// A handle on the broker inbox, to report its depth.
    inbox_probe: RefCell<Option<crossbeam_channel::Receiver<ToShard>>>,
    /// Redis mode: subscriptions wait for the broker's confirmation, presence and users are
    /// announced to the broker.
    redis_mode: bool,
    started: Instant,
}

impl Shard {
    pub fn new(
        id: ShardId,
        cfg: Arc<Config>,
        node: Arc<NodeInfo>,
        to_broker: BrokerTx,
        cpu: Option<usize>,
    ) -> Rc<Shard> {
        let (poller, ready) = poller::Poller::start(id, cpu, cfg.limits.shard_queue_capacity)
            .expect("cannot create the shard's epoll set");
        let verifier = TokenVerifier::from_config(&cfg);
        let redis_mode = cfg.redis.is_some();
        Rc::new(Shard {
            id,
            decoder: ws::Decoder {
                max_message_bytes: cfg.limits.max_message_bytes,
            },
            cfg,
            node,
            verifier,
            to_broker,
            conns: RefCell::default(),
            index: RefCell::default(),
            wheel: RefCell::default(),
            pending: RefCell::default(),
            backlog: RefCell::default(),
            next_token: Cell::new(1),
            scratch: RefCell::new(vec![0; SCRATCH_BYTES]),
            cork: RefCell::new(Vec::with_capacity(CORK_BYTES)),
            users: RefCell::default(),
            connects: RefCell::default(),
            sub_expiries: RefCell::default(),
            anonymous: Rc::from(""),
            client_seq: Cell::new(0),
            counters: Counters::default(),
            poller,
            ready: RefCell::new(Some(ready)),
            dirty: RefCell::default(),
            again: RefCell::default(),
            inbox_probe: RefCell::default(),
            redis_mode,
            started: Instant::now(),
        })
    }

    /// Publishes this shard's figures for the metrics listener (once a second: the hot path
    /// only bumps plain cells).
    fn publish_snapshot(&self) {
        let Some(slot) = self.node.shard_snapshots.get(self.id) else {
            return;
        };
        let index = self.index.borrow();
        let snap = crate::metrics::ShardSnapshot {
            connections: self.conns.borrow().len() as u64,
            subscriptions: index.subscriptions(),
            channels: index.len() as u64,
            inbox_depth: self
                .inbox_probe
                .borrow()
                .as_ref()
                .map(|r| r.len() as u64)
                .unwrap_or(0),
            counters: self.counters.snapshot(),
        };
        if let Ok(mut s) = slot.lock() {
            *s = snap;
        }
    }

    /// Writes out every connection that got frames during this batch.
    pub fn flush_dirty(&self) {
        loop {
            let dirty = std::mem::take(&mut *self.dirty.borrow_mut());
            if dirty.is_empty() {
                return;
            }
            for key in dirty {
                let conn = self.conns.borrow().get(key).cloned();
                if let Some(conn) = conn {
                    connection::flush(self, &conn);
                }
            }
        }
    }

    /// Milliseconds since the shard started (wraps after 49 days; compared with wrapping_sub).
    pub fn now_ms(&self) -> u32 {
        self.started.elapsed().as_millis() as u32
    }

    /// Seconds since the shard started (the timer wheel's clock).
    pub fn tick_now(&self) -> u32 {
        self.wheel.borrow().now()
    }

    fn token(&self) -> u64 {
        let t = self.next_token.get();
        self.next_token.set(t + 1);
        t
    }

    /// Sends to the broker without blocking; a full queue is counted and reported.
    ///
    /// While must-deliver messages wait in `backlog`, later messages may not overtake them (an
    /// overtaking Subscribe could be undone by an older Unsubscribe), so they are refused too.
    fn send_broker(&self, msg: ToBroker) -> Result<(), ErrorCode> {
        if !self.backlog.borrow().is_empty() {
            self.flush_backlog();
            if !self.backlog.borrow().is_empty() {
                bump(&self.counters.broker_queue_full);
                return Err(ErrorCode::Internal);
            }
        }
        match self.to_broker.try_send(msg) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                bump(&self.counters.broker_queue_full);
                Err(ErrorCode::Internal)
            }
            Err(TrySendError::Disconnected(_)) => Err(ErrorCode::Internal),
        }
    }

    /// Sends a message the broker must get (interest withdrawal, gather parts). A shard never
    /// blocks on the broker (the broker may be waiting on this shard's queue): when the queue is
    /// full the message waits in order in `backlog`, retried on every inbox drain and tick.
    fn send_broker_must(&self, msg: ToBroker) {
        let mut backlog = self.backlog.borrow_mut();
        if backlog.is_empty() {
            match self.to_broker.try_send(msg) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(m)) => {
                    bump(&self.counters.broker_queue_full);
                    backlog.push_back(m);
                }
            }
        } else {
            backlog.push_back(msg);
        }
    }

    /// Retries the must-deliver backlog in order.
    fn flush_backlog(&self) {
        let mut backlog = self.backlog.borrow_mut();
        while let Some(msg) = backlog.pop_front() {
            match self.to_broker.try_send(msg) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(m)) => {
                    backlog.push_front(m);
                    return;
                }
            }
        }
    }

    /// Queues a command for every shard of the node (through the broker).
    pub fn send_command(&self, cmd: ShardCommand) -> Result<(), ErrorCode> {
        self.send_broker(ToBroker::Command(cmd))
    }

    /// Sends a request to the broker and waits for its answer (HTTP API).
    pub async fn request(
        &self,
        make: impl FnOnce(ReplyTo) -> ToBroker,
    ) -> Result<BrokerReply, ErrorCode> {
        let token = self.token();
        let (tx, rx) = local_channel::new_bounded(1);
        self.pending.borrow_mut().insert(token, Pending::Api(tx));
        if let Err(e) = self.send_broker(make(ReplyTo {
            shard: self.id,
            token,
        })) {
            self.pending.borrow_mut().remove(&token);
            return Err(e);
        }
        match glommio::timer::timeout(Duration::from_secs(10), async { Ok(rx.recv().await) }).await
        {
            Ok(Some(reply)) => Ok(reply),
            _ => {
                self.pending.borrow_mut().remove(&token);
                Err(ErrorCode::Internal)
            }
        }
    }

    /// Applies one broker message.
    fn handle(&self, msg: ToShard) {
        match msg {
            ToShard::Publication {
                channel,
                frame,
                offset,
                epoch,
            } => {
                let mut index = self.index.borrow_mut();
                let Some(id) = index.id_of(&channel) else {
                    return;
                };
                let ch = index.get_mut(id).expect("interned");
                // Only once a position answer of this incarnation of the channel set it: until
                // then, publications may be left over from before the shard last left it.
                if let (Some(epoch), Some(_)) = (epoch, &ch.position) {
                    ch.position = Some(StreamPos { offset, epoch });
                }
                let conns = self.conns.borrow();
                for key in &ch.subscribers {
                    if let Some(c) = conns.get(*key) {
                        c.push(self, frame.clone());
                        bump(&self.counters.deliveries);
                    }
                }
            }
            ToShard::Collect { gather, query } => {
                let part = self.collect(&query);
                self.send_broker_must(ToBroker::Part { gather, part });
            }
            ToShard::Reply { token, reply } => {
                let Some(pending) = self.pending.borrow_mut().remove(&token) else {
                    return;
                };
                match pending {
                    Pending::Api(tx) => {
                        let _ = tx.try_send(reply);
                    }
                    Pending::Client { conn, id, kind } => self.reply_client(conn, id, kind, reply),
                }
            }
            ToShard::Command(cmd) => self.command(cmd),
            ToShard::SubscribeFailed { channel } => {
                self.fail_waiting(&channel, ErrorCode::Internal, |_| true);
            }
            ToShard::Subscribed { channel } => {
                let confirmed = {
                    let mut index = self.index.borrow_mut();
                    let Some(chan) = index.id_of(&channel) else {
                        return;
                    };
                    index.get_mut(chan).expect("interned").ready = true;
                    index.promote(chan, |w| w.want == Want::Confirm)
                };
                for w in confirmed {
                    let result = reply::SubscribeResult::default();
                    self.reply_subscribed(&w, &channel, &result, &[]);
                }
            }
            ToShard::Position {
                token,
                channel,
                answer,
            } => self.position_answer(token, &channel, answer),
            ToShard::Insufficient { channel } => self.insufficient(&channel),
        }
    }

    /// A connection left `channel` by the server's doing (failed subscribe, insufficient
    /// state, server unsubscribe): its presence entry goes too (Redis mode keeps presence in
    /// Redis; standalone reads it from the index).
    pub fn presence_left(&self, conn: &Connection, channel: &str) {
        if !self.redis_mode || !self.cfg.namespace_of(channel).is_some_and(|ns| ns.presence) {
            return;
        }
        if let Some(id) = conn.client_id() {
            self.send_broker_must(ToBroker::PresenceRemove {
                channel: Arc::from(channel),
                client: Arc::from(id.to_string()),
            });
        }
    }

    /// Sends a subscribe reply to a waiting subscriber that is now in.
    fn reply_subscribed(
        &self,
        w: &Waiting,
        channel: &str,
        result: &reply::SubscribeResult,
        pubs: &[bytes::Bytes],
    ) {
        if w.id == 0 {
            return;
        }
        // A subscription token's expiry, recorded by the session at subscribe.
        let exp = match self.sub_expiries.borrow().connections() {
            0 => 0,
            _ => (self.index.borrow().id_of(channel))
                .map_or(0, |chan| self.sub_expiries.borrow().get(w.key, chan)),
        };
        let expiring;
        let result = if exp > 0 {
            expiring = reply::SubscribeResult {
                expires: true,
                ttl: exp.saturating_sub(unix_now()).clamp(1, u32::MAX as u64) as u32,
                ..result.clone()
            };
            &expiring
        } else {
            result
        };
        let conn = self.conns.borrow().get(w.key).cloned();
        if let Some(conn) = conn {
            let len = 96 + pubs.iter().map(|p| p.len() + 1).sum::<usize>();
            let mut f = FrameBuf::with_capacity(len);
            reply::result_with_publications(f.payload(), w.id, "subscribe", result, pubs);
            conn.push(self, f.finish(OP_TEXT));
        }
    }

    /// Fails the waiting subscribers of `channel` that `pick` selects with `code`.
    fn fail_waiting(&self, channel: &str, code: ErrorCode, pick: impl Fn(&Waiting) -> bool) {
        let (chan, failed, emptied) = {
            let mut index = self.index.borrow_mut();
            let Some(chan) = index.id_of(channel) else {
                return;
            };
            let (failed, emptied) = index.fail(chan, pick);
            (chan, failed, emptied)
        };
        if let Some(name) = emptied {
            self.send_broker_must(ToBroker::Unsubscribe {
                shard: self.id,
                channel: Arc::from(&*name),
            });
        }
        for w in failed {
            let conn = self.conns.borrow().get(w.key).cloned();
            let Some(conn) = conn else {
                continue;
            };
            conn.drop_subscription(chan);
            self.presence_left(&conn, channel);
            if matches!(w.want, Want::Position { connect: true, .. }) {
                self.connect_failed(&conn);
            } else if w.id != 0 {
                let mut f = FrameBuf::with_capacity(96);
                reply::error(f.payload(), w.id, code, code == ErrorCode::Internal);
                conn.push(self, f.finish(OP_TEXT));
            }
        }
    }

    /// The broker's position answer for the subscriber waiting under `token`: it joins the
    /// channel now, so it gets every publication after `top` live, and the ones it missed in
    /// its reply.
    fn position_answer(
        &self,
        token: u64,
        channel: &str,
        answer: Result<PositionAnswer, BrokerError>,
    ) {
        let is_mine = |w: &Waiting| matches!(w.want, Want::Position { token: t, .. } if t == token);
        let a = match answer {
            Ok(a) => a,
            Err(_) => return self.fail_waiting(channel, ErrorCode::Internal, is_mine),
        };
        let waiter = {
            let mut index = self.index.borrow_mut();
            let Some(chan) = index.id_of(channel) else {
                return;
            };
            let ch = index.get_mut(chan).expect("interned");
            let Some(waiter) = ch.waiting.iter().find(|w| is_mine(w)).cloned() else {
                // The subscriber left meanwhile; the answer may even be for an earlier life of
                // the channel on this shard, so it says nothing about the current one.
                return;
            };
            // Exact: every publication up to `top` came before this answer on the queue, and
            // every later one comes after it.
            ch.position = Some(StreamPos {
                offset: a.top,
                epoch: a.epoch.clone(),
            });
            waiter
        };
        // A replay must fit the connection's write queue with room to spare, or the client
        // would be cut as slow and come back for the same replay: past half of it, the client
        // is told it could not recover (never a partial replay) and reloads instead.
        let replay: usize = a.pubs.iter().map(|p| p.len() + 1).sum();
        let a = if replay > self.cfg.limits.max_outbox_bytes / 2 {
            PositionAnswer {
                recovered: false,
                pubs: Vec::new(),
                ..a
            }
        } else {
            a
        };
        let Want::Position {
            recovering,
            reject_unrecovered,
            ..
        } = waiter.want
        else {
            return;
        };
        if recovering && !a.recovered && reject_unrecovered {
            bump(&self.counters.recoveries_failed);
            return self.fail_waiting(channel, ErrorCode::UnrecoverablePosition, is_mine);
        }
        {
            let mut index = self.index.borrow_mut();
            if let Some(chan) = index.id_of(channel) {
                index.promote(chan, is_mine);
            }
        }
        if recovering {
            bump(if a.recovered {
                &self.counters.recoveries
            } else {
                &self.counters.recoveries_failed
            });
        }
        let recoverable = self.cfg.namespace_of(channel).is_some_and(|ns| ns.recover);
        let connect = matches!(waiter.want, Want::Position { connect: true, .. });
        let result = reply::SubscribeResult {
            recoverable,
            epoch: Some(a.epoch.to_string()),
            // After a recovery: the position recovered from; the publications move it to the
            // top as the client handles them.
            offset: Some(a.top.saturating_sub(a.pubs.len() as u64)),
            was_recovering: recovering,
            recovered: recovering && a.recovered,
            ..Default::default()
        };
        if connect {
            self.connect_part(waiter.key, channel, result, a.pubs);
        } else {
            self.reply_subscribed(&waiter, channel, &result, &a.pubs);
        }
    }

    /// One server-side subscription of a waiting connect is in; the last one sends the reply.
    fn connect_part(
        &self,
        key: ConnKey,
        channel: &str,
        result: reply::SubscribeResult,
        pubs: Vec<bytes::Bytes>,
    ) {
        let done = {
            let mut connects = self.connects.borrow_mut();
            let Some(p) = connects.get_mut(&key) else {
                return;
            };
            p.subs.insert(channel.to_string(), (result, pubs));
            p.waiting -= 1;
            if p.waiting > 0 {
                return;
            }
            connects.remove(&key).expect("present")
        };
        let conn = self.conns.borrow().get(key).cloned();
        if let Some(conn) = conn {
            let len = done.base.len()
                + 64
                + done
                    .subs
                    .iter()
                    .map(|(c, (_, p))| c.len() + 96 + p.iter().map(|b| b.len() + 1).sum::<usize>())
                    .sum::<usize>();
            let mut f = FrameBuf::with_capacity(len);
            reply::connect_with_subs(f.payload(), done.id, &done.base, &done.subs);
            conn.push(self, f.finish(OP_TEXT));
        }
    }

    /// A server-side subscription of a waiting connect failed: the connection cannot be
    /// what its token says, so it is closed (3004, the SDK reconnects).
    fn connect_failed(&self, conn: &Connection) {
        if self.connects.borrow_mut().remove(&conn.key).is_some() {
            let d = Disconnect::ServerError;
            conn.close_with(self, d.code(), d.reason());
        }
    }

    /// The node lost publications of `channel` it cannot repair: every local subscriber is
    /// told to recover (unsubscribe push 2500, the SDKs resubscribe with their position and
    /// learn whether anything could be recovered).
    fn insufficient(&self, channel: &str) {
        let (chan, cleared) = {
            let mut index = self.index.borrow_mut();
            let Some(chan) = index.id_of(channel) else {
                return;
            };
            let waiting: Vec<Waiting> = index
                .get(chan)
                .map(|ch| ch.waiting.clone())
                .unwrap_or_default();
            (chan, index.clear(chan).map(|(keys, _)| (keys, waiting)))
        };
        let Some((keys, waiting)) = cleared else {
            return;
        };
        self.send_broker_must(ToBroker::Unsubscribe {
            shard: self.id,
            channel: Arc::from(channel),
        });
        for key in keys {
            let conn = self.conns.borrow().get(key).cloned();
            let Some(conn) = conn else {
                continue;
            };
            conn.drop_subscription(chan);
            self.presence_left(&conn, channel);
            let mut f = FrameBuf::with_capacity(96 + channel.len());
            match waiting.iter().find(|w| w.key == key) {
                Some(w) if matches!(w.want, Want::Position { connect: true, .. }) => {
                    self.connect_failed(&conn);
                    continue;
                }
                Some(w) if w.id != 0 => {
                    reply::error(f.payload(), w.id, ErrorCode::Internal, true);
                }
                Some(_) => continue,
                None if self.cfg.insufficient_state == InsufficientAction::Disconnect => {
                    bump(&self.counters.insufficient_unsubscribes);
                    let d = Disconnect::InsufficientState;
                    conn.close_with(self, d.code(), d.reason());
                    continue;
                }
                None => {
                    bump(&self.counters.insufficient_unsubscribes);
                    reply::unsubscribe_push(f.payload(), channel, 2500, "insufficient state")
                }
            }
            conn.push(self, f.finish(OP_TEXT));
        }
    }

    fn reply_client(&self, key: ConnKey, id: u32, kind: ClientWait, reply: BrokerReply) {
        let Some(conn) = self.conns.borrow().get(key).cloned() else {
            return;
        };
        let mut f = FrameBuf::with_capacity(64);
        match (kind, reply) {
            (ClientWait::Publish, BrokerReply::Published(Ok(_))) => {
                reply::result(f.payload(), id, "publish", &reply::Empty {})
            }
            (ClientWait::Gather(Deferred::Presence), BrokerReply::Gathered(Part::Presence(p))) => {
                reply::result(f.payload(), id, "presence", &presence_result(p))
            }
            (
                ClientWait::Gather(Deferred::PresenceStats),
                BrokerReply::Gathered(Part::Presence(p)),
            ) => reply::result(f.payload(), id, "presence_stats", &presence_stats(&p)),
            (ClientWait::History, BrokerReply::History(Ok(page)))
                if page.pubs.iter().map(|p| p.len() + 1).sum::<usize>()
                    > self.cfg.limits.max_outbox_bytes / 2 =>
            {
                // The page would not fit the connection's write queue: ask for fewer.
                reply::error(f.payload(), id, ErrorCode::LimitExceeded, false)
            }
            (ClientWait::History, BrokerReply::History(Ok(page))) => {
                let result = reply::HistoryResult {
                    epoch: &page.epoch,
                    offset: page.offset,
                };
                reply::result_with_publications(f.payload(), id, "history", &result, &page.pubs)
            }
            (ClientWait::History, BrokerReply::History(Err(BrokerError::Unrecoverable))) => {
                reply::error(f.payload(), id, ErrorCode::UnrecoverablePosition, false)
            }
            _ => reply::error(f.payload(), id, ErrorCode::Internal, true),
        }
        conn.push(self, f.finish(OP_TEXT));
    }

    fn collect(&self, query: &Query) -> Part {
        let index = self.index.borrow();
        match query {
            Query::Presence(channel) => {
                let conns = self.conns.borrow();
                let list = index
                    .lookup(channel)
                    .map(|ch| {
                        ch.subscribers
                            .iter()
                            .filter_map(|k| conns.get(*k))
                            .filter_map(|c| c.client_info())
                            .collect()
                    })
                    .unwrap_or_default();
                Part::Presence(list)
            }
            Query::Channels(pattern) => Part::Channels(
                index
                    .channels()
                    .filter(|ch| {
                        pattern
                            .as_deref()
                            .map(|p| crate::broker::glob_match(p, &ch.name))
                            .unwrap_or(true)
                    })
                    .map(|ch| (Arc::from(&*ch.name), ch.subscribers.len() as u32))
                    .collect(),
            ),
            Query::Nodes => Part::Nodes(Vec::new()),
            Query::PresenceAll => {
                let conns = self.conns.borrow();
                let mut all = Vec::new();
                for ch in index.channels() {
                    if !self
                        .cfg
                        .namespace_of(&ch.name)
                        .is_some_and(|ns| ns.presence)
                    {
                        continue;
                    }
                    let name: Arc<str> = Arc::from(&*ch.name);
                    for info in ch
                        .subscribers
                        .iter()
                        .filter_map(|k| conns.get(*k))
                        .filter_map(|c| c.client_info())
                    {
                        all.push((name.clone(), info));
                    }
                }
                Part::PresenceAll(all)
            }
            Query::Stats => Part::Stats {
                counters: self.counters.snapshot(),
                connections: self.conns.borrow().len() as u64,
                subscriptions: index.subscriptions(),
                users: self
                    .users
                    .borrow()
                    .keys()
                    .filter(|u| !u.is_empty())
                    .map(|u| Arc::from(&**u))
                    .collect(),
            },
        }
    }

    fn command(&self, cmd: ShardCommand) {
        match cmd {
            ShardCommand::Disconnect {
                user,
                client,
                code,
                reason,
            } => {
                for conn in self.user_conns(&user) {
                    if let Some(client) = &client {
                        if conn.client_id().map(|c| c.to_string()).as_deref() != Some(&**client) {
                            continue;
                        }
                    }
                    conn.close_with(self, code, &reason);
                }
            }
            ShardCommand::Unsubscribe { user, channel } => {
                for conn in self.user_conns(&user) {
                    conn.server_unsubscribe(self, &channel);
                }
            }
        }
    }

    fn user_conns(&self, user: &str) -> Vec<Rc<Connection>> {
        let users = self.users.borrow();
        let conns = self.conns.borrow();
        users
            .get(user)
            .map(|keys| keys.iter().filter_map(|k| conns.get(*k).cloned()).collect())
            .unwrap_or_default()
    }

    /// One second passed: fire due connection timers.
    fn tick(&self) {
        self.publish_snapshot();
        self.flush_backlog();
        let due = self.wheel.borrow_mut().advance();
        let now = self.tick_now();
        for key in due {
            let conn = self.conns.borrow().get(key).cloned();
            if let Some(conn) = conn {
                conn.on_timer(self, now);
            }
        }
        self.flush_dirty();
    }

    /// The wheel tick at which a subscription whose token expires at `unix_secs` ends
    /// (`client_expired_sub_close_delay_secs` later; 0 = never).
    fn sub_expiry_tick(&self, unix_secs: u64) -> u32 {
        if unix_secs == 0 {
            return 0;
        }
        let left = unix_secs
            .saturating_add(self.cfg.client_expired_sub_close_delay_secs as u64)
            .saturating_sub(unix_now());
        (self.tick_now() as u64 + left.max(1)).min(u32::MAX as u64) as u32
    }

    /// Converts a Unix expiry time to a wheel tick (0 = never).
    fn expiry_tick(&self, unix_secs: u64) -> u32 {
        if unix_secs == 0 {
            return 0;
        }
        let left =
            unix_secs.saturating_sub(unix_now()) + self.cfg.client_expired_close_delay_secs as u64;
        (self.tick_now() as u64 + left.max(1)).min(u32::MAX as u64) as u32
    }

    fn forget_user(&self, user: &Rc<str>, key: ConnKey) {
        let mut users = self.users.borrow_mut();
        if let Some(set) = users.get_mut(user) {
            if let Some(pos) = set.iter().position(|k| *k == key) {
                set.swap_remove(pos);
            }
            if set.is_empty() {
                users.remove(user);
                drop(users);
                if self.redis_mode && !user.is_empty() {
                    self.send_broker_must(ToBroker::UserInterest {
                        shard: self.id,
                        user: Arc::from(&**user),
                        on: false,
                    });
                }
            }
        }
    }

    /// Withdraws a channel's interest after its last local subscriber left.
    fn unsubscribe_key(&self, chan: ChanId, key: ConnKey) {
        let last = self.index.borrow_mut().remove(chan, key);
        if let Some(channel) = last {
            // Interest withdrawal must not be lost, or the broker keeps sending to this shard.
            self.send_broker_must(ToBroker::Unsubscribe {
                shard: self.id,
                channel: Arc::from(&*channel),
            });
        }
    }

    /// Counters and sizes for `/api/info`.
    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Builds the `presence` result: client id → info.
pub fn presence_result(list: Vec<ClientInfo>) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = list
        .into_iter()
        .map(|info| {
            let key = info.client.clone();
            (key, serde_json::to_value(info).unwrap_or_default())
        })
        .collect();
    serde_json::json!({ "presence": map })
}

/// Counts clients and distinct users.
pub fn presence_stats(list: &[ClientInfo]) -> PresenceStats {
    let users: HashSet<&str> = list.iter().map(|i| i.user.as_str()).collect();
    PresenceStats {
        num_clients: list.len() as u32,
        num_users: users.len() as u32,
    }
}

/// A connection's command token bucket (`limits.command_rate_per_sec`, `command_burst`).
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f32,
    last_ms: u32,
}

impl Bucket {
    pub fn full(cfg: &Config, now_ms: u32) -> Bucket {
        Bucket {
            tokens: cfg.limits.command_burst as f32,
            last_ms: now_ms,
        }
    }

    /// Refills for the time passed, then takes one token if there is one.
    pub fn take(&mut self, cfg: &Config, now_ms: u32) -> bool {
        let elapsed = now_ms.wrapping_sub(self.last_ms) as f32;
        self.last_ms = now_ms;
        let rate = cfg.limits.command_rate_per_sec as f32 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate).min(cfg.limits.command_burst as f32);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The session's view of its shard, for one connection.
pub struct ShardHost<'a> {
    pub shard: &'a Shard,
    pub key: ConnKey,
    /// The connection's expiry tick, updated by refresh.
    pub expires_at: &'a mut u32,
    /// The tick its earliest expiring subscription ends at (0 = none), updated by subscribe,
    /// sub_refresh and unsubscribe.
    pub sub_expires_at: &'a mut u32,
    /// The connection's command bucket (`None` while tearing down).
    pub bucket: Option<&'a mut Bucket>,
}

impl ShardHost<'_> {
    /// Sends a request whose answer the shard relays to command `id` of this connection.
    fn defer(
        &mut self,
        id: u32,
        kind: ClientWait,
        make: impl FnOnce(ReplyTo) -> ToBroker,
    ) -> Result<(), ErrorCode> {
        let token = self.shard.token();
        let pending = Pending::Client {
            conn: self.key,
            id,
            kind,
        };
        self.shard.pending.borrow_mut().insert(token, pending);
        let msg = make(ReplyTo {
            shard: self.shard.id,
            token,
        });
        self.shard.send_broker(msg).inspect_err(|_| {
            self.shard.pending.borrow_mut().remove(&token);
        })
    }
}

impl Host for ShardHost<'_> {
    fn config(&self) -> &Config {
        &self.shard.cfg
    }
    fn verifier(&self) -> Option<&TokenVerifier> {
        self.shard.verifier.as_ref()
    }
    fn unix_now(&self) -> u64 {
        unix_now()
    }
    fn new_client_id(&mut self) -> ClientId {
        let seq = self.shard.client_seq.get() + 1;
        self.shard.client_seq.set(seq);
        ClientId {
            node: self.shard.node.nonce,
            seq: ((self.shard.id as u64) << 48) | seq,
        }
    }
    fn register_user(&mut self, user: &str) -> Rc<str> {
        if user.is_empty() {
            return self.shard.anonymous.clone();
        }
        let mut users = self.shard.users.borrow_mut();
        let name = match users.get_key_value(user) {
            Some((k, _)) => k.clone(),
            None => Rc::from(user),
        };
        let set = users.entry(name.clone()).or_default();
        if !set.contains(&self.key) {
            set.push(self.key);
        }
        let first = set.len() == 1;
        drop(users);
        if first && self.shard.redis_mode && !name.is_empty() {
            self.shard.send_broker_must(ToBroker::UserInterest {
                shard: self.shard.id,
                user: Arc::from(&*name),
                on: true,
            });
        }
        name
    }
    fn subscribe(
        &mut self,
        id: u32,
        channel: &str,
        recovery: &Recovery,
    ) -> Result<(ChanId, Ack), ErrorCode> {
        let shard = self.shard;
        let ready_new = !shard.redis_mode;
        let (ready, known) = match shard.index.borrow().lookup(channel) {
            Some(ch) => (ch.ready, ch.position.clone()),
            None => (ready_new, None),
        };
        // How this subscriber joins: at once, or waiting for the broker.
        let wait = if recovery.history && id != 0 {
            match (&recovery.since, ready, &known) {
                // The shard's own position is exact: no broker round trip.
                (None, true, Some(_)) => None,
                _ => Some(Want::Position {
                    token: shard.token(),
                    recovering: recovery.since.is_some(),
                    reject_unrecovered: recovery.reject_unrecovered,
                    connect: recovery.connect,
                }),
            }
        } else if !ready && id != 0 {
            Some(Want::Confirm)
        } else {
            None
        };
        let added = {
            let mut index = shard.index.borrow_mut();
            match wait {
                Some(want) => {
                    let w = Waiting {
                        key: self.key,
                        id,
                        want,
                    };
                    index.add_waiting(channel, w, ready_new)
                }
                None => index.add(channel, self.key, ready_new),
            }
        };
        let (chan, first) = match added {
            Added::More(chan) => (chan, false),
            Added::First(chan) => (chan, true),
        };
        let mut msgs = Vec::with_capacity(2);
        if first {
            msgs.push(ToBroker::Subscribe {
                shard: shard.id,
                channel: Arc::from(channel),
            });
        }
        if let Some(Want::Position { token, .. }) = wait {
            msgs.push(ToBroker::Position {
                shard: shard.id,
                token,
                channel: Arc::from(channel),
                since: recovery.since.clone(),
            });
        }
        for (i, msg) in msgs.into_iter().enumerate() {
            if let Err(e) = shard.send_broker(msg) {
                // Roll back: nothing half-subscribed. A Subscribe already sent is withdrawn.
                let emptied = shard.index.borrow_mut().remove(chan, self.key);
                if let (Some(name), true) = (emptied, first && i > 0) {
                    shard.send_broker_must(ToBroker::Unsubscribe {
                        shard: shard.id,
                        channel: Arc::from(&*name),
                    });
                }
                return Err(e);
            }
        }
        if wait.is_some() {
            return Ok((chan, Ack::Later));
        }
        let result = match known.filter(|_| recovery.history) {
            Some(pos) => reply::SubscribeResult {
                recoverable: recovery.recoverable,
                epoch: Some(pos.epoch.to_string()),
                offset: Some(pos.offset),
                ..Default::default()
            },
            None => reply::SubscribeResult::default(),
        };
        Ok((chan, Ack::Now(result)))
    }
    fn unsubscribe(&mut self, chan: ChanId) {
        self.shard.unsubscribe_key(chan, self.key);
    }
    fn channel_name(&self, chan: ChanId) -> Rc<str> {
        self.shard
            .index
            .borrow()
            .get(chan)
            .map(|c| c.name.clone())
            .unwrap_or_else(|| Rc::from(""))
    }
    fn publish(
        &mut self,
        id: u32,
        channel: &str,
        data: &RawValue,
        info: ClientInfo,
    ) -> Result<(), ErrorCode> {
        self.defer(id, ClientWait::Publish, |reply| ToBroker::Publish {
            channel: Arc::from(channel),
            data: data.to_owned(),
            info: Some(Box::new(info)),
            idempotency_key: None,
            reply,
        })
    }
    fn gather(&mut self, id: u32, kind: Deferred, channel: &str) -> Result<(), ErrorCode> {
        self.defer(id, ClientWait::Gather(kind), |reply| ToBroker::Gather {
            query: Query::Presence(Arc::from(channel)),
            reply,
        })
    }
    fn connect_later(&mut self, id: u32, mut result: reply::ConnectResult<'_>, waiting: u32) {
        let subs = std::mem::take(&mut result.subs)
            .into_iter()
            .map(|(c, r)| (c.to_string(), (r, Vec::new())))
            .collect();
        let base = serde_json::to_vec(&result).expect("connect result");
        let pending = PendingConnect {
            id,
            base,
            subs,
            waiting,
        };
        self.shard.connects.borrow_mut().insert(self.key, pending);
    }
    fn history(&mut self, id: u32, channel: &str, query: HistoryQuery) -> Result<(), ErrorCode> {
        self.defer(id, ClientWait::History, |reply| ToBroker::History {
            channel: Arc::from(channel),
            query,
            reply,
        })
    }
    fn set_expiry(&mut self, unix_secs: u64) {
        *self.expires_at = self.shard.expiry_tick(unix_secs);
    }
    fn set_sub_expiry(&mut self, chan: ChanId, unix_secs: u64) {
        if unix_secs == 0 && *self.sub_expires_at == 0 {
            return; // nothing expiring on this connection: no table lookup
        }
        let next = (self.shard.sub_expiries.borrow_mut()).set(self.key, chan, unix_secs);
        *self.sub_expires_at = self.shard.sub_expiry_tick(next);
    }
    fn take_expired_subs(&mut self) -> Vec<ChanId> {
        let cutoff =
            unix_now().saturating_sub(self.shard.cfg.client_expired_sub_close_delay_secs as u64);
        let (due, next) = (self.shard.sub_expiries.borrow_mut()).take_due(self.key, cutoff);
        *self.sub_expires_at = self.shard.sub_expiry_tick(next);
        due
    }
    fn allow_command(&mut self) -> bool {
        match self.bucket.as_deref_mut() {
            Some(b) => b.take(&self.shard.cfg, self.shard.now_ms()),
            None => true,
        }
    }
    fn refused(&mut self, what: Refusal) {
        let c = &self.shard.counters;
        bump(match what {
            Refusal::ChannelLimit => &c.channel_limit_refusals,
            Refusal::ChannelName => &c.channel_name_refusals,
            Refusal::RateLimited => &c.rate_limited,
            Refusal::SubscriptionExpired => &c.sub_expired_unsubscribes,
        });
    }
    fn presence_changed(&mut self, channel: &str, who: &Identity, joined: bool) {
        if !self.shard.redis_mode {
            return; // standalone: presence is read from the shards' own indexes
        }
        let channel: Arc<str> = Arc::from(channel);
        let msg = if joined {
            ToBroker::PresenceAdd {
                channel,
                info: ClientInfo {
                    user: who.user.to_string(),
                    client: who.client.to_string(),
                    conn_info: who.info.clone(),
                },
            }
        } else {
            ToBroker::PresenceRemove {
                channel,
                client: Arc::from(who.client.to_string()),
            }
        };
        self.shard.send_broker_must(msg);
    }
}

/// Everything a shard thread needs, moved into its executor.
pub struct ShardParts {
    pub id: ShardId,
    pub cfg: Arc<Config>,
    pub node: Arc<NodeInfo>,
    pub to_broker: BrokerTx,
    pub inbox: ShardInbox,
    /// The bound, listening socket of this shard (SO_REUSEPORT).
    pub listener: socket2::Socket,
    /// The core the shard is pinned to, if any (its poll relay goes there too).
    pub cpu: Option<usize>,
    /// Told once the accept loop runs.
    pub ready: std::sync::mpsc::Sender<ShardId>,
    /// Set by the node to stop the shard.
    pub stop: Arc<AtomicBool>,
}

/// Runs a shard until its broker link closes; call inside its glommio executor.
pub async fn run(parts: ShardParts) {
    let ShardParts {
        id,
        cfg,
        node,
        to_broker,
        inbox,
        listener,
        cpu,
        ready,
        stop,
    } = parts;
    let shard = Shard::new(id, cfg, node, to_broker, cpu);
    *shard.inbox_probe.borrow_mut() = Some(inbox.rx.clone());
    // SAFETY: the fd is a bound, listening TCP socket we own; ownership moves to glommio.
    let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };

    // The inbox is woken by an io_uring completion (the socketpair byte), not by a foreign
    // waker, so it does not need a latency-sensitive queue. Measured: in a `Latency::Matters`
    // queue a node fed only by its broker (Redis mode, no local HTTP traffic) delivered with a
    // p99 of 0.4-1 s (the wake-up surfaced only at the next 1 s timer); in the default queue
    // its p99 matches the publishing node's (`cargo bench --bench fanout -- --redis`).
    let inbox_queue = glommio::executor().create_task_queue(
        glommio::Shares::default(),
        glommio::Latency::NotImportant,
        "broker-inbox",
    );
    let s = shard.clone();
    let inbox_task =
        glommio::spawn_local_into(async move { inbox_loop(s, inbox).await }, inbox_queue)
            .expect("task queue exists");
    spawn_io(&shard);

    let s = shard.clone();
    let accept = glommio::spawn_local(async move {
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    bump(&s.counters.accepted);
                    let _ = stream.set_nodelay(true);
                    glommio::spawn_local(crate::http::serve(s.clone(), stream)).detach();
                }
                Err(e) => {
                    // EMFILE/ENFILE: back off briefly instead of spinning.
                    tracing::warn!(shard = s.id, error = %e, "accept failed");
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
    .detach();

    // The one-second sweep: timers, and the drain once the node stops.
    let s = shard.clone();
    glommio::spawn_local(async move {
        let mut drain: Option<Drain> = None;
        let mut accept = Some(accept);
        while !stop.load(Ordering::Relaxed) {
            glommio::timer::sleep(Duration::from_secs(1)).await;
            s.tick();
            if drain.is_none() && s.node.draining.load(Ordering::Relaxed) {
                drain = Some(Drain::start(&s));
            }
            if let Some(d) = drain.as_mut() {
                if d.ticks == s.cfg.drain.listener_grace_secs {
                    if let Some(a) = accept.take() {
                        a.cancel(); // drops the listener: new connections are refused
                        tracing::debug!(shard = s.id, "listener closed");
                    }
                }
                d.step(&s);
            }
        }
    })
    .detach();
    let _ = ready.send(id);
    inbox_task.await;
    tracing::debug!(shard = id, "shard stopped");
}

/// One shard's part of the shutdown: tell connections to reconnect in paced, shuffled batches.
struct Drain {
    /// Ticks since the drain started.
    ticks: u32,
    /// Connections still to be told, in random order.
    queue: Vec<ConnKey>,
    /// How many per tick.
    per_tick: usize,
}

impl Drain {
    fn start(shard: &Shard) -> Drain {
        let mut queue: Vec<ConnKey> = shard.conns.borrow().all().iter().map(|c| c.key).collect();
        fastrand::shuffle(&mut queue);
        let window = shard.cfg.drain.window_secs.max(1) as usize;
        let per_tick = queue.len().div_ceil(window).max(1);
        tracing::info!(shard = shard.id, connections = queue.len(), "draining");
        Drain {
            ticks: 0,
            queue,
            per_tick,
        }
    }

    fn step(&mut self, shard: &Shard) {
        self.ticks += 1;
        if self.ticks <= shard.cfg.drain.listener_grace_secs || self.queue.is_empty() {
            return;
        }
        // Jitter the batch size (±25%) so nodes draining together do not pulse in step.
        let jitter = fastrand::usize(0..=self.per_tick / 2);
        let n = (self.per_tick * 3 / 4 + jitter).clamp(1, self.queue.len());
        let d = Disconnect::Shutdown;
        for key in self.queue.drain(..n) {
            let conn = shard.conns.borrow().get(key).cloned();
            if let Some(conn) = conn {
                conn.close_with(shard, d.code(), d.reason());
            }
        }
        shard.flush_dirty();
    }
}

/// Drains the broker queue whenever the broker wakes us, in batches.
async fn inbox_loop(shard: Rc<Shard>, inbox: ShardInbox) {
    // SAFETY: the fd is one end of a Unix socketpair that we own.
    let mut wake = unsafe { glommio::net::UnixStream::from_raw_fd(inbox.wake.into_raw_fd()) };
    let mut bytes = [0u8; 64];
    loop {
        // Clear before draining: a message sent after this point sends a new wake-up byte.
        inbox.notified.store(false, Ordering::SeqCst);
        let mut n = 0u32;
        while let Ok(msg) = inbox.rx.try_recv() {
            shard.handle(msg);
            n += 1;
            if n % 256 == 0 {
                glommio::yield_if_needed().await;
            }
        }
        shard.flush_backlog();
        shard.flush_dirty();
        match wake.read(&mut bytes).await {
            Ok(0) | Err(_) => {
                // The broker is gone: close every connection and end the shard.
                let conns = shard.conns.borrow().all();
                for c in conns {
                    c.close_with(
                        &shard,
                        Disconnect::Shutdown.code(),
                        Disconnect::Shutdown.reason(),
                    );
                }
                return;
            }
            Ok(_) => {}
        }
    }
}

/// Starts the task that services the shard's sockets on readiness.
pub fn spawn_io(shard: &Rc<Shard>) {
    let Some(inbox) = shard.ready.borrow_mut().take() else {
        return;
    };
    let s = shard.clone();
    glommio::spawn_local(async move { io_loop(s, inbox).await }).detach();
}

/// Services ready connections, in batches, whenever the poll relay wakes us.
async fn io_loop(shard: Rc<Shard>, inbox: poller::ReadyInbox) {
    // SAFETY: one end of a socketpair we own.
    let mut wake = unsafe { glommio::net::UnixStream::from_raw_fd(inbox.wake.into_raw_fd()) };
    let mut bytes = [0u8; 64];
    loop {
        inbox.notified.store(false, Ordering::SeqCst);
        let again = std::mem::take(&mut *shard.again.borrow_mut());
        for key in again {
            let conn = shard.conns.borrow().get(key).cloned();
            if let Some(conn) = conn {
                connection::read(&shard, &conn);
            }
        }
        let mut n = 0u32;
        while let Ok((token, events)) = inbox.rx.try_recv() {
            let (slot, generation) = poller::untoken(token);
            let conn = shard
                .conns
                .borrow()
                .get(ConnKey { slot, generation })
                .cloned();
            if let Some(conn) = conn {
                connection::service(&shard, &conn, events);
            }
            n += 1;
            if n % 256 == 0 {
                shard.flush_dirty();
                glommio::yield_if_needed().await;
            }
        }
        shard.flush_dirty();
        if !shard.again.borrow().is_empty() {
            // More to read: let the shard's other tasks run, then continue without waiting.
            futures_lite::future::yield_now().await;
            continue;
        }
        match wake.read(&mut bytes).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(capacity: usize) -> (Rc<Shard>, crossbeam_channel::Receiver<ToBroker>) {
        let node = Arc::new(NodeInfo::new("t".into(), "t".into(), "t".into(), 7));
        let (tx, inbox) = crate::bus::broker_queue(capacity, false).unwrap();
        let rx = inbox.rx;
        let cfg = Config {
            insecure: true,
            ..Config::default()
        };
        (Shard::new(0, Arc::new(cfg), node, tx, None), rx)
    }

    fn unsub(ch: &str) -> ToBroker {
        ToBroker::Unsubscribe {
            shard: 0,
            channel: ch.into(),
        }
    }

    #[test]
    fn must_deliver_messages_wait_in_order_and_block_overtaking() {
        let (s, rx) = shard(1);
        s.send_broker_must(unsub("a")); // fits
        s.send_broker_must(unsub("b")); // queue full: backlog
        s.send_broker_must(unsub("c"));
        assert_eq!(s.backlog.borrow().len(), 2);
        // A normal message may not overtake the backlog.
        assert_eq!(
            s.send_broker(ToBroker::Subscribe {
                shard: 0,
                channel: "b".into()
            }),
            Err(ErrorCode::Internal)
        );
        let names = |m: ToBroker| match m {
            ToBroker::Unsubscribe { channel, .. } => channel.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(names(rx.try_recv().unwrap()), "a");
        s.flush_backlog();
        assert_eq!(names(rx.try_recv().unwrap()), "b");
        s.flush_backlog();
        assert_eq!(names(rx.try_recv().unwrap()), "c");
        assert!(s.backlog.borrow().is_empty());
        assert!(s
            .send_broker(ToBroker::Subscribe {
                shard: 0,
                channel: "b".into()
            })
            .is_ok());
        assert!(s.counters.broker_queue_full.get() >= 2);
    }

    #[test]
    fn a_channel_position_comes_only_from_its_own_answer() {
        let (s, _rx) = shard(16);
        let key = ConnKey {
            slot: 0,
            generation: 0,
        };
        let waiting = Waiting {
            key,
            id: 1,
            want: Want::Position {
                token: 5,
                recovering: false,
                reject_unrecovered: false,
                connect: false,
            },
        };
        s.index.borrow_mut().add_waiting("h:1", waiting, true);
        let position = || s.index.borrow().lookup("h:1").unwrap().position.clone();
        let publication = |offset| ToShard::Publication {
            channel: "h:1".into(),
            frame: bytes::Bytes::new(),
            offset,
            epoch: Some("e".into()),
        };
        let answer = |token, top| ToShard::Position {
            token,
            channel: "h:1".into(),
            answer: Ok(PositionAnswer {
                epoch: "e".into(),
                top,
                recovered: false,
                pubs: Vec::new(),
            }),
        };
        // Left over from before the shard last left the channel: no position from these.
        s.handle(publication(7));
        s.handle(answer(99, 7));
        assert_eq!(position(), None);
        // Its own answer: exact from here on.
        s.handle(answer(5, 9));
        assert_eq!(position().map(|p| p.offset), Some(9));
        assert!(s
            .index
            .borrow()
            .lookup("h:1")
            .unwrap()
            .subscribers
            .contains(&key));
        s.handle(publication(10));
        assert_eq!(position().map(|p| p.offset), Some(10));
    }
}
