//! The link to Redis: its two connections' lifecycle (connect, handshake, serve, lose,
//! reconnect with [`Backoff`]) and their write sides ([`Outgoing`], [`Writer`]).
//!
//! The command connection carries everything with a reply; when it fails the whole link goes
//! down (waiters get a temporary error, see [`Mux::fail`]) and both connections come back
//! together. The subscriber connection may fail alone (Redis drops pub/sub clients past their
//! output buffer limit, `CLIENT KILL TYPE pubsub`, or its write queue passed its bound): it is
//! then reconnected with the same backoff while publishes go on, resubscribed in one command,
//! and its history channels are repaired from their streams. Runs as tasks on the
//! multiplexer's thread; a writer task owns each socket's write half, so no borrow is held
//! across a write.

use super::backoff::Backoff;
use super::mux::{GatherTarget, Mux};
use super::resp::{encode, next_frame, Command};
use super::stream::RedisStream;
use crate::bus::{Query, RedisLink, ToShard};
use crate::config::RedisTarget;
use bytes::BytesMut;
use futures_lite::AsyncWriteExt;
use glommio::channels::local_channel::{self, LocalSender};
use glommio::net::TcpStream;
use redis_protocol::resp2::types::BytesFrame;
use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// What a connection's handshake checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Handshake {
    /// The configured single Redis: AUTH, SELECT, CLIENT SETNAME.
    Redis,
    /// A master a sentinel named: the same, then ROLE must say `master`.
    Master,
    /// A sentinel: AUTH only.
    Sentinel,
}

/// The handle on a connection's writer task: chunks go in, and the bytes not yet written are
/// counted, so the queue is bounded in bytes by [`Outgoing`].
pub(super) struct Writer {
    tx: LocalSender<Vec<u8>>,
    in_flight: Rc<Cell<usize>>,
}

impl Writer {
    /// A task writing what is sent to it to `out`, batch by batch, until a write fails or every
    /// handle is dropped.
    pub fn spawn(mut out: futures_lite::io::WriteHalf<RedisStream>) -> (Writer, glommio::Task<()>) {
        let (tx, rx) = local_channel::new_unbounded::<Vec<u8>>();
        let in_flight = Rc::new(Cell::new(0usize));
        let counted = in_flight.clone();
        let task = glommio::spawn_local(async move {
            while let Some(chunk) = rx.recv().await {
                let written = out.write_all(&chunk).await;
                counted.set(counted.get().saturating_sub(chunk.len()));
                if written.is_err() {
                    break;
                }
            }
        });
        (Writer { tx, in_flight }, task)
    }

    /// A writer without a task (tests): what it is sent stays in the receiver.
    #[cfg(test)]
    pub fn detached() -> (Writer, local_channel::LocalReceiver<Vec<u8>>) {
        let (tx, rx) = local_channel::new_unbounded::<Vec<u8>>();
        let in_flight = Rc::new(Cell::new(0));
        (Writer { tx, in_flight }, rx)
    }
}

/// One link to Redis (to the Redis, or under Redis Cluster to one master): its command
/// connection's write side and reply waiters, and its subscriber connection's write side.
pub(super) struct Link {
    /// Its place in [`Mux::links`] (the slot table names links by it).
    pub index: usize,
    /// The command connection's write side (PUBLISH, scripts, presence, the lease).
    pub cmd: RefCell<Outgoing>,
    /// The subscriber connection's write side (it may come back on its own while the command
    /// connection stays).
    pub sub: RefCell<Outgoing>,
    /// What each command in flight on the command connection is for.
    pub replies: RefCell<super::replies::Replies>,
    /// Redis Cluster: the master this link serves; `None` once it holds no slot (retired: its
    /// task ends and the entry may serve another master).
    pub addr: RefCell<Option<(String, u16)>>,
    /// Redis Cluster: ends the link's connections now (retired).
    pub stop: RefCell<Option<LocalSender<String>>>,
    /// Redis Cluster: its task runs (a retired link is reused only once it ended).
    pub running: Cell<bool>,
    /// Redis Cluster: its first connection attempt is over (until then the node's start
    /// waits for it, as for a single Redis).
    pub tried: Cell<bool>,
}

