//! The edge's TLS settings in handshakes over in-memory streams: a Gateway
//! server's client certificate checks (MUTUAL, OPTIONAL_MUTUAL, names,
//! revocation) and origination's server checks and client certificate.
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use rustls::{
    ClientConfig, ServerConfig,
    pki_types::{CertificateDer, pem::PemObject as _},
};

use super::*;
use crate::state::{
    ClientAuth, PeerCheck, TlsSettings,
    traffic::{ClientCert, TlsOrigination},
};

struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    der: Vec<u8>,
}

/// A certificate and key, as PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = p.self_signed(&key).expect("CA certificate");
        TestCa { der: cert.der().to_vec(), issuer: Issuer::new(p, key) }
    }

    /// A certificate for `names` (DNS names, or URIs when they have a scheme).
    fn leaf(&self, names: &[&str], serial: u64) -> Leaf {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.subject_alt_names = names
            .iter()
            .map(|n| match n.contains("://") {
                true => SanType::URI((*n).try_into().expect("URI")),
                false => SanType::DnsName((*n).try_into().expect("DNS name")),
            })
            .collect();
        p.serial_number = Some(SerialNumber::from(serial));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &self.issuer).expect("certificate");
        Leaf { cert: cert.pem(), key: key.serialize_pem() }
    }

    /// A CRL revoking `serials`.
    fn crl(&self, serials: &[u64]) -> Vec<u8> {
        let now = time::OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::hours(1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now - time::Duration::minutes(1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer).expect("CRL").der().to_vec()
    }

    fn check(&self, names: &[&str], crls: Vec<Vec<u8>>) -> PeerCheck {
        let subject_alt_names = names.iter().map(|n| (*n).to_owned()).collect();
        PeerCheck { ca: "test CA".into(), subject_alt_names, roots: vec![self.der.clone()], crls }
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut r = rustls::RootCertStore::empty();
        r.add(CertificateDer::from(self.der.clone())).expect("root");
        r
    }
}

fn key(leaf: &Leaf) -> Arc<rustls::sign::CertifiedKey> {
    Arc::new(certified_key_from_pem(leaf.cert.as_bytes(), leaf.key.as_bytes()).expect("key pair"))
}

/// A client for `hello.example.com` trusting `ca`, presenting `cert`.
fn client(ca: &TestCa, cert: Option<&Leaf>, tls12_only: bool) -> ClientConfig {
    let versions: &[&rustls::SupportedProtocolVersion] =
        if tls12_only { &[&rustls::version::TLS12] } else { &[&rustls::version::TLS13] };
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(ca.roots());
    match cert {
        Some(c) => b.with_client_cert_resolver(Arc::new(Fixed(key(c)))),
        None => b.with_no_client_auth(),
    }
}

/// Handshakes, sends a byte each way; the client's and the server's results.
async fn handshake(server: ServerConfig, client: ClientConfig, sni: &str) -> (Result<(), String>, Result<(), String>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (a, b) = tokio::io::duplex(64 * 1024);
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).expect("name");
    let client = async move {
        let mut s =
            tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, a).await.map_err(|e| e.to_string())?;
        s.write_all(b"x").await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        let mut byte = [0u8];
        s.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        Ok(())
    };
    let server = async move {
        let mut s = tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(b).await.map_err(|e| e.to_string())?;
        let mut byte = [0u8];
        s.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        s.write_all(b"y").await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())
    };
    tokio::join!(client, server)
}

/// (client certificate, names required, optional, TLS 1.2, accepted)
type GatewayCase<'a> = (Option<&'a Leaf>, &'a [&'a str], bool, bool, bool);

/// (server's CA, names, client certificate, server name sent, CRL revokes the server, accepted)
type OriginationCase<'a> = (&'a TestCa, &'a [&'a str], bool, &'a str, bool, bool);

#[tokio::test]
async fn a_mutual_gateway_takes_only_certificates_of_its_ca_with_a_listed_name_not_revoked() {
    let ca = TestCa::new("clients and servers");
    let other = TestCa::new("someone else");
    let server_key = key(&ca.leaf(&["hello.example.com"], 1));
    let good = ca.leaf(&["client.example", "spiffe://example.org/ns/a/sa/b"], 10);
    let wrong_name = ca.leaf(&["intruder.example"], 11);
    let revoked = ca.leaf(&["client.example"], 12);
    let foreign = other.leaf(&["client.example"], 10);
    let crl = ca.crl(&[12]);
    let gateway = |names: &[&str], optional: bool| {
        let auth = ClientAuth { check: ca.check(names, vec![crl.clone()]), optional };
        gateway_server_config(server_key.clone(), &TlsSettings::default(), Some(&auth)).expect("server settings")
    };
    let cases: [GatewayCase<'_>; 11] = [
        (None, &[], false, false, false),
        (Some(&foreign), &[], false, false, false),
        (Some(&good), &[], false, false, true),
        (Some(&good), &[], false, true, true),
        (Some(&revoked), &[], false, false, false),
        (Some(&good), &["client.example"], false, false, true),
        (Some(&good), &["spiffe://example.org/ns/a/sa/b"], false, false, true),
        (Some(&wrong_name), &["client.example"], false, true, false),
        (None, &[], true, false, true),
        (Some(&foreign), &[], true, false, false),
        (Some(&good), &["client.example"], true, false, true),
    ];
    for (i, (cert, names, optional, tls12, accepted)) in cases.into_iter().enumerate() {
        let (c, s) = handshake(gateway(names, optional), client(&ca, cert, tls12), "hello.example.com").await;
        assert_eq!(s.is_ok() && c.is_ok(), accepted, "case {i}: client {c:?}, server {s:?}");
    }
}

