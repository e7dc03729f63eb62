//! Redis mode: the node's multiplexer, on its own thread (`shardcast-broker`) running a glommio
//! executor that is not a shard.
//!
//! It holds the node's two Redis connections: one subscriber connection (SUBSCRIBE and the
//! pushes it brings) and one pipelined command connection (PUBLISH, presence, the node lease),
//! speaking RESP through `redis-protocol`. It talks to the shards only through the bounded
//! queues of [`crate::bus`], is woken by them once per batch, and wakes each shard once per batch.
//!
//! - Interest is refcounted: Redis sees one SUBSCRIBE per node per channel, sent when the first
//!   shard gains a subscriber and withdrawn (UNSUBSCRIBE) when the last shard loses its last one.
//!   Subscribe replies to clients wait for Redis's confirmation, so nothing published after a
//!   client's subscribe reply can be missed.
//! - Every publication goes through Redis, publisher → Redis → every node; one connection per
//!   direction keeps the order of one publisher's publications to one channel.
//! - When Redis fails, client connections stay; publishes and presence answer a temporary error;
//!   the multiplexer reconnects with capped exponential backoff and jitter and resubscribes
//!   every channel in one command.
//! - History channels publish through one Lua script (run with EVALSHA, reloaded after
//!   NOSCRIPT) that takes the next offset, appends to the channel's stream (XADD, MAXLEN ~),
//!   refreshes the TTLs and PUBLISHes `OFFSET:EPOCH:PUSH`, so the live path and the history never
//!   disagree. The node tracks each channel's last offset and repairs gaps from the stream
//!   ([`super::tracker`]).
//! - Names: `PREFIX:ch:{CHANNEL}` (pub/sub), `PREFIX:stream:{CHANNEL}` (history),
//!   `PREFIX:meta:{CHANNEL}` (hash: epoch `e`, top offset `s`), `PREFIX:idem:{CHANNEL}:KEY`
//!   (idempotent publish results), `PREFIX:presence:{CHANNEL}` (hash), `PREFIX:user:{USER}`
//!   (personal channel), `PREFIX:node:UID` (lease) and `PREFIX:nodes` (zset of leases by
//!   expiry). The `{...}` hash tag keeps a channel's keys in one cluster slot.

use super::tracker::{Action, Live, PosReq, ReadResult, Tracker};
use super::Broker;
use crate::bus::{
    BrokerError, BrokerInbox, BrokerReply, BusStats, HistoryPage, HistoryQuery, Part, Query,
    ReplyTo, ShardCommand, ShardLink, StreamPos, ToBroker, ToShard,
};
use crate::bus::{NodeCounts, NodeInfo};
use crate::config::{Config, RedisTarget};
use crate::protocol::reply::{self, ClientInfo};
use crate::ws::{FrameBuf, OP_TEXT};
use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel::{self, LocalSender};
use glommio::net::TcpStream;
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::encode::extend_encode_borrowed;
use redis_protocol::resp2::types::{BorrowedFrame, BytesFrame};
use serde::Deserialize;
use serde_json::Value;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Lua: the presence entries of a channel whose owning node still holds its lease; entries of
/// dead nodes are removed on the way. KEYS: presence hash, lease zset. ARGV: now (ms).
const PRESENCE_SCRIPT: &str = r#"
local live = {}
for _, uid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[1], '+inf')) do live[uid] = true end
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local v = all[i + 1]
  local sep = string.find(v, '|', 1, true)
  if sep and live[string.sub(v, 1, sep - 1)] then
    table.insert(out, string.sub(v, sep + 1))
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return out
"#;

/// Lua: the registry entries of every live node, dropping lapsed leases. KEYS: lease zset.
/// ARGV: now (ms), node key prefix.
const NODES_SCRIPT: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
local out = {}
for _, uid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local v = redis.call('GET', ARGV[2] .. uid)
  if v then table.insert(out, v) end
end
return out
"#;

/// Lua: publish into a channel. KEYS: stream, meta, idempotency key. ARGV: pub/sub channel,
/// open publication object, push prefix, history size (0 = no history), history TTL, meta TTL,
/// a new epoch (used if the channel has none), idempotency window secs (0 = no key).
/// Returns {repeated 0|1, "OFFSET:EPOCH" or ""}.
const PUBLISH_SCRIPT: &str = r#"
if ARGV[8] ~= '0' then
  local prev = redis.call('GET', KEYS[3])
  if prev then return {1, prev} end
end
local result = ''
if ARGV[4] == '0' then
  redis.call('PUBLISH', ARGV[1], ARGV[3] .. ARGV[2] .. '}}}')
else
  local epoch = redis.call('HGET', KEYS[2], 'e')
  if not epoch then
    epoch = ARGV[7]
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[2], 'e', epoch)
  end
  local offset = redis.call('HINCRBY', KEYS[2], 's', 1)
  local pub = ARGV[2] .. ',"offset":' .. offset .. '}'
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], offset .. '-0', 'd', pub)
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  redis.call('PUBLISH', ARGV[1], offset .. ':' .. epoch .. ':' .. ARGV[3] .. pub .. '}}')
  result = offset .. ':' .. epoch
end
if ARGV[8] ~= '0' then redis.call('SET', KEYS[3], result, 'EX', ARGV[8]) end
return {0, result}
"#;

/// Lua: a channel's position and a page of its stream, within the retained window (the last
/// `size` offsets: `MAXLEN ~` may keep a few more, which never count). KEYS: stream, meta.
/// ARGV: since offset (-1 = none), limit (0 = none, -1 = all), reverse '1', history size,
/// a new epoch (used if the channel has none), meta TTL. Returns {epoch, top, id, pub, ...}.
const READ_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[5]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch)
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
local top = tonumber(redis.call('HGET', KEYS[2], 's') or '0')
local out = {epoch, top}
local limit = tonumber(ARGV[2])
local size = tonumber(ARGV[4])
if limit == 0 or top == 0 then return out end
if limit < 0 or limit > size then limit = size end
local floor = top - size + 1
if floor < 1 then floor = 1 end
local since = tonumber(ARGV[1])
local entries
if ARGV[3] == '1' then
  local hi = top
  if since >= 0 then hi = since - 1 end
  if hi < floor then return out end
  entries = redis.call('XREVRANGE', KEYS[1], hi .. '-0', floor .. '-0', 'COUNT', limit)
else
  local lo = floor
  if since >= 0 and since + 1 > lo then lo = since + 1 end
  if lo > top then return out end
  entries = redis.call('XRANGE', KEYS[1], lo .. '-0', '+', 'COUNT', limit)
end
for _, e in ipairs(entries) do
  table.insert(out, e[1])
  table.insert(out, e[2][2])
end
return out
"#;

/// A Lua script, run by its SHA1 (EVALSHA) once loaded.
struct Script {
    text: &'static str,
    sha: String,
}

impl Script {
    fn new(text: &'static str) -> Script {
        use sha1::Digest;
        let digest = sha1::Sha1::digest(text.as_bytes());
        let sha = digest.iter().map(|b| format!("{b:02x}")).collect();
        Script { text, sha }
    }
}

