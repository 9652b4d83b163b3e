//! Turning documents into a validated [`State`], object by object: an object
//! with any error is rejected on its own (with every error named) and the
//! rest applies. Security objects fail closed: an AuthorizationPolicy or
//! PeerAuthentication that cannot be admitted is replaced by a policy that
//! denies everything to the workloads it would select (its namespace's, when
//! even its selector cannot be read), as ztunnel does with a policy it
//! cannot understand. One attached by `targetRefs` closes only the traffic
//! addressed to its target Services, never its namespace; a target that is
//! no Service (a Gateway) leaves it rejected alone.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use serde::de::DeserializeOwned;

use super::{
    Body, ConfigError, Document, Loaded, Origin,
    gateway::{self, GatewayObject},
    gateway_api::{self, GatewayClassObject, HttpRouteObject, ReferenceGrantObject},
    k8s,
    networking::{self, DestinationRuleObject, VirtualServiceObject},
    object::{Ctx, SecretObject, by_age, parse_ip, parse_port, require_name, valid_port_name},
    security::{self, AuthorizationPolicyObject, PeerAuthenticationObject, RequestAuthenticationObject},
    service_entry::{self, ServiceEntryObject},
};
use crate::state::{
    CA_SERVICE_ACCOUNT, CLUSTER_DOMAIN, DATAPLANE_MODE_LABEL, NODE_IDENTITY_PREFIX, Namespace, Node, Protocol,
    ROOT_NAMESPACE, Service, ServicePort, State, TargetPort, Workload,
};

/// Objects sorted by kind, each with its origin, before cross-object checks.
#[derive(Default)]
struct Objects {
    nodes: Vec<(Origin, Arc<k8s::Node>)>,
    namespaces: Vec<(Origin, Arc<k8s::Namespace>)>,
    pods: Vec<(Origin, Arc<k8s::Pod>)>,
    services: Vec<(Origin, Arc<k8s::Service>)>,
    peer_authentications: Vec<(Origin, PeerAuthenticationObject)>,
    authorization_policies: Vec<(Origin, AuthorizationPolicyObject)>,
    request_authentications: Vec<(Origin, RequestAuthenticationObject)>,
    telemetries: Vec<(Origin, super::telemetry::TelemetryObject)>,
    virtual_services: Vec<(Origin, VirtualServiceObject)>,
    destination_rules: Vec<(Origin, DestinationRuleObject)>,
    gateways: Vec<(Origin, GatewayObject)>,
    service_entries: Vec<(Origin, ServiceEntryObject)>,
    http_routes: Vec<(Origin, HttpRouteObject)>,
    grpc_routes: Vec<(Origin, gateway_api::GrpcRouteObject)>,
    stream_routes: Vec<(Origin, gateway_api::StreamRouteObject)>,
    gateway_classes: Vec<(Origin, GatewayClassObject)>,
    api_gateways: Vec<(Origin, gateway_api::GatewayObject)>,
    reference_grants: Vec<(Origin, ReferenceGrantObject)>,
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
    /// whole namespace, unless the object has `targets`.
    selector: Option<BTreeMap<String, String>>,
    /// `spec.targetRef(s)`, when present: the names of the Services among them.
    targets: Option<Vec<String>>,
    /// A GatewayClass among them, for a policy of the root namespace.
    gateway_class: Option<String>,
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
        let spec = value.get("spec");
        let refs = spec.and_then(|s| s.get("targetRefs")).and_then(|r| r.as_sequence()).into_iter().flatten();
        let refs: Vec<&serde_yaml_ng::Value> = refs.chain(spec.and_then(|s| s.get("targetRef"))).collect();
        let service = |r: &serde_yaml_ng::Value| {
            let core = matches!(str_field(r, "group"), None | Some("" | "core"));
            (core && str_field(r, "kind") == Some("Service")).then(|| str_field(r, "name").map(str::to_owned)).flatten()
        };
        let targets = (!refs.is_empty()).then(|| refs.iter().filter_map(|r| service(r)).collect());
        // A Gateway API Gateway's pods, as a selector of the namespace.
        let gateway = refs.iter().find_map(|r| {
            let is_gateway =
                str_field(r, "group") == Some("gateway.networking.k8s.io") && str_field(r, "kind") == Some("Gateway");
            let name = str_field(r, "name").filter(|_| is_gateway)?;
            Some(BTreeMap::from([(super::object::GATEWAY_NAME_LABEL.to_owned(), name.to_owned())]))
        });
        let selector = gateway.or(selector);
        let gateway_class = refs.iter().find_map(|r| {
            let is_class = str_field(r, "group") == Some("gateway.networking.k8s.io")
                && str_field(r, "kind") == Some("GatewayClass");
            str_field(r, "name").filter(|_| is_class && namespace == ROOT_NAMESPACE).map(str::to_owned)
        });
        let (origin, object, namespace) = (origin.clone(), object.to_owned(), namespace.into());
        FailClosed { origin, object, namespace, selector, targets, gateway_class }
    }

    /// DENYs whose one empty rule matches every request: for the workloads
    /// the selector selects, and for the traffic addressed to the target
    /// Services (as the policy would have been attached).
    fn deny_all(&self) -> Vec<crate::state::security::AuthorizationPolicy> {
        let deny = |selector, services| crate::state::security::AuthorizationPolicy {
            name: format!("{} (rejected: denies all)", self.object).into(),
            namespace: self.namespace.clone(),
            selector,
            services,
            gateway_class: None,
            action: crate::state::security::Action::Deny,
            rules: vec![crate::state::security::Rule::default()],
            provider: None,
        };
        let Some(targets) = &self.targets else { return vec![deny(self.selector.clone(), Vec::new())] };
        let mut out = Vec::new();
        if !targets.is_empty() {
            out.push(deny(None, targets.iter().map(|t| Arc::from(t.as_str())).collect()));
        }
        out.extend(self.selector.clone().map(|s| deny(Some(s), Vec::new())));
        if let Some(class) = &self.gateway_class {
            let mut p = deny(None, Vec::new());
            p.gateway_class = Some(Arc::from(class.as_str()));
            out.push(p);
        }
        out
    }
}

