//! End-to-end tests: the real binary on ephemeral ports, driven by a Rust WebSocket client
//! (tungstenite) and by the official `centrifuge` JS SDK (tests/interop).
//! One test binary so that it links once.

mod abuse;
mod conformance;
mod deploy;
mod drain;
mod emulation;
mod harness;
mod history;
mod http_api;
mod join_leave;
mod jwks_https;
#[path = "../support/keys.rs"]
#[allow(dead_code, reason = "shared with the library's token tests")]
mod keys;
mod pipelining;
mod protobuf;
mod protocol;
mod proxy;
mod recovery;
mod redis;
mod redis_cluster;
mod redis_sentinel;
mod redis_tls;
mod ring;
mod sdk;
mod security_api;
mod security_edge;
mod security_tokens;
mod server_api;
mod status_page;
mod tokens_asym;
mod transports;
