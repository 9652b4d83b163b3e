//! `cargo xtask demo`: the pattern's sample on two nodes. `test` (node-1) calls
//! the `helloworld` Service, whose v1 pod runs on node-2 (reached over HBONE:
//! mTLS between the node agents with both workloads' SPIFFE identities) and v2
//! on node-1 (same node). The mesh CA runs as a service in the cluster network;
//! the agents hold no CA key. PeerAuthentication STRICT turns away a plaintext
//! client from outside the mesh, and an AuthorizationPolicy admits only
//! `sample/test` to helloworld, so `sleep` in another namespace is refused.
use std::{net::Ipv4Addr, process::Command, time::Instant};

use anyhow::bail;
use mesh_tests::{
    Agent, Cluster,
    agent::{CaService, metric},
    servers,
};

const CONFIG: &str = r#"apiVersion: v1
kind: Node
metadata: {name: node-1, labels: {kubernetes.io/hostname: node-1}}
status: {addresses: [{type: InternalIP, address: 172.18.0.2}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-2, labels: {kubernetes.io/hostname: node-2}}
status: {addresses: [{type: InternalIP, address: 172.18.1.2}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: sample, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: test, namespace: sample, labels: {app: test}}
spec: {nodeName: node-1, serviceAccountName: test}
status: {podIP: 10.244.1.2, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: other, labels: {app: sleep}}
spec: {nodeName: node-1, serviceAccountName: sleep}
status: {podIP: 10.244.1.4, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: helloworld-v1, namespace: sample, labels: {app: helloworld, version: v1}}
spec:
  nodeName: node-2
  serviceAccountName: helloworld
  containers: [{name: helloworld, ports: [{name: http, containerPort: 9095}]}]
status: {podIP: 10.244.2.2, phase: Running, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: helloworld-v2, namespace: sample, labels: {app: helloworld, version: v2}}
spec:
  nodeName: node-1
  serviceAccountName: helloworld
  containers: [{name: helloworld, ports: [{name: http, containerPort: 9095}]}]
status: {podIP: 10.244.1.3, phase: Running, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: helloworld, namespace: sample}
spec:
  clusterIP: 10.96.0.10
  selector: {app: helloworld}
  ports: [{name: http, port: 9095, targetPort: http}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: sample}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: helloworld, namespace: sample}
spec:
  selector: {matchLabels: {app: helloworld}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/sample/sa/test]}}]}]
"#;

struct Step {
    name: &'static str,
    /// `None`: from the cluster network (outside the mesh).
    client: Option<&'static str>,
    url: &'static str,
    path: &'static str,
    identities: &'static str,
    expect_ok: bool,
}

