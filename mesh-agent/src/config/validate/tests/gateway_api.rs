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
        (route("{parentRefs: [{name: gw}], rules: []}"), "spec.parentRefs[0].name: Gateway demo/gw does not exist (or is not accepted)".to_owned()),
        (route("{parentRefs: [{group: networking.istio.io, kind: Gateway, name: gw}], rules: []}"), "spec.parentRefs[0].kind: \"networking.istio.io\" \"Gateway\": expected a Gateway or a Service".to_owned()),
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
    for kind in ["UDPRoute", "BackendTLSPolicy", "ListenerSet"] {
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

const CLASS: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: istio}\n\
    spec: {controllerName: istio.io/gateway-controller}\n---\n\
    apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: theirs}\n\
    spec: {controllerName: example.net/gateway-controller}\n---\n";

fn gateway(spec: &str) -> String {
    format!(
        "{SERVICES}{CLASS}apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: web, namespace: demo}}\nspec: {spec}\n"
    )
}

#[test]
fn gateways_are_validated_listener_by_listener() {
    let at = "cluster.yaml (document 5): Gateway demo/web";
    let http = "{name: http, port: 80, protocol: HTTP}";
    #[rustfmt::skip]
    let cases = [
        (gateway("{gatewayClassName: nope, listeners: [{name: http, port: 80, protocol: HTTP}]}"), "spec.gatewayClassName: GatewayClass \"nope\" does not exist"),
        (gateway("{gatewayClassName: istio, listeners: []}"), "spec.listeners: at least one listener is required"),
        (gateway(&format!("{{gatewayClassName: istio, listeners: [{http}, {http}]}}")), "spec.listeners[1].name: \"http\": listener names are unique"),
        (gateway("{gatewayClassName: istio, listeners: [{name: a, port: 0, protocol: HTTP}]}"), "spec.listeners[0].port: 0 is not a port number"),
        (gateway("{gatewayClassName: istio, listeners: [{name: a, port: 80, protocol: UDP}]}"), "spec.listeners[0].protocol: UDP: not served"),
        (gateway("{gatewayClassName: istio, listeners: [{name: a, port: 443, protocol: TLS, tls: {mode: Terminate}}]}"), "spec.listeners[0].tls.certificateRefs: exactly one certificate"),
        (gateway("{gatewayClassName: istio, listeners: [{name: a, port: 443, protocol: TLS, tls: {mode: Terminate, certificateRefs: [{name: c}]}, allowedRoutes: {kinds: [{kind: TLSRoute}]}}]}"), "spec.listeners[0].allowedRoutes.kinds: a TLS listener that terminates takes TCPRoutes"),
        (gateway("{gatewayClassName: istio, listeners: [{name: a, port: 443, protocol: TLS, tls: {mode: Reencrypt}}]}"), "spec.listeners[0].tls.mode: \"Reencrypt\": expected Terminate or Passthrough"),
        (gateway("{gatewayClassName: istio, listeners: [{name: a, port: 443, protocol: HTTPS}]}"), "spec.listeners[0].tls: required to terminate TLS"),
        (gateway("{gatewayClassName: istio, listeners: [{name: a, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: nope}]}}]}"), "spec.listeners[0].tls.certificateRefs[0].name: Secret demo/nope does not exist"),
        (gateway("{gatewayClassName: istio, listeners: [{name: a, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: c, namespace: data}]}}]}"), "spec.listeners[0].tls.certificateRefs[0].namespace: Secret data/c: another namespace's, and no ReferenceGrant in data lets Gateways of demo refer to it"),
        (gateway("{gatewayClassName: istio, listeners: [{name: a, port: 80, protocol: HTTP, hostname: \"Web.Example\"}]}"), "spec.listeners[0].hostname: \"Web.Example\" is not a hostname"),
        (gateway("{gatewayClassName: istio, listeners: [{name: a, port: 80, protocol: HTTP, allowedRoutes: {kinds: [{kind: UDPRoute}]}}]}"), "spec.listeners[0].allowedRoutes.kinds[0]: \"UDPRoute\": only HTTPRoute, GRPCRoute, TCPRoute and TLSRoute are served"),
        (gateway("{gatewayClassName: istio, listeners: [{name: a, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Some}}}]}"), "spec.listeners[0].allowedRoutes.namespaces.from: \"Some\": expected Same, All or Selector"),
        (gateway(&format!("{{gatewayClassName: istio, addresses: [{{value: 1.2.3.4}}], listeners: [{http}]}}")), "spec.addresses: not supported by this version of mesh-agent"),
    ];
    for (yaml, want) in cases {
        let got = error_of(&yaml);
        assert!(got.contains(&format!("{at}: {want}")), "for:\n{yaml}\nwant: {at}: {want}\ngot:  {got}");
    }
    // Another controller's Gateway is left to it: loaded, not served.
    let loaded = load(&gateway(&format!("{{gatewayClassName: theirs, listeners: [{http}]}}"))).expect("valid");
    assert!(loaded.state.gateways.is_empty());
    // Ours: served by its own namespace's pods labelled with its name.
    let loaded = load(&gateway(&format!("{{gatewayClassName: istio, listeners: [{http}]}}"))).expect("valid");
    let g = &loaded.state.gateways[0];
    assert!(g.own_namespace && g.selector["gateway.networking.k8s.io/gateway-name"] == "web");
}

