//! PeerAuthentication and AuthorizationPolicy across nodes (root).
#![expect(clippy::unwrap_used, reason = "tests")]

use std::net::SocketAddr;

use mesh_tests::{agent::metric, mesh::*, require_root};

#[test]
fn strict_refuses_and_permissive_admits_plaintext_from_outside_the_mesh() {
    if !require_root("strict_refuses_and_permissive_admits_plaintext_from_outside_the_mesh") {
        return;
    }
    let m = Mesh::start("", &[]);
    let hello = format!("http://{HELLO_IP}:9095/");
    // PERMISSIVE (Istio's default): a client beyond the cluster and an
    // un-meshed pod on the other node get through, and keep their address.
    let (ok, out) = curl_outside(&m.c, &hello);
    assert!(ok && out.contains("client 172.18.1.1"), "{out}");
    let (ok, out) = curl(m.pod("outsider"), &hello);
    assert!(ok && out.contains(&format!("client {OUTSIDER_IP}")), "{out}");
    let plaintext = [("reporter", "destination"), ("connection_security_policy", "none")];
    m.agents[1].wait_metrics(5, "plaintext connections", |t| {
        metric(t, "istio_tcp_connections_closed_total", &plaintext) >= 2.0
    });

    // STRICT for the namespace: plaintext refused, the mesh still works.
    m.set_config(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {name: default, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n",
    );
    let (ok, out) = curl_outside(&m.c, &hello);
    assert!(!ok, "STRICT admitted a client outside the mesh: {out}");
    let (ok, out) = curl(m.pod("outsider"), &hello);
    assert!(!ok, "STRICT admitted an un-meshed pod: {out}");
    let (ok, out) = curl(m.pod("test"), &format!("http://{VIP}:9095/"));
    assert!(ok && out.contains(&format!("client {TEST_IP}")), "{out}");
    assert!(failures(&m.agents[1], "plaintext_refused") >= 2.0);

    // Mesh-wide STRICT from the root namespace, with a port-level exception
    // for the selected workload: plaintext to 9095 only.
    m.set_config(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {name: hello-http, namespace: demo}\n\
         spec: {selector: {matchLabels: {app: helloworld}}, portLevelMtls: {\"9095\": {mode: PERMISSIVE}}}\n",
    );
    let (ok, out) = curl_outside(&m.c, &hello);
    assert!(ok, "port-level PERMISSIVE refused: {out}");
    let refused = mesh_tests::netns::enter_and_spawn(&m.c.net_ns, || {
        mesh_tests::clients::tcp_echo(SocketAddr::from((HELLO_IP, 7000)), b"plain").is_err()
    })
    .join()
    .unwrap();
    assert!(refused, "mesh-wide STRICT admitted plaintext to port 7000");
}

#[test]
fn authorization_policy_allows_and_denies_by_principal_namespace_ip_and_port() {
    if !require_root("authorization_policy_allows_and_denies_by_principal_namespace_ip_and_port") {
        return;
    }
    let m = Mesh::start("", &[]);
    let vip = format!("http://{VIP}:9095/");
    let policy = |spec: &str| {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: hello, namespace: demo}}\nspec: {spec}\n"
        )
    };
    let echo_from = |pod: &str| {
        m.pod(pod).run(|| mesh_tests::clients::tcp_echo(SocketAddr::from(([10, 96, 0, 10], 7000)), b"ping").is_ok())
    };
    // Control: with no policy both clients get through.
    assert!(curl(m.pod("test"), &vip).0);
    assert!(curl(m.pod("sleep"), &vip).0);

    // DENY by namespace, across nodes and on the same node (node-1's agent is
    // then the destination's agent too).
    let deny_other = "{selector: {matchLabels: {app: helloworld}}, action: DENY, \
                      rules: [{from: [{source: {namespaces: [other]}}]}]}";
    let deny_other_to_test = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: test, namespace: demo}\n\
         spec: {selector: {matchLabels: {app: test}}, action: DENY, rules: [{from: [{source: {namespaces: [other]}}]}]}\n";
    m.set_config(&(policy(deny_other) + deny_other_to_test));
    let (ok, out) = curl(m.pod("sleep"), &vip);
    assert!(!ok, "DENY from namespace other let sleep through: {out}");
    assert!(curl(m.pod("test"), &vip).0);
    assert!(failures(&m.agents[1], "denied") >= 1.0);
    let (ok, out) = curl(m.pod("sleep"), &format!("http://{TEST_IP}:9095/"));
    assert!(!ok, "same-node DENY let sleep through: {out}");
    assert!(failures(&m.agents[0], "denied") >= 1.0);
    let (ok, out) = curl(m.pod("outsider"), &format!("http://{TEST_IP}:9095/"));
    assert!(ok && out.contains(&format!("client {OUTSIDER_IP}")), "{out}");

    // ALLOW by principal and port: only test, only 9095; plaintext has no principal.
    m.set_config(&policy(
        "{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/test]}}], \
         to: [{operation: {ports: [\"9095\"]}}]}]}",
    ));
    assert!(curl(m.pod("test"), &vip).0);
    assert!(!echo_from("test"), "ALLOW to port 9095 admitted port 7000");
    assert!(!curl(m.pod("sleep"), &vip).0, "ALLOW for test admitted sleep");
    assert!(!curl_outside(&m.c, &format!("http://{HELLO_IP}:9095/")).0, "ALLOW by principal admitted plaintext");

    // ALLOW by IP block: the client's own address counts (carried across the tunnel).
    m.set_config(&policy("{rules: [{from: [{source: {ipBlocks: [172.18.1.0/24], notIpBlocks: [172.18.1.9]}}]}]}"));
    assert!(curl_outside(&m.c, &format!("http://{HELLO_IP}:9095/")).0);
    assert!(!curl(m.pod("test"), &vip).0, "ipBlocks admitted a pod outside the block");

    // An empty ALLOW policy denies everything.
    m.set_config(&policy("{}"));
    assert!(!curl(m.pod("test"), &vip).0, "an empty ALLOW policy admitted test");
    assert!(!echo_from("sleep"));
    let denied = failures(&m.agents[1], "denied");
    assert!(denied >= 7.0, "denied connections counted: {denied}");
}

