//! The front door of every accepted TCP connection: one HTTP/1.1 request head decides whether it
//! becomes a WebSocket (`GET /connection/websocket`), an API call (`POST /api/...`, keep-alive)
//! or a health check (`GET /healthz`). Everything else gets a proper 4xx, never a hang: the head
//! is bounded in bytes, and the whole request (head and, for the API, body) in time: one
//! deadline of `limits.handshake_timeout_secs` from the request's first byte (from the accept
//! for a connection's first request), past which it gets 408 and is closed.
//!
//! An upgrade is refused with 403 before the 101 when its `Origin` is neither the request's own
//! host nor allowed by `allowed_origins` ([`origin`]).
//!
//! The request head lives in a transient buffer freed before the WebSocket phase starts.

pub mod api;
pub mod origin;

use crate::shard::{connection, Shard};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Headers parsed at most; more gets 431.
const MAX_HEADERS: usize = 48;

/// A parsed request head, owned (the buffer is reused for the body).
#[derive(Debug)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub version: u8,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Bytes of the head, including the blank line.
    pub len: usize,
}

impl Head {
    /// A header's value, case-insensitively.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Every value of a header, in order (case-insensitive name).
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    fn keep_alive(&self) -> bool {
        match self.header_str("connection") {
            Some(v) if v.eq_ignore_ascii_case("close") => false,
            Some(v) if v.eq_ignore_ascii_case("keep-alive") => true,
            _ => self.version >= 1,
        }
    }
}

/// Why a request head is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadError {
    /// Not HTTP/1.x: 400.
    Malformed,
    /// More headers than we parse: 431.
    TooManyHeaders,
}

/// Parses a request head; `Ok(None)` means more bytes are needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(len)) => Ok(Some(Head {
            method: req.method.unwrap_or("").to_string(),
            path: req.path.unwrap_or("").to_string(),
            version: req.version.unwrap_or(1),
            headers: req
                .headers
                .iter()
                .map(|h| (h.name.to_string(), h.value.to_vec()))
                .collect(),
            len,
        })),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooManyHeaders),
        Err(_) => Err(HeadError::Malformed),
    }
}

