//! A routing decision resolved to where one try of a request goes: the
//! endpoint, the identity the request leaves with, its metric labels and any
//! TLS to originate; or the refusal to answer with.
use super::*;

/// Where one try of a request goes.
pub(super) struct Target {
    /// Whose identity the request leaves with (a pod, or a gateway).
    pub source: Option<Arc<Workload>>,
    pub dest: Option<Arc<Workload>>,
    pub addr: SocketAddrV4,
    /// The Service routed to, told to the destination's agent.
    pub service: Option<Arc<crate::state::Service>>,
    pub labels: TcpLabels,
    /// TLS to originate, with the server name to ask for.
    pub tls: Option<(Arc<traffic::TlsOrigination>, String)>,
}

/// Resolves a routing decision to a target, or the local answer for a refusal.
pub(super) fn target(
    route: Route,
    src: Option<&Arc<Workload>>,
    cluster: Option<&traffic::Cluster>,
) -> Result<Target, Box<Refused>> {
    let source = src.map(|s| &**s);
    let target = |dest, addr, service, labels, tls| Target { source: src.cloned(), dest, addr, service, labels, tls };
    match route {
        Route::Service { service, endpoint, addr, .. } => {
            let labels = TcpLabels::new(source, Some(&endpoint), Some(&service), false);
            let tls = match cluster.and_then(|c| c.policy.tls.as_deref()) {
                None => None,
                // The client's own credentials or none: never another namespace's.
                Some(o) => match o.for_client(source.map(|s| &*s.namespace)) {
                    Ok(t) => Some((t.clone(), t.sni.clone().unwrap_or_else(|| service.hostname.to_string()))),
                    Err(why) => {
                        tracing::warn!(service = %service.key, error = %why, "TLS origination: no credentials for this client");
                        let sni = service.hostname.to_string();
                        let error = ProxyError::Tls { addr, sni, error: std::io::Error::other(why) };
                        return Err(Box::new(Refused { labels, error }));
                    }
                },
            };
            Ok(target(Some(endpoint), addr, Some(service), labels, tls))
        }
        Route::Workload { workload, addr } => {
            let labels = TcpLabels::new(source, Some(&workload), None, false);
            Ok(target(Some(workload), addr, None, labels, None))
        }
        Route::Passthrough { addr } => Ok(target(None, addr, None, TcpLabels::new(source, None, None, true), None)),
        Route::Refused { service, reason } => {
            let labels = TcpLabels::new(source, None, Some(&service), false);
            let error = ProxyError::Refused { service: service.key.clone(), reason };
            Err(Box::new(Refused { labels, error }))
        }
        Route::BlackHole { addr } => {
            Err(Box::new(Refused { labels: TcpLabels::black_hole(source), error: ProxyError::BlackHole(addr) }))
        }
    }
}

/// `DYNAMIC_DNS`: the try goes to the address the request's host resolves
/// to now (the agent's resolver, by TTL), on the routed port.
pub(super) async fn dynamic_dns(
    ctx: &Inputs,
    target: &mut Target,
    parts: &hyper::http::request::Parts,
) -> Result<(), LocalReply> {
    let dynamic = |s: &&Arc<crate::state::Service>| {
        s.external.as_ref().is_some_and(|e| e.resolution == crate::state::Resolution::DynamicDns)
    };
    let Some(service) = target.service.as_ref().filter(dynamic) else { return Ok(()) };
    // The host routing matched the entry's wildcard by.
    let host = crate::routing::http::request_host(&parts.headers).or(parts.uri.host()).unwrap_or_default();
    match ctx.dns.resolve_now(host, &service.hostname).await {
        Ok(addrs) if !addrs.is_empty() => {
            target.addr = SocketAddrV4::new(addrs[0], target.addr.port());
            Ok(())
        }
        Ok(_) => Err(LocalReply::DNS_FAILURE),
        Err(e) => {
            tracing::info!(host, error = %e, "DYNAMIC_DNS: the request's host did not resolve");
            Err(LocalReply::DNS_FAILURE)
        }
    }
}
