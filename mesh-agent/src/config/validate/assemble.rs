//! The admitted objects put together into one [`State`]: pods, Services
//! (their addresses unique), ServiceEntry hosts, Gateways and the Services
//! that address them, security policies and routing rules, each object
//! admitted or rejected on its own.
use super::*;

/// The model, and the admitted Gateway API Gateways' listeners (which the
/// status reads).
pub(super) fn assemble(
    objects: Objects,
    trust_domain: &str,
    errors: &mut Vec<ConfigError>,
) -> (State, gateway_api::http_route::Listeners) {
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
    // Each Gateway API Gateway's class, by `namespace/name`: its pods are
    // judged by the policies attached to that class.
    let class_of: HashMap<String, Arc<str>> = objects
        .api_gateways
        .iter()
        .map(|(_, g)| {
            let ns = g.metadata.namespace.as_deref().unwrap_or("default");
            let key = format!("{ns}/{}", g.metadata.name.as_deref().unwrap_or_default());
            (key, Arc::from(g.spec.gateway_class_name.as_str()))
        })
        .collect();
    let mut ip_owner: HashMap<Ipv4Addr, String> = HashMap::new();
    for (origin, pod) in &objects.pods {
        let mut ctx = Ctx { origin, object: describe_meta("Pod", &pod.metadata), errors };
        let before = ctx.error_count();
        let built = build_workload(&mut ctx, pod, &state.namespaces, trust_domain);
        let Some(mut w) = built.filter(|_| ctx.error_count() == before) else { continue };
        if w.gateway
            && let Some(gateway) = w.labels.get(super::super::object::GATEWAY_NAME_LABEL)
        {
            w.gateway_class = class_of.get(&format!("{}/{gateway}", w.namespace)).cloned();
        }
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
        let mesh = super::super::mesh_config::mesh_config(&mut ctx, &cm.data);
        (state.outbound_policy, state.path_normalization) = (mesh.outbound, mesh.paths);
        state.extension_providers = mesh.providers;
        state.access_log = mesh.access_log;
        state.tracing = mesh.tracing;
    }
    let secrets: super::super::object::Secrets = objects
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
        |ctx, o| gateway::build_gateway(ctx, o, &secrets),
    );
    // The Gateway API's Gateways of this mesh's classes, beside Istio's.
    let grants: Vec<ReferenceGrantObject> = objects.reference_grants.iter().map(|(_, g)| g.clone()).collect();
    let classes = build_unique(
        &objects.gateway_classes,
        errors,
        |o| describe_meta("GatewayClass", &o.metadata),
        |ctx, o| {
            let ours = gateway_api::CONTROLLERS.contains(&o.spec.controller_name.as_str());
            if ours && o.spec.parameters_ref.is_some() {
                ctx.error("spec.parametersRef", "not supported by this version of mesh-agent");
            }
            Some(o.clone())
        },
    );
    let mut listeners = gateway_api::http_route::Listeners::new();
    let istio_gateways: Vec<String> = gateways.iter().map(|g| format!("{}/{}", g.namespace, g.name)).collect();
    for built in build_unique(
        &objects.api_gateways,
        errors,
        |o| describe_meta("Gateway", &o.metadata),
        |ctx, o| {
            let built = gateway_api::gateway::build(ctx, o, &classes, &state.namespaces, &secrets, &grants)?;
            let key = format!("{}/{}", built.gateway.namespace, built.gateway.name);
            if istio_gateways.contains(&key) {
                ctx.error("metadata.name", format!("an Istio Gateway {key} exists: routes could not tell them apart"));
                return None;
            }
            Some(built)
        },
    ) {
        listeners.insert(format!("{}/{}", built.gateway.namespace, built.gateway.name), built.listeners);
        gateways.push(built.gateway);
    }
    // Another controller's Gateways: known, with nothing of ours to attach
    // to (a route's parentRef to one is its controller's to judge).
    for (_, g) in &objects.api_gateways {
        let class = classes.iter().find(|c| c.metadata.name.as_deref() == Some(&g.spec.gateway_class_name));
        if class.is_some_and(|c| !gateway_api::CONTROLLERS.contains(&c.spec.controller_name.as_str())) {
            let ns = g.metadata.namespace.as_deref().unwrap_or("default");
            let key = format!("{ns}/{}", g.metadata.name.as_deref().unwrap_or_default());
            listeners.entry(key).or_default();
        }
    }
    // Oldest first (Istio's precedence when servers conflict), then by
    // namespace and name.
    gateways.sort_by(|a, b| by_age(&a.created, &a.namespace, &a.name).cmp(&by_age(&b.created, &b.namespace, &b.name)));
    state.gateways = gateways.into_iter().map(Arc::new).collect();
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
        |ctx, o| security::build_authorization_policy(ctx, o, &state.extension_providers),
    );
    state.request_authentications = build_unique(
        &objects.request_authentications,
        errors,
        |o| describe_meta("RequestAuthentication", &o.metadata),
        security::build_request_authentication,
    );
    state.request_authentications.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut telemetries = build_unique(
        &objects.telemetries,
        errors,
        |o| describe_meta("Telemetry", &o.metadata),
        |ctx, o| super::super::telemetry::build_telemetry(ctx, o, &state.tracing),
    );
    // Of two namespace-wide Telemetries, Istio applies the oldest.
    telemetries
        .sort_by(|a, b| by_age(&a.created, &a.namespace, &a.name).cmp(&by_age(&b.created, &b.namespace, &b.name)));
    state.telemetries = telemetries;
    let params =
        state.request_authentications.iter().flat_map(|r| &r.rules).flat_map(|r| r.from_params.iter().cloned());
    state.token_params = std::iter::once("access_token".to_owned()).chain(params).collect();
    let services = &state.services;
    let gateways = &state.gateways;
    let mut virtual_services = build_unique(
        &objects.virtual_services,
        errors,
        |o| describe_meta("VirtualService", &o.metadata),
        |ctx, o| networking::build_virtual_service(ctx, o, services, gateways),
    );
    // The Gateway API's routes: mesh VirtualServices for Service parents,
    // bound ones for Gateway parents.
    let mut routes = build_unique(
        &objects.http_routes,
        errors,
        |o| describe_meta("HTTPRoute", &o.metadata),
        |ctx, o| gateway_api::http_route::build(ctx, o, "HTTPRoute", services, &listeners, &grants),
    );
    routes.extend(build_unique(
        &objects.grpc_routes,
        errors,
        |o| describe_meta("GRPCRoute", &o.metadata),
        |ctx, o| {
            let since = ctx.error_count();
            let built =
                gateway_api::http_route::build(ctx, &o.as_http_route(), "GRPCRoute", services, &listeners, &grants);
            // Its matches are methods, checked as the paths they amount to.
            ctx.rename_in_errors_since(since, ".path.value", ".method");
            ctx.rename_in_errors_since(since, ".path.type", ".method.type");
            built
        },
    ));
    virtual_services.extend(gateway_api::http_route::virtual_services(&routes));
    let streams = build_unique(
        &objects.stream_routes,
        errors,
        |o| describe_meta(&o.kind, &o.metadata),
        |ctx, o| gateway_api::stream_route::build(ctx, o, services, &listeners, &grants),
    );
    virtual_services.extend(streams.into_iter().flatten());
    let mut destination_rules = build_unique(
        &objects.destination_rules,
        errors,
        |o| describe_meta("DestinationRule", &o.metadata),
        |ctx, o| networking::build_destination_rule(ctx, o, services, &secrets),
    );
    // Istio's order when several claim a host: the oldest first (by
    // creationTimestamp, which files written by hand lack), then by
    // namespace and name.
    virtual_services
        .sort_by(|a, b| by_age(&a.created, &a.namespace, &a.name).cmp(&by_age(&b.created, &b.namespace, &b.name)));
    destination_rules
        .sort_by(|a, b| by_age(&a.created, &a.namespace, &a.name).cmp(&by_age(&b.created, &b.namespace, &b.name)));
    state.virtual_services = virtual_services;
    state.destination_rules = destination_rules;
    // Istio applies the oldest policy first when several select a workload;
    // without creation times, name order makes the choice stable.
    state.peer_authentications.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    (state, listeners)
}

