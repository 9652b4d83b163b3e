//! No way around the agent (root): each path by which a connection can reach a
//! meshed pod without entering through a captured interface — a second node
//! interface, an overlay tunnel, kube-proxy-style DNAT, a node process, a
//! fragmenting sender, IPv6 — is tried with a real client. Under STRICT it is
//! refused and counted; under PERMISSIVE with a DENY for the client it is
//! refused by AuthorizationPolicy (so the agent saw the real client); under
//! PERMISSIVE it reaches the pod through the agent, which reports it.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::net::Ipv4Addr;

use mesh_tests::{
    Agent, Cluster, Pod,
    agent::metric,
    clients::{Curled, curl},
    fixture::{Objects, PodSpec},
    netns::sh,
    require_root, servers,
};

const HELLO: &str = "10.244.0.3";

/// helloworld-v1, made by a Deployment, with a readiness probe on `http`
/// (9095) and a debug port (9098) that no probe names.
const HELLO_POD: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: helloworld-v1-5d9f8c7b6-abcde, namespace: demo, labels: {app: helloworld, version: v1},
  ownerReferences: [{kind: ReplicaSet, name: helloworld-v1-5d9f8c7b6, controller: true}]}
spec:
  nodeName: node-1
  serviceAccountName: helloworld
  containers:
  - name: hello
    ports: [{name: http, containerPort: 9095}, {name: debug, containerPort: 9098}]
    readinessProbe: {httpGet: {path: /, port: http}}
status: {podIP: 10.244.0.3, phase: Running, conditions: [{type: Ready, status: "True"}]}
"#;

/// Node node-1, namespace `demo` (meshed) with `test` and helloworld-v1, and `extra`.
fn config(extra: &str) -> String {
    let mut o = Objects::demo();
    o.pod("node-1", "test", Ipv4Addr::new(10, 244, 0, 2), PodSpec::app("demo", &[("app", "test")])).object(HELLO_POD);
    o.yaml(extra)
}

const STRICT: &str = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
    metadata: {name: default, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n";

fn deny_from(ip: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: deny-client, namespace: demo}}\n\
         spec: {{selector: {{matchLabels: {{app: helloworld}}}}, action: DENY, rules: [{{from: [{{source: {{ipBlocks: [{ip}/32]}}}}]}}]}}\n"
    )
}

fn cluster() -> Cluster {
    let mut c = Cluster::new();
    c.add_pod("test", Ipv4Addr::new(10, 244, 0, 2));
    c.add_pod("helloworld", Ipv4Addr::new(10, 244, 0, 3));
    servers::http_hello(c.pod("helloworld"), 9095);
    // A port that no probe names: the kubelet has no business there.
    servers::http_hello(c.pod("helloworld"), 9098);
    c
}

fn ebpf(a: &Agent, counter: &str) -> f64 {
    metric(&a.metrics(), "mesh_ebpf_packets_total", &[("counter", counter)])
}

fn failures(a: &Agent, reason: &str) -> f64 {
    metric(&a.metrics(), "mesh_tcp_connection_failures_total", &[("reason", reason)])
}

/// Connections the agent opened to helloworld as its destination's agent.
fn served(a: &Agent) -> f64 {
    metric(
        &a.metrics(),
        "istio_tcp_connections_opened_total",
        &[("reporter", "destination"), ("destination_workload", "helloworld-v1"), ("response_flags", "-")],
    )
}

/// Writes `extra` into the agent's configuration and waits until it is loaded.
fn reconfigure(a: &Agent, extra: &str) {
    let before = metric(&a.metrics(), "mesh_config_loads_total", &[("result", "success")]);
    a.write_config(&config(extra));
    a.wait_metrics(10, "configuration reload", |t| {
        metric(t, "mesh_config_loads_total", &[("result", "success")]) > before
    });
}

