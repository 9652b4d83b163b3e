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
