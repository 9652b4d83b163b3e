//! Policies attached to a Service by `targetRefs`, as ambient attaches them
//! (istio.io/latest/docs/ambient/usage/l7-features, "targetRefs"): they
//! judge traffic addressed to that Service, at its endpoints, beside the
//! pod's own policies (both must allow); never another Service of the same
//! pod, never the namespace.
use std::net::Ipv4Addr;

use super::*;

/// `hello`'s pod backs two Services: `hello` (80 → 8080) and `admin` (9000).
const SERVICES: &str = "---\napiVersion: v1\nkind: Service\nmetadata: {name: hello, namespace: demo}\n\
    spec: {clusterIP: 10.96.0.10, selector: {app: hello}, ports: [{name: http, port: 80, targetPort: 8080}]}\n\
    ---\napiVersion: v1\nkind: Service\nmetadata: {name: admin, namespace: demo}\n\
    spec: {clusterIP: 10.96.0.11, selector: {app: hello}, ports: [{name: http-admin, port: 9000}]}\n";

const TEST: Option<&str> = Some("spiffe://cluster.local/ns/demo/sa/test");
const SLEEP: Option<&str> = Some("spiffe://cluster.local/ns/other/sa/sleep");

fn state(policies: &[&str]) -> State {
    with(&format!("{SERVICES}{}", policies.concat()))
}

/// The pod `hello` reached at `port`, addressed to the Service `service`
/// (`None`: to the pod itself).
fn to<'s>(s: &'s State, service: Option<&str>) -> Dest<'s> {
    let service = service.map(|name| &**s.services.get(&format!("demo/{name}")).expect("service"));
    Dest { pod: pod(s, "hello"), service }
}

fn judge(s: &State, service: Option<&str>, principal: Option<&str>, port: u16) -> Verdict {
    authorize(s, to(s, service), &Peer { principal, ip: Ipv4Addr::new(10, 244, 1, 2) }, port)
}

