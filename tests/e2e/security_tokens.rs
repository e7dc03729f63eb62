//! Security of tokens and defaults, against the real binary: subscription-token expiry
//! (`expires`/`ttl`, `sub_refresh`, unsubscribe 2501 after `client_expired_sub_close_delay_secs`)
//! by raw protocol and with the official JS SDK (tests/interop/tokens/sub_expiry.tokens.mjs);
//! `token_audience`/`token_issuer`; and the secure subscribe defaults, with dev.toml opening what
//! the README's quickstart uses.

use crate::harness::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn sign(claims: &Value, secret: &str) -> String {
    shardcast::protocol::token::sign(secret, claims)
}

/// A subscription token for `user` and `channel`, expiring `secs` from now (None: never).
fn sub_token(user: &str, channel: &str, secs: Option<u64>) -> String {
    let mut c = json!({"sub": user, "channel": channel});
    if let Some(s) = secs {
        c["exp"] = json!(now_secs() + s);
    }
    sign(&c, SECRET)
}

fn counter(server: &Server, name: &str) -> u64 {
    let (_, info) = api(server.addr, "info", &json!({}));
    info["result"]["nodes"][0]["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}: {info}"))
}

fn publish(server: &Server, channel: &str, data: Value) {
    let (status, body) = api(
        server.addr,
        "publish",
        &json!({"channel": channel, "data": data}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.get("error").is_none(), "{body}");
}

/// Publication pushes that arrive within `wait`, as (channel, data).
fn pubs_within(c: &mut Client, wait: Duration) -> Vec<(String, Value)> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    while let Some(p) = c.push(deadline.saturating_duration_since(Instant::now())) {
        if let Some(pubd) = p["push"].get("pub") {
            got.push((
                p["push"]["channel"].as_str().unwrap().to_string(),
                pubd["data"].clone(),
            ));
        }
    }
    got
}

#[test]
fn subscription_expires_without_refresh_and_only_that_channel_ends() {
    let cfg = format!("client_expired_sub_close_delay_secs = 1\n{BASE_CONFIG}{HISTORY_NAMESPACES}");
    let server = Server::start(&cfg, &[]);
    let (mut c, _) = Client::connected(&server, "alice");
    // An expiring token: the reply announces the expiry.
    let r = c.command(
        "subscribe",
        json!({"channel": "$lapse", "token": sub_token("alice", "$lapse", Some(2))}),
    );
    assert_eq!(r["subscribe"]["expires"], true, "{r}");
    let ttl = r["subscribe"]["ttl"].as_u64().unwrap();
    assert!((1..=2).contains(&ttl), "{r}");
    let subscribed_at = Instant::now();
    // A history channel's subscribe is answered once the broker gave its position: the later
    // reply carries the expiry too.
    let r = c.command(
        "subscribe",
        json!({"channel": "feed:$f", "token": sub_token("alice", "feed:$f", Some(600))}),
    );
    assert_eq!(r["subscribe"]["expires"], true, "{r}");
    assert!(r["subscribe"]["ttl"].as_u64().unwrap() > 590, "{r}");
    assert!(r["subscribe"]["epoch"].is_string(), "{r}");
    // Refreshed in time: stays. A token without exp: stays. No token: stays.
    let r = c.command(
        "subscribe",
        json!({"channel": "$kept", "token": sub_token("alice", "$kept", Some(2))}),
    );
    assert_eq!(r["subscribe"]["expires"], true, "{r}");
    let r = c.command(
        "sub_refresh",
        json!({"channel": "$kept", "token": sub_token("alice", "$kept", Some(60))}),
    );
    assert_eq!(r["sub_refresh"]["expires"], true, "{r}");
    let ttl = r["sub_refresh"]["ttl"].as_u64().unwrap();
    assert!((58..=60).contains(&ttl), "{r}");
    let r = c.command(
        "subscribe",
        json!({"channel": "$forever", "token": sub_token("alice", "$forever", None)}),
    );
    assert!(r["subscribe"].get("expires").is_none(), "{r}");
    assert!(c.command("subscribe", json!({"channel": "news"}))["subscribe"].is_object());
    // A refresh with somebody else's token, or for a channel not subscribed, is refused and
    // changes nothing.
    let r = c.command(
        "sub_refresh",
        json!({"channel": "$lapse", "token": sub_token("bob", "$lapse", Some(60))}),
    );
    assert_eq!(r["error"]["code"], 103, "{r}");
    let r = c.command(
        "sub_refresh",
        json!({"channel": "$nope", "token": sub_token("alice", "$nope", Some(60))}),
    );
    assert_eq!(r["error"]["code"], 103, "{r}");

    // exp (≤ 2 s) + delay (1 s), plus a wheel tick of slack.
    let push = c
        .push(Duration::from_secs(8))
        .expect("an unsubscribe push for the expired subscription");
    let elapsed = subscribed_at.elapsed();
    assert_eq!(
        push,
        json!({"push": {"channel": "$lapse", "unsubscribe": {"code": 2501, "reason": "subscription expired"}}})
    );
    assert!(elapsed >= Duration::from_millis(1500), "after {elapsed:?}");
    // The connection and its other subscriptions carry on.
    for ch in ["$lapse", "$kept", "$forever", "news", "feed:$f"] {
        publish(&server, ch, json!({"ch": ch}));
    }
    let mut got: Vec<String> = pubs_within(&mut c, Duration::from_secs(2))
        .into_iter()
        .map(|(ch, _)| ch)
        .collect();
    got.sort();
    assert_eq!(got, vec!["$forever", "$kept", "feed:$f", "news"]);
    assert_eq!(counter(&server, "sub_expired_unsubscribes"), 1);
    assert_eq!(c.command("ping", json!({}))["ping"], json!({}));
    // Subscribing again with a fresh token works.
    let r = c.command(
        "subscribe",
        json!({"channel": "$lapse", "token": sub_token("alice", "$lapse", Some(60))}),
    );
    assert_eq!(r["subscribe"]["expires"], true, "{r}");
}

