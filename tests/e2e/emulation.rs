//! Bidirectional emulation's routing: commands POSTed to `/emulation` reach the connection
//! that owns the session, on any shard of the node and on another node through Redis, and
//! its replies come on that connection's stream. The connections are raw HTTP-streaming
//! clients (`POST /connection/http_stream`); `sdk.rs` runs the official SDK over both
//! emulation transports.

use crate::harness::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// A raw bidirectional HTTP-streaming client: its replies and pushes are the response's
/// newline-delimited JSON lines; its commands go by `POST /emulation`.
struct StreamClient {
    reader: BufReader<TcpStream>,
    pending: std::collections::VecDeque<Value>,
    connect: Value,
}

impl StreamClient {
    /// Opens the stream with a connect command for `user` and reads the connect reply.
    fn open(addr: SocketAddr, user: &str) -> StreamClient {
        let t = token(user, Some(3600), SECRET);
        let body = json!({"id": 1, "connect": {"token": t}}).to_string();
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        write!(
            s,
            "POST /connection/http_stream HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut reader = BufReader::new(s);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut head = String::new();
        while !head.ends_with("\r\n\r\n") {
            assert!(Instant::now() < deadline, "no stream head: {head}");
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            head.push_str(&line);
        }
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let mut c = StreamClient {
            reader,
            pending: Default::default(),
            connect: Value::Null,
        };
        c.connect = c.reply(1);
        assert!(c.connect["connect"].is_object(), "{}", c.connect);
        c
    }

    /// Reads one line into `pending` (server pings `{}` are skipped). False at the end.
    fn read_some(&mut self) -> bool {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => false,
            Ok(_) => {
                let v: Value = serde_json::from_str(line.trim()).expect("JSON lines");
                if !v.as_object().is_some_and(|o| o.is_empty()) {
                    self.pending.push_back(v);
                }
                true
            }
            Err(_) => {
                // A timeout keeps what was read of a partial line in `line`: keep it.
                if !line.is_empty() {
                    let mut rest = String::new();
                    let _ = self.reader.read_line(&mut rest);
                    line.push_str(&rest);
                    if let Ok(v) = serde_json::from_str::<Value>(line.trim()) {
                        self.pending.push_back(v);
                    }
                }
                true
            }
        }
    }

    fn reply(&mut self, id: u32) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(pos) = self.pending.iter().position(|v| v["id"] == id) {
                return self.pending.remove(pos).unwrap();
            }
            assert!(Instant::now() < deadline, "no reply to {id}");
            assert!(
                self.read_some(),
                "stream ended while waiting for reply {id}"
            );
        }
    }

    fn push(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.pending.iter().position(|v| v.get("push").is_some()) {
                return self.pending.remove(pos);
            }
            if Instant::now() >= deadline || !self.read_some() {
                return None;
            }
        }
    }
}

/// The endpoint exists while an emulation transport is enabled.
const TRANSPORTS: &str = "[transports]\nhttp_stream = true\nsse = true\n";

/// Sends one raw request on a fresh connection; returns (status, the whole response).
fn raw(addr: SocketAddr, request: &str) -> (u16, String) {
    http_response(addr, request)
}