/// The three checks on one path (the agent starts under STRICT): refused under
/// STRICT; refused by a DENY for `client_ip` under PERMISSIVE; served through
/// the agent under PERMISSIVE, the server seeing `client_ip`.
fn assert_gated(a: &Agent, path: &str, client_ip: &str, get: impl Fn() -> Curled) {
    let handed = ebpf(a, "handed_off");
    let refused = failures(a, "plaintext_refused");
    let r = get();
    assert_ne!(r.code, 200, "{path}: STRICT admitted plaintext around the agent: {}{}", r.body, r.stderr);
    a.wait_metrics(5, "plaintext_refused", |m| {
        metric(m, "mesh_tcp_connection_failures_total", &[("reason", "plaintext_refused")]) > refused
    });
    // The kernel's counters are published on each resync.
    a.wait_metrics(5, "the last-hop gate handing the connection back", |m| {
        metric(m, "mesh_ebpf_packets_total", &[("counter", "handed_off")]) > handed
    });

    reconfigure(a, &deny_from(client_ip));
    let denied = failures(a, "denied");
    let r = get();
    assert_ne!(r.code, 200, "{path}: a DENY for {client_ip} let it through: {}{}", r.body, r.stderr);
    a.wait_metrics(5, "denied", |m| metric(m, "mesh_tcp_connection_failures_total", &[("reason", "denied")]) > denied);

    reconfigure(a, "");
    let before = served(a);
    let r = get();
    assert_eq!(r.code, 200, "{path}: PERMISSIVE refused: {}{}\n{}", r.body, r.stderr, a.log_text());
    assert_eq!(r.body, format!("hello from helloworld; client {client_ip}\n"), "{path}");
    a.wait_metrics(5, "the connection reported by the destination", |m| {
        metric(
            m,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination"), ("destination_workload", "helloworld-v1"), ("response_flags", "-")],
        ) > before
    });
}

fn curl_in(ns: &Pod, url: &str) -> Curled {
    curl(|args| ns.cmd(args), &[url])
}

#[test]
fn a_second_node_interface_is_gated() {
    if !require_root("a_second_node_interface_is_gated") {
        return;
    }
    let mut c = cluster();
    let lan = c.add_lan(0, "lan", "192.168.77");
    let a = Agent::start(&c, &config(STRICT));
    assert_gated(&a, "second interface", "192.168.77.2", || curl_in(&lan, &format!("http://{HELLO}:9095/")));
}

#[test]
fn a_vxlan_tunnel_is_gated() {
    if !require_root("a_vxlan_tunnel_is_gated") {
        return;
    }
    let c = {
        let mut c = cluster();
        c.add_node();
        c
    };
    // The kernel's own VXLAN device between the nodes, over the cluster
    // network, as Flannel lays it out; node-2 reaches the pod through it.
    for (i, (local, remote)) in [("172.18.0.2", "172.18.1.2"), ("172.18.1.2", "172.18.0.2")].into_iter().enumerate() {
        let ns = c.nodes[i].ns.as_str();
        let ip = |args: &[&str]| {
            let mut v = vec!["ip", "-n", ns];
            v.extend_from_slice(args);
            sh(&v);
        };
        ip(&["link", "add", "vx0", "type", "vxlan", "id", "42", "local", local, "remote", remote, "dstport", "4789"]);
        ip(&["addr", "add", &format!("10.99.0.{}/24", i + 1), "dev", "vx0"]);
        ip(&["link", "set", "vx0", "up"]);
    }
    sh(&["ip", "-n", &c.nodes[1].ns, "route", "add", &format!("{HELLO}/32"), "via", "10.99.0.1", "dev", "vx0"]);
    let node2 = Pod::namespace("node-2", Ipv4Addr::new(10, 99, 0, 2), &c.nodes[1].ns);
    let a = Agent::start(&c, &config(STRICT));
    assert_gated(&a, "vxlan", "10.99.0.2", || curl_in(&node2, &format!("http://{HELLO}:9095/")));
}

