//! CUSTOM authorization in-process: an HTTP and a gRPC authorizer written
//! here, on loopback, asked by the destination stage; allow (with headers
//! for the pod), deny (with the authorizer's status, headers and body), and
//! an authorizer that is down with `failOpen` true and false.
use std::{
    convert::Infallible,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
};

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderValue,
    HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{Request, Response, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;

use super::{inbound, pod};
use crate::proxy::inputs::testing::TestInputs;

/// The authorizers' address: a pod of Service `ext-authz`.
const AUTHZ_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// What the authorizers saw: `<method> <path>` of each check.
type Seen = Arc<Mutex<Vec<String>>>;

/// Allows a request whose `x-ext-authz` is `allow`.
fn allows(header: Option<&str>) -> bool {
    header == Some("allow")
}

/// The HTTP authorizer: 200 with `x-ext-authz-check-result: allowed`, or 403
/// with a body and headers of its own.
async fn http_authorizer(seen: Seen) -> u16 {
    let listener = tokio::net::TcpListener::bind((AUTHZ_IP, 0)).await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let seen = seen.clone();
                async move {
                    let line = format!("{} {}", req.method(), req.uri());
                    let header = req.headers().get("x-ext-authz").and_then(|v| v.to_str().ok()).map(str::to_owned);
                    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let body = String::from_utf8_lossy(&body).into_owned();
                    seen.lock().expect("seen").push(if body.is_empty() { line } else { format!("{line} body={body}") });
                    let r = match allows(header.as_deref()) && !body.contains("forbidden") {
                        true => Response::builder()
                            .header("x-ext-authz-check-result", "allowed")
                            .body(Full::new(Bytes::new())),
                        false => Response::builder()
                            .status(403)
                            .header("x-ext-authz-check-result", "denied")
                            .header("x-internal", "not for the client")
                            .body(Full::new(Bytes::from("denied by the HTTP authorizer"))),
                    };
                    Ok::<_, Infallible>(r.expect("response"))
                }
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc));
        }
    });
    port
}

struct GrpcAuthorizer(Seen);

#[tonic::async_trait]
impl Authorization for GrpcAuthorizer {
    async fn check(&self, req: tonic::Request<CheckRequest>) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let attrs = req.into_inner().attributes.unwrap_or_default();
        let http = attrs.request.and_then(|r| r.http).unwrap_or_default();
        let source = attrs.source.map(|s| s.principal).unwrap_or_default();
        self.0.lock().expect("seen").push(format!("{} {} from {source}", http.method, http.path));
        let header = |k: &str, v: &str| HeaderValueOption {
            header: Some(HeaderValue { key: k.into(), value: v.into(), ..Default::default() }),
            ..Default::default()
        };
        let resp = match allows(http.headers.get("x-ext-authz").map(String::as_str)) {
            true => CheckResponse {
                status: Some(Default::default()),
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                    headers: vec![header("x-ext-authz-check-result", "allowed")],
                    ..Default::default()
                })),
                ..Default::default()
            },
            false => CheckResponse {
                status: Some(envoy_types::pb::google::rpc::Status { code: 7, ..Default::default() }),
                http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                    status: Some(HttpStatus { code: 451 }),
                    headers: vec![header("x-ext-authz-check-result", "denied")],
                    body: "denied by the gRPC authorizer".into(),
                })),
                ..Default::default()
            },
        };
        Ok(tonic::Response::new(resp))
    }
}

async fn grpc_authorizer(seen: Seen) -> u16 {
    let listener = tokio::net::TcpListener::bind((AUTHZ_IP, 0)).await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let server = AuthorizationServer::new(GrpcAuthorizer(seen));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let server = server.clone();
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let mut server = server.clone();
                async move { tower::Service::call(&mut server, req).await }
            });
            let h2 = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
            tokio::spawn(async move { h2.serve_connection(TokioIo::new(tcp), svc).await });
        }
    });
    port
}

