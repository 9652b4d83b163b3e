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
    [1, 2, 3].map(|i| loaded.state.telemetry_policy(Some([10, 0, 0, i].into())).clone())
}

const ON: Reporting = Reporting { off: MetricSet::NONE, logging: Logging::Default, tags: None, trace: None };

#[test]
fn the_hierarchy_resolves_as_istios() {
    let server_off = "{metrics: [{overrides: [{match: {mode: SERVER}, disabled: true}]}]}";
    let web_requests_on = "{selector: {matchLabels: {app: web}}, metrics: [{overrides: [{match: {metric: REQUEST_COUNT, mode: SERVER}, disabled: false}]}]}";
    let client_tcp_off = "{metrics: [{overrides: [{match: {metric: TCP_SENT_BYTES, mode: CLIENT}, disabled: true}]}]}";
    let logs_off_for_api = "{selector: {matchLabels: {app: api}}, accessLogging: [{disabled: true}]}";
    let logs_on_server = "{accessLogging: [{providers: [{name: envoy}], match: {mode: SERVER}}]}";
    let server_only = |off| TelemetryPolicy {
        client: ON,
        server: Reporting { off, logging: Logging::Default, tags: None, trace: None },
    };
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
                client: Reporting {
                    off: MetricSet::TCP_SENT_BYTES,
                    logging: Logging::Default,
                    tags: None,
                    trace: None,
                },
                server: ON,
            },
        ),
        // Access logging: off for the selected workload, on for servers namespace-wide.
        (
            telemetry("ns", "demo", logs_on_server) + &telemetry("api", "demo", logs_off_for_api),
            api,
            TelemetryPolicy {
                client: Reporting { off: MetricSet::NONE, logging: Logging::Off, tags: None, trace: None },
                server: Reporting { off: MetricSet::NONE, logging: Logging::Off, tags: None, trace: None },
            },
        ),
        (
            telemetry("ns", "demo", logs_on_server) + &telemetry("api", "demo", logs_off_for_api),
            web,
            TelemetryPolicy {
                client: ON,
                server: Reporting { off: MetricSet::NONE, logging: Logging::On, tags: None, trace: None },
            },
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
            "{targetRefs: [{group: gateway.networking.k8s.io, kind: GatewayClass, name: web}]}",
            "spec.targetRefs[0].kind: a GatewayClass is targeted only by a policy of the root namespace istio-system",
        ),
        ("{targetRef: {kind: Pod, name: web}}", "spec.targetRef.kind: \"\" \"Pod\": expected a Service"),
        (
            "{targetRefs: [{kind: Service, name: web, namespace: other}]}",
            "spec.targetRefs[0].namespace: \"other\": a policy may target only its own namespace",
        ),
        (
            "{selector: {matchLabels: {app: web}}, targetRefs: [{kind: Service, name: web}]}",
            "spec.targetRefs: only one of selector and targetRefs",
        ),
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
            "{metrics: [{overrides: [{tagOverrides: {request_host: {value: size(request.host)}}}]}]}",
            "spec.metrics[0].overrides[0].tagOverrides[request_host].value: \"size(request.host)\": this version of mesh-agent evaluates",
        ),
        (
            "{metrics: [{overrides: [{tagOverrides: {response_code: {operation: REMOVE}}}]}]}",
            "tagOverrides[response_code]: response_code cannot be overridden",
        ),
        (
            "{metrics: [{overrides: [{tagOverrides: {bad-name: {value: \"'x'\"}}}]}]}",
            "\"bad-name\" is not a Prometheus label name",
        ),
        (
            "{metrics: [{overrides: [{tagOverrides: {x: {operation: UPSERT}}}]}]}",
            "tagOverrides[x].value: required with operation UPSERT",
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
        assert_eq!(loaded.state.telemetry_policy(Some([10, 0, 0, 1].into())), &TelemetryPolicy::default());
    }
}

