//! The mesh's edges (root, two nodes, the CA service): an ingress Gateway on
//! node-1 (HTTP and HTTPS from a Secret), ServiceEntries and REGISTRY_ONLY,
//! TLS origination, and an egress Gateway on node-2 — with curl from outside
//! the mesh and from a meshed pod, and servers outside the cluster.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use mesh_tests::{
    Agent, Cluster, Pod,
    agent::{CaService, metric},
    certs::Certs,
    fixture::{Fixture, PodSpec, Port, port},
    netns::Background,
    require_root, servers,
};

const TEST_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const HELLO_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
/// A server outside the cluster, on the cluster network's namespace.
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 200, 2);
const NODE1: &str = "172.18.0.2";
const NODE2: &str = "172.18.1.2";

/// node-1 runs the ingress gateway, node-2 the egress gateway; `test` on
/// node-1 and `helloworld` on node-2 are meshed.
fn fixture() -> Fixture {
    let mut f = Fixture::two_nodes([&[("istio", "ingressgateway")], &[("istio", "egressgateway")]]);
    f.namespace("demo", true).pod(0, "test", TEST_IP, PodSpec::app("demo", &[("app", "test")])).pod(
        1,
        "helloworld",
        HELLO_IP,
        PodSpec::app("demo", &[("app", "helloworld"), ("version", "v1")]),
    );
    let ports = [
        port("http", 5000, "9095"),
        Port { name: "tcp-echo", port: 7000, target: None },
        Port { name: "tls", port: 8443, target: None },
    ];
    f.service("demo", "helloworld", "10.96.0.10", &[("app", "helloworld")], &ports);
    f
}

