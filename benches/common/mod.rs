//! Shared helpers for the `density` and `fanout` benchmarks.
//!
//! Everything here is deliberately plain std + libc: blocking `TcpStream`s for
//! connection setup, raw epoll for reading many sockets, a hand-rolled
//! RFC 6455 client framer and a minimal HTTP/1.1 keep-alive client. No async
//! runtime.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

/// `--key value` / `--key=value` / `--flag` parser. Unknown arguments such as
/// the `--bench` that `cargo bench` appends are accepted and ignored.
pub struct Args {
    map: HashMap<String, String>,
}

impl Args {
    pub fn parse() -> Args {
        let argv: Vec<String> = std::env::args().skip(1).collect();
        let mut map = HashMap::new();
        let mut i = 0;
        while i < argv.len() {
            let a = &argv[i];
            if let Some(k) = a.strip_prefix("--") {
                if let Some((k, v)) = k.split_once('=') {
                    map.insert(k.to_string(), v.to_string());
                } else if i + 1 < argv.len() && !argv[i + 1].starts_with("--") {
                    map.insert(k.to_string(), argv[i + 1].clone());
                    i += 1;
                } else {
                    map.insert(k.to_string(), "true".to_string());
                }
            }
            i += 1;
        }
        Args { map }
    }

    pub fn has(&self, k: &str) -> bool {
        self.map.contains_key(k)
    }

    pub fn str(&self, k: &str) -> Option<String> {
        self.map.get(k).cloned()
    }

    pub fn get<T: FromStr>(&self, k: &str, default: T) -> T {
        match self.map.get(k) {
            None => default,
            Some(v) => match v.parse() {
                Ok(x) => x,
                Err(_) => fatal(&format!("bad value for --{k}: {v:?}")),
            },
        }
    }

    /// Extra server arguments: `--config <bench config>` (unless
    /// `--no-bench-config`), then `--server-args "--foo 1 --bar"` split on
    /// whitespace.
    pub fn server_args(&self, name: &str) -> Vec<String> {
        let mut v = Vec::new();
        if !self.has("no-bench-config") {
            let history = self
                .str("history")
                .and_then(|h| h.parse().ok())
                .unwrap_or(0);
            v.push("--config".to_string());
            v.push(write_bench_config(name, history).display().to_string());
        }
        if let Some(s) = self.str("server-args") {
            v.extend(s.split_whitespace().map(str::to_string));
        }
        v
    }
}

/// Scratch directory for logs and config files (inside target/).
pub fn scratch_dir() -> PathBuf {
    let dir = PathBuf::from(
        option_env!("CARGO_TARGET_TMPDIR")
            .map(str::to_string)
            .unwrap_or_else(|| std::env::temp_dir().display().to_string()),
    );
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// The server only accepts channels of configured namespaces, and namespaces
/// come from its TOML config, so the benches declare `bench` (for
/// `bench:<n>`) with default options in a small config file; `--history N`
/// gives it a history of N publications with recovery (offsets on every push).
fn write_bench_config(name: &str, history: u32) -> PathBuf {
    let path = scratch_dir().join(format!("shardcast-bench-{name}.toml"));
    let mut text = "# written by benches/common/mod.rs: the bench channels are bench:<n>\n\
                [namespaces.bench]\n"
        .to_string();
    if history > 0 {
        text.push_str(&format!(
            "history_size = {history}\nhistory_ttl_secs = 300\nrecover = true\n"
        ));
    }
    if let Err(e) = std::fs::write(&path, text) {
        fatal(&format!("cannot write {}: {e}", path.display()));
    }
    path
}

pub fn fatal(msg: &str) -> ! {
    eprintln!("# FATAL: {msg}");
    kill_server_now();
    std::process::exit(2);
}

// ---------------------------------------------------------------------------
// Safety nets: hard deadline, panic hook, SIGINT/SIGTERM, parent-death signal
// ---------------------------------------------------------------------------

/// PIDs of the running children (servers, redis-server; 0 = free slot). Used
/// by every "get out now" path; the normal path is the `Drop` of [`Server`] /
/// [`RedisServer`]. A fixed array of atomics so the signal handler can walk it.
const MAX_CHILDREN: usize = 8;
static CHILD_PIDS: [AtomicI32; MAX_CHILDREN] = [const { AtomicI32::new(0) }; MAX_CHILDREN];

/// Records a child PID for the safety nets; returns its slot.
fn register_child(pid: i32) -> usize {
    for (i, slot) in CHILD_PIDS.iter().enumerate() {
        if slot
            .compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return i;
        }
    }
    // SAFETY: plain syscalls on the child we just spawned.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    fatal("too many bench children")
}

