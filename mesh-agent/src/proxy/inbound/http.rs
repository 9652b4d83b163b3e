//! HTTP at the destination's agent: requests to a local workload whose
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
    sync::Arc,
    time::{Instant, SystemTime},
};

use http_body_util::BodyExt as _;
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    client::conn::{http1, http2},
    header,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::Inbound;
use crate::{
    identity::jwt,
    proxy::{
        self, Inputs, LocalReply, ProxyError,
        http::{
            Body, Downstream,
            headers::*,
            metered::Metered,
            metered::{About, Record},
            path, serve_http, strip_hop_by_hop, tunnel_upgrade,
        },
        l4::{ConnMeters, Counted, connect, pump, record_failure, reset},
    },
    routing::policy::{self, Peer, Verdict},
    routing::protocol::{Declared, Handling},
    telemetry::{Flags, TcpLabels},
};

mod authn;
pub(crate) mod ext_authz;
mod judge;
pub(crate) use judge::{Stop, gate};
use judge::{authorize, custom};
mod sniffed;
#[cfg(test)]
mod tests;

/// Serves one connection to the pod until it closes.
pub(crate) async fn serve<I>(ctx: Arc<Inputs>, io: I, conn: Inbound)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let state = ctx.state();
    let found = state.service_port_of(&conn.dest, conn.target.port());
    let declared = found.map_or(Declared::Unknown, |(_, p)| crate::routing::protocol::declared(p));
    let labels = conn.labels(&state);
    drop(state);
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
    // The connection's own TCP series, beside its requests'.
    let io = Counted::new(io, ConnMeters::open(&ctx, &labels, Some(*conn.target.ip())));
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
        principal: None,
        memo: Default::default(),
    };
    let pod = tokio::sync::Mutex::new(None);
    let shared = Arc::new(Conn { inbound: conn, down, labels, handling, pod, pod_socket: Default::default() });
    let svc_ctx = ctx.clone();
    let service = hyper::service::service_fn(move |req| {
        let (ctx, conn) = (svc_ctx.clone(), shared.clone());
        async move { Ok::<_, Infallible>(handle(ctx, conn, req).await) }
    });
    serve_http(&ctx.limits, io, peer, handling, service).await;
}

/// Not HTTP: authorized as a connection (HTTP rules cannot match it), then
/// bytes both ways, registered so that a policy change reaches it.
async fn opaque<I>(ctx: &Inputs, io: I, conn: Inbound, labels: TcpLabels)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = Peer { principal: conn.principal.as_deref(), ip: conn.client_ip };
    let verdict = {
        let state = ctx.state();
        policy::authorize(&state, conn.judged_as(&state), &peer, conn.target.port())
    };
    if let Verdict::Deny(policy) = verdict {
        let err = ProxyError::Denied { policy };
        tracing::warn!(peer = %conn.peer, target = %conn.target, error = %err, "connection refused");
        return record_failure(ctx, Some(labels), &err);
    }
    let (upstream, guard) = match super::admit::connect_admitted(ctx, &conn, ctx.connect_timeout).await {
        Ok(r) => r,
        Err(err) => return record_failure(ctx, Some(labels), &err),
    };
    let meters = ConnMeters::open(ctx, &labels, Some(*conn.target.ip())).logged(
        ctx,
        &labels,
        conn.peer,
        conn.target,
        conn.target,
    );
    pump(ctx, io, upstream, meters, conn.target, Some(guard), |_, u| reset(u)).await;
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

