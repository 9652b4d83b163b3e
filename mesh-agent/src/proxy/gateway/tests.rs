//! A Gateway in-process: served by [`Listeners::reconcile`] for a gateway
//! pod whose address is on loopback, reached as a captured connection is
//! (the plaintext door's lookup, on a listener at the gateway pod's
//! address), HTTP routed by the
//! VirtualService bound to it to a loopback server. No root, no eBPF.
use std::{convert::Infallible, net::Ipv4Addr, sync::Arc};

use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{Request, Response, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;

use super::Listeners;
use crate::proxy::{Inputs, inputs::testing::TestInputs};

/// The ingress gateway pod's address (loopback).
const GATEWAY: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);

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

/// A gateway pod `name` on node n1 at `ip`, running as `sa`, labelled `istio: <label>`.
fn gateway_pod(name: &str, ip: Ipv4Addr, sa: &str, label: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: istio-system, labels: {{istio: {label}}}, \
         annotations: {{inject.istio.io/templates: gateway}}}}\n\
         spec: {{nodeName: n1, serviceAccountName: {sa}}}\nstatus: {{podIP: {ip}, phase: Running}}\n"
    )
}

/// Node n1 on loopback, the ingress gateway pod, and the Service
/// `plain/hello` whose one pod is the loopback server on port `up`.
fn hello(up: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\n\
         status: {{addresses: [{{type: InternalIP, address: 127.0.0.1}}]}}\n{}\
         ---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: plain}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: hello, namespace: plain, labels: {{app: hello}}}}\n\
         spec: {{nodeName: n1}}\nstatus: {{podIP: 127.0.0.1, phase: Running}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: hello, namespace: plain}}\n\
         spec: {{clusterIP: 10.96.0.10, selector: {{app: hello}}, ports: [{{name: http, port: 80, targetPort: {up}}}]}}\n",
        gateway_pod("ingress", GATEWAY, "ingress", "ingressgateway")
    )
}

/// [`hello`], an HTTP Gateway on `port` for every host, and a VirtualService
/// bound to it whose one rule (`matching`, then a route) goes to `plain/hello`.
fn http_ingress(port: u16, up: u16, matching: &str) -> String {
    format!(
        "{}\
         ---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: ingress, namespace: istio-system}}\n\
         spec: {{selector: {{istio: ingressgateway}}, servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: ['*']}}]}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: hello, namespace: plain}}\n\
         spec: {{hosts: ['*'], gateways: [istio-system/ingress], http: [{{{matching}route: [{{destination: {{host: hello, port: {{number: 80}}}}}}]}}]}}\n",
        hello(up)
    )
}

/// A listening socket on a gateway pod's address, the port the kernel gave.
async fn door(ip: Ipv4Addr) -> (tokio::net::TcpListener, u16) {
    let l = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind on the gateway pod's address");
    let port = l.local_addr().expect("address").port();
    (l, port)
}

/// Serves this node's gateway ports and hands what `doors` accept to the
/// inbound plaintext handler, as capture would.
fn serve(t: &TestInputs, doors: Vec<tokio::net::TcpListener>) -> Listeners {
    let mut listeners = Listeners::default();
    listeners.reconcile(&t.inputs);
    for door in doors {
        let ctx: Arc<Inputs> = t.inputs.clone();
        tokio::spawn(async move {
            while let Ok((tcp, peer)) = door.accept().await {
                let ctx = ctx.clone();
                // As the plaintext door does (the gateway must not import it).
                let Ok(std::net::SocketAddr::V4(local)) = tcp.local_addr() else { continue };
                let Some(serving) = ctx.gateways.get(local) else { continue };
                tokio::spawn(serving.serve_captured(ctx.clone(), tcp, peer));
            }
        });
    }
    listeners
}

async fn get(port: u16, host: &str, path: &str) -> (StatusCode, String) {
    get_at(GATEWAY, port, host, path).await
}

async fn get_at(ip: Ipv4Addr, port: u16, host: &str, path: &str) -> (StatusCode, String) {
    let tcp = tokio::net::TcpStream::connect((ip, port)).await.expect("connect to the gateway");
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
    let (up, (door, port)) = (upstream().await, door(GATEWAY).await);
    let yaml = http_ingress(port, up, "match: [{uri: {prefix: /hello}}], ");
    let t = TestInputs::new(&yaml);
    let listeners = serve(&t, vec![door]);
    let status = listeners.status();
    assert!(status.iter().any(|p| p.plan.addr.port() == port && p.status == "serving"), "{status:?}");

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
                && l.contains("source_principal=\"spiffe://cluster.local/ns/istio-system/sa/ingress\"")
        })
    };
    assert!(counted("200", "-") && counted("404", "NR"), "{metrics}");
}

