//! Many nodes as one: two or more real server processes sharing one real `redis-server`.

use crate::harness::*;
use serde_json::json;
use std::time::Duration;

fn node_config(redis: &Redis, extra: &str) -> String {
    format!("redis = \"{}\"\n{BASE_CONFIG}{extra}", redis.url())
}

fn numsub(redis: &Redis, channel: &str) -> u64 {
    let key = format!("shardcast:ch:{{{channel}}}");
    let out = redis.cli(&["PUBSUB", "NUMSUB", &key]);
    out.get(1)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(u64::MAX)
}

#[test]
fn cross_node_delivery_in_order_with_one_redis_subscription_per_node() {
    let redis = Redis::start(&[]);
    let a = Server::start(&node_config(&redis, ""), &[]);
    let b = Server::start(&node_config(&redis, ""), &[]);
    let mut on_a = clients_on_every_shard(&a, 2, 2);
    let mut on_b = clients_on_every_shard(&b, 2, 2);
    for c in on_a.iter_mut().chain(on_b.iter_mut()) {
        let r = c.command("subscribe", json!({"channel": "news"}));
        assert!(r["subscribe"].is_object(), "{r}");
    }
    // Four clients per node, one Redis subscription per node.
    assert_eq!(numsub(&redis, "news"), 2);
    const N: u64 = 200;
    for i in 0..N {
        let node = if i % 2 == 0 { a.addr } else { b.addr };
        let (status, body) = api(
            node,
            "publish",
            &json!({"channel": "news", "data": {"n": i}}),
        );
        assert_eq!((status, &body), (200, &json!({"result": {}})));
    }
    for (k, c) in on_a.iter_mut().chain(on_b.iter_mut()).enumerate() {
        for i in 0..N {
            let p = c
                .push(Duration::from_secs(10))
                .unwrap_or_else(|| panic!("client {k} missed {i}"));
            assert_eq!(p["push"]["pub"]["data"]["n"], i, "client {k} out of order");
        }
        assert!(
            c.push(Duration::from_millis(100)).is_none(),
            "duplicate delivery"
        );
    }
    // A client publication on B reaches a subscriber on A.
    on_a[0].command("subscribe", json!({"channel": "chat:x"}));
    let r = on_b[0].command("publish", json!({"channel": "chat:x", "data": "from b"}));
    assert!(r["publish"].is_object(), "{r}");
    assert_eq!(
        on_a[0].push(Duration::from_secs(5)).unwrap()["push"]["pub"]["data"],
        "from b"
    );
    // Release: node B leaves when its last subscriber unsubscribes, A when its last disconnects.
    for c in on_b.iter_mut() {
        c.command("unsubscribe", json!({"channel": "news"}));
    }
    eventually(
        Duration::from_secs(5),
        "node B released its subscription",
        || numsub(&redis, "news") == 1,
    );
    drop(on_a);
    eventually(
        Duration::from_secs(5),
        "node A released its subscription",
        || numsub(&redis, "news") == 0,
    );
    // Both nodes are listed by either one.
    let (_, info) = api(a.addr, "info", &json!({}));
    let nodes = info["result"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{info}");
    assert!(nodes
        .iter()
        .all(|n| n["uid"].is_string() && n["name"].is_string()));
    assert_eq!(nodes[0]["redis"]["state"], "connected");
}

#[test]
fn redis_killed_and_restarted_mid_stream() {
    let mut redis = Redis::start(&[]);
    let cfg = node_config(
        &redis,
        "[redis_options]\nbackoff_initial_ms = 50\nbackoff_max_ms = 500\n",
    );
    let a = Server::start(&cfg, &[]);
    let b = Server::start(&cfg, &[]);
    let (mut sub, _) = Client::connected(&b, "reader");
    assert!(sub.command("subscribe", json!({"channel": "news"}))["subscribe"].is_object());
    assert!(sub.command("subscribe", json!({"channel": "chat:room"}))["subscribe"].is_object());
    for i in 0..20 {
        assert_eq!(
            api(a.addr, "publish", &json!({"channel": "news", "data": i})).1,
            json!({"result": {}})
        );
    }
    for i in 0..20 {
        assert_eq!(
            sub.push(Duration::from_secs(5)).unwrap()["push"]["pub"]["data"],
            i
        );
    }
    redis.kill();
    // Redis down: publishes answer a temporary error, connections stay up.
    eventually(
        Duration::from_secs(5),
        "publish fails while Redis is down",
        || {
            let (status, body) = api(
                a.addr,
                "publish",
                &json!({"channel": "news", "data": "lost?"}),
            );
            status == 200 && body["error"]["code"] == 100 && body["error"]["temporary"] == true
        },
    );
    let (mut client_pub, _) = Client::connected(&a, "writer");
    let r = client_pub.command("publish", json!({"channel": "chat:y", "data": 1}));
    assert_eq!(r["error"]["code"], 100, "{r}");
    assert_eq!(r["error"]["temporary"], true);
    let (_, info) = api(a.addr, "info", &json!({}));
    assert_eq!(
        info["result"]["nodes"][0]["redis"]["state"], "down",
        "{info}"
    );
    assert!(
        sub.command("ping", json!({}))["ping"].is_object(),
        "client connection survived"
    );
    // A subscription that cannot reach Redis is refused (temporary), not silently half-made.
    let r = sub.command("subscribe", json!({"channel": "fresh"}));
    assert_eq!(r["error"]["code"], 100, "{r}");
    assert_eq!(r["error"]["temporary"], true);
    redis.restart();
    // The multiplexer reconnects and resubscribes; delivery resumes without the client doing
    // anything. Node b has resubscribed once Redis counts its subscription again (before that,
    // a publication on this plain channel is at-most-once and may miss it).
    eventually(Duration::from_secs(10), "node b resubscribed", || {
        numsub(&redis, "news") == 1
    });
    eventually(Duration::from_secs(10), "publish works again", || {
        api(
            a.addr,
            "publish",
            &json!({"channel": "news", "data": "back"}),
        )
        .1 == json!({"result": {}})
    });
    let first = sub.push(Duration::from_secs(5)).expect("delivery resumed");
    let r = sub.command("subscribe", json!({"channel": "fresh"}));
    assert!(r["subscribe"].is_object(), "subscribe works again: {r}");
    assert_eq!(first["push"]["pub"]["data"], "back");
    while sub.push(Duration::from_millis(200)).is_some() {} // further "back" probes
    for i in 100..120 {
        assert_eq!(
            api(a.addr, "publish", &json!({"channel": "news", "data": i})).1,
            json!({"result": {}})
        );
    }
    for i in 100..120 {
        assert_eq!(
            sub.push(Duration::from_secs(5)).unwrap()["push"]["pub"]["data"],
            i
        );
    }
    let (_, info) = api(b.addr, "info", &json!({}));
    assert_eq!(
        info["result"]["nodes"][0]["redis"]["reconnects"], 1,
        "{info}"
    );
    assert_eq!(numsub(&redis, "news"), 1);
}

#[test]
fn killed_node_presence_vanishes_within_lease_ttl() {
    let redis = Redis::start(&[]);
    let cfg = node_config(
        &redis,
        "[redis_options]\nlease_ttl_secs = 2\nlease_refresh_secs = 1\n",
    );
    let a = Server::start(&cfg, &[]);
    let mut b = Server::start(&cfg, &[]);
    let (mut ca, _) = Client::connected(&a, "ann");
    let (mut cb, _) = Client::connected(&b, "bert");
    let (mut cb2, _) = Client::connected(&b, "bert");
    for c in [&mut ca, &mut cb, &mut cb2] {
        assert!(c.command("subscribe", json!({"channel": "chat:p"}))["subscribe"].is_object());
    }
    let stats =
        |node| api(node, "presence_stats", &json!({"channel": "chat:p"})).1["result"].clone();
    eventually(Duration::from_secs(5), "presence spans both nodes", || {
        stats(a.addr) == json!({"num_clients": 3, "num_users": 2})
    });
    let r = ca.command("presence", json!({"channel": "chat:p"}));
    assert_eq!(
        r["presence"]["presence"].as_object().unwrap().len(),
        3,
        "{r}"
    );
    // A clean leave is removed at once.
    cb2.command("unsubscribe", json!({"channel": "chat:p"}));
    eventually(Duration::from_secs(5), "a leave is seen", || {
        stats(a.addr) == json!({"num_clients": 2, "num_users": 2})
    });
    // Node B dies without a goodbye: its entries stop counting once its lease lapses.
    let _ = b.child.kill();
    let _ = b.child.wait();
    let killed = std::time::Instant::now();
    eventually(
        Duration::from_secs(6),
        "the dead node's presence vanished",
        || stats(a.addr) == json!({"num_clients": 1, "num_users": 1}),
    );
    assert!(
        killed.elapsed() <= Duration::from_secs(4),
        "took {:?}",
        killed.elapsed()
    );
    let (_, info) = api(a.addr, "info", &json!({}));
    assert_eq!(
        info["result"]["nodes"].as_array().unwrap().len(),
        1,
        "{info}"
    );
}

#[test]
fn user_commands_reach_every_node() {
    let redis = Redis::start(&[]);
    let a = Server::start(&node_config(&redis, ""), &[]);
    let b = Server::start(&node_config(&redis, ""), &[]);
    let (mut bob_b, _) = Client::connected(&b, "bob");
    let (mut bob_a, _) = Client::connected(&a, "bob");
    let (mut eve, _) = Client::connected(&b, "eve");
    for c in [&mut bob_b, &mut bob_a, &mut eve] {
        c.command("subscribe", json!({"channel": "news"}));
    }
    // One personal channel per node holding bob.
    assert_eq!(
        redis
            .cli(&["PUBSUB", "NUMSUB", "shardcast:user:{bob}"])
            .get(1)
            .map(String::as_str),
        Some("2")
    );
    let (_, r) = api(
        a.addr,
        "unsubscribe",
        &json!({"user": "bob", "channel": "news"}),
    );
    assert_eq!(r, json!({"result": {}}));
    for c in [&mut bob_b, &mut bob_a] {
        let p = c.push(Duration::from_secs(5)).expect("unsubscribe push");
        assert!(p["push"]["unsubscribe"].is_object(), "{p}");
    }
    let (_, r) = api(
        a.addr,
        "disconnect",
        &json!({"user": "bob", "disconnect": {"code": 4100, "reason": "bye"}}),
    );
    assert_eq!(r, json!({"result": {}}));
    assert_eq!(bob_b.closed(Duration::from_secs(5)).unwrap().code, 4100);
    assert_eq!(bob_a.closed(Duration::from_secs(5)).unwrap().code, 4100);
    // Eve is untouched.
    api(
        a.addr,
        "publish",
        &json!({"channel": "news", "data": "eve"}),
    );
    assert_eq!(
        eve.push(Duration::from_secs(5)).unwrap()["push"]["pub"]["data"],
        "eve"
    );
}

#[test]
fn auth_and_select() {
    let redis = Redis::start(&["--requirepass", "s3cret"]);
    let url = format!("redis://:s3cret@127.0.0.1:{}/3", redis.port);
    let cfg = format!("redis = \"{url}\"\n{BASE_CONFIG}");
    let a = Server::start(&cfg, &[]);
    let (mut c, _) = Client::connected(&a, "x");
    assert!(c.command("subscribe", json!({"channel": "news"}))["subscribe"].is_object());
    assert_eq!(
        api(a.addr, "publish", &json!({"channel": "news", "data": 1})).1,
        json!({"result": {}})
    );
    assert_eq!(
        c.push(Duration::from_secs(5)).unwrap()["push"]["pub"]["data"],
        1
    );
    // The lease lives in database 3.
    let keys = redis.cli(&["-n", "3", "KEYS", "shardcast:node:*"]);
    assert_eq!(keys.len(), 1, "{keys:?}");
    // A wrong password: the node runs, reports the link down, and refuses publishes.
    let bad = format!(
        "redis = \"redis://:wrong@127.0.0.1:{}\"\n{BASE_CONFIG}",
        redis.port
    );
    let b = Server::start(&bad, &[]);
    let (_, info) = api(b.addr, "info", &json!({}));
    assert_eq!(
        info["result"]["nodes"][0]["redis"]["state"], "down",
        "{info}"
    );
    let (_, body) = api(b.addr, "publish", &json!({"channel": "news", "data": 1}));
    assert_eq!(body["error"]["code"], 100);
    assert!(
        b.stderr.lock().unwrap().contains("WRONGPASS")
            || b.stderr.lock().unwrap().contains("invalid")
    );
}

#[test]
fn draining_node_leaves_the_registry_at_once() {
    let redis = Redis::start(&[]);
    let a = Server::start(&node_config(&redis, ""), &[]);
    let b = Server::start(
        &node_config(
            &redis,
            "[drain]\nlistener_grace_secs = 1\nwindow_secs = 1\ndeadline_secs = 5\n",
        ),
        &[],
    );
    let nodes = |addr| {
        api(addr, "info", &json!({})).1["result"]["nodes"]
            .as_array()
            .map(|n| n.len())
            .unwrap_or(0)
    };
    eventually(Duration::from_secs(5), "both nodes registered", || {
        nodes(a.addr) == 2
    });
    // SAFETY: signalling a child process we started.
    unsafe { libc::kill(b.child.id() as i32, libc::SIGTERM) };
    // Well before the 10 s lease would lapse.
    eventually(Duration::from_secs(2), "B left the registry", || {
        nodes(a.addr) == 1
    });
}
