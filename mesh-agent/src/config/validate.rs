//! Turning documents into a validated [`State`], object by object: an object
//! with any error is rejected on its own (with every error named) and the
//! rest applies. Security objects fail closed: an AuthorizationPolicy or
//! PeerAuthentication that cannot be admitted is replaced by a policy that
//! denies everything to the workloads it would select (its namespace's, when
//! even its selector cannot be read), as ztunnel does with a policy it
//! cannot understand.
use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use serde::de::DeserializeOwned;

use super::{
    ConfigError, Document, Loaded, Origin,
    gateway::{self, GatewayObject, SecretObject},
    k8s,
    networking::{self, DestinationRuleObject, VirtualServiceObject},
    security::{self, AuthorizationPolicyObject, PeerAuthenticationObject},
    service_entry::{self, ServiceEntryObject},
};
use crate::state::{
    CLUSTER_DOMAIN, DATAPLANE_MODE_LABEL, NODE_IDENTITY_PREFIX, Namespace, Node, Protocol, Service, ServicePort, State,
    TargetPort, Workload,
};

/// Collects errors against one object.
pub(super) struct Ctx<'a> {
    origin: &'a Origin,
    object: String,
    errors: &'a mut Vec<ConfigError>,
}

impl Ctx<'_> {
    pub(super) fn object(&self) -> &str {
        &self.object
    }

    pub(super) fn error_count(&self) -> usize {
        self.errors.len()
    }

    /// Rewrites the field prefix `from` to `to` in the errors reported since `since`.
    pub(super) fn rename_errors_since(&mut self, since: usize, from: &str, to: &str) {
        for e in self.errors.iter_mut().skip(since) {
            if let Some(rest) = e.field.strip_prefix(from) {
                e.field = format!("{to}{rest}");
            }
        }
    }

    pub(super) fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            origin: self.origin.clone(),
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        });
    }
}

/// Objects sorted by kind, each with its origin, before cross-object checks.
#[derive(Default)]
struct Objects {
    nodes: Vec<(Origin, k8s::Node)>,
    namespaces: Vec<(Origin, k8s::Namespace)>,
    pods: Vec<(Origin, k8s::Pod)>,
    services: Vec<(Origin, k8s::Service)>,
    peer_authentications: Vec<(Origin, PeerAuthenticationObject)>,
    authorization_policies: Vec<(Origin, AuthorizationPolicyObject)>,
    virtual_services: Vec<(Origin, VirtualServiceObject)>,
    destination_rules: Vec<(Origin, DestinationRuleObject)>,
    gateways: Vec<(Origin, GatewayObject)>,
    service_entries: Vec<(Origin, ServiceEntryObject)>,
    secrets: Vec<(Origin, SecretObject)>,
    /// ConfigMap `istio-system/istio`.
    mesh_config: Option<(Origin, k8s::ConfigMap)>,
    /// Every security object as far as its raw YAML says, to deny in its
    /// place if it is rejected.
    security: Vec<FailClosed>,
}

/// What a security object selects, read from its raw YAML.
struct FailClosed {
    origin: Origin,
    object: String,
    namespace: Arc<str>,
    /// `spec.selector.matchLabels`; `None` (absent or unreadable) selects the
    /// whole namespace.
    selector: Option<BTreeMap<String, String>>,
}

impl FailClosed {
    fn read(origin: &Origin, object: &str, value: &serde_yaml_ng::Value) -> Self {
        let namespace = value.get("metadata").and_then(|m| str_field(m, "namespace")).unwrap_or("default");
        let labels = value.get("spec").and_then(|s| s.get("selector")).and_then(|s| s.get("matchLabels"));
        let selector = labels.and_then(|l| l.as_mapping()).and_then(|m| {
            m.iter()
                .map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
                .collect::<Option<BTreeMap<_, _>>>()
                .filter(|m| !m.is_empty())
        });
        FailClosed { origin: origin.clone(), object: object.to_owned(), namespace: namespace.into(), selector }
    }

    /// A DENY whose one empty rule matches every request.
    fn deny_all(&self) -> crate::state::security::AuthorizationPolicy {
        crate::state::security::AuthorizationPolicy {
            name: format!("{} (rejected: denies all)", self.object).into(),
            namespace: self.namespace.clone(),
            selector: self.selector.clone(),
            action: crate::state::security::Action::Deny,
            rules: vec![crate::state::security::Rule::default()],
        }
    }
}

