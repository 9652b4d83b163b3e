//! What a proxied connection's upstream is: a TCP connection (one this agent
//! authorized carries its revocation guard), an HBONE stream, TLS the agent
//! originated, or a pipe to this agent's own destination stage; and what
//! opening one yields.
use std::{
    future::Future,
    io,
    net::{SocketAddr, SocketAddrV4},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use tokio::net::TcpStream;

use super::{Inputs, ProxyError, conns, l4::reset};
use crate::state::{Service, State, Workload};

/// Opens a connection as a source agent would (routing done: the [`Hop`],
/// the connect timeout): [`crate::proxy::outbound::open::dial`]. The destination side reaches
/// an external authorizer through it, given by [`Inputs`] so that `inbound`
/// does not import `outbound` (which hands same-node connections to
/// `inbound`).
pub(crate) type Dial = for<'a> fn(
    &'a Arc<Inputs>,
    &'a State,
    Hop<'a>,
    Duration,
) -> Pin<Box<dyn Future<Output = Result<Opened, ProxyError>> + Send + 'a>>;

/// One connection's way to its upstream: from `peer` (the pod `source`, if
/// known) to `addr` (the pod `dest`, if known), for the Service `service`
/// the client addressed (told to the destination's agent, for its metrics);
/// `opaque` when the source side found the stream not to be HTTP.
#[derive(Clone, Copy)]
pub(crate) struct Hop<'a> {
    pub source: Option<&'a Arc<Workload>>,
    pub peer: SocketAddr,
    pub dest: Option<&'a Arc<Workload>>,
    pub addr: SocketAddrV4,
    pub service: Option<&'a Arc<Service>>,
    pub opaque: bool,
}

/// An upstream byte stream: a TCP connection, an HBONE stream, or TLS the
/// agent originated over TCP.
pub(crate) enum Upstream {
    Tcp(TcpStream),
    /// A direct connection to a local meshed pod, closed if policy changes to refuse it.
    Local(
        TcpStream,
        // Boxed: the enum stays as small as before for every other connection.
        #[expect(dead_code, reason = "held for its Drop, which unregisters the connection")] Box<conns::Guard>,
    ),
    Tunnel(hyper_util::rt::TokioIo<crate::proxy::hbone::Tunnel>),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// To this agent's own destination stage (a local pod with request policies).
    Pipe(tokio::io::DuplexStream),
}

impl Upstream {
    /// Resets a TCP upstream; a tunnel stream is cancelled when dropped.
    pub(crate) fn reset(&self) {
        match self {
            Upstream::Tcp(s) | Upstream::Local(s, _) => reset(s),
            Upstream::Tls(t) => reset(t.get_ref().0),
            Upstream::Tunnel(_) | Upstream::Pipe(_) => {}
        }
    }
}

impl tokio::io::AsyncRead for Upstream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) | Upstream::Local(s, _) => std::pin::Pin::new(s).poll_read(cx, buf),
            Upstream::Tunnel(t) => std::pin::Pin::new(t).poll_read(cx, buf),
            Upstream::Tls(t) => std::pin::Pin::new(t).poll_read(cx, buf),
            Upstream::Pipe(p) => std::pin::Pin::new(p).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Upstream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tcp(s) | Upstream::Local(s, _) => std::pin::Pin::new(s).poll_write(cx, buf),
            Upstream::Tunnel(t) => std::pin::Pin::new(t).poll_write(cx, buf),
            Upstream::Tls(t) => std::pin::Pin::new(t).poll_write(cx, buf),
            Upstream::Pipe(p) => std::pin::Pin::new(p).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) | Upstream::Local(s, _) => std::pin::Pin::new(s).poll_flush(cx),
            Upstream::Tunnel(t) => std::pin::Pin::new(t).poll_flush(cx),
            Upstream::Tls(t) => std::pin::Pin::new(t).poll_flush(cx),
            Upstream::Pipe(p) => std::pin::Pin::new(p).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) | Upstream::Local(s, _) => std::pin::Pin::new(s).poll_shutdown(cx),
            Upstream::Tunnel(t) => std::pin::Pin::new(t).poll_shutdown(cx),
            Upstream::Tls(t) => std::pin::Pin::new(t).poll_shutdown(cx),
            Upstream::Pipe(p) => std::pin::Pin::new(p).poll_shutdown(cx),
        }
    }
}

pub(crate) struct Opened {
    pub io: Upstream,
    /// Over HBONE (mutual TLS).
    pub mtls: bool,
    /// Authorized here (a local meshed pod): closed if policy changes to refuse it.
    pub guard: Option<conns::Guard>,
}

impl Opened {
    /// The upstream, carrying its guard (for a connection handed to an HTTP client).
    pub(crate) fn into_io(self) -> Upstream {
        match (self.io, self.guard) {
            (Upstream::Tcp(s), Some(g)) => Upstream::Local(s, Box::new(g)),
            (io, _) => io,
        }
    }
}
