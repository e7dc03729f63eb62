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
    /// Where Redis is (TOML key and `--redis`: a URL, see [`RedisTarget::parse`]); `None` =
    /// standalone (memory broker). An empty string in the file also means standalone.
    #[serde(deserialize_with = "redis_url")]
    pub redis: Option<RedisTarget>,
    /// Redis Sentinel (TOML key `redis_sentinel`, flag `--redis-sentinel` comma-separated):
    /// the sentinels' URLs, asked in turn for the address of `redis_sentinel_master`. Each
    /// URL's user, password and TLS (`rediss://`) are used for that sentinel and for the master
    /// it names; its database number selects the master's database. Empty = no Sentinel.
    /// Mutually exclusive with `redis`.
    #[serde(deserialize_with = "redis_sentinel_urls")]
    pub redis_sentinel: Vec<RedisTarget>,
    /// The master name the sentinels monitor (`sentinel monitor NAME ...`); required with
    /// `redis_sentinel`. Default "".
    pub redis_sentinel_master: String,
    /// Redis Cluster (TOML key `redis_cluster`, flag `--redis-cluster` comma-separated): seed
    /// nodes' URLs, asked in turn for the topology (`CLUSTER SHARDS`). Their user, password and
    /// TLS (`rediss://`, with the `redis_options.tls_*` settings) apply to every cluster node;
    /// no database other than 0. Empty = no Cluster. Mutually exclusive with `redis` and
    /// `redis_sentinel`.
    #[serde(deserialize_with = "redis_cluster_urls")]
    pub redis_cluster: Vec<RedisTarget>,
    /// Redis mode tuning.
    pub redis_options: RedisOptions,
    /// HMAC secret for HS256/HS384/HS512 connection and subscription tokens. Empty = HMAC
    /// tokens are refused.
    pub token_hmac_secret: String,
    /// Path of a PEM RSA public key (`PUBLIC KEY` or `RSA PUBLIC KEY` block, at least 2048 bits)
    /// for RS256/384/512 and PS256/384/512 tokens. Read once at start. Empty (the default) = off.
    pub token_rsa_public_key_file: String,
    /// Path of a PEM ECDSA public key (`PUBLIC KEY` block, P-256 for ES256 or P-384 for ES384)
    /// for ES256/ES384 tokens. Read once at start. Empty (the default) = off.
    pub token_ecdsa_public_key_file: String,
    /// URL (`http://` or `https://`; `proxy.ca_file` for a private CA) of a JWK Set whose RSA
    /// and EC keys verify tokens that name them in their `kid` header. Each shard keeps the last
    /// good set: a fetch that fails or returns no usable key changes nothing. Empty (the
    /// default) = off.
    pub token_jwks_url: String,
    /// Seconds, at least 1: the least time between two fetches of `token_jwks_url` that were
    /// not the first one (a token with a `kid` the set lacks, or a retry of a failed periodic
    /// refresh). Default 10: a key rotated in at the identity provider is picked up by the first
    /// token that names it, while a flood of tokens with made-up `kid`s costs each shard at most
    /// one request per 10 s at the provider (over the limit the token is refused, counted).
    pub token_jwks_min_fetch_interval_secs: u32,
    /// Seconds between periodic fetches of `token_jwks_url`, so that keys the provider
    /// withdrew stop verifying; 0 = fetch only at start and for unknown `kid`s. Default 3600,
    /// the lifetime Centrifugo gives a cached JWK. At least `token_jwks_min_fetch_interval_secs`.
    pub token_jwks_refresh_interval_secs: u32,
    /// When set, connection and subscription tokens must carry this `aud` (a string, or a list
    /// holding it); others are refused (connect: close 3500, subscribe: error 103). Empty = `aud`
    /// is not checked.
    pub token_audience: String,
    /// When set, connection and subscription tokens must carry this `iss`; others are refused
    /// like a wrong audience. Empty = `iss` is not checked.
    pub token_issuer: String,
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
    /// Seconds a subscription made with an expiring subscription token stays after the token's
    /// `exp` without a `sub_refresh`; then the connection is unsubscribed from that channel
    /// only, with unsubscribe code 2501 "subscription expired" (the SDKs get a new token and
    /// subscribe again). The SDKs refresh when the announced `ttl` runs out, so the delay
    /// covers their round trip to the application for a new token.
    pub client_expired_sub_close_delay_secs: u32,
    /// Path of a WebSocket echo endpoint for conformance runs (Autobahn); empty = off. Never
    /// enable it in production: it echoes whatever it gets.
    pub conformance_echo_path: String,
    /// Origins (besides the node's own host) whose pages may open a WebSocket to the node, as
    /// in Centrifugo: `"*"` (any), or `scheme://host[:port]` with `*` in the host part matching
    /// any run of characters (`"https://*.example.com"`). An upgrade whose `Origin` is neither
    /// the request's own `Host` nor a listed pattern gets HTTP 403 before the 101 (counted as
    /// `origin_refusals`); a request without `Origin` (a non-browser client) passes. Empty
    /// (the default) = same host only.
    pub allowed_origins: Vec<String>,
    /// Graceful shutdown on SIGTERM/SIGINT.
    pub drain: DrainConfig,
    /// Client heartbeats.
    pub ping: PingConfig,
    /// Bounds on every buffer and queue.
    pub limits: Limits,
    /// Each shard's io_uring for WebSocket I/O: its size and its receive buffers.
    pub ring: RingConfig,
    /// Options of channels without a `namespace:` prefix.
    pub default_namespace: NamespaceOptions,
    /// Options of `name:` prefixed channels, keyed by namespace name.
    pub namespaces: BTreeMap<String, NamespaceOptions>,
    /// The backend proxies (connect, refresh, subscribe, publish, sub_refresh, rpc) and the
    /// outbound HTTP client that calls them ([`crate::backend`]).
    pub proxy: ProxyConfig,
    /// The transports besides `/connection/websocket`, each off until enabled.
    pub transports: TransportsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8000".parse().expect("static address"),
            shards: 0,
            pin_shards: true,
            backlog: 4096,
            redis: None,
            redis_sentinel: Vec::new(),
            redis_sentinel_master: String::new(),
            redis_cluster: Vec::new(),
            redis_options: RedisOptions::default(),
            token_hmac_secret: String::new(),
            token_rsa_public_key_file: String::new(),
            token_ecdsa_public_key_file: String::new(),
            token_jwks_url: String::new(),
            token_jwks_min_fetch_interval_secs: 10,
            token_jwks_refresh_interval_secs: 3600,
            token_audience: String::new(),
            token_issuer: String::new(),
            api_key: String::new(),
            insecure: false,
            name: String::new(),
            log_format: LogFormat::Text,
            metrics_listen: "127.0.0.1:9101".into(),
            client_expired_close_delay_secs: 25,
            client_expired_sub_close_delay_secs: 25,
            insufficient_state: InsufficientAction::Unsubscribe,
            conformance_echo_path: String::new(),
            allowed_origins: Vec::new(),
            drain: DrainConfig::default(),
            transports: TransportsConfig::default(),
            ping: PingConfig::default(),
            limits: Limits::default(),
            ring: RingConfig::default(),
            default_namespace: NamespaceOptions::default(),
            namespaces: BTreeMap::new(),
            proxy: ProxyConfig::default(),
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

