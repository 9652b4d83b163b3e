//! The RBAC in `deploy/` against the requests the code makes: every request
//! the agent, the CA and the status controller send to the (fake) API server is allowed by their
//! roles there, and every permission there is used by some request.
use std::collections::BTreeSet;

use serde_yaml_ng::Value;

use super::{CLUSTER, mock_client, objects};
use crate::discovery::{self, testing::FakeApi};

/// One granted (namespace or cluster-wide, group, resource, verb).
type Grant = (Option<String>, String, String, String);

fn deploy_docs() -> Vec<Value> {
    use serde::Deserialize as _;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut docs = Vec::new();
    for file in ["agent-rbac.yaml", "ca.yaml", "controller.yaml"] {
        let text = std::fs::read_to_string(dir.join(file)).expect("deploy/ readable");
        for d in serde_yaml_ng::Deserializer::from_str(&text) {
            docs.push(Value::deserialize(d).expect("deploy/ YAML"));
        }
    }
    docs
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// What the service account `namespace/name` is granted by deploy/'s bindings.
fn grants(account: &str) -> BTreeSet<Grant> {
    let docs = deploy_docs();
    let (sa_ns, sa_name) = account.split_once('/').expect("namespace/name");
    let mut out = BTreeSet::new();
    for binding in docs.iter().filter(|d| matches!(d["kind"].as_str(), Some("ClusterRoleBinding" | "RoleBinding"))) {
        let subjects = binding["subjects"].as_sequence().cloned().unwrap_or_default();
        let bound = subjects
            .iter()
            .any(|x| s(&x["kind"]) == "ServiceAccount" && s(&x["name"]) == sa_name && s(&x["namespace"]) == sa_ns);
        if !bound {
            continue;
        }
        let role_kind = s(&binding["roleRef"]["kind"]);
        let role_name = s(&binding["roleRef"]["name"]);
        let namespace = binding["metadata"]["namespace"].as_str().map(str::to_owned);
        let role = docs
            .iter()
            .find(|d| {
                s(&d["kind"]) == role_kind
                    && s(&d["metadata"]["name"]) == role_name
                    && d["metadata"]["namespace"].as_str().map(str::to_owned) == namespace
            })
            .unwrap_or_else(|| panic!("{role_kind} {role_name} bound but not in deploy/"));
        for rule in role["rules"].as_sequence().into_iter().flatten() {
            let list = |k: &str| rule[k].as_sequence().cloned().unwrap_or_default();
            for g in list("apiGroups") {
                for r in list("resources") {
                    for v in list("verbs") {
                        out.insert((namespace.clone(), s(&g), s(&r), s(&v)));
                    }
                }
            }
        }
    }
    out
}

/// Checks each recorded request against `granted`; returns the grants used.
fn check(who: &str, fake: &FakeApi, granted: &BTreeSet<Grant>) -> BTreeSet<Grant> {
    let mut used = BTreeSet::new();
    for request in fake.requests() {
        // API discovery (`/apis`) is a non-resource URL every authenticated user may read.
        let Some((verb, group, resource, namespace)) = request.rbac() else { continue };
        let grant = granted
            .iter()
            .find(|(ns, g, r, v)| (ns.is_none() || *ns == namespace) && *g == group && *r == resource && v == verb);
        match grant {
            Some(g) => {
                used.insert(g.clone());
            }
            None => panic!("{who}: {request:?} ({verb} {group}/{resource} in {namespace:?}) is not allowed by deploy/"),
        }
    }
    used
}

#[tokio::test(start_paused = true)]
async fn the_agent_the_ca_and_the_controller_need_exactly_what_deploy_grants_them() {
    // The agent: discovery, then every kind listed and watched.
    let fake = FakeApi::default();
    for o in objects(CLUSTER) {
        fake.apply(o);
    }
    let kinds = discovery::agent_kinds(&["istio-system".to_owned()]);
    let (mut models, _task) =
        discovery::start(mock_client(&fake), kinds, discovery::Settings::new("cluster.local"), Default::default())
            .await
            .expect("started");
    discovery::first_model(&mut models).await.expect("a first model");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let granted = grants("mesh-system/mesh-agent");
    let used = check("mesh-agent", &fake, &granted);
    assert_eq!(used, granted, "granted to the agent but never used");

    // The CA: its permission check, its view, and a token review.
    let fake = FakeApi::default();
    let client = mock_client(&fake);
    let missing = crate::ca_server::kubernetes_missing_permissions(&client).await.expect("access reviews");
    assert!(missing.is_empty(), "{missing:?}");
    let (mut models, _task) = discovery::start(
        client.clone(),
        discovery::ca_kinds(),
        discovery::Settings::new("cluster.local"),
        Default::default(),
    )
    .await
    .expect("started");
    let state = discovery::first_model(&mut models).await.expect("a first model").state;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    crate::ca_server::review_token_for_test(client, "some-token", &state).await;
    let granted = grants("mesh-system/mesh-ca");
    let used = check("mesh-ca", &fake, &granted);
    assert_eq!(used, granted, "granted to the CA but never used");

    // The status controller: the agents' reads, and each kind's status read
    // and patched.
    let fake = FakeApi::default();
    for o in objects(CLUSTER).into_iter().chain(objects(GATEWAY_API)) {
        fake.apply(o);
    }
    let client = mock_client(&fake);
    let kinds = discovery::agent_kinds(&["istio-system".to_owned()]);
    let settings = discovery::Settings { statuses: true, ..discovery::Settings::new("cluster.local") };
    let (mut models, _task) =
        discovery::start(client.clone(), kinds, settings, Default::default()).await.expect("started");
    let model = discovery::first_model(&mut models).await.expect("a first model");
    let kinds: BTreeSet<&str> = model.statuses.iter().map(|s| s.kind.as_str()).collect();
    assert_eq!(kinds, BTreeSet::from(["GatewayClass", "Gateway", "HTTPRoute", "GRPCRoute", "TCPRoute", "TLSRoute"]));
    let image = crate::controller::DeployConfig { image: "pause".into() };
    let mut deployer = crate::controller::Deployer::new(client.clone(), image);
    deployer.apply(&model.gateway_deployments).await;
    assert_eq!(deployer.failures, 0);
    let mut writer = crate::controller::Writer::new(client);
    writer.write(&model.statuses).await;
    assert_eq!(writer.failures, 0);
    let granted = grants("mesh-system/mesh-controller");
    let used = check("mesh-controller", &fake, &granted);
    assert_eq!(used, granted, "granted to the controller but never used");
}

/// One object of each Gateway API kind the controller writes status for;
/// `gw`'s deployment made before, and stale (patched), `fresh`'s not yet
/// (created).
const GATEWAY_API: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: fresh, namespace: demo}
spec: {gatewayClassName: istio, listeners: [{name: http, port: 8080, protocol: HTTP}]}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: gw-istio, namespace: demo, labels: {gateway.istio.io/managed: istio.io-gateway-controller}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: gw-istio, namespace: demo, labels: {gateway.istio.io/managed: istio.io-gateway-controller}}
spec: {selector: {matchLabels: {app: old}}}
---
apiVersion: v1
kind: Service
metadata: {name: gw-istio, namespace: demo, labels: {gateway.istio.io/managed: istio.io-gateway-controller}}
spec: {selector: {app: old}, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: istio}
spec: {controllerName: istio.io/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: demo}
spec:
  gatewayClassName: istio
  listeners:
    - {name: http, port: 80, protocol: HTTP}
    - {name: tcp, port: 9000, protocol: TCP}
    - {name: tls, port: 443, protocol: TLS, tls: {mode: Passthrough}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: h, namespace: demo}
spec: {parentRefs: [{name: gw, sectionName: http}], rules: [{backendRefs: [{name: helloworld, port: 9095}]}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: demo}
spec: {parentRefs: [{name: gw, sectionName: http}], rules: [{backendRefs: [{name: helloworld, port: 9095}]}]}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: t, namespace: demo}
spec: {parentRefs: [{name: gw, sectionName: tcp}], rules: [{backendRefs: [{name: helloworld, port: 9095}]}]}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: s, namespace: demo}
spec: {parentRefs: [{name: gw, sectionName: tls}], hostnames: [a.example.com], rules: [{backendRefs: [{name: helloworld, port: 9095}]}]}
"#;
