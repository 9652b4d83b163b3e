//! `cargo xtask image`: an OCI image archive built from nothing on this
//! machine (no base image, no registry, no container engine): the release
//! agent binary and exactly the shared libraries it loads (`ldd`), in one
//! uncompressed layer with fixed owners and times, so the same binary gives
//! the same image digest. The archive is an OCI image layout with Docker's
//! `manifest.json` beside it (as `docker save` writes them), so that
//! `ctr images import`, `kind load image-archive`, `docker load` and
//! `skopeo` all read it; skopeo checks it before the path is printed.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use serde_json::json;

use crate::{run, workspace_root};

/// The image reference the archive carries (deploy/ names `mesh-agent`, tag set by kustomize).
const NAME: &str = "docker.io/library/mesh-agent";
const ENTRYPOINT: &str = "/usr/local/bin/mesh-agent";
/// The CNI plugin, copied onto each node by the DaemonSet's init container:
/// linked statically, as it runs on the host, whatever its C library.
const CNI: &str = "/usr/local/bin/mesh-cni";
/// The host's nftables command (`cargo xtask setup` installs it).
const NFT: &str = "/usr/sbin/nft";

pub fn build() -> anyhow::Result<()> {
    let root = workspace_root()?;
    // The agent as `cargo xtask release` builds it: with the data path's profile.
    let binary = crate::pgo::release()?;
    run(Command::new("cargo")
        .args(["rustc", "--release", "-p", "mesh-cni", "--bin", "mesh-cni", "--", "-C", "target-feature=+crt-static"])
        .current_dir(&root))?;
    let version = env!("CARGO_PKG_VERSION");
    let out = root.join("target/image");
    let rootfs = out.join("rootfs");
    let layout = out.join("layout");
    for dir in [&rootfs, &layout] {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
    }
    // The file system: the binary and its libraries at the paths it loads them from.
    place(&binary, &rootfs, Path::new(ENTRYPOINT))?;
    // Debug information stays in target/ (the release profile keeps it for perf).
    run(Command::new("strip").arg("--strip-debug").arg(rootfs.join(&ENTRYPOINT[1..])))?;
    place(&root.join("target/release/mesh-cni"), &rootfs, Path::new(CNI))?;
    run(Command::new("strip").arg("--strip-debug").arg(rootfs.join(&CNI[1..])))?;
    // `nft`, with which the agent installs its nftables table (the notrack
    // rule for DNAT'd flows and the gate for pods not captured yet).
    let nft = Path::new(NFT);
    place(nft, &rootfs, Path::new("/usr/local/bin/nft"))?;
    for lib in libraries(nft)? {
        place(&lib, &rootfs, &lib)?;
    }
    for lib in libraries(&binary)? {
        place(&lib, &rootfs, &lib)?;
    }
    // Nothing else is needed: the binary starts in the bare file system.
    if is_root() {
        let out = Command::new("chroot").arg(&rootfs).args([ENTRYPOINT, "version"]).output()?;
        if !out.status.success() {
            bail!("the image's file system cannot run the agent: {}", String::from_utf8_lossy(&out.stderr));
        }
        eprintln!("in the image's file system: {}", String::from_utf8_lossy(&out.stdout).trim());
        let out = Command::new("chroot").arg(&rootfs).args(["/usr/local/bin/nft", "--version"]).output()?;
        if !out.status.success() {
            bail!("the image's file system cannot run nft: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    std::fs::create_dir_all(rootfs.join("tmp"))?;
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let layer_tar = out.join("layer.tar");
    run(Command::new("tar")
        .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "--format=posix"])
        .args(["--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime", "-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer_tar)
        .arg("."))?;
    let layer = blob(&blobs, &std::fs::read(&layer_tar)?)?;
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Entrypoint": [ENTRYPOINT], "Env": ["PATH=/usr/local/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer.0]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask image"}],
    });
    let config = blob(&blobs, config.to_string().as_bytes())?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer.0, "size": layer.1}],
    });
    let manifest = blob(&blobs, manifest.to_string().as_bytes())?;
    let reference = format!("{NAME}:{version}");
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest.0,
            "size": manifest.1,
            "annotations": {"io.containerd.image.name": reference, "org.opencontainers.image.ref.name": version},
        }],
    });
    std::fs::write(layout.join("index.json"), index.to_string())?;
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let hex = |d: &str| d.trim_start_matches("sha256:").to_owned();
    let docker = json!([{
        "Config": format!("blobs/sha256/{}", hex(&config.0)),
        "RepoTags": [format!("mesh-agent:{version}")],
        "Layers": [format!("blobs/sha256/{}", hex(&layer.0))],
    }]);
    std::fs::write(layout.join("manifest.json"), docker.to_string())?;
    let archive = out.join(format!("mesh-agent-{version}.tar"));
    run(Command::new("tar")
        .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg("."))?;
    check(&archive)?;
    println!("{}", archive.display());
    eprintln!("image {reference} ({} MiB), manifest {}", std::fs::metadata(&archive)?.len() >> 20, manifest.0);
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Copies `from` (following links) to `at` inside `rootfs`.
fn place(from: &Path, rootfs: &Path, at: &Path) -> anyhow::Result<()> {
    let to = rootfs.join(at.strip_prefix("/").unwrap_or(at));
    std::fs::create_dir_all(to.parent().context("a parent directory")?)?;
    std::fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

/// The shared objects `binary` loads, as `ldd` resolves them (the loader included).
fn libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().context("ldd")?;
    if !out.status.success() {
        bail!("ldd {}: {}", binary.display(), String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let libs: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            let path = l.split("=>").nth(1).unwrap_or(l).split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    if !libs.iter().any(|l| l.to_string_lossy().contains("ld-linux")) {
        bail!("ldd named no dynamic loader for {}:\n{text}", binary.display());
    }
    Ok(libs)
}

/// Writes `data` as a content-addressed blob; its digest and size.
fn blob(dir: &Path, data: &[u8]) -> anyhow::Result<(String, usize)> {
    let tmp = dir.join("incoming");
    std::fs::write(&tmp, data)?;
    let out = Command::new("sha256sum").arg(&tmp).output().context("sha256sum")?;
    let hex = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned();
    if hex.len() != 64 {
        bail!("sha256sum gave no digest");
    }
    std::fs::rename(&tmp, dir.join(&hex))?;
    Ok((format!("sha256:{hex}"), data.len()))
}

/// An independent reader (skopeo) must accept the archive in both forms.
fn check(archive: &Path) -> anyhow::Result<()> {
    for transport in ["oci-archive", "docker-archive"] {
        let out = Command::new("skopeo")
            .args(["inspect", "--config"])
            .arg(format!("{transport}:{}", archive.display()))
            .output()
            .context("skopeo (`cargo xtask setup` installs it)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !text.contains(ENTRYPOINT) {
            bail!(
                "skopeo cannot read {transport}:{}: {}{text}",
                archive.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    eprintln!("skopeo reads the archive as an OCI and a Docker archive");
    Ok(())
}
