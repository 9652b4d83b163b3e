//! The outbound direction (15001): a meshed pod's (or a host client's)
//! connection, routed by its original destination and opened upstream —
//! directly, over HBONE to the destination's node, through this node's own
//! door for a local pod ([`inbound::same_node`]) — or served as HTTP by the
//! source's pipeline ([`http`]).
use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use tokio::net::TcpStream;

use super::{
    Inputs, ProxyError,
    l4::{ConnMeters, Counted, fail, pump, reset},
    upstream::{Hop, Opened},
};
use crate::{
    routing::l4::{Route, route},
    routing::protocol::{self, Declared, Handling, Sniffed},
    state::{Resolution, Service, State, Workload},
    telemetry::TcpLabels,
};

pub mod http;
pub(crate) mod open;
pub mod tls;

/// One outbound connection: routed and opened (or served as HTTP), then copied.
/// (An `async` block, not an `async fn`: the latter keeps its arguments twice
/// in the connection's task.)
#[expect(clippy::manual_async_fn, reason = "an async fn would keep its arguments twice")]
pub(super) fn handle(ctx: &Arc<Inputs>, client: TcpStream, peer: SocketAddr) -> impl Future<Output = ()> + '_ {
    async move {
        // Boxed, and over before the copy starts: routing, sniffing and
        // connecting (TLS, HBONE) need far more state than copying, and the
        // connection's task would otherwise keep room for it while it lives.
        futures_util::future::OptionFuture::from(Box::pin(open(ctx, client, peer)).await).await;
    }
}

/// Routes a new outbound connection and opens its upstream; what is left is
/// the copy. `None`: refused, failed, or served as HTTP here.
async fn open(ctx: &Arc<Inputs>, client: TcpStream, peer: SocketAddr) -> Option<impl Future<Output = ()> + '_> {
    let _ = client.set_nodelay(true);
    let state = ctx.state();
    let Client { orig, peer_ip, source } = match original_destination(ctx, &state, &client, peer) {
        Ok(found) => found,
        Err(Some(e)) => {
            fail(ctx, &client, peer, None, e);
            return None;
        }
        Err(None) => return None,
    };
    // DNS over TCP from a pod whose DNS is captured: the DNS proxy answers.
    if orig.port() == 53
        && let Some(proxy) = ctx.dns_proxy.get()
        && source.as_ref().is_some_and(|w| w.dns_capture)
    {
        drop(state);
        let _ = Box::pin(crate::dns::proxy::tcp::serve(proxy, client, peer_ip)).await;
        return None;
    }
    let pick = ctx.next_pick();
    let client_ns = source.as_deref().map(|w| &*w.namespace);
    let mut decided = decide(ctx, &state, orig, client_ns, pick);
    // TLS whose server name decides: a Service with mesh `tls` rules, or an
    // address nobody declared on a port a ServiceEntry host lists (TLS
    // naming that host, or one under its wildcard, is that entry's).
    let unknown = matches!(decided, Route::BlackHole { .. } | Route::Passthrough { .. });
    let reads_sni = match &decided {
        Route::Service { service, .. } => crate::routing::http::has_mesh_tls(&state, service, client_ns),
        _ => unknown && state.external_port(orig.port()),
    };
    let mut sni = None;
    if reads_sni && let Some(name) = crate::proxy::sni::peek_sni(&client, ctx.protocol_detection_timeout).await {
        let random = ctx.next_random();
        if let Some(route) = crate::routing::http::route_tls(&state, orig, &name, client_ns, pick, random) {
            decided = route;
        } else if unknown && let Some(service) = state.external_on_port(&name, orig.port(), client_ns) {
            let pick = crate::routing::l4::Pick::Turn(pick);
            decided = crate::routing::l4::route_to(service, orig, orig.port(), None, pick, &|_| false);
        }
        sni = Some(name);
    }
    // Not in the registry under REGISTRY_ONLY: refused unless HTTP names a host.
    let black_hole = matches!(decided, Route::BlackHole { .. });
    let (dest, mut addr, mut labels, declared, service) = match destination(decided, source.as_deref(), orig) {
        Ok(d) => d,
        Err(refused) => {
            let (labels, e) = *refused;
            fail(ctx, &client, peer, Some(labels), e);
            return None;
        }
    };
    let handling = handling(ctx, &client, declared).await;
    if handling == Handling::Tcp && black_hole {
        fail(ctx, &client, peer, Some(labels), ProxyError::BlackHole(addr));
        return None;
    }
    // DYNAMIC_DNS over TLS: to where the server name resolves now.
    if handling == Handling::Tcp
        && let Some(entry) =
            service.as_ref().filter(|s| s.external.as_ref().is_some_and(|e| e.resolution == Resolution::DynamicDns))
    {
        let host = sni.unwrap_or_default();
        match ctx.dns.resolve_now(&host, &entry.hostname).await {
            Ok(addrs) if !addrs.is_empty() => addr = SocketAddrV4::new(addrs[0], addr.port()),
            Ok(_) => return fail_dns(ctx, &client, peer, labels, host, crate::dns::LookupError::NoRecords),
            Err(error) => return fail_dns(ctx, &client, peer, labels, host, error),
        }
    }
    if handling != Handling::Tcp {
        drop(state);
        // The client connection's own TCP series, labelled with the route its
        // first request takes (later ones are balanced apart: see the
        // request metrics): an endpoint on another node is reached over mTLS.
        if dest.as_ref().is_some_and(|d| d.meshed && d.node.as_deref() != Some(ctx.node.as_str())) {
            labels.connection_security_policy = "mutual_tls";
        }
        let client = Counted::new(client, ConnMeters::open(ctx, &labels, Some(peer_ip)));
        // The first request takes this connection's turn in the round robin.
        let down = super::http::Downstream::captured(peer, peer_ip, orig, source, pick);
        // Boxed: a connection waiting for its first bytes keeps no room for an HTTP server.
        Box::pin(http::serve(ctx.clone(), client, down, handling)).await;
        return None;
    }
    // Boxed apart: connecting (TLS, HBONE) takes ~6 KB of state, which a
    // connection waiting for its first bytes (sniffing) need not hold yet.
    let hop = Hop { source: source.as_ref(), peer, dest: dest.as_ref(), addr, service: service.as_ref(), opaque: true };
    let opened = Box::pin(open::open_upstream(ctx, &state, hop, ctx.connect_timeout)).await;
    drop(state);
    joined(ctx, client, (peer, orig), addr, opened, labels)
}

