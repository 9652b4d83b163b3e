//! `lab`: the programs that drive the real agent on a cluster built from
//! network namespaces, outside the test suite. `cargo xtask demo|bench|scale`
//! runs them; they live here, beside the harness they are built on, so that
//! xtask itself compiles without the agent (and so without the eBPF toolchain
//! that `cargo xtask setup` installs).
//!
//! - `demo`: the whole pattern on two nodes (mesh, ingress, egress, policy).
//! - `bench`: the mesh against a direct connection (see `bench.rs`).
//! - `scale`: the model built from a synthetic large cluster.
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod scale;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "The demo, the benchmark and the scale run (as `cargo xtask <task>`)")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the demo (as root): two nodes, test → helloworld over mTLS, STRICT and authorization.
    Demo {
        /// Leave everything running and print how to poke at it.
        #[arg(long)]
        keep: bool,
    },
    /// Measure the mesh against a direct connection (as root; not part of the tests).
    Bench {
        /// A short run for development: 2 s windows, one round.
        #[arg(long)]
        quick: bool,
        /// Only these scenarios (comma-separated: tcp_1_stream, http1_1000rps,
        /// idle, …); the rest are skipped.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Record the agents with `perf record -g` during the mesh windows
        /// (written to target/bench/perf.data).
        #[arg(long)]
        perf: bool,
        /// Seconds per measurement window (default 10, 2 with --quick).
        #[arg(long)]
        secs: Option<u64>,
        /// Rounds of direct and mesh windows (default 3, 1 with --quick).
        #[arg(long)]
        rounds: Option<usize>,
        /// More arguments for the agents, e.g. `--agent-args="--worker-threads 1"`.
        #[arg(long, allow_hyphen_values = true)]
        agent_args: Option<String>,
        /// Measure nothing: draw the runs' `latest.json` files (`FILE` or
        /// `FILE=NAME`, repeated; the first is the baseline) as one SVG.
        #[arg(long, value_name = "FILE[=NAME]")]
        chart: Vec<String>,
        /// Where `--chart` writes (default target/bench/chart.svg).
        #[arg(long, requires = "chart")]
        chart_out: Option<std::path::PathBuf>,
    },
    /// Build the model from a synthetic large cluster and report time and memory.
    Scale {
        #[arg(long, default_value_t = 100_000)]
        pods: usize,
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        /// Through the agent's Kubernetes source (a stand-in API server on
        /// loopback) instead of YAML; also times one rebuild.
        #[arg(long)]
        kubernetes: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Demo { keep } => demo::run(keep),
        Task::Bench { quick, only, perf, secs, rounds, agent_args, chart, chart_out } => {
            let agent_args = agent_args.map(|a| a.split_whitespace().map(String::from).collect()).unwrap_or_default();
            let charts = chart;
            bench::run(bench::Options { quick, only, perf, secs, rounds, agent_args, charts, chart_out })
        }
        Task::Scale { pods, services, kubernetes } => scale::run(pods, services, kubernetes),
    }
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

fn workspace_root() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    Ok(dir.parent().context("tests/ has no parent directory")?.to_path_buf())
}
