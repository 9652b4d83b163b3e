//! `networking.istio.io/v1` `ServiceEntry` (services outside the cluster, or
//! not in Kubernetes) and the mesh-wide `outboundTrafficPolicy`, read where
//! Istio keeps it: the `mesh` key of ConfigMap `istio` in `istio-system`.
//!
//! Each host of a ServiceEntry becomes a [`Service`] keyed `namespace/host`, so
//! that VirtualService and DestinationRule rules, metrics and balancing treat it
//! like any other Service. Its endpoints are pods-to-be-called that carry no
//! identity (Istio reports them as `unknown`).
use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use serde::Deserialize;

use super::{
    k8s::ObjectMeta,
    object::{Ctx, name_and_namespace},
};
use crate::state::{
    External, Location, Protocol, Resolution, Service, ServicePort, TargetPort, Workload,
    dns::{DnsEndpoints, DnsNames},
    security::Cidr,
};

type Unsupported = Option<serde_yaml_ng::Value>;
const NOT_YET: &str = "not supported by this version of mesh-agent";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceEntryObject {
    #[allow(dead_code)]
    pub api_version: String,
    #[allow(dead_code)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceEntrySpec,
    #[allow(dead_code)]
    pub status: Unsupported,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<SePortSpec>,
    pub location: Option<String>,
    pub resolution: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<SeEndpointSpec>,
    pub export_to: Option<Vec<String>>,
    pub subject_alt_names: Option<Vec<String>>,
    pub workload_selector: Option<WorkloadSelectorSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSelectorSpec {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SePortSpec {
    pub number: i64,
    #[serde(default)]
    pub protocol: String,
    pub name: Option<String>,
    pub target_port: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SeEndpointSpec {
    pub address: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub ports: Unsupported,
    pub network: Unsupported,
    pub locality: Unsupported,
    pub weight: Unsupported,
    pub service_account: Unsupported,
}

pub(super) fn build_service_entry(
    ctx: &mut Ctx<'_>,
    obj: &ServiceEntryObject,
    workloads: &BTreeMap<String, Arc<Workload>>,
) -> Option<Vec<Service>> {
    let (name, namespace) = name_and_namespace(ctx, &obj.metadata)?;
    let before = ctx.error_count();
    let spec = &obj.spec;
    let export_to = super::networking::export_to(ctx, spec.export_to.as_deref(), &namespace);
    let subject_alt_names = spec.subject_alt_names.clone().unwrap_or_default();
    // The identities the entry's endpoints must prove (Istio verifies them
    // on the mTLS to the endpoints): only mesh endpoints prove one here.
    if !subject_alt_names.is_empty() && spec.workload_selector.is_none() {
        ctx.error(
            "spec.subjectAltNames",
            "verified on the mesh's mTLS to the entry's pods: only with workloadSelector (other endpoints prove no identity; a DestinationRule's tls.subjectAltNames checks a server's certificate)",
        );
    }
    if spec.hosts.is_empty() {
        ctx.error("spec.hosts", "at least one host is required");
    }
    // A host name, or a wildcard `*.suffix` (requests and TLS naming a
    // host under it are the entry's; the most specific entry wins).
    for (i, h) in spec.hosts.iter().enumerate() {
        let name = h.strip_prefix("*.").unwrap_or(h);
        if name.is_empty() || name.contains(['/', '*']) || name.starts_with('.') || name.ends_with('.') {
            ctx.error(format!("spec.hosts[{i}]"), format!("{h:?}: expected a host name or a wildcard *.domain"));
        }
    }
    let wildcard = spec.hosts.iter().any(|h| h.starts_with("*."));
    // Addresses and ranges (Istio's `addresses`: IPs or CIDR blocks); a /32
    // is an address.
    let (mut addresses, mut ranges) = (Vec::new(), Vec::new());
    for (i, a) in spec.addresses.iter().enumerate() {
        match Cidr::parse(a) {
            Ok(c) if c.prefix == 32 => addresses.push(c.addr),
            // Host bits are ignored, as Istio's prefix parsing and Envoy's ranges do.
            Ok(c) => {
                ranges.push(Cidr { addr: Ipv4Addr::from(u32::from(c.addr) & prefix_mask(c.prefix)), prefix: c.prefix })
            }
            Err(_) => ctx.error(
                format!("spec.addresses[{i}]"),
                format!("{a:?}: expected an IPv4 address or CIDR range (IPv6 is {NOT_YET})"),
            ),
        }
    }
    addresses.dedup();
    let location = match spec.location.as_deref() {
        None | Some("MESH_EXTERNAL") => Location::MeshExternal,
        Some("MESH_INTERNAL") => Location::MeshInternal,
        Some(other) => {
            ctx.error("spec.location", format!("{other:?}: expected MESH_EXTERNAL or MESH_INTERNAL"));
            Location::MeshExternal
        }
    };
    let resolution = match spec.resolution.as_deref() {
        None | Some("NONE") => Resolution::None,
        Some("STATIC") => Resolution::Static,
        Some("DNS" | "DNS_ROUND_ROBIN") => Resolution::Dns,
        Some("DYNAMIC_DNS") => Resolution::DynamicDns,
        Some(other) => {
            ctx.error(
                "spec.resolution",
                format!("{other:?}: expected NONE, STATIC, DNS, DNS_ROUND_ROBIN or DYNAMIC_DNS"),
            );
            Resolution::None
        }
    };
    if wildcard && resolution == Resolution::Dns && spec.endpoints.is_empty() {
        ctx.error(
            "spec.resolution",
            "DNS resolution of a wildcard host needs endpoints: a wildcard names no one host to resolve",
        );
    }
    let ports = se_ports(ctx, &spec.ports);
    if resolution == Resolution::DynamicDns {
        dynamic_dns(ctx, spec, &ports);
    }
    let (endpoints, names) = match &spec.workload_selector {
        None => endpoints(ctx, spec, &namespace, resolution),
        Some(selector) => (selected(ctx, spec, selector, &namespace, resolution, workloads), Vec::new()),
    };
    let first_only = spec.resolution.as_deref() == Some("DNS_ROUND_ROBIN");
    if resolution == Resolution::None && !spec.endpoints.is_empty() {
        ctx.error("spec.endpoints", "resolution NONE takes no endpoints (the original destination is used)");
    }
    if ctx.error_count() != before {
        return None;
    }
    let external = Arc::new(External {
        entry: format!("{namespace}/{name}"),
        created: obj.metadata.creation_timestamp.clone(),
        location,
        resolution,
        addresses: addresses.clone(),
        ranges,
        export_to,
        subject_alt_names: subject_alt_names.into_iter().map(Into::into).collect(),
        unknown: Arc::new(Workload::outside(&namespace, None, BTreeMap::new())),
    });
    // Each host resolves on its own when the entry lists no endpoints.
    let dns = |host: &str| {
        (resolution == Resolution::Dns).then(|| {
            let names = if spec.endpoints.is_empty() { vec![(host.into(), BTreeMap::new())] } else { names.clone() };
            Arc::new(DnsEndpoints::new(names, endpoints.clone(), namespace.clone(), first_only))
        })
    };
    let services = spec
        .hosts
        .iter()
        .map(|host| Service {
            key: format!("{namespace}/{host}"),
            name: host.as_str().into(),
            namespace: namespace.clone(),
            hostname: host.as_str().into(),
            vip: addresses.first().copied(),
            ports: ports.clone(),
            endpoints: endpoints.clone(),
            external: Some(external.clone()),
            dns: dns(host),
        })
        .collect();
    Some(services)
}

/// What `DYNAMIC_DNS` needs (as Istio validates it): wildcard hosts only
/// (the request names the host to resolve), no endpoints and no addresses,
/// and ports whose traffic names a host (HTTP's `Host`, TLS's SNI).
fn dynamic_dns(ctx: &mut Ctx<'_>, spec: &ServiceEntrySpec, ports: &[ServicePort]) {
    if let Some(i) = spec.hosts.iter().position(|h| !h.starts_with("*.")) {
        ctx.error(format!("spec.hosts[{i}]"), "DYNAMIC_DNS resolves the host each request names: wildcard hosts only");
    }
    if !spec.endpoints.is_empty() || spec.workload_selector.is_some() {
        ctx.error("spec.endpoints", "DYNAMIC_DNS takes no endpoints (the request's host is resolved)");
    }
    if !spec.addresses.is_empty() {
        ctx.error("spec.addresses", "DYNAMIC_DNS takes no addresses");
    }
    for (i, p) in ports.iter().enumerate() {
        if matches!(p.app_protocol.as_deref(), Some("tcp" | "mongo" | "mysql" | "redis")) {
            ctx.error(
                format!("spec.ports[{i}].protocol"),
                "DYNAMIC_DNS needs the host the traffic names: HTTP, HTTP2, GRPC, HTTPS or TLS",
            );
        }
    }
}

/// The network mask of a prefix length.
fn prefix_mask(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) }
}

fn se_ports(ctx: &mut Ctx<'_>, specs: &[SePortSpec]) -> Vec<ServicePort> {
    if specs.is_empty() {
        ctx.error("spec.ports", "at least one port is required");
    }
    let mut ports: Vec<ServicePort> = Vec::new();
    for (i, p) in specs.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let Some(number) = u16::try_from(p.number).ok().filter(|n| *n != 0) else {
            ctx.error(format!("{field}.number"), format!("port {} is out of range 1-65535", p.number));
            continue;
        };
        let target = match p.target_port.map(u16::try_from) {
            None => number,
            Some(Ok(t)) if t != 0 => t,
            Some(_) => {
                ctx.error(format!("{field}.targetPort"), "out of range 1-65535");
                continue;
            }
        };
        // Istio's protocols map onto the names protocol detection knows.
        let app_protocol = match p.protocol.to_ascii_uppercase().as_str() {
            "HTTP" => "http",
            "HTTP2" => "http2",
            "GRPC" => "grpc",
            "HTTPS" => "https",
            "TLS" => "tls",
            "TCP" | "" => "tcp",
            "MONGO" => "mongo",
            "MYSQL" => "mysql",
            "REDIS" => "redis",
            other => {
                ctx.error(
                    format!("{field}.protocol"),
                    format!("{other:?}: expected HTTP, HTTP2, GRPC, HTTPS, TLS or TCP"),
                );
                continue;
            }
        };
        if ports.iter().any(|q| q.port == number) {
            ctx.error(format!("{field}.number"), format!("port {number} is listed twice"));
            continue;
        }
        ports.push(ServicePort {
            name: p.name.clone(),
            port: number,
            target: TargetPort::Number(target),
            protocol: Protocol::Tcp,
            app_protocol: Some(app_protocol.into()),
        });
    }
    ports
}

