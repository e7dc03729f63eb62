//! The only types that cross threads: shards ⇄ broker messages, the wake-up link, and the
//! node-wide state every thread reads.
//!
//! Shards send [`ToBroker`] on one bounded MPSC queue (never blocking: a full queue turns the
//! command into a temporary error). The broker sends [`ToShard`] on one bounded queue per shard
//! and wakes the shard through a socketpair byte at most once per batch ([`ShardLink::send`],
//! [`doorbell`]; a broker with an event loop defers the ring to the end of its pass,
//! [`ShardLink::defer_rings`]); the shard clears the flag before it drains, so no message is left behind and
//! an idle node makes no syscalls at all. [`node_state`] holds what every thread reads of the
//! node ([`NodeInfo`]: identity, atomics, the shards' published snapshots, the Redis link).
//!
//! Nothing here imports the shard, the broker or the HTTP layers: they all import this.

pub mod doorbell;
pub mod node_state;
pub mod process;

pub use doorbell::Doorbell;
pub use node_state::{
    NodeCounts, NodeInfo, ProxyKindSnapshot, ProxySnapshot, RedisLink, RedisLinkState,
    ShardSnapshot,
};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use serde_json::value::RawValue;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;

/// What a broker needs from the shards, declared by the broker itself ([`BrokerCaps::MEMORY`],
/// [`BrokerCaps::REDIS`]) and handed to every shard at start, so that a shard asks these
/// instead of branching on the broker's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerCaps {
    /// A shard's first subscriber of a channel waits for the broker's confirmation (the node's
    /// upstream subscription) before it is answered; otherwise it is ready at once.
    pub confirms_subscriptions: bool,
    /// Presence joins and leaves are sent to the broker, which keeps them (Redis: a hash per
    /// channel under the node's lease); otherwise presence is read from the shards' indexes.
    pub keeps_presence: bool,
    /// A shard's first and last connection of a user are announced (Redis: the node listens on
    /// the user's personal channel); otherwise user commands reach every shard anyway.
    pub routes_users: bool,
}

impl BrokerCaps {
    /// The in-process broker: every shard of the node hears everything at once.
    pub const MEMORY: BrokerCaps = BrokerCaps {
        confirms_subscriptions: false,
        keeps_presence: false,
        routes_users: false,
    };
    /// The Redis multiplexer: subscriptions, presence and users go through Redis.
    pub const REDIS: BrokerCaps = BrokerCaps {
        confirms_subscriptions: true,
        keeps_presence: true,
        routes_users: true,
    };
}

/// Who published, who is present, who joined or left: the protocol's `ClientInfo` (user,
/// client id, the connection's `info` and the subscription's `info`), carried with
/// publications, presence entries and join/leave messages between threads.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClientInfo {
    pub user: String,
    pub client: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conn_info: Option<Box<serde_json::value::RawValue>>,
    /// The subscription's own info (a subscription token's `info` claim, or the subscribe
    /// proxy's `info`): in presence entries and join/leave messages of that channel only,
    /// never in publications.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chan_info: Option<Box<serde_json::value::RawValue>>,
}

/// Most shards a node runs (interest per channel is a 64-bit shard mask).
pub const MAX_SHARDS: usize = 64;

/// Index of a shard, `0..shards`.
pub type ShardId = usize;

/// Where a broker answer goes: the shard, and the token it registered the waiter under.
#[derive(Debug, Clone, Copy)]
pub struct ReplyTo {
    pub shard: ShardId,
    pub token: u64,
}

/// A query answered by every shard, merged by the broker.
#[derive(Debug, Clone)]
pub enum Query {
    /// Clients subscribed to a channel.
    Presence(Arc<str>),
    /// Channels with their local subscriber counts (optional glob pattern).
    Channels(Option<Arc<str>>),
    /// `/api/channels`: the channels of the whole cluster (Redis mode: every node is asked,
    /// see `broker::redis::survey`; standalone: the same as `Channels`).
    ClusterChannels(Option<Arc<str>>),
    /// Connection, subscription and user counts.
    Stats,
    /// Every presence entry of the shard, for re-announcing after Redis lost them.
    PresenceAll,
    /// Every live node of the cluster as the registry holds it (answered by the broker itself;
    /// empty in standalone mode).
    Nodes,
}