/// Takes the child out of the registry; true if it was still there (i.e. no
/// safety net has killed and reaped it yet), in which case the caller must
/// kill and reap it.
fn unregister_child(slot: usize, pid: i32) -> bool {
    CHILD_PIDS[slot]
        .compare_exchange(pid, 0, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
}

/// Kills and reaps every registered child (async-signal-safe).
pub fn kill_server_now() {
    for slot in &CHILD_PIDS {
        let pid = slot.swap(0, Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: plain syscalls on a PID we spawned and have not reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe calls here: kill, waitpid, _exit.
    kill_server_now();
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + sig) };
}

/// Installs the overall deadline watchdog, a panic hook (the bench profile has
/// `panic = "abort"`, so `Drop` guards do not run on panic) and SIGINT/SIGTERM
/// handlers. All of them kill and reap every child (servers, redis-server) by PID.
pub fn install_safety_nets(deadline: Duration) {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        kill_server_now();
        default_hook(info);
    }));
    // SAFETY: installing a handler that only calls async-signal-safe functions.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    thread::Builder::new()
        .name("deadline".into())
        .spawn(move || {
            thread::sleep(deadline);
            eprintln!(
                "# FATAL: overall deadline of {} s exceeded; killing server and exiting",
                deadline.as_secs()
            );
            kill_server_now();
            std::process::exit(3);
        })
        .expect("spawn deadline thread");
}

// ---------------------------------------------------------------------------
// Server child
// ---------------------------------------------------------------------------

pub struct Server {
    child: Child,
    slot: usize,
    pub pid: i32,
    pub addr: SocketAddr,
    pub bin: PathBuf,
    pub cmdline: String,
    pub log: Option<PathBuf>,
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Server binary: `$SHARDCAST_BIN`, else the binary cargo built for this bench
/// (`CARGO_BIN_EXE_shardcast`, i.e. target/release/shardcast under the bench
/// profile), else target/release/shardcast, building it if missing.
pub fn server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SHARDCAST_BIN") {
        return PathBuf::from(p);
    }
    let candidates = [
        option_env!("CARGO_BIN_EXE_shardcast").map(PathBuf::from),
        Some(manifest_dir().join("target/release/shardcast")),
    ];
    for c in candidates.iter().flatten() {
        if c.exists() {
            return c.clone();
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    eprintln!("# server binary missing; running `cargo build --release --bin shardcast`");
    let st = Command::new(cargo)
        .args(["build", "--release", "--bin", "shardcast"])
        .current_dir(manifest_dir())
        .status();
    match st {
        Ok(s) if s.success() => manifest_dir().join("target/release/shardcast"),
        other => fatal(&format!(
            "cargo build --release --bin shardcast failed: {other:?}"
        )),
    }
}

impl Server {
    /// Starts `shardcast --listen 127.0.0.1:0 --shards N --insecure --api-key bench
    /// [extra...]` and waits (up to 20 s) for its `READY <ip>:<port>` line.
    /// Server stderr goes to a log file unless `log_to_stderr`.
    pub fn start(name: &str, shards: usize, extra: &[String], log_to_stderr: bool) -> Server {
        let bin = server_bin();
        let mut cmd = Command::new(&bin);
        cmd.args(["--listen", "127.0.0.1:0", "--shards"])
            .arg(shards.to_string())
            .args(["--insecure", "--api-key", "bench"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let log = if log_to_stderr {
            cmd.stderr(Stdio::inherit());
            None
        } else {
            let path = scratch_dir().join(format!("shardcast-bench-{name}.log"));
            match std::fs::File::create(&path) {
                Ok(f) => {
                    cmd.stderr(Stdio::from(f));
                    Some(path)
                }
                Err(_) => {
                    cmd.stderr(Stdio::null());
                    None
                }
            }
        };
        child_setup(&mut cmd);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => fatal(&format!("cannot start {}: {e}", bin.display())),
        };
        let pid = child.id() as i32;
        let slot = register_child(pid);
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        thread::Builder::new()
            .name("server-stdout".into())
            .spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(rest) = line.trim().strip_prefix("READY ") {
                        if let Some(t) = tx.take() {
                            let _ = t.send(rest.trim().to_string());
                        }
                    } else {
                        eprintln!("# server stdout: {line}");
                    }
                }
            })
            .expect("spawn stdout thread");
        let cmdline = format!("{cmd:?}").replace('"', "");
        let mut server = Server {
            child,
            slot,
            pid,
            addr: "0.0.0.0:0".parse().unwrap(),
            bin,
            cmdline,
            log,
        };
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => match a.parse::<SocketAddr>() {
                Ok(a) => server.addr = a,
                Err(_) => fatal(&format!("server printed a bad READY line: READY {a}")),
            },
            Err(mpsc::RecvTimeoutError::Timeout) => fatal("server did not print READY within 20 s"),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                thread::sleep(Duration::from_millis(100));
                let st = server.child.try_wait();
                if matches!(st, Ok(Some(_))) {
                    // Reaped: its PID must not be killed any more.
                    unregister_child(server.slot, server.pid);
                }
                fatal(&format!(
                    "server closed stdout without READY (exit: {st:?}); binary {}{}",
                    server.bin.display(),
                    server
                        .log
                        .as_ref()
                        .map(|l| format!(", log {}", l.display()))
                        .unwrap_or_default()
                ))
            }
        }
        server
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn describe(&self) -> String {
        format!(
            "{} pid={} addr={}{}",
            self.cmdline,
            self.pid,
            self.addr,
            self.log
                .as_ref()
                .map(|l| format!(" log={}", l.display()))
                .unwrap_or_default()
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Kill by PID and reap. Only if the safety nets have not done it already.
        if unregister_child(self.slot, self.pid) {
            // SAFETY: plain syscall on our own un-reaped child.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// Makes a child die with the bench (PR_SET_PDEATHSIG, even if the bench is
/// SIGKILLed) and not inherit the bench's CPU pinning.
fn child_setup(cmd: &mut Command) {
    let ncpu = online_cpus();
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for c in 0..ncpu {
                libc::CPU_SET(c, &mut set);
            }
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            Ok(())
        });
    }
}

