//! Error codes (replies) and disconnect codes (closes) of the Centrifugo protocol.
//!
//! Reply errors keep the connection; disconnects end it with a WebSocket close code. Codes
//! 3000–3499 tell the SDK to reconnect, 3500–3999 tell it to stop, as the protocol defines.

/// An error sent in a reply: `{"id":N,"error":{"code":C,"message":"..."}}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Internal,
    Unauthorized,
    UnknownChannel,
    PermissionDenied,
    MethodNotFound,
    AlreadySubscribed,
    LimitExceeded,
    BadRequest,
    NotAvailable,
    TokenExpired,
    Expired,
    TooManyRequests,
    UnrecoverablePosition,
}

impl ErrorCode {
    /// The numeric code.
    pub fn code(self) -> u32 {
        match self {
            ErrorCode::Internal => 100,
            ErrorCode::Unauthorized => 101,
            ErrorCode::UnknownChannel => 102,
            ErrorCode::PermissionDenied => 103,
            ErrorCode::MethodNotFound => 104,
            ErrorCode::AlreadySubscribed => 105,
            ErrorCode::LimitExceeded => 106,
            ErrorCode::BadRequest => 107,
            ErrorCode::NotAvailable => 108,
            ErrorCode::TokenExpired => 109,
            ErrorCode::Expired => 110,
            ErrorCode::TooManyRequests => 111,
            ErrorCode::UnrecoverablePosition => 112,
        }
    }

    /// The protocol's message text.
    pub fn message(self) -> &'static str {
        match self {
            ErrorCode::Internal => "internal server error",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::UnknownChannel => "unknown channel",
            ErrorCode::PermissionDenied => "permission denied",
            ErrorCode::MethodNotFound => "method not found",
            ErrorCode::AlreadySubscribed => "already subscribed",
            ErrorCode::LimitExceeded => "limit exceeded",
            ErrorCode::BadRequest => "bad request",
            ErrorCode::NotAvailable => "not available",
            ErrorCode::TokenExpired => "token expired",
            ErrorCode::Expired => "expired",
            ErrorCode::TooManyRequests => "too many requests",
            ErrorCode::UnrecoverablePosition => "unrecoverable position",
        }
    }
}

/// Codes of unsubscribe pushes (`{"push":{"channel":C,"unsubscribe":{"code":N,"reason":R}}}`):
/// below 2500 the SDK stays unsubscribed, from 2500 it subscribes again.
pub mod unsubscribe {
    /// 2000: the server unsubscribed the client (`/api/unsubscribe`).
    pub const SERVER: u32 = 2000;
    /// 2500: the subscription lost publications; subscribe again to recover.
    pub const INSUFFICIENT_STATE: u32 = 2500;
    /// 2501: the subscription token expired and no `sub_refresh` came in time; the SDK gets a
    /// new token and subscribes again.
    pub const EXPIRED: u32 = 2501;
    /// Reason text of [`EXPIRED`] (the protocol's words).
    pub const EXPIRED_REASON: &str = "subscription expired";
}

/// How loudly a connection's end is logged. Ends a client causes or that are routine are
/// `Debug` (one line per connection would drown a node of 500K); ends that tell an operator
/// something about the node (a slow client, a failed server-side step) are `Info` or `Warn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
}

/// Everything about one way the server ends a connection: what the client is told (the close
/// code and reason text, and so whether the SDK reconnects), and how the node accounts it (log
/// level, metric label and counter name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DisconnectInfo {
    /// The WebSocket close code: 3000–3499 advise a reconnect, 3500–3999 do not.
    pub code: u16,
    /// The close reason text (the protocol's words).
    pub reason: &'static str,
    /// Whether the SDK reconnects after it (from the code's range).
    pub reconnect: bool,
    pub level: Level,
    /// The metric label and log field.
    pub label: &'static str,
    /// The counter of connections ended this way (`ended_<label>`).
    pub counter: &'static str,
}

/// Why the server ends a connection, with a code of the client protocol. [`Disconnect::info`]
/// is the one table of them; every close is classified exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// 3000: the connection closed (peer went away, normal close).
    ConnectionClosed,
    /// 3001: the node shuts down; reconnect elsewhere.
    Shutdown,
    /// 3004: internal server error.
    ServerError,
    /// 3005: the connection token expired and was not refreshed.
    Expired,
    /// 3008: the client does not read fast enough; its outbox passed its bound.
    Slow,
    /// 3009: a write to the socket failed.
    WriteError,
    /// 3010: the client must recover its state (resubscribe with recovery).
    InsufficientState,
    /// 3011: the server asks the client to reconnect.
    ForceReconnect,
    /// 3012: no pong in time.
    NoPong,
    /// 3013: too many requests.
    TooManyRequests,
    /// 3500: the connection token is invalid.
    InvalidToken,
    /// 3501: the client sent something that is not the protocol.
    BadRequest,
    /// 3502: upgraded but never sent `connect` in time (terminal: not speaking the protocol).
    Stale,
    /// 3503: disconnected by the server API, do not reconnect.
    ForceNoReconnect,
    /// 3504: over a connection limit.
    ConnectionLimit,
    /// 3505: over the channel limit.
    ChannelLimit,
    /// 3507: permission denied.
    PermissionDenied,
}

