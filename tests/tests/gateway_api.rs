//! The Gateway API at the edge (root, two nodes): a `Gateway` of class
//! `istio` served by its gateway pod (namespace demo, labelled with the
//! Gateway's name) behind a LoadBalancer address, HTTP and HTTPS listeners,
//! an `HTTPRoute` bound to it; a second Gateway beside it (listener isolation,
//! wildcard hostnames); curl and openssl from outside the cluster.
#![expect(clippy::unwrap_used, reason = "tests")]

use mesh_tests::{agent::metric, certs::Certs, fixture::PodSpec, mesh::*, require_root};

const LB: &str = "172.18.100.1";

fn config(secret: &str) -> String {
    format!(
        r#"---
apiVersion: v1
kind: Secret
metadata: {{name: web-cert, namespace: demo}}
type: kubernetes.io/tls
stringData:
{secret}---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: istio}}
spec: {{controllerName: istio.io/gateway-controller}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: web, namespace: demo}}
spec:
  gatewayClassName: istio
  listeners:
  - {{name: http, port: 80, protocol: HTTP, hostname: "*.example.com"}}
  - {{name: tcp, port: 9000, protocol: TCP}}
  - {{name: tls, port: 9443, protocol: TLS, hostname: "*.example.net", tls: {{mode: Passthrough}}}}
  - name: https
    port: 443
    protocol: HTTPS
    hostname: hello.example.com
    tls: {{mode: Terminate, certificateRefs: [{{name: web-cert}}]}}
  - name: tls-term
    port: 9444
    protocol: TLS
    hostname: hello.example.com
    tls: {{mode: Terminate, certificateRefs: [{{name: web-cert}}]}}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: terminated, namespace: demo}}
spec:
  parentRefs: [{{name: web, sectionName: tls-term}}]
  rules: [{{backendRefs: [{{name: helloworld, port: 7000}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: hello, namespace: demo}}
spec:
  parentRefs: [{{name: web}}]
  hostnames: [hello.example.com]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /helloworld}}}}]
    filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: x-served-by, value: gateway-api}}]}}}}]
    backendRefs: [{{name: helloworld, port: 9095}}]
---
apiVersion: v1
kind: Service
metadata: {{name: tls-hello, namespace: demo}}
spec: {{clusterIP: 10.96.0.41, selector: {{app: helloworld}}, ports: [{{name: tls, port: 8443}}]}}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {{name: passthrough, namespace: demo}}
spec:
  parentRefs: [{{name: web}}]
  hostnames: [passthrough.example.net]
  rules: [{{backendRefs: [{{name: tls-hello, port: 8443}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: echo, namespace: demo}}
spec:
  parentRefs: [{{name: web, sectionName: https}}]
  hostnames: [hello.example.com]
  rules:
  - matches: [{{method: {{service: test.Echo}}}}]
    backendRefs: [{{name: grpc, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: echo, namespace: demo}}
spec:
  parentRefs: [{{name: web, sectionName: tcp}}]
  rules: [{{backendRefs: [{{name: helloworld, port: 7000}}]}}]
"#
    )
}

/// Over TLS to `addr` (checking the server's certificate for `name`
/// against the PEM CA `ca`): `bytes` written, the write side closed, what
/// comes back until the end.
async fn tls_echo(addr: std::net::SocketAddr, name: &str, ca: &std::path::Path, bytes: &[u8]) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector.connect(ServerName::try_from(name.to_owned()).unwrap(), tcp).await.unwrap();
    tls.write_all(bytes).await.unwrap();
    tls.shutdown().await.unwrap();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), tls.read_to_end(&mut back)).await;
    back
}

fn curl_out(m: &Mesh, args: &[&str]) -> String {
    let mut v = vec!["curl", "-s", "-i", "--max-time", "5"];
    v.extend_from_slice(args);
    String::from_utf8_lossy(&m.c.net_cmd(&v).stdout).into_owned()
}

