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
    .context("building the eBPF programs failed; `cargo xtask setup` installs the nightly toolchain's rust-src and bpf-linker")
}
