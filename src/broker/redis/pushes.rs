//! What arrives on the subscriber connection: publications, control messages on users'
//! personal channels, and Redis's SUBSCRIBE confirmations.
//!
//! A plain channel's message is already the complete push: it gets a frame header and goes, as
//! one `Bytes`, to every interested shard. A history channel's `OFFSET:EPOCH:PUSH` goes through
//! the tracker (order, duplicates, gaps). Runs as the subscriber connection's reader task on
//! the multiplexer's thread; it must never block and never hold a borrow across `.await`.

use super::mux::Mux;
use super::replies::parse_position;
use super::resp::next_frame;
use super::stream::RedisStream;
use super::tracker::Live;
use crate::bus::{ShardCommand, ToShard};
use crate::protocol::publication;
use crate::ws::{FrameBuf, OP_TEXT};
use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Control messages on a user's personal channel.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Control {
    Disconnect {
        client: Option<String>,
        code: u16,
        reason: String,
    },
    Unsubscribe {
        channel: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
    },
    Subscribe(crate::bus::ServerSubscribe),
    Refresh {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
        #[serde(default)]
        expired: bool,
        #[serde(default)]
        expire_at: u64,
    },
}

impl Control {
    /// The user a command is for, and its control message.
    pub fn encode(cmd: &ShardCommand) -> (Arc<str>, Vec<u8>) {
        let (user, control) = match cmd {
            ShardCommand::Disconnect {
                user,
                client,
                code,
                reason,
            } => (
                user,
                Control::Disconnect {
                    client: client.as_ref().map(|c| c.to_string()),
                    code: *code,
                    reason: reason.to_string(),
                },
            ),
            ShardCommand::Unsubscribe {
                user,
                channel,
                client,
            } => (
                user,
                Control::Unsubscribe {
                    channel: channel.to_string(),
                    client: client.as_ref().map(|c| c.to_string()),
                },
            ),
            ShardCommand::Subscribe { user, sub } => (user, Control::Subscribe((**sub).clone())),
            ShardCommand::Refresh {
                user,
                client,
                expired,
                expire_at,
            } => (
                user,
                Control::Refresh {
                    client: client.as_ref().map(|c| c.to_string()),
                    expired: *expired,
                    expire_at: *expire_at,
                },
            ),
        };
        let body = serde_json::to_vec(&control).expect("control message");
        (user.clone(), body)
    }

    /// The shard command a control message for `user` stands for.
    fn decode(user: Arc<str>, payload: &[u8]) -> Option<ShardCommand> {
        Some(match serde_json::from_slice::<Control>(payload).ok()? {
            Control::Disconnect {
                client,
                code,
                reason,
            } => ShardCommand::Disconnect {
                user,
                client: client.map(Arc::from),
                code,
                reason: reason.into(),
            },
            Control::Unsubscribe { channel, client } => ShardCommand::Unsubscribe {
                user,
                channel: channel.into(),
                client: client.map(Arc::from),
            },
            Control::Subscribe(sub) => ShardCommand::Subscribe {
                user,
                sub: Box::new(sub),
            },
            Control::Refresh {
                client,
                expired,
                expire_at,
            } => ShardCommand::Refresh {
                user,
                client: client.map(Arc::from),
                expired,
                expire_at,
            },
        })
    }
}

/// How long a publish's answer may wait for its push to wake the shard (ms).
const OWED_RING_MS: u64 = 2;

impl Mux {
    /// Rings the shards' doorbells for what this pass of the executor sent them: every
    /// [`crate::bus::ShardLink::send`] of the multiplexer only marks its shard pending and
    /// wakes this task, which glommio runs after the tasks already woken in the same pass.
    /// When a publication's push (subscriber connection) and its PUBLISH reply (command
    /// connection) complete before this task runs, they wake their shard once instead of
    /// twice (measured: often they complete in separate passes, see the README's
    /// `--redis-cost` row). Runs for the multiplexer's life; it never awaits anything but its
    /// own wake-up.
    pub(super) async fn ring_loop(self: std::rc::Rc<Self>) {
        futures_lite::future::poll_fn(|cx| {
            let mut owed = false;
            for link in &self.shards {
                link.defer_rings(cx.waker());
                link.ring_deferred();
                owed |= link.has_owed();
            }
            if !owed {
                if let Some(tx) = self.owed_paid.borrow().as_ref() {
                    let _ = tx.try_send(());
                }
            }
            std::task::Poll::<()>::Pending
        })
        .await
    }

    /// The fallback for owed rings ([`Mux::reply_owed`]): a publish's answer waits for its
    /// push to wake the shard, at most `OWED_RING_MS`; then (a push that never came: the
    /// channel was unsubscribed meanwhile, or the subscriber connection failed) it is rung
    /// here. The timer is cancelled as soon as the rings are paid, so an ordinary publication
    /// costs no timer expiry.
    pub(super) async fn owed_loop(self: std::rc::Rc<Self>) {
        use glommio::channels::local_channel;
        let (armed_tx, armed) = local_channel::new_bounded::<()>(1);
        let (paid_tx, paid) = local_channel::new_bounded::<()>(1);
        *self.owed_armed.borrow_mut() = Some(armed_tx);
        *self.owed_paid.borrow_mut() = Some(paid_tx);
        let wait = std::time::Duration::from_millis(OWED_RING_MS);
        while armed.recv().await.is_some() {
            loop {
                let expired = futures_lite::future::or(
                    async {
                        glommio::timer::sleep(wait).await;
                        true
                    },
                    async {
                        let _ = paid.recv().await;
                        false
                    },
                )
                .await;
                if expired && self.shards.iter().any(|l| l.has_owed()) {
                    self.stats
                        .redis_owed_rings_late
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    for link in &self.shards {
                        link.ring_owed();
                    }
                }
                if !self.shards.iter().any(|l| l.has_owed()) {
                    break;
                }
            }
        }
    }

