//! Failures to what is reported, in one place: each failure's metric reason
//! (`mesh_tcp_connection_failures_total`), its response flags (Istio's
//! `response_flags`), and the answer an HTTP client gets from the agent itself
//! ([`LocalReply`]). The L4 proxy, the L7 pipeline and the gateways all ask
//! here.
use hyper::StatusCode;

use super::ProxyError;
use crate::{
    proxy::hbone::HboneError,
    routing::l4::Refusal,
    telemetry::{Flags, TcpLabels},
};

/// An answer the agent gives itself (no upstream response): status, body
/// text (Envoy's wording where Envoy has one) and response flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalReply {
    pub status: StatusCode,
    pub text: &'static str,
    pub flags: Flags,
}

/// The answer to a request for a host outside the registry under REGISTRY_ONLY.
pub const BLACK_HOLE_TEXT: &str =
    "destination not in the service registry: outboundTrafficPolicy is REGISTRY_ONLY (add a ServiceEntry for it)";

impl LocalReply {
    /// No VirtualService rule for the host and path (at a gateway, or after a retry's re-route).
    pub const NO_ROUTE: LocalReply =
        LocalReply { status: StatusCode::NOT_FOUND, text: "no route for this host and path", flags: Flags::NR };
    /// At an HTTPS gateway, a request for a host that the server its TLS
    /// handshake chose does not serve.
    pub const MISDIRECTED: LocalReply = LocalReply {
        status: StatusCode::MISDIRECTED_REQUEST,
        text: "misdirected request: this host is not served on this TLS connection",
        flags: Flags::NR,
    };
    /// `Host` and `:authority` (or an absolute URI) name different hosts.
    pub const AUTHORITY_CONFLICT: LocalReply = LocalReply {
        status: StatusCode::BAD_REQUEST,
        text: "the Host header and the request's authority disagree",
        flags: Flags::DPE,
    };
    /// An upgrade to a protocol other than WebSocket (Envoy's answer to an
    /// upgrade it is not configured for).
    pub const UPGRADE_REFUSED: LocalReply = LocalReply {
        status: StatusCode::FORBIDDEN,
        text: "upgrade failed: only websocket is forwarded",
        flags: Flags::NONE,
    };
    /// The route's timeout passed before a response.
    pub const TIMEOUT: LocalReply =
        LocalReply { status: StatusCode::GATEWAY_TIMEOUT, text: "upstream request timeout", flags: Flags::UT };
    /// `DYNAMIC_DNS`: the request's host did not resolve (Envoy's dynamic
    /// forward proxy's answer).
    pub const DNS_FAILURE: LocalReply =
        LocalReply { status: StatusCode::SERVICE_UNAVAILABLE, text: "DNS resolution failure", flags: Flags::DF };
    /// The upstream reset or closed before answering.
    pub const RESET: LocalReply = LocalReply {
        status: StatusCode::SERVICE_UNAVAILABLE,
        text: "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
        flags: Flags::UC,
    };
    /// A circuit breaker (connectionPool) overflowed.
    pub const OVERFLOW: LocalReply = LocalReply {
        status: StatusCode::SERVICE_UNAVAILABLE,
        text: "upstream connect error or disconnect/reset before headers. reset reason: overflow",
        flags: Flags::UO,
    };
    /// The request body could not be read whole (to keep it for retries).
    pub const BAD_BODY: LocalReply =
        LocalReply { status: StatusCode::BAD_REQUEST, text: "invalid request body", flags: Flags::DPE };

    /// The client did not send the body the agent waited for in time.
    pub const BODY_TIMEOUT: LocalReply =
        LocalReply { status: StatusCode::REQUEST_TIMEOUT, text: "request body timeout", flags: Flags::SI };
    /// A path that is no longer a valid one once normalised.
    pub const BAD_PATH: LocalReply =
        LocalReply { status: StatusCode::BAD_REQUEST, text: "invalid path", flags: Flags::DPE };

