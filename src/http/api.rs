//! The HTTP server API: a compatible subset of Centrifugo's (`POST /api/<method>`, JSON bodies,
//! `X-API-Key: KEY` or `Authorization: apikey KEY`).
//!
//! Logical errors are answered as Centrifugo does, HTTP 200 with `{"error":{"code","message"}}`;
//! malformed requests get 400, a wrong or missing key 401, unknown methods 404. Every call that
//! needs other shards goes through the broker and waits (bounded) for its answer.
//!
//! What the head decides is decided before the body is read: a wrong method (405), a missing or
//! wrong key (401), an ambiguous or unsupported framing (400/501), a declared `Content-Length`
//! over `limits.max_api_body_bytes` (413) and an unknown `Expect` (417) are answered at once and
//! the connection closed with the body unread; `Expect: 100-continue` gets its `100 Continue`
//! only once the head passed all of them. Bodies come with `Content-Length` or
//! `Transfer-Encoding: chunked` (decoded here, bounded in decoded bytes), within the request's
//! deadline (408 past it).
//!
//! Requests pipelined on one connection are answered as a batch ([`answer_all`]): every call
//! is started (its broker message sent, in request order) before any answer is awaited, and
//! the answers are written in order. A request already read whole ([`take_buffered`]) goes
//! through the same head checks without any I/O.

use super::body::{framing, read_chunked, read_length, BodyError, ChunkedBody, Framing};
use super::{response, Head};
use crate::bus::NodeCounts;
use crate::bus::{
    BrokerError, BrokerReply, HistoryQuery, Part, Query, ShardCommand, StreamPos, ToBroker,
};
use crate::bus::{NodeInfo, ReplyTo, ServerSubscribe};
use crate::config::Config;
use crate::protocol::command::{HistoryRequest, StreamPosition};
use crate::protocol::publication::Extras;
use crate::protocol::reply::{presence_result, presence_stats};
use crate::protocol::{Disconnect, ErrorCode};
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

/// What the API needs of the shard that serves it: its configuration, the node's state, and a
/// way to the broker. Implemented by [`crate::shard::Shard`]; `http` never sees the shard itself.
pub trait ApiContext {
    fn config(&self) -> &Config;
    fn node(&self) -> &NodeInfo;
    /// Sends `make`'s request to the broker and waits (bounded by
    /// `limits.broker_reply_timeout_ms`) for its answer.
    fn request(
        &self,
        make: impl FnOnce(ReplyTo) -> ToBroker,
    ) -> impl Future<Output = Result<BrokerReply, ErrorCode>>;
    /// Sends a command to every shard of the node (and, in Redis mode, of the cluster).
    fn send_command(&self, cmd: ShardCommand) -> Result<(), ErrorCode>;
    /// A request was cut by its deadline (counted as `request_timeouts`).
    fn request_timed_out(&self);
}

fn json_response(status: u16, body: &Value, keep_alive: bool) -> Vec<u8> {
    let bytes = serde_json::to_vec(body).expect("json value");
    response(status, "application/json", &bytes, keep_alive)
}

fn api_error(code: ErrorCode) -> Value {
    let mut e = json!({"code": code.code(), "message": code.message()});
    if code == ErrorCode::Internal {
        e["temporary"] = json!(true);
    }
    json!({ "error": e })
}

/// What happens to the connection once the answer is written.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Read the next request (the answer says `Connection: keep-alive`).
    KeepAlive,
    /// Close (everything the request sent was read).
    Close,
    /// Close without reading the body the request announced (see
    /// `http::discard_then_close`).
    DiscardThenClose,
}

/// An answer and the fate of the connection.
pub struct Answer {
    pub bytes: Vec<u8>,
    pub after: After,
}

/// A refusal decided before the body is read: answered at once, the body left unread.
fn refuse(status: u16, message: &str) -> Answer {
    Answer {
        bytes: response(
            status,
            "text/plain; charset=utf-8",
            message.as_bytes(),
            false,
        ),
        after: After::DiscardThenClose,
    }
}

pub enum Request {
    Call(Call),
    Answered(Answer),
}

/// A request whose head passed every check and whose body is read: ready to dispatch.
pub struct Call {
    /// The API method (`publish`, ...): the path after `/api/`, without the query.
    method: String,
    body: Vec<u8>,
    /// The head asked to keep the connection open.
    keep: bool,
}

impl Request {
    /// Whether the connection may serve another request after this one.
    pub fn keeps_alive(&self) -> bool {
        match self {
            Request::Call(call) => call.keep,
            Request::Answered(answer) => answer.after == After::KeepAlive,
        }
    }

    /// Whether answering it sends several broker messages one after another (`broadcast`: one
    /// publish per channel; `info`: three gathers; `batch`: its commands). A call started after it in the same batch
    /// could otherwise slip a message in between, so a batch waits for such a call before it
    /// starts the next ones (see [`answer_all`]).
    fn sends_in_sequence(&self) -> bool {
        matches!(self, Request::Call(c) if matches!(&*c.method, "broadcast" | "info" | "batch"))
    }
}

