//! The L4 outbound proxy: accept a captured connection → its original destination
//! (the accepted socket's local address) → route → connect upstream, keeping the
//! client's pod IP as source where the reply path is captured → copy both ways.
//!
//! A failure resets this client connection, is logged and counted; nothing here
//! panics, and no connection's failure touches another's.
use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::{
    routing::l4::{Route, route},
    routing::protocol::{self, Declared, Handling, Sniffed},
    state::{State, Workload},
    telemetry::TcpLabels,
};

pub(crate) mod admit;
pub mod conns;
pub(crate) mod copy;
pub mod gateway;
pub mod hbone;
mod inbound;
pub mod inputs;
pub mod l7;
pub mod limits;
mod outbound;
mod reply;
#[cfg(test)]
mod tests;
mod upstream;

pub(crate) use outbound::sniff_client;

pub use inputs::Inputs;

pub(crate) use reply::Refused;
pub use reply::{BLACK_HOLE_TEXT, LocalReply};
pub use upstream::Originations;
pub(crate) use upstream::{Opened, Upstream, originate_tls};

/// Why a proxied connection failed, for logs and `mesh_tcp_connection_failures_total`.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("original destination {0} is not IPv4")]
    NotIpv4(SocketAddr),
    #[error("refused by routing: {service}: {reason}")]
    Refused { service: String, reason: crate::routing::l4::Refusal },
    #[error("connect to {addr} timed out after {timeout:?}: is the endpoint listening and reachable from the node?")]
    ConnectTimeout { addr: SocketAddrV4, timeout: Duration },
    #[error("connect to {addr} from {source_ip:?}: {error}")]
    Connect { addr: SocketAddrV4, source_ip: Option<Ipv4Addr>, error: io::Error },
    #[error("{op} (upstream {addr}): {error}")]
    Copy { addr: SocketAddrV4, op: copy::Failed, error: io::Error },
    #[error("node {node} has no InternalIP in the configuration; cannot reach its agent")]
    NoNodeAddress { node: String },
    #[error("client {0} is not a meshed pod with an identity")]
    NoSourceIdentity(Ipv4Addr),
    #[error("HBONE: {0}")]
    Tunnel(#[from] crate::proxy::hbone::HboneError),
    #[error("denied by AuthorizationPolicy ({policy})")]
    Denied { policy: String },
    #[error("plaintext refused: PeerAuthentication for {pod} port {port} is STRICT")]
    PlaintextRefused { pod: String, port: u16 },
    #[error("{0} is not a meshed pod on this node")]
    NotLocal(SocketAddrV4),
    #[error("TLS to {addr} as {sni:?}: {error} (is tls.caCertificates/credentialName the server's CA?)")]
    Tls { addr: SocketAddrV4, sni: String, error: io::Error },
    #[error("{0} is not in the service registry and outboundTrafficPolicy is REGISTRY_ONLY (add a ServiceEntry)")]
    BlackHole(SocketAddrV4),
}

/// Binds a capture listener on loopback (`port` 15001 or 15006), IP_TRANSPARENT
/// so that it may accept connections addressed to any destination.
pub fn bind_capture(port: u16) -> io::Result<TcpListener> {
    let addr = SocketAddrV4::new(Ipv4Addr::from(mesh_common::OUTBOUND_ADDR), port);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_ip_transparent_v4(true)?;
    // Accepted sockets inherit the mark: their packets to a meshed pod (replies
    // to its outbound connections) pass the pod's last-hop gate.
    socket.set_mark(crate::marks::get().agent)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Which captured listener a connection came through.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    /// 15001: a meshed pod's outgoing connection.
    Outbound,
    /// 15006: plaintext from outside the mesh to a local meshed pod.
    Inbound,
}

