//! History and recovery, through the raw protocol: positions, recovery and its window,
//! history paging, idempotent publish, and exactly-once delivery across reconnects while
//! publications flow (standalone and across two Redis-backed nodes). The official SDK runs the
//! user-level scenarios in `recovery.rs`.

use crate::harness::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn config() -> String {
    format!("{BASE_CONFIG}{HISTORY_NAMESPACES}")
}

fn publish(addr: SocketAddr, channel: &str, n: u64) -> Value {
    let (status, body) = api(
        addr,
        "publish",
        &json!({"channel": channel, "data": {"n": n}}),
    );
    assert_eq!(status, 200, "{body}");
    body
}

fn offsets(pubs: &Value) -> Vec<u64> {
    pubs.as_array()
        .map(|a| a.iter().map(|p| p["offset"].as_u64().unwrap()).collect())
        .unwrap_or_default()
}

#[test]
fn positions_recovery_window_and_history_paging() {
    let server = Server::start(&config(), &[]);
    let (mut a, _) = Client::connected(&server, "alice");
    let r = a.command("subscribe", json!({"channel": "feed:1"}));
    let sub = &r["subscribe"];
    assert_eq!(sub["recoverable"], true, "{r}");
    assert_eq!(sub["offset"], 0, "{r}");
    let epoch = sub["epoch"].as_str().expect("an epoch").to_string();
    for n in 1..=3 {
        let body = publish(server.addr, "feed:1", n);
        assert_eq!(body["result"]["offset"], n, "{body}");
        assert_eq!(body["result"]["epoch"], epoch.as_str());
    }
    for n in 1..=3 {
        let p = a.push(Duration::from_secs(5)).expect("a publication");
        assert_eq!(p["push"]["pub"]["offset"], n, "{p}");
        assert_eq!(p["push"]["pub"]["data"]["n"], n);
    }
    // Another client recovers what it missed after offset 1.
    let (mut b, _) = Client::connected(&server, "bob");
    let r = b.command(
        "subscribe",
        json!({"channel": "feed:1", "recover": true, "offset": 1, "epoch": epoch}),
    );
    let sub = &r["subscribe"];
    assert_eq!(sub["recovered"], true, "{r}");
    assert_eq!(sub["was_recovering"], true);
    assert_eq!(sub["offset"], 1, "the position recovered from");
    assert_eq!(offsets(&sub["publications"]), [2, 3]);
    // A plain subscribe learns the shard's own position.
    let (mut c, _) = Client::connected(&server, "carol");
    let r = c.command("subscribe", json!({"channel": "feed:1"}));
    assert_eq!(r["subscribe"]["offset"], 3, "{r}");
    // Another epoch: not recovered, and the current position instead.
    let r = c.command(
        "subscribe",
        json!({"channel": "feed:2", "recover": true, "offset": 1, "epoch": "nope"}),
    );
    let sub = &r["subscribe"];
    assert_eq!(sub["recovered"], json!(null), "{r}");
    assert_eq!(sub["was_recovering"], true);
    assert!(sub["publications"].is_null());
    // ... or error 112 when the client asks for that (flag 2, as SDKs with getState do).
    let r = c.command(
        "subscribe",
        json!({"channel": "feed:3", "recover": true, "offset": 1, "epoch": "nope", "flag": 2}),
    );
    assert_eq!(r["error"]["code"], 112, "{r}");

    // The window: 5 kept, 20 missed.
    let r = c.command("subscribe", json!({"channel": "tiny:1"}));
    let tiny_epoch = r["subscribe"]["epoch"].as_str().unwrap().to_string();
    for n in 1..=20 {
        publish(server.addr, "tiny:1", n);
    }
    let (mut d, _) = Client::connected(&server, "dave");
    let r = d.command(
        "subscribe",
        json!({"channel": "tiny:1", "recover": true, "offset": 2, "epoch": tiny_epoch}),
    );
    assert!(r["subscribe"]["recovered"].is_null(), "{r}");
    assert_eq!(r["subscribe"]["offset"], 20);
    let r = d.command(
        "subscribe",
        json!({"channel": "tiny:1", "recover": true, "offset": 15, "epoch": tiny_epoch}),
    );
    assert_eq!(r["error"]["code"], 105, "already subscribed: {r}");
    let (mut e, _) = Client::connected(&server, "erin");
    let r = e.command(
        "subscribe",
        json!({"channel": "tiny:1", "recover": true, "offset": 15, "epoch": tiny_epoch}),
    );
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    assert_eq!(
        offsets(&r["subscribe"]["publications"]),
        [16, 17, 18, 19, 20]
    );
    // History without recovery: a position, but not recoverable.
    let r = e.command(
        "subscribe",
        json!({"channel": "norec:1", "recover": true, "offset": 0, "epoch": "x"}),
    );
    assert!(r["subscribe"]["recoverable"].is_null(), "{r}");
    assert!(r["subscribe"]["epoch"].is_string(), "{r}");

    // History through the client command (a subscriber may read it).
    let page = |c: &mut Client, q: Value| c.command("history", q);
    let r = page(&mut a, json!({"channel": "feed:1", "limit": 2}));
    assert_eq!(offsets(&r["history"]["publications"]), [1, 2], "{r}");
    assert_eq!(r["history"]["offset"], 3);
    assert_eq!(r["history"]["epoch"], epoch.as_str());
    let r = page(
        &mut a,
        json!({"channel": "feed:1", "limit": 1, "since": {"offset": 1, "epoch": epoch}}),
    );
    assert_eq!(offsets(&r["history"]["publications"]), [2], "{r}");
    let r = page(
        &mut a,
        json!({"channel": "feed:1", "limit": 2, "reverse": true}),
    );
    assert_eq!(offsets(&r["history"]["publications"]), [3, 2], "{r}");
    let r = page(&mut a, json!({"channel": "feed:1"}));
    assert!(r["history"]["publications"].is_null(), "limit 0: {r}");
    assert_eq!(r["history"]["offset"], 3);
    let r = page(
        &mut a,
        json!({"channel": "feed:1", "limit": 1, "since": {"offset": 1, "epoch": "old"}}),
    );
    assert_eq!(r["error"]["code"], 112, "{r}");
    let r = page(&mut a, json!({"channel": "feed:9", "limit": 1}));
    assert_eq!(r["error"]["code"], 103, "not a subscriber: {r}");
    let r = page(&mut a, json!({"channel": "chat:1", "limit": 1}));
    assert_eq!(r["error"]["code"], 108, "no history there: {r}");

    // The same through the API, then removal: the position stays, the publications go.
    let (_, body) = api(
        server.addr,
        "history",
        &json!({"channel": "feed:1", "limit": -1, "reverse": true}),
    );
    assert_eq!(
        offsets(&body["result"]["publications"]),
        [3, 2, 1],
        "{body}"
    );
    let (_, body) = api(server.addr, "history", &json!({"channel": "chat:1"}));
    assert_eq!(body["error"]["code"], 108, "{body}");
    let (_, body) = api(server.addr, "history_remove", &json!({"channel": "feed:1"}));
    assert_eq!(body, json!({"result": {}}));
    let (_, body) = api(
        server.addr,
        "history",
        &json!({"channel": "feed:1", "limit": -1}),
    );
    assert!(body["result"]["publications"].is_null(), "{body}");
    assert_eq!(body["result"]["offset"], 3);
    assert_eq!(publish(server.addr, "feed:1", 4)["result"]["offset"], 4);
}

