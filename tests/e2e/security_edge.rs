//! Security at the edge: frame lengths, API requests decided from their head, one deadline per
//! request, and the `Origin` check of upgrades. Each refusal is clear (close code or HTTP
//! status), counted, and leaves the node and its other clients untouched: a subscribed
//! client still receives an acknowledged publication, other API calls still answer.

use crate::harness::*;
use serde_json::{json, Value};
use shardcast::ws::client_frame;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const M: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A raw socket to the node with a read timeout.
fn raw(server: &Server) -> TcpStream {
    let s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Everything the node sends until it closes (or 10 s pass).
fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

/// The status of an HTTP response text (0 when there is none).
fn status_of(text: &str) -> u16 {
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The upgrade request head, with an optional `Origin`, for `host`.
fn upgrade_request(host: &str, origin: Option<&str>) -> String {
    let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
    format!(
        "GET /connection/websocket HTTP/1.1\r\nHost: {host}\r\n{origin}Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// A raw upgraded socket (101 read), nothing sent yet.
fn upgraded(server: &Server) -> TcpStream {
    let mut s = raw(server);
    s.write_all(upgrade_request("t", None).as_bytes()).unwrap();
    let mut head = [0u8; 129];
    s.read_exact(&mut head).unwrap();
    assert!(head.starts_with(b"HTTP/1.1 101"), "{:?}", head);
    s
}

/// Server frames (opcode, payload) read until a close frame, the socket's end or `timeout`.
fn server_frames(s: &mut TcpStream, timeout: Duration) -> Vec<(u8, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let mut chunk = [0u8; 4096];
    while Instant::now() < deadline {
        loop {
            if buf.len() < 2 {
                break;
            }
            let (hdr, len) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (4, u16::from_be_bytes([buf[2], buf[3]]) as usize),
                126 => break,
                127 if buf.len() >= 10 => (
                    10,
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                ),
                127 => break,
                n => (2, n as usize),
            };
            if buf.len() < hdr + len {
                break;
            }
            let opcode = buf[0] & 0x0f;
            frames.push((opcode, buf[hdr..hdr + len].to_vec()));
            buf.drain(..hdr + len);
            if opcode == 8 {
                return frames;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => return frames,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return frames,
        }
    }
    frames
}

/// The close code the node sent on `s`, within 5 s.
fn close_code(s: &mut TcpStream) -> Option<u16> {
    let frames = server_frames(s, Duration::from_secs(5));
    let (op, payload) = frames.last()?;
    (*op == 8 && payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

/// The node's summed shard counters, from `/api/info`.
fn counters(server: &Server) -> Value {
    let (status, info) = api(server.addr, "info", &json!({}));
    assert_eq!(status, 200, "{info}");
    info["result"]["nodes"][0]["counters"].clone()
}

/// Waits until `/metrics` shows `metric` (summed over shards) at `want`.
fn metric_reaches(server: &Server, metric: &str, want: u64) {
    let (_, info) = api(server.addr, "info", &json!({}));
    let m: std::net::SocketAddr = info["result"]["nodes"][0]["metrics_listen"]
        .as_str()
        .expect("metrics address in /api/info")
        .parse()
        .unwrap();
    eventually(
        Duration::from_secs(5),
        &format!("/metrics shows {metric} {want}"),
        || {
            let (status, body) = http(m, "GET /metrics HTTP/1.1\r\n\r\n");
            let sum: u64 = body
                .lines()
                .filter(|l| l.starts_with(&format!("{metric}{{")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum();
            status == 200 && sum == want
        },
    );
}

/// A client subscribed to `news`, to show that refusals elsewhere do not reach it.
fn watcher(server: &Server) -> Client {
    let (mut c, _) = Client::connected(server, "watcher");
    let r = c.command("subscribe", json!({"channel": "news"}));
    assert!(r["subscribe"].is_object(), "{r}");
    c
}

/// Publishes `data` to `news` through the API (acknowledged with 200 and a result), and checks
/// that `watcher` receives exactly it.
fn publish_reaches(server: &Server, watcher: &mut Client, data: Value) {
    let (status, r) = api(
        server.addr,
        "publish",
        &json!({"channel": "news", "data": data}),
    );
    assert_eq!(status, 200, "{r}");
    assert!(r["result"].is_object(), "publish acknowledged: {r}");
    let push = watcher
        .push(Duration::from_secs(5))
        .expect("the watcher receives the acknowledged publication");
    assert_eq!(push["push"]["pub"]["data"], data, "{push}");
}

#[test]
fn frame_length_with_top_bit_set_is_refused_with_1002() {
    let mut server = Server::start(BASE_CONFIG, &[]);
    let mut watch = watcher(&server);
    let before = counters(&server)["protocol_violations"].as_u64().unwrap();
    // A data frame announcing 2^63 + 5 bytes: refused from its header, not awaited.
    let mut s = upgraded(&server);
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&((1u64 << 63) + 5).to_be_bytes());
    frame.extend_from_slice(&M);
    let t = Instant::now();
    s.write_all(&frame).unwrap();
    assert_eq!(close_code(&mut s), Some(1002), "top bit set");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // A continuation whose length, added to the message so far, overflows 64 bits.
    let mut s = upgraded(&server);
    let mut frames = client_frame(1, false, b"{\"id\":1,", M);
    frames.extend([0x80, 0x80 | 127]);
    frames.extend_from_slice(&(u64::MAX - 2).to_be_bytes());
    frames.extend_from_slice(&M);
    s.write_all(&frames).unwrap();
    assert_eq!(close_code(&mut s), Some(1002), "overflowing continuation");
    // Non-minimal length encodings are accepted and decoded exactly: a connect command whose
    // 40-byte-or-so length is written in the 64-bit form gets its reply.
    let mut s = upgraded(&server);
    let cmd = json!({"id": 1, "connect": {"token": token("nonmin", Some(3600), SECRET)}})
        .to_string()
        .into_bytes();
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&(cmd.len() as u64).to_be_bytes());
    frame.extend_from_slice(&M);
    frame.extend(cmd.iter().enumerate().map(|(i, b)| b ^ M[i % 4]));
    s.write_all(&frame).unwrap();
    let replies = server_frames(&mut s, Duration::from_secs(3));
    let (op, payload) = replies.first().expect("a reply to the connect");
    assert_eq!(*op, 1);
    let reply: Value = serde_json::from_slice(payload).unwrap();
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    // The node and its other clients carried on.
    assert!(server.alive(), "the node survived");
    publish_reaches(&server, &mut watch, json!({"after": "frames"}));
    assert_eq!(
        counters(&server)["protocol_violations"].as_u64().unwrap(),
        before + 2
    );
}

#[test]
fn api_requests_are_refused_from_their_head() {
    let cfg = format!("{BASE_CONFIG}[limits]\nmax_api_body_bytes = 100000\n");
    let server = Server::start(&cfg, &[]);
    let mut watch = watcher(&server);
    // No key, a wrong key: 401 at once (the body never comes), then the connection closes.
    // The handshake timeout is the default 10 s, so an answer within 3 s is not a timeout.
    for key in [
        "",
        "X-API-Key: wrong\r\n",
        "Authorization: apikey wrong\r\n",
    ] {
        let mut s = raw(&server);
        let t = Instant::now();
        s.write_all(
            format!(
                "POST /api/publish HTTP/1.1\r\nHost: t\r\n{key}Content-Length: 1000000\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let text = read_to_close(&mut s);
        assert_eq!(status_of(&text), 401, "{key:?}: {text:?}");
        assert!(text.contains("Connection: close"), "{text}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }
    // A declared body over limits.max_api_body_bytes: 413 at once, with the right key.
    let mut s = raw(&server);
    let t = Instant::now();
    s.write_all(b"POST /api/publish HTTP/1.1\r\nHost: t\r\nX-API-Key: test-api-key\r\nContent-Length: 100001\r\n\r\n")
        .unwrap();
    let text = read_to_close(&mut s);
    assert_eq!(status_of(&text), 413, "{text:?}");
    assert!(t.elapsed() < Duration::from_secs(3));
    // A client that keeps sending the body it announced still reads the 401 (no reset).
    let mut s = raw(&server);
    s.write_all(b"POST /api/publish HTTP/1.1\r\nHost: t\r\nX-API-Key: wrong\r\nContent-Length: 1000000\r\n\r\n")
        .unwrap();
    let mut writer = s.try_clone().unwrap();
    let pusher = std::thread::spawn(move || {
        let chunk = [b'x'; 16 * 1024];
        for _ in 0..20 {
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let mut first = [0u8; 12];
    s.read_exact(&mut first).expect("the answer, not a reset");
    assert_eq!(&first, b"HTTP/1.1 401");
    pusher.join().unwrap();
    // Expect: 100-continue is answered with the final status when the head fails...
    for (head, want) in [
        ("X-API-Key: wrong\r\nContent-Length: 10\r\n", 401),
        ("X-API-Key: test-api-key\r\nContent-Length: 200000\r\n", 413),
        ("X-API-Key: test-api-key\r\nContent-Length: 10\r\n", 0),
    ] {
        let mut s = raw(&server);
        s.write_all(
            format!("POST /api/publish HTTP/1.1\r\nHost: t\r\n{head}Expect: 100-continue\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        if want == 0 {
            // ...and with 100 Continue once it passed: then the body gets its answer.
            let mut interim = [0u8; 25];
            s.read_exact(&mut interim).unwrap();
            assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
            continue;
        }
        let text = read_to_close(&mut s);
        assert_eq!(status_of(&text), want, "{head:?}: {text:?}");
        assert!(!text.contains("100 Continue"), "{text}");
    }
    let body = json!({"channel": "news", "data": {"expect": "continue"}}).to_string();
    let mut s = raw(&server);
    s.write_all(
        format!(
            "POST /api/publish HTTP/1.1\r\nHost: t\r\nX-API-Key: test-api-key\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(body.as_bytes()).unwrap();
    let text = read_to_close(&mut s);
    assert_eq!(status_of(&text), 200, "{text}");
    assert!(text.contains("\"result\""), "{text}");
    let push = watch.push(Duration::from_secs(5)).expect("published");
    assert_eq!(push["push"]["pub"]["data"]["expect"], "continue");
    // Other calls answered all along; nothing acknowledged was lost.
    publish_reaches(&server, &mut watch, json!({"after": "refusals"}));
}

#[test]
fn one_deadline_covers_head_and_body() {
    let cfg =
        format!("{BASE_CONFIG}[limits]\nhandshake_timeout_secs = 2\nmax_api_body_bytes = 1000\n");
    let server = Server::start(&cfg, &[]);
    let mut watch = watcher(&server);
    let key_head = "POST /api/publish HTTP/1.1\r\nHost: t\r\nX-API-Key: test-api-key\r\n";
    // A body that trickles without end: progress does not extend the deadline.
    let mut trickle = raw(&server);
    let started = Instant::now();
    trickle
        .write_all(format!("{key_head}Content-Length: 100\r\n\r\n").as_bytes())
        .unwrap();
    let mut writer = trickle.try_clone().unwrap();
    let trickler = std::thread::spawn(move || {
        for _ in 0..40 {
            if writer.write_all(b" ").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    // A body that stalls, and a chunked body that stalls after its first chunk.
    let mut stalled = raw(&server);
    stalled
        .write_all(format!("{key_head}Content-Length: 50\r\n\r\n{{\"channel\"").as_bytes())
        .unwrap();
    let mut chunked = raw(&server);
    chunked
        .write_all(
            format!("{key_head}Transfer-Encoding: chunked\r\n\r\n5\r\n{{\"cha\r\n").as_bytes(),
        )
        .unwrap();
    // Meanwhile the node answers other calls and delivers.
    publish_reaches(&server, &mut watch, json!({"during": "stalls"}));
    for (what, s) in [
        ("trickling body", &mut trickle),
        ("stalled body", &mut stalled),
        ("stalled chunked body", &mut chunked),
    ] {
        let text = read_to_close(s);
        assert_eq!(status_of(&text), 408, "{what}: {text:?}");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(7),
        "cut at the 2 s deadline, not before nor long after: {elapsed:?}"
    );
    trickler.join().unwrap();
    // Chunked bodies are bounded in decoded bytes: 413 as soon as a chunk size passes it.
    let mut big = raw(&server);
    let t = Instant::now();
    big.write_all(format!("{key_head}Transfer-Encoding: chunked\r\n\r\n3e9\r\n").as_bytes())
        .unwrap();
    let text = read_to_close(&mut big);
    assert_eq!(status_of(&text), 413, "{text:?}");
    assert!(t.elapsed() < Duration::from_millis(1500));
    // A complete chunked publish is served and delivered, on a keep-alive connection that
    // then serves a second request.
    let body = json!({"channel": "news", "data": {"chunked": true}}).to_string();
    let (a, b) = body.split_at(10);
    let mut s = raw(&server);
    s.write_all(
        format!(
            "{key_head}Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let push = watch.push(Duration::from_secs(5)).expect("chunked publish");
    assert_eq!(push["push"]["pub"]["data"]["chunked"], true);
    s.write_all(b"POST /api/info HTTP/1.1\r\nHost: t\r\nX-API-Key: test-api-key\r\nConnection: close\r\n\r\n")
        .unwrap();
    let text = read_to_close(&mut s);
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    // Counted where the other shard counters are.
    assert_eq!(counters(&server)["request_timeouts"], 3);
    metric_reaches(&server, "shardcast_request_timeouts_total", 3);
    publish_reaches(&server, &mut watch, json!({"after": "deadlines"}));
}

#[test]
fn upgrades_from_foreign_origins_are_refused_before_the_101() {
    let cfg = format!("allowed_origins = [\"https://*.example.com\"]\n{BASE_CONFIG}");
    let server = Server::start(&cfg, &[]);
    let mut watch = watcher(&server);
    let host = server.addr.to_string();
    let attempt = |origin: Option<&str>, host: &str| -> String {
        let mut s = raw(&server);
        s.write_all(upgrade_request(host, origin).as_bytes())
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).to_string()
    };
    // A page of another site: 403, no 101.
    for origin in [
        "https://evil.test",
        "https://example.com",
        "http://app.example.com",
        "https://app.example.com.evil.test",
    ] {
        let head = attempt(Some(origin), &host);
        assert_eq!(status_of(&head), 403, "{origin}: {head:?}");
    }
    // Listed patterns, the node's own host, and clients without Origin are upgraded.
    for (origin, host) in [
        (Some("https://app.example.com"), host.as_str()),
        (Some("https://a.b.Example.com"), host.as_str()),
        (Some(&*format!("http://{host}")), host.as_str()),
        (Some("https://chat.internal"), "chat.internal"),
        (None, host.as_str()),
    ] {
        let head = attempt(origin, host);
        assert_eq!(status_of(&head), 101, "{origin:?} for {host}: {head:?}");
    }
    assert_eq!(counters(&server)["origin_refusals"], 4);
    metric_reaches(&server, "shardcast_origin_refusals_total", 4);
    publish_reaches(&server, &mut watch, json!({"after": "origins"}));
    // Without allowed_origins only the node's own host passes.
    let plain = Server::start(BASE_CONFIG, &[]);
    let host = plain.addr.to_string();
    let mut s = TcpStream::connect(plain.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(upgrade_request(&host, Some("https://app.example.com")).as_bytes())
        .unwrap();
    let text = read_to_close(&mut s);
    assert_eq!(status_of(&text), 403, "{text:?}");
    let mut s = TcpStream::connect(plain.addr).unwrap();
    s.write_all(upgrade_request(&host, Some(&format!("http://{host}"))).as_bytes())
        .unwrap();
    let mut head = [0u8; 12];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    assert_eq!(counters(&plain)["origin_refusals"], 1);
}
