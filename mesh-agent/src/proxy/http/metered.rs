//! Per-request measurement: bodies that count their bytes as they stream, and a
//! [`Record`] that, when the response is complete (or abandoned), updates
//! Istio's request metrics and writes the access log line.
use std::{
    net::SocketAddrV4,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context as TaskContext, Poll},
    time::{Instant, SystemTime},
};

use http_body_util::BodyExt as _;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Frame, Incoming, SizeHint},
    header::HeaderMap,
    http::response::Parts,
};

use super::{
    Body, Downstream, local_reply,
    pool::ResponseBody,
    request_protocol,
    traced::{At, Ending, Traced},
};
use crate::{
    proxy::{Inputs, LocalReply},
    state::{
        Workload,
        log_format::{Captured, Entry, Format, Kind},
        telemetry::MetricSet,
    },
    telemetry::{Flags, RequestLabels, TcpLabels, access_log::Sink},
};

mod memo;
mod tags;
pub use memo::Memo;
use tags::Tags;

/// Request bytes, counted by the request body while it streams upstream.
#[derive(Debug, Default)]
pub struct Shared {
    request_bytes: AtomicU64,
}

pub struct Record {
    ctx: Arc<Inputs>,
    tcp: TcpLabels,
    grpc: bool,
    start: Instant,
    /// What only the access log needs; none when it is off.
    line: Option<Box<RequestLine>>,
    upstream: Option<SocketAddrV4>,
    downstream: std::net::SocketAddr,
    /// Where the client connected (a Service VIP, a pod, a gateway port).
    local: SocketAddrV4,
    /// The answer came from the upstream (not the agent).
    via_upstream: bool,
    /// The request metrics the Telemetries leave out.
    off: MetricSet,
    /// A Telemetry's tag overrides, with the request's values they read.
    tags: Option<Box<Tags>>,
    shared: Arc<Shared>,
    /// The connection's last request's series.
    memo: Arc<Memo>,
    status: u16,
    grpc_status: Option<&'static str>,
    flags: Flags,
    response_bytes: u64,
    done: bool,
    /// The circuit-breaker place this request holds until it is complete.
    held: Option<super::cluster::Admission>,
    /// The endpoint it is in flight to (for LEAST_REQUEST).
    in_flight: Option<super::cluster::InFlight>,
    /// Its trace here, when the side's Telemetry traces.
    trace: Option<Box<Traced>>,
}

/// What a request's record is about, besides the request.
pub struct About<'a> {
    pub tcp: TcpLabels,
    pub grpc: bool,
    /// Where it goes (the pod, at the destination), once known.
    pub upstream: Option<SocketAddrV4>,
    /// The workload this side reports for: the client pod (or the gateway)
    /// at the source, the pod at the destination.
    pub subject: Option<&'a Arc<Workload>>,
    pub started_at: SystemTime,
    pub start: Instant,
}

/// The request as the access log describes it: only what its format reads.
struct RequestLine {
    started_at: SystemTime,
    protocol: &'static str,
    request: Captured,
    response: Option<Captured>,
    format: Arc<Format>,
    sink: Sink,
    /// Envoy's route name (`%ROUTE_NAME%`).
    route: Option<String>,
    /// Why the upstream could not be reached (`%UPSTREAM_TRANSPORT_FAILURE_REASON%`).
    transport_failure: Option<String>,
}

/// The `grpc-status` a response carries, as a label value: one of gRPC's
/// codes (0–16), else `other`. The value comes from the upstream, and each
/// distinct label value is a time series kept for the agent's life: a hostile
/// server must not be able to grow the registry.
fn grpc_status(h: &HeaderMap) -> Option<&'static str> {
    const CODES: [&str; 17] =
        ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16"];
    let v = h.get("grpc-status")?;
    let code = v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()).and_then(|n| CODES.get(n));
    Some(code.copied().unwrap_or("other"))
}