#[test]
fn idempotent_publish_is_delivered_once() {
    let server = Server::start(&config(), &[]);
    let (mut a, _) = Client::connected(&server, "alice");
    a.command("subscribe", json!({"channel": "feed:i"}));
    a.command("subscribe", json!({"channel": "news"}));
    for channel in ["feed:i", "news"] {
        let body = json!({"channel": channel, "data": {"k": 1}, "idempotency_key": "k1"});
        let (_, first) = api(server.addr, "publish", &body);
        let (_, again) = api(server.addr, "publish", &body);
        assert_eq!(first, again, "the first result, again");
        let p = a.push(Duration::from_secs(5)).expect("published once");
        assert_eq!(p["push"]["channel"], channel);
        assert!(a.push(Duration::from_millis(300)).is_none(), "not twice");
    }
    let (_, other) = api(
        server.addr,
        "publish",
        &json!({"channel": "feed:i", "data": 2, "idempotency_key": "k2"}),
    );
    assert_eq!(other["result"]["offset"], 2, "{other}");
    let (_, info) = api(server.addr, "info", &json!({}));
    assert_eq!(
        info["result"]["nodes"][0]["counters"]["idempotent_repeats"],
        2
    );
    // The history bound's gauge: the two publication objects of feed:i (refreshed each second).
    eventually(Duration::from_secs(3), "history_bytes gauge", || {
        let (_, info) = api(server.addr, "info", &json!({}));
        let bytes = &info["result"]["nodes"][0]["gauges"]["history_bytes"];
        bytes.as_u64().is_some_and(|b| b > 40 && b < 200)
    });
}

