//! Reply correlation on the command connection: Redis answers commands in order, so each
//! command queues a [`Waiter`] saying what its reply is for, and the reader pops one per reply.
//!
//! The queue is bounded (`redis_options.max_pending_replies`, see [`super::mux::Mux::command`]);
//! every waiter is answered exactly once: with its reply, with the temporary error of
//! [`super::mux::Mux::fail`] when the link goes down, or at once when a bound refused its
//! command. Runs on the multiplexer's thread (the reader task); it must never hold the queue's
//! borrow while answering (an answer may queue new commands).

use super::mux::Mux;
use super::resp::{json_items, next_frame};
use super::stream::RedisStream;
use super::tracker::ReadResult;
use crate::bus::{BrokerError, BrokerReply, HistoryPage, Part, ReplyTo, StreamPos};
use crate::protocol::reply::ClientInfo;
use bytes::BytesMut;
use redis_protocol::resp2::types::BytesFrame;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What a command reply is for.
#[derive(Debug)]
pub(super) enum Waiter {
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
    /// A publish; `true` when its push is expected on the same shard (the node subscribes to
    /// the channel there): the reply's wake-up is then left to the push ([`Mux::reply_owed`]).
    Publish(ReplyTo, bool),
    Presence(ReplyTo),
    Nodes(ReplyTo),
    /// PUBLISH of `/api/channels` survey N's question ([`super::survey`]).
    SurveyAsked(u64),
    /// Redis Cluster: the live node uids (lease zset) for a presence read of the channel.
    PresenceLive(ReplyTo, Arc<str>),
    /// The new-epoch script for `channel`, run with the epoch `ours`: another node's may have
    /// won.
    NewEpoch {
        channel: Arc<str>,
        ours: Arc<str>,
    },
}

/// Redirects (MOVED, ASK) one command may follow before its requester gets a temporary error.
pub(super) const MAX_REDIRECTS: u8 = 3;

/// A command in flight: what its reply is for, its encoded bytes when it may be sent again
/// (scripts after NOSCRIPT; under Redis Cluster every command, after MOVED or ASK), and the
/// redirects it followed.
pub(super) type Pending = (Waiter, Option<Vec<u8>>, u8);

/// The waiters of the commands in flight, in command order, each with its encoded command when
/// it runs a script (sent again after NOSCRIPT).
pub(super) struct Replies {
    queue: VecDeque<Pending>,
    max: usize,
}

impl Replies {
    pub fn new(max: usize) -> Replies {
        Replies {
            queue: VecDeque::new(),
            max,
        }
    }

    /// At `redis_options.max_pending_replies`: new requests are refused.
    pub fn is_full(&self) -> bool {
        self.queue.len() >= self.max
    }

    pub fn push(&mut self, waiter: Waiter, encoded: Option<Vec<u8>>, redirects: u8) {
        self.queue.push_back((waiter, encoded, redirects));
    }

    pub fn pop(&mut self) -> Option<Pending> {
        self.queue.pop_front()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Every waiter (the link went down).
    pub fn take(&mut self) -> VecDeque<Pending> {
        std::mem::take(&mut self.queue)
    }
}

impl Mux {
    /// Reads the command connection's replies and answers their waiters, until it fails.
    pub(super) async fn read_replies(
        &self,
        link: &super::link::Link,
        mut stream: futures_lite::io::ReadHalf<RedisStream>,
        mut buf: BytesMut,
    ) -> String {
        loop {
            let frame = match next_frame(&mut stream, &mut buf).await {
                Ok(f) => f,
                Err(e) => return e,
            };
            let Some((waiter, encoded, redirects)) = link.replies.borrow_mut().pop() else {
                return "reply without a command".into();
            };
            if let BytesFrame::Error(e) = &frame {
                if e.starts_with("READONLY") && !self.cfg.redis_sentinel.is_empty() {
                    // Under Sentinel our master turned replica: find the new one.
                    self.answer(waiter, frame);
                    return "the Redis master became a replica (READONLY)".into();
                }
            }
            if let (BytesFrame::Error(e), Some(cmd)) = (&frame, &encoded) {
                if e.starts_with("NOSCRIPT") {
                    // Redis lost its script cache (restart, SCRIPT FLUSH): load and run again.
                    tracing::info!("Redis lost the scripts: loading them again");
                    self.load_scripts(link);
                    link.cmd
                        .borrow_mut()
                        .push_unbounded(|out| out.extend_from_slice(cmd));
                    link.replies.borrow_mut().push(waiter, encoded, redirects);
                    self.flush();
                    continue;
                }
                if self.cluster {
                    if let Some(r) = super::cluster::Redirect::parse(e) {
                        self.redirect(r, waiter, encoded, redirects);
                        continue;
                    }
                }
            }
            self.answer(waiter, frame);
        }
    }

