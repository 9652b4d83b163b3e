//! A new pod is captured from its first packet, without the CNI plugin
//! (root): for each of 100 pods, clients start before the pod's interface
//! exists and keep connecting while it is wired, in both directions — the
//! pod calling a server outside the mesh (REGISTRY_ONLY) and a meshed pod
//! whose AuthorizationPolicy denies it, and a server in the pod called in
//! plaintext (STRICT) from outside the node and from a node process. Not
//! one connection may reach its server around the agent; each client must
//! see the agent (the positive control: the pod is captured, not merely cut
//! off). Before the agent's programs are attached, the pod gate (nftables,
//! `capture::gate`) drops the pod's packets.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use mesh_tests::{
    Agent,
    fixture::{Fixture, PodSpec, REGISTRY_ONLY},
    netns::enter_and_spawn,
    require_root,
};

const PODS: u8 = 100;
/// Outside the mesh: the `net` namespace's side of node-1's uplink.
const OUTSIDE: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(172, 18, 0, 1)), 7070);
const HELLO: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 244, 0, 3)), 9095);
const POD_PORT: u16 = 8080;

fn new_pod_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, 10 + i)
}

/// What one client saw: dropped (no answer), captured (the agent answered
/// and closed or held it), passed (the real server's banner: a bypass).
#[derive(Default)]
struct Outcomes {
    dropped: AtomicU64,
    captured: AtomicU64,
    passed: AtomicU64,
}

/// A server that writes `banner` on every connection.
fn banner_server(netns: &str, addr: SocketAddr, banner: &'static str, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    enter_and_spawn(netns, move || {
        let l = TcpListener::bind(addr).unwrap();
        l.set_nonblocking(true).unwrap();
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.write_all(banner.as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    })
}

