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
        let got = authorize(&s, pod(&s, name).into(), &Peer { principal: *principal, ip: *ip }, *port);
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

/// A request as the destination's agent sees it.
struct Req {
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: http::HeaderMap,
    principal: Option<&'static str>,
    claims: serde_json::Value,
}

fn get(path: &'static str) -> Req {
    Req {
        method: "GET",
        path,
        host: "hello.demo.svc.cluster.local:9095",
        headers: http::HeaderMap::new(),
        principal: None,
        claims: serde_json::json!({}),
    }
}

impl Req {
    fn method(self, method: &'static str) -> Req {
        Req { method, ..self }
    }
    fn host(self, host: &'static str) -> Req {
        Req { host, ..self }
    }
    fn header(mut self, k: &'static str, v: &'static str) -> Req {
        self.headers.append(k, http::HeaderValue::from_static(v));
        self
    }
    fn jwt(self, principal: &'static str, claims: serde_json::Value) -> Req {
        Req { principal: Some(principal), claims, ..self }
    }
}

fn decide(s: &State, r: Option<&Req>, principal: Option<&str>, port: u16) -> Decision {
    let empty = serde_json::Map::new();
    let audiences = ["hello".to_owned()];
    let request = r.map(|r| Request {
        method: r.method,
        path: r.path,
        host: r.host,
        headers: &r.headers,
        auth: r.principal.map(|p| Auth {
            principal: p,
            audiences: &audiences,
            presenter: None,
            claims: r.claims.as_object().unwrap_or(&empty),
        }),
        remote_ip: Ipv4Addr::new(172, 18, 0, 1),
    });
    let peer = Peer { principal, ip: Ipv4Addr::new(10, 244, 1, 2) };
    evaluate(s, pod(s, "hello").into(), &Attributes { peer, port, request })
}

#[test]
fn request_authorization_table() {
    let test = Some("spiffe://cluster.local/ns/demo/sa/test");
    let alice = "https://issuer.example/alice";
    let requires_jwt = ap("demo", "jwt", "{rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]}");
    let alice_only =
        ap("demo", "alice", &format!("{{rules: [{{from: [{{source: {{requestPrincipals: [\"{alice}\"]}}}}]}}]}}"));
    let get_api = ap("demo", "get-api", "{rules: [{to: [{operation: {methods: [GET, HEAD], paths: [\"/api/*\"]}}]}]}");
    let deny_admin =
        ap("demo", "no-admin", "{action: DENY, rules: [{to: [{operation: {paths: [/admin, \"/admin/*\"]}}]}]}");
    let deny_delete = ap("demo", "no-delete", "{action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}");
    let hosts = ap(
        "demo",
        "hosts",
        "{rules: [{to: [{operation: {hosts: [\"hello.demo.svc.cluster.local\", \"*.example.com\"], notHosts: [bad.example.com]}}]}]}",
    );
    let claims = ap(
        "demo",
        "claims",
        "{rules: [{when: [{key: \"request.auth.claims[groups]\", values: [dev]}, {key: \"request.auth.claims[org][team]\", notValues: [red]}]}]}",
    );
    let header = ap("demo", "header", "{rules: [{when: [{key: \"request.headers[x-user]\", values: [\"admin-*\"]}]}]}");
    let tcp_keys = ap(
        "demo",
        "tcp-keys",
        "{rules: [{when: [{key: source.namespace, values: [demo]}, {key: destination.port, values: [\"9095\"]}, {key: source.ip, values: [10.244.0.0/16]}]}]}",
    );
    let audit = ap("demo", "audit", "{action: AUDIT, rules: [{to: [{operation: {paths: [\"/api/*\"]}}]}]}");
    let dev = serde_json::json!({"groups": ["dev", "ops"], "org": {"team": "blue"}});
    let red = serde_json::json!({"groups": "dev", "org": {"team": "red"}});
    // (policies, request (None: a TCP connection), peer principal, port, allowed)
    type Case<'a> = (Vec<&'a str>, Option<Req>, Option<&'a str>, u16, bool);
    #[rustfmt::skip]
    let cases: Vec<Case<'_>> = vec![
        (vec![&requires_jwt], Some(get("/")), test, 9095, false),
        (vec![&requires_jwt], Some(get("/").jwt(alice, dev.clone())), test, 9095, true),
        (vec![&alice_only], Some(get("/").jwt("https://issuer.example/bob", dev.clone())), None, 9095, false),
        (vec![&alice_only], Some(get("/").jwt(alice, dev.clone())), None, 9095, true),
        (vec![&get_api], Some(get("/api/x")), None, 9095, true),
        (vec![&get_api], Some(get("/api/x").method("HEAD")), None, 9095, true),
        (vec![&get_api], Some(get("/api/x").method("POST")), None, 9095, false),
        (vec![&get_api], Some(get("/apix")), None, 9095, false),
        (vec![&deny_admin], Some(get("/admin")), None, 9095, false),
        (vec![&deny_admin], Some(get("/admin/users")), None, 9095, false),
        (vec![&deny_admin], Some(get("/administrator")), None, 9095, true),
        (vec![&deny_delete, &get_api], Some(get("/api/x").method("DELETE")), None, 9095, false),
        (vec![&hosts], Some(get("/")), None, 9095, true),
        (vec![&hosts], Some(get("/").host("HELLO.demo.svc.cluster.local")), None, 9095, true),
        (vec![&hosts], Some(get("/").host("api.example.com:8443")), None, 9095, true),
        (vec![&hosts], Some(get("/").host("bad.example.com")), None, 9095, false),
        (vec![&hosts], Some(get("/").host("other.svc")), None, 9095, false),
        (vec![&claims], Some(get("/").jwt(alice, dev.clone())), None, 9095, true),
        (vec![&claims], Some(get("/").jwt(alice, red.clone())), None, 9095, false),
        (vec![&claims], Some(get("/")), None, 9095, false),
        (vec![&header], Some(get("/").header("x-user", "admin-1")), None, 9095, true),
        (vec![&header], Some(get("/").header("x-user", "guest")), None, 9095, false),
        (vec![&header], Some(get("/")), None, 9095, false),
        (vec![&tcp_keys], Some(get("/")), test, 9095, true),
        (vec![&tcp_keys], None, test, 9095, true),
        (vec![&tcp_keys], None, test, 80, false),
        // Istio on a connection that is not HTTP: an ALLOW rule with HTTP
        // fields grants nothing; a DENY rule's HTTP fields are ignored.
        (vec![&get_api], None, test, 9095, false),
        (vec![&requires_jwt], None, test, 9095, false),
        (vec![&deny_delete], None, test, 9095, false),
        (vec![&deny_admin], None, test, 9095, false),
        (vec![&claims], None, test, 9095, false),
        // AUDIT decides nothing.
        (vec![&audit], Some(get("/api/x")), None, 9095, true),
        (vec![&audit], None, None, 9095, true),
    ];
    for (i, (policies, req, principal, port, allowed)) in cases.into_iter().enumerate() {
        let s = with(&policies.concat());
        let got = decide(&s, req.as_ref(), principal, port);
        assert_eq!(got.verdict == Verdict::Allow, allowed, "case {i}: {policies:?} → {got:?}");
    }
    let s = with(&audit);
    assert_eq!(decide(&s, Some(&get("/api/x")), None, 9095).audit.as_deref(), Some("demo/audit"));
    assert_eq!(decide(&s, Some(&get("/other")), None, 9095).audit, None);
}

