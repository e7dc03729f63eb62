//! Every knob of a node: its unit, its default and the reason for the default.
//!
//! A [`Config`] is read from TOML (`--config FILE`), then the command-line flags override it, then
//! [`Config::validate`] rejects anything inconsistent with a message that names the bad key. The
//! validated value is shared read-only (`Arc`) by every thread; nothing here changes at run time.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

/// Errors found while loading or validating a configuration. Each names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The TOML did not parse or had a key of the wrong type or an unknown key.
    #[error("invalid config file {path}: {message}")]
    Parse { path: String, message: String },
    /// A value is out of range or inconsistent with another one.
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        problem: problem.into(),
    }
}

/// The whole node configuration. Field names are the TOML keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address every shard listens on (SO_REUSEPORT). Port 0 picks a free port shared by all shards.
    pub listen: SocketAddr,
    /// Number of shards (glommio executors, one per core). 0 = one per online CPU.
    pub shards: usize,
    /// Pin each shard to its core (shard i on the i-th online CPU, modulo the CPU count).
    pub pin_shards: bool,
    /// listen(2) backlog of each shard's socket, in connections.
    pub backlog: u32,
    /// Redis URL `redis://[user:password@]host:port[/db]`; empty = standalone (memory broker).
    pub redis: String,
    /// Redis mode tuning.
    pub redis_options: RedisOptions,
    /// HS256 secret that connection and subscription tokens are signed with.
    pub token_hmac_secret: String,
    /// Key the HTTP API requires in `X-API-Key` (or `Authorization: apikey KEY`). Empty = API off.
    pub api_key: String,
    /// Development only: anonymous connect, and every client may subscribe, publish and query
    /// presence in every channel.
    pub insecure: bool,
    /// Name of this node in `/api/info` (default: the host name).
    pub name: String,
    /// Log format on stderr: `text` or `json` (one object per line).
    pub log_format: LogFormat,
    /// How subscribers are told to recover when the node lost publications it cannot repair:
    /// `unsubscribe` (push 2500 on that channel only; the SDKs resubscribe with their
    /// position) or `disconnect` (close 3010; the client reconnects and recovers every
    /// channel, for clients that do not know the unsubscribe push).
    pub insufficient_state: InsufficientAction,
    /// Internal address for `/metrics` (Prometheus), `/status` and `/status.json`; empty = off.
    /// Keep it off the public network.
    pub metrics_listen: String,
    /// Seconds a connection may stay after its token's `exp` before it is closed with 3005, so
    /// that the SDK's refresh (sent when the announced `ttl` runs out) has time to arrive.
    pub client_expired_close_delay_secs: u32,
    /// Path of a WebSocket echo endpoint for conformance runs (Autobahn); empty = off. Never
    /// enable it in production: it echoes whatever it gets.
    pub conformance_echo_path: String,
    /// Graceful shutdown on SIGTERM/SIGINT.
    pub drain: DrainConfig,
    /// Client heartbeats.
    pub ping: PingConfig,
    /// Bounds on every buffer and queue.
    pub limits: Limits,
    /// Options of channels without a `namespace:` prefix.
    pub default_namespace: NamespaceOptions,
    /// Options of `name:` prefixed channels, keyed by namespace name.
    pub namespaces: BTreeMap<String, NamespaceOptions>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8000".parse().expect("static address"),
            shards: 0,
            pin_shards: true,
            backlog: 4096,
            redis: String::new(),
            redis_options: RedisOptions::default(),
            token_hmac_secret: String::new(),
            api_key: String::new(),
            insecure: false,
            name: String::new(),
            log_format: LogFormat::Text,
            metrics_listen: "127.0.0.1:9101".into(),
            client_expired_close_delay_secs: 25,
            insufficient_state: InsufficientAction::Unsubscribe,
            conformance_echo_path: String::new(),
            drain: DrainConfig::default(),
            ping: PingConfig::default(),
            limits: Limits::default(),
            default_namespace: NamespaceOptions::default(),
            namespaces: BTreeMap::new(),
        }
    }
}

