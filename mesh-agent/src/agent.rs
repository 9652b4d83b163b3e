//! The running agent: loads configuration, binds listeners, starts capture,
//! serves admin, watches the configuration, and on SIGTERM/SIGINT drains and
//! leaves the node exactly as it found it.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::{
    capture::{Attached, Capture, CaptureError, Pending},
    config::{self, ConfigErrors},
    identity::{CertManager, IdentityError, ca, ca_service, manager::CertSource},
    proxy::inputs::Inputs,
    telemetry::ResultLabels,
};

mod admin;
pub mod cni;
pub mod handover;
mod listeners;
mod serve;
mod source;

use listeners::Acquired;

pub use source::ConfigSource;
use source::Source;

/// The operator's CA file for `jwksUri` servers (`--jwks-ca`), read at
/// start, so that a file that does not load stops the agent there.
fn jwks_extra_roots(extra: Option<&std::path::Path>) -> Result<Option<rustls::RootCertStore>, RunError> {
    let Some(path) = extra else { return Ok(None) };
    let fail = |message: String| RunError::JwksCa { path: path.display().to_string(), message };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    crate::identity::ca::roots_from_pem(&text).map(Some).map_err(fail)
}

/// The system's CAs and `extra`: what a `jwksUri`'s server certificate is
/// checked against. Read on the first fetch of a key set, not at start.
fn jwks_roots(extra: Option<rustls::RootCertStore>) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(error = %e, "system CA certificates");
    }
    roots.add_parsable_certificates(native.certs);
    roots.roots.extend(extra.into_iter().flat_map(|extra| extra.roots));
    roots
}

/// Settings of `mesh-agent run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub source: ConfigSource,
    pub node: String,
    pub admin_addr: SocketAddr,
    /// The stats port (`/metrics`, `/stats/prometheus`) for scrapers; `None`: off.
    pub stats_addr: Option<SocketAddr>,
    /// The readiness port (`/healthz/ready`) for the kubelet; `None`: off.
    pub readiness_addr: Option<SocketAddr>,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    /// How often the configuration and the node's interfaces are re-checked.
    pub resync_interval: Duration,
    pub identity: IdentityConfig,
    /// How long to wait for a client's first bytes on ports with no declared protocol.
    pub protocol_detection_timeout: Duration,
    /// `off`, `stdout` or a file path.
    pub access_log: String,
    /// Extra CA certificates for `jwksUri` servers.
    pub jwks_ca: Option<PathBuf>,
    /// The shortest time between two fetches of one key set.
    pub jwks_refetch_interval: Duration,
    /// The cgroup v2 root for host-client capture; `None`: not captured.
    pub host_cgroup: Option<PathBuf>,
    /// The kubelet's cgroup, whose connections to local meshed pods go directly.
    pub kubelet_cgroup: Option<PathBuf>,
    /// Where capture is pinned.
    pub bpffs: PathBuf,
    /// Remove capture at exit instead of leaving it pinned.
    pub uninstall_on_exit: bool,
    /// The node's pod ranges, over the Node's `spec.podCIDRs` (see `capture::gate`).
    pub pod_cidrs: Vec<crate::state::security::Cidr>,
    /// Bounds on what clients and peers can make the agent hold.
    pub limits: crate::proxy::limits::Limits,
    /// How ServiceEntry names are resolved.
    pub dns: DnsConfig,
}

/// The node's resolvers, and how their answers are used.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    pub resolv_conf: PathBuf,
    pub settings: crate::dns::Settings,
    /// Meshed pods' DNS answered by the agent (each pod may opt out); `None`: not captured.
    pub proxy: Option<crate::dns::proxy::ProxySettings>,
}

