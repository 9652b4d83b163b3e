//! `cargo xtask bench [--quick]`: the mesh measured against a direct connection,
//! in one run, on the two-node network-namespace cluster.
//!
//! Each round measures every scenario **direct** (agents stopped: plain routing
//! between the pods) and then through the mesh (agents running, release build):
//! **same-node** (client and server pods on node-1, one agent) and
//! **cross-node** (server on node-2: both agents, mTLS/HBONE). Rounds alternate
//! direct and mesh windows; the table reports medians over rounds, and the
//! ratio or difference to direct measured in the same rounds. Results are also
//! written to `target/bench/latest.json`.
//!
//! Tools: iperf3 (bulk TCP), sockperf (TCP ping-pong at a fixed rate), oha
//! (HTTP/1.1 and HTTP/2, fixed rate with latency correction, and saturation),
//! h2load (gRPC unary with a framed body), nginx-light (the HTTP upstream), the
//! test library's tonic server (gRPC upstream).
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tests::{Agent, Cluster, Pod, agent::CaService, grpc, netns::Background};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);

const CONFIG: &str = r#"apiVersion: v1
kind: Node
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 172.18.0.2}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-2}
status: {addresses: [{type: InternalIP, address: 172.18.1.2}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {app: client}}
spec: {nodeName: node-1, serviceAccountName: client}
status: {podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: local, namespace: bench, labels: {app: server}}
spec: {nodeName: node-1, serviceAccountName: server}
status: {podIP: 10.244.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: remote, namespace: bench, labels: {app: server}}
spec: {nodeName: node-2, serviceAccountName: server}
status: {podIP: 10.244.2.2}
"#;

/// How long each measurement window runs, and how many rounds.
struct Plan {
    secs: u64,
    rounds: usize,
    /// Idle connections held open to measure memory per connection.
    idle: usize,
}

/// What `cargo xtask bench` was asked for.
pub struct Options {
    pub quick: bool,
    /// Scenario names to run; empty: all.
    pub only: Vec<String>,
    /// `perf record` the agents during the mesh windows.
    pub perf: bool,
    /// Window length, overriding the plan's.
    pub secs: Option<u64>,
    /// Rounds, overriding the plan's.
    pub rounds: Option<usize>,
    /// Added to the agents' command line.
    pub agent_args: Vec<String>,
}

impl Options {
    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
}

/// Every scenario, in the order they run; `idle` is the memory measurement.
const SCENARIOS: [&str; 11] = [
    "idle",
    "tcp_1_stream",
    "tcp_8_streams",
    "tcp_rr_1000mps",
    "http1_1000rps",
    "http1_saturation",
    "http2_1000rps",
    "http2_saturation",
    "new_connections",
    "grpc_unary",
    "hbone_handshakes",
];

/// `perf record -g` of the agents until dropped.
struct Perf(std::process::Child);

impl Perf {
    fn start(pids: &[u32], out: &Path) -> anyhow::Result<Perf> {
        let pids = pids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let child = Command::new("perf")
            .args(["record", "-F", "999", "-g", "-p", &pids, "-o"])
            .arg(out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("perf record (apt install linux-perf)")?;
        Ok(Perf(child))
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        // SAFETY: signalling our own child; SIGINT makes perf write its file.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

/// One number from one window.
type Sample = BTreeMap<&'static str, f64>;

fn spawn_in(netns: &str, args: &[&str]) -> anyhow::Result<Background> {
    Background::spawn_in(netns, args).with_context(|| format!("starting {args:?}"))
}

fn output_in(netns: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip").args(["netns", "exec", netns]).args(args).output()?;
    if !out.status.success() {
        bail!("{args:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// nginx-light serving a 1 KiB body: HTTP/1.1 on 8080, h2c on 8081.
fn nginx(pod: &Pod, dir: &Path) -> anyhow::Result<Background> {
    let prefix = dir.join(&pod.name);
    std::fs::create_dir_all(prefix.join("logs"))?;
    let body = "x".repeat(1024);
    let conf = format!(
        "worker_processes 1;\nworker_rlimit_nofile 70000;\ndaemon off;\npid {p}/nginx.pid;\nerror_log {p}/logs/error.log;\n\
         events {{ worker_connections 65536; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
           client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n  fastcgi_temp_path {p}/fastcgi;\n\
           uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n\
           server {{ listen 8080; location / {{ return 200 \"{body}\"; }} }}\n\
           server {{ listen 8081 http2; location / {{ return 200 \"{body}\"; }} }}\n}}\n",
        p = prefix.display()
    );
    let file = prefix.join("nginx.conf");
    std::fs::write(&file, conf)?;
    let file = file.display().to_string();
    let prefix = prefix.display().to_string();
    spawn_in(&pod.netns, &["nginx", "-e", "stderr", "-p", &prefix, "-c", &file])
}

/// Waits until something accepts on `ip:port` inside `netns`.
fn wait_port(netns: &str, ip: Ipv4Addr, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let netns = netns.to_owned();
    loop {
        let ns = netns.clone();
        let up = mesh_tests::netns::enter_and_spawn(&ns, move || {
            std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_millis(200)).is_ok()
        })
        .join()
        .unwrap_or(false);
        if up {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {ip}:{port} after 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn json(text: &str) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(text).with_context(|| format!("not JSON: {}", text.chars().take(300).collect::<String>()))
}

/// iperf3 for `secs`, `streams` parallel: received bits/s.
fn iperf(client: &Pod, ip: Ipv4Addr, secs: u64, streams: u32) -> anyhow::Result<Sample> {
    let out = output_in(
        &client.netns,
        &["iperf3", "-c", &ip.to_string(), "-t", &secs.to_string(), "-P", &streams.to_string(), "-J"],
    )?;
    let v = json(&out)?;
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3: no sum_received")?;
    Ok(BTreeMap::from([("gbit_per_s", bps / 1e9)]))
}

/// sockperf ping-pong at 1000 messages/s: p50 and p99 round trip (µs).
fn sockperf(client: &Pod, ip: Ipv4Addr, secs: u64) -> anyhow::Result<Sample> {
    let out = output_in(
        &client.netns,
        &[
            "sockperf",
            "ping-pong",
            "--tcp",
            "-i",
            &ip.to_string(),
            "-p",
            "11111",
            "-t",
            &secs.to_string(),
            "--mps",
            "1000",
        ],
    )?;
    let pct = |p: &str| {
        out.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    // sockperf reports half the round trip; the round trip is twice that.
    let p50 = pct("50.000").context("sockperf: no p50")? * 2.0;
    let p99 = pct("99.000").context("sockperf: no p99")? * 2.0;
    Ok(BTreeMap::from([("p50_us", p50), ("p99_us", p99)]))
}

/// oha against `url` for `secs`; `rate` None means as fast as it goes.
fn oha(client: &Pod, url: &str, secs: u64, rate: Option<u32>, args: &[&str]) -> anyhow::Result<Sample> {
    let oha = oha_binary();
    let dur = format!("{secs}s");
    let mut v = vec![oha.as_str(), "--no-tui", "--output-format", "json", "-z", &dur];
    let q;
    match rate {
        Some(r) => {
            q = r.to_string();
            v.extend(["-q", &q, "--latency-correction", "-c", "16"]);
        }
        None => v.extend(["-c", "32"]),
    }
    v.extend_from_slice(args);
    v.push(url);
    let out = output_in(&client.netns, &v)?;
    let j = json(&out)?;
    let summary = &j["summary"];
    let ok = summary["successRate"].as_f64().unwrap_or(0.0);
    let p = |k: &str| j["latencyPercentiles"][k].as_f64().map(|s| s * 1000.0).unwrap_or(f64::NAN);
    let codes = &j["statusCodeDistribution"];
    let good = codes["200"].as_f64().unwrap_or(0.0);
    let total: f64 = codes.as_object().map(|m| m.values().filter_map(|v| v.as_f64()).sum()).unwrap_or(0.0);
    Ok(BTreeMap::from([
        ("rps", summary["requestsPerSec"].as_f64().unwrap_or(0.0)),
        ("p50_ms", p("p50")),
        ("p90_ms", p("p90")),
        ("p99_ms", p("p99")),
        ("p99.9_ms", p("p99.9")),
        ("success", ok),
        ("non_200", total - good),
    ]))
}

fn oha_binary() -> String {
    std::env::var("OHA").unwrap_or_else(|_| "oha".into())
}

/// h2load: gRPC unary calls (framed protobuf body) for `secs`.
fn h2load(client: &Pod, ip: Ipv4Addr, secs: u64, body: &Path) -> anyhow::Result<Sample> {
    let url = format!("http://{ip}:9090/test.Echo/Unary");
    let out = output_in(
        &client.netns,
        &[
            "h2load",
            "-D",
            &secs.to_string(),
            "-c",
            "4",
            "-m",
            "16",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-d",
            &body.display().to_string(),
            &url,
        ],
    )?;
    let rps = out
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|s| s.trim().split(' ').next())
        .and_then(|s| s.parse::<f64>().ok())
        .context("h2load: no req/s")?;
    let failed = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| l.split(',').find(|p| p.contains("failed")))
        .and_then(|p| p.trim().split(' ').next())
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    let mean = out
        .lines()
        .find(|l| l.starts_with("time for request:"))
        .and_then(|l| l.split_whitespace().nth(5))
        .map(parse_h2load_time)
        .unwrap_or(f64::NAN);
    Ok(BTreeMap::from([("rps", rps), ("mean_ms", mean), ("failed", failed)]))
}

/// `123.45us`, `1.23ms`, `1.2s` → milliseconds.
fn parse_h2load_time(s: &str) -> f64 {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => f64::NAN,
    }
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// nginx's master and worker processes, from the pid file under `prefix`.
fn nginx_pids(prefix: &Path) -> Vec<u32> {
    let pid_file = prefix.join("nginx.pid");
    let deadline = Instant::now() + Duration::from_secs(5);
    let master = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<u32>().ok()) {
            break pid;
        }
        if Instant::now() > deadline {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let parent = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse::<u32>().ok()
    };
    let mut pids = vec![master];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok())
            && parent(pid) == Some(master)
        {
            pids.push(pid);
        }
    }
    pids
}

/// Context switches (voluntary and not) of every thread of a process.
fn context_switches(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return f64::NAN };
    let mut total = 0.0;
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .sum::<f64>();
    }
    total
}

/// Resident memory of a process in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Opens `n` connections to `ip:8080` from the client pod and leaves them idle
/// (no byte sent, so the agents sniff, then proxy them as TCP); returns the
/// agents' added resident memory per connection in KiB, each (source first).
fn idle_connections(
    client: &Pod,
    ip: Ipv4Addr,
    n: usize,
    agents: &[u32],
    proxied: impl Fn() -> f64,
) -> anyhow::Result<Vec<f64>> {
    let before: Vec<f64> = agents.iter().map(|p| rss_mib(*p)).collect();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<usize, String>>();
    let holder = mesh_tests::netns::enter_and_spawn(&client.netns, move || {
        let mut open = Vec::with_capacity(n);
        for _ in 0..n {
            match std::net::TcpStream::connect_timeout(&(ip, 8080).into(), Duration::from_secs(5)) {
                Ok(s) => open.push(s),
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("after {} connections: {e}", open.len())));
                    return;
                }
            }
        }
        let _ = ready_tx.send(Ok(open.len()));
        let _ = rx.recv();
        drop(open);
    });
    let opened = ready_rx.recv().context("idle connection thread")?;
    // Past protocol detection, every upstream opens: wait for the destination
    // agent to hold them all.
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxied() < n as f64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let held = proxied();
    let after: Vec<f64> = agents.iter().map(|p| rss_mib(*p)).collect();
    let _ = tx.send(());
    let _ = holder.join();
    let opened = opened.map_err(anyhow::Error::msg)?;
    if held < opened as f64 {
        bail!("only {held} of {opened} idle connections reached the destination agent");
    }
    Ok(after.iter().zip(&before).map(|(a, b)| (a - b) * 1024.0 / opened as f64).collect())
}

/// Raises this process's open-file limit (thousands of idle connections).
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid out-pointer, then the same struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// A gRPC request body: one framed `EchoMsg { text: "hi" }`.
fn grpc_body(dir: &Path) -> anyhow::Result<PathBuf> {
    let msg = [0x0a, 0x02, b'h', b'i'];
    let mut framed = vec![0u8, 0, 0, 0, msg.len() as u8];
    framed.extend_from_slice(&msg);
    let path = dir.join("grpc-body.bin");
    std::fs::write(&path, framed)?;
    Ok(path)
}

/// Client threads making new mTLS connections at once, each one at a time.
const HANDSHAKE_CLIENTS: usize = 4;

/// New mTLS connections per second to node-2's agent (its HBONE port), from
/// [`HANDSHAKE_CLIENTS`] threads in the network between the nodes with a
/// client certificate the mesh CA signed (made with openssl): full
/// handshakes, then resumed ones; and the agent's CPU per handshake (whose
/// inverse is what one core accepts per second). A connection counts once
/// the agent's first HTTP/2 frame arrives: it has checked the client's
/// certificate by then. Source agents pool their HBONE connections, so no
/// request path makes one per client connection: this measures the handshake.
fn hbone_handshakes(cluster: &Cluster, ca: &CaService, dir: &Path, secs: u64, agent: u32) -> anyhow::Result<Sample> {
    let ca_dir = ca.ca_dir();
    let (root, root_key) = (ca_dir.join("root-cert.pem"), ca_dir.join("root-key.pem"));
    let (key, csr, cert, ext) =
        (dir.join("client-key.pem"), dir.join("client.csr"), dir.join("client.pem"), dir.join("client.ext"));
    std::fs::write(
        &ext,
        "subjectAltName=URI:spiffe://cluster.local/ns/bench/sa/client\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth,serverAuth\n",
    )?;
    let openssl = |args: &[&str]| crate::run(Command::new("openssl").args(args).stdout(std::process::Stdio::null()));
    let p = |p: &Path| p.display().to_string();
    openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &p(&key)])?;
    openssl(&["req", "-new", "-key", &p(&key), "-subj", "/O=cluster.local", "-out", &p(&csr)])?;
    let (csr, root_key, ext, out) = (p(&csr), p(&root_key), p(&ext), p(&cert));
    let sign = ["x509", "-req", "-days", "1", "-in", &csr, "-CA", &p(&root), "-CAkey", &root_key, "-extfile", &ext];
    openssl(&[&sign[..], &["-out", &out]].concat()).context("signing the client certificate")?;
    let config = handshake::client_config(&cert, &key)?;
    let target = std::net::SocketAddr::from((cluster.nodes[1].ip, 15008));
    let mut sample = Sample::new();
    for (resume, rate_key, cpu_key) in
        [(false, "full_per_s", "full_agent_us"), (true, "resumed_per_s", "resumed_agent_us")]
    {
        let mut config = config.clone();
        if !resume {
            config.resumption = rustls::client::Resumption::disabled();
        }
        let config = std::sync::Arc::new(config);
        let cpu0 = cpu_seconds(agent);
        let start = Instant::now();
        let deadline = start + Duration::from_secs(secs);
        let clients: Vec<_> = (0..HANDSHAKE_CLIENTS)
            .map(|_| {
                let config = config.clone();
                mesh_tests::netns::enter_and_spawn(&cluster.net_ns, move || {
                    let mut made = 0u64;
                    while Instant::now() < deadline {
                        handshake::connect(&config, target)?;
                        made += 1;
                    }
                    anyhow::Ok(made)
                })
            })
            .collect();
        let mut made = 0;
        for c in clients {
            made += c.join().map_err(|_| anyhow::anyhow!("handshake client panicked"))??;
        }
        let (elapsed, made) = (start.elapsed().as_secs_f64(), made as f64);
        sample.insert(rate_key, made / elapsed);
        sample.insert(cpu_key, (cpu_seconds(agent) - cpu0) / made * 1e6);
    }
    Ok(sample)
}

/// A bare mTLS client of an agent's HBONE port, for [`hbone_handshakes`].
mod handshake {
    use std::{
        io::{Read as _, Write as _},
        net::{SocketAddr, TcpStream},
        path::Path,
        sync::Arc,
        time::Duration,
    };

    use anyhow::Context as _;
    use rustls::{
        ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
        pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
    };

    /// The server name under which node-2's agent holds the remote pod's certificate.
    const SERVER_NAME: &str = "server.bench.cluster.local.hbone";

    /// Checks the agent's signature (as a client must, for the CPU it costs)
    /// but not its certificate: the load generator trusts whom it measures.
    #[derive(Debug)]
    struct SignatureOnly(WebPkiSupportedAlgorithms);

    impl ServerCertVerifier for SignatureOnly {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_schemes()
        }
    }

    pub fn client_config(cert: &Path, key: &Path) -> anyhow::Result<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(key).context("the client key")?;
        let verifier = Arc::new(SignatureOnly(provider.signature_verification_algorithms));
        let mut config = ClientConfig::builder_with_provider(provider as Arc<CryptoProvider>)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// One connection: the handshake, the HTTP/2 preface, the agent's first frame.
    pub fn connect(config: &Arc<ClientConfig>, target: SocketAddr) -> anyhow::Result<()> {
        let mut tcp = TcpStream::connect_timeout(&target, Duration::from_secs(5)).context("connecting")?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(SERVER_NAME)?;
        let mut tls = ClientConnection::new(config.clone(), name)?;
        let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
        // The preface and an empty SETTINGS frame.
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").context("the handshake")?;
        let mut first = [0u8; 9];
        stream.read_exact(&mut first).context("the agent's first frame")?;
        anyhow::ensure!(first[3] == 0x4, "the agent's first frame is not SETTINGS: {first:?}");
        tls.send_close_notify();
        let _ = tls.complete_io(&mut tcp);
        Ok(())
    }
}

