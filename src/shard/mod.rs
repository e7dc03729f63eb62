//! A shard: one glommio executor on one core, owning its listener, its connections, its channel
//! index, its timer wheel and its broker inbox. Inside, everything is `Rc`/`RefCell`; nothing is
//! shared with other shards except the messages of [`crate::bus`].
//!
//! Tasks of a shard ([`tasks`]): the accept loop, one task per connection while it is in its HTTP
//! phase (request head, API call, upgrade), the I/O loop that handles the completions of the
//! shard's own io_uring for upgraded WebSocket sockets ([`io`], [`ring`]; woken through the
//! ring's eventfd), the broker inbox ([`inbox`], woken through a socketpair byte at most once
//! per batch), and the one-second sweep (timer wheel, drain). All of them run on the shard's one
//! thread; none of them blocks, and no `RefCell` borrow is held across an `.await`.
//!
//! Files, one noun each: [`Shard`] itself (this file: its state, clocks and tick); [`tasks`]
//! (start-up, accept loop, sweep); [`io`] (servicing sockets, teardown); [`connection`] (one WebSocket
//! connection, seeing only its [`context::ConnCtx`]); [`context`]; [`table`] (connections by
//! key); [`users`]; [`index`] (channels); [`timer`]; [`host`] (the session's `Host`);
//! [`broker_link`] (sending to the broker, the must-deliver backlog); [`requests`] (waiting for
//! broker answers); [`inbox`] (broker messages); [`recovery`] (positions, recovery, insufficient
//! state); [`join_leave`] (join and leave messages); [`drain`]; [`counters`]; [`reason`] (why a
//! connection ended); [`ring`] (the io_uring, its receive buffers and sends in flight).

pub mod broker_link;
pub mod connection;
pub mod context;
pub mod counters;
pub mod drain;
pub mod emulation;
pub mod front_door;
pub mod host;
pub mod inbox;
pub mod index;
pub mod io;
pub mod join_leave;
pub mod proxy;
pub mod reason;
pub mod recovery;
pub mod requests;
pub mod ring;
pub mod table;
pub mod tasks;
pub mod timer;
pub mod users;

/// Kept so `http` compiles unchanged; the type lives in [`crate::bus`].
pub use crate::bus::NodeInfo;
pub use crate::protocol::reply::{presence_result, presence_stats};
pub use counters::Counters;
pub use host::ShardHost;
pub use io::spawn_io;
pub use tasks::{run, ShardParts};

use crate::bus::{BrokerCaps, BrokerTx, ShardCommand, ShardId, ToBroker, ToShard};
use crate::config::Config;
use crate::conn::session::{ChanId, SubExpiries};
use crate::conn::sub_extras::SubExtras;
use crate::conn::ConnKey;
use crate::protocol::token::TokenVerifier;
use crate::protocol::ErrorCode;
use broker_link::BrokerLink;
use context::{ConnCtx, SharedIo};
use index::ChannelIndex;
use recovery::PendingConnect;
use requests::Requests;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use table::ConnTable;
use users::UserTable;

/// Why a shard could not start.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// Its io_uring could not be set up (a feature this kernel lacks, or a resource limit).
    #[error("shard {shard}: {source}")]
    Ring {
        shard: ShardId,
        source: ring::RingError,
    },
    /// Its token keys could not be loaded (a key file changed since the node checked it).
    #[error("shard {shard}: {source}")]
    TokenKeys {
        shard: ShardId,
        source: crate::config::ConfigError,
    },
    /// Its backend client could not be made (a proxy endpoint or TLS setting).
    #[error("shard {shard}: proxy: {reason}")]
    Proxy { shard: ShardId, reason: String },
}

