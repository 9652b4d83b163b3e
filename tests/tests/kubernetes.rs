//! The real agent binary with `--kubernetes` against a stand-in API server
//! (lists and chunked watch streams over TLS, named in a kubeconfig), through
//! real eBPF capture: a pod that arrives by a watch event is captured and
//! meshed (root).
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{net::Ipv4Addr, time::Duration};

use mesh_tests::{
    Agent, Cluster,
    agent::metric,
    fixture::{Objects, PodSpec, port},
    kube_api::ApiServer,
    mesh::curl,
    require_root, servers,
};
use serde::Deserialize as _;

const VIP: &str = "10.96.0.10";

/// Node, namespace `demo` (meshed), pod `helloworld`, Service helloworld.
fn cluster_objects() -> String {
    let mut o = Objects::demo();
    let hello = PodSpec { ports: &[("http", 9095)], ..PodSpec::app("demo", &[("app", "helloworld")]) };
    o.pod("node-1", "helloworld", Ipv4Addr::new(10, 244, 0, 3), hello).service(
        "demo",
        "helloworld",
        VIP,
        &[("app", "helloworld")],
        &[port("http", 9095, "http")],
    );
    o.yaml("")
}

/// Arrives later, by a watch event.
const LATE: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: late, namespace: demo, uid: late-uid, labels: {app: late}}
spec: {nodeName: node-1, serviceAccountName: late, containers: [{name: late, image: curl}]}
status: {podIP: 10.244.0.5, phase: Running, conditions: [{type: Ready, status: "True"}]}
"#;

fn objects(yaml: &str) -> Vec<serde_json::Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| serde_json::to_value(serde_yaml_ng::Value::deserialize(d).unwrap()).unwrap())
        .collect()
}

/// Where the stand-in API server listens.
enum Where {
    /// 127.0.0.1 in the node's namespace.
    OnTheNode,
    /// 172.18.0.1 in the cluster network, reached by the node and the CA.
    ClusterNetwork,
}

/// One node with pods `helloworld` (serving on 9095) and `late`, and an API
/// server holding [`cluster_objects`] (the cluster is dropped after the server).
fn cluster_with_api(at: Where) -> (Cluster, ApiServer) {
    let mut c = Cluster::new();
    c.add_pod("helloworld", Ipv4Addr::new(10, 244, 0, 3));
    c.add_pod("late", Ipv4Addr::new(10, 244, 0, 5));
    servers::http_hello(c.pod("helloworld"), 9095);
    let api = match at {
        Where::OnTheNode => ApiServer::start(&c, 0),
        Where::ClusterNetwork => ApiServer::start_in(&c, &c.net_ns.clone(), "172.18.0.1"),
    };
    for o in objects(&cluster_objects()) {
        api.fake.apply(o);
    }
    (c, api)
}

#[test]
fn a_pod_added_by_a_watch_event_is_captured_and_meshed() {
    if !require_root("a_pod_added_by_a_watch_event_is_captured_and_meshed") {
        return;
    }
    let (c, api) = cluster_with_api(Where::OnTheNode);
    let agent = Agent::start_kubernetes(&c, 0, &api.kubeconfig, &[]);
    // Ready only once every kind was listed, from the watch cache.
    let lists: Vec<_> = api.fake.requests().into_iter().filter(|r| r.method == "GET" && r.path != "/apis").collect();
    assert!(lists.iter().any(|r| r.path == "/api/v1/pods" && r.query.contains("resourceVersion=0")), "{lists:?}");
    assert!(lists.iter().any(|r| r.query.contains("watch=true")), "{lists:?}");
    let vip = format!("http://{VIP}:9095/hello");
    let late = c.pod("late");
    assert!(!curl(late, &vip).0, "late is not in the API server yet, so not captured");

    api.fake.apply(objects(LATE).remove(0));
    let captured = eventually(|| curl(late, &vip).0);
    assert!(captured, "late arrived by a watch event but was never captured:\n{}", agent.log_text());
    assert_eq!(curl(late, &vip).1, "hello from helloworld; client 10.244.0.5\n");
    // Meshed: the agent carried it with late's own identity.
    let m = agent.wait_metrics(5, "late's request", |m| {
        metric(m, "istio_requests_total", &[("source_workload", "late")]) >= 1.0
    });
    let labels =
        [("source_principal", "spiffe://cluster.local/ns/demo/sa/late"), ("destination_workload", "helloworld")];
    assert!(metric(&m, "istio_requests_total", &labels) >= 1.0, "{m}");
    assert!(metric(&m, "mesh_kube_rebuilds_total", &[]) >= 2.0, "{m}");
    let (_, dump) = agent.admin_get("/config_dump").unwrap();
    assert!(dump.contains("\"config_source\": \"kubernetes\""), "{dump}");

    // Deleted by a watch event: released.
    api.fake.delete("v1", "Pod", Some("demo"), "late");
    let released = eventually(|| !curl(late, &vip).0);
    assert!(released, "late was deleted but is still captured");
}