/// Where Redis is: `redis://[[user]:password@]host[:port][/db]`, or `rediss://...` for TLS
/// (checked against `redis_options.tls_ca_file`, the server name being the URL's host), parsed
/// once when the configuration is read (TOML key `redis`, flag `--redis`).
///
/// The user name and password are percent-decoded (RFC 3986), so a password holding reserved
/// characters is written percent-encoded (`+` as `%2B`, `&` as `%26`, `@` as `%40`, `:` as `%3A`,
/// `%` as `%25`, ...). Only the `redis` and `rediss` schemes are accepted and no query keys: an
/// unknown one would otherwise be silently ignored. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTarget {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: u32,
    /// `rediss://`: both connections go over TLS.
    pub tls: bool,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("db", &self.db)
            .field("tls", &self.tls)
            .finish()
    }
}

impl RedisTarget {
    /// Parses a Redis URL. The error says what is wrong and names the offending part (scheme,
    /// query key, ...), never the password.
    pub fn parse(text: &str) -> Result<RedisTarget, String> {
        // The scheme first: another scheme's URL may not even parse as ours.
        let scheme = text.split_once(':').map_or("", |(s, _)| s);
        let is_scheme = !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
        if is_scheme
            && !scheme.eq_ignore_ascii_case("redis")
            && !scheme.eq_ignore_ascii_case("rediss")
        {
            return Err(format!(
                "has the unsupported scheme `{scheme}` (only redis:// and rediss:// are supported)"
            ));
        }
        let url = url::Url::parse(text).map_err(|e| format!("is not a URL ({e})"))?;
        let tls = match url.scheme() {
            "redis" => false,
            "rediss" => true,
            _ => return Err("must start with redis:// or rediss://".into()),
        };
        if let Some((key, _)) = url.query_pairs().next() {
            return Err(format!(
                "has the unsupported query key `{key}` (no query keys are supported)"
            ));
        }
        if url.query().is_some() {
            return Err("has an empty query (`?`); remove it".into());
        }
        if url.fragment().is_some() {
            return Err("has a fragment (`#`): percent-encode `#` in a password as %23".into());
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("has no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let db = match url.path().trim_start_matches('/') {
            "" => 0,
            p => p
                .parse()
                .map_err(|_| format!("has a bad database number `{p}`"))?,
        };
        // `Url` keeps the userinfo percent-encoded; decode it as RFC 3986 says (not as a form,
        // which would turn `+` into a space).
        let decode = |part: &str, what: &str| {
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| format!("has a {what} that is not UTF-8 once percent-decoded"))
        };
        let username = Some(decode(url.username(), "user name")?).filter(|u| !u.is_empty());
        let password = match url.password() {
            Some(p) => Some(decode(p, "password")?),
            None => None,
        };
        Ok(RedisTarget {
            host,
            port: url.port().unwrap_or(6379),
            username,
            password,
            db,
            tls,
        })
    }
}

/// Marks the message of a bad `redis` value, so that [`Config::from_toml`] can report it
/// without the TOML source line (which would show the password).
const REDIS_ERROR: &str = "invalid Redis URL: ";

/// Reads the `redis` key: a URL, or an empty string for standalone.
fn redis_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<RedisTarget>, D::Error> {
    let text = String::deserialize(d)?;
    if text.is_empty() {
        return Ok(None);
    }
    RedisTarget::parse(&text)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("{REDIS_ERROR}{e}")))
}

/// Marks the message of a bad `redis_sentinel` URL, as [`REDIS_ERROR`] does.
const REDIS_SENTINEL_ERROR: &str = "invalid Redis Sentinel URL: ";

/// A list of Redis URLs; a bad one is reported after `marker`.
fn redis_url_list<'de, D: serde::Deserializer<'de>>(
    d: D,
    marker: &str,
) -> Result<Vec<RedisTarget>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    texts
        .iter()
        .map(|t| {
            RedisTarget::parse(t).map_err(|e| serde::de::Error::custom(format!("{marker}{e}")))
        })
        .collect()
}

/// Reads the `redis_sentinel` key: a list of URLs.
fn redis_sentinel_urls<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<RedisTarget>, D::Error> {
    redis_url_list(d, REDIS_SENTINEL_ERROR)
}

/// Marks the message of a bad `redis_cluster` URL, as [`REDIS_ERROR`] does.
const REDIS_CLUSTER_ERROR: &str = "invalid Redis Cluster URL: ";

/// Reads the `redis_cluster` key: a list of URLs.
fn redis_cluster_urls<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<RedisTarget>, D::Error> {
    redis_url_list(d, REDIS_CLUSTER_ERROR)
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
    /// `/api/channels` calls this node may have waiting for the other nodes' answers at once
    /// (a survey over Redis pub/sub; each waits at most `limits.broker_reply_timeout_ms`).
    /// Over it: the call is answered at once with a temporary error (100), counted as
    /// `surveys_refused`.
    pub max_pending_surveys: usize,
    /// `rediss://` only: PEM file of the CA certificates Redis's certificate is checked
    /// against; empty (the default) = the system's trust store.
    pub tls_ca_file: String,
    /// `rediss://` only: PEM file of the node's client certificate (chain), for a Redis that
    /// requires one (`tls-auth-clients yes`); set with `tls_key_file`, or neither. Default "".
    pub tls_cert_file: String,
    /// `rediss://` only: PEM file of the private key of `tls_cert_file`. Default "".
    pub tls_key_file: String,
    /// `redis_cluster` only: seconds between periodic topology refreshes (`CLUSTER SHARDS`);
    /// the topology is also refreshed at once on a connection error, a MOVED redirect, and a
    /// `sunsubscribe` a node sends when a slot moves. Default 5.
    pub cluster_refresh_secs: u32,
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
            // Channel listings are an operator's tool, not a hot path.
            max_pending_surveys: 64,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            cluster_refresh_secs: 5,
        }
    }
}

impl RedisOptions {
    /// The client certificate chain and key (`tls_cert_file`, `tls_key_file`), if set. Errors
    /// name the key and the file.
    #[allow(clippy::type_complexity)]
    pub fn tls_identity(
        &self,
    ) -> Result<
        Option<(
            Vec<rustls::pki_types::CertificateDer<'static>>,
            rustls::pki_types::PrivateKeyDer<'static>,
        )>,
        ConfigError,
    > {
        use rustls::pki_types::pem::PemObject;
        match (self.tls_cert_file.is_empty(), self.tls_key_file.is_empty()) {
            (true, true) => return Ok(None),
            (false, true) => {
                return Err(invalid(
                    "redis_options.tls_key_file",
                    "must be set with redis_options.tls_cert_file (both or neither)",
                ))
            }
            (true, false) => {
                return Err(invalid(
                    "redis_options.tls_cert_file",
                    "must be set with redis_options.tls_key_file (both or neither)",
                ))
            }
            (false, false) => {}
        }
        let certs = pem_certs(&self.tls_cert_file)
            .map_err(|e| invalid("redis_options.tls_cert_file", e))?;
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_file(&self.tls_key_file).map_err(|e| {
                invalid(
                    "redis_options.tls_key_file",
                    format!(
                        "{:?} holds no readable PEM private key: {e}",
                        self.tls_key_file
                    ),
                )
            })?;
        Ok(Some((certs, key)))
    }
}

