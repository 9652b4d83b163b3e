//! The mesh's edges (root, two nodes, the CA service): an ingress Gateway on
//! node-1 (HTTP and HTTPS from a Secret), ServiceEntries and REGISTRY_ONLY,
//! TLS origination, and an egress Gateway on node-2 — with curl from outside
//! the mesh and from a meshed pod, and servers outside the cluster.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use mesh_tests::{agent::metric, certs::Certs, edge::*, require_root};

#[test]
fn ingress_gateway_serves_http_and_https_from_outside_the_mesh() {
    if !require_root("ingress_gateway_serves_http_and_https_from_outside_the_mesh") {
        return;
    }
    let e = Edge::start();
    let outside = |args: &[&str]| e.c.net_cmd(args);

    // The pattern's example: curl http://<node-ip>:80/helloworld from outside.
    let (code, body) = curl(outside, &[&format!("http://{NODE1}:80/helloworld")]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("hello from helloworld"), "{body}");
    // Unknown path: 404 from the gateway, counted.
    let (code, body) = curl(outside, &[&format!("http://{NODE1}/nothing-here")]);
    assert_eq!(code, 404, "{body}");
    // HTTPS with the Secret's certificate, checked by curl against the test CA.
    let ca = e.certs.ca();
    let (code, body) = curl(
        outside,
        &[
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &format!("hello.example.com:443:{NODE1}"),
            "https://hello.example.com/helloworld",
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("hello from helloworld"), "{body}");
    // TLS passthrough by SNI: the pod's own certificate reaches the client.
    let (code, body) = curl(
        outside,
        &[
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &format!("passthrough.example:9443:{NODE1}"),
            "https://passthrough.example:9443/",
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("s_server"), "{body}");
    // Another SNI has no route: the connection is refused.
    let (code, _) =
        curl(outside, &["-k", "--resolve", &format!("other.example:9443:{NODE1}"), "https://other.example:9443/"]);
    assert_eq!(code, 0);
    // node-2 runs the egress Gateway only: its port 80 does not route the
    // ingress rules, and its port 443 is not open.
    let (code, _) = curl(outside, &[&format!("http://{NODE2}/helloworld")]);
    assert_eq!(code, 404);
    let (code, _) = curl(outside, &["-k", &format!("https://{NODE2}/helloworld")]);
    assert_eq!(code, 0);

    // A TCP server: bytes both ways, half-close kept, to the echo pod on node-2.
    let outside_ns = e.c.net_ns.clone();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let sent = payload.clone();
    let back = mesh_tests::netns::enter_and_spawn(&outside_ns, move || {
        use std::io::{Read as _, Write as _};
        let addr: SocketAddr = format!("{NODE1}:9000").parse().unwrap();
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&sent).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        back
    })
    .join()
    .unwrap();
    assert!(back == payload, "echoed {} of {} bytes", back.len(), payload.len());

    // Port 8443 was taken: reported, not fatal, the other ports serve.
    let (_, dump) = e.agents[0].admin_get("/config_dump").unwrap();
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let ports = v["gateway_listeners"].as_array().unwrap();
    let status = |port: u64| {
        ports.iter().find(|p| p["addr"].as_str() == Some(&format!("{NODE1}:{port}"))).unwrap()["status"].clone()
    };
    assert_eq!(status(80), "listening");
    assert!(status(8443).as_str().unwrap().contains("cannot listen"), "{dump}");
    assert_eq!(metric(&e.agents[0].metrics(), "mesh_gateway_listener_failures_total", &[]), 1.0);

    // A new certificate in the Secret is served without rebinding the port.
    let served_serial = || {
        let cmd = format!(
            "openssl s_client -connect {NODE1}:443 -servername hello.example.com </dev/null 2>/dev/null \
             | openssl x509 -noout -serial"
        );
        String::from_utf8_lossy(&e.c.net_cmd(&["sh", "-c", &cmd]).stdout).trim().to_owned()
    };
    let file_serial = |crt: &std::path::Path| {
        let out = Command::new("openssl").args(["x509", "-noout", "-serial", "-in"]).arg(crt).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let (crt2, key2) = e.certs.server("hello2", "hello.example.com");
    let first = served_serial();
    assert!(first.starts_with("serial="), "{first}");
    let secret2 = format!("  tls.crt: |\n{}  tls.key: |\n{}", Certs::yaml_block(&crt2, 4), Certs::yaml_block(&key2, 4));
    e.set_config(&config(&e.base, &secret2, &e.ca_secret, ""));
    let want = file_serial(&crt2);
    assert_ne!(first, want);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while served_serial() != want {
        assert!(std::time::Instant::now() < deadline, "still serving {first}, want {want}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, body) = curl(
        outside,
        &[
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &format!("hello.example.com:443:{NODE1}"),
            "https://hello.example.com/helloworld",
        ],
    );
    assert_eq!(code, 200, "{body}");

    // The gateway's identity reaches the destination's agent over HBONE.
    let m1 = e.agents[0].metrics();
    let gw = [("source_workload", "ingress"), ("destination_service", "helloworld.demo.svc.cluster.local")];
    assert!(metric(&m1, "istio_requests_total", &[gw[0], gw[1], ("response_code", "200")]) >= 2.0, "{m1}");
    assert!(metric(&m1, "istio_requests_total", &[("source_workload", "ingress"), ("response_code", "404")]) >= 1.0);
    let m2 = e.agents[1].metrics();
    let principal = ("source_principal", "spiffe://cluster.local/ns/istio-system/sa/ingress");
    let dest = [
        principal,
        ("source_workload", "ingress"),
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(metric(&m2, "istio_tcp_connections_opened_total", &dest) >= 1.0, "{m2}");
}

#[test]
fn egress_registry_only_service_entries_tls_origination_and_egress_gateway() {
    if !require_root("egress_registry_only_service_entries_tls_origination_and_egress_gateway") {
        return;
    }
    let e = Edge::start();
    let test = |args: &[&str]| e.pod("test").cmd(args);
    let resolve = |host: &str| format!("{host}:80:{EXTERNAL_IP}");

    // Declared by a ServiceEntry: straight out from node-1, with the pod's address.
    let (code, body) = curl(test, &["--resolve", &resolve("direct.example"), "http://direct.example/"]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&format!("hello from external; client {TEST_IP}")), "{body}");
    // Not declared: 502 naming the policy; raw TCP is reset.
    let (code, body) = curl(test, &[&format!("http://{}/", Ipv4Addr::new(172, 18, 200, 3))]);
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("REGISTRY_ONLY"), "{body}");
    let tcp = e.pod("test").run(|| {
        let addr = SocketAddr::from((EXTERNAL_IP, 7000));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        use std::io::{Read as _, Write as _};
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"\x00\x01binary")?;
        let mut buf = [0u8; 16];
        s.read(&mut buf)
    });
    assert!(tcp.is_err() || tcp.as_ref().is_ok_and(|n| *n == 0), "{tcp:?}");
    // TLS originated by the agent for a plain-HTTP call (openssl s_server answers).
    let (code, body) = curl(test, &["--resolve", &resolve("secure.example"), "http://secure.example/"]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("s_server"), "{body}");

    let m1 = e.agents[0].metrics();
    let hole = ("destination_service", "BlackHoleCluster");
    assert!(metric(&m1, "istio_requests_total", &[hole, ("response_code", "502")]) >= 1.0, "{m1}");
    assert!(metric(&m1, "istio_tcp_connections_opened_total", &[hole]) >= 1.0, "{m1}");
    let direct = [("destination_service", "direct.example"), ("destination_service_namespace", "demo")];
    assert!(metric(&m1, "istio_requests_total", &[direct[0], direct[1], ("response_code", "200")]) >= 1.0);

    // Through the egress gateway: node-2 alone talks to the outside.
    e.set_extra(VIA_EGRESS);
    let (code, body) = curl(test, &["--resolve", &resolve("external.example"), "http://external.example/"]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&format!("hello from external; client {NODE2}")), "{body}");
    let m1 = e.agents[0].metrics();
    let hop1 = ("destination_service", "egress.istio-system.svc.cluster.local");
    assert!(metric(&m1, "istio_requests_total", &[hop1, ("connection_security_policy", "mutual_tls")]) >= 1.0, "{m1}");
    let m2 = e.agents[1].metrics();
    let hop2 = [("source_workload", "egress"), ("destination_service", "external.example")];
    assert!(metric(&m2, "istio_requests_total", &[hop2[0], hop2[1], ("response_code", "200")]) >= 1.0, "{m2}");
}

