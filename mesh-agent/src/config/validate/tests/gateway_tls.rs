//! A Gateway's HTTPS server's TLS fields: protocol versions and cipher
//! suites, checked with Istio's rules and the edge's floor (TLS 1.2, ECDHE
//! with AEAD).
use super::*;

/// A Secret with a certificate for hello.example.com, and a Gateway whose
/// HTTPS server's `tls` has `fields` beside its credential.
fn gateway(fields: &str) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["hello.example.com".into()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let indent = |pem: String| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: hello-cert, namespace: istio-system}}\ntype: kubernetes.io/tls\n\
         stringData:\n  tls.crt: |\n{}  tls.key: |\n{}\
         ---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: in, namespace: istio-system}}\n\
         spec:\n  selector: {{istio: ingressgateway}}\n  servers:\n\
         \x20 - port: {{number: 443, name: https, protocol: HTTPS}}\n    hosts: [hello.example.com]\n\
         \x20   tls: {{mode: SIMPLE, credentialName: hello-cert{fields}}}\n",
        indent(cert.pem()),
        indent(key.serialize_pem())
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
