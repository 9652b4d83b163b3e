//! Which protocol a connection speaks: declared on the Service port (Istio's
//! rules: `appProtocol`, else the port name's prefix), else sniffed from the
//! client's first bytes. Pure functions, tested with tables.
use serde::Serialize;

use crate::state::ServicePort;

/// What a Service port declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Declared {
    Http,
    Http2,
    Grpc,
    /// Opaque bytes: `tcp`, `tls`, `https` (the application's own TLS), and
    /// the other names Istio treats as TCP (mongo, mysql, redis, ...).
    Tcp,
    /// Nothing declared: sniff.
    Unknown,
}

/// What the agent does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    /// HTTP/1.1 (and WebSocket through Upgrade).
    Http1,
    /// HTTP/2 with prior knowledge (h2c), gRPC included.
    Http2,
    /// A byte stream.
    Tcp,
}

/// Istio's protocol selection for a Service port.
pub fn declared(port: &ServicePort) -> Declared {
    if let Some(p) = port.app_protocol.as_deref() {
        return from_name(&p.to_ascii_lowercase()).unwrap_or(Declared::Unknown);
    }
    let Some(name) = port.name.as_deref() else { return Declared::Unknown };
    // `http`, `http-web`, `grpc-api`: the part before the first '-'; `grpc-web`
    // is a protocol of its own.
    let lower = name.to_ascii_lowercase();
    if lower == "grpc-web" || lower.starts_with("grpc-web-") {
        return Declared::Http;
    }
    from_name(lower.split('-').next().unwrap_or_default()).unwrap_or(Declared::Unknown)
}

fn from_name(p: &str) -> Option<Declared> {
    Some(match p {
        "http" | "grpc-web" | "kubernetes.io/ws" | "kubernetes.io/wss" => Declared::Http,
        "http2" | "kubernetes.io/h2c" => Declared::Http2,
        "grpc" => Declared::Grpc,
        "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "udp" => Declared::Tcp,
        _ => return None,
    })
}

/// Istio's upstream HTTP version for a request (Envoy's cluster protocol
/// options): `http2`/`grpc` ports speak HTTP/2, `http` ports HTTP/1.1
/// (unless the DestinationRule asks for `h2UpgradePolicy: UPGRADE`, or the
/// request is gRPC, which needs HTTP/2), sniffed ports (and pod addresses)
/// the client's version (`USE_DOWNSTREAM_PROTOCOL`); at a gateway, gRPC asks
/// for HTTP/2. `useClientProtocol` keeps the client's version everywhere. An
/// HTTP/1.1 Upgrade stays HTTP/1.1; WebSocket over HTTP/2 to an HTTP/1.1
/// upstream becomes an Upgrade there.
pub fn upstream_http2(
    port: Option<Declared>,
    client_h2: bool,
    grpc: bool,
    at_gateway: bool,
    pool: &crate::state::traffic::ConnectionPool,
    upgrade: bool,
) -> bool {
    if upgrade && !client_h2 {
        return false;
    }
    if pool.use_client_protocol {
        return client_h2;
    }
    match port {
        Some(Declared::Http2 | Declared::Grpc) => true,
        Some(Declared::Http) => grpc || (pool.h2_upgrade && !upgrade),
        _ if at_gateway => grpc,
        _ => client_h2,
    }
}

/// The outcome of looking at the first bytes a client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    Http2,
    /// TLS ClientHello or anything else: opaque.
    Other,
    /// Too few bytes to tell yet.
    NeedMore,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE"];

