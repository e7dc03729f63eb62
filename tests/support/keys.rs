//! Key pairs made in the test (never committed): an RSA or EC private key to sign tokens
//! with, and its public key as PEM and as JWK members. Used by the library's token tests
//! (`#[path]`) and by the e2e tests.

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use serde::Serialize;

pub struct Pair {
    pub sign_key: EncodingKey,
    /// `PUBLIC KEY` (SubjectPublicKeyInfo) PEM.
    pub public_pem: String,
    /// `RSA PUBLIC KEY` (PKCS#1) PEM, for RSA pairs.
    pub pkcs1_pem: String,
    /// The public key as a JWK without `kid` (add it).
    pub jwk: serde_json::Value,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn rsa(bits: usize) -> Pair {
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, bits).unwrap();
    let public = key.to_public_key();
    Pair {
        sign_key: EncodingKey::from_rsa_der(key.to_pkcs1_der().unwrap().as_bytes()),
        public_pem: public.to_public_key_pem(LineEnding::LF).unwrap(),
        pkcs1_pem: public.to_pkcs1_pem(LineEnding::LF).unwrap(),
        jwk: serde_json::json!({"kty": "RSA", "n": b64(&public.n().to_bytes_be()), "e": b64(&public.e().to_bytes_be())}),
    }
}

pub fn p256() -> Pair {
    let key = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let point = key.public_key().to_encoded_point(false);
    Pair {
        sign_key: EncodingKey::from_ec_der(key.to_pkcs8_der().unwrap().as_bytes()),
        public_pem: key.public_key().to_public_key_pem(LineEnding::LF).unwrap(),
        pkcs1_pem: String::new(),
        jwk: serde_json::json!({"kty": "EC", "crv": "P-256", "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())}),
    }
}

pub fn p384() -> Pair {
    let key = p384::SecretKey::random(&mut rand::rngs::OsRng);
    let point = key.public_key().to_encoded_point(false);
    Pair {
        sign_key: EncodingKey::from_ec_der(key.to_pkcs8_der().unwrap().as_bytes()),
        public_pem: key.public_key().to_public_key_pem(LineEnding::LF).unwrap(),
        pkcs1_pem: String::new(),
        jwk: serde_json::json!({"kty": "EC", "crv": "P-384", "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())}),
    }
}

/// Signs `claims` with `alg` and `pair`, with `kid` in the header when given.
pub fn sign<T: Serialize>(pair: &Pair, alg: Algorithm, kid: Option<&str>, claims: &T) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &pair.sign_key).unwrap()
}