#[test]
fn kube_proxy_dnat_to_a_meshed_pod_is_gated() {
    if !require_root("kube_proxy_dnat_to_a_meshed_pod_is_gated") {
        return;
    }
    let c = cluster();
    // A NodePort as kube-proxy's nftables mode writes it: DNAT in prerouting,
    // before the uplink's classifier could know the pod is the destination.
    let rules = format!(
        "table ip kube-proxy-test {{\n chain nodeports {{\n  type nat hook prerouting priority dstnat; policy accept;\n  \
         tcp dport 30080 dnat to {HELLO}:9095\n }}\n}}\n"
    );
    let file = std::env::temp_dir().join(format!("mesh-test-{}-nodeport.nft", c.id));
    std::fs::write(&file, rules).unwrap();
    sh(&["ip", "netns", "exec", &c.node_ns, "nft", "-f", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    let outside = Pod::namespace("outside", Ipv4Addr::new(172, 18, 0, 1), &c.net_ns);
    let a = Agent::start(&c, &config(STRICT));
    assert_gated(&a, "NodePort DNAT", "172.18.0.1", || curl_in(&outside, "http://172.18.0.2:30080/"));
    // Several in a row: each new flow is tracked once, by its NAT entry.
    for i in 0..5 {
        let r = curl_in(&outside, "http://172.18.0.2:30080/");
        assert_eq!(r.code, 200, "NodePort connection {i}: {}{}", r.body, r.stderr);
    }
}

const ALLOW_ONLY_TEST: &str = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
    metadata: {name: only-test, namespace: demo}\nspec: {selector: {matchLabels: {app: helloworld}}, \
    rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/test]}}]}]}\n";

#[test]
fn node_processes_go_through_the_agent_and_only_kubelet_probes_are_exempt() {
    if !require_root("node_processes_go_through_the_agent_and_only_kubelet_probes_are_exempt") {
        return;
    }
    let mut c = cluster();
    let daemon = c.node_process(0, "daemon");
    let kubelet = c.node_process(0, "kubelet");
    let url = format!("http://{HELLO}:9095/");
    // Marks in bits of the operator's choosing: capture, the gate's
    // hand-off and the agent's own sockets all use them.
    let args = vec![
        "--kubelet-cgroup".to_owned(),
        c.cgroup_under_root(&kubelet),
        "--mark-mask".to_owned(),
        "0x00c00000".to_owned(),
    ];
    let mut a = Agent::start_on(&c, 0, &config(&format!("{STRICT}{ALLOW_ONLY_TEST}")), &args);
    let rules = c.node_routing();
    for rule in ["fwmark 0x800000/0xc00000 lookup 15001", "fwmark 0xc00000/0xc00000 lookup 15001"] {
        assert!(rules.contains(rule), "no {rule:?} in\n{rules}");
    }

    // A node daemon is carried as the node's identity, which the policy does not admit.
    let (captured, denied) = (ebpf(&a, "host_captured"), failures(&a, "denied"));
    let r = curl_in(&daemon, &url);
    assert_ne!(r.code, 200, "a node process reached a STRICT pod around its policy: {}{}", r.body, r.stderr);
    a.wait_metrics(5, "the node process denied", |m| {
        metric(m, "mesh_tcp_connection_failures_total", &[("reason", "denied")]) > denied
            && metric(m, "mesh_ebpf_packets_total", &[("counter", "host_captured")]) > captured
    });

    // The kubelet's probes reach the pod directly on the port the Pod spec's
    // readinessProbe names, whatever the policy says.
    let probes = ebpf(&a, "probe_passed");
    let r = curl_in(&kubelet, &url);
    assert_eq!(r.code, 200, "the kubelet's probe was refused: {}{}", r.body, r.stderr);
    assert_eq!(r.body, "hello from helloworld; client 172.18.0.2\n");
    a.wait_metrics(5, "the probe counted", |m| {
        metric(m, "mesh_ebpf_packets_total", &[("counter", "probe_passed")]) > probes
    });

    // Attack: anything in the kubelet's cgroup (an exec'd helper, a
    // compromised plugin) on a port no probe names is a node process like
    // any other: carried as the node's identity, which the policy refuses.
    let denied = failures(&a, "denied");
    let r = curl_in(&kubelet, &format!("http://{HELLO}:9098/"));
    assert_ne!(r.code, 200, "the kubelet's cgroup reached a port no probe names: {}{}", r.body, r.stderr);
    a.wait_metrics(5, "the kubelet's non-probe connection denied", |m| {
        metric(m, "mesh_tcp_connection_failures_total", &[("reason", "denied")]) > denied
    });

    // Admitted by name, the node's identity gets through the agent.
    let allow_node = ALLOW_ONLY_TEST.replace(
        "principals: [cluster.local/ns/demo/sa/test]",
        "principals: [cluster.local/ns/istio-system/sa/mesh-node-node-1]",
    );
    reconfigure(&a, &format!("{STRICT}{allow_node}"));
    let r = curl_in(&daemon, &url);
    assert_eq!(r.code, 200, "the node's identity, admitted, was refused: {}{}\n{}", r.body, r.stderr, a.log_text());
    // Sniffed as HTTP (a pod IP declares no protocol): measured per request.
    a.wait_metrics(5, "the node identity's request", |m| {
        let node = "spiffe://cluster.local/ns/istio-system/sa/mesh-node-node-1";
        metric(m, "istio_requests_total", &[("source_principal", node), ("response_code", "200")]) >= 1.0
    });
    a.stop();

    // Without host capture a node process is handed back at the last hop and
    // meets STRICT there; with no kubelet named, the kubelet does too.
    let a = Agent::start_on(&c, 0, &config(STRICT), &["--no-host-capture".to_owned()]);
    assert_gated(&a, "node process, no host capture", "172.18.0.2", || curl_in(&daemon, &url));
    reconfigure(&a, STRICT);
    assert_ne!(curl_in(&kubelet, &url).code, 200, "with host capture off, the kubelet passed STRICT");
}

