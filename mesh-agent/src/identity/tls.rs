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

/// Istio's `cipherSuites` names (OpenSSL's) and the rustls TLS 1.2 suites
/// they are: ECDHE key exchange with an AEAD cipher, Mozilla's
/// "intermediate" profile. Names of suites with CBC ciphers, RSA key
/// exchange or 3DES are refused by the configuration.
const TLS12_SUITES: [(&str, rustls::CipherSuite); 6] = [
    ("ECDHE-ECDSA-AES128-GCM-SHA256", rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
    ("ECDHE-RSA-AES128-GCM-SHA256", rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256),
    ("ECDHE-ECDSA-AES256-GCM-SHA384", rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384),
    ("ECDHE-RSA-AES256-GCM-SHA384", rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384),
    ("ECDHE-ECDSA-CHACHA20-POLY1305", rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256),
    ("ECDHE-RSA-CHACHA20-POLY1305", rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256),
];

/// Whether `name` is a `cipherSuites` entry the edge offers (else why not).
pub fn check_cipher_suite(name: &str) -> Result<(), String> {
    if TLS12_SUITES.iter().any(|(n, _)| *n == name) {
        return Ok(());
    }
    let offered: Vec<&str> = TLS12_SUITES.iter().map(|(n, _)| *n).collect();
    Err(format!(
        "{name:?} is not offered: TLS 1.2 at the mesh's edge is ECDHE with AES-GCM or ChaCha20-Poly1305 only (no CBC, no RSA key exchange); one of {offered:?}"
    ))
}

/// Settings for a Gateway's TLS server (mode SIMPLE): its certificate, the
/// protocol versions and TLS 1.2 suites it allows (TLS 1.3's suites are
/// always offered), no client certificate, h2 and HTTP/1.1 by ALPN.
pub fn gateway_server_config(
    cert: Arc<CertifiedKey>,
    settings: &crate::state::TlsSettings,
) -> Result<ServerConfig, Error> {
    use crate::state::TlsVersion;
    let mut provider = (*provider()).clone();
    let wanted = |s: &rustls::SupportedCipherSuite| match s {
        rustls::SupportedCipherSuite::Tls13(_) => true,
        rustls::SupportedCipherSuite::Tls12(_) => {
            settings.cipher_suites.is_empty()
                || TLS12_SUITES.iter().any(|(n, id)| *id == s.suite() && settings.cipher_suites.iter().any(|c| c == n))
        }
    };
    provider.cipher_suites.retain(wanted);
    let mut versions: Vec<&'static rustls::SupportedProtocolVersion> = Vec::new();
    if settings.min <= TlsVersion::V1_2 && settings.max >= TlsVersion::V1_2 {
        versions.push(&rustls::version::TLS12);
    }
    if settings.max >= TlsVersion::V1_3 {
        versions.push(&rustls::version::TLS13);
    }
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&versions)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OneCert(cert)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The server's one certificate, whatever the client's SNI (the gateway chose
/// the server by it already).
#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl ResolvesServerCert for OneCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Client settings for TLS origination to a service outside the mesh
/// (DestinationRule `tls.mode: SIMPLE`): the server's chain must reach `roots`
/// and name the server name asked for, unless `roots` is `None`
/// (`insecureSkipVerify`). TLS 1.2 and 1.3.
pub fn origination_config(roots: Option<RootCertStore>, alpn: &[&[u8]]) -> Result<ClientConfig, Error> {
    let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let mut config = match roots {
        Some(r) => builder.with_root_certificates(r).with_no_client_auth(),
        None => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider()))).with_no_client_auth()
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// `insecureSkipVerify`: any certificate, but the handshake signatures still checked.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
