//! `cargo xtask <task>`: everything a developer or CI needs beyond cargo itself.
//!
//! - `setup`: install what is missing (Debian packages, nightly rust-src,
//!   bpf-linker built against LLVM 22), idempotently.
//! - `build-ebpf`: build the eBPF object alone (the agent's build script embeds it).
//! - `test`: build the agent and run every test; root tests need root.
//! - `demo`, `bench`, `scale`: run `lab` (tests/src/bin/lab), the programs
//!   that drive the agent, kept out of xtask so that xtask builds without the
//!   eBPF toolchain that `setup` installs.
//! - `release`, `pgo`: the release agent built with the checked-in profile
//!   of its data path; recording that profile again (see `pgo.rs`).
//! - `image`, `fuzz`: the OCI image archive; the fuzz targets.
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod image;
mod layout;
mod pgo;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the project needs (as root): Debian packages, rust-src, bpf-linker.
    Setup,
    /// Build the eBPF programs to target/bpfel-unknown-none/release/mesh-ebpf.
    BuildEbpf,
    /// Build the agent and run all tests (netns tests need root).
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the demo (as root): two nodes, test → helloworld over mTLS, STRICT and
    /// authorization (`cargo xtask demo --help` for its options).
    #[command(disable_help_flag = true)]
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure the mesh against a direct connection (as root; not part of the
    /// tests; `cargo xtask bench --help` for its options).
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the release agent with the data path's profile
    /// (mesh-agent/pgo/) to target/<host>/release/mesh-agent.
    Release,
    /// Record that profile again (as root): an instrumented agent carries the
    /// bench's traffic; then `cargo xtask release` builds with it. Records
    /// the layout too.
    Pgo,
    /// Record which functions the release agent runs (as root), for the
    /// linker to lay them out together (mesh-agent/pgo/symbol-order.txt).
    Layout,
    /// Build the OCI image archive target/image/mesh-agent-<version>.tar from
    /// scratch (no base image, no registry), checked with skopeo.
    Image,
    /// Build the model from a synthetic large cluster and report time and
    /// memory (release build; `cargo xtask scale --help` for its options).
    #[command(disable_help_flag = true)]
    Scale {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz the parsers of untrusted input with cargo-fuzz (nightly), each
    /// target for a bounded time; a crash stops with its input saved.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Targets to run (default: all of them).
        targets: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::BuildEbpf => build_ebpf(),
        Task::Test { args } => test(&args),
        Task::Demo { args } => lab(false, "demo", &args, None),
        // Release: the bench's own clients (gRPC streams, TLS handshakes) must
        // not be the bottleneck. It measures the agent that ships (built with
        // the profile), unless MESH_AGENT_BIN names another build.
        Task::Bench { args } => {
            let agent = match std::env::var_os("MESH_AGENT_BIN") {
                Some(_) => None,
                None => Some(pgo::release()?),
            };
            lab(true, "bench", &args, agent.as_deref())
        }
        Task::Fuzz { secs, targets } => fuzz(secs, &targets),
        Task::Scale { args } => lab(true, "scale", &args, None),
        Task::Image => image::build(),
        Task::Release => pgo::release().map(drop),
        Task::Pgo => pgo::record(),
        Task::Layout => layout::record(),
    }
}

/// The fuzz targets (mesh-agent/fuzz/fuzz_targets), each with checked-in seeds.
const FUZZ_TARGETS: [&str; 8] =
    ["config", "sniff", "sni", "hbone_connect", "ca_request", "jwt", "trace_context", "dns"];

fn fuzz(secs: u64, targets: &[String]) -> anyhow::Result<()> {
    if let Some(unknown) = targets.iter().find(|t| !FUZZ_TARGETS.contains(&t.as_str())) {
        bail!("no fuzz target {unknown:?}; there are: {}", FUZZ_TARGETS.join(", "));
    }
    let crate_dir = workspace_root()?.join("mesh-agent");
    let chosen: Vec<&str> = match targets {
        [] => FUZZ_TARGETS.to_vec(),
        some => some.iter().map(String::as_str).collect(),
    };
    for target in chosen {
        eprintln!("fuzz: {target} for {secs} s");
        let corpus = format!("fuzz/corpus/{target}");
        std::fs::create_dir_all(crate_dir.join(&corpus))?;
        run(Command::new("cargo")
            .args(["+nightly", "fuzz", "run", target, &corpus, &format!("fuzz/seeds/{target}")])
            .args(["--", &format!("-max_total_time={secs}"), "-max_len=65536"])
            .current_dir(&crate_dir))
        .with_context(|| {
            format!("fuzz target {target} failed; its input is under mesh-agent/fuzz/artifacts/{target}/")
        })?;
    }
    Ok(())
}

