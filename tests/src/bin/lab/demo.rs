//! `cargo xtask demo`: the whole pattern on two nodes built from network
//! namespaces, with the mesh CA as a service and one agent per node.
//!
//! - inter-service: `test` → `helloworld` (v1 on node-2 over mTLS/HBONE, v2 on
//!   node-1), `helloworld-v1` → `test` over HTTP/2, gRPC, WebSocket and TCP;
//! - ingress: `http://<lb-ip>:80/helloworld` (Istio's ingress gateway, a pod
//!   on node-1 behind a LoadBalancer address) and HTTPS with a Secret's
//!   certificate, from a client outside the mesh;
//! - egress: REGISTRY_ONLY; a ServiceEntry host straight out from node-1, an
//!   unknown host refused, and `external.example` through the egress gateway
//!   pod on node-2 (the only node that then talks to the outside);
//! - a host-network client on node-1 (cgroup/connect4) with the node's identity;
//! - STRICT mTLS and an AuthorizationPolicy turning clients away.
//!
//! Everything is removed afterwards (`--keep` leaves it running).
use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::Instant,
};

use anyhow::bail;
use mesh_tests::{
    Agent, Cluster, Pod,
    agent::{CaService, metric},
    certs::Certs,
    clients,
    fixture::{Fixture, PodSpec, Port, port},
    grpc, servers,
};

mod steps;

use steps::*;

/// The ingress gateway's LoadBalancer address.
const INGRESS: &str = "172.18.100.1";
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 200, 2);

/// The sample's cluster: node-1 (the ingress gateway pod) with `test`,
/// `helloworld-v2` and `sleep`; node-2 (the egress gateway pod) with
/// `helloworld-v1`; namespaces `sample` and `other` in the mesh; Services
/// helloworld, test, ws and grpc, and the gateways' (a LoadBalancer for
/// the ingress gateway).
fn fixture() -> Fixture {
    let mut f = Fixture::two_nodes([&[], &[]]);
    // Each node's pods' range (host-local IPAM): a pod not captured yet is gated.
    f.objects.pod_cidr("node-1", "10.244.1.0/24").pod_cidr("node-2", "10.244.2.0/24");
    f.namespace("sample", true)
        .namespace("other", true)
        .add_pod(0, "test", Ipv4Addr::new(10, 244, 1, 2), PodSpec::app("sample", &[("app", "test")]))
        .add_pod(0, "helloworld-v2", Ipv4Addr::new(10, 244, 1, 3), PodSpec::app("sample", &HELLO_V2))
        .add_pod(0, "sleep", Ipv4Addr::new(10, 244, 1, 4), PodSpec::app("other", &[("app", "sleep")]))
        .add_pod(1, "helloworld-v1", Ipv4Addr::new(10, 244, 2, 2), PodSpec::app("sample", &HELLO_V1));
    let plain = |name, port| Port { name, port, target: None };
    f.service(
        "sample",
        "helloworld",
        "10.96.0.10",
        &[("app", "helloworld")],
        &[plain("http", 9095), plain("tcp-echo", 7000)],
    )
    .service("sample", "test", "10.96.0.20", &[("app", "test")], &[plain("http2", 9095)])
    .service("sample", "ws", "10.96.0.13", &HELLO_V1, &[port("http-ws", 80, "8090")])
    .service("sample", "grpc", "10.96.0.14", &HELLO_V1, &[port("grpc", 80, "9090")]);
    // Istio's gateways as its manifests deploy them (gateway injection).
    let ingress = [("app", "istio-ingressgateway"), ("istio", "ingressgateway")];
    let spec = PodSpec::gateway("istio-system", &ingress, "istio-ingressgateway-service-account");
    let lb = INGRESS.parse().expect("address");
    f.gateway(0, "istio-ingressgateway", Ipv4Addr::new(10, 244, 1, 100), spec, ("10.96.0.40", lb), &[80, 443]);
    let egress = [("app", "istio-egressgateway"), ("istio", "egressgateway")];
    let spec = PodSpec::gateway("istio-system", &egress, "istio-egressgateway-service-account");
    f.add_pod(1, "istio-egressgateway", Ipv4Addr::new(10, 244, 2, 100), spec).service(
        "istio-system",
        "istio-egressgateway",
        "10.96.0.50",
        &egress[1..],
        &[plain("http", 80)],
    );
    f
}