#[tokio::test]
async fn origination_checks_the_server_and_presents_its_client_certificate() {
    let ca = TestCa::new("external");
    let other = TestCa::new("someone else");
    let server_leaf = ca.leaf(&["secure.example"], 1);
    let client_leaf = ca.leaf(&["mesh-client.example"], 2);
    // A TLS-1.2-only server that requires a client certificate from `ca`.
    let server = |leaf: &Leaf| {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(ca.roots()), provider())
            .build()
            .expect("verifier");
        ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(leaf.cert.as_bytes()).expect("cert")],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("key"),
            )
            .expect("server")
    };
    let origination = |check: PeerCheck, with_cert: bool| TlsOrigination {
        sni: None,
        insecure_skip_verify: false,
        check,
        client_cert: with_cert.then(|| ClientCert {
            source: "test".into(),
            cert_pem: client_leaf.cert.as_bytes().into(),
            key_pem: client_leaf.key.as_bytes().into(),
        }),
    };
    let cases: [OriginationCase<'_>; 7] = [
        (&ca, &[], true, "secure.example", false, true),
        (&ca, &[], false, "secure.example", false, false),
        (&other, &[], true, "secure.example", false, false),
        (&ca, &[], true, "elsewhere.example", false, false),
        (&ca, &["secure.example"], true, "elsewhere.example", false, true),
        (&ca, &["nope.example"], true, "secure.example", false, false),
        (&ca, &[], true, "secure.example", true, false),
    ];
    for (i, (trusted, names, with_cert, sni, revoked, accepted)) in cases.into_iter().enumerate() {
        let crls = if revoked { vec![ca.crl(&[1])] } else { Vec::new() };
        let tls = origination(trusted.check(names, crls), with_cert);
        let config = origination_config(&tls, &[b"http/1.1"]).expect("client settings");
        let (c, s) = handshake(server(&server_leaf), config, sni).await;
        assert_eq!(c.is_ok() && s.is_ok(), accepted, "case {i}: client {c:?}, server {s:?}");
    }
}

#[test]
fn crls_must_be_pem_crls() {
    let ca = TestCa::new("ca");
    let der = ca.crl(&[3]);
    let text = format!(
        "-----BEGIN X509 CRL-----\n{}\n-----END X509 CRL-----\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &der)
    );
    assert_eq!(crls_from_pem(text.as_bytes()).expect("a CRL"), vec![der]);
    assert!(crls_from_pem(b"not pem").expect_err("no CRL").contains("no PEM X509 CRL"));
    let cert = format!(
        "-----BEGIN X509 CRL-----\n{}\n-----END X509 CRL-----\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &ca.der)
    );
    assert!(crls_from_pem(cert.as_bytes()).expect_err("a certificate").contains("not a certificate revocation list"));
}

/// How the second of two connections from one client was made.
async fn second_handshake(server: ServerConfig, client: ClientConfig) -> Option<rustls::HandshakeKind> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (server, client) = (Arc::new(server), Arc::new(client));
    let mut kind = None;
    for _ in 0..2 {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server.clone());
        let served = tokio::spawn(async move {
            let mut s = acceptor.accept(b).await.ok()?;
            s.write_all(b"y").await.ok()?;
            s.flush().await.ok()
        });
        let name = rustls::pki_types::ServerName::try_from("hello.example.com").expect("name");
        let mut s = tokio_rustls::TlsConnector::from(client.clone()).connect(name, a).await.expect("handshake");
        let mut byte = [0u8];
        s.read_exact(&mut byte).await.expect("a byte from the server");
        kind = s.get_ref().1.handshake_kind();
        served.await.expect("server task");
    }
    kind
}

#[tokio::test]
async fn a_mutual_server_checks_every_handshake_never_resuming() {
    let ca = TestCa::new("ca");
    let server_key = key(&ca.leaf(&["hello.example.com"], 1));
    let client_leaf = ca.leaf(&["client.example"], 2);
    let simple = gateway_server_config(server_key.clone(), &TlsSettings::default(), None).expect("SIMPLE");
    let resumed = second_handshake(simple, client(&ca, Some(&client_leaf), false)).await;
    assert_eq!(resumed, Some(rustls::HandshakeKind::Resumed), "SIMPLE resumes sessions");
    let auth = ClientAuth { check: ca.check(&[], Vec::new()), optional: false };
    let mutual = gateway_server_config(server_key, &TlsSettings::default(), Some(&auth)).expect("MUTUAL");
    let again = second_handshake(mutual, client(&ca, Some(&client_leaf), false)).await;
    assert_eq!(again, Some(rustls::HandshakeKind::Full), "MUTUAL must check the certificate on every handshake");
}