/// Accepts until `stop` fires; each connection runs in its own task.
pub async fn serve(
    ctx: Arc<Inputs>,
    listener: TcpListener,
    kind: Direction,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let name = match kind {
        Direction::Outbound => "outbound",
        Direction::Inbound => "inbound",
    };
    let gate = limits::Gate::new(name, &ctx.limits);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(ticket) = gate.admit(peer.ip(), &ctx.metrics) else {
                        reset(&stream);
                        continue;
                    };
                    let guard = ctx.active.enter();
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        let _ticket = ticket;
                        match kind {
                            Direction::Outbound => outbound::handle(&ctx, stream, peer).await,
                            // Boxed: outbound connections, the many, keep no room for it.
                            Direction::Inbound => Box::pin(inbound::handle_plaintext(&ctx, stream, peer)).await,
                        }
                        drop(guard);
                    });
                }
                Err(e) => {
                    // Out of descriptors or memory: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Opens the upstream for a connection from `peer` (the pod `source`, if known)
/// to `addr` (the pod `dest`, if known): HBONE to the destination node's agent
/// for a meshed pod on another node; otherwise a direct connection, after
/// authorization when the pod is a meshed one on this node (this agent is then
/// the destination's agent too).
pub(crate) async fn open_upstream(
    ctx: &Arc<Inputs>,
    state: &State,
    source: Option<&Arc<Workload>>,
    peer: SocketAddr,
    dest: Option<&Arc<Workload>>,
    addr: SocketAddrV4,
    connect_timeout: Duration,
) -> Result<Opened, ProxyError> {
    let peer_ip = match peer.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => return Err(ProxyError::NotIpv4(peer)),
    };
    let source_identity = source.filter(|s| s.meshed).map(|s| s.principal.clone());
    match dest.filter(|d| d.meshed) {
        Some(d) if d.node.as_deref() != Some(ctx.node.as_str()) => {
            let node_ip = d.node.as_ref().and_then(|n| state.nodes.get(n)).and_then(|n| n.internal_ip);
            let Some(node_ip) = node_ip else {
                return Err(ProxyError::NoNodeAddress {
                    node: d.node.as_deref().unwrap_or("<unscheduled>").to_owned(),
                });
            };
            let src_id = source_identity.ok_or(ProxyError::NoSourceIdentity(peer_ip))?;
            let node = SocketAddrV4::new(node_ip, mesh_common::HBONE_PORT);
            let to = crate::proxy::hbone::TunnelTo {
                source: &src_id,
                node,
                dest: &d.principal,
                target: addr,
                client_ip: peer_ip,
                connect_timeout,
            };
            let tunnel = ctx.hbone.open(ctx, to).await?;
            Ok(Opened { io: Upstream::Tunnel(hyper_util::rt::TokioIo::new(tunnel)), mtls: true, guard: None })
        }
        // This agent is the destination's too: the connection goes through
        // the destination side's door (`admit`), as an HBONE stream would.
        Some(d) => {
            let arrival = l7::destination::Inbound {
                dest: d.clone(),
                target: addr,
                peer,
                principal: source_identity,
                client_ip: peer_ip,
                source: source.cloned(),
                transparent: transparent_source(ctx, peer, addr),
                mtls: false,
            };
            match admit::admit(state, arrival)? {
                // Its request policies are judged on the far end of an in-process pipe.
                admit::Admission::Http(inbound) => {
                    let (near, far) = tokio::io::duplex(l7::destination::PIPE_BUFFER);
                    tokio::spawn(l7::destination::serve(ctx.clone(), far, inbound));
                    Ok(Opened { io: Upstream::Pipe(near), mtls: false, guard: None })
                }
                admit::Admission::Tcp(arrival) => {
                    let (s, guard) = admit::connect_admitted(ctx, &arrival, connect_timeout).await?;
                    Ok(Opened { io: Upstream::Tcp(s), mtls: false, guard: Some(guard) })
                }
            }
        }
        None => {
            let s = connect(addr, transparent_source(ctx, peer, addr), connect_timeout).await?;
            Ok(Opened { io: Upstream::Tcp(s), mtls: false, guard: None })
        }
    }
}

