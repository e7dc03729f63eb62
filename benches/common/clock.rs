//! Waiting on a condition with a deadline instead of a fixed sleep: the benches poll counters
//! the reader threads update (all registered, all delivered, nodes at 0 clients).

use std::thread;
use std::time::{Duration, Instant};

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
