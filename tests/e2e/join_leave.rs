//! Join and leave messages (`join_leave`, `force_push_join_leave`) and a subscription's
//! `chan_info`, with raw clients: standalone, and across two nodes sharing one real Redis.

use crate::harness::*;
use serde_json::{json, Value};
use std::time::Duration;

/// `room`: join/leave for those who ask (and presence); `forced`: for every subscriber;
/// `quiet`: none; `vip`: subscription tokens only, join/leave and presence; `hroom`: a history
/// channel with join/leave.
const NAMESPACES: &str = r#"
[namespaces.room]
allow_subscribe_for_client = true
join_leave = true
presence = true
[namespaces.forced]
allow_subscribe_for_client = true
join_leave = true
force_push_join_leave = true
[namespaces.quiet]
allow_subscribe_for_client = true
[namespaces.vip]
join_leave = true
presence = true
[namespaces.hroom]
allow_subscribe_for_client = true
join_leave = true
history_size = 100
history_ttl_secs = 300
recover = true
"#;

const QUIET: Duration = Duration::from_millis(400);
const WAIT: Duration = Duration::from_secs(10);

fn client_id(connect_reply: &Value) -> String {
    connect_reply["connect"]["client"]
        .as_str()
        .expect("client id")
        .to_string()
}

fn subscribe(c: &mut Client, channel: &str, join_leave: bool) {
    let mut req = json!({ "channel": channel });
    if join_leave {
        req["join_leave"] = json!(true);
    }
    let r = c.command("subscribe", req);
    assert!(r["subscribe"].is_object(), "subscribe {channel}: {r}");
}

/// The next push, which must be a join (`"join"`) or leave (`"leave"`) of `channel` by
/// `user`/`client`; returns its info.
fn expect(c: &mut Client, kind: &str, channel: &str, user: &str, client: &str) -> Value {
    let p = c
        .push(WAIT)
        .unwrap_or_else(|| panic!("{} got no {kind} of {user} in {channel}", c.user));
    assert_eq!(p["push"]["channel"], channel, "{p}");
    let info = &p["push"][kind]["info"];
    assert!(info.is_object(), "{} expected a {kind}, got {p}", c.user);
    assert_eq!(info["user"], user, "{p}");
    assert_eq!(info["client"], client, "{p}");
    info.clone()
}

fn nothing(c: &mut Client) {
    if let Some(p) = c.push(QUIET) {
        panic!("{} got an unexpected push: {p}", c.user);
    }
}

fn sub_token(user: &str, channel: &str, info: Value) -> String {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        channel: &'a str,
        info: Value,
    }
    shardcast::protocol::token::sign(
        SECRET,
        &Claims {
            sub: user,
            channel,
            info,
        },
    )
}

