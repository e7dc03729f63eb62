//! The protocol's protobuf form (`centrifuge-protobuf` subprotocol), as a pair of transcoders
//! at the edges of a JSON session: pure functions, no I/O, no shard state.
//!
//! shardcast's sessions, brokers and history speak the JSON protocol only. A protobuf
//! connection is converted where it meets the network:
//! - inbound, [`commands_to_json`] turns a binary frame (one or more varint-length-delimited
//!   [`pb::Command`]s) into the JSON command lines the session already handles;
//! - outbound, [`replies_from_json`] turns what a session wrote (JSON replies and pushes, one
//!   per line) into varint-delimited [`pb::Reply`]s, and [`binary_twin`] does the same for a
//!   complete shared text frame (a publication encoded once, then its protobuf twin once).
//!
//! Payloads: the JSON protocol carries `data`, `info`, `conn_info` and `chan_info` as raw JSON
//! values, protobuf as `bytes`. Outbound, the bytes are the JSON text of the value (a
//! publication stored as `"b64data"`, a binary payload, gets its decoded bytes). Inbound, a
//! command's `bytes` payload must hold JSON text: otherwise that command alone is answered with
//! error 107 (bad request), since the session has no way to carry binary data.
//!
//! The generated message types are [`pb`] (from `src/protocol/client.proto`, by `src/build.rs`).

use super::pb;
use bytes::Bytes;
use prost::Message as _;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::fmt::Write as _;

/// The server's ping on a protobuf connection: one empty [`pb::Reply`] (length 0).
pub const PING: &[u8] = &[0];

