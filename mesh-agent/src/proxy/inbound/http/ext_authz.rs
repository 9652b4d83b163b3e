//! CUSTOM authorization: the destination's agent asks an external authorizer
//! about a request, as Envoy's ext_authz filter does, over HTTP (the
//! request's method and path under `pathPrefix`, with the headers the
//! provider names; 200 allows) or gRPC (`envoy.service.auth.v3.Authorization/Check`,
//! types from `envoy-types`). A denial answers the client with the
//! authorizer's status, headers and body. An authorizer that cannot be asked
//! (no endpoint, connect error, timeout; over HTTP, a 5xx too) lets the
//! request through only with `failOpen`, else answers `statusOnError`.
//!
//! A meshed authorizer is reached through the mesh, as the protected
//! workload's own call: over HBONE (mutual TLS, the workload's identity) to
//! another node, so that a STRICT authorizer takes the check and nothing
//! crosses the network in clear. The mesh refusing the call (policy at the
//! authorizer) is an answer, not an outage: `failOpen` does not apply.
use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
};

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HeaderValueOption, HttpResponse};
use envoy_types::pb::envoy::{
    config::core::v3::{Address, SocketAddress, address, socket_address::PortSpecifier},
    service::auth::v3::{AttributeContext, attribute_context, authorization_client::AuthorizationClient},
};
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Request, Response, StatusCode,
    body::Bytes,
    header::{self, HeaderMap, HeaderName, HeaderValue},
    http::request::Parts,
};

use super::{Body, Inbound};
use crate::{
    proxy::{
        Inputs, ProxyError,
        hbone::HboneError,
        upstream::{Hop, Upstream},
    },
    state::{
        State, Workload,
        security::{ExtAuthz, ExtAuthzKind, HttpAuthz, Pattern},
    },
};

/// The authorizer's answer, as the request goes on.
pub(super) enum Checked {
    Allow {
        /// Set on the request to the pod (replacing any of the same name).
        upstream: Vec<(HeaderName, HeaderValue)>,
        /// Removed from the request to the pod.
        remove: Vec<HeaderName>,
        /// Added to the response to the client.
        downstream: Vec<(HeaderName, HeaderValue)>,
    },
    Deny(Response<Body>),
}

/// What the authorizer is told about a request.
pub(super) struct Ask<'a> {
    pub parts: &'a Parts,
    /// The body, or its first bytes, when the provider asks for it.
    pub body: Option<&'a Bytes>,
    pub conn: &'a Inbound,
}

/// gRPC channels to authorizers, by address and the identity that calls
/// (one HTTP/2 connection each, shared by every check).
#[derive(Default)]
pub struct Channels(Mutex<HashMap<ChannelKey, tonic::transport::Channel>>);

/// The authorizer's address, and the identity checks go with (none: from
/// the agent's own address, to an authorizer outside the mesh).
type ChannelKey = (SocketAddrV4, Option<Arc<str>>);

/// Where a check goes: the authorizer's endpoint, and it as a workload when
/// it is one (then reached through the mesh).
#[derive(Clone)]
struct Authorizer {
    addr: SocketAddrV4,
    endpoint: Option<Arc<Workload>>,
}

/// Why a check got no answer.
enum Failed {
    /// The authorizer could not be reached or failed: `failOpen` applies.
    Unreachable(String),
    /// The mesh refused the call (the authorizer's policy): a denial.
    Refused(String),
}

impl From<String> for Failed {
    fn from(why: String) -> Self {
        Failed::Unreachable(why)
    }
}

pub(super) async fn check(ctx: &Arc<Inputs>, p: &ExtAuthz, ask: Ask<'_>) -> Checked {
    let Some(to) = resolve(&ctx.state(), p, ctx.next_pick()) else {
        return unreachable(p, "no ready endpoint for the authorizer's service and port");
    };
    let asked = async {
        match &p.kind {
            ExtAuthzKind::Http(h) => http(ctx, p, h, &to, &ask).await,
            ExtAuthzKind::Grpc => grpc(ctx, &to, &ask).await,
        }
    };
    match tokio::time::timeout(p.timeout, asked).await {
        Ok(Ok(checked)) => checked,
        Ok(Err(Failed::Unreachable(why))) => unreachable(p, &why),
        Ok(Err(Failed::Refused(why))) => {
            tracing::warn!(provider = %p.name, "external authorization refused by the mesh: {why}");
            let status = StatusCode::from_u16(p.status_on_error).unwrap_or(StatusCode::FORBIDDEN);
            Checked::Deny(answer(status, HeaderMap::new(), Bytes::new()))
        }
        Err(_) => unreachable(p, "timed out"),
    }
}

