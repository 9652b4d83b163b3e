//! The release agent, optimized with a profile of its own data path
//! (profile-guided optimization, rustc's `-Cprofile-use`), and the task that
//! records that profile again.
//!
//! - `cargo xtask release` builds `target/<host>/release/mesh-agent` with
//!   `mesh-agent/pgo/mesh-agent.profdata` (the image and the Dockerfile ship
//!   that binary). A function changed since the profile was recorded is
//!   compiled as without one; nothing fails.
//! - `cargo xtask pgo` (root) records it: an instrumented agent
//!   (`-Cprofile-generate`) carries the bench's traffic (`lab bench`, the
//!   scenarios in [`TRAINING`]), and `llvm-profdata` merges what it counted;
//!   then `cargo xtask layout` records the order of the functions
//!   ([`ORDER`], `crate::layout`).
//!
//! Both build for the host's target triple explicitly: then `RUSTFLAGS`
//! reach the agent and its dependencies but not build scripts or procedural
//! macros, and the output stays apart from `target/release` (plain
//! `cargo build --release` keeps working, without the profile).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{run, workspace_root};

/// The profile, relative to the workspace root (checked in: recording it
/// needs root and network namespaces, which an image build has not).
const PROFILE: &str = "mesh-agent/pgo/mesh-agent.profdata";

/// The functions the agent runs, in the order the linker lays them out
/// (`--symbol-ordering-file`): what startup and the bench's traffic touch,
/// packed together, so that the kernel's fault-around (64 KiB around each
/// page faulted in) maps code the agent runs rather than code it never
/// does (docs/performance.md, "Code layout"). It replaces LLD's own
/// call-graph order, which the list keeps for the functions in it.
pub(crate) const ORDER: &str = "mesh-agent/pgo/symbol-order.txt";

/// What the instrumented agent carries while it counts: every kind of
/// traffic the bench drives through the mesh, same-node and cross-node
/// (`pods_1000` left out: its resync is the idle path, which `idle` has).
pub(crate) const TRAINING: &str = "idle,tcp_1_stream,tcp_rr_1000mps,http1_1000rps,http1_1000rps_jwt,http1_1000rps_l4dest,\
http1_1000rps_trace1,http1_saturation,http2_1000rps,http2_saturation,new_connections,grpc_unary,grpc_streaming,\
hbone_handshakes,gateway_https,dns_1000qps_mesh";

/// `cargo xtask release`: the agent built with the profile; its path.
pub fn release() -> anyhow::Result<PathBuf> {
    let root = workspace_root()?;
    let profile = root.join(PROFILE);
    let flags = if profile.exists() {
        format!("-Cprofile-use={}", profile.display())
    } else {
        eprintln!("release: no {PROFILE}; building without a profile (`cargo xtask pgo` records one)");
        String::new()
    };
    let order = root.join(ORDER);
    let flags = match order.exists() {
        true => format!(
            "{flags} -Clink-arg=-Wl,--symbol-ordering-file={} -Clink-arg=-Wl,--no-warn-symbol-ordering",
            order.display()
        ),
        false => flags,
    };
    let flags = match glibc_has_relr() {
        true => format!("{flags} -Clink-arg=-Wl,-z,pack-relative-relocs"),
        false => {
            eprintln!("release: glibc before 2.36 here; relocations stay in the long form (RELA)");
            flags
        }
    };
    let host = host_triple()?;
    build(&root, &host, None, &flags)?;
    let binary = root.join("target").join(&host).join("release/mesh-agent");
    eprintln!("release agent: {}", binary.display());
    Ok(binary)
}

/// Whether this machine's glibc applies compact relative relocations
/// (`DT_RELR`, glibc 2.36; the image's Debian 12 has it). The agent is a
/// position-independent executable with 24 000 of them: in the long form
/// (`.rela.dyn`, 24 bytes each) the loader reads 570 KiB of them at start,
/// and they stay resident; packed (`-z pack-relative-relocs`), they take a
/// few KiB. A binary linked so also requires that glibc
/// (`GLIBC_ABI_DT_RELR`), so the flag follows the glibc it is built with.
fn glibc_has_relr() -> bool {
    let Ok(out) = Command::new("getconf").arg("GNU_LIBC_VERSION").output() else { return false };
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.trim().strip_prefix("glibc ").unwrap_or_default();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 36)
}

