//! The WebSocket opening handshake (RFC 6455 §4.2), decided from a request head: the 101
//! response, or the status that refuses the upgrade. tungstenite's handshake code validates the
//! request and computes `Sec-WebSocket-Accept`; the origin check ([`crate::pattern::origin`]) runs here
//! too, so a foreign page is refused before the 101. Pure: no socket, no shard state (the front
//! door applies the node's own limits afterwards).
//!
//! The wire format is chosen here, as Centrifugo chooses it: the `centrifuge-protobuf`
//! subprotocol (answered in `Sec-WebSocket-Protocol`), or `?format=protobuf` /
//! `?cf_protocol=protobuf` in the URL for clients that cannot offer subprotocols, makes a
//! protobuf connection; anything else is JSON. A client offering `centrifuge-json` gets it
//! answered (the server's preference when both are offered, as in Centrifugo).

use super::{plain, Head};
use crate::pattern::origin;

/// Why an upgrade request is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not `GET`: 405.
    Method,
    /// A header value the HTTP types refuse: 400.
    BadHeaders,
    /// Not a valid WebSocket upgrade: 426 without an `Upgrade` header, else 400.
    NotUpgrade { status: u16, why: String },
    /// An `Origin` neither the request's own host nor allowed by `allowed_origins`: 403
    /// (counted as `origin_refusals`).
    Origin,
}

impl Refusal {
    /// The complete response that refuses the upgrade (the connection closes after it).
    pub fn response(&self) -> Vec<u8> {
        match self {
            Refusal::Method => plain(405, "websocket upgrade needs GET\n"),
            Refusal::BadHeaders => plain(400, "bad request headers\n"),
            Refusal::NotUpgrade { status, why } => plain(*status, &format!("{why}\n")),
            Refusal::Origin => plain(403, "origin not allowed\n"),
        }
    }
}

/// The JSON subprotocol name.
pub const SUBPROTOCOL_JSON: &str = "centrifuge-json";
/// The protobuf subprotocol name.
pub const SUBPROTOCOL_PROTOBUF: &str = "centrifuge-protobuf";

/// An accepted upgrade: the 101 response and the connection's wire format.
#[derive(Debug, PartialEq, Eq)]
pub struct Accepted {
    pub response: Vec<u8>,
    /// The client speaks the protobuf protocol (binary frames).
    pub protobuf: bool,
}

/// The subprotocol to answer, if the client offered one we speak (JSON preferred).
fn subprotocol(head: &Head) -> Option<&'static str> {
    let offered = |name: &str| {
        head.header_values("sec-websocket-protocol").any(|v| {
            std::str::from_utf8(v)
                .unwrap_or("")
                .split(',')
                .any(|p| p.trim() == name)
        })
    };
    [SUBPROTOCOL_JSON, SUBPROTOCOL_PROTOBUF]
        .into_iter()
        .find(|p| offered(p))
}

/// `format=protobuf` or `cf_protocol=protobuf` in the query string.
fn query_wants_protobuf(path: &str) -> bool {
    let Some((_, query)) = path.split_once('?') else {
        return false;
    };
    query
        .split('&')
        .any(|kv| kv == "format=protobuf" || kv == "cf_protocol=protobuf")
}

