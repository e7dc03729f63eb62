//! The broker: the node's one link to the world, on its own thread (`shardcast-broker`).
//!
//! Every implementation speaks the same [`crate::bus`] messages: it keeps per-channel interest
//! as a mask of shards (changed only on a shard's 0 → 1 and 1 → 0 transitions), encodes each
//! publication once into a WebSocket frame and hands that one `Bytes` to every interested shard,
//! scatters queries to the shards and merges their parts. [`memory::MemoryBroker`] does this in
//! process (standalone mode); the Redis multiplexer will do it through Redis.

pub mod memory;
pub mod redis;

use crate::bus::{BrokerInbox, ShardLink};

/// A broker implementation. `run` owns the thread until every shard has dropped its sender.
pub trait Broker: Send + 'static {
    fn run(self: Box<Self>, inbox: BrokerInbox, shards: Vec<ShardLink>);
}

/// Asks every shard for its part of gather `id`.
pub(crate) fn scatter(shards: &[ShardLink], id: u64, query: &crate::bus::Query) {
    for link in shards {
        link.send(crate::bus::ToShard::Collect {
            gather: id,
            query: query.clone(),
        });
    }
}

/// A simple `*` glob (the `pattern` of `/api/channels`): `*` matches any run of characters.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    #[test]
    fn glob() {
        use super::glob_match as g;
        assert!(g("*", "anything"));
        assert!(g("chat:*", "chat:1"));
        assert!(!g("chat:*", "news"));
        assert!(g("*:1", "chat:1"));
        assert!(g("a*b*c", "axxbyyc"));
        assert!(!g("a*b*c", "axxc"));
        assert!(g("news", "news"));
        assert!(!g("ab*ba", "aba"));
    }
}
