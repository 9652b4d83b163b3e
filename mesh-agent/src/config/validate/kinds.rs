//! Kubernetes' own kinds — Node, Pod, Service — into the model's nodes,
//! workloads and services.
use super::*;

pub(super) fn build_node(ctx: &mut Ctx<'_>, node: &k8s::Node, trust_domain: &str) -> Option<Node> {
    let name = require_name(ctx, &node.metadata)?;
    let mut internal_ip = None;
    for (i, a) in node.status.addresses.iter().enumerate() {
        if a.kind == "InternalIP" && internal_ip.is_none() {
            let field = format!("status.addresses[{i}].address");
            // Dual-stack nodes list an IPv6 InternalIP too; the first IPv4 one counts.
            if a.address.parse::<std::net::Ipv6Addr>().is_ok() {
                continue;
            }
            internal_ip = parse_ip(ctx, &field, &a.address);
        }
    }
    let sa: Arc<str> = format!("{NODE_IDENTITY_PREFIX}{name}").into();
    let (canonical_service, canonical_revision) = Workload::canonical(&BTreeMap::new(), &name);
    let workload = Arc::new(Workload {
        name: name.clone(),
        namespace: "istio-system".into(),
        workload_name: name.clone(),
        app: "mesh-node".into(),
        version: "unknown".into(),
        canonical_service,
        canonical_revision,
        labels: BTreeMap::new(),
        node: Some(name.clone()),
        principal: crate::identity::spiffe_id(trust_domain, "istio-system", &sa).into(),
        service_account: sa,
        ip: internal_ip,
        host_network: true,
        meshed: true,
        gateway: false,
        gateway_class: None,
        ready: true,
        named_ports: BTreeMap::new(),
        probe_ports: BTreeSet::new(),
        dns_capture: false,
        uid: None,
    });
    let pod_cidrs = pod_cidrs(ctx, &node.spec);
    Some(Node { name, internal_ip, pod_cidrs, labels: node.metadata.labels.clone(), workload })
}

/// `spec.podCIDRs` (or the older `spec.podCIDR`), IPv4 ranges only: a
/// dual-stack node's IPv6 range is skipped, as IPv6 pods are refused anyway.
fn pod_cidrs(ctx: &mut Ctx<'_>, spec: &k8s::NodeSpec) -> Vec<crate::state::security::Cidr> {
    let (field, list) = match (&spec.pod_cidrs[..], spec.pod_cidr.as_str()) {
        ([], "") => return Vec::new(),
        ([], one) => ("spec.podCIDR", vec![one]),
        (many, _) => ("spec.podCIDRs", many.iter().map(String::as_str).collect()),
    };
    let mut out = Vec::new();
    for s in list {
        if s.split('/').next().is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()) {
            continue;
        }
        match crate::state::security::Cidr::parse(s) {
            Ok(c) => out.push(c),
            Err(e) => ctx.error(field, e),
        }
    }
    out
}

/// Istio's workload name: a ReplicaSet's owner Deployment (the ReplicaSet name
/// without its pod-template hash), another controller's name, else the app label,
/// else the pod name.
fn workload_name(pod: &k8s::Pod, name: &Arc<str>) -> Arc<str> {
    let owner = pod.metadata.owner_references.iter().find(|o| o.controller != Some(false));
    match owner {
        Some(o) if o.kind == "ReplicaSet" => match o.name.rsplit_once('-') {
            Some((deployment, _hash)) => deployment.into(),
            None => o.name.as_str().into(),
        },
        Some(o) if o.kind == "Job" || o.kind == "StatefulSet" || o.kind == "DaemonSet" => o.name.as_str().into(),
        _ => pod.metadata.labels.get("app").map_or_else(|| name.clone(), |a| a.as_str().into()),
    }
}

