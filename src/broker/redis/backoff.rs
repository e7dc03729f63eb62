//! The reconnect delay: capped exponential backoff with jitter, one type for every reconnect
//! loop of the multiplexer (the link as a whole, the subscriber connection alone).
//!
//! Pure arithmetic; the caller sleeps. Delay `n` (from 0) is `min(initial × 2ⁿ, max)`, then
//! jittered into its upper half, so nodes that lost Redis together do not come back together.

use std::time::Duration;

/// Reconnect delays for one loop; [`Backoff::reset`] after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial_ms: u64,
    max_ms: u64,
    attempt: u32,
}

impl Backoff {
    /// `initial_ms` and `max_ms` as `redis_options.backoff_initial_ms` / `backoff_max_ms`.
    pub fn new(initial_ms: u32, max_ms: u32) -> Backoff {
        Backoff {
            initial_ms: initial_ms as u64,
            max_ms: max_ms as u64,
            attempt: 0,
        }
    }

    /// Failed attempts since the last success.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Starts over (the connection came up).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The delay before the next attempt, with random jitter.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(|half| fastrand::u64(0..=half))
    }

    /// The delay before the next attempt; `jitter(h)` picks a value in `0..=h`.
    pub fn next_delay_with(&mut self, jitter: impl FnOnce(u64) -> u64) -> Duration {
        let base = self
            .initial_ms
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.max_ms);
        self.attempt = self.attempt.saturating_add(1);
        // Jitter in [base/2, base].
        Duration::from_millis(base / 2 + jitter(base / 2).min(base / 2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(100, 5000);
        let top: Vec<u64> = (0..9)
            .map(|_| b.next_delay_with(|h| h).as_millis() as u64)
            .collect();
        assert_eq!(top, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        b.reset();
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.next_delay_with(|_| 0), Duration::from_millis(50));
        for _ in 0..1000 {
            let d = b.next_delay().as_millis() as u64;
            assert!((100..=5000).contains(&d), "{d}");
        }
        let d = b.next_delay().as_millis() as u64;
        assert!((2500..=5000).contains(&d), "capped and jittered: {d}");
        assert_eq!(b.attempt(), 1002);
        let mut huge = Backoff::new(u32::MAX, u32::MAX);
        for _ in 0..100 {
            assert!(huge.next_delay_with(|h| h) <= Duration::from_millis(u32::MAX as u64));
        }
    }
}
