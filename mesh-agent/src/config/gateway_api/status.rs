//! What the mesh did with each Gateway API object of its classes, as the
//! `status` the API asks a controller to write back: GatewayClass
//! `Accepted`; Gateway `Accepted`, `Programmed`, `addresses` and per
//! listener `Accepted`, `ResolvedRefs`, `Programmed`, `Conflicted`,
//! `supportedKinds`, `attachedRoutes`; per route and parent `Accepted` and
//! `ResolvedRefs`, with the specification's reasons.
//!
//! The conditions come from the same validation that builds the model, so
//! the status says exactly what is served: an object with an error is
//! served nowhere, and its conditions name the first errors. `lastTransitionTime`
//! is the writer's (it keeps a condition's time while its status holds).
//!
//! Sources: gateway-api.sigs.k8s.io/reference/spec (GatewayClassConditionType,
//! GatewayConditionType, ListenerConditionType, RouteConditionType and their
//! reasons), gateway-api.sigs.k8s.io/geps/gep-1364 (status and conditions).
use serde_json::{Value, json};

use super::{
    CONTROLLERS, GatewayClassObject, GatewayObject, ParentRef, gateway::Listener, http_route::Listeners,
    http_route::shared_hostnames,
};
use crate::{
    config::{ConfigError, Origin, k8s::ObjectMeta},
    state::State,
};

/// The controller name written for Service parents (GAMMA), which no
/// GatewayClass names.
pub const MESH_CONTROLLER: &str = CONTROLLERS[0];

/// One object's status, as the controller writes it (to its `status`
/// subresource, at the version it was read).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ObjectStatus {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    /// The whole `status` for a GatewayClass or Gateway; for a route, the
    /// `parents` entries of this mesh's controllers (other controllers'
    /// entries are theirs to keep).
    pub status: Value,
}

/// A Gateway of this mesh's classes, as its automated deployment needs it
/// (Istio's: a Deployment of gateway pods and a LoadBalancer Service, both
/// `<name>-<class>`, owned by the Gateway).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GatewayDeployment {
    pub namespace: String,
    pub name: String,
    /// The Gateway's `apiVersion` and `uid`, for the owner reference.
    pub api_version: String,
    pub uid: Option<String>,
    pub class: String,
    /// The class's controller name.
    pub controller: String,
    /// Each listener port once: (listener name, port, protocol).
    pub listeners: Vec<(String, u16, String)>,
}

/// The Gateways of this mesh's classes to deploy.
pub(in crate::config) fn deployments(inputs: &Inputs<'_>) -> Vec<GatewayDeployment> {
    let mut out = Vec::new();
    for (_, g) in inputs.gateways {
        let Some(controller) = controller_of(inputs, &g.spec.gateway_class_name) else { continue };
        let Some(name) = g.metadata.name.clone().filter(|n| !n.is_empty()) else { continue };
        let mut listeners: Vec<(String, u16, String)> = Vec::new();
        for l in &g.spec.listeners {
            let Some(port) = u16::try_from(l.port).ok().filter(|p| *p != 0) else { continue };
            if !listeners.iter().any(|(_, p, _)| *p == port) {
                listeners.push((l.name.clone(), port, l.protocol.clone()));
            }
        }
        out.push(GatewayDeployment {
            namespace: g.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            name,
            api_version: g.api_version.clone(),
            uid: g.metadata.uid.clone(),
            class: g.spec.gateway_class_name.clone(),
            controller: controller.to_owned(),
            listeners,
        });
    }
    out
}

/// A route as its status needs it.
pub(in crate::config) struct RouteRef<'a> {
    pub origin: &'a Origin,
    pub api_version: &'a str,
    pub kind: &'a str,
    pub meta: &'a ObjectMeta,
    pub parents: &'a [ParentRef],
    pub hostnames: &'a [String],
}

