//! The gateway pods' ports of this node as the destination side's doors see
//! them: looked up by address before a connection is handed to a pod, and
//! served by the gateway ([`super::gateway`] implements [`GatewayPort`];
//! the doors do not import it, as the gateway routes through the outbound
//! side, which reaches those doors again).
use std::{
    collections::HashMap,
    future::Future,
    net::{SocketAddr, SocketAddrV4},
    pin::Pin,
    sync::{Arc, RwLock},
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{Inputs, ProxyError};
use crate::routing::policy::Peer;

pub type Serve = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A stream a gateway port serves other than a captured socket: an HBONE
/// stream, a local client's in-process pipe.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A mesh client of a gateway port, as policy sees it: its identity (proven
/// by mTLS, or by capture on this node) and address.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Option<std::sync::Arc<str>>,
    pub ip: std::net::Ipv4Addr,
}

/// One gateway pod's port.
pub trait GatewayPort: Send + Sync {
    /// The gateway pod's own AuthorizationPolicies, for `peer` (Istio
    /// applies those selecting a gateway at the gateway): per connection on
    /// TCP and TLS-passthrough ports; on HTTP ports each request is judged
    /// instead (its JWT, CUSTOM, DENY and ALLOW), so this admits.
    fn admits(&self, ctx: &Inputs, peer: &Peer<'_>, port: u16) -> Result<(), ProxyError>;

    /// A connection captured for the port (its local address): admitted by
    /// the gateway's bounds and the pod's policies, then served.
    fn serve_captured(self: Arc<Self>, ctx: Arc<Inputs>, stream: TcpStream, peer: SocketAddr) -> Serve;

    /// A mesh client's stream to the port `target` (HBONE, or a local
    /// client's in-process pipe), already admitted.
    fn serve_stream(
        self: Arc<Self>,
        ctx: Arc<Inputs>,
        io: Box<dyn Io>,
        peer: SocketAddr,
        target: SocketAddrV4,
        caller: Caller,
    ) -> Serve;

    /// The gateway pod's identity: what a mesh client connects to.
    fn principal(&self) -> &str;
}

/// This node's gateway ports by gateway pod address (set by the agent's
/// reconcile of its gateways).
#[derive(Default)]
pub struct GatewayPorts {
    by_addr: RwLock<HashMap<SocketAddrV4, Arc<dyn GatewayPort>>>,
}

impl GatewayPorts {
    /// What serves the gateway pod's port `addr`, if it is one.
    pub fn get(&self, addr: SocketAddrV4) -> Option<Arc<dyn GatewayPort>> {
        self.by_addr.read().ok()?.get(&addr).cloned()
    }

    pub fn set(&self, ports: HashMap<SocketAddrV4, Arc<dyn GatewayPort>>) {
        if let Ok(mut p) = self.by_addr.write() {
            *p = ports;
        }
    }
}
