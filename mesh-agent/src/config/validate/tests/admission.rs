//! What is admitted when something is wrong: one object rejected alone,
//! security objects failing closed, a file's last good version, guarded
//! reloads, Istio's duration limits, reserved identities.
use super::*;

#[test]
fn an_invalid_object_is_rejected_alone_and_the_rest_applies() {
    let yaml = format!(
        "{TWO_PODS}---\napiVersion: v1\nkind: Service\nmetadata: {{name: bad, namespace: demo}}\nspec: {{clusterIP: 10.96.0.999}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: good, namespace: demo}}\n\
         spec: {{clusterIP: 10.96.0.10, selector: {{app: hello}}, ports: [{{port: 80}}]}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: twin, namespace: demo}}\nspec: {{nodeName: n1}}\nstatus: {{podIP: 10.244.0.2}}\n"
    );
    let loaded = admitted(&yaml);
    let names: Vec<&str> = loaded.rejected.iter().map(|e| e.object.as_str()).collect();
    assert_eq!(names, ["Pod demo/twin", "Service demo/bad"], "{:?}", loaded.rejected);
    let s = &loaded.state;
    assert!(s.workloads.contains_key("demo/hello") && s.workloads.contains_key("demo/db"));
    assert!(!s.workloads.contains_key("demo/twin"));
    assert!(s.services.contains_key("demo/good") && !s.services.contains_key("demo/bad"));
}

#[test]
fn a_security_policy_that_cannot_be_admitted_denies_what_it_selects() {
    use crate::routing::policy::{Dest, Peer, Verdict, authorize};
    let ap = |name: &str, spec: &str| {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: demo}}\nspec: {spec}\n"
        )
    };
    let pa = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: demo}\n\
        spec: {mtls: {mode: SOMETIMES}}\n";
    // A key set the agent cannot use: tokens could not be checked, so the
    // workload it protects is closed.
    let ra = "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: demo}\n\
        spec: {selector: {matchLabels: {app: hello}}, jwtRules: [{issuer: x, jwks: '{\"keys\": []}'}]}\n";
    let peer =
        Peer { principal: Some("spiffe://cluster.local/ns/demo/sa/test"), ip: std::net::Ipv4Addr::new(10, 244, 0, 9) };
    let hello_svc = "---\napiVersion: v1\nkind: Service\nmetadata: {name: hello-svc, namespace: demo}\n\
        spec: {clusterIP: 10.96.0.10, selector: {app: hello}, ports: [{name: http, port: 80}]}\n";
    #[rustfmt::skip]
    let cases: &[(&str, String, bool, bool)] = &[
        // (what, extra YAML, hello allowed, db allowed)
        ("all valid",                      ap("ok", "{selector: {matchLabels: {app: hello}}, action: ALLOW, rules: [{}]}"), true, true),
        ("unsupported field, selected",    ap("when", "{selector: {matchLabels: {app: hello}}, rules: [{when: [{key: a, values: [b]}]}]}"), false, true),
        ("unreadable spec, selected",      ap("bad", "{selector: {matchLabels: {app: hello}}, rules: 7}"), false, true),
        ("unreadable selector: namespace", ap("sel", "{selector: {matchLabels: [app]}, action: ALLOW}"), false, false),
        ("PeerAuthentication: namespace",  pa.to_owned(), false, false),
        ("RequestAuthentication, selected", ra.to_owned(), false, true),
        ("CUSTOM, unknown provider",       ap("ext", "{selector: {matchLabels: {app: hello}}, action: CUSTOM, provider: {name: opa}, rules: [{}]}"), false, true),
        // Attached by targetRefs: closed for traffic to its target, never for
        // the namespace; a target that is no pod's, alone.
        ("targetRefs a Service: its traffic", format!("{hello_svc}{}", ap("svc", "{targetRefs: [{kind: Service, name: hello-svc}], rules: [{when: [{key: a, values: [b]}]}]}")), false, true),
        ("valid: targetRefs a Gateway",     ap("gw", "{targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}], action: DENY, rules: [{}]}"), true, true),
        ("valid: targetRefs, no such Service",     ap("none", "{targetRefs: [{kind: Service, name: nope}], action: DENY, rules: [{}]}"), true, true),
    ];
    for (what, extra, hello_ok, db_ok) in cases {
        let loaded = admitted(&format!("{TWO_PODS}{extra}"));
        assert_eq!(
            loaded.rejected.is_empty(),
            what.starts_with("valid") || *what == "all valid",
            "{what}: {:?}",
            loaded.rejected
        );
        let s = &loaded.state;
        let allowed = |pod: &str| {
            let pod = &s.workloads[&format!("demo/{pod}")];
            // Addressed to the Service whose port this is, as an arrival is.
            let service = s.service_port_of(pod, 80).map(|(svc, _)| &**svc);
            authorize(s, Dest { pod, service }, &peer, 80) == Verdict::Allow
        };
        assert_eq!((allowed("hello"), allowed("db")), (*hello_ok, *db_ok), "{what}");
    }
}