#[test]
fn a_gateway_api_gateway_serves_its_routes_from_its_pod_behind_a_load_balancer() {
    if !require_root("a_gateway_api_gateway_serves_its_routes_from_its_pod_behind_a_load_balancer") {
        return;
    }
    let mut f = fixture();
    let labels = [("gateway.networking.k8s.io/gateway-name", "web")];
    let spec = PodSpec::gateway("demo", &labels, "web-istio");
    f.gateway(
        0,
        "web-istio",
        "10.244.1.100".parse().unwrap(),
        spec,
        ("10.96.0.40", LB.parse().unwrap()),
        &[80, 443, 9000],
    );
    let certs = Certs::new(&format!("gwapi-{}", std::process::id()));
    let (crt, key) = certs.server("web", "hello.example.com");
    let secret = format!("  tls.crt: |\n{}  tls.key: |\n{}", Certs::yaml_block(&crt, 4), Certs::yaml_block(&key, 4));
    let m = Mesh::start_with(f, &config(&secret), &[]);
    // A TLS server in helloworld's pod that the gateway passes TLS through to.
    let (pass_crt, pass_key) = certs.server("passthrough", "passthrough.example.net");
    let (pc, pk) = (pass_crt.to_str().unwrap(), pass_key.to_str().unwrap());
    let args = ["openssl", "s_server", "-quiet", "-www", "-accept", "8443", "-cert", pc, "-key", pk];
    let _tls_server = mesh_tests::netns::Background::spawn_in(&m.pod("helloworld").netns, &args).unwrap();
    // The route's host and path, through the load balancer.
    let out = curl_out(&m, &["-H", "Host: hello.example.com", &format!("http://{LB}/helloworld")]);
    assert!(out.starts_with("HTTP/1.1 200") && out.contains("hello from helloworld"), "{out}");
    assert!(out.to_ascii_lowercase().contains("x-served-by: gateway-api"), "{out}");
    // A host of the listener no route names, and one the listener does not take.
    let out = curl_out(&m, &["-H", "Host: other.example.com", &format!("http://{LB}/helloworld")]);
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    let out = curl_out(&m, &["-H", "Host: hello.example.org", &format!("http://{LB}/helloworld")]);
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    // HTTPS with the listener's certificate, checked by curl.
    let ca = certs.ca();
    let resolve = format!("hello.example.com:443:{LB}");
    let out = curl_out(
        &m,
        &["--cacert", ca.to_str().unwrap(), "--resolve", &resolve, "https://hello.example.com/helloworld"],
    );
    assert!(out.contains("hello from helloworld"), "{out}");
    // The TLS listener: the pod's own certificate reaches the client (the
    // TLS untouched), by SNI; another name there is refused.
    let resolve = |name: &str| format!("{name}:9443:{LB}");
    let mut out = String::new();
    for _ in 0..50 {
        let url = "https://passthrough.example.net:9443/";
        out = curl_out(&m, &["--cacert", ca.to_str().unwrap(), "--resolve", &resolve("passthrough.example.net"), url]);
        if out.contains("s_server") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(out.contains("s_server"), "{out}");
    let out = curl_out(&m, &["-k", "--resolve", &resolve("other.example.net"), "https://other.example.net:9443/"]);
    assert!(!out.contains("s_server"), "{out}");
    // The TCP listener: bytes both ways to the echo server, half-close kept.
    let back = mesh_tests::netns::enter_and_spawn(&m.c.net_ns, move || {
        use std::io::{Read as _, Write as _};
        let addr: std::net::SocketAddr = format!("{LB}:9000").parse().unwrap();
        let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        s.write_all(b"through a TCPRoute").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        back
    })
    .join()
    .unwrap();
    assert_eq!(back, b"through a TCPRoute");
    // The terminating TLS listener: the gateway's certificate, checked by
    // the client; the bytes, decrypted, to the echo server and back.
    let ca_path = ca.clone();
    let back = mesh_tests::netns::enter_and_spawn(&m.c.net_ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(tls_echo(
            format!("{LB}:9444").parse().unwrap(),
            "hello.example.com",
            &ca_path,
            b"through TLS, terminated",
        ))
    })
    .join()
    .unwrap();
    assert_eq!(back, b"through TLS, terminated");
    // gRPC from outside over the HTTPS listener (HTTP/2 by ALPN), routed by
    // the GRPCRoute's method match to the grpc Service.
    let ca_path = ca.clone();
    let answer = mesh_tests::netns::enter_and_spawn(&m.c.net_ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            use mesh_tests::grpc::{EchoMsg, client_tls, unary};
            let addr = format!("{LB}:443").parse().unwrap();
            let mut c = client_tls(addr, "hello.example.com", &ca_path).await;
            unary(&mut c, EchoMsg { text: "over https".into(), fail_with: 0 }).await
        })
    })
    .join()
    .unwrap();
    assert_eq!(answer.expect("a gRPC answer through the HTTPS listener").text, "helloworld: over https");
    // The requests left as the gateway pod, with its identity.
    let text = m.agents[0].wait_metrics(5, "request metrics", |t| {
        metric(t, "istio_requests_total", &[("source_workload", "web-istio"), ("response_code", "200")]) >= 2.0
    });
    let principal = ("source_principal", "spiffe://cluster.local/ns/demo/sa/web-istio");
    assert!(metric(&text, "istio_requests_total", &[principal, ("response_code", "404")]) >= 2.0, "{text}");

    // A policy attached to the Gateway (targetRefs): clients from outside
    // the pod network are refused at its pods; the positive control above.
    let policy = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: inside-only, namespace: demo}\n\
        spec: {targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: web}], rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]}\n";
    m.set_config(&format!("{}{policy}", config(&secret)));
    let out = curl_out(&m, &["-H", "Host: hello.example.com", &format!("http://{LB}/helloworld")]);
    assert!(!out.contains("hello from helloworld"), "an outside client passed the Gateway's policy: {out}");

    // The same attached to the Gateway's class: from a tenant's namespace
    // it is refused by name and closes nothing (the client passes again);
    // from the root namespace it judges the class's gateway pods.
    let class_policy = |ns: &str| {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: class-inside-only, namespace: {ns}}}\n\
             spec: {{targetRefs: [{{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio}}], rules: [{{from: [{{source: {{ipBlocks: [10.0.0.0/8]}}}}]}}]}}\n"
        )
    };
    m.set_config(&format!("{}{}", config(&secret), class_policy("demo")));
    let out = curl_out(&m, &["-H", "Host: hello.example.com", &format!("http://{LB}/helloworld")]);
    assert!(out.contains("hello from helloworld"), "a tenant's GatewayClass policy closed the gateway: {out}");
    m.set_config(&format!("{}{}", config(&secret), class_policy("istio-system")));
    let out = curl_out(&m, &["-H", "Host: hello.example.com", &format!("http://{LB}/helloworld")]);
    assert!(!out.contains("hello from helloworld"), "an outside client passed the class's policy: {out}");
}

