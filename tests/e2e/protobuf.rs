//! The protobuf protocol (`centrifuge-protobuf`) against the real binary, with a raw client
//! built on the library's prost types (`shardcast::protocol::pb`): connect, subscribe,
//! publish, history, recovery, presence, rpc, pings, malformed frames, and JSON clients on the
//! same channels; the broker's protobuf encoding counted through `/api/info`.

use crate::harness::*;
use prost::Message as _;
use serde_json::json;
use shardcast::protocol::pb;
use std::net::TcpStream;
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

/// A blocking protobuf client: varint-delimited Commands out, Replies in.
struct PbClient {
    ws: WebSocket<TcpStream>,
    next_id: u32,
    pending: std::collections::VecDeque<pb::Reply>,
    /// Server pings seen (empty replies), each answered with an empty command.
    pings: u32,
    /// The binary payload of the last ping frame.
    last_ping: Vec<u8>,
}

impl PbClient {
    fn open(server: &Server) -> PbClient {
        use tungstenite::client::IntoClientRequest;
        let stream = TcpStream::connect(server.addr).expect("tcp connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut request = format!("ws://{}/connection/websocket", server.addr)
            .into_client_request()
            .unwrap();
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "centrifuge-protobuf".parse().unwrap(),
        );
        let (ws, response) = tungstenite::client::client(request, stream).expect("handshake");
        assert_eq!(
            response.headers()["sec-websocket-protocol"],
            "centrifuge-protobuf"
        );
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        PbClient {
            ws,
            next_id: 1,
            pending: Default::default(),
            pings: 0,
            last_ping: Vec::new(),
        }
    }

    fn connected(server: &Server, user: &str) -> (PbClient, pb::ConnectResult) {
        let mut c = PbClient::open(server);
        let r = c.command(pb::Command {
            connect: Some(pb::ConnectRequest {
                token: token(user, Some(3600), SECRET),
                ..Default::default()
            }),
            ..Default::default()
        });
        let result = r
            .connect
            .clone()
            .unwrap_or_else(|| panic!("connect failed: {r:?}"));
        (c, result)
    }

    fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::binary(bytes)).expect("send");
    }

    /// Sends one command (its id assigned here) and waits for its reply.
    fn command(&mut self, mut cmd: pb::Command) -> pb::Reply {
        cmd.id = self.next_id;
        self.next_id += 1;
        self.send_binary(cmd.encode_length_delimited_to_vec());
        self.reply(cmd.id)
    }

    fn reply(&mut self, id: u32) -> pb::Reply {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(pos) = self.pending.iter().position(|r| r.id == id) {
                return self.pending.remove(pos).unwrap();
            }
            assert!(Instant::now() < deadline, "no reply to {id}");
            if let Err(c) = self.read_some() {
                panic!("closed while waiting for reply {id}: {c:?}");
            }
        }
    }

    fn push(&mut self, timeout: Duration) -> Option<pb::Push> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.pending.iter().position(|r| r.push.is_some()) {
                return self.pending.remove(pos).unwrap().push;
            }
            if Instant::now() >= deadline || self.read_some().is_err() {
                return None;
            }
        }
    }

    /// The next publication pushed on `channel`.
    fn publication(&mut self, channel: &str) -> pb::Publication {
        let p = self
            .push(Duration::from_secs(5))
            .expect("a publication push");
        assert_eq!(p.channel, channel);
        p.r#pub.expect("a publication")
    }

    fn closed(&mut self, timeout: Duration) -> Option<Closed> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Err(c) = self.read_some() {
                return c;
            }
        }
        None
    }

    fn read_some(&mut self) -> Result<(), Option<Closed>> {
        match self.ws.read() {
            Ok(Message::Binary(b)) => {
                let mut buf: &[u8] = &b;
                while !buf.is_empty() {
                    let r = pb::Reply::decode_length_delimited(&mut buf)
                        .expect("server sent varint-delimited replies");
                    if r == pb::Reply::default() {
                        self.pings += 1;
                        self.last_ping = b.to_vec();
                        // The pong: an empty command.
                        self.send_binary(pb::Command::default().encode_length_delimited_to_vec());
                        continue;
                    }
                    self.pending.push_back(r);
                }
                Ok(())
            }
            Ok(Message::Text(t)) => panic!("text frame on a protobuf connection: {t}"),
            Ok(Message::Close(frame)) => Err(frame.map(|f| Closed {
                code: u16::from(f.code),
                reason: f.reason.to_string(),
            })),
            Ok(_) => Ok(()),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(())
            }
            Err(_) => Err(None),
        }
    }
}

