//! RFC 6455 conformance: the Autobahn testsuite (../shared/tools/autobahn) against the echo
//! endpoint, which is off by default and switched on here only.

use crate::harness::*;
use std::path::Path;
use std::process::Command;

#[test]
fn autobahn_cases_1_to_7_9_10_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tools = root.join("../shared/tools/autobahn");
    assert!(
        tools.join("run.sh").exists(),
        "../shared/tools/autobahn is missing"
    );
    let venv = root.join("target/autobahn/venv");
    assert!(
        venv.exists(),
        "the Autobahn venv is not set up: run `AUTOBAHN_VENV=target/autobahn/venv ../shared/tools/autobahn/setup.sh` (the README's test command does)"
    );
    let cfg = r#"
listen = "127.0.0.1:0"
shards = 2
insecure = true
conformance_echo_path = "/echo"
[limits]
max_message_bytes = 16777216
max_outbox_bytes = 67108864
"#;
    let server = Server::start(cfg, &[]);
    let reports = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(tools.join("run.sh"))
        .arg(format!("ws://{}/echo", server.addr))
        .env("AUTOBAHN_VENV", &venv)
        .env("AUTOBAHN_REPORTS", reports.path())
        .env("AUTOBAHN_TIMEOUT", "600")
        .output()
        .expect("run.sh runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("autobahn: ") && l.contains(" passed, "));
    eprintln!("{}", summary.unwrap_or("no summary"));
    assert!(
        out.status.success(),
        "Autobahn failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(summary.is_some_and(|s| s.contains(" 0 failed")), "{stdout}");
}
