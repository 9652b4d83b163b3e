//! `networking.istio.io/v1` `VirtualService` and `DestinationRule` for mesh
//! traffic, validated into [`crate::l7::routing`] types. Unknown fields are
//! errors; fields Istio defines that this version does not implement yet are
//! errors too, named, so that a rule is never half applied.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde::Deserialize;

use super::{gateway::Secrets, k8s::ObjectMeta, validate::Ctx};
use crate::{
    l7::routing::{
        DestinationRule, Fault, HashKey, HeaderOps, HeaderPair, HeaderRules, HttpMatch, HttpRoute, LoadBalancer,
        OutlierDetection, Policy, Redirect, Retries, RetryOn, Rewrite, StrMatch, Subset, TcpRoute, TlsMatch, TlsRoute,
        VirtualService, WeightedDestination,
    },
    state::{CLUSTER_DOMAIN, Gateway, Service},
};

type Unsupported = Option<serde_yaml_ng::Value>;

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
    pub export_to: Unsupported,
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
    pub export_to: Unsupported,
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
    pub port_level_settings: Unsupported,
    pub tunnel: Unsupported,
    pub proxy_protocol: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientTlsSpec {
    pub mode: Option<String>,
    pub credential_name: Option<String>,
    pub ca_certificates: Option<String>,
    pub sni: Option<String>,
    pub insecure_skip_verify: Option<bool>,
    pub client_certificate: Unsupported,
    pub private_key: Unsupported,
    pub subject_alt_names: Unsupported,
    pub ca_crl: Unsupported,
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
    pub h2_upgrade_policy: Unsupported,
    pub use_client_protocol: Unsupported,
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

const NOT_YET: &str = "not supported by this version of mesh-agent";
/// The reserved gateway name for sidecar-less mesh traffic.
pub const MESH: &str = "mesh";

/// A `gateways` entry as `namespace/name` (a bare name is in `namespace`), or `mesh`.
fn gateway_ref(g: &str, namespace: &str) -> String {
    match g.split_once('/') {
        _ if g == MESH => MESH.to_owned(),
        Some((ns, name)) => format!("{ns}/{name}"),
        None => format!("{namespace}/{g}"),
    }
}

fn reject(ctx: &mut Ctx<'_>, base: &str, fields: &[(&str, &Unsupported)]) {
    for (name, value) in fields {
        if value.is_some() {
            ctx.error(format!("{base}.{name}"), NOT_YET);
        }
    }
}

/// Istio's duration format: `250ms`, `0.5s`, `2s`, `1m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?}: expected a duration such as 500ms or 2s"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: the unit must be ms, s, m or h")),
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("{s:?}: must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Resolves a host as Istio does for mesh Services: a short name (in the
/// object's namespace), `name.ns`, `name.ns.svc`, the FQDN, or a VIP.
pub fn resolve_host<'a>(
    host: &str,
    namespace: &str,
    services: &'a BTreeMap<String, Arc<Service>>,
) -> Option<&'a Arc<Service>> {
    // A ServiceEntry host, in the object's namespace first.
    if let Some(s) = services.get(&format!("{namespace}/{host}")).filter(|s| s.external.is_some()) {
        return Some(s);
    }
    if let Some(s) = services.values().find(|s| s.external.is_some() && *s.hostname == *host) {
        return Some(s);
    }
    let suffix = format!(".svc.{CLUSTER_DOMAIN}");
    let trimmed = host.strip_suffix(&suffix).or_else(|| host.strip_suffix(".svc")).unwrap_or(host);
    let key = match trimmed.split_once('.') {
        Some((name, ns)) if !ns.contains('.') => format!("{ns}/{name}"),
        Some(_) => return services.values().find(|s| s.vip.is_some_and(|v| v.to_string() == host)),
        None => format!("{namespace}/{trimmed}"),
    };
    services.get(&key)
}

fn string_match(ctx: &mut Ctx<'_>, field: &str, m: &StringMatchSpec) -> Option<StrMatch> {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(e), None, None) => Some(StrMatch::Exact(e.clone())),
        (None, Some(p), None) => Some(StrMatch::Prefix(p.clone())),
        (None, None, Some(r)) => match regex_lite::Regex::new(&format!("^(?:{r})$")) {
            Ok(re) => Some(StrMatch::Regex(re)),
            Err(e) => {
                ctx.error(format!("{field}.regex"), format!("{r:?}: {e}"));
                None
            }
        },
        _ => {
            ctx.error(field, "exactly one of exact, prefix or regex is required");
            None
        }
    }
}

