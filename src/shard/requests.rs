//! Requests this shard made to the broker and the answers it relays: the pending table (token →
//! who waits), the HTTP API's awaited requests ([`Shard::request`], bounded by
//! `limits.broker_reply_timeout_ms`) and the replies to client commands answered later
//! (publish acknowledgements, presence, history).
//!
//! Shard thread only. The API caller awaits a local channel; nothing else here awaits, and no
//! borrow of the pending table is held across the wait.

use super::Shard;
use crate::bus::{BrokerError, BrokerReply, Part, ReplyTo, ToBroker};
use crate::conn::session::Deferred;
use crate::conn::ConnKey;
use crate::protocol::reply::{self, presence_result, presence_stats};
use crate::protocol::ErrorCode;
use crate::ws::{FrameBuf, OP_TEXT};
use glommio::channels::local_channel::{self, LocalSender};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::Duration;

/// Who waits for a broker answer.
pub(super) enum Pending {
    /// A client command: reply to command `id` of connection `conn`.
    Client {
        conn: ConnKey,
        id: u32,
        kind: ClientWait,
    },
    /// An HTTP API request, awaiting on a local channel.
    Api(LocalSender<BrokerReply>),
}

/// What kind of client command waits, to shape its reply.
#[derive(Clone, Copy)]
pub(super) enum ClientWait {
    Publish,
    Gather(Deferred),
    History,
}

/// The pending table, with the shard's token sequence (tokens also tag position requests).
pub(super) struct Requests {
    pending: RefCell<HashMap<u64, Pending>>,
    next_token: Cell<u64>,
}

impl Default for Requests {
    fn default() -> Self {
        Requests {
            pending: RefCell::default(),
            next_token: Cell::new(1),
        }
    }
}

impl Requests {
    /// A fresh token.
    pub fn token(&self) -> u64 {
        let t = self.next_token.get();
        self.next_token.set(t + 1);
        t
    }

    /// Registers a waiter under a fresh token.
    pub fn insert(&self, pending: Pending) -> u64 {
        let token = self.token();
        self.pending.borrow_mut().insert(token, pending);
        token
    }

    pub fn remove(&self, token: u64) -> Option<Pending> {
        self.pending.borrow_mut().remove(&token)
    }
}

impl Shard {
    /// Sends a request to the broker and waits for its answer (HTTP API), at most
    /// `limits.broker_reply_timeout_ms`; then error 100 (temporary).
    pub async fn request(
        &self,
        make: impl FnOnce(ReplyTo) -> ToBroker,
    ) -> Result<BrokerReply, ErrorCode> {
        let (tx, rx) = local_channel::new_bounded(1);
        let token = self.requests.insert(Pending::Api(tx));
        if let Err(e) = self.send_broker(make(ReplyTo {
            shard: self.id,
            token,
        })) {
            self.requests.remove(token);
            return Err(e);
        }
        let wait = Duration::from_millis(self.cfg.limits.broker_reply_timeout_ms as u64);
        match glommio::timer::timeout(wait, async { Ok(rx.recv().await) }).await {
            Ok(Some(reply)) => Ok(reply),
            _ => {
                self.requests.remove(token);
                Err(ErrorCode::Internal)
            }
        }
    }

    /// The broker answered the request under `token`.
    pub(super) fn reply(&self, token: u64, reply: BrokerReply) {
        match self.requests.remove(token) {
            None => {}
            Some(Pending::Api(tx)) => {
                let _ = tx.try_send(reply);
            }
            Some(Pending::Client { conn, id, kind }) => self.reply_client(conn, id, kind, reply),
        }
    }

    fn reply_client(&self, key: ConnKey, id: u32, kind: ClientWait, reply: BrokerReply) {
        let Some(conn) = self.conn(key) else {
            return;
        };
        let mut f = FrameBuf::with_capacity(64);
        match (kind, reply) {
            (ClientWait::Publish, BrokerReply::Published(Ok(_))) => {
                reply::result(f.payload(), id, "publish", &reply::Empty {})
            }
            (ClientWait::Gather(Deferred::Presence), BrokerReply::Gathered(Part::Presence(p))) => {
                reply::result(f.payload(), id, "presence", &presence_result(p))
            }
            (
                ClientWait::Gather(Deferred::PresenceStats),
                BrokerReply::Gathered(Part::Presence(p)),
            ) => reply::result(f.payload(), id, "presence_stats", &presence_stats(&p)),
            (ClientWait::History, BrokerReply::History(Ok(page)))
                if page.pubs.iter().map(|p| p.len() + 1).sum::<usize>()
                    > self.cfg.limits.max_outbox_bytes / 2 =>
            {
                // The page would not fit the connection's write queue: ask for fewer.
                reply::error(f.payload(), id, ErrorCode::LimitExceeded, false)
            }
            (ClientWait::History, BrokerReply::History(Ok(page))) => {
                let result = reply::HistoryResult {
                    epoch: &page.epoch,
                    offset: page.offset,
                };
                reply::result_with_publications(f.payload(), id, "history", &result, &page.pubs)
            }
            (ClientWait::History, BrokerReply::History(Err(BrokerError::Unrecoverable))) => {
                reply::error(f.payload(), id, ErrorCode::UnrecoverablePosition, false)
            }
            _ => reply::error(f.payload(), id, ErrorCode::Internal, true),
        }
        conn.push(&self.ctx(), f.finish(OP_TEXT));
    }
}

#[cfg(test)]
mod tests {
    use crate::bus::{NodeInfo, Query, ToBroker};
    use crate::config::Config;
    use crate::protocol::ErrorCode;
    use crate::shard::Shard;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// A broker that never answers: the API request gives up after
    /// `limits.broker_reply_timeout_ms` with a temporary error, and forgets its waiter.
    #[test]
    fn an_unanswered_request_times_out_after_the_configured_wait() {
        let (result, elapsed, sent, left) = glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let mut cfg = Config {
                    insecure: true,
                    ..Config::default()
                };
                cfg.limits.broker_reply_timeout_ms = 100;
                let node = Arc::new(NodeInfo::new("t".into(), "t".into(), "t".into(), 1));
                let (tx, inbox) = crate::bus::broker_queue(4, false).unwrap();
                let shard = Shard::new(0, Arc::new(cfg), node, tx);
                let started = Instant::now();
                let result = shard
                    .request(|reply| ToBroker::Gather {
                        query: Query::Stats,
                        reply,
                    })
                    .await;
                let sent = inbox.rx.try_recv().is_ok();
                let left = shard.requests.pending.borrow().len();
                (result.err(), started.elapsed(), sent, left)
            })
            .unwrap()
            .join()
            .unwrap();
        assert!(sent, "the request reached the broker queue");
        assert_eq!(result, Some(ErrorCode::Internal));
        assert!(
            elapsed >= Duration::from_millis(100) && elapsed < Duration::from_secs(5),
            "waited {elapsed:?}"
        );
        assert_eq!(left, 0, "the waiter is forgotten");
    }
}
