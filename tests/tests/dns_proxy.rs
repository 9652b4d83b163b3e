//! The DNS proxy (root): a meshed pod's queries to its nameserver (a
//! cluster DNS address nothing serves here) are captured at its veth and
//! answered by the agent — Services, ServiceEntry hosts with an allocated
//! address that then routes, the rest forwarded to the node's resolver (a
//! DNS server this test runs) — over UDP (getent, dig) and TCP (dig +tcp);
//! a pod that opts out is left alone.

use std::net::Ipv4Addr;

use mesh_tests::{
    Agent, Pod,
    agent::metric,
    clients::curl,
    dns::{DnsServer, Reply},
    egress::{PodResolvConf, ResolvConf, outside_addresses, test_and_outside, which_address},
    fixture::PodSpec,
    require_root,
};

/// Where the pods think their DNS server is (kube-dns's usual address):
/// nothing answers there, so every answer they get is the agent's.
const CLUSTER_DNS: &str = "10.96.0.10";

fn getent(pod: &Pod, name: &str) -> Option<String> {
    let out = pod.cmd(&["getent", "ahostsv4", name]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    out.status.success().then(|| text.split_whitespace().next().unwrap_or_default().to_owned())
}

fn dig(pod: &Pod, args: &[&str]) -> String {
    let server = format!("@{CLUSTER_DNS}");
    let mut all = vec!["dig", "+short", "+time=2", "+tries=1", server.as_str()];
    all.extend_from_slice(args);
    String::from_utf8_lossy(&pod.cmd(&all).stdout).trim().to_owned()
}

#[test]
fn the_dns_proxy_answers_meshed_pods_for_the_mesh_and_forwards_the_rest() {
    if !require_root("the_dns_proxy_answers_meshed_pods_for_the_mesh_and_forwards_the_rest") {
        return;
    }
    let (mut c, outside) = test_and_outside();
    let opt_out = [("ambient.istio.io/dns-capture", "\"false\"")];
    let spec = PodSpec { annotations: &opt_out, ..PodSpec::app("demo", &[("app", "own-dns")]) };
    c.add_pod(0, "own-dns", Ipv4Addr::new(10, 244, 0, 3), spec);
    outside_addresses(&c, &["172.18.5.1"]);
    which_address(&outside, 9090);
    // The node's resolver: knows outside names, and a public answer for the
    // entry's host that the mesh must not give.
    let dns = DnsServer::start(&outside);
    dns.set("www.outside.test", Reply::A(vec![Ipv4Addr::new(172, 18, 0, 1)], 60));
    dns.set("db.internal", Reply::A(vec![Ipv4Addr::new(198, 51, 100, 99)], 60));
    let config = r#"---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.0.50, selector: {app: web}, ports: [{port: 80, name: http}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: demo}
spec:
  hosts: [db.internal]
  ports: [{number: 9090, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 172.18.5.1}]
"#;
    let resolv = ResolvConf::new("172.18.0.1");
    let a = Agent::start_on(&c, 0, &c.yaml(config), &resolv.args(&[]));
    let test = c.pod("test");
    let _test_dns = PodResolvConf::cluster_first(test, "demo", CLUSTER_DNS);
    let own = c.pod("own-dns");
    let _own_dns = PodResolvConf::cluster_first(own, "demo", CLUSTER_DNS);

    // A Service by its short name (the pod's search list), over UDP.
    assert_eq!(getent(test, "web").as_deref(), Some("10.96.0.50"), "{}", a.log_text());
    // A ServiceEntry host without addresses: its allocated address, which
    // routes to the entry's endpoint.
    let db = getent(test, "db.internal").expect("db.internal answered");
    assert!(db.starts_with("240.240."), "{db}");
    let r = curl(|args| test.cmd(args), &["http://db.internal:9090/"]);
    assert_eq!((r.code, r.body.as_str()), (200, "172.18.5.1"), "{}\n{}", r.stderr, a.log_text());
    // Anything else: the node's resolver's answer.
    assert_eq!(getent(test, "www.outside.test").as_deref(), Some("172.18.0.1"));
    assert_eq!(getent(test, "nothing.outside.test"), None, "NXDOMAIN passed on");
    // Over TCP too.
    assert_eq!(dig(test, &["+tcp", "web.demo.svc.cluster.local"]), "10.96.0.50");
    assert_eq!(dig(test, &["+tcp", "www.outside.test"]), "172.18.0.1");
    // The pod that opted out asks its own server (nobody, here).
    assert_eq!(getent(own, "web"), None, "an opted-out pod's DNS was answered");
    // UDP queries were assigned to the proxy by the classifier (counters are
    // published at each resync).
    let m = a.wait_metrics(10, "DNS queries assigned", |m| {
        metric(m, "mesh_ebpf_packets_total", &[("counter", "assigned_dns")]) >= 3.0
    });
    assert!(metric(&m, "istio_dns_requests_total", &[("source_workload", "test")]) >= 6.0);
    assert!(metric(&m, "istio_dns_upstream_requests_total", &[]) >= 2.0);
    assert_eq!(dns.asked("db.internal"), 0, "the entry's host was answered by the mesh");
}
