//! A Gateway in-process: its listener opened by [`Listeners::reconcile`] on
//! the node's address (loopback here), HTTP routed by the VirtualService bound
//! to it to a loopback server. No root, no eBPF.
use std::{convert::Infallible, net::Ipv4Addr};

use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{Request, Response, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;

use super::Listeners;
use crate::proxy::inputs::testing::TestInputs;

/// An HTTP server on 127.0.0.1 answering `<path> via <host>`; its port.
async fn upstream() -> u16 {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("-").to_owned();
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("{} via {host}", req.uri().path())))))
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc));
        }
    });
    port
}

/// Node n1 on loopback (running the ingress gateway) and the Service
/// `plain/hello` whose one pod is the loopback server on port `up`.
fn hello(up: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: n1, labels: {{istio: ingressgateway}}}}\n\
         status: {{addresses: [{{type: InternalIP, address: 127.0.0.1}}]}}\n\
         ---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: plain}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: hello, namespace: plain, labels: {{app: hello}}}}\n\
         spec: {{nodeName: n1}}\nstatus: {{podIP: 127.0.0.1, phase: Running}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: hello, namespace: plain}}\n\
         spec: {{clusterIP: 10.96.0.10, selector: {{app: hello}}, ports: [{{name: http, port: 80, targetPort: {up}}}]}}\n"
    )
}

/// A port free on loopback now (the gateway binds it next).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    l.local_addr().expect("address").port()
}

async fn get(port: u16, host: &str, path: &str) -> (StatusCode, String) {
    let tcp = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.expect("connect to the gateway");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("handshake");
    tokio::spawn(conn);
    let req = Request::get(path).header("host", host).body(Empty::<Bytes>::new()).expect("request");
    let resp = send.send_request(req).await.expect("response");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn an_ingress_gateway_routes_by_its_virtual_service() {
    let (up, port) = (upstream().await, free_port());
    let yaml = format!(
        "{}\
         ---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: ingress, namespace: istio-system}}\n\
         spec: {{selector: {{istio: ingressgateway}}, servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: ['*']}}]}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: hello, namespace: plain}}\n\
         spec: {{hosts: ['*'], gateways: [istio-system/ingress], http: [{{match: [{{uri: {{prefix: /hello}}}}], \
         route: [{{destination: {{host: hello, port: {{number: 80}}}}}}]}}]}}\n",
        hello(up)
    );
    let t = TestInputs::new(&yaml);
    let mut listeners = Listeners::default();
    listeners.reconcile(&t.inputs);
    let status = listeners.status();
    assert!(status.iter().any(|p| p.plan.addr.port() == port && p.status == "listening"), "{status:?}");

    assert_eq!(
        get(port, "hello.example", "/hello/world").await,
        (StatusCode::OK, "/hello/world via hello.example".into())
    );
    // No rule for the path: Envoy's 404 with NR.
    let (status, body) = get(port, "hello.example", "/elsewhere").await;
    assert_eq!((status, body.as_str()), (StatusCode::NOT_FOUND, "no route for this host and path\n"));
    let metrics = t.inputs.metrics.encode();
    let counted = |code: &str, flags: &str| {
        metrics.lines().any(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains(&format!("response_code=\"{code}\""))
                && l.contains(&format!("response_flags=\"{flags}\""))
                && l.contains("source_workload=\"ingress\"")
        })
    };
    assert!(counted("200", "-") && counted("404", "NR"), "{metrics}");
    listeners.close_all();
}