/// Everything the conditions are read from.
pub(in crate::config) struct Inputs<'a> {
    pub classes: &'a [(Origin, GatewayClassObject)],
    pub gateways: &'a [(Origin, GatewayObject)],
    pub routes: Vec<RouteRef<'a>>,
    pub errors: &'a [ConfigError],
    /// The admitted Gateways' listeners.
    pub listeners: &'a Listeners,
    pub state: &'a State,
}

/// At most this many errors are named in one condition's message.
const NAMED_ERRORS: usize = 3;

pub(in crate::config) fn statuses(inputs: &Inputs<'_>) -> Vec<ObjectStatus> {
    let mut out = Vec::new();
    for (origin, class) in inputs.classes {
        if !CONTROLLERS.contains(&class.spec.controller_name.as_str()) {
            continue;
        }
        let errors = errors_of(inputs.errors, origin);
        let generation = class.metadata.generation;
        let accepted = match errors.first() {
            None => condition("Accepted", true, "Accepted", "handled by mesh-agent".into(), generation),
            Some(_) => condition("Accepted", false, "InvalidParameters", describe(&errors), generation),
        };
        out.push(object_status(&class.api_version, "GatewayClass", &class.metadata, json!({"conditions": [accepted]})));
    }
    for (origin, gateway) in inputs.gateways {
        if controller_of(inputs, &gateway.spec.gateway_class_name).is_some() {
            out.push(gateway_status(inputs, origin, gateway));
        }
    }
    for route in &inputs.routes {
        let parents: Vec<Value> =
            route.parents.iter().enumerate().filter_map(|(i, p)| parent_status(inputs, route, i, p)).collect();
        if !parents.is_empty() {
            out.push(object_status(route.api_version, route.kind, route.meta, json!({"parents": parents})));
        }
    }
    out
}

/// The `conditions` of a status (or of a listener or a route's parent
/// entry) as `type=status/reason`, in order: for logs and tests.
pub fn condition_summary(v: &Value) -> Vec<String> {
    let list = v["conditions"].as_array().map(Vec::as_slice).unwrap_or_default();
    let field = |c: &Value, k: &str| c[k].as_str().unwrap_or("?").to_owned();
    list.iter().map(|c| format!("{}={}/{}", field(c, "type"), field(c, "status"), field(c, "reason"))).collect()
}

fn object_status(api_version: &str, kind: &str, meta: &ObjectMeta, status: Value) -> ObjectStatus {
    ObjectStatus {
        api_version: api_version.to_owned(),
        kind: kind.to_owned(),
        namespace: meta.namespace.clone(),
        name: meta.name.clone().unwrap_or_default(),
        status,
    }
}

fn condition(kind: &str, ok: bool, reason: &str, message: String, generation: Option<i64>) -> Value {
    let mut c =
        json!({"type": kind, "status": if ok { "True" } else { "False" }, "reason": reason, "message": message});
    if let Some(g) = generation {
        c["observedGeneration"] = json!(g);
    }
    c
}

fn errors_of<'a>(errors: &'a [ConfigError], origin: &Origin) -> Vec<&'a ConfigError> {
    errors.iter().filter(|e| &e.origin == origin).collect()
}

/// The first errors, `field: message; …`.
fn describe(errors: &[&ConfigError]) -> String {
    let mut named: Vec<String> =
        errors.iter().take(NAMED_ERRORS).map(|e| format!("{}: {}", e.field, e.message)).collect();
    if errors.len() > NAMED_ERRORS {
        named.push(format!("and {} more", errors.len() - NAMED_ERRORS));
    }
    named.join("; ")
}

/// The controller of a GatewayClass of this mesh.
fn controller_of<'a>(inputs: &Inputs<'a>, class: &str) -> Option<&'a str> {
    let found = inputs.classes.iter().find(|(_, c)| c.metadata.name.as_deref() == Some(class))?;
    let name = found.1.spec.controller_name.as_str();
    CONTROLLERS.contains(&name).then_some(name)
}