/// One shard's answer to a [`Query`], or the broker's merge of all of them.
#[derive(Debug, Clone)]
pub enum Part {
    Presence(Vec<ClientInfo>),
    Channels(Vec<(Arc<str>, u32)>),
    Stats {
        connections: u64,
        subscriptions: u64,
        users: Vec<Arc<str>>,
        /// Shard counters by name (summed over shards by the merge).
        counters: Vec<(&'static str, u64)>,
    },
    /// Node registry entries (JSON objects).
    Nodes(Vec<serde_json::Value>),
    /// (channel, client) presence entries.
    PresenceAll(Vec<(Arc<str>, ClientInfo)>),
}

impl Part {
    /// The empty answer of the kind `query` expects, to merge shard parts into.
    pub fn empty_for(query: &Query) -> Part {
        match query {
            Query::Presence(_) => Part::Presence(Vec::new()),
            Query::Channels(_) | Query::ClusterChannels(_) => Part::Channels(Vec::new()),
            Query::Stats => Part::Stats {
                connections: 0,
                subscriptions: 0,
                users: Vec::new(),
                counters: Vec::new(),
            },
            Query::Nodes => Part::Nodes(Vec::new()),
            Query::PresenceAll => Part::PresenceAll(Vec::new()),
        }
    }
}

/// A command every shard applies to its own connections.
#[derive(Debug, Clone)]
pub enum ShardCommand {
    /// Disconnect a user's connections (or one client of theirs) with a code.
    Disconnect {
        user: Arc<str>,
        client: Option<Arc<str>>,
        code: u16,
        reason: Arc<str>,
    },
    /// Remove a user's connections (or one client of theirs) from a channel, with an
    /// unsubscribe push.
    Unsubscribe {
        user: Arc<str>,
        channel: Arc<str>,
        client: Option<Arc<str>>,
    },
    /// Subscribe a user's connections (or one client of theirs) to a channel, announced by a
    /// subscribe push (server API `subscribe`).
    Subscribe {
        user: Arc<str>,
        sub: Box<ServerSubscribe>,
    },
    /// Extend or end a user's connections (or one client's) (server API `refresh`).
    Refresh {
        user: Arc<str>,
        client: Option<Arc<str>>,
        /// End them now as expired (disconnect 3005).
        expired: bool,
        /// New expiry, Unix seconds; 0 = never (ignored with `expired`).
        expire_at: u64,
    },
}

impl ShardCommand {
    /// The user whose connections the command is for.
    pub fn user(&self) -> &Arc<str> {
        match self {
            ShardCommand::Disconnect { user, .. }
            | ShardCommand::Unsubscribe { user, .. }
            | ShardCommand::Subscribe { user, .. }
            | ShardCommand::Refresh { user, .. } => user,
        }
    }
}

/// A server-side subscription the server API asks for (boxed: rare and larger than the
/// other commands). Serialisable: in Redis mode it travels on the user's personal channel.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ServerSubscribe {
    pub channel: String,
    /// Only this client of the user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// For the client, in the subscribe push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
    /// Recover the publications after this position (offset, epoch); a connection for which
    /// that cannot be complete is not subscribed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<(u64, String)>,
}

/// Why the broker could not do something.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BrokerError {
    /// Redis is down or refused: a temporary error.
    #[error("broker unavailable")]
    Unavailable,
    /// A history read named a position of another epoch (112 unrecoverable position).
    #[error("unrecoverable position")]
    Unrecoverable,
}

/// A position in a channel's stream: the offset of a publication, in an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPos {
    pub offset: u64,
    pub epoch: Arc<str>,
}

/// A history read (client `history`, `/api/history`).
#[derive(Debug, Clone)]
pub struct HistoryQuery {
    /// Publications wanted: 0 = none (position only), negative = all retained.
    pub limit: i64,
    /// Only publications after this position (before it with `reverse`).
    pub since: Option<StreamPos>,
    /// Newest first.
    pub reverse: bool,
}

