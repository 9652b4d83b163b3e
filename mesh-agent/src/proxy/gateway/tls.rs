//! An HTTPS port's TLS: each server's own settings (certificate, protocol
//! versions, TLS 1.2 suites), chosen by the ClientHello's SNI.
use std::sync::Arc;

use super::PortPlan;
use crate::state::{ServerTls, State};

/// An HTTPS port's servers' TLS settings, chosen by the client's SNI (the
/// first server whose host pattern matches; the first server without SNI or
/// when none does), each with its own certificate, versions and suites.
pub(super) struct TlsServers(Vec<(String, Arc<rustls::ServerConfig>)>);

impl TlsServers {
    pub(super) fn choose(&self, sni: Option<&str>) -> Option<Arc<rustls::ServerConfig>> {
        let found = sni.and_then(|sni| self.0.iter().find(|(p, _)| crate::state::traffic::host_matches(p, sni)));
        found.or(self.0.first()).map(|(_, c)| c.clone())
    }
}

/// The TLS settings of each HTTPS server on the port, by host pattern.
pub(super) fn tls_acceptor(state: &State, plan: &PortPlan) -> std::io::Result<Arc<TlsServers>> {
    let mut servers = Vec::new();
    for g in plan.gateways.iter().filter_map(|k| state.gateway(k)) {
        for s in g.servers.iter().filter(|s| s.port == plan.addr.port()) {
            if let Some(ServerTls::Simple(c)) = &s.tls {
                let fail = |e: String| std::io::Error::other(format!("{}: {e}", c.credential));
                let key = crate::identity::tls::certified_key_from_pem(&c.cert_pem, &c.key_pem).map_err(fail)?;
                let config = crate::identity::tls::gateway_server_config(Arc::new(key), &c.settings, c.client.as_ref())
                    .map_err(|e| fail(e.to_string()))?;
                let config = Arc::new(config);
                servers.extend(s.hosts.iter().map(|h| (h.host.clone(), config.clone())));
            }
        }
    }
    Ok(Arc::new(TlsServers(servers)))
}

/// The `x-forwarded-client-cert` value for the certificate a client
/// presented (and the server verified), if it did.
pub(super) fn forwarded_client_cert(session: &rustls::ServerConnection) -> Option<hyper::header::HeaderValue> {
    let der = session.peer_certificates()?.first()?;
    let value = crate::identity::forwarded_client_cert(der);
    hyper::header::HeaderValue::from_bytes(value.as_bytes()).ok()
}