/// [`open_upstream`] as a boxed future of a named type: for callers inside
/// the destination stage (an external authorizer's check), which
/// `open_upstream` itself may start, so its future type cannot name theirs.
pub(crate) fn open_upstream_boxed<'a>(
    ctx: &'a Arc<Inputs>,
    state: &'a State,
    source: Option<&'a Arc<Workload>>,
    peer: SocketAddr,
    dest: Option<&'a Arc<Workload>>,
    addr: SocketAddrV4,
    connect_timeout: Duration,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Opened, ProxyError>> + Send + 'a>> {
    Box::pin(open_upstream(ctx, state, source, peer, dest, addr, connect_timeout))
}

/// Registers a connection authorized here, so a policy change reaches it.
pub(crate) fn register(
    ctx: &Inputs,
    authorized: conns::Authorized,
    upstream: &TcpStream,
    addr: SocketAddrV4,
) -> Result<conns::Guard, ProxyError> {
    ctx.conns.register(authorized, upstream).map_err(|error| ProxyError::Connect { addr, source_ip: None, error })
}

/// Connects an arrival admitted as a connection to its pod, registered
/// with its client too (reset both when policy closes it), and copies both ways.
pub(crate) async fn deliver(
    ctx: &Inputs,
    client: TcpStream,
    peer: SocketAddr,
    arrival: &l7::destination::Inbound,
    labels: TcpLabels,
) {
    let addr = arrival.target;
    let registered = admit::connect_admitted(ctx, arrival, ctx.connect_timeout).await.and_then(|(upstream, g)| {
        let g = g.and_client(&client).map_err(|error| ProxyError::Connect { addr, source_ip: None, error })?;
        Ok((upstream, g))
    });
    let (upstream, guard) = match registered {
        Ok(r) => r,
        Err(e) => return fail(ctx, &client, peer, Some(labels), e),
    };
    tracing::debug!(%peer, upstream = %addr, "proxying");
    pump(ctx, client, upstream, ConnMeters::open(&ctx.metrics, &labels), addr, Some(guard), |c, u| {
        reset(c);
        reset(u);
    })
    .await;
}

/// The client's address to connect from, if replies come back to this agent:
/// when the upstream is a pod whose veth is captured on this node, or when
/// the client is a meshed pod of this node (replies to its address reach the
/// agent wherever they enter: the uplink's capture or the pod's last-hop
/// gate). So a meshed pod's connections out of the mesh leave with its own
/// address, and masquerading, NetworkPolicy and firewalls see the pod, not
/// the node; only a gateway's connections leave from the node.
pub(crate) fn transparent_source(ctx: &Inputs, peer: SocketAddr, addr: SocketAddrV4) -> Option<Ipv4Addr> {
    match peer.ip() {
        // A host client (loopback) keeps the node's address.
        std::net::IpAddr::V4(ip)
            if ip != *addr.ip()
                && !ip.is_loopback()
                && !addr.ip().is_loopback()
                && (ctx.is_captured(*addr.ip()) || ctx.is_gated(ip)) =>
        {
            Some(ip)
        }
        _ => None,
    }
}

/// A proxied connection's counters, looked up once when it opens (counted
/// opened and active then, closed when dropped): what a long-lived connection
/// keeps instead of its labels (four pointers, not 272 bytes).
pub(crate) struct ConnMeters {
    received: Counter,
    sent: Counter,
    closed: Counter,
    active: prometheus_client::metrics::gauge::Gauge,
}

impl ConnMeters {
    pub(crate) fn open(m: &crate::telemetry::Metrics, labels: &TcpLabels) -> Self {
        m.tcp_opened.get_or_create(labels).inc();
        m.active_connections.inc();
        ConnMeters {
            received: m.tcp_received.get_or_create(labels).clone(),
            sent: m.tcp_sent.get_or_create(labels).clone(),
            closed: m.tcp_closed.get_or_create(labels).clone(),
            active: m.active_connections.clone(),
        }
    }
}

