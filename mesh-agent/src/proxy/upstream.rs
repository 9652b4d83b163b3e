//! What a proxied connection's upstream is: a TCP connection (one this agent
//! authorized carries its revocation guard), an HBONE stream, or TLS the agent
//! originated; and what opening one yields.
use std::{
    io,
    net::SocketAddrV4,
    sync::{Arc, RwLock},
};

use rustls::ClientConfig;
use tokio::net::TcpStream;

use super::{ProxyError, conns, reset};
use crate::state::{State, traffic::TlsOrigination};

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

/// The client TLS settings (HTTP/1.1 and h2 ALPN) for each TLS origination
/// of the current snapshot, built when it is swapped in: the model keeps
/// plain roots, a connection finds its settings by the origination's
/// identity (an `Arc` the snapshot holds, so never a stale match).
#[derive(Default)]
pub struct Originations(RwLock<Arc<Built>>);

type OriginationConfigs = [Arc<ClientConfig>; 2];
type Built = Vec<(Arc<TlsOrigination>, OriginationConfigs)>;

impl Originations {
    pub(crate) fn rebuild(&self, state: &State) {
        let policies = state.destination_rules.iter().flat_map(|d| d.policies());
        let mut built = Built::new();
        for tls in policies.filter_map(|p| p.tls.as_deref()).flat_map(|o| o.all()) {
            if built.iter().any(|(t, _)| Arc::ptr_eq(t, tls)) {
                continue;
            }
            match origination_configs(tls) {
                Ok(c) => built.push((tls.clone(), c)),
                Err(e) => tracing::warn!(ca = %tls.check.ca, error = %e, "TLS origination settings"),
            }
        }
        if let Ok(mut o) = self.0.write() {
            *o = Arc::new(built);
        }
    }

    /// The settings for `tls`: built with its snapshot, or now for a
    /// connection that began under the previous one.
    fn get(&self, tls: &Arc<TlsOrigination>, h2: bool) -> Result<Arc<ClientConfig>, rustls::Error> {
        let found =
            self.0.read().ok().and_then(|o| o.iter().find(|(t, _)| Arc::ptr_eq(t, tls)).map(|(_, c)| c.clone()));
        let [http1, http2] = match found {
            Some(c) => c,
            None => origination_configs(tls)?,
        };
        Ok(if h2 { http2 } else { http1 })
    }
}

fn origination_configs(tls: &TlsOrigination) -> Result<OriginationConfigs, rustls::Error> {
    let config = |alpn: &[&[u8]]| crate::identity::tls::origination_config(tls, alpn).map(Arc::new);
    Ok([config(&[b"http/1.1"])?, config(&[b"h2"])?])
}

/// Starts TLS to an upstream outside the mesh (DestinationRule `tls.mode: SIMPLE`, `MUTUAL`).
pub(crate) async fn originate_tls(
    originations: &Originations,
    tcp: TcpStream,
    tls: &Arc<TlsOrigination>,
    sni: &str,
    h2: bool,
    addr: SocketAddrV4,
) -> Result<Upstream, ProxyError> {
    let config = originations.get(tls, h2).map_err(|e| ProxyError::Tls {
        addr,
        sni: sni.to_owned(),
        error: io::Error::other(e),
    })?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).map_err(|e| ProxyError::Tls {
        addr,
        sni: sni.to_owned(),
        error: io::Error::other(e),
    })?;
    match tokio_rustls::TlsConnector::from(config).connect(name, tcp).await {
        Ok(s) => Ok(Upstream::Tls(Box::new(s))),
        Err(error) => Err(ProxyError::Tls { addr, sni: sni.to_owned(), error }),
    }
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