pub(super) fn build_virtual_service(
    ctx: &mut Ctx<'_>,
    obj: &VirtualServiceObject,
    services: &BTreeMap<String, Arc<Service>>,
    gateways: &[Arc<Gateway>],
) -> Option<VirtualService> {
    let (name, namespace) = super::security::name_and_namespace(ctx, &obj.metadata)?;
    let before = ctx.error_count();
    let spec = &obj.spec;
    reject(ctx, "spec", &[("exportTo", &spec.export_to)]);
    // No `gateways` means the mesh only; `mesh` names the mesh among gateways.
    let gw_refs: Vec<String> = match spec.gateways.is_empty() {
        true => vec![MESH.to_owned()],
        false => spec.gateways.iter().map(|g| gateway_ref(g, &namespace)).collect(),
    };
    for (i, g) in gw_refs.iter().enumerate() {
        if g != MESH && !gateways.iter().any(|gw| *g == format!("{}/{}", gw.namespace, gw.name)) {
            ctx.error(format!("spec.gateways[{i}]"), format!("Gateway {g} does not exist"));
        }
    }
    let mesh_only = gw_refs.iter().all(|g| g == MESH);
    if spec.hosts.is_empty() {
        ctx.error("spec.hosts", "at least one host is required");
    }
    // For the mesh, hosts name Services; for gateways they are matched against
    // the request's host, and need not be Services.
    let mut hosts = Vec::new();
    for (i, h) in spec.hosts.iter().enumerate() {
        match resolve_host(h, &namespace, services) {
            Some(s) => hosts.push(format!("{}/{}", s.namespace, s.name)),
            None if !mesh_only => {}
            None => ctx.error(format!("spec.hosts[{i}]"), format!("{h:?} is not a known Service")),
        }
    }
    if !gw_refs.iter().any(|g| g == MESH) {
        hosts.clear();
    }
    let mut http = Vec::new();
    for (ri, r) in spec.http.iter().enumerate() {
        let base = format!("spec.http[{ri}]");
        reject(
            ctx,
            &base,
            &[
                ("mirrors", &r.mirrors),
                ("corsPolicy", &r.cors_policy),
                ("directResponse", &r.direct_response),
                ("delegate", &r.delegate),
            ],
        );
        let mut matches = Vec::new();
        for (mi, m) in r.matches.iter().enumerate() {
            let mb = format!("{base}.match[{mi}]");
            reject(
                ctx,
                &mb,
                &[
                    ("scheme", &m.scheme),
                    ("authority", &m.authority),
                    ("withoutHeaders", &m.without_headers),
                    ("ignoreUriCase", &m.ignore_uri_case),
                    ("sourceLabels", &m.source_labels),
                    ("sourceNamespace", &m.source_namespace),
                ],
            );
            let mut match_gateways = Vec::new();
            for (gi, g) in m.gateways.iter().enumerate() {
                let g = gateway_ref(g, &namespace);
                if !gw_refs.contains(&g) {
                    ctx.error(format!("{mb}.gateways[{gi}]"), format!("{g:?} is not in spec.gateways"));
                }
                match_gateways.push(g);
            }
            let uri = m.uri.as_ref().and_then(|u| string_match(ctx, &format!("{mb}.uri"), u));
            let method = m.method.as_ref().and_then(|u| string_match(ctx, &format!("{mb}.method"), u));
            let mut headers = Vec::new();
            for (h, sm) in &m.headers {
                if let Some(x) = string_match(ctx, &format!("{mb}.headers[{h}]"), sm) {
                    headers.push((h.to_ascii_lowercase(), x));
                }
            }
            let port = match m.port {
                Some(p) => match u16::try_from(p) {
                    Ok(p) if p != 0 => Some(p),
                    _ => {
                        ctx.error(format!("{mb}.port"), format!("port {p} is out of range 1-65535"));
                        None
                    }
                },
                None => None,
            };
            let mut query_params = Vec::new();
            for (q, sm) in &m.query_params {
                if let Some(x) = string_match(ctx, &format!("{mb}.queryParams[{q}]"), sm) {
                    query_params.push((q.clone(), x));
                }
            }
            matches.push(HttpMatch { uri, method, headers, query_params, port, gateways: match_gateways });
        }
        let routes = destinations(ctx, &base, &r.route, &namespace, services);
        let timeout = match &r.timeout {
            Some(t) => match parse_duration(t) {
                Ok(d) => Some(d),
                Err(e) => {
                    ctx.error(format!("{base}.timeout"), e);
                    None
                }
            },
            None => None,
        };
        let retries = r.retries.as_ref().and_then(|x| retries(ctx, &format!("{base}.retries"), x));
        let fault = r.fault.as_ref().and_then(|f| fault(ctx, &format!("{base}.fault"), f));
        let headers = r.headers.as_ref().map(|h| header_rules(ctx, &format!("{base}.headers"), h)).unwrap_or_default();
        let mirror = match &r.mirror {
            Some(m) => {
                let spec = [RouteDestinationSpec { destination: m.clone(), weight: None, headers: None }];
                let pct =
                    percent(ctx, &format!("{base}.mirrorPercentage.value"), &r.mirror_percentage, r.mirror_percent);
                // Errors name `route[0]`; say `mirror` instead.
                let errors = ctx.error_count();
                let dest = destinations(ctx, &format!("{base}.mirror"), &spec, namespace.as_ref(), services);
                ctx.rename_errors_since(errors, &format!("{base}.mirror.route[0]"), &format!("{base}.mirror"));
                dest.into_iter().next().map(|d| (d, pct))
            }
            None => None,
        };
        let rewrite = r.rewrite.as_ref().map(|w| {
            reject(ctx, &format!("{base}.rewrite"), &[("uriRegexRewrite", &w.uri_regex_rewrite)]);
            Rewrite { uri: w.uri.clone(), authority: w.authority.clone() }
        });
        let redirect = r.redirect.as_ref().and_then(|d| redirect(ctx, &format!("{base}.redirect"), d));
        if redirect.is_some() && (!r.route.is_empty() || rewrite.is_some()) {
            ctx.error(format!("{base}.redirect"), "a redirect rule cannot also have route or rewrite");
        } else if r.route.is_empty() && r.redirect.is_none() {
            ctx.error(format!("{base}.route"), "at least one destination (or a redirect) is required");
        }
        http.push(Arc::new(HttpRoute {
            name: r.name.clone(),
            matches,
            routes,
            timeout,
            retries,
            fault,
            headers,
            rewrite,
            redirect,
            mirror,
        }));
    }
    let mut tcp = Vec::new();
    for (ri, r) in spec.tcp.iter().enumerate() {
        let base = format!("spec.tcp[{ri}]");
        let mut ports = Vec::new();
        for (mi, m) in r.matches.iter().enumerate() {
            let mb = format!("{base}.match[{mi}]");
            reject(
                ctx,
                &mb,
                &[
                    ("destinationSubnets", &m.destination_subnets),
                    ("sourceLabels", &m.source_labels),
                    ("sourceNamespace", &m.source_namespace),
                    ("gateways", &m.gateways),
                ],
            );
            if let Ok(p) = match_port(ctx, &format!("{mb}.port"), m.port) {
                ports.push(p);
            }
        }
        if r.route.is_empty() {
            ctx.error(format!("{base}.route"), "at least one destination is required");
        }
        let routes = destinations(ctx, &base, &r.route, &namespace, services);
        tcp.push(Arc::new(TcpRoute { ports, routes }));
    }
    let tls = tls_routes(ctx, spec, &namespace, services, &gw_refs);
    let host_patterns = spec.hosts.clone();
    (ctx.error_count() == before).then_some(VirtualService {
        name,
        namespace,
        hosts,
        host_patterns,
        gateways: gw_refs,
        http,
        tcp,
        tls,
    })
}

