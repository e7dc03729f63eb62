//! The HTTP side: API, health, bad upgrades, configuration and the token command.

use crate::harness::*;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

#[test]
fn api_auth_health_and_unknown_paths() {
    let server = Server::start(BASE_CONFIG, &[]);
    let (status, _) = api_with_key(server.addr, "info", &json!({}), "wrong");
    assert_eq!(status, 401);
    let (status, _) = http(
        server.addr,
        "POST /api/info HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 401, "missing key");
    let (status, body) = http(server.addr, "POST /api/info HTTP/1.1\r\nAuthorization: apikey test-api-key\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(
        server.addr,
        "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _) = http(server.addr, "GET /nope HTTP/1.1\r\n\r\n");
    assert_eq!(status, 404);
    let (status, _) = api(server.addr, "frobnicate", &json!({}));
    assert_eq!(status, 404);
    let (status, _) = http(server.addr, "POST /api/publish HTTP/1.1\r\nX-API-Key: test-api-key\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{oops");
    assert_eq!(status, 400);
    let (status, body) = api(
        server.addr,
        "publish",
        &json!({"channel": "nope:1", "data": 1}),
    );
    assert_eq!((status, body["error"]["code"].as_u64()), (200, Some(102)));
    let (status, body) = api(server.addr, "history", &json!({"channel": "news"}));
    assert_eq!((status, body["error"]["code"].as_u64()), (200, Some(108)));
}

#[test]
fn api_keep_alive_serves_several_requests() {
    use std::io::{Read, Write};
    let server = Server::start(BASE_CONFIG, &[]);
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let body = r#"{"channel":"news","data":1}"#;
    let req = format!(
        "POST /api/publish HTTP/1.1\r\nX-API-Key: test-api-key\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // Two requests in one write (pipelined), then a third.
    s.write_all(format!("{req}{req}").as_bytes()).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while got.matches("{\"result\":{}}").count() < 3 {
        let n = s.read(&mut buf).expect("three responses on one connection");
        assert!(n > 0, "closed early: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[test]
fn bad_upgrades_get_4xx_not_hangs() {
    let server = Server::start(BASE_CONFIG, &[]);
    let cases = [
        ("GET /connection/websocket HTTP/1.1\r\nHost: t\r\n\r\n", 426),
        ("GET /connection/websocket HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n", 400),
        ("GET /connection/websocket HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n", 400),
        ("GET /connection/websocket HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n", 400),
        ("POST /connection/websocket HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n", 405),
        ("\x16\x03\x01 not http at all\r\n\r\n", 400),
    ];
    for (req, want) in cases {
        let (status, _) = http(server.addr, req);
        assert_eq!(status, want, "{req:?}");
    }
    // An oversized head: 431.
    let big = format!(
        "GET /connection/websocket HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    assert_eq!(http(server.addr, &big).0, 431);
}

#[test]
fn connection_limit_answers_503_before_upgrade() {
    let cfg = format!("{BASE_CONFIG}\n[limits]\nmax_connections = 2\n");
    let server = Server::start(&cfg, &[]);
    let _a = Client::connected(&server, "a");
    let _b = Client::connected(&server, "b");
    let (status, _) = http(server.addr, "GET /connection/websocket HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
    assert_eq!(status, 503);
}

#[test]
fn info_channels_disconnect_and_unsubscribe() {
    let server = Server::start(BASE_CONFIG, &[]);
    let (mut a, _) = Client::connected(&server, "alice");
    let (mut b, _) = Client::connected(&server, "bob");
    a.command("subscribe", json!({"channel": "news"}));
    a.command("subscribe", json!({"channel": "chat:1"}));
    b.command("subscribe", json!({"channel": "news"}));
    let (_, info) = api(server.addr, "info", &json!({}));
    let node = &info["result"]["nodes"][0];
    assert_eq!(node["num_clients"], 2, "{info}");
    assert_eq!(node["num_users"], 2);
    assert_eq!(node["num_channels"], 2);
    assert_eq!(node["num_subs"], 3);
    assert!(node["uid"].is_string() && node["name"].is_string());
    let (_, ch) = api(server.addr, "channels", &json!({"pattern": "chat:*"}));
    assert_eq!(
        ch["result"]["channels"],
        json!({"chat:1": {"num_clients": 1}})
    );
    let (_, p) = api(server.addr, "presence", &json!({"channel": "chat:1"}));
    assert_eq!(p["result"]["presence"].as_object().unwrap().len(), 1);
    let (_, p) = api(server.addr, "presence_stats", &json!({"channel": "chat:1"}));
    assert_eq!(p["result"], json!({"num_clients": 1, "num_users": 1}));
    // Server-side unsubscribe of alice from news: she is told, bob is not affected.
    let (_, r) = api(
        server.addr,
        "unsubscribe",
        &json!({"user": "alice", "channel": "news"}),
    );
    assert_eq!(r, json!({"result": {}}));
    let push = a.push(Duration::from_secs(5)).expect("unsubscribe push");
    assert_eq!(push["push"]["channel"], "news");
    assert!(push["push"]["unsubscribe"].is_object());
    api(
        server.addr,
        "publish",
        &json!({"channel": "news", "data": 1}),
    );
    assert!(b.push(Duration::from_secs(5)).is_some());
    assert!(a.push(Duration::from_millis(300)).is_none());
    // Disconnect bob with a custom code.
    let (_, r) = api(
        server.addr,
        "disconnect",
        &json!({"user": "bob", "disconnect": {"code": 4001, "reason": "bye"}}),
    );
    assert_eq!(r, json!({"result": {}}));
    assert_eq!(
        b.closed(Duration::from_secs(5)).unwrap(),
        Closed {
            code: 4001,
            reason: "bye".into()
        }
    );
    // Broadcast.
    let (_, r) = api(
        server.addr,
        "broadcast",
        &json!({"channels": ["chat:1", "nope:x"], "data": 2}),
    );
    assert_eq!(r["result"]["responses"][0], json!({"result": {}}));
    assert_eq!(r["result"]["responses"][1]["error"]["code"], 102);
    assert_eq!(
        a.push(Duration::from_secs(5)).unwrap()["push"]["pub"]["data"],
        2
    );
    // Counters: two publications (one to news, one broadcast), two WebSocket upgrades.
    let (_, info) = api(server.addr, "info", &json!({}));
    let counters = &info["result"]["nodes"][0]["counters"];
    assert_eq!(counters["publications"], 2, "{info}");
    assert!(counters["deliveries"].as_u64().unwrap() >= 2, "{info}");
    assert_eq!(counters["ws_opened"], 2, "{info}");
}

#[test]
fn invalid_configuration_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[limits]\nmax_mesage_bytes = 10\n", "max_mesage_bytes"),
        ("shards = \"two\"\n", "shards"),
        (
            "insecure = true\n[ping]\ninterval_secs = 0\n",
            "ping.interval_secs",
        ),
        ("listen = \"127.0.0.1:0\"\n", "token_hmac_secret"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_shardcast"))
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{key} not named in: {err}");
    }
}

#[test]
fn gentoken_prints_a_token_the_server_accepts() {
    let out = Command::new(env!("CARGO_BIN_EXE_shardcast"))
        .args(["gentoken", "--user", "dave", "--token-hmac-secret", SECRET])
        .output()
        .unwrap();
    assert!(out.status.success());
    let t = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let server = Server::start(BASE_CONFIG, &[]);
    let mut c = Client::connect_ws(&server);
    let r = c.command("connect", json!({"token": t}));
    assert!(r["connect"]["ttl"].as_u64().unwrap() > 3500, "{r}");
}

#[test]
fn flags_override_the_config_file() {
    let server = Server::start(
        "listen = \"127.0.0.1:1\"\ninsecure = true\n",
        &[
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--api-key",
            "flag-key",
        ],
    );
    let (status, _) = api_with_key(server.addr, "info", &json!({}), "flag-key");
    assert_eq!(status, 200);
    let mut c = Client::connect_ws(&server);
    let r = c.command("connect", json!({}));
    assert!(
        r["connect"].is_object(),
        "insecure allows anonymous connect: {r}"
    );
    assert!(server.stderr.lock().unwrap().contains("INSECURE"));
}
