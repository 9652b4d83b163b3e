//! A cluster described once: each call makes the network namespaces (nodes,
//! pods) and writes the Kubernetes objects the agents read about them, so the
//! addresses in the YAML are the ones on the wire. The network tests, the demo
//! (`cargo xtask demo`) and the benchmark (`cargo xtask bench`) build their
//! clusters with it.
use std::net::Ipv4Addr;

use crate::Cluster;

/// The network namespaces of a cluster and its objects.
pub struct Fixture {
    pub cluster: Cluster,
    docs: Vec<String>,
}

/// What a pod is, beyond its name, node and address.
#[derive(Debug, Clone, Copy)]
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    /// `None`: the namespace's `default` account (no identity of its own).
    pub service_account: Option<&'a str>,
    pub labels: &'a [(&'a str, &'a str)],
    /// Named container ports (for Services whose `targetPort` is a name).
    pub ports: &'a [(&'a str, u16)],
}

impl PodSpec<'_> {
    /// A pod in `namespace` labelled `app: <app>`, running as service account `<app>`.
    pub fn app<'a>(namespace: &'a str, app: &'a [(&'a str, &'a str)]) -> PodSpec<'a> {
        let service_account = app.iter().find(|(k, _)| *k == "app").map(|(_, v)| *v);
        PodSpec { namespace, service_account, labels: app, ports: &[] }
    }
}

/// One port of a Service.
#[derive(Debug, Clone, Copy)]
pub struct Port<'a> {
    pub name: &'a str,
    pub port: u16,
    /// A number, a container port's name, or `None` (the same as `port`).
    pub target: Option<&'a str>,
}

impl Fixture {
    /// `node-1` and `node-2` (see [`Cluster::two_nodes`]) with the labels given.
    pub fn two_nodes(labels: [&[(&str, &str)]; 2]) -> Fixture {
        let cluster = Cluster::two_nodes();
        let docs = cluster
            .nodes
            .iter()
            .zip(labels)
            .map(|(node, labels)| {
                let labels = match labels {
                    [] => String::new(),
                    l => format!(", labels: {}", map(l)),
                };
                format!(
                    "apiVersion: v1\nkind: Node\nmetadata: {{name: {}{labels}}}\n\
                     status: {{addresses: [{{type: InternalIP, address: {}}}]}}\n",
                    node.name, node.ip
                )
            })
            .collect();
        Fixture { cluster, docs }
    }

    /// A namespace, enrolled in the mesh (ambient) or not.
    pub fn namespace(&mut self, name: &str, meshed: bool) -> &mut Self {
        let labels = if meshed { ", labels: {istio.io/dataplane-mode: ambient}" } else { "" };
        self.docs.push(format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}{labels}}}\n"));
        self
    }

    /// A pod on node `node` (0-based) at `ip`: its namespace on the wire and
    /// its object, Running and Ready.
    pub fn pod(&mut self, node: usize, name: &str, ip: Ipv4Addr, spec: PodSpec<'_>) -> &mut Self {
        self.cluster.add_pod_on(node, name, ip);
        let node = &self.cluster.nodes[node].name;
        let labels = match spec.labels {
            [] => String::new(),
            l => format!(", labels: {}", map(l)),
        };
        let account = spec.service_account.map(|sa| format!(", serviceAccountName: {sa}")).unwrap_or_default();
        let containers = match spec.ports {
            [] => String::new(),
            ports => {
                let ports: Vec<String> =
                    ports.iter().map(|(n, p)| format!("{{name: {n}, containerPort: {p}}}")).collect();
                format!(", containers: [{{name: main, ports: [{}]}}]", ports.join(", "))
            }
        };
        self.docs.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {}{labels}}}\n\
             spec: {{nodeName: {node}{account}{containers}}}\n\
             status: {{podIP: {ip}, phase: Running, conditions: [{{type: Ready, status: \"True\"}}]}}\n",
            spec.namespace
        ));
        self
    }

    /// A ClusterIP Service selecting pods by `selector`.
    pub fn service(
        &mut self,
        namespace: &str,
        name: &str,
        vip: &str,
        selector: &[(&str, &str)],
        ports: &[Port<'_>],
    ) -> &mut Self {
        let ports: Vec<String> = ports
            .iter()
            .map(|p| match p.target {
                Some(t) => format!("{{name: {}, port: {}, targetPort: {t}}}", p.name, p.port),
                None => format!("{{name: {}, port: {}}}", p.name, p.port),
            })
            .collect();
        self.docs.push(format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
             spec: {{clusterIP: {vip}, selector: {}, ports: [{}]}}\n",
            map(selector),
            ports.join(", ")
        ));
        self
    }

    /// The objects as one YAML stream, followed by `extra` (more documents,
    /// each starting with `---`).
    pub fn yaml(&self, extra: &str) -> String {
        let mut out = self.docs.join("---\n");
        if !extra.is_empty() {
            if !extra.trim_start().starts_with("---") {
                out.push_str("---\n");
            }
            out.push_str(extra);
        }
        out
    }
}

/// A port with a target.
pub fn port<'a>(name: &'a str, port: u16, target: &'a str) -> Port<'a> {
    Port { name, port, target: Some(target) }
}

/// `{k: v, …}`.
fn map(pairs: &[(&str, &str)]) -> String {
    let items: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!("{{{}}}", items.join(", "))
}