/// A page of history: publication JSON objects (`{"data":..,"offset":N}`) and the stream's
/// current position.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    pub pubs: Vec<Bytes>,
    pub epoch: Arc<str>,
    pub offset: u64,
}

/// The broker's answer to a subscriber of a history channel: its position, and what it
/// missed when it asked to recover. Sent on the shard's queue after every publication at or
/// below `top` and before every later one, so the subscriber, added on receipt, gets the
/// rest live: nothing twice, nothing missing.
#[derive(Debug, Clone)]
pub struct PositionAnswer {
    pub epoch: Arc<str>,
    pub top: u64,
    /// Recovery asked for and complete (`pubs` is everything after the client's offset).
    pub recovered: bool,
    pub pubs: Vec<Bytes>,
}

/// The broker's answer to a request that carried a [`ReplyTo`].
#[derive(Debug)]
pub enum BrokerReply {
    /// A publish went out; its stream position when the channel keeps history.
    Published(Result<Option<StreamPos>, BrokerError>),
    Gathered(Part),
    History(Result<HistoryPage, BrokerError>),
    /// A request without a result (history removal) is done.
    Done,
    /// The request could not be served (Redis down): a temporary error.
    Failed(BrokerError),
}

/// Shard → broker.
#[derive(Debug)]
pub enum ToBroker {
    /// The shard's first local subscriber of `channel` appeared (0 → 1).
    Subscribe { shard: ShardId, channel: Arc<str> },
    /// The shard's last local subscriber of `channel` left (1 → 0).
    Unsubscribe { shard: ShardId, channel: Arc<str> },
    /// The shard has protobuf subscribers of `channel` (`on`), or no longer has any: the
    /// broker then adds (or stops adding) a protobuf twin to the channel's publications. Sent
    /// at the end of a shard's batch, after the `Subscribe` it follows; ignored for a shard
    /// without interest in the channel (its `Unsubscribe` cleared this too).
    ProtobufInterest {
        shard: ShardId,
        channel: Arc<str>,
        on: bool,
    },
    /// Publish to every subscriber on every node.
    Publish {
        channel: Arc<str>,
        data: Box<RawValue>,
        info: Option<Box<ClientInfo>>,
        /// Suppress a repeat of this key within the idempotency window.
        idempotency_key: Option<Box<str>>,
        /// Server API extras (tags, binary data, skip_history); `None` for client publishes.
        extras: Option<Box<crate::protocol::publication::Extras>>,
        reply: ReplyTo,
    },
    /// A subscriber of a history channel needs its position (and, with `since`, what it
    /// missed); answered with [`ToShard::Position`] under `token`.
    Position {
        shard: ShardId,
        token: u64,
        channel: Arc<str>,
        since: Option<StreamPos>,
    },
    /// Read a channel's history.
    History {
        channel: Arc<str>,
        query: HistoryQuery,
        reply: ReplyTo,
    },
    /// Drop a channel's history (its position stays, so offsets go on).
    HistoryRemove { channel: Arc<str>, reply: ReplyTo },
    /// Ask every shard, merge, answer `reply`.
    Gather { query: Query, reply: ReplyTo },
    /// One shard's part of gather `gather`.
    Part { gather: u64, part: Part },
    /// Apply a command on every shard (of every node, in Redis mode).
    Command(ShardCommand),
    /// A client joined a presence channel (Redis mode keeps presence in Redis).
    PresenceAdd { channel: Arc<str>, info: ClientInfo },
    /// A client left a presence channel.
    PresenceRemove { channel: Arc<str>, client: Arc<str> },
    /// A join or leave message of a `join_leave` namespace: `push` is the complete JSON push
    /// (`{"push":{"channel":C,"join":{"info":..}}}`, or `"leave"`), for the channel's
    /// subscribers on every node. Best effort, as in Centrifugo: no offset, no history, not
    /// repaired; lost while Redis is down.
    JoinLeave { channel: Arc<str>, push: Bytes },
    /// The node is draining: leave the cluster registry now.
    Leave,
    /// The shards have ended: the broker ends too (sent by the node last).
    Stop,
    /// The shard's first (`on`) or last (`!on`) connection of a user (personal channel).
    UserInterest {
        shard: ShardId,
        user: Arc<str>,
        on: bool,
    },
    /// Commands POSTed to `/emulation` for an emulated connection (HTTP-streaming or SSE):
    /// the broker hands them to the shard named in the session (this node), or publishes them
    /// on the owning node's channel (Redis mode). Fire and forget, as the POST was answered.
    Emulation(Box<Emulation>),
}