/// `cargo xtask pgo`: records the profile again (as root).
pub fn record() -> anyhow::Result<()> {
    let root = workspace_root()?;
    let host = host_triple()?;
    let profdata = llvm_profdata()?;
    // Its own target directory: the instrumented build and the release
    // build would otherwise replace each other's artifacts.
    let target_dir = root.join("target/pgo");
    let raw = target_dir.join("raw");
    let _ = std::fs::remove_dir_all(&raw);
    std::fs::create_dir_all(&raw)?;
    build(&root, &host, Some(&target_dir), &format!("-Cprofile-generate={}", raw.display()))?;
    let instrumented = target_dir.join(&host).join("release/mesh-agent");
    bench(&root, &instrumented, 4, TRAINING)?;
    let counted: Vec<PathBuf> = std::fs::read_dir(&raw)?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "profraw"))
        .collect();
    if counted.is_empty() {
        bail!("the instrumented agent wrote no profile under {}: did it exit cleanly?", raw.display());
    }
    // Not sparse: a function that never ran is recorded as such, and is
    // then compiled for size, away from the hot code (a sparse profile, a
    // sixth of the size, leaves such functions unknown: 20.4 MB of code
    // instead of 15.4, and more of it resident).
    if let Some(dir) = root.join(PROFILE).parent() {
        std::fs::create_dir_all(dir)?;
    }
    run(Command::new(&profdata).args(["merge", "-o"]).arg(root.join(PROFILE)).args(&counted))?;
    eprintln!("profile: {PROFILE}");
    // The layout goes with the profile: the functions it names are the
    // optimized build's.
    crate::layout::record()
}

/// One quick round of the bench's `scenarios` (`secs` per window) through
/// `agent`, the bench's own programs built as `cargo xtask bench` builds them.
pub(crate) fn bench(root: &Path, agent: &Path, secs: u32, scenarios: &str) -> anyhow::Result<()> {
    run(Command::new("cargo")
        .args(["run", "--quiet", "--package", "mesh-tests", "--bin", "lab", "--profile", "lab", "--"])
        .args(["bench", "--quick", "--rounds", "1", "--secs", &secs.to_string(), "--only", scenarios])
        .env("MESH_AGENT_BIN", agent)
        .current_dir(root))
}

/// `cargo build --release` of the agent for `host`, with `flags` added to RUSTFLAGS.
fn build(root: &Path, host: &str, target_dir: Option<&Path>, flags: &str) -> anyhow::Result<()> {
    let mut rustflags = std::env::var("RUSTFLAGS").unwrap_or_default();
    if !flags.is_empty() {
        rustflags = format!("{rustflags} {flags}").trim().to_owned();
    }
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "--release", "-p", "mesh-agent", "--bin", "mesh-agent", "--target", host]);
    if let Some(dir) = target_dir {
        cmd.arg("--target-dir").arg(dir);
    }
    run(cmd.env("RUSTFLAGS", rustflags).current_dir(root))
}

/// The target triple rustc builds for by default.
fn host_triple() -> anyhow::Result<String> {
    let out = Command::new("rustc").arg("-vV").output().context("running rustc -vV")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let host = text.lines().find_map(|l| l.strip_prefix("host: ")).context("rustc -vV names no host")?;
    Ok(host.trim().to_owned())
}

/// An `llvm-profdata` whose LLVM is rustc's (a newer one writes a profile
/// rustc cannot read): `llvm-profdata-<major>` (Debian's LLVM, which setup
/// installs for bpf-linker), else `llvm-profdata` of that version.
fn llvm_profdata() -> anyhow::Result<PathBuf> {
    let out = Command::new("rustc").arg("-vV").output().context("running rustc -vV")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let llvm = text.lines().find_map(|l| l.strip_prefix("LLVM version: ")).context("rustc -vV names no LLVM")?;
    let major = llvm.split('.').next().unwrap_or_default().trim().to_owned();
    for candidate in [format!("llvm-profdata-{major}"), "llvm-profdata".to_owned()] {
        let Ok(out) = Command::new(&candidate).arg("--version").output() else { continue };
        let version = String::from_utf8_lossy(&out.stdout);
        if version.contains(&format!("LLVM version {major}.")) {
            return Ok(candidate.into());
        }
    }
    bail!("no llvm-profdata of LLVM {major} (rustc's); `cargo xtask setup` installs llvm-{major}")
}
