//! Telemetry (Istio's Mixer role, metrics part): Istio's standard TCP metrics with
//! its standard labels, plus the agent's own counters, in one Prometheus registry.
//! Label sets are built once per connection, never per read.
use std::sync::{Arc, LazyLock, Mutex, atomic::AtomicU64};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::state::{Service, Workload};

pub mod access_log;
mod labels;
pub use labels::*;
mod flags;
mod tags;
pub use tags::Extra;
pub mod logging;
mod process;
pub mod runtime;
pub mod trace;
pub use flags::Flags;

/// Istio's labels for TCP metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: Label,
    pub source_workload_namespace: Label,
    pub source_principal: Label,
    pub source_app: Label,
    pub source_version: Label,
    pub source_canonical_service: Label,
    pub source_canonical_revision: Label,
    pub source_cluster: Label,
    pub destination_workload: Label,
    pub destination_workload_namespace: Label,
    pub destination_principal: Label,
    pub destination_app: Label,
    pub destination_version: Label,
    pub destination_canonical_service: Label,
    pub destination_canonical_revision: Label,
    pub destination_cluster: Label,
    pub destination_service: Label,
    pub destination_service_name: Label,
    pub destination_service_namespace: Label,
    pub request_protocol: &'static str,
    pub response_flags: Flags,
    pub connection_security_policy: &'static str,
    /// Labels a Telemetry's `tagOverrides` add. Last: the derive hands the
    /// encoder to a flattened field for good.
    #[prometheus(flatten)]
    pub extra: Extra,
}

/// A label value shared, not copied, between connections, requests and the
/// registry (a workload's name is one allocation for all of them).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Label(pub Arc<str>);

