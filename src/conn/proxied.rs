//! The session's side of the backend proxies: what a command waits for while its hook runs
//! ([`Awaiting`]), and how the backend's answer finishes it ([`Session::proxied`]). The node's
//! own refreshes (connection and subscription expiry, when the backend let them in) start here
//! too.
//!
//! The session never awaits: it hands the host a request body and a [`Awaiting`], and the host
//! calls [`Session::proxied`] with the answer (or without one: timeout, refused connection,
//! non-200 status, malformed body, all already logged and counted by the host). A client's
//! command then gets the temporary error 100, as Centrifugo answers, so the SDK retries.

use super::session::{ChanId, ClientId, Grant, Granted, Host, Session};
use crate::bus::StreamPos;
use crate::protocol::command::{ConnectRequest, ConnectSub};
use crate::protocol::proxy::{self, Answer, ProxyKind};
use crate::protocol::reply::{self, ClientInfo};
use crate::protocol::{Disconnect, ErrorCode};
use serde_json::value::RawValue;
use std::collections::HashMap;

/// Seconds before a refresh the backend did not answer is tried again (the connection or
/// subscription stays meanwhile). At least the proxy timeout plus one second.
pub const REFRESH_RETRY_SECS: u64 = 10;

/// A command (or the node's own refresh) waiting for its proxy's answer.
#[derive(Debug)]
pub enum Awaiting {
    Connect {
        id: u32,
        client: ClientId,
        /// The client's recovery positions of server-side subscriptions.
        subs: Box<HashMap<String, ConnectSub>>,
    },
    Refresh,
    Subscribe {
        id: u32,
        channel: String,
        since: Option<StreamPos>,
        reject_unrecovered: bool,
    },
    Publish {
        id: u32,
        channel: String,
        /// The client's data, published when the backend does not replace it.
        data: Box<RawValue>,
    },
    SubRefresh {
        channel: String,
    },
    Rpc {
        id: u32,
    },
    /// A connect whose token names a `kid` the token key set lacks, waiting for the set to
    /// be fetched (no proxy hook: the host fetches `token_jwks_url`).
    Keys {
        id: u32,
        token: String,
        subs: Box<HashMap<String, ConnectSub>>,
    },
}

impl Awaiting {
    /// The backend call this waits for.
    pub fn kind(&self) -> ProxyKind {
        match self {
            Awaiting::Connect { .. } => ProxyKind::Connect,
            Awaiting::Refresh => ProxyKind::Refresh,
            Awaiting::Subscribe { .. } => ProxyKind::Subscribe,
            Awaiting::Publish { .. } => ProxyKind::Publish,
            Awaiting::SubRefresh { .. } => ProxyKind::SubRefresh,
            Awaiting::Rpc { .. } => ProxyKind::Rpc,
            Awaiting::Keys { .. } => ProxyKind::Jwks,
        }
    }

    /// The channel a subscribe waits for (to refuse a second subscribe meanwhile).
    pub fn subscribing(&self) -> Option<&str> {
        match self {
            Awaiting::Subscribe { channel, .. } => Some(channel),
            _ => None,
        }
    }
}

/// How a connection must end after a proxy answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// A code of the client protocol.
    Protocol(Disconnect),
    /// The backend's own disconnect (code 4000..=4999 and reason).
    Backend { code: u16, reason: String },
}

impl From<Disconnect> for Ended {
    fn from(d: Disconnect) -> Self {
        Ended::Protocol(d)
    }
}

/// Reads the answer; `None` when there is none or it is malformed (logged).
fn read<T: for<'de> serde::Deserialize<'de>>(
    hook: ProxyKind,
    body: Option<&[u8]>,
) -> Option<Answer<T>> {
    match proxy::parse(body?) {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::warn!(proxy = hook.label(), error = %e, "malformed proxy answer");
            None
        }
    }
}

/// The reply to command `id` when the backend refused or failed; `Err` to close.
fn refuse<T>(answer: Option<Answer<T>>, id: u32, out: &mut Vec<u8>) -> Result<Option<T>, Ended> {
    match answer {
        None => {
            reply::error(out, id, ErrorCode::Internal, true);
            Ok(None)
        }
        Some(Answer::Error {
            code,
            message,
            temporary,
        }) => {
            reply::custom_error(out, id, code, &message, temporary);
            Ok(None)
        }
        Some(Answer::Disconnect { code, reason }) => Err(Ended::Backend { code, reason }),
        Some(Answer::Result(r)) => Ok(Some(r)),
    }
}

