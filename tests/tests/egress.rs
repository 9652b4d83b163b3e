//! Egress keeps the pod's address (root): a meshed pod's connection out of the
//! mesh reaches the outside server from the pod's IP, not the node's, and a
//! link-local destination (a cloud metadata service) is not captured at all.

use std::net::Ipv4Addr;

use mesh_tests::{
    Agent, Pod,
    agent::metric,
    clients::curl,
    egress::{registry_only, test_and_outside},
    fixture::{Fixture, PodSpec},
    netns::sh,
    require_root, servers,
};

fn outbound(a: &Agent) -> f64 {
    metric(&a.metrics(), "mesh_ebpf_packets_total", &[("counter", "assigned_outbound")])
}

#[test]
fn egress_leaves_with_the_pods_address_and_metadata_is_not_captured() {
    if !require_root("egress_leaves_with_the_pods_address_and_metadata_is_not_captured") {
        return;
    }
    let mut c = Fixture::one_node();
    c.add_pod(0, "test", Ipv4Addr::new(10, 244, 0, 2), PodSpec::app("demo", &[("app", "test")]));
    // Outside the node: a server, and a metadata service at its well-known address.
    let outside = Pod::namespace("outside", Ipv4Addr::new(172, 18, 0, 1), &c.net_ns);
    servers::http_hello(&outside, 8080);
    sh(&["ip", "-n", &c.net_ns, "addr", "add", "169.254.169.254/32", "dev", "lo"]);
    sh(&["ip", "-n", &c.node_ns, "route", "add", "169.254.169.254/32", "via", "172.18.0.1"]);
    servers::http_hello(&outside, 80);
    let a = Agent::start(&c, &c.yaml(""));
    let test = c.pod("test");

    let captured = outbound(&a);
    let r = curl(|args| test.cmd(args), &["http://169.254.169.254/latest/meta-data/"]);
    assert_eq!(r.code, 200, "{}{}", r.body, r.stderr);
    assert_eq!(r.body, "hello from outside; client 10.244.0.2\n");

    let r = curl(|args| test.cmd(args), &["http://172.18.0.1:8080/"]);
    assert_eq!(r.code, 200, "{}{}\n{}", r.body, r.stderr, a.log_text());
    assert_eq!(r.body, "hello from outside; client 10.244.0.2\n", "egress left with the node's address");
    // Counters are published together: once the second connection shows, the
    // first would have too, had it been captured.
    a.wait_metrics(5, "the egress connection captured", |m| {
        metric(m, "mesh_ebpf_packets_total", &[("counter", "assigned_outbound")]) > captured
    });
    assert_eq!(outbound(&a), captured + 1.0, "the metadata connection was captured");
    // Passed through as bytes (the mesh does not know the destination).
    a.wait_metrics(5, "the egress connection reported", |m| {
        metric(m, "istio_tcp_connections_opened_total", &[("source_workload", "test"), ("reporter", "source")]) >= 1.0
    });
}

#[test]
fn a_cidr_service_entry_opens_its_range_and_port_under_registry_only() {
    if !require_root("a_cidr_service_entry_opens_its_range_and_port_under_registry_only") {
        return;
    }
    // Outside: a server on 8080 and 80 at 172.18.0.1, and the same at
    // 172.18.5.1, outside the entry's range.
    let (c, outside) = test_and_outside();
    servers::http_hello(&outside, 80);
    sh(&["ip", "-n", &c.net_ns, "addr", "add", "172.18.5.1/32", "dev", "lo"]);
    sh(&["ip", "-n", &c.node_ns, "route", "add", "172.18.5.1/32", "via", "172.18.0.1"]);
    let config = r#"---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: outside-range, namespace: demo}
spec:
  hosts: [outside.internal]
  addresses: ["172.18.0.0/24"]
  ports: [{number: 8080, name: tcp, protocol: TCP}]
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ops-only, namespace: ops}
spec:
  hosts: [ops.internal]
  addresses: ["172.18.5.0/24"]
  exportTo: ["."]
  ports: [{number: 8080, name: tcp, protocol: TCP}]
  location: MESH_EXTERNAL
