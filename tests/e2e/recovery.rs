//! History and recovery across two nodes and one real Redis, proven with the official
//! `centrifuge` JS SDK: runs tests/interop/cluster/recovery.cluster.mjs (see its head for what
//! each test asserts). That file restarts the Redis itself (its last test), so this test gives
//! it a Redis of its own.

use crate::harness::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The tests in recovery.cluster.mjs; every one must run and pass.
const TESTS: u32 = 7;

#[test]
fn official_js_sdk_recovers_across_nodes_and_redis_failures() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    assert!(
        dir.join("node_modules/centrifuge").exists(),
        "the JS SDK is not installed: run `npm ci --prefix tests/interop` (the README's test command does)"
    );
    let redis = Redis::start(&[]);
    let cfg = format!(
        "redis = \"{}\"\n{BASE_CONFIG}{HISTORY_NAMESPACES}",
        redis.url()
    );
    let a = Server::start(&cfg, &[]);
    let b = Server::start(&cfg, &[]);

    let ran = run_bounded(
        Command::new("node")
            .arg("--test")
            .arg("--test-concurrency=1")
            .arg(dir.join("cluster/recovery.cluster.mjs"))
            .current_dir(&dir)
            .env("SHARDCAST_A_WS", a.ws_url())
            .env("SHARDCAST_A_HTTP", a.http_url())
            .env("SHARDCAST_B_WS", b.ws_url())
            .env("SHARDCAST_B_HTTP", b.http_url())
            .env("SHARDCAST_API_KEY", API_KEY)
            .env("SHARDCAST_SECRET", SECRET)
            .env("SHARDCAST_REDIS_PORT", redis.port.to_string())
            .env("SHARDCAST_REDIS_CLI", "redis-cli")
            .env("SHARDCAST_REDIS_SERVER", "redis-server"),
        // Bounded: the tests take about 6 s; each has its own timeout well under this.
        Duration::from_secs(50),
    );
    let (status, stdout, stderr) = (ran.status, ran.stdout, ran.stderr);
    let logs = || {
        let tail = |s: &str| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        };
        format!(
            "node A log:\n{}\nnode B log:\n{}",
            tail(&a.stderr.lock().unwrap()),
            tail(&b.stderr.lock().unwrap())
        )
    };
    let status = status.unwrap_or_else(|| {
        panic!(
            "SDK recovery tests did not finish within 50 s:\n{stdout}\n{stderr}\n{}",
            logs()
        )
    });
    assert!(
        status.success(),
        "SDK recovery tests failed:\n{stdout}\n{stderr}\n{}",
        logs()
    );
    let count = |what: &str| tap_count(&stdout, what);
    assert_eq!(count("# skipped "), 0, "SDK tests skipped:\n{stdout}");
    assert_eq!(count("# todo "), 0, "SDK tests marked todo:\n{stdout}");
    assert_eq!(count("# fail "), 0, "SDK tests failed:\n{stdout}");
    assert_eq!(count("# pass "), TESTS, "not every SDK test ran:\n{stdout}");
}