impl Session {
    /// Finishes what waited for a proxy: `body` is the answer's body (HTTP 200), or `None`
    /// when the call failed. Replies go to `out`.
    pub fn proxied(
        &mut self,
        host: &mut dyn Host,
        waiting: Awaiting,
        body: Option<&[u8]>,
        out: &mut Vec<u8>,
    ) -> Result<(), Ended> {
        let hook = waiting.kind();
        match waiting {
            Awaiting::Keys { id, token, subs } => {
                // The key set was fetched (or could not be): the connect runs again, and a
                // `kid` still unknown with no fetch allowed is an invalid token.
                self.connecting = false;
                let request = ConnectRequest {
                    token: token.into(),
                    subs: *subs,
                    ..Default::default()
                };
                self.connect(host, id, &request, out)
                    .map_err(Ended::Protocol)
            }
            Awaiting::Connect { id, client, subs } => {
                self.connecting = false;
                let answer = read::<proxy::ConnectResult>(hook, body);
                let Some(r) = refuse(answer, id, out)? else {
                    return Ok(());
                };
                let now = host.unix_now();
                if r.expire_at != 0 && r.expire_at <= now {
                    reply::error(out, id, ErrorCode::TokenExpired, false);
                    return Ok(());
                }
                // `channels`, then the channels only `subs` names, each with its `data`.
                let mut subs_opts = r.subs;
                let mut channels: Vec<super::session::ServerSub<'_>> = (r.channels.iter())
                    .map(|c| match subs_opts.remove(c) {
                        Some(o) => (c.as_str(), o.data, o.info),
                        None => (c.as_str(), None, None),
                    })
                    .collect();
                channels.extend(
                    subs_opts
                        .iter_mut()
                        .map(|(c, o)| (c.as_str(), o.data.take(), o.info.take())),
                );
                let grant = Grant {
                    user: &r.user,
                    client,
                    exp: r.expire_at,
                    info: r.info,
                    channels,
                    data: r.data,
                    server_refresh: true,
                };
                self.establish(host, id, grant, &subs, out)
                    .map_err(Ended::Protocol)
            }
            Awaiting::Refresh => {
                let now = host.unix_now();
                match read::<proxy::RefreshResult>(hook, body) {
                    Some(Answer::Result(r))
                        if r.expired || (r.expire_at != 0 && r.expire_at <= now) =>
                    {
                        Err(Ended::Protocol(Disconnect::Expired))
                    }
                    Some(Answer::Result(r)) => {
                        host.set_refresh_at(r.expire_at);
                        if let (Some(info), Some(ident)) = (r.info, self.identity.as_mut()) {
                            ident.info = Some(info);
                        }
                        Ok(())
                    }
                    // No answer, an error or a disconnect: the connection stays, and the
                    // refresh is tried again later.
                    _ => {
                        host.set_refresh_at(now + retry_secs(host));
                        Ok(())
                    }
                }
            }
            Awaiting::Subscribe {
                id,
                channel,
                since,
                reject_unrecovered,
            } => {
                let answer = read::<proxy::SubscribeResult>(hook, body);
                let Some(r) = refuse(answer, id, out)? else {
                    return Ok(());
                };
                if self.identity.is_none() {
                    return Ok(());
                }
                if self.subs.len() >= host.config().limits.max_channels_per_connection {
                    reply::error(out, id, ErrorCode::LimitExceeded, false);
                    return Ok(());
                }
                // The backend decides; the request's `join_leave` is not honoured here (as in
                // Centrifugo): only `force_push_join_leave` gives these subscribers the pushes.
                let granted = Granted {
                    exp: r.expire_at,
                    server_refresh: true,
                    data: r.data,
                    chan_info: r.info,
                    push_join_leave: false,
                };
                match self.subscribe_granted(host, id, &channel, since, reject_unrecovered, granted)
                {
                    Ok(super::session::Ack::Now(result)) => {
                        reply::result(out, id, "subscribe", &result)
                    }
                    Ok(super::session::Ack::Later) => {}
                    Err((code, temporary)) => reply::error(out, id, code, temporary),
                }
                Ok(())
            }
            Awaiting::Publish { id, channel, data } => {
                let answer = read::<proxy::PublishResult>(hook, body);
                let Some(r) = refuse(answer, id, out)? else {
                    return Ok(());
                };
                let Some(ident) = self.identity.as_ref() else {
                    return Ok(());
                };
                let info = ClientInfo {
                    user: ident.user.to_string(),
                    client: ident.client.to_string(),
                    conn_info: ident.info.clone(),
                    chan_info: None,
                };
                let data = r.data.unwrap_or(data);
                if let Err(code) = host.publish(id, &channel, &data, info) {
                    reply::error(out, id, code, code == ErrorCode::Internal);
                }
                Ok(())
            }
            Awaiting::Rpc { id } => {
                let answer = read::<proxy::RpcResult>(hook, body);
                if let Some(r) = refuse(answer, id, out)? {
                    let result = reply::RpcResult {
                        data: r.data.as_deref(),
                    };
                    reply::result(out, id, "rpc", &result);
                }
                Ok(())
            }
            Awaiting::SubRefresh { channel } => {
                let Some(pos) = self
                    .subs
                    .iter()
                    .position(|&c| *host.channel_name(c) == *channel)
                else {
                    return Ok(()); // unsubscribed meanwhile
                };
                let chan = self.subs[pos];
                let now = host.unix_now();
                match read::<proxy::RefreshResult>(hook, body) {
                    Some(Answer::Result(r))
                        if r.expired || (r.expire_at != 0 && r.expire_at <= now) =>
                    {
                        self.end_expired(host, chan, out.len(), out);
                    }
                    Some(Answer::Result(r)) => host.set_sub_refresh(chan, r.expire_at),
                    _ => host.set_sub_refresh(chan, now + retry_secs(host)),
                }
                Ok(())
            }
        }
    }

