//! `telemetry.istio.io/v1` (and `v1alpha1`) `Telemetry`: the metrics a
//! workload reports, whether it is access-logged and how it is traced,
//! validated into [`crate::state::telemetry::Telemetry`]. What the agent
//! cannot do yet — `targetRefs` other than Services, custom metrics, reporting intervals, log
//! filters, CEL beyond a literal and the request's attributes, metrics and
//! log providers other than the built-in `prometheus` and `envoy`, tracing
//! providers other than MeshConfig's `opentelemetry` ones — is a named
//! error, never silently ignored.
use std::{collections::BTreeMap, sync::Arc};

use serde::Deserialize;

use super::{
    k8s::ObjectMeta,
    object::{Ctx, TargetRef, name_and_namespace, targets},
    security::{Selector, selector},
};
use crate::state::{
    telemetry::{LoggingRule, MetricOverride, MetricSet, Modes, RequestAttribute, TagOverride, TagValue, Telemetry},
    trace::{CustomTag, CustomTags, TraceSettings, TracingRule},
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TelemetryObject {
    #[allow(dead_code)]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: TelemetrySpec,
    #[allow(dead_code)]
    pub status: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TelemetrySpec {
    pub selector: Option<Selector>,
    pub target_ref: Option<TargetRef>,
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    #[serde(default)]
    pub tracing: Vec<TracingSpec>,
    #[serde(default)]
    pub metrics: Vec<MetricsSpec>,
    #[serde(default)]
    pub access_logging: Vec<AccessLoggingSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MetricsSpec {
    #[serde(default)]
    pub providers: Vec<ProviderSpec>,
    #[serde(default)]
    pub overrides: Vec<OverrideSpec>,
    pub reporting_interval: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSpec {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OverrideSpec {
    #[serde(rename = "match")]
    pub matches: Option<MetricMatch>,
    pub disabled: Option<bool>,
    #[serde(default)]
    pub tag_overrides: BTreeMap<String, TagOverrideSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagOverrideSpec {
    pub operation: Option<String>,
    pub value: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MetricMatch {
    pub metric: Option<String>,
    pub custom_metric: Option<String>,
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AccessLoggingSpec {
    #[serde(default)]
    pub providers: Vec<ProviderSpec>,
    #[serde(default)]
    pub disabled: Option<bool>,
    pub filter: Option<serde_yaml_ng::Value>,
    #[serde(rename = "match")]
    pub matches: Option<LogMatch>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TracingSpec {
    #[serde(rename = "match")]
    pub matches: Option<LogMatch>,
    #[serde(default)]
    pub providers: Vec<ProviderSpec>,
    #[serde(default)]
    pub custom_tags: Option<BTreeMap<String, CustomTagSpec>>,
    pub random_sampling_percentage: Option<f64>,
    pub disable_span_reporting: Option<bool>,
    pub use_request_id_for_trace_sampling: Option<bool>,
    pub enable_istio_tags: Option<bool>,
    pub disable_context_propagation: Option<bool>,
}

/// A custom span tag (Telemetry `customTags`, ProxyConfig `tracing.custom_tags`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomTagSpec {
    pub literal: Option<LiteralSpec>,
    pub environment: Option<FromSpec>,
    pub header: Option<FromSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiteralSpec {
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FromSpec {
    #[serde(default)]
    pub name: String,
    #[serde(alias = "default_value")]
    pub default_value: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogMatch {
    pub mode: Option<String>,
}

/// `match.mode`: `CLIENT_AND_SERVER` (the default), `CLIENT` or `SERVER`.
fn modes(ctx: &mut Ctx<'_>, field: &str, mode: Option<&str>) -> Option<Modes> {
    match mode {
        None | Some("CLIENT_AND_SERVER") => Some(Modes::BOTH),
        Some("CLIENT") => Some(Modes { client: true, server: false }),
        Some("SERVER") => Some(Modes { client: false, server: true }),
        Some(other) => {
            ctx.error(field, format!("{other:?}: expected CLIENT_AND_SERVER, CLIENT or SERVER"));
            None
        }
    }
}

/// Providers of a kind: only the built-in one (`prometheus` for metrics,
/// `envoy` for access logs), or none (the parent's).
fn providers(ctx: &mut Ctx<'_>, field: &str, list: &[ProviderSpec], builtin: &str) -> bool {
    let mut ok = true;
    for (i, p) in list.iter().enumerate() {
        if p.name != builtin {
            ctx.error(
                format!("{field}[{i}].name"),
                format!(
                    "{:?}: only the built-in provider {builtin:?} is supported by this version of mesh-agent",
                    p.name
                ),
            );
            ok = false;
        }
    }
    ok
}

pub(super) fn build_telemetry(ctx: &mut Ctx<'_>, obj: &TelemetryObject, trace: &TraceSettings) -> Option<Telemetry> {
    let (name, namespace) = name_and_namespace(ctx, &obj.metadata)?;
    let spec = &obj.spec;
    let selector = selector(ctx, &spec.selector);
    let mut ok = spec.selector.is_none() || selector.is_some();
    let attached = targets(ctx, &namespace, spec.target_ref.as_ref(), &spec.target_refs);
    ok &= attached.is_some();
    let attached = attached.unwrap_or_default();
    let (services, selector, gateway_class) =
        (attached.services, attached.gateway.or(selector), attached.gateway_class);
    if spec.selector.is_some() && (spec.target_ref.is_some() || !spec.target_refs.is_empty()) {
        ctx.error("spec.targetRefs", "only one of selector and targetRefs (as Istio)");
        ok = false;
    }
    let mut metric_overrides = Vec::new();
    for (i, m) in spec.metrics.iter().enumerate() {
        let field = format!("spec.metrics[{i}]");
        ok &= providers(ctx, &format!("{field}.providers"), &m.providers, "prometheus");
        if m.reporting_interval.is_some() {
            ctx.error(format!("{field}.reportingInterval"), "is not supported: metrics are read when scraped");
            ok = false;
        }
        for (j, o) in m.overrides.iter().enumerate() {
            let field = format!("{field}.overrides[{j}]");
            match metric_override(ctx, &field, o) {
                Some(o) => metric_overrides.push(o),
                None => ok = false,
            }
        }
    }
    let mut access_logging = Vec::new();
    for (i, l) in spec.access_logging.iter().enumerate() {
        let field = format!("spec.accessLogging[{i}]");
        ok &= providers(ctx, &format!("{field}.providers"), &l.providers, "envoy");
        if l.filter.is_some() {
            ctx.error(format!("{field}.filter"), "is not supported by this version of mesh-agent (CEL filters)");
            ok = false;
        }
        let mode = l.matches.as_ref().and_then(|m| m.mode.as_deref());
        match modes(ctx, &format!("{field}.match.mode"), mode) {
            Some(modes) => access_logging.push(LoggingRule { modes, disabled: l.disabled.unwrap_or(false) }),
            None => ok = false,
        }
    }
    let mut tracing = Vec::new();
    for (i, t) in spec.tracing.iter().enumerate() {
        let operator = &*namespace == crate::state::ROOT_NAMESPACE;
        match tracing_rule(ctx, &format!("spec.tracing[{i}]"), t, trace, operator) {
            Some(rule) => tracing.push(rule),
            None => ok = false,
        }
    }
    let created = obj.metadata.creation_timestamp.clone();
    ok.then_some(Telemetry {
        name,
        namespace,
        created,
        selector,
        services,
        gateway_class,
        metric_overrides,
        access_logging,
        tracing,
    })
}

/// A `tracing[]` entry: its provider must be one of MeshConfig's
/// OpenTelemetry providers (Istio would silently trace nothing).
fn tracing_rule(
    ctx: &mut Ctx<'_>,
    field: &str,
    t: &TracingSpec,
    trace: &TraceSettings,
    operator: bool,
) -> Option<TracingRule> {
    let before = ctx.error_count();
    let modes = modes(ctx, &format!("{field}.match.mode"), t.matches.as_ref().and_then(|m| m.mode.as_deref()));
    if t.providers.len() > 1 {
        ctx.error(format!("{field}.providers"), "at most one provider (Istio uses only the first)");
    }
    let provider = t.providers.first().map(|p| Arc::<str>::from(p.name.as_str()));
    if let Some(name) = &provider
        && trace.provider(name).is_none()
    {
        ctx.error(
            format!("{field}.providers[0].name"),
            format!("{name:?}: not an opentelemetry provider of MeshConfig's extensionProviders"),
        );
    }
    if let Some(p) = t.random_sampling_percentage
        && !(0.0..=100.0).contains(&p)
    {
        ctx.error(format!("{field}.randomSamplingPercentage"), format!("{p}: expected 0 to 100"));
    }
    let field_tags = format!("{field}.customTags");
    let custom_tags = t.custom_tags.as_ref().map(|tags| custom_tags(ctx, &field_tags, tags, operator));
    (ctx.error_count() == before).then(|| TracingRule {
        modes: modes.unwrap_or(Modes::BOTH),
        provider,
        disable_span_reporting: t.disable_span_reporting,
        custom_tags,
        sampling: t.random_sampling_percentage,
        request_id_sampling: t.use_request_id_for_trace_sampling,
        istio_tags: t.enable_istio_tags,
        disable_propagation: t.disable_context_propagation,
    })
}

/// Custom span tags, in name order: a literal, a request header, or a
/// variable of the agent's environment (read when the configuration loads).
/// The agent serves every tenant of its node, so its environment is the
/// operator's: only `operator` configuration (MeshConfig, the root
/// namespace's Telemetries) may name it.
pub(super) fn custom_tags(
    ctx: &mut Ctx<'_>,
    field: &str,
    tags: &BTreeMap<String, CustomTagSpec>,
    operator: bool,
) -> CustomTags {
    let mut out = Vec::new();
    for (name, t) in tags {
        let field = format!("{field}[{name}]");
        let tag = match (&t.literal, &t.environment, &t.header) {
            (Some(l), None, None) => CustomTag::Literal(l.value.as_str().into()),
            (None, Some(_), None) if !operator => {
                ctx.error(
                    format!("{field}.environment"),
                    "the agent's environment is shared by every namespace: only MeshConfig and the root namespace's Telemetries may read it",
                );
                continue;
            }
            (None, Some(e), None) if !e.name.is_empty() => {
                let value = std::env::var(&e.name).ok().or_else(|| e.default_value.clone()).unwrap_or_default();
                CustomTag::Literal(value.into())
            }
            (None, None, Some(h)) if hyper::header::HeaderName::from_bytes(h.name.as_bytes()).is_ok() => {
                CustomTag::Header {
                    name: h.name.to_ascii_lowercase().into(),
                    default: h.default_value.as_deref().map(Arc::from),
                }
            }
            (None, Some(_), None) => {
                ctx.error(format!("{field}.environment.name"), "required");
                continue;
            }
            (None, None, Some(h)) => {
                ctx.error(format!("{field}.header.name"), format!("{:?} is not a header name", h.name));
                continue;
            }
            _ => {
                ctx.error(field, "exactly one of literal, environment and header");
                continue;
            }
        };
        out.push((Arc::from(name.as_str()), tag));
    }
    out.into()
}

fn metric_override(ctx: &mut Ctx<'_>, field: &str, o: &OverrideSpec) -> Option<MetricOverride> {
    let mut ok = true;
    let mut tags = Vec::new();
    for (name, t) in &o.tag_overrides {
        match tag_override(ctx, &format!("{field}.tagOverrides[{name}]"), name, t) {
            Some(t) => tags.push(t),
            None => ok = false,
        }
    }
    let m = o.matches.clone().unwrap_or_default();
    if m.custom_metric.is_some() {
        ctx.error(
            format!("{field}.match.customMetric"),
            "custom metrics are not supported; name one of Istio's metrics",
        );
        ok = false;
    }
    let metrics = match m.metric.as_deref() {
        None => MetricSet::ALL,
        Some(name) => match MetricSet::by_name(name) {
            Some(set) => set,
            None => {
                ctx.error(
                    format!("{field}.match.metric"),
                    format!(
                        "{name:?}: expected ALL_METRICS, REQUEST_COUNT, REQUEST_DURATION, REQUEST_SIZE, RESPONSE_SIZE, \
                         TCP_OPENED_CONNECTIONS, TCP_CLOSED_CONNECTIONS, TCP_SENT_BYTES or TCP_RECEIVED_BYTES \
                         (the gRPC message counts are not produced)"
                    ),
                );
                ok = false;
                MetricSet::NONE
            }
        },
    };
    let modes = modes(ctx, &format!("{field}.match.mode"), m.mode.as_deref());
    ok.then_some(MetricOverride { metrics, modes: modes?, disabled: o.disabled, tags })
}

/// Labels whose values the agent computes and does not let a Telemetry
/// replace (their values are not free text in its metrics).
const FIXED_LABELS: [&str; 6] = [
    "reporter",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
    "response_code",
    "grpc_response_status",
];

fn tag_override(ctx: &mut Ctx<'_>, field: &str, name: &str, t: &TagOverrideSpec) -> Option<TagOverride> {
    let valid_name = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name {
        ctx.error(field, format!("{name:?} is not a Prometheus label name"));
        return None;
    }
    if FIXED_LABELS.contains(&name) {
        ctx.error(field, format!("{name} cannot be overridden by this version of mesh-agent"));
        return None;
    }
    let value = match (t.operation.as_deref(), t.value.as_deref()) {
        (Some("REMOVE"), _) => None,
        (None | Some("UPSERT"), Some(v)) => Some(tag_value(ctx, &format!("{field}.value"), v)?),
        (None | Some("UPSERT"), None) => {
            ctx.error(format!("{field}.value"), "required with operation UPSERT");
            return None;
        }
        (Some(other), _) => {
            ctx.error(format!("{field}.operation"), format!("{other:?}: expected UPSERT or REMOVE"));
            return None;
        }
    };
    Some(TagOverride { name: name.into(), value })
}

/// The CEL expressions a tag's value may be: a string literal, or one of the
/// request attributes the agent evaluates.
fn tag_value(ctx: &mut Ctx<'_>, field: &str, v: &str) -> Option<TagValue> {
    let v = v.trim();
    let quoted = |q: char| v.len() >= 2 && v.starts_with(q) && v.ends_with(q);
    if quoted('\'') || quoted('"') {
        return Some(TagValue::Literal(v[1..v.len() - 1].into()));
    }
    let header = v
        .strip_prefix("request.headers[")
        .and_then(|r| r.strip_suffix(']'))
        .map(|h| h.trim_matches(|c| c == '\'' || c == '"').to_ascii_lowercase());
    if let Some(h) = header {
        if h.is_empty() || hyper::header::HeaderName::from_bytes(h.as_bytes()).is_err() {
            ctx.error(field, format!("{v:?}: not a header name"));
            return None;
        }
        return Some(TagValue::Request(RequestAttribute::Header(h.into())));
    }
    Some(match v {
        "request.host" => TagValue::Request(RequestAttribute::Host),
        "request.method" => TagValue::Request(RequestAttribute::Method),
        "request.path" => TagValue::Request(RequestAttribute::Path),
        "request.url_path" => TagValue::Request(RequestAttribute::UrlPath),
        "request.scheme" => TagValue::Request(RequestAttribute::Scheme),
        "request.protocol" => TagValue::Request(RequestAttribute::Protocol),
        "request.useragent" => TagValue::Request(RequestAttribute::UserAgent),
        "request.id" => TagValue::Request(RequestAttribute::Id),
        "request.referer" => TagValue::Request(RequestAttribute::Referer),
        "response.code" => TagValue::ResponseCode,
        other => {
            ctx.error(
                field,
                format!(
                    "{other:?}: this version of mesh-agent evaluates a string literal, request.host, request.method, \
                     request.path, request.url_path, request.scheme, request.protocol, request.useragent, request.id, \
                     request.referer, request.headers['name'] or response.code"
                ),
            );
            return None;
        }
    })
}

#[cfg(test)]
mod tests;
