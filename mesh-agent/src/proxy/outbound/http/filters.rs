//! The rule's filters, in Envoy's order: a redirect answered here, fault
//! injection (delay, abort) before anything goes upstream, then the request
//! header rules and the path rewrite; the response header rules on the way
//! back.
use super::*;

/// The redirect a rule answers with, if it has one: status and `Location`.
pub(super) fn redirect(
    rule: Option<&Arc<traffic::HttpRoute>>,
    req: &Request<Incoming>,
    down: &Downstream,
    matched_prefix: Option<&str>,
) -> Option<(u16, String)> {
    let redirect = rule?.redirect.as_ref()?;
    if let Some(target) = &redirect.gateway_api {
        return Some((redirect.code, gateway_api_location(redirect, target, req, down, matched_prefix)));
    }
    let authority = redirect.authority.clone().unwrap_or_else(|| request_authority(req, down));
    // Envoy's `path_redirect` replaces the path and keeps the request's
    // query (`strip_query` is false), unless the new path carries its own.
    let path = match (&redirect.uri, req.uri().query()) {
        (Some(uri), Some(query)) if !uri.contains('?') => format!("{uri}?{query}"),
        (Some(uri), _) => uri.clone(),
        (None, _) => view_path(req),
    };
    Some((redirect.code, format!("http://{authority}{path}")))
}

/// The Gateway API's `RequestRedirect` location: scheme (else the
/// request's, plain HTTP here), host (else the request's, without its port),
/// port (else the scheme's well-known one when a scheme is given, else the
/// one the client connected to; a well-known port is left out), and path
/// (the whole path, or the matched prefix, replaced; the query kept).
fn gateway_api_location(
    redirect: &traffic::Redirect,
    target: &traffic::RedirectTarget,
    req: &Request<Incoming>,
    down: &Downstream,
    matched_prefix: Option<&str>,
) -> String {
    let scheme = target.scheme.as_deref().unwrap_or("http");
    let authority = request_authority(req, down);
    let host = redirect.authority.clone().unwrap_or_else(|| match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h.to_owned(),
        _ => authority.clone(),
    });
    let well_known = |s: &str| match s {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    };
    let port = target.port.or_else(|| target.scheme.as_deref().and_then(well_known)).unwrap_or(down.orig.port());
    let port = if well_known(scheme) == Some(port) { String::new() } else { format!(":{port}") };
    let path = match &redirect.uri {
        Some(uri) => {
            let prefix = matched_prefix.filter(|_| target.replace_prefix);
            crate::routing::http::rewrite_path(&view_path(req), prefix, uri)
        }
        None => view_path(req),
    };
    format!("{scheme}://{host}{port}{path}")
}

/// Fault injection: a delay (flag `DI`) and an abort, each for its share of
/// requests. `Some`: the abort's answer.
pub(super) async fn fault(
    ctx: &Inputs,
    rule: Option<&Arc<traffic::HttpRoute>>,
    record: &mut Record,
) -> Option<LocalReply> {
    let fault = rule?.fault.as_ref()?;
    let roll = |pct: f64| (ctx.next_random() % 1_000_000) as f64 / 10_000.0 < pct;
    if let Some((delay, pct)) = fault.delay
        && roll(pct)
    {
        tokio::time::sleep(delay).await;
        record.set_flag(Flags::DI);
    }
    let (status, pct) = fault.abort?;
    roll(pct).then(|| LocalReply::fault_abort(StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)))
}

/// The rule's request header operations and `rewrite`.
pub(super) fn request(
    rule: Option<&Arc<traffic::HttpRoute>>,
    req: &mut Request<Incoming>,
    matched_prefix: Option<&str>,
) {
    let Some(r) = rule else { return };
    r.headers.request.apply(req.headers_mut());
    if let Some(w) = &r.rewrite {
        rewrite(req, w, matched_prefix);
    }
}

/// The rule's response header operations.
pub(super) fn response(rule: Option<&Arc<traffic::HttpRoute>>, headers: &mut HeaderMap) {
    if let Some(r) = rule {
        r.headers.response.apply(headers);
    }
}