/// A match's optional port; `Err` (reported) when out of range.
fn match_port(ctx: &mut Ctx<'_>, field: &str, port: Option<i64>) -> Result<Option<u16>, ()> {
    match port.map(u16::try_from) {
        Some(Ok(p)) if p != 0 => Ok(Some(p)),
        Some(_) => {
            ctx.error(field, "out of range 1-65535");
            Err(())
        }
        None => Ok(None),
    }
}

/// `tls` rules: routed by SNI at gateways (TLS PASSTHROUGH servers).
fn tls_routes(
    ctx: &mut Ctx<'_>,
    spec: &VirtualServiceSpec,
    namespace: &str,
    services: &BTreeMap<String, Arc<Service>>,
    gw_refs: &[String],
) -> Vec<Arc<TlsRoute>> {
    let mut out = Vec::new();
    for (ri, r) in spec.tls.iter().enumerate() {
        let base = format!("spec.tls[{ri}]");
        let mut matches = Vec::new();
        for (mi, m) in r.matches.iter().enumerate() {
            let mb = format!("{base}.match[{mi}]");
            reject(
                ctx,
                &mb,
                &[
                    ("destinationSubnets", &m.destination_subnets),
                    ("sourceLabels", &m.source_labels),
                    ("sourceNamespace", &m.source_namespace),
                ],
            );
            if m.sni_hosts.is_empty() {
                ctx.error(format!("{mb}.sniHosts"), "at least one SNI host is required");
            }
            let port = match_port(ctx, &format!("{mb}.port"), m.port).ok().flatten();
            let gateways: Vec<String> = m.gateways.iter().map(|g| gateway_ref(g, namespace)).collect();
            let applies: Vec<&String> =
                if gateways.is_empty() { gw_refs.iter().collect() } else { gateways.iter().collect() };
            if applies.iter().any(|g| *g == MESH) {
                ctx.error(
                    format!("{mb}.gateways"),
                    format!("tls rules for mesh traffic are {NOT_YET} (gateways only)"),
                );
            }
            matches.push(TlsMatch { sni_hosts: m.sni_hosts.clone(), port, gateways });
        }
        if r.matches.is_empty() {
            ctx.error(format!("{base}.match"), "at least one match with sniHosts is required");
        }
        if r.route.is_empty() {
            ctx.error(format!("{base}.route"), "at least one destination is required");
        }
        let routes = destinations(ctx, &base, &r.route, namespace, services);
        out.push(Arc::new(TlsRoute { matches, routes }));
    }
    out
}