/// The state built from every object that could be admitted, and the errors
/// of those that could not.
pub(super) fn build_state(docs: &[Document], trust_domain: &str) -> Loaded {
    build(docs, trust_domain, false)
}

/// As [`build_state`], with the status of each Gateway API object of this
/// mesh's classes (what the controller writes back).
pub(super) fn build_state_with_status(docs: &[Document], trust_domain: &str) -> Loaded {
    build(docs, trust_domain, true)
}

fn build(docs: &[Document], trust_domain: &str, status: bool) -> Loaded {
    let mut errors = Vec::new();
    let mut notes = Vec::new();
    let mut objects = Objects::default();
    for doc in docs {
        let origin = doc.origin.clone();
        match &doc.body {
            Body::Yaml(value) => sort_document(&doc.origin, value, &mut objects, &mut notes, &mut errors),
            Body::Node(n) => objects.nodes.push((origin, n.clone())),
            Body::Namespace(n) => objects.namespaces.push((origin, n.clone())),
            Body::Pod(p) => objects.pods.push((origin, p.clone())),
            Body::Service(s) => objects.services.push((origin, s.clone())),
        }
    }
    let security = std::mem::take(&mut objects.security);
    // What the status is read from, kept before the objects are consumed.
    let api = status.then(|| ApiObjects {
        classes: objects.gateway_classes.clone(),
        gateways: objects.api_gateways.clone(),
        http_routes: objects.http_routes.clone(),
        grpc_routes: objects.grpc_routes.clone(),
        stream_routes: objects.stream_routes.clone(),
    });
    let (mut state, listeners) = assemble(objects, trust_domain, &mut errors);
    let rejected: std::collections::HashSet<&Origin> = errors.iter().map(|e| &e.origin).collect();
    for f in security.iter().filter(|f| rejected.contains(&f.origin)) {
        tracing::warn!(object = %f.object, namespace = %f.namespace, selector = ?f.selector, targets = ?f.targets, "security policy rejected: the workloads it selects deny every connection until it is fixed");
        state.authorization_policies.extend(f.deny_all());
    }
    state.build_index();
    let (statuses, gateway_deployments) = api.map(|api| api.statuses(&errors, &listeners, &state)).unwrap_or_default();
    Loaded { state, notes, rejected: errors, statuses, gateway_deployments }
}

/// The Gateway API objects, as read.
struct ApiObjects {
    classes: Vec<(Origin, GatewayClassObject)>,
    gateways: Vec<(Origin, gateway_api::GatewayObject)>,
    http_routes: Vec<(Origin, HttpRouteObject)>,
    grpc_routes: Vec<(Origin, gateway_api::GrpcRouteObject)>,
    stream_routes: Vec<(Origin, gateway_api::StreamRouteObject)>,
}

