//! The L4 routing decision: where a captured connection goes. A pure function of
//! the state snapshot, the original destination and a round-robin counter, so it
//! is tested with tables and has no I/O.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use super::balance;
pub use super::balance::Pick;
use crate::{
    routing::protocol::{Declared, declared},
    state::{OutboundPolicy, Protocol, Resolution, Service, State, TargetPort, Workload},
};

/// Where a connection to an original destination goes.
#[derive(Debug, Clone)]
pub enum Route {
    /// A Service VIP: to the chosen endpoint pod on its target port; the port
    /// declares its protocol.
    Service { service: Arc<Service>, endpoint: Arc<Workload>, addr: SocketAddrV4, protocol: Declared },
    /// A pod IP: to that pod.
    Workload { workload: Arc<Workload>, addr: SocketAddrV4 },
    /// Not a mesh address: to the original destination unchanged.
    Passthrough { addr: SocketAddrV4 },
    /// A Service VIP that cannot be served; the client is reset.
    Refused { service: Arc<Service>, reason: Refusal },
    /// Not in the registry, under `outboundTrafficPolicy: REGISTRY_ONLY`
    /// (Istio's BlackHoleCluster).
    BlackHole { addr: SocketAddrV4 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The Service has no TCP port with this number.
    UnknownPort(u16),
    /// No ready endpoint serves the port.
    NoReadyEndpoint(u16),
    /// A route names a subset no DestinationRule defines.
    NoSubset(String),
    /// A VirtualService rule matched but has no usable destination.
    NoRoute,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::UnknownPort(p) => write!(f, "the Service has no TCP port {p}"),
            Refusal::NoReadyEndpoint(p) => write!(f, "no ready endpoint for port {p}"),
            Refusal::NoSubset(s) => write!(f, "no DestinationRule defines subset {s:?}"),
            Refusal::NoRoute => write!(f, "the matching route has no destination"),
        }
    }
}

/// Decides where a connection to `dst` from a client in namespace `client`
/// goes (a host several namespaces' ServiceEntries declare: the client's
/// own namespace's first). `pick` chooses among the eligible endpoints (the
/// caller passes a round-robin counter).
pub fn route(state: &State, dst: SocketAddrV4, client: Option<&str>, pick: usize) -> Route {
    let ip: Ipv4Addr = *dst.ip();
    if let Some(service) = state.service_for(dst, client) {
        return route_to(service, dst, dst.port(), None, Pick::Turn(pick), &|_| false);
    }
    if let Some(workload) = state.workload_by_ip(ip) {
        return Route::Workload { workload: workload.clone(), addr: dst };
    }
    // An address a ServiceEntry resolves to, dialed by the application itself:
    // kept as dialed (the application chose among the addresses).
    // Its addresses are the configured ones, and what DNS answers now.
    let fixed = state.external_by_ip.get(&ip).map(Vec::as_slice).unwrap_or_default();
    let resolved = state.dns_services().iter().filter(|s| s.current_endpoints().iter().any(|w| w.ip == Some(ip)));
    let all: Vec<&Arc<crate::state::Service>> = fixed.iter().chain(resolved).collect();
    let own = client.and_then(|c| all.iter().copied().find(|s| &*s.namespace == c));
    for service in own.into_iter().chain(all.iter().copied().filter(|s| s.visible_to(client))) {
        if let Some(sp) = service.ports.iter().find(|p| p.port == dst.port())
            && let Some(endpoint) = service.current_endpoints().iter().find(|w| w.ip == Some(ip))
        {
            let addr = match sp.target {
                TargetPort::Number(t) => SocketAddrV4::new(ip, t),
                TargetPort::Name(_) => dst,
            };
            return Route::Service {
                service: service.clone(),
                endpoint: endpoint.clone(),
                addr,
                protocol: declared(sp),
            };
        }
    }
    match state.outbound_policy {
        OutboundPolicy::AllowAny => Route::Passthrough { addr: dst },
        OutboundPolicy::RegistryOnly => Route::BlackHole { addr: dst },
    }
}

