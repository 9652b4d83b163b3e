use std::net::SocketAddrV4;

use hyper::header::{HeaderMap, HeaderValue};

use super::*;
use crate::config::state_from_yaml;

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
    let req = |method, path, headers| RequestView { method, path, headers };
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
            describe(&route_request(&s, orig, &r, 0, random, &|_, _| false)),
            want,
            "{} {} {random}",
            r.method,
            r.path
        );
    }
    // Without rules for a Service, routing is the L4 default; pod IPs are unchanged.
    let other = "10.96.0.11:8000".parse().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        describe(&route_request(&s, other, &req("GET", "/", &none), 0, 0, &|_, _| false)),
        "other 10.244.0.4:9000"
    );
    let pod = "10.244.0.3:8080".parse().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        describe(&route_request(&s, pod, &req("GET", "/", &none), 0, 0, &|_, _| false)),
        "pod hello-v2 10.244.0.3:8080"
    );
}

#[test]
fn weights_split_as_declared() {
    let s = state_from_yaml(CLUSTER);
    let none = HeaderMap::new();
    let orig = "10.96.0.10:80".parse().unwrap_or_else(|e| panic!("{e}"));
    let view = RequestView { method: "GET", path: "/", headers: &none };
    let v1 = (0..1000u64)
        .filter(|i| {
            let d = route_request(&s, orig, &view, 0, i.wrapping_mul(0x9e37_79b9_7f4a_7c15), &|_, _| false);
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
        describe(&route_request(&s, orig, &RequestView { method: "GET", path, headers: &none }, 0, 0, &|_, _| false))
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
    let view = RequestView { method: "GET", path: "/", headers: &none };
    // `other` has one endpoint: ejected, it is still used (panic mode).
    let d = route_request(&s, orig, &view, 0, 0, &|_, _| true);
    assert_eq!(describe(&d), "other 10.244.0.4:9000");
    assert_eq!(d.cluster.map(|c| (c.key, c.endpoints)), Some(("demo/other".to_owned(), 1)));
    // `hello` v1 ejected: the weights still pick v1's subset, whose only pod is
    // ejected, so it is used; in the whole Service the other pod would be chosen.
    let hello: SocketAddrV4 = "10.96.0.10:80".parse().unwrap_or_else(|e| panic!("{e}"));
    let v1 = "10.244.0.2:8080".parse::<SocketAddrV4>().unwrap_or_else(|e| panic!("{e}"));
    for pick in 0..4 {
        let r = crate::route::route_service(&s.by_vip[hello.ip()], 80, None, pick, &|a| a == v1);
        assert!(matches!(r, Route::Service { ref endpoint, .. } if &*endpoint.name == "hello-v2"), "{pick}");
    }
}
