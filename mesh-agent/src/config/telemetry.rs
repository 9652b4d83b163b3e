//! `telemetry.istio.io/v1` (and `v1alpha1`) `Telemetry`: the metrics a
//! workload reports and whether it is access-logged, validated into
//! [`crate::state::telemetry::Telemetry`]. What the agent cannot do yet —
//! tracing, tag overrides, `targetRefs`, custom metrics, reporting
//! intervals, log filters, providers other than the built-in `prometheus`
//! and `envoy` — is a named error, never silently ignored.
use std::collections::BTreeMap;

use serde::Deserialize;

use super::{
    k8s::ObjectMeta,
    object::{Ctx, name_and_namespace},
    security::{Selector, selector},
};
use crate::state::telemetry::{LoggingRule, MetricOverride, MetricSet, Modes, Telemetry};

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
    pub target_ref: Option<serde_yaml_ng::Value>,
    pub target_refs: Option<serde_yaml_ng::Value>,
    pub tracing: Option<serde_yaml_ng::Value>,
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
    pub tag_overrides: Option<BTreeMap<String, serde_yaml_ng::Value>>,
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

pub(super) fn build_telemetry(ctx: &mut Ctx<'_>, obj: &TelemetryObject) -> Option<Telemetry> {
    let (name, namespace) = name_and_namespace(ctx, &obj.metadata)?;
    let spec = &obj.spec;
    let selector = selector(ctx, &spec.selector);
    let mut ok = spec.selector.is_none() || selector.is_some();
    let unsupported = [
        (
            "spec.targetRef",
            spec.target_ref.is_some(),
            "is not supported by this version of mesh-agent; use spec.selector",
        ),
        (
            "spec.targetRefs",
            spec.target_refs.is_some(),
            "is not supported by this version of mesh-agent; use spec.selector",
        ),
        (
            "spec.tracing",
            spec.tracing.is_some(),
            "is not supported by this version of mesh-agent (it produces no spans yet)",
        ),
    ];
    for (field, present, why) in unsupported {
        if present {
            ctx.error(field, why);
            ok = false;
        }
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
    let created = obj.metadata.creation_timestamp.clone();
    ok.then_some(Telemetry { name, namespace, created, selector, metric_overrides, access_logging })
}

fn metric_override(ctx: &mut Ctx<'_>, field: &str, o: &OverrideSpec) -> Option<MetricOverride> {
    let mut ok = true;
    if o.tag_overrides.as_ref().is_some_and(|t| !t.is_empty()) {
        ctx.error(format!("{field}.tagOverrides"), "is not supported by this version of mesh-agent");
        ok = false;
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
    ok.then_some(MetricOverride { metrics, modes: modes?, disabled: o.disabled })
}

#[cfg(test)]
mod tests;