/// The state built from every object that could be admitted, and the errors
/// of those that could not.
pub(super) fn build_state(docs: &[Document], trust_domain: &str) -> Loaded {
    let mut errors = Vec::new();
    let mut notes = Vec::new();
    let mut objects = Objects::default();
    for doc in docs {
        sort_document(&doc.origin, &doc.value, &mut objects, &mut notes, &mut errors);
    }
    let security = std::mem::take(&mut objects.security);
    let mut state = assemble(objects, trust_domain, &mut errors);
    let rejected: std::collections::HashSet<&Origin> = errors.iter().map(|e| &e.origin).collect();
    for f in security.iter().filter(|f| rejected.contains(&f.origin)) {
        tracing::warn!(object = %f.object, namespace = %f.namespace, selector = ?f.selector, "security policy rejected: the workloads it selects deny every connection until it is fixed");
        state.authorization_policies.push(f.deny_all());
    }
    state.build_index();
    Loaded { state, notes, rejected: errors }
}

fn str_field<'a>(v: &'a serde_yaml_ng::Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(|k| k.as_str())
}

/// `Kind namespace/name` (namespaced kinds default to `default`) or `Kind name`.
fn object_name(kind: &str, name: Option<&str>, namespace: Option<&str>) -> String {
    let name = name.unwrap_or("<unnamed>");
    let cluster_scoped = matches!(kind, "Node" | "Namespace" | "List");
    match namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None if cluster_scoped => format!("{kind} {name}"),
        None => format!("{kind} default/{name}"),
    }
}

fn describe(kind: &str, v: &serde_yaml_ng::Value) -> String {
    let meta = v.get("metadata");
    object_name(kind, meta.and_then(|m| str_field(m, "name")), meta.and_then(|m| str_field(m, "namespace")))
}

fn describe_meta(kind: &str, meta: &k8s::ObjectMeta) -> String {
    object_name(kind, meta.name.as_deref(), meta.namespace.as_deref())
}

fn sort_document(
    origin: &Origin,
    value: &serde_yaml_ng::Value,
    objects: &mut Objects,
    notes: &mut Vec<String>,
    errors: &mut Vec<ConfigError>,
) {
    let kind = str_field(value, "kind");
    let api_version = str_field(value, "apiVersion");
    let (Some(kind), Some(api_version)) = (kind, api_version) else {
        let missing = if kind.is_none() { "kind" } else { "apiVersion" };
        errors.push(ConfigError {
            origin: origin.clone(),
            object: "document".into(),
            field: missing.into(),
            message: format!("missing `{missing}`: every document must be a Kubernetes object"),
        });
        return;
    };
    let object = describe(kind, value);
    let mut ctx = Ctx { origin, object, errors };
    match (api_version, kind) {
        ("v1", "List") => {
            let items = value.get("items").and_then(|i| i.as_sequence());
            for (i, item) in items.into_iter().flatten().enumerate() {
                let origin = Origin { item: Some(i), ..origin.clone() };
                sort_document(&origin, item, objects, notes, ctx.errors);
            }
        }
        ("v1", "Node") => push(&mut ctx, value, &mut objects.nodes),
        ("v1", "Namespace") => push(&mut ctx, value, &mut objects.namespaces),
        ("v1", "Pod") => push(&mut ctx, value, &mut objects.pods),
        ("v1", "Service") => push(&mut ctx, value, &mut objects.services),
        ("v1", "Secret") => push(&mut ctx, value, &mut objects.secrets),
        ("v1", "ConfigMap") => {
            let mut found = Vec::new();
            push(&mut ctx, value, &mut found);
            match found.pop() {
                Some((o, cm)) if is_mesh_config(&cm) => objects.mesh_config = Some((o, cm)),
                Some(_) => {
                    notes.push(format!("{origin}: {}: only ConfigMap istio-system/istio is read, skipped", ctx.object))
                }
                None => {}
            }
        }
        ("networking.istio.io/v1" | "networking.istio.io/v1beta1" | "networking.istio.io/v1alpha3", "Gateway") => {
            push(&mut ctx, value, &mut objects.gateways)
        }
        ("networking.istio.io/v1" | "networking.istio.io/v1beta1" | "networking.istio.io/v1alpha3", "ServiceEntry") => {
            push(&mut ctx, value, &mut objects.service_entries)
        }
        ("security.istio.io/v1" | "security.istio.io/v1beta1", "PeerAuthentication") => {
            objects.security.push(FailClosed::read(origin, &ctx.object, value));
            push(&mut ctx, value, &mut objects.peer_authentications)
        }
        ("security.istio.io/v1" | "security.istio.io/v1beta1", "AuthorizationPolicy") => {
            objects.security.push(FailClosed::read(origin, &ctx.object, value));
            push(&mut ctx, value, &mut objects.authorization_policies)
        }
        ("networking.istio.io/v1" | "networking.istio.io/v1beta1", "VirtualService") => {
            push(&mut ctx, value, &mut objects.virtual_services)
        }
        ("networking.istio.io/v1" | "networking.istio.io/v1beta1", "DestinationRule") => {
            push(&mut ctx, value, &mut objects.destination_rules)
        }
        (api, _) if api.split('/').next().is_some_and(|g| g.ends_with("istio.io")) => {
            ctx.error("kind", format!("{api} {kind} is not supported by this version of mesh-agent"));
        }
        (api, _) => notes.push(format!("{origin}: {}: {api} not used by mesh-agent, skipped", ctx.object)),
    }
}

