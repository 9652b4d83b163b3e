//! Network namespaces laid out like a Calico node: each pod's `eth0` is a veth to
//! the node, the pod has its IP as a /32 and a default route via 169.254.1.1,
//! which the node answers by proxy ARP; the node routes each pod IP as a /32 via
//! the pod's veth. The node has an uplink veth to a `net` namespace (its default
//! route), standing in for the cluster network.
use std::{
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Skips (loudly) when not root, and fails under `CI=true`, where a skipped root
/// test would hide a broken build.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: needs root, and CI=true forbids skipping root tests");
    }
    eprintln!("\n*** SKIPPED {test}: needs root (run `sudo cargo xtask test`) ***\n");
    false
}

/// Runs `ip` (or another command) and panics with its output on failure.
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Runs a command, returning its output whatever the status.
pub fn sh_any(args: &[&str]) -> Output {
    Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub netns: String,
    /// Host-side interface in the node namespace.
    pub host_if: String,
    pub cgroup: PathBuf,
}

/// A node namespace with pods. Dropping it removes every namespace and cgroup.
pub struct Cluster {
    pub id: String,
    pub node_ns: String,
    pub net_ns: String,
    pub node_ip: Ipv4Addr,
    pub pods: Vec<Pod>,
    cgroup_root: PathBuf,
}

const CGROUP_BASE: &str = "/sys/fs/cgroup/unified";

impl Cluster {
    /// A node with an uplink and no pods yet.
    pub fn new() -> Self {
        let id = format!("mt{}x{}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::Relaxed));
        let node_ns = format!("{id}-node");
        let net_ns = format!("{id}-net");
        let cgroup_root = PathBuf::from(CGROUP_BASE).join(format!("mesh-test-{id}"));
        let cluster = Self {
            id,
            node_ns: node_ns.clone(),
            net_ns: net_ns.clone(),
            node_ip: Ipv4Addr::new(172, 18, 0, 2),
            pods: Vec::new(),
            cgroup_root,
        };
        // From here on, Drop cleans up whatever was created.
        sh(&["ip", "netns", "add", &node_ns]);
        sh(&["ip", "netns", "add", &net_ns]);
        let n = |args: &[&str]| {
            let mut v = vec!["ip", "-n", node_ns.as_str()];
            v.extend_from_slice(args);
            sh(&v);
        };
        n(&["link", "set", "lo", "up"]);
        n(&["link", "add", "uplink0", "type", "veth", "peer", "name", "node0", "netns", &net_ns]);
        n(&["link", "set", "uplink0", "up"]);
        n(&["addr", "add", "172.18.0.2/24", "dev", "uplink0"]);
        n(&["route", "add", "default", "via", "172.18.0.1"]);
        sh(&["ip", "-n", &net_ns, "link", "set", "node0", "up"]);
        sh(&["ip", "-n", &net_ns, "addr", "add", "172.18.0.1/24", "dev", "node0"]);
        sh(&["ip", "netns", "exec", &node_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        if std::path::Path::new(CGROUP_BASE).join("cgroup.procs").exists() {
            std::fs::create_dir_all(&cluster.cgroup_root).unwrap();
        }
        cluster
    }

    /// Adds a pod namespace `name` with `ip`, wired like a CNI would.
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> &Pod {
        let netns = format!("{}-{name}", self.id);
        let host_if = format!("v{}", &name[..name.len().min(12)]);
        sh(&["ip", "netns", "add", &netns]);
        let ips = format!("{ip}/32");
        let node = self.node_ns.as_str();
        sh(&["ip", "-n", node, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns]);
        sh(&["ip", "-n", node, "link", "set", &host_if, "up"]);
        sh(&["ip", "netns", "exec", node, "sysctl", "-qw", &format!("net.ipv4.conf.{host_if}.proxy_arp=1")]);
        sh(&["ip", "-n", node, "route", "add", &ips, "dev", &host_if]);
        sh(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &netns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &netns, "addr", "add", &ips, "dev", "eth0"]);
        sh(&["ip", "-n", &netns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"]);
        sh(&["ip", "-n", &netns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"]);
        let cgroup = self.cgroup_root.join(name);
        if self.cgroup_root.exists() {
            std::fs::create_dir_all(&cgroup).unwrap();
        }
        self.pods.push(Pod { name: name.into(), ip, netns, host_if, cgroup });
        self.pods.last().unwrap()
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Runs a command in the node's namespace.
    pub fn node_cmd(&self, args: &[&str]) -> Output {
        let mut v = vec!["ip", "netns", "exec", self.node_ns.as_str()];
        v.extend_from_slice(args);
        sh_any(&v)
    }

    /// The node's IPv4 rules and every IPv4 routing table, to check nothing was
    /// left behind (IPv6 link-local routes come and go on their own).
    pub fn node_routing(&self) -> String {
        let rules = self.node_cmd(&["ip", "-4", "rule"]);
        let table = self.node_cmd(&["ip", "-4", "route", "show", "table", "all"]);
        format!("{}{}", String::from_utf8_lossy(&rules.stdout), String::from_utf8_lossy(&table.stdout))
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

impl Pod {
    /// Runs a command (e.g. curl) in the pod's namespace and cgroup.
    pub fn cmd(&self, args: &[&str]) -> Output {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).args(args);
        let cgroup = self.cgroup.join("cgroup.procs");
        if cgroup.parent().is_some_and(|p| p.exists()) {
            // Join the pod's cgroup before exec, as the pod's processes would be.
            use std::os::unix::process::CommandExt as _;
            // SAFETY: only async-signal-safe calls (open/write/close) after fork.
            unsafe {
                let path = std::ffi::CString::new(cgroup.as_os_str().as_encoded_bytes()).unwrap();
                c.pre_exec(move || {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                    if fd >= 0 {
                        let _ = libc::write(fd, b"0".as_ptr().cast(), 1);
                        libc::close(fd);
                    }
                    Ok(())
                });
            }
        }
        c.output().unwrap_or_else(|e| panic!("{args:?} in {}: {e}", self.name))
    }

    /// Runs `f` on a new thread inside this pod's network namespace.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        enter_and_spawn(&self.netns, f)
    }

    /// Runs `f` inside this pod's network namespace and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

/// Spawns a thread whose network namespace is `netns` (setns is per thread).
pub fn enter_and_spawn<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: a valid netns fd; affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for pod in &self.pods {
            let _ = sh_any(&["ip", "netns", "del", &pod.netns]);
        }
        let _ = sh_any(&["ip", "netns", "del", &self.node_ns]);
        let _ = sh_any(&["ip", "netns", "del", &self.net_ns]);
        if self.cgroup_root.exists() {
            for pod in &self.pods {
                let _ = std::fs::remove_dir(&pod.cgroup);
            }
            let _ = std::fs::remove_dir(&self.cgroup_root);
        }
    }
}