/// The [`fixture`]'s objects (`base`) and the edge: outbound traffic is
/// REGISTRY_ONLY; `direct.example` and `external.example` are ServiceEntries
/// for the outside server, `secure.example` one with TLS originated to it.
fn config(base: &str, secret: &str, ca_secret: &str, extra: &str) -> String {
    format!(
        r#"{base}---
apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
---
apiVersion: v1
kind: Secret
metadata: {{name: hello-cert, namespace: istio-system}}
type: kubernetes.io/tls
stringData:
{secret}---
apiVersion: v1
kind: Secret
metadata: {{name: external-ca, namespace: demo}}
stringData:
{ca_secret}---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: ingress, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: ["*"]
  - port: {{number: 443, name: https, protocol: HTTPS}}
    hosts: [hello.example.com]
    tls: {{mode: SIMPLE, credentialName: hello-cert}}
  - port: {{number: 8443, name: busy, protocol: HTTP}}
    hosts: ["*"]
  - port: {{number: 9000, name: tcp, protocol: TCP}}
    hosts: ["*"]
  - port: {{number: 9443, name: tls, protocol: TLS}}
    hosts: [passthrough.example]
    tls: {{mode: PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: passthrough, namespace: demo}}
spec:
  hosts: [passthrough.example]
  gateways: [istio-system/ingress]
  tls:
  - match: [{{port: 9443, sniHosts: [passthrough.example]}}]
    route: [{{destination: {{host: helloworld, port: {{number: 8443}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: demo}}
spec:
  hosts: ["*"]
  gateways: [istio-system/ingress]
  tcp:
  - match: [{{port: 9000}}]
    route: [{{destination: {{host: helloworld, port: {{number: 7000}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: helloworld, namespace: demo}}
spec:
  hosts: ["*"]
  gateways: [istio-system/ingress]
  http:
  - match: [{{uri: {{prefix: /helloworld}}}}]
    route: [{{destination: {{host: helloworld, port: {{number: 5000}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: direct, namespace: demo}}
spec:
  hosts: [direct.example]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  location: MESH_EXTERNAL
  endpoints: [{{address: {EXTERNAL_IP}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external, namespace: demo}}
spec:
  hosts: [external.example]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: DNS
  endpoints: [{{address: {EXTERNAL_IP}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure, namespace: demo}}
spec:
  hosts: [secure.example]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8443}}]
  resolution: STATIC
  endpoints: [{{address: {EXTERNAL_IP}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: secure, namespace: demo}}
spec:
  host: secure.example
  trafficPolicy:
    tls: {{mode: SIMPLE, credentialName: external-ca}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: egress, namespace: istio-system}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: [external.example]
{extra}"#
    )
}

/// Sends external.example through the egress gateway (Istio's two-hop rule).
const VIA_EGRESS: &str = r#"---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: external-via-egress, namespace: demo}
spec:
  hosts: [external.example]
  gateways: [istio-system/egress, mesh]
  http:
  - match: [{gateways: [mesh], port: 80}]
    route: [{destination: {host: egress.istio-system.svc.cluster.local, port: {number: 80}}}]
  - match: [{gateways: [istio-system/egress], port: 80}]
    route: [{destination: {host: external.example, port: {number: 80}}}]
"#;

struct Edge {
    agents: Vec<Agent>,
    ca: CaService,
    _tls_servers: Vec<Background>,
    _busy: TcpListener,
    certs: Certs,
    c: Cluster,
    /// The [`fixture`]'s objects.
    base: String,
    secret: String,
    ca_secret: String,
}

impl Edge {
    fn start() -> Edge {
        let f = fixture();
        let base = f.yaml("");
        let c = f.cluster;
        servers::http_hello(c.pod("helloworld"), 9095);
        servers::echo(c.pod("helloworld"), 7000);
        // Outside the cluster: an HTTP server and an HTTPS one (openssl s_server).
        assert!(c.net_cmd(&["ip", "addr", "add", &format!("{EXTERNAL_IP}/32"), "dev", "lo"]).status.success());
        let outside = Pod::namespace("external", EXTERNAL_IP, &c.net_ns);
        servers::http_hello(&outside, 80);
        let certs = Certs::new(&c.id);
        let (crt, key) = certs.server("hello", "hello.example.com");
        let (ext_crt, ext_key) = certs.server("secure", "secure.example");
        let (pass_crt, pass_key) = certs.server("passthrough", "passthrough.example");
        let s_server = |netns: &str, crt: &PathBuf, key: &PathBuf| {
            let (crt, key) = (crt.to_str().unwrap(), key.to_str().unwrap());
            let args = ["openssl", "s_server", "-quiet", "-www", "-accept", "8443", "-cert", crt, "-key", key];
            Background::spawn_in(netns, &args).unwrap()
        };
        // The outside HTTPS service, and a TLS server inside the mesh that the
        // gateway passes through unopened.
        let tls_servers =
            vec![s_server(&c.net_ns, &ext_crt, &ext_key), s_server(&c.pod("helloworld").netns, &pass_crt, &pass_key)];
        // Something else holds node-1's port 8443: that listener must fail alone.
        let node1 = Pod::namespace("node-1", c.nodes[0].ip, &c.nodes[0].ns);
        let busy = node1.run(|| TcpListener::bind((NODE1, 8443)).unwrap());
        let secret =
            format!("  tls.crt: |\n{}  tls.key: |\n{}", Certs::yaml_block(&crt, 4), Certs::yaml_block(&key, 4));
        let ca_secret = format!("  ca.crt: |\n{}", Certs::yaml_block(&certs.ca(), 4));
        let cfg = config(&base, &secret, &ca_secret, "");
        let ca = CaService::start(&c, &cfg);
        let agents = (0..2).map(|i| Agent::start_on(&c, i, &cfg, &ca.agent_args(&c.nodes[i].name))).collect();
        Edge { agents, ca, _tls_servers: tls_servers, _busy: busy, certs, c, base, secret, ca_secret }
    }

    fn pod(&self, name: &str) -> &Pod {
        self.c.pod(name)
    }

    fn set_extra(&self, extra: &str) {
        self.set_config(&config(&self.base, &self.secret, &self.ca_secret, extra));
    }

    fn set_config(&self, cfg: &str) {
        self.ca.write_config(cfg);
        for a in &self.agents {
            let before = metric(&a.metrics(), "mesh_config_loads_total", &[("result", "success")]);
            a.write_config(cfg);
            a.wait_metrics(10, "configuration reload", |t| {
                metric(t, "mesh_config_loads_total", &[("result", "success")]) > before
            });
        }
    }
}

/// curl in a namespace; returns (HTTP status, body + errors).
fn curl(run: impl Fn(&[&str]) -> std::process::Output, args: &[&str]) -> (u16, String) {
    let c = mesh_tests::clients::curl(run, args);
    (c.code, c.body + &c.stderr)
}

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
    // One keep-alive client connection: /helloworld is the `ingress`
    // gateway's, /partner the `partner` gateway's.
    let out = e.c.net_cmd(&[
        "curl",
        "-s",
        "-v",
        "-H",
        "Host: partner.example",
        "-w",
        "%{http_code}\n",
        &format!("http://{NODE1}/helloworld/x"),
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
