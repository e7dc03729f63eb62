//! Inbound commands: one JSON object per line of a text message.
//!
//! Parsing is two-step so that a command with a known `id` but a malformed body gets an error
//! reply (107) for that id instead of a disconnect: first the envelope (id + which request, as
//! raw JSON), then the request's own fields. Unknown fields are ignored, as the official SDKs
//! send extra ones (centrifuge-python's `flag` bits, for one). Strings borrow from the input
//! unless they contain escapes.

use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// The envelope: `id` plus at most one request field, kept raw.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default)]
    id: u32,
    #[serde(borrow, default)]
    connect: Option<&'a RawValue>,
    #[serde(borrow, default)]
    subscribe: Option<&'a RawValue>,
    #[serde(borrow, default)]
    unsubscribe: Option<&'a RawValue>,
    #[serde(borrow, default)]
    publish: Option<&'a RawValue>,
    #[serde(borrow, default)]
    presence: Option<&'a RawValue>,
    #[serde(borrow, default)]
    presence_stats: Option<&'a RawValue>,
    #[serde(borrow, default)]
    history: Option<&'a RawValue>,
    #[serde(borrow, default)]
    ping: Option<&'a RawValue>,
    #[serde(borrow, default)]
    send: Option<&'a RawValue>,
    #[serde(borrow, default)]
    rpc: Option<&'a RawValue>,
    #[serde(borrow, default)]
    refresh: Option<&'a RawValue>,
    #[serde(borrow, default)]
    sub_refresh: Option<&'a RawValue>,
}

/// `connect` request fields we use.
#[derive(Debug, Deserialize, Default)]
pub struct ConnectRequest<'a> {
    #[serde(borrow, default)]
    pub token: Cow<'a, str>,
    #[serde(borrow, default)]
    pub name: Cow<'a, str>,
    #[serde(borrow, default)]
    pub version: Cow<'a, str>,
    /// Custom data for the connect proxy (JSON).
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
    /// Server-side subscriptions to recover, by channel (sent by SDKs on reconnect).
    #[serde(default)]
    pub subs: std::collections::HashMap<String, ConnectSub>,
}

/// A server-side subscription's recovery request in `connect`.
#[derive(Debug, Deserialize, Default, Clone)]
pub struct ConnectSub {
    #[serde(default)]
    pub recover: bool,
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub epoch: String,
}

/// `subscribe` request fields we use.
#[derive(Debug, Deserialize)]
pub struct SubscribeRequest<'a> {
    #[serde(borrow)]
    pub channel: Cow<'a, str>,
    #[serde(borrow, default)]
    pub token: Cow<'a, str>,
    /// Recover what was missed since `offset` in `epoch`.
    #[serde(default)]
    pub recover: bool,
    #[serde(default)]
    pub offset: u64,
    #[serde(borrow, default)]
    pub epoch: Cow<'a, str>,
    /// Bit flags; [`FLAG_REJECT_UNRECOVERED`] asks for error 112 instead of a subscription
    /// that could not recover.
    #[serde(default)]
    pub flag: u64,
    /// Custom data for the subscribe proxy (JSON).
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
    /// Delta compression asked for (`"fossil"`). Not offered: as Centrifugo does for a type the
    /// namespace does not allow, the subscription is made without it (no `delta` in the
    /// reply), and a type Centrifugo does not know closes the connection (3501).
    #[serde(borrow, default)]
    pub delta: Cow<'a, str>,
    /// The subscriber wants join/leave pushes of the channel (honoured where the namespace
    /// has `join_leave`; the subscribe proxy's subscriptions get them only when the namespace
    /// forces them, as in Centrifugo).
    #[serde(default)]
    pub join_leave: bool,
}

/// The delta types of the protocol; shardcast allows none of them in any namespace.
pub const KNOWN_DELTA_TYPES: &[&str] = &["fossil"];

/// Subscribe flag: fail with 112 (unrecoverable position) rather than subscribe unrecovered.
pub const FLAG_REJECT_UNRECOVERED: u64 = 2;

/// A stream position: `offset` in `epoch`.
#[derive(Debug, Deserialize, Default, Clone)]
pub struct StreamPosition<'a> {
    #[serde(default)]
    pub offset: u64,
    #[serde(borrow, default)]
    pub epoch: Cow<'a, str>,
}

