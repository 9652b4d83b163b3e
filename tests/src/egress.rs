//! What the egress tests share: a node with a meshed client and the world
//! outside it, REGISTRY_ONLY, and servers that say where they were reached.
use std::net::Ipv4Addr;

use crate::{
    fixture::{Fixture, PodSpec},
    netns::Pod,
    servers,
};

/// One node with the meshed pod `test` (demo), and outside the node an
/// HTTP server on 8080 at 172.18.0.1.
pub fn test_and_outside() -> (Fixture, Pod) {
    let mut c = Fixture::one_node();
    c.add_pod(0, "test", Ipv4Addr::new(10, 244, 0, 2), PodSpec::app("demo", &[("app", "test")]));
    let outside = Pod::namespace("outside", Ipv4Addr::new(172, 18, 0, 1), &c.net_ns);
    servers::http_hello(&outside, 8080);
    (c, outside)
}

/// The mesh config with REGISTRY_ONLY, then `objects`.
pub fn registry_only(objects: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\n\
         data:\n  mesh: |-\n    outboundTrafficPolicy:\n      mode: REGISTRY_ONLY\n{objects}"
    )
}

/// An HTTP server on `port` in `pod` answering with the address it was
/// reached at (which of a name's addresses the agent chose).
pub fn which_address(pod: &Pod, port: u16) {
    servers::serve_async(pod, port, |mut s, _| async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let body = s.local_addr().map(|a| a.ip().to_string()).unwrap_or_default();
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
        let _ = s.write_all(format!("{head}{body}").as_bytes()).await;
    });
}

/// Gives the outside world the addresses `ips` too (routed from the node).
pub fn outside_addresses(c: &Fixture, ips: &[&str]) {
    for ip in ips {
        crate::netns::sh(&["ip", "-n", &c.net_ns, "addr", "add", &format!("{ip}/32"), "dev", "lo"]);
        crate::netns::sh(&["ip", "-n", &c.node_ns, "route", "add", &format!("{ip}/32"), "via", "172.18.0.1"]);
    }
}

/// A `resolv.conf` naming `nameserver` (with a search list and ndots, as a
/// node's often has: the agent must ask for names as they are), and the
/// agent's arguments to read it with `more`. Removed when dropped.
pub struct ResolvConf {
    pub path: std::path::PathBuf,
}

impl ResolvConf {
    pub fn new(nameserver: &str) -> ResolvConf {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("mesh-resolv-{}-{n}.conf", std::process::id()));
        let text = format!("nameserver {nameserver}\noptions ndots:5\nsearch demo.svc.cluster.local\n");
        std::fs::write(&path, text).unwrap();
        ResolvConf { path }
    }

    pub fn args(&self, more: &[&str]) -> Vec<String> {
        let mut args = vec!["--resolv-conf".to_owned(), self.path.display().to_string()];
        args.extend(more.iter().map(|s| (*s).to_owned()));
        args
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A pod's own `/etc/resolv.conf`: `ip netns exec` (how a test runs a
/// pod's commands) mounts `/etc/netns/<namespace>/resolv.conf` over the
/// node's. Removed when dropped.
pub struct PodResolvConf {
    dir: std::path::PathBuf,
}

impl PodResolvConf {
    /// Kubernetes' `ClusterFirst` file: `nameserver`, the namespace's
    /// search list, `ndots:5`.
    pub fn cluster_first(pod: &Pod, namespace: &str, nameserver: &str) -> PodResolvConf {
        let dir = std::path::Path::new("/etc/netns").join(&pod.netns);
        std::fs::create_dir_all(&dir).unwrap();
        let text = format!(
            "nameserver {nameserver}\nsearch {namespace}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        );
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
        PodResolvConf { dir }
    }
}

impl Drop for PodResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        // The parent too, once no other pod's file is in it.
        let _ = std::fs::remove_dir("/etc/netns");
    }
}