#[test]
fn workloads_with_request_policies_are_parsed_at_their_destination() {
    let ra = "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: demo}\nspec: {selector: {matchLabels: {app: hello}}, jwtRules: [{issuer: x, jwks: '{\"keys\": [{\"kty\": \"OKP\", \"crv\": \"Ed25519\", \"x\": \"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo\"}]}'}]}\n";
    let l4 = ap("demo", "l4", "{rules: [{from: [{source: {namespaces: [demo]}}]}]}");
    let l7 = ap("demo", "l7", "{rules: [{to: [{operation: {methods: [GET]}}]}]}");
    let mesh_l7 = ap("istio-system", "l7", "{action: DENY, rules: [{to: [{operation: {paths: [/x]}}]}]}");
    let cases: &[(&str, &str, bool)] = &[
        ("", "hello", false),
        (&l4, "hello", false),
        (&l7, "hello", true),
        (&mesh_l7, "db", true),
        (ra, "hello", true),
        (ra, "db", false),
    ];
    for (policies, name, want) in cases {
        let s = with(policies);
        assert_eq!(needs_request(&s, pod(&s, name).into()), *want, "{policies} {name}");
    }
}

#[test]
fn custom_policies_name_their_authorizer_and_refuse_what_is_not_http() {
    let mesh = "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\n\
                data:\n  mesh: |\n    extensionProviders: [{name: opa, envoyExtAuthzGrpc: {service: opa.x.svc.cluster.local, port: 9191}}]\n";
    let policy = ap(
        "demo",
        "ext",
        "{action: CUSTOM, provider: {name: opa}, rules: [{to: [{operation: {paths: [\"/api/*\"]}}]}]}",
    );
    let s = with(&format!("{mesh}{policy}"));
    let hello = pod(&s, "hello");
    assert!(needs_request(&s, hello.into()));
    let asked = |r: Option<&Req>| {
        let request = r.map(|r| Request {
            method: r.method,
            path: r.path,
            host: r.host,
            headers: &r.headers,
            auth: None,
            remote_ip: Ipv4Addr::new(172, 18, 0, 1),
        });
        let peer = Peer { principal: None, ip: Ipv4Addr::new(10, 244, 1, 2) };
        let a = Attributes { peer, port: 9095, request };
        custom(&s, hello.into(), &a).first().and_then(|p| p.provider.as_ref()).map(|p| p.name.clone())
    };
    assert_eq!(asked(Some(&get("/api/x"))).as_deref(), Some("opa"));
    assert_eq!(asked(Some(&get("/public"))), None);
    // A connection that is not HTTP cannot be asked about: refused.
    assert!(matches!(decide(&s, None, None, 9095).verdict, Verdict::Deny(_)));
    assert_eq!(decide(&s, Some(&get("/api/x")), None, 9095).verdict, Verdict::Allow);
}

mod attached;
