use std::net::Ipv4Addr;

use super::*;
use crate::config::state_from_yaml;

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: hello, namespace: demo, labels: {app: hello}}
spec: {nodeName: n1, serviceAccountName: hello}
status: {podIP: 10.244.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: demo, labels: {app: db}}
spec: {nodeName: n1}
status: {podIP: 10.244.0.3}
"#;

fn with(extra: &str) -> State {
    state_from_yaml(&format!("{PODS}{extra}"))
}

fn pod<'a>(s: &'a State, name: &str) -> &'a Workload {
    &s.workloads[&format!("demo/{name}")]
}

fn pa(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

fn ap(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

#[test]
fn peer_authentication_precedence() {
    use MtlsMode::*;
    let mesh_strict = pa("istio-system", "default", "{mtls: {mode: STRICT}}");
    let ns_permissive = pa("demo", "default", "{mtls: {mode: PERMISSIVE}}");
    let ns_unset = pa("demo", "default", "{mtls: {mode: UNSET}}");
    let hello_disable = pa("demo", "hello", "{selector: {matchLabels: {app: hello}}, mtls: {mode: DISABLE}}");
    let hello_port =
        pa("demo", "hello-port", "{selector: {matchLabels: {app: hello}}, portLevelMtls: {\"8080\": {mode: STRICT}}}");
    let other_ns = pa("other", "default", "{mtls: {mode: STRICT}}");
    // (policies, pod, port, expected)
    let cases: &[(&[&str], &str, u16, MtlsMode)] = &[
        (&[], "hello", 80, Permissive),
        (&[&mesh_strict], "hello", 80, Strict),
        (&[&mesh_strict, &ns_permissive], "hello", 80, Permissive),
        (&[&mesh_strict, &ns_unset], "hello", 80, Strict),
        (&[&mesh_strict, &ns_permissive, &hello_disable], "hello", 80, Disable),
        (&[&mesh_strict, &ns_permissive, &hello_disable], "db", 80, Permissive),
        (&[&ns_permissive, &hello_port], "hello", 8080, Strict),
        (&[&ns_permissive, &hello_port], "hello", 80, Permissive),
        (&[&other_ns], "hello", 80, Permissive),
    ];
    for (policies, name, port, want) in cases {
        let s = with(&policies.concat());
        assert_eq!(peer_mode(&s, pod(&s, name), *port), *want, "{policies:?} {name}:{port}");
    }
}

#[test]
fn authorization_table() {
    let test = Some("spiffe://cluster.local/ns/demo/sa/test");
    let sleep = Some("spiffe://cluster.local/ns/other/sa/sleep");
    let ip = Ipv4Addr::new(10, 244, 1, 2);
    let outside = Ipv4Addr::new(172, 18, 0, 1);
    let deny_other = ap("demo", "deny-other", "{action: DENY, rules: [{from: [{source: {namespaces: [other]}}]}]}");
    let allow_test_9095 = ap(
        "demo",
        "allow-test",
        "{selector: {matchLabels: {app: hello}}, rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/test]}}], to: [{operation: {ports: [\"9095\"]}}]}]}",
    );
    let allow_nothing = ap("demo", "nothing", "{}");
    let allow_all = ap("demo", "all", "{rules: [{}]}");
    let deny_no_rules = ap("demo", "deny-empty", "{action: DENY}");
    let allow_prefix =
        ap("demo", "prefix", "{rules: [{from: [{source: {principals: [\"cluster.local/ns/demo/*\"]}}]}]}");
    let allow_not = ap(
        "demo",
        "not",
        "{rules: [{from: [{source: {notNamespaces: [other]}}], to: [{operation: {notPorts: [\"22\"]}}]}]}",
    );
    let allow_block =
        ap("demo", "block", "{rules: [{from: [{source: {ipBlocks: [172.18.0.0/16], notIpBlocks: [172.18.0.9]}}]}]}");
    let mesh_deny = ap("istio-system", "mesh-deny", "{action: DENY, rules: [{to: [{operation: {ports: [\"23\"]}}]}]}");
    // (policies, pod, principal, ip, port, allowed)
    type Case<'a> = (&'a [&'a str], &'a str, Option<&'a str>, Ipv4Addr, u16, bool);
    #[rustfmt::skip]
    let cases: &[Case<'_>] = &[
        (&[], "hello", None, outside, 80, true),
        (&[&deny_other], "hello", sleep, ip, 80, false),
        (&[&deny_other], "hello", test, ip, 80, true),
        (&[&deny_other], "hello", None, outside, 80, true),
        (&[&allow_test_9095], "hello", test, ip, 9095, true),
        (&[&allow_test_9095], "hello", test, ip, 7000, false),
        (&[&allow_test_9095], "hello", sleep, ip, 9095, false),
        (&[&allow_test_9095], "hello", None, outside, 9095, false),
        // The selector decides which workloads a policy covers.
        (&[&allow_test_9095], "db", sleep, ip, 1, true),
        // DENY wins over ALLOW.
        (&[&allow_all, &deny_other], "hello", sleep, ip, 80, false),
        (&[&allow_nothing], "hello", test, ip, 80, false),
        (&[&allow_nothing, &allow_all], "hello", test, ip, 80, true),
        (&[&deny_no_rules], "hello", sleep, ip, 80, true),
        (&[&allow_prefix], "hello", test, ip, 80, true),
        (&[&allow_prefix], "hello", sleep, ip, 80, false),
        (&[&allow_not], "hello", sleep, ip, 80, false),
        (&[&allow_not], "hello", test, ip, 22, false),
        (&[&allow_not], "hello", None, outside, 80, true),
        (&[&allow_block], "hello", None, outside, 80, true),
        (&[&allow_block], "hello", None, Ipv4Addr::new(172, 18, 0, 9), 80, false),
        (&[&allow_block], "hello", test, ip, 80, false),
        (&[&mesh_deny], "db", test, ip, 23, false),
        (&[&mesh_deny], "db", test, ip, 24, true),
    ];
    for (policies, name, principal, ip, port, allowed) in cases {
        let s = with(&policies.concat());
        let got = authorize(&s, pod(&s, name), &Peer { principal: *principal, ip: *ip }, *port);
        assert_eq!(got == Verdict::Allow, *allowed, "{policies:?} {name} {principal:?} {ip}:{port} → {got:?}");
    }
}

#[test]
fn patterns_and_cidrs() {
    assert!(Pattern::parse("*").matches("anything"));
    assert!(Pattern::parse("ns/*").matches("ns/x"));
    assert!(Pattern::parse("*/sa/x").matches("td/ns/y/sa/x"));
    assert!(!Pattern::parse("exact").matches("exactly"));
    let c = Cidr::parse("10.0.0.0/8").unwrap_or_else(|e| panic!("{e}"));
    assert!(c.contains(Ipv4Addr::new(10, 1, 2, 3)) && !c.contains(Ipv4Addr::new(11, 0, 0, 0)));
    assert!(Cidr::parse("0.0.0.0/0").is_ok_and(|c| c.contains(Ipv4Addr::new(1, 2, 3, 4))));
    assert!(Cidr::parse("10.0.0.1").is_ok_and(|c| c.prefix == 32));
    assert!(Cidr::parse("10.0.0.0/33").is_err());
    assert!(Cidr::parse("fe80::/10").is_err());
}
