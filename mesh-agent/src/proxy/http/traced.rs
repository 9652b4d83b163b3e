//! A request's span at this agent, as Envoy's HTTP connection manager makes
//! it with Istio's OpenTelemetry tracer: the caller's trace continued (or a
//! new one started), a sampling decision, the trace headers of the request
//! sent on, and when the request is complete a span with Envoy's tags.
//!
//! The source's span is a `CLIENT` span, the destination's a `SERVER` span;
//! a gateway makes a `SERVER` span and under it a `CLIENT` span for the
//! upstream request (Istio sets Envoy's `spawn_upstream_span` for gateways).
//! Only a sampled request's span is built and sent; an unsampled one costs
//! its ids and a `traceparent` that carries the decision on.
use std::{
    borrow::Cow,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::SystemTime,
};

use hyper::{Request, header::HeaderMap};

use crate::{
    proxy::Inputs,
    state::{
        State, Workload,
        trace::{CustomTag, TraceSpec},
    },
    telemetry::{
        Flags,
        trace::{
            Kind, Span,
            context::{self, Outgoing, Parent},
        },
    },
};

/// The longest value a span carries from a request header (a client's
/// headers can be long; spans wait in a queue).
const MAX_HEADER_TAG: usize = 256;

pub struct Traced {
    spec: Arc<TraceSpec>,
    parent: Option<Parent>,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    sampled: bool,
    /// At a gateway: the upstream span, the next hop's parent.
    upstream_span: Option<[u8; 8]>,
    side: At,
    /// What the span says, when it is sampled.
    span: Option<Box<Started>>,
}

struct Started {
    start: SystemTime,
    service: Arc<str>,
    kind: Kind,
    attributes: Vec<(Cow<'static, str>, String)>,
    /// The route's matched prefix, for the span's name.
    prefix: Option<String>,
}

/// How the request ended, for its span.
pub struct Ending<'a> {
    pub status: u16,
    pub grpc_status: Option<&'static str>,
    pub flags: Flags,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub upstream: Option<SocketAddrV4>,
    pub cluster: Option<&'a str>,
    /// The Service host the request was for (`unknown`: none).
    pub service: &'a str,
    /// Where the client connected (a Service VIP and port at the source).
    pub local: SocketAddrV4,
}

/// What the span's side is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum At {
    Source,
    Destination,
    Gateway,
}

impl Traced {
    /// The request's trace at this agent, for the workload `me` that `spec`
    /// is the tracing of.
    #[expect(clippy::too_many_arguments, reason = "what a span is made of, from two callers")]
    pub fn begin<B>(
        ctx: &Inputs,
        state: &State,
        spec: &Arc<TraceSpec>,
        req: &Request<B>,
        me: Option<&Workload>,
        side: At,
        peer: Ipv4Addr,
        start: SystemTime,
    ) -> Traced {
        let parent = context::extract(req.headers());
        let trace_id = match &parent {
            Some(p) => p.trace_id,
            None => {
                let (hi, lo) = (ctx.next_random(), ctx.next_random());
                (u128::from(hi) << 64 | u128::from(lo) | 1).to_be_bytes()
            }
        };
        let new_span_id = || (ctx.next_random() | 1).to_be_bytes();
        let span_id = new_span_id();
        let upstream_span = (side == At::Gateway).then(new_span_id);
        let sampled = match parent.as_ref().and_then(|p| p.sampled) {
            Some(decided) => decided,
            None => decide(ctx, spec, req.headers()),
        };
        let span = sampled.then(|| {
            let kind = if side == At::Source { Kind::Client } else { Kind::Server };
            let service = me.map_or_else(
                || Arc::from("unknown"),
                |w| Arc::from(format!("{}.{}", w.canonical_service, w.namespace)),
            );
            let attributes = request_tags(state, spec, req, me, peer);
            Box::new(Started { start, service, kind, attributes, prefix: None })
        });
        Traced { spec: spec.clone(), parent, trace_id, span_id, sampled, upstream_span, side, span }
    }

