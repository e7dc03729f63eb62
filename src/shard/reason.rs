//! Why a WebSocket connection ended: exactly one [`Reason`] per connection, chosen when the end
//! begins (the close we queue, or the event that cut the socket), carried to
//! [`super::io`]'s teardown, logged there at its level and counted under its label.
//!
//! Every end the server chooses with a code of the client protocol takes its whole row (code,
//! reason text, reconnect advice, log level, label) from the protocol's one table,
//! [`Disconnect::info`]; the few ends without such a code (the peer's EOF or close frame, a
//! socket error, a WebSocket violation, `/api/disconnect`'s own code) have their rows here.

use crate::protocol::codes::Level;
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
    /// The backend's proxy answered with a disconnect (its code, 4000..=4999, and reason).
    Backend,
    /// The upgraded socket could not get a receive on the shard's ring (no close frame: never
    /// watched).
    NotWatched,
}

/// What the node records of a connection's end: its label and counter, its log level, and the
/// close frame it sends (`None`: none, the peer's own code, a violation's 1002/1007/1009, or
/// the API's chosen code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndInfo {
    pub label: &'static str,
    pub counter: &'static str,
    pub level: Level,
    pub close: Option<(u16, &'static str)>,
}

/// Ends that carry no code of the client protocol, in slot order (their counters come first);
/// every other end is a [`Disconnect`] and takes its row from the protocol's one table.
const TRANSPORT: [EndInfo; 7] = [
    transport("peer_closed", "ended_peer_closed", Level::Debug),
    transport("peer_close_frame", "ended_peer_close_frame", Level::Debug),
    transport("socket_error", "ended_socket_error", Level::Debug),
    transport("protocol", "ended_protocol", Level::Debug),
    transport("command", "ended_command", Level::Debug),
    transport("not_watched", "ended_not_watched", Level::Warn),
    transport("backend", "ended_backend", Level::Debug),
];

const fn transport(label: &'static str, counter: &'static str, level: Level) -> EndInfo {
    EndInfo {
        label,
        counter,
        level,
        close: None,
    }
}

/// How many distinct ends are counted (one counter each).
pub const SLOTS: usize = TRANSPORT.len() + Disconnect::ALL.len();

/// The counter name of each slot.
pub fn counter_names() -> impl Iterator<Item = &'static str> {
    TRANSPORT
        .iter()
        .map(|t| t.counter)
        .chain(Disconnect::ALL.iter().map(|d| d.info().counter))
}

impl Reason {
    /// This end's counter slot: the transport ends first, then [`Disconnect::ALL`]'s order.
    pub fn slot(self) -> usize {
        match self.disconnect() {
            Some(d) => TRANSPORT.len() + d.index(),
            None => match self {
                Reason::PeerClosed => 0,
                Reason::PeerCloseFrame => 1,
                Reason::SocketError => 2,
                Reason::Protocol => 3,
                Reason::Command => 4,
                Reason::Backend => 6,
                _ => 5, // NotWatched
            },
        }
    }

    /// Label, counter, log level and close frame (see [`EndInfo`]).
    pub fn info(self) -> EndInfo {
        match self.disconnect() {
            Some(d) => {
                let i = d.info();
                EndInfo {
                    label: i.label,
                    counter: i.counter,
                    level: i.level,
                    close: Some((i.code, i.reason)),
                }
            }
            None => TRANSPORT[self.slot()],
        }
    }

    /// The metric label and log field.
    pub fn label(self) -> &'static str {
        self.info().label
    }

    /// The close code this reason sends, when it is fixed.
    pub fn code(self) -> Option<u16> {
        self.info().close.map(|(code, _)| code)
    }

    /// The close code and text of a server-chosen end with a fixed code.
    pub fn close_frame(self) -> Option<(u16, &'static str)> {
        self.info().close
    }

    /// The protocol disconnect this end is, when it is one.
    fn disconnect(self) -> Option<Disconnect> {
        Some(match self {
            Reason::Session(d) => d,
            Reason::Slow => Disconnect::Slow,
            Reason::NoPong => Disconnect::NoPong,
            Reason::Stale => Disconnect::Stale,
            Reason::Expired => Disconnect::Expired,
            Reason::Shutdown => Disconnect::Shutdown,
            Reason::InsufficientState => Disconnect::InsufficientState,
            Reason::ServerError => Disconnect::ServerError,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_codes_line_up() {
        let names: Vec<_> = counter_names().collect();
        assert_eq!(names.len(), SLOTS);
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), SLOTS, "a counter name twice: {names:?}");
        for r in [
            Reason::PeerClosed,
            Reason::PeerCloseFrame,
            Reason::SocketError,
            Reason::Protocol,
            Reason::Command,
            Reason::NotWatched,
            Reason::Backend,
            Reason::Slow,
            Reason::Stale,
            Reason::Session(Disconnect::BadRequest),
        ] {
            assert_eq!(names[r.slot()], r.info().counter, "{r:?}");
            assert_eq!(r.info().counter, format!("ended_{}", r.label()));
        }
        assert_eq!(Reason::Slow.label(), "slow");
        assert_eq!(Reason::Slow.code(), Some(3008));
        assert_eq!(Reason::Stale.close_frame(), Some((3502, "stale")));
        assert_eq!(Reason::Shutdown.close_frame(), Some((3001, "shutdown")));
        let bad = Reason::Session(Disconnect::BadRequest);
        assert_eq!((bad.label(), bad.code()), ("bad_request", Some(3501)));
        // A session's disconnect and the same server-chosen end count together.
        assert_eq!(
            Reason::Session(Disconnect::Slow).slot(),
            Reason::Slow.slot()
        );
        assert_eq!(Reason::PeerClosed.code(), None);
    }
}
