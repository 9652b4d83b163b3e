//! Keeps a certificate for every identity the node needs: fetched when first
//! needed (or when a meshed pod appears), renewed at half life, dropped when no
//! local pod uses the identity. Live connections keep the certificate they were
//! established with; only new handshakes use a renewed one.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{RootCertStore, pki_types::CertificateDer, sign::CertifiedKey};

use super::{CertInfo, IdentityError, WorkloadCert, ca::Ca, ca_service::CaClient, tls::CertLookup};

/// Where certificates come from.
pub enum CertSource {
    /// The agent's own CA (single node).
    Embedded(Arc<Ca>),
    /// The CA service, asked with a CSR; the key never leaves this process.
    Remote(CaClient),
}

pub struct CertManager {
    source: CertSource,
    ttl: Duration,
    roots: Arc<RootCertStore>,
    certs: RwLock<HashMap<Arc<str>, Arc<WorkloadCert>>>,
    /// SNI → identity for the certificates held.
    by_sni: RwLock<HashMap<String, Arc<str>>>,
    /// One fetch at a time: fetches are rare, and this stops a burst of new
    /// connections from asking the CA for the same identity many times.
    fetching: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

impl CertManager {
    pub fn new(source: CertSource, roots: RootCertStore, ttl: Duration) -> Self {
        Self {
            source,
            ttl,
            roots: Arc::new(roots),
            certs: RwLock::default(),
            by_sni: RwLock::default(),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// The held certificate for `identity`, if it is still valid.
    pub fn cached(&self, identity: &str) -> Option<Arc<WorkloadCert>> {
        let c = self.certs.read().ok()?.get(identity).cloned()?;
        (c.info.not_after > SystemTime::now()).then_some(c)
    }

    /// The certificate for `identity`, fetching it if none is held.
    pub async fn get(&self, identity: &Arc<str>) -> Result<Arc<WorkloadCert>, IdentityError> {
        if let Some(c) = self.cached(identity) {
            return Ok(c);
        }
        // Boxed: a fetch (a round trip to the CA) needs ~3 KB of state that the
        // cached path, which nearly every connection takes, should not carry.
        Box::pin(self.fetch_one(identity)).await
    }

    /// One fetch at a time; the certificate may have come meanwhile.
    async fn fetch_one(&self, identity: &Arc<str>) -> Result<Arc<WorkloadCert>, IdentityError> {
        let _one = self.fetching.lock().await;
        if let Some(c) = self.cached(identity) {
            return Ok(c);
        }
        self.fetch(identity).await
    }

    async fn fetch(&self, identity: &Arc<str>) -> Result<Arc<WorkloadCert>, IdentityError> {
        let cert = match &self.source {
            CertSource::Embedded(ca) => {
                let now = SystemTime::now();
                ca.issue(identity, now - Duration::from_secs(60), now + self.ttl)?
            }
            CertSource::Remote(client) => {
                let (key, csr) = super::new_key_and_csr(identity)?;
                let chain = client.sign(identity, &csr, self.ttl).await?;
                WorkloadCert::new(chain, key.serialize_der())?
            }
        };
        if *cert.identity != **identity {
            return Err(IdentityError::invalid(
                "issued certificate",
                format!("names {} instead of {identity}", cert.identity),
            ));
        }
        let cert = Arc::new(cert);
        tracing::info!(identity = %identity, serial = %cert.info.serial, not_after = ?cert.info.not_after, "workload certificate issued");
        if let Ok(mut m) = self.certs.write() {
            m.insert(identity.clone(), cert.clone());
        }
        if let Ok(mut m) = self.by_sni.write() {
            m.insert(super::server_name_for(identity), identity.clone());
        }
        Ok(cert)
    }

    /// Makes the held set match `wanted`: fetches missing certificates, renews
    /// those past half life, forgets the rest. Failures are logged and retried
    /// on the next call; a certificate being renewed stays in use meanwhile.
    pub async fn sync(&self, wanted: &HashSet<Arc<str>>) {
        let now = SystemTime::now();
        let due: Vec<Arc<str>> = wanted
            .iter()
            .filter(|id| {
                let held = self.certs.read().ok().and_then(|m| m.get(&***id).map(|c| c.info.renew_at));
                held.is_none_or(|at| at <= now)
            })
            .cloned()
            .collect();
        for id in due {
            let _one = self.fetching.lock().await;
            if let Err(e) = self.fetch(&id).await {
                tracing::warn!(identity = %id, error = %e, "could not obtain a workload certificate; will retry");
            }
        }
        if let Ok(mut m) = self.certs.write() {
            m.retain(|id, _| wanted.contains(id));
        }
        if let Ok(mut m) = self.by_sni.write() {
            m.retain(|_, id| wanted.contains(id));
        }
    }

    /// The identity whose certificate a client asked for by server name.
    pub fn identity_for_server_name(&self, sni: &str) -> Option<Arc<str>> {
        self.by_sni.read().ok()?.get(sni).cloned()
    }

    /// The certificates held and still valid, with their keys: what a
    /// replacing agent adopts instead of asking the CA again.
    pub fn export(&self) -> Vec<(Vec<Vec<u8>>, Vec<u8>)> {
        let now = SystemTime::now();
        let held = self.certs.read().map(|m| m.values().cloned().collect::<Vec<_>>()).unwrap_or_default();
        held.iter().filter(|c| c.info.not_after > now).map(|c| c.export()).collect()
    }

    /// Takes certificates a previous agent held (see [`CertManager::export`]):
    /// each one still valid is used as if this agent had fetched it, and
    /// renewed at half its remaining life. Returns how many were taken.
    pub fn adopt(&self, certs: Vec<(Vec<Vec<u8>>, Vec<u8>)>) -> usize {
        let now = SystemTime::now();
        let mut taken = 0;
        for (chain, key) in certs {
            let chain = chain.into_iter().map(CertificateDer::from).collect();
            let cert = match WorkloadCert::new(chain, key) {
                Ok(c) if c.info.not_after > now && c.info.identity.starts_with("spiffe://") => Arc::new(c),
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "a handed-over certificate was not usable; the CA will be asked");
                    continue;
                }
            };
            let identity = cert.identity.clone();
            if let Ok(mut m) = self.certs.write() {
                m.insert(identity.clone(), cert);
            }
            if let Ok(mut m) = self.by_sni.write() {
                m.insert(super::server_name_for(&identity), identity);
            }
            taken += 1;
        }
        taken
    }

    /// What `/config_dump` shows: identity, serial, validity (no keys).
    pub fn dump(&self) -> Vec<CertInfo> {
        let mut v: Vec<CertInfo> =
            self.certs.read().map(|m| m.values().map(|c| c.info.clone()).collect()).unwrap_or_default();
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }
}

impl CertLookup for CertManager {
    fn by_server_name(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let id = self.by_sni.read().ok()?.get(sni).cloned()?;
        self.cached(&id).map(|c| c.key.clone())
    }
}
