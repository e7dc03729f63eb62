//! The shard's channel index: channel name → local subscribers, with names interned.
//!
//! Acts only on transitions: the first local subscriber of a channel registers the shard's
//! interest with the broker, the last one withdraws it. Removal is O(1) (a set per channel),
//! so a mass disconnect from a huge channel stays linear.
//!
//! Per-format interest: the index knows which connections speak protobuf (one bit per table
//! slot, allocated only once the shard has a protobuf connection) and counts each channel's
//! protobuf subscribers; when a channel's count crosses 0 ↔ 1 the channel is noted, and the
//! shard tells the broker at the end of the batch ([`ChannelIndex::take_format_changes`]), so
//! the broker encodes a publication to protobuf only while some shard has a protobuf
//! subscriber of its channel.

use crate::conn::session::ChanId;
use crate::conn::ConnKey;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

/// One channel with local subscribers.
#[derive(Debug)]
pub struct Channel {
    pub name: Rc<str>,
    /// Connections that get the channel's publications.
    pub subscribers: HashSet<ConnKey>,
    /// The broker confirmed its subscription (Redis SUBSCRIBE done).
    pub ready: bool,
    /// Subscribers whose reply waits for the broker; they are not in `subscribers` yet, so
    /// they get no publication before their reply.
    pub waiting: Vec<Waiting>,
    /// History channels: the stream position of the last publication this shard received
    /// (exact, since publications and position answers arrive in one ordered queue).
    pub position: Option<crate::bus::StreamPos>,
    /// Subscribers (waiting ones included) that speak protobuf.
    pub protobuf: u32,
}

/// A subscriber waiting for the broker.
#[derive(Debug, Clone)]
pub struct Waiting {
    pub key: ConnKey,
    /// The subscribe command's id (0 for a server-side subscription: no reply).
    pub id: u32,
    pub want: Want,
    /// A server API subscription: announced by a subscribe push with this data once in.
    pub push: Option<std::rc::Rc<crate::conn::server_side::ServerPush>>,
}

/// What a waiting subscriber waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The broker's subscription (`ready`).
    Confirm,
    /// The broker's position answer under `token` (history channels).
    Position {
        token: u64,
        recovering: bool,
        reject_unrecovered: bool,
        /// A server-side subscription: its result goes into the connect reply.
        connect: bool,
    },
}

/// Result of adding a subscriber.
#[derive(Debug, PartialEq, Eq)]
pub enum Added {
    /// The channel had no local subscriber before: register interest.
    First(ChanId),
    More(ChanId),
}

/// Channels with local subscribers, interned to small ids.
#[derive(Debug, Default)]
pub struct ChannelIndex {
    by_name: HashMap<Rc<str>, ChanId>,
    slots: Vec<Option<Channel>>,
    free: Vec<ChanId>,
    subscriptions: u64,
    /// One bit per connection slot: the connection there speaks protobuf. Empty (no heap)
    /// until the shard's first protobuf connection.
    protobuf_slots: Vec<u64>,
    /// Channels whose protobuf subscriber count went 0 → 1 or back to 0 since the last
    /// [`ChannelIndex::take_format_changes`].
    format_changes: Vec<Rc<str>>,
}

impl ChannelIndex {
    /// Adds `key` to `name` as a subscriber; a new channel starts `ready` or waiting for the
    /// broker.
    pub fn add(&mut self, name: &str, key: ConnKey, ready: bool) -> Added {
        self.add_member(name, key, ready, None)
    }

    /// Adds `key` to `name` as a waiting subscriber.
    pub fn add_waiting(&mut self, name: &str, waiting: Waiting, ready: bool) -> Added {
        self.add_member(name, waiting.key, ready, Some(waiting))
    }

