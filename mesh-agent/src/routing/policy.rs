//! Security policy at L4, as Istio defines it: `PeerAuthentication` (which mTLS
//! mode a workload port requires) and `AuthorizationPolicy` (who may connect).
//! Validated objects live in the [`State`]; the decisions here are pure
//! functions of it, tested with tables.
use std::{collections::BTreeMap, net::Ipv4Addr};

use crate::state::security::*;
use crate::state::{ROOT_NAMESPACE, State, Workload};

/// Who is connecting, as the destination agent knows it.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// The SPIFFE ID proven by mTLS (or by capture on this node); `None` for plaintext.
    pub principal: Option<&'a str>,
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Denied, naming the policy (`ns/name`) or `no ALLOW policy matched`.
    Deny(String),
}

fn selects(selector: &Option<BTreeMap<String, String>>, w: &Workload) -> bool {
    selector.as_ref().is_none_or(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
}

/// The mTLS mode for connections to `port` (the pod's port) of `w`: the
/// workload's policy (port level first), then its namespace's, then the mesh's,
/// else PERMISSIVE.
pub fn peer_mode(state: &State, w: &Workload, port: u16) -> MtlsMode {
    let in_ns = |ns| state.peer_authentications_in(ns);
    let workload_level = in_ns(&w.namespace).filter(|p| p.selector.is_some() && selects(&p.selector, w));
    for p in workload_level {
        if let Some(m) = p.port_modes.get(&port) {
            return *m;
        }
        if let Some(m) = p.mode {
            return m;
        }
    }
    let namespace_level = in_ns(&w.namespace).filter(|p| p.selector.is_none()).find_map(|p| p.mode);
    let mesh_level = || in_ns(ROOT_NAMESPACE).filter(|p| p.selector.is_none()).find_map(|p| p.mode);
    namespace_level.or_else(mesh_level).unwrap_or(MtlsMode::Permissive)
}

/// Istio's evaluation: a matching DENY denies; else with no ALLOW policy for
/// the workload, allow; else allow only if an ALLOW policy matches.
pub fn authorize(state: &State, w: &Workload, peer: &Peer<'_>, port: u16) -> Verdict {
    // The workload's namespace's policies, then the mesh-wide ones.
    let root = (&*w.namespace != ROOT_NAMESPACE).then_some(ROOT_NAMESPACE);
    let policies = || {
        let namespaces = std::iter::once(&*w.namespace).chain(root);
        namespaces.flat_map(|ns| state.authorization_policies_in(ns)).filter(|p| selects(&p.selector, w))
    };
    if let Some(p) = policies().filter(|p| p.action == Action::Deny).find(|p| p.matches(peer, port)) {
        return Verdict::Deny(format!("{}/{}", p.namespace, p.name));
    }
    let mut allows = policies().filter(|p| p.action == Action::Allow).peekable();
    if allows.peek().is_none() {
        return Verdict::Allow;
    }
    if allows.any(|p| p.matches(peer, port)) { Verdict::Allow } else { Verdict::Deny("no ALLOW policy matched".into()) }
}

impl AuthorizationPolicy {
    /// Any rule matches. No rules: matches nothing (so an empty ALLOW denies all).
    fn matches(&self, peer: &Peer<'_>, port: u16) -> bool {
        self.rules.iter().any(|r| {
            (r.from.is_empty() || r.from.iter().any(|s| s.matches(peer)))
                && (r.to.is_empty() || r.to.iter().any(|o| o.matches(port)))
        })
    }
}

impl Source {
    fn matches(&self, peer: &Peer<'_>) -> bool {
        // Istio writes principals without the scheme: `cluster.local/ns/x/sa/y`.
        let principal = peer.principal.map(|p| p.strip_prefix("spiffe://").unwrap_or(p));
        let namespace = principal.and_then(|p| {
            let mut it = p.split('/');
            it.find(|s| *s == "ns").and_then(|_| it.next())
        });
        let any = |pats: &[Pattern], v: Option<&str>| v.is_some_and(|v| pats.iter().any(|p| p.matches(v)));
        (self.principals.is_empty() || any(&self.principals, principal))
            && (self.not_principals.is_empty() || !any(&self.not_principals, principal))
            && (self.namespaces.is_empty() || any(&self.namespaces, namespace))
            && (self.not_namespaces.is_empty() || !any(&self.not_namespaces, namespace))
            && (self.ip_blocks.is_empty() || self.ip_blocks.iter().any(|c| c.contains(peer.ip)))
            && (self.not_ip_blocks.is_empty() || !self.not_ip_blocks.iter().any(|c| c.contains(peer.ip)))
    }
}

impl Operation {
    fn matches(&self, port: u16) -> bool {
        (self.ports.is_empty() || self.ports.contains(&port)) && !self.not_ports.contains(&port)
    }
}

#[cfg(test)]
mod tests;
