//! The official `centrifuge` JS SDK (pinned in tests/interop/package-lock.json) against the
//! real server. `.ci/run` installs it with `npm ci`; without it this test fails and says so.

use crate::harness::*;
use std::path::Path;
use std::process::Command;

#[test]
fn official_js_sdk_interop() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    assert!(
        dir.join("node_modules/centrifuge").exists(),
        "the JS SDK is not installed: run `npm ci --prefix tests/interop` (the README's test command does)"
    );
    // `jl`: join/leave messages for the subscribers that ask (join_leave.test.mjs).
    let jl =
        "[namespaces.jl]\nallow_subscribe_for_client = true\njoin_leave = true\npresence = true\n";
    let cfg = format!("{BASE_CONFIG}{jl}\n[ping]\ninterval_secs = 2\npong_timeout_secs = 1\n");
    let server = Server::start(&cfg, &[]);
    let out = Command::new("node")
        .arg("--test")
        .arg("--test-concurrency=1")
        .arg(&dir)
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
    assert!(
        out.status.success(),
        "SDK tests failed:\n{stdout}\n{stderr}"
    );
    let count = |what: &str| tap_count(&stdout, what);
    assert_eq!(count("# skipped "), 0, "SDK tests skipped:\n{stdout}");
    assert_eq!(count("# todo "), 0, "SDK tests marked todo:\n{stdout}");
    assert!(count("# pass ") >= 12, "too few SDK tests ran:\n{stdout}");
}

/// The SDK's protobuf build (`centrifuge/build/protobuf`) beside JSON SDK clients:
/// tests/interop/protobuf/*.protobuf.mjs, every one must run and pass.
#[test]
fn official_js_sdk_protobuf_interop() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    assert!(
        dir.join("node_modules/centrifuge/build/protobuf").exists(),
        "the JS SDK is not installed: run `npm ci --prefix tests/interop` (the README's test command does)"
    );
    let files: Vec<_> = std::fs::read_dir(dir.join("protobuf"))
        .expect("tests/interop/protobuf")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".protobuf.mjs"))
        .collect();
    assert!(
        !files.is_empty(),
        "no *.protobuf.mjs files in tests/interop/protobuf"
    );
    let cfg = format!(
        "{BASE_CONFIG}{HISTORY_NAMESPACES}\n[ping]\ninterval_secs = 2\npong_timeout_secs = 1\n"
    );
    let server = Server::start(&cfg, &[]);
    let out = Command::new("node")
        .arg("--test")
        .arg("--test-concurrency=1")
        .args(&files)
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
    assert!(
        out.status.success(),
        "protobuf SDK tests failed:\n{stdout}\n{stderr}"
    );
    let count = |what: &str| tap_count(&stdout, what);
    assert_eq!(
        count("# skipped "),
        0,
        "protobuf SDK tests skipped:\n{stdout}"
    );
    assert_eq!(
        count("# todo "),
        0,
        "protobuf SDK tests marked todo:\n{stdout}"
    );
    assert!(
        count("# pass ") >= 4,
        "too few protobuf SDK tests ran:\n{stdout}"
    );
}

#[test]
fn official_python_sdk_interop() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/interop-py/bin/python");
    assert!(
        python.exists(),
        "the Python SDK is not installed: run `python3 -m venv target/interop-py && target/interop-py/bin/pip install -r tests/interop/python/requirements.txt` (the README's test command does)"
    );
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