// ---------------------------------------------------------------------------
// redis-server child
// ---------------------------------------------------------------------------

/// A private `redis-server` on an ephemeral loopback port, without
/// persistence. Killed and reaped by PID on drop and by every safety net.
pub struct RedisServer {
    child: Child,
    slot: usize,
    pub pid: i32,
    pub port: u16,
    pub cmdline: String,
    pub log: PathBuf,
}

/// A port that was free a moment ago (bind 127.0.0.1:0, read it, close).
fn free_port() -> io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// `PING` → `+PONG` on a fresh connection.
fn redis_ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got == b"+PONG\r\n"
}

impl RedisServer {
    /// Starts `redis-server --port P --bind 127.0.0.1 --save '' --appendonly no`
    /// (binary: `$REDIS_SERVER`, else `redis-server` from PATH) on a free port
    /// and waits (up to 10 s) until it answers PING. Retries with another port
    /// if the picked one was taken in between.
    pub fn start(name: &str) -> RedisServer {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_string());
        let log = scratch_dir().join(format!("redis-bench-{name}.log"));
        let mut last_err = String::new();
        for _attempt in 0..3 {
            let port = match free_port() {
                Ok(p) => p,
                Err(e) => fatal(&format!("cannot find a free port: {e}")),
            };
            let mut cmd = Command::new(&bin);
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .current_dir(scratch_dir())
                .stdin(Stdio::null());
            match std::fs::File::create(&log).and_then(|f| Ok((f.try_clone()?, f))) {
                Ok((out, err)) => {
                    cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err));
                }
                Err(_) => {
                    cmd.stdout(Stdio::null()).stderr(Stdio::null());
                }
            }
            child_setup(&mut cmd);
            let child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => fatal(&format!("cannot start {bin}: {e}")),
            };
            let pid = child.id() as i32;
            let slot = register_child(pid);
            let mut r = RedisServer {
                child,
                slot,
                pid,
                port,
                cmdline: format!("{bin} --port {port} --bind 127.0.0.1 --save '' --appendonly no"),
                log: log.clone(),
            };
            let mut exited = None;
            let up = wait_until(Duration::from_secs(10), || {
                if let Ok(Some(st)) = r.child.try_wait() {
                    exited = Some(st);
                    return true;
                }
                redis_ping(port)
            });
            match (up, exited) {
                (true, None) => return r,
                (_, Some(st)) => {
                    // Reaped already: take it out of the registry, try again.
                    unregister_child(r.slot, r.pid);
                    drop(r);
                    last_err = format!("{bin} exited ({st}) on port {port}");
                }
                (false, None) => {
                    drop(r);
                    last_err = format!("{bin} did not answer PING on port {port} within 10 s");
                }
            }
        }
        fatal(&format!("{last_err}; log {}", log.display()))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn describe(&self) -> String {
        format!(
            "{} pid={} log={}",
            self.cmdline,
            self.pid,
            self.log.display()
        )
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if unregister_child(self.slot, self.pid) {
            // SAFETY: plain syscall on our own un-reaped child.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// /proc and system helpers
// ---------------------------------------------------------------------------

pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n < 1 {
        1
    } else {
        n as usize
    }
}

pub fn clk_tck() -> u64 {
    // SAFETY: as above.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n < 1 {
        100
    } else {
        n as u64
    }
}

pub fn page_size() -> u64 {
    // SAFETY: as above.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n < 1 {
        4096
    } else {
        n as u64
    }
}

/// Raises RLIMIT_NOFILE soft to hard; returns the hard limit.
pub fn raise_nofile() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &want);
        }
    }
    rl.rlim_max
}

/// Resident set size in bytes: smaps_rollup `Rss`, else status `VmRSS`.
pub fn rss_bytes(pid: i32) -> u64 {
    let key_val = |path: String, key: &str| -> Option<u64> {
        let s = std::fs::read_to_string(path).ok()?;
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    key_val(format!("/proc/{pid}/smaps_rollup"), "Rss:")
        .or_else(|| key_val(format!("/proc/{pid}/status"), "VmRSS:"))
        .unwrap_or(0)
}

/// utime+stime of a whole process, in seconds (from /proc/<pid>/stat).
pub fn cpu_secs(pid: i32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // fields after ")" start at field 3 (state); utime = field 14, stime = 15.
    let ut: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let st: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    (ut + st) as f64 / clk_tck() as f64
}

/// Sum of on-CPU nanoseconds over all live threads (/proc/<pid>/task/*/schedstat).
/// Finer-grained cross-check of [`cpu_secs`] (which has clock-tick resolution).
pub fn sched_ns(pid: i32) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in rd.flatten() {
            if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
                total += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
}

/// Machine-wide CPU seconds from the /proc/stat "cpu" line, all CPUs:
/// `(task time, irq time)` with task = user + nice + system + steal and
/// irq = irq + softirq. With IRQ time accounting (this kernel has it) softirq
/// work, e.g. loopback TCP receive processing done while a process sends, is
/// in the irq bucket and not in any process's utime+stime.
pub fn system_cpu_secs() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = s.lines().next().unwrap_or("");
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let g = |i: usize| f.get(i).copied().unwrap_or(0);
    let tck = clk_tck() as f64;
    (
        (g(0) + g(1) + g(2) + g(7)) as f64 / tck,
        (g(5) + g(6)) as f64 / tck,
    )
}