/// The checks a head decides alone, before a byte of the body is read: method (405), key
/// (401), framing (400/501), declared length (413), `Expect` (417). `Ok` with the framing.
fn check_head(shard: &impl ApiContext, head: &Head) -> Result<Framing, Answer> {
    if head.method != "POST" {
        return Err(refuse(405, "use POST\n"));
    }
    if !authorized(&shard.config().api_key, head) {
        return Err(refuse(401, "Unauthorized\n"));
    }
    let framing = framing(head).map_err(|(status, message)| refuse(status, message))?;
    let max = shard.config().limits.max_api_body_bytes;
    if matches!(framing, Framing::Length(n) if n > max) {
        return Err(refuse(413, "body too large\n"));
    }
    if let Some(expect) = head.header("expect").filter(|_| head.version >= 1) {
        if !expect.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
            return Err(refuse(417, "only Expect: 100-continue is supported\n"));
        }
    }
    Ok(framing)
}

/// The call a checked head and its body make.
fn call(head: &Head, body: Vec<u8>) -> Request {
    let method = head
        .path
        .split('?')
        .next()
        .unwrap_or("")
        .trim_start_matches("/api")
        .trim_start_matches('/');
    Request::Call(Call {
        method: method.to_string(),
        body,
        keep: head.keep_alive(),
    })
}

/// Reads an API request whose head is in `buf`. Everything that can be decided from the head
/// is decided before a byte of the body is read (see [`check_head`]); then the body is read
/// before `deadline` (408 past it). `buf` holds the head and whatever followed it; on return
/// it holds only the bytes after this request. `None` when the connection is unusable (closed
/// by the client).
pub async fn read(
    shard: &impl ApiContext,
    stream: &mut TcpStream,
    head: &Head,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Option<Request> {
    buf.drain(..head.len.min(buf.len()));
    let framing = match check_head(shard, head) {
        Ok(f) => f,
        Err(refusal) => return Some(Request::Answered(refusal)),
    };
    if head.header("expect").is_some() && head.version >= 1 {
        // The head passed (so this is `100-continue`): ask for the body, unless it is here.
        let body_pending = match framing {
            Framing::Length(n) => buf.len() < n,
            Framing::Chunked => buf.is_empty(),
        };
        if body_pending
            && stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return None;
        }
    }
    let max = shard.config().limits.max_api_body_bytes;
    let read = match framing {
        Framing::Length(n) => read_length(stream, buf, n, deadline).await,
        Framing::Chunked => {
            let line_max = shard.config().limits.max_request_head_bytes;
            read_chunked(stream, buf, max, line_max, deadline).await
        }
    };
    let answer = match read {
        Ok(body) => return Some(call(head, body)),
        Err(BodyError::Closed) => return None,
        Err(BodyError::Timeout) => {
            shard.request_timed_out();
            Answer {
                bytes: super::request_timeout(),
                after: After::Close,
            }
        }
        Err(BodyError::TooBig) => refuse(413, "body too large\n"),
        Err(BodyError::Malformed) => refuse(400, "bad chunked body\n"),
    };
    Some(Request::Answered(answer))
}

/// The API request whose head `head` starts `buf`, if `buf` already holds all of it (a
/// pipelined request): no I/O, no deadline (nothing is waited for). The same checks as
/// [`read`]: a refused head is answered without its body. `None` when the body has not all
/// arrived (`buf` is left untouched: the request is read the ordinary way, with its deadline
/// and its `100 Continue`); otherwise the request's bytes are drained from `buf`.
pub fn take_buffered(shard: &impl ApiContext, head: &Head, buf: &mut Vec<u8>) -> Option<Request> {
    let framing = match check_head(shard, head) {
        Ok(f) => f,
        Err(refusal) => {
            buf.drain(..head.len.min(buf.len()));
            return Some(Request::Answered(refusal));
        }
    };
    let rest = &buf[head.len.min(buf.len())..];
    let (body, used) = match framing {
        Framing::Length(n) if rest.len() >= n => (Ok(rest[..n].to_vec()), n),
        Framing::Length(_) => return None,
        Framing::Chunked => {
            let limits = &shard.config().limits;
            let mut decoder = ChunkedBody::default();
            match decoder.feed(
                rest,
                limits.max_api_body_bytes,
                limits.max_request_head_bytes,
            ) {
                Ok(used) if decoder.is_done() => (Ok(decoder.body), used),
                Ok(_) => return None,
                Err(e) => (Err(e), 0),
            }
        }
    };
    buf.drain(..(head.len + used).min(buf.len()));
    Some(match body {
        Ok(body) => call(head, body),
        Err(BodyError::TooBig) => Request::Answered(refuse(413, "body too large\n")),
        Err(_) => Request::Answered(refuse(400, "bad chunked body\n")),
    })
}

