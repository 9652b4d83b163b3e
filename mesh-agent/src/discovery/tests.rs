//! The Kubernetes source against the fake API server behind a mock service
//! (kube-rs's `tower-test` pattern), with paused time: startup gating,
//! changes of each kind reaching the model, coalescing, `410 Gone`, API
//! errors, bad objects, and equivalence with the file source.
use std::time::Duration;

use http_body_util::BodyExt as _;
use kube::Client;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{Counters, Settings, agent_kinds, testing::FakeApi};
use crate::{config::Loaded, state::State};

const CLUSTER: &str = include_str!("tests/cluster.yaml");

/// A client whose HTTP service is the fake API server.
pub(crate) fn mock_client(fake: &FakeApi) -> Client {
    let (service, mut handle) =
        tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<super::testing::Body>>();
    let fake = fake.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            send.send_response(fake.handle(&parts.method, &parts.uri, &body));
        }
    });
    Client::new(service, "default")
}

/// The fixture's documents as API objects (JSON).
fn objects(yaml: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| serde_json::to_value(serde_yaml_ng::Value::deserialize(d).expect("fixture YAML")).expect("JSON"))
        .collect()
}

struct Source {
    fake: FakeApi,
    models: mpsc::Receiver<Loaded>,
    counters: Counters,
}

impl Source {
    fn start(fake: &FakeApi) -> Source {
        let (tx, models) = mpsc::channel(1);
        let counters = Counters::default();
        let settings = Settings::new("cluster.local");
        let kinds = agent_kinds(&["istio-system".to_owned()]);
        tokio::spawn(super::run(mock_client(fake), kinds, settings, counters.clone(), tx));
        Source { fake: fake.clone(), models, counters }
    }

    /// The next model built, within a minute of (paused) time.
    async fn next(&mut self) -> Loaded {
        tokio::time::timeout(Duration::from_secs(60), self.models.recv())
            .await
            .expect("a model within a minute")
            .expect("the source runs")
    }

    /// Whether a model is built within `secs` seconds.
    async fn quiet_for(&mut self, secs: u64) -> bool {
        tokio::time::timeout(Duration::from_secs(secs), self.models.recv()).await.is_err()
    }

    /// The first model built that satisfies `wanted` (relists of several
    /// kinds may build intermediate ones).
    async fn until(&mut self, wanted: impl Fn(&State) -> bool) -> Loaded {
        loop {
            let loaded = self.next().await;
            if wanted(&loaded.state) {
                return loaded;
            }
        }
    }

    fn errors(&self, kind: &str) -> u64 {
        self.counters.watch_errors.get_or_create(&crate::telemetry::KindLabels { kind: kind.into() }).get()
    }
}

fn with_cluster() -> FakeApi {
    let fake = FakeApi::default();
    for o in objects(CLUSTER) {
        fake.apply(o);
    }
    fake
}