/// The ServiceEntry resolver, asking the resolvers `resolv.conf` names (or,
/// when it cannot be read, failing each lookup with why: the agent still
/// serves everything else).
fn dns_resolver(cfg: &DnsConfig, metrics: &crate::telemetry::Metrics) -> Arc<crate::dns::Resolver> {
    let lookup: Arc<dyn crate::dns::Lookup> = match crate::dns::upstream::Upstream::from_resolv_conf(
        &cfg.resolv_conf,
        &cfg.settings,
    ) {
        Ok(u) => Arc::new(u),
        Err(e) => {
            tracing::warn!(error = %e, "no DNS resolver: ServiceEntries with resolution DNS have only their listed addresses");
            Arc::new(crate::dns::upstream::Unavailable(e))
        }
    };
    crate::dns::Resolver::new(lookup, cfg.settings.clone(), metrics.dns_resolutions.clone())
}

/// Where workload certificates come from.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub trust_domain: String,
    /// The embedded CA's directory (used without `remote`).
    pub state_dir: PathBuf,
    pub remote: Option<RemoteCa>,
    pub cert_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct RemoteCa {
    pub addr: String,
    pub root: PathBuf,
    pub token_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration:\n{0}")]
    Config(#[from] ConfigErrors),
    #[error("Kubernetes: {0}")]
    Kubernetes(#[from] crate::discovery::DiscoveryError),
    #[error("binding {what} on {addr}: {source} (is another mesh-agent running in this network namespace?)")]
    Bind { what: &'static str, addr: String, source: std::io::Error },
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("TLS settings: {0}")]
    Tls(#[from] rustls::Error),
    #[error("access log {path}: {source}")]
    AccessLog { path: String, source: std::io::Error },
    #[error("--jwks-ca {path}: {message}")]
    JwksCa { path: String, message: String },
}

/// What the admin server shows about capture.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CaptureStatus {
    pub attached: Vec<Attached>,
    pub pending: Vec<Pending>,
    pub ebpf_counters: std::collections::BTreeMap<&'static str, u64>,
}

/// The agent: the data path's inputs, and its own status for the admin server.
pub struct Context {
    /// What the data path runs on (it never sees the rest of this).
    pub inputs: Arc<Inputs>,
    /// Where configuration comes from (a path, or `kubernetes`).
    pub source: String,
    capture: RwLock<CaptureStatus>,
    gateway_status: RwLock<Vec<crate::proxy::gateway::PortStatus>>,
    gateway_conflicts: RwLock<Vec<crate::proxy::gateway::Conflict>>,
    last_config_error: RwLock<Option<String>>,
    ready: AtomicBool,
}

impl Context {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn capture(&self) -> CaptureStatus {
        self.capture.read().map(|c| c.clone()).unwrap_or_default()
    }

    /// The gateway ports of this node and whether they are open.
    pub fn gateway_status(&self) -> Vec<crate::proxy::gateway::PortStatus> {
        self.gateway_status.read().map(|g| g.clone()).unwrap_or_default()
    }

    /// Gateway servers left out of this node's listeners, and why.
    pub fn gateway_conflicts(&self) -> Vec<crate::proxy::gateway::Conflict> {
        self.gateway_conflicts.read().map(|g| g.clone()).unwrap_or_default()
    }

    fn reconcile_gateways(&self, gateways: &mut crate::proxy::gateway::Listeners) {
        gateways.reconcile(&self.inputs);
        if let Ok(mut g) = self.gateway_status.write() {
            *g = gateways.status();
        }
        if let Ok(mut c) = self.gateway_conflicts.write() {
            *c = gateways.conflicts();
        }
    }

    /// Logs and shows the objects the configuration now applied rejected.
    fn record_rejected(&self, rejected: &[config::ConfigError]) {
        for e in rejected {
            tracing::error!("object rejected, the rest of the configuration applies: {e}");
        }
        self.inputs.metrics.config_objects_rejected.set(rejected.len() as i64);
        if let Ok(mut last) = self.last_config_error.write() {
            *last = (!rejected.is_empty()).then(|| config::ConfigErrors(rejected.to_vec()).to_string());
        }
    }

    pub fn last_config_error(&self) -> Option<String> {
        self.last_config_error.read().ok().and_then(|e| e.clone())
    }

    fn publish_capture(&self, capture: &Capture) {
        let totals = capture.counters();
        self.inputs.metrics.update_ebpf(&totals);
        self.inputs.set_captured(capture.attached().values().map(|a| a.pod_ip).collect(), capture.gated().collect());
        if let Ok(mut c) = self.capture.write() {
            *c = CaptureStatus {
                attached: capture.attached().values().cloned().collect(),
                pending: capture.pending.clone(),
                ebpf_counters: mesh_common::counter::NAMES.iter().copied().zip(totals).collect(),
            };
        }
    }
}

/// Runs until SIGTERM or SIGINT, then drains and cleans up.
pub async fn run(cfg: RunConfig) -> Result<(), RunError> {
    // Configuration is loaded and validated before any port is bound; from
    // the API server, once every kind has been listed.
    let metrics = crate::telemetry::Metrics::new();
    let (mut source, loaded) = Source::start(&cfg.source, &cfg.identity.trust_domain, &metrics).await?;
    for note in &loaded.notes {
        tracing::info!("{note}");
    }
    if !loaded.state.nodes.is_empty() && !loaded.state.nodes.contains_key(cfg.node.as_str()) {
        tracing::warn!(node = %cfg.node, "no Node object with this name in the configuration");
    }
    if cfg.identity.remote.is_none() && loaded.state.nodes.len() > 1 {
        tracing::warn!(
            nodes = loaded.state.nodes.len(),
            "embedded CA with several Nodes: each agent has its own root, so cross-node mTLS will fail; \
             run `mesh-agent ca` and start the agents with --ca-addr"
        );
    }
    let certs = Arc::new(cert_manager(&cfg.identity)?);
    let access_log = crate::telemetry::access_log::AccessLog::open(&cfg.access_log)
        .map_err(|source| RunError::AccessLog { path: cfg.access_log.clone(), source })?;
    let jwks_extra = jwks_extra_roots(cfg.jwks_ca.as_deref())?;
    let dns = dns_resolver(&cfg.dns, &metrics);
    let inputs = Arc::new(Inputs::new(crate::proxy::inputs::Settings {
        dns,
        node: cfg.node.clone(),
        connect_timeout: cfg.connect_timeout,
        protocol_detection_timeout: cfg.protocol_detection_timeout,
        certs,
        access_log,
        state: loaded.state,
        limits: cfg.limits.clone(),
        metrics,
        jwks: Arc::new(crate::identity::jwt::jwks::JwksCache::with_min_refetch(
            move || jwks_roots(jwks_extra),
            cfg.jwks_refetch_interval,
        )),
    }));
    let ctx = Arc::new(Context {
        inputs,
        source: cfg.source.describe(),
        capture: RwLock::default(),
        gateway_status: RwLock::default(),
        gateway_conflicts: RwLock::default(),
        last_config_error: RwLock::default(),
        ready: AtomicBool::new(false),
    });
    ctx.inputs.metrics.config_loads.get_or_create(&ResultLabels { result: "success" }).inc();
    ctx.record_rejected(&loaded.rejected);

    let Acquired { outbound, inbound, hbone, admin, mut handover } = listeners::acquire(&cfg).await?;
    let certs = &ctx.inputs.certs;
    // The previous agent's certificates: the CA is not asked again for them.
    if let Some(inherited) = &mut handover.inherited {
        let frame = inherited.take_certs();
        let taken = certs.adopt(handover::decode_certs(&frame));
        tracing::info!(certificates = taken, "took the previous agent's workload certificates");
    }
    let tls = crate::identity::tls::server_config(certs.roots(), certs.clone(), true, &[b"h2"])?;
    let sockets = Sockets { outbound, inbound, hbone, hbone_tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)) };
    let mut capture = Capture::start(cfg.host_cgroup.as_deref(), cfg.kubelet_cgroup.as_deref(), &cfg.bpffs).await?;
    capture.pod_cidrs = cfg.pod_cidrs.clone();
    if let Some(orig) = capture.take_host_orig() {
        let _ = ctx.inputs.host_orig.set(orig);
    }
    let dns_task = cfg.dns.proxy.as_ref().and_then(|settings| start_dns_proxy(&cfg.dns, settings, &ctx.inputs));
    capture.dns_capture = dns_task.is_some();
    let result = serve::serve(&cfg, &ctx, sockets, admin, handover, &mut capture, &mut source).await;
    if let Some(t) = dns_task {
        t.abort();
    }
    // Whatever happened: capture stays pinned (fail closed) unless the mesh
    // is leaving the node.
    let cleanup = capture.shutdown(cfg.uninstall_on_exit).await;
    result?;
    cleanup?;
    Ok(())
}

