//! The multiplexer's state and its handling of what the shards ask: one [`Mux`] per node, on
//! the broker thread's glommio executor, shared (`Rc`) by its tasks: the inbox loop here, the
//! link tasks ([`super::link`]), the reply reader ([`super::replies`]), the push reader
//! ([`super::pushes`]) and the lease loop ([`super::registry`]).
//!
//! Each `ToBroker` becomes, at most, a few commands encoded into the batch of the command or
//! subscriber connection; a batch is handed to the connection's writer once per inbox batch
//! ([`Mux::flush`]). Interest is refcounted here (SUBSCRIBE on a channel's first shard,
//! UNSUBSCRIBE on its last). It must never block, and never hold a `RefCell` borrow across an
//! `.await` or across a call that may answer a shard (answers can re-enter the multiplexer).

use super::cluster;
use super::keys::Keys;
use super::link::Link;
use super::replies::Waiter;
use super::scripts::{self, Scripts};
use super::tracker::{Action, PosReq, Tracker};
use super::RedisBroker;
use crate::broker::gather::Gathers;
use crate::broker::{history, Interest};
use crate::bus::NodeInfo;
use crate::bus::{
    BrokerError, BrokerInbox, BrokerReply, BusStats, HistoryQuery, Part, Query, ReplyTo,
    ShardCommand, ShardLink, ToBroker, ToShard,
};
use crate::config::Config;
use crate::config::RedisTarget;
use crate::protocol::publication;
use crate::protocol::reply::ClientInfo;
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Redis Cluster: a slot no live master holds.
pub(super) const NO_LINK: u16 = u16::MAX;

/// What a finished gather over this node's shards is for.
pub(super) enum GatherTarget {
    Shard(ReplyTo),
    /// The lease refresh wants the node's counts.
    Lease,
    /// After link `.0` (re)connected: write again the local presence entries whose keys live
    /// on that master (Redis may have lost them); the other masters still have theirs.
    Reannounce(usize),
    /// This node's part of its own `/api/channels` survey `id` ([`super::survey`]).
    Survey(u64),
    /// This node's answer to survey `id` of node `to`.
    SurveyAnswer {
        id: u64,
        to: Arc<str>,
    },
}

/// The multiplexer.
pub(super) struct Mux {
    pub(super) cfg: Arc<Config>,
    pub(super) node: Arc<NodeInfo>,
    pub(super) stats: Arc<BusStats>,
    /// The Redis the link connects to: the configured one, or under Sentinel the master the
    /// sentinels named last ([`Mux::discover`]).
    pub(super) target: RefCell<RedisTarget>,
    /// `rediss://`: the TLS connector and the name Redis's certificate must carry.
    pub(super) tls: Option<(
        futures_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    pub(super) keys: Keys,
    pub(super) scripts: Scripts,
    pub(super) shards: Vec<ShardLink>,
    /// Channel → mask of shards with local subscribers.
    pub(super) interest: RefCell<Interest<Arc<str>>>,
    /// Channel → shards with protobuf subscribers (a subset of `interest`).
    pub(super) protobuf: RefCell<crate::broker::ProtobufInterest>,
    /// User → mask of shards holding their connections.
    pub(super) users: RefCell<Interest<Arc<str>>>,
    /// Channels whose SUBSCRIBE is sent but not confirmed yet.
    pub(super) confirming: RefCell<HashSet<Arc<str>>>,
    /// The links to Redis, each a command connection and a subscriber connection with their
    /// write sides and reply waiters: one (the Redis, or the master Sentinel names), or under
    /// Redis Cluster one per master (a link whose master holds no slot any more is retired,
    /// its entry reused).
    pub(super) links: RefCell<Vec<Rc<Link>>>,
    /// Redis Cluster mode (`redis_cluster`).
    pub(super) cluster: bool,
    /// Redis Cluster: slot → index in `links` of its master ([`NO_LINK`] while no live master
    /// holds it).
    pub(super) slots: RefCell<Vec<u16>>,
    /// Redis Cluster: asks the topology loop for a refresh now (bounded, one pending).
    pub(super) refresh: RefCell<Option<glommio::channels::local_channel::LocalSender<()>>>,
    /// Tells the owed-ring fallback that a reply waits for its push's ring
    /// ([`Mux::reply_owed`]).
    pub(super) owed_armed: RefCell<Option<glommio::channels::local_channel::LocalSender<()>>>,
    /// Tells the owed-ring fallback that the rings were paid.
    pub(super) owed_paid: RefCell<Option<glommio::channels::local_channel::LocalSender<()>>>,
    /// History channels' positions and repairs.
    pub(super) tracker: RefCell<Tracker>,
    pub(super) gathers: RefCell<Gathers<GatherTarget>>,
    /// `/api/channels` calls waiting for the other nodes.
    pub(super) surveys: RefCell<super::survey::Surveys>,
    /// Draining: no more lease refreshes.
    pub(super) leaving: Cell<bool>,
    /// Reused to build a publication before it is copied into a command.
    scratch: RefCell<Vec<u8>>,
}

impl Mux {
    pub(super) fn new(b: RedisBroker, shards: Vec<ShardLink>) -> Mux {
        let opts = &b.cfg.redis_options;
        let cluster = !b.cfg.redis_cluster.is_empty();
        Mux {
            keys: Keys::with_mode(&opts.prefix, cluster),
            scripts: Scripts::with_mode(cluster),
            links: RefCell::new(if cluster {
                Vec::new()
            } else {
                vec![Rc::new(Link::new(0, opts))]
            }),
            cluster,
            slots: RefCell::new(if cluster {
                vec![NO_LINK; cluster::SLOTS]
            } else {
                Vec::new()
            }),
            refresh: RefCell::default(),
            owed_armed: RefCell::default(),
            owed_paid: RefCell::default(),
            tracker: RefCell::new(Tracker::new(b.cfg.clone(), b.stats.clone())),
            cfg: b.cfg,
            node: b.node,
            stats: b.stats,
            target: RefCell::new(b.target),
            tls: b.tls,
            shards,
            interest: RefCell::default(),
            protobuf: RefCell::default(),
            users: RefCell::default(),
            confirming: RefCell::default(),
            gathers: RefCell::default(),
            surveys: RefCell::default(),
            leaving: Cell::new(false),
            scratch: RefCell::default(),
        }
    }

