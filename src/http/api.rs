//! The HTTP server API: a compatible subset of Centrifugo's (`POST /api/<method>`, JSON bodies,
//! `X-API-Key: KEY` or `Authorization: apikey KEY`).
//!
//! Logical errors are answered as Centrifugo does, HTTP 200 with `{"error":{"code","message"}}`;
//! malformed requests get 400, a wrong or missing key 401, unknown methods 404. Every call that
//! needs other shards goes through the broker and waits (bounded) for its answer.

use super::{response, Head};
use crate::bus::{
    BrokerError, BrokerReply, HistoryQuery, Part, Query, ShardCommand, StreamPos, ToBroker,
};
use crate::protocol::command::HistoryRequest;
use crate::protocol::{Disconnect, ErrorCode};
use crate::shard::{presence_result, presence_stats, NodeCounts, Shard};
use futures_lite::AsyncReadExt;
use glommio::net::TcpStream;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::sync::Arc;

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

/// Reads the body of an API request from `buf`/`stream` and answers it. `None` when the
/// connection is unusable.
pub async fn serve(
    shard: &Shard,
    stream: &mut TcpStream,
    head: &Head,
    buf: &mut Vec<u8>,
) -> Option<Vec<u8>> {
    let keep = head.keep_alive();
    let max = shard.cfg.limits.max_api_body_bytes;
    if head.header("transfer-encoding").is_some() {
        buf.clear();
        return Some(response(
            411,
            "text/plain",
            b"Content-Length required\n",
            false,
        ));
    }
    let len: usize = match head.header("content-length") {
        None => 0,
        Some(v) => match std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            Some(n) => n,
            None => {
                buf.clear();
                return Some(response(400, "text/plain", b"bad Content-Length\n", false));
            }
        },
    };
    if len > max {
        buf.clear();
        return Some(response(413, "text/plain", b"body too large\n", false));
    }
    // Body: what followed the head in `buf`, plus the rest from the socket.
    let need = head.len + len;
    while buf.len() < need {
        let filled = buf.len();
        buf.resize(need, 0);
        match stream.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.truncate(filled + n),
        }
    }
    let body: Vec<u8> = buf[head.len..need].to_vec();
    buf.drain(..need);

    if head.method != "POST" {
        return Some(response(405, "text/plain", b"use POST\n", keep));
    }
    if !authorized(&shard.cfg.api_key, head) {
        return Some(response(401, "text/plain", b"Unauthorized\n", keep));
    }
    let method = head
        .path
        .split('?')
        .next()
        .unwrap_or("")
        .trim_start_matches("/api")
        .trim_start_matches('/');
    let (status, value) = dispatch(shard, method, &body).await;
    Some(json_response(status, &value, keep))
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

#[derive(Deserialize)]
struct PublishBody {
    channel: String,
    data: Box<RawValue>,
    /// A repeat with the same key within `limits.idempotency_window_secs` is not published
    /// again; it gets the first publish's result.
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
struct BroadcastBody {
    channels: Vec<String>,
    data: Box<RawValue>,
}

#[derive(Deserialize)]
struct ChannelBody {
    channel: String,
}

#[derive(Deserialize, Default)]
struct ChannelsBody {
    #[serde(default)]
    pattern: Option<String>,
}

#[derive(Deserialize)]
struct DisconnectBody {
    user: String,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    disconnect: Option<DisconnectSpec>,
}

#[derive(Deserialize)]
struct DisconnectSpec {
    code: u16,
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
struct UnsubscribeBody {
    user: String,
    channel: String,
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, (u16, Value)> {
    serde_json::from_slice(if body.is_empty() { b"{}" } else { body }).map_err(|e| {
        (
            400,
            json!({"error": {"code": 107, "message": format!("bad request: {e}")}}),
        )
    })
}

async fn dispatch(shard: &Shard, method: &str, body: &[u8]) -> (u16, Value) {
    let result = match method {
        "publish" => match parse::<PublishBody>(body) {
            Ok(b) => Ok(publish(shard, &b.channel, b.data, b.idempotency_key).await),
            Err(e) => Err(e),
        },
        "broadcast" => match parse::<BroadcastBody>(body) {
            Ok(b) => {
                let mut responses = Vec::with_capacity(b.channels.len());
                for ch in &b.channels {
                    responses.push(publish(shard, ch, b.data.clone(), None).await);
                }
                Ok(json!({"result": {"responses": responses}}))
            }
            Err(e) => Err(e),
        },
        "presence" | "presence_stats" => match parse::<ChannelBody>(body) {
            Ok(b) => Ok(presence(shard, &b.channel, method == "presence").await),
            Err(e) => Err(e),
        },
        "channels" => match parse::<ChannelsBody>(body) {
            Ok(b) => Ok(
                match gather(shard, Query::Channels(b.pattern.map(Arc::from))).await {
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
        "info" => Ok(info(shard).await),
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
            Ok(b) => Ok(command(
                shard,
                ShardCommand::Unsubscribe {
                    user: b.user.into(),
                    channel: b.channel.into(),
                },
            )),
            Err(e) => Err(e),
        },
        "history" => match parse::<HistoryRequest>(body) {
            Ok(b) => Ok(history(shard, b).await),
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
    shard: &'c Shard,
    channel: &str,
) -> Result<&'c crate::config::NamespaceOptions, Value> {
    if channel.is_empty() || channel.len() > shard.cfg.limits.max_channel_name_bytes {
        return Err(api_error(ErrorCode::BadRequest));
    }
    shard
        .cfg
        .namespace_of(channel)
        .ok_or_else(|| api_error(ErrorCode::UnknownChannel))
}

async fn publish(
    shard: &Shard,
    channel: &str,
    data: Box<RawValue>,
    idempotency_key: Option<String>,
) -> Value {
    if let Err(e) = check_channel(shard, channel) {
        return e;
    }
    if idempotency_key.as_ref().is_some_and(|k| k.len() > 256) {
        return api_error(ErrorCode::BadRequest);
    }
    let channel: Arc<str> = channel.into();
    let reply = shard
        .request(|reply| ToBroker::Publish {
            channel,
            data,
            info: None,
            idempotency_key: idempotency_key.filter(|k| !k.is_empty()).map(Box::from),
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

async fn history(shard: &Shard, b: HistoryRequest<'_>) -> Value {
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

async fn history_remove(shard: &Shard, channel: &str) -> Value {
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

async fn gather(shard: &Shard, query: Query) -> Result<Part, ErrorCode> {
    match shard
        .request(|reply| ToBroker::Gather { query, reply })
        .await?
    {
        BrokerReply::Gathered(part) => Ok(part),
        _ => Err(ErrorCode::Internal),
    }
}

async fn presence(shard: &Shard, channel: &str, full: bool) -> Value {
    match shard.cfg.namespace_of(channel) {
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

async fn info(shard: &Shard) -> Value {
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
    let node = &shard.node;
    let local = node.info_entry(
        shard.cfg.redis.is_some(),
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

fn command(shard: &Shard, cmd: ShardCommand) -> Value {
    match shard.send_command(cmd) {
        Ok(()) => json!({"result": {}}),
        Err(code) => api_error(code),
    }
}
