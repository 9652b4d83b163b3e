use base64::Engine as _;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

use super::*;
use crate::state::security::TokenHeader;

pub(crate) const ISSUER: &str = "https://issuer.example";

/// Signs tokens with a key of its own and describes its public half as a JWK.
pub(crate) struct Signer {
    alg: Algorithm,
    kid: String,
    key: EncodingKey,
    jwk: Value,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Signer {
    pub(crate) fn rsa(kid: &str, alg: Algorithm) -> Signer {
        let der = pem::parse(include_str!("tests/rsa.pem")).expect("the test's RSA key").into_contents();
        let pair = ring::rsa::KeyPair::from_der(&der).expect("PKCS#1 key");
        let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
        let (n, e) = (b64(&public.n), b64(&public.e));
        let jwk = json!({"kty": "RSA", "kid": kid, "n": n, "e": e});
        Signer { alg, kid: kid.into(), key: EncodingKey::from_rsa_der(&der), jwk }
    }

    pub(crate) fn ec(kid: &str, alg: Algorithm) -> Signer {
        let (sig, crv, len) = match alg {
            Algorithm::ES256 => (&rcgen::PKCS_ECDSA_P256_SHA256, "P-256", 32),
            _ => (&rcgen::PKCS_ECDSA_P384_SHA384, "P-384", 48),
        };
        let pair = rcgen::KeyPair::generate_for(sig).expect("EC key");
        let point = pair.public_key_raw();
        let (x, y) = point[1..].split_at(len);
        let jwk = json!({"kty": "EC", "kid": kid, "crv": crv, "x": b64(x), "y": b64(y)});
        Signer { alg, kid: kid.into(), key: EncodingKey::from_ec_der(&pair.serialize_der()), jwk }
    }

    pub(crate) fn ed25519(kid: &str) -> Signer {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key");
        let jwk = json!({"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(pair.public_key_raw())});
        Signer { alg: Algorithm::EdDSA, kid: kid.into(), key: EncodingKey::from_ed_der(&pair.serialize_der()), jwk }
    }

    pub(crate) fn sign(&self, claims: Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).expect("signs")
    }
}

pub(crate) fn jwks(signers: &[&Signer]) -> String {
    json!({"keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

fn rule(signers: &[&Signer]) -> JwtRule {
    JwtRule {
        issuer: ISSUER.into(),
        audiences: vec!["hello".into()],
        keys: parse_jwks(&jwks(signers)).expect("valid key set"),
        jwks_uri: None,
        timeout: jwks::DEFAULT_TIMEOUT,
        from_headers: vec![],
        from_params: vec![],
        from_cookies: vec![],
        output_payload_to_header: None,
        output_claim_to_headers: vec![],
        forward_original_token: false,
    }
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs()
}

fn claims() -> Value {
    json!({"iss": ISSUER, "sub": "alice", "aud": "hello", "exp": now() + 600, "groups": ["dev"]})
}

fn with(mut base: Value, key: &str, v: Value) -> Value {
    base[key] = v;
    base
}

fn unsigned(header: Value, claims: &Value) -> String {
    format!("{}.{}.", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()))
}

#[test]
fn tokens_are_checked_as_istio_checks_them() {
    let rs = Signer::rsa("rs", Algorithm::RS256);
    let ps = Signer::rsa("rs", Algorithm::PS256);
    let es = Signer::ec("es", Algorithm::ES256);
    let es384 = Signer::ec("es384", Algorithm::ES384);
    let ed = Signer::ed25519("ed");
    let other = Signer::ec("es", Algorithm::ES256); // same kid, another key
    let r = rule(&[&rs, &es, &es384, &ed]);
    let c = claims();
    let cases: Vec<(&str, String, Result<&str, JwtError>)> = vec![
        ("RS256", rs.sign(c.clone()), Ok("https://issuer.example/alice")),
        ("PS256 with the same RSA key", ps.sign(c.clone()), Ok("https://issuer.example/alice")),
        ("ES256", es.sign(c.clone()), Ok("https://issuer.example/alice")),
        ("ES384", es384.sign(c.clone()), Ok("https://issuer.example/alice")),
        ("EdDSA", ed.sign(c.clone()), Ok("https://issuer.example/alice")),
        (
            "audience in a list",
            rs.sign(with(c.clone(), "aud", json!(["x", "hello"]))),
            Ok("https://issuer.example/alice"),
        ),
        ("exp null", rs.sign(with(c.clone(), "exp", Value::Null)), Err(JwtError::Claim("exp"))),
        ("expired", rs.sign(with(c.clone(), "exp", json!(now() - 3600))), Err(JwtError::Expired)),
        (
            "expired within the skew",
            rs.sign(with(c.clone(), "exp", json!(now() - 10))),
            Ok("https://issuer.example/alice"),
        ),
        ("not yet valid", rs.sign(with(c.clone(), "nbf", json!(now() + 3600))), Err(JwtError::NotYetValid)),
        ("exp as a string", rs.sign(with(c.clone(), "exp", json!("tomorrow"))), Err(JwtError::Claim("exp"))),
        ("wrong issuer", rs.sign(with(c.clone(), "iss", json!("https://evil.example"))), Err(JwtError::UnknownIssuer)),
        ("wrong audience", rs.sign(with(c.clone(), "aud", json!("other"))), Err(JwtError::Audience)),
        ("no audience", rs.sign(with(c.clone(), "aud", Value::Null)), Err(JwtError::Audience)),
        ("signed by another key with the same kid", other.sign(c.clone()), Err(JwtError::Signature)),
        ("alg none", unsigned(json!({"alg": "none", "kid": "rs"}), &c), Err(JwtError::Algorithm)),
        ("alg HS256", unsigned(json!({"alg": "HS256", "kid": "rs"}), &c), Err(JwtError::Algorithm)),
        ("unknown kid", Signer::rsa("new", Algorithm::RS256).sign(c.clone()), Err(JwtError::NoKey)),
        (
            "ES256 header on the RSA key",
            {
                let t = rs.sign(c.clone());
                let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
                parts[0] = b64(json!({"alg": "ES256", "kid": "rs"}).to_string().as_bytes());
                parts.join(".")
            },
            Err(JwtError::NoKey),
        ),
        ("two parts", "a.b".into(), Err(JwtError::Malformed)),
        ("four parts", format!("{}.x", rs.sign(c.clone())), Err(JwtError::Malformed)),
    ];
    for (name, token, want) in cases {
        let got = verify(&token, &r, &r.keys).map(|v| v.principal);
        assert_eq!(got.as_deref().map_err(Clone::clone), want, "{name}");
    }
}

#[test]
fn a_token_without_exp_is_accepted_and_its_claims_read() {
    let rs = Signer::rsa("rs", Algorithm::RS256);
    let mut c = claims();
    c.as_object_mut().expect("object").remove("exp");
    c["azp"] = json!("web");
    let r = rule(&[&rs]);
    let v = verify(&rs.sign(c), &r, &r.keys).expect("valid");
    assert_eq!(v.audiences, ["hello"]);
    assert_eq!(v.presenter.as_deref(), Some("web"));
    assert_eq!(v.claims["groups"], json!(["dev"]));
}

#[test]
fn key_sets_the_agent_cannot_use_safely_are_errors() {
    let cases = [
        ("{}", "not a JSON Web Key Set"),
        (r#"{"keys": []}"#, "no keys"),
        (r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#, "symmetric"),
        (r#"{"keys": [{"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}]}"#, "P-521"),
        (r#"{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB", "alg": "RSA-OAEP"}]}"#, "signature algorithm"),
        (r#"{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB", "use": "enc"}]}"#, "encryption key"),
    ];
    for (jwks, want) in cases {
        let err = parse_jwks(jwks).expect_err(jwks);
        assert!(err.contains(want), "{jwks}: {err}");
    }
}

#[test]
fn tokens_are_found_where_the_rules_look() {
    let rs = Signer::rsa("rs", Algorithm::RS256);
    let token = rs.sign(claims());
    let default = rule(&[&rs]);
    let custom = JwtRule {
        from_headers: vec![TokenHeader { name: "x-jwt".into(), prefix: String::new() }],
        from_params: vec!["token".into()],
        from_cookies: vec!["session".into()],
        ..rule(&[&rs])
    };
    let h = |pairs: &[(&'static str, String)]| {
        let mut m = http::HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, v.parse().expect("header value"));
        }
        m
    };
    let q_default = format!("a=1&access_token={token}");
    let q_custom = format!("token={token}");
    // (rule, headers, query, principal found, headers consumed)
    type Case<'a> = (&'a JwtRule, http::HeaderMap, Option<&'a str>, Option<&'a str>, Vec<&'a str>);
    let cases: Vec<Case<'_>> = vec![
        (&default, h(&[("authorization", format!("Bearer {token}"))]), None, Some("alice"), vec!["authorization"]),
        (&default, h(&[("authorization", format!("bearer {token}"))]), None, Some("alice"), vec!["authorization"]),
        (&default, h(&[("authorization", "Basic dXNlcjpwdw==".into())]), None, None, vec![]),
        (&default, h(&[]), Some(&q_default), Some("alice"), vec![]),
        (&default, h(&[("x-jwt", token.clone())]), None, None, vec![]),
        (&custom, h(&[("x-jwt", token.clone())]), None, Some("alice"), vec!["x-jwt"]),
        (&custom, h(&[("authorization", format!("Bearer {token}"))]), None, None, vec![]),
        (&custom, h(&[]), Some(&q_custom), Some("alice"), vec![]),
        (&custom, h(&[("cookie", format!("a=b; session={token}"))]), None, Some("alice"), vec![]),
    ];
    for (i, (r, headers, query, principal, consumed)) in cases.into_iter().enumerate() {
        let got = authenticate(&[(r, r.keys.clone())], &headers, query, &Default::default())
            .unwrap_or_else(|e| panic!("case {i}: {e:?}"));
        let sub = got.as_ref().map(|a| a.verified.principal.rsplit('/').next().unwrap_or_default());
        assert_eq!(sub, principal, "case {i}");
        assert_eq!(got.map(|a| a.consumed).unwrap_or_default(), consumed, "case {i}");
    }
    // Any token that fails fails the request, even beside a valid one.
    let forged = Signer::rsa("rs", Algorithm::RS256).sign(with(claims(), "iss", json!("https://evil.example")));
    let headers = h(&[("authorization", format!("Bearer {token}")), ("x-jwt", forged)]);
    let both = [(&default, default.keys.clone()), (&custom, custom.keys.clone())];
    assert_eq!(
        authenticate(&both, &headers, None, &Default::default()).err().map(|r| r.error),
        Some(JwtError::UnknownIssuer)
    );
    // A flood of tokens is refused before any is checked.
    let flood: String = (0..10_000).map(|i| format!("session=a.b{i}.c; ")).collect();
    let headers = h(&[("cookie", flood)]);
    let got =
        authenticate(&[(&custom, custom.keys.clone())], &headers, None, &Default::default()).err().map(|r| r.error);
    assert_eq!(got, Some(JwtError::TooMany));
}

#[test]
fn verified_tokens_are_remembered_only_under_the_same_rule_and_keys() {
    let rs = Signer::rsa("rs", Algorithm::RS256);
    let r = rule(&[&rs]);
    let cache = cache::VerifiedCache::default();
    let token = rs.sign(claims());
    let first = cache.check(&token, &r, &r.keys).expect("valid");
    // The same token again: the same answer, not checked again.
    assert!(Arc::ptr_eq(&first, &cache.check(&token, &r, &r.keys).expect("valid")));
    // Another key set (a reload, a rotation): checked again, and refused if
    // the token's key is gone.
    let other = Signer::ec("rs", Algorithm::ES256);
    let rotated = rule(&[&other]);
    assert_eq!(cache.check(&token, &rotated, &rotated.keys).err(), Some(JwtError::NoKey));
    // The same keys under a rule asking for another audience: refused.
    let stricter = JwtRule { audiences: vec!["other".into()], ..rule(&[&rs]) };
    assert_eq!(cache.check(&token, &stricter, &r.keys).err(), Some(JwtError::Audience));
    // An expired token is never remembered past its expiry.
    let expired = rs.sign(with(claims(), "exp", json!(now() - 3600)));
    assert_eq!(cache.check(&expired, &r, &r.keys).err(), Some(JwtError::Expired));
}

/// Query parameters as the application decodes them: `?access%5Ftoken=` is
/// found (and checked) as `access_token`; and a log line never holds one.
#[test]
fn query_tokens_are_found_decoded_and_redacted_from_logs() {
    let r = rule(&[&Signer::ed25519("k")]);
    let headers = http::HeaderMap::new();
    let found = |q: &str| tokens(&r, &headers, Some(q)).into_iter().map(|(_, t)| t).collect::<Vec<_>>();
    assert_eq!(found("access_token=a.b.c"), ["a.b.c"]);
    assert_eq!(found("x=1&access%5Ftoken=a.b%2Ec"), ["a.b.c"]);
    assert_eq!(found("access_tokenx=a.b.c"), Vec::<String>::new());
    let names = std::collections::BTreeSet::from(["access_token".to_owned(), "t".to_owned()]);
    let table = [
        ("/a?access_token=secret&x=1", "/a?access_token=REDACTED&x=1"),
        ("/a?x=1&access%5Ftoken=secret", "/a?x=1&access%5Ftoken=REDACTED"),
        ("/a?t=secret", "/a?t=REDACTED"),
        ("/a?tt=kept", "/a?tt=kept"),
        ("/a", "/a"),
    ];
    for (path, want) in table {
        assert_eq!(redact_query(path, &names), want, "{path}");
    }
}
