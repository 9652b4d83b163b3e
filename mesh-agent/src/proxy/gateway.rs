//! Ingress and egress gateways: the listeners a `Gateway` asks for, opened by
//! the agents on the nodes it selects, on their node address.
//!
//! HTTP (and HTTPS, terminated with the Secret's certificate) goes through the
//! L7 pipeline, routed by the VirtualServices bound to the gateway; TCP by
//! their `tcp` rules. Traffic leaves with the gateway's own identity: over
//! HBONE to a workload on another node, directly (after authorization) on this
//! one, and directly to services outside the mesh — an egress gateway is the
//! same thing reached over HBONE by other nodes' agents ([`serve_tunneled`]).
//!
//! A port that cannot be bound (another process has it) is reported in logs and
//! `/config_dump` and retried on every resync; the other listeners and the rest
//! of the configuration are unaffected.
use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    pin::Pin,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::Serialize;
use tokio::sync::watch;

use crate::{
    proxy::{
        Inputs,
        inbound::hbone::{GatewayHop, HopServer},
        l4::reset,
        limits::Gate,
    },
    state::{GatewayProtocol, ServerTls, State},
};

/// What one port should be: compared on each reconcile, a change reopens it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortPlan {
    pub addr: SocketAddr,
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
    /// `listening`, or why the port could not be opened.
    pub status: String,
}

struct Held {
    plan: PortPlan,
    /// What the port's task serves; `None` (or dropped) stops it.
    serving: Option<watch::Sender<Option<Arc<Serving>>>>,
    status: String,
}

/// What an open port serves; swapped in place when the configuration changes,
/// so the socket stays bound across reloads.
struct Serving {
    protocol: GatewayProtocol,
    gateways: Arc<[String]>,
    acceptor: Option<Arc<TlsServers>>,
}

/// The gateway listeners of this node.
#[derive(Default)]
pub struct Listeners {
    held: BTreeMap<u16, Held>,
    /// Servers left out of the plan, for logs and `/config_dump`.
    conflicts: Vec<Conflict>,
    /// This node's gateway ports as HBONE targets, kept with the plan.
    hops: Arc<RwLock<HashMap<SocketAddrV4, Hop>>>,
}

/// A gateway port reachable over HBONE, and the identities it runs as.
struct Hop {
    gateways: Arc<[String]>,
    protocol: GatewayProtocol,
    principals: Vec<Arc<str>>,
}

/// The ports this node's gateways ask for, and the servers left out. Gateways
/// are taken oldest first (Istio's precedence): a server whose protocol
/// differs from the one an older Gateway's server gave its port is left out
/// alone, reported, and every other server and port is served.
pub fn plan(state: &State, node: &str) -> (BTreeMap<u16, PortPlan>, Vec<Conflict>) {
    let ip = state.nodes.get(node).and_then(|n| n.internal_ip).unwrap_or(Ipv4Addr::UNSPECIFIED);
    let mut ports: BTreeMap<u16, PortPlan> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for g in state.gateways_on(node) {
        let key = format!("{}/{}", g.namespace, g.name);
        for s in &g.servers {
            let p = ports.entry(s.port).or_insert_with(|| PortPlan {
                addr: SocketAddr::from((ip, s.port)),
                protocol: s.protocol,
                gateways: Vec::new(),
                credentials: Vec::new(),
            });
            if p.protocol != s.protocol {
                let holder = p.gateways.first().cloned().unwrap_or_default();
                conflicts.push(Conflict {
                    gateway: key.clone(),
                    server: s.name.clone(),
                    port: s.port,
                    reason: format!(
                        "port {} is {:?} in the older Gateway {holder}, not {:?}",
                        s.port, p.protocol, s.protocol
                    ),
                });
                continue;
            }
            if !p.gateways.contains(&key) {
                p.gateways.push(key.clone());
            }
            if let Some(ServerTls::Simple(cert)) = &s.tls {
                let id = format!("{} ({}) {:?} {:?}", cert.credential, cert.fingerprint(), cert.settings, cert.client);
                p.credentials.extend(s.hosts.iter().map(|h| (h.host.clone(), id.clone())));
            }
        }
    }
    (ports, conflicts)
}

/// A Gateway server left out of this node's listeners, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub gateway: String,
    pub server: Option<String>,
    pub port: u16,
    pub reason: String,
}