/// See [`Config::insufficient_state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InsufficientAction {
    Unsubscribe,
    Disconnect,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// How a node uses Redis (only read in Redis mode).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisOptions {
    /// Prefix of every key and channel name, so several deployments can share one Redis.
    pub prefix: String,
    /// Seconds a node's registry lease lives without refresh; a dead node's presence entries
    /// stop counting once it lapses.
    pub lease_ttl_secs: u32,
    /// Seconds between lease refreshes (well below the TTL).
    pub lease_refresh_secs: u32,
    /// Seconds a channel's presence hash lives after its last change (a safety net: entries of
    /// dead nodes are already ignored and removed when read).
    pub presence_ttl_secs: u32,
    /// Milliseconds to establish a Redis connection.
    pub connect_timeout_ms: u32,
    /// First reconnect delay, milliseconds; doubles per failed attempt, with jitter.
    pub backoff_initial_ms: u32,
    /// Largest reconnect delay, milliseconds.
    pub backoff_max_ms: u32,
    /// CPU to pin the multiplexer to; -1 = the first CPU no shard uses, unpinned if none is
    /// free.
    pub cpu: i32,
    /// Seconds the multiplexer keeps a channel's recent publications in memory after a
    /// recovery read them from Redis, so a reconnect storm costs one stream read per channel
    /// per node. At most `history_size` publications per channel; 0 = no cache.
    pub recovery_cache_secs: u32,
    /// Bytes every channel's recovery cache may hold together; a cache that would pass it is
    /// dropped (its next recovery reads the stream), counted as `recovery_cache_full`.
    pub recovery_cache_max_bytes: usize,
    /// Live publications of one channel held while its stream is being read (gap repair,
    /// recovery), so they go out after the repaired range in order. Over it, the channel's
    /// subscribers are told to recover (insufficient state, counted as `repair_overflows`).
    pub max_held_publications: usize,
    /// Bytes encoded for one Redis connection and not yet written to its socket (Redis not
    /// reading fast enough). Over it, on the command connection: the command is refused and
    /// its requester answered at once with a temporary error (a publish gets error 100); on the
    /// subscriber connection: the connection is reset (reconnected, everything resubscribed in
    /// one command, history channels repaired). Counted as `redis_write_queue_full`. In Redis
    /// mode it must hold the largest publication: at least twice `limits.max_message_bytes` and
    /// `limits.max_api_body_bytes`.
    pub max_write_queue_bytes: usize,
    /// Commands on the command connection waiting for Redis's reply. Over it: the command is
    /// refused and its requester answered at once with a temporary error, counted as
    /// `redis_replies_full`. The node's own stream reads (one per history channel at most) are
    /// not refused.
    pub max_pending_replies: usize,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            prefix: "shardcast".into(),
            lease_ttl_secs: 10,
            lease_refresh_secs: 3,
            presence_ttl_secs: 3600,
            connect_timeout_ms: 2000,
            backoff_initial_ms: 100,
            backoff_max_ms: 5000,
            cpu: -1,
            recovery_cache_secs: 30,
            recovery_cache_max_bytes: 64 * 1024 * 1024,
            max_held_publications: 10_000,
            // 16 MiB: Redis drains megabytes per millisecond, so a queue this deep means it is
            // stalled, and 8 of the largest API publications still fit.
            max_write_queue_bytes: 16 * 1024 * 1024,
            // As deep as the shards → broker queue: a full inbox of publishes fits in flight.
            max_pending_replies: 65_536,
        }
    }
}

/// The shutdown protocol: `/healthz` fails first, listeners close after `listener_grace_secs`,
/// connections are told to reconnect (3001) in paced, shuffled batches over `window_secs`, and
/// the process exits once they are gone or at `deadline_secs` at the latest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// Seconds between `/healthz` turning 503 and the listeners closing, so load balancers see
    /// the 503 (new upgrades are refused with 503 meanwhile).
    pub listener_grace_secs: u32,
    /// Seconds over which connections are told to reconnect, so they do not all land on the
    /// other nodes at once.
    pub window_secs: u32,
    /// Seconds after the signal at which whatever is left is closed and the process exits.
    pub deadline_secs: u32,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            listener_grace_secs: 2,
            window_secs: 10,
            deadline_secs: 30,
        }
    }
}

