//! The YAML shapes of `VirtualService` and `DestinationRule`, as Istio's API
//! defines them; unknown fields are errors, fields not implemented yet are
//! kept (as `Unsupported`) so that they can be named.
use std::collections::BTreeMap;

use serde::Deserialize;

use super::Unsupported;
use crate::config::k8s::ObjectMeta;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VirtualServiceObject {
    #[allow(dead_code)]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: VirtualServiceSpec,
    #[allow(dead_code)]
    pub status: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRouteSpec>,
    #[serde(default)]
    pub tcp: Vec<TcpRouteSpec>,
    #[serde(default)]
    pub tls: Vec<TlsRouteSpec>,
    pub export_to: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsRouteSpec {
    #[serde(default, rename = "match")]
    pub matches: Vec<TlsMatchSpec>,
    #[serde(default)]
    pub route: Vec<RouteDestinationSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsMatchSpec {
    #[serde(default)]
    pub sni_hosts: Vec<String>,
    pub port: Option<i64>,
    #[serde(default)]
    pub gateways: Vec<String>,
    pub destination_subnets: Unsupported,
    pub source_labels: Unsupported,
    pub source_namespace: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatchSpec>,
    #[serde(default)]
    pub route: Vec<RouteDestinationSpec>,
    pub timeout: Option<String>,
    pub retries: Option<RetriesSpec>,
    pub fault: Option<FaultSpec>,
    pub mirror: Option<DestinationSpec>,
    pub mirror_percentage: Option<PercentSpec>,
    /// Deprecated integer form of `mirrorPercentage`, still accepted by Istio.
    pub mirror_percent: Option<i64>,
    pub mirrors: Unsupported,
    pub rewrite: Option<RewriteSpec>,
    pub redirect: Option<RedirectSpec>,
    pub headers: Option<HeadersSpec>,
    pub cors_policy: Unsupported,
    pub direct_response: Unsupported,
    pub delegate: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpRouteSpec {
    #[serde(default, rename = "match")]
    pub matches: Vec<TcpMatchSpec>,
    #[serde(default)]
    pub route: Vec<RouteDestinationSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpMatchSpec {
    pub port: Option<i64>,
    pub destination_subnets: Unsupported,
    pub source_labels: Unsupported,
    pub source_namespace: Unsupported,
    pub gateways: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RewriteSpec {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RedirectSpec {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub redirect_code: Option<i64>,
    pub port: Unsupported,
    pub derive_port: Unsupported,
    pub scheme: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetriesSpec {
    #[serde(default)]
    pub attempts: i64,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
    pub retry_remote_localities: Unsupported,
    pub retry_ignore_previous_hosts: Unsupported,
    pub backoff: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultSpec {
    pub delay: Option<DelaySpec>,
    pub abort: Option<AbortSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DelaySpec {
    pub fixed_delay: Option<String>,
    pub percentage: Option<PercentSpec>,
    /// Deprecated integer percentage, still accepted by Istio.
    pub percent: Option<i64>,
    pub exponential_delay: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AbortSpec {
    pub http_status: Option<i64>,
    pub percentage: Option<PercentSpec>,
    pub grpc_status: Unsupported,
    pub http2_error: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PercentSpec {
    pub value: f64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadersSpec {
    pub request: Option<HeaderOpsSpec>,
    pub response: Option<HeaderOpsSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOpsSpec {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpMatchSpec {
    /// Only for logs in Istio; accepted and unused.
    #[allow(dead_code)]
    pub name: Option<String>,
    pub uri: Option<StringMatchSpec>,
    pub method: Option<StringMatchSpec>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatchSpec>,
    pub port: Option<i64>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatchSpec>,
    pub scheme: Unsupported,
    pub authority: Unsupported,
    pub without_headers: Unsupported,
    pub ignore_uri_case: Unsupported,
    pub source_labels: Unsupported,
    pub source_namespace: Unsupported,
    #[serde(default)]
    pub gateways: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StringMatchSpec {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteDestinationSpec {
    pub destination: DestinationSpec,
    pub weight: Option<i64>,
    pub headers: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationSpec {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelectorSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSelectorSpec {
    pub number: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRuleObject {
    #[allow(dead_code)]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DestinationRuleSpec,
    #[allow(dead_code)]
    pub status: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub subsets: Vec<SubsetSpec>,
    pub traffic_policy: Option<TrafficPolicySpec>,
    pub export_to: Option<Vec<String>>,
    pub workload_selector: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SubsetSpec {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicySpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    pub load_balancer: Option<LoadBalancerSpec>,
    pub connection_pool: Option<ConnectionPoolSpec>,
    pub outlier_detection: Option<OutlierDetectionSpec>,
    pub tls: Option<ClientTlsSpec>,
    pub port_level_settings: Option<Vec<PortTrafficPolicySpec>>,
    pub tunnel: Unsupported,
    pub proxy_protocol: Unsupported,
}

/// A `portLevelSettings` entry: the policy for one Service port.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortTrafficPolicySpec {
    pub port: Option<PortSelectorSpec>,
    pub load_balancer: Option<LoadBalancerSpec>,
    pub connection_pool: Option<ConnectionPoolSpec>,
    pub outlier_detection: Option<OutlierDetectionSpec>,
    pub tls: Option<ClientTlsSpec>,
}

impl PortTrafficPolicySpec {
    /// The entry as a `trafficPolicy` of its own.
    pub fn as_policy(&self) -> TrafficPolicySpec {
        TrafficPolicySpec {
            load_balancer: self.load_balancer.clone(),
            connection_pool: self.connection_pool.clone(),
            outlier_detection: self.outlier_detection.clone(),
            tls: self.tls.clone(),
            ..TrafficPolicySpec::default()
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientTlsSpec {
    pub mode: Option<String>,
    pub credential_name: Option<String>,
    pub ca_certificates: Option<String>,
    pub sni: Option<String>,
    pub insecure_skip_verify: Option<bool>,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub subject_alt_names: Option<Vec<String>>,
    pub ca_crl: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionPoolSpec {
    pub tcp: Option<TcpPoolSpec>,
    pub http: Option<HttpPoolSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpPoolSpec {
    pub max_connections: Option<i64>,
    pub connect_timeout: Option<String>,
    pub tcp_keepalive: Unsupported,
    pub max_connection_duration: Unsupported,
    pub idle_timeout: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpPoolSpec {
    pub http1_max_pending_requests: Option<i64>,
    pub http2_max_requests: Option<i64>,
    pub max_requests_per_connection: Option<i64>,
    pub max_retries: Unsupported,
    pub idle_timeout: Option<String>,
    pub h2_upgrade_policy: Option<String>,
    pub use_client_protocol: Option<bool>,
    pub max_concurrent_streams: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetectionSpec {
    pub consecutive_5xx_errors: Option<i64>,
    pub consecutive_gateway_errors: Option<i64>,
    pub interval: Option<String>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<i64>,
    pub consecutive_errors: Unsupported,
    pub min_health_percent: Unsupported,
    pub split_external_local_origin_errors: Unsupported,
    pub consecutive_local_origin_failures: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    pub simple: Option<String>,
    pub consistent_hash: Option<ConsistentHashSpec>,
    pub locality_lb_setting: Unsupported,
    pub warmup_duration_secs: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConsistentHashSpec {
    pub http_header_name: Option<String>,
    pub http_query_parameter_name: Option<String>,
    pub use_source_ip: Option<bool>,
    pub http_cookie: Unsupported,
    pub ring_hash: Unsupported,
    pub maglev: Unsupported,
    pub minimum_ring_size: Unsupported,
}