/// Every scenario against `ip`; `agents` (pids) are watched for CPU during
/// the request windows, and so is `server` (nginx's processes at `ip`): what
/// one hop of a fast server costs per request on this machine, in the same run.
fn scenarios(
    client: &Pod,
    ip: Ipv4Addr,
    plan: &Plan,
    options: &Options,
    body: &Path,
    agents: &[u32],
    server: &[u32],
) -> anyhow::Result<BTreeMap<&'static str, Sample>> {
    let s = plan.secs;
    let h1 = format!("http://{ip}:8080/");
    let h2 = format!("http://{ip}:8081/");
    let mut out = BTreeMap::new();
    let apart = ["idle", "hbone_handshakes"];
    for scenario in SCENARIOS.into_iter().filter(|s| !apart.contains(s) && options.wants(s)) {
        let cpu0: Vec<f64> = agents.iter().map(|p| cpu_seconds(*p)).collect();
        let switches0: f64 = agents.iter().map(|p| context_switches(*p)).sum();
        let server0: f64 = server.iter().map(|p| cpu_seconds(*p)).sum();
        let start = Instant::now();
        let mut sample = match scenario {
            "tcp_1_stream" => iperf(client, ip, s, 1)?,
            "tcp_8_streams" => iperf(client, ip, s, 8)?,
            "tcp_rr_1000mps" => sockperf(client, ip, s)?,
            "http1_1000rps" => oha(client, &h1, s, Some(1000), &[])?,
            "http1_saturation" => oha(client, &h1, s, None, &[])?,
            "http2_1000rps" => oha(client, &h2, s, Some(1000), &["--http2"])?,
            "http2_saturation" => oha(client, &h2, s, None, &["--http2"])?,
            "new_connections" => oha(client, &h1, s, None, &["--disable-keepalive"])?,
            "grpc_unary" => h2load(client, ip, s, body)?,
            other => bail!("no scenario {other}"),
        };
        let elapsed = start.elapsed().as_secs_f64();
        if let Some(rps) = sample.get("rps").copied().filter(|_| scenario.starts_with("http")) {
            let used = server.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - server0;
            sample.insert("server_vcpu_per_1000rps", used / elapsed / (rps / 1000.0));
        }
        if let Some(rps) = sample.get("rps").copied().filter(|_| !agents.is_empty()) {
            let used: f64 = agents.iter().zip(&cpu0).map(|(p, c)| cpu_seconds(*p) - c).sum();
            let per_agent = used / agents.len() as f64;
            // vCPU per 1000 rps, per agent: CPU seconds per second, per thousand rps.
            sample.insert("agent_vcpu_per_1000rps", per_agent / elapsed / (rps / 1000.0));
            // Thread sleeps and wakes per request, per agent: what costs most at a fixed rate.
            let switches = agents.iter().map(|p| context_switches(*p)).sum::<f64>() - switches0;
            sample.insert("agent_switches_per_request", switches / agents.len() as f64 / (rps * elapsed));
        }
        out.insert(scenario, sample);
    }
    Ok(out)
}

