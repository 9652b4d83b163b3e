//! Tenant isolation at the mesh's edges and in its configuration, tested as
//! attacks (root, the two-node edge cluster, the CA service): gateways,
//! credentials, and which objects apply to whom. Requests at a workload's
//! destination: `tenancy_requests.rs`. Each test first makes the attack a hostile client or a hostile tenant
//! would (a tenant writes objects in its own namespace only), then the
//! positive control — the legitimate client still gets through. Every attack
//! here got through before its fix; docs/limits.md ("Adversarial") lists them.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::path::PathBuf;

use mesh_tests::{certs::Certs, edge::*, require_root};

/// Polls `status` until it is 200, for at most 10 s: what a configuration
/// change makes the CA issue (a new Gateway's or workload's certificate)
/// arrives shortly after the agents load it.
fn until_served(status: impl Fn() -> u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while status() != 200 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Two more HTTPS servers on the ingress gateway's port 443, each in a
/// Gateway of its own: `partners.example`, MUTUAL with the test CA, routed by
/// a VirtualService of namespace `demo` to helloworld; and a tenant's server
/// for `*` in namespace `attacker` (first in Gateway order), with a
/// certificate of another CA.
fn partners(e: &Edge, crt: &std::path::Path, key: &std::path::Path, rogue: &(PathBuf, PathBuf)) -> String {
    format!(
        "---
apiVersion: v1
kind: Secret
metadata: {{name: partners-cert, namespace: istio-system}}
type: kubernetes.io/tls
stringData:
  tls.crt: |
{}  tls.key: |
{}{}---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: partners, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: https-partners, protocol: HTTPS}}
    hosts: [partners.example]
    tls: {{mode: MUTUAL, credentialName: partners-cert}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: partners, namespace: demo}}
spec:
  hosts: [partners.example]
  gateways: [istio-system/partners]
  http:
  - route: [{{destination: {{host: helloworld, port: {{number: 5000}}}}}}]
---
apiVersion: v1
kind: Secret
metadata: {{name: rogue-cert, namespace: attacker}}
type: kubernetes.io/tls
stringData:
  tls.crt: |
{}  tls.key: |
{}---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: tenant, namespace: attacker}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 443, name: https-any, protocol: HTTPS}}
    hosts: ['*']
    tls: {{mode: SIMPLE, credentialName: rogue-cert}}
",
        Certs::yaml_block(crt, 4),
        Certs::yaml_block(key, 4),
        e.ca_secret,
        Certs::yaml_block(&rogue.0, 4),
        Certs::yaml_block(&rogue.1, 4),
    )
}

/// Domain fronting: the TLS handshake names the public SIMPLE server, the
/// request names the MUTUAL one. And certificate theft: a tenant's `*`
/// server, first in Gateway order, must not answer for names that other
/// servers list (the positive controls fail if it does). The request must never reach the MUTUAL
/// server's routes without the certificate that server asks for: 421, over
/// HTTP/1.1 and HTTP/2 (where it is also how a reused connection is told to
/// go elsewhere).
#[test]
fn a_request_is_routed_only_through_the_server_its_sni_chose() {
    if !require_root("a_request_is_routed_only_through_the_server_its_sni_chose") {
        return;
    }
    let e = Edge::start();
    let (crt, key) = e.certs.server("partners", "partners.example");
    // The tenant's certificate names every host, from a CA clients do not trust.
    let rogue_ca = Certs::new(&format!("{}-rogue", e.c.id));
    let rogue = rogue_ca.server("rogue", "hello.example.com");
    e.set_extra(&partners(&e, &crt, &key, &rogue));
    let partner = e.certs.client("partner", "partner.example");
    let ca = e.certs.ca();
    let get = |sni: &str, host: Option<&str>, more: &[&str]| {
        let resolve = format!("{sni}:443:{INGRESS}");
        let mut args = vec!["--cacert", ca.to_str().unwrap(), "--resolve", &resolve];
        let header = host.map(|h| format!("Host: {h}"));
        if let Some(h) = &header {
            args.extend(["-H", h]);
        }
        args.extend_from_slice(more);
        let url = format!("https://{sni}/helloworld");
        args.push(&url);
        curl(|a| e.c.net_cmd(a), &args)
    };
    let (crt, key) = (partner.0.to_str().unwrap(), partner.1.to_str().unwrap());
    let partner_get = |version: &str| get("partners.example", None, &[version, "--cert", crt, "--key", key]);
    // The partners' Gateway gets its identity's certificate from the CA
    // shortly after the configuration names it.
    until_served(|| partner_get("--http1.1").0);
    let before = e.agents[0].metrics();
    let misdirected = |t: &str| mesh_tests::agent::metric(t, "mesh_gateway_misdirected_requests_total", &[]);
    for version in ["--http1.1", "--http2"] {
        // Positive controls: each server's own host, with what it asks for.
        let (code, body) = get("hello.example.com", None, &[version]);
        assert_eq!(code, 200, "{version}: hello.example.com: {body}");
        let (code, body) = partner_get(version);
        assert_eq!(code, 200, "{version}: partners.example with its certificate: {body}");
        assert!(body.contains("hello from helloworld"), "{body}");
        // And the partners' server still asks for the certificate.
        assert_eq!(get("partners.example", None, &[version]).0, 0, "{version}: partners.example without a certificate");
        // The attack: SNI of the public server, Host of the partners' one, no certificate.
        let (code, body) = get("hello.example.com", Some("partners.example"), &[version]);
        assert_eq!(code, 421, "{version}: a fronted request reached partners.example: {body}");
    }
    assert_eq!(misdirected(&e.agents[0].metrics()) - misdirected(&before), 2.0);
}

