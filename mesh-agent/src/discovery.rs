//! Kubernetes as a configuration source (`--kubernetes`): the API server's
//! objects, watched kind by kind, reduced on arrival to the fields the agent
//! reads, and built into the model by the same object-by-object path as files
//! ([`config::load_documents`]), once per burst of changes.
//!
//! - Each kind is listed from the API server's watch cache
//!   (`resourceVersion=0`, kube-rs's "any" semantic), then watched; a `410
//!   Gone` leads kube-rs's watcher to list again, and errors are retried with
//!   its default backoff and counted in `mesh_kube_watch_errors_total{kind}`.
//!   The last good objects keep serving meanwhile.
//! - Nothing is published until every kind has finished its first list, so a
//!   half-known cluster never serves (`/ready` waits for it).
//! - Changes bump a generation; the builder waits [`Settings::debounce`]
//!   after a change before building, so a burst of events is one rebuild.
//! - Secrets are read only in the namespaces named by `--secret-namespaces`,
//!   with namespace-scoped Roles (the Gateway and DestinationRule
//!   credentials live there), never cluster-wide.
use std::{sync::Arc, time::Duration};

use futures_util::StreamExt as _;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt as _, watcher},
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::sync::{mpsc, watch};

use crate::{
    config::{self, Loaded},
    telemetry::KindLabels,
};

mod client;
mod reduce;
mod store;
/// A fake API server for tests (this crate's and `tests/`), not shipped:
/// behind the `testing` feature.
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
pub(crate) mod tests;

use store::Store;

/// Which objects of a kind are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Cluster,
    Namespace(String),
    /// One object, by namespace and name (a field selector on the name).
    Object {
        namespace: String,
        name: String,
    },
}

/// One watched kind: its API group and version, its plural, and which of its
/// objects are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kind {
    pub kind: &'static str,
    /// Empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub scope: Scope,
}

impl Kind {
    const fn core(kind: &'static str, plural: &'static str) -> Self {
        Kind { kind, group: "", version: "v1", plural, scope: Scope::Cluster }
    }

    const fn istio(group: &'static str, kind: &'static str, plural: &'static str) -> Self {
        Kind { kind, group, version: "v1", plural, scope: Scope::Cluster }
    }

    pub fn api_version(&self) -> String {
        match self.group {
            "" => self.version.to_owned(),
            g => format!("{g}/{}", self.version),
        }
    }

    /// The name its errors are counted under: `Secret/istio-system` for a
    /// namespace-scoped watch, else the kind.
    pub fn label(&self) -> String {
        match &self.scope {
            Scope::Cluster => self.kind.to_owned(),
            Scope::Namespace(ns) | Scope::Object { namespace: ns, .. } => format!("{}/{ns}", self.kind),
        }
    }

    fn resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.to_owned(),
            version: self.version.to_owned(),
            api_version: self.api_version(),
            kind: self.kind.to_owned(),
            plural: self.plural.to_owned(),
        }
    }
}

const NETWORKING: &str = "networking.istio.io";
const SECURITY: &str = "security.istio.io";
const TELEMETRY: &str = "telemetry.istio.io";
/// The Gateway API: optional (its CRDs may not be installed), and each kind
/// at the version its standard channel serves it.
const GATEWAY_API: &str = "gateway.networking.k8s.io";
/// The versions read, by preference: `v1` (Istio 1.22 on), else `v1beta1`
/// (`v1alpha1` for Telemetry, which had no beta).
fn versions_of(group: &str) -> &'static [&'static str] {
    match group {
        TELEMETRY => &["v1", "v1alpha1"],
        _ => &["v1", "v1beta1"],
    }
}

