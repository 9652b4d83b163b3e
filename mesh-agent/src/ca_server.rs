//! The CA service (`mesh-agent ca`): signs workload certificates for node
//! agents, each only for the meshed pods scheduled on its node in the
//! service's own view of the configuration. The protocol and its client are
//! in [`crate::identity::ca_service`].
use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Request, Response, StatusCode, body::Bytes, header};
use hyper_util::rt::TokioIo;
use rustls::{RootCertStore, pki_types::CertificateDer, sign::CertifiedKey};
use serde::Serialize;

use crate::{
    config,
    identity::{
        IdentityError,
        ca::Ca,
        ca_service::{ErrorBody, MAX_BODY, SignRequest, SignResponse},
        tls,
    },
    state::State,
};

mod kubernetes;

pub use kubernetes::KubeAuthConfig;

/// What the CA checks at start on Kubernetes (for the RBAC test).
#[cfg(test)]
pub(crate) async fn kubernetes_missing_permissions(client: &kube::Client) -> Result<Vec<String>, kube::Error> {
    kubernetes::missing_permissions(client, &crate::discovery::ca_kinds()).await
}

/// One token review as the CA makes it (for the RBAC test).
#[cfg(test)]
pub(crate) async fn review_token_for_test(client: kube::Client, token: &str, state: &State) {
    let config = KubeAuthConfig { audience: "mesh-ca".into(), trusted_node_accounts: Vec::new() };
    let _ = kubernetes::KubeAuth::new(client, config).node_of(token, state).await;
}

/// Where the CA learns which pods run where, and how it knows agents.
#[derive(Debug, Clone)]
pub enum CaSource {
    /// Configuration files; agents present bootstrap tokens written under `ca_dir`.
    Files(PathBuf),
    /// The API server; agents present projected ServiceAccount tokens.
    Kubernetes(KubeAuthConfig),
}

/// Settings of `mesh-agent ca`.
#[derive(Debug, Clone)]
pub struct CaServiceConfig {
    pub source: CaSource,
    pub ca_dir: PathBuf,
    pub listen: SocketAddr,
    pub trust_domain: String,
    pub max_ttl: Duration,
}

struct Service {
    ca: Ca,
    max_ttl: Duration,
    state: RwLock<Arc<State>>,
    auth: Auth,
}

/// How an agent's bearer token names its node.
enum Auth {
    /// Bootstrap tokens: token → node name.
    Tokens(RwLock<HashMap<String, String>>),
    Kubernetes(kubernetes::KubeAuth),
}

/// The CA's running view of the cluster.
enum View {
    Files { path: PathBuf, fingerprint: config::watch_files::Fingerprint, last_good: config::LastGood },
    Kubernetes { models: tokio::sync::mpsc::Receiver<config::Loaded>, task: tokio::task::JoinHandle<()> },
}

impl Drop for View {
    fn drop(&mut self) {
        if let View::Kubernetes { task, .. } = self {
            task.abort();
        }
    }
}

#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl tls::CertLookup for OneCert {
    fn by_server_name(&self, _sni: &str) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Writes a token for every Node that has none; returns token → node for all.
fn ensure_tokens(ca_dir: &Path, state: &State) -> Result<HashMap<String, String>, IdentityError> {
    let dir = crate::identity::ca::token_dir(ca_dir);
    crate::identity::ca::create_dir(&dir)?;
    let mut map = HashMap::new();
    for name in state.nodes.keys() {
        if name.contains('/') || name.starts_with('.') {
            tracing::warn!(node = %name, "node name cannot be a file name; no token written");
            continue;
        }
        let path = dir.join(&**name);
        let token = match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
            _ => {
                let t = crate::identity::hex(&crate::identity::random_bytes::<32>()?);
                crate::identity::ca::write_private(&path, t.as_bytes(), 0o600)?;
                tracing::info!(node = %name, path = %path.display(), "wrote node bootstrap token");
                t
            }
        };
        map.insert(token, name.to_string());
    }
    Ok(map)
}

