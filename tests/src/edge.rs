//! The two-node cluster with the mesh's edges that the gateway tests share:
//! Istio's ingress gateway as a pod on node-1 behind a LoadBalancer address
//! (HTTP, HTTPS from a Secret, TCP, TLS passthrough), its egress gateway as a
//! pod on node-2 behind a ClusterIP Service, ServiceEntries under
//! REGISTRY_ONLY, TLS origination, and servers outside the cluster.
use std::{net::Ipv4Addr, path::PathBuf};

use crate::{
    Agent, Cluster, Pod,
    agent::{CaService, metric},
    certs::Certs,
    fixture::{Fixture, PodSpec, Port, port},
    netns::Background,
    servers,
};

pub const TEST_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
/// A meshed pod of another tenant, namespace `attacker`, on node-1.
pub const INTRUDER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 9);
pub const HELLO_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
/// A server outside the cluster, on the cluster network's namespace.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 200, 2);
pub const NODE1: &str = "172.18.0.2";
pub const NODE2: &str = "172.18.1.2";
/// The ingress gateway pod (node-1) and its LoadBalancer Service's address.
pub const INGRESS_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 100);
pub const INGRESS_LB: Ipv4Addr = Ipv4Addr::new(172, 18, 100, 1);
/// The ingress gateway Service's cluster IP (for clients in the mesh).
pub const INGRESS_VIP: &str = "10.96.0.40";
/// [`INGRESS_LB`] as URLs and `--resolve` write it.
pub const INGRESS: &str = "172.18.100.1";
/// The egress gateway pod (node-2).
pub const EGRESS_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 100);
/// What Istio's gateway Deployments run as.
pub const INGRESS_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account";
pub const EGRESS_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/istio-egressgateway-service-account";

/// node-1 runs the ingress gateway pod, node-2 the egress gateway pod (as
/// Istio's manifests deploy them: labels `istio: ingressgateway` and
/// `istio: egressgateway`, gateway injection); `test` on node-1 and
/// `helloworld` on node-2 are meshed (namespace `demo`), and so is
/// `intruder` on node-1, another tenant's pod (namespace `attacker`).
pub fn fixture() -> Fixture {
    let mut f = Fixture::two_nodes([&[], &[]]);
    let ingress = [("app", "istio-ingressgateway"), ("istio", "ingressgateway")];
    let spec = PodSpec::gateway("istio-system", &ingress, "istio-ingressgateway-service-account");
    f.gateway(0, "istio-ingressgateway", INGRESS_IP, spec, (INGRESS_VIP, INGRESS_LB), &[80, 443, 9000, 9443]);
    let egress = [("app", "istio-egressgateway"), ("istio", "egressgateway")];
    let spec = PodSpec::gateway("istio-system", &egress, "istio-egressgateway-service-account");
    f.add_pod(1, "istio-egressgateway", EGRESS_IP, spec).service(
        "istio-system",
        "istio-egressgateway",
        "10.96.0.50",
        &egress[1..],
        &[Port { name: "http", port: 80, target: None }, Port { name: "https", port: 443, target: None }],
    );
    f.namespace("attacker", true).add_pod(0, "intruder", INTRUDER_IP, PodSpec::app("attacker", &[("app", "intruder")]));
    f.namespace("demo", true).add_pod(0, "test", TEST_IP, PodSpec::app("demo", &[("app", "test")])).add_pod(
        1,
        "helloworld",
        HELLO_IP,
        PodSpec::app("demo", &[("app", "helloworld"), ("version", "v1")]),
    );
    let ports = [
        port("http", 5000, "9095"),
        Port { name: "tcp-echo", port: 7000, target: None },
        Port { name: "tls", port: 8443, target: None },
    ];
    f.service("demo", "helloworld", "10.96.0.10", &[("app", "helloworld")], &ports);
    f
}

