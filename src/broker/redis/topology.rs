//! Redis Cluster, the moving part: the topology loop asks `CLUSTER SHARDS` (on the connection
//! that answered last while it still does, else the seeds first, then the known masters) every
//! `redis_options.cluster_refresh_secs`, and at once when asked
//! ([`Mux::request_refresh`]: a link down, a MOVED, a `sunsubscribe` from a node whose slot
//! moved). Each answer becomes the slot table; a master gets a [`Link`] (its command and
//! subscriber connections, run by [`Mux::link_task`]); a link whose master holds no slot any
//! more is retired. Channels whose slot moved are marked lost (their history repaired once the
//! new SSUBSCRIBE is confirmed) and subscribed on their new master. Runs on the multiplexer's
//! thread and never blocks it.

use super::backoff::Backoff;
use super::cluster::{self, Shard};
use super::link::{Handshake, Link};
use super::mux::{Mux, NO_LINK};
use super::resp::{encode, next_frame};
use crate::bus::RedisLink;
use crate::config::RedisTarget;
use futures_lite::AsyncWriteExt;
use glommio::channels::local_channel;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The topology loop's connection and its read buffer.
type Kept = (super::stream::RedisStream, bytes::BytesMut);

impl Mux {
    /// A cluster node at `addr`, reached with the seeds' credentials and TLS (database 0).
    pub(super) fn cluster_target(&self, addr: &(String, u16)) -> RedisTarget {
        RedisTarget {
            host: addr.0.clone(),
            port: addr.1,
            db: 0,
            ..self.cfg.redis_cluster[0].clone()
        }
    }

    /// Asks the topology loop for a refresh now (at most one pending).
    pub(super) fn request_refresh(&self) {
        if let Some(tx) = self.refresh.borrow().as_ref() {
            let _ = tx.try_send(());
        }
    }

