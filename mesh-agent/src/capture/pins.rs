//! Capture that outlives the agent: every link (TCX on the interfaces, the
//! cgroup hooks) is pinned in bpffs, so a crash, an OOM kill or an upgrade
//! leaves the programs attached. While no agent listens they find no
//! listener and drop new connections to and from meshed pods: the node fails
//! closed. A new agent adopts what is pinned: a TCX link gets the new program
//! in one atomic step (`bpf_link_update`), and pins that the configuration no
//! longer wants are removed after each reconcile. Only `mesh-agent uninstall`
//! (or `run --uninstall-on-exit`) removes them all.
//!
//! Pins are named `tc-ingress-<ifindex>`, `tc-egress-<ifindex>`,
//! `cgroup-connect4` and `cgroup-sockops`, in `<bpffs>/mesh-agent`.
use std::{
    io,
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, PinnedLink};

/// `statfs` magic of a BPF file system.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const DIR: &str = "mesh-agent";
/// Beside the links: maps the agents of a node share across a replacement
/// (what the old agent reads must be what the new programs write).
const MAPS_DIR: &str = "mesh-agent-maps";

/// The pin directory, or none when pinning is impossible (then capture ends
/// with the process, as it did before pinning; logged at start).
#[derive(Debug, Clone)]
pub struct Pins {
    dir: Option<PathBuf>,
}

/// A link this agent holds, pinned under `path` when it could be.
#[derive(Debug)]
pub struct Held {
    _fd: FdLink,
    path: Option<PathBuf>,
}

impl Held {
    /// Detaches: removes the pin, then closes the last descriptor.
    pub fn release(self) {
        if let Some(p) = &self.path
            && let Err(e) = std::fs::remove_file(p)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %p.display(), error = %e, "removing a pinned link");
        }
    }
}

impl Pins {
    /// Opens (and creates) `<bpffs>/mesh-agent`, mounting a BPF file system on
    /// `bpffs` first if none is there.
    pub fn open(bpffs: &Path) -> Self {
        match prepare(bpffs) {
            Ok(dir) => Pins { dir: Some(dir) },
            Err(e) => {
                tracing::warn!(bpffs = %bpffs.display(), error = %e, "capture is not pinned: it ends with this process (pods would be reachable without the mesh until the agent returns)");
                Pins { dir: None }
            }
        }
    }

    /// The pins of a directory, to remove (`mesh-agent uninstall`).
    pub fn existing(bpffs: &Path) -> Self {
        let dir = bpffs.join(DIR);
        Pins { dir: dir.is_dir().then_some(dir) }
    }

    fn path(&self, name: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(name))
    }

    /// Where the map `name` is pinned, to be shared with the next agent (none
    /// when nothing can be pinned: the map is then this process's alone).
    pub fn map_path(&self, name: &str) -> Option<PathBuf> {
        let maps = self.dir.as_ref()?.with_file_name(MAPS_DIR);
        std::fs::create_dir_all(&maps).ok()?;
        Some(maps.join(name))
    }

    /// A pinned link of that name, from an earlier run (its pin stays).
    pub fn adopt(&self, name: &str) -> Option<FdLink> {
        let path = self.path(name)?;
        if !path.exists() {
            return None;
        }
        match PinnedLink::from_pin(&path) {
            Ok(p) => Some(FdLink::from(p)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable pin removed");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Holds `link`, pinned as `name` (an earlier pin of that name is replaced
    /// first, detaching what it held). A pin that fails loses the link (aya's
    /// `pin` takes it): the caller attaches again on its next pass.
    pub fn hold(&self, name: &str, link: FdLink) -> Result<Held, &'static str> {
        let Some(path) = self.path(name) else { return Ok(Held { _fd: link, path: None }) };
        let _ = std::fs::remove_file(&path);
        match link.pin(&path) {
            Ok(pinned) => Ok(Held { _fd: pinned.into(), path: Some(path) }),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "pinning a link failed; will retry");
                Err("pinning the link failed")
            }
        }
    }

    /// Held as `name` if it was pinned already (an adopted link).
    pub fn held(&self, name: &str, link: FdLink) -> Held {
        Held { _fd: link, path: self.path(name) }
    }

    /// Removes a pin (detaching what only it held).
    pub fn remove(&self, name: &str) {
        if let Some(p) = self.path(name) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Names of every pin in the directory.
    pub fn names(&self) -> Vec<String> {
        let Some(dir) = &self.dir else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        entries.filter_map(Result::ok).filter_map(|e| e.file_name().into_string().ok()).collect()
    }

    /// Removes every pin and the directory, and the shared maps: the mesh
    /// leaves the node.
    pub fn remove_all(&self) -> usize {
        let names = self.names();
        for n in &names {
            self.remove(n);
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir(d);
            let maps = d.with_file_name(MAPS_DIR);
            for e in std::fs::read_dir(&maps).into_iter().flatten().flatten() {
                let _ = std::fs::remove_file(e.path());
            }
            let _ = std::fs::remove_dir(maps);
        }
        names.len()
    }
}

fn prepare(bpffs: &Path) -> io::Result<PathBuf> {
    if !is_bpffs(bpffs)? {
        std::fs::create_dir_all(bpffs)?;
        let target = std::ffi::CString::new(bpffs.as_os_str().as_encoded_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: NUL-terminated strings; no data argument.
        let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        tracing::info!(bpffs = %bpffs.display(), "mounted a BPF file system (pins last as long as this mount: give the host's bpffs to survive restarts)");
    }
    let dir = bpffs.join(DIR);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return Ok(false) };
    // SAFETY: zeroed plain struct, filled by statfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid path and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::NotFound { Ok(false) } else { Err(e) };
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}