    /// The route's matched `uri.prefix` (the span is named `host:port<prefix>*`).
    pub fn set_prefix(&mut self, prefix: Option<&str>) {
        if let Some(s) = &mut self.span {
            s.prefix = prefix.map(str::to_owned);
        }
    }

    /// The trace headers of the request sent on (unless the Telemetry turns
    /// context propagation off).
    pub fn propagate(&self, headers: &mut HeaderMap) {
        if !self.spec.propagate {
            return;
        }
        let span_id = self.upstream_span.unwrap_or(self.span_id);
        let out = Outgoing { trace_id: self.trace_id, span_id, sampled: self.sampled, parent: self.parent.as_ref() };
        context::inject(headers, out);
    }

    /// The span (and a gateway's upstream span), sent to the provider.
    pub fn finish(self, ctx: &Inputs, end: Ending<'_>) {
        let Some(started) = self.span else { return };
        let Started { start, service, kind, mut attributes, prefix } = *started;
        let now = SystemTime::now();
        let error = end.status >= 500 || end.status == 0 || end.grpc_status.is_some_and(grpc_server_error);
        // Istio's route decorator: the Service and its port (the one the
        // client dialled at the source), the route's prefix.
        let port = match (self.side, end.upstream) {
            (At::Destination | At::Gateway, Some(u)) => service_port(&ctx.state(), end.service, u.port()),
            _ => end.local.port(),
        };
        let path = prefix.map_or_else(|| "/*".to_owned(), |p| format!("{p}*"));
        let name = format!("{}:{port}{path}", end.service);
        let mut response = vec![
            ("http.status_code".into(), end.status.to_string()),
            ("response_flags".into(), end.flags.to_string()),
            ("request_size".into(), end.request_bytes.to_string()),
            ("response_size".into(), end.response_bytes.to_string()),
        ];
        if let Some(g) = end.grpc_status {
            response.push(("grpc.status_code".into(), g.to_owned()));
        }
        let mut upstream = Vec::new();
        if let Some(c) = end.cluster {
            upstream.push(("upstream_cluster".into(), c.to_owned()));
            upstream.push(("upstream_cluster.name".into(), c.to_owned()));
        }
        if let Some(u) = end.upstream {
            upstream.push(("upstream_address".into(), u.to_string()));
        }
        if error {
            response.push(("error".into(), "true".to_owned()));
        }
        attributes.extend(response.iter().cloned());
        let parent_span_id = self.parent.as_ref().map(|p| p.span_id);
        // A gateway's request that went upstream: a span of its own, under
        // the gateway's (an answer of the gateway's own has none, as Envoy's
        // router never ran).
        if let Some(upstream_span) = self.upstream_span.filter(|_| end.upstream.is_some()) {
            let mut child = vec![("component".into(), "proxy".to_owned())];
            child.extend(upstream);
            child.extend(response);
            let child_name = format!("router {} egress", end.cluster.unwrap_or("unknown"));
            let span = Span {
                service: service.clone(),
                trace_id: self.trace_id,
                span_id: upstream_span,
                parent_span_id: Some(self.span_id),
                name: child_name,
                kind: Kind::Client,
                start,
                end: now,
                attributes: child,
                error,
            };
            ctx.tracer.send(&self.spec.provider, span);
        } else {
            attributes.extend(upstream);
        }
        let span = Span {
            service,
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent_span_id,
            name,
            kind,
            start,
            end: now,
            attributes,
            error,
        };
        ctx.tracer.send(&self.spec.provider, span);
    }
}

/// The port of the Service `host` (a cluster Service's name) whose target is
/// `target`, else `target`.
fn service_port(state: &State, host: &str, target: u16) -> u16 {
    let mut labels = host.split('.');
    let (Some(name), Some(namespace), Some("svc")) = (labels.next(), labels.next(), labels.next()) else {
        return target;
    };
    let Some(svc) = state.services.get(&format!("{namespace}/{name}")) else { return target };
    let by_target = svc.ports.iter().find(|p| p.target == crate::state::TargetPort::Number(target));
    by_target.map_or(target, |p| p.port)
}

