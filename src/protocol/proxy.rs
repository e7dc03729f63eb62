//! The JSON the node exchanges with the application backend's proxy endpoints, in the shapes
//! of Centrifugo's HTTP proxy: one request body builder for the six hooks, and the answer,
//! which is a `result`, an `error` (passed to the client) or a `disconnect` (the client is
//! closed with it).
//!
//! Only the JSON protocol is spoken, so the binary-mode fields (`b64data`, `b64info`) are not
//! read; an answer that carries only those is taken as carrying no data.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::HashMap;

/// What a backend call is for: the six proxy hooks, and the token key set fetch
/// (`token_jwks_url`). Also the label of its histogram and counters in `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyKind {
    Connect,
    Refresh,
    Subscribe,
    Publish,
    SubRefresh,
    Rpc,
    /// The token key set fetch (`token_jwks_url`).
    Jwks,
}

impl ProxyKind {
    pub const ALL: [ProxyKind; 7] = [
        ProxyKind::Connect,
        ProxyKind::Refresh,
        ProxyKind::Subscribe,
        ProxyKind::Publish,
        ProxyKind::SubRefresh,
        ProxyKind::Rpc,
        ProxyKind::Jwks,
    ];

    /// The name in config keys, logs and the `kind` label in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            ProxyKind::Connect => "connect",
            ProxyKind::Refresh => "refresh",
            ProxyKind::Subscribe => "subscribe",
            ProxyKind::Publish => "publish",
            ProxyKind::SubRefresh => "sub_refresh",
            ProxyKind::Rpc => "rpc",
            ProxyKind::Jwks => "jwks",
        }
    }
}

/// The body of a proxy request. `client`, `transport`, `protocol` and `encoding` are always
/// there; the rest as the hook has them (`user` for every hook but connect).
#[derive(Debug, Serialize)]
pub struct Request<'a> {
    pub client: &'a str,
    pub transport: &'static str,
    pub protocol: &'static str,
    pub encoding: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub method: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a RawValue>,
}

impl<'a> Request<'a> {
    /// A request from `client`, connected over `transport` speaking `protocol` (Centrifugo's
    /// names: `websocket`, `sse`, `http_stream`, `uni_*`; `json` or `protobuf`). Payloads are
    /// JSON whatever the client's protocol, so `encoding` is always `json`.
    pub fn new(client: &'a str, (transport, protocol): (&'static str, &'static str)) -> Self {
        Request {
            client,
            transport,
            protocol,
            encoding: "json",
            user: None,
            channel: None,
            method: "",
            name: "",
            version: "",
            data: None,
        }
    }

    /// The JSON body.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serializing to a Vec cannot fail")
    }
}

/// `connect` result.
#[derive(Debug, Default, Deserialize)]
pub struct ConnectResult {
    /// The user id; empty for an anonymous user.
    #[serde(default)]
    pub user: String,
    /// Unix seconds the connection expires at; 0 = never.
    #[serde(default)]
    pub expire_at: u64,
    /// Connection info (presence, publications).
    #[serde(default)]
    pub info: Option<Box<RawValue>>,
    /// Returned to the client in the connect reply.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
    /// Server-side subscriptions.
    #[serde(default)]
    pub channels: Vec<String>,
    /// Server-side subscriptions with options, by channel.
    #[serde(default)]
    pub subs: HashMap<String, SubOptions>,
}

/// Options of one server-side subscription in a connect result.
#[derive(Debug, Default, Deserialize)]
pub struct SubOptions {
    /// Returned to the client in the connect reply's subscription.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
    /// The subscription's info: `chan_info` in presence entries and join/leave messages.
    #[serde(default)]
    pub info: Option<Box<RawValue>>,
}

/// `refresh` and `sub_refresh` result.
#[derive(Debug, Default, Deserialize)]
pub struct RefreshResult {
    /// The connection (subscription) ends now.
    #[serde(default)]
    pub expired: bool,
    /// The new expiry, Unix seconds; 0 = never.
    #[serde(default)]
    pub expire_at: u64,
    /// New connection info (refresh only).
    #[serde(default)]
    pub info: Option<Box<RawValue>>,
}

/// `subscribe` result.
#[derive(Debug, Default, Deserialize)]
pub struct SubscribeResult {
    /// Returned to the client in the subscribe reply.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
    /// Unix seconds the subscription expires at; 0 = never.
    #[serde(default)]
    pub expire_at: u64,
    /// The subscription's info: `chan_info` in presence entries and join/leave messages.
    #[serde(default)]
    pub info: Option<Box<RawValue>>,
}

/// `publish` result.
#[derive(Debug, Default, Deserialize)]
pub struct PublishResult {
    /// Published instead of the client's data.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
    /// Do not keep this publication in the channel's history.
    #[serde(default)]
    pub skip_history: bool,
}

/// `rpc` result.
#[derive(Debug, Default, Deserialize)]
pub struct RpcResult {
    /// The answer to the client.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
}

