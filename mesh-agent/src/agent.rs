//! The running agent: loads configuration, binds listeners, starts capture,
//! serves admin, watches the configuration, and on SIGTERM/SIGINT drains and
//! leaves the node exactly as it found it.
use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{Notify, watch};

use crate::{
    config::{self, ConfigErrors},
    redirect::{Attached, Pending, Redirect, RedirectError},
    state::State,
    telemetry::{Metrics, ResultLabels},
};

mod watch_files;

/// Settings of `mesh-agent run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub config_path: PathBuf,
    pub node: String,
    pub admin_addr: SocketAddr,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    /// How often the configuration and the node's interfaces are re-checked.
    pub resync_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration:\n{0}")]
    Config(#[from] ConfigErrors),
    #[error("binding {what} on {addr}: {source} (is another mesh-agent running in this network namespace?)")]
    Bind { what: &'static str, addr: String, source: std::io::Error },
    #[error(transparent)]
    Redirect(#[from] RedirectError),
}

/// What the admin server shows about capture.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CaptureStatus {
    pub attached: Vec<Attached>,
    pub pending: Vec<Pending>,
    pub ebpf_counters: std::collections::BTreeMap<&'static str, u64>,
}

/// Shared by the proxy, the admin server and the control loop.
pub struct Context {
    pub node: String,
    pub config_path: PathBuf,
    pub connect_timeout: Duration,
    pub metrics: Metrics,
    pub active: Arc<Active>,
    state: RwLock<Arc<State>>,
    captured_ips: RwLock<Arc<HashSet<Ipv4Addr>>>,
    capture: RwLock<CaptureStatus>,
    last_config_error: RwLock<Option<String>>,
    ready: AtomicBool,
    rr: AtomicUsize,
}

impl Context {
    pub fn state(&self) -> Arc<State> {
        self.state.read().map(|s| s.clone()).unwrap_or_default()
    }

    fn set_state(&self, state: State) {
        if let Ok(mut s) = self.state.write() {
            *s = Arc::new(state);
        }
    }

    /// Whether replies from `ip` come back through a captured interface.
    pub fn is_captured(&self, ip: Ipv4Addr) -> bool {
        self.captured_ips.read().is_ok_and(|s| s.contains(&ip))
    }

    pub fn next_pick(&self) -> usize {
        self.rr.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn capture(&self) -> CaptureStatus {
        self.capture.read().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn last_config_error(&self) -> Option<String> {
        self.last_config_error.read().ok().and_then(|e| e.clone())
    }

    fn publish_capture(&self, redirect: &Redirect) {
        let totals = redirect.counters();
        self.metrics.update_ebpf(&totals);
        let ips = redirect.attached().values().map(|a| a.pod_ip).collect();
        if let Ok(mut c) = self.captured_ips.write() {
            *c = Arc::new(ips);
        }
        if let Ok(mut c) = self.capture.write() {
            *c = CaptureStatus {
                attached: redirect.attached().values().cloned().collect(),
                pending: redirect.pending.clone(),
                ebpf_counters: mesh_common::counter::NAMES.iter().copied().zip(totals).collect(),
            };
        }
    }
}

/// Counts live proxied connections so shutdown can wait for them.
#[derive(Default)]
pub struct Active {
    count: AtomicUsize,
    idle: Notify,
}

impl Active {
    pub fn enter(self: &Arc<Self>) -> ActiveGuardOwned {
        self.count.fetch_add(1, Ordering::AcqRel);
        ActiveGuardOwned(self.clone())
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

/// Decrements the live-connection count when the connection's task ends.
pub struct ActiveGuardOwned(Arc<Active>);

impl Drop for ActiveGuardOwned {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Runs until SIGTERM or SIGINT, then drains and cleans up.
pub async fn run(cfg: RunConfig) -> Result<(), RunError> {
    // Configuration is loaded and validated before any port is bound.
    let loaded = config::load(&cfg.config_path)?;
    for note in &loaded.notes {
        tracing::info!("{note}");
    }
    if !loaded.state.nodes.is_empty() && !loaded.state.nodes.contains_key(cfg.node.as_str()) {
        tracing::warn!(node = %cfg.node, "no Node object with this name in the configuration");
    }
    let mut watcher = watch_files::Fingerprint::of(&cfg.config_path);
    let ctx = Arc::new(Context {
        node: cfg.node.clone(),
        config_path: cfg.config_path.clone(),
        connect_timeout: cfg.connect_timeout,
        metrics: Metrics::new(),
        active: Arc::default(),
        state: RwLock::new(Arc::new(loaded.state)),
        captured_ips: RwLock::default(),
        capture: RwLock::default(),
        last_config_error: RwLock::default(),
        ready: AtomicBool::new(false),
        rr: AtomicUsize::new(0),
    });
    ctx.metrics.config_loads.get_or_create(&ResultLabels { result: "success" }).inc();

    let outbound = crate::proxy::bind_outbound().map_err(|source| RunError::Bind {
        what: "the outbound listener",
        addr: format!("127.0.0.1:{}", mesh_common::OUTBOUND_PORT),
        source,
    })?;
    let admin = tokio::net::TcpListener::bind(cfg.admin_addr).await.map_err(|source| RunError::Bind {
        what: "the admin server",
        addr: cfg.admin_addr.to_string(),
        source,
    })?;
    let mut redirect = Redirect::start().await?;
    let result = serve(&cfg, &ctx, outbound, admin, &mut redirect, &mut watcher).await;
    // Whatever happened, leave the node as it was.
    let cleanup = redirect.shutdown().await;
    tracing::info!("capture detached, routing rule removed");
    result?;
    cleanup?;
    Ok(())
}

async fn serve(
    cfg: &RunConfig,
    ctx: &Arc<Context>,
    outbound: tokio::net::TcpListener,
    admin: tokio::net::TcpListener,
    redirect: &mut Redirect,
    watcher: &mut watch_files::Fingerprint,
) -> Result<(), RunError> {
    redirect.reconcile(&ctx.state(), &cfg.node).await?;
    ctx.publish_capture(redirect);
    let (stop_tx, stop_rx) = watch::channel(false);
    let proxy = tokio::spawn(crate::proxy::serve(ctx.clone(), outbound, stop_rx));
    tokio::spawn(crate::admin::serve(ctx.clone(), admin));
    ctx.ready.store(true, Ordering::Release);
    tracing::info!(node = %cfg.node, admin = %cfg.admin_addr, pods = redirect.attached().len(), "mesh-agent ready");

    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(RedirectError::Io)?;
    let mut tick = tokio::time::interval(cfg.resync_interval);
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: draining"); break }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: draining"); break }
            _ = tick.tick() => {
                if watcher.changed(&cfg.config_path) {
                    reload(ctx, &cfg.config_path);
                }
                if let Err(e) = redirect.reconcile(&ctx.state(), &cfg.node).await {
                    tracing::warn!(error = %e, "capture reconcile failed; will retry");
                }
                ctx.publish_capture(redirect);
            }
        }
    }
    ctx.ready.store(false, Ordering::Release);
    let _ = stop_tx.send(true);
    let _ = proxy.await;
    drain(&ctx.active, cfg.drain_timeout).await;
    Ok(())
}

fn reload(ctx: &Context, path: &std::path::Path) {
    match config::load(path) {
        Ok(loaded) => {
            tracing::info!(path = %path.display(), pods = loaded.state.workloads.len(), services = loaded.state.services.len(), "configuration reloaded");
            ctx.set_state(loaded.state);
            ctx.metrics.config_loads.get_or_create(&ResultLabels { result: "success" }).inc();
            if let Ok(mut e) = ctx.last_config_error.write() {
                *e = None;
            }
        }
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!("configuration rejected, keeping the last good one: {e}");
            }
            ctx.metrics.config_loads.get_or_create(&ResultLabels { result: "rejected" }).inc();
            if let Ok(mut e) = ctx.last_config_error.write() {
                *e = Some(errors.to_string());
            }
        }
    }
}

/// Waits for live connections to finish, up to `deadline`.
async fn drain(active: &Arc<Active>, deadline: Duration) {
    let start = Instant::now();
    loop {
        let n = active.count();
        if n == 0 {
            return;
        }
        let left = deadline.saturating_sub(start.elapsed());
        if left.is_zero() {
            tracing::warn!(connections = n, "drain deadline reached; closing the rest");
            return;
        }
        tracing::info!(connections = n, "waiting for connections to finish");
        let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), active.idle.notified()).await;
    }
}
