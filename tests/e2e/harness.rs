//! Test world: a real `shardcast` process on an ephemeral port, and small blocking clients.
//!
//! The server is started from the binary cargo built for this test run, its `READY <addr>` line
//! is awaited (no sleeps), and it is killed and reaped when the guard drops. The process guards
//! (`Server`, `Redis`) are shared with the benches: `tests/support/process.rs`; this file adds
//! their test constructors.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

pub const SECRET: &str = "test-secret";
pub const API_KEY: &str = "test-api-key";

/// The configuration most tests use: a `chat` namespace with client publish and presence, the
/// default namespace without client publish. Clients may subscribe in both without a token,
/// and `#` user-limited channels work in the default namespace (both are off by default).
pub const BASE_CONFIG: &str = r#"
listen = "127.0.0.1:0"
shards = 2
token_hmac_secret = "test-secret"
api_key = "test-api-key"
metrics_listen = "127.0.0.1:0"
[default_namespace]
allow_subscribe_for_client = true
allow_user_limited_channels = true
[namespaces.chat]
allow_subscribe_for_client = true
allow_publish_for_client = true
presence = true
"#;

/// History namespaces (append after [`BASE_CONFIG`]): `feed` (100 kept, recovery), `tiny`
/// (5 kept, recovery), `norec` (history without recovery), `open` (history anyone may read).
pub const HISTORY_NAMESPACES: &str = r#"
[namespaces.feed]
allow_subscribe_for_client = true
history_size = 100
history_ttl_secs = 300
recover = true
[namespaces.tiny]
allow_subscribe_for_client = true
history_size = 5
history_ttl_secs = 300
recover = true
[namespaces.norec]
allow_subscribe_for_client = true
history_size = 10
[namespaces.open]
allow_subscribe_for_client = true
history_size = 10
history_ttl_secs = 300
allow_history_for_client = true
"#;

/// The number a `node --test` TAP summary line reports (`# pass 12` → 12); `u32::MAX` when
/// the line is missing.
/// The test venv's Python (with `cent` and the Python SDK), installed by the README's test
/// command; fails with how to install it when it is missing.
pub fn interop_python(what: &str) -> std::path::PathBuf {
    let python =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/interop-py/bin/python");
    assert!(
        python.exists(),
        "{what} is not installed: run `python3 -m venv target/interop-py && target/interop-py/bin/pip install -r tests/interop/python/requirements.txt` (the README's test command does)"
    );
    python
}

pub fn tap_count(stdout: &str, what: &str) -> u32 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(what))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(u32::MAX)
}

#[path = "../support/process.rs"]
#[allow(
    dead_code,
    reason = "shared with the benches, which use other parts of it"
)]
mod process;

pub use process::{Redis, Server};

/// How long a server may take to print `READY <addr>` in a test.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// The test constructors of the shared guard (`tests/support/process.rs`).
impl Server {
    /// Starts the binary with `config` (TOML text) plus extra flags, and waits for READY.
    pub fn start(config: &str, extra: &[&str]) -> Server {
        Self::start_with_env(config, extra, &[])
    }