#[tokio::test]
async fn a_pooled_upstream_connection_never_carries_another_gateways_request() {
    // Two Gateways on one port, each with its own host; the destination pod
    // (meshed, on this node) admits only gateway `a`.
    let port = free_port();
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::new(127, 0, 0, 3), 0)).await.expect("bind");
    let up = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async move {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("secret"))))
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc));
        }
    });
    let gateway = |name: &str, host: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: istio-system}}\n\
             spec: {{selector: {{istio: ingressgateway}}, servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: ['{host}']}}]}}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: demo}}\n\
             spec: {{hosts: ['{host}'], gateways: [istio-system/{name}], http: [{{route: [{{destination: {{host: hello, port: {{number: 80}}}}}}]}}]}}\n"
        )
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: n1, labels: {{istio: ingressgateway}}}}\n\
         status: {{addresses: [{{type: InternalIP, address: 127.0.0.1}}]}}\n\
         ---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: demo, labels: {{istio.io/dataplane-mode: ambient}}}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: hello, namespace: demo, labels: {{app: hello}}}}\n\
         spec: {{nodeName: n1, serviceAccountName: hello}}\nstatus: {{podIP: 127.0.0.3, phase: Running}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: hello, namespace: demo}}\n\
         spec: {{clusterIP: 10.96.0.10, selector: {{app: hello}}, ports: [{{name: http, port: 80, targetPort: {up}}}]}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: only-a, namespace: demo}}\n\
         spec: {{selector: {{matchLabels: {{app: hello}}}}, action: ALLOW, \
         rules: [{{from: [{{source: {{principals: [cluster.local/ns/istio-system/sa/gw-a]}}}}]}}]}}\n{}{}",
        gateway("gw-a", "a.example"),
        gateway("gw-b", "b.example"),
    );
    let t = TestInputs::new(&yaml);
    let mut listeners = Listeners::default();
    listeners.reconcile(&t.inputs);

    // One keep-alive client connection, a request for each gateway's host.
    let tcp = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.expect("connect to the gateway");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("handshake");
    tokio::spawn(conn);
    let mut answers = Vec::new();
    for host in ["a.example", "b.example"] {
        let req = Request::get("/").header("host", host).body(Empty::<Bytes>::new()).expect("request");
        let resp = send.send_request(req).await.expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        answers.push((status, String::from_utf8_lossy(&body).into_owned()));
    }
    assert_eq!(answers[0], (StatusCode::OK, "secret".to_owned()));
    assert_eq!(answers[1].0, StatusCode::FORBIDDEN, "gateway b got through on gateway a's connection: {answers:?}");

    // Each request reported with the identity it left with.
    let metrics = t.inputs.metrics.encode();
    let counted = |code: &str, principal: &str| {
        metrics.lines().any(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains(&format!("response_code=\"{code}\""))
                && l.contains(&format!("source_principal=\"spiffe://cluster.local/ns/istio-system/sa/{principal}\""))
        })
    };
    assert!(counted("200", "gw-a") && counted("403", "gw-b"), "{metrics}");
    listeners.close_all();
}

#[tokio::test]
async fn a_host_a_gateway_reserves_for_a_namespace_cannot_be_taken_from_another() {
    // Two backends, each echoing its name; a Gateway whose server reserves
    // app.example for namespace `prod`, and VirtualServices in `evil` (first
    // by name) and `prod` both claiming it.
    let backend = |name: &'static str, ip: Ipv4Addr| async move {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
                });
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc));
            }
        });
        port
    };
    let prod = backend("prod", Ipv4Addr::new(127, 0, 0, 1)).await;
    let (evil, port) = (backend("evil", Ipv4Addr::new(127, 0, 0, 4)).await, free_port());
    let tenant = |ns: &str, vip: &str, target: u16, hosts: &str| {
        format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: app, namespace: {ns}, labels: {{app: app}}}}\n\
             spec: {{nodeName: n1}}\nstatus: {{podIP: 127.0.0.{}, phase: Running}}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {{name: app, namespace: {ns}}}\n\
             spec: {{clusterIP: {vip}, selector: {{app: app}}, ports: [{{name: http, port: 80, targetPort: {target}}}]}}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: app, namespace: {ns}}}\n\
             spec: {{hosts: [{hosts}], gateways: [istio-system/ingress], \
             http: [{{route: [{{destination: {{host: app, port: {{number: 80}}}}}}]}}]}}\n",
            if ns == "prod" { 1 } else { 4 }
        )
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: n1, labels: {{istio: ingressgateway}}}}\n\
         status: {{addresses: [{{type: InternalIP, address: 127.0.0.1}}]}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: ingress, namespace: istio-system}}\n\
         spec: {{selector: {{istio: ingressgateway}}, servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, \
         hosts: [prod/app.example, '*/open.example']}}]}}\n{}{}",
        tenant("evil", "10.96.0.20", evil, "app.example, other.example"),
        tenant("prod", "10.96.0.10", prod, "'*'"),
    );
    let t = TestInputs::new(&yaml);
    let mut listeners = Listeners::default();
    listeners.reconcile(&t.inputs);
    // The reserved host goes to prod, whatever evil's VirtualService says.
    assert_eq!(get(port, "app.example", "/").await, (StatusCode::OK, "prod".into()));
    // A host no server of the Gateway lists is not served, even though a
    // VirtualService bound to it says `*`.
    assert_eq!(get(port, "other.example", "/").await.0, StatusCode::NOT_FOUND);
    // `*/`: any namespace may bind it (prod's `*` does).
    assert_eq!(get(port, "open.example", "/").await, (StatusCode::OK, "prod".into()));
    listeners.close_all();
}

