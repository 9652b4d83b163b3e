//! What the pipeline reads from and writes into requests' headers: gRPC,
//! hop-by-hop names, upgrades, request ids, the path and authority, rewrites.
use std::{net::SocketAddrV4, sync::Arc, time::Duration};

use hyper::{
    Request,
    body::Incoming,
    header::{self, HeaderMap, HeaderName, HeaderValue},
};

use super::{Downstream, HOP_BY_HOP};
use crate::{proxy::Inputs, routing::http as routing, state::traffic};

pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/grpc"))
}

/// Removes hop-by-hop headers, and those `Connection` names, before a
/// message is forwarded (`keep_upgrade` for a protocol upgrade).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Headers named in `Connection` are hop-by-hop too.
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .filter(|n| !HOP_BY_HOP.contains(n))
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for h in &HOP_BY_HOP {
        if keep_upgrade && (h == header::UPGRADE || h == header::CONNECTION) {
            continue;
        }
        if h == header::TE && headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers")) {
            continue;
        }
        headers.remove(h);
    }
}

/// An HTTP/2 extended CONNECT (RFC 8441), as WebSocket over HTTP/2 uses.
pub(crate) fn is_extended_connect<B>(req: &Request<B>) -> bool {
    req.method() == hyper::Method::CONNECT && req.extensions().get::<hyper::ext::Protocol>().is_some()
}

/// A WebSocket upgrade (HTTP/1.1 `Upgrade: websocket`, or an HTTP/2
/// extended CONNECT for `websocket`): the only upgrade Istio configures Envoy
/// to forward (`upgrade_configs: websocket`).
pub(crate) fn wants_upgrade<B>(req: &Request<B>) -> bool {
    upgrade_asked(req) == Upgrade::WebSocket
}

/// A request whose target names one host (`:authority` in HTTP/2, an
/// absolute URI in HTTP/1.1) and whose `Host` header another: malformed
/// (RFC 9113 §8.3.1), and a way to show routing one host and policy another.
pub(crate) fn authority_conflict<B>(req: &Request<B>) -> bool {
    match (req.uri().authority(), req.headers().get(header::HOST)) {
        (Some(a), Some(h)) => !a.as_str().as_bytes().eq_ignore_ascii_case(h.as_bytes()),
        _ => false,
    }
}

/// What a request asks to switch to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Upgrade {
    /// Nothing (or `h2c`, which is dropped and the request served as HTTP/1.1, as Envoy does).
    None,
    WebSocket,
    /// Another protocol: refused (403), as Envoy refuses an upgrade it is not configured for.
    Refused,
}

pub(crate) fn upgrade_asked<B>(req: &Request<B>) -> Upgrade {
    if let Some(protocol) = req.extensions().get::<hyper::ext::Protocol>()
        && req.method() == hyper::Method::CONNECT
    {
        return match protocol.as_str().eq_ignore_ascii_case("websocket") {
            true => Upgrade::WebSocket,
            false => Upgrade::Refused,
        };
    }
    let connection_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")));
    if req.version() > hyper::Version::HTTP_11 || !connection_upgrade {
        return Upgrade::None;
    }
    let tokens: Vec<&str> = req
        .headers()
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if tokens.iter().any(|t| t.eq_ignore_ascii_case("websocket")) {
        Upgrade::WebSocket
    } else if tokens.iter().all(|t| t.eq_ignore_ascii_case("h2c")) {
        Upgrade::None
    } else {
        Upgrade::Refused
    }
}

/// A UUID v4 for `x-request-id`, from the agent's generator (seeded from
/// the OS; as Envoy's, not a secret): no system call per request.
pub(crate) fn request_id(ctx: &Inputs) -> HeaderValue {
    let (hi, lo) = (ctx.next_random(), ctx.next_random());
    let hi = (hi & !0xf000) | 0x4000; // version 4
    let lo = (lo & !(0xc << 60)) | (0x8 << 60); // RFC 4122 variant
    let b = ((u128::from(hi) << 64) | u128::from(lo)).to_be_bytes();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 36];
    let mut o = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[o] = b'-';
            o += 1;
        }
        out[o] = HEX[usize::from(byte >> 4)];
        out[o + 1] = HEX[usize::from(byte & 0xf)];
        o += 2;
    }
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("00000000-0000-4000-8000-000000000000"))
}

pub(crate) fn view_path(req: &Request<Incoming>) -> String {
    req.uri().path_and_query().map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned())
}

/// The authority the client asked for: the URI's (HTTP/2, absolute form), else Host.
pub(crate) fn request_authority(req: &Request<Incoming>, down: &Downstream) -> String {
    req.uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned))
        .unwrap_or_else(|| down.orig.to_string())
}