    /// Redis Cluster: follows a MOVED (the slot lives elsewhere now: the topology is refreshed
    /// and the command sent to the named master) or an ASK (`ASKING` and the command, once, to
    /// the named node), at most [`MAX_REDIRECTS`] times per command; past that, or when no
    /// link to the named node is up, the requester gets a temporary error.
    fn redirect(
        &self,
        r: super::cluster::Redirect,
        waiter: Waiter,
        encoded: Option<Vec<u8>>,
        redirects: u8,
    ) {
        if r.ask {
            self.stats.redis_ask.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.redis_moved.fetch_add(1, Ordering::Relaxed);
            self.request_refresh();
        }
        let link = self
            .links
            .borrow()
            .iter()
            .find(|l| {
                l.addr
                    .borrow()
                    .as_ref()
                    .is_some_and(|(h, p)| *h == r.host && *p == r.port)
            })
            .cloned();
        let (Some(link), Some(cmd)) = (link, encoded) else {
            return self.fail(waiter);
        };
        if redirects >= MAX_REDIRECTS || !link.cmd.borrow().is_up() {
            tracing::warn!(slot = r.slot, host = %r.host, port = r.port, "Redis Cluster redirect not followed");
            return self.fail(waiter);
        }
        if r.ask {
            link.cmd
                .borrow_mut()
                .push_unbounded(|out| super::resp::encode(out, &[b"ASKING"]));
            link.replies.borrow_mut().push(Waiter::Ignore, None, 0);
        }
        link.cmd
            .borrow_mut()
            .push_unbounded(|out| out.extend_from_slice(&cmd));
        link.replies
            .borrow_mut()
            .push(waiter, Some(cmd), redirects + 1);
        self.flush();
    }

    /// Answers `waiter` with Redis's reply.
    fn answer(&self, waiter: Waiter, frame: BytesFrame) {
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
            (Waiter::Publish(to, _), BytesFrame::Error(e)) => {
                tracing::warn!(error = %e, "PUBLISH failed");
                self.reply(to, BrokerReply::Published(Err(BrokerError::Unavailable)));
            }
            (Waiter::Publish(to, expect), BytesFrame::Array(items)) => {
                // The publish script: {repeated, "OFFSET:EPOCH" or ""}.
                let repeated = matches!(items.first(), Some(BytesFrame::Integer(1)));
                if repeated {
                    self.stats
                        .idempotent_repeats
                        .fetch_add(1, Ordering::Relaxed);
                }
                // A repeat published nothing: no push will come to wake the shard.
                let expect = expect && !repeated;
                let pos = match items.get(1) {
                    Some(BytesFrame::BulkString(b)) => parse_position(b),
                    _ => None,
                };
                self.reply_owed(to, BrokerReply::Published(Ok(pos)), expect);
            }
            (Waiter::Publish(to, expect), _) => {
                self.reply_owed(to, BrokerReply::Published(Ok(None)), expect)
            }
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
            (Waiter::SurveyAsked(id), BytesFrame::Integer(n)) => {
                self.survey_asked(id, Some(n.max(0) as u64))
            }
            (Waiter::SurveyAsked(id), _) => self.survey_asked(id, None),
            (Waiter::PresenceLive(to, channel), BytesFrame::Array(items)) => {
                let uids: Vec<bytes::Bytes> = items
                    .into_iter()
                    .filter_map(|i| match i {
                        BytesFrame::BulkString(b) => Some(b),
                        _ => None,
                    })
                    .collect();
                self.eval(Waiter::Presence(to), |out| {
                    self.scripts
                        .encode_presence_live(out, &self.keys, &channel, &uids)
                });
                self.flush();
            }
            (Waiter::NewEpoch { channel, ours }, BytesFrame::BulkString(e)) => {
                match std::str::from_utf8(&e) {
                    Ok(winner) if !winner.is_empty() && winner != &*ours => {
                        tracing::info!(%channel, "another node gave the channel its new epoch first");
                        self.tracker
                            .borrow_mut()
                            .rebase(&channel, &ours, winner.into());
                    }
                    _ => {}
                }
            }
            (Waiter::NewEpoch { channel, .. }, other) => {
                tracing::warn!(%channel, reply = ?other, "the new-epoch script failed");
            }
            (Waiter::PresenceLive(to, _), other) => {
                tracing::warn!(reply = ?other, "reading the live nodes failed");
                self.reply(to, BrokerReply::Failed(BrokerError::Unavailable));
            }
        }
    }

