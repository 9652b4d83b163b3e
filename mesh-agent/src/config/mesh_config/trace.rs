//! MeshConfig's tracing: the `opentelemetry` entries of `extensionProviders`
//! (where spans go), `defaultProviders.tracing` (the provider every workload
//! uses unless a Telemetry says otherwise), `defaultConfig.tracing`
//! (sampling, custom tags, the `http.url` length) and `meshId`.
//!
//! Istio's other tracers (`zipkin`, `datadog`, `skywalking`, `stackdriver`,
//! `lightstep`) and the ProxyConfig's legacy tracer settings are Envoy's; a
//! provider of those kinds may be declared, but choosing one is an error
//! that names it. OTLP over HTTP, resource detectors and custom samplers of
//! an `opentelemetry` provider are named errors too.
use std::{collections::BTreeMap, sync::Arc};

use serde::Deserialize;

use super::Ctx;
use crate::{
    config::telemetry::CustomTagSpec,
    state::trace::{TraceProvider, TraceSettings},
};

/// Kinds of `extensionProviders` that trace, other than `opentelemetry`.
const OTHER_TRACERS: [&str; 5] = ["zipkin", "datadog", "skywalking", "stackdriver", "lightstep"];

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct DefaultProviders {
    #[serde(default)]
    tracing: Vec<String>,
}

/// ProxyConfig (`defaultConfig`): only its `tracing` is read.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ProxyConfig {
    pub tracing: Option<ProxyTracing>,
}

/// ProxyConfig `tracing`: protobuf's JSON names and field names both.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ProxyTracing {
    sampling: Option<f64>,
    #[serde(alias = "custom_tags")]
    custom_tags: Option<BTreeMap<String, CustomTagSpec>>,
    #[serde(alias = "max_path_tag_length")]
    max_path_tag_length: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct NamedProvider {
    #[serde(default)]
    name: String,
    opentelemetry: Option<OtelSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OtelSpec {
    #[serde(default)]
    service: String,
    port: Option<u32>,
    max_tag_length: Option<u32>,
    http: Option<serde_yaml_ng::Value>,
    resource_detectors: Option<serde_yaml_ng::Value>,
    dynatrace_sampler: Option<serde_yaml_ng::Value>,
}

pub(super) fn settings(
    ctx: &mut Ctx<'_>,
    providers: &[serde_yaml_ng::Value],
    defaults: Option<DefaultProviders>,
    proxy: Option<ProxyTracing>,
    mesh_id: Option<String>,
) -> TraceSettings {
    let (providers, others) = tracers(ctx, providers);
    let mut settings =
        TraceSettings { providers, mesh_id: mesh_id.filter(|m| !m.is_empty()).map(Arc::from), ..Default::default() };
    if let Some(name) = defaults.and_then(|d| d.tracing.into_iter().next()) {
        let field = "data.mesh.defaultProviders.tracing[0]";
        if settings.provider(&name).is_some() {
            settings.default_provider = Some(name.into());
        } else if let Some(kind) = others.get(&name.to_ascii_lowercase()) {
            ctx.error(field, format!("{name:?} is a {kind} provider: only opentelemetry providers are supported"));
        } else {
            ctx.error(field, format!("{name:?}: no opentelemetry provider of this name in extensionProviders"));
        }
    }
    if let Some(t) = proxy {
        // 0 is protobuf's "unset".
        settings.sampling = t.sampling.filter(|s| *s != 0.0);
        if let Some(s) = settings.sampling
            && s < 0.0
        {
            ctx.error("data.mesh.defaultConfig.tracing.sampling", format!("{s}: expected 0 to 100"));
            settings.sampling = None;
        }
        settings.custom_tags = t.custom_tags.map(|tags| {
            crate::config::telemetry::custom_tags(ctx, "data.mesh.defaultConfig.tracing.custom_tags", &tags, true)
        });
        settings.max_path_tag_length = t.max_path_tag_length.filter(|l| *l > 0).map(|l| l as usize);
    }
    settings
}

/// The `opentelemetry` providers by name (lower case), and the other
/// tracers' names with their kind.
type Tracers = (BTreeMap<String, Arc<TraceProvider>>, BTreeMap<String, &'static str>);

fn tracers(ctx: &mut Ctx<'_>, providers: &[serde_yaml_ng::Value]) -> Tracers {
    let (mut otel, mut others) = (BTreeMap::new(), BTreeMap::new());
    for (i, value) in providers.iter().enumerate() {
        let field = format!("data.mesh.extensionProviders[{i}]");
        if let Some(kind) = OTHER_TRACERS.iter().find(|k| value.get(**k).is_some()) {
            if let Some(name) = value.get("name").and_then(|n| n.as_str()) {
                others.insert(name.to_ascii_lowercase(), *kind);
            }
            continue;
        }
        if value.get("opentelemetry").is_none() {
            continue;
        }
        let spec = match serde_path_to_error::deserialize::<_, NamedProvider>(value.clone()) {
            Ok(s) => s,
            Err(e) => {
                ctx.error(format!("{field}.{}", e.path()), e.into_inner().to_string());
                continue;
            }
        };
        let Some(o) = spec.opentelemetry else { continue };
        let named = format!("{field}.name");
        let field = format!("{field}.opentelemetry");
        let before = ctx.error_count();
        let unsupported = [
            (
                "http",
                o.http.is_some(),
                "OTLP over HTTP is not supported by this version of mesh-agent; omit it for gRPC",
            ),
            ("resourceDetectors", o.resource_detectors.is_some(), "is not supported by this version of mesh-agent"),
            ("dynatraceSampler", o.dynatrace_sampler.is_some(), "is not supported by this version of mesh-agent"),
        ];
        for (name, present, why) in unsupported {
            if present {
                ctx.error(format!("{field}.{name}"), why);
            }
        }
        if o.service.is_empty() {
            ctx.error(
                format!("{field}.service"),
                "required: the collector's host, e.g. otel.observability.svc.cluster.local",
            );
        }
        let port = match o.port.map(u16::try_from) {
            Some(Ok(p)) if p != 0 => p,
            None => {
                ctx.error(format!("{field}.port"), "required (4317 is OTLP/gRPC's)");
                0
            }
            Some(_) => {
                ctx.error(format!("{field}.port"), "out of range 1-65535");
                0
            }
        };
        let key = spec.name.to_ascii_lowercase();
        if spec.name.is_empty() {
            ctx.error(named, "required");
        } else if otel.contains_key(&key) {
            ctx.error(named, format!("{:?}: a provider of this name comes earlier", spec.name));
        }
        if ctx.error_count() != before {
            continue;
        }
        let provider = TraceProvider {
            name: spec.name.as_str().into(),
            service: o.service.as_str().into(),
            port,
            max_tag_length: o.max_tag_length.filter(|l| *l > 0).map(|l| l as usize),
        };
        otel.insert(key, Arc::new(provider));
    }
    (otel, others)
}
