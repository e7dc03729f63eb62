//! The WebSocket phase of one connection: a thin pump around plain state.
//!
//! One task per connection polls one future ([`pump`]) that writes the outbox (coalesced into
//! the shard's cork buffer, one `send` for every queued frame) and reads into the shard's
//! scratch buffer, decoding and answering in place. While idle the connection holds no buffer:
//! its outbox is empty, its decoder state is `None`, and it waits on the socket's readiness.
//! Fan-out, deferred replies and timers reach it through [`Connection::push`] and a wake-up.

use super::{bump, Shard, ShardHost, CORK_BYTES};
use crate::conn::outbox::{Outbox, Push};
use crate::conn::session::Session;
use crate::conn::ConnKey;
use crate::protocol::reply::{self, ClientInfo};
use crate::protocol::Disconnect;
use crate::ws::{self, Event, Flow, FrameBuf, Partial, OP_PONG, OP_TEXT};
use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};

/// Seconds a connection may take to answer our close frame before it is dropped.
const CLOSE_TIMEOUT_SECS: u32 = 3;
/// Reads handled in one poll before yielding to other tasks of the shard.
const READS_PER_POLL: u32 = 8;

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
}

/// One WebSocket connection, owned by its shard's table and its task.
pub struct Connection {
    pub key: ConnKey,
    pub state: RefCell<ConnState>,
    waker: RefCell<Option<Waker>>,
}

impl Connection {
    fn new(key: ConnKey, now: u32) -> Connection {
        Connection {
            key,
            state: RefCell::new(ConnState {
                session: Session::default(),
                outbox: Outbox::default(),
                partial: None,
                phase: Phase::Open,
                armed: 0,
                last_ping: now,
                awaiting_pong: false,
                expires_at: 0,
            }),
            waker: RefCell::new(None),
        }
    }

    fn wake(&self) {
        if let Some(w) = self.waker.borrow().as_ref() {
            w.wake_by_ref();
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
            drop(st);
            self.wake();
        } else if was_empty {
            drop(st);
            self.wake();
        }
    }

    /// Closes with a code and reason (server-initiated).
    pub fn close_with(&self, _shard: &Shard, code: u16, reason: &str) {
        let mut st = self.state.borrow_mut();
        if st.phase == Phase::Open {
            queue_close(&mut st, code, reason);
            drop(st);
            self.wake();
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
        let mut f = FrameBuf::with_capacity(64 + channel.len());
        reply::unsubscribe_push(f.payload(), channel, 2000, "server unsubscribe");
        self.push(shard, f.finish(OP_TEXT));
    }

    /// The client id, once connected.
    pub fn client_id(&self) -> Option<Rc<str>> {
        let st = self.state.borrow();
        st.session.identity.as_ref().map(|i| i.client.clone())
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
                self.wake();
                return;
            }
            Phase::Open => {}
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
        self.wake();
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
        st.armed = shard.wheel.borrow_mut().arm(self.key, due);
    }
}

fn queue_close(st: &mut ConnState, code: u16, reason: &str) {
    if code == Disconnect::Slow.code() {
        st.outbox.clear();
    }
    st.outbox.push_unbounded(ws::close_frame(code, reason));
    st.phase = Phase::Closing;
}

/// Runs the WebSocket phase of an upgraded connection until it ends. `early` holds bytes the
/// client sent right after its request head.
pub async fn run(shard: Rc<Shard>, mut stream: TcpStream, early: Vec<u8>) {
    let now = shard.tick_now();
    let conn = shard
        .conns
        .borrow_mut()
        .insert_with(|key| Rc::new(Connection::new(key, now)));
    bump(&shard.counters.ws_opened);
    {
        let mut st = conn.state.borrow_mut();
        conn.arm(&shard, &mut st);
    }
    if !early.is_empty() {
        let mut early = early;
        process(&shard, &conn, &mut early);
    }
    std::future::poll_fn(|cx| pump(&shard, &conn, &mut stream, cx)).await;
    // Teardown: leave every channel, forget the user, free the slot.
    {
        let mut st = conn.state.borrow_mut();
        let st = &mut *st;
        let mut expires = st.expires_at;
        let mut host = ShardHost {
            shard: &shard,
            key: conn.key,
            expires_at: &mut expires,
        };
        st.session.leave_all(&mut host);
        if let Some(ident) = st.session.identity.as_ref() {
            shard.forget_user(&ident.user, conn.key);
        }
        st.outbox.clear();
        st.partial = None;
    }
    shard.conns.borrow_mut().remove(conn.key);
    *conn.waker.borrow_mut() = None;
    shard.node.connections.fetch_sub(1, Ordering::Relaxed);
}

/// One poll of a connection: write what is queued, then read and handle what arrived.
fn pump(
    shard: &Shard,
    conn: &Connection,
    stream: &mut TcpStream,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let mut reads = 0;
    loop {
        // 1. Write everything queued, in as few syscalls as possible.
        {
            let mut st = conn.state.borrow_mut();
            if st.phase == Phase::Abort {
                return Poll::Ready(());
            }
            while !st.outbox.is_empty() {
                let polled = if let Some(frame) = st.outbox.single().cloned() {
                    Pin::new(&mut *stream).poll_write(cx, &frame)
                } else {
                    let mut cork = shard.cork.borrow_mut();
                    cork.clear();
                    st.outbox.fill(&mut cork, CORK_BYTES);
                    Pin::new(&mut *stream).poll_write(cx, &cork)
                };
                match polled {
                    Poll::Ready(Ok(n)) if n > 0 => st.outbox.consume(n),
                    Poll::Ready(_) => return Poll::Ready(()), // write error or closed
                    Poll::Pending => break,
                }
            }
            if st.phase == Phase::Closing && st.outbox.is_empty() {
                // Close frame written: half-close and wait (bounded) for the peer's EOF.
                // SAFETY: shutdown(2) on a socket fd we own.
                unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR) };
                st.phase = Phase::Closed;
                conn.arm(shard, &mut st);
            }
        }
        // 2. Read into the shard's scratch buffer.
        if reads >= READS_PER_POLL {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let mut scratch = shard.scratch.borrow_mut();
        match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(n)) => {
                reads += 1;
                process(shard, conn, &mut scratch[..n]);
            }
            Poll::Pending => {
                let mut w = conn.waker.borrow_mut();
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
        }
    }
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
    let expires_before = st.expires_at;
    let connected_before = st.session.is_connected();
    let ConnState {
        session,
        outbox,
        awaiting_pong,
        expires_at,
        ..
    } = st;
    let result = shard
        .decoder
        .feed(&mut partial, input, &mut |event| match event {
            Event::Message { payload, .. } => {
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
        // Pings are counted from the connect; the pre-connect deadline no longer applies.
        st.last_ping = shard.tick_now();
    }
    if just_connected || st.expires_at != expires_before || st.phase != Phase::Open {
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
