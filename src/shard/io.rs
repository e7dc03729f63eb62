//! The shard's side of WebSocket I/O: the task that handles its ring's completions, the start
//! of a connection's WebSocket phase, the flush that submits every dirty connection's send at
//! once, and teardown.
//!
//! Runs on the shard thread as one task ([`spawn_io`]) that awaits the ring's eventfd through
//! glommio: glommio 0.9 has no public way to wait for a raw descriptor's readability, so the
//! task reads the eventfd through glommio's own file API (`BufferedFile::read_at`, an
//! `IORING_OP_READ` in glommio's ring that completes when the eventfd is signalled, i.e. when
//! our ring posted a completion). Each wake-up drains every completion, then flushes. Each
//! connection is driven through [`Connection`]'s methods with a
//! [`super::context::ConnCtx`]; when one says the connection must end, [`Shard::teardown`]
//! removes it here, with its [`Reason`], exactly once. Never blocks, and no `RefCell` borrow is
//! held across an `.await`.

use super::connection::{Connection, Write};
use super::counters::bump;
use super::reason::Reason;
use super::ring::{Completion, Op, MAX_SLOT};
use super::Shard;
use crate::conn::bucket::Bucket;
use crate::conn::ConnKey;
use crate::protocol::codes::Level;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;

/// Completions handled before the task lets the shard's other tasks run.
const COMPLETIONS_PER_ROUND: usize = 1024;

/// Starts the WebSocket phase of an upgraded socket `fd` (ours now: the caller hands over a
/// descriptor it owns and does not close). `early` holds bytes the client sent right after its
/// request head.
pub fn start(
    shard: &Shard,
    fd: RawFd,
    mut early: Vec<u8>,
    wire: super::connection::Wire,
    headers: Vec<(String, Vec<u8>)>,
) {
    // SAFETY: the caller transfers ownership of an open socket descriptor (a fresh dup).
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let ctx = shard.ctx();
    let now = shard.io.tick_now();
    let bucket = Bucket::full(&shard.cfg, shard.io.now_ms());
    let conn = shard
        .conns
        .borrow_mut()
        .insert_with(|key| Rc::new(Connection::new(key, fd, now, wire, bucket)));
    // Before it can subscribe: the index counts its subscriptions as protobuf ones.
    shard
        .index
        .borrow_mut()
        .set_protobuf(conn.key.slot, wire == super::connection::Wire::Protobuf);
    bump(&shard.counters.ws_opened);
    if conn.key.slot > MAX_SLOT {
        tracing::warn!(
            shard = shard.id,
            "connection slot beyond what the ring can name"
        );
        shard.teardown(&conn, Reason::NotWatched);
        return;
    }
    shard.proxies.keep_headers(conn.key, headers);
    // Bidirectional emulation: its connect reply names its session and node, and
    // `/emulation` POSTs reach it by them.
    let emulated = matches!(
        wire,
        super::connection::Wire::Sse | super::connection::Wire::HttpStream
    );
    shard.set_emulated(conn.key, emulated);
    conn.arm_first(&ctx);
    shard.ring.arm_recv(conn.raw_fd(), conn.key);
    if wire.is_http_stream() {
        // A stream's request carried its connect command (checked by the front door).
        conn.command_text(&ctx, std::str::from_utf8(&early).unwrap_or(""));
    } else if !early.is_empty() {
        conn.process(&ctx, &mut early);
    }
    // Submits the receive, and the replies to early commands if there are any.
    shard.flush_dirty();
}

impl Shard {
    /// The connection under `key`, if it is still there.
    pub(super) fn conn(&self, key: ConnKey) -> Option<Rc<Connection>> {
        self.conns.borrow().get(key).cloned()
    }

    /// Submits, in one `io_uring_enter`, a send for every connection that got frames since the
    /// last flush (a connection whose send is in flight waits for its completion, and then
    /// sends everything queued meanwhile at once), and anything else queued on the ring.
    pub fn flush_dirty(&self) {
        self.announce_formats();
        let ctx = self.ctx();
        loop {
            let dirty = self.io.take_dirty();
            if dirty.is_empty() {
                break;
            }
            for key in dirty {
                let Some(conn) = self.conn(key) else {
                    continue;
                };
                match conn.next_write(&ctx) {
                    Ok(Write::Nothing) => {}
                    Ok(Write::Send(bytes)) => self.ring.send(conn.raw_fd(), key, bytes),
                    Ok(Write::Shutdown) => {
                        // shutdown(2) on a socket only queues the FIN and never blocks; the
                        // ring's IORING_OP_SHUTDOWN would always run on a kernel worker thread
                        // (io-wq), a second thread per shard.
                        // SAFETY: shutdown(2) on a socket this connection owns.
                        unsafe { libc::shutdown(conn.raw_fd(), libc::SHUT_WR) };
                    }
                    Err(reason) => self.teardown(&conn, reason),
                }
            }
        }
        self.ring.submit();
    }