/// One request at the destination, in Envoy's filter order, so that every
/// policy sees the request exactly as the app will: the request's form,
/// JWT and its outputs, then CUSTOM and its header changes, then DENY and
/// ALLOW; then the pod.
async fn handle(ctx: Arc<Inputs>, conn: Arc<Conn>, mut req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let started_at = SystemTime::now();
    let grpc = is_grpc(req.headers());
    // One snapshot for the request's form and its authentication.
    let state = ctx.state();
    let formed = well_formed(&state, &mut req);
    let upstream = Some(conn.inbound.target);
    let about =
        About { tcp: conn.labels.clone(), grpc, upstream, subject: Some(&conn.inbound.dest), started_at, start };
    let mut record = Record::new(&ctx, &conn.down, &req, about);
    // Istio's inbound route is named `default`.
    record.set_route(None, None);
    let judged = async {
        formed.map_err(Stop::Local)?;
        let verified = authn::authenticate(&ctx, state, &conn.inbound, &mut req, authn::Xfcc::FromGatewaysOnly).await?;
        let (parts, body, to_client) = custom(&ctx, &conn.inbound, req, verified.as_deref()).await?;
        authorize(&ctx, &conn.inbound, &parts, verified.as_deref())?;
        Ok::<_, Stop>((Request::from_parts(parts, body), verified, to_client))
    };
    let (req, verified, to_client) = match judged.await {
        Ok(judged) => judged,
        Err(stop) => return stop.answer(record),
    };
    let mut resp = forward(&ctx, &conn, req, record, verified.as_ref()).await;
    for (name, value) in to_client {
        resp.headers_mut().append(name, value);
    }
    resp
}

/// The request's form: its path normalized (or refused), no upgrade the
/// agent refuses, no conflicting authorities.
fn well_formed(state: &crate::state::State, req: &mut Request<Incoming>) -> Result<(), LocalReply> {
    if path::apply(req, state.path_normalization).is_err() {
        return Err(LocalReply::BAD_PATH);
    }
    if upgrade_asked(req) == Upgrade::Refused {
        return Err(LocalReply::UPGRADE_REFUSED);
    }
    if authority_conflict(req) {
        return Err(LocalReply::AUTHORITY_CONFLICT);
    }
    Ok(())
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
    let snapshot = upgrade.then(|| snapshot(&req, verified));
    let h2 = conn.handling == Handling::Http2;
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    for_upstream(&mut parts, upgrade, h2, conn.inbound.target);
    record.propagate(&mut parts.headers);
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
        if let Some(client_upgrade) = client_upgrade
            && !tunnel(ctx, conn, snapshot, client_upgrade, upstream_upgrade)
        {
            return record.finish_local(LocalReply::RESET);
        }
        let (parts, _) = resp.into_parts();
        return record.finish_switch(parts);
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    record.set_response(parts.status, &parts.headers);
    Response::from_parts(parts, Metered::response_direct(body, record).boxed_unsync())
}

/// The request an upgraded tunnel is opened by, to judge again on reloads.
fn snapshot<B>(req: &Request<B>, verified: Option<&Arc<jwt::Verified>>) -> Arc<proxy::conns::RequestSnapshot> {
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned);
    let host = host.or_else(|| req.uri().authority().map(|a| a.to_string())).unwrap_or_default();
    Arc::new(proxy::conns::RequestSnapshot {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        host,
        headers: req.headers().clone(),
        verified: verified.cloned(),
    })
}

/// Joins an upgraded client and pod connection, registered so that a policy
/// change closes the tunnel; one that cannot be registered is not opened
/// (`false`).
fn tunnel(
    ctx: &Inputs,
    conn: &Conn,
    snapshot: Option<Arc<proxy::conns::RequestSnapshot>>,
    client: hyper::upgrade::OnUpgrade,
    pod: hyper::upgrade::OnUpgrade,
) -> bool {
    let (target, idle) = (conn.inbound.target, ctx.limits.idle_timeout);
    let dup = conn.pod_socket.lock().ok().and_then(|s| s.as_ref()?.try_clone().ok());
    let Some(dup) = dup else {
        return false;
    };
    let guard = ctx.conns.register_socket(super::admit::authorized(&conn.inbound, snapshot), dup);
    tokio::spawn(async move {
        tunnel_upgrade(client, pod, target, idle).await;
        drop(guard);
    });
    true
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
        let tcp = connect(target, self.inbound.transparent, ctx.connect_timeout).await?;
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
