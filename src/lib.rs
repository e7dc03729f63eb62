//! shardcast: a self-hosted real-time fan-out server.
//!
//! Clients hold WebSocket connections speaking the Centrifugo client protocol v2 (JSON),
//! subscribe to channels and receive every publication on them; backends publish through an
//! HTTP API compatible with a subset of Centrifugo's.
//!
//! # Layout (where to start reading)
//! - [`node`]: boot and teardown order: listeners, broker thread, one shard per core, `READY`.
//! - [`shard`]: one glommio executor per core. [`shard::tasks`] starts its tasks (accept, broker
//!   inbox, I/O loop, one-second sweep); [`shard::Shard`] is its state. One file per noun:
//!   [`shard::io`] handles the completions of the shard's own io_uring ([`shard::ring`]: multishot
//!   receives into provided buffers, one send per dirty connection per flush) and tears
//!   connections down with their [`shard::reason::Reason`]; [`shard::connection`] is one
//!   WebSocket connection (plain state, no task), which sees its shard only through
//!   [`shard::context::ConnCtx`]; [`shard::host`] is the session's `Host`; [`shard::inbox`]
//!   applies broker messages and [`shard::recovery`] the subscription answers among them;
//!   [`shard::broker_link`] sends to the broker (with the bounded must-deliver backlog);
//!   [`shard::table`], [`shard::users`], [`shard::index`] and [`shard::timer`] are its tables;
//!   [`shard::counters`] its counters.
//! - [`http`]: the request head that decides upgrade, API ([`http::api`]) or health check.
//! - [`conn`]: one connection's plain state: [`conn::session`] (the protocol, no I/O),
//!   [`conn::outbox`] (bounded queue of shared frames) and [`conn::bucket`] (rate limit).
//! - [`ws`]: RFC 6455 framing over shared buffers; [`protocol`]: commands, replies, codes, tokens.
//! - [`bus`]: the only types that cross threads, the wake-up [`bus::doorbell`] and the node's
//!   shared state ([`bus::node_state`]); [`broker`]: the broker interface, its in-memory
//!   implementation and the Redis multiplexer ([`broker::redis`]); channel history
//!   ([`broker::history`]) and the multiplexer's per-channel offsets and gap repair
//!   ([`broker::redis::tracker`]).
//! - [`config`]: every knob with unit, default and reason; [`clock`]: Unix time;
//!   [`pattern`]: channel-name globs.
//!
//! Dependencies point one way: node → shard → (http, broker, conn) → (protocol, ws) → (bus,
//! config, clock, pattern); metrics reads bus only. One circle is left: `http` and `shard` call
//! each other (the accept loop hands sockets to `http`, which hands upgraded ones back to
//! `shard::connection::start` and reads `Shard`'s public fields).

/// The server's version, as the connect reply and `/api/info` report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub mod broker;
pub mod bus;
pub mod clock;
pub mod config;
pub mod conn;
pub mod doctor;
pub mod http;
pub mod metrics;
pub mod node;
pub mod pattern;
pub mod protocol;
pub mod shard;
pub mod ws;

/// Test support: a global allocator that counts the bytes live per thread, so tests can measure
/// what one idle connection costs on its shard's heap.
#[cfg(test)]
pub(crate) mod alloc_count {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Counting;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static BLOCKS: Cell<isize> = const { Cell::new(0) };
    }

    fn add(bytes: isize, blocks: isize) {
        let _ = LIVE.try_with(|c| c.set(c.get() + bytes));
        let _ = BLOCKS.try_with(|c| c.set(c.get() + blocks));
    }

    // SAFETY: forwards to the system allocator; only counts.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            add(layout.size() as isize, 1);
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            add(-(layout.size() as isize), -1);
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            add(new_size as isize - layout.size() as isize, 0);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    /// (bytes, blocks) live on this thread.
    pub fn live() -> (isize, isize) {
        (LIVE.with(|c| c.get()), BLOCKS.with(|c| c.get()))
    }
}