    /// Tells the broker which channels gained their first or lost their last protobuf
    /// subscriber on this shard since the last flush (after the `Subscribe` each follows).
    fn announce_formats(&self) {
        let changes = self.index.borrow_mut().take_format_changes();
        for (channel, on) in changes {
            self.send_broker_must(crate::bus::ToBroker::ProtobufInterest {
                shard: self.id,
                channel: std::sync::Arc::from(&*channel),
                on,
            });
        }
    }

    /// Ends a connection: its session leaves every channel, its user is forgotten, its slot is
    /// freed, and its pending receive (and send, if any) are cancelled and its socket closed
    /// through the ring; later completions of this generation find nothing and are ignored.
    /// Logs and counts the reason. Safe to call twice: the second call does nothing.
    pub fn teardown(&self, conn: &Rc<Connection>, event: Reason) {
        if self.conns.borrow().get(conn.key).is_none() {
            return;
        }
        let reason = conn.finish(&self.ctx(), event);
        // After the session left its channels (counted by format): the slot is free.
        self.index.borrow_mut().set_protobuf(conn.key.slot, false);
        self.conns.borrow_mut().remove(conn.key);
        if let Some(fd) = conn.take_fd() {
            self.ring.cancel_and_close(fd, conn.key);
        }
        self.node.connections.fetch_sub(1, Ordering::Relaxed);
        self.counters.ended(reason);
        let (shard, slot, label, code) = (self.id, conn.key.slot, reason.label(), reason.code());
        match reason.info().level {
            Level::Debug => tracing::debug!(shard, slot, reason = label, code, "connection ended"),
            Level::Info => tracing::info!(shard, slot, reason = label, code, "connection ended"),
            Level::Warn => tracing::warn!(shard, slot, reason = label, code, "connection ended"),
        }
    }

    /// Handles one completion of the ring. `Err` (with the connection) when that connection
    /// must end; the caller tears it down. `rearm` collects receives to arm again after the
    /// batch (their buffers ran out: arming them before the batch handed its buffers back
    /// would only fail again).
    fn complete(
        &self,
        c: Completion,
        rearm: &mut Vec<ConnKey>,
    ) -> Result<(), (Rc<Connection>, Reason)> {
        let ctx = self.ctx();
        match c.op {
            Op::Close => Ok(()), // a cancel that found nothing, or a close that failed
            Op::Send => {
                // The bytes are released whether or not the connection is still there.
                let Some(bytes) = self.ring.take_sent(c.key) else {
                    return Ok(());
                };
                let Some(conn) = self.conn(c.key) else {
                    return Ok(());
                };
                match conn.sent(&ctx, c.result, bytes) {
                    Ok(Some(rest)) => {
                        self.ring.send(conn.raw_fd(), c.key, rest);
                        Ok(())
                    }
                    Ok(None) => Ok(()),
                    Err(reason) => Err((conn, reason)),
                }
            }
            Op::Recv => {
                let conn = self.conn(c.key);
                if c.result > 0 {
                    let Some(bid) = c.buffer() else {
                        return Ok(());
                    };
                    // The buffer goes back to the kernel right after, connection or not.
                    self.ring.with_buffer(bid, c.result as usize, |bytes| {
                        if let Some(conn) = &conn {
                            conn.process(&ctx, bytes);
                        }
                    });
                }
                let Some(conn) = conn else {
                    return Ok(());
                };
                match c.result {
                    0 => Err((conn, Reason::PeerClosed)),
                    r if r > 0 || r == -libc::ECANCELED => {
                        if !c.more() {
                            // The multishot receive ended (the kernel may end one at any time):
                            // arm it again.
                            self.ring.arm_recv(conn.raw_fd(), c.key);
                        }
                        Ok(())
                    }
                    r if r == -libc::ENOBUFS => {
                        bump(&self.counters.recv_buffer_exhausted);
                        rearm.push(c.key);
                        Ok(())
                    }
                    _ => Err((conn, Reason::SocketError)),
                }
            }
        }
    }