    /// The single link (not under Redis Cluster); tests.
    pub(super) fn link0(&self) -> Rc<Link> {
        self.links.borrow()[0].clone()
    }

    /// Redis Cluster: the link of the master holding `slot`, if one does.
    pub(super) fn link_at_slot(&self, slot: u16) -> Option<Rc<Link>> {
        let i = *self.slots.borrow().get(slot as usize)?;
        self.links.borrow().get(i as usize).cloned()
    }

    /// The link a command on `key` goes to: the single one, or under Redis Cluster the
    /// master of the key's slot.
    pub(super) fn link_of_key(&self, key: &[u8]) -> Option<Rc<Link>> {
        if !self.cluster {
            return self.links.borrow().first().cloned();
        }
        self.link_at_slot(cluster::slot(key))
    }

    /// The link of an encoded command (by its key, see [`cluster::route_key`]).
    fn link_of_command(&self, encoded: &[u8]) -> Option<Rc<Link>> {
        self.link_of_key(cluster::route_key(encoded)?)
    }

    /// A command connection is up (publishes, presence, reads, the lease); under Redis Cluster
    /// at least one master's (a command to a master that is down is answered with a
    /// temporary error, see [`Mux::command`]).
    pub(super) fn is_up(&self) -> bool {
        self.links.borrow().iter().any(|l| l.cmd.borrow().is_up())
    }

    /// A subscriber connection is up.
    pub(super) fn sub_up(&self) -> bool {
        self.links.borrow().iter().any(|l| l.sub.borrow().is_up())
    }

    /// The subscriber connection that carries pub/sub channel `name` is up.
    pub(super) fn sub_up_at(&self, name: &[u8]) -> bool {
        self.link_of_key(name)
            .is_some_and(|l| l.sub.borrow().is_up())
    }

    /// Whether a publication to `channel` will come back as a push to `shard` (the node
    /// subscribes to it there, and the subscriber connection carrying it is up).
    fn push_expected(&self, channel: &str, shard: usize) -> bool {
        shard < 64
            && self.interest.borrow().mask(channel) & (1 << shard) != 0
            && if self.cluster {
                self.sub_up_at(&self.channel_name(channel))
            } else {
                self.sub_up() // one link: no name to build on the publish path
            }
    }

