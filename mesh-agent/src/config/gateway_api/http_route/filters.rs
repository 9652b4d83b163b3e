//! A rule's filters (header modifiers, redirect, rewrite, mirror) and its
//! backends, validated into the routing model's parts.
use std::{collections::BTreeMap, sync::Arc};

use hyper::header::{HeaderName, HeaderValue};

use super::super::{BackendRef, FilterSpec, HeaderModifier, PathModifier, ReferenceGrantObject};
use crate::{
    config::object::Ctx,
    state::{
        Service,
        traffic::{HeaderOps, HeaderPair, HeaderRules, Redirect, RedirectTarget, Rewrite, WeightedDestination},
    },
};

/// What a rule's filters make of every one of its matches.
#[derive(Default)]
pub(super) struct Filters {
    pub headers: HeaderRules,
    pub redirect: Option<(super::super::RedirectSpec, Option<u16>)>,
    pub rewrite: Option<super::super::RewriteSpec>,
    pub mirror: Option<(WeightedDestination, f64)>,
}

/// The rule's filters, each type at most once (the API's rule).
pub(super) fn filters(
    ctx: &mut Ctx<'_>,
    base: &str,
    list: &[FilterSpec],
    namespace: &str,
    services: &BTreeMap<String, Arc<Service>>,
    grants: &[ReferenceGrantObject],
) -> Filters {
    let mut out = Filters::default();
    for (i, f) in list.iter().enumerate() {
        let field = format!("{base}.filters[{i}]");
        if list[..i].iter().any(|o| o.kind == f.kind) {
            ctx.error(format!("{field}.type"), format!("{}: once per rule", f.kind));
            continue;
        }
        let missing = |ctx: &mut Ctx<'_>, key: &str| {
            ctx.error(format!("{field}.{key}"), format!("required with type {}", f.kind))
        };
        match f.kind.as_str() {
            "RequestHeaderModifier" => match &f.request_header_modifier {
                Some(m) => out.headers.request = header_ops(ctx, &format!("{field}.requestHeaderModifier"), m),
                None => missing(ctx, "requestHeaderModifier"),
            },
            "ResponseHeaderModifier" => match &f.response_header_modifier {
                Some(m) => out.headers.response = header_ops(ctx, &format!("{field}.responseHeaderModifier"), m),
                None => missing(ctx, "responseHeaderModifier"),
            },
            "RequestRedirect" => match &f.request_redirect {
                Some(r) => {
                    let code = match r.status_code.unwrap_or(302) {
                        c @ (301 | 302 | 303 | 307 | 308) => c as u16,
                        c => {
                            ctx.error(
                                format!("{field}.requestRedirect.statusCode"),
                                format!("{c}: expected 301, 302, 303, 307 or 308"),
                            );
                            302
                        }
                    };
                    if let Some(s) = r.scheme.as_deref().filter(|s| !matches!(*s, "http" | "https")) {
                        ctx.error(format!("{field}.requestRedirect.scheme"), format!("{s:?}: expected http or https"));
                    }
                    if let Some(p) = r.port.filter(|p| u16::try_from(*p).is_err() || *p == 0) {
                        ctx.error(format!("{field}.requestRedirect.port"), format!("{p} is not a port number 1-65535"));
                    }
                    out.redirect = Some((r.clone(), Some(code)));
                }
                None => missing(ctx, "requestRedirect"),
            },
            "URLRewrite" => match &f.url_rewrite {
                Some(r) => out.rewrite = Some(r.clone()),
                None => missing(ctx, "urlRewrite"),
            },
            "RequestMirror" => match &f.request_mirror {
                Some(m) => {
                    let f = format!("{field}.requestMirror");
                    let pct = match (m.percent, &m.fraction) {
                        (Some(p), None) if (0..=100).contains(&p) => p as f64,
                        (None, Some(fr)) if fr.numerator >= 0 && fr.denominator.unwrap_or(100) > 0 => {
                            (fr.numerator as f64 * 100.0 / fr.denominator.unwrap_or(100) as f64).min(100.0)
                        }
                        (None, None) => 100.0,
                        _ => {
                            ctx.error(format!("{f}.percent"), "one of percent (0-100) and fraction");
                            0.0
                        }
                    };
                    if let Some(d) =
                        backend(ctx, &format!("{f}.backendRef"), &m.backend_ref, namespace, services, grants)
                    {
                        out.mirror = Some((WeightedDestination { weight: 100, ..d }, pct));
                    }
                }
                None => missing(ctx, "requestMirror"),
            },
            other => {
                ctx.error(format!("{field}.type"), format!("{other:?}: not supported by this version of mesh-agent"))
            }
        }
    }
    if out.redirect.is_some() && out.rewrite.is_some() {
        ctx.error(base.to_owned() + ".filters", "RequestRedirect and URLRewrite cannot both be set");
    }
    out
}

