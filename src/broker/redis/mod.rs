//! Redis mode: the node's multiplexer, on its own thread (`shardcast-broker`) running a glommio
//! executor that is not a shard.
//!
//! It holds the node's two Redis connections: one subscriber connection (SUBSCRIBE and the
//! pushes it brings) and one pipelined command connection (PUBLISH, scripts, presence, the node
//! lease), speaking RESP. It talks to the shards only through the bounded queues of
//! [`crate::bus`], is woken by them once per batch, and wakes each shard once per batch. It
//! must never block its thread: everything waits on the executor.
//!
//! - Interest is refcounted: Redis sees one SUBSCRIBE per node per channel, sent when the first
//!   shard gains a subscriber and withdrawn (UNSUBSCRIBE) when the last shard loses its last one.
//!   Subscribe replies to clients wait for Redis's confirmation, so nothing published after a
//!   client's subscribe reply can be missed.
//! - Every publication goes through Redis, publisher → Redis → every node; one connection per
//!   direction keeps the order of one publisher's publications to one channel.
//! - When Redis fails, client connections stay; publishes and presence answer a temporary error;
//!   the multiplexer reconnects with capped exponential backoff and jitter and resubscribes
//!   every channel in one command.
//! - History channels publish through one Lua script that takes the next offset, appends to the
//!   channel's stream and PUBLISHes `OFFSET:EPOCH:PUSH`, so the live path and the history never
//!   disagree. The node tracks each channel's last offset and repairs gaps from the stream.
//!
//! Layout, one file per noun:
//! - [`mux`]: the multiplexer's state and the handling of each shard request (start here)
//! - [`link`]: the connections' lifecycle and their bounded write queues; [`backoff`] its delays
//! - [`sentinel`]: Redis Sentinel: discovering the master, following `+switch-master`
//! - [`topology`]: Redis Cluster: `CLUSTER SHARDS`, one link per master, moved slots;
//!   [`cluster`] its pure part (slots, redirects, routing keys)
//! - [`stream`]: a connection's socket, plain TCP or TLS (`rediss://`, rustls)
//! - [`replies`]: reply correlation on the command connection (bounded waiters)
//! - [`pushes`]: what the subscriber connection brings (publications, control messages)
//! - [`registry`]: the node lease and the presence entries it owns
//! - [`tracker`]: per-channel offsets, gap repair and position answers (pure state)
//! - [`keys`]: every Redis name; [`scripts`]: the Lua scripts by name; [`resp`]: the wire

pub mod backoff;
pub mod cluster;
pub mod keys;
mod link;
mod mux;
mod pushes;
mod registry;
mod replies;
pub mod resp;
pub mod scripts;
mod sentinel;
mod stream;
mod survey;
mod topology;
pub mod tracker;

use super::Broker;
use crate::bus::NodeInfo;
use crate::bus::{BrokerInbox, BusStats, ShardLink};
use crate::config::{Config, RedisTarget};
use std::rc::Rc;
use std::sync::Arc;

/// The Redis broker.
pub struct RedisBroker {
    cfg: Arc<Config>,
    node: Arc<NodeInfo>,
    stats: Arc<BusStats>,
    target: RedisTarget,
    /// `rediss://`: the TLS connector and the name Redis's certificate must carry.
    tls: Option<(
        futures_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    /// CPU to pin the multiplexer to.
    cpu: Option<usize>,
}

impl RedisBroker {
    pub fn new(
        cfg: Arc<Config>,
        node: Arc<NodeInfo>,
        stats: Arc<BusStats>,
        cpu: Option<usize>,
    ) -> Result<RedisBroker, String> {
        let target = cfg
            .redis_first()
            .cloned()
            .ok_or("no Redis URL configured")?;
        let tls = match stream::tls_config(&cfg, &target)? {
            Some(config) => Some((
                futures_rustls::TlsConnector::from(config),
                stream::server_name(&target)?,
            )),
            None => None,
        };
        Ok(RedisBroker {
            cfg,
            node,
            stats,
            target,
            tls,
            cpu,
        })
    }
}

impl Broker for RedisBroker {
    fn caps(&self) -> crate::bus::BrokerCaps {
        crate::bus::BrokerCaps::REDIS
    }
    fn run(self: Box<Self>, inbox: BrokerInbox, shards: Vec<ShardLink>) {
        let placement = match self.cpu {
            Some(cpu) => glommio::Placement::Fixed(cpu),
            None => glommio::Placement::Unbound,
        };
        let executor = glommio::LocalExecutorBuilder::new(placement)
            .name("shardcast-broker")
            .io_memory(256 * 1024)
            // No blocking-thread pool: the multiplexer makes no file-system calls.
            .blocking_thread_pool_placement(glommio::PoolPlacement::Custom(Vec::new()))
            .make();
        let executor = match executor {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the Redis multiplexer");
                return;
            }
        };
        executor.run(async move {
            let mux = Rc::new(mux::Mux::new(*self, shards));
            mux.run(inbox).await;
        });
    }
}
