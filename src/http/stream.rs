//! The HTTP side of the stream transports (`/connection/sse`, `/connection/http_stream`,
//! `/connection/uni_sse`, `/connection/uni_http_stream`): the request's connect data (the
//! `cf_connect` URL parameter or the body, bounded), the CORS answers of the browser
//! endpoints, and the head of the streamed response. After the head, the socket is a
//! connection like an upgraded WebSocket ([`crate::shard::io::start`]), framed at its edge
//! ([`crate::shard::connection::Wire`]).
//!
//! The response is delimited by the connection's close (HTTP/1.1, no `Content-Length`, no
//! chunked coding: `fetch` readers and `EventSource` both read a close-delimited body as it
//! comes), never cached, and marked `X-Accel-Buffering: no` so nginx passes each event on at
//! once. Nothing here knows the shard; shard thread, in the front door's task.

use super::body::{self, BodyError, Framing};
use super::{Head, ReadError};
use crate::pattern::origin;
use glommio::net::TcpStream;
use std::time::Instant;

/// The URL parameter holding the connect command (SSE, uni SSE), as in Centrifugo.
pub const CONNECT_PARAM: &str = "cf_connect";

/// The value of query parameter `name` in a request target, form-decoded (`+` is a space,
/// `%XX` a byte); `None` when absent or not UTF-8 once decoded.
pub fn query_param(target: &str, name: &str) -> Option<String> {
    let query = target.split_once('?')?.1;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == name {
            let v = v.replace('+', " ");
            return percent_encoding::percent_decode_str(&v)
                .decode_utf8()
                .ok()
                .map(|s| s.into_owned());
        }
    }
    None
}

/// What the CORS check says about a request to a browser endpoint.
#[derive(Debug, PartialEq, Eq)]
pub enum Cors {
    /// No `Origin`: not a cross-origin browser request; no CORS headers.
    NoOrigin,
    /// An allowed origin, echoed in `Access-Control-Allow-Origin`.
    Allowed(String),
    /// An origin neither the request's own host nor in `allowed_origins`: 403.
    Refused,
}

/// Checks a request's `Origin` with the same patterns as the WebSocket upgrade
/// (`allowed_origins`; the node's own host always passes).
pub fn cors(head: &Head, allowed_origins: &[String]) -> Cors {
    match head.header_str("origin").filter(|o| !o.is_empty()) {
        None => Cors::NoOrigin,
        Some(o) if origin::allowed(o, head.header_str("host"), allowed_origins) => {
            Cors::Allowed(o.to_string())
        }
        Some(_) => Cors::Refused,
    }
}

/// The CORS response headers for an allowed origin (none without one).
pub fn cors_headers(cors: &Cors) -> String {
    match cors {
        Cors::Allowed(o) => format!(
            "Access-Control-Allow-Origin: {o}\r\nAccess-Control-Allow-Credentials: true\r\nVary: Origin\r\n"
        ),
        _ => String::new(),
    }
}

/// The answer to a preflight `OPTIONS` (204): the methods, the request headers asked for
/// (`Content-Type` at least: the SDK posts JSON) and a 300 s cache, as Centrifugo answers.
pub fn preflight(head: &Head, cors: &Cors) -> Vec<u8> {
    let asked = head
        .header_str("access-control-request-headers")
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_, ".contains(&b))
        })
        .unwrap_or("Content-Type");
    format!(
        "HTTP/1.1 204 No Content\r\n{}Access-Control-Allow-Methods: GET, POST, OPTIONS\r\nAccess-Control-Allow-Headers: {asked}\r\nAccess-Control-Max-Age: 300\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        cors_headers(cors)
    )
    .into_bytes()
}

/// The head of a streamed response: 200, close-delimited, uncached, unbuffered by proxies.
pub fn stream_head(sse: bool, cors: &Cors) -> Vec<u8> {
    let content_type = if sse {
        "text/event-stream; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nCache-Control: private, no-cache, no-store, must-revalidate, max-age=0\r\nPragma: no-cache\r\nExpires: 0\r\nX-Accel-Buffering: no\r\nConnection: close\r\n{}\r\n",
        cors_headers(cors)
    )
    .into_bytes()
}

/// Reads a request body whole (`Content-Length` or chunked), at most `max` bytes, before
/// `deadline`. `Err` with the status and reason to answer (`None` status: the client went away
/// or the deadline passed; the caller answers 408 for a timeout).
pub async fn read_body(
    stream: &mut TcpStream,
    head: &Head,
    buf: &mut Vec<u8>,
    max: usize,
    deadline: Instant,
) -> Result<Vec<u8>, BodyFailure> {
    let framing = body::framing(head).map_err(|(s, r)| BodyFailure::Status(s, r))?;
    let result = match framing {
        Framing::Length(len) if len > max => {
            return Err(BodyFailure::Status(413, "request body too large\n"))
        }
        Framing::Length(len) => body::read_length(stream, buf, len, deadline).await,
        Framing::Chunked => body::read_chunked(stream, buf, max, 1024, deadline).await,
    };
    result.map_err(|e| match e {
        BodyError::Closed => BodyFailure::Gone(ReadError::Closed),
        BodyError::Timeout => BodyFailure::Gone(ReadError::Timeout),
        BodyError::TooBig => BodyFailure::Status(413, "request body too large\n"),
        BodyError::Malformed => BodyFailure::Status(400, "malformed chunked body\n"),
    })
}

/// Why a body was not read.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyFailure {
    /// Answer with this status and reason.
    Status(u16, &'static str),
    /// The client closed, or the deadline passed.
    Gone(ReadError),
}

/// Checks a bidirectional stream's connect data: UTF-8, and every non-empty line a JSON
/// object (the session answers what is inside). The reason for a 400 otherwise.
pub fn check_commands(data: &[u8]) -> Result<&str, &'static str> {
    let text = std::str::from_utf8(data).map_err(|_| "connect command is not UTF-8\n")?;
    let mut any = false;
    for line in text.split('\n').filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(_)) => any = true,
            _ => return Err("connect command is not a JSON object\n"),
        }
    }
    if !any {
        return Err("no connect command\n");
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cf_connect_is_form_decoded() {
        let t = "/connection/sse?x=1&cf_connect=%7B%22id%22%3A1%2C%22connect%22%3A%7B%22data%22%3A%22a+b%22%7D%7D";
        assert_eq!(
            query_param(t, CONNECT_PARAM).unwrap(),
            r#"{"id":1,"connect":{"data":"a b"}}"#
        );
        assert_eq!(query_param("/x", CONNECT_PARAM), None);
        assert_eq!(query_param("/x?cf=1", CONNECT_PARAM), None);
    }

    #[test]
    fn connect_commands_are_checked() {
        assert!(check_commands(br#"{"id":1,"connect":{}}"#).is_ok());
        assert!(check_commands(b"").is_err());
        assert!(check_commands(b"[1]").is_err());
        assert!(check_commands(b"{nope").is_err());
        assert!(check_commands(&[0xff]).is_err());
    }
}
