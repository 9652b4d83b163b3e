//! End-user authentication (RequestAuthentication, JWT) and request-level
//! AuthorizationPolicy, enforced by the destination's agent (root): real
//! tokens signed by the test, curl through eBPF capture, two nodes.
#![expect(clippy::unwrap_used, reason = "tests")]

use mesh_tests::{
    agent::metric,
    clients::{Curled, curl},
    jwt::{Signer, jwks, now, unsigned, with_signature_of},
    mesh::*,
    require_root,
};
use serde_json::json;

const ISSUER_A: &str = "https://a.example";
const ISSUER_B: &str = "https://b.example";

/// helloworld (node-2) and the ver pods (node-1 and node-2) accept tokens
/// of issuer A (RSA, `Authorization: Bearer`) and B (EC, `?token=` or the
/// `session` cookie); requests need a token except `/public*`, GETs only,
/// and never from a member of the `banned` group.
fn policies(a: &Signer, b: &Signer) -> String {
    let (ka, kb) = (jwks(&[a]), jwks(&[b]));
    let mut out = String::new();
    for app in ["helloworld", "ver"] {
        out += &format!(
            "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: {app}, namespace: demo}}\n\
             spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  jwtRules:\n\
             \x20 - {{issuer: \"{ISSUER_A}\", audiences: [hello], jwks: '{ka}', outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]}}\n\
             \x20 - {{issuer: \"{ISSUER_B}\", jwks: '{kb}', fromParams: [token], fromCookies: [session]}}\n\
             ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {app}, namespace: demo}}\n\
             spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  rules:\n\
             \x20 - to: [{{operation: {{paths: [\"/public*\"]}}}}]\n\
             \x20 - from: [{{source: {{requestPrincipals: [\"{ISSUER_A}/*\", \"{ISSUER_B}/*\"]}}}}]\n\
             \x20   to: [{{operation: {{methods: [GET], hosts: [\"api.demo.svc.cluster.local\", \"10.*\"]}}}}]\n\
             ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {app}-banned, namespace: demo}}\n\
             spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  action: DENY\n\
             \x20 rules: [{{when: [{{key: \"request.auth.claims[groups]\", values: [banned]}}]}}]\n"
        );
    }
    out
}

fn claims(iss: &str) -> serde_json::Value {
    json!({"iss": iss, "sub": "alice", "aud": "hello", "exp": now() + 600, "groups": ["dev"]})
}

fn call(m: &Mesh, pod: &str, args: &[&str]) -> Curled {
    curl(|a| m.pod(pod).cmd(a), args)
}

