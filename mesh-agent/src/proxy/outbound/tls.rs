//! TLS the agent originates to an upstream outside the mesh (DestinationRule
//! `tls.mode: SIMPLE`, `MUTUAL`), with settings built once per snapshot.
use std::{
    io,
    net::SocketAddrV4,
    sync::{Arc, RwLock},
};

use rustls::ClientConfig;
use tokio::net::TcpStream;

use crate::{
    proxy::{ProxyError, upstream::Upstream},
    state::{State, traffic::TlsOrigination},
};

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
