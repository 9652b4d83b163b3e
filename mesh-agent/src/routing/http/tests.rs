use std::net::SocketAddrV4;

use hyper::header::{HeaderMap, HeaderValue};

use super::*;
use crate::{config::state_from_yaml, routing::l4::route_service};

const CLIENT: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 244, 1, 2);

struct NoState;

impl EndpointState for NoState {
    fn ejected(&self, _: &str, _: SocketAddrV4) -> bool {
        false
    }

    fn active(&self, _: &str, _: SocketAddrV4) -> u32 {
        0
    }
}

struct AllEjected;

impl EndpointState for AllEjected {
    fn ejected(&self, _: &str, _: SocketAddrV4) -> bool {
        true
    }

    fn active(&self, _: &str, _: SocketAddrV4) -> u32 {
        0
    }
}

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: hello-v1, namespace: demo, labels: {app: hello, version: v1}}
spec: {nodeName: n1}
status: {podIP: 10.244.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: hello-v2, namespace: demo, labels: {app: hello, version: v2}}
spec: {nodeName: n1}
status: {podIP: 10.244.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: demo, labels: {app: other}}
spec: {nodeName: n1}
status: {podIP: 10.244.0.4}
---
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: hello}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: demo}
spec:
  clusterIP: 10.96.0.11
  selector: {app: other}
  ports: [{name: http, port: 8000, targetPort: 9000}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hello, namespace: demo}
spec:
  host: hello
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
  - match: [{uri: {prefix: /other}, method: {exact: GET}}]
    route: [{destination: {host: other.demo}}]
    timeout: 0.5s
  - match: [{uri: {exact: /missing}}]
    route: [{destination: {host: hello, subset: v3}}]
  - route:
    - {destination: {host: hello, subset: v1}, weight: 80}
    - {destination: {host: hello, subset: v2}, weight: 20}
"#;

fn describe(d: &Decision) -> String {
    let r = match &d.route {
        Route::Service { endpoint, addr, .. } => format!("{} {addr}", endpoint.name),
        Route::Workload { workload, addr } => format!("pod {} {addr}", workload.name),
        Route::Passthrough { addr } => format!("passthrough {addr}"),
        Route::Refused { reason, .. } => format!("refused: {reason}"),
        Route::BlackHole { addr } => format!("black hole {addr}"),
    };
    match d.timeout() {
        Some(t) => format!("{r} timeout {t:?}"),
        None => r,
    }
}

#[test]
fn virtual_service_rules_in_order() {
    let s = state_from_yaml(CLUSTER);
    let mut v2 = HeaderMap::new();
    v2.insert("x-version", HeaderValue::from_static("v2"));
    let none = HeaderMap::new();
    let req = |method, path, headers| RequestView { method, path, headers, client: CLIENT, namespace: None };
    let orig = "10.96.0.10:80".parse().unwrap_or_else(|e| panic!("{e}"));
    // (request, random, expected)
    let cases = [
        (req("GET", "/", &v2), 0, "hello-v2 10.244.0.3:8080"),
        (req("GET", "/other/x?q=1", &none), 0, "other 10.244.0.4:9000 timeout 500ms"),
        (req("POST", "/other", &none), 0, "hello-v1 10.244.0.2:8080"),
        (req("GET", "/missing", &none), 0, "refused: no DestinationRule defines subset \"v3\""),
        (req("GET", "/", &none), 79, "hello-v1 10.244.0.2:8080"),
        (req("GET", "/", &none), 80, "hello-v2 10.244.0.3:8080"),
        (req("GET", "/", &none), 199, "hello-v2 10.244.0.3:8080"),
    ];
    for (r, random, want) in cases {
        assert_eq!(
            describe(&route_request(&s, orig, &r, 0, random, &NoState)),
            want,
            "{} {} {random}",
            r.method,
            r.path
        );
    }
    // Without rules for a Service, routing is the L4 default; pod IPs are unchanged.
    let other = "10.96.0.11:8000".parse().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(describe(&route_request(&s, other, &req("GET", "/", &none), 0, 0, &NoState)), "other 10.244.0.4:9000");
    let pod = "10.244.0.3:8080".parse().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        describe(&route_request(&s, pod, &req("GET", "/", &none), 0, 0, &NoState)),
        "pod hello-v2 10.244.0.3:8080"
    );
}