/// A binary frame that is not a sequence of well-formed varint-delimited commands (or holds
/// none): the connection is closed with 3501 (bad request), as Centrifugo does.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed protobuf command frame: {0}")]
pub struct Malformed(pub &'static str);

/// A JSON reply or push the transcoder could not map onto [`pb::Reply`] (a bug: the session
/// wrote a shape the schema does not have). The connection is closed as a server error.
#[derive(Debug, thiserror::Error)]
#[error("reply not representable in protobuf: {0}")]
pub struct Untranslatable(#[from] serde_json::Error);

// ---------------------------------------------------------------------------------------------
// Inbound: protobuf commands → JSON command lines.

/// Decodes every varint-delimited [`pb::Command`] of a binary frame and appends each as one
/// JSON command line (lines separated by `\n`) to `out`.
pub fn commands_to_json(mut frame: &[u8], out: &mut String) -> Result<(), Malformed> {
    if frame.is_empty() {
        return Err(Malformed("empty frame"));
    }
    while !frame.is_empty() {
        let len = prost::encoding::decode_varint(&mut frame)
            .map_err(|_| Malformed("bad length prefix"))?;
        let len = usize::try_from(len).map_err(|_| Malformed("length too large"))?;
        if len > frame.len() {
            return Err(Malformed("length beyond the frame"));
        }
        let (body, rest) = frame.split_at(len);
        frame = rest;
        let cmd = pb::Command::decode(body).map_err(|_| Malformed("undecodable command"))?;
        if !out.is_empty() {
            out.push('\n');
        }
        command_json(&cmd, out);
    }
    Ok(())
}

/// One command as the JSON line the session parses. Only the first request present is written
/// (the JSON envelope reads them in the same order). A request whose payload is not JSON text
/// becomes `{"id":N,"METHOD":0}`, which the session answers with error 107 for that id.
pub fn command_json(cmd: &pb::Command, out: &mut String) {
    let start = out.len();
    let mut o = Obj::open(out);
    if cmd.id != 0 {
        o.num("id", cmd.id);
    }
    let written = if let Some(r) = &cmd.connect {
        o.key("connect");
        connect_request(o.out, r)
    } else if let Some(r) = &cmd.subscribe {
        o.key("subscribe");
        subscribe_request(o.out, r)
    } else if let Some(r) = &cmd.unsubscribe {
        o.key("unsubscribe");
        channel_only(o.out, &r.channel)
    } else if let Some(r) = &cmd.publish {
        o.key("publish");
        let mut p = Obj::open(o.out);
        p.str("channel", &r.channel);
        let ok = p.json("data", &r.data);
        p.str("key", &r.key);
        p.num("type", r.r#type);
        p.flag("removed", r.removed);
        p.close();
        ok
    } else if let Some(r) = &cmd.presence {
        o.key("presence");
        channel_only(o.out, &r.channel)
    } else if let Some(r) = &cmd.presence_stats {
        o.key("presence_stats");
        channel_only(o.out, &r.channel)
    } else if let Some(r) = &cmd.history {
        o.key("history");
        let mut h = Obj::open(o.out);
        h.str("channel", &r.channel);
        h.num("limit", r.limit);
        if let Some(since) = &r.since {
            h.key("since");
            let mut s = Obj::open(h.out);
            s.num("offset", since.offset);
            s.str("epoch", &since.epoch);
            s.close();
        }
        h.flag("reverse", r.reverse);
        h.close();
        true
    } else if cmd.ping.is_some() {
        o.key("ping");
        o.out.push_str("{}");
        true
    } else if let Some(r) = &cmd.send {
        o.key("send");
        let mut s = Obj::open(o.out);
        let ok = s.json("data", &r.data);
        s.close();
        ok
    } else if let Some(r) = &cmd.rpc {
        o.key("rpc");
        let mut s = Obj::open(o.out);
        s.str("method", &r.method);
        let ok = s.json("data", &r.data);
        s.close();
        ok
    } else if let Some(r) = &cmd.refresh {
        o.key("refresh");
        let mut s = Obj::open(o.out);
        s.str("token", &r.token);
        s.close();
        true
    } else if let Some(r) = &cmd.sub_refresh {
        o.key("sub_refresh");
        let mut s = Obj::open(o.out);
        s.str("channel", &r.channel);
        s.str("token", &r.token);
        s.num("type", r.r#type);
        s.close();
        true
    } else {
        true // `{}` is a pong; `{"id":N}` alone is answered "method not found"
    };
    o.close();
    if !written {
        let method = bad_method(cmd);
        out.truncate(start);
        let _ = write!(out, "{{\"id\":{},\"{method}\":0}}", cmd.id);
    }
}

fn bad_method(cmd: &pb::Command) -> &'static str {
    if cmd.connect.is_some() {
        "connect"
    } else if cmd.subscribe.is_some() {
        "subscribe"
    } else if cmd.publish.is_some() {
        "publish"
    } else if cmd.send.is_some() {
        "send"
    } else {
        "rpc"
    }
}

fn channel_only(out: &mut String, channel: &str) -> bool {
    let mut o = Obj::open(out);
    o.str("channel", channel);
    o.close();
    true
}

fn connect_request(out: &mut String, r: &pb::ConnectRequest) -> bool {
    let mut o = Obj::open(out);
    o.str("token", &r.token);
    let mut ok = o.json("data", &r.data);
    o.str("name", &r.name);
    o.str("version", &r.version);
    o.num("flag", r.flag);
    if !r.subs.is_empty() {
        o.key("subs");
        let mut subs = Obj::open(o.out);
        for (channel, sub) in &r.subs {
            subs.key(channel);
            ok &= subscribe_request(subs.out, sub);
        }
        subs.close();
    }
    if !r.headers.is_empty() {
        o.key("headers");
        let mut h = Obj::open(o.out);
        for (k, v) in &r.headers {
            h.key(k);
            push_json_str(h.out, v);
        }
        h.close();
    }
    o.close();
    ok
}

fn subscribe_request(out: &mut String, r: &pb::SubscribeRequest) -> bool {
    let mut o = Obj::open(out);
    o.str("channel", &r.channel);
    o.str("token", &r.token);
    o.flag("recover", r.recover);
    o.str("epoch", &r.epoch);
    o.num("offset", r.offset);
    let ok = o.json("data", &r.data);
    o.flag("positioned", r.positioned);
    o.flag("recoverable", r.recoverable);
    o.flag("join_leave", r.join_leave);
    o.str("delta", &r.delta);
    o.num("flag", r.flag);
    o.num("type", r.r#type);
    o.num("phase", r.phase);
    o.str("cursor", &r.cursor);
    o.num("limit", r.limit);
    o.flag("asc", r.asc);
    if let Some(tf) = &r.tf {
        o.key("tf");
        filter_node(o.out, tf, 0);
    }
    o.close();
    ok
}

/// Tag filters nest; deeper than this is cut (the session does not evaluate them).
const MAX_FILTER_DEPTH: usize = 32;

fn filter_node(out: &mut String, n: &pb::FilterNode, depth: usize) {
    let mut o = Obj::open(out);
    o.str("op", &n.op);
    o.str("key", &n.key);
    o.str("cmp", &n.cmp);
    o.str("val", &n.val);
    if !n.vals.is_empty() {
        o.key("vals");
        o.out.push('[');
        for (i, v) in n.vals.iter().enumerate() {
            if i > 0 {
                o.out.push(',');
            }
            push_json_str(o.out, v);
        }
        o.out.push(']');
    }
    if !n.nodes.is_empty() && depth < MAX_FILTER_DEPTH {
        o.key("nodes");
        o.out.push('[');
        for (i, c) in n.nodes.iter().enumerate() {
            if i > 0 {
                o.out.push(',');
            }
            filter_node(o.out, c, depth + 1);
        }
        o.out.push(']');
    }
    o.close();
}

/// A JSON object being written; fields holding their type's default are left out, as proto3
/// does not tell them from absent ones.
struct Obj<'a> {
    out: &'a mut String,
    first: bool,
}

impl<'a> Obj<'a> {
    fn open(out: &'a mut String) -> Self {
        out.push('{');
        Obj { out, first: true }
    }
    fn key(&mut self, k: &str) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        push_json_str(self.out, k);
        self.out.push(':');
    }
    fn str(&mut self, k: &str, v: &str) {
        if !v.is_empty() {
            self.key(k);
            push_json_str(self.out, v);
        }
    }
    fn num<N: PartialEq + Default + std::fmt::Display>(&mut self, k: &str, v: N) {
        if v != N::default() {
            self.key(k);
            let _ = write!(self.out, "{v}");
        }
    }
    fn flag(&mut self, k: &str, v: bool) {
        if v {
            self.key(k);
            self.out.push_str("true");
        }
    }
    /// A `bytes` payload as a raw JSON value; false when it is not JSON text.
    fn json(&mut self, k: &str, v: &[u8]) -> bool {
        if v.is_empty() {
            return true;
        }
        let Ok(raw) = serde_json::from_slice::<&RawValue>(v) else {
            return false;
        };
        self.key(k);
        // The session splits a message into lines: line breaks between JSON tokens become
        // spaces (inside strings JSON only allows them escaped, so nothing else changes).
        self.out.extend(
            raw.get()
                .chars()
                .map(|c| if c == '\n' || c == '\r' { ' ' } else { c }),
        );
        true
    }
    fn close(self) {
        self.out.push('}');
    }
}

fn push_json_str(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).expect("a string serializes"));
}