fn subscribe(channel: &str) -> pb::Command {
    pb::Command {
        subscribe: Some(pb::SubscribeRequest {
            channel: channel.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn publish(channel: &str, data: &[u8]) -> pb::Command {
    pb::Command {
        publish: Some(pb::PublishRequest {
            channel: channel.into(),
            data: data.to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn counter(server: &Server, name: &str) -> u64 {
    let (_, info) = api(server.addr, "info", &json!({}));
    info["result"]["nodes"][0]["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("counter {name} in {info}"))
}

#[test]
fn protobuf_and_json_clients_share_channels() {
    let server = Server::start(BASE_CONFIG, &[]);
    let (mut p, connect) = PbClient::connected(&server, "alice");
    assert!(!connect.client.is_empty());
    assert_eq!(connect.ping, 25);
    assert!(connect.pong);
    let (mut j, _) = Client::connected(&server, "bob");
    let r = p.command(subscribe("chat:room"));
    assert!(r.subscribe.is_some(), "{r:?}");
    assert!(j.command("subscribe", json!({"channel": "chat:room"}))["subscribe"].is_object());

    // Protobuf publishes JSON text as bytes: the JSON client gets the value, the protobuf
    // one the same bytes, with the publisher's info.
    let r = p.command(publish("chat:room", br#"{"text":"from pb"}"#));
    assert!(r.publish.is_some() && r.error.is_none(), "{r:?}");
    let got = p.publication("chat:room");
    assert_eq!(got.data, br#"{"text":"from pb"}"#);
    assert_eq!(got.info.as_ref().unwrap().user, "alice");
    let push = j.push(Duration::from_secs(5)).unwrap();
    assert_eq!(push["push"]["pub"]["data"], json!({"text": "from pb"}));
    assert_eq!(push["push"]["pub"]["info"]["user"], "alice");

    // A JSON client's publication reaches the protobuf client as the bytes of its JSON text.
    let r = j.command(
        "publish",
        json!({"channel": "chat:room", "data": {"text": "from json"}}),
    );
    assert!(r["publish"].is_object(), "{r}");
    let got = p.publication("chat:room");
    assert_eq!(got.data, br#"{"text":"from json"}"#);
    assert_eq!(got.info.unwrap().user, "bob");
    j.push(Duration::from_secs(5)).unwrap();

    // The server API's too.
    let (status, _) = api(
        server.addr,
        "publish",
        &json!({"channel": "chat:room", "data": [1, 2, 3]}),
    );
    assert_eq!(status, 200);
    assert_eq!(p.publication("chat:room").data, b"[1,2,3]");
    assert_eq!(
        j.push(Duration::from_secs(5)).unwrap()["push"]["pub"]["data"],
        json!([1, 2, 3])
    );

    // Presence lists both, whatever their format.
    let r = p.command(pb::Command {
        presence: Some(pb::PresenceRequest {
            channel: "chat:room".into(),
        }),
        ..Default::default()
    });
    let presence = r.presence.expect("presence result").presence;
    let mut users: Vec<_> = presence.values().map(|i| i.user.clone()).collect();
    users.sort();
    assert_eq!(users, ["alice", "bob"]);
    let r = p.command(pb::Command {
        presence_stats: Some(pb::PresenceStatsRequest {
            channel: "chat:room".into(),
        }),
        ..Default::default()
    });
    let stats = r.presence_stats.unwrap();
    assert_eq!((stats.num_clients, stats.num_users), (2, 2));

    // Errors keep their codes: rpc is not available here, as for a JSON client.
    let json_rpc = j.command("rpc", json!({"method": "m", "data": {}}));
    let r = p.command(pb::Command {
        rpc: Some(pb::RpcRequest {
            method: "m".into(),
            data: b"{}".to_vec(),
        }),
        ..Default::default()
    });
    let e = r.error.expect("rpc is refused");
    assert_eq!(json_rpc["error"]["code"], e.code, "{json_rpc}");
    assert_eq!(e.code, 108, "not available");

    // A payload that is not JSON text cannot be carried: error 107 for that command only.
    let r = p.command(publish("chat:room", &[0xff, 0x00, 0x10]));
    assert_eq!(r.error.expect("refused").code, 107);
    assert!(
        p.push(Duration::from_millis(300)).is_none(),
        "nothing published"
    );
    // Unsubscribe, and the connection goes on.
    let r = p.command(pb::Command {
        unsubscribe: Some(pb::UnsubscribeRequest {
            channel: "chat:room".into(),
        }),
        ..Default::default()
    });
    assert!(r.unsubscribe.is_some(), "{r:?}");
    j.command(
        "publish",
        json!({"channel": "chat:room", "data": {"after": true}}),
    );
    assert!(p.push(Duration::from_millis(500)).is_none(), "unsubscribed");
}

#[test]
fn protobuf_history_and_recovery() {
    let server = Server::start(&format!("{BASE_CONFIG}{HISTORY_NAMESPACES}"), &[]);
    let (mut p, _) = PbClient::connected(&server, "u");
    let ch = "feed:pb";
    let first = p.command(pb::Command {
        subscribe: Some(pb::SubscribeRequest {
            channel: ch.into(),
            recover: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let sub = first.subscribe.expect("subscribed");
    assert!(sub.recoverable, "{sub:?}");
    let epoch = sub.epoch.clone();
    assert!(!epoch.is_empty());
    for n in 1..=3 {
        let (_, body) = api(
            server.addr,
            "publish",
            &json!({"channel": ch, "data": {"n": n}}),
        );
        assert_eq!(body["result"]["offset"], n, "{body}");
        let got = p.publication(ch);
        assert_eq!(got.offset, n);
        assert_eq!(got.data, format!(r#"{{"n":{n}}}"#).as_bytes());
    }
    // History, oldest first.
    let r = p.command(pb::Command {
        history: Some(pb::HistoryRequest {
            channel: "open:h".into(),
            limit: -1,
            ..Default::default()
        }),
        ..Default::default()
    });
    assert!(r.history.is_some(), "{r:?}");
    for n in 1..=2 {
        api(
            server.addr,
            "publish",
            &json!({"channel": "open:h", "data": n}),
        );
    }
    let r = p.command(pb::Command {
        history: Some(pb::HistoryRequest {
            channel: "open:h".into(),
            limit: -1,
            ..Default::default()
        }),
        ..Default::default()
    });
    let h = r.history.expect("history");
    assert_eq!(h.offset, 2);
    let got: Vec<_> = h
        .publications
        .iter()
        .map(|p| (p.offset, p.data.clone()))
        .collect();
    assert_eq!(got, [(1, b"1".to_vec()), (2, b"2".to_vec())]);
    // Newest first, and since a position.
    let history = |p: &mut PbClient, since: Option<pb::StreamPosition>, reverse: bool| {
        let r = p.command(pb::Command {
            history: Some(pb::HistoryRequest {
                channel: "open:h".into(),
                limit: 10,
                since,
                reverse,
            }),
            ..Default::default()
        });
        let offsets: Vec<u64> = r
            .history
            .unwrap()
            .publications
            .iter()
            .map(|p| p.offset)
            .collect();
        offsets
    };
    assert_eq!(history(&mut p, None, true), [2, 1]);
    let since = pb::StreamPosition {
        offset: 1,
        epoch: h.epoch.clone(),
    };
    assert_eq!(history(&mut p, Some(since), false), [2]);

    // A reconnecting protobuf client recovers what it missed.
    drop(p);
    for n in 4..=5 {
        api(
            server.addr,
            "publish",
            &json!({"channel": ch, "data": {"n": n}}),
        );
    }
    let (mut p, _) = PbClient::connected(&server, "u");
    let r = p.command(pb::Command {
        subscribe: Some(pb::SubscribeRequest {
            channel: ch.into(),
            recover: true,
            offset: 3,
            epoch: epoch.clone(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let sub = r.subscribe.expect("subscribed");
    assert!(sub.was_recovering && sub.recovered, "{sub:?}");
    let offsets: Vec<u64> = sub.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, [4, 5]);
    assert_eq!(sub.publications[1].data, br#"{"n":5}"#);
    // A position of another epoch is not recovered.
    let (mut q, _) = PbClient::connected(&server, "u");
    let r = q.command(pb::Command {
        subscribe: Some(pb::SubscribeRequest {
            channel: ch.into(),
            recover: true,
            offset: 1,
            epoch: "another".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let sub = r.subscribe.expect("subscribed");
    assert!(sub.was_recovering && !sub.recovered, "{sub:?}");
}

#[test]
fn malformed_protobuf_closes_only_its_own_connection() {
    let server = Server::start(BASE_CONFIG, &[]);
    let (mut bystander_pb, _) = PbClient::connected(&server, "b1");
    bystander_pb.command(subscribe("chat:m"));
    let (mut bystander_json, _) = Client::connected(&server, "b2");
    bystander_json.command("subscribe", json!({"channel": "chat:m"}));

    // A text frame on a protobuf connection: 3501 bad request.
    let (mut c, _) = PbClient::connected(&server, "x");
    c.command(subscribe("chat:m"));
    c.ws.send(Message::text(r#"{"id":5,"presence":{"channel":"chat:m"}}"#))
        .unwrap();
    assert_eq!(c.closed(Duration::from_secs(5)).unwrap().code, 3501);
    // A length prefix longer than the frame.
    let (mut c, _) = PbClient::connected(&server, "x");
    c.send_binary(vec![0x20, 0x08, 0x01]);
    assert_eq!(c.closed(Duration::from_secs(5)).unwrap().code, 3501);
    // Bytes that are no Command.
    let (mut c, _) = PbClient::connected(&server, "x");
    c.send_binary(vec![0x03, 0xff, 0xff, 0xff]);
    assert_eq!(c.closed(Duration::from_secs(5)).unwrap().code, 3501);
    // An empty binary frame holds no command.
    let (mut c, _) = PbClient::connected(&server, "x");
    c.send_binary(Vec::new());
    assert_eq!(c.closed(Duration::from_secs(5)).unwrap().code, 3501);
    // Before connect, too.
    let mut c = PbClient::open(&server);
    c.send_binary(vec![0x7f]);
    assert_eq!(c.closed(Duration::from_secs(5)).unwrap().code, 3501);

    // The others saw nothing of it and still work.
    api(
        server.addr,
        "publish",
        &json!({"channel": "chat:m", "data": "still"}),
    );
    assert_eq!(bystander_pb.publication("chat:m").data, br#""still""#);
    assert_eq!(
        bystander_json.push(Duration::from_secs(5)).unwrap()["push"]["pub"]["data"],
        "still"
    );
    assert_eq!(counter(&server, "protobuf_malformed"), 5);
}

#[test]
fn protobuf_pings_are_empty_replies_answered_by_empty_commands() {
    let cfg = format!("{BASE_CONFIG}\n[ping]\ninterval_secs = 2\npong_timeout_secs = 1\n");
    let server = Server::start(&cfg, &[]);
    let (mut p, connect) = PbClient::connected(&server, "u");
    assert_eq!(connect.ping, 2);
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        assert!(p.read_some().is_ok(), "kept alive by its pongs");
    }
    assert!(p.pings >= 2, "pings seen: {}", p.pings);
    assert_eq!(p.last_ping, [0], "one empty varint-delimited Reply");
    // Still answering commands.
    assert!(p.command(subscribe("chat:ping")).subscribe.is_some());
}

#[test]
fn a_publication_is_encoded_to_protobuf_once_per_node_and_only_for_protobuf_subscribers() {
    let server = Server::start(BASE_CONFIG, &[]);
    // JSON subscribers only: nothing is encoded to protobuf.
    let mut json_clients = clients_on_every_shard(&server, 2, 1);
    for c in &mut json_clients {
        c.command("subscribe", json!({"channel": "chat:once"}));
    }
    for n in 0..3 {
        api(
            server.addr,
            "publish",
            &json!({"channel": "chat:once", "data": n}),
        );
    }
    for c in &mut json_clients {
        for _ in 0..3 {
            c.push(Duration::from_secs(5)).expect("delivered");
        }
    }
    assert_eq!(counter(&server, "protobuf_encodes"), 0);
    // Protobuf subscribers on both shards: one encoding per publication for the node.
    let mut pbs = Vec::new();
    let mut shards = std::collections::HashSet::new();
    for _ in 0..40 {
        if shards.len() == 2 {
            break;
        }
        let (mut p, connect) = PbClient::connected(&server, "p");
        let shard = Client::shard_of(&json!({"connect": {"client": connect.client}}));
        if shards.insert(shard) {
            p.command(subscribe("chat:once"));
            pbs.push(p);
        }
    }
    assert_eq!(shards.len(), 2, "protobuf clients on both shards");
    for n in 0..4 {
        api(
            server.addr,
            "publish",
            &json!({"channel": "chat:once", "data": n}),
        );
    }
    for p in &mut pbs {
        for n in 0..4 {
            assert_eq!(p.publication("chat:once").data, n.to_string().as_bytes());
        }
    }
    for c in &mut json_clients {
        for n in 0..4 {
            assert_eq!(
                c.push(Duration::from_secs(5)).unwrap()["push"]["pub"]["data"],
                n
            );
        }
    }
    assert_eq!(counter(&server, "protobuf_encodes"), 4);
    assert_eq!(
        counter(&server, "protobuf_transcodes"),
        0,
        "no shard transcoded a publication itself"
    );
    // The protobuf subscribers leave: encoding stops.
    drop(pbs);
    eventually(
        Duration::from_secs(5),
        "protobuf interest withdrawn",
        || {
            let (_, info) = api(server.addr, "info", &json!({}));
            info["result"]["nodes"][0]["num_clients"].as_u64() == Some(2)
                || info["result"]["nodes"][0]["num_clients"].is_null()
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    api(
        server.addr,
        "publish",
        &json!({"channel": "chat:once", "data": 9}),
    );
    for c in &mut json_clients {
        c.push(Duration::from_secs(5)).expect("delivered");
    }
    assert_eq!(counter(&server, "protobuf_encodes"), 4);
}

#[test]
fn protobuf_clients_on_two_redis_nodes() {
    let redis = Redis::start(&[]);
    let cfg = format!(
        "redis = \"{}\"\n{BASE_CONFIG}{HISTORY_NAMESPACES}",
        redis.url()
    );
    let a = Server::start(&cfg, &[]);
    let b = Server::start(&cfg, &[]);
    let (mut pa, _) = PbClient::connected(&a, "a");
    let (mut pb_, _) = PbClient::connected(&b, "b");
    let (mut jb, _) = Client::connected(&b, "j");
    for ch in ["chat:r", "feed:r"] {
        assert!(pa.command(subscribe(ch)).subscribe.is_some());
        assert!(pb_.command(subscribe(ch)).subscribe.is_some());
        assert!(jb.command("subscribe", json!({"channel": ch}))["subscribe"].is_object());
    }
    // Across nodes, in a channel without and with history.
    pa.command(publish("chat:r", br#"{"x":1}"#));
    assert_eq!(pa.publication("chat:r").data, br#"{"x":1}"#);
    assert_eq!(pb_.publication("chat:r").data, br#"{"x":1}"#);
    assert_eq!(
        jb.push(Duration::from_secs(5)).unwrap()["push"]["pub"]["data"],
        json!({"x": 1})
    );
    api(
        a.addr,
        "publish",
        &json!({"channel": "feed:r", "data": "h"}),
    );
    let got = pb_.publication("feed:r");
    assert_eq!((got.offset, got.data.as_slice()), (1, &br#""h""#[..]));
    assert_eq!(pa.publication("feed:r").offset, 1);
    assert_eq!(
        jb.push(Duration::from_secs(5)).unwrap()["push"]["pub"]["offset"],
        1
    );
    assert!(counter(&b, "protobuf_encodes") >= 2);
}

/// What the other parts of the protocol add reaches a protobuf client in its own form: a
/// join/leave push with `chan_info`-less info, a publication's `tags`, binary `b64data` as the
/// raw bytes, and the server API's subscribe and refresh pushes.
#[test]
fn join_leave_tags_binary_data_and_server_pushes_reach_protobuf_clients() {
    let cfg = format!(
        "{BASE_CONFIG}\n[namespaces.room]\nallow_subscribe_for_client = true\njoin_leave = true\nforce_push_join_leave = true\n"
    );
    let server = Server::start(&cfg, &[]);
    let (mut p, _) = PbClient::connected(&server, "alice");
    let r = p.command(subscribe("room:1"));
    assert!(r.error.is_none(), "{r:?}");
    // Its own join first (forced), then a JSON client's join and leave.
    let own = p.push(Duration::from_secs(5)).expect("own join");
    assert_eq!(own.join.expect("a join").info.expect("info").user, "alice");
    let (mut j, reply) = Client::connected(&server, "bob");
    let bob = reply["connect"]["client"].as_str().unwrap().to_string();
    let r = j.command("subscribe", json!({"channel": "room:1"}));
    assert!(r["subscribe"].is_object(), "{r}");
    let join = p.push(Duration::from_secs(5)).expect("bob's join");
    assert_eq!(join.channel, "room:1");
    let info = join.join.expect("a join").info.expect("info");
    assert_eq!(
        (info.user.as_str(), info.client.as_str()),
        ("bob", bob.as_str())
    );
    j.command("unsubscribe", json!({"channel": "room:1"}));
    let leave = p.push(Duration::from_secs(5)).expect("bob's leave");
    assert_eq!(
        leave.leave.expect("a leave").info.expect("info").user,
        "bob"
    );

    // Tags and binary data from the API.
    let (status, body) = api(
        server.addr,
        "publish",
        &json!({"channel": "room:1", "b64data": "AAEC/w==", "tags": {"k": "v"}}),
    );
    assert_eq!(status, 200, "{body}");
    let publication = p.publication("room:1");
    assert_eq!(publication.data, [0u8, 1, 2, 255]);
    assert_eq!(publication.tags.get("k").map(String::as_str), Some("v"));

    // The server API subscribes and refreshes the protobuf connection.
    let (status, body) = api(
        server.addr,
        "subscribe",
        &json!({"user": "alice", "channel": "news", "data": {"hello": 1}}),
    );
    assert_eq!(status, 200, "{body}");
    let sub = p.push(Duration::from_secs(5)).expect("a subscribe push");
    assert_eq!(sub.channel, "news");
    assert_eq!(sub.subscribe.expect("a subscribe").data, br#"{"hello":1}"#);
    let expire_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let (status, body) = api(
        server.addr,
        "refresh",
        &json!({"user": "alice", "expire_at": expire_at}),
    );
    assert_eq!(status, 200, "{body}");
    let refresh = p.push(Duration::from_secs(5)).expect("a refresh push");
    let refresh = refresh.refresh.expect("a refresh");
    assert!(
        refresh.expires && refresh.ttl > 590 && refresh.ttl <= 600,
        "{refresh:?}"
    );
}
