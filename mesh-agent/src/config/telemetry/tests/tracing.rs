//! Tracing as tables from the user's YAML: MeshConfig's providers and
//! defaults, then the Telemetries in Istio's order, resolved per side.
use std::sync::Arc;

use super::{load, policies, telemetry};
use crate::{
    config::ConfigError,
    state::trace::{CustomTag, TraceProvider, TraceSpec},
};

/// The `istio` ConfigMap with an OpenTelemetry provider `otel`, and `rest`
/// of MeshConfig.
fn mesh(rest: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n    \
         extensionProviders:\n    - name: otel\n      opentelemetry: {{service: otel.observability.svc.cluster.local, port: 4317}}\n    \
         - name: zipkin\n      zipkin: {{service: zipkin.istio-system.svc.cluster.local, port: 9411}}\n    {rest}\n"
    )
}

fn spec(sampling: f64) -> TraceSpec {
    TraceSpec {
        provider: Arc::new(TraceProvider {
            name: "otel".into(),
            service: "otel.observability.svc.cluster.local".into(),
            port: 4317,
            max_tag_length: None,
        }),
        sampling,
        custom_tags: None,
        request_id_sampling: true,
        istio_tags: true,
        propagate: true,
        max_path_tag_length: 256,
    }
}

type Sides = (Option<TraceSpec>, Option<TraceSpec>);

/// Each pod's (client, server) tracing.
fn tracing(yaml: &str) -> [Sides; 3] {
    policies(yaml).map(|p| (p.client.trace.map(|t| (*t).clone()), p.server.trace.map(|t| (*t).clone())))
}

#[test]
fn tracing_resolves_as_istios() {
    let default = "defaultProviders: {tracing: [otel]}";
    let both = |s| (Some(spec(s)), Some(spec(s)));
    let (web, api, job) = (0, 1, 2);
    let with = |f: &dyn Fn(&mut TraceSpec)| {
        let mut s = spec(1.0);
        f(&mut s);
        Some(s)
    };
    let cases: Vec<(String, usize, Sides)> = vec![
        // A provider declared but chosen by nothing: no tracing.
        (mesh(""), web, (None, None)),
        // MeshConfig's default provider, at Istio's 1 % ...
        (mesh(default), job, both(1.0)),
        // ... or defaultConfig.tracing.sampling (above 100: 1, as Istio).
        (mesh(&format!("{default}\n    defaultConfig: {{tracing: {{sampling: 50}}}}")), web, both(50.0)),
        (mesh(&format!("{default}\n    defaultConfig: {{tracing: {{sampling: 250}}}}")), web, both(1.0)),
        // A Telemetry picks the provider (without regard to case) and sampling.
        (
            mesh("")
                + &telemetry(
                    "mesh",
                    "istio-system",
                    "{tracing: [{providers: [{name: OTel}], randomSamplingPercentage: 100}]}",
                ),
            job,
            both(100.0),
        ),
        // A Telemetry without a provider, and no default: still nothing.
        (mesh("") + &telemetry("ns", "demo", "{tracing: [{randomSamplingPercentage: 100}]}"), web, (None, None)),
        // One side turned off by mode, in the namespace only.
        (
            mesh(default)
                + &telemetry("ns", "demo", "{tracing: [{match: {mode: SERVER}, disableSpanReporting: true}]}"),
            api,
            (Some(spec(1.0)), None),
        ),
        (
            mesh(default)
                + &telemetry("ns", "demo", "{tracing: [{match: {mode: SERVER}, disableSpanReporting: true}]}"),
            job,
            both(1.0),
        ),
        // The workload's own comes last.
        (
            mesh(default)
                + &telemetry("ns", "demo", "{tracing: [{randomSamplingPercentage: 10}]}")
                + &telemetry(
                    "web",
                    "demo",
                    "{selector: {matchLabels: {app: web}}, tracing: [{randomSamplingPercentage: 0}]}",
                ),
            web,
            both(0.0),
        ),
        (
            mesh(default)
                + &telemetry("ns", "demo", "{tracing: [{randomSamplingPercentage: 10}]}")
                + &telemetry(
                    "web",
                    "demo",
                    "{selector: {matchLabels: {app: web}}, tracing: [{randomSamplingPercentage: 0}]}",
                ),
            api,
            both(10.0),
        ),
        // The other switches.
        (
            mesh(default)
                + &telemetry(
                    "ns",
                    "demo",
                    "{tracing: [{useRequestIdForTraceSampling: false, enableIstioTags: false, disableContextPropagation: true}]}",
                ),
            web,
            {
                let s = with(&|s| (s.request_id_sampling, s.istio_tags, s.propagate) = (false, false, false));
                (s.clone(), s)
            },
        ),
        (mesh(&format!("{default}\n    defaultConfig: {{tracing: {{max_path_tag_length: 64}}}}")), web, {
            let s = with(&|s| s.max_path_tag_length = 64);
            (s.clone(), s)
        }),
    ];
    for (yaml, pod, want) in cases {
        assert_eq!(tracing(&yaml)[pod], want, "pod {pod} under\n{yaml}");
    }
}