/// Clients hop between `nodes` (disconnect, reconnect elsewhere, recover) while `total`
/// publications flow; each must see offsets 1..=total exactly once, in order.
fn exactly_once_across_reconnects(nodes: &[SocketAddr], total: u64) {
    struct Hopper {
        client: Client,
        seen: Vec<u64>,
        epoch: String,
        hops: u32,
    }
    let join = |addr: SocketAddr, user: &str, since: Option<(u64, &str)>| {
        let mut c = Client::connect_addr(addr);
        let t = token(user, Some(3600), SECRET);
        c.command("connect", json!({ "token": t }));
        let mut cmd = json!({"channel": "feed:x"});
        if let Some((offset, epoch)) = since {
            cmd["recover"] = json!(true);
            cmd["offset"] = json!(offset);
            cmd["epoch"] = json!(epoch);
        }
        let r = c.command("subscribe", cmd);
        (c, r)
    };
    let mut hoppers: Vec<Hopper> = (0..4)
        .map(|i| {
            let (client, r) = join(nodes[i % nodes.len()], &format!("u{i}"), None);
            assert_eq!(r["subscribe"]["offset"], 0, "nothing published yet: {r}");
            Hopper {
                client,
                seen: Vec::new(),
                epoch: r["subscribe"]["epoch"].as_str().unwrap().to_string(),
                hops: 0,
            }
        })
        .collect();
    for h in &hoppers {
        assert_eq!(h.seen.len(), 0);
    }
    let starts: Vec<u64> = vec![0; hoppers.len()];
    let publish_to = nodes[0];
    let publisher = std::thread::spawn(move || {
        for n in 1..=total {
            let body = publish(publish_to, "feed:x", n);
            assert_eq!(body["result"]["offset"], n, "{body}");
            std::thread::sleep(Duration::from_millis(6));
        }
    });
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut round = 0usize;
    while hoppers
        .iter()
        .any(|h| h.seen.last().copied().unwrap_or(0) < total)
    {
        assert!(Instant::now() < deadline, "clients did not catch up");
        round += 1;
        for (i, h) in hoppers.iter_mut().enumerate() {
            // Read a little, then (every other round, until the end) hop.
            let until = Instant::now() + Duration::from_millis(40);
            while Instant::now() < until {
                let Some(p) = h.client.push(Duration::from_millis(20)) else {
                    continue;
                };
                h.seen.push(p["push"]["pub"]["offset"].as_u64().unwrap());
            }
            if round % 2 == i % 2 && h.seen.last().copied().unwrap_or(0) < total {
                let last = h.seen.last().copied().unwrap_or(starts[i]);
                let addr = nodes[(i + h.hops as usize + 1) % nodes.len()];
                let (client, r) = join(addr, &format!("u{i}"), Some((last, &h.epoch)));
                let sub = &r["subscribe"];
                assert_eq!(sub["recovered"], true, "client {i} hop {}: {r}", h.hops);
                h.seen.extend(offsets(&sub["publications"]));
                h.client = client; // the old connection closes on drop
                h.hops += 1;
            }
        }
    }
    publisher.join().expect("publisher");
    for (i, h) in hoppers.iter().enumerate() {
        let expected: Vec<u64> = (1..=total).collect();
        assert_eq!(h.seen, expected, "client {i} after {} hops", h.hops);
        assert!(h.hops >= 3, "client {i} hopped only {} times", h.hops);
    }
}

#[test]
fn exactly_once_across_reconnects_standalone() {
    let server = Server::start(&config(), &[]);
    exactly_once_across_reconnects(&[server.addr], 300);
}

