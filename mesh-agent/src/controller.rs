//! `mesh-agent controller`: the cluster's one writer of the Gateway API's
//! status. It reads what the node agents read, builds the same model, and
//! writes back what the mesh did with each GatewayClass, Gateway and route
//! of its classes ([`crate::config::ObjectStatus`]), so `kubectl get
//! gateway,httproute` shows it. Node agents never write: a node's
//! credentials may not change cluster objects.
//!
//! - It may patch only the `status` subresources (deploy/controller.yaml);
//!   each write is a JSON merge patch carrying the `resourceVersion` it read,
//!   so a concurrent change is never overwritten (it is retried on the next
//!   model instead).
//! - A route's `status.parents` entries of other controllers are kept as
//!   they are; only this mesh's controller names' entries are replaced.
//! - A condition keeps its `lastTransitionTime` while its status holds.
//! - Nothing is written when nothing changed: what was written is
//!   remembered, and read again from the API server every
//!   [`ControllerConfig::resync`] (someone else may have changed it).
//! - One replica (a `Recreate` Deployment): two writers would agree, but
//!   each would write once more after the other.
//! - It deploys each Gateway's pods and Service as Istio's automated
//!   deployment does ([`deploy`]), unless told not to.
use std::{collections::HashMap, time::Duration};

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
};
use serde_json::{Value, json};

use crate::{config::ObjectStatus, discovery};

mod deploy;
pub use deploy::{DeployConfig, Deployer, MANAGED_LABEL, objects as gateway_objects};

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub trust_domain: String,
    /// The namespaces whose Secrets it reads (Gateways' `certificateRefs`),
    /// as the agents' `--secret-namespaces`.
    pub secret_namespaces: Vec<String>,
    /// How often what it wrote is read back from the API server.
    pub resync: Duration,
    /// Automated deployment of Gateway API Gateways' pods and Services
    /// (`None`: deployed by hand).
    pub deploy: Option<DeployConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("Kubernetes: {0}")]
    Kubernetes(#[from] discovery::DiscoveryError),
    #[error("installing the signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(cfg: ControllerConfig) -> Result<(), ControllerError> {
    let client = discovery::client().await?;
    let kinds = discovery::agent_kinds(&cfg.secret_namespaces);
    let settings = discovery::Settings { statuses: true, ..discovery::Settings::new(&cfg.trust_domain) };
    let (mut models, task) = discovery::start(client.clone(), kinds, settings, Default::default()).await?;
    tracing::info!("Gateway API status controller started; waiting for the first list of every kind");
    let mut deployer = cfg.deploy.clone().map(|d| Deployer::new(client.clone(), d));
    let mut writer = Writer::new(client);
    let mut resync = tokio::time::interval(cfg.resync);
    resync.tick().await;
    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(ControllerError::Signal)?;
    let (mut last, mut gateways) = (Vec::new(), Vec::new());
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            model = models.recv() => {
                let Some(model) = model else { break };
                (last, gateways) = (model.statuses, model.gateway_deployments);
            }
            _ = resync.tick() => {
                writer.forget();
                if let Some(d) = &mut deployer {
                    d.forget();
                }
            }
        }
        if let Some(d) = &mut deployer {
            d.apply(&gateways).await;
        }
        writer.write(&last).await;
    }
    task.abort();
    tracing::info!("Gateway API status controller stopped");
    Ok(())
}

/// `(apiVersion, kind, namespace, name)`.
type Key = (String, String, Option<String>, String);

/// Writes statuses, remembering what it wrote.
pub struct Writer {
    client: Client,
    written: HashMap<Key, Value>,
    /// Writes that failed, to try again on the next model or resync.
    pub failures: u64,
    pub writes: u64,
}

impl Writer {
    pub fn new(client: Client) -> Self {
        Writer { client, written: HashMap::new(), failures: 0, writes: 0 }
    }

    /// Forgets what was written: the next [`Writer::write`] reads each
    /// object again.
    pub fn forget(&mut self) {
        self.written.clear();
    }

    /// Brings each object's status to `statuses`, one object after another
    /// (an error is logged and leaves that object for the next time).
    pub async fn write(&mut self, statuses: &[ObjectStatus]) {
        let mut seen = std::collections::HashSet::new();
        for s in statuses {
            let key = (s.api_version.clone(), s.kind.clone(), s.namespace.clone(), s.name.clone());
            seen.insert(key.clone());
            if self.written.get(&key) == Some(&s.status) {
                continue;
            }
            match self.write_one(s).await {
                Ok(wrote) => {
                    self.writes += u64::from(wrote);
                    self.written.insert(key, s.status.clone());
                }
                Err(e) => {
                    self.failures += 1;
                    let object = format!("{} {}/{}", s.kind, s.namespace.as_deref().unwrap_or(""), s.name);
                    tracing::warn!(%object, error = %e, "writing the status failed; retried with the next change or resync");
                }
            }
        }
        self.written.retain(|k, _| seen.contains(k));
    }

