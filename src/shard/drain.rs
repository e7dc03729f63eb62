//! One shard's part of the shutdown: once the node drains, its connections are told to
//! reconnect (3001) in paced, shuffled batches over `drain.window_secs`, after
//! `drain.listener_grace_secs` (the node's side, and the order of the whole protocol, is in
//! [`crate::node`]).
//!
//! Shard thread only, stepped by the one-second sweep ([`super::tasks`]). Holds connection keys,
//! not connections: one that ended meanwhile is skipped.

use super::reason::Reason;
use super::Shard;
use crate::conn::ConnKey;

/// One shard's part of the shutdown: tell connections to reconnect in paced, shuffled batches.
pub(super) struct Drain {
    /// Ticks since the drain started.
    pub(super) ticks: u32,
    /// Connections still to be told, in random order.
    queue: Vec<ConnKey>,
    /// How many per tick.
    per_tick: usize,
}

impl Drain {
    pub(super) fn start(shard: &Shard) -> Drain {
        let mut queue: Vec<ConnKey> = shard.conns.borrow().all().iter().map(|c| c.key).collect();
        fastrand::shuffle(&mut queue);
        let window = shard.cfg.drain.window_secs.max(1) as usize;
        let per_tick = queue.len().div_ceil(window).max(1);
        tracing::info!(shard = shard.id, connections = queue.len(), "draining");
        Drain {
            ticks: 0,
            queue,
            per_tick,
        }
    }

    pub(super) fn step(&mut self, shard: &Shard) {
        self.ticks += 1;
        if self.ticks <= shard.cfg.drain.listener_grace_secs || self.queue.is_empty() {
            return;
        }
        // Jitter the batch size (±25%) so nodes draining together do not pulse in step.
        let jitter = fastrand::usize(0..=self.per_tick / 2);
        let n = (self.per_tick * 3 / 4 + jitter).clamp(1, self.queue.len());
        let ctx = shard.ctx();
        for key in self.queue.drain(..n) {
            if let Some(conn) = shard.conn(key) {
                conn.close(&ctx, Reason::Shutdown);
            }
        }
        shard.flush_dirty();
    }
}
