//! The wake-up half of a queue between threads: at most one byte per batch on a socketpair.
//!
//! The sender queues its message first, then rings; ringing writes a byte only when the flag
//! was clear, so a burst of messages costs one syscall. The receiver clears the flag *before*
//! it drains (a message sent after that rings again), drains, and waits on its end of the pair.
//! An idle pair makes no syscalls. Used by every queue of [`super`]; runs on whichever thread
//! sends, never blocks (the sending end is non-blocking: a byte already outstanding is enough).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The sending end: the shared flag and the writing socket.
#[derive(Debug, Clone)]
pub struct Doorbell {
    notified: Arc<AtomicBool>,
    wake: Arc<UnixStream>,
}

impl Doorbell {
    /// A new doorbell, with the receiver's flag and its end of the socketpair.
    pub fn pair() -> std::io::Result<(Doorbell, Arc<AtomicBool>, UnixStream)> {
        let (a, b) = UnixStream::pair()?;
        a.set_nonblocking(true)?;
        let notified = Arc::new(AtomicBool::new(false));
        Ok((
            Doorbell {
                notified: notified.clone(),
                wake: Arc::new(a),
            },
            notified,
            b,
        ))
    }

    /// Wakes the receiver unless a wake-up is already pending (once per batch).
    pub fn ring(&self) {
        if !self.notified.swap(true, Ordering::AcqRel) {
            self.ring_now();
        }
    }

    /// Writes a wake-up byte whatever the flag says (before waiting on a full queue, so the
    /// receiver is surely awake to drain it).
    pub fn ring_now(&self) {
        // One byte; the receiver reads and discards. EAGAIN cannot happen: at most one byte is
        // outstanding per wake cycle, except in the backpressure path, where it does not matter.
        let _ = (&*self.wake).write(&[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn rings_once_per_batch() {
        let (bell, notified, mut rx) = Doorbell::pair().unwrap();
        bell.ring();
        bell.ring();
        assert!(notified.load(Ordering::Acquire));
        rx.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(rx.read(&mut buf).unwrap(), 1, "one byte for the batch");
        notified.store(false, Ordering::SeqCst);
        bell.ring();
        assert_eq!(rx.read(&mut buf).unwrap(), 1, "a new batch rings again");
    }
}
