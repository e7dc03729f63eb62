//! The protocol session of one connection, without I/O.
//!
//! [`Session::handle_message`] takes one text message (commands separated by `\n`), appends the
//! immediate replies to a batch, and asks its [`Host`] (the shard) for everything that touches
//! shared state: channel interest, publishing, cluster-wide queries. Replies that need the
//! broker (publish acknowledgements, presence) are sent later by the host under the command id.
//! A session never blocks and never awaits.
//!
//! Token expiry is enforced here too: a connection token's `exp` becomes the connection's
//! deadline ([`Host::set_expiry`]), a subscription token's `exp` the deadline of that one
//! subscription ([`Host::set_sub_expiry`], kept in the shard's [`SubExpiries`] only for
//! connections that have one). `refresh` and `sub_refresh` move them; the host's timer calls
//! [`Session::expire_subscriptions`] when a subscription's deadline passed.

use crate::bus::{HistoryQuery, StreamPos};
use crate::config::{Config, NamespaceOptions};
use crate::conn::sub_extras::SubExtra;
use crate::conn::ConnKey;
use crate::protocol::codes::unsubscribe;
use crate::protocol::command::{
    parse_line, ConnectSub, Line, Request, FLAG_REJECT_UNRECOVERED, KNOWN_DELTA_TYPES,
};
use crate::protocol::proxy;
use crate::protocol::reply::{self, ClientInfo};
use crate::protocol::token::{TokenError, TokenVerifier};
use crate::protocol::{Disconnect, ErrorCode};
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

pub use super::proxied::{Awaiting, Ended};

/// Server version announced in connect replies.
pub use crate::VERSION;

/// A channel interned by the shard (index into its channel table).
pub type ChanId = u32;

/// A deferred query whose answer the host sends as the reply to a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deferred {
    Presence,
    PresenceStats,
}

/// When a subscribe reply may go out.
#[derive(Debug)]
pub enum Ack {
    /// Reply now, with this result (a history channel's position, when the shard knows it).
    Now(reply::SubscribeResult),
    /// The host replies itself once the broker answered.
    Later,
}

/// What a subscriber asks of a history channel.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// The channel keeps history: the subscriber gets a position.
    pub history: bool,
    /// The namespace lets subscribers recover (`recoverable` in the reply).
    pub recoverable: bool,
    /// Recover everything after this position.
    pub since: Option<StreamPos>,
    /// Fail with 112 instead of subscribing unrecovered.
    pub reject_unrecovered: bool,
    /// A server-side subscription made by `connect` (id is the connect's): its result goes
    /// into the connect reply.
    pub connect: bool,
    /// A subscription made by the server API (`/api/subscribe`, id 0): announced with a
    /// subscribe push instead of a reply.
    pub server_push: Option<Rc<super::server_side::ServerPush>>,
}

/// What the session needs from its shard. Implemented by the shard for one connection.
pub trait Host {
    fn config(&self) -> &Config;
    fn verifier(&self) -> Option<&TokenVerifier>;
    /// Wall clock, seconds since the Unix epoch (token expiry).
    fn unix_now(&self) -> u64;
    /// A new client id, unique across nodes.
    fn new_client_id(&mut self) -> ClientId;
    /// Interns a user name and records the connection under it (for `/api/disconnect`).
    fn register_user(&mut self, user: &str) -> Rc<str>;
    /// Adds this connection to `channel`; on the shard's first subscriber, registers interest
    /// with the broker. Fails with a temporary error when the broker queue is full. Returns
    /// `Ack::Later` when the broker has not confirmed the channel yet: the host then sends the
    /// subscribe reply to command `id` itself once it has (so that nothing published after the
    /// reply can be missed).
    fn subscribe(
        &mut self,
        id: u32,
        channel: &str,
        recovery: &Recovery,
    ) -> Result<(ChanId, Ack), ErrorCode>;
    /// Removes this connection from a channel.
    fn unsubscribe(&mut self, chan: ChanId);
    /// The name of an interned channel.
    fn channel_name(&self, chan: ChanId) -> Rc<str>;
    /// Publishes; the host replies to `id` once the broker acknowledged.
    fn publish(
        &mut self,
        id: u32,
        channel: &str,
        data: &RawValue,
        info: ClientInfo,
    ) -> Result<(), ErrorCode>;
    /// Asks every shard; the host replies to `id`.
    fn gather(&mut self, id: u32, kind: Deferred, channel: &str) -> Result<(), ErrorCode>;
    /// The connect reply waits for `waiting` server-side subscriptions (subscribed with
    /// `Ack::Later`): the host completes `result` (its `subs` hold the ready ones) and sends it.
    fn connect_later(&mut self, id: u32, result: reply::ConnectResult<'_>, waiting: u32);
    /// For a bidirectional emulation connection (HTTP-streaming, SSE): its session id and the
    /// node's uid, for the connect reply. `None` for WebSocket connections.
    fn emulation(&self) -> Option<(String, String)> {
        None
    }
    /// The connection's `transport` and `protocol` as the proxies name them.
    fn transport(&self) -> (&'static str, &'static str) {
        ("websocket", "json")
    }
    /// Reads history; the host replies to `id`.
    fn history(&mut self, id: u32, channel: &str, query: HistoryQuery) -> Result<(), ErrorCode>;
    /// Connection token expiry changed (0 = never): the host arms its timer.
    fn set_expiry(&mut self, unix_secs: u64);
    /// The node refreshes this connection through the refresh proxy at `unix_secs` (0 =
    /// never): the host arms its timer for that time, without the grace delay of a token.
    fn set_refresh_at(&mut self, unix_secs: u64);
    /// The token of the subscription to `chan` expires at `unix_secs` (0 = never, or the
    /// subscription ended): the host records it (see [`SubExpiries`]) and arms the
    /// connection's timer for `client_expired_sub_close_delay_secs` after the earliest one.
    /// Cheap when the connection has no expiring subscription and `unix_secs` is 0.
    fn set_sub_expiry(&mut self, chan: ChanId, unix_secs: u64);
    /// The subscription to `chan` is refreshed by the node through the sub_refresh proxy at
    /// `unix_secs` (0 = never): recorded like [`Host::set_sub_expiry`], but due at
    /// `unix_secs` itself and never announced to the client.
    fn set_sub_refresh(&mut self, chan: ChanId, unix_secs: u64);
    /// Takes the subscriptions of this connection that are due: those whose token expired at
    /// least `client_expired_sub_close_delay_secs` ago (`false`), and those the node refreshes
    /// itself whose time came (`true`); re-arms for the next one.
    fn take_expired_subs(&mut self) -> Vec<(ChanId, bool)>;
    /// Sends `body` to the backend's endpoint for `waiting`'s hook; the answer comes back
    /// through [`Session::proxied`] with `waiting`. Fails with a temporary error when the
    /// shard's proxy calls in flight are at their bound (`proxy.max_in_flight`).
    fn proxy(&mut self, waiting: Awaiting, body: Vec<u8>) -> Result<(), ErrorCode>;
    /// A subscribe to `channel` of this connection waits for the subscribe proxy.
    fn proxy_waits(&self, channel: &str) -> bool;
    /// The client unsubscribed from `channel` while its subscribe waited for the proxy: the
    /// answer is dropped when it comes.
    fn proxy_forget(&mut self, channel: &str);
    /// Custom data for the subscribe reply to command `id` that the host sends later
    /// ([`Ack::Later`]).
    fn later_reply_data(&mut self, id: u32, data: Box<RawValue>);
    /// The client joined or left a channel whose namespace keeps presence (the entry carries
    /// the subscription's `chan_info`, so call it after [`Host::set_sub_extra`] on a join).
    fn presence_changed(&mut self, channel: &str, who: &Identity, joined: bool);
    /// What the new subscription to `chan` carries besides the channel (told for every new
    /// subscription; the host keeps only non-empty ones, in a side table).
    fn set_sub_extra(&mut self, chan: ChanId, extra: SubExtra);
    /// The client joined (after [`Host::set_sub_extra`]) or is leaving (before
    /// [`Host::unsubscribe`]) channel `chan`: in a `join_leave` namespace the host sends a
    /// join or leave message to the channel's subscribers on every node. A join is sent only
    /// once the subscription is in (a subscriber still waiting for the broker is announced
    /// when its reply goes out); a leave only for a subscription that was in.
    fn join_leave(&mut self, chan: ChanId, who: &Identity, joined: bool);
    /// Takes one token from the connection's command bucket; false when it is empty.
    fn allow_command(&mut self) -> bool;
    /// Counts a refusal by a limit (for the node's counters).
    fn refused(&mut self, what: Refusal);
}

/// Limits a command can run into, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    ChannelLimit,
    ChannelName,
    RateLimited,
    /// A subscription ended because its token expired without a `sub_refresh` (push 2501).
    SubscriptionExpired,
}

/// Deadlines of subscriptions made with an expiring subscription token: per connection, each
/// such channel and its token's `exp` (Unix seconds). The shard keeps one table; a connection
/// without an expiring subscription has no entry, so an ordinary idle connection costs nothing
/// here.
#[derive(Debug, Default)]
pub struct SubExpiries {
    /// Per connection: channel, expiry (Unix seconds) and whether the node refreshes it
    /// itself (then stored `client_expired_sub_close_delay_secs` early, so that it is due at
    /// its own time while token expiries are due after the grace delay).
    by_conn: HashMap<ConnKey, smallvec::SmallVec<[SubExpiry; 1]>>,
}

/// One expiring subscription: channel, expiry (Unix seconds), refreshed by the node.
type SubExpiry = (ChanId, u64, bool);

impl SubExpiries {
    /// Sets (`exp` > 0) or forgets (`exp` = 0) the expiry of `key`'s subscription to `chan`.
    /// Returns the connection's earliest expiry afterwards (0 = none left).
    pub fn set(&mut self, key: ConnKey, chan: ChanId, exp: u64) -> u64 {
        self.put(key, chan, exp, false)
    }

    /// Sets (`due` > 0) or forgets the time the node refreshes `key`'s subscription to `chan`
    /// itself; `delay` is `client_expired_sub_close_delay_secs`. Returns what [`Self::set`]
    /// returns.
    pub fn set_refresh(&mut self, key: ConnKey, chan: ChanId, due: u64, delay: u64) -> u64 {
        let stored = if due == 0 {
            0
        } else {
            due.saturating_sub(delay).max(1)
        };
        self.put(key, chan, stored, true)
    }

    fn put(&mut self, key: ConnKey, chan: ChanId, exp: u64, server: bool) -> u64 {
        let list = self.by_conn.entry(key).or_default();
        match list.iter().position(|&(c, _, _)| c == chan) {
            Some(i) if exp == 0 => {
                list.swap_remove(i);
            }
            Some(i) => list[i] = (chan, exp, server),
            None if exp > 0 => list.push((chan, exp, server)),
            None => {}
        }
        self.earliest_or_forget(key)
    }

    /// The token expiry of `key`'s subscription to `chan` (0 = none, or refreshed by the
    /// node: never announced to the client).
    pub fn get(&self, key: ConnKey, chan: ChanId) -> u64 {
        self.by_conn
            .get(&key)
            .and_then(|l| l.iter().find(|&&(c, _, server)| c == chan && !server))
            .map_or(0, |&(_, exp, _)| exp)
    }

    /// Takes `key`'s subscriptions that expired at or before `cutoff`, each with whether the
    /// node refreshes it itself; returns them and the earliest expiry left (0 = none).
    pub fn take_due(&mut self, key: ConnKey, cutoff: u64) -> (Vec<(ChanId, bool)>, u64) {
        let mut due = Vec::new();
        if let Some(list) = self.by_conn.get_mut(&key) {
            list.retain(|&mut (chan, exp, server)| {
                let keep = exp > cutoff;
                if !keep {
                    due.push((chan, server));
                }
                keep
            });
        }
        (due, self.earliest_or_forget(key))
    }

