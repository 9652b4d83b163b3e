//! Builds the eBPF programs (`mesh-ebpf`) for bpfel-unknown-none with the nightly
//! toolchain and bpf-linker, and leaves the object in OUT_DIR, where `redirect`
//! embeds it with `include_bytes!`. `cargo xtask setup` installs what this needs.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../mesh-ebpf");
    let root = root.to_str().context("mesh-ebpf path is not UTF-8")?;
    let common = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../mesh-common");
    println!("cargo:rerun-if-changed={}", common.display());
    // The release build's profile and code layout (`cargo xtask release`
    // names them in RUSTFLAGS, which cargo compares by name only): a new
    // recording builds the agent again.
    println!("cargo:rerun-if-changed=pgo");
    aya_build::build_ebpf(
        [aya_build::Package { name: "mesh-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs failed; `cargo xtask setup` installs the nightly toolchain's rust-src and bpf-linker")?;
    strip_dwarf(&std::path::Path::new(&std::env::var("OUT_DIR")?).join("mesh-ebpf"))
}

/// Drops the object's DWARF (`llvm-strip -g`), as libbpf-bootstrap's and
/// cilium/ebpf's `bpf2go` builds do: the kernel and aya need the BTF (kept:
/// `.BTF`, `.BTF.ext`), and the debug sections were 215 of the object's 257
/// KiB, embedded in the agent and mapped with it. Without an `llvm-strip`
/// (LLVM 22's comes with `cargo xtask setup`) the object stays whole.
fn strip_dwarf(object: &std::path::Path) -> anyhow::Result<()> {
    let stripped = object.with_extension("stripped");
    for tool in ["llvm-strip", "llvm-strip-22", "/usr/lib/llvm-22/bin/llvm-strip"] {
        let status = std::process::Command::new(tool).arg("-g").arg("-o").arg(&stripped).arg(object).status();
        if status.is_ok_and(|s| s.success()) {
            // A new file in its place: `object` may share its inode with
            // aya-build's own copy.
            std::fs::rename(&stripped, object).context("replacing the eBPF object with its stripped copy")?;
            return Ok(());
        }
    }
    println!("cargo:warning=no llvm-strip: the eBPF object keeps its DWARF (215 KiB more in the agent)");
    Ok(())
}