impl Link {
    pub fn new(index: usize, opts: &crate::config::RedisOptions) -> Link {
        Link {
            index,
            cmd: RefCell::new(Outgoing::new(opts.max_write_queue_bytes)),
            sub: RefCell::new(Outgoing::new(opts.max_write_queue_bytes)),
            replies: RefCell::new(super::replies::Replies::new(opts.max_pending_replies)),
            addr: RefCell::new(None),
            stop: RefCell::new(None),
            running: Cell::new(false),
            tried: Cell::new(false),
        }
    }
}

/// One connection's write side: the commands encoded during the current batch, and its writer
/// (none while the connection is down). Bounded by `redis_options.max_write_queue_bytes`
/// counting both the batch and what the writer has not written yet.
pub(super) struct Outgoing {
    batch: Vec<u8>,
    writer: Option<Writer>,
    max_bytes: usize,
}

impl Outgoing {
    pub fn new(max_bytes: usize) -> Outgoing {
        Outgoing {
            batch: Vec::new(),
            writer: None,
            max_bytes,
        }
    }

    pub fn is_up(&self) -> bool {
        self.writer.is_some()
    }

    /// The connection is up: commands go to `writer`.
    pub fn attach(&mut self, writer: Writer) {
        self.batch.clear();
        self.writer = Some(writer);
    }

    /// The connection is down (or reset): what was not handed over is dropped, and the writer
    /// task ends once its queue is written.
    pub fn detach(&mut self) {
        self.batch.clear();
        self.writer = None;
    }

    /// Bytes encoded and not yet written to the socket.
    pub fn queued(&self) -> usize {
        self.batch.len() + self.writer.as_ref().map_or(0, |w| w.in_flight.get())
    }

    /// Tests: `n` bytes reached the socket.
    #[cfg(test)]
    pub fn written(&self, n: usize) {
        let w = self.writer.as_ref().expect("attached");
        w.in_flight.set(w.in_flight.get() - n);
    }

    /// The current batch.
    pub fn batch(&self) -> &[u8] {
        &self.batch
    }