/// A second Gateway (`second`, its pod on node-2 behind its own load
/// balancer) with a wildcard listener, beside `web`.
const SECOND: &str = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: second, namespace: demo}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 80, protocol: HTTP, hostname: "*.example.org"}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: org, namespace: demo}
spec:
  parentRefs: [{name: second}]
  hostnames: ["*.example.org", "hello.example.com"]
  rules:
  - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-served-by, value: second}]}}]
    backendRefs: [{name: helloworld, port: 9095}]
"#;

const LB2: &str = "172.18.100.2";

#[test]
fn each_gateway_serves_its_own_routes_on_the_hostnames_it_shares_with_them() {
    if !require_root("each_gateway_serves_its_own_routes_on_the_hostnames_it_shares_with_them") {
        return;
    }
    let mut f = fixture();
    let web = [("gateway.networking.k8s.io/gateway-name", "web")];
    let ip = "10.244.1.100".parse().unwrap();
    f.gateway(
        0,
        "web-istio",
        ip,
        PodSpec::gateway("demo", &web, "web-istio"),
        ("10.96.0.40", LB.parse().unwrap()),
        &[80],
    );
    let second = [("gateway.networking.k8s.io/gateway-name", "second")];
    let ip = "10.244.2.100".parse().unwrap();
    let spec = PodSpec::gateway("demo", &second, "second-istio");
    f.gateway(1, "second-istio", ip, spec, ("10.96.0.42", LB2.parse().unwrap()), &[80]);
    let certs = Certs::new(&format!("gwapi2-{}", std::process::id()));
    let (crt, key) = certs.server("web", "hello.example.com");
    let secret = format!("  tls.crt: |\n{}  tls.key: |\n{}", Certs::yaml_block(&crt, 4), Certs::yaml_block(&key, 4));
    let m = Mesh::start_with(f, &format!("{}{SECOND}", config(&secret)), &[]);
    let get =
        |lb: &str, host: &str| curl_out(&m, &["-H", &format!("Host: {host}"), &format!("http://{lb}/helloworld")]);
    // The positive controls: each Gateway serves its own route.
    let out = get(LB, "hello.example.com");
    assert!(out.starts_with("HTTP/1.1 200") && out.contains("x-served-by: gateway-api"), "{out}");
    let out = get(LB2, "a.example.org");
    assert!(out.starts_with("HTTP/1.1 200") && out.contains("x-served-by: second"), "{out}");
    // A wildcard covers any depth of subdomain, never the bare domain.
    let out = get(LB2, "deep.a.example.org");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(get(LB2, "example.org").starts_with("HTTP/1.1 404"));
    // Listener isolation: web never serves the other Gateway's route, and
    // `second` takes none of the route's hostnames its listener does not
    // share (hello.example.com), nor web's route.
    assert!(get(LB, "a.example.org").starts_with("HTTP/1.1 404"));
    let out = get(LB2, "hello.example.com");
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    // Each Gateway's requests leave as its own pod.
    let text = m.agents[1].wait_metrics(5, "second's requests", |t| {
        let from_second = [("reporter", "source"), ("source_workload", "second-istio"), ("response_code", "200")];
        metric(t, "istio_requests_total", &from_second) >= 2.0
    });
    let from_web = [("reporter", "source"), ("source_workload", "web-istio")];
    assert!(metric(&text, "istio_requests_total", &from_web) == 0.0, "node-2's agent sent web's requests: {text}");
}