    /// The connection's expiry came. One the backend let in is refreshed through the refresh
    /// proxy (true: it stays while the call runs); any other ends (false).
    pub fn refresh_due(&mut self, host: &mut dyn Host) -> bool {
        let Some(ident) = self.identity.as_ref() else {
            return false;
        };
        if !ident.server_refresh || host.config().proxy.refresh_endpoint.is_none() {
            return false;
        }
        let client = ident.client.to_string();
        let mut body = proxy::Request::new(&client, host.transport());
        body.user = Some(&ident.user);
        let body = body.to_vec();
        // Until the answer sets the new expiry, the connection stays; without an answer the
        // refresh is tried again.
        let now = host.unix_now();
        host.set_refresh_at(now + retry_secs(host));
        if let Err(e) = host.proxy(Awaiting::Refresh, body) {
            tracing::debug!(error = ?e, "refresh proxy call not started; retried later");
        }
        true
    }

    /// A subscription the backend let in expired: refresh it through the sub_refresh proxy
    /// when its namespace asks for that (true: it stays while the call runs).
    pub(super) fn refresh_subscription(&mut self, host: &mut dyn Host, chan: ChanId) -> bool {
        let Some(ident) = self.identity.as_ref() else {
            return false;
        };
        let name = host.channel_name(chan);
        let wanted = host
            .config()
            .namespace_of(&name)
            .is_some_and(|ns| ns.sub_refresh_proxy);
        if !wanted || host.config().proxy.sub_refresh_endpoint.is_none() {
            return false;
        }
        let client = ident.client.to_string();
        let mut body = proxy::Request::new(&client, host.transport());
        body.user = Some(&ident.user);
        body.channel = Some(&name);
        let body = body.to_vec();
        let now = host.unix_now();
        host.set_sub_refresh(chan, now + retry_secs(host));
        let waiting = Awaiting::SubRefresh {
            channel: name.to_string(),
        };
        if let Err(e) = host.proxy(waiting, body) {
            tracing::debug!(error = ?e, "sub_refresh proxy call not started; retried later");
        }
        true
    }
}

/// Seconds until an unanswered refresh is tried again.
fn retry_secs(host: &dyn Host) -> u64 {
    let timeout = host.config().proxy.timeout_ms.div_ceil(1000);
    REFRESH_RETRY_SECS.max(timeout + 1)
}
