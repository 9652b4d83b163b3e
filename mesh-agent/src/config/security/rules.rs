//! An AuthorizationPolicy's `rules[]`: sources, operations and `when`
//! conditions, each field checked as Istio checks it.
use super::{Ctx, FromSpec, RuleSpec, ToSpec, cidrs, ports};
use crate::state::security::{Condition, ConditionKey, Operation, Pattern, Rule, Source, Value};

pub(super) fn build_rule(ctx: &mut Ctx<'_>, base: &str, r: &RuleSpec) -> Rule {
    let from = r.from.iter().enumerate().map(|(i, f)| source(ctx, &format!("{base}.from[{i}].source"), f));
    let from = from.collect();
    let to = r.to.iter().enumerate().map(|(i, t)| operation(ctx, &format!("{base}.to[{i}].operation"), t));
    let to = to.collect();
    let when = r.when.iter().enumerate().filter_map(|(i, c)| {
        let field = format!("{base}.when[{i}]");
        let key = ConditionKey::parse(&c.key).map_err(|e| ctx.error(format!("{field}.key"), e)).ok()?;
        if c.values.is_empty() && c.not_values.is_empty() {
            ctx.error(&field, "needs values or notValues");
            return None;
        }
        let values = values_of(ctx, &format!("{field}.values"), &key, &c.values);
        let not_values = values_of(ctx, &format!("{field}.notValues"), &key, &c.not_values);
        Some(Condition { key, values, not_values })
    });
    Rule { from, to, when: when.collect() }
}

fn values_of(ctx: &mut Ctx<'_>, field: &str, key: &ConditionKey, v: &[String]) -> Vec<Value> {
    let mut out = Vec::with_capacity(v.len());
    for (i, s) in v.iter().enumerate() {
        let parsed = match key {
            ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp => {
                crate::state::security::Cidr::parse(s).map(Value::Cidr)
            }
            ConditionKey::DestinationPort => match s.parse::<u16>() {
                Ok(p) if p != 0 => Ok(Value::Port(p)),
                _ => Err(format!("{s:?} is not a port number 1-65535")),
            },
            _ if s.is_empty() => Err("empty value".into()),
            _ => Ok(Value::Pattern(Pattern::parse(s))),
        };
        match parsed {
            Ok(v) => out.push(v),
            Err(e) => ctx.error(format!("{field}[{i}]"), e),
        }
    }
    out
}

fn source(ctx: &mut Ctx<'_>, field: &str, f: &FromSpec) -> Source {
    let s = &f.source;
    if s.service_accounts.is_some() || s.not_service_accounts.is_some() {
        ctx.error(format!("{field}.serviceAccounts"), "not supported; use principals");
    }
    let empty = [
        &s.principals,
        &s.not_principals,
        &s.namespaces,
        &s.not_namespaces,
        &s.ip_blocks,
        &s.not_ip_blocks,
        &s.request_principals,
        &s.not_request_principals,
        &s.remote_ip_blocks,
        &s.not_remote_ip_blocks,
    ]
    .iter()
    .all(|v| v.is_empty());
    if empty {
        ctx.error(field, "must not be empty: omit `from` to match every source");
    }
    let mut cidr = |name: &str, v: &[String]| cidrs(ctx, &format!("{field}.{name}"), v).unwrap_or_default();
    let ip_blocks = cidr("ipBlocks", &s.ip_blocks);
    let not_ip_blocks = cidr("notIpBlocks", &s.not_ip_blocks);
    let remote_ip_blocks = cidr("remoteIpBlocks", &s.remote_ip_blocks);
    let not_remote_ip_blocks = cidr("notRemoteIpBlocks", &s.not_remote_ip_blocks);
    let mut strings = |name: &str, v: &[String]| patterns(ctx, &format!("{field}.{name}"), v, false);
    Source {
        principals: strings("principals", &s.principals),
        not_principals: strings("notPrincipals", &s.not_principals),
        namespaces: strings("namespaces", &s.namespaces),
        not_namespaces: strings("notNamespaces", &s.not_namespaces),
        ip_blocks,
        not_ip_blocks,
        request_principals: strings("requestPrincipals", &s.request_principals),
        not_request_principals: strings("notRequestPrincipals", &s.not_request_principals),
        remote_ip_blocks,
        not_remote_ip_blocks,
    }
}

fn operation(ctx: &mut Ctx<'_>, field: &str, t: &ToSpec) -> Operation {
    let o = &t.operation;
    let empty = o.ports.is_empty()
        && o.not_ports.is_empty()
        && [&o.hosts, &o.not_hosts, &o.methods, &o.not_methods, &o.paths, &o.not_paths].iter().all(|v| v.is_empty());
    if empty {
        ctx.error(field, "must not be empty: omit `to` to match every operation");
    }
    for (name, list) in [("methods", &o.methods), ("notMethods", &o.not_methods)] {
        for (i, m) in list.iter().enumerate() {
            if !m.is_empty() && m != "*" && !m.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_') {
                ctx.error(
                    format!("{field}.{name}[{i}]"),
                    format!("{m:?}: methods are matched case-sensitively, e.g. \"GET\""),
                );
            }
        }
    }
    for (name, list) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
        for (i, p) in list.iter().enumerate() {
            if p.contains('{') {
                ctx.error(format!("{field}.{name}[{i}]"), format!("{p:?}: path templates ({{*}}, {{**}}) are not supported; use a prefix (`/api/*`) or a suffix (`*.json`)"));
            } else if !(p.starts_with('/') || p.starts_with('*')) {
                ctx.error(
                    format!("{field}.{name}[{i}]"),
                    format!("{p:?}: a path starts with '/' (or '*' for a suffix match)"),
                );
            }
        }
    }
    let p = ports(ctx, &format!("{field}.ports"), &o.ports).unwrap_or_default();
    let np = ports(ctx, &format!("{field}.notPorts"), &o.not_ports).unwrap_or_default();
    let mut strings = |name: &str, v: &[String], lower: bool| patterns(ctx, &format!("{field}.{name}"), v, lower);
    Operation {
        ports: p,
        not_ports: np,
        hosts: strings("hosts", &o.hosts, true),
        not_hosts: strings("notHosts", &o.not_hosts, true),
        methods: strings("methods", &o.methods, false),
        not_methods: strings("notMethods", &o.not_methods, false),
        paths: strings("paths", &o.paths, false),
        not_paths: strings("notPaths", &o.not_paths, false),
    }
}

/// Istio's string matches; an empty string is an error. Hosts compare
/// case-insensitively, so their patterns are kept lowercase.
fn patterns(ctx: &mut Ctx<'_>, field: &str, v: &[String], lower: bool) -> Vec<Pattern> {
    let mut out = Vec::with_capacity(v.len());
    for (i, s) in v.iter().enumerate() {
        if s.is_empty() {
            ctx.error(format!("{field}[{i}]"), "empty value");
            continue;
        }
        out.push(Pattern::parse(&if lower { s.to_ascii_lowercase() } else { s.clone() }));
    }
    out
}