fn gateway_status(inputs: &Inputs<'_>, origin: &Origin, gateway: &GatewayObject) -> ObjectStatus {
    let meta = &gateway.metadata;
    let generation = meta.generation;
    let (namespace, name) = (meta.namespace.as_deref().unwrap_or("default"), meta.name.as_deref().unwrap_or_default());
    let key = format!("{namespace}/{name}");
    let errors = errors_of(inputs.errors, origin);
    let admitted = inputs.listeners.get(&key).filter(|_| errors.is_empty());
    let pods: Vec<_> = inputs
        .state
        .workloads
        .values()
        .filter(|w| {
            w.gateway
                && &*w.namespace == namespace
                && w.labels.get(crate::config::object::GATEWAY_NAME_LABEL).map(String::as_str) == Some(name)
        })
        .collect();
    let mut conditions = Vec::new();
    if admitted.is_some() {
        conditions.push(condition("Accepted", true, "Accepted", "served by mesh-agent".into(), generation));
        conditions.push(if pods.is_empty() {
            let message = format!(
                "no pod labelled {}={name} in namespace {namespace}: deploy the gateway's pods (docs/edges.md)",
                crate::config::object::GATEWAY_NAME_LABEL
            );
            condition("Programmed", false, "NoResources", message, generation)
        } else {
            let message = format!("served by the agents of {} gateway pod(s)", pods.len());
            condition("Programmed", true, "Programmed", message, generation)
        });
    } else {
        let reason = if errors.iter().any(|e| e.field.starts_with("spec.addresses")) {
            "UnsupportedAddress"
        } else if !errors.is_empty() && errors.iter().all(|e| e.field.starts_with("spec.listeners")) {
            "ListenersNotValid"
        } else {
            "Invalid"
        };
        let message = format!("not served: {}", describe(&errors));
        conditions.push(condition("Accepted", false, reason, message.clone(), generation));
        conditions.push(condition("Programmed", false, "Invalid", message, generation));
    }
    // The cluster IPs of the Services in front of its pods.
    let mut addresses: Vec<Value> = inputs
        .state
        .services
        .values()
        .filter(|s| {
            &*s.namespace == namespace
                && s.endpoints.iter().any(|e| pods.iter().any(|p| p.name == e.name && p.namespace == e.namespace))
        })
        .filter_map(|s| s.vip)
        .map(|ip| json!({"type": "IPAddress", "value": ip.to_string()}))
        .collect();
    addresses.dedup();
    let listeners: Vec<Value> = gateway
        .spec
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let field = format!("spec.listeners[{i}]");
            let own: Vec<&ConfigError> = errors
                .iter()
                .copied()
                .filter(|e| e.field == field || e.field.starts_with(&format!("{field}.")))
                .collect();
            let built = admitted.and_then(|all| all.iter().find(|b| b.name == l.name));
            listener_status(inputs, &key, l, built, &own, admitted.is_some(), generation)
        })
        .collect();
    let mut status = json!({"conditions": conditions, "listeners": listeners});
    if !addresses.is_empty() {
        status["addresses"] = Value::Array(addresses);
    }
    object_status(&gateway.api_version, "Gateway", meta, status)
}

