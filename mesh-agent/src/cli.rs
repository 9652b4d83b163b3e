//! Command line: `run`, `uninstall`, `ca`, `validate`, `version`. All argument parsing lives here;
//! the rest of the agent takes plain config structs.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    agent::{ConfigSource, IdentityConfig, RemoteCa, RunConfig, RunError},
    ca_server::{CaServiceConfig, CaSource, KubeAuthConfig},
};

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

/// Bounds on what clients and peers can make the agent hold (docs/limits.md).
#[derive(Debug, clap::Args)]
pub struct LimitArgs {
    /// Connections open at once on one listener (capture, 15006, 15008, each gateway port).
    #[arg(long, default_value_t = 65_536)]
    max_connections: usize,
    /// Of those, from one client address.
    #[arg(long, default_value_t = 8_192)]
    max_connections_per_source: usize,
    /// TLS handshakes in progress at once on one listener (15008, HTTPS gateways).
    #[arg(long, default_value_t = 512)]
    max_tls_handshakes: usize,
    /// Of those, from one client address.
    #[arg(long, default_value_t = 64)]
    max_tls_handshakes_per_source: usize,
    /// Time for a client to finish its TLS handshake.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    tls_handshake_timeout: Duration,
    /// Largest HTTP/1 request line and headers, in bytes (Envoy: 60 KiB).
    #[arg(long, default_value_t = 60 * 1024, value_parser = clap::value_parser!(u64).range(8192..=16 << 20))]
    max_request_headers: u64,
    /// Concurrent streams on one client HTTP/2 connection.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    max_http2_streams: u32,
    /// Bytes buffered for one HTTP/2 stream's slow reader before reading upstream stops.
    #[arg(long, default_value_t = 256 * 1024, value_parser = clap::value_parser!(u64).range(16384..=16 << 20))]
    http2_send_buffer: u64,
    /// HTTP/2 keep-alive ping interval on client connections (answered within 20 s).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    http2_keepalive: Duration,
    /// Close a connection with no byte either way for this long (Istio: 1h).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Time for a peer agent to answer an HBONE CONNECT.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    hbone_connect_timeout: Duration,
    /// Time to read a request body the agent keeps for retries or mirroring.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    body_timeout: Duration,
}

impl From<LimitArgs> for crate::proxy::limits::Limits {
    fn from(a: LimitArgs) -> Self {
        crate::proxy::limits::Limits {
            max_connections: a.max_connections.max(1),
            max_connections_per_source: a.max_connections_per_source.max(1),
            max_handshakes: a.max_tls_handshakes.max(1),
            max_handshakes_per_source: a.max_tls_handshakes_per_source.max(1),
            handshake_timeout: a.tls_handshake_timeout,
            max_request_headers: a.max_request_headers as usize,
            max_streams: a.max_http2_streams,
            h2_send_buffer: a.http2_send_buffer as usize,
            keepalive_interval: a.http2_keepalive,
            keepalive_timeout: std::time::Duration::from_secs(20),
            idle_timeout: a.idle_timeout,
            connect_answer_timeout: a.hbone_connect_timeout,
            body_timeout: a.body_timeout,
        }
    }
}

