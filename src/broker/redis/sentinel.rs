//! Redis Sentinel (`redis_sentinel`, `redis_sentinel_master`): before each (re)connect of the
//! link the sentinels are asked in turn for the master's address ([`Mux::discover`]); while the
//! link is up one connection to a sentinel listens to `+switch-master` ([`Mux::watch_switch`])
//! and ends the link when our master moved, so that it reconnects to the new one through the
//! ordinary reconnect path (resubscribe, repair history channels, `recovered: false` where
//! writes were lost).

use super::backoff::Backoff;
use super::link::Handshake;
use super::mux::Mux;
use super::resp::{encode, next_frame};
use crate::config::RedisTarget;
use futures_lite::AsyncWriteExt;
use redis_protocol::resp2::types::BytesFrame;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A frame's text (bulk or simple string), if it is one.
pub(super) fn text(frame: &BytesFrame) -> Option<String> {
    match frame {
        BytesFrame::BulkString(b) | BytesFrame::SimpleString(b) => {
            Some(String::from_utf8_lossy(b).into_owned())
        }
        _ => None,
    }
}

/// The master's new address in a `+switch-master` message
/// (`<name> <old-ip> <old-port> <new-ip> <new-port>`), if it is about `master`.
pub(super) fn switched_to(message: &str, master: &str) -> Option<(String, u16)> {
    let parts: Vec<&str> = message.split_ascii_whitespace().collect();
    match parts.as_slice() {
        [name, _, _, ip, port] if *name == master => Some((ip.to_string(), port.parse().ok()?)),
        _ => None,
    }
}

/// Whether the link moves to another master: `previous` is the master the link had, or before
/// the first discovery a placeholder (the first sentinel's URL), which is no move.
fn moved(previous: &RedisTarget, master: &RedisTarget, sentinels: &[RedisTarget]) -> bool {
    fn at(t: &RedisTarget) -> (&str, u16) {
        (t.host.as_str(), t.port)
    }
    let first_discovery = sentinels.iter().any(|s| at(s) == at(previous));
    !first_discovery && at(previous) != at(master)
}

