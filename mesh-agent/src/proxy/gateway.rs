//! Ingress and egress gateways, as Istio deploys them: a Gateway is served
//! on the address of each gateway pod its `selector` matches, by that pod's
//! node agent, as that pod (its service account's identity, issued by the CA
//! as any pod's). The pod itself runs nothing: every connection to it is
//! captured like any meshed pod's, and the doors that would hand it to the
//! pod — the plaintext listener for clients outside the mesh (a
//! LoadBalancer, NodePort or externalIPs Service in front of the pods),
//! HBONE from other nodes, a local pod's connection — hand a gateway port's
//! connection to [`Ports`] instead.
//!
//! HTTP (and HTTPS, terminated with the Secret's certificate) goes through the
//! L7 pipeline, routed by the VirtualServices bound to the gateway; TCP by
//! their `tcp` rules. Traffic leaves with the gateway pod's identity: over
//! HBONE to a workload on another node, directly (after authorization) on this
//! one, and directly to services outside the mesh — an egress gateway is the
//! same thing reached over HBONE by other nodes' agents ([`serve_tunneled`]).
//!
//! An HTTPS port whose certificate cannot be used is reported in logs and
//! `/config_dump` and tried again on every resync; the other ports and the
//! rest of the configuration are unaffected.
use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
};

use serde::Serialize;
use tokio::net::TcpStream;

use crate::{
    proxy::{
        Inputs, ProxyError,
        edge::{Caller, GatewayPort, Io, Serve},
        hbone::{GatewayHop, HopServer},
        l4::{fail, reset},
        limits::Gate,
    },
    routing::policy::{self, Peer, Verdict},
    state::{GatewayProtocol, ServerTls, State, Workload},
};

/// What one gateway pod's port should be: compared on each reconcile, a
/// change rebuilds what it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortPlan {
    /// The gateway pod's address and the port.
    pub addr: SocketAddrV4,
    /// The gateway pod, `namespace/name`.
    pub pod: String,
    pub protocol: GatewayProtocol,
    /// Gateways (`namespace/name`) with a server on the port.
    pub gateways: Vec<String>,
    /// Host pattern → Secret, for HTTPS servers (SNI picks the certificate).
    pub credentials: Vec<(String, String)>,
}

/// A port's state, for `/config_dump`.
#[derive(Debug, Clone, Serialize)]
pub struct PortStatus {
    #[serde(flatten)]
    pub plan: PortPlan,
    /// `serving`, or why the port cannot be served.
    pub status: String,
}

/// What a gateway port serves; replaced when the configuration changes.
pub struct Serving {
    protocol: GatewayProtocol,
    gateways: Arc<[String]>,
    acceptor: Option<Arc<TlsServers>>,
    /// The gateway pod: the requests' source, its identity theirs.
    pod: Arc<Workload>,
    /// Bounds on connections and TLS handshakes (one for all the node's ports).
    gate: Arc<Gate>,
}

/// The plans of this node, with their status and what they serve.
#[derive(Default)]
pub struct Listeners {
    held: BTreeMap<SocketAddrV4, Held>,
    gate: Option<Arc<Gate>>,
    /// Servers left out of the plan, for logs and `/config_dump`.
    conflicts: Vec<Conflict>,
}

struct Held {
    plan: PortPlan,
    serving: Option<Arc<Serving>>,
    status: String,
}

