//! Istio's HTTP routing for mesh traffic, evaluated at the source agent:
//! `VirtualService` rules (first match wins, weighted destinations, subsets,
//! timeouts) and `DestinationRule` subsets and load balancing. A pure function
//! of the state and the request, tested with tables.
use std::{collections::BTreeMap, net::SocketAddrV4, sync::Arc, time::Duration};

use hyper::header::HeaderMap;

use super::{
    balance::{Pick, choose, choose_endpoint},
    l4::{Refusal, Route, route, route_to},
};
use crate::state::traffic::*;
use crate::state::{Service, State};

/// What routing knows of the endpoints' current state.
pub trait EndpointState {
    /// Left out by outlier detection for now.
    fn ejected(&self, cluster: &str, addr: SocketAddrV4) -> bool;
    /// Requests in flight to it (for LEAST_REQUEST).
    fn active(&self, cluster: &str, addr: SocketAddrV4) -> u32;
}

pub use super::request::RequestView;

/// Where a request goes, and the rule that sent it there (timeouts, retries,
/// faults, header changes), if a VirtualService matched.
#[derive(Debug, Clone)]
pub struct Decision {
    pub route: Route,
    pub rule: Option<Arc<HttpRoute>>,
    /// The `uri.prefix` that matched, which a `rewrite.uri` replaces.
    pub matched_prefix: Option<String>,
    /// The cluster a Service destination belongs to.
    pub cluster: Option<Cluster>,
}

impl Decision {
    pub fn timeout(&self) -> Option<Duration> {
        self.rule.as_ref().and_then(|r| r.timeout)
    }
}

impl StrMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v == e,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Regex(r) => r.is_match(v),
        }
    }
}

impl HttpMatch {
    fn matches(&self, req: &RequestView<'_>, port: u16, via: &str) -> bool {
        if !(self.gateways.is_empty() || self.gateways.iter().any(|g| g == via)) {
            return false;
        }
        // Istio's `uri` matches the path without the query string.
        let (path, query) = req.path.split_once('?').unwrap_or((req.path, ""));
        let param = |name: &str| {
            query.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == name).then_some(v)
            })
        };
        self.uri.as_ref().is_none_or(|m| m.matches(path))
            && self.query_params.iter().all(|(name, m)| param(name).is_some_and(|v| m.matches(v)))
            && self.method.as_ref().is_none_or(|m| m.matches(req.method))
            && self.port.is_none_or(|p| p == port)
            && self.headers.iter().all(|(name, m)| {
                req.headers.get(name.as_str()).and_then(|v| v.to_str().ok()).is_some_and(|v| m.matches(v))
            })
    }
}

/// Routes one request to `orig` (what the client connected to). `pick` is the
/// round-robin turn, `random` a random number (weights, RANDOM and
/// LEAST_REQUEST balancing); `endpoints` tells which endpoints outlier
/// detection has left out and how loaded they are.
pub fn route_request(
    state: &State,
    orig: SocketAddrV4,
    req: &RequestView<'_>,
    pick: usize,
    random: u64,
    endpoints: &dyn EndpointState,
) -> Decision {
    // A Service VIP, else a ServiceEntry host named by the request.
    let service = state.service_for(orig, req.namespace).or_else(|| {
        let host = request_host(req.headers)?;
        state.external_on_port(host, orig.port(), req.namespace)
    });
    let Some(service) = service else {
        let route = route(state, orig, req.namespace, pick);
        return Decision { route, rule: None, matched_prefix: None, cluster: None };
    };
    let key = &service.key;
    // The first rule with a matching condition (no condition matches all), and
    // the condition that matched.
    let found = first_rule(mesh_routes_for(state, service, req.namespace), req, orig.port(), MESH);
    let Some((rule, matched)) = found else {
        let dr = state.destination_rule(key, req.namespace);
        let at = dr.map(|d| (d.policy_on(None, orig.port()), cluster_suffix(d, key)));
        let (policy, key) = match at {
            Some(((p, true), rule)) => (p.clone(), format!("{key}{rule}|{}", orig.port())),
            Some(((p, false), rule)) => (p.clone(), format!("{key}{rule}")),
            None => (Policy::default(), key.clone()),
        };
        let avoid = |a: SocketAddrV4| endpoints.ejected(&key, a);
        let active = |a: SocketAddrV4| endpoints.active(&key, a);
        let how = choose_endpoint(&policy.load_balancer, req, pick, random, &active);
        let route = route_to(service, orig, orig.port(), None, how, &avoid);
        let endpoints = count_endpoints(service, None);
        let cluster = Some(Cluster { key, policy, endpoints });
        return Decision { route, rule: None, matched_prefix: None, cluster };
    };
    let chosen = Chosen { rule, matched, from: key, orig, port: orig.port(), pick, random };
    follow_rule(state, chosen, Some(service), req, endpoints)
}