/// Applies `rewrite`: the path (the matched prefix, or all of it) and the authority.
pub(crate) fn rewrite(req: &mut Request<Incoming>, w: &traffic::Rewrite, matched_prefix: Option<&str>) {
    let mut parts = req.uri().clone().into_parts();
    if let Some(uri) = &w.uri {
        let prefix = matched_prefix.filter(|_| !w.full_path);
        let path = routing::rewrite_path(&view_path(req), prefix, uri);
        if let Ok(pq) = path.parse() {
            parts.path_and_query = Some(pq);
        }
    }
    if let Some(authority) = &w.authority {
        if parts.authority.is_some()
            && let Ok(a) = authority.parse()
        {
            parts.authority = Some(a);
        }
        if let Ok(v) = HeaderValue::from_str(authority) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    if let Ok(uri) = hyper::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// The request head as it goes upstream: hop-by-hop headers removed (kept
/// for an upgrade), the version chosen, and the URI in the form that
/// version needs (`orig` names the authority when the client gave none).
pub(crate) fn for_upstream(parts: &mut hyper::http::request::Parts, upgrade: bool, h2: bool, orig: SocketAddrV4) {
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.version = if h2 { hyper::Version::HTTP_2 } else { hyper::Version::HTTP_11 };
    if h2 {
        // HTTP/2 needs the scheme and authority in the URI: the request's
        // host (so `:authority` and any `Host` agree), else the address.
        let host = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned);
        let authority =
            host.or_else(|| parts.uri.authority().map(|a| a.to_string())).unwrap_or_else(|| orig.to_string());
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        if let Ok(uri) = format!("http://{authority}{path}").parse() {
            parts.uri = uri;
        }
    } else if parts.uri.authority().is_some() {
        // Absolute-form from the client: origin-form upstream, Host kept.
        let path = parts.uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
        if let Ok(uri) = path.parse() {
            parts.uri = uri;
        }
    }
}

/// Replaces the request's path, keeping its query (and any scheme and authority).
pub(crate) fn set_path(req: &mut Request<Incoming>, path: &str) -> Result<(), hyper::http::Error> {
    let mut parts = req.uri().clone().into_parts();
    let with_query = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    parts.path_and_query = Some(with_query.parse().map_err(hyper::http::Error::from)?);
    *req.uri_mut() = hyper::Uri::from_parts(parts).map_err(hyper::http::Error::from)?;
    Ok(())
}

/// An HTTP/2 extended CONNECT (RFC 8441) as the HTTP/1.1 Upgrade request an
/// HTTP/1.1 upstream expects: `GET` with `Upgrade: <protocol>` and, for
/// WebSocket, the handshake headers RFC 8441 leaves out.
pub(crate) fn connect_to_upgrade(parts: &mut hyper::http::request::Parts) {
    let protocol = parts.extensions.remove::<hyper::ext::Protocol>();
    let protocol = protocol.as_ref().map_or("websocket", |p| p.as_str()).to_owned();
    parts.method = hyper::Method::GET;
    if let Ok(v) = HeaderValue::from_str(&protocol) {
        parts.headers.insert(header::UPGRADE, v);
    }
    parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if protocol.eq_ignore_ascii_case("websocket") {
        if !parts.headers.contains_key(header::SEC_WEBSOCKET_KEY) {
            use base64::Engine as _;
            let nonce = crate::identity::random_bytes::<16>().unwrap_or_default();
            let key = base64::engine::general_purpose::STANDARD.encode(nonce);
            if let Ok(v) = HeaderValue::from_str(&key) {
                parts.headers.insert(header::SEC_WEBSOCKET_KEY, v);
            }
        }
        if !parts.headers.contains_key(header::SEC_WEBSOCKET_VERSION) {
            parts.headers.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        }
    }
}

/// A client stream that counts what moves through it, for the idle timer.
pub(crate) struct Counting<I> {
    pub inner: I,
    pub moved: Arc<std::sync::atomic::AtomicU64>,
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counting<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.moved.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counting<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.moved.fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Resolves once `moved` stays the same for a whole `idle` period.
pub(crate) async fn idle(moved: &std::sync::atomic::AtomicU64, idle: Duration) {
    let mut seen = moved.load(std::sync::atomic::Ordering::Relaxed);
    loop {
        tokio::time::sleep(idle).await;
        let now = moved.load(std::sync::atomic::Ordering::Relaxed);
        if now == seen {
            return;
        }
        seen = now;
    }
}

#[cfg(test)]
mod upgrade_tests {
    use super::{Upgrade, upgrade_asked};

    /// Only WebSocket is forwarded; `h2c` is dropped (the request served as
    /// it came), anything else refused.
    #[test]
    fn only_websocket_upgrades_are_forwarded() {
        let req = |connection: &str, upgrade: &str| {
            let mut b = hyper::Request::builder().uri("/");
            if !connection.is_empty() {
                b = b.header("connection", connection);
            }
            if !upgrade.is_empty() {
                b = b.header("upgrade", upgrade);
            }
            b.body(()).expect("request")
        };
        let table = [
            ("Upgrade", "websocket", Upgrade::WebSocket),
            ("keep-alive, Upgrade", "WebSocket", Upgrade::WebSocket),
            ("Upgrade, HTTP2-Settings", "h2c", Upgrade::None),
            ("Upgrade", "tls/1.2", Upgrade::Refused),
            ("Upgrade", "h2c, evil", Upgrade::Refused),
            ("", "websocket", Upgrade::None),
            ("Upgrade", "", Upgrade::None),
        ];
        for (connection, upgrade, want) in table {
            assert_eq!(upgrade_asked(&req(connection, upgrade)), want, "{connection:?} {upgrade:?}");
        }
    }
}
