//! JWT connection and subscription tokens, and the public keys that verify them.
//!
//! Algorithms (jsonwebtoken 11 with its pure-Rust `rust_crypto` backend): HS256/384/512 with
//! `token_hmac_secret`; RS256/384/512 and PS256/384/512 with an RSA public key of at least
//! 2048 bits; ES256 (P-256) and ES384 (P-384) with an ECDSA public key. ES512 (P-521) and EdDSA
//! are not offered: the backend has no P-521, and no key source here carries Ed25519 keys.
//!
//! Which key verifies a token is decided by its header alone, never by trying keys: `alg`
//! picks the family (HMAC, RSA, EC), and a token whose family has no configured key is
//! invalid, so that a public key is never used as an HMAC secret (no algorithm confusion). For
//! RSA and EC tokens, a `kid` names a key of the JWK Set ([`JwksCache`], `token_jwks_url`)
//! when one is configured; a token without `kid` uses the PEM file of its family
//! (`token_rsa_public_key_file`, `token_ecdsa_public_key_file`). A `kid` the set lacks is
//! [`TokenError::UnknownKey`]: the shard may fetch the set again and verify once more.
//!
//! Expiry is checked here rather than by the JWT library so that an expired token (error 109,
//! the SDK refreshes) is told apart from an invalid one (disconnect 3500, the SDK stops).
//! Audience and issuer are checked by the JWT library, for every algorithm, when the
//! configuration names them (`token_audience`, `token_issuer`): a token without the claim, or
//! with another value, is invalid.
//!
//! A verifier belongs to one shard (its JWK Set sits in a `RefCell`); verifying never blocks
//! and never does I/O.

use crate::config::{Config, ConfigError};
use crate::protocol::jwks::JwksCache;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::cell::RefCell;

/// Claims of a connection token.
#[derive(Debug, Deserialize, Serialize, Default)]
pub struct ConnectClaims {
    /// The user id; may be empty for an anonymous user.
    #[serde(default)]
    pub sub: String,
    /// Expiry, seconds since the Unix epoch. Absent: never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Connection info attached to presence and publications.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Box<RawValue>>,
    /// Server-side subscriptions made at connect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
}

/// Claims of a subscription token.
#[derive(Debug, Deserialize, Serialize, Default)]
pub struct SubscribeClaims {
    /// The user the token is for: must be the connection's user.
    #[serde(default)]
    pub sub: String,
    /// The channel the token opens.
    pub channel: String,
    /// Expiry, seconds since the Unix epoch. Absent: the subscription never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// When set, only the connection with this client id may use the token.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client: String,
    /// The subscription's info: `chan_info` in the channel's presence entries and join/leave
    /// messages (any JSON value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Box<RawValue>>,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Bad signature, an algorithm without a configured key, malformed: the client should not
    /// retry with it.
    #[error("invalid token")]
    Invalid,
    /// Well-formed and signed, but past its `exp`.
    #[error("token expired")]
    Expired,
    /// An RSA or EC token whose `kid` is not in the JWK Set (yet): the shard may fetch the set
    /// (when [`JwksCache::should_fetch`] allows) and verify the token once more; otherwise, or
    /// if it is still unknown then, treat it as [`TokenError::Invalid`].
    #[error("token signed with an unknown key")]
    UnknownKey,
}

/// The algorithms a public key verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyAlgorithms {
    /// RS256/384/512, PS256/384/512.
    Rsa,
    /// ES256 (a P-256 key).
    Es256,
    /// ES384 (a P-384 key).
    Es384,
    /// One algorithm only (a JWK that names its `alg`).
    Only(Algorithm),
}

