//! Proxy benchmark: what calling the application backend costs.
//!
//! Starts a trivial backend inside the bench (std threads, HTTP/1.1 keep-alive: the connect
//! proxy answers `{"result":{"user":"u<N>"}}`, the rpc proxy `{"result":{"data":{}}}`) and a
//! `shardcast` whose `[proxy]` points at it, then measures in the same run:
//!
//! 1. connections per second with HS256 tokens (the baseline: no proxy involved),
//! 2. connections per second through the connect proxy (no token; each connect is one POST to
//!    the backend), and the ratio of the two,
//! 3. RPC round trips per second per shard: several clients, each keeping `--window` `rpc`
//!    commands in flight, every one a POST to the backend.
//!
//! Each figure comes with the server's CPU time per operation (/proc/<pid>/stat, utime+stime,
//! and the schedstat nanoseconds of its threads). Every connect and RPC reply is checked; the
//! backend's request counters must match the proxied operations. The connection count stays
//! under RLIMIT_NOFILE, the RPC phase stops after `--rpc-secs` or `--max-rpcs`, and an overall
//! deadline kills everything.
//!
//! Run: `cargo bench --bench proxy [-- --conns N --shards 1 ...]`, `--help` for all options;
//! `cargo bench --bench proxy -- --self-test` checks the trivial backend alone (no server).

#[macro_use]
#[path = "common/modules.rs"]
mod modules;
common_modules!("common"; args, connect, cpu, http, net, safety, server, ws);

use common::args::{conns_under_nofile, Args};
use common::connect::ws_upgrade;
use common::cpu::{cpu_secs, online_cpus, sched_ns, self_cpu_secs};
use common::http::HttpClient;
use common::net::{raise_nofile, src_addr};
use common::process;
use common::safety::{fatal, install_safety_nets};
use common::server::{child_setup, scratch_dir, server_bin, write_config};
use common::ws::{encode_client_frame, is_ping_line, json_lines, WsDecoder, WsEvent};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

const USAGE: &str = "\
cargo bench --bench proxy -- [options]
  --conns N         connections per connect phase (default 2000, held under RLIMIT_NOFILE - margin)
  --margin N        file descriptors kept free below the hard limit (default 300; the
                    backend's connections are kept free on top)
  --threads N       connecting threads (default 4)
  --src-addrs N     source addresses 127.0.0.2.. (default 4)
  --shards N        server --shards (default 1: the RPC figure is then per shard)
  --rpc-clients N   RPC clients (default 8)
  --window N        rpc commands each client keeps in flight (default 16)
  --rpc-secs S      length of the RPC phase (default 5)
  --max-rpcs N      RPC round trips at most (default 2000000)
  --deadline S      hard overall deadline in seconds (default 180)
  --server-log      server stderr to our stderr (default: a log file under target/)
  --self-test       check the trivial backend alone (keep-alive, pipelining, answers) and exit
env SHARDCAST_BIN overrides the server binary.";

const SECRET: &str = "bench-proxy-secret";
/// Connections the trivial backend serves at once (a thread each); more are closed at accept.
/// The server keeps at most `max_in_flight` (256 by default) per shard anyway.
const BACKEND_MAX_CONNS: usize = 512;

// ---------------------------------------------------------------------------
// The trivial backend
// ---------------------------------------------------------------------------

/// Requests the backend answered, by endpoint.
#[derive(Default)]
struct BackendCounts {
    connect: AtomicU64,
    rpc: AtomicU64,
    other: AtomicU64,
    refused_conns: AtomicU64,
}

/// The bench's application backend: a listener thread and one thread per keep-alive
/// connection. Lives until the bench exits.
struct TrivialBackend {
    addr: SocketAddr,
    counts: Arc<BackendCounts>,
}

impl TrivialBackend {
    fn start() -> io::Result<TrivialBackend> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(BackendCounts::default());
        let live = Arc::new(AtomicUsize::new(0));
        let c = counts.clone();
        thread::Builder::new()
            .name("backend-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    if live.load(Ordering::Relaxed) >= BACKEND_MAX_CONNS {
                        c.refused_conns.fetch_add(1, Ordering::Relaxed);
                        continue; // dropped: closed
                    }
                    live.fetch_add(1, Ordering::Relaxed);
                    let (c, live) = (c.clone(), live.clone());
                    let spawned = thread::Builder::new()
                        .name("backend-conn".into())
                        .stack_size(64 * 1024)
                        .spawn(move || {
                            let _ = serve(stream, &c);
                            live.fetch_sub(1, Ordering::Relaxed);
                        });
                    if spawned.is_err() {
                        eprintln!("# backend: cannot spawn a connection thread");
                    }
                }
            })?;
        Ok(TrivialBackend { addr, counts })
    }
}

