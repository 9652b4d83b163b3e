//! Lookups built once per snapshot, so that a connection or a request finds
//! its rules and policies without scanning every object and without
//! allocating a key: VirtualServices by the Service they route (mesh) and by
//! the Gateway they are bound to, each Service's DestinationRule, security
//! policies by namespace, Gateways by `namespace/name`. Each list keeps the
//! snapshot's order (the order Istio's "first match wins" rules need).
use std::{collections::HashMap, sync::Arc};

use super::{
    State,
    security::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication},
    traffic::{DestinationRule, MESH, VirtualService},
};

#[derive(Debug, Default)]
pub struct Index {
    mesh_routes: HashMap<String, Vec<usize>>,
    gateway_routes: HashMap<String, Vec<usize>>,
    destination_rules: HashMap<String, Vec<usize>>,
    peer_authentications: HashMap<Arc<str>, Vec<usize>>,
    authorization_policies: HashMap<Arc<str>, Vec<usize>>,
    request_authentications: HashMap<Arc<str>, Vec<usize>>,
    gateways: HashMap<String, usize>,
    /// Gateway pods by their identity (one of each).
    gateway_pods: HashMap<Arc<str>, Arc<super::Workload>>,
    /// The Services that select a pod, by its IP.
    services_of: HashMap<std::net::Ipv4Addr, Vec<Arc<super::Service>>>,
    /// What the Telemetries make of a pod's reporting, by its IP (pods no
    /// Telemetry applies to are left out).
    telemetry: HashMap<std::net::Ipv4Addr, super::telemetry::TelemetryPolicy>,
    /// The policy of a pod no Telemetry applies to (MeshConfig's tracing).
    default_telemetry: super::telemetry::TelemetryPolicy,
    /// For traffic to a Service a Telemetry is attached to (`targetRefs`):
    /// its endpoints' policies, by pod IP and the Service's hostname.
    telemetry_by_service: HashMap<std::net::Ipv4Addr, Vec<(Arc<str>, super::telemetry::TelemetryPolicy)>>,
    /// The ports ServiceEntry hosts list (a connection there to an address
    /// nobody declared has its TLS server name read).
    external_ports: std::collections::HashSet<u16>,
    /// The ServiceEntry hosts whose endpoints DNS gives.
    dns_services: Vec<Arc<super::Service>>,
}

