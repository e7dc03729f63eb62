//! Why a WebSocket connection ended: exactly one [`Reason`] per connection, chosen when the end
//! begins (the close we queue, or the event that cut the socket), carried to
//! [`super::io`]'s teardown, logged there (debug) and counted by [`Reason::label`].
//!
//! The close codes are the protocol's ([`crate::protocol::Disconnect`]) and RFC 6455's; this
//! enum only classifies. (One table of disconnects, code, log level and label together, is to
//! come in `protocol::codes`; until then [`Reason::code`] maps onto the existing codes.)

use crate::protocol::Disconnect;

/// Why a connection ended. One byte plus the session's [`Disconnect`] (kept in the connection's
/// state while it closes, so it stays small).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The client closed the TCP connection (EOF) without a close handshake of ours pending.
    PeerClosed,
    /// The client sent a WebSocket close frame; its status code was echoed.
    PeerCloseFrame,
    /// `recv`/`send` failed (connection reset, broken pipe, ...).
    SocketError,
    /// The client broke RFC 6455 (close 1002, 1007 or 1009, counted as `protocol_violations`).
    Protocol,
    /// The client protocol ended it: bad request, invalid token, too many refused commands, ...
    /// (the code is the session's [`Disconnect`]).
    Session(Disconnect),
    /// The write queue passed `limits.max_outbox_bytes` (3008).
    Slow,
    /// No pong within `ping.pong_timeout_secs` (3012).
    NoPong,
    /// Upgraded but no `connect` within `limits.handshake_timeout_secs` (3502).
    Stale,
    /// The connection token expired and was not refreshed (3005).
    Expired,
    /// The node drains or its broker is gone (3001).
    Shutdown,
    /// Publications were lost beyond repair and `insufficient_state = "disconnect"` (3010).
    InsufficientState,
    /// A server-side subscription of the connect failed (3004).
    ServerError,
    /// `/api/disconnect` (the code is the one the API call gave).
    Command,
    /// The upgraded socket could not get a receive on the shard's ring (no close frame: never
    /// watched).
    NotWatched,
}

/// Every label, in [`Reason::slot`] order (the counters are kept in this order).
pub const LABELS: [&str; 14] = [
    "peer_closed",
    "peer_close_frame",
    "socket_error",
    "protocol",
    "session",
    "slow",
    "no_pong",
    "stale",
    "expired",
    "shutdown",
    "insufficient_state",
    "server_error",
    "command",
    "not_watched",
];

/// The counter name of each label, in the same order (`ended_<label>`).
pub const COUNTER_NAMES: [&str; 14] = [
    "ended_peer_closed",
    "ended_peer_close_frame",
    "ended_socket_error",
    "ended_protocol",
    "ended_session",
    "ended_slow",
    "ended_no_pong",
    "ended_stale",
    "ended_expired",
    "ended_shutdown",
    "ended_insufficient_state",
    "ended_server_error",
    "ended_command",
    "ended_not_watched",
];

impl Reason {
    /// Index of this reason's label in [`LABELS`] and its counter.
    pub fn slot(self) -> usize {
        match self {
            Reason::PeerClosed => 0,
            Reason::PeerCloseFrame => 1,
            Reason::SocketError => 2,
            Reason::Protocol => 3,
            Reason::Session(_) => 4,
            Reason::Slow => 5,
            Reason::NoPong => 6,
            Reason::Stale => 7,
            Reason::Expired => 8,
            Reason::Shutdown => 9,
            Reason::InsufficientState => 10,
            Reason::ServerError => 11,
            Reason::Command => 12,
            Reason::NotWatched => 13,
        }
    }

    /// The metric label and log field.
    pub fn label(self) -> &'static str {
        LABELS[self.slot()]
    }

    /// The close code this reason sends, when it is fixed (`None`: no close frame, the peer's
    /// own code, a protocol violation's 1002/1007/1009, or the API's chosen code).
    pub fn code(self) -> Option<u16> {
        self.disconnect().map(Disconnect::code).or(match self {
            Reason::Stale => Some(STALE_CODE),
            _ => None,
        })
    }

    /// The close code and text of a server-chosen end with a fixed code.
    pub fn close_frame(self) -> Option<(u16, &'static str)> {
        match self {
            Reason::Stale => Some((STALE_CODE, "stale")),
            _ => self.disconnect().map(|d| (d.code(), d.reason())),
        }
    }

    fn disconnect(self) -> Option<Disconnect> {
        Some(match self {
            Reason::Session(d) => d,
            Reason::Slow => Disconnect::Slow,
            Reason::NoPong => Disconnect::NoPong,
            Reason::Expired => Disconnect::Expired,
            Reason::Shutdown => Disconnect::Shutdown,
            Reason::InsufficientState => Disconnect::InsufficientState,
            Reason::ServerError => Disconnect::ServerError,
            _ => return None,
        })
    }
}

/// Close code of a connection that upgraded but never sent `connect` (terminal: the client
/// is not speaking the protocol).
const STALE_CODE: u16 = 3502;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_codes_line_up() {
        for (i, (label, counter)) in LABELS.iter().zip(COUNTER_NAMES).enumerate() {
            assert_eq!(counter, format!("ended_{label}"), "slot {i}");
        }
        assert_eq!(Reason::Slow.label(), "slow");
        assert_eq!(Reason::Slow.code(), Some(3008));
        assert_eq!(Reason::Stale.close_frame(), Some((3502, "stale")));
        assert_eq!(Reason::Shutdown.close_frame(), Some((3001, "shutdown")));
        let bad = Reason::Session(Disconnect::BadRequest);
        assert_eq!((bad.label(), bad.code()), ("session", Some(3501)));
        assert_eq!(Reason::PeerClosed.code(), None);
        assert_eq!(Reason::NotWatched.slot(), LABELS.len() - 1);
    }
}
