//! `TCPRoute` and `TLSRoute` (the experimental channel's): at a Gateway's
//! TCP listener, or its TLS listener passing TLS through (the SNI among the
//! route's and the listener's hostnames), connections go to weighted
//! backends. Each becomes a VirtualService bound to the Gateway, with a
//! `tcp` or `tls` rule per listener it attaches to.
use std::{collections::BTreeMap, sync::Arc};

use super::{ReferenceGrantObject, StreamRouteObject, http_route::Listeners};
use crate::{
    config::object::Ctx,
    state::{
        Service,
        traffic::{TcpRoute, TlsMatch, TlsRoute, VirtualService},
    },
};

pub(in crate::config) fn build(
    ctx: &mut Ctx<'_>,
    obj: &StreamRouteObject,
    services: &BTreeMap<String, Arc<Service>>,
    listeners: &Listeners,
    grants: &[ReferenceGrantObject],
) -> Option<Vec<VirtualService>> {
    let (name, namespace) = crate::config::object::name_and_namespace(ctx, &obj.metadata)?;
    let before = ctx.error_count();
    let (spec, kind) = (&obj.spec, obj.kind.as_str());
    let tls = kind == "TLSRoute";
    if !tls && !spec.hostnames.is_empty() {
        ctx.error("spec.hostnames", "a TCPRoute has no hostnames");
    }
    if spec.parent_refs.is_empty() {
        ctx.error("spec.parentRefs", "at least one parentRef is required");
    }
    let mut attached = Vec::new();
    for (i, p) in spec.parent_refs.iter().enumerate() {
        let field = format!("spec.parentRefs[{i}]");
        let (group, parent_kind) = (p.group.as_deref().unwrap_or(super::GROUP), p.kind.as_deref().unwrap_or("Gateway"));
        if (group, parent_kind) != (super::GROUP, "Gateway") {
            ctx.error(format!("{field}.kind"), format!("a {kind} attaches to a Gateway in this version of mesh-agent"));
            continue;
        }
        let hostnames = if tls { spec.hostnames.as_slice() } else { &[] };
        attached.extend(super::http_route::gateway_parent(ctx, &field, p, (&namespace, kind), hostnames, listeners));
    }
    let [rule] = spec.rules.as_slice() else {
        ctx.error("spec.rules", format!("exactly one rule (a {kind}'s rules cannot be told apart)"));
        return None;
    };
    let field = "spec.rules[0].backendRefs";
    let routes = super::http_route::weighted_backends(ctx, field, &rule.backend_refs, &namespace, services, grants);
    if routes.iter().all(|r| r.weight == 0) {
        ctx.error("spec.rules[0].backendRefs", "a backendRef of weight above 0 is required");
    }
    if ctx.error_count() != before {
        return None;
    }
    let mut out = Vec::new();
    for (gateway, ports) in attached {
        let mut vs = VirtualService {
            name: format!("{kind} {name}").into(),
            namespace: namespace.clone(),
            hosts: Vec::new(),
            host_patterns: vec!["*".into()],
            gateways: vec![gateway],
            export_to: None,
            created: obj.metadata.creation_timestamp.clone(),
            http: Vec::new(),
            tcp: Vec::new(),
            tls: Vec::new(),
        };
        for (port, hosts) in ports {
            if tls {
                let m = TlsMatch { sni_hosts: hosts, port: Some(port), gateways: Vec::new() };
                vs.tls.push(Arc::new(TlsRoute { matches: vec![m], routes: routes.clone() }));
            } else {
                vs.tcp.push(Arc::new(TcpRoute { ports: vec![Some(port)], routes: routes.clone() }));
            }
        }
        out.push(vs);
    }
    Some(out)
}