/// An emulation request (Centrifugo's `EmulationRequest`, JSON form): the client commands
/// `data` for connection `session` on node `node`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Emulation {
    pub node: String,
    pub session: String,
    /// The commands as the connection's session reads a WebSocket text message (JSON lines).
    pub data: String,
}

impl Emulation {
    /// The shard a session id names (`<shard>.<slot>.<generation>.<tag>`), if well formed.
    pub fn shard(&self) -> Option<ShardId> {
        self.session.split('.').next()?.parse().ok()
    }

    /// Hands the request to the shard its session names (a broker's local delivery). A
    /// session naming no shard of this node is dropped and counted (`emulation_unroutable`):
    /// the POST was answered already, and the SDK's command times out as for a lost message.
    pub fn route(self: Box<Self>, shards: &[ShardLink], stats: &BusStats) {
        match self.shard().and_then(|i| shards.get(i)) {
            Some(link) => {
                link.send(ToShard::Emulation(self));
            }
            None => {
                stats.emulation_unroutable.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Broker → shard.
#[derive(Debug)]
pub enum ToShard {
    /// A publication, already a complete WebSocket frame shared by every recipient. In a
    /// history channel it carries its offset (0 otherwise) and the stream's epoch.
    ///
    /// `frame` is the JSON text frame; the same buffer may go on after it with the protobuf
    /// binary frame of the same publication (its twin, made by the broker once for the node
    /// while some shard has a protobuf subscriber; see [`publication_frames`]). The first
    /// frame's header says where it ends, so the message stays as small as it was.
    Publication {
        channel: Arc<str>,
        frame: Bytes,
        offset: u64,
        epoch: Option<Arc<str>>,
    },
    /// A join or leave message, a complete WebSocket frame shared by every recipient: for the
    /// local subscribers of `channel` that receive join/leave pushes (those that asked, or all
    /// with `force_push_join_leave`). Carries no offset and never moves a channel's position.
    JoinLeave {
        channel: Arc<str>,
        frame: Bytes,
    },
    /// The answer to a [`ToBroker::Position`] request.
    Position {
        token: u64,
        channel: Arc<str>,
        answer: Result<PositionAnswer, BrokerError>,
    },
    /// The node lost publications of `channel` it cannot repair (or its epoch changed): every
    /// local subscriber must recover (unsubscribe push 2500, the SDK resubscribes).
    Insufficient {
        channel: Arc<str>,
    },
    /// Answer `query` with a `ToBroker::Part` for `gather`.
    Collect {
        gather: u64,
        query: Query,
    },
    /// The answer to a request this shard made.
    Reply {
        token: u64,
        reply: BrokerReply,
    },
    Command(ShardCommand),
    /// The broker's subscription to `channel` is in place: subscribe replies may go out.
    Subscribed {
        channel: Arc<str>,
    },
    /// The broker could not subscribe (Redis down): waiting subscribers get a temporary error.
    SubscribeFailed {
        channel: Arc<str>,
    },
    /// Emulation commands for one of this shard's connections (see [`ToBroker::Emulation`]).
    Emulation(Box<Emulation>),
}

/// The JSON frame and, when present, the protobuf twin carried by a [`ToShard::Publication`].
pub fn publication_frames(frame: &Bytes) -> (Bytes, Option<Bytes>) {
    match crate::protocol::protobuf::first_frame_len(frame) {
        Some(at) if at < frame.len() => (frame.slice(..at), Some(frame.slice(at..))),
        _ => (frame.clone(), None),
    }
}

/// Counters shared by the broker and the shards (relaxed atomics; read by `/api/info` and logs).
#[derive(Debug, Default)]
pub struct BusStats {
    /// Shard commands refused because the broker queue was full.
    pub broker_queue_full: AtomicU64,
    /// Times the broker waited on a full shard queue (backpressure, nothing dropped).
    pub shard_queue_waits: AtomicU64,
    /// Publications the broker accepted.
    pub publications: AtomicU64,
    /// Publishes answered from an earlier one with the same idempotency key (not published).
    pub idempotent_repeats: AtomicU64,
    /// Idempotency keys forgotten before their window because the table was full.
    pub idempotency_evictions: AtomicU64,
    /// Reads of a channel's Redis stream (recovery, gap repair, first position).
    pub stream_reads: AtomicU64,
    /// Recoveries answered from the multiplexer's recent-publication cache (no Redis read).
    pub recoveries_from_cache: AtomicU64,
    /// Publications a node had missed on its live path and delivered from the stream.
    pub repaired_publications: AtomicU64,
    /// Times a channel's local subscribers were told to recover (gap not repairable, epoch
    /// changed, or the hold during a repair overflowed).
    pub insufficient_state: AtomicU64,
    /// Repairs abandoned because more than `max_held_publications` arrived meanwhile.
    pub repair_overflows: AtomicU64,
    /// Channel caches dropped because every cache together reached
    /// `redis_options.recovery_cache_max_bytes`.
    pub recovery_cache_full: AtomicU64,
    /// Standalone: channels' history dropped (positions kept) to stay within
    /// `limits.max_history_bytes`.
    pub history_evictions: AtomicU64,
    /// Redis commands refused (requester answered with a temporary error), or subscriber
    /// connections reset, because a connection's write queue was at
    /// `redis_options.max_write_queue_bytes`.
    pub redis_write_queue_full: AtomicU64,
    /// Redis commands refused (requester answered with a temporary error) because
    /// `redis_options.max_pending_replies` commands were waiting for their reply.
    pub redis_replies_full: AtomicU64,
    /// Redis Cluster topology refreshes (`CLUSTER SHARDS` answered and applied).
    pub redis_cluster_refreshes: AtomicU64,
    /// Redis Cluster `MOVED` redirects followed (the command sent again to the named master).
    pub redis_moved: AtomicU64,
    /// Redis Cluster `ASK` redirects followed (`ASKING` and the command sent to the named node).
    pub redis_ask: AtomicU64,
    /// Publish answers whose push did not come to wake their shard within 2 ms (rung late).
    pub redis_owed_rings_late: AtomicU64,
    /// `/api/channels` calls refused (temporary error) because
    /// `redis_options.max_pending_surveys` were waiting for other nodes' answers.
    pub surveys_refused: AtomicU64,
    /// Emulation requests the broker could not hand over: a session naming no shard of this
    /// node, an unreadable request from another node, or Redis down for another node's
    /// session (the POST was answered already; the SDK's command times out).
    pub emulation_unroutable: AtomicU64,
    /// Emulation requests published for another node (Redis mode).
    pub emulation_forwarded: AtomicU64,
    /// Protobuf twins of publications made by the broker (at most one per publication per
    /// node, only while some shard has a protobuf subscriber of the channel).
    pub protobuf_encodes: AtomicU64,
    /// Gauge: bytes of publications the standalone broker holds as history (bound
    /// `limits.max_history_bytes`), refreshed every second.
    pub history_bytes: AtomicU64,
    /// Gauge: bytes in the multiplexer's recovery caches (bound
    /// `redis_options.recovery_cache_max_bytes`), refreshed with the lease.
    pub recovery_cache_bytes: AtomicU64,
    /// Gauge: bytes of receive buffers in the shards' provided-buffer rings
    /// (`ring.recv_buffers` x `ring.recv_buffer_bytes` per shard), set as the shards start.
    pub recv_buffer_ring_bytes: AtomicU64,
}

impl BusStats {
    /// Gauges by name: how full the history bounds are.
    pub fn gauges(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("history_bytes", self.history_bytes.load(Ordering::Relaxed)),
            (
                "recovery_cache_bytes",
                self.recovery_cache_bytes.load(Ordering::Relaxed),
            ),
            (
                "recv_buffer_ring_bytes",
                self.recv_buffer_ring_bytes.load(Ordering::Relaxed),
            ),
        ]
    }

    /// The counters by name, for `/api/info` and metrics.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("shard_queue_waits", get(&self.shard_queue_waits)),
            ("publications", get(&self.publications)),
            ("idempotent_repeats", get(&self.idempotent_repeats)),
            ("idempotency_evictions", get(&self.idempotency_evictions)),
            ("stream_reads", get(&self.stream_reads)),
            ("recoveries_from_cache", get(&self.recoveries_from_cache)),
            ("repaired_publications", get(&self.repaired_publications)),
            ("insufficient_state", get(&self.insufficient_state)),
            ("repair_overflows", get(&self.repair_overflows)),
            ("recovery_cache_full", get(&self.recovery_cache_full)),
            ("history_evictions", get(&self.history_evictions)),
            ("redis_write_queue_full", get(&self.redis_write_queue_full)),
            ("redis_replies_full", get(&self.redis_replies_full)),
            (
                "redis_cluster_refreshes",
                get(&self.redis_cluster_refreshes),
            ),
            ("redis_moved", get(&self.redis_moved)),
            ("redis_ask", get(&self.redis_ask)),
            ("redis_owed_rings_late", get(&self.redis_owed_rings_late)),
            ("surveys_refused", get(&self.surveys_refused)),
            ("protobuf_encodes", get(&self.protobuf_encodes)),
            ("emulation_unroutable", get(&self.emulation_unroutable)),
            ("emulation_forwarded", get(&self.emulation_forwarded)),
        ]
    }
}

/// The shards' handle on the broker queue. A broker that runs an event loop (the Redis
/// multiplexer) gets a wake-up byte at most once per batch, like the shards do; the memory
/// broker blocks on the queue itself and needs none.
#[derive(Clone, Debug)]
pub struct BrokerTx {
    tx: Sender<ToBroker>,
    bell: Option<Doorbell>,
}

impl BrokerTx {
    /// Messages waiting in the queue.
    pub fn len(&self) -> usize {
        self.tx.len()
    }

