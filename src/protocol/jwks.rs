//! A shard's copy of the JWK Set at `token_jwks_url`: the keys by `kid`, when to fetch again,
//! and the last good set kept while the endpoint fails.
//!
//! Fetch-agnostic (quinn style): the shard's HTTP client fetches, this type only decides when
//! ([`JwksCache::should_fetch`], given `now`) and takes the body ([`JwksCache::update`]). One
//! per shard, used on the shard's thread only (inside [`crate::protocol::token::TokenVerifier`]
//! behind a `RefCell`); it never blocks and does no I/O.
//!
//! Which keys are used: RSA keys (`kty` "RSA", at least 2048 bits) and EC keys (`kty` "EC",
//! `crv` "P-256" or "P-384") that have a `kid` and whose `use`, when present, is "sig". A key
//! that names its `alg` verifies only that algorithm. Others are skipped one by one, so that a
//! set which also publishes encryption keys, symmetric keys or curves we do not verify still
//! works: `oct` keys never (a shared secret does not belong in a public set), Ed25519 and
//! P-521 not (no key file offers them either). The first of two keys with one `kid` wins.
//!
//! A token must name its key: a token without `kid` is not matched against the set, even when
//! the set holds one key. Centrifugo refuses such tokens too (its JWKS manager answers "kid is
//! not provided"), and a single-key fallback would break without warning the day the
//! provider publishes a second key for a rotation. (A token without `kid` may still be
//! verified by the PEM key file of its family, when one is configured.)
//!
//! Bounds: the body's size is bounded by the client that fetches it (`proxy.max_response_bytes`);
//! the number of keys by the body. Fetches are rate limited by
//! `token_jwks_min_fetch_interval_secs`, refusals counted ([`JwksCounters`]).

use crate::config::Config;
use crate::protocol::token::PublicKey;
use base64::Engine;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Why a shard wants to fetch the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchReason {
    /// A token named a `kid` the set lacks ([`crate::protocol::token::TokenError::UnknownKey`]).
    UnknownKid,
    /// The periodic refresh (and the first fetch, at start): ask on a timer.
    Periodic,
}

/// What the cache did, for metrics. Monotonic counts since the shard started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JwksCounters {
    /// [`JwksCache::should_fetch`] said yes.
    pub fetches: u64,
    /// [`JwksCache::should_fetch`] said no to an unknown `kid` (rate limited).
    pub unknown_kid_fetches_refused: u64,
    /// Bodies that replaced the set.
    pub updates: u64,
    /// Bodies refused (bad JSON, no usable key) and fetches reported failed: the last good set
    /// stayed.
    pub failures: u64,
}

/// The keys of a JWK Set by `kid`, and the fetch schedule. See the module doc.
#[derive(Debug)]
pub struct JwksCache {
    keys: HashMap<Box<str>, PublicKey>,
    /// Least time between two fetches after the first (`token_jwks_min_fetch_interval_secs`).
    min_fetch_interval: Duration,
    /// Age after which the periodic refresh is due (`token_jwks_refresh_interval_secs`);
    /// `None` = no periodic refresh after the first good set.
    refresh_interval: Option<Duration>,
    /// When the last fetch was allowed (for the rate limit).
    last_fetch: Option<Instant>,
    /// When the set was last replaced by a good body.
    last_update: Option<Instant>,
    counters: JwksCounters,
}

/// One JWK, with only the members we read; unknown members are ignored.
#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, rename = "use")]
    usage: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

#[derive(Deserialize)]
struct RawSet<'a> {
    #[serde(borrow)]
    keys: Vec<&'a RawValue>,
}

fn b64(field: &str, value: Option<&str>) -> Result<Vec<u8>, String> {
    let value = value.ok_or_else(|| format!("no `{field}`"))?;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map_err(|_| format!("`{field}` is not base64url"))
}

/// The key a JWK describes with its `kid`, or why it is skipped.
fn usable(jwk: &RawJwk) -> Result<(&str, PublicKey), String> {
    let kid = jwk
        .kid
        .as_deref()
        .filter(|k| !k.is_empty())
        .ok_or("no kid")?;
    if let Some(u) = jwk.usage.as_deref().filter(|u| *u != "sig") {
        return Err(format!("kid {kid}: use {u:?}, not \"sig\""));
    }
    let key = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("RSA", _) => PublicKey::rsa(&b64("n", jwk.n.as_deref())?, &b64("e", jwk.e.as_deref())?),
        ("EC", Some(crv @ ("P-256" | "P-384"))) => {
            let (x, y) = (b64("x", jwk.x.as_deref())?, b64("y", jwk.y.as_deref())?);
            let mut point = Vec::with_capacity(1 + x.len() + y.len());
            point.push(4); // SEC1 uncompressed
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            PublicKey::ec(&point, crv == "P-384")
        }
        (kty, crv) => Err(format!("kty {kty:?} crv {crv:?} is not verified here")),
    }
    .map_err(|e| format!("kid {kid}: {e}"))?;
    let key = match jwk.alg.as_deref() {
        None => key,
        Some(alg) => Algorithm::from_str(alg)
            .ok()
            .and_then(|a| key.only(a))
            .ok_or_else(|| format!("kid {kid}: alg {alg:?} does not fit the key"))?,
    };
    Ok((kid, key))
}

