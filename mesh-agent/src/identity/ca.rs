//! The mesh CA: a self-signed root kept in a directory (`root-cert.pem`, and
//! `root-key.pem` readable by its owner only), which signs workload certificates
//! from CSRs. The CA decides the identity and the validity; of the CSR it keeps
//! only the public key.
use std::{
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;

use super::{IdentityError, WorkloadCert};

pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// Lifetime of a root created by `load_or_create`.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Backdating of `notBefore`, for clocks a little behind the CA's.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

pub struct Ca {
    pub trust_domain: String,
    root_der: CertificateDer<'static>,
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io { path: path.display().to_string(), source }
}

/// Writes `contents` to `path` with mode `mode`, replacing it atomically.
pub(crate) fn write_private(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    let tmp = path.with_extension("tmp");
    let mut f =
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(io_err(&tmp))?;
    f.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    f.write_all(contents).and_then(|_| f.sync_all()).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

pub(crate) fn create_dir(dir: &Path) -> Result<(), IdentityError> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err(dir))
}

impl Ca {
    /// Loads the root from `dir`, or creates one there (directory 0700, key 0600).
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Ca, IdentityError> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        if key_path.exists() || cert_path.exists() {
            return Self::load(&cert_path, &key_path, trust_domain);
        }
        create_dir(dir)?;
        let key = KeyPair::generate().map_err(|e| IdentityError::invalid("CA key generation", e))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, trust_domain);
        params.distinguished_name.push(DnType::CommonName, "mesh-agent root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + ROOT_TTL).into();
        params.serial_number = Some(SerialNumber::from_slice(&super::random_bytes::<16>()?));
        let cert = params.self_signed(&key).map_err(|e| IdentityError::invalid("CA certificate", e))?;
        write_private(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_private(&cert_path, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(dir = %dir.display(), trust_domain, "created a new mesh root CA");
        Self::load(&cert_path, &key_path, trust_domain)
    }

    fn load(cert_path: &Path, key_path: &Path, trust_domain: &str) -> Result<Ca, IdentityError> {
        let root_pem = fs::read_to_string(cert_path).map_err(io_err(cert_path))?;
        let meta = fs::metadata(key_path).map_err(io_err(key_path))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(IdentityError::invalid(
                key_path.display().to_string(),
                format!("mode {:o} lets others read the CA key; chmod 600 it", meta.permissions().mode() & 0o777),
            ));
        }
        let key_pem = fs::read_to_string(key_path).map_err(io_err(key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| IdentityError::invalid(key_path.display().to_string(), e))?;
        let root_der = pem_certs(&root_pem)
            .map_err(|e| IdentityError::invalid(cert_path.display().to_string(), e))?
            .into_iter()
            .next()
            .ok_or_else(|| IdentityError::invalid(cert_path.display().to_string(), "no certificate"))?;
        let issuer = Issuer::from_ca_cert_der(&root_der, key)
            .map_err(|e| IdentityError::invalid(cert_path.display().to_string(), e))?;
        Ok(Ca { trust_domain: trust_domain.to_owned(), root_der, root_pem, issuer })
    }

    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Signs the public key of a CSR (whose signature is checked) for `identity`,
    /// valid from now for `ttl`. Returns the chain, leaf first.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &str,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| IdentityError::invalid("CSR", format!("{e} (a PEM CERTIFICATE REQUEST is expected)")))?;
        let now = SystemTime::now();
        self.sign_key(&csr.public_key, identity, now - CLOCK_SKEW, now + ttl)
    }

    /// Issues a certificate for `identity` with a key made here, valid between
    /// the given times (the embedded CA's path; tests use it for expired ones).
    pub fn issue(
        &self,
        identity: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, IdentityError> {
        let key = KeyPair::generate().map_err(|e| IdentityError::invalid("key generation", e))?;
        let chain = self.sign_key(&key, identity, not_before, not_after)?;
        WorkloadCert::new(chain, key.serialize_der())
    }

    fn sign_key(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        identity: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        if !identity.starts_with("spiffe://") {
            return Err(IdentityError::invalid(identity, "not a spiffe:// identity"));
        }
        let uri = rcgen::string::Ia5String::try_from(identity).map_err(|e| IdentityError::invalid(identity, e))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, self.trust_domain.as_str());
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(SerialNumber::from_slice(&super::random_bytes::<16>()?));
        let cert = params.signed_by(public_key, &self.issuer).map_err(|e| IdentityError::invalid("signing", e))?;
        Ok(vec![cert.der().clone()])
    }
}

/// Every certificate in a PEM text.
pub fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())
}

/// Reads a PEM file of trusted roots into a store.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, IdentityError> {
    let pem = fs::read_to_string(path).map_err(io_err(path))?;
    roots_from_pem(&pem).map_err(|e| IdentityError::invalid(path.display().to_string(), e))
}

pub fn roots_from_pem(pem: &str) -> Result<rustls::RootCertStore, String> {
    let certs = pem_certs(pem)?;
    if certs.is_empty() {
        return Err("no certificate in the PEM text".into());
    }
    let mut store = rustls::RootCertStore::empty();
    for c in certs {
        store.add(c).map_err(|e| e.to_string())?;
    }
    Ok(store)
}

/// Trusted roots from PEM as DER, each checked to be usable as a root: what
/// the model keeps for TLS origination.
pub fn root_ders_from_pem(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    let certs = pem_certs(pem)?;
    roots_from_pem(pem)?;
    Ok(certs.into_iter().map(|c| c.as_ref().to_vec()).collect())
}

/// The directory layout of the CA service.
pub fn token_dir(ca_dir: &Path) -> PathBuf {
    ca_dir.join("node-tokens")
}
