//! HBONE arrivals (15008): mTLS from another node's agent, one HTTP/2
//! `CONNECT <pod-ip>:<port>` stream per connection. The client chain must
//! lead to the mesh root (the source principal comes from it); the target
//! must be a meshed pod of this node running as the identity the client
//! asked for (by TLS server name); then the door ([`super::admit`]) decides,
//! and the stream is joined to the pod from the source pod's IP when that IP
//! belongs to the authenticated identity. A target that is a gateway port of
//! this node (a gateway pod's) is handed to the gateway ([`GatewayHop`]).
use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use http_body_util::Empty;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    upgrade::Upgraded,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use super::{
    Inbound,
    admit::{Admission, admit, connect_admitted},
    http,
};
use crate::{
    identity,
    proxy::{
        Inputs, ProxyError,
        hbone::{
            CONNECTION_WINDOW, ConnectAsk, GatewayHop, KEEPALIVE, MAX_FRAME, MAX_STREAMS, STREAM_WINDOW,
            connect_request,
        },
        l4::{ConnMeters, pump, record_failure, reset},
    },
    state::State,
};

/// Accepts mTLS connections on 15008 until `stop` fires.
pub async fn serve(
    ctx: Arc<Inputs>,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    hop: GatewayHop,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let gate = crate::proxy::limits::Gate::new("hbone", &ctx.limits);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let Ok(ticket) = gate.admit(peer.ip(), &ctx.metrics) else { continue };
                    // At most so many handshakes at once; a client over it waits for none.
                    let Some(handshake) = gate.handshake(peer.ip(), &ctx.metrics) else { continue };
                    let (ctx, acceptor, hop) = (ctx.clone(), acceptor.clone(), hop.clone());
                    tokio::spawn(async move {
                        let _ticket = ticket;
                        serve_connection(ctx, tcp, peer, acceptor, hop, handshake).await
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "HBONE accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn serve_connection(
    ctx: Arc<Inputs>,
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    hop: GatewayHop,
    handshake: crate::proxy::limits::Handshake,
) {
    let _ = tcp.set_nodelay(true);
    let ctx_limits = ctx.limits.clone();
    let refused = |why: String| {
        tracing::warn!(%peer, "HBONE connection refused: {why}");
        ctx.metrics.connection_failures.get_or_create(&crate::telemetry::ReasonLabels { reason: "tunnel_tls" }).inc();
    };
    let tls = match tokio::time::timeout(ctx.limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return refused(format!("mTLS handshake: {e}")),
        Err(_) => return refused("mTLS handshake timed out".into()),
    };
    drop(handshake);
    let (_, conn) = tls.get_ref();
    let now = std::time::SystemTime::now();
    let leaf = conn.peer_certificates().and_then(|c| c.first());
    let peer_id = leaf.and_then(|c| identity::current_peer_identity(c, now));
    let server_id = conn.server_name().and_then(|sni| ctx.certs.identity_for_server_name(sni));
    let (Some(peer_id), Some(server_id)) = (peer_id, server_id) else {
        return refused("client certificate without a SPIFFE identity, or unknown server name".into());
    };
    let peer_id: Arc<str> = peer_id.into();
    let service = hyper::service::service_fn(move |req| {
        let (ctx, peer_id, server_id, hop) = (ctx.clone(), peer_id.clone(), server_id.clone(), hop.clone());
        async move { Ok::<_, std::convert::Infallible>(handle_connect(ctx, &hop, peer, peer_id, server_id, req).await) }
    });
    let result = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        // Per stream: 1000 streams × hyper's default 400 KB was 400 MB a connection.
        .max_send_buf_size(ctx_limits.h2_send_buffer)
        .keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(ctx_limits.keepalive_timeout)
        .serve_connection(TokioIo::new(tls), service)
        .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "HBONE connection ended");
    }
}

fn answer(status: StatusCode, reason: &str) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(reason) {
        r.headers_mut().insert("x-mesh-reason", v);
    }
    r
}