    /// Marks the connection in `slot` as speaking protobuf (`on`) or not: set when a
    /// connection starts (before it can subscribe), cleared when it ends.
    pub fn set_protobuf(&mut self, slot: u32, on: bool) {
        let (word, bit) = ((slot / 64) as usize, slot % 64);
        if on {
            if self.protobuf_slots.len() <= word {
                self.protobuf_slots.resize(word + 1, 0);
            }
            self.protobuf_slots[word] |= 1 << bit;
        } else if let Some(w) = self.protobuf_slots.get_mut(word) {
            *w &= !(1 << bit);
        }
    }

    /// Whether connection `key` speaks protobuf.
    pub fn is_protobuf(&self, key: ConnKey) -> bool {
        let (word, bit) = ((key.slot / 64) as usize, key.slot % 64);
        self.protobuf_slots
            .get(word)
            .is_some_and(|w| w & (1 << bit) != 0)
    }

    /// The channels whose protobuf interest changed, each with whether it has protobuf
    /// subscribers now (once per channel; a channel that is gone has none).
    pub fn take_format_changes(&mut self) -> Vec<(Rc<str>, bool)> {
        if self.format_changes.is_empty() {
            return Vec::new();
        }
        let mut changed = std::mem::take(&mut self.format_changes);
        changed.sort_unstable();
        changed.dedup();
        changed
            .into_iter()
            .map(|name| {
                let now = self.lookup(&name).is_some_and(|ch| ch.protobuf > 0);
                (name, now)
            })
            .collect()
    }

    /// Counts a protobuf subscriber of `ch` in (`+1`) or out (`-1`), noting 0 ↔ 1 crossings.
    fn count_protobuf(changes: &mut Vec<Rc<str>>, ch: &mut Channel, joined: bool) {
        if joined {
            ch.protobuf += 1;
            if ch.protobuf == 1 {
                changes.push(ch.name.clone());
            }
        } else {
            ch.protobuf = ch.protobuf.saturating_sub(1);
            if ch.protobuf == 0 {
                changes.push(ch.name.clone());
            }
        }
    }