/// POSTs `body` to `/emulation` on a fresh connection, with extra header lines.
fn post(addr: SocketAddr, body: &str, headers: &str) -> (u16, String) {
    raw(
        addr,
        &format!(
            "POST /emulation HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// The emulation request for `commands` (JSON lines) of the connection whose connect reply is
/// `reply`, as the SDK builds it.
fn request(reply: &Value, commands: &str) -> String {
    let r = &reply["connect"];
    json!({"session": r["session"], "node": r["node"], "data": commands}).to_string()
}

fn counter(addr: SocketAddr, name: &str) -> u64 {
    let (_, info) = api(addr, "info", &json!({}));
    info["result"]["nodes"][0]["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {info}"))
}

#[test]
fn emulation_posts_reach_their_connection_on_every_shard() {
    let server = Server::start(&format!("{BASE_CONFIG}{TRANSPORTS}"), &[]);
    let mut clients = Vec::new();
    for i in 0..64 {
        if clients.len() == 4 {
            break;
        }
        let c = StreamClient::open(server.addr, &format!("u{i}"));
        let reply = c.connect.clone();
        let shard = Client::shard_of(&reply);
        if clients.iter().filter(|(_, _, s)| *s == shard).count() < 2 {
            clients.push((c, reply, shard));
        }
    }
    assert!(clients.iter().any(|(_, _, s)| *s == 0) && clients.iter().any(|(_, _, s)| *s == 1));
    // A WebSocket connection has no session: nothing can be sent to it by POST.
    let (_ws, ws_reply) = Client::connected(&server, "ws-user");
    assert!(ws_reply["connect"].get("session").is_none(), "{ws_reply}");
    assert!(ws_reply["connect"].get("node").is_none(), "{ws_reply}");
    for (_, reply, shard) in &clients {
        let session = reply["connect"]["session"].as_str().expect("session");
        assert!(session.starts_with(&format!("{shard}.")), "{session}");
        assert!(reply["connect"]["node"]
            .as_str()
            .is_some_and(|n| !n.is_empty()));
    }
    // Each client subscribes through POSTs on fresh connections, which land on either shard;
    // the replies come on its own connection.
    for (k, (c, reply, _)) in clients.iter_mut().enumerate() {
        for n in 0..4u32 {
            let id = 100 + n;
            let channel = format!("chat:emu{k}-{n}");
            let cmd = json!({"id": id, "subscribe": {"channel": channel}}).to_string();
            let (status, text) = post(server.addr, &request(reply, &cmd), "");
            assert_eq!(status, 204, "{text}");
            let r = c.reply(id);
            assert!(r["subscribe"].is_object(), "{r}");
        }
        // Several commands in one POST, as the SDK batches them (JSON lines).
        let batch = format!(
            "{}\n{}",
            json!({"id": 200, "presence": {"channel": format!("chat:emu{k}-0")}}),
            json!({"id": 201, "publish": {"channel": format!("chat:emu{k}-1"), "data": {"k": k}}})
        );
        assert_eq!(post(server.addr, &request(reply, &batch), "").0, 204);
        let presence = c.reply(200);
        assert_eq!(
            presence["presence"]["presence"]
                .as_object()
                .map(|m| m.len()),
            Some(1)
        );
        assert!(c.reply(201)["publish"].is_object());
        let p = c.push(Duration::from_secs(5)).expect("own publication");
        assert_eq!(p["push"]["pub"]["data"]["k"], k);
    }
    assert_eq!(counter(server.addr, "emulation_requests"), 4 * 5);
    assert_eq!(counter(server.addr, "emulation_unknown_sessions"), 0);

    // A session id with a guessed tag, or of an ended connection, reaches nobody: 204 as in
    // Centrifugo (the node is live), counted on the owning shard.
    let (c0, reply0, _) = clients.remove(0);
    let real = reply0["connect"]["session"].as_str().unwrap().to_string();
    let forged = format!("{}0000000000000000", &real[..real.len() - 16]);
    let node = reply0["connect"]["node"].clone();
    let body = json!({"session": forged, "node": node, "data": "{\"id\":1,\"ping\":{}}"});
    assert_eq!(post(server.addr, &body.to_string(), "").0, 204);
    drop(c0);
    let ended = request(
        &reply0,
        "{\"id\":2,\"subscribe\":{\"channel\":\"chat:late\"}}",
    );
    eventually(Duration::from_secs(5), "the connection ends", || {
        let (_, info) = api(server.addr, "info", &json!({}));
        info["result"]["nodes"][0]["num_clients"].as_u64() == Some(4)
    });
    assert_eq!(post(server.addr, &ended, "").0, 204);
    eventually(Duration::from_secs(5), "unknown sessions counted", || {
        counter(server.addr, "emulation_unknown_sessions") == 2
    });

    // Refusals: another node (standalone has one), a body that is not an emulation request,
    // data that is not a JSON string, a body over the bound, GET.
    let other = json!({"session": real, "node": "no-such-node", "data": ""}).to_string();
    assert_eq!(post(server.addr, &other, "").0, 404);
    assert_eq!(post(server.addr, "not json", "").0, 400);
    let object = json!({"session": real, "node": node, "data": {"id": 1}}).to_string();
    assert_eq!(post(server.addr, &object, "").0, 400);
    let huge = json!({"session": real, "node": node, "data": "x".repeat(200 * 1024)});
    assert_eq!(post(server.addr, &huge.to_string(), "").0, 413);
    let (status, _) = http(
        server.addr,
        "GET /emulation HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 405);
    // Protobuf emulation requests are declined (JSON only).
    let pb = raw(
        server.addr,
        "POST /emulation HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\nContent-Length: 2\r\nConnection: close\r\n\r\n\n\x01",
    );
    assert_eq!(pb.0, 400, "{}", pb.1);
    assert!(pb.1.contains("only the JSON protocol"), "{}", pb.1);
    assert_eq!(counter(server.addr, "emulation_refused"), 6);
}

#[test]
fn emulation_cors_follows_allowed_origins() {
    let config =
        format!("allowed_origins = [\"https://app.example.com\"]\n{BASE_CONFIG}{TRANSPORTS}");
    let server = Server::start(&config, &[]);
    let mut c = StreamClient::open(server.addr, "alice");
    let reply = c.connect.clone();
    let cmd = request(&reply, "{\"id\":9,\"subscribe\":{\"channel\":\"chat:c\"}}");
    let (status, text) = post(server.addr, &cmd, "Origin: https://app.example.com\r\n");
    assert_eq!(status, 204, "{text}");
    assert!(
        text.contains("Access-Control-Allow-Origin: https://app.example.com\r\n"),
        "{text}"
    );
    assert!(c.reply(9)["subscribe"].is_object());
    let (status, _) = post(server.addr, &cmd, "Origin: https://evil.test\r\n");
    assert_eq!(status, 403);
    let (status, preflight) = raw(
        server.addr,
        "OPTIONS /emulation HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example.com\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 204, "{preflight}");
    assert!(
        preflight.contains("Access-Control-Allow-Methods: POST, OPTIONS\r\n"),
        "{preflight}"
    );
    assert!(
        preflight.contains("Access-Control-Allow-Headers: content-type\r\n"),
        "{preflight}"
    );
    assert!(preflight.contains("Access-Control-Allow-Origin: https://app.example.com\r\n"));
}

#[test]
fn emulation_post_to_another_node_reaches_the_session_through_redis() {
    let mut redis = Redis::start(&[]);
    let config = format!("redis = \"{}\"\n{BASE_CONFIG}{TRANSPORTS}", redis.url());
    let a = Server::start(&config, &[]);
    let b = Server::start(&config, &[]);
    let mut on_a = StreamClient::open(a.addr, "alice");
    let reply = on_a.connect.clone();
    let (mut on_b, _) = Client::connected(&b, "bob");
    let node_a = reply["connect"]["node"].as_str().unwrap().to_string();
    // Each node listens on its own channel for requests other nodes received.
    let numsub = redis.cli(&["PUBSUB", "NUMSUB", &format!("shardcast:node:{node_a}")]);
    assert_eq!(numsub.get(1).map(|s| s.trim()), Some("1"), "{numsub:?}");
    // Every command of A's connection is POSTed to B.
    let sub = request(&reply, "{\"id\":5,\"subscribe\":{\"channel\":\"chat:x\"}}");
    eventually(Duration::from_secs(10), "B knows node A", || {
        post(b.addr, &sub, "").0 == 204
    });
    assert!(on_a.reply(5)["subscribe"].is_object());
    // Published from B's own client, received by A's.
    on_b.command("subscribe", json!({"channel": "chat:x"}));
    let r = on_b.command("publish", json!({"channel": "chat:x", "data": "hi"}));
    assert!(r["publish"].is_object(), "{r}");
    assert_eq!(
        on_a.push(Duration::from_secs(5)).expect("publication")["push"]["pub"]["data"],
        "hi"
    );
    // Presence asked by A through B sees both nodes' subscribers.
    let pres = request(&reply, "{\"id\":6,\"presence\":{\"channel\":\"chat:x\"}}");
    assert_eq!(post(b.addr, &pres, "").0, 204);
    let p = on_a.reply(6);
    assert_eq!(
        p["presence"]["presence"].as_object().map(|m| m.len()),
        Some(2),
        "{p}"
    );
    assert!(counter(b.addr, "emulation_forwarded") >= 2);
    assert_eq!(counter(a.addr, "emulation_forwarded"), 0);
    // Redis restarted: the node's channel is subscribed again with the rest.
    redis.restart();
    let again = request(
        &reply,
        "{\"id\":7,\"subscribe\":{\"channel\":\"chat:after\"}}",
    );
    eventually(Duration::from_secs(15), "B forwards again", || {
        post(b.addr, &again, "").0 == 204
    });
    eventually(Duration::from_secs(15), "A listens again", || {
        let n = redis.cli(&["PUBSUB", "NUMSUB", &format!("shardcast:node:{node_a}")]);
        n.get(1).map(|s| s.trim()) == Some("1")
    });
    // A request published while A was still resubscribing may be lost (like any pub/sub
    // message; the SDK's command times out and it retries): send until one gets through.
    let mut id = 7;
    let mut answered = false;
    for _ in 0..20 {
        if on_a
            .pending
            .iter()
            .any(|v| v["id"].as_u64().is_some_and(|i| i >= 7))
        {
            answered = true;
            break;
        }
        let _ = on_a.push(Duration::from_millis(200));
        id += 1;
        let cmd = format!("{{\"id\":{id},\"presence_stats\":{{\"channel\":\"chat:x\"}}}}");
        assert_eq!(post(b.addr, &request(&reply, &cmd), "").0, 204);
    }
    assert!(answered, "no reply through B after the Redis restart");
    // A node the cluster does not know: 404 (the SDK reconnects), once one lease refresh
    // (3 s here) has passed since the link came back and every live node re-registered.
    let gone = json!({"session": "0.0.0.0", "node": "no-such-node", "data": ""}).to_string();
    eventually(
        Duration::from_secs(10),
        "an unknown node is refused",
        || post(b.addr, &gone, "").0 == 404,
    );
    // A is registered again: B still forwards to it.
    let last = request(
        &reply,
        "{\"id\":99,\"presence_stats\":{\"channel\":\"chat:x\"}}",
    );
    assert_eq!(post(b.addr, &last, "").0, 204);
    assert!(on_a.reply(99)["presence_stats"].is_object());
}
