//! What both HTTP sides share — the source's pipeline
//! ([`crate::proxy::outbound::http`]) and the destination's stage
//! ([`crate::proxy::inbound::http`]): bodies, the client connection's
//! server, header rules, path normalization, metering and the access log,
//! the upstream connection pool and its outlier detection.
use std::{
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderName, HeaderValue},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::{
    proxy::{self, Inputs},
    routing::protocol::Handling,
    state::Workload,
};

pub mod cluster;
pub(crate) mod headers;
pub(crate) mod metered;
pub mod path;
pub mod pool;
pub(crate) mod traced;

pub use headers::strip_hop_by_hop;

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
    /// At a gateway: the client's identity, for a mesh client (HBONE, or a
    /// pod of this node); its requests are judged with it.
    pub principal: Option<Arc<str>>,
    /// The series its last request was counted in.
    pub memo: Arc<metered::Memo>,
}

impl Downstream {
    /// A connection captured at a source pod (or a host client) to `orig`,
    /// whose first request takes the round-robin turn `pick`.
    pub(crate) fn captured(
        peer: SocketAddr,
        peer_ip: Ipv4Addr,
        orig: SocketAddrV4,
        source: Option<Arc<Workload>>,
        pick: usize,
    ) -> Self {
        Downstream {
            peer,
            peer_ip,
            orig,
            source,
            gateways: None,
            server: None,
            first_pick: pick.into(),
            client_cert: None,
            principal: None,
            memo: Arc::default(),
        }
    }

    pub(crate) fn pick(&self, ctx: &Inputs) -> usize {
        match self.first_pick.swap(usize::MAX, std::sync::atomic::Ordering::AcqRel) {
            usize::MAX => ctx.next_pick(),
            first => first,
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded.
pub(crate) static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs hyper's server for one client connection (HTTP/1.1 with upgrades,
/// or HTTP/2 with an idle timer), within the agent's limits.
pub(crate) async fn serve_http<I, S, F>(
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
pub(crate) fn local_reply(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{text}\n"))).map_err(|e| match e {}).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// Istio's `request_protocol`.
pub(crate) fn request_protocol(grpc: bool) -> &'static str {
    if grpc { "grpc" } else { "http" }
}

/// After a `101 Switching Protocols`, bytes both ways between the two upgraded
/// connections (WebSocket and the like).
pub(crate) async fn tunnel_upgrade(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    addr: SocketAddrV4,
    idle: Duration,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => return tracing::debug!(upstream = %addr, error = %e, "upgrade did not complete"),
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    let counter = prometheus_client::metrics::counter::Counter::default();
    if let Err((op, error)) =
        super::l4::copy::bidirectional(&mut client, &mut upstream, &counter, &counter, Some(idle), &mut [0; 2]).await
    {
        tracing::debug!(upstream = %addr, %op, %error, "upgraded connection reset");
    }
}