/// Checks an upgrade request; the 101 response (with the chosen subprotocol) on success.
pub fn accept(head: &Head, allowed_origins: &[String]) -> Result<Accepted, Refusal> {
    if head.method != "GET" {
        return Err(Refusal::Method);
    }
    let mut builder = tungstenite::http::Request::builder()
        .method("GET")
        .uri(head.path.as_str())
        .version(tungstenite::http::Version::HTTP_11);
    for (name, value) in &head.headers {
        builder = builder.header(name.as_str(), value.as_slice());
    }
    let request = builder.body(()).map_err(|_| Refusal::BadHeaders)?;
    let mut accept = tungstenite::handshake::server::create_response(&request).map_err(|e| {
        let status = if head.header("upgrade").is_none() {
            426
        } else {
            400
        };
        Refusal::NotUpgrade {
            status,
            why: e.to_string(),
        }
    })?;
    // Cross-site WebSocket hijacking: a browser page of another site is refused before the 101.
    if let Some(origin) = head.header("origin").filter(|o| !o.is_empty()) {
        let origin = std::str::from_utf8(origin).unwrap_or("");
        if !origin::allowed(origin, head.header_str("host"), allowed_origins) {
            tracing::debug!(origin, "upgrade refused: origin not allowed");
            return Err(Refusal::Origin);
        }
    }
    let chosen = subprotocol(head);
    if let Some(p) = chosen {
        accept.headers_mut().insert(
            "sec-websocket-protocol",
            tungstenite::http::HeaderValue::from_static(p),
        );
    }
    let protobuf = chosen == Some(SUBPROTOCOL_PROTOBUF)
        || (chosen.is_none() && query_wants_protobuf(&head.path));
    let mut out = Vec::with_capacity(200);
    tungstenite::handshake::server::write_response(&mut out, &accept)
        .map_err(|_| Refusal::BadHeaders)?;
    Ok(Accepted {
        response: out,
        protobuf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::parse_head;

    fn head(extra: &str) -> Head {
        let text = format!(
            "GET /connection/websocket HTTP/1.1\r\nHost: node.example:8000\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        );
        parse_head(text.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn a_valid_upgrade_gets_the_101_with_the_rfc_accept_key() {
        let accepted = accept(&head(""), &[]).unwrap();
        assert!(!accepted.protobuf);
        let out = String::from_utf8(accepted.response).unwrap();
        assert!(out.starts_with("HTTP/1.1 101"), "{out}");
        assert!(
            !out.to_ascii_lowercase().contains("sec-websocket-protocol"),
            "{out}"
        );
        // RFC 6455 §1.3's example key and answer.
        assert!(out.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{out}");
    }

    #[test]
    fn refusals_name_their_status() {
        let mut post = head("");
        post.method = "POST".into();
        assert_eq!(accept(&post, &[]), Err(Refusal::Method));
        let plain_get = parse_head(b"GET /connection/websocket HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap()
            .unwrap();
        let err = accept(&plain_get, &[]).unwrap_err();
        assert!(
            matches!(err, Refusal::NotUpgrade { status: 426, .. }),
            "{err:?}"
        );
        assert!(String::from_utf8(err.response())
            .unwrap()
            .starts_with("HTTP/1.1 426"));
        let foreign = head("Origin: https://evil.example\r\n");
        assert_eq!(accept(&foreign, &[]), Err(Refusal::Origin));
        assert!(String::from_utf8(Refusal::Origin.response())
            .unwrap()
            .starts_with("HTTP/1.1 403"));
        let own = head("Origin: http://node.example:8000\r\n");
        assert!(accept(&own, &[]).is_ok());
        let listed = head("Origin: https://app.example.com\r\n");
        assert!(accept(&listed, &["https://*.example.com".to_string()]).is_ok());
    }

    #[test]
    fn the_protobuf_subprotocol_is_answered_and_marks_the_connection() {
        let a = accept(
            &head("Sec-WebSocket-Protocol: centrifuge-protobuf\r\n"),
            &[],
        )
        .unwrap();
        assert!(a.protobuf);
        let out = String::from_utf8(a.response).unwrap().to_ascii_lowercase();
        assert!(
            out.contains("sec-websocket-protocol: centrifuge-protobuf\r\n"),
            "{out}"
        );
        // JSON is preferred when both are offered (as Centrifugo's server list orders them).
        let both = head("Sec-WebSocket-Protocol: centrifuge-protobuf, centrifuge-json\r\n");
        let a = accept(&both, &[]).unwrap();
        assert!(!a.protobuf);
        assert!(String::from_utf8(a.response)
            .unwrap()
            .to_ascii_lowercase()
            .contains("sec-websocket-protocol: centrifuge-json\r\n"));
        // An unknown subprotocol is not answered.
        let other = accept(&head("Sec-WebSocket-Protocol: mqtt\r\n"), &[]).unwrap();
        assert!(!other.protobuf);
        assert!(!String::from_utf8(other.response)
            .unwrap()
            .to_ascii_lowercase()
            .contains("sec-websocket-protocol"));
        // The URL form, for clients that cannot offer subprotocols.
        let mut q = head("");
        q.path = "/connection/websocket?cf_protocol=protobuf".into();
        assert!(accept(&q, &[]).unwrap().protobuf);
        q.path = "/connection/websocket?x=1&format=protobuf".into();
        assert!(accept(&q, &[]).unwrap().protobuf);
    }
}