impl State {
    /// Builds the indexes; called once the snapshot's objects are in place.
    pub fn build_index(&mut self) {
        let mut index = Index::default();
        for (i, vs) in self.virtual_services.iter().enumerate() {
            for g in &vs.gateways {
                if g == MESH {
                    for host in &vs.hosts {
                        push_once(index.mesh_routes.entry(host.clone()).or_default(), i);
                    }
                } else {
                    push_once(index.gateway_routes.entry(g.clone()).or_default(), i);
                }
            }
        }
        for (i, dr) in self.destination_rules.iter().enumerate() {
            index.destination_rules.entry(dr.service.clone()).or_default().push(i);
        }
        for (i, p) in self.peer_authentications.iter().enumerate() {
            index.peer_authentications.entry(p.namespace.clone()).or_default().push(i);
        }
        for (i, p) in self.authorization_policies.iter().enumerate() {
            index.authorization_policies.entry(p.namespace.clone()).or_default().push(i);
        }
        for (i, p) in self.request_authentications.iter().enumerate() {
            index.request_authentications.entry(p.namespace.clone()).or_default().push(i);
        }
        for (i, g) in self.gateways.iter().enumerate() {
            index.gateways.entry(format!("{}/{}", g.namespace, g.name)).or_insert(i);
        }
        // What applies to a pod no Telemetry selects (MeshConfig's tracing).
        let [client, server] = super::trace::resolve(&self.tracing, std::iter::empty());
        let mut default = super::telemetry::TelemetryPolicy::default();
        (default.client.trace, default.server.trace) = (client, server);
        if !self.telemetries.is_empty() {
            // By pod IP: a host-network pod's is the node's, which its host
            // clients share; such pods are not in the mesh either.
            for w in self.workloads.values().filter(|w| !w.host_network) {
                let policy = super::telemetry::resolve(&self.telemetries, &self.tracing, w, None);
                if let (Some(ip), false) = (w.ip, policy == default) {
                    index.telemetry.insert(ip, policy);
                }
            }
            let attached =
                self.telemetries.iter().flat_map(|t| t.services.iter().map(|s| format!("{}/{s}", t.namespace)));
            for svc in attached.collect::<std::collections::BTreeSet<_>>().iter().filter_map(|k| self.services.get(k)) {
                for w in svc.endpoints.iter().filter(|w| !w.host_network) {
                    let Some(ip) = w.ip else { continue };
                    let policy = super::telemetry::resolve(&self.telemetries, &self.tracing, w, Some(svc));
                    if policy != *index.telemetry.get(&ip).unwrap_or(&default) {
                        index.telemetry_by_service.entry(ip).or_default().push((svc.hostname.clone(), policy));
                    }
                }
            }
        }
        index.default_telemetry = default;
        for w in self.workloads.values().filter(|w| w.gateway) {
            index.gateway_pods.entry(w.principal.clone()).or_insert_with(|| w.clone());
        }
        for svc in self.services.values().filter(|s| s.external.is_none()) {
            for ip in svc.endpoints.iter().filter_map(|w| w.ip) {
                index.services_of.entry(ip).or_default().push(svc.clone());
            }
        }
        index.external_ports =
            self.external_by_host.values().flatten().flat_map(|s| s.ports.iter().map(|p| p.port)).collect();
        index.dns_services = self.services.values().filter(|s| s.dns.is_some()).cloned().collect();
        self.index = index;
    }

    /// The Gateways that select the gateway pod `pod` (oldest first).
    /// The Service a client in `client` reaches at `dst`: a Service address
    /// ([`State::service_at`]), else the ServiceEntry whose range holds the
    /// address with the longest prefix among those with a port `dst.port()`
    /// (as Envoy picks a filter chain by destination port, then the most
    /// specific destination range), the client's own namespace's first.
    pub fn service_for(&self, dst: std::net::SocketAddrV4, client: Option<&str>) -> Option<&Arc<super::Service>> {
        if let Some(s) = self.service_at(dst.ip(), client) {
            return Some(s);
        }
        let has_port = |s: &&Arc<super::Service>| s.ports.iter().any(|p| p.port == dst.port());
        self.external_by_range.iter().filter(|(range, _)| range.contains(*dst.ip())).find_map(|(_, list)| {
            let own = client.and_then(|c| list.iter().filter(has_port).find(|s| &*s.namespace == c));
            own.or_else(|| list.iter().filter(has_port).find(|s| s.visible_to(client)))
        })
    }

    /// The ServiceEntry host `host` (exact, else the most specific wildcard)
    /// with a port `port`, as a client in `client` sees it.
    pub fn external_on_port(&self, host: &str, port: u16, client: Option<&str>) -> Option<&Arc<super::Service>> {
        self.external_for_host(host, client).filter(|s| s.ports.iter().any(|p| p.port == port))
    }

    /// Whether some ServiceEntry host lists `port` (a connection there to an
    /// address nobody declared may name one by TLS SNI).
    pub fn external_port(&self, port: u16) -> bool {
        self.index.external_ports.contains(&port)
    }

    pub fn gateways_of<'a>(&'a self, pod: &'a super::Workload) -> impl Iterator<Item = &'a Arc<super::Gateway>> {
        let selects = |g: &&Arc<super::Gateway>| {
            g.selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
                && (!g.own_namespace || g.namespace == pod.namespace)
        };
        self.gateways.iter().filter(move |_| pod.gateway).filter(selects)
    }

    /// A gateway pod that runs as `principal`.
    pub fn gateway_pod_of(&self, principal: &str) -> Option<&Arc<super::Workload>> {
        self.index.gateway_pods.get(principal)
    }

