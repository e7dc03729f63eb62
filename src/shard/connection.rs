//! The WebSocket phase of one connection: plain state, serviced by its shard on completions.
//!
//! An upgraded connection is a [`Connection`] in the shard's table and one armed multishot
//! receive in the shard's ring ([`super::ring`]); no task, no future and no buffer wait for it.
//! When data arrives the kernel picks a buffer of the shard's provided-buffer ring and the shard
//! decodes and answers in place ([`Connection::process`]); a partial frame's tail is copied out
//! into the connection. Frames to send (fan-out, replies, pings) are queued as shared `Bytes` in
//! the outbox; [`Connection::next_write`] hands the shard every queued frame as one send (the
//! frame itself when there is one, else one buffer holding them all), and while that send is in
//! flight new frames wait and go together in the next one ([`Connection::sent`]).
//!
//! Wire formats ([`Wire`]): a JSON connection gets the session's output in text frames; a
//! protobuf connection (`centrifuge-protobuf`) has its binary frames turned into the session's
//! JSON command lines and everything it is sent turned into varint-delimited replies in binary
//! frames, here, at the one place output is framed ([`crate::protocol::protobuf`]). Shared
//! publication frames come with their protobuf twin from the broker or the shard's inbox.
//!
//! Runs on the shard thread. Sees only [`ConnCtx`] (never the shard itself) and makes no system
//! call: it says what to submit, and when the connection must end its methods return the
//! [`Reason`] and the shard tears it down ([`super::io`]). Holds no borrow past a call.

use super::context::{ConnCtx, Expiry, CORK_BYTES};
use super::counters::bump;
use super::reason::Reason;
use crate::conn::bucket::Bucket;
use crate::conn::outbox::{Outbox, Push};
use crate::conn::session::{Ended, Session};
use crate::conn::ConnKey;
use crate::protocol::protobuf;
use crate::protocol::reply::ClientInfo;
use crate::protocol::Disconnect;
use crate::ws::{self, Event, Flow, FrameBuf, Partial, OP_PONG, OP_TEXT};
use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::os::fd::{IntoRawFd, OwnedFd, RawFd};
#[cfg(test)]
use std::time::Duration;

/// Kept for `http`, which starts the WebSocket phase through this path after an upgrade.
pub use super::io::start;

/// Seconds a connection may take to answer our close frame before it is dropped.
const CLOSE_TIMEOUT_SECS: u32 = 3;

/// The server ping: an empty JSON object in a text frame.
static PING_FRAME: [u8; 4] = [0x81, 0x02, b'{', b'}'];

/// The server ping of a protobuf connection: an empty `Reply`, varint-delimited (one zero
/// byte), in a binary frame.
static PING_FRAME_PROTOBUF: [u8; 3] = [0x82, 0x01, 0x00];

/// How a connection's messages are encoded (it takes the place of a flag: no extra byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// The JSON protocol in text frames.
    Json,
    /// The protobuf protocol (`centrifuge-protobuf`) in binary frames.
    Protobuf,
    /// The conformance echo endpoint: messages are echoed, no protocol session.
    Echo,
    /// `/connection/sse`: the emulation's stream as Server-Sent Events (`data: <reply>`),
    /// commands by `POST /emulation`. Reads nothing from the socket.
    Sse,
    /// `/connection/http_stream`: the emulation's stream as newline-delimited JSON replies.
    HttpStream,
    /// `/connection/uni_sse`: pushes alone (no `{"push":...}` wrapper) as SSE events.
    UniSse,
    /// `/connection/uni_http_stream`: pushes alone as newline-delimited JSON.
    UniHttpStream,
    /// `/connection/uni_websocket`: one connect request message, then pushes alone in text
    /// frames; later client messages are ignored.
    UniWebsocket,
}

impl Wire {
    /// The connection's `transport` and `protocol` as the proxies' request bodies name them
    /// (Centrifugo's names).
    pub fn names(self) -> (&'static str, &'static str) {
        match self {
            Wire::Json | Wire::Echo => ("websocket", "json"),
            Wire::Protobuf => ("websocket", "protobuf"),
            Wire::Sse => ("sse", "json"),
            Wire::HttpStream => ("http_stream", "json"),
            Wire::UniSse => ("uni_sse", "json"),
            Wire::UniHttpStream => ("uni_http_stream", "json"),
            Wire::UniWebsocket => ("uni_websocket", "json"),
        }
    }
}

impl Wire {
    /// The connection is the body of an HTTP response (no WebSocket frames either way).
    pub fn is_http_stream(self) -> bool {
        matches!(
            self,
            Wire::Sse | Wire::HttpStream | Wire::UniSse | Wire::UniHttpStream
        )
    }

    /// A unidirectional transport: the client gets pushes only, and sends nothing after its
    /// connect request.
    pub fn is_uni(self) -> bool {
        matches!(
            self,
            Wire::UniSse | Wire::UniHttpStream | Wire::UniWebsocket
        )
    }

    /// Output is reframed at the edge (anything but plain JSON/protobuf WebSocket frames).
    fn reframed(self) -> bool {
        self.is_http_stream() || self.is_uni()
    }
}

/// The payload of an unmasked server text frame (a slice of the same bytes), or `None` for
/// any other frame.
fn text_payload(frame: &Bytes) -> Option<Bytes> {
    if frame.len() < 2 || frame[0] != 0x80 | OP_TEXT {
        return None;
    }
    let (start, len) = match frame[1] & 0x7f {
        126 if frame.len() >= 4 => (4, u16::from_be_bytes([frame[2], frame[3]]) as usize),
        127 if frame.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&frame[2..10]);
            (10, u64::from_be_bytes(n) as usize)
        }
        126 | 127 => return None,
        n => (2, n as usize),
    };
    (frame.len() == start + len).then(|| frame.slice(start..))
}