    /// Forgets a connection (it closed).
    pub fn remove(&mut self, key: ConnKey) {
        self.by_conn.remove(&key);
    }

    /// Connections with an expiring subscription.
    pub fn connections(&self) -> usize {
        self.by_conn.len()
    }

    fn earliest_or_forget(&mut self, key: ConnKey) -> u64 {
        let earliest = self
            .by_conn
            .get(&key)
            .and_then(|l| l.iter().map(|&(_, exp, _)| exp).min())
            .unwrap_or(0);
        if earliest == 0 {
            self.by_conn.remove(&key);
        }
        earliest
    }
}

/// A client id: unique across nodes (a random node prefix, the shard, a sequence number) and
/// shown shaped like a UUID v4. Kept as 16 bytes instead of a 36-byte string per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientId {
    pub node: u64,
    pub seq: u64,
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (n, s) = (self.node, self.seq);
        write!(
            f,
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (n >> 32) as u32,
            (n >> 16) as u16,
            n & 0xfff,
            (s >> 48) & 0xfff,
            s & 0xffff_ffff_ffff
        )
    }
}

/// Session state of a connected client.
#[derive(Debug)]
pub struct Identity {
    pub user: Rc<str>,
    pub client: ClientId,
    pub info: Option<Box<RawValue>>,
    /// Connected through the connect proxy: when it expires the node asks the refresh proxy
    /// (or closes it, 3005, without one); the client is not told to refresh.
    pub server_refresh: bool,
}

/// What a connect is granted, by a token or the connect proxy.
pub(super) struct Grant<'a> {
    pub user: &'a str,
    pub client: ClientId,
    /// Unix seconds; 0 = never.
    pub exp: u64,
    pub info: Option<Box<RawValue>>,
    /// Server-side subscriptions, each with the data for its part of the reply and its own
    /// info (`chan_info`).
    pub channels: Vec<ServerSub<'a>>,
    /// For the client, in the connect reply.
    pub data: Option<Box<RawValue>>,
    /// The node refreshes the connection through the refresh proxy.
    pub server_refresh: bool,
}

/// A server-side subscription granted at connect: channel, data for its part of the connect
/// reply, its own info (`chan_info`).
pub(super) type ServerSub<'a> = (&'a str, Option<Box<RawValue>>, Option<Box<RawValue>>);

/// What a subscribe is granted.
pub(super) struct Granted {
    /// Unix seconds the subscription expires at; 0 = never.
    pub exp: u64,
    /// The node refreshes it through the sub_refresh proxy (the client is not told).
    pub server_refresh: bool,
    /// For the client, in the subscribe reply.
    pub data: Option<Box<RawValue>>,
    /// The subscription's own info (`chan_info` in presence and join/leave messages).
    pub chan_info: Option<Box<RawValue>>,
    /// The subscriber asked for join/leave pushes, and may have them.
    pub push_join_leave: bool,
}

/// The session of one connection.
#[derive(Debug, Default)]
pub struct Session {
    /// Set by a successful connect.
    pub identity: Option<Box<Identity>>,
    /// Channels subscribed, interned by the shard (inline for the common one or two).
    pub subs: smallvec::SmallVec<[ChanId; 2]>,
    /// Commands refused by the rate limit since the last accepted one.
    pub refused_in_a_row: u32,
    /// The connect waits for the connect proxy: nothing else may come meanwhile.
    pub connecting: bool,
}

impl Session {
    /// Handles one message: every line is a command. Replies are appended to `out`, separated
    /// by `\n`. Returns a disconnect when the client must be closed.
    pub fn handle_message(
        &mut self,
        host: &mut dyn Host,
        text: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), Disconnect> {
        // `out` may start with bytes that are not ours (a frame header's room).
        let base = out.len();
        for line in text.split('\n') {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let before = out.len();
            if before > base {
                out.push(b'\n');
            }
            let len_with_sep = out.len();
            self.handle_line(host, line, out)?;
            if out.len() == len_with_sep {
                out.truncate(before); // nothing replied (pong, send, deferred)
            }
        }
        Ok(())
    }

    /// Whether `{}` pongs are expected: they are, once connected.
    pub fn is_connected(&self) -> bool {
        self.identity.is_some()
    }

    fn handle_line(
        &mut self,
        host: &mut dyn Host,
        line: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), Disconnect> {
        let parsed = parse_line(line);
        if !matches!(parsed, Ok(Line::Pong)) && !host.allow_command() {
            host.refused(Refusal::RateLimited);
            self.refused_in_a_row = self.refused_in_a_row.saturating_add(1);
            if self.refused_in_a_row >= host.config().limits.max_refused_commands {
                return Err(Disconnect::TooManyRequests);
            }
            if let Ok(Line::Command { id, .. } | Line::Invalid { id, .. }) = parsed {
                if id != 0 {
                    reply::error(out, id, ErrorCode::TooManyRequests, true);
                }
            }
            return Ok(());
        }
        if !matches!(parsed, Ok(Line::Pong)) {
            self.refused_in_a_row = 0;
        }
        let (id, request) = match parsed {
            Err(_) => return Err(Disconnect::BadRequest),
            Ok(Line::Pong) => return Ok(()),
            Ok(Line::Invalid { id, error }) => {
                reply::error(out, id, error, false);
                return Ok(());
            }
            Ok(Line::Command { id, request }) => (id, request),
        };
        if self.connecting {
            // The connect waits for the backend; an SDK sends nothing before its reply.
            return Err(Disconnect::BadRequest);
        }
        match (&self.identity, request) {
            (None, Request::Connect(c)) => self.connect(host, id, &c, out),
            (None, _) => Err(Disconnect::BadRequest),
            (Some(_), Request::Connect(_)) => Err(Disconnect::BadRequest),
            (Some(_), Request::Subscribe(s)) => {
                if !s.delta.is_empty() && !KNOWN_DELTA_TYPES.contains(&&*s.delta) {
                    return Err(Disconnect::BadRequest);
                }
                let since = s.recover.then(|| StreamPos {
                    offset: s.offset,
                    epoch: std::sync::Arc::from(&*s.epoch),
                });
                let reject = s.flag & FLAG_REJECT_UNRECOVERED != 0;
                match self.subscribe(host, id, &s, since, reject) {
                    Ok(Ack::Now(result)) => reply::result(out, id, "subscribe", &result),
                    Ok(Ack::Later) => {}
                    Err((code, temporary)) => reply::error(out, id, code, temporary),
                }
                Ok(())
            }
            (Some(_), Request::Unsubscribe(u)) => {
                if let Some(pos) = self.position(host, &u.channel) {
                    let chan = self.subs.swap_remove(pos);
                    self.left(host, chan);
                } else if host.proxy_waits(&u.channel) {
                    host.proxy_forget(&u.channel);
                }
                reply::result(out, id, "unsubscribe", &reply::Empty {});
                Ok(())
            }
            (Some(ident), Request::Publish(p)) => {
                let result = match namespace(host, &p.channel) {
                    Err(e) => Err(e),
                    Ok(ns)
                        if ns.publish_proxy && host.config().proxy.publish_endpoint.is_some() =>
                    {
                        let client = ident.client.to_string();
                        let mut body = proxy::Request::new(&client, host.transport());
                        body.user = Some(&ident.user);
                        body.channel = Some(&p.channel);
                        body.data = Some(p.data);
                        let waiting = Awaiting::Publish {
                            id,
                            channel: p.channel.to_string(),
                            data: p.data.to_owned(),
                        };
                        host.proxy(waiting, body.to_vec())
                    }
                    Ok(ns) if !host.config().insecure && !ns.allow_publish_for_client => {
                        Err(ErrorCode::PermissionDenied)
                    }
                    Ok(_) => {
                        let info = ClientInfo {
                            user: ident.user.to_string(),
                            client: ident.client.to_string(),
                            conn_info: ident.info.clone(),
                            chan_info: None,
                        };
                        host.publish(id, &p.channel, p.data, info)
                    }
                };
                if let Err(code) = result {
                    reply::error(out, id, code, code == ErrorCode::Internal);
                }
                Ok(())
            }
            (Some(_), Request::Presence(p)) => {
                self.presence(host, id, Deferred::Presence, &p.channel, out);
                Ok(())
            }
            (Some(_), Request::PresenceStats(p)) => {
                self.presence(host, id, Deferred::PresenceStats, &p.channel, out);
                Ok(())
            }
            (Some(_), Request::Ping) => {
                reply::result(out, id, "ping", &reply::Empty {});
                Ok(())
            }
            (Some(_), Request::Send) if id == 0 => Ok(()),
            (Some(_), Request::History(h)) => {
                let query = HistoryQuery {
                    limit: h.limit,
                    since: h.since.as_ref().map(|p| StreamPos {
                        offset: p.offset,
                        epoch: std::sync::Arc::from(&*p.epoch),
                    }),
                    reverse: h.reverse,
                };
                let result = match namespace(host, &h.channel) {
                    Err(e) => Err(e),
                    Ok(ns) if !ns.has_history() => Err(ErrorCode::NotAvailable),
                    Ok(ns)
                        if !host.config().insecure
                            && !ns.allow_history_for_client
                            && self.position(host, &h.channel).is_none() =>
                    {
                        Err(ErrorCode::PermissionDenied)
                    }
                    Ok(_) => host.history(id, &h.channel, query),
                };
                if let Err(code) = result {
                    reply::error(out, id, code, code == ErrorCode::Internal);
                }
                Ok(())
            }
            (Some(ident), Request::Rpc(r)) if host.config().proxy.rpc_endpoint.is_some() => {
                let client = ident.client.to_string();
                let mut body = proxy::Request::new(&client, host.transport());
                body.user = Some(&ident.user);
                body.method = &r.method;
                body.data = r.data;
                if let Err(code) = host.proxy(Awaiting::Rpc { id }, body.to_vec()) {
                    reply::error(out, id, code, true);
                }
                Ok(())
            }
            (Some(_), Request::Rpc(_) | Request::Send) => {
                reply::error(out, id, ErrorCode::NotAvailable, false);
                Ok(())
            }
            (Some(ident), Request::Refresh(r)) => {
                let Some(verifier) = host.verifier() else {
                    reply::error(out, id, ErrorCode::NotAvailable, false);
                    return Ok(());
                };
                match verifier.connect(&r.token, host.unix_now()) {
                    Ok(claims) if *claims.sub == *ident.user => {
                        let exp = claims.exp.unwrap_or(0);
                        host.set_expiry(exp);
                        let ttl = ttl(exp, host.unix_now());
                        let client = ident.client.to_string();
                        let result = reply::RefreshResult {
                            client: &client,
                            version: VERSION,
                            expires: exp > 0,
                            ttl,
                        };
                        reply::result(out, id, "refresh", &result);
                        Ok(())
                    }
                    // UnknownKey: a `kid` the JWK Set lacks (the fetch-and-retry belongs here).
                    Ok(_) | Err(TokenError::Invalid | TokenError::UnknownKey) => {
                        Err(Disconnect::InvalidToken)
                    }
                    Err(TokenError::Expired) => {
                        reply::error(out, id, ErrorCode::TokenExpired, false);
                        Ok(())
                    }
                }
            }
            (Some(ident), Request::SubRefresh(r)) => {
                let now = host.unix_now();
                let Some(verifier) = host.verifier() else {
                    reply::error(out, id, ErrorCode::NotAvailable, false);
                    return Ok(());
                };
                // Only a subscription the connection holds can be refreshed, and only with a
                // token that would let it subscribe: same channel, user and client.
                let Some(pos) = self.position(host, &r.channel) else {
                    reply::error(out, id, ErrorCode::PermissionDenied, false);
                    return Ok(());
                };
                let client = ident.client.to_string();
                let checked = verifier.subscribe(&r.token, &r.channel, &ident.user, &client, now);
                match checked {
                    Ok(claims) => {
                        let exp = claims.exp.unwrap_or(0);
                        host.set_sub_expiry(self.subs[pos], exp);
                        let result = reply::SubRefreshResult {
                            expires: exp > 0,
                            ttl: ttl(exp, now),
                        };
                        reply::result(out, id, "sub_refresh", &result);
                    }
                    Err(TokenError::Expired) => {
                        reply::error(out, id, ErrorCode::TokenExpired, false)
                    }
                    Err(TokenError::Invalid | TokenError::UnknownKey) => {
                        reply::error(out, id, ErrorCode::PermissionDenied, false)
                    }
                }
                Ok(())
            }
        }
    }