    /// The VirtualServices bound to `mesh` that route the Service `namespace/name`.
    pub fn mesh_routes<'a>(&'a self, service: &str) -> impl Iterator<Item = &'a VirtualService> {
        let found = self.index.mesh_routes.get(service).map(Vec::as_slice).unwrap_or_default();
        found.iter().map(|&i| &self.virtual_services[i])
    }

    /// The VirtualServices bound to the Gateway `namespace/name`.
    pub fn gateway_routes<'a>(&'a self, gateway: &str) -> impl Iterator<Item = &'a VirtualService> {
        let found = self.index.gateway_routes.get(gateway).map(Vec::as_slice).unwrap_or_default();
        found.iter().map(|&i| &self.virtual_services[i])
    }

    /// [`State::gateway_routes`] with each VirtualService's place in the
    /// snapshot's order (oldest first), to merge several Gateways' lists.
    pub fn gateway_routes_ordered<'a>(&'a self, gateway: &str) -> impl Iterator<Item = (usize, &'a VirtualService)> {
        let found = self.index.gateway_routes.get(gateway).map(Vec::as_slice).unwrap_or_default();
        found.iter().map(|&i| (i, &self.virtual_services[i]))
    }

    /// The DestinationRule that applies to a client in `client` (a pod's or
    /// a gateway's namespace; `None`: unknown) calling the Service
    /// `namespace/name`, in Istio's lookup order: the client's namespace,
    /// then the Service's, then the root namespace, each rule exported to
    /// the client's namespace (its own namespace's rules always); the
    /// oldest within a namespace. A rule in any other namespace never applies.
    pub fn destination_rule(&self, service: &str, client: Option<&str>) -> Option<&DestinationRule> {
        let found = self.index.destination_rules.get(service).map(Vec::as_slice).unwrap_or_default();
        let rules = || found.iter().map(|&i| &self.destination_rules[i]);
        let service_ns = service.split_once('/').map_or("", |(ns, _)| ns);
        let order = [client, Some(service_ns), Some(super::ROOT_NAMESPACE)];
        order.into_iter().flatten().find_map(|ns| {
            // A client's own namespace's rules apply to it whatever they export.
            let visible = |dr: &DestinationRule| match client {
                Some(c) => c == ns || dr.visible_in(c),
                None => dr.export_to.is_none(),
            };
            rules().find(|dr| &*dr.namespace == ns && visible(dr))
        })
    }

    /// The PeerAuthentications in `namespace`, in name order.
    pub fn peer_authentications_in<'a>(&'a self, namespace: &str) -> impl Iterator<Item = &'a PeerAuthentication> {
        let found = self.index.peer_authentications.get(namespace).map(Vec::as_slice).unwrap_or_default();
        found.iter().map(|&i| &self.peer_authentications[i])
    }

    /// The AuthorizationPolicies in `namespace`.
    pub fn authorization_policies_in<'a>(&'a self, namespace: &str) -> impl Iterator<Item = &'a AuthorizationPolicy> {
        let found = self.index.authorization_policies.get(namespace).map(Vec::as_slice).unwrap_or_default();
        found.iter().map(|&i| &self.authorization_policies[i])
    }

    /// The RequestAuthentications in `namespace`, in name order.
    pub fn request_authentications_in<'a>(
        &'a self,
        namespace: &str,
    ) -> impl Iterator<Item = &'a RequestAuthentication> {
        let found = self.index.request_authentications.get(namespace).map(Vec::as_slice).unwrap_or_default();
        found.iter().map(|&i| &self.request_authentications[i])
    }

    /// The first Service (by `namespace/name`) with a port whose target is
    /// `port` of the pod `w`, and that port: what a connection to the pod's
    /// port serves.
    pub fn service_port_of<'a>(
        &'a self,
        w: &super::Workload,
        port: u16,
    ) -> Option<(&'a Arc<super::Service>, &'a super::ServicePort)> {
        let services = self.index.services_of.get(&w.ip?)?;
        services.iter().find_map(|s| Some((s, target_of(s, w, port)?)))
    }

    /// The Service named `hostname` that selects `w` and has a port whose
    /// target is `port` of it, if any: the only Services a peer may say a
    /// connection to that port was for (its attached policies judge it).
    pub fn service_of_endpoint(&self, w: &super::Workload, hostname: &str, port: u16) -> Option<&Arc<super::Service>> {
        let services = self.index.services_of.get(&w.ip?)?;
        services.iter().find(|s| &*s.hostname == hostname && target_of(s, w, port).is_some())
    }

    /// What the Telemetries make of the reporting of the pod at `ip` (the
    /// default when none applies, or for no pod).
    pub fn telemetry_policy(&self, ip: Option<std::net::Ipv4Addr>) -> &super::telemetry::TelemetryPolicy {
        ip.and_then(|ip| self.index.telemetry.get(&ip)).unwrap_or(&self.index.default_telemetry)
    }

    /// An endpoint of the Service (or the root namespace's ServiceEntry) that
    /// a MeshConfig provider names (`host` or `namespace/host`) for `port`,
    /// the `pick`th ready one: its address, and it as a pod when it is one.
    pub fn provider_endpoint(
        &self,
        service: &str,
        port: u16,
        pick: usize,
    ) -> Option<(std::net::SocketAddrV4, Option<Arc<super::Workload>>)> {
        let host = service.rsplit('/').next().unwrap_or_default();
        let kubernetes = self.services.values().find(|s| s.external.is_none() && &*s.hostname == host);
        // The mesh config is the root namespace's: so is its choice of entry.
        let svc = kubernetes.or_else(|| self.external_for_host(host, Some(super::ROOT_NAMESPACE)))?;
        let sp = svc.ports.iter().find(|sp| sp.port == port)?;
        let endpoints = svc.current_endpoints();
        let ready: Vec<_> = endpoints.iter().filter(|w| w.ready && w.ip.is_some()).collect();
        let w = ready.get(pick % ready.len().max(1))?;
        let target = match &sp.target {
            super::TargetPort::Number(n) => *n,
            super::TargetPort::Name(n) => *w.named_ports.get(n)?,
        };
        let pod = svc.external.is_none().then(|| (*w).clone());
        Some((std::net::SocketAddrV4::new(w.ip?, target), pod))
    }

    /// One side's reporting of the pod at `ip`; at the destination, for
    /// traffic addressed to the Service `service` (a hostname, `unknown`
    /// for none), whose attached Telemetries apply there too.
    pub fn reporting(
        &self,
        ip: Option<std::net::Ipv4Addr>,
        destination: bool,
        service: &str,
    ) -> &super::telemetry::Reporting {
        let attached = destination
            .then(|| self.index.telemetry_by_service.get(&ip?)?.iter().find(|(host, _)| &**host == service))
            .flatten();
        match attached {
            Some((_, policy)) => &policy.server,
            None => self.telemetry_policy(ip).side(destination),
        }
    }

    /// The ServiceEntry hosts whose endpoints DNS gives (the agent's
    /// resolver keeps them current).
    pub fn dns_services(&self) -> &[Arc<super::Service>] {
        &self.index.dns_services
    }

    /// The Gateway `namespace/name`.
    pub fn gateway(&self, key: &str) -> Option<&Arc<super::Gateway>> {
        self.index.gateways.get(key).map(|&i| &self.gateways[i])
    }
}

/// The port of `s` whose target is `port` of the pod `w`.
fn target_of<'a>(s: &'a super::Service, w: &super::Workload, port: u16) -> Option<&'a super::ServicePort> {
    s.ports.iter().find(|p| match &p.target {
        super::TargetPort::Number(t) => *t == port,
        super::TargetPort::Name(n) => w.named_ports.get(n) == Some(&port),
    })
}

fn push_once(list: &mut Vec<usize>, i: usize) {
    if list.last() != Some(&i) {
        list.push(i);
    }
}