/// A TLS passthrough server whose host is reserved for namespace `demo`
/// (`demo/passthrough.example`): a VirtualService of another namespace
/// naming the same SNI host cannot take its connections.
#[test]
fn a_passthrough_host_reserved_for_a_namespace_stays_with_it() {
    if !require_root("a_passthrough_host_reserved_for_a_namespace_stays_with_it") {
        return;
    }
    let e = Edge::start();
    // The attacker's rule: passthrough.example to helloworld's echo port,
    // which would answer the ClientHello with itself.
    let hijack = "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hijack, namespace: attacker}
spec:
  hosts: [passthrough.example]
  gateways: [istio-system/ingress]
  tls:
  - match: [{port: 9443, sniHosts: [passthrough.example]}]
    route: [{destination: {host: helloworld.demo.svc.cluster.local, port: {number: 7000}}}]
";
    let cfg = config(&e.base, &e.secret, &e.ca_secret, hijack);
    let reserved = "hosts: [passthrough.example]\n    tls: {mode: PASSTHROUGH}";
    assert!(cfg.contains(reserved));
    e.set_config(&cfg.replacen(reserved, "hosts: [demo/passthrough.example]\n    tls: {mode: PASSTHROUGH}", 1));
    let resolve = format!("passthrough.example:9443:{INGRESS}");
    let ca = e.certs.ca();
    let args = ["--cacert", ca.to_str().unwrap(), "--resolve", &resolve, "https://passthrough.example:9443/"];
    // The attack fails and the legitimate client is served in one request:
    // the connection reaches demo's TLS server, not the attacker's echo.
    let (code, body) = curl(|a| e.c.net_cmd(a), &args);
    assert_eq!(code, 200, "passthrough.example was taken by another namespace: {body}");
    assert!(body.contains("s_server"), "{body}");
}

