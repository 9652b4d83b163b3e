//! At a gateway, the gateway pod's request policies, before routing (as
//! Envoy's jwt_authn, ext_authz and RBAC filters before its router).
use super::*;
use crate::proxy::inbound;
use hyper::header::HeaderName;

/// What a gateway's request policies decide: headers for the client, or
/// why the request stops (with the gateway pod it is reported for).
pub(super) type Gated = Result<Vec<(HeaderName, HeaderValue)>, (Option<Arc<Workload>>, inbound::http::Stop)>;

/// The gateway pod's judgement of a request ([`inbound::http::gate`]): the
/// pod as the destination, the client as it arrived.
pub(super) async fn gate(ctx: &Arc<Inputs>, down: &Downstream, req: Request<Incoming>) -> (Request<Incoming>, Gated) {
    let Some(pod) = gateway_pod(&ctx.state(), down) else { return (req, Ok(Vec::new())) };
    let arrival = inbound::Inbound {
        dest: pod.clone(),
        target: down.orig,
        peer: down.peer,
        principal: down.principal.clone(),
        client_ip: down.peer_ip,
        source: None,
        transparent: None,
        mtls: down.principal.is_some(),
        service: None,
        opaque: false,
    };
    let (req, verdict) = inbound::http::gate(ctx, &arrival, req).await;
    (req, verdict.map_err(|stop| (Some(pod), stop)))
}

/// At a gateway: the gateway pod it arrived at (its address is where the
/// client connected), whose identity and labels the request leaves with.
pub(super) fn gateway_pod(state: &crate::state::State, down: &Downstream) -> Option<Arc<Workload>> {
    down.gateways.as_ref()?;
    state.workload_by_ip(*down.orig.ip()).filter(|w| w.gateway).cloned()
}