/// What the node agent reads: everything the files hold, Secrets only in
/// `secret_namespaces`.
pub fn agent_kinds(secret_namespaces: &[String]) -> Vec<Kind> {
    let mut kinds = vec![
        Kind::core("Node", "nodes"),
        Kind::core("Namespace", "namespaces"),
        Kind::core("Pod", "pods"),
        Kind::core("Service", "services"),
        Kind {
            scope: Scope::Object { namespace: "istio-system".into(), name: "istio".into() },
            ..Kind::core("ConfigMap", "configmaps")
        },
        Kind::istio(NETWORKING, "Gateway", "gateways"),
        Kind::istio(NETWORKING, "VirtualService", "virtualservices"),
        Kind::istio(NETWORKING, "DestinationRule", "destinationrules"),
        Kind::istio(NETWORKING, "ServiceEntry", "serviceentries"),
        Kind::istio(SECURITY, "PeerAuthentication", "peerauthentications"),
        Kind::istio(SECURITY, "AuthorizationPolicy", "authorizationpolicies"),
        Kind::istio(SECURITY, "RequestAuthentication", "requestauthentications"),
        Kind::istio(TELEMETRY, "Telemetry", "telemetries"),
        Kind { scope: Scope::Cluster, ..Kind::istio(GATEWAY_API, "GatewayClass", "gatewayclasses") },
        Kind::istio(GATEWAY_API, "Gateway", "gateways"),
        Kind::istio(GATEWAY_API, "HTTPRoute", "httproutes"),
        Kind::istio(GATEWAY_API, "GRPCRoute", "grpcroutes"),
        Kind { version: "v1alpha2", ..Kind::istio(GATEWAY_API, "TCPRoute", "tcproutes") },
        Kind { version: "v1alpha2", ..Kind::istio(GATEWAY_API, "TLSRoute", "tlsroutes") },
        Kind { version: "v1beta1", ..Kind::istio(GATEWAY_API, "ReferenceGrant", "referencegrants") },
    ];
    for ns in secret_namespaces {
        kinds.push(Kind { scope: Scope::Namespace(ns.clone()), ..Kind::core("Secret", "secrets") });
    }
    kinds
}

/// What the CA reads to know which identities live on which node: pods
/// (gateway pods among them), nodes and namespaces (enrolment).
pub fn ca_kinds() -> Vec<Kind> {
    vec![Kind::core("Node", "nodes"), Kind::core("Namespace", "namespaces"), Kind::core("Pod", "pods")]
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "Kubernetes client configuration: {0} (in a cluster: the pod's service account; outside: $KUBECONFIG or ~/.kube/config)"
    )]
    Config(String),
    #[error("Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("API discovery: {0}")]
    Discovery(#[source] kube::Error),
    #[error(
        "the API server does not serve {group} in {versions}: install Istio's base CRDs \
         (see README, \"Install on Kubernetes\")"
    )]
    MissingGroup { group: &'static str, versions: String },
    #[error("the Kubernetes source stopped")]
    Stopped,
}

pub use client::{KubeSelection, client, select_cluster};

/// Sets each Istio kind's version to the newest one the API server serves;
/// leaves the Gateway API's kinds out when its CRDs are not installed.
pub async fn resolve_versions(client: &Client, kinds: &mut Vec<Kind>) -> Result<(), DiscoveryError> {
    let groups = client.list_api_groups().await.map_err(DiscoveryError::Discovery)?;
    let served =
        |g: &str, v: &str| groups.groups.iter().any(|s| s.name == g && s.versions.iter().any(|x| x.version == v));
    let missing: Vec<&'static str> =
        kinds.iter().filter(|k| k.group == GATEWAY_API && !served(k.group, k.version)).map(|k| k.kind).collect();
    if !missing.is_empty() {
        tracing::warn!(kinds = ?missing, "the Gateway API's CRDs are not installed (or not at the versions read): these kinds are not read");
        kinds.retain(|k| !missing.contains(&k.kind) || k.group != GATEWAY_API);
    }
    for group in [NETWORKING, SECURITY, TELEMETRY] {
        if !kinds.iter().any(|k| k.group == group) {
            continue;
        }
        let served = groups.groups.iter().find(|g| g.name == group);
        let served: Vec<&str> =
            served.map(|g| g.versions.iter().map(|v| v.version.as_str()).collect()).unwrap_or_default();
        let version = versions_of(group)
            .iter()
            .copied()
            .find(|v| served.contains(v))
            .ok_or_else(|| DiscoveryError::MissingGroup { group, versions: versions_of(group).join(" or ") })?;
        for k in kinds.iter_mut().filter(|k| k.group == group) {
            k.version = version;
        }
    }
    Ok(())
}

