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
            format!(
                "{at}.tls.clientCertificate: /nonexistent/c.pem: files on the node are named only by objects in istio-system (this one is in demo)"
            ),
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
            format!(
                "{at}.tls.caCrl: /nonexistent/crl.pem: files on the node are named only by objects in istio-system"
            ),
        ),
        // A tenant's rule naming a node file that exists is told no more.
        (
            "{tls: {mode: MUTUAL, clientCertificate: /etc/hostname, privateKey: /etc/hostname}}",
            format!(
                "{at}.tls.clientCertificate: /etc/hostname: files on the node are named only by objects in istio-system"
            ),
        ),
        // Another namespace's Secret, named in full: never read.
        (
            "{tls: {mode: MUTUAL, credentialName: bank/partner-client}}",
            format!("{at}.tls.credentialName: \"bank/partner-client\": give the Secret's name alone"),
        ),
        (
            "{tls: {mode: SIMPLE, credentialName: nowhere}}",
            format!("{at}.tls.credentialName: Secret demo/nowhere does not exist, nor does any Secret nowhere"),
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
    let tls = dr.policy.tls.as_ref().expect("TLS originated").for_client(Some("demo")).expect("demo's");
    assert_eq!(tls.client_cert.as_ref().map(|c| c.source.as_str()), Some("Secret demo/full"));
    assert_eq!(
        (tls.check.subject_alt_names.as_slice(), tls.check.roots.len()),
        (&["secure.example".to_owned()][..], 1)
    );
    let port = dr.policy_on(Some(dr.subset("b").expect("subset b")), 81);
    let client_cert = |p: &crate::state::traffic::Policy| {
        p.tls.as_ref().and_then(|t| t.for_client(Some("demo")).ok()).map(|t| t.client_cert.is_some())
    };
    assert!(port.1 && client_cert(port.0) == Some(false), "{port:?}");
    let other = dr.policy_on(Some(dr.subset("b").expect("subset b")), 80);
    assert!(!other.1 && client_cert(other.0) == Some(true), "{other:?}");
}

/// `credentialName` is read in each client's namespace: a client presents
/// its own namespace's certificate, and a namespace without the Secret has
/// none to present (its requests fail), never the rule's namespace's.
#[test]
fn a_client_presents_only_its_own_namespaces_credentials() {
    let (ca, cert, key) = pems();
    let other = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: full, namespace: partner-ns}}\n\
         stringData:\n  tls.crt: |\n{}  tls.key: |\n{}  ca.crt: |\n{}\
         ---\napiVersion: v1\nkind: Secret\nmetadata: {{name: full, namespace: broken}}\nstringData:\n  ca.crt: |\n{}",
        block(&cert),
        block(&key),
        block(&ca),
        block(&ca)
    );
    let yaml = format!("{}{other}", rule("{tls: {mode: MUTUAL, credentialName: full}}", ""));
    let loaded = load(&yaml).expect("valid");
    let tls = loaded.state.destination_rules[0].policy.tls.clone().expect("TLS originated");
    let source = |ns: Option<&str>| match tls.for_client(ns) {
        Ok(t) => t.client_cert.as_ref().map_or("none".to_owned(), |c| c.source.clone()),
        Err(e) => format!("refused: {e}"),
    };
    assert_eq!(source(Some("demo")), "Secret demo/full");
    assert_eq!(source(Some("partner-ns")), "Secret partner-ns/full");
    let refused = [
        (Some("attacker"), "no Secret attacker/full"),
        (Some("broken"), "Secret broken/full: MUTUAL needs tls.crt and tls.key"),
        (None, "a client with no namespace has no Secret"),
    ];
    for (ns, want) in refused {
        let got = source(ns);
        assert!(got.starts_with("refused: ") && got.contains(want), "{ns:?}: {got}");
    }
}