fn listener_status(
    inputs: &Inputs<'_>,
    gateway: &str,
    l: &super::ListenerSpec,
    built: Option<&Listener>,
    errors: &[&ConfigError],
    programmed: bool,
    generation: Option<i64>,
) -> Value {
    let refs = |e: &&&ConfigError| e.field.contains(".tls.certificateRefs") || e.field.contains(".allowedRoutes.kinds");
    let (ref_errors, other): (Vec<&ConfigError>, Vec<&ConfigError>) = errors.iter().copied().partition(|e| refs(&e));
    let conflicted = other.iter().any(|e| e.message.contains("another protocol"));
    let accepted = match other.first() {
        None => condition("Accepted", true, "Accepted", "accepted".into(), generation),
        Some(e) => {
            let reason = if e.field.ends_with(".protocol") {
                "UnsupportedProtocol"
            } else if conflicted {
                "ProtocolConflict"
            } else {
                "UnsupportedValue"
            };
            condition("Accepted", false, reason, describe(&other), generation)
        }
    };
    let resolved = match ref_errors.first() {
        None => condition("ResolvedRefs", true, "ResolvedRefs", "resolved".into(), generation),
        Some(e) => {
            let reason = if e.field.contains(".allowedRoutes.kinds") {
                "InvalidRouteKinds"
            } else if e.message.contains("ReferenceGrant") {
                "RefNotPermitted"
            } else {
                "InvalidCertificateRef"
            };
            condition("ResolvedRefs", false, reason, describe(&ref_errors), generation)
        }
    };
    let programmed = match built.filter(|_| programmed) {
        Some(_) => condition("Programmed", true, "Programmed", "programmed".into(), generation),
        None => condition("Programmed", false, "Invalid", "the Gateway is not served".into(), generation),
    };
    let conflict = match conflicted {
        true => condition("Conflicted", true, "ProtocolConflict", "another listener has this port".into(), generation),
        false => condition("Conflicted", false, "NoConflicts", "no conflicts".into(), generation),
    };
    let kinds: Vec<String> = match built {
        Some(b) => b.kinds.clone(),
        None => {
            let passthrough = l.tls.as_ref().and_then(|t| t.mode.as_deref()) == Some("Passthrough");
            default_kinds(&l.protocol, passthrough).iter().map(|k| (*k).to_owned()).collect()
        }
    };
    let attached = built.map_or(0, |b| attached_routes(inputs, gateway, b));
    json!({
        "name": l.name,
        "supportedKinds": kinds.iter().map(|k| json!({"group": super::GROUP, "kind": k})).collect::<Vec<_>>(),
        "attachedRoutes": attached,
        "conditions": [accepted, resolved, programmed, conflict],
    })
}

/// The route kinds a listener of `protocol` takes when it names none.
fn default_kinds(protocol: &str, passthrough: bool) -> &'static [&'static str] {
    match protocol {
        "HTTP" | "HTTPS" => &["HTTPRoute", "GRPCRoute"],
        "TLS" if passthrough => &["TLSRoute"],
        "TLS" => &["TCPRoute"],
        "TCP" => &["TCPRoute"],
        _ => &[],
    }
}

/// The admitted routes attached to the listener `l` of `gateway`.
fn attached_routes(inputs: &Inputs<'_>, gateway: &str, l: &Listener) -> usize {
    inputs
        .routes
        .iter()
        .filter(|r| errors_of(inputs.errors, r.origin).is_empty())
        .filter(|r| {
            let namespace = r.meta.namespace.as_deref().unwrap_or("default");
            r.parents.iter().any(|p| {
                gateway_key(p, namespace).as_deref() == Some(gateway)
                    && attaches(p, namespace, r.kind, r.hostnames, l) == Attach::Yes
            })
        })
        .count()
}

/// `namespace/name` of a Gateway parent.
fn gateway_key(p: &ParentRef, namespace: &str) -> Option<String> {
    let (group, kind) = (p.group.as_deref().unwrap_or(super::GROUP), p.kind.as_deref().unwrap_or("Gateway"));
    ((group, kind) == (super::GROUP, "Gateway"))
        .then(|| format!("{}/{}", p.namespace.as_deref().unwrap_or(namespace), p.name))
}

/// Whether a route attaches to a listener, or why not (the API's reasons,
/// in the order it asks them: named, allowed, hostnames).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attach {
    Yes,
    NotNamed,
    NotAllowed,
    NoHostname,
}

