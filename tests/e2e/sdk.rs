//! The official `centrifuge` JS SDK (pinned in tests/interop/package-lock.json) against the
//! real server. `.ci/run` installs it with `npm ci`; without it this test fails and says so.

use crate::harness::*;
use std::path::Path;
use std::process::Command;

/// Runs `node --test` on `targets` (a directory or test files) in tests/interop against a
/// server with `cfg` plus 2 s pings, and checks that every test ran (none skipped or todo, at
/// least `min_pass` passed) and passed.
fn run_node_tests(what: &str, targets: &[std::path::PathBuf], cfg: &str, min_pass: u32) {
    let cfg = format!("{cfg}\n[ping]\ninterval_secs = 2\npong_timeout_secs = 1\n");
    let server = Server::start(&cfg, &[]);
    let env = [
        ("SHARDCAST_WS", server.ws_url()),
        ("SHARDCAST_HTTP", server.http_url()),
    ];
    run_node_tests_with(what, targets, &env, min_pass);
}

/// Runs `node --test` on `targets` in tests/interop with `env` besides the API key, the
/// token secret and the 2 s / 1 s ping settings (the servers' `[ping]` must match), and
/// checks that every test ran (none skipped or todo, at least `min_pass` passed) and passed.
fn run_node_tests_with(
    what: &str,
    targets: &[std::path::PathBuf],
    env: &[(&str, String)],
    min_pass: u32,
) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    let out = Command::new("node")
        .arg("--test")
        .arg("--test-concurrency=1")
        .args(targets)
        .current_dir(&dir)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("SHARDCAST_API_KEY", API_KEY)
        .env("SHARDCAST_SECRET", SECRET)
        .env("SHARDCAST_PING_SECS", "2")
        .env("SHARDCAST_PONG_SECS", "1")
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed:\n{stdout}\n{stderr}");
    let count = |tap: &str| tap_count(&stdout, tap);
    assert_eq!(count("# skipped "), 0, "{what} skipped:\n{stdout}");
    assert_eq!(count("# todo "), 0, "{what} marked todo:\n{stdout}");
    assert!(
        count("# pass ") >= min_pass,
        "too few {what} ran:\n{stdout}"
    );
}

/// Bidirectional emulation with the official JS SDK and WebSocket unavailable, over
/// `http_stream` and over `sse`: two nodes on one real Redis, the stream on node A and every
/// command POSTed to node B's `/emulation` (tests/interop/cluster/emulation.cluster.mjs:
/// connect, subscribe, publish, presence, history, recovery, pings; 6 tests per transport).
#[test]
fn official_js_sdk_over_http_stream_and_sse_with_commands_via_the_other_node() {
    let dir = interop_dir("node_modules/eventsource");
    let redis = Redis::start(&[]);
    let cfg = format!(
        "redis = \"{}\"\n{BASE_CONFIG}{HISTORY_NAMESPACES}\n[transports]\nhttp_stream = true\nsse = true\n[ping]\ninterval_secs = 2\npong_timeout_secs = 1\n",
        redis.url()
    );
    let a = Server::start(&cfg, &[]);
    let b = Server::start(&cfg, &[]);
    let env = [
        ("SHARDCAST_A_HTTP", a.http_url()),
        ("SHARDCAST_B_HTTP", b.http_url()),
    ];
    let file = dir.join("cluster/emulation.cluster.mjs");
    run_node_tests_with("SDK emulation tests", &[file], &env, 12);
    // The commands really went through B to A: B forwarded them, A ran them.
    let counter = |addr, name: &str| {
        let (_, info) = api(addr, "info", &serde_json::json!({}));
        info["result"]["nodes"][0]["counters"][name]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(counter(b.addr, "emulation_requests") >= 12);
    assert!(counter(b.addr, "emulation_forwarded") >= 12);
    assert_eq!(counter(a.addr, "emulation_requests"), 0);
}

fn interop_dir(needs: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    assert!(
        dir.join(needs).exists(),
        "the JS SDK is not installed: run `npm ci --prefix tests/interop` (the README's test command does)"
    );
    dir
}

#[test]
fn official_js_sdk_interop() {
    let dir = interop_dir("node_modules/centrifuge");
    // `jl`: join/leave messages for the subscribers that ask (join_leave.test.mjs).
    let jl =
        "[namespaces.jl]\nallow_subscribe_for_client = true\njoin_leave = true\npresence = true\n";
    run_node_tests("SDK tests", &[dir], &format!("{BASE_CONFIG}{jl}"), 12);
}

/// The SDK's protobuf build (`centrifuge/build/protobuf`) beside JSON SDK clients:
/// tests/interop/protobuf/*.protobuf.mjs, every one must run and pass.
#[test]
fn official_js_sdk_protobuf_interop() {
    let dir = interop_dir("node_modules/centrifuge/build/protobuf");
    let files: Vec<_> = std::fs::read_dir(dir.join("protobuf"))
        .expect("tests/interop/protobuf")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".protobuf.mjs"))
        .collect();
    assert!(
        !files.is_empty(),
        "no *.protobuf.mjs files in tests/interop/protobuf"
    );
    let cfg = format!("{BASE_CONFIG}{HISTORY_NAMESPACES}");
    run_node_tests("protobuf SDK tests", &files, &cfg, 4);
}

#[test]
fn official_python_sdk_interop() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = interop_python("the Python SDK");
    let cfg = format!("{BASE_CONFIG}{HISTORY_NAMESPACES}");
    let server = Server::start(&cfg, &[]);
    let out = Command::new(&python)
        .arg(root.join("tests/interop/python/sdk_test.py"))
        .env("SHARDCAST_WS", server.ws_url())
        .env("SHARDCAST_HTTP", server.http_url())
        .env("SHARDCAST_API_KEY", API_KEY)
        .env("SHARDCAST_SECRET", SECRET)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "Python SDK tests failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("11 passed, 0 failed"), "{stdout}");
}
