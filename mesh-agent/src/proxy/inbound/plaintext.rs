//! The inbound plaintext listener (15006): connections from outside the mesh
//! (another node's un-meshed pod, a client beyond the cluster, an un-meshed pod
//! on this node) to a local meshed pod. PeerAuthentication decides whether
//! plaintext is admitted at all; AuthorizationPolicy then applies with no
//! principal.
use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::{
    Inbound,
    admit::{Admission, admit, connect_admitted},
    http,
};
use crate::{
    proxy::{
        Inputs, ProxyError,
        l4::{ConnMeters, fail, pump, reset, transparent_source},
    },
    telemetry::TcpLabels,
};

pub(in crate::proxy) async fn handle(ctx: &std::sync::Arc<Inputs>, client: TcpStream, peer: SocketAddr) {
    let _ = client.set_nodelay(true);
    let (Ok(SocketAddr::V4(dst)), SocketAddr::V4(peer_v4)) = (client.local_addr(), peer) else {
        return fail(ctx, &client, peer, None, ProxyError::NotIpv4(peer));
    };
    // A gateway pod's port: served by the gateway (a LoadBalancer's client).
    if let Some(serving) = ctx.gateways.get(dst) {
        return serving.serve_captured(ctx.clone(), client, peer).await;
    }
    let state = ctx.state();
    let dest =
        state.workload_by_ip(*dst.ip()).filter(|w| w.meshed && w.node.as_deref() == Some(ctx.node.as_str())).cloned();
    let Some(dest) = dest else {
        return fail(ctx, &client, peer, None, ProxyError::NotLocal(dst));
    };
    // An un-meshed pod of the cluster keeps its labels; it has no principal.
    let source = state.workload_by_ip(*peer_v4.ip()).cloned();
    let arrival = Inbound {
        dest,
        target: dst,
        peer,
        principal: None,
        client_ip: *peer_v4.ip(),
        source,
        transparent: transparent_source(ctx, peer, dst),
        mtls: false,
        // Never taken from a client outside the mesh: guessed from the port.
        service: None,
        opaque: false,
    };
    let labels = arrival.labels(&state);
    let admitted = admit(&state, arrival);
    drop(state);
    match admitted {
        Err(e) => fail(ctx, &client, peer, Some(labels), e),
        Ok(Admission::Http(inbound)) => http::serve(ctx.clone(), client, inbound).await,
        Ok(Admission::Tcp(arrival)) => deliver(ctx, client, peer, &arrival, labels).await,
    }
}

/// Connects an arrival admitted as a connection to its pod, registered
/// with its client too (reset both when policy closes it), and copies both ways.
async fn deliver(ctx: &Inputs, client: TcpStream, peer: SocketAddr, arrival: &Inbound, labels: TcpLabels) {
    let addr = arrival.target;
    let registered = connect_admitted(ctx, arrival, ctx.connect_timeout).await.and_then(|(upstream, g)| {
        let g = g.and_client(&client).map_err(|error| ProxyError::Connect { addr, source_ip: None, error })?;
        Ok((upstream, g))
    });
    let (upstream, guard) = match registered {
        Ok(r) => r,
        Err(e) => return fail(ctx, &client, peer, Some(labels), e),
    };
    tracing::debug!(%peer, upstream = %addr, "proxying");
    let meters = ConnMeters::open(ctx, &labels, Some(*addr.ip())).logged(ctx, &labels, peer, addr, addr);
    pump(ctx, client, upstream, meters, addr, Some(guard), |c, u| {
        reset(c);
        reset(u);
    })
    .await;
}