/// This node's agent pod, as the CA sees it (a TokenReview names it).
const AGENT_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: mesh-agent-x7k2p, namespace: mesh-system, uid: agent-pod-uid}
spec: {nodeName: node-1, hostNetwork: true, serviceAccountName: mesh-agent}
status: {podIP: 172.18.0.2, phase: Running}
"#;

fn write_token(path: &std::path::Path, token: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, token).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    // As the kubelet does: the new token replaces the old one at once.
    std::fs::rename(&tmp, path).unwrap();
}

fn has_certificate(agent: &Agent, identity: &str) -> bool {
    let (_, dump) = agent.admin_get("/config_dump").unwrap_or_default();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap_or_default();
    let certs = dump["certificates"].as_array().cloned().unwrap_or_default();
    certs.iter().any(|c| c["identity"] == identity)
}

fn wait_certificate(agent: &Agent, identity: &str) -> bool {
    eventually(|| has_certificate(agent, identity))
}

/// Whether `cond` holds within 10 s (checked every 200 ms).
fn eventually(cond: impl Fn() -> bool) -> bool {
    (0..50).any(|_| {
        let held = cond();
        if !held {
            std::thread::sleep(Duration::from_millis(200));
        }
        held
    })
}

#[test]
fn the_ca_signs_for_a_reviewed_token_and_the_agent_follows_its_rotation() {
    if !require_root("the_ca_signs_for_a_reviewed_token_and_the_agent_follows_its_rotation") {
        return;
    }
    // One API server for the CA (in the cluster network) and the agent.
    let (c, api) = cluster_with_api(Where::ClusterNetwork);
    for o in objects(AGENT_POD) {
        api.fake.apply(o);
    }
    // The CA reached at a Service VIP the node captures (as mesh-ca's is):
    // the agent's CA connections must not be taken for a host client's.
    api.fake.apply(serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "mesh-ca", "namespace": "mesh-system"},
        "spec": {"clusterIP": "172.18.0.1", "ports": [{"name": "tls", "port": 15012}]}}));
    let agent_pod = Some(("mesh-agent-x7k2p", "agent-pod-uid"));
    api.fake.add_token("token-1", "mesh-system/mesh-agent", agent_pod, &["mesh-ca"]);
    let ca = mesh_tests::agent::CaService::start_kubernetes(&c, &api.kubeconfig);
    let reviews =
        |kind: &str| api.fake.requests().iter().filter(|r| r.method == "POST" && r.path.ends_with(kind)).count();
    assert!(reviews("selfsubjectaccessreviews") >= 1, "the CA checks its permissions at start");

    let token = ca.dir.join("agent-token");
    write_token(&token, "token-1");
    let args: Vec<String> = vec![
        "--ca-addr".into(),
        ca.addr.clone(),
        "--ca-root".into(),
        ca.root_cert().display().to_string(),
        "--ca-token-file".into(),
        token.display().to_string(),
    ];
    let agent = Agent::start_kubernetes(&c, 0, &api.kubeconfig, &args);
    let hello = "spiffe://cluster.local/ns/demo/sa/helloworld";
    assert!(
        wait_certificate(&agent, hello),
        "no certificate after a TokenReview:\n{}\n{}",
        agent.log_text(),
        ca.log_text()
    );
    assert!(reviews("tokenreviews") >= 1);

    // The kubelet rotates the token; the old one stops being valid. A pod
    // arriving now needs a certificate, asked for with the new token.
    write_token(&token, "token-2");
    api.fake.add_token("token-2", "mesh-system/mesh-agent", agent_pod, &["mesh-ca"]);
    api.fake.revoke_token("token-1");
    api.fake.apply(objects(LATE).remove(0));
    let late = "spiffe://cluster.local/ns/demo/sa/late";
    assert!(
        wait_certificate(&agent, late),
        "no certificate with the rotated token:\n{}\n{}",
        agent.log_text(),
        ca.log_text()
    );

    // A token the API server does not accept gets nothing.
    write_token(&token, "forged-token");
    api.fake.apply(serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "later", "namespace": "demo", "uid": "later-uid"},
        "spec": {"nodeName": "node-1", "serviceAccountName": "later"},
        "status": {"podIP": "10.244.0.9", "phase": "Running"}}));
    std::thread::sleep(Duration::from_secs(3));
    assert!(!has_certificate(&agent, "spiffe://cluster.local/ns/demo/sa/later"));
    assert!(ca.log_text().contains("401"), "{}", ca.log_text());
}

