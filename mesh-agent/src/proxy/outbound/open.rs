//! Opening the upstream of a routed connection, for the L4 copy and the
//! HTTP pipeline alike: an HBONE stream to the destination's node for a
//! meshed pod elsewhere, this node's own door for a local one
//! ([`inbound::same_node`]), a direct connection otherwise.
use std::{net::SocketAddrV4, sync::Arc, time::Duration};

use crate::{
    proxy::{
        Inputs, ProxyError,
        hbone::TunnelTo,
        inbound::{self, Inbound},
        l4::{connect, transparent_source},
        upstream::{Hop, Opened, Upstream},
    },
    state::State,
};

/// Opens the upstream for `hop`: HBONE to the destination node's agent for a
/// meshed pod on another node; otherwise a direct connection, after
/// authorization when the pod is a meshed one on this node (this agent is then
/// the destination's agent too).
pub(crate) async fn open_upstream(
    ctx: &Arc<Inputs>,
    state: &State,
    hop: Hop<'_>,
    connect_timeout: Duration,
) -> Result<Opened, ProxyError> {
    let Hop { source, peer, dest, addr, service, opaque } = hop;
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
            let to = TunnelTo {
                source: &src_id,
                node,
                dest: &d.principal,
                target: addr,
                client_ip: peer_ip,
                service: service.map(|s| &*s.hostname),
                connect_timeout,
            };
            let tunnel = ctx.hbone.open(ctx, to).await?;
            Ok(Opened { io: Upstream::Tunnel(hyper_util::rt::TokioIo::new(tunnel)), mtls: true, guard: None })
        }
        // This agent is the destination's too: the door an HBONE stream takes.
        Some(d) => {
            let arrival = Inbound {
                dest: d.clone(),
                target: addr,
                peer,
                principal: source_identity,
                client_ip: peer_ip,
                source: source.cloned(),
                transparent: transparent_source(ctx, peer, addr),
                mtls: false,
                service: service.cloned(),
                opaque,
            };
            inbound::same_node(ctx, state, arrival, connect_timeout).await
        }
        None => {
            let s = connect(addr, transparent_source(ctx, peer, addr), connect_timeout).await?;
            Ok(Opened { io: Upstream::Tcp(s), mtls: false, guard: None })
        }
    }
}

/// [`open_upstream`] as a boxed future of a named type: the destination
/// side's way out ([`crate::proxy::upstream::Dial`], for an external
/// authorizer's check), which `open_upstream` itself may start (a same-node
/// pod), so its future type cannot name the check's.
pub(crate) fn dial<'a>(
    ctx: &'a Arc<Inputs>,
    state: &'a State,
    hop: Hop<'a>,
    connect_timeout: Duration,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Opened, ProxyError>> + Send + 'a>> {
    Box::pin(open_upstream(ctx, state, hop, connect_timeout))
}
