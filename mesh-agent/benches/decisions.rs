//! The agent's hot pure functions, per call: the routing decision (L4 and
//! per request), policy evaluation, and header handling.
//!
//! `cargo bench -p mesh-agent --bench decisions` (add `-- --quick` for a
//! short run). The state is loaded from YAML through the same code the agent
//! uses, so these measure what a request meets in production.
use std::{
    hint::black_box,
    net::{Ipv4Addr, SocketAddrV4},
};

use criterion::{Criterion, criterion_group, criterion_main};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use mesh_agent::{
    proxy::http as l7,
    routing::{
        http::{EndpointState, RequestView, route_request},
        l4::route,
        policy::{Peer, authorize},
        protocol::sniff,
    },
    state::{
        State,
        traffic::{HeaderOps, HeaderPair},
    },
};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec: {nodeName: n1, serviceAccountName: client}
status: {podIP: 10.244.0.9}
---
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: hello}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hello, namespace: demo}
spec:
  host: hello
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hello, namespace: demo}
spec:
  hosts: [hello.demo.svc.cluster.local]
  http:
  - match: [{headers: {x-version: {exact: v2}}}]
    route: [{destination: {host: hello, subset: v2}}]
  - match: [{uri: {regex: "/api/v[0-9]+/users/.*"}, method: {exact: POST}}]
    route: [{destination: {host: hello, subset: v2}}]
  - match: [{uri: {prefix: /static}}]
    route: [{destination: {host: hello, subset: v1}}]
  - route:
    - {destination: {host: hello, subset: v1}, weight: 90}
    - {destination: {host: hello, subset: v2}, weight: 10}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: demo}
spec:
  selector: {matchLabels: {app: hello}}
  action: DENY
  rules: [{from: [{source: {namespaces: [legacy]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-clients, namespace: demo}
spec:
  selector: {matchLabels: {app: hello}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/admin]}}]
  - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]
    to: [{operation: {ports: ["8080"]}}]
"#;

/// The state with 20 endpoints for `hello` (v1 and v2), on two nodes.
fn state() -> State {
    let mut yaml = CLUSTER.to_owned();
    for i in 0..20 {
        let version = if i % 2 == 0 { "v1" } else { "v2" };
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: hello-{i}, namespace: demo, labels: {{app: hello, version: {version}}}}}\nspec: {{nodeName: n{}, serviceAccountName: hello}}\nstatus: {{podIP: 10.244.1.{}}}\n",
            i % 2 + 1,
            i + 10
        ));
    }
    let dir = std::env::temp_dir().join(format!("mesh-agent-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("cluster.yaml");
    std::fs::write(&file, yaml).expect("write config");
    let loaded = mesh_agent::config::load(&file, "cluster.local").expect("valid config");
    let _ = std::fs::remove_dir_all(&dir);
    loaded.state
}

struct Healthy;

impl EndpointState for Healthy {
    fn ejected(&self, _: &str, _: SocketAddrV4) -> bool {
        false
    }

    fn active(&self, _: &str, _: SocketAddrV4) -> u32 {
        0
    }
}

/// What a browser-ish client sends.
fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "hello.demo.svc.cluster.local"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) bench"),
        ("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "en-US,en;q=0.5"),
        ("connection", "keep-alive, x-hop"),
        ("x-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("x-request-id", "6f1c7d4e-0a8b-4c3d-9e2f-1a2b3c4d5e6f"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("cookie", "session=abcdef0123456789; theme=dark"),
    ] {
        h.append(k, HeaderValue::from_static(v));
    }
    h
}

