//! One gateway connection: HTTPS terminated (the server chosen by SNI),
//! HTTP through the source's pipeline routed by the gateway's
//! VirtualServices, TLS passed through by SNI, TCP by `tcp` rules; and the
//! same for a stream that reached the gateway over HBONE ([`serve_tunneled`]).
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{Serving, tls};
use crate::{
    proxy::{
        Inputs, ProxyError,
        http::Downstream,
        l4::{ConnMeters, fail, pump, reset},
        limits::Handshake,
        outbound::{self, http::serve},
        sni::peek_sni,
        upstream::Hop,
    },
    routing::l4::Route,
    routing::protocol::Handling,
    state::{GatewayProtocol, Workload},
    telemetry::TcpLabels,
};

pub(super) async fn handle(
    ctx: &Arc<Inputs>,
    stream: TcpStream,
    peer: SocketAddr,
    serving: &Serving,
    handshake: Option<Handshake>,
) {
    let _ = stream.set_nodelay(true);
    let Ok(SocketAddr::V4(local)) = stream.local_addr() else { return };
    let gateways = serving.gateways.clone();
    match (serving.protocol, serving.acceptor.clone()) {
        (GatewayProtocol::Https, Some(servers)) => {
            // The ClientHello first: its SNI picks the server's settings.
            let accept = async {
                let lazy = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
                let start = lazy.await?;
                let Some((config, server)) = servers.choose(start.client_hello().server_name()) else {
                    return Err(std::io::Error::other("no HTTPS server on this port"));
                };
                Ok((start.into_stream(config).await?, server))
            };
            let (tls, server) = match tokio::time::timeout(ctx.limits.handshake_timeout, accept).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::info!(%peer, error = %e, "gateway TLS handshake failed"),
                Err(_) => return tracing::info!(%peer, "gateway TLS handshake timed out"),
            };
            drop(handshake);
            let session = tls.get_ref().1;
            let h2 = session.alpn_protocol() == Some(b"h2");
            let handling = if h2 { Handling::Http2 } else { Handling::Http1 };
            let mut down = downstream(peer, local, gateways);
            down.client_cert = tls::forwarded_client_cert(session);
            down.server = Some(server);
            serve(ctx.clone(), tls, down, handling).await;
        }
        (GatewayProtocol::Tcp, _) => {
            let state = ctx.state();
            let found =
                crate::routing::http::route_gateway_tcp(&state, &gateways, local, ctx.next_pick(), ctx.next_random());
            serve_tcp(ctx, stream, peer, local, found, &serving.pod).await
        }
        (GatewayProtocol::Tls, servers) => {
            let Some(sni) = peek_sni(&stream, ctx.limits.handshake_timeout).await else {
                tracing::info!(%peer, %local, "gateway: no TLS server name from the client");
                return fail(ctx, &stream, peer, None, ProxyError::NotLocal(local));
            };
            // A server that terminates for this name: TLS ends here and the
            // bytes go on by the port's `tcp` rules (a TCPRoute).
            if let Some(config) = servers.and_then(|s| s.terminating(&sni)) {
                let accept = tokio_rustls::TlsAcceptor::from(config).accept(stream);
                let tls = match tokio::time::timeout(ctx.limits.handshake_timeout, accept).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return tracing::info!(%peer, error = %e, "gateway TLS handshake failed"),
                    Err(_) => return tracing::info!(%peer, "gateway TLS handshake timed out"),
                };
                drop(handshake);
                let state = ctx.state();
                let found = crate::routing::http::route_gateway_tcp(
                    &state,
                    &gateways,
                    local,
                    ctx.next_pick(),
                    ctx.next_random(),
                );
                drop(state);
                return serve_tcp(ctx, tls, peer, local, found, &serving.pod).await;
            }
            drop(handshake);
            let state = ctx.state();
            let (pick, random) = (ctx.next_pick(), ctx.next_random());
            let found = crate::routing::http::route_gateway_tls(&state, &gateways, local, &sni, pick, random);
            serve_tcp(ctx, stream, peer, local, found, &serving.pod).await
        }
        _ => {
            let handling = match outbound::sniff_client(&stream, ctx.protocol_detection_timeout).await {
                Handling::Http2 => Handling::Http2,
                _ => Handling::Http1,
            };
            serve(ctx.clone(), stream, downstream(peer, local, gateways), handling).await;
        }
    }
}

