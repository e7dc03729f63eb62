//! The shard's table of WebSocket connections: a slab of `Rc<Connection>` with generations, so
//! a stale [`ConnKey`] (held by a timer entry, a pending reply, a readiness token) misses
//! instead of reaching a newer connection in the same slot.
//!
//! Shard thread only; the table is the connections' owner (removing an entry drops the
//! shard's reference, and the socket closes with the last one).

use super::connection::Connection;
use crate::conn::ConnKey;
use std::rc::Rc;

/// Connections of the shard, with generations so stale keys miss.
#[derive(Default)]
pub struct ConnTable {
    entries: Vec<(u32, Option<Rc<Connection>>)>,
    free: Vec<u32>,
    len: usize,
}

impl ConnTable {
    /// Inserts the connection `make` builds for its new key.
    pub fn insert_with(&mut self, make: impl FnOnce(ConnKey) -> Rc<Connection>) -> Rc<Connection> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.entries.push((0, None));
                (self.entries.len() - 1) as u32
            }
        };
        let entry = &mut self.entries[slot as usize];
        let key = ConnKey {
            slot,
            generation: entry.0,
        };
        let conn = make(key);
        entry.1 = Some(conn.clone());
        self.len += 1;
        conn
    }

    pub fn get(&self, key: ConnKey) -> Option<&Rc<Connection>> {
        match self.entries.get(key.slot as usize) {
            Some((gen, Some(c))) if *gen == key.generation => Some(c),
            _ => None,
        }
    }

    /// Removes the entry of `key` (a stale key removes nothing).
    pub fn remove(&mut self, key: ConnKey) {
        if let Some(entry) = self.entries.get_mut(key.slot as usize) {
            if entry.0 == key.generation && entry.1.take().is_some() {
                entry.0 = entry.0.wrapping_add(1);
                self.free.push(key.slot);
                self.len -= 1;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every connection (a snapshot: the table may change while the caller works through it).
    pub fn all(&self) -> Vec<Rc<Connection>> {
        self.entries.iter().filter_map(|(_, c)| c.clone()).collect()
    }
}