/// Sends a TCP SYN from `from` to `to:port` as two IPv4 fragments (8 bytes of
/// TCP header, then the rest): the first is too short to hold the flags.
fn send_fragmented_syn(from: Ipv4Addr, to: Ipv4Addr, port: u16) {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40_000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&65_535u16.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&from.octets());
    pseudo.extend_from_slice(&to.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    tcp[16..18].copy_from_slice(&checksum(&pseudo).to_be_bytes());
    // SAFETY: a raw socket, closed below; IPPROTO_RAW implies IP_HDRINCL.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    for (offset, more, part) in [(0u16, true, &tcp[..8]), (1, false, &tcp[8..])] {
        let mut ip = vec![0x45, 0, 0, 0, 0x4d, 0x2a];
        ip.extend_from_slice(&(offset | if more { 0x2000 } else { 0 }).to_be_bytes());
        ip.extend_from_slice(&[64, 6, 0, 0]);
        ip.extend_from_slice(&from.octets());
        ip.extend_from_slice(&to.octets());
        let len = (ip.len() + part.len()) as u16;
        ip[2..4].copy_from_slice(&len.to_be_bytes());
        ip.extend_from_slice(part);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(to.octets()) },
            sin_zero: [0; 8],
        };
        // SAFETY: a valid buffer and address for the call.
        let sent = unsafe {
            libc::sendto(
                fd,
                ip.as_ptr().cast(),
                ip.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(sent, ip.len() as isize, "sendto: {}", std::io::Error::last_os_error());
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Fragments that reached a namespace's IP layer.
fn reassembly_requests(ns: &Pod) -> u64 {
    ns.snmp("Ip", "ReasmReqds")
}

#[test]
fn fragmented_syns_never_reach_a_meshed_pod() {
    if !require_root("fragmented_syns_never_reach_a_meshed_pod") {
        return;
    }
    let c = cluster();
    let a = Agent::start(&c, &config(STRICT));
    let hello = c.pod("helloworld");
    let outside = Pod::namespace("outside", Ipv4Addr::new(172, 18, 0, 1), &c.net_ns);

    // From outside the node: past the uplink, the gate drops both fragments.
    let dropped = ebpf(&a, "fragment_dropped");
    outside.run(|| send_fragmented_syn(Ipv4Addr::new(172, 18, 0, 1), Ipv4Addr::new(10, 244, 0, 3), 9095));
    // Until they are dropped or they arrive, whichever comes first.
    a.wait_metrics(5, "fragments dropped", |m| {
        reassembly_requests(hello) > 0
            || metric(m, "mesh_ebpf_packets_total", &[("counter", "fragment_dropped")]) >= dropped + 2.0
    });
    assert_eq!(reassembly_requests(hello), 0, "a fragment reached the meshed pod");

    // From a meshed pod, with a spoofed source: anti-spoof comes first.
    let spoofed = ebpf(&a, "spoof_dropped");
    c.pod("test").run(|| send_fragmented_syn(Ipv4Addr::new(10, 244, 0, 99), Ipv4Addr::new(10, 244, 0, 3), 9095));
    a.wait_metrics(5, "spoofed fragments dropped", |m| {
        reassembly_requests(hello) > 0
            || metric(m, "mesh_ebpf_packets_total", &[("counter", "spoof_dropped")]) >= spoofed + 2.0
    });
    assert_eq!(reassembly_requests(hello), 0, "a spoofed fragment reached the meshed pod");
}

/// Listens on `[::]:port` in `ns` and answers each connection with "v6\n".
fn v6_server(ns: &Pod, port: u16) {
    let l = ns.run(move || std::net::TcpListener::bind(("::", port)).unwrap());
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut s, b"v6\n");
        }
    });
}

