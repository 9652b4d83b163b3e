//! A cluster described once: each call makes the network namespaces (nodes,
//! pods) and writes the Kubernetes objects the agents read about them, so the
//! addresses in the YAML are the ones on the wire. The network tests, the demo
//! (`cargo xtask demo`) and the benchmark (`cargo xtask bench`) build their
//! clusters with it.
use std::net::Ipv4Addr;

use crate::Cluster;

/// The network namespaces of a cluster and its objects. It derefs to its
/// [`Cluster`], so a test uses it as one (`f.pod("test")`, `Agent::start(&f, …)`).
pub struct Fixture {
    pub cluster: Cluster,
    pub objects: Objects,
}

/// Kubernetes objects as one YAML stream, written by the same calls for every
/// test: the cluster YAML tests extend instead of copying a Node, Namespace
/// and Pod preamble.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    docs: Vec<String>,
}

/// MeshConfig (Istio's `istio` ConfigMap) with `outboundTrafficPolicy:
/// REGISTRY_ONLY`, for a cluster's YAML.
pub const REGISTRY_ONLY: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\n\
                                 data:\n  mesh: |\n    outboundTrafficPolicy:\n      mode: REGISTRY_ONLY\n";

/// What a pod is, beyond its name, node and address.
#[derive(Debug, Clone, Copy)]
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    /// `None`: the namespace's `default` account (no identity of its own).
    pub service_account: Option<&'a str>,
    pub labels: &'a [(&'a str, &'a str)],
    /// Named container ports (for Services whose `targetPort` is a name).
    pub ports: &'a [(&'a str, u16)],
    /// Annotations beside the gateway's.
    pub annotations: &'a [(&'a str, &'a str)],
    /// A gateway pod, as Istio's gateway injection marks one
    /// (`inject.istio.io/templates: gateway`): the node's agent serves it.
    pub gateway: bool,
}

impl PodSpec<'_> {
    /// A pod in `namespace` labelled `app: <app>`, running as service account `<app>`.
    pub fn app<'a>(namespace: &'a str, app: &'a [(&'a str, &'a str)]) -> PodSpec<'a> {
        let service_account = app.iter().find(|(k, _)| *k == "app").map(|(_, v)| *v);
        PodSpec { namespace, service_account, labels: app, ports: &[], gateway: false, annotations: &[] }
    }

    /// A gateway pod in `namespace` labelled `labels`, running as `service_account`.
    pub fn gateway<'a>(namespace: &'a str, labels: &'a [(&'a str, &'a str)], service_account: &'a str) -> PodSpec<'a> {
        PodSpec {
            namespace,
            service_account: Some(service_account),
            labels,
            ports: &[],
            gateway: true,
            annotations: &[],
        }
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

impl Objects {
    /// `node-1` (172.18.0.2, as [`Cluster::new`] makes it) and the meshed
    /// namespace `demo`: what the single-node tests start from.
    pub fn demo() -> Objects {
        let mut o = Objects::default();
        o.node("node-1", Ipv4Addr::new(172, 18, 0, 2), &[]).namespace("demo", true);
        o
    }

