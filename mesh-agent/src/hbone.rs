//! HBONE, as Istio ambient uses it: mTLS between node agents on port 15008,
//! and one HTTP/2 `CONNECT <pod-ip>:<port>` stream per proxied connection.
//!
//! Client side ([`Pool`]): the source agent presents the **source workload's**
//! certificate and accepts only a server presenting the **destination
//! workload's** identity (asked for by TLS server name, see
//! [`identity::server_name_for`]). HTTP/2 connections are pooled per
//! (source identity, destination node, destination identity) and reused; a
//! renewed source certificate starts a new connection while streams on the old
//! one run to their end. The original client's IP travels in `Forwarded: for=`.
//!
//! Server side ([`serve`]): the client chain must lead to the mesh root; the
//! source principal comes from it. The target must be a meshed pod on this node
//! running as the identity the client asked for; AuthorizationPolicy decides;
//! then the agent connects to the pod with the source pod's IP as the client
//! address when that IP belongs to the authenticated identity.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http_body_util::Empty;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    client::conn::http2::SendRequest,
    upgrade::Upgraded,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::{
    identity::{self, IdentityError},
    policy::{Decision, Peer, authorize},
    proxy::Inputs,
    proxy::{self, ProxyError},
    telemetry::TcpLabels,
};

/// HTTP/2 flow-control windows: large enough that one stream can fill a fast
/// link without waiting for WINDOW_UPDATEs.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_FRAME: u32 = 256 * 1024;
/// Streams per pooled connection.
const MAX_STREAMS: u32 = 1000;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const KEEPALIVE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("source certificate: {0}")]
    Identity(#[from] IdentityError),
    #[error("connect to agent {addr}: {error}")]
    Connect { addr: SocketAddrV4, error: std::io::Error },
    #[error("connect to agent {addr} timed out")]
    ConnectTimeout { addr: SocketAddrV4 },
    #[error("mTLS with agent {addr} (expecting {expected}): {error}")]
    Tls { addr: SocketAddrV4, expected: Arc<str>, error: std::io::Error },
    #[error("HTTP/2 with agent {addr}: {error}")]
    Http { addr: SocketAddrV4, error: hyper::Error },
    #[error("agent {addr} answered {status} for CONNECT {target}: {reason}")]
    Status { addr: SocketAddrV4, target: SocketAddrV4, status: StatusCode, reason: String },
}

impl HboneError {
    pub fn reason(&self) -> &'static str {
        match self {
            HboneError::Identity(_) => "no_certificate",
            HboneError::Connect { .. } | HboneError::ConnectTimeout { .. } => "tunnel_connect",
            HboneError::Tls { .. } => "tunnel_tls",
            HboneError::Http { .. } => "tunnel_http",
            HboneError::Status { status, .. } if *status == StatusCode::UNAUTHORIZED => "denied_by_peer",
            HboneError::Status { .. } => "tunnel_refused",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: Arc<str>,
    node: SocketAddrV4,
    dest: Arc<str>,
}

struct PoolEntry {
    sender: SendRequest<Empty<Bytes>>,
    /// Serial of the source certificate the connection was made with.
    serial: String,
    /// Tunnels open on it; at [`MAX_STREAMS`] another connection is made, as
    /// the peer would make a new stream wait.
    streams: Arc<AtomicUsize>,
}

impl PoolEntry {
    fn usable(&self, serial: &str) -> bool {
        self.serial == serial && !self.sender.is_closed() && self.streams.load(Ordering::Acquire) < MAX_STREAMS as usize
    }
}

#[derive(Default)]
pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<PoolEntry>>>,
    /// TLS client configurations by (source certificate serial, destination
    /// identity): kept so that their session caches let a new connection to
    /// the same peer resume instead of a full handshake. A renewed source
    /// certificate has a new serial, so a new configuration and full handshakes.
    tls: Mutex<TlsConfigs>,
    /// Held while a connection to the key's peer is being made.
    /// Held while a connection to the key's peer is being made; remembers
    /// when the last attempt failed, and why.
    connecting: Mutex<HashMap<PoolKey, Arc<Gate>>>,
}

