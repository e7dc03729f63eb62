//! Channel history: what both brokers agree on.
//!
//! A history channel's publications carry offsets 1, 2, 3, ... in an epoch, a random string
//! that changes whenever the channel's position is lost (a standalone node restarted, Redis
//! lost its keys, the position's meta TTL lapsed). Offsets are assigned where publications
//! are serialised (the memory broker's thread, the Redis publish script), so the live path and
//! the history never disagree. This module holds the standalone broker's bounded stream, the
//! recovery decision and history paging; the Redis broker does the same reads in Lua. Plain
//! data and rules, used on the broker thread; nothing here does I/O or reads the clock itself
//! (callers pass `now`).

use crate::bus::{HistoryQuery, StreamPos};
use bytes::Bytes;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A new random epoch (16 hex digits).
pub fn new_epoch() -> String {
    new_epoch_in(&mut [0; 16]).to_string()
}

/// A new random epoch (16 lowercase hex digits) written into `buf`, for the publish path.
pub fn new_epoch_in(buf: &mut [u8; 16]) -> &str {
    let n = fastrand::u64(..);
    for (i, b) in buf.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    std::str::from_utf8(buf).expect("hex digits")
}

/// The recovery decision: everything after `since` up to `top`, when `entries` (ascending
/// `(offset, publication)` pairs read from the stream) hold all of it in the same epoch.
/// `None` means it cannot be recovered; a partial replay is never offered as complete.
pub fn recover(
    since: &StreamPos,
    epoch: &str,
    top: u64,
    entries: &[(u64, Bytes)],
) -> Option<Vec<Bytes>> {
    if *since.epoch != *epoch || since.offset > top {
        return None;
    }
    if since.offset == top {
        return Some(Vec::new());
    }
    let start = entries.iter().position(|(o, _)| *o == since.offset + 1)?;
    let wanted = &entries[start..];
    // Contiguous up to the top: offsets since+1, since+2, ..., top.
    let complete = wanted.len() as u64 == top - since.offset
        && wanted
            .iter()
            .enumerate()
            .all(|(i, (o, _))| *o == since.offset + 1 + i as u64);
    complete.then(|| wanted.iter().map(|(_, p)| p.clone()).collect())
}

/// A page of history from ascending entries, as [`HistoryQuery`] describes. Fails when `since`
/// names another epoch.
pub fn page(
    entries: impl DoubleEndedIterator<Item = (u64, Bytes)>,
    epoch: &str,
    query: &HistoryQuery,
) -> Result<Vec<Bytes>, crate::bus::BrokerError> {
    if let Some(since) = &query.since {
        if *since.epoch != *epoch {
            return Err(crate::bus::BrokerError::Unrecoverable);
        }
    }
    if query.limit == 0 {
        return Ok(Vec::new());
    }
    let limit = if query.limit < 0 {
        usize::MAX
    } else {
        query.limit as usize
    };
    let since = query.since.as_ref().map(|s| s.offset);
    let out = if query.reverse {
        entries
            .rev()
            .filter(|(o, _)| since.is_none_or(|s| *o < s))
            .take(limit)
            .map(|(_, p)| p)
            .collect()
    } else {
        entries
            .filter(|(o, _)| since.is_none_or(|s| *o > s))
            .take(limit)
            .map(|(_, p)| p)
            .collect()
    };
    Ok(out)
}

/// The standalone broker's history of one channel: a bounded ring of publications, the
/// channel's epoch and top offset. Publications vanish together `ttl` after the last one (as
/// a Redis stream key expires); the position itself lives `meta_ttl`.
#[derive(Debug)]
pub struct Stream {
    pub epoch: std::sync::Arc<str>,
    pub top: u64,
    entries: VecDeque<(u64, Bytes)>,
    /// Bytes of the publications held.
    bytes: usize,
    last_publish: Instant,
}

impl Stream {
    pub fn new(now: Instant) -> Stream {
        Stream {
            epoch: new_epoch().into(),
            top: 0,
            entries: VecDeque::new(),
            bytes: 0,
            last_publish: now,
        }
    }

    /// The next offset (for encoding the publication before [`Stream::push`]).
    pub fn next_offset(&self) -> u64 {
        self.top + 1
    }

    /// Appends the publication with offset [`Stream::next_offset`], keeping at most `size`.
    pub fn push(&mut self, publication: Bytes, size: usize, now: Instant) -> u64 {
        self.top += 1;
        self.bytes += publication.len();
        self.entries.push_back((self.top, publication));
        while self.entries.len() > size {
            if let Some((_, p)) = self.entries.pop_front() {
                self.bytes -= p.len();
            }
        }
        self.last_publish = now;
        self.top
    }

    /// Applies the TTLs: false when the whole stream (its position too) has expired.
    pub fn expire(&mut self, ttl: Duration, meta_ttl: Duration, now: Instant) -> bool {
        let idle = now.saturating_duration_since(self.last_publish);
        if idle >= ttl {
            self.clear();
        }
        idle < meta_ttl
    }

    pub fn clear(&mut self) {
        self.entries = VecDeque::new();
        self.bytes = 0;
    }

    /// Bytes of the publications held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// When the last publication came.
    pub fn last_publish(&self) -> Instant {
        self.last_publish
    }