#[test]
fn exactly_once_across_reconnects_between_redis_nodes() {
    let redis = Redis::start(&[]);
    let cfg = format!("redis = \"{}\"\n{}", redis.url(), config());
    let a = Server::start(&cfg, &[]);
    let b = Server::start(&cfg, &[]);
    exactly_once_across_reconnects(&[a.addr, b.addr], 300);
    // Positions came from the nodes' own tracking and caches, not one read per client.
    let (_, info) = api(b.addr, "info", &json!({}));
    let counters = &info["result"]["nodes"][0]["counters"];
    assert!(counters["recoveries"].as_u64().unwrap() > 0, "{counters}");
}

#[test]
fn redis_script_flush_and_restart_without_persistence() {
    let mut redis = Redis::start(&[]);
    let cfg = format!("redis = \"{}\"\n{}", redis.url(), config());
    let node = Server::start(&cfg, &[]);
    let (mut a, _) = Client::connected(&node, "alice");
    let r = a.command("subscribe", json!({"channel": "feed:r"}));
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_string();
    for n in 1..=3 {
        publish(node.addr, "feed:r", n);
    }
    // Redis forgets its scripts: the node loads them again (NOSCRIPT) and goes on.
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]), ["OK"]);
    let body = publish(node.addr, "feed:r", 4);
    assert_eq!(body["result"]["offset"], 4, "{body}");
    for n in 1..=4 {
        let p = a.push(Duration::from_secs(5)).expect("a publication");
        assert_eq!(p["push"]["pub"]["offset"], n, "{p}");
    }
    // Redis restarts empty: the channel's history and position are gone. The node notices on
    // its repair read after the reconnect and tells the subscriber to recover (2500).
    redis.restart();
    let p = a
        .push(Duration::from_secs(15))
        .expect("an unsubscribe push after the restart");
    assert_eq!(p["push"]["unsubscribe"]["code"], 2500, "{p}");
    // The SDK would resubscribe with its position: not recoverable, a new epoch.
    let r = a.command(
        "subscribe",
        json!({"channel": "feed:r", "recover": true, "offset": 4, "epoch": epoch}),
    );
    let sub = &r["subscribe"];
    assert!(sub["recovered"].is_null(), "{r}");
    assert_eq!(sub["was_recovering"], true);
    assert_ne!(sub["epoch"].as_str().unwrap(), epoch, "a new epoch");
    assert_eq!(sub["offset"], 0);
    assert_eq!(publish(node.addr, "feed:r", 5)["result"]["offset"], 1);
    let p = a.push(Duration::from_secs(5)).expect("live again");
    assert_eq!(p["push"]["pub"]["offset"], 1, "{p}");
    let (_, info) = api(node.addr, "info", &json!({}));
    let counters = &info["result"]["nodes"][0]["counters"];
    assert_eq!(counters["insufficient_unsubscribes"], 1, "{counters}");
    assert_eq!(counters["insufficient_state"], 1, "{counters}");
}

/// History lives `history_ttl_secs` after the last publication; the position (epoch, offsets)
/// lives `history_meta_ttl_secs`. Past the first, recovery reports `recovered: false` in the
/// same epoch; past the second, the next publication starts a new epoch at offset 1.
fn history_and_position_expire(cfg: &str) {
    let server = Server::start(cfg, &[]);
    let (mut a, _) = Client::connected(&server, "alice");
    let r = a.command("subscribe", json!({"channel": "brief:1"}));
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_string();
    publish(server.addr, "brief:1", 1);
    publish(server.addr, "brief:1", 2);
    let r = a.command("history", json!({"channel": "brief:1", "limit": -1}));
    assert_eq!(offsets(&r["history"]["publications"]), [1, 2], "{r}");
    a.command("unsubscribe", json!({"channel": "brief:1"}));
    eventually(Duration::from_secs(5), "history expires", || {
        let (_, body) = api(
            server.addr,
            "history",
            &json!({"channel": "brief:1", "limit": -1}),
        );
        body["result"]["publications"].is_null()
    });
    let (mut b, _) = Client::connected(&server, "bob");
    let r = b.command(
        "subscribe",
        json!({"channel": "brief:1", "recover": true, "offset": 1, "epoch": epoch}),
    );
    assert!(r["subscribe"]["recovered"].is_null(), "history gone: {r}");
    assert_eq!(r["subscribe"]["epoch"], epoch.as_str(), "same epoch: {r}");
    assert_eq!(r["subscribe"]["offset"], 2);
    b.command("unsubscribe", json!({"channel": "brief:1"}));
    drop((a, b));
    // The position goes too; the next publication starts a new epoch.
    std::thread::sleep(Duration::from_millis(5200));
    let body = publish(server.addr, "brief:1", 3);
    assert_eq!(body["result"]["offset"], 1, "{body}");
    assert_ne!(body["result"]["epoch"], epoch.as_str(), "{body}");
}

