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

use hyper::header::HeaderName;

use super::{HttpRouteObject, MatchSpec, ReferenceGrantObject};
use crate::{
    config::{networking::parse_duration, object::Ctx},
    state::{
        Service,
        traffic::{HttpMatch, HttpRoute, MESH, StrMatch, VirtualService},
    },
};

/// A route admitted: where it attaches and its rules, one per match.
pub(in crate::config) struct Route {
    namespace: Arc<str>,
    name: Arc<str>,
    created: Option<String>,
    /// The Services it attaches to, and the port if the parentRef names one.
    parents: Vec<(Arc<Service>, Option<u16>)>,
    /// The Gateways (`namespace/name`) it attaches to: each listener's port
    /// with the hostnames the route and the listener share.
    gateways: Vec<GatewayParent>,
    rules: Vec<(Precedence, HttpRoute)>,
}

/// A Gateway (`namespace/name`) a route attaches to: each listener's port,
/// with the hostnames the route and the listener share.
pub(super) type GatewayParent = (String, Vec<(u16, Vec<String>)>);

mod filters;

pub(in crate::config::gateway_api) use filters::weighted_backends;
use filters::{filters, path_filters};

/// Gateway API Gateways' listeners, by `namespace/name`; another
/// controller's Gateway has none (routes to it are that controller's).
pub(in crate::config) type Listeners = BTreeMap<String, Vec<super::gateway::Listener>>;

/// The Gateway API's order among matches (smaller first).
type Precedence = (u8, Reverse<usize>, u8, Reverse<usize>, Reverse<usize>);

/// `HTTPRoute` validated field by field.
pub(in crate::config) fn build(
    ctx: &mut Ctx<'_>,
    obj: &HttpRouteObject,
    route_kind: &str,
    services: &BTreeMap<String, Arc<Service>>,
    listeners: &Listeners,
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
        super::hostname(ctx, &format!("spec.hostnames[{i}]"), h);
    }
    let mut parents = Vec::new();
    let mut gateways = Vec::new();
    for (i, p) in spec.parent_refs.iter().enumerate() {
        let field = format!("spec.parentRefs[{i}]");
        let group = p.group.as_deref().unwrap_or(super::GROUP);
        let kind = p.kind.as_deref().unwrap_or("Gateway");
        if (group, kind) == (super::GROUP, "Gateway") {
            if let Some(attached) = gateway_parent(ctx, &field, p, (&namespace, route_kind), &spec.hostnames, listeners)
            {
                gateways.push(attached);
            }
            continue;
        }
        // A Service named without its group (as Istio's samples write it:
        // the group then defaults to the Gateway API's) is a Service still.
        if kind != "Service" || !matches!(group, "" | "core" | super::GROUP) {
            ctx.error(
                format!("{field}.kind"),
                format!("{group:?} {kind:?}: expected a Gateway or a Service (group \"\")"),
            );
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
        gateways,
        rules,
    })
}

/// The listeners of a Gateway a route attaches to: those the parentRef
/// names (`sectionName`, `port`), that take routes from the route's
/// namespace, and whose hostname the route's hostnames meet; with the
/// hostnames they share (the more specific of each pair, as the API says).
pub(super) fn gateway_parent(
    ctx: &mut Ctx<'_>,
    field: &str,
    p: &super::ParentRef,
    (namespace, kind): (&str, &str),
    hostnames: &[String],
    listeners: &Listeners,
) -> Option<GatewayParent> {
    let key = format!("{}/{}", p.namespace.as_deref().unwrap_or(namespace), p.name);
    let Some(all) = listeners.get(&key) else {
        ctx.error(format!("{field}.name"), format!("Gateway {key} does not exist (or is not accepted)"));
        return None;
    };
    // Another controller's Gateway: not ours to attach to, nor to judge.
    if all.is_empty() {
        return None;
    }
    let mut attached = Vec::new();
    for l in all {
        let named =
            p.section_name.as_deref().is_none_or(|s| s == l.name) && p.port.is_none_or(|n| n == i64::from(l.port));
        let allowed = l.namespaces.as_ref().is_none_or(|list| list.iter().any(|ns| &**ns == namespace))
            && l.kinds.iter().any(|k| k == kind);
        let shared = shared_hostnames(l.hostname.as_deref(), hostnames);
        if named && allowed && !shared.is_empty() {
            attached.push((l.port, shared));
        }
    }
    if attached.is_empty() {
        ctx.error(
            field.to_owned(),
            format!("no listener of Gateway {key} takes this route (its sectionName/port, allowedRoutes from namespace {namespace} and of kind {kind}, hostnames)"),
        );
        return None;
    }
    Some((key, attached))
}