    /// Whether the queue is empty.
    pub fn is_empty(&self) -> bool {
        self.tx.is_empty()
    }

    /// Queues without blocking.
    pub fn try_send(&self, msg: ToBroker) -> Result<(), crossbeam_channel::TrySendError<ToBroker>> {
        self.tx.try_send(msg)?;
        if let Some(bell) = &self.bell {
            bell.ring();
        }
        Ok(())
    }
}

/// The broker's end of its queue.
pub struct BrokerInbox {
    pub rx: Receiver<ToBroker>,
    /// Present when the broker asked for wake-ups: clear `notified`, drain, then wait on `wake`.
    pub wake: Option<(Arc<AtomicBool>, UnixStream)>,
}

/// Creates the shards → broker queue, with a wake-up socket when `with_wake`.
pub fn broker_queue(capacity: usize, with_wake: bool) -> std::io::Result<(BrokerTx, BrokerInbox)> {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    if !with_wake {
        return Ok((BrokerTx { tx, bell: None }, BrokerInbox { rx, wake: None }));
    }
    let (bell, notified, wake) = Doorbell::pair()?;
    Ok((
        BrokerTx {
            tx,
            bell: Some(bell),
        },
        BrokerInbox {
            rx,
            wake: Some((notified, wake)),
        },
    ))
}

/// The broker's handle on one shard: its queue and its doorbell.
pub struct ShardLink {
    tx: Sender<ToShard>,
    bell: Doorbell,
    stats: Arc<BusStats>,
    deferral: Deferral,
}

/// Ringing deferred to a task of the sender's event loop ([`ShardLink::defer_rings`]): the
/// messages a broker sends a shard during one pass of its loop wake the shard once.
#[derive(Debug, Default)]
struct Deferral {
    /// The task that rings pending doorbells ([`ShardLink::ring_deferred`]); `None` until a
    /// broker asks for deferral: ring at once.
    ringer: Mutex<Option<Waker>>,
    /// A message was queued since the last ring.
    pending: AtomicBool,
    /// A message was queued whose ring is owed to a send expected soon
    /// ([`ShardLink::send_owed`]).
    owed: AtomicBool,
}

/// The shard's end: drain `rx` after clearing `notified`, whenever `wake` is readable.
pub struct ShardInbox {
    pub rx: Receiver<ToShard>,
    pub notified: Arc<AtomicBool>,
    pub wake: UnixStream,
}

/// Creates the queue and wake-up pair for one shard.
pub fn shard_link(
    capacity: usize,
    stats: Arc<BusStats>,
) -> std::io::Result<(ShardLink, ShardInbox)> {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let (bell, notified, wake) = Doorbell::pair()?;
    Ok((
        ShardLink {
            tx,
            bell,
            stats,
            deferral: Deferral::default(),
        },
        ShardInbox { rx, notified, wake },
    ))
}

impl ShardLink {
    /// Queues `msg`, waiting while the shard's queue is full (backpressure: a shard only ever
    /// waits on itself, so this cannot deadlock), and wakes the shard unless a wake-up is
    /// already pending. Returns false when the shard is gone.
    pub fn send(&self, msg: ToShard) -> bool {
        let msg = match self.tx.try_send(msg) {
            Ok(()) => None,
            Err(crossbeam_channel::TrySendError::Full(m)) => Some(m),
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => return false,
        };
        if let Some(msg) = msg {
            self.stats.shard_queue_waits.fetch_add(1, Ordering::Relaxed);
            // Make sure the shard is awake to drain before we wait on it.
            self.bell.ring_now();
            if self.tx.send(msg).is_err() {
                return false;
            }
        }
        self.ring_or_defer();
        true
    }