    /// An AuthorizationPolicy refused the request (Envoy's RBAC filter's answer).
    pub const RBAC_DENIED: LocalReply =
        LocalReply { status: StatusCode::FORBIDDEN, text: "RBAC: access denied", flags: Flags::NONE };

    /// A body longer than an external authorizer takes, which it does not
    /// take in part (`allowPartialMessage: false`), as Envoy answers.
    pub const TOO_LARGE_FOR_CHECK: LocalReply =
        LocalReply { status: StatusCode::PAYLOAD_TOO_LARGE, text: "Payload Too Large", flags: Flags::NONE };

    /// A JWT that is not valid (Envoy's jwt_authn filter's answer and wording).
    pub fn jwt_refused(error: &crate::identity::jwt::JwtError) -> LocalReply {
        LocalReply { status: StatusCode::UNAUTHORIZED, text: error.text(), flags: Flags::NONE }
    }

    /// The fault filter's abort with its status.
    pub fn fault_abort(status: StatusCode) -> LocalReply {
        LocalReply { status, text: "fault filter abort", flags: Flags::FI }
    }
}

impl ProxyError {
    /// The `reason` label of `mesh_tcp_connection_failures_total`.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            ProxyError::NotIpv4(_) => "not_ipv4",
            ProxyError::Refused { .. } => "no_route",
            ProxyError::ConnectTimeout { .. } => "connect_timeout",
            ProxyError::Connect { .. } => "connect_error",
            ProxyError::Copy { op: super::l4::copy::Failed::Idle, .. } => "idle_timeout",
            ProxyError::Copy { .. } => "copy_error",
            ProxyError::NoNodeAddress { .. } => "no_node_address",
            ProxyError::NoSourceIdentity(_) => "no_identity",
            ProxyError::Tunnel(e) => e.reason(),
            ProxyError::Denied { .. } => "denied",
            ProxyError::PlaintextRefused { .. } => "plaintext_refused",
            ProxyError::NotLocal(_) => "not_local",
            ProxyError::BlackHole(_) => "registry_only",
            ProxyError::Tls { .. } => "tls_error",
            ProxyError::Dns { .. } => "dns_resolution_failure",
        }
    }

    /// Envoy's response flag, as Istio reports it.
    pub(crate) fn flags(&self) -> Flags {
        match self {
            ProxyError::Refused { reason: Refusal::NoReadyEndpoint(_), .. }
            | ProxyError::NotIpv4(_)
            | ProxyError::NoNodeAddress { .. }
            | ProxyError::BlackHole(_) => Flags::UH,
            ProxyError::Refused { .. } | ProxyError::NotLocal(_) => Flags::NR,
            ProxyError::ConnectTimeout { .. }
            | ProxyError::Connect { .. }
            | ProxyError::Tunnel(_)
            | ProxyError::Tls { .. } => Flags::UF,
            ProxyError::Dns { .. } => Flags::DF,
            ProxyError::Copy { .. }
            | ProxyError::NoSourceIdentity(_)
            | ProxyError::Denied { .. }
            | ProxyError::PlaintextRefused { .. } => Flags::NONE,
        }
    }

    /// The answer an HTTP client gets when its request fails so.
    pub(crate) fn reply(&self) -> LocalReply {
        let flags = self.flags();
        let (status, text) = match self {
            ProxyError::Refused { .. } => (StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"),
            ProxyError::BlackHole(_) => (StatusCode::BAD_GATEWAY, BLACK_HOLE_TEXT),
            // Refused by policy here or by the destination's agent.
            ProxyError::Denied { .. }
            | ProxyError::PlaintextRefused { .. }
            | ProxyError::Tunnel(HboneError::Status { status: StatusCode::UNAUTHORIZED, .. }) => {
                (StatusCode::FORBIDDEN, "RBAC: access denied")
            }
            _ => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
            ),
        };
        let flags = if status == StatusCode::FORBIDDEN { Flags::NONE } else { flags };
        LocalReply { status, text, flags }
    }
}

/// A request or connection routing refused, with the labels to count it under.
pub(crate) struct Refused {
    pub labels: TcpLabels,
    pub error: ProxyError,
}
