//! HS256 JWT connection and subscription tokens.
//!
//! Expiry is checked here rather than by the JWT library so that an expired token (error 109,
//! the SDK refreshes) is told apart from an invalid one (disconnect 3500, the SDK stops).

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
#[derive(Debug, Deserialize)]
pub struct SubscribeClaims {
    #[serde(default)]
    pub sub: String,
    pub channel: String,
    #[serde(default)]
    pub exp: Option<u64>,
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
    /// A verifier for an HS256 secret.
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        TokenVerifier {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
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

    /// Verifies a subscription token for `channel` and `user` at `now_secs`.
    pub fn subscribe(
        &self,
        token: &str,
        channel: &str,
        user: &str,
        now_secs: u64,
    ) -> Result<SubscribeClaims, TokenError> {
        let claims: SubscribeClaims = self.decode(token)?;
        if claims.channel != channel || claims.sub != user {
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
}