    /// Answers `waiter` without Redis: its command was refused or lost with the link. Requests
    /// get a temporary error; a stream read counts as failed (the tracker retries it).
    pub(super) fn fail(&self, waiter: Waiter) {
        match waiter {
            Waiter::Ignore | Waiter::NodesCache | Waiter::NewEpoch { .. } => {}
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
            Waiter::Done(to) | Waiter::Presence(to) | Waiter::PresenceLive(to, _) => {
                self.reply(to, BrokerReply::Failed(BrokerError::Unavailable))
            }
            Waiter::Left => self.node.left_registry.store(true, Ordering::SeqCst),
            Waiter::Publish(to, _) => {
                self.reply(to, BrokerReply::Published(Err(BrokerError::Unavailable)))
            }
            Waiter::Nodes(to) => self.reply(to, BrokerReply::Gathered(Part::Nodes(Vec::new()))),
            Waiter::SurveyAsked(id) => self.survey_asked(id, None),
        }
    }
}

/// `OFFSET:EPOCH` → a stream position.
pub(super) fn parse_position(text: &[u8]) -> Option<StreamPos> {
    let text = std::str::from_utf8(text).ok()?;
    let (offset, epoch) = text.split_once(':')?;
    Some(StreamPos {
        offset: offset.parse().ok()?,
        epoch: Arc::from(epoch),
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn read_replies_and_positions_parse() {
        let bulk = |s: &str| BytesFrame::BulkString(Bytes::copy_from_slice(s.as_bytes()));
        let frame = BytesFrame::Array(vec![
            bulk("ep"),
            BytesFrame::Integer(9),
            bulk("8-0"),
            bulk("{\"data\":8}"),
            bulk("9-0"),
            bulk("{\"data\":9}"),
        ]);
        let r = parse_read(&frame).unwrap();
        assert_eq!((&*r.epoch, r.top), ("ep", 9));
        assert_eq!(r.entries.iter().map(|e| e.0).collect::<Vec<_>>(), [8, 9]);
        assert!(parse_read(&BytesFrame::Error("ERR x".into())).is_none());
        assert!(parse_read(&BytesFrame::Array(vec![bulk("ep"), bulk("9")])).is_none());
        assert_eq!(
            parse_position(b"12:abc"),
            Some(StreamPos {
                offset: 12,
                epoch: "abc".into()
            })
        );
        assert_eq!(parse_position(b""), None);
        let mut q = Replies::new(1);
        assert!(!q.is_full());
        q.push(Waiter::Ignore, None, 0);
        assert!(q.is_full());
        assert_eq!(q.take().len(), 1);
        assert!(!q.is_full());
    }
}