#[test]
fn a_policy_attached_to_a_service_judges_only_traffic_addressed_to_it() {
    let only_test = ap(
        "demo",
        "only-test",
        "{targetRefs: [{kind: Service, name: hello}], rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/test]}}]}]}",
    );
    let pod_allows_sleep = ap(
        "demo",
        "pod-sleep",
        "{selector: {matchLabels: {app: hello}}, rules: [{from: [{source: {namespaces: [other]}}]}]}",
    );
    let deny_sleep_on_admin = ap(
        "demo",
        "admin-deny",
        "{targetRef: {kind: Service, name: admin}, action: DENY, rules: [{from: [{source: {namespaces: [other]}}]}]}",
    );
    let in_other_ns =
        ap("other", "elsewhere", "{targetRefs: [{kind: Service, name: hello}], action: DENY, rules: [{}]}");
    let denied_by_service = Verdict::Deny("no ALLOW policy attached to Service demo/hello matched".into());
    // (policies, addressed to, principal, port, verdict)
    type Case<'a> = (&'a [&'a str], Option<&'a str>, Option<&'a str>, u16, Verdict);
    #[rustfmt::skip]
    let cases: &[Case<'_>] = &[
        (&[], Some("hello"), SLEEP, 8080, Verdict::Allow),
        // Positive control, then the attack: another client of the Service.
        (&[&only_test], Some("hello"), TEST, 8080, Verdict::Allow),
        (&[&only_test], Some("hello"), SLEEP, 8080, denied_by_service.clone()),
        (&[&only_test], Some("hello"), None, 8080, denied_by_service.clone()),
        // Not addressed to it: the other Service of the same pod, the pod itself.
        (&[&only_test], Some("admin"), SLEEP, 9000, Verdict::Allow),
        (&[&only_test], None, SLEEP, 8080, Verdict::Allow),
        // Not a namespace-wide policy: no other pod of the namespace is judged.
        // Both layers must allow: the pod's ALLOW does not open the Service's.
        (&[&only_test, &pod_allows_sleep], Some("hello"), SLEEP, 8080, denied_by_service.clone()),
        (&[&only_test, &pod_allows_sleep], Some("hello"), TEST, 8080, Verdict::Deny("no ALLOW policy matched".into())),
        (&[&only_test, &pod_allows_sleep], Some("admin"), SLEEP, 9000, Verdict::Allow),
        (&[&deny_sleep_on_admin], Some("admin"), SLEEP, 9000, Verdict::Deny("demo/admin-deny".into())),
        (&[&deny_sleep_on_admin], Some("admin"), TEST, 9000, Verdict::Allow),
        (&[&deny_sleep_on_admin], Some("hello"), SLEEP, 8080, Verdict::Allow),
        // A tenant's policy in its own namespace names its own Service only:
        // `hello` in `other` does not exist, and `demo/hello` is not judged.
        (&[&in_other_ns], Some("hello"), SLEEP, 8080, Verdict::Allow),
    ];
    for (policies, service, principal, port, want) in cases {
        let s = state(policies);
        assert_eq!(judge(&s, *service, *principal, *port), *want, "{policies:?} to {service:?} by {principal:?}");
    }
    let s = state(&[]);
    assert!(judge(&s, None, SLEEP, 8080) == Verdict::Allow && s.workloads.contains_key("demo/db"));
    let s = state(&[&only_test]);
    assert_eq!(
        authorize(&s, pod(&s, "db").into(), &Peer { principal: SLEEP, ip: Ipv4Addr::new(10, 244, 1, 2) }, 80),
        Verdict::Allow
    );
}

#[test]
fn request_rules_attached_to_a_service_parse_only_its_traffic() {
    let deny_admin_path = ap(
        "demo",
        "no-admin",
        "{targetRefs: [{kind: Service, name: hello}], action: DENY, rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]}",
    );
    let jwt = "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: demo}\n\
         spec: {targetRefs: [{kind: Service, name: hello}], jwtRules: [{issuer: issuer.example, jwksUri: https://issuer.example/jwks}]}\n";
    let s = state(&[&deny_admin_path]);
    assert!(needs_request(&s, to(&s, Some("hello"))));
    assert!(!needs_request(&s, to(&s, Some("admin"))) && !needs_request(&s, to(&s, None)));
    let peer = Peer { principal: TEST, ip: Ipv4Addr::new(10, 244, 1, 2) };
    let headers = http::HeaderMap::new();
    let request = |path| Request {
        method: "GET",
        path,
        host: "hello.demo.svc.cluster.local",
        headers: &headers,
        auth: None,
        remote_ip: Ipv4Addr::new(10, 244, 1, 2),
    };
    let decide =
        |service, path| evaluate(&s, to(&s, service), &Attributes { peer, port: 8080, request: Some(request(path)) });
    assert_eq!(decide(Some("hello"), "/admin/users").verdict, Verdict::Deny("demo/no-admin".into()));
    assert_eq!(decide(Some("hello"), "/hello").verdict, Verdict::Allow);
    assert_eq!(decide(Some("admin"), "/admin/users").verdict, Verdict::Allow);
    // Not HTTP, to the Service: the DENY's HTTP fields are ignored (fails closed).
    assert!(matches!(judge(&s, Some("hello"), TEST, 8080), Verdict::Deny(_)));
    let s = with(&format!("{SERVICES}{jwt}"));
    assert_eq!(jwt_rules(&s, to(&s, Some("hello"))).len(), 1);
    assert!(jwt_rules(&s, to(&s, Some("admin"))).is_empty() && jwt_rules(&s, to(&s, None)).is_empty());
    assert!(needs_request(&s, to(&s, Some("hello"))) && !needs_request(&s, to(&s, Some("admin"))));
}

#[test]
fn each_layer_asks_its_own_external_authorizer() {
    let mesh = "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\n\
                data:\n  mesh: |\n    extensionProviders: [{name: opa, envoyExtAuthzGrpc: {service: opa.x.svc.cluster.local, port: 9191}},\n      \
                {name: svc-authz, envoyExtAuthzGrpc: {service: authz.x.svc.cluster.local, port: 9191}}]\n";
    let pod_level = ap(
        "demo",
        "pod-ext",
        "{selector: {matchLabels: {app: hello}}, action: CUSTOM, provider: {name: opa}, rules: [{}]}",
    );
    let service_level = ap(
        "demo",
        "svc-ext",
        "{targetRefs: [{kind: Service, name: hello}], action: CUSTOM, provider: {name: svc-authz}, rules: [{}]}",
    );
    let s = with(&format!("{mesh}{SERVICES}{pod_level}{service_level}"));
    let headers = http::HeaderMap::new();
    let request = Request {
        method: "GET",
        path: "/",
        host: "h",
        headers: &headers,
        auth: None,
        remote_ip: Ipv4Addr::new(10, 244, 1, 2),
    };
    let a = Attributes {
        peer: Peer { principal: TEST, ip: Ipv4Addr::new(10, 244, 1, 2) },
        port: 8080,
        request: Some(request),
    };
    let asked = |service: Option<&str>| {
        let found = custom(&s, to(&s, service), &a);
        found.iter().filter_map(|p| p.provider.as_ref()).map(|p| p.name.to_string()).collect::<Vec<_>>()
    };
    assert_eq!(asked(Some("hello")), ["opa", "svc-authz"]);
    assert_eq!(asked(Some("admin")), ["opa"]);
    assert_eq!(asked(None), ["opa"]);
}