fn is_mesh_config(cm: &k8s::ConfigMap) -> bool {
    cm.metadata.name.as_deref() == Some("istio") && cm.metadata.namespace.as_deref() == Some("istio-system")
}

fn push<T: DeserializeOwned>(ctx: &mut Ctx<'_>, value: &serde_yaml_ng::Value, into: &mut Vec<(Origin, T)>) {
    match serde_path_to_error::deserialize::<_, T>(value.clone()) {
        Ok(obj) => into.push((ctx.origin.clone(), obj)),
        Err(e) => {
            let path = e.path().to_string();
            ctx.error(path, e.into_inner().to_string());
        }
    }
}

fn parse_ip(ctx: &mut Ctx<'_>, field: &str, s: &str) -> Option<Ipv4Addr> {
    match s.parse::<Ipv4Addr>() {
        Ok(ip) => Some(ip),
        Err(_) if s.parse::<std::net::Ipv6Addr>().is_ok() => {
            ctx.error(field, format!("{s:?}: IPv6 is not supported yet"));
            None
        }
        Err(_) => {
            ctx.error(field, format!("{s:?} is not an IPv4 address"));
            None
        }
    }
}

fn parse_port(ctx: &mut Ctx<'_>, field: &str, p: i64) -> Option<u16> {
    match u16::try_from(p) {
        Ok(p) if p != 0 => Some(p),
        _ => {
            ctx.error(field, format!("port {p} is out of range 1-65535"));
            None
        }
    }
}

/// Kubernetes IANA_SVC_NAME: 1-15 lowercase alphanumerics or '-', with a letter,
/// not starting or ending with '-'.
fn valid_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

pub(super) fn require_name(ctx: &mut Ctx<'_>, meta: &k8s::ObjectMeta) -> Option<Arc<str>> {
    match meta.name.as_deref() {
        Some(n) if !n.is_empty() => Some(n.into()),
        _ => {
            ctx.error("metadata.name", "required");
            None
        }
    }
}

