//! Two-node tests (root): the CA service, mTLS/HBONE between node agents,
//! PeerAuthentication and AuthorizationPolicy, with real clients through real
//! eBPF capture.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mesh_tests::{
    Agent, Cluster, Pod,
    agent::{CaService, metric},
    require_root, servers,
};

const VIP: &str = "10.96.0.10";
/// Service `api`: port 80 named `http-api`, to helloworld's HTTP server on 8080.
const API_VIP: &str = "10.96.0.11";
/// Service `ws`: port 80 named `http-ws`, to helloworld's WebSocket echo on 8090.
const WS_VIP: &str = "10.96.0.13";
/// Service `grpc`: port 80 named `grpc`, to helloworld's tonic server on 9090.
const GRPC_VIP: &str = "10.96.0.14";
const TEST_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const OUTSIDER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
const SLEEP_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 4);
const HELLO_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
/// Service `ver`: v1 on node-2, v2 on node-1 (HTTP servers on 8080), for routing rules.
const VER_VIP: &str = "10.96.0.12";
const VER_V1_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 3);
const VER_V2_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const TEST_ID: &str = "spiffe://cluster.local/ns/demo/sa/test";
const HELLO_ID: &str = "spiffe://cluster.local/ns/demo/sa/helloworld";

/// Nodes node-1 and node-2; namespaces `demo` and `other` (meshed) and `plain`;
/// `test` (demo/test) and `sleep` (other/sleep) and `outsider` (plain) on
/// node-1, `helloworld` (demo/helloworld) on node-2, Service helloworld.
fn config(extra: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: node-1}}
status: {{addresses: [{{type: InternalIP, address: 172.18.0.2}}]}}
---
apiVersion: v1
kind: Node
metadata: {{name: node-2}}
status: {{addresses: [{{type: InternalIP, address: 172.18.1.2}}]}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: demo, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: other, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: plain}}
---
apiVersion: v1
kind: Pod
metadata: {{name: test, namespace: demo, labels: {{app: test}}}}
spec: {{nodeName: node-1, serviceAccountName: test}}
status: {{podIP: {TEST_IP}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: sleep, namespace: other, labels: {{app: sleep}}}}
spec: {{nodeName: node-1, serviceAccountName: sleep}}
status: {{podIP: {SLEEP_IP}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: outsider, namespace: plain, labels: {{app: outsider}}}}
spec: {{nodeName: node-1}}
status: {{podIP: {OUTSIDER_IP}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: helloworld, namespace: demo, labels: {{app: helloworld, version: v1}}}}
spec:
  nodeName: node-2
  serviceAccountName: helloworld
  containers: [{{name: hello, ports: [{{name: http, containerPort: 9095}}, {{name: echo, containerPort: 7000}}]}}]
status: {{podIP: {HELLO_IP}}}
---
apiVersion: v1
kind: Service
metadata: {{name: helloworld, namespace: demo}}
spec:
  clusterIP: {VIP}
  selector: {{app: helloworld}}
  ports:
  - {{name: http, port: 9095, targetPort: http}}
  - {{name: tcp-echo, port: 7000, targetPort: echo}}
---
apiVersion: v1
kind: Service
metadata: {{name: api, namespace: demo}}
spec:
  clusterIP: {API_VIP}
  selector: {{app: helloworld}}
  ports: [{{name: http-api, port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: ws, namespace: demo}}
spec:
  clusterIP: {WS_VIP}
  selector: {{app: helloworld}}
  ports: [{{name: http-ws, port: 80, targetPort: 8090}}]
---
apiVersion: v1
kind: Service
metadata: {{name: grpc, namespace: demo}}
spec:
  clusterIP: {GRPC_VIP}
  selector: {{app: helloworld}}
  ports: [{{name: grpc, port: 80, targetPort: 9090}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: ver-v1, namespace: demo, labels: {{app: ver, version: v1}}}}
spec: {{nodeName: node-2, serviceAccountName: ver}}
status: {{podIP: {VER_V1_IP}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: ver-v2, namespace: demo, labels: {{app: ver, version: v2}}}}
spec: {{nodeName: node-1, serviceAccountName: ver}}
status: {{podIP: {VER_V2_IP}}}
---
apiVersion: v1
kind: Service
metadata: {{name: ver, namespace: demo}}
spec:
  clusterIP: {VER_VIP}
  selector: {{app: ver}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
{extra}"#
    )
}

struct Mesh {
    // Field order is drop order: agents before the CA, the cluster last.
    agents: Vec<Agent>,
    ca: CaService,
    c: Cluster,
}

impl Mesh {
    /// Two nodes, the CA service, an agent on each node using it, servers up.
    fn start(extra: &str, agent_args: &[&str]) -> Mesh {
        let mut c = Cluster::two_nodes();
        c.add_pod_on(0, "test", TEST_IP);
        c.add_pod_on(0, "outsider", OUTSIDER_IP);
        c.add_pod_on(0, "sleep", SLEEP_IP);
        c.add_pod_on(1, "helloworld", HELLO_IP);
        c.add_pod_on(1, "ver-v1", VER_V1_IP);
        c.add_pod_on(0, "ver-v2", VER_V2_IP);
        servers::http_api(c.pod("ver-v1"), 8080);
        servers::http_api(c.pod("ver-v2"), 8080);
        servers::http_hello(c.pod("helloworld"), 9095);
        servers::echo(c.pod("helloworld"), 7000);
        servers::http_hello(c.pod("test"), 9095);
        servers::http_api(c.pod("helloworld"), 8080);
        servers::websocket_echo(c.pod("helloworld"), 8090);
        mesh_tests::grpc::serve(c.pod("helloworld"), 9090);
        let cfg = config(extra);
        let ca = CaService::start(&c, &cfg);
        let agents = (0..2)
            .map(|i| {
                let mut args = ca.agent_args(&c.nodes[i].name);
                args.extend(agent_args.iter().map(|s| s.to_string()));
                Agent::start_on(&c, i, &cfg, &args)
            })
            .collect();
        Mesh { agents, ca, c }
    }

    fn pod(&self, name: &str) -> &Pod {
        self.c.pod(name)
    }

    /// Replaces both agents' configuration and waits until both loaded it.
    fn set_config(&self, extra: &str) {
        let before: Vec<f64> = self.agents.iter().map(loads).collect();
        for a in &self.agents {
            a.write_config(&config(extra));
        }
        for (a, n) in self.agents.iter().zip(before) {
            a.wait_metrics(10, "configuration reload", |t| {
                metric(t, "mesh_config_loads_total", &[("result", "success")]) > n
            });
        }
    }
}