/// The DNS proxy on its socket, forwarding to the resolvers `resolv.conf`
/// names; `None` (pods' DNS then goes to their servers as without the mesh)
/// when the socket cannot be had.
fn start_dns_proxy(
    cfg: &DnsConfig,
    settings: &crate::dns::proxy::ProxySettings,
    inputs: &Arc<Inputs>,
) -> Option<tokio::task::JoinHandle<()>> {
    let socket = crate::dns::proxy::udp::bind()
        .inspect_err(|e| tracing::warn!(error = %e, "no DNS proxy socket: pods' DNS is not captured"))
        .ok()?;
    let text = std::fs::read_to_string(&cfg.resolv_conf).unwrap_or_default();
    let upstreams = crate::dns::upstream::nameservers(&text);
    if upstreams.is_empty() {
        tracing::warn!(resolv_conf = %cfg.resolv_conf.display(), "no IPv4 nameserver: the DNS proxy answers only the mesh's names");
    }
    let m = &inputs.metrics;
    let metrics = crate::dns::proxy::ProxyMetrics {
        requests: m.dns_requests.clone(),
        upstream_requests: m.dns_upstream_requests.clone(),
        upstream_failures: m.dns_upstream_failures.clone(),
        refusals: m.dns_proxy_refusals.clone(),
    };
    let state = inputs.clone();
    let proxy = Arc::new(crate::dns::proxy::DnsProxy::new(
        Box::new(move || state.state()),
        upstreams.clone(),
        settings.clone(),
        metrics,
    ));
    let _ = inputs.dns_proxy.set(proxy.clone());
    tracing::info!(?upstreams, "DNS proxy answering meshed pods' queries");
    Some(tokio::spawn(async move {
        if let Err(e) = crate::dns::proxy::udp::serve(proxy, socket).await {
            tracing::error!(error = %e, "DNS proxy stopped");
        }
    }))
}

