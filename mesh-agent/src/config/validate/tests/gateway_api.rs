//! The Gateway API's kinds field by field: HTTPRoute attached to Services,
//! ReferenceGrant, and every kind this version does not serve refused by
//! name, never skipped.
use super::*;

const SERVICES: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n\
    spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80}]}\n---\n\
    apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: data}\n\
    spec: {clusterIP: 10.96.0.11, selector: {app: db}, ports: [{name: http, port: 8080}]}\n---\n";

fn route(spec: &str) -> String {
    format!(
        "{SERVICES}apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: demo}}\nspec: {spec}\n"
    )
}

const PARENT: &str = "parentRefs: [{group: \"\", kind: Service, name: web}]";

#[test]
fn http_routes_are_validated_field_by_field() {
    let at = "cluster.yaml (document 3): HTTPRoute demo/r";
    let rule = |r: &str| route(&format!("{{{PARENT}, rules: [{r}]}}"));
    let backend = "backendRefs: [{name: web, port: 80}]";
    #[rustfmt::skip]
    let cases = [
        (route("{rules: []}"), "spec.parentRefs: at least one parentRef is required".to_owned()),
        (route("{parentRefs: [{name: gw}], rules: []}"), "spec.parentRefs[0].kind: a Gateway API Gateway: not supported by this version of mesh-agent".to_owned()),
        (route("{parentRefs: [{group: \"\", kind: Service, name: nope}]}"), "spec.parentRefs[0].name: Service demo/nope does not exist".to_owned()),
        (route("{parentRefs: [{group: \"\", kind: Service, name: web, port: 81}]}"), "spec.parentRefs[0].port: 81: not a port of Service demo/web".to_owned()),
        (route("{parentRefs: [{group: \"\", kind: Service, name: web, sectionName: http}]}"), "spec.parentRefs[0].sectionName: not supported for a Service parent".to_owned()),
        (route(&format!("{{{PARENT}, hostnames: [\"Web.Example\"]}}")), "spec.hostnames[0]: \"Web.Example\" is not a hostname".to_owned()),
        (rule("{backendRefs: [{name: db, namespace: data, port: 8080}]}"), "spec.rules[0].backendRefs[0].namespace: Service data/db: another namespace's, and no ReferenceGrant in data lets HTTPRoutes of demo refer to it".to_owned()),
        (rule("{backendRefs: [{name: web}]}"), "spec.rules[0].backendRefs[0].port: required for a Service".to_owned()),
        (rule("{backendRefs: [{group: networking.istio.io, kind: ServiceEntry, name: web, port: 80}]}"), "spec.rules[0].backendRefs[0].kind: \"networking.istio.io\" \"ServiceEntry\": expected a Service".to_owned()),
        (rule("{backendRefs: [{name: web, port: 80, weight: 0}]}"), "spec.rules[0].backendRefs: a rule needs a backendRef of weight above 0, or a RequestRedirect".to_owned()),
        (rule(&format!("{{{backend}, filters: [{{type: CORS, cors: {{}}}}]}}")), "spec.rules[0].filters[0].type: \"CORS\": not supported by this version of mesh-agent".to_owned()),
        (rule(&format!("{{{backend}, filters: [{{type: RequestHeaderModifier}}]}}")), "spec.rules[0].filters[0].requestHeaderModifier: required with type RequestHeaderModifier".to_owned()),
        (rule(&format!("{{{backend}, filters: [{{type: RequestRedirect, requestRedirect: {{}}}}]}}")), "spec.rules[0].backendRefs: a rule with a RequestRedirect filter has no backendRefs".to_owned()),
        (rule("{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 305}}]}"), "spec.rules[0].filters[0].requestRedirect.statusCode: 305: expected 301, 302, 303, 307 or 308".to_owned()),
        (rule(&format!("{{matches: [{{path: {{type: Exact, value: /a}}}}], {backend}, filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /b}}}}}}]}}")), "spec.rules[0].filters.urlRewrite.path: ReplacePrefixMatch needs PathPrefix matches".to_owned()),
        (rule(&format!("{{matches: [{{path: {{type: RegularExpression, value: \"(\"}}}}], {backend}}}")), "spec.rules[0].matches[0].path.value: \"(\" is not a regular expression".to_owned()),
        (rule(&format!("{{matches: [{{path: {{value: a}}}}], {backend}}}")), "spec.rules[0].matches[0].path.value: \"a\": a path starts with /".to_owned()),
        (rule(&format!("{{matches: [{{headers: [{{type: Prefix, name: x, value: y}}]}}], {backend}}}")), "spec.rules[0].matches[0].headers[0].type: \"Prefix\": expected Exact or RegularExpression".to_owned()),
        (rule(&format!("{{{backend}, timeouts: {{backendRequest: 1s}}}}")), "spec.rules[0].timeouts.backendRequest: not supported by this version of mesh-agent".to_owned()),
        (rule(&format!("{{{backend}, retry: {{attempts: 2}}}}")), "spec.rules[0].retry: not supported by this version of mesh-agent".to_owned()),
        (rule(&format!("{{{backend}, matchs: []}}")), "spec.rules[0].matchs: unknown field `matchs`".to_owned()),
    ];
    for (yaml, want) in cases {
        let got = error_of(&yaml);
        assert!(got.contains(&format!("{at}: {want}")), "for:\n{yaml}\nwant: {at}: {want}\ngot:  {got}");
    }
}

#[test]
fn a_reference_grant_opens_one_namespace_to_another_for_what_it_names() {
    let grant = |from_ns: &str, name: &str| {
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: g, namespace: data}}\n\
             spec: {{from: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: {from_ns}}}], to: [{{group: \"\", kind: Service{name}}}]}}\n"
        )
    };
    let yaml = |g: &str| {
        format!(
            "{}{g}",
            route(&format!("{{{PARENT}, rules: [{{backendRefs: [{{name: db, namespace: data, port: 8080}}]}}]}}"))
        )
    };
    // Granted to demo's HTTPRoutes, for every Service or for db by name.
    assert!(load(&yaml(&grant("demo", ""))).is_ok());
    assert!(load(&yaml(&grant("demo", ", name: db"))).is_ok());
    // Granted to another namespace, or for another Service: still refused.
    assert!(error_of(&yaml(&grant("other", ""))).contains("no ReferenceGrant in data"));
    assert!(error_of(&yaml(&grant("demo", ", name: cache"))).contains("no ReferenceGrant in data"));
}

#[test]
fn gateway_api_kinds_this_version_does_not_serve_are_refused_by_name() {
    for kind in ["Gateway", "GatewayClass", "GRPCRoute", "TCPRoute", "TLSRoute"] {
        let yaml = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata: {{name: x, namespace: demo}}\nspec: {{}}\n"
        );
        let got = error_of(&yaml);
        assert!(got.contains(&format!("{kind} demo/x: kind: gateway.networking.k8s.io/v1 {kind} is not supported by this version of mesh-agent")), "{got}");
    }
    // A valid route loads into a mesh VirtualService for its Service.
    let loaded =
        load(&route(&format!("{{{PARENT}, rules: [{{backendRefs: [{{name: web, port: 80}}]}}]}}"))).expect("valid");
    let vs = &loaded.state.virtual_services[0];
    assert_eq!((&*vs.name, vs.hosts.as_slice()), ("HTTPRoute r", ["demo/web".to_owned()].as_slice()));
}