/// The [`fixture`]'s objects (`base`) and the edge: outbound traffic is
/// REGISTRY_ONLY; `direct.example` and `external.example` are ServiceEntries
/// for the outside server, `secure.example` one with TLS originated to it.
pub fn config(base: &str, secret: &str, ca_secret: &str, extra: &str) -> String {
    format!(
        r#"{base}---
apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
---
apiVersion: v1
kind: Secret
metadata: {{name: hello-cert, namespace: istio-system}}
type: kubernetes.io/tls
stringData:
{secret}---
apiVersion: v1
kind: Secret
metadata: {{name: external-ca, namespace: demo}}
stringData:
{ca_secret}---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: ingress, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: ["*"]
  - port: {{number: 443, name: https, protocol: HTTPS}}
    hosts: [hello.example.com]
    tls: {{mode: SIMPLE, credentialName: hello-cert}}
  - port: {{number: 9000, name: tcp, protocol: TCP}}
    hosts: ["*"]
  - port: {{number: 9443, name: tls, protocol: TLS}}
    hosts: [passthrough.example]
    tls: {{mode: PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: passthrough, namespace: demo}}
spec:
  hosts: [passthrough.example]
  gateways: [istio-system/ingress]
  tls:
  - match: [{{port: 9443, sniHosts: [passthrough.example]}}]
    route: [{{destination: {{host: helloworld, port: {{number: 8443}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: demo}}
spec:
  hosts: ["*"]
  gateways: [istio-system/ingress]
  tcp:
  - match: [{{port: 9000}}]
    route: [{{destination: {{host: helloworld, port: {{number: 7000}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: helloworld, namespace: demo}}
spec:
  hosts: ["*"]
  gateways: [istio-system/ingress]
  http:
  - match: [{{uri: {{prefix: /helloworld}}}}]
    route: [{{destination: {{host: helloworld, port: {{number: 5000}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: direct, namespace: demo}}
spec:
  hosts: [direct.example]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  location: MESH_EXTERNAL
  endpoints: [{{address: {EXTERNAL_IP}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external, namespace: demo}}
spec:
  hosts: [external.example]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: DNS
  endpoints: [{{address: {EXTERNAL_IP}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure, namespace: demo}}
spec:
  hosts: [secure.example]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8443}}]
  resolution: STATIC
  endpoints: [{{address: {EXTERNAL_IP}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: secure, namespace: demo}}
spec:
  host: secure.example
  trafficPolicy:
    tls: {{mode: SIMPLE, credentialName: external-ca}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: egress, namespace: istio-system}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: [external.example]
{extra}"#
    )
}

/// Sends external.example through the egress gateway (Istio's two-hop rule).
pub const VIA_EGRESS: &str = r#"---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: external-via-egress, namespace: demo}
spec:
  hosts: [external.example]
  gateways: [istio-system/egress, mesh]
  http:
  - match: [{gateways: [mesh], port: 80}]
    route: [{destination: {host: istio-egressgateway.istio-system.svc.cluster.local, port: {number: 80}}}]
  - match: [{gateways: [istio-system/egress], port: 80}]
    route: [{destination: {host: external.example, port: {number: 80}}}]
"#;

pub struct Edge {
    pub agents: Vec<Agent>,
    pub ca: CaService,
    pub _tls_servers: Vec<Background>,
    pub certs: Certs,
    pub c: Cluster,
    /// The [`fixture`]'s objects.
    pub base: String,
    pub secret: String,
    pub ca_secret: String,
}

impl Edge {
    pub fn start() -> Edge {
        let f = fixture();
        let base = f.yaml("");
        let c = f.cluster;
        servers::http_hello(c.pod("helloworld"), 9095);
        servers::echo(c.pod("helloworld"), 7000);
        // Outside the cluster: an HTTP server and an HTTPS one (openssl s_server).
        assert!(c.net_cmd(&["ip", "addr", "add", &format!("{EXTERNAL_IP}/32"), "dev", "lo"]).status.success());
        let outside = Pod::namespace("external", EXTERNAL_IP, &c.net_ns);
        servers::http_hello(&outside, 80);
        let certs = Certs::new(&c.id);
        let (crt, key) = certs.server("hello", "hello.example.com");
        let (ext_crt, ext_key) = certs.server("secure", "secure.example");
        let (pass_crt, pass_key) = certs.server("passthrough", "passthrough.example");
        let s_server = |netns: &str, crt: &PathBuf, key: &PathBuf| {
            let (crt, key) = (crt.to_str().unwrap(), key.to_str().unwrap());
            let args = ["openssl", "s_server", "-quiet", "-www", "-accept", "8443", "-cert", crt, "-key", key];
            Background::spawn_in(netns, &args).unwrap()
        };
        // The outside HTTPS service, and a TLS server inside the mesh that the
        // gateway passes through unopened.
        let tls_servers =
            vec![s_server(&c.net_ns, &ext_crt, &ext_key), s_server(&c.pod("helloworld").netns, &pass_crt, &pass_key)];
        let secret =
            format!("  tls.crt: |\n{}  tls.key: |\n{}", Certs::yaml_block(&crt, 4), Certs::yaml_block(&key, 4));
        let ca_secret = format!("  ca.crt: |\n{}", Certs::yaml_block(&certs.ca(), 4));
        let cfg = config(&base, &secret, &ca_secret, "");
        let ca = CaService::start(&c, &cfg);
        let agents = (0..2).map(|i| Agent::start_on(&c, i, &cfg, &ca.agent_args(&c.nodes[i].name))).collect();
        Edge { agents, ca, _tls_servers: tls_servers, certs, c, base, secret, ca_secret }
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.c.pod(name)
    }

    pub fn set_extra(&self, extra: &str) {
        self.set_config(&config(&self.base, &self.secret, &self.ca_secret, extra));
    }

    /// The ingress Gateway's HTTPS server with more `tls` fields (`, a: b, …`).
    pub fn set_https_tls(&self, fields: &str) {
        self.set_replaced("credentialName: hello-cert}", &format!("credentialName: hello-cert{fields}}}"));
    }

    /// The base configuration with the first `from` replaced by `to`.
    pub fn set_replaced(&self, from: &str, to: &str) {
        let cfg = config(&self.base, &self.secret, &self.ca_secret, "");
        assert!(cfg.contains(from), "{from:?} is not in the configuration");
        self.set_config(&cfg.replacen(from, to, 1));
    }

    pub fn set_config(&self, cfg: &str) {
        self.ca.write_config(cfg);
        for a in &self.agents {
            let before = metric(&a.metrics(), "mesh_config_loads_total", &[("result", "success")]);
            a.write_config(cfg);
            a.wait_metrics(10, "configuration reload", |t| {
                metric(t, "mesh_config_loads_total", &[("result", "success")]) > before
            });
        }
    }
}

/// curl in a namespace; returns (HTTP status, body + errors).
pub fn curl(run: impl Fn(&[&str]) -> std::process::Output, args: &[&str]) -> (u16, String) {
    let c = crate::clients::curl(run, args);
    (c.code, c.body + &c.stderr)
}

/// `mutual.example`: the outside server on port 9444, reached with TLS the
/// agent originates as `tls` says; the Secret `client-cert` holds the
/// client certificate, its key and the CA.
pub fn origination(e: &Edge, client: &(std::path::PathBuf, std::path::PathBuf), tls: &str) -> String {
    format!(
        "---
apiVersion: v1
kind: Secret
metadata: {{name: client-cert, namespace: demo}}
type: kubernetes.io/tls
stringData:
  tls.crt: |
{}  tls.key: |
{}{}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: mutual, namespace: demo}}
spec:
  hosts: [mutual.example]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 9444}}]
  resolution: STATIC
  endpoints: [{{address: {EXTERNAL_IP}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: mutual, namespace: demo}}
spec:
  host: mutual.example
  trafficPolicy:
    tls: {tls}
",
        Certs::yaml_block(&client.0, 4),
        Certs::yaml_block(&client.1, 4),
        e.ca_secret,
    )
}

/// The outside server `mutual.example` reaches (see [`origination`]): TLS 1.2
/// only, a client certificate of the test CA required, on port 9444.
pub fn mutual_server(e: &Edge) -> Background {
    let (crt, key) = e.certs.server("secure", "secure.example");
    let ca = e.certs.ca();
    let args = [
        "openssl",
        "s_server",
        "-quiet",
        "-www",
        "-accept",
        "9444",
        "-tls1_2",
        "-Verify",
        "1",
        "-verify_return_error",
        "-CAfile",
        ca.to_str().unwrap(),
        "-cert",
        crt.to_str().unwrap(),
        "-key",
        key.to_str().unwrap(),
    ];
    Background::spawn_in(&e.c.net_ns, &args).unwrap()
}
