//! What a subscription may carry besides its channel: its own info (`chan_info`, from a
//! subscription token's `info` claim or the subscribe proxy's `info`) and whether it asked for
//! join/leave pushes. Both are rare, so the shard keeps them in one side table
//! ([`SubExtras`]) holding only subscriptions that have one: an ordinary subscription, and
//! so an idle connection, costs nothing here.
//!
//! Shard thread only (inside the shard's `RefCell`); plain state, no I/O.

use super::session::ChanId;
use super::ConnKey;
use serde_json::value::RawValue;
use std::collections::HashMap;

/// The extras of one subscription. Empty (the default) for almost every subscription.
#[derive(Debug, Default, Clone)]
pub struct SubExtra {
    /// The subscription's info, shown as `chan_info` in presence entries and join/leave
    /// messages of its channel.
    pub chan_info: Option<Box<RawValue>>,
    /// The subscriber asked for join/leave pushes (`join_leave: true` in its subscribe
    /// request) in a `join_leave` namespace that does not force them on everyone.
    pub push_join_leave: bool,
}

impl SubExtra {
    pub fn is_empty(&self) -> bool {
        self.chan_info.is_none() && !self.push_join_leave
    }
}

/// Per connection: its subscriptions that have extras.
#[derive(Debug, Default)]
pub struct SubExtras {
    by_conn: HashMap<ConnKey, smallvec::SmallVec<[(ChanId, SubExtra); 1]>>,
}

impl SubExtras {
    /// Sets the extras of `key`'s subscription to `chan` (an empty one forgets them). Called
    /// for every new subscription, so that nothing of an earlier subscription to a channel
    /// with the same id is left.
    pub fn set(&mut self, key: ConnKey, chan: ChanId, extra: SubExtra) {
        if extra.is_empty() {
            self.remove(key, chan);
            return;
        }
        let list = self.by_conn.entry(key).or_default();
        match list.iter_mut().find(|(c, _)| *c == chan) {
            Some(slot) => slot.1 = extra,
            None => list.push((chan, extra)),
        }
    }

    fn get(&self, key: ConnKey, chan: ChanId) -> Option<&SubExtra> {
        let list = self.by_conn.get(&key)?;
        list.iter().find(|(c, _)| *c == chan).map(|(_, e)| e)
    }

    /// The info of `key`'s subscription to `chan`, if it has one.
    pub fn chan_info(&self, key: ConnKey, chan: ChanId) -> Option<Box<RawValue>> {
        self.get(key, chan)?.chan_info.clone()
    }

    /// Whether `key`'s subscription to `chan` asked for join/leave pushes.
    pub fn pushes_join_leave(&self, key: ConnKey, chan: ChanId) -> bool {
        self.get(key, chan).is_some_and(|e| e.push_join_leave)
    }

    /// Forgets `key`'s subscription to `chan` (it ended).
    pub fn remove(&mut self, key: ConnKey, chan: ChanId) {
        if self.by_conn.is_empty() {
            return;
        }
        let Some(list) = self.by_conn.get_mut(&key) else {
            return;
        };
        list.retain(|(c, _)| *c != chan);
        if list.is_empty() {
            self.by_conn.remove(&key);
        }
    }

    /// Forgets a connection (it closed).
    pub fn remove_conn(&mut self, key: ConnKey) {
        if !self.by_conn.is_empty() {
            self.by_conn.remove(&key);
        }
    }

    /// No subscription of the shard has extras.
    pub fn is_empty(&self) -> bool {
        self.by_conn.is_empty()
    }

    /// Connections with a subscription that has extras.
    pub fn connections(&self) -> usize {
        self.by_conn.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(slot: u32) -> ConnKey {
        ConnKey {
            slot,
            generation: 1,
        }
    }

    fn info(s: &str) -> Option<Box<RawValue>> {
        Some(RawValue::from_string(s.into()).unwrap())
    }

    #[test]
    fn only_subscriptions_with_extras_take_room_and_ends_forget_them() {
        let mut t = SubExtras::default();
        t.set(k(1), 3, SubExtra::default());
        assert!(t.is_empty(), "an empty extra is not kept");
        t.set(
            k(1),
            3,
            SubExtra {
                chan_info: info("{\"a\":1}"),
                push_join_leave: false,
            },
        );
        t.set(
            k(1),
            4,
            SubExtra {
                chan_info: None,
                push_join_leave: true,
            },
        );
        assert_eq!(t.chan_info(k(1), 3).unwrap().get(), "{\"a\":1}");
        assert!(t.chan_info(k(1), 4).is_none());
        assert!(t.pushes_join_leave(k(1), 4) && !t.pushes_join_leave(k(1), 3));
        assert!(!t.pushes_join_leave(k(2), 4), "another connection");
        // A new subscription reusing the channel id starts clean.
        t.set(k(1), 3, SubExtra::default());
        assert!(t.chan_info(k(1), 3).is_none());
        t.remove(k(1), 4);
        assert!(t.is_empty());
        t.set(
            k(2),
            1,
            SubExtra {
                chan_info: info("1"),
                push_join_leave: true,
            },
        );
        assert_eq!(t.connections(), 1);
        t.remove_conn(k(2));
        assert!(t.is_empty());
    }
}