    /// Reads the object, merges `s` into its status, and patches it when that
    /// changes anything. `Ok(true)` when it wrote.
    async fn write_one(&self, s: &ObjectStatus) -> Result<bool, kube::Error> {
        let (group, version) = s.api_version.rsplit_once('/').unwrap_or(("", &s.api_version));
        let resource = ApiResource {
            group: group.to_owned(),
            version: version.to_owned(),
            api_version: s.api_version.clone(),
            kind: s.kind.clone(),
            plural: plural(&s.kind),
        };
        let api: Api<DynamicObject> = match &s.namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        };
        let current = api.get_status(&s.name).await?;
        let old = current.data.get("status").cloned().unwrap_or(Value::Null);
        let new = merged(&s.kind, &old, &s.status, &now());
        if same(&old, &new) {
            return Ok(false);
        }
        let patch = json!({"metadata": {"resourceVersion": current.metadata.resource_version}, "status": new});
        api.patch_status(&s.name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        let object = format!("{} {}/{}", s.kind, s.namespace.as_deref().unwrap_or(""), s.name);
        let parents = s.status["parents"].as_array().map(Vec::as_slice).unwrap_or_default();
        let conditions: Vec<String> =
            std::iter::once(&s.status).chain(parents).flat_map(crate::config::condition_summary).collect();
        tracing::info!(%object, ?conditions, "status written");
        Ok(true)
    }
}

/// The API's plural of a Gateway API kind.
fn plural(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if lower.ends_with("ss") { format!("{lower}es") } else { format!("{lower}s") }
}

fn now() -> String {
    let t = time::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap_or_else(|_| time::OffsetDateTime::now_utc());
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Whether two statuses say the same (a merge patch of `new` would change
/// nothing): JSON equality, `null` fields counted as absent.
fn same(old: &Value, new: &Value) -> bool {
    fn strip(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                Value::Object(m.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), strip(v))).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(strip).collect()),
            other => other.clone(),
        }
    }
    strip(old) == strip(new)
}

/// The status to write: ours, with each condition's `lastTransitionTime`
/// kept from `old` while its status holds (`now` otherwise); for a route,
/// other controllers' `parents` entries kept. Fields of `old` that ours
/// does not set are cleared (`null`), so a stale `addresses` goes.
fn merged(kind: &str, old: &Value, ours: &Value, now: &str) -> Value {
    if kind.ends_with("Route") {
        let ours_list = ours["parents"].as_array().cloned().unwrap_or_default();
        let old_list = old["parents"].as_array().cloned().unwrap_or_default();
        let is_ours =
            |p: &Value| crate::config::CONTROLLERS.contains(&p["controllerName"].as_str().unwrap_or_default());
        let mut parents: Vec<Value> = old_list.iter().filter(|p| !is_ours(p)).cloned().collect();
        for p in ours_list {
            let before = old_list.iter().find(|o| is_ours(o) && o["parentRef"] == p["parentRef"]);
            parents.push(with_times(&p, before, now));
        }
        return json!({"parents": parents});
    }
    let mut status = with_times(ours, Some(old), now);
    if let Some(listeners) = ours["listeners"].as_array() {
        let old_listeners = old["listeners"].as_array().cloned().unwrap_or_default();
        let timed: Vec<Value> = listeners
            .iter()
            .map(|l| with_times(l, old_listeners.iter().find(|o| o["name"] == l["name"]), now))
            .collect();
        status["listeners"] = Value::Array(timed);
    }
    if let (Value::Object(new), Value::Object(old)) = (&mut status, old) {
        for key in old.keys() {
            new.entry(key.clone()).or_insert(Value::Null);
        }
    }
    status
}

/// `v` with each of its `conditions` timed against the same type in `old`.
fn with_times(v: &Value, old: Option<&Value>, now: &str) -> Value {
    let mut v = v.clone();
    let old_conditions = old.and_then(|o| o["conditions"].as_array()).cloned().unwrap_or_default();
    if let Some(conditions) = v["conditions"].as_array_mut() {
        for c in conditions {
            let before = old_conditions.iter().find(|o| o["type"] == c["type"] && o["status"] == c["status"]);
            c["lastTransitionTime"] = before.map_or_else(|| json!(now), |o| o["lastTransitionTime"].clone());
        }
    }
    v
}

#[cfg(test)]
mod tests;