const BRIEF: &str = r#"
[namespaces.brief]
allow_subscribe_for_client = true
history_size = 10
history_ttl_secs = 1
history_meta_ttl_secs = 4
recover = true
"#;

#[test]
fn history_and_position_expire_standalone() {
    history_and_position_expire(&format!("{}{BRIEF}", config()));
}

#[test]
fn history_and_position_expire_in_redis() {
    let redis = Redis::start(&[]);
    history_and_position_expire(&format!("redis = \"{}\"\n{}{BRIEF}", redis.url(), config()));
}

#[test]
fn insufficient_state_can_disconnect_instead() {
    let mut redis = Redis::start(&[]);
    let cfg = format!(
        "insufficient_state = \"disconnect\"\nredis = \"{}\"\n{}",
        redis.url(),
        config()
    );
    let node = Server::start(&cfg, &[]);
    let (mut a, _) = Client::connected(&node, "alice");
    a.command("subscribe", json!({"channel": "feed:d"}));
    publish(node.addr, "feed:d", 1);
    assert!(a.push(Duration::from_secs(5)).is_some());
    redis.restart();
    let closed = a.closed(Duration::from_secs(15)).expect("closed");
    assert_eq!(closed.code, 3010, "{closed:?}");
    assert_eq!(closed.reason, "insufficient state");
}

/// A publication that never reached the node over pub/sub (written to the stream only, as a
/// dropped pub/sub message would be) is read from the stream when the next one shows the gap,
/// and delivered before it, without the subscriber noticing.
#[test]
fn live_gap_is_repaired_from_the_stream() {
    let redis = Redis::start(&[]);
    let cfg = format!("redis = \"{}\"\n{}", redis.url(), config());
    let node = Server::start(&cfg, &[]);
    let (mut a, _) = Client::connected(&node, "alice");
    let r = a.command("subscribe", json!({"channel": "feed:g"}));
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_string();
    for n in 1..=3 {
        publish(node.addr, "feed:g", n);
    }
    for n in 1..=3 {
        let p = a.push(Duration::from_secs(5)).expect("live");
        assert_eq!(p["push"]["pub"]["offset"], n);
    }
    // Offset 4 goes into the stream but its PUBLISH is "lost".
    let meta = "shardcast:meta:{feed:g}";
    let stream = "shardcast:stream:{feed:g}";
    assert_eq!(redis.cli(&["HINCRBY", meta, "s", "1"]), ["4"]);
    let lost = r#"{"data":{"lost":true},"offset":4}"#;
    assert_eq!(redis.cli(&["XADD", stream, "4-0", "d", lost]), ["4-0"]);
    let body = publish(node.addr, "feed:g", 5);
    assert_eq!(body["result"]["offset"], 5);
    assert_eq!(body["result"]["epoch"], epoch.as_str());
    let p = a.push(Duration::from_secs(5)).expect("the repaired one");
    assert_eq!(p["push"]["pub"]["offset"], 4, "{p}");
    assert_eq!(p["push"]["pub"]["data"]["lost"], true);
    let p = a.push(Duration::from_secs(5)).expect("then the live one");
    assert_eq!(p["push"]["pub"]["offset"], 5, "{p}");
    assert!(a.push(Duration::from_millis(300)).is_none(), "once each");
    let (_, info) = api(node.addr, "info", &json!({}));
    let counters = &info["result"]["nodes"][0]["counters"];
    // The read that 5's gap started also found 5 (it was in the stream by then): both came
    // from the stream, and the live copy of 5 was dropped as a duplicate.
    assert_eq!(counters["repaired_publications"], 2, "{counters}");
}

