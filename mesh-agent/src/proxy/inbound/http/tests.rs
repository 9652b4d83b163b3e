//! The destination stage in-process: a connection to a local pod (on
//! loopback) whose RequestAuthentication and AuthorizationPolicy need its
//! requests, served by `destination::serve` over an in-memory stream, with
//! tokens signed by the test. No root, no eBPF.
use std::{
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{Request, Response, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;
use jsonwebtoken::Algorithm;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{Inbound, serve};
use crate::identity::jwt::tests::{ISSUER, Signer, jwks, now};
use crate::proxy::inputs::testing::TestInputs;

const TEST: &str = "spiffe://cluster.local/ns/demo/sa/test";

/// A meshed pod on loopback behind Service `hello` (`http`, port 80 →
/// `port`), with a JWT rule for `signer`'s issuer that copies `sub` to
/// `x-sub` and the payload to `x-payload`, and the policies given.
fn cluster(port: u16, signer: &Signer, policies: &str) -> String {
    cluster_named(port, "http", signer, policies)
}

/// As [`cluster`], with the Service port named `name`.
fn cluster_named(port: u16, name: &str, signer: &Signer, policies: &str) -> String {
    let jwks = jwks(&[signer]).replace('\'', "''");
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: demo, labels: {{istio.io/dataplane-mode: ambient}}}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: hello, namespace: demo, labels: {{app: hello}}}}\n\
         spec: {{nodeName: n1}}\nstatus: {{podIP: 127.0.0.1, phase: Running}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: hello, namespace: demo}}\n\
         spec: {{clusterIP: 10.96.0.10, selector: {{app: hello}}, ports: [{{name: {name}, port: 80, targetPort: {port}}}]}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: demo}}\n\
         spec: {{selector: {{matchLabels: {{app: hello}}}}, jwtRules: [{{issuer: \"{ISSUER}\", audiences: [hello], jwks: '{jwks}',\n\
         outputPayloadToHeader: x-payload, outputClaimToHeaders: [{{header: x-sub, claim: sub}}]}}]}}\n{policies}"
    )
}

/// Public paths for anyone; the rest for requests with a valid token, but
/// never `/admin`.
const POLICIES: &str = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: api, namespace: demo}\n\
    spec: {rules: [{to: [{operation: {paths: [\"/public/*\"]}}]}, {from: [{source: {requestPrincipals: [\"*\"]}}]}]}\n\
    ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: demo}\n\
    spec: {action: DENY, rules: [{to: [{operation: {paths: [/admin, \"/admin/*\"]}}]}]}\n";

/// The pod: answers 200 with the request's path and the headers the test
/// looks at; counts connections.
pub(super) async fn pod() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let connections = Arc::new(AtomicUsize::new(0));
    let accepted = connections.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                let h = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
                let body = format!(
                    "{} auth={} sub={} payload={} checked={}",
                    req.uri().path(),
                    h("authorization"),
                    h("x-sub"),
                    h("x-payload").len(),
                    h("x-ext-authz-check-result")
                );
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc));
        }
    });
    (port, connections)
}

pub(super) fn inbound(t: &TestInputs, port: u16) -> Inbound {
    let state = t.inputs.state();
    Inbound {
        dest: state.workloads["demo/hello"].clone(),
        target: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
        peer: SocketAddr::from((Ipv4Addr::new(10, 0, 0, 5), 40000)),
        principal: Some(TEST.into()),
        client_ip: Ipv4Addr::new(10, 0, 0, 5),
        source: None,
        transparent: None,
        mtls: true,
        service: None,
        opaque: false,
    }
}

/// Requests on one connection through the destination stage.
async fn exchange(
    t: &TestInputs,
    port: u16,
    requests: Vec<Request<Empty<Bytes>>>,
) -> Vec<(StatusCode, String, String)> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(serve(t.inputs.clone(), server, inbound(t, port)));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client)).await.expect("handshake");
    tokio::spawn(conn);
    let mut out = Vec::new();
    for req in requests {
        let resp = send.send_request(req).await.expect("response");
        let status = resp.status();
        let auth = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap_or_default().to_owned());
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        out.push((status, String::from_utf8_lossy(&body).trim().to_owned(), auth.unwrap_or_default()));
    }
    out
}

fn get(path: &str, token: Option<&str>) -> Request<Empty<Bytes>> {
    let mut req = Request::get(path).header("host", "hello.demo.svc.cluster.local");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    req.body(Empty::new()).expect("request")
}

