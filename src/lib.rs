//! shardcast: a self-hosted real-time fan-out server.
//!
//! Clients hold WebSocket connections (or HTTP-streaming, SSE and unidirectional ones) speaking
//! the Centrifugo client protocol v2 (JSON or Protobuf), subscribe to channels and receive every
//! publication on them; backends publish through an HTTP API compatible with most of
//! Centrifugo's.
//!
//! # Layout (where to start reading)
//! - [`node`]: boot and teardown order: listeners, broker thread, one shard per core, `READY`,
//!   drain, and the join of every thread.
//! - [`shard`]: one glommio executor per core. [`shard::tasks`] starts its tasks (accept, broker
//!   inbox, I/O loop, one-second sweep); [`shard::Shard`] is its state. One file per noun:
//!   [`shard::front_door`] is an accepted socket's HTTP phase; [`shard::io`] handles the
//!   completions of the shard's own io_uring ([`shard::ring`]: multishot receives into provided
//!   buffers, one send per dirty connection per flush) and tears connections down with their
//!   [`shard::reason::Reason`]; [`shard::connection`] is one WebSocket connection (plain
//!   state, no task), which sees its shard only through [`shard::context::ConnCtx`];
//!   [`shard::host`] is the session's `Host`; [`shard::inbox`] applies broker messages and
//!   [`shard::recovery`] the subscription answers among them and [`shard::join_leave`] the
//!   join/leave messages; [`shard::requests`] waits for the
//!   broker's answers; [`shard::broker_link`] sends to the broker (with the bounded
//!   must-deliver backlog); [`shard::table`], [`shard::users`], [`shard::index`] and
//!   [`shard::timer`] are its tables; [`shard::counters`] its counters; [`shard::drain`] paces
//!   the shutdown.
//! - [`http`]: HTTP/1.1 pieces beneath the shard: request heads, responses, the WebSocket
//!   handshake ([`http::handshake`]), request bodies ([`http::body`]), the server API
//!   ([`http::api`], over [`http::api::ApiContext`], which the shard implements), the stream
//!   transports' requests and CORS ([`http::stream`]: SSE, HTTP-streaming and the uni
//!   transports, which then live on the io_uring path as connections with their own `Wire`)
//!   and the emulation POSTs ([`http::emulation`], handed to the owning shard, on this node or
//!   another, by [`shard::emulation`]).
//! - [`broker`]: the broker interface, its in-memory implementation ([`broker::memory`]) and the
//!   Redis multiplexer ([`broker::redis`]), sharing interest refcounts and gathering
//!   ([`broker::gather`]); channel history ([`broker::history`]) and the multiplexer's
//!   per-channel offsets and gap repair ([`broker::redis::tracker`]).
//! - [`conn`]: one connection's plain state: [`conn::session`] (the protocol, no I/O; what the
//!   server API does to it in [`conn::server_side`], the backend's answers in
//!   [`conn::proxied`], the rare per-subscription extras such as `chan_info` in
//!   [`conn::sub_extras`]), [`conn::outbox`] (bounded queue of shared frames) and
//!   [`conn::bucket`] (rate limit).
//! - [`protocol`]: commands, replies, the publication wire form ([`protocol::publication`]), the
//!   error and disconnect tables ([`protocol::codes`]), tokens, and the protobuf form of the
//!   protocol ([`protocol::pb`], generated from `src/protocol/client.proto` by `src/build.rs`;
//!   [`protocol::protobuf`] converts at the connection's edge); [`ws`]: RFC 6455 framing over
//!   shared buffers.
//! - [`backend`]: calls to the application's backend (proxies, JWKS) over HTTP/1.1 and HTTPS:
//!   one [`backend::HttpClient`] per shard on its executor (hyper over glommio sockets, rustls),
//!   with its keep-alive pool, timeout, in-flight bound and per-kind figures
//!   ([`backend::stats`]); it sees only config, bus and the crate root.
//! - [`bus`]: the only types that cross threads, the wake-up [`bus::doorbell`] and the node's
//!   shared state ([`bus::node_state`]); [`config`]: every knob with unit, default and reason;
//!   [`clock`]: Unix time; [`pattern`]: channel globs and origin patterns. [`metrics`] (the
//!   internal listener) reads the bus only.
//!
//! Dependencies point one way: node → shard → (http, broker, conn, backend) → (protocol, ws) →
//! (bus, config, clock, pattern), with nothing importing back up; metrics reads bus and backend.
//!
//! # Follow one publication
//! A backend's `POST /api/publish` on a standalone node, from the socket to every subscriber:
//! 1. [`shard::tasks`] accepts the TCP connection on the shard's own listener and spawns its
//!    front door, [`shard::front_door`], which reads the request head ([`http::parse_head`],
//!    bounded in bytes and by one deadline) and sees `/api/`.
//! 2. [`http::api`] checks the key and the declared length from the head, reads the body,
//!    parses it and asks the shard, through [`http::api::ApiContext`], for a broker request:
//!    [`shard::requests`] files it and [`shard::broker_link`] puts a `ToBroker::Publish`
//!    ([`bus`]) on the bounded queue to the broker thread.
//! 3. The broker, [`broker::memory`] (or, with Redis, the multiplexer of [`broker::redis`], its
//!    Lua script and the publication's return on the subscriber connection through
//!    [`broker::redis::tracker`]), gives the publication its offset ([`broker::history`]),
//!    builds its wire form once ([`protocol::publication`]) and its WebSocket frame once
//!    ([`ws`]), and sends the same bytes to every shard whose bit is set in the channel's
//!    interest mask ([`broker`]), waking each shard once per batch ([`bus::doorbell`]); its
//!    answer to the API request follows on the same queue.
//! 4. Each shard's [`shard::inbox`] finds the channel in its [`shard::index`] and pushes a
//!    reference to the frame into every subscriber's [`conn::outbox`]
//!    ([`shard::connection`]), marking the connection dirty; at the end of the batch
//!    [`shard::io`] flushes each dirty connection with one `send` for all its queued frames.
//! 5. The broker's answer comes back on the same shard queue and wakes the waiting API call,
//!    which answers `{"result":{...}}`; the front door then waits for the next request on the
//!    keep-alive connection.

/// The server's version, as the connect reply and `/api/info` report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub mod backend;
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