const HELLO_V1: [(&str, &str); 2] = [("app", "helloworld"), ("version", "v1")];
const HELLO_V2: [(&str, &str); 2] = [("app", "helloworld"), ("version", "v2")];

/// The issuer of the demo's end-user tokens.
const ISSUER: &str = "https://auth.demo.example";

/// The sample's policies, gateways and external services, with the ingress
/// gateway's certificate (`secret`: the Secret's `stringData` lines) and
/// the end-user tokens' key set (`jwks`, JSON).
fn config(secret: &str, jwks: &str) -> String {
    format!(
        r#"---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: sample}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: helloworld, namespace: sample}}
spec:
  selector: {{matchLabels: {{app: helloworld}}}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/sample/sa/test
        - cluster.local/ns/istio-system/sa/mesh-node-node-1
  # From outside, through the ingress gateway: only with an end-user JWT,
  # checked by helloworld's node agent, not by the gateway.
  - from:
    - source:
        principals: [cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account]
        requestPrincipals: ["{ISSUER}/*"]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: helloworld, namespace: sample}}
spec:
  selector: {{matchLabels: {{app: helloworld}}}}
  jwtRules:
  - issuer: "{ISSUER}"
    audiences: [helloworld]
    jwks: '{jwks}'
---
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
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: helloworld-ingress, namespace: sample}}
spec:
  hosts: ["*"]
  gateways: [istio-system/ingress]
  http:
  - match: [{{uri: {{prefix: /helloworld}}}}]
    route: [{{destination: {{host: helloworld, port: {{number: 9095}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: direct, namespace: sample}}
spec:
  hosts: [direct.example]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  location: MESH_EXTERNAL
  endpoints: [{{address: {EXTERNAL_IP}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external, namespace: sample}}
spec:
  hosts: [external.example]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  location: MESH_EXTERNAL
  endpoints: [{{address: {EXTERNAL_IP}}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: egress, namespace: istio-system}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: [external.example]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: external-via-egress, namespace: sample}}
spec:
  hosts: [external.example]
  gateways: [istio-system/egress, mesh]
  http:
  - match: [{{gateways: [mesh], port: 80}}]
    route: [{{destination: {{host: istio-egressgateway.istio-system.svc.cluster.local, port: {{number: 80}}}}}}]
  - match: [{{gateways: [istio-system/egress], port: 80}}]
    route: [{{destination: {{host: external.example, port: {{number: 80}}}}}}]
"#
    )
}

struct Demo {
    cluster: Cluster,
    outside: Pod,
    node1: Pod,
    node2: Pod,
}

impl Demo {
    fn netns(&self, from: From) -> &Pod {
        match from {
            From::Pod(p) => self.cluster.pod(p),
            From::Outside => &self.outside,
            From::Node1 => &self.node1,
            From::Node2 => &self.node2,
        }
    }

    /// Runs a step: (status, first line of the answer or the error).
    fn run(&self, step: &Step) -> (u16, String) {
        let ns = self.netns(step.from);
        match &step.action {
            Action::Curl(args) => {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                // In the pod's cgroup too, as its processes would be.
                let c = clients::curl(|a| ns.cmd(a), &args);
                (c.code, if c.code == 0 { c.stderr } else { c.body })
            }
            Action::Grpc(uri) => {
                let uri = uri.to_string();
                match ns.run(move || clients::grpc_unary(uri, "hi")) {
                    Ok(text) => (200, text),
                    Err(e) => (0, e),
                }
            }
            Action::WebSocket(url) => {
                let url = url.to_string();
                match ns.run(move || clients::websocket_echo(url, "hello over the mesh")) {
                    Ok(text) => (200, text),
                    Err(e) => (0, e),
                }
            }
            Action::Tcp(addr) => {
                let addr = *addr;
                let payload: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
                let sent = payload.clone();
                match ns.run(move || clients::tcp_echo(addr, &sent)) {
                    Ok(back) if back == payload => (200, "64 KiB echoed intact".into()),
                    Ok(back) => (0, format!("{} of {} bytes came back changed", back.len(), payload.len())),
                    Err(e) => (0, e.to_string()),
                }
            }
        }
    }
}

pub fn run(keep: bool) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads eBPF: run it as root (sudo cargo xtask demo)");
    }
    crate::run(Command::new("cargo").args(["build", "--package", "mesh-agent"]))?;
    let f = fixture();
    let objects = f.yaml("");
    let cluster = f.cluster;
    for hello in ["helloworld-v1", "helloworld-v2"] {
        servers::http_hello(cluster.pod(hello), 9095);
        servers::echo(cluster.pod(hello), 7000);
    }
    servers::websocket_echo(cluster.pod("helloworld-v1"), 8090);
    grpc::serve(cluster.pod("helloworld-v1"), 9090);
    servers::http_api(cluster.pod("test"), 9095);
    // Outside the cluster: a web server on 172.18.200.2, in the cluster network.
    let ok = cluster.net_cmd(&["ip", "addr", "add", &format!("{EXTERNAL_IP}/32"), "dev", "lo"]).status.success();
    if !ok {
        bail!("could not add {EXTERNAL_IP} to the cluster network namespace");
    }
    let outside = Pod::namespace("external", EXTERNAL_IP, &cluster.net_ns);
    servers::http_hello(&outside, 80);
    let node1 = Pod::namespace("node-1", cluster.nodes[0].ip, &cluster.nodes[0].ns);
    let node2 = Pod::namespace("node-2", cluster.nodes[1].ip, &cluster.nodes[1].ns);
    let certs = Certs::new(&cluster.id);
    let (crt, key) = certs.server("hello", "hello.example.com");
    let secret = format!("  tls.crt: |\n{}  tls.key: |\n{}", Certs::yaml_block(&crt, 4), Certs::yaml_block(&key, 4));
    // An identity provider's key, and a token it signed for an end user.
    let signer = mesh_tests::jwt::Signer::ec("demo-1");
    let exp = mesh_tests::jwt::now() + 3600;
    let claims = serde_json::json!({"iss": ISSUER, "sub": "alice", "aud": "helloworld", "exp": exp});
    let token = signer.sign(&claims);
    // Mallory's claims under alice's signature.
    let mallory = serde_json::json!({"iss": ISSUER, "sub": "mallory", "aud": "helloworld", "exp": exp});
    let forged = mesh_tests::jwt::with_signature_of(&signer.sign(&mallory), &token);
    let cfg = format!("{objects}{}", config(&secret, &mesh_tests::jwt::jwks(&[&signer])));
    println!(
        "node-1 {} (172.18.0.2): istio-ingressgateway (LB {INGRESS}), test, helloworld-v2, sleep",
        cluster.node_ns
    );
    println!("node-2 {} (172.18.1.2): istio-egressgateway, helloworld-v1", cluster.nodes[1].ns);
    println!("outside: clients and external.example ({EXTERNAL_IP}) in {}", cluster.net_ns);
    let ca = CaService::start(&cluster, &cfg);
    println!("mesh CA service on {} (root and node tokens in {})", ca.addr, ca.ca_dir().display());
    let agents: Vec<Agent> =
        (0..2).map(|i| Agent::start_on(&cluster, i, &cfg, &ca.agent_args(&cluster.nodes[i].name))).collect();
    for (a, n) in agents.iter().zip(&cluster.nodes) {
        println!("mesh-agent ready on {} (log {})", n.name, a.log.display());
    }
    let demo = Demo { cluster, outside, node1, node2 };
    let ca_path = certs.ca().display().to_string();
    println!("\n{:<36} {:<9} {:<44} {:<42} {:<8} {:>9}", "step", "protocol", "path", "identities", "status", "latency");
    let mut unexpected = 0;
    let began = Instant::now();
    for step in steps(&ca_path, &token, &forged) {
        let start = Instant::now();
        let (code, text) = demo.run(&step);
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        let ok = code == step.want && text.contains(step.want_text);
        unexpected += usize::from(!ok);
        let status = match (code, ok) {
            (0, true) => "refused".to_owned(),
            (c, true) => c.to_string(),
            (0, false) => "FAILED".to_owned(),
            (c, false) => format!("{c}!"),
        };
        println!(
            "{:<36} {:<9} {:<44} {:<42} {status:<8} {ms:>7.1}ms",
            step.name, step.protocol, step.path, step.identities
        );
        println!("    {}", text.lines().next().unwrap_or("").trim());
    }
    print_metrics(&demo, &agents);
    write_graph(&agents, began.elapsed().as_secs_f64())?;
    if keep {
        let c = &demo.cluster;
        println!("\nleft running; try:");
        println!("  TOKEN={token}");
        println!(
            "  ip netns exec {} curl -H \"Authorization: Bearer $TOKEN\" http://{INGRESS}/helloworld   # ingress",
            c.net_ns
        );
        println!("  ip netns exec {}-test curl http://10.96.0.10:9095/", c.id);
        println!(
            "  ip netns exec {}-test curl --resolve external.example:80:{EXTERNAL_IP} http://external.example/",
            c.id
        );
        println!("  ip netns exec {} curl http://10.96.0.10:9095/    # a host process on node-1", c.node_ns);
        println!("  ip netns exec {} curl -s 127.0.0.1:15000/config_dump     # state, certificates", c.node_ns);
        println!("  ip netns exec {} tcpdump -ni any port 15008              # only mTLS between nodes", c.net_ns);
        println!("press Ctrl-C to tear everything down");
        wait_for_ctrl_c();
    }
    drop(agents);
    drop(ca);
    drop(certs);
    drop(demo);
    println!("\ntorn down: agents and CA stopped, namespaces removed");
    if unexpected > 0 {
        bail!("{unexpected} demo step(s) did not behave as expected");
    }
    Ok(())
}

