//! The mesh's edges routed: Istio's gateways as pods (ingress by path,
//! egress by host), ServiceEntries and REGISTRY_ONLY, and which node may hold
//! a gateway pod's identity.
use super::*;

const EDGE: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 172.18.0.2}]}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
status: {addresses: [{type: InternalIP, address: 172.18.1.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: ingressgateway, namespace: istio-system, labels: {istio: ingressgateway}, annotations: {inject.istio.io/templates: gateway}}
spec: {nodeName: n1, serviceAccountName: istio-ingressgateway-service-account}
status: {podIP: 10.244.0.100}
---
apiVersion: v1
kind: Pod
metadata: {name: egressgateway, namespace: istio-system, labels: {istio: egressgateway}, annotations: {inject.istio.io/templates: gateway}}
spec: {nodeName: n2, serviceAccountName: istio-egressgateway-service-account}
status: {podIP: 10.244.1.100}
---
apiVersion: v1
kind: Service
metadata: {name: istio-egressgateway, namespace: istio-system}
spec:
  clusterIP: 10.96.0.99
  selector: {istio: egressgateway}
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: hello-v1, namespace: demo, labels: {app: hello, version: v1}}
spec: {nodeName: n1}
status: {podIP: 10.244.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: hello}
  ports: [{name: http, port: 5000}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: demo}
spec:
  hosts: [ext.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  location: MESH_EXTERNAL
  endpoints: [{address: 172.18.200.2}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: any, namespace: demo}
spec:
  hosts: [any.example.com]
  addresses: [192.0.2.10]
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ingress, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: egress, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [ext.example.com]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hello-ingress, namespace: demo}
spec:
  hosts: ["*"]
  gateways: [istio-system/ingress]
  http:
  - match: [{uri: {exact: /hello}}]
    route: [{destination: {host: hello}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ext-via-egress, namespace: demo}
spec:
  hosts: [ext.example.com]
  gateways: [istio-system/egress, mesh]
  http:
  - match: [{gateways: [mesh], port: 80}]
    route: [{destination: {host: istio-egressgateway.istio-system.svc.cluster.local, port: {number: 80}}}]
  - match: [{gateways: [istio-system/egress], port: 80}]
    route: [{destination: {host: ext.example.com, port: {number: 80}}}]
"#;

#[test]
fn gateways_service_entries_and_registry_only() {
    let s = state_from_yaml(EDGE);
    let host = |h: &str| {
        let mut m = HeaderMap::new();
        m.insert("host", HeaderValue::from_str(h).expect("host"));
        m
    };
    let mesh = |orig: &str, h: &str, path: &str| {
        let headers = host(h);
        let view = RequestView { method: "GET", path, headers: &headers, client: CLIENT, namespace: None };
        describe(&route_request(&s, orig.parse().expect("orig"), &view, 0, 0, &NoState))
    };
    let gateway = |gw: &str, orig: &str, h: &str, path: &str| {
        let headers = host(h);
        let view = RequestView { method: "GET", path, headers: &headers, client: CLIENT, namespace: None };
        let gws = [gw.to_owned()];
        route_gateway(&s, &gws, None, orig.parse().expect("orig"), &view, 0, 0, &NoState)
            .map_or_else(|| "404".to_owned(), |(d, _)| describe(&d))
    };
    // Mesh: the ServiceEntry host goes to the egress gateway's pod.
    assert_eq!(mesh("172.18.200.2:80", "ext.example.com", "/"), "egressgateway 10.244.1.100:80");
    // Mesh: an address nobody declared, under REGISTRY_ONLY.
    assert_eq!(mesh("198.51.100.1:80", "nowhere.example.com", "/"), "black hole 198.51.100.1:80");
    // A ServiceEntry address with resolution NONE: the original destination.
    assert_eq!(
        describe(&Decision {
            route: crate::routing::l4::route(&s, "192.0.2.10:443".parse().expect("a"), None, 0),
            rule: None,
            matched_prefix: None,
            cluster: None
        }),
        "unknown 192.0.2.10:443"
    );
    assert_eq!(
        describe(&Decision {
            route: crate::routing::l4::route(&s, "198.51.100.1:443".parse().expect("a"), None, 0),
            rule: None,
            matched_prefix: None,
            cluster: None
        }),
        "black hole 198.51.100.1:443"
    );
    // Ingress: any host, by path; nothing else matches (404).
    assert_eq!(gateway("istio-system/ingress", "10.244.0.100:80", "172.18.0.2", "/hello"), "hello-v1 10.244.0.2:5000");
    assert_eq!(gateway("istio-system/ingress", "10.244.0.100:80", "x.example", "/nope"), "404");
    // Egress gateway: the second hop goes to the external endpoint.
    assert_eq!(
        gateway("istio-system/egress", "10.244.1.100:80", "ext.example.com", "/"),
        "172.18.200.2 172.18.200.2:80"
    );
    assert_eq!(gateway("istio-system/egress", "10.244.1.100:80", "other.example.com", "/"), "404");
    // The gateway pods' identities are what their nodes may hold: as any pod's.
    let ingress = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account";
    let egress = "spiffe://cluster.local/ns/istio-system/sa/istio-egressgateway-service-account";
    assert!(s.node_identities("n1").contains(ingress) && !s.node_identities("n1").contains(egress));
    assert!(s.node_identities("n2").contains(egress) && !s.node_identities("n2").contains(ingress));
    // A Gateway serves the gateway pods its selector matches, nothing else.
    let served = |pod: &str| s.gateways_of(&s.workloads[pod]).map(|g| g.name.to_string()).collect::<Vec<_>>();
    assert_eq!(served("istio-system/ingressgateway"), ["ingress"]);
    assert_eq!(served("istio-system/egressgateway"), ["egress"]);
    assert!(served("demo/hello-v1").is_empty(), "a pod that is no gateway is never served as one");
}

#[test]
fn wildcard_service_entry_hosts_take_the_hosts_under_them_most_specific_first() {
    let entries = r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: google, namespace: demo}
spec:
  hosts: ["*.googleapis.com"]
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: storage, namespace: demo}
spec:
  hosts: ["*.storage.googleapis.com"]
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: exact, namespace: demo}
spec:
  hosts: [maps.googleapis.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
"#;
    let s = state_from_yaml(&format!("{EDGE}{entries}"));
    let named = |h: &str, port: u16| s.external_on_port(h, port, Some("demo")).map(|x| x.name.to_string());
    assert_eq!(named("maps.googleapis.com", 80).as_deref(), Some("maps.googleapis.com"));
    assert_eq!(named("a.b.storage.googleapis.com", 80).as_deref(), Some("*.storage.googleapis.com"));
    assert_eq!(named("pubsub.googleapis.com", 80).as_deref(), Some("*.googleapis.com"));
    assert_eq!(named("pubsub.googleapis.com", 443).as_deref(), Some("*.googleapis.com"));
    // Never the bare domain, another domain, or a port no entry lists.
    assert_eq!(named("googleapis.com", 80), None);
    assert_eq!(named("googleapis.com.evil.example", 80), None);
    assert_eq!(named("pubsub.googleapis.com", 8080), None);
    // Under REGISTRY_ONLY, HTTP naming a host under the wildcard at an
    // address nobody declared: the entry's, to the address dialed.
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("pubsub.googleapis.com"));
    let view = RequestView { method: "GET", path: "/", headers: &headers, client: CLIENT, namespace: Some("demo") };
    let d = route_request(&s, "198.51.100.7:80".parse().expect("a"), &view, 0, 0, &NoState);
    assert_eq!(describe(&d), "unknown 198.51.100.7:80");
    headers.insert("host", HeaderValue::from_static("example.org"));
    let view = RequestView { method: "GET", path: "/", headers: &headers, client: CLIENT, namespace: Some("demo") };
    let d = route_request(&s, "198.51.100.7:80".parse().expect("a"), &view, 0, 0, &NoState);
    assert_eq!(describe(&d), "black hole 198.51.100.7:80");
    // A wildcard names no one host to resolve: DNS needs endpoints.
    let bad = "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bad, namespace: demo}\n\
               spec: {hosts: [\"*.example.net\"], resolution: DNS, ports: [{number: 80, name: http, protocol: HTTP}]}\n";
    let loaded = crate::config::load_text("x.yaml", &format!("{EDGE}{bad}"), "cluster.local");
    let errors: Vec<String> = loaded.rejected.iter().map(ToString::to_string).collect();
    assert!(
        errors.iter().any(|e| e.contains("spec.resolution: DNS resolution of a wildcard host needs endpoints")),
        "{errors:?}"
    );
    let bare = bad.replace("*.example.net", "*");
    let loaded = crate::config::load_text("x.yaml", &format!("{EDGE}{bare}"), "cluster.local");
    let errors: Vec<String> = loaded.rejected.iter().map(ToString::to_string).collect();
    assert!(errors.iter().any(|e| e.contains("expected a host name or a wildcard *.domain")), "{errors:?}");
}