/// A public key that verifies tokens, with the algorithms it may verify.
#[derive(Clone)]
pub struct PublicKey {
    key: DecodingKey,
    algorithms: KeyAlgorithms,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// RFC 7518 §3.3: RSA keys for RS*/PS* have at least 2048 bits.
const MIN_RSA_BITS: usize = 2048;

fn family_of(alg: Algorithm) -> Family {
    use Algorithm::*;
    match alg {
        HS256 | HS384 | HS512 => Family::Hmac,
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Family::Rsa,
        ES256 | ES384 => Family::Ec,
        _ => Family::Unsupported, // EdDSA, and whatever a later version adds
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Hmac,
    Rsa,
    Ec,
    Unsupported,
}

/// The label of the first PEM block in `text` (`BEGIN <label>`), if any.
fn pem_label(text: &str) -> Option<&str> {
    let start = text.find("-----BEGIN ")? + "-----BEGIN ".len();
    let rest = &text[start..];
    Some(&rest[..rest.find("-----")?])
}

impl PublicKey {
    /// An RSA key from its big-endian modulus and exponent (a JWK's `n` and `e`).
    pub fn rsa(n: &[u8], e: &[u8]) -> Result<Self, String> {
        let key = rsa::RsaPublicKey::new(
            rsa::BigUint::from_bytes_be(n),
            rsa::BigUint::from_bytes_be(e),
        )
        .map_err(|e| format!("not a valid RSA public key ({e})"))?;
        Self::from_rsa(&key)
    }

    fn from_rsa(key: &rsa::RsaPublicKey) -> Result<Self, String> {
        use rsa::traits::PublicKeyParts;
        let bits = key.n().bits();
        if bits < MIN_RSA_BITS {
            return Err(format!(
                "the RSA key has {bits} bits; tokens need at least {MIN_RSA_BITS}"
            ));
        }
        Ok(PublicKey {
            key: DecodingKey::from_rsa_raw_components(
                &key.n().to_bytes_be(),
                &key.e().to_bytes_be(),
            ),
            algorithms: KeyAlgorithms::Rsa,
        })
    }

    /// An EC key from its SEC1 point (`04 || x || y`, as a JWK's `x` and `y`) on P-256
    /// (`p384` false: ES256) or P-384 (`p384` true: ES384).
    pub fn ec(sec1: &[u8], p384: bool) -> Result<Self, String> {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        let (point, algorithms) = if p384 {
            let key = p384::PublicKey::from_sec1_bytes(sec1)
                .map_err(|_| "not a point on P-384".to_string())?;
            (
                key.to_encoded_point(false).as_bytes().to_vec(),
                KeyAlgorithms::Es384,
            )
        } else {
            let key = p256::PublicKey::from_sec1_bytes(sec1)
                .map_err(|_| "not a point on P-256".to_string())?;
            (
                key.to_encoded_point(false).as_bytes().to_vec(),
                KeyAlgorithms::Es256,
            )
        };
        Ok(PublicKey {
            key: DecodingKey::from_ec_der(&point),
            algorithms,
        })
    }

    /// An RSA public key from PEM text: a `PUBLIC KEY` (SubjectPublicKeyInfo) or an
    /// `RSA PUBLIC KEY` (PKCS#1) block.
    pub fn from_rsa_pem(text: &str) -> Result<Self, String> {
        use rsa::pkcs1::DecodeRsaPublicKey;
        use rsa::pkcs8::DecodePublicKey;
        let key = match pem_label(text) {
            Some("PUBLIC KEY") => rsa::RsaPublicKey::from_public_key_pem(text.trim())
                .map_err(|e| format!("is not an RSA public key ({e})"))?,
            Some("RSA PUBLIC KEY") => rsa::RsaPublicKey::from_pkcs1_pem(text.trim())
                .map_err(|e| format!("is not an RSA public key ({e})"))?,
            Some(other) => {
                return Err(format!(
                    "holds a \"{other}\" PEM block; expected \"PUBLIC KEY\" or \"RSA PUBLIC KEY\""
                ))
            }
            None => return Err("is not PEM (no -----BEGIN line)".into()),
        };
        Self::from_rsa(&key)
    }

    /// An ECDSA public key (P-256 or P-384) from a PEM `PUBLIC KEY` block.
    pub fn from_ecdsa_pem(text: &str) -> Result<Self, String> {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        use p256::pkcs8::DecodePublicKey;
        match pem_label(text) {
            Some("PUBLIC KEY") => {}
            Some(other) => {
                return Err(format!(
                    "holds a \"{other}\" PEM block; expected \"PUBLIC KEY\""
                ))
            }
            None => return Err("is not PEM (no -----BEGIN line)".into()),
        }
        if let Ok(key) = p256::PublicKey::from_public_key_pem(text.trim()) {
            return Self::ec(key.to_encoded_point(false).as_bytes(), false);
        }
        if let Ok(key) = p384::PublicKey::from_public_key_pem(text.trim()) {
            return Self::ec(key.to_encoded_point(false).as_bytes(), true);
        }
        Err("is not a P-256 or P-384 ECDSA public key (P-521/ES512 is not supported)".into())
    }

    /// Narrows the key to one algorithm (a JWK's `alg`); `None` when the key cannot verify it.
    pub fn only(self, alg: Algorithm) -> Option<Self> {
        self.accepts(alg).then_some(PublicKey {
            key: self.key,
            algorithms: KeyAlgorithms::Only(alg),
        })
    }

    /// Whether this key may verify a token with `alg`.
    pub fn accepts(&self, alg: Algorithm) -> bool {
        match self.algorithms {
            KeyAlgorithms::Rsa => family_of(alg) == Family::Rsa,
            KeyAlgorithms::Es256 => alg == Algorithm::ES256,
            KeyAlgorithms::Es384 => alg == Algorithm::ES384,
            KeyAlgorithms::Only(a) => a == alg,
        }
    }
}

/// The keys a verifier checks tokens with; any may be absent.
#[derive(Default)]
pub struct TokenKeys {
    /// HS256/384/512 secret; empty = HMAC tokens are refused.
    pub hmac_secret: String,
    /// Verifies RSA tokens without `kid` (or all, without a JWK Set).
    pub rsa: Option<PublicKey>,
    /// Verifies ECDSA tokens without `kid` (or all, without a JWK Set).
    pub ecdsa: Option<PublicKey>,
    /// Verifies RSA and EC tokens with a `kid`.
    pub jwks: Option<JwksCache>,
}

/// Verifies tokens with the configured keys.
pub struct TokenVerifier {
    hmac: Option<DecodingKey>,
    rsa: Option<PublicKey>,
    ecdsa: Option<PublicKey>,
    /// The shard's JWK Set; borrowed only for the duration of one verification.
    jwks: Option<RefCell<JwksCache>>,
    /// Claim checks, one per key family: the library wants every algorithm a validation lists
    /// to be of the key's family.
    hmac_validation: Validation,
    rsa_validation: Validation,
    ec_validation: Validation,
}

impl TokenVerifier {
    /// A verifier for an HMAC secret that ignores `aud` and `iss`.
    pub fn new(secret: &str) -> Self {
        Self::with_claims(secret, "", "")
    }

    /// A verifier for an HMAC secret that requires `aud` to name `audience` and `iss` to be
    /// `issuer` (each unless empty: then that claim is not checked).
    pub fn with_claims(secret: &str, audience: &str, issuer: &str) -> Self {
        let keys = TokenKeys {
            hmac_secret: secret.into(),
            ..TokenKeys::default()
        };
        Self::with_keys(keys, audience, issuer)
    }

    /// A verifier for `keys`, checking `aud` and `iss` as [`TokenVerifier::with_claims`].
    pub fn with_keys(keys: TokenKeys, audience: &str, issuer: &str) -> Self {
        use Algorithm::*;
        let mut validation = Validation::new(HS256);
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        // Without a configured audience, `aud` is ignored (the library would refuse every
        // token that has one).
        validation.validate_aud = !audience.is_empty();
        if !audience.is_empty() {
            validation.set_audience(&[audience]);
            validation.required_spec_claims.insert("aud".into());
        }
        if !issuer.is_empty() {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        // The key is chosen by the token's `alg` before the library sees it; the library then
        // checks again that the `alg` is one of these and that the key's family fits.
        let only = |algorithms: &[Algorithm]| Validation {
            algorithms: algorithms.to_vec(),
            ..validation.clone()
        };
        TokenVerifier {
            hmac: (!keys.hmac_secret.is_empty())
                .then(|| DecodingKey::from_secret(keys.hmac_secret.as_bytes())),
            rsa: keys.rsa,
            ecdsa: keys.ecdsa,
            jwks: keys.jwks.map(RefCell::new),
            hmac_validation: only(&[HS256, HS384, HS512]),
            rsa_validation: only(&[RS256, RS384, RS512, PS256, PS384, PS512]),
            ec_validation: only(&[ES256, ES384]),
        }
    }

    /// The verifier a configuration asks for: reads and parses the key files. `Ok(None)` when
    /// no key source is configured. The error names the key and the file.
    pub fn from_config(cfg: &Config) -> Result<Option<Self>, ConfigError> {
        if !cfg.has_token_keys() {
            return Ok(None);
        }
        let keys = TokenKeys {
            hmac_secret: cfg.token_hmac_secret.clone(),
            rsa: read_key_file(
                "token_rsa_public_key_file",
                &cfg.token_rsa_public_key_file,
                PublicKey::from_rsa_pem,
            )?,
            ecdsa: read_key_file(
                "token_ecdsa_public_key_file",
                &cfg.token_ecdsa_public_key_file,
                PublicKey::from_ecdsa_pem,
            )?,
            jwks: JwksCache::from_config(cfg),
        };
        Ok(Some(Self::with_keys(
            keys,
            &cfg.token_audience,
            &cfg.token_issuer,
        )))
    }

    /// The shard's JWK Set, when `token_jwks_url` is configured: feed it fetched bodies
    /// ([`JwksCache::update`]) and ask it when to fetch ([`JwksCache::should_fetch`]). Do not
    /// hold the borrow across an `.await`.
    pub fn jwks(&self) -> Option<&RefCell<JwksCache>> {
        self.jwks.as_ref()
    }

    fn decode<T: for<'de> Deserialize<'de>>(&self, token: &str) -> Result<T, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        let alg = header.alg;
        let family = family_of(alg);
        let check = |key: &DecodingKey| {
            let validation = match family {
                Family::Hmac => &self.hmac_validation,
                Family::Rsa => &self.rsa_validation,
                Family::Ec | Family::Unsupported => &self.ec_validation,
            };
            jsonwebtoken::decode::<T>(token, key, validation)
                .map(|d| d.claims)
                .map_err(|_| TokenError::Invalid)
        };
        let check_public = |key: Option<&PublicKey>| match key {
            Some(k) if k.accepts(alg) => check(&k.key),
            _ => Err(TokenError::Invalid),
        };
        let kid = header.kid.as_deref().filter(|k| !k.is_empty());
        match family {
            Family::Hmac => self.hmac.as_ref().map_or(Err(TokenError::Invalid), check),
            Family::Rsa | Family::Ec if kid.is_some() && self.jwks.is_some() => {
                let (Some(kid), Some(jwks)) = (kid, &self.jwks) else {
                    unreachable!("matched by the guard");
                };
                let jwks = jwks.borrow();
                match jwks.key(kid) {
                    Some(key) => check_public(Some(key)),
                    None => Err(TokenError::UnknownKey),
                }
            }
            Family::Rsa => check_public(self.rsa.as_ref()),
            Family::Ec => check_public(self.ecdsa.as_ref()),
            Family::Unsupported => Err(TokenError::Invalid),
        }
    }

    /// Verifies a connection token at `now_secs`.
    pub fn connect(&self, token: &str, now_secs: u64) -> Result<ConnectClaims, TokenError> {
        let claims: ConnectClaims = self.decode(token)?;
        match claims.exp {
            Some(exp) if exp <= now_secs => Err(TokenError::Expired),
            _ => Ok(claims),
        }
    }

    /// Verifies a subscription token for `channel`, `user` and `client` (the connection's
    /// client id) at `now_secs`.
    pub fn subscribe(
        &self,
        token: &str,
        channel: &str,
        user: &str,
        client: &str,
        now_secs: u64,
    ) -> Result<SubscribeClaims, TokenError> {
        let claims: SubscribeClaims = self.decode(token)?;
        if claims.channel != channel
            || claims.sub != user
            || (!claims.client.is_empty() && claims.client != client)
        {
            return Err(TokenError::Invalid);
        }
        match claims.exp {
            Some(exp) if exp <= now_secs => Err(TokenError::Expired),
            _ => Ok(claims),
        }
    }
}

/// Reads and parses the PEM key file at `path` (config key `key`); `None` when `path` is empty.
fn read_key_file(
    key: &str,
    path: &str,
    parse: fn(&str) -> Result<PublicKey, String>,
) -> Result<Option<PublicKey>, ConfigError> {
    if path.is_empty() {
        return Ok(None);
    }
    let problem = |p: String| ConfigError::Invalid {
        key: key.into(),
        problem: format!("file {path} {p}"),
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| problem(format!("cannot be read: {e}")))?;
    parse(&text).map(Some).map_err(problem)
}

/// Signs a connection token (for `shardcast gentoken` and tests).
pub fn sign_connect(secret: &str, claims: &ConnectClaims) -> String {
    sign(secret, claims)
}

/// Signs any claims with HS256 (subscription tokens, tokens with `aud`/`iss`; tests).
pub fn sign<T: Serialize>(secret: &str, claims: &T) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing of plain claims cannot fail")
}

/// Key pairs made in the test; shared with the e2e tests.
#[cfg(test)]
#[path = "../../tests/support/keys.rs"]
pub(crate) mod test_keys;

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(sub: &str, exp: Option<u64>) -> ConnectClaims {
        ConnectClaims {
            sub: sub.into(),
            exp,
            ..Default::default()
        }
    }

