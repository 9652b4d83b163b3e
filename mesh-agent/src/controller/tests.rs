//! The status writer against the fake API server: the model's statuses
//! land in each object's `status`, other controllers' entries stay, a
//! condition keeps its time while it holds, and nothing is written twice.
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::Writer;
use crate::{
    config::Loaded,
    discovery::{self, testing::FakeApi, tests::mock_client},
};

const GW: &str = "gateway.networking.k8s.io/v1";

fn cluster(fake: &FakeApi) {
    for o in [
        json!({"apiVersion": GW, "kind": "GatewayClass", "metadata": {"name": "istio", "generation": 1},
               "spec": {"controllerName": "istio.io/gateway-controller"}}),
        json!({"apiVersion": GW, "kind": "GatewayClass", "metadata": {"name": "theirs"},
               "spec": {"controllerName": "example.net/gateway-controller"},
               "status": {"conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted"}]}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "demo"},
               "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]}}),
        json!({"apiVersion": GW, "kind": "Gateway", "metadata": {"name": "gw", "namespace": "demo", "generation": 2},
               "spec": {"gatewayClassName": "istio", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}}),
        // Attached here and to another controller's Gateway, whose entry is its own.
        json!({"apiVersion": GW, "kind": "HTTPRoute", "metadata": {"name": "r", "namespace": "demo", "generation": 4},
               "spec": {"parentRefs": [{"name": "gw"}], "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]},
               "status": {"parents": [{"parentRef": {"name": "elsewhere"}, "controllerName": "example.net/gateway-controller",
                                       "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted"}]}]}}),
        json!({"apiVersion": GW, "kind": "HTTPRoute", "metadata": {"name": "bad", "namespace": "demo", "generation": 1},
               "spec": {"parentRefs": [{"name": "gw"}], "rules": [{"backendRefs": [{"name": "nope", "port": 80}]}]}}),
    ] {
        fake.apply(o);
    }
}

fn start(fake: &FakeApi) -> mpsc::Receiver<Loaded> {
    let (tx, models) = mpsc::channel(1);
    let settings = discovery::Settings { statuses: true, ..discovery::Settings::new("cluster.local") };
    let kinds = discovery::agent_kinds(&["istio-system".to_owned()]);
    tokio::spawn(discovery::run(mock_client(fake), kinds, settings, Default::default(), tx));
    models
}

async fn next(models: &mut mpsc::Receiver<Loaded>) -> Loaded {
    tokio::time::timeout(Duration::from_secs(60), models.recv()).await.expect("a model").expect("running")
}

fn status(fake: &FakeApi, kind: &str, namespace: Option<&str>, name: &str) -> Value {
    fake.object(GW, kind, namespace, name).map(|o| o["status"].clone()).unwrap_or(Value::Null)
}

/// `type=status/reason` of each condition.
fn conditions(v: &Value) -> Vec<String> {
    crate::config::condition_summary(v)
}

fn patches(fake: &FakeApi) -> usize {
    fake.requests().iter().filter(|r| r.method == "PATCH").count()
}

#[tokio::test(start_paused = true)]
async fn statuses_are_written_back_once_and_keep_what_is_not_ours() {
    let fake = FakeApi::default();
    cluster(&fake);
    let mut models = start(&fake);
    let model = next(&mut models).await;
    let mut writer = Writer::new(mock_client(&fake));
    writer.write(&model.statuses).await;
    assert_eq!(writer.failures, 0);

    assert_eq!(conditions(&status(&fake, "GatewayClass", None, "istio")), ["Accepted=True/Accepted"]);
    // Another controller's class keeps its own status.
    assert_eq!(conditions(&status(&fake, "GatewayClass", None, "theirs")), ["Accepted=True/Accepted"]);
    let gw = status(&fake, "Gateway", Some("demo"), "gw");
    assert_eq!(conditions(&gw), ["Accepted=True/Accepted", "Programmed=False/NoResources"]);
    assert_eq!(gw["listeners"][0]["attachedRoutes"], 1);
    assert_eq!(gw["conditions"][0]["observedGeneration"], 2);
    let accepted_at = gw["conditions"][0]["lastTransitionTime"].as_str().expect("a time").to_owned();
    assert!(accepted_at.ends_with('Z') && accepted_at.len() == 20, "{accepted_at}");
    let route = status(&fake, "HTTPRoute", Some("demo"), "r");
    let controllers: Vec<&str> = route["parents"]
        .as_array()
        .expect("parents")
        .iter()
        .map(|p| p["controllerName"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(controllers, ["example.net/gateway-controller", "istio.io/gateway-controller"]);
    assert_eq!(conditions(&route["parents"][1]), ["Accepted=True/Accepted", "ResolvedRefs=True/ResolvedRefs"]);
    let bad = status(&fake, "HTTPRoute", Some("demo"), "bad");
    assert_eq!(
        conditions(&bad["parents"][0]),
        ["Accepted=False/UnsupportedValue", "ResolvedRefs=False/BackendNotFound"]
    );
    assert!(
        bad["parents"][0]["conditions"][1]["message"]
            .as_str()
            .expect("message")
            .contains("Service demo/nope does not exist")
    );

    // The writes built nothing new at the source (status is not read), and
    // writing the same again sends nothing; read back, nothing differs.
    let written = patches(&fake);
    assert_eq!(written, 4, "{:?}", fake.requests());
    assert!(
        tokio::time::timeout(Duration::from_secs(5), models.recv()).await.is_err(),
        "a status write rebuilt the model"
    );
    writer.write(&model.statuses).await;
    assert_eq!(patches(&fake), written);
    writer.forget();
    writer.write(&model.statuses).await;
    assert_eq!(patches(&fake), written, "an unchanged status is not written again");

    // A gateway pod arrives: Programmed turns True with a new time;
    // Accepted keeps its old one.
    let mut old = fake.object(GW, "Gateway", Some("demo"), "gw").expect("stored");
    old["status"]["conditions"][0]["lastTransitionTime"] = json!("2020-01-01T00:00:00Z");
    fake.apply(old);
    fake.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "gw-1", "namespace": "demo", "uid": "u1", "labels": {"gateway.networking.k8s.io/gateway-name": "gw"}},
        "spec": {"nodeName": "n1"}, "status": {"podIP": "10.244.0.9", "phase": "Running"}}));
    let model = next(&mut models).await;
    writer.write(&model.statuses).await;
    let gw = status(&fake, "Gateway", Some("demo"), "gw");
    assert_eq!(conditions(&gw), ["Accepted=True/Accepted", "Programmed=True/Programmed"]);
    assert_eq!(gw["conditions"][0]["lastTransitionTime"], "2020-01-01T00:00:00Z");
    assert_ne!(gw["conditions"][1]["lastTransitionTime"], "2020-01-01T00:00:00Z");
    assert_eq!(patches(&fake), written + 1, "only the Gateway changed");
}

