//! A Gateway's HTTPS server's TLS fields: protocol versions and cipher
//! suites, checked with Istio's rules and the edge's floor (TLS 1.2, ECDHE
//! with AEAD).
use super::*;

/// A Secret with a certificate for hello.example.com, and a Gateway whose
/// HTTPS server's `tls` has `fields` beside its credential.
fn gateway(fields: &str) -> String {
    gateway_with(fields, "", "")
}

/// A self-signed CA certificate, as PEM.
fn ca_pem() -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.self_signed(&key).expect("CA").pem()
}

fn indent(pem: &str) -> String {
    pem.lines().map(|l| format!("    {l}\n")).collect()
}

/// [`gateway`] with more keys in its Secret (`secret`, indented as its
/// `stringData`) and more documents (`docs`, each starting with `---`).
fn gateway_with(fields: &str, secret: &str, docs: &str) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["hello.example.com".into()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: hello-cert, namespace: istio-system}}\ntype: kubernetes.io/tls\n\
         stringData:\n  tls.crt: |\n{}  tls.key: |\n{}{secret}{docs}\
         ---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: in, namespace: istio-system}}\n\
         spec:\n  selector: {{istio: ingressgateway}}\n  servers:\n\
         \x20 - port: {{number: 443, name: https, protocol: HTTPS}}\n    hosts: [hello.example.com]\n\
         \x20   tls: {{credentialName: hello-cert{fields}}}\n",
        indent(&cert.pem()),
        indent(&key.serialize_pem())
    )
}

#[test]
fn protocol_versions_and_cipher_suites_are_checked() {
    let at = "cluster.yaml (document 2): Gateway istio-system/in: spec.servers[0].tls";
    let cases = [
        (", minProtocolVersion: TLSV1_1", format!("{at}.minProtocolVersion: TLSV1_1: not offered")),
        (
            ", maxProtocolVersion: TLSV2",
            format!("{at}.maxProtocolVersion: \"TLSV2\": expected TLS_AUTO, TLSV1_2 or TLSV1_3"),
        ),
        (
            ", minProtocolVersion: TLSV1_3, maxProtocolVersion: TLSV1_2",
            format!("{at}.minProtocolVersion: above maxProtocolVersion"),
        ),
        (
            ", cipherSuites: [ECDHE-RSA-AES128-SHA]",
            format!("{at}.cipherSuites[0]: \"ECDHE-RSA-AES128-SHA\" is not offered"),
        ),
        (", cipherSuites: [AES256-GCM-SHA384]", format!("{at}.cipherSuites[0]: \"AES256-GCM-SHA384\" is not offered")),
        (
            ", minProtocolVersion: TLSV1_3, cipherSuites: [ECDHE-ECDSA-AES128-GCM-SHA256]",
            format!("{at}.cipherSuites: only apply to TLS 1.2"),
        ),
        (", httpsRedirect: true", format!("{at}.httpsRedirect: only for an HTTP server")),
    ];
    for (fields, want) in cases {
        let got = error_of(&gateway(fields));
        assert!(got.starts_with(&want), "for: {fields}\nwant: {want}\ngot:  {got}");
    }
    let loaded = load(&gateway(
        ", minProtocolVersion: TLSV1_2, maxProtocolVersion: TLS_AUTO, cipherSuites: [ECDHE-ECDSA-AES256-GCM-SHA384]",
    ))
    .expect("valid");
    let Some(crate::state::ServerTls::Simple(cert)) = &loaded.state.gateways[0].servers[0].tls else {
        panic!("an HTTPS server with a certificate")
    };
    let settings = &cert.settings;
    assert_eq!((settings.min, settings.max), (crate::state::TlsVersion::V1_2, crate::state::TlsVersion::V1_3));
    assert_eq!(settings.cipher_suites, ["ECDHE-ECDSA-AES256-GCM-SHA384"]);
}