    #[test]
    fn valid_expired_and_forged() {
        let v = TokenVerifier::new("secret");
        let t = sign_connect("secret", &claims("alice", Some(2000)));
        assert_eq!(v.connect(&t, 1000).unwrap().sub, "alice");
        assert_eq!(v.connect(&t, 2000).unwrap_err(), TokenError::Expired);
        let forged = sign_connect("other", &claims("alice", None));
        assert_eq!(v.connect(&forged, 1000).unwrap_err(), TokenError::Invalid);
        assert_eq!(v.connect("abc.def", 1).unwrap_err(), TokenError::Invalid);
    }

    #[test]
    fn no_exp_never_expires_and_info_channels_pass() {
        let v = TokenVerifier::new("k");
        let mut c = claims("bob", None);
        c.info = Some(RawValue::from_string("{\"name\":\"Bob\"}".into()).unwrap());
        c.channels = vec!["news".into()];
        let t = sign_connect("k", &c);
        let got = v.connect(&t, u64::MAX - 1).unwrap();
        assert_eq!(got.channels, vec!["news".to_string()]);
        assert_eq!(got.info.unwrap().get(), "{\"name\":\"Bob\"}");
    }

    #[test]
    fn audience_and_issuer_when_configured() {
        let open = TokenVerifier::new("k");
        let v = TokenVerifier::with_claims("k", "app", "auth");
        let only_aud = TokenVerifier::with_claims("k", "app", "");
        let t = |extra: serde_json::Value| {
            let mut c = serde_json::json!({"sub": "alice", "channel": "c"});
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            sign("k", &c)
        };
        let good = t(serde_json::json!({"aud": "app", "iss": "auth"}));
        assert_eq!(v.connect(&good, 1).unwrap().sub, "alice");
        assert_eq!(
            v.subscribe(&good, "c", "alice", "x", 1).unwrap().sub,
            "alice"
        );
        assert!(
            open.connect(&good, 1).is_ok(),
            "claims ignored when not configured"
        );
        let aud_list = t(serde_json::json!({"aud": ["app"], "iss": "auth"}));
        assert!(v.connect(&aud_list, 1).is_ok(), "aud as a list");
        for bad in [
            serde_json::json!({"aud": "other", "iss": "auth"}),
            serde_json::json!({"aud": "app", "iss": "other"}),
            serde_json::json!({"iss": "auth"}),
            serde_json::json!({"aud": "app"}),
            serde_json::json!({}),
        ] {
            let token = t(bad.clone());
            assert_eq!(
                v.connect(&token, 1).unwrap_err(),
                TokenError::Invalid,
                "{bad}"
            );
            assert_eq!(
                v.subscribe(&token, "c", "alice", "x", 1).unwrap_err(),
                TokenError::Invalid,
                "{bad}"
            );
        }
        let no_iss = t(serde_json::json!({"aud": "app"}));
        assert!(only_aud.connect(&no_iss, 1).is_ok(), "iss not configured");
    }