#[tokio::test]
async fn a_pooled_upstream_connection_never_carries_another_gateways_request() {
    // Two gateway pods on this node, each running as its own service account
    // and selected by its own Gateway; the destination pod (meshed, on this
    // node) admits only gateway pod `a`'s identity.
    const B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
    let ((door_a, port), door_b) = (door(GATEWAY).await, tokio::net::TcpListener::bind((B, 0)).await.expect("bind"));
    let port_b = door_b.local_addr().expect("address").port();
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
    let gateway = |name: &str, port: u16, host: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: istio-system}}\n\
             spec: {{selector: {{istio: {name}}}, servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: ['{host}']}}]}}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: demo}}\n\
             spec: {{hosts: ['{host}'], gateways: [istio-system/{name}], http: [{{route: [{{destination: {{host: hello, port: {{number: 80}}}}}}]}}]}}\n"
        )
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\n\
         status: {{addresses: [{{type: InternalIP, address: 127.0.0.1}}]}}\n{}{}\
         ---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: demo, labels: {{istio.io/dataplane-mode: ambient}}}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: hello, namespace: demo, labels: {{app: hello}}}}\n\
         spec: {{nodeName: n1, serviceAccountName: hello}}\nstatus: {{podIP: 127.0.0.3, phase: Running}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: hello, namespace: demo}}\n\
         spec: {{clusterIP: 10.96.0.10, selector: {{app: hello}}, ports: [{{name: http, port: 80, targetPort: {up}}}]}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: only-a, namespace: demo}}\n\
         spec: {{selector: {{matchLabels: {{app: hello}}}}, action: ALLOW, \
         rules: [{{from: [{{source: {{principals: [cluster.local/ns/istio-system/sa/gw-a]}}}}]}}]}}\n{}{}",
        gateway_pod("gw-a", GATEWAY, "gw-a", "gw-a"),
        gateway_pod("gw-b", B, "gw-b", "gw-b"),
        gateway("gw-a", port, "a.example"),
        gateway("gw-b", port_b, "b.example"),
    );
    let t = TestInputs::new(&yaml);
    let _listeners = serve(&t, vec![door_a, door_b]);

    // Gateway pod a's request first (its upstream connection is pooled),
    // then gateway pod b's: it leaves with b's identity, on a connection of its own.
    assert_eq!(get(port, "a.example", "/").await, (StatusCode::OK, "secret".to_owned()));
    let (status, _) = get_at(B, port_b, "b.example", "/").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "gateway pod b got through on gateway pod a's connection");
    // A Gateway serves only the pods it selects: b's host at pod a is not routed.
    assert_eq!(get(port, "b.example", "/").await.0, StatusCode::NOT_FOUND);

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
    let (evil, (door, port)) = (backend("evil", Ipv4Addr::new(127, 0, 0, 4)).await, door(GATEWAY).await);
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
        "apiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\n\
         status: {{addresses: [{{type: InternalIP, address: 127.0.0.1}}]}}\n{}\
         ---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: ingress, namespace: istio-system}}\n\
         spec: {{selector: {{istio: ingressgateway}}, servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, \
         hosts: [prod/app.example, '*/open.example']}}]}}\n{}{}",
        gateway_pod("ingress", GATEWAY, "ingress", "ingressgateway"),
        tenant("evil", "10.96.0.20", evil, "app.example, other.example"),
        tenant("prod", "10.96.0.10", prod, "'*'"),
    );
    let t = TestInputs::new(&yaml);
    let _listeners = serve(&t, vec![door]);
    // The reserved host goes to prod, whatever evil's VirtualService says.
    assert_eq!(get(port, "app.example", "/").await, (StatusCode::OK, "prod".into()));
    // A host no server of the Gateway lists is not served, even though a
    // VirtualService bound to it says `*`.
    assert_eq!(get(port, "other.example", "/").await.0, StatusCode::NOT_FOUND);
    // `*/`: any namespace may bind it (prod's `*` does).
    assert_eq!(get(port, "open.example", "/").await, (StatusCode::OK, "prod".into()));
}

