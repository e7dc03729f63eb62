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

/// Why a connection ends. One table picks the close code, the reason text and whether the SDK
/// reconnects (the code range does), so every close is classified exactly once.
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
    /// The WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            Disconnect::ConnectionClosed => 3000,
            Disconnect::Shutdown => 3001,
            Disconnect::ServerError => 3004,
            Disconnect::Expired => 3005,
            Disconnect::Slow => 3008,
            Disconnect::WriteError => 3009,
            Disconnect::InsufficientState => 3010,
            Disconnect::ForceReconnect => 3011,
            Disconnect::NoPong => 3012,
            Disconnect::TooManyRequests => 3013,
            Disconnect::InvalidToken => 3500,
            Disconnect::BadRequest => 3501,
            Disconnect::ForceNoReconnect => 3503,
            Disconnect::ConnectionLimit => 3504,
            Disconnect::ChannelLimit => 3505,
            Disconnect::PermissionDenied => 3507,
        }
    }

    /// The close reason text (the protocol's words).
    pub fn reason(self) -> &'static str {
        match self {
            Disconnect::ConnectionClosed => "connection closed",
            Disconnect::Shutdown => "shutdown",
            Disconnect::ServerError => "internal server error",
            Disconnect::Expired => "connection expired",
            Disconnect::Slow => "slow",
            Disconnect::WriteError => "write error",
            Disconnect::InsufficientState => "insufficient state",
            Disconnect::ForceReconnect => "force reconnect",
            Disconnect::NoPong => "no pong",
            Disconnect::TooManyRequests => "too many requests",
            Disconnect::InvalidToken => "invalid token",
            Disconnect::BadRequest => "bad request",
            Disconnect::ForceNoReconnect => "force disconnect",
            Disconnect::ConnectionLimit => "connection limit",
            Disconnect::ChannelLimit => "channel limit",
            Disconnect::PermissionDenied => "permission denied",
        }
    }

    /// Whether the SDK reconnects after this close.
    pub fn reconnect(self) -> bool {
        self.code() < 3500
    }

    /// Maps a code sent through `/api/disconnect` back to a known reason, if it is one.
    pub fn from_code(code: u16) -> Option<Disconnect> {
        use Disconnect::*;
        [
            ConnectionClosed,
            Shutdown,
            ServerError,
            Expired,
            Slow,
            WriteError,
            InsufficientState,
            ForceReconnect,
            NoPong,
            TooManyRequests,
            InvalidToken,
            BadRequest,
            ForceNoReconnect,
            ConnectionLimit,
            ChannelLimit,
            PermissionDenied,
        ]
        .into_iter()
        .find(|d| d.code() == code)
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
}
