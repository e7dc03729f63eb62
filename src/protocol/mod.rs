//! The Centrifugo client protocol v2 in its JSON form: commands in, replies and pushes out.
//!
//! Pure data and codecs, no I/O and no shard state: a text message is split into commands by
//! [`command::parse_line`], a session answers them, and [`reply`] encodes the answers. Error and
//! disconnect codes live in [`codes`] with the meanings the protocol gives them. The protobuf
//! form (`centrifuge-protobuf`) is a transcoder at the edges of the JSON one ([`protobuf`],
//! message types in [`pb`]).

pub mod codes;
pub mod command;
pub mod jwks;
pub mod protobuf;
pub mod proxy;
pub mod publication;
pub mod reply;
pub mod token;

/// The protocol's protobuf messages (package `centrifugal.centrifuge.protocol`), generated at
/// build time from `src/protocol/client.proto` by prost (see `src/build.rs`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(
        env!("OUT_DIR"),
        "/centrifugal.centrifuge.protocol.rs"
    ));
}

pub use codes::{Disconnect, ErrorCode};