/// The redirect and rewrite for one match variant (`prefix`: what a
/// `PathPrefix` match strips; `None` for other matches).
pub(super) fn path_filters(
    ctx: &mut Ctx<'_>,
    base: &str,
    f: &Filters,
    prefix: Option<&str>,
) -> Option<(Option<Redirect>, Option<Rewrite>)> {
    let path = |ctx: &mut Ctx<'_>, field: &str, p: &Option<PathModifier>| -> Option<Option<(String, bool)>> {
        let Some(p) = p else { return Some(None) };
        match (p.kind.as_str(), &p.replace_full_path, &p.replace_prefix_match, prefix) {
            ("ReplaceFullPath", Some(full), None, _) => Some(Some((full.clone(), false))),
            ("ReplacePrefixMatch", None, Some(with), Some(stripped)) => {
                // `/a` → `/b`: `/a/x` becomes `/b/x`, and `/` → `/x`.
                let with = match (stripped.ends_with('/'), with.ends_with('/')) {
                    (true, false) => format!("{with}/"),
                    _ => with.clone(),
                };
                Some(Some((with, true)))
            }
            ("ReplacePrefixMatch", None, Some(_), None) => {
                ctx.error(format!("{base}.filters.{field}.path"), "ReplacePrefixMatch needs PathPrefix matches");
                None
            }
            (kind, _, _, _) => {
                ctx.error(
                    format!("{base}.filters.{field}.path"),
                    format!(
                        "{kind:?}: ReplaceFullPath with replaceFullPath, or ReplacePrefixMatch with replacePrefixMatch"
                    ),
                );
                None
            }
        }
    };
    let redirect = match &f.redirect {
        None => None,
        Some((r, code)) => {
            let p = path(ctx, "requestRedirect", &r.path)?;
            let (uri, replace_prefix) = p.map_or((None, false), |(u, pre)| (Some(u), pre));
            let target = RedirectTarget { scheme: r.scheme.clone(), port: r.port.map(|p| p as u16), replace_prefix };
            Some(Redirect { uri, authority: r.hostname.clone(), code: code.unwrap_or(302), gateway_api: Some(target) })
        }
    };
    let rewrite = match &f.rewrite {
        None => None,
        Some(w) => {
            let p = path(ctx, "urlRewrite", &w.path)?;
            let (uri, full_path) = p.map_or((None, false), |(u, pre)| (Some(u), !pre));
            Some(Rewrite { uri, authority: w.hostname.clone(), full_path })
        }
    };
    Some((redirect, rewrite))
}

