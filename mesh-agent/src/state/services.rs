//! Which Service a client reaches: by address (a Kubernetes Service's, a
//! ServiceEntry's), by ServiceEntry host (exact, else the most specific
//! wildcard), each as the client's namespace sees them (`exportTo`, its own
//! namespace's entry first).
use std::{net::Ipv4Addr, sync::Arc};

use super::{Service, State};

impl Service {
    /// Whether a client in `client` sees it: a ServiceEntry's `exportTo`
    /// (its own namespace always; a client of no namespace only what is
    /// exported to all); a Kubernetes Service, always.
    pub fn visible_to(&self, client: Option<&str>) -> bool {
        let Some(to) = self.external.as_ref().and_then(|e| e.export_to.as_ref()) else { return true };
        client.is_some_and(|c| c == &*self.namespace || to.iter().any(|ns| &**ns == c))
    }
}

impl State {
    /// The Service a client in `client` reaches at `ip`: a Kubernetes
    /// Service's clusterIP, else a ServiceEntry address, the client's own
    /// namespace's entry first (Istio's rule for one host declared in several
    /// namespaces: the proxy's namespace first, then the oldest).
    ///
    /// The entry that claims the address names a host; the client sees that
    /// host as its own namespace's entry declares it, if one does (as Istio
    /// keeps one service per host for a client): another namespace's entry
    /// cannot take a host's traffic by claiming an address for it.
    pub fn service_at(&self, ip: &Ipv4Addr, client: Option<&str>) -> Option<&Arc<Service>> {
        let first = self.by_vip.get(ip)?;
        if first.external.is_none() {
            return Some(first);
        }
        let claimant = self.external_by_addr.get(ip).and_then(|list| prefer_own(list, client))?;
        self.external_for_host(&claimant.hostname, client).or(Some(claimant))
    }

    /// The ServiceEntry host `host` as a client in `client` sees it (as
    /// [`State::service_at`] chooses).
    /// A host no entry declares is taken by the most specific wildcard
    /// entry (`*.b.example.com` before `*.example.com`).
    pub fn external_for_host(&self, host: &str, client: Option<&str>) -> Option<&Arc<Service>> {
        let seen = |host: &str| self.external_by_host.get(host).and_then(|list| prefer_own(list, client));
        if let Some(s) = seen(host) {
            return Some(s);
        }
        let mut rest = host;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(s) = seen(&format!("*.{parent}")) {
                return Some(s);
            }
            rest = parent;
        }
        None
    }
}

/// Of services declaring one host or address (oldest first), the one in the
/// client's namespace, else the oldest the client sees (`exportTo`).
pub fn prefer_own<'a>(list: &'a [Arc<Service>], client: Option<&str>) -> Option<&'a Arc<Service>> {
    client.and_then(|c| list.iter().find(|s| &*s.namespace == c)).or_else(|| list.iter().find(|s| s.visible_to(client)))
}
