//! The mesh's edges (root, two nodes, the CA service): Istio's ingress
//! gateway as a pod on node-1 behind a LoadBalancer address (HTTP and HTTPS
//! from a Secret), ServiceEntries and REGISTRY_ONLY, TLS origination, and the
//! egress gateway as a pod on node-2 — with curl from outside the mesh and
//! from a meshed pod, and servers outside the cluster.
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

    // The pattern's example: curl http://<lb-ip>:80/helloworld from outside.
    let (code, body) = curl(outside, &[&format!("http://{INGRESS}:80/helloworld")]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("hello from helloworld"), "{body}");
    // Unknown path: 404 from the gateway, counted.
    let (code, body) = curl(outside, &[&format!("http://{INGRESS}/nothing-here")]);
    assert_eq!(code, 404, "{body}");
    // HTTPS with the Secret's certificate, checked by curl against the test CA.
    let ca = e.certs.ca();
    let (code, body) = curl(
        outside,
        &[
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &format!("hello.example.com:443:{INGRESS}"),
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
            &format!("passthrough.example:9443:{INGRESS}"),
            "https://passthrough.example:9443/",
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("s_server"), "{body}");
    // Another SNI has no route: the connection is refused.
    let (code, _) =
        curl(outside, &["-k", "--resolve", &format!("other.example:9443:{INGRESS}"), "https://other.example:9443/"]);
    assert_eq!(code, 0);
    // The egress gateway pod serves the egress Gateway only: its port 80
    // does not route the ingress rules, and it has no port 443 to serve.
    let (code, _) = curl(outside, &[&format!("http://{EGRESS_IP}/helloworld")]);
    assert_eq!(code, 404);
    let (code, _) = curl(outside, &["-k", &format!("https://{EGRESS_IP}/helloworld")]);
    assert_eq!(code, 0);
    // Nor does a node serve anything on its own address: the gateway is a pod.
    let (code, body) = curl(outside, &[&format!("http://{NODE1}/helloworld")]);
    assert_eq!(code, 0, "{body}");

    // A TCP server: bytes both ways, half-close kept, to the echo pod on node-2.
    let outside_ns = e.c.net_ns.clone();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let sent = payload.clone();
    let back = mesh_tests::netns::enter_and_spawn(&outside_ns, move || {
        use std::io::{Read as _, Write as _};
        let addr: SocketAddr = format!("{INGRESS}:9000").parse().unwrap();
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

    // A client in the mesh on the gateway pod's node, through the gateway's
    // Service: handed to the gateway in-process, out with its identity.
    let (code, body) = curl(|a| e.pod("test").cmd(a), &[&format!("http://{INGRESS_VIP}/helloworld")]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("hello from helloworld"), "{body}");

    // The gateway pod's ports, as /config_dump shows them.
    let (_, dump) = e.agents[0].admin_get("/config_dump").unwrap();
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let ports = v["gateway_listeners"].as_array().unwrap();
    let status = |port: u64| {
        let p = ports.iter().find(|p| p["addr"].as_str() == Some(&format!("{INGRESS_IP}:{port}"))).unwrap();
        (p["pod"].clone(), p["status"].clone())
    };
    assert_eq!(status(80), ("istio-system/istio-ingressgateway".into(), "serving".into()), "{dump}");
    assert_eq!(status(443).1, "serving");

    // A new certificate in the Secret is served without rebinding the port.
    let served_serial = || {
        let cmd = format!(
            "openssl s_client -connect {INGRESS}:443 -servername hello.example.com </dev/null 2>/dev/null \
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
            &format!("hello.example.com:443:{INGRESS}"),
            "https://hello.example.com/helloworld",
        ],
    );
    assert_eq!(code, 200, "{body}");

    // The gateway pod's identity reaches the destination's agent over HBONE.
    let m1 = e.agents[0].metrics();
    let ingress = ("source_workload", "istio-ingressgateway");
    let gw = [ingress, ("destination_service", "helloworld.demo.svc.cluster.local")];
    assert!(metric(&m1, "istio_requests_total", &[gw[0], gw[1], ("response_code", "200")]) >= 2.0, "{m1}");
    assert!(metric(&m1, "istio_requests_total", &[ingress, ("response_code", "404")]) >= 1.0);
    let m2 = e.agents[1].metrics();
    let principal = ("source_principal", INGRESS_ID);
    let dest = [principal, ingress, ("reporter", "destination"), ("connection_security_policy", "mutual_tls")];
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
    let hop1 = ("destination_service", "istio-egressgateway.istio-system.svc.cluster.local");
    assert!(metric(&m1, "istio_requests_total", &[hop1, ("connection_security_policy", "mutual_tls")]) >= 1.0, "{m1}");
    let m2 = e.agents[1].metrics();
    let hop2 = [("source_workload", "istio-egressgateway"), ("destination_service", "external.example")];
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
    // A ServiceEntry's address (routed nowhere on the node) is the entry's
    // for host clients too: captured, sent to its endpoint.
    let entry = format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: virtual, namespace: demo}}\n\
         spec: {{hosts: [virtual.example], addresses: [240.0.0.10], resolution: STATIC, location: MESH_EXTERNAL, \
         ports: [{{number: 80, name: http, protocol: HTTP}}], endpoints: [{{address: {EXTERNAL_IP}}}]}}\n"
    );
    e.set_config(&config(&e.base, &e.secret, &e.ca_secret, &entry));
    let (code, body) = curl(node1, &["http://240.0.0.10/from-the-node"]);
    assert_eq!(code, 200, "a host client to a ServiceEntry address: {body}");
    // And an address in its range.
    e.set_config(&config(
        &e.base,
        &e.secret,
        &e.ca_secret,
        &entry.replace("[240.0.0.10]", "[240.0.0.10, 240.1.0.0/16]"),
    ));
    let (code, body) = curl(node1, &["http://240.1.2.3/from-the-node"]);
    assert_eq!(code, 200, "a host client to an address in a ServiceEntry's range: {body}");
    e.agents[0].wait_metrics(5, "host_captured counter", |t| {
        metric(t, "mesh_ebpf_packets_total", &[("counter", "host_captured")]) >= 1.0
    });
}