#[test]
fn a_route_attaches_only_to_listeners_that_take_it() {
    let listeners = "{gatewayClassName: istio, listeners: [\
        {name: same, port: 80, protocol: HTTP, hostname: \"*.example.com\"}, \
        {name: all, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}]}";
    let route = |ns: &str, spec: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {ns}}}\n\
             spec: {{clusterIP: 10.96.0.3{}, selector: {{app: web}}, ports: [{{name: http, port: 80}}]}}\n\
             ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: {ns}}}\nspec: {spec}\n",
            ns.len()
        )
    };
    let to_web = "rules: [{backendRefs: [{name: web, port: 80}]}]";
    // demo's route on both listeners, with the hostnames each shares.
    let yaml = format!(
        "{}{}",
        gateway(listeners),
        route(
            "demo2",
            &format!(
                "{{parentRefs: [{{name: web, namespace: demo}}], hostnames: [a.example.com, b.other.org], {to_web}}}"
            )
        )
    );
    let loaded = load(&yaml).expect("valid");
    let vs: Vec<(Vec<String>, Option<u16>)> =
        loaded.state.virtual_services.iter().map(|v| (v.host_patterns.clone(), v.http[0].matches[0].port)).collect();
    // From namespace demo2: only the listener that takes all namespaces.
    assert_eq!(vs, [(vec!["a.example.com".to_owned(), "b.other.org".to_owned()], Some(8080))]);
    // From demo: both; on the first only the hostname it shares.
    let yaml = format!(
        "{}{}",
        gateway(listeners),
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: demo}\n\
        spec: {parentRefs: [{name: web}], hostnames: [a.example.com, b.other.org], rules: [{backendRefs: [{name: web, port: 80}]}]}\n"
    );
    let loaded = load(&yaml).expect("valid");
    let mut vs: Vec<(Vec<String>, Option<u16>)> =
        loaded.state.virtual_services.iter().map(|v| (v.host_patterns.clone(), v.http[0].matches[0].port)).collect();
    vs.sort();
    assert_eq!(
        vs,
        [
            (vec!["a.example.com".to_owned()], Some(80)),
            (vec!["a.example.com".to_owned(), "b.other.org".to_owned()], Some(8080))
        ]
    );
    // A sectionName naming a listener that does not take the route: refused, named.
    let yaml = format!(
        "{}{}",
        gateway(listeners),
        route("demo2", &format!("{{parentRefs: [{{name: web, namespace: demo, sectionName: same}}], {to_web}}}"))
    );
    assert!(
        error_of(&yaml).contains("spec.parentRefs[0]: no listener of Gateway demo/web takes this route"),
        "{}",
        error_of(&yaml)
    );
}