#[test]
fn join_and_leave_reach_those_who_asked_and_everyone_where_forced() {
    let server = Server::start(&format!("{BASE_CONFIG}{NAMESPACES}"), &[]);
    let (mut alice, r) = Client::connected(&server, "alice");
    let a_id = client_id(&r);
    let (mut bob, r) = Client::connected(&server, "bob");
    let b_id = client_id(&r);
    let (mut carol, r) = Client::connected(&server, "carol");
    let c_id = client_id(&r);

    // Alice asks: she gets her own join, after her subscribe reply.
    subscribe(&mut alice, "room:1", true);
    expect(&mut alice, "join", "room:1", "alice", &a_id);
    // Bob does not ask: Alice sees him join, he sees nothing (not even himself).
    subscribe(&mut bob, "room:1", false);
    expect(&mut alice, "join", "room:1", "bob", &b_id);
    nothing(&mut bob);
    // Carol asks: both Alice and Carol see her join.
    subscribe(&mut carol, "room:1", true);
    expect(&mut alice, "join", "room:1", "carol", &c_id);
    expect(&mut carol, "join", "room:1", "carol", &c_id);
    nothing(&mut bob);
    // Bob unsubscribes: a leave for the others.
    let r = bob.command("unsubscribe", json!({"channel": "room:1"}));
    assert!(r["unsubscribe"].is_object(), "{r}");
    expect(&mut alice, "leave", "room:1", "bob", &b_id);
    expect(&mut carol, "leave", "room:1", "bob", &b_id);
    nothing(&mut bob);
    // Carol disconnects: a leave for Alice.
    drop(carol);
    expect(&mut alice, "leave", "room:1", "carol", &c_id);
    nothing(&mut alice);

    // Where the namespace forces them, nobody needs to ask.
    subscribe(&mut alice, "forced:1", false);
    expect(&mut alice, "join", "forced:1", "alice", &a_id);
    subscribe(&mut bob, "forced:1", false);
    expect(&mut alice, "join", "forced:1", "bob", &b_id);
    expect(&mut bob, "join", "forced:1", "bob", &b_id);
    drop(bob);
    expect(&mut alice, "leave", "forced:1", "bob", &b_id);

    // Without `join_leave` in the namespace, asking gives nothing.
    let (mut dave, _) = Client::connected(&server, "dave");
    subscribe(&mut alice, "quiet:1", true);
    subscribe(&mut dave, "quiet:1", true);
    dave.command("unsubscribe", json!({"channel": "quiet:1"}));
    nothing(&mut alice);
    nothing(&mut dave);

    // Publications still flow as before, with no join/leave fields.
    let (status, _) = api(
        server.addr,
        "publish",
        &json!({"channel": "room:1", "data": {"n": 1}}),
    );
    assert_eq!(status, 200);
    let p = alice.push(WAIT).expect("publication");
    assert_eq!(p["push"]["pub"]["data"]["n"], 1, "{p}");
}

#[test]
fn chan_info_from_a_subscription_token_is_in_presence_and_join_leave() {
    let server = Server::start(&format!("{BASE_CONFIG}{NAMESPACES}"), &[]);
    let (mut alice, r) = Client::connected(&server, "alice");
    let a_id = client_id(&r);
    let (mut bob, r) = Client::connected(&server, "bob");
    let b_id = client_id(&r);
    let t = sub_token("alice", "vip:1", json!({"role": "host"}));
    let r = alice.command(
        "subscribe",
        json!({"channel": "vip:1", "token": t, "join_leave": true}),
    );
    assert!(r["subscribe"].is_object(), "{r}");
    let info = expect(&mut alice, "join", "vip:1", "alice", &a_id);
    assert_eq!(info["chan_info"], json!({"role": "host"}), "{info}");
    let t = sub_token("bob", "vip:1", json!("guest"));
    let r = bob.command("subscribe", json!({"channel": "vip:1", "token": t}));
    assert!(r["subscribe"].is_object(), "{r}");
    let info = expect(&mut alice, "join", "vip:1", "bob", &b_id);
    assert_eq!(info["chan_info"], "guest", "{info}");
    // Presence, from a client and from the API, carries each subscription's own info.
    let r = bob.command("presence", json!({"channel": "vip:1"}));
    let entries = &r["presence"]["presence"];
    assert_eq!(entries[&a_id]["chan_info"], json!({"role": "host"}), "{r}");
    assert_eq!(entries[&b_id]["chan_info"], "guest", "{r}");
    assert_eq!(entries[&b_id]["user"], "bob", "{r}");
    let (_, body) = api(server.addr, "presence", &json!({"channel": "vip:1"}));
    assert_eq!(
        body["result"]["presence"][&a_id]["chan_info"],
        json!({"role": "host"}),
        "{body}"
    );
    // A subscription without info shows none (and publications never carry chan_info).
    let (mut carol, r) = Client::connected(&server, "carol");
    let c_id = client_id(&r);
    subscribe(&mut carol, "room:9", false);
    let r = carol.command("presence", json!({"channel": "room:9"}));
    let entry = &r["presence"]["presence"][&c_id];
    assert_eq!(entry["user"], "carol", "{r}");
    assert!(entry.get("chan_info").is_none(), "{r}");
    // Bob leaves: the leave carries his chan_info too.
    drop(bob);
    let info = expect(&mut alice, "leave", "vip:1", "bob", &b_id);
    assert_eq!(info["chan_info"], "guest", "{info}");
}

