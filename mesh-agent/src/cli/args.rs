//! Argument types shared by `run` and `ca`: limits, the cluster to read, listen
//! addresses and durations.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

/// Which Kubernetes API server to read (`--kubernetes`): in a cluster, the
/// pod's service account; outside, a kubeconfig.
#[derive(Debug, clap::Args)]
pub struct KubeArgs {
    /// The kubeconfig to read (default: $KUBECONFIG, then ~/.kube/config,
    /// after the in-cluster service account).
    #[arg(long, env = "MESH_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, env = "MESH_CONTEXT")]
    context: Option<String>,
}

impl From<KubeArgs> for crate::discovery::KubeSelection {
    fn from(a: KubeArgs) -> Self {
        crate::discovery::KubeSelection { kubeconfig: a.kubeconfig, context: a.context }
    }
}

/// A listen address, or `off`.
#[derive(Debug, Clone, Copy)]
pub struct Listen(pub Option<SocketAddr>);

pub(super) fn parse_listen(s: &str) -> Result<Listen, String> {
    match s {
        "off" | "none" | "" => Ok(Listen(None)),
        _ => s.parse().map(|a| Listen(Some(a))).map_err(|e| format!("{s:?}: {e} (an address:port, or off)")),
    }
}

/// How ServiceEntry names (`resolution: DNS`) are resolved (docs/egress.md).
#[derive(Debug, clap::Args)]
pub struct DnsArgs {
    /// The node's resolvers, as a `resolv.conf` (read at start).
    #[arg(long, env = "MESH_RESOLV_CONF", default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// The shortest time an answer is used before its name is asked again,
    /// whatever its TTL (Envoy's `dns_min_refresh_rate`); also the first
    /// retry's delay after a failure.
    #[arg(long, env = "MESH_DNS_MIN_TTL", default_value = "5s", value_parser = parse_duration)]
    dns_min_ttl: Duration,
    /// The longest time an answer is used before its name is asked again.
    #[arg(long, env = "MESH_DNS_MAX_TTL", default_value = "5m", value_parser = parse_duration)]
    dns_max_ttl: Duration,
    /// The longest wait between two tries of a failing name (retries double
    /// up to it; Istio's `dnsRefreshRate` default).
    #[arg(long, env = "MESH_DNS_MAX_RETRY", default_value = "60s", value_parser = parse_duration)]
    dns_max_retry: Duration,
    /// Time for one lookup.
    #[arg(long, env = "MESH_DNS_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    dns_timeout: Duration,
    /// Answer meshed pods' DNS queries (UDP and TCP to port 53), as
    /// ztunnel's DNS proxy; a pod opts out with the annotation
    /// `ambient.istio.io/dns-capture: "false"`.
    #[arg(long, env = "MESH_DNS_CAPTURE", default_value_t = true, action = clap::ArgAction::Set)]
    dns_capture: bool,
    /// Queries a second one pod may send the DNS proxy (as many at once); more are dropped.
    #[arg(long, env = "MESH_DNS_PROXY_QPS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    dns_proxy_qps: u32,
    /// Forwarded answers the DNS proxy keeps (each for its TTL, at most 5 min).
    #[arg(long, env = "MESH_DNS_PROXY_CACHE", default_value_t = 4096)]
    dns_proxy_cache: usize,
    /// Time for the node's resolvers to answer a forwarded query.
    #[arg(long, env = "MESH_DNS_UPSTREAM_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    dns_upstream_timeout: Duration,
}

impl From<DnsArgs> for crate::agent::DnsConfig {
    fn from(a: DnsArgs) -> Self {
        crate::agent::DnsConfig {
            resolv_conf: a.resolv_conf,
            settings: crate::dns::Settings {
                min_ttl: a.dns_min_ttl,
                max_ttl: a.dns_max_ttl,
                max_retry: a.dns_max_retry,
                timeout: a.dns_timeout,
            },
            proxy: a.dns_capture.then_some(crate::dns::proxy::ProxySettings {
                upstream_timeout: a.dns_upstream_timeout,
                max_qps_per_pod: a.dns_proxy_qps,
                cache_entries: a.dns_proxy_cache,
            }),
        }
    }
}