    /// Answers a publish. When its push to the same shard is `expected`, the answer is queued
    /// without waking the shard: the push's wake-up carries both (one wake-up of the shard per
    /// publication instead of two). Should the push not come, the owed ring is paid within
    /// `OWED_RING_MS` ([`super::pushes`]'s `owed_loop`).
    pub(super) fn reply_owed(&self, to: ReplyTo, reply: BrokerReply, expected: bool) {
        let Some(link) = self.shards.get(to.shard).filter(|_| expected) else {
            return self.reply(to, reply);
        };
        link.send_owed(ToShard::Reply {
            token: to.token,
            reply,
        });
        if let Some(tx) = self.owed_armed.borrow().as_ref() {
            let _ = tx.try_send(());
        }
    }

    pub(super) fn reply(&self, to: ReplyTo, reply: BrokerReply) {
        crate::broker::reply_to(&self.shards, to, reply);
    }

    /// The verb of a pub/sub command: under Redis Cluster its sharded form (`SPUBLISH`,
    /// `SSUBSCRIBE`, `SUNSUBSCRIBE`), so a message travels only within its slot's shard.
    pub(super) fn verb(&self, verb: &'static [u8]) -> &'static [u8] {
        if !self.cluster {
            return verb;
        }
        match verb {
            b"PUBLISH" => b"SPUBLISH",
            b"SUBSCRIBE" => b"SSUBSCRIBE",
            b"UNSUBSCRIBE" => b"SUNSUBSCRIBE",
            other => other,
        }
    }

    /// Queues a command on the command connection with what its reply is for. Over
    /// `redis_options.max_pending_replies` or `max_write_queue_bytes` it is refused: its
    /// requester is answered at once with a temporary error ([`Mux::fail`]). Under Redis
    /// Cluster it goes to the master of its key's slot, and is answered with a temporary error
    /// at once while that master's link is down.
    pub(super) fn command(&self, waiter: Waiter, encode: impl FnOnce(&mut Vec<u8>)) {
        self.queue(waiter, false, encode)
    }

    /// Queues a script call (kept encoded, to be sent again after NOSCRIPT). Stream reads of
    /// the tracker ride above the bounds: there is at most one per tracked channel.
    pub(super) fn eval(&self, waiter: Waiter, encode: impl FnOnce(&mut Vec<u8>)) {
        self.queue(waiter, true, encode)
    }

    fn queue(&self, waiter: Waiter, script: bool, encode: impl FnOnce(&mut Vec<u8>)) {
        let internal = script && matches!(waiter, Waiter::Read { .. });
        if !self.cluster {
            let link = self.link0();
            self.enqueue(&link, waiter, internal, script, 0, encode);
            return;
        }
        let mut encoded = Vec::new();
        encode(&mut encoded);
        match self.link_of_command(&encoded) {
            Some(link) if link.cmd.borrow().is_up() => {
                // Kept: sent again after a MOVED or ASK redirect, or NOSCRIPT.
                self.enqueue(&link, waiter, internal, true, 0, |out| {
                    out.extend_from_slice(&encoded)
                });
            }
            _ => self.fail(waiter),
        }
    }

    /// Queues a command on `link`; `keep`: its encoded bytes stay with its waiter.
    pub(super) fn enqueue(
        &self,
        link: &Link,
        waiter: Waiter,
        internal: bool,
        keep: bool,
        redirects: u8,
        encode: impl FnOnce(&mut Vec<u8>),
    ) {
        if !internal && link.replies.borrow().is_full() {
            self.stats
                .redis_replies_full
                .fetch_add(1, Ordering::Relaxed);
            self.refuse(waiter, "max_pending_replies");
            return;
        }
        let encoded = {
            let mut cmd = link.cmd.borrow_mut();
            let range = if internal {
                Some(cmd.push_unbounded(encode))
            } else {
                cmd.push(encode)
            };
            range.map(|r| keep.then(|| cmd.batch()[r].to_vec()))
        };
        let Some(encoded) = encoded else {
            self.stats
                .redis_write_queue_full
                .fetch_add(1, Ordering::Relaxed);
            self.refuse(waiter, "max_write_queue_bytes");
            return;
        };
        link.replies.borrow_mut().push(waiter, encoded, redirects);
    }

    /// A command refused by a bound: its requester gets a temporary error now.
    fn refuse(&self, waiter: Waiter, bound: &str) {
        let n = self.stats.redis_write_queue_full.load(Ordering::Relaxed)
            + self.stats.redis_replies_full.load(Ordering::Relaxed);
        if n.is_power_of_two() {
            tracing::warn!(
                bound,
                refused = n,
                "Redis command connection congested: commands refused with a temporary error"
            );
        }
        self.fail(waiter);
    }

    /// Queues a command on the subscriber connection (under Redis Cluster, the one of the
    /// channel's slot; skipped while it is down: its resubscribe covers the channel). Over
    /// `max_write_queue_bytes` the connection is reset: reconnected, everything resubscribed,
    /// history channels repaired.
    pub(super) fn sub_command(&self, encode: impl FnOnce(&mut Vec<u8>)) {
        let mut encode = Some(encode);
        let (link, encoded) = if self.cluster {
            let mut encoded = Vec::new();
            if let Some(f) = encode.take() {
                f(&mut encoded);
            }
            let Some(link) = self.link_of_command(&encoded) else {
                return;
            };
            (link, Some(encoded))
        } else {
            (self.link0(), None)
        };
        let mut sub = link.sub.borrow_mut();
        if !sub.is_up() && self.cluster {
            return;
        }
        let pushed = match (encoded, encode) {
            (Some(e), _) => sub.push(|out| out.extend_from_slice(&e)),
            (None, Some(f)) => sub.push(f),
            (None, None) => return,
        };
        if pushed.is_none() {
            self.stats
                .redis_write_queue_full
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!("Redis subscriber connection congested: resetting it");
            sub.detach(); // its writer ends, and with it the connection
        }
    }

    /// Loads every script on `link` (on connect, and again after NOSCRIPT: Redis lost its
    /// cache).
    pub(super) fn load_scripts(&self, link: &Link) {
        for script in self.scripts.all() {
            link.cmd.borrow_mut().push_unbounded(|out| {
                super::resp::encode(out, &[b"SCRIPT", b"LOAD", script.text.as_bytes()])
            });
            link.replies.borrow_mut().push(Waiter::Ignore, None, 0);
        }
    }

    /// Hands the batch's encoded commands to the connection writers.
    pub(super) fn flush(&self) {
        for link in self.links.borrow().iter() {
            link.cmd.borrow_mut().flush();
            link.sub.borrow_mut().flush();
        }
    }

    /// Drains the inbox in batches until every shard is gone.
    pub(super) async fn run(self: Rc<Self>, inbox: BrokerInbox) {
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
        let me = self.clone();
        glommio::spawn_local(async move { me.ring_loop().await }).detach();
        let me = self.clone();
        glommio::spawn_local(async move { me.owed_loop().await }).detach();
        let mut bytes = [0u8; 64];
        loop {
            notified.store(false, Ordering::SeqCst);
            let mut n = 0u32;
            loop {
                match rx.try_recv() {
                    Ok(ToBroker::Stop) => {
                        tracing::debug!("the node stops: multiplexer stops");
                        return;
                    }
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
            match futures_lite::AsyncReadExt::read(&mut wake, &mut bytes).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    pub(super) fn handle(&self, msg: ToBroker) {
        match msg {
            ToBroker::Subscribe { shard, channel } => self.subscribe(shard, channel),
            ToBroker::Unsubscribe { shard, channel } => self.unsubscribe(shard, channel),
            ToBroker::Publish {
                channel,
                data,
                info,
                idempotency_key,
                extras,
                reply,
            } => self.publish(
                &channel,
                &data,
                info.as_deref(),
                extras.as_deref(),
                idempotency_key,
                reply,
            ),
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
                let key = self.keys.stream(&channel);
                self.command(Waiter::Done(reply), |out| {
                    super::resp::Command::new(out, 2).arg(b"DEL").parts(&key.0);
                });
            }
            ToBroker::Gather { query, reply } => self.gather(query, GatherTarget::Shard(reply)),
            ToBroker::Part { gather, part } => self.part(gather, part),
            ToBroker::Command(cmd) => self.user_command(cmd),
            ToBroker::JoinLeave { channel, push } => self.join_leave(&channel, &push),
            ToBroker::PresenceAdd { channel, info } => self.presence_add(&channel, &info),
            ToBroker::PresenceRemove { channel, client } => self.presence_remove(&channel, &client),
            ToBroker::Leave => self.leave(),
            ToBroker::Stop => {} // handled by the run loop
            ToBroker::UserInterest { shard, user, on } => self.user_interest(shard, user, on),
            ToBroker::Emulation(req) => self.emulation(req),
            ToBroker::ProtobufInterest { shard, channel, on } => {
                let mask = self.interest.borrow().mask(&*channel);
                self.protobuf.borrow_mut().set(channel, shard, on, mask);
            }
        }
    }

    fn subscribe(&self, shard: usize, channel: Arc<str>) {
        let first = self.interest.borrow_mut().add(channel.clone(), shard);
        let first_of_node = first && self.interest.borrow().len() == 1;
        let mut name = Vec::new();
        self.keys.channel(&channel).write(&mut name);
        if !self.sub_up_at(&name) {
            // A subscription acknowledged now would silently miss what other nodes publish:
            // refuse it (temporary error; the SDK retries). The shard rolls back and withdraws
            // its interest.
            self.shards[shard].send(ToShard::SubscribeFailed { channel });
        } else if first {
            let key = self.keys.channel(&channel);
            self.sub_command(|out| {
                super::resp::Command::new(out, 2)
                    .arg(self.verb(b"SUBSCRIBE"))
                    .parts(&key.0);
            });
            if first_of_node {
                // The node's first channel: it has something to tell `/api/channels` surveys.
                self.survey_questions(true);
            }
            if self.tracker.borrow().is_history(&channel) {
                self.tracker.borrow_mut().created(&channel);
            }
            self.confirming.borrow_mut().insert(channel);
        } else if !self.confirming.borrow().contains(&channel) {
            self.shards[shard].send(ToShard::Subscribed { channel });
        }
    }

    fn unsubscribe(&self, shard: usize, channel: Arc<str>) {
        self.protobuf.borrow_mut().left(&channel, shard);
        if !self.interest.borrow_mut().remove(&channel, shard) {
            return;
        }

        self.confirming.borrow_mut().remove(&channel);
        let mut out = Vec::new();
        self.tracker.borrow_mut().removed(&channel, &mut out);
        self.apply(out);
        if self.sub_up() {
            let key = self.keys.channel(&channel);
            self.sub_command(|out| {
                super::resp::Command::new(out, 2)
                    .arg(self.verb(b"UNSUBSCRIBE"))
                    .parts(&key.0);
            });
            if self.interest.borrow().is_empty() {
                self.survey_questions(false);
            }
        }
    }

    fn publish(
        &self,
        channel: &str,
        data: &serde_json::value::RawValue,
        info: Option<&ClientInfo>,
        extras: Option<&publication::Extras>,
        idempotency_key: Option<Box<str>>,
        reply: ReplyTo,
    ) {
        if !self.is_up() {
            self.reply(reply, BrokerReply::Published(Err(BrokerError::Unavailable)));
            return;
        }
        self.stats.publications.fetch_add(1, Ordering::Relaxed);
        let ns = self.cfg.namespace_of(channel);
        let mut scratch = self.scratch.borrow_mut();
        scratch.clear();
        // `skip_history`: published as in a channel without history (no offset).
        let history =
            ns.is_some_and(|ns| ns.has_history()) && !extras.is_some_and(|e| e.skip_history);
        if history || idempotency_key.is_some() {
            // The publish script takes the next offset and completes the publication.
            publication::open(&mut scratch, data, info, extras);
            let split = scratch.len();
            publication::push_prefix(&mut scratch, channel);
            let (open, push_prefix) = scratch.split_at(split);
            let window = match idempotency_key {
                Some(_) => self.cfg.limits.idempotency_window_secs,
                None => 0,
            };
            let mut epoch = [0; 16];
            let call = scripts::Publish {
                channel,
                open,
                push_prefix,
                history_size: match history {
                    true => ns.map_or(0, |ns| ns.history_size),
                    false => 0,
                },
                history_ttl_secs: ns.map_or(0, |ns| ns.history_ttl_secs),
                meta_ttl_secs: ns.map_or(0, |ns| ns.history_meta_ttl_secs),
                new_epoch: history::new_epoch_in(&mut epoch),
                idempotency_window_secs: window,
                idempotency_key: idempotency_key.as_deref().unwrap_or(""),
            };
            let expect = self.push_expected(channel, reply.shard);
            self.eval(Waiter::Publish(reply, expect), |out| {
                self.scripts.encode_publish(out, &self.keys, &call)
            });
            return;
        }
        // The payload is the complete push, so receiving nodes only add a frame header.
        publication::push_new(&mut scratch, channel, data, info, extras);
        let key = self.keys.channel(channel);
        let expect = self.push_expected(channel, reply.shard);
        self.command(Waiter::Publish(reply, expect), |out| {
            super::resp::Command::new(out, 3)
                .arg(self.verb(b"PUBLISH"))
                .parts(&key.0)
                .arg(&scratch);
        });
    }

    fn user_interest(&self, shard: usize, user: Arc<str>, on: bool) {
        let (first, last) = if on {
            (self.users.borrow_mut().add(user.clone(), shard), false)
        } else {
            (false, self.users.borrow_mut().remove(&user, shard))
        };
        let verb = match (first, last) {
            (true, _) => self.verb(b"SUBSCRIBE"),
            (_, true) => self.verb(b"UNSUBSCRIBE"),
            _ => return,
        };
        if self.sub_up() {
            let key = self.keys.user(&user);
            self.sub_command(|out| {
                super::resp::Command::new(out, 2).arg(verb).parts(&key.0);
            });
        }
    }

    /// A join or leave message goes onto the channel's pub/sub as its complete push, like a
    /// publication without history (`pushes` tells them apart by the push's kind): no script,
    /// no offset, no stream entry, so the tracker never sees it. Best effort: while Redis is
    /// down it is lost, as in Centrifugo.
    fn join_leave(&self, channel: &str, push: &[u8]) {
        if !self.is_up() {
            return;
        }
        let key = self.keys.channel(channel);
        self.command(Waiter::Ignore, |out| {
            super::resp::Command::new(out, 3)
                .arg(self.verb(b"PUBLISH"))
                .parts(&key.0)
                .arg(push);
        });
    }

    /// An emulation request: this node's goes to its shard; another node's is published on
    /// that node's channel (`PREFIX:node:UID`), which its multiplexer listens on. While Redis
    /// is down another node's request is dropped and counted (the front door answers 503 then).
    fn emulation(&self, req: Box<crate::bus::Emulation>) {
        if req.node == self.node.uid {
            req.route(&self.shards, &self.stats);
            return;
        }
        if !self.is_up() {
            self.stats
                .emulation_unroutable
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let body = serde_json::to_vec(&*req).expect("emulation request");
        let key = self.keys.node(&req.node);
        self.stats
            .emulation_forwarded
            .fetch_add(1, Ordering::Relaxed);
        self.command(Waiter::Ignore, |out| {
            super::resp::Command::new(out, 3)
                .arg(self.verb(b"PUBLISH"))
                .parts(&key.0)
                .arg(&body);
        });
    }

    /// A user command goes to the user's personal channel, so every node applies it.
    fn user_command(&self, cmd: ShardCommand) {
        if !self.is_up() {
            // Redis down: at least this node's connections get it.
            let user = cmd.user().clone();
            tracing::warn!(%user, "Redis down: user command applied on this node only");
            for link in &self.shards {
                link.send(ToShard::Command(cmd.clone()));
            }
            return;
        }
        let (user, body) = super::pushes::Control::encode(&cmd);
        let key = self.keys.user(&user);
        self.command(Waiter::Ignore, |out| {
            super::resp::Command::new(out, 3)
                .arg(self.verb(b"PUBLISH"))
                .parts(&key.0)
                .arg(&body);
        });
    }

    pub(super) fn gather(&self, query: Query, target: GatherTarget) {
        match (&query, &target) {
            (Query::Presence(channel), GatherTarget::Shard(reply)) => {
                self.presence(channel, *reply)
            }
            (Query::ClusterChannels(pattern), GatherTarget::Shard(reply)) => {
                self.survey_channels(pattern.clone(), *reply)
            }
            (Query::Nodes, GatherTarget::Shard(reply)) => {
                if !self.is_up() {
                    self.reply(*reply, BrokerReply::Gathered(Part::Nodes(Vec::new())));
                    return;
                }
                self.eval_nodes(Waiter::Nodes(*reply));
            }
            // Channels and stats are this node's: ask every local shard.
            _ => self
                .gathers
                .borrow_mut()
                .start(&query, target, &self.shards),
        }
    }

    fn part(&self, gather: u64, part: Part) {
        let Some((target, merged)) = self.gathers.borrow_mut().part(gather, part) else {
            return;
        };
        match target {
            GatherTarget::Shard(reply) => self.reply(reply, BrokerReply::Gathered(merged)),
            GatherTarget::Lease => self.write_lease(merged),
            target @ (GatherTarget::Survey(_) | GatherTarget::SurveyAnswer { .. }) => {
                self.survey_part(target, merged)
            }
            GatherTarget::Reannounce(link) => {
                if let Part::PresenceAll(entries) = merged {
                    let mut key = Vec::new();
                    for (channel, info) in entries {
                        key.clear();
                        self.keys.presence(&channel).write(&mut key);
                        if self.link_of_key(&key).is_some_and(|l| l.index == link) {
                            self.presence_add(&channel, &info);
                        }
                    }
                    self.flush();
                }
            }
        }
    }

    /// Hands a publication's frame to the shards with subscribers of `channel`, with its
    /// protobuf twin made here (once for the node) while one of them has protobuf subscribers.
    pub(super) fn forward(
        &self,
        channel: &Arc<str>,
        frame: bytes::Bytes,
        offset: u64,
        epoch: Option<Arc<str>>,
    ) {
        let mask = self.interest.borrow().mask(&**channel);
        if mask == 0 {
            return;
        }
        let protobuf = self.protobuf.borrow().mask(channel) & mask != 0;
        let frame = crate::broker::publication_frame(frame, protobuf, &self.stats);
        crate::broker::send_to(&self.shards, mask, || ToShard::Publication {
            channel: channel.clone(),
            frame: frame.clone(),
            offset,
            epoch: epoch.clone(),
        });
    }

    /// Carries out what the tracker decided.
    pub(super) fn apply(&self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Read {
                    channel,
                    gen,
                    since,
                } => self.read_stream(channel, gen, since),
                Action::Forward { channel, live } => {
                    self.forward(&channel, live.frame.clone(), live.offset, Some(live.epoch));
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
                    crate::broker::send_to(&self.shards, mask, || ToShard::Insufficient {
                        channel: channel.clone(),
                    });
                }
                Action::Confirm { channel } => self.confirm(&channel),
                Action::NewEpoch {
                    channel,
                    old,
                    delivered,
                    new,
                } => {
                    tracing::warn!(%channel, delivered, "the stream in Redis is behind what was delivered (writes lost in a failover): new epoch");
                    if self.is_up() {
                        let waiter = Waiter::NewEpoch {
                            channel: channel.clone(),
                            ours: new.clone(),
                        };
                        self.command(waiter, |out| {
                            Scripts::encode_new_epoch(
                                out, &self.keys, &channel, &old, delivered, &new,
                            )
                        });
                    }
                }
            }
        }
    }

    /// Tells every shard with interest in `channel` that its subscription is in place.
    pub(super) fn confirm(&self, channel: &Arc<str>) {
        let mask = self.interest.borrow().mask(channel);
        crate::broker::send_to(&self.shards, mask, || ToShard::Subscribed {
            channel: channel.clone(),
        });
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
        let waiter = Waiter::Read {
            channel: channel.clone(),
            gen,
            since,
        };
        self.eval_read(&channel, &query, since, waiter);
    }

    /// Runs the read script for `channel`: position, and a page as `query` and `since` ask.
    fn eval_read(&self, channel: &str, query: &HistoryQuery, since: Option<u64>, waiter: Waiter) {
        let Some(ns) = self.cfg.namespace_of(channel) else {
            return;
        };
        let mut epoch = [0; 16];
        let read = scripts::Read {
            channel,
            since: since.or(query.since.as_ref().map(|s| s.offset)),
            limit: query.limit,
            reverse: query.reverse,
            history_size: ns.history_size,
            new_epoch: history::new_epoch_in(&mut epoch),
            meta_ttl_secs: ns.history_meta_ttl_secs,
        };
        self.eval(waiter, |out| {
            self.scripts.encode_read(out, &self.keys, &read)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{shard_link, ShardInbox};
    use serde_json::value::RawValue;

    fn mux(extra: &str) -> (Rc<Mux>, Vec<ShardInbox>) {
        let cfg = Config::from_toml(&format!(
            "insecure = true\nredis = \"redis://127.0.0.1:1\"\n[redis_options]\n{extra}\n[namespaces.h]\nhistory_size = 5\n"
        ))
        .unwrap();
        let cfg = Arc::new(cfg);
        let stats = Arc::new(BusStats::default());
        let (links, inboxes): (Vec<_>, Vec<_>) = (0..2)
            .map(|_| shard_link(64, stats.clone()).unwrap())
            .unzip();
        let node = Arc::new(NodeInfo::new("uid".into(), "n".into(), "a".into(), 1));
        let broker = RedisBroker::new(cfg, node, stats, None).unwrap();
        (Rc::new(Mux::new(broker, links)), inboxes)
    }

    fn publish(m: &Mux, channel: &str, token: u64) {
        m.handle(ToBroker::Publish {
            channel: channel.into(),
            data: RawValue::from_string("{\"n\":1}".into()).unwrap(),
            info: None,
            idempotency_key: None,
            extras: None,
            reply: ReplyTo { shard: 1, token },
        });
    }

    fn refused(inbox: &ShardInbox) -> Vec<u64> {
        let mut tokens = Vec::new();
        while let Ok(msg) = inbox.rx.try_recv() {
            match msg {
                ToShard::Reply {
                    token,
                    reply: BrokerReply::Published(Err(BrokerError::Unavailable)),
                } => tokens.push(token),
                other => panic!("{other:?}"),
            }
        }
        tokens
    }

    #[test]
    fn commands_over_the_write_queue_bound_are_answered_with_a_temporary_error() {
        // Each plain PUBLISH here is 94 bytes: three fit in 300, the fourth does not.
        let (m, inboxes) = mux("max_write_queue_bytes = 300");
        let (writes, _rx) = super::super::link::Writer::detached();
        m.link0().cmd.borrow_mut().attach(writes);
        for token in 1..=3 {
            publish(&m, "c", token);
        }
        assert!(refused(&inboxes[1]).is_empty(), "within the bound");
        publish(&m, "c", 4);
        publish(&m, "h:1", 5); // the history script is larger still
        assert_eq!(refused(&inboxes[1]), [4, 5]);
        assert_eq!(m.stats.redis_write_queue_full.load(Ordering::Relaxed), 2);
        assert_eq!(
            m.link0().replies.borrow().len(),
            3,
            "no waiter for a refused command"
        );
        // Written out, the room comes back.
        m.flush();
        assert_eq!(m.link0().cmd.borrow().queued(), 282);
        m.link0().cmd.borrow().written(282);
        publish(&m, "c", 6);
        assert!(refused(&inboxes[1]).is_empty());
        // Stream reads of the tracker are never refused: one per channel at most.
        m.link0().cmd.borrow().written(0);
        m.stats.redis_write_queue_full.store(0, Ordering::Relaxed);
        m.read_stream("h:1".into(), 1, None);
        assert_eq!(m.stats.redis_write_queue_full.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn commands_over_the_reply_bound_are_answered_with_a_temporary_error() {
        let (m, inboxes) = mux("max_pending_replies = 2");
        let (writes, _rx) = super::super::link::Writer::detached();
        m.link0().cmd.borrow_mut().attach(writes);
        for token in 1..=4 {
            publish(&m, "c", token);
        }
        assert_eq!(refused(&inboxes[1]), [3, 4]);
        assert_eq!(m.stats.redis_replies_full.load(Ordering::Relaxed), 2);
        // A reply frees a slot.
        let _ = m.link0().replies.borrow_mut().pop();
        publish(&m, "c", 5);
        assert!(refused(&inboxes[1]).is_empty());
    }

    #[test]
    fn a_congested_subscriber_connection_is_reset() {
        let (m, inboxes) = mux("max_write_queue_bytes = 60");
        let (writes, _rx) = super::super::link::Writer::detached();
        m.link0().sub.borrow_mut().attach(writes);
        m.handle(ToBroker::Subscribe {
            shard: 0,
            channel: "a".into(),
        });
        assert!(m.sub_up());
        m.handle(ToBroker::Subscribe {
            shard: 0,
            channel: "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb".into(),
        });
        assert!(
            !m.sub_up(),
            "its writer is dropped: the link loop reconnects"
        );
        assert_eq!(m.stats.redis_write_queue_full.load(Ordering::Relaxed), 1);
        assert!(
            inboxes[0].rx.try_recv().is_err(),
            "answered when it resubscribes"
        );
    }
}
