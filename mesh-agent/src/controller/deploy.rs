//! Automated deployment, as Istio's: for each Gateway API Gateway of this
//! mesh's classes, a ServiceAccount, a Deployment of gateway pods and a
//! LoadBalancer Service, all named `<gateway>-<class>` in the Gateway's
//! namespace, labelled `gateway.networking.k8s.io/gateway-name` (what makes
//! the pods the Gateway's, [docs/edges.md]) and owned by the Gateway (so
//! Kubernetes deletes them with it).
//!
//! - The pods hold an address and nothing else (a `pause` container): the
//!   agent of their node serves the Gateway there, with the pods' service
//!   account's identity.
//! - An object of that name that this controller did not make (no
//!   `gateway.istio.io/managed` label of its controller) is left alone and
//!   named in a warning: a Gateway's name never takes over a tenant's
//!   Deployment or Service.
//! - Created when missing; patched when what it sets differs (the replica
//!   count only at creation, so an autoscaler or a user may change it).
//!
//! Source: Istio's `pilot/pkg/config/kube/gateway/deploymentcontroller.go`
//! (names, labels, the Service's ports from the listeners, `appProtocol`).
use std::collections::HashMap;

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use crate::config::GatewayDeployment;

/// Istio's label on the objects its automated deployment manages.
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";
const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// How gateway pods are made.
#[derive(Debug, Clone)]
pub struct DeployConfig {
    /// The image of the pods' one container (it only holds the address).
    pub image: String,
}

/// `<gateway>-<class>`, as Istio names them.
pub fn object_name(g: &GatewayDeployment) -> String {
    format!("{}-{}", g.name, g.class)
}

/// The label value naming the controller (`istio.io/gateway-controller` →
/// `istio.io-gateway-controller`, as Istio writes it).
fn managed_by(g: &GatewayDeployment) -> String {
    g.controller.replace('/', "-")
}

/// The ServiceAccount, Deployment and Service for `g`, as (resource, object).
pub fn objects(g: &GatewayDeployment, cfg: &DeployConfig) -> Vec<(ApiResource, Value)> {
    let name = object_name(g);
    let mut metadata = json!({
        "name": name,
        "namespace": g.namespace,
        "labels": {GATEWAY_NAME_LABEL: g.name, MANAGED_LABEL: managed_by(g)},
    });
    if let Some(uid) = &g.uid {
        metadata["ownerReferences"] = json!([{
            "apiVersion": g.api_version, "kind": "Gateway", "name": g.name, "uid": uid, "controller": true,
        }]);
    }
    let selector = json!({GATEWAY_NAME_LABEL: g.name});
    let ports: Vec<Value> = g
        .listeners
        .iter()
        .map(|(listener, port, protocol)| {
            json!({"name": listener, "port": port, "targetPort": port, "protocol": "TCP", "appProtocol": protocol.to_ascii_lowercase()})
        })
        .collect();
    let account = json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata,
        "automountServiceAccountToken": false,
    });
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {GATEWAY_NAME_LABEL: g.name, MANAGED_LABEL: managed_by(g)}},
                "spec": {
                    "serviceAccountName": name,
                    "automountServiceAccountToken": false,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65535, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "istio-proxy",
                        "image": cfg.image,
                        "resources": {"requests": {"cpu": "1m", "memory": "1Mi"}},
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }],
                },
            },
        },
    });
    let service = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": metadata,
        "spec": {"type": "LoadBalancer", "selector": selector, "ports": ports},
    });
    let core = |kind: &str, plural: &str| ApiResource {
        group: String::new(),
        version: "v1".into(),
        api_version: "v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    let apps = ApiResource {
        group: "apps".into(),
        version: "v1".into(),
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        plural: "deployments".into(),
    };
    vec![
        (core("ServiceAccount", "serviceaccounts"), account),
        (apps, deployment),
        (core("Service", "services"), service),
    ]
}

/// Whether `current` already holds everything `desired` sets (maps key by
/// key, lists element by element: the API server adds defaults).
pub fn holds(current: &Value, desired: &Value) -> bool {
    match (current, desired) {
        (Value::Object(c), Value::Object(d)) => d.iter().all(|(k, v)| c.get(k).is_some_and(|cv| holds(cv, v))),
        (Value::Array(c), Value::Array(d)) => c.len() == d.len() && c.iter().zip(d).all(|(c, d)| holds(c, d)),
        (c, d) => c == d,
    }
}

/// Creates or patches the objects of each Gateway, remembering what it
/// applied so that an unchanged Gateway costs nothing.
pub struct Deployer {
    client: Client,
    cfg: DeployConfig,
    applied: HashMap<(String, String), GatewayDeployment>,
    pub failures: u64,
}

impl Deployer {
    pub fn new(client: Client, cfg: DeployConfig) -> Self {
        Deployer { client, cfg, applied: HashMap::new(), failures: 0 }
    }

    pub fn forget(&mut self) {
        self.applied.clear();
    }

    pub async fn apply(&mut self, gateways: &[GatewayDeployment]) {
        for g in gateways {
            let key = (g.namespace.clone(), g.name.clone());
            if self.applied.get(&key) == Some(g) {
                continue;
            }
            let mut ok = true;
            for (resource, object) in objects(g, &self.cfg) {
                if let Err(e) = self.apply_one(&resource, &g.namespace, &object).await {
                    ok = false;
                    self.failures += 1;
                    let what = format!("{} {}/{}", resource.kind, g.namespace, object_name(g));
                    tracing::warn!(object = %what, error = %e, "deploying the Gateway's pods failed; retried with the next change or resync");
                }
            }
            if ok {
                self.applied.insert(key, g.clone());
            }
        }
    }

    async fn apply_one(&self, resource: &ApiResource, namespace: &str, desired: &Value) -> Result<(), kube::Error> {
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, resource);
        let name = desired["metadata"]["name"].as_str().unwrap_or_default();
        let what = format!("{} {namespace}/{name}", resource.kind);
        let Some(current) = api.get_opt(name).await? else {
            let mut create = desired.clone();
            if resource.kind == "Deployment" {
                create["spec"]["replicas"] = json!(1);
            }
            let object: DynamicObject = serde_json::from_value(create).map_err(kube::Error::SerdeError)?;
            api.create(&PostParams::default(), &object).await?;
            tracing::info!(object = %what, "created for its Gateway");
            return Ok(());
        };
        let current = serde_json::to_value(&current).map_err(kube::Error::SerdeError)?;
        let ours = desired["metadata"]["labels"][MANAGED_LABEL].as_str();
        if current["metadata"]["labels"][MANAGED_LABEL].as_str() != ours {
            tracing::warn!(object = %what, "exists and was not made by this controller: left alone (the Gateway's pods must be deployed by hand)");
            return Ok(());
        }
        if holds(&current, desired) {
            return Ok(());
        }
        let patch = json!({"metadata": desired["metadata"], "spec": desired["spec"]});
        let patch = if resource.kind == "ServiceAccount" {
            json!({"metadata": desired["metadata"], "automountServiceAccountToken": false})
        } else {
            patch
        };
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        tracing::info!(object = %what, "updated for its Gateway");
        Ok(())
    }
}
