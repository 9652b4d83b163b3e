//! Tracing as Istio configures it: the OpenTelemetry providers of MeshConfig
//! (`extensionProviders[].opentelemetry`), MeshConfig's defaults
//! (`defaultProviders.tracing`, `defaultConfig.tracing`), and what a
//! workload's Telemetries make of them for each side ([`TraceSpec`]).
//!
//! Resolution follows istio/istio `pilot/pkg/model/telemetry.go`
//! (`Telemetries.Tracing`) and `pilot/pkg/networking/core/tracing.go`
//! (`configureTracingFromTelemetry`, `proxyConfigSamplingValue`):
//! `defaultProviders.tracing[0]` for both sides, then each applicable
//! Telemetry's `tracing[]` entry (root namespace, namespace, workload) over
//! the sides its `match.mode` names: the first provider it names, and each
//! field it sets. A side with no provider, or with `disableSpanReporting`,
//! has no tracing. Sampling: the Telemetry's `randomSamplingPercentage`,
//! else `defaultConfig.tracing.sampling` (above 100: 1), else 1 %.
use std::{collections::BTreeMap, sync::Arc};

use serde::Serialize;

/// Istio's default sampling (`PILOT_TRACE_SAMPLING`), in percent.
pub const DEFAULT_SAMPLING: f64 = 1.0;
/// Envoy's default for the length of `http.url` (`max_path_tag_length`).
pub const DEFAULT_MAX_PATH_TAG_LENGTH: usize = 256;

/// An `extensionProviders[]` entry of kind `opentelemetry`: where spans go
/// (OTLP over gRPC).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct TraceProvider {
    pub name: Arc<str>,
    /// The collector's Service host (`otel-collector.observability.svc.cluster.local`),
    /// or `namespace/host`.
    pub service: Arc<str>,
    pub port: u16,
    /// `maxTagLength`: the longest `http.url` a span carries.
    pub max_tag_length: Option<usize>,
}

/// A span attribute a configuration adds (`customTags`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum CustomTag {
    /// `literal.value`, and `environment` (the agent's environment, read
    /// when the configuration is loaded).
    Literal(Arc<str>),
    /// `header`: a request header (lower case), else `defaultValue`.
    Header { name: Arc<str>, default: Option<Arc<str>> },
}

/// A named set of custom tags, in name order.
pub type CustomTags = Arc<[(Arc<str>, CustomTag)]>;

/// What MeshConfig says about tracing.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TraceSettings {
    /// The OpenTelemetry providers, by name in lower case (Istio looks
    /// providers up without regard to case).
    pub providers: BTreeMap<String, Arc<TraceProvider>>,
    /// `defaultProviders.tracing[0]`.
    pub default_provider: Option<Arc<str>>,
    /// `defaultConfig.tracing.sampling`, when set (0 is Istio's "unset").
    pub sampling: Option<f64>,
    /// `defaultConfig.tracing.custom_tags`.
    pub custom_tags: Option<CustomTags>,
    /// `defaultConfig.tracing.maxPathTagLength`.
    pub max_path_tag_length: Option<usize>,
    /// `meshId` (the `istio.mesh_id` tag); the trust domain when unset.
    pub mesh_id: Option<Arc<str>>,
}

impl TraceSettings {
    pub fn provider(&self, name: &str) -> Option<&Arc<TraceProvider>> {
        self.providers.get(&name.to_ascii_lowercase())
    }

    /// The sampling percentage when no Telemetry sets one.
    pub fn default_sampling(&self) -> f64 {
        match self.sampling {
            Some(s) if s > 100.0 => 1.0,
            Some(s) => s,
            None => DEFAULT_SAMPLING,
        }
    }
}

/// One `tracing[]` entry of a Telemetry: each field it sets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TracingRule {
    pub modes: super::telemetry::Modes,
    /// The first of `providers[]`.
    pub provider: Option<Arc<str>>,
    pub disable_span_reporting: Option<bool>,
    pub custom_tags: Option<CustomTags>,
    pub sampling: Option<f64>,
    pub request_id_sampling: Option<bool>,
    pub istio_tags: Option<bool>,
    pub disable_propagation: Option<bool>,
}

/// One side's tracing, resolved: spans are made and sent to `provider`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceSpec {
    pub provider: Arc<TraceProvider>,
    /// Percent of requests without a sampling decision of their own that are sampled.
    pub sampling: f64,
    pub custom_tags: Option<CustomTags>,
    /// Decide from `x-request-id` (as Envoy's UUID extension does), so that
    /// every proxy decides alike for one request.
    pub request_id_sampling: bool,
    /// The `istio.*` tags (canonical service and revision, namespace, mesh, cluster).
    pub istio_tags: bool,
    /// Trace headers are set on the request sent on.
    pub propagate: bool,
    /// The longest `http.url` a span carries.
    pub max_path_tag_length: usize,
}

/// A side's tracing while it is resolved (Istio's `TracingSpec`).
#[derive(Clone)]
struct Partial {
    provider: Option<Arc<str>>,
    disabled: bool,
    sampling: Option<f64>,
    custom_tags: Option<CustomTags>,
    request_id_sampling: bool,
    istio_tags: bool,
    disable_propagation: bool,
}

/// Both sides' tracing (client, server) for a workload to which `rules`
/// apply, in the order they apply.
pub fn resolve<'r>(
    settings: &TraceSettings,
    rules: impl Iterator<Item = &'r TracingRule>,
) -> [Option<Arc<TraceSpec>>; 2] {
    let start = Partial {
        provider: settings.default_provider.clone(),
        disabled: false,
        sampling: None,
        custom_tags: None,
        request_id_sampling: true,
        istio_tags: true,
        disable_propagation: false,
    };
    let mut sides = [start.clone(), start];
    let mut any_rule = false;
    for r in rules {
        any_rule = true;
        for (i, on) in [r.modes.client, r.modes.server].into_iter().enumerate() {
            if !on {
                continue;
            }
            let s = &mut sides[i];
            if let Some(p) = &r.provider {
                s.provider = Some(p.clone());
            }
            s.disabled = r.disable_span_reporting.unwrap_or(s.disabled);
            if r.custom_tags.is_some() {
                s.custom_tags = r.custom_tags.clone();
            }
            s.sampling = r.sampling.or(s.sampling);
            s.request_id_sampling = r.request_id_sampling.unwrap_or(s.request_id_sampling);
            s.istio_tags = r.istio_tags.unwrap_or(s.istio_tags);
            s.disable_propagation = r.disable_propagation.unwrap_or(s.disable_propagation);
        }
    }
    if !any_rule && settings.default_provider.is_none() {
        return [None, None];
    }
    sides.map(|s| {
        let provider = settings.provider(s.provider.as_deref()?)?.clone();
        if s.disabled {
            return None;
        }
        let max_path_tag_length =
            provider.max_tag_length.or(settings.max_path_tag_length).unwrap_or(DEFAULT_MAX_PATH_TAG_LENGTH);
        Some(Arc::new(TraceSpec {
            provider,
            sampling: s.sampling.unwrap_or_else(|| settings.default_sampling()),
            // A Telemetry's tags replace MeshConfig's (Istio's `configureCustomTags`).
            custom_tags: s.custom_tags.or_else(|| settings.custom_tags.clone()),
            request_id_sampling: s.request_id_sampling,
            istio_tags: s.istio_tags,
            propagate: !s.disable_propagation,
            max_path_tag_length,
        }))
    })
}