/// Routes one request that arrived at a Gateway listener on `port`, as Envoy
/// routes Istio's merged route table for the port: the VirtualServices bound
/// to one of `gateways` (`namespace/name`) whose server on the port lets
/// their namespace take the request's host; of those, the ones whose host
/// is the most specific match (an exact name before a wildcard); their rules
/// merged oldest VirtualService first, whichever Gateway they are bound to.
/// On a connection whose TLS handshake chose a server (`bound`), only that
/// server's Gateway and hosts are considered. `None`: nothing matches (404).
#[expect(clippy::too_many_arguments, reason = "the request's parts, each a plain input of the decision")]
pub fn route_gateway(
    state: &State,
    gateways: &[String],
    bound: Option<&super::sni::BoundServer>,
    orig: SocketAddrV4,
    req: &RequestView<'_>,
    pick: usize,
    random: u64,
    endpoints: &dyn EndpointState,
) -> Option<(Decision, String)> {
    let host = request_host(req.headers).unwrap_or("");
    let gateways = match bound {
        Some(b) => std::slice::from_ref(&b.gateway),
        None => gateways,
    };
    let mut found = Vec::new();
    for gw in gateways {
        let Some(g) = state.gateway(gw) else { continue };
        let takes = |vs: &VirtualService| match bound {
            Some(b) => b.hosts.iter().any(|h| h.allows(&vs.namespace) && host_matches(&h.host, host)),
            None => serves(g, orig.port(), Some(host), &vs.namespace),
        };
        found.extend(
            state
                .gateway_routes_ordered(gw)
                .filter(|(_, vs)| !vs.http.is_empty() && vs.visible_in(&g.namespace) && takes(vs))
                .filter_map(|(i, vs)| Some((i, best_host(vs, host)?, vs, g, gw))),
        );
    }
    let best = found.iter().map(|f| f.1).min_by_key(|p| super::sni::specificity(p))?;
    // Oldest first; a VirtualService bound to two of the port's Gateways
    // counts once, through the first.
    found.retain(|f| f.1.eq_ignore_ascii_case(best));
    found.sort_by_key(|f| f.0);
    found.dedup_by_key(|f| f.0);
    let (rule, matched, g, gw) = found.iter().find_map(|&(_, _, vs, g, gw)| {
        let (rule, matched) = first_rule(std::iter::once(vs), req, orig.port(), gw)?;
        Some((rule, matched, g, gw))
    })?;
    let chosen = Chosen { rule, matched, from: "", orig, port: orig.port(), pick, random };
    // The gateway is the client: its namespace chooses the DestinationRule.
    let req = RequestView { namespace: Some(&g.namespace), ..*req };
    Some((follow_rule(state, chosen, None, &req, endpoints), gw.clone()))
}

/// The most specific of a VirtualService's hosts that matches `host`.
fn best_host<'a>(vs: &'a VirtualService, host: &str) -> Option<&'a str> {
    let matching = vs.host_patterns.iter().filter(|p| host_matches(p, host));
    matching.min_by_key(|p| super::sni::specificity(p)).map(String::as_str)
}

/// Where an HTTP request to a gateway goes instead, when the server that
/// takes its host on this port says `httpsRedirect`: the same host (without
/// the port) and path, over HTTPS (Envoy's `https_redirect`, a 301).
pub fn https_redirect(state: &State, gateways: &[String], port: u16, req: &RequestView<'_>) -> Option<String> {
    let host = request_host(req.headers)?;
    let servers = gateways.iter().filter_map(|gw| state.gateway(gw)).flat_map(|g| &g.servers);
    let server = servers.filter(|s| s.port == port).find(|s| s.hosts.iter().any(|h| host_matches(&h.host, host)))?;
    server.https_redirect.then(|| format!("https://{host}{}", req.path))
}

