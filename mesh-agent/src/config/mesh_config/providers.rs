//! MeshConfig `extensionProviders[]` that are external authorizers
//! (`envoyExtAuthzHttp`, `envoyExtAuthzGrpc`), checked field by field. Other
//! kinds of providers (tracing, access logs) are Istio's Telemetry API's
//! and skipped.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde::Deserialize;

use super::Ctx;
use crate::state::security::{BodyInCheck, ExtAuthz, ExtAuthzKind, HttpAuthz, Pattern};

/// Istio's default: how long to wait for the authorizer.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProviderSpec {
    #[serde(default)]
    name: String,
    envoy_ext_authz_http: Option<HttpSpec>,
    envoy_ext_authz_grpc: Option<GrpcSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpSpec {
    #[serde(default)]
    service: String,
    port: Option<u32>,
    timeout: Option<String>,
    #[serde(default)]
    path_prefix: String,
    #[serde(default)]
    fail_open: bool,
    #[serde(default)]
    clear_route_cache: bool,
    status_on_error: Option<String>,
    #[serde(default)]
    include_request_headers_in_check: Vec<String>,
    #[serde(default)]
    include_headers_in_check: Vec<String>,
    #[serde(default)]
    include_additional_headers_in_check: BTreeMap<String, String>,
    include_request_body_in_check: Option<BodySpec>,
    #[serde(default)]
    headers_to_upstream_on_allow: Vec<String>,
    #[serde(default)]
    headers_to_downstream_on_deny: Vec<String>,
    #[serde(default)]
    headers_to_downstream_on_allow: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GrpcSpec {
    #[serde(default)]
    service: String,
    port: Option<u32>,
    timeout: Option<String>,
    #[serde(default)]
    fail_open: bool,
    #[serde(default)]
    clear_route_cache: bool,
    status_on_error: Option<String>,
    include_request_body_in_check: Option<BodySpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BodySpec {
    max_request_bytes: Option<u32>,
    #[serde(default)]
    allow_partial_message: bool,
    #[serde(default)]
    pack_as_bytes: bool,
}

/// The external authorizers, by name; each bad one reported and left out.
pub(super) fn ext_authz(ctx: &mut Ctx<'_>, providers: &[serde_yaml_ng::Value]) -> BTreeMap<String, Arc<ExtAuthz>> {
    let mut out = BTreeMap::new();
    for (i, value) in providers.iter().enumerate() {
        let field = format!("data.mesh.extensionProviders[{i}]");
        let spec = match serde_path_to_error::deserialize::<_, ProviderSpec>(value.clone()) {
            Ok(s) => s,
            Err(e) => {
                ctx.error(format!("{field}.{}", e.path()), e.into_inner().to_string());
                continue;
            }
        };
        if spec.name.is_empty() {
            ctx.error(format!("{field}.name"), "required");
            continue;
        }
        if out.contains_key(&spec.name) {
            ctx.error(format!("{field}.name"), format!("{:?}: a provider of this name comes earlier", spec.name));
            continue;
        }
        let built = match (spec.envoy_ext_authz_http, spec.envoy_ext_authz_grpc) {
            (Some(h), None) => http(ctx, &format!("{field}.envoyExtAuthzHttp"), &spec.name, h),
            (None, Some(g)) => grpc(ctx, &format!("{field}.envoyExtAuthzGrpc"), &spec.name, g),
            (Some(_), Some(_)) => {
                ctx.error(&field, "one of envoyExtAuthzHttp and envoyExtAuthzGrpc, not both");
                None
            }
            // A tracing or logging provider: not the agent's.
            (None, None) => None,
        };
        if let Some(p) = built {
            out.insert(spec.name, Arc::new(p));
        }
    }
    out
}

/// What both kinds share, checked.
struct Common {
    service: String,
    port: u16,
    timeout: Duration,
    status_on_error: u16,
    body: Option<BodyInCheck>,
}

#[expect(clippy::too_many_arguments, reason = "the fields both provider kinds share")]
fn common(
    ctx: &mut Ctx<'_>,
    field: &str,
    service: &str,
    port: Option<u32>,
    timeout: &Option<String>,
    status_on_error: &Option<String>,
    body: &Option<BodySpec>,
    clear_route_cache: bool,
) -> Option<Common> {
    let before = ctx.error_count();
    if service.is_empty() {
        ctx.error(format!("{field}.service"), "required: the authorizer's host, e.g. ext-authz.foo.svc.cluster.local");
    }
    let port = match port.map(u16::try_from) {
        Some(Ok(p)) if p != 0 => p,
        None => {
            ctx.error(format!("{field}.port"), "required");
            0
        }
        Some(_) => {
            ctx.error(format!("{field}.port"), "out of range 1-65535");
            0
        }
    };
    let timeout = match timeout {
        None => DEFAULT_TIMEOUT,
        Some(t) => crate::config::networking::parse_duration(t).unwrap_or_else(|e| {
            ctx.error(format!("{field}.timeout"), e);
            DEFAULT_TIMEOUT
        }),
    };
    let status_on_error = match status_on_error.as_deref() {
        None | Some("") => 403,
        Some(s) => match s.parse::<u16>() {
            Ok(code) if (200..600).contains(&code) => code,
            _ => {
                ctx.error(format!("{field}.statusOnError"), format!("{s:?} is not an HTTP status code"));
                403
            }
        },
    };
    if clear_route_cache {
        ctx.error(format!("{field}.clearRouteCache"), "not supported: routing happens at the source, before the check");
    }
    let body = body.as_ref().map(|b| BodyInCheck {
        max_bytes: b.max_request_bytes.unwrap_or(4096),
        allow_partial: b.allow_partial_message,
        pack_as_bytes: b.pack_as_bytes,
    });
    (ctx.error_count() == before).then(|| Common { service: service.to_owned(), port, timeout, status_on_error, body })
}

fn header_patterns(ctx: &mut Ctx<'_>, field: &str, names: &[String]) -> Vec<Pattern> {
    let mut out = Vec::with_capacity(names.len());
    for (i, n) in names.iter().enumerate() {
        let bare = n.trim_start_matches('*').trim_end_matches('*');
        if bare.is_empty() || hyper::header::HeaderName::from_bytes(bare.as_bytes()).is_err() {
            ctx.error(format!("{field}[{i}]"), format!("{n:?} is not a header name (or `prefix*`, `*suffix`)"));
        } else {
            out.push(Pattern::parse(&n.to_ascii_lowercase()));
        }
    }
    out
}

fn http(ctx: &mut Ctx<'_>, field: &str, name: &str, h: HttpSpec) -> Option<ExtAuthz> {
    let before = ctx.error_count();
    let c = common(
        ctx,
        field,
        &h.service,
        h.port,
        &h.timeout,
        &h.status_on_error,
        &h.include_request_body_in_check,
        h.clear_route_cache,
    );
    if !h.path_prefix.is_empty() && !h.path_prefix.starts_with('/') {
        ctx.error(format!("{field}.pathPrefix"), format!("{:?} must start with '/'", h.path_prefix));
    }
    let mut include = h.include_request_headers_in_check;
    include.extend(h.include_headers_in_check);
    let include_request_headers = header_patterns(ctx, &format!("{field}.includeRequestHeadersInCheck"), &include);
    let mut additional = Vec::new();
    for (k, v) in h.include_additional_headers_in_check {
        let ok_name = hyper::header::HeaderName::from_bytes(k.as_bytes()).is_ok();
        if !ok_name || hyper::header::HeaderValue::from_str(&v).is_err() {
            ctx.error(format!("{field}.includeAdditionalHeadersInCheck[{k}]"), "not a valid header");
        } else {
            additional.push((k.to_ascii_lowercase(), v));
        }
    }
    let http = HttpAuthz {
        path_prefix: h.path_prefix.clone(),
        include_request_headers,
        include_additional_headers: additional,
        headers_to_upstream_on_allow: header_patterns(
            ctx,
            &format!("{field}.headersToUpstreamOnAllow"),
            &h.headers_to_upstream_on_allow,
        ),
        headers_to_downstream_on_allow: header_patterns(
            ctx,
            &format!("{field}.headersToDownstreamOnAllow"),
            &h.headers_to_downstream_on_allow,
        ),
        headers_to_downstream_on_deny: header_patterns(
            ctx,
            &format!("{field}.headersToDownstreamOnDeny"),
            &h.headers_to_downstream_on_deny,
        ),
    };
    let c = c.filter(|_| ctx.error_count() == before)?;
    Some(ExtAuthz {
        name: name.to_owned(),
        kind: ExtAuthzKind::Http(http),
        service: c.service,
        port: c.port,
        timeout: c.timeout,
        fail_open: h.fail_open,
        status_on_error: c.status_on_error,
        body: c.body,
    })
}

fn grpc(ctx: &mut Ctx<'_>, field: &str, name: &str, g: GrpcSpec) -> Option<ExtAuthz> {
    let c = common(
        ctx,
        field,
        &g.service,
        g.port,
        &g.timeout,
        &g.status_on_error,
        &g.include_request_body_in_check,
        g.clear_route_cache,
    )?;
    Some(ExtAuthz {
        name: name.to_owned(),
        kind: ExtAuthzKind::Grpc,
        service: c.service,
        port: c.port,
        timeout: c.timeout,
        fail_open: g.fail_open,
        status_on_error: c.status_on_error,
        body: c.body,
    })
}
