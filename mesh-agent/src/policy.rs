//! Security policy at L4, as Istio defines it: `PeerAuthentication` (which mTLS
//! mode a workload port requires) and `AuthorizationPolicy` (who may connect).
//! Validated objects live in the [`State`]; the decisions here are pure
//! functions of it, tested with tables.
use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use serde::Serialize;

use crate::{
    identity::ROOT_NAMESPACE,
    state::{State, Workload},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Only mTLS (HBONE) connections are admitted.
    Strict,
    /// mTLS and plaintext are both admitted (Istio's default).
    Permissive,
    /// As PERMISSIVE for plaintext arriving at the node; mesh traffic between
    /// agents stays mTLS (as in Istio ambient, where the tunnel is always mTLS).
    Disable,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerAuthentication {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// `spec.selector.matchLabels`; `None` applies to the whole namespace.
    pub selector: Option<BTreeMap<String, String>>,
    /// `None` is UNSET: inherit from the namespace, then the mesh.
    pub mode: Option<MtlsMode>,
    pub port_modes: BTreeMap<u16, MtlsMode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuthorizationPolicy {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    pub rules: Vec<Rule>,
}

/// Matches when any `from` matches (or there is none) and any `to` matches (or
/// there is none).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
}

/// Every non-empty field must match.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Source {
    pub principals: Vec<Pattern>,
    pub not_principals: Vec<Pattern>,
    pub namespaces: Vec<Pattern>,
    pub not_namespaces: Vec<Pattern>,
    pub ip_blocks: Vec<Cidr>,
    pub not_ip_blocks: Vec<Cidr>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

/// Who is connecting, as the destination agent knows it.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// The SPIFFE ID proven by mTLS (or by capture on this node); `None` for plaintext.
    pub principal: Option<&'a str>,
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied, naming the policy (`ns/name`) or `no ALLOW policy matched`.
    Deny(String),
}

// === impl Pattern ===

impl Pattern {
    pub fn parse(s: &str) -> Pattern {
        if s == "*" {
            Pattern::Any
        } else if let Some(p) = s.strip_suffix('*') {
            Pattern::Prefix(p.to_owned())
        } else if let Some(p) = s.strip_prefix('*') {
            Pattern::Suffix(p.to_owned())
        } else {
            Pattern::Exact(s.to_owned())
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Exact(e) => v == e,
            Pattern::Prefix(p) => v.starts_with(p.as_str()),
            Pattern::Suffix(s) => v.ends_with(s.as_str()),
            Pattern::Any => true,
        }
    }
}

// === impl Cidr ===

impl Cidr {
    /// `a.b.c.d` or `a.b.c.d/n`.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, p.parse::<u8>().map_err(|_| format!("{s:?}: bad prefix length"))?),
            None => (s, 32),
        };
        let addr: Ipv4Addr = ip.parse().map_err(|_| format!("{s:?} is not an IPv4 address or CIDR"))?;
        if prefix > 32 {
            return Err(format!("{s:?}: prefix length above 32"));
        }
        Ok(Cidr { addr, prefix })
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

fn selects(selector: &Option<BTreeMap<String, String>>, w: &Workload) -> bool {
    selector.as_ref().is_none_or(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
}

/// Whether a policy in `namespace` with `selector` applies to `w`: its own
/// namespace, or mesh-wide from the root namespace.
fn applies(namespace: &str, selector: &Option<BTreeMap<String, String>>, w: &Workload) -> bool {
    (namespace == &*w.namespace || namespace == ROOT_NAMESPACE) && selects(selector, w)
}

/// The mTLS mode for connections to `port` (the pod's port) of `w`: the
/// workload's policy (port level first), then its namespace's, then the mesh's,
/// else PERMISSIVE.
pub fn peer_mode(state: &State, w: &Workload, port: u16) -> MtlsMode {
    fn in_ns<'a>(state: &'a State, ns: &'a str) -> impl Iterator<Item = &'a PeerAuthentication> {
        state.peer_authentications.iter().filter(move |p| &*p.namespace == ns)
    }
    let workload_level = in_ns(state, &w.namespace).filter(|p| p.selector.is_some() && selects(&p.selector, w));
    for p in workload_level {
        if let Some(m) = p.port_modes.get(&port) {
            return *m;
        }
        if let Some(m) = p.mode {
            return m;
        }
    }
    let namespace_level = in_ns(state, &w.namespace).filter(|p| p.selector.is_none()).find_map(|p| p.mode);
    let mesh_level = || in_ns(state, ROOT_NAMESPACE).filter(|p| p.selector.is_none()).find_map(|p| p.mode);
    namespace_level.or_else(mesh_level).unwrap_or(MtlsMode::Permissive)
}

/// Istio's evaluation: a matching DENY denies; else with no ALLOW policy for
/// the workload, allow; else allow only if an ALLOW policy matches.
pub fn authorize(state: &State, w: &Workload, peer: &Peer<'_>, port: u16) -> Decision {
    let policies = || state.authorization_policies.iter().filter(|p| applies(&p.namespace, &p.selector, w));
    if let Some(p) = policies().filter(|p| p.action == Action::Deny).find(|p| p.matches(peer, port)) {
        return Decision::Deny(format!("{}/{}", p.namespace, p.name));
    }
    let mut allows = policies().filter(|p| p.action == Action::Allow).peekable();
    if allows.peek().is_none() {
        return Decision::Allow;
    }
    if allows.any(|p| p.matches(peer, port)) {
        Decision::Allow
    } else {
        Decision::Deny("no ALLOW policy matched".into())
    }
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