#[tokio::test]
async fn an_http_server_with_https_redirect_sends_every_request_to_https() {
    let (door, port) = door(GATEWAY).await;
    let server = |hosts: &str, tls: &str| {
        format!("{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: [{hosts}]{tls}}}")
    };
    let yaml = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\n\
         status: {{addresses: [{{type: InternalIP, address: 127.0.0.1}}]}}\n{}\
         ---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: ingress, namespace: istio-system}}\n\
         spec: {{selector: {{istio: ingressgateway}}, servers: [{}, {}]}}\n",
        gateway_pod("ingress", GATEWAY, "ingress", "ingressgateway"),
        server("secure.example", ", tls: {httpsRedirect: true}"),
        server("plain.example", ", tls: {httpsRedirect: false}"),
    );
    let t = TestInputs::new(&yaml);
    let _listeners = serve(&t, vec![door]);
    let tcp = tokio::net::TcpStream::connect((GATEWAY, port)).await.expect("connect to the gateway");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("handshake");
    tokio::spawn(conn);
    let req =
        Request::get("/a/b?c=1").header("host", "secure.example:8080").body(Empty::<Bytes>::new()).expect("request");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(resp.headers()["location"], "https://secure.example/a/b?c=1");
    // The other server on the port does not redirect: no route there, 404.
    assert_eq!(get(port, "plain.example", "/a").await.0, StatusCode::NOT_FOUND);
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
    let ((https_door, https), (http_door, http)) = (door(GATEWAY).await, door(GATEWAY).await);
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
    let _listeners = serve(&t, vec![https_door, http_door]);

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
    let tcp = tokio::net::TcpStream::connect((GATEWAY, https)).await.expect("connect");
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
    let tcp = tokio::net::TcpStream::connect((GATEWAY, http)).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("handshake");
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "hello.example")
        .header("x-forwarded-client-cert", "Hash=forged")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let body = send.send_request(req).await.expect("response").into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"-");
}

#[tokio::test]
async fn a_gateway_pod_of_another_namespace_never_serves_a_gateways_certificate() {
    // A tenant's gateway pod labelled as the ingress gateway: as in Istio, it
    // serves the shared Gateway's HTTP server, but never its HTTPS server,
    // whose certificate is istio-system's.
    const TENANT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 12);
    let ca = TestCa::new();
    let (crt, key, _) = ca.leaf("hello.example");
    let block = |pem: &str| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
    let (up, ((door, https), tenant_door)) = (upstream().await, (door(GATEWAY).await, door(TENANT).await));
    let (tenant_door, tenant_port) = tenant_door;
    let yaml = format!(
        "{}{}\
         ---\napiVersion: v1\nkind: Secret\nmetadata: {{name: hello-cert, namespace: istio-system}}\n\
         stringData:\n  tls.crt: |\n{}  tls.key: |\n{}\
         ---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: ingress, namespace: istio-system}}\n\
         spec: {{selector: {{istio: ingressgateway}}, servers: [\
         {{port: {{number: {https}, name: https, protocol: HTTPS}}, hosts: ['*'], tls: {{mode: SIMPLE, credentialName: hello-cert}}}}, \
         {{port: {{number: {tenant_port}, name: http, protocol: HTTP}}, hosts: ['*']}}]}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: hello, namespace: plain}}\n\
         spec: {{hosts: ['*'], gateways: [istio-system/ingress], http: [{{route: [{{destination: {{host: hello, port: {{number: 80}}}}}}]}}]}}\n",
        hello(up),
        gateway_pod("tenant-gw", TENANT, "tenant", "ingressgateway")
            .replace("namespace: istio-system", "namespace: attacker"),
        block(&crt),
        block(&key),
    );
    let t = TestInputs::new(&yaml);
    let _listeners = serve(&t, vec![door, tenant_door]);
    let (plans, conflicts) = super::plan(&t.inputs.state(), "n1");
    let served: Vec<String> = plans.values().map(|p| format!("{} {}", p.pod, p.addr)).collect();
    // The istio-system pod serves both ports; the tenant's pod the HTTP one only.
    assert!(served.contains(&format!("istio-system/ingress {GATEWAY}:{https}")), "{served:?}");
    assert!(served.contains(&format!("attacker/tenant-gw {TENANT}:{tenant_port}")), "{served:?}");
    assert!(!served.contains(&format!("attacker/tenant-gw {TENANT}:{https}")), "{served:?}");
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert!(conflicts[0].reason.contains("attacker/tenant-gw"), "{conflicts:?}");
    // Positive control: the tenant's pod serves the shared HTTP server.
    assert_eq!(get_at(TENANT, tenant_port, "x", "/p").await.0, StatusCode::OK);
}

/// A GET with an optional bearer token; status and the `x-sub` the upstream
/// saw is not echoed, so the body is the path and host.
async fn get_with(port: u16, path: &str, token: Option<&str>) -> StatusCode {
    let tcp = tokio::net::TcpStream::connect((GATEWAY, port)).await.expect("connect to the gateway");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "hello.example");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = send.send_request(req.body(Empty::<Bytes>::new()).expect("request")).await.expect("response");
    resp.status()
}

