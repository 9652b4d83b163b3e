//! A Gateway API `Gateway` of one of this mesh's GatewayClasses into the
//! model's Gateway: served by the gateway pods **of its own namespace**
//! labelled `gateway.networking.k8s.io/gateway-name: <name>` (how Istio's
//! automated deployment labels them), one server per listener. A Gateway
//! of another controller's class is left to it.
use std::{collections::BTreeMap, sync::Arc};

use super::{GatewayClassObject, GatewayObject, ListenerSpec, ReferenceGrantObject};
use crate::{
    config::object::{Ctx, Secrets},
    state::{Gateway, GatewayProtocol, GatewayServer, Namespace, ServerHost, ServerTls},
};

use crate::config::object::GATEWAY_NAME_LABEL;

/// What routes need of a listener to attach to it.
#[derive(Debug, Clone)]
pub(in crate::config) struct Listener {
    pub name: String,
    pub port: u16,
    pub hostname: Option<String>,
    /// The namespaces whose routes it takes (`None`: all).
    pub namespaces: Option<Vec<Arc<str>>>,
    /// The route kinds it takes.
    pub kinds: Vec<String>,
}

/// A Gateway admitted: the model's, and its listeners for routes.
pub(in crate::config) struct Built {
    pub gateway: Gateway,
    pub listeners: Vec<Listener>,
}

pub(in crate::config) fn build(
    ctx: &mut Ctx<'_>,
    obj: &GatewayObject,
    classes: &[GatewayClassObject],
    namespaces: &BTreeMap<Arc<str>, Namespace>,
    secrets: &Secrets,
    grants: &[ReferenceGrantObject],
) -> Option<Built> {
    let (name, namespace) = crate::config::object::name_and_namespace(ctx, &obj.metadata)?;
    let spec = &obj.spec;
    let class = classes.iter().find(|c| c.metadata.name.as_deref() == Some(&spec.gateway_class_name));
    match class {
        None => {
            ctx.error("spec.gatewayClassName", format!("GatewayClass {:?} does not exist", spec.gateway_class_name));
            return None;
        }
        // Another controller's Gateway: not ours to serve or judge.
        Some(c) if !super::CONTROLLERS.contains(&c.spec.controller_name.as_str()) => return None,
        Some(_) => {}
    }
    let before = ctx.error_count();
    for (field, set) in [
        ("addresses", spec.addresses.is_some()),
        ("infrastructure", spec.infrastructure.is_some()),
        ("backendTLS", spec.backend_tls.is_some()),
    ] {
        if set {
            ctx.error(
                format!("spec.{field}"),
                "not supported by this version of mesh-agent (`mesh-agent controller` deploys the Gateway's pods and LoadBalancer Service <name>-<class>; with --deploy-gateways=false, put yours in front of pods labelled gateway.networking.k8s.io/gateway-name)",
            );
        }
    }
    if spec.listeners.is_empty() {
        ctx.error("spec.listeners", "at least one listener is required");
    }
    let mut servers = Vec::new();
    let mut listeners = Vec::new();
    for (i, l) in spec.listeners.iter().enumerate() {
        let field = format!("spec.listeners[{i}]");
        if spec.listeners[..i].iter().any(|o| o.name == l.name) {
            ctx.error(format!("{field}.name"), format!("{:?}: listener names are unique", l.name));
        }
        if let Some((server, listener)) = listener(ctx, &field, l, &namespace, namespaces, secrets, grants) {
            if servers.iter().any(|s: &GatewayServer| s.port == server.port && s.protocol != server.protocol) {
                ctx.error(
                    format!("{field}.port"),
                    format!("port {} has another protocol in this Gateway", server.port),
                );
            }
            servers.push(server);
            listeners.push(listener);
        }
    }
    if ctx.error_count() != before {
        return None;
    }
    let selector = BTreeMap::from([(GATEWAY_NAME_LABEL.to_owned(), name.to_string())]);
    let created = obj.metadata.creation_timestamp.clone();
    Some(Built { gateway: Gateway { name, namespace, created, selector, servers, own_namespace: true }, listeners })
}

