//! The Gateway API inside the mesh (GAMMA), with curl through real capture
//! (root, two nodes): HTTPRoutes attached to Service `ver` (v1 on node-2, v2
//! on node-1) split its traffic by header and path, rewrite, add headers and
//! redirect and mirror, at the source agent; another namespace's route for the same
//! Service changes its own clients' traffic alone.

use mesh_tests::{mesh::*, require_root};

const ROUTES: &str = r#"---
apiVersion: v1
kind: Service
metadata: {name: ver-v1, namespace: demo}
spec: {clusterIP: 10.96.0.15, selector: {app: ver, version: v1}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ver-v2, namespace: demo}
spec: {clusterIP: 10.96.0.16, selector: {app: ver, version: v2}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ver-split, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: ver, port: 80}]
  rules:
  - matches: [{headers: [{name: x-version, value: v2}]}]
    backendRefs: [{name: ver-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    filters:
    - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}
    - {type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-routed, value: gamma}]}}
    backendRefs: [{name: ver-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /mirrored}}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: ver-v2, port: 80}}}]
    backendRefs: [{name: ver-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - {type: RequestRedirect, requestRedirect: {statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}
  - backendRefs: [{name: ver-v1, port: 80, weight: 1}, {name: ver-v2, port: 80, weight: 0}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: my-ver, namespace: other}
spec:
  parentRefs: [{group: "", kind: Service, name: ver, namespace: demo}]
  rules:
  - backendRefs: [{name: ver-v2, namespace: demo, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: other-routes, namespace: demo}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: other}]
  to: [{group: "", kind: Service, name: ver-v2}]
"#;

fn get(pod: &mesh_tests::Pod, args: &[&str]) -> String {
    let mut v = vec!["curl", "-s", "-i", "--max-time", "5"];
    v.extend_from_slice(args);
    String::from_utf8_lossy(&pod.cmd(&v).stdout).into_owned()
}

#[test]
fn http_routes_attached_to_a_service_route_its_mesh_traffic() {
    if !require_root("http_routes_attached_to_a_service_route_its_mesh_traffic") {
        return;
    }
    let m = Mesh::start(ROUTES, &[]);
    let (test, sleep) = (m.pod("test"), m.pod("sleep"));
    let url = |path: &str| format!("http://{VER_VIP}{path}");
    // The default rule: weight 0 gets nothing, so every request goes to v1
    // (without the route, ver's two pods share it).
    for _ in 0..6 {
        let out = get(test, &[&url("/hello")]);
        assert!(out.contains("hello from ver-v1"), "{out}");
    }
    // A header match first.
    let out = get(test, &["-H", "x-version: v2", &url("/hello")]);
    assert!(out.contains("hello from ver-v2"), "{out}");
    // A path prefix, rewritten to / and a header added on the way.
    let out = get(test, &[&url("/v2/headers")]);
    assert!(out.starts_with("HTTP/1.1 200") && out.contains("x-routed: gamma"), "{out}");
    // /v2x is not under /v2: the default rule.
    let out = get(test, &[&url("/v2x")]);
    assert!(out.contains("hello from ver-v1"), "{out}");
    // A redirect answered by the source agent, the prefix replaced.
    let out = get(test, &[&url("/old/page?q=1")]);
    assert!(out.starts_with("HTTP/1.1 301"), "{out}");
    assert!(out.to_ascii_lowercase().contains(&format!("location: http://{VER_VIP}/new/page?q=1")), "{out}");
    // A mirror: v1 answers, v2 gets a copy (Envoy's `-shadow` authority).
    for i in 0..3 {
        let out = get(test, &[&url(&format!("/mirrored/{i}"))]);
        assert!(out.contains("hello from ver-v1"), "{out}");
    }
    let mut seen = String::new();
    for _ in 0..50 {
        seen = get(test, &[&format!("http://{VER_V2_IP}:8080/seen")]);
        if (0..3).all(|i| seen.contains(&format!("ver-v2 /mirrored/{i} {VER_VIP}-shadow"))) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!((0..3).all(|i| seen.contains(&format!("ver-v2 /mirrored/{i} {VER_VIP}-shadow"))), "{seen}");
    // Another namespace's route: its own clients only.
    for _ in 0..4 {
        let out = get(sleep, &[&url("/hello")]);
        assert!(out.contains("hello from ver-v2"), "the consumer route for other/sleep: {out}");
    }
    let out = get(test, &[&url("/hello")]);
    assert!(out.contains("hello from ver-v1"), "demo's clients keep demo's route: {out}");
}

#[test]
fn a_grpc_route_attached_to_a_service_routes_by_method_and_metadata() {
    if !require_root("a_grpc_route_attached_to_a_service_routes_by_method_and_metadata") {
        return;
    }
    let route = r#"---
apiVersion: v1
kind: Service
metadata: {name: grpc-v1, namespace: demo}
spec: {clusterIP: 10.96.0.17, selector: {app: ver, version: v1}, ports: [{name: grpc, port: 80, targetPort: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: grpc-v2, namespace: demo}
spec: {clusterIP: 10.96.0.18, selector: {app: ver, version: v2}, ports: [{name: grpc, port: 80, targetPort: 9090}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: grpc}]
  rules:
  - matches: [{method: {service: test.Echo, method: Unary}, headers: [{name: x-canary, value: "yes"}]}]
    backendRefs: [{name: grpc-v2, port: 80}]
  - matches: [{method: {service: test.Echo}}]
    backendRefs: [{name: grpc-v1, port: 80}]
"#;
    let m = Mesh::start(route, &[]);
    mesh_tests::grpc::serve(m.pod("ver-v1"), 9090);
    mesh_tests::grpc::serve(m.pod("ver-v2"), 9090);
    let (canary, plain, streamed) = m.pod("test").run(|| {
        runtime().block_on(async {
            use mesh_tests::grpc::{EchoMsg, bidi, client, unary_with};
            let mut c = client(format!("http://{GRPC_VIP}")).await;
            let hi = || EchoMsg { text: "hi".into(), fail_with: 0 };
            let canary = unary_with(&mut c, hi(), &[("x-canary", "yes")]).await;
            let plain = unary_with(&mut c, hi(), &[]).await;
            let streamed = bidi(&mut c, vec![EchoMsg { text: "a".into(), fail_with: 0 }]).await;
            (canary, plain, streamed)
        })
    });
    // The method and the metadata pick v2; the service alone, v1 (never
    // helloworld, the Service's own endpoint, without the route).
    assert_eq!(canary.expect("canary").text, "ver-v2: hi");
    assert_eq!(plain.expect("plain").text, "ver-v1: hi");
    assert_eq!(streamed.expect("streamed"), ["A"]);
}
