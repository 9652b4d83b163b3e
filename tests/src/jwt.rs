//! End-user tokens for the tests: keys made for the run (RSA by openssl, EC
//! by rcgen), their public halves as a JSON Web Key Set, and tokens signed
//! with them — or forged.
use std::process::Command;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

pub struct Signer {
    alg: Algorithm,
    kid: String,
    key: EncodingKey,
    jwk: Value,
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Signer {
    /// A fresh 2048-bit RSA key (RS256).
    pub fn rsa(kid: &str) -> Signer {
        let out = Command::new("sh")
            .args([
                "-c",
                "openssl genrsa -traditional 2048 2>/dev/null | openssl rsa -traditional -outform DER 2>/dev/null",
            ])
            .output()
            .expect("openssl");
        assert!(out.status.success() && !out.stdout.is_empty(), "openssl genrsa failed");
        let der = out.stdout;
        let pair = ring::rsa::KeyPair::from_der(&der).expect("a PKCS#1 RSA key");
        let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
        let jwk = json!({"kty": "RSA", "kid": kid, "alg": "RS256", "n": b64(&public.n), "e": b64(&public.e)});
        Signer { alg: Algorithm::RS256, kid: kid.into(), key: EncodingKey::from_rsa_der(&der), jwk }
    }

    /// A fresh P-256 key (ES256).
    pub fn ec(kid: &str) -> Signer {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("EC key");
        let point = pair.public_key_raw();
        let (x, y) = point[1..].split_at(32);
        let jwk = json!({"kty": "EC", "kid": kid, "crv": "P-256", "x": b64(x), "y": b64(y)});
        Signer { alg: Algorithm::ES256, kid: kid.into(), key: EncodingKey::from_ec_der(&pair.serialize_der()), jwk }
    }

    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).expect("signs")
    }
}

/// The public keys as a JSON Web Key Set.
pub fn jwks(signers: &[&Signer]) -> String {
    json!({"keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

/// A token with `alg: none` and no signature.
pub fn unsigned(claims: &Value) -> String {
    let header = json!({"alg": "none", "typ": "JWT"});
    format!("{}.{}.", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()))
}

/// A token whose signature is another token's.
pub fn with_signature_of(token: &str, other: &str) -> String {
    let head = token.rsplit_once('.').expect("a token").0;
    let sig = other.rsplit_once('.').expect("a token").1;
    format!("{head}.{sig}")
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs()
}