/// The hostnames a listener (`None`: any) and a route (empty: any) share.
pub(super) fn shared_hostnames(listener: Option<&str>, route: &[String]) -> Vec<String> {
    let covers = |pattern: &str, host: &str| match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    };
    match (listener, route) {
        (None, []) => vec!["*".to_owned()],
        (None, r) => r.to_vec(),
        (Some(l), []) => vec![l.to_owned()],
        (Some(l), r) => r
            .iter()
            .filter_map(|h| {
                if covers(l, h) || l == h {
                    Some(h.clone())
                } else if covers(h, l) {
                    Some(l.to_owned())
                } else {
                    None
                }
            })
            .collect(),
    }
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
    let routes =
        weighted_backends(ctx, &format!("{base}.backendRefs"), &rule.backend_refs, namespace, services, grants);
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

/// A route attached to a parent, and the port of the parent it is for.
type Attached<'a> = (&'a Route, Option<u16>);

/// The VirtualServices the admitted routes make: for Service parents, one
/// mesh VirtualService per namespace of routes and Service; for Gateway
/// parents, one bound to the Gateway per namespace of routes and set of
/// shared hostnames; each with its rules in the API's precedence.
pub(in crate::config) fn virtual_services(routes: &[Route]) -> Vec<VirtualService> {
    // (route namespace, parent, hostnames) → its routes and ports.
    let mut by_parent: BTreeMap<(Arc<str>, String, Vec<String>), Vec<Attached<'_>>> = BTreeMap::new();
    let mut services: BTreeMap<String, Arc<Service>> = BTreeMap::new();
    for r in routes {
        for (svc, port) in &r.parents {
            services.insert(svc.key.clone(), svc.clone());
            by_parent.entry((r.namespace.clone(), svc.key.clone(), Vec::new())).or_default().push((r, *port));
        }
        for (gateway, listeners) in &r.gateways {
            for (port, hosts) in listeners {
                let key = (r.namespace.clone(), format!("gateway:{gateway}"), hosts.clone());
                by_parent.entry(key).or_default().push((r, Some(*port)));
            }
        }
    }
    let mut out = Vec::new();
    for ((namespace, parent, hosts), mut attached) in by_parent {
        use crate::config::object::by_age;
        attached.sort_by(|(a, _), (b, _)| {
            by_age(&a.created, &a.namespace, &a.name).cmp(&by_age(&b.created, &b.namespace, &b.name))
        });
        let Some((first, _)) = attached.first() else { continue };
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
        let mut names: Vec<&str> = attached.iter().map(|(r, _)| &*r.name).collect();
        names.dedup();
        let http = rules.into_iter().map(|(_, _, _, r)| Arc::new(r)).collect();
        let (hosts, host_patterns, gateways, export_to) = match parent.strip_prefix("gateway:") {
            Some(gateway) => (Vec::new(), hosts, vec![gateway.to_owned()], None),
            None => {
                let Some(svc) = services.get(&parent) else { continue };
                let export_to = (*namespace != *svc.namespace).then(|| vec![namespace.clone()]);
                (vec![parent.clone()], vec![svc.hostname.to_string()], vec![MESH.to_owned()], export_to)
            }
        };
        out.push(VirtualService {
            name: format!("HTTPRoute {}", names.join("+")).into(),
            namespace,
            hosts,
            host_patterns,
            gateways,
            export_to,
            created: first.created.clone(),
            http,
            tcp: Vec::new(),
            tls: Vec::new(),
        });
    }
    out
}
