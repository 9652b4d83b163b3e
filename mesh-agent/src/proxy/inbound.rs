//! The destination side: every connection that arrives for a local meshed
//! pod — an HBONE stream from another node ([`hbone`]), plaintext through
//! the inbound listener ([`plaintext`]), a connection from a pod or process
//! of this node ([`same_node`]) — goes through one door, [`admit::admit`]:
//! PeerAuthentication for a client without an identity, then either the
//! destination's HTTP stage ([`http`], when the pod's policies need its
//! requests) or L4 authorization, a connection to the pod and its
//! registration, so that a policy change reaches it.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use super::{
    Inputs, ProxyError,
    upstream::{Opened, Upstream},
};
use crate::{
    state::{Service, State, Workload},
    telemetry::{Label, TcpLabels},
};

pub(crate) mod admit;
pub mod hbone;
pub(crate) mod http;
pub(super) mod plaintext;

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
    /// The Service the client addressed, as its agent told (checked to be
    /// one of the pod's; for metrics only). `None`: guessed from the port.
    pub service: Option<Arc<Service>>,
    /// This node's source side already found the stream to be opaque bytes
    /// (declared or sniffed): there are no requests to count.
    pub opaque: bool,
}

impl Inbound {
    /// The Service the arrival is for: the one the client's agent named, else
    /// the pod's Service whose target port this is (as ztunnel's
    /// `guess_inbound_service`).
    pub(crate) fn service_in<'s>(&'s self, state: &'s State) -> Option<&'s Arc<crate::state::Service>> {
        let guessed = || state.service_port_of(&self.dest, self.target.port()).map(|(s, _)| s);
        self.service.as_ref().or_else(guessed)
    }

    /// What policy judges the arrival as: the pod, and the Service it is
    /// for ([`Inbound::service_in`]), whose attached policies apply too.
    pub(crate) fn judged_as<'s>(&'s self, state: &'s State) -> crate::routing::policy::Dest<'s> {
        crate::routing::policy::Dest { pod: &self.dest, service: self.service_in(state).map(|s| &**s) }
    }

    /// The connection's labels at the destination (`reporter="destination"`):
    /// its Service ([`Inbound::service_in`]); the principal the transport
    /// proved, `unknown` for plaintext.
    pub(crate) fn labels(&self, state: &State) -> TcpLabels {
        let service = self.service_in(state);
        let mut labels = TcpLabels::new(self.source.as_deref(), Some(&self.dest), service.map(|s| &**s), false);
        labels.reporter = "destination";
        labels.source_principal = self.principal.as_ref().map_or_else(|| "unknown".into(), |p| Label(p.clone()));
        labels.connection_security_policy = if self.mtls { "mutual_tls" } else { "none" };
        labels
    }
}

/// The in-process pipe's buffer each way, for a pod of this node whose
/// policies need its requests.
const PIPE_BUFFER: usize = 64 * 1024;

/// A connection from this node (a pod, a host process, a gateway) to a local
/// meshed pod: this agent is the destination's too, so the connection goes
/// through the door an HBONE stream would. The source side copies to what
/// this opens: the pod, or (request policies) the far end of an in-process
/// pipe whose near end the HTTP stage serves.
pub(crate) async fn same_node(
    ctx: &Arc<Inputs>,
    state: &State,
    arrival: Inbound,
    timeout: Duration,
) -> Result<Opened, ProxyError> {
    // A gateway pod's port: its policies, then the gateway, at the far end
    // of an in-process pipe.
    if let Some(serving) = ctx.gateways.get(arrival.target) {
        let peer = crate::routing::policy::Peer { principal: arrival.principal.as_deref(), ip: arrival.client_ip };
        serving.admits(ctx, &peer, arrival.target.port())?;
        let (near, far) = tokio::io::duplex(PIPE_BUFFER);
        let caller = crate::proxy::edge::Caller { principal: arrival.principal.clone(), ip: arrival.client_ip };
        tokio::spawn(serving.serve_stream(ctx.clone(), Box::new(far), arrival.peer, arrival.target, caller));
        return Ok(Opened { io: Upstream::Pipe(near), mtls: false, guard: None });
    }
    match admit::admit(state, arrival)? {
        admit::Admission::Http(inbound) => {
            let (near, far) = tokio::io::duplex(PIPE_BUFFER);
            tokio::spawn(http::serve(ctx.clone(), far, inbound));
            Ok(Opened { io: Upstream::Pipe(near), mtls: false, guard: None })
        }
        admit::Admission::Tcp(arrival) => {
            let (s, guard) = admit::connect_admitted(ctx, &arrival, timeout).await?;
            Ok(Opened { io: Upstream::Tcp(s), mtls: false, guard: Some(guard) })
        }
    }
}