impl Mux {
    /// Asks the sentinels in turn for the master's address; the first answer wins. The master is
    /// reached with the credentials, database and TLS of the sentinel URL that named it.
    ///
    /// Counts a failover (`redis_failovers`) when the master named differs from the one the
    /// link had: every move to a new master, whether `+switch-master` ended the link or the
    /// link broke and the sentinels named another master, passes through here exactly once.
    pub(super) async fn discover(&self) -> Result<RedisTarget, String> {
        let mut errors = Vec::new();
        for s in &self.cfg.redis_sentinel {
            match self.ask_sentinel(s).await {
                Ok(master) => {
                    if moved(&self.target.borrow(), &master, &self.cfg.redis_sentinel) {
                        self.node.redis_failovers.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            host = %master.host,
                            port = master.port,
                            "Sentinel names a new Redis master; following it"
                        );
                    }
                    return Ok(master);
                }
                Err(e) => errors.push(format!("sentinel {}:{}: {e}", s.host, s.port)),
            }
        }
        Err(errors.join("; "))
    }

    async fn ask_sentinel(&self, sentinel: &RedisTarget) -> Result<RedisTarget, String> {
        let name = self.cfg.redis_sentinel_master.as_bytes();
        let (mut stream, mut buf) = self
            .connect_to(sentinel, "sentinel", Handshake::Sentinel)
            .await?;
        let mut ask = Vec::new();
        encode(&mut ask, &[b"SENTINEL", b"get-master-addr-by-name", name]);
        stream.write_all(&ask).await.map_err(|e| e.to_string())?;
        let timeout = Duration::from_millis(self.cfg.redis_options.connect_timeout_ms as u64);
        let frame = futures_lite::future::or(next_frame(&mut stream, &mut buf), async {
            glommio::timer::sleep(timeout).await;
            Err("no answer in time".to_string())
        })
        .await?;
        match frame {
            BytesFrame::Array(items) if items.len() == 2 => {
                let host = text(&items[0]).ok_or("bad answer")?;
                let port = text(&items[1])
                    .and_then(|p| p.parse().ok())
                    .ok_or("bad port in the answer")?;
                Ok(RedisTarget {
                    host,
                    port,
                    ..sentinel.clone()
                })
            }
            BytesFrame::Error(e) => Err(format!("refused: {e}")),
            _ => Err(format!(
                "does not know the master `{}`",
                self.cfg.redis_sentinel_master
            )),
        }
    }

    /// The reconnect backoff's pause: `delay`, cut short under Sentinel when a sentinel
    /// announces `+switch-master` for our master meanwhile. Without it a node whose master died
    /// would find the promoted replica only at its next backoff step (seconds later, the steps
    /// having grown while the sentinels still named the dead master).
    pub(super) async fn pause(&self, delay: Duration) {
        if self.cfg.redis_sentinel.is_empty() {
            return glommio::timer::sleep(delay).await;
        }
        futures_lite::future::or(glommio::timer::sleep(delay), self.switch_heard()).await
    }

    /// A connection to `sentinel` subscribed to `+switch-master`, if it can be had.
    async fn listen_switches(
        &self,
        sentinel: &RedisTarget,
    ) -> Option<(super::stream::RedisStream, bytes::BytesMut)> {
        let (mut stream, buf) = self
            .connect_to(sentinel, "sentinel", Handshake::Sentinel)
            .await
            .ok()?;
        let mut sub = Vec::new();
        encode(&mut sub, &[b"SUBSCRIBE", b"+switch-master"]);
        stream.write_all(&sub).await.ok()?;
        Some((stream, buf))
    }

    /// Returns when a sentinel announces `+switch-master` for our master; never if no sentinel
    /// can be reached (then [`Mux::pause`]'s delay ends the wait). A switch announced before
    /// the subscription is missed: the backoff's delay covers it, as without this.
    async fn switch_heard(&self) {
        let master = &self.cfg.redis_sentinel_master;
        for sentinel in &self.cfg.redis_sentinel {
            let Some((mut stream, mut buf)) = self.listen_switches(sentinel).await else {
                continue;
            };
            while let Ok(BytesFrame::Array(items)) = next_frame(&mut stream, &mut buf).await {
                if items.first().and_then(text).as_deref() == Some("message") {
                    let message = items.get(2).and_then(text).unwrap_or_default();
                    if switched_to(&message, master).is_some() {
                        return;
                    }
                }
            }
        }
        std::future::pending::<()>().await
    }

    /// Listens to `+switch-master` on one sentinel after another (with the link's backoff
    /// between failures) until the sentinels announce that our master, now at `current`, moved;
    /// returns the reason to end the link.
    pub(super) async fn watch_switch(&self, current: &RedisTarget) -> String {
        let opts = &self.cfg.redis_options;
        let mut backoff = Backoff::new(opts.backoff_initial_ms, opts.backoff_max_ms);
        let master = &self.cfg.redis_sentinel_master;
        loop {
            for sentinel in &self.cfg.redis_sentinel {
                let Some((mut stream, mut buf)) = self.listen_switches(sentinel).await else {
                    continue;
                };
                backoff.reset();
                // The master may have moved before we subscribed: check once subscribed.
                let mut confirmed = false;
                while let Ok(frame) = next_frame(&mut stream, &mut buf).await {
                    let BytesFrame::Array(items) = frame else {
                        break;
                    };
                    let kind = items.first().and_then(text).unwrap_or_default();
                    if kind == "subscribe" && !confirmed {
                        confirmed = true;
                        if let Ok(now) = self.ask_sentinel(sentinel).await {
                            if (now.host.as_str(), now.port)
                                != (current.host.as_str(), current.port)
                            {
                                return format!(
                                    "Sentinel names a new master at {}:{}",
                                    now.host, now.port
                                );
                            }
                        }
                    } else if kind == "message" {
                        let message = items.get(2).and_then(text).unwrap_or_default();
                        if let Some((host, port)) = switched_to(&message, master) {
                            if (host.as_str(), port) != (current.host.as_str(), current.port) {
                                return format!("+switch-master: the master is now {host}:{port}");
                            }
                        }
                    }
                }
                tracing::warn!(
                    host = %sentinel.host,
                    port = sentinel.port,
                    "lost the Sentinel connection that follows +switch-master; trying the next"
                );
            }
            glommio::timer::sleep(backoff.next_delay()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(port: u16) -> RedisTarget {
        RedisTarget {
            host: "127.0.0.1".into(),
            port,
            username: None,
            password: None,
            db: 0,
            tls: false,
        }
    }

    #[test]
    fn a_failover_is_a_move_from_one_master_to_another() {
        let sentinels = [target(26379), target(26380)];
        // The first discovery replaces the placeholder (the first sentinel): no failover.
        assert!(!moved(&target(26379), &target(6379), &sentinels));
        // The same master again (a reconnect after a network blip): no failover.
        assert!(!moved(&target(6379), &target(6379), &sentinels));
        // Another master: a failover.
        assert!(moved(&target(6379), &target(6380), &sentinels));
    }

    #[test]
    fn switch_master_messages_are_parsed_for_our_master_only() {
        assert_eq!(
            switched_to("mymaster 127.0.0.1 6379 127.0.0.1 6380", "mymaster"),
            Some(("127.0.0.1".to_string(), 6380))
        );
        assert_eq!(
            switched_to("other 127.0.0.1 6379 127.0.0.1 6380", "mymaster"),
            None
        );
        assert_eq!(switched_to("mymaster 1 2 3", "mymaster"), None);
        assert_eq!(
            switched_to("mymaster 1.1.1.1 1 2.2.2.2 notaport", "mymaster"),
            None
        );
    }
}
