//! The proxies to the application backend (connect, refresh, subscribe, publish, sub_refresh,
//! rpc), against a real backend process: tests/interop/backend/backend.mjs (Node, plain
//! `node:http`, Centrifugo's proxy JSON), started on an ephemeral port. The official JS SDK
//! runs tests/interop/proxy/*.proxy.mjs against it; raw WebSocket clients check what the SDK
//! cannot see: the timeout and the in-flight bound (error 100, the shard keeps delivering),
//! server-side refresh, backend failures, the latency histogram in `/metrics`.
//!
//! What each backend endpoint answers (by cookie, user and channel names) is in the head of
//! backend.mjs; its `GET /requests` record of every proxy request is what the assertions on
//! request fields and copied headers read.

use crate::harness::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The tests in tests/interop/proxy/*.proxy.mjs; every one must run and pass.
const SDK_TESTS: u32 = 10;

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// The test backend (`node tests/interop/backend/backend.mjs`), killed and reaped on drop. Its
/// stdin is a pipe held here: if the test process dies without dropping the guard, the pipe
/// closes and the backend exits by itself.
struct Backend {
    child: Child,
    _stdin: ChildStdin,
    addr: SocketAddr,
}

impl Backend {
    fn start() -> Backend {
        let script = interop_dir().join("backend/backend.mjs");
        let mut child = Command::new("node")
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node runs (the README's test command installs it)");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            // Drain the rest so the backend never blocks on a full pipe.
            for _ in lines {}
        });
        let mut guard = Backend {
            child,
            _stdin: stdin,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let first = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("backend printed no {{\"port\": N}} line ({e})"));
        let port = serde_json::from_str::<Value>(&first)
            .ok()
            .and_then(|v| v["port"].as_u64());
        let port =
            port.unwrap_or_else(|| panic!("backend's first line is not {{\"port\": N}}: {first}"));
        guard.addr.set_port(port as u16);
        guard
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn call(&self, method: &str, path: &str, body: &str) -> Value {
        let (status, text) = http(
            self.addr,
            &format!(
                "{method} {path} HTTP/1.1\r\nHost: backend\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        );
        assert_eq!(status, 200, "backend {method} {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("backend {path}: {e}: {text}"))
    }

    /// Sets the backend's behaviour (`stall_ms`, `status`, `raw`, ...; see backend.mjs).
    fn control(&self, patch: Value) {
        self.call("POST", "/control", &patch.to_string());
    }

    /// The recorded requests to `/centrifugo/<proxy>`, oldest first.
    fn requests(&self, proxy: &str) -> Vec<Value> {
        let all = self.call("GET", "/requests", "");
        let path = format!("/centrifugo/{proxy}");
        all.as_array()
            .expect("GET /requests gives an array")
            .iter()
            .filter(|r| r["path"] == path.as_str())
            .cloned()
            .collect()
    }

    /// Waits until a `proxy` request accepted by `pred` was recorded; returns it.
    fn wait_request(&self, proxy: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.requests(proxy);
            if let Some(r) = seen.iter().find(|r| pred(r)) {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "the backend got no matching {proxy} request within {timeout:?}; it has: {seen:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// [`BASE_CONFIG`] with `shards` shards, the `chat` namespace's three proxy flags, and a
/// `[proxy]` section with all six endpoints at `backend`, `http_headers = ["Cookie"]`, plus
/// `proxy_extra` (more `[proxy]` keys).
fn proxy_config(backend: &Backend, shards: u32, proxy_extra: &str) -> String {
    let base = BASE_CONFIG
        .replace("shards = 2\n", &format!("shards = {shards}\n"))
        .replace(
            "[namespaces.chat]\n",
            "[namespaces.chat]\nsubscribe_proxy = true\npublish_proxy = true\nsub_refresh_proxy = true\n",
        );
    assert!(
        base.contains("subscribe_proxy = true") && base.contains(&format!("shards = {shards}"))
    );
    let u = backend.url();
    format!(
        "{base}
[proxy]
connect_endpoint = \"{u}/centrifugo/connect\"
refresh_endpoint = \"{u}/centrifugo/refresh\"
subscribe_endpoint = \"{u}/centrifugo/subscribe\"
publish_endpoint = \"{u}/centrifugo/publish\"
sub_refresh_endpoint = \"{u}/centrifugo/sub_refresh\"
rpc_endpoint = \"{u}/centrifugo/rpc\"
http_headers = [\"Cookie\"]
{proxy_extra}"
    )
}

/// A raw client whose upgrade carries `cookie`; nothing sent yet.
fn cookie_client(server: &Server, cookie: &str) -> Client {
    Client::connect_with_headers(server.addr, &[("Cookie", cookie)])
}

/// A raw client connected with no token through the connect proxy as `session=<user>` (plus
/// `more_cookie`); returns it and the connect reply.
fn proxied(server: &Server, user: &str, more_cookie: &str) -> (Client, Value) {
    let mut c = cookie_client(server, &format!("session={user}{more_cookie}"));
    let r = c.command("connect", json!({}));
    assert!(r.get("connect").is_some(), "proxied connect failed: {r}");
    c.user = user.to_string();
    (c, r)
}

fn nonce() -> String {
    format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

fn counters(server: &Server) -> Value {
    let (status, info) = api(server.addr, "info", &json!({}));
    assert_eq!(status, 200, "{info}");
    info["result"]["nodes"][0]["counters"].clone()
}

fn publish(server: &Server, channel: &str, data: Value) {
    let (status, body) = api(
        server.addr,
        "publish",
        &json!({"channel": channel, "data": data}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.get("error").is_none(), "{body}");
}

/// The next publication push on `channel` within `timeout`: its data.
fn next_pub(c: &mut Client, channel: &str, timeout: Duration) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let p = c.push(deadline.saturating_duration_since(Instant::now()))?;
        if p["push"]["channel"] == channel {
            if let Some(pubd) = p["push"].get("pub") {
                return Some(pubd["data"].clone());
            }
        }
    }
}

/// The fields every proxy request carries.
fn assert_common_fields(rec: &Value, client: &str) {
    let b = &rec["body"];
    assert_eq!(b["client"], client, "{rec}");
    assert_eq!(b["transport"], "websocket", "{rec}");
    assert_eq!(b["protocol"], "json", "{rec}");
    assert_eq!(b["encoding"], "json", "{rec}");
    assert!(
        rec["headers"]["content-type"]
            .as_str()
            .is_some_and(|t| t.starts_with("application/json")),
        "{rec}"
    );
}

fn assert_error_100(reply: &Value) {
    assert_eq!(reply["error"]["code"], 100, "expected error 100: {reply}");
    assert_eq!(
        reply["error"]["temporary"], true,
        "error 100 from the proxy is temporary (the SDK retries): {reply}"
    );
}

#[test]
fn official_js_sdk_through_the_proxies() {
    let dir = interop_dir();
    assert!(
        dir.join("node_modules/centrifuge").exists(),
        "the JS SDK is not installed: run `npm ci --prefix tests/interop` (the README's test command does)"
    );
    let backend = Backend::start();
    let server = Server::start(&proxy_config(&backend, 2, ""), &[]);
    // Node 20's `--test <dir>` only runs files named like tests (*.test.mjs, ...), so the
    // *.proxy.mjs files are named one by one; that naming keeps them out of the general
    // `node --test tests/interop` run, whose server has no [proxy] section.
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("proxy"))
        .expect("tests/interop/proxy")
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".proxy.mjs"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no *.proxy.mjs files in tests/interop/proxy"
    );
    let ran = run_bounded(
        Command::new("node")
            .arg("--test")
            .arg("--test-concurrency=1")
            .args(&files)
            .current_dir(&dir)
            .env("SHARDCAST_WS", server.ws_url())
            .env("SHARDCAST_HTTP", server.http_url())
            .env("SHARDCAST_API_KEY", API_KEY)
            .env("SHARDCAST_SECRET", SECRET)
            .env("BACKEND_URL", backend.url()),
        // Bounded: the tests take about 15 s; each has its own 20 s timeout.
        Duration::from_secs(120),
    );
    let (status, stdout, stderr) = (ran.status, ran.stdout, ran.stderr);
    let log = || server.stderr.lock().unwrap().clone();
    let status = status.unwrap_or_else(|| {
        panic!(
            "SDK proxy tests did not finish:\n{stdout}\n{stderr}\nserver log:\n{}",
            log()
        )
    });
    assert!(
        status.success(),
        "SDK proxy tests failed:\n{stdout}\n{stderr}\nserver log:\n{}",
        log()
    );
    let count = |what: &str| tap_count(&stdout, what);
    assert_eq!(count("# skipped "), 0, "SDK tests skipped:\n{stdout}");
    assert_eq!(count("# todo "), 0, "SDK tests marked todo:\n{stdout}");
    assert_eq!(count("# fail "), 0, "SDK tests failed:\n{stdout}");
    assert_eq!(
        count("# pass "),
        SDK_TESTS,
        "not every SDK test ran:\n{stdout}"
    );
}

#[test]
fn a_stalled_backend_times_out_with_error_100_and_the_shard_keeps_delivering() {
    let backend = Backend::start();
    // One shard: the stalled connect and the subscriber share it.
    let server = Server::start(&proxy_config(&backend, 1, "timeout_ms = 2000\n"), &[]);
    let (mut listener, _) = Client::connected(&server, "listener");
    let r = listener.command("subscribe", json!({"channel": "news"}));
    assert!(r.get("subscribe").is_some(), "{r}");

    backend.control(json!({"stall_ms": 8000}));
    let mut slow = cookie_client(&server, "session=slow");
    let started = Instant::now();
    slow.send_text(&json!({"id": 1, "connect": {}}).to_string());
    backend.wait_request("connect", Duration::from_secs(5), |r| {
        r["headers"]["cookie"] == "session=slow"
    });
    // While the connect waits on the backend, the shard serves everything else.
    for n in 0..3 {
        publish(&server, "news", json!({"n": n}));
        let got = next_pub(&mut listener, "news", Duration::from_secs(1));
        assert_eq!(
            got,
            Some(json!({"n": n})),
            "publication {n} did not arrive while a proxy request was pending: the shard is blocked"
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(1800),
        "the publications took {:?}, past the proxy timeout: the test proves nothing on this machine",
        started.elapsed()
    );
    let reply = slow.reply(1);
    let took = started.elapsed();
    assert_error_100(&reply);
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_millis(6000),
        "error 100 came after {took:?}; the timeout is 2000 ms and the backend answers after 8000 ms"
    );
    // The listener is unaffected.
    publish(&server, "news", json!({"n": "after"}));
    assert_eq!(
        next_pub(&mut listener, "news", Duration::from_secs(2)),
        Some(json!({"n": "after"}))
    );
}

#[test]
fn over_max_in_flight_a_proxied_command_gets_error_100_at_once_and_is_counted() {
    let backend = Backend::start();
    let server = Server::start(
        &proxy_config(&backend, 1, "timeout_ms = 6000\nmax_in_flight = 1\n"),
        &[],
    );
    let before = counters(&server)["proxy_overloaded"]
        .as_u64()
        .unwrap_or_else(|| {
            panic!(
                "no counter proxy_overloaded in /api/info: {}",
                counters(&server)
            )
        });
    backend.control(json!({"stall_ms": 3000}));
    let mut first = cookie_client(&server, "session=first");
    first.send_text(&json!({"id": 1, "connect": {}}).to_string());
    backend.wait_request("connect", Duration::from_secs(5), |r| {
        r["headers"]["cookie"] == "session=first"
    });

    let mut second = cookie_client(&server, "session=second");
    let started = Instant::now();
    let reply = second.command("connect", json!({}));
    let took = started.elapsed();
    assert_error_100(&reply);
    assert!(
        took < Duration::from_millis(1500),
        "over max_in_flight the answer is immediate, not after the backend (3 s): took {took:?}"
    );
    eventually(
        Duration::from_secs(5),
        "proxy_overloaded counts the refused request",
        || counters(&server)["proxy_overloaded"].as_u64() > Some(before),
    );
    // The request in flight completes normally.
    let r = first.reply(1);
    assert_eq!(r["connect"]["data"], json!({"welcome": "first"}), "{r}");
    let seen: Vec<Value> = backend
        .requests("connect")
        .into_iter()
        .map(|r| r["headers"]["cookie"].clone())
        .collect();
    assert_eq!(
        seen,
        vec![json!("session=first")],
        "the refused connect never reached the backend"
    );
}

#[test]
fn backend_failures_become_error_100_and_the_connection_stays() {
    let backend = Backend::start();
    let server = Server::start(&proxy_config(&backend, 2, "timeout_ms = 2000\n"), &[]);
    let (mut c, _) = proxied(&server, "fragile", "");
    let echo = |c: &mut Client| c.command("rpc", json!({"method": "echo", "data": {"x": 1}}));
    assert_eq!(echo(&mut c)["rpc"]["data"], json!({"x": 1}));

    backend.control(json!({"status": 500}));
    assert_error_100(&echo(&mut c));
    backend.control(json!({"status": 200, "raw": "this is not json"}));
    assert_error_100(&echo(&mut c));
    backend.control(json!({"raw": "{\"result\": 5}"}));
    assert_error_100(&echo(&mut c));
    backend.control(json!({"reset": true}));
    assert_eq!(
        echo(&mut c)["rpc"]["data"],
        json!({"x": 1}),
        "the connection works again once the backend does"
    );

    // A backend nobody listens on: the connect gets error 100 too.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = BASE_CONFIG.to_string()
        + &format!("\n[proxy]\nconnect_endpoint = \"http://{dead}/centrifugo/connect\"\nrpc_endpoint = \"http://{dead}/centrifugo/rpc\"\ntimeout_ms = 2000\n");
    let down = Server::start(&cfg, &[]);
    let mut c = Client::connect_with_headers(down.addr, &[("Cookie", "session=x")]);
    let started = Instant::now();
    assert_error_100(&c.command("connect", json!({})));
    assert!(started.elapsed() < Duration::from_secs(3));
    let (mut t, _) = Client::connected(&down, "tokened");
    assert_error_100(&t.command("rpc", json!({"method": "echo", "data": {}})));
}

#[test]
fn a_token_connect_skips_the_connect_proxy_and_rpc_still_goes_to_the_backend() {
    let backend = Backend::start();
    let server = Server::start(&proxy_config(&backend, 2, ""), &[]);
    let (mut c, reply) = Client::connected(&server, "tokened");
    let client = reply["connect"]["client"].as_str().unwrap().to_string();
    let r = c.command(
        "rpc",
        json!({"method": "echo", "data": {"from": "tokened"}}),
    );
    assert_eq!(r["rpc"]["data"], json!({"from": "tokened"}), "{r}");
    let rec = backend.wait_request("rpc", Duration::from_secs(5), |r| {
        r["body"]["client"] == client.as_str()
    });
    assert_common_fields(&rec, &client);
    assert_eq!(rec["body"]["user"], "tokened");
    assert_eq!(rec["body"]["method"], "echo");
    assert!(
        backend.requests("connect").is_empty(),
        "a connect with a token does not go to the connect proxy"
    );
    // Errors and disconnects from the rpc proxy pass through.
    let r = c.command("rpc", json!({"method": "fail", "data": {}}));
    assert_eq!(r["error"]["code"], 1001, "{r}");
    assert_eq!(r["error"]["message"], "rpc failed", "{r}");
    c.send_text(&json!({"id": 99, "rpc": {"method": "bye", "data": {}}}).to_string());
    assert_eq!(
        c.closed(Duration::from_secs(5)),
        Some(Closed {
            code: 4500,
            reason: "bye".into()
        })
    );
}

#[test]
fn server_side_refresh_extends_a_connection_the_backend_keeps() {
    let backend = Backend::start();
    let server = Server::start(&proxy_config(&backend, 2, ""), &[]);
    let user = format!("keep-{}", nonce());
    let (mut c, reply) = proxied(&server, &user, "; expire=2");
    let client = reply["connect"]["client"].as_str().unwrap().to_string();
    let rec = backend.wait_request("refresh", Duration::from_secs(10), |r| {
        r["body"]["client"] == client.as_str()
    });
    assert_common_fields(&rec, &client);
    assert_eq!(rec["body"]["user"], user.as_str(), "{rec}");
    // The backend moved expire_at an hour ahead: the connection outlives its first expiry
    // and is not refreshed again meanwhile.
    std::thread::sleep(Duration::from_secs(3));
    let r = c.command("subscribe", json!({"channel": "news"}));
    assert!(
        r.get("subscribe").is_some(),
        "connection refreshed by the backend was not kept: {r}"
    );
    publish(&server, "news", json!("still here"));
    assert_eq!(
        next_pub(&mut c, "news", Duration::from_secs(2)),
        Some(json!("still here"))
    );
    let refreshes = backend
        .requests("refresh")
        .into_iter()
        .filter(|r| r["body"]["client"] == client.as_str())
        .count();
    assert_eq!(refreshes, 1, "one refresh per expiry, not a loop");
}

#[test]
fn server_side_refresh_answered_expired_closes_with_3005() {
    let backend = Backend::start();
    let server = Server::start(&proxy_config(&backend, 2, ""), &[]);
    let user = format!("expired-{}", nonce());
    let (mut c, reply) = proxied(&server, &user, "; expire=2");
    let client = reply["connect"]["client"].as_str().unwrap().to_string();
    let closed = c.closed(Duration::from_secs(12));
    assert_eq!(
        closed.as_ref().map(|c| c.code),
        Some(3005),
        "the backend answered expired: the connection ends with 3005: {closed:?}"
    );
    let rec = backend.wait_request("refresh", Duration::from_secs(1), |r| {
        r["body"]["client"] == client.as_str()
    });
    assert_eq!(rec["body"]["user"], user.as_str(), "{rec}");
}

#[test]
fn sub_refresh_extends_or_ends_an_expiring_subscription() {
    let backend = Backend::start();
    let server = Server::start(&proxy_config(&backend, 2, ""), &[]);
    let n = nonce();
    let (mut c, reply) = proxied(&server, &format!("subr-{n}"), "");
    let client = reply["connect"]["client"].as_str().unwrap().to_string();
    let kept = format!("chat:expiring-{n}");
    let ended = format!("chat:expiring-expired-{n}");
    for ch in [&kept, &ended] {
        let r = c.command("subscribe", json!({"channel": ch}));
        assert_eq!(r["subscribe"]["data"], json!({"granted": ch}), "{r}");
    }
    let rec = backend.wait_request("sub_refresh", Duration::from_secs(15), |r| {
        r["body"]["channel"] == kept.as_str()
    });
    assert_common_fields(&rec, &client);
    assert_eq!(rec["body"]["user"], format!("subr-{n}"));
    // The expired one gets an unsubscribe push with 2501; the kept one still delivers.
    let deadline = Instant::now() + Duration::from_secs(15);
    let unsub = loop {
        let p = c
            .push(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|| panic!("no unsubscribe push for {ended}"));
        if p["push"]["channel"] == ended.as_str() && p["push"].get("unsubscribe").is_some() {
            break p;
        }
    };
    assert_eq!(unsub["push"]["unsubscribe"]["code"], 2501, "{unsub}");
    std::thread::sleep(Duration::from_secs(1));
    publish(&server, &kept, json!("kept"));
    assert_eq!(
        next_pub(&mut c, &kept, Duration::from_secs(2)),
        Some(json!("kept"))
    );
}

#[test]
fn proxy_latency_histogram_for_connect_in_metrics() {
    let backend = Backend::start();
    let server = Server::start(&proxy_config(&backend, 2, ""), &[]);
    let (_c, _) = proxied(&server, "measured", "");
    let (_, info) = api(server.addr, "info", &json!({}));
    let m: SocketAddr = info["result"]["nodes"][0]["metrics_listen"]
        .as_str()
        .expect("metrics address in /api/info")
        .parse()
        .unwrap();
    // A histogram's `_count` series of a metric about the proxy, for the connect proxy
    // (e.g. `shardcast_proxy_duration_seconds_count{proxy="connect",...} 1`).
    let connect_count = |body: &str| -> u64 {
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                let name = l.split(['{', ' ']).next().unwrap_or("");
                name.contains("proxy") && name.ends_with("_count") && l.contains("connect")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let mut last = String::new();
    let shown = (0..100).any(|_| {
        let (status, body) = http(m, "GET /metrics HTTP/1.1\r\n\r\n");
        let ok = status == 200 && connect_count(&body) >= 1;
        last = body;
        if !ok {
            std::thread::sleep(Duration::from_millis(100));
        }
        ok
    });
    let proxy_lines: Vec<&str> = last.lines().filter(|l| l.contains("proxy")).collect();
    assert!(
        shown,
        "no proxy latency histogram _count for connect >= 1 in /metrics; proxy lines: {proxy_lines:#?}"
    );
}

/// A unidirectional client without a token gets its subscriptions from the connect proxy
/// (issue 20): uni SSE with the page's cookie, the backend answering `channels`.
#[test]
fn a_uni_sse_client_subscribes_to_the_channels_the_connect_proxy_names() {
    let backend = Backend::start();
    let cfg = proxy_config(&backend, 2, "") + "[transports]\nuni_sse = true\n";
    let server = Server::start(&cfg, &[]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /connection/uni_sse HTTP/1.1\r\nHost: t\r\nCookie: session=uni; channels=uni-news\r\n\r\n")
        .unwrap();
    let mut got = String::new();
    let read_until = |s: &mut TcpStream, needle: &str, got: &mut String| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !got.contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} in {got:?}");
            let mut b = [0u8; 4096];
            let n = s.read(&mut b).unwrap();
            assert!(n > 0, "EOF; got {got:?}");
            got.push_str(&String::from_utf8_lossy(&b[..n]));
        }
    };
    read_until(&mut s, "\n\n", &mut got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    read_until(&mut s, "data: {\"connect\":", &mut got);
    read_until(&mut s, "}\n\n", &mut got);
    let connect: Value = serde_json::from_str(
        got.split("data: ")
            .nth(1)
            .unwrap()
            .split("\n\n")
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(
        connect["connect"]["subs"]["uni-news"].is_object(),
        "{connect}"
    );
    // The page's cookie reached the backend (proxy.http_headers), as over WebSocket, and the
    // body names the transport as Centrifugo does.
    backend.wait_request("connect", Duration::from_secs(5), |r| {
        r["headers"]["cookie"]
            .as_str()
            .is_some_and(|c| c.contains("session=uni"))
            && r["body"]["transport"] == "uni_sse"
            && r["body"]["protocol"] == "json"
    });
    publish(&server, "uni-news", json!({"via": "proxy"}));
    read_until(&mut s, "\"via\"", &mut got);
    read_until(&mut s, "}}\n\n", &mut got);
    assert!(
        got.contains(r#"data: {"channel":"uni-news","pub":{"data":{"via":"proxy"}}}"#),
        "{got}"
    );
}
