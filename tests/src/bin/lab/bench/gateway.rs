//! HTTPS at the ingress gateway (`gateway_https`): Istio's ingress gateway
//! pod on node-1 behind a LoadBalancer address, terminating TLS for
//! `bench.example` with a certificate from a Secret (`tls.mode: SIMPLE` on
//! 443, `MUTUAL` on 8443 with the CA in `bench-cert-cacert`, as Istio names
//! it) and routing to the server on node-2 over HBONE. Clients outside the
//! cluster (the network between the nodes): oha at 1 000 requests/s on
//! kept-alive connections, and new connections, each with one request,
//! with full and with resumed TLS handshakes. There is no direct path to
//! compare with (nothing terminates TLS without the agent): the figures are
//! absolute, the agents' CPU beside them.
use mesh_tests::certs::Certs;

use super::*;

pub(super) const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 100);
pub(super) const GATEWAY_LB: Ipv4Addr = Ipv4Addr::new(172, 18, 100, 1);
const GATEWAY_VIP: &str = "10.96.0.40";
const HOST: &str = "bench.example";
/// The Service the gateway routes to: the server pod on node-2 alone.
const REMOTE_VIP: &str = "10.96.0.60";

/// The gateway pod and its LoadBalancer Service, and a Service for the
/// remote server (labelled `bench-node: two`).
pub(super) fn add(f: &mut Fixture) {
    let labels = [("app", "istio-ingressgateway"), ("istio", "ingressgateway")];
    let spec = PodSpec::gateway("istio-system", &labels, "istio-ingressgateway-service-account");
    f.gateway(0, "istio-ingressgateway", GATEWAY_IP, spec, (GATEWAY_VIP, GATEWAY_LB), &[443, 8443]);
    // Not named for a protocol: sniffed, as the bench's pods are without a
    // Service (an idle connection to a port declared HTTP costs the
    // destination more; `idle` measures the sniffed case, as before).
    let ports = [mesh_tests::fixture::port("web", 8080, "8080")];
    f.service("bench", "remote", REMOTE_VIP, &[("bench-node", "two")], &ports);
}

/// The certificates: the gateway's for `bench.example`, and a client's for MUTUAL.
pub(super) struct GatewayTls {
    certs: Certs,
    client: (PathBuf, PathBuf),
}

impl GatewayTls {
    pub(super) fn new(id: &str) -> GatewayTls {
        let certs = Certs::new(&format!("{id}-gateway"));
        let client = certs.client("client", "client.example");
        GatewayTls { certs, client }
    }

    /// The Secrets, the Gateway and its VirtualService.
    pub(super) fn config(&self) -> String {
        let (crt, key) = self.certs.server("bench", HOST);
        let block = |p: &Path| Certs::yaml_block(p, 4);
        format!(
            "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: bench-cert, namespace: istio-system}}\ntype: kubernetes.io/tls\n\
             stringData:\n  tls.crt: |\n{}  tls.key: |\n{}\
             ---\napiVersion: v1\nkind: Secret\nmetadata: {{name: bench-cert-cacert, namespace: istio-system}}\n\
             stringData:\n  ca.crt: |\n{}\
             ---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: ingress, namespace: istio-system}}\n\
             spec:\n  selector: {{istio: ingressgateway}}\n  servers:\n\
             \x20 - port: {{number: 443, name: https, protocol: HTTPS}}\n    hosts: [{HOST}]\n    tls: {{mode: SIMPLE, credentialName: bench-cert}}\n\
             \x20 - port: {{number: 8443, name: https-mutual, protocol: HTTPS}}\n    hosts: [{HOST}]\n    tls: {{mode: MUTUAL, credentialName: bench-cert}}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: bench, namespace: bench}}\n\
             spec:\n  hosts: [{HOST}]\n  gateways: [istio-system/ingress]\n  http:\n\
             \x20 - route: [{{destination: {{host: remote.bench.svc.cluster.local, port: {{number: 8080}}}}}}]\n",
            block(&crt),
            block(&key),
            block(&self.certs.ca()),
        )
    }
}

/// The gateway's figures: 1 000 rps over SIMPLE and over MUTUAL (latency,
/// the agents' CPU per 1 000 requests), and new connections per second
/// with full and resumed handshakes on each (the agents' CPU per connection).
pub(super) fn gateway_https(cluster: &Cluster, tls: &GatewayTls, secs: u64, agents: &[u32]) -> anyhow::Result<Sample> {
    let net = Pod::namespace("outside", GATEWAY_LB, &cluster.net_ns);
    let ca = tls.certs.ca().display().to_string();
    let (crt, key) = (tls.client.0.display().to_string(), tls.client.1.display().to_string());
    let mut sample = Sample::new();
    for (port, mutual, keys) in [
        (443, false, ["simple_p50_ms", "simple_p99_ms", "simple_vcpu_per_1000rps"]),
        (8443, true, ["mutual_p50_ms", "mutual_p99_ms", "mutual_vcpu_per_1000rps"]),
    ] {
        let url = format!("https://{HOST}:{port}/");
        let connect = format!("{HOST}:{port}:{GATEWAY_LB}:{port}");
        let mut args = vec!["--cacert", ca.as_str(), "--connect-to", connect.as_str()];
        if mutual {
            args.extend(["--cert", crt.as_str(), "--key", key.as_str()]);
        }
        let cpu0: f64 = agents.iter().map(|p| cpu_seconds(*p)).sum();
        let start = Instant::now();
        let got = oha(&net, &url, secs, Some(1000), &args)?;
        let used = agents.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu0;
        let rps = got.get("rps").copied().unwrap_or(f64::NAN);
        if got.get("non_200").copied().unwrap_or(0.0) > 0.0 {
            // What one request gets, for the message.
            let mut curl = vec!["curl", "-sS", "-i", "--cacert", ca.as_str(), "--connect-to", connect.as_str()];
            if mutual {
                curl.extend(["--cert", crt.as_str(), "--key", key.as_str()]);
            }
            curl.push(url.as_str());
            let one = output_in(&net.netns, &curl).unwrap_or_else(|e| e.to_string());
            bail!("the gateway answered {url} with errors: {got:?}; one request: {one}");
        }
        sample.insert(keys[0], got.get("p50_ms").copied().unwrap_or(f64::NAN));
        sample.insert(keys[1], got.get("p99_ms").copied().unwrap_or(f64::NAN));
        // Both agents (gateway + source on node-1, destination on node-2), per agent.
        let per_agent = used / agents.len().max(1) as f64;
        sample.insert(keys[2], per_agent / start.elapsed().as_secs_f64() / (rps / 1000.0));
    }
    let to = |port: u16| Target {
        netns: &cluster.net_ns,
        addr: std::net::SocketAddr::from((GATEWAY_LB, port)),
        server_name: HOST,
        probe: handshake::Probe::Http1(HOST),
    };
    let simple = handshake::client_config(None, b"http/1.1")?;
    let keys = ["simple_full_per_s", "simple_full_agent_us", "simple_resumed_per_s", "simple_resumed_agent_us"];
    sample.extend(connection_rates(&to(443), &simple, secs, agents, keys)?);
    let mutual = handshake::client_config(Some((&tls.client.0, &tls.client.1)), b"http/1.1")?;
    let keys = ["mutual_full_per_s", "mutual_full_agent_us", "mutual_resumed_per_s", "mutual_resumed_agent_us"];
    sample.extend(connection_rates(&to(8443), &mutual, secs, agents, keys)?);
    Ok(sample)
}