/// The endpoints given as addresses (STATIC: IPv4; DNS: names or
/// addresses), and for DNS the names to resolve with their labels. Nothing is
/// resolved here: the agent's resolver does it off the control loop, so a
/// slow or failing DNS server never holds a configuration back.
fn endpoints(
    ctx: &mut Ctx<'_>,
    spec: &ServiceEntrySpec,
    namespace: &Arc<str>,
    res: Resolution,
) -> (Vec<Arc<Workload>>, DnsNames) {
    let (mut out, mut names) = (Vec::new(), Vec::new());
    for (i, e) in spec.endpoints.iter().enumerate() {
        let field = format!("spec.endpoints[{i}]");
        for (f, v) in [
            ("ports", &e.ports),
            ("network", &e.network),
            ("locality", &e.locality),
            ("weight", &e.weight),
            ("serviceAccount", &e.service_account),
        ] {
            if v.is_some() {
                ctx.error(format!("{field}.{f}"), NOT_YET);
            }
        }
        let Some(address) = e.address.as_deref() else {
            ctx.error(format!("{field}.address"), "required");
            continue;
        };
        match (address.parse::<Ipv4Addr>(), res) {
            (Ok(ip), _) => {
                if !out.iter().any(|w: &Arc<Workload>| w.ip == Some(ip)) {
                    out.push(Arc::new(Workload::outside(namespace, Some(ip), e.labels.clone())));
                }
            }
            (Err(_), Resolution::Dns) if is_dns_name(address) => names.push((address.into(), e.labels.clone())),
            (Err(_), Resolution::Dns) => {
                ctx.error(
                    format!("{field}.address"),
                    format!("{address:?} is neither an IPv4 address nor a host name"),
                );
            }
            (Err(_), _) => ctx.error(format!("{field}.address"), format!("{address:?} is not an IPv4 address")),
        }
    }
    if spec.endpoints.is_empty() && res == Resolution::Static {
        ctx.error("spec.endpoints", "resolution STATIC needs endpoints");
    }
    (out, names)
}