fn assemble(objects: Objects, trust_domain: &str, errors: &mut Vec<ConfigError>) -> State {
    let mut state = State::default();
    state.trust_domain = trust_domain.into();
    for (origin, node) in &objects.nodes {
        let mut ctx = Ctx { origin, object: describe_meta("Node", &node.metadata), errors };
        let before = ctx.error_count();
        if let Some(n) = build_node(&mut ctx, node, trust_domain).filter(|_| ctx.error_count() == before) {
            state.nodes.insert(n.name.clone(), n);
        }
    }
    for (origin, ns) in &objects.namespaces {
        let mut ctx = Ctx { origin, object: describe_meta("Namespace", &ns.metadata), errors };
        if let Some(name) = require_name(&mut ctx, &ns.metadata) {
            let labels = ns.metadata.labels.clone();
            state.namespaces.insert(name.clone(), Namespace { name, labels });
        }
    }
    let mut ip_owner: HashMap<Ipv4Addr, String> = HashMap::new();
    for (origin, pod) in &objects.pods {
        let mut ctx = Ctx { origin, object: describe_meta("Pod", &pod.metadata), errors };
        let before = ctx.error_count();
        let built = build_workload(&mut ctx, pod, &state.namespaces, trust_domain);
        let Some(w) = built.filter(|_| ctx.error_count() == before) else { continue };
        let key = format!("{}/{}", w.namespace, w.name);
        if let (Some(ip), false) = (w.ip, w.host_network) {
            if let Some(other) = ip_owner.get(&ip) {
                ctx.error("status.podIP", format!("{ip} is already the IP of Pod {other}"));
                continue;
            }
            ip_owner.insert(ip, key.clone());
        }
        if state.workloads.contains_key(&key) {
            ctx.error("metadata.name", format!("Pod {key} is defined twice"));
            continue;
        }
        let w = Arc::new(w);
        if let (Some(ip), false) = (w.ip, w.host_network) {
            state.by_ip.insert(ip, w.clone());
        }
        state.workloads.insert(key, w);
    }
    let mut vip_owner: HashMap<Ipv4Addr, String> = HashMap::new();
    for (origin, svc) in &objects.services {
        let mut ctx = Ctx { origin, object: describe_meta("Service", &svc.metadata), errors };
        let before = ctx.error_count();
        let Some(s) = build_service(&mut ctx, svc, &state.workloads).filter(|_| ctx.error_count() == before) else {
            continue;
        };
        let key = format!("{}/{}", s.namespace, s.name);
        if let Some(vip) = s.vip {
            if let Some(other) = vip_owner.get(&vip) {
                ctx.error("spec.clusterIP", format!("{vip} is already the clusterIP of Service {other}"));
                continue;
            }
            if let Some(pod) = ip_owner.get(&vip) {
                ctx.error("spec.clusterIP", format!("{vip} is the IP of Pod {pod}"));
                continue;
            }
            vip_owner.insert(vip, key.clone());
        }
        if state.services.contains_key(&key) {
            ctx.error("metadata.name", format!("Service {key} is defined twice"));
            continue;
        }
        let s = Arc::new(s);
        if let Some(vip) = s.vip {
            state.by_vip.insert(vip, s.clone());
        }
        state.services.insert(key, s);
    }
    add_service_entries(&mut state, &objects.service_entries, errors);
    if let Some((origin, cm)) = &objects.mesh_config {
        let mut ctx = Ctx { origin, object: describe_meta("ConfigMap", &cm.metadata), errors };
        state.outbound_policy = service_entry::outbound_policy(&mut ctx, &cm.data);
    }
    let secrets: gateway::Secrets = objects
        .secrets
        .iter()
        .map(|(_, s)| {
            let ns = s.metadata.namespace.as_deref().unwrap_or("default");
            (format!("{ns}/{}", s.metadata.name.as_deref().unwrap_or_default()), s.clone())
        })
        .collect();
    let mut gateways = build_unique(
        &objects.gateways,
        errors,
        |o| describe_meta("Gateway", &o.metadata),
        |ctx, o| gateway::build_gateway(ctx, o, &secrets, trust_domain),
    );
    gateways.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    state.gateways = gateways.into_iter().map(Arc::new).collect();
    add_gateway_services(&mut state, &objects.gateways, errors);
    state.peer_authentications = build_unique(
        &objects.peer_authentications,
        errors,
        |o| describe_meta("PeerAuthentication", &o.metadata),
        security::build_peer_authentication,
    );
    state.authorization_policies = build_unique(
        &objects.authorization_policies,
        errors,
        |o| describe_meta("AuthorizationPolicy", &o.metadata),
        security::build_authorization_policy,
    );
    let services = &state.services;
    let gateways = &state.gateways;
    let mut virtual_services = build_unique(
        &objects.virtual_services,
        errors,
        |o| describe_meta("VirtualService", &o.metadata),
        |ctx, o| networking::build_virtual_service(ctx, o, services, gateways),
    );
    let mut destination_rules = build_unique(
        &objects.destination_rules,
        errors,
        |o| describe_meta("DestinationRule", &o.metadata),
        |ctx, o| networking::build_destination_rule(ctx, o, services, &secrets),
    );
    virtual_services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    destination_rules.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    state.virtual_services = virtual_services;
    state.destination_rules = destination_rules;
    // Istio applies the oldest policy first when several select a workload;
    // without creation times, name order makes the choice stable.
    state.peer_authentications.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    state
}

