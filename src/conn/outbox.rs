//! A connection's write queue: `Bytes` references, bounded in bytes, no buffer while empty.
//!
//! Frames are shared with every other recipient (a publication is one allocation per node);
//! the outbox only holds references, and a partly written front frame is advanced in place.

use bytes::{Buf, Bytes};
use std::collections::VecDeque;

/// Outcome of queueing a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The bound would be exceeded: the connection is too slow (overflow policy: disconnect
    /// with 3008 "slow"; the caller counts it).
    Overflow,
}

/// Bounded queue of frames to write.
#[derive(Debug, Default)]
pub struct Outbox {
    frames: VecDeque<Bytes>,
    bytes: usize,
}

impl Outbox {
    /// Queues a frame unless that would take the queued bytes past `max_bytes`.
    pub fn push(&mut self, frame: Bytes, max_bytes: usize) -> Push {
        if self.bytes + frame.len() > max_bytes {
            return Push::Overflow;
        }
        self.bytes += frame.len();
        self.frames.push_back(frame);
        Push::Queued
    }

    /// Queues a frame regardless of the bound (close frames after an overflow was handled).
    pub fn push_unbounded(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes queued.
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }

    /// Drops everything queued (before a close frame replaces it) and frees the queue's memory.
    pub fn clear(&mut self) {
        self.frames = VecDeque::new();
        self.bytes = 0;
    }

    /// The front frame, when it is the only one (written without copying).
    pub fn single(&self) -> Option<&Bytes> {
        if self.frames.len() == 1 {
            self.frames.front()
        } else {
            None
        }
    }

    /// Copies queued bytes into `cork` (up to its spare capacity) for one coalesced write.
    pub fn fill(&self, cork: &mut Vec<u8>, max: usize) {
        for f in &self.frames {
            let room = max.saturating_sub(cork.len());
            if room == 0 {
                break;
            }
            let take = room.min(f.len());
            cork.extend_from_slice(&f[..take]);
        }
    }

    /// Marks `n` bytes as written; frees the queue's memory once empty.
    pub fn consume(&mut self, mut n: usize) {
        self.bytes -= n;
        while n > 0 {
            let front = self.frames.front_mut().expect("consumed more than queued");
            if front.len() <= n {
                n -= front.len();
                self.frames.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
        if self.frames.is_empty() && self.frames.capacity() > 0 {
            self.frames = VecDeque::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_fill_and_partial_consume() {
        let mut o = Outbox::default();
        assert_eq!(o.push(Bytes::from_static(b"abc"), 6), Push::Queued);
        assert_eq!(o.push(Bytes::from_static(b"def"), 6), Push::Queued);
        assert_eq!(o.push(Bytes::from_static(b"g"), 6), Push::Overflow);
        let mut cork = Vec::with_capacity(8);
        o.fill(&mut cork, 4);
        assert_eq!(cork, b"abcd");
        o.consume(4);
        assert_eq!(o.len_bytes(), 2);
        assert_eq!(o.single().unwrap().as_ref(), b"ef");
        o.consume(2);
        assert!(o.is_empty());
        assert_eq!(o.frames.capacity(), 0, "no memory held while idle");
    }
}
