//! Configuration (Istio's Galley role): reading Kubernetes-shaped YAML from a file
//! or a directory, and validating it into one immutable [`State`] snapshot.
//!
//! Every problem is reported as a [`ConfigError`] naming the file, the object
//! (`Kind namespace/name`) and the field path, so an operator can fix it without
//! guessing. Loading never stops at the first problem: all are reported at once,
//! and objects are admitted one by one: an object with a problem is rejected
//! on its own, everything else applies (security objects fail closed, see
//! `validate`). Objects in, model out, whatever the source.
use std::{fmt, path::Path};

use crate::state::State;

mod credentials;
pub mod duration;
mod gateway;
mod gateway_api;
pub mod k8s;
mod load;
mod mesh_config;
mod networking;
mod object;
mod security;
mod service_entry;
mod telemetry;
mod validate;
pub(crate) mod watch_files;

pub use credentials::allow_files_under;
pub use gateway_api::{
    CONTROLLERS,
    status::{GatewayDeployment, MESH_CONTROLLER, ObjectStatus, condition_summary},
};
pub use load::{Body, Document, LastGood, Origin, read_documents};

/// One problem in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {object}: {field}: {message}")]
pub struct ConfigError {
    /// File and document where the object is.
    pub origin: Origin,
    /// `Kind namespace/name`, or `document` when the object cannot be named.
    pub object: String,
    /// Field path such as `spec.ports[0].targetPort`; `-` for the whole object.
    pub field: String,
    pub message: String,
}

/// All the problems found in one load, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// The result of a load: the state built from every admitted object, notes
/// about objects skipped on purpose (kinds the agent does not use), and the
/// problems of the objects (or documents, or files) that were rejected.
#[derive(Debug)]
pub struct Loaded {
    pub state: State,
    pub notes: Vec<String>,
    pub rejected: Vec<ConfigError>,
    /// The Gateway API objects' statuses, computed for the controller only
    /// ([`load_documents_with_status`]); empty otherwise.
    pub statuses: Vec<ObjectStatus>,
    /// With the statuses: the Gateways of this mesh's classes, to deploy.
    pub gateway_deployments: Vec<GatewayDeployment>,
}

/// Reads and validates everything under `path` (a file, or a directory whose
/// `*.yaml`/`*.yml`/`*.json` files are read in name order), admitting each
/// object that is valid. Pod identities are in `trust_domain`. Fails only
/// when `path` itself cannot be read.
pub fn load(path: &Path, trust_domain: &str) -> Result<Loaded, ConfigErrors> {
    load_keeping(path, trust_domain, &mut LastGood::default())
}

/// As [`load`], where a file that does not parse keeps its version in
/// `last_good` (the agent's and the CA's reloads).
pub fn load_keeping(path: &Path, trust_domain: &str, last_good: &mut LastGood) -> Result<Loaded, ConfigErrors> {
    let (docs, mut errors) = load::read_documents_keeping(path, last_good)?;
    let mut loaded = validate::build_state(&docs, trust_domain);
    errors.append(&mut loaded.rejected);
    // Stable: keeps each file's errors in document order.
    errors.sort_by(|a, b| (&a.origin.file, a.origin.document).cmp(&(&b.origin.file, b.origin.document)));
    loaded.rejected = errors;
    Ok(loaded)
}

/// [`load_keeping`] for a running process's reloads: a bug in validation that
/// some new input reaches (a panic) rejects the reload, so the last good
/// configuration keeps serving, instead of taking the process down.
pub fn reload_guarded(path: &Path, trust_domain: &str, last_good: &mut LastGood) -> Result<Loaded, ConfigErrors> {
    let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut kept = last_good.clone();
        load_keeping(path, trust_domain, &mut kept).map(|l| (l, kept))
    }));
    match attempt {
        Ok(Ok((loaded, kept))) => {
            *last_good = kept;
            Ok(loaded)
        }
        Ok(Err(errors)) => Err(errors),
        Err(_) => {
            tracing::error!(path = %path.display(), "validating the configuration failed inside the process (a bug); keeping the last good one");
            Err(ConfigErrors(vec![ConfigError {
                origin: Origin { file: path.into(), document: 0, item: None },
                object: "file".into(),
                field: "-".into(),
                message: "validating it failed inside the agent (a bug: please report it with the file)".into(),
            }]))
        }
    }
}

/// Validates documents that were already read (used by tests and by the watcher).
pub fn load_documents(docs: &[Document], trust_domain: &str) -> Loaded {
    validate::build_state(docs, trust_domain)
}

/// [`load_documents`] for a running process (the Kubernetes source): a bug
/// in validation that some object reaches (a panic) drops this snapshot, and
/// the last good model keeps serving.
pub fn load_documents_guarded(docs: &[Document], trust_domain: &str) -> Option<Loaded> {
    let attempt = std::panic::catch_unwind(|| load_documents(docs, trust_domain));
    if attempt.is_err() {
        tracing::error!(
            objects = docs.len(),
            "validating the API server's objects failed inside the process (a bug); keeping the last good model"
        );
    }
    attempt.ok()
}

/// As [`load_documents_guarded`], with the status of each Gateway API object
/// of this mesh's classes (the controller's).
pub fn load_documents_with_status(docs: &[Document], trust_domain: &str) -> Option<Loaded> {
    let attempt = std::panic::catch_unwind(|| validate::build_state_with_status(docs, trust_domain));
    if attempt.is_err() {
        tracing::error!(objects = docs.len(), "validating the API server's objects failed inside the process (a bug)");
    }
    attempt.ok()
}

/// The Gateway API statuses YAML text amounts to (for tests and `validate`).
pub fn status_of_text(name: &str, text: &str, trust_domain: &str) -> Vec<ObjectStatus> {
    let file: std::sync::Arc<Path> = Path::new(name).into();
    let (mut docs, mut errors) = (Vec::new(), Vec::new());
    load::parse_text(&file, text, &mut docs, &mut errors);
    validate::build_state_with_status(&docs, trust_domain).statuses
}

/// Loads YAML text as the one file `name` holds: what it admits, with every
/// problem (parse errors first) in `rejected`. For tests and fuzzing: the same
/// path as [`load`] without the file system.
pub fn load_text(name: &str, text: &str, trust_domain: &str) -> Loaded {
    let file: std::sync::Arc<Path> = Path::new(name).into();
    let (mut docs, mut errors) = (Vec::new(), Vec::new());
    load::parse_text(&file, text, &mut docs, &mut errors);
    let mut loaded = load_documents(&docs, trust_domain);
    errors.append(&mut loaded.rejected);
    loaded.rejected = errors;
    loaded
}

/// A validated state from YAML text (for unit tests of the decisions made on it).
#[cfg(test)]
pub(crate) fn state_from_yaml(yaml: &str) -> State {
    let file: std::sync::Arc<Path> = Path::new("test.yaml").into();
    let (mut docs, mut errors) = (Vec::new(), Vec::new());
    load::parse_text(&file, yaml, &mut docs, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    let loaded = load_documents(&docs, crate::state::DEFAULT_TRUST_DOMAIN);
    assert!(loaded.rejected.is_empty(), "{:?}", loaded.rejected);
    loaded.state
}