#[test]
fn a_policy_attached_to_a_gateway_selects_its_pods_in_its_namespace() {
    let ap = |spec: &str| {
        format!(
            "{MESHED_NS}apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: a, namespace: demo}}\nspec: {spec}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: web-gw, namespace: demo, labels: {{gateway.networking.k8s.io/gateway-name: web}}}}\n\
             spec: {{nodeName: n1}}\nstatus: {{podIP: 10.244.0.9}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: web-gw, namespace: other, labels: {{gateway.networking.k8s.io/gateway-name: web}}}}\n\
             spec: {{nodeName: n1}}\nstatus: {{podIP: 10.244.0.10}}\n"
        )
    };
    let gw = "{group: gateway.networking.k8s.io, kind: Gateway, name: web}";
    let loaded = load(&ap(&format!("{{targetRefs: [{gw}], action: DENY, rules: [{{}}]}}"))).expect("valid");
    let p = &loaded.state.authorization_policies[0];
    assert_eq!(p.selector.as_ref().map(|s| s["gateway.networking.k8s.io/gateway-name"].as_str()), Some("web"));
    assert!(p.services.is_empty());
    // It judges demo's gateway pod, never another namespace's of the same name.
    use crate::routing::policy::{Peer, Verdict, authorize};
    let peer = Peer { principal: None, ip: std::net::Ipv4Addr::new(172, 18, 0, 1) };
    let s = &loaded.state;
    let verdict = |pod: &str| authorize(s, (&*s.workloads[pod]).into(), &peer, 80);
    assert!(matches!(verdict("demo/web-gw"), Verdict::Deny(_)));
    assert_eq!(verdict("other/web-gw"), Verdict::Allow);
    let at = "cluster.yaml (document 2): AuthorizationPolicy demo/a";
    let cases = [
        (
            format!("{{targetRefs: [{gw}, {{kind: Service, name: s}}]}}"),
            "spec.targetRefs: a Gateway and Services in one policy",
        ),
        (format!("{{targetRefs: [{gw}, {gw}]}}"), "spec.targetRefs[1]: one Gateway per policy"),
    ];
    for (spec, want) in cases {
        let got = error_of(&ap(&spec));
        assert!(got.contains(&format!("{at}: {want}")), "want {want}\ngot {got}");
    }
}

#[test]
fn a_grpc_route_is_the_http_route_its_methods_amount_to() {
    let grpc = |spec: &str| {
        format!(
            "{SERVICES}apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g, namespace: demo}}\nspec: {spec}\n"
        )
    };
    let rules = "rules: [{matches: [{method: {service: test.Echo, method: Unary}}, {method: {service: test.Echo}}, \
        {method: {type: RegularExpression, method: \"B.*\"}}], backendRefs: [{name: web, port: 80}]}]";
    let loaded = load(&grpc(&format!("{{{PARENT}, {rules}}}"))).expect("valid");
    let vs = &loaded.state.virtual_services[0];
    let uris: Vec<String> = vs.http.iter().map(|r| format!("{:?}", r.matches[0].uri)).collect();
    // Exact method first, then the service's prefix on a segment, then the regex.
    assert!(uris[0].contains("Exact(\"/test.Echo/Unary\")"), "{uris:?}");
    assert!(uris.iter().any(|u| u.contains("Prefix(\"/test.Echo/\")")), "{uris:?}");
    assert!(uris.iter().any(|u| u.contains("/[^/]+/B.*")), "{uris:?}");
    // Errors name the GRPCRoute's own fields.
    let at = "cluster.yaml (document 3): GRPCRoute demo/g";
    let bad = format!(
        "{{{PARENT}, rules: [{{matches: [{{method: {{type: Prefix, service: s}}}}], backendRefs: [{{name: web, port: 80}}]}}]}}"
    );
    let got = error_of(&grpc(&bad));
    assert!(got.contains(&format!("{at}: spec.rules[0].matches[0].method.type")), "{got}");
    let bad = format!(
        "{{{PARENT}, rules: [{{filters: [{{type: RequestRedirect}}], backendRefs: [{{name: web, port: 80}}]}}]}}"
    );
    assert!(
        error_of(&grpc(&bad)).contains("\"RequestRedirect (an HTTPRoute filter)\": not supported"),
        "{}",
        error_of(&grpc(&bad))
    );
}

#[test]
fn tcp_and_tls_routes_attach_to_listeners_of_their_kind() {
    let listeners = "{gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}, {name: tcp, port: 9000, protocol: TCP}, \
        {name: tls, port: 9443, protocol: TLS, hostname: \"*.example.com\", tls: {mode: Passthrough}}]}";
    let route = |kind: &str, name: &str, spec: &str| {
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: {kind}\nmetadata: {{name: {name}, namespace: demo}}\nspec: {spec}\n"
        )
    };
    let yaml = format!(
        "{}{}{}",
        gateway(listeners),
        route("TCPRoute", "r", "{parentRefs: [{name: web}], rules: [{backendRefs: [{name: web, port: 80}]}]}"),
        route(
            "TLSRoute",
            "t",
            "{parentRefs: [{name: web}], hostnames: [a.example.com], rules: [{backendRefs: [{name: web, port: 80}]}]}"
        ),
    );
    let loaded = load(&yaml).expect("valid");
    let tcp: Vec<_> =
        loaded.state.virtual_services.iter().flat_map(|v| v.tcp.iter().map(|r| r.ports.clone())).collect();
    assert_eq!(tcp, [vec![Some(9000)]], "the TCP listener only");
    let tls: Vec<_> = loaded
        .state
        .virtual_services
        .iter()
        .flat_map(|v| v.tls.iter().map(|r| (r.matches[0].sni_hosts.clone(), r.matches[0].port)))
        .collect();
    assert_eq!(tls, [(vec!["a.example.com".to_owned()], Some(9443))]);
    // A TCPRoute to a Gateway without a TCP listener: named, not attached.
    let http_only = "{gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}";
    let yaml = format!(
        "{}{}",
        gateway(http_only),
        route("TCPRoute", "r", "{parentRefs: [{name: web}], rules: [{backendRefs: [{name: web, port: 80}]}]}")
    );
    assert!(error_of(&yaml).contains("no listener of Gateway demo/web takes this route"), "{}", error_of(&yaml));
    // A TCPRoute's backend takes no filters either: refused, not ignored.
    let filtered = "{parentRefs: [{name: web}], rules: [{backendRefs: [{name: web, port: 80, filters: [{type: X}]}]}]}";
    let yaml = format!("{}{}", gateway(listeners), route("TCPRoute", "r", filtered));
    assert!(error_of(&yaml).contains("spec.rules[0].backendRefs[0].filters: not supported"), "{}", error_of(&yaml));
}