/// `(thread name, tid, Cpus_allowed_list)` for every thread of `pid`.
pub fn thread_affinities(pid: i32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in rd.flatten() {
            let tid = e.file_name().to_string_lossy().to_string();
            let st = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            let get = |k: &str| {
                st.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            out.push((get("Name:"), tid, get("Cpus_allowed_list:")));
        }
    }
    out.sort_by(|a, b| a.1.len().cmp(&b.1.len()).then(a.1.cmp(&b.1)));
    out
}

/// /proc/meminfo as key → bytes.
pub fn meminfo() -> HashMap<String, u64> {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let mut it = v.split_whitespace();
            let n: u64 = it.next()?.parse().ok()?;
            let mult = if it.next() == Some("kB") { 1024 } else { 1 };
            Some((k.to_string(), n * mult))
        })
        .collect()
}

/// /proc/net/sockstat "TCP: ... mem N" in bytes (N is in pages).
pub fn sockstat_tcp_mem_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    for l in s.lines() {
        if let Some(rest) = l.strip_prefix("TCP:") {
            let f: Vec<&str> = rest.split_whitespace().collect();
            for w in f.windows(2) {
                if w[0] == "mem" {
                    return w[1].parse::<u64>().unwrap_or(0) * page_size();
                }
            }
        }
    }
    0
}

/// /proc/slabinfo: cache name → bytes held in objects (num_objs × objsize).
/// Empty if not readable (non-root).
pub fn slabinfo() -> HashMap<String, u64> {
    let s = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    s.lines()
        .skip(2)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let num: u64 = f.get(2)?.parse().ok()?;
            let size: u64 = f.get(3)?.parse().ok()?;
            Some((f[0].to_string(), num * size))
        })
        .collect()
}

/// Pins the calling thread (and threads it spawns later) to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0) = calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Pins every existing thread of this process to `cpus` (threads spawned
/// later inherit the mask of the thread that spawns them).
pub fn pin_all_threads(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; tids come from /proc/self/task.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        for e in std::fs::read_dir("/proc/self/task")?.flatten() {
            if let Ok(tid) = e.file_name().to_string_lossy().parse::<libc::pid_t>() {
                if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
    }
    Ok(())
}

pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// CPU seconds (user+sys) used by this process so far.
pub fn self_cpu_secs() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

pub fn mib(b: f64) -> f64 {
    b / (1024.0 * 1024.0)
}

// ---------------------------------------------------------------------------
// Latency histogram (log-linear, ~1.6 % relative precision)
// ---------------------------------------------------------------------------

const SUB_BITS: u32 = 7;
const HALF: u64 = 1 << (SUB_BITS - 1);

#[derive(Clone)]
pub struct Hist {
    counts: Vec<u64>,
    pub n: u64,
    pub max: u64,
    pub sum: u128,
}

impl Default for Hist {
    fn default() -> Self {
        Self::new()
    }
}

impl Hist {
    pub fn new() -> Hist {
        Hist {
            counts: vec![0; 64 * HALF as usize + 2 * HALF as usize],
            n: 0,
            max: 0,
            sum: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < 2 * HALF {
            v as usize
        } else {
            let e = 63 - v.leading_zeros() as u64; // >= SUB_BITS
            let shift = e - (SUB_BITS as u64 - 1);
            (shift * HALF + (v >> shift)) as usize
        }
    }

    /// Highest value that maps to bucket `i`.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * HALF {
            i
        } else {
            let shift = i / HALF - 1;
            let m = i - shift * HALF;
            ((m + 1) << shift) - 1
        }
    }

    pub fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.n += 1;
        self.max = self.max.max(v);
        self.sum += v as u128;
    }

    pub fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.n += o.n;
        self.max = self.max.max(o.max);
        self.sum += o.sum;
    }

    pub fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut acc = 0;
        for (i, c) in self.counts.iter().enumerate() {
            acc += c;
            if acc >= rank {
                return Self::upper(i).min(self.max);
            }
        }
        self.max
    }
}

/// Formats nanoseconds as µs or ms.
pub fn fmt_ns(ns: u64) -> String {
    if ns >= 10_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else {
        format!("{:.0} µs", ns as f64 / 1e3)
    }
}

// ---------------------------------------------------------------------------
// WebSocket client (RFC 6455) + Centrifugo v2 JSON connect/subscribe
// ---------------------------------------------------------------------------

/// Source address for connection `i`: 127.0.0.2, 127.0.0.3, … (spreads the
/// ephemeral port space; all of 127.0.0.0/8 is local on Linux).
pub fn src_addr(i: usize, n_src: usize) -> Ipv4Addr {
    let k = (i % n_src.max(1)) as u32 + 2;
    Ipv4Addr::from(0x7f00_0000u32 + k)
}

