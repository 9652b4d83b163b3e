//! The agent's view of the cluster (Istio's Pilot role, discovery part): one
//! immutable snapshot built from validated configuration. Proxies read it through
//! an `Arc`; a reload builds a new snapshot and swaps it in whole.
use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use serde::Serialize;

/// Label that enrolls a namespace or pod in the mesh (Istio ambient).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Default SPIFFE trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Kubernetes DNS domain of Service hostnames.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

#[derive(Debug, Default, Serialize)]
pub struct State {
    pub trust_domain: Arc<str>,
    pub nodes: BTreeMap<Arc<str>, Node>,
    pub namespaces: BTreeMap<Arc<str>, Namespace>,
    /// Pods by `namespace/name`.
    pub workloads: BTreeMap<String, Arc<Workload>>,
    /// Services by `namespace/name`.
    pub services: BTreeMap<String, Arc<Service>>,
    pub peer_authentications: Vec<crate::policy::PeerAuthentication>,
    pub authorization_policies: Vec<crate::policy::AuthorizationPolicy>,
    /// In name order (Istio applies the oldest first; creation time is not kept).
    pub virtual_services: Vec<crate::l7::routing::VirtualService>,
    pub destination_rules: Vec<crate::l7::routing::DestinationRule>,
    #[serde(skip)]
    pub by_ip: HashMap<Ipv4Addr, Arc<Workload>>,
    #[serde(skip)]
    pub by_vip: HashMap<Ipv4Addr, Arc<Service>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub name: Arc<str>,
    pub internal_ip: Option<Ipv4Addr>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Namespace {
    pub name: Arc<str>,
    pub labels: BTreeMap<String, String>,
}

/// A pod, with what the mesh derives from it.
#[derive(Debug, Serialize)]
pub struct Workload {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// Istio's `workload` label: the owning controller (a Deployment's name for a
    /// ReplicaSet-owned pod), else the `app` label, else the pod name.
    pub workload_name: Arc<str>,
    /// `app` (or `app.kubernetes.io/name`) label, else the workload name.
    pub app: Arc<str>,
    /// `version` (or `app.kubernetes.io/version`) label, else `unknown`.
    pub version: Arc<str>,
    pub labels: BTreeMap<String, String>,
    pub node: Option<Arc<str>>,
    pub service_account: Arc<str>,
    /// SPIFFE ID of the pod's service account.
    pub principal: Arc<str>,
    pub ip: Option<Ipv4Addr>,
    pub host_network: bool,
    /// Enrolled in the mesh: captured by eBPF on its node.
    pub meshed: bool,
    /// Running and Ready (or no status given): eligible as a Service endpoint.
    pub ready: bool,
    /// Named container ports, for Services whose `targetPort` is a name.
    pub named_ports: BTreeMap<String, u16>,
}

#[derive(Debug, Serialize)]
pub struct Service {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// `name.namespace.svc.cluster.local`, Istio's `destination_service`.
    pub hostname: Arc<str>,
    pub vip: Option<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    /// Pods selected by the Service, in name order (ready or not; routing checks).
    #[serde(serialize_with = "serialize_endpoint_names")]
    pub endpoints: Vec<Arc<Workload>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target: TargetPort,
    pub protocol: Protocol,
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

fn serialize_endpoint_names<S: serde::Serializer>(eps: &[Arc<Workload>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(eps.iter().map(|w| format!("{}/{}", w.namespace, w.name)))
}

// === impl State ===

impl State {
    /// The pod with this IP (never a hostNetwork pod).
    pub fn workload_by_ip(&self, ip: Ipv4Addr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// Pods scheduled on `node` that have an IP of their own.
    pub fn local_workloads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> {
        self.workloads.values().filter(move |w| w.node.as_deref() == Some(node) && !w.host_network && w.ip.is_some())
    }
}

// === impl Workload ===

impl Workload {
    /// The port a Service's `targetPort` means on this pod, if any.
    pub fn resolve_port(&self, target: &TargetPort) -> Option<u16> {
        match target {
            TargetPort::Number(p) => Some(*p),
            TargetPort::Name(name) => self.named_ports.get(name).copied(),
        }
    }
}
