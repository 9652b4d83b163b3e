//! The real `mesh-agent controller` against the stand-in API server, named in
//! a kubeconfig: it deploys each Gateway's pods and Service, writes the
//! Gateway API's status back as objects change (through the status
//! subresource), and stops cleanly on SIGTERM. (No
//! root: the controller captures nothing; the conditions themselves are
//! tables in mesh-agent's `config::validate::tests::gateway_status`.)
use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use mesh_agent::discovery::testing::FakeApi;
use mesh_tests::kube_api::ApiServer;
use serde_json::{Value, json};

const GW: &str = "gateway.networking.k8s.io/v1";

fn objects() -> Vec<Value> {
    vec![
        json!({"apiVersion": GW, "kind": "GatewayClass", "metadata": {"name": "istio", "generation": 1},
               "spec": {"controllerName": "istio.io/gateway-controller"}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "helloworld", "namespace": "demo"},
               "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "helloworld"}, "ports": [{"name": "http", "port": 9095}]}}),
        json!({"apiVersion": GW, "kind": "Gateway", "metadata": {"name": "hello", "namespace": "demo", "generation": 1},
               "spec": {"gatewayClassName": "istio", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}}),
        json!({"apiVersion": GW, "kind": "HTTPRoute", "metadata": {"name": "hello", "namespace": "demo", "generation": 1},
               "spec": {"parentRefs": [{"name": "hello"}],
                        "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/hello"}}],
                                   "backendRefs": [{"name": "helloworld", "port": 9095}]}]}}),
        // A typo'd backend: not served, and the status says so.
        json!({"apiVersion": GW, "kind": "HTTPRoute", "metadata": {"name": "typo", "namespace": "demo", "generation": 1},
               "spec": {"parentRefs": [{"name": "hello"}], "rules": [{"backendRefs": [{"name": "helloworId", "port": 9095}]}]}}),
    ]
}

struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `type=status/reason` of each condition.
fn conditions(v: &Value) -> Vec<String> {
    mesh_agent::config::condition_summary(v)
}

/// Waits (up to 30 s) until `f` of the object's status holds.
fn until(fake: &FakeApi, kind: &str, name: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let namespace = (kind != "GatewayClass").then_some("demo");
        let status = fake.object(GW, kind, namespace, name).map(|o| o["status"].clone()).unwrap_or(Value::Null);
        if f(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{kind} demo/{name}: status never as wanted; last: {status:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_controller_writes_what_the_mesh_did_back_to_each_object() {
    let fake = FakeApi::default();
    for o in objects() {
        fake.apply(o);
    }
    let api = ApiServer::start_local(fake.clone());
    let child = Command::new(mesh_tests::agent::binary())
        .args(["controller", "--kubeconfig"])
        .arg(&api.kubeconfig)
        .env("MESH_LOG_LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mesh-agent controller starts");
    let mut controller = Controller(child);

    let accepted = |s: &Value| conditions(s).first().is_some_and(|c| c == "Accepted=True/Accepted");
    let gw = until(&fake, "Gateway", "hello", |s| conditions(s).len() == 2);
    assert_eq!(conditions(&gw), ["Accepted=True/Accepted", "Programmed=False/NoResources"]);
    assert_eq!(gw["listeners"][0]["attachedRoutes"], 1);
    let route = until(&fake, "HTTPRoute", "hello", |s| accepted(&s["parents"][0]));
    assert_eq!(route["parents"][0]["controllerName"], "istio.io/gateway-controller");
    let typo = until(&fake, "HTTPRoute", "typo", |s| !s["parents"][0].is_null());
    assert_eq!(
        conditions(&typo["parents"][0]),
        ["Accepted=False/UnsupportedValue", "ResolvedRefs=False/BackendNotFound"]
    );
    let class = until(&fake, "GatewayClass", "istio", |s| !s.is_null());
    assert_eq!(conditions(&class), ["Accepted=True/Accepted"]);

    // Automated deployment: the Gateway's Deployment and LoadBalancer
    // Service, as Istio names them, owned by the Gateway.
    let object = |api: &str, kind: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(o) = fake.object(api, kind, Some("demo"), "hello-istio") {
                return o;
            }
            assert!(Instant::now() < deadline, "no {kind} demo/hello-istio made");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let deployment = object("apps/v1", "Deployment");
    let template = deployment["spec"]["template"].clone();
    assert_eq!(template["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"], "hello");
    let mut service = object("v1", "Service");
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    assert_eq!(service["metadata"]["ownerReferences"][0]["name"], "hello");
    // Kubernetes' part, played here: the Service gets its cluster IP and the
    // Deployment its pod. Programmed, with the address.
    service["spec"]["clusterIP"] = json!("10.96.0.40");
    fake.apply(service);
    let mut labels = template["metadata"]["labels"].clone();
    labels["pod-template-hash"] = json!("5d8f9");
    fake.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "hello-istio-5d8f9-abcde", "namespace": "demo", "uid": "u1", "labels": labels},
        "spec": {"nodeName": "node-1", "serviceAccountName": template["spec"]["serviceAccountName"]},
        "status": {"podIP": "10.244.1.100", "phase": "Running"}}));
    let gw =
        until(&fake, "Gateway", "hello", |s| conditions(s).get(1).is_some_and(|c| c == "Programmed=True/Programmed"));
    assert_eq!(gw["addresses"], json!([{"type": "IPAddress", "value": "10.96.0.40"}]));

    // The typo fixed (a new generation): accepted, and counted on the listener.
    let mut fixed = fake.object(GW, "HTTPRoute", Some("demo"), "typo").expect("stored");
    fixed["spec"]["rules"][0]["backendRefs"][0]["name"] = json!("helloworld");
    fixed["metadata"]["generation"] = json!(2);
    fake.apply(fixed);
    let typo = until(&fake, "HTTPRoute", "typo", |s| accepted(&s["parents"][0]));
    assert_eq!(typo["parents"][0]["conditions"][0]["observedGeneration"], 2);
    until(&fake, "Gateway", "hello", |s| s["listeners"][0]["attachedRoutes"] == 2);

    // Writes: patches of status subresources, and the deployment's objects.
    for r in fake.requests() {
        if !matches!(r.method.as_str(), "GET") {
            let deployed =
                ["serviceaccounts", "deployments", "services"].iter().any(|k| r.path.contains(&format!("/{k}")));
            assert!(r.method == "PATCH" && r.path.ends_with("/status") || deployed, "{r:?}");
        }
    }
    // SIGTERM: a clean stop.
    let pid = controller.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = controller.0.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "the controller did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}
