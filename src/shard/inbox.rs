//! The shard's broker inbox: the task that drains [`ToShard`] messages in batches whenever the
//! broker rings, and the dispatch of each message (fan-out of publications, answers to
//! requests, gather parts, commands on connections; subscription answers go on to
//! [`super::recovery`]).
//!
//! Shard thread only, one task in a default-latency queue (see [`super::tasks`]). A batch yields
//! every 256 messages and ends with the backlog retry and one flush of every connection it
//! touched. Never blocks; no borrow is held across an `.await`.

use super::connection::Connection;
use super::counters::bump;
use super::reason::Reason;
use super::Shard;
use crate::bus::{Part, Query, ShardCommand, ShardInbox, StreamPos, ToBroker, ToShard};
use crate::conn::server_side::ServerCommand;
use crate::protocol::reply;
use crate::protocol::ErrorCode;
use crate::ws::{FrameBuf, OP_TEXT};
use futures_lite::AsyncReadExt;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Drains the broker queue whenever the broker wakes us, in batches.
pub(super) async fn inbox_loop(shard: Rc<Shard>, inbox: ShardInbox) {
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
        // The fan-out is flushed by the I/O side's flusher task, which runs after the tasks
        // this batch woke (API calls whose publish was just acknowledged answer first).
        shard.want_flush();
        match wake.read(&mut bytes).await {
            Ok(0) | Err(_) => {
                // The broker is gone: close every connection and end the shard.
                let conns = shard.conns.borrow().all();
                for c in conns {
                    c.close(&shard.ctx(), Reason::Shutdown);
                }
                shard.flush_dirty();
                return;
            }
            Ok(_) => {}
        }
    }
}

impl Shard {
    /// Applies one broker message.
    pub(super) fn handle(&self, msg: ToShard) {
        match msg {
            ToShard::Publication {
                channel,
                frame,
                offset,
                epoch,
            } => {
                {
                    let mut index = self.index.borrow_mut();
                    let Some(id) = index.id_of(&channel) else {
                        return;
                    };
                    let ch = index.get_mut(id).expect("interned");
                    // Only once a position answer of this incarnation of the channel set it:
                    // until then, publications may be left over from before the shard last
                    // left it.
                    if let (Some(epoch), Some(_)) = (epoch, &ch.position) {
                        ch.position = Some(StreamPos { offset, epoch });
                    }
                }
                self.deliver(&channel, frame, |_, _| true);
            }
            ToShard::JoinLeave { channel, frame } => self.deliver_join_leave(&channel, frame),
            ToShard::Collect { gather, query } => {
                let part = self.collect(&query);
                self.send_broker_must(ToBroker::Part { gather, part });
            }
            ToShard::Reply { token, reply } => self.reply(token, reply),
            ToShard::Command(cmd) => self.command(cmd),
            ToShard::SubscribeFailed { channel } => {
                self.fail_waiting(&channel, ErrorCode::Internal, |_| true);
            }
            ToShard::Subscribed { channel } => self.subscribed(&channel),
            ToShard::Position {
                token,
                channel,
                answer,
            } => self.position_answer(token, &channel, answer),
            ToShard::Insufficient { channel } => self.insufficient(&channel),
            ToShard::Emulation(req) => self.emulation(&req),
        }
    }

    /// Queues `frame`, shared, to every local subscriber of `channel` that `wants` it (by
    /// connection and channel id); returns how many got it. The one fan-out of the shard:
    /// publications, repairs and join/leave messages all go through here. JSON connections
    /// get the JSON frame, protobuf ones its protobuf twin (appended by the broker, see
    /// [`crate::bus::publication_frames`]); a frame that came without a twin (a shared push
    /// the broker did not transcode) is transcoded here lazily, once for the shard, when the
    /// first protobuf subscriber needs it.
    pub(super) fn deliver(
        &self,
        channel: &str,
        frame: bytes::Bytes,
        wants: impl Fn(crate::conn::ConnKey, crate::conn::session::ChanId) -> bool,
    ) -> u64 {
        let index = self.index.borrow();
        let Some(id) = index.id_of(channel) else {
            return 0;
        };
        let ch = index.get(id).expect("interned");
        let (json, mut twin) = crate::bus::publication_frames(&frame);
        let conns = self.conns.borrow();
        let ctx = self.ctx();
        let mut n = 0;
        for key in &ch.subscribers {
            if !wants(*key, id) {
                continue;
            }
            let Some(c) = conns.get(*key) else {
                continue;
            };
            if ch.protobuf > 0 && index.is_protobuf(*key) {
                if twin.is_none() {
                    bump(&self.counters.protobuf_transcodes);
                    twin = crate::protocol::protobuf::binary_twin(&json).ok().flatten();
                }
                // Without a twin (not representable) `push` refuses the text frame and closes
                // the connection as a server error.
                c.push(&ctx, twin.clone().unwrap_or_else(|| json.clone()));
            } else {
                c.push(&ctx, json.clone());
            }
            bump(&self.counters.deliveries);
            n += 1;
        }
        n
    }