/// TCP connect from `src` (port chosen at connect time with
/// IP_BIND_ADDRESS_NO_PORT) with TCP_NODELAY.
pub fn tcp_connect(
    dst: SocketAddr,
    src: Option<Ipv4Addr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let sock = tcp_socket_from(src)?;
    sock.connect_timeout(&dst.into(), timeout)?;
    sock.set_tcp_nodelay(true)?;
    Ok(sock.into())
}

/// A TCP socket bound to `src` with the port left to connect time (IP_BIND_ADDRESS_NO_PORT),
/// so many source addresses give many ephemeral ports.
pub fn tcp_socket_from(src: Option<Ipv4Addr>) -> io::Result<socket2::Socket> {
    let sock = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if let Some(src) = src {
        let one: libc::c_int = 1;
        // SAFETY: valid fd and option pointer/len.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
    }
    Ok(sock)
}

static MASK_SEED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0x9e37_79b9);

/// Appends one masked client frame (FIN set) to `out`.
pub fn encode_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | (opcode & 0x0f));
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    // xorshift: masks only need to be unpredictable-ish, not cryptographic.
    let mut x = MASK_SEED.fetch_add(0x6d2b_79f5, Ordering::Relaxed) | 1;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    let mask = x.to_be_bytes();
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

/// A parsed frame header: (fin, opcode, header_len, payload_len, mask).
pub struct FrameHdr {
    pub fin: bool,
    pub opcode: u8,
    pub hdr_len: usize,
    pub len: usize,
    pub mask: Option<[u8; 4]>,
}

/// Parses a frame header from `buf`; `Ok(None)` if more bytes are needed.
pub fn parse_frame_hdr(buf: &[u8]) -> Result<Option<FrameHdr>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    if buf[0] & 0x70 != 0 {
        return Err(format!("RSV bits set in frame byte 0x{:02x}", buf[0]));
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let l7 = (buf[1] & 0x7f) as usize;
    let (len, mut hdr) = match l7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let l = u64::from_be_bytes(b);
            if l > (1 << 31) {
                return Err(format!("absurd frame length {l}"));
            }
            (l as usize, 10)
        }
        n => (n, 2),
    };
    let mask = if masked {
        if buf.len() < hdr + 4 {
            return Ok(None);
        }
        let m = [buf[hdr], buf[hdr + 1], buf[hdr + 2], buf[hdr + 3]];
        hdr += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(FrameHdr {
        fin,
        opcode,
        hdr_len: hdr,
        len,
        mask,
    }))
}

