//! `cargo xtask layout` (root): records which of the release agent's
//! functions startup and the bench's traffic run, for the linker to pack
//! them together (`mesh-agent/pgo/symbol-order.txt`, read by `cargo xtask
//! release`).
//!
//! A page of code is resident once the agent ran it, and so are its
//! neighbours: the kernel maps the 64 KiB around each faulted page from the
//! page cache (fault-around), and readahead has put the whole binary there.
//! To see only what runs, the agent runs from a file system whose device
//! reads nothing ahead (a loop device with `read_ahead_kb` 0): then exactly
//! the pages it touches enter the page cache, which `mincore` reports, and
//! the functions on them are the list: those of startup (the bench's `idle`)
//! first, then those its traffic adds.
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{pgo, run, workspace_root};

/// The file system the agent runs from, taken down on drop.
struct NoReadahead {
    image: PathBuf,
    device: String,
    mount: PathBuf,
}

impl NoReadahead {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let image = dir.join("fs.img");
        File::create(&image)?.set_len(512 << 20)?;
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))?;
        let out = Command::new("losetup").args(["-f", "--show"]).arg(&image).output()?;
        let device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || device.is_empty() {
            bail!("losetup: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mount = dir.join("mnt");
        let fs = NoReadahead { image, device, mount };
        let name = fs.device.trim_start_matches("/dev/");
        std::fs::write(format!("/sys/block/{name}/queue/read_ahead_kb"), "0")
            .with_context(|| format!("turning readahead off on {}", fs.device))?;
        std::fs::create_dir_all(&fs.mount)?;
        run(Command::new("mount").arg(&fs.device).arg(&fs.mount))?;
        Ok(fs)
    }

    /// Copies `binary` in, with none of its pages cached (the copy's are
    /// dropped by unmounting once).
    fn install(&self, binary: &Path) -> anyhow::Result<PathBuf> {
        let copy = self.mount.join("mesh-agent");
        std::fs::copy(binary, &copy)?;
        run(Command::new("umount").arg(&self.mount))?;
        run(Command::new("mount").arg(&self.device).arg(&self.mount))?;
        Ok(copy)
    }
}

impl Drop for NoReadahead {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Page indexes of `file` in the page cache.
fn cached_pages(file: &Path) -> anyhow::Result<Vec<bool>> {
    use std::os::fd::AsRawFd as _;
    let f = File::open(file)?;
    let len = usize::try_from(f.metadata()?.len())?;
    // SAFETY: a read-only shared mapping of a file we keep open, unmapped
    // before it is dropped; mincore writes one byte per page into `vec`,
    // which has that many.
    unsafe {
        let addr = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        if addr == libc::MAP_FAILED {
            bail!("mmap {}: {}", file.display(), std::io::Error::last_os_error());
        }
        let mut vec = vec![0u8; len.div_ceil(4096)];
        let rc = libc::mincore(addr, len, vec.as_mut_ptr());
        let err = std::io::Error::last_os_error();
        libc::munmap(addr, len);
        if rc != 0 {
            bail!("mincore {}: {err}", file.display());
        }
        Ok(vec.into_iter().map(|b| b & 1 == 1).collect())
    }
}

/// The code segment's virtual address minus its file offset.
fn text_delta(binary: &Path) -> anyhow::Result<u64> {
    let out = Command::new("readelf").args(["-lW"]).arg(binary).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("LOAD") && l.trim_end().ends_with("0x1000") && l.contains(" R E "))
        .context("readelf shows no executable LOAD segment")?;
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16);
    let fields: Vec<&str> = line.split_whitespace().collect();
    Ok(hex(fields[2])? - hex(fields[1])?)
}

/// The functions (mangled) with at least one page in `touched`, in address order.
fn touched_functions(binary: &Path, touched: &[bool]) -> anyhow::Result<Vec<String>> {
    let delta = text_delta(binary)?;
    let out = Command::new("nm").args(["-n", "-S", "--defined-only"]).arg(binary).output()?;
    let mut names = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [addr, size, kind, name] = f[..] else { continue };
        if !matches!(kind, "t" | "T" | "w" | "W") {
            continue;
        }
        let (Ok(addr), Ok(size)) = (u64::from_str_radix(addr, 16), u64::from_str_radix(size, 16)) else { continue };
        let Some(offset) = addr.checked_sub(delta).filter(|_| size > 0) else { continue };
        let pages = offset / 4096..=(offset + size - 1) / 4096;
        if pages.into_iter().any(|p| touched.get(usize::try_from(p).unwrap_or(usize::MAX)) == Some(&true)) {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// `cargo xtask layout`.
pub fn record() -> anyhow::Result<()> {
    let root = workspace_root()?;
    let binary = pgo::release()?;
    let fs = NoReadahead::new(&root.join("target/layout"))?;
    let agent = fs.install(&binary)?;
    // Startup's functions first, then the traffic's: at rest, only the
    // first part is resident.
    let (mut names, mut seen) = (Vec::new(), std::collections::HashSet::new());
    for only in ["idle", pgo::TRAINING] {
        pgo::bench(&root, &agent, 2, only)?;
        let touched = cached_pages(&agent)?;
        for name in touched_functions(&agent, &touched)? {
            if seen.insert(name.clone()) {
                names.push(name);
            }
        }
    }
    drop(fs);
    if names.len() < 1000 {
        bail!("only {} functions were seen running: is the agent's file system the one measured?", names.len());
    }
    std::fs::write(root.join(pgo::ORDER), names.join("\n") + "\n")?;
    eprintln!("layout: {} functions in {}; `cargo xtask release` lays them out together", names.len(), pgo::ORDER);
    Ok(())
}
