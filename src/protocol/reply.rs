//! Outbound JSON: replies to commands, pushes, and the server ping.
//!
//! Encoders write into a caller's `Vec<u8>` (which may start with reserved room for a
//! WebSocket header, see [`crate::ws::FrameBuf`]), so a publication is encoded once and
//! framed in place without another copy.

use super::ErrorCode;
use serde::Serialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// Who published or who is present (it crosses threads, so it lives in the bus).
pub use crate::bus::ClientInfo;

/// `connect` result.
#[derive(Serialize)]
pub struct ConnectResult<'a> {
    pub client: &'a str,
    pub version: &'a str,
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero")]
    pub ttl: u32,
    /// The connect proxy's `data` for the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub subs: BTreeMap<&'a str, SubscribeResult>,
    pub ping: u32,
    pub pong: bool,
    /// Bidirectional emulation only (HTTP-streaming, SSE): the connection's session id and
    /// node uid, which the client sends with every `/emulation` POST.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<&'a str>,
}

/// `refresh` result.
#[derive(Serialize)]
pub struct RefreshResult<'a> {
    pub client: &'a str,
    pub version: &'a str,
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero")]
    pub ttl: u32,
}

/// `subscribe` result. Position fields come with history: the stream's `epoch` and the
/// `offset` the subscription continues from (after a recovery, the client's own offset: the
/// publications below move it to the top as the SDK delivers them).
#[derive(Serialize, Default, Debug, Clone)]
pub struct SubscribeResult {
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero")]
    pub ttl: u32,
    #[serde(skip_serializing_if = "is_false")]
    pub recoverable: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub positioned: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "is_false")]
    pub was_recovering: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub recovered: bool,
    /// The subscribe proxy's `data` for the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
}

/// `sub_refresh` result: the new expiry of the subscription (`expires` with `ttl` seconds
/// left, or neither when the new token does not expire).
#[derive(Serialize, Default, Debug)]
pub struct SubRefreshResult {
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero")]
    pub ttl: u32,
}

/// `presence_stats` result, also the API's.
#[derive(Serialize, Debug, Default, PartialEq, Eq)]
pub struct PresenceStats {
    pub num_clients: u32,
    pub num_users: u32,
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// An empty object, for results without fields.
#[derive(Serialize)]
pub struct Empty {}

/// Appends `{"id":ID,"METHOD":RESULT}`.
pub fn result<T: Serialize>(out: &mut Vec<u8>, id: u32, method: &str, value: &T) {
    out.extend_from_slice(b"{\"id\":");
    out.extend_from_slice(itoa(id).as_bytes());
    out.extend_from_slice(b",\"");
    out.extend_from_slice(method.as_bytes());
    out.extend_from_slice(b"\":");
    serde_json::to_writer(&mut *out, value).expect("serializing to a Vec cannot fail");
    out.push(b'}');
}

/// Appends `{"id":ID,"error":{"code":C,"message":M[,"temporary":true]}}`.
pub fn error(out: &mut Vec<u8>, id: u32, code: ErrorCode, temporary: bool) {
    out.extend_from_slice(b"{\"id\":");
    out.extend_from_slice(itoa(id).as_bytes());
    out.extend_from_slice(b",\"error\":{\"code\":");
    out.extend_from_slice(itoa(code.code()).as_bytes());
    out.extend_from_slice(b",\"message\":\"");
    out.extend_from_slice(code.message().as_bytes());
    out.push(b'"');
    if temporary {
        out.extend_from_slice(b",\"temporary\":true");
    }
    out.extend_from_slice(b"}}");
}

/// Appends an error the backend chose (its code, message and `temporary` flag, passed on
/// as they are).
pub fn custom_error(out: &mut Vec<u8>, id: u32, code: u32, message: &str, temporary: bool) {
    #[derive(Serialize)]
    struct Body<'a> {
        code: u32,
        message: &'a str,
        #[serde(skip_serializing_if = "is_false")]
        temporary: bool,
    }
    out.extend_from_slice(b"{\"id\":");
    out.extend_from_slice(itoa(id).as_bytes());
    out.extend_from_slice(b",\"error\":");
    let body = Body {
        code,
        message,
        temporary,
    };
    serde_json::to_writer(&mut *out, &body).expect("serializing to a Vec cannot fail");
    out.push(b'}');
}

/// `rpc` result: the backend's answer.
#[derive(Serialize)]
pub struct RpcResult<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a RawValue>,
}

