//! HTTPRoutes attached to a Service (GAMMA), routed as the Gateway API
//! says: matches ordered by precedence across routes, `PathPrefix` on path
//! segments, weights, the parentRef's port, producer and consumer routes,
//! and the filters' rewrites and redirects as the pipeline applies them.
use super::*;

/// The cluster without its VirtualService (Services hello and other).
fn base() -> &'static str {
    let at = CLUSTER.find("---\napiVersion: networking.istio.io/v1\nkind: VirtualService").expect("the VirtualService");
    &CLUSTER[..at]
}

fn route(name: &str, ns: &str, created: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: {name}, namespace: {ns}, creationTimestamp: \"{created}\"}}\nspec: {spec}\n"
    )
}

const PARENT: &str = "parentRefs: [{group: \"\", kind: Service, name: hello, namespace: demo}]";

/// Where a request from `client`'s namespace goes: the endpoint, and the
/// path as the rule's rewrite leaves it.
fn routed(s: &State, client: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(
            hyper::header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    let view = RequestView { method, path, headers: &h, client: CLIENT, namespace: Some(client) };
    let d = route_request(s, "10.96.0.10:80".parse().expect("a"), &view, 0, 0, &NoState);
    let to = describe(&d).split(' ').next().unwrap_or_default().to_owned();
    let rewritten = d.rule.as_ref().and_then(|r| r.rewrite.as_ref()).and_then(|w| {
        let prefix = d.matched_prefix.as_deref().filter(|_| !w.full_path);
        Some(rewrite_path(path, prefix, w.uri.as_deref()?))
    });
    match rewritten {
        Some(p) => format!("{to} {p}"),
        None => to,
    }
}

/// (method, path, headers, where it goes)
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

#[test]
fn matches_are_ordered_by_the_gateway_apis_precedence_across_routes() {
    let older = route(
        "older",
        "demo",
        "2026-01-01T00:00:00Z",
        &format!(
            "{{{PARENT}, rules: [\
             {{matches: [{{path: {{type: PathPrefix, value: /api}}}}], backendRefs: [{{name: other, port: 8000}}]}}, \
             {{matches: [{{path: {{type: PathPrefix, value: /api}}, method: POST}}], backendRefs: [{{name: hello, port: 80}}]}}, \
             {{matches: [{{path: {{type: PathPrefix, value: /h}}, headers: [{{name: X-Canary, value: \"yes\"}}]}}, \
                         {{path: {{type: PathPrefix, value: /h}}, queryParams: [{{name: v, value: \"2\"}}]}}], \
               backendRefs: [{{name: other, port: 8000}}]}}, \
             {{matches: [{{path: {{type: RegularExpression, value: \"/re/[0-9]+\"}}}}], backendRefs: [{{name: other, port: 8000}}]}}]}}"
        ),
    );
    let newer = route(
        "newer",
        "demo",
        "2026-06-01T00:00:00Z",
        &format!(
            "{{{PARENT}, rules: [\
             {{matches: [{{path: {{type: Exact, value: /api/exact}}}}], backendRefs: [{{name: hello, port: 80}}]}}, \
             {{matches: [{{path: {{type: PathPrefix, value: /api/v2/}}}}], backendRefs: [{{name: hello, port: 80}}]}}, \
             {{matches: [{{path: {{type: PathPrefix, value: /api}}}}], backendRefs: [{{name: hello, port: 80}}]}}, \
             {{matches: [{{path: {{type: PathPrefix, value: /h}}, headers: [{{name: x-canary, value: \"yes\"}}, {{name: x-b, value: \"1\"}}]}}], \
               backendRefs: [{{name: hello, port: 80}}]}}]}}"
        ),
    );
    let s = state_from_yaml(&format!("{}{older}{newer}", base()));
    #[rustfmt::skip]
    let cases: &[Case<'_>] = &[
        // An exact path before any prefix, whichever route is older.
        ("GET", "/api/exact", &[], "hello-v1"),
        // The longest prefix first: the newer route's /api/v2.
        ("GET", "/api/v2/x", &[], "hello-v1"),
        ("GET", "/api/v2", &[], "hello-v1"),
        // Equal prefixes: a method match first, then the older route.
        ("POST", "/api/x", &[], "hello-v1"),
        ("GET", "/api/x", &[], "other"),
        ("GET", "/api", &[], "other"),
        // A prefix ends on a segment: /apix is not under /api (no rule: the Service).
        ("GET", "/apix", &[], "hello-v1"),
        // More header matches first; header names in any case.
        ("GET", "/h", &[("x-canary", "yes"), ("x-b", "1")], "hello-v1"),
        ("GET", "/h", &[("x-canary", "yes")], "other"),
        ("GET", "/h?v=2", &[], "other"),
        ("GET", "/h", &[], "hello-v1"),
        // A regular expression matches the whole path.
        ("GET", "/re/42", &[], "other"),
        ("GET", "/re/42/x", &[], "hello-v1"),
    ];
    for (method, path, headers, want) in cases {
        assert_eq!(routed(&s, "demo", method, path, headers), *want, "{method} {path} {headers:?}");
    }
}

#[test]
fn weights_ports_and_consumer_routes() {
    let weighted = route(
        "weighted",
        "demo",
        "2026-01-01T00:00:00Z",
        "{parentRefs: [{group: \"\", kind: Service, name: hello, port: 80}], rules: [{backendRefs: [\
         {name: hello, port: 80, weight: 0}, {name: other, port: 8000, weight: 3}]}]}",
    );
    // Another namespace's route for demo's Service: its own clients only.
    let consumer = route(
        "mine",
        "attacker",
        "2025-01-01T00:00:00Z",
        "{parentRefs: [{group: \"\", kind: Service, name: hello, namespace: demo}], rules: [{backendRefs: [\
         {name: hello, namespace: demo, port: 80}]}]}",
    );
    let grant = "---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: attacker-to-hello, namespace: demo}\n\
         spec: {from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: attacker}], to: [{group: \"\", kind: Service, name: hello}]}\n";
    let s = state_from_yaml(&format!("{}{weighted}{consumer}{grant}", base()));
    for random in 0..8 {
        let h = HeaderMap::new();
        let view = RequestView { method: "GET", path: "/", headers: &h, client: CLIENT, namespace: Some("demo") };
        let d = route_request(&s, "10.96.0.10:80".parse().expect("a"), &view, 0, random, &NoState);
        assert!(describe(&d).starts_with("other "), "weight 0 gets nothing: {}", describe(&d));
    }
    // The consumer route decides for its namespace's clients, the producer's for others'.
    assert_eq!(routed(&s, "attacker", "GET", "/", &[]), "hello-v1");
    assert_eq!(routed(&s, "elsewhere", "GET", "/", &[]), "other");
    let vs: Vec<_> = s.virtual_services.iter().map(|v| (&*v.namespace, v.export_to.clone())).collect();
    assert!(vs.contains(&("attacker", Some(vec!["attacker".into()]))) && vs.contains(&("demo", None)), "{vs:?}");
    // The parentRef's port: a rule for port 80 only.
    let rule = &s.virtual_services.iter().find(|v| &*v.namespace == "demo").expect("demo's").http[0];
    assert_eq!(rule.matches[0].port, Some(80));
}

#[test]
fn rewrites_and_redirects_follow_the_filters() {
    let rewrite = route(
        "rewrite",
        "demo",
        "2026-01-01T00:00:00Z",
        &format!(
            "{{{PARENT}, rules: [\
             {{matches: [{{path: {{value: /prefix/one}}}}], filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /one}}}}}}], backendRefs: [{{name: other, port: 8000}}]}}, \
             {{matches: [{{path: {{value: /strip}}}}], filters: [{{type: URLRewrite, urlRewrite: {{hostname: h.example, path: {{type: ReplacePrefixMatch, replacePrefixMatch: /}}}}}}], backendRefs: [{{name: other, port: 8000}}]}}, \
             {{matches: [{{path: {{value: /full}}}}], filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplaceFullPath, replaceFullPath: /one}}}}}}], backendRefs: [{{name: other, port: 8000}}]}}, \
             {{matches: [{{path: {{value: /moved}}}}], filters: [{{type: RequestRedirect, requestRedirect: {{scheme: https, hostname: new.example, statusCode: 301, \
               path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}}}}}]}}]}}"
        ),
    );
    let s = state_from_yaml(&format!("{}{rewrite}", base()));
    #[rustfmt::skip]
    let cases = [
        ("/prefix/one/two", "other /one/two"),
        ("/prefix/one", "other /one"),
        ("/strip/three", "other /three"),
        ("/strip", "other /"),
        ("/full/x/y", "other /one"),
    ];
    for (path, want) in cases {
        assert_eq!(routed(&s, "demo", "GET", path, &[]), want, "{path}");
    }
    let h = HeaderMap::new();
    let view = RequestView { method: "GET", path: "/moved/a", headers: &h, client: CLIENT, namespace: Some("demo") };
    let d = route_request(&s, "10.96.0.10:80".parse().expect("a"), &view, 0, 0, &NoState);
    let redirect = d.rule.as_ref().and_then(|r| r.redirect.clone()).expect("a redirect");
    let target = redirect.gateway_api.clone().expect("the Gateway API's");
    assert_eq!(
        (redirect.code, redirect.authority.as_deref(), target.scheme.as_deref()),
        (301, Some("new.example"), Some("https"))
    );
    let prefix = d.matched_prefix.as_deref().filter(|_| target.replace_prefix);
    assert_eq!(rewrite_path("/moved/a", prefix, redirect.uri.as_deref().expect("uri")), "/new/a");
    let rule = d.rule.as_ref().expect("rule");
    assert!(rule.routes.is_empty() && rule.rewrite.is_none());
}