/// `route[]`: destinations with weights adding up to 100 (one may omit its weight).
fn destinations(
    ctx: &mut Ctx<'_>,
    base: &str,
    route: &[RouteDestinationSpec],
    namespace: &str,
    services: &BTreeMap<String, Arc<Service>>,
) -> Vec<WeightedDestination> {
    let mut routes = Vec::new();
    for (di, d) in route.iter().enumerate() {
        let db = format!("{base}.route[{di}]");
        reject(ctx, &db, &[("headers", &d.headers)]);
        let Some(service) = resolve_host(&d.destination.host, namespace, services) else {
            ctx.error(format!("{db}.destination.host"), format!("{:?} is not a known Service", d.destination.host));
            continue;
        };
        let port = match &d.destination.port {
            Some(p) => match u16::try_from(p.number) {
                Ok(n) if service.ports.iter().any(|sp| sp.port == n) => Some(n),
                _ => {
                    ctx.error(
                        format!("{db}.destination.port.number"),
                        format!("Service {}/{} has no port {}", service.namespace, service.name, p.number),
                    );
                    continue;
                }
            },
            None => None,
        };
        let weight = match d.weight {
            None => None,
            Some(w) if (0..=100).contains(&w) => Some(w as u32),
            Some(w) => {
                ctx.error(format!("{db}.weight"), format!("{w} is out of range 0-100"));
                continue;
            }
        };
        routes.push(WeightedDestination {
            service: format!("{}/{}", service.namespace, service.name),
            subset: d.destination.subset.clone(),
            port,
            weight: weight.unwrap_or(if route.len() == 1 { 100 } else { 0 }),
        });
    }
    let total: u32 = routes.iter().map(|r| r.weight).sum();
    if routes.len() > 1 && total != 100 {
        ctx.error(format!("{base}.route"), format!("weights add up to {total}, not 100"));
    }
    routes
}

fn redirect(ctx: &mut Ctx<'_>, base: &str, d: &RedirectSpec) -> Option<Redirect> {
    reject(ctx, base, &[("port", &d.port), ("derivePort", &d.derive_port), ("scheme", &d.scheme)]);
    let code = match d.redirect_code {
        None => 301,
        Some(c @ (301 | 302 | 303 | 307 | 308)) => c as u16,
        Some(c) => {
            ctx.error(format!("{base}.redirectCode"), format!("{c}: expected 301, 302, 303, 307 or 308"));
            return None;
        }
    };
    Some(Redirect { uri: d.uri.clone(), authority: d.authority.clone(), code })
}

