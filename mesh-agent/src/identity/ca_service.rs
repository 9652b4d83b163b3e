//! The CA service (`mesh-agent ca`) and its client in the node agent.
//!
//! Protocol (HTTP/1.1 over TLS 1.3, Istio's port 15012 by convention):
//!
//! - The service presents a certificate for `spiffe://<td>/ns/istio-system/sa/mesh-ca`
//!   signed by the mesh root; agents verify it against `--ca-root`.
//! - `POST /v1/certificates` with `Authorization: Bearer <node token>` and a JSON
//!   body `{"identity": "spiffe://…", "csr": "<PEM CERTIFICATE REQUEST>", "ttlSeconds": N}`.
//! - The token names the node: in file mode a bootstrap token (one per
//!   `Node`, in `<ca-dir>/node-tokens/<node>`); on Kubernetes the agent pod's
//!   projected ServiceAccount token, which the CA checks with a TokenReview
//!   and follows to the pod and its node. The client reads the token file
//!   again for every request (the kubelet rotates it).
//!   The identity must be that of a meshed pod scheduled on that node in the
//!   CA's own view of the configuration. The CSR's signature must verify; only
//!   its public key is used. `ttlSeconds` is capped by `--max-cert-ttl`.
//! - 200 `{"certChain": ["<PEM leaf>", …]}`; 400 bad request, 401 unknown token,
//!   403 identity not allowed for the node, 500 signing failed; error bodies are
//!   `{"error": "…"}`.
use std::{path::Path, sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Request, StatusCode, body::Bytes, header};
use hyper_util::rt::TokioIo;
use rustls::{RootCertStore, pki_types::CertificateDer};
use serde::{Deserialize, Serialize};

use super::{IdentityError, tls};

/// Largest request body the service reads.
pub(crate) const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignRequest {
    pub identity: String,
    pub csr: String,
    pub ttl_seconds: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignResponse {
    pub cert_chain: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// The node agent's side: asks the CA service to sign CSRs.
pub struct CaClient {
    addr: String,
    /// Read again for every request: a projected ServiceAccount token is
    /// rotated in place by the kubelet.
    token_file: std::path::PathBuf,
    tls: tokio_rustls::TlsConnector,
    server_name: rustls::pki_types::ServerName<'static>,
}

impl CaClient {
    pub fn new(
        addr: String,
        roots: Arc<RootCertStore>,
        token_file: std::path::PathBuf,
        trust_domain: &str,
    ) -> Result<Self, IdentityError> {
        let identity = super::ca_identity(trust_domain);
        let config = tls::client_config(roots, None, identity.as_str().into(), &[b"http/1.1"])
            .map_err(|e| IdentityError::invalid("TLS settings", e))?;
        let server_name = rustls::pki_types::ServerName::try_from(super::server_name_for(&identity))
            .map_err(|e| IdentityError::invalid("CA server name", e))?;
        Ok(Self { addr, token_file, tls: tokio_rustls::TlsConnector::from(Arc::new(config)), server_name })
    }

    pub async fn sign(
        &self,
        identity: &str,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        let remote = |message: String| IdentityError::Remote { addr: self.addr.clone(), message };
        let work = async {
            let token = read_token(&self.token_file)?;
            let (host, port) = self
                .addr
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
                .ok_or_else(|| remote("expected host:port".into()))?;
            // Marked as the agent's: the CA's address may be a Service VIP the node captures.
            let tcp = super::connect_as_agent(host, port).await.map_err(|e| remote(format!("connect: {e}")))?;
            let tls = self
                .tls
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| remote(format!("TLS (is --ca-root the CA's root-cert.pem?): {e}")))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| remote(format!("HTTP: {e}")))?;
            tokio::spawn(conn);
            let body = serde_json::to_vec(&SignRequest {
                identity: identity.to_owned(),
                csr: csr_pem.to_owned(),
                ttl_seconds: ttl.as_secs().max(1),
            })
            .map_err(|e| remote(e.to_string()))?;
            let req = Request::post("/v1/certificates")
                .header(header::HOST, self.addr.as_str())
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| remote(e.to_string()))?;
            let resp = sender.send_request(req).await.map_err(|e| remote(format!("HTTP: {e}")))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| remote(format!("reading the answer: {e}")))?
                .to_bytes();
            if status != StatusCode::OK {
                let message = serde_json::from_slice::<ErrorBody>(&body)
                    .map(|b| b.error)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
                return Err(IdentityError::Refused {
                    identity: identity.to_owned(),
                    message: format!("{status}: {message}"),
                });
            }
            let answer: SignResponse = serde_json::from_slice(&body).map_err(|e| remote(format!("answer: {e}")))?;
            let mut chain = Vec::new();
            for pem in &answer.cert_chain {
                chain.extend(super::ca::pem_certs(pem).map_err(|e| remote(format!("certificate: {e}")))?);
            }
            Ok(chain)
        };
        tokio::time::timeout(Duration::from_secs(15), work).await.map_err(|_| remote("timed out".into()))?
    }
}

/// Reads a token file (trimmed), refusing one that others can read.
pub fn read_token(path: &Path) -> Result<String, IdentityError> {
    use std::os::unix::fs::PermissionsExt as _;
    let io = |source| IdentityError::Io { path: path.display().to_string(), source };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(IdentityError::invalid(
            path.display().to_string(),
            "token file must not be readable by others (chmod 600)",
        ));
    }
    let t = std::fs::read_to_string(path).map_err(io)?;
    let t = t.trim();
    if t.is_empty() {
        return Err(IdentityError::invalid(path.display().to_string(), "empty token"));
    }
    Ok(t.to_owned())
}
