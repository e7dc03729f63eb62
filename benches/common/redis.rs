//! The bench's private `redis-server` (fanout `--redis`, recovery): the shared guard from
//! `tests/support/process.rs` with the bench's binary choice (`$REDIS_SERVER`), log file,
//! parent-death signal and `fatal` exit.

use super::process;
use super::safety::fatal;
use super::server::{child_setup, scratch_dir};
use std::time::Duration;

/// A private `redis-server` on an ephemeral loopback port, without persistence. Killed and
/// reaped by PID on drop and by every safety net.
pub struct RedisServer {
    guard: process::Redis,
    pub pid: i32,
    pub port: u16,
}

impl RedisServer {
    /// Starts `redis-server --port P --bind 127.0.0.1 --save '' --appendonly no`
    /// (binary: `$REDIS_SERVER`, else `redis-server` from PATH) on a free port
    /// and waits (up to 10 s) until it answers PING. Retries with another port
    /// if the picked one was taken in between.
    pub fn start(name: &str) -> RedisServer {
        let log = scratch_dir().join(format!("redis-bench-{name}.log"));
        let opts = process::RedisOptions {
            bin: std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_string()),
            log: Some(log.clone()),
            dir: Some(scratch_dir()),
            prepare: child_setup,
            ready_within: Duration::from_secs(10),
            attempts: 3,
            ..Default::default()
        };
        match process::Redis::launch(opts) {
            Ok(guard) => RedisServer {
                pid: guard.pid(),
                port: guard.port,
                guard,
            },
            Err(e) => fatal(&format!("{e}; log {}", log.display())),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn alive(&mut self) -> bool {
        self.guard.alive()
    }

    pub fn describe(&self) -> String {
        format!(
            "{} pid={} log={}",
            self.guard.cmdline(),
            self.pid,
            self.guard
                .log()
                .map(|l| l.display().to_string())
                .unwrap_or_default()
        )
    }
}