/// One line of session output as a unidirectional client gets it (Centrifugo sends the
/// `Push` objects alone): a push's inner object (a slice of the shared bytes), the connect
/// reply without its `id` (`{"connect":{...}}`, the connect push), the ping `{}` as it is;
/// other replies are dropped (a uni client sends no commands; a connect error closes it,
/// see [`uni_connect_error`]).
fn uni_line(line: Bytes) -> Option<Bytes> {
    const PUSH: &[u8] = b"{\"push\":";
    const ID: &[u8] = b"{\"id\":";
    if line.starts_with(PUSH) && line.ends_with(b"}") {
        return Some(line.slice(PUSH.len()..line.len() - 1));
    }
    if line.starts_with(ID) {
        let comma = line.iter().position(|&b| b == b',')?;
        let rest = &line[comma + 1..];
        if rest.starts_with(b"\"connect\":") {
            let mut out = Vec::with_capacity(rest.len() + 1);
            out.push(b'{');
            out.extend_from_slice(rest);
            // A uni client cannot answer pings: Centrifugo announces no pong to it. `pong`
            // follows `data` and `subs` in the result, so its last occurrence is its own.
            const PONG: &[u8] = b",\"pong\":true";
            if let Some(at) = out.windows(PONG.len()).rposition(|w| w == PONG) {
                out.drain(at..at + PONG.len());
            }
            return Some(Bytes::from(out));
        }
        return None;
    }
    Some(line)
}

/// The disconnect a connect error reply in uni session output becomes (Centrifugo's default
/// mapping for unidirectional clients: expired → 3005, too many requests → 3013,
/// permission denied → 3507, anything else → 3004).
fn uni_connect_error(json: &[u8]) -> Option<Disconnect> {
    const ERROR: &[u8] = b"\"error\":{\"code\":";
    let at = json.windows(ERROR.len()).position(|w| w == ERROR)?;
    let digits: Vec<u8> = json[at + ERROR.len()..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    let code: u32 = std::str::from_utf8(&digits).ok()?.parse().ok()?;
    Some(match code {
        109 | 110 => Disconnect::Expired,
        111 => Disconnect::TooManyRequests,
        103 => Disconnect::PermissionDenied,
        _ => Disconnect::ServerError,
    })
}

static SSE_DATA: &[u8] = b"data: ";
static SSE_END: &[u8] = b"\n\n";
static LINE_END: &[u8] = b"\n";

/// Queues `frame` (a WebSocket frame as the session, the broker or the timer produce it) in
/// the connection's wire format. WebSocket wires queue it as it is. The other wires queue
/// each JSON line of its payload, a slice of the same bytes (a shared publication stays
/// shared: no copy per connection), inside its framing: SSE `data: <line>\n\n`, HTTP stream
/// `<line>\n`, uni WebSocket a header of its own before the slice. A frame's lines are
/// queued whole or not at all: past `max` bytes queued nothing is queued and it overflows.
fn queue_frame(outbox: &mut Outbox, wire: Wire, frame: Bytes, max: usize) -> Push {
    if !wire.reframed() {
        return outbox.push(frame, max);
    }
    let Some(payload) = text_payload(&frame) else {
        // Control frames (pongs) only exist on a uni WebSocket; a stream has none.
        if wire.is_http_stream() {
            return Push::Queued;
        }
        return outbox.push(frame, max);
    };
    let lines = || {
        payload
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| {
                let line = payload.slice_ref(l);
                if wire.is_uni() {
                    uni_line(line)
                } else {
                    Some(line)
                }
            })
    };
    let framing = |len: usize| match wire {
        Wire::Sse | Wire::UniSse => SSE_DATA.len() + SSE_END.len(),
        Wire::HttpStream | Wire::UniHttpStream => LINE_END.len(),
        _ => frame_head(len).1,
    };
    let total: usize = lines().map(|l| l.len() + framing(l.len())).sum();
    if outbox.len_bytes() + total > max {
        return Push::Overflow;
    }
    for line in lines() {
        match wire {
            Wire::Sse | Wire::UniSse => {
                outbox.push_unbounded(Bytes::from_static(SSE_DATA));
                outbox.push_unbounded(line);
                outbox.push_unbounded(Bytes::from_static(SSE_END));
            }
            Wire::HttpStream | Wire::UniHttpStream => {
                outbox.push_unbounded(line);
                outbox.push_unbounded(Bytes::from_static(LINE_END));
            }
            _ => {
                let (head, n) = frame_head(line.len());
                let head = match SMALL_TEXT_HEADS.get(line.len()) {
                    // Most pushes are short: their header is a static slice, no allocation.
                    Some(h) => Bytes::from_static(h),
                    None => Bytes::copy_from_slice(&head[..n]),
                };
                outbox.push_unbounded(head);
                outbox.push_unbounded(line);
            }
        }
    }
    Push::Queued
}

/// Headers of unmasked text frames of 0..126 payload bytes, indexed by length.
static SMALL_TEXT_HEADS: [[u8; 2]; 126] = {
    let mut t = [[0x80 | OP_TEXT, 0]; 126];
    let mut i = 0;
    while i < 126 {
        t[i][1] = i as u8;
        i += 1;
    }
    t
};

