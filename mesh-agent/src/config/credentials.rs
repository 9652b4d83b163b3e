//! Certificates, keys, CAs and CRLs that TLS settings name: keys of a
//! Kubernetes Secret (`credentialName`) or files on the agent's host, read
//! and checked when the configuration loads.
use super::object::{SecretObject, Secrets};
use crate::state::{PeerCheck, traffic::ClientCert};

/// A Secret named `name` in `namespace`, the namespace of whoever uses it
/// (a Gateway's, or a client's), with its key.
pub(super) fn secret<'a>(
    secrets: &'a Secrets,
    namespace: &str,
    name: &str,
) -> Result<(String, &'a SecretObject), String> {
    plain_name(name)?;
    let key = format!("{namespace}/{name}");
    match secrets.get(&key) {
        Some(s) => Ok((key, s)),
        None => Err(format!("Secret {key} does not exist")),
    }
}

/// A `credentialName` is a Secret's name alone: Istio reads it in the
/// namespace of the proxy that uses it, so `other/name` would hand one
/// namespace's credentials to another.
pub(super) fn plain_name(name: &str) -> Result<(), String> {
    match name.split_once('/') {
        Some((ns, n)) => Err(format!(
            "{name:?}: give the Secret's name alone ({n:?}); it is read in the namespace of the workload or Gateway that uses it, never in {ns:?}"
        )),
        None => Ok(()),
    }
}

/// Directories from which objects outside the root namespace may name files
/// (`mesh-agent run --tls-files-from`); empty: none.
static FILE_DIRS: std::sync::RwLock<Vec<std::path::PathBuf>> = std::sync::RwLock::new(Vec::new());

/// Lets objects in any namespace name files under `dirs` in their TLS
/// settings (the operator's choice; set once at start).
pub fn allow_files_under(dirs: &[std::path::PathBuf]) {
    if let Ok(mut d) = FILE_DIRS.write() {
        *d = dirs.iter().map(|p| p.canonicalize().unwrap_or_else(|_| p.clone())).collect();
    }
}

/// Reads a file that an object in `namespace` names: files on the node are
/// the operator's, so only objects in the root namespace may name any, and
/// other namespaces' objects only files under a directory the operator
/// allowed (symbolic links and `..` resolved first).
pub(super) fn read_file(namespace: &str, path: &str) -> Result<Vec<u8>, String> {
    if namespace != crate::state::ROOT_NAMESPACE {
        let dirs = FILE_DIRS.read().map(|d| d.clone()).unwrap_or_default();
        file_allowed(namespace, path, &dirs)?;
    }
    std::fs::read(path).map_err(|e| format!("{path}: {e}"))
}

/// Whether an object in `namespace` (not the root namespace) may name `path`.
fn file_allowed(namespace: &str, path: &str, dirs: &[std::path::PathBuf]) -> Result<(), String> {
    // Nothing about a file outside the allowed directories is told, not even
    // whether it exists: the error is the same.
    let under = |p: &std::path::Path| dirs.iter().any(|d| p.starts_with(d));
    match std::path::Path::new(path).canonicalize() {
        Ok(real) if under(&real) => return Ok(()),
        Err(e) if under(std::path::Path::new(path)) => return Err(format!("{path}: {e}")),
        _ => {}
    }
    let root = crate::state::ROOT_NAMESPACE;
    Err(format!(
        "{path}: files on the node are named only by objects in {root} (this one is in {namespace}), or under a directory given with --tls-files-from; use credentialName with a Secret in the client's namespace"
    ))
}

/// The first of `keys` the Secret holds (Istio reads both the
/// `kubernetes.io/tls` names and the generic ones: `ca.crt` or `cacert`).
pub(super) fn first_value(secret: &SecretObject, keys: &[&str]) -> Result<Option<Vec<u8>>, String> {
    for k in keys {
        if let Some(v) = secret.value(k)? {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// What a peer's certificate must be: a chain to the roots of `ca_pem`, not
/// revoked by the CRLs, with one of `names` (each a non-empty string).
pub(super) fn peer_check(
    ca: String,
    ca_pem: &[u8],
    crl_pems: &[Vec<u8>],
    names: Vec<String>,
) -> Result<PeerCheck, String> {
    let roots =
        crate::identity::ca::root_ders_from_pem(&String::from_utf8_lossy(ca_pem)).map_err(|e| format!("{ca}: {e}"))?;
    let mut crls = Vec::new();
    for pem in crl_pems {
        crls.extend(crate::identity::tls::crls_from_pem(pem).map_err(|e| format!("CRL: {e}"))?);
    }
    if names.iter().any(|n| n.is_empty()) {
        return Err("subjectAltNames: an empty name".into());
    }
    Ok(PeerCheck { ca, subject_alt_names: names, roots, crls })
}

/// A client certificate chain and its key, checked to belong together.
pub(super) fn client_cert(source: String, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Result<ClientCert, String> {
    crate::identity::tls::certified_key_from_pem(&cert_pem, &key_pem).map_err(|e| format!("{source}: {e}"))?;
    Ok(ClientCert { source, cert_pem: cert_pem.into(), key_pem: key_pem.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Who may name which file: the root namespace anything it can read,
    /// another namespace only what lies under an allowed directory, after
    /// `..` and symbolic links are resolved.
    #[test]
    fn files_are_named_by_the_root_namespace_or_under_an_allowed_directory() {
        let base = std::env::temp_dir().join(format!("mesh-files-{}", std::process::id()));
        let allowed = base.join("allowed");
        std::fs::create_dir_all(&allowed).expect("dir");
        std::fs::write(allowed.join("ca.crt"), "x").expect("file");
        std::fs::write(base.join("node.key"), "x").expect("file");
        std::os::unix::fs::symlink(base.join("node.key"), allowed.join("link.key")).expect("link");
        let dirs = [allowed.canonicalize().expect("canonical")];
        let p = |rel: &str| base.join(rel).to_str().expect("utf-8").to_owned();
        assert!(file_allowed("tenant", &p("allowed/ca.crt"), &dirs).is_ok());
        for escape in ["node.key", "allowed/../node.key", "allowed/link.key"] {
            let e = file_allowed("tenant", &p(escape), &dirs).expect_err(escape);
            assert!(e.contains("istio-system") && e.contains("tenant"), "{e}");
        }
        assert!(file_allowed("tenant", &p("allowed/ca.crt"), &[]).is_err(), "no directory allowed");
        assert!(read_file(crate::state::ROOT_NAMESPACE, &p("node.key")).is_ok());
        assert!(plain_name("bank/partner-client").is_err() && plain_name("partner-client").is_ok());
        let _ = std::fs::remove_dir_all(&base);
    }
}