fn fail_dns<T>(
    ctx: &Inputs,
    client: &TcpStream,
    peer: SocketAddr,
    labels: TcpLabels,
    host: String,
    error: crate::dns::LookupError,
) -> Option<T> {
    fail(ctx, client, peer, Some(labels), ProxyError::Dns { host, error });
    None
}

/// The copy between the client and its opened upstream, or the failure to
/// open one counted and the client reset (`None`).
fn joined(
    ctx: &Inputs,
    client: TcpStream,
    (peer, orig): (SocketAddr, SocketAddrV4),
    addr: SocketAddrV4,
    opened: Result<Opened, ProxyError>,
    mut labels: TcpLabels,
) -> Option<impl Future<Output = ()> + '_> {
    let Opened { io, mtls, guard } = match opened {
        Ok(opened) => opened,
        Err(e) => {
            if matches!(e, ProxyError::Tunnel(_)) {
                labels.connection_security_policy = "mutual_tls";
            }
            fail(ctx, &client, peer, Some(labels), e);
            return None;
        }
    };
    if mtls {
        labels.connection_security_policy = "mutual_tls";
    }
    // Revoked, the client's socket is aborted with the upstream's.
    let guard = match guard.map(|g| g.and_client(&client)).transpose() {
        Ok(g) => g,
        Err(error) => {
            let e = ProxyError::Connect { addr, source_ip: None, error };
            fail(ctx, &client, peer, Some(labels), e);
            return None;
        }
    };
    tracing::debug!(%peer, upstream = %addr, mtls, "proxying");
    let subject = match peer.ip() {
        std::net::IpAddr::V4(ip) => Some(ip),
        std::net::IpAddr::V6(_) => None,
    };
    let meters = ConnMeters::open(ctx, &labels, subject).logged(ctx, &labels, peer, orig, addr);
    Some(pump(ctx, client, io, meters, addr, guard, |c, u| {
        reset(c);
        u.reset();
    }))
}

/// A captured client, as routing sees it.
struct Client {
    /// Where it meant to go.
    orig: SocketAddrV4,
    peer_ip: Ipv4Addr,
    /// The workload it is (a pod, or this node for a host client).
    source: Option<Arc<Workload>>,
}

/// The client: where it meant to go (the accepted socket's local address,
/// or for a host client redirected by `cgroup/connect4` the address its
/// sockops program kept), its address and workload. `Err(None)`: the client
/// is gone already.
fn original_destination(
    ctx: &Inputs,
    state: &State,
    client: &TcpStream,
    peer: SocketAddr,
) -> Result<Client, Option<ProxyError>> {
    let orig = match client.local_addr() {
        Ok(SocketAddr::V4(a)) => a,
        Ok(other) => return Err(Some(ProxyError::NotIpv4(other))),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "client gone before routing");
            return Err(None);
        }
    };
    let SocketAddr::V4(peer_v4) = peer else {
        return Err(Some(ProxyError::NotIpv4(peer)));
    };
    // Connected to the listener itself: a host client.
    if *orig.ip() == Ipv4Addr::from(mesh_common::OUTBOUND_ADDR) && orig.port() == mesh_common::OUTBOUND_PORT {
        let found = ctx.host_orig.get().and_then(|h| h.take(peer_v4)).ok_or(ProxyError::NotLocal(orig))?;
        tracing::debug!(%peer, orig = %found, "host client");
        let node = state.nodes.get(ctx.node.as_str()).map(|n| n.workload.clone());
        return Ok(Client { orig: found, peer_ip: *peer_v4.ip(), source: node });
    }
    Ok(Client { orig, peer_ip: *peer_v4.ip(), source: state.workload_by_ip(*peer_v4.ip()).cloned() })
}

