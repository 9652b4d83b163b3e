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

use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderMap, HeaderName, HeaderValue},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::{
    agent::Context,
    proxy::{self, ProxyError},
    route::{Refusal, Route},
    state::Workload,
    telemetry::TcpLabels,
};

pub mod access_log;
mod metered;
pub mod pool;
pub mod protocol;
pub mod routing;

use metered::{Metered, Record};
use pool::{PoolKey, Sender};
use protocol::Handling;

/// Bodies going either way: the peer's, or one the agent wrote.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The client side of an L7 connection.
#[derive(Debug)]
pub struct Downstream {
    pub peer: SocketAddr,
    pub peer_ip: Ipv4Addr,
    /// Where the client connected (a Service VIP or a pod IP).
    pub orig: SocketAddrV4,
    pub source: Option<Arc<Workload>>,
    /// The round-robin turn the connection already drew, for its first request
    /// (`usize::MAX` once used), so that L7 does not skip endpoints.
    pub first_pick: std::sync::atomic::AtomicUsize,
}

impl Downstream {
    fn pick(&self, ctx: &Context) -> usize {
        match self.first_pick.swap(usize::MAX, std::sync::atomic::Ordering::AcqRel) {
            usize::MAX => ctx.next_pick(),
            first => first,
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [&str; 7] =
    ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade", "proxy-authorization"];

const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one client connection until it closes.
pub async fn serve(ctx: Arc<Context>, client: TcpStream, down: Downstream, handling: Handling) {
    let down = Arc::new(down);
    let peer = down.peer;
    let svc_ctx = ctx.clone();
    let service = hyper::service::service_fn(move |req| {
        let (ctx, down) = (svc_ctx.clone(), down.clone());
        async move { Ok::<_, Infallible>(handle(ctx, down, req).await) }
    });
    let io = TokioIo::new(client);
    let result = match handling {
        Handling::Http2 => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(io, service)
                .await
        }
        _ => {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
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
    let mut r = Response::new(Full::new(Bytes::from(format!("{text}\n"))).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/grpc"))
}

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if !(keep_upgrade && n == header::UPGRADE) {
            headers.remove(n);
        }
    }
    for h in HOP_BY_HOP {
        if keep_upgrade && (h == "upgrade" || h == "connection") {
            continue;
        }
        if h == "te" && headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers")) {
            continue;
        }
        headers.remove(h);
    }
}

fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() <= hyper::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// A UUID v4 for `x-request-id`.
fn request_id() -> String {
    let mut b = crate::identity::random_bytes::<16>().unwrap_or_default();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = crate::identity::hex(&b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

async fn handle(ctx: Arc<Context>, down: Arc<Downstream>, mut req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let started_at = SystemTime::now();
    if !req.headers().contains_key("x-request-id")
        && let Ok(v) = HeaderValue::from_str(&request_id())
    {
        req.headers_mut().insert("x-request-id", v);
    }
    let grpc = is_grpc(req.headers());
    let state = ctx.state();
    let source = down.source.as_deref();
    let view = routing::RequestView {
        method: req.method().as_str(),
        path: req.uri().path_and_query().map_or("/", |p| p.as_str()),
        headers: req.headers(),
    };
    let decision = routing::route_request(&state, down.orig, &view, down.pick(&ctx), ctx.next_random());
    let timeout = decision.timeout;
    let (dest, addr, tcp_labels) = match decision.route {
        Route::Service { service, endpoint, addr, .. } => {
            let l = TcpLabels::new(source, Some(&endpoint), Some(&service), false);
            (Some(endpoint), addr, l)
        }
        Route::Workload { workload, addr } => {
            let l = TcpLabels::new(source, Some(&workload), None, false);
            (Some(workload), addr, l)
        }
        Route::Passthrough { addr } => (None, addr, TcpLabels::new(source, None, None, true)),
        Route::Refused { service, reason } => {
            let l = TcpLabels::new(source, None, Some(&service), false);
            let (text, flags) = match reason {
                Refusal::NoReadyEndpoint(_) => ("no healthy upstream", "UH"),
                Refusal::UnknownPort(_) | Refusal::NoSubset(_) | Refusal::NoRoute => ("no healthy upstream", "NR"),
            };
            let record = Record::new(&ctx, &down, &req, l, grpc, None, started_at, start);
            return record.finish_local(StatusCode::SERVICE_UNAVAILABLE, text, flags);
        }
    };
    let mut record = Record::new(&ctx, &down, &req, tcp_labels, grpc, Some(addr), started_at, start);
    let version = req.version();
    let upgrade = wants_upgrade(&req);
    let key = PoolKey { client: down.peer_ip, upstream: addr, h2: version == hyper::Version::HTTP_2 };
    let sender = match ctx.http_pool.take(&key) {
        Some(s) => s,
        None => match connect(&ctx, &state, &down, dest.as_ref(), addr, key.h2).await {
            Ok((s, mtls)) => {
                record.set_mtls(mtls);
                s
            }
            Err(e) => {
                drop(state);
                if matches!(e, ProxyError::Tunnel(_)) {
                    record.set_mtls(true);
                }
                tracing::info!(peer = %down.peer, upstream = %addr, error = %e, "request failed: upstream connection");
                ctx.metrics
                    .connection_failures
                    .get_or_create(&crate::telemetry::ReasonLabels { reason: e.reason() })
                    .inc();
                return match e {
                    ProxyError::Denied { .. }
                    | ProxyError::Tunnel(crate::hbone::HboneError::Status {
                        status: StatusCode::UNAUTHORIZED, ..
                    }) => record.finish_local(StatusCode::FORBIDDEN, "RBAC: access denied", "-"),
                    _ => record.finish_local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                        "UF",
                    ),
                };
            }
        },
    };
    drop(state);
    if pool::is_mtls(&sender) {
        record.set_mtls(true);
    }

    // The request as it goes upstream.
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if key.h2 {
        // HTTP/2 needs the scheme and authority in the URI.
        let authority = parts.uri.authority().map(|a| a.to_string()).unwrap_or_else(|| down.orig.to_string());
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        if let Ok(uri) = format!("http://{authority}{path}").parse() {
            parts.uri = uri;
        }
    } else if parts.uri.authority().is_some() {
        // Absolute-form from the client: origin-form upstream, Host kept.
        let path = parts.uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
        if let Ok(uri) = path.parse() {
            parts.uri = uri;
        }
    }
    let body = Metered::request(body, record.shared()).boxed();
    let up_req = Request::from_parts(parts, body);
    let sent = match timeout {
        Some(t) => match tokio::time::timeout(t, sender.send(up_req)).await {
            Ok(r) => r,
            Err(_) => {
                // The upstream connection is dropped with the request (not pooled).
                tracing::info!(peer = %down.peer, upstream = %addr, ?t, "request timed out");
                return record.finish_local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout", "UT");
            }
        },
        None => sender.send(up_req).await,
    };
    let mut resp = match sent {
        Ok((resp, sender)) => {
            ctx.http_pool.release(&ctx, key, sender);
            resp
        }
        Err(e) => {
            tracing::info!(peer = %down.peer, upstream = %addr, error = %e, "request failed upstream");
            return record.finish_local(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
                "UC",
            );
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        if let Some(client_upgrade) = client_upgrade {
            tokio::spawn(tunnel_upgrade(client_upgrade, upstream_upgrade, addr));
        }
        let (parts, _) = resp.into_parts();
        return record.finish_switch(parts);
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    record.set_response(parts.status, &parts.headers);
    Response::from_parts(parts, Metered::response(body, record).boxed())
}

/// After a `101 Switching Protocols`, bytes both ways between the two upgraded
/// connections (WebSocket and the like).
async fn tunnel_upgrade(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade, addr: SocketAddrV4) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => return tracing::debug!(upstream = %addr, error = %e, "upgrade did not complete"),
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    let counter = prometheus_client::metrics::counter::Counter::default();
    if let Err((op, error)) = proxy::copy::bidirectional(&mut client, &mut upstream, &counter, &counter).await {
        tracing::debug!(upstream = %addr, %op, %error, "upgraded connection reset");
    }
}

/// A new upstream connection and its HTTP handshake.
async fn connect(
    ctx: &Context,
    state: &crate::state::State,
    down: &Downstream,
    dest: Option<&Arc<Workload>>,
    addr: SocketAddrV4,
    h2: bool,
) -> Result<(Sender, bool), ProxyError> {
    // The generation before connecting: a policy reload meanwhile keeps this
    // connection out of the pool.
    let generation = ctx.http_pool.generation();
    let opened = proxy::open_upstream(ctx, state, down.source.as_ref(), down.peer, dest, addr).await?;
    let mtls = opened.mtls;
    let sender = pool::handshake(opened.io, h2, mtls, generation).await.map_err(|error| ProxyError::Connect {
        addr,
        source_ip: None,
        error: std::io::Error::other(error),
    })?;
    Ok((sender, mtls))
}

/// Istio's `request_protocol`.
fn request_protocol(grpc: bool) -> &'static str {
    if grpc { "grpc" } else { "http" }
}