#[test]
fn host_network_clients_reach_services_with_the_node_identity() {
    if !require_root("host_network_clients_reach_services_with_the_node_identity") {
        return;
    }
    let e = Edge::start();
    // curl in node-1's own namespace (a node daemon or hostNetwork pod) to a
    // Service VIP whose only endpoint is on node-2: caught by cgroup/connect4.
    let node1 = |args: &[&str]| e.c.node_cmd(args);
    let (code, body) = curl(node1, &["http://10.96.0.10:5000/from-the-node"]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("hello from helloworld"), "{body}");
    let node_id = "spiffe://cluster.local/ns/istio-system/sa/mesh-node-node-1";
    let m1 = e.agents[0].metrics();
    let src = [("source_principal", node_id), ("destination_service", "helloworld.demo.svc.cluster.local")];
    assert!(metric(&m1, "istio_requests_total", &[src[0], src[1], ("response_code", "200")]) >= 1.0, "{m1}");
    let m2 = e.agents[1].metrics();
    let dst = [("source_principal", node_id), ("reporter", "destination")];
    assert!(metric(&m2, "istio_tcp_connections_opened_total", &dst) >= 1.0, "{m2}");
    // A pod's connection is not a host client: it goes the usual way.
    let (code, body) = curl(|a: &[&str]| e.pod("test").cmd(a), &["http://10.96.0.10:5000/"]);
    assert_eq!(code, 200, "{body}");
    e.agents[0].wait_metrics(5, "host_captured counter", |t| {
        metric(t, "mesh_ebpf_packets_total", &[("counter", "host_captured")]) >= 1.0
    });
}