/// Borrowed client certificates: `demo` originates MUTUAL TLS to
/// mutual.example with its Secret `client-cert`. A pod of namespace
/// `attacker` calling the same host must not leave with demo's certificate,
/// and `attacker` cannot name demo's Secret (`demo/client-cert`) or the
/// node's files in a DestinationRule of its own.
#[test]
fn a_client_never_presents_another_namespaces_certificate() {
    if !require_root("a_client_never_presents_another_namespaces_certificate") {
        return;
    }
    let e = Edge::start();
    let _server = mutual_server(&e);
    let client = e.certs.client("bank-client", "bank.example");
    let demo = origination(&e, &client, "{mode: MUTUAL, credentialName: client-cert, sni: secure.example}");
    e.set_extra(&demo);
    let call = |pod: &str| {
        let resolve = format!("mutual.example:80:{EXTERNAL_IP}");
        curl(|a| e.pod(pod).cmd(a), &["--resolve", &resolve, "http://mutual.example/"])
    };
    // Positive control: demo's own client, with demo's certificate.
    until_served(|| call("test").0);
    let (code, body) = call("test");
    assert_eq!(code, 200, "demo's client: {body}");
    // The attack: another tenant's pod calls the same host.
    let (code, body) = call("intruder");
    assert!(code >= 500, "attacker's pod left with demo's certificate ({code}): {body}");
    // The attacker's own rules naming demo's Secret, or the node's files,
    // are refused; the attacker's pod is still refused, demo's still served.
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let own_rule = |tls: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: borrow, namespace: attacker}}\n\
             spec: {{host: mutual.example, trafficPolicy: {{tls: {tls}}}}}\n"
        )
    };
    let borrowed = [
        own_rule("{mode: MUTUAL, credentialName: demo/client-cert, sni: secure.example}"),
        own_rule(&format!(
            "{{mode: MUTUAL, clientCertificate: {}, privateKey: {}, sni: secure.example}}",
            path(&client.0),
            path(&client.1)
        )),
    ];
    for rule in borrowed {
        e.set_extra(&format!("{demo}{rule}"));
        let rejected = mesh_tests::agent::metric(&e.agents[0].metrics(), "mesh_config_objects_rejected", &[]);
        assert_eq!(rejected, 1.0, "the attacker's rule was admitted: {rule}");
        let (code, body) = call("intruder");
        assert!(code >= 500, "attacker's pod got through ({code}) with {rule}: {body}");
        assert_eq!(call("test").0, 200, "demo's client with {rule}");
    }
}

/// Borrowed hosts: `demo` originates MUTUAL TLS to mutual.example. A tenant's
/// DestinationRule for the same host (first by namespace and name, and
/// older) saying `tls: DISABLE` must change its own clients' traffic only:
/// demo's requests still leave in TLS with demo's certificate.
#[test]
fn a_tenants_destination_rule_applies_to_its_own_clients_only() {
    if !require_root("a_tenants_destination_rule_applies_to_its_own_clients_only") {
        return;
    }
    let e = Edge::start();
    let _server = mutual_server(&e);
    let client = e.certs.client("bank-client", "bank.example");
    let demo = origination(&e, &client, "{mode: MUTUAL, credentialName: client-cert, sni: secure.example}");
    let strip = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: strip, namespace: attacker, creationTimestamp: \"2020-01-01T00:00:00Z\"}
spec: {host: mutual.example, trafficPolicy: {tls: {mode: DISABLE}}}
";
    e.set_extra(&format!("{demo}{strip}"));
    let call = |pod: &str| {
        let resolve = format!("mutual.example:80:{EXTERNAL_IP}");
        curl(|a| e.pod(pod).cmd(a), &["--resolve", &resolve, "http://mutual.example/"])
    };
    until_served(|| call("test").0);
    // The attack would strip demo's TLS: demo's client must still be served.
    let (code, body) = call("test");
    assert_eq!(code, 200, "demo's origination was changed by another namespace's rule: {body}");
    assert!(body.contains("TLSv1.2"), "{body}");
    // The attacker's rule does apply to the attacker's own pod: plaintext,
    // which the TLS server does not answer with HTTP.
    assert_ne!(call("intruder").0, 200);
}

/// Borrowed hosts by ServiceEntry: `demo` declares direct.example (the
/// server outside the cluster). A tenant declares the same host, older, with
/// the outside server's address and its own pod as the endpoint. demo's
/// requests must still reach the outside server, not the tenant's pod.
#[test]
fn a_tenants_service_entry_does_not_take_another_namespaces_host() {
    if !require_root("a_tenants_service_entry_does_not_take_another_namespaces_host") {
        return;
    }
    let e = Edge::start();
    mesh_tests::servers::http_hello(e.pod("intruder"), 80);
    let hijack = format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: direct, namespace: attacker, creationTimestamp: \"2020-01-01T00:00:00Z\"}}
spec:
  hosts: [direct.example]
  addresses: [{EXTERNAL_IP}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  location: MESH_EXTERNAL
  endpoints: [{{address: {INTRUDER_IP}}}]
"
    );
    e.set_extra(&hijack);
    let resolve = format!("direct.example:80:{EXTERNAL_IP}");
    let (code, body) = curl(|a| e.pod("test").cmd(a), &["--resolve", &resolve, "http://direct.example/"]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("hello from external"), "demo's request went to another namespace's endpoint: {body}");
}