/// The shard's state, shared by its tasks through `Rc`. Fields are private: connections see
/// the shard only through [`ConnCtx`]; other layers through the few `pub` items below.
pub struct Shard {
    pub id: ShardId,
    pub cfg: Arc<Config>,
    pub node: Arc<NodeInfo>,
    pub counters: Counters,
    verifier: Option<TokenVerifier>,
    /// The shards → broker queue and this shard's must-deliver backlog.
    broker: BrokerLink,
    /// Requests waiting for the broker's answer.
    requests: Requests,
    conns: RefCell<ConnTable>,
    index: RefCell<ChannelIndex>,
    users: RefCell<UserTable>,
    /// Connect replies waiting for server-side subscriptions' positions.
    connects: RefCell<HashMap<ConnKey, PendingConnect>>,
    /// Deadlines of subscriptions made with expiring tokens (only connections that have one).
    sub_expiries: RefCell<SubExpiries>,
    /// Subscriptions' `chan_info` and join/leave requests (only subscriptions that have one).
    sub_extras: RefCell<SubExtras>,
    /// Buffers, decoder, dirty lists, timer wheel and clocks shared by the connections.
    io: SharedIo,
    /// The io_uring of the shard's WebSocket sockets.
    ring: ring::Ring,
    /// Wakes the flusher task ([`io::spawn_io`]); set once it runs.
    flush_signal: io::FlushSignal,
    flusher_running: Cell<bool>,
    /// A handle on the broker inbox, to report its depth.
    inbox_probe: RefCell<Option<crossbeam_channel::Receiver<ToShard>>>,
    client_seq: Cell<u64>,
    /// What the broker needs from this shard (confirmations, presence, users).
    caps: BrokerCaps,
    /// Calls to the application backend (proxies).
    proxies: proxy::Proxies,
    /// This shard, for the tasks it starts.
    me: std::rc::Weak<Shard>,
    /// Bidirectional emulation connections and their session ids' secret.
    emulated: RefCell<emulation::EmulatedConns>,
}

impl Shard {
    /// Creates a shard's state and its ring (call on the shard's thread: the ring is used
    /// there only).
    pub fn open(
        id: ShardId,
        cfg: Arc<Config>,
        node: Arc<NodeInfo>,
        to_broker: BrokerTx,
        caps: BrokerCaps,
    ) -> Result<Rc<Shard>, ShardError> {
        let ring =
            ring::Ring::open(&cfg.ring).map_err(|source| ShardError::Ring { shard: id, source })?;
        node.bus.recv_buffer_ring_bytes.fetch_add(
            cfg.ring.recv_ring_bytes(),
            std::sync::atomic::Ordering::Relaxed,
        );
        let verifier = TokenVerifier::from_config(&cfg)
            .map_err(|source| ShardError::TokenKeys { shard: id, source })?;
        let proxies = proxy::Proxies::new(&cfg).map_err(|e| ShardError::Proxy {
            shard: id,
            reason: format!("{e:#}"),
        })?;
        Ok(Rc::new_cyclic(|me| Shard {
            me: me.clone(),
            proxies,
            id,
            io: SharedIo::new(&cfg),
            broker: BrokerLink::new(to_broker, cfg.limits.broker_backlog_capacity),
            caps,
            cfg,
            node,
            counters: Counters::default(),
            verifier,
            requests: Requests::default(),
            conns: RefCell::default(),
            index: RefCell::default(),
            users: RefCell::default(),
            connects: RefCell::default(),
            sub_expiries: RefCell::default(),
            sub_extras: RefCell::default(),
            ring,
            flush_signal: io::FlushSignal::default(),
            flusher_running: Cell::new(false),
            inbox_probe: RefCell::default(),
            client_seq: Cell::new(0),
            emulated: RefCell::default(),
        }))
    }

    /// [`Shard::open`] for tests: panics if the ring cannot be set up.
    #[cfg(test)]
    pub fn new(
        id: ShardId,
        cfg: Arc<Config>,
        node: Arc<NodeInfo>,
        to_broker: BrokerTx,
    ) -> Rc<Shard> {
        let caps = if cfg.redis_mode() {
            BrokerCaps::REDIS
        } else {
            BrokerCaps::MEMORY
        };
        Shard::open(id, cfg, node, to_broker, caps).expect("test shard")
    }