impl Record {
    pub fn new<B>(ctx: &Arc<Inputs>, down: &Downstream, req: &Request<B>, about: About<'_>) -> Record {
        let About { tcp, grpc, upstream, subject, started_at, start } = about;
        let state = ctx.state();
        // The Telemetries of the pod this side reports for: the server at
        // the destination, the client at the source.
        let destination = tcp.reporter == "destination";
        let side = state.reporting(subject.and_then(|w| w.ip), destination, &tcp.destination_service);
        let trace = side.trace.as_ref().map(|spec| {
            let at = match (destination, down.gateways.is_some()) {
                (true, _) => At::Destination,
                (false, true) => At::Gateway,
                (false, false) => At::Source,
            };
            Box::new(Traced::begin(ctx, &state, spec, req, subject.map(|w| &**w), at, down.peer_ip, started_at))
        });
        let sink = ctx.access_log.sink(state.access_log.file.as_ref(), side.logging);
        let tags = side.tags.clone().map(|tags| Box::new(Tags::capture(tags, req)));
        let off = side.off;
        let line = (sink != Sink::Off).then(|| {
            let format = state.access_log.format.clone();
            let path = req.uri().path_and_query().map_or_else(
                || "/".into(),
                |p| crate::identity::jwt::redact_query(p.as_str(), &state.token_params).into_owned(),
            );
            let request = format.capture_request(req.method().as_str(), &path, req.uri(), req.headers());
            Box::new(RequestLine {
                started_at,
                protocol: match req.version() {
                    hyper::Version::HTTP_2 => "HTTP/2",
                    hyper::Version::HTTP_10 => "HTTP/1.0",
                    _ => "HTTP/1.1",
                },
                request,
                response: None,
                format,
                sink,
                route: None,
                transport_failure: None,
            })
        });
        Record {
            ctx: ctx.clone(),
            tcp,
            grpc,
            start,
            line,
            upstream,
            downstream: down.peer,
            local: down.orig,
            via_upstream: false,
            off,
            tags,
            shared: Arc::default(),
            memo: down.memo.clone(),
            status: 0,
            grpc_status: None,
            flags: Flags::NONE,
            response_bytes: 0,
            done: false,
            held: None,
            in_flight: None,
            trace,
        }
    }

    pub fn set_mtls(&mut self, mtls: bool) {
        self.tcp.connection_security_policy = if mtls { "mutual_tls" } else { "none" };
    }

    /// The route the request took, as Envoy names it for Istio: the
    /// VirtualService rule's `name`, `default` with no VirtualService; and
    /// the `uri.prefix` it matched.
    pub fn set_route(&mut self, rule: Option<&crate::state::traffic::HttpRoute>, prefix: Option<&str>) {
        if let Some(t) = &mut self.trace {
            t.set_prefix(prefix);
        }
        if let Some(line) = &mut self.line {
            line.route = match rule {
                None => Some("default".into()),
                Some(r) => r.name.clone(),
            };
        }
    }

    /// Trace headers on the request sent on, when this side traces.
    pub fn propagate(&self, headers: &mut HeaderMap) {
        if let Some(t) = &self.trace {
            t.propagate(headers);
        }
    }

    /// Why no upstream connection was made, for the access log.
    pub fn set_transport_failure(&mut self, why: &dyn std::fmt::Display) {
        if let Some(line) = &mut self.line {
            line.transport_failure = Some(why.to_string());
        }
    }

    /// Adds a response flag (`DI`, `URX`), keeping any already set.
    pub fn set_flag(&mut self, flag: Flags) {
        self.flags.insert(flag);
    }

    /// The target changed on a retry.
    pub fn set_target(&mut self, tcp: TcpLabels, upstream: SocketAddrV4) {
        let csp = self.tcp.connection_security_policy;
        self.tcp = tcp;
        self.tcp.connection_security_policy = csp;
        self.upstream = Some(upstream);
    }

