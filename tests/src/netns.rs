//! Network namespaces laid out like a Calico node: each pod's `eth0` is a veth to
//! the node, the pod has its IP as a /32 and a default route via 169.254.1.1,
//! which the node answers by proxy ARP; the node routes each pod IP as a /32 via
//! the pod's veth. Each node has an uplink veth to a `net` namespace (its default
//! route), which stands in for the cluster network: it routes every pod IP to
//! its node, and doubles as the place "outside the mesh" where external clients
//! and the CA service run.
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

/// Runs `ip -batch` in namespace `ns`: several changes from one process.
pub fn batch(ns: &str, commands: &str) {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ip");
    child.stdin.take().unwrap().write_all(commands.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "ip -n {ns} -batch: {commands}{}", String::from_utf8_lossy(&out.stderr));
}

/// Runs a command, returning its output whatever the status.
pub fn sh_any(args: &[&str]) -> Output {
    Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// Index into [`Cluster::nodes`].
    pub node: usize,
    pub netns: String,
    /// Host-side interface in the node namespace.
    pub host_if: String,
    pub cgroup: PathBuf,
}

/// A node: its namespace, its uplink address, and the `net` side of its uplink.
pub struct Node {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    /// Interface in the `net` namespace facing this node (for packet captures).
    pub net_if: String,
}

