//! End-to-end tests (root): real eBPF capture in network namespaces, the real
//! agent binary, real clients (curl, raw TCP).
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream},
    time::Duration,
};

use mesh_tests::{
    Agent, Cluster,
    agent::metric,
    fixture::{Objects, PodSpec, port},
    require_root, servers,
};

const VIP: &str = "10.96.0.10";

/// helloworld-v1, made by a Deployment: HTTP on 9095 and echo on 7000.
const HELLO_POD: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: helloworld-v1-5d9f8c7b6-abcde, namespace: demo, labels: {app: helloworld, version: v1},
  ownerReferences: [{kind: ReplicaSet, name: helloworld-v1-5d9f8c7b6, controller: true}]}
spec:
  nodeName: node-1
  serviceAccountName: helloworld
  containers: [{name: hello, ports: [{name: http, containerPort: 9095}, {name: echo, containerPort: 7000}]}]
status: {podIP: 10.244.0.3, phase: Running, conditions: [{type: Ready, status: "True"}]}
"#;

/// Namespace `demo` (meshed) and `plain` (not), pods `test` and `helloworld`
/// (and optionally `late`, with no service account) in demo, `outsider` in
/// plain, Service helloworld.
fn config(with_late: bool, extra: &str) -> String {
    let ip = |last| Ipv4Addr::new(10, 244, 0, last);
    let mut o = Objects::demo();
    o.namespace("plain", false)
        .pod("node-1", "test", ip(2), PodSpec::app("demo", &[("app", "test")]))
        .object(HELLO_POD)
        .pod(
            "node-1",
            "outsider",
            ip(4),
            PodSpec { service_account: None, ..PodSpec::app("plain", &[("app", "outsider")]) },
        )
        .service(
            "demo",
            "helloworld",
            VIP,
            &[("app", "helloworld")],
            &[port("http", 9095, "http"), port("tcp-echo", 7000, "echo")],
        );
    if with_late {
        o.pod("node-1", "late", ip(5), PodSpec { service_account: None, ..PodSpec::app("demo", &[("app", "late")]) });
    }
    o.yaml(extra)
}

fn cluster() -> Cluster {
    let mut c = Cluster::new();
    c.add_pod("test", Ipv4Addr::new(10, 244, 0, 2));
    c.add_pod("helloworld", Ipv4Addr::new(10, 244, 0, 3));
    c.add_pod("outsider", Ipv4Addr::new(10, 244, 0, 4));
    servers::http_hello(c.pod("helloworld"), 9095);
    servers::echo(c.pod("helloworld"), 7000);
    c
}