    /// What a connection may touch of this shard, for one call.
    pub fn ctx(&self) -> ConnCtx<'_> {
        ConnCtx {
            cfg: &self.cfg,
            counters: &self.counters,
            io: &self.io,
            sessions: self,
        }
    }

    /// Milliseconds since the shard started (wraps after 49 days; compared with wrapping_sub).
    pub fn now_ms(&self) -> u32 {
        self.io.now_ms()
    }

    /// Seconds since the shard started (the timer wheel's clock).
    pub fn tick_now(&self) -> u32 {
        self.io.tick_now()
    }

    /// Seconds since the shard started.
    pub fn uptime_secs(&self) -> u64 {
        self.io.uptime_secs()
    }

    /// Publishes this shard's figures for the metrics listener (once a second: the hot path
    /// only bumps plain cells).
    fn publish_snapshot(&self) {
        let Some(slot) = self.node.shard_snapshots.get(self.id) else {
            return;
        };
        let index = self.index.borrow();
        let snap = crate::bus::ShardSnapshot {
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
            proxy: match &self.proxies.client {
                Some(c) => c.stats().snapshot(),
                None => Default::default(),
            },
        };
        if let Ok(mut s) = slot.lock() {
            *s = snap;
        }
    }

    /// One second passed: publish the snapshot, retry the backlog, fire due connection timers.
    fn tick(&self) {
        self.publish_snapshot();
        self.flush_backlog();
        self.jwks_tick();
        let due = self.io.advance();
        let now = self.io.tick_now();
        let ctx = self.ctx();
        for key in due {
            if let Some(conn) = self.conn(key) {
                conn.on_timer(&ctx, now);
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
            .saturating_sub(crate::clock::unix_now());
        (self.io.tick_now() as u64 + left.max(1)).min(u32::MAX as u64) as u32
    }

    /// Converts the Unix time of a refresh the node makes itself to a wheel tick (0 = never):
    /// no grace delay, the backend is asked at that time.
    fn refresh_tick(&self, unix_secs: u64) -> u32 {
        if unix_secs == 0 {
            return 0;
        }
        let left = unix_secs.saturating_sub(crate::clock::unix_now());
        (self.io.tick_now() as u64 + left.max(1)).min(u32::MAX as u64) as u32
    }

    /// Converts a Unix expiry time to a wheel tick (0 = never).
    fn expiry_tick(&self, unix_secs: u64) -> u32 {
        if unix_secs == 0 {
            return 0;
        }
        let left = unix_secs.saturating_sub(crate::clock::unix_now())
            + self.cfg.client_expired_close_delay_secs as u64;
        (self.io.tick_now() as u64 + left.max(1)).min(u32::MAX as u64) as u32
    }

    /// Sends to the broker without blocking (see [`BrokerLink::send`]).
    fn send_broker(&self, msg: ToBroker) -> Result<(), ErrorCode> {
        self.broker.send(msg, &self.counters)
    }

    /// Sends a message the broker must get (see [`BrokerLink::send_must`]).
    fn send_broker_must(&self, msg: ToBroker) {
        self.broker.send_must(msg, &self.counters)
    }

    /// Retries the must-deliver backlog in order.
    fn flush_backlog(&self) {
        self.broker.flush_backlog()
    }

    /// Queues a command for every shard of the node (through the broker).
    pub fn send_command(&self, cmd: ShardCommand) -> Result<(), ErrorCode> {
        self.send_broker(ToBroker::Command(cmd))
    }

    /// Forgets connection `key` of `user`; the shard's last connection of a user withdraws its
    /// interest (Redis mode: the user's personal channel).
    fn forget_user(&self, user: &Rc<str>, key: ConnKey) {
        let last = self.users.borrow_mut().forget(user, key);
        if last && self.caps.routes_users && !user.is_empty() {
            self.send_broker_must(ToBroker::UserInterest {
                shard: self.id,
                user: Arc::from(&**user),
                on: false,
            });
        }
    }

    /// Withdraws a channel's interest after its last local subscriber left.
    fn unsubscribe_key(&self, chan: ChanId, key: ConnKey) {
        self.sub_extras.borrow_mut().remove(key, chan);
        let last = self.index.borrow_mut().remove(chan, key);
        if let Some(channel) = last {
            // Interest withdrawal must not be lost, or the broker keeps sending to this shard.
            self.send_broker_must(ToBroker::Unsubscribe {
                shard: self.id,
                channel: Arc::from(&*channel),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{PositionAnswer, ToShard};
    use crate::protocol::ErrorCode;
    use index::{Waiting, Want};

    fn shard(capacity: usize) -> (Rc<Shard>, crossbeam_channel::Receiver<ToBroker>) {
        let node = Arc::new(NodeInfo::new("t".into(), "t".into(), "t".into(), 7));
        let (tx, inbox) = crate::bus::broker_queue(capacity, false).unwrap();
        let rx = inbox.rx;
        let cfg = Config {
            insecure: true,
            ..Config::default()
        };
        (Shard::new(0, Arc::new(cfg), node, tx), rx)
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
        assert_eq!(s.broker.backlog_len(), 2);
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
        assert_eq!(s.broker.backlog_len(), 0);
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
            push: None,
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