/// The agent's own connections to the API server are never captured, even
/// when the API server's address is a Service VIP in the model (the
/// `kubernetes` Service, as in every cluster): otherwise the agent's
/// reconnects would be sent to its own outbound listener, and an agent
/// restarting under pinned capture could never list anything.
#[test]
fn the_agents_own_api_connections_survive_the_api_server_being_a_service_vip() {
    if !require_root("the_agents_own_api_connections_survive_the_api_server_being_a_service_vip") {
        return;
    }
    let (c, api) = cluster_with_api(Where::ClusterNetwork);
    // The API server's own Service: no selector, its address a VIP.
    api.fake.apply(serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default"},
        "spec": {"clusterIP": "172.18.0.1", "ports": [{"name": "https", "port": 443}]}}));
    let agent = Agent::start_kubernetes(&c, 0, &api.kubeconfig, &[]);
    // Every connection cut: the agent must connect again, past its own capture.
    api.cut_connections();
    api.fake.apply(objects(LATE).remove(0));
    let vip = format!("http://{VIP}:9095/hello");
    let late = c.pod("late");
    let captured = eventually(|| curl(late, &vip).0);
    assert!(captured, "the agent lost the API server after a reconnect:\n{}", agent.log_text());
}

#[test]
fn the_cluster_is_the_one_kubeconfig_and_context_name() {
    if !require_root("the_cluster_is_the_one_kubeconfig_and_context_name") {
        return;
    }
    let (c, api) = cluster_with_api(Where::OnTheNode);
    // A kubeconfig whose current context is another cluster (nothing
    // listens there); the stand-in is the context named `stand-in`.
    let theirs: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&api.kubeconfig).unwrap()).unwrap();
    let cluster = &theirs["clusters"][0]["cluster"];
    let (server, ca) = (cluster["server"].as_str().unwrap(), cluster["certificate-authority"].as_str().unwrap());
    let dir = std::env::temp_dir().join(format!("mesh-test-{}-kubeconfig", c.id));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("two-clusters");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: stand-in, cluster: {{server: '{server}', certificate-authority: '{ca}'}}}},\n  \
             {{name: elsewhere, cluster: {{server: 'https://127.0.0.1:1', certificate-authority: '{ca}'}}}}]\n\
             users: [{{name: agent, user: {{token: test-token}}}}]\n\
             contexts: [{{name: stand-in, context: {{cluster: stand-in, user: agent}}}}, {{name: elsewhere, context: {{cluster: elsewhere, user: agent}}}}]\n\
             current-context: elsewhere\n"
        ),
    )
    .unwrap();
    let path = kubeconfig.to_str().unwrap().to_owned();

    // $KUBECONFIG names nothing: the flags alone choose.
    let nowhere = dir.join("absent");
    let args = ["--kubeconfig".to_owned(), path.clone(), "--context".to_owned(), "stand-in".to_owned()];
    let mut agent = Agent::start_kubernetes(&c, 0, &nowhere, &args);
    assert!(api.fake.requests().iter().any(|r| r.path == "/api/v1/pods"), "nothing listed from the stand-in");
    assert!(eventually(|| curl(c.pod("helloworld"), &format!("http://{VIP}:9095/")).0));
    agent.stop();

    // A context the kubeconfig does not have: refused, naming it.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &c.node_ns])
        .arg(mesh_tests::agent::binary())
        .args(["run", "--node", "node-1", "--kubernetes", "--kubeconfig", &path, "--context", "nope", "--state-dir"])
        .arg(dir.join("state"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--context nope"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
