//! The wire form of a publication, built in one place: the publication object
//! (`{"data":D[,"info":I][,"tags":T][,"offset":N]}`) and the push that carries it to a
//! subscriber (`{"push":{"channel":C,"pub":OBJECT}}`). A binary payload published through the
//! server API's `b64data` (bytes that are not JSON text) is carried as `"b64data":"BASE64"` in
//! place of `"data"` (see [`Extras`]).
//!
//! Pure byte assembly into a caller's buffer (which may be a [`crate::ws::FrameBuf`]'s
//! payload, so a publication is framed in place); no I/O, no allocation of its own beyond the
//! JSON escaping of a channel name or client info. Run by whichever thread encodes a
//! publication: the standalone broker, the Redis multiplexer, the tracker's repairs. The Redis
//! publish script completes an open object the same way (`OPEN .. ',"offset":' .. N .. '}'`,
//! then `PREFIX .. OBJECT .. '}}'`); a unit test here pins the bytes both produce.
//!
//! Must never change its output: nodes of different versions share one Redis, and history
//! written by one is replayed by another.

use super::reply::ClientInfo;
use serde_json::value::RawValue;
use std::ops::Range;

/// Closes a push around a complete publication object.
pub const PUSH_CLOSE: &[u8] = b"}}";

/// The text that puts an offset into an open publication object (`open` + this + N + `}`).
const OFFSET_FIELD: &[u8] = b",\"offset\":";

/// What a publication from the server API may carry besides data and info. Boxed in
/// `ToBroker::Publish` (`None` for client publications, which have none of it).
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// `data` is a JSON string holding standard base64 of binary bytes (not JSON text): the
    /// object says `"b64data"` instead of `"data"`. JSON clients get it as is; the protobuf
    /// encoder puts the decoded bytes into `Publication.data`.
    pub binary: bool,
    /// The publication's tags, a JSON object of strings (`"tags"`), never empty.
    pub tags: Option<Box<RawValue>>,
    /// Not kept in history: published without an offset, as in a channel without history.
    pub skip_history: bool,
}

/// Appends an open publication object `{"data":D[,"info":I][,"tags":T]` (no closing brace):
/// the form the Redis publish script completes once it knows the offset.
pub fn open(
    out: &mut Vec<u8>,
    data: &RawValue,
    info: Option<&ClientInfo>,
    extras: Option<&Extras>,
) {
    if extras.is_some_and(|e| e.binary) {
        out.extend_from_slice(b"{\"b64data\":");
    } else {
        out.extend_from_slice(b"{\"data\":");
    }
    out.extend_from_slice(data.get().as_bytes());
    if let Some(info) = info {
        out.extend_from_slice(b",\"info\":");
        serde_json::to_writer(&mut *out, info).expect("vec write");
    }
    if let Some(tags) = extras.and_then(|e| e.tags.as_deref()) {
        out.extend_from_slice(b",\"tags\":");
        out.extend_from_slice(tags.get().as_bytes());
    }
}

/// Appends a complete publication object; `offset` in a history channel.
pub fn object(
    out: &mut Vec<u8>,
    data: &RawValue,
    info: Option<&ClientInfo>,
    extras: Option<&Extras>,
    offset: Option<u64>,
) {
    open(out, data, info, extras);
    if let Some(offset) = offset {
        out.extend_from_slice(OFFSET_FIELD);
        out.extend_from_slice(itoa::Buffer::new().format(offset).as_bytes());
    }
    out.push(b'}');
}

/// Appends the start of a push, `{"push":{"channel":C,"pub":`.
pub fn push_prefix(out: &mut Vec<u8>, channel: &str) {
    out.extend_from_slice(b"{\"push\":{\"channel\":");
    serde_json::to_writer(&mut *out, channel).expect("vec write");
    out.extend_from_slice(b",\"pub\":");
}

/// Appends the push of a complete publication object.
pub fn push(out: &mut Vec<u8>, channel: &str, object: &[u8]) {
    push_prefix(out, channel);
    out.extend_from_slice(object);
    out.extend_from_slice(PUSH_CLOSE);
}

/// Appends the push of a publication without offset (a channel without history).
pub fn push_new(
    out: &mut Vec<u8>,
    channel: &str,
    data: &RawValue,
    info: Option<&ClientInfo>,
    extras: Option<&Extras>,
) {
    push_prefix(out, channel);
    open(out, data, info, extras);
    out.push(b'}');
    out.extend_from_slice(PUSH_CLOSE);
}