#[test]
fn official_js_sdk_refreshes_subscription_tokens() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    assert!(
        dir.join("node_modules/centrifuge").exists(),
        "the JS SDK is not installed: run `npm ci --prefix tests/interop` (the README's test command does)"
    );
    let server = Server::start(
        &format!("client_expired_sub_close_delay_secs = 2\n{BASE_CONFIG}"),
        &[],
    );
    let ran = run_bounded(
        Command::new("node")
            .arg("--test")
            .arg("--test-concurrency=1")
            .arg(dir.join("tokens/sub_expiry.tokens.mjs"))
            .current_dir(&dir)
            .env("SHARDCAST_WS", server.ws_url())
            .env("SHARDCAST_HTTP", server.http_url())
            .env("SHARDCAST_API_KEY", API_KEY)
            .env("SHARDCAST_SECRET", SECRET)
            .env("SHARDCAST_SUB_DELAY_SECS", "2"),
        // Bounded: the two tests take about 20 s; each has its own 30 s timeout.
        Duration::from_secs(70),
    );
    let (status, stdout, stderr) = (ran.status, ran.stdout, ran.stderr);
    let status = status.unwrap_or_else(|| panic!("SDK tests did not finish:\n{stdout}\n{stderr}"));
    assert!(status.success(), "SDK tests failed:\n{stdout}\n{stderr}");
    let count = |what: &str| tap_count(&stdout, what);
    assert_eq!(count("# skipped "), 0, "SDK tests skipped:\n{stdout}");
    assert_eq!(count("# todo "), 0, "SDK tests marked todo:\n{stdout}");
    assert_eq!(count("# fail "), 0, "SDK tests failed:\n{stdout}");
    assert_eq!(count("# pass "), 2, "not every SDK test ran:\n{stdout}");
    assert_eq!(counter(&server, "sub_expired_unsubscribes"), 1);
}

#[test]
fn audience_and_issuer_are_required_when_configured() {
    let cfg =
        format!("token_audience = \"app\"\ntoken_issuer = \"https://auth.example\"\n{BASE_CONFIG}");
    let server = Server::start(&cfg, &[]);
    let exp = now_secs() + 600;
    let refused = [
        json!({"sub": "a", "exp": exp}),
        json!({"sub": "a", "exp": exp, "aud": "app"}),
        json!({"sub": "a", "exp": exp, "iss": "https://auth.example"}),
        json!({"sub": "a", "exp": exp, "aud": "other", "iss": "https://auth.example"}),
        json!({"sub": "a", "exp": exp, "aud": "app", "iss": "https://evil.example"}),
    ];
    for claims in refused {
        let mut c = Client::connect_ws(&server);
        c.send_text(&json!({"id": 1, "connect": {"token": sign(&claims, SECRET)}}).to_string());
        let closed = c.closed(Duration::from_secs(5));
        assert_eq!(
            closed,
            Some(Closed {
                code: 3500,
                reason: "invalid token".into()
            }),
            "{claims}"
        );
    }
    let mut c = Client::connect_ws(&server);
    let good =
        json!({"sub": "a", "exp": exp, "aud": ["app", "other"], "iss": "https://auth.example"});
    let r = c.command("connect", json!({"token": sign(&good, SECRET)}));
    assert!(r["connect"].is_object(), "{r}");
    // Subscription tokens too: error 103, the connection stays.
    for claims in [
        json!({"sub": "a", "channel": "$p"}),
        json!({"sub": "a", "channel": "$p", "aud": "app"}),
        json!({"sub": "a", "channel": "$p", "aud": "x", "iss": "https://auth.example"}),
    ] {
        let r = c.command(
            "subscribe",
            json!({"channel": "$p", "token": sign(&claims, SECRET)}),
        );
        assert_eq!(r["error"]["code"], 103, "{claims}: {r}");
    }
    let claims = json!({"sub": "a", "channel": "$p", "aud": "app", "iss": "https://auth.example"});
    let r = c.command(
        "subscribe",
        json!({"channel": "$p", "token": sign(&claims, SECRET)}),
    );
    assert!(r["subscribe"].is_object(), "{r}");
}