#[test]
fn https_redirect_belongs_to_http_servers_alone() {
    let gw = |server: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: in, namespace: istio-system}}\n\
             spec: {{selector: {{istio: ingressgateway}}, servers: [{server}]}}\n"
        )
    };
    let at = "cluster.yaml (document 1): Gateway istio-system/in: spec.servers[0].tls";
    let http = "{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*'], tls: {httpsRedirect: true}}";
    let loaded = load(&gw(http)).expect("valid");
    assert!(loaded.state.gateways[0].servers[0].https_redirect);
    let with_more =
        "{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*'], tls: {httpsRedirect: true, mode: SIMPLE}}";
    assert!(error_of(&gw(with_more)).starts_with(&format!("{at}: only HTTPS and TLS servers take tls settings")));
    let tcp = "{port: {number: 81, name: tcp, protocol: TCP}, hosts: ['*'], tls: {httpsRedirect: true}}";
    assert!(error_of(&gw(tcp)).starts_with(&format!("{at}: only HTTPS and TLS servers")));
}

#[test]
fn mutual_needs_a_ca_and_checks_names_and_crls() {
    let at = |doc: usize| format!("cluster.yaml (document {doc}): Gateway istio-system/in: spec.servers[0].tls");
    let ca = format!("  ca.crt: |\n{}", indent(&ca_pem()));
    let cacert_secret = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: hello-cert-cacert, namespace: istio-system}}\n\
         stringData:\n{ca}"
    );
    let crl_junk = format!("{ca}  ca.crl: |\n    junk\n");
    let cases = [
        (
            ", mode: MUTUAL".to_owned(),
            "",
            "".to_owned(),
            format!(
                "{}.credentialName: MUTUAL needs a CA for client certificates: ca.crt in Secret istio-system/hello-cert, or a Secret istio-system/hello-cert-cacert",
                at(2)
            ),
        ),
        (
            ", subjectAltNames: [a.example]".into(),
            "",
            "".into(),
            format!("{}.subjectAltNames: checks client certificates: only with mode MUTUAL or OPTIONAL_MUTUAL", at(2)),
        ),
        (
            ", mode: MUTUAL, caCrl: /nonexistent/crl.pem".into(),
            "",
            cacert_secret.clone(),
            format!("{}.caCrl: /nonexistent/crl.pem: No such file", at(3)),
        ),
        (
            ", mode: MUTUAL, subjectAltNames: ['']".into(),
            "",
            cacert_secret.clone(),
            format!("{}.credentialName: subjectAltNames: an empty name", at(3)),
        ),
        (
            ", mode: ISTIO_MUTUAL".into(),
            "",
            "".into(),
            format!("{}.mode: ISTIO_MUTUAL is for traffic between meshed proxies", at(2)),
        ),
        (
            ", mode: MUTUAL".into(),
            &crl_junk,
            "".into(),
            format!("{}.credentialName: CRL: holds no PEM X509 CRL", at(2)),
        ),
        (
            ", mode: MUTUAL".into(),
            "  ca.crt: |\n    junk\n",
            "".into(),
            format!("{}.credentialName: Secret istio-system/hello-cert: ", at(2)),
        ),
    ];
    for (fields, secret, docs, want) in cases {
        let got = error_of(&gateway_with(&fields, secret, &docs));
        assert!(got.starts_with(&want), "for: {fields} {secret}\nwant: {want}\ngot:  {got}");
    }
    // The CA in the server's Secret, or in `<credentialName>-cacert`.
    for (fields, secret, docs, optional) in [
        (", mode: MUTUAL, subjectAltNames: [client.example]", ca.as_str(), "", false),
        (", mode: OPTIONAL_MUTUAL", "", cacert_secret.as_str(), true),
    ] {
        let loaded = load(&gateway_with(fields, secret, docs)).expect("valid");
        let Some(crate::state::ServerTls::Simple(cert)) = &loaded.state.gateways[0].servers[0].tls else {
            panic!("an HTTPS server with a certificate")
        };
        let client = cert.client.as_ref().expect("client certificates checked");
        assert_eq!((client.optional, client.check.roots.len()), (optional, 1), "{fields}");
    }
}
