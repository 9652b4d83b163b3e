//! The model at the bottom of the agent: its view of the cluster (Istio's
//! Pilot role, discovery part) as one immutable snapshot of plain types built
//! from validated configuration, with the indexes built once per snapshot.
//! Proxies read it through an `Arc`; a reload builds a new snapshot and swaps
//! it in whole. It imports nothing from the rest of the agent: the routing
//! and policy decisions over it are in [`crate::routing`], the live resources
//! built from it (TLS settings, listeners) in the data path.
use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use serde::Serialize;

pub mod dns;
mod index;
mod services;
pub use services::prefer_own;
pub mod log_format;
pub mod security;
pub mod telemetry;
pub mod trace;
pub mod traffic;

/// Label that enrolls a namespace or pod in the mesh (Istio ambient).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Default SPIFFE trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Kubernetes DNS domain of Service hostnames.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Istio's root namespace: mesh-wide policy, the CA's and the nodes' identities.
pub const ROOT_NAMESPACE: &str = "istio-system";

#[derive(Debug, Default, Serialize)]
pub struct State {
    pub trust_domain: Arc<str>,
    pub nodes: BTreeMap<Arc<str>, Node>,
    pub namespaces: BTreeMap<Arc<str>, Namespace>,
    /// Pods by `namespace/name`.
    pub workloads: BTreeMap<String, Arc<Workload>>,
    /// Services by `namespace/name`.
    pub services: BTreeMap<String, Arc<Service>>,
    pub peer_authentications: Vec<security::PeerAuthentication>,
    pub authorization_policies: Vec<security::AuthorizationPolicy>,
    pub request_authentications: Vec<security::RequestAuthentication>,
    /// In name order (Istio applies the oldest first; creation time is not kept).
    pub virtual_services: Vec<traffic::VirtualService>,
    pub destination_rules: Vec<traffic::DestinationRule>,
    /// In `namespace/name` order.
    pub gateways: Vec<Arc<Gateway>>,
    /// MeshConfig `outboundTrafficPolicy.mode`.
    pub outbound_policy: OutboundPolicy,
    /// MeshConfig `pathNormalization`.
    pub path_normalization: PathNormalization,
    /// MeshConfig `extensionProviders` that are external authorizers, by name.
    pub extension_providers: BTreeMap<String, Arc<security::ExtAuthz>>,
    /// Telemetry objects, oldest first (creation time, then namespace and name).
    pub telemetries: Vec<telemetry::Telemetry>,
    /// MeshConfig `accessLogFile`, `accessLogEncoding`, `accessLogFormat`.
    #[serde(skip)]
    pub access_log: AccessLogSettings,
    /// MeshConfig's tracing providers and defaults.
    pub tracing: trace::TraceSettings,
    /// Query parameters that carry end-user tokens (`access_token` and every
    /// RequestAuthentication's `fromParams`): redacted from access logs.
    #[serde(skip)]
    pub token_params: std::collections::BTreeSet<String>,
    /// ServiceEntry hosts (one Service each), for routing HTTP by `Host`:
    /// every namespace's entry for the host, oldest first
    /// ([`State::external_for_host`] chooses for a client).
    #[serde(skip)]
    pub external_by_host: HashMap<String, Vec<Arc<Service>>>,
    /// ServiceEntry `addresses`: every entry that claims one, oldest first
    /// (`by_vip` holds the oldest; [`State::service_at`] chooses for a client).
    #[serde(skip)]
    pub external_by_addr: HashMap<Ipv4Addr, Vec<Arc<Service>>>,
    /// ServiceEntry `addresses` that are ranges (`a.b.c.d/n`, n < 32), the
    /// longest prefix first, each with the entries that claim it, oldest first.
    #[serde(skip)]
    pub external_by_range: Vec<(security::Cidr, Vec<Arc<Service>>)>,
    /// ServiceEntry endpoint IPs, for connections the application addressed
    /// to one of them directly (after its own DNS lookup).
    #[serde(skip)]
    pub external_by_ip: HashMap<Ipv4Addr, Vec<Arc<Service>>>,
    #[serde(skip)]
    pub by_ip: HashMap<Ipv4Addr, Arc<Workload>>,
    #[serde(skip)]
    pub by_vip: HashMap<Ipv4Addr, Arc<Service>>,
    /// Rules and policies by what asks for them ([`State::build_index`]).
    #[serde(skip)]
    index: index::Index,
}

#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub name: Arc<str>,
    pub internal_ip: Option<Ipv4Addr>,
    /// `spec.podCIDRs`: the node's pods' addresses, gated until captured.
    pub pod_cidrs: Vec<security::Cidr>,
    pub labels: BTreeMap<String, String>,
    /// The node as a workload: the identity its host clients travel with,
    /// `spiffe://<td>/ns/istio-system/sa/mesh-node-<name>`.
    #[serde(skip)]
    pub workload: Arc<Workload>,
}

