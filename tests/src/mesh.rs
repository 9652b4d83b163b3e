//! The two-node mesh the network tests share: node-1 and node-2 with an
//! agent each and the CA service, namespaces `demo` and `other` (meshed) and
//! `plain`, pods `test`, `sleep`, `outsider`, `ver-v2` on node-1 and
//! `helloworld`, `ver-v1` on node-2, with their servers, and the helpers the
//! tests read it with (curl, metrics, certificates, a packet capture).
use std::{
    io::Read as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    Agent, Cluster, Pod,
    agent::{CaService, metric},
    fixture::{Fixture, PodSpec, port},
    servers,
};

pub const VIP: &str = "10.96.0.10";
/// Service `api`: port 80 named `http-api`, to helloworld's HTTP server on 8080.
pub const API_VIP: &str = "10.96.0.11";
/// Service `ws`: port 80 named `http-ws`, to helloworld's WebSocket echo on 8090.
pub const WS_VIP: &str = "10.96.0.13";
/// Service `grpc`: port 80 named `grpc`, to helloworld's tonic server on 9090.
pub const GRPC_VIP: &str = "10.96.0.14";
pub const TEST_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
pub const OUTSIDER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
pub const SLEEP_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 4);
pub const HELLO_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
/// Service `ver`: v1 on node-2, v2 on node-1 (HTTP servers on 8080), for routing rules.
pub const VER_VIP: &str = "10.96.0.12";
pub const VER_V1_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 3);
pub const VER_V2_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
pub const TEST_ID: &str = "spiffe://cluster.local/ns/demo/sa/test";
pub const HELLO_ID: &str = "spiffe://cluster.local/ns/demo/sa/helloworld";

/// Nodes node-1 and node-2; namespaces `demo` and `other` (meshed) and
/// `plain`; `test` (demo/test), `sleep` (other/sleep), `outsider` (plain) and
/// `ver-v2` on node-1; `helloworld` (demo/helloworld) and `ver-v1` on node-2;
/// Services helloworld, api, ws, grpc (to helloworld) and ver (v1 and v2).
pub fn fixture() -> Fixture {
    let mut f = Fixture::two_nodes([&[], &[]]);
    // Each node's pods' range (host-local IPAM): a pod not captured yet is gated.
    f.objects.pod_cidr("node-1", "10.244.1.0/24").pod_cidr("node-2", "10.244.2.0/24");
    f.namespace("demo", true).namespace("other", true).namespace("plain", false);
    let hello = PodSpec {
        ports: &[("http", 9095), ("echo", 7000)],
        ..PodSpec::app("demo", &[("app", "helloworld"), ("version", "v1")])
    };
    let ver_v1 = PodSpec::app("demo", &[("app", "ver"), ("version", "v1")]);
    let ver_v2 = PodSpec::app("demo", &[("app", "ver"), ("version", "v2")]);
    f.add_pod(0, "test", TEST_IP, PodSpec::app("demo", &[("app", "test")]))
        .add_pod(0, "sleep", SLEEP_IP, PodSpec::app("other", &[("app", "sleep")]))
        .add_pod(
            0,
            "outsider",
            OUTSIDER_IP,
            PodSpec { service_account: None, ..PodSpec::app("plain", &[("app", "outsider")]) },
        )
        .add_pod(1, "helloworld", HELLO_IP, hello)
        .add_pod(1, "ver-v1", VER_V1_IP, ver_v1)
        .add_pod(0, "ver-v2", VER_V2_IP, ver_v2);
    let helloworld = &[("app", "helloworld")];
    f.service("demo", "helloworld", VIP, helloworld, &[port("http", 9095, "http"), port("tcp-echo", 7000, "echo")])
        .service("demo", "api", API_VIP, helloworld, &[port("http-api", 80, "8080")])
        .service("demo", "ws", WS_VIP, helloworld, &[port("http-ws", 80, "8090")])
        .service("demo", "grpc", GRPC_VIP, helloworld, &[port("grpc", 80, "9090")])
        .service("demo", "ver", VER_VIP, &[("app", "ver")], &[port("http", 80, "8080")]);
    f
}

pub struct Mesh {
    // Field order is drop order: agents before the CA, the cluster last.
    pub agents: Vec<Agent>,
    pub ca: CaService,
    /// The objects of [`fixture`], without a test's own.
    base: String,
    pub c: Cluster,
}