fn duration_field(ctx: &mut Ctx<'_>, field: &str, s: &Option<String>) -> Option<Duration> {
    match parse_duration(s.as_deref()?) {
        Ok(d) => Some(d),
        Err(e) => {
            ctx.error(field, e);
            None
        }
    }
}

fn retries(ctx: &mut Ctx<'_>, base: &str, r: &RetriesSpec) -> Option<Retries> {
    reject(
        ctx,
        base,
        &[
            ("retryRemoteLocalities", &r.retry_remote_localities),
            ("retryIgnorePreviousHosts", &r.retry_ignore_previous_hosts),
            ("backoff", &r.backoff),
        ],
    );
    let attempts = match u32::try_from(r.attempts) {
        Ok(a) if a <= 100 => a,
        _ => {
            ctx.error(format!("{base}.attempts"), format!("{} is out of range 0-100", r.attempts));
            return None;
        }
    };
    let per_try_timeout = duration_field(ctx, &format!("{base}.perTryTimeout"), &r.per_try_timeout);
    // Istio's default conditions when none are given.
    let spec = r.retry_on.as_deref().unwrap_or("connect-failure,refused-stream,retriable-status-codes,503");
    let mut on = RetryOn::default();
    for (i, cond) in spec.split(',').map(str::trim).filter(|c| !c.is_empty()).enumerate() {
        match cond {
            "5xx" => on.five_xx = true,
            "gateway-error" => on.gateway_error = true,
            "reset" | "refused-stream" => on.reset = true,
            "connect-failure" => on.connect_failure = true,
            "retriable-status-codes" => {}
            code => match code.parse::<u16>() {
                Ok(c) if (100..=599).contains(&c) => on.status_codes.push(c),
                _ => ctx.error(
                    format!("{base}.retryOn"),
                    format!(
                        "condition {} {code:?}: supported are 5xx, gateway-error, reset, refused-stream, \
                         connect-failure, retriable-status-codes and status codes",
                        i + 1
                    ),
                ),
            },
        }
    }
    (attempts > 0).then_some(Retries { attempts, per_try_timeout, on })
}

fn percent(ctx: &mut Ctx<'_>, field: &str, p: &Option<PercentSpec>, legacy: Option<i64>) -> f64 {
    let v = p.as_ref().map(|p| p.value).or(legacy.map(|l| l as f64)).unwrap_or(100.0);
    if !(0.0..=100.0).contains(&v) {
        ctx.error(field, format!("{v} is out of range 0-100"));
    }
    v
}

fn fault(ctx: &mut Ctx<'_>, base: &str, f: &FaultSpec) -> Option<Fault> {
    let mut out = Fault::default();
    if let Some(d) = &f.delay {
        reject(ctx, &format!("{base}.delay"), &[("exponentialDelay", &d.exponential_delay)]);
        let pct = percent(ctx, &format!("{base}.delay.percentage.value"), &d.percentage, d.percent);
        match duration_field(ctx, &format!("{base}.delay.fixedDelay"), &d.fixed_delay) {
            Some(t) => out.delay = Some((t, pct)),
            None if d.fixed_delay.is_none() => ctx.error(format!("{base}.delay.fixedDelay"), "required"),
            None => {}
        }
    }
    if let Some(a) = &f.abort {
        reject(ctx, &format!("{base}.abort"), &[("grpcStatus", &a.grpc_status), ("http2Error", &a.http2_error)]);
        let pct = percent(ctx, &format!("{base}.abort.percentage.value"), &a.percentage, None);
        match a.http_status.map(u16::try_from) {
            Some(Ok(code)) if (200..=599).contains(&code) => out.abort = Some((code, pct)),
            Some(_) => ctx.error(format!("{base}.abort.httpStatus"), "must be an HTTP status 200-599"),
            None => ctx.error(format!("{base}.abort.httpStatus"), "required"),
        }
    }
    Some(out)
}

