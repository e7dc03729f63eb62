//! The WebSocket phase of one connection: plain state, serviced by its shard on readiness.
//!
//! An upgraded connection is a [`Connection`] in the shard's table and its socket in the
//! shard's epoll set ([`super::poller`]); no task, no future and no buffer wait for it. When the
//! socket is readable the shard reads into its scratch buffer and decodes and answers in place
//! ([`service`]); frames to send (fan-out, replies, pings) are queued as shared `Bytes` in the
//! outbox and written by [`flush`], every queued frame in one `send` through the shard's cork
//! buffer. A write that would block leaves the rest queued until the socket's writable edge.

use super::{bump, poller, Bucket, Shard, ShardHost, CORK_BYTES};
use crate::conn::outbox::{Outbox, Push};
use crate::conn::session::Session;
use crate::conn::ConnKey;
use crate::protocol::reply::{self, ClientInfo};
use crate::protocol::Disconnect;
use crate::ws::{self, Event, Flow, FrameBuf, Partial, OP_PONG, OP_TEXT};
use bytes::Bytes;
use std::cell::RefCell;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
#[cfg(test)]
use std::time::Duration;

/// Seconds a connection may take to answer our close frame before it is dropped.
const CLOSE_TIMEOUT_SECS: u32 = 3;
/// Reads of one connection per readiness event before the others get their turn; the rest is
/// read on the next round (edge-triggered readiness does not repeat).
const READS_PER_ROUND: u32 = 8;

/// The server ping: an empty JSON object in a text frame.
static PING_FRAME: [u8; 4] = [0x81, 0x02, b'{', b'}'];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Open,
    /// A close frame is queued; nothing else is accepted.
    Closing,
    /// The close frame was written and our side shut down; waiting for the peer's EOF.
    Closed,
    /// Drop the socket now.
    Abort,
}

/// Mutable state of one connection.
pub struct ConnState {
    pub session: Session,
    pub outbox: Outbox,
    pub partial: Option<Box<Partial>>,
    pub phase: Phase,
    /// Wheel tick of this connection's live timer entry.
    armed: u32,
    /// Tick of the last ping sent (or of the upgrade).
    last_ping: u32,
    awaiting_pong: bool,
    /// Tick the connection token expires at; 0 = never.
    expires_at: u32,
    /// Tick the earliest expiring subscription ends at; 0 = none (the deadlines themselves are
    /// in the shard's `sub_expiries`, only for connections that have one).
    sub_expires_at: u32,
    /// A write would block: wait for the writable edge before writing again.
    blocked: bool,
    /// Queued in the shard's dirty list (to be flushed at the end of the batch).
    dirty: bool,
    /// Conformance echo endpoint: messages are echoed, no protocol session.
    echo: bool,
    /// Command rate limit.
    bucket: Bucket,
}

/// One WebSocket connection, owned by its shard's table.
pub struct Connection {
    pub key: ConnKey,
    /// The socket; closed by [`teardown`].
    fd: RawFd,
    pub state: RefCell<ConnState>,
}

impl Connection {
    fn new(key: ConnKey, fd: RawFd, now: u32, echo: bool, bucket: Bucket) -> Connection {
        Connection {
            key,
            fd,
            state: RefCell::new(ConnState {
                session: Session::default(),
                outbox: Outbox::default(),
                partial: None,
                phase: Phase::Open,
                armed: 0,
                last_ping: now,
                awaiting_pong: false,
                expires_at: 0,
                sub_expires_at: 0,
                blocked: false,
                dirty: false,
                echo,
                bucket,
            }),
        }
    }

    /// Puts the connection on the shard's list of connections to flush after this batch.
    fn wake(&self, shard: &Shard) {
        let mut st = self.state.borrow_mut();
        if !st.dirty {
            st.dirty = true;
            shard.dirty.borrow_mut().push(self.key);
        }
    }

    /// Queues a frame (fan-out, deferred reply, ping). Over the outbox bound the connection is
    /// closed as slow and its queue dropped.
    pub fn push(&self, shard: &Shard, frame: Bytes) {
        let mut st = self.state.borrow_mut();
        if st.phase != Phase::Open {
            return;
        }
        let was_empty = st.outbox.is_empty();
        if st.outbox.push(frame, shard.cfg.limits.max_outbox_bytes) == Push::Overflow {
            bump(&shard.counters.slow_disconnects);
            let d = Disconnect::Slow;
            queue_close(&mut st, d.code(), d.reason());
            self.arm(shard, &mut st); // the close timeout now applies
            drop(st);
            self.wake(shard);
        } else if was_empty {
            drop(st);
            self.wake(shard);
        }
    }