/// The certificates of the PEM file `path` (it must hold at least one).
pub fn pem_certs(path: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {path:?}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path:?} is not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path:?} holds no PEM certificate"));
    }
    Ok(certs)
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

/// The transports a node serves besides `/connection/websocket` (which is always on), as in
/// Centrifugo: every one is off by default, so a node exposes only what its operator chose;
/// the path of a disabled one answers 404. The browser ones (`http_stream`, `sse`, `uni_sse`,
/// `uni_http_stream`) answer CORS per `allowed_origins`: a preflight `OPTIONS` gets 204 with
/// the allowed origin echoed, a refused `Origin` gets 403.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportsConfig {
    /// `POST /connection/http_stream`: the bidirectional emulation's server-to-client half
    /// over a streamed response (newline-delimited JSON), for the SDKs when WebSocket is
    /// blocked (commands arrive as `POST /emulation`). Default false.
    pub http_stream: bool,
    /// `GET /connection/sse?cf_connect=...`: the same over Server-Sent Events. Default false.
    pub sse: bool,
    /// `GET /connection/uni_sse?cf_connect=...` (or `POST` with the connect request as body):
    /// unidirectional, pushes as SSE events, for clients without an SDK. Default false.
    pub uni_sse: bool,
    /// `POST /connection/uni_http_stream` (the connect request as body): unidirectional,
    /// pushes as newline-delimited JSON. Default false.
    pub uni_http_stream: bool,
    /// `GET /connection/uni_websocket`: one connect request message, then pushes in text
    /// frames. Default false.
    pub uni_websocket: bool,
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
    /// Largest HTTP API request body, bytes (decoded bytes for `Transfer-Encoding: chunked`).
    /// Over it: HTTP 413 and close, from the declared `Content-Length` before any body byte is
    /// read, or as soon as the chunks pass it.
    pub max_api_body_bytes: usize,
    /// Commands one `/api/batch` request may carry. Over it: HTTP 400, error 107, nothing run
    /// (a parallel batch starts all its commands at once, so this bounds one request's
    /// broker requests in flight).
    pub max_api_batch_commands: usize,
    /// Bytes a connection may have queued for writing. Over it: disconnect 3008 "slow".
    pub max_outbox_bytes: usize,
    /// Channels one connection may be subscribed to. Over it: error 106 "limit exceeded".
    pub max_channels_per_connection: usize,
    /// Longest channel name, bytes. Over it: error 107 "bad request".
    pub max_channel_name_bytes: usize,
    /// Connections a node holds. Over it: HTTP 503 before the upgrade, so SDKs back off.
    pub max_connections: usize,
    /// Seconds a request has, head and body together, counted from its first byte (the first
    /// request of a connection: from the accept). Past it: HTTP 408 and close (counted as
    /// `request_timeouts`); a connection that sent nothing is just closed. Also the idle time
    /// of an API keep-alive connection, and upgrade → `connect` (close 3502).
    pub handshake_timeout_secs: u32,
    /// Messages the shards → broker queue holds. Full: the command gets a temporary error 100.
    pub broker_queue_capacity: usize,
    /// Must-deliver messages (interest withdrawals, presence and user-interest changes, gather
    /// answers) one shard holds, in order, while the broker queue is full. Full: the message is
    /// dropped and counted as `broker_backlog_drops` (closing connections would only queue
    /// more withdrawals; what a drop costs is bounded, see `shard::broker_link`). The default
    /// matches `broker_queue_capacity`: at most ~6 MiB per shard (≤ 96 bytes a message).
    pub broker_backlog_capacity: usize,
    /// Milliseconds an HTTP API call waits for the broker's answer (publish, history,
    /// presence, info, ...). Over it: error 100 (temporary).
    pub broker_reply_timeout_ms: u32,
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
    /// HTTP API requests one keep-alive connection has started together: a request and those
    /// that follow it whole in the bytes already read (pipelined), dispatched at once and
    /// answered in order in one write. More: the rest waits for the next batch (counted as
    /// `api_pipelined` when served with one). 16 covers a client's usual pipeline depth while
    /// keeping one connection's share of the broker queue and of the answers held at once
    /// small.
    pub max_pipelined_requests: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 * 1024,
            max_request_head_bytes: 8 * 1024,
            max_api_body_bytes: 1024 * 1024,
            max_api_batch_commands: 1000,
            max_outbox_bytes: 1024 * 1024,
            max_channels_per_connection: 128,
            max_channel_name_bytes: 255,
            max_connections: 1_000_000,
            handshake_timeout_secs: 10,
            broker_queue_capacity: 65_536,
            broker_backlog_capacity: 65_536,
            broker_reply_timeout_ms: 10_000,
            command_rate_per_sec: 50,
            command_burst: 100,
            max_refused_commands: 50,
            shard_queue_capacity: 65_536,
            idempotency_window_secs: 300,
            max_idempotency_keys: 100_000,
            max_history_bytes: 256 * 1024 * 1024,
            max_pipelined_requests: 16,
        }
    }
}

/// Each shard's io_uring for WebSocket I/O (see `shard::ring`). The receive buffers are the
/// only read memory a shard has: an idle connection holds none.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RingConfig {
    /// Submission queue entries of each shard's ring (the completion queue has four times as
    /// many). A flush with more dirty connections than this submits in several system calls;
    /// completions beyond the queue wait in the kernel (no completion is dropped).
    pub entries: u32,
    /// Receive buffers in each shard's provided-buffer ring, a power of two, at most 32768.
    /// Exhausted (more completions waiting than buffers): the receive is re-armed once the
    /// shard has handed the buffers back; nothing is lost, the data waits in the socket
    /// (counter `recv_buffer_exhausted`).
    pub recv_buffers: u32,
    /// Bytes of each receive buffer (one completion carries at most this much).
    pub recv_buffer_bytes: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        // 64 x 4 KiB = 256 KiB per shard: client messages are small, and a buffer is handed
        // back as soon as its completion is decoded, so a few dozen cover a busy batch.
        RingConfig {
            entries: 1024,
            recv_buffers: 64,
            recv_buffer_bytes: 4096,
        }
    }
}

impl RingConfig {
    /// Bytes of receive buffers one shard holds.
    pub fn recv_ring_bytes(&self) -> u64 {
        self.recv_buffers as u64 * self.recv_buffer_bytes as u64
    }
}

