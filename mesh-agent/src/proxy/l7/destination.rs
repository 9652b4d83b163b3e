//! L7 at the destination's agent: requests to a local workload whose
//! policies need them (a RequestAuthentication, or an AuthorizationPolicy
//! with HTTP fields) are parsed here, where every path to the workload has
//! converged — HBONE streams from other nodes, plaintext through the inbound
//! listener, connections from this node's pods — so a source node that
//! skips or lacks the policy cannot skip it. Each request is authenticated
//! (JWT), authorized, measured with `reporter="destination"`, and sent on
//! the connection's own upstream connection to the pod.
//!
//! A connection that turns out not to be HTTP is judged as Istio judges
//! one: the policy's HTTP rules cannot match it (see
//! [`crate::routing::policy::evaluate`]).
use std::{
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::{Instant, SystemTime},
};

use http_body_util::BodyExt as _;
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    client::conn::{http1, http2},
    header::{self, HeaderName, HeaderValue},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::{Body, Downstream, headers::*, metered::Metered, metered::Record, path, upstream::tunnel_upgrade};
use crate::{
    identity::jwt,
    proxy::{self, Inputs, LocalReply, ProxyError},
    routing::policy::{self, Attributes, Peer, Verdict},
    routing::protocol::{Declared, Handling},
    state::{
        Workload,
        security::{JwtKey, JwtRule},
    },
    telemetry::{Flags, TcpLabels},
};

pub(crate) mod ext_authz;
mod sniffed;
#[cfg(test)]
mod tests;

/// A connection to a local meshed workload, authenticated (or not) as far
/// as its transport goes.
pub(crate) struct Inbound {
    pub dest: Arc<Workload>,
    /// The pod's address and port.
    pub target: SocketAddrV4,
    /// Who connected (for logs): the peer agent, or the client.
    pub peer: SocketAddr,
    /// The client's identity (mTLS, or capture on this node); `None` for plaintext.
    pub principal: Option<Arc<str>>,
    /// The client's address as policy sees it (`source.ip`).
    pub client_ip: Ipv4Addr,
    /// The client workload, for labels.
    pub source: Option<Arc<Workload>>,
    /// The address to connect to the pod from (the client's, where replies
    /// come back to this agent).
    pub transparent: Option<Ipv4Addr>,
    pub mtls: bool,
}

/// The in-process pipe's buffer each way, for a pod of this node whose
/// policies need its requests.
pub(crate) const PIPE_BUFFER: usize = 64 * 1024;

/// Whether connections to `dest`'s `port` are served here: its policies
/// need requests and the port is not declared as opaque TCP.
pub(crate) fn wanted(state: &crate::state::State, dest: &Workload, port: u16) -> bool {
    policy::needs_request(state, dest)
        && state.service_port_of(dest, port).is_none_or(|(_, p)| crate::routing::protocol::declared(p) != Declared::Tcp)
}

/// Serves one connection to the pod until it closes.
pub(crate) async fn serve<I>(ctx: Arc<Inputs>, io: I, conn: Inbound)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let state = ctx.state();
    let found = state.service_port_of(&conn.dest, conn.target.port());
    let declared = found.map_or(Declared::Unknown, |(_, p)| crate::routing::protocol::declared(p));
    let mut labels = TcpLabels::new(conn.source.as_deref(), Some(&conn.dest), found.map(|(s, _)| &**s), false);
    drop(state);
    labels.reporter = "destination";
    labels.source_principal = conn.principal.as_deref().unwrap_or("unknown").into();
    labels.connection_security_policy = if conn.mtls { "mutual_tls" } else { "none" };
    let (io, sniffed) = sniffed::sniff(io, ctx.protocol_detection_timeout).await;
    let handling = match declared {
        Declared::Http2 | Declared::Grpc => Handling::Http2,
        Declared::Http if sniffed == Handling::Http2 => Handling::Http2,
        Declared::Http => Handling::Http1,
        Declared::Tcp | Declared::Unknown => sniffed,
    };
    if handling == Handling::Tcp {
        return opaque(&ctx, io, conn, labels).await;
    }
    let peer = conn.peer;
    let down = Downstream {
        peer,
        peer_ip: conn.client_ip,
        orig: conn.target,
        source: conn.source.clone(),
        gateways: None,
        server: None,
        first_pick: usize::MAX.into(),
        client_cert: None,
    };
    let pod = tokio::sync::Mutex::new(None);
    let shared = Arc::new(Conn { inbound: conn, down, labels, handling, pod, pod_socket: Default::default() });
    let svc_ctx = ctx.clone();
    let service = hyper::service::service_fn(move |req| {
        let (ctx, conn) = (svc_ctx.clone(), shared.clone());
        async move { Ok::<_, Infallible>(handle(ctx, conn, req).await) }
    });
    super::serve_http(&ctx.limits, io, peer, handling, service).await;
}