impl Mesh {
    /// Two nodes, the CA service, an agent on each node using it, servers up.
    pub fn start(extra: &str, agent_args: &[&str]) -> Mesh {
        Mesh::start_with(fixture(), extra, agent_args)
    }

    /// As [`Mesh::start`], from [`fixture`] as a test changed it.
    pub fn start_with(f: Fixture, extra: &str, agent_args: &[&str]) -> Mesh {
        let base = f.yaml("");
        let c = f.cluster;
        servers::http_api(c.pod("ver-v1"), 8080);
        servers::http_api(c.pod("ver-v2"), 8080);
        servers::http_hello(c.pod("helloworld"), 9095);
        servers::echo(c.pod("helloworld"), 7000);
        servers::http_hello(c.pod("test"), 9095);
        servers::http_api(c.pod("helloworld"), 8080);
        servers::websocket_echo(c.pod("helloworld"), 8090);
        crate::grpc::serve(c.pod("helloworld"), 9090);
        let cfg = format!("{base}{extra}");
        let ca = CaService::start(&c, &cfg);
        let agents = (0..2)
            .map(|i| {
                let mut args = ca.agent_args(&c.nodes[i].name);
                args.extend(agent_args.iter().map(|s| s.to_string()));
                Agent::start_on(&c, i, &cfg, &args)
            })
            .collect();
        Mesh { agents, ca, base, c }
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.c.pod(name)
    }

    /// Replaces both agents' configuration and waits until both loaded it.
    pub fn set_config(&self, extra: &str) {
        self.set_config_of(&[0, 1], extra);
    }

    /// Replaces the configuration of the agents named by index (the others
    /// keep theirs) and waits until they loaded it.
    pub fn set_config_of(&self, agents: &[usize], extra: &str) {
        let agents: Vec<&Agent> = agents.iter().map(|&i| &self.agents[i]).collect();
        let before: Vec<f64> = agents.iter().map(|a| loads(a)).collect();
        for a in &agents {
            a.write_config(&format!("{}{extra}", self.base));
        }
        for (a, n) in agents.iter().zip(before) {
            a.wait_metrics(10, "configuration reload", |t| {
                metric(t, "mesh_config_loads_total", &[("result", "success")]) > n
            });
        }
    }
}

pub fn loads(a: &Agent) -> f64 {
    metric(&a.metrics(), "mesh_config_loads_total", &[("result", "success")])
}

/// The serial of the certificate an agent holds for `identity`.
pub fn serial(a: &Agent, identity: &str) -> Option<String> {
    let (_, dump) = a.admin_get("/config_dump")?;
    let v: serde_json::Value = serde_json::from_str(&dump).ok()?;
    let certs = v["certificates"].as_array()?;
    let c = certs.iter().find(|c| c["identity"] == identity)?;
    Some(c["serial"].as_str()?.to_owned())
}

/// curl from the cluster network's namespace: a client outside the mesh.
pub fn curl_outside(c: &Cluster, url: &str) -> (bool, String) {
    let out = c.net_cmd(&["curl", "-sSf", "--max-time", "5", url]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

pub fn failures(a: &Agent, reason: &str) -> f64 {
    metric(&a.metrics(), "mesh_tcp_connection_failures_total", &[("reason", reason)])
}

/// curl from a pod; an HTTP error status (such as a policy's 403) is a failure.
pub fn curl(pod: &Pod, url: &str) -> (bool, String) {
    let out = pod.cmd(&["curl", "-sSf", "--max-time", "5", url]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A packet capture on every interface of the cluster network's namespace.
pub struct Capture {
    child: std::process::Child,
    file: std::path::PathBuf,
    /// tcpdump's stderr, kept open so its exit summary does not hit SIGPIPE.
    stderr: std::process::ChildStderr,
}

impl Capture {
    pub fn start(c: &Cluster) -> Capture {
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
    pub fn stop(&mut self) -> Vec<u8> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let mut summary = String::new();
        let _ = self.stderr.read_to_string(&mut summary);
        eprintln!("tcpdump: {summary}");
        std::fs::read(&self.file).unwrap()
    }

    /// `tcpdump -r` of the file with a filter: one line per packet.
    pub fn read(&self, filter: &str) -> String {
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

/// A runtime for the in-test async clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}
