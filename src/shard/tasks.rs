//! A shard's thread: its start, and its tasks in the order they start: the broker inbox, the
//! I/O loop, the accept loop and the one-second sweep (timer wheel, snapshot, backlog retry,
//! drain).
//!
//! Runs inside the shard's glommio executor (`shardcast-shard-N`). The start-up result goes
//! back to the node on `ready` (a ring that cannot be set up is an error naming the shard,
//! the missing feature and the kernel, not a panic). No task blocks; each one borrows the shard's cells only between awaits.

use super::drain::Drain;
use super::inbox::inbox_loop;
use super::io::spawn_io;
use super::{Shard, ShardError};
use crate::bus::{BrokerCaps, BrokerTx, NodeInfo, ShardId, ShardInbox};
use crate::config::Config;
use glommio::net::TcpListener;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Everything a shard thread needs, moved into its executor.
pub struct ShardParts {
    pub id: ShardId,
    pub cfg: Arc<Config>,
    pub node: Arc<NodeInfo>,
    pub to_broker: BrokerTx,
    /// What the node's broker needs from the shards.
    pub caps: BrokerCaps,
    pub inbox: ShardInbox,
    /// The bound, listening socket of this shard (SO_REUSEPORT).
    pub listener: socket2::Socket,
    /// Told once the accept loop runs, or why the shard could not start.
    pub ready: std::sync::mpsc::Sender<Result<ShardId, ShardError>>,
    /// Set by the node to stop the shard.
    pub stop: Arc<AtomicBool>,
}

/// Runs a shard until its broker link closes; call inside its glommio executor.
pub async fn run(parts: ShardParts) {
    let ShardParts {
        id,
        cfg,
        node,
        to_broker,
        caps,
        inbox,
        listener,
        ready,
        stop,
    } = parts;
    let shard = match Shard::open(id, cfg, node, to_broker, caps) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    *shard.inbox_probe.borrow_mut() = Some(inbox.rx.clone());
    // SAFETY: the fd is a bound, listening TCP socket we own; ownership moves to glommio.
    let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };

    // The inbox is woken by an io_uring completion (the socketpair byte), not by a foreign
    // waker, so it does not need a latency-sensitive queue. Measured: in a `Latency::Matters`
    // queue a node fed only by its broker (Redis mode, no local HTTP traffic) delivered with a
    // p99 of 0.4-1 s (the wake-up surfaced only at the next 1 s timer); in the default queue
    // its p99 matches the publishing node's (`cargo bench --bench fanout -- --redis`).
    let inbox_queue = glommio::executor().create_task_queue(
        glommio::Shares::default(),
        glommio::Latency::NotImportant,
        "broker-inbox",
    );
    let s = shard.clone();
    let inbox_task =
        glommio::spawn_local_into(async move { inbox_loop(s, inbox).await }, inbox_queue)
            .expect("task queue exists");
    spawn_io(&shard);

    let s = shard.clone();
    let accept = glommio::spawn_local(async move {
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    super::counters::bump(&s.counters.accepted);
                    let _ = stream.set_nodelay(true);
                    glommio::spawn_local(super::front_door::serve(s.clone(), stream)).detach();
                }
                Err(e) => {
                    // EMFILE/ENFILE: back off briefly instead of spinning.
                    tracing::warn!(shard = s.id, error = %e, "accept failed");
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
    .detach();

    // The one-second sweep: timers, and the drain once the node stops. While the node drains
    // it looks at `stop` ten times a second, so that the shard ends promptly once the node is
    // done; an idle shard wakes once a second.
    let s = shard.clone();
    let sweep = glommio::spawn_local(async move {
        let mut drain: Option<Drain> = None;
        let mut accept = Some(accept);
        let mut since_tick = Duration::ZERO;
        while !stop.load(Ordering::Relaxed) {
            let step = match s.node.draining.load(Ordering::Relaxed) {
                true => Duration::from_millis(100),
                false => Duration::from_secs(1),
            };
            glommio::timer::sleep(step).await;
            since_tick += step;
            if since_tick < Duration::from_secs(1) {
                continue;
            }
            since_tick = Duration::ZERO;
            s.tick();
            if drain.is_none() && s.node.draining.load(Ordering::Relaxed) {
                drain = Some(Drain::start(&s));
            }
            if let Some(d) = drain.as_mut() {
                if d.ticks == s.cfg.drain.listener_grace_secs {
                    if let Some(a) = accept.take() {
                        a.cancel(); // drops the listener: new connections are refused
                        tracing::debug!(shard = s.id, "listener closed");
                    }
                }
                d.step(&s);
            }
        }
    });
    let _ = ready.send(Ok(id));
    // The shard ends when the node stops it, or when its broker is gone.
    futures_lite::future::or(inbox_task, sweep).await;
    tracing::debug!(shard = id, "shard stopped");
}