/// The header of an unmasked text frame with a payload of `len` bytes, and its length.
fn frame_head(len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x80 | OP_TEXT;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if len <= u16::MAX as usize {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// The connect command a unidirectional client's connect request becomes: the request (a
/// JSON object, `ConnectRequest`: `token`, `data`, `subs`, `name`, `version`) under
/// `connect` with id 1. `None` when it is not a JSON object (the caller refuses it: HTTP 400,
/// or close 3501 on a uni WebSocket). Empty = `{}`.
pub fn uni_connect_command(request: &[u8]) -> Option<String> {
    let request = std::str::from_utf8(request).ok()?.trim();
    let request = if request.is_empty() { "{}" } else { request };
    match serde_json::from_str::<serde_json::Value>(request) {
        // Re-encoded: compact, on one line (the session reads commands line by line).
        Ok(v @ serde_json::Value::Object(_)) => Some(format!("{{\"id\":1,\"connect\":{v}}}")),
        _ => None,
    }
}

fn bad_request_close() -> (Reason, u16, &'static str) {
    let d = Disconnect::BadRequest;
    (Reason::Session(d), d.code(), d.reason())
}

/// The disconnect push of a stream or uni connection, `{"push":{"disconnect":{...}}}` in a
/// text frame (framed for its wire by [`queue_frame`]), the form Centrifugo's non-WebSocket
/// transports end with.
fn disconnect_push(code: u16, reason: &str) -> Bytes {
    let reason = serde_json::to_string(reason).unwrap_or_else(|_| "\"\"".into());
    let json = format!("{{\"push\":{{\"disconnect\":{{\"code\":{code},\"reason\":{reason}}}}}}}");
    ws::text_frame(json.as_bytes())
}

/// Frames session output (JSON lines in `f`) for `wire`: a text frame, or for protobuf the
/// same replies transcoded into a binary frame.
fn frame_output(wire: Wire, f: FrameBuf) -> Result<Bytes, Reason> {
    if wire != Wire::Protobuf {
        return Ok(f.finish(OP_TEXT));
    }
    let mut f = f;
    let json = &f.payload()[ws::HEADROOM..];
    let mut out = FrameBuf::with_capacity(json.len());
    match protobuf::replies_from_json(json, out.payload()) {
        Ok(()) => Ok(out.finish(ws::OP_BINARY)),
        Err(e) => {
            tracing::warn!(error = %e, "session output not representable in protobuf");
            Err(Reason::ServerError)
        }
    }
}

/// Queues what a session wrote outside a client message (a backend's answer, a server API
/// command, expired subscriptions) in the connection's wire format. Over the outbox bound the
/// connection is closed as slow; output that protobuf cannot express closes it as a server
/// error. True when the connection goes on.
fn queue_output(ctx: &ConnCtx, st: &mut ConnState, frame: FrameBuf) -> bool {
    if frame.payload_len() == 0 {
        return true;
    }
    let mut frame = frame;
    if st.wire.is_uni() {
        if let Some(d) = uni_connect_error(&frame.payload()[ws::HEADROOM..]) {
            queue_close(st, Reason::Session(d), d.code(), d.reason());
            return false;
        }
    }
    match frame_output(st.wire, frame) {
        Ok(frame) => {
            let max = ctx.cfg.limits.max_outbox_bytes;
            if queue_frame(&mut st.outbox, st.wire, frame, max) == Push::Overflow {
                bump(&ctx.counters.slow_disconnects);
                queue_close_as(st, Reason::Slow);
                return false;
            }
            true
        }
        Err(why) => {
            queue_close_as(st, why);
            false
        }
    }
}

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
    /// Why the connection is ending, set when it leaves `Open` by our doing or the peer's
    /// close frame (the socket event that finally ends it does not override it).
    end: Option<Reason>,
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
    /// A send is in flight: frames queued meanwhile go in the next one.
    sending: bool,
    /// Queued in the shard's dirty list (to be flushed at the end of the batch).
    dirty: bool,
    /// The connection's wire format (JSON, protobuf, or the conformance echo endpoint).
    wire: Wire,
    /// Command rate limit.
    bucket: Bucket,
}

impl ConnState {
    /// The session with the connection's deadlines, for a call into the session driver.
    fn session_and_expiry(&mut self) -> (&mut Session, Expiry<'_>) {
        let expiry = Expiry {
            conn: &mut self.expires_at,
            subs: &mut self.sub_expires_at,
            wire: self.wire,
        };
        (&mut self.session, expiry)
    }
}

/// One WebSocket connection, owned by its shard's table.
pub struct Connection {
    pub key: ConnKey,
    /// The socket; -1 once teardown handed it to the ring to be closed. A connection dropped
    /// with its socket still here closes it itself.
    fd: Cell<RawFd>,
    pub state: RefCell<ConnState>,
}

impl Connection {
    pub fn new(key: ConnKey, fd: OwnedFd, now: u32, wire: Wire, bucket: Bucket) -> Connection {
        Connection {
            key,
            fd: Cell::new(fd.into_raw_fd()),
            state: RefCell::new(ConnState {
                session: Session::default(),
                outbox: Outbox::default(),
                partial: None,
                phase: Phase::Open,
                end: None,
                armed: 0,
                last_ping: now,
                awaiting_pong: false,
                expires_at: 0,
                sub_expires_at: 0,
                sending: false,
                dirty: false,
                wire,
                bucket,
            }),
        }
    }

    /// The socket (-1 once teardown took it).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.get()
    }

    /// Takes the socket away to be closed by the shard (teardown); `None` the second time.
    pub fn take_fd(&self) -> Option<RawFd> {
        let fd = self.fd.replace(-1);
        (fd >= 0).then_some(fd)
    }

    /// Puts the connection on the shard's list of connections to flush after this batch.
    fn wake(&self, ctx: &ConnCtx) {
        let mut st = self.state.borrow_mut();
        if !st.dirty {
            st.dirty = true;
            ctx.io.mark_dirty(self.key);
        }
    }

    /// The connection's wire format.
    pub fn wire(&self) -> Wire {
        self.state.borrow().wire
    }

    /// Queues a frame (fan-out, deferred reply, ping). Over the outbox bound the connection is
    /// closed as slow and its queue dropped. A JSON text frame queued for a protobuf
    /// connection is transcoded to its binary twin first (shared frames come transcoded
    /// already, once per shard: see the inbox).
    pub fn push(&self, ctx: &ConnCtx, frame: Bytes) {
        let mut st = self.state.borrow_mut();
        if st.phase != Phase::Open {
            return;
        }
        let frame = if st.wire == Wire::Protobuf && frame.first() == Some(&(0x80 | OP_TEXT)) {
            bump(&ctx.counters.protobuf_transcodes);
            match protobuf::binary_twin(&frame) {
                Ok(Some(twin)) => twin,
                Ok(None) | Err(_) => {
                    tracing::warn!("frame not representable in protobuf");
                    queue_close_as(&mut st, Reason::ServerError);
                    self.arm(ctx, &mut st);
                    drop(st);
                    self.wake(ctx);
                    return;
                }
            }
        } else {
            frame
        };
        let was_empty = st.outbox.is_empty();
        let wire = st.wire;
        if queue_frame(&mut st.outbox, wire, frame, ctx.cfg.limits.max_outbox_bytes)
            == Push::Overflow
        {
            bump(&ctx.counters.slow_disconnects);
            queue_close_as(&mut st, Reason::Slow);
            self.arm(ctx, &mut st); // the close timeout now applies
            drop(st);
            self.wake(ctx);
        } else if was_empty {
            drop(st);
            self.wake(ctx);
        }
    }

    /// Closes for a server-side reason with a fixed close code ([`Reason::close_frame`]).
    pub fn close(&self, ctx: &ConnCtx, why: Reason) {
        let (code, text) = why.close_frame().unwrap_or((
            Disconnect::ServerError.code(),
            Disconnect::ServerError.reason(),
        ));
        self.close_with(ctx, why, code, text);
    }

    /// Closes with a code and reason text (server-initiated).
    pub fn close_with(&self, ctx: &ConnCtx, why: Reason, code: u16, text: &str) {
        let mut st = self.state.borrow_mut();
        if st.phase == Phase::Open {
            queue_close(&mut st, why, code, text);
            self.arm(ctx, &mut st);
            drop(st);
            self.wake(ctx);
        }
    }

    /// Forgets channel `chan` in the session (the caller updates the index). Returns whether
    /// the session was in it.
    pub fn drop_subscription(&self, chan: crate::conn::session::ChanId) -> bool {
        let mut st = self.state.borrow_mut();
        match st.session.subs.iter().position(|&c| c == chan) {
            Some(pos) => {
                st.session.subs.swap_remove(pos);
                true
            }
            None => false,
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
            chan_info: None,
        })
    }

    /// The connection's timer fired at tick `now`.
    pub fn on_timer(&self, ctx: &ConnCtx, now: u32) {
        let mut st = self.state.borrow_mut();
        if now != st.armed {
            return; // stale entry
        }
        let ping = &ctx.cfg.ping;
        match st.phase {
            Phase::Abort => return,
            Phase::Closing | Phase::Closed => {
                st.phase = Phase::Abort;
                drop(st);
                self.wake(ctx);
                return;
            }
            Phase::Open => {}
        }
        if st.wire == Wire::Echo {
            // Conformance endpoint: no protocol heartbeats and no stale timeout.
            st.last_ping = now;
            self.arm(ctx, &mut st);
            return;
        }
        let connected = st.session.is_connected();
        if !connected && now >= st.last_ping + ctx.cfg.limits.handshake_timeout_secs {
            // Upgraded but never sent connect: stale.
            queue_close_as(&mut st, Reason::Stale);
        } else if st.awaiting_pong && now >= st.last_ping + ping.pong_timeout_secs {
            bump(&ctx.counters.no_pong_disconnects);
            queue_close_as(&mut st, Reason::NoPong);
        } else if st.expires_at != 0 && now >= st.expires_at {
            let (session, expiry) = st.session_and_expiry();
            // A connection the backend let in is refreshed by the node (it stays meanwhile).
            if !ctx.sessions.refresh_due(self.key, session, expiry) {
                queue_close_as(&mut st, Reason::Expired);
            }
        } else if st.sub_expires_at != 0 && now >= st.sub_expires_at {
            // Subscriptions whose token expired without a refresh end (push 2501); the
            // connection and its other subscriptions stay. A ping due now goes next tick.
            self.expire_subscriptions(ctx, &mut st);
        } else if connected && now >= st.last_ping + ping.interval_secs {
            st.last_ping = now;
            // A unidirectional client cannot answer: its pings only keep the stream alive.
            st.awaiting_pong = !st.wire.is_uni();
            let was_empty = st.outbox.is_empty();
            let ping: &'static [u8] = if st.wire == Wire::Protobuf {
                &PING_FRAME_PROTOBUF
            } else {
                &PING_FRAME
            };
            let wire = st.wire;
            let max = ctx.cfg.limits.max_outbox_bytes;
            if queue_frame(&mut st.outbox, wire, Bytes::from_static(ping), max) == Push::Overflow {
                bump(&ctx.counters.slow_disconnects);
                queue_close_as(&mut st, Reason::Slow);
            } else if !was_empty {
                self.arm(ctx, &mut st);
                return;
            }
        }
        self.arm(ctx, &mut st);
        drop(st);
        self.wake(ctx);
    }

    /// Arms the wheel for the next thing due.
    fn arm(&self, ctx: &ConnCtx, st: &mut ConnState) {
        let ping = &ctx.cfg.ping;
        let mut due = match st.phase {
            Phase::Open => {
                if !st.session.is_connected() {
                    st.last_ping + ctx.cfg.limits.handshake_timeout_secs
                } else if st.awaiting_pong {
                    st.last_ping + ping.pong_timeout_secs
                } else {
                    st.last_ping + ping.interval_secs
                }
            }
            _ => ctx.io.tick_now() + CLOSE_TIMEOUT_SECS,
        };
        if st.expires_at != 0 {
            due = due.min(st.expires_at);
        }
        if st.sub_expires_at != 0 {
            due = due.min(st.sub_expires_at);
        }
        st.armed = ctx.io.arm(self.key, due);
    }

    /// Ends the subscriptions whose deadline passed and queues their unsubscribe pushes.
    fn expire_subscriptions(&self, ctx: &ConnCtx, st: &mut ConnState) {
        let mut f = FrameBuf::with_capacity(96);
        let (session, expiry) = st.session_and_expiry();
        if ctx
            .sessions
            .expire_subscriptions(self.key, session, expiry, f.payload())
            > 0
        {
            queue_output(ctx, st, f);
        }
    }

    /// Arms the first deadline (the handshake timeout) of a fresh connection.
    pub fn arm_first(&self, ctx: &ConnCtx) {
        let mut st = self.state.borrow_mut();
        self.arm(ctx, &mut st);
    }

    /// What to submit for this connection now, called when it was dirty: every queued frame
    /// in one send (unless a send is in flight: its completion brings the next one), or the
    /// half-close once the close frame is out. `Err` when the connection must end now.
    pub fn next_write(&self, ctx: &ConnCtx) -> Result<Write, Reason> {
        let mut st = self.state.borrow_mut();
        st.dirty = false;
        if st.phase == Phase::Abort {
            return Err(st.end.unwrap_or(Reason::SocketError));
        }
        if st.sending {
            return Ok(Write::Nothing);
        }
        if !st.outbox.is_empty() {
            // One frame goes as it is (shared, no copy); several are copied into one buffer
            // of their own (a send in flight owns its bytes), at most CORK_BYTES.
            let bytes = match st.outbox.single() {
                Some(frame) => frame.clone(),
                None => {
                    let mut buf = Vec::with_capacity(st.outbox.len_bytes().min(CORK_BYTES));
                    st.outbox.fill(&mut buf, CORK_BYTES);
                    Bytes::from(buf)
                }
            };
            st.outbox.consume(bytes.len());
            st.sending = true;
            return Ok(Write::Send(bytes));
        }
        if st.phase == Phase::Closing {
            // Close frame written: half-close and wait (bounded) for the peer's EOF.
            st.phase = Phase::Closed;
            self.arm(ctx, &mut st);
            return Ok(Write::Shutdown);
        }
        Ok(Write::Nothing)
    }

    /// A send of `bytes` completed with `result` (bytes written or a negated errno). Returns
    /// the rest to send at once after a partial write; otherwise the connection is marked
    /// dirty again if frames were queued meanwhile (they go together in the next send). `Err`
    /// when the socket failed.
    pub fn sent(&self, ctx: &ConnCtx, result: i32, bytes: Bytes) -> Result<Option<Bytes>, Reason> {
        if result < 0 {
            return match -result {
                libc::EAGAIN | libc::EINTR => Ok(Some(bytes)),
                _ => Err(Reason::SocketError),
            };
        }
        let n = (result as usize).min(bytes.len());
        let c = ctx.counters;
        c.bytes_out.set(c.bytes_out.get() + n as u64);
        bump(&c.writes);
        if n < bytes.len() {
            bump(&c.partial_writes);
            return Ok(Some(bytes.slice(n..)));
        }
        let mut st = self.state.borrow_mut();
        st.sending = false;
        let more = !st.outbox.is_empty() || st.phase == Phase::Closing;
        drop(st);
        if more {
            self.wake(ctx);
        }
        Ok(None)
    }

    /// The end of the connection's life on its shard: the session leaves everything, queued
    /// frames are dropped. Returns the reason it ended: the one recorded when it began to
    /// close, else `event` (what cut the socket).
    pub fn finish(&self, ctx: &ConnCtx, event: Reason) -> Reason {
        let mut st = self.state.borrow_mut();
        let st = &mut *st;
        ctx.sessions.end_session(self.key, &mut st.session);
        st.outbox.clear();
        st.partial = None;
        st.phase = Phase::Abort;
        *st.end.get_or_insert(event)
    }

    /// Decodes and answers bytes read from the client.
    pub fn process(&self, ctx: &ConnCtx, input: &mut [u8]) {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        if st.phase != Phase::Open || st.wire.is_http_stream() {
            // Closing: the rest of the input is discarded. A stream's client has said
            // everything in its request (commands come by `/emulation`): ignored.
            return;
        }
        let max_outbox = ctx.cfg.limits.max_outbox_bytes;
        let counters = ctx.counters;
        let mut partial = st.partial.take();
        let mut close: Option<(Reason, u16, &'static str)> = None;
        let mut overflow = false;
        let expires_before = (st.expires_at, st.sub_expires_at);
        let connected_before = st.session.is_connected();
        let wire = st.wire;
        let echo = wire == Wire::Echo;
        let mut commands = String::new();
        let mut uni_connect: Option<Vec<u8>> = None;
        let ConnState {
            session,
            outbox,
            awaiting_pong,
            expires_at,
            sub_expires_at,
            bucket,
            ..
        } = st;
        let result = ctx
            .io
            .decoder()
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
                Event::Message { payload, .. } if wire == Wire::UniWebsocket => {
                    // The first message is the connect request; the rest are ignored, as in
                    // Centrifugo.
                    if !session.is_connected() && uni_connect.is_none() {
                        uni_connect = Some(payload.to_vec());
                    }
                    Flow::Continue
                }
                Event::Message { payload, text } => {
                    bump(&counters.messages_in);
                    *awaiting_pong = false;
                    let bad_request = Some((
                        Reason::Session(Disconnect::BadRequest),
                        Disconnect::BadRequest.code(),
                        Disconnect::BadRequest.reason(),
                    ));
                    let text = if wire == Wire::Protobuf {
                        // Binary frames of varint-delimited commands only; a text frame or a
                        // malformed one ends this connection with 3501, as in Centrifugo.
                        commands.clear();
                        if text || protobuf::commands_to_json(payload, &mut commands).is_err() {
                            bump(&counters.protobuf_malformed);
                            close = bad_request;
                            return Flow::Stop;
                        }
                        commands.as_str()
                    } else {
                        let Ok(text) = std::str::from_utf8(payload) else {
                            close = bad_request;
                            return Flow::Stop;
                        };
                        text
                    };
                    let mut frame = FrameBuf::with_capacity(96);
                    let outcome = ctx.sessions.handle_message(
                        self.key,
                        session,
                        Expiry {
                            conn: &mut *expires_at,
                            subs: &mut *sub_expires_at,
                            wire,
                        },
                        bucket,
                        text,
                        frame.payload(),
                    );
                    if frame.payload_len() > 0 {
                        match frame_output(wire, frame) {
                            Ok(frame) => {
                                if queue_frame(outbox, wire, frame, max_outbox) == Push::Overflow {
                                    overflow = true;
                                    return Flow::Stop;
                                }
                            }
                            Err(why) => {
                                let d = Disconnect::ServerError;
                                close = Some((why, d.code(), d.reason()));
                                return Flow::Stop;
                            }
                        }
                    }
                    match outcome {
                        Ok(()) => Flow::Continue,
                        Err(d) => {
                            close = Some((Reason::Session(d), d.code(), d.reason()));
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
                    let code = c.map(|(code, _)| code).unwrap_or(ws::close::NORMAL);
                    close = Some((Reason::PeerCloseFrame, code, ""));
                    Flow::Stop
                }
            });
        st.partial = partial;
        if let Some(request) = uni_connect.filter(|_| result.is_ok() && close.is_none()) {
            match uni_connect_command(&request) {
                Some(cmd) => self.run_text(ctx, st, &cmd),
                None => close = Some(bad_request_close()),
            }
        }
        match result {
            Err(v) => {
                bump(&ctx.counters.protocol_violations);
                queue_close(st, Reason::Protocol, v.code, v.reason);
            }
            Ok(_) if overflow => {
                bump(&ctx.counters.slow_disconnects);
                queue_close_as(st, Reason::Slow);
            }
            Ok(_) => {
                if let Some((why, code, text)) = close {
                    queue_close(st, why, code, text);
                    st.partial = None;
                }
            }
        }
        self.settle(ctx, st, connected_before, expires_before);
    }

    /// Runs `text` (JSON command lines) through the session exactly as a WebSocket text
    /// message: the connect of a stream transport (from its request), and, for emulation, the
    /// commands that arrive by `POST /emulation`. Replies go out on the connection.
    pub fn command_text(&self, ctx: &ConnCtx, text: &str) {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        if st.phase != Phase::Open {
            return;
        }
        let expires_before = (st.expires_at, st.sub_expires_at);
        let connected_before = st.session.is_connected();
        self.run_text(ctx, st, text);
        self.settle(ctx, st, connected_before, expires_before);
    }

    /// The session runs `text`; its output is queued, a disconnect it asks for is queued.
    fn run_text(&self, ctx: &ConnCtx, st: &mut ConnState, text: &str) {
        bump(&ctx.counters.messages_in);
        st.awaiting_pong = false;
        let mut frame = FrameBuf::with_capacity(96);
        let outcome = {
            let ConnState {
                session,
                expires_at,
                sub_expires_at,
                bucket,
                wire,
                ..
            } = &mut *st;
            let expiry = Expiry {
                conn: expires_at,
                subs: sub_expires_at,
                wire: *wire,
            };
            ctx.sessions
                .handle_message(self.key, session, expiry, bucket, text, frame.payload())
        };
        if queue_output(ctx, st, frame) {
            if let Err(d) = outcome {
                queue_close(st, Reason::Session(d), d.code(), d.reason());
            }
        }
    }

    /// A backend call of this connection ended: its session finishes what waited (replies,
    /// or the close the backend asked for).
    pub fn resume(
        &self,
        ctx: &ConnCtx,
        waiting: crate::conn::session::Awaiting,
        answer: Option<&[u8]>,
    ) {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        if st.phase != Phase::Open {
            return;
        }
        let expires_before = (st.expires_at, st.sub_expires_at);
        let connected_before = st.session.is_connected();
        let mut frame = FrameBuf::with_capacity(128);
        let outcome = {
            let (session, expiry) = st.session_and_expiry();
            ctx.sessions
                .proxied(self.key, session, expiry, waiting, answer, frame.payload())
        };
        if queue_output(ctx, st, frame) {
            match outcome {
                Ok(()) => {}
                Err(Ended::Protocol(d)) => {
                    queue_close(st, Reason::Session(d), d.code(), d.reason())
                }
                Err(Ended::Backend { code, reason }) => {
                    queue_close(st, Reason::Backend, code, &reason)
                }
            }
        }
        self.settle(ctx, st, connected_before, expires_before);
    }

    /// Commands POSTed to `/emulation` for this connection (bidirectional emulation over
    /// HTTP-streaming or SSE): run through the session exactly as a WebSocket text message
    /// ([`Connection::command_text`]: rate limit, replies on its stream, a pong `{}` clears
    /// the pending ping); an error ends the connection as it would a WebSocket one.
    pub fn emulated(&self, ctx: &ConnCtx, data: &str) {
        self.command_text(ctx, data);
    }

    /// A server API command for this connection (`/api/subscribe`, `/api/refresh`): the
    /// session applies it and its pushes are queued like replies.
    pub fn server_command(&self, ctx: &ConnCtx, cmd: crate::conn::server_side::ServerCommand<'_>) {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        if st.phase != Phase::Open || st.wire == Wire::Echo {
            return;
        }
        let expires_before = (st.expires_at, st.sub_expires_at);
        let connected_before = st.session.is_connected();
        let mut frame = FrameBuf::with_capacity(128);
        let outcome = {
            let (session, expiry) = st.session_and_expiry();
            ctx.sessions
                .server_command(self.key, session, expiry, cmd, frame.payload())
        };
        if queue_output(ctx, st, frame) {
            if let Err(d) = outcome {
                queue_close(st, Reason::Session(d), d.code(), d.reason());
            }
        }
        self.settle(ctx, st, connected_before, expires_before);
    }

    /// After the session ran: pings count from a new connect, the timer follows changed
    /// deadlines, and queued frames go out with this batch's flush.
    fn settle(
        &self,
        ctx: &ConnCtx,
        st: &mut ConnState,
        connected_before: bool,
        expires_before: (u32, u32),
    ) {
        let just_connected = !connected_before && st.session.is_connected();
        if just_connected {
            // Pings are counted from the connect; the pre-connect deadline no longer applies.
            // The first ping comes up to a fifth of the interval early, at random, so that
            // connections made in the same second (a reconnect wave) do not ping in the same
            // tick forever.
            let spread = ctx.cfg.ping.interval_secs / 5;
            let early = if spread > 0 {
                fastrand::u32(0..=spread)
            } else {
                0
            };
            st.last_ping = ctx.io.tick_now().saturating_sub(early);
        }
        let expires_now = (st.expires_at, st.sub_expires_at);
        if just_connected || expires_now != expires_before || st.phase != Phase::Open {
            self.arm(ctx, st);
        }
        if !st.outbox.is_empty() && !st.dirty {
            // Replies go out with the flush that ends this batch of completions.
            st.dirty = true;
            ctx.io.mark_dirty(self.key);
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(fd) = self.take_fd() {
            // Never torn down (a shard stopping, a test): close it here.
            // SAFETY: the descriptor is ours and was not handed to the ring.
            drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        }
    }
}

