//! The shutdown protocol: SIGTERM → 503 → listeners closed → paced 3001 → exit 0.

use crate::harness::*;
use std::time::{Duration, Instant};

fn signal(server: &Server, sig: i32) {
    // SAFETY: signalling a child process we started.
    unsafe { libc::kill(server.child.id() as i32, sig) };
}

fn healthz(server: &Server) -> u16 {
    http(
        server.addr,
        "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .0
}

#[test]
fn sigterm_drains_in_paced_batches_and_exits_zero() {
    let cfg = format!(
        "{BASE_CONFIG}[drain]\nlistener_grace_secs = 1\nwindow_secs = 2\ndeadline_secs = 8\n"
    );
    let mut server = Server::start(&cfg, &[]);
    let mut clients: Vec<Client> = (0..12)
        .map(|i| Client::connected(&server, &format!("u{i}")).0)
        .collect();
    assert_eq!(healthz(&server), 200);
    let t0 = Instant::now();
    signal(&server, libc::SIGTERM);
    eventually(Duration::from_secs(1), "/healthz answers 503", || {
        healthz(&server) == 503
    });
    // During the grace, new upgrades are refused with 503 (SDKs back off to other nodes).
    let (status, _) = http(server.addr, "GET /connection/websocket HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
    assert_eq!(status, 503);
    // Every client is told to reconnect with 3001, spread over the window.
    let mut closed_at = vec![None; clients.len()];
    while closed_at.iter().any(Option::is_none) && t0.elapsed() < Duration::from_secs(7) {
        for (i, c) in clients.iter_mut().enumerate() {
            if closed_at[i].is_none() {
                if let Some(closed) = c.closed(Duration::from_millis(20)) {
                    assert_eq!(
                        closed,
                        Closed {
                            code: 3001,
                            reason: "shutdown".into()
                        }
                    );
                    closed_at[i] = Some(t0.elapsed());
                }
            }
        }
    }
    let times: Vec<Duration> = closed_at
        .iter()
        .map(|t| t.expect("every client told to reconnect"))
        .collect();
    let (first, last) = (times.iter().min().unwrap(), times.iter().max().unwrap());
    assert!(
        *first >= Duration::from_millis(900),
        "nobody before the listener grace: {times:?}"
    );
    assert!(
        *last - *first >= Duration::from_millis(500),
        "batches are paced: {times:?}"
    );
    // The listener is closed now.
    assert!(
        std::net::TcpStream::connect(server.addr).is_err(),
        "listener still open"
    );
    // And the process exits 0 within its deadline.
    let deadline = Instant::now() + Duration::from_secs(8);
    let status = loop {
        if let Ok(Some(s)) = server.child.try_wait() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "did not exit within its drain deadline"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn second_signal_closes_at_once() {
    let cfg = format!(
        "{BASE_CONFIG}[drain]\nlistener_grace_secs = 5\nwindow_secs = 10\ndeadline_secs = 30\n"
    );
    let mut server = Server::start(&cfg, &[]);
    let (_c, _) = Client::connected(&server, "stays");
    signal(&server, libc::SIGTERM);
    eventually(Duration::from_secs(1), "/healthz answers 503", || {
        healthz(&server) == 503
    });
    let t = Instant::now();
    signal(&server, libc::SIGINT);
    let status = loop {
        if let Ok(Some(s)) = server.child.try_wait() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "second signal did not stop the node"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "exit status {status:?}");
}

/// After the drain the node ends every thread it started (shards, broker, metrics listener)
/// before it exits, standalone and with Redis: each group reports "threads ended", none is left
/// running at exit.
#[test]
fn every_thread_ends_before_exit() {
    let redis = Redis::start(&[]);
    let drain = "[drain]\nlistener_grace_secs = 0\nwindow_secs = 1\ndeadline_secs = 10\n";
    let standalone = format!("{BASE_CONFIG}{drain}");
    let with_redis = format!("redis = \"{}\"\n{BASE_CONFIG}{drain}", redis.url());
    for cfg in [standalone, with_redis] {
        let env = [("RUST_LOG", "info,shardcast::node=debug")];
        let mut server = Server::start_with_env(&cfg, &["--log-format", "json"], &env);
        let (mut c, _) = Client::connected(&server, "u");
        let r = c.command("subscribe", serde_json::json!({"channel": "chat:t"}));
        assert!(r["subscribe"].is_object(), "{r}");
        signal(&server, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Ok(Some(s)) = server.child.try_wait() {
                break s;
            }
            assert!(Instant::now() < deadline, "did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "exit status {status:?}");
        let joined = |logs: &str, what: &str| {
            logs.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .any(|v| v["fields"]["message"] == "threads ended" && v["fields"]["what"] == what)
        };
        // stderr is collected by a reader thread: give it a moment to reach the end.
        let until = Instant::now() + Duration::from_secs(5);
        while !joined(&server.stderr.lock().unwrap(), "broker") && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        let logs = server.stderr.lock().unwrap().clone();
        assert!(!logs.contains("threads still running at exit"), "{logs}");
        for what in ["shards", "broker"] {
            assert!(joined(&logs, what), "{what} not joined:\n{logs}");
        }
    }
}