    /// Closes with a code and reason (server-initiated).
    pub fn close_with(&self, shard: &Shard, code: u16, reason: &str) {
        let mut st = self.state.borrow_mut();
        if st.phase == Phase::Open {
            queue_close(&mut st, code, reason);
            self.arm(shard, &mut st);
            drop(st);
            self.wake(shard);
        }
    }

    /// Removes the connection from `channel` on the server's request, telling the client.
    pub fn server_unsubscribe(&self, shard: &Shard, channel: &str) {
        let chan = {
            let mut st = self.state.borrow_mut();
            let subs = &mut st.session.subs;
            let pos = subs.iter().position(|&c| {
                shard
                    .index
                    .borrow()
                    .get(c)
                    .is_some_and(|ch| &*ch.name == channel)
            });
            match pos {
                Some(p) => subs.swap_remove(p),
                None => return,
            }
        };
        shard.unsubscribe_key(chan, self.key);
        shard.presence_left(self, channel);
        let mut f = FrameBuf::with_capacity(64 + channel.len());
        reply::unsubscribe_push(f.payload(), channel, 2000, "server unsubscribe");
        self.push(shard, f.finish(OP_TEXT));
    }

    /// Forgets channel `chan` in the session (the caller updates the index).
    pub fn drop_subscription(&self, chan: crate::conn::session::ChanId) {
        let mut st = self.state.borrow_mut();
        if let Some(pos) = st.session.subs.iter().position(|&c| c == chan) {
            st.session.subs.swap_remove(pos);
        }
    }

    /// The client id, once connected.
    pub fn client_id(&self) -> Option<crate::conn::session::ClientId> {
        let st = self.state.borrow();
        st.session.identity.as_ref().map(|i| i.client)
    }

    /// Presence entry of this connection.
    pub fn client_info(&self) -> Option<ClientInfo> {
        let st = self.state.borrow();
        st.session.identity.as_ref().map(|i| ClientInfo {
            user: i.user.to_string(),
            client: i.client.to_string(),
            conn_info: i.info.clone(),
        })
    }

    /// The connection's timer fired at tick `now`.
    pub fn on_timer(&self, shard: &Shard, now: u32) {
        let mut st = self.state.borrow_mut();
        if now != st.armed {
            return; // stale entry
        }
        let ping = &shard.cfg.ping;
        match st.phase {
            Phase::Abort => return,
            Phase::Closing | Phase::Closed => {
                st.phase = Phase::Abort;
                drop(st);
                self.wake(shard);
                return;
            }
            Phase::Open => {}
        }
        if st.echo {
            // Conformance endpoint: no protocol heartbeats and no stale timeout.
            st.last_ping = now;
            self.arm(shard, &mut st);
            return;
        }
        let connected = st.session.is_connected();
        if !connected && now >= st.last_ping + shard.cfg.limits.handshake_timeout_secs {
            // Upgraded but never sent connect: stale.
            queue_close(&mut st, 3502, "stale");
        } else if st.awaiting_pong && now >= st.last_ping + ping.pong_timeout_secs {
            bump(&shard.counters.no_pong_disconnects);
            let d = Disconnect::NoPong;
            queue_close(&mut st, d.code(), d.reason());
        } else if st.expires_at != 0 && now >= st.expires_at {
            let d = Disconnect::Expired;
            queue_close(&mut st, d.code(), d.reason());
        } else if st.sub_expires_at != 0 && now >= st.sub_expires_at {
            // Subscriptions whose token expired without a refresh end (push 2501); the
            // connection and its other subscriptions stay. A ping due now goes next tick.
            self.expire_subscriptions(shard, &mut st);
        } else if connected && now >= st.last_ping + ping.interval_secs {
            st.last_ping = now;
            st.awaiting_pong = true;
            let was_empty = st.outbox.is_empty();
            if st.outbox.push(
                Bytes::from_static(&PING_FRAME),
                shard.cfg.limits.max_outbox_bytes,
            ) == Push::Overflow
            {
                bump(&shard.counters.slow_disconnects);
                let d = Disconnect::Slow;
                queue_close(&mut st, d.code(), d.reason());
            } else if !was_empty {
                self.arm(shard, &mut st);
                return;
            }
        }
        self.arm(shard, &mut st);
        drop(st);
        self.wake(shard);
    }