#[test]
fn weights_split_as_declared() {
    let s = state_from_yaml(CLUSTER);
    let none = HeaderMap::new();
    let orig = "10.96.0.10:80".parse().unwrap_or_else(|e| panic!("{e}"));
    let view = RequestView { method: "GET", path: "/", headers: &none, client: CLIENT, namespace: None };
    let v1 = (0..1000u64)
        .filter(|i| {
            let d = route_request(&s, orig, &view, 0, i.wrapping_mul(0x9e37_79b9_7f4a_7c15), &NoState);
            matches!(d.route, Route::Service { ref endpoint, .. } if &*endpoint.name == "hello-v1")
        })
        .count();
    assert!((750..=850).contains(&v1), "{v1} of 1000 to v1");
}

#[test]
fn rewrite_replaces_the_matched_prefix_or_the_path() {
    let cases = [
        ("/api/v1/items?x=1", Some("/api/"), "/", "/v1/items?x=1"),
        ("/api/v1/items", Some("/api"), "/backend", "/backend/v1/items"),
        ("/exact", None, "/other", "/other"),
        ("/exact?q", None, "/other", "/other?q"),
    ];
    for (path, prefix, uri, want) in cases {
        assert_eq!(rewrite_path(path, prefix, uri), want, "{path} {prefix:?} {uri}");
    }
}