/// A standalone node keeps history in memory: after a restart every channel has a new epoch,
/// and a client recovering from before gets `recovered: false`, never a wrong replay.
#[test]
fn standalone_restart_starts_new_epochs() {
    let first = Server::start(&config(), &[]);
    let (mut a, _) = Client::connected(&first, "alice");
    let r = a.command("subscribe", json!({"channel": "feed:s"}));
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_string();
    publish(first.addr, "feed:s", 1);
    drop(a);
    drop(first);
    let second = Server::start(&config(), &[]);
    publish(second.addr, "feed:s", 2);
    let (mut b, _) = Client::connected(&second, "alice");
    let r = b.command(
        "subscribe",
        json!({"channel": "feed:s", "recover": true, "offset": 1, "epoch": epoch}),
    );
    let sub = &r["subscribe"];
    assert!(sub["recovered"].is_null(), "{r}");
    assert_ne!(sub["epoch"].as_str().unwrap(), epoch);
    assert_eq!(sub["offset"], 1, "the new epoch's position");
}

/// Server-side subscriptions (a token's `channels`) in history channels get a position in the
/// connect reply and recover like client ones: the SDK sends `subs` with its positions on
/// reconnect, and the connect reply carries what was missed.
fn server_side_subscriptions_recover(nodes: &[SocketAddr]) {
    let t = shardcast::protocol::token::sign_connect(
        SECRET,
        &shardcast::protocol::token::ConnectClaims {
            sub: "alice".into(),
            exp: Some(now_secs() + 3600),
            info: None,
            channels: vec!["feed:srv".into(), "news".into()],
        },
    );
    let mut a = Client::connect_addr(nodes[0]);
    let r = a.command("connect", json!({ "token": t }));
    let sub = &r["connect"]["subs"]["feed:srv"];
    assert_eq!(sub["recoverable"], true, "{r}");
    let epoch = sub["epoch"].as_str().expect("an epoch").to_string();
    assert_eq!(sub["offset"], 0);
    assert_eq!(r["connect"]["subs"]["news"], json!({}), "no history there");
    for n in 1..=3 {
        publish(nodes[0], "feed:srv", n);
    }
    for n in 1..=3 {
        let p = a.push(Duration::from_secs(5)).expect("live");
        assert_eq!(p["push"]["channel"], "feed:srv");
        assert_eq!(p["push"]["pub"]["offset"], n);
    }
    drop(a);
    for n in 4..=6 {
        publish(nodes[0], "feed:srv", n);
    }
    // Back, on the last node, from offset 3.
    let mut b = Client::connect_addr(nodes[nodes.len() - 1]);
    let subs = json!({"feed:srv": {"recover": true, "offset": 3, "epoch": epoch}});
    let r = b.command("connect", json!({ "token": t, "subs": subs }));
    let sub = &r["connect"]["subs"]["feed:srv"];
    assert_eq!(sub["recovered"], true, "{r}");
    assert_eq!(sub["was_recovering"], true);
    assert_eq!(offsets(&sub["publications"]), [4, 5, 6]);
    publish(nodes[0], "feed:srv", 7);
    let p = b
        .push(Duration::from_secs(5))
        .expect("live after the recovery");
    assert_eq!(p["push"]["pub"]["offset"], 7, "{p}");
    // From another epoch: connected, not recovered.
    let mut c = Client::connect_addr(nodes[0]);
    let subs = json!({"feed:srv": {"recover": true, "offset": 3, "epoch": "old"}});
    let r = c.command("connect", json!({ "token": t, "subs": subs }));
    let sub = &r["connect"]["subs"]["feed:srv"];
    assert!(sub["recovered"].is_null(), "{r}");
    assert_eq!(sub["offset"], 7);
}

#[test]
fn server_side_subscriptions_recover_standalone() {
    let server = Server::start(&config(), &[]);
    server_side_subscriptions_recover(&[server.addr]);
}

#[test]
fn server_side_subscriptions_recover_across_redis_nodes() {
    let redis = Redis::start(&[]);
    let cfg = format!("redis = \"{}\"\n{}", redis.url(), config());
    let a = Server::start(&cfg, &[]);
    let b = Server::start(&cfg, &[]);
    server_side_subscriptions_recover(&[a.addr, b.addr]);
}

