//! The HTTP API seen by the official Python client `cent` (pinned in
//! tests/interop/python/requirements.txt), and the Redis URL: a password made of every reserved
//! character works, and a URL the node does not understand stops the start with a message that
//! names what is wrong (never the password).

use crate::harness::*;
use serde_json::json;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn official_cent_client_calls_every_api_method() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = interop_python("cent");
    let cfg = format!("{BASE_CONFIG}{HISTORY_NAMESPACES}");
    let server = Server::start(&cfg, &[]);
    let (mut alice, a) = Client::connected(&server, "alice");
    let (mut bob, b) = Client::connected(&server, "bob");
    for ch in ["chat:room", "feed:x"] {
        let r = alice.command("subscribe", json!({"channel": ch}));
        assert!(r["subscribe"].is_object(), "{r}");
    }
    let r = bob.command("subscribe", json!({"channel": "chat:room"}));
    assert!(r["subscribe"].is_object(), "{r}");
    let id = |reply: &serde_json::Value| reply["connect"]["client"].as_str().unwrap().to_string();
    let out = Command::new(&python)
        .arg(root.join("tests/interop/python/cent_test.py"))
        .env("SHARDCAST_HTTP", server.http_url())
        .env("SHARDCAST_API_KEY", API_KEY)
        .env("SHARDCAST_VERSION", env!("CARGO_PKG_VERSION"))
        .env("SHARDCAST_ALICE", id(&a))
        .env("SHARDCAST_BOB", id(&b))
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cent tests failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("13 passed, 0 failed"), "{stdout}");

    // What cent did reached the clients: bob got chat:room's publish and broadcast, then the
    // unsubscribe push; alice was closed with the code cent sent.
    let mut bob_saw = Vec::new();
    while let Some(p) = bob.push(Duration::from_secs(5)) {
        let kind = if p["push"]["pub"].is_object() {
            format!("pub {}", p["push"]["pub"]["data"])
        } else if p["push"]["unsubscribe"].is_object() {
            "unsubscribe".to_string()
        } else {
            continue;
        };
        bob_saw.push(kind);
        if bob_saw.last().map(String::as_str) == Some("unsubscribe") {
            break;
        }
    }
    assert_eq!(
        bob_saw,
        [r#"pub {"text":"hi"}"#, r#"pub {"n":3}"#, "unsubscribe"],
        "what bob received"
    );
    let closed = alice
        .closed(Duration::from_secs(5))
        .expect("alice was disconnected");
    assert_eq!((closed.code, closed.reason.as_str()), (4501, "bye"));
}

/// Every RFC 3986 reserved character, `%` and a space.
const RESERVED_PASSWORD: &str = "a+b&c@d:e%f/g?h#i[j]k!l$m'n(o)p*q,r;s=t u";

/// Percent-encodes every byte that is not unreserved (RFC 3986).
fn encode(s: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, RESERVED).to_string()
}

#[test]
fn redis_password_of_every_reserved_character_publishes_and_delivers() {
    let redis = Redis::start(&["--requirepass", RESERVED_PASSWORD]);
    // The password is really required, and is exactly this one.
    assert_eq!(redis.cli(&["PING"]), ["PONG"]);
    let url = format!(
        "redis://:{}@127.0.0.1:{}",
        encode(RESERVED_PASSWORD),
        redis.port
    );
    let unauthenticated = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "PING"])
        .output()
        .expect("redis-cli runs");
    assert!(
        String::from_utf8_lossy(&unauthenticated.stdout).contains("NOAUTH"),
        "redis-server did not require a password"
    );
    // Through the config file for one node, the environment for another.
    let a = Server::start(&format!("redis = \"{url}\"\n{BASE_CONFIG}"), &[]);
    let b = Server::start_with_env(BASE_CONFIG, &[], &[("SHARDCAST_REDIS", &url)]);
    let (mut on_b, _) = Client::connected(&b, "sub");
    let r = on_b.command("subscribe", json!({"channel": "news"}));
    assert!(r["subscribe"].is_object(), "{r}");
    let (status, body) = api(
        a.addr,
        "publish",
        &json!({"channel": "news", "data": {"x": 1}}),
    );
    assert_eq!((status, &body), (200, &json!({"result": {}})));
    let p = on_b.push(Duration::from_secs(5)).expect("delivered");
    assert_eq!(p["push"]["pub"]["data"], json!({"x": 1}), "{p}");
    let (_, info) = api(a.addr, "info", &json!({}));
    assert_eq!(info["result"]["nodes"][0]["redis"]["state"], "connected");
    assert_eq!(info["result"]["nodes"][0]["broker"], "redis");
}

/// Starts the binary and expects it to exit (non-zero) within a few seconds; returns its
/// exit code and stderr.
fn refused(config: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shardcast.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardcast"))
        .arg("--config")
        .arg(&path)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the node started with a bad Redis URL ({args:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("READY"), "{stdout}");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unsupported_redis_scheme_or_query_key_refuses_to_start_and_names_it() {
    // (config file, flags, environment, what the message must name)
    type Case<'a> = (String, &'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 4] = [
        (
            BASE_CONFIG.to_string(),
            &["--redis", "redis+sentinel://:hunter2@127.0.0.1:26379"],
            &[],
            "`redis+sentinel`",
        ),
        (
            BASE_CONFIG.to_string(),
            &[
                "--redis",
                "redis://:hunter2@127.0.0.1:6379/0?ssl_cert_reqs=none",
            ],
            &[],
            "`ssl_cert_reqs`",
        ),
        (
            format!("redis = \"unix://:hunter2@/run/redis.sock\"\n{BASE_CONFIG}"),
            &[],
            &[],
            "`unix`",
        ),
        (
            BASE_CONFIG.to_string(),
            &[],
            &[(
                "SHARDCAST_REDIS",
                "redis://:hunter2@127.0.0.1:6379?timeout=5",
            )],
            "`timeout`",
        ),
    ];
    for (config, args, env, named) in cases {
        let (code, stderr) = refused(&config, args, env);
        assert_ne!(code, 0, "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains("redis"), "{args:?} {env:?}: {stderr}");
        assert!(!stderr.contains("hunter2"), "password shown: {stderr}");
    }
}