/// The pod `hello` behind a CUSTOM policy on `/api/*` naming `provider`;
/// the authorizers' pod and Service; the mesh config's providers.
fn cluster(pod_port: u16, http: u16, grpc: u16, provider: &str) -> String {
    // A port nothing listens on, for an authorizer that is down.
    let down = 1;
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: demo, labels: {{istio.io/dataplane-mode: ambient}}}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: hello, namespace: demo, labels: {{app: hello}}}}\n\
         spec: {{nodeName: n1}}\nstatus: {{podIP: 127.0.0.1, phase: Running}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: hello, namespace: demo}}\n\
         spec: {{clusterIP: 10.96.0.10, selector: {{app: hello}}, ports: [{{name: http, port: 80, targetPort: {pod_port}}}]}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: authz, namespace: demo, labels: {{app: authz}}}}\n\
         spec: {{nodeName: n1}}\nstatus: {{podIP: {AUTHZ_IP}, phase: Running}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: ext-authz, namespace: demo}}\n\
         spec: {{clusterIP: 10.96.0.20, selector: {{app: authz}}, ports: [{{name: http, port: 8000, targetPort: {http}}},\n\
         \x20 {{name: grpc, port: 9000, targetPort: {grpc}}}, {{name: http-down, port: 8001, targetPort: {down}}}]}}\n\
         ---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n\
         \x20   extensionProviders:\n\
         \x20   - name: http\n      envoyExtAuthzHttp:\n        service: ext-authz.demo.svc.cluster.local\n        port: 8000\n\
         \x20       pathPrefix: /check\n        includeRequestHeadersInCheck: [x-ext-authz]\n\
         \x20       headersToUpstreamOnAllow: [x-ext-authz-check-result]\n\
         \x20       headersToDownstreamOnDeny: [x-ext-authz-check-result]\n\
         \x20   - name: grpc\n      envoyExtAuthzGrpc: {{service: ext-authz.demo.svc.cluster.local, port: 9000}}\n\
         \x20   - name: down-open\n      envoyExtAuthzHttp: {{service: ext-authz.demo.svc.cluster.local, port: 8001, failOpen: true}}\n\
         \x20   - name: down-closed\n      envoyExtAuthzGrpc: {{service: ext-authz.demo.svc.cluster.local, port: 8001, statusOnError: \"503\"}}\n\
         \x20   - name: body\n      envoyExtAuthzHttp:\n        service: ext-authz.demo.svc.cluster.local\n        port: 8000\n\
         \x20       includeRequestHeadersInCheck: [x-ext-authz]\n        includeRequestBodyInCheck: {{maxRequestBytes: 16}}\n\
         \x20   - name: partial\n      envoyExtAuthzHttp:\n        service: ext-authz.demo.svc.cluster.local\n        port: 8000\n\
         \x20       includeRequestHeadersInCheck: [x-ext-authz]\n\
         \x20       includeRequestBodyInCheck: {{maxRequestBytes: 16, allowPartialMessage: true}}\n\
         \x20   - name: tracing\n      zipkin: {{service: zipkin.istio-system.svc.cluster.local, port: 9411}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ext, namespace: demo}}\n\
         spec: {{selector: {{matchLabels: {{app: hello}}}}, action: CUSTOM, provider: {{name: {provider}}},\n\
         \x20 rules: [{{to: [{{operation: {{paths: [\"/api/*\"]}}}}]}}]}}\n"
    )
}

/// (status, body, `x-ext-authz-check-result` and `x-internal` as the client got them)
type Got = (StatusCode, String, String, String);

async fn send(t: &TestInputs, port: u16, path: &str, allow: bool) -> Got {
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(super::serve(t.inputs.clone(), server, inbound(t, port)));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client)).await.expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "hello.demo.svc.cluster.local");
    if allow {
        req = req.header("x-ext-authz", "allow");
    }
    let resp = send.send_request(req.body(Empty::<Bytes>::new()).expect("request")).await.expect("response");
    let h = |n: &str| resp.headers().get(n).map_or("-".to_owned(), |v| v.to_str().unwrap_or_default().to_owned());
    let (result, internal) = (h("x-ext-authz-check-result"), h("x-internal"));
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).trim().to_owned(), result, internal)
}