/// `samples/external/aptget.yaml` and `pypi.yaml`, as shipped (github.yaml:
/// `routing::l4::tests`).
const APTGET: &str = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: make-aptget-work
spec:
  hosts:
  - deb.debian.org
  - cdn-fastly.deb.debian.org
  - security.debian.org
  - archive.ubuntu.com
  - security.ubuntu.com
  ports:
  - number: 80
    name: http
    protocol: HTTP
"#;

const PYPI: &str = r#"apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata:
  name: python-https
spec:
  hosts:
  - pypi.python.org
  ports:
  - number: 443
    name: https
    protocol: HTTPS
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: python-https
spec:
  hosts:
  - pypi.python.org
  tls:
  - match:
    - port: 443
      sniHosts:
      - pypi.python.org
    route:
    - destination:
        host: pypi.python.org
        port:
          number: 443
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata:
  name: pypi-https
spec:
  hosts:
  - pypi.org
  ports:
  - number: 443
    name: https
    protocol: HTTPS
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: pypi-https
spec:
  hosts:
  - pypi.org
  tls:
  - match:
    - port: 443
      sniHosts:
      - pypi.org
    route:
    - destination:
        host: pypi.org
        port:
          number: 443
"#;

#[test]
fn istios_external_samples_load_and_name_their_hosts() {
    let s = state_from_yaml(&format!("{EDGE}---\n{APTGET}---\n{PYPI}"));
    // By host (HTTP Host, or the TLS server name) on the samples' ports.
    for (host, port) in
        [("deb.debian.org", 80), ("security.ubuntu.com", 80), ("pypi.org", 443), ("pypi.python.org", 443)]
    {
        assert!(s.external_on_port(host, port, Some("default")).is_some(), "{host}:{port}");
    }
    assert!(s.external_on_port("pypi.org", 80, Some("default")).is_none());
    // apt over HTTP at an address nobody declared, under REGISTRY_ONLY.
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("deb.debian.org"));
    let view =
        RequestView { method: "GET", path: "/debian/", headers: &headers, client: CLIENT, namespace: Some("default") };
    let d = route_request(&s, "151.101.2.132:80".parse().expect("a"), &view, 0, 0, &NoState);
    assert_eq!(describe(&d), "unknown 151.101.2.132:80");
    // pip over TLS: the samples' mesh `tls` rule by server name, to the
    // address dialed (resolution NONE); another name has no rule.
    let orig = "151.101.0.223:443".parse().expect("a");
    let routed = crate::routing::http::route_tls(&s, orig, "pypi.org", Some("default"), 0, 0);
    let d = Decision { route: routed.expect("the tls rule"), rule: None, matched_prefix: None, cluster: None };
    assert_eq!(describe(&d), "unknown 151.101.0.223:443");
    assert!(crate::routing::http::route_tls(&s, orig, "files.pythonhosted.org", Some("default"), 0, 0).is_none());
}