#[derive(Debug, thiserror::Error)]
pub enum CaServiceError {
    #[error("invalid configuration:\n{0}")]
    Config(#[from] crate::config::ConfigErrors),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("TLS settings: {0}")]
    Tls(#[from] rustls::Error),
    #[error("binding the CA service on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("Kubernetes: {0}")]
    Kubernetes(#[from] crate::discovery::DiscoveryError),
    #[error("Kubernetes: checking the CA's permissions: {0}")]
    AccessReview(#[source] kube::Error),
    #[error("the CA's service account may not: {}; apply deploy/ (its ClusterRole mesh-ca) or grant them", .0.join(", "))]
    Permissions(Vec<String>),
}

/// Runs the CA service until SIGTERM/SIGINT.
pub async fn run(cfg: CaServiceConfig) -> Result<(), CaServiceError> {
    let (mut view, loaded, auth) = match &cfg.source {
        CaSource::Files(path) => {
            let mut last_good = config::LastGood::default();
            let loaded = config::load_keeping(path, &cfg.trust_domain, &mut last_good)?;
            let tokens = Auth::Tokens(RwLock::new(ensure_tokens(&cfg.ca_dir, &loaded.state)?));
            let fingerprint = config::watch_files::Fingerprint::of(path);
            (View::Files { path: path.clone(), fingerprint, last_good }, loaded, tokens)
        }
        CaSource::Kubernetes(auth) => {
            let client = crate::discovery::client().await?;
            let kinds = crate::discovery::ca_kinds();
            let missing =
                kubernetes::missing_permissions(&client, &kinds).await.map_err(CaServiceError::AccessReview)?;
            if !missing.is_empty() {
                return Err(CaServiceError::Permissions(missing));
            }
            let counters = crate::discovery::Counters::default();
            let (mut models, task) = crate::discovery::start(
                client.clone(),
                kinds,
                crate::discovery::Settings::new(&cfg.trust_domain),
                counters,
            )
            .await?;
            let loaded = crate::discovery::first_model(&mut models).await?;
            let auth = Auth::Kubernetes(kubernetes::KubeAuth::new(client, auth.clone()));
            (View::Kubernetes { models, task }, loaded, auth)
        }
    };
    for e in &loaded.rejected {
        tracing::error!("object rejected, the rest of the configuration applies: {e}");
    }
    let ca = Ca::load_or_create(&cfg.ca_dir, &cfg.trust_domain)?;
    let now = std::time::SystemTime::now();
    let identity = crate::identity::ca_identity(&cfg.trust_domain);
    let serving = ca.issue(&identity, now - Duration::from_secs(60), now + Duration::from_secs(365 * 24 * 3600))?;
    let mut roots = RootCertStore::empty();
    roots.add(ca.root_der().clone()).map_err(|e| IdentityError::invalid("mesh root", e))?;
    let tls_config =
        tls::server_config(Arc::new(roots), Arc::new(OneCert(serving.key.clone())), false, &[b"http/1.1"])?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config));
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| CaServiceError::Bind { addr: cfg.listen, source })?;
    let svc = Arc::new(Service { ca, max_ttl: cfg.max_ttl, state: RwLock::new(Arc::new(loaded.state)), auth });
    tracing::info!(listen = %cfg.listen, ca_dir = %cfg.ca_dir.display(), %identity, "mesh CA service ready");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(CaServiceError::Signal)?;
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            loaded = next_model(&mut view) => set_state(&svc, loaded),
            _ = tick.tick() => if let View::Files { path, fingerprint, last_good } = &mut view
                && fingerprint.changed(path)
            {
                reload(&svc, &cfg, path, last_good);
            },
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let (svc, acceptor) = (svc.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "CA: TLS handshake failed"),
                        Err(_) => return tracing::info!(%peer, "CA: TLS handshake timed out"),
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let svc = svc.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(&svc, peer, req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(TokioIo::new(tls), service);
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "CA: connection error");
                    }
                });
            }
        }
    }
    tracing::info!("CA service stopped");
    Ok(())
}

/// The next model from the API server; never, for files (polled instead).
async fn next_model(view: &mut View) -> config::Loaded {
    match view {
        View::Kubernetes { models, .. } => match models.recv().await {
            Some(m) => m,
            None => std::future::pending().await,
        },
        View::Files { .. } => std::future::pending().await,
    }
}

fn set_state(svc: &Service, loaded: config::Loaded) {
    for e in &loaded.rejected {
        tracing::error!("object rejected, the rest of the configuration applies: {e}");
    }
    if let Ok(mut s) = svc.state.write() {
        *s = Arc::new(loaded.state);
    }
}