fn curl(pod: &mesh_tests::Pod, url: &str) -> (bool, String) {
    let out = pod.cmd(&["curl", "-sS", "--max-time", "5", url]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn curl_reaches_vip_and_pod_ip_and_server_sees_client_ip() {
    if !require_root("curl_reaches_vip_and_pod_ip_and_server_sees_client_ip") {
        return;
    }
    let c = cluster();
    let agent = Agent::start(&c, &config(false, ""));
    let test = c.pod("test");

    let (ok, body) = curl(test, &format!("http://{VIP}:9095/hello"));
    assert!(ok, "curl to the VIP failed: {body}\n{}", agent.log_text());
    assert_eq!(body, "hello from helloworld; client 10.244.0.2\n");

    let (ok, body) = curl(test, "http://10.244.0.3:9095/direct");
    assert!(ok, "curl to the pod IP failed: {body}");
    assert_eq!(body, "hello from helloworld; client 10.244.0.2\n");

    // Port `http`: each request is measured (the two share one upstream connection).
    let m =
        agent.wait_metrics(5, "requests", |m| metric(m, "istio_requests_total", &[("source_workload", "test")]) >= 2.0);
    let via_vip = [
        ("reporter", "source"),
        ("source_workload", "test"),
        ("source_workload_namespace", "demo"),
        ("source_principal", "spiffe://cluster.local/ns/demo/sa/test"),
        ("destination_workload", "helloworld-v1"),
        ("destination_workload_namespace", "demo"),
        ("destination_service", "helloworld.demo.svc.cluster.local"),
        ("destination_service_name", "helloworld"),
        ("connection_security_policy", "none"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        // Istio's canonical service (app label, else the workload) and
        // revision (version label, else `latest`), and the default cluster.
        ("source_canonical_service", "test"),
        ("source_canonical_revision", "latest"),
        ("destination_canonical_service", "helloworld"),
        ("destination_canonical_revision", "v1"),
        ("source_cluster", "Kubernetes"),
        ("destination_cluster", "Kubernetes"),
    ];
    assert_eq!(metric(&m, "istio_requests_total", &via_vip), 1.0, "{m}");
    assert_eq!(metric(&m, "istio_response_bytes_sum", &via_vip), 41.0, "{m}");
    assert_eq!(metric(&m, "istio_request_duration_milliseconds_count", &via_vip), 1.0, "{m}");
    let direct =
        [("destination_workload", "helloworld-v1"), ("destination_service", "unknown"), ("response_code", "200")];
    assert_eq!(metric(&m, "istio_requests_total", &direct), 1.0, "{m}");
    agent.wait_metrics(5, "eBPF counters", |m| {
        metric(m, "mesh_ebpf_packets_total", &[("counter", "assigned_outbound")]) >= 2.0
    });

    let (code, dump) = agent.admin_get("/config_dump").unwrap();
    assert_eq!(code, 200);
    assert!(dump.contains("\"ifname\": \"vtest\""), "{dump}");
}

#[test]
fn large_transfer_with_half_close_keeps_every_byte() {
    if !require_root("large_transfer_with_half_close_keeps_every_byte") {
        return;
    }
    let c = cluster();
    let agent = Agent::start(&c, &config(false, ""));
    const LEN: usize = 64 << 20;
    let (sent, echoed) = c.pod("test").run(|| {
        let s = TcpStream::connect_timeout(&format!("{VIP}:7000").parse().unwrap(), Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut hash = 0u64;
            let mut chunk = vec![0u8; 1 << 20];
            for i in 0..LEN / chunk.len() {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = (i * 31 + j * 7 % 251) as u8;
                }
                hash = fnv(hash, &chunk);
                w.write_all(&chunk).unwrap();
            }
            // Half-close: the echo server answers EOF only after it sees ours.
            w.shutdown(Shutdown::Write).unwrap();
            hash
        });
        let mut r = s;
        let (mut got, mut hash, mut buf) = (0usize, 0u64, vec![0u8; 1 << 16]);
        loop {
            let n = r.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            hash = fnv(hash, &buf[..n]);
            got += n;
        }
        let sent_hash = writer.join().unwrap();
        ((LEN, sent_hash), (got, hash))
    });
    assert_eq!(echoed.0, sent.0, "bytes echoed");
    assert_eq!(echoed.1, sent.1, "content hash");
    let m = agent.wait_metrics(5, "byte counters", |m| {
        metric(m, "istio_tcp_received_bytes_total", &[("destination_service_name", "helloworld")]) >= LEN as f64
    });
    assert_eq!(metric(&m, "istio_tcp_sent_bytes_total", &[("destination_service_name", "helloworld")]), LEN as f64);
}

/// FNV-1a, chained across chunks.
fn fnv(mut h: u64, data: &[u8]) -> u64 {
    if h == 0 {
        h = 0xcbf2_9ce4_8422_2325;
    }
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[test]
fn two_hundred_concurrent_connections() {
    if !require_root("two_hundred_concurrent_connections") {
        return;
    }
    let c = cluster();
    let agent = Agent::start(&c, &config(false, ""));
    let results = c.pod("test").run(|| {
        let addr: SocketAddr = format!("{VIP}:7000").parse().unwrap();
        // Open all 200 first so they are live at once, then exchange on each.
        let conns: Vec<TcpStream> =
            (0..200).map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap()).collect();
        let handles: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, mut s)| {
                std::thread::spawn(move || {
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    let msg = format!("connection {i} says hello").repeat(100);
                    s.write_all(msg.as_bytes()).unwrap();
                    s.shutdown(Shutdown::Write).unwrap();
                    let mut back = String::new();
                    s.read_to_string(&mut back).unwrap();
                    back == msg
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).filter(|ok| *ok).count()
    });
    assert_eq!(results, 200);
    let m = agent.wait_metrics(10, "200 closed", |m| {
        metric(m, "istio_tcp_connections_closed_total", &[("destination_service_name", "helloworld")]) >= 200.0
    });
    assert_eq!(metric(&m, "mesh_tcp_connection_failures_total", &[]), 0.0, "{m}");
}

#[test]
fn pod_in_unenrolled_namespace_is_not_captured() {
    if !require_root("pod_in_unenrolled_namespace_is_not_captured") {
        return;
    }
    // Its outbound traffic is not captured; only what it sends to a meshed pod on
    // this node passes the inbound plaintext listener (where PeerAuthentication
    // applies, PERMISSIVE by default), with its own address kept.
    let c = cluster();
    let agent = Agent::start(&c, &config(false, ""));
    let outsider = c.pod("outsider");
    // Without capture nothing serves the VIP (there is no kube-proxy here).
    let (ok, body) = curl(outsider, &format!("http://{VIP}:9095/"));
    assert!(!ok, "an un-enrolled pod reached the VIP: {body}");
    // Its direct traffic flows, untouched by the agent.
    let (ok, body) = curl(outsider, "http://10.244.0.3:9095/");
    assert!(ok, "{body}");
    assert_eq!(body, "hello from helloworld; client 10.244.0.4\n");
    let m = agent.wait_metrics(5, "eBPF counters", |m| {
        metric(m, "mesh_ebpf_packets_total", &[("counter", "assigned_inbound")]) >= 1.0
    });
    let inbound =
        [("reporter", "destination"), ("source_workload", "outsider"), ("connection_security_policy", "none")];
    assert_eq!(metric(&m, "istio_tcp_connections_opened_total", &inbound), 1.0, "{m}");
    assert_eq!(metric(&m, "istio_tcp_connections_opened_total", &[("reporter", "source")]), 0.0, "{m}");
    assert_eq!(metric(&m, "mesh_ebpf_packets_total", &[("counter", "assigned_outbound")]), 0.0, "{m}");
}

#[test]
fn spoofed_source_is_dropped_and_counted() {
    if !require_root("spoofed_source_is_dropped_and_counted") {
        return;
    }
    let c = cluster();
    let agent = Agent::start(&c, &config(false, ""));
    let test = c.pod("test");
    // The pod claims another pod's address.
    test.cmd(&["ip", "addr", "add", "10.244.0.9/32", "dev", "eth0"]);
    let out = test.cmd(&["curl", "-sS", "--max-time", "2", "--interface", "10.244.0.9", "http://10.244.0.3:9095/"]);
    assert!(!out.status.success(), "spoofed traffic got through");
    agent.wait_metrics(5, "spoof drops", |m| {
        metric(m, "mesh_ebpf_packets_total", &[("counter", "spoof_dropped")]) >= 1.0
    });
}

#[test]
fn config_edits_add_and_remove_pods_live_and_a_bad_object_is_rejected_alone() {
    if !require_root("config_edits_add_and_remove_pods_live") {
        return;
    }
    let mut c = cluster();
    c.add_pod("late", Ipv4Addr::new(10, 244, 0, 5));
    let agent = Agent::start(&c, &config(false, ""));
    let late = c.pod("late");
    let vip = format!("http://{VIP}:9095/");
    assert!(!curl(late, &vip).0, "late is not in the config yet, so not captured");

    agent.write_config(&config(true, ""));
    let mut ok = false;
    for _ in 0..50 {
        if curl(late, &vip).0 {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "late was added but never captured:\n{}", agent.log_text());

    // A bad object is rejected alone and counted; everything else keeps serving.
    agent.write_config(&config(
        true,
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: demo}\nspec: {clusterIP: 10.96.0.999}\n",
    ));
    agent.wait_metrics(5, "rejected object", |m| metric(m, "mesh_config_objects_rejected", &[]) >= 1.0);
    let (ok, body) = curl(late, &vip);
    assert!(ok, "the rest of the config stopped serving: {body}");
    let (_, dump) = agent.admin_get("/config_dump").unwrap();
    assert!(dump.contains("10.96.0.999"), "config_dump should show the rejection: {dump}");

    agent.write_config(&config(false, ""));
    let mut released = false;
    for _ in 0..50 {
        if !curl(late, &vip).0 {
            released = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(released, "late was removed but is still captured");
}

#[test]
fn uninstall_on_exit_leaves_the_node_as_it_was() {
    if !require_root("uninstall_on_exit_leaves_the_node_as_it_was") {
        return;
    }
    let c = cluster();
    let before = c.node_routing();
    let mut agent = Agent::start_on(&c, 0, &config(false, ""), &["--uninstall-on-exit".to_owned()]);
    let during = c.node_routing();
    assert!(during.contains("lookup 15001"), "rule installed: {during}");
    assert!(curl(c.pod("test"), &format!("http://{VIP}:9095/")).0);

    let status = agent.stop();
    assert!(status.success(), "exit status {status}:\n{}", agent.log_text());
    assert_eq!(c.node_routing(), before, "routing rules and tables restored");
    // Capture is gone: the VIP is no longer served, direct traffic still flows.
    assert!(!curl(c.pod("test"), &format!("http://{VIP}:9095/")).0, "VIP still captured after exit");
    let (ok, body) = curl(c.pod("test"), "http://10.244.0.3:9095/");
    assert!(ok, "unmeshed traffic broken after exit: {body}");
}

#[test]
fn invalid_objects_are_rejected_one_by_one_and_an_unreadable_config_refuses_to_start() {
    if !require_root("invalid_objects_are_rejected_one_by_one") {
        return;
    }
    let c = cluster();
    // A configuration that cannot be read at all: nothing starts.
    let out = c.node_cmd(&[
        mesh_tests::agent::binary().to_str().unwrap(),
        "run",
        "--node",
        "node-1",
        "--config",
        "/nonexistent/mesh-config",
    ]);
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/mesh-config") && err.contains("cannot read"), "{err}");
    assert!(!c.node_routing().contains("15001"), "nothing installed");

    // An invalid Pod among valid objects: rejected alone, the rest serves.
    let bad = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: demo}\nstatus: {podIP: nope}\n";
    let agent = Agent::start(&c, &config(false, bad));
    assert!(curl(c.pod("test"), &format!("http://{VIP}:9095/")).0, "valid objects not applied:\n{}", agent.log_text());
    assert_eq!(metric(&agent.metrics(), "mesh_config_objects_rejected", &[]), 1.0);
    let (_, dump) = agent.admin_get("/config_dump").unwrap();
    assert!(dump.contains("(document 8): Pod demo/p: status.podIP: \\\"nope\\\" is not an IPv4 address"), "{dump}");

    // A security policy that cannot be admitted fails closed for what it selects.
    let policy = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
        metadata: {name: hello, namespace: demo}\n\
        spec: {selector: {matchLabels: {app: helloworld}}, rules: [{when: [{key: request.time, values: [now]}]}]}\n";
    let loads = |m: &str| metric(m, "mesh_config_loads_total", &[("result", "success")]);
    let before = loads(&agent.metrics());
    agent.write_config(&config(false, policy));
    agent.wait_metrics(5, "the policy rejected", |m| loads(m) > before);
    assert_eq!(metric(&agent.metrics(), "mesh_config_objects_rejected", &[]), 1.0);
    let (ok, body) = curl(c.pod("test"), &format!("http://{VIP}:9095/"));
    assert!(!ok || body.contains("RBAC: access denied"), "a rejected AuthorizationPolicy let traffic through: {body}");
    agent.write_config(&config(false, ""));
    agent.wait_metrics(5, "no object rejected", |m| metric(m, "mesh_config_objects_rejected", &[]) == 0.0);
    let (ok, body) = curl(c.pod("test"), &format!("http://{VIP}:9095/"));
    assert!(ok && body.starts_with("hello from helloworld"), "fixed, the workload is still denied: {body}");
}

#[test]
fn other_tenants_marks_are_left_alone() {
    if !require_root("other_tenants_marks_are_left_alone") {
        return;
    }
    // The node's other tenants mark packets the mesh never handles: Cilium
    // its magic values in 0x0F00 (0x0E00: "to encrypt"), Calico 0xFFFF0000,
    // kube-proxy 0x4000 (masquerade). An un-meshed pod's connection out of
    // the node, so marked, must be routed as if the agent were not there.
    let c = cluster();
    let _agent = Agent::start(&c, &config(false, ""));
    let net = mesh_tests::Pod::namespace("net", Ipv4Addr::new(172, 18, 0, 1), &c.net_ns);
    servers::http_hello(&net, 8080);
    let outsider = c.pod("outsider");
    let url = "http://172.18.0.1:8080/";
    let (ok, body) = curl(outsider, url);
    assert!(ok, "unmarked: {body}");
    let script = "table ip tenants {\n chain pre {\n  type filter hook prerouting priority mangle; policy accept;\n  \
                  ip saddr 10.244.0.4 counter meta mark set 0xabcd4e00\n  \
                  ip daddr 10.244.0.4 meta mark set 0xabcd4e00\n }\n}\n";
    let out = c.node_cmd(&["nft", script]);
    assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
    let (ok, body) = curl(outsider, url);
    assert!(ok, "a connection another tenant marked was taken by the agent's routing: {body}");
    let counted =
        String::from_utf8_lossy(&c.node_cmd(&["nft", "list", "chain", "ip", "tenants", "pre"]).stdout).into_owned();
    assert!(!counted.contains("counter packets 0 "), "the tenant's rule marked nothing:\n{counted}");
}