#[test]
fn only_gateway_pods_serve_gateways_and_only_with_their_own_identity() {
    if !require_root("only_gateway_pods_serve_gateways_and_only_with_their_own_identity") {
        return;
    }
    let e = Edge::start();
    // The attacks: node-2 labelled as the ingress gateway (a kubelet may set
    // most of its own labels), and another tenant's Gateway whose selector
    // matches an application pod (helloworld, on port 5000's target 9095).
    // helloworld admits only the ingress gateway pod's identity.
    let labelled = e.base.replacen(
        "kind: Node\nmetadata: {name: node-2",
        "kind: Node\nmetadata: {name: node-2, labels: {istio: ingressgateway}",
        1,
    );
    assert_ne!(labelled, e.base);
    let extra = r#"---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: hijack, namespace: attacker}
spec:
  selector: {app: helloworld}
  servers: [{port: {number: 9095, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hijack, namespace: attacker}
spec:
  hosts: ["*"]
  gateways: [attacker/hijack]
  http: [{direct_response: {status: 200}, route: [{destination: {host: helloworld.demo.svc.cluster.local, port: {number: 5000}}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-ingress, namespace: demo}
spec:
  selector: {matchLabels: {app: helloworld}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account]}}]}]
"#
    .replace("direct_response: {status: 200}, ", "");
    e.set_config(&config(&labelled, &e.secret, &e.ca_secret, &extra));
    // Positive control: through the load balancer, the gateway pod's
    // identity is admitted at helloworld.
    let outside = |args: &[&str]| e.c.net_cmd(args);
    let (code, body) = curl(outside, &[&format!("http://{INGRESS}/helloworld")]);
    assert_eq!((code, body.contains("hello from helloworld")), (200, true), "{body}");
    // The labelled node serves nothing and holds no gateway identity.
    let (code, _) = curl(outside, &[&format!("http://{NODE2}/helloworld")]);
    assert_eq!(code, 0, "node-2's address served the ingress gateway");
    let holds = |agent: usize| {
        let (_, dump) = e.agents[agent].admin_get("/config_dump").unwrap();
        let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
        let certs = v["certificates"].as_array().cloned().unwrap_or_default();
        certs.iter().any(|c| c["identity"] == INGRESS_ID)
    };
    assert!(!holds(1), "node-2 holds the gateway's identity");
    assert!(holds(0), "node-1 runs the gateway pod and holds its identity");
    // The application pod is not turned into a gateway: node-2 serves the
    // egress gateway pod's one port, and nothing at helloworld's address.
    let dump = e.agents[1].admin_get("/config_dump").unwrap().1;
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(v["gateway_listeners"].as_array().map(Vec::len), Some(1), "only the egress gateway pod's port: {dump}");
    // A mesh client is not the gateway either: refused by helloworld's policy.
    let (code, _) = curl(|a| e.pod("test").cmd(a), &["http://10.96.0.10:5000/helloworld"]);
    assert_ne!(code, 200);
    let source = e.agents[0].wait_metrics(5, "request metrics", |t| {
        metric(t, "istio_requests_total", &[("source_principal", INGRESS_ID), ("response_code", "200")]) >= 1.0
    });
    assert!(metric(&source, "istio_requests_total", &[("source_workload", "istio-ingressgateway")]) >= 1.0);
}

