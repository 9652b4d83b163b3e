//! RequestAuthentication at the destination: the workload's JWT rules and
//! their keys, the token checked, and the request as the rules leave it.
use std::sync::Arc;

use hyper::{
    Request,
    body::Incoming,
    header::{HeaderName, HeaderValue},
};

use super::{Inbound, Stop};
use crate::{
    identity::jwt,
    proxy::{Inputs, http::X_FORWARDED_CLIENT_CERT},
    routing::policy,
    state::security::{JwtKey, JwtRule},
};

/// Whose `x-forwarded-client-cert` a request keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Xfcc {
    /// At a pod: only a gateway's (whose identity was proven).
    FromGatewaysOnly,
    /// At a gateway: its own, set from the client certificate it verified.
    Keep,
}

/// RequestAuthentication: the workload's JWT rules, their keys (fetched
/// from `jwksUri`, again once for a key the set lacks), the token checked,
/// and the request as the rules leave it: headers the mesh sets dropped from
/// the client's, the token's outputs written, and `x-forwarded-client-cert`
/// kept only from a gateway.
pub(super) async fn authenticate(
    ctx: &Inputs,
    state: Arc<crate::state::State>,
    inbound: &Inbound,
    req: &mut Request<Incoming>,
    xfcc: Xfcc,
) -> Result<Option<Arc<jwt::Verified>>, Stop> {
    let rules = policy::jwt_rules(&state, inbound.judged_as(&state));
    let mut keyed = Vec::with_capacity(rules.len());
    for rule in rules {
        let keys = match &rule.jwks_uri {
            Some(uri) => ctx.jwks.keys(uri, rule.timeout).await,
            None => rule.keys.clone(),
        };
        keyed.push((rule, keys));
    }
    let mut checked = jwt::authenticate(&keyed, req.headers(), req.uri().query(), &ctx.jwt_verified);
    // A key the fetched set lacks: the issuer may have rotated; fetch again once.
    if let Err(jwt::Refused { error: jwt::JwtError::NoKey, rule: Some(rule) }) = &checked
        && let Some(uri) = &rule.jwks_uri
    {
        let fresh = ctx.jwks.refetch(uri, rule.timeout).await;
        for (_, keys) in keyed.iter_mut().filter(|(r, _)| r.jwks_uri.as_ref() == Some(uri)) {
            *keys = fresh.clone();
        }
        checked = jwt::authenticate(&keyed, req.headers(), req.uri().query(), &ctx.jwt_verified);
    }
    let authn = match checked {
        Ok(a) => a,
        Err(jwt::Refused { error: e, .. }) => {
            ctx.metrics.jwt_checks.get_or_create(&crate::telemetry::ResultLabels { result: "invalid" }).inc();
            tracing::info!(peer = %inbound.peer, target = %inbound.target, error = %e, "request refused: JWT");
            return Err(Stop::Jwt(e));
        }
    };
    if !keyed.is_empty() {
        let result = if authn.is_some() { "valid" } else { "none" };
        ctx.metrics.jwt_checks.get_or_create(&crate::telemetry::ResultLabels { result }).inc();
    }
    // Headers the mesh sets are the mesh's alone: what a client sent under
    // their names is dropped first.
    let owned = mesh_owned_headers(&keyed);
    let outputs = authn.as_ref().map(token_outputs);
    let verified = authn.map(|a| a.verified);
    drop(keyed);
    // The arrival's source is a gateway pod only where its identity was proven.
    let from_gateway = inbound.principal.is_some() && inbound.source.as_ref().is_some_and(|w| w.gateway);
    drop(state);
    for name in &owned {
        req.headers_mut().remove(name);
    }
    // A gateway's x-forwarded-client-cert names the client it verified; from
    // anyone else it is a claim nobody checked.
    if !from_gateway && xfcc == Xfcc::FromGatewaysOnly {
        req.headers_mut().remove(&X_FORWARDED_CLIENT_CERT);
    }
    for (name, value) in outputs.into_iter().flatten() {
        match value {
            Some(v) => req.headers_mut().insert(name, v),
            None => req.headers_mut().remove(name),
        };
    }
    Ok(verified)
}

/// The headers the workload's JWT rules write (`outputPayloadToHeader`,
/// `outputClaimToHeaders`): set by the mesh from a verified token, never
/// taken from the client.
fn mesh_owned_headers(keyed: &[(&JwtRule, Arc<[JwtKey]>)]) -> Vec<HeaderName> {
    let names = keyed.iter().flat_map(|(r, _)| {
        let payload = r.output_payload_to_header.iter();
        payload.chain(r.output_claim_to_headers.iter().map(|(h, _)| h))
    });
    names.filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok()).collect()
}

/// What a valid token changes in the request, as its rule says: the
/// token's header removed (unless `forwardOriginalToken`), the payload and
/// chosen claims copied into headers. (`None`: remove.)
fn token_outputs(a: &jwt::Authenticated<'_>) -> Vec<(HeaderName, Option<HeaderValue>)> {
    let mut out = Vec::new();
    for h in &a.consumed {
        if let Ok(name) = HeaderName::from_bytes(h.as_bytes()) {
            out.push((name, None));
        }
    }
    let rule = a.rule;
    if let Some(h) = &rule.output_payload_to_header
        && let (Ok(name), Ok(v)) = (HeaderName::from_bytes(h.as_bytes()), HeaderValue::from_str(&a.verified.payload))
    {
        out.push((name, Some(v)));
    }
    for (h, claim) in &rule.output_claim_to_headers {
        let path = [claim.clone()];
        let values = policy::claim_values(&a.verified.claims, &path);
        let Ok(name) = HeaderName::from_bytes(h.as_bytes()) else { continue };
        // A claim that is absent, or not a string, number or boolean: no header.
        let joined = values.iter().map(|v| v.as_ref()).collect::<Vec<_>>().join(",");
        match HeaderValue::from_str(&joined) {
            Ok(v) if !values.is_empty() => out.push((name, Some(v))),
            _ => out.push((name, None)),
        }
    }
    out
}
