//! The outbound side: calls from a shard to the application's backend (the Centrifugo-style
//! proxies and the JWKS fetch) over HTTP/1.1, with HTTPS through rustls.
//!
//! Runs on the shard's own glommio executor: each shard owns one [`HttpClient`] (`Rc`, never
//! shared between threads) with its own keep-alive pool, in-flight bound and counters
//! ([`ProxyStats`]), published once a second with the shard's snapshot. Nothing here blocks: a
//! slow or dead backend costs a bounded number of waiting tasks, never the shard's thread.
//!
//! - [`http`]: [`HttpClient`] — pool, timeout, in-flight permits, body limit.
//! - [`io`]: the adapter from glommio's (futures-lite) sockets to hyper's I/O traits.
//! - [`tls`]: the rustls client configuration, built once per node.
//! - [`stats`]: per-kind latency histograms and error counters, and [`ProxyKind`].
//!
//! Imports only [`crate::config`], [`crate::bus`] and crate-root items: the shard, the
//! metrics listener and the connection code import this module, never the other way.

pub mod http;
pub mod io;
pub mod stats;
pub mod tls;

#[cfg(test)]
mod tests;

pub use crate::config::Endpoint;
pub use http::{CallError, HttpClient, Permit, Response, IDLE_TIMEOUT};
pub use stats::{ErrorClass, ProxyKind, ProxyStats};
