//! Tenant isolation for requests at a workload's destination, tested as
//! attacks (root, the two-node mesh): the filter order, external
//! authorizers, paths, upgrades, hosts, VirtualServices and open tunnels.
//! Each test first makes the attack a hostile client or tenant would, then
//! the positive control; each got through before its fix (docs/limits.md,
//! "Adversarial"). Gateways, credentials and lookups: `tenancy.rs`.
#![expect(clippy::unwrap_used, reason = "tests")]

use mesh_tests::require_root;

/// Policy judged before the request is final: helloworld's JWT rule copies
/// the token's `sub` into `x-user`, and its ALLOW needs `x-user: admin`. A
/// client with its own token (sub alice) that also sends `x-user: admin` is
/// refused; the real admin's token is allowed; the app sees the claim, never
/// what a client wrote under that name.
#[test]
fn policy_sees_the_request_the_app_will_see() {
    use mesh_tests::{
        jwt::{Signer, jwks, now},
        mesh::{API_VIP, Mesh},
    };
    if !require_root("policy_sees_the_request_the_app_will_see") {
        return;
    }
    let m = Mesh::start("", &[]);
    let signer = Signer::rsa("k1");
    let issuer = "https://issuer.example";
    let policy = format!(
        "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: hello, namespace: demo}}\n\
         spec:\n  selector: {{matchLabels: {{app: helloworld}}}}\n  jwtRules:\n\
         \x20 - {{issuer: \"{issuer}\", jwks: '{}', outputClaimToHeaders: [{{header: x-user, claim: sub}}]}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: hello, namespace: demo}}\n\
         spec:\n  selector: {{matchLabels: {{app: helloworld}}}}\n\
         \x20 rules: [{{when: [{{key: \"request.headers[x-user]\", values: [admin]}}]}}]\n",
        jwks(&[&signer])
    );
    m.set_config_of(&[1], &policy);
    let token = |sub: &str| signer.sign(&serde_json::json!({"iss": issuer, "sub": sub, "exp": now() + 600}));
    let resolve = format!("api.demo.svc.cluster.local:80:{API_VIP}");
    let call = |headers: &[String]| {
        let mut args = vec!["--resolve", &resolve];
        for h in headers {
            args.extend(["-H", h.as_str()]);
        }
        args.push("http://api.demo.svc.cluster.local/headers");
        mesh_tests::clients::curl(|a| m.pod("test").cmd(a), &args)
    };
    let bearer = |sub: &str| format!("Authorization: Bearer {}", token(sub));
    // Positive control: the admin's own token.
    let admin = call(&[bearer("admin")]);
    assert_eq!(admin.code, 200, "the admin was refused: {}", admin.body);
    assert!(admin.body.to_ascii_lowercase().contains("x-user: admin"), "{}", admin.body);
    // The attacks: another user's token with a forged header; no token at all.
    let forged = call(&[bearer("alice"), "x-user: admin".into()]);
    assert_eq!(forged.code, 403, "a forged x-user passed the policy: {}", forged.body);
    assert_eq!(call(&["x-user: admin".into()]).code, 403, "x-user without a token passed");
}

/// CUSTOM checks through the mesh: helloworld (node-2) asks an authorizer
/// in namespace `other` (the `sleep` pod, node-1) under STRICT mTLS, with
/// `failOpen: true`. The check must travel in mTLS as helloworld and be
/// answered: a request the authorizer denies is denied (a plaintext check
/// was refused by STRICT, and `failOpen` let every request through). And
/// when the mesh refuses the check (the authorizer's policy), that is a
/// denial, not an outage `failOpen` would excuse.
#[test]
fn custom_checks_travel_through_the_mesh() {
    use mesh_tests::mesh::{API_VIP, Mesh};
    if !require_root("custom_checks_travel_through_the_mesh") {
        return;
    }
    let m = Mesh::start("", &[]);
    mesh_tests::ext_authz::http(m.pod("sleep"), 8000);
    mesh_tests::ext_authz::grpc(m.pod("sleep"), 9000);
    let config = |provider: &str, extra: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: ext-authz, namespace: other}}\n\
             spec: {{clusterIP: 10.96.0.31, selector: {{app: sleep}}, ports: [{{name: http, port: 8000, targetPort: 8000}}, {{name: grpc, port: 9000, targetPort: 9000}}]}}\n\
             ---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: strict, namespace: other}}\n\
             spec: {{mtls: {{mode: STRICT}}}}\n\
             ---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n\
             \x20   extensionProviders:\n\
             \x20   - name: http\n      envoyExtAuthzHttp:\n        service: ext-authz.other.svc.cluster.local\n        port: 8000\n\
             \x20       failOpen: true\n        includeRequestHeadersInCheck: [x-ext-authz]\n\
             \x20   - name: grpc\n      envoyExtAuthzGrpc: {{service: ext-authz.other.svc.cluster.local, port: 9000, failOpen: true}}\n\
             ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ext, namespace: demo}}\n\
             spec: {{selector: {{matchLabels: {{app: helloworld}}}}, action: CUSTOM, provider: {{name: {provider}}},\n\
             \x20 rules: [{{to: [{{operation: {{paths: [/headers]}}}}]}}]}}\n{extra}"
        )
    };
    let ask = |allow: bool| {
        let url = format!("http://{API_VIP}/headers");
        let mut args = vec![url];
        if allow {
            args.extend(["-H".to_owned(), "x-ext-authz: allow".to_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        mesh_tests::clients::curl(|a| m.pod("test").cmd(a), &args)
    };
    for provider in ["http", "grpc"] {
        m.set_config_of(&[0, 1], &config(provider, ""));
        // Positive control: the authorizer allows.
        let allowed = ask(true);
        assert_eq!(allowed.code, 200, "{provider}: allowed request: {}", allowed.body);
        // The attack: a request the authorizer denies.
        let denied = ask(false);
        assert_ne!(denied.code, 200, "{provider}: a denied request got through: {}", denied.body);
        assert!(denied.body.contains("denied by the"), "{provider}: not the authorizer's answer: {}", denied.body);
    }
    // The authorizer's namespace refuses helloworld's calls: denied, even
    // for a request the authorizer would allow, even with failOpen.
    let refuse = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-hello, namespace: other}\n\
                  spec: {action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/helloworld]}}]}]}\n";
    m.set_config_of(&[0, 1], &config("http", refuse));
    let refused = ask(true);
    assert_eq!(refused.code, 403, "a check the mesh refused counted as an outage: {}", refused.body);
}