    #[test]
    fn subscription_token_binds_channel_user_and_client() {
        let v = TokenVerifier::new("k");
        let claims = |client: &str, exp| SubscribeClaims {
            sub: "alice".into(),
            channel: "$c".into(),
            exp,
            client: client.into(),
            info: None,
        };
        let t = sign("k", &claims("", Some(2000)));
        assert_eq!(
            v.subscribe(&t, "$c", "alice", "id1", 1000).unwrap().exp,
            Some(2000)
        );
        assert_eq!(
            v.subscribe(&t, "$d", "alice", "id1", 1000).unwrap_err(),
            TokenError::Invalid
        );
        assert_eq!(
            v.subscribe(&t, "$c", "bob", "id1", 1000).unwrap_err(),
            TokenError::Invalid
        );
        assert_eq!(
            v.subscribe(&t, "$c", "alice", "id1", 2000).unwrap_err(),
            TokenError::Expired
        );
        let bound = sign("k", &claims("id1", None));
        assert!(v.subscribe(&bound, "$c", "alice", "id1", 1000).is_ok());
        assert_eq!(
            v.subscribe(&bound, "$c", "alice", "id2", 1000).unwrap_err(),
            TokenError::Invalid
        );
    }
}

#[cfg(test)]
mod asymmetric_tests {
    use super::test_keys::{self, Pair};
    use super::*;
    use serde_json::json;
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    /// Two RSA pairs, made once per test process (RSA key generation is the slow part).
    fn rsa_keys() -> &'static (Pair, Pair) {
        static KEYS: OnceLock<(Pair, Pair)> = OnceLock::new();
        KEYS.get_or_init(|| (test_keys::rsa(2048), test_keys::rsa(2048)))
    }

    fn keys(rsa: Option<&Pair>, ec: Option<&Pair>) -> TokenKeys {
        TokenKeys {
            rsa: rsa.map(|p| PublicKey::from_rsa_pem(&p.public_pem).unwrap()),
            ecdsa: ec.map(|p| PublicKey::from_ecdsa_pem(&p.public_pem).unwrap()),
            ..TokenKeys::default()
        }
    }

    fn claims(exp: Option<u64>, extra: serde_json::Value) -> serde_json::Value {
        let mut c = json!({"sub": "alice", "channel": "$c"});
        if let Some(exp) = exp {
            c["exp"] = json!(exp);
        }
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    }

    #[test]
    fn rsa_algorithms_are_accepted_and_other_keys_refused() {
        let (key, other) = rsa_keys();
        let v = TokenVerifier::with_keys(keys(Some(key), None), "", "");
        // The same key as PKCS#1 PEM.
        let pkcs1 = TokenVerifier::with_keys(
            TokenKeys {
                rsa: Some(PublicKey::from_rsa_pem(&key.pkcs1_pem).unwrap()),
                ..TokenKeys::default()
            },
            "",
            "",
        );
        use Algorithm::*;
        for alg in [RS256, RS384, RS512, PS256, PS384, PS512] {
            let t = test_keys::sign(key, alg, None, &claims(Some(2000), json!({})));
            assert_eq!(v.connect(&t, 1000).unwrap().sub, "alice", "{alg:?}");
            assert_eq!(pkcs1.connect(&t, 1000).unwrap().sub, "alice", "{alg:?}");
            assert!(v.subscribe(&t, "$c", "alice", "x", 1000).is_ok(), "{alg:?}");
            assert_eq!(
                v.connect(&t, 2000).unwrap_err(),
                TokenError::Expired,
                "{alg:?}"
            );
            let forged = test_keys::sign(other, alg, None, &claims(Some(2000), json!({})));
            assert_eq!(
                v.connect(&forged, 1000).unwrap_err(),
                TokenError::Invalid,
                "{alg:?}"
            );
        }
        // Without an HMAC secret, HS256 is refused; without an EC key, ES256 too.
        assert_eq!(
            v.connect(&sign("k", &claims(None, json!({}))), 1)
                .unwrap_err(),
            TokenError::Invalid
        );
        let ec = test_keys::p256();
        let t = test_keys::sign(&ec, ES256, None, &claims(None, json!({})));
        assert_eq!(v.connect(&t, 1).unwrap_err(), TokenError::Invalid);
    }

    #[test]
    fn ecdsa_algorithms_are_accepted_and_other_keys_refused() {
        use Algorithm::*;
        for (key, other, alg, wrong_alg) in [
            (test_keys::p256(), test_keys::p256(), ES256, ES384),
            (test_keys::p384(), test_keys::p384(), ES384, ES256),
        ] {
            let v = TokenVerifier::with_keys(keys(None, Some(&key)), "", "");
            let t = test_keys::sign(&key, alg, None, &claims(Some(2000), json!({})));
            assert_eq!(v.connect(&t, 1000).unwrap().sub, "alice", "{alg:?}");
            assert!(v.subscribe(&t, "$c", "alice", "x", 1000).is_ok());
            assert_eq!(v.connect(&t, 2000).unwrap_err(), TokenError::Expired);
            let forged = test_keys::sign(&other, alg, None, &claims(Some(2000), json!({})));
            assert_eq!(v.connect(&forged, 1000).unwrap_err(), TokenError::Invalid);
            // A token that claims the other curve's algorithm is refused before any math.
            let mut parts: Vec<String> = t.split('.').map(String::from).collect();
            let header = json!({"alg": format!("{wrong_alg:?}"), "typ": "JWT"}).to_string();
            parts[0] =
                base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header);
            assert_eq!(
                v.connect(&parts.join("."), 1000).unwrap_err(),
                TokenError::Invalid
            );
        }
    }

    #[test]
    fn no_algorithm_confusion() {
        let (key, _) = rsa_keys();
        let ec = test_keys::p256();
        // A server with only public keys: an HMAC token signed with a public key's PEM text
        // (what an attacker knows) is refused, for every spelling of the key.
        let v = TokenVerifier::with_keys(keys(Some(key), Some(&ec)), "", "");
        for secret in [&key.public_pem, &key.pkcs1_pem, &ec.public_pem] {
            for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
                let t = jsonwebtoken::encode(
                    &Header::new(alg),
                    &claims(None, json!({})),
                    &EncodingKey::from_secret(secret.as_bytes()),
                )
                .unwrap();
                assert_eq!(
                    v.connect(&t, 1).unwrap_err(),
                    TokenError::Invalid,
                    "{alg:?}"
                );
            }
        }
        // With an HMAC secret configured too, such a token is still refused (the secret, not
        // the public key, verifies HMAC tokens).
        let mut with_secret = keys(Some(key), Some(&ec));
        with_secret.hmac_secret = "the-real-secret".into();
        let v = TokenVerifier::with_keys(with_secret, "", "");
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(None, json!({})),
            &EncodingKey::from_secret(key.public_pem.as_bytes()),
        )
        .unwrap();
        assert_eq!(v.connect(&t, 1).unwrap_err(), TokenError::Invalid);
        assert!(v
            .connect(&sign("the-real-secret", &claims(None, json!({}))), 1)
            .is_ok());
        // "none" is not an algorithm we take.
        let none = format!(
            "{}.{}.",
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                r#"{"alg":"none"}"#
            ),
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                r#"{"sub":"alice"}"#
            )
        );
        assert_eq!(v.connect(&none, 1).unwrap_err(), TokenError::Invalid);
    }

    #[test]
    fn audience_and_issuer_apply_to_rsa_and_ecdsa() {
        let (key, _) = rsa_keys();
        let ec = test_keys::p256();
        let v = TokenVerifier::with_keys(keys(Some(key), Some(&ec)), "app", "auth");
        for (pair, alg) in [(key, Algorithm::RS256), (&ec, Algorithm::ES256)] {
            let good = test_keys::sign(
                pair,
                alg,
                None,
                &claims(None, json!({"aud": "app", "iss": "auth"})),
            );
            assert_eq!(v.connect(&good, 1).unwrap().sub, "alice", "{alg:?}");
            assert!(v.subscribe(&good, "$c", "alice", "x", 1).is_ok(), "{alg:?}");
            for bad in [
                json!({"aud": "other", "iss": "auth"}),
                json!({"aud": "app", "iss": "other"}),
                json!({"iss": "auth"}),
                json!({"aud": "app"}),
            ] {
                let t = test_keys::sign(pair, alg, None, &claims(None, bad.clone()));
                assert_eq!(
                    v.connect(&t, 1).unwrap_err(),
                    TokenError::Invalid,
                    "{alg:?} {bad}"
                );
                assert_eq!(
                    v.subscribe(&t, "$c", "alice", "x", 1).unwrap_err(),
                    TokenError::Invalid,
                    "{alg:?} {bad}"
                );
            }
        }
    }

    #[test]
    fn key_files_are_checked_with_the_key_and_file_named() {
        let (key, _) = rsa_keys();
        let ec = test_keys::p256();
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let rsa_file = file("rsa.pem", &key.public_pem);
        let ec_file = file("ec.pem", &ec.public_pem);
        let cfg = |rsa: &str, ecdsa: &str| Config {
            token_rsa_public_key_file: rsa.into(),
            token_ecdsa_public_key_file: ecdsa.into(),
            ..Config::default()
        };
        let v = TokenVerifier::from_config(&cfg(&rsa_file, &ec_file))
            .unwrap()
            .unwrap();
        let t = test_keys::sign(key, Algorithm::RS256, None, &claims(None, json!({})));
        assert!(v.connect(&t, 1).is_ok());
        let t = test_keys::sign(&ec, Algorithm::ES256, None, &claims(None, json!({})));
        assert!(v.connect(&t, 1).is_ok());
        assert!(TokenVerifier::from_config(&Config::default())
            .unwrap()
            .is_none());

        let small = test_keys::rsa(1024);
        let missing = dir.path().join("nope.pem").display().to_string();
        let private_pem = {
            use rsa::pkcs8::{EncodePrivateKey, LineEnding};
            rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024)
                .unwrap()
                .to_pkcs8_pem(LineEnding::LF)
                .unwrap()
                .to_string()
        };
        let cases = [
            (
                cfg(&missing, ""),
                "token_rsa_public_key_file",
                "cannot be read",
            ),
            (
                cfg(&file("junk", "hello"), ""),
                "token_rsa_public_key_file",
                "is not PEM",
            ),
            (
                cfg(&ec_file, ""),
                "token_rsa_public_key_file",
                "is not an RSA public key",
            ),
            (
                cfg(&file("priv", &private_pem), ""),
                "token_rsa_public_key_file",
                "\"PRIVATE KEY\"",
            ),
            (
                cfg(&file("small", &small.public_pem), ""),
                "token_rsa_public_key_file",
                "1024 bits",
            ),
            (
                cfg("", &rsa_file),
                "token_ecdsa_public_key_file",
                "P-256 or P-384",
            ),
            (
                cfg("", &file("pkcs1", &key.pkcs1_pem)),
                "token_ecdsa_public_key_file",
                "\"RSA PUBLIC KEY\"",
            ),
        ];
        for (c, key_name, problem) in cases {
            let err = TokenVerifier::from_config(&c)
                .err()
                .expect(problem)
                .to_string();
            assert!(err.contains(key_name) && err.contains(problem), "{err}");
            assert!(
                err.contains(dir.path().to_str().unwrap()),
                "names the file: {err}"
            );
        }
    }

    fn jwks_verifier(body: &serde_json::Value) -> TokenVerifier {
        let mut cache = JwksCache::new(Duration::from_secs(10), Some(Duration::from_secs(3600)));
        cache
            .update(body.to_string().as_bytes(), Instant::now())
            .unwrap();
        TokenVerifier::with_keys(
            TokenKeys {
                jwks: Some(cache),
                ..TokenKeys::default()
            },
            "app",
            "",
        )
    }

    fn with_kid(pair: &Pair, kid: &str, extra: serde_json::Value) -> serde_json::Value {
        let mut jwk = pair.jwk.clone();
        jwk["kid"] = json!(kid);
        jwk.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        jwk
    }

    #[test]
    fn jwks_keys_verify_by_kid() {
        let (key, other) = rsa_keys();
        let ec = test_keys::p256();
        let set = json!({"keys": [
            with_kid(key, "r1", json!({"use": "sig", "alg": "RS256"})),
            with_kid(&ec, "e1", json!({})),
        ]});
        let v = jwks_verifier(&set);
        let c = claims(Some(2000), json!({"aud": "app"}));
        let rs = test_keys::sign(key, Algorithm::RS256, Some("r1"), &c);
        assert_eq!(v.connect(&rs, 1000).unwrap().sub, "alice");
        assert_eq!(v.connect(&rs, 2000).unwrap_err(), TokenError::Expired);
        let es = test_keys::sign(&ec, Algorithm::ES256, Some("e1"), &c);
        assert_eq!(v.connect(&es, 1000).unwrap().sub, "alice");
        assert!(v.subscribe(&es, "$c", "alice", "x", 1000).is_ok());
        // The audience applies to JWKS keys too.
        let no_aud = test_keys::sign(key, Algorithm::RS256, Some("r1"), &claims(None, json!({})));
        assert_eq!(v.connect(&no_aud, 1).unwrap_err(), TokenError::Invalid);
        // The key's `alg` pins it: RS512 with the RS256 key is refused.
        let rs512 = test_keys::sign(key, Algorithm::RS512, Some("r1"), &c);
        assert_eq!(v.connect(&rs512, 1000).unwrap_err(), TokenError::Invalid);
        // Another key under a known kid: invalid. An unknown kid: unknown key (fetch again).
        let forged = test_keys::sign(other, Algorithm::RS256, Some("r1"), &c);
        assert_eq!(v.connect(&forged, 1000).unwrap_err(), TokenError::Invalid);
        let unknown = test_keys::sign(other, Algorithm::RS256, Some("r2"), &c);
        assert_eq!(
            v.connect(&unknown, 1000).unwrap_err(),
            TokenError::UnknownKey
        );
        assert_eq!(
            v.subscribe(&unknown, "$c", "alice", "x", 1000).unwrap_err(),
            TokenError::UnknownKey
        );
        // An RSA token naming the EC key's kid: invalid (the family does not fit).
        let crossed = test_keys::sign(key, Algorithm::RS256, Some("e1"), &c);
        assert_eq!(v.connect(&crossed, 1000).unwrap_err(), TokenError::Invalid);
        // A token without kid is not matched against the set, even a set of one key.
        let single = jwks_verifier(&json!({"keys": [with_kid(key, "only", json!({}))]}));
        let no_kid = test_keys::sign(key, Algorithm::RS256, None, &c);
        assert_eq!(
            single.connect(&no_kid, 1000).unwrap_err(),
            TokenError::Invalid
        );
        let named = test_keys::sign(key, Algorithm::RS256, Some("only"), &c);
        assert!(single.connect(&named, 1000).is_ok());
    }

    #[test]
    fn kid_tokens_use_the_set_and_others_the_key_file() {
        let (key, other) = rsa_keys();
        let mut k = keys(Some(other), None);
        let mut cache = JwksCache::new(Duration::from_secs(10), None);
        cache
            .update(
                json!({"keys": [with_kid(key, "r1", json!({}))]})
                    .to_string()
                    .as_bytes(),
                Instant::now(),
            )
            .unwrap();
        k.jwks = Some(cache);
        let v = TokenVerifier::with_keys(k, "", "");
        let c = claims(None, json!({}));
        assert!(v
            .connect(&test_keys::sign(key, Algorithm::RS256, Some("r1"), &c), 1)
            .is_ok());
        assert!(v
            .connect(&test_keys::sign(other, Algorithm::RS256, None, &c), 1)
            .is_ok());
        assert_eq!(
            v.connect(&test_keys::sign(key, Algorithm::RS256, None, &c), 1)
                .unwrap_err(),
            TokenError::Invalid
        );
        // The set is fed through the verifier's handle: a new key verifies at once.
        let rotated = test_keys::sign(other, Algorithm::PS256, Some("r2"), &c);
        assert_eq!(v.connect(&rotated, 1).unwrap_err(), TokenError::UnknownKey);
        let body =
            json!({"keys": [with_kid(key, "r1", json!({})), with_kid(other, "r2", json!({}))]});
        let n = v
            .jwks()
            .unwrap()
            .borrow_mut()
            .update(body.to_string().as_bytes(), Instant::now());
        assert_eq!(n, Ok(2));
        assert!(v.connect(&rotated, 1).is_ok());
    }
}
