//! Command line: `run`, `validate`, `version`. All argument parsing lives here;
//! the rest of the agent takes plain config structs.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

use crate::agent::{RunConfig, RunError};

/// Exit status for invalid configuration (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;
/// Exit status for missing privileges (EX_NOPERM).
pub const EXIT_NOPERM: u8 = 77;

#[derive(Debug, Parser)]
#[command(name = "mesh-agent", about = "Sidecar-less service mesh node agent", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Capture this node's meshed pods and proxy their traffic (needs root).
    Run {
        /// Kubernetes-shaped YAML: a file, or a directory of *.yaml files. Watched.
        #[arg(long)]
        config: PathBuf,
        /// Name of this node (pods are local when `spec.nodeName` matches).
        #[arg(long)]
        node: String,
        /// Admin server address (/ready, /metrics, /config_dump).
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin_addr: SocketAddr,
        /// Upstream connect timeout, e.g. `10s` or `500ms`.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        connect_timeout: Duration,
        /// How long to wait for live connections on SIGTERM before closing them.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        drain_timeout: Duration,
        /// How often configuration and interfaces are re-checked.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        resync_interval: Duration,
    },
    /// Check configuration files; exit 0 if valid, 1 if not.
    Validate {
        /// Files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print the version.
    Version,
}

/// Parses `250ms`, `10s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: expected a number with ms, s or m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

pub fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("mesh-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Validate { paths } => validate(&paths),
        Command::Run { config, node, admin_addr, connect_timeout, drain_timeout, resync_interval } => {
            if let Err(msg) = crate::privileges::check() {
                eprintln!("mesh-agent run: {msg}");
                return ExitCode::from(EXIT_NOPERM);
            }
            let cfg =
                RunConfig { config_path: config, node, admin_addr, connect_timeout, drain_timeout, resync_interval };
            run(cfg)
        }
    }
}

fn validate(paths: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for path in paths {
        match crate::config::load(path) {
            Ok(loaded) => {
                for note in &loaded.notes {
                    eprintln!("note: {note}");
                }
                let s = &loaded.state;
                println!(
                    "{}: valid ({} nodes, {} namespaces, {} pods, {} services)",
                    path.display(),
                    s.nodes.len(),
                    s.namespaces.len(),
                    s.workloads.len(),
                    s.services.len()
                );
            }
            Err(errors) => {
                ok = false;
                for e in &errors.0 {
                    eprintln!("error: {e}");
                }
            }
        }
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn run(cfg: RunConfig) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mesh-agent run: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(crate::agent::run(cfg));
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::Config(errors)) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            eprintln!("mesh-agent run: refusing to start with invalid configuration");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("mesh-agent run: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // netlink-packet-route warns about every attribute newer kernels add.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,netlink_packet_route=error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