// ---------------------------------------------------------------------------------------------
// Outbound: JSON replies and pushes → protobuf replies.

/// Transcodes what a session wrote (JSON replies/pushes, one per line) into varint-delimited
/// [`pb::Reply`]s appended to `out`. `{}` (the ping) becomes an empty reply.
pub fn replies_from_json(json: &[u8], out: &mut Vec<u8>) -> Result<(), Untranslatable> {
    for line in json.split(|&b| b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let reply: pb::Reply = serde_json::from_slice(line)?;
        reply
            .encode_length_delimited(out)
            .expect("a Vec grows as needed");
    }
    Ok(())
}

/// The length (header and payload) of the first frame in `buf`, a server frame we built.
pub fn first_frame_len(buf: &[u8]) -> Option<usize> {
    let b1 = *buf.get(1)?;
    let (header, len) = match b1 & 0x7f {
        126 => (
            4usize,
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
        ),
        127 => (
            10,
            usize::try_from(u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)).ok()?,
        ),
        n => (2, n as usize),
    };
    header.checked_add(len)
}

/// The payload of a complete server frame we built (unmasked; header per RFC 6455 §5.2), with
/// its opcode. `None` for anything else.
pub fn frame_payload(frame: &[u8]) -> Option<(u8, &[u8])> {
    let (&b0, rest) = frame.split_first()?;
    let (&b1, rest) = rest.split_first()?;
    if b1 & 0x80 != 0 {
        return None; // masked: not one of ours
    }
    let (len, rest) = match b1 & 0x7f {
        126 => (
            u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize,
            &rest[2..],
        ),
        127 => (
            u64::from_be_bytes(rest.get(..8)?.try_into().ok()?) as usize,
            &rest[8..],
        ),
        n => (n as usize, rest),
    };
    (rest.len() == len).then_some((b0 & 0x0f, rest))
}