    /// Refreshes the topology forever: periodically, and when asked.
    pub(super) async fn topology_loop(self: Rc<Self>) {
        let (tx, rx) = local_channel::new_bounded::<()>(1);
        *self.refresh.borrow_mut() = Some(tx);
        let opts = &self.cfg.redis_options;
        let mut backoff = Backoff::new(opts.backoff_initial_ms, opts.backoff_max_ms);
        let mut degraded = Backoff::new(100, 1000);
        let every = Duration::from_secs(opts.cluster_refresh_secs as u64);
        // The connection the last answer came on, kept for the next refresh (a periodic
        // refresh then costs one round trip, not a connect and a TLS handshake).
        let mut kept: Option<Kept> = None;
        loop {
            match self.fetch_shards(&mut kept).await {
                Ok(shards) => {
                    backoff.reset();
                    self.apply_topology(shards);
                    // While a slot has no master or its master's link is down (a failover
                    // under way), look again soon (100 ms, doubling up to 1 s): the promoted
                    // replica must not wait for the next periodic refresh.
                    let wait = if self.degraded() {
                        degraded.next_delay().min(every)
                    } else {
                        degraded.reset();
                        every
                    };
                    // That, or sooner when asked (not more than 10 times a second).
                    futures_lite::future::or(glommio::timer::sleep(wait), async {
                        let _ = rx.recv().await;
                        glommio::timer::sleep(Duration::from_millis(100)).await;
                    })
                    .await;
                }
                Err(e) => {
                    let attempt = backoff.attempt();
                    if attempt == 0 || attempt % 20 == 0 {
                        tracing::warn!(error = %e, attempt, "cannot read the Redis Cluster topology");
                    }
                    if self.links.borrow().is_empty() {
                        self.node.redis_state.set(RedisLink::Down);
                    }
                    glommio::timer::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// Some slot has no master, or its master's connections are not up.
    fn degraded(&self) -> bool {
        let links = self.links.borrow();
        let slots = self.slots.borrow();
        let mut seen = vec![false; links.len()];
        for &i in slots.iter() {
            if i == NO_LINK {
                return true;
            }
            let i = i as usize;
            if !seen[i] {
                seen[i] = true;
                if !links[i].cmd.borrow().is_up() || !links[i].sub.borrow().is_up() {
                    return true;
                }
            }
        }
        false
    }

    /// `CLUSTER SHARDS` on the kept connection if it still answers, else from the first node
    /// that answers: the seeds, then the known masters (that connection is kept).
    async fn fetch_shards(&self, kept: &mut Option<Kept>) -> Result<Vec<Shard>, String> {
        if let Some(mut conn) = kept.take() {
            if let Ok(shards) = self.ask_shards(&mut conn).await {
                *kept = Some(conn);
                return Ok(shards);
            }
        }
        let mut candidates: Vec<RedisTarget> = self.cfg.redis_cluster.clone();
        for link in self.links.borrow().iter() {
            if let Some(addr) = link.addr.borrow().as_ref() {
                candidates.push(self.cluster_target(addr));
            }
        }
        let mut errors = Vec::new();
        for target in candidates {
            let asked = async {
                let mut conn = self
                    .connect_to(&target, "topology", Handshake::Redis)
                    .await?;
                let shards = self.ask_shards(&mut conn).await?;
                Ok::<_, String>((conn, shards))
            };
            match asked.await {
                Ok((conn, shards)) => {
                    *kept = Some(conn);
                    return Ok(shards);
                }
                Err(e) => errors.push(format!("{}:{}: {e}", target.host, target.port)),
            }
        }
        Err(errors.join("; "))
    }

    async fn ask_shards(&self, (stream, buf): &mut Kept) -> Result<Vec<Shard>, String> {
        let mut ask = Vec::new();
        encode(&mut ask, &[b"CLUSTER", b"SHARDS"]);
        stream.write_all(&ask).await.map_err(|e| e.to_string())?;
        let timeout = Duration::from_millis(self.cfg.redis_options.connect_timeout_ms as u64);
        let frame = futures_lite::future::or(next_frame(stream, buf), async {
            glommio::timer::sleep(timeout).await;
            Err("no answer in time".to_string())
        })
        .await?;
        cluster::parse_shards(&frame, self.cfg.redis_cluster[0].tls)
    }

    /// The link of the master at `addr`: its current one, a retired one whose task ended, or
    /// a new one (its task started by the caller).
    fn link_for_master(&self, addr: &(String, u16), started: &mut Vec<Rc<Link>>) -> usize {
        let mut links = self.links.borrow_mut();
        if let Some(l) = links
            .iter()
            .find(|l| l.addr.borrow().as_ref() == Some(addr))
        {
            return l.index;
        }
        let link = match links
            .iter()
            .find(|l| l.addr.borrow().is_none() && !l.running.get())
        {
            Some(l) => l.clone(),
            None => {
                let l = Rc::new(Link::new(links.len(), &self.cfg.redis_options));
                links.push(l.clone());
                l
            }
        };
        *link.addr.borrow_mut() = Some(addr.clone());
        link.running.set(true);
        started.push(link.clone());
        link.index
    }

    /// Makes `shards` the topology: slot table, links, retired links, moved channels.
    fn apply_topology(self: &Rc<Self>, shards: Vec<Shard>) {
        let mut table = vec![NO_LINK; cluster::SLOTS];
        let mut started = Vec::new();
        let mut masters = Vec::new();
        for shard in &shards {
            let index = self.link_for_master(&shard.master, &mut started);
            for &(a, b) in &shard.slots {
                for slot in a..=b {
                    table[slot as usize] = index as u16;
                }
            }
            masters.push(format!("{}:{}", shard.master.0, shard.master.1));
        }
        let old = std::mem::replace(&mut *self.slots.borrow_mut(), table);
        // Links whose master holds no slot any more: retired.
        let retired: Vec<Rc<Link>> = {
            let slots = self.slots.borrow();
            let mut used = vec![false; self.links.borrow().len()];
            for &i in slots.iter() {
                if i != NO_LINK {
                    used[i as usize] = true;
                }
            }
            self.links
                .borrow()
                .iter()
                .filter(|l| !used[l.index] && l.addr.borrow().is_some())
                .cloned()
                .collect()
        };
        for link in retired {
            let addr = link.addr.borrow_mut().take();
            tracing::info!(
                ?addr,
                "Redis Cluster: a master holds no slot any more; its link ends"
            );
            if let Some(stop) = link.stop.borrow().as_ref() {
                let _ = stop.try_send("the master holds no slot any more".into());
            }
        }
        let moved: Vec<bool> = {
            let slots = self.slots.borrow();
            old.iter().zip(slots.iter()).map(|(a, b)| a != b).collect()
        };
        // A failover followed: slots that had no master, or a master whose link was down,
        // now have another one (counted once per new master; not the first table).
        let failovers = {
            let slots = self.slots.borrow();
            let links = self.links.borrow();
            let first = old.iter().all(|&a| a == NO_LINK);
            let mut took_over = vec![false; links.len()];
            for (&a, &b) in old.iter().zip(slots.iter()) {
                let lost = a == NO_LINK || !links[a as usize].cmd.borrow().is_up();
                if !first && a != b && b != NO_LINK && lost {
                    took_over[b as usize] = true;
                }
            }
            took_over.iter().filter(|&&t| t).count() as u64
        };
        if failovers > 0 {
            self.node
                .redis_failovers
                .fetch_add(failovers, Ordering::Relaxed);
            tracing::info!(
                failovers,
                "Redis Cluster: slots of a lost master moved to its replica"
            );
        }
        if moved.iter().any(|&m| m) {
            self.resubscribe_moved(&moved);
        }
        for link in started {
            let me = self.clone();
            glommio::spawn_local(async move { me.link_task(link).await }).detach();
        }
        self.stats
            .redis_cluster_refreshes
            .fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.node.redis_masters.lock() {
            *m = Some(masters);
        }
        self.update_state();
    }

    /// Channels in slots that moved: their history is repaired once subscribed again, and
    /// they are SSUBSCRIBEd on their new master where its subscriber connection is up (a new
    /// link subscribes everything of its slots as it connects).
    fn resubscribe_moved(&self, moved: &[bool]) {
        let on_moved = |name: &[u8]| moved[cluster::slot(name) as usize];
        let mut out = Vec::new();
        self.tracker
            .borrow_mut()
            .lost_where(|c| on_moved(&self.channel_name(c)), &mut out);
        self.apply(out);
        let mut names: Vec<Vec<u8>> = Vec::new();
        {
            let interest = self.interest.borrow();
            let users = self.users.borrow();
            for c in interest.keys() {
                names.push(self.channel_name(c));
            }
            for u in users.keys() {
                let mut v = Vec::new();
                self.keys.user(u).write(&mut v);
                names.push(v);
            }
            let t = &self.cfg.transports;
            if t.http_stream || t.sse {
                let mut v = Vec::new();
                self.keys.node(&self.node.uid).write(&mut v);
                names.push(v);
            }
            if !interest.is_empty() {
                names.push(self.keys.survey().to_vec());
            }
        }
        names.retain(|n| on_moved(n));
        if names.is_empty() {
            return;
        }
        let links: Vec<Rc<Link>> = self.links.borrow().clone();
        for link in links {
            if link.sub.borrow().is_up() {
                self.subscribe_grouped(&link, names.clone());
            }
        }
        self.flush();
    }

    /// A `sunsubscribe` of `name` arrived: our own UNSUBSCRIBE's confirmation, or a node telling
    /// that the slot moved away. A channel still wanted is subscribed again on the master the
    /// slot table names (its history repaired once confirmed), and the topology refreshed.
    pub(super) fn slot_moved(&self, name: &[u8]) {
        if !self.cluster {
            return;
        }
        let wanted = if let Some(c) = self.keys.channel_of(name) {
            let wanted = self.interest.borrow().mask(c) != 0;
            if wanted {
                let mut out = Vec::new();
                self.tracker.borrow_mut().lost_where(|t| t == c, &mut out);
                self.apply(out);
            }
            wanted
        } else if let Some(u) = self.keys.user_of(name) {
            self.users.borrow().mask(u) != 0
        } else {
            name == self.keys.survey() && !self.interest.borrow().is_empty()
        };
        if !wanted {
            return;
        }
        tracing::info!(
            name = %String::from_utf8_lossy(name),
            "Redis Cluster: a subscription's slot moved; subscribing again"
        );
        self.request_refresh();
        if let Some(link) = self.link_of_key(name) {
            if link.sub.borrow().is_up() {
                self.subscribe_grouped(&link, vec![name.to_vec()]);
                self.flush();
            }
        }
    }

    /// Runs one master's link: connects, serves, reconnects with backoff (asking for a topology
    /// refresh each time it is lost), until the link is retired.
    pub(super) async fn link_task(self: Rc<Self>, link: Rc<Link>) {
        let opts = &self.cfg.redis_options;
        let mut backoff = Backoff::new(opts.backoff_initial_ms, opts.backoff_max_ms);
        let mut first = true;
        loop {
            // (let-else: the borrow ends here, not with the loop body)
            let Some(addr) = link.addr.borrow().clone() else {
                break;
            };
            let connected = self.connect_pair(&link).await;
            link.tried.set(true);
            match connected {
                Ok((cmd, sub)) if link.addr.borrow().is_some() => {
                    backoff.reset();
                    if !first {
                        self.node.redis_reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    first = false;
                    tracing::info!(host = %addr.0, port = addr.1, "Redis Cluster master link up");
                    let (tx, rx) = local_channel::new_bounded::<String>(1);
                    *link.stop.borrow_mut() = Some(tx);
                    self.serve(&link, cmd, sub, &rx).await;
                    link.stop.borrow_mut().take();
                    tracing::warn!(host = %addr.0, port = addr.1, "Redis Cluster master link down; its slots answer temporary errors until it is back or replaced");
                }
                Ok(_) => break,
                Err(e) => {
                    let attempt = backoff.attempt();
                    if attempt == 0 || attempt % 20 == 0 {
                        tracing::warn!(error = %e, attempt, "cannot reach a Redis Cluster master");
                    }
                }
            }
            self.request_refresh();
            self.update_state();
            if link.addr.borrow().is_none() {
                break;
            }
            glommio::timer::sleep(backoff.next_delay()).await;
        }
        link.running.set(false);
        self.update_state();
    }
}