/// The bench's files (nginx's prefixes, the gRPC body, the client
/// certificate), removed however the run ends.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Results by path (`direct_same_node`, `mesh_same_node`, …) → scenario → samples per round.
type Results = BTreeMap<&'static str, BTreeMap<&'static str, Vec<Sample>>>;

fn record(results: &mut Results, path: &'static str, got: BTreeMap<&'static str, Sample>) {
    for (scenario, sample) in got {
        results.entry(path).or_default().entry(scenario).or_default().push(sample);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

pub fn run(options: Options) -> anyhow::Result<()> {
    let quick = options.quick;
    if let Some(unknown) = options.only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
        bail!("no scenario {unknown:?}; there are: {}", SCENARIOS.join(", "));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark creates network namespaces and loads eBPF: run it as root (sudo cargo xtask bench)");
    }
    for tool in ["iperf3", "sockperf", "nginx", "h2load"] {
        if !crate::succeeds(Command::new("sh").args(["-c", &format!("command -v {tool}")])) {
            bail!("{tool} not found: run `cargo xtask setup` first");
        }
    }
    if !crate::succeeds(Command::new(oha_binary()).arg("--version")) {
        bail!("oha not found: run `cargo xtask setup` first (it installs oha from crates.io)");
    }
    let mut plan =
        if quick { Plan { secs: 2, rounds: 1, idle: 2000 } } else { Plan { secs: 10, rounds: 3, idle: 10_000 } };
    plan.secs = options.secs.unwrap_or(plan.secs);
    plan.rounds = options.rounds.unwrap_or(plan.rounds).max(1);
    raise_fd_limit();
    let root = crate::workspace_root()?;
    crate::run(Command::new("cargo").args(["build", "--release", "--package", "mesh-agent"]).current_dir(&root))?;
    // SAFETY: still single-threaded; the harness reads these when it starts agents.
    unsafe {
        std::env::set_var("MESH_AGENT_BIN", root.join("target/release/mesh-agent"));
        std::env::set_var("MESH_AGENT_LOG", "warn");
    }
    let mut cluster = Cluster::two_nodes();
    cluster.add_pod_on(0, "client", CLIENT);
    cluster.add_pod_on(0, "local", LOCAL);
    cluster.add_pod_on(1, "remote", REMOTE);
    let work = WorkDir(std::env::temp_dir().join(format!("mesh-bench-{}", cluster.id)));
    std::fs::create_dir_all(&work.0)?;
    let work = &work.0;
    let body = grpc_body(work)?;
    let mut servers = Vec::new();
    for (name, ip) in [("local", LOCAL), ("remote", REMOTE)] {
        let pod = cluster.pod(name);
        servers.push(spawn_in(&pod.netns, &["iperf3", "-s"])?);
        servers.push(spawn_in(&pod.netns, &["sockperf", "server", "--tcp", "-i", "0.0.0.0", "-p", "11111"])?);
        servers.push(nginx(pod, work)?);
        grpc::serve(pod, 9090);
        for port in [5201, 11111, 8080, 8081, 9090] {
            wait_port(&cluster.pod("client").netns, ip, port)?;
        }
    }
    let nginx_local = nginx_pids(&work.join("local"));
    let nginx_remote = nginx_pids(&work.join("remote"));
    let ca = CaService::start(&cluster, CONFIG);
    let client = cluster.pod("client");
    let mut results = Results::new();
    let mut agent_rss = Vec::new();
    let mut per_conn = Vec::new();
    let started = Instant::now();
    for round in 1..=plan.rounds {
        eprintln!("round {round}/{}: direct (no agent)", plan.rounds);
        record(&mut results, "direct_same_node", scenarios(client, LOCAL, &plan, &options, &body, &[], &nginx_local)?);
        record(
            &mut results,
            "direct_cross_node",
            scenarios(client, REMOTE, &plan, &options, &body, &[], &nginx_remote)?,
        );
        eprintln!("round {round}/{}: through the mesh", plan.rounds);
        let extra = |i: usize| {
            let mut a = ca.agent_args(&cluster.nodes[i].name);
            // As deployed: no access log, the default resync interval.
            a.extend(["--access-log", "off", "--resync-interval", "1s"].map(String::from));
            a.extend(options.agent_args.iter().cloned());
            a
        };
        let agents: Vec<Agent> = (0..2).map(|i| Agent::start_on(&cluster, i, CONFIG, &extra(i))).collect();
        let pids: Vec<u32> = agents.iter().filter_map(Agent::pid).collect();
        std::thread::sleep(Duration::from_millis(500));
        agent_rss.extend(pids.iter().map(|p| rss_mib(*p)));
        // On fresh agents: a heap grown by the load runs would hide the cost.
        let active = |a: &Agent| mesh_tests::agent::metric(&a.metrics(), "mesh_tcp_active_connections", &[]);
        if options.wants("idle") {
            per_conn.push(idle_connections(client, REMOTE, plan.idle, &pids, || active(&agents[1]))?);
            // Let both agents finish closing them before anything is timed.
            let deadline = Instant::now() + Duration::from_secs(30);
            while agents.iter().any(|a| active(a) > 0.0) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        std::fs::create_dir_all(root.join("target/bench"))?;
        let perf = match options.perf {
            true => Some(Perf::start(&pids, &root.join("target/bench/perf.data"))?),
            false => None,
        };
        record(
            &mut results,
            "mesh_same_node",
            scenarios(client, LOCAL, &plan, &options, &body, &pids[..1], &nginx_local)?,
        );
        record(
            &mut results,
            "mesh_cross_node",
            scenarios(client, REMOTE, &plan, &options, &body, &pids, &nginx_remote)?,
        );
        if options.wants("hbone_handshakes") {
            let sample = hbone_handshakes(&cluster, &ca, work, plan.secs, pids[1])?;
            record(&mut results, "mesh_cross_node", BTreeMap::from([("hbone_handshakes", sample)]));
        }
        drop(perf);
        drop(agents);
    }
    drop(ca);
    drop(servers);
    drop(cluster);
    let each = |i: usize| median(per_conn.iter().filter_map(|v: &Vec<f64>| v.get(i).copied()).collect());
    let idle = Idle {
        rss_mib: median(agent_rss),
        kib_per_connection: median(per_conn.iter().map(|v| v.iter().sum()).collect()),
        source_kib: each(0),
        destination_kib: each(1),
        connections: plan.idle,
    };
    report(&results, &idle, quick, started.elapsed())
}

/// Agent memory: idle, and per idle proxied connection (both agents, cross-node).
struct Idle {
    rss_mib: f64,
    kib_per_connection: f64,
    source_kib: f64,
    destination_kib: f64,
    connections: usize,
}

/// The table, and `target/bench/latest.json`.
fn report(results: &Results, idle: &Idle, quick: bool, took: Duration) -> anyhow::Result<()> {
    let med = |path: &str, scenario: &str, key: &str| {
        let samples = results.get(path).and_then(|s| s.get(scenario)).map(Vec::as_slice).unwrap_or(&[]);
        median(samples.iter().filter_map(|s| s.get(key).copied()).collect())
    };
    let rows: [(&str, &str, &str, bool); 24] = [
        ("tcp_1_stream", "gbit_per_s", "Gbit/s", true),
        ("tcp_8_streams", "gbit_per_s", "Gbit/s", true),
        ("tcp_rr_1000mps", "p50_us", "µs p50", false),
        ("tcp_rr_1000mps", "p99_us", "µs p99", false),
        ("http1_1000rps", "p50_ms", "ms p50", false),
        ("http1_1000rps", "p90_ms", "ms p90", false),
        ("http1_1000rps", "p99_ms", "ms p99", false),
        ("http1_1000rps", "p99.9_ms", "ms p99.9", false),
        ("http1_saturation", "rps", "req/s", true),
        ("http2_1000rps", "p50_ms", "ms p50", false),
        ("http2_1000rps", "p90_ms", "ms p90", false),
        ("http2_1000rps", "p99_ms", "ms p99", false),
        ("http2_saturation", "rps", "req/s", true),
        ("new_connections", "rps", "conn/s", true),
        ("grpc_unary", "rps", "req/s", true),
        ("grpc_unary", "mean_ms", "ms mean", false),
        ("http1_saturation", "non_200", "errors", false),
        ("http1_1000rps", "agent_vcpu_per_1000rps", "vCPU/1k rps", false),
        ("http2_1000rps", "agent_vcpu_per_1000rps", "vCPU/1k rps", false),
        ("http1_1000rps", "server_vcpu_per_1000rps", "nginx vCPU/1k", false),
        ("http2_1000rps", "server_vcpu_per_1000rps", "nginx vCPU/1k", false),
        ("http1_1000rps", "agent_switches_per_request", "switches/req", false),
        ("http2_1000rps", "agent_switches_per_request", "switches/req", false),
        ("grpc_unary", "failed", "failed", false),
    ];
    println!(
        "\n{:<18} {:<12} {:>10} {:>10} {:>8} {:>10} {:>10} {:>8}",
        "scenario", "unit", "direct", "same-node", "ratio", "direct", "cross-node", "ratio"
    );
    println!("{:<31} {:>29} {:>30}", "", "(node-1 → node-1)", "(node-1 → node-2)");
    let mut table = Vec::new();
    for (scenario, key, unit, higher_better) in rows {
        let d1 = med("direct_same_node", scenario, key);
        let m1 = med("mesh_same_node", scenario, key);
        let d2 = med("direct_cross_node", scenario, key);
        let m2 = med("mesh_cross_node", scenario, key);
        if [d1, m1, d2, m2].iter().all(|v| v.is_nan()) {
            continue; // not run (`--only`)
        }
        // Throughputs as a ratio to direct; latencies as the time added.
        let cmp = |d: f64, m: f64| if higher_better { format!("{:.2}x", m / d) } else { format!("{:+.3}", m - d) };
        println!(
            "{scenario:<18} {unit:<12} {d1:>10.3} {m1:>10.3} {:>8} {d2:>10.3} {m2:>10.3} {:>8}",
            cmp(d1, m1),
            cmp(d2, m2)
        );
        table.push(serde_json::json!({
            "scenario": scenario, "metric": key, "unit": unit,
            "direct_same_node": d1, "mesh_same_node": m1,
            "direct_cross_node": d2, "mesh_cross_node": m2,
        }));
    }
    // An agent's CPU per request against nginx's (one socket in, one out) in
    // the direct run: the ratio travels between machines better than vCPU does.
    for scenario in ["http1_1000rps", "http2_1000rps"] {
        let nginx = |path| med(path, scenario, "server_vcpu_per_1000rps");
        let agent = |path| med(path, scenario, "agent_vcpu_per_1000rps");
        let (same, cross) = (
            agent("mesh_same_node") / nginx("direct_same_node"),
            agent("mesh_cross_node") / nginx("direct_cross_node"),
        );
        if same.is_finite() || cross.is_finite() {
            println!("{scenario}: CPU per request, each agent / nginx: same-node {same:.1}x, cross-node {cross:.1}x");
        }
    }
    let hs = |key: &str| med("mesh_cross_node", "hbone_handshakes", key);
    if hs("full_per_s").is_finite() {
        let (full, resumed) = (hs("full_agent_us"), hs("resumed_agent_us"));
        println!(
            "new mTLS connections to node-2's agent ({HANDSHAKE_CLIENTS} client threads on the same CPUs): \
             full {:.0}/s ({full:.0} µs of agent CPU each: {:.0}/s per core), \
             resumed {:.0}/s ({resumed:.0} µs: {:.0}/s per core)",
            hs("full_per_s"),
            1e6 / full,
            hs("resumed_per_s"),
            1e6 / resumed
        );
    }
    println!(
        "agent RSS idle: {:.1} MiB; {} idle connections cross-node: {:.2} KiB per connection (both agents: source {:.2}, destination {:.2})",
        idle.rss_mib, idle.connections, idle.kib_per_connection, idle.source_kib, idle.destination_kib
    );
    let out = crate::workspace_root()?.join("target/bench");
    std::fs::create_dir_all(&out)?;
    let doc = serde_json::json!({
        "quick": quick,
        "seconds": took.as_secs(),
        "agent_rss_idle_mib": idle.rss_mib,
        "idle_connections": idle.connections,
        "agent_kib_per_idle_connection": idle.kib_per_connection,
        "source_agent_kib_per_idle_connection": idle.source_kib,
        "destination_agent_kib_per_idle_connection": idle.destination_kib,
        "rows": table,
        "samples": results,
    });
    let file = out.join("latest.json");
    std::fs::write(&file, serde_json::to_string_pretty(&doc)?)?;
    println!("written: {} ({} s)", file.display(), took.as_secs());
    Ok(())
}