fn header_ops(ctx: &mut Ctx<'_>, base: &str, m: &HeaderModifier) -> HeaderOps {
    let name = |ctx: &mut Ctx<'_>, field: String, k: &str| match HeaderName::from_bytes(k.as_bytes()) {
        Ok(n) => Some(n),
        Err(_) => {
            ctx.error(field, format!("{k:?} is not a valid header name"));
            None
        }
    };
    let pairs = |ctx: &mut Ctx<'_>, op: &str, list: &[super::super::NameValue]| {
        let mut out = Vec::new();
        for (i, nv) in list.iter().enumerate() {
            let field = format!("{base}.{op}[{i}]");
            let value = HeaderValue::from_str(&nv.value);
            if value.is_err() {
                ctx.error(format!("{field}.value"), format!("{:?} is not a valid header value", nv.value));
            }
            if let (Some(n), Ok(v)) = (name(ctx, format!("{field}.name"), &nv.name), value) {
                out.push(HeaderPair(n, v));
            }
        }
        out
    };
    let set = pairs(ctx, "set", &m.set);
    let add = pairs(ctx, "add", &m.add);
    let remove = m.remove.iter().enumerate().filter_map(|(i, k)| name(ctx, format!("{base}.remove[{i}]"), k)).collect();
    HeaderOps { set, add, remove }
}

/// A rule's `backendRefs` (under `base`): each a [`backend`] with its
/// weight (default 1, 0 gets nothing); per-backend filters are refused.
pub(in crate::config::gateway_api) fn weighted_backends(
    ctx: &mut Ctx<'_>,
    base: &str,
    refs: &[BackendRef],
    namespace: &str,
    services: &BTreeMap<String, Arc<Service>>,
    grants: &[ReferenceGrantObject],
) -> Vec<WeightedDestination> {
    let mut routes = Vec::new();
    for (bi, b) in refs.iter().enumerate() {
        let field = format!("{base}[{bi}]");
        if !b.filters.is_empty() {
            ctx.error(format!("{field}.filters"), "not supported by this version of mesh-agent");
        }
        let weight = match b.weight.unwrap_or(1) {
            w @ 0..=1_000_000 => w as u32,
            w => {
                ctx.error(format!("{field}.weight"), format!("{w}: expected 0 to 1000000"));
                continue;
            }
        };
        routes
            .extend(backend(ctx, &field, b, namespace, services, grants).map(|d| WeightedDestination { weight, ..d }));
    }
    routes
}

/// A backend: a Service (of the route's namespace, or another's that grants
/// it by a ReferenceGrant) and one of its ports.
fn backend(
    ctx: &mut Ctx<'_>,
    field: &str,
    b: &BackendRef,
    namespace: &str,
    services: &BTreeMap<String, Arc<Service>>,
    grants: &[ReferenceGrantObject],
) -> Option<WeightedDestination> {
    let (group, kind) = (b.group.as_deref().unwrap_or(""), b.kind.as_deref().unwrap_or("Service"));
    if !matches!(group, "" | "core") || kind != "Service" {
        ctx.error(format!("{field}.kind"), format!("{group:?} {kind:?}: expected a Service (group \"\")"));
        return None;
    }
    let ns = b.namespace.as_deref().unwrap_or(namespace);
    if ns != namespace && !super::super::granted(grants, "HTTPRoute", namespace, "Service", ns, &b.name) {
        ctx.error(
            format!("{field}.namespace"),
            format!("Service {ns}/{}: another namespace's, and no ReferenceGrant in {ns} lets HTTPRoutes of {namespace} refer to it", b.name),
        );
        return None;
    }
    let Some(svc) = services.get(&format!("{ns}/{}", b.name)).filter(|s| s.external.is_none()) else {
        ctx.error(format!("{field}.name"), format!("Service {ns}/{} does not exist", b.name));
        return None;
    };
    let port = match b.port.map(|p| u16::try_from(p).ok().filter(|p| svc.ports.iter().any(|sp| sp.port == *p))) {
        Some(Some(p)) => p,
        Some(None) => {
            ctx.error(format!("{field}.port"), format!("not a port of Service {}", svc.key));
            return None;
        }
        None => {
            ctx.error(format!("{field}.port"), "required for a Service");
            return None;
        }
    };
    Some(WeightedDestination { service: svc.key.clone(), subset: None, port: Some(port), weight: 1 })
}