/// Like [`route_service`], but a ServiceEntry with `resolution: NONE` goes to
/// the address the client connected to (`orig`), on the port's target.
pub fn route_to(
    service: &Arc<Service>,
    orig: SocketAddrV4,
    port: u16,
    subset: Option<&std::collections::BTreeMap<String, String>>,
    pick: Pick<'_>,
    avoid: &dyn Fn(SocketAddrV4) -> bool,
) -> Route {
    match &service.external {
        // DYNAMIC_DNS: the data path puts the request's host's address in.
        Some(e) if matches!(e.resolution, Resolution::None | Resolution::DynamicDns) => {
            let Some(sp) = service.ports.iter().find(|p| p.port == port) else {
                return Route::Refused { service: service.clone(), reason: Refusal::UnknownPort(port) };
            };
            let target = match sp.target {
                TargetPort::Number(t) => t,
                TargetPort::Name(_) => port,
            };
            Route::Service {
                service: service.clone(),
                endpoint: e.unknown.clone(),
                addr: SocketAddrV4::new(*orig.ip(), target),
                protocol: declared(sp),
            }
        }
        _ => route_service(service, port, subset, pick, avoid),
    }
}

/// A ready endpoint of `service` for `port`, among the pods whose labels include
/// `subset` (when given), chosen by `pick`, leaving out those `avoid` names
/// unless that leaves none (then all are used, as Envoy's panic mode).
pub fn route_service(
    service: &Arc<Service>,
    port: u16,
    subset: Option<&std::collections::BTreeMap<String, String>>,
    pick: Pick<'_>,
    avoid: &dyn Fn(SocketAddrV4) -> bool,
) -> Route {
    let Some(sp) = service.ports.iter().find(|p| p.port == port && p.protocol == Protocol::Tcp) else {
        return Route::Refused { service: service.clone(), reason: Refusal::UnknownPort(port) };
    };
    // Endpoints that are ready and define the target port (a named port may be
    // missing on some pods, as in Kubernetes).
    let in_subset = |w: &&Arc<Workload>| subset.is_none_or(|l| l.iter().all(|(k, v)| w.labels.get(k) == Some(v)));
    // A ServiceEntry's `subjectAltNames`: the identities its endpoints must prove.
    let sans = service.external.as_ref().map(|e| e.subject_alt_names.as_slice()).unwrap_or_default();
    let proven = |w: &&Arc<Workload>| sans.is_empty() || (w.meshed && sans.iter().any(|s| *s == w.principal));
    let endpoints = service.current_endpoints();
    let all = || {
        endpoints
            .iter()
            .filter(|w| w.ready)
            .filter(in_subset)
            .filter(proven)
            .filter_map(|w| Some((w, w.ip?, w.resolve_port(&sp.target)?)))
    };
    let healthy = all().filter(|(_, ip, p)| !avoid(SocketAddrV4::new(*ip, *p))).count();
    let panic = healthy == 0;
    let eligible = || all().filter(move |(_, ip, p)| panic || !avoid(SocketAddrV4::new(*ip, *p)));
    let n = eligible().count();
    if n == 0 {
        return Route::Refused { service: service.clone(), reason: Refusal::NoReadyEndpoint(port) };
    }
    let index = balance::index(pick, n, || eligible().map(|(_, ip, p)| SocketAddrV4::new(ip, p)));
    match eligible().nth(index) {
        Some((w, ip, p)) => Route::Service {
            service: service.clone(),
            endpoint: w.clone(),
            addr: SocketAddrV4::new(ip, p),
            protocol: declared(sp),
        },
        None => Route::Refused { service: service.clone(), reason: Refusal::NoReadyEndpoint(port) },
    }
}

#[cfg(test)]
mod tests;