/// Adds one Service per ServiceEntry host (key `namespace/host`), indexed by
/// address, endpoint IP and host.
fn add_service_entries(state: &mut State, entries: &[(Origin, ServiceEntryObject)], errors: &mut Vec<ConfigError>) {
    add_entries(state, entries, errors);
    // The longest prefix first (stable: oldest entries first within a range).
    state.external_by_range.sort_by_key(|(r, _)| std::cmp::Reverse(r.prefix));
}

fn add_entries(state: &mut State, entries: &[(Origin, ServiceEntryObject)], errors: &mut Vec<ConfigError>) {
    let workloads = &state.workloads;
    let mut built = build_unique(
        entries,
        errors,
        |o| describe_meta("ServiceEntry", &o.metadata),
        |ctx, o| {
            let created = o.metadata.creation_timestamp.clone();
            Some((
                created,
                ctx.origin.clone(),
                ctx.object.clone(),
                service_entry::build_service_entry(ctx, o, workloads)?,
            ))
        },
    );
    // Oldest first, as Istio orders entries that declare one host or address
    // (then by namespace and name, which the object's description holds).
    built.sort_by(|a, b| by_age(&a.0, "", &a.2).cmp(&by_age(&b.0, "", &b.2)));
    let mut allocated = std::collections::HashSet::new();
    for (_, origin, object, services) in built {
        let mut ctx = Ctx { origin: &origin, object, errors };
        for mut s in services {
            let key = format!("{}/{}", s.namespace, s.name);
            if state.services.contains_key(&key) {
                ctx.error("spec.hosts", format!("host {} is already defined in namespace {}", s.name, s.namespace));
                continue;
            }
            let auto = auto_address(&s, &mut allocated);
            if auto.is_some() {
                s.vip = auto;
            }
            let s = Arc::new(s);
            for ip in s.external.iter().flat_map(|e| e.addresses.iter()).chain(auto.as_ref()) {
                if state.by_vip.get(ip).is_none_or(|other| other.external.is_some()) {
                    state.external_by_addr.entry(*ip).or_default().push(s.clone());
                }
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
            for range in s.external.iter().flat_map(|e| e.ranges.iter()) {
                match state.external_by_range.iter_mut().find(|(r, _)| r == range) {
                    Some((_, list)) if !list.iter().any(|o| Arc::ptr_eq(o, &s)) => list.push(s.clone()),
                    Some(_) => {}
                    None => state.external_by_range.push((*range, vec![s.clone()])),
                }
            }
            for ip in s.endpoints.iter().filter_map(|w| w.ip) {
                state.external_by_ip.entry(ip).or_default().push(s.clone());
            }
            state.external_by_host.entry(s.hostname.to_string()).or_default().push(s.clone());
            state.services.insert(key, s);
        }
    }
}

/// Istio's automatic address for a ServiceEntry host that lists none
/// (`ISTIO_META_DNS_AUTO_ALLOCATE`, now the default): an address in
/// 240.240.0.0/16 the DNS proxy answers for the host, and that routes to
/// it like a listed address. Only for exact hosts of entries with
/// endpoints to go to (`STATIC`, `DNS`); chosen from a hash of
/// `namespace/host`, so that it does not move when other entries come and
/// go and every agent gives the same one; a collision takes the next free
/// address (oldest entry first).
fn auto_address(s: &crate::state::Service, taken: &mut std::collections::HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    use crate::state::Resolution;
    let e = s.external.as_ref()?;
    let wanted = e.addresses.is_empty()
        && e.ranges.is_empty()
        && !s.hostname.starts_with("*.")
        && matches!(e.resolution, Resolution::Dns | Resolution::Static);
    if !wanted {
        return None;
    }
    // FNV-1a: stable across builds and platforms.
    let hash = format!("{}/{}", s.namespace, s.hostname)
        .bytes()
        .fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    // Hosts 1 to 65534 of the /16 (not its network or broadcast address).
    let first = hash % 65_534;
    (0..65_534)
        .map(|i| (first + i) % 65_534 + 1)
        .map(|host| Ipv4Addr::from(0xf0f0_0000 | host))
        .find(|ip| taken.insert(*ip))
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