    /// Bytes of a request body read whole (for retries).
    pub fn add_request_bytes(&self, n: usize) {
        self.shared.request_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    pub fn set_response(&mut self, status: StatusCode, headers: &HeaderMap) {
        self.status = status.as_u16();
        self.via_upstream = true;
        if let Some(line) = &mut self.line
            && line.format.reads_response()
        {
            line.response = Some(line.format.capture_response(headers));
        }
        // gRPC "trailers-only" responses carry the status in the headers.
        self.grpc_status = grpc_status(headers);
    }

    /// An answer from the agent itself (no upstream response).
    pub fn finish_local(mut self, reply: LocalReply) -> Response<Body> {
        let LocalReply { status, text, flags } = reply;
        self.status = status.as_u16();
        self.set_flag(flags);
        self.response_bytes = text.len() as u64 + 1;
        let mut r = local_reply(status, text);
        if self.grpc {
            // gRPC clients read the status from grpc-status: UNAVAILABLE (14),
            // PERMISSION_DENIED (7), UNAUTHENTICATED (16) as Envoy maps them.
            let code = match status {
                StatusCode::FORBIDDEN => "7",
                StatusCode::UNAUTHORIZED => "16",
                _ => "14",
            };
            self.grpc_status = Some(code);
            r.headers_mut().insert("grpc-status", hyper::header::HeaderValue::from_static(code));
        }
        self.finish();
        r
    }

    pub fn hold(&mut self, admission: super::cluster::Admission) {
        self.held = Some(admission);
    }

    /// Counts this request against its (current) endpoint until complete.
    pub fn hold_in_flight(&mut self, guard: super::cluster::InFlight) {
        self.in_flight = Some(guard);
    }

    /// A circuit breaker overflowed: Envoy's answer.
    pub fn finish_overflow(self) -> Response<Body> {
        let mut r = self.finish_local(LocalReply::OVERFLOW);
        r.headers_mut().insert("x-envoy-overloaded", hyper::header::HeaderValue::from_static("true"));
        r
    }

    /// A redirect the agent answers itself (`redirect` rule).
    pub fn finish_redirect(mut self, code: u16, location: &str) -> Response<Body> {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
        self.status = status.as_u16();
        let mut r = Response::new(http_body_util::Empty::new().map_err(|e| match e {}).boxed_unsync());
        *r.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(location) {
            r.headers_mut().insert(hyper::header::LOCATION, v);
        }
        self.finish();
        r
    }

    /// An answer made elsewhere (an external authorizer's denial).
    pub fn finish_answer(mut self, r: Response<Body>) -> Response<Body> {
        self.status = r.status().as_u16();
        self.finish();
        r
    }

    /// `101 Switching Protocols`: the request is complete; the tunnel follows.
    pub fn finish_switch(mut self, parts: Parts) -> Response<Body> {
        self.status = parts.status.as_u16();
        self.finish();
        Response::from_parts(parts, http_body_util::Empty::new().map_err(|e| match e {}).boxed_unsync())
    }

    fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        self.held = None;
        self.in_flight = None;
        let request_bytes = self.shared.request_bytes.load(Ordering::Relaxed);
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        self.tcp.request_protocol = request_protocol(self.grpc);
        self.tcp.response_flags = self.flags;
        let m = &self.ctx.metrics;
        if let Some(tags) = &self.tags {
            // Tag overrides: each metric's own labels.
            let labels = RequestLabels::new(
                self.tcp.clone(),
                self.tcp.request_protocol,
                self.status,
                self.grpc_status.unwrap_or("-"),
                self.flags,
            );
            let on = |metric| !self.off.contains(metric);
            let labels_for = |metric| tags.labels(&labels, metric, self.status);
            if on(MetricSet::REQUEST_COUNT) {
                m.requests.get_or_create(&labels_for(MetricSet::REQUEST_COUNT)).inc();
            }
            if on(MetricSet::REQUEST_DURATION) {
                m.request_duration.get_or_create(&labels_for(MetricSet::REQUEST_DURATION)).observe(ms);
            }
            if on(MetricSet::REQUEST_SIZE) {
                m.request_bytes.get_or_create(&labels_for(MetricSet::REQUEST_SIZE)).observe(request_bytes as f64);
            }
            if on(MetricSet::RESPONSE_SIZE) {
                m.response_bytes
                    .get_or_create(&labels_for(MetricSet::RESPONSE_SIZE))
                    .observe(self.response_bytes as f64);
            }
        } else {
            let counted = memo::Counted {
                tcp: &self.tcp,
                status: self.status,
                grpc_status: self.grpc_status.unwrap_or("-"),
                off: self.off,
                ms,
                request_bytes,
                response_bytes: self.response_bytes,
            };
            self.memo.count(m, &counted);
        }
        let tcp = &self.tcp;
        let traced = self.trace.take();
        if traced.is_none() && self.line.is_none() {
            return;
        }
        let cluster = crate::proxy::l4::upstream_cluster(tcp, self.local, self.upstream);
        if let Some(t) = traced {
            let end = Ending {
                status: self.status,
                grpc_status: self.grpc_status,
                flags: self.flags,
                request_bytes,
                response_bytes: self.response_bytes,
                upstream: self.upstream,
                cluster: cluster.as_deref(),
                service: &tcp.destination_service,
                local: self.local,
            };
            t.finish(&self.ctx, end);
        }
        let Some(line) = self.line.take() else { return };
        let entry = Entry {
            kind: Kind::Http,
            start: line.started_at,
            protocol: Some(line.protocol),
            request: Some(&line.request),
            response: line.response.as_ref(),
            response_code: Some(self.status),
            flags: self.flags.to_string(),
            details: Some(details(self.via_upstream, self.flags, self.status)),
            transport_failure: line.transport_failure.as_deref(),
            bytes_received: request_bytes,
            bytes_sent: self.response_bytes,
            duration_ms: Some(self.start.elapsed().as_millis() as u64),
            grpc_status: self.grpc_status,
            upstream_host: self.upstream.map(Into::into),
            upstream_cluster: cluster.as_deref(),
            upstream_local: None,
            downstream_local: Some(self.local.into()),
            downstream_remote: self.downstream,
            peer_principal: (tcp.reporter == "destination" && &*tcp.source_principal != "unknown")
                .then_some(&*tcp.source_principal),
            sni: None,
            route_name: line.route.as_deref(),
        };
        let queued = self.ctx.access_log.write(&line.sink, line.format.render(&entry));
        if !queued {
            let labels = crate::telemetry::LimitLabels { listener: "access_log", reason: "queue_full" };
            m.limit_refusals.get_or_create(&labels).inc();
        }
    }
}

