//! Runs the real `mesh-agent` binary inside a test node's namespace.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::netns::{Cluster, enter_and_spawn};

pub const NODE: &str = "node-1";

/// The agent binary: `MESH_AGENT_BIN`, or `mesh-agent` next to this test's
/// target directory (`cargo xtask test` builds it first).
/// The `mesh-cni` plugin built beside the agent (`MESH_CNI_BIN` overrides).
pub fn cni_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_CNI_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let bin = [dir.join("mesh-cni"), dir.parent().unwrap().join("mesh-cni")].into_iter().find(|p| p.exists());
    bin.unwrap_or_else(|| panic!("no mesh-cni beside {} (cargo build -p mesh-cni)", dir.display()))
}

pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_AGENT_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> (tests) or target/<profile>/lab (demo, bench).
    let dir = exe.parent().unwrap();
    let bin = [dir.join("mesh-agent"), dir.parent().unwrap().join("mesh-agent")]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| dir.join("mesh-agent"));
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p mesh-agent`, or run `cargo xtask test`)",
        bin.display()
    );
    bin
}

/// Where a test agent's configuration comes from.
enum Source<'a> {
    /// YAML, written to the agent's config directory.
    Files(&'a str),
    /// The config directory as it is (a replacement reads what its
    /// predecessor reads).
    Written,
    /// The API server a kubeconfig names.
    Kubernetes(&'a std::path::Path),
}

pub struct Agent {
    child: Option<Child>,
    node_ns: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    /// Removes `dir` when dropped (not once a replacement shares it).
    owns_dir: bool,
}

impl Agent {
    /// Starts the agent on the first node of `cluster` with `config` (YAML),
    /// with its embedded CA, and waits for `/ready`.
    pub fn start(cluster: &Cluster, config: &str) -> Self {
        Self::start_on(cluster, 0, config, &[])
    }

    /// Starts the agent on node `node` with extra arguments (without
    /// `--ca-addr`, the CA is embedded, in a directory of its own).
    pub fn start_on(cluster: &Cluster, node: usize, config: &str, extra: &[String]) -> Self {
        Self::launch(cluster, node, Source::Files(config), extra, "agent.log")
    }

    /// Starts another agent on this one's node with the same state and
    /// configuration directories, as a rolling upgrade does, and waits until
    /// it says it took the sockets over (this one then stops accepting,
    /// drains and exits by itself; see [`Agent::wait_exit`]).
    pub fn replace(&mut self, cluster: &Cluster, node: usize, extra: &[String]) -> Agent {
        self.owns_dir = false;
        let n = (1..).find(|n| !self.dir.join(format!("agent-{n}.log")).exists()).unwrap();
        let mut next = Self::spawn(cluster, node, Source::Written, extra, &format!("agent-{n}.log"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !next.log_text().contains("took over") {
            if let Some(status) = next.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("the replacement exited with {status}:\n{}", next.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "no handover after 30s:\n{}\nold:\n{}",
                next.log_text(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        next
    }

    /// Waits (up to `secs`) for the agent to exit on its own.
    pub fn wait_exit(&mut self, secs: u64) -> ExitStatus {
        let mut child = self.child.take().expect("agent running");
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("mesh-agent did not exit within {secs}s:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the agent on node `node` with `--kubernetes`, reading the API
    /// server `kubeconfig` names, and waits for `/ready`.
    pub fn start_kubernetes(cluster: &Cluster, node: usize, kubeconfig: &std::path::Path, extra: &[String]) -> Self {
        Self::launch(cluster, node, Source::Kubernetes(kubeconfig), extra, "agent.log")
    }

    fn launch(cluster: &Cluster, node: usize, source: Source<'_>, extra: &[String], log: &str) -> Self {
        let mut agent = Self::spawn(cluster, node, source, extra, log);
        agent.wait_ready();
        agent
    }

    fn spawn(cluster: &Cluster, node: usize, source: Source<'_>, extra: &[String], log: &str) -> Self {
        let node = &cluster.nodes[node];
        let dir = std::env::temp_dir().join(format!("mesh-test-{}-{}", cluster.id, node.name));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(log);
        let mut agent = Self { child: None, node_ns: node.ns.clone(), dir, log, owns_dir: true };
        let (source_args, kubeconfig): (Vec<std::ffi::OsString>, _) = match source {
            Source::Files(config) => {
                agent.write_config(config);
                (vec!["--config".into(), agent.dir.join("config").into()], None)
            }
            Source::Written => (vec!["--config".into(), agent.dir.join("config").into()], None),
            Source::Kubernetes(kubeconfig) => (vec!["--kubernetes".into()], Some(kubeconfig)),
        };
        let stderr = std::fs::File::create(&agent.log).unwrap();
        let mut command = Command::new("ip");
        if let Some(k) = kubeconfig {
            command.env("KUBECONFIG", k);
        }
        let child = command
            .args(["netns", "exec", &node.ns])
            .arg(binary())
            .args(["run", "--node", &node.name, "--drain-timeout", "2s"])
            // Tests reload often; a caller (the bench) may ask for the default.
            .args(match extra.iter().any(|a| a == "--resync-interval") {
                true => &[][..],
                false => &["--resync-interval", "200ms"][..],
            })
            .arg("--state-dir")
            .arg(agent.dir.join("state"))
            .args(extra)
            // MESH_AGENT_ARGS: more flags for every agent a test starts (to
            // run the suite with an experimental option on).
            .args(std::env::var("MESH_AGENT_ARGS").unwrap_or_default().split_whitespace())
            .args(source_args)
            .env(
                "RUST_LOG",
                std::env::var("MESH_AGENT_LOG")
                    .unwrap_or_else(|_| "info,mesh_agent=debug,netlink_packet_route=error".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        agent.child = Some(child);
        agent
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("mesh-agent exited with {status} before ready:\n{}", self.log_text());
            }
            if self.admin_get("/ready").is_some_and(|(code, _)| code == 200) {
                return;
            }
            assert!(Instant::now() < deadline, "mesh-agent not ready after 30s:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Replaces the config file atomically (write + rename), as a ConfigMap update would.
    pub fn write_config(&self, yaml: &str) {
        let cfg = self.dir.join("config");
        std::fs::create_dir_all(&cfg).unwrap();
        let tmp = self.dir.join("cluster.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, cfg.join("cluster.yaml")).unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET from the admin server: (status, body), or None if unreachable.
    pub fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        enter_and_spawn(&self.node_ns, move || {
            let mut s = TcpStream::connect_timeout(&"127.0.0.1:15000".parse().unwrap(), Duration::from_secs(2)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            s.write_all(req.as_bytes()).ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            let code = out.split(' ').nth(1)?.parse().ok()?;
            let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
            Some((code, body))
        })
        .join()
        .unwrap()
    }

    pub fn metrics(&self) -> String {
        self.admin_get("/metrics").expect("metrics").1
    }

    /// Polls `cond` on the metrics until it holds, or panics after `secs`.
    pub fn wait_metrics(&self, secs: u64, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let m = self.metrics();
            if cond(&m) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; metrics:\n{m}\nlog:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash or an OOM kill would end it, and wait.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("agent running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM, then wait for exit (SIGKILL after 15 s).
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("mesh-agent did not exit within 15s of SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A clean exit removes the agent's routing rule.
        if let Some(child) = self.child.take() {
            terminate(child, Duration::from_secs(10));
        }
        if std::thread::panicking() {
            eprintln!("--- mesh-agent log ({}) ---\n{}", self.log.display(), self.log_text());
        }
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A BPF file system mounted in the test's own (root) mount namespace, so
/// that what an agent pins there outlives the agent (one mounted inside `ip
/// netns exec`'s private mount namespace dies with the process). Unmounted on
/// drop, which also detaches whatever is still pinned.
pub struct BpfFs {
    pub path: PathBuf,
}

