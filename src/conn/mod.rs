//! One connection: handshake, frame I/O over the shard's shared buffers, outbox, session.
//!
//! Runs on the shard that accepted it and never moves. The session ([`session`]) holds no I/O and
//! talks to its shard only through the [`session::Host`] trait, so `conn/` never imports `shard/`.

pub mod bucket;
pub mod outbox;
pub mod proxied;
pub mod server_side;
pub mod session;
pub mod sub_extras;

/// A connection's identity within its shard: slab slot plus a generation, so a stale key held
/// by a timer or a pending reply never reaches a newer connection in the same slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub slot: u32,
    pub generation: u32,
}
