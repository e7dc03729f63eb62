//! The Centrifugo client protocol v2 in its JSON form: commands in, replies and pushes out.
//!
//! Pure data and codecs, no I/O and no shard state: a text message is split into commands by
//! [`command::parse_line`], a session answers them, and [`reply`] encodes the answers. Error and
//! disconnect codes live in [`codes`] with the meanings the protocol gives them.

pub mod codes;
pub mod command;
pub mod jwks;
pub mod proxy;
pub mod publication;
pub mod reply;
pub mod token;

pub use codes::{Disconnect, ErrorCode};
