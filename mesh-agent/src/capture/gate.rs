//! The gate for pods not captured yet: between a pod's veth appearing and the
//! agent attaching its programs there is a moment (microseconds with the CNI
//! plugin, which holds the pod's start until capture is confirmed; longer
//! without it) in which no eBPF program sees the pod's packets. Two nftables
//! rules close it, whatever interface or process is involved:
//!
//! - `prerouting`: a packet whose source is in this node's pod ranges
//!   (`spec.podCIDRs`, or `--pod-cidr`) and that entered by a veth not in
//!   `ready` is dropped (a new pod's own packets);
//! - `postrouting`: a packet to an address in those ranges that leaves by a
//!   veth not in `ready` is dropped (anything toward a new pod: another
//!   pod, a node process, a second interface, kube-proxy's DNAT).
//!
//! Only veths: pods' interfaces are veths (Calico's `cali*`, Cilium's
//! `lxc*`, kindnet's, the bridge-less CNIs the capture supports), while an
//! uplink or a tunnel may carry a remote pod whose address a CNI's own IPAM
//! took from this node's `podCIDR`, which must not be dropped. A new pod that
//! sends from an address outside the ranges is not gated here (its replies
//! are routed elsewhere; the CNI plugin leaves no such moment at all).
//!
//! `ready` holds the pods' interfaces whose capture is complete: the
//! classifier attached, and for a meshed pod the last-hop gate too. The rules
//! and sets live in the kernel, so they hold while no agent runs (fail
//! closed, as the pinned programs do); each sync replaces both sets in one
//! nftables transaction, so packets see the old sets or the new, never an
//! empty one. Before capture a new pod's packets are dropped, so TCP retries
//! its SYN: the first connection is delayed, never carried around the agent.
use std::collections::BTreeSet;

use std::net::Ipv4Addr;

use mesh_common::role;

use super::node::{POD_CIDRS, READY, TABLE, nft};
use crate::state::{State, security::Cidr};

/// What the sets hold, as last written.
#[derive(Debug, Default)]
pub struct Gate {
    written: Option<(Vec<Cidr>, BTreeSet<u32>)>,
    warned_no_ranges: bool,
}

impl Gate {
    /// Writes `ranges` and `ready` if they changed. An error leaves the
    /// previous sets in place (they still gate) and is retried next time.
    pub fn sync(&mut self, ranges: Vec<Cidr>, ready: BTreeSet<u32>) -> std::io::Result<()> {
        if ranges.is_empty() && !self.warned_no_ranges {
            self.warned_no_ranges = true;
            tracing::warn!(
                "no pod range for this node (Node spec.podCIDRs, or --pod-cidr): a new pod's packets are not gated before capture; the CNI plugin closes that gap"
            );
        }
        let want = (ranges, ready);
        if self.written.as_ref() == Some(&want) {
            return Ok(());
        }
        nft(&script(&want.0, &want.1))?;
        tracing::debug!(ranges = want.0.len(), ready = want.1.len(), "pod gate updated");
        self.written = Some(want);
        Ok(())
    }
}

impl super::Capture {
    /// Whether the pod at `ip` is captured: its role, or why not.
    pub fn ready_role(&self, ip: Ipv4Addr) -> Result<&'static str, String> {
        let found = self.attached.iter().find(|(_, a)| a.pod_ip == ip && a.info.role != role::UPLINK);
        match found {
            Some((i, a)) if a.info.role == role::MESHED_POD && self.gates.contains_key(i) => Ok("meshed"),
            Some((_, a)) if a.info.role == role::UNMESHED_POD => Ok("unmeshed"),
            _ => match self.pending.iter().find(|p| p.pod_ip == ip) {
                Some(p) => Err(p.reason.to_owned()),
                None => Err(format!("no captured interface has a /32 route to {ip}")),
            },
        }
    }

    pub(super) fn forget_departed_cni_pods(&mut self, state: &State, node: &str) {
        if self.cni_ips.is_empty() {
            return;
        }
        let here: std::collections::HashSet<(String, String)> =
            state.scheduled_workloads(node).map(|w| (w.namespace.to_string(), w.name.to_string())).collect();
        self.cni_ips.retain(|pod, _| here.contains(pod));
    }

    /// Opens the pod gate (see [`gate`]) for the pods whose capture is
    /// complete: the classifier attached, and the last-hop gate for a meshed one.
    pub(super) fn sync_pod_gate(&mut self, state: &State, node: &str) {
        let ranges = match &self.pod_cidrs[..] {
            [] => state.nodes.get(node).map(|n| n.pod_cidrs.clone()).unwrap_or_default(),
            given => given.to_vec(),
        };
        let ready = self
            .attached
            .iter()
            .filter(|(i, a)| match a.info.role {
                role::MESHED_POD => self.gates.contains_key(i),
                role::UNMESHED_POD => true,
                _ => false,
            })
            .map(|(i, _)| *i)
            .collect();
        if let Err(e) = self.gate.sync(ranges, ready) {
            tracing::warn!(error = %e, "updating the pod gate failed; will retry");
        }
    }
}

/// One transaction that replaces both sets.
fn script(ranges: &[Cidr], ready: &BTreeSet<u32>) -> String {
    let t = format!("inet {TABLE}");
    let mut s = format!("flush set {t} {POD_CIDRS}\nflush set {t} {READY}\n");
    if !ranges.is_empty() {
        let list: Vec<String> = ranges.iter().map(|c| format!("{}/{}", c.addr, c.prefix)).collect();
        s += &format!("add element {t} {POD_CIDRS} {{ {} }}\n", list.join(", "));
    }
    if !ready.is_empty() {
        let list: Vec<String> = ready.iter().map(u32::to_string).collect();
        s += &format!("add element {t} {READY} {{ {} }}\n", list.join(", "));
    }
    s
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn one_transaction_replaces_both_sets() {
        let ranges = vec![Cidr::parse("10.244.0.0/24").unwrap(), Cidr::parse("10.9.0.0/16").unwrap()];
        let s = script(&ranges, &BTreeSet::from([7, 12]));
        assert_eq!(
            s,
            "flush set inet mesh_agent pod_cidrs\nflush set inet mesh_agent ready\n\
             add element inet mesh_agent pod_cidrs { 10.244.0.0/24, 10.9.0.0/16 }\n\
             add element inet mesh_agent ready { 7, 12 }\n"
        );
        assert_eq!(
            script(&[], &BTreeSet::new()),
            "flush set inet mesh_agent pod_cidrs\nflush set inet mesh_agent ready\n"
        );
    }
}