/// Not HTTP: authorized as a connection (HTTP rules cannot match it), then
/// bytes both ways, registered so that a policy change reaches it.
async fn opaque<I>(ctx: &Inputs, io: I, conn: Inbound, labels: TcpLabels)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = Peer { principal: conn.principal.as_deref(), ip: conn.client_ip };
    let verdict = policy::authorize(&ctx.state(), &conn.dest, &peer, conn.target.port());
    if let Verdict::Deny(policy) = verdict {
        let err = ProxyError::Denied { policy };
        tracing::warn!(peer = %conn.peer, target = %conn.target, error = %err, "connection refused");
        return proxy::record_failure(ctx, Some(labels), &err);
    }
    let (upstream, guard) = match proxy::admit::connect_admitted(ctx, &conn, ctx.connect_timeout).await {
        Ok(r) => r,
        Err(err) => return proxy::record_failure(ctx, Some(labels), &err),
    };
    let meters = proxy::ConnMeters::open(&ctx.metrics, &labels);
    proxy::pump(ctx, io, upstream, meters, conn.target, Some(guard), |_, u| proxy::reset(u)).await;
}

/// One parsed connection: what every request on it shares.
struct Conn {
    inbound: Inbound,
    down: Downstream,
    labels: TcpLabels,
    handling: Handling,
    /// The connection to the pod, opened by the first request.
    pod: tokio::sync::Mutex<Option<PodSender>>,
    /// A duplicate of the pod connection's socket: a tunnel upgraded on it
    /// is registered with it, so that a policy change can close it.
    pod_socket: std::sync::Mutex<Option<socket2::Socket>>,
}

enum PodSender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