#[test]
fn jwt_and_request_policy_are_enforced_by_the_destinations_agent() {
    if !require_root("jwt_and_request_policy_are_enforced_by_the_destinations_agent") {
        return;
    }
    let m = Mesh::start("", &[]);
    let (a, b) = (Signer::rsa("a1"), Signer::ec("b1"));
    // Only node-2's agent, the destination's, is told: node-1's is not.
    m.set_config_of(&[1], &policies(&a, &b));
    let api = "http://api.demo.svc.cluster.local/headers";
    let resolve = format!("api.demo.svc.cluster.local:80:{API_VIP}");
    let valid = a.sign(&claims(ISSUER_A));
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    let expired = a.sign(&json!({"iss": ISSUER_A, "sub": "alice", "aud": "hello", "exp": now() - 3600}));
    let wrong_aud = a.sign(&json!({"iss": ISSUER_A, "sub": "alice", "aud": "other", "exp": now() + 600}));
    let unknown_iss = a.sign(&claims("https://evil.example"));
    let forged = with_signature_of(&valid, &Signer::rsa("a1").sign(&claims(ISSUER_A)));
    let unknown_kid = Signer::rsa("a2").sign(&claims(ISSUER_A));
    let banned =
        a.sign(&json!({"iss": ISSUER_A, "sub": "mallory", "aud": "hello", "exp": now() + 600, "groups": ["banned"]}));
    let ec = b.sign(&claims(ISSUER_B));
    let by_param = format!("http://api.demo.svc.cluster.local/headers?token={ec}");
    let cookie = format!("session={ec}");
    // (what, curl arguments, status)
    let cases: Vec<(&str, Vec<String>, u16)> = vec![
        ("no token", vec![api.into()], 403),
        ("no token, public path", vec!["http://api.demo.svc.cluster.local/public".into()], 200),
        ("RSA token in the header", vec!["-H".into(), bearer(&valid), api.into()], 200),
        ("expired", vec!["-H".into(), bearer(&expired), api.into()], 401),
        ("wrong audience", vec!["-H".into(), bearer(&wrong_aud), api.into()], 401),
        ("unknown issuer", vec!["-H".into(), bearer(&unknown_iss), api.into()], 401),
        ("bad signature", vec!["-H".into(), bearer(&forged), api.into()], 401),
        ("alg none", vec!["-H".into(), bearer(&unsigned(&claims(ISSUER_A))), api.into()], 401),
        ("unknown kid", vec!["-H".into(), bearer(&unknown_kid), api.into()], 401),
        ("EC token in a query parameter", vec![by_param.clone()], 200),
        ("EC token in a cookie", vec!["--cookie".into(), cookie.clone(), api.into()], 200),
        ("EC token in the header: issuer B is not read there", vec!["-H".into(), bearer(&ec), api.into()], 401),
        ("POST: GET only", vec!["-X".into(), "POST".into(), "-H".into(), bearer(&valid), api.into()], 403),
        ("another host", vec!["-H".into(), "Host: other.example".into(), "-H".into(), bearer(&valid), api.into()], 403),
        ("DENY by claim", vec!["-H".into(), bearer(&banned), api.into()], 403),
        // Normalised before matching: `/public/../headers` is `/headers`.
        (
            "dot segments",
            vec!["--path-as-is".into(), "http://api.demo.svc.cluster.local/public/../headers".into()],
            403,
        ),
    ];
    for (what, args, want) in &cases {
        let mut v: Vec<&str> = vec!["--resolve", &resolve];
        v.extend(args.iter().map(String::as_str));
        let got = call(&m, "test", &v);
        assert_eq!(got.code, *want, "{what}: {} {}", got.body, got.stderr);
        if got.code == 401 {
            assert!(got.body.starts_with("Jw") || got.body.starts_with("Audiences"), "{what}: {}", got.body);
        }
        if got.code == 403 {
            assert_eq!(got.body.trim(), "RBAC: access denied", "{what}");
        }
    }
    // A WebSocket upgrade goes through the destination's parsing to the pod
    // (the public path needs no token); elsewhere it is refused like any request.
    let ws = |path: &str| {
        let url = format!("ws://{WS_VIP}{path}");
        m.pod("test").run(move || mesh_tests::clients::websocket_echo(url, "over the destination stage"))
    };
    assert_eq!(ws("/public/ws").as_deref(), Ok("over the destination stage"));
    assert!(ws("/ws").is_err_and(|e| e.contains("403")), "a WebSocket without a token was let through");
    // A gRPC client without a token: PERMISSION_DENIED (7), as Envoy answers gRPC.
    let grpc = m.pod("test").run(|| mesh_tests::clients::grpc_unary(format!("http://{GRPC_VIP}:80"), "hi"));
    assert!(grpc.as_ref().is_err_and(|e| e.starts_with("PermissionDenied")), "{grpc:?}");
    // The token is not forwarded; its subject is, as the rule asks.
    let got = call(&m, "test", &["--resolve", &resolve, "-H", &bearer(&valid), api]);
    assert!(got.body.contains("x-jwt-sub: alice") && !got.body.contains("authorization"), "{}", got.body);

    // Plaintext from outside the mesh (PERMISSIVE) meets the same checks.
    let hello_api = format!("http://{HELLO_IP}:8080/headers");
    assert_eq!(curl(|a| m.c.net_cmd(a), &[&hello_api]).code, 403);
    assert_eq!(curl(|a| m.c.net_cmd(a), &["-H", &bearer(&valid), &hello_api]).code, 200);
    // Same node: test calls ver-v2 on node-1, whose agent has no policy now...
    let v2 = format!("http://{VER_V2_IP}:8080/headers");
    assert_eq!(call(&m, "test", &[&v2]).code, 200);
    // ...and once it has, it is the destination's agent and enforces it.
    m.set_config_of(&[0], &policies(&a, &b));
    assert_eq!(call(&m, "test", &[&v2]).code, 403);
    assert_eq!(call(&m, "test", &["-H", &bearer(&valid), &v2]).code, 200);
    assert_eq!(call(&m, "test", &["-H", &bearer(&expired), &v2]).code, 401);

    // Request metrics as Istio's sidecars report them, at the destination.
    let text = m.agents[1].metrics();
    for code in ["200", "401", "403"] {
        let labels = [("reporter", "destination"), ("response_code", code), ("destination_workload", "helloworld")];
        assert!(metric(&text, "istio_requests_total", &labels) >= 1.0, "{code}:\n{text}");
    }
    let labels = [("reporter", "destination"), ("source_principal", TEST_ID), ("response_code", "200")];
    assert!(metric(&text, "istio_requests_total", &labels) >= 1.0, "{text}");

    // Keys rotate with the configuration: a new key is accepted, the old one no longer.
    let a2 = Signer::rsa("a2");
    m.set_config_of(&[1], &policies(&a2, &b));
    assert_eq!(call(&m, "test", &["--resolve", &resolve, "-H", &bearer(&unknown_kid), api]).code, 401);
    let rotated = a2.sign(&claims(ISSUER_A));
    assert_eq!(call(&m, "test", &["--resolve", &resolve, "-H", &bearer(&rotated), api]).code, 200);
    assert_eq!(call(&m, "test", &["--resolve", &resolve, "-H", &bearer(&valid), api]).code, 401);
}