#[test]
fn custom_tags_come_from_the_telemetry_else_from_mesh_config() {
    let mesh_tags = "defaultProviders: {tracing: [otel]}\n    defaultConfig:\n      tracing:\n        custom_tags:\n          \
                     team: {literal: {value: payments}}\n          \
                     region: {environment: {name: MESH_TEST_UNSET_VARIABLE, defaultValue: nowhere}}";
    let ns = "{tracing: [{customTags: {tenant: {header: {name: X-Tenant, defaultValue: none}}}}]}";
    let [web, _, job] = tracing(&(mesh(mesh_tags) + &telemetry("ns", "demo", ns)));
    let tags = |s: &Sides| s.0.as_ref().and_then(|t| t.custom_tags.clone()).map(|t| t.to_vec()).unwrap_or_default();
    // MeshConfig's, with the environment read (here: its default) ...
    assert_eq!(
        tags(&job),
        vec![
            ("region".into(), CustomTag::Literal("nowhere".into())),
            ("team".into(), CustomTag::Literal("payments".into()))
        ]
    );
    // ... replaced by a Telemetry's, as Istio's configureCustomTags does.
    assert_eq!(
        tags(&web),
        vec![("tenant".into(), CustomTag::Header { name: "x-tenant".into(), default: Some("none".into()) })]
    );
}

#[test]
fn tracing_the_agent_cannot_do_is_refused_by_name() {
    let telemetry_cases = [
        (
            "{tracing: [{providers: [{name: jaeger}]}]}",
            "spec.tracing[0].providers[0].name: \"jaeger\": not an opentelemetry provider",
        ),
        ("{tracing: [{providers: [{name: zipkin}]}]}", "\"zipkin\": not an opentelemetry provider"),
        ("{tracing: [{providers: [{name: otel}, {name: otel}]}]}", "spec.tracing[0].providers: at most one provider"),
        (
            "{tracing: [{randomSamplingPercentage: 150}]}",
            "spec.tracing[0].randomSamplingPercentage: 150: expected 0 to 100",
        ),
        (
            "{tracing: [{customTags: {t: {literal: {value: a}, header: {name: b}}}}]}",
            "customTags[t]: exactly one of literal",
        ),
        (
            "{tracing: [{customTags: {t: {header: {name: \"bad header\"}}}}]}",
            "customTags[t].header.name: \"bad header\"",
        ),
        ("{tracing: [{match: {mode: SERVER}, sampling: 3}]}", "unknown field `sampling`"),
    ];
    for (spec, want) in telemetry_cases {
        let loaded = load(&(mesh("") + &telemetry("t", "demo", spec)));
        let errors: Vec<String> = loaded.rejected.iter().map(ConfigError::to_string).collect();
        assert!(errors.iter().any(|e| e.contains("Telemetry demo/t") && e.contains(want)), "{spec}: {errors:?}");
    }
    let mesh_cases = [
        ("defaultProviders: {tracing: [zipkin]}", "defaultProviders.tracing[0]: \"zipkin\" is a zipkin provider"),
        ("defaultProviders: {tracing: [nope]}", "defaultProviders.tracing[0]: \"nope\": no opentelemetry provider"),
        ("defaultConfig: {tracing: {sampling: -3}}", "defaultConfig.tracing.sampling: -3: expected 0 to 100"),
    ];
    for (rest, want) in mesh_cases {
        let loaded = load(&mesh(rest));
        let errors: Vec<String> = loaded.rejected.iter().map(ConfigError::to_string).collect();
        assert!(errors.iter().any(|e| e.contains(want)), "{rest}: {errors:?}");
        assert_eq!(loaded.state.telemetry_policy(Some([10, 0, 0, 1].into())).client.trace, None);
    }
    let provider_cases = [
        (
            "{port: 4317, service: otel, http: {path: /v1/traces}}",
            "opentelemetry.http: OTLP over HTTP is not supported",
        ),
        ("{service: otel}", "opentelemetry.port: required"),
        ("{port: 4317}", "opentelemetry.service: required"),
        ("{port: 4317, service: otel, resourceDetectors: {environment: {}}}", "opentelemetry.resourceDetectors"),
    ];
    for (otel, want) in provider_cases {
        let yaml = format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n    \
             extensionProviders:\n    - name: otel\n      opentelemetry: {otel}\n    defaultProviders: {{tracing: [otel]}}\n"
        );
        let loaded = load(&yaml);
        let errors: Vec<String> = loaded.rejected.iter().map(ConfigError::to_string).collect();
        assert!(errors.iter().any(|e| e.contains(&format!("extensionProviders[0].{want}"))), "{otel}: {errors:?}");
    }
}

#[test]
fn a_tenant_cannot_read_the_agents_environment_into_its_spans() {
    // The agent is shared by every tenant on the node: its environment is
    // the operator's, so only the root namespace and MeshConfig may name it.
    let tenant = "{tracing: [{customTags: {leak: {environment: {name: PATH}}}}]}";
    let loaded = load(&(mesh("defaultProviders: {tracing: [otel]}") + &telemetry("t", "demo", tenant)));
    let errors: Vec<String> = loaded.rejected.iter().map(ConfigError::to_string).collect();
    assert!(
        errors.iter().any(|e| e.contains("Telemetry demo/t")
            && e.contains("spec.tracing[0].customTags[leak].environment: the agent's environment")),
        "{errors:?}"
    );
    // The operator's root namespace may (positive control).
    let root = "{tracing: [{customTags: {node: {environment: {name: MESH_TEST_UNSET_VARIABLE, defaultValue: n1}}}}]}";
    let [web, ..] = tracing(&(mesh("defaultProviders: {tracing: [otel]}") + &telemetry("mesh", "istio-system", root)));
    let tags = web.0.and_then(|t| t.custom_tags.clone()).map(|t| t.to_vec()).unwrap_or_default();
    assert_eq!(tags, vec![("node".into(), CustomTag::Literal("n1".into()))]);
}