fn pod(name: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo", "uid": format!("uid-{name}"), "labels": {"app": "helloworld", "version": "v1"}},
        "spec": {"nodeName": node, "serviceAccountName": "helloworld", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 5000}]}]},
        "status": {"podIP": ip, "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

/// The Service's ready endpoints (routing skips the others).
fn endpoints(state: &State, service: &str) -> Vec<String> {
    let svc = state.services.get(service).expect("the Service");
    let ready = svc.endpoints.iter().filter(|w| w.ready);
    let mut ips: Vec<String> = ready.filter_map(|w| w.ip).map(|ip| ip.to_string()).collect();
    ips.sort();
    ips
}

#[tokio::test(start_paused = true)]
async fn nothing_is_published_until_every_kind_has_been_listed() {
    let fake = with_cluster();
    fake.set_down(true);
    let mut source = Source::start(&fake);
    assert!(source.quiet_for(30).await, "a model was published from no lists");
    assert!(source.errors("Pod") > 0, "list failures are counted");
    fake.set_down(false);
    let loaded = source.next().await;
    assert!(loaded.rejected.is_empty(), "{:?}", loaded.rejected);
    assert_eq!(loaded.state.workloads.len(), 4);
    // Lists come from the watch cache.
    let lists: Vec<_> =
        fake.requests().into_iter().filter(|r| r.method == "GET" && !r.query.contains("watch")).collect();
    assert!(
        !lists.is_empty() && lists.iter().all(|r| r.path == "/apis" || r.query.contains("resourceVersion=0")),
        "{lists:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn changes_of_each_kind_reach_routing_capture_certificates_and_gateways() {
    let mut source = Source::start(&with_cluster());
    let first = source.next().await.state;
    assert_eq!(endpoints(&first, "demo/helloworld"), ["10.244.1.5"]);
    // A pod added: an endpoint, captured on its node, a certificate there.
    source.fake.apply(pod("helloworld-v1-5d8f9-zzzzz", "n2", "10.244.2.9"));
    let s = source.next().await.state;
    assert_eq!(endpoints(&s, "demo/helloworld"), ["10.244.1.5", "10.244.2.9"]);
    assert!(s.local_workloads("n2").any(|w| w.name.as_ref() == "helloworld-v1-5d8f9-zzzzz"));
    assert!(s.node_identities("n2").contains("spiffe://cluster.local/ns/demo/sa/helloworld"));
    // Changed: no longer ready, no longer an endpoint.
    let mut unready = pod("helloworld-v1-5d8f9-zzzzz", "n2", "10.244.2.9");
    unready["status"]["conditions"][0]["status"] = json!("False");
    source.fake.apply(unready);
    assert_eq!(endpoints(&source.next().await.state, "demo/helloworld"), ["10.244.1.5"]);
    // Deleted: gone from capture and certificates.
    source.fake.delete("v1", "Pod", Some("demo"), "helloworld-v1-5d8f9-zzzzz");
    let s = source.next().await.state;
    assert!(!s.local_workloads("n2").any(|w| w.name.as_ref() == "helloworld-v1-5d8f9-zzzzz"));
    assert!(!s.node_identities("n2").contains("spiffe://cluster.local/ns/demo/sa/helloworld"));
    // A namespace leaving the mesh: its pods are no longer captured.
    source.fake.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}));
    // (The gateway pod, served by the agent, stays captured.)
    assert!(!source.next().await.state.local_workloads("n1").any(|w| w.meshed && !w.gateway));
    // A Gateway deleted: nothing for the node's gateway pod to serve.
    let served =
        |s: &crate::state::State| s.local_workloads("n1").filter(|w| w.gateway).flat_map(|w| s.gateways_of(w)).count();
    assert!(served(&s) > 0);
    assert!(
        s.node_identities("n1")
            .contains("spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account")
    );
    source.fake.delete("networking.istio.io/v1", "Gateway", Some("istio-system"), "ingress");
    assert_eq!(served(&source.next().await.state), 0);
    // Istio kinds: an AuthorizationPolicy, a DestinationRule, the mesh ConfigMap.
    source.fake.delete("security.istio.io/v1", "AuthorizationPolicy", Some("demo"), "hello-from-test");
    assert!(source.next().await.state.authorization_policies.is_empty());
    source.fake.delete("networking.istio.io/v1", "DestinationRule", Some("demo"), "helloworld");
    assert!(source.next().await.state.destination_rules.is_empty());
    source.fake.delete("v1", "ConfigMap", Some("istio-system"), "istio");
    let s = source.next().await.state;
    assert_eq!(s.outbound_policy, crate::state::OutboundPolicy::default());
    // A Node's address changed (its pod range is kept from the API's object too).
    source.fake.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"},
        "spec": {"podCIDR": "10.244.2.0/24", "podCIDRs": ["10.244.2.0/24"], "providerID": "x"},
        "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.9"}]}}));
    let s = source.next().await.state;
    assert_eq!(s.nodes.get("n2").and_then(|n| n.internal_ip).map(|i| i.to_string()).as_deref(), Some("172.18.0.9"));
    assert_eq!(s.nodes["n2"].pod_cidrs, [crate::state::security::Cidr::parse("10.244.2.0/24").expect("a CIDR")]);
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_a_thousand_events_is_one_rebuild() {
    let mut source = Source::start(&with_cluster());
    source.next().await;
    let before = source.counters.rebuilds.get();
    for i in 0..1000u32 {
        let ip = format!("10.245.{}.{}", i / 250, i % 250 + 1);
        source.fake.apply(pod(&format!("burst-{i}"), "n2", &ip));
    }
    let s = source.next().await.state;
    assert_eq!(s.workloads.len(), 1004);
    assert!(source.quiet_for(10).await, "a second rebuild for the same burst");
    assert_eq!(source.counters.rebuilds.get() - before, 1);
}

