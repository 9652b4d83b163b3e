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
pub mod pool;
mod retry;

pub mod sni;
mod target;
mod upstream;

pub use headers::strip_hop_by_hop;
use headers::*;
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

async fn handle(ctx: Arc<Inputs>, down: Arc<Downstream>, mut req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let started_at = SystemTime::now();
    if !req.headers().contains_key(&X_REQUEST_ID) {
        req.headers_mut().insert(X_REQUEST_ID.clone(), request_id(&ctx));
    }
    // At the edge the client certificate header is the gateway's to set
    // (Envoy's SANITIZE_SET): whatever a client sent in it is dropped.
    if down.gateways.is_some() {
        req.headers_mut().remove(&X_FORWARDED_CLIENT_CERT);
        if let Some(v) = &down.client_cert {
            req.headers_mut().insert(X_FORWARDED_CLIENT_CERT.clone(), v.clone());
        }
    }
    // One host for routing and policy alike: a Host header that contradicts
    // the authority is refused before anything reads either.
    if authority_conflict(&req) {
        let labels = TcpLabels::new(down.source.as_deref(), None, None, false);
        let record = Record::new(&ctx, &down, &req, labels, is_grpc(req.headers()), None, started_at, start);
        return record.finish_local(LocalReply::AUTHORITY_CONFLICT);
    }
    // HTTP/2 names the host in `:authority`; routing reads `Host`.
    if !req.headers().contains_key(header::HOST)
        && let Some(v) = req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    let grpc = is_grpc(req.headers());
    let state = ctx.state();
    // Before anything reads the path: routing and the upstream see the same one.
    if path::apply(&mut req, state.path_normalization).is_err() {
        let labels = TcpLabels::new(down.source.as_deref(), None, None, false);
        let record = Record::new(&ctx, &down, &req, labels, grpc, None, started_at, start);
        return record.finish_local(LocalReply::BAD_PATH);
    }
    if upgrade_asked(&req) == Upgrade::Refused {
        let labels = TcpLabels::new(down.source.as_deref(), None, None, false);
        let record = Record::new(&ctx, &down, &req, labels, grpc, None, started_at, start);
        return record.finish_local(LocalReply::UPGRADE_REFUSED);
    }
    let view = routing::RequestView {
        method: req.method().as_str(),
        path: req.uri().path_and_query().map_or("/", |p| p.as_str()),
        headers: req.headers(),
        client: down.peer_ip,
        namespace: down.source.as_deref().map(|w| &*w.namespace),
    };
    // On a TLS connection, only hosts of the server its SNI chose: a host
    // another server on the port takes (domain fronting, a reused HTTP/2
    // connection) is refused before anything routes it (421: the client may
    // retry on a connection of its own for that host).
    if let Some(binding) = &down.server
        && binding.fit(routing::request_host(view.headers).unwrap_or("")) == Fit::Misdirected
    {
        let gw = binding.server().and_then(|s| state.gateway(&s.gateway)).map(|g| g.workload.clone());
        drop(state);
        ctx.metrics.gateway_misdirected.inc();
        let labels = TcpLabels::new(gw.as_deref(), None, None, false);
        let record = Record::new(&ctx, &down, &req, labels, grpc, None, started_at, start);
        return record.finish_local(LocalReply::MISDIRECTED);
    }
    // An HTTP gateway server with `httpsRedirect` sends every request to HTTPS.
    if let Some(gws) = &down.gateways
        && let Some(location) = routing::https_redirect(&state, gws, down.orig.port(), &view)
    {
        let gw = gws.first().and_then(|g| state.gateway(g)).map(|g| g.workload.clone());
        drop(state);
        let labels = TcpLabels::new(gw.as_deref(), None, None, false);
        let record = Record::new(&ctx, &down, &req, labels, grpc, None, started_at, start);
        return record.finish_redirect(301, &location);
    }
    let Some((decision, source)) = decide(&ctx, &state, &down, &view, down.pick(&ctx)) else {
        // A gateway with no rule for this host and path.
        let gw = down.gateways.as_ref().and_then(|g| state.gateway(g.first()?)).map(|g| g.workload.clone());
        drop(state);
        let labels = TcpLabels::new(gw.as_deref(), None, None, false);
        let record = Record::new(&ctx, &down, &req, labels, grpc, None, started_at, start);
        return record.finish_local(LocalReply::NO_ROUTE);
    };
    drop(state);
    let rule = decision.rule.clone();
    let cluster = decision.cluster.clone();
    let cluster_state = cluster.as_ref().and_then(|c| ctx.clusters.get(c));
    if let Some((code, location)) = filters::redirect(rule.as_ref(), &req, &down) {
        let labels = match target(decision.route, source.as_ref(), None) {
            Ok(t) => t.labels,
            Err(refused) => refused.labels,
        };
        let record = Record::new(&ctx, &down, &req, labels, grpc, None, started_at, start);
        return record.finish_redirect(code, &location);
    }
    let declared = match &decision.route {
        Route::Service { protocol, .. } => Some(*protocol),
        _ => None,
    };
    let first = match target(decision.route, source.as_ref(), cluster.as_ref()) {
        Ok(t) => t,
        Err(refused) => {
            let Refused { labels, error } = *refused;
            let record = Record::new(&ctx, &down, &req, labels, grpc, None, started_at, start);
            return record.finish_local(error.reply());
        }
    };
    let mut record = Record::new(&ctx, &down, &req, first.labels.clone(), grpc, Some(first.addr), started_at, start);

    if let Some(abort) = filters::fault(&ctx, rule.as_ref(), &mut record).await {
        return record.finish_local(abort);
    }
    filters::request(rule.as_ref(), &mut req, decision.matched_prefix.as_deref());

    let extended_connect = is_extended_connect(&req);
    let upgrade = wants_upgrade(&req) || extended_connect;
    // Istio's choice of upstream HTTP version (see `upstream_http2`).
    let no_pool = traffic::ConnectionPool::default();
    let pool_settings = cluster.as_ref().map_or(&no_pool, |c| &c.policy.pool);
    let client_h2 = req.version() == hyper::Version::HTTP_2;
    let h2 = protocol::upstream_http2(declared, client_h2, grpc, down.gateways.is_some(), pool_settings, upgrade);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    for_upstream(&mut parts, upgrade, h2, down.orig);
    // WebSocket (or another protocol) over HTTP/2 to an HTTP/1.1 upstream: an Upgrade there.
    let translated = extended_connect && !h2;
    if translated {
        connect_to_upgrade(&mut parts);
    }

    // With retries, a small body is kept so that it can be sent again.
    let retries = rule.as_ref().and_then(|r| r.retries.clone()).filter(|_| !upgrade);
    let mirror = mirror::sampled(&ctx, rule.as_ref()).filter(|_| !upgrade);
    let keep_body = retries.is_some() || mirror.is_some();
    let (mut streaming, buffered) = match keep_body {
        true if retry::fits_retry_buffer(&parts.headers, &body) => {
            let read = http_body_util::Limited::new(body, retry::RETRY_BUFFER).collect();
            match tokio::time::timeout(ctx.limits.body_timeout, read).await {
                Ok(Ok(collected)) => (None, Some(collected.to_bytes())),
                Ok(Err(e)) => {
                    tracing::info!(peer = %down.peer, error = %e, "reading the request body failed");
                    return record.finish_local(LocalReply::BAD_BODY);
                }
                Err(_) => {
                    tracing::info!(peer = %down.peer, "the request body did not arrive in time");
                    return record.finish_local(LocalReply::BODY_TIMEOUT);
                }
            }
        }
        _ => (Some(body), None),
    };
    if let Some(b) = &buffered {
        record.add_request_bytes(b.len());
    }
    if let Some(dest) = mirror {
        match &buffered {
            Some(b) => {
                let from = source.clone();
                tokio::spawn(mirror::mirror_request(
                    ctx.clone(),
                    down.clone(),
                    from,
                    parts.clone(),
                    b.clone(),
                    dest,
                    h2,
                ));
            }
            // As Envoy, a body too large to copy is not mirrored.
            None => {
                ctx.metrics.mirrored.get_or_create(&crate::telemetry::ResultLabels { result: "skipped" }).inc();
            }
        }
    }
    // Circuit breakers: the request holds its place until its response is complete.
    if let Some(cs) = &cluster_state {
        match cs.admit(!h2).await {
            Some(admission) => record.hold(admission),
            None => return record.finish_overflow(),
        }
    }
    let limits = limits(&ctx, cluster.as_ref().map(|c| &c.policy.pool));
    let per_try = retries.as_ref().and_then(|r| r.per_try_timeout);
    let overall = rule.as_ref().and_then(|r| r.timeout);
    let deadline = overall.map(|t| tokio::time::Instant::now() + t);

    let mut target = first;
    let mut try_no = 0;
    let resp = loop {
        try_no += 1;
        let body = match (&buffered, streaming.take()) {
            (Some(b), _) => Full::new(b.clone()).map_err(|e| match e {}).boxed_unsync(),
            (None, Some(b)) => Metered::request(b, record.shared()).boxed_unsync(),
            (None, None) => Full::new(Bytes::new()).map_err(|e| match e {}).boxed_unsync(),
        };
        let up_req = Request::from_parts(parts.clone(), body);
        if let Some(cs) = &cluster_state {
            record.hold_in_flight(cs.in_flight(target.addr));
        }
        let source = target.source.as_ref().map(|w| w.principal.clone());
        let key = PoolKey { client: down.peer_ip, source, upstream: target.addr, h2, tls: target.tls.is_some() };
        let one = exchange(&ctx, &down, &target, key, up_req, per_try, &limits, &mut record);
        let result = match deadline {
            Some(d) => match tokio::time::timeout_at(d, one).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::info!(peer = %down.peer, upstream = %target.addr, "request timed out");
                    return record.finish_local(LocalReply::TIMEOUT);
                }
            },
            None => one.await,
        };
        let outcome = match &result {
            Ok(resp) => cluster::Outcome::Status(resp.status().as_u16()),
            Err(Failure::Connect(_)) => cluster::Outcome::ConnectFailure,
            Err(_) => cluster::Outcome::NoResponse,
        };
        if let (Some(cs), Some(c)) = (&cluster_state, &cluster) {
            cs.report(target.addr, outcome, c.endpoints);
        }
        match (retry::after_try(try_no, retries.as_ref(), &outcome), result) {
            (retry::Next::Retry, _) => tracing::debug!(upstream = %target.addr, ?outcome, try_no, "retrying"),
            (retry::Next::Answer { exhausted }, result) => {
                if exhausted {
                    record.set_flag(Flags::URX);
                }
                match result {
                    Ok(resp) => break resp,
                    Err(f) => return fail_request(&ctx, &down, target.addr, record, f),
                }
            }
        }
        tokio::time::sleep(retry::RETRY_BACKOFF).await;
        // Another endpoint may be chosen for the next try.
        let state = ctx.state();
        let view = routing::RequestView {
            method: parts.method.as_str(),
            path: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
            headers: &parts.headers,
            client: down.peer_ip,
            namespace: down.source.as_deref().map(|w| &*w.namespace),
        };
        let Some((again, source)) = decide(&ctx, &state, &down, &view, ctx.next_pick()) else {
            return record.finish_local(LocalReply::NO_ROUTE);
        };
        match self::target(again.route, source.as_ref(), again.cluster.as_ref()) {
            Ok(t) => {
                record.set_target(t.labels.clone(), t.addr);
                target = t;
            }
            Err(refused) => return record.finish_local(refused.error.reply()),
        }
    };
    let mut resp = resp;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS || (extended_connect && resp.status() == StatusCode::OK) {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        if let Some(client_upgrade) = client_upgrade {
            tokio::spawn(tunnel_upgrade(client_upgrade, upstream_upgrade, target.addr, ctx.limits.idle_timeout));
        }
        let (mut parts, _) = resp.into_parts();
        if translated {
            // The HTTP/2 client asked with CONNECT: its answer is 200, without
            // HTTP/1.1's connection-specific headers.
            parts.status = StatusCode::OK;
            strip_hop_by_hop(&mut parts.headers, false);
            parts.headers.remove("sec-websocket-accept");
        }
        return record.finish_switch(parts);
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    filters::response(rule.as_ref(), &mut parts.headers);
    record.set_response(parts.status, &parts.headers);
    Response::from_parts(parts, Metered::response(body, record).boxed_unsync())
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
