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
    state::{Workload, traffic},
    telemetry::{Flags, TcpLabels},
};

pub mod access_log;
pub mod cluster;
mod headers;
mod metered;
pub mod pool;

pub mod sni;
mod upstream;

pub use headers::strip_hop_by_hop;
use headers::*;
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
    /// The round-robin turn the connection already drew, for its first request
    /// (`usize::MAX` once used), so that L7 does not skip endpoints.
    pub first_pick: std::sync::atomic::AtomicUsize,
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
    let io = TokioIo::new(client);
    let result = match handling {
        Handling::Http2 => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                // RFC 8441: WebSocket (and the like) over HTTP/2 streams.
                .enable_connect_protocol()
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
    let mut r = Response::new(Full::new(Bytes::from(format!("{text}\n"))).map_err(|e| match e {}).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// The largest request body kept in memory so that the request can be retried;
/// larger (or unsized and long) bodies stream and are tried once.
const RETRY_BUFFER: usize = 64 * 1024;
/// Pause between tries (Envoy's base interval).
const RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// Where one try of a request goes.
struct Target {
    /// Whose identity the request leaves with (a pod, or a gateway).
    source: Option<Arc<Workload>>,
    dest: Option<Arc<Workload>>,
    addr: SocketAddrV4,
    labels: TcpLabels,
    /// TLS to originate, with the server name to ask for.
    tls: Option<(Arc<traffic::TlsOrigination>, String)>,
}

/// Resolves a routing decision to a target, or the local answer for a refusal.
fn target(
    route: Route,
    src: Option<&Arc<Workload>>,
    cluster: Option<&traffic::Cluster>,
) -> Result<Target, Box<Refused>> {
    let source = src.map(|s| &**s);
    let target = |dest, addr, labels, tls| Target { source: src.cloned(), dest, addr, labels, tls };
    match route {
        Route::Service { service, endpoint, addr, .. } => {
            let labels = TcpLabels::new(source, Some(&endpoint), Some(&service), false);
            let tls = cluster.and_then(|c| c.policy.tls.clone()).map(|t| {
                let sni = t.sni.clone().unwrap_or_else(|| service.hostname.to_string());
                (t, sni)
            });
            Ok(target(Some(endpoint), addr, labels, tls))
        }
        Route::Workload { workload, addr } => {
            let labels = TcpLabels::new(source, Some(&workload), None, false);
            Ok(target(Some(workload), addr, labels, None))
        }
        Route::Passthrough { addr } => Ok(target(None, addr, TcpLabels::new(source, None, None, true), None)),
        Route::Refused { service, reason } => {
            let labels = TcpLabels::new(source, None, Some(&service), false);
            let error = ProxyError::Refused { service: service.key.clone(), reason };
            Err(Box::new(Refused { labels, error }))
        }
        Route::BlackHole { addr } => {
            Err(Box::new(Refused { labels: TcpLabels::black_hole(source), error: ProxyError::BlackHole(addr) }))
        }
    }
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
    // HTTP/2 names the host in `:authority`; routing reads `Host`.
    if !req.headers().contains_key(header::HOST)
        && let Some(v) = req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    let grpc = is_grpc(req.headers());
    let state = ctx.state();
    let view = routing::RequestView {
        method: req.method().as_str(),
        path: req.uri().path_and_query().map_or("/", |p| p.as_str()),
        headers: req.headers(),
        client: down.peer_ip,
    };
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
    if let Some(redirect) = rule.as_ref().and_then(|r| r.redirect.as_ref()) {
        let labels = match target(decision.route, source.as_ref(), None) {
            Ok(t) => t.labels,
            Err(refused) => refused.labels,
        };
        let authority = redirect.authority.clone().unwrap_or_else(|| request_authority(&req, &down));
        let path = redirect.uri.clone().unwrap_or_else(|| view_path(&req));
        let record = Record::new(&ctx, &down, &req, labels, grpc, None, started_at, start);
        return record.finish_redirect(redirect.code, &format!("http://{authority}{path}"));
    }
    // At a gateway the client's HTTP version is the edge's business: upstream
    // speaks what the destination port declares (HTTP/1.1 unless http2/grpc),
    // as Envoy does. Inside the mesh, the client's version is kept.
    let declared_h2 =
        matches!(decision.route, Route::Service { protocol: protocol::Declared::Http2 | protocol::Declared::Grpc, .. });
    let first = match target(decision.route, source.as_ref(), cluster.as_ref()) {
        Ok(t) => t,
        Err(refused) => {
            let Refused { labels, error } = *refused;
            let record = Record::new(&ctx, &down, &req, labels, grpc, None, started_at, start);
            return record.finish_local(error.reply());
        }
    };
    let mut record = Record::new(&ctx, &down, &req, first.labels.clone(), grpc, Some(first.addr), started_at, start);

    // Fault injection, before anything goes upstream.
    if let Some(fault) = rule.as_ref().and_then(|r| r.fault.as_ref()) {
        let roll = |pct: f64| (ctx.next_random() % 1_000_000) as f64 / 10_000.0 < pct;
        if let Some((delay, pct)) = fault.delay
            && roll(pct)
        {
            tokio::time::sleep(delay).await;
            record.set_flag(Flags::DI);
        }
        if let Some((status, pct)) = fault.abort
            && roll(pct)
        {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return record.finish_local(LocalReply::fault_abort(status));
        }
    }
    if let Some(r) = &rule {
        r.headers.request.apply(req.headers_mut());
        if let Some(w) = &r.rewrite {
            rewrite(&mut req, w, decision.matched_prefix.as_deref());
        }
    }

    let extended_connect = is_extended_connect(&req);
    let upgrade = wants_upgrade(&req) || extended_connect;
    let h2 = match down.gateways {
        Some(_) => declared_h2 || grpc,
        None => req.version() == hyper::Version::HTTP_2,
    };
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.version = if h2 { hyper::Version::HTTP_2 } else { hyper::Version::HTTP_11 };
    if h2 {
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

    // With retries, a small body is kept so that it can be sent again.
    let retries = rule.as_ref().and_then(|r| r.retries.clone()).filter(|_| !upgrade);
    let mirror = rule
        .as_ref()
        .and_then(|r| r.mirror.clone())
        .filter(|(_, pct)| !upgrade && (ctx.next_random() % 1_000_000) as f64 / 10_000.0 < *pct);
    let keep_body = retries.is_some() || mirror.is_some();
    let (mut streaming, buffered) = match keep_body {
        true if fits_retry_buffer(&parts.headers, &body) => {
            match http_body_util::Limited::new(body, RETRY_BUFFER).collect().await {
                Ok(collected) => (None, Some(collected.to_bytes())),
                Err(e) => {
                    tracing::info!(peer = %down.peer, error = %e, "reading the request body failed");
                    return record.finish_local(LocalReply::BAD_BODY);
                }
            }
        }
        _ => (Some(body), None),
    };
    if let Some(b) = &buffered {
        record.add_request_bytes(b.len());
    }
    if let Some((dest, _)) = mirror {
        match &buffered {
            Some(b) => {
                let from = source.clone();
                tokio::spawn(mirror_request(ctx.clone(), down.clone(), from, parts.clone(), b.clone(), dest, h2));
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
    let tries = 1 + retries.as_ref().map_or(0, |r| r.attempts);
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
        let key = PoolKey { client: down.peer_ip, upstream: target.addr, h2, tls: target.tls.is_some() };
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
        if let (Some(cs), Some(c)) = (&cluster_state, &cluster) {
            let outcome = match &result {
                Ok(resp) => cluster::Outcome::Status(resp.status().as_u16()),
                Err(Failure::Connect(_)) => cluster::Outcome::ConnectFailure,
                Err(_) => cluster::Outcome::NoResponse,
            };
            cs.report(target.addr, outcome, c.endpoints);
        }
        let last = try_no >= tries;
        let on = retries.as_ref().map(|r| &r.on);
        match result {
            Ok(resp) if !last && on.is_some_and(|o| o.status(resp.status().as_u16())) => {
                tracing::debug!(upstream = %target.addr, status = %resp.status(), try_no, "retrying");
            }
            Ok(resp) => {
                if try_no > 1 && on.is_some_and(|o| o.status(resp.status().as_u16())) {
                    record.set_flag(Flags::URX);
                }
                break resp;
            }
            Err(f) if !last && on.is_some_and(|o| o.failure(matches!(f, Failure::Connect(_)))) => {
                tracing::debug!(upstream = %target.addr, try_no, "retrying after a failure");
            }
            Err(f) => {
                if try_no > 1 {
                    record.set_flag(Flags::URX);
                }
                return fail_request(&ctx, &down, target.addr, record, f);
            }
        }
        tokio::time::sleep(RETRY_BACKOFF).await;
        // Another endpoint may be chosen for the next try.
        let state = ctx.state();
        let view = routing::RequestView {
            method: parts.method.as_str(),
            path: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
            headers: &parts.headers,
            client: down.peer_ip,
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
            tokio::spawn(tunnel_upgrade(client_upgrade, upstream_upgrade, target.addr));
        }
        let (parts, _) = resp.into_parts();
        return record.finish_switch(parts);
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    if let Some(r) = &rule {
        r.headers.response.apply(&mut parts.headers);
    }
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
            let (decision, gw) = routing::route_gateway(state, gws, down.orig, view, pick, random, &ctx.clusters)?;
            Some((decision, state.gateway(&gw).map(|g| g.workload.clone())))
        }
    }
}

/// Sends a copy of a request to the `mirror` destination; the answer is read
/// and dropped. The authority gets Envoy's `-shadow` suffix.
async fn mirror_request(
    ctx: Arc<Inputs>,
    down: Arc<Downstream>,
    source: Option<Arc<Workload>>,
    mut parts: hyper::http::request::Parts,
    body: Bytes,
    dest: traffic::WeightedDestination,
    h2: bool,
) {
    let state = ctx.state();
    let from = state.by_vip.get(down.orig.ip()).map(|s| format!("{}/{}", s.namespace, s.name)).unwrap_or_default();
    let route = match routing::resolve(&state, &from, &dest, down.orig.port()) {
        Ok((target, port, labels, _, _)) => crate::routing::l4::route_service(
            target,
            port,
            labels,
            crate::routing::l4::Pick::Turn(ctx.next_pick()),
            &|_| false,
        ),
        Err(reason) => {
            tracing::debug!(%reason, "mirror destination unavailable");
            Route::Passthrough { addr: down.orig }
        }
    };
    let Route::Service { endpoint, addr, .. } = route else {
        ctx.metrics.mirrored.get_or_create(&crate::telemetry::ResultLabels { result: "failed" }).inc();
        return;
    };
    let shadow = |a: &str| format!("{a}-shadow");
    if let Some(host) = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(shadow)
        && let Ok(v) = HeaderValue::from_str(&host)
    {
        parts.headers.insert(header::HOST, v);
    }
    if let Some(a) = parts.uri.authority().map(|a| shadow(a.as_str())) {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        if let Ok(uri) = format!("http://{a}{path}").parse() {
            parts.uri = uri;
        }
    }
    let key = PoolKey { client: down.peer_ip, upstream: addr, h2, tls: false };
    let limits = limits(&ctx, None);
    let to = Target { source, dest: Some(endpoint), addr, labels: TcpLabels::black_hole(None), tls: None };
    drop(state);
    let req = Request::from_parts(parts, Full::new(body).map_err(|e| match e {}).boxed_unsync());
    let result = match send(&ctx, &down, &to, key, req, &limits, None).await {
        // Read to its end: the connection goes back to the pool.
        Ok(resp) => match resp.into_body().collect().await {
            Ok(_) => "sent",
            Err(_) => "failed",
        },
        Err(_) => "failed",
    };
    ctx.metrics.mirrored.get_or_create(&crate::telemetry::ResultLabels { result }).inc();
}

/// Istio's `request_protocol`.
fn request_protocol(grpc: bool) -> &'static str {
    if grpc { "grpc" } else { "http" }
}