pub(super) fn build_workload(
    ctx: &mut Ctx<'_>,
    pod: &k8s::Pod,
    namespaces: &BTreeMap<Arc<str>, Namespace>,
    trust_domain: &str,
) -> Option<Workload> {
    let name = require_name(ctx, &pod.metadata)?;
    let namespace: Arc<str> = pod.metadata.namespace.as_deref().unwrap_or("default").into();
    let labels = &pod.metadata.labels;
    let ns_mode = namespaces.get(&namespace).and_then(|ns| ns.labels.get(DATAPLANE_MODE_LABEL));
    let gateway = is_gateway(&pod.metadata);
    if gateway && pod.spec.host_network {
        ctx.error("spec.hostNetwork", "a gateway pod needs an address of its own: its agent serves the Gateway there");
        return None;
    }
    // A gateway pod is served by its node's agent: always captured.
    let meshed = gateway
        || !pod.spec.host_network
            && match labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
                Some("none") => false,
                Some("ambient") => true,
                Some(other) => {
                    ctx.error(
                        format!("metadata.labels[{DATAPLANE_MODE_LABEL}]"),
                        format!("{other:?}: expected \"ambient\" or \"none\""),
                    );
                    return None;
                }
                None => ns_mode.map(String::as_str) == Some("ambient"),
            };
    // No address yet: a pod whose sandbox is being made. Known, so that the
    // CNI plugin's request for it is answered; reachable once its address
    // is known (from the kubelet's status, or the plugin).
    let ip = match pod.status.pod_ip.as_deref() {
        Some(s) => Some(parse_ip(ctx, "status.podIP", s)?),
        None => None,
    };
    let mut named_ports = BTreeMap::new();
    for (ci, c) in pod.spec.containers.iter().enumerate() {
        for (pi, p) in c.ports.iter().enumerate() {
            let field = format!("spec.containers[{ci}].ports[{pi}].containerPort");
            let port = parse_port(ctx, &field, p.container_port)?;
            if let Some(n) = &p.name {
                named_ports.insert(n.clone(), port);
            }
        }
    }
    let probe_ports = probe_ports(ctx, &pod.spec)?;
    let phase_ok = pod.status.phase.as_deref().is_none_or(|p| p == "Running");
    let ready_ok = pod.status.conditions.iter().filter(|c| c.kind == "Ready").all(|c| c.status == "True");
    let service_account: Arc<str> = pod.spec.service_account_name.as_deref().unwrap_or("default").into();
    if &*namespace == ROOT_NAMESPACE && &*service_account == CA_SERVICE_ACCOUNT {
        ctx.error("spec.serviceAccountName", format!("{service_account:?}: reserved for the mesh CA's identity"));
        return None;
    }
    if &*namespace == ROOT_NAMESPACE && service_account.starts_with(NODE_IDENTITY_PREFIX) {
        ctx.error(
            "spec.serviceAccountName",
            format!(
                "{service_account:?}: service accounts {NODE_IDENTITY_PREFIX}* in istio-system are node identities"
            ),
        );
        return None;
    }
    let workload_name = workload_name(pod, &name);
    let app = labels
        .get("app")
        .or_else(|| labels.get("app.kubernetes.io/name"))
        .map_or_else(|| workload_name.clone(), |a| a.as_str().into());
    let version = labels
        .get("version")
        .or_else(|| labels.get("app.kubernetes.io/version"))
        .map_or("unknown", String::as_str)
        .into();
    let (canonical_service, canonical_revision) = Workload::canonical(labels, &workload_name);
    Some(Workload {
        principal: crate::identity::spiffe_id(trust_domain, &namespace, &service_account).into(),
        name,
        namespace,
        workload_name,
        app,
        version,
        canonical_service,
        canonical_revision,
        labels: labels.clone(),
        node: pod.spec.node_name.as_deref().map(Into::into),
        service_account,
        ip,
        host_network: pod.spec.host_network,
        meshed,
        gateway,
        gateway_class: None,
        ready: phase_ok && ready_ok,
        named_ports,
        probe_ports,
        // Istio's per-pod switch of ambient DNS capture.
        dns_capture: pod.metadata.annotations.get(DNS_CAPTURE_ANNOTATION).is_none_or(|v| v.trim() != "false"),
        uid: pod.metadata.uid.as_deref().map(Into::into),
    })
}

/// The pod annotation that turns its DNS capture off (`"false"`), Istio's.
pub const DNS_CAPTURE_ANNOTATION: &str = "ambient.istio.io/dns-capture";

/// Whether a pod is a gateway, as Istio tells: gateway injection
/// (`inject.istio.io/templates` naming `gateway`, how Istio's own gateway
/// Deployments are written), or a Gateway API gateway's pod
/// (`gateway.networking.k8s.io/gateway-name`, set by automated deployment).
fn is_gateway(meta: &k8s::ObjectMeta) -> bool {
    let templates = meta.annotations.get("inject.istio.io/templates");
    templates.is_some_and(|t| t.split(',').any(|t| t.trim() == "gateway"))
        || meta.labels.contains_key("gateway.networking.k8s.io/gateway-name")
}

