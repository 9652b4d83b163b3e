use std::net::SocketAddrV4;

use super::*;

fn state(yaml: &str) -> State {
    crate::config::state_from_yaml(yaml)
}

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: hello-a, namespace: demo, labels: {app: hello}}
spec:
  nodeName: n1
  containers: [{name: c, ports: [{name: http, containerPort: 9095}]}]
status: {podIP: 10.244.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: hello-b, namespace: demo, labels: {app: hello}}
spec:
  nodeName: n1
  containers: [{name: c, ports: [{name: http, containerPort: 9096}]}]
status: {podIP: 10.244.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: hello-c, namespace: demo, labels: {app: hello}}
spec: {nodeName: n1}
status:
  podIP: 10.244.0.4
  phase: Running
  conditions: [{type: Ready, status: "False"}]
---
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: hello}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: raw, port: 81, targetPort: 7000}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: demo}
spec:
  clusterIP: 10.96.0.11
  selector: {app: nothing}
  ports: [{port: 80}]
"#;

fn addr(s: &str) -> SocketAddrV4 {
    s.parse().expect("addr")
}

fn describe(r: &Route) -> String {
    match r {
        Route::Service { service, endpoint, addr, protocol } => {
            format!("svc {} -> {} {addr} {protocol:?}", service.name, endpoint.name)
        }
        Route::Workload { workload, addr } => format!("pod {} {addr}", workload.name),
        Route::Passthrough { addr } => format!("passthrough {addr}"),
        Route::Refused { service, reason } => format!("refused {}: {reason}", service.name),
        Route::BlackHole { addr } => format!("black hole {addr}"),
    }
}

#[test]
fn routing_table() {
    let s = state(CLUSTER);
    let cases = [
        // Named targetPort resolves per pod; the unready pod is skipped.
        ("10.96.0.10:80", 0, "svc hello -> hello-a 10.244.0.2:9095 Http"),
        ("10.96.0.10:80", 1, "svc hello -> hello-b 10.244.0.3:9096 Http"),
        ("10.96.0.10:80", 2, "svc hello -> hello-a 10.244.0.2:9095 Http"),
        // Numeric targetPort.
        ("10.96.0.10:81", 1, "svc hello -> hello-b 10.244.0.3:7000 Unknown"),
        // UDP-only and unknown ports are refused for TCP.
        ("10.96.0.10:53", 0, "refused hello: the Service has no TCP port 53"),
        ("10.96.0.10:8080", 0, "refused hello: the Service has no TCP port 8080"),
        ("10.96.0.11:80", 0, "refused empty: no ready endpoint for port 80"),
        // Pod IPs go to the pod, whatever the port; others pass through.
        ("10.244.0.3:1234", 0, "pod hello-b 10.244.0.3:1234"),
        ("10.244.0.4:9095", 0, "pod hello-c 10.244.0.4:9095"),
        ("192.0.2.1:443", 0, "passthrough 192.0.2.1:443"),
    ];
    for (dst, pick, want) in cases {
        assert_eq!(describe(&route(&s, addr(dst), None, pick)), want, "dst {dst} pick {pick}");
    }
}

#[test]
fn round_robin_spreads_evenly() {
    let s = state(CLUSTER);
    let mut counts = std::collections::BTreeMap::new();
    for pick in 0..100 {
        if let Route::Service { endpoint, .. } = route(&s, addr("10.96.0.10:80"), None, pick) {
            *counts.entry(endpoint.name.to_string()).or_insert(0) += 1;
        }
    }
    assert_eq!(counts.into_iter().collect::<Vec<_>>(), [("hello-a".into(), 50), ("hello-b".into(), 50)]);
}

/// Istio's `samples/external/github.yaml`, as shipped (TCP to GitHub's
/// ranges on port 22, HTTPS by host), under REGISTRY_ONLY, with a wider
/// range of another namespace's for 22 and 443.
const GITHUB: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |-
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: github-https
spec:
  hosts:
  - github.com
  ports:
  - number: 443
    name: https
    protocol: HTTPS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: github-tcp
spec:
  hosts:
  - dummy.github.com # not used
  addresses: # from https://help.github.com/articles/about-github-s-ip-addresses/
  - "13.229.188.59/32"
  - "13.250.177.223/32"
  - "140.82.112.0/20"
  - "18.194.104.89/32"
  - "18.195.85.27/32"
  - "185.199.108.0/22"
  - "185.199.108.153/32"
  - "185.199.109.153/32"
  - "185.199.110.153/32"
  - "185.199.111.153/32"
  - "192.30.252.0/22"
  - "192.30.252.153/32"
  - "192.30.252.154/32"
  - "23.20.92.3/32"
  - "35.159.8.160/32"
  - "52.74.223.119/32"
  - "54.166.52.62/32"
  - "54.87.5.173/32"
  ports:
  - name: tcp
    number: 22
    protocol: tcp
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wide, namespace: ops}
spec:
  hosts: [wide.example]
  addresses: ["140.82.0.1/16"]
  ports: [{name: tcp, number: 22, protocol: TCP}, {name: tls, number: 443, protocol: TLS}]
"#;

