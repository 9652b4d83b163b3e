//! A gRPC service `test.Echo` with tonic, written as tonic-build would
//! generate it (no protoc needed): `Unary`, and `Bidi` (bidirectional streaming).
use std::{convert::Infallible, pin::Pin};

use futures_util::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoMsg {
    #[prost(string, tag = "1")]
    pub text: String,
    /// A gRPC status code for the server to answer with, 0 for OK.
    #[prost(int32, tag = "2")]
    pub fail_with: i32,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;
type Codec = tonic_prost::ProstCodec<EchoMsg, EchoMsg>;

struct Unary(String);

impl tonic::server::UnaryService<EchoMsg> for Unary {
    type Response = EchoMsg;
    type Future = BoxFuture<Result<Response<EchoMsg>, Status>>;

    fn call(&mut self, req: Request<EchoMsg>) -> Self::Future {
        let name = self.0.clone();
        Box::pin(async move {
            let m = req.into_inner();
            if m.fail_with != 0 {
                return Err(Status::new(tonic::Code::from(m.fail_with), format!("failing as asked: {}", m.text)));
            }
            Ok(Response::new(EchoMsg { text: format!("{name}: {}", m.text), fail_with: 0 }))
        })
    }
}

struct Bidi;

impl tonic::server::StreamingService<EchoMsg> for Bidi {
    type Response = EchoMsg;
    type ResponseStream = Pin<Box<dyn Stream<Item = Result<EchoMsg, Status>> + Send>>;
    type Future = BoxFuture<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, req: Request<Streaming<EchoMsg>>) -> Self::Future {
        Box::pin(async move {
            let out = req.into_inner().map(|m| m.map(|m| EchoMsg { text: m.text.to_uppercase(), fail_with: 0 }));
            Ok(Response::new(Box::pin(out) as Self::ResponseStream))
        })
    }
}

/// Serves `test.Echo` over h2c on `port` in the pod.
pub fn serve(pod: &crate::Pod, port: u16) {
    let name = pod.name.clone();
    crate::servers::serve_async(pod, port, move |stream, _| {
        let name = name.clone();
        async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let name = name.clone();
                async move {
                    let req = req.map(tonic::body::Body::new);
                    let resp = match req.uri().path() {
                        "/test.Echo/Unary" => tonic::server::Grpc::new(Codec::default()).unary(Unary(name), req).await,
                        "/test.Echo/Bidi" => tonic::server::Grpc::new(Codec::default()).streaming(Bidi, req).await,
                        _ => Status::unimplemented("no such method").into_http(),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        }
    });
}

/// A tonic client on `uri`.
pub async fn client(uri: String) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(uri).unwrap().connect().await.unwrap();
    tonic::client::Grpc::new(channel)
}

/// A tonic client over TLS to `addr` (HTTP/2 by ALPN), checking the
/// server's certificate for `server_name` against the PEM CA `ca`: a gRPC
/// client from outside the mesh, at an HTTPS gateway.
pub async fn client_tls(
    addr: std::net::SocketAddr,
    server_name: &str,
    ca: &std::path::Path,
) -> tonic::client::Grpc<tonic::transport::Channel> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("CA added");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = ServerName::try_from(server_name.to_owned()).expect("server name");
    let connect = tower::service_fn(move |_: http::Uri| {
        let (connector, name) = (connector.clone(), name.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let uri = format!("https://{server_name}");
    let channel = tonic::transport::Endpoint::from_shared(uri).unwrap().connect_with_connector(connect).await.unwrap();
    tonic::client::Grpc::new(channel)
}

pub async fn unary(grpc: &mut tonic::client::Grpc<tonic::transport::Channel>, msg: EchoMsg) -> Result<EchoMsg, Status> {
    grpc.ready().await.map_err(|e| Status::unknown(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/test.Echo/Unary");
    grpc.unary(Request::new(msg), path, Codec::default()).await.map(Response::into_inner)
}

/// [`unary`] with request metadata (`name`, `value` pairs).
pub async fn unary_with(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    msg: EchoMsg,
    metadata: &[(&'static str, &'static str)],
) -> Result<EchoMsg, Status> {
    grpc.ready().await.map_err(|e| Status::unknown(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/test.Echo/Unary");
    let mut req = Request::new(msg);
    for (k, v) in metadata {
        req.metadata_mut().insert(*k, tonic::metadata::MetadataValue::from_static(v));
    }
    grpc.unary(req, path, Codec::default()).await.map(Response::into_inner)
}

pub async fn bidi(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    msgs: Vec<EchoMsg>,
) -> Result<Vec<String>, Status> {
    grpc.ready().await.map_err(|e| Status::unknown(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/test.Echo/Bidi");
    let stream = futures_util::stream::iter(msgs);
    let mut replies = grpc.streaming(Request::new(stream), path, Codec::default()).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = replies.message().await? {
        out.push(m.text);
    }
    Ok(out)
}

/// Opens `test.Echo/Bidi` with the messages `requests` yields, for a caller
/// that keeps the stream open and sends as it goes.
pub async fn bidi_open(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    requests: tokio::sync::mpsc::Receiver<EchoMsg>,
) -> Result<Streaming<EchoMsg>, Status> {
    grpc.ready().await.map_err(|e| Status::unknown(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/test.Echo/Bidi");
    let stream = futures_util::stream::unfold(requests, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    Ok(grpc.streaming(Request::new(stream), path, Codec::default()).await?.into_inner())
}
