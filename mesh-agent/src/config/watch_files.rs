//! Noticing configuration changes by polling file metadata. Polling (rather than
//! inotify) also sees Kubernetes ConfigMap volume updates, which swap a symlink
//! and are easy for inotify watchers to miss.
use std::{path::Path, time::SystemTime};

/// Paths, sizes, modification times and inodes of the config files.
#[derive(Debug, PartialEq, Eq)]
pub struct Fingerprint(Vec<(std::path::PathBuf, u64, Option<SystemTime>, u64)>);

impl Fingerprint {
    pub fn of(path: &Path) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        let mut entries = Vec::new();
        let mut add = |p: &Path| {
            if let Ok(m) = std::fs::metadata(p) {
                entries.push((p.to_path_buf(), m.len(), m.modified().ok(), m.ino()));
            }
        };
        match std::fs::read_dir(path) {
            Ok(dir) => {
                for entry in dir.flatten() {
                    add(&entry.path());
                }
            }
            Err(_) => add(path),
        }
        entries.sort();
        Self(entries)
    }

    /// Whether the files changed since the last call (or since creation).
    pub fn changed(&mut self, path: &Path) -> bool {
        let now = Self::of(path);
        if now == *self {
            return false;
        }
        *self = now;
        true
    }
}