impl ApiObjects {
    fn statuses(
        &self,
        errors: &[ConfigError],
        listeners: &gateway_api::http_route::Listeners,
        state: &State,
    ) -> (Vec<gateway_api::status::ObjectStatus>, Vec<gateway_api::status::GatewayDeployment>) {
        use gateway_api::status::RouteRef;
        let http = self.http_routes.iter().map(|(origin, o)| RouteRef {
            origin,
            api_version: &o.api_version,
            kind: "HTTPRoute",
            meta: &o.metadata,
            parents: &o.spec.parent_refs,
            hostnames: &o.spec.hostnames,
        });
        let grpc = self.grpc_routes.iter().map(|(origin, o)| RouteRef {
            origin,
            api_version: &o.api_version,
            kind: "GRPCRoute",
            meta: &o.metadata,
            parents: &o.spec.parent_refs,
            hostnames: &o.spec.hostnames,
        });
        let streams = self.stream_routes.iter().map(|(origin, o)| RouteRef {
            origin,
            api_version: &o.api_version,
            kind: &o.kind,
            meta: &o.metadata,
            parents: &o.spec.parent_refs,
            hostnames: &o.spec.hostnames,
        });
        let inputs = gateway_api::status::Inputs {
            classes: &self.classes,
            gateways: &self.gateways,
            routes: http.chain(grpc).chain(streams).collect(),
            errors,
            listeners,
            state,
        };
        (gateway_api::status::statuses(&inputs), gateway_api::status::deployments(&inputs))
    }
}

fn str_field<'a>(v: &'a serde_yaml_ng::Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(|k| k.as_str())
}

/// `Kind namespace/name` (namespaced kinds default to `default`) or `Kind name`.
fn object_name(kind: &str, name: Option<&str>, namespace: Option<&str>) -> String {
    let name = name.unwrap_or("<unnamed>");
    let cluster_scoped = matches!(kind, "Node" | "Namespace" | "List" | "GatewayClass");
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
        ("v1", "Node") => push_shared(&mut ctx, value, &mut objects.nodes),
        ("v1", "Namespace") => push_shared(&mut ctx, value, &mut objects.namespaces),
        ("v1", "Pod") => push_shared(&mut ctx, value, &mut objects.pods),
        ("v1", "Service") => push_shared(&mut ctx, value, &mut objects.services),
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
        ("security.istio.io/v1" | "security.istio.io/v1beta1", "RequestAuthentication") => {
            objects.security.push(FailClosed::read(origin, &ctx.object, value));
            push(&mut ctx, value, &mut objects.request_authentications)
        }
        // Istio serves all three versions of its networking kinds (one schema).
        ("networking.istio.io/v1" | "networking.istio.io/v1beta1" | "networking.istio.io/v1alpha3", "VirtualService") => {
            push(&mut ctx, value, &mut objects.virtual_services)
        }
        ("networking.istio.io/v1" | "networking.istio.io/v1beta1" | "networking.istio.io/v1alpha3", "DestinationRule") => {
            push(&mut ctx, value, &mut objects.destination_rules)
        }
        ("telemetry.istio.io/v1" | "telemetry.istio.io/v1alpha1", "Telemetry") => {
            push(&mut ctx, value, &mut objects.telemetries)
        }
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
            push(&mut ctx, value, &mut objects.http_routes)
        }
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "ReferenceGrant") => {
            push(&mut ctx, value, &mut objects.reference_grants)
        }
        ("gateway.networking.k8s.io/v1", "GRPCRoute") => push(&mut ctx, value, &mut objects.grpc_routes),
        (
            "gateway.networking.k8s.io/v1alpha2" | "gateway.networking.k8s.io/v1alpha3" | "gateway.networking.k8s.io/v1",
            "TCPRoute" | "TLSRoute",
        ) => push(&mut ctx, value, &mut objects.stream_routes),
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "GatewayClass") => {
            push(&mut ctx, value, &mut objects.gateway_classes)
        }
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "Gateway") => {
            push(&mut ctx, value, &mut objects.api_gateways)
        }
        (api, _) if api.starts_with("gateway.networking.k8s.io/") => ctx.error(
            "kind",
            format!("{api} {kind} is not supported by this version of mesh-agent (of the Gateway API: GatewayClass, Gateway, HTTPRoute, GRPCRoute, TCPRoute, TLSRoute and ReferenceGrant)"),
        ),
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
    if let Some(obj) = parse(ctx, value) {
        into.push((ctx.origin.clone(), obj));
    }
}

/// As [`push`], for the kinds kept shared ([`Body`]).
fn push_shared<T: DeserializeOwned>(ctx: &mut Ctx<'_>, value: &serde_yaml_ng::Value, into: &mut Vec<(Origin, Arc<T>)>) {
    if let Some(obj) = parse(ctx, value) {
        into.push((ctx.origin.clone(), Arc::new(obj)));
    }
}

/// The object as `T`, or an error naming the field.
fn parse<T: DeserializeOwned>(ctx: &mut Ctx<'_>, value: &serde_yaml_ng::Value) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value.clone()) {
        Ok(obj) => Some(obj),
        Err(e) => {
            let path = e.path().to_string();
            ctx.error(path, e.into_inner().to_string());
            None
        }
    }
}

mod assemble;
mod kinds;
#[cfg(test)]
mod tests;

use assemble::assemble;
use kinds::{build_node, build_service, build_workload};