/// The route: on a port that is not HTTP, a VirtualService `tcp` rule may
/// decide instead of the default route (the connection then stays opaque bytes).
fn decide(ctx: &Inputs, state: &State, orig: SocketAddrV4, client_ns: Option<&str>, pick: usize) -> Route {
    match route(state, orig, client_ns, pick) {
        Route::Service { protocol: Declared::Tcp | Declared::Unknown, .. } | Route::Refused { .. }
            if state.by_vip.contains_key(orig.ip()) =>
        {
            match crate::routing::http::route_tcp(state, orig, client_ns, pick, ctx.next_random()) {
                Some(Route::Service { service, endpoint, addr, .. }) => {
                    Route::Service { service, endpoint, addr, protocol: Declared::Tcp }
                }
                Some(other) => other,
                None => route(state, orig, client_ns, pick),
            }
        }
        other => other,
    }
}

/// What a route leads to: the destination workload (if any), the address,
/// the connection's labels, the protocol the port declares (`None`:
/// passthrough, never parsed), and the Service.
type Destination = (Option<Arc<Workload>>, SocketAddrV4, TcpLabels, Option<Declared>, Option<Arc<Service>>);

fn destination(
    decided: Route,
    source: Option<&Workload>,
    orig: SocketAddrV4,
) -> Result<Destination, Box<(TcpLabels, ProxyError)>> {
    Ok(match decided {
        Route::Service { service, endpoint, addr, protocol } => {
            let labels = TcpLabels::new(source, Some(&endpoint), Some(&service), false);
            (Some(endpoint), addr, labels, Some(protocol), Some(service))
        }
        Route::Workload { workload, addr } => {
            let labels = TcpLabels::new(source, Some(&workload), None, false);
            (Some(workload), addr, labels, Some(Declared::Unknown), None)
        }
        Route::Passthrough { addr } => (None, addr, TcpLabels::new(source, None, None, true), None, None),
        // HTTP may still name a host a ServiceEntry declares: look first.
        Route::BlackHole { addr } => (None, addr, TcpLabels::black_hole(source), Some(Declared::Unknown), None),
        Route::Refused { service, reason } => {
            let labels = TcpLabels::new(source, None, Some(&service), false);
            let err = ProxyError::Refused { service: format!("{}/{} {orig}", service.namespace, service.name), reason };
            return Err(Box::new((labels, err)));
        }
    })
}

/// Mesh destinations may speak HTTP: declared on the Service port, else sniffed.
async fn handling(ctx: &Inputs, client: &TcpStream, declared: Option<Declared>) -> Handling {
    match declared {
        None | Some(Declared::Tcp) => Handling::Tcp,
        Some(Declared::Http2 | Declared::Grpc) => Handling::Http2,
        // An `http` port takes HTTP/1.1 and h2c alike (as Envoy's AUTO codec).
        Some(Declared::Http) => match sniff_client(client, ctx.protocol_detection_timeout).await {
            Handling::Http2 => Handling::Http2,
            _ => Handling::Http1,
        },
        Some(Declared::Unknown) => sniff_client(client, ctx.protocol_detection_timeout).await,
    }
}

/// Waits (up to `timeout`) for the client's first bytes and classifies them;
/// silence, TLS or anything unrecognised is a byte stream.
pub(crate) async fn sniff_client(client: &TcpStream, timeout: Duration) -> Handling {
    // Boxed: the timer and the peeked bytes (~430 bytes) would otherwise keep
    // room in the connection's task for as long as it lives.
    Box::pin(sniff_until(client, timeout)).await
}

async fn sniff_until(client: &TcpStream, timeout: Duration) -> Handling {
    let mut buf = [0u8; 32];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, client.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return Handling::Tcp,
        };
        match protocol::sniff(&buf[..n]) {
            Sniffed::Http1 => return Handling::Http1,
            Sniffed::Http2 => return Handling::Http2,
            Sniffed::Other => return Handling::Tcp,
            // Part of a method or preface: wait a little for the rest.
            Sniffed::NeedMore if n == buf.len() => return Handling::Tcp,
            Sniffed::NeedMore => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}