    pub(super) fn connect(
        &mut self,
        host: &mut dyn Host,
        id: u32,
        request: &crate::protocol::command::ConnectRequest<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), Disconnect> {
        let token: &str = &request.token;
        if token.is_empty() && host.config().proxy.connect_endpoint.is_some() {
            // No token: the backend's connect proxy says who this is.
            let client = host.new_client_id();
            let client_text = client.to_string();
            let mut body = proxy::Request::new(&client_text, host.transport());
            body.name = &request.name;
            body.version = &request.version;
            body.data = request.data;
            let waiting = Awaiting::Connect {
                id,
                client,
                subs: Box::new(request.subs.clone()),
            };
            match host.proxy(waiting, body.to_vec()) {
                Ok(()) => self.connecting = true,
                Err(code) => reply::error(out, id, code, true),
            }
            return Ok(());
        }
        let now = host.unix_now();
        let claims = match host.verifier() {
            Some(_) if token.is_empty() && host.config().insecure => Default::default(),
            Some(v) => match v.connect(token, now) {
                Ok(c) => c,
                Err(TokenError::Expired) => {
                    reply::error(out, id, ErrorCode::TokenExpired, false);
                    return Ok(());
                }
                Err(TokenError::UnknownKey) => {
                    // A `kid` the key set lacks: wait for a fetch of the set, then check again.
                    let waiting = Awaiting::Keys {
                        id,
                        token: token.to_string(),
                        subs: Box::new(request.subs.clone()),
                    };
                    return match host.proxy(waiting, Vec::new()) {
                        Ok(()) => {
                            self.connecting = true;
                            Ok(())
                        }
                        Err(ErrorCode::Internal) => {
                            reply::error(out, id, ErrorCode::Internal, true);
                            Ok(())
                        }
                        Err(_) => Err(Disconnect::InvalidToken),
                    };
                }
                Err(TokenError::Invalid) => return Err(Disconnect::InvalidToken),
            },
            None if host.config().insecure => Default::default(),
            None => return Err(Disconnect::InvalidToken),
        };
        let client = host.new_client_id();
        let grant = Grant {
            user: &claims.sub,
            client,
            exp: claims.exp.unwrap_or(0),
            info: claims.info,
            channels: (claims.channels.iter())
                .map(|c| (c.as_str(), None, None))
                .collect(),
            data: None,
            server_refresh: false,
        };
        self.establish(host, id, grant, &request.subs, out)
    }

    /// Makes the connection what a token or the connect proxy granted, and replies to the
    /// connect `id` (now, or through the host once server-side subscriptions are confirmed).
    pub(super) fn establish(
        &mut self,
        host: &mut dyn Host,
        id: u32,
        grant: Grant<'_>,
        recover: &std::collections::HashMap<String, ConnectSub>,
        out: &mut Vec<u8>,
    ) -> Result<(), Disconnect> {
        let now = host.unix_now();
        let user = host.register_user(grant.user);
        let client = grant.client;
        let exp = grant.exp;
        self.identity = Some(Box::new(Identity {
            user,
            client,
            info: grant.info,
            server_refresh: grant.server_refresh,
        }));
        let client = client.to_string();
        if grant.server_refresh {
            host.set_refresh_at(exp);
        } else {
            host.set_expiry(exp);
        }
        let mut subs = BTreeMap::new();
        let mut waiting = 0;
        let mut joins = Vec::new();
        for (channel, data, chan_info) in grant.channels {
            // Server-side subscriptions: the token vouches for them, so no permission check.
            if self.position(host, channel).is_some() {
                continue;
            }
            // In history channels they get a position, and recover like client ones.
            let recovery = match host.config().namespace_of(channel) {
                Some(ns) if ns.has_history() => Recovery {
                    history: true,
                    recoverable: ns.recover,
                    since: recover
                        .get(channel)
                        .filter(|s| s.recover && ns.recover)
                        .map(|s| StreamPos {
                            offset: s.offset,
                            epoch: std::sync::Arc::from(s.epoch.as_str()),
                        }),
                    reject_unrecovered: false,
                    connect: true,
                    server_push: None,
                },
                _ => Recovery::default(),
            };
            let sub_id = if recovery.connect { id } else { 0 };
            let chan = match host.subscribe(sub_id, channel, &recovery) {
                Ok((chan, Ack::Now(mut result))) => {
                    result.data = data;
                    subs.insert(channel, result);
                    chan
                }
                Ok((chan, Ack::Later)) => {
                    waiting += 1;
                    chan
                }
                Err(_) => return Err(Disconnect::ServerError),
            };
            self.subs.push(chan);
            // A server-side subscription cannot ask for join/leave pushes: it gets them only
            // where the namespace forces them (as in Centrifugo).
            let extra = SubExtra {
                chan_info,
                push_join_leave: false,
            };
            host.set_sub_extra(chan, extra);
            let ns = host.config().namespace_of(channel);
            let (presence, join_leave) =
                ns.map_or((false, false), |ns| (ns.presence, ns.join_leave));
            let ident = self.identity.as_ref().expect("just set");
            if presence {
                host.presence_changed(channel, ident, true);
            }
            if join_leave {
                joins.push(chan);
            }
        }
        // A client refreshes a token itself; a connection the backend let in is refreshed by
        // the node, and the client is not told it expires.
        let announce = exp > 0 && !grant.server_refresh;
        let emulation = host.emulation();
        let result = reply::ConnectResult {
            client: &client,
            version: VERSION,
            expires: announce,
            ttl: if announce { ttl(exp, now) } else { 0 },
            data: grant.data.as_deref(),
            subs,
            ping: host.config().ping.interval_secs,
            pong: true,
            session: emulation.as_ref().map(|e| e.0.as_str()),
            node: emulation.as_ref().map(|e| e.1.as_str()),
        };
        if waiting > 0 {
            // The host announces the joins once the connect reply is out.
            host.connect_later(id, result, waiting);
        } else {
            reply::result(out, id, "connect", &result);
            let ident = self.identity.as_ref().expect("just set");
            for chan in joins {
                host.join_leave(chan, ident, true);
            }
        }
        Ok(())
    }

    fn position(&self, host: &dyn Host, channel: &str) -> Option<usize> {
        self.subs
            .iter()
            .position(|&c| &*host.channel_name(c) == channel)
    }

    fn subscribe(
        &mut self,
        host: &mut dyn Host,
        id: u32,
        request: &crate::protocol::command::SubscribeRequest<'_>,
        since: Option<StreamPos>,
        reject_unrecovered: bool,
    ) -> Result<Ack, (ErrorCode, bool)> {
        let channel: &str = &request.channel;
        let token: &str = &request.token;
        let cfg = host.config();
        if channel.is_empty() || channel.len() > cfg.limits.max_channel_name_bytes {
            host.refused(Refusal::ChannelName);
            return Err((ErrorCode::BadRequest, false));
        }
        let ns = namespace(host, channel).map_err(|e| (e, false))?;
        if self.position(host, channel).is_some() || host.proxy_waits(channel) {
            return Err((ErrorCode::AlreadySubscribed, false));
        }
        if self.subs.len() >= cfg.limits.max_channels_per_connection {
            host.refused(Refusal::ChannelLimit);
            return Err((ErrorCode::LimitExceeded, false));
        }
        let ident = self.identity.as_ref().expect("connected");
        let user_limited = ns.allow_user_limited_channels && channel.contains('#');
        if token.is_empty()
            && ns.subscribe_proxy
            && !user_limited
            && cfg.proxy.subscribe_endpoint.is_some()
        {
            // The backend decides (tokens and user-limited channels decide for themselves).
            let client = ident.client.to_string();
            let mut body = proxy::Request::new(&client, host.transport());
            body.user = Some(&ident.user);
            body.channel = Some(channel);
            body.data = request.data;
            let waiting = Awaiting::Subscribe {
                id,
                channel: channel.to_string(),
                since,
                reject_unrecovered,
            };
            host.proxy(waiting, body.to_vec()).map_err(|e| (e, true))?;
            return Ok(Ack::Later);
        }
        let (exp, chan_info) = permit(host, ns, channel, token, ident).map_err(|e| (e, false))?;
        // Where the namespace has join/leave messages, a subscriber that asks gets them (any
        // subscriber may read the channel's presence here, which Centrifugo also requires);
        // with `force_push_join_leave` every subscriber gets them anyway.
        let push_join_leave = request.join_leave && ns.join_leave && !ns.force_push_join_leave;
        let granted = Granted {
            exp,
            server_refresh: false,
            data: None,
            chan_info,
            push_join_leave,
        };
        self.subscribe_granted(host, id, channel, since, reject_unrecovered, granted)
    }

    /// Subscribes to a channel the client may join (by a token, the namespace, or the
    /// subscribe proxy), and says when the reply goes out.
    pub(super) fn subscribe_granted(
        &mut self,
        host: &mut dyn Host,
        id: u32,
        channel: &str,
        since: Option<StreamPos>,
        reject_unrecovered: bool,
        granted: Granted,
    ) -> Result<Ack, (ErrorCode, bool)> {
        let ns = namespace(host, channel).map_err(|e| (e, false))?;
        let presence = ns.presence;
        let join_leave = ns.join_leave;
        let recovery = Recovery {
            history: ns.has_history(),
            recoverable: ns.recover,
            since: since.filter(|_| ns.recover),
            reject_unrecovered,
            connect: false,
            server_push: None,
        };
        let (chan, mut ack) = host
            .subscribe(id, channel, &recovery)
            .map_err(|e| (e, e == ErrorCode::Internal))?;
        self.subs.push(chan);
        let exp = granted.exp;
        // Always told, so that an expiry left from an earlier subscription to a channel with
        // the same id cannot end this one. A later reply (`Ack::Later`) gets the expiry from
        // the host's record.
        if granted.server_refresh {
            host.set_sub_expiry(chan, 0);
            host.set_sub_refresh(chan, exp);
        } else {
            host.set_sub_expiry(chan, exp);
        }
        let extra = SubExtra {
            chan_info: granted.chan_info,
            push_join_leave: granted.push_join_leave,
        };
        host.set_sub_extra(chan, extra);
        match &mut ack {
            Ack::Now(result) => {
                if !granted.server_refresh {
                    result.expires = exp > 0;
                    result.ttl = ttl(exp, host.unix_now());
                }
                result.data = granted.data;
            }
            Ack::Later => {
                if let Some(data) = granted.data {
                    host.later_reply_data(id, data);
                }
            }
        }
        let ident = self.identity.as_ref().expect("connected");
        if presence {
            host.presence_changed(channel, ident, true);
        }
        if join_leave {
            host.join_leave(chan, ident, true);
        }
        Ok(ack)
    }

    fn presence(
        &mut self,
        host: &mut dyn Host,
        id: u32,
        kind: Deferred,
        channel: &str,
        out: &mut Vec<u8>,
    ) {
        let result = match namespace(host, channel) {
            Err(e) => Err(e),
            Ok(ns) if !ns.presence => Err(ErrorCode::NotAvailable),
            Ok(ns)
                if !host.config().insecure
                    && !ns.allow_presence_for_client
                    && self.position(host, channel).is_none() =>
            {
                Err(ErrorCode::PermissionDenied)
            }
            Ok(_) => host.gather(id, kind, channel),
        };
        if let Err(code) = result {
            reply::error(out, id, code, code == ErrorCode::Internal);
        }
    }

