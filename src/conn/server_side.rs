//! What the server API does to a session: subscribe it to a channel (`/api/subscribe`,
//! announced by a subscribe push instead of a reply) and move or end its expiry
//! (`/api/refresh`, announced by a refresh push).
//!
//! Called by the shard for each of the user's local connections when the command reaches it
//! (every node, through the broker). Like the rest of the session: no I/O, no await; pushes
//! are appended to the caller's buffer, what needs the broker goes through the [`Host`].

use super::session::{Ack, Host, Recovery, Refusal, Session};
use crate::bus::{ServerSubscribe, StreamPos};
use crate::protocol::reply;
use crate::protocol::Disconnect;
use serde_json::value::RawValue;
use std::rc::Rc;

/// Longest expiry `/api/refresh` sets, seconds from now (Centrifugo's bound: ten years).
pub const MAX_REFRESH_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// A subscription made by the server API: announced with a subscribe push carrying this data.
/// Held by a subscriber that waits for the broker (the shard sends the push when it is in).
#[derive(Debug, Default)]
pub struct ServerPush {
    pub data: Option<Box<RawValue>>,
}

/// A server API command for one connection.
#[derive(Debug, Clone, Copy)]
pub enum ServerCommand<'a> {
    Subscribe(&'a ServerSubscribe),
    /// New expiry, Unix seconds (0 = never).
    Refresh {
        expire_at: u64,
    },
}

impl Session {
    /// Applies a server API command; pushes for the client are appended to `out`. An error
    /// is the disconnect the connection ends with.
    pub fn server_command(
        &mut self,
        host: &mut dyn Host,
        cmd: ServerCommand<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), Disconnect> {
        match cmd {
            ServerCommand::Subscribe(sub) => {
                self.server_subscribe(host, sub, out);
                Ok(())
            }
            ServerCommand::Refresh { expire_at } => self.server_refresh(host, expire_at, out),
        }
    }

    /// Subscribes the connection to `sub.channel` unless it is already in it (or waiting for
    /// the subscribe proxy), is not connected, or has `limits.max_channels_per_connection`
    /// channels (counted as a channel limit refusal). The subscribe push
    /// (`{"push":{"channel":C,"subscribe":{..}}}`: `recoverable`, `positioned`, `epoch`,
    /// `offset` in a history channel, `data`) goes to `out` when the shard knows the
    /// position, else the shard sends it once the broker answered. With `sub.since` the
    /// publications after that position follow the push as publication pushes; when they
    /// cannot all be recovered the connection is not subscribed (a subscribe push has no
    /// `recovered` flag to tell the client it missed some).
    fn server_subscribe(&mut self, host: &mut dyn Host, sub: &ServerSubscribe, out: &mut Vec<u8>) {
        let channel = sub.channel.as_str();
        let Some(ident) = self.identity.as_ref() else {
            return;
        };
        let Some(ns) = host.config().namespace_of(channel) else {
            return;
        };
        let (history, recover, presence, join_leave) =
            (ns.has_history(), ns.recover, ns.presence, ns.join_leave);
        let already = self.subs.iter().any(|&c| &*host.channel_name(c) == channel);
        if already || host.proxy_waits(channel) {
            return;
        }
        if self.subs.len() >= host.config().limits.max_channels_per_connection {
            host.refused(Refusal::ChannelLimit);
            return;
        }
        let since = sub
            .since
            .as_ref()
            .filter(|_| recover)
            .map(|(offset, epoch)| StreamPos {
                offset: *offset,
                epoch: Arc::from(epoch.as_str()),
            });
        let recovery = Recovery {
            history,
            recoverable: recover,
            reject_unrecovered: since.is_some(),
            since,
            connect: false,
            server_push: Some(Rc::new(ServerPush {
                data: sub.data.clone(),
            })),
        };
        let Ok((chan, ack)) = host.subscribe(0, channel, &recovery) else {
            return;
        };
        self.subs.push(chan);
        host.set_sub_expiry(chan, 0);
        if presence {
            host.presence_changed(channel, ident, true);
        }
        // Like a server-side subscription: announced to the others; it gets join/leave pushes
        // itself only where the namespace forces them.
        if join_leave {
            host.join_leave(chan, ident, true);
        }
        if let Ack::Now(mut result) = ack {
            result.data = sub.data.clone();
            reply::subscribe_push(out, channel, &result);
        }
    }

    /// Moves the connection's expiry to `expire_at` (at most [`MAX_REFRESH_TTL_SECS`] from
    /// now) with a refresh push (`expires` and `ttl`), or takes it away (`expire_at` 0: a
    /// refresh push without them); a time already past ends the connection as expired.
    fn server_refresh(
        &mut self,
        host: &mut dyn Host,
        expire_at: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), Disconnect> {
        if self.identity.is_none() {
            return Ok(());
        }
        let now = host.unix_now();
        if expire_at == 0 {
            host.set_expiry(0);
            reply::refresh_push(out, 0);
            return Ok(());
        }
        if expire_at <= now {
            return Err(Disconnect::Expired);
        }
        let expire_at = expire_at.min(now + MAX_REFRESH_TTL_SECS);
        host.set_expiry(expire_at);
        reply::refresh_push(out, (expire_at - now).min(u32::MAX as u64) as u32);
        Ok(())
    }
}

use std::sync::Arc;
