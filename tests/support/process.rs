//! Child processes a test or a bench must not leave behind: a `shardcast` server whose
//! `READY <addr>` line is awaited (no sleeps), and a private `redis-server` on a free loopback
//! port without persistence. Each guard kills (SIGKILL) and reaps its process when it drops.
//!
//! One file for both users: the e2e tests include it from `tests/e2e/harness.rs`, which adds the
//! test constructors (`Server::start`, `Redis::start`: a config in a temp dir, panics on
//! failure), and every bench includes it with `#[path]` as `common::process`
//! (`benches/common/modules.rs`), wrapped by `benches/common/server.rs` and `redis.rs` (binary
//! lookup, log files, a `fatal` exit instead of a panic). Only mechanism lives here: spawn, wait
//! until ready, kill and reap.
//!
//! Every child's PID is also kept in a fixed registry that [`kill_registered`] empties with
//! async-signal-safe calls only, for the benches' signal handler, panic hook and deadline thread
//! (the bench profile aborts on panic, so no `Drop` runs there). Runs on the caller's thread, plus
//! one thread per piped stdout/stderr; plain std + libc, blocking.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// PID registry for the "get out now" paths
// ---------------------------------------------------------------------------

/// Registry size. A bench runs at most three children; tests run one process per test under
/// nextest. A child that finds the registry full is still killed by its guard, only not by
/// [`kill_registered`].
const REGISTRY_SLOTS: usize = 64;

/// PIDs of the running children (0 = free slot): a fixed array of atomics, so that a signal
/// handler can walk it.
static CHILD_PIDS: [AtomicI32; REGISTRY_SLOTS] = [const { AtomicI32::new(0) }; REGISTRY_SLOTS];

fn register(pid: i32) -> Option<usize> {
    CHILD_PIDS.iter().position(|slot| {
        slot.compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    })
}

/// Takes the child out of the registry. False when [`kill_registered`] has already killed and
/// reaped it: then its PID must not be touched again.
fn unregister(slot: Option<usize>, pid: i32) -> bool {
    slot.is_none_or(|s| {
        CHILD_PIDS[s]
            .compare_exchange(pid, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    })
}

/// Kills and reaps every registered child, with async-signal-safe calls only.
pub fn kill_registered() {
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

/// Kills and reaps `child` unless the registry's owner already did. `Child::kill` sends nothing
/// to a child that was reaped through `try_wait`, so a recycled PID is never hit.
fn kill_and_reap(child: &mut Child, slot: Option<usize>) {
    if unregister(slot, child.id() as i32) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Whether `child` still runs; a child found exited is reaped, so it leaves the registry.
fn still_running(child: &mut Child, slot: &mut Option<usize>) -> bool {
    match child.try_wait() {
        Ok(None) => true,
        Ok(Some(_)) => {
            unregister(slot.take(), child.id() as i32);
            false
        }
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------
// shardcast server
// ---------------------------------------------------------------------------

/// A running `shardcast`, killed and reaped on drop.
pub struct Server {
    pub child: Child,
    /// The address of its `READY <addr>` line.
    pub addr: SocketAddr,
    /// Its stderr (the first MiB) when the command piped it; empty otherwise.
    pub stderr: Arc<Mutex<String>>,
    slot: Option<usize>,
    /// Kept until the process is reaped (fields drop after `Drop::drop`): its config lives there.
    _dir: Option<tempfile::TempDir>,
}

/// Why [`Server::spawn`] returned no server. The process, if it started, is killed and reaped.
#[derive(Debug)]
pub enum StartError {
    /// The binary could not be started.
    Spawn(io::Error),
    /// No `READY` line within the time given.
    NoReady { stderr: String },
    /// Stdout closed without `READY`; the exit status if it had exited 100 ms later.
    Exited {
        status: Option<ExitStatus>,
        stderr: String,
    },
    /// A `READY` line whose rest is not a socket address.
    BadReady { line: String, stderr: String },
}

impl StartError {
    /// The server's stderr so far (empty if it was not piped).
    pub fn stderr(&self) -> &str {
        match self {
            StartError::Spawn(_) => "",
            StartError::NoReady { stderr }
            | StartError::Exited { stderr, .. }
            | StartError::BadReady { stderr, .. } => stderr,
        }
    }
}

/// The most of a piped stderr that is kept.
const STDERR_KEEP_BYTES: usize = 1 << 20;

impl Server {
    /// Spawns `cmd` with its stdout piped and waits up to `ready_within` for a `READY <addr>`
    /// line; every other stdout line goes to `other_stdout`. If `cmd` pipes stderr, it is
    /// collected into [`Server::stderr`]. `dir` lives as long as the guard.
    pub fn spawn(
        cmd: &mut Command,
        ready_within: Duration,
        other_stdout: fn(&str),
        dir: Option<tempfile::TempDir>,
    ) -> Result<Server, StartError> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .map_err(StartError::Spawn)?;
        let slot = register(child.id() as i32);
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::Builder::new()
            .name("server-stdout".into())
            .spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    match line.trim().strip_prefix("READY ") {
                        Some(rest) => {
                            if let Some(t) = tx.take() {
                                let _ = t.send(rest.trim().to_string());
                            }
                        }
                        None => other_stdout(&line),
                    }
                }
            })
            .expect("spawn stdout thread");
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(pipe) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::Builder::new()
                .name("server-stderr".into())
                .spawn(move || {
                    for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                        let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
                        if s.len() < STDERR_KEEP_BYTES {
                            s.push_str(&line);
                            s.push('\n');
                        }
                    }
                })
                .expect("spawn stderr thread");
        }
        let mut server = Server {
            child,
            addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            stderr,
            slot,
            _dir: dir,
        };
        let got = rx.recv_timeout(ready_within);
        let err = match got {
            Ok(line) => match line.parse() {
                Ok(addr) => {
                    server.addr = addr;
                    return Ok(server);
                }
                Err(_) => StartError::BadReady {
                    line,
                    stderr: server.stderr_text(),
                },
            },
            Err(mpsc::RecvTimeoutError::Timeout) => StartError::NoReady {
                stderr: server.stderr_text(),
            },
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(100));
                let status = server.child.try_wait().ok().flatten();
                StartError::Exited {
                    status,
                    stderr: server.stderr_text(),
                }
            }
        };
        drop(server);
        Err(err)
    }

    fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        still_running(&mut self.child, &mut self.slot)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child, self.slot);
    }
}