/// No decision came with the request: Istio's random sampling, from the
/// request's `x-request-id` (the first 8 hex digits, modulo 10 000, as
/// Envoy's UUID extension) so that every proxy decides alike, else at random.
fn decide(ctx: &Inputs, spec: &TraceSpec, headers: &HeaderMap) -> bool {
    if spec.sampling >= 100.0 {
        return true;
    }
    if spec.sampling <= 0.0 {
        return false;
    }
    let threshold = (spec.sampling * 100.0).round() as u64;
    let from_id = spec
        .request_id_sampling
        .then(|| headers.get("x-request-id")?.to_str().ok()?.get(..8).and_then(|h| u64::from_str_radix(h, 16).ok()))
        .flatten();
    from_id.unwrap_or_else(|| ctx.next_random()) % 10_000 < threshold
}

/// gRPC codes that mean the server failed (OpenTelemetry's conventions for
/// a server span): UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL,
/// UNAVAILABLE, DATA_LOSS.
fn grpc_server_error(code: &str) -> bool {
    matches!(code, "2" | "4" | "12" | "13" | "14" | "15")
}

/// A header's value for a span, cut to [`MAX_HEADER_TAG`] bytes.
fn header_tag(headers: &HeaderMap, name: &str) -> Option<String> {
    let v = headers.get(name)?;
    let v = String::from_utf8_lossy(v.as_bytes());
    Some(cut(&v, MAX_HEADER_TAG).to_owned())
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Envoy's request tags, Istio's, and the configuration's custom tags.
fn request_tags<B>(
    state: &State,
    spec: &TraceSpec,
    req: &Request<B>,
    me: Option<&Workload>,
    peer: Ipv4Addr,
) -> Vec<(Cow<'static, str>, String)> {
    let h = req.headers();
    let host = req.uri().authority().map(|a| a.to_string()).or_else(|| header_tag(h, "host")).unwrap_or_default();
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{}://{host}{path}", req.uri().scheme_str().unwrap_or("http"));
    let protocol = match req.version() {
        hyper::Version::HTTP_2 => "HTTP/2",
        hyper::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    let mut tags: Vec<(Cow<'static, str>, String)> = vec![
        ("component".into(), "proxy".to_owned()),
        ("http.url".into(), cut(&url, spec.max_path_tag_length).to_owned()),
        ("http.method".into(), req.method().to_string()),
        ("http.protocol".into(), protocol.to_owned()),
        ("user_agent".into(), header_tag(h, "user-agent").unwrap_or_else(|| "-".to_owned())),
        ("guid:x-request-id".into(), header_tag(h, "x-request-id").unwrap_or_else(|| "-".to_owned())),
        ("downstream_cluster".into(), "-".to_owned()),
        ("peer.address".into(), peer.to_string()),
    ];
    if spec.istio_tags {
        let field = |f: fn(&Workload) -> &Arc<str>| me.map_or_else(|| "unknown".to_owned(), |w| f(w).to_string());
        let mesh = state.tracing.mesh_id.as_deref().unwrap_or(&state.trust_domain).to_owned();
        tags.extend([
            ("istio.canonical_service".into(), field(|w| &w.canonical_service)),
            ("istio.canonical_revision".into(), field(|w| &w.canonical_revision)),
            ("istio.namespace".into(), field(|w| &w.namespace)),
            ("istio.mesh_id".into(), mesh),
            ("istio.cluster_id".into(), crate::telemetry::cluster().to_string()),
        ]);
    }
    for (name, tag) in spec.custom_tags.iter().flat_map(|t| t.iter()) {
        let value = match tag {
            CustomTag::Literal(v) => Some(v.to_string()),
            CustomTag::Header { name, default } => {
                header_tag(h, name).or_else(|| default.as_ref().map(|d| d.to_string()))
            }
        };
        if let Some(v) = value {
            tags.push((Cow::Owned(name.to_string()), v));
        }
    }
    tags
}
