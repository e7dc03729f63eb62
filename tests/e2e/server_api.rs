//! The server API methods and options of issue 19: `subscribe` (subscribe push), `refresh`
//! (refresh push, or 3005), `batch`, `tags`/`skip_history`/`b64data` on publish and broadcast,
//! refused unknown fields, `channels` and `info` — through the official Python client `cent`,
//! with raw requests, and with two nodes on one real `redis-server`.

use crate::harness::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn client_id(connect_reply: &Value) -> String {
    connect_reply["connect"]["client"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Every push a client received until none came for `quiet`.
fn pushes(c: &mut Client, quiet: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    while let Some(p) = c.push(quiet) {
        out.push(p["push"].clone());
    }
    out
}

/// A push in short form: `sub CHANNEL`, `pub CHANNEL DATA [tags T] [offset N]`, `refresh`,
/// `unsub CHANNEL`.
fn short(p: &Value) -> String {
    let ch = p["channel"].as_str().unwrap_or("");
    if let Some(s) = p.get("subscribe") {
        return format!("sub {ch} {s}");
    }
    if let Some(pb) = p.get("pub") {
        let data = match pb.get("b64data") {
            Some(b) => format!("b64 {b}"),
            None => pb["data"].to_string(),
        };
        let mut s = format!("pub {ch} {data}");
        if let Some(t) = pb.get("tags") {
            s += &format!(" tags {t}");
        }
        if let Some(o) = pb.get("offset") {
            s += &format!(" offset {o}");
        }
        return s;
    }
    if let Some(r) = p.get("refresh") {
        return format!("refresh {}", r["expires"]);
    }
    if p.get("unsubscribe").is_some() {
        return format!("unsub {ch}");
    }
    p.to_string()
}

#[test]
fn official_cent_client_calls_every_new_server_api_method_and_option() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = interop_python("cent");
    let cfg = format!("{BASE_CONFIG}{HISTORY_NAMESPACES}");
    let server = Server::start(&cfg, &[]);
    let (mut carol1, c1) = Client::connected(&server, "carol");
    let (mut carol2, c2) = Client::connected(&server, "carol");
    let (mut dave, _) = Client::connected(&server, "dave");
    let out = Command::new(&python)
        .arg(root.join("tests/interop/python/cent_server_api_test.py"))
        .env("SHARDCAST_HTTP", server.http_url())
        .env("SHARDCAST_API_KEY", API_KEY)
        .env("SHARDCAST_CAROL1", client_id(&c1))
        .env("SHARDCAST_CAROL2", client_id(&c2))
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cent tests failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("16 passed, 0 failed"), "{stdout}");

    // What the calls did to the clients, in order.
    let got1: Vec<Value> = pushes(&mut carol1, Duration::from_millis(500));
    let seen1: Vec<String> = got1.iter().map(short).collect();
    let feed_sub = &got1[0]["subscribe"];
    assert_eq!(feed_sub["data"], json!({"hello": 1}), "{seen1:?}");
    assert_eq!(feed_sub["recoverable"], true);
    assert_eq!(feed_sub["positioned"], true);
    assert_eq!(feed_sub["offset"], 0);
    let epoch = feed_sub["epoch"].as_str().unwrap().to_string();
    assert!(!epoch.is_empty());
    assert_eq!(
        seen1[1..],
        [
            r#"sub chat:s {}"#,
            r#"pub feed:s {"n":1} tags {"k":"v"} offset 1"#,
            r#"pub feed:s {"n":2}"#,
            r#"pub feed:s {"n":3} offset 2"#,
            r#"pub chat:s b64 "AAH/""#,
            r#"pub feed:s {"n":4} tags {"b":"1"} offset 3"#,
            r#"pub chat:s {"n":4} tags {"b":"1"}"#,
            r#"pub feed:s {"n":5}"#,
            r#"pub feed:s {"n":6} offset 4"#,
            r#"pub chat:s {"n":7}"#,
        ],
        "what carol's first connection received"
    );
    let got2 = pushes(&mut carol2, Duration::from_millis(200));
    let seen2: Vec<String> = got2.iter().map(short).collect();
    assert_eq!(
        seen2,
        [
            r#"sub chat:s {}"#,
            r#"pub chat:s b64 "AAH/""#,
            r#"pub chat:s {"n":4} tags {"b":"1"}"#,
            r#"pub chat:s {"n":7}"#,
            "refresh true",
            "unsub chat:s",
        ],
        "what carol's second connection received"
    );
    let ttl = got2[4]["refresh"]["ttl"].as_u64().unwrap();
    assert!((590..=600).contains(&ttl), "ttl {ttl}");
    let closed = dave
        .closed(Duration::from_secs(5))
        .expect("dave was closed");
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (3005, "connection expired")
    );
}

