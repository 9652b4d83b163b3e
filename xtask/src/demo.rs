//! `cargo xtask demo`: the pattern's sample on one node. A node namespace with a
//! `test` pod and a `helloworld` pod serving on 9095, both enrolled in the mesh;
//! the agent captures test's calls to the helloworld Service and pod IP.
use std::{net::Ipv4Addr, process::Command, time::Instant};

use anyhow::bail;
use mesh_tests::{Agent, Cluster, agent::metric, servers};

const CONFIG: &str = r#"apiVersion: v1
kind: Node
metadata: {name: node-1, labels: {kubernetes.io/hostname: node-1}}
status: {addresses: [{type: InternalIP, address: 172.18.0.2}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: sample, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: test, namespace: sample, labels: {app: test}}
spec: {nodeName: node-1, serviceAccountName: test}
status: {podIP: 10.244.0.2, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: helloworld-v1-6c7d8f9b5-k2x4q, namespace: sample, labels: {app: helloworld, version: v1},
  ownerReferences: [{kind: ReplicaSet, name: helloworld-v1-6c7d8f9b5, controller: true}]}
spec:
  nodeName: node-1
  serviceAccountName: helloworld
  containers: [{name: helloworld, ports: [{name: http, containerPort: 9095}]}]
status: {podIP: 10.244.0.3, phase: Running, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: helloworld, namespace: sample}
spec:
  clusterIP: 10.96.0.10
  selector: {app: helloworld}
  ports: [{name: http, port: 9095, targetPort: http}]
"#;

pub fn run(keep: bool) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads eBPF: run it as root (sudo cargo xtask demo)");
    }
    crate::run(Command::new("cargo").args(["build", "--package", "mesh-agent"]))?;
    let mut cluster = Cluster::new();
    cluster.add_pod("test", Ipv4Addr::new(10, 244, 0, 2));
    cluster.add_pod("helloworld", Ipv4Addr::new(10, 244, 0, 3));
    servers::http_hello(cluster.pod("helloworld"), 9095);
    println!(
        "node {} (InternalIP {}), pods: test 10.244.0.2, helloworld 10.244.0.3:9095",
        cluster.node_ns, cluster.node_ip
    );
    let agent = Agent::start(&cluster, CONFIG);
    println!("mesh-agent ready in {} (log {})\n", cluster.node_ns, agent.log.display());

    println!("{:<34} {:<9} {:<46} {:<7} {:>9}", "step", "protocol", "path", "status", "latency");
    let steps = [
        ("test → helloworld Service (VIP)", "http://10.96.0.10:9095/hello"),
        ("test → helloworld Service again", "http://10.96.0.10:9095/hello"),
        ("test → helloworld pod IP", "http://10.244.0.3:9095/hello"),
    ];
    let mut failed = 0;
    for (step, url) in steps {
        let start = Instant::now();
        let out = cluster.pod("test").cmd(&["curl", "-sS", "--max-time", "5", url]);
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let status = if out.status.success() { "ok" } else { "FAILED" };
        failed += usize::from(!out.status.success());
        println!(
            "{step:<34} {:<9} {:<46} {status:<7} {ms:>7.1}ms",
            "HTTP/1.1", "test → eBPF → agent:15001 → helloworld:9095"
        );
        println!("    {}", if body.is_empty() { String::from_utf8_lossy(&out.stderr).trim().to_owned() } else { body });
    }
    let m = agent.wait_metrics(5, "connections closed", |m| {
        metric(m, "istio_tcp_connections_closed_total", &[("source_workload", "test")]) >= 3.0
            && metric(m, "mesh_ebpf_packets_total", &[("counter", "assigned_outbound")]) >= 3.0
    });
    println!("\nmetrics (http://127.0.0.1:15000/metrics in {}):", cluster.node_ns);
    for line in
        m.lines().filter(|l| l.starts_with("istio_tcp_connections_opened") || l.starts_with("mesh_ebpf_packets"))
    {
        println!("  {line}");
    }
    if keep {
        println!("\nleft running; try:");
        println!("  ip netns exec {}-test curl http://10.96.0.10:9095/", cluster.id);
        println!("  ip netns exec {} curl -s 127.0.0.1:15000/config_dump", cluster.node_ns);
        println!("press Ctrl-C to tear everything down");
        wait_for_ctrl_c();
    }
    drop(agent);
    drop(cluster);
    println!("\ntorn down: agent stopped, namespaces removed");
    if failed > 0 {
        bail!("{failed} demo step(s) failed");
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