async fn handle(ctx: Arc<Inputs>, conn: Arc<Conn>, mut req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let started_at = SystemTime::now();
    let grpc = is_grpc(req.headers());
    let state = ctx.state();
    let bad_path = path::apply(&mut req, state.path_normalization).is_err();
    let bad_upgrade = upgrade_asked(&req) == Upgrade::Refused;
    let conflict = authority_conflict(&req);
    let record =
        Record::new(&ctx, &conn.down, &req, conn.labels.clone(), grpc, Some(conn.inbound.target), started_at, start);
    if bad_path {
        return record.finish_local(LocalReply::BAD_PATH);
    }
    if bad_upgrade {
        return record.finish_local(LocalReply::UPGRADE_REFUSED);
    }
    if conflict {
        return record.finish_local(LocalReply::AUTHORITY_CONFLICT);
    }
    let dest = &conn.inbound.dest;
    let rules = policy::jwt_rules(&state, dest);
    let mut keyed = Vec::with_capacity(rules.len());
    for rule in rules {
        let keys = match &rule.jwks_uri {
            Some(uri) => ctx.jwks.keys(uri, rule.timeout).await,
            None => rule.keys.clone(),
        };
        keyed.push((rule, keys));
    }
    let mut checked = jwt::authenticate(&keyed, req.headers(), req.uri().query(), &ctx.jwt_verified);
    // A key the fetched set lacks: the issuer may have rotated; fetch again once.
    if let Err(jwt::Refused { error: jwt::JwtError::NoKey, rule: Some(rule) }) = &checked
        && let Some(uri) = &rule.jwks_uri
    {
        let fresh = ctx.jwks.refetch(uri, rule.timeout).await;
        for (_, keys) in keyed.iter_mut().filter(|(r, _)| r.jwks_uri.as_ref() == Some(uri)) {
            *keys = fresh.clone();
        }
        checked = jwt::authenticate(&keyed, req.headers(), req.uri().query(), &ctx.jwt_verified);
    }
    let authn = match checked {
        Ok(a) => a,
        Err(jwt::Refused { error: e, .. }) => {
            ctx.metrics.jwt_checks.get_or_create(&crate::telemetry::ResultLabels { result: "invalid" }).inc();
            tracing::info!(peer = %conn.inbound.peer, target = %conn.inbound.target, error = %e, "request refused: JWT");
            let mut r = record.finish_local(LocalReply::jwt_refused(&e));
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer error=\"invalid_token\""));
            return r;
        }
    };
    if !keyed.is_empty() {
        let result = if authn.is_some() { "valid" } else { "none" };
        ctx.metrics.jwt_checks.get_or_create(&crate::telemetry::ResultLabels { result }).inc();
    }
    // Envoy's filter order, so that every policy sees the request exactly as
    // the app will: JWT and its outputs, then CUSTOM and its header changes,
    // then DENY and ALLOW. Headers the mesh sets are the mesh's alone: what
    // a client sent under their names is dropped first.
    let owned = mesh_owned_headers(&keyed);
    let outputs = authn.as_ref().map(token_outputs);
    let verified = authn.map(|a| a.verified);
    drop(keyed);
    let from_gateway =
        conn.inbound.principal.as_deref().is_some_and(|p| state.gateways.iter().any(|g| *g.workload.principal == *p));
    drop(state);
    for name in &owned {
        req.headers_mut().remove(name);
    }
    // A gateway's x-forwarded-client-cert names the client it verified; from
    // anyone else it is a claim nobody checked.
    if !from_gateway {
        req.headers_mut().remove(&super::X_FORWARDED_CLIENT_CERT);
    }
    for (name, value) in outputs.into_iter().flatten() {
        match value {
            Some(v) => req.headers_mut().insert(name, v),
            None => req.headers_mut().remove(name),
        };
    }
    let custom = {
        let state = ctx.state();
        let attributes = attributes(&conn, req.method(), req.uri(), req.headers(), verified.as_deref());
        policy::custom(&state, &conn.inbound.dest, &attributes).and_then(|p| p.provider.clone())
    };
    let (parts, body, to_client) = match custom {
        None => {
            let (parts, body) = req.into_parts();
            (parts, ext_authz::Replay { read: None, rest: Some(body) }, Vec::new())
        }
        Some(provider) => {
            let (mut parts, body) = req.into_parts();
            // The authorizer's headers are its own, too.
            for name in ext_authz::authorizer_headers(&provider, &parts.headers) {
                parts.headers.remove(name);
            }
            let (read, body) = match provider.body {
                None => (None, ext_authz::Replay { read: None, rest: Some(body) }),
                Some(b) => match ext_authz::read_for_check(body, b.max_bytes as usize, b.allow_partial).await {
                    Ok((read, replay)) => (Some(read), replay),
                    Err(()) => return record.finish_local(LocalReply::TOO_LARGE_FOR_CHECK),
                },
            };
            let ask = ext_authz::Ask { parts: &parts, body: read.as_ref(), conn: &conn.inbound };
            match ext_authz::check(&ctx, &provider, ask).await {
                ext_authz::Checked::Deny(answer) => {
                    tracing::info!(peer = %conn.inbound.peer, target = %conn.inbound.target, provider = %provider.name, status = %answer.status(), "request refused by the external authorizer");
                    return record.finish_answer(answer);
                }
                ext_authz::Checked::Allow { upstream, remove, downstream } => {
                    for name in remove {
                        parts.headers.remove(name);
                    }
                    for (name, value) in upstream {
                        parts.headers.insert(name, value);
                    }
                    (parts, body, downstream)
                }
            }
        }
    };
    // DENY and ALLOW on the request as it now is.
    let decision = {
        let state = ctx.state();
        let attributes = attributes(&conn, &parts.method, &parts.uri, &parts.headers, verified.as_deref());
        policy::evaluate(&state, &conn.inbound.dest, &attributes)
    };
    if let Some(audited) = &decision.audit {
        ctx.metrics.authorization_audits.inc();
        tracing::info!(policy = %audited, method = %parts.method, path = %parts.uri.path(), source = ?conn.inbound.principal, "AUDIT");
    }
    if let Verdict::Deny(policy) = decision.verdict {
        return refused(&conn, &policy, record);
    }
    let mut resp = forward(&ctx, &conn, Request::from_parts(parts, body), record, verified.as_ref()).await;
    for (name, value) in to_client {
        resp.headers_mut().append(name, value);
    }
    resp
}