/// helloworld's keys from a `jwksUri`: an HTTPS server outside the cluster
/// (openssl s_server serving a file), trusted through `--jwks-ca`.
fn remote_keys(uri: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: hello, namespace: demo}}\n\
         spec: {{selector: {{matchLabels: {{app: helloworld}}}}, jwtRules: [{{issuer: \"{ISSUER_A}\", jwksUri: \"{uri}\"}}]}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: hello, namespace: demo}}\n\
         spec: {{selector: {{matchLabels: {{app: helloworld}}}}, rules: [{{from: [{{source: {{requestPrincipals: [\"*\"]}}}}]}}]}}\n"
    )
}

#[test]
fn keys_from_a_jwks_uri_are_fetched_refetched_for_a_new_key_and_kept_when_the_issuer_is_down() {
    if !require_root("keys_from_a_jwks_uri_are_fetched_refetched_for_a_new_key_and_kept_when_the_issuer_is_down") {
        return;
    }
    let certs = mesh_tests::certs::Certs::new(&format!("jwks-{}", std::process::id()));
    let (crt, key) = certs.server("jwks", "172.18.0.1");
    let (a, b) = (Signer::rsa("a1"), Signer::ec("b1"));
    let keys_file = certs.dir.join("keys.json");
    std::fs::write(&keys_file, jwks(&[&a])).unwrap();
    let ca = certs.ca();
    let m = Mesh::start("", &["--jwks-ca", ca.to_str().unwrap(), "--jwks-refetch-interval", "1s"]);
    let serve = format!(
        "cd {} && exec openssl s_server -quiet -WWW -accept 172.18.0.1:8443 -cert {} -key {}",
        certs.dir.display(),
        crt.display(),
        key.display()
    );
    let issuer = mesh_tests::netns::Background::spawn_in(&m.c.net_ns, &["sh", "-c", &serve]).unwrap();
    m.set_config_of(&[1], &remote_keys("https://172.18.0.1:8443/keys.json"));
    let api = format!("http://{API_VIP}/headers");
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    let status = |t: &str| call(&m, "test", &["-H", &bearer(t), &api]).code;
    let (ta, tb) = (a.sign(&claims(ISSUER_A)), b.sign(&claims(ISSUER_A)));
    // The first request waits for the keys (the server may still be starting: poll).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while status(&ta) != 200 {
        assert!(std::time::Instant::now() < deadline, "the key set was never fetched");
    }
    assert_eq!(call(&m, "test", &[&api]).code, 403, "no token: not a request principal");
    assert_eq!(status(&tb), 401, "b1 is not in the set yet");
    // The issuer rotates to b1: a token naming it makes the agent fetch again.
    std::fs::write(&keys_file, jwks(&[&b])).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while status(&tb) != 200 {
        assert!(std::time::Instant::now() < deadline, "the rotated key set was never fetched");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while status(&ta) != 401 {
        assert!(std::time::Instant::now() < deadline, "a key removed from the set is still accepted");
    }
    // The issuer goes away: the last good set stays.
    drop(issuer);
    let unknown = Signer::rsa("c1").sign(&claims(ISSUER_A));
    assert_eq!(status(&unknown), 401);
    assert_eq!(status(&tb), 200);
}

/// The authorizers' Service (the `outsider` pod, outside the mesh), the mesh
/// config's providers, and a CUSTOM policy on helloworld's `/headers` naming
/// `provider`.
fn custom(provider: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: ext-authz, namespace: plain}}\n\
         spec: {{clusterIP: 10.96.0.30, selector: {{app: outsider}}, ports: [{{name: http, port: 8000, targetPort: 8000}},\n\
         \x20 {{name: grpc, port: 9000, targetPort: 9000}}, {{name: http-down, port: 8001, targetPort: 8001}}]}}\n\
         ---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n\
         \x20   extensionProviders:\n\
         \x20   - name: http\n      envoyExtAuthzHttp:\n        service: ext-authz.plain.svc.cluster.local\n        port: 8000\n\
         \x20       pathPrefix: /check\n        includeRequestHeadersInCheck: [x-ext-authz]\n\
         \x20       headersToUpstreamOnAllow: [x-ext-authz-check-result]\n\
         \x20       headersToDownstreamOnDeny: [x-ext-authz-check-result]\n\
         \x20   - name: grpc\n      envoyExtAuthzGrpc: {{service: ext-authz.plain.svc.cluster.local, port: 9000, timeout: 2s}}\n\
         \x20   - name: down-open\n      envoyExtAuthzHttp: {{service: ext-authz.plain.svc.cluster.local, port: 8001, failOpen: true}}\n\
         \x20   - name: down-closed\n      envoyExtAuthzGrpc: {{service: ext-authz.plain.svc.cluster.local, port: 8001, statusOnError: \"503\"}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ext, namespace: demo}}\n\
         spec: {{selector: {{matchLabels: {{app: helloworld}}}}, action: CUSTOM, provider: {{name: {provider}}},\n\
         \x20 rules: [{{to: [{{operation: {{paths: [/headers]}}}}]}}]}}\n"
    )
}

#[test]
fn custom_policies_ask_the_external_authorizer_at_the_destination() {
    if !require_root("custom_policies_ask_the_external_authorizer_at_the_destination") {
        return;
    }
    let m = Mesh::start("", &[]);
    mesh_tests::ext_authz::http(m.pod("outsider"), 8000);
    mesh_tests::ext_authz::grpc(m.pod("outsider"), 9000);
    let ask = |path: &str, allow: bool| {
        let url = format!("http://{API_VIP}{path}");
        let mut args = vec!["-i".to_owned(), url];
        if allow {
            args.extend(["-H".to_owned(), "x-ext-authz: allow".to_owned()]);
        }
        call(&m, "test", &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // (provider, path, allowed by the authorizer, status, what the client sees)
    let cases = [
        ("http", "/headers", true, 200, "x-ext-authz-check-result: allowed"),
        ("http", "/headers", false, 403, "denied by the HTTP authorizer (/check/headers)"),
        ("grpc", "/headers", true, 200, "x-ext-authz-check-result: allowed"),
        (
            "grpc",
            "/headers",
            false,
            451,
            "denied by the gRPC authorizer (/headers from spiffe://cluster.local/ns/demo/sa/test)",
        ),
        // Reached the pod, with nothing from an authorizer.
        ("down-open", "/headers", false, 200, "user-agent: curl"),
        ("down-closed", "/headers", true, 503, ""),
        // A path the policy does not name: no one is asked.
        ("down-closed", "/", false, 200, "hello from helloworld"),
    ];
    for (provider, path, allow, status, seen) in cases {
        // Only the destination's agent is told.
        m.set_config_of(&[1], &custom(provider));
        let got = ask(path, allow);
        assert_eq!(got.code, status, "{provider} {path} allow={allow}: {}", got.body);
        assert!(got.body.contains(seen), "{provider} {path} allow={allow}: {}", got.body);
        if provider == "down-open" {
            assert!(!got.body.contains("x-ext-authz-check-result"), "{}", got.body);
        }
        if status == 403 || status == 451 {
            assert!(got.body.to_ascii_lowercase().contains("x-ext-authz-check-result: denied"), "{}", got.body);
        }
    }
    let text = m.agents[1].metrics();
    for code in ["200", "403", "451", "503"] {
        let labels = [("reporter", "destination"), ("response_code", code)];
        assert!(metric(&text, "istio_requests_total", &labels) >= 1.0, "{code}:\n{text}");
    }
}