/// Appends `value` serialised, with `"publications":[P,...]` added (raw publication objects).
pub fn with_publications<T: Serialize>(out: &mut Vec<u8>, value: &T, pubs: &[bytes::Bytes]) {
    let start = out.len();
    serde_json::to_writer(&mut *out, value).expect("vec write");
    if pubs.is_empty() {
        return;
    }
    out.pop(); // the object's closing brace
    if out.len() > start + 1 {
        out.push(b',');
    }
    out.extend_from_slice(b"\"publications\":[");
    for (i, p) in pubs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(p);
    }
    out.extend_from_slice(b"]}");
}

/// Appends `{"id":ID,"METHOD":RESULT}` where RESULT gets raw `publications`.
pub fn result_with_publications<T: Serialize>(
    out: &mut Vec<u8>,
    id: u32,
    method: &str,
    value: &T,
    pubs: &[bytes::Bytes],
) {
    out.extend_from_slice(b"{\"id\":");
    out.extend_from_slice(itoa(id).as_bytes());
    out.extend_from_slice(b",\"");
    out.extend_from_slice(method.as_bytes());
    out.extend_from_slice(b"\":");
    with_publications(out, value, pubs);
    out.push(b'}');
}

/// Appends `{"id":ID,"connect":RESULT}` where RESULT is the serialised `base` (a
/// [`ConnectResult`] without subs) with `subs` added, each with its raw `publications`.
pub fn connect_with_subs(
    out: &mut Vec<u8>,
    id: u32,
    base: &[u8],
    subs: &BTreeMap<String, (SubscribeResult, Vec<bytes::Bytes>)>,
) {
    out.extend_from_slice(b"{\"id\":");
    out.extend_from_slice(itoa(id).as_bytes());
    out.extend_from_slice(b",\"connect\":");
    out.extend_from_slice(&base[..base.len() - 1]); // without its closing brace
    out.extend_from_slice(b",\"subs\":{");
    for (i, (channel, (result, pubs))) in subs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, channel).expect("vec write");
        out.push(b':');
        with_publications(out, result, pubs);
    }
    out.extend_from_slice(b"}}}");
}

/// `history` result (publications are added raw).
#[derive(Serialize, Debug)]
pub struct HistoryResult<'a> {
    pub epoch: &'a str,
    pub offset: u64,
}

/// Appends an unsubscribe push telling the client the server removed it from a channel.
pub fn unsubscribe_push(out: &mut Vec<u8>, channel: &str, code: u32, reason: &str) {
    out.extend_from_slice(b"{\"push\":{\"channel\":");
    serde_json::to_writer(&mut *out, channel).expect("vec write");
    out.extend_from_slice(b",\"unsubscribe\":{\"code\":");
    out.extend_from_slice(itoa(code).as_bytes());
    out.extend_from_slice(b",\"reason\":");
    serde_json::to_writer(&mut *out, reason).expect("vec write");
    out.extend_from_slice(b"}}}");
}

/// Appends a join (`joined`) or leave push of `channel` carrying who it is:
/// `{"push":{"channel":C,"join":{"info":I}}}` (`"leave"` for a leave), Centrifugo's shape.
pub fn join_leave_push(out: &mut Vec<u8>, channel: &str, info: &ClientInfo, joined: bool) {
    out.extend_from_slice(b"{\"push\":{\"channel\":");
    serde_json::to_writer(&mut *out, channel).expect("vec write");
    out.extend_from_slice(if joined {
        b",\"join\":{\"info\":"
    } else {
        b",\"leave\":{\"info\":"
    });
    serde_json::to_writer(&mut *out, info).expect("vec write");
    out.extend_from_slice(b"}}}");
}

/// Whether `push`, a push of `channel` as [`join_leave_push`] makes it, is a join or leave
/// (rather than a publication): nodes tell them apart on a channel's Redis pub/sub.
pub fn is_join_leave_push(channel: &str, push: &[u8]) -> bool {
    let mut prefix = Vec::with_capacity(channel.len() + 24);
    prefix.extend_from_slice(b"{\"push\":{\"channel\":");
    serde_json::to_writer(&mut prefix, channel).expect("vec write");
    let Some(rest) = push.strip_prefix(&prefix[..]) else {
        return false;
    };
    rest.starts_with(b",\"join\":{") || rest.starts_with(b",\"leave\":{")
}