/// Bounds on what clients and peers can make the agent hold (docs/limits.md).
#[derive(Debug, clap::Args)]
pub struct LimitArgs {
    /// Connections open at once on one listener (capture, 15006, 15008, each gateway port).
    #[arg(long, env = "MESH_MAX_CONNECTIONS", default_value_t = 65_536)]
    max_connections: usize,
    /// Of those, from one client address.
    #[arg(long, env = "MESH_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 8_192)]
    max_connections_per_source: usize,
    /// TLS handshakes in progress at once on one listener (15008, HTTPS gateways).
    #[arg(long, env = "MESH_MAX_TLS_HANDSHAKES", default_value_t = 512)]
    max_tls_handshakes: usize,
    /// Of those, from one client address.
    #[arg(long, env = "MESH_MAX_TLS_HANDSHAKES_PER_SOURCE", default_value_t = 64)]
    max_tls_handshakes_per_source: usize,
    /// Time for a client to finish its TLS handshake.
    #[arg(long, env = "MESH_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    tls_handshake_timeout: Duration,
    /// Largest HTTP/1 request line and headers, in bytes (Envoy: 60 KiB).
    #[arg(long, env = "MESH_MAX_REQUEST_HEADERS", default_value_t = 60 * 1024, value_parser = clap::value_parser!(u64).range(8192..=16 << 20))]
    max_request_headers: u64,
    /// Concurrent streams on one client HTTP/2 connection.
    #[arg(long, env = "MESH_MAX_HTTP2_STREAMS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    max_http2_streams: u32,
    /// Bytes buffered for one HTTP/2 stream's slow reader before reading upstream stops.
    #[arg(long, env = "MESH_HTTP2_SEND_BUFFER", default_value_t = 256 * 1024, value_parser = clap::value_parser!(u64).range(16384..=16 << 20))]
    http2_send_buffer: u64,
    /// HTTP/2 keep-alive ping interval on client connections (answered within 20 s).
    #[arg(long, env = "MESH_HTTP2_KEEPALIVE", default_value = "30s", value_parser = parse_duration)]
    http2_keepalive: Duration,
    /// Close a connection with no byte either way for this long (Istio: 1h).
    #[arg(long, env = "MESH_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Time for a peer agent to answer an HBONE CONNECT.
    #[arg(long, env = "MESH_HBONE_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    hbone_connect_timeout: Duration,
    /// Time to read a request body the agent keeps for retries or mirroring.
    #[arg(long, env = "MESH_BODY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    body_timeout: Duration,
}

impl From<LimitArgs> for crate::proxy::limits::Limits {
    fn from(a: LimitArgs) -> Self {
        crate::proxy::limits::Limits {
            max_connections: a.max_connections.max(1),
            max_connections_per_source: a.max_connections_per_source.max(1),
            max_handshakes: a.max_tls_handshakes.max(1),
            max_handshakes_per_source: a.max_tls_handshakes_per_source.max(1),
            handshake_timeout: a.tls_handshake_timeout,
            max_request_headers: a.max_request_headers as usize,
            max_streams: a.max_http2_streams,
            h2_send_buffer: a.http2_send_buffer as usize,
            keepalive_interval: a.http2_keepalive,
            keepalive_timeout: std::time::Duration::from_secs(20),
            idle_timeout: a.idle_timeout,
            connect_answer_timeout: a.hbone_connect_timeout,
            body_timeout: a.body_timeout,
        }
    }
}

/// Parses a duration flag in Go's syntax (`250ms`, `1.5s`, `1h30m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::duration::parse_go(s)
}
