//! Configuration (Istio's Galley role): reading Kubernetes-shaped YAML from a file
//! or a directory, and validating it into one immutable [`State`] snapshot.
//!
//! Every problem is reported as a [`ConfigError`] naming the file, the object
//! (`Kind namespace/name`) and the field path, so an operator can fix it without
//! guessing. Loading never stops at the first problem: all are reported at once.
use std::{fmt, path::Path};

use crate::state::State;

mod gateway;
pub mod k8s;
mod load;
mod networking;
mod security;
mod service_entry;
mod validate;

pub use load::{Document, Origin, read_documents};
pub use networking::MESH;

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

/// The result of a successful load: the state, and notes about objects that were
/// skipped on purpose (kinds the agent does not use).
#[derive(Debug)]
pub struct Loaded {
    pub state: State,
    pub notes: Vec<String>,
}

/// Reads and validates everything under `path` (a file, or a directory whose
/// `*.yaml`/`*.yml`/`*.json` files are read in name order).
/// Pod identities are in `trust_domain`.
pub fn load(path: &Path, trust_domain: &str) -> Result<Loaded, ConfigErrors> {
    let (docs, mut errors) = read_documents(path)?;
    match validate::build_state(&docs, trust_domain) {
        Ok(loaded) if errors.is_empty() => Ok(loaded),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(more) => {
            errors.extend(more.0);
            // Stable: keeps each file's errors in document order.
            errors.sort_by(|a, b| (&a.origin.file, a.origin.document).cmp(&(&b.origin.file, b.origin.document)));
            Err(ConfigErrors(errors))
        }
    }
}

/// Validates documents that were already read (used by tests and by the watcher).
pub fn load_documents(docs: &[Document], trust_domain: &str) -> Result<Loaded, ConfigErrors> {
    validate::build_state(docs, trust_domain)
}

/// A validated state from YAML text (for unit tests of the decisions made on it).
#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
pub(crate) fn state_from_yaml(yaml: &str) -> State {
    let file: std::sync::Arc<Path> = Path::new("test.yaml").into();
    let (mut docs, mut errors) = (Vec::new(), Vec::new());
    load::parse_text(&file, yaml, &mut docs, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    load_documents(&docs, crate::state::DEFAULT_TRUST_DOMAIN).unwrap().state
}