/// Appends a subscribe push for a subscription the server made (`/api/subscribe`):
/// `{"push":{"channel":C,"subscribe":{..}}}` with the protocol's `Subscribe` fields
/// (`recoverable`, `epoch`, `offset`, `positioned`, `data`) taken from `result`.
pub fn subscribe_push(out: &mut Vec<u8>, channel: &str, result: &SubscribeResult) {
    #[derive(Serialize)]
    struct Subscribe<'a> {
        #[serde(skip_serializing_if = "is_false")]
        recoverable: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        #[serde(skip_serializing_if = "is_false")]
        positioned: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<&'a RawValue>,
    }
    let body = Subscribe {
        recoverable: result.recoverable,
        epoch: result.epoch.as_deref(),
        offset: result.offset,
        // A recoverable subscription is positioned (the SDK tracks its offset).
        positioned: result.positioned || result.recoverable,
        data: result.data.as_deref(),
    };
    out.extend_from_slice(b"{\"push\":{\"channel\":");
    serde_json::to_writer(&mut *out, channel).expect("vec write");
    out.extend_from_slice(b",\"subscribe\":");
    serde_json::to_writer(&mut *out, &body).expect("vec write");
    out.extend_from_slice(b"}}");
}

/// Appends a refresh push (`/api/refresh`): `{"push":{"refresh":{"expires":true,"ttl":N}}}`,
/// or `{"push":{"refresh":{}}}` when the connection no longer expires (`ttl_secs` 0).
pub fn refresh_push(out: &mut Vec<u8>, ttl_secs: u32) {
    out.extend_from_slice(b"{\"push\":{\"refresh\":{");
    if ttl_secs > 0 {
        out.extend_from_slice(b"\"expires\":true,\"ttl\":");
        out.extend_from_slice(itoa(ttl_secs).as_bytes());
    }
    out.extend_from_slice(b"}}}");
}

fn itoa(n: u32) -> String {
    // Small and not on the fan-out path (publications carry no id).
    n.to_string()
}

/// Builds the `presence` result: client id → info.
pub fn presence_result(list: Vec<ClientInfo>) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = list
        .into_iter()
        .map(|info| {
            let key = info.client.clone();
            (key, serde_json::to_value(info).unwrap_or_default())
        })
        .collect();
    serde_json::json!({ "presence": map })
}

