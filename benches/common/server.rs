//! The server a bench measures: `shardcast` (the release binary, on an ephemeral loopback port,
//! `READY <addr>` awaited), as a thin wrapper around the guard the e2e tests use too
//! (`tests/support/process.rs`, included by each bench as `common::process`). What is
//! bench-specific lives here: finding or building the release binary, log files and config files
//! under target/, children that die with the bench and do not inherit its CPU pinning, and
//! `fatal` instead of a panic. Runs on the bench's main thread.

use super::args::Args;
use super::process;
use super::safety::fatal;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Kills and reaps every server and redis-server of this bench (async-signal-safe).
pub fn kill_children() {
    process::kill_registered();
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

/// Writes a config file for the server into the scratch directory; returns its path.
pub fn write_config(file_name: &str, text: &str) -> PathBuf {
    let path = scratch_dir().join(file_name);
    if let Err(e) = std::fs::write(&path, text) {
        fatal(&format!("cannot write {}: {e}", path.display()));
    }
    path
}

/// Server arguments for the density, fanout and heartbeat benches: `--config <bench config>`
/// (unless `--no-bench-config`), then `--server-args`. The server only accepts channels of
/// configured namespaces, so the config declares `bench` (for `bench:<n>`) with default options;
/// `--history N` gives it a history of N publications with recovery (offsets on every push);
/// `more` is appended (further sections).
#[allow(
    dead_code,
    reason = "the recovery bench writes its own config (a `feed` namespace)"
)]
pub fn bench_server_args(args: &Args, name: &str, more: &str) -> Vec<String> {
    let mut v = Vec::new();
    if !args.has("no-bench-config") {
        let history = args
            .str("history")
            .and_then(|h| h.parse().ok())
            .unwrap_or(0u32);
        let mut text = format!(
            "# written by benches/common/server.rs for the {name} bench: the bench channels are bench:<n>\n\
             [namespaces.bench]\n"
        );
        if history > 0 {
            text.push_str(&format!(
                "history_size = {history}\nhistory_ttl_secs = 300\nrecover = true\n"
            ));
        }
        text.push_str(more);
        let path = write_config(&format!("shardcast-bench-{name}.toml"), &text);
        v.push("--config".to_string());
        v.push(path.display().to_string());
    }
    v.extend(args.server_args());
    v
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

/// Makes a child die with the bench (PR_SET_PDEATHSIG, even if the bench is
/// SIGKILLed) and not inherit the bench's CPU pinning.
pub fn child_setup(cmd: &mut Command) {
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            // Every CPU the set can name; the kernel keeps the ones that exist.
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for c in 0..libc::CPU_SETSIZE as usize {
                libc::CPU_SET(c, &mut set);
            }
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            Ok(())
        });
    }
}

/// A `shardcast` child, killed and reaped by PID on drop and by every safety net.
#[allow(
    dead_code,
    reason = "the proxy bench starts its server without --insecure (a connect without a token must reach the connect proxy)"
)]
pub struct Server {
    guard: process::Server,
    pub pid: i32,
    pub addr: SocketAddr,
    cmdline: String,
    log: Option<PathBuf>,
}

#[allow(
    dead_code,
    reason = "the proxy bench starts its server without --insecure (a connect without a token must reach the connect proxy)"
)]
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
        let cmdline = format!("{cmd:?}").replace('"', "");
        let other = |line: &str| eprintln!("# server stdout: {line}");
        let guard = match process::Server::spawn(&mut cmd, Duration::from_secs(20), other, None) {
            Ok(g) => g,
            Err(process::StartError::Spawn(e)) => {
                fatal(&format!("cannot start {}: {e}", bin.display()))
            }
            Err(process::StartError::NoReady { .. }) => {
                fatal("server did not print READY within 20 s")
            }
            Err(process::StartError::BadReady { line, .. }) => {
                fatal(&format!("server printed a bad READY line: READY {line}"))
            }
            Err(process::StartError::Exited { status, .. }) => fatal(&format!(
                "server closed stdout without READY (exit: {status:?}); binary {}{}",
                bin.display(),
                log.as_ref()
                    .map(|l| format!(", log {}", l.display()))
                    .unwrap_or_default()
            )),
        };
        Server {
            pid: guard.pid(),
            addr: guard.addr,
            guard,
            cmdline,
            log,
        }
    }

    pub fn alive(&mut self) -> bool {
        self.guard.alive()
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