/// Encodes a complete response with a body.
pub fn response(status: u16, content_type: &str, body: &[u8], keep_alive: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        417 => "Expectation Failed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {}\r\n",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    )
    .into_bytes();
    if status == 503 {
        out.extend_from_slice(b"Retry-After: 5\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn plain(status: u16, body: &str) -> Vec<u8> {
    response(status, "text/plain; charset=utf-8", body.as_bytes(), false)
}

/// The 408 answer to a request cut by its deadline, counted as `request_timeouts`.
pub(crate) fn request_timeout(shard: &Shard) -> Vec<u8> {
    let c = &shard.counters.request_timeouts;
    c.set(c.get() + 1);
    plain(408, "request timeout\n")
}

/// Time left until `deadline` (zero once past).
fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Why a read before a deadline got nothing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReadError {
    /// End of stream or a socket error.
    Closed,
    /// The deadline passed first.
    Timeout,
}

/// One read appending at most `max` bytes to `buf`, before `deadline`.
pub(crate) async fn read_within(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
    deadline: Instant,
) -> Result<usize, ReadError> {
    let filled = buf.len();
    buf.resize(filled + max.max(1), 0);
    let read = glommio::timer::timeout(remaining(deadline), async {
        Ok(stream.read(&mut buf[filled..]).await)
    })
    .await;
    match read {
        Ok(Ok(n)) if n > 0 => {
            buf.truncate(filled + n);
            Ok(n)
        }
        Ok(_) => {
            buf.truncate(filled);
            Err(ReadError::Closed)
        }
        Err(_) => {
            buf.truncate(filled);
            Err(ReadError::Timeout)
        }
    }
}

/// Closes a connection whose request body was left unread: the answer is already written;
/// half-close so the client sees it and EOF at once, then discard what the client still sends
/// (at most `linger` and `max_bytes`) before closing. Closing with unread bytes would make the
/// kernel send a reset, which can destroy the answer before the client reads it.
async fn discard_then_close(stream: &mut TcpStream, linger: Duration, max_bytes: usize) {
    let _ = stream.shutdown(std::net::Shutdown::Write).await;
    let deadline = Instant::now() + linger;
    let mut scratch = Vec::with_capacity(4096);
    let mut discarded = 0;
    while discarded < max_bytes {
        scratch.clear();
        match read_within(stream, &mut scratch, 4096, deadline).await {
            Ok(n) => discarded += n,
            Err(_) => break,
        }
    }
}

/// Longest lingering discard after a refused request (see [`discard_then_close`]).
const MAX_LINGER: Duration = Duration::from_secs(2);

/// Serves one accepted connection until it is upgraded, closed or times out.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream) {
    let limits = &shard.cfg.limits;
    let timeout = Duration::from_secs(limits.handshake_timeout_secs as u64);
    let mut buf: Vec<u8> = Vec::new();
    // The first request's deadline runs from the accept; a later one's from its first byte.
    let mut first_start = Some(Instant::now());
    loop {
        let start = match first_start.take() {
            Some(t) => t,
            None => {
                if buf.is_empty() {
                    // Idle keep-alive: the next request's first bytes within the timeout, or
                    // a silent close (no request was started).
                    let idle_until = Instant::now() + timeout;
                    if read_within(&mut stream, &mut buf, 2048, idle_until)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Instant::now()
            }
        };
        let deadline = start + timeout;
        // Read one request head before the deadline.
        // Bytes of `buf` actually received: a read cut by the timeout leaves `buf` grown.
        let mut received = buf.len();
        let head = match glommio::timer::timeout(remaining(deadline), async {
            Ok(read_head(
                &mut stream,
                &mut buf,
                &mut received,
                limits.max_request_head_bytes,
            )
            .await)
        })
        .await
        {
            Ok(r) => r,
            Err(_) => {
                // Idle (nothing of a request yet): just close. A partial head: 408.
                if received > 0 {
                    let _ = stream.write_all(&request_timeout(&shard)).await;
                }
                return;
            }
        };
        let head = match head {
            Ok(Some(h)) => h,
            Ok(None) => return, // clean EOF between requests
            Err(status) => {
                let _ = stream.write_all(&plain(status, "bad request head\n")).await;
                return;
            }
        };
        shard
            .counters
            .http_requests
            .set(shard.counters.http_requests.get() + 1);
        let path = head.path.split('?').next().unwrap_or("").to_string();
        match (head.method.as_str(), path.as_str()) {
            (_, p)
                if p == "/connection/websocket"
                    || (!shard.cfg.conformance_echo_path.is_empty()
                        && p == shard.cfg.conformance_echo_path) =>
            {
                let echo = p != "/connection/websocket";
                let early = buf.split_off(head.len);
                drop(buf);
                if let Some(stream) = upgrade(&shard, stream, &head).await {
                    // The WebSocket phase leaves glommio's socket type (and this task): the
                    // shard services the socket on readiness from its epoll set, so an idle
                    // connection holds no task, no future and no armed glommio source.
                    // SAFETY: dup(2) of a socket we own; the copy is handed to the shard.
                    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
                    drop(stream);
                    if fd < 0 {
                        shard.node.connections.fetch_sub(1, Ordering::Relaxed);
                        return;
                    }
                    connection::start(&shard, fd, early, echo);
                }
                return;
            }
            ("GET" | "HEAD", "/healthz") => {
                let draining = shard.node.draining.load(Ordering::Relaxed);
                let (status, body) = if draining {
                    (503, "draining\n")
                } else {
                    (200, "ok\n")
                };
                let keep = head.keep_alive();
                let resp = response(status, "text/plain", body.as_bytes(), keep);
                if stream.write_all(&resp).await.is_err() || !keep {
                    return;
                }
                buf.drain(..head.len);
            }
            (_, p) if p.starts_with("/api/") || p == "/api" => {
                let Some(answer) =
                    Box::pin(api::serve(&shard, &mut stream, &head, &mut buf, deadline)).await
                else {
                    return;
                };
                if stream.write_all(&answer.bytes).await.is_err() {
                    return;
                }
                match answer.after {
                    api::After::KeepAlive => {}
                    api::After::Close => return,
                    api::After::DiscardThenClose => {
                        let linger = timeout.min(MAX_LINGER);
                        let max = limits.max_api_body_bytes;
                        Box::pin(discard_then_close(&mut stream, linger, max)).await;
                        return;
                    }
                }
            }
            _ => {
                let _ = stream.write_all(&plain(404, "not found\n")).await;
                return;
            }
        }
    }
}

/// Reads until `buf` holds a complete head. `Err(status)` for a refused head.
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    received: &mut usize,
    max: usize,
) -> Result<Option<Head>, u16> {
    loop {
        if !buf.is_empty() {
            match parse_head(buf) {
                Ok(Some(h)) => return Ok(Some(h)),
                Ok(None) => {}
                Err(HeadError::TooManyHeaders) => return Err(431),
                Err(HeadError::Malformed) => return Err(400),
            }
        }
        if buf.len() >= max {
            return Err(431);
        }
        let filled = buf.len();
        let want = (max - filled).min(2048);
        buf.resize(filled + want, 0);
        match stream.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => {
                buf.truncate(filled);
                return Ok(None);
            }
            Ok(n) => {
                buf.truncate(filled + n);
                *received = buf.len();
            }
        }
    }
}

