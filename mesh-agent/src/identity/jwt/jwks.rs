//! Key sets fetched from a `jwksUri`, over HTTPS: fetched when a request
//! first needs them (it waits up to the rule's `timeout`), fetched again in
//! the background once they are older than [`REFRESH`] and at once when a
//! token names a key they lack (at most every [`MIN_REFETCH`], so a client
//! cannot make the agent hammer the issuer). A fetch that fails keeps the
//! last good set; with none, tokens of that issuer are refused (401).
use std::{
    collections::HashMap,
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, Instant},
};

use http_body_util::BodyExt as _;

use crate::state::security::JwtKey;

/// Istio's `timeout` default for fetching keys.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Key sets older than this are fetched again (Istio's default refresh interval).
pub const REFRESH: Duration = Duration::from_secs(20 * 60);
/// The shortest time between two fetches of one set.
pub const MIN_REFETCH: Duration = Duration::from_secs(30);
/// The largest key set read.
const MAX_BODY: usize = 1 << 20;

/// A `jwksUri`: `https://host[:port]/path`.
pub fn parse_uri(uri: &str) -> Result<http::Uri, String> {
    let parsed: http::Uri = uri.parse().map_err(|e| format!("{uri:?}: {e}"))?;
    if parsed.scheme_str() != Some("https") {
        return Err(format!("{uri:?}: keys are fetched over https only (a key set read in plaintext could be forged)"));
    }
    if parsed.host().is_none_or(str::is_empty) {
        return Err(format!("{uri:?}: no host"));
    }
    Ok(parsed)
}

/// The HTTPS client's settings, or why there are none.
type Tls = Result<Arc<rustls::ClientConfig>, String>;

/// The key sets of every `jwksUri` in use.
pub struct JwksCache {
    /// Made on the first fetch: most meshes name no remote key set, and the
    /// system's trust store (150 CAs, about 80 KiB once parsed) is then
    /// never read.
    tls: LazyLock<Tls, Box<dyn FnOnce() -> Tls + Send>>,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    /// [`MIN_REFETCH`], but for tests.
    min_refetch: Duration,
}

#[derive(Default)]
struct Entry {
    keys: Mutex<Option<(Arc<[JwtKey]>, Instant)>>,
    /// One fetch at a time; holds when the last one began.
    fetching: tokio::sync::Mutex<Option<Instant>>,
}

impl JwksCache {
    /// Server certificates are checked against what `roots` gives (the
    /// system's CAs, and any the operator adds), called on the first fetch.
    pub fn new(roots: impl FnOnce() -> rustls::RootCertStore + Send + 'static) -> JwksCache {
        Self::with_min_refetch(roots, MIN_REFETCH)
    }

    pub fn with_min_refetch(
        roots: impl FnOnce() -> rustls::RootCertStore + Send + 'static,
        min_refetch: Duration,
    ) -> JwksCache {
        let make = move || {
            let tls = crate::identity::tls::https_client_config(roots(), &[b"http/1.1"]);
            tls.map(Arc::new).map_err(|e| format!("TLS settings: {e}"))
        };
        JwksCache { tls: LazyLock::new(Box::new(make)), entries: Mutex::default(), min_refetch }
    }

    fn entry(&self, uri: &str) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.entry(uri.to_owned()).or_default().clone()
    }

    /// The keys of `uri`: those held (fetched again in the background when
    /// stale), else fetched now within `timeout`. Empty when none could be had.
    pub async fn keys(self: &Arc<Self>, uri: &str, timeout: Duration) -> Arc<[JwtKey]> {
        let entry = self.entry(uri);
        let held = entry.keys.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match held {
            Some((keys, at)) => {
                if at.elapsed() > REFRESH {
                    let (cache, uri) = (self.clone(), uri.to_owned());
                    tokio::spawn(async move { cache.fetch(&uri, DEFAULT_TIMEOUT).await });
                }
                keys
            }
            None => {
                let _ = tokio::time::timeout(timeout, self.fetch(uri, timeout)).await;
                entry.held()
            }
        }
    }

    /// A token named a key the set lacks: fetch it again now (unless it was
    /// fetched moments ago), then the keys as they are.
    pub async fn refetch(self: &Arc<Self>, uri: &str, timeout: Duration) -> Arc<[JwtKey]> {
        let _ = tokio::time::timeout(timeout, self.fetch(uri, timeout)).await;
        self.entry(uri).held()
    }

    async fn fetch(&self, uri: &str, timeout: Duration) {
        let entry = self.entry(uri);
        let mut last = entry.fetching.lock().await;
        if last.is_some_and(|t| t.elapsed() < self.min_refetch) {
            return;
        }
        *last = Some(Instant::now());
        let tls = match &*self.tls {
            Ok(tls) => tls.clone(),
            Err(e) => return tracing::warn!(%uri, error = %e, "fetching JWT keys is not possible"),
        };
        match tokio::time::timeout(timeout, get(&tls, uri)).await {
            Ok(Ok(keys)) => {
                tracing::info!(%uri, keys = keys.len(), "JWT keys fetched");
                *entry.keys.lock().unwrap_or_else(|e| e.into_inner()) = Some((keys, Instant::now()));
            }
            Ok(Err(e)) => tracing::warn!(%uri, error = %e, "fetching JWT keys failed; the last good set stays"),
            Err(_) => tracing::warn!(%uri, ?timeout, "fetching JWT keys timed out; the last good set stays"),
        }
    }
}

impl Entry {
    fn held(&self) -> Arc<[JwtKey]> {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.as_ref().map_or_else(|| Vec::new().into(), |(k, _)| k.clone())
    }
}

/// GET over HTTPS from the agent's own (uncaptured) socket; the body parsed
/// as a key set.
async fn get(tls: &Arc<rustls::ClientConfig>, uri: &str) -> Result<Arc<[JwtKey]>, String> {
    let parsed = parse_uri(uri)?;
    let host = parsed.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = parsed.port_u16().unwrap_or(443);
    let tcp = crate::identity::connect_as_agent(&host, port).await.map_err(|e| format!("connect: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| format!("{host:?}: {e}"))?;
    let tls =
        tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(conn);
    let path = parsed.path_and_query().map_or("/", |p| p.as_str());
    let authority = parsed.authority().map_or(host.as_str(), |a| a.as_str());
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "application/json")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| format!("HTTP: {e}"))?;
    if resp.status() != hyper::StatusCode::OK {
        return Err(format!("HTTP status {}", resp.status()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY).collect().await;
    let body = body.map_err(|e| format!("reading the key set (at most {MAX_BODY} bytes): {e}"))?.to_bytes();
    let text = std::str::from_utf8(&body).map_err(|_| "the key set is not UTF-8".to_owned())?;
    super::parse_jwks(text)
}

#[cfg(test)]
mod tests;