fn downstream(peer: SocketAddr, local: SocketAddrV4, gateways: Arc<[String]>) -> Downstream {
    let peer_ip = match peer.ip() {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    };
    let (first_pick, gateways) = (usize::MAX.into(), Some(gateways));
    Downstream {
        peer,
        peer_ip,
        orig: local,
        source: None,
        gateways,
        server: None,
        first_pick,
        client_cert: None,
        principal: None,
        memo: Default::default(),
    }
}

/// A client connection whose socket can be reset: plain, or TLS the gateway
/// terminated.
trait OnTcp: AsyncRead + AsyncWrite + Unpin {
    fn tcp(&self) -> &TcpStream;
}

impl OnTcp for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl OnTcp for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// A TCP, TLS-passthrough or TLS-terminating server: where the first
/// matching rule sends the connection (`found`), bytes copied both ways.
async fn serve_tcp<C: OnTcp>(
    ctx: &Arc<Inputs>,
    client: C,
    peer: SocketAddr,
    local: SocketAddrV4,
    found: Option<(Route, String)>,
    pod: &Arc<Workload>,
) {
    let state = ctx.state();
    let Some((route, _)) = found else {
        let err = ProxyError::NotLocal(local);
        tracing::info!(%peer, %local, "gateway: no tcp/tls route for this connection");
        return fail(ctx, client.tcp(), peer, None, err);
    };
    let source = Some(pod.clone());
    let (dest, addr, mut labels, service) = match route {
        Route::Service { service, endpoint, addr, .. } => {
            let labels = TcpLabels::new(source.as_deref(), Some(&endpoint), Some(&service), false);
            (Some(endpoint), addr, labels, service)
        }
        Route::Refused { service, reason } => {
            let labels = TcpLabels::new(source.as_deref(), None, Some(&service), false);
            let err = ProxyError::Refused { service: service.key.clone(), reason };
            return fail(ctx, client.tcp(), peer, Some(labels), err);
        }
        Route::Workload { addr, .. } | Route::Passthrough { addr } | Route::BlackHole { addr } => {
            let labels = TcpLabels::black_hole(source.as_deref());
            return fail(ctx, client.tcp(), peer, Some(labels), ProxyError::BlackHole(addr));
        }
    };
    let hop = Hop { source: source.as_ref(), peer, dest: dest.as_ref(), addr, service: Some(&service), opaque: true };
    match outbound::open::open_upstream(ctx, &state, hop, ctx.connect_timeout).await {
        Ok(opened) => {
            drop(state);
            if opened.mtls {
                labels.connection_security_policy = "mutual_tls";
            }
            let meters = ConnMeters::open(ctx, &labels, None).logged(ctx, &labels, peer, local, addr);
            pump(ctx, client, opened.io, meters, addr, opened.guard, |c, u| {
                reset(c.tcp());
                u.reset();
            })
            .await;
        }
        Err(e) => fail(ctx, client.tcp(), peer, Some(labels), e),
    }
}

/// Serves a stream that reached this node's gateway over HBONE (the second
/// hop of the egress-gateway pattern): as if it had been accepted on the port.
pub async fn serve_tunneled<I>(
    ctx: Arc<Inputs>,
    io: I,
    peer: SocketAddr,
    target: SocketAddrV4,
    serving: Arc<Serving>,
    caller: crate::proxy::edge::Caller,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let protocol = serving.protocol;
    if !matches!(protocol, GatewayProtocol::Http | GatewayProtocol::Http2) {
        return tracing::warn!(%peer, %target, ?protocol, "a mesh client to a gateway port that is not plain HTTP: not served");
    }
    let gateways = serving.gateways.clone();
    // The source agent speaks its client's HTTP version: look at the first bytes.
    let mut io = io;
    let mut first = vec![0u8; 3];
    let mut got = 0;
    while got < first.len() {
        match tokio::time::timeout(ctx.protocol_detection_timeout * 10, io.read(&mut first[got..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => got += n,
        }
    }
    let handling = if first == b"PRI" { Handling::Http2 } else { Handling::Http1 };
    let io = Prefixed { prefix: first, at: 0, io };
    let mut down = downstream(peer, target, gateways);
    (down.principal, down.peer_ip) = (caller.principal, caller.ip);
    serve(ctx, io, down, handling).await;
}

/// A stream with bytes already read put back in front.
struct Prefixed<I> {
    prefix: Vec<u8>,
    at: usize,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.prefix.len() {
            let n = (this.prefix.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
