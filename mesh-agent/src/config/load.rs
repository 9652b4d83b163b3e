//! Reading files into YAML documents, remembering where each came from.
use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize as _;

use super::{ConfigError, ConfigErrors};

/// Where a document is: file, 1-based document number and first line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub file: Arc<Path>,
    pub document: usize,
    /// Index in `items` when the document is a `kind: List`.
    pub item: Option<usize>,
}

/// The `file` of every object read from the Kubernetes API server.
const API_SERVER: &str = "<api-server>";

impl Origin {
    /// The `n`th object of a snapshot read from the API server (the object
    /// itself is named next to it in every error).
    pub fn api(n: usize) -> Self {
        Origin { file: Path::new(API_SERVER).into(), document: n, item: None }
    }

    fn is_api(&self) -> bool {
        &*self.file == Path::new(API_SERVER)
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_api() {
            return f.write_str("api-server");
        }
        write!(f, "{} (document {}", self.file.display(), self.document)?;
        if let Some(item) = self.item {
            write!(f, ", items[{item}]")?;
        }
        f.write_str(")")
    }
}

/// One document: where it is and what it holds.
#[derive(Debug, Clone)]
pub struct Document {
    pub origin: Origin,
    pub body: Body,
}

/// What a document holds: parsed YAML, or (from the Kubernetes source) a core
/// object the API server has already checked, kept typed: compact, and not
/// parsed again on each rebuild. Shared: a watched object is one value in the
/// store and in every snapshot.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Yaml(Arc<serde_yaml_ng::Value>),
    Node(Arc<super::k8s::Node>),
    Namespace(Arc<super::k8s::Namespace>),
    Pod(Arc<super::k8s::Pod>),
    Service(Arc<super::k8s::Service>),
}

/// Lists the files to read: `path` itself, or the YAML/JSON files directly in
/// the directory (sorted; hidden files such as Kubernetes' `..data` links skipped).
fn config_files(path: &Path) -> Result<Vec<PathBuf>, ConfigErrors> {
    let io_error = |p: &Path, e: std::io::Error| {
        ConfigErrors(vec![ConfigError {
            origin: Origin { file: p.into(), document: 0, item: None },
            object: "file".into(),
            field: "-".into(),
            message: format!("cannot read: {e}"),
        }])
    };
    let meta = std::fs::metadata(path).map_err(|e| io_error(path, e))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| io_error(path, e))? {
        let entry = entry.map_err(|e| io_error(path, e))?;
        let p = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let wanted = [".yaml", ".yml", ".json"].iter().any(|s| name.ends_with(s));
        if wanted && !name.starts_with('.') && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Each file's documents as they last parsed whole. A file that cannot be
/// read or has a YAML syntax error keeps serving its last good version: what
/// follows a syntax error cannot be read at all, and may be a security policy
/// whose loss would open what it closed.
#[derive(Debug, Default, Clone)]
pub struct LastGood(HashMap<Arc<Path>, Vec<Document>>);

/// Reads every document of every config file under `path`, with the problems
/// met on the way (unreadable files, YAML syntax errors with their line), so
/// that the documents that did parse can still be validated and every problem
/// reported at once. Fails outright only when `path` itself cannot be read.
pub fn read_documents(path: &Path) -> Result<(Vec<Document>, Vec<ConfigError>), ConfigErrors> {
    read_documents_keeping(path, &mut LastGood::default())
}

/// As [`read_documents`], a file that does not parse whole replaced by its
/// version in `last_good` (when there is one), which is kept up to date.
pub fn read_documents_keeping(
    path: &Path,
    last_good: &mut LastGood,
) -> Result<(Vec<Document>, Vec<ConfigError>), ConfigErrors> {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    let files = config_files(path)?;
    last_good.0.retain(|f, _| files.iter().any(|p| p.as_path() == &**f));
    for file in files {
        let file: Arc<Path> = file.into();
        let (mut parsed, mut problems) = (Vec::new(), Vec::new());
        match std::fs::read_to_string(&file) {
            Ok(text) => parse_text(&file, &text, &mut parsed, &mut problems),
            Err(e) => problems.push(ConfigError {
                origin: Origin { file: file.clone(), document: 0, item: None },
                object: "file".into(),
                field: "-".into(),
                message: format!("cannot read: {e}"),
            }),
        }
        match last_good.0.get(&file) {
            _ if problems.is_empty() => {
                last_good.0.insert(file, parsed.clone());
                docs.extend(parsed);
            }
            Some(previous) => {
                for p in &mut problems {
                    p.message.push_str(" (the file's last good version still applies)");
                }
                docs.extend(previous.iter().cloned());
            }
            None => docs.extend(parsed),
        }
        errors.extend(problems);
    }
    Ok((docs, errors))
}

/// Splits one file's text into documents, skipping empty ones.
pub(crate) fn parse_text(file: &Arc<Path>, text: &str, docs: &mut Vec<Document>, errors: &mut Vec<ConfigError>) {
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let origin = Origin { file: file.clone(), document: i + 1, item: None };
        match serde_yaml_ng::Value::deserialize(de) {
            Ok(serde_yaml_ng::Value::Null) => {}
            Ok(value) => docs.push(Document { origin, body: Body::Yaml(Arc::new(value)) }),
            Err(e) => {
                errors.push(ConfigError {
                    origin,
                    object: "document".into(),
                    field: "-".into(),
                    message: format!("YAML syntax: {e}"),
                });
                // The parser cannot resynchronise after a syntax error.
                break;
            }
        }
    }
}
