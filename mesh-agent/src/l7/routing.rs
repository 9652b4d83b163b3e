//! Istio's HTTP routing for mesh traffic, evaluated at the source agent:
//! `VirtualService` rules (first match wins, weighted destinations, subsets,
//! timeouts) and `DestinationRule` subsets and load balancing. A pure function
//! of the state and the request, tested with tables.
use std::{collections::BTreeMap, net::SocketAddrV4, sync::Arc, time::Duration};

use hyper::header::HeaderMap;
use serde::Serialize;

use crate::{
    route::{Refusal, Route, route, route_service},
    state::State,
};

#[derive(Debug, Clone, Serialize)]
pub struct VirtualService {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// Services (`namespace/name`) whose traffic the rules apply to.
    pub hosts: Vec<String>,
    pub http: Vec<HttpRoute>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpRoute {
    pub name: Option<String>,
    /// Any one matches; none at all matches every request.
    pub matches: Vec<HttpMatch>,
    pub routes: Vec<WeightedDestination>,
    pub timeout: Option<Duration>,
}

/// Every condition given must hold.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HttpMatch {
    pub uri: Option<StrMatch>,
    pub method: Option<StrMatch>,
    /// Lower-case header names.
    pub headers: Vec<(String, StrMatch)>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct WeightedDestination {
    /// `namespace/name` of the Service.
    pub service: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
    pub weight: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct DestinationRule {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// `namespace/name` of the Service.
    pub service: String,
    pub subsets: Vec<Subset>,
    pub load_balancer: LoadBalancer,
}

#[derive(Debug, Clone, Serialize)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub load_balancer: LoadBalancer,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    Random,
}

/// What routing looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

/// Where a request goes, and the rule's timeout.
#[derive(Debug, Clone)]
pub struct Decision {
    pub route: Route,
    pub timeout: Option<Duration>,
}

impl StrMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v == e,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
        }
    }
}

impl HttpMatch {
    fn matches(&self, req: &RequestView<'_>, port: u16) -> bool {
        // Istio's `uri` matches the path without the query string.
        let path = req.path.split('?').next().unwrap_or(req.path);
        self.uri.as_ref().is_none_or(|m| m.matches(path))
            && self.method.as_ref().is_none_or(|m| m.matches(req.method))
            && self.port.is_none_or(|p| p == port)
            && self.headers.iter().all(|(name, m)| {
                req.headers.get(name.as_str()).and_then(|v| v.to_str().ok()).is_some_and(|v| m.matches(v))
            })
    }
}

/// Routes one request to `orig` (what the client connected to). `pick` is the
/// round-robin turn, `random` a random number (weights, RANDOM balancing).
pub fn route_request(state: &State, orig: SocketAddrV4, req: &RequestView<'_>, pick: usize, random: u64) -> Decision {
    let Some(service) = state.by_vip.get(orig.ip()) else {
        return Decision { route: route(state, orig, pick), timeout: None };
    };
    let key = format!("{}/{}", service.namespace, service.name);
    let rule = state
        .virtual_services
        .iter()
        .filter(|vs| vs.hosts.contains(&key))
        .flat_map(|vs| vs.http.iter())
        .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(req, orig.port())));
    let Some(rule) = rule else {
        let lb = destination_rule(state, &key).map(|d| d.load_balancer).unwrap_or_default();
        return Decision { route: route_service(service, orig.port(), None, turn(lb, pick, random)), timeout: None };
    };
    let Some(dest) = choose(&rule.routes, random) else {
        return Decision {
            route: Route::Refused { service: service.clone(), reason: Refusal::NoRoute },
            timeout: rule.timeout,
        };
    };
    let Some(target) = state.services.get(&dest.service) else {
        return Decision {
            route: Route::Refused { service: service.clone(), reason: Refusal::NoRoute },
            timeout: rule.timeout,
        };
    };
    // The same port on the same Service; another Service's only port; else as named.
    let port = match dest.port {
        Some(p) => p,
        None if dest.service == key => orig.port(),
        None => match target.ports.as_slice() {
            [only] => only.port,
            _ => orig.port(),
        },
    };
    let dr = destination_rule(state, &dest.service);
    let (labels, lb) = match (&dest.subset, dr) {
        (None, dr) => (None, dr.map(|d| d.load_balancer).unwrap_or_default()),
        (Some(name), Some(dr)) => match dr.subsets.iter().find(|s| &s.name == name) {
            Some(s) => (Some(&s.labels), s.load_balancer),
            None => return no_subset(target, name, rule.timeout),
        },
        (Some(name), None) => return no_subset(target, name, rule.timeout),
    };
    Decision { route: route_service(target, port, labels, turn(lb, pick, random)), timeout: rule.timeout }
}

fn no_subset(target: &Arc<crate::state::Service>, name: &str, timeout: Option<Duration>) -> Decision {
    Decision { route: Route::Refused { service: target.clone(), reason: Refusal::NoSubset(name.to_owned()) }, timeout }
}

fn destination_rule<'a>(state: &'a State, service: &str) -> Option<&'a DestinationRule> {
    state.destination_rules.iter().find(|d| d.service == service)
}

fn turn(lb: LoadBalancer, pick: usize, random: u64) -> usize {
    match lb {
        LoadBalancer::RoundRobin => pick,
        LoadBalancer::Random => (random >> 16) as usize,
    }
}

/// A destination by weight (`random` spread over the total).
fn choose(routes: &[WeightedDestination], random: u64) -> Option<&WeightedDestination> {
    let total: u64 = routes.iter().map(|r| u64::from(r.weight)).sum();
    if total == 0 {
        return routes.first();
    }
    let mut x = random % total;
    for r in routes {
        if x < u64::from(r.weight) {
            return Some(r);
        }
        x -= u64::from(r.weight);
    }
    routes.last()
}

#[cfg(test)]
mod tests;
