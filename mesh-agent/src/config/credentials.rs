//! Certificates, keys, CAs and CRLs that TLS settings name: keys of a
//! Kubernetes Secret (`credentialName`) or files on the agent's host, read
//! and checked when the configuration loads.
use super::gateway::{SecretObject, Secrets};
use crate::state::{PeerCheck, traffic::ClientCert};

/// A Secret by `namespace/name` (a bare name is in `namespace`), with its key.
pub(super) fn secret<'a>(
    secrets: &'a Secrets,
    namespace: &str,
    name: &str,
) -> Result<(String, &'a SecretObject), String> {
    let key = if name.contains('/') { name.to_owned() } else { format!("{namespace}/{name}") };
    match secrets.get(&key) {
        Some(s) => Ok((key, s)),
        None => Err(format!("Secret {key} does not exist")),
    }
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

pub(super) fn read_file(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{path}: {e}"))
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