/// Counts clients and distinct users.
pub fn presence_stats(list: &[ClientInfo]) -> PresenceStats {
    let users: std::collections::HashSet<&str> = list.iter().map(|i| i.user.as_str()).collect();
    PresenceStats {
        num_clients: list.len() as u32,
        num_users: users.len() as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_and_leave_pushes_have_centrifugos_shape_and_are_told_apart() {
        let info = ClientInfo {
            user: "u\"1".into(),
            client: "c".into(),
            conn_info: Some(serde_json::value::RawValue::from_string("{\"n\":1}".into()).unwrap()),
            chan_info: Some(serde_json::value::RawValue::from_string("[2]".into()).unwrap()),
        };
        let mut v = Vec::new();
        join_leave_push(&mut v, "chat:\"x", &info, true);
        assert_eq!(
            std::str::from_utf8(&v).unwrap(),
            r#"{"push":{"channel":"chat:\"x","join":{"info":{"user":"u\"1","client":"c","conn_info":{"n":1},"chan_info":[2]}}}}"#
        );
        assert!(is_join_leave_push("chat:\"x", &v));
        assert!(!is_join_leave_push("chat:y", &v), "another channel's");
        let mut l = Vec::new();
        join_leave_push(
            &mut l,
            "c",
            &ClientInfo {
                conn_info: None,
                chan_info: None,
                ..info
            },
            false,
        );
        assert_eq!(
            std::str::from_utf8(&l).unwrap(),
            r#"{"push":{"channel":"c","leave":{"info":{"user":"u\"1","client":"c"}}}}"#
        );
        assert!(is_join_leave_push("c", &l));
        let mut p = Vec::new();
        let data = serde_json::value::RawValue::from_string("{\"join\":1}".into()).unwrap();
        crate::protocol::publication::push_new(&mut p, "c", &data, None, None);
        assert!(!is_join_leave_push("c", &p), "a publication is not one");
    }

    #[test]
    fn error_reply_shape() {
        let mut v = Vec::new();
        error(&mut v, 7, ErrorCode::PermissionDenied, false);
        assert_eq!(
            std::str::from_utf8(&v).unwrap(),
            r#"{"id":7,"error":{"code":103,"message":"permission denied"}}"#
        );
        let parsed: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(parsed["error"]["code"], 103);
    }

    #[test]
    fn publications_are_spliced_raw() {
        let pubs = [
            bytes::Bytes::from_static(br#"{"data":1,"offset":4}"#),
            bytes::Bytes::from_static(br#"{"data":2,"offset":5}"#),
        ];
        let mut v = Vec::new();
        let r = SubscribeResult {
            recoverable: true,
            epoch: Some("e".into()),
            offset: Some(3),
            ..Default::default()
        };
        result_with_publications(&mut v, 2, "subscribe", &r, &pubs);
        let p: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(p["subscribe"]["publications"][1]["offset"], 5);
        assert_eq!(p["subscribe"]["epoch"], "e");
        let mut v = Vec::new();
        with_publications(&mut v, &Empty {}, &pubs[..1]);
        assert_eq!(v, br#"{"publications":[{"data":1,"offset":4}]}"#);
        let mut v = Vec::new();
        with_publications(&mut v, &Empty {}, &[]);
        assert_eq!(v, b"{}");
    }

    #[test]
    fn connect_reply_with_recovered_subs() {
        let base = serde_json::to_vec(&ConnectResult {
            client: "c",
            version: "v",
            expires: false,
            ttl: 0,
            data: None,
            subs: BTreeMap::new(),
            ping: 25,
            pong: true,
            session: None,
            node: None,
        })
        .unwrap();
        let mut subs = BTreeMap::new();
        let r = SubscribeResult {
            recovered: true,
            offset: Some(1),
            ..Default::default()
        };
        subs.insert(
            "a\"b".to_string(),
            (
                r,
                vec![bytes::Bytes::from_static(br#"{"data":2,"offset":2}"#)],
            ),
        );
        subs.insert("c".to_string(), (SubscribeResult::default(), Vec::new()));
        let mut v = Vec::new();
        connect_with_subs(&mut v, 3, &base, &subs);
        let p: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(p["connect"]["client"], "c");
        assert_eq!(p["connect"]["subs"]["a\"b"]["publications"][0]["offset"], 2);
        assert_eq!(p["connect"]["subs"]["c"], serde_json::json!({}));
    }

    #[test]
    fn connect_result_shape() {
        let mut v = Vec::new();
        let r = ConnectResult {
            client: "abc",
            version: "0.1.0",
            expires: false,
            ttl: 0,
            data: None,
            subs: BTreeMap::new(),
            ping: 25,
            pong: true,
            session: None,
            node: None,
        };
        result(&mut v, 1, "connect", &r);
        assert_eq!(
            std::str::from_utf8(&v).unwrap(),
            r#"{"id":1,"connect":{"client":"abc","version":"0.1.0","ping":25,"pong":true}}"#
        );
        let emulated = ConnectResult {
            session: Some("0.1.2.ab"),
            node: Some("n1"),
            ..r
        };
        v.clear();
        result(&mut v, 1, "connect", &emulated);
        assert!(std::str::from_utf8(&v)
            .unwrap()
            .ends_with(r#""ping":25,"pong":true,"session":"0.1.2.ab","node":"n1"}}"#));
    }

    #[test]
    fn server_side_pushes_have_the_protocol_shapes() {
        let mut v = Vec::new();
        let result = SubscribeResult {
            recoverable: true,
            epoch: Some("e".into()),
            offset: Some(4),
            expires: true,
            ttl: 9,
            data: Some(RawValue::from_string("{\"a\":1}".into()).unwrap()),
            ..Default::default()
        };
        subscribe_push(&mut v, "c:1", &result);
        assert_eq!(
            String::from_utf8(v).unwrap(),
            r#"{"push":{"channel":"c:1","subscribe":{"recoverable":true,"epoch":"e","offset":4,"positioned":true,"data":{"a":1}}}}"#
        );
        let mut v = Vec::new();
        subscribe_push(&mut v, "c", &SubscribeResult::default());
        assert_eq!(v, br#"{"push":{"channel":"c","subscribe":{}}}"#);
        let mut v = Vec::new();
        refresh_push(&mut v, 60);
        assert_eq!(v, br#"{"push":{"refresh":{"expires":true,"ttl":60}}}"#);
        let mut v = Vec::new();
        refresh_push(&mut v, 0);
        assert_eq!(v, br#"{"push":{"refresh":{}}}"#);
    }
}