/// Longest request head and body the backend reads.
const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_BODY_BYTES: usize = 1 << 20;

/// Serves one keep-alive connection: requests in order (pipelined ones too), until EOF.
fn serve(mut s: TcpStream, counts: &BackendCounts) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let mut tmp = [0u8; 8192];
    loop {
        // Answer every complete request in the buffer, then write once.
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            let head = match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                    return reply_and_close(&mut s, 431)
                }
                Ok(httparse::Status::Partial) => break,
                Err(_) => return reply_and_close(&mut s, 400),
            };
            let mut len = 0usize;
            let mut close = false;
            for h in req.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    len = match std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse().ok())
                    {
                        Some(n) if n <= MAX_BODY_BYTES => n,
                        _ => return reply_and_close(&mut s, 413),
                    };
                } else if h.name.eq_ignore_ascii_case("connection") {
                    close = h.value.eq_ignore_ascii_case(b"close");
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    return reply_and_close(&mut s, 501);
                }
            }
            if buf.len() < head + len {
                break;
            }
            let (status, body) = match req.path.unwrap_or("") {
                "/centrifugo/connect" => {
                    let n = counts.connect.fetch_add(1, Ordering::Relaxed);
                    (200, format!("{{\"result\":{{\"user\":\"u{n}\"}}}}"))
                }
                "/centrifugo/rpc" => {
                    counts.rpc.fetch_add(1, Ordering::Relaxed);
                    (200, "{\"result\":{\"data\":{}}}".to_string())
                }
                _ => {
                    counts.other.fetch_add(1, Ordering::Relaxed);
                    (404, "{}".to_string())
                }
            };
            write!(
                out,
                "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                if status == 200 { "OK" } else { "Not Found" },
                body.len()
            )?;
            buf.drain(..head + len);
            if close {
                s.write_all(&out)?;
                return Ok(());
            }
        }
        if !out.is_empty() {
            s.write_all(&out)?;
            out.clear();
        }
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn reply_and_close(s: &mut TcpStream, status: u16) -> io::Result<()> {
    write!(
        s,
        "HTTP/1.1 {status} Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

/// `--self-test`: the backend's answers over one keep-alive connection with pipelining, and a
/// second connection; exits 2 (via `fatal`) on any mismatch.
fn self_test() {
    let b = TrivialBackend::start().unwrap_or_else(|e| fatal(&format!("backend: {e}")));
    let mut c = HttpClient::connect(b.addr).unwrap_or_else(|e| fatal(&format!("connect: {e}")));
    let body = br#"{"client":"c","transport":"websocket","protocol":"json","encoding":"json"}"#;
    // Pipelined: three requests written before any answer is read.
    for path in ["/centrifugo/connect", "/centrifugo/rpc", "/nope"] {
        c.send("POST", path, body)
            .unwrap_or_else(|e| fatal(&format!("send: {e}")));
    }
    let want = [
        (200, r#"{"result":{"user":"u0"}}"#),
        (200, r#"{"result":{"data":{}}}"#),
        (404, "{}"),
    ];
    for (status, text) in want {
        let (got_status, got) = c.recv().unwrap_or_else(|e| fatal(&format!("recv: {e}")));
        let got = String::from_utf8_lossy(&got);
        if (got_status, got.as_ref()) != (status, text) {
            fatal(&format!(
                "self-test: want {status} {text}, got {got_status} {got}"
            ));
        }
    }
    // Keep-alive: the same connection serves again; a second connection counts on.
    let mut d = HttpClient::connect(b.addr).unwrap_or_else(|e| fatal(&format!("connect: {e}")));
    for (client, want) in [(&mut c, "u1"), (&mut d, "u2")] {
        client
            .send("POST", "/centrifugo/connect", b"{}")
            .unwrap_or_else(|e| fatal(&format!("send: {e}")));
        let (status, got) = client
            .recv()
            .unwrap_or_else(|e| fatal(&format!("recv: {e}")));
        let want = format!("{{\"result\":{{\"user\":\"{want}\"}}}}");
        if status != 200 || got != want.as_bytes() {
            fatal(&format!(
                "self-test: want {want}, got {status} {}",
                String::from_utf8_lossy(&got)
            ));
        }
    }
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let counts = (n(&b.counts.connect), n(&b.counts.rpc), n(&b.counts.other));
    if counts != (3, 1, 1) {
        fatal(&format!(
            "self-test: counts (connect, rpc, other) {counts:?}, want (3, 1, 1)"
        ));
    }
    println!("self-test ok: trivial backend at {} answers connect, rpc and 404 with keep-alive and pipelining", b.addr);
}

// ---------------------------------------------------------------------------
// A blocking WebSocket client speaking the protocol (connect, rpc)
// ---------------------------------------------------------------------------

struct Ws {
    s: TcpStream,
    dec: WsDecoder,
    tmp: Vec<u8>,
    frame: Vec<u8>,
}

impl Ws {
    fn open(dst: SocketAddr, src: Option<Ipv4Addr>) -> Result<Ws, String> {
        let (s, early) = ws_upgrade(dst, src, Duration::from_secs(10))?;
        if !early.is_empty() {
            return Err("server sent data before the connect command".into());
        }
        Ok(Ws {
            s,
            dec: WsDecoder::default(),
            tmp: vec![0u8; 16384],
            frame: Vec::with_capacity(256),
        })
    }

    fn send(&mut self, text: &[u8]) -> Result<(), String> {
        self.frame.clear();
        encode_client_frame(&mut self.frame, 1, text);
        self.s
            .write_all(&self.frame)
            .map_err(|e| format!("write: {e}"))
    }

    /// One read; `f` gets each JSON line but pings (answered here). Err on EOF or close.
    fn read_lines(&mut self, f: &mut dyn FnMut(&[u8])) -> Result<(), String> {
        let n = self
            .s
            .read(&mut self.tmp)
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("EOF".into());
        }
        let (mut pings, mut closed, mut bad, mut pongs) = (0, None, None, Vec::new());
        let mut on = |ev: WsEvent| match ev {
            WsEvent::Text(msg) => {
                for line in json_lines(msg) {
                    if is_ping_line(line) {
                        pings += 1;
                    } else {
                        f(line);
                    }
                }
            }
            WsEvent::Close(code) => closed = Some(code),
            WsEvent::Binary(b) => bad = Some(format!("binary frame of {} bytes", b.len())),
            // RFC 6455: a Ping frame is answered with a Pong carrying its payload.
            WsEvent::Ping(p) => pongs.push(p.to_vec()),
            WsEvent::Pong => {}
        };
        self.dec.feed(&self.tmp[..n], &mut on)?;
        for _ in 0..pings {
            self.send(b"{}")?;
        }
        for p in pongs {
            self.frame.clear();
            encode_client_frame(&mut self.frame, 0xA, &p);
            self.s
                .write_all(&self.frame)
                .map_err(|e| format!("write pong: {e}"))?;
        }
        if let Some(b) = bad {
            return Err(format!("unexpected {b}"));
        }
        match closed {
            Some(code) => Err(format!("server closed with {code:?}")),
            None => Ok(()),
        }
    }

    /// Sends `connect` (with `token` if given) and waits for its reply.
    fn connect(&mut self, token: Option<&str>) -> Result<(), String> {
        let cmd = match token {
            Some(t) => format!("{{\"id\":1,\"connect\":{{\"token\":\"{t}\"}}}}"),
            None => "{\"id\":1,\"connect\":{}}".to_string(),
        };
        self.send(cmd.as_bytes())?;
        let mut outcome: Option<Result<(), String>> = None;
        while outcome.is_none() {
            self.read_lines(&mut |line| {
                let v: serde_json::Value = match serde_json::from_slice(line) {
                    Ok(v) => v,
                    Err(e) => {
                        outcome = Some(Err(format!("bad JSON: {e}")));
                        return;
                    }
                };
                if v["id"] == 1 {
                    outcome = Some(if v["connect"]["client"].is_string() {
                        Ok(())
                    } else {
                        Err(format!("connect reply: {v}"))
                    });
                }
            })?;
        }
        outcome.unwrap()
    }
}

// ---------------------------------------------------------------------------
// Server and figures
// ---------------------------------------------------------------------------

/// Starts `shardcast --config <cfg>` (no `--insecure`: a connect without a token must go to
/// the proxy) and waits for READY.
fn start_server(opts: &Opts, backend: SocketAddr) -> process::Server {
    let b = format!("http://{backend}/centrifugo");
    let cfg = format!(
        "# written by benches/proxy.rs\n\
         listen = \"127.0.0.1:0\"\nshards = {}\ntoken_hmac_secret = \"{SECRET}\"\napi_key = \"bench\"\n\
         [limits]\ncommand_rate_per_sec = 1000000\ncommand_burst = 1000000\n\
         [proxy]\nconnect_endpoint = \"{b}/connect\"\nrpc_endpoint = \"{b}/rpc\"\ntimeout_ms = 5000\n",
        opts.shards
    );
    let path = write_config("shardcast-bench-proxy.toml", &cfg);
    let bin = server_bin();
    let mut cmd = Command::new(&bin);
    cmd.arg("--config").arg(&path).stdin(Stdio::null());
    if opts.server_log {
        cmd.stderr(Stdio::inherit());
    } else {
        let log = scratch_dir().join("shardcast-bench-proxy.log");
        match std::fs::File::create(&log) {
            Ok(f) => cmd.stderr(Stdio::from(f)),
            Err(_) => cmd.stderr(Stdio::null()),
        };
        eprintln!("# server log: {}", log.display());
    }
    child_setup(&mut cmd);
    let other = |line: &str| eprintln!("# server stdout: {line}");
    match process::Server::spawn(&mut cmd, Duration::from_secs(20), other, None) {
        Ok(s) => s,
        Err(e) => fatal(&format!(
            "server {} did not start ({e:?}); a server without the [proxy] section refuses this config",
            bin.display()
        )),
    }
}

/// `num_clients` of the node, from `/api/info`.
fn num_clients(addr: SocketAddr) -> Option<u64> {
    let mut c = HttpClient::connect(addr).ok()?;
    c.send("POST", "/api/info", b"{}").ok()?;
    let (status, body) = c.recv().ok()?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v["result"]["nodes"][0]["num_clients"].as_u64()
}

/// Waits (bounded) until the server holds no client.
fn wait_no_clients(addr: SocketAddr) {
    let end = Instant::now() + Duration::from_secs(15);
    while Instant::now() < end {
        if num_clients(addr) == Some(0) {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!("# warning: the server still counts clients 15 s after they closed");
}

/// The server's CPU so far: (utime+stime seconds, schedstat nanoseconds).
fn server_cpu(pid: i32) -> (f64, u64) {
    (cpu_secs(pid), sched_ns(pid))
}

struct Phase {
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    wall: Duration,
    cpu_s: f64,
    sched_ns: u64,
    bench_cpu_s: f64,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// Server CPU µs per operation (schedstat: finer than clock ticks).
    fn cpu_us(&self) -> f64 {
        self.sched_ns as f64 / 1e3 / (self.ops.max(1) as f64)
    }

    /// Prints the figures; exits (fatal) when not one operation succeeded.
    fn print(&self, name: &str, extra: &str) {
        println!(
            "{name:<14} ops={} errors={} wall={:.2} s rate={:.0}/s server_cpu={:.1} µs/op \
             (utime+stime {:.2} s) bench_cpu={:.2} s{extra}",
            self.ops,
            self.errors,
            self.wall.as_secs_f64(),
            self.rate(),
            self.cpu_us(),
            self.cpu_s,
            self.bench_cpu_s
        );
        if let Some(e) = &self.first_error {
            println!("{name:<14} first error: {e}");
        }
        if self.ops == 0 {
            fatal(&format!("{name}: not one operation succeeded"));
        }
    }
}

/// Opens `n` connections from `threads` threads and holds them until all are done; with
/// `tokens`, connection i sends `tokens[i]`, else no token (the connect proxy decides).
fn connect_phase(
    opts: &Opts,
    dst: SocketAddr,
    pid: i32,
    tokens: Option<Arc<Vec<String>>>,
) -> Phase {
    let n = opts.conns;
    let threads = opts.threads.clamp(1, n.max(1));
    let start = Arc::new(Barrier::new(threads + 1));
    let mut handles = Vec::new();
    for t in 0..threads {
        let (start, tokens) = (start.clone(), tokens.clone());
        let n_src = opts.n_src;
        handles.push(thread::spawn(move || {
            let mut held = Vec::new();
            let (mut errors, mut first_error) = (0u64, None);
            start.wait();
            let mut i = t;
            while i < n {
                let token = tokens.as_ref().map(|v| v[i].as_str());
                match Ws::open(dst, Some(src_addr(i, n_src))).and_then(|mut w| {
                    w.connect(token)?;
                    Ok(w)
                }) {
                    Ok(w) => held.push(w),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(format!("connection {i}: {e}"));
                    }
                }
                i += threads;
            }
            (held, errors, first_error)
        }));
    }
    let (cpu0, ns0, self0) = {
        let (c, s) = server_cpu(pid);
        (c, s, self_cpu_secs())
    };
    start.wait();
    let t0 = Instant::now();
    let mut all = Vec::new();
    let (mut errors, mut first_error) = (0, None);
    for h in handles {
        let (held, e, fe) = h
            .join()
            .unwrap_or_else(|_| fatal("connect thread panicked"));
        all.extend(held);
        errors += e;
        if first_error.is_none() {
            first_error = fe;
        }
    }
    let wall = t0.elapsed();
    let (cpu1, ns1) = server_cpu(pid);
    let phase = Phase {
        ops: all.len() as u64,
        errors,
        first_error,
        wall,
        cpu_s: cpu1 - cpu0,
        sched_ns: ns1.saturating_sub(ns0),
        bench_cpu_s: self_cpu_secs() - self0,
    };
    drop(all);
    phase
}

/// `clients` token-connected clients, each keeping `window` rpc commands in flight for
/// `secs` seconds (or until `max` round trips in all); every reply is checked.
fn rpc_phase(opts: &Opts, dst: SocketAddr, pid: i32) -> Phase {
    let clients = opts.rpc_clients.max(1);
    let start = Arc::new(Barrier::new(clients + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let budget = Arc::new(AtomicU64::new(opts.max_rpcs));
    let mut handles = Vec::new();
    for c in 0..clients {
        let (start, stop, budget) = (start.clone(), stop.clone(), budget.clone());
        let (window, n_src) = (opts.window.max(1), opts.n_src);
        let token = token_for(&format!("rpc{c}"));
        handles.push(thread::spawn(move || -> (u64, u64, Option<String>) {
            let mut w = match Ws::open(dst, Some(src_addr(c, n_src))).and_then(|mut w| {
                w.connect(Some(&token))?;
                Ok(w)
            }) {
                Ok(w) => w,
                Err(e) => {
                    start.wait();
                    return (0, 1, Some(format!("rpc client {c}: {e}")));
                }
            };
            start.wait();
            let (mut done, mut errors, mut first_error) = (0u64, 0u64, None);
            let (mut next_id, mut in_flight) = (2u64, 0usize);
            let take = |budget: &AtomicU64| {
                budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
                    .is_ok()
            };
            loop {
                while in_flight < window && !stop.load(Ordering::Relaxed) && take(&budget) {
                    let cmd =
                        format!("{{\"id\":{next_id},\"rpc\":{{\"method\":\"m\",\"data\":{{}}}}}}");
                    if let Err(e) = w.send(cmd.as_bytes()) {
                        return (done, errors + 1, Some(e));
                    }
                    next_id += 1;
                    in_flight += 1;
                }
                if in_flight == 0 {
                    return (done, errors, first_error);
                }
                let r = w.read_lines(&mut |line| {
                    let v: serde_json::Value = serde_json::from_slice(line).unwrap_or_default();
                    if v["id"].as_u64().is_some() {
                        in_flight -= 1;
                        if v["rpc"].is_object() {
                            done += 1;
                        } else {
                            errors += 1;
                            first_error.get_or_insert_with(|| v.to_string());
                        }
                    }
                });
                if let Err(e) = r {
                    return (done, errors + 1, Some(e));
                }
            }
        }));
    }
    let (cpu0, ns0, self0) = {
        let (c, s) = server_cpu(pid);
        (c, s, self_cpu_secs())
    };
    start.wait();
    let t0 = Instant::now();
    let stop_at = t0 + Duration::from_secs(opts.rpc_secs);
    while Instant::now() < stop_at && budget.load(Ordering::Relaxed) > 0 {
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let (mut ops, mut errors, mut first_error) = (0, 0, None);
    for h in handles {
        let (d, e, fe) = h.join().unwrap_or_else(|_| fatal("rpc thread panicked"));
        ops += d;
        errors += e;
        if first_error.is_none() {
            first_error = fe;
        }
    }
    let wall = t0.elapsed();
    let (cpu1, ns1) = server_cpu(pid);
    Phase {
        ops,
        errors,
        first_error,
        wall,
        cpu_s: cpu1 - cpu0,
        sched_ns: ns1.saturating_sub(ns0),
        bench_cpu_s: self_cpu_secs() - self0,
    }
}

fn token_for(user: &str) -> String {
    shardcast::protocol::token::sign_connect(
        SECRET,
        &shardcast::protocol::token::ConnectClaims {
            sub: user.into(),
            exp: None,
            info: None,
            channels: vec![],
        },
    )
}

struct Opts {
    conns: usize,
    threads: usize,
    n_src: usize,
    shards: usize,
    rpc_clients: usize,
    window: usize,
    rpc_secs: u64,
    max_rpcs: u64,
    server_log: bool,
}

fn main() {
    let Some(args) = Args::parse_or_help(USAGE) else {
        return;
    };
    if args.has("self-test") {
        self_test();
        return;
    }
    install_safety_nets(Duration::from_secs(args.get("deadline", 180u64)));
    let hard = raise_nofile();
    // The bench holds the clients and the backend's connections; the server has its own limit.
    let (n, margin) = conns_under_nofile(&args, "conns", Some(2000), hard);
    let n = n.min(hard.saturating_sub(margin + BACKEND_MAX_CONNS as u64) as usize);
    let opts = Opts {
        conns: n,
        threads: args.get("threads", 4usize),
        n_src: args.get("src-addrs", 4usize).max(1),
        shards: args.get("shards", 1usize).max(1),
        rpc_clients: args.get("rpc-clients", 8usize),
        window: args.get("window", 16usize),
        rpc_secs: args.get("rpc-secs", 5u64),
        max_rpcs: args.get("max-rpcs", 2_000_000u64),
        server_log: args.has("server-log"),
    };
    if opts.conns == 0 {
        fatal("no connections fit under RLIMIT_NOFILE");
    }
    let backend = TrivialBackend::start().unwrap_or_else(|e| fatal(&format!("backend: {e}")));
    let server = start_server(&opts, backend.addr);
    let (pid, dst) = (server.pid(), server.addr);
    println!(
        "# machine: {} CPUs online, shared; server {} shard(s), bench and trivial backend in one \
         process on the same cores. Figures move 10-20% between runs on a shared machine: \
         compare the ratio of the same run, not single numbers.",
        online_cpus(),
        opts.shards
    );
    println!(
        "# server pid {pid} at {dst}; backend at {}; {} connections per connect phase from {} source addresses, {} threads",
        backend.addr, opts.conns, opts.n_src, opts.threads
    );

    // 1. Baseline: HS256 token connects (signed before the clock starts).
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..opts.conns)
            .map(|i| token_for(&format!("t{i}")))
            .collect(),
    );
    let proxied_before = backend.counts.connect.load(Ordering::Relaxed);
    let token = connect_phase(&opts, dst, pid, Some(tokens));
    token.print("connect_token", "");
    if backend.counts.connect.load(Ordering::Relaxed) != proxied_before {
        fatal("token connects reached the connect proxy");
    }
    wait_no_clients(dst);

    // 2. Connects through the connect proxy.
    let before = backend.counts.connect.load(Ordering::Relaxed);
    let proxy = connect_phase(&opts, dst, pid, None);
    let backend_seen = backend.counts.connect.load(Ordering::Relaxed) - before;
    proxy.print(
        "connect_proxy",
        &format!(" backend_requests={backend_seen}"),
    );
    if backend_seen < proxy.ops {
        fatal(&format!(
            "{} proxied connects succeeded but the backend saw {backend_seen}",
            proxy.ops
        ));
    }
    wait_no_clients(dst);
    println!(
        "connect_ratio  proxy/token rate={:.2} server_cpu per connect proxy/token={:.2}",
        proxy.rate() / token.rate().max(1e-9),
        proxy.cpu_us() / token.cpu_us().max(1e-9)
    );

    // 3. RPC round trips.
    let before = backend.counts.rpc.load(Ordering::Relaxed);
    let rpc = rpc_phase(&opts, dst, pid);
    let backend_seen = backend.counts.rpc.load(Ordering::Relaxed) - before;
    rpc.print(
        "rpc",
        &format!(
            " per_shard={:.0}/s clients={} window={} backend_requests={backend_seen}",
            rpc.rate() / opts.shards as f64,
            opts.rpc_clients,
            opts.window
        ),
    );
    if backend_seen < rpc.ops {
        fatal(&format!(
            "{} RPCs succeeded but the backend saw {backend_seen}",
            rpc.ops
        ));
    }
    let refused = backend.counts.refused_conns.load(Ordering::Relaxed);
    if refused > 0 {
        println!("# backend refused {refused} connections over its {BACKEND_MAX_CONNS} limit");
    }
    if token.errors + proxy.errors + rpc.errors > 0 {
        println!("# errors above: the figures count successful operations only");
    }
    drop(server);
}
