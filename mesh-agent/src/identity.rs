//! Workload identity (Istio's Citadel role): SPIFFE IDs, the mesh CA, short-lived
//! workload certificates held only in memory, and the TLS settings that prove and
//! check identities between node agents.
//!
//! A workload's identity is `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! carried as the only URI SAN of its certificate. Certificates are signed by the
//! mesh CA: in-process (`ca::Ca`, the embedded default) or by the CA service
//! (`ca_service`, for a multi-node mesh) that the agent asks with a CSR, so the
//! CA key never leaves the CA's machine. `manager::CertManager` keeps one
//! certificate per identity of the node's meshed pods and renews it at half life.
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};
use serde::Serialize;

pub mod ca;
pub mod ca_service;
pub mod jwt;
pub mod manager;
pub mod tls;

pub use ca::Ca;
pub use manager::CertManager;

/// Default lifetime of a workload certificate.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
pub use crate::state::ROOT_NAMESPACE;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    #[error("certificate authority at {addr}: {message}")]
    Remote { addr: String, message: String },
    #[error("certificate authority refused {identity}: {message}")]
    Refused { identity: String, message: String },
}

impl IdentityError {
    pub(crate) fn invalid(what: impl Into<String>, message: impl std::fmt::Display) -> Self {
        IdentityError::Invalid { what: what.into(), message: message.to_string() }
    }
}

/// The SPIFFE ID of a service account.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// The identity of the CA service itself (what node agents verify when they dial it).
pub fn ca_identity(trust_domain: &str) -> String {
    spiffe_id(trust_domain, ROOT_NAMESPACE, crate::state::CA_SERVICE_ACCOUNT)
}

/// The TLS server name a client sends to ask a node agent for the certificate
/// of `identity`: `<sa>.<ns>.<trust-domain>.hbone`. Computed the same way on both
/// sides and only compared, never parsed back.
pub fn server_name_for(identity: &str) -> String {
    let rest = identity.strip_prefix("spiffe://").unwrap_or(identity);
    let mut parts = rest.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa)) => format!("{sa}.{ns}.{td}.hbone"),
        _ => "unknown.hbone".to_owned(),
    }
}

/// A workload certificate and its key (in memory only), ready for rustls.
pub struct WorkloadCert {
    pub identity: Arc<str>,
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
    /// The key's PKCS#8 form, only ever handed to a replacing agent of the
    /// same user (see `agent::handover`), never shown or written.
    pkcs8: Vec<u8>,
}

/// What `/config_dump` shows of a certificate: never the key.
#[derive(Debug, Clone, Serialize)]
pub struct CertInfo {
    pub identity: String,
    /// Hex serial number.
    pub serial: String,
    #[serde(serialize_with = "serialize_time")]
    pub not_before: SystemTime,
    #[serde(serialize_with = "serialize_time")]
    pub not_after: SystemTime,
    /// When this agent renews it: half-way from when it was received (not
    /// from `not_before`, which the CA backdates for clock skew) to expiry.
    #[serde(serialize_with = "serialize_time")]
    pub renew_at: SystemTime,
    /// Every certificate the agent presents, the leaf first, then the
    /// intermediates up to the mesh root's child.
    pub chain: Vec<ChainLink>,
}

/// One certificate of a presented chain.
#[derive(Debug, Clone, Serialize)]
pub struct ChainLink {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    #[serde(serialize_with = "serialize_time")]
    pub not_after: SystemTime,
}

impl ChainLink {
    fn parse(der: &[u8]) -> Option<ChainLink> {
        use x509_parser::prelude::FromDer as _;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
        Some(ChainLink {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: serial(&cert),
            not_after: system_time(cert.validity().not_after),
        })
    }
}

/// A certificate's serial number in hex, as dumps show it.
fn serial(cert: &x509_parser::certificate::X509Certificate<'_>) -> String {
    cert.tbs_certificate.raw_serial_as_string().replace(':', "")
}

fn system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
}

fn serialize_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let odt = time::OffsetDateTime::from(*t);
    let text = odt.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    s.serialize_str(&text)
}

impl CertInfo {
    /// Parses the fields shown in dumps, and the SPIFFE ID, from a certificate.
    pub fn parse(der: &[u8]) -> Result<CertInfo, IdentityError> {
        use x509_parser::prelude::FromDer as _;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|e| IdentityError::invalid("certificate", e))?;
        let identity =
            peer_identity(der).ok_or_else(|| IdentityError::invalid("certificate", "no spiffe:// URI SAN"))?;
        let not_after = system_time(cert.validity().not_after);
        let now = SystemTime::now();
        Ok(CertInfo {
            identity,
            serial: serial(&cert),
            not_before: system_time(cert.validity().not_before),
            not_after,
            renew_at: now + not_after.duration_since(now).unwrap_or_default() / 2,
            chain: Vec::new(),
        })
    }
}

