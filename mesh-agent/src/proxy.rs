//! The data path, by direction (as ztunnel's `inbound`/`outbound` and
//! linkerd2-proxy's `app/inbound`/`app/outbound`):
//!
//! - [`outbound`] (15001): a meshed pod's connection, routed by its original
//!   destination and opened directly, over HBONE, or as HTTP through the
//!   source's pipeline ([`outbound::http`]).
//! - [`inbound`]: every arrival at a local pod (HBONE streams on 15008,
//!   plaintext on 15006, connections from this node's pods) through one door,
//!   `inbound::admit`, to L4 or to the destination's HTTP stage.
//! - [`gateway`]: ingress and egress gateway listeners, a peer using both.
//!
//! Below them: [`l4`] (connect, register, copy, count), [`http`] (what both
//! HTTP sides share: bodies, headers, metering, the connection pool),
//! [`hbone`] (the tunnel protocol and client pool), [`upstream`], [`conns`],
//! [`limits`], [`reply`]. This file declares them, holds the error type and
//! runs the two capture listeners; children call no function of it.
//!
//! A failure resets its client connection, is logged and counted; nothing
//! here panics, and no connection's failure touches another's.
use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use tokio::net::TcpListener;

pub mod conns;
pub mod edge;
pub mod gateway;
pub mod hbone;
pub mod http;
pub mod inbound;
pub mod inputs;
pub(crate) mod l4;
pub mod limits;
pub mod outbound;
mod reply;
pub mod sni;
#[cfg(test)]
mod tests;
pub(crate) mod upstream;

pub use inputs::Inputs;

pub(crate) use reply::Refused;
pub use reply::{BLACK_HOLE_TEXT, LocalReply};

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
    Copy { addr: SocketAddrV4, op: l4::copy::Failed, error: io::Error },
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
    #[error("DYNAMIC_DNS: {host:?} did not resolve: {error}")]
    Dns { host: String, error: crate::dns::LookupError },
}

/// Binds a capture listener on loopback (`port` 15001 or 15006), IP_TRANSPARENT
/// so that it may accept connections addressed to any destination.
pub fn bind_capture(port: u16) -> io::Result<std::net::TcpListener> {
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
    Ok(socket.into())
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
                        l4::reset(&stream);
                        continue;
                    };
                    let guard = ctx.active.enter();
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        let _ticket = ticket;
                        match kind {
                            Direction::Outbound => outbound::handle(&ctx, stream, peer).await,
                            // Boxed: outbound connections, the many, keep no room for it.
                            Direction::Inbound => Box::pin(inbound::plaintext::handle(&ctx, stream, peer)).await,
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
