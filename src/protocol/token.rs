//! HS256 JWT connection and subscription tokens.
//!
//! Expiry is checked here rather than by the JWT library so that an expired token (error 109,
//! the SDK refreshes) is told apart from an invalid one (disconnect 3500, the SDK stops).
//! Audience and issuer are checked by the JWT library when the configuration names them
//! (`token_audience`, `token_issuer`): a token without the claim, or with another value, is
//! invalid.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

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
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Bad signature, wrong algorithm, malformed: the client should not retry with it.
    #[error("invalid token")]
    Invalid,
    /// Well-formed and signed, but past its `exp`.
    #[error("token expired")]
    Expired,
}

/// Verifies tokens for one secret.
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl TokenVerifier {
    /// A verifier for an HS256 secret that ignores `aud` and `iss`.
    pub fn new(secret: &str) -> Self {
        Self::with_claims(secret, "", "")
    }

    /// A verifier for an HS256 secret that requires `aud` to name `audience` and `iss` to be
    /// `issuer` (each unless empty: then that claim is not checked).
    pub fn with_claims(secret: &str, audience: &str, issuer: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
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
        TokenVerifier {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// The verifier a configuration asks for; `None` without a secret.
    pub fn from_config(cfg: &crate::config::Config) -> Option<Self> {
        (!cfg.token_hmac_secret.is_empty()).then(|| {
            Self::with_claims(
                &cfg.token_hmac_secret,
                &cfg.token_audience,
                &cfg.token_issuer,
            )
        })
    }

    fn decode<T: for<'de> Deserialize<'de>>(&self, token: &str) -> Result<T, TokenError> {
        jsonwebtoken::decode::<T>(token, &self.key, &self.validation)
            .map(|d| d.claims)
            .map_err(|_| TokenError::Invalid)
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
