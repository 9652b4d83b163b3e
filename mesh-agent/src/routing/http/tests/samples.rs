//! Istio's Gateway API samples (istio/istio `samples/helloworld/gateway-api/`
//! and `samples/bookinfo/gateway-api/`), as Istio ships them, behave as
//! their Istio-API twins: the gateway routes `/hello` to helloworld, and
//! reviews' mesh traffic splits 90/10.
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