/// A connection to the authorizer: through the mesh as the protected
/// workload (`dest` of the request) when the authorizer is meshed, else from
/// the agent's own address.
async fn connect(ctx: &Arc<Inputs>, to: &Authorizer, caller: &Arc<Workload>) -> Result<Upstream, Failed> {
    let Some(endpoint) = to.endpoint.as_ref().filter(|w| w.meshed) else {
        let tcp = crate::proxy::l4::connect(to.addr, None, ctx.connect_timeout).await.map_err(|e| e.to_string())?;
        return Ok(Upstream::Tcp(tcp));
    };
    let state = ctx.state();
    let peer = std::net::SocketAddr::from((caller.ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED), 0));
    let hop = Hop { source: Some(caller), peer, dest: Some(endpoint), addr: to.addr, service: None, opaque: false };
    let opened = (ctx.dial)(ctx, &state, hop, ctx.connect_timeout).await;
    match opened {
        Ok(o) => Ok(o.into_io()),
        Err(e @ (ProxyError::Denied { .. } | ProxyError::PlaintextRefused { .. })) => {
            Err(Failed::Refused(e.to_string()))
        }
        Err(ProxyError::Tunnel(HboneError::Status { status, .. }))
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN =>
        {
            Err(Failed::Refused(format!("the authorizer's agent answered {status}")))
        }
        Err(e) => Err(Failed::Unreachable(e.to_string())),
    }
}

/// The authorizer could not be asked (or failed): `failOpen` lets the
/// request through, else `statusOnError`.
fn unreachable(p: &ExtAuthz, why: &str) -> Checked {
    tracing::warn!(provider = %p.name, fail_open = p.fail_open, "external authorization failed: {why}");
    if p.fail_open {
        return Checked::Allow { upstream: Vec::new(), remove: Vec::new(), downstream: Vec::new() };
    }
    let status = StatusCode::from_u16(p.status_on_error).unwrap_or(StatusCode::FORBIDDEN);
    Checked::Deny(answer(status, HeaderMap::new(), Bytes::new()))
}

fn answer(status: StatusCode, headers: HeaderMap, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body).map_err(|e| match e {}).boxed_unsync());
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    r
}

/// An endpoint of the authorizer's Service (or ServiceEntry host) for its port.
fn resolve(state: &State, p: &ExtAuthz, pick: usize) -> Option<Authorizer> {
    let (addr, endpoint) = state.provider_endpoint(&p.service, p.port, pick)?;
    Some(Authorizer { addr, endpoint })
}

fn matches(patterns: &[Pattern], name: &str) -> bool {
    patterns.iter().any(|p| p.matches(name))
}

/// Envoy's HTTP ext_authz: the request's method, `pathPrefix` + its path,
/// `Host`, `Content-Length` and the headers the provider names.
async fn http(
    ctx: &Arc<Inputs>,
    p: &ExtAuthz,
    h: &HttpAuthz,
    to: &Authorizer,
    ask: &Ask<'_>,
) -> Result<Checked, Failed> {
    let parts = ask.parts;
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut req = Request::builder().method(parts.method.clone()).uri(format!("{}{path}", h.path_prefix));
    let host = parts
        .headers
        .get(header::HOST)
        .cloned()
        .or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    if let Some(host) = host {
        req = req.header(header::HOST, host);
    }
    for (name, value) in &parts.headers {
        if name != header::HOST && matches(&h.include_request_headers, name.as_str()) {
            req = req.header(name, value);
        }
    }
    for (k, v) in &h.include_additional_headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let body = ask.body.cloned().unwrap_or_default();
    let req = req.body(Full::new(body)).map_err(|e| format!("check request: {e}"))?;
    let io = connect(ctx, to, &ask.conn.dest).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(conn);
    let resp = send.send_request(req).await.map_err(|e| format!("HTTP: {e}"))?;
    let status = resp.status();
    if status.is_server_error() && p.fail_open {
        return Err(Failed::Unreachable(format!("the authorizer answered {status}")));
    }
    let (parts, body) = resp.into_parts();
    let pick = |patterns: &[Pattern]| -> Vec<(HeaderName, HeaderValue)> {
        let named = parts.headers.iter().filter(|(n, _)| matches(patterns, n.as_str()));
        named.map(|(n, v)| (n.clone(), v.clone())).collect()
    };
    if status == StatusCode::OK {
        return Ok(Checked::Allow {
            upstream: pick(&h.headers_to_upstream_on_allow),
            remove: Vec::new(),
            downstream: pick(&h.headers_to_downstream_on_allow),
        });
    }
    let body = http_body_util::Limited::new(body, 64 * 1024).collect().await;
    let body = body.map(|b| b.to_bytes()).unwrap_or_default();
    let mut headers = HeaderMap::new();
    for (n, v) in &parts.headers {
        let wanted =
            h.headers_to_downstream_on_deny.is_empty() || matches(&h.headers_to_downstream_on_deny, n.as_str());
        if wanted && !is_framing(n) {
            headers.append(n.clone(), v.clone());
        }
    }
    Ok(Checked::Deny(answer(status, headers, body)))
}

