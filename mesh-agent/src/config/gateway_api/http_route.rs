//! An `HTTPRoute` attached to Services (GAMMA) into the routing model: each
//! match of each rule becomes a rule of a mesh VirtualService for the
//! Service, and the rules of every route attached to one Service from one
//! namespace are ordered as the Gateway API orders them: an exact path, then
//! a regular expression, then the longest prefix; then a method; then the
//! most header matches; then the most query parameter matches; then the
//! oldest route, then by namespace and name; then rule and match order
//! (gateway-api.sigs.k8s.io/reference/spec, `HTTPRouteRule`). A route in the
//! Service's namespace (a producer route) applies to every client; one in
//! another namespace (a consumer route) to that namespace's clients alone,
//! before the producer's (as Istio's lookup order gives).
use std::{cmp::Reverse, collections::BTreeMap, sync::Arc};

use hyper::header::{HeaderName, HeaderValue};

use super::{BackendRef, FilterSpec, HeaderModifier, HttpRouteObject, MatchSpec, PathModifier, ReferenceGrantObject};
use crate::{
    config::{networking::parse_duration, object::Ctx},
    state::{
        Service,
        traffic::{
            HeaderOps, HeaderPair, HeaderRules, HttpMatch, HttpRoute, MESH, Redirect, RedirectTarget, Rewrite,
            StrMatch, VirtualService, WeightedDestination,
        },
    },
};

/// A route admitted: where it attaches and its rules, one per match.
pub(in crate::config) struct Route {
    namespace: Arc<str>,
    name: Arc<str>,
    created: Option<String>,
    /// The Services (`namespace/name`) it attaches to, and the port if the
    /// parentRef names one.
    parents: Vec<(Arc<Service>, Option<u16>)>,
    rules: Vec<(Precedence, HttpRoute)>,
}

/// The Gateway API's order among matches (smaller first).
type Precedence = (u8, Reverse<usize>, u8, Reverse<usize>, Reverse<usize>);

/// `HTTPRoute` validated field by field.
pub(in crate::config) fn build(
    ctx: &mut Ctx<'_>,
    obj: &HttpRouteObject,
    services: &BTreeMap<String, Arc<Service>>,
    grants: &[ReferenceGrantObject],
) -> Option<Route> {
    let (name, namespace) = crate::config::object::name_and_namespace(ctx, &obj.metadata)?;
    let before = ctx.error_count();
    let spec = &obj.spec;
    if spec.parent_refs.is_empty() {
        ctx.error("spec.parentRefs", "at least one parentRef is required");
    }
    // Checked, then unused: a Service parent's routes apply to the traffic
    // addressed to it, whatever host it names (as GAMMA says).
    for (i, h) in spec.hostnames.iter().enumerate() {
        let name = h.strip_prefix("*.").unwrap_or(h);
        let label_ok =
            |l: &str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if name.parse::<std::net::IpAddr>().is_ok() || !name.split('.').all(label_ok) {
            ctx.error(
                format!("spec.hostnames[{i}]"),
                format!("{h:?} is not a hostname (lower case, `*.` prefix allowed)"),
            );
        }
    }
    let mut parents = Vec::new();
    for (i, p) in spec.parent_refs.iter().enumerate() {
        let field = format!("spec.parentRefs[{i}]");
        let group = p.group.as_deref().unwrap_or(super::GROUP);
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        if (group, kind) != ("", "Service") && (group, kind) != ("core", "Service") {
            let message = match kind {
                "Gateway" => "a Gateway API Gateway: not supported by this version of mesh-agent (HTTPRoutes attach to Services here)".to_owned(),
                _ => format!("{group:?} {kind:?}: expected a Service (group \"\", kind Service)"),
            };
            ctx.error(format!("{field}.kind"), message);
            continue;
        }
        if p.section_name.is_some() {
            ctx.error(format!("{field}.sectionName"), "not supported for a Service parent: name the port with `port`");
        }
        let ns = p.namespace.as_deref().unwrap_or(&namespace);
        let Some(svc) = services.get(&format!("{ns}/{}", p.name)).filter(|s| s.external.is_none()) else {
            ctx.error(format!("{field}.name"), format!("Service {ns}/{} does not exist", p.name));
            continue;
        };
        let port = match p.port {
            None => None,
            Some(n) => match u16::try_from(n).ok().filter(|n| svc.ports.iter().any(|sp| sp.port == *n)) {
                Some(n) => Some(n),
                None => {
                    ctx.error(format!("{field}.port"), format!("{n}: not a port of Service {}", svc.key));
                    continue;
                }
            },
        };
        parents.push((svc.clone(), port));
    }
    let mut rules = Vec::new();
    for (ri, rule) in spec.rules.iter().enumerate() {
        let base = format!("spec.rules[{ri}]");
        rules.extend(build_rule(ctx, &base, rule, &namespace, services, grants));
    }
    (ctx.error_count() == before).then(|| Route {
        namespace,
        name,
        created: obj.metadata.creation_timestamp.clone(),
        parents,
        rules,
    })
}

