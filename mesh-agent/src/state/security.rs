//! Security policy as admitted: `PeerAuthentication` (which mTLS mode a
//! workload port requires) and `AuthorizationPolicy` (who may connect). Plain
//! data with its matching primitives; the decisions are in
//! [`crate::routing::policy`].
use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use serde::Serialize;

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

    pub fn matches(&self, v: &str) -> bool {
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

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}
