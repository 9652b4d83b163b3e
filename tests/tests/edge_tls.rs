//! Mutual TLS at the mesh's edges (root, two nodes, the CA service): an
//! ingress Gateway server that asks clients outside the mesh for a
//! certificate (`tls.mode: MUTUAL`), and TLS originated with a client
//! certificate to an outside server that speaks TLS 1.2 only and requires
//! one (DestinationRule `tls.mode: MUTUAL`) — curl as the client, openssl
//! s_server as the outside server.
#![expect(clippy::unwrap_used, reason = "tests")]

use mesh_tests::{certs::Certs, edge::*, require_root};

/// The ingress Gateway's HTTPS server asks for client certificates of the
/// test CA (in `hello-cert-cacert`, as Istio names it) naming client.example.
fn mutual_gateway(e: &Edge) -> String {
    let extra = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: hello-cert-cacert, namespace: istio-system}}\nstringData:\n{}",
        e.ca_secret
    );
    config(&e.base, &e.secret, &e.ca_secret, &extra).replacen(
        "tls: {mode: SIMPLE, credentialName: hello-cert}",
        "tls: {mode: MUTUAL, credentialName: hello-cert, subjectAltNames: [client.example]}",
        1,
    )
}

#[test]
fn mutual_gateways_check_client_certificates() {
    if !require_root("mutual_gateways_check_client_certificates") {
        return;
    }
    let e = Edge::start();
    e.set_config(&mutual_gateway(&e));
    let other_ca = Certs::new(&format!("{}-other", e.c.id));
    let good = e.certs.client("client", "client.example");
    let unnamed = e.certs.client("unnamed", "intruder.example");
    let foreign = other_ca.client("foreign", "client.example");
    let ca = e.certs.ca();
    let get = |cert: Option<&(std::path::PathBuf, std::path::PathBuf)>, more: &[&str]| {
        let resolve = format!("hello.example.com:443:{INGRESS}");
        let mut args = vec!["--cacert", ca.to_str().unwrap(), "--resolve", &resolve];
        if let Some((crt, key)) = cert {
            args.extend(["--cert", crt.to_str().unwrap(), "--key", key.to_str().unwrap()]);
        }
        args.extend_from_slice(more);
        args.push("https://hello.example.com/helloworld");
        curl(|a| e.c.net_cmd(a), &args)
    };
    let (code, body) = get(Some(&good), &[]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("hello from helloworld"), "{body}");
    let (code, body) = get(Some(&good), &["--tls-max", "1.2"]);
    assert_eq!(code, 200, "TLS 1.2 with a client certificate: {body}");
    for (what, cert) in
        [("no certificate", None), ("another CA", Some(&foreign)), ("a name not listed", Some(&unnamed))]
    {
        for more in [&[][..], &["--tls-max", "1.2"]] {
            let (code, body) = get(cert, more);
            assert_eq!(code, 0, "{what} {more:?} was served: {body}");
        }
    }
    // OPTIONAL_MUTUAL: no certificate is served, a bad one is not.
    e.set_config(&mutual_gateway(&e).replacen("mode: MUTUAL", "mode: OPTIONAL_MUTUAL", 1));
    assert_eq!(get(None, &[]).0, 200);
    assert_eq!(get(Some(&foreign), &[]).0, 0);
    // Back to SIMPLE: any client.
    e.set_extra("");
    assert_eq!(get(None, &[]).0, 200);
}

#[test]
fn mutual_origination_presents_a_client_certificate_to_a_tls_1_2_server() {
    if !require_root("mutual_origination_presents_a_client_certificate_to_a_tls_1_2_server") {
        return;
    }
    let e = Edge::start();
    // Outside: TLS 1.2 only, a client certificate of the test CA required.
    let _server = mutual_server(&e);
    let ca = e.certs.ca();
    let client = e.certs.client("mesh-client", "mesh-client.example");
    let test = |args: &[&str]| e.pod("test").cmd(args);
    let call = || {
        let resolve = format!("mutual.example:80:{EXTERNAL_IP}");
        curl(test, &["--resolve", &resolve, "http://mutual.example/"])
    };
    // The server's certificate names secure.example: checked by subjectAltNames.
    let mutual = "{mode: MUTUAL, credentialName: client-cert, subjectAltNames: [secure.example]}";
    e.set_extra(&origination(&e, &client, mutual));
    let mut served = (0, String::new());
    for _ in 0..50 {
        served = call();
        if served.0 == 200 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (code, body) = served;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("s_server") && body.contains("TLSv1.2"), "{body}");
    // Without a client certificate the server refuses the handshake.
    e.set_extra(&origination(&e, &client, "{mode: SIMPLE, credentialName: client-cert, sni: secure.example}"));
    let (code, body) = call();
    assert!(code >= 500, "SIMPLE got {code}: {body}");
    // A server without the listed name is refused by the agent.
    let wrong = "{mode: MUTUAL, credentialName: client-cert, subjectAltNames: [other.example]}";
    e.set_extra(&origination(&e, &client, wrong));
    let (code, body) = call();
    assert!(code >= 500, "a server without the listed name got {code}: {body}");
    // The server name sent is checked when no names are listed.
    e.set_extra(&origination(&e, &client, "{mode: MUTUAL, credentialName: client-cert}"));
    let (code, body) = call();
    assert!(code >= 500, "mutual.example is not the server's name, got {code}: {body}");
    e.set_extra(&origination(&e, &client, "{mode: MUTUAL, credentialName: client-cert, sni: secure.example}"));
    assert_eq!(call().0, 200);
    // The client certificate, its key and the CA from files instead.
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let files = format!(
        "{{mode: MUTUAL, clientCertificate: {}, privateKey: {}, caCertificates: {}, sni: secure.example}}",
        path(&client.0),
        path(&client.1),
        path(&ca)
    );
    // Files are the node's: only a rule in the root namespace may name them.
    e.set_extra(&origination(&e, &client, &files).replace(
        "name: mutual, namespace: demo}\nspec:\n  host: ",
        "name: mutual, namespace: istio-system}\nspec:\n  host: ",
    ));
    let (code, body) = call();
    assert_eq!(code, 200, "{body}");
}
