//! The session's view of its shard: [`ShardHost`] implements [`Host`] for one connection (channel
//! interest, users, broker requests, expiry, rate limit, refusals), and the shard drives a
//! session through it as the connections' [`SessionDriver`].
//!
//! Shard thread only. A host call never blocks and never awaits: what needs the broker is sent
//! (or, for withdrawals, queued in order) and answered later through the inbox.

use super::context::{Expiry, SessionDriver};
use super::counters::bump;
use super::index::{Added, Waiting, Want};
use super::recovery::PendingConnect;
use super::requests::{ClientWait, Pending};
use super::Shard;
use crate::bus::{HistoryQuery, Query, ReplyTo, ToBroker};
use crate::clock::unix_now;
use crate::config::Config;
use crate::conn::bucket::Bucket;
use crate::conn::session::{
    Ack, Awaiting, ChanId, ClientId, Deferred, Ended, Host, Identity, Recovery, Refusal, Session,
};
use crate::conn::sub_extras::SubExtra;
use crate::conn::ConnKey;
use crate::protocol::reply::{self, ClientInfo};
use crate::protocol::token::TokenVerifier;
use crate::protocol::{Disconnect, ErrorCode};
use serde_json::value::RawValue;
use std::rc::Rc;
use std::sync::Arc;

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
    /// The connection's wire: its transport and protocol for the proxies.
    pub wire: super::connection::Wire,
}

impl<'a> ShardHost<'a> {
    /// The host of connection `key`, with its deadlines and (while it handles commands) its
    /// command bucket.
    pub fn new(
        shard: &'a Shard,
        key: ConnKey,
        expiry: Expiry<'a>,
        bucket: Option<&'a mut Bucket>,
    ) -> Self {
        ShardHost {
            shard,
            key,
            expires_at: expiry.conn,
            sub_expires_at: expiry.subs,
            bucket,
            wire: expiry.wire,
        }
    }

    /// Sends a request whose answer the shard relays to command `id` of this connection.
    fn defer(
        &mut self,
        id: u32,
        kind: ClientWait,
        make: impl FnOnce(ReplyTo) -> ToBroker,
    ) -> Result<(), ErrorCode> {
        let pending = Pending::Client {
            conn: self.key,
            id,
            kind,
        };
        let token = self.shard.requests.insert(pending);
        let msg = make(ReplyTo {
            shard: self.shard.id,
            token,
        });
        self.shard.send_broker(msg).inspect_err(|_| {
            self.shard.requests.remove(token);
        })
    }
}