fn loads(a: &Agent) -> f64 {
    metric(&a.metrics(), "mesh_config_loads_total", &[("result", "success")])
}

/// The serial of the certificate an agent holds for `identity`.
fn serial(a: &Agent, identity: &str) -> Option<String> {
    let (_, dump) = a.admin_get("/config_dump")?;
    let v: serde_json::Value = serde_json::from_str(&dump).ok()?;
    let certs = v["certificates"].as_array()?;
    let c = certs.iter().find(|c| c["identity"] == identity)?;
    Some(c["serial"].as_str()?.to_owned())
}

/// curl from the cluster network's namespace: a client outside the mesh.
fn curl_outside(c: &Cluster, url: &str) -> (bool, String) {
    let out = c.net_cmd(&["curl", "-sSf", "--max-time", "5", url]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn failures(a: &Agent, reason: &str) -> f64 {
    metric(&a.metrics(), "mesh_tcp_connection_failures_total", &[("reason", reason)])
}

/// curl from a pod; an HTTP error status (such as a policy's 403) is a failure.
fn curl(pod: &Pod, url: &str) -> (bool, String) {
    let out = pod.cmd(&["curl", "-sSf", "--max-time", "5", url]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A packet capture on every interface of the cluster network's namespace.
struct Capture {
    child: std::process::Child,
    file: std::path::PathBuf,
    /// tcpdump's stderr, kept open so its exit summary does not hit SIGPIPE.
    stderr: std::process::ChildStderr,
}

impl Capture {
    fn start(c: &Cluster) -> Capture {
        let file = std::env::temp_dir().join(format!("mesh-test-{}.pcap", c.id));
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.net_ns,
                "tcpdump",
                "-i",
                "any",
                "-nn",
                "-U",
                "--immediate-mode",
                "-Z",
                "root",
                "-w",
            ])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (apt-get install tcpdump; `cargo xtask setup` does)");
        // tcpdump says "listening on" once the capture is open.
        let mut child = child;
        let mut err = child.stderr.take().unwrap();
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("listening on") {
            assert!(Instant::now() < deadline, "tcpdump did not start: {}", String::from_utf8_lossy(&seen));
            let n = err.read(&mut buf).unwrap();
            assert!(n > 0, "tcpdump exited: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        Capture { child, file, stderr: err }
    }

    /// Stops the capture and returns the raw pcap bytes.
    fn stop(&mut self) -> Vec<u8> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let mut summary = String::new();
        let _ = self.stderr.read_to_string(&mut summary);
        eprintln!("tcpdump: {summary}");
        std::fs::read(&self.file).unwrap()
    }

    /// `tcpdump -r` of the file with a filter: one line per packet.
    fn read(&self, filter: &str) -> String {
        let out = Command::new("tcpdump").args(["-nn", "-r"]).arg(&self.file).arg(filter).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
    }
}

#[test]
fn cross_node_traffic_is_mtls_with_workload_identities() {
    if !require_root("cross_node_traffic_is_mtls_with_workload_identities") {
        return;
    }
    let m = Mesh::start("", &[]);
    let mut cap = Capture::start(&m.c);

    // Service VIP and pod IP, across nodes; the server sees the client pod's IP.
    for url in [format!("http://{VIP}:9095/hello"), format!("http://{HELLO_IP}:9095/hello")] {
        let (ok, out) = curl(m.pod("test"), &url);
        assert!(ok, "{url}: {out}");
        assert!(out.contains(&format!("hello from helloworld; client {TEST_IP}")), "{url}: {out}");
    }
    // A marker through the tunnel, both ways.
    let marker = b"MESH-MARKER-7f3a9c-never-in-clear".repeat(100);
    let back = m.pod("test").run({
        let marker = marker.clone();
        move || mesh_tests::clients::tcp_echo(format!("{VIP}:7000").parse().unwrap(), &marker).unwrap()
    });
    assert_eq!(back, marker);

    let bytes = cap.stop();
    assert!(bytes.len() > 1000, "capture is empty");
    let needle = b"MESH-MARKER-7f3a9c";
    assert!(!bytes.windows(needle.len()).any(|w| w == needle), "the marker crossed the cluster network in clear");
    let pod_packets = cap.read("net 10.244.0.0/16");
    assert!(pod_packets.trim().is_empty(), "pod addresses on the wire:\n{pod_packets}");
    let node_to_node = "tcp and host 172.18.0.2 and host 172.18.1.2";
    let other = cap.read(&format!("{node_to_node} and not port 15008"));
    assert!(other.trim().is_empty(), "node-to-node TCP other than 15008:\n{other}");
    assert!(!cap.read(&format!("{node_to_node} and port 15008")).trim().is_empty(), "no HBONE traffic captured");

    // Identities in the metrics of both sides.
    let dest = &m.agents[1];
    let labels = [
        ("reporter", "destination"),
        ("source_principal", TEST_ID),
        ("destination_principal", HELLO_ID),
        ("connection_security_policy", "mutual_tls"),
    ];
    // The destination agent sees tunnels (the two HTTP requests share one
    // pooled upstream connection; the echo has its own).
    let text = dest.wait_metrics(5, "destination metrics", |t| {
        metric(t, "istio_tcp_connections_closed_total", &labels) >= 1.0
            && metric(t, "istio_tcp_connections_opened_total", &labels) >= 2.0
    });
    assert!(metric(&text, "istio_tcp_received_bytes_total", &labels) >= marker.len() as f64, "{text}");
    let src_labels = [
        ("reporter", "source"),
        ("source_principal", TEST_ID),
        ("destination_principal", HELLO_ID),
        ("connection_security_policy", "mutual_tls"),
    ];
    let text = m.agents[0].wait_metrics(5, "source metrics", |t| {
        metric(t, "istio_tcp_connections_closed_total", &src_labels) >= 1.0
            && metric(t, "istio_requests_total", &src_labels) >= 2.0
    });
    let via_vip = [src_labels.as_slice(), &[("destination_service", "helloworld.demo.svc.cluster.local")]].concat();
    assert!(metric(&text, "istio_tcp_sent_bytes_total", &via_vip) >= marker.len() as f64, "{text}");
    let http_ok = [via_vip.as_slice(), &[("response_code", "200"), ("request_protocol", "http")]].concat();
    assert_eq!(metric(&text, "istio_requests_total", &http_ok), 1.0, "{text}");

    // Certificates in config_dump: identity, serial, expiry; never a key.
    let (_, dump) = dest.admin_get("/config_dump").unwrap();
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let certs = v["certificates"].as_array().unwrap();
    // One per identity of node-2's meshed pods (helloworld, ver) and node-2's
    // own, for its host clients.
    let ids: Vec<&str> = certs.iter().filter_map(|c| c["identity"].as_str()).collect();
    let node_id = "spiffe://cluster.local/ns/istio-system/sa/mesh-node-node-2";
    assert_eq!(ids, [HELLO_ID, "spiffe://cluster.local/ns/demo/sa/ver", node_id], "{dump}");
    assert!(certs[0]["serial"].as_str().is_some_and(|s| s.len() >= 16), "{dump}");
    assert!(certs[0]["not_after"].as_str().is_some(), "{dump}");
    assert!(!dump.contains("PRIVATE KEY"), "{dump}");
    // The node agent holds no CA key.
    assert!(!m.agents[0].dir.join("state").join("root-key.pem").exists());
}

/// A runtime for the in-test async clients.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Dials node-2's agent at 15008 as `cert` (or no certificate), asks for
/// helloworld's identity, and tunnels to helloworld's echo server. Ok with the
/// echoed bytes, or Err naming the step that failed.
fn hbone_echo(
    c: &Cluster,
    roots: rustls::RootCertStore,
    cert: Option<mesh_agent::identity::WorkloadCert>,
) -> Result<Vec<u8>, String> {
    use http_body_util::Empty;
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let node2 = c.nodes[1].ip;
    mesh_tests::netns::enter_and_spawn(&c.net_ns, move || {
        runtime().block_on(async move {
            let config = mesh_agent::identity::tls::client_config(
                std::sync::Arc::new(roots),
                cert.map(|c| c.key.clone()),
                HELLO_ID.into(),
                &[b"h2"],
            )
            .map_err(|e| format!("config: {e}"))?;
            let name =
                rustls::pki_types::ServerName::try_from(mesh_agent::identity::server_name_for(HELLO_ID)).unwrap();
            let tcp = tokio::net::TcpStream::connect((node2, 15008)).await.map_err(|e| format!("tcp: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("h2: {e}"))?;
            tokio::spawn(conn);
            let req = hyper::Request::connect(format!("{HELLO_IP}:7000")).body(Empty::<Bytes>::new()).unwrap();
            let resp = send.send_request(req).await.map_err(|e| format!("CONNECT: {e}"))?;
            if resp.status() != 200 {
                return Err(format!("CONNECT answered {}", resp.status()));
            }
            let mut io = TokioIo::new(hyper::upgrade::on(resp).await.map_err(|e| format!("upgrade: {e}"))?);
            io.write_all(b"through the tunnel").await.map_err(|e| format!("write: {e}"))?;
            io.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
            let mut back = Vec::new();
            io.read_to_end(&mut back).await.map_err(|e| format!("read: {e}"))?;
            Ok(back)
        })
    })
    .join()
    .unwrap()
}

#[test]
fn hbone_refuses_clients_without_a_valid_mesh_certificate() {
    if !require_root("hbone_refuses_clients_without_a_valid_mesh_certificate") {
        return;
    }
    let m = Mesh::start("", &[]);
    let td = "cluster.local";
    let now = std::time::SystemTime::now();
    let hour = Duration::from_secs(3600);
    let mesh_ca = mesh_agent::identity::Ca::load_or_create(&m.ca.ca_dir(), td).unwrap();
    let roots = || mesh_agent::identity::ca::load_roots(&m.ca.root_cert()).unwrap();

    // Hostile bytes on the HBONE and CA ports, and a peer that connects and
    // says nothing: each is dropped on its own, nothing else is disturbed.
    let (node2, ca_addr) = (m.c.nodes[1].ip, m.ca.addr.parse::<SocketAddr>().unwrap());
    let idle = mesh_tests::netns::enter_and_spawn(&m.c.net_ns, move || {
        for addr in [SocketAddr::from((node2, 15008)), ca_addr] {
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0, 1, 2, 3]);
            let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n");
        }
        TcpStream::connect((node2, 15008)).unwrap()
    })
    .join()
    .unwrap();

    // Control: a certificate from the mesh CA is admitted, end to end.
    let good = mesh_ca.issue(TEST_ID, now - hour, now + hour).unwrap();
    assert_eq!(hbone_echo(&m.c, roots(), Some(good)).unwrap(), b"through the tunnel");

    // No certificate, another root's, an expired one: all refused.
    let other_dir = std::env::temp_dir().join(format!("mesh-test-{}-other-ca", m.c.id));
    let other_ca = mesh_agent::identity::Ca::load_or_create(&other_dir, td).unwrap();
    let foreign = other_ca.issue(TEST_ID, now - hour, now + hour).unwrap();
    let expired = mesh_ca.issue(TEST_ID, now - 2 * hour, now - hour).unwrap();
    let _ = std::fs::remove_dir_all(&other_dir);
    for (what, cert) in [("no certificate", None), ("another root", Some(foreign)), ("expired", Some(expired))] {
        let result = hbone_echo(&m.c, roots(), cert);
        assert!(result.is_err(), "{what}: admitted: {result:?}");
    }
    let text = m.agents[1].wait_metrics(5, "refused handshakes", |t| {
        metric(t, "mesh_tcp_connection_failures_total", &[("reason", "tunnel_tls")]) >= 4.0
    });
    drop(idle);
    // Nothing reached the pod from the refused clients.
    let labels = [("reporter", "destination"), ("source_principal", TEST_ID)];
    assert_eq!(metric(&text, "istio_tcp_connections_opened_total", &labels), 1.0, "{text}");
}

#[test]
fn node_token_obtains_only_its_own_pods_identities() {
    if !require_root("node_token_obtains_only_its_own_pods_identities") {
        return;
    }
    let m = Mesh::start("", &[]);
    let roots = std::sync::Arc::new(mesh_agent::identity::ca::load_roots(&m.ca.root_cert()).unwrap());
    let token = mesh_agent::identity::ca_service::read_token(&m.ca.token_file("node-1")).unwrap();
    let addr = m.ca.addr.clone();
    let results = mesh_tests::netns::enter_and_spawn(&m.c.net_ns, move || {
        runtime().block_on(async move {
            let ask = |token: String, identity: &'static str| {
                let (roots, addr) = (roots.clone(), addr.clone());
                async move {
                    let client =
                        mesh_agent::identity::ca_service::CaClient::new(addr, roots, token, "cluster.local").unwrap();
                    let (_key, csr) = mesh_agent::identity::new_key_and_csr(identity).unwrap();
                    client.sign(identity, &csr, Duration::from_secs(600)).await.map_err(|e| e.to_string())
                }
            };
            (
                ask(token.clone(), TEST_ID).await.map(|chain| chain.len()),
                ask(token.clone(), HELLO_ID).await.map(|chain| chain.len()),
                ask("not-a-token".into(), TEST_ID).await.map(|chain| chain.len()),
            )
        })
    })
    .join()
    .unwrap();
    assert_eq!(results.0, Ok(1), "node-1's own pod identity");
    let refused = results.1.unwrap_err();
    assert!(refused.contains("403") && refused.contains("node-1"), "{refused}");
    let unknown = results.2.unwrap_err();
    assert!(unknown.contains("401"), "{unknown}");
}

#[test]
fn strict_refuses_and_permissive_admits_plaintext_from_outside_the_mesh() {
    if !require_root("strict_refuses_and_permissive_admits_plaintext_from_outside_the_mesh") {
        return;
    }
    let m = Mesh::start("", &[]);
    let hello = format!("http://{HELLO_IP}:9095/");
    // PERMISSIVE (Istio's default): a client beyond the cluster and an
    // un-meshed pod on the other node get through, and keep their address.
    let (ok, out) = curl_outside(&m.c, &hello);
    assert!(ok && out.contains("client 172.18.1.1"), "{out}");
    let (ok, out) = curl(m.pod("outsider"), &hello);
    assert!(ok && out.contains(&format!("client {OUTSIDER_IP}")), "{out}");
    let plaintext = [("reporter", "destination"), ("connection_security_policy", "none")];
    m.agents[1].wait_metrics(5, "plaintext connections", |t| {
        metric(t, "istio_tcp_connections_closed_total", &plaintext) >= 2.0
    });

    // STRICT for the namespace: plaintext refused, the mesh still works.
    m.set_config(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {name: default, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n",
    );
    let (ok, out) = curl_outside(&m.c, &hello);
    assert!(!ok, "STRICT admitted a client outside the mesh: {out}");
    let (ok, out) = curl(m.pod("outsider"), &hello);
    assert!(!ok, "STRICT admitted an un-meshed pod: {out}");
    let (ok, out) = curl(m.pod("test"), &format!("http://{VIP}:9095/"));
    assert!(ok && out.contains(&format!("client {TEST_IP}")), "{out}");
    assert!(failures(&m.agents[1], "plaintext_refused") >= 2.0);

    // Mesh-wide STRICT from the root namespace, with a port-level exception
    // for the selected workload: plaintext to 9095 only.
    m.set_config(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {name: hello-http, namespace: demo}\n\
         spec: {selector: {matchLabels: {app: helloworld}}, portLevelMtls: {\"9095\": {mode: PERMISSIVE}}}\n",
    );
    let (ok, out) = curl_outside(&m.c, &hello);
    assert!(ok, "port-level PERMISSIVE refused: {out}");
    let refused = mesh_tests::netns::enter_and_spawn(&m.c.net_ns, || {
        mesh_tests::clients::tcp_echo(SocketAddr::from((HELLO_IP, 7000)), b"plain").is_err()
    })
    .join()
    .unwrap();
    assert!(refused, "mesh-wide STRICT admitted plaintext to port 7000");
}

#[test]
fn authorization_policy_allows_and_denies_by_principal_namespace_ip_and_port() {
    if !require_root("authorization_policy_allows_and_denies_by_principal_namespace_ip_and_port") {
        return;
    }
    let m = Mesh::start("", &[]);
    let vip = format!("http://{VIP}:9095/");
    let policy = |spec: &str| {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: hello, namespace: demo}}\nspec: {spec}\n"
        )
    };
    let echo_from = |pod: &str| {
        m.pod(pod).run(|| mesh_tests::clients::tcp_echo(SocketAddr::from(([10, 96, 0, 10], 7000)), b"ping").is_ok())
    };
    // Control: with no policy both clients get through.
    assert!(curl(m.pod("test"), &vip).0);
    assert!(curl(m.pod("sleep"), &vip).0);

    // DENY by namespace, across nodes and on the same node (node-1's agent is
    // then the destination's agent too).
    let deny_other = "{selector: {matchLabels: {app: helloworld}}, action: DENY, \
                      rules: [{from: [{source: {namespaces: [other]}}]}]}";
    let deny_other_to_test = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: test, namespace: demo}\n\
         spec: {selector: {matchLabels: {app: test}}, action: DENY, rules: [{from: [{source: {namespaces: [other]}}]}]}\n";
    m.set_config(&(policy(deny_other) + deny_other_to_test));
    let (ok, out) = curl(m.pod("sleep"), &vip);
    assert!(!ok, "DENY from namespace other let sleep through: {out}");
    assert!(curl(m.pod("test"), &vip).0);
    assert!(failures(&m.agents[1], "denied") >= 1.0);
    let (ok, out) = curl(m.pod("sleep"), &format!("http://{TEST_IP}:9095/"));
    assert!(!ok, "same-node DENY let sleep through: {out}");
    assert!(failures(&m.agents[0], "denied") >= 1.0);
    let (ok, out) = curl(m.pod("outsider"), &format!("http://{TEST_IP}:9095/"));
    assert!(ok && out.contains(&format!("client {OUTSIDER_IP}")), "{out}");

    // ALLOW by principal and port: only test, only 9095; plaintext has no principal.
    m.set_config(&policy(
        "{action: ALLOW, rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/test]}}], \
         to: [{operation: {ports: [\"9095\"]}}]}]}",
    ));
    assert!(curl(m.pod("test"), &vip).0);
    assert!(!echo_from("test"), "ALLOW to port 9095 admitted port 7000");
    assert!(!curl(m.pod("sleep"), &vip).0, "ALLOW for test admitted sleep");
    assert!(!curl_outside(&m.c, &format!("http://{HELLO_IP}:9095/")).0, "ALLOW by principal admitted plaintext");

    // ALLOW by IP block: the client's own address counts (carried across the tunnel).
    m.set_config(&policy("{rules: [{from: [{source: {ipBlocks: [172.18.1.0/24], notIpBlocks: [172.18.1.9]}}]}]}"));
    assert!(curl_outside(&m.c, &format!("http://{HELLO_IP}:9095/")).0);
    assert!(!curl(m.pod("test"), &vip).0, "ipBlocks admitted a pod outside the block");

    // An empty ALLOW policy denies everything.
    m.set_config(&policy("{}"));
    assert!(!curl(m.pod("test"), &vip).0, "an empty ALLOW policy admitted test");
    assert!(!echo_from("sleep"));
    let denied = failures(&m.agents[1], "denied");
    assert!(denied >= 7.0, "denied connections counted: {denied}");
}

#[test]
fn certificate_rotation_keeps_live_connections() {
    if !require_root("certificate_rotation_keeps_live_connections") {
        return;
    }
    let m = Mesh::start("", &["--cert-ttl", "4s"]);
    let started = Instant::now();
    let first = (serial(&m.agents[0], TEST_ID).unwrap(), serial(&m.agents[1], HELLO_ID).unwrap());
    let mut live = m.pod("test").run(|| {
        let s = TcpStream::connect_timeout(&SocketAddr::from(([10, 96, 0, 10], 7000)), Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    });
    let roundtrip = |s: &mut TcpStream, msg: &[u8]| {
        s.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    };
    roundtrip(&mut live, b"before rotation");
    // Renewal at half life (2 s) on both sides.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = (serial(&m.agents[0], TEST_ID), serial(&m.agents[1], HELLO_ID));
        if now.0.is_some_and(|s| s != first.0) && now.1.is_some_and(|s| s != first.1) {
            break;
        }
        assert!(Instant::now() < deadline, "certificates not renewed: still {first:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    roundtrip(&mut live, b"after rotation");
    // Past the first certificates' expiry, the live connection still works...
    std::thread::sleep(Duration::from_secs(5).saturating_sub(started.elapsed()));
    roundtrip(&mut live, b"after the first certificates expired");
    // ...and new connections use the current ones.
    let (ok, out) = curl(m.pod("test"), &format!("http://{VIP}:9095/"));
    assert!(ok, "{out}");
    live.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    live.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    for a in &m.agents {
        assert_eq!(failures(a, "copy_error"), 0.0, "{}", a.metrics());
    }
}

#[test]
fn http_through_the_mesh_across_nodes() {
    if !require_root("http_through_the_mesh_across_nodes") {
        return;
    }
    let access_log = std::env::temp_dir().join(format!("mesh-test-access-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&access_log);
    let m = Mesh::start("", &["--access-log", access_log.to_str().unwrap()]);
    let test = m.pod("test");
    let api = format!("http://{API_VIP}");

    // HTTP/1.1 keep-alive: two requests on one client connection; the agent adds
    // x-request-id; the server sees the client pod.
    let out = test.cmd(&["curl", "-sSfv", "--max-time", "5", &format!("{api}/hello"), &format!("{api}/hello")]);
    let (body, verbose) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{verbose}");
    assert_eq!(
        body.matches(&format!("hello from helloworld; client {TEST_IP}; HTTP/1.1; x-request-id ")).count(),
        2,
        "{body}"
    );
    assert!(!body.contains("x-request-id -"), "{body}");
    assert!(verbose.contains("Re-using existing connection"), "{verbose}");

    // Trace context passes untouched (W3C and B3); a request id the client sent is kept.
    let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let out = test.cmd(&[
        "curl",
        "-sSf",
        "-H",
        &format!("traceparent: {trace}"),
        "-H",
        "x-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7",
        "-H",
        "x-request-id: my-id-1",
        &format!("{api}/headers"),
    ]);
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(seen.contains(&format!("traceparent: {trace}")), "{seen}");
    assert!(seen.contains("x-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7"), "{seen}");
    assert!(seen.contains("x-request-id: my-id-1"), "{seen}");

    // h2c with prior knowledge on the same `http` port.
    let (ok, out) = curl(test, &format!("{api}/hello"));
    assert!(ok, "{out}");
    let out = test.cmd(&["curl", "-sSf", "--http2-prior-knowledge", "--max-time", "5", &format!("{api}/hello")]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("; HTTP/2.0;"), "{:?}", out);

    // Streaming bodies both ways: 8 MiB, chunked on HTTP/1.1 (with Expect:
    // 100-continue, which curl sends for large bodies) and on HTTP/2.
    let dir = std::env::temp_dir().join(format!("mesh-test-l7-{}", m.c.id));
    std::fs::create_dir_all(&dir).unwrap();
    let payload: Vec<u8> = (0..8u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let input = dir.join("in");
    std::fs::write(&input, &payload).unwrap();
    for (what, extra) in [("HTTP/1.1 chunked", "-HTransfer-Encoding: chunked"), ("h2c", "--http2-prior-knowledge")] {
        let output = dir.join("out");
        let out = test.cmd(&[
            "curl",
            "-sSf",
            "--max-time",
            "20",
            extra,
            "--data-binary",
            &format!("@{}", input.display()),
            "-o",
            output.to_str().unwrap(),
            &format!("{api}/echo"),
        ]);
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(std::fs::read(&output).unwrap() == payload, "{what}: echoed body differs");
    }
    let _ = std::fs::remove_dir_all(&dir);

    // An upstream status passes through and is counted.
    let out = test.cmd(&["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("{api}/status/503")]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "503");

    // Upgrade (as WebSocket does): 101, then raw bytes both ways.
    let echoed = test.run(|| {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from(([10, 96, 0, 11], 80)), Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /upgrade HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let mut total = Vec::new();
        for round in 0..64u8 {
            let msg = vec![round; 16 * 1024];
            s.write_all(&msg).unwrap();
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).unwrap();
            total.extend_from_slice(&back);
        }
        total
    });
    assert_eq!(echoed.len(), 64 * 16 * 1024);
    assert!(echoed.chunks(16 * 1024).enumerate().all(|(i, c)| c.iter().all(|b| *b as usize == i)));

    // HTTP/2 extended CONNECT (RFC 8441, WebSocket over HTTP/2): a tunnel on
    // one stream, through the mesh.
    let echoed = test.run(|| {
        runtime().block_on(async {
            use http_body_util::Empty;
            use hyper::body::Bytes;
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let tcp = tokio::net::TcpStream::connect((API_VIP, 80)).await.unwrap();
            let io = hyper_util::rt::TokioIo::new(tcp);
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
            tokio::spawn(conn);
            let mut req =
                hyper::Request::connect(format!("http://{API_VIP}/upgrade")).body(Empty::<Bytes>::new()).unwrap();
            req.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
            let mut total = Vec::new();
            for round in 0..32u8 {
                let msg = vec![round; 8 * 1024];
                io.write_all(&msg).await.unwrap();
                let mut back = vec![0u8; msg.len()];
                io.read_exact(&mut back).await.unwrap();
                total.extend_from_slice(&back);
            }
            total
        })
    });
    assert_eq!(echoed.len(), 32 * 8 * 1024);
    assert!(echoed.chunks(8 * 1024).enumerate().all(|(i, c)| c.iter().all(|b| *b as usize == i)));

    // Per-request metrics at the source, with identities and mTLS.
    let base = [
        ("reporter", "source"),
        ("destination_service", "api.demo.svc.cluster.local"),
        ("source_principal", TEST_ID),
        ("destination_principal", HELLO_ID),
        ("request_protocol", "http"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let with = |code: &'static str| [base.as_slice(), &[("response_code", code)]].concat();
    let text = m.agents[0].wait_metrics(5, "request metrics", |t| {
        metric(t, "istio_requests_total", &with("200")) >= 8.0
            && metric(t, "istio_requests_total", &with("503")) >= 1.0
            && metric(t, "istio_requests_total", &with("101")) >= 1.0
    });
    // Six plain requests, the traced one and the extended CONNECT.
    assert_eq!(metric(&text, "istio_requests_total", &with("200")), 8.0, "{text}");
    assert!(metric(&text, "istio_request_bytes_sum", &with("200")) >= 2.0 * payload.len() as f64, "{text}");
    assert!(metric(&text, "istio_response_bytes_sum", &with("200")) >= 2.0 * payload.len() as f64, "{text}");
    assert_eq!(metric(&text, "istio_request_duration_milliseconds_count", &with("503")), 1.0, "{text}");

    // One JSON access log line per request.
    let log = std::fs::read_to_string(&access_log).unwrap();
    let _ = std::fs::remove_file(&access_log);
    let lines: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 10, "{log}");
    let failed = lines.iter().find(|l| l["path"] == "/status/503").expect("503 logged");
    assert_eq!(failed["response_code"], 503);
    assert_eq!(failed["source_principal"], TEST_ID);
    assert_eq!(failed["upstream_host"], "10.244.2.2:8080");
    assert_eq!(failed["x_request_id"].as_str().map(str::len), Some(36), "{failed}");
    // Upstream connections are pooled per client pod: requests on new client
    // connections (a GET, a HEAD and a 204 with no body to read, a GET) all
    // go on one tunnel to node-2 (none new if the requests above left one).
    let tunnels = [("reporter", "destination"), ("destination_app", "helloworld")];
    let opened = || metric(&m.agents[1].metrics(), "istio_tcp_connections_opened_total", &tunnels);
    let before = opened();
    for (flag, path) in [("-sSf", "/hello"), ("-sSfI", "/hello"), ("-sSf", "/status/204"), ("-sSf", "/hello")] {
        let out = test.cmd(&["curl", flag, "--max-time", "5", &format!("{api}{path}")]);
        assert!(out.status.success(), "{path}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let after = opened();
    assert!(after - before <= 1.0, "{} new tunnels for 4 requests: upstream connections not reused", after - before);
}

#[test]
fn virtual_service_weights_matches_timeout_retries_faults_and_headers() {
    if !require_root("virtual_service_weights_matches_timeout_retries_faults_and_headers") {
        return;
    }
    let rules = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ver, namespace: demo}
spec:
  host: ver
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ver, namespace: demo}
spec:
  hosts: [ver.demo.svc.cluster.local]
  http:
  - match: [{headers: {x-version: {exact: v2}}}]
    route: [{destination: {host: ver, subset: v2}}]
  - match: [{uri: {prefix: /delay}}]
    route: [{destination: {host: ver, subset: v1}}]
    timeout: 0.5s
  - match: [{uri: {prefix: /fail-once/retried}}]
    route: [{destination: {host: ver, subset: v1}}]
    retries: {attempts: 2, perTryTimeout: 1s, retryOn: 5xx}
  - match: [{uri: {prefix: /fail-once/}}]
    route: [{destination: {host: ver, subset: v1}}]
  - match: [{uri: {prefix: /old/}}]
    redirect: {uri: /new, authority: moved.example, redirectCode: 302}
  - match: [{uri: {prefix: /v1api/}}]
    rewrite: {uri: /}
    route: [{destination: {host: ver, subset: v2}}]
  - match: [{uri: {prefix: /mirrored}}]
    route: [{destination: {host: ver, subset: v1}}]
    mirror: {host: ver, subset: v2}
    mirrorPercentage: {value: 100}
  - match: [{uri: {exact: /teapot}}]
    route: [{destination: {host: ver, subset: v1}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
  - match: [{uri: {exact: /headers}}]
    route: [{destination: {host: ver, subset: v1}}]
    headers:
      request: {set: {x-set: one}, add: {x-added: two}, remove: [x-remove-me]}
      response: {set: {x-served-by: mesh}}
  - route:
    - {destination: {host: ver, subset: v1}, weight: 80}
    - {destination: {host: ver, subset: v2}, weight: 20}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hello-tcp, namespace: demo}
spec:
  hosts: [helloworld]
  tcp:
  - match: [{port: 7000}]
    route: [{destination: {host: ver, subset: v1, port: {number: 80}}}]
";
    let m = Mesh::start(rules, &[]);
    let test = m.pod("test");
    let url = format!("http://{VER_VIP}/hello");

    // 80/20 over 500 requests (one keep-alive connection: routing is per request).
    let urls: Vec<&str> = std::iter::repeat_n(url.as_str(), 500).collect();
    let mut args = vec!["curl", "-sSf", "--max-time", "60"];
    args.extend(&urls);
    let out = test.cmd(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let body = String::from_utf8_lossy(&out.stdout);
    let v1 = body.matches("hello from ver-v1;").count();
    let v2 = body.matches("hello from ver-v2;").count();
    assert_eq!(v1 + v2, 500, "{body}");
    // 400 expected; ±50 is more than five standard deviations.
    assert!((350..=450).contains(&v1), "v1 got {v1} of 500 (80% ± 10% expected)");

    // A header match wins over the weights.
    let mut args = vec!["curl", "-sSf", "--max-time", "10", "-H", "x-version: v2"];
    let ten: Vec<&str> = std::iter::repeat_n(url.as_str(), 10).collect();
    args.extend(&ten);
    let out = test.cmd(&args);
    assert_eq!(String::from_utf8_lossy(&out.stdout).matches("hello from ver-v2;").count(), 10);

    // A 2 s upstream under a 0.5 s route timeout: 504, promptly.
    let start = Instant::now();
    let out = test.cmd(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
        &format!("http://{VER_VIP}/delay/2000"),
    ]);
    let took = start.elapsed();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "504");
    assert!(took < Duration::from_millis(1800), "504 after {took:?}");

    // A retry turns an upstream 503 into a 200; without retries the 503 stands.
    let code = |path: &str| {
        let out =
            test.cmd(&["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{VER_VIP}{path}")]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(code("/fail-once/retried-1"), "200");
    assert_eq!(code("/fail-once/plain-1"), "503");
    // An abort fault at 100%: the agent answers, the upstream never sees it.
    assert_eq!(code("/teapot"), "418");
    // A `tcp` rule sends helloworld's echo port to ver-v1's HTTP server: the
    // bytes are not echoed but answered.
    let answer = test.run(|| {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from(([10, 96, 0, 10], 7000)), Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /hello HTTP/1.1\r\nHost: ver\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    });
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("hello from ver-v1;"), "{answer}");
    // Mirroring: v1 answers, v2 gets a copy with the `-shadow` authority.
    for i in 0..3 {
        let (ok, out) = curl(test, &format!("http://{VER_VIP}/mirrored/{i}"));
        assert!(ok && out.contains("hello from ver-v1;"), "{out}");
    }
    m.agents[0].wait_metrics(5, "mirrored copies", |t| {
        metric(t, "mesh_http_mirrored_requests_total", &[("result", "sent")]) >= 3.0
    });
    let seen = test.cmd(&["curl", "-sSf", &format!("http://{VER_V2_IP}:8080/seen")]);
    let seen = String::from_utf8_lossy(&seen.stdout);
    for i in 0..3 {
        assert!(seen.contains(&format!("ver-v2 /mirrored/{i} {VER_VIP}-shadow")), "{seen}");
    }
    // A redirect is answered by the agent; a rewrite changes the matched prefix.
    let out = test.cmd(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        &format!("http://{VER_VIP}/old/x"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "302 http://moved.example/new");
    let (ok, out) = curl(test, &format!("http://{VER_VIP}/v1api/hello"));
    assert!(ok && out.contains("hello from ver-v2;"), "{out}");
    // Header rules on the way in and out.
    let out = test.cmd(&[
        "curl",
        "-sS",
        "-D",
        "-",
        "-H",
        "x-remove-me: 1",
        "-H",
        "x-added: one",
        &format!("http://{VER_VIP}/headers"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(text.contains("x-served-by: mesh"), "{text}");
    assert!(text.contains("x-set: one") && text.contains("x-added: one") && text.contains("x-added: two"), "{text}");
    assert!(!text.contains("x-remove-me"), "{text}");

    let text = m.agents[0].wait_metrics(5, "request metrics", |t| {
        metric(t, "istio_requests_total", &[("destination_service", "ver.demo.svc.cluster.local")]) >= 520.0
    });
    let flagged =
        |code, flags| metric(&text, "istio_requests_total", &[("response_code", code), ("response_flags", flags)]);
    assert_eq!(flagged("418", "FI"), 1.0, "{text}");
    assert_eq!(flagged("503", "-"), 1.0, "{text}");
    let timeouts =
        [("destination_service", "ver.demo.svc.cluster.local"), ("response_code", "504"), ("response_flags", "UT")];
    assert_eq!(metric(&text, "istio_requests_total", &timeouts), 1.0, "{text}");
    let v1_ok = [("destination_version", "v1"), ("response_code", "200"), ("connection_security_policy", "mutual_tls")];
    // The split's v1 share, the retried request, the header request, three mirrored ones.
    assert_eq!(metric(&text, "istio_requests_total", &v1_ok), v1 as f64 + 5.0, "{text}");
}

#[test]
fn destination_rule_outlier_detection_and_connection_pool_overflow() {
    if !require_root("destination_rule_outlier_detection_and_connection_pool_overflow") {
        return;
    }
    let rules = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ver, namespace: demo}
spec:
  host: ver
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: demo}
spec:
  host: api
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}}
";
    let m = Mesh::start(rules, &[]);
    let test = m.pod("test");

    // ver-v1 fails every request: after 3 in a row it is ejected and only
    // ver-v2 answers (one keep-alive connection, requests balanced one by one).
    let url = format!("http://{VER_VIP}/unhealthy-on/ver-v1");
    let urls: Vec<&str> = std::iter::repeat_n(url.as_str(), 30).collect();
    let mut args = vec!["curl", "-s", "--max-time", "20"];
    args.extend(&urls);
    let out = test.cmd(&args);
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 30, "{lines:?}");
    let failed = lines.iter().filter(|l| l.contains("answers 503")).count();
    assert_eq!(failed, 3, "{lines:?}");
    assert!(lines[10..].iter().all(|l| l == "ver-v2 answers 200"), "{lines:?}");

    // maxRequestsPerConnection 1: five keep-alive requests from the client are
    // five upstream connections (five tunnels at node-2).
    let hello = format!("http://{API_VIP}/hello");
    let five: Vec<&str> = std::iter::repeat_n(hello.as_str(), 5).collect();
    let mut args = vec!["curl", "-sSf", "--max-time", "10"];
    args.extend(&five);
    assert!(test.cmd(&args).status.success());
    let tunnels = [("reporter", "destination"), ("destination_app", "helloworld")];
    m.agents[1].wait_metrics(5, "one tunnel per request", |t| {
        metric(t, "istio_tcp_connections_opened_total", &tunnels) == 5.0
    });

    // api allows one request in flight and one waiting: of 8 slow requests at
    // once, the others are refused at once with 503 UO.
    let slow = format!("http://{API_VIP}/delay/1500");
    let slows: Vec<&str> = std::iter::repeat_n(slow.as_str(), 8).collect();
    let mut args = vec!["curl", "-s", "--parallel", "--parallel-immediate", "--parallel-max", "8", "-o", "/dev/null"];
    args.extend(["-w", "%{http_code}\n", "--max-time", "10"]);
    args.extend(&slows);
    let start = Instant::now();
    let out = test.cmd(&args);
    let codes = String::from_utf8_lossy(&out.stdout).into_owned();
    let ok = codes.lines().filter(|c| *c == "200").count();
    let overflow = codes.lines().filter(|c| *c == "503").count();
    assert_eq!(ok + overflow, 8, "{codes}");
    assert!((1..=2).contains(&ok), "{codes}");
    assert!(start.elapsed() < Duration::from_secs(6), "the waiting request should run after the first");
    let text = m.agents[0].wait_metrics(5, "overflow metrics", |t| {
        metric(t, "istio_requests_total", &[("response_code", "503"), ("response_flags", "UO")]) >= overflow as f64
    });
    assert_eq!(
        metric(
            &text,
            "istio_requests_total",
            &[("destination_service", "api.demo.svc.cluster.local"), ("response_flags", "UO")]
        ),
        overflow as f64,
        "{text}"
    );
}

#[test]
fn websocket_through_the_mesh_across_nodes() {
    if !require_root("websocket_through_the_mesh_across_nodes") {
        return;
    }
    let m = Mesh::start("", &[]);
    // A real WebSocket client (tokio-tungstenite) in the test pod: many small
    // messages and a large one, each echoed intact, then a clean close.
    let echoed = m.pod("test").run(|| {
        runtime().block_on(async {
            use futures_util::{SinkExt as _, StreamExt as _};
            use tokio_tungstenite::tungstenite::Message;
            let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{WS_VIP}/echo")).await.unwrap();
            assert_eq!(resp.status(), 101);
            let mut count = 0usize;
            for i in 0..200 {
                let text = format!("message {i}");
                ws.send(Message::text(text.clone())).await.unwrap();
                let back = ws.next().await.unwrap().unwrap();
                assert_eq!(back, Message::text(text));
                count += 1;
            }
            let big: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
            ws.send(Message::binary(big.clone())).await.unwrap();
            let back = ws.next().await.unwrap().unwrap();
            assert!(back.into_data() == big, "large message changed");
            ws.close(None).await.unwrap();
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() {
                    break;
                }
            }
            count + 1
        })
    });
    assert_eq!(echoed, 201);
    let labels = [
        ("destination_service", "ws.demo.svc.cluster.local"),
        ("response_code", "101"),
        ("connection_security_policy", "mutual_tls"),
    ];
    m.agents[0].wait_metrics(5, "the upgrade request", |t| metric(t, "istio_requests_total", &labels) == 1.0);
}

#[test]
fn grpc_through_the_mesh_across_nodes() {
    if !require_root("grpc_through_the_mesh_across_nodes") {
        return;
    }
    let m = Mesh::start("", &[]);
    let (ok, streamed, failed) = m.pod("test").run(|| {
        runtime().block_on(async {
            let mut c = mesh_tests::grpc::client(format!("http://{GRPC_VIP}")).await;
            let ok =
                mesh_tests::grpc::unary(&mut c, mesh_tests::grpc::EchoMsg { text: "hi".into(), fail_with: 0 }).await;
            let msgs = (0..100).map(|i| mesh_tests::grpc::EchoMsg { text: format!("m{i}"), fail_with: 0 }).collect();
            let streamed = mesh_tests::grpc::bidi(&mut c, msgs).await;
            let failed =
                mesh_tests::grpc::unary(&mut c, mesh_tests::grpc::EchoMsg { text: "x".into(), fail_with: 5 }).await;
            (ok, streamed, failed)
        })
    });
    assert_eq!(ok.unwrap().text, "helloworld: hi");
    let streamed = streamed.unwrap();
    assert_eq!(streamed.len(), 100);
    assert!(streamed.iter().enumerate().all(|(i, t)| *t == format!("M{i}")), "{streamed:?}");
    // A non-OK status arrives intact, message included.
    let status = failed.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "failing as asked: x");

    let base = [
        ("destination_service", "grpc.demo.svc.cluster.local"),
        ("request_protocol", "grpc"),
        ("response_code", "200"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let with = |s: &'static str| [base.as_slice(), &[("grpc_response_status", s)]].concat();
    let text = m.agents[0].wait_metrics(5, "gRPC metrics", |t| {
        metric(t, "istio_requests_total", &with("0")) >= 2.0 && metric(t, "istio_requests_total", &with("5")) >= 1.0
    });
    assert_eq!(metric(&text, "istio_requests_total", &with("0")), 2.0, "{text}");
    assert_eq!(metric(&text, "istio_requests_total", &with("5")), 1.0, "{text}");
}

#[test]
fn more_tunnels_than_one_hbone_connection_carries() {
    if !require_root("more_tunnels_than_one_hbone_connection_carries") {
        return;
    }
    let m = Mesh::start("", &[]);
    // 1100 live connections from one pod to one destination identity on one
    // node: past the 1000 streams one HBONE connection may carry, so the pool
    // must open another; every connection, the last ones included, works.
    let echoed = m.pod("test").run(|| {
        let addr = SocketAddr::from(([10, 96, 0, 10], 7000));
        let mut conns: Vec<TcpStream> =
            (0..1100).map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap()).collect();
        let mut ok = 0;
        for (i, s) in conns.iter_mut().enumerate().rev().take(20) {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let msg = format!("connection {i}");
            s.write_all(msg.as_bytes()).unwrap();
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).unwrap();
            assert_eq!(back, msg.as_bytes());
            ok += 1;
        }
        ok
    });
    assert_eq!(echoed, 20);
    // Connections open on the source agent after protocol detection gives up
    // on their silence; the destination counts each tunnel as it arrives.
    let opened = |t: &str| metric(t, "istio_tcp_connections_opened_total", &[("reporter", "destination")]);
    let text = m.agents[1].wait_metrics(10, "1100 tunnels at the destination", |t| opened(t) >= 1100.0);
    assert!(opened(&text) >= 1100.0, "destination agent saw {} tunnels", opened(&text));
    // The second connection to the same peer resumed the first one's TLS session.
    let source = m.agents[0].metrics();
    let full = metric(&source, "mesh_hbone_connections_total", &[("handshake", "full")]);
    let resumed = metric(&source, "mesh_hbone_connections_total", &[("handshake", "resumed")]);
    assert!(full >= 1.0 && resumed >= 1.0, "HBONE handshakes: {full} full, {resumed} resumed");
}
