//! The L4 toolbox every direction uses: connect (from the client's address
//! where replies come back here), register a connection for revocation,
//! copy both ways with its meters, and count or reset what failed. It calls
//! nothing above it: no routing, no policy, no direction.
use std::{
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpSocket, TcpStream},
};

use super::{Inputs, ProxyError, conns};
use crate::{
    state::{
        log_format::{Entry, Format, Kind},
        telemetry::{Logging, MetricSet, TagValue},
    },
    telemetry::{TcpLabels, access_log::Sink},
};

pub(crate) mod copy;

/// Registers a connection authorized here, so a policy change reaches it.
pub(crate) fn register(
    ctx: &Inputs,
    authorized: conns::Authorized,
    upstream: &TcpStream,
    addr: SocketAddrV4,
) -> Result<conns::Guard, ProxyError> {
    ctx.conns.register(authorized, upstream).map_err(|error| ProxyError::Connect { addr, source_ip: None, error })
}

/// The client's address to connect from, if replies come back to this agent:
/// when the upstream is a pod whose veth is captured on this node, or when
/// the client is a meshed pod of this node (replies to its address reach the
/// agent wherever they enter: the uplink's capture or the pod's last-hop
/// gate). So a meshed pod's connections out of the mesh leave with its own
/// address, and masquerading, NetworkPolicy and firewalls see the pod, not
/// the node; only a gateway's connections leave from the node.
pub(crate) fn transparent_source(ctx: &Inputs, peer: SocketAddr, addr: SocketAddrV4) -> Option<Ipv4Addr> {
    match peer.ip() {
        // A host client (loopback) keeps the node's address.
        std::net::IpAddr::V4(ip)
            if ip != *addr.ip()
                && !ip.is_loopback()
                && !addr.ip().is_loopback()
                && (ctx.is_captured(*addr.ip()) || ctx.is_gated(ip)) =>
        {
            Some(ip)
        }
        _ => None,
    }
}

/// A proxied connection's counters, looked up once when it opens (counted
/// opened and active then, closed when dropped): what a long-lived connection
/// keeps instead of its labels (four pointers, not 272 bytes).
pub(crate) struct ConnMeters {
    received: Counter,
    sent: Counter,
    closed: Counter,
    active: prometheus_client::metrics::gauge::Gauge,
    /// What the Telemetries say of this side's access log.
    logging: Logging,
    /// The connection log's record, when access logging is on.
    log: Option<Box<ConnLog>>,
}

impl ConnMeters {
    /// The meters of a connection reported for the pod at `subject` (the
    /// client at the source, the server at the destination): Istio's TCP
    /// metrics its Telemetries leave on, the others counted nowhere.
    pub(crate) fn open(ctx: &Inputs, labels: &TcpLabels, subject: Option<Ipv4Addr>) -> Self {
        let m = &ctx.metrics;
        let state = ctx.state();
        let side = state.reporting(subject, labels.reporter == "destination", &labels.destination_service);
        // A Telemetry's tag overrides: on a connection, literals only.
        let literal = |v: &TagValue| match v {
            TagValue::Literal(s) => Some(s.to_string()),
            _ => None,
        };
        let tagged = |metric| side.tags.as_deref().map(|t| labels.with_tags(t, metric, &literal));
        let kept = |family: &Family<TcpLabels, Counter>, metric| {
            if side.off.contains(metric) {
                return Counter::default();
            }
            match tagged(metric) {
                Some(l) => family.get_or_create(&l).clone(),
                None => family.get_or_create(labels).clone(),
            }
        };
        if !side.off.contains(MetricSet::TCP_OPENED_CONNECTIONS) {
            kept(&m.tcp_opened, MetricSet::TCP_OPENED_CONNECTIONS).inc();
        }
        m.active_connections.inc();
        ConnMeters {
            received: kept(&m.tcp_received, MetricSet::TCP_RECEIVED_BYTES),
            sent: kept(&m.tcp_sent, MetricSet::TCP_SENT_BYTES),
            closed: kept(&m.tcp_closed, MetricSet::TCP_CLOSED_CONNECTIONS),
            active: m.active_connections.clone(),
            logging: side.logging,
            log: None,
        }
    }

