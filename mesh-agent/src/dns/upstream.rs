//! The node's resolvers, as its `resolv.conf` names them, asked with
//! hickory-resolver: IPv4 only, each name as fully qualified (a
//! ServiceEntry host is a domain name; no search list applies), no cache of
//! its own (the [`super::Resolver`] keeps answers by their TTL).
use std::{path::Path, str::FromStr as _, time::Instant};

use hickory_resolver::{
    TokioResolver,
    config::{LookupIpStrategy, ResolverOpts},
    net::{NetError, runtime::TokioRuntimeProvider},
    proto::rr::Name,
};

use super::{Answer, Lookup, LookupError, LookupFuture, Settings};

pub struct Upstream {
    resolver: TokioResolver,
}

impl Upstream {
    /// The resolvers `path` (a `resolv.conf`) names, with its options; the
    /// timeout is `settings`'.
    pub fn from_resolv_conf(path: &Path, settings: &Settings) -> Result<Upstream, String> {
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let (config, mut opts): (_, ResolverOpts) =
            hickory_resolver::system_conf::parse_resolv_conf(text).map_err(|e| format!("{}: {e}", path.display()))?;
        opts.ip_strategy = LookupIpStrategy::Ipv4Only;
        opts.timeout = settings.timeout;
        opts.cache_size = 0;
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Upstream { resolver })
    }
}

impl Lookup for Upstream {
    fn lookup<'a>(&'a self, name: &'a str) -> LookupFuture<'a> {
        Box::pin(async move {
            let mut fqdn = Name::from_str(name).map_err(|e| LookupError::Other(format!("{name:?}: {e}")))?;
            fqdn.set_fqdn(true);
            match self.resolver.lookup_ip(fqdn).await {
                Ok(found) => {
                    let ttl = found.valid_until().saturating_duration_since(Instant::now());
                    let addrs = found
                        .iter()
                        .filter_map(|ip| match ip {
                            std::net::IpAddr::V4(v4) => Some(v4),
                            std::net::IpAddr::V6(_) => None,
                        })
                        .collect();
                    Ok(Answer { addrs, ttl })
                }
                Err(e) if e.is_no_records_found() || e.is_nx_domain() => Err(LookupError::NoRecords),
                Err(NetError::Timeout) => Err(LookupError::Timeout),
                Err(e) => Err(LookupError::Other(e.to_string())),
            }
        })
    }
}

/// The `nameserver` addresses of a `resolv.conf` (port 53), for the DNS
/// proxy to forward to; IPv6 ones are left out (the mesh carries IPv4).
pub fn nameservers(resolv_conf: &str) -> Vec<std::net::SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<std::net::Ipv4Addr>().ok())
        .map(|ip| std::net::SocketAddr::from((ip, 53)))
        .collect()
}

/// Used when the node's `resolv.conf` cannot be read: every lookup fails,
/// named, and is retried (a DNS ServiceEntry then has only its addresses).
pub struct Unavailable(pub String);

impl Lookup for Unavailable {
    fn lookup<'a>(&'a self, _name: &'a str) -> LookupFuture<'a> {
        Box::pin(async move { Err(LookupError::Other(self.0.clone())) })
    }
}
