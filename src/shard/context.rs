//! What a connection may touch of its shard: [`ConnCtx`], a borrowed view handed to every
//! [`super::connection::Connection`] method, so connection code never reaches into `Shard`.
//!
//! It holds the configuration, the counters, the shard's shared I/O state ([`SharedIo`]: the
//! frame decoder, the dirty list, the timer wheel and the shard's clocks) and the protocol side
//! ([`SessionDriver`], implemented by the shard with its session host). The ring and its
//! receive buffers are not here: a connection never submits I/O, the shard does
//! ([`super::io`]). Shard thread only. Every `RefCell` here is borrowed for one call and never
//! across an `.await`.

use super::counters::Counters;
use super::timer::TimerWheel;
use crate::config::Config;
use crate::conn::bucket::Bucket;
use crate::conn::session::{Awaiting, Ended, Session};
use crate::conn::ConnKey;
use crate::protocol::Disconnect;
use crate::ws;
use std::cell::RefCell;
use std::time::Instant;

/// Most bytes coalesced into one send (one write for many queued frames), bytes. A send of
/// several frames owns a buffer of at most this size while it is in flight.
pub const CORK_BYTES: usize = 64 * 1024;

/// The I/O state a shard shares between its connections (DESIGN §3: no per-connection read or
/// write buffer while idle, one timer wheel per shard).
pub struct SharedIo {
    decoder: ws::Decoder,
    /// Connections with frames queued since the last flush (flushed at the end of each batch).
    dirty: RefCell<Vec<ConnKey>>,
    wheel: RefCell<TimerWheel>,
    started: Instant,
}

impl SharedIo {
    pub fn new(cfg: &Config) -> SharedIo {
        SharedIo {
            decoder: ws::Decoder {
                max_message_bytes: cfg.limits.max_message_bytes,
            },
            dirty: RefCell::default(),
            wheel: RefCell::default(),
            started: Instant::now(),
        }
    }

    /// Milliseconds since the shard started (wraps after 49 days; compared with wrapping_sub).
    pub fn now_ms(&self) -> u32 {
        self.started.elapsed().as_millis() as u32
    }

    /// Seconds since the shard started.
    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// The timer wheel's tick (seconds since the shard started, advanced by the sweep).
    pub fn tick_now(&self) -> u32 {
        self.wheel.borrow().now()
    }

    /// Arms `key`'s timer for tick `due`; returns the tick it is actually armed for.
    pub fn arm(&self, key: ConnKey, due: u32) -> u32 {
        self.wheel.borrow_mut().arm(key, due)
    }

    /// Advances the wheel one tick; the entries due now (the caller checks staleness).
    pub fn advance(&self) -> Vec<ConnKey> {
        self.wheel.borrow_mut().advance()
    }

    /// Puts `key` on the list of connections to flush after this batch.
    pub fn mark_dirty(&self, key: ConnKey) {
        self.dirty.borrow_mut().push(key);
    }

    /// Takes the dirty list.
    pub fn take_dirty(&self) -> Vec<ConnKey> {
        std::mem::take(&mut *self.dirty.borrow_mut())
    }

    pub fn decoder(&self) -> &ws::Decoder {
        &self.decoder
    }
}

/// A connection's deadlines, as wheel ticks (0 = none): its token's expiry (`conn`, changed by
/// connect and refresh) and its earliest expiring subscription (`subs`, changed by subscribe,
/// sub_refresh and unsubscribe).
pub struct Expiry<'a> {
    pub conn: &'a mut u32,
    pub subs: &'a mut u32,
    /// The connection's wire (what the proxies are told it is).
    pub wire: super::connection::Wire,
}

/// The shard's protocol side, as one connection sees it.
pub trait SessionDriver {
    /// Answers one text message of connection `key` through the shard's session host; the
    /// immediate replies are appended to `out`. `expiry` holds the connection's deadlines,
    /// `bucket` its command rate limit.
    fn handle_message(
        &self,
        key: ConnKey,
        session: &mut Session,
        expiry: Expiry<'_>,
        bucket: &mut Bucket,
        text: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), Disconnect>;

    /// Ends connection `key`'s subscriptions whose token expired without a refresh; their
    /// unsubscribe pushes (2501) are appended to `out`. Returns how many ended.
    fn expire_subscriptions(
        &self,
        key: ConnKey,
        session: &mut Session,
        expiry: Expiry<'_>,
        out: &mut Vec<u8>,
    ) -> usize;

    /// Connection `key` ends: its session leaves every channel, its user and any connect reply
    /// waiting for it are forgotten.
    fn end_session(&self, key: ConnKey, session: &mut Session);

    /// A backend call of connection `key` ended (`answer`: the body of a 200 answer, `None`
    /// when it failed): the session finishes what waited; its replies go to `out`.
    fn proxied(
        &self,
        key: ConnKey,
        session: &mut Session,
        expiry: Expiry<'_>,
        waiting: Awaiting,
        answer: Option<&[u8]>,
        out: &mut Vec<u8>,
    ) -> Result<(), Ended>;

    /// Connection `key`'s expiry came: true when the session refreshes it through the
    /// backend (it stays), false when it ends.
    fn refresh_due(&self, key: ConnKey, session: &mut Session, expiry: Expiry<'_>) -> bool;

    /// A server API command for connection `key` (subscribe, refresh): its pushes go to
    /// `out`; an error is the disconnect the connection ends with.
    fn server_command(
        &self,
        key: ConnKey,
        session: &mut Session,
        expiry: Expiry<'_>,
        cmd: crate::conn::server_side::ServerCommand<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), Disconnect>;
}

/// What a connection may use of its shard, for one call.
#[derive(Clone, Copy)]
pub struct ConnCtx<'a> {
    pub cfg: &'a Config,
    pub counters: &'a Counters,
    pub io: &'a SharedIo,
    pub sessions: &'a dyn SessionDriver,
}