/// Gateway takeover: a tenant's Gateway on the ingress node with a `*`
/// server on port 80 and a newer VirtualService of its own for the host
/// demo's older one names (answering 418): demo's older rule keeps the host.
/// Then the tenant adds a TCP server on port 443, which demo's Gateway serves
/// as HTTPS: that server alone is left out (reported), and a change to
/// demo's Gateway made at the same time (a new port) still applies: nothing
/// is frozen.
#[test]
fn a_tenants_gateway_cannot_take_or_freeze_another_namespaces_listeners() {
    if !require_root("a_tenants_gateway_cannot_take_or_freeze_another_namespaces_listeners") {
        return;
    }
    let e = Edge::start();
    let tenant = "---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: tenant, namespace: attacker, creationTimestamp: \"2026-06-01T00:00:00Z\"}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ['*']
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: takeover, namespace: attacker, creationTimestamp: \"2026-06-01T00:00:00Z\"}
spec:
  hosts: [hello.example.com]
  gateways: [attacker/tenant]
  http:
  - fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: helloworld.demo.svc.cluster.local, port: {number: 5000}}}]
";
    let cfg = |tenant: &str| {
        config(&e.base, &e.secret, &e.ca_secret, tenant)
            // demo's objects are older than the tenant's, and name the host.
            .replacen(
                "metadata: {name: helloworld, namespace: demo}\nspec:\n  hosts: [\"*\"]",
                "metadata: {name: helloworld, namespace: demo, creationTimestamp: \"2025-01-01T00:00:00Z\"}\nspec:\n  hosts: [hello.example.com, \"*\"]",
                1,
            )
            .replacen(
                "metadata: {name: ingress, namespace: istio-system}",
                "metadata: {name: ingress, namespace: istio-system, creationTimestamp: \"2025-01-01T00:00:00Z\"}",
                1,
            )
    };
    e.set_config(&cfg(tenant));
    let http = |port: u16| {
        let url = format!("http://{INGRESS}:{port}/helloworld");
        curl(|a| e.c.net_cmd(a), &["-H", "Host: hello.example.com", &url])
    };
    // The takeover: demo's older rule answers for its host.
    let (code, body) = http(80);
    assert_eq!(code, 200, "the tenant's newer VirtualService took hello.example.com: {body}");
    assert!(body.contains("hello from helloworld"), "{body}");
    // The freeze: a TCP server on demo's HTTPS port, while demo adds a port.
    let conflicting = tenant.replacen(
        "    hosts: ['*']\n",
        "    hosts: ['*']\n  - port: {number: 443, name: tcp, protocol: TCP}\n    hosts: ['*']\n",
        1,
    );
    e.set_config(&cfg(&conflicting).replacen(
        "  - port: {number: 9000, name: tcp, protocol: TCP}",
        "  - port: {number: 8081, name: http-new, protocol: HTTP}\n    hosts: [\"*\"]\n  - port: {number: 9000, name: tcp, protocol: TCP}",
        1,
    ));
    until_served(|| http(8081).0);
    let got = http(8081);
    assert_eq!(got.0, 200, "a tenant's conflicting server froze the listeners: {}", got.1);
    // HTTPS on 443 is still demo's, and the tenant's server is reported.
    let ca = e.certs.ca();
    let resolve = format!("hello.example.com:443:{INGRESS}");
    let args = ["--cacert", ca.to_str().unwrap(), "--resolve", &resolve, "https://hello.example.com/helloworld"];
    assert_eq!(curl(|a| e.c.net_cmd(a), &args).0, 200);
    let dump = e.agents[0].admin_get("/config_dump").unwrap().1;
    assert!(dump.contains("\"gateway\": \"attacker/tenant\""), "the conflict is not in /config_dump");
    let conflicts = mesh_tests::agent::metric(&e.agents[0].metrics(), "mesh_gateway_server_conflicts", &[]);
    assert_eq!(conflicts, 1.0);
}
