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
    fixture::{Fixture, PodSpec},
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

/// Connects to `to` from `netns` again and again until `stop`.
fn client(netns: &str, to: SocketAddr, stop: Arc<AtomicBool>) -> (JoinHandle<()>, Arc<Outcomes>) {
    let out = Arc::new(Outcomes::default());
    let seen = out.clone();
    let t = enter_and_spawn(netns, move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_millis(10)) else {
                seen.dropped.fetch_add(1, Ordering::Relaxed);
                // No route yet (the pod's interface is being made): fails at once.
                std::thread::sleep(Duration::from_millis(1));
                continue;
            };
            s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            let mut buf = [0; 16];
            match s.read(&mut buf) {
                Ok(n) if n > 0 => seen.passed.fetch_add(1, Ordering::Relaxed),
                _ => seen.captured.fetch_add(1, Ordering::Relaxed),
            };
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

const POLICY: &str = r#"apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
---
apiVersion: security.istio.io/v1
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

#[test]
fn a_new_pod_is_captured_from_its_first_packet_in_both_directions() {
    if !require_root("a_new_pod_is_captured_from_its_first_packet_in_both_directions") {
        return;
    }
    let mut c = cluster();
    let stop_servers = Arc::new(AtomicBool::new(false));
    let outside = banner_server(&c.net_ns, OUTSIDE, "outside\n", stop_servers.clone());
    let hello = banner_server(&c.pod("hello").netns.clone(), HELLO, "hello\n", stop_servers.clone());
    let agent = Agent::start(&c, &c.yaml(POLICY));
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