/// The Redis broker.
pub struct RedisBroker {
    cfg: Arc<Config>,
    node: Arc<NodeInfo>,
    stats: Arc<BusStats>,
    target: RedisTarget,
    /// CPU to pin the multiplexer to.
    cpu: Option<usize>,
}

impl RedisBroker {
    pub fn new(
        cfg: Arc<Config>,
        node: Arc<NodeInfo>,
        stats: Arc<BusStats>,
        cpu: Option<usize>,
    ) -> Result<RedisBroker, String> {
        let target = cfg.redis.clone().ok_or("no Redis URL configured")?;
        Ok(RedisBroker {
            cfg,
            node,
            stats,
            target,
            cpu,
        })
    }
}

impl Broker for RedisBroker {
    fn run(self: Box<Self>, inbox: BrokerInbox, shards: Vec<ShardLink>) {
        let placement = match self.cpu {
            Some(cpu) => glommio::Placement::Fixed(cpu),
            None => glommio::Placement::Unbound,
        };
        let executor = glommio::LocalExecutorBuilder::new(placement)
            .name("shardcast-broker")
            .io_memory(256 * 1024)
            .make();
        let executor = match executor {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the Redis multiplexer");
                return;
            }
        };
        executor.run(async move {
            let mux = Rc::new(Mux::new(*self, shards));
            mux.run(inbox).await;
        });
    }
}

/// What a command reply is for (replies come back in command order).
enum Waiter {
    Ignore,
    /// A stream read for the tracker.
    Read {
        channel: Arc<str>,
        gen: u64,
        since: Option<u64>,
    },
    /// A history page for a client or the API; `since` epoch to check.
    History(ReplyTo, Option<Arc<str>>),
    /// A request answered with `Done` once Redis did it.
    Done(ReplyTo),
    /// The registry's node list, kept for the status page.
    NodesCache,
    /// The registry entry is removed: the draining node may exit.
    Left,
    Publish(ReplyTo),
    Presence(ReplyTo),
    Nodes(ReplyTo),
}

/// A gather over this node's shards.
struct Gathering {
    target: GatherTarget,
    remaining: usize,
    merged: Part,
}

enum GatherTarget {
    Shard(ReplyTo),
    /// The lease refresh wants the node's counts.
    Lease,
    /// After a reconnect: write every local presence entry again (Redis may have lost them).
    Reannounce,
}

/// The live connections' write ends (None while Redis is down).
struct Link {
    cmd: LocalSender<Vec<u8>>,
}

struct Mux {
    cfg: Arc<Config>,
    node: Arc<NodeInfo>,
    stats: Arc<BusStats>,
    target: RedisTarget,
    prefix: String,
    shards: Vec<ShardLink>,
    /// Channel → mask of shards with local subscribers.
    interest: RefCell<super::Interest<Arc<str>>>,
    /// User → mask of shards holding their connections.
    users: RefCell<super::Interest<Arc<str>>>,
    /// Channels whose SUBSCRIBE is sent but not confirmed yet.
    confirming: RefCell<HashMap<Arc<str>, ()>>,
    link: RefCell<Option<Link>>,
    /// The subscriber connection's write end (None while it is down; it may come back on its
    /// own while the command connection stays).
    sub_link: RefCell<Option<LocalSender<Vec<u8>>>>,
    /// What each command in flight is for, with the encoded command when it runs a script
    /// (sent again after NOSCRIPT).
    waiters: RefCell<VecDeque<(Waiter, Option<Vec<u8>>)>>,
    /// History channels' positions and repairs.
    tracker: RefCell<Tracker>,
    scripts: [Script; 4],
    /// Commands encoded during the current batch.
    cmd_out: RefCell<Vec<u8>>,
    sub_out: RefCell<Vec<u8>>,
    gathers: RefCell<HashMap<u64, Gathering>>,
    next_gather: Cell<u64>,
    /// Draining: no more lease refreshes.
    leaving: Cell<bool>,
}

/// Appends one RESP command.
fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    let frames: Vec<BorrowedFrame<'_>> =
        args.iter().map(|a| BorrowedFrame::BulkString(a)).collect();
    let mut buf = BytesMut::new();
    extend_encode_borrowed(&mut buf, &BorrowedFrame::Array(&frames), false)
        .expect("encoding into a growable buffer");
    out.extend_from_slice(&buf);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Control messages on a user's personal channel.
#[derive(serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Control {
    Disconnect {
        client: Option<String>,
        code: u16,
        reason: String,
    },
    Unsubscribe {
        channel: String,
    },
}

impl Mux {
    fn new(b: RedisBroker, shards: Vec<ShardLink>) -> Mux {
        let tracker = RefCell::new(Tracker::new(b.cfg.clone(), b.stats.clone()));
        Mux {
            prefix: b.cfg.redis_options.prefix.clone(),
            tracker,
            cfg: b.cfg,
            node: b.node,
            stats: b.stats,
            target: b.target,
            shards,
            interest: RefCell::default(),
            users: RefCell::default(),
            confirming: RefCell::default(),
            link: RefCell::new(None),
            sub_link: RefCell::new(None),
            waiters: RefCell::default(),
            scripts: [
                Script::new(PUBLISH_SCRIPT),
                Script::new(READ_SCRIPT),
                Script::new(PRESENCE_SCRIPT),
                Script::new(NODES_SCRIPT),
            ],
            cmd_out: RefCell::default(),
            sub_out: RefCell::default(),
            gathers: RefCell::default(),
            next_gather: Cell::new(1),
            leaving: Cell::new(false),
        }
    }