#[tokio::test(start_paused = true)]
async fn a_410_gone_leads_to_a_relist_and_what_changed_meanwhile_is_seen() {
    let mut source = Source::start(&with_cluster());
    source.next().await;
    let lists = |fake: &FakeApi| {
        fake.requests().iter().filter(|r| r.path == "/api/v1/pods" && !r.query.contains("watch=true")).count()
    };
    assert_eq!(lists(&source.fake), 1);
    source.fake.expire_watches();
    source.fake.apply(pod("after-expiry", "n1", "10.244.1.77"));
    let s = source.until(|s| s.workloads.contains_key("demo/after-expiry")).await.state;
    assert_eq!(s.workloads.len(), 5, "nothing lost in the relist");
    assert_eq!(lists(&source.fake), 2, "the pods were listed again");
}

#[tokio::test(start_paused = true)]
async fn api_errors_keep_the_last_model_and_are_retried_and_counted() {
    let mut source = Source::start(&with_cluster());
    source.next().await;
    source.fake.set_down(true);
    assert!(source.quiet_for(60).await, "an outage must not publish a model (an empty one would unmesh the node)");
    assert!(source.errors("Pod") > 0 && source.errors("Secret/istio-system") > 0);
    source.fake.set_down(false);
    source.fake.apply(pod("after-outage", "n1", "10.244.1.78"));
    let s = source.until(|s| s.workloads.contains_key("demo/after-outage")).await.state;
    assert!(s.workloads.contains_key("demo/after-outage") && s.workloads.contains_key("demo/test-0"));
}

#[tokio::test(start_paused = true)]
async fn an_invalid_object_is_rejected_by_itself() {
    let mut source = Source::start(&with_cluster());
    source.next().await;
    source.fake.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "broken", "namespace": "demo"},
        "spec": {"hosts": ["helloworld"], "http": [{"timeout": "forever", "route": [{"destination": {"host": "helloworld"}}]}]}}));
    let loaded = source.next().await;
    assert_eq!(loaded.rejected.len(), 1, "{:?}", loaded.rejected);
    let error = loaded.rejected[0].to_string();
    assert!(error.starts_with("api-server: VirtualService demo/broken: spec.http[0].timeout"), "{error}");
    // The cluster's VirtualService and the ones its HTTPRoutes make (one
    // attached to a Service, one to a Gateway API Gateway).
    assert_eq!(loaded.state.virtual_services.len(), 3);
    assert_eq!(loaded.state.workloads.len(), 4);
}

#[tokio::test(start_paused = true)]
async fn without_the_gateway_apis_crds_its_kinds_are_left_out_not_waited_for() {
    let fake = with_cluster();
    fake.without_gateway_api();
    let kinds = agent_kinds(&["istio-system".to_owned()]);
    let (mut models, _task) =
        super::start(mock_client(&fake), kinds, Settings::new("cluster.local"), Counters::default())
            .await
            .expect("started without the Gateway API");
    let state = super::first_model(&mut models).await.expect("a first model").state;
    assert!(state.virtual_services.iter().all(|v| !v.name.starts_with("HTTPRoute")));
    assert!(state.workloads.contains_key("demo/test-0"), "everything else is read");
    assert!(fake.requests().iter().all(|r| !r.path.contains("gateway.networking.k8s.io")), "never listed");
}

#[tokio::test(start_paused = true)]
async fn the_same_objects_as_files_or_from_the_api_server_give_the_same_model() {
    let mut source = Source::start(&with_cluster());
    let from_api = source.next().await;
    let from_files = crate::config::load_text("cluster.yaml", CLUSTER, "cluster.local");
    assert!(from_files.rejected.is_empty() && from_api.rejected.is_empty());
    let dump = |s: &State| serde_json::to_value(s).expect("the model as JSON");
    assert_eq!(dump(&from_api.state), dump(&from_files.state));
    // Pods are reduced on arrival: no images, environment or annotations kept.
    assert!(from_api.state.workloads.values().all(|w| w.uid.is_some()));
}

mod rbac;