/// The ports this node's gateway pods serve, and the servers left out. For
/// each pod, the Gateways that select it are taken oldest first (Istio's
/// precedence): a server whose protocol differs from the one an older
/// Gateway's server gave its port is left out alone, reported, and every
/// other server and port is served.
pub fn plan(state: &State, node: &str) -> (BTreeMap<SocketAddrV4, PortPlan>, Vec<Conflict>) {
    let mut ports: BTreeMap<SocketAddrV4, PortPlan> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for pod in state.local_workloads(node).filter(|w| w.gateway) {
        let Some(ip) = pod.ip else { continue };
        for g in state.gateways_of(pod) {
            let key = format!("{}/{}", g.namespace, g.name);
            for s in &g.servers {
                // A certificate is read in the gateway workload's namespace
                // (Istio's `credentialName` rule), and the Gateway's
                // Secret is its own namespace's: a gateway pod of another
                // namespace never serves it (Istio would look for a Secret
                // of that name in the pod's namespace; we refuse instead).
                if matches!(s.tls, Some(ServerTls::Simple(_))) && g.namespace != pod.namespace {
                    let conflict = Conflict {
                        gateway: key.clone(),
                        server: s.name.clone(),
                        port: s.port,
                        reason: format!(
                            "gateway pod {}/{} is in another namespace than the Gateway, whose credentialName Secret it may not use",
                            pod.namespace, pod.name
                        ),
                    };
                    if !conflicts.contains(&conflict) {
                        conflicts.push(conflict);
                    }
                    continue;
                }
                let p = ports.entry(SocketAddrV4::new(ip, s.port)).or_insert_with(|| PortPlan {
                    addr: SocketAddrV4::new(ip, s.port),
                    pod: format!("{}/{}", pod.namespace, pod.name),
                    protocol: s.protocol,
                    gateways: Vec::new(),
                    credentials: Vec::new(),
                });
                if p.protocol != s.protocol {
                    let holder = p.gateways.first().cloned().unwrap_or_default();
                    let conflict = Conflict {
                        gateway: key.clone(),
                        server: s.name.clone(),
                        port: s.port,
                        reason: format!(
                            "port {} is {:?} in the older Gateway {holder}, not {:?}",
                            s.port, p.protocol, s.protocol
                        ),
                    };
                    if !conflicts.contains(&conflict) {
                        conflicts.push(conflict);
                    }
                    continue;
                }
                if !p.gateways.contains(&key) {
                    p.gateways.push(key.clone());
                }
                if let Some(ServerTls::Simple(cert)) = &s.tls {
                    let id =
                        format!("{} ({}) {:?} {:?}", cert.credential, cert.fingerprint(), cert.settings, cert.client);
                    p.credentials.extend(s.hosts.iter().map(|h| (h.host.clone(), id.clone())));
                }
            }
        }
    }
    (ports, conflicts)
}

/// A Gateway server left out of this node's ports, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub gateway: String,
    pub server: Option<String>,
    pub port: u16,
    pub reason: String,
}

impl Listeners {
    /// Makes this node's gateway ports match the configuration.
    pub fn reconcile(&mut self, ctx: &Arc<Inputs>) {
        let state = ctx.state();
        let (want, conflicts) = plan(&state, &ctx.node);
        if conflicts != self.conflicts {
            for c in &conflicts {
                tracing::error!(gateway = %c.gateway, server = ?c.server, port = c.port, "gateway server left out: {}", c.reason);
            }
        }
        ctx.metrics.gateway_conflicts.set(conflicts.len() as i64);
        self.conflicts = conflicts;
        self.held.retain(|addr, held| {
            let keep = want.contains_key(addr);
            if !keep {
                tracing::info!(%addr, pod = %held.plan.pod, "gateway port no longer served");
            }
            keep
        });
        for (addr, plan) in want {
            let held = self.held.entry(addr).or_insert_with(|| Held {
                plan: plan.clone(),
                serving: None,
                status: String::new(),
            });
            let unchanged = held.serving.is_some() && held.plan == plan;
            if unchanged {
                continue;
            }
            let gate = self.gate.get_or_insert_with(|| Gate::new("gateway", &ctx.limits)).clone();
            match serving(&state, &plan, gate) {
                Ok(s) => {
                    tracing::info!(%addr, pod = %plan.pod, protocol = ?plan.protocol, gateways = ?plan.gateways, "gateway port served");
                    held.serving = Some(Arc::new(s));
                    held.status = "serving".into();
                }
                Err(e) => {
                    let status = format!("cannot serve {addr}: {e}");
                    if held.status != status {
                        tracing::error!(pod = %plan.pod, gateways = ?plan.gateways, "{status}; retrying on every resync");
                        ctx.metrics.gateway_bind_failures.inc();
                    }
                    held.status = status;
                }
            }
            held.plan = plan;
        }
        let serving = self.held.iter().filter_map(|(a, h)| Some((*a, h.serving.clone()? as Arc<dyn GatewayPort>)));
        ctx.gateways.set(serving.collect());
    }

    pub fn status(&self) -> Vec<PortStatus> {
        self.held.values().map(|h| PortStatus { plan: h.plan.clone(), status: h.status.clone() }).collect()
    }

    /// The servers left out of the plan (a protocol an older Gateway's server
    /// gave their port already).
    pub fn conflicts(&self) -> Vec<Conflict> {
        self.conflicts.clone()
    }