/// Per-namespace channel options (names follow Centrifugo's where the meaning is the same).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceOptions {
    /// Clients may subscribe without a subscription token. Off by default (as in Centrifugo):
    /// without it a client subscribes only with a subscription token, to a channel its
    /// connection token lists (`channels`), or to a user-limited channel naming it.
    pub allow_subscribe_for_client: bool,
    /// `#` in a channel name limits it to the users listed after it (`dm:#alice,bob`): those
    /// users may subscribe without a token, nobody else may (not even with
    /// `allow_subscribe_for_client`). Off by default: `#` is then an ordinary character.
    pub allow_user_limited_channels: bool,
    /// Clients may publish into channels of this namespace.
    pub allow_publish_for_client: bool,
    /// Keep presence (who is subscribed) for channels of this namespace.
    pub presence: bool,
    /// Any connected client may query presence; otherwise only subscribers of the channel.
    pub allow_presence_for_client: bool,
    /// Join and leave messages: when a client subscribes to a channel of this namespace (by
    /// itself or server-side at connect) a join push goes to the channel's subscribers, and a
    /// leave push when it unsubscribes, is unsubscribed, its subscription expires or it
    /// disconnects. Off by default (as in Centrifugo): every join and leave is one message to
    /// every subscriber, so keep it to channels with few subscribers. A subscriber receives
    /// them only if it asked (`join_leave: true` in its subscribe request, e.g. the SDKs'
    /// `joinLeave` option) or the namespace has `force_push_join_leave`. Independent of
    /// `presence`.
    pub join_leave: bool,
    /// Every subscriber of the namespace's channels receives join and leave pushes, whether or
    /// not it asked (needed for server-side subscriptions and subscriptions the subscribe proxy
    /// let in, which cannot ask, as in Centrifugo). Has an effect only with `join_leave`.
    /// Off by default.
    pub force_push_join_leave: bool,
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
    /// Subscriptions without a subscription token (and outside user-limited `#` channels) are
    /// decided by the backend's subscribe proxy (`proxy.subscribe_endpoint`), which replaces
    /// `allow_subscribe_for_client` for them. Off by default.
    pub subscribe_proxy: bool,
    /// Client publications go through the backend's publish proxy (`proxy.publish_endpoint`)
    /// first, which may refuse them or replace their data; it replaces
    /// `allow_publish_for_client`. Off by default.
    pub publish_proxy: bool,
    /// Subscriptions the subscribe proxy gave an `expire_at` are refreshed by the node calling
    /// `proxy.sub_refresh_endpoint` when they expire (otherwise they end then, push 2501).
    /// Off by default.
    pub sub_refresh_proxy: bool,
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
            allow_subscribe_for_client: false,
            allow_user_limited_channels: false,
            allow_publish_for_client: false,
            presence: false,
            allow_presence_for_client: false,
            join_leave: false,
            force_push_join_leave: false,
            history_size: 0,
            history_ttl_secs: 300,
            history_meta_ttl_secs: 30 * 24 * 3600,
            recover: false,
            allow_history_for_client: false,
            subscribe_proxy: false,
            publish_proxy: false,
            sub_refresh_proxy: false,
        }
    }
}

/// The `[proxy]` section: the backend endpoints and the bounds of the outbound HTTP client
/// ([`crate::backend`]) that calls them. Each shard has its own client, so every bound below
/// is per shard.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Where a connect without a token is sent; empty (the default) = off.
    #[serde(deserialize_with = "endpoint_url")]
    pub connect_endpoint: Option<Endpoint>,
    /// Where the server refreshes a connection whose connect-proxy result had `expire_at`.
    #[serde(deserialize_with = "endpoint_url")]
    pub refresh_endpoint: Option<Endpoint>,
    /// Where subscribes to namespaces with `subscribe_proxy` are sent.
    #[serde(deserialize_with = "endpoint_url")]
    pub subscribe_endpoint: Option<Endpoint>,
    /// Where publishes to namespaces with `publish_proxy` are sent.
    #[serde(deserialize_with = "endpoint_url")]
    pub publish_endpoint: Option<Endpoint>,
    /// Where the server refreshes subscriptions of namespaces with `sub_refresh_proxy`.
    #[serde(deserialize_with = "endpoint_url")]
    pub sub_refresh_endpoint: Option<Endpoint>,
    /// Where the client's `rpc` commands are sent; empty = `rpc` answers error 108.
    #[serde(deserialize_with = "endpoint_url")]
    pub rpc_endpoint: Option<Endpoint>,
    /// Milliseconds one proxy request may take in all: connect, TLS handshake, request and the
    /// whole response body. Over it the call fails (`timeout`), its connection is closed (never
    /// reused) and the client gets temporary error 100. Default 1000.
    pub timeout_ms: u64,
    /// Header names copied from the client's WebSocket upgrade request onto every proxy
    /// request (as Centrifugo's `proxy_http_headers`), e.g. `["Cookie", "Authorization"]`.
    /// Default none.
    pub http_headers: Vec<String>,
    /// PEM file of the CA certificates that `https://` endpoints (and the JWKS URL) are checked
    /// against; empty (the default) = the system's trust store.
    pub ca_file: String,
    /// Proxy requests in flight per shard. Over it the request is not sent: the client gets
    /// temporary error 100 and `proxy_overloaded` counts it. Default 256.
    pub max_in_flight: usize,
    /// Idle keep-alive connections kept per shard per backend origin (scheme, host, port:
    /// endpoints on one backend share them), reused newest first. A connection coming back to
    /// a full pool pushes out the oldest one, which is closed; an idle connection is closed
    /// after 30 s unused or as soon as the backend closes it. Default 16.
    pub max_idle_per_endpoint: usize,
    /// Largest response body accepted, bytes. Over it the call fails (`too_large`, counted),
    /// its connection is closed and the client gets error 100. Default 65536.
    pub max_response_bytes: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_endpoint: None,
            refresh_endpoint: None,
            subscribe_endpoint: None,
            publish_endpoint: None,
            sub_refresh_endpoint: None,
            rpc_endpoint: None,
            // Centrifugo's default proxy timeout is 1 s: a backend that needs longer holds a
            // client's command (or its connect) too long anyway.
            timeout_ms: 1000,
            http_headers: Vec::new(),
            ca_file: String::new(),
            max_in_flight: 256,
            max_idle_per_endpoint: 16,
            // Proxy replies are small JSON objects; a connect result's `data` and `subs` fit.
            max_response_bytes: 65536,
        }
    }
}

impl ProxyConfig {
    /// The configured endpoints with their keys (`connect_endpoint`, ...).
    pub fn endpoints(&self) -> impl Iterator<Item = (&'static str, &Endpoint)> {
        [
            ("connect_endpoint", &self.connect_endpoint),
            ("refresh_endpoint", &self.refresh_endpoint),
            ("subscribe_endpoint", &self.subscribe_endpoint),
            ("publish_endpoint", &self.publish_endpoint),
            ("sub_refresh_endpoint", &self.sub_refresh_endpoint),
            ("rpc_endpoint", &self.rpc_endpoint),
        ]
        .into_iter()
        .filter_map(|(k, e)| e.as_ref().map(|e| (k, e)))
    }

