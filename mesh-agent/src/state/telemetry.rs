//! Istio's Telemetry API (`telemetry.istio.io` `Telemetry`), as far as the
//! agent reports: which standard metrics a workload's reporting leaves out,
//! and whether its requests and connections are access-logged, as a client
//! (`CLIENT`: `reporter="source"`) and as a server (`SERVER`:
//! `reporter="destination"`).
//!
//! Resolution follows istio/istio `pilot/pkg/model/telemetry.go`
//! (`applicableTelemetries`, `mergeMetrics`, `mergeLogs`): the root
//! namespace's namespace-wide Telemetry, then the workload's namespace's,
//! then those selecting the workload, each later one applied over the
//! earlier; within one, `overrides` in order. A metric override with
//! `disabled` sets that metric on or off for its modes; `ALL_METRICS`
//! disabled turns every metric off for its modes until a later override for
//! the mode applies, as Istio's `disabledAllMetricsProviders` does. An
//! access logging entry for a mode turns logging off (`disabled: true`) or
//! on (the built-in `envoy` provider) for it. Tracing: [`super::trace`].
use std::{collections::BTreeMap, sync::Arc};

use serde::Serialize;

use super::{
    ROOT_NAMESPACE, Service, Workload,
    trace::{TraceSettings, TraceSpec, TracingRule},
};

/// Istio's standard metrics, as `match.metric` names them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MetricSet(pub u16);

impl MetricSet {
    pub const NONE: MetricSet = MetricSet(0);
    pub const REQUEST_COUNT: MetricSet = MetricSet(1);
    pub const REQUEST_DURATION: MetricSet = MetricSet(1 << 1);
    pub const REQUEST_SIZE: MetricSet = MetricSet(1 << 2);
    pub const RESPONSE_SIZE: MetricSet = MetricSet(1 << 3);
    pub const TCP_OPENED_CONNECTIONS: MetricSet = MetricSet(1 << 4);
    pub const TCP_CLOSED_CONNECTIONS: MetricSet = MetricSet(1 << 5);
    pub const TCP_SENT_BYTES: MetricSet = MetricSet(1 << 6);
    pub const TCP_RECEIVED_BYTES: MetricSet = MetricSet(1 << 7);
    pub const ALL: MetricSet = MetricSet(0xff);
    /// The four request metrics.
    pub const REQUESTS: MetricSet = MetricSet(0x0f);

    /// `match.metric`: a standard metric's name, or `ALL_METRICS`.
    pub fn by_name(name: &str) -> Option<MetricSet> {
        Some(match name {
            "ALL_METRICS" => MetricSet::ALL,
            "REQUEST_COUNT" => MetricSet::REQUEST_COUNT,
            "REQUEST_DURATION" => MetricSet::REQUEST_DURATION,
            "REQUEST_SIZE" => MetricSet::REQUEST_SIZE,
            "RESPONSE_SIZE" => MetricSet::RESPONSE_SIZE,
            "TCP_OPENED_CONNECTIONS" => MetricSet::TCP_OPENED_CONNECTIONS,
            "TCP_CLOSED_CONNECTIONS" => MetricSet::TCP_CLOSED_CONNECTIONS,
            "TCP_SENT_BYTES" => MetricSet::TCP_SENT_BYTES,
            "TCP_RECEIVED_BYTES" => MetricSet::TCP_RECEIVED_BYTES,
            _ => return None,
        })
    }

    pub fn contains(self, other: MetricSet) -> bool {
        self.0 & other.0 == other.0
    }

    fn set(&mut self, other: MetricSet, on: bool) {
        if on { self.0 |= other.0 } else { self.0 &= !other.0 }
    }
}

/// `match.mode`: which side's reporting an entry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Modes {
    pub client: bool,
    pub server: bool,
}

impl Modes {
    pub const BOTH: Modes = Modes { client: true, server: true };
}

/// One `metrics[].overrides[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetricOverride {
    pub metrics: MetricSet,
    pub modes: Modes,
    /// `disabled`, when given.
    pub disabled: Option<bool>,
    /// `tagOverrides`, by label name.
    pub tags: Vec<TagOverride>,
}

/// A `tagOverrides` entry: a label removed (`value: None`, operation
/// `REMOVE`) or set (`UPSERT`) from the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TagOverride {
    pub name: Arc<str>,
    pub value: Option<TagValue>,
}

/// What an `UPSERT` sets a label to: the subset of Istio's CEL attributes
/// the agent evaluates (anything else is refused at validation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum TagValue {
    /// A string literal (`'v1'`).
    Literal(Arc<str>),
    /// `request.host`, `request.method`, … (`unknown` on a TCP metric).
    Request(RequestAttribute),
    /// `response.code`.
    ResponseCode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum RequestAttribute {
    Host,
    Method,
    Path,
    /// `request.url_path`: the path without its query.
    UrlPath,
    Scheme,
    Protocol,
    UserAgent,
    Id,
    Referer,
    /// `request.headers['name']`, lower case.
    Header(Arc<str>),
}

/// One `accessLogging[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoggingRule {
    pub modes: Modes,
    pub disabled: bool,
}

