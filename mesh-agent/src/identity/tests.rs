#![expect(clippy::unwrap_used, reason = "tests")]
use std::{
    collections::HashSet,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    client::danger::ServerCertVerifier as _,
    pki_types::{ServerName, UnixTime},
};

use super::*;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("mesh-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const A: &str = "spiffe://cluster.local/ns/demo/sa/a";
const B: &str = "spiffe://cluster.local/ns/demo/sa/b";

fn roots(ca: &Ca) -> Arc<rustls::RootCertStore> {
    let mut r = rustls::RootCertStore::empty();
    r.add(ca.root_der().clone()).unwrap();
    Arc::new(r)
}

#[test]
fn ca_is_created_once_with_a_private_key_and_reloaded() {
    let dir = TempDir::new("ca");
    let ca = Ca::load_or_create(&dir.0, "cluster.local").unwrap();
    let key = dir.0.join(ca::ROOT_KEY_FILE);
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&dir.0).unwrap().permissions().mode() & 0o777, 0o700);
    let again = Ca::load_or_create(&dir.0, "cluster.local").unwrap();
    assert_eq!(ca.root_der(), again.root_der());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Ca::load_or_create(&dir.0, "cluster.local").err().unwrap().to_string();
    assert!(err.contains("root-key.pem") && err.contains("chmod 600"), "{err}");
}

#[test]
fn the_ca_decides_the_identity_not_the_csr() {
    let dir = TempDir::new("csr");
    let ca = Ca::load_or_create(&dir.0, "cluster.local").unwrap();
    let (_key, csr) = new_key_and_csr(A).unwrap();
    let chain = ca.sign_csr(&csr, B, Duration::from_secs(60)).unwrap();
    let info = CertInfo::parse(&chain[0]).unwrap();
    assert_eq!(info.identity, B);
    assert!(info.not_after > SystemTime::now() && info.not_after < SystemTime::now() + Duration::from_secs(61));
    assert!(info.renew_at < info.not_after);
    let err = ca.sign_csr(
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        A,
        Duration::from_secs(60),
    );
    assert!(matches!(err, Err(IdentityError::Invalid { .. })), "{:?}", err.err());
    assert!(ca.sign_csr(&csr, "https://not-spiffe", Duration::from_secs(60)).is_err());
}

#[test]
fn a_client_accepts_only_the_expected_identity_from_the_mesh_root() {
    let (d1, d2) = (TempDir::new("v1"), TempDir::new("v2"));
    let (mesh, other) =
        (Ca::load_or_create(&d1.0, "cluster.local").unwrap(), Ca::load_or_create(&d2.0, "cluster.local").unwrap());
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let b = mesh.issue(B, now - hour, now + hour).unwrap();
    let forged_b = other.issue(B, now - hour, now + hour).unwrap();
    let expired_b = mesh.issue(B, now - 2 * hour, now - hour).unwrap();
    let name = ServerName::try_from(server_name_for(B)).unwrap();
    let verify = |expected: &str, cert: &WorkloadCert| {
        tls::IdentityVerifier::new(roots(&mesh), expected.into()).verify_server_cert(
            &cert.key.cert[0],
            &[],
            &name,
            &[],
            UnixTime::now(),
        )
    };
    assert!(verify(B, &b).is_ok());
    assert!(verify(A, &b).is_err(), "identity mismatch accepted");
    assert!(verify(B, &forged_b).is_err(), "another root accepted");
    assert!(verify(B, &expired_b).is_err(), "expired certificate accepted");
}

#[test]
fn server_names_are_distinct_per_identity() {
    assert_eq!(server_name_for(A), "a.demo.cluster.local.hbone");
    assert_ne!(server_name_for(A), server_name_for(B));
    assert_eq!(server_name_for("garbage"), "unknown.hbone");
}

#[tokio::test]
async fn manager_issues_caches_and_forgets() {
    let dir = TempDir::new("mgr");
    let ca = Arc::new(Ca::load_or_create(&dir.0, "cluster.local").unwrap());
    let roots = (*roots(&ca)).clone();
    let m = CertManager::new(manager::CertSource::Embedded(ca), roots, Duration::from_secs(3600));
    let a: Arc<str> = A.into();
    let first = m.get(&a).await.unwrap();
    assert_eq!(m.get(&a).await.unwrap().info.serial, first.info.serial, "not cached");
    use tls::CertLookup as _;
    assert!(m.by_server_name(&server_name_for(A)).is_some());
    m.sync(&HashSet::from([B.into()])).await;
    assert!(m.cached(A).is_none(), "unwanted identity kept");
    assert!(m.cached(B).is_some(), "wanted identity not fetched");
    let dump = serde_json::to_string(&m.dump()).unwrap();
    assert!(dump.contains(B) && !dump.contains("PRIVATE"), "{dump}");
}

#[test]
fn a_certificate_past_its_validity_names_no_peer_as_a_resumed_session_would_carry_it() {
    let d = TempDir::new("resumed");
    let mesh = Ca::load_or_create(&d.0, "cluster.local").unwrap();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let cert = mesh.issue(B, now - hour, now + hour).unwrap();
    let der = cert.key.cert[0].as_ref();
    assert_eq!(crate::identity::current_peer_identity(der, now).as_deref(), Some(B));
    // The same certificate, as a session resumed after it expired presents it.
    assert_eq!(crate::identity::current_peer_identity(der, now + 2 * hour), None);
    assert_eq!(crate::identity::current_peer_identity(der, now - 2 * hour), None);
}

#[derive(Debug)]
struct OneKey(Arc<rustls::sign::CertifiedKey>);

impl tls::CertLookup for OneKey {
    fn by_server_name(&self, _sni: &str) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// What `openssl s_client` says when it tries `version` against `port`.
fn s_client(port: u16, version: &str) -> String {
    let sni = server_name_for(B);
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", &sni, version, "-brief"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// The rustls build may carry TLS 1.2 (the Kubernetes client's HTTP stack
/// turns it on, and the edges want it), but the mesh's own TLS (HBONE, the
/// CA) stays TLS 1.3 only, by its explicit protocol list.
#[tokio::test]
async fn mesh_tls_refuses_tls_1_2_whatever_the_build_enables() {
    let d = TempDir::new("tls13");
    let ca = Ca::load_or_create(&d.0, "cluster.local").unwrap();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let b = ca.issue(B, now - hour, now + hour).unwrap();
    let config = tls::server_config(roots(&ca), Arc::new(OneKey(b.key.clone())), false, &[b"h2"]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move { drop(acceptor.accept(tcp).await) });
        }
    });
    let tls12 = tokio::task::spawn_blocking(move || s_client(port, "-tls1_2")).await.unwrap();
    assert!(tls12.contains("protocol version") && !tls12.contains("Protocol version: TLSv1.2"), "{tls12}");
    let tls13 = tokio::task::spawn_blocking(move || s_client(port, "-tls1_3")).await.unwrap();
    assert!(tls13.contains("TLSv1.3"), "{tls13}");
}