#[tokio::test]
async fn an_http_server_with_https_redirect_sends_every_request_to_https() {
    let port = free_port();
    let server = |hosts: &str, tls: &str| {
        format!("{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: [{hosts}]{tls}}}")
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: n1, labels: {{istio: ingressgateway}}}}\n\
         status: {{addresses: [{{type: InternalIP, address: 127.0.0.1}}]}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: ingress, namespace: istio-system}}\n\
         spec: {{selector: {{istio: ingressgateway}}, servers: [{}, {}]}}\n",
        server("secure.example", ", tls: {httpsRedirect: true}"),
        server("plain.example", ", tls: {httpsRedirect: false}"),
    );
    let t = TestInputs::new(&yaml);
    let mut listeners = Listeners::default();
    listeners.reconcile(&t.inputs);
    let tcp = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.expect("connect to the gateway");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("handshake");
    tokio::spawn(conn);
    let req =
        Request::get("/a/b?c=1").header("host", "secure.example:8080").body(Empty::<Bytes>::new()).expect("request");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(resp.headers()["location"], "https://secure.example/a/b?c=1");
    // The other server on the port does not redirect: no route there, 404.
    assert_eq!(get(port, "plain.example", "/a").await.0, StatusCode::NOT_FOUND);
    listeners.close_all();
}

/// A CA, and certificates it signs for `names` (server and client use).
struct TestCa(rcgen::Issuer<'static, rcgen::KeyPair>, String);

impl TestCa {
    fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = p.self_signed(&key).expect("CA").pem();
        TestCa(rcgen::Issuer::new(p, key), pem)
    }

    /// (certificate PEM, key PEM, certificate DER)
    fn leaf(&self, name: &str) -> (String, String, Vec<u8>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .signed_by(&key, &self.0)
            .expect("certificate");
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

#[tokio::test]
async fn a_mutual_server_forwards_the_verified_client_certificate_and_no_forged_one() {
    // The upstream answers with the x-forwarded-client-cert it received.
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let up = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                let xfcc = req.headers().get("x-forwarded-client-cert").map(|v| v.as_bytes().to_vec());
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(xfcc.unwrap_or_else(|| b"-".to_vec())))))
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc));
        }
    });
    let ca = TestCa::new();
    let (server_crt, server_key, _) = ca.leaf("hello.example");
    let (client_crt, client_key, client_der) = ca.leaf("client.example");
    let block = |pem: &str| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
    let (https, http) = (free_port(), free_port());
    let yaml = format!(
        "{}\
         ---\napiVersion: v1\nkind: Secret\nmetadata: {{name: hello-cert, namespace: istio-system}}\n\
         stringData:\n  tls.crt: |\n{}  tls.key: |\n{}  ca.crt: |\n{}\
         ---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: ingress, namespace: istio-system}}\n\
         spec: {{selector: {{istio: ingressgateway}}, servers: [\
         {{port: {{number: {https}, name: https, protocol: HTTPS}}, hosts: ['*'], tls: {{mode: MUTUAL, credentialName: hello-cert}}}}, \
         {{port: {{number: {http}, name: http, protocol: HTTP}}, hosts: ['*']}}]}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: hello, namespace: plain}}\n\
         spec: {{hosts: ['*'], gateways: [istio-system/ingress], http: [{{route: [{{destination: {{host: hello, port: {{number: 80}}}}}}]}}]}}\n",
        hello(up),
        block(&server_crt),
        block(&server_key),
        block(&ca.1)
    );
    let t = TestInputs::new(&yaml);
    let mut listeners = Listeners::default();
    listeners.reconcile(&t.inputs);

    // Over TLS with the client certificate, a forged header beside it.
    let mut roots = rustls::RootCertStore::empty();
    for c in crate::identity::ca::pem_certs(&ca.1).expect("CA") {
        roots.add(c).expect("root");
    }
    let key = crate::identity::tls::certified_key_from_pem(client_crt.as_bytes(), client_key.as_bytes()).expect("key");
    let config = rustls::ClientConfig::builder_with_provider(crate::identity::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(key.cert.clone(), {
            use rustls::pki_types::{PrivateKeyDer, pem::PemObject as _};
            PrivateKeyDer::from_pem_slice(client_key.as_bytes()).expect("key")
        })
        .expect("client settings");
    let tcp = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, https)).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("hello.example").expect("name");
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.expect("TLS");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("handshake");
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "hello.example")
        .header("x-forwarded-client-cert", "Hash=forged;URI=spiffe://cluster.local/ns/prod/sa/admin")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let body = send.send_request(req).await.expect("response").into_body().collect().await.expect("body").to_bytes();
    let body = String::from_utf8_lossy(&body);
    let hash: String =
        ring::digest::digest(&ring::digest::SHA256, &client_der).as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert!(body.starts_with(&format!("Hash={hash};Subject=")), "{body}");
    assert!(body.ends_with(";DNS=client.example") && !body.contains("forged"), "{body}");

    // Without a client certificate (plain HTTP), a forged header is dropped.
    let tcp = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, http)).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("handshake");
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "hello.example")
        .header("x-forwarded-client-cert", "Hash=forged")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let body = send.send_request(req).await.expect("response").into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"-");
    listeners.close_all();
}