/// A `Telemetry`, validated.
#[derive(Debug, Clone, Serialize)]
pub struct Telemetry {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// `metadata.creationTimestamp`: of two namespace-wide Telemetries, the
    /// oldest applies.
    pub created: Option<String>,
    /// `spec.selector.matchLabels`; `None` (and no `services`): the whole namespace.
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.targetRefs`: the Services (of its namespace) it is attached to,
    /// for traffic addressed to them at their endpoints' agents.
    pub services: Vec<Arc<str>>,
    /// The GatewayClass it is attached to (root namespace only): the pods
    /// of every Gateway of that class.
    pub gateway_class: Option<Arc<str>>,
    /// Every `metrics[]`'s overrides, in order.
    pub metric_overrides: Vec<MetricOverride>,
    pub access_logging: Vec<LoggingRule>,
    /// `tracing[]`, in order.
    pub tracing: Vec<TracingRule>,
}

/// Whether lines are written for a side's requests and connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum Logging {
    /// No Telemetry says: MeshConfig (or the agent's flag) decides.
    #[default]
    Default,
    Off,
    /// The built-in `envoy` provider: written, to stdout when nothing else is named.
    On,
}

/// One side's reporting for a workload.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Reporting {
    /// The standard metrics left out.
    pub off: MetricSet,
    pub logging: Logging,
    /// Tag overrides in the order they apply, each with the metrics it is for.
    pub tags: Option<Arc<[(MetricSet, TagOverride)]>>,
    /// Spans, and where they go; none: no tracing.
    pub trace: Option<Arc<TraceSpec>>,
}

impl Reporting {
    /// Istio's default: everything reported, the access log as configured, no tracing.
    pub const DEFAULT: Reporting =
        Reporting { off: MetricSet::NONE, logging: Logging::Default, tags: None, trace: None };
}

/// What the Telemetries make of a workload's reporting.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TelemetryPolicy {
    /// As a client (`reporter="source"`).
    pub client: Reporting,
    /// As a server (`reporter="destination"`).
    pub server: Reporting,
}

impl Telemetry {
    /// Neither attached to Services nor to a GatewayClass.
    fn attached_to_nothing(&self) -> bool {
        self.services.is_empty() && self.gateway_class.is_none()
    }
}

impl TelemetryPolicy {
    /// The side a reporter reports for.
    pub fn side(&self, destination: bool) -> &Reporting {
        if destination { &self.server } else { &self.client }
    }
}

/// The Telemetries that apply to `w`, in the order they apply: the root
/// namespace's namespace-wide one, its namespace's, those selecting it, and
/// for traffic addressed to `service`, those attached to it (as Istio's
/// `applicableTelemetries` with a Service). `telemetries` is in (creation,
/// name) order.
fn applicable<'t>(telemetries: &'t [Telemetry], w: &Workload, service: Option<&Service>) -> Vec<&'t Telemetry> {
    let namespace_wide =
        |ns: &str| telemetries.iter().find(|t| &*t.namespace == ns && t.selector.is_none() && t.attached_to_nothing());
    let mut out: Vec<&Telemetry> = namespace_wide(ROOT_NAMESPACE).into_iter().collect();
    if &*w.namespace != ROOT_NAMESPACE {
        out.extend(namespace_wide(&w.namespace));
    }
    out.extend(telemetries.iter().filter(|t| {
        t.namespace == w.namespace
            && t.selector.as_ref().is_some_and(|s| s.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
    }));
    if let Some(class) = &w.gateway_class {
        out.extend(telemetries.iter().filter(|t| t.gateway_class.as_ref() == Some(class)));
    }
    if let Some(svc) = service {
        out.extend(telemetries.iter().filter(|t| t.namespace == svc.namespace && t.services.contains(&svc.name)));
    }
    out
}

/// `w`'s reporting under `telemetries` (in creation, name order) and
/// MeshConfig's tracing settings, for traffic addressed to `service` if given.
pub fn resolve(
    telemetries: &[Telemetry],
    trace: &TraceSettings,
    w: &Workload,
    service: Option<&Service>,
) -> TelemetryPolicy {
    let applicable = applicable(telemetries, w, service);
    let [client_trace, server_trace] = super::trace::resolve(trace, applicable.iter().flat_map(|t| &t.tracing));
    let mut policy = TelemetryPolicy::default();
    policy.client.trace = client_trace;
    policy.server.trace = server_trace;
    // Per side: metrics off one by one, and "all off" until a later override.
    let mut all_off = [false; 2];
    let mut tags: [Vec<(MetricSet, TagOverride)>; 2] = Default::default();
    for t in applicable {
        for o in &t.metric_overrides {
            let sides = [(o.modes.client, 0), (o.modes.server, 1)];
            for (_, i) in sides.into_iter().filter(|(on, _)| *on) {
                let side = if i == 0 { &mut policy.client } else { &mut policy.server };
                if o.metrics == MetricSet::ALL && o.disabled == Some(true) {
                    all_off[i] = true;
                    continue;
                }
                all_off[i] = false;
                if let Some(d) = o.disabled {
                    side.off.set(o.metrics, d);
                }
                tags[i].extend(o.tags.iter().map(|t| (o.metrics, t.clone())));
            }
        }
        for l in &t.access_logging {
            let logging = if l.disabled { Logging::Off } else { Logging::On };
            if l.modes.client {
                policy.client.logging = logging;
            }
            if l.modes.server {
                policy.server.logging = logging;
            }
        }
    }
    let [client_tags, server_tags] = tags;
    policy.client.tags = (!client_tags.is_empty()).then(|| client_tags.into());
    policy.server.tags = (!server_tags.is_empty()).then(|| server_tags.into());
    if all_off[0] {
        policy.client.off = MetricSet::ALL;
    }
    if all_off[1] {
        policy.server.off = MetricSet::ALL;
    }
    policy
}