/// Paths as Envoy canonicalises them (Istio's default `BASE`): a backslash
/// is a slash, so `/public\..\admin` is `/admin` to the DENY that guards it
/// (it used to reach `/admin` past the DENY), and `%00` is refused.
#[test]
fn backslashes_are_slashes_and_nul_is_refused() {
    use mesh_tests::mesh::{API_VIP, Mesh};
    if !require_root("backslashes_are_slashes_and_nul_is_refused") {
        return;
    }
    let m = Mesh::start("", &[]);
    let deny = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: demo}\n\
                spec: {selector: {matchLabels: {app: helloworld}}, action: DENY, rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]}\n";
    m.set_config_of(&[1], deny);
    let get = |path: &str| {
        let url = format!("http://{API_VIP}{path}");
        mesh_tests::clients::curl(|a| m.pod("test").cmd(a), &["--path-as-is", &url])
    };
    // Positive control.
    assert_eq!(get("/public/x").code, 200);
    assert_eq!(get("/admin").code, 403);
    let bypass = get("/public\\..\\admin");
    assert_eq!(bypass.code, 403, "a backslashed path got past the DENY: {}", bypass.body);
    assert_eq!(get("/admin%00.png").code, 400);
}

/// Only WebSocket upgrades are forwarded (Istio's `upgrade_configs`): an
/// `Upgrade` to anything else is refused before it reaches a pod, and `h2c`
/// is dropped and the request served as it came.
#[test]
fn only_websocket_upgrades_are_forwarded() {
    use mesh_tests::mesh::{API_VIP, Mesh};
    if !require_root("only_websocket_upgrades_are_forwarded") {
        return;
    }
    let m = Mesh::start("", &[]);
    let url = format!("http://{API_VIP}/headers");
    let get = |args: &[&str]| {
        let mut all = args.to_vec();
        all.push(&url);
        mesh_tests::clients::curl(|a| m.pod("test").cmd(a), &all)
    };
    // Positive control, and h2c (curl asks for it over http:// with --http2).
    assert_eq!(get(&[]).code, 200);
    let h2c = get(&["--http2"]);
    assert_eq!(h2c.code, 200, "{}", h2c.body);
    assert!(!h2c.body.to_ascii_lowercase().contains("upgrade: h2c"), "h2c reached the pod: {}", h2c.body);
    // The attack: another protocol through the mesh's HTTP proxy.
    let other = get(&["-H", "Connection: Upgrade", "-H", "Upgrade: tunnel/1"]);
    assert_eq!(other.code, 403, "an upgrade to tunnel/1 was forwarded: {}", other.body);
}

/// One host per request: a request whose target names one host and whose
/// `Host` header another is refused (400) before routing or policy reads
/// either; the same target with a matching header is served.
#[test]
fn host_and_authority_must_agree() {
    use mesh_tests::mesh::{API_VIP, Mesh};
    if !require_root("host_and_authority_must_agree") {
        return;
    }
    let m = Mesh::start("", &[]);
    let url = format!("http://{API_VIP}/headers");
    let get = |host: &str| {
        let target = "http://api.demo.svc.cluster.local/headers";
        let args = ["--request-target", target, "-H", host, url.as_str()];
        mesh_tests::clients::curl(|a| m.pod("test").cmd(a), &args)
    };
    let same = get("Host: api.demo.svc.cluster.local");
    assert_eq!(same.code, 200, "{}", same.body);
    let other = get("Host: admin.demo.svc.cluster.local");
    assert_eq!(other.code, 400, "a Host that contradicts the target was served: {}", other.body);
}