fn attaches(p: &ParentRef, namespace: &str, kind: &str, hostnames: &[String], l: &Listener) -> Attach {
    let named = p.section_name.as_deref().is_none_or(|s| s == l.name) && p.port.is_none_or(|n| n == i64::from(l.port));
    let allowed = l.namespaces.as_ref().is_none_or(|list| list.iter().any(|ns| &**ns == namespace))
        && l.kinds.iter().any(|k| k == kind);
    match (named, allowed, shared_hostnames(l.hostname.as_deref(), hostnames).is_empty()) {
        (false, ..) => Attach::NotNamed,
        (true, false, _) => Attach::NotAllowed,
        (true, true, true) => Attach::NoHostname,
        (true, true, false) => Attach::Yes,
    }
}

/// The status of one parentRef of a route, when the parent is this mesh's:
/// a Service (GAMMA), or a Gateway of one of its classes.
fn parent_status(inputs: &Inputs<'_>, route: &RouteRef<'_>, i: usize, p: &ParentRef) -> Option<Value> {
    let namespace = route.meta.namespace.as_deref().unwrap_or("default");
    let generation = route.meta.generation;
    let controller = match gateway_key(p, namespace) {
        Some(key) => {
            let found = inputs.gateways.iter().find(|(_, g)| {
                let ns = g.metadata.namespace.as_deref().unwrap_or("default");
                format!("{ns}/{}", g.metadata.name.as_deref().unwrap_or_default()) == key
            });
            controller_of(inputs, &found?.1.spec.gateway_class_name)?
        }
        None if p.kind.as_deref() == Some("Service") => MESH_CONTROLLER,
        None => return None,
    };
    let errors = errors_of(inputs.errors, route.origin);
    let field = format!("spec.parentRefs[{i}]");
    let own: Vec<&ConfigError> =
        errors.iter().copied().filter(|e| e.field == field || e.field.starts_with(&format!("{field}."))).collect();
    let backend = |e: &&ConfigError| e.field.contains(".backendRefs[");
    let backends: Vec<&ConfigError> = errors.iter().copied().filter(backend).collect();
    let accepted = if errors.is_empty() {
        condition("Accepted", true, "Accepted", "served by mesh-agent".into(), generation)
    } else if own.is_empty() {
        condition(
            "Accepted",
            false,
            "UnsupportedValue",
            format!("the route is not served: {}", describe(&errors)),
            generation,
        )
    } else {
        let reason = match gateway_key(p, namespace) {
            Some(key) => match inputs.listeners.get(&key) {
                None => "NoMatchingParent",
                Some(all) => {
                    let why: Vec<Attach> =
                        all.iter().map(|l| attaches(p, namespace, route.kind, route.hostnames, l)).collect();
                    if why.iter().all(|w| *w == Attach::NotNamed) {
                        "NoMatchingParent"
                    } else if why.contains(&Attach::NoHostname) {
                        "NoMatchingListenerHostname"
                    } else if why.contains(&Attach::NotAllowed) {
                        "NotAllowedByListeners"
                    } else {
                        "UnsupportedValue"
                    }
                }
            },
            None if own.iter().any(|e| e.field.ends_with(".kind")) => "UnsupportedValue",
            None => "NoMatchingParent",
        };
        condition("Accepted", false, reason, describe(&own), generation)
    };
    let resolved = match backends.first() {
        None => condition("ResolvedRefs", true, "ResolvedRefs", "resolved".into(), generation),
        Some(e) => {
            let reason = if e.message.contains("ReferenceGrant") {
                "RefNotPermitted"
            } else if e.field.ends_with(".kind") || e.field.ends_with(".group") {
                "InvalidKind"
            } else {
                "BackendNotFound"
            };
            condition("ResolvedRefs", false, reason, describe(&backends), generation)
        }
    };
    let mut parent_ref = json!({"name": p.name});
    for (key, value) in
        [("group", &p.group), ("kind", &p.kind), ("namespace", &p.namespace), ("sectionName", &p.section_name)]
    {
        if let Some(v) = value {
            parent_ref[key] = json!(v);
        }
    }
    if let Some(port) = p.port {
        parent_ref["port"] = json!(port);
    }
    Some(json!({"parentRef": parent_ref, "controllerName": controller, "conditions": [accepted, resolved]}))
}