#[test]
fn batch_replies_in_order_with_per_command_errors_and_bounds() {
    let cfg = format!("{BASE_CONFIG}{HISTORY_NAMESPACES}[limits]\nmax_api_batch_commands = 3\n");
    let server = Server::start(&cfg, &[]);
    for parallel in [false, true] {
        let (status, body) = api(
            server.addr,
            "batch",
            &json!({"parallel": parallel, "commands": [
                {"publish": {"channel": "feed:b", "data": 1}},
                {"publish": {"channel": "nope:x", "data": 1}},
                {"history": {"channel": "feed:b", "limit": 0, "bogus": 1}},
            ]}),
        );
        assert_eq!(status, 200, "{body}");
        let r = &body["replies"];
        assert_eq!(r.as_array().unwrap().len(), 3, "{body}");
        assert!(r[0]["publish"]["offset"].as_u64().unwrap() >= 1, "{body}");
        assert_eq!(r[1]["error"]["code"], 102, "{body}");
        assert_eq!(r[2]["error"]["code"], 107, "{body}");
        assert!(
            r[2]["error"]["message"].as_str().unwrap().contains("bogus"),
            "{body}"
        );
    }
    // A command is one method; no batch in a batch; unknown methods are 104.
    let (status, body) = api(
        server.addr,
        "batch",
        &json!({"commands": [
            {"publish": {"channel": "feed:b", "data": 1}, "info": {}},
            {"batch": {"commands": []}},
            {"rpc": {}},
        ]}),
    );
    assert_eq!(status, 200, "{body}");
    let codes: Vec<&Value> = (0..3)
        .map(|i| &body["replies"][i]["error"]["code"])
        .collect();
    assert_eq!(codes, [&json!(107), &json!(107), &json!(104)], "{body}");
    // Over limits.max_api_batch_commands: refused whole, nothing run.
    let four = json!({"commands": [
        {"publish": {"channel": "feed:b", "data": 9}}, {"info": {}}, {"info": {}}, {"info": {}}
    ]});
    let (status, body) = api(server.addr, "batch", &four);
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!(107)),
        "{body}"
    );
    let (_, h) = api(
        server.addr,
        "history",
        &json!({"channel": "feed:b", "limit": 0}),
    );
    assert_eq!(h["result"]["offset"], 2, "{h}");
    // The batch's own fields are checked too.
    let (status, _) = api(
        server.addr,
        "batch",
        &json!({"commands": [], "paralel": true}),
    );
    assert_eq!(status, 400);
}

#[test]
fn unknown_fields_are_refused_and_payload_options_are_checked() {
    let server = Server::start(&format!("{BASE_CONFIG}{HISTORY_NAMESPACES}"), &[]);
    for (method, body) in [
        (
            "publish",
            json!({"channel": "feed:u", "data": 1, "delta": true}),
        ),
        (
            "broadcast",
            json!({"channels": ["feed:u"], "data": 1, "version": 3}),
        ),
        (
            "subscribe",
            json!({"user": "u", "channel": "chat:u", "session": "s"}),
        ),
        ("refresh", json!({"user": "u", "info": {}})),
        ("disconnect", json!({"user": "u", "whitelist": ["c"]})),
        (
            "unsubscribe",
            json!({"user": "u", "channel": "chat:u", "session": "s"}),
        ),
        ("presence", json!({"channel": "chat:u", "x": 1})),
        ("channels", json!({"pattern": "*", "x": 1})),
        ("info", json!({"x": 1})),
        ("history", json!({"channel": "feed:u", "x": 1})),
    ] {
        let (status, reply) = api(server.addr, method, &body);
        assert_eq!(status, 400, "{method}: {reply}");
        assert_eq!(reply["error"]["code"], 107, "{method}: {reply}");
        assert!(
            reply["error"]["message"]
                .as_str()
                .unwrap()
                .contains("unknown field"),
            "{method}: {reply}"
        );
    }
    let (_, h) = api(
        server.addr,
        "history",
        &json!({"channel": "feed:u", "limit": 0}),
    );
    assert_eq!(h["result"]["offset"], 0, "nothing published: {h}");
    for body in [
        json!({"channel": "feed:u"}),
        json!({"channel": "feed:u", "data": 1, "b64data": "AA=="}),
        json!({"channel": "feed:u", "b64data": "%%%"}),
        json!({"channel": "feed:u", "data": 1, "idempotency_key": "k".repeat(257)}),
    ] {
        let (_, reply) = api(server.addr, "publish", &body);
        assert_eq!(reply["error"]["code"], 107, "{body}: {reply}");
    }
}