/// The data path's bound sockets (15001, 15006, 15008) and the HBONE server's TLS settings.
pub(super) struct Sockets {
    outbound: tokio::net::TcpListener,
    inbound: tokio::net::TcpListener,
    hbone: tokio::net::TcpListener,
    hbone_tls: tokio_rustls::TlsAcceptor,
}

fn cert_manager(cfg: &IdentityConfig) -> Result<CertManager, IdentityError> {
    match &cfg.remote {
        None => {
            let ca = ca::Ca::load_or_create(&cfg.state_dir, &cfg.trust_domain)?;
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.root_der().clone()).map_err(|e| IdentityError::invalid("mesh root", e))?;
            Ok(CertManager::new(CertSource::Embedded(Arc::new(ca)), roots, cfg.cert_ttl))
        }
        Some(remote) => {
            let roots = ca::load_roots(&remote.root)?;
            // Readable now, or the agent does not start; read again for every request.
            ca_service::read_token(&remote.token_file)?;
            let token_file = remote.token_file.clone();
            let client =
                ca_service::CaClient::new(remote.addr.clone(), Arc::new(roots.clone()), token_file, &cfg.trust_domain)?;
            Ok(CertManager::new(CertSource::Remote(client), roots, cfg.cert_ttl))
        }
    }
}