    /// Leaves every channel (connection closing).
    pub fn leave_all(&mut self, host: &mut dyn Host) {
        for chan in std::mem::take(&mut self.subs) {
            self.left(host, chan);
        }
    }

    /// Ends the subscriptions whose token expired `client_expired_sub_close_delay_secs` ago
    /// without a `sub_refresh` (the host's timer calls this at their deadline): each one is
    /// left and gets an unsubscribe push 2501 "subscription expired" in `out` (separated by
    /// `\n`); the other subscriptions stay. A subscription the node refreshes itself asks the
    /// sub_refresh proxy instead (and ends only if there is none). Returns how many ended.
    pub fn expire_subscriptions(&mut self, host: &mut dyn Host, out: &mut Vec<u8>) -> usize {
        let base = out.len();
        let mut ended = 0;
        for (chan, server_refresh) in host.take_expired_subs() {
            if !self.subs.contains(&chan) {
                continue; // already gone (a server unsubscribe)
            }
            if server_refresh && self.refresh_subscription(host, chan) {
                continue;
            }
            self.end_expired(host, chan, base, out);
            ended += 1;
        }
        ended
    }

    /// Ends subscription `chan` as expired: left, and an unsubscribe push 2501 appended to
    /// `out` (after a `\n` when `out` has grown past `base`).
    pub(super) fn end_expired(
        &mut self,
        host: &mut dyn Host,
        chan: ChanId,
        base: usize,
        out: &mut Vec<u8>,
    ) {
        let Some(pos) = self.subs.iter().position(|&c| c == chan) else {
            return;
        };
        self.subs.swap_remove(pos);
        let name = host.channel_name(chan);
        self.left(host, chan);
        if out.len() > base {
            out.push(b'\n');
        }
        reply::unsubscribe_push(
            out,
            &name,
            unsubscribe::EXPIRED,
            unsubscribe::EXPIRED_REASON,
        );
        host.refused(Refusal::SubscriptionExpired);
    }

    /// Removes a channel the session was in (already taken out of `subs`).
    pub fn left(&mut self, host: &mut dyn Host, chan: ChanId) {
        host.set_sub_expiry(chan, 0);
        if let Some(ident) = self.identity.as_ref() {
            let name = host.channel_name(chan);
            let ns = host.config().namespace_of(&name);
            let (presence, join_leave) =
                ns.map_or((false, false), |ns| (ns.presence, ns.join_leave));
            if presence {
                host.presence_changed(&name, ident, false);
            }
            if join_leave {
                host.join_leave(chan, ident, false);
            }
        }
        host.unsubscribe(chan);
    }
}

/// Whether a client may subscribe to `channel` by itself (server-side subscriptions from the
/// connection token are not asked): with a valid subscription token, in a user-limited channel
/// that names it (where the namespace has `allow_user_limited_channels`), or where the
/// namespace has `allow_subscribe_for_client`; anything goes when `insecure`. Private `$`
/// channels need a token. Returns the subscription's expiry (the token's `exp`; 0 = never)
/// and its info (the token's `info` claim).
fn permit(
    host: &dyn Host,
    ns: &NamespaceOptions,
    channel: &str,
    token: &str,
    ident: &Identity,
) -> Result<(u64, Option<Box<RawValue>>), ErrorCode> {
    if !token.is_empty() {
        let Some(verifier) = host.verifier() else {
            // No secret to check it with: only an insecure node lets the client in.
            return match host.config().insecure {
                true => Ok((0, None)),
                false => Err(ErrorCode::PermissionDenied),
            };
        };
        let client = ident.client.to_string();
        return match verifier.subscribe(token, channel, &ident.user, &client, host.unix_now()) {
            Ok(claims) => Ok((claims.exp.unwrap_or(0), claims.info)),
            // The SDK gets a new token and subscribes again.
            Err(TokenError::Expired) => Err(ErrorCode::TokenExpired),
            Err(TokenError::Invalid | TokenError::UnknownKey) => Err(ErrorCode::PermissionDenied),
        };
    }
    if host.config().insecure {
        return Ok((0, None));
    }
    let name = channel.split_once(':').map(|(_, n)| n).unwrap_or(channel);
    if name.starts_with('$') {
        return Err(ErrorCode::PermissionDenied); // private channel: subscription token required
    }
    let allowed = match name.split_once('#') {
        Some((_, users)) if ns.allow_user_limited_channels => {
            !ident.user.is_empty() && users.split(',').any(|u| u == &*ident.user)
        }
        _ => ns.allow_subscribe_for_client,
    };
    if allowed {
        Ok((0, None))
    } else {
        Err(ErrorCode::PermissionDenied)
    }
}

/// The namespace of a channel a command names; a name over the limit is a bad request.
fn namespace<'h>(host: &'h dyn Host, channel: &str) -> Result<&'h NamespaceOptions, ErrorCode> {
    if channel.is_empty() || channel.len() > host.config().limits.max_channel_name_bytes {
        return Err(ErrorCode::BadRequest);
    }
    host.config()
        .namespace_of(channel)
        .ok_or(ErrorCode::UnknownChannel)
}

