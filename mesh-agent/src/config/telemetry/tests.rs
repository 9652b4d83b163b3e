//! Telemetry as tables from the user's YAML: which reporting each workload
//! ends with under Istio's hierarchy, and what is refused by name.
use std::{path::Path, sync::Arc};

use crate::{
    config::{ConfigError, Loaded, load::parse_text, load_documents},
    state::telemetry::{Logging, MetricSet, Reporting, TelemetryPolicy},
};

/// Namespaces `demo` and `other`, pods `web` (app web) and `api` (app api)
/// in demo and `job` in other.
const CLUSTER: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n\
---\napiVersion: v1\nkind: Namespace\nmetadata: {name: other, labels: {istio.io/dataplane-mode: ambient}}\n\
---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: demo, labels: {app: web}}\nstatus: {podIP: 10.0.0.1}\n\
---\napiVersion: v1\nkind: Pod\nmetadata: {name: api, namespace: demo, labels: {app: api}}\nstatus: {podIP: 10.0.0.2}\n\
---\napiVersion: v1\nkind: Pod\nmetadata: {name: job, namespace: other, labels: {app: job}}\nstatus: {podIP: 10.0.0.3}\n";

fn load(extra: &str) -> Loaded {
    let file: Arc<Path> = Path::new("cluster.yaml").into();
    let (mut docs, mut errors) = (Vec::new(), Vec::new());
    parse_text(&file, &format!("{CLUSTER}{extra}"), &mut docs, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    load_documents(&docs, "cluster.local")
}

fn telemetry(name: &str, namespace: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )
}

fn policies(extra: &str) -> [TelemetryPolicy; 3] {
    let loaded = load(extra);
    assert!(loaded.rejected.is_empty(), "{:?}", loaded.rejected);
    [1, 2, 3].map(|i| loaded.state.telemetry_policy(Some([10, 0, 0, i].into())))
}

const ON: Reporting = Reporting { off: MetricSet::NONE, logging: Logging::Default };

#[test]
fn the_hierarchy_resolves_as_istios() {
    let server_off = "{metrics: [{overrides: [{match: {mode: SERVER}, disabled: true}]}]}";
    let web_requests_on = "{selector: {matchLabels: {app: web}}, metrics: [{overrides: [{match: {metric: REQUEST_COUNT, mode: SERVER}, disabled: false}]}]}";
    let client_tcp_off = "{metrics: [{overrides: [{match: {metric: TCP_SENT_BYTES, mode: CLIENT}, disabled: true}]}]}";
    let logs_off_for_api = "{selector: {matchLabels: {app: api}}, accessLogging: [{disabled: true}]}";
    let logs_on_server = "{accessLogging: [{providers: [{name: envoy}], match: {mode: SERVER}}]}";
    let server_only = |off| TelemetryPolicy { client: ON, server: Reporting { off, logging: Logging::Default } };
    let (web, api, job) = (0, 1, 2);
    // (Telemetries, pod, the pod's reporting)
    let cases: Vec<(String, usize, TelemetryPolicy)> = vec![
        (String::new(), web, TelemetryPolicy::default()),
        // Mesh-wide from the root namespace: every pod.
        (telemetry("mesh", "istio-system", server_off), job, server_only(MetricSet::ALL)),
        // A namespace's own: only its pods.
        (telemetry("ns", "demo", server_off), api, server_only(MetricSet::ALL)),
        (telemetry("ns", "demo", server_off), job, TelemetryPolicy::default()),
        // A later override for the side lifts "all off", as Istio's
        // disabledAllMetricsProviders does; only what it names is set.
        (
            telemetry("mesh", "istio-system", server_off) + &telemetry("web", "demo", web_requests_on),
            web,
            server_only(MetricSet::NONE),
        ),
        (
            telemetry("mesh", "istio-system", server_off) + &telemetry("web", "demo", web_requests_on),
            api,
            server_only(MetricSet::ALL),
        ),
        // One metric, one side.
        (
            telemetry("ns", "demo", client_tcp_off),
            web,
            TelemetryPolicy {
                client: Reporting { off: MetricSet::TCP_SENT_BYTES, logging: Logging::Default },
                server: ON,
            },
        ),
        // Access logging: off for the selected workload, on for servers namespace-wide.
        (
            telemetry("ns", "demo", logs_on_server) + &telemetry("api", "demo", logs_off_for_api),
            api,
            TelemetryPolicy {
                client: Reporting { off: MetricSet::NONE, logging: Logging::Off },
                server: Reporting { off: MetricSet::NONE, logging: Logging::Off },
            },
        ),
        (
            telemetry("ns", "demo", logs_on_server) + &telemetry("api", "demo", logs_off_for_api),
            web,
            TelemetryPolicy { client: ON, server: Reporting { off: MetricSet::NONE, logging: Logging::On } },
        ),
        // The root's and the namespace's apply in that order: the namespace wins.
        (
            telemetry("mesh", "istio-system", "{metrics: [{overrides: [{disabled: true}]}]}")
                + &telemetry("ns", "other", "{metrics: [{overrides: [{disabled: false}]}]}"),
            job,
            TelemetryPolicy::default(),
        ),
    ];
    for (yaml, pod, want) in cases {
        assert_eq!(policies(&yaml)[pod], want, "pod {pod} under\n{yaml}");
    }
}

