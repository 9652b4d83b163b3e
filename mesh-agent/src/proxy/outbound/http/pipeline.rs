//! One request through the source agent, as stages. Before the request has
//! a target: [`prepare`] (request id, client certificate header, host,
//! path, upgrade), [`bind`] (the TLS server's hosts, HTTPS redirects),
//! [`route`] and [`resolve`] (the redirect rule, the target). With its
//! record: [`filters`] (fault, header rules), [`upstream_request`] (HTTP
//! version, upgrade), [`keep_body`], [`mirror`], [`admit`] (circuit
//! breakers), [`tries`] (retries, timeouts, re-routing), then the response
//! (upgrade, or headers and a metered body). Each stage returns
//! `Result<_, Stop>`; [`Stop::answer`] is the one place a stop becomes the
//! agent's own response and completes the request's record. A new stage is
//! one more function here.
use super::gate::{gate, gateway_pod};
use super::*;
use tries::{Attempt, tries};

/// Why a request ends with an answer of the agent's own.
pub(super) enum Stop {
    /// Envoy's local reply (status, text, flags).
    Local(LocalReply),
    /// A redirect (`redirect` rule, `httpsRedirect`).
    Redirect(u16, String),
    /// A circuit breaker overflowed.
    Overflow,
    /// No try got a response from `SocketAddrV4`.
    Failed(SocketAddrV4, Failure),
}

impl From<LocalReply> for Stop {
    fn from(reply: LocalReply) -> Self {
        Stop::Local(reply)
    }
}

impl Stop {
    /// The agent's answer, and the request's record completed with it.
    fn answer(self, ctx: &Inputs, down: &Downstream, record: Record) -> Response<Body> {
        match self {
            Stop::Local(reply) => record.finish_local(reply),
            Stop::Redirect(code, location) => record.finish_redirect(code, &location),
            Stop::Overflow => record.finish_overflow(),
            Stop::Failed(addr, failure) => fail_request(ctx, down, addr, record, failure),
        }
    }
}

/// A stop before the request has a target: the labels its record carries
/// (boxed: the labels are large, and the happy path carries the `Result`).
type EarlyStop = Box<Early>;

struct Early {
    labels: TcpLabels,
    /// The workload the request is reported for (the client, or the gateway).
    subject: Option<Arc<Workload>>,
    stop: Stop,
}

impl Early {
    /// Labelled with the client (a pod, or nothing known).
    fn client(down: &Downstream, stop: impl Into<Stop>) -> EarlyStop {
        let labels = TcpLabels::new(down.source.as_deref(), None, None, false);
        Box::new(Early { labels, subject: down.source.clone(), stop: stop.into() })
    }

    /// Labelled with a gateway's workload (the request's source at the edge).
    fn gateway(gw: Option<Arc<Workload>>, stop: impl Into<Stop>) -> EarlyStop {
        Box::new(Early { labels: TcpLabels::new(gw.as_deref(), None, None, false), subject: gw, stop: stop.into() })
    }
}

/// Where the front stages sent the request.
struct Routed {
    rule: Option<Arc<traffic::HttpRoute>>,
    cluster: Option<traffic::Cluster>,
    matched_prefix: Option<String>,
    /// The protocol the Service port declares.
    declared: Option<protocol::Declared>,
    target: Target,
}

/// How the back stages end, when the upstream answered.
#[expect(clippy::large_enum_variant, reason = "made once per request: boxing would allocate for every response")]
enum Answer {
    /// Its response, streamed to the client.
    Upstream(Response<pool::ResponseBody>, Option<Arc<traffic::HttpRoute>>),
    /// An upgrade both ways: the response head; the tunnel runs on its own.
    Switched(hyper::http::response::Parts),
}

