//! `cargo xtask demo`: the whole pattern on two nodes built from network
//! namespaces, with the mesh CA as a service and one agent per node.
//!
//! - inter-service: `test` → `helloworld` (v1 on node-2 over mTLS/HBONE, v2 on
//!   node-1), `helloworld-v1` → `test` over HTTP/2, gRPC, WebSocket and TCP;
//! - ingress: `http://<node-1>:80/helloworld` and HTTPS with a Secret's
//!   certificate, from a client outside the mesh;
//! - egress: REGISTRY_ONLY; a ServiceEntry host straight out from node-1, an
//!   unknown host refused, and `external.example` through the egress gateway
//!   on node-2 (the only node that then talks to the outside);
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
    clients, grpc, servers,
};

const NODE1: &str = "172.18.0.2";
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 200, 2);

fn config(secret: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: node-1, labels: {{istio: ingressgateway}}}}
status: {{addresses: [{{type: InternalIP, address: 172.18.0.2}}]}}
---
apiVersion: v1
kind: Node
metadata: {{name: node-2, labels: {{istio: egressgateway}}}}
status: {{addresses: [{{type: InternalIP, address: 172.18.1.2}}]}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: sample, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: other, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: test, namespace: sample, labels: {{app: test}}}}
spec: {{nodeName: node-1, serviceAccountName: test}}
status: {{podIP: 10.244.1.2, phase: Running}}
---
apiVersion: v1
kind: Pod
metadata: {{name: sleep, namespace: other, labels: {{app: sleep}}}}
spec: {{nodeName: node-1, serviceAccountName: sleep}}
status: {{podIP: 10.244.1.4, phase: Running}}
---
apiVersion: v1
kind: Pod
metadata: {{name: helloworld-v1, namespace: sample, labels: {{app: helloworld, version: v1}}}}
spec: {{nodeName: node-2, serviceAccountName: helloworld}}
status: {{podIP: 10.244.2.2, phase: Running, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: helloworld-v2, namespace: sample, labels: {{app: helloworld, version: v2}}}}
spec: {{nodeName: node-1, serviceAccountName: helloworld}}
status: {{podIP: 10.244.1.3, phase: Running, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: helloworld, namespace: sample}}
spec:
  clusterIP: 10.96.0.10
  selector: {{app: helloworld}}
  ports: [{{name: http, port: 9095}}, {{name: tcp-echo, port: 7000}}]
---
apiVersion: v1
kind: Service
metadata: {{name: test, namespace: sample}}
spec:
  clusterIP: 10.96.0.20
  selector: {{app: test}}
  ports: [{{name: http, port: 9095}}]
---
apiVersion: v1
kind: Service
metadata: {{name: ws, namespace: sample}}
spec:
  clusterIP: 10.96.0.13
  selector: {{app: helloworld, version: v1}}
  ports: [{{name: http-ws, port: 80, targetPort: 8090}}]
---
apiVersion: v1
kind: Service
metadata: {{name: grpc, namespace: sample}}
spec:
  clusterIP: 10.96.0.14
  selector: {{app: helloworld, version: v1}}
  ports: [{{name: grpc, port: 80, targetPort: 9090}}]
---
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
        - cluster.local/ns/istio-system/sa/ingress
        - cluster.local/ns/istio-system/sa/mesh-node-node-1
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
    route: [{{destination: {{host: egress.istio-system.svc.cluster.local, port: {{number: 80}}}}}}]
  - match: [{{gateways: [istio-system/egress], port: 80}}]
    route: [{{destination: {{host: external.example, port: {{number: 80}}}}}}]
"#
    )
}

