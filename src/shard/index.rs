//! The shard's channel index: channel name → local subscribers, with names interned.
//!
//! Acts only on transitions: the first local subscriber of a channel registers the shard's
//! interest with the broker, the last one withdraws it. Removal is O(1) (a set per channel),
//! so a mass disconnect from a huge channel stays linear.

use crate::conn::session::ChanId;
use crate::conn::ConnKey;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

/// One channel with local subscribers.
#[derive(Debug)]
pub struct Channel {
    pub name: Rc<str>,
    pub subscribers: HashSet<ConnKey>,
    /// The broker confirmed its subscription (Redis SUBSCRIBE done); until then subscribe
    /// replies wait in `waiting` (connection, command id).
    pub ready: bool,
    pub waiting: Vec<(ConnKey, u32)>,
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
}

impl ChannelIndex {
    /// Adds `key` to `name`; a new channel starts `ready` or waiting for the broker.
    pub fn add(&mut self, name: &str, key: ConnKey, ready: bool) -> Added {
        self.subscriptions += 1;
        if let Some(&id) = self.by_name.get(name) {
            let ch = self.slots[id as usize]
                .as_mut()
                .expect("interned id is live");
            ch.subscribers.insert(key);
            return Added::More(id);
        }
        let name: Rc<str> = name.into();
        let channel = Channel {
            name: name.clone(),
            subscribers: HashSet::from([key]),
            ready,
            waiting: Vec::new(),
        };
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

    /// Removes `key` from channel `id`; returns the channel name when it was the last one.
    pub fn remove(&mut self, id: ChanId, key: ConnKey) -> Option<Rc<str>> {
        let slot = self.slots.get_mut(id as usize)?;
        let ch = slot.as_mut()?;
        if !ch.subscribers.remove(&key) {
            return None;
        }
        self.subscriptions -= 1;
        if !ch.subscribers.is_empty() {
            return None;
        }
        let ch = slot.take().expect("checked");
        self.by_name.remove(&ch.name);
        self.free.push(id);
        Some(ch.name)
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
}
