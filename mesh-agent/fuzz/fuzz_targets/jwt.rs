//! End-user tokens and key sets, both from the network: the bytes as a
//! request's `Authorization`, `Cookie` and query (found, decoded, checked
//! against a fixed Ed25519 key) and as a JSON Web Key Set fetched from a
//! `jwksUri`.
#![no_main]

use std::sync::OnceLock;

use mesh_agent::{identity::jwt, state::security::JwtRule};

static RULE: OnceLock<JwtRule> = OnceLock::new();

const JWKS: &str = r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let rule = RULE.get_or_init(|| JwtRule {
        issuer: "https://issuer.example".into(),
        audiences: vec!["hello".into()],
        keys: jwt::parse_jwks(JWKS).expect("the fixed key set"),
        jwks_uri: None,
        timeout: std::time::Duration::from_secs(5),
        from_headers: vec![],
        from_params: vec![],
        from_cookies: vec!["session".into()],
        output_payload_to_header: None,
        output_claim_to_headers: vec![],
        forward_original_token: false,
    });
    let text = String::from_utf8_lossy(data);
    let _ = jwt::parse_jwks(&text);
    let _ = jwt::claimed_issuer(&text);
    let _ = jwt::verify(&text, rule, &rule.keys);
    let mut headers = hyper::header::HeaderMap::new();
    if let Ok(v) = hyper::header::HeaderValue::from_bytes(data) {
        headers.insert("authorization", v.clone());
        headers.insert("cookie", v);
    }
    let cache = jwt::cache::VerifiedCache::default();
    let _ = jwt::authenticate(&[(rule, rule.keys.clone())], &headers, Some(&text), &cache);
});