/// Envoy's `%RESPONSE_CODE_DETAILS%` for how a request ended.
fn details(via_upstream: bool, flags: Flags, status: u16) -> &'static str {
    if via_upstream {
        return "via_upstream";
    }
    let named = [
        (Flags::NR, "route_not_found"),
        (Flags::UH, "no_healthy_upstream"),
        (Flags::UF, "upstream_reset_before_response_started{connection_failure}"),
        (Flags::UO, "upstream_reset_before_response_started{overflow}"),
        (Flags::UT, "upstream_response_timeout"),
        (Flags::UR, "upstream_reset_before_response_started{remote_reset}"),
        (Flags::UC, "upstream_reset_before_response_started{connection_termination}"),
        (Flags::DI, "fault_filter_delay"),
        (Flags::FI, "fault_filter_abort"),
        (Flags::DPE, "codec_error"),
    ];
    if let Some((_, d)) = named.iter().find(|(f, _)| flags.contains(*f)) {
        return d;
    }
    match status {
        401 => "jwt_authn_access_denied",
        403 => "rbac_access_denied",
        _ => "direct_response",
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.finish();
    }
}

enum Side {
    Request(Arc<Shared>),
    Response(Box<Record>),
}

/// A body passed through unchanged, counted as it streams: the client's
/// request body, or the upstream's response body.
pub struct Metered<B: hyper::body::Body> {
    inner: B,
    side: Side,
    ended: bool,
}

impl<B: hyper::body::Body> Metered<B> {
    pub fn request(inner: B, shared: Arc<Shared>) -> Self {
        Metered { inner, side: Side::Request(shared), ended: false }
    }
}

impl Metered<Incoming> {
    /// A response read straight from its connection (no pool to return it to).
    pub fn response_direct(inner: Incoming, record: Record) -> Self {
        Metered { inner, side: Side::Response(Box::new(record)), ended: false }
    }
}

impl Metered<ResponseBody> {
    pub fn response(inner: ResponseBody, record: Record) -> Self {
        Metered { inner, side: Side::Response(Box::new(record)), ended: false }
    }
}

impl<B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Unpin> hyper::body::Body for Metered<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => match (&mut this.side, frame.data_ref(), frame.trailers_ref()) {
                (Side::Request(s), Some(d), _) => {
                    s.request_bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                (Side::Response(r), Some(d), _) => r.response_bytes += d.len() as u64,
                (Side::Response(r), None, Some(t)) => {
                    if let Some(g) = grpc_status(t) {
                        r.grpc_status = Some(g);
                    }
                }
                _ => {}
            },
            Poll::Ready(None) => {
                this.ended = true;
                if let Side::Response(r) = &mut this.side {
                    r.finish();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Side::Response(r) = &mut this.side {
                    r.flags.insert(Flags::UR);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: hyper::body::Body> Drop for Metered<B> {
    fn drop(&mut self) {
        if let Side::Response(r) = &mut self.side
            && !self.ended
            && !self.inner.is_end_stream()
            && r.flags.is_empty()
        {
            // The client went away before the response was complete.
            r.flags.insert(Flags::DC);
        }
    }
}
