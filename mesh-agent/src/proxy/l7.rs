//! L7 at the source agent: HTTP/1.1 (keep-alive, chunked, `Expect: 100-continue`,
//! WebSocket through `Upgrade`) and HTTP/2 (h2c, gRPC), with hyper. Each request
//! is routed on its own (a Service's endpoints are balanced per request), sent
//! on a pooled upstream connection to the chosen endpoint (a direct connection
//! for this node, an HBONE stream for another node), streamed both ways without
//! buffering whole messages, and measured: `istio_requests_total`, duration and
//! size histograms, and a JSON access log line.
use std::{
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderMap, HeaderName, HeaderValue},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::{
    proxy::{self, Inputs, LocalReply, ProxyError, Refused},
    routing::http as routing,
    routing::l4::Route,
    routing::sni::Fit,
    state::{Workload, traffic},
    telemetry::{Flags, TcpLabels},
};

pub mod access_log;
pub mod cluster;
pub(crate) mod destination;
mod filters;
mod headers;
mod metered;
mod mirror;
pub mod path;
mod pipeline;
pub mod pool;
mod retry;

pub mod sni;
mod target;
mod upstream;

pub use headers::strip_hop_by_hop;
use headers::*;
use pipeline::handle;
use target::{Target, target};
use upstream::*;
#[cfg(test)]
mod tests;

use crate::routing::protocol::{self, Handling};
use metered::{Metered, Record};
use pool::{PoolKey, Sender};

/// Bodies going either way: the peer's, or one the agent wrote.
pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// The client side of an L7 connection.
#[derive(Debug)]
pub struct Downstream {
    pub peer: SocketAddr,
    pub peer_ip: Ipv4Addr,
    /// Where the client connected (a Service VIP or a pod IP).
    pub orig: SocketAddrV4,
    pub source: Option<Arc<Workload>>,
    /// For a Gateway listener: the gateways (`namespace/name`) serving its port;
    /// requests are routed by their VirtualServices and leave with the
    /// identity of the gateway that matched.
    pub gateways: Option<Arc<[String]>>,
    /// At an HTTPS Gateway port: the server the TLS handshake chose by SNI,
    /// the only one this connection's requests are routed through.
    pub server: Option<crate::routing::sni::Binding>,
    /// The round-robin turn the connection already drew, for its first request
    /// (`usize::MAX` once used), so that L7 does not skip endpoints.
    pub first_pick: std::sync::atomic::AtomicUsize,
    /// At a Gateway server: the `x-forwarded-client-cert` value for the
    /// client certificate the server verified (`tls.mode: MUTUAL`).
    pub client_cert: Option<HeaderValue>,
}

impl Downstream {
    fn pick(&self, ctx: &Inputs) -> usize {
        match self.first_pick.swap(usize::MAX, std::sync::atomic::Ordering::AcqRel) {
            usize::MAX => ctx.next_pick(),
            first => first,
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one client connection until it closes.
pub async fn serve<I>(ctx: Arc<Inputs>, client: I, down: Downstream, handling: Handling)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let down = Arc::new(down);
    let peer = down.peer;
    let svc_ctx = ctx.clone();
    let service = hyper::service::service_fn(move |req| {
        let (ctx, down) = (svc_ctx.clone(), down.clone());
        async move { Ok::<_, Infallible>(handle(ctx, down, req).await) }
    });
    serve_http(&ctx.limits, client, peer, handling, service).await
}

/// Runs hyper's server for one client connection (HTTP/1.1 with upgrades,
/// or HTTP/2 with an idle timer), within the agent's limits.
async fn serve_http<I, S, F>(
    limits: &proxy::limits::Limits,
    client: I,
    peer: SocketAddr,
    handling: Handling,
    service: S,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible, Future = F>
        + Clone
        + Send
        + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let result = match handling {
        Handling::Http2 => {
            // HTTP/2 has no idle timer of its own: a connection that moves no
            // byte either way for the idle timeout is closed (Envoy's
            // `idle_timeout`, 1 h by default, as Istio leaves it).
            let moved = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let io = TokioIo::new(headers::Counting { inner: client, moved: moved.clone() });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(limits.max_streams)
                .max_send_buf_size(limits.h2_send_buffer)
                .max_header_list_size(u32::try_from(limits.max_request_headers).unwrap_or(u32::MAX))
                .keep_alive_interval(limits.keepalive_interval)
                .keep_alive_timeout(limits.keepalive_timeout)
                // RFC 8441: WebSocket (and the like) over HTTP/2 streams.
                .enable_connect_protocol()
                .serve_connection(io, service);
            tokio::select! {
                r = conn => r,
                () = headers::idle(&moved, limits.idle_timeout) => {
                    tracing::debug!(%peer, "HTTP/2 client connection idle: closed");
                    return;
                }
            }
        }
        _ => {
            let io = TokioIo::new(client);
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(limits.max_request_headers.max(8192))
                .serve_connection(io, service)
                .with_upgrades()
                .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "HTTP client connection ended with an error");
    }
}

/// Envoy's wording for what the agent answers itself.
fn local_reply(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{text}\n"))).map_err(|e| match e {}).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// A try that got no response.
enum Failure {
    /// No upstream connection (connect error, tunnel refused, policy).
    Connect(ProxyError),
    /// The upstream reset or closed before answering.
    Reset(hyper::Error),
    /// The per-try timeout passed.
    Timeout,
}

/// Routes a request: by the mesh's rules for the Service asked for, or at a
/// gateway by the rules bound to it. Also returns whose identity the request
/// leaves with. `None`: a gateway has no rule for it.
fn decide(
    ctx: &Inputs,
    state: &crate::state::State,
    down: &Downstream,
    view: &routing::RequestView<'_>,
    pick: usize,
) -> Option<(routing::Decision, Option<Arc<Workload>>)> {
    let random = ctx.next_random();
    match &down.gateways {
        None => {
            Some((routing::route_request(state, down.orig, view, pick, random, &ctx.clusters), down.source.clone()))
        }
        Some(gws) => {
            let bound = down.server.as_ref().and_then(|b| b.server());
            let (decision, gw) =
                routing::route_gateway(state, gws, bound, down.orig, view, pick, random, &ctx.clusters)?;
            Some((decision, state.gateway(&gw).map(|g| g.workload.clone())))
        }
    }
}

/// Istio's `request_protocol`.
fn request_protocol(grpc: bool) -> &'static str {
    if grpc { "grpc" } else { "http" }
}