    fn channel_key(&self, channel: &str) -> String {
        format!("{}:ch:{{{}}}", self.prefix, channel)
    }
    fn stream_key(&self, channel: &str) -> String {
        format!("{}:stream:{{{}}}", self.prefix, channel)
    }
    fn meta_key(&self, channel: &str) -> String {
        format!("{}:meta:{{{}}}", self.prefix, channel)
    }
    fn idempotency_key(&self, channel: &str, key: &str) -> String {
        format!("{}:idem:{{{}}}:{}", self.prefix, channel, key)
    }
    fn presence_key(&self, channel: &str) -> String {
        format!("{}:presence:{{{}}}", self.prefix, channel)
    }
    fn user_key(&self, user: &str) -> String {
        format!("{}:user:{{{}}}", self.prefix, user)
    }
    fn node_key_prefix(&self) -> String {
        format!("{}:node:", self.prefix)
    }
    fn nodes_key(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// The command connection is up (publishes, presence, reads, the lease).
    fn is_up(&self) -> bool {
        self.link.borrow().is_some()
    }

    /// The subscriber connection is up (subscriptions can be confirmed).
    fn sub_up(&self) -> bool {
        self.sub_link.borrow().is_some()
    }

    fn reply(&self, to: ReplyTo, reply: BrokerReply) {
        if let Some(link) = self.shards.get(to.shard) {
            link.send(ToShard::Reply {
                token: to.token,
                reply,
            });
        }
    }

    /// Queues a command on the command connection with what its reply is for.
    fn command(&self, args: &[&[u8]], waiter: Waiter) {
        encode(&mut self.cmd_out.borrow_mut(), args);
        self.waiters.borrow_mut().push_back((waiter, None));
    }

    /// Runs script `which` (EVALSHA) with `keys` and `args`.
    fn eval(&self, which: usize, keys: &[&[u8]], args: &[&[u8]], waiter: Waiter) {
        let nkeys = keys.len().to_string();
        let mut all: Vec<&[u8]> = Vec::with_capacity(3 + keys.len() + args.len());
        all.extend([
            b"EVALSHA".as_slice(),
            self.scripts[which].sha.as_bytes(),
            nkeys.as_bytes(),
        ]);
        all.extend_from_slice(keys);
        all.extend_from_slice(args);
        let mut cmd = Vec::new();
        encode(&mut cmd, &all);
        self.cmd_out.borrow_mut().extend_from_slice(&cmd);
        self.waiters.borrow_mut().push_back((waiter, Some(cmd)));
    }

    /// Loads every script (on connect, and again after NOSCRIPT: Redis lost its cache).
    fn load_scripts(&self) {
        for script in &self.scripts {
            self.command(
                &[b"SCRIPT", b"LOAD", script.text.as_bytes()],
                Waiter::Ignore,
            );
        }
    }

    /// Carries out what the tracker decided.
    fn apply(&self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Read {
                    channel,
                    gen,
                    since,
                } => self.read_stream(channel, gen, since),
                Action::Forward { channel, live } => {
                    let mask = self.interest.borrow().mask(&*channel);
                    let epoch = live.epoch.clone();
                    super::send_to(&self.shards, mask, || ToShard::Publication {
                        channel: channel.clone(),
                        frame: live.frame.clone(),
                        offset: live.offset,
                        epoch: Some(epoch.clone()),
                    });
                }
                Action::Answer {
                    shard,
                    token,
                    channel,
                    answer,
                } => {
                    if let Some(link) = self.shards.get(shard) {
                        link.send(ToShard::Position {
                            token,
                            channel,
                            answer,
                        });
                    }
                }
                Action::Insufficient { channel } => {
                    tracing::warn!(%channel, "publications lost beyond repair: subscribers told to recover");
                    let mask = self.interest.borrow().mask(&*channel);
                    super::send_to(&self.shards, mask, || ToShard::Insufficient {
                        channel: channel.clone(),
                    });
                }
                Action::Confirm { channel } => self.confirm(&channel),
            }
        }
    }

    /// Reads a tracked channel's position, and its entries after `since`.
    fn read_stream(&self, channel: Arc<str>, gen: u64, since: Option<u64>) {
        if !self.is_up() {
            let mut out = Vec::new();
            self.tracker
                .borrow_mut()
                .read_failed(&channel, gen, &mut out);
            self.apply(out);
            return;
        }
        self.stats.stream_reads.fetch_add(1, Ordering::Relaxed);
        let query = HistoryQuery {
            limit: if since.is_some() { -1 } else { 0 },
            since: None,
            reverse: false,
        };
        self.eval_read(
            &channel,
            &query,
            since,
            Waiter::Read {
                channel: channel.clone(),
                gen,
                since,
            },
        );
    }

    /// Runs the read script for `channel`: position, and a page as `query` and `since` ask.
    fn eval_read(&self, channel: &str, query: &HistoryQuery, since: Option<u64>, waiter: Waiter) {
        let Some(ns) = self.cfg.namespace_of(channel) else {
            return;
        };
        let since = since
            .or(query.since.as_ref().map(|s| s.offset))
            .map_or("-1".to_string(), |s| s.to_string());
        let limit = query.limit.to_string();
        let size = ns.history_size.to_string();
        let epoch = super::history::new_epoch();
        let meta_ttl = ns.history_meta_ttl_secs.to_string();
        let reverse: &[u8] = if query.reverse { b"1" } else { b"0" };
        self.eval(
            1,
            &[
                self.stream_key(channel).as_bytes(),
                self.meta_key(channel).as_bytes(),
            ],
            &[
                since.as_bytes(),
                limit.as_bytes(),
                reverse,
                size.as_bytes(),
                epoch.as_bytes(),
                meta_ttl.as_bytes(),
            ],
            waiter,
        );
    }

    fn sub_command(&self, args: &[&[u8]]) {
        encode(&mut self.sub_out.borrow_mut(), args);
    }

    /// Hands the batch's encoded commands to the connection writers.
    fn flush(&self) {
        let cmd = std::mem::take(&mut *self.cmd_out.borrow_mut());
        if let (Some(link), false) = (self.link.borrow().as_ref(), cmd.is_empty()) {
            let _ = link.cmd.try_send(cmd);
        }
        let sub = std::mem::take(&mut *self.sub_out.borrow_mut());
        if let (Some(tx), false) = (self.sub_link.borrow().as_ref(), sub.is_empty()) {
            let _ = tx.try_send(sub);
        }
    }

    async fn run(self: Rc<Self>, inbox: BrokerInbox) {
        let (notified, wake) = inbox
            .wake
            .expect("the Redis broker is created with wake-ups");
        // SAFETY: one end of a socketpair we own.
        let mut wake = unsafe { glommio::net::UnixStream::from_raw_fd(wake.into_raw_fd()) };
        let rx = inbox.rx;
        let me = self.clone();
        glommio::spawn_local(async move { me.connection_loop().await }).detach();
        let me = self.clone();
        glommio::spawn_local(async move { me.lease_loop().await }).detach();
        let mut bytes = [0u8; 64];
        loop {
            notified.store(false, Ordering::SeqCst);
            let mut n = 0u32;
            loop {
                match rx.try_recv() {
                    Ok(msg) => self.handle(msg),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        tracing::debug!("every shard is gone: multiplexer stops");
                        return;
                    }
                }
                n += 1;
                if n % 512 == 0 {
                    self.flush();
                    glommio::yield_if_needed().await;
                }
            }
            self.flush();
            match wake.read(&mut bytes).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    fn handle(&self, msg: ToBroker) {
        match msg {
            ToBroker::Subscribe { shard, channel } => {
                let first = self.interest.borrow_mut().add(channel.clone(), shard);
                if !self.sub_up() {
                    // A subscription acknowledged now would silently miss what other nodes
                    // publish: refuse it (temporary error; the SDK retries). The shard rolls
                    // back and withdraws its interest.
                    self.shards[shard].send(ToShard::SubscribeFailed { channel });
                } else if first {
                    self.sub_command(&[b"SUBSCRIBE", self.channel_key(&channel).as_bytes()]);
                    if self.tracker.borrow().is_history(&channel) {
                        self.tracker.borrow_mut().created(&channel);
                    }
                    self.confirming.borrow_mut().insert(channel, ());
                } else if !self.confirming.borrow().contains_key(&channel) {
                    self.shards[shard].send(ToShard::Subscribed { channel });
                }
            }
            ToBroker::Unsubscribe { shard, channel } => {
                let last = self.interest.borrow_mut().remove(&channel, shard);
                if last {
                    self.confirming.borrow_mut().remove(&channel);
                    let mut out = Vec::new();
                    self.tracker.borrow_mut().removed(&channel, &mut out);
                    self.apply(out);
                    if self.sub_up() {
                        self.sub_command(&[b"UNSUBSCRIBE", self.channel_key(&channel).as_bytes()]);
                    }
                }
            }
            ToBroker::Publish {
                channel,
                data,
                info,
                idempotency_key,
                reply,
            } => {
                if !self.is_up() {
                    self.reply(reply, BrokerReply::Published(Err(BrokerError::Unavailable)));
                    return;
                }
                self.stats.publications.fetch_add(1, Ordering::Relaxed);
                let ns = self.cfg.namespace_of(&channel);
                if ns.is_some_and(|ns| ns.has_history()) || idempotency_key.is_some() {
                    self.eval_publish(&channel, &data, info.as_deref(), idempotency_key, reply);
                    return;
                }
                // The payload is the complete push, so receiving nodes only add a frame header.
                let mut payload = Vec::with_capacity(channel.len() + data.get().len() + 48);
                reply::publication(&mut payload, &channel, &data, info.as_deref());
                self.command(
                    &[b"PUBLISH", self.channel_key(&channel).as_bytes(), &payload],
                    Waiter::Publish(reply),
                );
            }
            ToBroker::Position {
                shard,
                token,
                channel,
                since,
            } => {
                let mut out = Vec::new();
                let req = PosReq {
                    shard,
                    token,
                    since,
                };
                self.tracker.borrow_mut().position(&channel, req, &mut out);
                self.apply(out);
            }
            ToBroker::History {
                channel,
                query,
                reply,
            } => {
                if !self.is_up() {
                    self.reply(reply, BrokerReply::History(Err(BrokerError::Unavailable)));
                    return;
                }
                let since_epoch = query.since.as_ref().map(|s| s.epoch.clone());
                self.eval_read(&channel, &query, None, Waiter::History(reply, since_epoch));
            }
            ToBroker::HistoryRemove { channel, reply } => {
                if !self.is_up() {
                    self.reply(reply, BrokerReply::Failed(BrokerError::Unavailable));
                    return;
                }
                self.command(
                    &[b"DEL", self.stream_key(&channel).as_bytes()],
                    Waiter::Done(reply),
                );
            }
            ToBroker::Gather { query, reply } => self.gather(query, GatherTarget::Shard(reply)),
            ToBroker::Part { gather, part } => self.part(gather, part),
            ToBroker::Command(cmd) => {
                let (user, control) = match cmd.clone() {
                    ShardCommand::Disconnect {
                        user,
                        client,
                        code,
                        reason,
                    } => (
                        user,
                        Control::Disconnect {
                            client: client.map(|c| c.to_string()),
                            code,
                            reason: reason.to_string(),
                        },
                    ),
                    ShardCommand::Unsubscribe { user, channel } => (
                        user,
                        Control::Unsubscribe {
                            channel: channel.to_string(),
                        },
                    ),
                };
                if self.is_up() {
                    let body = serde_json::to_vec(&control).expect("control message");
                    self.command(
                        &[b"PUBLISH", self.user_key(&user).as_bytes(), &body],
                        Waiter::Ignore,
                    );
                } else {
                    // Redis down: at least this node's connections get it.
                    tracing::warn!(%user, "Redis down: user command applied on this node only");
                    for link in &self.shards {
                        link.send(ToShard::Command(cmd.clone()));
                    }
                }
            }
            ToBroker::PresenceAdd { channel, info } => {
                if !self.is_up() {
                    return;
                }
                let mut value = self.node.uid.clone().into_bytes();
                value.push(b'|');
                serde_json::to_writer(&mut value, &info).expect("client info");
                let key = self.presence_key(&channel);
                let ttl = self.cfg.redis_options.presence_ttl_secs.to_string();
                self.command(
                    &[b"HSET", key.as_bytes(), info.client.as_bytes(), &value],
                    Waiter::Ignore,
                );
                self.command(&[b"EXPIRE", key.as_bytes(), ttl.as_bytes()], Waiter::Ignore);
            }
            ToBroker::Leave => {
                self.leaving.set(true);
                if self.is_up() {
                    let key = format!("{}{}", self.node_key_prefix(), self.node.uid);
                    self.command(&[b"DEL", key.as_bytes()], Waiter::Ignore);
                    self.command(
                        &[
                            b"ZREM",
                            self.nodes_key().as_bytes(),
                            self.node.uid.as_bytes(),
                        ],
                        Waiter::Left,
                    );
                } else {
                    self.node.left_registry.store(true, Ordering::SeqCst);
                }
                tracing::info!("leaving the node registry");
            }
            ToBroker::PresenceRemove { channel, client } => {
                if self.is_up() {
                    let key = self.presence_key(&channel);
                    self.command(
                        &[b"HDEL", key.as_bytes(), client.as_bytes()],
                        Waiter::Ignore,
                    );
                }
            }
            ToBroker::UserInterest { shard, user, on } => {
                let (first, last) = if on {
                    (self.users.borrow_mut().add(user.clone(), shard), false)
                } else {
                    (false, self.users.borrow_mut().remove(&user, shard))
                };
                if self.sub_up() && first {
                    self.sub_command(&[b"SUBSCRIBE", self.user_key(&user).as_bytes()]);
                } else if self.sub_up() && last {
                    self.sub_command(&[b"UNSUBSCRIBE", self.user_key(&user).as_bytes()]);
                }
            }
        }
    }

    fn gather(&self, query: Query, target: GatherTarget) {
        match (&query, &target) {
            (Query::Presence(channel), GatherTarget::Shard(reply)) => {
                if !self.is_up() {
                    self.reply(*reply, BrokerReply::Failed(BrokerError::Unavailable));
                    return;
                }
                let now = now_ms().to_string();
                self.eval(
                    2,
                    &[
                        self.presence_key(channel).as_bytes(),
                        self.nodes_key().as_bytes(),
                    ],
                    &[now.as_bytes()],
                    Waiter::Presence(*reply),
                );
            }
            (Query::Nodes, GatherTarget::Shard(reply)) => {
                if !self.is_up() {
                    self.reply(*reply, BrokerReply::Gathered(Part::Nodes(Vec::new())));
                    return;
                }
                self.eval_nodes(Waiter::Nodes(*reply));
            }
            _ => {
                // Channels and stats are this node's: ask every local shard.
                let id = self.next_gather.get();
                self.next_gather.set(id + 1);
                let merged = Part::empty_for(&query);
                self.gathers.borrow_mut().insert(
                    id,
                    Gathering {
                        target,
                        remaining: self.shards.len(),
                        merged,
                    },
                );
                super::scatter(&self.shards, id, &query);
            }
        }
    }

    fn part(&self, gather: u64, part: Part) {
        let done = {
            let mut gathers = self.gathers.borrow_mut();
            let Some(g) = gathers.get_mut(&gather) else {
                return;
            };
            super::memory::merge(&mut g.merged, part);
            g.remaining -= 1;
            if g.remaining > 0 {
                return;
            }
            gathers.remove(&gather).expect("present")
        };
        let merged = super::memory::finish(done.merged);
        match done.target {
            GatherTarget::Shard(reply) => self.reply(reply, BrokerReply::Gathered(merged)),
            GatherTarget::Lease => self.write_lease(merged),
            GatherTarget::Reannounce => {
                if let Part::PresenceAll(entries) = merged {
                    for (channel, info) in entries {
                        self.handle(ToBroker::PresenceAdd { channel, info });
                    }
                    self.flush();
                }
            }
        }
    }

    /// Writes this node's registry entry (its lease).
    fn write_lease(&self, stats: Part) {
        let Part::Stats {
            connections,
            subscriptions,
            users,
            ..
        } = stats
        else {
            return;
        };
        if !self.is_up() || self.leaving.get() {
            return;
        }
        let ttl_ms = self.cfg.redis_options.lease_ttl_secs as u64 * 1000;
        let entry = self
            .node
            .info_entry(
                true,
                NodeCounts {
                    clients: connections,
                    users: Some(users.len() as u64),
                    subs: subscriptions,
                    channels: self.interest.borrow().len() as u64,
                    counters: None,
                },
            )
            .to_string();
        let key = format!("{}{}", self.node_key_prefix(), self.node.uid);
        let ttl = ttl_ms.to_string();
        let expiry = (now_ms() + ttl_ms).to_string();
        self.command(
            &[
                b"SET",
                key.as_bytes(),
                entry.as_bytes(),
                b"PX",
                ttl.as_bytes(),
            ],
            Waiter::Ignore,
        );
        self.command(
            &[
                b"ZADD",
                self.nodes_key().as_bytes(),
                expiry.as_bytes(),
                self.node.uid.as_bytes(),
            ],
            Waiter::Ignore,
        );
        self.eval_nodes(Waiter::NodesCache);
        self.flush();
    }

    /// Reads the registry's live nodes (dropping lapsed leases) for `waiter`.
    fn eval_nodes(&self, waiter: Waiter) {
        let now = now_ms().to_string();
        self.eval(
            3,
            &[self.nodes_key().as_bytes()],
            &[now.as_bytes(), self.node_key_prefix().as_bytes()],
            waiter,
        );
    }

    /// Publishes through the publish script (history channels, idempotency keys).
    fn eval_publish(
        &self,
        channel: &str,
        data: &serde_json::value::RawValue,
        info: Option<&ClientInfo>,
        idempotency_key: Option<Box<str>>,
        reply: ReplyTo,
    ) {
        let ns = self.cfg.namespace_of(channel);
        let mut publication = Vec::with_capacity(data.get().len() + 64);
        reply::pub_open(&mut publication, data, info);
        let mut prefix = Vec::with_capacity(channel.len() + 32);
        reply::push_prefix(&mut prefix, channel);
        let size = ns.map_or(0, |ns| ns.history_size).to_string();
        let ttl = ns.map_or(0, |ns| ns.history_ttl_secs).to_string();
        let meta_ttl = ns.map_or(0, |ns| ns.history_meta_ttl_secs).to_string();
        let epoch = super::history::new_epoch();
        let window = if idempotency_key.is_some() {
            self.cfg.limits.idempotency_window_secs.to_string()
        } else {
            "0".to_string()
        };
        let idem = self.idempotency_key(channel, idempotency_key.as_deref().unwrap_or(""));
        self.eval(
            0,
            &[
                self.stream_key(channel).as_bytes(),
                self.meta_key(channel).as_bytes(),
                idem.as_bytes(),
            ],
            &[
                self.channel_key(channel).as_bytes(),
                &publication,
                &prefix,
                size.as_bytes(),
                ttl.as_bytes(),
                meta_ttl.as_bytes(),
                epoch.as_bytes(),
                window.as_bytes(),
            ],
            Waiter::Publish(reply),
        );
    }

    async fn lease_loop(self: Rc<Self>) {
        let every = Duration::from_secs(self.cfg.redis_options.lease_refresh_secs as u64);
        loop {
            if self.is_up() {
                self.gather(Query::Stats, GatherTarget::Lease);
            }
            self.tracker.borrow_mut().sweep(std::time::Instant::now());
            let cached = self.tracker.borrow().cache_bytes() as u64;
            self.stats
                .recovery_cache_bytes
                .store(cached, Ordering::Relaxed);
            glommio::timer::sleep(every).await;
        }
    }

    /// Connects, serves, and reconnects with capped exponential backoff and jitter, forever.
    async fn connection_loop(self: Rc<Self>) {
        let opts = &self.cfg.redis_options;
        let mut attempt: u32 = 0;
        let mut first = true;
        loop {
            match self.connect_pair().await {
                Ok((cmd, sub)) => {
                    attempt = 0;
                    if !first {
                        self.node.redis_reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    first = false;
                    tracing::info!(host = %self.target.host, port = self.target.port, "Redis link up");
                    self.serve(cmd, sub).await;
                    tracing::warn!(
                        "Redis link down; client connections stay, publishes fail until it is back"
                    );
                }
                Err(e) => {
                    if attempt == 0 || attempt % 20 == 0 {
                        tracing::warn!(error = %e, attempt, "cannot reach Redis");
                    }
                }
            }
            self.node.redis_state.store(2, Ordering::Relaxed);
            let base = (opts.backoff_initial_ms as u64)
                .saturating_mul(1 << attempt.min(16))
                .min(opts.backoff_max_ms as u64);
            // Full jitter in [base/2, base]: nodes that lost Redis together do not return together.
            let delay = base / 2 + fastrand::u64(0..=base / 2);
            attempt = attempt.saturating_add(1);
            glommio::timer::sleep(Duration::from_millis(delay)).await;
        }
    }

    /// Opens one connection and runs AUTH, SELECT and CLIENT SETNAME on it.
    async fn connect_one(&self, role: &str) -> Result<(TcpStream, BytesMut), String> {
        let addr = (self.target.host.as_str(), self.target.port);
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&addr)
            .map_err(|e| format!("cannot resolve {}: {e}", self.target.host))?
            .next()
            .ok_or("no address")?;
        let timeout = Duration::from_millis(self.cfg.redis_options.connect_timeout_ms as u64);
        let mut stream = TcpStream::connect_timeout(addr, timeout)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let mut hello = Vec::new();
        let mut expected = 0;
        if let Some(password) = &self.target.password {
            match &self.target.username {
                Some(user) => encode(&mut hello, &[b"AUTH", user.as_bytes(), password.as_bytes()]),
                None => encode(&mut hello, &[b"AUTH", password.as_bytes()]),
            }
            expected += 1;
        }
        if self.target.db != 0 {
            encode(
                &mut hello,
                &[b"SELECT", self.target.db.to_string().as_bytes()],
            );
            expected += 1;
        }
        let name = format!("shardcast-{}-{role}", self.node.uid);
        encode(&mut hello, &[b"CLIENT", b"SETNAME", name.as_bytes()]);
        expected += 1;
        stream.write_all(&hello).await.map_err(|e| e.to_string())?;
        let mut buf = BytesMut::with_capacity(4096);
        let mut seen = 0;
        while seen < expected {
            match next_frame(&mut stream, &mut buf).await? {
                BytesFrame::Error(e) => return Err(format!("Redis refused the handshake: {e}")),
                _ => seen += 1,
            }
        }
        Ok((stream, buf))
    }

    async fn connect_pair(&self) -> Result<((TcpStream, BytesMut), (TcpStream, BytesMut)), String> {
        let cmd = self.connect_one("cmd").await?;
        let sub = self.connect_one("sub").await?;
        Ok((cmd, sub))
    }

    /// Runs both connections until the command connection fails. The subscriber connection
    /// may fail alone (Redis drops pub/sub clients past their output buffer limit, or `CLIENT
    /// KILL TYPE pubsub`): it is then reconnected with backoff while publishes, presence and
    /// stream reads go on, and its channels are repaired from their streams when it is back.
    async fn serve(self: &Rc<Self>, cmd: (TcpStream, BytesMut), sub: (TcpStream, BytesMut)) {
        let (cmd_stream, cmd_buf) = cmd;
        let (cmd_read, cmd_write) = futures_lite::io::split(cmd_stream);
        let (cmd_tx, cmd_writer) = spawn_writer(cmd_write);
        // Scripts first (replies in order: nothing can run one before it is loaded), then
        // announce ourselves.
        self.load_scripts();
        *self.link.borrow_mut() = Some(Link { cmd: cmd_tx });
        self.gather(Query::Stats, GatherTarget::Lease);
        self.gather(Query::PresenceAll, GatherTarget::Reannounce);
        self.flush();
        let (done_tx, done_rx) = local_channel::new_unbounded::<String>();
        let me = self.clone();
        let cmd_reader = glommio::spawn_local(async move {
            let reason = me.read_replies(cmd_read, cmd_buf).await;
            let _ = done_tx.try_send(reason);
        });
        let cmd_down = || async { done_rx.recv().await.unwrap_or_default() };

        let mut sub = Some(sub);
        let mut attempt: u32 = 0;
        let reason = loop {
            let (sub_stream, sub_buf) = match sub.take() {
                Some(s) => s,
                None => {
                    // The subscriber connection alone: back off, reconnect, unless the command
                    // connection goes down meanwhile.
                    let opts = &self.cfg.redis_options;
                    let base = (opts.backoff_initial_ms as u64)
                        .saturating_mul(1 << attempt.min(16))
                        .min(opts.backoff_max_ms as u64);
                    let delay = base / 2 + fastrand::u64(0..=base / 2);
                    attempt = attempt.saturating_add(1);
                    let next = futures_lite::future::or(async { Err(cmd_down().await) }, async {
                        glommio::timer::sleep(Duration::from_millis(delay)).await;
                        Ok(self.connect_one("sub").await)
                    })
                    .await;
                    match next {
                        Err(reason) => break reason,
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "cannot reconnect the Redis subscriber connection");
                            continue;
                        }
                        Ok(Ok(s)) => {
                            self.node.redis_reconnects.fetch_add(1, Ordering::Relaxed);
                            tracing::info!("Redis subscriber connection back");
                            s
                        }
                    }
                }
            };
            attempt = 0;
            let (sub_read, sub_write) = futures_lite::io::split(sub_stream);
            let (sub_tx, sub_writer) = spawn_writer(sub_write);
            // Resubscribe everything in one command.
            {
                let interest = self.interest.borrow();
                let users = self.users.borrow();
                if !interest.is_empty() || !users.is_empty() {
                    let names: Vec<String> = interest
                        .keys()
                        .map(|c| self.channel_key(c))
                        .chain(users.keys().map(|u| self.user_key(u)))
                        .collect();
                    let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
                    args.extend(names.iter().map(|n| n.as_bytes()));
                    encode(&mut self.sub_out.borrow_mut(), &args);
                }
                self.confirming.borrow_mut().clear();
            }
            *self.sub_link.borrow_mut() = Some(sub_tx);
            self.tracker.borrow_mut().link_up();
            self.node.redis_state.store(1, Ordering::Relaxed);
            self.flush();
            let me = self.clone();
            let sub_reader =
                async move { Err::<String, String>(me.read_pushes(sub_read, sub_buf).await) };
            let end = futures_lite::future::or(async { Ok(cmd_down().await) }, sub_reader).await;
            self.sub_down();
            sub_writer.cancel().await;
            match end {
                Ok(reason) => break reason,
                Err(reason) => {
                    tracing::warn!(%reason, "Redis subscriber connection lost; publishes go on, its channels are repaired when it is back");
                    self.node.redis_state.store(2, Ordering::Relaxed);
                }
            }
        };
        tracing::warn!(%reason, "Redis connection lost");

        // Down: drop the writer, fail whatever waits for a reply.
        *self.link.borrow_mut() = None;
        self.node.redis_state.store(2, Ordering::Relaxed);
        cmd_reader.cancel().await;
        cmd_writer.cancel().await;
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for (w, _) in waiters {
            match w {
                Waiter::Ignore | Waiter::NodesCache => {}
                Waiter::Read { channel, gen, .. } => {
                    let mut out = Vec::new();
                    self.tracker
                        .borrow_mut()
                        .read_failed(&channel, gen, &mut out);
                    self.apply(out);
                }
                Waiter::History(to, _) => {
                    self.reply(to, BrokerReply::History(Err(BrokerError::Unavailable)))
                }
                Waiter::Done(to) => self.reply(to, BrokerReply::Failed(BrokerError::Unavailable)),
                Waiter::Left => self.node.left_registry.store(true, Ordering::SeqCst),
                Waiter::Publish(to) => {
                    self.reply(to, BrokerReply::Published(Err(BrokerError::Unavailable)))
                }
                Waiter::Presence(to) => {
                    self.reply(to, BrokerReply::Failed(BrokerError::Unavailable))
                }
                Waiter::Nodes(to) => self.reply(to, BrokerReply::Gathered(Part::Nodes(Vec::new()))),
            }
        }
    }

    /// The subscriber connection is gone: subscriptions waiting for Redis's confirmation fail
    /// (temporary error), and tracked channels wait to be repaired once it is back.
    fn sub_down(&self) {
        *self.sub_link.borrow_mut() = None;
        self.sub_out.borrow_mut().clear();
        let confirming: Vec<Arc<str>> = self
            .confirming
            .borrow_mut()
            .drain()
            .map(|(c, _)| c)
            .collect();
        for channel in confirming {
            let mask = self.interest.borrow().mask(&channel);
            super::send_to(&self.shards, mask, || ToShard::SubscribeFailed {
                channel: channel.clone(),
            });
        }
        // Tracked channels: waiting subscribers get an error; each channel is read again
        // (repaired) once its SUBSCRIBE is confirmed on the next subscriber connection.
        let mut out = Vec::new();
        self.tracker.borrow_mut().link_down(&mut out);
        self.apply(out);
    }

    /// Tells every shard with interest in `channel` that its subscription is in place.
    fn confirm(&self, channel: &Arc<str>) {
        let mask = self.interest.borrow().mask(channel);
        super::send_to(&self.shards, mask, || ToShard::Subscribed {
            channel: channel.clone(),
        });
    }

    async fn read_replies(
        &self,
        mut stream: futures_lite::io::ReadHalf<TcpStream>,
        mut buf: BytesMut,
    ) -> String {
        loop {
            let frame = match next_frame(&mut stream, &mut buf).await {
                Ok(f) => f,
                Err(e) => return e,
            };
            let Some((waiter, retry)) = self.waiters.borrow_mut().pop_front() else {
                return "reply without a command".into();
            };
            if let (BytesFrame::Error(e), Some(cmd)) = (&frame, &retry) {
                if e.starts_with("NOSCRIPT") {
                    // Redis lost its script cache (restart, SCRIPT FLUSH): load and run again.
                    tracing::info!("Redis lost the scripts: loading them again");
                    self.load_scripts();
                    self.cmd_out.borrow_mut().extend_from_slice(cmd);
                    self.waiters.borrow_mut().push_back((waiter, retry));
                    self.flush();
                    continue;
                }
            }
            match (waiter, frame) {
                (Waiter::Ignore, BytesFrame::Error(e)) => {
                    tracing::warn!(error = %e, "Redis command failed")
                }
                (Waiter::Ignore, _) => {}
                (Waiter::NodesCache, BytesFrame::Array(items)) => {
                    if let Ok(mut c) = self.node.cluster.lock() {
                        *c = json_items(&items);
                    }
                }
                (Waiter::NodesCache, _) => {}
                (Waiter::Left, _) => self.node.left_registry.store(true, Ordering::SeqCst),
                (Waiter::Publish(to), BytesFrame::Error(e)) => {
                    tracing::warn!(error = %e, "PUBLISH failed");
                    self.reply(to, BrokerReply::Published(Err(BrokerError::Unavailable)));
                }
                (Waiter::Publish(to), BytesFrame::Array(items)) => {
                    // The publish script: {repeated, "OFFSET:EPOCH" or ""}.
                    if matches!(items.first(), Some(BytesFrame::Integer(1))) {
                        self.stats
                            .idempotent_repeats
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    let pos = match items.get(1) {
                        Some(BytesFrame::BulkString(b)) => parse_position(b),
                        _ => None,
                    };
                    self.reply(to, BrokerReply::Published(Ok(pos)));
                }
                (Waiter::Publish(to), _) => self.reply(to, BrokerReply::Published(Ok(None))),
                (
                    Waiter::Read {
                        channel,
                        gen,
                        since,
                    },
                    frame,
                ) => {
                    let mut out = Vec::new();
                    match parse_read(&frame) {
                        Some(r) => self
                            .tracker
                            .borrow_mut()
                            .read_done(&channel, gen, since, r, &mut out),
                        None => {
                            tracing::warn!(%channel, reply = ?frame, "stream read failed");
                            self.tracker
                                .borrow_mut()
                                .read_failed(&channel, gen, &mut out);
                        }
                    }
                    self.apply(out);
                    self.flush(); // a follow-up read, if the tracker asked for one
                }
                (Waiter::History(to, since_epoch), frame) => {
                    let page = match parse_read(&frame) {
                        Some(r) if since_epoch.as_ref().is_some_and(|e| **e != *r.epoch) => {
                            Err(BrokerError::Unrecoverable)
                        }
                        Some(r) => Ok(HistoryPage {
                            pubs: r.entries.into_iter().map(|(_, p)| p).collect(),
                            epoch: r.epoch,
                            offset: r.top,
                        }),
                        None => {
                            tracing::warn!(reply = ?frame, "history read failed");
                            Err(BrokerError::Unavailable)
                        }
                    };
                    self.reply(to, BrokerReply::History(page));
                }
                (Waiter::Done(to), BytesFrame::Error(e)) => {
                    tracing::warn!(error = %e, "history removal failed");
                    self.reply(to, BrokerReply::Failed(BrokerError::Unavailable));
                }
                (Waiter::Done(to), _) => self.reply(to, BrokerReply::Done),
                (Waiter::Presence(to), BytesFrame::Array(items)) => {
                    let list: Vec<ClientInfo> = json_items(&items);
                    self.reply(to, BrokerReply::Gathered(Part::Presence(list)));
                }
                (Waiter::Presence(to), other) => {
                    tracing::warn!(reply = ?other, "presence script failed");
                    self.reply(to, BrokerReply::Failed(BrokerError::Unavailable));
                }
                (Waiter::Nodes(to), BytesFrame::Array(items)) => {
                    let list: Vec<Value> = json_items(&items);
                    self.reply(to, BrokerReply::Gathered(Part::Nodes(list)));
                }
                (Waiter::Nodes(to), other) => {
                    tracing::warn!(reply = ?other, "nodes script failed");
                    self.reply(to, BrokerReply::Gathered(Part::Nodes(Vec::new())));
                }
            }
        }
    }

    async fn read_pushes(
        &self,
        mut stream: futures_lite::io::ReadHalf<TcpStream>,
        mut buf: BytesMut,
    ) -> String {
        loop {
            let frame = match next_frame(&mut stream, &mut buf).await {
                Ok(f) => f,
                Err(e) => return e,
            };
            let BytesFrame::Array(items) = frame else {
                if let BytesFrame::Error(e) = frame {
                    tracing::warn!(error = %e, "Redis refused a subscription command");
                }
                continue;
            };
            let bulk = |i: usize| match items.get(i) {
                Some(BytesFrame::BulkString(b)) | Some(BytesFrame::SimpleString(b)) => {
                    Some(b.clone())
                }
                _ => None,
            };
            let (Some(kind), Some(name)) = (bulk(0), bulk(1)) else {
                continue;
            };
            match &kind[..] {
                b"message" => {
                    if let Some(payload) = bulk(2) {
                        self.deliver(&name, payload);
                    }
                }
                b"subscribe" => {
                    if let Some(channel) = self.app_channel(&name) {
                        let channel: Arc<str> = Arc::from(channel);
                        let first = self.confirming.borrow_mut().remove(&channel).is_some();
                        let tracked = self.tracker.borrow().is_history(&channel)
                            && self.interest.borrow().mask(&*channel) != 0;
                        if tracked {
                            // History channel: confirmed to the shards once its position is
                            // read (first time), or repaired (after a reconnect).
                            let mut out = Vec::new();
                            self.tracker.borrow_mut().subscribed(&channel, &mut out);
                            self.apply(out);
                            self.flush();
                        } else if first {
                            self.confirm(&channel);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// `PREFIX:ch:{CHANNEL}` → `CHANNEL`.
    fn app_channel<'a>(&self, name: &'a [u8]) -> Option<&'a str> {
        let name = std::str::from_utf8(name).ok()?;
        name.strip_prefix(&self.prefix)?
            .strip_prefix(":ch:{")?
            .strip_suffix('}')
    }

    fn deliver(&self, name: &[u8], payload: Bytes) {
        if let Some(channel) = self.app_channel(name) {
            let mask = self.interest.borrow().mask(channel);
            if mask == 0 {
                return;
            }
            if payload.first().is_some_and(|b| b.is_ascii_digit()) {
                // A history channel's `OFFSET:EPOCH:PUSH`.
                let Some(live) = parse_live(channel, &payload) else {
                    tracing::warn!(%channel, "unreadable publication ignored");
                    return;
                };
                let channel: Arc<str> = Arc::from(channel);
                let mut out = Vec::new();
                self.tracker.borrow_mut().live(&channel, live, &mut out);
                self.apply(out);
                self.flush();
                return;
            }
            let mut frame = FrameBuf::with_capacity(payload.len());
            frame.payload().extend_from_slice(&payload);
            let frame = frame.finish(OP_TEXT);
            let channel: Arc<str> = Arc::from(channel);
            super::send_to(&self.shards, mask, || ToShard::Publication {
                channel: channel.clone(),
                frame: frame.clone(),
                offset: 0,
                epoch: None,
            });
            return;
        }
        // A user's personal channel: a control message for their connections.
        let user = std::str::from_utf8(name)
            .ok()
            .and_then(|n| n.strip_prefix(&self.prefix))
            .and_then(|n| n.strip_prefix(":user:{"))
            .and_then(|n| n.strip_suffix('}'));
        let Some(user) = user else {
            return;
        };
        let Ok(control) = serde_json::from_slice::<Control>(&payload) else {
            tracing::warn!(%user, "unreadable control message ignored");
            return;
        };
        let user: Arc<str> = Arc::from(user);
        let cmd = match control {
            Control::Disconnect {
                client,
                code,
                reason,
            } => ShardCommand::Disconnect {
                user: user.clone(),
                client: client.map(Arc::from),
                code,
                reason: reason.into(),
            },
            Control::Unsubscribe { channel } => ShardCommand::Unsubscribe {
                user: user.clone(),
                channel: channel.into(),
            },
        };
        let mask = self.users.borrow().mask(&user);
        super::send_to(&self.shards, mask, || ToShard::Command(cmd.clone()));
    }
}

/// A task writing what is sent to the returned queue to `out`, batch by batch, until a write
/// fails or the task is cancelled.
fn spawn_writer(
    mut out: futures_lite::io::WriteHalf<TcpStream>,
) -> (LocalSender<Vec<u8>>, glommio::Task<()>) {
    let (tx, rx) = local_channel::new_unbounded::<Vec<u8>>();
    let task = glommio::spawn_local(async move {
        while let Some(chunk) = rx.recv().await {
            if out.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    (tx, task)
}

/// `OFFSET:EPOCH` → a stream position.
fn parse_position(text: &[u8]) -> Option<StreamPos> {
    let text = std::str::from_utf8(text).ok()?;
    let (offset, epoch) = text.split_once(':')?;
    Some(StreamPos {
        offset: offset.parse().ok()?,
        epoch: Arc::from(epoch),
    })
}

/// A history channel's pub/sub message `OFFSET:EPOCH:PUSH` → its frame and publication.
fn parse_live(channel: &str, payload: &Bytes) -> Option<Live> {
    let first = payload.iter().position(|&b| b == b':')?;
    let second = first + 1 + payload[first + 1..].iter().position(|&b| b == b':')?;
    let pos = parse_position(&payload[..second])?;
    let push = payload.slice(second + 1..);
    let mut prefix = Vec::with_capacity(channel.len() + 32);
    reply::push_prefix(&mut prefix, channel);
    if !push.starts_with(&prefix) || push.len() < prefix.len() + 2 {
        return None;
    }
    let publication = push.slice(prefix.len()..push.len() - 2);
    let mut frame = FrameBuf::with_capacity(push.len());
    frame.payload().extend_from_slice(&push);
    Some(Live {
        offset: pos.offset,
        epoch: pos.epoch,
        frame: frame.finish(OP_TEXT),
        publication,
    })
}

/// The read script's reply `{epoch, top, id, pub, ...}`.
fn parse_read(frame: &BytesFrame) -> Option<ReadResult> {
    let BytesFrame::Array(items) = frame else {
        return None;
    };
    let epoch = match items.first()? {
        BytesFrame::BulkString(b) => Arc::from(std::str::from_utf8(b).ok()?),
        _ => return None,
    };
    let top = match items.get(1)? {
        BytesFrame::Integer(n) => u64::try_from(*n).ok()?,
        _ => return None,
    };
    let mut entries = Vec::with_capacity(items.len().saturating_sub(2) / 2);
    for pair in items[2..].chunks(2) {
        let (BytesFrame::BulkString(id), Some(BytesFrame::BulkString(p))) = (&pair[0], pair.get(1))
        else {
            return None;
        };
        let id = std::str::from_utf8(id).ok()?;
        let offset = id.split('-').next()?.parse().ok()?;
        entries.push((offset, p.clone()));
    }
    // Reverse reads come newest first; the tracker wants ascending, pages keep their order.
    Some(ReadResult {
        epoch,
        top,
        entries,
    })
}

/// The JSON documents in a script's array reply (entries that do not parse are skipped).
fn json_items<T: serde::de::DeserializeOwned>(items: &[BytesFrame]) -> Vec<T> {
    items
        .iter()
        .filter_map(|f| match f {
            BytesFrame::BulkString(b) => serde_json::from_slice(b).ok(),
            _ => None,
        })
        .collect()
}

/// Reads until one RESP frame is complete.
async fn next_frame<R: futures_lite::AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut BytesMut,
) -> Result<BytesFrame, String> {
    loop {
        match decode_bytes_mut(buf) {
            Ok(Some((frame, _, _))) => return Ok(frame),
            Ok(None) => {}
            Err(e) => return Err(format!("bad RESP from Redis: {e:?}")),
        }
        let len = buf.len();
        buf.resize(len + 16 * 1024, 0);
        match stream.read(&mut buf[len..]).await {
            Ok(0) => {
                buf.truncate(len);
                return Err("Redis closed the connection".into());
            }
            Ok(n) => buf.truncate(len + n),
            Err(e) => {
                buf.truncate(len);
                return Err(format!("read from Redis: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_encoding() {
        let mut out = Vec::new();
        encode(&mut out, &[b"PUBLISH", b"a", b"{\"x\":1}"]);
        assert_eq!(
            out,
            b"*3\r\n$7\r\nPUBLISH\r\n$1\r\na\r\n$7\r\n{\"x\":1}\r\n"
        );
    }

    #[test]
    fn control_messages_round_trip() {
        let c = Control::Disconnect {
            client: None,
            code: 4000,
            reason: "x".into(),
        };
        let text = serde_json::to_string(&c).unwrap();
        assert!(matches!(
            serde_json::from_str::<Control>(&text).unwrap(),
            Control::Disconnect { code: 4000, .. }
        ));
    }
}