fn got(status: u16, body: &str, result: &str, internal: &str) -> Got {
    (StatusCode::from_u16(status).expect("status"), body.into(), result.into(), internal.into())
}

#[tokio::test]
async fn custom_policies_ask_an_http_or_grpc_authorizer() {
    let (pod_port, _) = pod().await;
    let seen: Seen = Arc::default();
    let (http, grpc) = (http_authorizer(seen.clone()).await, grpc_authorizer(seen.clone()).await);
    let allowed = "/api/x auth=- sub=- payload=1 checked=allowed";
    // (provider, path, allow header, what the client gets)
    let cases = [
        ("http", "/public", false, got(200, "/public auth=- sub=- payload=1 checked=-", "-", "-")),
        ("http", "/api/x", true, got(200, allowed, "-", "-")),
        ("http", "/api/x", false, got(403, "denied by the HTTP authorizer", "denied", "-")),
        ("grpc", "/api/x", true, got(200, allowed, "-", "-")),
        ("grpc", "/api/x", false, got(451, "denied by the gRPC authorizer", "denied", "-")),
        ("down-open", "/api/x", false, got(200, "/api/x auth=- sub=- payload=1 checked=-", "-", "-")),
        ("down-closed", "/api/x", true, got(503, "", "-", "-")),
    ];
    for (provider, path, allow, want) in cases {
        let t = TestInputs::new(&cluster(pod_port, http, grpc, provider));
        assert_eq!(send(&t, pod_port, path, allow).await, want, "{provider} {path} allow={allow}");
    }
    // The HTTP check keeps the method, puts the path under the prefix; the
    // gRPC one names the client's identity. `/public` asked no one.
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(
        seen,
        [
            "GET /check/api/x",
            "GET /check/api/x",
            "GET /api/x from spiffe://cluster.local/ns/demo/sa/test",
            "GET /api/x from spiffe://cluster.local/ns/demo/sa/test",
        ]
    );
}

/// A POST with `body` through the stage, asking the authorizer to allow.
async fn post(t: &TestInputs, port: u16, body: &'static str) -> StatusCode {
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(super::serve(t.inputs.clone(), server, inbound(t, port)));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client)).await.expect("handshake");
    tokio::spawn(conn);
    let req = Request::post("/api/x")
        .header("host", "hello.demo.svc.cluster.local")
        .header("x-ext-authz", "allow")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    send.send_request(req).await.expect("response").status()
}

#[tokio::test]
async fn the_body_goes_to_the_authorizer_when_the_provider_asks_for_it() {
    let (pod_port, _) = pod().await;
    let seen: Seen = Arc::default();
    let (http, grpc) = (http_authorizer(seen.clone()).await, grpc_authorizer(seen.clone()).await);
    let body = TestInputs::new(&cluster(pod_port, http, grpc, "body"));
    let partial = TestInputs::new(&cluster(pod_port, http, grpc, "partial"));
    assert_eq!(post(&body, pod_port, "hello").await, StatusCode::OK);
    assert_eq!(post(&body, pod_port, "forbidden").await, StatusCode::FORBIDDEN);
    // Longer than the provider takes, and not in part: Envoy's 413, no check.
    assert_eq!(post(&body, pod_port, "0123456789abcdef forbidden").await, StatusCode::PAYLOAD_TOO_LARGE);
    // In part: the authorizer sees the first 16 bytes, the pod the whole body.
    assert_eq!(post(&partial, pod_port, "0123456789abcdef forbidden").await, StatusCode::OK);
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen, ["POST /api/x body=hello", "POST /api/x body=forbidden", "POST /api/x body=0123456789abcdef"]);
}
