//! Where the agent's configuration comes from: files (polled, the embedded
//! default for local use, the demo and the tests) or the Kubernetes API
//! server (watched; `--kubernetes`).
use std::{path::PathBuf, time::Duration};

use tokio::sync::mpsc;

use super::RunError;
use crate::{
    config::{self, ConfigErrors, Loaded},
    discovery::{self, DiscoveryError},
    telemetry::Metrics,
};

/// What `mesh-agent run` reads its configuration from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A file, or a directory of YAML files.
    Files(PathBuf),
    /// The API server; Secrets only in these namespaces.
    Kubernetes { secret_namespaces: Vec<String> },
}

impl ConfigSource {
    /// For logs and `/config_dump`.
    pub fn describe(&self) -> String {
        match self {
            ConfigSource::Files(path) => path.display().to_string(),
            ConfigSource::Kubernetes { .. } => "kubernetes".into(),
        }
    }
}

/// A running source.
pub(super) enum Source {
    Files { path: PathBuf, fingerprint: config::watch_files::Fingerprint, last_good: config::LastGood },
    Kubernetes { models: mpsc::Receiver<Loaded>, task: tokio::task::JoinHandle<()> },
}

impl Source {
    /// Starts the source and gives its first model: the files as they are
    /// now, or the API server's objects once every kind has been listed.
    pub(super) async fn start(
        from: &ConfigSource,
        trust_domain: &str,
        metrics: &Metrics,
    ) -> Result<(Source, Loaded), RunError> {
        match from {
            ConfigSource::Files(path) => {
                let mut last_good = config::LastGood::default();
                let loaded = config::load_keeping(path, trust_domain, &mut last_good)?;
                let fingerprint = config::watch_files::Fingerprint::of(path);
                Ok((Source::Files { path: path.clone(), fingerprint, last_good }, loaded))
            }
            ConfigSource::Kubernetes { secret_namespaces } => {
                let counters = discovery::Counters {
                    watch_errors: metrics.kube_watch_errors.clone(),
                    rebuilds: metrics.kube_rebuilds.clone(),
                };
                let kinds = discovery::agent_kinds(secret_namespaces);
                let (mut models, task) = start_kubernetes(kinds, trust_domain, counters).await?;
                let first = first_model(&mut models).await?;
                Ok((Source::Kubernetes { models, task }, first))
            }
        }
    }

    /// A new model from changed files (checked on each call), if any.
    pub(super) fn poll_files(&mut self, trust_domain: &str) -> Option<Result<Loaded, ConfigErrors>> {
        let Source::Files { path, fingerprint, last_good } = self else { return None };
        fingerprint.changed(path).then(|| config::reload_guarded(path, trust_domain, last_good))
    }

    /// The next model from the API server; never, for files.
    pub(super) async fn next_model(&mut self) -> Loaded {
        match self {
            Source::Kubernetes { models, .. } => match models.recv().await {
                Some(m) => m,
                None => std::future::pending().await,
            },
            Source::Files { .. } => std::future::pending().await,
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Source::Kubernetes { task, .. } = self {
            task.abort();
        }
    }
}

/// Connects (in-cluster or `$KUBECONFIG`), picks the Istio API versions
/// served (retrying while the API server cannot be reached) and starts
/// watching `kinds`.
pub(crate) async fn start_kubernetes(
    mut kinds: Vec<discovery::Kind>,
    trust_domain: &str,
    counters: discovery::Counters,
) -> Result<(mpsc::Receiver<Loaded>, tokio::task::JoinHandle<()>), DiscoveryError> {
    let client = discovery::client().await?;
    let mut backoff = Duration::from_secs(1);
    loop {
        match discovery::resolve_versions(&client, &mut kinds).await {
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
    let settings = discovery::Settings { trust_domain: trust_domain.to_owned(), debounce: Duration::from_millis(100) };
    let task = tokio::spawn(discovery::run(client, kinds, settings, counters, tx));
    Ok((models, task))
}

/// Waits for the first complete model, saying so every 10 s.
pub(crate) async fn first_model(models: &mut mpsc::Receiver<Loaded>) -> Result<Loaded, DiscoveryError> {
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
