//! The agent once started: ready, then the event loop (configuration,
//! resyncs, link and route changes, the CNI plugin, signals, a handover),
//! then the drain.
use std::{
    collections::HashSet,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::{sync::watch, task::JoinHandle};

use super::{
    ConfigSource, Context, RunConfig, RunError, Sockets, admin, cni, handover, listeners, listeners::Handover,
    source::Source,
};
use crate::{
    capture::{Capture, CaptureError, netlink},
    config::{self, ConfigErrors},
    proxy::{Direction, gateway, inputs::Inputs},
    telemetry::ResultLabels,
};

pub(super) async fn serve(
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
    let mut changes = netlink::changes()
        .inspect_err(
            |e| tracing::warn!(error = %e, "no netlink notifications: new pods are captured at the next resync"),
        )
        .ok();
    capture.reconcile(&inputs.state(), &cfg.node).await?;
    ctx.publish_capture(capture);
    // Certificates for the local pods before serving, so that the first
    // connections need not wait for the CA.
    inputs.certs.sync(&wanted_identities(inputs)).await;
    let every = cfg.resync_interval.min(Duration::from_secs(1));
    let certs_task = tokio::spawn(sync_certificates(inputs.clone(), every));
    let dns_task = tokio::spawn(inputs.dns.clone().run());
    let (mut running, offered) = Running::start(ctx, sockets, admin);
    ctx.ready.store(true, Ordering::Release);
    tracing::info!(node = %cfg.node, admin = %cfg.admin_addr, pods = capture.attached().len(), "mesh-agent ready");
    // What start-up freed (configuration, lists, certificates) is not kept.
    crate::telemetry::runtime::release_free_memory();
    if let Some(inherited) = handover.inherited {
        match tokio::task::spawn_blocking(move || inherited.ready()).await {
            Ok(Ok(())) => tracing::info!("took over: the previous agent stops accepting and drains"),
            Ok(Err(e)) => tracing::warn!(error = %e, "the previous agent did not hear that this one is ready"),
            Err(e) => tracing::warn!(error = %e, "handover task failed"),
        }
    }
    // Offered to the next agent only now: until this one accepts, the
    // previous one's offer is the node's.
    let offer = offer(&handover.path, offered, inputs);
    let mut cni_rx = cni_socket(cfg, ctx);
    let events = Events { changes: &mut changes, cni: &mut cni_rx, offer: offer.as_ref() };
    let mut ended = event_loop(cfg, ctx, &mut running, capture, source, events).await?;
    running.stop(ctx).await;
    certs_task.abort();
    dns_task.abort();
    drain(inputs, cfg.drain_timeout).await;
    // A pod's container that exits is restarted by the kubelet, and would
    // take the sockets back from its replacement: under Kubernetes the old
    // agent waits for its pod's deletion (the DaemonSet's next step).
    if ended.handed && !ended.terminating && matches!(cfg.source, ConfigSource::Kubernetes { .. }) {
        tracing::info!("handed over and drained; waiting for SIGTERM (the DaemonSet deletes this pod)");
        ended.sigterm.recv().await;
    }
    Ok(())
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

/// What serves while the agent runs: the data path's accept loops, the
/// admin surfaces, the gateway listeners.
struct Running {
    tasks: Vec<JoinHandle<()>>,
    admin_tasks: Vec<JoinHandle<()>>,
    stop_tx: watch::Sender<bool>,
    gateways: gateway::Listeners,
}

impl Running {
    /// Starts serving; returns duplicates of the listeners to offer a replacement.
    fn start(
        ctx: &Arc<Context>,
        sockets: Sockets,
        admin: Vec<(admin::Surface, tokio::net::TcpListener)>,
    ) -> (Running, std::io::Result<Vec<(String, std::os::fd::OwnedFd)>>) {
        let inputs = &ctx.inputs;
        let (stop_tx, stop_rx) = watch::channel(false);
        let Sockets { outbound, inbound, hbone, hbone_tls } = sockets;
        let offered = listeners::offered(&outbound, &inbound, &hbone, &admin);
        let mut gateways = gateway::Listeners::default();
        ctx.reconcile_gateways(&mut gateways);
        let hop = gateway::tunnel_hop(inputs);
        let tasks = vec![
            tokio::spawn(crate::proxy::serve(inputs.clone(), outbound, Direction::Outbound, stop_rx.clone())),
            tokio::spawn(crate::proxy::serve(inputs.clone(), inbound, Direction::Inbound, stop_rx.clone())),
            tokio::spawn(crate::proxy::inbound::hbone::serve(inputs.clone(), hbone, hbone_tls, hop, stop_rx)),
        ];
        let admin_tasks = admin
            .into_iter()
            .map(|(surface, listener)| tokio::spawn(admin::serve(ctx.clone(), listener, surface)))
            .collect();
        (Running { tasks, admin_tasks, stop_tx, gateways }, offered)
    }

    /// Stops accepting (the data path, the gateways) and waits for the
    /// accept loops; open connections go on.
    async fn stop(self, ctx: &Context) {
        ctx.ready.store(false, Ordering::Release);
        let _ = self.stop_tx.send(true);
        self.gateways.stop_accepting();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The offer of this agent's sockets and certificates to the next agent.
fn offer(
    path: &std::path::Path,
    offered: std::io::Result<Vec<(String, std::os::fd::OwnedFd)>>,
    inputs: &Inputs,
) -> Option<handover::Offer> {
    let certs = inputs.certs.clone();
    let offer = offered.and_then(|sockets| handover::Offer::bind(path, sockets));
    match offer.map(|o| o.with_certs(move || handover::encode_certs(certs.export()))) {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot offer the sockets for a handover; an upgrade will refuse connections");
            None
        }
    }
}

/// The CNI plugin's socket, once this agent captures (a predecessor
/// answered the plugin until now).
fn cni_socket(cfg: &RunConfig, ctx: &Arc<Context>) -> Option<tokio::sync::mpsc::Receiver<cni::Command>> {
    let dir = &cfg.identity.state_dir;
    let served = std::fs::create_dir_all(dir).and_then(|()| cni::serve(ctx.clone(), cni::path(dir), cfg.node.clone()));
    served
        .inspect_err(|e| {
            tracing::warn!(error = %e, dir = %dir.display(), "no socket for the CNI plugin: it will fail new pods on this node");
        })
        .ok()
}

/// What the event loop waits on besides configuration, time and signals.
struct Events<'a> {
    changes: &'a mut Option<netlink::Changes>,
    cni: &'a mut Option<tokio::sync::mpsc::Receiver<cni::Command>>,
    offer: Option<&'a handover::Offer>,
}

/// How the event loop ended.
struct Ended {
    /// A replacement took the sockets over.
    handed: bool,
    /// SIGTERM came while a replacement was getting ready.
    terminating: bool,
    sigterm: tokio::signal::unix::Signal,
}

/// Runs until a signal or a handover. SIGTERM while a replacement is getting
/// ready (a DaemonSet surge: the kubelet may count the new pod ready from
/// this agent's answer on the shared readiness socket) does not stop
/// accepting before the replacement does, or gives up.
async fn event_loop(
    cfg: &RunConfig,
    ctx: &Arc<Context>,
    running: &mut Running,
    capture: &mut Capture,
    source: &mut Source,
    events: Events<'_>,
) -> Result<Ended, RunError> {
    let Events { changes, cni, offer } = events;
    let mut handed_over = std::pin::pin!(async {
        match offer {
            Some(o) => o.handed_over().await,
            None => std::future::pending().await,
        }
    });
    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(CaptureError::Io)?;
    let mut tick = tokio::time::interval(cfg.resync_interval);
    let mut recheck = tokio::time::interval(Duration::from_millis(100));
    let (mut terminating, mut handed) = (false, false);
    let taking_over = || offer.is_some_and(handover::Offer::taking_over);
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
                running.admin_tasks.iter().for_each(JoinHandle::abort);
                handed = true;
                break;
            }
            Some(n) = async { match changes { Some(c) => c.next().await, None => std::future::pending().await } } => {
                tracing::trace!(notifications = n, "links or routes changed");
                reconcile_capture(ctx, capture, &cfg.node).await;
            }
            Some(cmd) = async { match cni { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                cni_command(ctx, capture, cmd, &cfg.node).await;
            }
            loaded = source.next_model() => {
                apply(ctx, Ok(loaded));
                ctx.reconcile_gateways(&mut running.gateways);
                reconcile_capture(ctx, capture, &cfg.node).await;
            }
            _ = tick.tick() => {
                if let Some(loaded) = source.poll_files(&cfg.identity.trust_domain) {
                    apply(ctx, loaded);
                }
                ctx.reconcile_gateways(&mut running.gateways);
                reconcile_capture(ctx, capture, &cfg.node).await;
            }
        }
    }
    Ok(Ended { handed, terminating, sigterm })
}

async fn reconcile_capture(ctx: &Context, capture: &mut Capture, node: &str) {
    if let Err(e) = capture.reconcile(&ctx.inputs.state(), node).await {
        tracing::warn!(error = %e, "capture reconcile failed; will retry");
    }
    ctx.publish_capture(capture);
}

/// Does what the CNI plugin asked (see [`cni`]) and answers it.
async fn cni_command(ctx: &Context, capture: &mut Capture, cmd: cni::Command, node: &str) {
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
    reconcile_capture(ctx, capture, node).await;
    if let Some(reply) = reply {
        let _ = reply.send(capture.ready_role(ip));
    }
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
            // The old model is freed; its pages go back.
            crate::telemetry::runtime::release_free_memory();
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