/// Service accounts in `istio-system` starting so are node identities.
pub const NODE_IDENTITY_PREFIX: &str = "mesh-node-";
/// The mesh CA's service account in `istio-system`: no Pod or Gateway may
/// run as it (agents trust a server with this identity as their CA).
pub const CA_SERVICE_ACCOUNT: &str = "mesh-ca";

#[derive(Debug, Clone, Serialize)]
pub struct Namespace {
    pub name: Arc<str>,
    pub labels: BTreeMap<String, String>,
}

/// A pod, with what the mesh derives from it.
#[derive(Debug, Clone, Serialize)]
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
    /// Istio's canonical service and revision (see [`Workload::canonical`]).
    pub canonical_service: Arc<str>,
    pub canonical_revision: Arc<str>,
    pub labels: BTreeMap<String, String>,
    pub node: Option<Arc<str>>,
    pub service_account: Arc<str>,
    /// SPIFFE ID of the pod's service account.
    pub principal: Arc<str>,
    pub ip: Option<Ipv4Addr>,
    pub host_network: bool,
    /// Enrolled in the mesh: captured by eBPF on its node.
    pub meshed: bool,
    /// A gateway pod (Istio's gateway injection, or a Gateway API gateway's
    /// pod): its node's agent serves the Gateways that select it.
    pub gateway: bool,
    /// The GatewayClass of the Gateway API Gateway whose pod this is (its
    /// `gateway.networking.k8s.io/gateway-name` Gateway in its namespace):
    /// what policies attached to that class judge.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_class: Option<Arc<str>>,
    /// Running and Ready (or no status given): eligible as a Service endpoint.
    pub ready: bool,
    /// Named container ports, for Services whose `targetPort` is a name.
    pub named_ports: BTreeMap<String, u16>,
    /// Ports the kubelet's probes connect to (the Pod spec's `httpGet`,
    /// `tcpSocket` and `grpc` probes): the kubelet reaches these directly.
    pub probe_ports: std::collections::BTreeSet<u16>,
    /// Its DNS queries are answered by its node's agent (unless the pod
    /// says `ambient.istio.io/dns-capture: "false"`).
    pub dns_capture: bool,
    /// The pod's `metadata.uid` when the source gives one: the CA checks a
    /// ServiceAccount token's pod against it.
    pub uid: Option<Arc<str>>,
}

#[derive(Debug, Serialize)]
pub struct Service {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// `namespace/name`: how rules and DestinationRules name it.
    #[serde(skip)]
    pub key: String,
    /// `name.namespace.svc.cluster.local`, Istio's `destination_service`.
    pub hostname: Arc<str>,
    pub vip: Option<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    /// Pods selected by the Service, in name order (ready or not; routing checks).
    #[serde(serialize_with = "serialize_endpoint_names")]
    pub endpoints: Vec<Arc<Workload>>,
    /// Set for a host of a ServiceEntry.
    pub external: Option<Arc<External>>,
    /// Set for a ServiceEntry host resolved by DNS: its names and latest
    /// answers ([`Service::current_endpoints`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<Arc<dns::DnsEndpoints>>,
}

/// What a ServiceEntry adds to the Service made from one of its hosts.
#[derive(Debug, Serialize)]
pub struct External {
    /// The ServiceEntry, `namespace/name`.
    pub entry: String,
    /// Its `metadata.creationTimestamp`: of entries for one host, the oldest
    /// serves clients outside their namespaces.
    pub created: Option<String>,
    pub location: Location,
    pub resolution: Resolution,
    pub addresses: Vec<Ipv4Addr>,
    /// Its `addresses` that are ranges (CIDR, prefix shorter than 32).
    pub ranges: Vec<security::Cidr>,
    /// `exportTo`: the clients' namespaces that see it (`None`: all).
    pub export_to: Option<Vec<Arc<str>>>,
    /// `subjectAltNames`: when set, only endpoints whose mesh identity is
    /// one of these are routed to (a pod the selector takes that runs as
    /// another service account is left out).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<Arc<str>>,
    /// The endpoint reported for `resolution: NONE` (the original destination).
    #[serde(skip)]
    pub unknown: Arc<Workload>,
}