/// TLS client configurations by (source certificate serial, peer identity).
type TlsConfigs = HashMap<(String, Arc<str>), Arc<rustls::ClientConfig>>;

/// One connection attempt at a time; when the last one failed, and why.
type Gate = tokio::sync::Mutex<Option<(std::time::Instant, String)>>;

/// Configurations kept at most (one per source identity and peer identity).
const MAX_TLS_CONFIGS: usize = 4096;

/// An HBONE tunnel (one HTTP/2 CONNECT stream); its connection's stream count
/// goes down when it is dropped.
pub struct Tunnel {
    io: Upgraded,
    streams: Arc<AtomicUsize>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl hyper::rt::Read for Tunnel {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Tunnel {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// What a tunnel is for: the pod `target` on the node whose agent is `node`,
/// running as `dest`, on behalf of `source` whose pod IP is `client_ip`.
#[derive(Debug, Clone, Copy)]
pub struct TunnelTo<'a> {
    pub source: &'a Arc<str>,
    pub node: SocketAddrV4,
    pub dest: &'a Arc<str>,
    pub target: SocketAddrV4,
    pub client_ip: Ipv4Addr,
    pub connect_timeout: Duration,
}

impl Pool {
    /// Opens a tunnel (an HTTP/2 CONNECT stream), on a pooled connection when
    /// one is live.
    pub async fn open(&self, ctx: &Inputs, to: TunnelTo<'_>) -> Result<Tunnel, HboneError> {
        let TunnelTo { source, node, dest, target, client_ip, connect_timeout } = to;
        let cert = ctx.certs.get(source).await?;
        let key = PoolKey { source: source.clone(), node, dest: dest.clone() };
        let serial = &cert.info.serial;
        if let Some(r) = self.on_pooled(&key, serial, node, target, client_ip).await {
            return r;
        }
        // One handshake at a time per peer: a burst of new connections waits
        // for the first and shares it, instead of each making its own.
        let gate = self.connecting.lock().ok().map(|mut m| m.entry(key.clone()).or_default().clone());
        let waiting_since = std::time::Instant::now();
        let mut turn = match &gate {
            Some(g) => Some(g.lock().await),
            None => None,
        };
        // The attempt this opener waited for failed: fail with it rather than
        // each waiter waiting out its own connect timeout. Later openers try.
        if let Some(Some((when, why))) = turn.as_deref()
            && *when >= waiting_since
        {
            return Err(HboneError::Connect { addr: node, error: std::io::Error::other(why.clone()) });
        }
        // Another opener connected while this one waited: use that, without
        // holding the gate over the CONNECT.
        if self.usable(&key, serial) {
            turn = None;
            if let Some(r) = self.on_pooled(&key, serial, node, target, client_ip).await {
                return r;
            }
        }
        // Boxed: a handshake's state (~6.5 KB) is needed once per peer, not by
        // every tunnel opened on a pooled connection.
        let handshake = Box::pin(connect(ctx, self.tls_config(ctx, &cert, node, dest)?, node, dest, connect_timeout));
        let sender = match handshake.await {
            Ok(s) => s,
            Err(e) => {
                if let Some(t) = turn.as_deref_mut() {
                    *t = Some((std::time::Instant::now(), e.to_string()));
                }
                return Err(e);
            }
        };
        if let Some(t) = turn.as_deref_mut() {
            *t = None;
        }
        let streams = Arc::new(AtomicUsize::new(1));
        if let Ok(mut m) = self.conns.lock() {
            for entries in m.values_mut() {
                entries.retain(|e| !e.sender.is_closed());
            }
            m.retain(|_, entries| !entries.is_empty());
            if let Ok(mut gates) = self.connecting.lock() {
                // Gates nobody waits on, for peers with no connection left.
                gates.retain(|k, g| Arc::strong_count(g) > 1 || m.contains_key(k));
            }
            let entry =
                PoolEntry { sender: sender.clone(), serial: cert.info.serial.clone(), streams: streams.clone() };
            m.entry(key).or_default().push(entry);
        }
        drop(turn);
        match send_connect(sender, node, target, client_ip).await {
            Ok(io) => Ok(Tunnel { io, streams }),
            Err(e) => {
                streams.fetch_sub(1, Ordering::AcqRel);
                Err(e)
            }
        }
    }
}

impl Pool {
    fn usable(&self, key: &PoolKey, serial: &str) -> bool {
        self.conns.lock().is_ok_and(|m| m.get(key).is_some_and(|v| v.iter().any(|e| e.usable(serial))))
    }

    /// A tunnel on a usable pooled connection (a stream slot is taken before
    /// sending, so that concurrent opens spread). `None`: there is none, or
    /// the one tried has died since it was last used (the peer agent
    /// restarted), and a fresh connection is for the caller to make.
    async fn on_pooled(
        &self,
        key: &PoolKey,
        serial: &str,
        node: SocketAddrV4,
        target: SocketAddrV4,
        client_ip: Ipv4Addr,
    ) -> Option<Result<Tunnel, HboneError>> {
        let (sender, streams) = self.conns.lock().ok().and_then(|m| {
            let e = m.get(key)?.iter().find(|e| e.usable(serial))?;
            e.streams.fetch_add(1, Ordering::AcqRel);
            Some((e.sender.clone(), e.streams.clone()))
        })?;
        match send_connect(sender, node, target, client_ip).await {
            Ok(io) => Some(Ok(Tunnel { io, streams })),
            Err(e) => {
                streams.fetch_sub(1, Ordering::AcqRel);
                if matches!(e, HboneError::Http { .. }) {
                    tracing::debug!(%node, "pooled HBONE connection failed; reconnecting");
                    return None;
                }
                Some(Err(e))
            }
        }
    }

    fn tls_config(
        &self,
        ctx: &Inputs,
        cert: &identity::WorkloadCert,
        node: SocketAddrV4,
        dest: &Arc<str>,
    ) -> Result<Arc<rustls::ClientConfig>, HboneError> {
        let key = (cert.info.serial.clone(), dest.clone());
        if let Some(c) = self.tls.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(c);
        }
        let config = identity::tls::client_config(ctx.certs.roots(), Some(cert.key.clone()), dest.clone(), &[b"h2"])
            .map_err(|e| HboneError::Tls { addr: node, expected: dest.clone(), error: std::io::Error::other(e) })?;
        let config = Arc::new(config);
        if let Ok(mut m) = self.tls.lock() {
            if m.len() >= MAX_TLS_CONFIGS {
                m.clear();
            }
            m.insert(key, config.clone());
        }
        Ok(config)
    }
}

/// Sends `CONNECT target` on an HTTP/2 connection and returns the tunnel.
async fn send_connect(
    mut sender: SendRequest<Empty<Bytes>>,
    node: SocketAddrV4,
    target: SocketAddrV4,
    client_ip: Ipv4Addr,
) -> Result<Upgraded, HboneError> {
    let http = |error| HboneError::Http { addr: node, error };
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .header("forwarded", format!("for={client_ip}"))
        .body(Empty::new())
        .map_err(|e| HboneError::Status {
            addr: node,
            target,
            status: StatusCode::BAD_REQUEST,
            reason: e.to_string(),
        })?;
    sender.ready().await.map_err(http)?;
    let resp = sender.send_request(req).await.map_err(http)?;
    if resp.status() != StatusCode::OK {
        let reason =
            resp.headers().get("x-mesh-reason").and_then(|v| v.to_str().ok()).unwrap_or("no reason given").to_owned();
        return Err(HboneError::Status { addr: node, target, status: resp.status(), reason });
    }
    hyper::upgrade::on(resp).await.map_err(http)
}

async fn connect(
    ctx: &Inputs,
    config: Arc<rustls::ClientConfig>,
    node: SocketAddrV4,
    dest: &Arc<str>,
    connect_timeout: Duration,
) -> Result<SendRequest<Empty<Bytes>>, HboneError> {
    let tcp = match proxy::connect(node, None, connect_timeout).await {
        Ok(s) => s,
        Err(ProxyError::ConnectTimeout { .. }) => return Err(HboneError::ConnectTimeout { addr: node }),
        Err(ProxyError::Connect { error, .. }) => return Err(HboneError::Connect { addr: node, error }),
        Err(other) => return Err(HboneError::Connect { addr: node, error: std::io::Error::other(other.to_string()) }),
    };
    let tls_err = |error| HboneError::Tls { addr: node, expected: dest.clone(), error };
    let name = rustls::pki_types::ServerName::try_from(identity::server_name_for(dest))
        .map_err(|e| tls_err(std::io::Error::other(e)))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(r) => r.map_err(tls_err)?,
        Err(_) => return Err(tls_err(std::io::ErrorKind::TimedOut.into())),
    };
    let handshake = match tls.get_ref().1.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => "resumed",
        _ => "full",
    };
    ctx.metrics.hbone_connections.get_or_create(&crate::telemetry::HandshakeLabels { handshake }).inc();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .keep_alive_interval(KEEPALIVE)
        .keep_alive_while_idle(false)
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|error| HboneError::Http { addr: node, error })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%node, error = %e, "HBONE connection ended");
        }
    });
    tracing::debug!(%node, dest = %dest, handshake, "HBONE connection established");
    Ok(sender)
}