    /// Like `start`, with extra environment variables.
    pub fn start_with_env(config: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shardcast.toml");
        std::fs::write(&path, config).expect("write config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardcast"));
        cmd.arg("--config")
            .arg(&path)
            .args(extra)
            .env("RUST_LOG", "info") // a test's own `env` may override it
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        match Server::spawn(&mut cmd, READY_WITHIN, |_| {}, Some(dir)) {
            Ok(server) => server,
            Err(process::StartError::Spawn(e)) => panic!("spawn shardcast: {e}"),
            Err(e) => panic!(
                "server did not print READY ({e:?}); stderr:\n{}",
                e.stderr()
            ),
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/connection/websocket", self.addr)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Signs a connection token.
pub fn token(user: &str, exp_in_secs: Option<i64>, secret: &str) -> String {
    let exp = exp_in_secs.map(|d| (now_secs() as i64 + d) as u64);
    shardcast::protocol::token::sign_connect(
        secret,
        &shardcast::protocol::token::ConnectClaims {
            sub: user.into(),
            exp,
            info: None,
            channels: vec![],
        },
    )
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// One HTTP request on a fresh connection, read to its end; returns (status, the whole
/// response: head and body).
pub fn http_response(addr: SocketAddr, raw: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// One HTTP request on a fresh connection; returns (status, body).
pub fn http(addr: SocketAddr, raw: &str) -> (u16, String) {
    let (status, text) = http_response(addr, raw);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// POSTs to the API with the test key; returns (status, JSON body or Null).
pub fn api(addr: SocketAddr, method: &str, body: &Value) -> (u16, Value) {
    api_with_key(addr, method, body, API_KEY)
}

pub fn api_with_key(addr: SocketAddr, method: &str, body: &Value, key: &str) -> (u16, Value) {
    let body = body.to_string();
    let (status, text) = http(
        addr,
        &format!(
            "POST /api/{method} HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A blocking WebSocket client (tungstenite) speaking the protocol line by line.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
    next_id: u32,
    /// Lines received but not yet consumed.
    pending: std::collections::VecDeque<Value>,
    /// Answer server pings automatically.
    pub auto_pong: bool,
    /// The user it connected as, when known.
    pub user: String,
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    pub reason: String,
}

impl Client {
    pub fn connect_ws(server: &Server) -> Client {
        Self::connect_addr(server.addr)
    }

    pub fn connect_addr(addr: SocketAddr) -> Client {
        Self::connect_with_headers(addr, &[])
    }

    /// Opens the WebSocket with extra headers on the upgrade request (e.g. a `Cookie` for the
    /// connect proxy); no connect command is sent.
    pub fn connect_with_headers(addr: SocketAddr, headers: &[(&str, &str)]) -> Client {
        use tungstenite::client::IntoClientRequest;
        let stream = TcpStream::connect(addr).expect("tcp connect");
        // The handshake gets a generous deadline (a loaded machine may take a while to answer
        // the upgrade); the short read timeout the tests' polling relies on comes after it.
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let url = format!("ws://{addr}/connection/websocket");
        let mut request = url.into_client_request().expect("ws request");
        for (name, value) in headers {
            request.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                value.parse().expect("header value"),
            );
        }
        let (ws, _) = tungstenite::client::client(request, stream).expect("ws handshake");
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Client {
            ws,
            next_id: 1,
            pending: Default::default(),
            auto_pong: true,
            user: String::new(),
        }
    }

    /// Connects and sends `connect` with `token`; returns the reply.
    pub fn connected(server: &Server, user: &str) -> (Client, Value) {
        let mut c = Self::connect_ws(server);
        let t = token(user, Some(3600), SECRET);
        let r = c.command("connect", serde_json::json!({ "token": t }));
        assert!(r.get("connect").is_some(), "connect failed: {r}");
        c.user = user.to_string();
        (c, r)
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).expect("send");
    }

    /// Sends one command and waits for the reply with its id.
    pub fn command(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let cmd = serde_json::json!({ "id": id, method: params });
        self.send_text(&cmd.to_string());
        self.reply(id)
    }

    /// Waits for the reply with `id`, keeping other lines.
    pub fn reply(&mut self, id: u32) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(pos) = self.pending.iter().position(|v| v["id"] == id) {
                return self.pending.remove(pos).unwrap();
            }
            assert!(Instant::now() < deadline, "no reply to {id}");
            if let Err(c) = self.read_some() {
                panic!("closed while waiting for reply {id}: {c:?}");
            }
        }
    }

    /// Next push (a line without id), within `timeout`.
    pub fn push(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.pending.iter().position(|v| v.get("push").is_some()) {
                return self.pending.remove(pos);
            }
            if Instant::now() >= deadline {
                return None;
            }
            if self.read_some().is_err() {
                return None;
            }
        }
    }

    /// Reads until the server closes; returns its close code and reason.
    pub fn closed(&mut self, timeout: Duration) -> Option<Closed> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Err(c) = self.read_some() {
                return c;
            }
        }
        None
    }

