//! The routing model: `VirtualService` and `DestinationRule` as the
//! configuration admitted them (matches, routes, retries, faults, header
//! rules, subsets, traffic policies). Plain data; the decisions over it are
//! in [`crate::routing::http`].
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct VirtualService {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// Services (`namespace/name`) whose mesh traffic the rules apply to.
    pub hosts: Vec<String>,
    /// The hosts as written, matched against the request's host at gateways.
    pub host_patterns: Vec<String>,
    /// `mesh` and/or gateways (`namespace/name`) the rules apply at.
    pub gateways: Vec<String>,
    /// `exportTo`: the namespaces the rules apply in (`None`: all).
    pub export_to: Option<Vec<Arc<str>>>,
    /// `metadata.creationTimestamp`: when several VirtualServices claim a
    /// host, Istio applies the oldest first.
    pub created: Option<String>,
    pub http: Vec<Arc<HttpRoute>>,
    pub tcp: Vec<Arc<TcpRoute>>,
    pub tls: Vec<Arc<TlsRoute>>,
}

impl VirtualService {
    /// Whether the rules apply to clients (or a gateway) in `namespace`.
    pub fn visible_in(&self, namespace: &str) -> bool {
        self.export_to.as_ref().is_none_or(|to| to.iter().any(|ns| &**ns == namespace))
    }
}

impl DestinationRule {
    /// Whether the rule applies to clients (or a gateway) in `namespace`.
    pub fn visible_in(&self, namespace: &str) -> bool {
        self.export_to.as_ref().is_none_or(|to| to.iter().any(|ns| &**ns == namespace))
    }
}

/// A `tls` rule: connections whose SNI matches go to the destinations, the
/// TLS left unopened.
#[derive(Debug, Clone, Serialize)]
pub struct TlsRoute {
    pub matches: Vec<TlsMatch>,
    pub routes: Vec<WeightedDestination>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TlsMatch {
    /// Host patterns (`*.example.com` allowed).
    pub sni_hosts: Vec<String>,
    pub port: Option<u16>,
    /// Only at these gateways; empty: the VirtualService's gateways.
    pub gateways: Vec<String>,
}

/// A `tcp` rule: for connections to the listed ports (any when a match has no
/// port; no match at all matches every connection), weighted destinations.
#[derive(Debug, Clone, Serialize)]
pub struct TcpRoute {
    pub ports: Vec<Option<u16>>,
    pub routes: Vec<WeightedDestination>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpRoute {
    pub name: Option<String>,
    /// Any one matches; none at all matches every request.
    pub matches: Vec<HttpMatch>,
    pub routes: Vec<WeightedDestination>,
    pub timeout: Option<Duration>,
    pub retries: Option<Retries>,
    pub fault: Option<Fault>,
    pub headers: HeaderRules,
    pub rewrite: Option<Rewrite>,
    pub redirect: Option<Redirect>,
    /// `mirror` and its `mirrorPercentage`: a copy of the request, answer ignored.
    pub mirror: Option<(WeightedDestination, f64)>,
}

/// `rewrite`: the path (or the matched prefix) and/or the authority.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Rewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    /// `uri` replaces the whole path even after a prefix match (the
    /// Gateway API's `ReplaceFullPath`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub full_path: bool,
}

/// `redirect`: answered by the agent, never sent upstream.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub code: u16,
    /// The Gateway API's `RequestRedirect`: `authority` is a host alone, the
    /// port is `port`, else the scheme's well-known one when `scheme` is
    /// given, else the one the client connected to (a well-known port left
    /// out of the location), and `uri` replaces the matched prefix when
    /// `replace_prefix`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_api: Option<RedirectTarget>,
}

/// The Gateway API's redirect parts (see [`Redirect::gateway_api`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RedirectTarget {
    pub scheme: Option<String>,
    pub port: Option<u16>,
    pub replace_prefix: bool,
}

/// `retries`: how many more tries, each with its own timeout, on which failures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Retries {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
}

/// Envoy's `retryOn` conditions, as Istio passes them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetryOn {
    /// `5xx`: any 5xx, a failed connection, a reset or a per-try timeout.
    pub five_xx: bool,
    /// `gateway-error`: 502, 503, 504.
    pub gateway_error: bool,
    /// `reset`: the upstream reset or did not answer in time.
    pub reset: bool,
    /// `connect-failure`.
    pub connect_failure: bool,
    /// `retriable-status-codes` plus the codes listed (`"503"` in `retryOn`).
    pub status_codes: Vec<u16>,
}

/// `fault`: delay and/or abort a percentage of requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(u16, f64)>,
}

/// `headers.request` / `headers.response`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HeaderRules {
    pub request: HeaderOps,
    pub response: HeaderOps,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HeaderOps {
    pub set: Vec<HeaderPair>,
    pub add: Vec<HeaderPair>,
    #[serde(serialize_with = "header_names")]
    pub remove: Vec<HeaderName>,
}