#[test]
fn clients_subscribe_only_where_allowed_by_default() {
    // Nothing opened: the defaults.
    let cfg = r#"
listen = "127.0.0.1:0"
shards = 1
token_hmac_secret = "test-secret"
api_key = "test-api-key"
metrics_listen = "127.0.0.1:0"
[namespaces.dm]
allow_user_limited_channels = true
"#;
    let server = Server::start(cfg, &[]);
    let connect = |user: &str, channels: &[&str]| {
        let mut c = Client::connect_ws(&server);
        let t = shardcast::protocol::token::sign_connect(
            SECRET,
            &shardcast::protocol::token::ConnectClaims {
                sub: user.into(),
                exp: Some(now_secs() + 600),
                info: None,
                channels: channels.iter().map(|s| s.to_string()).collect(),
            },
        );
        let r = c.command("connect", json!({"token": t}));
        assert!(r["connect"].is_object(), "{r}");
        (c, r)
    };
    let (mut alice, reply) = connect("alice", &["news"]);
    assert!(
        reply["connect"]["subs"]["news"].is_object(),
        "the connection token's channels: {reply}"
    );
    let sub = |c: &mut Client, ch: &str, token: Option<String>| {
        let mut p = json!({"channel": ch});
        if let Some(t) = token {
            p["token"] = json!(t);
        }
        c.command("subscribe", p)
    };
    for ch in ["other", "#alice", "dm:plain"] {
        assert_eq!(sub(&mut alice, ch, None)["error"]["code"], 103, "{ch}");
    }
    assert!(sub(&mut alice, "dm:#alice,bob", None)["subscribe"].is_object());
    let (mut eve, _) = connect("eve", &[]);
    assert_eq!(sub(&mut eve, "dm:#alice,bob", None)["error"]["code"], 103);
    assert_eq!(sub(&mut eve, "news", None)["error"]["code"], 103);
    let r = sub(
        &mut eve,
        "other",
        Some(sub_token("eve", "other", Some(600))),
    );
    assert!(r["subscribe"].is_object(), "{r}");
    // Whatever got in receives; nothing else does.
    for ch in ["news", "other", "dm:#alice,bob"] {
        publish(&server, ch, json!({"ch": ch}));
    }
    let mut a: Vec<String> = pubs_within(&mut alice, Duration::from_secs(1))
        .into_iter()
        .map(|(ch, _)| ch)
        .collect();
    a.sort();
    assert_eq!(a, vec!["dm:#alice,bob", "news"]);
    let e: Vec<String> = pubs_within(&mut eve, Duration::from_millis(500))
        .into_iter()
        .map(|(ch, _)| ch)
        .collect();
    assert_eq!(e, vec!["other"]);
}

#[test]
fn dev_config_serves_the_readme_quickstart() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dev = std::fs::read_to_string(root.join("dev.toml")).unwrap();
    // Ephemeral ports instead of 8000/9101 (top-level keys, before any table).
    let cfg = format!("metrics_listen = \"127.0.0.1:0\"\n{dev}");
    let server = Server::start(&cfg, &["--listen", "127.0.0.1:0"]);
    let secret = "dev-secret-change-me";
    let mut c = Client::connect_ws(&server);
    let r = c.command(
        "connect",
        json!({"token": token("alice", Some(600), secret)}),
    );
    assert!(r["connect"].is_object(), "{r}");
    // The quickstart: subscribe to `news`, publish through the API; `chat:` from clients with
    // presence; `feed:` with history.
    for ch in ["news", "chat:room", "feed:x"] {
        let r = c.command("subscribe", json!({"channel": ch}));
        assert!(r["subscribe"].is_object(), "{ch}: {r}");
    }
    let (status, body) = api_with_key(
        server.addr,
        "publish",
        &json!({"channel": "news", "data": {"text": "hello"}}),
        "dev-api-key",
    );
    assert_eq!((status, &body), (200, &json!({"result": {}})));
    let got = pubs_within(&mut c, Duration::from_secs(2));
    assert_eq!(got, vec![("news".to_string(), json!({"text": "hello"}))]);
    let r = c.command("publish", json!({"channel": "chat:room", "data": {"m": 1}}));
    assert!(r["publish"].is_object(), "{r}");
    let r = c.command("presence", json!({"channel": "chat:room"}));
    assert!(r["presence"]["presence"].is_object(), "{r}");
    // Nothing beyond it: other namespaces stay closed.
    let r = c.command("subscribe", json!({"channel": "$private"}));
    assert_eq!(r["error"]["code"], 103, "{r}");
}