pub(super) async fn handle(ctx: Arc<Inputs>, down: Arc<Downstream>, mut req: Request<Incoming>) -> Response<Body> {
    let (start, started_at) = (Instant::now(), SystemTime::now());
    let prepared = prepare(&ctx, &ctx.state(), &down, &mut req);
    // At a gateway, the gateway pod's request policies before routing (as
    // Envoy's jwt_authn, ext_authz and RBAC filters before its router).
    let mut to_client = Vec::new();
    if prepared.is_ok() && down.gateways.is_some() {
        let (judged, verdict) = gate(&ctx, &down, req).await;
        req = judged;
        match verdict {
            Ok(headers) => to_client = headers,
            Err((gw, stop)) => {
                let tcp = TcpLabels::new(gw.as_deref(), None, None, false);
                let grpc = is_grpc(req.headers());
                let about = About { tcp, grpc, upstream: None, subject: gw.as_ref(), started_at, start };
                return stop.answer(Record::new(&ctx, &down, &req, about));
            }
        }
    }
    let routed = match prepared.and_then(|()| front(&ctx, &down, &req)) {
        Ok(r) => r,
        Err(early) => {
            let Early { labels, subject, stop } = *early;
            let grpc = is_grpc(req.headers());
            let about = About { tcp: labels, grpc, upstream: None, subject: subject.as_ref(), started_at, start };
            let record = Record::new(&ctx, &down, &req, about);
            return stop.answer(&ctx, &down, record);
        }
    };
    let (tcp, addr) = (routed.target.labels.clone(), routed.target.addr);
    let grpc = is_grpc(req.headers());
    let subject = routed.target.source.as_ref();
    let about = About { tcp, grpc, upstream: Some(addr), subject, started_at, start };
    let mut record = Record::new(&ctx, &down, &req, about);
    record.set_route(routed.rule.as_deref(), routed.matched_prefix.as_deref());
    let mut resp = match back(&ctx, &down, req, grpc, routed, &mut record).await {
        Ok(Answer::Upstream(resp, rule)) => respond(resp, rule.as_ref(), record),
        Ok(Answer::Switched(parts)) => record.finish_switch(parts),
        Err(stop) => stop.answer(&ctx, &down, record),
    };
    for (name, value) in to_client {
        resp.headers_mut().append(name, value);
    }
    resp
}

/// The stages that decide where the request goes, on one snapshot of the
/// state (after [`prepare`]).
fn front(ctx: &Inputs, down: &Downstream, req: &Request<Incoming>) -> Result<Routed, EarlyStop> {
    let state = ctx.state();
    let view = request_view(req.method(), req.uri(), req.headers(), down);
    bind(ctx, &state, down, &view)?;
    let decision = route(ctx, &state, down, &view)?;
    drop(state);
    resolve(decision, req, down)
}

/// What routing reads of a request.
fn request_view<'a>(
    method: &'a hyper::Method,
    uri: &'a hyper::Uri,
    headers: &'a HeaderMap,
    down: &'a Downstream,
) -> routing::RequestView<'a> {
    routing::RequestView {
        method: method.as_str(),
        path: uri.path_and_query().map_or("/", |p| p.as_str()),
        headers,
        client: down.peer_ip,
        namespace: down.source.as_deref().map(|w| &*w.namespace),
    }
}

/// The request as routing, policy and the upstream will all see it.
fn prepare(
    ctx: &Inputs,
    state: &crate::state::State,
    down: &Downstream,
    req: &mut Request<Incoming>,
) -> Result<(), EarlyStop> {
    if !req.headers().contains_key(&X_REQUEST_ID) {
        req.headers_mut().insert(X_REQUEST_ID.clone(), request_id(ctx));
    }
    // At the edge the client certificate header is the gateway's to set
    // (Envoy's SANITIZE_SET): whatever a client sent in it is dropped.
    if down.gateways.is_some() {
        req.headers_mut().remove(&X_FORWARDED_CLIENT_CERT);
        if let Some(v) = &down.client_cert {
            req.headers_mut().insert(X_FORWARDED_CLIENT_CERT.clone(), v.clone());
        }
    }
    // One host for routing and policy alike: a Host header that contradicts
    // the authority is refused before anything reads either.
    if authority_conflict(req) {
        return Err(Early::client(down, LocalReply::AUTHORITY_CONFLICT));
    }
    // HTTP/2 names the host in `:authority`; routing reads `Host`.
    if !req.headers().contains_key(header::HOST)
        && let Some(v) = req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    // Before anything reads the path: routing and the upstream see the same one.
    if path::apply(req, state.path_normalization).is_err() {
        return Err(Early::client(down, LocalReply::BAD_PATH));
    }
    if upgrade_asked(req) == Upgrade::Refused {
        return Err(Early::client(down, LocalReply::UPGRADE_REFUSED));
    }
    Ok(())
}

/// At a gateway: only hosts of the server the TLS handshake chose, and
/// `httpsRedirect`.
fn bind(
    ctx: &Inputs,
    state: &crate::state::State,
    down: &Downstream,
    view: &routing::RequestView<'_>,
) -> Result<(), EarlyStop> {
    // A host another server on the port takes (domain fronting, a reused
    // HTTP/2 connection) is refused before anything routes it (421: the
    // client may retry on a connection of its own for that host).
    if let Some(binding) = &down.server
        && binding.fit(routing::request_host(view.headers).unwrap_or("")) == Fit::Misdirected
    {
        ctx.metrics.gateway_misdirected.inc();
        return Err(Early::gateway(gateway_pod(state, down), LocalReply::MISDIRECTED));
    }
    // An HTTP gateway server with `httpsRedirect` sends every request to HTTPS.
    if let Some(gws) = &down.gateways
        && let Some(location) = routing::https_redirect(state, gws, down.orig.port(), view)
    {
        return Err(Early::gateway(gateway_pod(state, down), Stop::Redirect(301, location)));
    }
    Ok(())
}