/// A name DNS can be asked about: dot-separated labels of letters, digits,
/// `-` and `_`, each 1 to 63 bytes, 253 in all.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    name.len() <= 253
        && name.split('.').all(|l| {
            (1..=63).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `workloadSelector`: the pods of the entry's namespace whose labels
/// include the selector's (a mesh workload behind a host of its own: its
/// identity, mTLS and telemetry are the pod's).
fn selected(
    ctx: &mut Ctx<'_>,
    spec: &ServiceEntrySpec,
    selector: &WorkloadSelectorSpec,
    namespace: &Arc<str>,
    resolution: Resolution,
    workloads: &BTreeMap<String, Arc<Workload>>,
) -> Vec<Arc<Workload>> {
    if !spec.endpoints.is_empty() {
        ctx.error("spec.workloadSelector", "only one of workloadSelector and endpoints (as Istio)");
    }
    if selector.labels.is_empty() {
        ctx.error("spec.workloadSelector.labels", "empty: it would select every pod of the namespace");
    }
    if resolution != Resolution::Static {
        ctx.error("spec.resolution", "a workloadSelector's endpoints are its pods: resolution STATIC");
    }
    let selects = |w: &&Arc<Workload>| {
        w.namespace == *namespace && w.ip.is_some() && selector.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
    };
    workloads.values().filter(selects).cloned().collect()
}
