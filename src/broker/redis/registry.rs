//! The node's entries in Redis that live by its lease: the node registry (`PREFIX:node:UID`
//! plus its expiry in `PREFIX:nodes`) and the presence entries it owns (`PREFIX:presence:{C}`,
//! each value `UID|client info`, counted only while that lease lives).
//!
//! The lease loop refreshes the registry entry every `lease_refresh_secs` with the node's
//! counts (a gather over its shards), keeps the cluster list for the status page, sweeps the
//! tracker's caches and updates the cache gauge. Runs on the multiplexer's thread; the loop
//! sleeps on a glommio timer and never blocks.

use super::mux::{GatherTarget, Mux};
use super::replies::Waiter;
use super::resp::Command;
use crate::bus::{BrokerError, BrokerReply, NodeCounts, Part, Query, ReplyTo};
use crate::protocol::reply::ClientInfo;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Mux {
    /// A client joined a presence channel: its entry, owned by this node's lease.
    pub(super) fn presence_add(&self, channel: &str, info: &ClientInfo) {
        if !self.is_up() {
            return;
        }
        let mut value = self.node.uid.clone().into_bytes();
        value.push(b'|');
        serde_json::to_writer(&mut value, info).expect("client info");
        let key = self.keys.presence(channel);
        self.command(Waiter::Ignore, |out| {
            Command::new(out, 4)
                .arg(b"HSET")
                .parts(&key.0)
                .arg(info.client.as_bytes())
                .arg(&value);
        });
        let ttl = self.cfg.redis_options.presence_ttl_secs as u64;
        self.command(Waiter::Ignore, |out| {
            Command::new(out, 3).arg(b"EXPIRE").parts(&key.0).int(ttl);
        });
    }

    /// A client left a presence channel.
    pub(super) fn presence_remove(&self, channel: &str, client: &str) {
        if !self.is_up() {
            return;
        }
        let key = self.keys.presence(channel);
        self.command(Waiter::Ignore, |out| {
            Command::new(out, 3)
                .arg(b"HDEL")
                .parts(&key.0)
                .arg(client.as_bytes());
        });
    }

    /// A channel's presence across the cluster (entries of live leases only).
    pub(super) fn presence(&self, channel: &str, reply: ReplyTo) {
        if !self.is_up() {
            self.reply(reply, BrokerReply::Failed(BrokerError::Unavailable));
            return;
        }
        if self.cluster {
            // The lease zset is in another slot than the channel's presence hash: read the
            // live uids first, then filter the hash with them ([`Waiter::PresenceLive`]).
            self.command(Waiter::PresenceLive(reply, channel.into()), |out| {
                Command::new(out, 4)
                    .arg(b"ZRANGEBYSCORE")
                    .arg(self.keys.nodes())
                    .int(now_ms())
                    .arg(b"+inf");
            });
            return;
        }
        self.eval(Waiter::Presence(reply), |out| {
            self.scripts
                .encode_presence(out, &self.keys, channel, now_ms())
        });
    }

    /// The node is draining: its registry entry goes now.
    pub(super) fn leave(&self) {
        self.leaving.set(true);
        if self.is_up() {
            let key = self.keys.node(&self.node.uid);
            self.command(Waiter::Ignore, |out| {
                Command::new(out, 2).arg(b"DEL").parts(&key.0);
            });
            self.command(Waiter::Left, |out| {
                Command::new(out, 3)
                    .arg(b"ZREM")
                    .arg(self.keys.nodes())
                    .arg(self.node.uid.as_bytes());
            });
        } else {
            self.node.left_registry.store(true, Ordering::SeqCst);
        }
        tracing::info!("leaving the node registry");
    }

    pub(super) async fn lease_loop(self: Rc<Self>) {
        let every = Duration::from_secs(self.cfg.redis_options.lease_refresh_secs as u64);
        loop {
            if self.is_up() {
                self.gather(Query::Stats, GatherTarget::Lease);
            }
            self.tracker.borrow_mut().sweep(std::time::Instant::now());
            self.sweep_surveys(std::time::Instant::now());
            let cached = self.tracker.borrow().cache_bytes() as u64;
            self.stats
                .recovery_cache_bytes
                .store(cached, Ordering::Relaxed);
            glommio::timer::sleep(every).await;
        }
    }

    /// Writes this node's registry entry (its lease).
    pub(super) fn write_lease(&self, stats: Part) {
        let Part::Stats {
            connections,
            subscriptions,
            users,
            ..
        } = stats
        else {
            return;
        };
        if !self.is_up() || self.leaving.get() {
            return;
        }
        let ttl_ms = self.cfg.redis_options.lease_ttl_secs as u64 * 1000;
        let counts = NodeCounts {
            clients: connections,
            users: Some(users.len() as u64),
            subs: subscriptions,
            channels: self.interest.borrow().len() as u64,
            counters: None,
        };
        let entry = self.node.info_entry(true, counts).to_string();
        let key = self.keys.node(&self.node.uid);
        self.command(Waiter::Ignore, |out| {
            Command::new(out, 5)
                .arg(b"SET")
                .parts(&key.0)
                .arg(entry.as_bytes())
                .arg(b"PX")
                .int(ttl_ms);
        });
        self.command(Waiter::Ignore, |out| {
            Command::new(out, 4)
                .arg(b"ZADD")
                .arg(self.keys.nodes())
                .int(now_ms() + ttl_ms)
                .arg(self.node.uid.as_bytes());
        });
        self.eval_nodes(Waiter::NodesCache);
        self.flush();
    }

    /// Reads the registry's live nodes (dropping lapsed leases) for `waiter`.
    pub(super) fn eval_nodes(&self, waiter: Waiter) {
        self.eval(waiter, |out| {
            self.scripts.encode_nodes(out, &self.keys, now_ms())
        });
    }
}