fn header_ops(ctx: &mut Ctx<'_>, base: &str, h: &Option<HeaderOpsSpec>) -> HeaderOps {
    use hyper::header::{HeaderName, HeaderValue};
    let Some(h) = h else { return HeaderOps::default() };
    let name = |ctx: &mut Ctx<'_>, field: String, k: &str| match HeaderName::from_bytes(k.as_bytes()) {
        Ok(n) => Some(n),
        Err(_) => {
            ctx.error(field, format!("{k:?} is not a valid header name"));
            None
        }
    };
    let pairs = |ctx: &mut Ctx<'_>, op: &str, m: &BTreeMap<String, String>| {
        let mut out = Vec::new();
        for (k, v) in m {
            let field = format!("{base}.{op}.{k}");
            let value = HeaderValue::from_str(v);
            if value.is_err() {
                ctx.error(field.clone(), format!("{v:?} is not a valid header value"));
            }
            if let (Some(n), Ok(v)) = (name(ctx, field, k), value) {
                out.push(HeaderPair(n, v));
            }
        }
        out
    };
    let set = pairs(ctx, "set", &h.set);
    let add = pairs(ctx, "add", &h.add);
    let remove = h.remove.iter().enumerate().filter_map(|(i, k)| name(ctx, format!("{base}.remove[{i}]"), k)).collect();
    HeaderOps { set, add, remove }
}

fn header_rules(ctx: &mut Ctx<'_>, base: &str, h: &HeadersSpec) -> HeaderRules {
    HeaderRules {
        request: header_ops(ctx, &format!("{base}.request"), &h.request),
        response: header_ops(ctx, &format!("{base}.response"), &h.response),
    }
}

/// A count in a policy: 0 or more, at most `max`.
fn count(ctx: &mut Ctx<'_>, field: &str, v: Option<i64>, max: i64) -> Option<u32> {
    let v = v?;
    if (0..=max).contains(&v) {
        Some(v as u32)
    } else {
        ctx.error(field, format!("{v} is out of range 0-{max}"));
        None
    }
}

/// A `trafficPolicy`; what it leaves unset comes from `inherited` (a subset's
/// policy inherits the rule's).
fn policy(
    ctx: &mut Ctx<'_>,
    field: &str,
    tp: &Option<TrafficPolicySpec>,
    inherited: &Policy,
    secrets: &Secrets,
) -> Policy {
    let mut out = inherited.clone();
    let Some(tp) = tp.as_ref() else { return out };
    if let Some(tls) = &tp.tls {
        out.tls = client_tls(ctx, &format!("{field}.tls"), tls, secrets);
    }
    reject(
        ctx,
        field,
        &[
            ("portLevelSettings", &tp.port_level_settings),
            ("tunnel", &tp.tunnel),
            ("proxyProtocol", &tp.proxy_protocol),
        ],
    );
    if let Some(lb) = &tp.load_balancer
        && let Some(x) = load_balancer(ctx, &format!("{field}.loadBalancer"), lb)
    {
        out.load_balancer = x;
    }
    if let Some(cp) = &tp.connection_pool {
        let f = format!("{field}.connectionPool");
        if let Some(tcp) = &cp.tcp {
            let tf = format!("{f}.tcp");
            reject(
                ctx,
                &tf,
                &[
                    ("tcpKeepalive", &tcp.tcp_keepalive),
                    ("maxConnectionDuration", &tcp.max_connection_duration),
                    ("idleTimeout", &tcp.idle_timeout),
                ],
            );
            if let Some(n) = count(ctx, &format!("{tf}.maxConnections"), tcp.max_connections, i64::from(u32::MAX)) {
                out.pool.max_connections = Some(n);
            }
            if let Some(t) = duration_field(ctx, &format!("{tf}.connectTimeout"), &tcp.connect_timeout) {
                out.pool.connect_timeout = Some(t);
            }
        }
        if let Some(http) = &cp.http {
            let hf = format!("{f}.http");
            reject(
                ctx,
                &hf,
                &[
                    ("maxRetries", &http.max_retries),
                    ("h2UpgradePolicy", &http.h2_upgrade_policy),
                    ("useClientProtocol", &http.use_client_protocol),
                    ("maxConcurrentStreams", &http.max_concurrent_streams),
                ],
            );
            let max = i64::from(u32::MAX);
            if let Some(n) = count(ctx, &format!("{hf}.http1MaxPendingRequests"), http.http1_max_pending_requests, max)
            {
                out.pool.max_pending = Some(n);
            }
            if let Some(n) = count(ctx, &format!("{hf}.http2MaxRequests"), http.http2_max_requests, max) {
                out.pool.max_requests = Some(n);
            }
            // 0 means unlimited, as in Istio.
            match count(ctx, &format!("{hf}.maxRequestsPerConnection"), http.max_requests_per_connection, max) {
                Some(0) => out.pool.max_requests_per_connection = None,
                Some(n) => out.pool.max_requests_per_connection = Some(n),
                None => {}
            }
            if let Some(t) = duration_field(ctx, &format!("{hf}.idleTimeout"), &http.idle_timeout) {
                out.pool.idle_timeout = Some(t);
            }
        }
    }
    if let Some(od) = &tp.outlier_detection {
        let f = format!("{field}.outlierDetection");
        reject(
            ctx,
            &f,
            &[
                ("consecutiveErrors", &od.consecutive_errors),
                ("minHealthPercent", &od.min_health_percent),
                ("splitExternalLocalOriginErrors", &od.split_external_local_origin_errors),
                ("consecutiveLocalOriginFailures", &od.consecutive_local_origin_failures),
            ],
        );
        // Istio's defaults.
        out.outlier = Some(OutlierDetection {
            consecutive_5xx: count(ctx, &format!("{f}.consecutive5xxErrors"), od.consecutive_5xx_errors, 1000)
                .unwrap_or(5),
            consecutive_gateway: count(
                ctx,
                &format!("{f}.consecutiveGatewayErrors"),
                od.consecutive_gateway_errors,
                1000,
            )
            .unwrap_or(0),
            interval: duration_field(ctx, &format!("{f}.interval"), &od.interval).unwrap_or(Duration::from_secs(10)),
            base_ejection: duration_field(ctx, &format!("{f}.baseEjectionTime"), &od.base_ejection_time)
                .unwrap_or(Duration::from_secs(30)),
            max_ejection_percent: count(ctx, &format!("{f}.maxEjectionPercent"), od.max_ejection_percent, 100)
                .unwrap_or(10),
        });
    }
    out
}