/// What one connection to `to` met, its connect waiting up to `connect`.
fn attempt(to: SocketAddr, connect: Duration) -> Outcome {
    let Ok(mut s) = TcpStream::connect_timeout(&to, connect) else { return Outcome::Dropped };
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    match s.read(&mut [0; 16]) {
        Ok(n) if n > 0 => Outcome::Passed,
        _ => Outcome::Captured,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Dropped,
    Captured,
    Passed,
}

/// Connects to `to` from `netns` again and again until `stop`.
fn client(netns: &str, to: SocketAddr, stop: Arc<AtomicBool>) -> (JoinHandle<()>, Arc<Outcomes>) {
    let out = Arc::new(Outcomes::default());
    let seen = out.clone();
    let t = enter_and_spawn(netns, move || {
        while !stop.load(Ordering::Relaxed) {
            let counter = match attempt(to, Duration::from_millis(10)) {
                Outcome::Dropped => {
                    // No route yet (the pod's interface is being made): fails at once.
                    std::thread::sleep(Duration::from_millis(1));
                    &seen.dropped
                }
                Outcome::Captured => &seen.captured,
                Outcome::Passed => &seen.passed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    (t, out)
}

fn cluster() -> Fixture {
    let mut f = Fixture::one_node();
    // The pods' range, as a Node's spec.podCIDR gives it (host-local IPAM).
    f.objects.pod_cidr("node-1", "10.244.0.0/24");
    let hello = PodSpec::app("demo", &[("app", "hello")]);
    f.add_pod(0, "hello", Ipv4Addr::new(10, 244, 0, 3), hello);
    for i in 0..PODS {
        // Declared, but their namespaces and interfaces made later.
        f.objects.pod("node-1", &format!("p{i}"), new_pod_ip(i), PodSpec::app("demo", &[("app", "newpod")]));
    }
    f
}

/// STRICT, and the two denials; with [`REGISTRY_ONLY`].
const POLICY: &str = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: not-newpods, namespace: demo}
spec:
  selector: {matchLabels: {app: hello}}
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/demo/sa/newpod"]}}]}]
---
# Node processes reach meshed pods through the agent with the node's
# identity: denied here, so that a banner can only come around the agent.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: not-the-node, namespace: demo}
spec:
  selector: {matchLabels: {app: newpod}}
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/istio-system/sa/mesh-node-node-1"]}}]}]
"#;

fn policy() -> String {
    format!("{REGISTRY_ONLY}---\n{POLICY}")
}

#[test]
fn a_new_pod_is_captured_from_its_first_packet_in_both_directions() {
    if !require_root("a_new_pod_is_captured_from_its_first_packet_in_both_directions") {
        return;
    }
    let mut c = cluster();
    let stop_servers = Arc::new(AtomicBool::new(false));
    let outside = banner_server(&c.net_ns, OUTSIDE, "outside\n", stop_servers.clone());
    let hello = banner_server(&c.pod("hello").netns.clone(), HELLO, "hello\n", stop_servers.clone());
    let agent = Agent::start(&c, &c.yaml(&policy()));
    let node_ns = c.node_ns.clone();
    let net_ns = c.net_ns.clone();
    let started = Instant::now();
    for i in 0..PODS {
        let name = format!("p{i}");
        let ip = new_pod_ip(i);
        let netns = c.add_sandbox(0, &name, ip).netns.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let server = banner_server(&netns, SocketAddr::from((Ipv4Addr::UNSPECIFIED, POD_PORT)), "pod\n", stop.clone());
        let to_pod = SocketAddr::from((ip, POD_PORT));
        let clients = [
            ("pod → outside (REGISTRY_ONLY)", client(&netns, OUTSIDE, stop.clone())),
            ("pod → hello (DENY)", client(&netns, HELLO, stop.clone())),
            ("outside → pod (STRICT)", client(&net_ns, to_pod, stop.clone())),
            ("node process → pod (STRICT)", client(&node_ns, to_pod, stop.clone())),
        ];
        std::thread::sleep(Duration::from_millis(5));
        c.wire(&name);
        // Until every client has met the agent (or 5 s: then it fails below).
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && clients.iter().any(|(_, (_, o))| o.captured.load(Ordering::Relaxed) == 0) {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        for (what, (t, o)) in clients {
            t.join().unwrap();
            let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
            let (d, k, p) = (load(&o.dropped), load(&o.captured), load(&o.passed));
            assert_eq!(
                p,
                0,
                "pod {name}: {what}: {p} connections passed around the agent ({d} dropped, {k} captured)\n{}",
                agent.log_text()
            );
            assert!(k > 0, "pod {name}: {what}: never reached the agent ({d} dropped)\n{}", agent.log_text());
        }
        server.join().unwrap();
    }
    eprintln!("{PODS} pods wired and captured in {:?}", started.elapsed());
    // How often the gate, not the programs, stopped a packet (a figure for
    // docs/performance.md; with netlink events the programs are usually first).
    let table = c.node_cmd(&["nft", "list", "table", "inet", "mesh_agent"]);
    for line in String::from_utf8_lossy(&table.stdout).lines().filter(|l| l.contains("not captured yet")) {
        eprintln!("pod gate: {}", line.trim());
    }
    stop_servers.store(true, Ordering::Relaxed);
    outside.join().unwrap();
    hello.join().unwrap();
}

/// Runs the plugin as a container runtime does: the command and the pod in
/// the environment, the network configuration (with the main plugin's
/// result) on stdin. Returns the exit status's success and stdout as JSON.
fn cni(command: &str, namespace: &str, pod: &str, socket: &std::path::Path, timeout: f64) -> (bool, serde_json::Value) {
    let conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "mesh-cni",
        "agent_socket": socket, "timeout_seconds": timeout,
        "prevResult": {"cniVersion": "1.0.0",
            "interfaces": [{"name": "vc0"}, {"name": "eth0", "sandbox": "/run/netns/c0"}],
            "ips": [{"address": "10.244.0.200/32", "interface": 1}]},
    });
    let mut child = std::process::Command::new(mesh_tests::agent::cni_binary())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "f00d")
        .env("CNI_NETNS", "/run/netns/c0")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    (out.status.success(), serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
}

/// One connection from `netns` to `to`: what it met.
fn once(netns: &str, to: SocketAddr) -> Outcome {
    enter_and_spawn(netns, move || attempt(to, Duration::from_millis(200))).join().unwrap()
}

/// The pod `c0`, known to the API server before its sandbox is made: no
/// address yet (the plugin gives it).
const PENDING_POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: c0, namespace: demo, labels: {app: newpod}}
spec: {nodeName: node-1, serviceAccountName: newpod}
";

#[test]
fn the_cni_plugin_returns_once_the_pod_is_captured_and_fails_without_an_agent() {
    if !require_root("the_cni_plugin_returns_once_the_pod_is_captured_and_fails_without_an_agent") {
        return;
    }
    let mut c = Fixture::one_node();
    c.objects.pod_cidr("node-1", "10.244.0.0/24").object(PENDING_POD);
    let stop_servers = Arc::new(AtomicBool::new(false));
    let outside = banner_server(&c.net_ns, OUTSIDE, "outside\n", stop_servers.clone());
    let agent = Agent::start(&c, &c.yaml(&policy()));
    let socket = agent.dir.join("state/cni.sock");

    // The main plugin's work: the pod's interface and address. Not captured
    // (the agent does not know its address), and gated: nothing leaves.
    let netns = c.add_sandbox(0, "c0", Ipv4Addr::new(10, 244, 0, 200)).netns.clone();
    c.wire("c0");
    assert_eq!(once(&netns, OUTSIDE), Outcome::Dropped, "{}", agent.log_text());

    // ADD returns the previous result once the agent has captured the pod:
    // the pod's very first connection meets the agent.
    let add = Instant::now();
    let (ok, out) = cni("ADD", "demo", "c0", &socket, 5.0);
    assert!(ok, "ADD failed: {out}\n{}", agent.log_text());
    eprintln!("CNI ADD returned after {:?} (plugin start, capture attached, gate opened)", add.elapsed());
    assert_eq!(out["ips"][0]["address"], "10.244.0.200/32", "{out}");
    assert_eq!(once(&netns, OUTSIDE), Outcome::Captured, "{}", agent.log_text());
    assert!(cni("CHECK", "demo", "c0", &socket, 5.0).0);

    // A pod the agent never hears of fails its sandbox, with the reason.
    let (ok, out) = cni("ADD", "demo", "ghost", &socket, 1.5);
    assert!(!ok);
    assert_eq!(out["code"], 11, "{out}");
    assert!(out["details"].as_str().unwrap().contains("not in this agent's configuration"), "{out}");

    // DEL forgets the address: capture released, the gate closed again.
    assert!(cni("DEL", "demo", "c0", &socket, 5.0).0);
    let (ok, out) = cni("CHECK", "demo", "c0", &socket, 5.0);
    assert!(!ok, "still captured after DEL: {out}");
    assert_eq!(once(&netns, OUTSIDE), Outcome::Dropped);

    // No agent: ADD fails (try again later), naming the socket; a pod of an
    // excluded namespace (kube-system) starts anyway; DEL never fails.
    drop(agent);
    let (ok, out) = cni("ADD", "demo", "c0", &socket, 1.0);
    assert!(!ok);
    assert_eq!(out["code"], 11, "{out}");
    assert!(out["msg"].as_str().unwrap().contains("is mesh-agent running"), "{out}");
    assert!(out["details"].as_str().unwrap().contains("cni.sock"), "{out}");
    let (ok, out) = cni("ADD", "kube-system", "coredns-0", &socket, 1.0);
    assert!(ok, "{out}");
    assert_eq!(out["ips"][0]["address"], "10.244.0.200/32");
    assert!(cni("DEL", "demo", "c0", &socket, 1.0).0);
    stop_servers.store(true, Ordering::Relaxed);
    outside.join().unwrap();
}