/// `history` (also the body of `/api/history`).
#[derive(Debug, Deserialize)]
pub struct HistoryRequest<'a> {
    #[serde(borrow)]
    pub channel: Cow<'a, str>,
    /// Publications to return: 0 = none (only the stream position), negative = all retained.
    #[serde(default)]
    pub limit: i64,
    /// Only publications after (or, with `reverse`, before) this position.
    #[serde(borrow, default)]
    pub since: Option<StreamPosition<'a>>,
    /// Newest first.
    #[serde(default)]
    pub reverse: bool,
}

/// Requests that only name a channel.
#[derive(Debug, Deserialize)]
pub struct ChannelRequest<'a> {
    #[serde(borrow)]
    pub channel: Cow<'a, str>,
}

/// `publish`.
#[derive(Debug, Deserialize)]
pub struct PublishRequest<'a> {
    #[serde(borrow)]
    pub channel: Cow<'a, str>,
    #[serde(borrow)]
    pub data: &'a RawValue,
}

/// `rpc`: a method name (may be empty) and custom data, both for the RPC proxy.
#[derive(Debug, Deserialize, Default)]
pub struct RpcRequest<'a> {
    #[serde(borrow, default)]
    pub method: Cow<'a, str>,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
}

/// `refresh` and `sub_refresh`.
#[derive(Debug, Deserialize)]
pub struct RefreshRequest<'a> {
    #[serde(borrow, default)]
    pub channel: Cow<'a, str>,
    #[serde(borrow, default)]
    pub token: Cow<'a, str>,
}