impl JwksCache {
    /// An empty cache: the first [`FetchReason::Periodic`] (or unknown `kid`) is allowed at once.
    pub fn new(min_fetch_interval: Duration, refresh_interval: Option<Duration>) -> Self {
        JwksCache {
            keys: HashMap::new(),
            min_fetch_interval,
            refresh_interval,
            last_fetch: None,
            last_update: None,
            counters: JwksCounters::default(),
        }
    }

    /// The cache `token_jwks_url` asks for; `None` when it is empty.
    pub fn from_config(cfg: &Config) -> Option<Self> {
        (!cfg.token_jwks_url.is_empty()).then(|| {
            let refresh = cfg.token_jwks_refresh_interval_secs;
            JwksCache::new(
                Duration::from_secs(cfg.token_jwks_min_fetch_interval_secs.into()),
                (refresh > 0).then(|| Duration::from_secs(refresh.into())),
            )
        })
    }

    /// Replaces the set with the JWK Set in `body` (fetched at `now`); returns how many keys
    /// it holds now. On an error (not a JWK Set, or no usable key in it) the last good set stays
    /// and the error says why (with the reasons keys were skipped).
    pub fn update(&mut self, body: &[u8], now: Instant) -> Result<usize, String> {
        let result = Self::parse(body);
        match result {
            Ok(keys) => {
                self.keys = keys;
                self.last_update = Some(now);
                self.counters.updates += 1;
                Ok(self.keys.len())
            }
            Err(e) => {
                self.counters.failures += 1;
                Err(e)
            }
        }
    }

    fn parse(body: &[u8]) -> Result<HashMap<Box<str>, PublicKey>, String> {
        let set: RawSet<'_> =
            serde_json::from_slice(body).map_err(|e| format!("not a JWK Set: {e}"))?;
        let mut keys = HashMap::new();
        let mut skipped = Vec::new();
        for raw in set.keys {
            let jwk = match serde_json::from_str::<RawJwk>(raw.get()) {
                Ok(jwk) => jwk,
                Err(e) => {
                    skipped.push(format!("not a JWK: {e}"));
                    continue;
                }
            };
            match usable(&jwk) {
                Ok((kid, key)) => {
                    if keys.contains_key(kid) {
                        skipped.push(format!("kid {kid}: a second key with this kid"));
                    } else {
                        keys.insert(kid.into(), key);
                    }
                }
                Err(why) => skipped.push(why),
            }
        }
        if keys.is_empty() {
            return Err(format!(
                "no usable signing key in the JWK Set (skipped: {})",
                match skipped.is_empty() {
                    true => "none, the set is empty".to_string(),
                    false => skipped.join("; "),
                }
            ));
        }
        Ok(keys)
    }

    /// A fetch that [`JwksCache::should_fetch`] allowed failed before a body arrived (HTTP
    /// error, timeout): counted; the last good set stays.
    pub fn fetch_failed(&mut self) {
        self.counters.failures += 1;
    }

    /// The key `kid` names.
    pub fn key(&self, kid: &str) -> Option<&PublicKey> {
        self.keys.get(kid)
    }

