//! The destination's judgement of one request, in Envoy's filter order:
//! CUSTOM (the external authorizers), then DENY and ALLOW on the request as
//! it then is; and [`gate`], the same after RequestAuthentication for a
//! request at a gateway pod (Istio judges a gateway's HTTP listeners per
//! request).
use std::sync::Arc;

use hyper::{
    Request, Response,
    body::Incoming,
    header::{self, HeaderName, HeaderValue},
};

use super::{Inbound, authn, ext_authz};
use crate::{
    identity::jwt,
    proxy::{
        Inputs, LocalReply,
        http::{Body, metered::Record},
    },
    routing::policy::{self, Attributes, Peer, Verdict},
};

/// Why a request stops here instead of reaching the pod.
pub(crate) enum Stop {
    /// The agent's own reply.
    Local(LocalReply),
    /// A token that does not verify: 401 with `WWW-Authenticate`.
    Jwt(jwt::JwtError),
    /// The external authorizer's answer.
    Answer(Box<Response<Body>>),
}

impl Stop {
    /// The one place a stop becomes the response and its record.
    pub(crate) fn answer(self, record: Record) -> Response<Body> {
        match self {
            Stop::Local(reply) => record.finish_local(reply),
            Stop::Jwt(e) => {
                let mut r = record.finish_local(LocalReply::jwt_refused(&e));
                let challenge = HeaderValue::from_static("Bearer error=\"invalid_token\"");
                r.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
                r
            }
            Stop::Answer(r) => record.finish_answer(*r),
        }
    }
}

/// What CUSTOM leaves: the request head as the authorizer changed it, the
/// body (replayed if the check read it), and headers for the client.
pub(super) type Customized = (hyper::http::request::Parts, ext_authz::Replay, Vec<(HeaderName, HeaderValue)>);

/// CUSTOM: the external authorizers the policies name (the pod's, then its
/// Service's, as its proxy and then the Service's waypoint would ask), each
/// asked in turn about the request (with its body when the provider wants
/// it) as the previous one let it through.
pub(super) async fn custom(
    ctx: &Arc<Inputs>,
    inbound: &Inbound,
    req: Request<Incoming>,
    verified: Option<&jwt::Verified>,
) -> Result<Customized, Stop> {
    let providers = providers(ctx, inbound, &req, verified);
    let (mut parts, body) = req.into_parts();
    let mut body = ext_authz::Replay { read: None, rest: Some(body) };
    let mut to_downstream = Vec::new();
    for provider in providers {
        // The authorizer's headers are its own, too.
        for name in ext_authz::authorizer_headers(&provider, &parts.headers) {
            parts.headers.remove(name);
        }
        let read = match provider.body {
            None => None,
            Some(b) => match ext_authz::read_for_check(body, b.max_bytes as usize, b.allow_partial).await {
                Ok((read, replay)) => {
                    body = replay;
                    Some(read)
                }
                Err(()) => return Err(Stop::Local(LocalReply::TOO_LARGE_FOR_CHECK)),
            },
        };
        to_downstream.extend(ask(ctx, &provider, &mut parts, read.as_ref(), inbound).await?);
    }
    Ok((parts, body, to_downstream))
}

/// The external authorizers the CUSTOM policies matching the request name
/// (the pod's, then its Service's).
fn providers<B>(
    ctx: &Inputs,
    inbound: &Inbound,
    req: &Request<B>,
    verified: Option<&jwt::Verified>,
) -> Vec<Arc<crate::state::security::ExtAuthz>> {
    let state = ctx.state();
    let attributes = attributes(inbound, req.method(), req.uri(), req.headers(), verified);
    let found = policy::custom(&state, inbound.judged_as(&state), &attributes);
    found.into_iter().filter_map(|p| p.provider.clone()).collect()
}

/// One external authorizer asked about the request (its authorizer headers
/// already dropped): the request's headers as it allows them, and what it
/// gives the client; or its refusal.
async fn ask(
    ctx: &Arc<Inputs>,
    provider: &crate::state::security::ExtAuthz,
    parts: &mut hyper::http::request::Parts,
    body: Option<&hyper::body::Bytes>,
    inbound: &Inbound,
) -> Result<Vec<(HeaderName, HeaderValue)>, Stop> {
    let question = ext_authz::Ask { parts, body, conn: inbound };
    match ext_authz::check(ctx, provider, question).await {
        ext_authz::Checked::Deny(answer) => {
            tracing::info!(peer = %inbound.peer, target = %inbound.target, provider = %provider.name, status = %answer.status(), "request refused by the external authorizer");
            Err(Stop::Answer(Box::new(answer)))
        }
        ext_authz::Checked::Allow { upstream, remove, downstream } => {
            for name in remove {
                parts.headers.remove(name);
            }
            for (name, value) in upstream {
                parts.headers.insert(name, value);
            }
            Ok(downstream)
        }
    }
}