/// What a rule's filters make of every one of its matches.
#[derive(Default)]
struct Filters {
    headers: HeaderRules,
    redirect: Option<(super::RedirectSpec, Option<u16>)>,
    rewrite: Option<super::RewriteSpec>,
    mirror: Option<(WeightedDestination, f64)>,
}

fn build_rule(
    ctx: &mut Ctx<'_>,
    base: &str,
    rule: &super::RuleSpec,
    namespace: &str,
    services: &BTreeMap<String, Arc<Service>>,
    grants: &[ReferenceGrantObject],
) -> Vec<(Precedence, HttpRoute)> {
    for (field, set) in [("retry", rule.retry.is_some()), ("sessionPersistence", rule.session_persistence.is_some())] {
        if set {
            ctx.error(format!("{base}.{field}"), "not supported by this version of mesh-agent");
        }
    }
    let timeout = rule.timeouts.as_ref().and_then(|t| {
        if t.backend_request.is_some() {
            ctx.error(format!("{base}.timeouts.backendRequest"), "not supported by this version of mesh-agent");
        }
        let d = parse_duration(t.request.as_deref()?).map_err(|e| ctx.error(format!("{base}.timeouts.request"), e));
        d.ok().filter(|d| !d.is_zero())
    });
    let filters = filters(ctx, base, &rule.filters, namespace, services, grants);
    let mut routes = Vec::new();
    for (bi, b) in rule.backend_refs.iter().enumerate() {
        let field = format!("{base}.backendRefs[{bi}]");
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
        if let Some(d) = backend(ctx, &field, b, namespace, services, grants) {
            routes.push(WeightedDestination { weight, ..d });
        }
    }
    if filters.redirect.is_some() && !rule.backend_refs.is_empty() {
        ctx.error(format!("{base}.backendRefs"), "a rule with a RequestRedirect filter has no backendRefs");
    }
    if filters.redirect.is_none() && routes.iter().all(|r| r.weight == 0) {
        // The API answers such requests 500; refused here, as a rule that
        // could only fail.
        ctx.error(format!("{base}.backendRefs"), "a rule needs a backendRef of weight above 0, or a RequestRedirect");
    }
    let matches: Vec<MatchSpec> = match rule.matches.is_empty() {
        true => vec![MatchSpec::default()],
        false => rule.matches.clone(),
    };
    let mut out = Vec::new();
    for (mi, m) in matches.iter().enumerate() {
        let field = format!("{base}.matches[{mi}]");
        let Some(variants) = match_variants(ctx, &field, m) else { continue };
        let precedence = precedence(m);
        for (m, prefix) in variants {
            let Some((redirect, rewrite)) = path_filters(ctx, base, &filters, prefix.as_deref()) else { continue };
            let route = HttpRoute {
                name: rule.name.clone(),
                matches: vec![m],
                routes: routes.clone(),
                timeout,
                retries: None,
                fault: None,
                headers: filters.headers.clone(),
                rewrite,
                redirect,
                mirror: filters.mirror.clone(),
            };
            out.push((precedence, route));
        }
    }
    out
}

/// The internal matches for one match (a `PathPrefix` ends on a segment:
/// `/a` matches `/a` and `/a/…`, never `/ab`), each with the path prefix it
/// strips when the rule replaces one.
fn match_variants(ctx: &mut Ctx<'_>, field: &str, m: &MatchSpec) -> Option<Vec<(HttpMatch, Option<String>)>> {
    let before = ctx.error_count();
    let exact_or_regex = |ctx: &mut Ctx<'_>, f: String, kind: Option<&str>, value: &str| match kind.unwrap_or("Exact") {
        "Exact" => Some(StrMatch::Exact(value.to_owned())),
        "RegularExpression" => regex(ctx, f, value),
        other => {
            ctx.error(f, format!("{other:?}: expected Exact or RegularExpression"));
            None
        }
    };
    let mut headers = Vec::new();
    for (i, h) in m.headers.iter().enumerate() {
        let f = format!("{field}.headers[{i}]");
        if HeaderName::from_bytes(h.name.as_bytes()).is_err() {
            ctx.error(format!("{f}.name"), format!("{:?} is not a valid header name", h.name));
        }
        if let Some(v) = exact_or_regex(ctx, format!("{f}.type"), h.kind.as_deref(), &h.value) {
            headers.push((h.name.to_ascii_lowercase(), v));
        }
    }
    let mut query_params = Vec::new();
    for (i, q) in m.query_params.iter().enumerate() {
        if let Some(v) = exact_or_regex(ctx, format!("{field}.queryParams[{i}].type"), q.kind.as_deref(), &q.value) {
            query_params.push((q.name.clone(), v));
        }
    }
    let method = m.method.as_ref().map(|v| StrMatch::Exact(v.clone()));
    let matching = |uri| HttpMatch {
        uri: Some(uri),
        method: method.clone(),
        headers: headers.clone(),
        query_params: query_params.clone(),
        port: None,
        gateways: Vec::new(),
    };
    let path = m.path.clone().unwrap_or_default();
    let value = path.value.as_deref().unwrap_or("/");
    let variants = match path.kind.as_deref().unwrap_or("PathPrefix") {
        "RegularExpression" => regex(ctx, format!("{field}.path.value"), value).map(|r| vec![(matching(r), None)]),
        _ if !value.starts_with('/') => {
            ctx.error(format!("{field}.path.value"), format!("{value:?}: a path starts with /"));
            None
        }
        "Exact" => Some(vec![(matching(StrMatch::Exact(value.to_owned())), None)]),
        "PathPrefix" if value.trim_end_matches('/').is_empty() => {
            Some(vec![(matching(StrMatch::Prefix("/".into())), Some("/".into()))])
        }
        "PathPrefix" => {
            let v = value.trim_end_matches('/');
            Some(vec![
                (matching(StrMatch::Exact(v.to_owned())), Some(v.to_owned())),
                (matching(StrMatch::Prefix(format!("{v}/"))), Some(format!("{v}/"))),
            ])
        }
        other => {
            ctx.error(
                format!("{field}.path.type"),
                format!("{other:?}: expected Exact, PathPrefix or RegularExpression"),
            );
            None
        }
    };
    variants.filter(|_| ctx.error_count() == before)
}

