//! Mirroring (VirtualService `mirror`): a copy of a sampled request, sent to
//! another destination; the answer is read and dropped.
use super::*;

/// Whether this request is mirrored: the rule's percentage, rolled.
pub(super) fn sampled(ctx: &Inputs, rule: Option<&Arc<traffic::HttpRoute>>) -> Option<traffic::WeightedDestination> {
    let (dest, pct) = rule?.mirror.clone()?;
    ((ctx.next_random() % 1_000_000) as f64 / 10_000.0 < pct).then_some(dest)
}

/// Sends a copy of a request to the `mirror` destination; the answer is read
/// and dropped. The authority gets Envoy's `-shadow` suffix.
pub(super) async fn mirror_request(
    ctx: Arc<Inputs>,
    down: Arc<Downstream>,
    source: Option<Arc<Workload>>,
    mut parts: hyper::http::request::Parts,
    body: Bytes,
    dest: traffic::WeightedDestination,
    h2: bool,
) {
    let state = ctx.state();
    let from = state.by_vip.get(down.orig.ip()).map(|s| s.key.as_str()).unwrap_or_default();
    let client = source.as_deref().map(|w| &*w.namespace);
    let route = match routing::resolve(&state, client, from, &dest, down.orig.port()) {
        Ok((target, port, labels, _, _)) => crate::routing::l4::route_service(
            target,
            port,
            labels,
            crate::routing::l4::Pick::Turn(ctx.next_pick()),
            &|_| false,
        ),
        Err(reason) => {
            tracing::debug!(%reason, "mirror destination unavailable");
            Route::Passthrough { addr: down.orig }
        }
    };
    let Route::Service { endpoint, addr, .. } = route else {
        ctx.metrics.mirrored.get_or_create(&crate::telemetry::ResultLabels { result: "failed" }).inc();
        return;
    };
    let shadow = |a: &str| format!("{a}-shadow");
    if let Some(host) = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(shadow)
        && let Ok(v) = HeaderValue::from_str(&host)
    {
        parts.headers.insert(header::HOST, v);
    }
    if let Some(a) = parts.uri.authority().map(|a| shadow(a.as_str())) {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        if let Ok(uri) = format!("http://{a}{path}").parse() {
            parts.uri = uri;
        }
    }
    let from = source.as_ref().map(|w| w.principal.clone());
    let key = PoolKey { client: down.peer_ip, source: from, upstream: addr, h2, tls: false, service: None };
    let limits = limits(&ctx, None);
    let to =
        Target { source, dest: Some(endpoint), addr, service: None, labels: TcpLabels::black_hole(None), tls: None };
    drop(state);
    let req = Request::from_parts(parts, Full::new(body).map_err(|e| match e {}).boxed_unsync());
    let result = match send(&ctx, &down, &to, key, req, &limits, None).await {
        // Read to its end: the connection goes back to the pool.
        Ok(resp) => match resp.into_body().collect().await {
            Ok(_) => "sent",
            Err(_) => "failed",
        },
        Err(_) => "failed",
    };
    ctx.metrics.mirrored.get_or_create(&crate::telemetry::ResultLabels { result }).inc();
}
