//! One timer wheel per shard: pings, pong deadlines, token expiry and close timeouts of every
//! connection, swept once a second by a single task (not a timer per connection).
//!
//! Each connection has at most one live entry: it remembers the tick it is armed for, and an
//! entry whose tick no longer matches is stale and skipped. Deadlines beyond the wheel's
//! horizon are parked at the horizon and re-armed when they come up.

use crate::conn::ConnKey;

/// Slots in the wheel, one per second; deadlines further out are re-armed on the way.
pub const SLOTS: u32 = 64;

/// The wheel.
#[derive(Debug)]
pub struct TimerWheel {
    slots: Vec<Vec<ConnKey>>,
    now: u32,
}

impl Default for TimerWheel {
    fn default() -> Self {
        TimerWheel {
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            now: 0,
        }
    }
}

impl TimerWheel {
    /// Current tick (seconds since the shard started).
    pub fn now(&self) -> u32 {
        self.now
    }

    /// Arms `key` for tick `due`, clamped to the next tick .. the horizon. Returns the tick the
    /// entry is actually in; the connection stores it to recognise its live entry.
    pub fn arm(&mut self, key: ConnKey, due: u32) -> u32 {
        let due = due.clamp(self.now + 1, self.now + SLOTS - 1);
        self.slots[(due % SLOTS) as usize].push(key);
        due
    }

    /// Advances one tick and returns the entries due now (the caller checks staleness).
    pub fn advance(&mut self) -> Vec<ConnKey> {
        self.now += 1;
        let slot = &mut self.slots[(self.now % SLOTS) as usize];
        let cap = slot.capacity();
        // Keep the allocation for next time around unless it grew large once.
        let fresh = if cap > 4096 {
            Vec::new()
        } else {
            Vec::with_capacity(cap)
        };
        std::mem::replace(slot, fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_at_due_tick_and_clamps() {
        let mut w = TimerWheel::default();
        let k = ConnKey {
            slot: 7,
            generation: 1,
        };
        assert_eq!(w.arm(k, 3), 3);
        assert_eq!(w.arm(k, 0), 1, "past deadlines fire next tick");
        assert_eq!(w.arm(k, 1_000), SLOTS - 1, "parked at the horizon");
        assert_eq!(w.advance(), vec![k]);
        assert!(w.advance().is_empty());
        assert_eq!(w.advance(), vec![k]);
        for _ in 3..SLOTS - 2 {
            w.advance();
        }
        assert_eq!(w.now(), SLOTS - 2);
        assert_eq!(w.advance(), vec![k]);
    }
}