impl Host for ShardHost<'_> {
    fn transport(&self) -> (&'static str, &'static str) {
        self.wire.names()
    }
    fn config(&self) -> &Config {
        &self.shard.cfg
    }
    fn emulation(&self) -> Option<(String, String)> {
        self.shard.emulation_ids(self.key)
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
        let (name, first) = self.shard.users.borrow_mut().register(user, self.key);
        if first && self.shard.caps.routes_users {
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
        let ready_new = !shard.caps.confirms_subscriptions;
        let (ready, known) = match shard.index.borrow().lookup(channel) {
            Some(ch) => (ch.ready, ch.position.clone()),
            None => (ready_new, None),
        };
        // How this subscriber joins: at once, or waiting for the broker. One that gets no
        // answer (a connect's server-side subscription without history) joins at once.
        let answered = id != 0 || recovery.server_push.is_some();
        let wait = if recovery.history && answered {
            match (&recovery.since, ready, &known) {
                // The shard's own position is exact: no broker round trip.
                (None, true, Some(_)) => None,
                _ => Some(Want::Position {
                    token: shard.requests.token(),
                    recovering: recovery.since.is_some(),
                    reject_unrecovered: recovery.reject_unrecovered,
                    connect: recovery.connect,
                }),
            }
        } else if !ready && answered {
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
                        push: recovery.server_push.clone(),
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
                // The node tracks every history channel's offsets (gap repair, 2500 when it
                // cannot): the subscription is positioned, as Centrifugo says with positioning
                // or recovery on.
                positioned: true,
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
            extras: None,
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
    fn set_sub_refresh(&mut self, chan: ChanId, unix_secs: u64) {
        if unix_secs == 0 && *self.sub_expires_at == 0 {
            return;
        }
        let delay = self.shard.cfg.client_expired_sub_close_delay_secs as u64;
        let next =
            (self.shard.sub_expiries.borrow_mut()).set_refresh(self.key, chan, unix_secs, delay);
        *self.sub_expires_at = self.shard.sub_expiry_tick(next);
    }
    fn take_expired_subs(&mut self) -> Vec<(ChanId, bool)> {
        let cutoff =
            unix_now().saturating_sub(self.shard.cfg.client_expired_sub_close_delay_secs as u64);
        let (due, next) = (self.shard.sub_expiries.borrow_mut()).take_due(self.key, cutoff);
        *self.sub_expires_at = self.shard.sub_expiry_tick(next);
        due
    }
    fn set_refresh_at(&mut self, unix_secs: u64) {
        *self.expires_at = self.shard.refresh_tick(unix_secs);
    }
    fn proxy(&mut self, waiting: Awaiting, body: Vec<u8>) -> Result<(), ErrorCode> {
        self.shard.start_proxy(self.key, waiting, body)
    }
    fn proxy_waits(&self, channel: &str) -> bool {
        self.shard.proxies.waits(self.key, channel)
    }
    fn proxy_forget(&mut self, channel: &str) {
        self.shard.proxies.forget(self.key, channel)
    }
    fn later_reply_data(&mut self, id: u32, data: Box<RawValue>) {
        self.shard.proxies.keep_later_data(self.key, id, data)
    }
    fn allow_command(&mut self) -> bool {
        match self.bucket.as_deref_mut() {
            Some(b) => b.take(&self.shard.cfg, self.shard.io.now_ms()),
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
        if !self.shard.caps.keeps_presence {
            return; // presence is read from the shards' own indexes
        }
        let chan_info = match self.shard.index.borrow().id_of(channel) {
            Some(chan) if joined => self.shard.sub_extras.borrow().chan_info(self.key, chan),
            _ => None,
        };
        let channel: Arc<str> = Arc::from(channel);
        let msg = if joined {
            ToBroker::PresenceAdd {
                channel,
                info: ClientInfo {
                    user: who.user.to_string(),
                    client: who.client.to_string(),
                    conn_info: who.info.clone(),
                    chan_info,
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
    fn set_sub_extra(&mut self, chan: ChanId, extra: SubExtra) {
        let mut extras = self.shard.sub_extras.borrow_mut();
        if extra.is_empty() && extras.is_empty() {
            return; // nothing kept anywhere on the shard: no lookup
        }
        extras.set(self.key, chan, extra);
    }
    fn join_leave(&mut self, chan: ChanId, who: &Identity, joined: bool) {
        let shard = self.shard;
        // Only a subscriber that is in is announced (a waiting one joins when it is answered,
        // see `Shard::joined_now`), and only one that was in leaves.
        if !shard.is_in(chan, self.key) {
            return;
        }
        let name = self.channel_name(chan);
        let info = ClientInfo {
            user: who.user.to_string(),
            client: who.client.to_string(),
            conn_info: who.info.clone(),
            chan_info: None,
        };
        let info = shard.with_chan_info(info, self.key, chan);
        shard.announce(&name, &info, joined);
    }
}

impl SessionDriver for Shard {
    fn handle_message(
        &self,
        key: ConnKey,
        session: &mut Session,
        expiry: Expiry<'_>,
        bucket: &mut Bucket,
        text: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), Disconnect> {
        let mut host = ShardHost::new(self, key, expiry, Some(bucket));
        session.handle_message(&mut host, text, out)
    }

    fn expire_subscriptions(
        &self,
        key: ConnKey,
        session: &mut Session,
        expiry: Expiry<'_>,
        out: &mut Vec<u8>,
    ) -> usize {
        let mut host = ShardHost::new(self, key, expiry, None);
        session.expire_subscriptions(&mut host, out)
    }

    fn end_session(&self, key: ConnKey, session: &mut Session) {
        let (mut expires, mut sub_expires) = (0, 0);
        let expiry = Expiry {
            conn: &mut expires,
            subs: &mut sub_expires,
            wire: super::connection::Wire::Json,
        };
        let mut host = ShardHost::new(self, key, expiry, None);
        session.leave_all(&mut host);
        if self.sub_expiries.borrow().connections() > 0 {
            self.sub_expiries.borrow_mut().remove(key);
        }
        self.sub_extras.borrow_mut().remove_conn(key);
        if let Some(ident) = session.identity.as_ref() {
            self.forget_user(&ident.user, key);
        }
        self.connects.borrow_mut().remove(&key);
        self.emulated.borrow_mut().forget(key);
        self.proxies.forget_connection(key);
    }

    fn proxied(
        &self,
        key: ConnKey,
        session: &mut Session,
        expiry: Expiry<'_>,
        waiting: Awaiting,
        answer: Option<&[u8]>,
        out: &mut Vec<u8>,
    ) -> Result<(), Ended> {
        let mut host = ShardHost::new(self, key, expiry, None);
        session.proxied(&mut host, waiting, answer, out)
    }

    fn refresh_due(&self, key: ConnKey, session: &mut Session, expiry: Expiry<'_>) -> bool {
        let mut host = ShardHost::new(self, key, expiry, None);
        session.refresh_due(&mut host)
    }

    fn server_command(
        &self,
        key: ConnKey,
        session: &mut Session,
        expiry: Expiry<'_>,
        cmd: crate::conn::server_side::ServerCommand<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), Disconnect> {
        let mut host = ShardHost::new(self, key, expiry, None);
        session.server_command(&mut host, cmd, out)
    }
}
