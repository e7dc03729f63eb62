//! Deployment: the systemd unit and the readiness protocol it relies on.

use crate::harness::*;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[test]
fn systemd_unit_verifies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("systemd/shardcast.service")).unwrap();
    // Point ExecStart at the binary under test (the unit's path exists only once installed).
    let unit = unit.replace("/usr/local/bin/shardcast", env!("CARGO_BIN_EXE_shardcast"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shardcast.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze runs (the README's test command installs systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.trim().is_empty(), "warnings: {stderr}");
}

#[test]
fn notifies_systemd_when_ready_and_when_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let server = Server::start_with_env(
        BASE_CONFIG,
        &[],
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("a notification");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    // SAFETY: signalling a child process we started.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let n = sock.recv(&mut buf).expect("a stopping notification");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let server = Server::start(BASE_CONFIG, &["--log-format", "json"]);
    let _ = Client::connected(&server, "x");
    let logs = server.stderr.lock().unwrap().clone();
    assert!(!logs.is_empty());
    for line in logs.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
    assert!(logs.contains("shardcast ready"));
}
