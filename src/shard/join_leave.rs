//! Join and leave messages of `join_leave` namespaces: sent when a subscription of this shard
//! comes in or ends, delivered when one reaches the shard.
//!
//! A join is sent once the subscriber is in the channel's subscriber set, right after its
//! subscribe reply (or, for a server-side subscription, its connect reply) was queued: so the
//! subscriber itself, when it receives them, sees its own join after its reply, and a
//! subscriber still waiting for the broker is never announced before it is in. A leave is sent
//! before the subscriber is taken out, only for a subscriber that was in; being out by the
//! time the message comes back, it never receives its own leave (as in Centrifugo).
//!
//! The message goes through the broker like a publication (to every node in Redis mode) but
//! takes no offset, enters no history and never moves a channel's position. Best effort, as
//! in Centrifugo: a full broker queue drops it (counted as `join_leave_dropped`).
//!
//! Shard thread only; never blocks.

use super::connection::Connection;
use super::counters::bump;
use super::Shard;
use crate::bus::{ClientInfo, ToBroker};
use crate::conn::session::ChanId;
use crate::conn::ConnKey;
use crate::protocol::reply;
use bytes::Bytes;
use std::sync::Arc;

impl Shard {
    /// Whether `channel`'s namespace has join/leave messages.
    pub(super) fn has_join_leave(&self, channel: &str) -> bool {
        self.cfg
            .namespace_of(channel)
            .is_some_and(|ns| ns.join_leave)
    }

    /// Whether connection `key` is in channel `chan`'s subscriber set (not waiting).
    pub(super) fn is_in(&self, chan: ChanId, key: ConnKey) -> bool {
        self.index
            .borrow()
            .get(chan)
            .is_some_and(|ch| ch.subscribers.contains(&key))
    }

    /// `info` with the `chan_info` of `key`'s subscription to `chan`.
    pub(super) fn with_chan_info(
        &self,
        mut info: ClientInfo,
        key: ConnKey,
        chan: ChanId,
    ) -> ClientInfo {
        let extras = self.sub_extras.borrow();
        if !extras.is_empty() {
            info.chan_info = extras.chan_info(key, chan);
        }
        info
    }

    /// Sends a join (`joined`) or leave message of `channel` about `info` to every node.
    pub(super) fn announce(&self, channel: &str, info: &ClientInfo, joined: bool) {
        let mut push = Vec::with_capacity(96 + channel.len());
        reply::join_leave_push(&mut push, channel, info, joined);
        let msg = ToBroker::JoinLeave {
            channel: Arc::from(channel),
            push: Bytes::from(push),
        };
        match self.send_broker(msg) {
            Ok(()) => bump(&self.counters.join_leave_sent),
            Err(_) => bump(&self.counters.join_leave_dropped),
        }
    }

    /// A waiting subscriber of `channel` was just let in and answered: announce its join.
    pub(super) fn joined_now(&self, key: ConnKey, channel: &str) {
        if !self.has_join_leave(channel) {
            return;
        }
        let Some(chan) = self.index.borrow().id_of(channel) else {
            return;
        };
        if !self.is_in(chan, key) {
            return;
        }
        let Some(info) = self.conn(key).and_then(|c| c.client_info()) else {
            return;
        };
        let info = self.with_chan_info(info, key, chan);
        self.announce(channel, &info, true);
    }

    /// `conn` is being taken out of `channel` by the server (server unsubscribe, insufficient
    /// state): announce its leave if it was in. Call before it leaves the index.
    pub(super) fn leaving_now(&self, conn: &Connection, chan: ChanId, channel: &str) {
        if self.has_join_leave(channel) && self.is_in(chan, conn.key) {
            self.announce_left(conn, chan, channel);
        }
    }

    /// Announces that `conn`, which was in `channel` (`chan`), left it.
    pub(super) fn announce_left(&self, conn: &Connection, chan: ChanId, channel: &str) {
        if let Some(info) = conn.client_info() {
            let info = self.with_chan_info(info, conn.key, chan);
            self.announce(channel, &info, false);
        }
    }

    /// A join or leave message reached the shard: its frame goes to the local subscribers
    /// that receive them (all, with `force_push_join_leave`; otherwise those that asked).
    pub(super) fn deliver_join_leave(&self, channel: &str, frame: Bytes) {
        let force = (self.cfg.namespace_of(channel)).is_some_and(|ns| ns.force_push_join_leave);
        let extras = self.sub_extras.borrow();
        if !force && extras.is_empty() {
            return; // nobody on this shard asked
        }
        let n = self.deliver(channel, frame, |key, chan| {
            force || extras.pushes_join_leave(key, chan)
        });
        let c = &self.counters.join_leave_deliveries;
        c.set(c.get() + n);
    }
}