#[test]
fn what_the_agent_cannot_do_is_refused_by_name() {
    let cases = [
        (
            "{targetRefs: [{kind: Service, name: web}]}",
            "spec.targetRefs: is not supported by this version of mesh-agent; use spec.selector",
        ),
        ("{tracing: [{randomSamplingPercentage: 10}]}", "spec.tracing: is not supported by this version of mesh-agent"),
        (
            "{metrics: [{providers: [{name: stackdriver}]}]}",
            "spec.metrics[0].providers[0].name: \"stackdriver\": only the built-in provider \"prometheus\"",
        ),
        ("{metrics: [{reportingInterval: 5s}]}", "spec.metrics[0].reportingInterval: is not supported"),
        (
            "{metrics: [{overrides: [{match: {metric: GRPC_REQUEST_MESSAGES}}]}]}",
            "spec.metrics[0].overrides[0].match.metric: \"GRPC_REQUEST_MESSAGES\": expected ALL_METRICS",
        ),
        (
            "{metrics: [{overrides: [{match: {customMetric: my_metric}}]}]}",
            "spec.metrics[0].overrides[0].match.customMetric: custom metrics are not supported",
        ),
        (
            "{metrics: [{overrides: [{match: {mode: BOTH}}]}]}",
            "spec.metrics[0].overrides[0].match.mode: \"BOTH\": expected CLIENT_AND_SERVER, CLIENT or SERVER",
        ),
        (
            "{metrics: [{overrides: [{tagOverrides: {request_host: {value: request.host}}}]}]}",
            "spec.metrics[0].overrides[0].tagOverrides: is not supported",
        ),
        (
            "{accessLogging: [{providers: [{name: otel}]}]}",
            "spec.accessLogging[0].providers[0].name: \"otel\": only the built-in provider \"envoy\"",
        ),
        (
            "{accessLogging: [{filter: {expression: \"response.code >= 400\"}}]}",
            "spec.accessLogging[0].filter: is not supported",
        ),
        ("{metrics: [{overrides: [{disabld: true}]}]}", "unknown field `disabld`"),
        ("{selector: {matchLabels: {}}}", "spec.selector.matchLabels: empty"),
    ];
    for (spec, want) in cases {
        let loaded = load(&telemetry("t", "demo", spec));
        let errors: Vec<String> = loaded.rejected.iter().map(ConfigError::to_string).collect();
        assert!(errors.iter().any(|e| e.contains("Telemetry demo/t") && e.contains(want)), "{spec}: {errors:?}");
        // Refused on its own: every workload keeps Istio's default reporting.
        assert_eq!(loaded.state.telemetry_policy(Some([10, 0, 0, 1].into())), TelemetryPolicy::default());
    }
}