    /// Queues `msg` like [`ShardLink::send`] but does not ring: the ring is owed, and paid by
    /// the next ring of this link ([`ShardLink::ring_deferred`] after another send), or by
    /// [`ShardLink::ring_owed`] when that send does not come (the caller's fallback). For a
    /// publish's reply whose push to the same shard is on its way: one wake-up for both.
    pub fn send_owed(&self, msg: ToShard) -> bool {
        match self.tx.try_send(msg) {
            Ok(()) => {
                self.deferral.owed.store(true, Ordering::Release);
                true
            }
            Err(crossbeam_channel::TrySendError::Full(m)) => self.send(m),
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => false,
        }
    }

    /// Whether a ring is owed ([`ShardLink::send_owed`]).
    pub fn has_owed(&self) -> bool {
        self.deferral.owed.load(Ordering::Acquire)
    }

    /// Pays an owed ring now.
    pub fn ring_owed(&self) {
        if self.deferral.owed.swap(false, Ordering::AcqRel) {
            self.bell.ring();
        }
    }

    /// From now on, [`ShardLink::send`] leaves the ringing to the task `ringer` wakes (once per
    /// batch of sends), which calls [`ShardLink::ring_deferred`]. For a broker with an event
    /// loop (the Redis multiplexer): when a publication's push and its PUBLISH reply arrive on
    /// their two connections in the same pass of its loop, they wake the shard once instead of
    /// twice (one park and wake-up of the shard's executor fewer). The ringer runs in the same
    /// pass, after the tasks already woken, so no message waits for a later event.
    /// Calling it again replaces the waker.
    pub fn defer_rings(&self, ringer: &Waker) {
        let mut slot = self
            .deferral
            .ringer
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !slot.as_ref().is_some_and(|w| w.will_wake(ringer)) {
            *slot = Some(ringer.clone());
        }
    }

