//! Istio's Gateway API samples (istio/istio `samples/helloworld/gateway-api/`
//! and `samples/bookinfo/gateway-api/`), as Istio ships them, behave as
//! their Istio-API twins: the gateway routes `/hello` to helloworld, and
//! reviews' mesh traffic splits 90/10; httpbin's gateway takes every path, and
//! tcp-echo's moves from all-v1 to 80/20.
use super::*;

/// `helloworld-gateway.yaml`, as shipped.
const HELLOWORLD_GATEWAY: &str = r#"apiVersion: gateway.networking.k8s.io/v1beta1
kind: Gateway
metadata:
  name: helloworld-gateway
spec:
  gatewayClassName: istio
  listeners:
  - name: http
    port: 80
    protocol: HTTP
    allowedRoutes:
      namespaces:
        from: Same
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata:
  name: helloworld
spec:
  parentRefs:
  - name: helloworld-gateway
  rules:
  - matches:
    - path:
        type: Exact
        value: /hello
    backendRefs:
    - name: helloworld
      port: 5000
"#;

/// `route-reviews-90-10.yaml`, as shipped.
const REVIEWS_90_10: &str = r#"apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata:
  name: reviews
spec:
  parentRefs:
  - kind: Service
    name: reviews
    port: 9080
  rules:
  - backendRefs:
    - name: reviews-v1
      port: 9080
      weight: 90
    - name: reviews-v2
      port: 9080
      weight: 10
"#;

/// What the samples run against: their Services and pods (namespace
/// `default`, as the samples leave it), the `istio` GatewayClass Istio
/// installs, and the gateway pod Istio's automated deployment would make.
const CLUSTER: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: istio}
spec: {controllerName: istio.io/gateway-controller}
---
apiVersion: v1
kind: Pod
metadata: {name: helloworld-gateway-istio-abc, labels: {gateway.networking.k8s.io/gateway-name: helloworld-gateway}}
spec: {nodeName: n1, serviceAccountName: helloworld-gateway-istio}
status: {podIP: 10.244.0.100}
---
apiVersion: v1
kind: Pod
metadata: {name: helloworld-v1, labels: {app: helloworld, version: v1}}
spec: {nodeName: n1}
status: {podIP: 10.244.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: helloworld}
spec: {clusterIP: 10.96.0.10, selector: {app: helloworld}, ports: [{name: http, port: 5000}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, labels: {app: reviews, version: v1}}
spec: {nodeName: n1}
status: {podIP: 10.244.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, labels: {app: reviews, version: v2}}
spec: {nodeName: n1}
status: {podIP: 10.244.0.6}
---
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec: {clusterIP: 10.96.0.20, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1}
spec: {clusterIP: 10.96.0.21, selector: {app: reviews, version: v1}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2}
spec: {clusterIP: 10.96.0.22, selector: {app: reviews, version: v2}, ports: [{name: http, port: 9080}]}
"#;

#[test]
fn istios_gateway_api_samples_route_as_their_istio_api_twins() {
    let s = state_from_yaml(&format!("{CLUSTER}---\n{HELLOWORLD_GATEWAY}---\n{REVIEWS_90_10}"));
    // The gateway pod serves the sample's Gateway.
    let pod = &s.workloads["default/helloworld-gateway-istio-abc"];
    assert!(pod.gateway);
    assert_eq!(s.gateways_of(pod).map(|g| g.name.to_string()).collect::<Vec<_>>(), ["helloworld-gateway"]);
    // At the gateway: /hello exactly, to helloworld; anything else 404.
    let at_gateway = |path: &str| {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("203.0.113.7"));
        let view = RequestView { method: "GET", path, headers: &h, client: CLIENT, namespace: None };
        let gws = ["default/helloworld-gateway".to_owned()];
        route_gateway(&s, &gws, None, "10.244.0.100:80".parse().expect("a"), &view, 0, 0, &NoState)
            .map_or_else(|| "404".to_owned(), |(d, _)| describe(&d))
    };
    assert_eq!(at_gateway("/hello"), "helloworld-v1 10.244.0.2:5000");
    assert_eq!(at_gateway("/hello/x"), "404");
    // In the mesh: reviews 90 % v1, 10 % v2.
    let h = HeaderMap::new();
    let view = RequestView { method: "GET", path: "/", headers: &h, client: CLIENT, namespace: Some("default") };
    let mut v2 = 0;
    for random in 0..100 {
        let d = route_request(&s, "10.96.0.20:9080".parse().expect("a"), &view, 0, random, &NoState);
        if describe(&d).starts_with("reviews-v2") {
            v2 += 1;
        }
    }
    assert_eq!(v2, 10);
}

/// `samples/httpbin/gateway-api/httpbin-gateway.yaml`, as shipped.
const HTTPBIN_GATEWAY: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: httpbin-gateway
spec:
  gatewayClassName: istio
  listeners:
  - name: http
    port: 80
    protocol: HTTP
    allowedRoutes:
      namespaces:
        from: All
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: httpbin
spec:
  parentRefs:
  - name: httpbin-gateway
  rules:
  - backendRefs:
    - name: httpbin
      port: 8000
"#;

