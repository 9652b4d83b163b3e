//! `networking.istio.io/v1` `Gateway` and the Kubernetes `Secret`s its TLS
//! servers name, validated into [`crate::state::Gateway`]. A Gateway's
//! `selector` is matched against gateway pods' labels: each such pod's node
//! agent serves it on the pod's address, as the pod (its identity).
use std::collections::BTreeMap;

use serde::Deserialize;

use super::{
    k8s::ObjectMeta,
    object::{Ctx, Secrets, name_and_namespace},
};
use crate::state::{
    ClientAuth, Gateway, GatewayProtocol, GatewayServer, PeerCheck, ServerCert, ServerHost, ServerTls, TlsSettings,
    TlsVersion,
};

type Unsupported = Option<serde_yaml_ng::Value>;
const NOT_YET: &str = "not supported by this version of mesh-agent";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayObject {
    #[allow(dead_code)]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewaySpec,
    #[allow(dead_code)]
    pub status: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySpec {
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub servers: Vec<ServerSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServerSpec {
    pub port: Option<PortSpec>,
    #[serde(default)]
    pub hosts: Vec<String>,
    pub tls: Option<ServerTlsSpec>,
    pub name: Option<String>,
    pub bind: Unsupported,
    pub default_endpoint: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSpec {
    pub number: i64,
    #[serde(default)]
    pub protocol: String,
    pub name: Option<String>,
    pub target_port: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServerTlsSpec {
    pub mode: Option<String>,
    pub credential_name: Option<String>,
    pub https_redirect: Option<bool>,
    pub server_certificate: Unsupported,
    pub private_key: Unsupported,
    pub ca_certificates: Unsupported,
    pub credential_names: Unsupported,
    pub subject_alt_names: Option<Vec<String>>,
    pub verify_certificate_spki: Unsupported,
    pub verify_certificate_hash: Unsupported,
    pub min_protocol_version: Option<String>,
    pub max_protocol_version: Option<String>,
    pub cipher_suites: Option<Vec<String>>,
    pub ca_crl: Option<String>,
    pub tls_certificates: Unsupported,
}

pub(super) fn build_gateway(ctx: &mut Ctx<'_>, obj: &GatewayObject, secrets: &Secrets) -> Option<Gateway> {
    let (name, namespace) = name_and_namespace(ctx, &obj.metadata)?;
    let before = ctx.error_count();
    if obj.spec.servers.is_empty() {
        ctx.error("spec.servers", "at least one server is required");
    }
    let mut servers: Vec<GatewayServer> = Vec::new();
    for (i, s) in obj.spec.servers.iter().enumerate() {
        let base = format!("spec.servers[{i}]");
        if let Some(server) = build_server(ctx, &base, s, &namespace, secrets) {
            if servers.iter().any(|o| o.port == server.port && o.protocol != server.protocol) {
                ctx.error(format!("{base}.port.number"), format!("port {} is used with another protocol", server.port));
            }
            servers.push(server);
        }
    }
    if ctx.error_count() != before {
        return None;
    }
    let (selector, created) = (obj.spec.selector.clone(), obj.metadata.creation_timestamp.clone());
    Some(Gateway { name, namespace, created, selector, servers, own_namespace: false })
}

fn build_server(
    ctx: &mut Ctx<'_>,
    base: &str,
    s: &ServerSpec,
    namespace: &str,
    secrets: &Secrets,
) -> Option<GatewayServer> {
    for (field, v) in [("bind", &s.bind), ("defaultEndpoint", &s.default_endpoint)] {
        if v.is_some() {
            ctx.error(format!("{base}.{field}"), NOT_YET);
        }
    }
    let Some(port) = &s.port else {
        ctx.error(format!("{base}.port"), "required");
        return None;
    };
    if port.target_port.is_some() {
        ctx.error(format!("{base}.port.targetPort"), NOT_YET);
    }
    let number = match u16::try_from(port.number) {
        Ok(p) if p != 0 => p,
        _ => {
            ctx.error(format!("{base}.port.number"), format!("port {} is out of range 1-65535", port.number));
            return None;
        }
    };
    let protocol = match port.protocol.to_ascii_uppercase().as_str() {
        "HTTP" => GatewayProtocol::Http,
        "HTTP2" | "GRPC" => GatewayProtocol::Http2,
        "HTTPS" => GatewayProtocol::Https,
        "TCP" => GatewayProtocol::Tcp,
        "TLS" => GatewayProtocol::Tls,
        other => {
            ctx.error(
                format!("{base}.port.protocol"),
                format!("{other:?}: expected HTTP, HTTPS, HTTP2, GRPC, TCP or TLS"),
            );
            return None;
        }
    };
    if s.hosts.is_empty() {
        ctx.error(format!("{base}.hosts"), "at least one host is required (\"*\" for any)");
    }
    // `namespace/host` limits which VirtualServices may bind the host: `*/`
    // (or none) any namespace, `./` the Gateway's own.
    let mut hosts = Vec::new();
    for (i, h) in s.hosts.iter().enumerate() {
        let (ns, host) = h.split_once('/').unwrap_or(("*", h));
        let allowed: Option<std::sync::Arc<str>> = match ns {
            "*" => None,
            "." => Some(namespace.into()),
            "" => {
                ctx.error(format!("{base}.hosts[{i}]"), format!("{h:?}: empty namespace before '/'"));
                continue;
            }
            ns => Some(ns.into()),
        };
        if host.is_empty() || host.contains('/') {
            ctx.error(format!("{base}.hosts[{i}]"), format!("{h:?}: expected [namespace/]host"));
            continue;
        }
        hosts.push(ServerHost { namespace: allowed, host: host.to_owned() });
    }
    let tls = match (&s.tls, protocol) {
        (None, GatewayProtocol::Https | GatewayProtocol::Tls) => {
            ctx.error(format!("{base}.tls"), format!("required for a {} server", port.protocol.to_uppercase()));
            return None;
        }
        (None, _) => None,
        // An HTTP server takes `httpsRedirect` alone.
        (Some(t), GatewayProtocol::Http) if is_redirect_only(t) => None,
        (Some(_), GatewayProtocol::Http | GatewayProtocol::Http2 | GatewayProtocol::Tcp) => {
            ctx.error(
                format!("{base}.tls"),
                "only HTTPS and TLS servers take tls settings (an HTTP server: httpsRedirect alone)",
            );
            return None;
        }
        (Some(t), _) => Some(server_tls(ctx, &format!("{base}.tls"), t, protocol, namespace, secrets)?),
    };
    let https_redirect = s.tls.as_ref().and_then(|t| t.https_redirect).unwrap_or(false);
    if https_redirect && protocol != GatewayProtocol::Http {
        ctx.error(format!("{base}.tls.httpsRedirect"), "only for an HTTP server (it sends its clients to HTTPS)");
        return None;
    }
    let name = port.name.clone().or(s.name.clone());
    Some(GatewayServer { port: number, name, protocol, hosts, tls, https_redirect })
}

fn server_tls(
    ctx: &mut Ctx<'_>,
    base: &str,
    t: &ServerTlsSpec,
    protocol: GatewayProtocol,
    namespace: &str,
    secrets: &Secrets,
) -> Option<ServerTls> {
    let unsupported = [
        ("serverCertificate", &t.server_certificate),
        ("privateKey", &t.private_key),
        ("caCertificates", &t.ca_certificates),
        ("credentialNames", &t.credential_names),
        ("verifyCertificateSpki", &t.verify_certificate_spki),
        ("verifyCertificateHash", &t.verify_certificate_hash),
        ("tlsCertificates", &t.tls_certificates),
    ];
    let mut ok = true;
    for (field, v) in unsupported {
        if v.is_some() {
            ctx.error(format!("{base}.{field}"), NOT_YET);
            ok = false;
        }
    }
    let mode = t.mode.as_deref().unwrap_or("SIMPLE");
    let client_fields = [("subjectAltNames", t.subject_alt_names.is_some()), ("caCrl", t.ca_crl.is_some())];
    if !matches!(mode, "MUTUAL" | "OPTIONAL_MUTUAL")
        && let Some((name, _)) = client_fields.iter().find(|(_, set)| *set)
    {
        ctx.error(format!("{base}.{name}"), "checks client certificates: only with mode MUTUAL or OPTIONAL_MUTUAL");
        return None;
    }
    let tls = match mode {
        "PASSTHROUGH" if protocol == GatewayProtocol::Tls => {
            let set = [t.min_protocol_version.is_some(), t.max_protocol_version.is_some(), t.cipher_suites.is_some()];
            if set.into_iter().any(|s| s) {
                ctx.error(base, "PASSTHROUGH does not terminate TLS: protocol versions and cipher suites do not apply");
                return None;
            }
            ServerTls::Passthrough
        }
        "PASSTHROUGH" => {
            ctx.error(format!("{base}.mode"), "PASSTHROUGH needs port protocol TLS");
            return None;
        }
        "SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL" => {
            let Some(name) = t.credential_name.as_deref() else {
                ctx.error(format!("{base}.credentialName"), format!("required for mode {mode}"));
                return None;
            };
            let mut cert = server_cert(ctx, &format!("{base}.credentialName"), name, namespace, secrets)?;
            cert.settings = tls_settings(ctx, base, t)?;
            if mode != "SIMPLE" {
                match client_auth(t, name, namespace, secrets) {
                    Ok(check) => cert.client = Some(ClientAuth { check, optional: mode == "OPTIONAL_MUTUAL" }),
                    Err((field, e)) => {
                        ctx.error(format!("{base}.{field}"), e);
                        return None;
                    }
                }
            }
            ServerTls::Simple(cert)
        }
        "ISTIO_MUTUAL" | "AUTO_PASSTHROUGH" => {
            ctx.error(
                format!("{base}.mode"),
                format!(
                    "{mode} is for traffic between meshed proxies, which reaches a pod over HBONE here, not through a Gateway server; use MUTUAL with a CA for clients outside the mesh"
                ),
            );
            return None;
        }
        other => {
            ctx.error(
                format!("{base}.mode"),
                format!("{other:?}: expected SIMPLE, MUTUAL, OPTIONAL_MUTUAL or PASSTHROUGH"),
            );
            return None;
        }
    };
    ok.then_some(tls)
}

/// The client certificates a `MUTUAL` server accepts, as Istio finds its CA:
/// `ca.crt` (or `cacert`) in the server's Secret, else in a Secret named
/// `<credentialName>-cacert`; a CRL from `ca.crl` in that Secret and from
/// the file `caCrl`; the names `subjectAltNames`.
fn client_auth(
    t: &ServerTlsSpec,
    name: &str,
    namespace: &str,
    secrets: &Secrets,
) -> Result<PeerCheck, (&'static str, String)> {
    use super::credentials::{first_value, peer_check, read_file, secret};
    let fail = |e: String| ("credentialName", e);
    let mut found = None;
    for candidate in [name.to_owned(), format!("{name}-cacert")] {
        let Ok((key, s)) = secret(secrets, namespace, &candidate) else { continue };
        let values = |keys: &[&str]| first_value(s, keys).map_err(|e| fail(format!("Secret {key}: {e}")));
        if let Some(ca) = values(&["ca.crt", "cacert"])? {
            found = Some((key.clone(), ca, values(&["ca.crl"])?));
            break;
        }
    }
    let Some((key, ca, crl)) = found else {
        return Err(fail(format!(
            "MUTUAL needs a CA for client certificates: ca.crt in Secret {namespace}/{name}, or a Secret {namespace}/{name}-cacert"
        )));
    };
    let mut crls: Vec<Vec<u8>> = crl.into_iter().collect();
    if let Some(path) = &t.ca_crl {
        crls.push(read_file(namespace, path).map_err(|e| ("caCrl", e))?);
    }
    let names = t.subject_alt_names.clone().unwrap_or_default();
    peer_check(format!("Secret {key}"), &ca, &crls, names).map_err(fail)
}

/// A `tls` block with nothing but `httpsRedirect`.
fn is_redirect_only(t: &ServerTlsSpec) -> bool {
    let unsupported = [
        &t.server_certificate,
        &t.private_key,
        &t.ca_certificates,
        &t.credential_names,
        &t.verify_certificate_spki,
        &t.verify_certificate_hash,
        &t.tls_certificates,
    ];
    t.https_redirect.is_some()
        && t.mode.is_none()
        && t.credential_name.is_none()
        && t.min_protocol_version.is_none()
        && t.max_protocol_version.is_none()
        && t.cipher_suites.is_none()
        && t.subject_alt_names.is_none()
        && t.ca_crl.is_none()
        && unsupported.iter().all(|u| u.is_none())
}

/// `minProtocolVersion`, `maxProtocolVersion` and `cipherSuites`, with
/// Istio's rules (the minimum not above the maximum) and the edge's floor:
/// nothing below TLS 1.2, TLS 1.2 suites ECDHE and AEAD only.
fn tls_settings(ctx: &mut Ctx<'_>, base: &str, t: &ServerTlsSpec) -> Option<TlsSettings> {
    let before = ctx.error_count();
    let mut version = |field: &str, v: &Option<String>, default: TlsVersion| match v.as_deref() {
        None | Some("TLS_AUTO") => default,
        Some("TLSV1_2") => TlsVersion::V1_2,
        Some("TLSV1_3") => TlsVersion::V1_3,
        Some(old @ ("TLSV1_0" | "TLSV1_1")) => {
            ctx.error(
                format!("{base}.{field}"),
                format!("{old}: not offered; the mesh's edge speaks TLS 1.2 and 1.3 (Mozilla's intermediate profile)"),
            );
            default
        }
        Some(other) => {
            ctx.error(format!("{base}.{field}"), format!("{other:?}: expected TLS_AUTO, TLSV1_2 or TLSV1_3"));
            default
        }
    };
    let min = version("minProtocolVersion", &t.min_protocol_version, TlsVersion::V1_2);
    let max = version("maxProtocolVersion", &t.max_protocol_version, TlsVersion::V1_3);
    if min > max {
        ctx.error(format!("{base}.minProtocolVersion"), "above maxProtocolVersion");
    }
    let cipher_suites = t.cipher_suites.clone().unwrap_or_default();
    for (i, c) in cipher_suites.iter().enumerate() {
        if let Err(e) = crate::identity::tls::check_cipher_suite(c) {
            ctx.error(format!("{base}.cipherSuites[{i}]"), e);
        }
    }
    if !cipher_suites.is_empty() && min == TlsVersion::V1_3 {
        ctx.error(format!("{base}.cipherSuites"), "only apply to TLS 1.2, which minProtocolVersion TLSV1_3 leaves out");
    }
    (ctx.error_count() == before).then_some(TlsSettings { min, max, cipher_suites })
}

/// The certificate and key of a `kubernetes.io/tls` Secret in the Gateway's
/// namespace, checked to belong together.
pub(super) fn server_cert(
    ctx: &mut Ctx<'_>,
    field: &str,
    name: &str,
    namespace: &str,
    secrets: &Secrets,
) -> Option<ServerCert> {
    if let Err(e) = super::credentials::plain_name(name) {
        ctx.error(field, e);
        return None;
    }
    let key = format!("{namespace}/{name}");
    let Some(secret) = secrets.get(&key) else {
        ctx.error(field, format!("Secret {key} does not exist"));
        return None;
    };
    let mut fail = |msg: String| {
        ctx.error(field, format!("Secret {key}: {msg}"));
        None
    };
    let (cert, pkey) = match (secret.value("tls.crt"), secret.value("tls.key")) {
        (Ok(Some(c)), Ok(Some(k))) => (c, k),
        (Err(e), _) | (_, Err(e)) => return fail(e),
        _ => return fail("needs both tls.crt and tls.key (type kubernetes.io/tls)".into()),
    };
    match crate::identity::tls::certified_key_from_pem(&cert, &pkey) {
        Ok(_) => Some(ServerCert {
            credential: key.clone(),
            settings: TlsSettings::default(),
            client: None,
            cert_pem: cert.into(),
            key_pem: pkey.into(),
        }),
        Err(e) => fail(e),
    }
}