/// Accepts mTLS connections on 15008 until `stop` fires.
pub async fn serve(
    ctx: Arc<Inputs>,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let (ctx, acceptor) = (ctx.clone(), acceptor.clone());
                    tokio::spawn(async move { serve_connection(ctx, tcp, peer, acceptor).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "HBONE accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn serve_connection(ctx: Arc<Inputs>, tcp: TcpStream, peer: SocketAddr, acceptor: tokio_rustls::TlsAcceptor) {
    let _ = tcp.set_nodelay(true);
    let refused = |why: String| {
        tracing::warn!(%peer, "HBONE connection refused: {why}");
        ctx.metrics.connection_failures.get_or_create(&crate::telemetry::ReasonLabels { reason: "tunnel_tls" }).inc();
    };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return refused(format!("mTLS handshake: {e}")),
        Err(_) => return refused("mTLS handshake timed out".into()),
    };
    let (_, conn) = tls.get_ref();
    let peer_id = conn.peer_certificates().and_then(|c| c.first()).and_then(|c| identity::peer_identity(c));
    let server_id = conn.server_name().and_then(|sni| ctx.certs.identity_for_server_name(sni));
    let (Some(peer_id), Some(server_id)) = (peer_id, server_id) else {
        return refused("client certificate without a SPIFFE identity, or unknown server name".into());
    };
    let peer_id: Arc<str> = peer_id.into();
    let service = hyper::service::service_fn(move |req| {
        let (ctx, peer_id, server_id) = (ctx.clone(), peer_id.clone(), server_id.clone());
        async move { Ok::<_, std::convert::Infallible>(handle_connect(ctx, peer, peer_id, server_id, req).await) }
    });
    let result = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(KEEPALIVE)
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

/// `Forwarded: for=<ip>` (RFC 7239), first element.
fn forwarded_for(req: &Request<Incoming>) -> Option<Ipv4Addr> {
    let v = req.headers().get("forwarded")?.to_str().ok()?;
    let first = v.split(',').next()?;
    first.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        k.eq_ignore_ascii_case("for").then(|| v.trim_matches('"').parse().ok())?
    })
}