/// What policy sees of a request: its method, path, host and headers, the
/// verified token, and the connection's peer.
fn attributes<'a>(
    conn: &'a Conn,
    method: &'a hyper::Method,
    uri: &'a hyper::Uri,
    headers: &'a hyper::HeaderMap,
    verified: Option<&'a jwt::Verified>,
) -> Attributes<'a> {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let host = host.or(uri.authority().map(|a| a.as_str())).unwrap_or_default();
    let auth = verified.map(|v| policy::Auth {
        principal: &v.principal,
        audiences: &v.audiences,
        presenter: v.presenter.as_deref(),
        claims: &v.claims,
    });
    let request = policy::Request {
        method: method.as_str(),
        path: uri.path(),
        host,
        headers,
        auth,
        remote_ip: conn.inbound.client_ip,
    };
    let peer = Peer { principal: conn.inbound.principal.as_deref(), ip: conn.inbound.client_ip };
    Attributes { peer, port: conn.inbound.target.port(), request: Some(request) }
}

/// The headers the workload's JWT rules write (`outputPayloadToHeader`,
/// `outputClaimToHeaders`): set by the mesh from a verified token, never
/// taken from the client.
fn mesh_owned_headers(keyed: &[(&JwtRule, Arc<[JwtKey]>)]) -> Vec<HeaderName> {
    let names = keyed.iter().flat_map(|(r, _)| {
        let payload = r.output_payload_to_header.iter();
        payload.chain(r.output_claim_to_headers.iter().map(|(h, _)| h))
    });
    names.filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok()).collect()
}

fn refused(conn: &Conn, policy: &str, record: Record) -> Response<Body> {
    tracing::info!(peer = %conn.inbound.peer, target = %conn.inbound.target, %policy, "request refused by AuthorizationPolicy");
    record.finish_local(LocalReply::RBAC_DENIED)
}

/// What a valid token changes in the request, as its rule says: the
/// token's header removed (unless `forwardOriginalToken`), the payload and
/// chosen claims copied into headers. (`None`: remove.)
fn token_outputs(a: &jwt::Authenticated<'_>) -> Vec<(HeaderName, Option<HeaderValue>)> {
    let mut out = Vec::new();
    for h in &a.consumed {
        if let Ok(name) = HeaderName::from_bytes(h.as_bytes()) {
            out.push((name, None));
        }
    }
    let rule = a.rule;
    if let Some(h) = &rule.output_payload_to_header
        && let (Ok(name), Ok(v)) = (HeaderName::from_bytes(h.as_bytes()), HeaderValue::from_str(&a.verified.payload))
    {
        out.push((name, Some(v)));
    }
    for (h, claim) in &rule.output_claim_to_headers {
        let path = [claim.clone()];
        let values = policy::claim_values(&a.verified.claims, &path);
        let Ok(name) = HeaderName::from_bytes(h.as_bytes()) else { continue };
        // A claim that is absent, or not a string, number or boolean: no header.
        let joined = values.iter().map(|v| v.as_ref()).collect::<Vec<_>>().join(",");
        match HeaderValue::from_str(&joined) {
            Ok(v) if !values.is_empty() => out.push((name, Some(v))),
            _ => out.push((name, None)),
        }
    }
    out
}