#[test]
fn regex_and_query_parameter_matches() {
    let s = state_from_yaml(&format!(
        "{CLUSTER}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: other, namespace: demo}}
spec:
  hosts: [other]
  http:
  - match: [{{uri: {{regex: \"/items/[0-9]+\"}}, queryParams: {{debug: {{exact: \"1\"}}}}}}]
    route: [{{destination: {{host: hello, subset: v2}}}}]
  - route: [{{destination: {{host: other}}}}]
"
    ));
    let none = HeaderMap::new();
    let orig = "10.96.0.11:8000".parse().unwrap_or_else(|e| panic!("{e}"));
    let go = |path| {
        describe(&route_request(
            &s,
            orig,
            &RequestView { method: "GET", path, headers: &none, client: CLIENT, namespace: None },
            0,
            0,
            &NoState,
        ))
    };
    assert_eq!(go("/items/42?debug=1"), "hello-v2 10.244.0.3:8080");
    assert_eq!(go("/items/42?x=2&debug=1"), "hello-v2 10.244.0.3:8080");
    // The regex must match the whole path; the parameter must be present.
    assert_eq!(go("/items/42/more?debug=1"), "other 10.244.0.4:9000");
    assert_eq!(go("/items/42"), "other 10.244.0.4:9000");
    assert_eq!(go("/items/x?debug=1"), "other 10.244.0.4:9000");
}

#[test]
fn ejected_endpoints_are_left_out_unless_all_are() {
    let s = state_from_yaml(CLUSTER);
    let none = HeaderMap::new();
    let orig = "10.96.0.11:8000".parse().unwrap_or_else(|e| panic!("{e}"));
    let view = RequestView { method: "GET", path: "/", headers: &none, client: CLIENT, namespace: None };
    // `other` has one endpoint: ejected, it is still used (panic mode).
    let d = route_request(&s, orig, &view, 0, 0, &AllEjected);
    assert_eq!(describe(&d), "other 10.244.0.4:9000");
    assert_eq!(d.cluster.map(|c| (c.key, c.endpoints)), Some(("demo/other".to_owned(), 1)));
    // `hello` v1 ejected: the weights still pick v1's subset, whose only pod is
    // ejected, so it is used; in the whole Service the other pod would be chosen.
    let hello: SocketAddrV4 = "10.96.0.10:80".parse().unwrap_or_else(|e| panic!("{e}"));
    let v1 = "10.244.0.2:8080".parse::<SocketAddrV4>().unwrap_or_else(|e| panic!("{e}"));
    for pick in 0..4 {
        let r = crate::routing::l4::route_service(&s.by_vip[hello.ip()], 80, None, Pick::Turn(pick), &|a| a == v1);
        assert!(matches!(r, Route::Service { ref endpoint, .. } if &*endpoint.name == "hello-v2"), "{pick}");
    }
}

#[test]
fn consistent_hash_and_least_request() {
    // `hello` (two pods) with its DestinationRule hashing on a header.
    let hashed = CLUSTER.replace(
        "  host: hello\n  subsets:",
        "  host: hello\n  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: X-User}}}\n  subsets:",
    );
    let s = state_from_yaml(&hashed);
    let svc = &s.services["demo/hello"];
    let key = |user: &str| {
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_str(user).unwrap_or_else(|e| panic!("{e}")));
        h
    };
    let lb = &s.destination_rules[0].policy.load_balancer;
    assert_eq!(*lb, LoadBalancer::ConsistentHash(HashKey::Header("x-user".into())));
    let active = |_: SocketAddrV4| 0;
    let pick_for = |h: &HeaderMap, pick, random| {
        let view = RequestView { method: "GET", path: "/", headers: h, client: CLIENT, namespace: None };
        match route_service(svc, 80, None, choose_endpoint(lb, &view, pick, random, &active), &|_| false) {
            Route::Service { endpoint, .. } => endpoint.name.to_string(),
            other => format!("{other:?}"),
        }
    };
    // The same user always lands on the same pod, whatever the turn; users spread.
    let mut seen = std::collections::BTreeSet::new();
    for u in 0..20 {
        let h = key(&format!("user-{u}"));
        let first = pick_for(&h, 0, 0);
        assert!((1..10).all(|t| pick_for(&h, t, t as u64 * 7919) == first), "user-{u} moved");
        seen.insert(first);
    }
    assert_eq!(seen.len(), 2, "20 users all on one pod: {seen:?}");
    // LEAST_REQUEST: of two candidates the less loaded wins.
    let v1: SocketAddrV4 = "10.244.0.2:8080".parse().unwrap_or_else(|e| panic!("{e}"));
    let busy_v1 = |a: SocketAddrV4| if a == v1 { 10 } else { 0 };
    // random picks candidates 0 (v1) and 1 (v2).
    let random = 1u64 << 32;
    let how = Pick::LeastRequest { random, active: &busy_v1 };
    assert!(
        matches!(route_service(svc, 80, None, how, &|_| false), Route::Service { ref endpoint, .. } if &*endpoint.name == "hello-v2")
    );
}

#[test]
fn tcp_rules_by_port_and_weight() {
    let s = state_from_yaml(&format!(
        "{CLUSTER}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: other-tcp, namespace: demo}}
spec:
  hosts: [other]
  tcp:
  - match: [{{port: 8000}}]
    route: [{{destination: {{host: hello, subset: v2, port: {{number: 80}}}}}}]
"
    ));
    let go = |orig: &str| match route_tcp(&s, orig.parse().unwrap_or_else(|e| panic!("{e}")), None, 0, 0) {
        Some(Route::Service { endpoint, addr, .. }) => format!("{} {addr}", endpoint.name),
        Some(other) => format!("{other:?}"),
        None => "default".into(),
    };
    assert_eq!(go("10.96.0.11:8000"), "hello-v2 10.244.0.3:8080");
    // No tcp rule for hello itself.
    assert_eq!(go("10.96.0.10:80"), "default");
}

#[test]
fn host_patterns() {
    for (pattern, host, want) in [
        ("*", "anything", true),
        ("*.example.com", "a.example.com", true),
        ("*.example.com", "example.com", false),
        ("Example.com", "example.com", true),
        ("example.com", "example.org", false),
    ] {
        assert_eq!(host_matches(pattern, host), want, "{pattern} {host}");
    }
}

#[test]
fn export_to_limits_which_clients_the_rules_apply_to() {
    // The rules send everything to v2, for clients in `demo` only.
    let yaml = CLUSTER.replace(
        "  hosts: [hello.demo.svc.cluster.local]\n",
        "  hosts: [hello.demo.svc.cluster.local]\n  exportTo: [.]\n",
    );
    let s = state_from_yaml(&yaml);
    let mut v2 = HeaderMap::new();
    v2.insert("x-version", HeaderValue::from_static("v2"));
    let orig = "10.96.0.10:80".parse().unwrap_or_else(|e| panic!("{e}"));
    let asked = |namespace| {
        let view = RequestView { method: "GET", path: "/", headers: &v2, client: CLIENT, namespace };
        route_request(&s, orig, &view, 0, 0, &NoState).rule.is_some()
    };
    assert!(asked(Some("demo")), "a client in the exporting namespace gets the rules");
    assert!(!asked(Some("other")), "a client elsewhere gets the Service's default route");
    assert!(!asked(None), "a client of no namespace gets the default route");
}

#[test]
fn port_level_settings_apply_per_port_and_subset() {
    let s = state_from_yaml(&format!(
        "{CLUSTER}---
apiVersion: v1
kind: Service
metadata: {{name: multi, namespace: demo}}
spec:
  clusterIP: 10.96.0.12
  selector: {{app: hello}}
  ports: [{{name: http, port: 80, targetPort: 8080}}, {{name: http-admin, port: 90, targetPort: 8090}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: multi, namespace: demo}}
spec:
  host: multi
  trafficPolicy:
    loadBalancer: {{simple: RANDOM}}
    connectionPool: {{tcp: {{maxConnections: 1}}}}
    portLevelSettings:
    - port: {{number: 90}}
      loadBalancer: {{simple: LEAST_REQUEST}}
      tls: {{mode: SIMPLE, insecureSkipVerify: true}}
  subsets:
  - name: v1
    labels: {{version: v1}}
    trafficPolicy:
      outlierDetection: {{consecutive5xxErrors: 3}}
      portLevelSettings:
      - port: {{number: 80}}
        connectionPool: {{tcp: {{maxConnections: 7}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: multi, namespace: demo}}
spec:
  hosts: [multi]
  http:
  - match: [{{headers: {{x-subset: {{exact: v1}}}}}}]
    route: [{{destination: {{host: multi, subset: v1}}}}]
"
    ));
    let mut v1 = HeaderMap::new();
    v1.insert("x-subset", HeaderValue::from_static("v1"));
    let none = HeaderMap::new();
    let cluster = |orig: &str, headers: &HeaderMap| {
        let view = RequestView { method: "GET", path: "/", headers, client: CLIENT, namespace: None };
        let orig = orig.parse().unwrap_or_else(|e| panic!("{e}"));
        let c = route_request(&s, orig, &view, 0, 0, &NoState).cluster.unwrap_or_else(|| panic!("a cluster"));
        let p = &c.policy;
        let outlier = p.outlier.as_ref().map(|o| o.consecutive_5xx);
        (c.key, format!("{:?} {:?} tls={} {outlier:?}", p.load_balancer, p.pool.max_connections, p.tls.is_some()))
    };
    // (destination, headers, cluster key, policy)
    let cases = [
        ("10.96.0.12:80", &none, "demo/multi", "Random Some(1) tls=false None"),
        ("10.96.0.12:90", &none, "demo/multi|90", "LeastRequest Some(1) tls=true None"),
        ("10.96.0.12:80", &v1, "demo/multi|v1|80", "Random Some(7) tls=false Some(3)"),
        ("10.96.0.12:90", &v1, "demo/multi|v1|90", "LeastRequest Some(1) tls=true Some(3)"),
    ];
    for (orig, headers, key, policy) in cases {
        assert_eq!(cluster(orig, headers), (key.to_owned(), policy.to_owned()), "{orig} {headers:?}");
    }
}

mod edge;
mod gamma;
mod lookup;
mod samples;