/// One decoded request.
#[derive(Debug)]
pub enum Request<'a> {
    Connect(ConnectRequest<'a>),
    Subscribe(SubscribeRequest<'a>),
    Unsubscribe(ChannelRequest<'a>),
    Publish(PublishRequest<'a>),
    Presence(ChannelRequest<'a>),
    PresenceStats(ChannelRequest<'a>),
    History(HistoryRequest<'a>),
    Ping,
    Send,
    Rpc(RpcRequest<'a>),
    Refresh(RefreshRequest<'a>),
    SubRefresh(RefreshRequest<'a>),
}

impl Request<'_> {
    /// The method name, which is also the field name of the matching reply.
    pub fn method(&self) -> &'static str {
        match self {
            Request::Connect(_) => "connect",
            Request::Subscribe(_) => "subscribe",
            Request::Unsubscribe(_) => "unsubscribe",
            Request::Publish(_) => "publish",
            Request::Presence(_) => "presence",
            Request::PresenceStats(_) => "presence_stats",
            Request::History(_) => "history",
            Request::Ping => "ping",
            Request::Send => "send",
            Request::Rpc(_) => "rpc",
            Request::Refresh(_) => "refresh",
            Request::SubRefresh(_) => "sub_refresh",
        }
    }
}

/// What one line of input is.
#[derive(Debug)]
pub enum Line<'a> {
    /// `{}`: the client's answer to a server ping.
    Pong,
    /// A well-formed command.
    Command { id: u32, request: Request<'a> },
    /// A command whose envelope parsed but whose request is unusable: reply this error to `id`.
    Invalid { id: u32, error: super::ErrorCode },
}

/// The line is not a JSON command object at all; the protocol answers with 3501 bad request.
#[derive(Debug, PartialEq, Eq)]
pub struct NotACommand;

fn body<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> Option<T> {
    serde_json::from_str(raw.get()).ok()
}

/// Parses one line (one JSON object).
pub fn parse_line(line: &str) -> Result<Line<'_>, NotACommand> {
    // A command is a JSON object; serde would also accept an array for a struct.
    if !line.trim_start().starts_with('{') {
        return Err(NotACommand);
    }
    let env: Envelope<'_> = serde_json::from_str(line).map_err(|_| NotACommand)?;
    let id = env.id;
    let bad = |id| Line::Invalid {
        id,
        error: super::ErrorCode::BadRequest,
    };
    macro_rules! req {
        ($raw:expr, $variant:path) => {
            match body($raw) {
                Some(r) => $variant(r),
                None => return Ok(bad(id)),
            }
        };
    }
    let request = if let Some(raw) = env.connect {
        req!(raw, Request::Connect)
    } else if let Some(raw) = env.subscribe {
        req!(raw, Request::Subscribe)
    } else if let Some(raw) = env.unsubscribe {
        req!(raw, Request::Unsubscribe)
    } else if let Some(raw) = env.publish {
        req!(raw, Request::Publish)
    } else if let Some(raw) = env.presence {
        req!(raw, Request::Presence)
    } else if let Some(raw) = env.presence_stats {
        req!(raw, Request::PresenceStats)
    } else if let Some(raw) = env.history {
        req!(raw, Request::History)
    } else if env.ping.is_some() {
        Request::Ping
    } else if env.send.is_some() {
        Request::Send
    } else if let Some(raw) = env.rpc {
        req!(raw, Request::Rpc)
    } else if let Some(raw) = env.refresh {
        req!(raw, Request::Refresh)
    } else if let Some(raw) = env.sub_refresh {
        req!(raw, Request::SubRefresh)
    } else if id == 0 {
        return Ok(Line::Pong);
    } else {
        return Ok(Line::Invalid {
            id,
            error: super::ErrorCode::MethodNotFound,
        });
    };
    // Every request but `send` expects a reply, so it needs an id.
    if id == 0 && !matches!(request, Request::Send) {
        return Err(NotACommand);
    }
    Ok(Line::Command { id, request })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    #[test]
    fn pong_is_empty_object() {
        assert!(matches!(parse_line("{}"), Ok(Line::Pong)));
    }

    #[test]
    fn connect_with_extra_fields() {
        let l = parse_line(r#"{"id":1,"connect":{"token":"t","name":"js","flag":3}}"#).unwrap();
        match l {
            Line::Command {
                id: 1,
                request: Request::Connect(c),
            } => {
                assert_eq!(c.token, "t");
                assert_eq!(c.name, "js");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn escaped_channel_is_owned() {
        let l = parse_line(r#"{"id":2,"subscribe":{"channel":"a\"b"}}"#).unwrap();
        match l {
            Line::Command {
                request: Request::Subscribe(s),
                ..
            } => assert_eq!(s.channel, "a\"b"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wrong_types_get_bad_request_for_their_id() {
        match parse_line(r#"{"id":6,"subscribe":{"channel":123}}"#).unwrap() {
            Line::Invalid { id: 6, error } => assert_eq!(error, ErrorCode::BadRequest),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_method_gets_method_not_found() {
        match parse_line(r#"{"id":5,"unknown_method":{}}"#).unwrap() {
            Line::Invalid { id: 5, error } => assert_eq!(error, ErrorCode::MethodNotFound),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_is_not_a_command() {
        assert_eq!(parse_line("not json").unwrap_err(), NotACommand);
        assert_eq!(parse_line("[1,2]").unwrap_err(), NotACommand);
        assert_eq!(parse_line(r#"{"id":"x"}"#).unwrap_err(), NotACommand);
        assert_eq!(
            parse_line(r#"{"subscribe":{"channel":"a"}}"#).unwrap_err(),
            NotACommand
        );
    }

    #[test]
    fn publish_keeps_raw_data() {
        match parse_line(r#"{"id":3,"publish":{"channel":"c","data":{"a":[1, 2]}}}"#).unwrap() {
            Line::Command {
                request: Request::Publish(p),
                ..
            } => assert_eq!(p.data.get(), r#"{"a":[1, 2]}"#),
            other => panic!("{other:?}"),
        }
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Arbitrary text never makes the command parser panic.
        #[test]
        fn arbitrary_text_never_panics(line in ".{0,400}") {
            let _ = parse_line(&line);
        }

        /// Arbitrary JSON-ish objects with known method names never panic either.
        #[test]
        fn json_shaped_commands_never_panic(
            id in any::<i64>(),
            method in prop::sample::select(vec!["connect", "subscribe", "unsubscribe", "publish", "presence", "presence_stats", "history", "ping", "send", "rpc", "refresh", "sub_refresh", "nope"]),
            body in "[\\[\\]{}\":,a-z0-9 ]{0,80}",
        ) {
            let line = format!("{{\"id\":{id},\"{method}\":{body}}}");
            let _ = parse_line(&line);
        }
    }
}