fn v6_connects(ns: &Pod, addr: &str) -> bool {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    ns.run(move || {
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))
            .and_then(|mut s| {
                let mut b = String::new();
                std::io::Read::read_to_string(&mut s, &mut b).map(|_| b)
            })
            .is_ok_and(|b| b == "v6\n")
    })
}

#[test]
fn ipv6_tcp_to_and_from_meshed_pods_is_refused_and_others_are_untouched() {
    if !require_root("ipv6_tcp_to_and_from_meshed_pods_is_refused_and_others_are_untouched") {
        return;
    }
    let mut c = cluster();
    c.add_pod("outsider", Ipv4Addr::new(10, 244, 0, 4));
    let plain = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n---\napiVersion: v1\nkind: Pod\n\
        metadata: {name: outsider, namespace: plain}\nspec: {nodeName: node-1}\nstatus: {podIP: 10.244.0.4}\n";
    // Each pod's link gets an IPv6 /64 shared with its veth on the node.
    for (pod, net) in [("helloworld", "fd00:10"), ("outsider", "fd00:11")] {
        let p = c.pod(pod);
        sh(&["ip", "-n", &c.node_ns, "addr", "add", &format!("{net}::1/64"), "dev", &p.host_if, "nodad"]);
        sh(&["ip", "-n", &p.netns, "addr", "add", &format!("{net}::2/64"), "dev", "eth0", "nodad"]);
        v6_server(p, 9096);
    }
    let node = Pod::namespace("node", c.node_ip, &c.node_ns);
    v6_server(&node, 9097);
    let a = Agent::start(&c, &config(plain));

    assert!(v6_connects(&node, "[fd00:11::2]:9096"), "IPv6 to a pod outside the mesh was disturbed");
    assert!(v6_connects(c.pod("outsider"), "[fd00:11::1]:9097"), "IPv6 from a pod outside the mesh was disturbed");
    let dropped = ebpf(&a, "ipv6_dropped");
    assert!(!v6_connects(&node, "[fd00:10::2]:9096"), "IPv6 TCP reached a meshed pod around the agent");
    assert!(!v6_connects(c.pod("helloworld"), "[fd00:10::1]:9097"), "IPv6 TCP left a meshed pod around the agent");
    a.wait_metrics(5, "IPv6 dropped", |m| {
        metric(m, "mesh_ebpf_packets_total", &[("counter", "ipv6_dropped")]) > dropped
    });
    // Logged once for the pod, however many packets were refused.
    let logged = |a: &Agent| a.log_text().matches("IPv6 to or from a meshed pod refused").count();
    a.wait_metrics(5, "the refusal logged", |_| logged(&a) >= 1);
    assert_eq!(logged(&a), 1, "{}", a.log_text());
}
