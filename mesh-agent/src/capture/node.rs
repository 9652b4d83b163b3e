//! Node settings the last-hop gate needs, applied at start and undone at exit.
//!
//! A packet the gate hands back to a meshed pod's veth enters the node again
//! from that veth, with a source that is not the pod: a client on another
//! interface, or the node itself. Three kernel facts decide whether it reaches
//! the agent's socket (each was seen failing without its setting):
//!
//! - `accept_local=1` and `rp_filter=0` on the veth: a node-originated packet
//!   (source: a local address) is a martian otherwise, and a foreign source
//!   fails reverse-path filtering there;
//! - `net.ipv4.tcp_early_demux=0` in the node's namespace: a flow's later
//!   packets, arriving on the interface they entered by, would be matched early
//!   to the agent's socket (its local address is the pod's) and then dropped by
//!   IP forwarding, which refuses packets that carry a socket, before the gate
//!   could hand them back;
//! - handed-back packets are not tracked again (a raw-table `notrack` for
//!   hand-off mark): redirecting resets a packet's conntrack entry, and a
//!   second entry for a kube-proxy-DNAT'd flow clashes with the first, whose
//!   reply direction un-NATs the agent's replies. Installed with `nft` when
//!   it is there; without it, DNAT'd connections to meshed pods fail (closed).
//!
//! The same nftables table holds the gate for pods not captured yet (see
//! [`super::gate`]).
use std::{io, path::Path, process::Command};

use mesh_common::Marks;

const EARLY_DEMUX: &str = "/proc/sys/net/ipv4/tcp_early_demux";
const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
const NFT_TABLE: &str = "mesh_agent";

/// What [`NodeSettings::apply`] changed, to undo at exit.
#[derive(Debug, Default)]
pub struct NodeSettings {
    early_demux: Option<String>,
    nft: bool,
}

impl NodeSettings {
    /// Turns TCP early demux off and installs the notrack rule (best effort:
    /// each failure is logged, and leaves DNAT'd or re-entering flows failing
    /// closed, never passing).
    pub fn apply(marks: &Marks) -> Self {
        let mut applied = NodeSettings {
            early_demux: set_sysctl(
                EARLY_DEMUX,
                "0",
                "flows that enter by another interface and reach a meshed pod will stall",
            ),
            nft: false,
        };
        match install_notrack(marks) {
            Ok(()) => applied.nft = true,
            Err(e) => {
                tracing::warn!(error = %e, "no nftables table: connections DNAT'd to a meshed pod (kube-proxy NodePort) will fail, and a new pod's packets are not gated until its capture is attached")
            }
        }
        if read_sysctl("net/ipv4/conf/all/rp_filter").is_some_and(|v| v != "0") {
            tracing::warn!(
                "net.ipv4.conf.all.rp_filter is on: connections to meshed pods from another interface or the node itself are dropped at the last hop"
            );
        }
        applied
    }

    /// Undoes what an earlier run applied, without its record (`mesh-agent
    /// uninstall`): early demux back to the kernel's default, the notrack
    /// rule removed.
    pub fn remove() {
        if read_sysctl("net/ipv4/tcp_early_demux").as_deref() == Some("0") {
            let _ = std::fs::write(EARLY_DEMUX, "1");
        }
        // Set by agents that bound gateway ports themselves (before gateways
        // were pods served through the capture listeners).
        if read_sysctl("net/ipv4/tcp_migrate_req").as_deref() == Some("1") {
            let _ = std::fs::write(MIGRATE_REQ, "0");
        }
        let _ = nft(&format!("delete table inet {NFT_TABLE}\n"));
    }

    /// Undoes what [`NodeSettings::apply`] changed.
    pub fn restore(&mut self) {
        if let Some(old) = self.early_demux.take()
            && let Err(e) = std::fs::write(EARLY_DEMUX, &old)
        {
            tracing::warn!(error = %e, "restoring tcp_early_demux");
        }
        if std::mem::take(&mut self.nft) {
            let _ = nft(&format!("delete table inet {NFT_TABLE}\n"));
        }
    }
}

/// `accept_local=1` and `rp_filter=0` on a meshed pod's veth (see the module doc).
pub fn prepare_gated(ifname: &str) -> io::Result<()> {
    if ifname.contains(['/', '.']) || ifname.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("interface name {ifname:?}")));
    }
    let dir = Path::new("/proc/sys/net/ipv4/conf").join(ifname);
    std::fs::write(dir.join("accept_local"), "1")?;
    std::fs::write(dir.join("rp_filter"), "0")
}

/// Sets the sysctl file `path` to `want`; returns the value it had, to
/// restore, if it was changed. A failure is logged with what it costs.
fn set_sysctl(path: &str, want: &str, consequence: &str) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(old) if old.trim() == want => None,
        Ok(old) => match std::fs::write(path, want) {
            Ok(()) => Some(old.trim().to_owned()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot set {path} to {want}: {consequence}");
                None
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot read {path}: {consequence}");
            None
        }
    }
}

fn read_sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/proc/sys").join(path)).ok().map(|s| s.trim().to_owned())
}

fn install_notrack(marks: &Marks) -> io::Result<()> {
    let (mask, handoff) = (marks.mask, marks.handoff);
    // Declared with `add` (a no-op for what exists) and the chains' rules
    // replaced, all in one transaction: the sets of the gate (see
    // [`super::gate`]) keep what a running or earlier agent wrote, so a
    // starting agent opens no gap for pods already captured.
    let t = format!("inet {NFT_TABLE}");
    nft(&format!(
        "add table {t}
         add set {t} {POD_CIDRS} {{ type ipv4_addr; flags interval; auto-merge; }}
         add set {t} {READY} {{ type iface_index; }}
         add chain {t} prerouting {{ type filter hook prerouting priority raw; policy accept; }}
         add chain {t} postrouting {{ type filter hook postrouting priority filter; policy accept; }}
         flush chain {t} prerouting
         flush chain {t} postrouting
         add rule {t} prerouting meta mark & {mask:#010x} == {handoff:#010x} notrack
         add rule {t} prerouting meta iifkind \"veth\" ip saddr @{POD_CIDRS} iif != @{READY} counter drop comment \"from a pod not captured yet\"
         add rule {t} postrouting meta oifkind \"veth\" ip daddr @{POD_CIDRS} oif != @{READY} counter drop comment \"to a pod not captured yet\"
"
    ))
}

/// The nftables set of this node's pod ranges, and of the pods' interfaces
/// whose capture is complete.
pub(super) const POD_CIDRS: &str = "pod_cidrs";
pub(super) const READY: &str = "ready";
pub(super) const TABLE: &str = NFT_TABLE;

pub(super) fn nft(script: &str) -> io::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().ok_or_else(|| io::Error::other("nft stdin"))?.write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("nft: {}", String::from_utf8_lossy(&out.stderr).trim())))
    }
}
