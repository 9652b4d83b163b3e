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
//! Server side ([`serve`]): the client chain must lead to the mesh root; the
//! source principal comes from it. The target must be a meshed pod on this node
//! running as the identity the client asked for; AuthorizationPolicy decides;
//! then the agent connects to the pod with the source pod's IP as the client
//! address when that IP belongs to the authenticated identity.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http_body_util::Empty;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    client::conn::http2::SendRequest,
    upgrade::Upgraded,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::{
    identity::{self, IdentityError},
    proxy::Inputs,
    proxy::{self, ProxyError},
    telemetry::TcpLabels,
};

/// HTTP/2 flow-control windows: large enough that one stream can fill a fast
/// link without waiting for WINDOW_UPDATEs.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_FRAME: u32 = 256 * 1024;
/// Streams per pooled connection.
const MAX_STREAMS: u32 = 1000;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const KEEPALIVE: Duration = Duration::from_secs(30);

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
mod server;

pub use client::{Tunnel, TunnelPool, TunnelTo};
pub use server::{GatewayHop, HopServer, connect_request, serve};

#[cfg(test)]
mod tests;
