//! Bidirectional emulation on the shard: the session ids of its HTTP-streaming and SSE
//! connections, and the commands that reach them through `/emulation` POSTs.
//!
//! A session id is `<shard>.<slot>.<generation>.<tag>`: the shard owning the connection, its
//! key in the shard's table (a generation is never reused while the connection lives, so a
//! stale id misses), and a 64-bit tag keyed by a secret drawn when the shard starts, so that
//! an id cannot be guessed from another one (only the client that got it in its connect reply
//! can send commands as that connection). Nothing is stored per connection for it: the id is
//! computed again to check it. Only connections marked emulated (by the transport that opened
//! them: one bit per table slot, allocated only once the shard has an emulated connection, so
//! a stream connection costs no more heap than a WebSocket one) answer to an id; a WebSocket
//! connection never does.
//!
//! Shard thread only; a request is handled in one call, with no borrow kept.

use super::counters::bump;
use super::Shard;
use crate::bus::Emulation;
use crate::conn::ConnKey;
use std::hash::{BuildHasher, Hasher};

/// The shard's emulated connections and the secret their session ids are tagged with.
pub struct EmulatedConns {
    /// Keyed hasher (SipHash with keys drawn at random when the shard starts).
    secret: std::collections::hash_map::RandomState,
    /// One bit per connection slot: the connection there was opened by an emulation
    /// transport. Empty (no heap) until the shard's first one.
    slots: Vec<u64>,
}

impl Default for EmulatedConns {
    fn default() -> Self {
        EmulatedConns {
            secret: std::collections::hash_map::RandomState::new(),
            slots: Vec::new(),
        }
    }
}

impl EmulatedConns {
    fn tag(&self, shard: usize, key: ConnKey) -> u64 {
        let mut h = self.secret.build_hasher();
        h.write_usize(shard);
        h.write_u32(key.slot);
        h.write_u32(key.generation);
        h.finish()
    }

    /// The session id of connection `key` of shard `shard`.
    pub fn session_id(&self, shard: usize, key: ConnKey) -> String {
        format!(
            "{shard}.{}.{}.{:016x}",
            key.slot,
            key.generation,
            self.tag(shard, key)
        )
    }

    /// The emulated connection a session id names on shard `shard`, if the id is one this
    /// shard gave and the connection is still marked emulated.
    pub fn lookup(&self, shard: usize, session: &str) -> Option<ConnKey> {
        let mut parts = session.split('.');
        let owner: usize = parts.next()?.parse().ok()?;
        let slot: u32 = parts.next()?.parse().ok()?;
        let generation: u32 = parts.next()?.parse().ok()?;
        let tag = u64::from_str_radix(parts.next()?, 16).ok()?;
        if parts.next().is_some() || owner != shard {
            return None;
        }
        let key = ConnKey { slot, generation };
        (self.tag(shard, key) == tag && self.contains(key)).then_some(key)
    }

    /// Marks the connection of `key` as emulated (`on`: its connect reply carries its session
    /// id) or not; set for every new connection, so a reused slot never keeps the mark.
    pub fn set(&mut self, key: ConnKey, on: bool) {
        let (word, bit) = ((key.slot / 64) as usize, key.slot % 64);
        if on {
            if self.slots.len() <= word {
                self.slots.resize(word + 1, 0);
            }
            self.slots[word] |= 1 << bit;
        } else if let Some(w) = self.slots.get_mut(word) {
            *w &= !(1 << bit);
        }
    }

    /// Whether the connection in `key`'s slot is emulated (the caller checks the generation
    /// in the table).
    pub fn contains(&self, key: ConnKey) -> bool {
        let (word, bit) = ((key.slot / 64) as usize, key.slot % 64);
        self.slots.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    /// Forgets connection `key` (it ended).
    pub fn forget(&mut self, key: ConnKey) {
        self.set(key, false);
    }
}

impl Shard {
    /// Marks connection `key` as a bidirectional emulation one (`on`) or not, as it starts
    /// (before its connect is run).
    pub fn set_emulated(&self, key: ConnKey, on: bool) {
        self.emulated.borrow_mut().set(key, on);
    }

    /// The session id and node uid for the connect reply of connection `key`, if emulated.
    pub(super) fn emulation_ids(&self, key: ConnKey) -> Option<(String, String)> {
        let emulated = self.emulated.borrow();
        if !emulated.contains(key) {
            return None;
        }
        Some((emulated.session_id(self.id, key), self.node.uid.clone()))
    }

    /// Commands POSTed for one of this shard's connections: run through its session as a
    /// WebSocket text message would be; an unknown or ended session is counted and dropped
    /// (its stream has ended or never was; the POST was answered, as in Centrifugo).
    pub(super) fn emulation(&self, req: &Emulation) {
        let key = self.emulated.borrow().lookup(self.id, &req.session);
        let Some(conn) = key.and_then(|k| self.conn(k)) else {
            bump(&self.counters.emulation_unknown_sessions);
            return;
        };
        conn.emulated(&self.ctx(), &req.data);
    }
}

/// The `/emulation` endpoint's view of the shard.
impl crate::http::emulation::EmulationContext for Shard {
    fn config(&self) -> &crate::config::Config {
        &self.cfg
    }
    fn node(&self) -> &crate::bus::NodeInfo {
        &self.node
    }
    fn hand_over(&self, req: Box<Emulation>) -> bool {
        self.send_broker(crate::bus::ToBroker::Emulation(req))
            .is_ok()
    }
    fn count(&self, accepted: bool) {
        if accepted {
            bump(&self.counters.emulation_requests);
        } else {
            bump(&self.counters.emulation_refused);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_name_only_marked_connections_of_their_shard() {
        let mut e = EmulatedConns::default();
        let key = ConnKey {
            slot: 7,
            generation: 3,
        };
        let id = e.session_id(2, key);
        assert!(id.starts_with("2.7.3."), "{id}");
        assert_eq!(e.lookup(2, &id), None, "not marked yet");
        e.set(key, true);
        assert_eq!(e.lookup(2, &id), Some(key));
        assert_eq!(e.lookup(1, &id), None, "another shard's id");
        // A guessed tag, or trailing parts miss (another generation of the slot is the
        // table's to refuse: `Shard::emulation` looks the key up there).
        assert_eq!(e.lookup(2, "2.7.3.0000000000000000"), None);
        assert_eq!(e.lookup(2, &format!("{id}.1")), None);
        assert_eq!(e.lookup(2, "garbage"), None);
        e.forget(key);
        assert_eq!(e.lookup(2, &id), None, "forgotten once it ended");
        // The slot reused by a WebSocket connection: not emulated.
        e.set(key, true);
        e.set(key, false);
        assert_eq!(e.lookup(2, &id), None);
        // Marks of other slots are their own; no heap until the first mark.
        assert!(EmulatedConns::default().slots.is_empty());
        let far = ConnKey {
            slot: 200,
            generation: 0,
        };
        e.set(far, true);
        assert!(e.contains(far) && !e.contains(key));
        // Another shard's secret gives another tag for the same key.
        let other = EmulatedConns::default();
        assert_ne!(other.session_id(2, key), id);
    }
}