/// Redis drops a node's pub/sub connection alone (as it does to pub/sub clients past their
/// output buffer limit): publishes through that node go on without an error, and its
/// subscribers get every publication once, in order, from the repair.
#[test]
fn pubsub_connection_lost_alone_publishes_go_on() {
    let redis = Redis::start(&[]);
    let cfg = format!("redis = \"{}\"\n{}", redis.url(), config());
    let node = Server::start(&cfg, &[]);
    let (mut a, _) = Client::connected(&node, "alice");
    a.command("subscribe", json!({"channel": "feed:k"}));
    let addr = node.addr;
    let publisher = std::thread::spawn(move || {
        for n in 1..=200u64 {
            let body = publish(addr, "feed:k", n);
            assert_eq!(body["result"]["offset"], n, "publish {n}: {body}");
            std::thread::sleep(Duration::from_millis(3));
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_eq!(killed, ["1"], "one pub/sub connection");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < 200 && Instant::now() < deadline {
        if let Some(p) = a.push(Duration::from_millis(200)) {
            seen.push(p["push"]["pub"]["offset"].as_u64().unwrap());
        }
    }
    publisher
        .join()
        .expect("every publish answered with its offset");
    assert_eq!(seen, (1..=200).collect::<Vec<u64>>());
    assert!(a.push(Duration::from_millis(300)).is_none(), "once each");
    let (_, info) = api(node.addr, "info", &json!({}));
    let n = &info["result"]["nodes"][0];
    assert_eq!(n["redis"]["reconnects"], 1, "{n}");
    assert!(
        n["counters"]["repaired_publications"].as_u64().unwrap() > 0,
        "{n}"
    );
}

/// What the official SDKs ask for and read: `positioned` wherever the node tracks offsets (every
/// history channel, with or without recovery), nothing of the sort elsewhere; `delta` is declined
/// as Centrifugo declines a type the namespace does not allow (a subscription without it), and a
/// type it does not know closes the connection with 3501.
#[test]
fn positioned_replies_and_declined_delta() {
    let server = Server::start(&config(), &[]);
    let (mut a, _) = Client::connected(&server, "alice");
    for (channel, recoverable) in [("feed:p", true), ("norec:p", false)] {
        let r = a.command("subscribe", json!({"channel": channel}));
        assert_eq!(r["subscribe"]["positioned"], true, "{r}");
        assert_eq!(
            r["subscribe"]["recoverable"].as_bool().unwrap_or(false),
            recoverable
        );
    }
    // Through the broker's answer too (a recovering subscribe waits for it).
    let epoch = a.command("subscribe", json!({"channel": "feed:q"}))["subscribe"]["epoch"].clone();
    let (mut c, _) = Client::connected(&server, "carol");
    let r = c.command(
        "subscribe",
        json!({"channel": "feed:q", "recover": true, "offset": 0, "epoch": epoch}),
    );
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    assert_eq!(r["subscribe"]["positioned"], true, "{r}");
    let r = a.command("subscribe", json!({"channel": "plain"}));
    assert!(r["subscribe"].is_object(), "{r}");
    assert!(r["subscribe"]["positioned"].is_null(), "{r}");

    // Asked for fossil: subscribed, publications come whole, and the reply says no delta.
    let r = a.command("subscribe", json!({"channel": "feed:d", "delta": "fossil"}));
    assert!(r["subscribe"].is_object(), "{r}");
    assert!(r["subscribe"]["delta"].is_null(), "{r}");
    publish(server.addr, "feed:d", 7);
    let p = a.push(Duration::from_secs(5)).expect("a publication");
    assert_eq!(p["push"]["pub"]["data"]["n"], 7, "{p}");
    assert!(p["push"]["pub"]["delta"].is_null(), "{p}");

    // An unknown delta type: bad request, this connection only.
    let (mut b, _) = Client::connected(&server, "bob");
    b.send_text(
        &json!({"id": 9, "subscribe": {"channel": "feed:d", "delta": "xdelta"}}).to_string(),
    );
    assert_eq!(b.closed(Duration::from_secs(5)).expect("closed").code, 3501);
    publish(server.addr, "feed:d", 8);
    let p = a.push(Duration::from_secs(5)).expect("a publication");
    assert_eq!(p["push"]["pub"]["data"]["n"], 8, "{p}");
}