/// Whether a server of Gateway `g` on `port` lists a host that matches
/// `host` (any, for TCP) and lets VirtualServices of `namespace` bind it.
fn serves(g: &crate::state::Gateway, port: u16, host: Option<&str>, namespace: &str) -> bool {
    g.servers
        .iter()
        .filter(|s| s.port == port)
        .flat_map(|s| &s.hosts)
        .any(|h| h.allows(namespace) && host.is_none_or(|host| host_matches(&h.host, host)))
}

/// The request's host, without a port: `:authority` (HTTP/2) or `Host`.
pub fn request_host(headers: &HeaderMap) -> Option<&str> {
    let h = headers.get(hyper::header::HOST)?.to_str().ok()?;
    Some(match h.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => h,
    })
}

/// The first http rule of `vss` with a condition matching on `port` through
/// `via` (`mesh` or a gateway), and the condition.
fn first_rule<'a>(
    vss: impl Iterator<Item = &'a VirtualService>,
    req: &RequestView<'_>,
    port: u16,
    via: &str,
) -> Option<(&'a Arc<HttpRoute>, Option<&'a HttpMatch>)> {
    vss.flat_map(|vs| vs.http.iter()).find_map(|r| {
        if r.matches.is_empty() {
            return Some((r, None));
        }
        r.matches.iter().find(|m| m.matches(req, port, via)).map(|m| (r, Some(m)))
    })
}

/// A rule that matched, and what it matched.
struct Chosen<'a> {
    rule: &'a Arc<HttpRoute>,
    matched: Option<&'a HttpMatch>,
    /// The Service asked for (`namespace/name`), empty at a gateway.
    from: &'a str,
    orig: SocketAddrV4,
    port: u16,
    pick: usize,
    random: u64,
}

/// Where a matched rule sends the request.
fn follow_rule(
    state: &State,
    c: Chosen<'_>,
    asked: Option<&Arc<Service>>,
    req: &RequestView<'_>,
    endpoints: &dyn EndpointState,
) -> Decision {
    let matched_prefix = c.matched.and_then(|m| match m.uri.as_ref()? {
        StrMatch::Prefix(p) => Some(p.clone()),
        _ => None,
    });
    let dest = choose(&c.rule.routes, c.random);
    let refused = |reason| {
        let service = asked.or_else(|| dest.and_then(|d| state.services.get(&d.service)));
        Decision {
            route: match service {
                Some(s) => Route::Refused { service: s.clone(), reason },
                None => Route::BlackHole { addr: c.orig },
            },
            rule: Some(c.rule.clone()),
            matched_prefix: matched_prefix.clone(),
            cluster: None,
        }
    };
    let Some(dest) = dest else {
        return refused(Refusal::NoRoute);
    };
    let (target, port, labels, policy, cluster_key) = match resolve(state, req.namespace, c.from, dest, c.port) {
        Ok(r) => r,
        Err(reason) => return refused(reason),
    };
    let avoid = |a: SocketAddrV4| endpoints.ejected(&cluster_key, a);
    let active = |a: SocketAddrV4| endpoints.active(&cluster_key, a);
    let how = choose_endpoint(&policy.load_balancer, req, c.pick, c.random, &active);
    let route = route_to(target, c.orig, port, labels, how, &avoid);
    let endpoints = count_endpoints(target, labels);
    Decision {
        route,
        rule: Some(c.rule.clone()),
        matched_prefix,
        cluster: Some(Cluster { key: cluster_key, policy, endpoints }),
    }
}

/// A destination resolved: the Service, its port, the subset's labels, the
/// policy that applies, and the cluster key.
type Resolved<'a> = (&'a Arc<Service>, u16, Option<&'a BTreeMap<String, String>>, Policy, String);

/// Resolves a destination of a rule for a request to Service `from` on `port`
/// by a client in namespace `client`: the same port on the same Service, else
/// another Service's only port, else the port as named; the subset from the
/// DestinationRule that applies to that client.
pub fn resolve<'a>(
    state: &'a State,
    client: Option<&str>,
    from: &str,
    dest: &WeightedDestination,
    port: u16,
) -> Result<Resolved<'a>, Refusal> {
    let target = state.services.get(&dest.service).ok_or(Refusal::NoRoute)?;
    let port = match dest.port {
        Some(p) => p,
        None if dest.service == from => port,
        None => match target.ports.as_slice() {
            [only] => only.port,
            _ => port,
        },
    };
    let dr = state.destination_rule(&dest.service, client);
    let subset = match &dest.subset {
        None => None,
        Some(name) => Some(dr.and_then(|d| d.subset(name)).ok_or_else(|| Refusal::NoSubset(name.clone()))?),
    };
    let (policy, own) = match dr {
        Some(dr) => dr.policy_on(subset, port),
        None => (&Policy::default(), false),
    };
    let (policy, labels) = (policy.clone(), subset.map(|s| &s.labels));
    // A port with a policy of its own is a cluster of its own (as Envoy's
    // clusters are per port): its pool and ejections are not another port's.
    let mut key = match &dest.subset {
        Some(name) => format!("{}|{name}", dest.service),
        None => dest.service.clone(),
    };
    if let Some(dr) = dr {
        key.push_str(&cluster_suffix(dr, &dest.service));
    }
    if own {
        key = format!("{key}|{port}");
    }
    Ok((target, port, labels, policy, key))
}