/// The ports that the kubelet's probes connect to on the pod's own address
/// (`httpGet`, `tcpSocket` and `grpc` with no `host`), a name resolved
/// against the probed container's ports as the kubelet resolves it. A name
/// that no port has is skipped: the kubelet cannot run that probe either.
fn probe_ports(ctx: &mut Ctx<'_>, spec: &k8s::PodSpec) -> Option<BTreeSet<u16>> {
    let mut out = BTreeSet::new();
    for (list, containers) in [("containers", &spec.containers), ("initContainers", &spec.init_containers)] {
        for (ci, c) in containers.iter().enumerate() {
            let probes = [
                ("livenessProbe", &c.liveness_probe),
                ("readinessProbe", &c.readiness_probe),
                ("startupProbe", &c.startup_probe),
            ];
            for (which, probe) in probes {
                let Some(probe) = probe else { continue };
                for (handler, target) in
                    [("httpGet", &probe.http_get), ("tcpSocket", &probe.tcp_socket), ("grpc", &probe.grpc)]
                {
                    let Some(target) = target.as_ref().filter(|t| t.host.as_deref().is_none_or(str::is_empty)) else {
                        continue;
                    };
                    let field = format!("spec.{list}[{ci}].{which}.{handler}.port");
                    let number = match &target.port {
                        k8s::IntOrString::Int(n) => Some(*n),
                        k8s::IntOrString::String(s) => s.parse().ok().or_else(|| {
                            c.ports.iter().find(|p| p.name.as_deref() == Some(s)).map(|p| p.container_port)
                        }),
                    };
                    if let Some(n) = number {
                        out.insert(parse_port(ctx, &field, n)?);
                    }
                }
            }
        }
    }
    Some(out)
}

pub(super) fn build_service(
    ctx: &mut Ctx<'_>,
    svc: &k8s::Service,
    workloads: &BTreeMap<String, Arc<Workload>>,
) -> Option<Service> {
    let name = require_name(ctx, &svc.metadata)?;
    let namespace: Arc<str> = svc.metadata.namespace.as_deref().unwrap_or("default").into();
    let vip = match svc.spec.cluster_ip.as_deref() {
        None | Some("None") | Some("") => None,
        Some(s) => Some(parse_ip(ctx, "spec.clusterIP", s)?),
    };
    let mut ports = Vec::new();
    let mut ok = true;
    for (i, p) in svc.spec.ports.iter().enumerate() {
        match build_service_port(ctx, i, p, svc.spec.ports.len()) {
            Some(port) => ports.push(port),
            None => ok = false,
        }
    }
    for (i, p) in ports.iter().enumerate() {
        if ports[..i].iter().any(|q| q.port == p.port && q.protocol == p.protocol) {
            ctx.error(format!("spec.ports[{i}].port"), format!("port {} is listed twice", p.port));
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    let endpoints = match &svc.spec.selector {
        // Pods are keyed `namespace/name`, so a namespace's are one range
        // (`/` sorts just before `0`): a Service looks at its namespace's pods
        // only (100 000 pods and 10 000 Services: 72 s to build scanning all,
        // `cargo xtask scale`).
        Some(sel) if !sel.is_empty() => workloads
            .range(format!("{namespace}/")..format!("{namespace}0"))
            .map(|(_, w)| w)
            .filter(|w| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .filter(|w| w.ip.is_some())
            .cloned()
            .collect(),
        _ => Vec::new(),
    };
    Some(Service {
        key: format!("{namespace}/{name}"),
        hostname: format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}").into(),
        name,
        namespace,
        vip,
        ports,
        endpoints,
        external: None,
        dns: None,
    })
}

fn build_service_port(ctx: &mut Ctx<'_>, i: usize, p: &k8s::ServicePort, count: usize) -> Option<ServicePort> {
    let port = parse_port(ctx, &format!("spec.ports[{i}].port"), p.port)?;
    let target = match &p.target_port {
        None => TargetPort::Number(port),
        Some(k8s::IntOrString::Int(t)) => {
            TargetPort::Number(parse_port(ctx, &format!("spec.ports[{i}].targetPort"), *t)?)
        }
        Some(k8s::IntOrString::String(s)) => match s.parse::<i64>() {
            Ok(t) => TargetPort::Number(parse_port(ctx, &format!("spec.ports[{i}].targetPort"), t)?),
            Err(_) if valid_port_name(s) => TargetPort::Name(s.clone()),
            Err(_) => {
                ctx.error(
                    format!("spec.ports[{i}].targetPort"),
                    format!("{s:?} is neither a port number nor a valid port name"),
                );
                return None;
            }
        },
    };
    let protocol = match p.protocol.as_deref() {
        None | Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => Protocol::Sctp,
        Some(other) => {
            ctx.error(format!("spec.ports[{i}].protocol"), format!("{other:?}: expected TCP, UDP or SCTP"));
            return None;
        }
    };
    if count > 1 && p.name.is_none() {
        ctx.error(format!("spec.ports[{i}].name"), "required when a Service has more than one port");
        return None;
    }
    Some(ServicePort { name: p.name.clone(), port, target, protocol, app_protocol: p.app_protocol.clone() })
}
