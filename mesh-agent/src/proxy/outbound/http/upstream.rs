//! The upstream exchange of a request: connection limits, the pooled or new
//! connection (direct, TLS-originated or over HBONE), sending, and turning a
//! failure into Envoy's reply and flags; an upgraded connection's tunnel.
use super::*;

/// The pool limits from a DestinationRule's `connectionPool`, else the defaults.
pub(super) fn limits(ctx: &Inputs, pool: Option<&traffic::ConnectionPool>) -> pool::Limits {
    pool::Limits {
        connect_timeout: pool.and_then(|p| p.connect_timeout).unwrap_or(ctx.connect_timeout),
        max_requests_per_connection: pool.and_then(|p| p.max_requests_per_connection),
        idle_timeout: pool.and_then(|p| p.idle_timeout).unwrap_or(pool::DEFAULT_IDLE_TIMEOUT),
    }
}

/// One try: a pooled or new connection to the target, the request, the
/// response head (within `per_try`).
#[expect(clippy::too_many_arguments, reason = "one try's inputs; called from one place")]
pub(super) async fn exchange(
    ctx: &Arc<Inputs>,
    down: &Downstream,
    target: &Target,
    key: PoolKey,
    req: Request<Body>,
    per_try: Option<Duration>,
    limits: &pool::Limits,
    record: &mut Record,
) -> Result<Response<pool::ResponseBody>, Failure> {
    let sent = send(ctx, down, target, key, req, limits, Some(record));
    match per_try {
        Some(t) => tokio::time::timeout(t, sent).await.map_err(|_| Failure::Timeout)?,
        None => sent.await,
    }
}

/// Sends a request on a pooled connection, or a new one if none is idle (or
/// those that were had closed meanwhile).
pub(super) async fn send(
    ctx: &Arc<Inputs>,
    down: &Downstream,
    target: &Target,
    key: PoolKey,
    mut req: Request<Body>,
    limits: &pool::Limits,
    mut record: Option<&mut Record>,
) -> Result<Response<pool::ResponseBody>, Failure> {
    loop {
        let (sender, pooled) = match ctx.http_pool.take(&key, limits) {
            Some(s) => (s, true),
            None => {
                let state = ctx.state();
                match connect(ctx, &state, down, target, key.h2, limits.connect_timeout).await {
                    Ok((s, _)) => (s, false),
                    Err(e) => {
                        if let (ProxyError::Tunnel(_), Some(r)) = (&e, record.as_deref_mut()) {
                            r.set_mtls(true);
                        }
                        return Err(Failure::Connect(e));
                    }
                }
            }
        };
        if let Some(r) = record.as_deref_mut() {
            r.set_mtls(sender.is_mtls());
        }
        let release = pool::Release { ctx: ctx.clone(), key: key.clone(), limits: *limits };
        match sender.send(req, release).await {
            Ok(resp) => return Ok(resp),
            // Closed while idle: the request was not given to it; the next one.
            Err(pool::SendError::Stale(r, _)) if pooled => req = *r,
            Err(pool::SendError::Stale(_, e) | pool::SendError::Failed(e)) => return Err(Failure::Reset(e)),
        }
    }
}

/// The answer when no try got a response.
pub(super) fn fail_request(
    ctx: &Inputs,
    down: &Downstream,
    addr: SocketAddrV4,
    record: Record,
    f: Failure,
) -> Response<Body> {
    match f {
        Failure::Connect(e) => {
            tracing::info!(peer = %down.peer, upstream = %addr, error = %e, "request failed: upstream connection");
            ctx.metrics.connection_failures.get_or_create(&crate::telemetry::ReasonLabels { reason: e.reason() }).inc();
            let mut record = record;
            record.set_transport_failure(&e);
            record.finish_local(e.reply())
        }
        Failure::Reset(e) => {
            tracing::info!(peer = %down.peer, upstream = %addr, error = %e, "request failed upstream");
            record.finish_local(LocalReply::RESET)
        }
        Failure::Timeout => record.finish_local(LocalReply::TIMEOUT),
    }
}
/// A new upstream connection and its HTTP handshake.
pub(super) async fn connect(
    ctx: &Arc<Inputs>,
    state: &crate::state::State,
    down: &Downstream,
    to: &Target,
    h2: bool,
    timeout: Duration,
) -> Result<(Sender, bool), ProxyError> {
    // The generation before connecting: a policy reload meanwhile keeps this
    // connection out of the pool.
    let generation = ctx.http_pool.generation();
    let addr = to.addr;
    let hop = Hop {
        source: to.source.as_ref(),
        peer: down.peer,
        dest: to.dest.as_ref(),
        addr,
        service: to.service.as_ref(),
        opaque: false,
    };
    let opened = super::super::open::open_upstream(ctx, state, hop, timeout).await?;
    let mtls = opened.mtls;
    let mut io = opened.into_io();
    if let Some((tls, sni)) = &to.tls {
        io = match io {
            Upstream::Tcp(tcp) => super::super::tls::originate_tls(&ctx.originations, tcp, tls, sni, h2, addr).await?,
            other => other,
        };
    }
    let sender = pool::handshake(io, h2, mtls, generation).await.map_err(|error| ProxyError::Connect {
        addr,
        source_ip: None,
        error: std::io::Error::other(error),
    })?;
    Ok((sender, mtls))
}