fn listener(
    ctx: &mut Ctx<'_>,
    field: &str,
    l: &ListenerSpec,
    namespace: &Arc<str>,
    namespaces: &BTreeMap<Arc<str>, Namespace>,
    secrets: &Secrets,
    grants: &[ReferenceGrantObject],
) -> Option<(GatewayServer, Listener)> {
    let port = u16::try_from(l.port).ok().filter(|p| *p != 0);
    let Some(port) = port else {
        ctx.error(format!("{field}.port"), format!("{} is not a port number 1-65535", l.port));
        return None;
    };
    if let Some(h) = &l.hostname
        && !super::hostname(ctx, &format!("{field}.hostname"), h)
    {
        return None;
    }
    let allowed = l.allowed_routes.clone().unwrap_or_default();
    for (i, k) in allowed.kinds.iter().enumerate() {
        if k.group.as_deref().unwrap_or(super::GROUP) != super::GROUP
            || !matches!(k.kind.as_str(), "HTTPRoute" | "GRPCRoute" | "TCPRoute" | "TLSRoute")
        {
            ctx.error(
                format!("{field}.allowedRoutes.kinds[{i}]"),
                format!(
                    "{:?}: only HTTPRoute, GRPCRoute, TCPRoute and TLSRoute are served by this version of mesh-agent",
                    k.kind
                ),
            );
        }
    }
    // By default, the route kinds of the listener's protocol.
    let kinds: Vec<String> = match (allowed.kinds.is_empty(), l.protocol.as_str()) {
        (true, "TCP") => vec!["TCPRoute".into()],
        (true, "TLS") => match l.tls.as_ref().and_then(|t| t.mode.as_deref()) {
            Some("Passthrough") => vec!["TLSRoute".into()],
            _ => vec!["TCPRoute".into()],
        },
        (true, _) => vec!["HTTPRoute".into(), "GRPCRoute".into()],
        (false, _) => allowed.kinds.iter().map(|k| k.kind.clone()).collect(),
    };
    let from = allowed.namespaces.as_ref().and_then(|n| n.from.clone()).unwrap_or_else(|| "Same".into());
    let route_namespaces = match from.as_str() {
        "Same" => Some(vec![namespace.clone()]),
        "All" => None,
        "Selector" => {
            let selector = allowed.namespaces.as_ref().and_then(|n| n.selector.clone()).unwrap_or_default();
            if selector.match_expressions.is_some() {
                ctx.error(
                    format!("{field}.allowedRoutes.namespaces.selector.matchExpressions"),
                    "not supported by this version of mesh-agent",
                );
                return None;
            }
            let selects = |ns: &&Namespace| selector.match_labels.iter().all(|(k, v)| ns.labels.get(k) == Some(v));
            Some(namespaces.values().filter(selects).map(|ns| ns.name.clone()).collect())
        }
        other => {
            ctx.error(
                format!("{field}.allowedRoutes.namespaces.from"),
                format!("{other:?}: expected Same, All or Selector"),
            );
            return None;
        }
    };
    let host = l.hostname.clone().unwrap_or_else(|| "*".into());
    let hosts: Vec<ServerHost> = match &route_namespaces {
        None => vec![ServerHost { namespace: None, host }],
        Some(list) => list.iter().map(|ns| ServerHost { namespace: Some(ns.clone()), host: host.clone() }).collect(),
    };
    let (protocol, tls) = match l.protocol.as_str() {
        "HTTP" => {
            if l.tls.is_some() {
                ctx.error(format!("{field}.tls"), "only for HTTPS and TLS listeners");
                return None;
            }
            (GatewayProtocol::Http, None)
        }
        "HTTPS" => (GatewayProtocol::Https, Some(terminate(ctx, field, l, namespace, secrets, grants)?)),
        "TCP" => {
            if l.tls.is_some() {
                ctx.error(format!("{field}.tls"), "only for HTTPS and TLS listeners");
                return None;
            }
            (GatewayProtocol::Tcp, None)
        }
        "TLS" => match l.tls.as_ref().and_then(|t| t.mode.as_deref()) {
            Some("Passthrough") => (GatewayProtocol::Tls, Some(ServerTls::Passthrough)),
            // Terminated, then the bytes to a TCPRoute's backends.
            None | Some("Terminate") => {
                if kinds.iter().any(|k| k == "TLSRoute") {
                    ctx.error(
                        format!("{field}.allowedRoutes.kinds"),
                        "a TLS listener that terminates takes TCPRoutes (a TLSRoute passes TLS through)",
                    );
                    return None;
                }
                (GatewayProtocol::Tls, Some(terminate(ctx, field, l, namespace, secrets, grants)?))
            }
            Some(other) => {
                ctx.error(format!("{field}.tls.mode"), format!("{other:?}: expected Terminate or Passthrough"));
                return None;
            }
        },
        "UDP" => {
            ctx.error(format!("{field}.protocol"), "UDP: not served by this version of mesh-agent");
            return None;
        }
        other => {
            ctx.error(format!("{field}.protocol"), format!("{other:?}: expected HTTP, HTTPS, TLS or TCP"));
            return None;
        }
    };
    let server = GatewayServer { port, name: Some(l.name.clone()), protocol, hosts, tls, https_redirect: false };
    let listener =
        Listener { name: l.name.clone(), port, hostname: l.hostname.clone(), namespaces: route_namespaces, kinds };
    Some((server, listener))
}