#[test]
fn cidr_service_entries_take_their_ranges_by_port_and_longest_prefix() {
    let s = state(GITHUB);
    let cases = [
        // In the /20 on 22: GitHub's entry, to the address dialed.
        ("140.82.112.5:22", "svc dummy.github.com -> unknown 140.82.112.5:22"),
        ("140.82.127.255:22", "svc dummy.github.com -> unknown 140.82.127.255:22"),
        // One of its /32 addresses.
        ("13.229.188.59:22", "svc dummy.github.com -> unknown 13.229.188.59:22"),
        // In the /16 only (or on a port the /20 lacks): the wider entry.
        ("140.82.200.1:22", "svc wide.example -> unknown 140.82.200.1:22"),
        ("140.82.112.5:443", "svc wide.example -> unknown 140.82.112.5:443"),
        // Out of every range, or a port no entry of the range has: refused.
        ("140.83.0.1:22", "black hole 140.83.0.1:22"),
        ("185.199.108.5:443", "black hole 185.199.108.5:443"),
        ("8.8.8.8:22", "black hole 8.8.8.8:22"),
    ];
    for (dst, want) in cases {
        let got = describe(&route(&s, addr(dst), Some("demo"), 0));
        // Without the declared protocol a Service route ends with.
        let got =
            if got.starts_with("svc ") { got.rsplit_once(' ').map_or(got.clone(), |(a, _)| a.to_owned()) } else { got };
        assert_eq!(got, want, "dst {dst}");
    }
}

#[test]
fn a_service_entry_is_seen_only_where_it_is_exported() {
    let entries = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |-
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: ops}
spec:
  hosts: [db.ops.example]
  addresses: [192.0.2.50, 198.18.0.0/16]
  exportTo: ["."]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shared, namespace: ops}
spec:
  hosts: [cache.ops.example]
  addresses: [192.0.2.51]
  exportTo: [".", demo]
  ports: [{number: 6379, name: tcp, protocol: TCP}]
"#;
    let s = state(entries);
    let at = |dst: &str, ns: &str| {
        let r = describe(&route(&s, addr(dst), Some(ns), 0));
        if r.starts_with("svc ") { r.rsplit_once(' ').map_or(r.clone(), |(a, _)| a.to_owned()) } else { r }
    };
    // Its own namespace sees it; another does not (REGISTRY_ONLY refuses),
    // by address and by range alike.
    assert_eq!(at("192.0.2.50:5432", "ops"), "svc db.ops.example -> unknown 192.0.2.50:5432");
    assert_eq!(at("198.18.3.4:5432", "ops"), "svc db.ops.example -> unknown 198.18.3.4:5432");
    assert_eq!(at("192.0.2.50:5432", "demo"), "black hole 192.0.2.50:5432");
    assert_eq!(at("198.18.3.4:5432", "demo"), "black hole 198.18.3.4:5432");
    // Exported to demo by name: demo sees it, other does not.
    assert_eq!(at("192.0.2.51:6379", "demo"), "svc cache.ops.example -> unknown 192.0.2.51:6379");
    assert_eq!(at("192.0.2.51:6379", "other"), "black hole 192.0.2.51:6379");
    // By host, too.
    assert!(s.external_for_host("db.ops.example", Some("demo")).is_none());
    assert!(s.external_for_host("db.ops.example", Some("ops")).is_some());
}

/// A ServiceEntry's `subjectAltNames` pin the identity of the pods its
/// `workloadSelector` takes: a tenant's pod that wears the labels but runs
/// as another service account is never routed to (attack), the listed
/// identity's pod is (positive control); without the field, both are.
#[test]
fn subject_alt_names_keep_a_look_alike_pod_out_of_an_entrys_endpoints() {
    let pods = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: demo, labels: {app: db}}
spec: {nodeName: n1, serviceAccountName: db}
status: {podIP: 10.244.0.20}
---
apiVersion: v1
kind: Pod
metadata: {name: impostor, namespace: demo, labels: {app: db}}
spec: {nodeName: n1, serviceAccountName: intruder}
status: {podIP: 10.244.0.21}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: demo}
spec:
  hosts: [db.internal]
  addresses: [10.200.0.5]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
  workloadSelector: {labels: {app: db}}
"#;
    let reached = |yaml: &str| {
        let s = state(yaml);
        let dst = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 200, 0, 5), 5432);
        (0..8)
            .map(|pick| match route(&s, dst, Some("demo"), pick) {
                Route::Service { endpoint, .. } => endpoint.name.to_string(),
                other => format!("{other:?}"),
            })
            .collect::<std::collections::BTreeSet<_>>()
    };
    let open: Vec<&str> = vec!["db-1", "impostor"];
    assert_eq!(reached(pods).iter().map(String::as_str).collect::<Vec<_>>(), open, "without the field: any pod");
    let pinned = format!("{pods}  subjectAltNames: [\"spiffe://cluster.local/ns/demo/sa/db\"]\n");
    assert_eq!(reached(&pinned).iter().map(String::as_str).collect::<Vec<_>>(), ["db-1"]);
    // Nobody proves a listed identity: no endpoint, never another one.
    let nobody = format!("{pods}  subjectAltNames: [\"spiffe://cluster.local/ns/demo/sa/other\"]\n");
    let got = reached(&nobody);
    assert!(got.iter().all(|r| r.contains("NoReadyEndpoint")), "{got:?}");
}
