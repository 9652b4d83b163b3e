//! `networking.istio.io/v1` `VirtualService` and `DestinationRule` for mesh
//! traffic, validated into [`crate::state::traffic`] types. Unknown fields are
//! errors; fields Istio defines that this version does not implement yet are
//! errors too, named, so that a rule is never half applied.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use super::object::{Ctx, Secrets};
use crate::{
    state::traffic::{
        DestinationRule, Fault, HashKey, HeaderOps, HeaderPair, HeaderRules, HttpMatch, HttpRoute, LoadBalancer,
        Origination, OutlierDetection, Policy, Redirect, Retries, RetryOn, Rewrite, StrMatch, Subset, TcpRoute,
        TlsMatch, TlsOrigination, TlsRoute, VirtualService, WeightedDestination,
    },
    state::{CLUSTER_DOMAIN, Gateway, Service},
};

type Unsupported = Option<serde_yaml_ng::Value>;

mod destination_rule;
mod objects;
mod virtual_service;

pub(super) use destination_rule::build_destination_rule;
pub use objects::*;
pub(super) use virtual_service::build_virtual_service;

const NOT_YET: &str = "not supported by this version of mesh-agent";
use crate::state::traffic::MESH;

/// A `gateways` entry as `namespace/name` (a bare name is in `namespace`), or `mesh`.
fn gateway_ref(g: &str, namespace: &str) -> String {
    match g.split_once('/') {
        _ if g == MESH => MESH.to_owned(),
        Some((ns, name)) => format!("{ns}/{name}"),
        None => format!("{namespace}/{g}"),
    }
}

/// `exportTo` of an object in `namespace`: the namespaces whose clients (and
/// gateways) it applies to: `*` everywhere (`None`, also when absent), `.`
/// its own, `~` nowhere, or namespaces by name.
pub(super) fn export_to(ctx: &mut Ctx<'_>, list: Option<&[String]>, namespace: &Arc<str>) -> Option<Vec<Arc<str>>> {
    let list = list?;
    let mut to = Vec::new();
    for (i, e) in list.iter().enumerate() {
        match e.as_str() {
            "*" | "~" => {}
            "." => to.push(namespace.clone()),
            ns if !ns.is_empty() && ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') => {
                to.push(ns.into())
            }
            other => ctx.error(format!("spec.exportTo[{i}]"), format!("{other:?}: expected *, ., ~ or a namespace")),
        }
    }
    (!list.iter().any(|e| e == "*")).then_some(to)
}

fn reject(ctx: &mut Ctx<'_>, base: &str, fields: &[(&str, &Unsupported)]) {
    for (name, value) in fields {
        if value.is_some() {
            ctx.error(format!("{base}.{name}"), NOT_YET);
        }
    }
}

/// A duration in an Istio object: Go's syntax (`250ms`, `1.5s`, `1h30m`, as
/// Istio's YAML decoding accepts), within protobuf's range, whole milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = super::duration::parse_go(s)?;
    // Istio's limits: protobuf's largest Duration, at least 1ms, whole milliseconds.
    if d > Duration::from_millis(MAX_DURATION_MS) {
        return Err(format!("{s:?}: above the largest duration, {}s", MAX_DURATION_MS / 1000));
    }
    if d < Duration::from_millis(1) {
        return Err(format!("{s:?}: below 1ms, the shortest duration"));
    }
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!("{s:?}: only whole milliseconds are supported"));
    }
    Ok(d)
}

/// The largest duration protobuf (and so Istio) allows: 10 000 years.
const MAX_DURATION_MS: u64 = 315_576_000_000_000;

/// Resolves a host as Istio does for mesh Services: a short name (in the
/// object's namespace), `name.ns`, `name.ns.svc`, the FQDN, or a VIP.
pub fn resolve_host<'a>(
    host: &str,
    namespace: &str,
    services: &'a BTreeMap<String, Arc<Service>>,
) -> Option<&'a Arc<Service>> {
    // A ServiceEntry host, in the object's namespace first.
    if let Some(s) = services.get(&format!("{namespace}/{host}")).filter(|s| s.external.is_some()) {
        return Some(s);
    }
    if let Some(s) = services.values().find(|s| s.external.is_some() && *s.hostname == *host) {
        return Some(s);
    }
    let suffix = format!(".svc.{CLUSTER_DOMAIN}");
    let trimmed = host.strip_suffix(&suffix).or_else(|| host.strip_suffix(".svc")).unwrap_or(host);
    let key = match trimmed.split_once('.') {
        Some((name, ns)) if !ns.contains('.') => format!("{ns}/{name}"),
        Some(_) => return services.values().find(|s| s.vip.is_some_and(|v| v.to_string() == host)),
        None => format!("{namespace}/{trimmed}"),
    };
    services.get(&key)
}

fn string_match(ctx: &mut Ctx<'_>, field: &str, m: &StringMatchSpec) -> Option<StrMatch> {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(e), None, None) => Some(StrMatch::Exact(e.clone())),
        (None, Some(p), None) => Some(StrMatch::Prefix(p.clone())),
        (None, None, Some(r)) => match regex_lite::Regex::new(&format!("^(?:{r})$")) {
            Ok(re) => Some(StrMatch::Regex(re)),
            Err(e) => {
                ctx.error(format!("{field}.regex"), format!("{r:?}: {e}"));
                None
            }
        },
        _ => {
            ctx.error(field, "exactly one of exact, prefix or regex is required");
            None
        }
    }
}

fn duration_field(ctx: &mut Ctx<'_>, field: &str, s: &Option<String>) -> Option<Duration> {
    match parse_duration(s.as_deref()?) {
        Ok(d) => Some(d),
        Err(e) => {
            ctx.error(field, e);
            None
        }
    }
}

/// The namespace of the object being validated (`Kind namespace/name`).
fn ctx_namespace(ctx: &Ctx<'_>) -> String {
    ctx.object().split_once(' ').and_then(|(_, n)| n.split_once('/')).map_or("default", |(ns, _)| ns).to_owned()
}