fn reload(svc: &Service, cfg: &CaServiceConfig, path: &Path, last_good: &mut config::LastGood) {
    match config::reload_guarded(path, &cfg.trust_domain, last_good) {
        Ok(loaded) => {
            match (ensure_tokens(&cfg.ca_dir, &loaded.state), &svc.auth) {
                (Ok(t), Auth::Tokens(tokens)) => {
                    if let Ok(mut m) = tokens.write() {
                        *m = t;
                    }
                }
                (Err(e), _) => tracing::error!(error = %e, "writing node tokens"),
                _ => {}
            }
            set_state(svc, loaded);
            tracing::info!("CA: configuration reloaded");
        }
        Err(e) => tracing::error!("CA: configuration rejected, keeping the last good one:\n{e}"),
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(serde_json::to_vec(body).unwrap_or_default())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    json(status, &ErrorBody { error: message.into() })
}

/// Compares without stopping at the first differing byte.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn handle(svc: &Service, peer: SocketAddr, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/v1/certificates" {
        return error(StatusCode::NOT_FOUND, "unknown path; POST /v1/certificates");
    }
    if req.method() != hyper::Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default()
        .to_owned();
    let state = svc.state.read().map(|s| s.clone()).unwrap_or_default();
    let node = match &svc.auth {
        Auth::Tokens(tokens) => {
            let known = tokens.read().ok();
            known.and_then(|m| m.iter().find(|(t, _)| same_token(t, &token)).map(|(_, n)| n.clone()))
        }
        Auth::Kubernetes(auth) => match auth.node_of(&token, &state).await {
            Ok(node) => Some(node),
            Err((status, message)) => {
                tracing::warn!(%peer, %status, "CA: {message}");
                let mut r = error(status, message);
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                }
                return r;
            }
        },
    };
    let Some(node) = node else {
        tracing::warn!(%peer, "CA: request with an unknown node token");
        return error(StatusCode::UNAUTHORIZED, "missing or unknown node token");
    };
    let read = Limited::new(req.into_body(), MAX_BODY).collect();
    let body = match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
        Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive within 10 s"),
    };
    let identities = state.node_identities(&node);
    match sign_request(&svc.ca, &body, |id| identities.contains(id), svc.max_ttl) {
        Ok((request, ttl, chain)) => {
            tracing::info!(%node, identity = %request.identity, ?ttl, "CA: certificate signed");
            let pem = chain.iter().map(|c| der_to_pem(c)).collect();
            json(StatusCode::OK, &SignResponse { cert_chain: pem })
        }
        Err((status, message)) => {
            if status == StatusCode::FORBIDDEN {
                tracing::warn!(%peer, %node, "CA: {message}");
            }
            let message = match status {
                StatusCode::FORBIDDEN => format!("{message}: a node gets only its own identities (node {node})"),
                _ => message,
            };
            error(status, message)
        }
    }
}

/// A sign request's body, judged and signed: the request, the lifetime given
/// and the chain; or the status and message to refuse it with. `allowed` says
/// which identities the asking node may hold. Everything in `body` comes from
/// the network (fuzzed: `cargo xtask fuzz`).
pub fn sign_request(
    ca: &Ca,
    body: &[u8],
    allowed: impl Fn(&str) -> bool,
    max_ttl: Duration,
) -> Result<(SignRequest, Duration, Vec<CertificateDer<'static>>), (StatusCode, String)> {
    let request: SignRequest =
        serde_json::from_slice(body).map_err(|e| (StatusCode::BAD_REQUEST, format!("request body: {e}")))?;
    // Whatever the configuration says: the CA's own identity is never given out.
    if request.identity == crate::identity::ca_identity(&ca.trust_domain) {
        return Err((StatusCode::FORBIDDEN, format!("{} is the mesh CA's identity", request.identity)));
    }
    if !allowed(&request.identity) {
        let message = format!("no meshed pod (gateway pods included) on this node runs as {}", request.identity);
        return Err((StatusCode::FORBIDDEN, message));
    }
    let ttl = Duration::from_secs(request.ttl_seconds.max(1)).min(max_ttl);
    match ca.sign_csr(&request.csr, &request.identity, ttl) {
        Ok(chain) => Ok((request, ttl, chain)),
        Err(IdentityError::Invalid { what, message }) => Err((StatusCode::BAD_REQUEST, format!("{what}: {message}"))),
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

fn der_to_pem(der: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hyper::StatusCode;

    use super::sign_request;
    use crate::identity::ca::Ca;

    #[test]
    fn the_cas_own_identity_is_never_signed() {
        let dir = std::env::temp_dir().join(format!("mesh-ca-server-{}", std::process::id()));
        let ca = Ca::load_or_create(&dir, "cluster.local").expect("a CA in a temporary directory");
        let key = rcgen::KeyPair::generate().expect("a key");
        let csr = rcgen::CertificateParams::default().serialize_request(&key).expect("a CSR").pem().expect("PEM");
        let body = |identity: &str| {
            serde_json::to_vec(&serde_json::json!({"identity": identity, "csr": csr, "ttlSeconds": 60})).expect("JSON")
        };
        let ttl = Duration::from_secs(3600);
        let signed = sign_request(&ca, &body("spiffe://cluster.local/ns/demo/sa/test"), |_| true, ttl);
        assert!(signed.is_ok(), "{:?}", signed.err());
        // Even when the configuration would allow it (a node with such a pod).
        let refused = sign_request(&ca, &body("spiffe://cluster.local/ns/istio-system/sa/mesh-ca"), |_| true, ttl);
        assert_eq!(refused.err().map(|e| e.0), Some(StatusCode::FORBIDDEN));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