/// What a complete message (after reassembly) turned out to be.
pub enum WsEvent<'a> {
    Text(&'a [u8]),
    Ping(&'a [u8]),
    Close,
    Other,
}

/// Incremental per-connection frame decoder (handles partial frames, several
/// frames per read, fragmentation, masked frames).
#[derive(Default)]
pub struct WsDecoder {
    pub pending: Vec<u8>,
    frag: Vec<u8>,
    frag_op: u8,
    in_frag: bool,
}

impl WsDecoder {
    /// Feeds `data`; calls `f` for each complete message. Returns Err on a
    /// protocol violation.
    pub fn feed(&mut self, data: &[u8], f: &mut dyn FnMut(WsEvent)) -> Result<(), String> {
        if self.pending.is_empty() {
            let used = self.decode(data, f)?;
            self.pending.extend_from_slice(&data[used..]);
        } else {
            let mut buf = std::mem::take(&mut self.pending);
            buf.extend_from_slice(data);
            let used = self.decode(&buf, f)?;
            buf.drain(..used);
            self.pending = buf;
        }
        Ok(())
    }

    fn decode(&mut self, buf: &[u8], f: &mut dyn FnMut(WsEvent)) -> Result<usize, String> {
        let mut pos = 0;
        while let Some(h) = parse_frame_hdr(&buf[pos..])? {
            let start = pos + h.hdr_len;
            let end = start + h.len;
            if end > buf.len() {
                break;
            }
            let unmasked;
            let payload: &[u8] = match h.mask {
                None => &buf[start..end],
                Some(m) => {
                    unmasked = buf[start..end]
                        .iter()
                        .enumerate()
                        .map(|(i, b)| b ^ m[i & 3])
                        .collect::<Vec<u8>>();
                    &unmasked
                }
            };
            pos = end;
            match h.opcode {
                0x0 => {
                    if !self.in_frag {
                        return Err("continuation frame without start".into());
                    }
                    self.frag.extend_from_slice(payload);
                    if h.fin {
                        self.in_frag = false;
                        let msg = std::mem::take(&mut self.frag);
                        if self.frag_op == 1 {
                            f(WsEvent::Text(&msg));
                        } else {
                            f(WsEvent::Other);
                        }
                    }
                }
                0x1 | 0x2 => {
                    if self.in_frag {
                        return Err("new data frame inside a fragmented message".into());
                    }
                    if h.fin {
                        if h.opcode == 1 {
                            f(WsEvent::Text(payload));
                        } else {
                            f(WsEvent::Other);
                        }
                    } else {
                        self.in_frag = true;
                        self.frag_op = h.opcode;
                        self.frag.clear();
                        self.frag.extend_from_slice(payload);
                    }
                }
                0x8 => f(WsEvent::Close),
                0x9 => f(WsEvent::Ping(payload)),
                0xA => f(WsEvent::Other),
                op => return Err(format!("unknown opcode {op}")),
            }
        }
        Ok(pos)
    }
}

/// Splits a text message into its newline-separated JSON objects.
pub fn json_lines(msg: &[u8]) -> impl Iterator<Item = &[u8]> {
    msg.split(|&b| b == b'\n').filter_map(|l| {
        let l = l.trim_ascii();
        (!l.is_empty()).then_some(l)
    })
}

/// Is this Centrifugo JSON line a server ping (`{}`)?
pub fn is_ping_line(line: &[u8]) -> bool {
    line.iter()
        .filter(|b| !b.is_ascii_whitespace())
        .eq(b"{}".iter())
}

/// Opens a WebSocket to `/connection/websocket`, sends connect + subscribe in
/// one frame and waits for both replies. Returns the stream (still blocking)
/// and any bytes read past the subscribe reply.
pub fn ws_connect_subscribe(
    dst: SocketAddr,
    src: Option<Ipv4Addr>,
    channel: &str,
    timeout: Duration,
) -> Result<(TcpStream, WsDecoder), String> {
    let mut s = tcp_connect(dst, src, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    let key = tungstenite::handshake::client::generate_key();
    let req = format!(
        "GET /connection/websocket HTTP/1.1\r\nHost: {dst}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("write handshake: {e}"))?;
    let mut buf = Vec::with_capacity(512);
    let mut tmp = [0u8; 2048];
    let hdr_end = loop {
        let n = s
            .read(&mut tmp)
            .map_err(|e| format!("read handshake: {e}"))?;
        if n == 0 {
            return Err("EOF during handshake".into());
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 16384 {
            return Err("handshake response too large".into());
        }
    };
    {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        resp.parse(&buf[..hdr_end])
            .map_err(|e| format!("bad handshake response: {e}"))?;
        if resp.code != Some(101) {
            return Err(format!(
                "handshake status {:?}: {}",
                resp.code,
                String::from_utf8_lossy(&buf[..hdr_end.min(200)])
            ));
        }
        let want = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let got = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string());
        if got.as_deref() != Some(want.as_str()) {
            return Err(format!("bad Sec-WebSocket-Accept {got:?}"));
        }
    }
    let mut dec = WsDecoder::default();
    let cmd = format!(
        "{{\"id\":1,\"connect\":{{}}}}\n{{\"id\":2,\"subscribe\":{{\"channel\":{}}}}}",
        serde_json::to_string(channel).unwrap()
    );
    let mut out = Vec::with_capacity(128);
    encode_client_frame(&mut out, 1, cmd.as_bytes());
    s.write_all(&out)
        .map_err(|e| format!("write connect: {e}"))?;
    let (mut got_connect, mut got_sub) = (false, false);
    let mut err: Option<String> = None;
    let mut pings = 0;
    let mut closed = false;
    let mut data = buf.split_off(hdr_end);
    loop {
        let mut on = |ev: WsEvent| match ev {
            WsEvent::Text(msg) => {
                for line in json_lines(msg) {
                    if is_ping_line(line) {
                        pings += 1;
                        continue;
                    }
                    let v: serde_json::Value = match serde_json::from_slice(line) {
                        Ok(v) => v,
                        Err(e) => {
                            err = Some(format!("bad JSON reply {e}"));
                            continue;
                        }
                    };
                    if let Some(e) = v.get("error") {
                        err = Some(format!("error reply: {e}"));
                    }
                    match v.get("id").and_then(|x| x.as_u64()) {
                        Some(1) if v.get("connect").is_some() => got_connect = true,
                        Some(2) if v.get("subscribe").is_some() => got_sub = true,
                        _ => {}
                    }
                }
            }
            WsEvent::Close => closed = true,
            _ => {}
        };
        dec.feed(&data, &mut on)?;
        if let Some(e) = err.take() {
            return Err(e);
        }
        if closed {
            return Err("server closed during connect/subscribe".into());
        }
        for _ in 0..pings {
            let mut out = Vec::new();
            encode_client_frame(&mut out, 1, b"{}");
            s.write_all(&out).map_err(|e| format!("write pong: {e}"))?;
        }
        pings = 0;
        if got_connect && got_sub {
            return Ok((s, dec));
        }
        let n = s
            .read(&mut tmp)
            .map_err(|e| format!("read connect/subscribe reply: {e}"))?;
        if n == 0 {
            return Err("EOF before subscribe reply".into());
        }
        data.clear();
        data.extend_from_slice(&tmp[..n]);
    }
}

/// Connects `count` subscribers using `threads` blocking workers. Connection
/// `first + i` uses source address `src_addr(first + i, n_src)` and channel
/// `channel(first + i)`.
pub fn connect_many(
    dst: SocketAddr,
    first: usize,
    count: usize,
    threads: usize,
    n_src: usize,
    channel: Arc<dyn Fn(usize) -> String + Send + Sync>,
) -> Result<Vec<(TcpStream, WsDecoder)>, String> {
    let threads = threads.clamp(1, count.max(1));
    let abort = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..threads {
        let channel = channel.clone();
        let abort = abort.clone();
        handles.push(thread::spawn(move || {
            let mut out = Vec::new();
            let mut i = t;
            while i < count {
                if abort.load(Ordering::Relaxed) {
                    return Err(String::new());
                }
                let idx = first + i;
                let mut last_err = String::new();
                let mut ok = None;
                // one retry: a transient failure (e.g. a SYN dropped on a full
                // accept queue) should not kill a 20K-connection run.
                for attempt in 0..2 {
                    match ws_connect_subscribe(
                        dst,
                        Some(src_addr(idx, n_src)),
                        &channel(idx),
                        Duration::from_secs(10),
                    ) {
                        Ok(c) => {
                            ok = Some(c);
                            break;
                        }
                        Err(e) => {
                            last_err = e;
                            if attempt == 0 {
                                thread::sleep(Duration::from_millis(50));
                            }
                        }
                    }
                }
                match ok {
                    Some(c) => out.push((idx, c)),
                    None => {
                        abort.store(true, Ordering::Relaxed);
                        return Err(format!(
                            "connection #{idx} from {}: {last_err}",
                            src_addr(idx, n_src)
                        ));
                    }
                }
                i += threads;
            }
            Ok(out)
        }));
    }
    let mut all = Vec::with_capacity(count);
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(v)) => all.extend(v),
            Ok(Err(e)) => {
                if !e.is_empty() && first_err.is_none() {
                    first_err = Some(e);
                }
            }
            Err(_) => first_err = Some("connect thread panicked".into()),
        }
    }
    if let Some(e) = first_err {
        return Err(format!("{e} ({} of {count} connected)", all.len()));
    }
    all.sort_by_key(|x| x.0);
    Ok(all.into_iter().map(|x| x.1).collect())
}