fn ttl(exp: u64, now: u64) -> u32 {
    if exp == 0 {
        0
    } else {
        exp.saturating_sub(now).min(u32::MAX as u64) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::token::{sign_connect, ConnectClaims};
    use serde_json::Value;

    /// A shard stand-in recording what the session asked for.
    struct FakeHost {
        cfg: Config,
        verifier: Option<TokenVerifier>,
        now: u64,
        channels: Vec<Rc<str>>,
        subscribed: Vec<ChanId>,
        published: Vec<(u32, String, String)>,
        gathered: Vec<(u32, Deferred, String)>,
        broker_full: bool,
        expiry: u64,
        presence_log: Vec<(String, String, bool)>,
        tokens: u32,
        refusals: Vec<Refusal>,
        recoveries: Vec<Recovery>,
        histories: Vec<(u32, String, HistoryQuery)>,
        sub_expiries: SubExpiries,
        /// Backend calls asked for and not answered yet.
        calls: Vec<(Awaiting, Value)>,
        refresh_at: u64,
        /// Extras told per subscription: (channel, chan_info, push_join_leave).
        extras: Vec<(ChanId, Option<String>, bool)>,
        /// Join (true) and leave (false) announcements asked for, by channel.
        join_leave_log: Vec<(ChanId, bool)>,
    }

    const KEY: ConnKey = ConnKey {
        slot: 1,
        generation: 1,
    };

    impl FakeHost {
        fn new(toml: &str) -> Self {
            let cfg = Config::from_toml(toml).unwrap();
            cfg.validate().unwrap();
            let verifier = TokenVerifier::from_config(&cfg).unwrap();
            FakeHost {
                cfg,
                verifier,
                now: 1_000,
                channels: Vec::new(),
                subscribed: Vec::new(),
                published: Vec::new(),
                gathered: Vec::new(),
                broker_full: false,
                expiry: 0,
                presence_log: Vec::new(),
                tokens: u32::MAX,
                refusals: Vec::new(),
                recoveries: Vec::new(),
                histories: Vec::new(),
                sub_expiries: SubExpiries::default(),
                calls: Vec::new(),
                refresh_at: 0,
                extras: Vec::new(),
                join_leave_log: Vec::new(),
            }
        }
    }

    impl Host for FakeHost {
        fn config(&self) -> &Config {
            &self.cfg
        }
        fn verifier(&self) -> Option<&TokenVerifier> {
            self.verifier.as_ref()
        }
        fn unix_now(&self) -> u64 {
            self.now
        }
        fn new_client_id(&mut self) -> ClientId {
            ClientId { node: 0, seq: 1 }
        }
        fn register_user(&mut self, user: &str) -> Rc<str> {
            user.into()
        }
        fn subscribe(
            &mut self,
            _id: u32,
            channel: &str,
            recovery: &Recovery,
        ) -> Result<(ChanId, Ack), ErrorCode> {
            self.recoveries.push(recovery.clone());
            if self.broker_full {
                return Err(ErrorCode::Internal);
            }
            let id = match self.channels.iter().position(|c| &**c == channel) {
                Some(i) => i as ChanId,
                None => {
                    self.channels.push(channel.into());
                    (self.channels.len() - 1) as ChanId
                }
            };
            self.subscribed.push(id);
            Ok((id, Ack::Now(Default::default())))
        }
        fn unsubscribe(&mut self, chan: ChanId) {
            self.subscribed.retain(|&c| c != chan);
        }
        fn channel_name(&self, chan: ChanId) -> Rc<str> {
            self.channels[chan as usize].clone()
        }
        fn publish(
            &mut self,
            id: u32,
            channel: &str,
            data: &RawValue,
            info: ClientInfo,
        ) -> Result<(), ErrorCode> {
            self.published
                .push((id, channel.into(), format!("{}|{}", data.get(), info.user)));
            Ok(())
        }
        fn gather(&mut self, id: u32, kind: Deferred, channel: &str) -> Result<(), ErrorCode> {
            self.gathered.push((id, kind, channel.into()));
            Ok(())
        }
        fn connect_later(&mut self, _id: u32, _result: reply::ConnectResult<'_>, _waiting: u32) {
            unreachable!("the fake host answers every subscribe at once")
        }
        fn history(
            &mut self,
            id: u32,
            channel: &str,
            query: HistoryQuery,
        ) -> Result<(), ErrorCode> {
            self.histories.push((id, channel.into(), query));
            Ok(())
        }
        fn set_expiry(&mut self, unix_secs: u64) {
            self.expiry = unix_secs;
        }
        fn set_sub_expiry(&mut self, chan: ChanId, unix_secs: u64) {
            self.sub_expiries.set(KEY, chan, unix_secs);
        }
        fn set_sub_refresh(&mut self, chan: ChanId, unix_secs: u64) {
            let delay = self.cfg.client_expired_sub_close_delay_secs as u64;
            self.sub_expiries.set_refresh(KEY, chan, unix_secs, delay);
        }
        fn take_expired_subs(&mut self) -> Vec<(ChanId, bool)> {
            let delay = self.cfg.client_expired_sub_close_delay_secs as u64;
            let cutoff = self.now.saturating_sub(delay);
            self.sub_expiries.take_due(KEY, cutoff).0
        }
        fn set_refresh_at(&mut self, unix_secs: u64) {
            self.refresh_at = unix_secs;
        }
        fn proxy(&mut self, waiting: Awaiting, body: Vec<u8>) -> Result<(), ErrorCode> {
            if self.broker_full {
                return Err(ErrorCode::Internal);
            }
            self.calls
                .push((waiting, serde_json::from_slice(&body).unwrap()));
            Ok(())
        }
        fn proxy_waits(&self, channel: &str) -> bool {
            self.calls
                .iter()
                .any(|(w, _)| w.subscribing() == Some(channel))
        }
        fn proxy_forget(&mut self, channel: &str) {
            self.calls.retain(|(w, _)| w.subscribing() != Some(channel));
        }
        fn later_reply_data(&mut self, _id: u32, _data: Box<RawValue>) {
            unreachable!("the fake host answers every subscribe at once")
        }
        fn set_sub_extra(&mut self, chan: ChanId, extra: SubExtra) {
            let info = extra.chan_info.map(|i| i.get().to_string());
            self.extras.push((chan, info, extra.push_join_leave));
        }
        fn join_leave(&mut self, chan: ChanId, _who: &Identity, joined: bool) {
            self.join_leave_log.push((chan, joined));
        }
        fn presence_changed(&mut self, channel: &str, who: &Identity, joined: bool) {
            self.presence_log
                .push((channel.to_string(), who.user.to_string(), joined));
        }
        fn allow_command(&mut self) -> bool {
            if self.tokens == 0 {
                return false;
            }
            self.tokens -= 1;
            true
        }
        fn refused(&mut self, what: Refusal) {
            self.refusals.push(what);
        }
    }

    const CFG: &str = "token_hmac_secret = \"k\"\n[default_namespace]\nallow_subscribe_for_client = true\n[namespaces.chat]\nallow_subscribe_for_client = true\nallow_user_limited_channels = true\nallow_publish_for_client = true\npresence = true\n";

    fn token(sub: &str, exp: Option<u64>, channels: &[&str]) -> String {
        sign_connect(
            "k",
            &ConnectClaims {
                sub: sub.into(),
                exp,
                info: None,
                channels: channels.iter().map(|s| s.to_string()).collect(),
            },
        )
    }

    fn send(s: &mut Session, h: &mut FakeHost, text: &str) -> (Result<(), Disconnect>, Vec<Value>) {
        // Start like a frame buffer does: with room for a header that is not ours.
        let mut out = vec![0u8; crate::ws::HEADROOM];
        let r = s.handle_message(h, text, &mut out);
        let body = std::str::from_utf8(&out[crate::ws::HEADROOM..]).unwrap();
        assert!(!body.starts_with('\n') && !body.ends_with('\n'), "{body:?}");
        let replies = body
            .split('\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (r, replies)
    }

    fn connected(h: &mut FakeHost) -> Session {
        let mut s = Session::default();
        let t = token("alice", None, &[]);
        let (r, replies) = send(
            &mut s,
            h,
            &format!(r#"{{"id":1,"connect":{{"token":"{t}"}}}}"#),
        );
        r.unwrap();
        assert_eq!(
            replies[0]["connect"]["client"],
            "00000000-0000-4000-8000-000000000001"
        );
        s
    }

    #[test]
    fn connect_announces_ping_and_pong() {
        let mut h = FakeHost::new(CFG);
        let mut s = Session::default();
        let t = token("alice", Some(1_100), &["news"]);
        let (r, replies) = send(
            &mut s,
            &mut h,
            &format!(r#"{{"id":1,"connect":{{"token":"{t}"}}}}"#),
        );
        r.unwrap();
        let c = &replies[0]["connect"];
        assert_eq!(replies[0]["id"], 1);
        assert_eq!(c["ping"], 25);
        assert_eq!(c["pong"], true);
        assert_eq!(c["expires"], true);
        assert_eq!(c["ttl"], 100);
        assert!(
            c["subs"]["news"].is_object(),
            "server-side subscription from the token"
        );
        assert_eq!(h.expiry, 1_100);
        assert_eq!(s.subs.len(), 1);
    }

    #[test]
    fn forged_and_expired_tokens() {
        let mut h = FakeHost::new(CFG);
        let forged = sign_connect("nope", &ConnectClaims::default());
        let (r, _) = send(
            &mut Session::default(),
            &mut h,
            &format!(r#"{{"id":1,"connect":{{"token":"{forged}"}}}}"#),
        );
        assert_eq!(r.unwrap_err(), Disconnect::InvalidToken);
        let expired = token("a", Some(999), &[]);
        let mut s = Session::default();
        let (r, replies) = send(
            &mut s,
            &mut h,
            &format!(r#"{{"id":1,"connect":{{"token":"{expired}"}}}}"#),
        );
        r.unwrap();
        assert_eq!(replies[0]["error"]["code"], 109);
        assert!(!s.is_connected());
        let (r, _) = send(&mut Session::default(), &mut h, r#"{"id":1,"connect":{}}"#);
        assert_eq!(
            r.unwrap_err(),
            Disconnect::InvalidToken,
            "no anonymous access unless insecure"
        );
    }

    #[test]
    fn commands_before_connect_are_bad_requests() {
        let mut h = FakeHost::new(CFG);
        let (r, _) = send(
            &mut Session::default(),
            &mut h,
            r#"{"id":1,"subscribe":{"channel":"a"}}"#,
        );
        assert_eq!(r.unwrap_err(), Disconnect::BadRequest);
    }

    #[test]
    fn batched_commands_get_batched_replies() {
        let mut h = FakeHost::new(CFG);
        let mut s = connected(&mut h);
        let (r, replies) = send(
            &mut s,
            &mut h,
            "{\"id\":2,\"subscribe\":{\"channel\":\"news\"}}\n{\"id\":3,\"subscribe\":{\"channel\":\"news\"}}\n{}\n{\"id\":4,\"ping\":{}}",
        );
        r.unwrap();
        assert_eq!(replies.len(), 3);
        assert_eq!(replies[0]["id"], 2);
        assert!(replies[0]["subscribe"].is_object());
        assert_eq!(replies[1]["error"]["code"], 105);
        assert_eq!(replies[2]["id"], 4);
    }

    #[test]
    fn subscribe_errors() {
        let mut h = FakeHost::new(CFG);
        let mut s = connected(&mut h);
        let long = "x".repeat(256);
        let cases = [
            ("nope:1".to_string(), 102),
            (long, 107),
            ("$private".to_string(), 103),
            ("chat:#bob,carol".to_string(), 103),
        ];
        for (i, (chan, code)) in cases.iter().enumerate() {
            let (r, replies) = send(
                &mut s,
                &mut h,
                &format!(r#"{{"id":{},"subscribe":{{"channel":"{chan}"}}}}"#, i + 10),
            );
            r.unwrap();
            assert_eq!(replies[0]["error"]["code"], *code, "{chan}");
        }
        let (_, replies) = send(
            &mut s,
            &mut h,
            r##"{"id":20,"subscribe":{"channel":"chat:#bob,alice"}}"##,
        );
        assert!(
            replies[0]["subscribe"].is_object(),
            "user-limited channel names alice"
        );
        h.broker_full = true;
        let (_, replies) = send(
            &mut s,
            &mut h,
            r#"{"id":21,"subscribe":{"channel":"other"}}"#,
        );
        assert_eq!(replies[0]["error"]["code"], 100);
        assert_eq!(replies[0]["error"]["temporary"], true);
        assert!(s.position(&h, "other").is_none(), "nothing half-subscribed");
    }

    #[test]
    fn recovery_and_history_follow_the_namespace() {
        let cfg = "token_hmac_secret = \"k\"\n[default_namespace]\nallow_subscribe_for_client = true\n[namespaces.h]\nallow_subscribe_for_client = true\nhistory_size = 10\nrecover = true\n[namespaces.n]\nallow_subscribe_for_client = true\nhistory_size = 10\n";
        let mut h = FakeHost::new(cfg);
        let mut s = connected(&mut h);
        let sub = r#"{"id":2,"subscribe":{"channel":"CH","recover":true,"offset":7,"epoch":"e","flag":3}}"#;
        for ch in ["h:1", "n:1", "plain"] {
            let (r, _) = send(&mut s, &mut h, &sub.replace("CH", ch));
            r.unwrap();
        }
        let r = &h.recoveries;
        assert!(r[0].history && r[0].recoverable && r[0].reject_unrecovered);
        assert_eq!(
            r[0].since.as_ref().map(|p| (p.offset, &*p.epoch)),
            Some((7, "e"))
        );
        assert!(
            r[1].history && !r[1].recoverable && r[1].since.is_none(),
            "recover off"
        );
        assert!(!r[2].history && r[2].since.is_none(), "no history");
        // history: subscribers may read; others only with allow_history_for_client.
        let hist = r#"{"id":3,"history":{"channel":"CH","limit":5,"since":{"offset":2,"epoch":"e"},"reverse":true}}"#;
        let (_, replies) = send(&mut s, &mut h, &hist.replace("CH", "h:1"));
        assert!(replies.is_empty(), "answered later by the host");
        let (id, ch, q) = &h.histories[0];
        assert_eq!((*id, ch.as_str(), q.limit, q.reverse), (3, "h:1", 5, true));
        assert_eq!(q.since.as_ref().unwrap().offset, 2);
        let (_, replies) = send(&mut s, &mut h, &hist.replace("CH", "h:2"));
        assert_eq!(replies[0]["error"]["code"], 103, "not subscribed");
        let (_, replies) = send(&mut s, &mut h, &hist.replace("CH", "plain"));
        assert_eq!(
            replies[0]["error"]["code"], 108,
            "no history in that namespace"
        );
        let long = format!("h:{}", "x".repeat(300));
        let (_, replies) = send(&mut s, &mut h, &hist.replace("CH", &long));
        assert_eq!(replies[0]["error"]["code"], 107, "name over the limit");
    }

    #[test]
    fn channel_limit() {
        let mut h = FakeHost::new(&format!("{CFG}[limits]\nmax_channels_per_connection = 2\n"));
        let mut s = connected(&mut h);
        for (i, c) in ["a", "b", "c"].iter().enumerate() {
            let (_, replies) = send(
                &mut s,
                &mut h,
                &format!(r#"{{"id":{},"subscribe":{{"channel":"{c}"}}}}"#, i + 2),
            );
            if i < 2 {
                assert!(replies[0]["subscribe"].is_object());
            } else {
                assert_eq!(replies[0]["error"]["code"], 106);
            }
        }
    }

    #[test]
    fn publish_permissions() {
        let mut h = FakeHost::new(CFG);
        let mut s = connected(&mut h);
        let (_, replies) = send(
            &mut s,
            &mut h,
            r#"{"id":2,"publish":{"channel":"news","data":{"a":1}}}"#,
        );
        assert_eq!(replies[0]["error"]["code"], 103);
        let (_, replies) = send(
            &mut s,
            &mut h,
            r#"{"id":3,"publish":{"channel":"chat:1","data":{"a":1}}}"#,
        );
        assert!(replies.is_empty(), "acknowledged later by the host");
        assert_eq!(
            h.published,
            vec![(3, "chat:1".into(), "{\"a\":1}|alice".into())]
        );
    }

    #[test]
    fn presence_needs_namespace_option_and_membership() {
        let mut h = FakeHost::new(CFG);
        let mut s = connected(&mut h);
        let (_, r) = send(&mut s, &mut h, r#"{"id":2,"presence":{"channel":"news"}}"#);
        assert_eq!(r[0]["error"]["code"], 108);
        let (_, r) = send(
            &mut s,
            &mut h,
            r#"{"id":3,"presence":{"channel":"chat:1"}}"#,
        );
        assert_eq!(r[0]["error"]["code"], 103);
        send(
            &mut s,
            &mut h,
            r#"{"id":4,"subscribe":{"channel":"chat:1"}}"#,
        )
        .0
        .unwrap();
        let (_, r) = send(
            &mut s,
            &mut h,
            r#"{"id":5,"presence_stats":{"channel":"chat:1"}}"#,
        );
        assert!(r.is_empty());
        assert_eq!(
            h.gathered,
            vec![(5, Deferred::PresenceStats, "chat:1".into())]
        );
    }

    #[test]
    fn not_available_methods_and_malformed_input() {
        let mut h = FakeHost::new(CFG);
        let mut s = connected(&mut h);
        for m in ["history", "rpc"] {
            let (_, r) = send(
                &mut s,
                &mut h,
                &format!(r#"{{"id":9,"{m}":{{"channel":"news"}}}}"#),
            );
            assert_eq!(r[0]["error"]["code"], 108, "{m}");
        }
        let (r, replies) = send(&mut s, &mut h, r#"{"id":6,"subscribe":{"channel":123}}"#);
        r.unwrap();
        assert_eq!(replies[0]["error"]["code"], 107);
        let (r, replies) = send(&mut s, &mut h, r#"{"id":5,"unknown_method":{}}"#);
        r.unwrap();
        assert_eq!(replies[0]["error"]["code"], 104);
        let (r, _) = send(&mut s, &mut h, "not json");
        assert_eq!(r.unwrap_err(), Disconnect::BadRequest);
    }

    #[test]
    fn refresh_extends_expiry_for_same_user_only() {
        let mut h = FakeHost::new(CFG);
        let mut s = connected(&mut h);
        let t = token("alice", Some(5_000), &[]);
        let (_, r) = send(
            &mut s,
            &mut h,
            &format!(r#"{{"id":2,"refresh":{{"token":"{t}"}}}}"#),
        );
        assert_eq!(r[0]["refresh"]["ttl"], 4_000);
        assert_eq!(h.expiry, 5_000);
        let t = token("mallory", Some(5_000), &[]);
        let (res, _) = send(
            &mut s,
            &mut h,
            &format!(r#"{{"id":3,"refresh":{{"token":"{t}"}}}}"#),
        );
        assert_eq!(res.unwrap_err(), Disconnect::InvalidToken);
    }

    #[test]
    fn insecure_allows_anonymous_everything() {
        let mut h = FakeHost::new("insecure = true\n[namespaces.chat]\npresence = true\n");
        let mut s = Session::default();
        let (r, replies) = send(&mut s, &mut h, "{\"id\":1,\"connect\":{}}\n{\"id\":2,\"publish\":{\"channel\":\"news\",\"data\":1}}\n{\"id\":3,\"presence\":{\"channel\":\"chat:x\"}}");
        r.unwrap();
        assert_eq!(replies.len(), 1);
        assert_eq!(h.published.len(), 1);
        assert_eq!(h.gathered.len(), 1);
    }

    #[test]
    fn unsubscribe_and_leave_all() {
        let mut h = FakeHost::new(CFG);
        let mut s = connected(&mut h);
        send(&mut s, &mut h, "{\"id\":2,\"subscribe\":{\"channel\":\"a\"}}\n{\"id\":3,\"subscribe\":{\"channel\":\"b\"}}")
            .0
            .unwrap();
        let (_, r) = send(&mut s, &mut h, r#"{"id":4,"unsubscribe":{"channel":"a"}}"#);
        assert!(r[0]["unsubscribe"].is_object());
        assert_eq!(h.subscribed.len(), 1);
        s.leave_all(&mut h);
        assert!(h.subscribed.is_empty());
    }

    const JL: &str = "token_hmac_secret = \"k\"\n[namespaces.room]\nallow_subscribe_for_client = true\njoin_leave = true\n[namespaces.forced]\nallow_subscribe_for_client = true\njoin_leave = true\nforce_push_join_leave = true\n[namespaces.quiet]\nallow_subscribe_for_client = true\n";

    #[test]
    fn join_leave_flag_is_kept_only_where_the_namespace_has_join_leave_and_does_not_force() {
        let mut h = FakeHost::new(JL);
        let mut s = connected(&mut h);
        let lines = [
            r#"{"id":2,"subscribe":{"channel":"room:a","join_leave":true}}"#,
            r#"{"id":3,"subscribe":{"channel":"room:b"}}"#,
            r#"{"id":4,"subscribe":{"channel":"forced:c","join_leave":true}}"#,
            r#"{"id":5,"subscribe":{"channel":"quiet:d","join_leave":true}}"#,
        ];
        let (r, replies) = send(&mut s, &mut h, &lines.join("\n"));
        r.unwrap();
        assert_eq!(replies.len(), 4, "{replies:?}");
        // The fake host interns channels in order.
        let id = |name: &str| {
            ["room:a", "room:b", "forced:c", "quiet:d"]
                .iter()
                .position(|c| *c == name)
                .unwrap() as ChanId
        };
        let pushes: Vec<(ChanId, bool)> = h.extras.iter().map(|(c, _, p)| (*c, *p)).collect();
        assert_eq!(
            pushes,
            vec![
                (id("room:a"), true),
                (id("room:b"), false),
                (id("forced:c"), false), // everyone gets them there: nothing to keep
                (id("quiet:d"), false),  // no join/leave in that namespace
            ]
        );
        // Joins are announced in join_leave namespaces only, whether or not the client asked.
        assert_eq!(
            h.join_leave_log,
            vec![
                (id("room:a"), true),
                (id("room:b"), true),
                (id("forced:c"), true)
            ]
        );
        h.join_leave_log.clear();
        send(
            &mut s,
            &mut h,
            r#"{"id":6,"unsubscribe":{"channel":"room:b"}}"#,
        )
        .0
        .unwrap();
        assert_eq!(h.join_leave_log, vec![(id("room:b"), false)]);
        s.leave_all(&mut h);
        let mut left = h.join_leave_log[1..].to_vec();
        left.sort();
        let mut want = vec![(id("room:a"), false), (id("forced:c"), false)];
        want.sort();
        assert_eq!(left, want, "a disconnect leaves every join_leave channel");
    }

    #[test]
    fn subscription_token_info_becomes_chan_info() {
        let cfg = format!("{JL}[namespaces.priv]\njoin_leave = true\npresence = true\n");
        let mut h = FakeHost::new(&cfg);
        let mut s = connected(&mut h);
        let tok = crate::protocol::token::sign(
            "k",
            &crate::protocol::token::SubscribeClaims {
                sub: "alice".into(),
                channel: "priv:x".into(),
                exp: None,
                client: String::new(),
                info: Some(RawValue::from_string("{\"role\":\"mod\"}".into()).unwrap()),
            },
        );
        let (r, replies) = send(
            &mut s,
            &mut h,
            &format!(
                r#"{{"id":2,"subscribe":{{"channel":"priv:x","token":"{tok}","join_leave":true}}}}"#
            ),
        );
        r.unwrap();
        assert!(replies[0]["subscribe"].is_object(), "{replies:?}");
        assert_eq!(h.extras, vec![(0, Some("{\"role\":\"mod\"}".into()), true)]);
        // The extra is told before presence and the join, which read it.
        assert_eq!(h.presence_log.len(), 1);
        assert_eq!(h.join_leave_log, vec![(0, true)]);
    }

    #[test]
    fn an_expired_subscription_leaves_with_a_leave_message() {
        let cfg = format!("{JL}[namespaces.priv]\njoin_leave = true\n");
        let mut h = FakeHost::new(&cfg);
        let mut s = connected(&mut h);
        let tok = sub_token("alice", "priv:e", Some(1_100), "");
        let r = subscribe_with(&mut s, &mut h, 2, "priv:e", &tok);
        assert!(r["subscribe"].is_object(), "{r}");
        assert_eq!(h.join_leave_log, vec![(0, true)]);
        h.now = 1_100 + h.cfg.client_expired_sub_close_delay_secs as u64;
        let mut out = Vec::new();
        assert_eq!(s.expire_subscriptions(&mut h, &mut out), 1);
        assert_eq!(h.join_leave_log, vec![(0, true), (0, false)]);
    }

    #[test]
    fn server_side_subscriptions_announce_joins_after_the_connect_reply_and_never_ask() {
        let mut h = FakeHost::new(JL);
        let mut s = Session::default();
        let t = token("alice", None, &["room:s", "quiet:q"]);
        let (r, replies) = send(
            &mut s,
            &mut h,
            &format!(r#"{{"id":1,"connect":{{"token":"{t}"}}}}"#),
        );
        r.unwrap();
        assert!(
            replies[0]["connect"]["subs"]["room:s"].is_object(),
            "{replies:?}"
        );
        assert_eq!(h.extras, vec![(0, None, false), (1, None, false)]);
        assert_eq!(h.join_leave_log, vec![(0, true)]);
    }

    #[test]
    fn presence_joins_and_leaves_only_in_presence_namespaces() {
        let mut h = FakeHost::new(CFG);
        let mut s = connected(&mut h);
        send(&mut s, &mut h, "{\"id\":2,\"subscribe\":{\"channel\":\"chat:1\"}}\n{\"id\":3,\"subscribe\":{\"channel\":\"news\"}}\n{\"id\":4,\"subscribe\":{\"channel\":\"chat:2\"}}")
            .0
            .unwrap();
        send(
            &mut s,
            &mut h,
            r#"{"id":5,"unsubscribe":{"channel":"chat:1"}}"#,
        )
        .0
        .unwrap();
        s.leave_all(&mut h);
        let log: Vec<(&str, bool)> = h
            .presence_log
            .iter()
            .map(|(c, u, j)| {
                assert_eq!(u, "alice");
                (c.as_str(), *j)
            })
            .collect();
        assert_eq!(
            log,
            vec![
                ("chat:1", true),
                ("chat:2", true),
                ("chat:1", false),
                ("chat:2", false)
            ]
        );
    }

    #[test]
    fn rate_limit_answers_111_then_disconnects_persistent_abuse() {
        let mut h = FakeHost::new(&format!("{CFG}[limits]\nmax_refused_commands = 3\n"));
        let mut s = connected(&mut h);
        h.tokens = 1;
        let (r, replies) = send(
            &mut s,
            &mut h,
            "{\"id\":2,\"ping\":{}}\n{}\n{\"id\":3,\"ping\":{}}",
        );
        r.unwrap();
        assert!(replies[0]["ping"].is_object());
        assert_eq!(
            replies[1]["error"]["code"], 111,
            "pongs do not spend tokens"
        );
        assert_eq!(replies[1]["error"]["temporary"], true);
        h.tokens = 1;
        let (r, _) = send(&mut s, &mut h, r#"{"id":4,"ping":{}}"#);
        r.unwrap();
        assert_eq!(
            s.refused_in_a_row, 0,
            "an accepted command resets the count"
        );
        let (r, _) = send(
            &mut s,
            &mut h,
            "{\"id\":5,\"ping\":{}}\n{\"id\":6,\"ping\":{}}",
        );
        r.unwrap();
        let (r, _) = send(&mut s, &mut h, r#"{"id":7,"ping":{}}"#);
        assert_eq!(r.unwrap_err(), Disconnect::TooManyRequests);
        assert_eq!(
            h.refusals
                .iter()
                .filter(|r| **r == Refusal::RateLimited)
                .count(),
            4
        );
    }

    fn sub_token(user: &str, channel: &str, exp: Option<u64>, client: &str) -> String {
        crate::protocol::token::sign(
            "k",
            &crate::protocol::token::SubscribeClaims {
                sub: user.into(),
                channel: channel.into(),
                exp,
                client: client.into(),
                info: None,
            },
        )
    }

    fn subscribe_with(s: &mut Session, h: &mut FakeHost, id: u32, ch: &str, tok: &str) -> Value {
        let (r, replies) = send(
            s,
            h,
            &format!(r#"{{"id":{id},"subscribe":{{"channel":"{ch}","token":"{tok}"}}}}"#),
        );
        r.unwrap();
        replies.into_iter().next().unwrap()
    }

    fn sub_refresh(s: &mut Session, h: &mut FakeHost, id: u32, ch: &str, tok: &str) -> Value {
        let (r, replies) = send(
            s,
            h,
            &format!(r#"{{"id":{id},"sub_refresh":{{"channel":"{ch}","token":"{tok}"}}}}"#),
        );
        r.unwrap();
        replies.into_iter().next().unwrap()
    }

    #[test]
    fn subscription_token_expiry_is_announced_refreshed_and_enforced() {
        let mut h = FakeHost::new(&format!("client_expired_sub_close_delay_secs = 5\n{CFG}"));
        let mut s = connected(&mut h);
        // An expiring token: the reply says so, the host records the deadline.
        let r = subscribe_with(
            &mut s,
            &mut h,
            2,
            "$a",
            &sub_token("alice", "$a", Some(1_060), ""),
        );
        assert_eq!(r["subscribe"]["expires"], true, "{r}");
        assert_eq!(r["subscribe"]["ttl"], 60, "{r}");
        // A token without exp, and a channel without a token: no expiry.
        let r = subscribe_with(&mut s, &mut h, 3, "$b", &sub_token("alice", "$b", None, ""));
        assert!(r["subscribe"].get("expires").is_none(), "{r}");
        let r = subscribe_with(&mut s, &mut h, 4, "news", "");
        assert!(r["subscribe"].get("ttl").is_none(), "{r}");
        assert_eq!(h.sub_expiries.connections(), 1);
        let a = h.channels.iter().position(|c| &**c == "$a").unwrap() as ChanId;
        assert_eq!(h.sub_expiries.get(KEY, a), 1_060);

        // sub_refresh with a new token moves the deadline and answers the new ttl.
        h.now = 1_050;
        let r = sub_refresh(
            &mut s,
            &mut h,
            5,
            "$a",
            &sub_token("alice", "$a", Some(1_120), ""),
        );
        assert_eq!(r["sub_refresh"]["expires"], true, "{r}");
        assert_eq!(r["sub_refresh"]["ttl"], 70, "{r}");
        assert_eq!(h.sub_expiries.get(KEY, a), 1_120);
        // Refused: another channel's token, another user's, another client's, an expired
        // one, a channel not subscribed. The deadline stays.
        let other_client = sub_token("alice", "$a", Some(1_200), "someone-else");
        for (tok, ch, code) in [
            (sub_token("alice", "$b", Some(1_200), ""), "$a", 103),
            (sub_token("bob", "$a", Some(1_200), ""), "$a", 103),
            (other_client, "$a", 103),
            (sub_token("alice", "$a", Some(1_040), ""), "$a", 109),
            (sub_token("alice", "$z", Some(1_200), ""), "$z", 103),
        ] {
            let r = sub_refresh(&mut s, &mut h, 6, ch, &tok);
            assert_eq!(r["error"]["code"], code, "{r}");
        }
        assert_eq!(h.sub_expiries.get(KEY, a), 1_120);
        // A client-bound token for this very client is fine.
        let mine = sub_token(
            "alice",
            "$a",
            Some(1_130),
            "00000000-0000-4000-8000-000000000001",
        );
        let r = sub_refresh(&mut s, &mut h, 7, "$a", &mine);
        assert_eq!(r["sub_refresh"]["ttl"], 80, "{r}");

        // Before exp + delay nothing ends; after it only `$a` does, with push 2501.
        h.now = 1_134;
        let mut out = Vec::new();
        assert_eq!(s.expire_subscriptions(&mut h, &mut out), 0);
        assert!(out.is_empty());
        h.now = 1_135;
        assert_eq!(s.expire_subscriptions(&mut h, &mut out), 1);
        let push: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(push["push"]["channel"], "$a");
        assert_eq!(push["push"]["unsubscribe"]["code"], 2501);
        assert_eq!(
            push["push"]["unsubscribe"]["reason"],
            "subscription expired"
        );
        assert!(s.position(&h, "$a").is_none());
        assert!(s.position(&h, "$b").is_some() && s.position(&h, "news").is_some());
        assert!(!h.subscribed.contains(&a), "left the channel");
        assert_eq!(h.sub_expiries.connections(), 0, "nothing left to expire");
        assert_eq!(
            h.refusals,
            vec![Refusal::SubscriptionExpired],
            "counted once"
        );
        // A refresh without exp ends the expiry; unsubscribing forgets it.
        let r = subscribe_with(
            &mut s,
            &mut h,
            8,
            "$a",
            &sub_token("alice", "$a", Some(1_200), ""),
        );
        assert_eq!(r["subscribe"]["ttl"], 65, "{r}");
        let r = sub_refresh(&mut s, &mut h, 9, "$a", &sub_token("alice", "$a", None, ""));
        assert_eq!(r["sub_refresh"], serde_json::json!({}), "{r}");
        assert_eq!(h.sub_expiries.connections(), 0);
        subscribe_with(
            &mut s,
            &mut h,
            10,
            "$c",
            &sub_token("alice", "$c", Some(1_200), ""),
        );
        assert_eq!(h.sub_expiries.connections(), 1);
        send(
            &mut s,
            &mut h,
            r#"{"id":11,"unsubscribe":{"channel":"$c"}}"#,
        )
        .0
        .unwrap();
        assert_eq!(h.sub_expiries.connections(), 0);
        // An expired token at subscribe: 109, so the SDK gets a new one.
        let r = subscribe_with(
            &mut s,
            &mut h,
            12,
            "$d",
            &sub_token("alice", "$d", Some(1_000), ""),
        );
        assert_eq!(r["error"]["code"], 109, "{r}");
    }

    #[test]
    fn sub_expiries_table() {
        let mut t = SubExpiries::default();
        let k2 = ConnKey {
            slot: 2,
            generation: 1,
        };
        assert_eq!(t.set(KEY, 1, 0), 0, "clearing nothing keeps no entry");
        assert_eq!(t.connections(), 0);
        assert_eq!(t.set(KEY, 1, 50), 50);
        assert_eq!(t.set(KEY, 2, 40), 40);
        assert_eq!(t.set(k2, 1, 70), 70);
        assert_eq!(t.set(KEY, 2, 60), 50, "moved");
        assert_eq!(t.take_due(KEY, 49), (vec![], 50));
        assert_eq!(t.take_due(KEY, 55), (vec![(1, false)], 60));
        assert_eq!(t.set_refresh(KEY, 3, 100, 25), 60, "stored 25 s early");
        assert_eq!(t.get(KEY, 3), 0, "a node refresh is never announced");
        assert_eq!(t.take_due(KEY, 75), (vec![(2, false), (3, true)], 0));
        assert_eq!(t.set(KEY, 2, 60), 60);
        assert_eq!(t.get(KEY, 2), 60);
        assert_eq!(t.set(KEY, 2, 0), 0);
        assert_eq!(t.connections(), 1, "only k2 left");
        t.remove(k2);
        assert_eq!(t.connections(), 0);
    }

    #[test]
    fn secure_defaults_subscribe_only_where_allowed() {
        // Only a secret: no namespace lets clients subscribe by themselves.
        let cfg = "token_hmac_secret = \"k\"\n[namespaces.dm]\nallow_user_limited_channels = true\n[namespaces.open]\nallow_subscribe_for_client = true\n[namespaces.both]\nallow_subscribe_for_client = true\nallow_user_limited_channels = true\n";
        let mut h = FakeHost::new(cfg);
        let mut s = Session::default();
        let t = token("alice", None, &["news"]);
        let (r, replies) = send(
            &mut s,
            &mut h,
            &format!(r#"{{"id":1,"connect":{{"token":"{t}"}}}}"#),
        );
        r.unwrap();
        assert!(
            replies[0]["connect"]["subs"]["news"].is_object(),
            "the connection token's channels need no namespace permission"
        );
        let cases = [
            ("other", 103),
            ("open:1", 0),
            ("#alice", 103),  // `#` means nothing without allow_user_limited_channels
            ("open:#bob", 0), // ... so an open namespace lets anyone in
            ("dm:#alice,bob", 0),
            ("dm:#bob", 103),
            ("both:#bob", 103), // user-limited wins over allow_subscribe_for_client
            ("both:#carol,alice", 0),
            ("dm:plain", 103),
        ];
        for (i, (ch, code)) in cases.iter().enumerate() {
            let r = subscribe_with(&mut s, &mut h, 10 + i as u32, ch, "");
            if *code == 0 {
                assert!(r["subscribe"].is_object(), "{ch}: {r}");
            } else {
                assert_eq!(r["error"]["code"], *code, "{ch}: {r}");
            }
        }
        // A subscription token opens any channel.
        let r = subscribe_with(
            &mut s,
            &mut h,
            30,
            "other",
            &sub_token("alice", "other", None, ""),
        );
        assert!(r["subscribe"].is_object(), "{r}");
    }

    #[test]
    fn audience_and_issuer_are_enforced_on_connect_and_subscribe() {
        let cfg = "token_hmac_secret = \"k\"\ntoken_audience = \"app\"\ntoken_issuer = \"auth\"\n[default_namespace]\nallow_subscribe_for_client = true\n";
        let mut h = FakeHost::new(cfg);
        let sign = |c: Value| crate::protocol::token::sign("k", &c);
        let connect = |h: &mut FakeHost, t: &str| {
            let mut s = Session::default();
            let (r, replies) = send(
                &mut s,
                h,
                &format!(r#"{{"id":1,"connect":{{"token":"{t}"}}}}"#),
            );
            (s, r, replies)
        };
        for bad in [
            serde_json::json!({"sub": "alice"}),
            serde_json::json!({"sub": "alice", "aud": "app"}),
            serde_json::json!({"sub": "alice", "aud": "other", "iss": "auth"}),
            serde_json::json!({"sub": "alice", "aud": "app", "iss": "other"}),
        ] {
            let (_, r, _) = connect(&mut h, &sign(bad.clone()));
            assert_eq!(r.unwrap_err(), Disconnect::InvalidToken, "{bad}");
        }
        let good = sign(serde_json::json!({"sub": "alice", "aud": "app", "iss": "auth"}));
        let (mut s, r, replies) = connect(&mut h, &good);
        r.unwrap();
        assert!(replies[0]["connect"].is_object());
        let no_aud = sign(serde_json::json!({"sub": "alice", "channel": "$p", "iss": "auth"}));
        let r = subscribe_with(&mut s, &mut h, 2, "$p", &no_aud);
        assert_eq!(r["error"]["code"], 103, "{r}");
        let ok =
            sign(serde_json::json!({"sub": "alice", "channel": "$p", "aud": "app", "iss": "auth"}));
        let r = subscribe_with(&mut s, &mut h, 3, "$p", &ok);
        assert!(r["subscribe"].is_object(), "{r}");
        let r = sub_refresh(&mut s, &mut h, 4, "$p", &no_aud);
        assert_eq!(r["error"]["code"], 103, "{r}");
    }

    const PROXY_CFG: &str = "token_hmac_secret = \"k\"\nclient_expired_sub_close_delay_secs = 5\n[proxy]\nconnect_endpoint = \"http://127.0.0.1:9/connect\"\nrefresh_endpoint = \"http://127.0.0.1:9/refresh\"\nsubscribe_endpoint = \"http://127.0.0.1:9/subscribe\"\npublish_endpoint = \"http://127.0.0.1:9/publish\"\nsub_refresh_endpoint = \"http://127.0.0.1:9/sub_refresh\"\nrpc_endpoint = \"http://127.0.0.1:9/rpc\"\ntimeout_ms = 1000\n[namespaces.chat]\nsubscribe_proxy = true\npublish_proxy = true\nsub_refresh_proxy = true\nallow_user_limited_channels = true\n[namespaces.open]\nallow_subscribe_for_client = true\n";

    /// Answers the oldest backend call with `answer` (`None`: the call failed).
    fn answer(
        s: &mut Session,
        h: &mut FakeHost,
        answer: Option<&str>,
    ) -> (Result<(), Ended>, Vec<Value>) {
        let (waiting, _) = h.calls.remove(0);
        let mut out = Vec::new();
        let r = s.proxied(h, waiting, answer.map(str::as_bytes), &mut out);
        let replies = std::str::from_utf8(&out)
            .unwrap()
            .split('\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (r, replies)
    }

    fn proxy_connected(h: &mut FakeHost, result: &str) -> Session {
        let mut s = Session::default();
        let (r, replies) = send(
            &mut s,
            h,
            r#"{"id":1,"connect":{"name":"js","data":{"hi":1}}}"#,
        );
        r.unwrap();
        assert!(replies.is_empty(), "the connect waits for the backend");
        let (r, replies) = answer(&mut s, h, Some(result));
        r.unwrap();
        assert!(replies[0]["connect"].is_object(), "{replies:?}");
        s
    }

    #[test]
    fn connect_without_token_asks_the_connect_proxy() {
        let mut h = FakeHost::new(PROXY_CFG);
        let mut s = Session::default();
        let (r, replies) = send(
            &mut s,
            &mut h,
            r#"{"id":1,"connect":{"name":"js","version":"1","data":{"hi":1}}}"#,
        );
        r.unwrap();
        assert!(replies.is_empty());
        let body = &h.calls[0].1;
        assert_eq!(body["client"], "00000000-0000-4000-8000-000000000001");
        assert_eq!(
            (&body["transport"], &body["protocol"], &body["encoding"]),
            (&"websocket".into(), &"json".into(), &"json".into())
        );
        assert_eq!(
            (&body["name"], &body["version"]),
            (&"js".into(), &"1".into())
        );
        assert_eq!(body["data"], serde_json::json!({"hi":1}));
        assert!(body.get("user").is_none(), "a connect has no user yet");
        // Nothing else may come while it waits.
        let mut other = Session {
            connecting: true,
            ..Default::default()
        };
        let (r, _) = send(&mut other, &mut h, r#"{"id":2,"ping":{}}"#);
        assert_eq!(r, Err(Disconnect::BadRequest));
        let (r, replies) = answer(
            &mut s,
            &mut h,
            Some(
                r#"{"result":{"user":"56","expire_at":1100,"info":{"n":1},"data":{"welcome":true},"channels":["open:a"],"subs":{"open:b":{"data":{"x":1}}}}}"#,
            ),
        );
        r.unwrap();
        let c = &replies[0]["connect"];
        assert_eq!(replies[0]["id"], 1);
        assert_eq!(c["client"], "00000000-0000-4000-8000-000000000001");
        assert_eq!(c["data"], serde_json::json!({"welcome":true}));
        assert!(
            c.get("expires").is_none(),
            "the node refreshes it, not the client: {c}"
        );
        assert_eq!(
            c["subs"]["open:b"]["data"],
            serde_json::json!({"x":1}),
            "{c}"
        );
        assert!(c["subs"]["open:a"].is_object(), "{c}");
        let ident = s.identity.as_ref().unwrap();
        assert_eq!(
            (&*ident.user, ident.info.as_ref().unwrap().get()),
            ("56", r#"{"n":1}"#)
        );
        assert!(ident.server_refresh);
        assert_eq!(
            h.refresh_at, 1100,
            "refreshed at expire_at, without a grace delay"
        );
        assert!(!s.connecting);
    }

    #[test]
    fn connect_proxy_refusals_reach_the_client() {
        let mut h = FakeHost::new(PROXY_CFG);
        for (ans, want) in [
            (
                Some(r#"{"disconnect":{"code":4501,"reason":"unauthorized"}}"#),
                Err(Ended::Backend {
                    code: 4501,
                    reason: "unauthorized".into(),
                }),
            ),
            (
                Some(r#"{"error":{"code":1000,"message":"custom"}}"#),
                Ok(r#"{"code":1000,"message":"custom"}"#),
            ),
            (
                None,
                Ok(r#"{"code":100,"message":"internal server error","temporary":true}"#),
            ),
            (
                Some("garbage"),
                Ok(r#"{"code":100,"message":"internal server error","temporary":true}"#),
            ),
            (
                Some(r#"{"result":{"user":"a","expire_at":999}}"#),
                Ok(r#"{"code":109,"message":"token expired"}"#),
            ),
        ] {
            let mut s = Session::default();
            send(&mut s, &mut h, r#"{"id":7,"connect":{}}"#).0.unwrap();
            let (r, replies) = answer(&mut s, &mut h, ans);
            match want {
                Err(e) => assert_eq!(r, Err(e)),
                Ok(err) => {
                    r.unwrap();
                    assert_eq!(replies[0]["id"], 7);
                    assert_eq!(
                        replies[0]["error"],
                        serde_json::from_str::<Value>(err).unwrap(),
                        "{ans:?}"
                    );
                    assert!(s.identity.is_none() && !s.connecting);
                }
            }
        }
        // A token still works beside the proxy, and the proxy's bound answers 100 at once.
        let mut s = connected(&mut h);
        assert!(s.identity.as_ref().is_some_and(|i| !i.server_refresh));
        h.broker_full = true;
        let (r, replies) = send(&mut s, &mut h, r#"{"id":3,"rpc":{"method":"m"}}"#);
        r.unwrap();
        assert_eq!(replies[0]["error"]["code"], 100);
        assert_eq!(replies[0]["error"]["temporary"], true);
    }

    #[test]
    fn subscribe_proxy_decides_and_its_data_reaches_the_client() {
        let mut h = FakeHost::new(PROXY_CFG);
        let mut s = proxy_connected(&mut h, r#"{"result":{"user":"56"}}"#);
        let (r, replies) = send(
            &mut s,
            &mut h,
            r#"{"id":2,"subscribe":{"channel":"chat:a","data":{"q":1}}}"#,
        );
        r.unwrap();
        assert!(replies.is_empty());
        let body = h.calls[0].1.clone();
        assert_eq!(
            (&body["user"], &body["channel"], &body["data"]),
            (&"56".into(), &"chat:a".into(), &serde_json::json!({"q":1}))
        );
        // A second subscribe to the same channel while the first waits.
        let (_, replies) = send(
            &mut s,
            &mut h,
            r#"{"id":3,"subscribe":{"channel":"chat:a"}}"#,
        );
        assert_eq!(replies[0]["error"]["code"], 105);
        let (r, replies) = answer(
            &mut s,
            &mut h,
            Some(r#"{"result":{"data":{"granted":"chat:a"},"expire_at":1050}}"#),
        );
        r.unwrap();
        assert_eq!(replies[0]["id"], 2);
        assert_eq!(
            replies[0]["subscribe"]["data"],
            serde_json::json!({"granted":"chat:a"})
        );
        assert!(
            replies[0]["subscribe"].get("expires").is_none(),
            "refreshed by the node"
        );
        assert_eq!(s.subs.len(), 1);
        // Refused by the backend: its error as it is; user-limited channels decide themselves.
        send(
            &mut s,
            &mut h,
            r#"{"id":4,"subscribe":{"channel":"chat:forbidden"}}"#,
        )
        .0
        .unwrap();
        let (_, replies) = answer(
            &mut s,
            &mut h,
            Some(r#"{"error":{"code":403,"message":"permission denied"}}"#),
        );
        assert_eq!(
            replies[0]["error"],
            serde_json::json!({"code":403,"message":"permission denied"})
        );
        let (_, replies) = send(
            &mut s,
            &mut h,
            r##"{"id":5,"subscribe":{"channel":"chat:#56"}}"##,
        );
        assert!(
            replies[0]["subscribe"].is_object() && h.calls.is_empty(),
            "{replies:?}"
        );
        // Unsubscribed while waiting: the answer is dropped by the host.
        send(
            &mut s,
            &mut h,
            r#"{"id":6,"subscribe":{"channel":"chat:b"}}"#,
        )
        .0
        .unwrap();
        send(
            &mut s,
            &mut h,
            r#"{"id":7,"unsubscribe":{"channel":"chat:b"}}"#,
        )
        .0
        .unwrap();
        assert!(h.calls.is_empty());
        // Its expiry comes: the node asks sub_refresh; `expired` ends it with 2501.
        h.now = 1_050;
        let mut out = Vec::new();
        assert_eq!(
            s.expire_subscriptions(&mut h, &mut out),
            0,
            "still there while asked"
        );
        assert_eq!(h.calls[0].1["channel"], "chat:a");
        let (_, replies) = answer(&mut s, &mut h, Some(r#"{"result":{"expire_at":1200}}"#));
        assert!(replies.is_empty());
        assert_eq!(h.sub_expiries.connections(), 1);
        h.now = 1_200;
        assert_eq!(s.expire_subscriptions(&mut h, &mut out), 0);
        let (_, replies) = answer(&mut s, &mut h, Some(r#"{"result":{"expired":true}}"#));
        assert_eq!(
            replies[0]["push"]["unsubscribe"]["code"], 2501,
            "{replies:?}"
        );
        assert_eq!(s.subs.len(), 1, "only the user-limited channel is left");
    }

    #[test]
    fn publish_proxy_may_replace_the_data_and_rpc_goes_to_the_backend() {
        let mut h = FakeHost::new(PROXY_CFG);
        let mut s = proxy_connected(&mut h, r#"{"result":{"user":"56"}}"#);
        send(
            &mut s,
            &mut h,
            r#"{"id":2,"publish":{"channel":"chat:a","data":{"text":"hi"}}}"#,
        )
        .0
        .unwrap();
        assert_eq!(h.calls[0].1["data"], serde_json::json!({"text":"hi"}));
        assert!(
            h.published.is_empty(),
            "nothing published before the backend agrees"
        );
        answer(
            &mut s,
            &mut h,
            Some(r#"{"result":{"data":{"text":"HI","by":"56"}}}"#),
        )
        .0
        .unwrap();
        assert_eq!(
            h.published,
            [(2, "chat:a".into(), r#"{"text":"HI","by":"56"}|56"#.into())]
        );
        send(
            &mut s,
            &mut h,
            r#"{"id":3,"publish":{"channel":"chat:a","data":1}}"#,
        )
        .0
        .unwrap();
        answer(&mut s, &mut h, Some(r#"{"result":{}}"#)).0.unwrap();
        assert_eq!(
            h.published[1].2, "1|56",
            "kept when the backend does not replace it"
        );
        send(
            &mut s,
            &mut h,
            r#"{"id":4,"rpc":{"method":"echo","data":{"a":[1]}}}"#,
        )
        .0
        .unwrap();
        let body = h.calls[0].1.clone();
        assert_eq!(
            (&body["method"], &body["data"], &body["user"]),
            (&"echo".into(), &serde_json::json!({"a":[1]}), &"56".into())
        );
        let (_, replies) = answer(&mut s, &mut h, Some(r#"{"result":{"data":{"a":[1]}}}"#));
        assert_eq!(
            replies[0],
            serde_json::json!({"id":4,"rpc":{"data":{"a":[1]}}})
        );
        send(&mut s, &mut h, r#"{"id":5,"rpc":{"method":"bye"}}"#)
            .0
            .unwrap();
        let (r, _) = answer(
            &mut s,
            &mut h,
            Some(r#"{"disconnect":{"code":4500,"reason":"bye"}}"#),
        );
        assert_eq!(
            r,
            Err(Ended::Backend {
                code: 4500,
                reason: "bye".into()
            })
        );
        // Without an RPC endpoint: not available, as before.
        let mut h = FakeHost::new(CFG);
        let mut s = connected(&mut h);
        let (_, replies) = send(&mut s, &mut h, r#"{"id":2,"rpc":{"method":"m"}}"#);
        assert_eq!(replies[0]["error"]["code"], 108);
    }

    #[test]
    fn the_node_refreshes_proxy_connections_through_the_refresh_proxy() {
        let mut h = FakeHost::new(PROXY_CFG);
        let mut s = proxy_connected(&mut h, r#"{"result":{"user":"56","expire_at":1010}}"#);
        h.now = 1_010;
        assert!(s.refresh_due(&mut h), "asked, and stays meanwhile");
        assert_eq!(h.calls[0].1["user"], "56");
        assert!(h.refresh_at >= 1_020, "the deadline moved past the call");
        answer(
            &mut s,
            &mut h,
            Some(r#"{"result":{"expire_at":1100,"info":{"v":2}}}"#),
        )
        .0
        .unwrap();
        assert_eq!(h.refresh_at, 1_100);
        assert_eq!(
            s.identity.as_ref().unwrap().info.as_ref().unwrap().get(),
            r#"{"v":2}"#
        );
        // No answer: kept, tried again later.
        h.now = 1_100;
        assert!(s.refresh_due(&mut h));
        answer(&mut s, &mut h, None).0.unwrap();
        assert_eq!(h.refresh_at, 1_110);
        assert!(s.refresh_due(&mut h));
        let (r, _) = answer(&mut s, &mut h, Some(r#"{"result":{"expired":true}}"#));
        assert_eq!(r, Err(Ended::Protocol(Disconnect::Expired)));
        // A token connection is not refreshed by the node.
        let mut s = connected(&mut h);
        assert!(!s.refresh_due(&mut h));
    }
}