    /// Encodes a command with `encode` unless that passes the bound; its range in the batch.
    pub fn push(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> Option<Range<usize>> {
        let start = self.batch.len();
        encode(&mut self.batch);
        if self.queued() > self.max_bytes {
            self.batch.truncate(start);
            return None;
        }
        Some(start..self.batch.len())
    }

    /// Encodes a command whatever the bound (the node's own bounded traffic: script loads, one
    /// stream read per tracked channel, a repeat after NOSCRIPT).
    pub fn push_unbounded(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> Range<usize> {
        let start = self.batch.len();
        encode(&mut self.batch);
        start..self.batch.len()
    }

    /// Hands the batch to the writer (dropped while down).
    pub fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        if let Some(w) = &self.writer {
            let len = batch.len();
            if w.tx.try_send(batch).is_ok() {
                w.in_flight.set(w.in_flight.get() + len);
            }
        }
    }
}

impl Mux {
    /// Connects, serves, and reconnects with capped exponential backoff and jitter, forever.
    pub(super) async fn connection_loop(self: Rc<Self>) {
        if self.cluster {
            // One link per master, started and retired by the topology loop.
            return self.topology_loop().await;
        }
        let link = self.link0();
        let opts = &self.cfg.redis_options;
        let mut backoff = Backoff::new(opts.backoff_initial_ms, opts.backoff_max_ms);
        let mut first = true;
        let sentinel = !self.cfg.redis_sentinel.is_empty();
        loop {
            if sentinel {
                match self.discover().await {
                    Ok(master) => *self.target.borrow_mut() = master,
                    Err(e) => {
                        let attempt = backoff.attempt();
                        if attempt == 0 || attempt % 20 == 0 {
                            tracing::warn!(error = %e, attempt, "cannot find the Redis master");
                        }
                        self.node.redis_state.set(RedisLink::Down);
                        self.pause(backoff.next_delay()).await;
                        continue;
                    }
                }
            }
            match self.connect_pair(&link).await {
                Ok((cmd, sub)) => {
                    backoff.reset();
                    if !first {
                        self.node.redis_reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    first = false;
                    let target = self.target.borrow().clone();
                    tracing::info!(host = %target.host, port = target.port, "Redis link up");
                    // Under Sentinel, a watcher follows `+switch-master` and ends the link
                    // when our master moves; otherwise the sender is kept and never sends.
                    let (switch_tx, switch_rx) = local_channel::new_bounded::<String>(1);
                    let mut idle_tx = None;
                    let watcher = if sentinel {
                        let me = self.clone();
                        Some(glommio::spawn_local(async move {
                            let reason = me.watch_switch(&target).await;
                            let _ = switch_tx.try_send(reason);
                        }))
                    } else {
                        idle_tx = Some(switch_tx);
                        None
                    };
                    self.serve(&link, cmd, sub, &switch_rx).await;
                    if let Some(w) = watcher {
                        w.cancel().await;
                    }
                    drop(idle_tx);
                    tracing::warn!(
                        "Redis link down; client connections stay, publishes fail until it is back"
                    );
                }
                Err(e) => {
                    let attempt = backoff.attempt();
                    if attempt == 0 || attempt % 20 == 0 {
                        tracing::warn!(error = %e, attempt, "cannot reach Redis");
                    }
                }
            }
            self.node.redis_state.set(RedisLink::Down);
            self.pause(backoff.next_delay()).await;
        }
    }

    /// Opens one connection to the link's Redis and runs AUTH, SELECT and CLIENT SETNAME on
    /// it; under Sentinel also ROLE, refusing a Redis that is not a master.
    async fn connect_one(
        &self,
        link: &Link,
        role: &str,
    ) -> Result<(RedisStream, BytesMut), String> {
        let target = if self.cluster {
            let addr = link.addr.borrow().clone().ok_or("retired")?;
            self.cluster_target(&addr)
        } else {
            self.target.borrow().clone()
        };
        let check = if self.cfg.redis_sentinel.is_empty() {
            Handshake::Redis
        } else {
            Handshake::Master
        };
        self.connect_to(&target, role, check).await
    }

    /// Opens one connection to `target` and runs the handshake `check` says.
    pub(super) async fn connect_to(
        &self,
        target: &RedisTarget,
        role: &str,
        check: Handshake,
    ) -> Result<(RedisStream, BytesMut), String> {
        let addr = (target.host.as_str(), target.port);
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&addr)
            .map_err(|e| format!("cannot resolve {}: {e}", target.host))?
            .next()
            .ok_or("no address")?;
        let timeout = Duration::from_millis(self.cfg.redis_options.connect_timeout_ms as u64);
        let tcp = TcpStream::connect_timeout(addr, timeout)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let mut stream = match &self.tls {
            None => RedisStream::Plain(tcp),
            Some((connector, _)) => {
                let name = super::stream::server_name(target)?;
                // The handshake within the connect timeout too: a server that accepts and
                // never answers must not hold the link.
                let handshake = async {
                    connector
                        .connect(name, tcp)
                        .await
                        .map_err(|e| format!("TLS handshake with {addr}: {e}"))
                };
                let expired = async {
                    glommio::timer::sleep(timeout).await;
                    Err(format!("TLS handshake with {addr}: timed out"))
                };
                let tls = futures_lite::future::or(handshake, expired).await?;
                RedisStream::Tls(Box::new(tls))
            }
        };
        let mut hello = Vec::new();
        let mut expected = 0;
        if let Some(password) = &target.password {
            match &target.username {
                Some(user) => encode(&mut hello, &[b"AUTH", user.as_bytes(), password.as_bytes()]),
                None => encode(&mut hello, &[b"AUTH", password.as_bytes()]),
            }
            expected += 1;
        }
        if target.db != 0 && check != Handshake::Sentinel {
            Command::new(&mut hello, 2)
                .arg(b"SELECT")
                .int(target.db as u64);
            expected += 1;
        }
        if check != Handshake::Sentinel {
            let name = format!("shardcast-{}-{role}", self.node.uid);
            encode(&mut hello, &[b"CLIENT", b"SETNAME", name.as_bytes()]);
            expected += 1;
        }
        if check == Handshake::Master {
            encode(&mut hello, &[b"ROLE"]);
            expected += 1;
        }
        let mut buf = BytesMut::with_capacity(4096);
        if expected == 0 {
            return Ok((stream, buf));
        }
        stream.write_all(&hello).await.map_err(|e| e.to_string())?;
        let mut seen = 0;
        while seen < expected {
            // Bounded: a server that accepts and never answers must not hold the link.
            let frame = futures_lite::future::or(next_frame(&mut stream, &mut buf), async {
                glommio::timer::sleep(timeout).await;
                Err(format!("{addr} did not answer the handshake in time"))
            })
            .await?;
            seen += 1;
            match frame {
                BytesFrame::Error(e) => return Err(format!("Redis refused the handshake: {e}")),
                BytesFrame::Array(items) if check == Handshake::Master && seen == expected => {
                    let role = items.first().and_then(super::sentinel::text);
                    if role.as_deref() != Some("master") {
                        return Err(format!(
                            "{addr} is not a master (ROLE: {})",
                            role.unwrap_or_default()
                        ));
                    }
                }
                _ => {}
            }
        }
        Ok((stream, buf))
    }