fn routing(c: &mut Criterion) {
    let state = state();
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
    let client = Ipv4Addr::new(10, 244, 0, 9);
    let headers = request_headers();
    let mut g = c.benchmark_group("routing");
    let mut pick = 0usize;
    g.bench_function("l4 service vip", |b| {
        b.iter(|| {
            pick = pick.wrapping_add(1);
            route(black_box(&state), black_box(vip), None, pick)
        })
    });
    let pod = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 12), 8080);
    g.bench_function("l4 pod ip", |b| b.iter(|| route(black_box(&state), black_box(pod), None, 0)));
    let default_rule =
        RequestView { method: "GET", path: "/index.html?x=1", headers: &headers, client, namespace: None };
    g.bench_function("l7 request, 4th rule (weighted)", |b| {
        b.iter(|| {
            pick = pick.wrapping_add(1);
            route_request(black_box(&state), vip, black_box(&default_rule), pick, pick as u64, &Healthy)
        })
    });
    let regex = RequestView { method: "POST", path: "/api/v2/users/42", headers: &headers, client, namespace: None };
    g.bench_function("l7 request, regex rule", |b| {
        b.iter(|| route_request(black_box(&state), vip, black_box(&regex), 0, 0, &Healthy))
    });
    g.finish();
}

fn policy(c: &mut Criterion) {
    let state = state();
    let dest = state.workload_by_ip(Ipv4Addr::new(10, 244, 1, 12)).expect("pod").clone();
    let allowed =
        Peer { principal: Some("spiffe://cluster.local/ns/demo/sa/client"), ip: Ipv4Addr::new(10, 244, 0, 9) };
    let denied = Peer { principal: Some("spiffe://cluster.local/ns/legacy/sa/old"), ip: Ipv4Addr::new(10, 244, 0, 8) };
    let mut g = c.benchmark_group("policy");
    g.bench_function("authorize allowed (2 policies)", |b| {
        b.iter(|| authorize(black_box(&state), (&*dest).into(), black_box(&allowed), 8080))
    });
    g.bench_function("authorize denied by DENY", |b| {
        b.iter(|| authorize(black_box(&state), (&*dest).into(), black_box(&denied), 8080))
    });
    g.finish();
}

fn headers(c: &mut Criterion) {
    let template = request_headers();
    let ops = HeaderOps {
        set: vec![HeaderPair(HeaderName::from_static("x-mesh"), HeaderValue::from_static("on"))],
        add: vec![HeaderPair(HeaderName::from_static("x-forwarded-client"), HeaderValue::from_static("client"))],
        remove: vec![HeaderName::from_static("cookie")],
    };
    let mut g = c.benchmark_group("headers");
    g.bench_function("strip hop-by-hop (12 headers)", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |h| l7::strip_hop_by_hop(black_box(h), false),
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("rule header set/add/remove", |b| {
        b.iter_batched_ref(|| template.clone(), |h| ops.apply(black_box(h)), criterion::BatchSize::SmallInput)
    });
    g.bench_function("sniff HTTP/1.1 request line", |b| b.iter(|| sniff(black_box(b"GET /index.html HTTP/1.1\r\n"))));
    g.bench_function("sniff HTTP/2 preface", |b| b.iter(|| sniff(black_box(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))));
    g.finish();
}

/// What each request costs the metrics: its label set (from the connection's
/// workloads and Service) and Istio's four request metrics.
fn telemetry(c: &mut Criterion) {
    use mesh_agent::telemetry::{Metrics, RequestLabels, TcpLabels};
    let state = state();
    let source = state.workload_by_ip(Ipv4Addr::new(10, 244, 0, 9)).expect("client").clone();
    let dest = state.workload_by_ip(Ipv4Addr::new(10, 244, 1, 12)).expect("pod").clone();
    let service = state.by_vip.get(&Ipv4Addr::new(10, 96, 0, 10)).expect("service").clone();
    let metrics = Metrics::new();
    let mut g = c.benchmark_group("telemetry");
    g.bench_function("request labels + 4 metric updates", |b| {
        b.iter(|| {
            let tcp = TcpLabels::new(Some(&source), Some(&dest), Some(&service), false);
            let labels = RequestLabels::new(tcp, "http", 200, "-", mesh_agent::telemetry::Flags::NONE);
            metrics.requests.get_or_create(&labels).inc();
            metrics.request_duration.get_or_create(&labels).observe(0.4);
            metrics.request_bytes.get_or_create(&labels).observe(0.0);
            metrics.response_bytes.get_or_create(&labels).observe(1024.0);
        })
    });
    g.finish();
}

criterion_group!(benches, routing, policy, headers, telemetry);
criterion_main!(benches);