/// The mesh VirtualServices for `service` that apply to a client in
/// `client`, in Istio's lookup order: those of the client's own namespace,
/// else the Service's namespace's, else the root namespace's, each exported
/// to the client (oldest first within the namespace). A VirtualService of
/// any other namespace never changes the client's traffic.
fn mesh_routes_for<'a>(
    state: &'a State,
    service: &'a Service,
    client: Option<&'a str>,
) -> impl Iterator<Item = &'a VirtualService> + 'a {
    let visible = move |vs: &VirtualService| client.map_or(vs.export_to.is_none(), |ns| vs.visible_in(ns));
    let order = [client, Some(&*service.namespace), Some(crate::state::ROOT_NAMESPACE)];
    let ns = order
        .into_iter()
        .flatten()
        .find(|ns| state.mesh_routes(&service.key).any(|vs| &*vs.namespace == *ns && visible(vs)));
    state.mesh_routes(&service.key).filter(move |vs| ns.is_some_and(|ns| &*vs.namespace == ns) && visible(vs))
}

/// What a cluster key carries of the DestinationRule that made it: nothing
/// for the Service's own namespace's rule, else `@namespace/name`, so that
/// clients under another namespace's rule never share its pools, limits or
/// ejections.
fn cluster_suffix(dr: &DestinationRule, service: &str) -> String {
    match service.split_once('/') {
        Some((ns, _)) if ns == &*dr.namespace => String::new(),
        _ => format!("@{}/{}", dr.namespace, dr.name),
    }
}

/// Routes a TCP connection to a Service VIP by the first matching `tcp` rule of
/// its VirtualServices; `None` when no rule applies (the default route then).
pub fn route_tcp(
    state: &State,
    orig: SocketAddrV4,
    from_namespace: Option<&str>,
    pick: usize,
    random: u64,
) -> Option<Route> {
    let service = state.service_for(orig, from_namespace)?;
    let key = &service.key;
    let rule = mesh_routes_for(state, service, from_namespace)
        .flat_map(|vs| vs.tcp.iter())
        .find(|r| r.ports.is_empty() || r.ports.iter().any(|p| p.is_none_or(|p| p == orig.port())))?;
    let dest = choose(&rule.routes, random)?;
    Some(match resolve(state, from_namespace, key, dest, orig.port()) {
        Ok((target, port, labels, _, _)) => route_to(target, orig, port, labels, Pick::Turn(pick), &|_| false),
        Err(reason) => Route::Refused { service: service.clone(), reason },
    })
}

/// Routes a connection that arrived at a Gateway's TCP server by the first
/// `tcp` rule, for the port, of the VirtualServices bound to one of `gateways`.
pub fn route_gateway_tcp(
    state: &State,
    gateways: &[String],
    orig: SocketAddrV4,
    pick: usize,
    random: u64,
) -> Option<(Route, String)> {
    gateways.iter().find_map(|gw| {
        let g = state.gateway(gw)?;
        let rule = state
            .gateway_routes(gw)
            .filter(|vs| vs.visible_in(&g.namespace) && serves(g, orig.port(), None, &vs.namespace))
            .flat_map(|vs| vs.tcp.iter())
            .find(|r| r.ports.is_empty() || r.ports.iter().any(|p| p.is_none_or(|p| p == orig.port())))?;
        let dest = choose(&rule.routes, random)?;
        Some((route_at_gateway(state, g, dest, orig, pick), gw.clone()))
    })
}