#[tokio::test]
async fn a_gateway_judges_each_request_by_its_pods_jwt_and_request_policies() {
    use crate::identity::jwt::tests::{ISSUER, Signer, jwks, now};
    let (up, (door, port)) = (upstream().await, door(GATEWAY).await);
    let signer = Signer::ed25519("k1");
    let keys = jwks(&[&signer]).replace('\'', "''");
    // Istio's "JWT at the ingress gateway": a RequestAuthentication and an
    // AuthorizationPolicy selecting the gateway pod; /public for anyone,
    // the rest for a valid token, never /admin.
    let yaml = format!(
        "{}\
         ---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: ingress, namespace: istio-system}}\n\
         spec: {{selector: {{istio: ingressgateway}}, servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: ['*']}}]}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: hello, namespace: plain}}\n\
         spec: {{hosts: ['*'], gateways: [istio-system/ingress], http: [{{route: [{{destination: {{host: hello, port: {{number: 80}}}}}}]}}]}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: istio-system}}\n\
         spec: {{selector: {{matchLabels: {{istio: ingressgateway}}}}, jwtRules: [{{issuer: \"{ISSUER}\", jwks: '{keys}'}}]}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: front, namespace: istio-system}}\n\
         spec: {{selector: {{matchLabels: {{istio: ingressgateway}}}}, rules: [{{to: [{{operation: {{paths: [\"/public/*\"]}}}}]}}, \
         {{from: [{{source: {{requestPrincipals: [\"*\"]}}}}]}}]}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: no-admin, namespace: istio-system}}\n\
         spec: {{selector: {{matchLabels: {{istio: ingressgateway}}}}, action: DENY, rules: [{{to: [{{operation: {{paths: [/admin]}}}}]}}]}}\n",
        hello(up)
    );
    let t = TestInputs::new(&yaml);
    let _listeners = serve(&t, vec![door]);
    let token = signer.sign(serde_json::json!({"iss": ISSUER, "sub": "alice", "exp": now() + 600}));
    let forged = Signer::ed25519("k1").sign(serde_json::json!({"iss": ISSUER, "sub": "mallory", "exp": now() + 600}));
    // The positive controls first: public paths, and a valid token.
    assert_eq!(get_with(port, "/public/a", None).await, StatusCode::OK);
    assert_eq!(get_with(port, "/private", Some(&token)).await, StatusCode::OK);
    // No token: 403; a token the issuer did not sign: 401; /admin even with one: 403.
    assert_eq!(get_with(port, "/private", None).await, StatusCode::FORBIDDEN);
    assert_eq!(get_with(port, "/private", Some(&forged)).await, StatusCode::UNAUTHORIZED);
    assert_eq!(get_with(port, "/admin", Some(&token)).await, StatusCode::FORBIDDEN);
    // Refusals are the gateway's requests, reported for its pod.
    let metrics = t.inputs.metrics.encode();
    let refused = metrics.lines().any(|l| {
        l.starts_with("istio_requests_total{")
            && l.contains("response_code=\"403\"")
            && l.contains("source_workload=\"ingress\"")
    });
    assert!(refused, "{metrics}");
}

#[tokio::test]
async fn a_connection_accepted_as_the_agent_stops_accepting_is_still_served_by_its_gateway() {
    // A handover: the replacement accepts on the same sockets and the old
    // agent stops accepting, but a connection it took from the queue just
    // before is looked up and served after that moment. It must meet the
    // gateway still (not the gateway pod's own port, where nothing listens).
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (up, (door, port)) = (upstream().await, door(GATEWAY).await);
    let yaml = http_ingress(port, up, "");
    let t = TestInputs::new(&yaml);
    let mut listeners = Listeners::default();
    listeners.reconcile(&t.inputs);
    let mut client = tokio::net::TcpStream::connect((GATEWAY, port)).await.expect("connect to the gateway");
    client.write_all(b"GET /late HTTP/1.1\r\nHost: hello.example\r\nConnection: close\r\n\r\n").await.expect("write");
    // Accepted from the queue; then the agent stops accepting; then the
    // connection's handler looks its port up.
    let (tcp, peer) = door.accept().await.expect("accept");
    listeners.stop_accepting();
    let Ok(std::net::SocketAddr::V4(local)) = tcp.local_addr() else { panic!("an IPv4 door") };
    let serving = t.inputs.gateways.get(local).expect("the gateway port is still served for what was accepted");
    tokio::spawn(serving.serve_captured(t.inputs.clone(), tcp, peer));
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("/late via hello.example"), "{answer}");
}
