//! Key sets from a `jwksUri` served by a loopback HTTPS server of the test's
//! own (its CA trusted by the cache): fetched on first use, fetched again for
//! a key they lack (at most so often), the last good set kept when the
//! server fails.
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
};

use jsonwebtoken::Algorithm;
use serde_json::json;

use super::*;
use crate::identity::jwt::{
    self, JwtError,
    tests::{ISSUER, Signer, jwks, now},
};

/// What the server answers: a status and a body.
type Answer = Arc<Mutex<(u16, String)>>;

struct Server {
    uri: String,
    answer: Answer,
    requests: Arc<AtomicUsize>,
    roots: rustls::RootCertStore,
}

/// What the cache trusts: the test server's CA, handed over on the first fetch.
fn roots(srv: &Server) -> impl FnOnce() -> rustls::RootCertStore + Send + 'static {
    let roots = srv.roots.clone();
    move || roots
}

async fn server() -> Server {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    let cert = params.signed_by(&key, &issuer).expect("leaf");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key"),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let uri = format!("https://127.0.0.1:{}/keys", listener.local_addr().expect("address").port());
    let answer: Answer = Arc::new(Mutex::new((200, String::new())));
    let requests = Arc::new(AtomicUsize::new(0));
    let (a, n) = (answer.clone(), requests.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(tls) = acceptor.accept(tcp).await else { continue };
            let (a, n) = (a.clone(), n.clone());
            let svc = hyper::service::service_fn(move |_req| {
                n.fetch_add(1, Ordering::SeqCst);
                let (status, body) = a.lock().expect("answer").clone();
                let mut r = hyper::Response::new(http_body_util::Full::new(hyper::body::Bytes::from(body)));
                *r.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            let io = hyper_util::rt::TokioIo::new(tls);
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(io, svc));
        }
    });
    Server { uri, answer, requests, roots }
}

fn rule(uri: &str) -> crate::state::security::JwtRule {
    crate::state::security::JwtRule {
        issuer: ISSUER.into(),
        audiences: vec![],
        keys: Vec::new().into(),
        jwks_uri: Some(uri.into()),
        timeout: DEFAULT_TIMEOUT,
        from_headers: vec![],
        from_params: vec![],
        from_cookies: vec![],
        output_payload_to_header: None,
        output_claim_to_headers: vec![],
        forward_original_token: false,
    }
}

fn token(s: &Signer) -> String {
    s.sign(json!({"iss": ISSUER, "sub": "alice", "exp": now() + 600}))
}

#[tokio::test]
async fn keys_are_fetched_refetched_for_a_new_kid_and_kept_when_the_server_fails() {
    let srv = server().await;
    let (k1, k2) = (Signer::rsa("k1", Algorithm::RS256), Signer::ec("k2", Algorithm::ES256));
    *srv.answer.lock().expect("answer") = (200, jwks(&[&k1]));
    let cache = Arc::new(JwksCache::with_min_refetch(roots(&srv), Duration::ZERO));
    let r = rule(&srv.uri);
    let keys = cache.keys(&srv.uri, DEFAULT_TIMEOUT).await;
    assert!(jwt::verify(&token(&k1), &r, &keys).is_ok());
    // Held: no second request.
    let _ = cache.keys(&srv.uri, DEFAULT_TIMEOUT).await;
    assert_eq!(srv.requests.load(Ordering::SeqCst), 1);
    // The issuer rotates: a token with the new kid fails, then the set is
    // fetched again and it passes.
    *srv.answer.lock().expect("answer") = (200, jwks(&[&k1, &k2]));
    assert_eq!(jwt::verify(&token(&k2), &r, &keys).err(), Some(JwtError::NoKey));
    let keys = cache.refetch(&srv.uri, DEFAULT_TIMEOUT).await;
    assert!(jwt::verify(&token(&k2), &r, &keys).is_ok());
    // The server fails (an error, then nonsense): the last good set stays.
    for answer in [(500, String::new()), (200, "not a key set".to_owned())] {
        *srv.answer.lock().expect("answer") = answer;
        let keys = cache.refetch(&srv.uri, DEFAULT_TIMEOUT).await;
        assert!(jwt::verify(&token(&k2), &r, &keys).is_ok());
    }
    assert_eq!(srv.requests.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn unknown_kids_cannot_make_the_agent_hammer_the_issuer() {
    let srv = server().await;
    let k1 = Signer::ed25519("k1");
    *srv.answer.lock().expect("answer") = (200, jwks(&[&k1]));
    let cache = Arc::new(JwksCache::new(roots(&srv)));
    let _ = cache.keys(&srv.uri, DEFAULT_TIMEOUT).await;
    for _ in 0..20 {
        let _ = cache.refetch(&srv.uri, DEFAULT_TIMEOUT).await;
    }
    assert_eq!(srv.requests.load(Ordering::SeqCst), 1, "refetched within {MIN_REFETCH:?}");
}

#[tokio::test]
async fn a_server_with_a_certificate_from_another_ca_gives_no_keys() {
    let srv = server().await;
    let k1 = Signer::ed25519("k1");
    *srv.answer.lock().expect("answer") = (200, jwks(&[&k1]));
    let other = server().await;
    let cache = Arc::new(JwksCache::new(roots(&other)));
    assert!(cache.keys(&srv.uri, DEFAULT_TIMEOUT).await.is_empty());
    assert_eq!(srv.requests.load(Ordering::SeqCst), 0);
}

#[test]
fn only_https_uris_are_accepted() {
    assert!(parse_uri("https://idp.example/keys").is_ok());
    for bad in ["http://idp.example/keys", "idp.example/keys", "https:///keys", "ftp://x/y"] {
        assert!(parse_uri(bad).is_err(), "{bad}");
    }
}