/// MeshConfig `pathNormalization.normalization`: how request paths are
/// normalised before routing (and forwarded so).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    /// As the client sent it.
    None,
    /// RFC 3986: dot segments removed, unreserved characters decoded (Istio's default).
    #[default]
    Base,
    /// BASE, and runs of slashes merged into one.
    MergeSlashes,
    /// MERGE_SLASHES after decoding `%2F` and `%5C`.
    DecodeAndMergeSlashes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    MeshExternal,
    MeshInternal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// To the address the application connected to.
    None,
    /// To the listed endpoint addresses.
    Static,
    /// To the addresses the names resolve to (`DNS`: all of an answer's;
    /// `DNS_ROUND_ROBIN`: its first), kept up to date by the agent's resolver.
    Dns,
    /// To the address the request's host (HTTP `Host`, TLS SNI) resolves to
    /// when it is made (wildcard hosts; Envoy's dynamic forward proxy).
    DynamicDns,
}

/// The access log as MeshConfig asks for it.
#[derive(Debug, Clone)]
pub struct AccessLogSettings {
    /// `accessLogFile`: `""` for none, `/dev/stdout`, or a path; `None`
    /// when MeshConfig does not say (the agent's `--access-log` decides).
    pub file: Option<Arc<str>>,
    /// The line's format (Istio's TEXT format by default).
    pub format: Arc<log_format::Format>,
}

impl Default for AccessLogSettings {
    fn default() -> Self {
        AccessLogSettings { file: None, format: Arc::new(log_format::Format::istio_default(false)) }
    }
}

/// Istio's `outboundTrafficPolicy.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundPolicy {
    /// Unknown destinations are passed through.
    #[default]
    AllowAny,
    /// Only destinations in the registry (Services, ServiceEntries) are reachable.
    RegistryOnly,
}

/// An Istio `Gateway`: served on the address of every gateway pod whose
/// labels match `selector` (every gateway pod when empty; in any namespace,
/// as Istio's default), by that pod's node agent, as that pod.
#[derive(Debug, Serialize)]
pub struct Gateway {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// `metadata.creationTimestamp`: where two Gateways' servers conflict,
    /// the oldest keeps the port (Istio's precedence).
    pub created: Option<String>,
    pub selector: BTreeMap<String, String>,
    pub servers: Vec<GatewayServer>,
    /// Served by its own namespace's gateway pods only (a Gateway API one).
    pub own_namespace: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct GatewayServer {
    pub port: u16,
    pub name: Option<String>,
    pub protocol: GatewayProtocol,
    /// Host patterns and the namespaces whose VirtualServices may bind them.
    pub hosts: Vec<ServerHost>,
    pub tls: Option<ServerTls>,
    /// `tls.httpsRedirect` on an HTTP server: every request is sent to HTTPS.
    pub https_redirect: bool,
}

/// A Gateway server's `hosts` entry, `namespace/host`: the host pattern
/// (`*`, `*.example.com`, `example.com`) and the one namespace whose
/// VirtualServices may bind it (`None`: any, written `*/host` or `host`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerHost {
    pub namespace: Option<Arc<str>>,
    pub host: String,
}

impl ServerHost {
    /// Whether a VirtualService in `namespace` may bind this host.
    pub fn allows(&self, namespace: &str) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum GatewayProtocol {
    Http,
    /// HTTP2 and GRPC: h2c (HTTP/1.1 is accepted too).
    Http2,
    Https,
    Tcp,
    Tls,
}

impl GatewayProtocol {
    /// The `appProtocol` a Service port for this server declares.
    pub fn app_protocol(self) -> &'static str {
        match self {
            GatewayProtocol::Http => "http",
            GatewayProtocol::Http2 => "http2",
            GatewayProtocol::Https => "https",
            GatewayProtocol::Tcp => "tcp",
            GatewayProtocol::Tls => "tls",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub enum ServerTls {
    /// Terminated with the certificate of a `kubernetes.io/tls` Secret.
    Simple(ServerCert),
    /// Forwarded unopened, routed by SNI.
    Passthrough,
}

/// A server certificate chain and key from a Secret, as PEM checked by the
/// configuration to belong together (never shown: only its name). The
/// gateway builds its TLS settings from them.
#[derive(Clone, Serialize)]
pub struct ServerCert {
    /// `namespace/name` of the Secret.
    pub credential: String,
    /// The protocol versions and TLS 1.2 suites offered with it.
    pub settings: TlsSettings,
    /// `MUTUAL` / `OPTIONAL_MUTUAL`: the client certificates accepted.
    pub client: Option<ClientAuth>,
    #[serde(skip)]
    pub cert_pem: Arc<[u8]>,
    #[serde(skip)]
    pub key_pem: Arc<[u8]>,
}

/// What a TLS server at the mesh's edge offers: TLS 1.2 and 1.3 by default
/// (Istio's gateway defaults, Mozilla's "intermediate"), never below 1.2,
/// and for TLS 1.2 only ECDHE key exchange with AEAD ciphers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsSettings {
    pub min: TlsVersion,
    pub max: TlsVersion,
    /// `cipherSuites` as Istio names them (OpenSSL's names); empty: every
    /// suite offered (they only apply to TLS 1.2).
    pub cipher_suites: Vec<String>,
}

/// Who may present a certificate to a Gateway server (`tls.mode: MUTUAL`,
/// `OPTIONAL_MUTUAL`), or to whom TLS is originated: a chain to `roots`,
/// not revoked by `crls`, carrying one of `subject_alt_names` (any, when
/// empty).
#[derive(Clone, Default, PartialEq, Eq, Serialize)]
pub struct PeerCheck {
    /// Where the roots come from (`Secret ns/name`, a file).
    pub ca: String,
    pub subject_alt_names: Vec<String>,
    /// Trusted roots (DER), checked by the configuration.
    #[serde(skip)]
    pub roots: Vec<Vec<u8>>,
    /// Certificate revocation lists (DER): `ca.crl` or `caCrl`.
    #[serde(skip)]
    pub crls: Vec<Vec<u8>>,
}

impl std::fmt::Debug for PeerCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&self.roots, &self.crls).hash(&mut h);
        f.debug_struct("PeerCheck")
            .field("ca", &self.ca)
            .field("subject_alt_names", &self.subject_alt_names)
            .field("digest", &format_args!("{:016x}", h.finish()))
            .finish()
    }
}