/// A header to set or add, parsed once when the configuration loads.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderPair(pub HeaderName, pub HeaderValue);

impl Serialize for HeaderPair {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.0.as_str(), String::from_utf8_lossy(self.1.as_bytes())).serialize(s)
    }
}

fn header_names<S: serde::Serializer>(names: &[HeaderName], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(names.iter().map(HeaderName::as_str))
}

impl HeaderOps {
    /// Applies remove, then set (replacing), then add (appending), as Envoy does.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for HeaderPair(n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for HeaderPair(n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

impl RetryOn {
    /// Whether a response status is retried.
    pub fn status(&self, code: u16) -> bool {
        (self.five_xx && code >= 500)
            || (self.gateway_error && matches!(code, 502..=504))
            || self.status_codes.contains(&code)
    }

    /// Whether a failure without a response is retried (`connect`: the
    /// connection could not be made; otherwise reset or per-try timeout).
    pub fn failure(&self, connect: bool) -> bool {
        self.five_xx || self.reset || (connect && self.connect_failure)
    }
}

/// Every condition given must hold.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HttpMatch {
    pub uri: Option<StrMatch>,
    pub method: Option<StrMatch>,
    /// Lower-case header names.
    pub headers: Vec<(String, StrMatch)>,
    pub query_params: Vec<(String, StrMatch)>,
    pub port: Option<u16>,
    /// Only at these (`mesh` or `namespace/name`); empty: wherever the rule applies.
    pub gateways: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    /// RE2-style, matching the whole value (as Istio's `regex`).
    Regex(#[serde(serialize_with = "serialize_regex")] regex_lite::Regex),
}

fn serialize_regex<S: serde::Serializer>(r: &regex_lite::Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

impl PartialEq for StrMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (StrMatch::Exact(a), StrMatch::Exact(b)) | (StrMatch::Prefix(a), StrMatch::Prefix(b)) => a == b,
            (StrMatch::Regex(a), StrMatch::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
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
    /// `exportTo`: the clients' namespaces it applies to (`None`: all).
    pub export_to: Option<Vec<Arc<str>>>,
    /// `metadata.creationTimestamp`: of several in one namespace, the oldest applies.
    pub created: Option<String>,
    pub subsets: Vec<Subset>,
    pub policy: Policy,
    /// `portLevelSettings`: the policy on a Service port, by port number.
    pub ports: BTreeMap<u16, Policy>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The subset's own policy, its unset parts taken from the rule's.
    pub policy: Policy,
    /// Its policy on a Service port: the rule's policy on the port, then the
    /// subset's, then the subset's on the port, each setting what it sets.
    pub ports: BTreeMap<u16, Policy>,
}

impl DestinationRule {
    /// A subset the rule defines.
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }

    /// The policy for traffic to Service port `port` of `subset` (`None`: the
    /// whole Service), and whether it is that port's own (`portLevelSettings`).
    pub fn policy_on<'a>(&'a self, subset: Option<&'a Subset>, port: u16) -> (&'a Policy, bool) {
        let (policy, ports) = match subset {
            None => (&self.policy, &self.ports),
            Some(s) => (&s.policy, &s.ports),
        };
        ports.get(&port).map_or((policy, false), |p| (p, true))
    }

    /// Every policy the rule holds (for settings built ahead, such as TLS).
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        let subsets = self.subsets.iter().flat_map(|s| std::iter::once(&s.policy).chain(s.ports.values()));
        std::iter::once(&self.policy).chain(self.ports.values()).chain(subsets)
    }
}

/// A DestinationRule's `trafficPolicy` (the parts implemented).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Policy {
    pub load_balancer: LoadBalancer,
    pub pool: ConnectionPool,
    pub outlier: Option<OutlierDetection>,
    /// `tls.mode: SIMPLE` or `MUTUAL`: TLS to the destination, originated by the agent.
    pub tls: Option<Arc<Origination>>,
}

/// TLS origination as a DestinationRule asks for it, for each client.
#[derive(Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origination {
    /// The same for every client: files (from the root namespace or a
    /// directory the operator allows), or the system's roots.
    Fixed(Arc<TlsOrigination>),
    /// `credentialName`: the Secret of that name in the client's own
    /// namespace (a gateway's: the gateway's), as Istio reads it ("must exist
    /// in the namespace of the proxy using the certificates"). A client whose
    /// namespace holds no usable one originates nothing: its request fails,
    /// and it never presents another namespace's certificate.
    PerNamespace {
        credential: String,
        by_namespace: BTreeMap<Arc<str>, Arc<TlsOrigination>>,
        /// Namespaces whose Secret of that name cannot be used, and why.
        unusable: BTreeMap<Arc<str>, String>,
    },
}