#[tokio::test]
async fn requests_are_authenticated_and_authorized_at_the_destination() {
    let signer = Signer::rsa("k1", Algorithm::RS256);
    let (port, _) = pod().await;
    let t = TestInputs::new(&cluster(port, &signer, POLICIES));
    let valid = signer.sign(json!({"iss": ISSUER, "sub": "alice", "aud": "hello", "exp": now() + 600}));
    let expired = signer.sign(json!({"iss": ISSUER, "sub": "alice", "aud": "hello", "exp": now() - 3600}));
    let other = Signer::rsa("k1", Algorithm::PS256).sign(json!({"iss": "https://other", "sub": "eve"}));
    let got = exchange(
        &t,
        port,
        vec![
            get("/public/x", None),
            get("/api", None),
            get("/api", Some(&valid)),
            get("/api", Some(&expired)),
            get("/api", Some(&other)),
            get("/admin", Some(&valid)),
            get("/public/../admin/users", Some(&valid)),
            get("/public/x?access_token=nonsense", None),
        ],
    )
    .await;
    let payload = valid.split('.').nth(1).expect("payload").len();
    let bearer = r#"Bearer error="invalid_token""#;
    let want: Vec<(StatusCode, String, String)> = vec![
        (StatusCode::OK, "/public/x auth=- sub=- payload=1 checked=-".into(), String::new()),
        (StatusCode::FORBIDDEN, "RBAC: access denied".into(), String::new()),
        // The token's header is not forwarded; its claims and payload are.
        (StatusCode::OK, format!("/api auth=- sub=alice payload={payload} checked=-"), String::new()),
        (StatusCode::UNAUTHORIZED, "Jwt is expired".into(), bearer.into()),
        (StatusCode::UNAUTHORIZED, "Jwt issuer is not configured".into(), bearer.into()),
        (StatusCode::FORBIDDEN, "RBAC: access denied".into(), String::new()),
        (StatusCode::FORBIDDEN, "RBAC: access denied".into(), String::new()),
        (StatusCode::UNAUTHORIZED, "Jwt is not in the form of Header.Payload.Signature".into(), bearer.into()),
    ];
    assert_eq!(got, want);
    let metrics = t.inputs.metrics.encode();
    for code in ["200", "401", "403"] {
        let line = metrics.lines().find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains(r#"reporter="destination""#)
                && l.contains(&format!(r#"response_code="{code}""#))
        });
        assert!(
            line.is_some_and(|l| l.contains(r#"destination_service="hello.demo.svc.cluster.local""#)),
            "{code}:\n{metrics}"
        );
    }
    assert!(metrics.contains(r#"mesh_jwt_checks_total{result="invalid"} 3"#), "{metrics}");
}

#[tokio::test]
async fn a_connection_that_is_not_http_is_judged_as_istio_judges_tcp() {
    let signer = Signer::ed25519("k1");
    let (port, connections) = pod().await;
    // Bytes that are not HTTP, to a port that declares no protocol.
    let garbage = b"\x16\x03\x01 not http";
    let t = TestInputs::new(&cluster_named(port, "web", &signer, POLICIES));
    // The ALLOW rules name paths and request principals: at L4 they grant
    // nothing, so the connection never reaches the pod.
    assert_eq!(send_raw(&t, port, garbage).await, "");
    assert_eq!(connections.load(Ordering::SeqCst), 0);
    assert!(t.inputs.metrics.encode().contains(r#"mesh_tcp_connection_failures_total{reason="denied"} 1"#));
    // Without policies that need requests, it is a byte stream like any other.
    let t = TestInputs::new(&cluster_named(port, "web", &signer, ""));
    let none = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: api, namespace: demo}\n\
                spec: {rules: [{from: [{source: {namespaces: [demo]}}]}]}\n";
    let t2 = TestInputs::new(&cluster_named(port, "web", &signer, none));
    for t in [&t, &t2] {
        // A RequestAuthentication alone: nothing to refuse at L4.
        let answer = send_raw(t, port, b"\x16\x03\x01 not http").await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }
    // A port declared `http`: the stream must be HTTP (Envoy answers 400 too).
    let t = TestInputs::new(&cluster(port, &signer, POLICIES));
    let answer = send_raw(&t, port, garbage).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}

/// Writes `bytes` on a fresh connection through the stage; what comes back
/// until it closes.
async fn send_raw(t: &TestInputs, port: u16, bytes: &[u8]) -> String {
    let (mut client, server) = tokio::io::duplex(4096);
    let served = tokio::spawn(serve(t.inputs.clone(), server, inbound(t, port)));
    client.write_all(bytes).await.expect("write");
    client.shutdown().await.expect("half-close");
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await.expect("read");
    served.await.expect("served");
    String::from_utf8_lossy(&answer).into_owned()
}

mod ext_authz;