impl Disconnect {
    /// Every disconnect, in [`Disconnect::index`] order.
    pub const ALL: [Disconnect; 17] = [
        Disconnect::ConnectionClosed,
        Disconnect::Shutdown,
        Disconnect::ServerError,
        Disconnect::Expired,
        Disconnect::Slow,
        Disconnect::WriteError,
        Disconnect::InsufficientState,
        Disconnect::ForceReconnect,
        Disconnect::NoPong,
        Disconnect::TooManyRequests,
        Disconnect::InvalidToken,
        Disconnect::BadRequest,
        Disconnect::Stale,
        Disconnect::ForceNoReconnect,
        Disconnect::ConnectionLimit,
        Disconnect::ChannelLimit,
        Disconnect::PermissionDenied,
    ];

    /// The disconnect table: code, reason text, log level, label and counter of each.
    pub const fn info(self) -> DisconnectInfo {
        use Disconnect::*;
        use Level::*;
        let (code, reason, level, label, counter) = match self {
            ConnectionClosed => (
                3000,
                "connection closed",
                Debug,
                "connection_closed",
                "ended_connection_closed",
            ),
            Shutdown => (3001, "shutdown", Debug, "shutdown", "ended_shutdown"),
            ServerError => (
                3004,
                "internal server error",
                Warn,
                "server_error",
                "ended_server_error",
            ),
            Expired => (
                3005,
                "connection expired",
                Debug,
                "expired",
                "ended_expired",
            ),
            Slow => (3008, "slow", Info, "slow", "ended_slow"),
            WriteError => (
                3009,
                "write error",
                Debug,
                "write_error",
                "ended_write_error",
            ),
            InsufficientState => (
                3010,
                "insufficient state",
                Info,
                "insufficient_state",
                "ended_insufficient_state",
            ),
            ForceReconnect => (
                3011,
                "force reconnect",
                Debug,
                "force_reconnect",
                "ended_force_reconnect",
            ),
            NoPong => (3012, "no pong", Debug, "no_pong", "ended_no_pong"),
            TooManyRequests => (
                3013,
                "too many requests",
                Info,
                "too_many_requests",
                "ended_too_many_requests",
            ),
            InvalidToken => (
                3500,
                "invalid token",
                Debug,
                "invalid_token",
                "ended_invalid_token",
            ),
            BadRequest => (
                3501,
                "bad request",
                Debug,
                "bad_request",
                "ended_bad_request",
            ),
            Stale => (3502, "stale", Debug, "stale", "ended_stale"),
            ForceNoReconnect => (
                3503,
                "force disconnect",
                Debug,
                "force_disconnect",
                "ended_force_disconnect",
            ),
            ConnectionLimit => (
                3504,
                "connection limit",
                Info,
                "connection_limit",
                "ended_connection_limit",
            ),
            ChannelLimit => (
                3505,
                "channel limit",
                Info,
                "channel_limit",
                "ended_channel_limit",
            ),
            PermissionDenied => (
                3507,
                "permission denied",
                Debug,
                "permission_denied",
                "ended_permission_denied",
            ),
        };
        DisconnectInfo {
            code,
            reason,
            reconnect: code < 3500,
            level,
            label,
            counter,
        }
    }

    /// The WebSocket close code.
    pub fn code(self) -> u16 {
        self.info().code
    }

    /// The close reason text (the protocol's words).
    pub fn reason(self) -> &'static str {
        self.info().reason
    }

    /// Whether the SDK reconnects after this close.
    pub fn reconnect(self) -> bool {
        self.info().reconnect
    }

    /// This disconnect's position in [`Disconnect::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Maps a code sent through `/api/disconnect` back to a known reason, if it is one.
    pub fn from_code(code: u16) -> Option<Disconnect> {
        Disconnect::ALL.into_iter().find(|d| d.code() == code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_ranges() {
        assert!(Disconnect::Shutdown.reconnect());
        assert!(Disconnect::Slow.reconnect());
        assert!(!Disconnect::InvalidToken.reconnect());
        assert!(!Disconnect::BadRequest.reconnect());
        assert_eq!(Disconnect::from_code(3008), Some(Disconnect::Slow));
        assert_eq!(ErrorCode::TokenExpired.code(), 109);
    }

    #[test]
    fn the_table_is_whole_and_consistent() {
        let mut codes = std::collections::HashSet::new();
        let mut labels = std::collections::HashSet::new();
        for (i, d) in Disconnect::ALL.into_iter().enumerate() {
            let info = d.info();
            assert_eq!(d.index(), i, "{d:?} out of order in ALL");
            assert!(codes.insert(info.code), "code {} twice", info.code);
            assert!(labels.insert(info.label), "label {} twice", info.label);
            assert_eq!(info.counter, format!("ended_{}", info.label));
            assert!((3000..4000).contains(&info.code));
            assert_eq!(info.reconnect, info.code < 3500);
            assert_eq!(Disconnect::from_code(info.code), Some(d));
        }
        assert_eq!(Disconnect::Stale.info().code, 3502);
    }
}