#[derive(Debug, Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once at start; boxing buys nothing")]
pub enum Command {
    /// Capture this node's meshed pods and proxy their traffic (needs root).
    Run {
        /// Kubernetes-shaped YAML: a file, or a directory of *.yaml files. Watched.
        #[arg(long, required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
        config: Option<PathBuf>,
        /// Read configuration from the Kubernetes API server instead (in a
        /// cluster: the pod's service account; outside: $KUBECONFIG).
        #[arg(long)]
        kubernetes: bool,
        /// With --kubernetes: the namespaces whose Secrets the agent reads
        /// (Gateway and DestinationRule credentials), each granted by a Role
        /// there; Secrets are never read cluster-wide.
        #[arg(long, value_delimiter = ',', default_value = "istio-system", requires = "kubernetes")]
        secret_namespaces: Vec<String>,
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
        /// SPIFFE trust domain of workload identities.
        #[arg(long, default_value = crate::state::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Where the embedded CA keeps its root (used when --ca-addr is not given).
        #[arg(long, default_value = "/var/lib/mesh-agent")]
        state_dir: PathBuf,
        /// CA service address (host:port); the agent then holds no CA key.
        #[arg(long, requires_all = ["ca_root", "ca_token_file"])]
        ca_addr: Option<String>,
        /// The mesh root certificate (the CA service's root-cert.pem).
        #[arg(long, requires = "ca_addr")]
        ca_root: Option<PathBuf>,
        /// This node's bootstrap token (the CA service's node-tokens/<node>).
        #[arg(long, requires = "ca_addr")]
        ca_token_file: Option<PathBuf>,
        /// Lifetime of workload certificates; renewed at half life.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        cert_ttl: Duration,
        /// How long to wait for a client's first bytes to tell HTTP from TCP, on
        /// ports that declare no protocol (silence means TCP).
        #[arg(long, default_value = "100ms", value_parser = parse_duration)]
        protocol_detection_timeout: Duration,
        /// JSON access log, one line per request: `off`, `stdout` or a file path.
        #[arg(long, default_value = "stdout")]
        access_log: String,
        /// CA certificates (PEM) trusted, beside the system's, for the HTTPS
        /// servers RequestAuthentications' `jwksUri` names.
        #[arg(long)]
        jwks_ca: Option<PathBuf>,
        /// Directories from which objects outside the root namespace may name
        /// files in TLS settings (DestinationRule `clientCertificate`,
        /// `privateKey`, `caCertificates`, `caCrl`; Gateway `caCrl`). Without
        /// it only istio-system's objects may name files on the node.
        #[arg(long, value_delimiter = ',')]
        tls_files_from: Vec<PathBuf>,
        /// The shortest time between two fetches of one `jwksUri` key set (a
        /// token naming an unknown key fetches it again at most this often).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        jwks_refetch_interval: Duration,
        /// cgroup v2 root whose processes' connects to Service VIPs are captured
        /// (host clients); default: /sys/fs/cgroup, or /sys/fs/cgroup/unified.
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// Leave host-network processes' connections alone.
        #[arg(long, conflicts_with = "cgroup_root")]
        no_host_capture: bool,
        /// The kubelet's cgroup (absolute, or under the cgroup root): its
        /// connections to a local meshed pod on a port that a probe in the
        /// Pod spec names reach it directly, as in Istio ambient; its other
        /// connections and every other node process go through the agent.
        /// Default: system.slice/kubelet.service when it exists; `none`
        /// exempts nothing (probes then obey STRICT).
        #[arg(long, conflicts_with = "no_host_capture")]
        kubelet_cgroup: Option<PathBuf>,
        /// The bits of the packet mark the agent owns (at least two; `0x` for
        /// hexadecimal): its three marks are made of the two lowest. The
        /// default is clear of Cilium's, Calico's, kube-proxy's and the AWS
        /// VPC CNI's bits (docs/limits.md).
        #[arg(long, default_value = "0x30", value_parser = crate::marks::parse_mark_mask)]
        mark_mask: mesh_common::Marks,
        /// BPF file system where capture is pinned (under `mesh-agent/`), so
        /// that it outlives this process and fails closed while no agent
        /// runs; mounted if nothing is. On Kubernetes, the host's.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// On exit (SIGTERM), remove capture from the node as `mesh-agent
        /// uninstall` does, instead of leaving it pinned for the next agent.
        #[arg(long)]
        uninstall_on_exit: bool,
        /// Proxy worker threads; default: half the CPUs this process may use
        /// (affinity and cgroup quota), at least one: the agent shares its
        /// node with the pods it serves, and a thread that sleeps less costs
        /// less per request (`cargo xtask bench` on 2 CPUs: 1 worker used
        /// 25–30 % less CPU per request than 2, at the same saturation).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
        worker_threads: Option<u16>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Run the mesh CA service for a multi-node mesh.
    Ca {
        /// The same configuration the agents read (Nodes and Pods decide who may get which identity).
        #[arg(long, required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
        config: Option<PathBuf>,
        /// Learn pods, nodes and Gateways from the Kubernetes API server, and
        /// authenticate agents by their projected ServiceAccount tokens
        /// (TokenReview) instead of bootstrap tokens.
        #[arg(long)]
        kubernetes: bool,
        /// With --kubernetes: the audience agents' tokens must carry.
        #[arg(long, default_value = "mesh-ca", requires = "kubernetes")]
        token_audience: String,
        /// With --kubernetes: service accounts (`namespace/name`) of node agents.
        #[arg(long, value_delimiter = ',', default_value = "mesh-system/mesh-agent", requires = "kubernetes")]
        trusted_node_accounts: Vec<String>,
        /// Root key and certificate (root-key.pem, root-cert.pem: created on
        /// first start if absent; on Kubernetes, a mounted Secret), node-tokens/.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Address to serve on (Istio's CA port is 15012).
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: SocketAddr,
        #[arg(long, default_value = crate::state::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Longest certificate lifetime granted.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        max_cert_ttl: Duration,
    },
    /// Create a mesh root (root-key.pem, root-cert.pem) in a directory, or
    /// show the one there; for the Secret the CA mounts on Kubernetes.
    CaRoot {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long, default_value = crate::state::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Remove the mesh from this node (run in the node's network namespace):
    /// every pinned program in `--bpffs`, the routing rule, the notrack rule,
    /// and early demux back on. Pods are then reached directly.
    Uninstall {
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
    /// Check configuration files; exit 0 if valid, 1 if not.
    Validate {
        /// Files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, default_value = crate::state::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// As `run --tls-files-from`: directories that objects outside the
        /// root namespace may name files under.
        #[arg(long, value_delimiter = ',')]
        tls_files_from: Vec<PathBuf>,
    },
    /// Print the version.
    Version,
}

/// Parses `250ms`, `10s`, `2m`, `24h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: expected a number with ms, s, m or h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unit must be ms, s, m or h")),
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
        Command::Validate { paths, trust_domain, tls_files_from } => {
            crate::config::allow_files_under(&tls_files_from);
            validate(&paths, &trust_domain)
        }
        Command::Run {
            config,
            kubernetes,
            secret_namespaces,
            node,
            admin_addr,
            connect_timeout,
            drain_timeout,
            resync_interval,
            trust_domain,
            state_dir,
            ca_addr,
            ca_root,
            ca_token_file,
            cert_ttl,
            protocol_detection_timeout,
            access_log,
            jwks_ca,
            tls_files_from,
            jwks_refetch_interval,
            cgroup_root,
            no_host_capture,
            kubelet_cgroup,
            mark_mask,
            bpffs,
            uninstall_on_exit,
            worker_threads,
            limits,
        } => {
            if let Err(msg) = crate::privileges::check() {
                eprintln!("mesh-agent run: {msg}");
                return ExitCode::from(EXIT_NOPERM);
            }
            crate::privileges::raise_fd_limit();
            crate::config::allow_files_under(&tls_files_from);
            crate::marks::set(mark_mask);
            let remote = match (ca_addr, ca_root, ca_token_file) {
                (Some(addr), Some(root), Some(token_file)) => Some(RemoteCa { addr, root, token_file }),
                _ => None,
            };
            let identity = IdentityConfig { trust_domain, state_dir, remote, cert_ttl };
            let source = match (config, kubernetes) {
                (Some(path), false) => ConfigSource::Files(path),
                _ => ConfigSource::Kubernetes { secret_namespaces },
            };
            let cfg = RunConfig {
                source,
                node,
                admin_addr,
                connect_timeout,
                drain_timeout,
                resync_interval,
                identity,
                protocol_detection_timeout,
                access_log,
                jwks_ca,
                jwks_refetch_interval,
                host_cgroup: None,
                kubelet_cgroup: None,
                bpffs,
                uninstall_on_exit,
                limits: limits.into(),
            };
            let cfg = match no_host_capture {
                true => cfg,
                false => {
                    let root = cgroup_root.unwrap_or_else(crate::capture::host::default_cgroup_root);
                    let kubelet = crate::capture::host::kubelet_cgroup(&root, kubelet_cgroup.as_deref());
                    RunConfig { host_cgroup: Some(root), kubelet_cgroup: kubelet, ..cfg }
                }
            };
            run(cfg, worker_threads)
        }
        Command::Uninstall { bpffs } => {
            if let Err(msg) = crate::privileges::check() {
                eprintln!("mesh-agent uninstall: {msg}");
                return ExitCode::from(EXIT_NOPERM);
            }
            let Some(runtime) = runtime() else { return ExitCode::FAILURE };
            match runtime.block_on(crate::capture::Capture::uninstall(&bpffs)) {
                Ok(n) => {
                    println!("mesh removed from this node ({n} pinned links detached)");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mesh-agent uninstall: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ca {
            config,
            kubernetes,
            token_audience,
            trusted_node_accounts,
            ca_dir,
            listen,
            trust_domain,
            max_cert_ttl,
        } => {
            let source = match (config, kubernetes) {
                (Some(path), false) => CaSource::Files(path),
                _ => CaSource::Kubernetes(KubeAuthConfig { audience: token_audience, trusted_node_accounts }),
            };
            let cfg = CaServiceConfig { source, ca_dir, listen, trust_domain, max_ttl: max_cert_ttl };
            run_ca(cfg)
        }
        Command::CaRoot { ca_dir, trust_domain } => {
            match crate::identity::ca::Ca::load_or_create(&ca_dir, &trust_domain) {
                Ok(_) => {
                    let file = |f: &str| ca_dir.join(f).display().to_string();
                    println!(
                        "{}\n{}",
                        file(crate::identity::ca::ROOT_CERT_FILE),
                        file(crate::identity::ca::ROOT_KEY_FILE)
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mesh-agent ca-root: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    threaded_runtime(None)
}

/// The multi-threaded runtime, `workers` threads (default: half the usable CPUs).
fn threaded_runtime(workers: Option<u16>) -> Option<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(usize::from(n));
    } else if let Ok(n) = std::thread::available_parallelism() {
        builder.worker_threads(n.get().div_ceil(2));
    }
    match builder.enable_all().build() {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("mesh-agent: cannot start the async runtime: {e}");
            None
        }
    }
}

fn run_ca(cfg: CaServiceConfig) -> ExitCode {
    let Some(runtime) = runtime() else { return ExitCode::FAILURE };
    match runtime.block_on(crate::ca_server::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(crate::ca_server::CaServiceError::Config(errors)) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            eprintln!("mesh-agent ca: refusing to start with invalid configuration");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("mesh-agent ca: {e}");
            ExitCode::FAILURE
        }
    }
}

fn validate(paths: &[PathBuf], trust_domain: &str) -> ExitCode {
    let mut ok = true;
    for path in paths {
        match crate::config::load(path, trust_domain) {
            Ok(loaded) if !loaded.rejected.is_empty() => {
                ok = false;
                for e in &loaded.rejected {
                    eprintln!("error: {e}");
                }
            }
            Ok(loaded) => {
                for note in &loaded.notes {
                    eprintln!("note: {note}");
                }
                let s = &loaded.state;
                let external = s.services.values().filter(|x| x.external.is_some()).count();
                // Gateways are addressable as Services too; count them once.
                let services = s.services.len() - external - s.gateways.len();
                println!(
                    "{}: valid ({} nodes, {} namespaces, {} pods, {} services, {} PeerAuthentications, {} AuthorizationPolicies, \
                     {} VirtualServices, {} DestinationRules, {} Gateways, {} ServiceEntry hosts)",
                    path.display(),
                    s.nodes.len(),
                    s.namespaces.len(),
                    s.workloads.len(),
                    services,
                    s.peer_authentications.len(),
                    s.authorization_policies.len(),
                    s.virtual_services.len(),
                    s.destination_rules.len(),
                    s.gateways.len(),
                    external,
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

fn run(cfg: RunConfig, workers: Option<u16>) -> ExitCode {
    let Some(runtime) = threaded_runtime(workers) else { return ExitCode::FAILURE };
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