#[test]
fn server_subscribe_positions_and_recovers_or_refuses_an_incomplete_recovery() {
    let server = Server::start(&format!("{BASE_CONFIG}{HISTORY_NAMESPACES}"), &[]);
    let (mut c, _) = Client::connected(&server, "erin");
    let mut epoch = String::new();
    for n in 1..=3 {
        let (_, r) = api(
            server.addr,
            "publish",
            &json!({"channel": "tiny:r", "data": n}),
        );
        epoch = r["result"]["epoch"].as_str().unwrap().to_string();
    }
    // Recover after offset 1: the push, then offsets 2 and 3, then live ones.
    let (_, r) = api(
        server.addr,
        "subscribe",
        &json!({"user": "erin", "channel": "tiny:r", "recover_since": {"offset": 1, "epoch": epoch}}),
    );
    assert_eq!(r, json!({"result": {}}));
    let sub = c.push(Duration::from_secs(5)).expect("subscribe push")["push"].clone();
    assert_eq!(sub["channel"], "tiny:r");
    assert_eq!(sub["subscribe"]["recoverable"], true, "{sub}");
    assert_eq!(sub["subscribe"]["epoch"], epoch.as_str(), "{sub}");
    for n in [2, 3] {
        let p = c.push(Duration::from_secs(5)).unwrap();
        assert_eq!(p["push"]["pub"]["offset"], n, "{p}");
    }
    api(
        server.addr,
        "publish",
        &json!({"channel": "tiny:r", "data": 4}),
    );
    let p = c.push(Duration::from_secs(5)).unwrap();
    assert_eq!(p["push"]["pub"]["offset"], 4, "{p}");
    // Subscribing again changes nothing (already subscribed).
    api(
        server.addr,
        "subscribe",
        &json!({"user": "erin", "channel": "tiny:r"}),
    );
    // Too far back for `tiny` (5 kept): not subscribed at all, no push.
    for n in 5..=12 {
        api(
            server.addr,
            "publish",
            &json!({"channel": "tiny:q", "data": n}),
        );
    }
    let (_, r) = api(
        server.addr,
        "subscribe",
        &json!({"user": "erin", "channel": "tiny:q", "recover_since": {"offset": 1, "epoch": epoch}}),
    );
    assert_eq!(r, json!({"result": {}}));
    let rest = pushes(&mut c, Duration::from_millis(500));
    assert!(rest.is_empty(), "{rest:?}");
    let (_, ch) = api(server.addr, "channels", &json!({}));
    assert!(ch["result"]["channels"].get("tiny:q").is_none(), "{ch}");
    // A client-side subscribe shows the server-side one as taken.
    let r = c.command("subscribe", json!({"channel": "tiny:r"}));
    assert_eq!(r["error"]["code"], 105, "{r}");
}

#[test]
fn refresh_extends_clears_or_expires_connections() {
    let server = Server::start(BASE_CONFIG, &[]);
    let (mut c, _) = Client::connected(&server, "fay");
    let later = now_secs() + 120;
    let (_, r) = api(
        server.addr,
        "refresh",
        &json!({"user": "fay", "expire_at": later}),
    );
    assert_eq!(r, json!({"result": {}}));
    let p = c.push(Duration::from_secs(5)).unwrap();
    let ttl = p["push"]["refresh"]["ttl"].as_u64().unwrap();
    assert!(
        (110..=120).contains(&ttl) && p["push"]["refresh"]["expires"] == true,
        "{p}"
    );
    api(server.addr, "refresh", &json!({"user": "fay"}));
    let p = c.push(Duration::from_secs(5)).unwrap();
    assert_eq!(p["push"], json!({"refresh": {}}), "{p}");
    // A time already past ends it as expired.
    api(
        server.addr,
        "refresh",
        &json!({"user": "fay", "expire_at": 1}),
    );
    let closed = c.closed(Duration::from_secs(5)).expect("closed");
    assert_eq!(closed.code, 3005);
}

fn redis_node(redis: &Redis) -> Server {
    let cfg = format!(
        "redis = \"{}\"\n{BASE_CONFIG}{HISTORY_NAMESPACES}[redis_options]\nlease_refresh_secs = 1\nlease_ttl_secs = 3\n",
        redis.url()
    );
    Server::start(&cfg, &[])
}