    /// Rings the shard if something was sent since the last ring (deferred mode).
    pub fn ring_deferred(&self) {
        if self.deferral.pending.swap(false, Ordering::AcqRel) {
            // This ring also pays an owed one.
            self.deferral.owed.store(false, Ordering::Release);
            self.bell.ring();
        }
    }

    /// Rings now, or (deferred mode) marks the link pending and wakes the ringer once.
    fn ring_or_defer(&self) {
        let ringer = self
            .deferral
            .ringer
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match &*ringer {
            None => self.bell.ring(),
            Some(waker) => {
                if !self.deferral.pending.swap(true, Ordering::AcqRel) {
                    waker.wake_by_ref();
                }
            }
        }
    }
}

#[cfg(test)]
mod deferral_tests {
    use super::*;
    use std::io::Read;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn subscribed(i: usize) -> ToShard {
        ToShard::Subscribed {
            channel: format!("c{i}").into(),
        }
    }

    #[test]
    fn deferred_sends_wake_the_ringer_once_and_ring_the_shard_once() {
        let (link, inbox) = shard_link(8, Arc::new(BusStats::default())).unwrap();
        inbox.wake.set_nonblocking(true).unwrap();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        link.defer_rings(&waker);
        for i in 0..3 {
            assert!(link.send(subscribed(i)));
        }
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the ringer woken once");
        let mut buf = [0u8; 8];
        assert!(
            (&inbox.wake).read(&mut buf).is_err(),
            "no wake-up byte before the ringer runs"
        );
        link.ring_deferred();
        assert_eq!(
            (&inbox.wake).read(&mut buf).unwrap(),
            1,
            "one byte for the batch"
        );
        assert_eq!(inbox.rx.len(), 3, "every message queued");
        link.ring_deferred();
        assert!(
            (&inbox.wake).read(&mut buf).is_err(),
            "nothing pending: no byte"
        );
        // The shard drains (clearing its flag); the next batch wakes the ringer again.
        inbox.notified.store(false, Ordering::SeqCst);
        while inbox.rx.try_recv().is_ok() {}
        assert!(link.send(subscribed(9)));
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        link.ring_deferred();
        assert_eq!((&inbox.wake).read(&mut buf).unwrap(), 1);
    }

