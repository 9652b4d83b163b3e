//! rustls settings for mTLS between agents (HBONE) and to the CA service.
//!
//! A client checks that the server's chain leads to the mesh root **and** that
//! its certificate names exactly the SPIFFE identity it expects (there is no DNS
//! name to check). A server requires a client chain to the mesh root; the
//! handler then reads the client's identity from its certificate. TLS 1.3 only.
use std::sync::Arc;

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore, ServerConfig, SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts a server whose chain leads to `roots` and whose certificate carries
/// exactly the identity `expected`.
#[derive(Debug)]
pub struct IdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: Arc<str>,
    provider: Arc<CryptoProvider>,
}

impl IdentityVerifier {
    pub fn new(roots: Arc<RootCertStore>, expected: Arc<str>) -> Self {
        Self { roots, expected, provider: provider() }
    }
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match super::peer_identity(end_entity) {
            Some(id) if *id == *self.expected => Ok(ServerCertVerified::assertion()),
            got => {
                tracing::debug!(expected = %self.expected, ?got, "server identity mismatch");
                Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Always presents one certificate.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Client settings: present `cert` (if any), expect the server to be `expected`.
pub fn client_config(
    roots: Arc<RootCertStore>,
    cert: Option<Arc<CertifiedKey>>,
    expected: Arc<str>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, Error> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(IdentityVerifier::new(roots, expected)));
    let mut config = match cert {
        Some(c) => builder.with_client_cert_resolver(Arc::new(Fixed(c))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Chooses the server certificate from the client's SNI (see
/// [`super::server_name_for`]).
pub trait CertLookup: Send + Sync + std::fmt::Debug {
    fn by_server_name(&self, sni: &str) -> Option<Arc<CertifiedKey>>;
}

#[derive(Debug)]
struct BySni(Arc<dyn CertLookup>);

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name()?;
        let found = self.0.by_server_name(sni);
        if found.is_none() {
            tracing::debug!(sni, "no local workload certificate for this server name");
        }
        found
    }
}

/// Server settings: require a client certificate chaining to `roots`; present
/// the certificate `certs` finds for the client's server name.
pub fn server_config(
    roots: Arc<RootCertStore>,
    certs: Arc<dyn CertLookup>,
    require_client_cert: bool,
    alpn: &[&[u8]],
) -> Result<ServerConfig, Error> {
    let verifier = if require_client_cert {
        WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| Error::General(e.to_string()))?
    } else {
        WebPkiClientVerifier::no_client_auth()
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(BySni(certs)));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A certificate chain and private key from PEM (a `kubernetes.io/tls` Secret),
/// checked to belong together.
pub fn certified_key_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, String> {
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject as _};
    let chain =
        CertificateDer::pem_slice_iter(cert_pem).collect::<Result<Vec<_>, _>>().map_err(|e| format!("tls.crt: {e}"))?;
    if chain.is_empty() {
        return Err("tls.crt holds no PEM certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("tls.key: {e}"))?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        Error::InconsistentKeys(_) => "tls.key does not match the certificate in tls.crt".to_owned(),
        other => format!("tls.key: {other}"),
    })?;
    // An unknown consistency is not an error for rustls; it is for a Gateway.
    certified.keys_match().map_err(|_| "tls.key does not match the certificate in tls.crt".to_owned())?;
    Ok(certified)
}

/// PEM certificate revocation lists (a Secret's `ca.crl`, a `caCrl` file) as DER.
pub fn crls_from_pem(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    use rustls::pki_types::{CertificateRevocationListDer, pem::PemObject as _};
    let crls = CertificateRevocationListDer::pem_slice_iter(pem)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if crls.is_empty() {
        return Err("holds no PEM X509 CRL".into());
    }
    // Each must parse as a CRL webpki can use.
    for der in &crls {
        use x509_parser::prelude::FromDer as _;
        x509_parser::revocation_list::CertificateRevocationList::from_der(der)
            .map_err(|e| format!("not a certificate revocation list: {e}"))?;
    }
    Ok(crls)
}

mod edge;

pub use edge::{check_cipher_suite, gateway_server_config, https_client_config, origination_config};

#[cfg(test)]
mod tests;