/// App-level ping/pong of the Centrifugo protocol.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PingConfig {
    /// Seconds between server pings `{}`. The SDKs reconnect when no ping comes within this
    /// interval plus their own grace (10 s in centrifuge-js), so it is announced in the connect reply.
    pub interval_secs: u32,
    /// Seconds a client has to answer a ping before it is closed with 3012 "no pong".
    pub pong_timeout_secs: u32,
}

impl Default for PingConfig {
    fn default() -> Self {
        // Centrifugo's defaults: SDKs and proxies (60 s idle timeouts) are tuned for them.
        PingConfig {
            interval_secs: 25,
            pong_timeout_secs: 8,
        }
    }
}

/// Bounds. Every one has a unit in its name and an overflow policy named in its comment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest WebSocket message a client may send (after reassembly of fragments), bytes.
    /// Over it: close 1009 (message too big).
    pub max_message_bytes: usize,
    /// Largest HTTP request head (request line and headers), bytes. Over it: HTTP 431.
    pub max_request_head_bytes: usize,
    /// Largest HTTP API request body, bytes. Over it: HTTP 413.
    pub max_api_body_bytes: usize,
    /// Bytes a connection may have queued for writing. Over it: disconnect 3008 "slow".
    pub max_outbox_bytes: usize,
    /// Channels one connection may be subscribed to. Over it: error 106 "limit exceeded".
    pub max_channels_per_connection: usize,
    /// Longest channel name, bytes. Over it: error 107 "bad request".
    pub max_channel_name_bytes: usize,
    /// Connections a node holds. Over it: HTTP 503 before the upgrade, so SDKs back off.
    pub max_connections: usize,
    /// Seconds from accept to a complete request head (and, for the API, body). Over it: closed.
    pub handshake_timeout_secs: u32,
    /// Messages the shards → broker queue holds. Full: the command gets a temporary error 100.
    pub broker_queue_capacity: usize,
    /// Commands per second a connection may send on average (token bucket refill rate).
    /// Over it: error 111 "too many requests".
    pub command_rate_per_sec: u32,
    /// Commands a connection may send in a burst (token bucket size).
    pub command_burst: u32,
    /// Refused commands in a row before the connection is closed with 3013 (persistent abuse).
    pub max_refused_commands: u32,
    /// Messages each broker → shard queue holds. Full: the broker waits (backpressure), so a
    /// full broker queue then turns publishes into temporary errors instead of losing them.
    pub shard_queue_capacity: usize,
    /// Seconds an `/api/publish` `idempotency_key` is remembered: a repeat within the window
    /// is answered with the first publication's result and not published again.
    pub idempotency_window_secs: u32,
    /// Idempotency keys the standalone broker remembers at most; when full the oldest is
    /// forgotten early (counted as `idempotency_evictions`). Redis expires its keys itself.
    pub max_idempotency_keys: usize,
    /// Standalone: bytes of publications every channel's history may hold together. Past it
    /// the history of the channels published to least recently is dropped (their positions
    /// stay, so recovering from them reports `recovered: false`), counted as
    /// `history_evictions`. In Redis mode Redis holds history (bound it with `maxmemory`).
    pub max_history_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 * 1024,
            max_request_head_bytes: 8 * 1024,
            max_api_body_bytes: 1024 * 1024,
            max_outbox_bytes: 1024 * 1024,
            max_channels_per_connection: 128,
            max_channel_name_bytes: 255,
            max_connections: 1_000_000,
            handshake_timeout_secs: 10,
            broker_queue_capacity: 65_536,
            command_rate_per_sec: 50,
            command_burst: 100,
            max_refused_commands: 50,
            shard_queue_capacity: 65_536,
            idempotency_window_secs: 300,
            max_idempotency_keys: 100_000,
            max_history_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Per-namespace channel options (names follow Centrifugo's where the meaning is the same).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceOptions {
    /// Clients may subscribe without a subscription token.
    pub allow_subscribe_for_client: bool,
    /// Clients may publish into channels of this namespace.
    pub allow_publish_for_client: bool,
    /// Keep presence (who is subscribed) for channels of this namespace.
    pub presence: bool,
    /// Any connected client may query presence; otherwise only subscribers of the channel.
    pub allow_presence_for_client: bool,
    /// Publications kept per channel for history and recovery; 0 = no history (publications
    /// carry no offset). Bounded: the oldest are trimmed (Redis: `MAXLEN ~`, so a few more may
    /// stay until the next trim).
    pub history_size: u32,
    /// Seconds a channel's history lives after its last publication (Redis key TTL).
    pub history_ttl_secs: u32,
    /// Seconds a channel's stream position (epoch and top offset) outlives its history. While
    /// it lives offsets continue and the epoch stays; once it is gone the next publication
    /// starts a new epoch, and every older position is unrecoverable.
    pub history_meta_ttl_secs: u32,
    /// Subscribers may recover what they missed (`recover` + offset + epoch on subscribe);
    /// needs `history_size` > 0.
    pub recover: bool,
    /// Any connected client may read history; otherwise only subscribers of the channel.
    pub allow_history_for_client: bool,
}