    /// Arms the wheel for the next thing due.
    fn arm(&self, shard: &Shard, st: &mut ConnState) {
        let ping = &shard.cfg.ping;
        let mut due = match st.phase {
            Phase::Open => {
                if !st.session.is_connected() {
                    st.last_ping + shard.cfg.limits.handshake_timeout_secs
                } else if st.awaiting_pong {
                    st.last_ping + ping.pong_timeout_secs
                } else {
                    st.last_ping + ping.interval_secs
                }
            }
            _ => shard.tick_now() + CLOSE_TIMEOUT_SECS,
        };
        if st.expires_at != 0 {
            due = due.min(st.expires_at);
        }
        if st.sub_expires_at != 0 {
            due = due.min(st.sub_expires_at);
        }
        st.armed = shard.wheel.borrow_mut().arm(self.key, due);
    }

    /// Ends the subscriptions whose deadline passed and queues their unsubscribe pushes.
    fn expire_subscriptions(&self, shard: &Shard, st: &mut ConnState) {
        let ConnState {
            session,
            outbox,
            expires_at,
            sub_expires_at,
            ..
        } = st;
        let mut host = ShardHost {
            shard,
            key: self.key,
            expires_at,
            sub_expires_at,
            bucket: None,
        };
        let mut f = FrameBuf::with_capacity(96);
        if session.expire_subscriptions(&mut host, f.payload()) > 0 {
            // Like a server ping: over the outbox bound the next write closes it as slow.
            if outbox.push(f.finish(OP_TEXT), shard.cfg.limits.max_outbox_bytes) == Push::Overflow {
                bump(&shard.counters.slow_disconnects);
                let d = Disconnect::Slow;
                queue_close(st, d.code(), d.reason());
            }
        }
    }
}

fn queue_close(st: &mut ConnState, code: u16, reason: &str) {
    if code == Disconnect::Slow.code() {
        st.outbox.drop_unstarted();
    }
    st.outbox.push_unbounded(ws::close_frame(code, reason));
    st.phase = Phase::Closing;
}

/// Starts the WebSocket phase of an upgraded socket `fd` (ours now). `early` holds bytes the
/// client sent right after its request head.
pub fn start(shard: &Shard, fd: RawFd, mut early: Vec<u8>, echo: bool) {
    let now = shard.tick_now();
    let bucket = Bucket::full(&shard.cfg, shard.now_ms());
    let conn = shard
        .conns
        .borrow_mut()
        .insert_with(|key| Rc::new(Connection::new(key, fd, now, echo, bucket)));
    bump(&shard.counters.ws_opened);
    {
        let mut st = conn.state.borrow_mut();
        conn.arm(shard, &mut st);
    }
    if !early.is_empty() {
        process(shard, &conn, &mut early);
    }
    let token = poller::token(conn.key.slot, conn.key.generation);
    if let Err(e) = shard.poller.add(fd, token) {
        tracing::warn!(error = %e, "cannot watch an upgraded socket");
        teardown(shard, &conn);
    }
    // The first (writable) edge flushes the connect replies to early commands, if any.
}

/// Handles a readiness event of a connection.
pub fn service(shard: &Shard, conn: &Rc<Connection>, events: u32) {
    if events & poller::WRITABLE != 0 {
        conn.state.borrow_mut().blocked = false;
    }
    if !flush(shard, conn) {
        return;
    }
    if events & (poller::READABLE | poller::HANGUP) != 0 {
        read(shard, conn);
    }
}

/// Reads what the socket has (up to a round's budget) and answers it. Ends the connection on
/// EOF or error.
pub fn read(shard: &Shard, conn: &Rc<Connection>) {
    for _ in 0..READS_PER_ROUND {
        let n = {
            let mut scratch = shard.scratch.borrow_mut();
            // SAFETY: recv into a buffer we own, on a socket we own.
            let n = unsafe {
                libc::recv(
                    conn.fd,
                    scratch.as_mut_ptr().cast(),
                    scratch.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                process(shard, conn, &mut scratch[..n as usize]);
            }
            n
        };
        if n == 0 {
            teardown(shard, conn); // the peer closed
            return;
        }
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                flush(shard, conn);
                return;
            }
            if err.kind() != std::io::ErrorKind::Interrupted {
                teardown(shard, conn);
                return;
            }
        }
        if !flush(shard, conn) {
            return;
        }
    }
    // Budget spent with data possibly left: read again after the others had their turn.
    shard.again.borrow_mut().push(conn.key);
}