async fn forward<B>(
    ctx: &Arc<Inputs>,
    conn: &Conn,
    mut req: Request<B>,
    mut record: Record,
    verified: Option<&Arc<jwt::Verified>>,
) -> Response<Body>
where
    B: hyper::body::Body<Data = hyper::body::Bytes, Error = hyper::Error> + Send + Unpin + 'static,
{
    if is_extended_connect(&req) {
        return record.finish_local(LocalReply {
            status: StatusCode::NOT_IMPLEMENTED,
            text: "extended CONNECT is not served by a destination with request policies",
            flags: Flags::NONE,
        });
    }
    let upgrade = wants_upgrade(&req);
    // The request an upgraded tunnel is opened by, to judge again on reloads.
    let snapshot = upgrade.then(|| {
        let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned);
        let host = host.or_else(|| req.uri().authority().map(|a| a.to_string())).unwrap_or_default();
        Arc::new(proxy::conns::RequestSnapshot {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            host,
            headers: req.headers().clone(),
            verified: verified.cloned(),
        })
    });
    let h2 = conn.handling == Handling::Http2;
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    for_upstream(&mut parts, upgrade, h2, conn.inbound.target);
    let up_req = Request::from_parts(parts, Metered::request(body, record.shared()).boxed_unsync());
    let sent = match conn.sender(ctx, h2).await {
        Ok(PodSender::H1(mut tx)) => {
            let sent = tx.send_request(up_req).await;
            if sent.is_ok() && !upgrade {
                conn.give_back(tx).await;
            }
            sent
        }
        Ok(PodSender::H2(mut tx)) => tx.send_request(up_req).await,
        Err(e) => {
            tracing::info!(target = %conn.inbound.target, error = %e, "connect to the pod failed");
            return record.finish_local(e.reply());
        }
    };
    let mut resp = match sent {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(target = %conn.inbound.target, error = %e, "request failed at the pod");
            return record.finish_local(LocalReply::RESET);
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        if let Some(client_upgrade) = client_upgrade {
            let (target, idle) = (conn.inbound.target, ctx.limits.idle_timeout);
            // Registered, so that a policy change closes the tunnel; one
            // that cannot be registered is not opened.
            let dup = conn.pod_socket.lock().ok().and_then(|s| s.as_ref()?.try_clone().ok());
            let Some(dup) = dup else {
                return record.finish_local(LocalReply::RESET);
            };
            let authorized = proxy::admit::authorized(&conn.inbound, snapshot);
            let guard = ctx.conns.register_socket(authorized, dup);
            tokio::spawn(async move {
                tunnel_upgrade(client_upgrade, upstream_upgrade, target, idle).await;
                drop(guard);
            });
        }
        let (parts, _) = resp.into_parts();
        return record.finish_switch(parts);
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    record.set_response(parts.status, &parts.headers);
    Response::from_parts(parts, Metered::response_direct(body, record).boxed_unsync())
}

impl Conn {
    /// The connection to the pod: the open one when it can take a request,
    /// else a new one. An HTTP/1.1 sender is taken out for the request and
    /// given back ([`Conn::give_back`]) once its response has begun.
    #[expect(clippy::collapsible_match, reason = "a match guard cannot borrow the sender mutably to wait for it")]
    async fn sender(&self, ctx: &Inputs, h2: bool) -> Result<PodSender, ProxyError> {
        let mut pod = self.pod.lock().await;
        match pod.take() {
            Some(PodSender::H1(mut tx)) => {
                if tx.ready().await.is_ok() {
                    return Ok(PodSender::H1(tx));
                }
            }
            Some(PodSender::H2(tx)) if !tx.is_closed() => {
                *pod = Some(PodSender::H2(tx.clone()));
                return Ok(PodSender::H2(tx));
            }
            _ => {}
        }
        let target = self.inbound.target;
        let tcp = proxy::connect(target, self.inbound.transparent, ctx.connect_timeout).await?;
        if let Ok(mut s) = self.pod_socket.lock() {
            *s = socket2::SockRef::from(&tcp).try_clone().ok();
        }
        let io = TokioIo::new(tcp);
        let failed = |error: hyper::Error| ProxyError::Connect {
            addr: target,
            source_ip: None,
            error: std::io::Error::other(error),
        };
        if h2 {
            let builder = http2::Builder::new(TokioExecutor::new()).timer(TokioTimer::new()).handshake(io);
            let (tx, c) = builder.await.map_err(failed)?;
            tokio::spawn(async move {
                if let Err(e) = c.await {
                    tracing::debug!(error = %e, "pod HTTP/2 connection ended");
                }
            });
            *pod = Some(PodSender::H2(tx.clone()));
            Ok(PodSender::H2(tx))
        } else {
            let (tx, c) = http1::handshake(io).await.map_err(failed)?;
            tokio::spawn(async move {
                if let Err(e) = c.with_upgrades().await {
                    tracing::debug!(error = %e, "pod HTTP/1.1 connection ended");
                }
            });
            Ok(PodSender::H1(tx))
        }
    }

    /// Keeps an HTTP/1.1 sender for the connection's next request.
    async fn give_back(&self, tx: http1::SendRequest<Body>) {
        *self.pod.lock().await = Some(PodSender::H1(tx));
    }
}
