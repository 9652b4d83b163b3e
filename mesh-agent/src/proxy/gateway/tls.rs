//! An HTTPS port's TLS: each server's own settings (certificate, protocol
//! versions, TLS 1.2 suites), chosen by the ClientHello's SNI.
use std::sync::Arc;

use super::PortPlan;
use crate::{
    routing::sni::{Binding, BoundServer, SniTable},
    state::{ServerTls, State},
};

/// An HTTPS port's servers' TLS settings, chosen by the client's SNI
/// ([`SniTable`]: the most specific host, as Envoy chooses a filter chain),
/// each with its own certificate, versions and suites. The connection is
/// then bound to the chosen server ([`Binding`]).
pub(super) struct TlsServers {
    table: Arc<SniTable>,
    /// Each server's settings, by its index in `table`.
    configs: Vec<Arc<rustls::ServerConfig>>,
}

impl TlsServers {
    /// The terminating server whose hosts take `sni` itself (no default):
    /// on a TLS port, any other name is passed through.
    pub(super) fn terminating(&self, sni: &str) -> Option<Arc<rustls::ServerConfig>> {
        self.configs.get(self.table.lookup(sni)?).cloned()
    }

    pub(super) fn choose(&self, sni: Option<&str>) -> Option<(Arc<rustls::ServerConfig>, Binding)> {
        let chosen = self.table.choose(sni)?;
        let config = self.configs.get(chosen)?.clone();
        Some((config, Binding { table: self.table.clone(), chosen }))
    }
}

/// The TLS settings of each terminating server on the port, by host
/// pattern; `http`: offer HTTP/2 and HTTP/1.1 by ALPN (an HTTPS port), else
/// no ALPN (a TLS port's bytes go on to a TCP backend as they are).
pub(super) fn tls_acceptor(state: &State, plan: &PortPlan, http: bool) -> std::io::Result<Arc<TlsServers>> {
    let (mut table, mut configs) = (SniTable::default(), Vec::new());
    for (key, g) in plan.gateways.iter().filter_map(|k| Some((k, state.gateway(k)?))) {
        for s in g.servers.iter().filter(|s| s.port == plan.addr.port()) {
            if let Some(ServerTls::Simple(c)) = &s.tls {
                let fail = |e: String| std::io::Error::other(format!("{}: {e}", c.credential));
                let key_pair = crate::identity::tls::certified_key_from_pem(&c.cert_pem, &c.key_pem).map_err(fail)?;
                let mut config =
                    crate::identity::tls::gateway_server_config(Arc::new(key_pair), &c.settings, c.client.as_ref())
                        .map_err(|e| fail(e.to_string()))?;
                if !http {
                    config.alpn_protocols.clear();
                }
                table.push(BoundServer { gateway: key.clone(), hosts: s.hosts.clone() });
                configs.push(Arc::new(config));
            }
        }
    }
    Ok(Arc::new(TlsServers { table: Arc::new(table), configs }))
}

/// The `x-forwarded-client-cert` value for the certificate a client
/// presented (and the server verified), if it did.
pub(super) fn forwarded_client_cert(session: &rustls::ServerConnection) -> Option<hyper::header::HeaderValue> {
    let der = session.peer_certificates()?.first()?;
    let value = crate::identity::forwarded_client_cert(der);
    hyper::header::HeaderValue::from_bytes(value.as_bytes()).ok()
}
