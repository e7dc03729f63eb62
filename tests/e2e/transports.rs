//! The transports besides WebSocket (issue 20): raw HTTP clients (std `TcpStream`) for the uni
//! transports and the bidirectional streams' framing, the slow uni client, drain, 400s, CORS
//! and disabled endpoints.

use crate::harness::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const ALL_ON: &str = "[transports]\nsse = true\nhttp_stream = true\nuni_sse = true\nuni_http_stream = true\nuni_websocket = true\n";

fn config(extra_top: &str) -> String {
    format!("allowed_origins = [\"https://ok.example\"]\n{extra_top}{BASE_CONFIG}{ALL_ON}")
}

/// A streamed HTTP response read as it comes.
struct Stream {
    s: TcpStream,
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Stream {
    fn open(addr: SocketAddr, request: &str) -> Stream {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(request.as_bytes()).unwrap();
        let mut buf = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            assert!(Instant::now() < deadline, "no response head");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).unwrap();
            assert!(
                n > 0,
                "closed before the head: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = buf[end + 4..].to_vec();
        Stream {
            s,
            status,
            head,
            body,
        }
    }

    /// Reads until `sep` is in the body or the timeout; returns the text before it.
    fn next_until(&mut self, sep: &[u8], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.body.windows(sep.len()).position(|w| w == sep) {
                let item: Vec<u8> = self.body.drain(..at + sep.len()).collect();
                return Some(String::from_utf8_lossy(&item[..at]).to_string());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.s.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 16384];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.body.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next newline-delimited JSON value (HTTP stream).
    fn line(&mut self, timeout: Duration) -> Option<Value> {
        let l = self.next_until(b"\n", timeout)?;
        Some(serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON {l:?}: {e}")))
    }

    /// The next SSE event's data as JSON (events are `data: <json>\n\n`).
    fn event(&mut self, timeout: Duration) -> Option<Value> {
        let e = self.next_until(b"\n\n", timeout)?;
        let data = e
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"));
        Some(serde_json::from_str(data).unwrap())
    }

    /// Reads to EOF (bounded); the whole rest of the body.
    fn rest(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no EOF in time");
            self.s.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => self.body.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("read: {e}"),
            }
        }
        String::from_utf8_lossy(&std::mem::take(&mut self.body)).to_string()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn channel_token(user: &str, channels: &[&str]) -> String {
    shardcast::protocol::token::sign_connect(
        SECRET,
        &shardcast::protocol::token::ConnectClaims {
            sub: user.into(),
            exp: None,
            info: None,
            channels: channels.iter().map(|c| c.to_string()).collect(),
        },
    )
}

fn post(path: &str, body: &str, extra: &str) -> String {
    let json = if extra.contains("Content-Type") {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\n{json}{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n")
}

fn publish(server: &Server, channel: &str, data: Value) {
    let (status, reply) = api(
        server.addr,
        "publish",
        &json!({"channel": channel, "data": data}),
    );
    assert_eq!(status, 200, "{reply}");
    assert!(reply.get("error").is_none(), "{reply}");
}

const T: Duration = Duration::from_secs(5);

#[test]
fn uni_sse_gets_the_connect_push_then_publications_of_the_tokens_channels() {
    let server = Server::start(&config(""), &[]);
    let req = json!({"token": channel_token("u1", &["news"])}).to_string();
    let mut s = Stream::open(
        server.addr,
        &get(&format!("/connection/uni_sse?cf_connect={}", enc(&req)), ""),
    );
    assert_eq!(s.status, 200, "{}", s.head);
    assert_eq!(
        s.header("content-type").as_deref(),
        Some("text/event-stream; charset=utf-8")
    );
    assert_eq!(s.header("x-accel-buffering").as_deref(), Some("no"));
    assert!(s.header("content-length").is_none());
    let connect = s.event(T).expect("connect push");
    assert!(
        connect.get("id").is_none(),
        "a push, not a reply: {connect}"
    );
    assert!(connect["connect"]["client"].is_string(), "{connect}");
    assert!(connect["connect"]["subs"]["news"].is_object(), "{connect}");
    assert!(
        connect["connect"].get("pong").is_none(),
        "no pong asked of a uni client"
    );
    publish(&server, "news", json!({"n": 1}));
    let p = s.event(T).expect("publication");
    assert_eq!(p["channel"], "news", "the push object alone: {p}");
    assert_eq!(p["pub"]["data"], json!({"n": 1}));
    assert!(p.get("push").is_none());
}

#[test]
fn uni_http_stream_and_bad_requests() {
    let server = Server::start(&config(""), &[]);
    let body = json!({"token": channel_token("u2", &["news"])}).to_string();
    let mut s = Stream::open(server.addr, &post("/connection/uni_http_stream", &body, ""));
    assert_eq!(s.status, 200, "{}", s.head);
    assert_eq!(s.header("x-accel-buffering").as_deref(), Some("no"));
    let connect = s.line(T).expect("connect push");
    assert!(connect["connect"]["subs"]["news"].is_object(), "{connect}");
    publish(&server, "news", json!("hello"));
    let p = s.line(T).expect("publication");
    assert_eq!(p, json!({"channel": "news", "pub": {"data": "hello"}}));
    // A bad token: the connect fails and the stream ends with its disconnect.
    let mut bad = Stream::open(
        server.addr,
        &post("/connection/uni_http_stream", r#"{"token":"nope"}"#, ""),
    );
    assert_eq!(bad.status, 200);
    let d = bad.line(T).expect("disconnect push");
    assert_eq!(d["disconnect"]["code"], 3500, "{d}");
    // Bad requests get 400 with the reason.
    for (req, why) in [
        (post("/connection/uni_http_stream", "[1]", ""), "invalid connect request"),
        (post("/connection/http_stream", "nope", ""), "connect command is not a JSON object"),
        (get("/connection/sse", ""), "no connect command"),
        (
            post("/connection/http_stream", "\u{1}", "Content-Type: application/octet-stream\r\n"),
            "protobuf is not supported",
        ),
        (get("/connection/uni_sse?cf_connect=%7Bx", ""), "invalid connect request"),
        (get("/connection/uni_websocket?cf_connect=1", "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"), "invalid connect request"),
    ] {
        let (status, text) = http(server.addr, &req);
        assert_eq!(status, 400, "{req}: {text}");
        assert!(text.contains(why), "{req}: {text}");
    }
    let (status, _) = http(server.addr, &get("/connection/http_stream", ""));
    assert_eq!(status, 405);
    let big = format!("{{\"token\":\"{}\"}}", "x".repeat(70_000));
    let (status, _) = http(server.addr, &post("/connection/uni_http_stream", &big, ""));
    assert_eq!(status, 413, "over limits.max_message_bytes");
}

#[test]
fn uni_websocket_takes_one_connect_message_then_pushes() {
    let server = Server::start(&config(""), &[]);
    let url = format!("ws://{}/connection/uni_websocket", server.addr);
    let (mut ws, _) = tungstenite::connect(url).expect("upgrade");
    let req = json!({"token": channel_token("u3", &["news"])}).to_string();
    ws.send(tungstenite::Message::text(req)).unwrap();
    let mut next = || loop {
        match ws.read().expect("read") {
            tungstenite::Message::Text(t) => return serde_json::from_str::<Value>(&t).unwrap(),
            _ => continue,
        }
    };
    let connect = next();
    assert!(connect["connect"]["subs"]["news"].is_object(), "{connect}");
    publish(&server, "news", json!(7));
    assert_eq!(next(), json!({"channel": "news", "pub": {"data": 7}}));
}

#[test]
fn bidirectional_streams_frame_replies_and_pushes() {
    let server = Server::start(&config(""), &[]);
    let token = channel_token("u4", &["news"]);
    let cmd = json!({"id": 1, "connect": {"token": token}}).to_string();
    // SSE: what the JS SDK's EventSource transport sends (GET, cf_connect).
    let mut sse = Stream::open(
        server.addr,
        &get(
            &format!("/connection/sse?cf_connect={}", enc(&cmd)),
            "Accept: text/event-stream\r\n",
        ),
    );
    assert_eq!(sse.status, 200, "{}", sse.head);
    assert_eq!(
        sse.header("content-type").as_deref(),
        Some("text/event-stream; charset=utf-8")
    );
    let reply = sse.event(T).expect("connect reply");
    assert_eq!(reply["id"], 1, "{reply}");
    assert!(reply["connect"]["subs"]["news"].is_object(), "{reply}");
    // HTTP stream: what the SDK's fetch transport sends (POST, JSON body, the command).
    let mut hs = Stream::open(
        server.addr,
        &post(
            "/connection/http_stream",
            &cmd,
            "Accept: application/json\r\n",
        ),
    );
    assert_eq!(hs.status, 200, "{}", hs.head);
    let reply = hs.line(T).expect("connect reply");
    assert_eq!(reply["id"], 1, "{reply}");
    publish(&server, "news", json!({"x": "a\nb"}));
    let want = json!({"push": {"channel": "news", "pub": {"data": {"x": "a\nb"}}}});
    assert_eq!(sse.event(T).expect("sse push"), want);
    assert_eq!(hs.line(T).expect("stream push"), want);
}

#[test]
fn stream_pings_come_as_centrifugo_sends_them() {
    let cfg = format!(
        "{}[ping]\ninterval_secs = 2\npong_timeout_secs = 1\n",
        config("")
    );
    let server = Server::start(&cfg, &[]);
    let req = json!({"token": channel_token("d", &[])}).to_string();
    let mut uni = Stream::open(server.addr, &post("/connection/uni_http_stream", &req, ""));
    assert!(uni.line(T).unwrap()["connect"].is_object());
    // Uni: an empty push `{}` each interval; nothing to answer.
    assert_eq!(uni.line(T).expect("ping"), json!({}));
    assert_eq!(uni.line(T).expect("second ping"), json!({}));
    let cmd = json!({"id": 1, "connect": {"token": channel_token("d", &[])}}).to_string();
    let mut sse = Stream::open(
        server.addr,
        &get(&format!("/connection/sse?cf_connect={}", enc(&cmd)), ""),
    );
    let reply = sse.event(T).unwrap();
    assert_eq!(reply["connect"]["pong"], true, "{reply}");
    assert_eq!(sse.event(T).expect("ping"), json!({}));
    // The emulation expects its pong (by `/emulation`); none came: closed as without pong.
    assert_eq!(
        sse.event(T).expect("no pong"),
        json!({"push": {"disconnect": {"code": 3012, "reason": "no pong"}}})
    );
    // The uni stream stays: nothing is expected from it.
    assert_eq!(uni.line(T).expect("ping after"), json!({}));
}

#[test]
fn a_uni_client_that_never_reads_is_cut_as_slow_and_the_others_keep_receiving() {
    let cfg = config("").replace(
        "[default_namespace]",
        "[limits]\nmax_outbox_bytes = 65536\n[default_namespace]",
    );
    let server = Server::start(&cfg, &[]);
    let body = json!({"token": channel_token("slow", &["firehose"])}).to_string();
    // The slow one: a tiny receive buffer, and it never reads.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&server.addr.into()).unwrap();
    let mut slow: TcpStream = sock.into();
    slow.write_all(post("/connection/uni_http_stream", &body, "").as_bytes())
        .unwrap();
    let mut fast = Stream::open(server.addr, &post("/connection/uni_http_stream", &body, ""));
    assert!(fast.line(T).unwrap()["connect"].is_object());
    let payload = "x".repeat(16 * 1024);
    let mut got = 0;
    for i in 0..200 {
        publish(&server, "firehose", json!({"i": i, "p": payload}));
        while let Some(p) = fast.line(Duration::from_millis(1)) {
            assert_eq!(p["pub"]["data"]["i"], got, "in order, none lost");
            got += 1;
        }
    }
    while got < 200 {
        let p = fast.line(T).expect("the fast client gets everything");
        assert_eq!(p["pub"]["data"]["i"], got);
        got += 1;
    }
    // The slow one was cut: its stream ends (after what was in flight) with the slow
    // disconnect, and EOF.
    let mut s = Stream {
        s: slow,
        status: 0,
        head: String::new(),
        body: Vec::new(),
    };
    let rest = s.rest(Duration::from_secs(10));
    let last = rest.trim_end().lines().last().unwrap_or("");
    assert_eq!(
        serde_json::from_str::<Value>(last).unwrap_or(Value::Null),
        json!({"disconnect": {"code": 3008, "reason": "slow"}}),
        "last line {last:?}"
    );
    assert!(
        rest.matches("\"firehose\"").count() < 200,
        "it did not get everything"
    );
}

#[test]
fn drain_ends_every_stream_with_the_shutdown_disconnect_in_its_form() {
    let cfg = format!(
        "{}[drain]\nlistener_grace_secs = 1\nwindow_secs = 1\ndeadline_secs = 6\n",
        config("")
    );
    let server = Server::start(&cfg, &[]);
    let cmd = json!({"id": 1, "connect": {"token": channel_token("d", &[])}}).to_string();
    let mut sse = Stream::open(
        server.addr,
        &get(&format!("/connection/sse?cf_connect={}", enc(&cmd)), ""),
    );
    assert!(sse.event(T).unwrap()["connect"].is_object());
    let req = json!({"token": channel_token("d", &[])}).to_string();
    let mut uni = Stream::open(server.addr, &post("/connection/uni_http_stream", &req, ""));
    assert!(uni.line(T).unwrap()["connect"].is_object());
    // SAFETY: signalling a child process we started.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert_eq!(
        sse.event(Duration::from_secs(6)).expect("disconnect event"),
        json!({"push": {"disconnect": {"code": 3001, "reason": "shutdown"}}})
    );
    assert_eq!(
        uni.line(Duration::from_secs(6)).expect("disconnect line"),
        json!({"disconnect": {"code": 3001, "reason": "shutdown"}})
    );
    assert_eq!(sse.rest(T), "", "then EOF");
    assert_eq!(uni.rest(T), "");
}

#[test]
fn cors_follows_allowed_origins() {
    let server = Server::start(&config(""), &[]);
    let pre = "OPTIONS /connection/http_stream HTTP/1.1\r\nHost: t\r\nOrigin: https://ok.example\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\n\r\n";
    let s = Stream::open(server.addr, pre);
    assert_eq!(s.status, 204);
    assert_eq!(
        s.header("access-control-allow-origin").as_deref(),
        Some("https://ok.example")
    );
    assert!(s
        .header("access-control-allow-methods")
        .unwrap()
        .contains("POST"));
    assert_eq!(
        s.header("access-control-allow-headers").as_deref(),
        Some("content-type")
    );
    let stream = Stream::open(
        server.addr,
        &post(
            "/connection/uni_http_stream",
            "{}",
            "Origin: https://ok.example\r\n",
        ),
    );
    assert_eq!(stream.status, 200);
    assert_eq!(
        stream.header("access-control-allow-origin").as_deref(),
        Some("https://ok.example")
    );
    for path in ["/connection/sse?cf_connect=%7B%7D", "/connection/uni_sse"] {
        let (status, text) = http(server.addr, &get(path, "Origin: https://evil.example\r\n"));
        assert_eq!(status, 403, "{path}: {text}");
    }
    // The node's own host passes without being listed.
    let own = Stream::open(
        server.addr,
        &post("/connection/uni_http_stream", "{}", "Origin: http://t\r\n"),
    );
    assert_eq!(own.status, 200);
}

#[test]
fn disabled_transports_answer_404() {
    let server = Server::start(BASE_CONFIG, &[]);
    for path in [
        "/connection/sse",
        "/connection/http_stream",
        "/connection/uni_sse",
        "/connection/uni_http_stream",
        "/connection/uni_websocket",
    ] {
        let (status, _) = http(server.addr, &post(path, "{}", "Connection: close\r\n"));
        assert_eq!(status, 404, "{path}");
        let (status, _) = http(server.addr, &get(path, "Connection: close\r\n"));
        assert_eq!(status, 404, "{path}");
    }
}