    /// Logs the connection as Envoy's TCP proxy does, when the access log is
    /// on: a line now (`TcpUpstreamConnected`) and one when it closes
    /// (`TcpConnectionEnd`, with its bytes and duration).
    pub(crate) fn logged(
        mut self,
        ctx: &Inputs,
        labels: &TcpLabels,
        peer: SocketAddr,
        local: SocketAddrV4,
        to: SocketAddrV4,
    ) -> Self {
        let state = ctx.state();
        let sink = ctx.access_log.sink(state.access_log.file.as_ref(), self.logging);
        if sink == Sink::Off {
            return self;
        }
        let principal = (labels.reporter == "destination" && &*labels.source_principal != "unknown")
            .then(|| labels.source_principal.clone());
        let log = ConnLog {
            sink,
            format: state.access_log.format.clone(),
            start: std::time::SystemTime::now(),
            started: std::time::Instant::now(),
            peer,
            local,
            upstream: to,
            cluster: upstream_cluster(labels, local, Some(to)),
            principal,
        };
        log.write(ctx, Kind::TcpOpen, [0; 2]);
        self.log = Some(Box::new(log));
        self
    }
}

/// Istio's cluster name for where a request went (`%UPSTREAM_CLUSTER_RAW%`):
/// `outbound|<port>||<service>` at the source, `inbound|<port>||` at the
/// destination, or the passthrough and black-hole clusters.
pub(crate) fn upstream_cluster(tcp: &TcpLabels, local: SocketAddrV4, upstream: Option<SocketAddrV4>) -> Option<String> {
    let svc = &*tcp.destination_service;
    if tcp.reporter == "destination" {
        return Some(format!("inbound|{}||", upstream.map_or(local.port(), |u| u.port())));
    }
    match svc {
        "unknown" => None,
        "PassthroughCluster" | "BlackHoleCluster" => Some(svc.to_owned()),
        host => Some(format!("outbound|{}||{host}", local.port())),
    }
}

/// What a connection's log lines say besides its bytes.
pub(crate) struct ConnLog {
    sink: Sink,
    format: std::sync::Arc<Format>,
    start: std::time::SystemTime,
    started: std::time::Instant,
    peer: SocketAddr,
    /// Where the client connected.
    local: SocketAddrV4,
    upstream: SocketAddrV4,
    cluster: Option<String>,
    principal: Option<crate::telemetry::Label>,
}

impl ConnLog {
    fn write(&self, ctx: &Inputs, kind: Kind, moved: [u64; 2]) {
        let entry = Entry {
            kind,
            start: self.start,
            protocol: None,
            request: None,
            response: None,
            response_code: None,
            flags: crate::telemetry::Flags::NONE.to_string(),
            details: None,
            transport_failure: None,
            bytes_received: moved[0],
            bytes_sent: moved[1],
            duration_ms: (kind == Kind::TcpClose).then(|| self.started.elapsed().as_millis() as u64),
            grpc_status: None,
            upstream_host: Some(self.upstream.into()),
            upstream_cluster: self.cluster.as_deref(),
            upstream_local: None,
            downstream_local: Some(self.local.into()),
            downstream_remote: self.peer,
            peer_principal: self.principal.as_deref(),
            sni: None,
            route_name: None,
        };
        if !ctx.access_log.write(&self.sink, self.format.render(&entry)) {
            let labels = crate::telemetry::LimitLabels { listener: "access_log", reason: "queue_full" };
            ctx.metrics.limit_refusals.get_or_create(&labels).inc();
        }
    }
}

impl Drop for ConnMeters {
    fn drop(&mut self) {
        self.active.dec();
        self.closed.inc();
    }
}

/// A stream whose bytes are counted on its connection's meters as they move
/// (read: `received`, written: `sent`): an HTTP connection's own TCP series,
/// for the server that parses it.
pub(crate) struct Counted<I> {
    inner: I,
    meters: ConnMeters,
}

