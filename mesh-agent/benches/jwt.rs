//! What request policy at the destination costs per request, beyond HTTP:
//! checking an end-user JWT (each algorithm family), finding it in the
//! request, and judging an L7 AuthorizationPolicy.
//!
//! `cargo bench -p mesh-agent --bench jwt` (add `-- --quick` for a short run).
use std::{hint::black_box, net::Ipv4Addr, sync::Arc};

use base64::Engine as _;
use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mesh_agent::{
    identity::jwt::{authenticate, cache::VerifiedCache, parse_jwks, verify},
    routing::policy::{Attributes, Auth, Peer, Request, evaluate},
    state::security::{JwtKey, JwtRule},
};
use serde_json::json;

const ISSUER: &str = "https://issuer.example";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A key of each family (RSA 2048 from the tests' fixture, P-256, Ed25519),
/// its public half as a JWK, and a token it signed.
fn keys() -> Vec<(&'static str, serde_json::Value, String)> {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs() + 3600;
    let claims = json!({"iss": ISSUER, "sub": "alice", "aud": "hello", "exp": exp, "groups": ["dev"]});
    let sign = |alg, kid: &str, key: &EncodingKey| {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims, key).expect("signs")
    };
    let der = pem::parse(include_str!("../src/identity/jwt/tests/rsa.pem")).expect("pem").into_contents();
    let rsa =
        ring::rsa::PublicKeyComponents::<Vec<u8>>::from(ring::rsa::KeyPair::from_der(&der).expect("rsa").public());
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ec");
    let point = ec.public_key_raw();
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed");
    vec![
        (
            "RS256",
            json!({"kty": "RSA", "kid": "rs", "n": b64(&rsa.n), "e": b64(&rsa.e)}),
            sign(Algorithm::RS256, "rs", &EncodingKey::from_rsa_der(&der)),
        ),
        (
            "ES256",
            json!({"kty": "EC", "kid": "es", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..])}),
            sign(Algorithm::ES256, "es", &EncodingKey::from_ec_der(&ec.serialize_der())),
        ),
        (
            "EdDSA",
            json!({"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": b64(ed.public_key_raw())}),
            sign(Algorithm::EdDSA, "ed", &EncodingKey::from_ed_der(&ed.serialize_der())),
        ),
    ]
}

fn rule(keys: Arc<[JwtKey]>) -> JwtRule {
    JwtRule {
        issuer: ISSUER.into(),
        audiences: vec!["hello".into()],
        keys,
        jwks_uri: None,
        timeout: std::time::Duration::from_secs(5),
        from_headers: vec![],
        from_params: vec![],
        from_cookies: vec![],
        output_payload_to_header: None,
        output_claim_to_headers: vec![],
        forward_original_token: false,
    }
}

fn tokens(c: &mut Criterion) {
    let keys = keys();
    let set = json!({"keys": keys.iter().map(|(_, jwk, _)| jwk.clone()).collect::<Vec<_>>()}).to_string();
    let r = rule(parse_jwks(&set).expect("key set"));
    let mut g = c.benchmark_group("jwt");
    for (alg, _, token) in &keys {
        g.bench_function(format!("verify {alg}"), |b| b.iter(|| verify(black_box(token), &r, &r.keys).expect("valid")));
    }
    let mut headers = http::HeaderMap::new();
    headers.insert("user-agent", http::HeaderValue::from_static("curl/8"));
    headers.insert("authorization", http::HeaderValue::from_str(&format!("Bearer {}", keys[1].2)).expect("header"));
    let rules = [(&r, r.keys.clone())];
    g.bench_function("authenticate: find + verify ES256, fresh each time", |b| {
        b.iter(|| {
            let cache = VerifiedCache::default();
            authenticate(black_box(&rules), black_box(&headers), None, &cache).ok().flatten().is_some()
        })
    });
    let cache = VerifiedCache::default();
    g.bench_function("authenticate: ES256 token seen before", |b| {
        b.iter(|| authenticate(black_box(&rules), black_box(&headers), None, &cache).ok().flatten().is_some())
    });
    g.bench_function("authenticate: no token", |b| {
        let none = http::HeaderMap::new();
        b.iter(|| authenticate(black_box(&rules), black_box(&none), None, &cache).ok().flatten().is_none())
    });
    g.finish();
}

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: hello, namespace: demo, labels: {app: hello}}
spec: {nodeName: n1}
status: {podIP: 10.244.1.12}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: demo}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/admin, "/admin/*"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api, namespace: demo}
spec:
  selector: {matchLabels: {app: hello}}
  rules:
  - from: [{source: {requestPrincipals: ["https://issuer.example/*"]}}]
    to: [{operation: {methods: [GET, HEAD], paths: ["/api/*"]}}]
    when: [{key: "request.auth.claims[groups]", values: [dev]}]
"#;

fn decisions(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("mesh-agent-bench-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("cluster.yaml");
    std::fs::write(&file, CLUSTER).expect("write config");
    let state = mesh_agent::config::load(&file, "cluster.local").expect("valid config").state;
    let _ = std::fs::remove_dir_all(&dir);
    let dest = state.workload_by_ip(Ipv4Addr::new(10, 244, 1, 12)).expect("pod").clone();
    let headers = http::HeaderMap::new();
    let claims = json!({"groups": ["dev"]});
    let claims = claims.as_object().expect("object");
    let audiences = ["hello".to_owned()];
    let auth = Auth { principal: "https://issuer.example/alice", audiences: &audiences, presenter: None, claims };
    let request = Request {
        method: "GET",
        path: "/api/users/42",
        host: "hello.demo.svc.cluster.local",
        headers: &headers,
        auth: Some(auth),
        remote_ip: Ipv4Addr::new(10, 244, 0, 9),
    };
    let peer = Peer { principal: Some("spiffe://cluster.local/ns/demo/sa/client"), ip: Ipv4Addr::new(10, 244, 0, 9) };
    let attributes = Attributes { peer, port: 8080, request: Some(request) };
    let mut g = c.benchmark_group("policy");
    g.bench_function("evaluate request: DENY paths + ALLOW principal, method, path, claim", |b| {
        b.iter(|| evaluate(black_box(&state), (&*dest).into(), black_box(&attributes)))
    });
    g.finish();
}

criterion_group!(benches, tokens, decisions);
criterion_main!(benches);
