//! The broker: the node's one link to the world, on its own thread (`shardcast-broker`).
//!
//! Every implementation speaks the same [`crate::bus`] messages: it keeps per-channel interest
//! as a mask of shards (changed only on a shard's 0 → 1 and 1 → 0 transitions), encodes each
//! publication once into a WebSocket frame and hands that one `Bytes` to every interested shard,
//! scatters queries to the shards and merges their parts. [`memory::MemoryBroker`] does this in
//! process (standalone mode); [`redis::RedisBroker`] (the multiplexer) does it through Redis.
//!
//! What both share lives here once: the interest masks ([`Interest`]), the sends to shards
//! ([`send_to`], [`reply_to`], [`scatter`]), the framing of a publication push
//! ([`push_frame`]), the gather bookkeeping ([`gather`]) and channel history ([`history`]).
//! Nothing here blocks or does I/O beyond queueing onto the shards' bounded queues.
//!
//! Encode once per format: beside the channel interest, each broker keeps which shards have
//! protobuf subscribers of a channel ([`ProtobufInterest`]); while any of the shards a
//! publication goes to has one, the publication's protobuf twin is made here, once for the
//! node, and travels in the same buffer as its JSON frame ([`publication_frame`]).

pub mod gather;
pub mod history;
pub mod memory;
pub mod redis;

use crate::bus::{BrokerInbox, BrokerReply, ReplyTo, ShardLink, ToShard};
use crate::protocol::publication;
use crate::ws::{FrameBuf, OP_TEXT};

/// A broker implementation. `run` owns the thread until every shard has dropped its sender.
pub trait Broker: Send + 'static {
    /// What this broker needs from the shards.
    fn caps(&self) -> crate::bus::BrokerCaps;
    /// Runs the broker on the calling thread until every shard's queue is gone.
    fn run(self: Box<Self>, inbox: BrokerInbox, shards: Vec<ShardLink>);
}

/// Which shards want something (a channel, a user), as a mask per key. Reports only the
/// transitions that matter upstream: the first shard in, the last shard out.
#[derive(Debug)]
pub(crate) struct Interest<K> {
    masks: std::collections::HashMap<K, u64>,
}

impl<K> Default for Interest<K> {
    fn default() -> Self {
        Interest {
            masks: std::collections::HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq> Interest<K> {
    /// Adds `shard`; true when the key had no shard before.
    pub fn add(&mut self, key: K, shard: usize) -> bool {
        let mask = self.masks.entry(key).or_insert(0);
        let first = *mask == 0;
        *mask |= 1 << shard;
        first
    }

    /// Removes `shard`; true when that was the key's last shard.
    pub fn remove<Q>(&mut self, key: &Q, shard: usize) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let Some(mask) = self.masks.get_mut(key) else {
            return false;
        };
        *mask &= !(1 << shard);
        if *mask != 0 {
            return false;
        }
        self.masks.remove(key);
        true
    }

    /// The shards interested in `key` (0 = none).
    pub fn mask<Q>(&self, key: &Q) -> u64
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.masks.get(key).copied().unwrap_or(0)
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.masks.keys()
    }

    pub fn len(&self) -> usize {
        self.masks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.masks.is_empty()
    }
}

/// Which shards have protobuf subscribers of a channel: always a subset of the channel's
/// interest mask (a shard's `Unsubscribe` clears its bit here too).
#[derive(Debug, Default)]
pub(crate) struct ProtobufInterest {
    masks: Interest<std::sync::Arc<str>>,
}

impl ProtobufInterest {
    /// Applies a shard's [`crate::bus::ToBroker::ProtobufInterest`]; `channel_mask` is the
    /// channel's interest now (an `on` from a shard outside it is stale and ignored).
    pub fn set(&mut self, channel: std::sync::Arc<str>, shard: usize, on: bool, channel_mask: u64) {
        if on && channel_mask & (1 << shard) != 0 {
            self.masks.add(channel, shard);
        } else {
            self.masks.remove(&*channel, shard);
        }
    }

    /// The shard left the channel altogether.
    pub fn left(&mut self, channel: &str, shard: usize) {
        self.masks.remove(channel, shard);
    }

    /// The shards with protobuf subscribers of `channel`.
    pub fn mask(&self, channel: &str) -> u64 {
        self.masks.mask(channel)
    }
}

/// The frame a publication travels in to shards: its JSON frame and, when `protobuf` (some
/// receiving shard has a protobuf subscriber), the protobuf twin appended in the same buffer
/// ([`crate::bus::publication_frames`] splits them). A JSON frame the schema cannot carry (not expected) goes without a twin; the shard's
/// lazy transcoding then refuses it too and closes its protobuf subscribers as a server error.
pub(crate) fn publication_frame(
    json: bytes::Bytes,
    protobuf: bool,
    stats: &crate::bus::BusStats,
) -> bytes::Bytes {
    if !protobuf {
        return json;
    }
    match crate::protocol::protobuf::binary_twin(&json) {
        Ok(Some(twin)) => {
            stats
                .protobuf_encodes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut both = Vec::with_capacity(json.len() + twin.len());
            both.extend_from_slice(&json);
            both.extend_from_slice(&twin);
            bytes::Bytes::from(both)
        }
        Ok(None) | Err(_) => {
            tracing::warn!("publication without a protobuf form");
            json
        }
    }
}

/// Sends a message built by `make` to every shard in `mask`.
pub(crate) fn send_to(shards: &[ShardLink], mask: u64, make: impl Fn() -> crate::bus::ToShard) {
    for (i, link) in shards.iter().enumerate() {
        if mask & (1 << i) != 0 {
            link.send(make());
        }
    }
}

/// Answers a request of a shard.
pub(crate) fn reply_to(shards: &[ShardLink], to: ReplyTo, reply: BrokerReply) {
    if let Some(link) = shards.get(to.shard) {
        link.send(ToShard::Reply {
            token: to.token,
            reply,
        });
    }
}

/// The complete WebSocket frame of the push of a publication object (encoded once, shared by
/// every subscriber on the node).
pub(crate) fn push_frame(channel: &str, object: &[u8]) -> bytes::Bytes {
    let mut frame = FrameBuf::with_capacity(channel.len() + object.len() + 32);
    publication::push(frame.payload(), channel, object);
    frame.finish(OP_TEXT)
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

/// Moved beneath both the shards and the broker; re-exported so the broker's users keep working.
pub use crate::pattern::glob_match;

#[cfg(test)]
mod tests {
    #[test]
    fn interest_reports_first_and_last() {
        let mut i = super::Interest::<String>::default();
        assert!(i.add("a".into(), 0));
        assert!(!i.add("a".into(), 3));
        assert_eq!(i.mask("a"), 0b1001);
        assert!(!i.remove("a", 0));
        assert!(!i.remove("b", 0), "unknown keys are not a transition");
        assert!(i.remove("a", 3));
        assert!(i.is_empty());
    }

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