/// The routing decision, and whose identity the request leaves with.
fn route(
    ctx: &Inputs,
    state: &crate::state::State,
    down: &Downstream,
    view: &routing::RequestView<'_>,
) -> Result<(routing::Decision, Option<Arc<Workload>>), EarlyStop> {
    decide(ctx, state, down, view, down.pick(ctx)).ok_or_else(|| {
        // A gateway with no rule for this host and path.
        Early::gateway(gateway_pod(state, down), LocalReply::NO_ROUTE)
    })
}

/// The rule's redirect, else the decision resolved to a target.
fn resolve(
    (decision, source): (routing::Decision, Option<Arc<Workload>>),
    req: &Request<Incoming>,
    down: &Downstream,
) -> Result<Routed, EarlyStop> {
    let routing::Decision { route, rule, matched_prefix, cluster } = decision;
    if let Some((code, location)) = filters::redirect(rule.as_ref(), req, down, matched_prefix.as_deref()) {
        let labels = match target(route, source.as_ref(), None) {
            Ok(t) => t.labels,
            Err(refused) => refused.labels,
        };
        return Err(Box::new(Early { labels, subject: source, stop: Stop::Redirect(code, location) }));
    }
    let declared = match &route {
        Route::Service { protocol, .. } => Some(*protocol),
        _ => None,
    };
    match target(route, source.as_ref(), cluster.as_ref()) {
        Ok(target) => Ok(Routed { rule, cluster, matched_prefix, declared, target }),
        Err(refused) => {
            let Refused { labels, error } = *refused;
            Err(Box::new(Early { labels, subject: source, stop: error.reply().into() }))
        }
    }
}

/// The request as it leaves: its head, its body, and how it is carried.
struct Outgoing {
    parts: hyper::http::request::Parts,
    body: Incoming,
    /// HTTP/2 to the upstream (Istio's choice, see `upstream_http2`).
    h2: bool,
    /// The client asked to upgrade (or extended CONNECT): its half of the tunnel.
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    extended_connect: bool,
    /// Extended CONNECT from an HTTP/2 client to an HTTP/1.1 upstream: an Upgrade there.
    translated: bool,
}

impl Outgoing {
    fn upgrade(&self) -> bool {
        self.client_upgrade.is_some()
    }
}

/// The stages from the target to the upstream's answer.
async fn back(
    ctx: &Arc<Inputs>,
    down: &Arc<Downstream>,
    mut req: Request<Incoming>,
    grpc: bool,
    routed: Routed,
    record: &mut Record,
) -> Result<Answer, Stop> {
    let Routed { rule, cluster, matched_prefix, declared, target: first } = routed;
    filters(ctx, rule.as_ref(), &mut req, matched_prefix.as_deref(), record).await?;
    let out = upstream_request(down, req, grpc, declared, cluster.as_ref());
    // With retries, a small body is kept so that it can be sent again.
    let retries = rule.as_ref().and_then(|r| r.retries.clone()).filter(|_| !out.upgrade());
    let mirrored = mirror::sampled(ctx, rule.as_ref()).filter(|_| !out.upgrade());
    let Outgoing { mut parts, body, h2, client_upgrade, extended_connect, translated } = out;
    record.propagate(&mut parts.headers);
    let body = keep_body(ctx, down, &parts.headers, body, retries.is_some() || mirrored.is_some(), record).await?;
    if let Some(dest) = mirrored {
        mirror(ctx, down, first.source.clone(), &parts, &body, dest, h2);
    }
    let cluster_state = cluster.as_ref().and_then(|c| ctx.clusters.get(c));
    admit(cluster_state.as_ref(), h2, record).await?;
    let attempt =
        Attempt { parts, body, h2, rule: rule.as_ref(), retries: retries.as_ref(), cluster: cluster.as_ref() };
    let (mut resp, target) = tries(ctx, down, attempt, first, cluster_state.as_ref(), record).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS || (extended_connect && resp.status() == StatusCode::OK) {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        if let Some(client_upgrade) = client_upgrade {
            tokio::spawn(tunnel_upgrade(client_upgrade, upstream_upgrade, target.addr, ctx.limits.idle_timeout));
        }
        let (mut parts, _) = resp.into_parts();
        if translated {
            // The HTTP/2 client asked with CONNECT: its answer is 200, without
            // HTTP/1.1's connection-specific headers.
            parts.status = StatusCode::OK;
            strip_hop_by_hop(&mut parts.headers, false);
            parts.headers.remove("sec-websocket-accept");
        }
        return Ok(Answer::Switched(parts));
    }
    Ok(Answer::Upstream(resp, rule))
}