/// Adds one Service per ServiceEntry host (key `namespace/host`), indexed by
/// address, endpoint IP and host.
fn add_service_entries(state: &mut State, entries: &[(Origin, ServiceEntryObject)], errors: &mut Vec<ConfigError>) {
    let built = build_unique(
        entries,
        errors,
        |o| describe_meta("ServiceEntry", &o.metadata),
        |ctx, o| Some((ctx.origin.clone(), ctx.object.clone(), service_entry::build_service_entry(ctx, o)?)),
    );
    for (origin, object, services) in built {
        let mut ctx = Ctx { origin: &origin, object, errors };
        for s in services {
            let key = format!("{}/{}", s.namespace, s.name);
            if state.services.contains_key(&key) {
                ctx.error("spec.hosts", format!("host {} is already defined in namespace {}", s.name, s.namespace));
                continue;
            }
            let s = Arc::new(s);
            for ip in s.external.iter().flat_map(|e| e.addresses.iter()) {
                match state.by_vip.get(ip) {
                    Some(other) if other.external.is_none() => {
                        ctx.error(
                            "spec.addresses",
                            format!("{ip} is the clusterIP of Service {}/{}", other.namespace, other.name),
                        );
                    }
                    Some(_) => {}
                    None => {
                        state.by_vip.insert(*ip, s.clone());
                    }
                }
            }
            for ip in s.endpoints.iter().filter_map(|w| w.ip) {
                state.external_by_ip.entry(ip).or_default().push(s.clone());
            }
            state.external_by_host.entry(s.hostname.to_string()).or_insert_with(|| s.clone());
            state.services.insert(key, s);
        }
    }
}

/// A Gateway is addressable as the Service `<name>.<namespace>.svc.cluster.local`
/// (as Istio's gateway deployments are): its endpoints are the agents on the
/// nodes it selects, at their node address, with the gateway's identity. A route
/// to it (the first hop of the egress-gateway pattern) travels over HBONE.
fn add_gateway_services(state: &mut State, objects: &[(Origin, GatewayObject)], errors: &mut Vec<ConfigError>) {
    for g in state.gateways.clone() {
        let key = format!("{}/{}", g.namespace, g.name);
        if state.services.contains_key(&key) {
            if let Some((origin, o)) =
                objects.iter().find(|(_, o)| describe_meta("Gateway", &o.metadata) == format!("Gateway {key}"))
            {
                let mut ctx = Ctx { origin, object: describe_meta("Gateway", &o.metadata), errors };
                ctx.error(
                    "metadata.name",
                    format!("Service {key} exists: a Gateway is addressed by its own name, choose another"),
                );
            }
            continue;
        }
        let endpoints = state
            .nodes
            .values()
            .filter(|n| g.selector.iter().all(|(k, v)| n.labels.get(k) == Some(v)))
            .filter_map(|n| {
                let ip = n.internal_ip?;
                Some(Arc::new(Workload {
                    name: format!("{}@{}", g.name, n.name).into(),
                    node: Some(n.name.clone()),
                    ip: Some(ip),
                    ..Workload::clone(&g.workload)
                }))
            })
            .collect();
        let ports = g
            .servers
            .iter()
            .map(|s| ServicePort {
                name: s.name.clone(),
                port: s.port,
                target: TargetPort::Number(s.port),
                protocol: Protocol::Tcp,
                app_protocol: Some(s.protocol.app_protocol().into()),
            })
            .collect();
        let s = Service {
            key: format!("{}/{}", g.namespace, g.name),
            hostname: format!("{}.{}.svc.{CLUSTER_DOMAIN}", g.name, g.namespace).into(),
            name: g.name.clone(),
            namespace: g.namespace.clone(),
            vip: None,
            ports,
            endpoints,
            external: None,
        };
        state.services.insert(key, Arc::new(s));
    }
}

/// Builds each object, reporting a second object of the same name (the name is
/// the object's description, `Kind namespace/name`).
fn build_unique<O, T>(
    objects: &[(Origin, O)],
    errors: &mut Vec<ConfigError>,
    describe: impl Fn(&O) -> String,
    build: impl Fn(&mut Ctx<'_>, &O) -> Option<T>,
) -> Vec<T> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (origin, obj) in objects {
        let mut ctx = Ctx { origin, object: describe(obj), errors };
        let before = ctx.error_count();
        // Any error rejects the whole object, even where a builder could
        // have gone on without the faulty part.
        let Some(built) = build(&mut ctx, obj).filter(|_| ctx.error_count() == before) else { continue };
        if !seen.insert(ctx.object.clone()) {
            ctx.error("metadata.name", "defined twice");
            continue;
        }
        out.push(built);
    }
    out
}

mod kinds;
#[cfg(test)]
mod tests;

use kinds::{build_node, build_service, build_workload};