fn writes(fake: &FakeApi) -> Vec<(String, String)> {
    fake.requests().iter().filter(|r| r.method != "GET").map(|r| (r.method.clone(), r.path.clone())).collect()
}

#[tokio::test(start_paused = true)]
async fn each_gateway_gets_its_pods_and_service_as_istio_deploys_them() {
    use super::{DeployConfig, Deployer};
    let fake = FakeApi::default();
    cluster(&fake);
    // demo/other-istio exists already and is a tenant's own Service.
    fake.apply(
        json!({"apiVersion": GW, "kind": "Gateway", "metadata": {"name": "other", "namespace": "demo", "uid": "g2"},
        "spec": {"gatewayClassName": "istio", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}}),
    );
    fake.apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "other-istio", "namespace": "demo"},
        "spec": {"clusterIP": "10.96.0.77", "selector": {"app": "mine"}, "ports": [{"name": "http", "port": 8080}]}}));
    let mut models = start(&fake);
    let model = next(&mut models).await;
    let names: Vec<(&str, &str)> =
        model.gateway_deployments.iter().map(|g| (g.name.as_str(), g.class.as_str())).collect();
    assert_eq!(names, [("gw", "istio"), ("other", "istio")]);
    let mut deployer = Deployer::new(mock_client(&fake), DeployConfig { image: "registry.k8s.io/pause:3.10".into() });
    deployer.apply(&model.gateway_deployments).await;
    assert_eq!(deployer.failures, 0);

    let object = |api: &str, kind: &str, name: &str| fake.object(api, kind, Some("demo"), name).unwrap_or(Value::Null);
    let svc = object("v1", "Service", "gw-istio");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(svc["spec"]["selector"], json!({"gateway.networking.k8s.io/gateway-name": "gw"}));
    assert_eq!(
        svc["spec"]["ports"],
        json!([{"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP", "appProtocol": "http"}])
    );
    assert_eq!(svc["metadata"]["labels"]["gateway.istio.io/managed"], "istio.io-gateway-controller");
    let deployment = object("apps/v1", "Deployment", "gw-istio");
    assert_eq!(deployment["spec"]["replicas"], 1);
    let pod = &deployment["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"], "gw");
    assert_eq!(pod["spec"]["serviceAccountName"], "gw-istio");
    assert_eq!(pod["spec"]["containers"][0]["image"], "registry.k8s.io/pause:3.10");
    assert_eq!(object("v1", "ServiceAccount", "gw-istio")["automountServiceAccountToken"], false);
    // Owned by the Gateway (deleted with it), which the agent reads as its pods' Gateway.
    let gateway_uid = fake.object(GW, "Gateway", Some("demo"), "gw").expect("gw")["metadata"]["uid"].clone();
    assert_eq!(svc["metadata"]["ownerReferences"][0]["kind"], "Gateway");
    assert_eq!(svc["metadata"]["ownerReferences"][0]["uid"], gateway_uid);
    // The tenant's own Service of that name is left as it was.
    assert_eq!(object("v1", "Service", "other-istio")["spec"]["selector"], json!({"app": "mine"}));
    assert!(object("apps/v1", "Deployment", "other-istio").is_object(), "its Deployment is still made");

    // Nothing changed: nothing written. A listener added: the Service follows.
    let before = writes(&fake).len();
    deployer.apply(&model.gateway_deployments).await;
    deployer.forget();
    deployer.apply(&model.gateway_deployments).await;
    assert_eq!(writes(&fake).len(), before, "{:?}", writes(&fake));
    let mut gw = fake.object(GW, "Gateway", Some("demo"), "gw").expect("gw");
    gw["spec"]["listeners"] =
        json!([{"name": "http", "port": 80, "protocol": "HTTP"}, {"name": "tcp", "port": 9000, "protocol": "TCP"}]);
    fake.apply(gw);
    let model = next(&mut models).await;
    deployer.apply(&model.gateway_deployments).await;
    let ports: Vec<i64> = object("v1", "Service", "gw-istio")["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(ports, [80, 9000]);
    let patched: Vec<(String, String)> = writes(&fake).split_off(before);
    assert_eq!(patched, [("PATCH".to_owned(), "/api/v1/namespaces/demo/services/gw-istio".to_owned())]);
}