    /// Handles every completion posted (up to a round's budget), then flushes. Returns whether
    /// completions may be left.
    fn handle_completions(&self, batch: &mut Vec<Completion>) -> bool {
        let mut rearm = Vec::new();
        let mut handled = 0;
        while handled < COMPLETIONS_PER_ROUND && self.ring.reap(batch) > 0 {
            handled += batch.len();
            for c in batch.drain(..) {
                if let Err((conn, reason)) = self.complete(c, &mut rearm) {
                    self.teardown(&conn, reason);
                }
            }
        }
        for key in rearm {
            if let Some(conn) = self.conn(key) {
                self.ring.arm_recv(conn.raw_fd(), key);
            }
        }
        self.flush_dirty();
        handled >= COMPLETIONS_PER_ROUND
    }
}

/// Wakes the flusher task once per batch: a flag and the task's waker (shard thread only).
#[derive(Default)]
pub struct FlushSignal {
    wanted: std::cell::Cell<bool>,
    waker: std::cell::RefCell<Option<std::task::Waker>>,
}

impl FlushSignal {
    /// Asks for a flush (the flusher runs after the tasks woken before it).
    fn raise(&self) {
        if !self.wanted.replace(true) {
            if let Some(w) = self.waker.borrow_mut().take() {
                w.wake();
            }
        }
    }

    /// Resolves once a flush was asked for since the last one.
    fn wait(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.wanted.replace(false) {
                std::task::Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
    }
}

impl Shard {
    /// Flushes the dirty connections soon, from the flusher task: after the tasks already
    /// woken have run, so an API call whose publish this batch acknowledged writes its answer
    /// before the fan-out writes, and publications arriving meanwhile join the same flush.
    /// Without the flusher (a shard driven by hand in tests) it flushes at once.
    pub(super) fn want_flush(&self) {
        if self.flusher_running.get() {
            self.flush_signal.raise();
        } else {
            self.flush_dirty();
        }
    }
}

/// Starts the task that handles the shard's ring completions, and the flusher task.
pub fn spawn_io(shard: &Rc<Shard>) {
    let s = shard.clone();
    s.flusher_running.set(true);
    glommio::spawn_local(async move {
        loop {
            s.flush_signal.wait().await;
            s.flush_dirty();
        }
    })
    .detach();
    let eventfd = match shard.ring.eventfd() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(shard = shard.id, error = %e, "cannot watch the ring's eventfd");
            return;
        }
    };
    let s = shard.clone();
    glommio::spawn_local(async move { io_loop(s, eventfd).await }).detach();
}