async fn handle_connect(
    ctx: Arc<Inputs>,
    peer: SocketAddr,
    peer_id: Arc<str>,
    server_id: Arc<str>,
    mut req: Request<Incoming>,
) -> Response<Empty<Bytes>> {
    if req.method() != Method::CONNECT {
        return answer(StatusCode::METHOD_NOT_ALLOWED, "only CONNECT is served on this port");
    }
    let Some(target) = req.uri().authority().and_then(|a| a.as_str().parse::<SocketAddrV4>().ok()) else {
        return answer(StatusCode::BAD_REQUEST, "CONNECT target must be <ipv4>:<port>");
    };
    // The second hop of the egress-gateway pattern: a gateway port on this node.
    if let Some((gateways, protocol)) = crate::gateway::tunnel_target(&ctx, target, &server_id) {
        let guard = ctx.active.enter();
        tokio::spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(up) => {
                    tracing::debug!(%peer, source = %peer_id, %target, "HBONE stream to a gateway");
                    crate::gateway::serve_tunneled(ctx.clone(), TokioIo::new(up), peer, target, gateways, protocol)
                        .await;
                }
                Err(e) => tracing::debug!(%peer, %target, error = %e, "HBONE stream ended before upgrade"),
            }
            drop(guard);
        });
        return answer(StatusCode::OK, "");
    }
    let state = ctx.state();
    let dest = state
        .workload_by_ip(*target.ip())
        .filter(|w| w.meshed && w.node.as_deref() == Some(ctx.node.as_str()))
        .cloned();
    let Some(dest) = dest else {
        tracing::warn!(%peer, %target, "HBONE: target is not a meshed pod on this node");
        return answer(StatusCode::NOT_FOUND, "target is not a meshed pod on this node");
    };
    if *dest.principal != *server_id {
        tracing::warn!(%peer, %target, expected = %server_id, actual = %dest.principal, "HBONE: identity mismatch");
        return answer(StatusCode::FORBIDDEN, "target does not run as the identity the connection was made for");
    }
    // The original client: trusted only when that pod runs as the peer's identity.
    let client_ip = forwarded_for(&req);
    let source = client_ip.and_then(|ip| state.workload_by_ip(ip)).filter(|w| *w.principal == *peer_id).cloned();
    // A gateway or a node's host client: labelled as that workload, no pod IP.
    let labelled = source.clone().or_else(|| state.edge_workload(&peer_id));
    let source_ip = source.as_ref().and_then(|w| w.ip);
    let policy_ip = source_ip.unwrap_or(match peer.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    });
    let mut labels = TcpLabels::new(labelled.as_deref(), Some(&dest), None, false);
    labels.reporter = "destination";
    labels.source_principal = crate::telemetry::Label(peer_id.clone());
    labels.connection_security_policy = "mutual_tls";
    let decision = authorize(&state, &dest, &Peer { principal: Some(&peer_id), ip: policy_ip }, target.port());
    drop(state);
    if let Decision::Deny(policy) = decision {
        let err = ProxyError::Denied { policy };
        tracing::warn!(%peer, source = %peer_id, %target, error = %err, "HBONE: connection refused");
        proxy::record_failure(&ctx, Some(labels), &err);
        return answer(StatusCode::UNAUTHORIZED, &err.to_string());
    }
    // Replies to the source pod's IP come back through the pod's captured veth.
    let transparent = source_ip.filter(|_| ctx.is_captured(*target.ip()));
    let upstream = match proxy::connect(target, transparent, ctx.connect_timeout).await {
        Ok(s) => s,
        Err(err) => {
            tracing::warn!(%peer, %target, error = %err, "HBONE: upstream connect failed");
            proxy::record_failure(&ctx, Some(labels), &err);
            return answer(StatusCode::SERVICE_UNAVAILABLE, &err.to_string());
        }
    };
    let authorized = proxy::conns::Authorized {
        dest_ip: *target.ip(),
        port: target.port(),
        principal: Some(peer_id.clone()),
        peer_ip: policy_ip,
        plaintext: false,
    };
    let revocable = match proxy::register(&ctx, authorized, &upstream, target) {
        Ok(g) => g,
        Err(err) => {
            proxy::record_failure(&ctx, Some(labels), &err);
            return answer(StatusCode::SERVICE_UNAVAILABLE, &err.to_string());
        }
    };
    let guard = ctx.active.enter();
    let meters = proxy::ConnMeters::open(&ctx.metrics, &labels);
    drop(labels);
    // Only the upgrade goes into the stream's task, not the request.
    let upgrade = hyper::upgrade::on(&mut req);
    drop(req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                tracing::debug!(%peer, source = %peer_id, %target, "HBONE stream proxying");
                let io = TokioIo::new(upgraded);
                proxy::pump(&ctx, io, upstream, meters, target, Some(revocable), |_, u| proxy::reset(u)).await;
            }
            Err(e) => tracing::debug!(%peer, %target, error = %e, "HBONE stream ended before upgrade"),
        }
        drop(guard);
    });
    answer(StatusCode::OK, "")
}