/// Fault injection, then the rule's request header rules and rewrite.
async fn filters(
    ctx: &Inputs,
    rule: Option<&Arc<traffic::HttpRoute>>,
    req: &mut Request<Incoming>,
    matched_prefix: Option<&str>,
    record: &mut Record,
) -> Result<(), Stop> {
    if let Some(abort) = filters::fault(ctx, rule, record).await {
        return Err(abort.into());
    }
    filters::request(rule, req, matched_prefix);
    Ok(())
}

/// The upstream request's head: the HTTP version Istio would choose, an
/// upgrade's client half, hop-by-hop headers, extended CONNECT translated.
fn upstream_request(
    down: &Downstream,
    mut req: Request<Incoming>,
    grpc: bool,
    declared: Option<protocol::Declared>,
    cluster: Option<&traffic::Cluster>,
) -> Outgoing {
    let extended_connect = is_extended_connect(&req);
    let upgrade = wants_upgrade(&req) || extended_connect;
    let no_pool = traffic::ConnectionPool::default();
    let pool_settings = cluster.map_or(&no_pool, |c| &c.policy.pool);
    let client_h2 = req.version() == hyper::Version::HTTP_2;
    let h2 = protocol::upstream_http2(declared, client_h2, grpc, down.gateways.is_some(), pool_settings, upgrade);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    for_upstream(&mut parts, upgrade, h2, down.orig);
    let translated = extended_connect && !h2;
    if translated {
        connect_to_upgrade(&mut parts);
    }
    Outgoing { parts, body, h2, client_upgrade, extended_connect, translated }
}

/// The request body: kept whole (within the retry buffer and the body
/// timeout) when retries or a mirror need it again, else streamed.
enum RequestBody {
    Streaming(Option<Incoming>),
    Kept(Bytes),
}

async fn keep_body(
    ctx: &Inputs,
    down: &Downstream,
    headers: &HeaderMap,
    body: Incoming,
    wanted: bool,
    record: &mut Record,
) -> Result<RequestBody, Stop> {
    if !(wanted && retry::fits_retry_buffer(headers, &body)) {
        return Ok(RequestBody::Streaming(Some(body)));
    }
    let read = http_body_util::Limited::new(body, retry::RETRY_BUFFER).collect();
    match tokio::time::timeout(ctx.limits.body_timeout, read).await {
        Ok(Ok(collected)) => {
            let bytes = collected.to_bytes();
            record.add_request_bytes(bytes.len());
            Ok(RequestBody::Kept(bytes))
        }
        Ok(Err(e)) => {
            tracing::info!(peer = %down.peer, error = %e, "reading the request body failed");
            Err(LocalReply::BAD_BODY.into())
        }
        Err(_) => {
            tracing::info!(peer = %down.peer, "the request body did not arrive in time");
            Err(LocalReply::BODY_TIMEOUT.into())
        }
    }
}

/// A copy to the `mirror` destination, when the body was kept (as Envoy, a
/// body too large to copy is not mirrored).
fn mirror(
    ctx: &Arc<Inputs>,
    down: &Arc<Downstream>,
    source: Option<Arc<Workload>>,
    parts: &hyper::http::request::Parts,
    body: &RequestBody,
    dest: traffic::WeightedDestination,
    h2: bool,
) {
    match body {
        RequestBody::Kept(b) => {
            let copy = mirror::mirror_request(ctx.clone(), down.clone(), source, parts.clone(), b.clone(), dest, h2);
            tokio::spawn(copy);
        }
        RequestBody::Streaming(_) => {
            ctx.metrics.mirrored.get_or_create(&crate::telemetry::ResultLabels { result: "skipped" }).inc();
        }
    }
}

/// Circuit breakers: the request holds its place until its response is complete.
async fn admit(cluster: Option<&Arc<cluster::ClusterState>>, h2: bool, record: &mut Record) -> Result<(), Stop> {
    let Some(cs) = cluster else { return Ok(()) };
    match cs.admit(!h2).await {
        Some(admission) => {
            record.hold(admission);
            Ok(())
        }
        None => Err(Stop::Overflow),
    }
}

/// The upstream's response to the client: hop-by-hop headers dropped, the
/// rule's response header rules, the body metered.
fn respond(
    resp: Response<pool::ResponseBody>,
    rule: Option<&Arc<traffic::HttpRoute>>,
    mut record: Record,
) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    filters::response(rule, &mut parts.headers);
    record.set_response(parts.status, &parts.headers);
    Response::from_parts(parts, Metered::response(body, record).boxed_unsync())
}

mod tries;