#[test]
fn a_file_that_stops_parsing_keeps_its_last_good_version() {
    use crate::routing::policy::{Peer, Verdict, authorize};
    let dir = std::env::temp_dir().join(format!("mesh-config-last-good-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("test setup");
    let deny = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no, namespace: demo}\n\
        spec: {selector: {matchLabels: {app: hello}}, action: DENY, rules: [{}]}\n";
    std::fs::write(dir.join("pods.yaml"), TWO_PODS).expect("test setup");
    std::fs::write(dir.join("policy.yaml"), deny).expect("test setup");
    let peer = Peer { principal: None, ip: std::net::Ipv4Addr::new(10, 244, 0, 9) };
    let denied = |loaded: &Loaded| {
        let s = &loaded.state;
        authorize(s, (&*s.workloads["demo/hello"]).into(), &peer, 80) != Verdict::Allow
    };
    let mut last_good = crate::config::LastGood::default();
    let first = crate::config::load_keeping(&dir, "cluster.local", &mut last_good).expect("test setup");
    assert!(first.rejected.is_empty() && denied(&first), "{:?}", first.rejected);
    // A syntax error: the file's last good version still applies, and says so.
    std::fs::write(dir.join("policy.yaml"), deny.replace("rules: [{}]}", "rules: [{}]")).expect("test setup");
    let broken = crate::config::load_keeping(&dir, "cluster.local", &mut last_good).expect("test setup");
    assert!(denied(&broken), "a policy file that stopped parsing stopped applying");
    assert_eq!(broken.rejected.len(), 1, "{:?}", broken.rejected);
    assert!(broken.rejected[0].message.contains("YAML syntax"), "{}", broken.rejected[0]);
    assert!(broken.rejected[0].message.ends_with("(the file's last good version still applies)"));
    // Without a last good version (a fresh start) the file's policy is absent.
    let fresh = crate::config::load(&dir, "cluster.local").expect("test setup");
    assert!(!denied(&fresh) && fresh.rejected.len() == 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_reload_keeps_the_last_good_configuration_when_the_file_goes_bad() {
    let dir = std::env::temp_dir().join(format!("mesh-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    let file = dir.join("cluster.yaml");
    let good = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n";
    std::fs::write(&file, good).expect("write");
    let mut last_good = crate::config::LastGood::default();
    let first = crate::config::reload_guarded(&dir, "cluster.local", &mut last_good).expect("the first load");
    assert!(first.state.namespaces.contains_key("demo"));
    std::fs::write(&file, "kind: [").expect("write");
    let second = crate::config::reload_guarded(&dir, "cluster.local", &mut last_good).expect("a load");
    assert!(second.state.namespaces.contains_key("demo"), "the last good version of the file applies");
    assert!(!second.rejected.is_empty(), "the syntax error is named");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn durations_outside_istios_range_are_named_errors_not_panics() {
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: hello, namespace: demo}\n\
               spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}\n---\n";
    let vs = |timeout: &str| {
        format!(
            "{svc}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v, namespace: demo}}\n\
             spec: {{hosts: [hello], http: [{{route: [{{destination: {{host: hello}}}}], timeout: \"{timeout}\"}}]}}\n"
        )
    };
    let at = "cluster.yaml (document 2): VirtualService demo/v: spec.http[0].timeout";
    for (timeout, why) in [
        ("99999999999999999999s", "above the largest duration"),
        ("999999999999999999999999999999999999999h", "above the largest duration"),
        ("315576000001s", "above the largest duration, 315576000000s"),
        ("1e400s", "\"1e400s\": unknown unit \"e\""),
        ("0.5ms", "below 1ms"),
        ("1.5ms", "only whole milliseconds"),
        ("0s", "below 1ms"),
        (".s", "expected a duration such as 1h30m, 500ms or 1.5s"),
    ] {
        let err = error_of(&vs(timeout));
        assert!(err.starts_with(at) && err.contains(why), "{timeout}: {err}");
    }
    // Istio's limits themselves are admitted.
    for timeout in ["1ms", "315576000000s", "87660h", "0.25s", "1h30m", "2m3.5s", "2000us"] {
        assert!(load(&vs(timeout)).is_ok(), "{timeout}");
    }
}

#[test]
fn no_object_can_claim_the_cas_or_a_nodes_identity() {
    let pod = |sa: &str| {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: istio-system, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: istio-system}}\n\
             spec: {{nodeName: n1, serviceAccountName: {sa}}}\nstatus: {{podIP: 10.244.0.9}}\n"
        )
    };
    // A gateway pod is a pod: its identity is its service account's, checked alike.
    let gateway_pod = |sa: &str| {
        pod(sa).replace(
            "namespace: istio-system}\n",
            "namespace: istio-system, annotations: {inject.istio.io/templates: gateway}}\n",
        )
    };
    let cases = [
        (
            pod("mesh-ca"),
            "Pod istio-system/p: spec.serviceAccountName: \"mesh-ca\": reserved for the mesh CA's identity",
        ),
        (
            pod("mesh-node-n1"),
            "Pod istio-system/p: spec.serviceAccountName: \"mesh-node-n1\": service accounts mesh-node-*",
        ),
        (
            gateway_pod("mesh-ca"),
            "Pod istio-system/p: spec.serviceAccountName: \"mesh-ca\": reserved for the mesh CA's identity",
        ),
    ];
    for (yaml, want) in cases {
        let err = error_of(&yaml);
        assert!(err.contains(want), "{want}\n{err}");
    }
    assert!(gateway_pod("mesh-ca").contains("inject.istio.io/templates"));
    // In another namespace the names are ordinary.
    assert!(load(&pod("mesh-ca").replace("namespace: istio-system}", "namespace: demo}")).is_ok());
}