/// Where the publication object is inside `push`, a push of `channel`; `None` when `push` is
/// not one.
pub fn object_in_push(channel: &str, push: &[u8]) -> Option<Range<usize>> {
    let mut prefix = Vec::with_capacity(channel.len() + 32);
    push_prefix(&mut prefix, channel);
    if !push.starts_with(&prefix) || push.len() < prefix.len() + PUSH_CLOSE.len() {
        return None;
    }
    Some(prefix.len()..push.len() - PUSH_CLOSE.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publication_push_is_valid_json() {
        let mut v = Vec::new();
        let data = RawValue::from_string("{\"n\":1}".into()).unwrap();
        let info = ClientInfo {
            user: "u\"1".into(),
            client: "c".into(),
            conn_info: None,
            chan_info: None,
        };
        push_new(&mut v, "chat:a\"b", &data, Some(&info), None);
        let p: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(p["push"]["channel"], "chat:a\"b");
        assert_eq!(p["push"]["pub"]["data"]["n"], 1);
        assert_eq!(p["push"]["pub"]["info"]["user"], "u\"1");
    }

    fn data() -> Box<RawValue> {
        RawValue::from_string("{\"n\":1}".into()).unwrap()
    }

    fn info() -> ClientInfo {
        ClientInfo {
            user: "u\"1".into(),
            client: "c".into(),
            conn_info: None,
            chan_info: None,
        }
    }

    fn tagged() -> Extras {
        Extras {
            tags: Some(RawValue::from_string(r#"{"k":"v"}"#.into()).unwrap()),
            ..Default::default()
        }
    }

    fn text(v: Vec<u8>) -> String {
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn publication_bytes_are_pinned() {
        let mut v = Vec::new();
        object(&mut v, &data(), None, None, None);
        assert_eq!(text(v), r#"{"data":{"n":1}}"#);
        let mut v = Vec::new();
        object(&mut v, &data(), Some(&info()), None, Some(0));
        assert_eq!(
            text(v),
            r#"{"data":{"n":1},"info":{"user":"u\"1","client":"c"},"offset":0}"#
        );
        let mut v = Vec::new();
        object(
            &mut v,
            &data(),
            None,
            None,
            Some(18_446_744_073_709_551_615),
        );
        assert_eq!(text(v), r#"{"data":{"n":1},"offset":18446744073709551615}"#);
        let mut v = Vec::new();
        push_new(&mut v, "chat:a\"b", &data(), Some(&info()), None);
        assert_eq!(
            text(v),
            r#"{"push":{"channel":"chat:a\"b","pub":{"data":{"n":1},"info":{"user":"u\"1","client":"c"}}}}"#
        );
        // Tags after info, before the offset; binary data in place of data.
        let mut v = Vec::new();
        object(&mut v, &data(), Some(&info()), Some(&tagged()), Some(3));
        assert_eq!(
            text(v),
            r#"{"data":{"n":1},"info":{"user":"u\"1","client":"c"},"tags":{"k":"v"},"offset":3}"#
        );
        let mut v = Vec::new();
        let b64 = RawValue::from_string(r#""AAE=""#.into()).unwrap();
        let binary = Extras {
            binary: true,
            ..tagged()
        };
        object(&mut v, &b64, None, Some(&binary), None);
        assert_eq!(text(v), r#"{"b64data":"AAE=","tags":{"k":"v"}}"#);
        let mut v = Vec::new();
        push(&mut v, "h:1", br#"{"data":2,"offset":7}"#);
        assert_eq!(
            text(v),
            r#"{"push":{"channel":"h:1","pub":{"data":2,"offset":7}}}"#
        );
    }

    #[test]
    fn the_publish_script_assembly_gives_the_same_bytes() {
        // What the Redis publish script does with the open object and the push prefix.
        let (mut open_pub, mut prefix) = (Vec::new(), Vec::new());
        open(&mut open_pub, &data(), Some(&info()), Some(&tagged()));
        push_prefix(&mut prefix, "h:1");
        let lua_pub = [&open_pub[..], b",\"offset\":", b"42", b"}"].concat();
        let lua_push = [&prefix[..], &lua_pub, b"}}"].concat();
        let lua_plain = [&prefix[..], &open_pub, b"}}}"].concat();
        let mut ours = Vec::new();
        object(&mut ours, &data(), Some(&info()), Some(&tagged()), Some(42));
        assert_eq!(ours, lua_pub);
        let mut p = Vec::new();
        push(&mut p, "h:1", &ours);
        assert_eq!(p, lua_push);
        let mut p = Vec::new();
        push_new(&mut p, "h:1", &data(), Some(&info()), Some(&tagged()));
        assert_eq!(p, lua_plain);
        assert_eq!(
            object_in_push("h:1", &lua_push),
            Some(prefix.len()..lua_push.len() - 2)
        );
        assert_eq!(
            &lua_push[object_in_push("h:1", &lua_push).unwrap()],
            &ours[..]
        );
        assert_eq!(object_in_push("h:2", &lua_push), None, "another channel");
        assert_eq!(object_in_push("h:1", &prefix), None, "truncated");
    }
}
