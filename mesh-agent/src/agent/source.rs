//! Where the agent's configuration comes from: files (polled, the embedded
//! default for local use, the demo and the tests) or the Kubernetes API
//! server (watched; `--kubernetes`).
use std::path::PathBuf;

use tokio::sync::mpsc;

use super::RunError;
use crate::{
    config::{self, ConfigErrors, Loaded},
    discovery,
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
                let (mut models, task) = discovery::start(
                    discovery::client().await?,
                    kinds,
                    discovery::Settings::new(trust_domain),
                    counters,
                )
                .await?;
                let first = discovery::first_model(&mut models).await?;
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
