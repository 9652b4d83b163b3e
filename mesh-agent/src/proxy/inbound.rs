//! The inbound plaintext listener (15006): connections from outside the mesh
//! (another node's un-meshed pod, a client beyond the cluster, an un-meshed pod
//! on this node) to a local meshed pod. PeerAuthentication decides whether
//! plaintext is admitted at all; AuthorizationPolicy then applies with no
//! principal.
use std::net::{SocketAddr, SocketAddrV4};

use tokio::net::TcpStream;

use super::{ProxyError, deliver, fail};
use crate::{
    proxy::Inputs,
    routing::policy::{Peer, Verdict, authorize, peer_mode},
    state::security::MtlsMode,
    telemetry::TcpLabels,
};

pub(super) async fn handle_plaintext(ctx: &std::sync::Arc<Inputs>, client: TcpStream, peer: SocketAddr) {
    let _ = client.set_nodelay(true);
    let (Ok(SocketAddr::V4(dst)), SocketAddr::V4(peer_v4)) = (client.local_addr(), peer) else {
        return fail(ctx, &client, peer, None, ProxyError::NotIpv4(peer));
    };
    let state = ctx.state();
    let dest =
        state.workload_by_ip(*dst.ip()).filter(|w| w.meshed && w.node.as_deref() == Some(ctx.node.as_str())).cloned();
    let Some(dest) = dest else {
        return fail(ctx, &client, peer, None, ProxyError::NotLocal(dst));
    };
    // An un-meshed pod of the cluster keeps its labels; it has no principal.
    let source = state.workload_by_ip(*peer_v4.ip()).cloned();
    let mut labels = TcpLabels::new(source.as_deref(), Some(&dest), None, false);
    labels.reporter = "destination";
    labels.source_principal = "unknown".into();
    let mode = peer_mode(&state, &dest, dst.port());
    if mode == MtlsMode::Strict {
        let err = ProxyError::PlaintextRefused { pod: format!("{}/{}", dest.namespace, dest.name), port: dst.port() };
        return fail(ctx, &client, peer, Some(labels), err);
    }
    if crate::proxy::l7::destination::wanted(&state, &dest, dst.port()) {
        drop(state);
        let inbound = crate::proxy::l7::destination::Inbound {
            dest,
            target: dst,
            peer,
            principal: None,
            client_ip: *peer_v4.ip(),
            source,
            transparent: super::transparent_source(ctx, peer, dst),
            mtls: false,
        };
        return crate::proxy::l7::destination::serve(ctx.clone(), client, inbound).await;
    }
    let decision = authorize(&state, &dest, &Peer { principal: None, ip: *peer_v4.ip() }, dst.port());
    drop(state);
    if let Verdict::Deny(policy) = decision {
        return fail(ctx, &client, peer, Some(labels), ProxyError::Denied { policy });
    }
    let authorized = super::conns::Authorized {
        dest_ip: *dst.ip(),
        port: dst.port(),
        principal: None,
        peer_ip: *peer_v4.ip(),
        plaintext: true,
        request: None,
    };
    deliver(ctx, client, peer, SocketAddrV4::new(*dst.ip(), dst.port()), labels, authorized).await;
}