    pub fn entries(&self) -> impl DoubleEndedIterator<Item = (u64, Bytes)> + '_ {
        self.entries.iter().map(|(o, p)| (*o, p.clone()))
    }

    /// The recovery decision for `since` against this stream.
    pub fn recover(&self, since: &StreamPos) -> Option<Vec<Bytes>> {
        if *since.epoch != *self.epoch || since.offset > self.top {
            return None;
        }
        let first = self.top - self.entries.len() as u64 + 1;
        if since.offset + 1 < first {
            return None;
        }
        let skip = (since.offset + 1 - first) as usize;
        Some(
            self.entries
                .iter()
                .skip(skip)
                .map(|(_, p)| p.clone())
                .collect(),
        )
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn pos(offset: u64, epoch: &str) -> StreamPos {
        StreamPos {
            offset,
            epoch: Arc::from(epoch),
        }
    }

    fn entries(range: std::ops::RangeInclusive<u64>) -> Vec<(u64, Bytes)> {
        range.map(|o| (o, Bytes::from(o.to_string()))).collect()
    }

    fn texts(v: &[Bytes]) -> Vec<String> {
        v.iter()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn epochs_are_16_hex_digits() {
        let e = new_epoch();
        assert_eq!(e.len(), 16);
        assert!(e
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(new_epoch(), new_epoch());
        fastrand::seed(7);
        let a = format!("{:016x}", fastrand::u64(..));
        fastrand::seed(7);
        assert_eq!(
            new_epoch_in(&mut [0; 16]),
            a,
            "the digits of one random u64"
        );
    }

    #[test]
    fn recovery_is_all_or_nothing() {
        let e = entries(3..=7);
        assert_eq!(
            texts(&recover(&pos(4, "e"), "e", 7, &e).unwrap()),
            ["5", "6", "7"]
        );
        assert_eq!(
            recover(&pos(7, "e"), "e", 7, &e).unwrap().len(),
            0,
            "up to date"
        );
        assert!(recover(&pos(4, "x"), "e", 7, &e).is_none(), "other epoch");
        assert!(
            recover(&pos(1, "e"), "e", 7, &e).is_none(),
            "trimmed: 2 is gone"
        );
        assert_eq!(
            recover(&pos(2, "e"), "e", 7, &e).unwrap().len(),
            5,
            "just in window"
        );
        assert!(
            recover(&pos(8, "e"), "e", 7, &e).is_none(),
            "ahead of the stream"
        );
        assert!(
            recover(&pos(4, "e"), "e", 8, &e).is_none(),
            "top not read: incomplete"
        );
        let holey = vec![e[0].clone(), e[1].clone(), e[3].clone(), e[4].clone()];
        assert!(recover(&pos(3, "e"), "e", 7, &holey).is_none(), "a hole");
    }

    #[test]
    fn ring_bounds_recovers_and_expires() {
        let t0 = Instant::now();
        let mut s = Stream::new(t0);
        for i in 1..=10u64 {
            assert_eq!(s.next_offset(), i);
            s.push(Bytes::from(i.to_string()), 4, t0);
        }
        assert_eq!(s.len(), 4);
        assert_eq!(s.top, 10);
        let epoch = s.epoch.clone();
        let since = |o| pos(o, &epoch);
        assert_eq!(texts(&s.recover(&since(6)).unwrap()), ["7", "8", "9", "10"]);
        assert!(s.recover(&since(5)).is_none(), "6 was trimmed");
        assert_eq!(s.recover(&since(10)).unwrap().len(), 0);
        let ttl = Duration::from_secs(5);
        let meta = Duration::from_secs(50);
        assert!(s.expire(ttl, meta, t0 + Duration::from_secs(4)));
        assert_eq!(s.len(), 4);
        assert!(s.expire(ttl, meta, t0 + Duration::from_secs(6)));
        assert!(s.is_empty(), "history gone after its TTL");
        assert_eq!(s.top, 10, "the position stays");
        assert!(s.recover(&since(9)).is_none());
        assert!(
            !s.expire(ttl, meta, t0 + Duration::from_secs(51)),
            "position gone"
        );
    }

    #[test]
    fn paging() {
        let e = entries(1..=10);
        let q = |limit, since: Option<u64>, reverse| HistoryQuery {
            limit,
            since: since.map(|o| pos(o, "e")),
            reverse,
        };
        let p = |query: HistoryQuery| texts(&page(e.iter().cloned(), "e", &query).unwrap());
        assert!(p(q(0, None, false)).is_empty(), "limit 0: position only");
        assert_eq!(p(q(3, None, false)), ["1", "2", "3"]);
        assert_eq!(p(q(3, Some(3), false)), ["4", "5", "6"]);
        assert_eq!(p(q(3, Some(9), false)), ["10"]);
        assert_eq!(p(q(-1, Some(8), false)), ["9", "10"]);
        assert_eq!(p(q(2, None, true)), ["10", "9"]);
        assert_eq!(p(q(2, Some(9), true)), ["8", "7"]);
        let bad = page(e.iter().cloned(), "other", &q(1, Some(1), false));
        assert_eq!(bad, Err(crate::bus::BrokerError::Unrecoverable));
    }
}