fn node_config(redis: &Redis) -> String {
    format!("redis = \"{}\"\n{BASE_CONFIG}{NAMESPACES}", redis.url())
}

#[test]
fn join_and_leave_cross_nodes_through_redis() {
    let redis = Redis::start(&[]);
    let a = Server::start(&node_config(&redis), &[]);
    let b = Server::start(&node_config(&redis), &[]);
    let (mut alice, r) = Client::connected(&a, "alice");
    let a_id = client_id(&r);
    let (mut bob, r) = Client::connected(&b, "bob");
    let b_id = client_id(&r);
    let (mut carol, r) = Client::connected(&b, "carol");
    let c_id = client_id(&r);

    subscribe(&mut alice, "room:x", true);
    expect(&mut alice, "join", "room:x", "alice", &a_id);
    // Bob on node B asks: his own join comes back through Redis, and Alice on node A sees it.
    subscribe(&mut bob, "room:x", true);
    expect(&mut bob, "join", "room:x", "bob", &b_id);
    expect(&mut alice, "join", "room:x", "bob", &b_id);
    // Carol on node B does not ask: nothing for her, her join for the others.
    subscribe(&mut carol, "room:x", false);
    expect(&mut alice, "join", "room:x", "carol", &c_id);
    expect(&mut bob, "join", "room:x", "carol", &c_id);
    nothing(&mut carol);
    // Alice unsubscribes on node A: node B's subscribers see her leave.
    alice.command("unsubscribe", json!({"channel": "room:x"}));
    expect(&mut bob, "leave", "room:x", "alice", &a_id);
    nothing(&mut carol);
    // Alice comes back and Bob disconnects from node B: Alice sees his leave on node A.
    subscribe(&mut alice, "room:x", true);
    expect(&mut alice, "join", "room:x", "alice", &a_id);
    expect(&mut bob, "join", "room:x", "alice", &a_id);
    drop(bob);
    expect(&mut alice, "leave", "room:x", "bob", &b_id);
    nothing(&mut alice);
    alice.command("unsubscribe", json!({"channel": "room:x"}));

    // Presence across nodes carries chan_info (Redis keeps presence).
    let t = sub_token("carol", "vip:x", json!({"seat": 3}));
    let r = carol.command("subscribe", json!({"channel": "vip:x", "token": t}));
    assert!(r["subscribe"].is_object(), "{r}");
    let t = sub_token("alice", "vip:x", json!(null));
    let r = alice.command(
        "subscribe",
        json!({"channel": "vip:x", "token": t, "join_leave": true}),
    );
    assert!(r["subscribe"].is_object(), "{r}");
    let r = alice.command("presence", json!({"channel": "vip:x"}));
    assert_eq!(
        r["presence"]["presence"][&c_id]["chan_info"],
        json!({"seat": 3}),
        "{r}"
    );
    // Alice's own join; Carol's may come first: node B publishes it after Carol's subscribe
    // reply, so it can reach Redis after node A subscribed for Alice (she was then a
    // subscriber when it was published).
    let p = alice.push(WAIT).expect("alice's join");
    assert_eq!(p["push"]["channel"], "vip:x", "{p}");
    let first = p["push"]["join"]["info"]["client"].clone();
    if first == json!(c_id) {
        expect(&mut alice, "join", "vip:x", "alice", &a_id);
    } else {
        assert_eq!(first, json!(a_id), "{p}");
    }
    drop(carol);
    let info = expect(&mut alice, "leave", "vip:x", "carol", &c_id);
    assert_eq!(info["chan_info"], json!({"seat": 3}), "{info}");
}