    pub(super) async fn connect_pair(
        &self,
        link: &Link,
    ) -> Result<((RedisStream, BytesMut), (RedisStream, BytesMut)), String> {
        let cmd = self.connect_one(link, "cmd").await?;
        let sub = self.connect_one(link, "sub").await?;
        Ok((cmd, sub))
    }

    /// Runs both connections until the command connection fails; the subscriber connection is
    /// reconnected on its own meanwhile whenever it fails.
    /// Under Sentinel, `switch` names the reason when our master moved (`+switch-master`).
    pub(super) async fn serve(
        self: &Rc<Self>,
        link: &Rc<Link>,
        cmd: (RedisStream, BytesMut),
        sub: (RedisStream, BytesMut),
        switch: &local_channel::LocalReceiver<String>,
    ) {
        let (cmd_stream, cmd_buf) = cmd;
        let (cmd_read, cmd_write) = futures_lite::io::split(cmd_stream);
        let (cmd_tx, cmd_writer) = Writer::spawn(cmd_write);
        link.cmd.borrow_mut().attach(cmd_tx);
        // Scripts first (replies in order: nothing can run one before it is loaded), then
        // announce ourselves.
        self.load_scripts(link);
        self.gather(Query::Stats, GatherTarget::Lease);
        self.gather(Query::PresenceAll, GatherTarget::Reannounce(link.index));
        self.flush();
        let (done_tx, done_rx) = local_channel::new_bounded::<String>(1);
        let me = self.clone();
        let reader_link = link.clone();
        let cmd_reader = glommio::spawn_local(async move {
            let reason = me.read_replies(&reader_link, cmd_read, cmd_buf).await;
            let _ = done_tx.try_send(reason);
        });
        let cmd_down = || {
            futures_lite::future::or(async { done_rx.recv().await.unwrap_or_default() }, async {
                switch.recv().await.unwrap_or_default()
            })
        };

        let opts = &self.cfg.redis_options;
        let mut backoff = Backoff::new(opts.backoff_initial_ms, opts.backoff_max_ms);
        let mut sub = Some(sub);
        let reason = loop {
            let (sub_stream, sub_buf) = match sub.take() {
                Some(s) => s,
                None => {
                    // The subscriber connection alone: back off, reconnect, unless the command
                    // connection goes down meanwhile.
                    let delay = backoff.next_delay();
                    let next = futures_lite::future::or(async { Err(cmd_down().await) }, async {
                        glommio::timer::sleep(delay).await;
                        Ok(self.connect_one(link, "sub").await)
                    })
                    .await;
                    match next {
                        Err(reason) => break reason,
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "cannot reconnect the Redis subscriber connection");
                            continue;
                        }
                        Ok(Ok(s)) => {
                            self.node.redis_reconnects.fetch_add(1, Ordering::Relaxed);
                            tracing::info!("Redis subscriber connection back");
                            s
                        }
                    }
                }
            };
            backoff.reset();
            let (sub_read, sub_write) = futures_lite::io::split(sub_stream);
            let (sub_tx, sub_writer) = Writer::spawn(sub_write);
            link.sub.borrow_mut().attach(sub_tx);
            self.resubscribe(link);
            self.tracker.borrow_mut().link_up();
            self.update_state();
            // Register at once (a restarted Redis has no lease of ours), and give the other
            // nodes one lease refresh to do the same before anyone is taken for gone.
            let refresh_ms = self.cfg.redis_options.lease_refresh_secs as u64 * 1000;
            self.node
                .cluster_settles_ms
                .store(self.node.uptime_ms() + refresh_ms + 1000, Ordering::Relaxed);
            self.gather(Query::Stats, GatherTarget::Lease);
            self.flush();
            let me = self.clone();
            let sub_reader = async move { me.read_pushes(sub_read, sub_buf).await };
            // The writer ends on a write error, or when a congested queue reset the connection.
            let sub_ended = futures_lite::future::or(sub_reader, async {
                sub_writer.await;
                "write side closed".to_string()
            });
            let end = futures_lite::future::or(async { Ok(cmd_down().await) }, async {
                Err(sub_ended.await)
            })
            .await;
            self.sub_down(link);
            match end {
                Ok(reason) => break reason,
                Err(reason) => {
                    tracing::warn!(%reason, "Redis subscriber connection lost; publishes go on, its channels are repaired when it is back");
                    self.node.redis_state.set(RedisLink::Down);
                }
            }
        };
        tracing::warn!(%reason, "Redis connection lost");

