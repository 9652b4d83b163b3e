//! rustls settings where the agent meets the world outside the mesh: a
//! Gateway's TLS servers and TLS originated to services outside it. TLS 1.2
//! and 1.3 as Mozilla's "intermediate" profile: TLS 1.2 only with ECDHE key
//! exchange and AEAD ciphers (rustls offers nothing weaker).
use std::sync::Arc;

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, ServerConfig,
    SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime},
    server::{
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

use super::provider;
use crate::state::{ClientAuth, PeerCheck, TlsSettings, TlsVersion, traffic::TlsOrigination};

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

/// Settings for a Gateway's TLS server: its certificate, the protocol
/// versions and TLS 1.2 suites it allows (TLS 1.3's suites are always
/// offered), the client certificates it asks for (`MUTUAL`,
/// `OPTIONAL_MUTUAL`), h2 and HTTP/1.1 by ALPN.
pub fn gateway_server_config(
    cert: Arc<CertifiedKey>,
    settings: &TlsSettings,
    client: Option<&ClientAuth>,
) -> Result<ServerConfig, Error> {
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
    let provider = Arc::new(provider);
    let builder = ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(&versions)?;
    let builder = match client {
        None => builder.with_no_client_auth(),
        Some(c) => builder.with_client_cert_verifier(client_verifier(c, provider)?),
    };
    let mut config = builder.with_cert_resolver(Arc::new(OneCert(cert)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if client.is_some() {
        // A resumed session skips the certificate checks: a client whose
        // certificate expired since, or was revoked, would pass. Every
        // handshake checks it again.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
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

fn root_store(check: &PeerCheck) -> Result<Arc<RootCertStore>, Error> {
    let mut store = RootCertStore::empty();
    for der in &check.roots {
        store.add(CertificateDer::from(der.clone()))?;
    }
    Ok(Arc::new(store))
}

fn crls(check: &PeerCheck) -> Vec<CertificateRevocationListDer<'static>> {
    check.crls.iter().map(|d| CertificateRevocationListDer::from(d.clone())).collect()
}

/// A client's chain must reach the roots and not be revoked (with CRLs, each
/// certificate of the chain needs its issuer's, as Envoy's default), then
/// carry one of the subject alternative names, if any are listed.
fn client_verifier(c: &ClientAuth, provider: Arc<CryptoProvider>) -> Result<Arc<dyn ClientCertVerifier>, Error> {
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(root_store(&c.check)?, provider).with_crls(crls(&c.check));
    if c.optional {
        builder = builder.allow_unauthenticated();
    }
    let inner = builder.build().map_err(|e| Error::General(e.to_string()))?;
    Ok(match c.check.subject_alt_names.is_empty() {
        true => inner,
        false => Arc::new(ClientNames { inner, names: c.check.subject_alt_names.clone() }),
    })
}

/// The subject alternative names a verified peer certificate must carry one of.
fn names_match(end_entity: &CertificateDer<'_>, names: &[String]) -> Result<(), Error> {
    match super::super::has_subject_alt_name(end_entity, names) {
        true => Ok(()),
        false => {
            tracing::debug!(?names, "peer certificate has none of the required subject alternative names");
            Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }
}

#[derive(Debug)]
struct ClientNames {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<String>,
}

impl ClientCertVerifier for ClientNames {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        names_match(end_entity, &self.names).map(|()| verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client settings for TLS origination to a service outside the mesh
/// (DestinationRule `tls.mode: SIMPLE` or `MUTUAL`): TLS 1.2 and 1.3; the
/// server's chain must reach the roots, not be revoked, and name the server
/// name asked for, or one of `subjectAltNames` when they are given (nothing
/// is checked with `insecureSkipVerify`); `MUTUAL` presents the client
/// certificate.
pub fn origination_config(tls: &TlsOrigination, alpn: &[&[u8]]) -> Result<ClientConfig, Error> {
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match tls.insecure_skip_verify {
        true => Arc::new(NoVerify(provider.clone())),
        false => {
            let inner = WebPkiServerVerifier::builder_with_provider(root_store(&tls.check)?, provider.clone())
                .with_crls(crls(&tls.check))
                .build()
                .map_err(|e| Error::General(e.to_string()))?;
            match tls.check.subject_alt_names.is_empty() {
                true => inner,
                false => Arc::new(ServerNames { inner, names: tls.check.subject_alt_names.clone() }),
            }
        }
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &tls.client_cert {
        Some(c) => {
            let key = super::certified_key_from_pem(&c.cert_pem, &c.key_pem).map_err(Error::General)?;
            builder.with_client_cert_resolver(Arc::new(super::Fixed(Arc::new(key))))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Client settings for an HTTPS client of the agent's own (a JWKS issuer):
/// TLS 1.2 and 1.3, the server's chain to `roots` naming the server asked for.
pub fn https_client_config(roots: RootCertStore, alpn: &[&[u8]]) -> Result<ClientConfig, Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// `subjectAltNames` in origination: the chain checked as usual, then the
/// names listed instead of the server name asked for (as Envoy's
/// `match_typed_subject_alt_names`).
#[derive(Debug)]
struct ServerNames {
    inner: Arc<WebPkiServerVerifier>,
    names: Vec<String>,
}

impl ServerCertVerifier for ServerNames {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // webpki checks the chain and revocation before the name: a name
        // error means the rest passed.
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Ok(_)
            | Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        names_match(end_entity, &self.names).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
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