/// Answers a connection's requests, in order, as one write's bytes; the connection's fate is
/// the last request's (only the last may close it). Calls are started together: every call's
/// first broker message is sent, in the order of the requests, before any answer is awaited,
/// so N pipelined publishes cost about one broker round trip, not N, and two publishes to
/// one channel keep their order. A call that sends several messages in sequence
/// ([`Request::sends_in_sequence`]) is awaited before the calls after it start.
pub async fn answer_all(shard: &impl ApiContext, requests: Vec<Request>) -> Answer {
    let mut out = Answer {
        bytes: Vec::new(),
        after: After::KeepAlive,
    };
    let mut requests = requests.into_iter().peekable();
    while requests.peek().is_some() {
        let mut group = Vec::new();
        for request in requests.by_ref() {
            let last = request.sends_in_sequence();
            group.push(request);
            if last {
                break;
            }
        }
        let answers = if group.len() == 1 {
            vec![respond(shard, group.pop().expect("one request")).await]
        } else {
            join_in_order(group.into_iter().map(|r| respond(shard, r)).collect()).await
        };
        for answer in answers {
            if out.bytes.is_empty() {
                out.bytes = answer.bytes;
            } else {
                out.bytes.extend_from_slice(&answer.bytes);
            }
            out.after = answer.after;
        }
    }
    out
}

/// The answer to one request: its call dispatched, or the answer it already has.
async fn respond(shard: &impl ApiContext, request: Request) -> Answer {
    match request {
        Request::Answered(answer) => answer,
        Request::Call(call) => {
            let (status, value) = dispatch(shard, &call.method, &call.body).await;
            Answer {
                bytes: json_response(status, &value, call.keep),
                after: if call.keep {
                    After::KeepAlive
                } else {
                    After::Close
                },
            }
        }
    }
}

/// Runs `futures` together and returns their outputs in order. Each poll polls the unfinished
/// ones in order, so the first poll runs every future up to its first wait, in order (this is
/// what keeps the broker messages in the order of the requests). One task, one waker.
async fn join_in_order<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *output = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|o| o.expect("every future finished"))
        .collect()
}

