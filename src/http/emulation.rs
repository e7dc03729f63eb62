//! `POST /emulation`: the client-to-server half of the bidirectional emulation (HTTP-streaming
//! and SSE), compatible with Centrifugo's emulation endpoint and the official SDKs.
//!
//! The SDK opens a stream (`/connection/http_stream` or `/connection/sse`) on some node; the
//! connect reply names the connection's `session` and `node`. Every later command is POSTed
//! here as `{"session":S,"node":N,"data":"<commands, JSON lines>"}`, to whichever node the load
//! balancer picks (no sticky sessions). The request is handed to the broker
//! ([`crate::bus::ToBroker::Emulation`]), which routes it to the owning shard of this node or,
//! in Redis mode, publishes it on the owning node's channel; the owning shard runs the commands
//! through the connection's session as a WebSocket text message, and the replies go out on
//! the stream. As in Centrifugo the POST is answered 204 once the request is handed over
//! (replies never come in the POST's answer); 404 when node `N` is not a live node of the
//! cluster (the SDK closes its transport and reconnects; see `NodeInfo::may_be_live` for the
//! grace after a Redis reconnect); a session gone from a live node is
//! answered 204 too (its stream has ended, and the client reconnects from there).
//!
//! Enabled with either emulation transport (`transports.http_stream`, `transports.sse`);
//! otherwise 404. Bounds: the body (in decoded bytes) at most twice `limits.max_message_bytes` plus 4 KiB
//! (JSON escaping of the commands), the commands at most `limits.max_message_bytes`: 413 past
//! either. The broker queue's bound applies (503 when full). CORS follows `allowed_origins`
//! as the WebSocket upgrade does (a refused `Origin` gets 403).
//!
//! Runs in the front door's task on the shard thread; no borrow across an await.

use super::body::{framing, read_chunked, read_length, BodyError, Framing};
use super::Head;
use crate::bus::{Emulation, NodeInfo, RedisLink};
use crate::config::Config;
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;
use std::time::Instant;

/// The path of the endpoint.
pub const PATH: &str = "/emulation";

/// Seconds a browser may cache a preflight answer (as Centrifugo).
const PREFLIGHT_MAX_AGE_SECS: u32 = 300;

/// What the endpoint needs of its shard.
pub trait EmulationContext {
    fn config(&self) -> &Config;
    fn node(&self) -> &NodeInfo;
    /// Queues the request for the broker without blocking; false when the queue is full.
    fn hand_over(&self, req: Box<Emulation>) -> bool;
    /// Counts a POST: handed over (`true`) or refused.
    fn count(&self, accepted: bool);
}

/// Most body bytes accepted, see the module doc.
pub fn max_body_bytes(cfg: &Config) -> usize {
    cfg.limits.max_message_bytes.saturating_mul(2) + 4096
}

/// A request's `Origin` is neither its host nor in `allowed_origins`: 403.
#[derive(Debug, PartialEq, Eq)]
pub struct OriginRefused;

/// The CORS answer headers for a request: empty without `Origin`; `Err` when the origin is
/// not allowed (403).
pub fn cors(head: &Head, allowed_origins: &[String]) -> Result<String, OriginRefused> {
    let Some(origin) = head.header("origin").filter(|o| !o.is_empty()) else {
        return Ok(String::new());
    };
    let origin = std::str::from_utf8(origin)
        .map_err(|_| OriginRefused)?
        .trim();
    if !crate::pattern::origin::allowed(origin, head.header_str("host"), allowed_origins) {
        return Err(OriginRefused);
    }
    Ok(format!(
        "Access-Control-Allow-Origin: {origin}\r\nAccess-Control-Allow-Credentials: true\r\nVary: Origin\r\n"
    ))
}