// ---------------------------------------------------------------------------
// epoll reader for many nonblocking WebSocket connections
// ---------------------------------------------------------------------------

/// Receives every non-ping JSON line. `conn` is the reader-local index.
pub trait LineHandler: Send + 'static {
    fn on_line(&mut self, conn: usize, line: &[u8], now_ns: u64);
    /// Called after each epoll_wait batch has been processed.
    fn flush(&mut self) {}
}

struct RConn {
    stream: TcpStream,
    dec: WsDecoder,
    open: bool,
}

#[derive(Default, Debug, Clone)]
pub struct ReaderStats {
    pub conns: usize,
    pub closed: usize,
    pub pings: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// Shared view of the reader's live counters.
#[derive(Default)]
pub struct ReaderLive {
    pub closed: std::sync::atomic::AtomicUsize,
    pub conns: std::sync::atomic::AtomicUsize,
    pub pings: std::sync::atomic::AtomicU64,
}

pub struct Reader<H: LineHandler> {
    pub add: mpsc::Sender<Vec<(TcpStream, WsDecoder)>>,
    pub live: Arc<ReaderLive>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<(ReaderStats, H)>>,
}

impl<H: LineHandler> Reader<H> {
    pub fn spawn(name: &str, mut handler: H) -> Reader<H> {
        let (tx, rx) = mpsc::channel::<Vec<(TcpStream, WsDecoder)>>();
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(ReaderLive::default());
        let (stop2, live2) = (stop.clone(), live.clone());
        let handle = thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let stats = reader_loop(rx, &stop2, &live2, &mut handler);
                (stats, handler)
            })
            .expect("spawn reader");
        Reader {
            add: tx,
            live,
            stop,
            handle: Some(handle),
        }
    }

    pub fn stop(mut self) -> (ReaderStats, H) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().unwrap().join().expect("reader panicked")
    }
}

