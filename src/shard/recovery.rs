//! Subscribers that wait for the broker, and what the broker tells a shard about its channels:
//! confirmations of a subscription (Redis mode), stream positions and recovery of history
//! channels, connect replies completed by their server-side subscriptions, and insufficient
//! state (publications lost beyond repair: subscribers are told to recover).
//!
//! Shard thread only, called from the broker inbox ([`super::inbox`]). Never blocks; replies are
//! queued to the connections and flushed at the end of the batch.

use super::connection::Connection;
use super::counters::bump;
use super::index::{Waiting, Want};
use super::reason::Reason;
use super::Shard;
use crate::bus::{BrokerError, PositionAnswer, StreamPos, ToBroker};
use crate::config::InsufficientAction;
use crate::conn::ConnKey;
use crate::protocol::reply;
use crate::protocol::ErrorCode;
use crate::ws::{FrameBuf, OP_TEXT};
use std::sync::Arc;

/// A connect reply waiting for the positions of its server-side subscriptions.
pub struct PendingConnect {
    pub(super) id: u32,
    /// The serialised connect result, without `subs`.
    pub(super) base: Vec<u8>,
    pub(super) subs:
        std::collections::BTreeMap<String, (reply::SubscribeResult, Vec<bytes::Bytes>)>,
    pub(super) waiting: u32,
}

impl Shard {
    /// The broker's subscription to `channel` is in place: its waiting subscribers are in.
    pub(super) fn subscribed(&self, channel: &str) {
        let confirmed = {
            let mut index = self.index.borrow_mut();
            let Some(chan) = index.id_of(channel) else {
                return;
            };
            index.get_mut(chan).expect("interned").ready = true;
            index.promote(chan, |w| w.want == Want::Confirm)
        };
        for w in confirmed {
            let result = reply::SubscribeResult::default();
            self.reply_subscribed(&w, channel, &result, &[]);
            self.joined_now(w.key, channel);
        }
    }

    /// A connection left `channel` by the server's doing (failed subscribe, insufficient
    /// state, server unsubscribe): its presence entry goes too (Redis mode keeps presence in
    /// Redis; standalone reads it from the index).
    pub(super) fn presence_left(&self, conn: &Connection, channel: &str) {
        if !self.caps.keeps_presence
            || !self.cfg.namespace_of(channel).is_some_and(|ns| ns.presence)
        {
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
    pub(super) fn reply_subscribed(
        &self,
        w: &Waiting,
        channel: &str,
        result: &reply::SubscribeResult,
        pubs: &[bytes::Bytes],
    ) {
        if let Some(push) = &w.push {
            return self.push_subscribed(w, channel, result, pubs, push);
        }
        if w.id == 0 {
            return;
        }
        // A subscription token's expiry, recorded by the session at subscribe.
        let exp = match self.sub_expiries.borrow().connections() {
            0 => 0,
            _ => (self.index.borrow().id_of(channel))
                .map_or(0, |chan| self.sub_expiries.borrow().get(w.key, chan)),
        };
        let data = self.proxies.take_later_data(w.key, w.id);
        let changed;
        let result = if exp > 0 || data.is_some() {
            let mut r = result.clone();
            if exp > 0 {
                r.expires = true;
                r.ttl = exp
                    .saturating_sub(crate::clock::unix_now())
                    .clamp(1, u32::MAX as u64) as u32;
            }
            r.data = data;
            changed = r;
            &changed
        } else {
            result
        };
        let conn = self.conn(w.key);
        if let Some(conn) = conn {
            let len = 96 + pubs.iter().map(|p| p.len() + 1).sum::<usize>();
            let mut f = FrameBuf::with_capacity(len);
            reply::result_with_publications(f.payload(), w.id, "subscribe", result, pubs);
            conn.push(&self.ctx(), f.finish(OP_TEXT));
        }
    }

    /// A server API subscription is in: its subscribe push, then the publications it
    /// recovered (as publication pushes), in one frame.
    fn push_subscribed(
        &self,
        w: &Waiting,
        channel: &str,
        result: &reply::SubscribeResult,
        pubs: &[bytes::Bytes],
        push: &crate::conn::server_side::ServerPush,
    ) {
        let Some(conn) = self.conn(w.key) else {
            return;
        };
        let mut result = result.clone();
        result.data = push.data.clone();
        let len = 128
            + pubs
                .iter()
                .map(|p| p.len() + channel.len() + 32)
                .sum::<usize>();
        let mut f = FrameBuf::with_capacity(len);
        reply::subscribe_push(f.payload(), channel, &result);
        for p in pubs {
            f.payload().push(b'\n');
            crate::protocol::publication::push(f.payload(), channel, p);
        }
        conn.push(&self.ctx(), f.finish(OP_TEXT));
    }

    /// Fails the waiting subscribers of `channel` that `pick` selects with `code`.
    pub(super) fn fail_waiting(
        &self,
        channel: &str,
        code: ErrorCode,
        pick: impl Fn(&Waiting) -> bool,
    ) {
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
            self.sub_extras.borrow_mut().remove(w.key, chan);
            let conn = self.conn(w.key);
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
                conn.push(&self.ctx(), f.finish(OP_TEXT));
            }
        }
    }

    /// The broker's position answer for the subscriber waiting under `token`: it joins the
    /// channel now, so it gets every publication after `top` live, and the ones it missed in
    /// its reply.
    pub(super) fn position_answer(
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
            positioned: true,
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
            self.joined_now(waiter.key, channel);
        }
    }

    /// One server-side subscription of a waiting connect is in; the last one sends the reply.
    pub(super) fn connect_part(
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
        let conn = self.conn(key);
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
            conn.push(&self.ctx(), f.finish(OP_TEXT));
            // Its server-side subscriptions are announced once the connect reply is out.
            for channel in done.subs.keys() {
                self.joined_now(key, channel);
            }
        }
    }

    /// A server-side subscription of a waiting connect failed: the connection cannot be
    /// what its token says, so it is closed (3004, the SDK reconnects).
    pub(super) fn connect_failed(&self, conn: &Connection) {
        if self.connects.borrow_mut().remove(&conn.key).is_some() {
            conn.close(&self.ctx(), Reason::ServerError);
        }
    }

    /// The node lost publications of `channel` it cannot repair: every local subscriber is
    /// told to recover (unsubscribe push 2500, the SDKs resubscribe with their position and
    /// learn whether anything could be recovered).
    pub(super) fn insufficient(&self, channel: &str) {
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
        let join_leave = self.has_join_leave(channel);
        for key in keys {
            let conn = self.conn(key);
            let Some(conn) = conn else {
                self.sub_extras.borrow_mut().remove(key, chan);
                continue;
            };
            conn.drop_subscription(chan);
            self.presence_left(&conn, channel);
            if join_leave && !waiting.iter().any(|w| w.key == key) {
                self.announce_left(&conn, chan, channel);
            }
            self.sub_extras.borrow_mut().remove(key, chan);
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
                    conn.close(&self.ctx(), Reason::InsufficientState);
                    continue;
                }
                None => {
                    bump(&self.counters.insufficient_unsubscribes);
                    reply::unsubscribe_push(f.payload(), channel, 2500, "insufficient state")
                }
            }
            conn.push(&self.ctx(), f.finish(OP_TEXT));
        }
    }
}