/// Classifies a prefix of the client's first bytes.
pub fn sniff(prefix: &[u8]) -> Sniffed {
    if prefix.is_empty() {
        return Sniffed::NeedMore;
    }
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Sniffed::Http2 } else { Sniffed::NeedMore };
    }
    let mut maybe = false;
    for m in METHODS {
        let with_space = m.len() + 1;
        if prefix.len() >= with_space {
            if prefix.starts_with(m) && prefix[m.len()] == b' ' {
                return Sniffed::Http1;
            }
        } else if m.starts_with(prefix) || prefix.starts_with(m) {
            maybe = true;
        }
    }
    if maybe { Sniffed::NeedMore } else { Sniffed::Other }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Protocol, TargetPort};

    fn port(name: Option<&str>, app: Option<&str>) -> ServicePort {
        ServicePort {
            name: name.map(Into::into),
            port: 80,
            target: TargetPort::Number(80),
            protocol: Protocol::Tcp,
            app_protocol: app.map(Into::into),
        }
    }

    #[test]
    fn declared_by_app_protocol_then_name() {
        let cases = [
            (Some("http"), None, Declared::Http),
            (Some("http-web"), None, Declared::Http),
            (Some("HTTP2-x"), None, Declared::Http2),
            (Some("grpc"), None, Declared::Grpc),
            (Some("grpc-api"), None, Declared::Grpc),
            (Some("grpc-web"), None, Declared::Http),
            (Some("tcp-echo"), None, Declared::Tcp),
            (Some("https"), None, Declared::Tcp),
            (Some("tls"), None, Declared::Tcp),
            (Some("mysql"), None, Declared::Tcp),
            (Some("web"), None, Declared::Unknown),
            (Some("httpx"), None, Declared::Unknown),
            (None, None, Declared::Unknown),
            (Some("tcp"), Some("http"), Declared::Http),
            (Some("http"), Some("kubernetes.io/h2c"), Declared::Http2),
            (Some("http"), Some("custom"), Declared::Unknown),
        ];
        for (name, app, want) in cases {
            assert_eq!(declared(&port(name, app)), want, "{name:?} {app:?}");
        }
    }

    #[test]
    fn sniffing_first_bytes() {
        let cases: [(&[u8], Sniffed); 10] = [
            (b"", Sniffed::NeedMore),
            (b"GE", Sniffed::NeedMore),
            (b"GET / HTTP/1.1\r\n", Sniffed::Http1),
            (b"POST /x HTTP/1.1\r\n", Sniffed::Http1),
            (b"OPTIONS * HTTP/1.1\r\n", Sniffed::Http1),
            (b"PRI * HTTP/2.0\r\n", Sniffed::NeedMore),
            (H2_PREFACE, Sniffed::Http2),
            (b"\x16\x03\x01\x02\x00", Sniffed::Other),
            (b"GETX / HTTP/1.1", Sniffed::Other),
            (b"SSH-2.0-OpenSSH", Sniffed::Other),
        ];
        for (bytes, want) in cases {
            assert_eq!(sniff(bytes), want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn upstream_version_follows_istio() {
        use crate::state::traffic::ConnectionPool;
        let default = ConnectionPool::default();
        let upgrade = ConnectionPool { h2_upgrade: true, ..ConnectionPool::default() };
        let client = ConnectionPool { use_client_protocol: true, ..ConnectionPool::default() };
        let (http, h2, grpc_port, sniffed) =
            (Some(Declared::Http), Some(Declared::Http2), Some(Declared::Grpc), Some(Declared::Unknown));
        // (port, client h2, gRPC, at a gateway, pool, upgrade) → upstream h2
        let cases = [
            ("h2c client, http port", http, true, false, false, &default, false, false),
            ("h1 client, http port", http, false, false, false, &default, false, false),
            ("gRPC on an http port", http, true, true, false, &default, false, true),
            ("h1 client, http2 port", h2, false, false, false, &default, false, true),
            ("h1 client, grpc port", grpc_port, false, true, false, &default, false, true),
            ("h1 client, sniffed port", sniffed, false, false, false, &default, false, false),
            ("h2c client, sniffed port", sniffed, true, false, false, &default, false, true),
            ("h2 client at a gateway, no declared port", None, true, false, true, &default, false, false),
            ("gRPC at a gateway", None, true, true, true, &default, false, true),
            ("h2UpgradePolicy UPGRADE", http, false, false, false, &upgrade, false, true),
            ("UPGRADE leaves an Upgrade alone", http, false, false, false, &upgrade, true, false),
            ("useClientProtocol, h2c client", http, true, false, false, &client, false, true),
            ("useClientProtocol, h1 client", h2, false, false, false, &client, false, false),
            ("h1 Upgrade to an http2 port", h2, false, false, false, &default, true, false),
            ("WebSocket over HTTP/2 to an http port", http, true, false, false, &default, true, false),
            ("WebSocket over HTTP/2 to an http2 port", h2, true, false, false, &default, true, true),
        ];
        for (name, port, client_h2, grpc, gateway, pool, upgrade, want) in cases {
            assert_eq!(upstream_http2(port, client_h2, grpc, gateway, pool, upgrade), want, "{name}");
        }
    }
}