    #[test]
    fn an_owed_ring_is_paid_by_the_next_ring_or_by_the_fallback() {
        let (link, inbox) = shard_link(8, Arc::new(BusStats::default())).unwrap();
        inbox.wake.set_nonblocking(true).unwrap();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        link.defer_rings(&Waker::from(count.clone()));
        let mut buf = [0u8; 8];
        // A reply whose push is on its way: queued, nobody woken.
        assert!(link.send_owed(subscribed(0)));
        assert!(link.has_owed());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        assert!((&inbox.wake).read(&mut buf).is_err());
        // The push comes: one ring for both, and nothing is owed any more.
        assert!(link.send(subscribed(1)));
        link.ring_deferred();
        assert_eq!((&inbox.wake).read(&mut buf).unwrap(), 1);
        assert!(!link.has_owed());
        assert_eq!(inbox.rx.len(), 2);
        link.ring_owed();
        assert!((&inbox.wake).read(&mut buf).is_err(), "paid already");
        // The push never comes: the fallback rings.
        inbox.notified.store(false, Ordering::SeqCst);
        while inbox.rx.try_recv().is_ok() {}
        assert!(link.send_owed(subscribed(2)));
        link.ring_deferred();
        assert!(
            (&inbox.wake).read(&mut buf).is_err(),
            "nothing pending but the owed"
        );
        link.ring_owed();
        assert_eq!((&inbox.wake).read(&mut buf).unwrap(), 1);
        assert!(!link.has_owed());
    }

    #[test]
    fn without_deferral_every_batch_rings_at_once() {
        let (link, inbox) = shard_link(8, Arc::new(BusStats::default())).unwrap();
        inbox.wake.set_nonblocking(true).unwrap();
        assert!(link.send(subscribed(0)));
        let mut buf = [0u8; 8];
        assert_eq!((&inbox.wake).read(&mut buf).unwrap(), 1);
    }
}

#[cfg(test)]
mod size_tests {
    /// Queues are preallocated (`limits.*_queue_capacity` slots), so message size is memory.
    #[test]
    fn queue_messages_stay_small() {
        let to_shard = std::mem::size_of::<super::ToShard>();
        let to_broker = std::mem::size_of::<super::ToBroker>();
        println!("ToShard {to_shard} B, ToBroker {to_broker} B");
        assert!(to_shard <= 88, "ToShard grew to {to_shard} bytes");
        assert!(to_broker <= 96, "ToBroker grew to {to_broker} bytes");
    }
}