/// The request a body stands for, checked against this node's view of the cluster, or the
/// status (and reason) refusing it.
pub fn decide(
    body: &[u8],
    cfg: &Config,
    node: &NodeInfo,
) -> Result<Box<Emulation>, (u16, &'static str)> {
    let req: Box<Emulation> = serde_json::from_slice(body).map_err(|_| {
        (
            400,
            "bad emulation request: expected {\"session\",\"node\",\"data\"} with data a JSON string\n",
        )
    })?;
    if req.session.is_empty() {
        return Err((400, "bad emulation request: no session\n"));
    }
    if req.data.len() > cfg.limits.max_message_bytes {
        return Err((413, "commands larger than limits.max_message_bytes\n"));
    }
    if req.node == node.uid {
        return Ok(req);
    }
    if !cfg.redis_mode() {
        return Err((404, "node not found\n"));
    }
    if node.redis_state.get() != RedisLink::Connected {
        return Err((503, "Redis unavailable\n"));
    }
    if node.may_be_live(&req.node) {
        Ok(req)
    } else {
        Err((404, "node not found\n"))
    }
}

/// An answer with the CORS headers `cors` and a plain-text body (none for 204).
fn answer(status: u16, cors: &str, extra: &str, body: &str, keep: bool) -> Vec<u8> {
    let reason = match status {
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let connection = if keep { "keep-alive" } else { "close" };
    let mut out =
        format!("HTTP/1.1 {status} {reason}\r\n{cors}{extra}Connection: {connection}\r\n");
    if status != 204 {
        out.push_str(&format!(
            "Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    if status == 503 {
        out.push_str("Retry-After: 5\r\n");
    }
    out.push_str("\r\n");
    if status != 204 {
        out.push_str(body);
    }
    out.into_bytes()
}

/// Serves one request to [`PATH`] whose head starts `buf`; on return `buf` holds only what
/// followed the request. Returns whether the connection stays open for another request.
pub async fn serve(
    ctx: &impl EmulationContext,
    stream: &mut TcpStream,
    head: &Head,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> bool {
    buf.drain(..head.len.min(buf.len()));
    let cfg = ctx.config();
    if !(cfg.transports.http_stream || cfg.transports.sse) {
        // No emulation transport is enabled: the endpoint does not exist.
        let _ = stream
            .write_all(&answer(404, "", "", "not found\n", false))
            .await;
        discard(stream, cfg).await;
        return false;
    }
    let max_body = max_body_bytes(cfg);
    // Refusals decided before the body is read close the connection (after a bounded discard
    // of the unread body, so the answer is not destroyed by a reset).
    let refuse_early = |status: u16, cors: &str, body: &str| {
        ctx.count(false);
        answer(status, cors, "", body, false)
    };
    let early = match cors(head, &cfg.allowed_origins) {
        Err(OriginRefused) => Err(refuse_early(403, "", "origin not allowed\n")),
        Ok(cors) if head.method == "OPTIONS" => {
            let asked = head
                .header_str("access-control-request-headers")
                .unwrap_or("Content-Type")
                .to_string();
            let extra = format!(
                "Access-Control-Allow-Methods: POST, OPTIONS\r\nAccess-Control-Allow-Headers: {asked}\r\nAccess-Control-Max-Age: {PREFLIGHT_MAX_AGE_SECS}\r\n"
            );
            let keep = head.keep_alive() && matches!(framing(head), Ok(Framing::Length(0)));
            let bytes = answer(204, &cors, &extra, "", keep);
            if stream.write_all(&bytes).await.is_err() {
                return false;
            }
            if !keep {
                discard(stream, cfg).await;
            }
            return keep;
        }
        Ok(cors) if head.method != "POST" => Err(refuse_early(405, &cors, "use POST\n")),
        Ok(cors) => match framing(head) {
            Err((status, why)) => Err(refuse_early(status, &cors, why)),
            Ok(Framing::Length(n)) if n > max_body => {
                Err(refuse_early(413, &cors, "body too large\n"))
            }
            Ok(f) => Ok((cors, f)),
        },
    };
    let (cors, body_framing) = match early {
        Ok(v) => v,
        Err(bytes) => {
            if stream.write_all(&bytes).await.is_ok() {
                discard(stream, cfg).await;
            }
            return false;
        }
    };
    let read = match body_framing {
        Framing::Length(n) => read_length(stream, buf, n, deadline).await,
        Framing::Chunked => {
            let line_max = cfg.limits.max_request_head_bytes;
            read_chunked(stream, buf, max_body, line_max, deadline).await
        }
    };
    let body = match read {
        Ok(body) => body,
        Err(BodyError::Closed) => return false,
        Err(e) => {
            let (status, why) = match e {
                BodyError::Timeout => (408, "request timeout\n"),
                BodyError::TooBig => (413, "body too large\n"),
                _ => (400, "bad chunked body\n"),
            };
            let bytes = refuse_early(status, &cors, why);
            if stream.write_all(&bytes).await.is_ok() {
                discard(stream, cfg).await;
            }
            return false;
        }
    };
    let keep = head.keep_alive();
    let protobuf = head.header("content-type").is_some_and(|v| {
        v.trim_ascii()
            .eq_ignore_ascii_case(b"application/octet-stream")
    });
    let decided = if protobuf {
        Err((400, "only the JSON protocol is supported over emulation\n"))
    } else {
        decide(&body, cfg, ctx.node())
    };
    let bytes = match decided {
        Ok(req) => {
            if ctx.hand_over(req) {
                ctx.count(true);
                answer(204, &cors, "", "", keep)
            } else {
                ctx.count(false);
                answer(503, &cors, "", "server busy\n", keep)
            }
        }
        Err((status, why)) => {
            ctx.count(false);
            answer(status, &cors, "", why, keep)
        }
    };
    stream.write_all(&bytes).await.is_ok() && keep
}

/// Half-closes and discards what the client still sends, bounded (see
/// [`super::discard_then_close`]).
async fn discard(stream: &mut TcpStream, cfg: &Config) {
    let linger = std::time::Duration::from_secs(cfg.limits.handshake_timeout_secs as u64)
        .min(super::MAX_LINGER);
    super::discard_then_close(stream, linger, max_body_bytes(cfg)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(uid: &str) -> NodeInfo {
        NodeInfo::new(uid.into(), "n".into(), "a".into(), 1)
    }

    #[test]
    fn requests_are_checked_before_hand_over() {
        let cfg = Config::default();
        let me = node("me");
        let ok = br#"{"session":"0.1.2.ff","node":"me","data":"{\"id\":1,\"ping\":{}}"}"#;
        let req = decide(ok, &cfg, &me).unwrap();
        assert_eq!(req.data, r#"{"id":1,"ping":{}}"#);
        assert_eq!(req.shard(), Some(0));
        // data must be a JSON string (the JSON protocol's form).
        let obj = br#"{"session":"s","node":"me","data":{"id":1}}"#;
        assert_eq!(decide(obj, &cfg, &me).unwrap_err().0, 400);
        assert_eq!(decide(b"nope", &cfg, &me).unwrap_err().0, 400);
        let empty = br#"{"session":"","node":"me","data":""}"#;
        assert_eq!(decide(empty, &cfg, &me).unwrap_err().0, 400);
        // Standalone: another node is not found.
        let other = br#"{"session":"s","node":"other","data":""}"#;
        assert_eq!(decide(other, &cfg, &me).unwrap_err().0, 404);
        // Too many command bytes.
        let mut small = Config::default();
        small.limits.max_message_bytes = 4;
        let big = br#"{"session":"s","node":"me","data":"12345"}"#;
        assert_eq!(decide(big, &small, &me).unwrap_err().0, 413);
    }

    #[test]
    fn cors_echoes_allowed_origins_only() {
        let head = |origin: &str| {
            let raw =
                format!("POST /emulation HTTP/1.1\r\nHost: srv:8000\r\nOrigin: {origin}\r\n\r\n");
            super::super::parse_head(raw.as_bytes()).unwrap().unwrap()
        };
        let allowed = vec!["https://*.example.com".to_string()];
        let h = cors(&head("https://app.example.com"), &allowed).unwrap();
        assert!(h.contains("Access-Control-Allow-Origin: https://app.example.com\r\n"));
        assert!(cors(&head("https://evil.test"), &allowed).is_err());
        // Same host is always allowed, as for the WebSocket upgrade.
        assert!(cors(&head("http://srv:8000"), &[]).is_ok());
        let none = super::super::parse_head(b"POST /emulation HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(cors(&none, &[]).unwrap(), "");
    }

    #[test]
    fn no_content_has_no_body_headers() {
        let a = String::from_utf8(answer(204, "", "", "", true)).unwrap();
        assert!(a.starts_with("HTTP/1.1 204 No Content\r\n"));
        assert!(!a.contains("Content-Length"));
        assert!(a.ends_with("\r\n\r\n"));
    }
}
