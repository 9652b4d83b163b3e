//! The running agent: loads configuration, binds listeners, starts capture,
//! serves admin, watches the configuration, and on SIGTERM/SIGINT drains and
//! leaves the node exactly as it found it.
use std::{
    collections::HashSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::watch;

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
mod source;

use listeners::{Acquired, Handover};

pub use source::ConfigSource;
use source::Source;

/// The roots `jwksUri` servers are checked against: the system's, and the
/// operator's extra CA file (which must load).
fn jwks_roots(extra: Option<&std::path::Path>) -> Result<rustls::RootCertStore, RunError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(error = %e, "system CA certificates");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra {
        let fail = |message: String| RunError::JwksCa { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let extra = crate::identity::ca::roots_from_pem(&text).map_err(fail)?;
        roots.roots.extend(extra.roots);
    }
    Ok(roots)
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

    /// Does what the CNI plugin asked (see [`cni`]) and answers it.
    async fn cni_command(&self, capture: &mut Capture, cmd: cni::Command, node: &str) {
        let (ip, reply) = match cmd {
            cni::Command::Add { pod, ip, reply } => {
                capture.cni_ips.insert(pod, ip);
                (ip, Some(reply))
            }
            cni::Command::Check { ip, reply } => (ip, Some(reply)),
            cni::Command::Del { pod } => {
                capture.cni_ips.remove(&pod);
                (std::net::Ipv4Addr::UNSPECIFIED, None)
            }
        };
        if let Err(e) = capture.reconcile(&self.inputs.state(), node).await {
            tracing::warn!(error = %e, "capture reconcile failed; will retry");
        }
        self.publish_capture(capture);
        if let Some(reply) = reply {
            let _ = reply.send(capture.ready_role(ip));
        }
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
    let access_log = crate::proxy::http::access_log::AccessLog::open(&cfg.access_log)
        .map_err(|source| RunError::AccessLog { path: cfg.access_log.clone(), source })?;
    let inputs = Arc::new(Inputs::new(crate::proxy::inputs::Settings {
        node: cfg.node.clone(),
        connect_timeout: cfg.connect_timeout,
        protocol_detection_timeout: cfg.protocol_detection_timeout,
        certs,
        access_log,
        state: loaded.state,
        limits: cfg.limits.clone(),
        metrics,
        jwks: Arc::new(crate::identity::jwt::jwks::JwksCache::with_min_refetch(
            jwks_roots(cfg.jwks_ca.as_deref())?,
            cfg.jwks_refetch_interval,
        )?),
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
    let result = serve(&cfg, &ctx, sockets, admin, handover, &mut capture, &mut source).await;
    // Whatever happened: capture stays pinned (fail closed) unless the mesh
    // is leaving the node.
    let cleanup = capture.shutdown(cfg.uninstall_on_exit).await;
    result?;
    cleanup?;
    Ok(())
}

/// The data path's bound sockets (15001, 15006, 15008) and the HBONE server's TLS settings.
struct Sockets {
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

/// The identities of this node's meshed pods and gateways: the certificates to hold.
fn wanted_identities(inputs: &Inputs) -> HashSet<Arc<str>> {
    inputs.state().node_identities(&inputs.node)
}

/// Keeps certificates in step with the local pods, renewing at half life.
async fn sync_certificates(inputs: Arc<Inputs>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        inputs.certs.sync(&wanted_identities(&inputs)).await;
    }
}

async fn serve(
    cfg: &RunConfig,
    ctx: &Arc<Context>,
    sockets: Sockets,
    admin: Vec<(admin::Surface, tokio::net::TcpListener)>,
    handover: Handover,
    capture: &mut Capture,
    source: &mut Source,
) -> Result<(), RunError> {
    let inputs = &ctx.inputs;
    // Subscribed before the first reconcile, so that no pod's interface
    // appears unnoticed between the two.
    let mut changes = match crate::capture::netlink::changes() {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "no netlink notifications: new pods are captured at the next resync");
            None
        }
    };
    capture.reconcile(&inputs.state(), &cfg.node).await?;
    ctx.publish_capture(capture);
    // Certificates for the local pods before serving, so that the first
    // connections need not wait for the CA.
    inputs.certs.sync(&wanted_identities(inputs)).await;
    let every = cfg.resync_interval.min(Duration::from_secs(1));
    let certs_task = tokio::spawn(sync_certificates(inputs.clone(), every));
    let (stop_tx, stop_rx) = watch::channel(false);
    let Sockets { outbound, inbound, hbone, hbone_tls } = sockets;
    let offered = listeners::offered(&outbound, &inbound, &hbone, &admin);
    use crate::proxy::Direction;
    let mut gateways = crate::proxy::gateway::Listeners::default();
    ctx.reconcile_gateways(&mut gateways);
    let hop = gateways.tunnel_hop(inputs);
    let tasks = [
        tokio::spawn(crate::proxy::serve(inputs.clone(), outbound, Direction::Outbound, stop_rx.clone())),
        tokio::spawn(crate::proxy::serve(inputs.clone(), inbound, Direction::Inbound, stop_rx.clone())),
        tokio::spawn(crate::proxy::inbound::hbone::serve(inputs.clone(), hbone, hbone_tls, hop, stop_rx)),
    ];
    let admin_tasks: Vec<_> = admin
        .into_iter()
        .map(|(surface, listener)| tokio::spawn(admin::serve(ctx.clone(), listener, surface)))
        .collect();
    ctx.ready.store(true, Ordering::Release);
    tracing::info!(node = %cfg.node, admin = %cfg.admin_addr, pods = capture.attached().len(), "mesh-agent ready");
    if let Some(inherited) = handover.inherited {
        match tokio::task::spawn_blocking(move || inherited.ready()).await {
            Ok(Ok(())) => tracing::info!("took over: the previous agent stops accepting and drains"),
            Ok(Err(e)) => tracing::warn!(error = %e, "the previous agent did not hear that this one is ready"),
            Err(e) => tracing::warn!(error = %e, "handover task failed"),
        }
    }
    // Offered to the next agent only now: until this one accepts, the
    // previous one's offer is the node's.
    let certs = inputs.certs.clone();
    let offer = offered.and_then(|sockets| handover::Offer::bind(&handover.path, sockets));
    let offer = match offer.map(|o| o.with_certs(move || handover::encode_certs(certs.export()))) {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!(error = %e, path = %handover.path.display(), "cannot offer the sockets for a handover; an upgrade will refuse connections");
            None
        }
    };
    // The CNI plugin's questions, once this agent captures (a predecessor
    // answered them until now).
    let mut cni_rx = match std::fs::create_dir_all(&cfg.identity.state_dir)
        .and_then(|()| cni::serve(ctx.clone(), cni::path(&cfg.identity.state_dir), cfg.node.clone()))
    {
        Ok(rx) => Some(rx),
        Err(e) => {
            tracing::warn!(error = %e, dir = %cfg.identity.state_dir.display(), "no socket for the CNI plugin: it will fail new pods on this node");
            None
        }
    };
    let mut handed_over = std::pin::pin!(async {
        match &offer {
            Some(o) => o.handed_over().await,
            None => std::future::pending().await,
        }
    });

    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(CaptureError::Io)?;
    let mut tick = tokio::time::interval(cfg.resync_interval);
    // SIGTERM while a replacement is getting ready (a DaemonSet surge: the
    // kubelet may count the new pod ready from this agent's answer on the
    // shared readiness socket) must not stop accepting before it does.
    let (mut terminating, mut handed) = (false, false);
    let taking_over = || offer.as_ref().is_some_and(handover::Offer::taking_over);
    let mut recheck = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = sigterm.recv(), if !terminating => {
                if taking_over() {
                    tracing::info!("SIGTERM while a replacement takes over: accepting until it is ready");
                    terminating = true;
                    continue;
                }
                tracing::info!("SIGTERM: draining");
                break
            }
            _ = recheck.tick(), if terminating => {
                if !taking_over() {
                    tracing::info!("the replacement gave up: draining");
                    break;
                }
            }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: draining"); break }
            () = &mut handed_over => {
                // The replacement accepts on these sockets now; the admin
                // surfaces are its too (the kubelet asks it about readiness).
                tracing::info!("handed over to the new agent: draining");
                for t in &admin_tasks {
                    t.abort();
                }
                handed = true;
                break;
            }
            Some(n) = async {
                match &mut changes {
                    Some(c) => c.next().await,
                    None => std::future::pending().await,
                }
            } => {
                tracing::trace!(notifications = n, "links or routes changed");
                if let Err(e) = capture.reconcile(&inputs.state(), &cfg.node).await {
                    tracing::warn!(error = %e, "capture reconcile failed; will retry");
                }
                ctx.publish_capture(capture);
            }
            Some(cmd) = async {
                match &mut cni_rx {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                ctx.cni_command(capture, cmd, &cfg.node).await;
            }
            loaded = source.next_model() => {
                apply(ctx, Ok(loaded));
                ctx.reconcile_gateways(&mut gateways);
                if let Err(e) = capture.reconcile(&inputs.state(), &cfg.node).await {
                    tracing::warn!(error = %e, "capture reconcile failed; will retry");
                }
                ctx.publish_capture(capture);
            }
            _ = tick.tick() => {
                if let Some(loaded) = source.poll_files(&cfg.identity.trust_domain) {
                    apply(ctx, loaded);
                }
                ctx.reconcile_gateways(&mut gateways);
                if let Err(e) = capture.reconcile(&inputs.state(), &cfg.node).await {
                    tracing::warn!(error = %e, "capture reconcile failed; will retry");
                }
                ctx.publish_capture(capture);
            }
        }
    }
    ctx.ready.store(false, Ordering::Release);
    let _ = stop_tx.send(true);
    gateways.close_all();
    for t in tasks {
        let _ = t.await;
    }
    certs_task.abort();
    drain(inputs, cfg.drain_timeout).await;
    // A pod's container that exits is restarted by the kubelet, and would
    // take the sockets back from its replacement: under Kubernetes the old
    // agent waits for its pod's deletion (the DaemonSet's next step).
    if handed && !terminating && matches!(cfg.source, ConfigSource::Kubernetes { .. }) {
        tracing::info!("handed over and drained; waiting for SIGTERM (the DaemonSet deletes this pod)");
        sigterm.recv().await;
    }
    Ok(())
}

/// Applies a new model (or records why there is none).
fn apply(ctx: &Context, loaded: Result<config::Loaded, ConfigErrors>) {
    match loaded {
        Ok(loaded) => {
            tracing::info!(source = %ctx.source, pods = loaded.state.workloads.len(), services = loaded.state.services.len(), rejected = loaded.rejected.len(), "configuration reloaded");
            ctx.record_rejected(&loaded.rejected);
            let inputs = &ctx.inputs;
            inputs.set_state(loaded.state);
            // Pooled upstream connections were authorized under the old policy:
            // new requests get new connections, checked against the new one;
            // open connections the new one refuses are closed.
            inputs.http_pool.clear();
            inputs.clusters.clear();
            let closed = inputs.conns.revalidate(&inputs.state());
            if closed > 0 {
                let reason = crate::telemetry::ReasonLabels { reason: "denied_after_policy_change" };
                inputs.metrics.connection_failures.get_or_create(&reason).inc_by(closed as u64);
            }
            inputs.metrics.config_loads.get_or_create(&ResultLabels { result: "success" }).inc();
        }
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!("configuration rejected, keeping the last good one: {e}");
            }
            ctx.inputs.metrics.config_loads.get_or_create(&ResultLabels { result: "rejected" }).inc();
            if let Ok(mut e) = ctx.last_config_error.write() {
                *e = Some(errors.to_string());
            }
        }
    }
}

/// Waits for live connections to finish, up to `deadline`; then ends the
/// rest cleanly (a FIN each way, counted in the log) and gives their copies
/// a moment to finish before the process exits.
async fn drain(inputs: &Inputs, deadline: Duration) {
    let start = Instant::now();
    loop {
        let n = inputs.active.count();
        if n == 0 {
            return;
        }
        let left = deadline.saturating_sub(start.elapsed());
        if left.is_zero() {
            let closed = inputs.conns.close_all();
            tracing::warn!(connections = n, closed, "drain deadline reached: open connections ended (FIN both ways)");
            let end = Instant::now() + Duration::from_secs(1);
            while inputs.active.count() > 0 && Instant::now() < end {
                let _ = tokio::time::timeout(Duration::from_millis(100), inputs.active.idle()).await;
            }
            return;
        }
        tracing::info!(connections = n, "waiting for connections to finish");
        let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), inputs.active.idle()).await;
    }
}
