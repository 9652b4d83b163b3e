//! The tries of one request: retries, per-try and route timeouts, the
//! circuit breaker's view of each outcome, and re-routing between tries.
use super::*;

/// What every try sends, and the rule that governs the tries.
pub(super) struct Attempt<'a> {
    pub(super) parts: hyper::http::request::Parts,
    pub(super) body: RequestBody,
    pub(super) h2: bool,
    pub(super) rule: Option<&'a Arc<traffic::HttpRoute>>,
    pub(super) retries: Option<&'a traffic::Retries>,
    pub(super) cluster: Option<&'a traffic::Cluster>,
}

/// Tries until an answer: retries as the rule allows (re-routed each time),
/// within the route's timeout; outlier detection told of each outcome.
pub(super) async fn tries(
    ctx: &Arc<Inputs>,
    down: &Arc<Downstream>,
    mut attempt: Attempt<'_>,
    first: Target,
    cluster_state: Option<&Arc<cluster::ClusterState>>,
    record: &mut Record,
) -> Result<(Response<pool::ResponseBody>, Target), Stop> {
    let limits = limits(ctx, attempt.cluster.map(|c| &c.policy.pool));
    let per_try = attempt.retries.and_then(|r| r.per_try_timeout);
    let deadline = attempt.rule.and_then(|r| r.timeout).map(|t| tokio::time::Instant::now() + t);
    let mut target = first;
    let mut try_no = 0;
    loop {
        try_no += 1;
        let body = match &mut attempt.body {
            RequestBody::Kept(b) => Full::new(b.clone()).map_err(|e| match e {}).boxed_unsync(),
            RequestBody::Streaming(b) => match b.take() {
                Some(b) => Metered::request(b, record.shared()).boxed_unsync(),
                None => Full::new(Bytes::new()).map_err(|e| match e {}).boxed_unsync(),
            },
        };
        let up_req = Request::from_parts(attempt.parts.clone(), body);
        if let Some(cs) = cluster_state {
            record.hold_in_flight(cs.in_flight(target.addr));
        }
        target::dynamic_dns(ctx, &mut target, &attempt.parts).await?;
        record.set_target(target.labels.clone(), target.addr);
        let source = target.source.as_ref().map(|w| w.principal.clone());
        let service = target.service.as_ref().map(|s| s.hostname.clone());
        let (upstream, h2, tls) = (target.addr, attempt.h2, target.tls.is_some());
        let key = PoolKey { client: down.peer_ip, source, upstream, h2, tls, service };
        let one = exchange(ctx, down, &target, key, up_req, per_try, &limits, record);
        let result = match deadline {
            Some(d) => match tokio::time::timeout_at(d, one).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::info!(peer = %down.peer, upstream = %target.addr, "request timed out");
                    return Err(LocalReply::TIMEOUT.into());
                }
            },
            None => one.await,
        };
        let outcome = match &result {
            Ok(resp) => cluster::Outcome::Status(resp.status().as_u16()),
            Err(Failure::Connect(_)) => cluster::Outcome::ConnectFailure,
            Err(_) => cluster::Outcome::NoResponse,
        };
        if let (Some(cs), Some(c)) = (cluster_state, attempt.cluster) {
            cs.report(target.addr, outcome, c.endpoints);
        }
        match (retry::after_try(try_no, attempt.retries, &outcome), result) {
            (retry::Next::Retry, _) => tracing::debug!(upstream = %target.addr, ?outcome, try_no, "retrying"),
            (retry::Next::Answer { exhausted }, result) => {
                if exhausted {
                    record.set_flag(Flags::URX);
                }
                return match result {
                    Ok(resp) => Ok((resp, target)),
                    Err(f) => Err(Stop::Failed(target.addr, f)),
                };
            }
        }
        tokio::time::sleep(retry::RETRY_BACKOFF).await;
        target = reroute(ctx, down, &attempt.parts, record)?;
    }
}

/// Another endpoint for the next try (routing is asked again).
fn reroute(
    ctx: &Inputs,
    down: &Downstream,
    parts: &hyper::http::request::Parts,
    record: &mut Record,
) -> Result<Target, Stop> {
    let state = ctx.state();
    let view = request_view(&parts.method, &parts.uri, &parts.headers, down);
    let Some((again, source)) = decide(ctx, &state, down, &view, ctx.next_pick()) else {
        return Err(LocalReply::NO_ROUTE.into());
    };
    match target(again.route, source.as_ref(), again.cluster.as_ref()) {
        Ok(t) => {
            record.set_target(t.labels.clone(), t.addr);
            Ok(t)
        }
        Err(refused) => Err(refused.error.reply().into()),
    }
}
