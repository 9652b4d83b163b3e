//! Endpoints that come from DNS (ServiceEntry `resolution: DNS` and
//! `DNS_ROUND_ROBIN`): the names to resolve and what they resolve to now.
//! The model is built without waiting for any answer; the agent's resolver
//! (`dns`) writes each answer here as it arrives, and routing reads
//! [`super::Service::current_endpoints`].
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{Arc, RwLock},
};

use serde::Serialize;

use super::{Service, Workload};

/// Names to resolve, each with the labels of the endpoints it gives.
pub type DnsNames = Vec<(Arc<str>, BTreeMap<String, String>)>;

/// One Service's names and their current endpoints.
#[derive(Debug)]
pub struct DnsEndpoints {
    /// The names, each with its endpoint's labels: the entry's
    /// `endpoints[].address` names, or the host itself when it lists none.
    pub names: DnsNames,
    /// Endpoints given as addresses (there whatever DNS says).
    pub fixed: Vec<Arc<Workload>>,
    pub namespace: Arc<str>,
    /// `DNS_ROUND_ROBIN`: only the first address of each answer (Envoy's
    /// `LOGICAL_DNS`, as Istio configures it); `DNS`: all of them (`STRICT_DNS`).
    pub first_only: bool,
    current: RwLock<Arc<[Arc<Workload>]>>,
}

impl DnsEndpoints {
    pub fn new(names: DnsNames, fixed: Vec<Arc<Workload>>, namespace: Arc<str>, first_only: bool) -> Self {
        let current = RwLock::new(fixed.clone().into());
        DnsEndpoints { names, fixed, namespace, first_only, current }
    }

    /// The endpoints now: the fixed ones, then each name's addresses.
    pub fn current(&self) -> Arc<[Arc<Workload>]> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Sets the endpoints from `answer` (a name's last good addresses, if
    /// any); whether they changed. An address two names share is one endpoint.
    pub fn update(&self, answer: &dyn Fn(&str) -> Option<Arc<[Ipv4Addr]>>) -> bool {
        let mut next: Vec<Arc<Workload>> = self.fixed.clone();
        for (name, labels) in &self.names {
            let Some(addrs) = answer(name) else { continue };
            let take = if self.first_only { 1 } else { addrs.len() };
            for ip in addrs.iter().take(take) {
                if !next.iter().any(|w| w.ip == Some(*ip)) {
                    next.push(Arc::new(Workload::outside(&self.namespace, Some(*ip), labels.clone())));
                }
            }
        }
        let mut current = self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let same =
            current.len() == next.len() && current.iter().zip(&next).all(|(a, b)| a.ip == b.ip && a.labels == b.labels);
        if !same {
            *current = next.into();
        }
        !same
    }
}

impl Serialize for DnsEndpoints {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut st = s.serialize_struct("DnsEndpoints", 2)?;
        st.serialize_field("names", &self.names.iter().map(|(n, _)| n).collect::<Vec<_>>())?;
        st.serialize_field("addresses", &self.current().iter().filter_map(|w| w.ip).collect::<Vec<_>>())?;
        st.end()
    }
}

/// A Service's endpoints as routing sees them now.
pub enum Endpoints<'a> {
    Fixed(&'a [Arc<Workload>]),
    Resolved(Arc<[Arc<Workload>]>),
}

impl std::ops::Deref for Endpoints<'_> {
    type Target = [Arc<Workload>];

    fn deref(&self) -> &Self::Target {
        match self {
            Endpoints::Fixed(e) => e,
            Endpoints::Resolved(e) => e,
        }
    }
}

impl Service {
    /// The endpoints to balance over now: a DNS entry's latest answers, else
    /// the configured endpoints.
    pub fn current_endpoints(&self) -> Endpoints<'_> {
        match &self.dns {
            Some(d) => Endpoints::Resolved(d.current()),
            None => Endpoints::Fixed(&self.endpoints),
        }
    }
}

impl Workload {
    /// An endpoint outside the mesh: no identity, reported as `unknown`.
    pub fn outside(namespace: &Arc<str>, ip: Option<Ipv4Addr>, labels: BTreeMap<String, String>) -> Workload {
        let unknown: Arc<str> = "unknown".into();
        Workload {
            name: ip.map_or_else(|| unknown.clone(), |ip| ip.to_string().into()),
            namespace: namespace.clone(),
            workload_name: unknown.clone(),
            app: unknown.clone(),
            version: unknown.clone(),
            canonical_service: unknown.clone(),
            canonical_revision: unknown.clone(),
            labels,
            node: None,
            service_account: unknown.clone(),
            principal: unknown,
            ip,
            host_network: false,
            meshed: false,
            gateway: false,
            gateway_class: None,
            ready: true,
            named_ports: BTreeMap::new(),
            probe_ports: Default::default(),
            dns_capture: false,
            uid: None,
        }
    }
}