/// Picks the Istio API versions
/// served (retrying while the API server cannot be reached) and starts
/// watching `kinds`.
pub async fn start(
    client: Client,
    mut kinds: Vec<Kind>,
    settings: Settings,
    counters: Counters,
) -> Result<(mpsc::Receiver<Loaded>, tokio::task::JoinHandle<()>), DiscoveryError> {
    let mut backoff = Duration::from_secs(1);
    loop {
        match resolve_versions(&client, &mut kinds).await {
            Ok(()) => break,
            Err(e @ DiscoveryError::MissingGroup { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "Kubernetes API discovery failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    let (tx, models) = mpsc::channel(1);
    let task = tokio::spawn(run(client, kinds, settings, counters, tx));
    Ok((models, task))
}

/// Waits for the first complete model, saying so every 10 s.
pub async fn first_model(models: &mut mpsc::Receiver<Loaded>) -> Result<Loaded, DiscoveryError> {
    let started = tokio::time::Instant::now();
    loop {
        tokio::select! {
            m = models.recv() => return m.ok_or(DiscoveryError::Stopped),
            _ = tokio::time::sleep(Duration::from_secs(10)) => {
                tracing::info!(waited = ?started.elapsed(), "waiting for the first list of every Kubernetes kind (not ready until then)");
            }
        }
    }
}

/// How the source builds.
#[derive(Debug, Clone)]
pub struct Settings {
    pub trust_domain: String,
    /// How long after a change the model is built, so that a burst of events
    /// is one rebuild.
    pub debounce: Duration,
    /// Whether each model carries the Gateway API statuses (the controller's).
    pub statuses: bool,
}

impl Settings {
    /// A model 100 ms after a burst of changes, without statuses.
    pub fn new(trust_domain: &str) -> Self {
        Settings { trust_domain: trust_domain.to_owned(), debounce: Duration::from_millis(100), statuses: false }
    }
}

/// What the source reports while it runs.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// `mesh_kube_watch_errors_total{kind}`.
    pub watch_errors: Family<KindLabels, Counter>,
    /// Models built from the API server's objects.
    pub rebuilds: Counter,
}

/// Watches `kinds` and sends a model built from all of them whenever they
/// changed; the first one once every kind has been listed. Runs until the
/// receiver is dropped.
pub async fn run(client: Client, kinds: Vec<Kind>, settings: Settings, counters: Counters, out: mpsc::Sender<Loaded>) {
    let (changed, mut generation) = watch::channel(0u64);
    let store = Arc::new(Store::new(kinds.len(), changed));
    let mut watches = tokio::task::JoinSet::new();
    for (i, kind) in kinds.iter().enumerate() {
        watches.spawn(watch_kind(client.clone(), i, kind.clone(), store.clone(), counters.watch_errors.clone()));
    }
    while generation.changed().await.is_ok() {
        // Let the rest of a burst arrive; everything that came meanwhile is
        // in this one build.
        tokio::time::sleep(settings.debounce).await;
        generation.borrow_and_update();
        let Some(docs) = store.documents(&kinds) else { continue };
        let loaded = match settings.statuses {
            true => config::load_documents_with_status(&docs, &settings.trust_domain),
            false => config::load_documents_guarded(&docs, &settings.trust_domain),
        };
        let Some(loaded) = loaded else { continue };
        counters.rebuilds.inc();
        if out.send(loaded).await.is_err() {
            break;
        }
    }
    watches.abort_all();
}

/// Lists and watches one kind into the store until aborted.
async fn watch_kind(client: Client, index: usize, kind: Kind, store: Arc<Store>, errors: Family<KindLabels, Counter>) {
    let resource = kind.resource();
    let mut config = watcher::Config::default().any_semantic();
    // kube-rs leaves `resourceVersion=0` out of paged lists, and the API
    // server serves `resourceVersion=0` from its watch cache whole anyway.
    config.page_size = None;
    let api: Api<DynamicObject> = match &kind.scope {
        Scope::Cluster => Api::all_with(client, &resource),
        Scope::Namespace(ns) => Api::namespaced_with(client, ns, &resource),
        Scope::Object { namespace, name } => {
            config = config.fields(&format!("metadata.name={name}"));
            Api::namespaced_with(client, namespace, &resource)
        }
    };
    let label = KindLabels { kind: kind.label() };
    let mut events = watcher(api, config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => store.apply(index, &kind, event),
            Err(e) => {
                errors.get_or_create(&label).inc();
                tracing::warn!(kind = %label.kind, error = %e, "Kubernetes watch failed; the last objects keep serving, retrying with backoff");
            }
        }
    }
}
