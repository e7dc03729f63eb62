//! Generates the protobuf message types of the client protocol (`src/protocol/client.proto`) with
//! prost, compiling the schema with protox: pure Rust, no `protoc` binary needed.
//!
//! The reply-side JSON → protobuf transcoder deserializes the session's JSON straight into
//! these types, so every message but `Publication` (whose JSON form has a binary variant,
//! `b64data`, and gets a hand-written impl) derives `serde::Deserialize`, and each `bytes`
//! payload field reads the raw JSON value's text.

const PACKAGE: &str = ".centrifugal.centrifuge.protocol";

/// Messages deserialized from the JSON protocol by derive (all but `Publication`).
const DERIVED: &[&str] = &[
    "Error",
    "Command",
    "Reply",
    "Push",
    "ClientInfo",
    "Join",
    "Leave",
    "Unsubscribe",
    "Subscribe",
    "Message",
    "Connect",
    "Disconnect",
    "Refresh",
    "ConnectRequest",
    "ConnectResult",
    "RefreshRequest",
    "RefreshResult",
    "SubscribeRequest",
    "SubscribeResult",
    "KeyedItem",
    "TrackBatch",
    "SubRefreshRequest",
    "SubRefreshResult",
    "UnsubscribeRequest",
    "UnsubscribeResult",
    "PublishRequest",
    "PublishResult",
    "PresenceRequest",
    "PresenceResult",
    "PresenceStatsRequest",
    "PresenceStatsResult",
    "StreamPosition",
    "HistoryRequest",
    "HistoryResult",
    "PingRequest",
    "PingResult",
    "RPCRequest",
    "RPCResult",
    "SendRequest",
    "FilterNode",
];

/// `bytes` fields of derived messages that hold a JSON value in the JSON protocol.
const JSON_BYTES: &[&str] = &[
    "ClientInfo.conn_info",
    "ClientInfo.chan_info",
    "Subscribe.data",
    "Message.data",
    "Connect.data",
    "ConnectRequest.data",
    "ConnectResult.data",
    "SubscribeRequest.data",
    "SubscribeResult.data",
    "PublishRequest.data",
    "RPCRequest.data",
    "RPCResult.data",
    "SendRequest.data",
];

fn main() {
    println!("cargo:rerun-if-changed=src/protocol/client.proto");
    let fds = protox::compile(["src/protocol/client.proto"], ["src/protocol"])
        .expect("src/protocol/client.proto compiles");
    let mut config = prost_build::Config::new();
    for message in DERIVED {
        config.message_attribute(
            format!("{PACKAGE}.{message}"),
            "#[derive(serde::Deserialize)] #[serde(default)]",
        );
    }
    for field in JSON_BYTES {
        config.field_attribute(
            format!("{PACKAGE}.{field}"),
            "#[serde(deserialize_with = \"crate::protocol::protobuf::json_bytes\")]",
        );
    }
    config
        .compile_fds(fds)
        .expect("prost generates the protocol types");
}