/// Validates the upgrade with tungstenite's handshake code, applies the connection limit and
/// writes the 101 response. Returns the stream for the WebSocket phase, or `None` after having
/// answered with an error status.
async fn upgrade(shard: &Shard, mut stream: TcpStream, head: &Head) -> Option<TcpStream> {
    let fail = |status: u16, msg: &str| plain(status, msg);
    if head.method != "GET" {
        let _ = stream
            .write_all(&fail(405, "websocket upgrade needs GET\n"))
            .await;
        return None;
    }
    let mut builder = tungstenite::http::Request::builder()
        .method("GET")
        .uri(head.path.as_str())
        .version(tungstenite::http::Version::HTTP_11);
    for (name, value) in &head.headers {
        builder = builder.header(name.as_str(), value.as_slice());
    }
    let request = match builder.body(()) {
        Ok(r) => r,
        Err(_) => {
            let _ = stream.write_all(&fail(400, "bad request headers\n")).await;
            return None;
        }
    };
    let accept = match tungstenite::handshake::server::create_response(&request) {
        Ok(r) => r,
        Err(e) => {
            let status = if head.header("upgrade").is_none() {
                426
            } else {
                400
            };
            let _ = stream.write_all(&fail(status, &format!("{e}\n"))).await;
            return None;
        }
    };
    // Cross-site WebSocket hijacking: a browser page of another site is refused before the 101.
    if let Some(origin) = head.header("origin").filter(|o| !o.is_empty()) {
        let origin = std::str::from_utf8(origin).unwrap_or("");
        if !origin::allowed(origin, head.header_str("host"), &shard.cfg.allowed_origins) {
            let c = &shard.counters.origin_refusals;
            c.set(c.get() + 1);
            tracing::debug!(origin, "upgrade refused: origin not allowed");
            let _ = stream.write_all(&fail(403, "origin not allowed\n")).await;
            return None;
        }
    }
    if shard.node.draining.load(Ordering::Relaxed) {
        let _ = stream.write_all(&fail(503, "node is draining\n")).await;
        return None;
    }
    let max = shard.cfg.limits.max_connections;
    if shard.node.connections.fetch_add(1, Ordering::Relaxed) >= max {
        shard.node.connections.fetch_sub(1, Ordering::Relaxed);
        shard
            .counters
            .refused_full
            .set(shard.counters.refused_full.get() + 1);
        let _ = stream
            .write_all(&fail(503, "connection limit reached\n"))
            .await;
        return None;
    }
    let mut out = Vec::with_capacity(160);
    if tungstenite::handshake::server::write_response(&mut out, &accept).is_err()
        || stream.write_all(&out).await.is_err()
    {
        shard.node.connections.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    Some(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_parsing() {
        assert!(parse_head(
            b"GET / HTTP/1.1
Host: a
"
        )
        .unwrap()
        .is_none());
        let h = parse_head(b"GET /x?y HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(h.path, "/x?y");
        assert_eq!(h.len, 49);
        assert!(!h.keep_alive());
        assert_eq!(
            parse_head(b"\x00\x01 garbage\r\n\r\n").unwrap_err(),
            HeadError::Malformed
        );
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..60 {
            many.extend(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        assert_eq!(parse_head(&many).unwrap_err(), HeadError::TooManyHeaders);
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;
    use crate::config::Config;
    use crate::shard::NodeInfo;
    use std::sync::Arc;

    /// An idle WebSocket connection is a `Connection` in its shard's table: its size is paid per
    /// connection, so it is pinned here (DESIGN §3). The HTTP phase's future lives only until
    /// the upgrade.
    #[test]
    fn per_connection_future_stays_small() {
        let sizes = glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let stream = glommio::net::TcpStream::connect(addr).await.unwrap();
                let cfg = Config {
                    insecure: true,
                    ..Config::default()
                };
                let node = Arc::new(NodeInfo::new("t".into(), "t".into(), "t".into(), 1));
                let (tx, _rx) = crate::bus::broker_queue(1, false).unwrap();
                let shard = Shard::new(0, Arc::new(cfg), node, tx, None);
                let stream_size = std::mem::size_of_val(&stream);
                let ws_size = std::mem::size_of::<connection::Connection>();
                let fut = serve(shard, stream);
                (std::mem::size_of_val(&fut), stream_size, ws_size)
            })
            .unwrap()
            .join()
            .unwrap();
        eprintln!(
            "serve (HTTP phase) future {} bytes, TcpStream {} bytes, WebSocket Connection {} bytes",
            sizes.0, sizes.1, sizes.2
        );
        assert!(
            sizes.2 <= 384,
            "WebSocket phase future grew to {} bytes",
            sizes.2
        );
        assert!(
            sizes.0 <= 2048,
            "HTTP phase future grew to {} bytes",
            sizes.0
        );
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Arbitrary bytes never make the head parser panic, and a parsed head never claims more
        /// bytes than it was given.
        #[test]
        fn head_parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            if let Ok(Some(h)) = parse_head(&data) {
                prop_assert!(h.len <= data.len());
                prop_assert!(h.headers.len() <= MAX_HEADERS);
            }
        }

        /// Near-miss requests (a valid head with bytes flipped) never panic either.
        #[test]
        fn mutated_heads_never_panic(pos in 0usize..120, byte in any::<u8>()) {
            let mut head = b"GET /connection/websocket HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n".to_vec();
            let pos = pos % head.len();
            head[pos] = byte;
            let _ = parse_head(&head);
        }
    }
}