fn load_balancer(ctx: &mut Ctx<'_>, lbf: &str, lb: &LoadBalancerSpec) -> Option<LoadBalancer> {
    reject(
        ctx,
        lbf,
        &[("localityLbSetting", &lb.locality_lb_setting), ("warmupDurationSecs", &lb.warmup_duration_secs)],
    );
    if let Some(ch) = &lb.consistent_hash {
        let f = format!("{lbf}.consistentHash");
        if lb.simple.is_some() {
            ctx.error(lbf, "set either simple or consistentHash");
        }
        reject(
            ctx,
            &f,
            &[
                ("httpCookie", &ch.http_cookie),
                ("ringHash", &ch.ring_hash),
                ("maglev", &ch.maglev),
                ("minimumRingSize", &ch.minimum_ring_size),
            ],
        );
        let key = match (&ch.http_header_name, &ch.http_query_parameter_name, ch.use_source_ip) {
            (Some(h), None, None | Some(false)) => HashKey::Header(h.to_ascii_lowercase()),
            (None, Some(q), None | Some(false)) => HashKey::QueryParameter(q.clone()),
            (None, None, Some(true)) => HashKey::SourceIp,
            _ => {
                ctx.error(&f, "exactly one of httpHeaderName, httpQueryParameterName or useSourceIp is required");
                return None;
            }
        };
        return Some(LoadBalancer::ConsistentHash(key));
    }
    match lb.simple.as_deref() {
        None | Some("UNSPECIFIED") | Some("ROUND_ROBIN") => Some(LoadBalancer::RoundRobin),
        Some("RANDOM") => Some(LoadBalancer::Random),
        // LEAST_CONN is Istio's deprecated name for LEAST_REQUEST.
        Some("LEAST_REQUEST" | "LEAST_CONN") => Some(LoadBalancer::LeastRequest),
        Some(other @ "PASSTHROUGH") => {
            ctx.error(format!("{lbf}.simple"), format!("{other} is {NOT_YET}"));
            None
        }
        Some(other) => {
            ctx.error(format!("{lbf}.simple"), format!("{other:?}: expected ROUND_ROBIN, RANDOM or LEAST_REQUEST"));
            None
        }
    }
}