#[test]
fn a_policy_attached_to_a_service_judges_its_traffic_and_nothing_else() {
    if !require_root("a_policy_attached_to_a_service_judges_its_traffic_and_nothing_else") {
        return;
    }
    // helloworld's pod (node-2) backs Services helloworld (9095) and api
    // (80 → 8080). An ALLOW attached to `api` admits demo/test alone; a DENY
    // attached to `ver` (pods on both nodes) refuses /admin requests.
    let attached = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: api-test-only, namespace: demo}\n\
        spec: {targetRefs: [{kind: Service, name: api}], action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/test]}}]}]}\n\
        ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ver-no-admin, namespace: demo}\n\
        spec: {targetRef: {kind: Service, name: ver}, action: DENY, rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]}\n";
    let m = Mesh::start(attached, &[]);
    let (test, sleep) = (m.pod("test"), m.pod("sleep"));
    // Positive control: the client the policy names, through the Service.
    let (ok, out) = curl(test, &format!("http://{API_VIP}/api"));
    assert!(ok, "demo/test to api: {out}");
    // The attack: another namespace's client, through the Service, and
    // straight to the pod's port (judged as the Service whose port it is).
    let (ok, out) = curl(sleep, &format!("http://{API_VIP}/api"));
    assert!(!ok, "other/sleep passed the ALLOW attached to api: {out}");
    let (ok, out) = curl(sleep, &format!("http://{HELLO_IP}:8080/api"));
    assert!(!ok, "other/sleep reached api's port by the pod's address: {out}");
    // The same pod by its other Service, and the namespace's other Services:
    // not judged by a policy attached to api.
    let (ok, out) = curl(sleep, &format!("http://{VIP}:9095/"));
    assert!(ok, "other/sleep to helloworld, the same pod by another Service: {out}");
    // Request rules attached to ver: parsed and judged at both of its
    // endpoints' agents (ver-v2 on the client's node, ver-v1 across).
    for _ in 0..4 {
        let (ok, out) = curl(test, &format!("http://{VER_VIP}/hello"));
        assert!(ok, "ver, an allowed path: {out}");
        let (ok, out) = curl(test, &format!("http://{VER_VIP}/admin/users"));
        assert!(!ok && out.contains("403"), "ver, a path the attached DENY names: {out}");
    }
    assert!(failures(&m.agents[1], "denied") >= 2.0, "the api refusals are counted at the destination");
}

#[test]
fn a_policy_attached_by_target_refs_closes_its_target_not_its_namespace() {
    if !require_root("a_policy_attached_by_target_refs_closes_its_target_not_its_namespace") {
        return;
    }
    // Attached to Service `ver`, and rejected (a condition key Istio does
    // not have): traffic to ver is closed; helloworld, in the same
    // namespace, keeps serving — a migrating ambient user's namespace is not
    // blacked out.
    let attached = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ver-only, namespace: demo}\n\
        spec: {targetRefs: [{kind: Service, name: ver}], action: ALLOW, rules: [{when: [{key: request.colour, values: [blue]}]}]}\n";
    let m = Mesh::start(attached, &[]);
    let test = m.pod("test");
    let (ok, out) = curl(test, &format!("http://{VIP}:9095/"));
    assert!(ok, "helloworld, same namespace, not targeted: {out}");
    let (ok, out) = curl(test, &format!("http://{VER_VIP}/hello"));
    assert!(!ok, "ver, the target of a policy that could not be admitted, is closed: {out}");
}
