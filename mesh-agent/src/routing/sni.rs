//! Which server of an HTTPS Gateway port a TLS connection belongs to, and
//! whether a request on it may be served there.
//!
//! The ClientHello's SNI chooses the server as Envoy chooses a filter chain by
//! `server_names`: an exact host before a wildcard, a longer wildcard before
//! a shorter one, `*` last. Every request on the connection is then checked
//! against that choice (RFC 6066 §11.1: a server that selects by SNI must
//! check the host in the application protocol too), as the Gateway API
//! asks of HTTPS listeners (`GatewayHTTPSListenerDetectMisdirectedRequests`):
//! a host that another server on the port takes gets 421 Misdirected
//! Request, so a client cannot reach a MUTUAL server's routes through a
//! SIMPLE server's handshake (domain fronting), and an HTTP/2 client that
//! reused a connection for another host is told to open its own.
use std::sync::Arc;

use crate::state::{ServerHost, traffic::host_matches};

/// One HTTPS server of a port: the Gateway it belongs to and its hosts (with
/// the namespaces that may bind them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundServer {
    /// `namespace/name` of the Gateway.
    pub gateway: String,
    pub hosts: Vec<ServerHost>,
}

/// A port's HTTPS servers, looked up by host name.
#[derive(Debug, Default)]
pub struct SniTable {
    /// Host pattern → index into `servers`, in Gateway order.
    hosts: Vec<(String, usize)>,
    servers: Vec<Arc<BoundServer>>,
}

/// What a request's host is to the connection it came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// The server the handshake chose is the one for this host.
    Here,
    /// Another server on the port takes this host: 421.
    Misdirected,
    /// No server on the port takes it: routed as usual, which finds no rule (404).
    Nowhere,
}

impl SniTable {
    /// Adds a server; returns its index.
    pub fn push(&mut self, server: BoundServer) -> usize {
        let i = self.servers.len();
        self.hosts.extend(server.hosts.iter().map(|h| (h.host.to_ascii_lowercase(), i)));
        self.servers.push(Arc::new(server));
        i
    }

    /// The server for `name`, the most specific host that matches it; `None`
    /// when no server lists a matching host.
    pub fn lookup(&self, name: &str) -> Option<usize> {
        let matching = self.hosts.iter().filter(|(p, _)| host_matches(p, name));
        // `min_by_key` keeps the first of equals: Gateway order breaks ties.
        matching.min_by_key(|(p, _)| specificity(p)).map(|&(_, i)| i)
    }

    /// The server a handshake goes to: by SNI, else (no SNI, or no server
    /// for it) the port's first server.
    pub fn choose(&self, sni: Option<&str>) -> Option<usize> {
        sni.and_then(|n| self.lookup(n)).or((!self.servers.is_empty()).then_some(0))
    }

    pub fn server(&self, i: usize) -> Option<&Arc<BoundServer>> {
        self.servers.get(i)
    }
}

/// A TLS connection's place on its port: the table and the server chosen.
#[derive(Debug, Clone)]
pub struct Binding {
    pub table: Arc<SniTable>,
    pub chosen: usize,
}

impl Binding {
    pub fn server(&self) -> Option<&BoundServer> {
        self.table.server(self.chosen).map(|s| &**s)
    }

    /// Whether a request for `host` (no port) may be served on this connection.
    pub fn fit(&self, host: &str) -> Fit {
        match self.table.lookup(host) {
            Some(i) if i == self.chosen => Fit::Here,
            Some(_) => Fit::Misdirected,
            None => Fit::Nowhere,
        }
    }
}

/// How specific a host pattern is, smallest first: an exact name, then
/// wildcards by decreasing length of what they fix, then `*`.
pub(crate) fn specificity(pattern: &str) -> (u8, std::cmp::Reverse<usize>) {
    match pattern {
        "*" => (2, std::cmp::Reverse(0)),
        p if p.starts_with('*') => (1, std::cmp::Reverse(p.len())),
        _ => (0, std::cmp::Reverse(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(gateway: &str, hosts: &[&str]) -> BoundServer {
        let hosts = hosts.iter().map(|h| ServerHost { namespace: None, host: (*h).to_owned() }).collect();
        BoundServer { gateway: gateway.to_owned(), hosts }
    }

    /// A port with a tenant's `*` server first, a wildcard, a longer wildcard
    /// and an exact name: each name goes to the most specific, whatever the
    /// order of the Gateways.
    #[test]
    fn the_most_specific_server_takes_a_name() {
        let mut t = SniTable::default();
        let any = t.push(server("tenant/any", &["*"]));
        let wide = t.push(server("ns/wide", &["*.example.com"]));
        let narrow = t.push(server("ns/narrow", &["*.a.example.com"]));
        let exact = t.push(server("bank/partners", &["Partners.example.com"]));
        let table = [
            ("partners.example.com", Some(exact)),
            ("PARTNERS.EXAMPLE.COM", Some(exact)),
            ("x.a.example.com", Some(narrow)),
            ("www.example.com", Some(wide)),
            ("WWW.Example.Com", Some(wide)),
            ("example.com", Some(any)),
            ("other.org", Some(any)),
        ];
        for (name, want) in table {
            assert_eq!(t.lookup(name), want, "{name}");
        }
        assert_eq!(t.choose(None), Some(any), "without SNI: the first server");
    }

    /// What a request's host is to a connection whose SNI chose a server.
    #[test]
    fn a_host_another_server_takes_is_misdirected() {
        let mut t = SniTable::default();
        let public = t.push(server("ns/public", &["public.example", "*.shop.example"]));
        let partners = t.push(server("bank/partners", &["partners.example", "vip.shop.example"]));
        let t = Arc::new(t);
        let on = |chosen| Binding { table: t.clone(), chosen };
        let table = [
            (public, "public.example", Fit::Here),
            (public, "a.shop.example", Fit::Here),
            (public, "partners.example", Fit::Misdirected),
            // The wildcard covers it, but a more specific server lists it.
            (public, "vip.shop.example", Fit::Misdirected),
            (public, "nobody.example", Fit::Nowhere),
            (partners, "partners.example", Fit::Here),
            (partners, "vip.shop.example", Fit::Here),
            (partners, "public.example", Fit::Misdirected),
        ];
        for (chosen, host, want) in table {
            assert_eq!(on(chosen).fit(host), want, "{host} on {chosen}");
        }
    }
}
