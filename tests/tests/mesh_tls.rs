//! VirtualService `tls` rules for mesh traffic (root): a meshed client's TLS
//! to a Service is routed by its server name, peeked at the source agent and
//! not consumed, to the Service the matching rule names; the TLS stays the
//! client's, end to end (it verifies the server it reached).

use std::net::Ipv4Addr;

use mesh_tests::{
    Agent,
    agent::metric,
    clients::curl,
    fixture::{Fixture, PodSpec},
    netns::Background,
    require_root,
};

const CONFIG: &str = r#"---
apiVersion: v1
kind: Service
metadata: {name: tls-a, namespace: demo}
spec: {clusterIP: 10.96.0.70, selector: {app: tls-a}, ports: [{name: tls, port: 443}]}
---
apiVersion: v1
kind: Service
metadata: {name: tls-b, namespace: demo}
spec: {clusterIP: 10.96.0.71, selector: {app: tls-b}, ports: [{name: tls, port: 443}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: by-name, namespace: demo}
spec:
  hosts: [tls-a.demo.svc.cluster.local]
  tls:
  - match: [{port: 443, sniHosts: [b.example]}]
    route: [{destination: {host: tls-b.demo.svc.cluster.local, port: {number: 443}}}]
  - match: [{port: 443, sniHosts: [a.example]}]
    route: [{destination: {host: tls-a.demo.svc.cluster.local, port: {number: 443}}}]
"#;

#[test]
fn mesh_tls_rules_route_a_services_connections_by_server_name() {
    if !require_root("mesh_tls_rules_route_a_services_connections_by_server_name") {
        return;
    }
    let mut c = Fixture::one_node();
    c.add_pod(0, "test", Ipv4Addr::new(10, 244, 0, 2), PodSpec::app("demo", &[("app", "test")]));
    c.add_pod(0, "tls-a", Ipv4Addr::new(10, 244, 0, 3), PodSpec::app("demo", &[("app", "tls-a")]));
    c.add_pod(0, "tls-b", Ipv4Addr::new(10, 244, 0, 4), PodSpec::app("demo", &[("app", "tls-b")]));
    let certs = mesh_tests::certs::Certs::new(&format!("mesh-tls-{}", std::process::id()));
    let mut servers = Vec::new();
    for (pod, host) in [("tls-a", "a.example"), ("tls-b", "b.example")] {
        let (crt, key) = certs.server(pod, host);
        let (crt, key) = (crt.display().to_string(), key.display().to_string());
        let args = ["openssl", "s_server", "-quiet", "-www", "-accept", "443", "-cert", &crt, "-key", &key];
        servers.push(Background::spawn_in(&c.pod(pod).netns, &args).expect("openssl s_server"));
    }
    let a = Agent::start(&c, &c.yaml(CONFIG));
    let test = c.pod("test");
    let ca = certs.ca().display().to_string();
    // Each name verifies only against its own server's certificate: a 200
    // says which server the connection reached.
    let get = |host: &str| {
        let resolve = format!("{host}:443:10.96.0.70");
        curl(|args| test.cmd(args), &["--cacert", &ca, "--resolve", &resolve, &format!("https://{host}/")])
    };
    let mut reached = false;
    for _ in 0..30 {
        if get("a.example").code == 200 {
            reached = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(reached, "a.example to tls-a\n{}", a.log_text());
    let r = get("b.example");
    assert_eq!(r.code, 200, "b.example, addressed to tls-a, routed to tls-b: {}{}", r.body, r.stderr);
    a.wait_metrics(5, "the rerouted connection reported", |m| {
        metric(m, "istio_tcp_connections_opened_total", &[("destination_service", "tls-b.demo.svc.cluster.local")])
            >= 1.0
    });
}