/// Whether an openssl client with `args` completes a TLS handshake with the
/// ingress gateway's HTTPS server.
fn handshakes(e: &Edge, args: &str) -> bool {
    let cmd = format!(
        "openssl s_client -connect {INGRESS}:443 -servername hello.example.com {args} </dev/null 2>&1 | grep -q '^New, TLS'"
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
            &format!("hello.example.com:443:{INGRESS}"),
            "https://hello.example.com/helloworld",
        ],
    );
    assert_eq!(code, 200, "{body}");
    // The HTTP server sends its clients to HTTPS, and curl follows to the page.
    e.set_replaced("hosts: [\"*\"]", "hosts: [\"*\"]\n    tls: {httpsRedirect: true}");
    let (code, body) = curl(|a| e.c.net_cmd(a), &["-i", &format!("http://{INGRESS}/helloworld?x=1")]);
    assert_eq!(code, 301, "{body}");
    assert!(body.contains(&format!("location: https://{INGRESS}/helloworld?x=1")), "{body}");
    let (code, body) = curl(
        |a| e.c.net_cmd(a),
        &[
            "-L",
            "--cacert",
            e.certs.ca().to_str().unwrap(),
            "--resolve",
            &format!("hello.example.com:80:{INGRESS}"),
            "--resolve",
            &format!("hello.example.com:443:{INGRESS}"),
            "http://hello.example.com/helloworld",
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("hello from helloworld"), "{body}");
}

#[test]
fn the_ingress_gateway_checks_each_requests_jwt_and_request_policy() {
    if !require_root("the_ingress_gateway_checks_each_requests_jwt_and_request_policy") {
        return;
    }
    use mesh_tests::jwt::{Signer, jwks, now};
    let e = Edge::start();
    let (signer, other) = (Signer::rsa("edge"), Signer::rsa("edge"));
    let issuer = "https://issuer.example";
    // Istio's JWT-at-the-ingress pattern: policies selecting the gateway pod.
    let extra = format!(
        "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: ingress-jwt, namespace: istio-system}}\n\
         spec: {{selector: {{matchLabels: {{istio: ingressgateway}}}}, jwtRules: [{{issuer: \"{issuer}\", jwks: '{}'}}]}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ingress-needs-jwt, namespace: istio-system}}\n\
         spec: {{selector: {{matchLabels: {{istio: ingressgateway}}}}, rules: [{{from: [{{source: {{requestPrincipals: [\"*\"]}}}}]}}]}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ingress-blocked, namespace: istio-system}}\n\
         spec: {{selector: {{matchLabels: {{istio: ingressgateway}}}}, action: DENY, rules: [{{when: [{{key: \"request.headers[x-block]\", values: [\"yes\"]}}]}}]}}\n",
        jwks(&[&signer])
    );
    e.set_config(&config(&e.base, &e.secret, &e.ca_secret, &extra));
    let outside = |args: &[&str]| e.c.net_cmd(args);
    let url = format!("http://{INGRESS}/helloworld");
    let claims = serde_json::json!({"iss": issuer, "sub": "alice", "exp": now() + 600});
    let (token, forged) = (signer.sign(&claims), other.sign(&claims));
    let bearer = |t: &str| format!("authorization: Bearer {t}");
    // The positive control: a valid token through the load balancer.
    let (code, body) = curl(outside, &["-H", &bearer(&token), &url]);
    assert_eq!((code, body.contains("hello from helloworld")), (200, true), "{body}");
    // No token: 403 from the gateway; a token another key signed: 401;
    // the DENY on a header, even with a valid token: 403.
    let (code, body) = curl(outside, &[&url]);
    assert_eq!(code, 403, "{body}");
    let (code, body) = curl(outside, &["-H", &bearer(&forged), &url]);
    assert_eq!(code, 401, "{body}");
    let (code, body) = curl(outside, &["-H", &bearer(&token), "-H", "x-block: yes", &url]);
    assert_eq!(code, 403, "{body}");
}