/// Handles completions whenever the ring's eventfd says some were posted.
async fn io_loop(shard: Rc<Shard>, eventfd: OwnedFd) {
    // SAFETY: a descriptor of the ring's eventfd that we own; glommio closes it on drop.
    let wake = unsafe { glommio::io::BufferedFile::from_raw_fd(eventfd.into_raw_fd()) };
    let mut batch = Vec::with_capacity(256);
    loop {
        if shard.handle_completions(&mut batch) || shard.ring.has_completions() {
            // More to handle: let the shard's other tasks run, then continue without waiting.
            futures_lite::future::yield_now().await;
            continue;
        }
        // A completion posted after the check above signals the eventfd again, so this read
        // returns at once: no wake-up is lost. Reading resets its counter.
        if let Err(e) = wake.read_at(0, 8).await {
            tracing::error!(shard = shard.id, error = %e, "ring eventfd read failed; I/O stops");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::shard::NodeInfo;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::time::Duration;

    impl Shard {
        /// Waits on the ring (blocking: tests only) and handles completions like the I/O task,
        /// until one says `conn` must end; returns why, without tearing it down.
        pub(crate) fn wait_for_end(&self, conn: &Rc<Connection>) -> Reason {
            let mut batch = Vec::new();
            let mut rearm = Vec::new();
            loop {
                self.ring.wait_for_test();
                self.ring.reap(&mut batch);
                for c in batch.drain(..) {
                    if let Err((c_conn, reason)) = self.complete(c, &mut rearm) {
                        if c_conn.key == conn.key {
                            return reason;
                        }
                        self.teardown(&c_conn, reason);
                    }
                }
                self.flush_dirty();
            }
        }
    }

    /// A shard and one upgraded connection on a socketpair; returns the client's end.
    fn connected() -> (Rc<Shard>, Rc<Connection>, UnixStream) {
        let node = Arc::new(NodeInfo::new("t".into(), "t".into(), "t".into(), 1));
        // `start` takes over a connection the HTTP phase counted.
        node.connections.store(1, Ordering::Relaxed);
        let (tx, _rx) = crate::bus::broker_queue(16, false).unwrap();
        let cfg = Config {
            insecure: true,
            ..Config::default()
        };
        let shard = Shard::new(0, Arc::new(cfg), node, tx);
        let (server, client) = UnixStream::pair().unwrap();
        start(
            &shard,
            server.into_raw_fd(),
            Vec::new(),
            crate::shard::connection::Wire::Json,
            Vec::new(),
        );
        let conn = shard.conns.borrow().all().pop().expect("started");
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        (shard, conn, client)
    }

    #[test]
    fn the_reason_a_close_began_with_is_the_one_counted() {
        let (shard, conn, mut client) = connected();
        conn.close(&shard.ctx(), Reason::Shutdown);
        shard.flush_dirty();
        let mut frame = [0u8; 64];
        let n = client.read(&mut frame).unwrap();
        assert_eq!(
            &frame[..4],
            &[0x88, (n - 2) as u8, 0x0b, 0xb9],
            "close 3001"
        );
        drop(client); // the peer's EOF ends it
        let reason = shard.wait_for_end(&conn);
        assert_eq!(reason, Reason::PeerClosed);
        shard.teardown(&conn, reason);
        assert_eq!(shard.counters.ended_count(Reason::Shutdown), 1);
        assert_eq!(shard.counters.ended_count(Reason::PeerClosed), 0);
        assert!(shard.conns.borrow().is_empty());
        assert_eq!(shard.node.connections.load(Ordering::Relaxed), 0);
        shard.teardown(&conn, Reason::SocketError);
        assert_eq!(
            shard.counters.ended_count(Reason::SocketError),
            0,
            "once only"
        );
    }

    #[test]
    fn teardown_closes_the_socket_when_the_last_reference_goes() {
        let (shard, conn, mut client) = connected();
        shard.teardown(&conn, Reason::SocketError);
        assert_eq!(shard.counters.ended_count(Reason::SocketError), 1);
        drop(conn);
        let mut b = [0u8; 8];
        // EOF, not a timeout: the server's end is closed (no close frame: the socket failed).
        assert_eq!(client.read(&mut b).unwrap(), 0);
    }

    #[test]
    fn closing_cancels_the_pending_receive_and_its_late_completion_is_ignored() {
        let (shard, conn, mut client) = connected();
        let old = conn.key;
        // The connection has one armed multishot receive; teardown cancels it and closes.
        shard.teardown(&conn, Reason::Command);
        drop(conn);
        let mut b = [0u8; 8];
        assert_eq!(client.read(&mut b).unwrap(), 0, "the socket is closed");
        // A new connection takes the same slot with the next generation.
        let (server2, mut client2) = UnixStream::pair().unwrap();
        start(
            &shard,
            server2.into_raw_fd(),
            Vec::new(),
            crate::shard::connection::Wire::Echo,
            Vec::new(),
        );
        let new = shard.conns.borrow().all().pop().expect("started");
        assert_eq!(new.key.slot, old.slot);
        assert_ne!(new.key.generation, old.generation);
        // The cancelled receive's completion arrives with the old generation: handled like
        // every completion, it touches nothing.
        let mut batch = Vec::new();
        let mut rearm = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut cancelled = false;
        while !cancelled && std::time::Instant::now() < deadline {
            shard.ring.wait_for_test();
            shard.ring.reap(&mut batch);
            for c in batch.drain(..) {
                if c.key == old && c.op == Op::Recv {
                    assert_eq!(c.result, -libc::ECANCELED);
                    cancelled = true;
                }
                assert!(shard.complete(c, &mut rearm).is_ok());
            }
        }
        assert!(cancelled, "the pending receive was cancelled");
        assert_eq!(shard.conns.borrow().len(), 1);
        // The new connection (an echo endpoint) still works through its own receive.
        client2
            .write_all(&crate::ws::client_frame(1, true, b"hi", [1, 2, 3, 4]))
            .unwrap();
        client2
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut batch = Vec::new();
        while shard.conns.borrow().len() == 1 {
            shard.ring.wait_for_test();
            shard.ring.reap(&mut batch);
            let mut progressed = false;
            for c in batch.drain(..) {
                progressed |= c.key == new.key;
                assert!(shard.complete(c, &mut rearm).is_ok());
            }
            shard.flush_dirty();
            if progressed {
                break;
            }
        }
        let mut echo = [0u8; 16];
        let n = client2.read(&mut echo).unwrap();
        assert_eq!(&echo[..n], &[0x81, 2, b'h', b'i'], "echoed");
    }
}