pub(super) fn build_destination_rule(
    ctx: &mut Ctx<'_>,
    obj: &DestinationRuleObject,
    services: &BTreeMap<String, Arc<Service>>,
    secrets: &Secrets,
) -> Option<DestinationRule> {
    let (name, namespace) = super::security::name_and_namespace(ctx, &obj.metadata)?;
    let before = ctx.error_count();
    let spec = &obj.spec;
    reject(ctx, "spec", &[("exportTo", &spec.export_to), ("workloadSelector", &spec.workload_selector)]);
    let service = match resolve_host(&spec.host, &namespace, services) {
        Some(s) => format!("{}/{}", s.namespace, s.name),
        None => {
            ctx.error("spec.host", format!("{:?} is not a known Service", spec.host));
            String::new()
        }
    };
    let top = policy(ctx, "spec.trafficPolicy", &spec.traffic_policy, &Policy::default(), secrets);
    let mut subsets = Vec::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let field = format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            ctx.error(format!("{field}.name"), "required");
        }
        if subsets.iter().any(|x: &Subset| x.name == s.name) {
            ctx.error(format!("{field}.name"), format!("subset {:?} is defined twice", s.name));
        }
        let own = policy(ctx, &format!("{field}.trafficPolicy"), &s.traffic_policy, &top, secrets);
        subsets.push(Subset { name: s.name.clone(), labels: s.labels.clone(), policy: own });
    }
    (ctx.error_count() == before).then_some(DestinationRule { name, namespace, service, subsets, policy: top })
}

/// `trafficPolicy.tls`: SIMPLE originates TLS to the destination (the
/// application speaks plain HTTP); DISABLE and ISTIO_MUTUAL leave the
/// connection as the mesh makes it (mesh hops are always mutual TLS here).
fn client_tls(
    ctx: &mut Ctx<'_>,
    field: &str,
    t: &ClientTlsSpec,
    secrets: &Secrets,
) -> Option<Arc<crate::l7::routing::TlsOrigination>> {
    reject(
        ctx,
        field,
        &[
            ("clientCertificate", &t.client_certificate),
            ("privateKey", &t.private_key),
            ("subjectAltNames", &t.subject_alt_names),
            ("caCrl", &t.ca_crl),
        ],
    );
    match t.mode.as_deref().unwrap_or("DISABLE") {
        "DISABLE" | "ISTIO_MUTUAL" => return None,
        "SIMPLE" => {}
        "MUTUAL" => {
            ctx.error(format!("{field}.mode"), format!("MUTUAL is {NOT_YET}"));
            return None;
        }
        other => {
            ctx.error(format!("{field}.mode"), format!("{other:?}: expected DISABLE, SIMPLE or ISTIO_MUTUAL"));
            return None;
        }
    }
    let insecure = t.insecure_skip_verify.unwrap_or(false);
    let (ca, pem) = match (&t.credential_name, &t.ca_certificates) {
        (Some(_), Some(_)) => {
            ctx.error(format!("{field}.caCertificates"), "give credentialName or caCertificates, not both");
            return None;
        }
        (Some(name), None) => {
            let key = if name.contains('/') { name.clone() } else { format!("{}/{name}", ctx_namespace(ctx)) };
            let value = secrets.get(&key).map(|s| {
                s.value("ca.crt").and_then(|v| match v {
                    Some(v) => Ok(v),
                    None => s.value("cacert").and_then(|v| v.ok_or_else(|| "has no ca.crt".to_owned())),
                })
            });
            match value {
                Some(Ok(pem)) => (format!("Secret {key}"), pem),
                Some(Err(e)) => {
                    ctx.error(format!("{field}.credentialName"), format!("Secret {key}: {e}"));
                    return None;
                }
                None => {
                    ctx.error(format!("{field}.credentialName"), format!("Secret {key} does not exist"));
                    return None;
                }
            }
        }
        (None, path) => {
            let path = path.as_deref().unwrap_or(crate::l7::routing::SYSTEM_ROOTS);
            match std::fs::read(path) {
                Ok(pem) => (path.to_owned(), pem),
                Err(_) if insecure => (path.to_owned(), Vec::new()),
                Err(e) => {
                    ctx.error(format!("{field}.caCertificates"), format!("{path}: {e}"));
                    return None;
                }
            }
        }
    };
    match crate::l7::routing::TlsOrigination::new(t.sni.clone(), ca, &pem, insecure) {
        Ok(o) => Some(Arc::new(o)),
        Err(e) => {
            ctx.error(field.to_owned(), e);
            None
        }
    }
}

/// The namespace of the object being validated (`Kind namespace/name`).
fn ctx_namespace(ctx: &Ctx<'_>) -> String {
    ctx.object().split_once(' ').and_then(|(_, n)| n.split_once('/')).map_or("default", |(ns, _)| ns).to_owned()
}