/// Borrowed hosts by VirtualService: namespace `other` writes a rule for
/// demo's Service helloworld (older, first by namespace) that answers 418.
/// It applies to `other`'s own clients only; demo's clients keep demo's
/// Service as it is.
#[test]
fn a_tenants_virtual_service_applies_to_its_own_clients_only() {
    use mesh_tests::mesh::{Mesh, VIP};
    if !require_root("a_tenants_virtual_service_applies_to_its_own_clients_only") {
        return;
    }
    let m = Mesh::start("", &[]);
    let hijack = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n\
                  metadata: {name: hijack, namespace: other, creationTimestamp: \"2020-01-01T00:00:00Z\"}\n\
                  spec: {hosts: [helloworld.demo.svc.cluster.local], http: [{fault: {abort: {httpStatus: 418, percentage: {value: 100}}},\n\
                  \x20 route: [{destination: {host: helloworld.demo.svc.cluster.local, port: {number: 9095}}}]}]}\n";
    m.set_config_of(&[0, 1], hijack);
    let get = |pod: &str| {
        let url = format!("http://{VIP}:9095/");
        mesh_tests::clients::curl(|a| m.pod(pod).cmd(a), &[url.as_str()]).code
    };
    assert_eq!(get("test"), 200, "another namespace's VirtualService changed demo's traffic");
    assert_eq!(get("sleep"), 418, "the tenant's own clients follow its rule");
}

/// An upgraded tunnel at a destination with request policy is judged again
/// when policy changes: a WebSocket to helloworld (whose ALLOW has a path,
/// so its requests are parsed at its agent) is closed once a DENY names the
/// path it was opened on; a new one is refused.
#[test]
fn an_open_websocket_is_closed_by_a_new_deny() {
    use mesh_tests::mesh::{Mesh, WS_VIP, runtime};
    use std::sync::mpsc;
    if !require_root("an_open_websocket_is_closed_by_a_new_deny") {
        return;
    }
    let m = Mesh::start("", &[]);
    let allow = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: paths, namespace: demo}\n\
                 spec: {selector: {matchLabels: {app: helloworld}}, rules: [{to: [{operation: {paths: [\"/*\"]}}]}]}\n";
    let deny = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-echo, namespace: demo}\n\
                spec: {selector: {matchLabels: {app: helloworld}}, action: DENY, rules: [{to: [{operation: {paths: [\"/echo\"]}}]}]}\n";
    m.set_config_of(&[1], allow);
    let (opened_tx, opened) = mpsc::channel::<Result<(), String>>();
    let (go, go_rx) = mpsc::channel::<()>();
    let client = mesh_tests::netns::enter_and_spawn(&m.pod("test").netns, move || {
        runtime().block_on(async move {
            use futures_util::{SinkExt as _, StreamExt as _};
            use tokio_tungstenite::tungstenite::Message;
            let connect = tokio_tungstenite::connect_async(format!("ws://{WS_VIP}/echo"));
            let mut ws = match connect.await {
                Ok((ws, _)) => ws,
                Err(e) => {
                    let _ = opened_tx.send(Err(e.to_string()));
                    return Err("no tunnel".to_owned());
                }
            };
            let first = async {
                ws.send(Message::text("one")).await.map_err(|e| e.to_string())?;
                ws.next().await.ok_or("closed")?.map_err(|e| e.to_string())?;
                Ok::<_, String>(())
            };
            let _ = opened_tx.send(first.await);
            let _ = tokio::task::spawn_blocking(move || go_rx.recv()).await;
            // After the DENY: the tunnel is gone.
            let again = async {
                ws.send(Message::text("two")).await.map_err(|e| e.to_string())?;
                match tokio::time::timeout(std::time::Duration::from_secs(3), ws.next()).await {
                    Ok(Some(Ok(m))) if m.is_text() => Ok(m.into_text().map_err(|e| e.to_string())?.to_string()),
                    other => Err(format!("{other:?}")),
                }
            };
            again.await
        })
    });
    assert_eq!(opened.recv().unwrap(), Ok(()), "the WebSocket did not open under the ALLOW");
    m.set_config_of(&[1], &format!("{allow}{deny}"));
    let closed = [("reason", "denied_after_policy_change")];
    m.agents[1].wait_metrics(5, "the tunnel closed by the new policy", |t| {
        mesh_tests::agent::metric(t, "mesh_tcp_connection_failures_total", &closed) >= 1.0
    });
    go.send(()).unwrap();
    let after = client.join().unwrap();
    assert!(after.is_err(), "the WebSocket still carried messages after the DENY: {after:?}");
    // A new one is refused.
    let fresh = m.pod("test").run(|| mesh_tests::clients::websocket_echo(format!("ws://{WS_VIP}/echo"), "three"));
    assert!(fresh.is_err(), "a new WebSocket was opened after the DENY: {fresh:?}");
}