/// The protobuf twin of a complete JSON text frame (a shared publication or push): a binary
/// frame holding the same replies. `Ok(None)` for a frame that is not a text frame (a close
/// frame goes out as it is).
pub fn binary_twin(text_frame: &[u8]) -> Result<Option<Bytes>, Untranslatable> {
    let Some((crate::ws::OP_TEXT, json)) = frame_payload(text_frame) else {
        return Ok(None);
    };
    let mut f = crate::ws::FrameBuf::with_capacity(json.len());
    replies_from_json(json, f.payload())?;
    Ok(Some(f.finish(crate::ws::OP_BINARY)))
}

/// `bytes` payload fields: the raw JSON value's text (serde `deserialize_with`, named by the
/// generated types).
pub fn json_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let raw: Box<RawValue> = Deserialize::deserialize(d)?;
    Ok(raw.get().as_bytes().to_vec())
}

/// The JSON form of a publication: `data` is a JSON value, or `b64data` the standard base64
/// of binary data (published through the API for protobuf clients).
#[derive(Deserialize, Default)]
#[serde(default)]
struct PublicationJson {
    data: Option<Box<RawValue>>,
    b64data: Option<String>,
    info: Option<pb::ClientInfo>,
    offset: u64,
    tags: HashMap<String, String>,
    delta: bool,
    time: i64,
    channel: String,
    key: String,
    removed: bool,
    score: i64,
    epoch: String,
    prev_data: Option<Box<RawValue>>,
    version: u64,
}