impl NamespaceOptions {
    /// Whether channels of this namespace keep a history (and so carry offsets).
    pub fn has_history(&self) -> bool {
        self.history_size > 0
    }
}

impl Default for NamespaceOptions {
    fn default() -> Self {
        NamespaceOptions {
            allow_subscribe_for_client: true,
            allow_publish_for_client: false,
            presence: false,
            allow_presence_for_client: false,
            history_size: 0,
            history_ttl_secs: 300,
            history_meta_ttl_secs: 30 * 24 * 3600,
            recover: false,
            allow_history_for_client: false,
        }
    }
}

impl Config {
    /// Reads a TOML file; unknown keys are errors so that typos do not pass silently.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<text>".into(),
            message: e.to_string().trim().to_string(),
        })
    }

    /// Checks ranges and cross-field consistency; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.shards > crate::bus::MAX_SHARDS {
            return Err(invalid(
                "shards",
                format!("must be at most {}", crate::bus::MAX_SHARDS),
            ));
        }
        if self.backlog == 0 {
            return Err(invalid("backlog", "must be at least 1"));
        }
        if !self.redis.is_empty() {
            crate::broker::redis::RedisTarget::parse(&self.redis)
                .map_err(|e| invalid("redis", e))?;
        }
        let r = &self.redis_options;
        if r.prefix.is_empty() || r.prefix.contains(['{', '}', ' ']) {
            return Err(invalid(
                "redis_options.prefix",
                "must be non-empty, without braces or spaces",
            ));
        }
        if r.lease_refresh_secs == 0 || r.lease_refresh_secs >= r.lease_ttl_secs {
            return Err(invalid(
                "redis_options.lease_refresh_secs",
                "must be at least 1 and below redis_options.lease_ttl_secs",
            ));
        }
        if r.backoff_initial_ms == 0 || r.backoff_initial_ms > r.backoff_max_ms {
            return Err(invalid(
                "redis_options.backoff_initial_ms",
                "must be at least 1 and at most redis_options.backoff_max_ms",
            ));
        }
        if r.connect_timeout_ms == 0 || r.presence_ttl_secs == 0 {
            return Err(invalid(
                "redis_options",
                "connect_timeout_ms and presence_ttl_secs must be at least 1",
            ));
        }
        if r.max_held_publications == 0 {
            return Err(invalid(
                "redis_options.max_held_publications",
                "must be at least 1",
            ));
        }
        if r.max_pending_replies == 0 {
            return Err(invalid(
                "redis_options.max_pending_replies",
                "must be at least 1",
            ));
        }
        let largest = self
            .limits
            .max_message_bytes
            .max(self.limits.max_api_body_bytes);
        if !self.redis.is_empty() && r.max_write_queue_bytes < largest.saturating_mul(2) {
            return Err(invalid(
                "redis_options.max_write_queue_bytes",
                "must be at least twice limits.max_message_bytes and limits.max_api_body_bytes",
            ));
        }
        let namespaces =
            std::iter::once(("default_namespace".to_string(), &self.default_namespace)).chain(
                self.namespaces
                    .iter()
                    .map(|(n, o)| (format!("namespaces.{n}"), o)),
            );
        for (key, ns) in namespaces {
            if ns.recover && !ns.has_history() {
                return Err(invalid(
                    &format!("{key}.recover"),
                    "needs history_size above 0",
                ));
            }
            if ns.has_history() && (ns.history_ttl_secs == 0 || ns.history_size > 1_000_000) {
                return Err(invalid(
                    &format!("{key}.history_size"),
                    "needs history_ttl_secs above 0 and at most 1000000 publications",
                ));
            }
            if ns.has_history() && ns.history_meta_ttl_secs < ns.history_ttl_secs {
                return Err(invalid(
                    &format!("{key}.history_meta_ttl_secs"),
                    "must be at least history_ttl_secs",
                ));
            }
        }
        if self.limits.idempotency_window_secs == 0 || self.limits.max_idempotency_keys == 0 {
            return Err(invalid(
                "limits.idempotency_window_secs",
                "idempotency_window_secs and max_idempotency_keys must be at least 1",
            ));
        }
        if !self.insecure && self.token_hmac_secret.is_empty() {
            return Err(invalid(
                "token_hmac_secret",
                "is required unless `insecure` is set (clients could not authenticate)",
            ));
        }
        if self.drain.listener_grace_secs + self.drain.window_secs >= self.drain.deadline_secs {
            return Err(invalid(
                "drain.deadline_secs",
                "must exceed drain.listener_grace_secs + drain.window_secs",
            ));
        }
        if self.ping.interval_secs == 0 {
            return Err(invalid("ping.interval_secs", "must be at least 1"));
        }
        if self.ping.pong_timeout_secs == 0 {
            return Err(invalid("ping.pong_timeout_secs", "must be at least 1"));
        }
        if self.ping.pong_timeout_secs >= self.ping.interval_secs {
            return Err(invalid(
                "ping.pong_timeout_secs",
                "must be below ping.interval_secs",
            ));
        }
        let l = &self.limits;
        let positive: [(&str, usize); 12] = [
            (
                "limits.command_rate_per_sec",
                l.command_rate_per_sec as usize,
            ),
            ("limits.command_burst", l.command_burst as usize),
            (
                "limits.max_refused_commands",
                l.max_refused_commands as usize,
            ),
            ("limits.max_message_bytes", l.max_message_bytes),
            ("limits.max_request_head_bytes", l.max_request_head_bytes),
            ("limits.max_api_body_bytes", l.max_api_body_bytes),
            ("limits.max_outbox_bytes", l.max_outbox_bytes),
            (
                "limits.max_channels_per_connection",
                l.max_channels_per_connection,
            ),
            ("limits.max_channel_name_bytes", l.max_channel_name_bytes),
            ("limits.max_connections", l.max_connections),
            ("limits.broker_queue_capacity", l.broker_queue_capacity),
            ("limits.shard_queue_capacity", l.shard_queue_capacity),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if l.max_message_bytes > 16 * 1024 * 1024 {
            return Err(invalid(
                "limits.max_message_bytes",
                "must be at most 16 MiB",
            ));
        }
        if l.max_request_head_bytes < 512 {
            return Err(invalid(
                "limits.max_request_head_bytes",
                "must be at least 512",
            ));
        }
        if l.max_outbox_bytes < l.max_message_bytes {
            return Err(invalid(
                "limits.max_outbox_bytes",
                "must be at least limits.max_message_bytes",
            ));
        }
        if l.handshake_timeout_secs == 0 {
            return Err(invalid(
                "limits.handshake_timeout_secs",
                "must be at least 1",
            ));
        }
        for name in self.namespaces.keys() {
            let ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
            if !ok {
                return Err(invalid(
                    &format!("namespaces.{name}"),
                    "namespace names use letters, digits, '_', '-' and '.' only",
                ));
            }
        }
        Ok(())
    }

    /// The options of the namespace a channel belongs to, or `None` for an unknown namespace.
    pub fn namespace_of(&self, channel: &str) -> Option<&NamespaceOptions> {
        match channel.split_once(':') {
            Some((ns, _)) => self.namespaces.get(ns),
            None => Some(&self.default_namespace),
        }
    }

    /// Shard count after resolving 0 to the number of online CPUs.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(crate::bus::MAX_SHARDS)
        }
    }

    /// The node name shown in `/api/info`.
    pub fn node_name(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "shardcast".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_with_a_secret() {
        let c = Config {
            token_hmac_secret: "s".into(),
            ..Config::default()
        };
        c.validate().unwrap();
        assert_eq!(c.limits.max_message_bytes, 65536);
        assert_eq!(c.backlog, 4096);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("listen = \"127.0.0.1:1\"\n[limits]\nmax_mesage_bytes = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_mesage_bytes"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::from_toml("shards = \"two\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("shards"), "{err}");
    }

    #[test]
    fn bad_value_names_key() {
        let mut c = Config::from_toml(
            "insecure = true\n[ping]\ninterval_secs = 5\npong_timeout_secs = 9\n",
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("ping.pong_timeout_secs"), "{err}");
        c.ping.pong_timeout_secs = 2;
        c.validate().unwrap();
        c.insecure = false;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("token_hmac_secret"), "{err}");
    }

    #[test]
    fn history_options_are_checked_and_dev_config_is_valid() {
        let bad = [
            ("[namespaces.f]\nrecover = true\n", "namespaces.f.recover"),
            (
                "[namespaces.f]\nhistory_size = 5\nhistory_ttl_secs = 0\n",
                "namespaces.f.history_size",
            ),
            (
                "[default_namespace]\nhistory_size = 5\nhistory_ttl_secs = 60\nhistory_meta_ttl_secs = 10\n",
                "default_namespace.history_meta_ttl_secs",
            ),
        ];
        for (toml, key) in bad {
            let c = Config::from_toml(&format!("insecure = true\n{toml}")).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
        let dev =
            Config::from_file(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/dev.toml"))).unwrap();
        dev.validate().unwrap();
        let feed = dev.namespace_of("feed:x").unwrap();
        assert!(feed.has_history() && feed.recover);
    }

    #[test]
    fn redis_queue_bounds_are_checked() {
        let base = "insecure = true\nredis = \"redis://127.0.0.1:6379\"\n";
        let c = Config::from_toml(base).unwrap();
        c.validate().unwrap();
        assert_eq!(c.redis_options.max_write_queue_bytes, 16 * 1024 * 1024);
        assert_eq!(c.redis_options.max_pending_replies, 65_536);
        let bad = [
            (
                "[redis_options]\nmax_pending_replies = 0\n",
                "redis_options.max_pending_replies",
            ),
            (
                "[redis_options]\nmax_write_queue_bytes = 2097151\n",
                "redis_options.max_write_queue_bytes",
            ),
        ];
        for (toml, key) in bad {
            let c = Config::from_toml(&format!("{base}{toml}")).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
        // Standalone: the Redis queue bound is not used, so not checked against the limits.
        let c = Config::from_toml("insecure = true\n[redis_options]\nmax_write_queue_bytes = 1\n")
            .unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn namespaces_resolve() {
        let c = Config::from_toml(
            "insecure = true\n[namespaces.chat]\nallow_publish_for_client = true\npresence = true\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert!(c.namespace_of("chat:1").unwrap().allow_publish_for_client);
        assert!(!c.namespace_of("news").unwrap().allow_publish_for_client);
        assert!(c.namespace_of("nope:1").is_none());
    }
}