/// DENY and ALLOW, on the request as it now is; AUDIT logged and counted.
pub(super) fn authorize(
    ctx: &Inputs,
    inbound: &Inbound,
    parts: &hyper::http::request::Parts,
    verified: Option<&jwt::Verified>,
) -> Result<(), Stop> {
    let decision = {
        let state = ctx.state();
        let attributes = attributes(inbound, &parts.method, &parts.uri, &parts.headers, verified);
        policy::evaluate(&state, inbound.judged_as(&state), &attributes)
    };
    if let Some(audited) = &decision.audit {
        ctx.metrics.authorization_audits.inc();
        tracing::info!(policy = %audited, method = %parts.method, path = %parts.uri.path(), source = ?inbound.principal, "AUDIT");
    }
    if let Verdict::Deny(policy) = decision.verdict {
        tracing::info!(peer = %inbound.peer, target = %inbound.target, %policy, "request refused by AuthorizationPolicy");
        return Err(Stop::Local(LocalReply::RBAC_DENIED));
    }
    Ok(())
}

/// What policy sees of a request: its method, path, host and headers, the
/// verified token, and the connection's peer.
fn attributes<'a>(
    inbound: &'a Inbound,
    method: &'a hyper::Method,
    uri: &'a hyper::Uri,
    headers: &'a hyper::HeaderMap,
    verified: Option<&'a jwt::Verified>,
) -> Attributes<'a> {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let host = host.or(uri.authority().map(|a| a.as_str())).unwrap_or_default();
    let auth = verified.map(|v| policy::Auth {
        principal: &v.principal,
        audiences: &v.audiences,
        presenter: v.presenter.as_deref(),
        claims: &v.claims,
    });
    let request = policy::Request {
        method: method.as_str(),
        path: uri.path(),
        host,
        headers,
        auth,
        remote_ip: inbound.client_ip,
    };
    let peer = Peer { principal: inbound.principal.as_deref(), ip: inbound.client_ip };
    Attributes { peer, port: inbound.target.port(), request: Some(request) }
}

/// A request at a gateway pod's HTTP port (`inbound` names the gateway pod
/// and the client as policy sees it): RequestAuthentication, CUSTOM (the
/// request's headers; a provider that asks for the body refuses it, since
/// the gateway streams bodies on), then DENY and ALLOW. The request comes
/// back as the stages left it, with what CUSTOM gives the client (to add to
/// the response), or why it stops.
pub(crate) async fn gate(
    ctx: &Arc<Inputs>,
    inbound: &Inbound,
    mut req: Request<Incoming>,
) -> (Request<Incoming>, Result<Vec<(HeaderName, HeaderValue)>, Stop>) {
    let verified = match authn::authenticate(ctx, ctx.state(), inbound, &mut req, authn::Xfcc::Keep).await {
        Ok(v) => v,
        Err(stop) => return (req, Err(stop)),
    };
    let verified = verified.as_deref();
    let providers = providers(ctx, inbound, &req, verified);
    let (mut parts, body) = req.into_parts();
    let mut to_client = Vec::new();
    for provider in providers {
        if provider.body.is_some() {
            tracing::warn!(provider = %provider.name, target = %inbound.target, "a CUSTOM provider that checks request bodies is not asked at a gateway: request refused");
            return (Request::from_parts(parts, body), Err(Stop::Local(LocalReply::RBAC_DENIED)));
        }
        for name in ext_authz::authorizer_headers(&provider, &parts.headers) {
            parts.headers.remove(name);
        }
        match ask(ctx, &provider, &mut parts, None, inbound).await {
            Ok(headers) => to_client.extend(headers),
            Err(stop) => return (Request::from_parts(parts, body), Err(stop)),
        }
    }
    let judged = authorize(ctx, inbound, &parts, verified);
    (Request::from_parts(parts, body), judged.map(|()| to_client))
}