    fn add_member(
        &mut self,
        name: &str,
        key: ConnKey,
        ready: bool,
        waiting: Option<Waiting>,
    ) -> Added {
        self.subscriptions += 1;
        let protobuf = self.is_protobuf(key);
        let place = |ch: &mut Channel| match waiting {
            Some(w) => ch.waiting.push(w),
            None => {
                ch.subscribers.insert(key);
            }
        };
        if let Some(&id) = self.by_name.get(name) {
            let ch = self.slots[id as usize]
                .as_mut()
                .expect("interned id is live");
            place(ch);
            if protobuf {
                Self::count_protobuf(&mut self.format_changes, ch, true);
            }
            return Added::More(id);
        }
        let name: Rc<str> = name.into();
        let mut channel = Channel {
            name: name.clone(),
            subscribers: HashSet::new(),
            ready,
            waiting: Vec::new(),
            position: None,
            protobuf: 0,
        };
        place(&mut channel);
        if protobuf {
            Self::count_protobuf(&mut self.format_changes, &mut channel, true);
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(channel);
                id
            }
            None => {
                self.slots.push(Some(channel));
                (self.slots.len() - 1) as ChanId
            }
        };
        self.by_name.insert(name, id);
        Added::First(id)
    }

    /// Removes `key` (subscribed or waiting) from channel `id`; returns the channel name
    /// when it was the last one.
    pub fn remove(&mut self, id: ChanId, key: ConnKey) -> Option<Rc<str>> {
        let protobuf = self.is_protobuf(key);
        let ch = self.slots.get_mut(id as usize)?.as_mut()?;
        if !ch.subscribers.remove(&key) {
            let pos = ch.waiting.iter().position(|w| w.key == key)?;
            ch.waiting.swap_remove(pos);
        }
        if protobuf {
            Self::count_protobuf(&mut self.format_changes, ch, false);
        }
        self.subscriptions -= 1;
        self.release_if_empty(id)
    }

    fn release_if_empty(&mut self, id: ChanId) -> Option<Rc<str>> {
        let slot = self.slots.get_mut(id as usize)?;
        let ch = slot.as_ref()?;
        if !ch.subscribers.is_empty() || !ch.waiting.is_empty() {
            return None;
        }
        let ch = slot.take().expect("checked");
        self.by_name.remove(&ch.name);
        self.free.push(id);
        Some(ch.name)
    }

    /// Moves the waiting subscribers `pick` selects into the subscriber set; returns them.
    pub fn promote(&mut self, id: ChanId, pick: impl Fn(&Waiting) -> bool) -> Vec<Waiting> {
        let Some(ch) = self.get_mut(id) else {
            return Vec::new();
        };
        let (picked, rest): (Vec<Waiting>, Vec<Waiting>) = std::mem::take(&mut ch.waiting)
            .into_iter()
            .partition(|w| pick(w));
        ch.waiting = rest;
        for w in &picked {
            ch.subscribers.insert(w.key);
        }
        picked
    }

    /// Drops the waiting subscribers `pick` selects (their subscribe failed); returns them and,
    /// when the channel is left empty, its name (the broker interest to withdraw).
    pub fn fail(
        &mut self,
        id: ChanId,
        pick: impl Fn(&Waiting) -> bool,
    ) -> (Vec<Waiting>, Option<Rc<str>>) {
        let protobuf: Vec<bool> = match self.get(id) {
            Some(ch) => ch.waiting.iter().map(|w| self.is_protobuf(w.key)).collect(),
            None => return (Vec::new(), None),
        };
        let ch = self.slots[id as usize].as_mut().expect("checked");
        let mut picked = Vec::new();
        let mut rest = Vec::new();
        for (w, pb) in std::mem::take(&mut ch.waiting).into_iter().zip(protobuf) {
            if pick(&w) {
                if pb {
                    Self::count_protobuf(&mut self.format_changes, ch, false);
                }
                picked.push(w);
            } else {
                rest.push(w);
            }
        }
        ch.waiting = rest;
        self.subscriptions -= picked.len() as u64;
        let emptied = if picked.is_empty() {
            None
        } else {
            self.release_if_empty(id)
        };
        (picked, emptied)
    }

    /// Removes every subscriber of channel `id` (waiting ones too); returns them and the name.
    pub fn clear(&mut self, id: ChanId) -> Option<(Vec<ConnKey>, Rc<str>)> {
        let ch = self.slots.get_mut(id as usize)?.take()?;
        if ch.protobuf > 0 {
            self.format_changes.push(ch.name.clone());
        }
        let mut keys: Vec<ConnKey> = ch.subscribers.into_iter().collect();
        keys.extend(ch.waiting.iter().map(|w| w.key));
        self.subscriptions -= keys.len() as u64;
        self.by_name.remove(&ch.name);
        self.free.push(id);
        Some((keys, ch.name))
    }

    pub fn get_mut(&mut self, id: ChanId) -> Option<&mut Channel> {
        self.slots.get_mut(id as usize)?.as_mut()
    }

    /// The id of a channel with local subscribers.
    pub fn id_of(&self, name: &str) -> Option<ChanId> {
        self.by_name.get(name).copied()
    }

    pub fn get(&self, id: ChanId) -> Option<&Channel> {
        self.slots.get(id as usize)?.as_ref()
    }

    pub fn lookup(&self, name: &str) -> Option<&Channel> {
        self.get(*self.by_name.get(name)?)
    }

    pub fn channels(&self) -> impl Iterator<Item = &Channel> {
        self.slots.iter().flatten()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Subscriptions (connection × channel) held.
    pub fn subscriptions(&self) -> u64 {
        self.subscriptions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(slot: u32) -> ConnKey {
        ConnKey {
            slot,
            generation: 0,
        }
    }

    #[test]
    fn transitions_and_reuse() {
        let mut ix = ChannelIndex::default();
        let a = match ix.add("a", k(1), true) {
            Added::First(id) => id,
            other => panic!("{other:?}"),
        };
        assert_eq!(ix.add("a", k(2), true), Added::More(a));
        assert_eq!(ix.remove(a, k(1)), None);
        assert_eq!(ix.remove(a, k(1)), None, "double remove is harmless");
        assert_eq!(ix.remove(a, k(2)).as_deref(), Some("a"));
        assert!(ix.is_empty());
        assert_eq!(ix.subscriptions(), 0);
        assert_eq!(ix.add("b", k(3), true), Added::First(a), "slot reused");
        assert_eq!(&*ix.lookup("b").unwrap().name, "b");
    }

    fn waiting(slot: u32, token: u64) -> Waiting {
        Waiting {
            key: k(slot),
            id: slot,
            want: Want::Position {
                token,
                recovering: true,
                reject_unrecovered: false,
                connect: false,
            },
            push: None,
        }
    }

    #[test]
    fn waiting_subscribers_get_nothing_until_promoted() {
        let mut ix = ChannelIndex::default();
        let Added::First(c) = ix.add_waiting("h", waiting(1, 10), true) else {
            panic!()
        };
        assert_eq!(ix.add_waiting("h", waiting(2, 11), true), Added::More(c));
        assert!(ix.get(c).unwrap().subscribers.is_empty());
        assert_eq!(ix.subscriptions(), 2);
        let got = ix.promote(c, |w| matches!(w.want, Want::Position { token: 11, .. }));
        assert_eq!(got.len(), 1);
        assert!(ix.get(c).unwrap().subscribers.contains(&k(2)));
        // The other one fails: the channel stays (k(2) is in it).
        let (failed, emptied) = ix.fail(c, |_| true);
        assert_eq!((failed.len(), emptied), (1, None));
        assert_eq!(ix.subscriptions(), 1);
        // A waiting one leaving by disconnect.
        ix.add_waiting("h", waiting(3, 12), true);
        assert_eq!(ix.remove(c, k(3)), None);
        assert_eq!(ix.remove(c, k(2)).as_deref(), Some("h"));
        assert_eq!(ix.subscriptions(), 0);
        // Failing the last waiter releases the channel.
        let Added::First(d) = ix.add_waiting("x", waiting(4, 13), false) else {
            panic!()
        };
        assert_eq!(ix.fail(d, |_| true).1.as_deref(), Some("x"));
        assert!(ix.is_empty());
    }

    #[test]
    fn protobuf_subscribers_are_counted_and_their_crossings_noted() {
        let mut ix = ChannelIndex::default();
        assert!(!ix.is_protobuf(k(130)));
        ix.set_protobuf(130, true);
        ix.set_protobuf(2, true);
        assert!(ix.is_protobuf(k(130)) && ix.is_protobuf(k(2)) && !ix.is_protobuf(k(3)));
        // A JSON subscriber: no protobuf interest.
        let Added::First(a) = ix.add("a", k(3), true) else {
            panic!()
        };
        assert!(ix.take_format_changes().is_empty());
        ix.add("a", k(130), true);
        ix.add_waiting("a", waiting(2, 1), true);
        assert_eq!(ix.get(a).unwrap().protobuf, 2);
        assert_eq!(ix.take_format_changes(), vec![(Rc::from("a"), true)]);
        ix.remove(a, k(130));
        assert!(ix.take_format_changes().is_empty(), "one is left");
        let (failed, _) = ix.fail(a, |_| true);
        assert_eq!(failed.len(), 1);
        assert_eq!(ix.take_format_changes(), vec![(Rc::from("a"), false)]);
        // In and out within one batch: announced once, as it is now.
        ix.add("a", k(2), true);
        ix.remove(a, k(2));
        assert_eq!(ix.take_format_changes(), vec![(Rc::from("a"), false)]);
        // A cleared channel had protobuf subscribers: it has none now.
        ix.add("a", k(2), true);
        let _ = ix.take_format_changes();
        ix.clear(a);
        assert_eq!(ix.take_format_changes(), vec![(Rc::from("a"), false)]);
        ix.set_protobuf(130, false);
        assert!(!ix.is_protobuf(k(130)));
    }
}