#[test]
fn tag_overrides_apply_in_istios_order() {
    let root = "{metrics: [{overrides: [{match: {metric: REQUEST_COUNT}, tagOverrides: {request_host: {value: request.host}}}]}]}";
    let ns = "{metrics: [{overrides: [{match: {metric: REQUEST_COUNT, mode: SERVER}, \
              tagOverrides: {request_host: {operation: REMOVE}, app_version: {value: \"'v9'\"}}}]}]}";
    let [web, ..] = policies(&(telemetry("mesh", "istio-system", root) + &telemetry("ns", "demo", ns)));
    let list = |r: &Reporting| -> Vec<(u16, String, bool)> {
        r.tags.as_deref().unwrap_or(&[]).iter().map(|(m, t)| (m.0, t.name.to_string(), t.value.is_some())).collect()
    };
    let count = MetricSet::REQUEST_COUNT.0;
    assert_eq!(list(&web.client), [(count, "request_host".to_owned(), true)]);
    // The namespace's come after the root's: removed again for servers.
    assert_eq!(
        list(&web.server),
        [
            (count, "request_host".to_owned(), true),
            (count, "app_version".to_owned(), true),
            (count, "request_host".to_owned(), false)
        ]
    );
    let labels = crate::telemetry::TcpLabels::new(None, None, None, false);
    let value = |_: &crate::state::telemetry::TagValue| Some("x".to_owned());
    let tagged = labels.with_tags(web.server.tags.as_deref().unwrap_or(&[]), MetricSet::REQUEST_COUNT, &value);
    assert_eq!(tagged.extra, crate::telemetry::Extra::default().with([("app_version", "x")]));
}

#[test]
fn a_host_network_pod_lends_its_telemetry_to_no_one() {
    // Its address is its node's, shared with the node's own host clients.
    let host = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: daemon, namespace: demo, labels: {app: daemon}}\n\
                spec: {hostNetwork: true}\nstatus: {podIP: 10.0.0.9}\n";
    let off = telemetry(
        "daemon",
        "demo",
        "{selector: {matchLabels: {app: daemon}}, metrics: [{overrides: [{disabled: true}]}]}",
    );
    let loaded = load(&format!("{host}{off}"));
    assert!(loaded.rejected.is_empty(), "{:?}", loaded.rejected);
    assert_eq!(loaded.state.telemetry_policy(Some([10, 0, 0, 9].into())), &TelemetryPolicy::default());
}

#[test]
fn a_telemetry_attached_to_a_service_applies_to_traffic_addressed_to_it() {
    let service = "---\napiVersion: v1\nkind: Service\nmetadata: {name: websvc, namespace: demo}\n\
                   spec: {clusterIP: 10.96.0.40, selector: {app: web}, ports: [{name: http, port: 80}]}\n";
    let attached = telemetry(
        "websvc",
        "demo",
        "{targetRefs: [{kind: Service, name: websvc}], metrics: [{overrides: [{match: {mode: SERVER}, disabled: true}]}]}",
    );
    let loaded = load(&format!("{service}{attached}"));
    assert!(loaded.rejected.is_empty(), "{:?}", loaded.rejected);
    let (web, api) = (Some([10, 0, 0, 1].into()), Some([10, 0, 0, 2].into()));
    let s = &loaded.state;
    // At the destination, for traffic to websvc: its Telemetry applies.
    assert_eq!(s.reporting(web, true, "websvc.demo.svc.cluster.local").off, MetricSet::ALL);
    // Not for traffic to the pod by another name, nor as a client, nor to
    // another pod of the namespace (it is not namespace-wide).
    assert_eq!(s.reporting(web, true, "unknown"), &ON);
    assert_eq!(s.reporting(web, false, "websvc.demo.svc.cluster.local"), &ON);
    assert_eq!(s.reporting(api, true, "websvc.demo.svc.cluster.local"), &ON);
    assert_eq!(s.telemetry_policy(api), &TelemetryPolicy::default());
}

#[test]
fn a_root_telemetry_attached_to_a_gateway_class_reaches_its_gateways_pods_alone() {
    let gateway = "---\napiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: istio}\n\
        spec: {controllerName: istio.io/gateway-controller}\n\
        ---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: demo}\n\
        spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}\n\
        ---\napiVersion: v1\nkind: Pod\nmetadata: {name: gw-1, namespace: demo, labels: {gateway.networking.k8s.io/gateway-name: gw}}\n\
        status: {podIP: 10.0.0.9}\n";
    let attached = telemetry(
        "class",
        "istio-system",
        "{targetRefs: [{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio}], metrics: [{overrides: [{disabled: true}]}]}",
    );
    let loaded = load(&format!("{gateway}{attached}"));
    assert!(loaded.rejected.is_empty(), "{:?}", loaded.rejected);
    let s = &loaded.state;
    assert_eq!(s.telemetry_policy(Some([10, 0, 0, 9].into())).client.off, MetricSet::ALL);
    // Not the root namespace's whole mesh.
    assert_eq!(s.telemetry_policy(Some([10, 0, 0, 1].into())), &TelemetryPolicy::default());
}

mod tracing;
