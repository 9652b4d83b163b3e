//! Command line: `run`, `uninstall`, `ca`, `ca-root`, `controller`, `inspect`, `validate`, `version`. All argument parsing lives here;
//! the rest of the agent takes plain config structs.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

mod args;
mod inspect;

use args::parse_listen;
pub use args::{DnsArgs, KubeArgs, LimitArgs, Listen, parse_duration};

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
    /// Log lines as `text` or `json` (one object per line).
    #[arg(long, global = true, env = "MESH_LOG_FORMAT", default_value = "text")]
    pub log_format: crate::telemetry::logging::LogFormat,
    /// Log filter (`info`, `debug`, `mesh_agent=debug,info`, …); RUST_LOG,
    /// when set, wins. Changed at run time with `mesh-agent inspect log-level`.
    #[arg(long, global = true, env = "MESH_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

#[derive(Debug, Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once at start; boxing buys nothing")]
pub enum Command {
    /// Capture this node's meshed pods and proxy their traffic (needs root).
    Run {
        /// Kubernetes-shaped YAML: a file, or a directory of *.yaml files. Watched.
        #[arg(long, env = "MESH_CONFIG", required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
        config: Option<PathBuf>,
        /// Read configuration from the Kubernetes API server instead (in a
        /// cluster: the pod's service account; outside: $KUBECONFIG).
        #[arg(long, env = "MESH_KUBERNETES")]
        kubernetes: bool,
        /// With --kubernetes: the namespaces whose Secrets the agent reads
        /// (Gateway and DestinationRule credentials), each granted by a Role
        /// there; Secrets are never read cluster-wide.
        #[arg(
            long,
            env = "MESH_SECRET_NAMESPACES",
            value_delimiter = ',',
            default_value = "istio-system",
            requires = "kubernetes"
        )]
        secret_namespaces: Vec<String>,
        /// Name of this node (pods are local when `spec.nodeName` matches).
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// Admin server address (/config_dump, /connections, /logging, and
        /// the stats and readiness paths); keep it on loopback.
        #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
        admin_addr: SocketAddr,
        /// Stats port for Prometheus (`/metrics`, `/stats/prometheus`), on the
        /// node's addresses as Istio's 15020; `off` to close it.
        #[arg(long, env = "MESH_STATS_ADDR", default_value = "0.0.0.0:15020", value_parser = parse_listen)]
        stats_addr: Listen,
        /// Readiness port for the kubelet (`/healthz/ready`), as Istio's 15021; `off` to close it.
        #[arg(long, env = "MESH_READINESS_ADDR", default_value = "0.0.0.0:15021", value_parser = parse_listen)]
        readiness_addr: Listen,
        #[command(flatten)]
        kube: KubeArgs,
        /// Upstream connect timeout, e.g. `10s` or `500ms`.
        #[arg(long, env = "MESH_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
        connect_timeout: Duration,
        /// How long to wait for live connections on SIGTERM before closing them.
        #[arg(long, env = "MESH_DRAIN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
        drain_timeout: Duration,
        /// How often configuration and interfaces are re-checked.
        #[arg(long, env = "MESH_RESYNC_INTERVAL", default_value = "1s", value_parser = parse_duration)]
        resync_interval: Duration,
        /// SPIFFE trust domain of workload identities.
        #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = crate::state::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Where the embedded CA keeps its root (used when --ca-addr is not given).
        #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/lib/mesh-agent")]
        state_dir: PathBuf,
        /// CA service address (host:port); the agent then holds no CA key.
        #[arg(long, env = "MESH_CA_ADDR", requires_all = ["ca_root", "ca_token_file"])]
        ca_addr: Option<String>,
        /// The mesh root certificate (the CA service's root-cert.pem).
        #[arg(long, env = "MESH_CA_ROOT", requires = "ca_addr")]
        ca_root: Option<PathBuf>,
        /// This node's bootstrap token (the CA service's node-tokens/<node>).
        #[arg(long, env = "MESH_CA_TOKEN_FILE", requires = "ca_addr")]
        ca_token_file: Option<PathBuf>,
        /// Lifetime of workload certificates; renewed at half life.
        #[arg(long, env = "MESH_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
        cert_ttl: Duration,
        /// How long to wait for a client's first bytes to tell HTTP from TCP, on
        /// ports that declare no protocol (silence means TCP).
        #[arg(long, env = "MESH_PROTOCOL_DETECTION_TIMEOUT", default_value = "100ms", value_parser = parse_duration)]
        protocol_detection_timeout: Duration,
        /// Where the access log goes (`off`, `stdout` or a file path) when
        /// MeshConfig names no `accessLogFile`; lines are Envoy's, as Istio
        /// writes them (one per request, two per TCP connection).
        #[arg(long, env = "MESH_ACCESS_LOG", default_value = "stdout")]
        access_log: String,
        /// CA certificates (PEM) trusted, beside the system's, for the HTTPS
        /// servers RequestAuthentications' `jwksUri` names.
        #[arg(long, env = "MESH_JWKS_CA")]
        jwks_ca: Option<PathBuf>,
        /// Directories from which objects outside the root namespace may name
        /// files in TLS settings (DestinationRule `clientCertificate`,
        /// `privateKey`, `caCertificates`, `caCrl`; Gateway `caCrl`). Without
        /// it only istio-system's objects may name files on the node.
        #[arg(long, env = "MESH_TLS_FILES_FROM", value_delimiter = ',')]
        tls_files_from: Vec<PathBuf>,
        /// The shortest time between two fetches of one `jwksUri` key set (a
        /// token naming an unknown key fetches it again at most this often).
        #[arg(long, env = "MESH_JWKS_REFETCH_INTERVAL", default_value = "30s", value_parser = parse_duration)]
        jwks_refetch_interval: Duration,
        /// cgroup v2 root whose processes' connects to Service VIPs are captured
        /// (host clients); default: /sys/fs/cgroup, or /sys/fs/cgroup/unified.
        #[arg(long, env = "MESH_CGROUP_ROOT")]
        cgroup_root: Option<PathBuf>,
        /// Leave host-network processes' connections alone.
        #[arg(long, env = "MESH_NO_HOST_CAPTURE", conflicts_with = "cgroup_root")]
        no_host_capture: bool,
        /// The kubelet's cgroup (absolute, or under the cgroup root): its
        /// connections to a local meshed pod on a port that a probe in the
        /// Pod spec names reach it directly, as in Istio ambient; its other
        /// connections and every other node process go through the agent.
        /// Default: system.slice/kubelet.service when it exists; `none`
        /// exempts nothing (probes then obey STRICT).
        #[arg(long, env = "MESH_KUBELET_CGROUP", conflicts_with = "no_host_capture")]
        kubelet_cgroup: Option<PathBuf>,
        /// The bits of the packet mark the agent owns (at least two; `0x` for
        /// hexadecimal): its three marks are made of the two lowest. The
        /// default is clear of Cilium's, Calico's, kube-proxy's and the AWS
        /// VPC CNI's bits (docs/limits.md).
        #[arg(long, env = "MESH_MARK_MASK", default_value = "0x30", value_parser = crate::marks::parse_mark_mask)]
        mark_mask: mesh_common::Marks,
        /// BPF file system where capture is pinned (under `mesh-agent/`), so
        /// that it outlives this process and fails closed while no agent
        /// runs; mounted if nothing is. On Kubernetes, the host's.
        #[arg(long, env = "MESH_BPFFS", default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// On exit (SIGTERM), remove capture from the node as `mesh-agent
        /// uninstall` does, instead of leaving it pinned for the next agent.
        #[arg(long, env = "MESH_UNINSTALL_ON_EXIT")]
        uninstall_on_exit: bool,
        /// The cluster's name in metrics (`source_cluster`,
        /// `destination_cluster`), as Istio's `global.multiCluster.clusterName`.
        #[arg(long, env = "MESH_CLUSTER_ID", default_value = crate::telemetry::DEFAULT_CLUSTER_ID)]
        cluster_id: String,
        /// This node's pod address ranges, when the Node's `spec.podCIDRs`
        /// does not give them (a CNI with its own IPAM): a pod in them is
        /// gated until its capture is attached. Repeatable.
        #[arg(long = "pod-cidr", env = "MESH_POD_CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
        pod_cidrs: Vec<crate::state::security::Cidr>,
        /// Proxy worker threads; default: half the CPUs this process may use
        /// (affinity and cgroup quota), at least one: the agent shares its
        /// node with the pods it serves, and a thread that sleeps less costs
        /// less per request (`cargo xtask bench` on 2 CPUs: 1 worker used
        /// 25–30 % less CPU per request than 2, at the same saturation).
        #[arg(long, env = "MESH_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
        worker_threads: Option<u16>,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        dns: DnsArgs,
    },
    /// Run the mesh CA service for a multi-node mesh.
    Ca {
        /// The same configuration the agents read (Nodes and Pods decide who may get which identity).
        #[arg(long, env = "MESH_CONFIG", required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
        config: Option<PathBuf>,
        /// Learn pods, nodes and namespaces from the Kubernetes API server, and
        /// authenticate agents by their projected ServiceAccount tokens
        /// (TokenReview) instead of bootstrap tokens.
        #[arg(long, env = "MESH_KUBERNETES")]
        kubernetes: bool,
        /// With --kubernetes: the audience agents' tokens must carry.
        #[arg(long, env = "MESH_TOKEN_AUDIENCE", default_value = "mesh-ca", requires = "kubernetes")]
        token_audience: String,
        /// With --kubernetes: service accounts (`namespace/name`) of node agents.
        #[arg(
            long,
            env = "MESH_TRUSTED_NODE_ACCOUNTS",
            value_delimiter = ',',
            default_value = "mesh-system/mesh-agent",
            requires = "kubernetes"
        )]
        trusted_node_accounts: Vec<String>,
        /// Root key and certificate (root-key.pem, root-cert.pem: created on
        /// first start if absent; on Kubernetes, a mounted Secret), node-tokens/.
        #[arg(long, env = "MESH_CA_DIR")]
        ca_dir: PathBuf,
        /// Address to serve on (Istio's CA port is 15012).
        #[arg(long, env = "MESH_LISTEN", default_value = "0.0.0.0:15012")]
        listen: SocketAddr,
        #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = crate::state::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Longest certificate lifetime granted.
        #[arg(long, env = "MESH_MAX_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
        max_cert_ttl: Duration,
        #[command(flatten)]
        kube: KubeArgs,
    },
    /// Write the Gateway API's status back (GatewayClass, Gateway and route
    /// conditions), as the one writer of the cluster; reads what the agents read.
    Controller {
        /// The namespaces whose Secrets are read (Gateways' certificateRefs),
        /// as the agents' --secret-namespaces.
        #[arg(long, env = "MESH_SECRET_NAMESPACES", value_delimiter = ',', default_value = "istio-system")]
        secret_namespaces: Vec<String>,
        #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = crate::state::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// How often what was written is read back from the API server.
        #[arg(long, env = "MESH_STATUS_RESYNC", default_value = "5m", value_parser = parse_duration)]
        resync: Duration,
        /// Deploy each Gateway API Gateway's pods and LoadBalancer Service
        /// (`<name>-<class>`), as Istio's automated deployment; `false` when
        /// you deploy them (pods labelled gateway.networking.k8s.io/gateway-name).
        #[arg(long, env = "MESH_DEPLOY_GATEWAYS", default_value_t = true, action = clap::ArgAction::Set)]
        deploy_gateways: bool,
        /// The image of deployed gateway pods' one container (it only holds
        /// the pod's address; the node's agent serves the Gateway there).
        #[arg(long, env = "MESH_GATEWAY_IMAGE", default_value = "registry.k8s.io/pause:3.10")]
        gateway_image: String,
        #[command(flatten)]
        kube: KubeArgs,
    },
    /// Look inside a running agent through its admin API, as `istioctl
    /// ztunnel-config` does: on the node, or in the agent's pod with
    /// `kubectl exec` (or a port-forward to 15000).
    Inspect(inspect::InspectArgs),
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

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::telemetry::logging::init(cli.log_format, &cli.log_level);
    match cli.command {
        Command::Inspect(args) => inspect::main(args),
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
            stats_addr,
            readiness_addr,
            kube,
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
            cluster_id,
            pod_cidrs,
            worker_threads,
            limits,
            dns,
        } => {
            if let Err(msg) = crate::privileges::check() {
                eprintln!("mesh-agent run: {msg}");
                return ExitCode::from(EXIT_NOPERM);
            }
            crate::privileges::raise_fd_limit();
            crate::config::allow_files_under(&tls_files_from);
            crate::marks::set(mark_mask);
            crate::telemetry::set_cluster_id(&cluster_id);
            crate::discovery::select_cluster(kube.into());
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
                stats_addr: stats_addr.0,
                readiness_addr: readiness_addr.0,
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
                pod_cidrs,
                limits: limits.into(),
                dns: dns.into(),
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
            kube,
        } => {
            crate::discovery::select_cluster(kube.into());
            let source = match (config, kubernetes) {
                (Some(path), false) => CaSource::Files(path),
                _ => CaSource::Kubernetes(KubeAuthConfig { audience: token_audience, trusted_node_accounts }),
            };
            let cfg = CaServiceConfig { source, ca_dir, listen, trust_domain, max_ttl: max_cert_ttl };
            run_ca(cfg)
        }
        Command::Controller { secret_namespaces, trust_domain, resync, deploy_gateways, gateway_image, kube } => {
            crate::discovery::select_cluster(kube.into());
            let Some(runtime) = runtime() else { return ExitCode::FAILURE };
            let deploy = deploy_gateways.then_some(crate::controller::DeployConfig { image: gateway_image });
            let cfg = crate::controller::ControllerConfig { trust_domain, secret_namespaces, resync, deploy };
            match runtime.block_on(crate::controller::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mesh-agent controller: {e}");
                    ExitCode::FAILURE
                }
            }
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

fn parse_cidr(s: &str) -> Result<crate::state::security::Cidr, String> {
    crate::state::security::Cidr::parse(s)
}