impl<I> Counted<I> {
    pub(crate) fn new(inner: I, meters: ConnMeters) -> Self {
        Counted { inner, meters }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.meters.received.inc_by((buf.filled().len() - before) as u64);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.meters.sent.inc_by(n as u64);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            this.meters.sent.inc_by(n as u64);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Copies between a client and its upstream, counting bytes; `on_error`
/// resets what it can of both. A `guard` is held while the copy runs (a
/// policy change that refuses the connection aborts its sockets). (An `async`
/// block, not an `async fn`: the latter would keep each argument twice in the
/// connection's task.)
#[expect(clippy::manual_async_fn, reason = "an async fn would keep its arguments twice")]
pub(crate) fn pump<'a, C, U>(
    ctx: &'a Inputs,
    mut client: C,
    mut upstream: U,
    meters: ConnMeters,
    addr: SocketAddrV4,
    guard: Option<conns::Guard>,
    on_error: impl FnOnce(&C, &U) + 'a,
) -> impl Future<Output = ()> + 'a
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'a,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'a,
{
    async move {
        let idle = Some(ctx.limits.idle_timeout);
        let mut meters = meters;
        let mut moved = [0; 2];
        let result =
            copy::bidirectional(&mut client, &mut upstream, &meters.received, &meters.sent, idle, &mut moved).await;
        if let Some(log) = meters.log.take() {
            log.write(ctx, Kind::TcpClose, moved);
        }
        drop(meters);
        drop(guard);
        if let Err((op, error)) = result {
            on_error(&client, &upstream);
            let err = ProxyError::Copy { addr, op, error };
            tracing::info!(error = %err, "connection reset");
            let reason = crate::telemetry::ReasonLabels { reason: err.reason() };
            ctx.metrics.connection_failures.get_or_create(&reason).inc();
        }
    }
}

/// Connects to `addr`, from `source_ip` (any port) when given, within `timeout`.
pub(crate) async fn connect(
    addr: SocketAddrV4,
    source_ip: Option<Ipv4Addr>,
    timeout: Duration,
) -> Result<TcpStream, ProxyError> {
    let socket = TcpSocket::new_v4().map_err(|error| ProxyError::Connect { addr, source_ip, error })?;
    if let Some(ip) = source_ip {
        let bind = || -> io::Result<()> {
            socket2::SockRef::from(&socket).set_ip_transparent_v4(true)?;
            socket.bind(SocketAddr::V4(SocketAddrV4::new(ip, 0)))
        };
        bind().map_err(|error| ProxyError::Connect { addr, source_ip, error })?;
    }
    let _ = socket.set_nodelay(true);
    // The agent's own sockets are never captured as host clients.
    let _ = socket2::SockRef::from(&socket).set_mark(crate::marks::get().agent);
    match tokio::time::timeout(timeout, socket.connect(addr.into())).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(error)) => Err(ProxyError::Connect { addr, source_ip, error }),
        Err(_) => Err(ProxyError::ConnectTimeout { addr, timeout }),
    }
}

/// Records a connection that never reached its upstream, and resets the client.
pub(crate) fn fail(ctx: &Inputs, client: &TcpStream, peer: SocketAddr, labels: Option<TcpLabels>, err: ProxyError) {
    tracing::warn!(%peer, error = %err, "connection refused");
    record_failure(ctx, labels, &err);
    reset(client);
}

/// Counts a connection that never reached its upstream: by reason, and (when
/// its labels are known) as opened and closed with the error's response flags.
pub(crate) fn record_failure(ctx: &Inputs, labels: Option<TcpLabels>, err: &ProxyError) {
    let m = &ctx.metrics;
    m.connection_failures.get_or_create(&crate::telemetry::ReasonLabels { reason: err.reason() }).inc();
    if let Some(mut labels) = labels {
        labels.response_flags = err.flags();
        m.tcp_opened.get_or_create(&labels).inc();
        m.tcp_closed.get_or_create(&labels).inc();
    }
}

/// Makes the close send RST rather than FIN, so the client sees a failure.
pub(crate) fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