    /// The agent stops accepting (a replacement took the sockets over, or it
    /// drains to exit): no more reconciling, but the ports served stay
    /// served, for what was accepted already (a connection taken from the
    /// queue an instant before, looked up an instant after) and for new
    /// streams on the HBONE connections that drain.
    pub fn stop_accepting(self) {
        drop(self);
    }
}

/// The HBONE server's second hop: a CONNECT to a gateway pod's port on this
/// node, made to that pod's identity, is served as the port serves it.
pub fn tunnel_hop(ctx: &Arc<Inputs>) -> GatewayHop {
    let ctx = ctx.clone();
    Arc::new(move |target: SocketAddrV4, identity: &str| {
        let serving = ctx.gateways.get(target).filter(|s| s.principal() == identity)?;
        let ctx = ctx.clone();
        Some(Box::new(move |io, peer, principal, ip| {
            serving.serve_stream(ctx, Box::new(io), peer, target, Caller { principal, ip })
        }) as HopServer)
    })
}

// === impl Serving ===

impl GatewayPort for Serving {
    fn admits(&self, ctx: &Inputs, peer: &Peer<'_>, port: u16) -> Result<(), ProxyError> {
        // HTTP: each request is judged (`inbound::http::gate`), as Envoy's
        // RBAC filter in a gateway's HTTP chain does.
        if matches!(self.protocol, GatewayProtocol::Http | GatewayProtocol::Http2 | GatewayProtocol::Https) {
            return Ok(());
        }
        // Judged per connection: a rule on request attributes grants nothing
        // and a DENY's request fields are ignored, so such policies fail closed.
        let state = ctx.state();
        match policy::authorize(&state, (&*self.pod).into(), peer, port) {
            Verdict::Allow => Ok(()),
            Verdict::Deny(policy) => Err(ProxyError::Denied { policy }),
        }
    }

    fn serve_captured(self: Arc<Self>, ctx: Arc<Inputs>, stream: TcpStream, peer: SocketAddr) -> Serve {
        Box::pin(async move { serve_captured(&ctx, stream, peer, self).await })
    }

    fn serve_stream(
        self: Arc<Self>,
        ctx: Arc<Inputs>,
        io: Box<dyn Io>,
        peer: SocketAddr,
        target: SocketAddrV4,
        caller: Caller,
    ) -> Serve {
        Box::pin(serve_tunneled(ctx, io, peer, target, self, caller))
    }

    fn principal(&self) -> &str {
        &self.pod.principal
    }
}

async fn serve_captured(ctx: &Arc<Inputs>, stream: TcpStream, peer: SocketAddr, serving: Arc<Serving>) {
    let ip = match peer.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => return reset(&stream),
    };
    let Ok(SocketAddr::V4(local)) = stream.local_addr() else { return reset(&stream) };
    if let Err(e) = serving.admits(ctx, &Peer { principal: None, ip }, local.port()) {
        return fail(ctx, &stream, peer, None, e);
    }
    let Ok(_ticket) = serving.gate.admit(peer.ip(), &ctx.metrics) else { return reset(&stream) };
    // At most so many TLS handshakes at once.
    let handshake = match serving.protocol {
        GatewayProtocol::Https | GatewayProtocol::Tls => match serving.gate.handshake(peer.ip(), &ctx.metrics) {
            Some(p) => Some(p),
            None => return reset(&stream),
        },
        _ => None,
    };
    handle(ctx, stream, peer, &serving, handshake).await;
}

fn serving(state: &State, plan: &PortPlan, gate: Arc<Gate>) -> std::io::Result<Serving> {
    let acceptor = match plan.protocol {
        GatewayProtocol::Https => Some(tls_acceptor(state, plan, true)?),
        // A TLS port's terminating servers (its passthrough ones need none).
        GatewayProtocol::Tls => Some(tls_acceptor(state, plan, false)?),
        _ => None,
    };
    let pod = state.workload_by_ip(*plan.addr.ip()).cloned().ok_or_else(|| std::io::Error::other("no gateway pod"))?;
    Ok(Serving { protocol: plan.protocol, gateways: plan.gateways.clone().into(), acceptor, pod, gate })
}

mod serve;
#[cfg(test)]
mod tests;
mod tls;

use serve::handle;
pub use serve::serve_tunneled;

use tls::{TlsServers, tls_acceptor};