fn authorized(key: &str, head: &Head) -> bool {
    if key.is_empty() {
        return false; // API disabled without a key
    }
    let given = head.header("x-api-key").map(|v| v.to_vec()).or_else(|| {
        head.header("authorization").and_then(|v| {
            let s = std::str::from_utf8(v).ok()?;
            let (scheme, k) = s.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("apikey")
                .then(|| k.trim().as_bytes().to_vec())
        })
    });
    // Constant-time comparison: the key is a secret.
    given.is_some_and(|g| {
        g.len() == key.len()
            && g.iter()
                .zip(key.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

// Request bodies. Every one refuses a field it does not know (`deny_unknown_fields`): HTTP 400,
// error 107 naming the field. Centrifugo's decoder ignores unknown fields; here a field we do
// not implement (Centrifugo's `session`, `override`, `b64info`, `delta`, ...) or a misspelt one
// is never dropped silently, so a backend learns at once that it did not do what it asked.

/// `data` or `b64data` (exactly one), `tags`, `skip_history` and `idempotency_key`: what
/// `publish` and `broadcast` share (serde's `flatten` does not work with
/// `deny_unknown_fields`, so each body lists them).
struct Payload {
    data: Option<Box<RawValue>>,
    b64data: Option<String>,
    tags: Option<BTreeMap<String, String>>,
    skip_history: bool,
    idempotency_key: Option<String>,
}

macro_rules! payload_of {
    ($b:expr) => {
        Payload {
            data: $b.data,
            b64data: $b.b64data,
            tags: $b.tags,
            skip_history: $b.skip_history,
            idempotency_key: $b.idempotency_key,
        }
    };
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    channel: String,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    /// Standard base64 of the payload bytes.
    #[serde(default)]
    b64data: Option<String>,
    #[serde(default)]
    tags: Option<BTreeMap<String, String>>,
    #[serde(default)]
    skip_history: bool,
    /// A repeat with the same key (per channel) within `limits.idempotency_window_secs` is not
    /// published again; it gets the first publish's result.
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastBody {
    channels: Vec<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    /// Standard base64 of the payload bytes.
    #[serde(default)]
    b64data: Option<String>,
    #[serde(default)]
    tags: Option<BTreeMap<String, String>>,
    #[serde(default)]
    skip_history: bool,
    /// A repeat with the same key (per channel) within `limits.idempotency_window_secs` is not
    /// published again; it gets the first publish's result.
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelBody {
    channel: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ChannelsBody {
    #[serde(default)]
    pattern: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct InfoBody {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    user: String,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    disconnect: Option<DisconnectSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectSpec {
    code: u16,
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsubscribeBody {
    user: String,
    channel: String,
    #[serde(default)]
    client: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeBody {
    user: String,
    channel: String,
    #[serde(default)]
    client: Option<String>,
    /// For the client, in the subscribe push.
    #[serde(default)]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    recover_since: Option<PositionBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PositionBody {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    epoch: String,
}

/// `/api/history`: the client's `history` request, with unknown fields refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryBody {
    channel: String,
    #[serde(default)]
    limit: i64,
    #[serde(default)]
    since: Option<PositionBody>,
    #[serde(default)]
    reverse: bool,
}

impl HistoryBody {
    fn request(&self) -> HistoryRequest<'_> {
        HistoryRequest {
            channel: self.channel.as_str().into(),
            limit: self.limit,
            since: self.since.as_ref().map(|p| StreamPosition {
                offset: p.offset,
                epoch: p.epoch.as_str().into(),
            }),
            reverse: self.reverse,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    user: String,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    expired: bool,
    /// Unix seconds; 0 or absent = the connections no longer expire.
    #[serde(default)]
    expire_at: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    commands: Vec<BTreeMap<String, Box<RawValue>>>,
    #[serde(default)]
    parallel: bool,
}

fn bad_request(message: impl std::fmt::Display) -> Value {
    json!({"error": {"code": 107, "message": format!("bad request: {message}")}})
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, (u16, Value)> {
    serde_json::from_slice(if body.is_empty() { b"{}" } else { body })
        .map_err(|e| (400, bad_request(e)))
}

/// The answer to one API call: HTTP status and body (`{"result":..}` or `{"error":..}`).
async fn dispatch(shard: &impl ApiContext, method: &str, body: &[u8]) -> (u16, Value) {
    if method == "batch" {
        return match parse::<BatchBody>(body) {
            Ok(b) => batch(shard, b).await,
            Err(e) => e,
        };
    }
    call_one(shard, method, body).await
}

/// `batch`: every command's reply in order, as Centrifugo's `{"replies":[{"METHOD":RESULT} |
/// {"error":ERROR}, ...]}`. Sequential by default (each command is done before the next
/// starts); with `parallel` every command is started at once (a command's broker message is
/// still sent in order) and the replies still come in command order. A command is an object
/// with one key, the method; a batch inside a batch is refused (error 107).
async fn batch(shard: &impl ApiContext, b: BatchBody) -> (u16, Value) {
    if b.commands.len() > shard.config().limits.max_api_batch_commands {
        return (
            400,
            bad_request("too many commands in a batch (limits.max_api_batch_commands)"),
        );
    }
    let replies = if b.parallel {
        let runs = b.commands.iter().map(|c| batch_command(shard, c));
        join_in_order(runs.collect()).await
    } else {
        let mut replies = Vec::with_capacity(b.commands.len());
        for command in &b.commands {
            replies.push(batch_command(shard, command).await);
        }
        replies
    };
    (200, json!({ "replies": replies }))
}

/// One command of a batch: `{"METHOD":RESULT}` or `{"error":ERROR}`.
async fn batch_command(
    shard: &impl ApiContext,
    command: &BTreeMap<String, Box<RawValue>>,
) -> Value {
    let Some((method, body)) = command.iter().next().filter(|_| command.len() == 1) else {
        return bad_request("a command has exactly one method");
    };
    if method == "batch" {
        return bad_request("batch inside batch");
    }
    let (_, mut reply) = call_one(shard, method, body.get().as_bytes()).await;
    match reply.get_mut("result").map(Value::take) {
        Some(result) => json!({ method.as_str(): result }),
        None => reply,
    }
}

async fn call_one(shard: &impl ApiContext, method: &str, body: &[u8]) -> (u16, Value) {
    let result = match method {
        "publish" => match parse::<PublishBody>(body) {
            Ok(b) => Ok(match prepare(payload_of!(b)) {
                Ok(p) => publish(shard, &b.channel, p).await,
                Err(e) => e,
            }),
            Err(e) => Err(e),
        },
        "broadcast" => match parse::<BroadcastBody>(body) {
            Ok(b) => Ok(match prepare(payload_of!(b)) {
                Ok(p) => {
                    let mut responses = Vec::with_capacity(b.channels.len());
                    for ch in &b.channels {
                        responses.push(publish(shard, ch, p.clone()).await);
                    }
                    json!({"result": {"responses": responses}})
                }
                Err(e) => e,
            }),
            Err(e) => Err(e),
        },
        "presence" | "presence_stats" => match parse::<ChannelBody>(body) {
            Ok(b) => Ok(presence(shard, &b.channel, method == "presence").await),
            Err(e) => Err(e),
        },
        "channels" => match parse::<ChannelsBody>(body) {
            Ok(b) => Ok(
                match gather(shard, Query::ClusterChannels(b.pattern.map(Arc::from))).await {
                    Ok(Part::Channels(list)) => {
                        let map: serde_json::Map<String, Value> = list
                            .into_iter()
                            .map(|(name, n)| (name.to_string(), json!({"num_clients": n})))
                            .collect();
                        json!({"result": {"channels": map}})
                    }
                    Ok(_) | Err(_) => api_error(ErrorCode::Internal),
                },
            ),
            Err(e) => Err(e),
        },
        "info" => match parse::<InfoBody>(body) {
            Ok(_) => Ok(info(shard).await),
            Err(e) => Err(e),
        },
        "disconnect" => match parse::<DisconnectBody>(body) {
            Ok(b) => {
                let (code, reason) = match b.disconnect {
                    Some(d) if (3000..=4999).contains(&d.code) => (d.code, d.reason),
                    Some(_) => return (200, api_error(ErrorCode::BadRequest)),
                    None => {
                        let d = Disconnect::ForceNoReconnect;
                        (d.code(), d.reason().to_string())
                    }
                };
                Ok(command(
                    shard,
                    ShardCommand::Disconnect {
                        user: b.user.into(),
                        client: b.client.map(Arc::from),
                        code,
                        reason: reason.into(),
                    },
                ))
            }
            Err(e) => Err(e),
        },
        "unsubscribe" => match parse::<UnsubscribeBody>(body) {
            Ok(b) => Ok(match check_channel(shard, &b.channel) {
                Err(e) => e,
                Ok(_) => command(
                    shard,
                    ShardCommand::Unsubscribe {
                        user: b.user.into(),
                        channel: b.channel.into(),
                        client: b.client.map(Arc::from),
                    },
                ),
            }),
            Err(e) => Err(e),
        },
        "subscribe" => match parse::<SubscribeBody>(body) {
            Ok(b) => Ok(subscribe(shard, b)),
            Err(e) => Err(e),
        },
        "refresh" => match parse::<RefreshBody>(body) {
            Ok(b) => Ok(command(
                shard,
                ShardCommand::Refresh {
                    user: b.user.into(),
                    client: b.client.map(Arc::from),
                    expired: b.expired,
                    expire_at: b.expire_at,
                },
            )),
            Err(e) => Err(e),
        },
        "history" => match parse::<HistoryBody>(body) {
            Ok(b) => Ok(history(shard, b.request()).await),
            Err(e) => Err(e),
        },
        "history_remove" => match parse::<ChannelBody>(body) {
            Ok(b) => Ok(history_remove(shard, &b.channel).await),
            Err(e) => Err(e),
        },
        _ => Err((
            404,
            json!({"error": {"code": 104, "message": "method not found"}}),
        )),
    };
    match result {
        Ok(v) => (200, v),
        Err((status, v)) => (status, v),
    }
}

/// Checks a channel name an API call names: its namespace, or an error reply.
fn check_channel<'c>(
    shard: &'c impl ApiContext,
    channel: &str,
) -> Result<&'c crate::config::NamespaceOptions, Value> {
    if channel.is_empty() || channel.len() > shard.config().limits.max_channel_name_bytes {
        return Err(api_error(ErrorCode::BadRequest));
    }
    shard
        .config()
        .namespace_of(channel)
        .ok_or_else(|| api_error(ErrorCode::UnknownChannel))
}

/// A publication ready for the broker: its data (JSON text, or a JSON string of base64 for
/// binary bytes), extras and idempotency key.
#[derive(Clone)]
struct Prepared {
    data: Box<RawValue>,
    extras: Option<Box<Extras>>,
    idempotency_key: Option<String>,
}

/// Checks a payload: exactly one of `data` and `b64data` (107 otherwise); `b64data` must be
/// standard base64; bytes that are JSON text are published as plain `data` (every client
/// format can take them), other bytes as `b64data` (for protobuf clients; JSON clients get the
/// base64 string). Empty `tags` are no tags. An idempotency key is at most 256 bytes.
fn prepare(p: Payload) -> Result<Prepared, Value> {
    use base64::Engine;
    if p.idempotency_key.as_ref().is_some_and(|k| k.len() > 256) {
        return Err(bad_request("idempotency_key longer than 256 bytes"));
    }
    let (data, binary) = match (p.data, p.b64data) {
        (Some(_), Some(_)) => return Err(bad_request("data and b64data are exclusive")),
        (None, None) => return Err(bad_request("data or b64data required")),
        (Some(data), None) => (data, false),
        (None, Some(b64)) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| bad_request(format!("b64data: {e}")))?;
            match std::str::from_utf8(&bytes)
                .ok()
                .and_then(|text| RawValue::from_string(text.trim().to_string()).ok())
            {
                Some(json_text) => (json_text, false),
                None => {
                    let canonical = base64::engine::general_purpose::STANDARD.encode(&bytes);
                    let string = serde_json::to_string(&canonical).expect("a string");
                    (RawValue::from_string(string).expect("a JSON string"), true)
                }
            }
        }
    };
    let tags = (p.tags.filter(|t| !t.is_empty()))
        .map(|tags| serde_json::value::to_raw_value(&tags).expect("a string map"));
    let extras = (binary || tags.is_some() || p.skip_history).then(|| {
        Box::new(Extras {
            binary,
            tags,
            skip_history: p.skip_history,
        })
    });
    Ok(Prepared {
        data,
        extras,
        idempotency_key: p.idempotency_key.filter(|k| !k.is_empty()),
    })
}

async fn publish(shard: &impl ApiContext, channel: &str, p: Prepared) -> Value {
    if let Err(e) = check_channel(shard, channel) {
        return e;
    }
    let channel: Arc<str> = channel.into();
    let reply = shard
        .request(|reply| ToBroker::Publish {
            channel,
            data: p.data,
            info: None,
            idempotency_key: p.idempotency_key.map(Box::from),
            extras: p.extras,
            reply,
        })
        .await;
    match reply {
        Ok(BrokerReply::Published(Ok(Some(pos)))) => {
            json!({"result": {"offset": pos.offset, "epoch": &*pos.epoch}})
        }
        Ok(BrokerReply::Published(Ok(None))) => json!({"result": {}}),
        _ => api_error(ErrorCode::Internal),
    }
}

/// `subscribe`: the user's connections on every node (or one client of theirs) join the
/// channel and get a subscribe push. `recover_since` needs a namespace with recovery (108
/// otherwise).
fn subscribe(shard: &impl ApiContext, b: SubscribeBody) -> Value {
    let ns = match check_channel(shard, &b.channel) {
        Ok(ns) => ns,
        Err(e) => return e,
    };
    if b.recover_since.is_some() && !(ns.has_history() && ns.recover) {
        return api_error(ErrorCode::NotAvailable);
    }
    let sub = ServerSubscribe {
        channel: b.channel,
        client: b.client,
        data: b.data,
        since: b.recover_since.map(|p| (p.offset, p.epoch)),
    };
    command(
        shard,
        ShardCommand::Subscribe {
            user: b.user.into(),
            sub: Box::new(sub),
        },
    )
}

async fn history(shard: &impl ApiContext, b: HistoryRequest<'_>) -> Value {
    match check_channel(shard, &b.channel) {
        Err(e) => return e,
        Ok(ns) if !ns.has_history() => return api_error(ErrorCode::NotAvailable),
        Ok(_) => {}
    }
    let query = HistoryQuery {
        limit: b.limit,
        since: b.since.map(|p| StreamPos {
            offset: p.offset,
            epoch: Arc::from(&*p.epoch),
        }),
        reverse: b.reverse,
    };
    let channel: Arc<str> = Arc::from(&*b.channel);
    let reply = shard
        .request(|reply| ToBroker::History {
            channel,
            query,
            reply,
        })
        .await;
    match reply {
        Ok(BrokerReply::History(Ok(page))) => {
            let mut out =
                Vec::with_capacity(64 + page.pubs.iter().map(|p| p.len() + 1).sum::<usize>());
            out.extend_from_slice(b"{\"result\":");
            crate::protocol::reply::with_publications(
                &mut out,
                &crate::protocol::reply::HistoryResult {
                    epoch: &page.epoch,
                    offset: page.offset,
                },
                &page.pubs,
            );
            out.push(b'}');
            serde_json::from_slice(&out).unwrap_or_else(|_| api_error(ErrorCode::Internal))
        }
        Ok(BrokerReply::History(Err(BrokerError::Unrecoverable))) => {
            api_error(ErrorCode::UnrecoverablePosition)
        }
        _ => api_error(ErrorCode::Internal),
    }
}

async fn history_remove(shard: &impl ApiContext, channel: &str) -> Value {
    match check_channel(shard, channel) {
        Err(e) => return e,
        Ok(ns) if !ns.has_history() => return api_error(ErrorCode::NotAvailable),
        Ok(_) => {}
    }
    let channel: Arc<str> = channel.into();
    match shard
        .request(|reply| ToBroker::HistoryRemove { channel, reply })
        .await
    {
        Ok(BrokerReply::Done) => json!({"result": {}}),
        _ => api_error(ErrorCode::Internal),
    }
}

async fn gather(shard: &impl ApiContext, query: Query) -> Result<Part, ErrorCode> {
    match shard
        .request(|reply| ToBroker::Gather { query, reply })
        .await?
    {
        BrokerReply::Gathered(part) => Ok(part),
        _ => Err(ErrorCode::Internal),
    }
}

async fn presence(shard: &impl ApiContext, channel: &str, full: bool) -> Value {
    match shard.config().namespace_of(channel) {
        None => return api_error(ErrorCode::UnknownChannel),
        Some(ns) if !ns.presence => return api_error(ErrorCode::NotAvailable),
        Some(_) => {}
    }
    match gather(shard, Query::Presence(channel.into())).await {
        Ok(Part::Presence(list)) if full => json!({"result": presence_result(list)}),
        Ok(Part::Presence(list)) => json!({"result": presence_stats(&list)}),
        _ => api_error(ErrorCode::Internal),
    }
}

async fn info(shard: &impl ApiContext) -> Value {
    let stats = gather(shard, Query::Stats).await;
    let channels = gather(shard, Query::Channels(None)).await;
    let (
        Ok(Part::Stats {
            connections,
            subscriptions,
            users,
            counters,
        }),
        Ok(Part::Channels(chans)),
    ) = (stats, channels)
    else {
        return api_error(ErrorCode::Internal);
    };
    let node = shard.node();
    let local = node.info_entry(
        shard.config().redis_mode(),
        NodeCounts {
            clients: connections,
            users: Some(users.len() as u64),
            subs: subscriptions,
            channels: chans.len() as u64,
            counters: Some(counters),
        },
    );
    // Other live nodes come from the registry (Redis mode); ours is the fresh local entry.
    let mut nodes = match gather(shard, Query::Nodes).await {
        Ok(Part::Nodes(list)) => list,
        _ => Vec::new(),
    };
    nodes.retain(|n| n["uid"] != node.uid.as_str());
    nodes.insert(0, local);
    json!({"result": {"nodes": nodes}})
}

fn command(shard: &impl ApiContext, cmd: ShardCommand) -> Value {
    match shard.send_command(cmd) {
        Ok(()) => json!({"result": {}}),
        Err(code) => api_error(code),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard stand-in: records the channel of every publish it is sent, and answers a
    /// publish only once `together` publishes were sent (a batch that awaited each call before
    /// starting the next would never get there: after `MAX_POLLS` its call fails instead).
    struct Recorder {
        cfg: Config,
        node: NodeInfo,
        sent: std::cell::RefCell<Vec<String>>,
        together: usize,
    }

    const MAX_POLLS: usize = 1000;

    impl Recorder {
        fn new(together: usize) -> Recorder {
            let mut cfg = Config {
                api_key: "k".into(),
                ..Config::default()
            };
            cfg.limits.max_api_body_bytes = 100;
            Recorder {
                cfg,
                node: NodeInfo::new("t".into(), "t".into(), "t".into(), 1),
                sent: Default::default(),
                together,
            }
        }
    }

    impl ApiContext for Recorder {
        fn config(&self) -> &Config {
            &self.cfg
        }
        fn node(&self) -> &NodeInfo {
            &self.node
        }
        fn request(
            &self,
            make: impl FnOnce(ReplyTo) -> ToBroker,
        ) -> impl Future<Output = Result<BrokerReply, ErrorCode>> {
            let sent = &self.sent;
            let together = self.together;
            let mut polls = 0;
            let offset = match make(ReplyTo { shard: 0, token: 0 }) {
                ToBroker::Publish { channel, .. } => {
                    sent.borrow_mut().push(channel.to_string());
                    sent.borrow().len() as u64
                }
                _ => 0,
            };
            std::future::poll_fn(move |cx| {
                polls += 1;
                if sent.borrow().len() >= together {
                    let pos = StreamPos {
                        offset,
                        epoch: "e".into(),
                    };
                    std::task::Poll::Ready(Ok(BrokerReply::Published(Ok(Some(pos)))))
                } else if polls > MAX_POLLS {
                    std::task::Poll::Ready(Err(ErrorCode::Internal))
                } else {
                    cx.waker().wake_by_ref();
                    std::task::Poll::Pending
                }
            })
        }
        fn send_command(&self, _: ShardCommand) -> Result<(), ErrorCode> {
            Ok(())
        }
        fn request_timed_out(&self) {}
    }

    fn publish_wire(channel: &str, extra: &str) -> String {
        let body = format!(r#"{{"channel":"{channel}","data":1}}"#);
        format!(
            "POST /api/publish HTTP/1.1\r\nX-API-Key: k\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    /// Takes every request whole at the front of `wire` the way the front door does.
    fn take_all(shard: &Recorder, wire: &[u8]) -> (Vec<Request>, Vec<u8>) {
        let mut buf = wire.to_vec();
        let mut out = Vec::new();
        while let Ok(Some(head)) = super::super::parse_head(&buf) {
            let Some(r) = take_buffered(shard, &head, &mut buf) else {
                break;
            };
            let keep = r.keeps_alive();
            out.push(r);
            if !keep {
                break;
            }
        }
        (out, buf)
    }

    #[test]
    fn buffered_requests_are_taken_only_whole() {
        let shard = Recorder::new(1);
        let one = publish_wire("a", "");
        let chunked = "POST /api/publish HTTP/1.1\r\nX-API-Key: k\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"ch\r\n18\r\nannel\":\"b\",\"data\":2}    \r\n0\r\n\r\n";
        let wire = format!("{one}{chunked}{one}");
        // Cut anywhere: the whole requests before the cut are taken, the rest stays as it was.
        for cut in 0..=wire.len() {
            let (taken, rest) = take_all(&shard, &wire.as_bytes()[..cut]);
            let whole = [one.len(), one.len() + chunked.len(), wire.len()]
                .iter()
                .filter(|&&end| end <= cut)
                .count();
            assert_eq!(taken.len(), whole, "cut at {cut}");
            let used: usize = [one.len(), chunked.len(), one.len()][..whole].iter().sum();
            assert_eq!(rest, &wire.as_bytes()[used..cut], "cut at {cut}");
            assert!(taken.iter().all(|r| matches!(r, Request::Call(_))));
        }
        let (taken, _) = take_all(&shard, wire.as_bytes());
        let Request::Call(c) = &taken[1] else {
            unreachable!()
        };
        assert_eq!(
            (c.method.as_str(), &c.body[..]),
            ("publish", &br#"{"channel":"b","data":2}    "#[..])
        );
    }

    #[test]
    fn buffered_refusals_end_the_batch_as_read_ones_do() {
        let shard = Recorder::new(1);
        let ok = publish_wire("a", "");
        for (bad, status) in [
            (publish_wire("a", "X-API-Key: wrong\r\n").replacen("X-API-Key: k\r\n", "", 1), 401),
            (ok.replacen("POST", "PUT", 1), 405),
            (publish_wire("a", "Expect: later\r\n"), 417),
            ("POST /api/publish HTTP/1.1\r\nX-API-Key: k\r\nContent-Length: 101\r\n\r\n".into(), 413),
            ("POST /api/publish HTTP/1.1\r\nX-API-Key: k\r\nTransfer-Encoding: chunked\r\n\r\n65\r\n".into(), 413),
            ("POST /api/publish HTTP/1.1\r\nX-API-Key: k\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".into(), 400),
            ("POST /api/publish HTTP/1.1\r\nX-API-Key: k\r\nTransfer-Encoding: gzip\r\n\r\n".into(), 501),
        ] {
            let (taken, _) = take_all(&shard, format!("{ok}{bad}{ok}").as_bytes());
            assert_eq!(taken.len(), 2, "{bad:?}");
            let Request::Answered(a) = &taken[1] else {
                panic!("{bad:?} is refused");
            };
            assert!(a.bytes.starts_with(format!("HTTP/1.1 {status} ").as_bytes()), "{bad:?}");
            assert_eq!(a.after, After::DiscardThenClose);
        }
        // `Connection: close` is served, and is the last.
        let close = publish_wire("a", "Connection: close\r\n");
        let (taken, rest) = take_all(&shard, format!("{ok}{close}{ok}").as_bytes());
        assert_eq!((taken.len(), rest), (2, ok.into_bytes()));
        assert!(matches!(&taken[1], Request::Call(c) if !c.keep));
    }

    /// Every call of a batch is sent before any is awaited, in request order, and the answers
    /// come in request order.
    #[test]
    fn a_batch_is_started_together_and_answered_in_order() {
        let channels = ["c1", "c2", "c1", "c3", "c1"];
        let shard = Recorder::new(channels.len());
        let wire: String = channels.iter().map(|c| publish_wire(c, "")).collect();
        let (batch, _) = take_all(&shard, wire.as_bytes());
        let answer = futures_lite::future::block_on(answer_all(&shard, batch));
        assert_eq!(*shard.sent.borrow(), channels);
        assert_eq!(answer.after, After::KeepAlive);
        let text = String::from_utf8(answer.bytes).unwrap();
        let offsets: Vec<&str> = text
            .split("\"offset\":")
            .skip(1)
            .map(|s| s.split('}').next().unwrap())
            .collect();
        assert_eq!(offsets, ["1", "2", "3", "4", "5"], "{text}");
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 5);
    }

    fn payload(json: &str) -> Result<Prepared, Value> {
        #[derive(Deserialize)]
        struct P {
            data: Option<Box<RawValue>>,
            b64data: Option<String>,
            tags: Option<BTreeMap<String, String>>,
            #[serde(default)]
            skip_history: bool,
            idempotency_key: Option<String>,
        }
        let b: P = serde_json::from_str(json).unwrap();
        prepare(payload_of!(b))
    }

    #[test]
    fn payloads_json_bytes_become_data_binary_stays_base64() {
        let p = payload(r#"{"b64data":"eyJuIjoxfQ=="}"#).ok().unwrap();
        assert_eq!((p.data.get(), p.extras.is_none()), (r#"{"n":1}"#, true));
        let p = payload(r#"{"b64data":"AAH/","tags":{"a":"1"},"skip_history":true}"#)
            .ok()
            .unwrap();
        assert_eq!(p.data.get(), r#""AAH/""#);
        let e = p.extras.unwrap();
        assert!(e.binary && e.skip_history);
        assert_eq!(e.tags.unwrap().get(), r#"{"a":"1"}"#);
        let p = payload(r#"{"data":1,"tags":{},"idempotency_key":""}"#)
            .ok()
            .unwrap();
        assert!(
            p.extras.is_none() && p.idempotency_key.is_none(),
            "empty is none"
        );
        for bad in [
            r#"{}"#,
            r#"{"data":1,"b64data":"AA=="}"#,
            r#"{"b64data":"A"}"#,
        ] {
            let e = payload(bad).err().unwrap();
            assert_eq!(e["error"]["code"], 107, "{bad}");
        }
    }
}