/// Writes what is queued, every frame in one `send` where possible. Returns false when the
/// connection ended (write error, or its close completed badly).
pub fn flush(shard: &Shard, conn: &Rc<Connection>) -> bool {
    let mut st = conn.state.borrow_mut();
    st.dirty = false;
    if st.phase == Phase::Abort {
        drop(st);
        teardown(shard, conn);
        return false;
    }
    while !st.outbox.is_empty() && !st.blocked {
        let sent = if let Some(frame) = st.outbox.single() {
            send(conn.fd, frame)
        } else {
            let mut cork = shard.cork.borrow_mut();
            cork.clear();
            st.outbox.fill(&mut cork, CORK_BYTES);
            send(conn.fd, &cork)
        };
        match sent {
            Ok(n) => {
                st.outbox.consume(n);
                let c = &shard.counters;
                c.bytes_out.set(c.bytes_out.get() + n as u64);
                bump(&c.writes);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => st.blocked = true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                drop(st);
                teardown(shard, conn);
                return false;
            }
        }
    }
    if st.phase == Phase::Closing && st.outbox.is_empty() {
        // Close frame written: half-close and wait (bounded) for the peer's EOF.
        // SAFETY: shutdown(2) on a socket we own.
        unsafe { libc::shutdown(conn.fd, libc::SHUT_WR) };
        st.phase = Phase::Closed;
        conn.arm(shard, &mut st);
    }
    true
}

