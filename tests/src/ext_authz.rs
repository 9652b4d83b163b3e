//! External authorizers for the CUSTOM tests, run in a pod: Envoy's HTTP
//! convention on one port and its gRPC `Authorization/Check` on another.
//! Both allow a request whose `x-ext-authz` header is `allow`: the HTTP one
//! then sets `x-ext-authz-check-result: allowed` for the upstream, the gRPC
//! one too; they deny anything else with a status, a header and a body of
//! their own (HTTP 403, gRPC 451).
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderValue,
    HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use http_body_util::Full;
use hyper::body::Bytes;

use crate::{Pod, servers::serve_async};

fn allows(header: Option<&str>) -> bool {
    header == Some("allow")
}

/// The HTTP authorizer on `port`.
pub fn http(pod: &Pod, port: u16) {
    serve_async(pod, port, |stream, _| async move {
        let svc = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| {
            let header = req.headers().get("x-ext-authz").and_then(|v| v.to_str().ok());
            let path = req.uri().path().to_owned();
            let r = match allows(header) {
                true => hyper::Response::builder()
                    .header("x-ext-authz-check-result", "allowed")
                    .body(Full::new(Bytes::new())),
                false => hyper::Response::builder()
                    .status(403)
                    .header("x-ext-authz-check-result", "denied")
                    .body(Full::new(Bytes::from(format!("denied by the HTTP authorizer ({path})\n")))),
            };
            async move { Ok::<_, std::convert::Infallible>(r.unwrap()) }
        });
        let io = hyper_util::rt::TokioIo::new(stream);
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
    });
}

struct Grpc;

fn header(k: &str, v: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: k.into(), value: v.into(), ..Default::default() }),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Authorization for Grpc {
    async fn check(&self, req: tonic::Request<CheckRequest>) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let attrs = req.into_inner().attributes.unwrap_or_default();
        let http = attrs.request.and_then(|r| r.http).unwrap_or_default();
        let source = attrs.source.map(|s| s.principal).unwrap_or_default();
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
                    body: format!("denied by the gRPC authorizer ({} from {source})\n", http.path),
                })),
                ..Default::default()
            },
        };
        Ok(tonic::Response::new(resp))
    }
}

/// The gRPC authorizer on `port`.
pub fn grpc(pod: &Pod, port: u16) {
    serve_async(pod, port, |stream, _| async move {
        let server = AuthorizationServer::new(Grpc);
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let mut server = server.clone();
            async move { tower::Service::call(&mut server, req).await }
        });
        let h2 = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
        let _ = h2.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
    });
}
