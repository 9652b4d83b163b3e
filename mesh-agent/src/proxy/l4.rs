//! The L4 toolbox every direction uses: connect (from the client's address
//! where replies come back here), register a connection for revocation,
//! copy both ways with its meters, and count or reset what failed. It calls
//! nothing above it: no routing, no policy, no direction.
use std::{
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpSocket, TcpStream};

use super::{Inputs, ProxyError, conns};
use crate::telemetry::TcpLabels;

pub(crate) mod copy;

/// Registers a connection authorized here, so a policy change reaches it.
pub(crate) fn register(
    ctx: &Inputs,
    authorized: conns::Authorized,
    upstream: &TcpStream,
    addr: SocketAddrV4,
) -> Result<conns::Guard, ProxyError> {
    ctx.conns.register(authorized, upstream).map_err(|error| ProxyError::Connect { addr, source_ip: None, error })
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