impl BpfFs {
    pub fn mount(cluster: &Cluster) -> Self {
        let path = PathBuf::from(format!("/run/mesh-test-{}-bpf", cluster.id));
        std::fs::create_dir_all(&path).unwrap();
        let fs = Self { path };
        crate::netns::sh(&["mount", "-t", "bpf", "bpf", fs.path.to_str().unwrap()]);
        fs
    }

    /// `run` arguments that pin there.
    pub fn agent_args(&self) -> Vec<String> {
        vec!["--bpffs".into(), self.path.display().to_string()]
    }

    /// The agent's pins, sorted.
    pub fn pins(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(self.path.join("mesh-agent")) else { return Vec::new() };
        let mut names: Vec<String> =
            dir.filter_map(Result::ok).filter_map(|e| e.file_name().into_string().ok()).collect();
        names.sort();
        names
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = crate::netns::sh_any(&["umount", "-l", self.path.to_str().unwrap()]);
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// SIGTERM, up to `grace` to exit, then SIGKILL.
fn terminate(mut child: Child, grace: Duration) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Sum of the samples of `name` whose labels include every `(key, value)`.
/// A process's resident memory in MiB (NaN when it cannot be read).
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An access log file's text once `done` holds for it, or after 5 s (the
/// agent's writer thread writes lines a moment after their requests).
pub fn wait_for_log(path: &std::path::Path, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if done(&text) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The CA service (`mesh-agent ca`), run in the cluster network's namespace.
pub struct CaService {
    child: Option<Child>,
    pub dir: PathBuf,
    pub addr: String,
    pub log: PathBuf,
}

impl CaService {
    /// Starts on `172.18.0.1:15012` in the `net` namespace with `config`, and
    /// waits until the root and every node token are written and it accepts.
    pub fn start(cluster: &Cluster, config: &str) -> Self {
        Self::launch(cluster, Some(config), None)
    }

    /// Starts with `--kubernetes` against the API server `kubeconfig` names
    /// (agents then present ServiceAccount tokens), and waits until it accepts.
    pub fn start_kubernetes(cluster: &Cluster, kubeconfig: &std::path::Path) -> Self {
        Self::launch(cluster, None, Some(kubeconfig))
    }

    fn launch(cluster: &Cluster, config: Option<&str>, kubeconfig: Option<&std::path::Path>) -> Self {
        let dir = std::env::temp_dir().join(format!("mesh-test-{}-ca", cluster.id));
        std::fs::create_dir_all(dir.join("config")).unwrap();
        let log = dir.join("ca.log");
        let addr = "172.18.0.1:15012".to_owned();
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &cluster.net_ns]).arg(binary()).args(["ca", "--listen", &addr]);
        match (config, kubeconfig) {
            (Some(config), _) => {
                std::fs::write(dir.join("config").join("cluster.yaml"), config).unwrap();
                command.arg("--config").arg(dir.join("config"));
            }
            (None, Some(kubeconfig)) => {
                command.arg("--kubernetes").env("KUBECONFIG", kubeconfig);
            }
            (None, None) => panic!("a CA needs a configuration source"),
        }
        let child = command
            .arg("--ca-dir")
            .arg(dir.join("ca"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut ca = Self { child: Some(child), dir, addr, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = ca.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("mesh-agent ca exited with {status}:\n{}", ca.log_text());
            }
            let tokens_ready = kubeconfig.is_some() || cluster.nodes.iter().all(|n| ca.token_file(&n.name).exists());
            let addr = ca.addr.clone();
            let listening = tokens_ready
                && enter_and_spawn(&cluster.net_ns, move || {
                    TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(200)).is_ok()
                })
                .join()
                .unwrap();
            if listening {
                return ca;
            }
            assert!(Instant::now() < deadline, "CA service not ready after 20s:\n{}", ca.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// Replaces the configuration the CA reads (it notices within a resync).
    pub fn write_config(&self, yaml: &str) {
        let dir = self.dir.join("config");
        let tmp = dir.join(".cluster.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, dir.join("cluster.yaml")).unwrap();
    }

    pub fn root_cert(&self) -> PathBuf {
        self.ca_dir().join("root-cert.pem")
    }

    pub fn token_file(&self, node: &str) -> PathBuf {
        self.ca_dir().join("node-tokens").join(node)
    }

    /// `run` arguments that make an agent on `node` use this CA.
    pub fn agent_args(&self, node: &str) -> Vec<String> {
        vec![
            "--ca-addr".into(),
            self.addr.clone(),
            "--ca-root".into(),
            self.root_cert().display().to_string(),
            "--ca-token-file".into(),
            self.token_file(node).display().to_string(),
        ]
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CaService {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            terminate(child, Duration::from_secs(5));
        }
        if std::thread::panicking() {
            eprintln!("--- mesh-agent ca log ({}) ---\n{}", self.log.display(), self.log_text());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
