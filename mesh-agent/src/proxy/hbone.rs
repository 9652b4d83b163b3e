//! HBONE, as Istio ambient uses it: mTLS between node agents on port 15008,
//! and one HTTP/2 `CONNECT <pod-ip>:<port>` stream per proxied connection.
//!
//! Client side ([`TunnelPool`]): the source agent presents the **source workload's**
//! certificate and accepts only a server presenting the **destination
//! workload's** identity (asked for by TLS server name, see
//! [`identity::server_name_for`]). HTTP/2 connections are pooled per
//! (source identity, destination node, destination identity) and reused; a
//! renewed source certificate starts a new connection while streams on the old
//! one run to their end. The original client's IP travels in `Forwarded: for=`.
//!
//! Server side: [`crate::proxy::inbound::hbone`] (an HBONE stream is an
//! arrival at a local pod); this module keeps what both sides share, and
//! [`connect_request`], the server's reading of a CONNECT.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http_body_util::Empty;
use hyper::{Method, Request, StatusCode, body::Bytes, client::conn::http2::SendRequest, upgrade::Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::{
    identity::{self, IdentityError},
    proxy::Inputs,
    proxy::{self, ProxyError},
};

/// HTTP/2 flow-control windows: large enough that one stream can fill a fast
/// link without waiting for WINDOW_UPDATEs.
pub(crate) const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub(crate) const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub(crate) const MAX_FRAME: u32 = 256 * 1024;
/// Streams per pooled connection.
pub(crate) const MAX_STREAMS: u32 = 1000;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("source certificate: {0}")]
    Identity(#[from] IdentityError),
    #[error("connect to agent {addr}: {error}")]
    Connect { addr: SocketAddrV4, error: std::io::Error },
    #[error("connect to agent {addr} timed out")]
    ConnectTimeout { addr: SocketAddrV4 },
    #[error("mTLS with agent {addr} (expecting {expected}): {error}")]
    Tls { addr: SocketAddrV4, expected: Arc<str>, error: std::io::Error },
    #[error("HTTP/2 with agent {addr}: {error}")]
    Http { addr: SocketAddrV4, error: hyper::Error },
    #[error("agent {addr} did not answer CONNECT {target} in time")]
    AnswerTimeout { addr: SocketAddrV4, target: SocketAddrV4 },
    #[error("agent {addr} answered {status} for CONNECT {target}: {reason}")]
    Status { addr: SocketAddrV4, target: SocketAddrV4, status: StatusCode, reason: String },
}

impl HboneError {
    pub fn reason(&self) -> &'static str {
        match self {
            HboneError::Identity(_) => "no_certificate",
            HboneError::Connect { .. } | HboneError::ConnectTimeout { .. } => "tunnel_connect",
            HboneError::AnswerTimeout { .. } => "tunnel_timeout",
            HboneError::Tls { .. } => "tunnel_tls",
            HboneError::Http { .. } => "tunnel_http",
            HboneError::Status { status, .. } if *status == StatusCode::UNAUTHORIZED => "denied_by_peer",
            HboneError::Status { .. } => "tunnel_refused",
        }
    }
}

mod client;

pub use client::{Tunnel, TunnelPool, TunnelTo};

/// What a CONNECT asks for: the target pod address; the original client's
/// IP and the Service it addressed, when the source agent names them
/// (`Forwarded: for=<ip>;host=<service hostname>`, as ztunnel writes it).
/// The host is a claim for metrics only: the destination keeps it only if it
/// names a Service of the target pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectAsk {
    pub target: SocketAddrV4,
    pub client_ip: Option<Ipv4Addr>,
    pub service_host: Option<String>,
}

/// Reads a CONNECT, or gives the answer to refuse it with. Pure, for the
/// peer's bytes decide it (fuzzed).
pub fn connect_request(
    method: &Method,
    uri: &hyper::Uri,
    headers: &hyper::HeaderMap,
) -> Result<ConnectAsk, (StatusCode, &'static str)> {
    if method != Method::CONNECT {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "only CONNECT is served on this port"));
    }
    let Some(target) = uri.authority().and_then(|a| a.as_str().parse::<SocketAddrV4>().ok()) else {
        return Err((StatusCode::BAD_REQUEST, "CONNECT target must be <ipv4>:<port>"));
    };
    let (client_ip, service_host) = forwarded(headers);
    Ok(ConnectAsk { target, client_ip, service_host })
}

/// The longest Service hostname taken from a peer (a DNS name's limit).
const MAX_HOST: usize = 253;

/// `Forwarded: for=<ip>;host=<name>` (RFC 7239), first element: the client's
/// IPv4 address (ztunnel's `for="<ip>:<port>"` too) and the host.
fn forwarded(headers: &hyper::HeaderMap) -> (Option<Ipv4Addr>, Option<String>) {
    let Some(first) = headers.get("forwarded").and_then(|v| v.to_str().ok()).and_then(|v| v.split(',').next()) else {
        return (None, None);
    };
    let (mut ip, mut host) = (None, None);
    for (k, v) in first.split(';').filter_map(|kv| kv.trim().split_once('=')) {
        let v = v.trim().trim_matches('"');
        if k.eq_ignore_ascii_case("for") {
            ip = v.parse().ok().or_else(|| v.parse::<SocketAddrV4>().ok().map(|a| *a.ip()));
        } else if k.eq_ignore_ascii_case("host") && !v.is_empty() && v.len() <= MAX_HOST {
            host = Some(v.to_ascii_lowercase());
        }
    }
    (ip, host)
}

/// The `Forwarded` value a source agent sends: the client's IP, and the
/// Service it addressed when there is one.
pub(crate) fn forwarded_value(client_ip: Ipv4Addr, service_host: Option<&str>) -> String {
    match service_host {
        Some(h) => format!("for={client_ip};host={h}"),
        None => format!("for={client_ip}"),
    }
}

/// The second hop of the egress-gateway pattern, given by the agent (the
/// gateway module implements it; HBONE does not import it): for a CONNECT
/// target and the identity the connection was made for, what serves the
/// stream when the target is a gateway port of this node run as that identity.
pub type GatewayHop = std::sync::Arc<dyn Fn(std::net::SocketAddrV4, &str) -> Option<HopServer> + Send + Sync>;

/// Serves one upgraded CONNECT stream from `peer`.
/// Serves one upgraded CONNECT stream from `peer`, for the client identity
/// and address the stream was admitted with.
pub type HopServer = Box<
    dyn FnOnce(
            hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>,
            std::net::SocketAddr,
            Option<std::sync::Arc<str>>,
            std::net::Ipv4Addr,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send,
>;

#[cfg(test)]
mod tests;