// ---------------------------------------------------------------------------
// redis-server
// ---------------------------------------------------------------------------

/// How to run a [`Redis`].
pub struct RedisOptions {
    /// The binary (`redis-server` from PATH, or a path).
    pub bin: String,
    /// More server arguments after `--port P --bind 127.0.0.1 --save '' --appendonly no`.
    pub extra: Vec<String>,
    /// Where its stdout and stderr go (None: discarded).
    pub log: Option<PathBuf>,
    /// Its working directory (None: the caller's).
    pub dir: Option<PathBuf>,
    /// Applied to the command before each spawn (e.g. a parent-death signal).
    pub prepare: fn(&mut Command),
    /// How long one start may take until it answers PING.
    pub ready_within: Duration,
    /// Free ports tried before giving up (one may be taken between picking and binding it).
    pub attempts: u32,
}

impl Default for RedisOptions {
    fn default() -> RedisOptions {
        RedisOptions {
            bin: "redis-server".into(),
            extra: Vec::new(),
            log: None,
            dir: None,
            prepare: |_| {},
            ready_within: Duration::from_secs(5),
            attempts: 5,
        }
    }
}

/// A private `redis-server` on a loopback port, without persistence; killed and reaped on drop
/// and by [`kill_registered`].
pub struct Redis {
    child: Option<Child>,
    slot: Option<usize>,
    pub port: u16,
    opts: RedisOptions,
}

/// A port that was free a moment ago (bind 127.0.0.1:0, read it, close).
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Whether a Redis answers `PING` on `port`: `+PONG`, or `-NOAUTH` when it wants a password.
fn answers_ping(port: u16) -> bool {
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
    while !got.ends_with(b"\r\n") && got.len() < 512 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got == b"+PONG\r\n" || got.starts_with(b"-NOAUTH")
}

impl Redis {
    /// Starts redis-server on a free port and waits until it answers PING; tries
    /// `opts.attempts` ports. The error names the last failure.
    pub fn launch(opts: RedisOptions) -> Result<Redis, String> {
        let mut r = Redis {
            child: None,
            slot: None,
            port: 0,
            opts,
        };
        let mut last_err = String::from("no attempt made");
        for _ in 0..r.opts.attempts.max(1) {
            r.port = free_port().map_err(|e| format!("cannot find a free port: {e}"))?;
            match r.respawn() {
                Ok(()) => return Ok(r),
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }

    /// (Re)starts it on its port, after killing a running one; waits until it answers PING.
    pub fn respawn(&mut self) -> Result<(), String> {
        self.kill();
        let o = &self.opts;
        let mut cmd = Command::new(&o.bin);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&o.extra)
            .stdin(Stdio::null());
        if let Some(d) = &o.dir {
            cmd.current_dir(d);
        }
        let files = o.log.as_ref().and_then(|p| {
            let f = std::fs::File::create(p).ok()?;
            Some((f.try_clone().ok()?, f))
        });
        match files {
            Some((out, err)) => cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err)),
            None => cmd.stdout(Stdio::null()).stderr(Stdio::null()),
        };
        (o.prepare)(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", o.bin))?;
        self.slot = register(child.id() as i32);
        self.child = Some(child);
        let deadline = Instant::now() + o.ready_within;
        loop {
            if !self.alive() {
                self.kill();
                return Err(format!("{} exited on port {}", self.opts.bin, self.port));
            }
            if answers_ping(self.port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "{} did not answer PING on port {} within {} s",
                    self.opts.bin,
                    self.port,
                    self.opts.ready_within.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the server (SIGKILL: no persistence, everything in it is lost) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c, self.slot.take());
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its extra arguments (`RedisOptions::extra`).
    pub fn extra_args(&self) -> &[String] {
        &self.opts.extra
    }

    /// Whether it is still running (false once killed).
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => still_running(c, &mut self.slot),
            None => false,
        }
    }

    /// Its PID (0 once killed).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// The command line it runs with, for reports.
    pub fn cmdline(&self) -> String {
        let mut s = format!(
            "{} --port {} --bind 127.0.0.1 --save '' --appendonly no",
            self.opts.bin, self.port
        );
        for a in &self.opts.extra {
            s.push(' ');
            s.push_str(a);
        }
        s
    }

    pub fn log(&self) -> Option<&PathBuf> {
        self.opts.log.as_ref()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
