//! The client protocol over real sockets.

use crate::harness::*;
use serde_json::json;
use std::time::Duration;

#[test]
fn connect_with_token_and_refuse_forged_or_expired() {
    let server = Server::start(BASE_CONFIG, &[]);
    let (_c, reply) = Client::connected(&server, "alice");
    let r = &reply["connect"];
    assert!(!r["client"].as_str().unwrap().is_empty());
    assert_eq!(r["ping"], 25);
    assert_eq!(r["pong"], true);
    assert_eq!(r["expires"], true);

    // Forged: terminal disconnect 3500.
    let mut c = Client::connect_ws(&server);
    let forged = token("alice", None, "not-the-secret");
    c.send_text(&json!({"id": 1, "connect": {"token": forged}}).to_string());
    let closed = c
        .closed(Duration::from_secs(5))
        .expect("closed with a code");
    assert_eq!(
        closed,
        Closed {
            code: 3500,
            reason: "invalid token".into()
        }
    );

    // Expired: error 109 so the SDK refreshes; the connection stays.
    let mut c = Client::connect_ws(&server);
    let expired = token("alice", Some(-10), SECRET);
    let r = c.command("connect", json!({"token": expired}));
    assert_eq!(r["error"]["code"], 109, "{r}");
    let fresh = token("alice", Some(60), SECRET);
    let r = c.command("connect", json!({"token": fresh}));
    assert!(r["connect"].is_object(), "connect after 109 works: {r}");

    // No token without insecure: refused.
    let mut c = Client::connect_ws(&server);
    c.send_text(r#"{"id":1,"connect":{}}"#);
    assert_eq!(c.closed(Duration::from_secs(5)).unwrap().code, 3500);
}

#[test]
fn api_publications_reach_subscribers_on_every_shard_in_order() {
    let server = Server::start(BASE_CONFIG, &[]);
    let mut clients = clients_on_every_shard(&server, 2, 3);
    for c in clients.iter_mut() {
        let r = c.command("subscribe", json!({"channel": "news"}));
        assert!(r["subscribe"].is_object(), "{r}");
    }
    const N: u64 = 300;
    for i in 0..N {
        let (status, body) = api(
            server.addr,
            "publish",
            &json!({"channel": "news", "data": {"n": i}}),
        );
        assert_eq!((status, &body), (200, &json!({"result": {}})));
    }
    for (k, c) in clients.iter_mut().enumerate() {
        for i in 0..N {
            let p = c
                .push(Duration::from_secs(10))
                .unwrap_or_else(|| panic!("client {k} missed {i}"));
            assert_eq!(p["push"]["channel"], "news");
            assert_eq!(p["push"]["pub"]["data"]["n"], i, "client {k} out of order");
        }
        assert!(
            c.push(Duration::from_millis(100)).is_none(),
            "no duplicates"
        );
    }
}

#[test]
fn client_publish_allowed_per_namespace() {
    let server = Server::start(BASE_CONFIG, &[]);
    let mut clients = clients_on_every_shard(&server, 2, 1);
    for c in clients.iter_mut() {
        assert!(c.command("subscribe", json!({"channel": "chat:room"}))["subscribe"].is_object());
        assert!(c.command("subscribe", json!({"channel": "news"}))["subscribe"].is_object());
    }
    let r = clients[0].command(
        "publish",
        json!({"channel": "chat:room", "data": {"text": "hi"}}),
    );
    assert!(r["publish"].is_object(), "{r}");
    let publisher = clients[0].user.clone();
    for c in clients.iter_mut() {
        let p = c.push(Duration::from_secs(5)).expect("publication");
        assert_eq!(p["push"]["pub"]["data"]["text"], "hi");
        assert_eq!(p["push"]["pub"]["info"]["user"], publisher.as_str());
    }
    let r = clients[0].command(
        "publish",
        json!({"channel": "news", "data": {"text": "no"}}),
    );
    assert_eq!(r["error"]["code"], 103, "{r}");
    let r = clients[0].command("publish", json!({"channel": "nope:x", "data": 1}));
    assert_eq!(r["error"]["code"], 102, "{r}");
    for c in clients.iter_mut() {
        assert!(
            c.push(Duration::from_millis(200)).is_none(),
            "refused publish delivered"
        );
    }
}

#[test]
fn unsubscribe_stops_delivery_only_for_that_client() {
    let server = Server::start(BASE_CONFIG, &[]);
    let (mut a, _) = Client::connected(&server, "a");
    let (mut b, _) = Client::connected(&server, "b");
    for c in [&mut a, &mut b] {
        c.command("subscribe", json!({"channel": "news"}));
    }
    assert!(a.command("unsubscribe", json!({"channel": "news"}))["unsubscribe"].is_object());
    api(
        server.addr,
        "publish",
        &json!({"channel": "news", "data": 1}),
    );
    assert!(b.push(Duration::from_secs(5)).is_some());
    assert!(a.push(Duration::from_millis(300)).is_none());
    // The channel disappears from the node once its last subscriber leaves.
    b.command("unsubscribe", json!({"channel": "news"}));
    let (_, r) = api(server.addr, "channels", &json!({}));
    assert_eq!(r["result"]["channels"], json!({}), "{r}");
}

#[test]
fn server_pings_and_closes_clients_that_do_not_pong() {
    let cfg = format!("{BASE_CONFIG}\n[ping]\ninterval_secs = 2\npong_timeout_secs = 1\n");
    let server = Server::start(&cfg, &[]);
    let (mut good, reply) = Client::connected(&server, "good");
    assert_eq!(reply["connect"]["ping"], 2);
    let (mut silent, _) = Client::connected(&server, "silent");
    silent.auto_pong = false;
    good.command("subscribe", json!({"channel": "news"}));
    // Silent is closed with 3012 within ping + pong timeout (+ a tick of the wheel), while the
    // good client keeps reading (and answering pings).
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    let closed = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "silent client not closed"
        );
        assert!(good.push(Duration::from_millis(100)).is_none());
        if let Some(c) = silent.closed(Duration::from_millis(100)) {
            break c;
        }
    };
    assert_eq!(closed.code, 3012);
    assert_eq!(closed.reason, "no pong");
    // Good answered its pings and still receives.
    api(
        server.addr,
        "publish",
        &json!({"channel": "news", "data": "still here"}),
    );
    assert_eq!(
        good.push(Duration::from_secs(5)).unwrap()["push"]["pub"]["data"],
        "still here"
    );
}