fn send(fd: RawFd, bytes: &[u8]) -> std::io::Result<usize> {
    // SAFETY: send from a buffer we own on a socket we own.
    let n = unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Ends a connection: leave every channel, forget the user, free the slot, close the socket
/// (which also removes it from the epoll set). Safe to call twice.
pub fn teardown(shard: &Shard, conn: &Rc<Connection>) {
    if shard.conns.borrow().get(conn.key).is_none() {
        return;
    }
    {
        let mut st = conn.state.borrow_mut();
        let st = &mut *st;
        let mut expires = st.expires_at;
        let mut sub_expires = st.sub_expires_at;
        let mut host = ShardHost {
            shard,
            key: conn.key,
            expires_at: &mut expires,
            sub_expires_at: &mut sub_expires,
            bucket: None,
        };
        st.session.leave_all(&mut host);
        if st.sub_expires_at != 0 {
            shard.sub_expiries.borrow_mut().remove(conn.key);
        }
        if let Some(ident) = st.session.identity.as_ref() {
            shard.forget_user(&ident.user, conn.key);
        }
        shard.connects.borrow_mut().remove(&conn.key);
        st.outbox.clear();
        st.partial = None;
        st.phase = Phase::Abort;
    }
    shard.conns.borrow_mut().remove(conn.key);
    shard.poller.remove(conn.fd);
    // SAFETY: the fd is ours and closed once (the table entry is gone).
    unsafe { libc::close(conn.fd) };
    shard.node.connections.fetch_sub(1, Ordering::Relaxed);
}

/// Decodes and answers bytes read from the client.
fn process(shard: &Shard, conn: &Connection, input: &mut [u8]) {
    let mut guard = conn.state.borrow_mut();
    let st = &mut *guard;
    if st.phase != Phase::Open {
        return; // closing: the rest of the input is discarded
    }
    let max_outbox = shard.cfg.limits.max_outbox_bytes;
    let mut partial = st.partial.take();
    let mut close: Option<(u16, &'static str)> = None;
    let mut overflow = false;
    let expires_before = (st.expires_at, st.sub_expires_at);
    let connected_before = st.session.is_connected();
    let echo = st.echo;
    let ConnState {
        session,
        outbox,
        awaiting_pong,
        expires_at,
        sub_expires_at,
        bucket,
        ..
    } = st;
    let result = shard
        .decoder
        .feed(&mut partial, input, &mut |event| match event {
            Event::Message { payload, text } if echo => {
                let mut f = FrameBuf::with_capacity(payload.len());
                f.payload().extend_from_slice(payload);
                let op = if text { OP_TEXT } else { ws::OP_BINARY };
                if outbox.push(f.finish(op), max_outbox) == Push::Overflow {
                    overflow = true;
                    return Flow::Stop;
                }
                Flow::Continue
            }
            Event::Message { payload, .. } => {
                bump(&shard.counters.messages_in);
                *awaiting_pong = false;
                let Ok(text) = std::str::from_utf8(payload) else {
                    close = Some((
                        Disconnect::BadRequest.code(),
                        Disconnect::BadRequest.reason(),
                    ));
                    return Flow::Stop;
                };
                let mut frame = FrameBuf::with_capacity(96);
                let mut host = ShardHost {
                    shard,
                    key: conn.key,
                    expires_at: &mut *expires_at,
                    sub_expires_at: &mut *sub_expires_at,
                    bucket: Some(&mut *bucket),
                };
                let outcome = session.handle_message(&mut host, text, frame.payload());
                if frame.payload_len() > 0
                    && outbox.push(frame.finish(OP_TEXT), max_outbox) == Push::Overflow
                {
                    overflow = true;
                    return Flow::Stop;
                }
                match outcome {
                    Ok(()) => Flow::Continue,
                    Err(d) => {
                        close = Some((d.code(), d.reason()));
                        Flow::Stop
                    }
                }
            }
            Event::Ping(payload) => {
                let mut f = FrameBuf::with_capacity(payload.len());
                f.payload().extend_from_slice(payload);
                if outbox.push(f.finish(OP_PONG), max_outbox) == Push::Overflow {
                    overflow = true;
                    return Flow::Stop;
                }
                Flow::Continue
            }
            Event::Pong(_) => Flow::Continue,
            Event::Close(c) => {
                // Echo the client's status code (RFC 6455 §5.5.1).
                close = Some((c.map(|(code, _)| code).unwrap_or(ws::close::NORMAL), ""));
                Flow::Stop
            }
        });
    st.partial = partial;
    match result {
        Err(v) => {
            bump(&shard.counters.protocol_violations);
            queue_close(st, v.code, v.reason);
        }
        Ok(_) if overflow => {
            bump(&shard.counters.slow_disconnects);
            let d = Disconnect::Slow;
            queue_close(st, d.code(), d.reason());
        }
        Ok(_) => {
            if let Some((code, reason)) = close {
                queue_close(st, code, reason);
                st.partial = None;
            }
        }
    }
    let just_connected = !connected_before && st.session.is_connected();
    if just_connected {
        // Pings are counted from the connect; the pre-connect deadline no longer applies. The
        // first ping comes up to a fifth of the interval early, at random, so that connections
        // made in the same second (a reconnect wave) do not ping in the same tick forever.
        let spread = shard.cfg.ping.interval_secs / 5;
        let early = if spread > 0 {
            fastrand::u32(0..=spread)
        } else {
            0
        };
        st.last_ping = shard.tick_now().saturating_sub(early);
    }
    let expires_now = (st.expires_at, st.sub_expires_at);
    if just_connected || expires_now != expires_before || st.phase != Phase::Open {
        conn.arm(shard, st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_connection_state_stays_small() {
        // The headline number: per idle connection we hold this struct (in an Rc), a slot in
        // the shard table, one entry per subscribed channel and glommio's task and socket.
        let size = std::mem::size_of::<Connection>();
        assert!(size <= 192, "Connection grew to {size} bytes");
    }
}

#[cfg(test)]
mod heap_tests {
    use super::*;
    use crate::config::Config;
    use crate::shard::NodeInfo;
    use std::io::{Read, Write};
    use std::sync::Arc;

    /// Heap bytes one idle, connected, subscribed WebSocket connection holds on its shard thread
    /// (counted by the test allocator: exact, no allocator overhead, no kernel). The density
    /// bench measures the same thing as RSS.
    #[test]
    fn idle_subscribed_connection_heap_bytes() {
        const N: usize = 200;
        let result = glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let cfg = Config {
                    insecure: true,
                    ..Config::default()
                };
                let node = Arc::new(NodeInfo::new("t".into(), "t".into(), "t".into(), 1));
                let (tx, _rx) = crate::bus::broker_queue(1 << 16, false).unwrap();
                let shard = Shard::new(0, Arc::new(cfg), node, tx, None);
                crate::shard::spawn_io(&shard);
                // Clients on another thread: their allocations are not counted here.
                let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
                let client = std::thread::spawn(move || {
                    let mut socks = Vec::new();
                    for i in 0..N {
                        let mut s = std::net::TcpStream::connect(addr).unwrap();
                        s.write_all(b"GET /connection/websocket HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
                        let mut head = [0u8; 129];
                        s.read_exact(&mut head).unwrap();
                        let cmd = format!("{{\"id\":1,\"connect\":{{}}}}\n{{\"id\":2,\"subscribe\":{{\"channel\":\"c{}\"}}}}", i % 10);
                        s.write_all(&ws::client_frame(1, true, cmd.as_bytes(), [1, 2, 3, 4])).unwrap();
                        let mut reply = [0u8; 512];
                        let n = s.read(&mut reply).unwrap();
                        assert!(String::from_utf8_lossy(&reply[..n]).contains("\"subscribe\""));
                        socks.push(s);
                    }
                    done_rx.recv().unwrap();
                    drop(socks);
                });
                // Warm up one connection first (lazily built executor state), then measure.
                let mut before = (0, 0);
                for i in 0..N {
                    let stream = listener.accept().await.unwrap();
                    glommio::spawn_local(crate::http::serve(shard.clone(), stream)).detach();
                    if i == 0 {
                        while shard.conns.borrow().is_empty() {
                            glommio::timer::sleep(Duration::from_millis(5)).await;
                        }
                        glommio::timer::sleep(Duration::from_millis(50)).await;
                        before = crate::alloc_count::live();
                    }
                }
                while shard.index.borrow().subscriptions() < N as u64 {
                    glommio::timer::sleep(Duration::from_millis(5)).await;
                }
                glommio::timer::sleep(Duration::from_millis(100)).await;
                let after = crate::alloc_count::live();
                done_tx.send(()).unwrap();
                client.join().unwrap();
                let n = (N - 1) as isize;
                ((after.0 - before.0) / n, (after.1 - before.1) as f64 / n as f64)
            })
            .unwrap()
            .join()
            .unwrap();
        eprintln!(
            "idle subscribed connection: {} heap bytes in {:.1} blocks on its shard (Connection {} B, Session {} B)",
            result.0,
            result.1,
            std::mem::size_of::<Connection>(),
            std::mem::size_of::<Session>()
        );
        assert!(
            result.0 <= 1100,
            "per-connection heap grew to {} bytes",
            result.0
        );
    }
}

#[cfg(test)]
mod glommio_cost_tests {
    use futures_lite::AsyncReadExt;
    use std::time::Duration;

    /// What glommio itself holds per idle socket: a task waiting on a read of a `TcpStream`
    /// (the task, the future, and the readiness `Source` the read arms). Printed for the
    /// density notes; asserted loosely so a glommio upgrade that changes it is noticed.
    #[test]
    fn glommio_idle_socket_heap_bytes() {
        const N: usize = 200;
        let (per_socket, per_task) = glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let client = std::thread::spawn(move || {
                    let socks: Vec<_> = (0..N)
                        .map(|_| std::net::TcpStream::connect(addr).unwrap())
                        .collect();
                    std::thread::sleep(Duration::from_millis(500));
                    drop(socks);
                });
                let mut streams = Vec::with_capacity(N);
                let before = crate::alloc_count::live();
                for _ in 0..N {
                    streams.push(listener.accept().await.unwrap());
                }
                // A task per socket, each waiting in read(): what an idle connection costs.
                let mut tasks = Vec::new();
                for mut s in streams.drain(..) {
                    tasks.push(glommio::spawn_local(async move {
                        let mut b = [0u8; 1];
                        let _ = s.read(&mut b).await;
                    }));
                }
                glommio::timer::sleep(Duration::from_millis(100)).await;
                let after = crate::alloc_count::live();
                let per_socket = (after.0 - before.0) / N as isize;
                // The same without a read armed: task + future only.
                let before = crate::alloc_count::live();
                let idle: Vec<_> = (0..N)
                    .map(|_| glommio::spawn_local(glommio::timer::sleep(Duration::from_secs(3600))))
                    .collect();
                glommio::timer::sleep(Duration::from_millis(10)).await;
                let per_task = (crate::alloc_count::live().0 - before.0) / N as isize;
                drop(idle);
                for t in tasks {
                    t.await;
                }
                client.join().unwrap();
                (per_socket, per_task)
            })
            .unwrap()
            .join()
            .unwrap();
        eprintln!("glommio: task waiting in TcpStream::read {per_socket} heap bytes; a task waiting on a timer {per_task} heap bytes");
        assert!(per_socket < 2048);
    }
}