fn regex(ctx: &mut Ctx<'_>, field: String, value: &str) -> Option<StrMatch> {
    match regex_lite::Regex::new(&format!("^(?:{value})$")) {
        Ok(r) => Some(StrMatch::Regex(r)),
        Err(e) => {
            ctx.error(field, format!("{value:?} is not a regular expression: {e}"));
            None
        }
    }
}

fn precedence(m: &MatchSpec) -> Precedence {
    let path = m.path.clone().unwrap_or_default();
    let (rank, len) = match path.kind.as_deref().unwrap_or("PathPrefix") {
        "Exact" => (0, 0),
        "RegularExpression" => (1, 0),
        _ => (2, path.value.as_deref().unwrap_or("/").trim_end_matches('/').len()),
    };
    let method = if m.method.is_some() { 0 } else { 1 };
    (rank, Reverse(len), method, Reverse(m.headers.len()), Reverse(m.query_params.len()))
}

/// The rule's filters, each type at most once (the API's rule).
fn filters(
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
fn path_filters(
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
    let pairs = |ctx: &mut Ctx<'_>, op: &str, list: &[super::NameValue]| {
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
    if ns != namespace && !super::granted(grants, "HTTPRoute", namespace, "Service", ns, &b.name) {
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

/// A route attached to a Service, and the parentRef's port.
type Attached<'a> = (&'a Route, Option<u16>);

/// The mesh VirtualServices the admitted routes make: one per namespace of
/// routes and Service they attach to, its rules in the API's precedence.
pub(in crate::config) fn mesh_virtual_services(routes: &[Route]) -> Vec<VirtualService> {
    // (route namespace, Service key) → its routes, oldest first.
    let mut by_parent: BTreeMap<(Arc<str>, String), Vec<Attached<'_>>> = BTreeMap::new();
    for r in routes {
        for (svc, port) in &r.parents {
            by_parent.entry((r.namespace.clone(), svc.key.clone())).or_default().push((r, *port));
        }
    }
    let mut out = Vec::new();
    for ((namespace, key), mut attached) in by_parent {
        use crate::config::object::by_age;
        attached.sort_by(|(a, _), (b, _)| {
            by_age(&a.created, &a.namespace, &a.name).cmp(&by_age(&b.created, &b.namespace, &b.name))
        });
        let Some((first, _)) = attached.first() else { continue };
        let svc = first.parents.iter().map(|(s, _)| s).find(|s| s.key == key).cloned();
        let Some(svc) = svc else { continue };
        let mut rules: Vec<(Precedence, usize, usize, HttpRoute)> = Vec::new();
        for (ri, (route, port)) in attached.iter().enumerate() {
            for (i, (p, rule)) in route.rules.iter().enumerate() {
                let mut rule = rule.clone();
                for m in &mut rule.matches {
                    m.port = *port;
                }
                rules.push((*p, ri, i, rule));
            }
        }
        rules.sort_by_key(|r| (r.0, r.1, r.2));
        let names: Vec<&str> = attached.iter().map(|(r, _)| &*r.name).collect();
        out.push(VirtualService {
            name: format!("HTTPRoute {}", names.join("+")).into(),
            export_to: (*namespace != *svc.namespace).then(|| vec![namespace.clone()]),
            namespace,
            hosts: vec![key],
            host_patterns: vec![svc.hostname.to_string()],
            gateways: vec![MESH.to_owned()],
            created: first.created.clone(),
            http: rules.into_iter().map(|(_, _, _, r)| Arc::new(r)).collect(),
            tcp: Vec::new(),
            tls: Vec::new(),
        });
    }
    out
}
