//! HTTP/1.1 on the public port, as plain pieces the shard's front door
//! ([`crate::shard::front_door`]) puts together: request heads ([`parse_head`], bounded in bytes
//! and read before a deadline), responses, the WebSocket handshake check ([`handshake`]: the
//! 101 or the status that refuses it), the origin check ([`crate::pattern::origin`]) and the server API
//! ([`api`], over the small [`api::ApiContext`] the shard implements).
//!
//! Nothing here knows the shard: `http` sits beneath it. Every read is bounded in bytes and by a
//! deadline; a refused request gets a proper 4xx, never a hang.

pub mod api;
pub mod body;
pub mod emulation;
pub mod handshake;
pub mod stream;

use futures_lite::AsyncReadExt;
use glommio::net::TcpStream;
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

    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn keep_alive(&self) -> bool {
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

pub fn plain(status: u16, body: &str) -> Vec<u8> {
    response(status, "text/plain; charset=utf-8", body.as_bytes(), false)
}

/// The 408 answer to a request cut by its deadline (the caller counts it as
/// `request_timeouts`).
pub fn request_timeout() -> Vec<u8> {
    plain(408, "request timeout\n")
}

/// Time left until `deadline` (zero once past).
pub fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Why a read before a deadline got nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// End of stream or a socket error.
    Closed,
    /// The deadline passed first.
    Timeout,
}

/// One read appending at most `max` bytes to `buf`, before `deadline`.
pub async fn read_within(
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
pub async fn discard_then_close(stream: &mut TcpStream, linger: Duration, max_bytes: usize) {
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
pub const MAX_LINGER: Duration = Duration::from_secs(2);

/// Reads until `buf` holds a complete head. `Err(status)` for a refused head.
pub async fn read_head(
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