    fn collect(&self, query: &Query) -> Part {
        let index = self.index.borrow();
        match query {
            Query::Presence(channel) => {
                let conns = self.conns.borrow();
                let list = index
                    .id_of(channel)
                    .and_then(|id| Some((id, index.get(id)?)))
                    .map(|(id, ch)| {
                        ch.subscribers
                            .iter()
                            .filter_map(|k| conns.get(*k))
                            .filter_map(|c| Some(self.with_chan_info(c.client_info()?, c.key, id)))
                            .collect()
                    })
                    .unwrap_or_default();
                Part::Presence(list)
            }
            Query::Channels(pattern) | Query::ClusterChannels(pattern) => Part::Channels(
                index
                    .channels()
                    .filter(|ch| {
                        pattern
                            .as_deref()
                            .map(|p| crate::pattern::glob_match(p, &ch.name))
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
                    let Some(id) = index.id_of(&ch.name) else {
                        continue;
                    };
                    for info in ch
                        .subscribers
                        .iter()
                        .filter_map(|k| conns.get(*k))
                        .filter_map(|c| Some(self.with_chan_info(c.client_info()?, c.key, id)))
                    {
                        all.push((name.clone(), info));
                    }
                }
                Part::PresenceAll(all)
            }
            Query::Stats => Part::Stats {
                counters: {
                    let mut c = self.counters.snapshot();
                    c.extend(self.proxy_counters());
                    c
                },
                connections: self.conns.borrow().len() as u64,
                subscriptions: index.subscriptions(),
                users: self
                    .users
                    .borrow()
                    .names()
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
                for conn in self.user_conns(&user, client.as_deref()) {
                    conn.close_with(&self.ctx(), Reason::Command, code, &reason);
                }
            }
            ShardCommand::Unsubscribe {
                user,
                channel,
                client,
            } => {
                for conn in self.user_conns(&user, client.as_deref()) {
                    self.server_unsubscribe(&conn, &channel);
                }
            }
            ShardCommand::Subscribe { user, sub } => {
                for conn in self.user_conns(&user, sub.client.as_deref()) {
                    conn.server_command(&self.ctx(), ServerCommand::Subscribe(&sub));
                }
            }
            ShardCommand::Refresh {
                user,
                client,
                expired,
                expire_at,
            } => {
                for conn in self.user_conns(&user, client.as_deref()) {
                    if expired {
                        conn.close(&self.ctx(), Reason::Expired);
                    } else {
                        conn.server_command(&self.ctx(), ServerCommand::Refresh { expire_at });
                    }
                }
            }
        }
    }

    /// The local connections of `user` (only the one with client id `client`, when given).
    fn user_conns(&self, user: &str, client: Option<&str>) -> Vec<Rc<Connection>> {
        let keys = self.users.borrow().keys_of(user);
        let conns = keys.into_iter().filter_map(|k| self.conn(k));
        match client {
            None => conns.collect(),
            Some(client) => conns
                .filter(|c| c.client_id().is_some_and(|id| id.to_string() == client))
                .collect(),
        }
    }

    /// Removes a connection from `channel` on the server's request, telling the client.
    fn server_unsubscribe(&self, conn: &Connection, channel: &str) {
        let Some(chan) = self.index.borrow().id_of(channel) else {
            return;
        };
        if !conn.drop_subscription(chan) {
            return;
        }
        self.leaving_now(conn, chan, channel);
        self.unsubscribe_key(chan, conn.key);
        self.presence_left(conn, channel);
        let mut f = FrameBuf::with_capacity(64 + channel.len());
        reply::unsubscribe_push(f.payload(), channel, 2000, "server unsubscribe");
        conn.push(&self.ctx(), f.finish(OP_TEXT));
    }
}