/// `samples/tcp-echo/gateway-api/tcp-echo-all-v1.yaml`, as shipped (its
/// Services without a cluster IP: the API server gives one; here none).
const TCP_ECHO_ALL_V1: &str = r#"apiVersion: gateway.networking.k8s.io/v1beta1
kind: Gateway
metadata:
  name: tcp-echo-gateway
spec:
  gatewayClassName: istio
  listeners:
  - name: tcp-31400
    protocol: TCP
    port: 31400
    allowedRoutes:
      kinds:
      - kind: TCPRoute
---
apiVersion: v1
kind: Service
metadata:
  name: tcp-echo-v1
spec:
  ports:
  - port: 9000
    name: tcp
  selector:
    app: tcp-echo
    version: v1
---
apiVersion: v1
kind: Service
metadata:
  name: tcp-echo-v2
spec:
  ports:
  - port: 9000
    name: tcp
  selector:
    app: tcp-echo
    version: v2
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: tcp-echo
spec:
  parentRefs:
  - name: tcp-echo-gateway
    sectionName: tcp-31400
  rules:
  - backendRefs:
    - name: tcp-echo-v1
      port: 9000
"#;

/// `samples/tcp-echo/gateway-api/tcp-echo-20-v2.yaml`, as shipped.
const TCP_ECHO_20_V2: &str = r#"apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: tcp-echo
spec:
  parentRefs:
  - name: tcp-echo-gateway
    sectionName: tcp-31400
  rules:
  - backendRefs:
    - name: tcp-echo-v1
      port: 9000
      weight: 80
    - name: tcp-echo-v2
      port: 9000
      weight: 20
"#;

/// httpbin (`samples/httpbin/httpbin.yaml`: Service port 8000 to the pod's
/// 8080), tcp-echo's two versions, and the gateway pods automated
/// deployment makes for both Gateways.
const MORE: &str = r#"---
apiVersion: v1
kind: Pod
metadata: {name: httpbin-gateway-istio-abc, labels: {gateway.networking.k8s.io/gateway-name: httpbin-gateway}}
spec: {nodeName: n1, serviceAccountName: httpbin-gateway-istio}
status: {podIP: 10.244.0.101}
---
apiVersion: v1
kind: Pod
metadata: {name: tcp-echo-gateway-istio-abc, labels: {gateway.networking.k8s.io/gateway-name: tcp-echo-gateway}}
spec: {nodeName: n1, serviceAccountName: tcp-echo-gateway-istio}
status: {podIP: 10.244.0.102}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin, labels: {app: httpbin, version: v1}}
spec: {nodeName: n1}
status: {podIP: 10.244.0.7}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, labels: {app: httpbin, service: httpbin}}
spec: {clusterIP: 10.96.0.30, selector: {app: httpbin}, ports: [{name: http, port: 8000, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: tcp-echo-v1, labels: {app: tcp-echo, version: v1}}
spec: {nodeName: n1}
status: {podIP: 10.244.0.8}
---
apiVersion: v1
kind: Pod
metadata: {name: tcp-echo-v2, labels: {app: tcp-echo, version: v2}}
spec: {nodeName: n1}
status: {podIP: 10.244.0.9}
"#;

#[test]
fn istios_httpbin_and_tcp_echo_gateway_api_samples_route_as_shipped() {
    let s = state_from_yaml(&format!("{CLUSTER}{MORE}---\n{HTTPBIN_GATEWAY}---\n{TCP_ECHO_ALL_V1}"));
    // httpbin: every path of any host at its gateway pod, to the pod's 8080.
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("httpbin.example.com"));
    let view = RequestView { method: "GET", path: "/status/418", headers: &h, client: CLIENT, namespace: None };
    let gws = ["default/httpbin-gateway".to_owned()];
    let at = "10.244.0.101:80".parse().expect("address");
    let routed = route_gateway(&s, &gws, None, at, &view, 0, 0, &NoState).map(|(d, _)| describe(&d));
    assert_eq!(routed.as_deref(), Some("httpbin 10.244.0.7:8080"));
    // tcp-echo: port 31400 of its gateway pod, all to v1, then 80/20.
    let tcp = |s: &State, random: u64| {
        let gws = ["default/tcp-echo-gateway".to_owned()];
        let found = route_gateway_tcp(s, &gws, "10.244.0.102:31400".parse().expect("address"), 0, random);
        match found.map(|(r, _)| r) {
            Some(Route::Service { endpoint, addr, .. }) => format!("{} {addr}", endpoint.name),
            other => format!("{other:?}"),
        }
    };
    assert!((0..100).all(|r| tcp(&s, r) == "tcp-echo-v1 10.244.0.8:9000"));
    let s = state_from_yaml(&format!(
        "{CLUSTER}{MORE}---\n{HTTPBIN_GATEWAY}---\n{}---\n{TCP_ECHO_20_V2}",
        TCP_ECHO_ALL_V1.split("---\napiVersion: gateway.networking.k8s.io/v1alpha2").next().expect("the rest")
    ));
    let v2 = (0..100).filter(|r| tcp(&s, *r) == "tcp-echo-v2 10.244.0.9:9000").count();
    assert_eq!(v2, 20);
}