#[test]
fn two_gateways_on_one_client_connection_keep_their_own_identities() {
    if !require_root("two_gateways_on_one_client_connection_keep_their_own_identities") {
        return;
    }
    let e = Edge::start();
    // A second Gateway on node-1's port 80 for partner.example, and a policy
    // on helloworld (node-2) that admits only the `ingress` gateway.
    e.set_extra(
        r#"---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: partner, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [partner.example]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: partner, namespace: demo}
spec:
  hosts: [partner.example]
  gateways: [istio-system/partner]
  http:
  - match: [{uri: {prefix: /partner}}]
    rewrite: {uri: /helloworld}
    route: [{destination: {host: helloworld, port: {number: 5000}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-ingress, namespace: demo}
spec:
  selector: {matchLabels: {app: helloworld}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/istio-system/sa/ingress]}}]}]
"#,
    );
    // The agent holds the new gateway's certificate once the CA knows it too.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !e.agents[0].admin_get("/config_dump").is_some_and(|(_, d)| d.contains("/sa/partner\""))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    // One keep-alive client connection: a request for www.example is the
    // `ingress` gateway's (its `*` host), one for partner.example the
    // `partner` gateway's (the more specific host, as Envoy picks a virtual
    // host: /helloworld there would be 404).
    let out = e.c.net_cmd(&[
        "curl",
        "-s",
        "-v",
        "-H",
        "Host: www.example",
        "-w",
        "%{http_code}\n",
        &format!("http://{NODE1}/helloworld/x"),
        "--next",
        "-s",
        "-v",
        "-H",
        "Host: partner.example",
        "-w",
        "%{http_code}\n",
        &format!("http://{NODE1}/partner/x"),
    ]);
    let (body, verbose) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(verbose.contains("Re-using existing connection"), "not one client connection: {verbose}");
    assert!(body.contains("hello from helloworld") && body.contains("200\n"), "ingress refused: {body}");
    assert!(body.contains("RBAC: access denied") && body.ends_with("403\n"), "partner got through: {body}");
    // Both sides report the identity each request left with.
    let principal = |gw: &str| format!("spiffe://cluster.local/ns/istio-system/sa/{gw}");
    let (ingress, partner) = (principal("ingress"), principal("partner"));
    let source = e.agents[0].wait_metrics(5, "request metrics", |t| {
        metric(t, "istio_requests_total", &[("source_principal", &partner), ("response_code", "403")]) >= 1.0
    });
    assert!(
        metric(&source, "istio_requests_total", &[("source_principal", &ingress), ("response_code", "200")]) >= 1.0
    );
    let dest = e.agents[1].metrics();
    let admitted = [("reporter", "destination"), ("source_principal", ingress.as_str())];
    assert!(metric(&dest, "istio_tcp_connections_opened_total", &admitted) >= 1.0, "{dest}");
    let refused = [("reporter", "destination"), ("source_principal", partner.as_str())];
    assert!(metric(&dest, "istio_tcp_connections_opened_total", &refused) >= 1.0, "{dest}");
    assert!(metric(&dest, "mesh_tcp_connection_failures_total", &[("reason", "denied")]) >= 1.0, "{dest}");
}