/// What the backend answered.
#[derive(Debug)]
pub enum Answer<T> {
    Result(T),
    /// An error for the client (codes 400..=1999).
    Error {
        code: u32,
        message: String,
        temporary: bool,
    },
    /// Close the client with this code (4000..=4999) and reason.
    Disconnect {
        code: u16,
        reason: String,
    },
}

#[derive(Deserialize)]
struct Envelope<T> {
    #[serde(default = "Option::default")]
    result: Option<T>,
    #[serde(default)]
    error: Option<ErrorBody>,
    #[serde(default)]
    disconnect: Option<DisconnectBody>,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: u32,
    #[serde(default)]
    message: String,
    #[serde(default)]
    temporary: bool,
}

#[derive(Deserialize)]
struct DisconnectBody {
    code: u32,
    #[serde(default)]
    reason: String,
}

/// Longest close reason a WebSocket close frame carries, bytes (RFC 6455: 125 - 2).
const MAX_REASON_BYTES: usize = 123;

/// Reads a backend answer. An error code outside 400..=1999 or a disconnect code outside
/// 4000..=4999 is the backend's mistake and is refused like a malformed answer (the client
/// then gets the temporary internal error), never passed on.
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<Answer<T>, String> {
    let env: Envelope<T> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if let Some(d) = env.disconnect {
        if !(4000..=4999).contains(&d.code) {
            return Err(format!("disconnect code {} outside 4000..=4999", d.code));
        }
        let mut reason = d.reason;
        if reason.len() > MAX_REASON_BYTES {
            let mut cut = MAX_REASON_BYTES;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        return Ok(Answer::Disconnect {
            code: d.code as u16,
            reason,
        });
    }
    if let Some(e) = env.error {
        if !(400..=1999).contains(&e.code) {
            return Err(format!("error code {} outside 400..=1999", e.code));
        }
        return Ok(Answer::Error {
            code: e.code,
            message: e.message,
            temporary: e.temporary,
        });
    }
    match env.result {
        Some(r) => Ok(Answer::Result(r)),
        None => Err("no result, error or disconnect".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn request_bodies_have_the_documented_fields() {
        let data = RawValue::from_string(r#"{"x":1}"#.into()).unwrap();
        let mut r = Request::new("c1", ("websocket", "json"));
        r.name = "js";
        r.data = Some(&data);
        let v: Value = serde_json::from_slice(&r.to_vec()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"client":"c1","transport":"websocket","protocol":"json",
                "encoding":"json","name":"js","data":{"x":1}})
        );
        let mut r = Request::new("c2", ("sse", "protobuf"));
        r.user = Some("");
        r.channel = Some("chat:a");
        let v: Value = serde_json::from_slice(&r.to_vec()).unwrap();
        assert_eq!(
            v["user"], "",
            "user is always sent after connect, even when empty"
        );
        assert_eq!(v["channel"], "chat:a");
        assert_eq!(
            (&v["transport"], &v["protocol"]),
            (&serde_json::json!("sse"), &serde_json::json!("protobuf"))
        );
        assert!(v.get("method").is_none() && v.get("data").is_none());
    }

    #[test]
    fn answers_parse_into_result_error_or_disconnect() {
        let a: Answer<ConnectResult> =
            parse(br#"{"result":{"user":"56","expire_at":9,"info":{"a":1},"channels":["x"]}}"#)
                .unwrap();
        let Answer::Result(r) = a else { panic!() };
        assert_eq!((r.user.as_str(), r.expire_at), ("56", 9));
        assert_eq!(r.info.unwrap().get(), r#"{"a":1}"#);
        assert_eq!(r.channels, ["x"]);
        let a: Answer<RpcResult> = parse(br#"{"error":{"code":1000,"message":"custom"}}"#).unwrap();
        assert!(
            matches!(a, Answer::Error { code: 1000, ref message, temporary: false } if message == "custom")
        );
        let a: Answer<RpcResult> =
            parse(br#"{"disconnect":{"code":4501,"reason":"unauthorized"}}"#).unwrap();
        assert!(
            matches!(a, Answer::Disconnect { code: 4501, ref reason } if reason == "unauthorized")
        );
        let a: Answer<PublishResult> = parse(br#"{"result":{}}"#).unwrap();
        assert!(matches!(
            a,
            Answer::Result(PublishResult { data: None, .. })
        ));
    }

    #[test]
    fn backend_mistakes_are_refused() {
        for bad in [
            &br#"{"error":{"code":100,"message":"x"}}"#[..],
            br#"{"disconnect":{"code":3000,"reason":"x"}}"#,
            br#"{}"#,
            br#"not json"#,
            br#"{"result":{"user":5}}"#,
        ] {
            assert!(
                parse::<ConnectResult>(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!(
            r#"{{"disconnect":{{"code":4000,"reason":"{}"}}}}"#,
            "é".repeat(100)
        );
        let Answer::Disconnect { reason, .. } = parse::<RpcResult>(long.as_bytes()).unwrap() else {
            panic!()
        };
        assert!(reason.len() <= MAX_REASON_BYTES);
    }
}