#[test]
fn two_redis_nodes_subscribe_refresh_and_list_channels_cluster_wide() {
    let redis = Redis::start(&[]);
    let a = redis_node(&redis);
    let b = redis_node(&redis);
    // Both nodes know each other before asking the cluster.
    for node in [&a, &b] {
        eventually(Duration::from_secs(10), "two nodes registered", || {
            let (_, info) = api(node.addr, "info", &json!({}));
            info["result"]["nodes"].as_array().map_or(0, |n| n.len()) == 2
        });
    }
    let (_, info) = api(a.addr, "info", &json!({}));
    for n in info["result"]["nodes"].as_array().unwrap() {
        assert!(n["process"]["rss"].as_u64().unwrap() > 1 << 20, "{n}");
        assert!(n["process"]["cpu"].as_f64().unwrap() >= 0.0, "{n}");
    }
    let (mut on_a, _) = Client::connected(&a, "gus");
    let (mut on_b, rb) = Client::connected(&b, "gus");
    let (mut other, _) = Client::connected(&b, "hal");
    let r = other.command("subscribe", json!({"channel": "chat:only-b"}));
    assert!(r["subscribe"].is_object(), "{r}");
    // Subscribe through node A: both of gus's connections, on both nodes, get the push.
    let (_, r) = api(
        a.addr,
        "subscribe",
        &json!({"user": "gus", "channel": "feed:x", "data": "hi"}),
    );
    assert_eq!(r, json!({"result": {}}));
    for c in [&mut on_a, &mut on_b] {
        let p = c.push(Duration::from_secs(5)).expect("subscribe push")["push"].clone();
        assert_eq!(
            (&p["channel"], &p["subscribe"]["data"]),
            (&json!("feed:x"), &json!("hi")),
            "{p}"
        );
        assert_eq!(p["subscribe"]["recoverable"], true, "{p}");
    }
    // They receive what is published anywhere.
    api(
        b.addr,
        "publish",
        &json!({"channel": "feed:x", "data": 1, "tags": {"t": "x"}}),
    );
    for c in [&mut on_a, &mut on_b] {
        let p = c.push(Duration::from_secs(5)).expect("publication")["push"].clone();
        assert_eq!(
            (&p["pub"]["data"], &p["pub"]["tags"]),
            (&json!(1), &json!({"t": "x"})),
            "{p}"
        );
    }
    // Channels through either node: every channel of the cluster, counts summed.
    for node in [&a, &b] {
        let (status, ch) = api(node.addr, "channels", &json!({}));
        assert_eq!(status, 200, "{ch}");
        assert_eq!(
            ch["result"]["channels"],
            json!({"feed:x": {"num_clients": 2}, "chat:only-b": {"num_clients": 1}}),
            "{ch}"
        );
        let (_, ch) = api(node.addr, "channels", &json!({"pattern": "chat:*"}));
        assert_eq!(
            ch["result"]["channels"],
            json!({"chat:only-b": {"num_clients": 1}}),
            "{ch}"
        );
    }
    // Refresh through node A reaches the client on node B only (by client id).
    let later = now_secs() + 300;
    let (_, r) = api(
        a.addr,
        "refresh",
        &json!({"user": "gus", "client": client_id(&rb), "expire_at": later}),
    );
    assert_eq!(r, json!({"result": {}}));
    let p = on_b.push(Duration::from_secs(5)).expect("refresh push");
    assert_eq!(p["push"]["refresh"]["expires"], true, "{p}");
    assert!(on_a.push(Duration::from_millis(300)).is_none());
    // Expired through node B closes the one on node A too.
    api(b.addr, "refresh", &json!({"user": "gus", "expired": true}));
    for c in [&mut on_a, &mut on_b] {
        let closed = c.closed(Duration::from_secs(5)).expect("closed");
        assert_eq!(closed.code, 3005);
    }
    // Batch through node A sees the cluster too (once gus's closed connections are gone).
    eventually(
        Duration::from_secs(5),
        "batch sees chat:only-b alone",
        || {
            let (_, body) = api(
                a.addr,
                "batch",
                &json!({"commands": [{"channels": {}}, {"presence_stats": {"channel": "chat:only-b"}}]}),
            );
            body["replies"][0]["channels"]["channels"] == json!({"chat:only-b": {"num_clients": 1}})
                && body["replies"][1]["presence_stats"]["num_clients"] == 1
        },
    );
}