impl Drop for ConnMeters {
    fn drop(&mut self) {
        self.active.dec();
        self.closed.inc();
    }
}

/// Copies between a client and its upstream, counting bytes; `on_error`
/// resets what it can of both. A `guard` is held while the copy runs (a
/// policy change that refuses the connection aborts its sockets). (An `async`
/// block, not an `async fn`: the latter would keep each argument twice in the
/// connection's task.)
#[expect(clippy::manual_async_fn, reason = "an async fn would keep its arguments twice")]
pub(crate) fn pump<'a, C, U>(
    ctx: &'a Inputs,
    mut client: C,
    mut upstream: U,
    meters: ConnMeters,
    addr: SocketAddrV4,
    guard: Option<conns::Guard>,
    on_error: impl FnOnce(&C, &U) + 'a,
) -> impl Future<Output = ()> + 'a
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'a,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'a,
{
    async move {
        let idle = Some(ctx.limits.idle_timeout);
        let result = copy::bidirectional(&mut client, &mut upstream, &meters.received, &meters.sent, idle).await;
        drop(meters);
        drop(guard);
        if let Err((op, error)) = result {
            on_error(&client, &upstream);
            let err = ProxyError::Copy { addr, op, error };
            tracing::info!(error = %err, "connection reset");
            let reason = crate::telemetry::ReasonLabels { reason: err.reason() };
            ctx.metrics.connection_failures.get_or_create(&reason).inc();
        }
    }
}

/// Connects to `addr`, from `source_ip` (any port) when given, within `timeout`.
pub(crate) async fn connect(
    addr: SocketAddrV4,
    source_ip: Option<Ipv4Addr>,
    timeout: Duration,
) -> Result<TcpStream, ProxyError> {
    let socket = TcpSocket::new_v4().map_err(|error| ProxyError::Connect { addr, source_ip, error })?;
    if let Some(ip) = source_ip {
        let bind = || -> io::Result<()> {
            socket2::SockRef::from(&socket).set_ip_transparent_v4(true)?;
            socket.bind(SocketAddr::V4(SocketAddrV4::new(ip, 0)))
        };
        bind().map_err(|error| ProxyError::Connect { addr, source_ip, error })?;
    }
    let _ = socket.set_nodelay(true);
    // The agent's own sockets are never captured as host clients.
    let _ = socket2::SockRef::from(&socket).set_mark(crate::marks::get().agent);
    match tokio::time::timeout(timeout, socket.connect(addr.into())).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(error)) => Err(ProxyError::Connect { addr, source_ip, error }),
        Err(_) => Err(ProxyError::ConnectTimeout { addr, timeout }),
    }
}

/// Records a connection that never reached its upstream, and resets the client.
pub(crate) fn fail(ctx: &Inputs, client: &TcpStream, peer: SocketAddr, labels: Option<TcpLabels>, err: ProxyError) {
    tracing::warn!(%peer, error = %err, "connection refused");
    record_failure(ctx, labels, &err);
    reset(client);
}

/// Counts a connection that never reached its upstream: by reason, and (when
/// its labels are known) as opened and closed with the error's response flags.
pub(crate) fn record_failure(ctx: &Inputs, labels: Option<TcpLabels>, err: &ProxyError) {
    let m = &ctx.metrics;
    m.connection_failures.get_or_create(&crate::telemetry::ReasonLabels { reason: err.reason() }).inc();
    if let Some(mut labels) = labels {
        labels.response_flags = err.flags();
        m.tcp_opened.get_or_create(&labels).inc();
        m.tcp_closed.get_or_create(&labels).inc();
    }
}

/// Makes the close send RST rather than FIN, so the client sees a failure.
pub(crate) fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