impl Origination {
    /// The settings for a client of `namespace`, or why it has none.
    pub fn for_client(&self, namespace: Option<&str>) -> Result<&Arc<TlsOrigination>, String> {
        match self {
            Origination::Fixed(t) => Ok(t),
            Origination::PerNamespace { credential, by_namespace, unusable } => {
                let Some(ns) = namespace else {
                    return Err(format!("credentialName {credential}: a client with no namespace has no Secret"));
                };
                by_namespace.get(ns).ok_or_else(|| match unusable.get(ns) {
                    Some(why) => why.clone(),
                    None => format!("no Secret {ns}/{credential} for this client's TLS origination (credentialName is read in the client's namespace)"),
                })
            }
        }
    }

    /// Every client's settings.
    pub fn all(&self) -> impl Iterator<Item = &Arc<TlsOrigination>> {
        let (fixed, per) = match self {
            Origination::Fixed(t) => (Some(t), None),
            Origination::PerNamespace { by_namespace, .. } => (None, Some(by_namespace.values())),
        };
        fixed.into_iter().chain(per.into_iter().flatten())
    }
}

/// The system's trusted roots, used for TLS origination without `caCertificates`.
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// TLS originated to a destination (DestinationRule `tls.mode: SIMPLE` or
/// `MUTUAL`). The data path builds the client settings from it
/// (`identity::tls::origination_config`).
#[derive(Debug, PartialEq, Serialize)]
pub struct TlsOrigination {
    /// Server name to send (and verify, without `subjectAltNames`); the
    /// destination's host when unset.
    pub sni: Option<String>,
    pub insecure_skip_verify: bool,
    /// What the server's certificate must be (roots empty when
    /// `insecure_skip_verify`).
    pub check: super::PeerCheck,
    /// `MUTUAL`: the certificate presented to the server.
    pub client_cert: Option<ClientCert>,
}

/// A client certificate chain and key (PEM, checked by the configuration to
/// belong together; never shown: only where it came from).
#[derive(PartialEq, Serialize)]
pub struct ClientCert {
    /// `Secret ns/name`, or the certificate's file.
    pub source: String,
    #[serde(skip)]
    pub cert_pem: Arc<[u8]>,
    #[serde(skip)]
    pub key_pem: Arc<[u8]>,
}

impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCert").field("source", &self.source).finish_non_exhaustive()
    }
}

/// `connectionPool`: Envoy's circuit breakers, per source agent and cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ConnectionPool {
    /// `tcp.maxConnections`: HTTP/1.1 requests in flight (each holds a connection).
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<Duration>,
    /// `http.http1MaxPendingRequests`: requests waiting for one of those connections.
    pub max_pending: Option<u32>,
    /// `http.http2MaxRequests`: requests in flight, any protocol.
    pub max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection`: a connection is not reused after this many.
    pub max_requests_per_connection: Option<u32>,
    /// `http.idleTimeout`: an unused upstream connection is dropped after this long.
    pub idle_timeout: Option<Duration>,
    /// `http.h2UpgradePolicy`: `UPGRADE` sends HTTP/1.1 requests to an `http`
    /// port as HTTP/2 (`Some(true)`); `DO_NOT_UPGRADE` and `DEFAULT` do not.
    pub h2_upgrade: bool,
    /// `http.useClientProtocol`: upstream speaks the client's HTTP version.
    pub use_client_protocol: bool,
}

/// `outlierDetection`: endpoints failing in a row are left out for a while.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutlierDetection {
    /// `consecutive5xxErrors` (Istio's default 5; 0 disables).
    pub consecutive_5xx: u32,
    /// `consecutiveGatewayErrors`: 502, 503, 504 and connect failures (0 disables).
    pub consecutive_gateway: u32,
    pub interval: Duration,
    /// `baseEjectionTime`, multiplied by how many times the endpoint was ejected.
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

/// Where the request goes, as Envoy's "cluster": the Service and subset, with
/// their policy and the number of endpoints they have.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cluster {
    /// `namespace/name` or `namespace/name|subset`.
    pub key: String,
    pub policy: Policy,
    pub endpoints: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    Random,
    LeastRequest,
    /// `consistentHash`: the same key goes to the same endpoint.
    ConsistentHash(HashKey),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum HashKey {
    /// `httpHeaderName` (lower case).
    Header(String),
    /// `httpQueryParameterName`.
    QueryParameter(String),
    /// `useSourceIp`.
    SourceIp,
}

/// The `gateways` entry that means sidecars and agents (the mesh itself).
pub const MESH: &str = "mesh";

/// Whether a host pattern (`*`, `*.example.com`, `example.com`) matches `host`.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        // DNS names compare without case, the wildcard's suffix too.
        Some(suffix) => {
            host.len() > suffix.len()
                && host.as_bytes()[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}