#[test]
fn malformed_commands_get_errors_and_others_carry_on() {
    let mut server = Server::start(BASE_CONFIG, &[]);
    let (mut watcher, _) = Client::connected(&server, "watcher");
    watcher.command("subscribe", json!({"channel": "news"}));
    let (mut bad, _) = Client::connected(&server, "bad");
    let r = bad.command("subscribe", json!({"channel": 123}));
    assert_eq!(r["error"]["code"], 107);
    bad.send_text(r#"{"id":77,"frobnicate":{}}"#);
    assert_eq!(bad.reply(77)["error"]["code"], 104);
    let r = bad.command("history", json!({"channel": "news"}));
    assert_eq!(r["error"]["code"], 108);
    let r = bad.command("rpc", json!({"method": "x"}));
    assert_eq!(r["error"]["code"], 108);
    // Not JSON at all: 3501 bad request.
    bad.send_text("this is not json");
    assert_eq!(bad.closed(Duration::from_secs(5)).unwrap().code, 3501);
    // Invalid UTF-8 in a text frame: 1007 (raw frame, tungstenite would refuse to send it).
    let mut raw = Client::connect_ws(&server);
    let frame = shardcast::ws::client_frame(1, true, &[0xff, 0xfe, 0xfd], [9, 8, 7, 6]);
    std::io::Write::write_all(raw.ws.get_mut(), &frame).unwrap();
    assert_eq!(raw.closed(Duration::from_secs(5)).unwrap().code, 1007);
    // Oversized message: 1009.
    let mut big = Client::connect_ws(&server);
    big.send_text(&"x".repeat(70_000));
    assert_eq!(big.closed(Duration::from_secs(5)).unwrap().code, 1009);
    // The well-behaved client still receives.
    api(
        server.addr,
        "publish",
        &json!({"channel": "news", "data": "ok"}),
    );
    assert_eq!(
        watcher.push(Duration::from_secs(5)).unwrap()["push"]["pub"]["data"],
        "ok"
    );
    assert!(server.alive());
}

#[test]
fn presence_and_stats_span_shards() {
    let server = Server::start(BASE_CONFIG, &[]);
    let mut clients = clients_on_every_shard(&server, 2, 1);
    for c in clients.iter_mut() {
        c.command("subscribe", json!({"channel": "chat:p"}));
    }
    let r = clients[0].command("presence", json!({"channel": "chat:p"}));
    let presence = r["presence"]["presence"].as_object().expect("presence map");
    assert_eq!(presence.len(), 2, "{r}");
    for (client, info) in presence {
        assert_eq!(info["client"], client.as_str());
        assert!(info["user"].as_str().unwrap().starts_with("user"));
    }
    let r = clients[1].command("presence_stats", json!({"channel": "chat:p"}));
    assert_eq!(
        r["presence_stats"],
        json!({"num_clients": 2, "num_users": 2})
    );
    let r = clients[1].command("presence", json!({"channel": "news"}));
    assert_eq!(
        r["error"]["code"], 108,
        "presence off in the default namespace"
    );
}

#[test]
fn server_side_subscriptions_from_token() {
    let server = Server::start(BASE_CONFIG, &[]);
    let mut c = Client::connect_ws(&server);
    let t = shardcast::protocol::token::sign_connect(
        SECRET,
        &shardcast::protocol::token::ConnectClaims {
            sub: "carol".into(),
            exp: None,
            info: Some(
                serde_json::value::RawValue::from_string(r#"{"name":"Carol"}"#.into()).unwrap(),
            ),
            channels: vec!["news".into()],
        },
    );
    let r = c.command("connect", json!({"token": t}));
    assert!(r["connect"]["subs"]["news"].is_object(), "{r}");
    assert!(r["connect"].get("expires").is_none());
    api(
        server.addr,
        "publish",
        &json!({"channel": "news", "data": 5}),
    );
    assert_eq!(
        c.push(Duration::from_secs(5)).unwrap()["push"]["pub"]["data"],
        5
    );
}

#[test]
fn expired_connection_is_closed_unless_refreshed() {
    let cfg = format!("client_expired_close_delay_secs = 1\n{BASE_CONFIG}");
    let server = Server::start(&cfg, &[]);
    let mut lapsing = Client::connect_ws(&server);
    let r = lapsing.command("connect", json!({"token": token("lapse", Some(2), SECRET)}));
    assert_eq!(r["connect"]["ttl"], 2, "{r}");
    let mut refreshing = Client::connect_ws(&server);
    refreshing.command("connect", json!({"token": token("fresh", Some(2), SECRET)}));
    let r = refreshing.command(
        "refresh",
        json!({"token": token("fresh", Some(60), SECRET)}),
    );
    assert_eq!(r["refresh"]["expires"], true, "{r}");
    let closed = lapsing
        .closed(Duration::from_secs(8))
        .expect("expired connection closed");
    assert_eq!(
        closed,
        Closed {
            code: 3005,
            reason: "connection expired".into()
        }
    );
    let r = refreshing.command("ping", json!({}));
    assert!(r["ping"].is_object(), "refreshed connection stays: {r}");
    // A refresh token for another user is refused with a terminal disconnect.
    let t = token("mallory", Some(60), SECRET);
    refreshing.send_text(&json!({"id": 99, "refresh": {"token": t}}).to_string());
    assert_eq!(
        refreshing.closed(Duration::from_secs(5)).unwrap().code,
        3500
    );
}

#[test]
fn slow_consumer_is_closed_while_others_receive_everything() {
    let cfg = format!("{BASE_CONFIG}\n[limits]\nmax_outbox_bytes = 262144\n");
    let cfg = cfg.replace("shards = 2", "shards = 1");
    let server = Server::start(&cfg, &[]);
    let (mut slow, _) = Client::connected(&server, "slow");
    let (mut fast, _) = Client::connected(&server, "fast");
    slow.command("subscribe", json!({"channel": "news"}));
    fast.command("subscribe", json!({"channel": "news"}));
    // The slow client stops reading; 200 publications of 32 KB (6.4 MB) go out.
    let big = "x".repeat(32 * 1024);
    let fast_reader = std::thread::spawn(move || {
        let mut got = 0;
        while got < 200 {
            let p = fast
                .push(Duration::from_secs(20))
                .expect("fast client starved");
            assert_eq!(p["push"]["pub"]["data"]["n"], got);
            got += 1;
        }
    });
    for i in 0..200 {
        let (status, body) = api(
            server.addr,
            "publish",
            &json!({"channel": "news", "data": {"n": i, "pad": big}}),
        );
        assert_eq!((status, &body), (200, &json!({"result": {}})));
    }
    fast_reader
        .join()
        .expect("the fast client got all 200 in order");
    // The slow one finds, after what was already in its socket, a 3008 close.
    let closed = slow
        .closed(Duration::from_secs(20))
        .expect("slow client closed");
    assert_eq!(
        closed,
        Closed {
            code: 3008,
            reason: "slow".into()
        }
    );
    // Both slots are released (the slow one at the latest after the close timeout).
    eventually(Duration::from_secs(6), "both connections released", || {
        let (_, info) = api(server.addr, "info", &json!({}));
        info["result"]["nodes"][0]["num_clients"] == 0
    });
}