/// Where a gateway's TCP or TLS rule destination sends a connection to `orig`.
fn route_at_gateway(
    state: &State,
    gateway: &crate::state::Gateway,
    dest: &WeightedDestination,
    orig: SocketAddrV4,
    pick: usize,
) -> Route {
    match resolve(state, Some(&gateway.namespace), "", dest, orig.port()) {
        Ok((target, port, labels, _, _)) => route_to(target, orig, port, labels, Pick::Turn(pick), &|_| false),
        Err(reason) => match state.services.get(&dest.service) {
            Some(s) => Route::Refused { service: s.clone(), reason },
            None => Route::BlackHole { addr: orig },
        },
    }
}

/// Routes a TLS connection at a Gateway's PASSTHROUGH server by its SNI: the
/// first `tls` rule, of the VirtualServices bound to one of `gateways`, with a
/// match for the SNI and port.
/// A mesh `tls` rule for a connection to `orig` whose ClientHello names
/// `sni`: of the Service addressed, else of the ServiceEntry host the name
/// is under; the first rule whose match has the port and a host pattern
/// covering the name (Istio's `tls` routes, at the source agent).
pub fn route_tls(
    state: &State,
    orig: SocketAddrV4,
    sni: &str,
    from_namespace: Option<&str>,
    pick: usize,
    random: u64,
) -> Option<Route> {
    let service =
        state.service_for(orig, from_namespace).or_else(|| state.external_on_port(sni, orig.port(), from_namespace))?;
    let rule = mesh_routes_for(state, service, from_namespace).flat_map(|vs| vs.tls.iter()).find(|r| {
        r.matches.iter().any(|m| {
            (m.gateways.is_empty() || m.gateways.iter().any(|g| g == MESH))
                && m.port.is_none_or(|p| p == orig.port())
                && m.sni_hosts.iter().any(|h| host_matches(h, sni))
        })
    })?;
    let dest = choose(&rule.routes, random)?;
    Some(match resolve(state, from_namespace, &service.key, dest, orig.port()) {
        Ok((target, port, labels, _, _)) => route_to(target, orig, port, labels, Pick::Turn(pick), &|_| false),
        Err(reason) => Route::Refused { service: service.clone(), reason },
    })
}

/// Whether a mesh VirtualService of `service` (as a client in
/// `from_namespace` sees them) has `tls` rules: its connections' server
/// names are then read.
pub fn has_mesh_tls(state: &State, service: &Service, from_namespace: Option<&str>) -> bool {
    mesh_routes_for(state, service, from_namespace).any(|vs| !vs.tls.is_empty())
}

pub fn route_gateway_tls(
    state: &State,
    gateways: &[String],
    orig: SocketAddrV4,
    sni: &str,
    pick: usize,
    random: u64,
) -> Option<(Route, String)> {
    gateways.iter().find_map(|gw| {
        let g = state.gateway(gw)?;
        // Only a VirtualService that the server the SNI names lets bind it:
        // another namespace's rule cannot take over a host it was not given.
        let allowed = state
            .gateway_routes(gw)
            .filter(|vs| vs.visible_in(&g.namespace) && serves(g, orig.port(), Some(sni), &vs.namespace));
        let rule = allowed.flat_map(|vs| vs.tls.iter()).find(|r| {
            r.matches.iter().any(|m| {
                (m.gateways.is_empty() || m.gateways.iter().any(|g| g == gw))
                    && m.port.is_none_or(|p| p == orig.port())
                    && m.sni_hosts.iter().any(|h| host_matches(h, sni))
            })
        })?;
        let dest = choose(&rule.routes, random)?;
        Some((route_at_gateway(state, g, dest, orig, pick), gw.clone()))
    })
}

/// Ready endpoints of a Service (in a subset), for the ejection limit.
fn count_endpoints(service: &crate::state::Service, labels: Option<&BTreeMap<String, String>>) -> usize {
    service
        .current_endpoints()
        .iter()
        .filter(|w| w.ready && labels.is_none_or(|l| l.iter().all(|(k, v)| w.labels.get(k) == Some(v))))
        .count()
}

/// The path after `rewrite.uri`: the matched prefix replaced, else the whole
/// path; the query string kept.
pub fn rewrite_path(path_and_query: &str, matched_prefix: Option<&str>, uri: &str) -> String {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let new = match matched_prefix.and_then(|p| path.strip_prefix(p)) {
        Some(rest) => format!("{uri}{rest}"),
        None => uri.to_owned(),
    };
    match query {
        Some(q) => format!("{new}?{q}"),
        None => new,
    }
}

#[cfg(test)]
mod tests;