impl Listeners {
    /// Opens, updates and closes listeners to match the configuration.
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
        self.set_hops(&state, &want);
        self.held.retain(|port, held| {
            // Kept while wanted at the same address; a new address rebinds.
            let keep = want.get(port).is_some_and(|p| p.addr == held.plan.addr);
            if !keep {
                held.close();
                tracing::info!(port, "gateway listener closed");
            }
            keep
        });
        for (port, plan) in want {
            let held = self.held.entry(port).or_insert_with(|| Held {
                plan: plan.clone(),
                serving: None,
                status: String::new(),
            });
            let result = match &held.serving {
                Some(tx) if held.plan == plan => Ok(tx.clone()),
                Some(tx) => serving(&state, &plan).map(|s| {
                    let _ = tx.send(Some(Arc::new(s)));
                    tracing::info!(addr = %plan.addr, gateways = ?plan.gateways, "gateway listener updated");
                    tx.clone()
                }),
                None => open(ctx, &state, &plan),
            };
            match result {
                Ok(tx) => {
                    if held.serving.is_none() {
                        tracing::info!(addr = %plan.addr, protocol = ?plan.protocol, gateways = ?plan.gateways, "gateway listener open");
                    }
                    held.serving = Some(tx);
                    held.plan = plan;
                    held.status = "listening".into();
                }
                Err(e) => {
                    if held.serving.is_none() {
                        held.plan = plan.clone();
                    }
                    let status = format!("cannot listen on {}: {e}", plan.addr);
                    if held.status != status {
                        tracing::error!(gateways = ?plan.gateways, "{status}; retrying on every resync");
                        ctx.metrics.gateway_bind_failures.inc();
                    }
                    held.status = status;
                }
            }
        }
    }

    /// The HBONE server's second hop: a CONNECT to one of this node's gateway
    /// ports, made to that gateway's identity, is served as if accepted there.
    pub fn tunnel_hop(&self, ctx: &Arc<Inputs>) -> GatewayHop {
        let (hops, ctx) = (self.hops.clone(), ctx.clone());
        Arc::new(move |target: SocketAddrV4, identity: &str| {
            let hops = hops.read().ok()?;
            let hop = hops.get(&target).filter(|h| h.principals.iter().any(|p| **p == *identity))?;
            let (gateways, protocol, ctx) = (hop.gateways.clone(), hop.protocol, ctx.clone());
            Some(Box::new(move |io, peer| {
                Box::pin(serve_tunneled(ctx, io, peer, target, gateways, protocol))
                    as Pin<Box<dyn std::future::Future<Output = ()> + Send>>
            }) as HopServer)
        })
    }

    fn set_hops(&self, state: &State, want: &BTreeMap<u16, PortPlan>) {
        let hops = want
            .values()
            .filter_map(|plan| {
                let SocketAddr::V4(addr) = plan.addr else { return None };
                let principals =
                    plan.gateways.iter().filter_map(|k| state.gateway(k)).map(|g| g.workload.principal.clone());
                let hop = Hop {
                    gateways: plan.gateways.clone().into(),
                    protocol: plan.protocol,
                    principals: principals.collect(),
                };
                (!addr.ip().is_unspecified()).then_some((addr, hop))
            })
            .collect();
        if let Ok(mut h) = self.hops.write() {
            *h = hops;
        }
    }

    pub fn status(&self) -> Vec<PortStatus> {
        self.held.values().map(|h| PortStatus { plan: h.plan.clone(), status: h.status.clone() }).collect()
    }

    /// The servers left out of the plan (a protocol an older Gateway's server
    /// gave their port already).
    pub fn conflicts(&self) -> Vec<Conflict> {
        self.conflicts.clone()
    }

    pub fn close_all(&mut self) {
        for held in self.held.values_mut() {
            held.close();
        }
        self.held.clear();
    }
}

impl Held {
    fn close(&mut self) {
        if let Some(tx) = self.serving.take() {
            let _ = tx.send(None);
        }
    }
}

fn serving(state: &State, plan: &PortPlan) -> std::io::Result<Serving> {
    let acceptor = match plan.protocol {
        GatewayProtocol::Https => Some(tls_acceptor(state, plan)?),
        _ => None,
    };
    Ok(Serving { protocol: plan.protocol, gateways: plan.gateways.clone().into(), acceptor })
}

type ServingTx = watch::Sender<Option<Arc<Serving>>>;

fn open(ctx: &Arc<Inputs>, state: &State, plan: &PortPlan) -> std::io::Result<ServingTx> {
    let first = serving(state, plan)?;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // A replacing agent (an upgrade) listens beside this one at once, and
    // when this one closes its listener the kernel moves the connections
    // waiting in its queue to the other (`net.ipv4.tcp_migrate_req`, set by
    // the agent): the gateway's port refuses nothing across the handover.
    // Only a process of the same user may join the group.
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&plan.addr.into())?;
    socket.listen(1024)?;
    let listener = tokio::net::TcpListener::from_std(socket.into())?;
    let (tx, mut rx) = watch::channel(Some(Arc::new(first)));
    let ctx = ctx.clone();
    let gate = Gate::new("gateway", &ctx.limits);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() || rx.borrow().is_none() {
                        break;
                    }
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Some(now) = rx.borrow().clone() else { break };
                        let Ok(ticket) = gate.admit(peer.ip(), &ctx.metrics) else {
                            reset(&stream);
                            continue;
                        };
                        // At most so many TLS handshakes at once.
                        let handshake = match now.protocol {
                            GatewayProtocol::Https => match gate.handshake(peer.ip(), &ctx.metrics) {
                                Some(p) => Some(p),
                                None => {
                                    reset(&stream);
                                    continue;
                                }
                            },
                            _ => None,
                        };
                        let guard = ctx.active.enter();
                        let ctx = ctx.clone();
                        tokio::spawn(async move {
                            let _ticket = ticket;
                            let acceptor = now.acceptor.clone();
                            let gateways = now.gateways.clone();
                            handle(&ctx, stream, peer, now.protocol, gateways, acceptor, handshake).await;
                            drop(guard);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "gateway accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    });
    Ok(tx)
}

mod serve;
#[cfg(test)]
mod tests;
mod tls;

use serve::handle;
pub use serve::serve_tunneled;

use tls::{TlsServers, tls_acceptor};