/// Where a step's client runs.
#[derive(Clone, Copy)]
enum From {
    Pod(&'static str),
    /// The cluster network: outside the mesh and the nodes.
    Outside,
    /// node-1's own network namespace (a host-network process).
    Node1,
    /// node-2's own network namespace.
    Node2,
}

/// What a step expects: an HTTP status (0: the connection is refused), and
/// text the answer must contain.
struct Step {
    name: &'static str,
    protocol: &'static str,
    from: From,
    path: &'static str,
    identities: &'static str,
    want: u16,
    want_text: &'static str,
    action: Action,
}

enum Action {
    Curl(Vec<String>),
    Grpc(&'static str),
    WebSocket(&'static str),
    Tcp(SocketAddr),
}

fn steps(ca: &str) -> Vec<Step> {
    let curl = |args: &[&str]| Action::Curl(args.iter().map(|s| s.to_string()).collect());
    let resolve = |host: &str| format!("{host}:80:{EXTERNAL_IP}");
    vec![
        Step {
            name: "test → helloworld",
            protocol: "HTTP/1.1",
            from: From::Pod("test"),
            path: "eBPF → agent → v1 over mTLS, or v2 locally",
            identities: "sample/test → sample/helloworld",
            want: 200,
            want_text: "hello from helloworld",
            action: curl(&["http://10.96.0.10:9095/hello"]),
        },
        Step {
            name: "test → helloworld again",
            protocol: "HTTP/1.1",
            from: From::Pod("test"),
            path: "round robin (per worker thread): v1 or v2",
            identities: "sample/test → sample/helloworld",
            want: 200,
            want_text: "hello from helloworld",
            action: curl(&["http://10.96.0.10:9095/hello"]),
        },
        Step {
            name: "helloworld-v1 → test",
            protocol: "HTTP/2",
            from: From::Pod("helloworld-v1"),
            path: "h2c, node-2 → mTLS → node-1",
            identities: "sample/helloworld → sample/test",
            want: 200,
            want_text: "HTTP/2.0",
            action: curl(&["--http2-prior-knowledge", "http://10.96.0.20:9095/hello"]),
        },
        Step {
            name: "test → grpc (test.Echo/Unary)",
            protocol: "gRPC",
            from: From::Pod("test"),
            path: "tonic client → mTLS → tonic server",
            identities: "sample/test → sample/helloworld",
            want: 200,
            want_text: "helloworld-v1: hi",
            action: Action::Grpc("http://10.96.0.14:80"),
        },
        Step {
            name: "test → ws (echo)",
            protocol: "WebSocket",
            from: From::Pod("test"),
            path: "Upgrade through the mesh",
            identities: "sample/test → sample/helloworld",
            want: 200,
            want_text: "over the mesh",
            action: Action::WebSocket("ws://10.96.0.13/echo"),
        },
        Step {
            name: "test → helloworld:7000 (echo)",
            protocol: "TCP",
            from: From::Pod("test"),
            path: "bytes both ways, half-close",
            identities: "sample/test → sample/helloworld",
            want: 200,
            want_text: "64 KiB echoed",
            action: Action::Tcp(SocketAddr::from(([10, 96, 0, 10], 7000))),
        },
        Step {
            name: "outside → http://node-1/helloworld",
            protocol: "HTTP/1.1",
            from: From::Outside,
            path: "ingress Gateway :80 → mTLS → helloworld",
            identities: "istio-system/ingress → sample/helloworld",
            want: 200,
            want_text: "hello from helloworld",
            action: curl(&[&format!("http://{NODE1}:80/helloworld")]),
        },
        Step {
            name: "outside → https://hello.example.com",
            protocol: "HTTPS",
            from: From::Outside,
            path: "Gateway :443, Secret's certificate",
            identities: "istio-system/ingress → sample/helloworld",
            want: 200,
            want_text: "hello from helloworld",
            action: curl(&[
                "--cacert",
                ca,
                "--resolve",
                &format!("hello.example.com:443:{NODE1}"),
                "https://hello.example.com/helloworld",
            ]),
        },
        Step {
            name: "outside → http://node-1/nothing",
            protocol: "HTTP/1.1",
            from: From::Outside,
            path: "ingress Gateway: no route → 404",
            identities: "-",
            want: 404,
            want_text: "",
            action: curl(&[&format!("http://{NODE1}/nothing")]),
        },
        Step {
            name: "test → direct.example",
            protocol: "HTTP/1.1",
            from: From::Pod("test"),
            path: "ServiceEntry: out from node-1 as the pod",
            identities: "sample/test → (external)",
            want: 200,
            want_text: "client 10.244.1.2",
            action: curl(&["--resolve", &resolve("direct.example"), "http://direct.example/"]),
        },
        Step {
            name: "test → 172.18.200.3 (unknown)",
            protocol: "HTTP/1.1",
            from: From::Pod("test"),
            path: "REGISTRY_ONLY: BlackHoleCluster → 502",
            identities: "sample/test → -",
            want: 502,
            want_text: "REGISTRY_ONLY",
            action: curl(&["http://172.18.200.3/"]),
        },
        Step {
            name: "test → external.example",
            protocol: "HTTP/1.1",
            from: From::Pod("test"),
            path: "mTLS → egress Gateway (node-2) → out",
            identities: "sample/test → istio-system/egress",
            want: 200,
            want_text: "client 172.18.1.2",
            action: curl(&["--resolve", &resolve("external.example"), "http://external.example/"]),
        },
        Step {
            name: "node-1 host process → helloworld",
            protocol: "HTTP/1.1",
            from: From::Node1,
            path: "cgroup/connect4 → agent → mesh",
            identities: "istio-system/mesh-node-node-1 → …",
            want: 200,
            want_text: "hello from helloworld",
            action: curl(&["http://10.96.0.10:9095/hello"]),
        },
        Step {
            name: "node-2 host process → hw-v1 pod",
            protocol: "HTTP/1.1",
            from: From::Node2,
            path: "no way around: agent as node-2 → 403",
            identities: "istio-system/mesh-node-node-2 → …",
            want: 403,
            want_text: "RBAC: access denied",
            action: curl(&["http://10.244.2.2:9095/hello"]),
        },
        Step {
            name: "outside → helloworld-v1 pod",
            protocol: "HTTP/1.1",
            from: From::Outside,
            path: "uplink → agent:15006: STRICT refuses",
            identities: "(plaintext) → sample/helloworld",
            want: 0,
            want_text: "",
            action: curl(&["http://10.244.2.2:9095/hello"]),
        },
        Step {
            name: "sleep → helloworld",
            protocol: "HTTP/1.1",
            from: From::Pod("sleep"),
            path: "AuthorizationPolicy → 403",
            identities: "other/sleep → sample/helloworld",
            want: 403,
            want_text: "RBAC: access denied",
            action: curl(&["http://10.96.0.10:9095/hello"]),
        },
    ]
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
    let mut cluster = Cluster::two_nodes();
    cluster.add_pod_on(0, "test", Ipv4Addr::new(10, 244, 1, 2));
    cluster.add_pod_on(0, "helloworld-v2", Ipv4Addr::new(10, 244, 1, 3));
    cluster.add_pod_on(0, "sleep", Ipv4Addr::new(10, 244, 1, 4));
    cluster.add_pod_on(1, "helloworld-v1", Ipv4Addr::new(10, 244, 2, 2));
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
    let cfg = config(&secret);
    println!("node-1 {} (172.18.0.2, ingress gateway): test, helloworld-v2, sleep", cluster.node_ns);
    println!("node-2 {} (172.18.1.2, egress gateway): helloworld-v1", cluster.nodes[1].ns);
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
    for step in steps(&ca_path) {
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
    if keep {
        let c = &demo.cluster;
        println!("\nleft running; try:");
        println!("  ip netns exec {} curl http://{NODE1}/helloworld           # ingress", c.net_ns);
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
        "source_workload=\"ingress\"",
        "egress.istio-system",
    ];
    for l in pick(&node1, "istio_requests_total", &keys) {
        println!("{l}");
    }
    let node2 = agents[1].metrics();
    println!("\nnode-2: the egress gateway's requests, and tunnels it accepted:");
    for l in pick(&node2, "istio_requests_total", &["source_workload=\"egress\""]) {
        println!("{l}");
    }
    for l in pick(&node2, "istio_tcp_connections_opened_total", &["reporter=\"destination\""]) {
        println!("{l}");
    }
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
