//! What the DNS proxy answers itself: the names the mesh knows, as a pod of
//! namespace `client` sees them (ztunnel's rules): a Kubernetes Service's
//! `name.namespace.svc.cluster.local` (its clusterIP; a headless Service's
//! ready endpoints), and a ServiceEntry's exact host (its first address, or
//! the address allocated to it), the client's own namespace's entry first,
//! then the oldest it sees (`exportTo`). Anything else is not the mesh's.
use std::net::Ipv4Addr;

use crate::state::{CLUSTER_DOMAIN, Resolution, State};

/// The IPv4 addresses of `name` (any case, with or without the final dot)
/// that the mesh answers for, or `None`: forward it.
pub fn local_answer(state: &State, client: Option<&str>, name: &str) -> Option<Vec<Ipv4Addr>> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if let Some(svc) = kubernetes_service(state, &name) {
        return Some(match svc.vip {
            Some(vip) => vec![vip],
            None => svc.endpoints.iter().filter(|w| w.ready).filter_map(|w| w.ip).collect(),
        });
    }
    let entry = state.external_by_host.get(&name).and_then(|list| crate::state::prefer_own(list, client))?;
    let external = entry.external.as_ref()?;
    // NONE goes where the application dials: the name's public answer.
    if external.resolution == Resolution::None && external.addresses.is_empty() {
        return None;
    }
    external.addresses.first().copied().or(entry.vip).map(|ip| vec![ip])
}

/// The Service `name.namespace.svc.<cluster domain>` names.
fn kubernetes_service<'a>(state: &'a State, name: &str) -> Option<&'a std::sync::Arc<crate::state::Service>> {
    let rest = name.strip_suffix(CLUSTER_DOMAIN)?.strip_suffix(".svc.")?;
    let (service, namespace) = rest.split_once('.')?;
    state.services.get(&format!("{namespace}/{service}")).filter(|s| s.external.is_none())
}

#[cfg(test)]
mod tests {
    use super::local_answer;

    const YAML: &str = "\
apiVersion: v1
kind: Service
metadata: {name: helloworld, namespace: demo}
spec: {clusterIP: 10.96.0.20, selector: {app: helloworld}, ports: [{port: 5000, name: http}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: demo}
spec: {hosts: [api.example.com], addresses: [198.51.100.10], ports: [{number: 443, name: tls, protocol: TLS}], resolution: NONE}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: demo}
spec: {hosts: [db.internal], ports: [{number: 5432, name: tcp, protocol: TCP}], resolution: STATIC, endpoints: [{address: 192.0.2.5}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: ops, creationTimestamp: \"2025-01-01T00:00:00Z\"}
spec: {hosts: [db.internal], exportTo: [.], ports: [{number: 5432, name: tcp, protocol: TCP}], resolution: STATIC, endpoints: [{address: 192.0.2.6}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: public, namespace: demo}
spec: {hosts: [www.example.org, \"*.wild.example\"], ports: [{number: 80, name: http, protocol: HTTP}], resolution: NONE}
";

    #[test]
    fn the_mesh_answers_for_its_services_and_entries_as_the_client_sees_them() {
        let state = crate::config::state_from_yaml(YAML);
        let ask = |client: &str, name: &str| {
            local_answer(&state, Some(client), name).map(|a| a.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        let one = |s: &str| Some(vec![s.to_owned()]);
        assert_eq!(ask("demo", "helloworld.demo.svc.cluster.local."), one("10.96.0.20"));
        assert_eq!(ask("other", "HelloWorld.Demo.svc.cluster.local"), one("10.96.0.20"), "any case, any namespace");
        assert_eq!(ask("demo", "helloworld.demo.svc.cluster.local.demo.svc.cluster.local"), None);
        assert_eq!(ask("demo", "nothere.demo.svc.cluster.local"), None, "forwarded: the cluster's DNS decides");
        assert_eq!(ask("demo", "api.example.com"), one("198.51.100.10"), "an entry's address");
        // No address listed: the one allocated to it (240.240.0.0/16), the
        // same for every client that sees the entry.
        let db = ask("demo", "db.internal").expect("an allocated address");
        assert!(db[0].starts_with("240.240."), "{db:?}");
        assert_eq!(ask("default", "db.internal"), Some(db.clone()));
        // ops has its own (exported to ops alone): its clients get that one.
        let ops = ask("ops", "db.internal").expect("ops's own entry");
        assert_ne!(ops, db);
        assert!(ops[0].starts_with("240.240."), "{ops:?}");
        // NONE without addresses, and wildcards: the public answer.
        assert_eq!(ask("demo", "www.example.org"), None);
        assert_eq!(ask("demo", "a.wild.example"), None);
        assert_eq!(ask("demo", "example.net"), None);
        // Allocated addresses route like listed ones.
        let ip: std::net::Ipv4Addr = db[0].parse().expect("an address");
        let routed = state.service_for(std::net::SocketAddrV4::new(ip, 5432), Some("demo")).expect("routed");
        assert_eq!(&*routed.namespace, "demo");
    }
}