    /// Reads one frame into `pending`. `Err` once the connection is closed.
    fn read_some(&mut self) -> Result<(), Option<Closed>> {
        match self.ws.read() {
            Ok(Message::Text(t)) => {
                for line in t.as_str().split('\n').filter(|l| !l.is_empty()) {
                    let v: Value = serde_json::from_str(line).expect("server sent JSON lines");
                    if v.as_object().is_some_and(|o| o.is_empty()) {
                        if self.auto_pong {
                            self.send_text("{}");
                        }
                        continue;
                    }
                    self.pending.push_back(v);
                }
                Ok(())
            }
            Ok(Message::Close(frame)) => Err(frame.map(|f| Closed {
                code: u16::from(f.code),
                reason: f.reason.to_string(),
            })),
            Ok(_) => Ok(()),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(())
            }
            Err(_) => Err(None),
        }
    }

    /// The shard this connection landed on (encoded in the client id by the server).
    pub fn shard_of(connect_reply: &Value) -> u64 {
        let client = connect_reply["connect"]["client"].as_str().unwrap();
        let group = client.split('-').nth(3).unwrap();
        u64::from_str_radix(&group[1..], 16).unwrap()
    }
}

/// Open clients until they cover every one of `shards` shards (bounded attempts).
pub fn clients_on_every_shard(server: &Server, shards: u64, per_shard: usize) -> Vec<Client> {
    let mut by_shard: Vec<Vec<Client>> = (0..shards).map(|_| Vec::new()).collect();
    for i in 0..256 {
        if by_shard.iter().all(|v| v.len() >= per_shard) {
            break;
        }
        let (c, reply) = Client::connected(server, &format!("user{i}"));
        let s = Client::shard_of(&reply) as usize;
        if by_shard[s].len() < per_shard {
            by_shard[s].push(c);
        }
    }
    assert!(
        by_shard.iter().all(|v| v.len() >= per_shard),
        "connections did not spread over every shard"
    );
    by_shard.into_iter().flatten().collect()
}

/// The test constructors and tools of the shared `redis-server` guard
/// (`tests/support/process.rs`): an ephemeral port, killed and reaped on drop.
impl Redis {
    /// Starts redis-server without persistence; `extra` are more server arguments.
    pub fn start(extra: &[&str]) -> Redis {
        let opts = process::RedisOptions {
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        Redis::launch(opts).unwrap_or_else(|e| {
            panic!(
                "redis-server did not start ({e}; is it installed? the README's test command installs it)"
            )
        })
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        if let Err(e) = self.respawn() {
            panic!("redis-server did not restart on port {}: {e}", self.port);
        }
    }

    /// Runs a command through redis-cli; returns its output lines.
    pub fn cli(&self, args: &[&str]) -> Vec<String> {
        let mut all: Vec<String> = self.args_auth();
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        redis_cli(self.port, &all)
    }

    fn args_auth(&self) -> Vec<String> {
        let args = self.extra_args();
        match args.iter().position(|a| a == "--requirepass") {
            Some(i) => vec!["-a".into(), args[i + 1].clone(), "--no-auth-warning".into()],
            None => vec![],
        }
    }
}

/// Waits until `check` holds, polling, or panics with `what` after `timeout`.
pub fn eventually(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting until {what}");
}

/// What a bounded child run printed: its exit status (`None`: killed at the limit), stdout and
/// stderr.
pub struct Ran {
    pub status: Option<std::process::ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` (stdin closed, stdout and stderr collected) for at most `limit`; past it the child
/// is killed and reaped.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Ran {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let collect = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        })
    };
    let stdout = collect(Box::new(child.stdout.take().unwrap()));
    let stderr = collect(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ran {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// `redis-cli -p PORT ARGS...`: its output lines.
pub fn redis_cli(port: u16, args: &[&str]) -> Vec<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.to_string())
        .collect()
}
