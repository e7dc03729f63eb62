//! The shard's side of WebSocket I/O: the task that services its sockets on readiness, the
//! start of a connection's WebSocket phase, the end-of-batch flush and teardown.
//!
//! Runs on the shard thread as one task ([`spawn_io`]), woken by the poll relay's wake-up byte
//! at most once per batch. Each connection is driven through [`Connection`]'s methods with a
//! [`super::context::ConnCtx`]; when one says the connection must end, [`Shard::teardown`]
//! removes it here, with its [`Reason`], exactly once. Never blocks, and no `RefCell` borrow is
//! held across an `.await`.

use super::connection::Connection;
use super::counters::bump;
use super::poller;
use super::reason::Reason;
use super::Shard;
use crate::conn::bucket::Bucket;
use crate::conn::ConnKey;
use crate::protocol::codes::Level;
use futures_lite::AsyncReadExt;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;

/// Starts the WebSocket phase of an upgraded socket `fd` (ours now: the caller hands over a
/// descriptor it owns and does not close). `early` holds bytes the client sent right after its
/// request head.
pub fn start(shard: &Shard, fd: RawFd, mut early: Vec<u8>, echo: bool) {
    // SAFETY: the caller transfers ownership of an open socket descriptor (a fresh dup).
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let ctx = shard.ctx();
    let now = shard.io.tick_now();
    let bucket = Bucket::full(&shard.cfg, shard.io.now_ms());
    let conn = shard
        .conns
        .borrow_mut()
        .insert_with(|key| Rc::new(Connection::new(key, fd, now, echo, bucket)));
    bump(&shard.counters.ws_opened);
    conn.arm_first(&ctx);
    if !early.is_empty() {
        conn.process(&ctx, &mut early);
    }
    let token = poller::token(conn.key.slot, conn.key.generation);
    if let Err(e) = shard.poller.add(conn.fd().as_raw_fd(), token) {
        tracing::warn!(shard = shard.id, error = %e, "cannot watch an upgraded socket");
        shard.teardown(&conn, Reason::NotWatched);
    }
    // The first (writable) edge flushes the connect replies to early commands, if any.
}

impl Shard {
    /// The connection under `key`, if it is still there.
    pub(super) fn conn(&self, key: ConnKey) -> Option<Rc<Connection>> {
        self.conns.borrow().get(key).cloned()
    }

    /// Writes out every connection that got frames during this batch.
    pub fn flush_dirty(&self) {
        let ctx = self.ctx();
        loop {
            let dirty = self.io.take_dirty();
            if dirty.is_empty() {
                return;
            }
            for key in dirty {
                if let Some(conn) = self.conn(key) {
                    if let Err(reason) = conn.flush(&ctx) {
                        self.teardown(&conn, reason);
                    }
                }
            }
        }
    }

    /// Ends a connection: its session leaves every channel, its user is forgotten, its slot is
    /// freed and its socket leaves the epoll set (the socket closes with the last reference).
    /// Logs and counts the reason. Safe to call twice: the second call does nothing.
    pub fn teardown(&self, conn: &Rc<Connection>, event: Reason) {
        if self.conns.borrow().get(conn.key).is_none() {
            return;
        }
        let reason = conn.finish(&self.ctx(), event);
        self.conns.borrow_mut().remove(conn.key);
        self.poller.remove(conn.fd().as_raw_fd());
        self.node.connections.fetch_sub(1, Ordering::Relaxed);
        self.counters.ended(reason);
        let (shard, slot, label, code) = (self.id, conn.key.slot, reason.label(), reason.code());
        match reason.info().level {
            Level::Debug => tracing::debug!(shard, slot, reason = label, code, "connection ended"),
            Level::Info => tracing::info!(shard, slot, reason = label, code, "connection ended"),
            Level::Warn => tracing::warn!(shard, slot, reason = label, code, "connection ended"),
        }
    }
}

/// Starts the task that services the shard's sockets on readiness.
pub fn spawn_io(shard: &Rc<Shard>) {
    let Some(inbox) = shard.ready.borrow_mut().take() else {
        return;
    };
    let s = shard.clone();
    glommio::spawn_local(async move { io_loop(s, inbox).await }).detach();
}

/// Services ready connections, in batches, whenever the poll relay wakes us.
async fn io_loop(shard: Rc<Shard>, inbox: poller::ReadyInbox) {
    // SAFETY: one end of a socketpair we own.
    let mut wake = unsafe { glommio::net::UnixStream::from_raw_fd(inbox.wake.into_raw_fd()) };
    let mut bytes = [0u8; 64];
    loop {
        inbox.notified.store(false, Ordering::SeqCst);
        for key in shard.io.take_again() {
            if let Some(conn) = shard.conn(key) {
                if let Err(reason) = conn.read(&shard.ctx()) {
                    shard.teardown(&conn, reason);
                }
            }
        }
        let mut n = 0u32;
        while let Ok((token, events)) = inbox.rx.try_recv() {
            let (slot, generation) = poller::untoken(token);
            if let Some(conn) = shard.conn(ConnKey { slot, generation }) {
                if let Err(reason) = conn.service(&shard.ctx(), events) {
                    shard.teardown(&conn, reason);
                }
            }
            n += 1;
            if n % 256 == 0 {
                shard.flush_dirty();
                glommio::yield_if_needed().await;
            }
        }
        shard.flush_dirty();
        if shard.io.has_again() {
            // More to read: let the shard's other tasks run, then continue without waiting.
            futures_lite::future::yield_now().await;
            continue;
        }
        match wake.read(&mut bytes).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::shard::NodeInfo;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::time::Duration;

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
        let shard = Shard::new(0, Arc::new(cfg), node, tx, None);
        let (server, client) = UnixStream::pair().unwrap();
        start(&shard, server.into_raw_fd(), Vec::new(), false);
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
        let reason = conn.read(&shard.ctx()).unwrap_err();
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
}
