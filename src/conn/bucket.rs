//! A connection's command rate limit: a token bucket (`limits.command_rate_per_sec` refill,
//! `limits.command_burst` size). Plain state, no clock of its own: the caller passes the time.
//!
//! Lives in the connection's state (8 bytes); taken once per command on the shard thread.

use crate::config::Config;

/// A connection's command token bucket (`limits.command_rate_per_sec`, `command_burst`).
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f32,
    last_ms: u32,
}

impl Bucket {
    pub fn full(cfg: &Config, now_ms: u32) -> Bucket {
        Bucket {
            tokens: cfg.limits.command_burst as f32,
            last_ms: now_ms,
        }
    }

    /// Refills for the time passed, then takes one token if there is one.
    pub fn take(&mut self, cfg: &Config, now_ms: u32) -> bool {
        let elapsed = now_ms.wrapping_sub(self.last_ms) as f32;
        self.last_ms = now_ms;
        let rate = cfg.limits.command_rate_per_sec as f32 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate).min(cfg.limits.command_burst as f32);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let mut cfg = Config::default();
        cfg.limits.command_burst = 2;
        cfg.limits.command_rate_per_sec = 1000; // one token per millisecond
        let mut b = Bucket::full(&cfg, 0);
        assert!(b.take(&cfg, 0) && b.take(&cfg, 0));
        assert!(!b.take(&cfg, 0), "the burst is spent");
        assert!(b.take(&cfg, 1), "a millisecond refills one token");
        assert!(
            b.take(&cfg, 100) && b.take(&cfg, 100) && !b.take(&cfg, 100),
            "capped at the burst"
        );
    }
}