    /// Keys in the set.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// No set fetched yet (or none with a usable key).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether to fetch now, for `reason`; a yes is recorded as a fetch at `now`.
    ///
    /// - [`FetchReason::UnknownKid`]: yes when no fetch was allowed in the last
    ///   `min_fetch_interval` (so at most one per interval however many unknown `kid`s come);
    ///   a no is counted.
    /// - [`FetchReason::Periodic`]: yes when no good set was ever taken, or the last one is
    ///   `refresh_interval` old; in both cases not within `min_fetch_interval` of the previous
    ///   fetch (so a failing endpoint is retried at that rate when the timer ticks faster).
    pub fn should_fetch(&mut self, now: Instant, reason: FetchReason) -> bool {
        let rested = self
            .last_fetch
            .is_none_or(|t| now.saturating_duration_since(t) >= self.min_fetch_interval);
        let fetch = match reason {
            FetchReason::UnknownKid => {
                if !rested {
                    self.counters.unknown_kid_fetches_refused += 1;
                }
                rested
            }
            FetchReason::Periodic => {
                let due = match (self.last_update, self.refresh_interval) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(t), Some(every)) => now.saturating_duration_since(t) >= every,
                };
                rested && due
            }
        };
        if fetch {
            self.last_fetch = Some(now);
            self.counters.fetches += 1;
        }
        fetch
    }

    /// The period of the shard's timer that asks [`JwksCache::should_fetch`] with
    /// [`FetchReason::Periodic`]: `min_fetch_interval`, so that a failed first fetch or refresh
    /// is retried at that rate (the refresh interval is never shorter, see config).
    pub fn min_fetch_interval(&self) -> Duration {
        self.min_fetch_interval
    }

    /// The counts so far.
    pub fn counters(&self) -> JwksCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::token::test_keys::{self, Pair};
    use serde_json::json;
    use std::sync::OnceLock;

    const SEC: Duration = Duration::from_secs(1);

    fn rsa_key() -> &'static Pair {
        static KEY: OnceLock<Pair> = OnceLock::new();
        KEY.get_or_init(|| test_keys::rsa(2048))
    }

    fn jwk(pair: &Pair, kid: &str) -> serde_json::Value {
        let mut j = pair.jwk.clone();
        j["kid"] = json!(kid);
        j
    }

    fn body(v: serde_json::Value) -> Vec<u8> {
        v.to_string().into_bytes()
    }

    #[test]
    fn unknown_kid_fetches_are_rate_limited() {
        let t0 = Instant::now();
        let mut c = JwksCache::new(10 * SEC, Some(3600 * SEC));
        assert!(
            c.should_fetch(t0, FetchReason::UnknownKid),
            "the first one goes"
        );
        for s in [0, 1, 5, 9] {
            assert!(
                !c.should_fetch(t0 + s * SEC, FetchReason::UnknownKid),
                "{s} s"
            );
        }
        assert!(c.should_fetch(t0 + 10 * SEC, FetchReason::UnknownKid));
        assert!(!c.should_fetch(t0 + 11 * SEC, FetchReason::UnknownKid));
        assert!(c.should_fetch(t0 + 25 * SEC, FetchReason::UnknownKid));
        let n = c.counters();
        assert_eq!((n.fetches, n.unknown_kid_fetches_refused), (3, 5));
    }

    #[test]
    fn periodic_refresh_is_due_first_then_after_the_refresh_interval() {
        let t0 = Instant::now();
        let mut c = JwksCache::new(10 * SEC, Some(100 * SEC));
        assert!(
            c.should_fetch(t0, FetchReason::Periodic),
            "nothing fetched yet"
        );
        // The first fetch failed: retried after the minimum interval, not before.
        c.fetch_failed();
        assert!(!c.should_fetch(t0 + 5 * SEC, FetchReason::Periodic));
        assert!(c.should_fetch(t0 + 10 * SEC, FetchReason::Periodic));
        let ec = test_keys::p256();
        c.update(&body(json!({"keys": [jwk(&ec, "e")]})), t0 + 11 * SEC)
            .unwrap();
        for s in [20, 60, 110] {
            assert!(
                !c.should_fetch(t0 + s * SEC, FetchReason::Periodic),
                "{s} s"
            );
        }
        assert!(c.should_fetch(t0 + 111 * SEC, FetchReason::Periodic));
        // An unknown kid right after a periodic fetch waits for the interval too.
        assert!(!c.should_fetch(t0 + 112 * SEC, FetchReason::UnknownKid));
        // Without a refresh interval: only the first fetch is periodic.
        let mut once = JwksCache::new(10 * SEC, None);
        assert!(once.should_fetch(t0, FetchReason::Periodic));
        once.update(&body(json!({"keys": [jwk(&ec, "e")]})), t0)
            .unwrap();
        assert!(!once.should_fetch(t0 + 100_000 * SEC, FetchReason::Periodic));
        assert!(once.should_fetch(t0 + 100_000 * SEC, FetchReason::UnknownKid));
    }

    #[test]
    fn a_bad_body_keeps_the_last_good_set() {
        let now = Instant::now();
        let ec = test_keys::p256();
        let mut c = JwksCache::new(SEC, None);
        assert!(c.is_empty());
        assert_eq!(
            c.update(&body(json!({"keys": [jwk(&ec, "a")]})), now),
            Ok(1)
        );
        let bad: [(&[u8], &str); 6] = [
            (b"<html>502 Bad Gateway</html>", "not a JWK Set"),
            (b"{\"keys\": 3}", "not a JWK Set"),
            (b"{\"keys\": []}", "the set is empty"),
            (b"{\"keys\": [{\"kty\": \"oct\", \"kid\": \"h\", \"k\": \"c2VjcmV0\"}]}", "\"oct\""),
            (b"{\"keys\": [{\"kty\": \"EC\", \"crv\": \"P-256\", \"kid\": \"b\", \"x\": \"AA\", \"y\": \"AA\"}]}", "not a point"),
            (b"{\"keys\": [{\"kty\": \"RSA\", \"n\": \"AQAB\", \"e\": \"AQAB\"}]}", "no kid"),
        ];
        for (b, why) in bad {
            let err = c.update(b, now).unwrap_err();
            assert!(err.contains(why), "{err}");
            assert_eq!(c.len(), 1, "{why}");
            assert!(c.key("a").is_some(), "{why}");
        }
        assert_eq!(c.counters().failures, 6);
        assert_eq!(c.counters().updates, 1);
        // A good body replaces the set: keys no longer published stop verifying.
        let other = test_keys::p384();
        assert_eq!(
            c.update(&body(json!({"keys": [jwk(&other, "b")]})), now),
            Ok(1)
        );
        assert!(c.key("a").is_none() && c.key("b").is_some());
    }

    #[test]
    fn keys_by_kid_and_what_is_skipped() {
        let rsa = rsa_key();
        let (p256, p384) = (test_keys::p256(), test_keys::p384());
        let small = test_keys::rsa(1024);
        let mut enc = jwk(rsa, "enc");
        enc["use"] = json!("enc");
        let mut pinned = jwk(rsa, "pinned");
        pinned["alg"] = json!("PS256");
        let mut wrong_alg = jwk(&p256, "wrong-alg");
        wrong_alg["alg"] = json!("RS256");
        let mut sig = jwk(&p384, "sig");
        sig["use"] = json!("sig");
        let set = json!({"keys": [
            jwk(rsa, "r"),
            jwk(&p256, "p256"),
            sig,
            pinned,
            enc,
            wrong_alg,
            jwk(&small, "small"),
            jwk(&p256, "r"),
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            "not an object",
        ]});
        let mut c = JwksCache::new(SEC, None);
        assert_eq!(c.update(&body(set), Instant::now()), Ok(4));
        use Algorithm::*;
        let r = c.key("r").unwrap();
        assert!([RS256, RS384, RS512, PS256, PS384, PS512]
            .iter()
            .all(|a| r.accepts(*a)));
        assert!(
            !r.accepts(ES256) && !r.accepts(HS256),
            "the first key with kid r"
        );
        let p = c.key("p256").unwrap();
        assert!(p.accepts(ES256) && !p.accepts(ES384) && !p.accepts(RS256));
        let s = c.key("sig").unwrap();
        assert!(s.accepts(ES384) && !s.accepts(ES256));
        let pinned = c.key("pinned").unwrap();
        assert!(pinned.accepts(PS256) && !pinned.accepts(RS256));
        for skipped in ["enc", "wrong-alg", "small", "ed", "p521", "hmac", "nope"] {
            assert!(c.key(skipped).is_none(), "{skipped}");
        }
    }

    #[test]
    fn rs256_and_es256_jwks_verify_tokens() {
        use crate::protocol::token::{TokenError, TokenKeys, TokenVerifier};
        let rsa = rsa_key();
        let ec = test_keys::p256();
        let mut c = JwksCache::new(SEC, None);
        c.update(
            &body(json!({"keys": [jwk(rsa, "rk"), jwk(&ec, "ek")]})),
            Instant::now(),
        )
        .unwrap();
        let v = TokenVerifier::with_keys(
            TokenKeys {
                jwks: Some(c),
                ..TokenKeys::default()
            },
            "",
            "",
        );
        let claims = json!({"sub": "bob"});
        let rs = test_keys::sign(rsa, Algorithm::RS256, Some("rk"), &claims);
        let es = test_keys::sign(&ec, Algorithm::ES256, Some("ek"), &claims);
        assert_eq!(v.connect(&rs, 1).unwrap().sub, "bob");
        assert_eq!(v.connect(&es, 1).unwrap().sub, "bob");
        let swapped = test_keys::sign(&ec, Algorithm::ES256, Some("rk"), &claims);
        assert_eq!(v.connect(&swapped, 1).unwrap_err(), TokenError::Invalid);
    }
}