#[test]
fn a_policy_attached_to_a_gateway_class_judges_that_class_gateways_pods_alone() {
    // demo/web is an `istio` Gateway and other/web another controller's;
    // their pods, a pod labelled as web's in a namespace without that
    // Gateway, and an ordinary pod.
    let pod = |ns: &str, name: &str, labels: &str, ip: u8| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
             spec: {{nodeName: n1}}\nstatus: {{podIP: 10.244.0.{ip}}}\n"
        )
    };
    let gw = "gateway.networking.k8s.io/gateway-name";
    let cluster = format!(
        "{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: web, namespace: other}}\n\
         spec: {{gatewayClassName: theirs, listeners: [{{name: http, port: 80, protocol: HTTP}}]}}\n{}{}{}{}",
        gateway("{gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}"),
        pod("demo", "web-gw", &format!("{gw}: web"), 9),
        pod("other", "web-gw", &format!("{gw}: web"), 10),
        pod("spare", "web-gw", &format!("{gw}: web"), 11),
        pod("demo", "app", "app: web", 12),
    );
    let policy = |ns: &str, spec: &str| {
        format!(
            "{cluster}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: class, namespace: {ns}}}\nspec: {spec}\n"
        )
    };
    let class = "{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio}";
    use crate::routing::policy::{Peer, Verdict, authorize};
    let peer = Peer { principal: None, ip: std::net::Ipv4Addr::new(172, 18, 0, 1) };
    let verdicts = |yaml: &str| {
        let loaded = admitted(yaml);
        let s = &loaded.state;
        ["demo/web-gw", "other/web-gw", "spare/web-gw", "demo/app"]
            .map(|pod| matches!(authorize(s, (&*s.workloads[pod]).into(), &peer, 80), Verdict::Deny(_)))
    };
    // Attack surface first: the root namespace's DENY reaches the `istio`
    // Gateway's pod alone — not another class's, not a look-alike pod, and
    // never the whole mesh (as a root policy without selector would).
    let deny = policy("istio-system", &format!("{{targetRefs: [{class}], action: DENY, rules: [{{}}]}}"));
    assert!(load(&deny).is_ok(), "{:?}", load(&deny).err());
    assert_eq!(verdicts(&deny), [true, false, false, false]);
    // A tenant may not attach to a class (it spans every namespace's
    // Gateways): refused by name, and denying nothing in its place.
    let tenant = policy("demo", &format!("{{targetRefs: [{class}], action: DENY, rules: [{{}}]}}"));
    assert!(error_of(&tenant).contains(
        "AuthorizationPolicy demo/class: spec.targetRefs[0].kind: a GatewayClass is targeted only by a policy of the root namespace istio-system"
    ));
    assert_eq!(verdicts(&tenant), [false, false, false, false]);
    // A root policy on the class that cannot be read closes that class's
    // pods alone.
    let broken = policy(
        "istio-system",
        &format!("{{targetRefs: [{class}], action: ALLOW, rules: [{{to: [{{operation: {{ports: [x]}}}}]}}]}}"),
    );
    assert!(load(&broken).is_err());
    assert_eq!(verdicts(&broken), [true, false, false, false]);
    // One class per policy, and alone.
    let two = policy("istio-system", &format!("{{targetRefs: [{class}, {{kind: Service, name: web}}]}}"));
    assert!(error_of(&two).contains("a GatewayClass and other targets in one policy"));
}