/// Whether an openssl client with `args` completes a TLS handshake with the
/// ingress gateway's HTTPS server.
fn handshakes(e: &Edge, args: &str) -> bool {
    let cmd = format!(
        "openssl s_client -connect {NODE1}:443 -servername hello.example.com {args} </dev/null 2>&1 | grep -q '^New, TLS'"
    );
    e.c.net_cmd(&["sh", "-c", &cmd]).status.success()
}

#[test]
fn https_gateways_speak_tls_1_2_and_1_3_and_honour_versions_and_suites() {
    if !require_root("https_gateways_speak_tls_1_2_and_1_3_and_honour_versions_and_suites") {
        return;
    }
    let e = Edge::start();
    // Defaults: Mozilla's intermediate profile.
    assert!(handshakes(&e, "-tls1_3"), "TLS 1.3 refused");
    assert!(handshakes(&e, "-tls1_2"), "TLS 1.2 refused");
    assert!(!handshakes(&e, "-tls1_1 -cipher DEFAULT@SECLEVEL=0"), "TLS 1.1 accepted");
    assert!(!handshakes(&e, "-tls1_2 -cipher ECDHE-ECDSA-AES128-SHA"), "a CBC suite accepted");
    assert!(!handshakes(&e, "-tls1_2 -cipher AES128-GCM-SHA256"), "RSA key exchange accepted");
    // TLS 1.3 only.
    e.set_https_tls(", minProtocolVersion: TLSV1_3");
    assert!(handshakes(&e, "-tls1_3"));
    assert!(!handshakes(&e, "-tls1_2"), "minProtocolVersion TLSV1_3 let TLS 1.2 in");
    // TLS 1.2 only, one suite.
    e.set_https_tls(", maxProtocolVersion: TLSV1_2, cipherSuites: [ECDHE-ECDSA-AES256-GCM-SHA384]");
    assert!(!handshakes(&e, "-tls1_3"), "maxProtocolVersion TLSV1_2 let TLS 1.3 in");
    assert!(handshakes(&e, "-tls1_2 -cipher ECDHE-ECDSA-AES256-GCM-SHA384"));
    assert!(!handshakes(&e, "-tls1_2 -cipher ECDHE-ECDSA-AES128-GCM-SHA256"), "a suite not listed accepted");
    // A real client through it, with the suite it settles on.
    let (code, body) = curl(
        |a| e.c.net_cmd(a),
        &[
            "--cacert",
            e.certs.ca().to_str().unwrap(),
            "--tls-max",
            "1.2",
            "--resolve",
            &format!("hello.example.com:443:{NODE1}"),
            "https://hello.example.com/helloworld",
        ],
    );
    assert_eq!(code, 200, "{body}");
    // The HTTP server sends its clients to HTTPS, and curl follows to the page.
    e.set_replaced("hosts: [\"*\"]", "hosts: [\"*\"]\n    tls: {httpsRedirect: true}");
    let (code, body) = curl(|a| e.c.net_cmd(a), &["-i", &format!("http://{NODE1}/helloworld?x=1")]);
    assert_eq!(code, 301, "{body}");
    assert!(body.contains(&format!("location: https://{NODE1}/helloworld?x=1")), "{body}");
    let (code, body) = curl(
        |a| e.c.net_cmd(a),
        &[
            "-L",
            "--cacert",
            e.certs.ca().to_str().unwrap(),
            "--resolve",
            &format!("hello.example.com:80:{NODE1}"),
            "--resolve",
            &format!("hello.example.com:443:{NODE1}"),
            "http://hello.example.com/helloworld",
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("hello from helloworld"), "{body}");
}
