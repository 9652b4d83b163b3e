//! The destination agent's side: mTLS on 15008, CONNECT streams authorized
//! and joined to the local pod (or handed to a gateway port).
use super::*;

/// The second hop of the egress-gateway pattern, given by the agent (the
/// gateway module implements it; HBONE does not import it): for a CONNECT
/// target and the identity the connection was made for, what serves the
/// stream when the target is a gateway port of this node run as that identity.
pub type GatewayHop = Arc<dyn Fn(SocketAddrV4, &str) -> Option<HopServer> + Send + Sync>;

/// Serves one upgraded CONNECT stream from `peer`.
pub type HopServer = Box<
    dyn FnOnce(TokioIo<Upgraded>, SocketAddr) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send,
>;

/// Accepts mTLS connections on 15008 until `stop` fires.
pub async fn serve(
    ctx: Arc<Inputs>,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    hop: GatewayHop,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let gate = crate::proxy::limits::Gate::new("hbone", &ctx.limits);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let Ok(ticket) = gate.admit(peer.ip(), &ctx.metrics) else { continue };
                    // At most so many handshakes at once; a client over it waits for none.
                    let Some(handshake) = gate.handshake(peer.ip(), &ctx.metrics) else { continue };
                    let (ctx, acceptor, hop) = (ctx.clone(), acceptor.clone(), hop.clone());
                    tokio::spawn(async move {
                        let _ticket = ticket;
                        serve_connection(ctx, tcp, peer, acceptor, hop, handshake).await
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "HBONE accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn serve_connection(
    ctx: Arc<Inputs>,
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    hop: GatewayHop,
    handshake: crate::proxy::limits::Handshake,
) {
    let _ = tcp.set_nodelay(true);
    let ctx_limits = ctx.limits.clone();
    let refused = |why: String| {
        tracing::warn!(%peer, "HBONE connection refused: {why}");
        ctx.metrics.connection_failures.get_or_create(&crate::telemetry::ReasonLabels { reason: "tunnel_tls" }).inc();
    };
    let tls = match tokio::time::timeout(ctx.limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return refused(format!("mTLS handshake: {e}")),
        Err(_) => return refused("mTLS handshake timed out".into()),
    };
    drop(handshake);
    let (_, conn) = tls.get_ref();
    let now = std::time::SystemTime::now();
    let leaf = conn.peer_certificates().and_then(|c| c.first());
    let peer_id = leaf.and_then(|c| identity::current_peer_identity(c, now));
    let server_id = conn.server_name().and_then(|sni| ctx.certs.identity_for_server_name(sni));
    let (Some(peer_id), Some(server_id)) = (peer_id, server_id) else {
        return refused("client certificate without a SPIFFE identity, or unknown server name".into());
    };
    let peer_id: Arc<str> = peer_id.into();
    let service = hyper::service::service_fn(move |req| {
        let (ctx, peer_id, server_id, hop) = (ctx.clone(), peer_id.clone(), server_id.clone(), hop.clone());
        async move { Ok::<_, std::convert::Infallible>(handle_connect(ctx, &hop, peer, peer_id, server_id, req).await) }
    });
    let result = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        // Per stream: 1000 streams × hyper's default 400 KB was 400 MB a connection.
        .max_send_buf_size(ctx_limits.h2_send_buffer)
        .keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(ctx_limits.keepalive_timeout)
        .serve_connection(TokioIo::new(tls), service)
        .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "HBONE connection ended");
    }
}

fn answer(status: StatusCode, reason: &str) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(reason) {
        r.headers_mut().insert("x-mesh-reason", v);
    }
    r
}

/// What a CONNECT asks for: the target pod address, and the original client's
/// IP when the source agent names one (`Forwarded: for=`); or the answer to
/// refuse it with. Pure, for the peer's bytes decide it (fuzzed).
pub fn connect_request(
    method: &Method,
    uri: &hyper::Uri,
    headers: &hyper::HeaderMap,
) -> Result<(SocketAddrV4, Option<Ipv4Addr>), (StatusCode, &'static str)> {
    if method != Method::CONNECT {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "only CONNECT is served on this port"));
    }
    let Some(target) = uri.authority().and_then(|a| a.as_str().parse::<SocketAddrV4>().ok()) else {
        return Err((StatusCode::BAD_REQUEST, "CONNECT target must be <ipv4>:<port>"));
    };
    Ok((target, forwarded_for(headers)))
}

/// `Forwarded: for=<ip>` (RFC 7239), first element.
fn forwarded_for(headers: &hyper::HeaderMap) -> Option<Ipv4Addr> {
    let v = headers.get("forwarded")?.to_str().ok()?;
    let first = v.split(',').next()?;
    first.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        k.eq_ignore_ascii_case("for").then(|| v.trim_matches('"').parse().ok())?
    })
}

