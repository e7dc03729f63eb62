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
    /// The front frame is partly written: its rest must go out before anything else.
    front_started: bool,
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

    /// Drops everything queued and frees the queue's memory (the connection is gone).
    pub fn clear(&mut self) {
        self.frames = VecDeque::new();
        self.bytes = 0;
        self.front_started = false;
    }

    /// Drops every frame not yet started (before a close frame replaces them), keeping the rest
    /// of a partly written one so the peer still sees whole frames.
    pub fn drop_unstarted(&mut self) {
        let keep = if self.front_started {
            self.frames.pop_front()
        } else {
            None
        };
        self.clear();
        if let Some(rest) = keep {
            self.bytes = rest.len();
            self.frames.push_back(rest);
            self.front_started = true;
        }
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
                self.front_started = false;
            } else {
                front.advance(n);
                self.front_started = true;
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

    #[test]
    fn dropping_keeps_a_partly_written_frame() {
        let mut o = Outbox::default();
        o.push(Bytes::from_static(b"abcd"), 100);
        o.push(Bytes::from_static(b"efgh"), 100);
        o.drop_unstarted();
        assert!(o.is_empty(), "nothing started: everything dropped");
        o.push(Bytes::from_static(b"abcd"), 100);
        o.push(Bytes::from_static(b"efgh"), 100);
        o.consume(1);
        o.drop_unstarted();
        assert_eq!(o.single().unwrap().as_ref(), b"bcd");
        assert_eq!(o.len_bytes(), 3);
    }
}