/// A Gateway server's client certificate check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientAuth {
    pub check: PeerCheck,
    /// `OPTIONAL_MUTUAL`: a client without a certificate is served too (one
    /// that presents a certificate must pass the check).
    pub optional: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum TlsVersion {
    #[serde(rename = "TLSV1_2")]
    V1_2,
    #[serde(rename = "TLSV1_3")]
    V1_3,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings { min: TlsVersion::V1_2, max: TlsVersion::V1_3, cipher_suites: Vec::new() }
    }
}

impl ServerCert {
    /// A short digest of the certificate chain, to notice a changed Secret
    /// (not a security check).
    pub fn fingerprint(&self) -> String {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.cert_pem.hash(&mut h);
        format!("{:016x}", h.finish())
    }
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert").field("credential", &self.credential).finish_non_exhaustive()
    }
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

impl State {
    /// The pod with this IP (never a hostNetwork pod).
    pub fn workload_by_ip(&self, ip: Ipv4Addr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// A gateway pod or node that runs as `principal`: who sent a stream
    /// whose client address is not its own (a gateway forwards its clients').
    pub fn edge_workload(&self, principal: &str) -> Option<Arc<Workload>> {
        let node = || self.nodes.values().map(|n| &n.workload).find(|w| *w.principal == *principal);
        self.gateway_pod_of(principal).or_else(node).cloned()
    }

    /// The identities an agent on `node` holds certificates for: its meshed
    /// pods' (gateway pods are meshed) and the node's own.
    pub fn node_identities(&self, node: &str) -> std::collections::HashSet<Arc<str>> {
        let pods = self.local_workloads(node).filter(|w| w.meshed).map(|w| w.principal.clone());
        let node_id = self.nodes.get(node).map(|n| n.workload.principal.clone());
        pods.chain(node_id).collect()
    }

    /// Pods scheduled on `node` with a network of their own, addressed or
    /// not yet (a sandbox being made, whose address the CNI plugin gives).
    pub fn scheduled_workloads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> {
        self.workloads.values().filter(move |w| w.node.as_deref() == Some(node) && !w.host_network)
    }

    /// Pods scheduled on `node` that have an IP of their own.
    pub fn local_workloads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> {
        self.workloads.values().filter(move |w| w.node.as_deref() == Some(node) && !w.host_network && w.ip.is_some())
    }
}

// === impl Workload ===

impl Workload {
    /// Istio's canonical service of a workload (`CanonicalService` in
    /// istio/istio `pkg/config/labels`): the name from
    /// `service.istio.io/canonical-name`, else `app.kubernetes.io/name`, else
    /// `app`, else the workload's name; the revision from
    /// `service.istio.io/canonical-revision`, else `app.kubernetes.io/version`,
    /// else `version`, else `latest`.
    pub fn canonical(labels: &BTreeMap<String, String>, workload_name: &Arc<str>) -> (Arc<str>, Arc<str>) {
        let first = |keys: [&str; 3]| keys.iter().find_map(|k| labels.get(*k));
        let name = first(["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"]);
        let revision = first(["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"]);
        (
            name.map_or_else(|| workload_name.clone(), |n| n.as_str().into()),
            revision.map_or_else(|| "latest".into(), |r| r.as_str().into()),
        )
    }

    /// The port a Service's `targetPort` means on this pod, if any.
    pub fn resolve_port(&self, target: &TargetPort) -> Option<u16> {
        match target {
            TargetPort::Number(p) => Some(*p),
            TargetPort::Name(name) => self.named_ports.get(name).copied(),
        }
    }
}