        // Down: drop the writer, fail whatever waits for a reply.
        link.cmd.borrow_mut().detach();
        self.node.redis_state.set(RedisLink::Down);
        cmd_reader.cancel().await;
        cmd_writer.cancel().await;
        let waiters = link.replies.borrow_mut().take();
        for (waiter, _, _) in waiters {
            self.fail(waiter);
        }
    }

    /// The node's Redis state: connected while every link's subscriber connection is up
    /// (under Redis Cluster, every live master's).
    pub(super) fn update_state(&self) {
        let links = self.links.borrow();
        let mut live = links
            .iter()
            .filter(|l| !self.cluster || l.addr.borrow().is_some());
        if live.clone().all(|l| l.sub.borrow().is_up()) {
            self.node.redis_state.set(RedisLink::Connected);
        } else if self.node.redis_state.get() != RedisLink::Standalone
            || live.all(|l| l.tried.get())
        {
            // (still `Standalone` while a master's first attempt runs: the start waits)
            self.node.redis_state.set(RedisLink::Down);
        }
    }

    /// Subscribes every channel and user of the node again, in one command, with the survey
    /// question channel while the node has channels ([`super::survey`]) and, while an
    /// emulation transport is enabled, the node's own channel for emulation requests. Under
    /// Redis Cluster, on `link`: the names whose slot its master holds, one SSUBSCRIBE per slot
    /// (a command's channels must share one slot).
    pub(super) fn resubscribe(&self, link: &Link) {
        self.confirming
            .borrow_mut()
            .retain(|c| !self.on_link(&self.channel_name(c), link));
        let interest = self.interest.borrow();
        let users = self.users.borrow();
        // The node's own channel (emulation requests other nodes received) while an emulation
        // transport is enabled: from the start, so no request for a fresh session is missed.
        let t = &self.cfg.transports;
        let node_channel = usize::from(t.http_stream || t.sse);
        if interest.is_empty() && users.is_empty() && node_channel == 0 {
            return;
        }
        let questions = usize::from(!interest.is_empty());
        if self.cluster {
            let mut names: Vec<Vec<u8>> = Vec::new();
            let mut name = |k: super::keys::Key<'_>| {
                let mut v = Vec::new();
                k.write(&mut v);
                names.push(v);
            };
            if node_channel > 0 {
                name(self.keys.node(&self.node.uid));
            }
            for c in interest.keys() {
                name(self.keys.channel(c));
            }
            for u in users.keys() {
                name(self.keys.user(u));
            }
            if questions > 0 {
                names.push(self.keys.survey().to_vec());
            }
            self.subscribe_grouped(link, names);
            return;
        }
        let n = interest.len() + users.len() + questions + node_channel;
        let mut sub = link.sub.borrow_mut();
        sub.push_unbounded(|out| {
            let mut cmd = Command::new(out, 1 + n);
            cmd.arg(b"SUBSCRIBE");
            if node_channel > 0 {
                cmd.parts(&self.keys.node(&self.node.uid).0);
            }
            if questions > 0 {
                cmd.arg(self.keys.survey());
            }
            for c in interest.keys() {
                cmd.parts(&self.keys.channel(c).0);
            }
            for u in users.keys() {
                cmd.parts(&self.keys.user(u).0);
            }
        });
    }

    /// Redis Cluster: SSUBSCRIBEs on `link` those of `names` whose slot its master holds, one
    /// command per slot.
    pub(super) fn subscribe_grouped(&self, link: &Link, names: Vec<Vec<u8>>) {
        let mut by_slot: std::collections::BTreeMap<u16, Vec<Vec<u8>>> = Default::default();
        {
            let slots = self.slots.borrow();
            for n in names {
                let slot = super::cluster::slot(&n);
                if slots[slot as usize] as usize == link.index {
                    by_slot.entry(slot).or_default().push(n);
                }
            }
        }
        let mut sub = link.sub.borrow_mut();
        for group in by_slot.values() {
            sub.push_unbounded(|out| {
                let mut cmd = Command::new(out, 1 + group.len());
                cmd.arg(b"SSUBSCRIBE");
                for n in group {
                    cmd.arg(n);
                }
            });
        }
    }

    /// `PREFIX:ch:{CHANNEL}` as bytes.
    pub(super) fn channel_name(&self, channel: &str) -> Vec<u8> {
        let mut v = Vec::new();
        self.keys.channel(channel).write(&mut v);
        v
    }

    /// Whether pub/sub channel `name` is carried by `link`.
    pub(super) fn on_link(&self, name: &[u8], link: &Link) -> bool {
        !self.cluster
            || self
                .link_of_key(name)
                .is_some_and(|l| l.index == link.index)
    }

    /// The subscriber connection is gone: subscriptions waiting for Redis's confirmation fail
    /// (temporary error), and tracked channels wait to be repaired once it is back.
    pub(super) fn sub_down(&self, link: &Link) {
        link.sub.borrow_mut().detach();
        if self.on_link(self.keys.survey(), link)
            || self.on_link(&self.keys.survey_answers(&self.node.uid), link)
        {
            self.surveys_down();
        }
        let confirming: Vec<Arc<str>> = {
            let mut all = self.confirming.borrow_mut();
            let lost: Vec<Arc<str>> = all
                .iter()
                .filter(|c| self.on_link(&self.channel_name(c), link))
                .cloned()
                .collect();
            for c in &lost {
                all.remove(c);
            }
            lost
        };
        for channel in confirming {
            let mask = self.interest.borrow().mask(&channel);
            crate::broker::send_to(&self.shards, mask, || ToShard::SubscribeFailed {
                channel: channel.clone(),
            });
        }
        // Tracked channels: waiting subscribers get an error; each channel is read again
        // (repaired) once its SUBSCRIBE is confirmed on the next subscriber connection.
        let mut out = Vec::new();
        if self.cluster {
            self.tracker
                .borrow_mut()
                .lost_where(|c| self.on_link(&self.channel_name(c), link), &mut out);
        } else {
            self.tracker.borrow_mut().link_down(&mut out);
        }
        self.apply(out);
    }
}