/// Headers that belong to the authorizer's own message, not to the answer.
fn is_framing(name: &HeaderName) -> bool {
    name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING || name == header::CONNECTION
}

fn socket(ip: std::net::Ipv4Addr, port: u16, principal: Option<&str>) -> attribute_context::Peer {
    let addr = SocketAddress {
        address: ip.to_string(),
        port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
        ..Default::default()
    };
    attribute_context::Peer {
        address: Some(Address { address: Some(address::Address::SocketAddress(addr)) }),
        principal: principal.unwrap_or_default().to_owned(),
        ..Default::default()
    }
}

/// `envoy.service.auth.v3.Authorization/Check`.
async fn grpc(ctx: &Arc<Inputs>, to: &Authorizer, ask: &Ask<'_>) -> Result<Checked, Failed> {
    let parts = ask.parts;
    let mut headers: HashMap<String, String> = HashMap::new();
    for (n, v) in &parts.headers {
        let v = String::from_utf8_lossy(v.as_bytes());
        headers.entry(n.as_str().to_owned()).and_modify(|all| *all = format!("{all},{v}")).or_insert_with(|| v.into());
    }
    let host = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let host = host.or(parts.uri.authority().map(|a| a.as_str())).unwrap_or_default();
    let body = ask.body.cloned().unwrap_or_default();
    let http = attribute_context::HttpRequest {
        id: headers.get("x-request-id").cloned().unwrap_or_default(),
        method: parts.method.to_string(),
        path: parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).to_owned(),
        host: host.to_owned(),
        scheme: "http".into(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        protocol: match parts.version {
            hyper::Version::HTTP_2 => "HTTP/2",
            hyper::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        }
        .into(),
        size: i64::try_from(body.len()).unwrap_or(i64::MAX),
        body: String::from_utf8_lossy(&body).into_owned(),
        raw_body: body.to_vec(),
        headers,
        ..Default::default()
    };
    let conn = ask.conn;
    let attributes = AttributeContext {
        source: Some(socket(conn.client_ip, conn.peer.port(), conn.principal.as_deref())),
        destination: Some(socket(*conn.target.ip(), conn.target.port(), Some(&conn.dest.principal))),
        request: Some(attribute_context::Request { http: Some(http), ..Default::default() }),
        ..Default::default()
    };
    let channel = channel(ctx, to, &ask.conn.dest);
    let mut client = AuthorizationClient::new(channel);
    let resp = client.check(CheckRequest { attributes: Some(attributes) }).await;
    let resp = resp.map_err(|s| format!("gRPC: {} {}", s.code(), s.message()))?.into_inner();
    Ok(from_grpc(resp))
}

fn header_pairs(options: &[HeaderValueOption]) -> Vec<(HeaderName, HeaderValue)> {
    let valid = options.iter().filter_map(|o| o.header.as_ref());
    let parsed = valid.filter_map(|h| {
        let name = HeaderName::from_bytes(h.key.as_bytes()).ok()?;
        let value = match h.raw_value.is_empty() {
            true => HeaderValue::from_str(&h.value).ok()?,
            false => HeaderValue::from_bytes(&h.raw_value).ok()?,
        };
        Some((name, value))
    });
    parsed.collect()
}

