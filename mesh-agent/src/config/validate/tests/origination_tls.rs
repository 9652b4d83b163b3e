//! A DestinationRule's `tls` (TLS originated to a service outside the
//! mesh): where the client certificate and the CA come from, per subset and
//! port, and Istio's rules between the fields.
use super::*;

/// PEM of a self-signed CA, and of a certificate with its key.
fn pems() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = p.self_signed(&ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert =
        rcgen::CertificateParams::new(vec!["client.example".into()]).expect("params").self_signed(&key).expect("cert");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn block(pem: &str) -> String {
    pem.lines().map(|l| format!("    {l}\n")).collect()
}

/// A ServiceEntry `secure.example`, Secrets `full` (client certificate, key
/// and CA) and `ca-only`, and a DestinationRule with `policy` as its
/// `trafficPolicy` (and `subsets`).
fn rule(policy: &str, subsets: &str) -> String {
    let (ca, cert, key) = pems();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: full, namespace: demo}}\n\
         stringData:\n  tls.crt: |\n{}  tls.key: |\n{}  ca.crt: |\n{}\
         ---\napiVersion: v1\nkind: Secret\nmetadata: {{name: ca-only, namespace: demo}}\nstringData:\n  ca.crt: |\n{}\
         ---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: secure, namespace: demo}}\n\
         spec: {{hosts: [secure.example], ports: [{{number: 80, name: http, protocol: HTTP}}, {{number: 81, name: http-2, protocol: HTTP}}], resolution: DNS}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: secure, namespace: demo}}\n\
         spec:\n  host: secure.example\n  trafficPolicy: {policy}\n{subsets}",
        block(&cert),
        block(&key),
        block(&ca),
        block(&ca)
    )
}

#[test]
fn mutual_origination_needs_a_client_certificate_and_checks_its_fields() {
    let at = "cluster.yaml (document 4): DestinationRule demo/secure: spec.trafficPolicy";
    let cases = [
        (
            "{tls: {mode: MUTUAL, credentialName: ca-only}}",
            format!("{at}.tls.credentialName: Secret demo/ca-only: MUTUAL needs tls.crt and tls.key (or cert and key)"),
        ),
        (
            "{tls: {mode: MUTUAL}}",
            format!("{at}.tls.clientCertificate: MUTUAL needs credentialName, or clientCertificate and privateKey"),
        ),
        (
            "{tls: {mode: MUTUAL, clientCertificate: /nonexistent/c.pem}}",
            format!("{at}.tls.privateKey: required with clientCertificate"),
        ),
        (
            "{tls: {mode: MUTUAL, clientCertificate: /nonexistent/c.pem, privateKey: /nonexistent/k.pem}}",
            format!("{at}.tls.clientCertificate: /nonexistent/c.pem: No such file"),
        ),
        (
            "{tls: {mode: SIMPLE, credentialName: ca-only, clientCertificate: /c.pem}}",
            format!("{at}.tls.clientCertificate: a client certificate is only presented with mode MUTUAL"),
        ),
        (
            "{tls: {mode: MUTUAL, credentialName: full, caCertificates: /ca.pem}}",
            format!(
                "{at}.tls.credentialName: give credentialName or clientCertificate/privateKey/caCertificates, not both"
            ),
        ),
        (
            "{tls: {mode: SIMPLE, insecureSkipVerify: true, subjectAltNames: [a.example]}}",
            format!("{at}.tls.subjectAltNames: insecureSkipVerify checks no certificate"),
        ),
        (
            "{tls: {mode: DISABLE, credentialName: full}}",
            format!("{at}.tls.credentialName: only with mode SIMPLE or MUTUAL, not DISABLE"),
        ),
        (
            "{tls: {mode: MUTUAL, credentialName: full, caCrl: /nonexistent/crl.pem}}",
            format!("{at}.tls.caCrl: /nonexistent/crl.pem: No such file"),
        ),
        (
            "{tls: {mode: PERMISSIVE}}",
            format!("{at}.tls.mode: \"PERMISSIVE\": expected DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL"),
        ),
        ("{portLevelSettings: [{tls: {mode: SIMPLE}}]}", format!("{at}.portLevelSettings[0].port: required")),
        (
            "{portLevelSettings: [{port: {number: 80}}, {port: {number: 80}}]}",
            format!("{at}.portLevelSettings[1].port.number: port 80 has settings already"),
        ),
        (
            "{portLevelSettings: [{port: {number: 80}, tls: {mode: MUTUAL}}]}",
            format!("{at}.portLevelSettings[0].tls.clientCertificate: MUTUAL needs"),
        ),
    ];
    for (policy, want) in cases {
        let got = error_of(&rule(policy, ""));
        assert!(got.starts_with(&want), "for: {policy}\nwant: {want}\ngot:  {got}");
    }
    // One error per setting, even when subsets and ports inherit it.
    let subsets = "  subsets:\n  - {name: a, labels: {v: a}}\n  - {name: b, labels: {v: b}}\n";
    let got = error_of(&rule("{tls: {mode: MUTUAL}, portLevelSettings: [{port: {number: 81}}]}", subsets));
    assert_eq!(got.lines().count(), 1, "{got}");

    // A client certificate from the Secret, names to check; a port with its own.
    let policy = "{tls: {mode: MUTUAL, credentialName: full, subjectAltNames: [secure.example], sni: secure.example}, \
                  portLevelSettings: [{port: {number: 81}, tls: {mode: SIMPLE, credentialName: ca-only}}]}";
    let loaded = load(&rule(policy, subsets)).expect("valid");
    let dr = &loaded.state.destination_rules[0];
    let tls = dr.policy.tls.as_ref().expect("TLS originated");
    assert_eq!(tls.client_cert.as_ref().map(|c| c.source.as_str()), Some("Secret demo/full"));
    assert_eq!(
        (tls.check.subject_alt_names.as_slice(), tls.check.roots.len()),
        (&["secure.example".to_owned()][..], 1)
    );
    let port = dr.policy_on(Some(dr.subset("b").expect("subset b")), 81);
    assert!(port.1 && port.0.tls.as_ref().is_some_and(|t| t.client_cert.is_none()), "{port:?}");
    let other = dr.policy_on(Some(dr.subset("b").expect("subset b")), 80);
    assert!(!other.1 && other.0.tls.as_ref().is_some_and(|t| t.client_cert.is_some()), "{other:?}");
}