#[test]
fn join_and_leave_in_a_history_channel_take_no_offset_across_nodes() {
    let redis = Redis::start(&[]);
    let a = Server::start(&node_config(&redis), &[]);
    let b = Server::start(&node_config(&redis), &[]);
    let (mut watcher, r) = Client::connected(&a, "watcher");
    let w_id = client_id(&r);
    subscribe(&mut watcher, "hroom:1", true);
    expect(&mut watcher, "join", "hroom:1", "watcher", &w_id);
    // Publications and joins/leaves from the other node, interleaved.
    let mut offsets = Vec::new();
    for i in 0..6u64 {
        let node = if i % 2 == 0 { a.addr } else { b.addr };
        let (status, body) = api(
            node,
            "publish",
            &json!({"channel": "hroom:1", "data": {"n": i}}),
        );
        assert_eq!(status, 200, "{body}");
        let (mut guest, r) = Client::connected(&b, &format!("guest{i}"));
        let g_id = client_id(&r);
        subscribe(&mut guest, "hroom:1", false);
        drop(guest);
        // In order on the wire: the publication, the guest's join, the guest's leave.
        let p = watcher.push(WAIT).expect("publication");
        assert_eq!(p["push"]["pub"]["data"]["n"], i, "{p}");
        offsets.push(p["push"]["pub"]["offset"].as_u64().expect("offset"));
        expect(&mut watcher, "join", "hroom:1", &format!("guest{i}"), &g_id);
        expect(
            &mut watcher,
            "leave",
            "hroom:1",
            &format!("guest{i}"),
            &g_id,
        );
    }
    // Contiguous offsets, no repair and no recovery demand (an unsubscribe push).
    assert_eq!(offsets, (1..=6).collect::<Vec<u64>>());
    nothing(&mut watcher);
    // History holds the publications only.
    let (_, body) = api(
        b.addr,
        "history",
        &json!({"channel": "hroom:1", "limit": -1}),
    );
    let pubs = body["result"]["publications"].as_array().expect("history");
    assert_eq!(pubs.len(), 6, "{body}");
    assert!(pubs.iter().all(|p| p["data"]["n"].is_u64()), "{body}");
    // A client recovering from offset 2 gets exactly what followed, recovered.
    let (mut late, _) = Client::connected(&b, "late");
    let epoch = body["result"]["epoch"].as_str().unwrap().to_string();
    let r = late.command(
        "subscribe",
        json!({"channel": "hroom:1", "recover": true, "offset": 2, "epoch": epoch}),
    );
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    let got: Vec<u64> = r["subscribe"]["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(got, vec![3, 4, 5, 6], "{r}");
}

/// A subscription the server API makes (`/api/subscribe`) is announced like any other: a join
/// for those who asked, and a leave when `/api/unsubscribe` ends it.
#[test]
fn api_subscribe_and_unsubscribe_announce_join_and_leave() {
    let server = Server::start(&format!("{BASE_CONFIG}{NAMESPACES}"), &[]);
    let (mut watcher, r) = Client::connected(&server, "watcher");
    let own = client_id(&r);
    subscribe(&mut watcher, "room:api", true);
    expect(&mut watcher, "join", "room:api", "watcher", &own);
    let (mut dave, r) = Client::connected(&server, "dave");
    let dave_id = client_id(&r);
    let (status, body) = api(
        server.addr,
        "subscribe",
        &json!({"user": "dave", "channel": "room:api"}),
    );
    assert_eq!(status, 200, "{body}");
    let p = dave.push(WAIT).expect("a subscribe push");
    assert!(p["push"]["subscribe"].is_object(), "{p}");
    expect(&mut watcher, "join", "room:api", "dave", &dave_id);
    let (status, body) = api(
        server.addr,
        "unsubscribe",
        &json!({"user": "dave", "channel": "room:api"}),
    );
    assert_eq!(status, 200, "{body}");
    expect(&mut watcher, "leave", "room:api", "dave", &dave_id);
}
