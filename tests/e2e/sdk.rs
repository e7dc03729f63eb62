//! The official `centrifuge` JS SDK (pinned in tests/interop/package-lock.json) against the
//! real server. `.ci/run` installs it with `npm ci`; without it this test fails and says so.

use crate::harness::*;
use std::path::Path;
use std::process::Command;

/// Runs `node --test` on `targets` (a directory or test files) in tests/interop against a
/// server with `cfg` plus 2 s pings, and checks that every test ran (none skipped or todo, at
/// least `min_pass` passed) and passed.
fn run_node_tests(what: &str, targets: &[std::path::PathBuf], cfg: &str, min_pass: u32) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    let cfg = format!("{cfg}\n[ping]\ninterval_secs = 2\npong_timeout_secs = 1\n");
    let server = Server::start(&cfg, &[]);
    let out = Command::new("node")
        .arg("--test")
        .arg("--test-concurrency=1")
        .args(targets)
        .current_dir(&dir)
        .env("SHARDCAST_WS", server.ws_url())
        .env("SHARDCAST_HTTP", server.http_url())
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