impl WorkloadCert {
    /// Builds from a chain (leaf first) and the leaf's PKCS#8 key.
    pub fn new(chain: Vec<CertificateDer<'static>>, key_pkcs8: Vec<u8>) -> Result<WorkloadCert, IdentityError> {
        let leaf = chain.first().ok_or_else(|| IdentityError::invalid("certificate chain", "empty"))?;
        let mut info = CertInfo::parse(leaf)?;
        info.chain = chain.iter().filter_map(|c| ChainLink::parse(c)).collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.clone()));
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| IdentityError::invalid("private key", e))?;
        Ok(WorkloadCert {
            identity: info.identity.as_str().into(),
            key: Arc::new(CertifiedKey::new(chain, signer)),
            info,
            pkcs8: key_pkcs8,
        })
    }

    /// The chain (DER, leaf first) and the key (PKCS#8), for a replacing
    /// agent: what [`WorkloadCert::new`] takes back.
    pub fn export(&self) -> (Vec<Vec<u8>>, Vec<u8>) {
        (self.key.cert.iter().map(|c| c.to_vec()).collect(), self.pkcs8.clone())
    }
}

/// Whether a certificate carries one of `names` as a subject alternative
/// name: DNS names compared without case, IP addresses by value, URIs and
/// email addresses exactly (as Envoy's exact SAN matchers).
pub fn has_subject_alt_name(der: &[u8], names: &[String]) -> bool {
    use x509_parser::{extensions::GeneralName, prelude::FromDer as _};
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(der) else { return false };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return false };
    let matches = |n: &GeneralName<'_>, want: &str| match n {
        GeneralName::DNSName(d) => d.eq_ignore_ascii_case(want),
        GeneralName::URI(u) | GeneralName::RFC822Name(u) => *u == want,
        GeneralName::IPAddress(b) => match want.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(a)) => a.octets()[..] == **b,
            Ok(std::net::IpAddr::V6(a)) => a.octets()[..] == **b,
            Err(_) => false,
        },
        _ => false,
    };
    san.value.general_names.iter().any(|n| names.iter().any(|w| matches(n, w)))
}

/// The `x-forwarded-client-cert` value a gateway sets for a client that
/// presented `der` (Envoy's with `Hash`, `Subject`, `URI` and `DNS`, as
/// Istio's gateways set it): `Hash=<sha256 hex>;Subject="…";URI=…;DNS=…`.
pub fn forwarded_client_cert(der: &[u8]) -> String {
    use std::fmt::Write as _;
    use x509_parser::{extensions::GeneralName, prelude::FromDer as _};
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = String::from("Hash=");
    for b in digest.as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(der) else { return out };
    let subject = cert.subject().to_string();
    let _ = write!(out, ";Subject=\"{}\"", subject.replace('\\', "\\\\").replace('"', "\\\""));
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            // Values with a separator would let a certificate forge fields.
            let clean = |v: &str| !v.contains([';', ',', '"', '=']);
            match n {
                GeneralName::URI(u) if clean(u) => {
                    let _ = write!(out, ";URI={u}");
                }
                GeneralName::DNSName(d) if clean(d) => {
                    let _ = write!(out, ";DNS={d}");
                }
                _ => {}
            }
        }
    }
    out
}

/// The `spiffe://` URI SAN of a certificate, if it has exactly one.
pub fn peer_identity(der: &[u8]) -> Option<String> {
    use x509_parser::{extensions::GeneralName, prelude::FromDer as _};
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let first = uris.next()?;
    uris.next().is_none().then(|| first.to_owned())
}

/// [`peer_identity`], if the certificate is valid now. A resumed TLS session
/// carries the certificate it was first made with: a session resumed after
/// that certificate expired must not pass for its identity.
pub fn current_peer_identity(der: &[u8], now: std::time::SystemTime) -> Option<String> {
    use x509_parser::prelude::FromDer as _;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let secs = now.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    let at = x509_parser::time::ASN1Time::from_timestamp(i64::try_from(secs).ok()?).ok()?;
    cert.validity().is_valid_at(at).then(|| peer_identity(der))?
}

/// A fresh in-memory key pair and a CSR for `identity`.
pub fn new_key_and_csr(identity: &str) -> Result<(rcgen::KeyPair, String), IdentityError> {
    let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::invalid("key generation", e))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let uri = rcgen::string::Ia5String::try_from(identity).map_err(|e| IdentityError::invalid(identity, e))?;
    params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    let csr = params.serialize_request(&key).map_err(|e| IdentityError::invalid("CSR", e))?;
    let pem = csr.pem().map_err(|e| IdentityError::invalid("CSR", e))?;
    Ok((key, pem))
}

/// Random bytes from the system generator (through the TLS library).
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], IdentityError> {
    let mut buf = [0u8; N];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut buf)
        .map_err(|_| IdentityError::invalid("random number generator", "unavailable"))?;
    Ok(buf)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;

/// A TCP connection to `host:port` (the first address that answers) from a
/// socket marked as the agent's own (the agent mark), so that the node's
/// capture never takes it for a host client's: the CA and the API server
/// are reached this way. The mark needs CAP_NET_ADMIN; without it (the CA
/// service, outside any captured namespace) the socket goes unmarked.
pub async fn connect_as_agent(host: &str, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let mut last = std::io::Error::other(format!("{host}: no address"));
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        if let Err(e) = socket2::SockRef::from(&socket).set_mark(crate::marks::get().agent) {
            tracing::debug!(error = %e, "socket not marked as the agent's");
        }
        match socket.connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}