/// The tasks that drive the agent run `lab` (tests/src/bin/lab), which
/// depends on the agent and so on the eBPF toolchain; xtask itself does not,
/// so that `cargo xtask setup` compiles on a machine that has none of it yet.
fn lab(release: bool, task: &str, args: &[String], agent: Option<&std::path::Path>) -> anyhow::Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.args(["run", "--quiet", "--package", "mesh-tests", "--bin", "lab"]);
    if release {
        cmd.args(["--profile", "lab"]);
    }
    if let Some(agent) = agent {
        cmd.env("MESH_AGENT_BIN", agent);
    }
    let status = cmd.arg("--").arg(task).args(args).current_dir(workspace_root()?).status()?;
    // The task's own exit code (a failed demo step, a bad flag's 2) passes through.
    std::process::exit(status.code().unwrap_or(1))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

/// Debian packages: LLVM 22 for bpf-linker; curl and iproute2 for the tests.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "curl",
    "iproute2",
    "tcpdump",
    "openssl",
    // The agent's notrack rule for handed-back packets; the kube-proxy-style
    // DNAT test.
    "nftables",
    // `cargo xtask bench`: bulk TCP, ping-pong, the HTTP upstream, gRPC load.
    "iperf3",
    "sockperf",
    "nginx-light",
    "nghttp2-client",
    // `cargo xtask image`: the OCI archive checked by an independent reader.
    "skopeo",
    // The scrape test: a real Prometheus reading the agents' stats port.
    "prometheus",
    // The DNS proxy tests' client (`dig`, over UDP and TCP).
    "bind9-dnsutils",
];
/// `deploy/` is checked against the API schemas with this PyPI package.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The HTTP load generator of `cargo xtask bench`, from crates.io.
const OHA_VERSION: &str = "1.16.0";
const BPF_LINKER_VERSION: &str = "0.13";

fn setup() -> anyhow::Result<()> {
    let missing: Vec<&str> =
        PACKAGES.iter().copied().filter(|p| !succeeds(Command::new("dpkg").args(["-s", p]))).collect();
    if missing.is_empty() {
        eprintln!("setup: Debian packages present");
    } else {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get").args(["install", "-y", "-q"]).args(&missing))?;
    }
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let components =
        Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]).output()?;
    if String::from_utf8_lossy(&components.stdout).lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: nightly rust-src present");
    } else {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    let have = linker.as_ref().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if have {
        eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} present");
    } else {
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--version", &format!("~{BPF_LINKER_VERSION}")])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    if succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        eprintln!("setup: cargo-fuzz present");
    } else {
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let oha = Command::new("oha").arg("--version").output();
    if oha.as_ref().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(OHA_VERSION)) {
        eprintln!("setup: oha {OHA_VERSION} present");
    } else {
        run(Command::new("cargo").args(["install", "oha", "--locked", "--version", &format!("={OHA_VERSION}")]))?;
    }
    // Run as `python3 -m kubernetes_validate`, by the same interpreter that installed it.
    if succeeds(Command::new("python3").args(["-m", "kubernetes_validate", "--version"])) {
        eprintln!("setup: kubernetes-validate present");
    } else {
        // Debian's own python3 is "externally managed"; this tool stays out of its way.
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "-q",
            "--break-system-packages",
            KUBERNETES_VALIDATE,
        ]))?;
    }
    if !succeeds(Command::new("kubectl").args(["version", "--client"])) {
        // Not in Debian's archive; machines of this kind carry it.
        eprintln!("setup: kubectl missing: `kubectl kustomize deploy/` cannot be checked");
    }
    eprintln!("setup: done");
    Ok(())
}

fn build_ebpf() -> anyhow::Result<()> {
    let root = workspace_root()?;
    run(Command::new("rustup")
        .args(["run", "nightly", "cargo", "build", "--package", "mesh-ebpf", "--bins", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .current_dir(&root)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        // The same flags aya-build passes when mesh-agent's build script builds it.
        .env("CARGO_ENCODED_RUSTFLAGS", "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"))?;
    eprintln!("eBPF object: {}", root.join("target/bpfel-unknown-none/release/mesh-ebpf").display());
    Ok(())
}

fn test(args: &[String]) -> anyhow::Result<()> {
    // The netns tests run the agent binary, which `cargo test` does not build.
    run(Command::new("cargo").args(["build", "--package", "mesh-agent", "--package", "mesh-cni"]))?;
    // Default members: every crate but mesh-ebpf, which only builds for BPF.
    run(Command::new("cargo").arg("test").args(args))
}

fn workspace_root() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    Ok(dir.parent().context("xtask has no parent directory")?.to_path_buf())
}
