//! The front door of every accepted TCP connection: one HTTP/1.1 request head decides whether it
//! becomes a WebSocket (`GET /connection/websocket`), an API call (`POST /api/...`, keep-alive)
//! or a health check (`GET /healthz`). Everything else gets a proper 4xx, never a hang: the head
//! is bounded in bytes and in time.
//!
//! The request head lives in a transient buffer freed before the WebSocket phase starts.

pub mod api;

use crate::shard::{connection, Shard};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

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
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
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

/// Serves one accepted connection until it is upgraded, closed or times out.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream) {
    let limits = &shard.cfg.limits;
    let deadline = Duration::from_secs(limits.handshake_timeout_secs as u64);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Read one request head within the handshake timeout.
        // Bytes of `buf` actually received: a read cut by the timeout leaves `buf` grown.
        let mut received = buf.len();
        let head = match glommio::timer::timeout(deadline, async {
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
                    let _ = stream.write_all(&plain(408, "request timeout\n")).await;
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
                let keep = head.keep_alive();
                let Some(resp) = Box::pin(api::serve(&shard, &mut stream, &head, &mut buf)).await
                else {
                    return;
                };
                if stream.write_all(&resp).await.is_err() || !keep {
                    return;
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