fn reader_loop<H: LineHandler>(
    rx: mpsc::Receiver<Vec<(TcpStream, WsDecoder)>>,
    stop: &AtomicBool,
    live: &ReaderLive,
    handler: &mut H,
) -> ReaderStats {
    // SAFETY: plain syscall.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0, "epoll_create1 failed");
    let mut conns: Vec<RConn> = Vec::new();
    let mut stats = ReaderStats::default();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut buf = vec![0u8; 256 * 1024];
    let mut replies: Vec<u8> = Vec::new();
    let err = |stats: &mut ReaderStats, e: String| {
        stats.errors += 1;
        if stats.first_error.is_none() {
            stats.first_error = Some(e);
        }
    };
    loop {
        while let Ok(batch) = rx.try_recv() {
            for (stream, dec) in batch {
                stream.set_nonblocking(true).expect("set_nonblocking");
                let idx = conns.len();
                let mut ev = libc::epoll_event {
                    events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
                    u64: idx as u64,
                };
                // SAFETY: valid epoll fd, socket fd and event pointer.
                let rc = unsafe {
                    libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, stream.as_raw_fd(), &mut ev)
                };
                assert!(rc == 0, "epoll_ctl ADD failed");
                let had_pending = !dec.pending.is_empty();
                conns.push(RConn {
                    stream,
                    dec,
                    open: true,
                });
                if had_pending {
                    // Bytes read past the subscribe reply during setup.
                    let c = &mut conns[idx];
                    let pending = std::mem::take(&mut c.dec.pending);
                    let now = unix_ns();
                    let _ = c.dec.feed(&pending, &mut |ev| {
                        if let WsEvent::Text(m) = ev {
                            for l in json_lines(m) {
                                if !is_ping_line(l) {
                                    handler.on_line(idx, l, now);
                                }
                            }
                        }
                    });
                }
            }
            live.conns.store(conns.len(), Ordering::Relaxed);
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // SAFETY: events buffer is valid for its length.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 20) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            panic!("epoll_wait: {e}");
        }
        for ev in &events[..n as usize] {
            let idx = ev.u64 as usize;
            let c = &mut conns[idx];
            if !c.open {
                continue;
            }
            let mut eof = false;
            let mut perr: Option<String> = None;
            for _ in 0..4 {
                // SAFETY: buf is valid for writes of its length.
                let r = unsafe {
                    libc::read(
                        c.stream.as_raw_fd(),
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                    )
                };
                if r == 0 {
                    eof = true;
                    break;
                }
                if r < 0 {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => {}
                        io::ErrorKind::Interrupted => continue,
                        _ => {
                            perr = Some(format!("read: {e}"));
                            eof = true;
                        }
                    }
                    break;
                }
                let r = r as usize;
                let now = unix_ns();
                let mut pings = 0u32;
                let mut ctrl_pings: Vec<Vec<u8>> = Vec::new();
                let res = c.dec.feed(&buf[..r], &mut |ev| match ev {
                    WsEvent::Text(m) => {
                        for l in json_lines(m) {
                            if is_ping_line(l) {
                                pings += 1;
                            } else {
                                handler.on_line(idx, l, now);
                            }
                        }
                    }
                    WsEvent::Ping(p) => ctrl_pings.push(p.to_vec()),
                    WsEvent::Close => eof = true,
                    WsEvent::Other => {}
                });
                if let Err(e) = res {
                    perr = Some(format!("protocol: {e}"));
                    eof = true;
                }
                if pings > 0 || !ctrl_pings.is_empty() {
                    replies.clear();
                    for _ in 0..pings {
                        encode_client_frame(&mut replies, 1, b"{}");
                    }
                    for p in &ctrl_pings {
                        encode_client_frame(&mut replies, 0xA, p);
                    }
                    stats.pings += pings as u64;
                    live.pings.fetch_add(pings as u64, Ordering::Relaxed);
                    if let Err(e) = (&c.stream).write_all(&replies) {
                        perr = Some(format!("write pong: {e}"));
                    }
                }
                if eof || r < buf.len() {
                    break;
                }
            }
            if let Some(e) = perr {
                err(&mut stats, e);
            }
            if eof {
                c.open = false;
                // SAFETY: valid fds.
                unsafe {
                    libc::epoll_ctl(
                        ep,
                        libc::EPOLL_CTL_DEL,
                        c.stream.as_raw_fd(),
                        std::ptr::null_mut(),
                    )
                };
                stats.closed += 1;
                live.closed.fetch_add(1, Ordering::Relaxed);
            }
        }
        handler.flush();
    }
    // SAFETY: closing our own epoll fd.
    unsafe { libc::close(ep) };
    stats.conns = conns.len();
    stats
}

// ---------------------------------------------------------------------------
// Minimal HTTP/1.1 keep-alive client for POST /api/publish
// ---------------------------------------------------------------------------

pub struct HttpClient {
    stream: TcpStream,
    host: String,
    buf: Vec<u8>,
    req: Vec<u8>,
}

impl HttpClient {
    pub fn connect(dst: SocketAddr) -> io::Result<HttpClient> {
        let stream = tcp_connect(dst, None, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(HttpClient {
            stream,
            host: dst.to_string(),
            buf: Vec::with_capacity(4096),
            req: Vec::with_capacity(512),
        })
    }

    /// Writes one request (no response read).
    pub fn send(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<()> {
        self.req.clear();
        write!(
            self.req,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nX-API-Key: bench\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        )?;
        self.req.extend_from_slice(body);
        self.stream.write_all(&self.req)
    }

    /// Reads one response; returns (status, body).
    pub fn recv(&mut self) -> io::Result<(u16, Vec<u8>)> {
        let mut tmp = [0u8; 4096];
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(hlen)) => {
                    let code = resp.code.unwrap_or(0);
                    let mut clen: Option<usize> = None;
                    for h in resp.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            clen = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse().ok());
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            return Err(io::Error::other(
                                "chunked responses not supported by the bench client",
                            ));
                        }
                    }
                    let clen = clen.unwrap_or(0);
                    if self.buf.len() >= hlen + clen {
                        let body = self.buf[hlen..hlen + clen].to_vec();
                        self.buf.drain(..hlen + clen);
                        return Ok((code, body));
                    }
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(io::Error::other(format!("bad HTTP response: {e}"))),
            }
            let n = self.stream.read(&mut tmp)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed HTTP connection",
                ));
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    pub fn request(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        self.send(method, path, body)?;
        self.recv()
    }
}

/// Waits until `f` returns true or `timeout` passes. Returns whether it did.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// `name/tid:cpus` for every thread of `pid`, for the pinning report.
pub fn threads_of(pid: i32) -> String {
    thread_affinities(pid)
        .into_iter()
        .map(|(name, tid, cpus)| format!("{name}/{tid}:{cpus}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `name:cpus` for every thread of this process.
pub fn own_thread_affinities() -> String {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    thread_affinities(me)
        .into_iter()
        .map(|(name, _, cpus)| format!("{name}:{cpus}"))
        .collect::<Vec<_>>()
        .join(" ")
}