async fn handle_connect(
    ctx: Arc<Inputs>,
    hop: &GatewayHop,
    peer: SocketAddr,
    peer_id: Arc<str>,
    server_id: Arc<str>,
    req: Request<Incoming>,
) -> Response<Empty<Bytes>> {
    let ask = match connect_request(req.method(), req.uri(), req.headers()) {
        Ok(asked) => asked,
        Err((status, why)) => return answer(status, why),
    };
    let target = ask.target;
    // A gateway pod's port on this node (the second hop of the
    // egress-gateway pattern, a mesh client of an ingress gateway): judged
    // by the gateway pod's own policies, then served by the gateway.
    if let Some(serve) = hop(target, &server_id) {
        let ip = match admit_to_gateway(&ctx, peer, &peer_id, &ask) {
            Ok(ip) => ip,
            Err(err) => {
                tracing::warn!(%peer, source = %peer_id, %target, error = %err, "HBONE: connection to a gateway refused");
                record_failure(&ctx, None, &err);
                return answer(StatusCode::UNAUTHORIZED, &err.to_string());
            }
        };
        let id = peer_id.clone();
        return on_upgrade(&ctx, req, peer, target, move |io| {
            tracing::debug!(%peer, source = %id, %target, "HBONE stream to a gateway");
            serve(io, peer, Some(id), ip)
        });
    }
    let state = ctx.state();
    let arrival = match arrival(&ctx, &state, peer, &peer_id, &server_id, ask) {
        Ok(a) => a,
        Err((status, why)) => return answer(status, why),
    };
    let labels = arrival.labels(&state);
    let admitted = admit(&state, arrival);
    drop(state);
    let arrival = match admitted {
        // Request policies: the stream is parsed here, each request judged.
        Ok(Admission::Http(inbound)) => {
            let ctx2 = ctx.clone();
            return on_upgrade(&ctx, req, peer, target, move |io| http::serve(ctx2, io, inbound));
        }
        Ok(Admission::Tcp(arrival)) => arrival,
        Err(err) => {
            tracing::warn!(%peer, source = %peer_id, %target, error = %err, "HBONE: connection refused");
            record_failure(&ctx, Some(labels), &err);
            return answer(StatusCode::UNAUTHORIZED, &err.to_string());
        }
    };
    let (upstream, revocable) = match connect_admitted(&ctx, &arrival, ctx.connect_timeout).await {
        Ok(r) => r,
        Err(err) => {
            tracing::warn!(%peer, %target, error = %err, "HBONE: upstream connect failed");
            record_failure(&ctx, Some(labels), &err);
            return answer(StatusCode::SERVICE_UNAVAILABLE, &err.to_string());
        }
    };
    let meters = ConnMeters::open(&ctx, &labels, Some(*target.ip())).logged(&ctx, &labels, peer, target, target);
    let ctx2 = ctx.clone();
    on_upgrade(&ctx, req, peer, target, move |io| async move {
        tracing::debug!(%peer, source = %peer_id, %target, "HBONE stream proxying");
        pump(&ctx2, io, upstream, meters, target, Some(revocable), |_, u| reset(u)).await;
    })
}

/// The gateway pod's AuthorizationPolicies, for a stream from `peer_id` to
/// its port (the client's address as [`arrival`] trusts it), as the port
/// judges them ([`crate::proxy::edge::GatewayPort::admits`]); the client's
/// address as policy sees it.
fn admit_to_gateway(ctx: &Inputs, peer: SocketAddr, peer_id: &str, ask: &ConnectAsk) -> Result<Ipv4Addr, ProxyError> {
    let state = ctx.state();
    let claimed = ask.client_ip.filter(|ip| state.workload_by_ip(*ip).is_some_and(|w| *w.principal == *peer_id));
    let ip = claimed.unwrap_or(match peer.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    });
    let Some(serving) = ctx.gateways.get(ask.target) else { return Ok(ip) };
    let peer = crate::routing::policy::Peer { principal: Some(peer_id), ip };
    serving.admits(ctx, &peer, ask.target.port())?;
    Ok(ip)
}

/// The arrival a CONNECT stream asks for, or why it is refused before policy.
fn arrival(
    ctx: &Inputs,
    state: &State,
    peer: SocketAddr,
    peer_id: &Arc<str>,
    server_id: &str,
    ask: ConnectAsk,
) -> Result<Inbound, (StatusCode, &'static str)> {
    let ConnectAsk { target, client_ip, service_host } = ask;
    let dest = state.workload_by_ip(*target.ip()).filter(|w| w.meshed && w.node.as_deref() == Some(ctx.node.as_str()));
    let Some(dest) = dest.cloned() else {
        tracing::warn!(%peer, %target, "HBONE: target is not a meshed pod on this node");
        return Err((StatusCode::NOT_FOUND, "target is not a meshed pod on this node"));
    };
    if *dest.principal != *server_id {
        tracing::warn!(%peer, %target, expected = %server_id, actual = %dest.principal, "HBONE: identity mismatch");
        return Err((StatusCode::FORBIDDEN, "target does not run as the identity the connection was made for"));
    }
    // The original client: trusted only when that pod runs as the peer's identity.
    let source = client_ip.and_then(|ip| state.workload_by_ip(ip)).filter(|w| *w.principal == **peer_id).cloned();
    let source_ip = source.as_ref().and_then(|w| w.ip);
    let policy_ip = source_ip.unwrap_or(match peer.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    });
    // The Service the client addressed, as its agent says: kept only when
    // it is one of the target pod's with a port for this one. Its attached
    // policies judge the stream, as the pod's own do: a peer cannot name its
    // way out of them (a claim not kept is guessed from the port instead).
    let service = service_host.and_then(|h| state.service_of_endpoint(&dest, &h, target.port())).cloned();
    Ok(Inbound {
        dest,
        target,
        peer,
        principal: Some(peer_id.clone()),
        client_ip: policy_ip,
        // A gateway or a node's host client: labelled as that workload, no pod IP.
        source: source.or_else(|| state.edge_workload(peer_id)),
        // Replies to the source pod's IP come back through the pod's captured veth.
        transparent: source_ip.filter(|_| ctx.is_captured(*target.ip())),
        mtls: true,
        service,
        opaque: false,
    })
}

/// Answers 200 to the CONNECT and runs `serve` on its stream once hyper
/// hands it over. Only the upgrade goes into the stream's task, not the request.
fn on_upgrade<F, Fut>(
    ctx: &Inputs,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    target: SocketAddrV4,
    serve: F,
) -> Response<Empty<Bytes>>
where
    F: FnOnce(TokioIo<Upgraded>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let guard = ctx.active.enter();
    let upgrade = hyper::upgrade::on(&mut req);
    drop(req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(up) => serve(TokioIo::new(up)).await,
            Err(e) => tracing::debug!(%peer, %target, error = %e, "HBONE stream ended before upgrade"),
        }
        drop(guard);
    });
    answer(StatusCode::OK, "")
}