/// An HTTPS listener's certificate: its first `certificateRefs` Secret, of
/// the Gateway's namespace or another that grants it by a ReferenceGrant.
fn terminate(
    ctx: &mut Ctx<'_>,
    field: &str,
    l: &ListenerSpec,
    namespace: &str,
    secrets: &Secrets,
    grants: &[ReferenceGrantObject],
) -> Option<ServerTls> {
    let Some(tls) = &l.tls else {
        ctx.error(format!("{field}.tls"), "required to terminate TLS");
        return None;
    };
    if tls.mode.as_deref().is_some_and(|m| m != "Terminate") {
        ctx.error(format!("{field}.tls.mode"), "an HTTPS listener terminates TLS (Terminate)");
        return None;
    }
    for (key, set) in [("options", tls.options.is_some()), ("frontendValidation", tls.frontend_validation.is_some())] {
        if set {
            ctx.error(format!("{field}.tls.{key}"), "not supported by this version of mesh-agent");
            return None;
        }
    }
    let [r] = tls.certificate_refs.as_slice() else {
        ctx.error(
            format!("{field}.tls.certificateRefs"),
            "exactly one certificate (more are not supported by this version of mesh-agent)",
        );
        return None;
    };
    let f = format!("{field}.tls.certificateRefs[0]");
    if !matches!(r.group.as_deref().unwrap_or(""), "" | "core") || r.kind.as_deref().unwrap_or("Secret") != "Secret" {
        ctx.error(format!("{f}.kind"), "expected a Secret (group \"\")");
        return None;
    }
    let ns = r.namespace.as_deref().unwrap_or(namespace);
    if ns != namespace && !super::granted(grants, "Gateway", namespace, "Secret", ns, &r.name) {
        ctx.error(
            format!("{f}.namespace"),
            format!("Secret {ns}/{}: another namespace's, and no ReferenceGrant in {ns} lets Gateways of {namespace} refer to it", r.name),
        );
        return None;
    }
    crate::config::gateway::server_cert(ctx, &format!("{f}.name"), &r.name, ns, secrets).map(ServerTls::Simple)
}
