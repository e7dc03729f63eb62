//! Outbound JSON: replies to commands, pushes, and the server ping.
//!
//! Encoders write into a caller's `Vec<u8>` (which may start with reserved room for a
//! WebSocket header, see [`crate::ws::FrameBuf`]), so a publication is encoded once and
//! framed in place without another copy.

use super::ErrorCode;
use serde::Serialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// Who published or who is present: the protocol's `ClientInfo`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ClientInfo {
    pub user: String,
    pub client: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conn_info: Option<Box<RawValue>>,
}

/// `connect` result.
#[derive(Serialize)]
pub struct ConnectResult<'a> {
    pub client: &'a str,
    pub version: &'a str,
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero")]
    pub ttl: u32,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub subs: BTreeMap<&'a str, SubscribeResult>,
    pub ping: u32,
    pub pong: bool,
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

/// `subscribe` result (position fields come with history).
#[derive(Serialize, Default)]
pub struct SubscribeResult {
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

/// Appends a publication push: `{"push":{"channel":C,"pub":{"data":D[,"info":I]}}}`.
pub fn publication(out: &mut Vec<u8>, channel: &str, data: &RawValue, info: Option<&ClientInfo>) {
    out.extend_from_slice(b"{\"push\":{\"channel\":");
    serde_json::to_writer(&mut *out, channel).expect("vec write");
    out.extend_from_slice(b",\"pub\":{\"data\":");
    out.extend_from_slice(data.get().as_bytes());
    if let Some(info) = info {
        out.extend_from_slice(b",\"info\":");
        serde_json::to_writer(&mut *out, info).expect("vec write");
    }
    out.extend_from_slice(b"}}}");
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

fn itoa(n: u32) -> String {
    // Small and not on the fan-out path (publications carry no id).
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn publication_push_is_valid_json() {
        let mut v = Vec::new();
        let data = RawValue::from_string("{\"n\":1}".into()).unwrap();
        let info = ClientInfo {
            user: "u\"1".into(),
            client: "c".into(),
            conn_info: None,
        };
        publication(&mut v, "chat:a\"b", &data, Some(&info));
        let p: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(p["push"]["channel"], "chat:a\"b");
        assert_eq!(p["push"]["pub"]["data"]["n"], 1);
        assert_eq!(p["push"]["pub"]["info"]["user"], "u\"1");
    }

    #[test]
    fn connect_result_shape() {
        let mut v = Vec::new();
        let r = ConnectResult {
            client: "abc",
            version: "0.1.0",
            expires: false,
            ttl: 0,
            subs: BTreeMap::new(),
            ping: 25,
            pong: true,
        };
        result(&mut v, 1, "connect", &r);
        assert_eq!(
            std::str::from_utf8(&v).unwrap(),
            r#"{"id":1,"connect":{"client":"abc","version":"0.1.0","ping":25,"pong":true}}"#
        );
    }
}