"#;
    let a = Agent::start(&c, &c.yaml(&registry_only(config)));
    let test = c.pod("test");
    // The positive control: in the range, on the entry's port.
    let r = curl(|args| test.cmd(args), &["http://172.18.0.1:8080/"]);
    assert_eq!(r.code, 200, "{}{}\n{}", r.body, r.stderr, a.log_text());
    // Out of the range (in another namespace's entry exported only to its
    // own), or another port in it: refused (REGISTRY_ONLY).
    let r = curl(|args| test.cmd(args), &["http://172.18.5.1:8080/"]);
    assert_ne!(r.code, 200, "out of the entry's range, in one not exported to demo: {}", r.body);
    let r = curl(|args| test.cmd(args), &["http://172.18.0.1:80/"]);
    assert_ne!(r.code, 200, "a port the entry does not list: {}", r.body);
    // Reported as the entry's host.
    a.wait_metrics(5, "the entry's connection reported", |m| {
        metric(m, "istio_tcp_connections_opened_total", &[("destination_service", "outside.internal")]) >= 1.0
    });
}

#[test]
fn wildcard_service_entries_admit_http_and_tls_by_host_under_registry_only() {
    if !require_root("wildcard_service_entries_admit_http_and_tls_by_host_under_registry_only") {
        return;
    }
    // Outside: an HTTP server on 8080 and a TLS server (openssl) on 8443.
    let (c, _outside) = test_and_outside();
    let certs = mesh_tests::certs::Certs::new(&format!("wild-{}", std::process::id()));
    let (crt, key) = certs.server("outside", "api.outside.test");
    let args = [
        "openssl",
        "s_server",
        "-quiet",
        "-www",
        "-accept",
        "8443",
        "-cert",
        crt.to_str().expect("a UTF-8 path"),
        "-key",
        key.to_str().expect("a UTF-8 path"),
    ];
    let _tls = mesh_tests::netns::Background::spawn_in(&c.net_ns, &args).expect("openssl s_server");
    let config = r#"---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: outside-wildcard, namespace: demo}
spec:
  hosts: ["*.outside.test"]
  ports: [{number: 8080, name: http, protocol: HTTP}, {number: 8443, name: tls, protocol: TLS}]
  location: MESH_EXTERNAL
  resolution: NONE
"#;
    let a = Agent::start(&c, &c.yaml(&registry_only(config)));
    let test = c.pod("test");
    // HTTP: a host under the wildcard passes; another is refused.
    let r = curl(|args| test.cmd(args), &["-H", "Host: api.outside.test", "http://172.18.0.1:8080/"]);
    assert_eq!(r.code, 200, "{}{}\n{}", r.body, r.stderr, a.log_text());
    let r = curl(|args| test.cmd(args), &["-H", "Host: api.elsewhere.test", "http://172.18.0.1:8080/"]);
    assert_ne!(r.code, 200, "a host no entry declares: {}", r.body);
    // TLS: the SNI under the wildcard passes (the server's page comes back);
    // another SNI is refused.
    let mut ok = false;
    for _ in 0..30 {
        let r = curl(
            |args| test.cmd(args),
            &["-k", "--resolve", "api.outside.test:8443:172.18.0.1", "https://api.outside.test:8443/"],
        );
        if r.code == 200 {
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(ok, "TLS naming a host under the wildcard was refused\n{}", a.log_text());
    let r = curl(
        |args| test.cmd(args),
        &["-k", "--resolve", "api.elsewhere.test:8443:172.18.0.1", "https://api.elsewhere.test:8443/"],
    );
    assert_ne!(r.code, 200, "TLS naming a host no entry declares");
    a.wait_metrics(5, "the wildcard entry's connection reported", |m| {
        metric(m, "istio_tcp_connections_opened_total", &[("destination_service", "*.outside.test")]) >= 1.0
    });
}