fn print_metrics(demo: &Demo, agents: &[Agent]) {
    let node1 = agents[0].wait_metrics(5, "requests", |m| {
        metric(m, "istio_requests_total", &[("connection_security_policy", "mutual_tls")]) >= 2.0
    });
    let pick = |text: &str, prefix: &str, needles: &[&str]| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(prefix) && needles.iter().any(|n| l.contains(n)))
            .map(|l| format!("  {l}"))
            .collect()
    };
    println!("\nnode-1 request metrics (http://127.0.0.1:15000/metrics in {}):", demo.cluster.node_ns);
    let keys = [
        "destination_service=\"helloworld",
        "BlackHoleCluster",
        "direct.example",
        "source_workload=\"istio-ingressgateway\"",
        "istio-egressgateway.istio-system",
    ];
    for l in pick(&node1, "istio_requests_total", &keys) {
        println!("{l}");
    }
    let node2 = agents[1].metrics();
    println!("\nnode-2: the egress gateway's requests, and tunnels it accepted:");
    for l in pick(&node2, "istio_requests_total", &["source_workload=\"istio-egressgateway\""]) {
        println!("{l}");
    }
    for l in pick(&node2, "istio_tcp_connections_opened_total", &["reporter=\"destination\""]) {
        println!("{l}");
    }
}

/// The service graph of the demo's calls, from both agents' metrics.
fn write_graph(agents: &[Agent], secs: f64) -> anyhow::Result<()> {
    let texts: Vec<String> = agents.iter().map(Agent::metrics).collect();
    let graph = mesh_tests::graph::from_metrics(&texts);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/demo");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("service-graph.svg");
    std::fs::write(&path, mesh_tests::graph::svg(&graph, secs, "cargo xtask demo: who called whom"))?;
    println!(
        "
service graph ({} edges, from the metrics): {}",
        graph.len(),
        path.display()
    );
    Ok(())
}

fn wait_for_ctrl_c() {
    // Block SIGINT and wait for it, so Drop impls run and clean up afterwards.
    // SAFETY: plain signal-mask calls on this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}