    /// A Node with its InternalIP.
    pub fn node(&mut self, name: &str, ip: Ipv4Addr, labels: &[(&str, &str)]) -> &mut Self {
        let labels = match labels {
            [] => String::new(),
            l => format!(", labels: {}", map(l)),
        };
        self.docs.push(format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}{labels}}}\n\
             status: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n"
        ));
        self
    }

    /// Gives Node `node` (written before) its pods' range, `spec.podCIDR`.
    pub fn pod_cidr(&mut self, node: &str, cidr: &str) -> &mut Self {
        let doc = self.node_doc(node);
        *doc = doc.replacen("status:", &format!("spec: {{podCIDR: {cidr}}}\nstatus:"), 1);
        self
    }

    /// Node `node`'s document, written before.
    fn node_doc(&mut self, node: &str) -> &mut String {
        let head = format!("kind: Node\nmetadata: {{name: {node}");
        self.docs.iter_mut().find(|d| d.contains(&head)).unwrap_or_else(|| panic!("no Node {node}"))
    }

    /// Adds label `key: value` to Node `node` (written before).
    pub fn label_node(&mut self, node: &str, key: &str, value: &str) -> &mut Self {
        let head = format!("kind: Node\nmetadata: {{name: {node}");
        let doc = self.node_doc(node);
        *doc = match doc.contains(", labels: {") {
            true => doc.replacen(", labels: {", &format!(", labels: {{{key}: {value}, "), 1),
            false => doc.replacen(&head, &format!("{head}, labels: {{{key}: {value}}}"), 1),
        };
        self
    }

    /// A namespace, enrolled in the mesh (ambient) or not.
    pub fn namespace(&mut self, name: &str, meshed: bool) -> &mut Self {
        let labels = if meshed { ", labels: {istio.io/dataplane-mode: ambient}" } else { "" };
        self.docs.push(format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}{labels}}}\n"));
        self
    }

    /// A pod on `node` at `ip`, Running and Ready.
    pub fn pod(&mut self, node: &str, name: &str, ip: Ipv4Addr, spec: PodSpec<'_>) -> &mut Self {
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
        let mut annotations: Vec<(&str, &str)> = spec.annotations.to_vec();
        if spec.gateway {
            annotations.push(("inject.istio.io/templates", "gateway"));
        }
        let annotations = match annotations.as_slice() {
            [] => String::new(),
            a => format!(", annotations: {}", map(a)),
        };
        self.docs.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {}{labels}{annotations}}}\n\
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

    /// A LoadBalancer Service selecting pods by `selector` (its cluster IP
    /// `vip`), its load balancer's address `lb` in its status, as a cloud
    /// controller writes it.
    pub fn load_balancer(
        &mut self,
        namespace: &str,
        name: &str,
        vip: &str,
        lb: Ipv4Addr,
        selector: &[(&str, &str)],
        ports: &[u16],
    ) -> &mut Self {
        let ports: Vec<String> = ports.iter().map(|p| format!("{{name: tcp-{p}, port: {p}}}")).collect();
        self.docs.push(format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
             spec: {{type: LoadBalancer, clusterIP: {vip}, selector: {}, ports: [{}]}}\n\
             status: {{loadBalancer: {{ingress: [{{ip: {lb}}}]}}}}\n",
            map(selector),
            ports.join(", ")
        ));
        self
    }

    /// Any other object (a pod with owners or probes, a policy), as one YAML document.
    pub fn object(&mut self, yaml: &str) -> &mut Self {
        self.docs.push(yaml.trim_start().trim_start_matches("---").trim_start_matches('\n').to_owned());
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

impl Fixture {
    /// `node-1` and `node-2` (see [`Cluster::two_nodes`]) with the labels given.
    pub fn two_nodes(labels: [&[(&str, &str)]; 2]) -> Fixture {
        Fixture::of(Cluster::two_nodes(), &labels)
    }

    /// `node-1` alone (see [`Cluster::new`]) with the meshed namespace `demo`:
    /// the single-node tests' cluster.
    pub fn one_node() -> Fixture {
        let mut f = Fixture::of(Cluster::new(), &[&[]]);
        f.objects.namespace("demo", true);
        f
    }

    fn of(cluster: Cluster, labels: &[&[(&str, &str)]]) -> Fixture {
        let mut objects = Objects::default();
        for (node, labels) in cluster.nodes.iter().zip(labels) {
            objects.node(&node.name, node.ip, labels);
        }
        Fixture { cluster, objects }
    }

    /// A namespace, enrolled in the mesh (ambient) or not.
    pub fn namespace(&mut self, name: &str, meshed: bool) -> &mut Self {
        self.objects.namespace(name, meshed);
        self
    }

    /// A gateway pod (`spec` from [`PodSpec::gateway`]) on node `node` at
    /// `ip`, behind a LoadBalancer Service `name` (cluster IP `vip`) at `lb`, as a cluster puts
    /// one in front of Istio's gateways: the cluster network routes `lb` to
    /// that node, where kube-proxy-style DNAT sends it to the pod (the
    /// Service lists `ports`).
    pub fn gateway(
        &mut self,
        node: usize,
        name: &str,
        ip: Ipv4Addr,
        spec: PodSpec<'_>,
        (vip, lb): (&str, Ipv4Addr),
        ports: &[u16],
    ) -> &mut Self {
        let (namespace, labels) = (spec.namespace, spec.labels);
        self.add_pod(node, name, ip, spec);
        self.objects.load_balancer(namespace, name, vip, lb, labels, ports);
        self.cluster.load_balancer(node, lb, ip);
        self
    }

    /// A pod on node `node` (0-based) at `ip`: its namespace on the wire and
    /// its object, Running and Ready.
    pub fn add_pod(&mut self, node: usize, name: &str, ip: Ipv4Addr, spec: PodSpec<'_>) -> &mut Self {
        self.cluster.add_pod_on(node, name, ip);
        let node = self.cluster.nodes[node].name.clone();
        self.objects.pod(&node, name, ip, spec);
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
        self.objects.service(namespace, name, vip, selector, ports);
        self
    }

    /// Any other object, as one YAML document.
    pub fn object(&mut self, yaml: &str) -> &mut Self {
        self.objects.object(yaml);
        self
    }

    /// The objects as one YAML stream, followed by `extra`.
    pub fn yaml(&self, extra: &str) -> String {
        self.objects.yaml(extra)
    }
}

impl std::ops::Deref for Fixture {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl std::ops::DerefMut for Fixture {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }
}

/// One node: `test` (10.244.0.2) in the meshed namespace `demo`, and the
/// helloworld pod `name` (10.244.0.3, `labels`, served: HTTP on 9095, echo on
/// 7000) behind the Service `helloworld` (10.96.0.10: `http` 9095,
/// `tcp-echo` 7000).
pub fn hello_one_node(name: &str, labels: &[(&str, &str)]) -> Fixture {
    let mut c = Fixture::one_node();
    let hello = PodSpec { ports: &[("http", 9095), ("echo", 7000)], ..PodSpec::app("demo", labels) };
    let ports = [Port { name: "http", port: 9095, target: None }, Port { name: "tcp-echo", port: 7000, target: None }];
    c.add_pod(0, "test", Ipv4Addr::new(10, 244, 0, 2), PodSpec::app("demo", &[("app", "test")]))
        .add_pod(0, name, Ipv4Addr::new(10, 244, 0, 3), hello)
        .service("demo", "helloworld", "10.96.0.10", &[("app", "helloworld")], &ports);
    crate::servers::http_hello(c.pod(name), 9095);
    crate::servers::echo(c.pod(name), 7000);
    c
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