/// Node namespaces with pods. Dropping it removes every namespace and cgroup.
pub struct Cluster {
    pub id: String,
    /// The first node's namespace and address (the single-node tests use these).
    pub node_ns: String,
    pub net_ns: String,
    pub node_ip: Ipv4Addr,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// Other namespaces a test made (a second network, a client), removed on drop.
    pub extra_ns: Vec<String>,
    /// cgroups of node processes a test made, removed on drop.
    extra_cgroups: Vec<PathBuf>,
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
        let mut cluster = Self {
            id,
            node_ns: node_ns.clone(),
            net_ns: net_ns.clone(),
            node_ip: Ipv4Addr::new(172, 18, 0, 2),
            nodes: Vec::new(),
            pods: Vec::new(),
            extra_ns: Vec::new(),
            extra_cgroups: Vec::new(),
            cgroup_root,
        };
        // From here on, Drop cleans up whatever was created.
        sh(&["ip", "netns", "add", &net_ns]);
        sh(&["ip", "-n", &net_ns, "link", "set", "lo", "up"]);
        sh(&["ip", "netns", "exec", &net_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        if std::path::Path::new(CGROUP_BASE).join("cgroup.procs").exists() {
            std::fs::create_dir_all(&cluster.cgroup_root).unwrap();
        }
        cluster.add_node();
        cluster
    }

    /// Two nodes, `node-1` (172.18.0.2) and `node-2` (172.18.1.2).
    pub fn two_nodes() -> Self {
        let mut c = Self::new();
        c.add_node();
        c
    }

    /// Adds node `node-<n>` with uplink address 172.18.<n-1>.2/24, the `net`
    /// side being 172.18.<n-1>.1; returns its index.
    pub fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let name = format!("node-{}", i + 1);
        let ns = if i == 0 { self.node_ns.clone() } else { format!("{}-node{}", self.id, i + 1) };
        let ip = Ipv4Addr::new(172, 18, i as u8, 2);
        let gw = Ipv4Addr::new(172, 18, i as u8, 1);
        let net_if = format!("node{i}");
        sh(&["ip", "netns", "add", &ns]);
        self.nodes.push(Node { name, ns: ns.clone(), ip, net_if: net_if.clone() });
        let n = |args: &[&str]| {
            let mut v = vec!["ip", "-n", ns.as_str()];
            v.extend_from_slice(args);
            sh(&v);
        };
        n(&["link", "set", "lo", "up"]);
        n(&["link", "add", "uplink0", "type", "veth", "peer", "name", &net_if, "netns", &self.net_ns]);
        n(&["link", "set", "uplink0", "up"]);
        n(&["addr", "add", &format!("{ip}/24"), "dev", "uplink0"]);
        n(&["route", "add", "default", "via", &gw.to_string()]);
        sh(&["ip", "-n", &self.net_ns, "link", "set", &net_if, "up"]);
        sh(&["ip", "-n", &self.net_ns, "addr", "add", &format!("{gw}/24"), "dev", &net_if]);
        sh(&["ip", "netns", "exec", &ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        i
    }

    /// Adds a pod namespace `name` with `ip` on the first node.
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> &Pod {
        self.add_pod_on(0, name, ip)
    }

    /// Adds a pod namespace `name` with `ip` on node `node`, wired like a CNI
    /// would, and routed to that node by the cluster network.
    pub fn add_pod_on(&mut self, node: usize, name: &str, ip: Ipv4Addr) -> &Pod {
        self.add_sandbox(node, name, ip);
        self.wire(name);
        self.pods.last().unwrap()
    }

    /// Adds pod `name`'s namespace with nothing in it but its loopback, as a
    /// container runtime makes it before the CNI plugins run; [`Cluster::wire`]
    /// is the plugins' part.
    pub fn add_sandbox(&mut self, node: usize, name: &str, ip: Ipv4Addr) -> &Pod {
        let netns = format!("{}-{name}", self.id);
        let host_if = format!("v{}", &name[..name.len().min(12)]);
        sh(&["ip", "netns", "add", &netns]);
        sh(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        let cgroup = self.cgroup_root.join(name);
        if self.cgroup_root.exists() {
            std::fs::create_dir_all(&cgroup).unwrap();
        }
        self.pods.push(Pod { name: name.into(), ip, node, netns, host_if, cgroup });
        self.pods.last().unwrap()
    }

    /// Wires pod `name` as a CNI would: the veth, the pod's address and
    /// routes, the node's proxy ARP; the node's side of the veth comes up
    /// last, in the same `ip` process as the pod's /32 route, so the pod's
    /// first packets leave within a millisecond of its link appearing.
    pub fn wire(&self, name: &str) {
        let pod = self.pod(name);
        let (ips, host_if, netns) = (format!("{}/32", pod.ip), pod.host_if.as_str(), pod.netns.as_str());
        let node_ns = self.nodes[pod.node].ns.as_str();
        sh(&["ip", "-n", &self.net_ns, "route", "add", &ips, "via", &self.nodes[pod.node].ip.to_string()]);
        // The node's side has Calico's fixed MAC, which the pod knows for its
        // gateway without asking (a permanent neighbour, as Calico and Cilium
        // set): its first packet leaves as soon as the link is up.
        let mac = "ee:ee:ee:ee:ee:ee";
        let link = ["link", "add", host_if, "address", mac, "type", "veth", "peer", "name", "eth0", "netns", netns];
        sh(&[&["ip", "-n", node_ns][..], &link].concat());
        // Answer at once: the kernel's default delays proxy ARP replies by up to 0.8 s.
        let (arp, delay) =
            (format!("net.ipv4.conf.{host_if}.proxy_arp=1"), format!("net.ipv4.neigh.{host_if}.proxy_delay=0"));
        sh(&["ip", "netns", "exec", node_ns, "sysctl", "-qw", &arp, &delay]);
        let pod_side = format!(
            "link set eth0 up\naddr add {ips} dev eth0\nroute add 169.254.1.1 dev eth0 scope link\n\
             neigh replace 169.254.1.1 lladdr {mac} dev eth0 nud permanent\nroute add default via 169.254.1.1 dev eth0\n"
        );
        batch(netns, &pod_side);
        batch(node_ns, &format!("link set {host_if} up\nroute add {ips} dev {host_if}\n"));
    }

    /// Adds a namespace `<id>-<name>` (removed on drop) reached from node
    /// `node` by a second interface, `eth1` there: the node is `<prefix>.1/24`,
    /// the namespace `<prefix>.2/24` with a route to the pod network via the
    /// node. Returns the namespace as a [`Pod`] (to run clients in).
    pub fn add_lan(&mut self, node: usize, name: &str, prefix: &str) -> Pod {
        let ns = format!("{}-{name}", self.id);
        sh(&["ip", "netns", "add", &ns]);
        self.extra_ns.push(ns.clone());
        let node_ns = self.nodes[node].ns.clone();
        sh(&["ip", "-n", &node_ns, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        sh(&["ip", "-n", &node_ns, "addr", "add", &format!("{prefix}.1/24"), "dev", "eth1"]);
        sh(&["ip", "-n", &node_ns, "link", "set", "eth1", "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &ns, "addr", "add", &format!("{prefix}.2/24"), "dev", "eth0"]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &ns, "route", "add", "10.244.0.0/16", "via", &format!("{prefix}.1")]);
        Pod::namespace(name, format!("{prefix}.2").parse().unwrap(), &ns)
    }

    /// A process "pod" in node `node`'s own namespace, in a cgroup `name` of
    /// its own (a node daemon, the kubelet), with the node's address.
    pub fn node_process(&mut self, node: usize, name: &str) -> Pod {
        let cgroup = self.cgroup_root.join(name);
        std::fs::create_dir_all(&cgroup).unwrap();
        self.extra_cgroups.push(cgroup.clone());
        let n = &self.nodes[node];
        Pod { name: name.into(), ip: n.ip, node, netns: n.ns.clone(), host_if: String::new(), cgroup }
    }

    /// A cgroup's path under the cgroup v2 root (for `--kubelet-cgroup`).
    pub fn cgroup_under_root(&self, pod: &Pod) -> String {
        pod.cgroup.strip_prefix(CGROUP_BASE).unwrap().display().to_string()
    }

    /// A load balancer's address `lb` for the pod at `pod` on node `node`:
    /// routed to the node by the cluster network, sent to the pod (every TCP
    /// port) by a kube-proxy-style DNAT in the node's prerouting. Both go
    /// with the namespaces.
    pub fn load_balancer(&self, node: usize, lb: Ipv4Addr, pod: Ipv4Addr) {
        let node_ip = self.nodes[node].ip.to_string();
        sh(&["ip", "-n", &self.net_ns, "route", "add", &format!("{lb}/32"), "via", &node_ip]);
        let rules = format!(
            "table ip kube-proxy-lb-{lb_tag} {{\n chain lb {{\n  type nat hook prerouting priority dstnat; policy accept;\n  \
             ip daddr {lb} meta l4proto tcp dnat to {pod}\n }}\n}}\n",
            lb_tag = lb.octets()[3]
        );
        let file = std::env::temp_dir().join(format!("mesh-test-{}-lb-{lb}.nft", self.id));
        std::fs::write(&file, rules).expect("nft rules");
        sh(&["ip", "netns", "exec", &self.nodes[node].ns, "nft", "-f", file.to_str().expect("path")]);
        let _ = std::fs::remove_file(&file);
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Runs a command in the first node's namespace.
    pub fn node_cmd(&self, args: &[&str]) -> Output {
        let mut v = vec!["ip", "netns", "exec", self.node_ns.as_str()];
        v.extend_from_slice(args);
        sh_any(&v)
    }

    /// Runs a command in the `net` namespace (outside every node).
    pub fn net_cmd(&self, args: &[&str]) -> Output {
        let mut v = vec!["ip", "netns", "exec", self.net_ns.as_str()];
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
    /// A namespace that is not a pod (the cluster network, a node), to run
    /// servers and clients in with the same helpers; no cgroup.
    pub fn namespace(name: &str, ip: Ipv4Addr, netns: &str) -> Pod {
        Pod { name: name.into(), ip, node: 0, netns: netns.into(), host_if: String::new(), cgroup: PathBuf::new() }
    }

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

    /// A counter of the namespace's `/proc/net/snmp`, e.g. `("Tcp", "PassiveOpens")`.
    pub fn snmp(&self, group: &str, field: &str) -> u64 {
        let out = self.cmd(&["cat", "/proc/net/snmp"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let prefix = format!("{group}:");
        let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
        let (names, values) = (rows.next().unwrap(), rows.next().unwrap());
        let i = names.split_whitespace().position(|n| n == field).unwrap();
        values.split_whitespace().nth(i).unwrap().parse().unwrap()
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
        for node in &self.nodes {
            let _ = sh_any(&["ip", "netns", "del", &node.ns]);
        }
        let _ = sh_any(&["ip", "netns", "del", &self.net_ns]);
        for ns in &self.extra_ns {
            let _ = sh_any(&["ip", "netns", "del", ns]);
        }
        if self.cgroup_root.exists() {
            for cgroup in self.pods.iter().map(|p| &p.cgroup).chain(&self.extra_cgroups) {
                let _ = std::fs::remove_dir(cgroup);
            }
            let _ = std::fs::remove_dir(&self.cgroup_root);
        }
    }
}

/// A process started in a namespace (a server for tests, the demo or the
/// bench), stopped on drop: SIGTERM first (so a master such as nginx's takes
/// its workers down), SIGKILL after 3 s.
pub struct Background(std::process::Child);

impl Background {
    /// Runs `args` in `netns` with no input or output.
    pub fn spawn_in(netns: &str, args: &[&str]) -> std::io::Result<Self> {
        Command::new("ip")
            .args(["netns", "exec", netns])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(Background)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while self.0.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