    /// Reads the subscriber connection until it fails.
    pub(super) async fn read_pushes(
        &self,
        mut stream: futures_lite::io::ReadHalf<RedisStream>,
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
                // `s...`: Redis Cluster's sharded pub/sub.
                b"message" | b"smessage" => {
                    if let Some(payload) = bulk(2) {
                        self.deliver(&name, payload);
                    }
                }
                b"subscribe" | b"ssubscribe" => self.subscribed(&name),
                // Also sent by a cluster node whose slot moved away.
                b"sunsubscribe" => self.slot_moved(&name),
                _ => {}
            }
        }
    }

    /// Redis confirmed a SUBSCRIBE.
    fn subscribed(&self, name: &[u8]) {
        if self.survey_subscribed(name) {
            return;
        }
        let Some(channel) = self.keys.channel_of(name) else {
            return;
        };
        let channel: Arc<str> = Arc::from(channel);
        let first = self.confirming.borrow_mut().remove(&channel);
        let tracked = self.tracker.borrow().is_history(&channel)
            && self.interest.borrow().mask(&*channel) != 0;
        if tracked {
            // History channel: confirmed to the shards once its position is read (first
            // time), or repaired (after a reconnect).
            let mut out = Vec::new();
            self.tracker.borrow_mut().subscribed(&channel, &mut out);
            self.apply(out);
            self.flush();
        } else if first {
            self.confirm(&channel);
        }
    }

    fn deliver(&self, name: &[u8], payload: Bytes) {
        if let Some(channel) = self.keys.channel_of(name) {
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
            if crate::protocol::reply::is_join_leave_push(&channel, &payload) {
                // A join or leave: never through the tracker, never an offset.
                crate::broker::send_to(&self.shards, mask, || ToShard::JoinLeave {
                    channel: channel.clone(),
                    frame: frame.clone(),
                });
                return;
            }
            self.forward(&channel, frame, 0, None);
            return;
        }
        if self.survey_message(name, &payload) {
            return;
        }
        if let Some(uid) = self.keys.node_of(name) {
            // This node's channel: an emulation request another node received.
            match serde_json::from_slice::<Box<crate::bus::Emulation>>(&payload) {
                Ok(req) if uid == self.node.uid && req.node == uid => {
                    req.route(&self.shards, &self.stats)
                }
                _ => {
                    self.stats
                        .emulation_unroutable
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            return;
        }
        // A user's personal channel: a control message for their connections.
        let Some(user) = self.keys.user_of(name) else {
            return;
        };
        let Some(cmd) = Control::decode(Arc::from(user), &payload) else {
            tracing::warn!(%user, "unreadable control message ignored");
            return;
        };
        let mask = self.users.borrow().mask(user);
        crate::broker::send_to(&self.shards, mask, || ToShard::Command(cmd.clone()));
    }
}

/// A history channel's pub/sub message `OFFSET:EPOCH:PUSH` → its frame and publication.
fn parse_live(channel: &str, payload: &Bytes) -> Option<Live> {
    let first = payload.iter().position(|&b| b == b':')?;
    let second = first + 1 + payload[first + 1..].iter().position(|&b| b == b':')?;
    let pos = parse_position(&payload[..second])?;
    let push = payload.slice(second + 1..);
    let object = publication::object_in_push(channel, &push)?;
    let mut frame = FrameBuf::with_capacity(push.len());
    frame.payload().extend_from_slice(&push);
    Some(Live {
        offset: pos.offset,
        epoch: pos.epoch,
        frame: frame.finish(OP_TEXT),
        publication: push.slice(object),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip() {
        let cmd = ShardCommand::Disconnect {
            user: "u".into(),
            client: None,
            code: 4000,
            reason: "x".into(),
        };
        let (user, body) = Control::encode(&cmd);
        assert_eq!(&*user, "u");
        assert_eq!(
            String::from_utf8(body.clone()).unwrap(),
            r#"{"disconnect":{"client":null,"code":4000,"reason":"x"}}"#
        );
        assert!(matches!(
            Control::decode(user, &body),
            Some(ShardCommand::Disconnect { code: 4000, .. })
        ));
        assert!(Control::decode("u".into(), b"{}").is_none());
    }

    #[test]
    fn live_history_messages_split_into_position_frame_and_publication() {
        let object = br#"{"data":1,"offset":12}"#;
        let mut payload = b"12:ep:".to_vec();
        publication::push(&mut payload, "h:1", object);
        let live = parse_live("h:1", &Bytes::from(payload.clone())).unwrap();
        assert_eq!((live.offset, &*live.epoch), (12, "ep"));
        assert_eq!(&live.publication[..], object);
        assert_eq!(live.frame, crate::broker::push_frame("h:1", object));
        assert!(parse_live("h:2", &Bytes::from(payload)).is_none());
        assert!(parse_live("h:1", &Bytes::from_static(b"12:ep")).is_none());
    }
}
