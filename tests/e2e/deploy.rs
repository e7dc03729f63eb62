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
    // stderr is collected by a reader thread: wait (bounded) until it has caught up with the
    // start-up line rather than reading whatever it holds at this instant.
    eventually(Duration::from_secs(10), "stderr reader caught up", || {
        server.stderr.lock().unwrap().contains("shardcast ready")
    });
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

fn metrics_addr(server: &Server) -> std::net::SocketAddr {
    let (_, info) = api(server.addr, "info", &serde_json::json!({}));
    info["result"]["nodes"][0]["metrics_listen"]
        .as_str()
        .expect("metrics address in /api/info")
        .parse()
        .unwrap()
}

#[test]
fn prometheus_metrics_and_status_json() {
    let server = Server::start(BASE_CONFIG, &[]);
    let m = metrics_addr(&server);
    let mut clients = Vec::new();
    for i in 0..3 {
        let (mut c, _) = Client::connected(&server, &format!("m{i}"));
        c.command("subscribe", serde_json::json!({"channel": "news"}));
        clients.push(c);
    }
    api(
        server.addr,
        "publish",
        &serde_json::json!({"channel": "news", "data": 1}),
    );
    // Shards publish their figures once a second.
    let sum = |text: &str, metric: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{metric}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    eventually(Duration::from_secs(5), "metrics show 3 connections", || {
        let (status, body) = http(m, "GET /metrics HTTP/1.1\r\n\r\n");
        status == 200
            && sum(&body, "shardcast_connections") == 3
            && sum(&body, "shardcast_subscriptions") == 3
            && sum(&body, "shardcast_deliveries_total") >= 3
    });
    let (_, body) = http(m, "GET /metrics HTTP/1.1\r\n\r\n");
    for name in [
        "shardcast_slow_disconnects_total",
        "shardcast_bytes_out_total",
        "shardcast_broker_inbox_depth",
        "shardcast_broker_queue_depth",
        "shardcast_redis_link_state",
        "shardcast_bytes_per_connection",
        "shardcast_publications_total",
    ] {
        assert!(body.contains(name), "{name} missing:\n{body}");
    }
    let (status, body) = http(m, "GET /status.json HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["connections"], 3, "{v}");
    assert_eq!(v["shards"].as_array().unwrap().len(), 2);
    let (status, body) = http(m, "GET /status HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200);
    assert!(body.contains("<html"), "{body}");
    assert_eq!(http(m, "GET /nope HTTP/1.1\r\n\r\n").0, 404);
}

#[test]
fn doctor_reports_findings_fixes_and_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, BASE_CONFIG).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shardcast"))
        .arg("doctor")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for check in [
        "RLIMIT_NOFILE",
        "fs.nr_open",
        "somaxconn",
        "tcp_mem",
        "RLIMIT_MEMLOCK",
        "io_uring",
        "cores vs shards",
    ] {
        assert!(text.contains(check), "{check} not checked:\n{text}");
    }
    let problems = text
        .lines()
        .filter(|l| l.starts_with("WARN") || l.starts_with("FAIL"))
        .count();
    let fixes = text
        .lines()
        .filter(|l| l.trim_start().starts_with("fix: "))
        .count();
    assert_eq!(problems, fixes, "every finding has its fix:\n{text}");
    assert_eq!(
        out.status.success(),
        problems == 0,
        "exit status says whether the box is ready:\n{text}"
    );
    let capacity: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("capacity: about "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .expect("a capacity line");
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit on a local struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert!(capacity > 0 && capacity <= lim.rlim_max, "{capacity}");
}

/// The server runs without transparent huge pages (its heap grows in 4 KiB pages: the memory
/// per idle connection stays low and steady).
#[test]
fn the_server_runs_without_transparent_huge_pages() {
    let server = Server::start(BASE_CONFIG, &[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("THP_enabled:"))
        .expect("THP_enabled in /proc/PID/status (Linux 5.0+)");
    assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
}
