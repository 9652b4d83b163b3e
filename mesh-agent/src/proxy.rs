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
    agent::Context,
    route::{Route, route},
    telemetry::TcpLabels,
};

mod copy;

/// Why a proxied connection failed, for logs and `mesh_tcp_connection_failures_total`.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("original destination {0} is not IPv4")]
    NotIpv4(SocketAddr),
    #[error("refused by routing: {service}: {reason}")]
    Refused { service: String, reason: crate::route::Refusal },
    #[error("connect to {addr} timed out after {timeout:?}: is the endpoint listening and reachable from the node?")]
    ConnectTimeout { addr: SocketAddrV4, timeout: Duration },
    #[error("connect to {addr} from {source_ip:?}: {error}")]
    Connect { addr: SocketAddrV4, source_ip: Option<Ipv4Addr>, error: io::Error },
    #[error("{op} (upstream {addr}): {error}")]
    Copy { addr: SocketAddrV4, op: copy::Failed, error: io::Error },
}

impl ProxyError {
    fn reason(&self) -> &'static str {
        match self {
            ProxyError::NotIpv4(_) => "not_ipv4",
            ProxyError::Refused { .. } => "no_route",
            ProxyError::ConnectTimeout { .. } => "connect_timeout",
            ProxyError::Connect { .. } => "connect_error",
            ProxyError::Copy { .. } => "copy_error",
        }
    }

    /// Envoy's response flag, as Istio reports it.
    fn response_flags(&self) -> &'static str {
        match self {
            ProxyError::Refused { .. } | ProxyError::NotIpv4(_) => "UH",
            ProxyError::ConnectTimeout { .. } | ProxyError::Connect { .. } => "UF",
            ProxyError::Copy { .. } => "-",
        }
    }
}

/// Binds the outbound capture listener: loopback, IP_TRANSPARENT so that it may
/// accept connections addressed to any destination.
pub fn bind_outbound() -> io::Result<TcpListener> {
    let addr = SocketAddrV4::new(Ipv4Addr::from(mesh_common::OUTBOUND_ADDR), mesh_common::OUTBOUND_PORT);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_ip_transparent_v4(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Accepts until `stop` fires; each connection runs in its own task.
pub async fn serve(ctx: Arc<Context>, listener: TcpListener, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let guard = ctx.active.enter();
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        handle(&ctx, stream, peer).await;
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

async fn handle(ctx: &Context, client: TcpStream, peer: SocketAddr) {
    let _ = client.set_nodelay(true);
    let orig = match client.local_addr() {
        Ok(SocketAddr::V4(a)) => a,
        Ok(other) => return fail(ctx, &client, peer, None, ProxyError::NotIpv4(other)),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "client gone before routing");
            return;
        }
    };
    let state = ctx.state();
    let source = match peer.ip() {
        std::net::IpAddr::V4(ip) => state.workload_by_ip(ip).cloned(),
        std::net::IpAddr::V6(_) => None,
    };
    let pick = ctx.next_pick();
    let (addr, labels) = match route(&state, orig, pick) {
        Route::Service { service, endpoint, addr } => {
            (addr, TcpLabels::new(source.as_deref(), Some(&endpoint), Some(&service), false))
        }
        Route::Workload { workload, addr } => (addr, TcpLabels::new(source.as_deref(), Some(&workload), None, false)),
        Route::Passthrough { addr } => (addr, TcpLabels::new(source.as_deref(), None, None, true)),
        Route::Refused { service, reason } => {
            let labels = TcpLabels::new(source.as_deref(), None, Some(&service), false);
            let err = ProxyError::Refused { service: format!("{}/{} {orig}", service.namespace, service.name), reason };
            return fail(ctx, &client, peer, Some(labels), err);
        }
    };
    drop(state);
    // Keep the client's address only when the reply comes back through a captured
    // interface (a local pod's veth); otherwise the reply would bypass the agent.
    let source_ip = match peer.ip() {
        std::net::IpAddr::V4(ip) if ip != *addr.ip() && ctx.is_captured(*addr.ip()) => Some(ip),
        _ => None,
    };
    let upstream = match connect(addr, source_ip, ctx.connect_timeout).await {
        Ok(s) => s,
        Err(e) => return fail(ctx, &client, peer, Some(labels), e),
    };
    let m = &ctx.metrics;
    m.tcp_opened.get_or_create(&labels).inc();
    m.active_connections.inc();
    tracing::debug!(%peer, %orig, upstream = %addr, ?source_ip, "proxying");
    let received: Counter = m.tcp_received.get_or_create(&labels).clone();
    let sent: Counter = m.tcp_sent.get_or_create(&labels).clone();
    let result = copy::bidirectional(client, upstream, &received, &sent).await;
    m.active_connections.dec();
    match result {
        Ok(()) => {
            m.tcp_closed.get_or_create(&labels).inc();
        }
        Err((op, error)) => {
            let err = ProxyError::Copy { addr, op, error };
            tracing::info!(%peer, %orig, error = %err, "connection reset");
            m.connection_failures.get_or_create(&crate::telemetry::ReasonLabels { reason: err.reason() }).inc();
            m.tcp_closed.get_or_create(&labels).inc();
        }
    }
}

/// Connects to `addr`, from `source_ip` (any port) when given, within `timeout`.
async fn connect(addr: SocketAddrV4, source_ip: Option<Ipv4Addr>, timeout: Duration) -> Result<TcpStream, ProxyError> {
    let socket = TcpSocket::new_v4().map_err(|error| ProxyError::Connect { addr, source_ip, error })?;
    if let Some(ip) = source_ip {
        let bind = || -> io::Result<()> {
            socket2::SockRef::from(&socket).set_ip_transparent_v4(true)?;
            socket.bind(SocketAddr::V4(SocketAddrV4::new(ip, 0)))
        };
        bind().map_err(|error| ProxyError::Connect { addr, source_ip, error })?;
    }
    let _ = socket.set_nodelay(true);
    match tokio::time::timeout(timeout, socket.connect(addr.into())).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(error)) => Err(ProxyError::Connect { addr, source_ip, error }),
        Err(_) => Err(ProxyError::ConnectTimeout { addr, timeout }),
    }
}

/// Records a connection that never reached its upstream, and resets the client.
fn fail(ctx: &Context, client: &TcpStream, peer: SocketAddr, labels: Option<TcpLabels>, err: ProxyError) {
    tracing::warn!(%peer, error = %err, "connection refused");
    let m = &ctx.metrics;
    m.connection_failures.get_or_create(&crate::telemetry::ReasonLabels { reason: err.reason() }).inc();
    if let Some(mut labels) = labels {
        labels.response_flags = err.response_flags();
        m.tcp_opened.get_or_create(&labels).inc();
        m.tcp_closed.get_or_create(&labels).inc();
    }
    reset(client);
}

/// Makes the close send RST rather than FIN, so the client sees a failure.
pub(crate) fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