impl<'de> Deserialize<'de> for pb::Publication {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine as _;
        let j = PublicationJson::deserialize(d)?;
        let data = match (j.data, j.b64data) {
            (Some(raw), _) => raw.get().as_bytes().to_vec(),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(serde::de::Error::custom)?,
            (None, None) => Vec::new(),
        };
        Ok(pb::Publication {
            data,
            info: j.info,
            offset: j.offset,
            tags: j.tags,
            delta: j.delta,
            time: j.time,
            channel: j.channel,
            key: j.key,
            removed: j.removed,
            score: j.score,
            epoch: j.epoch,
            prev_data: j
                .prev_data
                .map(|r| r.get().as_bytes().to_vec())
                .unwrap_or_default(),
            version: j.version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delimited(cmds: &[pb::Command]) -> Vec<u8> {
        let mut v = Vec::new();
        for c in cmds {
            c.encode_length_delimited(&mut v).unwrap();
        }
        v
    }

    fn decode_replies(mut buf: &[u8]) -> Vec<pb::Reply> {
        let mut out = Vec::new();
        while !buf.is_empty() {
            out.push(pb::Reply::decode_length_delimited(&mut buf).unwrap());
        }
        out
    }

    fn lines(frame: &[u8]) -> Vec<serde_json::Value> {
        let mut s = String::new();
        commands_to_json(frame, &mut s).unwrap();
        s.split('\n')
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn commands_become_the_json_lines_the_session_parses() {
        let frame = delimited(&[
            pb::Command {
                id: 1,
                connect: Some(pb::ConnectRequest {
                    token: "tok".into(),
                    data: br#"{"a":1}"#.to_vec(),
                    name: "js".into(),
                    subs: [(
                        "news".to_string(),
                        pb::SubscribeRequest {
                            recover: true,
                            offset: 7,
                            epoch: "e".into(),
                            ..Default::default()
                        },
                    )]
                    .into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            pb::Command {
                id: 2,
                subscribe: Some(pb::SubscribeRequest {
                    channel: "chat:1".into(),
                    recover: true,
                    offset: 42,
                    epoch: "xyz".into(),
                    join_leave: true,
                    ..Default::default()
                }),
                ..Default::default()
            },
            pb::Command {
                id: 3,
                publish: Some(pb::PublishRequest {
                    channel: "chat:1".into(),
                    data: b"{\n  \"text\": \"hi\\nthere\"\n}".to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            pb::Command {
                id: 4,
                history: Some(pb::HistoryRequest {
                    channel: "chat:1".into(),
                    limit: -1,
                    since: Some(pb::StreamPosition {
                        offset: 3,
                        epoch: "xyz".into(),
                    }),
                    reverse: true,
                }),
                ..Default::default()
            },
            pb::Command::default(),
        ]);
        let l = lines(&frame);
        assert_eq!(
            l[0],
            serde_json::json!({"id":1,"connect":{"token":"tok","data":{"a":1},"name":"js",
                "subs":{"news":{"recover":true,"epoch":"e","offset":7}}}})
        );
        assert_eq!(
            l[1],
            serde_json::json!({"id":2,"subscribe":{"channel":"chat:1","recover":true,
                "epoch":"xyz","offset":42,"join_leave":true}})
        );
        assert_eq!(
            l[2],
            serde_json::json!({"id":3,"publish":{"channel":"chat:1","data":{"text":"hi\nthere"}}})
        );
        assert_eq!(
            l[3],
            serde_json::json!({"id":4,"history":{"channel":"chat:1","limit":-1,
                "since":{"offset":3,"epoch":"xyz"},"reverse":true}})
        );
        assert_eq!(l[4], serde_json::json!({}), "an empty command is the pong");
        // Each is one line the session's parser takes.
        let mut s = String::new();
        commands_to_json(&frame, &mut s).unwrap();
        for line in s.split('\n') {
            crate::protocol::command::parse_line(line).unwrap();
        }
    }

    #[test]
    fn a_payload_that_is_not_json_is_answered_107_for_that_command_only() {
        let frame = delimited(&[
            pb::Command {
                id: 9,
                publish: Some(pb::PublishRequest {
                    channel: "c".into(),
                    data: vec![0xff, 0x00, 0x01],
                    ..Default::default()
                }),
                ..Default::default()
            },
            pb::Command {
                id: 10,
                presence: Some(pb::PresenceRequest {
                    channel: "c".into(),
                }),
                ..Default::default()
            },
        ]);
        let mut s = String::new();
        commands_to_json(&frame, &mut s).unwrap();
        let mut it = s.split('\n');
        match crate::protocol::command::parse_line(it.next().unwrap()).unwrap() {
            crate::protocol::command::Line::Invalid { id: 9, error } => {
                assert_eq!(error, crate::protocol::ErrorCode::BadRequest)
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            crate::protocol::command::parse_line(it.next().unwrap()).unwrap(),
            crate::protocol::command::Line::Command { id: 10, .. }
        ));
    }

    #[test]
    fn malformed_frames_are_refused() {
        let mut s = String::new();
        assert_eq!(commands_to_json(&[], &mut s), Err(Malformed("empty frame")));
        // Length says 5, 2 bytes follow.
        assert!(commands_to_json(&[5, 1, 2], &mut s).is_err());
        // A length prefix that never ends.
        assert!(commands_to_json(&[0xff; 11], &mut s).is_err());
        // A body that is not a Command (field 1 declared as a 10-byte length-delimited field).
        assert!(commands_to_json(&[2, 0x0a, 0x0a], &mut s).is_err());
        // Arbitrary bytes never panic.
        for seed in 0u32..2000 {
            let mut bytes = Vec::new();
            let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
            for _ in 0..(seed % 40) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                bytes.push(x as u8);
            }
            let mut s = String::new();
            let _ = commands_to_json(&bytes, &mut s);
        }
    }

    #[test]
    fn replies_become_protobuf_with_json_payloads_as_bytes() {
        let json = concat!(
            r#"{"id":1,"connect":{"client":"c1","version":"0.1","ping":25,"pong":true,"subs":{"s":{"recoverable":true,"epoch":"e","offset":3}}}}"#,
            "\n",
            r#"{"id":2,"subscribe":{"recoverable":true,"positioned":true,"epoch":"e","offset":5,"was_recovering":true,"recovered":true,"publications":[{"data":{"n":1},"offset":4,"info":{"user":"u","client":"c","conn_info":{"k":"v"}}},{"data":"s","offset":5,"tags":{"t":"1"}}]}}"#,
            "\n",
            r#"{"push":{"channel":"ch","pub":{"data":[1,2],"offset":9}}}"#,
            "\n",
            r#"{"id":3,"error":{"code":103,"message":"permission denied","temporary":true}}"#,
            "\n",
            r#"{"id":4,"presence":{"presence":{"c":{"user":"u","client":"c","chan_info":{"r":1}}}}}"#,
            "\n",
            r#"{"push":{"channel":"ch","unsubscribe":{"code":2000,"reason":"server unsubscribe"}}}"#,
            "\n",
            r#"{"push":{"channel":"ch","join":{"info":{"user":"u","client":"c"}}}}"#,
            "\n{}"
        );
        let mut out = Vec::new();
        replies_from_json(json.as_bytes(), &mut out).unwrap();
        let r = decode_replies(&out);
        assert_eq!(r.len(), 8);
        let c = r[0].connect.as_ref().unwrap();
        assert_eq!(
            (r[0].id, c.client.as_str(), c.ping, c.pong),
            (1, "c1", 25, true)
        );
        assert_eq!(c.subs["s"].offset, 3);
        let s = r[1].subscribe.as_ref().unwrap();
        assert!(s.recoverable && s.positioned && s.recovered && s.was_recovering);
        assert_eq!(s.publications.len(), 2);
        assert_eq!(s.publications[0].data, br#"{"n":1}"#);
        let info = s.publications[0].info.as_ref().unwrap();
        assert_eq!(info.conn_info, br#"{"k":"v"}"#);
        assert_eq!(s.publications[1].data, br#""s""#);
        assert_eq!(s.publications[1].tags["t"], "1");
        let p = r[2].push.as_ref().unwrap();
        assert_eq!(p.channel, "ch");
        assert_eq!(p.r#pub.as_ref().unwrap().data, b"[1,2]");
        assert_eq!(p.r#pub.as_ref().unwrap().offset, 9);
        let e = r[3].error.as_ref().unwrap();
        assert_eq!((r[3].id, e.code, e.temporary), (3, 103, true));
        let pr = r[4].presence.as_ref().unwrap();
        assert_eq!(pr.presence["c"].chan_info, br#"{"r":1}"#);
        let u = r[5].push.as_ref().unwrap().unsubscribe.as_ref().unwrap();
        assert_eq!((u.code, u.reason.as_str()), (2000, "server unsubscribe"));
        assert_eq!(
            r[6].push
                .as_ref()
                .unwrap()
                .join
                .as_ref()
                .unwrap()
                .info
                .as_ref()
                .unwrap()
                .user,
            "u"
        );
        assert_eq!(r[7], pb::Reply::default(), "{{}} is the ping");
        // The ping alone is one zero byte.
        let mut ping = Vec::new();
        replies_from_json(b"{}", &mut ping).unwrap();
        assert_eq!(ping, PING);
    }

    #[test]
    fn binary_publications_decode_their_base64() {
        let mut out = Vec::new();
        replies_from_json(
            br#"{"push":{"channel":"b","pub":{"b64data":"AAEC/w==","offset":2}}}"#,
            &mut out,
        )
        .unwrap();
        let r = decode_replies(&out);
        let p = r[0].push.as_ref().unwrap().r#pub.as_ref().unwrap();
        assert_eq!(p.data, [0, 1, 2, 255]);
        assert_eq!(p.offset, 2);
    }

    #[test]
    fn a_shared_text_frame_gets_its_binary_twin() {
        for size in [10usize, 200, 70_000] {
            let data = format!("\"{}\"", "x".repeat(size));
            let json = format!(r#"{{"push":{{"channel":"c","pub":{{"data":{data}}}}}}}"#);
            let text = crate::ws::text_frame(json.as_bytes());
            let twin = binary_twin(&text).unwrap().unwrap();
            let (op, payload) = frame_payload(&twin).unwrap();
            assert_eq!(op, crate::ws::OP_BINARY);
            let r = decode_replies(payload);
            assert_eq!(
                r[0].push.as_ref().unwrap().r#pub.as_ref().unwrap().data,
                data.as_bytes()
            );
        }
        let close = crate::ws::close_frame(3000, "x");
        assert!(binary_twin(&close).unwrap().is_none());
        assert!(replies_from_json(br#"{"id":"not a number"}"#, &mut Vec::new()).is_err());
    }
}