async fn handle_connect(
    ctx: Arc<Inputs>,
    hop: &GatewayHop,
    peer: SocketAddr,
    peer_id: Arc<str>,
    server_id: Arc<str>,
    mut req: Request<Incoming>,
) -> Response<Empty<Bytes>> {
    let (target, client_ip) = match connect_request(req.method(), req.uri(), req.headers()) {
        Ok(asked) => asked,
        Err((status, why)) => return answer(status, why),
    };
    // The second hop of the egress-gateway pattern: a gateway port on this node.
    if let Some(serve) = hop(target, &server_id) {
        let guard = ctx.active.enter();
        tokio::spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(up) => {
                    tracing::debug!(%peer, source = %peer_id, %target, "HBONE stream to a gateway");
                    serve(TokioIo::new(up), peer).await;
                }
                Err(e) => tracing::debug!(%peer, %target, error = %e, "HBONE stream ended before upgrade"),
            }
            drop(guard);
        });
        return answer(StatusCode::OK, "");
    }
    let state = ctx.state();
    let dest = state
        .workload_by_ip(*target.ip())
        .filter(|w| w.meshed && w.node.as_deref() == Some(ctx.node.as_str()))
        .cloned();
    let Some(dest) = dest else {
        tracing::warn!(%peer, %target, "HBONE: target is not a meshed pod on this node");
        return answer(StatusCode::NOT_FOUND, "target is not a meshed pod on this node");
    };
    if *dest.principal != *server_id {
        tracing::warn!(%peer, %target, expected = %server_id, actual = %dest.principal, "HBONE: identity mismatch");
        return answer(StatusCode::FORBIDDEN, "target does not run as the identity the connection was made for");
    }
    // The original client: trusted only when that pod runs as the peer's identity.
    let source = client_ip.and_then(|ip| state.workload_by_ip(ip)).filter(|w| *w.principal == *peer_id).cloned();
    // A gateway or a node's host client: labelled as that workload, no pod IP.
    let labelled = source.clone().or_else(|| state.edge_workload(&peer_id));
    let source_ip = source.as_ref().and_then(|w| w.ip);
    let policy_ip = source_ip.unwrap_or(match peer.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    });
    let labels = || {
        let mut labels = TcpLabels::new(labelled.as_deref(), Some(&dest), None, false);
        labels.reporter = "destination";
        labels.source_principal = crate::telemetry::Label(peer_id.clone());
        labels.connection_security_policy = "mutual_tls";
        labels
    };
    let arrival = proxy::l7::destination::Inbound {
        dest: dest.clone(),
        target,
        peer,
        principal: Some(peer_id.clone()),
        client_ip: policy_ip,
        source: labelled.clone(),
        // Replies to the source pod's IP come back through the pod's captured veth.
        transparent: source_ip.filter(|_| ctx.is_captured(*target.ip())),
        mtls: true,
    };
    let admitted = proxy::admit::admit(&state, arrival);
    drop(state);
    let arrival = match admitted {
        // Request policies: the stream is parsed here, each request judged.
        Ok(proxy::admit::Admission::Http(inbound)) => {
            let guard = ctx.active.enter();
            let upgrade = hyper::upgrade::on(&mut req);
            drop(req);
            tokio::spawn(async move {
                match upgrade.await {
                    Ok(up) => proxy::l7::destination::serve(ctx, TokioIo::new(up), inbound).await,
                    Err(e) => tracing::debug!(%peer, %target, error = %e, "HBONE stream ended before upgrade"),
                }
                drop(guard);
            });
            return answer(StatusCode::OK, "");
        }
        Ok(proxy::admit::Admission::Tcp(arrival)) => arrival,
        Err(err) => {
            tracing::warn!(%peer, source = %peer_id, %target, error = %err, "HBONE: connection refused");
            proxy::record_failure(&ctx, Some(labels()), &err);
            return answer(StatusCode::UNAUTHORIZED, &err.to_string());
        }
    };
    let (upstream, revocable) = match proxy::admit::connect_admitted(&ctx, &arrival, ctx.connect_timeout).await {
        Ok(r) => r,
        Err(err) => {
            tracing::warn!(%peer, %target, error = %err, "HBONE: upstream connect failed");
            proxy::record_failure(&ctx, Some(labels()), &err);
            return answer(StatusCode::SERVICE_UNAVAILABLE, &err.to_string());
        }
    };
    let labels = labels();
    let guard = ctx.active.enter();
    let meters = proxy::ConnMeters::open(&ctx.metrics, &labels);
    drop(labels);
    // Only the upgrade goes into the stream's task, not the request.
    let upgrade = hyper::upgrade::on(&mut req);
    drop(req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                tracing::debug!(%peer, source = %peer_id, %target, "HBONE stream proxying");
                let io = TokioIo::new(upgraded);
                proxy::pump(&ctx, io, upstream, meters, target, Some(revocable), |_, u| proxy::reset(u)).await;
            }
            Err(e) => tracing::debug!(%peer, %target, error = %e, "HBONE stream ended before upgrade"),
        }
        drop(guard);
    });
    answer(StatusCode::OK, "")
}