/// The gRPC answer: `status.code` 0 allows (with the headers it adds or
/// removes); anything else denies, with `denied_response`'s status (403 if
/// none), headers and body.
fn from_grpc(resp: CheckResponse) -> Checked {
    let ok = resp.status.as_ref().is_none_or(|s| s.code == 0);
    match (ok, resp.http_response) {
        (true, Some(HttpResponse::OkResponse(ok))) => Checked::Allow {
            upstream: header_pairs(&ok.headers),
            remove: ok.headers_to_remove.iter().filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok()).collect(),
            downstream: header_pairs(&ok.response_headers_to_add),
        },
        (true, _) => Checked::Allow { upstream: Vec::new(), remove: Vec::new(), downstream: Vec::new() },
        (false, denied) => {
            let (status, headers, body) = match denied {
                Some(HttpResponse::DeniedResponse(d)) => {
                    let code = d.status.map(|s| s.code).and_then(|c| u16::try_from(c).ok());
                    (code, header_pairs(&d.headers), Bytes::from(d.body))
                }
                _ => (None, Vec::new(), Bytes::new()),
            };
            let status = status.and_then(|c| StatusCode::from_u16(c).ok()).filter(|s| *s != StatusCode::OK);
            let mut map = HeaderMap::new();
            for (n, v) in headers {
                map.append(n, v);
            }
            Checked::Deny(answer(status.unwrap_or(StatusCode::FORBIDDEN), map, body))
        }
    }
}

/// The shared channel to an authorizer for checks `caller` makes, its
/// connections made as [`connect`] makes them (through the mesh for a
/// meshed authorizer, else from the agent's own uncaptured sockets).
fn channel(ctx: &Arc<Inputs>, to: &Authorizer, caller: &Arc<Workload>) -> tonic::transport::Channel {
    let meshed = to.endpoint.as_ref().is_some_and(|w| w.meshed);
    let key = (to.addr, meshed.then(|| caller.principal.clone()));
    let mut channels = ctx.ext_authz.0.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = channels.get(&key) {
        return c.clone();
    }
    // Weak: the channel lives in the inputs it would otherwise keep alive.
    let (weak, to, caller) = (Arc::downgrade(ctx), to.clone(), caller.clone());
    let connector = tower::service_fn(move |_: hyper::Uri| {
        let (weak, to, caller) = (weak.clone(), to.clone(), caller.clone());
        async move {
            let ctx = weak.upgrade().ok_or_else(|| std::io::Error::other("the agent is stopping"))?;
            let io = connect(&ctx, &to, &caller).await.map_err(|f| match f {
                Failed::Unreachable(why) | Failed::Refused(why) => std::io::Error::other(why),
            })?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
        }
    });
    // The URI only names the authority; the connector decides where to connect.
    let endpoint = tonic::transport::Endpoint::from_static("http://ext-authz");
    let channel = endpoint.connect_with_connector_lazy(connector);
    channels.insert(key, channel.clone());
    channel
}

/// A request body read (up to a bound) for the check, then sent on whole:
/// the bytes read, then the rest as it streams.
/// The request headers that an HTTP authorizer's answer may set upstream
/// (`headersToUpstreamOnAllow`): the authorizer's to set, so a client's own
/// are dropped before the check.
pub(super) fn authorizer_headers(provider: &ExtAuthz, headers: &hyper::HeaderMap) -> Vec<HeaderName> {
    match &provider.kind {
        crate::state::security::ExtAuthzKind::Http(h) => {
            headers.keys().filter(|n| matches(&h.headers_to_upstream_on_allow, n.as_str())).cloned().collect()
        }
        crate::state::security::ExtAuthzKind::Grpc => Vec::new(),
    }
}

pub(super) struct Replay {
    pub read: Option<Bytes>,
    pub rest: Option<hyper::body::Incoming>,
}

impl hyper::body::Body for Replay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(read) = this.read.take().filter(|b| !b.is_empty()) {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(read))));
        }
        match &mut this.rest {
            Some(rest) => std::pin::Pin::new(rest).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.read.as_ref().is_none_or(Bytes::is_empty) && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

/// Reads up to `max` bytes of `body` for the check (what an earlier check
/// read first). `Err(())`: the body is longer and the provider does not take
/// part of it (413), or it failed.
pub(super) async fn read_for_check(body: Replay, max: usize, allow_partial: bool) -> Result<(Bytes, Replay), ()> {
    let mut read = body.read.map(Vec::from).unwrap_or_default();
    let Some(mut rest) = body.rest else {
        let all = Bytes::from(read);
        return if all.len() <= max || allow_partial {
            Ok((all.slice(..all.len().min(max)), Replay { read: Some(all), rest: None }))
        } else {
            Err(())
        };
    };
    // Until the body ends, or is known to be longer than `max`.
    while read.len() <= max {
        match rest.frame().await {
            None => {
                let all = Bytes::from(read);
                return Ok((all.clone(), Replay { read: Some(all), rest: None }));
            }
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    read.extend_from_slice(d);
                }
            }
            Some(Err(_)) => return Err(()),
        }
    }
    if !allow_partial {
        return Err(());
    }
    let all = Bytes::from(read);
    Ok((all.slice(..max), Replay { read: Some(all), rest: Some(rest) }))
}