const STEPS: &[Step] = &[
    Step {
        name: "test → helloworld Service",
        client: Some("test"),
        url: "http://10.96.0.10:9095/hello",
        path: "eBPF → agent → (mTLS :15008 | same node) → pod",
        identities: "sample/sa/test → sample/sa/helloworld",
        expect_ok: true,
    },
    Step {
        name: "test → helloworld Service again",
        client: Some("test"),
        url: "http://10.96.0.10:9095/hello",
        path: "round robin: the other version",
        identities: "sample/sa/test → sample/sa/helloworld",
        expect_ok: true,
    },
    Step {
        name: "test → helloworld-v1 pod IP",
        client: Some("test"),
        url: "http://10.244.2.2:9095/hello",
        path: "node-1 agent → mTLS → node-2 agent → pod",
        identities: "sample/sa/test → sample/sa/helloworld",
        expect_ok: true,
    },
    Step {
        name: "outside client → helloworld-v1",
        client: None,
        url: "http://10.244.2.2:9095/hello",
        path: "uplink → agent:15006: STRICT refuses",
        identities: "(plaintext) → sample/sa/helloworld",
        expect_ok: false,
    },
    Step {
        name: "sleep → helloworld Service",
        client: Some("sleep"),
        url: "http://10.96.0.10:9095/hello",
        path: "AuthorizationPolicy: only sa/test → 403",
        identities: "other/sa/sleep → sample/sa/helloworld",
        expect_ok: false,
    },
];

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
    servers::http_hello(cluster.pod("helloworld-v1"), 9095);
    servers::http_hello(cluster.pod("helloworld-v2"), 9095);
    println!("node-1 {} (172.18.0.2): test 10.244.1.2, helloworld-v2 10.244.1.3, sleep 10.244.1.4", cluster.node_ns);
    println!("node-2 {} (172.18.1.2): helloworld-v1 10.244.2.2", cluster.nodes[1].ns);
    let ca = CaService::start(&cluster, CONFIG);
    println!(
        "mesh CA service on {} in {} (root and node tokens in {})",
        ca.addr,
        cluster.net_ns,
        ca.ca_dir().display()
    );
    let agents: Vec<Agent> =
        (0..2).map(|i| Agent::start_on(&cluster, i, CONFIG, &ca.agent_args(&cluster.nodes[i].name))).collect();
    for (a, n) in agents.iter().zip(&cluster.nodes) {
        println!("mesh-agent ready on {} (log {})", n.name, a.log.display());
    }
    println!("\n{:<32} {:<9} {:<47} {:<40} {:<9} {:>9}", "step", "protocol", "path", "identities", "status", "latency");
    let mut unexpected = 0;
    for step in STEPS {
        // -f: an HTTP error status (a policy's 403) counts as refused.
        let args = ["curl", "-sSf", "--max-time", "5", step.url];
        let start = Instant::now();
        let out = match step.client {
            Some(pod) => cluster.pod(pod).cmd(&args),
            None => cluster.net_cmd(&args),
        };
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        let ok = out.status.success();
        let status = match (ok, step.expect_ok) {
            (true, true) => "ok",
            (false, false) => "refused",
            (true, false) => "ADMITTED",
            (false, true) => "FAILED",
        };
        unexpected += usize::from(ok != step.expect_ok);
        println!(
            "{:<32} {:<9} {:<47} {:<40} {status:<9} {ms:>7.1}ms",
            step.name, "HTTP/1.1", step.path, step.identities
        );
        let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        println!("    {}", if body.is_empty() { String::from_utf8_lossy(&out.stderr).trim().to_owned() } else { body });
    }
    let source = agents[0].wait_metrics(5, "requests", |m| {
        metric(m, "istio_requests_total", &[("connection_security_policy", "mutual_tls")]) >= 2.0
    });
    println!("\nnode-1 (source) request metrics (http://127.0.0.1:15000/metrics in {}):", cluster.node_ns);
    for line in source.lines().filter(|l| l.starts_with("istio_requests_total")) {
        println!("  {line}");
    }
    let dest = agents[1].metrics();
    println!("\nnode-2 (destination) tunnel metrics (in {}):", cluster.nodes[1].ns);
    for line in dest
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened") || l.starts_with("mesh_tcp_connection_failures"))
    {
        println!("  {line}");
    }
    if keep {
        println!("\nleft running; try:");
        println!("  ip netns exec {}-test curl http://10.96.0.10:9095/", cluster.id);
        println!("  ip netns exec {} curl http://10.244.2.2:9095/   # outside the mesh: refused", cluster.net_ns);
        println!("  ip netns exec {} curl -s 127.0.0.1:15000/config_dump   # certificates", cluster.nodes[1].ns);
        println!("  ip netns exec {} tcpdump -ni any port 15008   # only mTLS between nodes", cluster.net_ns);
        println!("press Ctrl-C to tear everything down");
        wait_for_ctrl_c();
    }
    drop(agents);
    drop(ca);
    drop(cluster);
    println!("\ntorn down: agents and CA stopped, namespaces removed");
    if unexpected > 0 {
        bail!("{unexpected} demo step(s) did not behave as expected");
    }
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