impl std::ops::Deref for Label {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Label {
    fn from(s: &str) -> Self {
        Label(s.into())
    }
}

impl prometheus_client::encoding::EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelValueEncoder) -> std::fmt::Result {
        prometheus_client::encoding::EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

impl serde::Serialize for Label {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

const UNKNOWN: &str = "unknown";

// Label values every connection may carry: one allocation each, shared.
static UNKNOWN_LABEL: LazyLock<Label> = LazyLock::new(|| UNKNOWN.into());
static PASSTHROUGH: LazyLock<Label> = LazyLock::new(|| "PassthroughCluster".into());
static BLACK_HOLE: LazyLock<Label> = LazyLock::new(|| "BlackHoleCluster".into());

/// Istio's default cluster name (`global.multiCluster.clusterName`, the
/// proxies' `CLUSTER_ID`), when none is given.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
static CLUSTER: std::sync::OnceLock<Label> = std::sync::OnceLock::new();

/// Sets the cluster's name for `source_cluster`/`destination_cluster` (once,
/// at start: `--cluster-id`).
pub fn set_cluster_id(id: &str) {
    let _ = CLUSTER.set(id.into());
}

/// The cluster's name (`--cluster-id`, else Istio's default).
pub fn cluster() -> Label {
    CLUSTER.get_or_init(|| DEFAULT_CLUSTER_ID.into()).clone()
}

impl TcpLabels {
    /// Labels for a connection from `source` (a pod, or unknown) to `dest` (a
    /// pod, or unknown) through `service` (or none).
    pub fn new(
        source: Option<&Workload>,
        dest: Option<&Workload>,
        service: Option<&Service>,
        passthrough: bool,
    ) -> Self {
        let field = |w: Option<&Workload>, f: fn(&Workload) -> &Arc<str>| {
            w.map_or_else(|| UNKNOWN_LABEL.clone(), |w| Label(f(w).clone()))
        };
        let (svc, svc_name, svc_ns) = match (service, passthrough) {
            (Some(s), _) => (Label(s.hostname.clone()), Label(s.name.clone()), Label(s.namespace.clone())),
            (None, true) => (PASSTHROUGH.clone(), PASSTHROUGH.clone(), UNKNOWN_LABEL.clone()),
            // A pod IP called directly: no Service was involved.
            (None, false) => (UNKNOWN_LABEL.clone(), UNKNOWN_LABEL.clone(), UNKNOWN_LABEL.clone()),
        };
        // The mesh's workloads are all in this cluster; an unknown peer's is unknown.
        let cluster_of = |w: Option<&Workload>| match w {
            Some(w) if &*w.principal != UNKNOWN => cluster(),
            _ => UNKNOWN_LABEL.clone(),
        };
        Self {
            reporter: "source",
            source_workload: field(source, |w| &w.workload_name),
            source_workload_namespace: field(source, |w| &w.namespace),
            source_principal: field(source, |w| &w.principal),
            source_app: field(source, |w| &w.app),
            source_version: field(source, |w| &w.version),
            source_canonical_service: field(source, |w| &w.canonical_service),
            source_canonical_revision: field(source, |w| &w.canonical_revision),
            source_cluster: cluster_of(source),
            destination_workload: field(dest, |w| &w.workload_name),
            destination_workload_namespace: field(dest, |w| &w.namespace),
            // Only a meshed pod proves an identity: an un-meshed one has none.
            destination_principal: field(dest.filter(|w| w.meshed), |w| &w.principal),
            destination_app: field(dest, |w| &w.app),
            destination_version: field(dest, |w| &w.version),
            destination_canonical_service: field(dest, |w| &w.canonical_service),
            destination_canonical_revision: field(dest, |w| &w.canonical_revision),
            destination_cluster: cluster_of(dest),
            destination_service: svc,
            destination_service_name: svc_name,
            destination_service_namespace: svc_ns,
            request_protocol: "tcp",
            response_flags: Flags::NONE,
            // Same-node plaintext hop: no mTLS yet.
            connection_security_policy: "none",
            extra: Extra::default(),
        }
    }
}

impl TcpLabels {
    /// A destination refused under REGISTRY_ONLY (Istio's BlackHoleCluster).
    pub fn black_hole(source: Option<&Workload>) -> Self {
        let mut l = Self::new(source, None, None, false);
        l.destination_service = BLACK_HOLE.clone();
        l.destination_service_name = BLACK_HOLE.clone();
        l
    }
}

/// Istio's labels for request metrics: the TCP ones plus the response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub response_code: u16,
    /// The `grpc-status` trailer (or header), `-` when absent.
    pub grpc_response_status: &'static str,
    /// Last: the derive hands the encoder to a flattened field for good.
    #[prometheus(flatten)]
    pub connection: TcpLabels,
}

impl RequestLabels {
    /// `request_protocol` (`http`, `grpc`) and `response_flags` replace the TCP ones.
    pub fn new(
        mut tcp: TcpLabels,
        request_protocol: &'static str,
        response_code: u16,
        grpc_response_status: &'static str,
        response_flags: Flags,
    ) -> Self {
        tcp.request_protocol = request_protocol;
        tcp.response_flags = response_flags;
        Self { response_code, grpc_response_status, connection: tcp }
    }
}

/// Envoy's default histogram buckets (`StatsConfig.histogram_bucket_settings`
/// when no rule matches), which Istio's proxies use for all of its
/// histograms — durations in milliseconds and body sizes in bytes alike —
/// unless a pod's `sidecar.istio.io/statsHistogramBuckets` says otherwise.
const ENVOY_DEFAULT_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

fn istio_histogram() -> Histogram {
    Histogram::new(ENVOY_DEFAULT_BUCKETS)
}

type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_sent: Family<TcpLabels, Counter>,
    pub tcp_received: Family<TcpLabels, Counter>,
    /// Connections that failed, by reason (also counted in the Istio metrics).
    pub connection_failures: Family<ReasonLabels, Counter>,
    /// Connections, streams and log lines turned away by a limit.
    pub limit_refusals: Family<LimitLabels, Counter>,
    pub active_connections: Gauge,
    /// Config loads by result: `success` (valid objects applied), `rejected`
    /// (the configuration could not be read at all).
    pub config_loads: Family<ResultLabels, Counter>,
    /// Objects rejected in the configuration now applied.
    pub config_objects_rejected: Gauge,
    /// Kubernetes list and watch failures, by kind (`--kubernetes`).
    pub kube_watch_errors: Family<KindLabels, Counter>,
    /// Models built from the API server's objects (one per burst of changes).
    pub kube_rebuilds: Counter,
    /// ServiceEntry name lookups, by name and result (`changed`,
    /// `unchanged`, `no_records`, `timeout`, `error`).
    pub dns_resolutions: Family<DnsLabels, Counter>,
    /// The DNS proxy's queries by source pod, its forwards to the node's
    /// resolvers and their failures, and the queries it dropped (by reason).
    pub dns_requests: Family<DnsRequestLabels, Counter>,
    pub dns_upstream_requests: Counter,
    pub dns_upstream_failures: Counter,
    pub dns_proxy_refusals: Family<ReasonLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    /// Mirrored request copies by result: `sent`, `failed`, `skipped` (body too large).
    pub mirrored: Family<ResultLabels, Counter>,
    /// Requests a destination's agent checked for a JWT, by result
    /// (`valid`, `invalid`, `none`).
    pub jwt_checks: Family<ResultLabels, Counter>,
    /// Requests an AUDIT AuthorizationPolicy matched.
    pub authorization_audits: Counter,
    /// mTLS connections this agent opened to other agents, by handshake
    /// (`full`, or `resumed` from an earlier session with the same peer).
    pub hbone_connections: Family<HandshakeLabels, Counter>,
    /// Spans by what became of them: `exported`, or dropped (`queue_full`,
    /// `export_failed`, `rejected` by the collector).
    pub trace_spans: Family<ResultLabels, Counter>,
    /// Gateway ports that could not be opened (another process holds them).
    pub gateway_bind_failures: Counter,
    /// Requests refused with 421 at an HTTPS gateway: a host that the
    /// server the connection's SNI chose does not serve.
    pub gateway_misdirected: Counter,
    /// Gateway servers left out of this node's listeners: their port's
    /// protocol was given by an older Gateway's server.
    pub gateway_conflicts: Gauge,
    pub request_duration: HistogramFamily,
    pub request_bytes: HistogramFamily,
    pub response_bytes: HistogramFamily,
    ebpf_packets: Family<EbpfLabels, Counter<u64, AtomicU64>>,
    ebpf_last: Mutex<Vec<u64>>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let tcp_opened = Family::default();
        let tcp_closed = Family::default();
        let tcp_sent = Family::default();
        let tcp_received = Family::default();
        let connection_failures = Family::default();
        let limit_refusals = Family::default();
        let active_connections = Gauge::default();
        let config_loads = Family::default();
        let config_objects_rejected = Gauge::default();
        let kube_watch_errors = Family::default();
        let kube_rebuilds = Counter::default();
        let ebpf_packets = Family::default();
        let requests = Family::default();
        let gateway_bind_failures = Counter::default();
        registry.register(
            "mesh_gateway_listener_failures",
            "Gateway listeners that could not be opened",
            gateway_bind_failures.clone(),
        );
        let gateway_misdirected = Counter::default();
        registry.register(
            "mesh_gateway_misdirected_requests",
            "Requests refused with 421 at an HTTPS gateway: a host the server chosen by SNI does not serve",
            gateway_misdirected.clone(),
        );
        let gateway_conflicts = Gauge::default();
        registry.register(
            "mesh_gateway_server_conflicts",
            "Gateway servers left out of this node's listeners (their port has another protocol in an older Gateway)",
            gateway_conflicts.clone(),
        );
        let mirrored = Family::default();
        registry.register("mesh_http_mirrored_requests", "Mirrored request copies, by result", mirrored.clone());
        let jwt_checks = Family::default();
        registry.register(
            "mesh_jwt_checks",
            "Requests checked for an end-user JWT at their destination, by result (valid, invalid, none)",
            jwt_checks.clone(),
        );
        let authorization_audits = Counter::default();
        registry.register(
            "mesh_authorization_audits",
            "Requests an AUDIT AuthorizationPolicy matched",
            authorization_audits.clone(),
        );
        let hbone_connections = Family::default();
        registry.register(
            "mesh_hbone_connections",
            "mTLS connections opened to other agents, by TLS handshake (full or resumed)",
            hbone_connections.clone(),
        );
        let trace_spans = Family::default();
        registry.register(
            "mesh_trace_spans",
            "Spans by result: exported, or dropped (queue_full, export_failed, rejected)",
            trace_spans.clone(),
        );
        let request_duration: HistogramFamily = Family::new_with_constructor(istio_histogram);
        let request_bytes: HistogramFamily = Family::new_with_constructor(istio_histogram);
        let response_bytes: HistogramFamily = Family::new_with_constructor(istio_histogram);
        registry.register("istio_requests", "Requests, by response", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration, until the response is complete",
            request_duration.clone(),
        );
        registry.register("istio_request_bytes", "Request body sizes", request_bytes.clone());
        registry.register("istio_response_bytes", "Response body sizes", response_bytes.clone());
        registry.register("istio_tcp_connections_opened", "TCP connections opened", tcp_opened.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed", tcp_closed.clone());
        registry.register("istio_tcp_sent_bytes", "Bytes sent to the client (response direction)", tcp_sent.clone());
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client (request direction)",
            tcp_received.clone(),
        );
        registry.register(
            "mesh_tcp_connection_failures",
            "Proxied connections that failed, by reason",
            connection_failures.clone(),
        );
        registry.register(
            "mesh_limit_refusals",
            "What a limit turned away (connections, TLS handshakes, access log lines), by listener and limit",
            limit_refusals.clone(),
        );
        registry.register("mesh_tcp_active_connections", "Proxied connections open now", active_connections.clone());
        registry.register(
            "mesh_config_loads",
            "Configuration loads by result (rejected: unreadable, the last good config kept serving)",
            config_loads.clone(),
        );
        registry.register(
            "mesh_config_objects_rejected",
            "Objects rejected in the configuration now applied (each named in the log and /config_dump)",
            config_objects_rejected.clone(),
        );
        registry.register(
            "mesh_kube_watch_errors",
            "Kubernetes list and watch failures by kind; the last objects keep serving while they are retried",
            kube_watch_errors.clone(),
        );
        registry.register(
            "mesh_kube_rebuilds",
            "Models built from the Kubernetes API server's objects (one per burst of changes)",
            kube_rebuilds.clone(),
        );
        let dns_resolutions = Family::default();
        registry.register(
            "mesh_dns_resolutions",
            "DNS lookups of ServiceEntry names, by name and result (changed, unchanged, no_records, timeout, error); a failed one keeps the last good answer",
            dns_resolutions.clone(),
        );
        let dns_requests = Family::default();
        registry.register(
            "istio_dns_requests",
            "DNS queries of meshed pods the agent's DNS proxy took, by source",
            dns_requests.clone(),
        );
        let dns_upstream_requests = Counter::default();
        registry.register(
            "istio_dns_upstream_requests",
            "Queries the DNS proxy forwarded to the node's resolvers",
            dns_upstream_requests.clone(),
        );
        let dns_upstream_failures = Counter::default();
        registry.register(
            "istio_dns_upstream_failures",
            "Forwarded queries a resolver did not answer (in time)",
            dns_upstream_failures.clone(),
        );
        let dns_proxy_refusals = Family::default();
        registry.register(
            "mesh_dns_proxy_refusals",
            "DNS queries the proxy dropped or answered FORMERR, by reason (rate_limited, malformed)",
            dns_proxy_refusals.clone(),
        );
        registry.register_collector(Box::new(process::ProcessCollector));
        registry.register_collector(Box::new(runtime::RuntimeCollector));
        let build = Family::<BuildLabels, Gauge>::default();
        build.get_or_create(&BuildLabels { component: "mesh-agent", tag: env!("CARGO_PKG_VERSION") }).set(1);
        registry.register("istio_build", "This binary's component and version (Istio's `istio_build`)", build);
        registry.register(
            "mesh_ebpf_packets",
            "Packets handled by the capture classifier, by outcome",
            ebpf_packets.clone(),
        );
        Self {
            registry,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            connection_failures,
            limit_refusals,
            active_connections,
            config_loads,
            config_objects_rejected,
            kube_watch_errors,
            kube_rebuilds,
            dns_resolutions,
            dns_requests,
            dns_upstream_requests,
            dns_upstream_failures,
            dns_proxy_refusals,
            requests,
            mirrored,
            jwt_checks,
            authorization_audits,
            hbone_connections,
            trace_spans,
            gateway_bind_failures,
            gateway_misdirected,
            gateway_conflicts,
            request_duration,
            request_bytes,
            response_bytes,
            ebpf_packets,
            ebpf_last: Mutex::new(vec![0; mesh_common::counter::LEN as usize]),
        }
    }

    /// Brings the eBPF counters up to the totals read from the kernel.
    pub fn update_ebpf(&self, totals: &[u64]) {
        let Ok(mut last) = self.ebpf_last.lock() else { return };
        for (i, (&now, prev)) in totals.iter().zip(last.iter_mut()).enumerate() {
            let counter = mesh_common::counter::NAMES[i];
            self.ebpf_packets.get_or_create(&EbpfLabels { counter }).inc_by(now.saturating_sub(*prev));
            *prev = now;
        }
    }

    /// Prometheus text exposition of everything.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Request and response sizes in Envoy's default buckets, as Istio's
    /// proxies report them: a dashboard's `histogram_quantile` over them
    /// reads the same `le` values.
    #[test]
    fn size_histograms_use_istios_buckets() {
        let m = Metrics::new();
        let labels = RequestLabels::new(TcpLabels::new(None, None, None, false), "http", 200, "-", Flags::NONE);
        m.request_bytes.get_or_create(&labels).observe(700.0);
        m.response_bytes.get_or_create(&labels).observe(3.0);
        let text = m.encode();
        let les = |metric: &str| -> Vec<String> {
            text.lines()
                .filter(|l| l.starts_with(&format!("{metric}_bucket{{")))
                .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next().map(str::to_owned))
                .collect()
        };
        let want: Vec<String> =
            ENVOY_DEFAULT_BUCKETS.iter().map(|b| format!("{b:?}")).chain(["+Inf".to_owned()]).collect();
        for metric in ["istio_request_bytes", "istio_response_bytes"] {
            assert_eq!(les(metric), want, "{metric}:\n{text}");
        }
        // 700 bytes: above 500, within 1000.
        let count = |le: &str| {
            let line = text.lines().find(|l| l.starts_with(&format!("istio_request_bytes_bucket{{le=\"{le}\"")));
            line.and_then(|l| l.rsplit(' ').next()).map(str::to_owned)
        };
        assert_eq!((count("500.0").as_deref(), count("1000.0").as_deref()), (Some("0"), Some("1")), "{text}");
    }
}