    /// The whole-request timeout.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms)
    }

    /// The CA certificates of `ca_file` (it must hold at least one), for the TLS set-up.
    pub fn ca_certs(&self) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
        pem_certs(&self.ca_file)
    }

    /// Checks the section's ranges, header names and CA file (part of [`Config::validate`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("proxy.timeout_ms", self.timeout_ms as usize),
            ("proxy.max_in_flight", self.max_in_flight),
            ("proxy.max_idle_per_endpoint", self.max_idle_per_endpoint),
            ("proxy.max_response_bytes", self.max_response_bytes),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.timeout_ms > 600_000 {
            return Err(invalid(
                "proxy.timeout_ms",
                "must be at most 600000 (10 minutes)",
            ));
        }
        if self.max_response_bytes > 64 * 1024 * 1024 {
            return Err(invalid(
                "proxy.max_response_bytes",
                "must be at most 64 MiB",
            ));
        }
        for name in &self.http_headers {
            let token = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !token {
                return Err(invalid(
                    "proxy.http_headers",
                    format!("entry {name:?} is not an HTTP header name"),
                ));
            }
        }
        if !self.ca_file.is_empty() {
            self.ca_certs().map_err(|e| invalid("proxy.ca_file", e))?;
        } else if let Some((key, ep)) = self.endpoints().find(|(_, e)| e.is_tls()) {
            if rustls_native_certs::load_native_certs().certs.is_empty() {
                return Err(invalid(
                    &format!("proxy.{key}"),
                    format!(
                        "is {} but the system has no CA certificates: install them or set proxy.ca_file",
                        ep.url()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A backend URL (`http://` or `https://`), parsed and resolved once, when the configuration
/// is read: a name (`backend`, `localhost`) is looked up with the system resolver then, so a
/// shard never blocks on DNS; restart the node to follow a change of address. A call tries the
/// addresses in the resolver's order until one connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    url: String,
    tls: bool,
    /// Host without IPv6 brackets (the TLS server name).
    host: String,
    port: u16,
    /// Path and query, as the request line carries them.
    path: String,
    /// `Host` header value: host, and `:port` unless it is the scheme's default.
    host_header: String,
    /// `scheme://host:port`: connections are pooled per origin.
    origin: String,
    addrs: Vec<SocketAddr>,
}

impl Endpoint {
    /// Parses and resolves a URL. The error says what is wrong (scheme, host, ...).
    pub fn parse(text: &str) -> Result<Endpoint, String> {
        let mut ep = Self::parse_unresolved(text)?;
        use std::net::ToSocketAddrs;
        ep.addrs = (ep.host.as_str(), ep.port)
            .to_socket_addrs()
            .map_err(|e| format!("host `{}` does not resolve ({e})", ep.host))?
            .collect();
        if ep.addrs.is_empty() {
            return Err(format!("host `{}` resolves to no address", ep.host));
        }
        Ok(ep)
    }

    /// [`Endpoint::parse`] without the name lookup (no address).
    fn parse_unresolved(text: &str) -> Result<Endpoint, String> {
        let url = url::Url::parse(text)
            .map_err(|e| format!("`{text}` is not an http:// or https:// URL ({e})"))?;
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            other => {
                return Err(format!(
                    "`{text}` has the unsupported scheme `{other}` (http:// or https://)"
                ))
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            // Not echoed: the text holds a password.
            return Err("carries a user name or password, which is not sent: remove it".into());
        }
        if url.fragment().is_some() {
            return Err(format!("`{text}` has a fragment (`#...`)"));
        }
        let host_str = url.host_str().filter(|h| !h.is_empty());
        let host_str = host_str.ok_or_else(|| format!("`{text}` has no host"))?;
        let default_port = if tls { 443 } else { 80 };
        let port = url.port().unwrap_or(default_port);
        let host_header = if port == default_port {
            host_str.to_string()
        } else {
            format!("{host_str}:{port}")
        };
        let mut path = url.path().to_string();
        if let Some(q) = url.query() {
            path.push('?');
            path.push_str(q);
        }
        Ok(Endpoint {
            url: text.to_string(),
            tls,
            host: host_str
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            path,
            origin: format!("{}://{host_header}", url.scheme()),
            host_header,
            addrs: Vec::new(),
        })
    }

    /// The URL as configured.
    pub fn url(&self) -> &str {
        &self.url
    }
    /// `https://`.
    pub fn is_tls(&self) -> bool {
        self.tls
    }
    /// Host name or IP (no brackets): the TLS server name.
    pub fn host(&self) -> &str {
        &self.host
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    /// Path and query (`/centrifugo/connect?x=1`).
    pub fn path(&self) -> &str {
        &self.path
    }
    /// The `Host` header value.
    pub fn host_header(&self) -> &str {
        &self.host_header
    }
    /// `scheme://host[:port]`, the key connections are pooled under.
    pub fn origin(&self) -> &str {
        &self.origin
    }
    /// The addresses the host resolved to at start, in the resolver's order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// Reads an endpoint key: a URL, or an empty string for off.
fn endpoint_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Endpoint>, D::Error> {
    let text = String::deserialize(d)?;
    if text.is_empty() {
        return Ok(None);
    }
    Endpoint::parse(&text)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("invalid endpoint: {e}")))
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
        toml::from_str(text).map_err(|e| {
            // A bad Redis URL may hold a password: name the key, not the source line.
            let message = if e.message().starts_with(REDIS_ERROR) {
                format!("`redis`: {}", e.message())
            } else if e.message().starts_with(REDIS_SENTINEL_ERROR) {
                format!("`redis_sentinel`: {}", e.message())
            } else if e.message().starts_with(REDIS_CLUSTER_ERROR) {
                format!("`redis_cluster`: {}", e.message())
            } else {
                e.to_string().trim().to_string()
            };
            ConfigError::Parse {
                path: "<text>".into(),
                message,
            }
        })
    }

    /// Whether clients can authenticate with a token: a key source is configured.
    pub fn has_token_keys(&self) -> bool {
        !self.token_hmac_secret.is_empty()
            || !self.token_rsa_public_key_file.is_empty()
            || !self.token_ecdsa_public_key_file.is_empty()
            || !self.token_jwks_url.is_empty()
    }

    /// The token keys' settings. The key files themselves are read and parsed by
    /// [`crate::protocol::token::TokenVerifier::from_config`], which `node::run` calls right
    /// after [`Config::validate`], so that a bad file stops the node at start too.
    fn validate_tokens(&self) -> Result<(), ConfigError> {
        // Clients need some way in. (Any further way of authenticating a connection, such as
        // a connect proxy endpoint, belongs in this condition too.)
        if !self.insecure && !self.has_token_keys() && self.proxy.connect_endpoint.is_none() {
            return Err(invalid(
                "token_hmac_secret",
                "is required unless `insecure` is set, another token key is configured \
                 (token_rsa_public_key_file, token_ecdsa_public_key_file, token_jwks_url) \
                 or `proxy.connect_endpoint` authenticates connections: clients could not \
                 authenticate",
            ));
        }
        if !self.token_jwks_url.is_empty() {
            let url = url::Url::parse(&self.token_jwks_url)
                .map_err(|e| invalid("token_jwks_url", format!("is not a URL ({e})")))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(invalid(
                    "token_jwks_url",
                    "must be an http:// or https:// URL with a host",
                ));
            }
        }
        if self.token_jwks_min_fetch_interval_secs == 0 {
            return Err(invalid(
                "token_jwks_min_fetch_interval_secs",
                "must be at least 1",
            ));
        }
        if self.token_jwks_refresh_interval_secs != 0
            && self.token_jwks_refresh_interval_secs < self.token_jwks_min_fetch_interval_secs
        {
            return Err(invalid(
                "token_jwks_refresh_interval_secs",
                "must be 0 (off) or at least token_jwks_min_fetch_interval_secs",
            ));
        }
        Ok(())
    }

    /// Redis mode: a single Redis (`redis`), Sentinel (`redis_sentinel`) or Cluster
    /// (`redis_cluster`).
    pub fn redis_mode(&self) -> bool {
        self.redis.is_some() || !self.redis_sentinel.is_empty() || !self.redis_cluster.is_empty()
    }

    /// The first Redis URL (the single Redis, the first sentinel or the first cluster seed):
    /// its scheme says whether TLS is on.
    pub fn redis_first(&self) -> Option<&RedisTarget> {
        self.redis
            .as_ref()
            .or(self.redis_sentinel.first())
            .or(self.redis_cluster.first())
    }

    /// Checks ranges and cross-field consistency; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.redis_cluster.is_empty() {
            if self.redis.is_some() || !self.redis_sentinel.is_empty() {
                return Err(invalid(
                    "redis_cluster",
                    "is set together with `redis` or `redis_sentinel`: use one of them",
                ));
            }
            if self
                .redis_cluster
                .iter()
                .any(|t| t.tls != self.redis_cluster[0].tls)
            {
                return Err(invalid(
                    "redis_cluster",
                    "mixes redis:// and rediss:// URLs: use one scheme for all seeds",
                ));
            }
            if self.redis_cluster.iter().any(|t| t.db != 0) {
                return Err(invalid(
                    "redis_cluster",
                    "names a database other than 0: Redis Cluster has only database 0",
                ));
            }
        }
        if self.redis_options.cluster_refresh_secs == 0 {
            return Err(invalid(
                "redis_options.cluster_refresh_secs",
                "must be at least 1",
            ));
        }
        if !self.redis_sentinel.is_empty() {
            if self.redis.is_some() {
                return Err(invalid(
                    "redis_sentinel",
                    "is set together with `redis`: use one of them",
                ));
            }
            if self.redis_sentinel_master.is_empty() {
                return Err(invalid(
                    "redis_sentinel_master",
                    "must be set with redis_sentinel (the monitored master's name)",
                ));
            }
            if self
                .redis_sentinel
                .iter()
                .any(|t| t.tls != self.redis_sentinel[0].tls)
            {
                return Err(invalid(
                    "redis_sentinel",
                    "mixes redis:// and rediss:// URLs: use one scheme for all sentinels",
                ));
            }
        } else if !self.redis_sentinel_master.is_empty() {
            return Err(invalid(
                "redis_sentinel_master",
                "is set but redis_sentinel (the sentinels' URLs) is empty",
            ));
        }
        if self.shards > crate::bus::MAX_SHARDS {
            return Err(invalid(
                "shards",
                format!("must be at most {}", crate::bus::MAX_SHARDS),
            ));
        }
        if self.backlog == 0 {
            return Err(invalid("backlog", "must be at least 1"));
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
        let tls_keys = [
            ("redis_options.tls_ca_file", &r.tls_ca_file),
            ("redis_options.tls_cert_file", &r.tls_cert_file),
            ("redis_options.tls_key_file", &r.tls_key_file),
        ];
        match self.redis_first() {
            Some(t) if t.tls => {
                if !r.tls_ca_file.is_empty() {
                    pem_certs(&r.tls_ca_file)
                        .map_err(|e| invalid("redis_options.tls_ca_file", e))?;
                } else if rustls_native_certs::load_native_certs().certs.is_empty() {
                    return Err(invalid(
                        "redis_options.tls_ca_file",
                        "is empty (the system's trust store) but the system has no CA \
                         certificates: install them or set redis_options.tls_ca_file",
                    ));
                }
                r.tls_identity()?;
            }
            Some(_) => {
                if let Some((key, _)) = tls_keys.iter().find(|(_, v)| !v.is_empty()) {
                    return Err(invalid(
                        key,
                        "is set but `redis` is not a rediss:// URL (TLS is off)",
                    ));
                }
            }
            None => {}
        }
        if r.max_held_publications == 0 {
            return Err(invalid(
                "redis_options.max_held_publications",
                "must be at least 1",
            ));
        }
        if r.max_pending_surveys == 0 {
            return Err(invalid(
                "redis_options.max_pending_surveys",
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
        if self.redis_mode() && r.max_write_queue_bytes < largest.saturating_mul(2) {
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
        self.validate_tokens()?;
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
        let positive: [(&str, usize); 16] = [
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
            ("limits.max_api_batch_commands", l.max_api_batch_commands),
            ("limits.max_outbox_bytes", l.max_outbox_bytes),
            (
                "limits.max_channels_per_connection",
                l.max_channels_per_connection,
            ),
            ("limits.max_channel_name_bytes", l.max_channel_name_bytes),
            ("limits.max_connections", l.max_connections),
            ("limits.max_pipelined_requests", l.max_pipelined_requests),
            ("limits.broker_queue_capacity", l.broker_queue_capacity),
            ("limits.shard_queue_capacity", l.shard_queue_capacity),
            ("limits.broker_backlog_capacity", l.broker_backlog_capacity),
            (
                "limits.broker_reply_timeout_ms",
                l.broker_reply_timeout_ms as usize,
            ),
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
        let ring = &self.ring;
        if !(8..=32768).contains(&ring.entries) || !ring.entries.is_power_of_two() {
            return Err(invalid(
                "ring.entries",
                "must be a power of two from 8 to 32768",
            ));
        }
        if !(1..=32768).contains(&ring.recv_buffers) || !ring.recv_buffers.is_power_of_two() {
            return Err(invalid(
                "ring.recv_buffers",
                "must be a power of two from 1 to 32768",
            ));
        }
        if !(64..=1024 * 1024).contains(&ring.recv_buffer_bytes) {
            return Err(invalid(
                "ring.recv_buffer_bytes",
                "must be from 64 to 1048576",
            ));
        }
        for pattern in &self.allowed_origins {
            crate::pattern::origin::check_pattern(pattern)
                .map_err(|e| invalid("allowed_origins", format!("entry {pattern:?} {e}")))?;
        }
        self.proxy.validate()?;
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
    fn max_pipelined_requests_is_at_least_one() {
        let c =
            Config::from_toml("insecure = true\n[limits]\nmax_pipelined_requests = 0\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("limits.max_pipelined_requests"), "{err}");
        assert_eq!(Config::default().limits.max_pipelined_requests, 16);
    }

    #[test]
    fn urls() {
        let t = RedisTarget::parse("redis://127.0.0.1:6380/2").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("127.0.0.1", 6380, 2));
        assert_eq!((t.username, t.password), (None, None));
        let t = RedisTarget::parse("redis://user:p%40ss@redis.local").unwrap();
        assert_eq!(t.port, 6379);
        assert_eq!(t.username.as_deref(), Some("user"));
        assert_eq!(t.password.as_deref(), Some("p@ss"));
        let t = RedisTarget::parse("redis://:secret@[::1]:7000").unwrap();
        assert_eq!(
            (t.host.as_str(), t.password.as_deref()),
            ("::1", Some("secret"))
        );
        assert!(!t.tls);
        let t = RedisTarget::parse("rediss://:pw@10.0.0.5:6380/1").unwrap();
        assert!(t.tls);
        assert_eq!((t.host.as_str(), t.port, t.db), ("10.0.0.5", 6380, 1));
        assert_eq!(
            RedisTarget::parse("rediss://redis.local").unwrap().port,
            6379
        );
        assert!(RedisTarget::parse("redis://h:1/x").is_err());
        assert!(RedisTarget::parse("not a url").is_err());
    }

    /// Every RFC 3986 reserved character, `%` and a space.
    const RESERVED_PASSWORD: &str = "a+b&c@d:e%f/g?h#i[j]k!l$m'n(o)p*q,r;s=t u";

    /// Percent-encodes every byte that is not unreserved (RFC 3986).
    fn encode(s: &str) -> String {
        const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'.')
            .remove(b'_')
            .remove(b'~');
        percent_encoding::utf8_percent_encode(s, RESERVED).to_string()
    }

    #[test]
    fn percent_encoded_userinfo_is_decoded_as_rfc_3986_says() {
        let user = "u+s:e@r";
        let url = format!(
            "redis://{}:{}@127.0.0.1:7001/3",
            encode(user),
            encode(RESERVED_PASSWORD)
        );
        let t = RedisTarget::parse(&url).unwrap();
        assert_eq!(t.password.as_deref(), Some(RESERVED_PASSWORD));
        assert_eq!(t.username.as_deref(), Some(user));
        assert_eq!((t.host.as_str(), t.port, t.db), ("127.0.0.1", 7001, 3));
        // `+` stays a plus (a form decoder would make it a space) and `&` does not cut it short.
        let t = RedisTarget::parse("redis://:p+q%26r@h").unwrap();
        assert_eq!(t.password.as_deref(), Some("p+q&r"));
        let t = RedisTarget::parse("redis://:p+q&r@h").unwrap();
        assert_eq!(t.password.as_deref(), Some("p+q&r"));
        // Not UTF-8 once decoded: refused, and the message does not echo it.
        let err = RedisTarget::parse("redis://:%FF%FE@h").unwrap_err();
        assert!(err.contains("password"), "{err}");
        assert!(!err.contains("FF"), "{err}");
    }

    #[test]
    fn unsupported_scheme_and_query_keys_are_named() {
        let err = RedisTarget::parse("redis+tls://:pw@h:1").unwrap_err();
        assert!(err.contains("`redis+tls`") && !err.contains("pw"), "{err}");
        let err = RedisTarget::parse("unix:///run/redis.sock").unwrap_err();
        assert!(err.contains("`unix`"), "{err}");
        let err = RedisTarget::parse("unix://:pw@/run/redis.sock").unwrap_err();
        assert!(err.contains("`unix`") && !err.contains("pw"), "{err}");
        let err = RedisTarget::parse("redis://:pw@h:1/0?tls=true").unwrap_err();
        assert!(err.contains("`tls`"), "{err}");
        assert!(!err.contains("pw"), "{err}");
        let err = RedisTarget::parse("redis://h:1?").unwrap_err();
        assert!(err.contains("query"), "{err}");
        // An unencoded `#` starts a fragment: the message tells how to write it.
        let err = RedisTarget::parse("redis://h:1/0#x").unwrap_err();
        assert!(err.contains("%23"), "{err}");
    }

    #[test]
    fn the_redis_key_is_parsed_once_and_never_shows_the_password() {
        let c = Config::from_toml("insecure = true\n").unwrap();
        assert_eq!(c.redis, None);
        let c = Config::from_toml("insecure = true\nredis = \"\"\n").unwrap();
        assert_eq!(c.redis, None, "an empty URL means standalone");
        let c = Config::from_toml(&format!(
            "insecure = true\nredis = \"redis://:{}@10.1.2.3:6390\"\n",
            encode(RESERVED_PASSWORD)
        ))
        .unwrap();
        let t = c.redis.clone().unwrap();
        assert_eq!(t.password.as_deref(), Some(RESERVED_PASSWORD));
        assert_eq!((t.host.as_str(), t.port), ("10.1.2.3", 6390));
        let debug = format!("{c:?}");
        assert!(debug.contains("<redacted>"), "{debug}");
        assert!(
            !debug.contains("m'n(o)") && !debug.contains("%24m"),
            "{debug}"
        );
        let err = Config::from_toml("insecure = true\nredis = \"rediz://:hunter2@h:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`redis`") && err.contains("`rediz`"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn allowed_origins_are_checked() {
        let c = Config::from_toml(
            "insecure = true\nallowed_origins = [\"https://*.example.com\", \"http://localhost:3000\", \"*\"]\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.allowed_origins.len(), 3);
        assert!(Config::default().allowed_origins.is_empty());
        for bad in [
            "*.example.com",
            "https://example.com/app",
            "https://x.com:*",
        ] {
            let c = Config::from_toml(&format!("insecure = true\nallowed_origins = [{bad:?}]\n"))
                .unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(
                err.contains("allowed_origins") && err.contains(bad),
                "{err}"
            );
        }
    }

    #[test]
    fn secure_defaults_and_dev_config_opens_what_the_quickstart_uses() {
        let c = Config::default();
        assert!(!c.default_namespace.allow_subscribe_for_client);
        assert!(!c.default_namespace.allow_user_limited_channels);
        assert_eq!(c.client_expired_sub_close_delay_secs, 25);
        assert!(c.token_audience.is_empty() && c.token_issuer.is_empty());
        let ns = Config::from_toml("insecure = true\n[namespaces.x]\n").unwrap();
        assert!(!ns.namespace_of("x:1").unwrap().allow_subscribe_for_client);
        // The README's quickstart subscribes to `news` and uses `chat:` channels from clients.
        let dev =
            Config::from_file(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/dev.toml"))).unwrap();
        dev.validate().unwrap();
        assert!(dev.namespace_of("news").unwrap().allow_subscribe_for_client);
        let chat = dev.namespace_of("chat:room").unwrap();
        assert!(chat.allow_subscribe_for_client && chat.allow_publish_for_client && chat.presence);
        assert!(
            dev.namespace_of("feed:x")
                .unwrap()
                .allow_subscribe_for_client
        );
        assert!(!dev.insecure, "dev.toml needs tokens like production");
    }

    #[test]
    fn any_token_key_source_lets_a_secure_node_start_and_jwks_settings_are_checked() {
        let c = Config::default();
        assert_eq!(
            (
                c.token_jwks_min_fetch_interval_secs,
                c.token_jwks_refresh_interval_secs
            ),
            (10, 3600)
        );
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("token_hmac_secret") && err.contains("token_jwks_url"),
            "{err}"
        );
        for source in [
            "token_rsa_public_key_file = \"/etc/shardcast/rsa.pem\"",
            "token_ecdsa_public_key_file = \"/etc/shardcast/ec.pem\"",
            "token_jwks_url = \"https://auth.example.com/jwks\"",
            "token_jwks_url = \"http://127.0.0.1:8080/certs\"",
        ] {
            Config::from_toml(source).unwrap().validate().unwrap();
        }
        for (bad, key) in [
            ("token_jwks_url = \"ftp://h/jwks\"", "token_jwks_url"),
            ("token_jwks_url = \"jwks.json\"", "token_jwks_url"),
            (
                "token_jwks_url = \"https://h/\"\ntoken_jwks_min_fetch_interval_secs = 0",
                "token_jwks_min_fetch_interval_secs",
            ),
            (
                "token_jwks_url = \"https://h/\"\ntoken_jwks_refresh_interval_secs = 5",
                "token_jwks_refresh_interval_secs",
            ),
        ] {
            let err = Config::from_toml(bad)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
        let off = Config::from_toml(
            "token_jwks_url = \"https://h/\"\ntoken_jwks_refresh_interval_secs = 0",
        )
        .unwrap();
        off.validate().unwrap();
    }

    #[test]
    fn token_claim_keys_parse() {
        let c = Config::from_toml(
            "token_hmac_secret = \"s\"\ntoken_audience = \"app\"\ntoken_issuer = \"auth\"\nclient_expired_sub_close_delay_secs = 3\n[namespaces.dm]\nallow_user_limited_channels = true\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            (c.token_audience.as_str(), c.token_issuer.as_str()),
            ("app", "auth")
        );
        assert_eq!(c.client_expired_sub_close_delay_secs, 3);
        assert!(c.namespace_of("dm:#a").unwrap().allow_user_limited_channels);
    }

    #[test]
    fn broker_backlog_and_reply_timeout_are_checked() {
        let c =
            Config::from_toml("insecure = true\n[limits]\nbroker_backlog_capacity = 0\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("limits.broker_backlog_capacity"), "{err}");
        let c =
            Config::from_toml("insecure = true\n[limits]\nbroker_reply_timeout_ms = 0\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("limits.broker_reply_timeout_ms"), "{err}");
        let c = Config::from_toml(
            "insecure = true\n[limits]\nbroker_backlog_capacity = 8\nbroker_reply_timeout_ms = 250\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.limits.broker_backlog_capacity, 8);
        assert_eq!(c.limits.broker_reply_timeout_ms, 250);
    }

    #[test]
    fn redis_tls_files_are_checked_at_start() {
        let dir = std::env::temp_dir().join(format!("shardcast-redis-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let missing = dir.join("missing.pem");
        let tls = "insecure = true\nredis = \"rediss://127.0.0.1:6380\"\n[redis_options]\n";
        let plain = "insecure = true\nredis = \"redis://127.0.0.1:6379\"\n[redis_options]\n";
        let cases = [
            (
                format!("{tls}tls_ca_file = {:?}\n", missing.display().to_string()),
                "redis_options.tls_ca_file",
                "missing.pem",
            ),
            (
                format!("{tls}tls_ca_file = {:?}\n", not_pem.display().to_string()),
                "redis_options.tls_ca_file",
                "not.pem",
            ),
            (
                format!("{tls}tls_key_file = {:?}\n", not_pem.display().to_string()),
                "redis_options.tls_cert_file",
                "both or neither",
            ),
            (
                format!("{tls}tls_cert_file = {:?}\n", not_pem.display().to_string()),
                "redis_options.tls_key_file",
                "both or neither",
            ),
            (
                format!(
                    "{tls}tls_cert_file = {:?}\ntls_key_file = {:?}\n",
                    missing.display().to_string(),
                    not_pem.display().to_string()
                ),
                "redis_options.tls_cert_file",
                "missing.pem",
            ),
            (
                format!("{plain}tls_ca_file = {:?}\n", not_pem.display().to_string()),
                "redis_options.tls_ca_file",
                "rediss://",
            ),
        ];
        for (toml, key, detail) in cases {
            let err = Config::from_toml(&toml)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(detail), "{toml}: {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
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
    fn redis_cluster_keys_are_checked() {
        let ok = "insecure = true\nredis_cluster = [\"redis://:pw@10.0.0.1:7000\", \
                  \"redis://10.0.0.2:7001\"]\n";
        let c = Config::from_toml(ok).unwrap();
        c.validate().unwrap();
        assert!(c.redis_mode());
        assert_eq!(c.redis_cluster.len(), 2);
        assert_eq!(c.redis_first().map(|t| t.port), Some(7000));
        assert_eq!(c.redis_options.cluster_refresh_secs, 5);
        let bad = [
            (
                "redis = \"redis://h:1\"\nredis_cluster = [\"redis://h:2\"]\n",
                "redis_cluster",
                "use one of them",
            ),
            (
                "redis_cluster = [\"redis://h:2\"]\nredis_sentinel = [\"redis://h:3\"]\n\
                 redis_sentinel_master = \"m\"\n",
                "redis_cluster",
                "use one of them",
            ),
            (
                "redis_cluster = [\"redis://h:2/1\"]\n",
                "redis_cluster",
                "database other than 0",
            ),
            (
                "redis_cluster = [\"redis://h:2\", \"rediss://h:3\"]\n",
                "redis_cluster",
                "mixes",
            ),
            (
                "redis_cluster = [\"redis://h:2\"]\n[redis_options]\ncluster_refresh_secs = 0\n",
                "redis_options.cluster_refresh_secs",
                "at least 1",
            ),
        ];
        for (toml, key, detail) in bad {
            let err = Config::from_toml(&format!("insecure = true\n{toml}"))
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(detail), "{toml}: {err}");
        }
        let err = Config::from_toml("redis_cluster = [\"http://:secret@h:1\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("redis_cluster") && !err.contains("secret"),
            "{err}"
        );
    }

    #[test]
    fn redis_sentinel_keys_are_checked() {
        let ok = "insecure = true\nredis_sentinel = [\"redis://:pw@10.0.0.1:26379/2\", \
                  \"redis://10.0.0.2:26379\"]\nredis_sentinel_master = \"mymaster\"\n";
        let c = Config::from_toml(ok).unwrap();
        c.validate().unwrap();
        assert!(c.redis_mode() && c.redis.is_none());
        assert_eq!(c.redis_sentinel.len(), 2);
        assert_eq!(c.redis_sentinel[0].password.as_deref(), Some("pw"));
        assert_eq!(
            (c.redis_sentinel[0].port, c.redis_sentinel[0].db),
            (26379, 2)
        );
        assert!(!Config::from_toml("insecure = true\n").unwrap().redis_mode());
        let bad = [
            (
                "redis = \"redis://127.0.0.1\"\nredis_sentinel = [\"redis://s:1\"]\n\
                 redis_sentinel_master = \"m\"\n",
                "redis_sentinel",
                "use one of them",
            ),
            (
                "redis_sentinel = [\"redis://s:1\"]\n",
                "redis_sentinel_master",
                "must be set",
            ),
            (
                "redis_sentinel_master = \"m\"\n",
                "redis_sentinel_master",
                "is empty",
            ),
            (
                "redis_sentinel = [\"redis://s:1\", \"rediss://t:1\"]\n\
                 redis_sentinel_master = \"m\"\n",
                "redis_sentinel",
                "mixes",
            ),
        ];
        for (toml, key, what) in bad {
            let c = Config::from_toml(&format!("insecure = true\n{toml}")).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(what), "{toml}: {err}");
        }
        // A bad URL names the key and never the password.
        let err = Config::from_toml(
            "redis_sentinel = [\"http://u:secretpw@s:1\"]\nredis_sentinel_master = \"m\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("redis_sentinel") && err.contains("scheme"),
            "{err}"
        );
        assert!(!err.contains("secretpw"), "{err}");
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