/// What the shard submits for a connection after [`Connection::next_write`].
#[derive(Debug)]
pub enum Write {
    Nothing,
    /// Send these bytes (the ring keeps them until the send completes).
    Send(Bytes),
    /// The close frame is out: shut the sending side down.
    Shutdown,
}

/// Queues the close frame of a reason with a fixed code.
fn queue_close_as(st: &mut ConnState, why: Reason) {
    let (code, text) = why.close_frame().unwrap_or((
        Disconnect::ServerError.code(),
        Disconnect::ServerError.reason(),
    ));
    queue_close(st, why, code, text);
}

fn queue_close(st: &mut ConnState, why: Reason, code: u16, text: &str) {
    if code == Disconnect::Slow.code() {
        st.outbox.drop_unstarted();
    }
    if st.wire.reframed() && why != Reason::PeerCloseFrame {
        // Streams end with the disconnect push (their only way to say why); a uni
        // WebSocket sends it before its close frame, as Centrifugo does.
        let wire = st.wire;
        queue_frame(
            &mut st.outbox,
            wire,
            disconnect_push(code, text),
            usize::MAX,
        );
    }
    if !st.wire.is_http_stream() {
        st.outbox.push_unbounded(ws::close_frame(code, text));
    }
    st.phase = Phase::Closing;
    st.end.get_or_insert(why);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(wire: Wire, frame: Bytes) -> (Outbox, Push) {
        let mut o = Outbox::default();
        let r = queue_frame(&mut o, wire, frame, 1 << 20);
        (o, r)
    }

    fn bytes_of(o: &Outbox) -> String {
        let mut v = Vec::new();
        o.fill(&mut v, usize::MAX);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn stream_wires_frame_each_line_and_share_the_publication_bytes() {
        let json = br#"{"push":{"channel":"c","pub":{"data":1}}}"#;
        let frame = ws::text_frame(json);
        let payload_at = frame.as_ptr() as usize + 2;
        let (o, _) = queued(Wire::Sse, frame.clone());
        assert_eq!(
            bytes_of(&o),
            format!("data: {}\n\n", std::str::from_utf8(json).unwrap())
        );
        let (o, _) = queued(Wire::HttpStream, frame.clone());
        assert_eq!(
            bytes_of(&o),
            format!("{}\n", std::str::from_utf8(json).unwrap())
        );
        let (o, _) = queued(Wire::UniHttpStream, frame.clone());
        assert_eq!(bytes_of(&o), "{\"channel\":\"c\",\"pub\":{\"data\":1}}\n");
        let (o, _) = queued(Wire::UniSse, frame.clone());
        assert_eq!(
            bytes_of(&o),
            "data: {\"channel\":\"c\",\"pub\":{\"data\":1}}\n\n"
        );
        let (mut o, _) = queued(Wire::UniWebsocket, frame.clone());
        let inner = r#"{"channel":"c","pub":{"data":1}}"#;
        let mut want = vec![0x81, inner.len() as u8];
        want.extend_from_slice(inner.as_bytes());
        let mut got = Vec::new();
        o.fill(&mut got, usize::MAX);
        assert_eq!(got, want);
        // The JSON is a slice of the shared frame, not a copy: the second piece points into it.
        assert!(o.single().is_none());
        o.consume(2);
        let piece = o.single().expect("the slice").clone();
        assert_eq!(
            piece.as_ptr() as usize,
            payload_at + 8,
            "same bytes as the frame"
        );
        // WebSocket wires take the frame itself.
        let (o, _) = queued(Wire::Json, frame.clone());
        assert_eq!(o.single().unwrap().as_ptr(), frame.as_ptr());
    }

    #[test]
    fn several_lines_and_replies_in_one_frame() {
        let f = ws::text_frame(
            br#"{"id":1,"connect":{"client":"x","ping":25,"pong":true}}
{"push":{"channel":"c","pub":{}}}
{"id":2,"error":{"code":1,"message":"m"}}
{}"#,
        );
        let (o, _) = queued(Wire::HttpStream, f.clone());
        assert_eq!(bytes_of(&o).lines().count(), 4);
        let (o, _) = queued(Wire::UniHttpStream, f);
        assert_eq!(
            bytes_of(&o),
            "{\"connect\":{\"client\":\"x\",\"ping\":25}}\n{\"channel\":\"c\",\"pub\":{}}\n{}\n",
            "the connect push without pong; other replies dropped; the ping kept"
        );
    }

    #[test]
    fn a_frame_over_the_bound_queues_nothing() {
        let mut o = Outbox::default();
        let f = ws::text_frame(&[b'x'; 100]);
        assert_eq!(
            queue_frame(&mut o, Wire::Sse, f.clone(), 100),
            Push::Overflow
        );
        assert!(o.is_empty());
        assert_eq!(queue_frame(&mut o, Wire::Sse, f, 108), Push::Queued);
        assert_eq!(o.len_bytes(), 108);
    }

    #[test]
    fn long_payload_headers_are_read() {
        let big = vec![b'a'; 70_000];
        let f = ws::text_frame(&big);
        assert_eq!(text_payload(&f).unwrap().len(), 70_000);
        let mid = vec![b'a'; 300];
        assert_eq!(text_payload(&ws::text_frame(&mid)).unwrap().len(), 300);
        assert!(text_payload(&ws::close_frame(1000, "")).is_none());
        assert_eq!(frame_head(300).1, 4);
        assert_eq!(frame_head(70_000).1, 10);
    }

    #[test]
    fn uni_connect_errors_become_centrifugos_disconnects() {
        let e = |c: u32| {
            uni_connect_error(
                format!(r#"{{"id":1,"error":{{"code":{c},"message":"m"}}}}"#).as_bytes(),
            )
        };
        assert_eq!(e(109), Some(Disconnect::Expired));
        assert_eq!(e(111), Some(Disconnect::TooManyRequests));
        assert_eq!(e(103), Some(Disconnect::PermissionDenied));
        assert_eq!(e(100), Some(Disconnect::ServerError));
        assert_eq!(uni_connect_error(br#"{"id":1,"connect":{}}"#), None);
        assert_eq!(
            uni_connect_command(b" {\"token\":\n\"t\"} ").as_deref(),
            Some(r#"{"id":1,"connect":{"token":"t"}}"#)
        );
        assert_eq!(
            uni_connect_command(b"").as_deref(),
            Some(r#"{"id":1,"connect":{}}"#)
        );
        assert_eq!(uni_connect_command(b"[]"), None);
    }

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
    use super::stream_heap_tests::{idle_heap_bytes, open_ws};
    use super::*;

    /// Heap bytes one idle, connected, subscribed WebSocket connection holds on its shard thread
    /// (counted by the test allocator: exact, no allocator overhead, no kernel). The density
    /// bench measures the same thing as RSS.
    #[test]
    fn idle_subscribed_connection_heap_bytes() {
        let result = idle_heap_bytes(open_ws);
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
mod stream_heap_tests {
    use super::*;
    use crate::config::Config;
    use crate::shard::{NodeInfo, Shard};
    use std::io::{Read, Write};
    use std::sync::Arc;

    /// Heap bytes (and allocator blocks) per idle, connected, subscribed connection opened by
    /// `open` (a client thread's request; it returns the socket once the subscribe reply came),
    /// measured over 199 connections after a first one warmed the executor up.
    pub(super) fn idle_heap_bytes(
        open: fn(std::net::SocketAddr, usize) -> std::net::TcpStream,
    ) -> (isize, f64) {
        const N: usize = 200;
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let mut cfg = Config {
                    insecure: true,
                    ..Config::default()
                };
                cfg.transports.sse = true;
                let node = Arc::new(NodeInfo::new("t".into(), "t".into(), "t".into(), 1));
                let (tx, _rx) = crate::bus::broker_queue(1 << 16, false).unwrap();
                let shard = Shard::new(0, Arc::new(cfg), node, tx);
                crate::shard::spawn_io(&shard);
                let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
                let client = std::thread::spawn(move || {
                    let socks: Vec<_> = (0..N).map(|i| open(addr, i)).collect();
                    done_rx.recv().unwrap();
                    drop(socks);
                });
                let mut before = (0, 0);
                for i in 0..N {
                    let stream = listener.accept().await.unwrap();
                    glommio::spawn_local(crate::shard::front_door::serve(shard.clone(), stream))
                        .detach();
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
                (
                    (after.0 - before.0) / n,
                    (after.1 - before.1) as f64 / n as f64,
                )
            })
            .unwrap()
            .join()
            .unwrap()
    }

    fn read_until(s: &mut std::net::TcpStream, needle: &str) {
        let mut got = Vec::new();
        let mut b = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains(needle) {
            let n = s.read(&mut b).unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&b[..n]);
        }
    }

    pub(super) fn open_ws(addr: std::net::SocketAddr, i: usize) -> std::net::TcpStream {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /connection/websocket HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
        let cmd = format!(
            "{{\"id\":1,\"connect\":{{}}}}\n{{\"id\":2,\"subscribe\":{{\"channel\":\"c{}\"}}}}",
            i % 10
        );
        s.write_all(&ws::client_frame(1, true, cmd.as_bytes(), [1, 2, 3, 4]))
            .unwrap();
        read_until(&mut s, "\"id\":2");
        s
    }

    fn open_sse(addr: std::net::SocketAddr, i: usize) -> std::net::TcpStream {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        // {"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"cN"}}, form-encoded.
        let q = format!("%7B%22id%22%3A1%2C%22connect%22%3A%7B%7D%7D%0A%7B%22id%22%3A2%2C%22subscribe%22%3A%7B%22channel%22%3A%22c{}%22%7D%7D", i % 10);
        s.write_all(
            format!("GET /connection/sse?cf_connect={q} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
        )
        .unwrap();
        read_until(&mut s, "\"id\":2");
        s
    }

    /// An idle SSE connection costs no more heap than an idle WebSocket one: the same
    /// `Connection` in the same table, framed only when something is sent.
    #[test]
    fn idle_stream_connection_heap_bytes_match_a_websocket_ones() {
        let ws = idle_heap_bytes(open_ws).0;
        let sse = idle_heap_bytes(open_sse).0;
        eprintln!("idle subscribed connection: WebSocket {ws} heap bytes, SSE {sse} heap bytes");
        assert!(
            sse <= ws,
            "an SSE connection holds {sse} heap bytes, a WebSocket one {ws}"
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
