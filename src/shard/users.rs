//! The shard's signed-in users: user name (interned) → their connections on this shard, so
//! `/api/disconnect` and server unsubscribes reach them, and Redis mode can announce the
//! shard's first and last connection of a user. Anonymous connections are not tracked
//! (nothing targets them); they share one empty name.
//!
//! Shard thread only; plain data, the caller sends what the transitions require.

use crate::conn::ConnKey;
use smallvec::SmallVec;
use std::collections::HashMap;
use std::rc::Rc;

/// Connections per signed-in user.
pub struct UserTable {
    users: HashMap<Rc<str>, SmallVec<[ConnKey; 1]>>,
    /// The one shared name of every anonymous user.
    anonymous: Rc<str>,
}

impl Default for UserTable {
    fn default() -> Self {
        UserTable {
            users: HashMap::new(),
            anonymous: Rc::from(""),
        }
    }
}

impl UserTable {
    /// Interns `user` and records `key` under it. Returns the interned name and whether this is
    /// the user's first connection on the shard (anonymous: never).
    pub fn register(&mut self, user: &str, key: ConnKey) -> (Rc<str>, bool) {
        if user.is_empty() {
            return (self.anonymous.clone(), false);
        }
        let name = match self.users.get_key_value(user) {
            Some((k, _)) => k.clone(),
            None => Rc::from(user),
        };
        let set = self.users.entry(name.clone()).or_default();
        if !set.contains(&key) {
            set.push(key);
        }
        let first = set.len() == 1;
        (name, first)
    }

    /// Forgets `key` under `user`. Returns true when it was the user's last connection here.
    pub fn forget(&mut self, user: &Rc<str>, key: ConnKey) -> bool {
        let Some(set) = self.users.get_mut(user) else {
            return false;
        };
        if let Some(pos) = set.iter().position(|k| *k == key) {
            set.swap_remove(pos);
        }
        if set.is_empty() {
            self.users.remove(user);
            return true;
        }
        false
    }

    /// The connections of `user` on this shard.
    pub fn keys_of(&self, user: &str) -> SmallVec<[ConnKey; 1]> {
        self.users.get(user).cloned().unwrap_or_default()
    }

    /// Every signed-in user with a connection here.
    pub fn names(&self) -> impl Iterator<Item = &Rc<str>> {
        self.users.keys().filter(|u| !u.is_empty())
    }
}
