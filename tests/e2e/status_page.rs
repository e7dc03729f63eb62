//! The live status page (`/status` on the metrics listener) in Debian's headless Chromium,
//! driven by playwright-core (pinned in tests/status/package-lock.json; no browser download).
//! `.ci/run` installs both; without them this test fails and says so.

use crate::harness::*;
use std::path::Path;
use std::process::Command;

#[test]
fn status_page_in_headless_chromium() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/status");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `npm ci --prefix tests/status` (the README's test command does)"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: run `apt-get install chromium` (the README's test command does)"
    );
    let server = Server::start(BASE_CONFIG, &[]);
    let (_, info) = api(server.addr, "info", &serde_json::json!({}));
    let metrics: std::net::SocketAddr = info["result"]["nodes"][0]["metrics_listen"]
        .as_str()
        .expect("metrics address in /api/info")
        .parse()
        .unwrap();
    let out = Command::new("node")
        .arg("--test")
        .arg(&dir)
        .current_dir(&dir)
        .env("SHARDCAST_STATUS_URL", format!("http://{metrics}/status"))
        .env("SHARDCAST_WS", server.ws_url())
        .env("SHARDCAST_TOKEN", token("status-user", Some(600), SECRET))
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "status page test failed:\n{stdout}\n{stderr}\nserver stderr:\n{}",
        server.stderr.lock().unwrap()
    );
    assert!(
        stdout.lines().any(|l| l == "# pass 1") && stdout.lines().any(|l| l == "# fail 0"),
        "the browser test did not run:\n{stdout}"
    );
}
