//! Plain-data types shared by the eBPF programs (`mesh-ebpf`) and the node agent
//! (`mesh-agent`): map keys and values, counter indices, ports and marks.
//!
//! Everything here is `#[repr(C)]` with explicit padding and fixed-width integers
//! (a `u32` flag, never a `bool`), so the kernel and user space agree on the
//! layout; `size_of` is asserted at compile time. The `user` feature adds
//! `aya::Pod` impls so the agent can put these values in maps.
#![no_std]

/// Port of the outbound capture listener (pod → anything), as in Istio ambient.
pub const OUTBOUND_PORT: u16 = 15001;
/// Address the outbound listener binds (127.0.0.1), as an integer in host order.
pub const OUTBOUND_ADDR: u32 = 0x7f00_0001;
/// Port of the inbound plaintext capture listener (non-mesh client → local pod).
pub const INBOUND_PORT: u16 = 15006;
/// Port of the HBONE (mTLS + HTTP/2 CONNECT) listener between node agents.
pub const HBONE_PORT: u16 = 15008;
/// Port of the DNS proxy (UDP, on the outbound listener's address), as
/// ztunnel's: meshed pods' queries to port 53 are assigned to it.
pub const DNS_PORT: u16 = 15053;
/// Port of the admin server on 127.0.0.1.
pub const ADMIN_PORT: u16 = 15000;

/// The mark bits the agent owns by default: `0x30`. Cilium keeps its magic
/// values in `0x0F00`, its identity in `0xFFFF00FF` (the low byte only for a
/// cluster id, 0 in a single cluster and below 16 in most meshes) and IPsec key
/// indices and its WireGuard marker in `0xF000`; Calico owns `0xFFFF0000`;
/// kube-proxy `0x4000` and `0x8000`; the AWS VPC CNI `0x80`. Configurable
/// (`--mark-mask`) for nodes where these bits are taken.
pub const DEFAULT_MARK_MASK: u32 = 0x0000_0030;

/// The three marks the agent uses, all inside `mask` (the bits it owns; the
/// rest of a packet's mark is left to the node's other tenants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Marks {
    /// Bits of the mark the agent owns.
    pub mask: u32,
    /// Socket mark (`SO_MARK`) on the agent's own sockets and on the kubelet's
    /// probe connections: the host-client capture (`cgroup/connect4`) leaves
    /// such sockets alone, and a meshed pod's last-hop gate lets their packets
    /// pass.
    pub agent: u32,
    /// skb mark set on packets assigned to an agent socket. A policy-routing rule
    /// (`fwmark captured/mask lookup PROXY_ROUTE_TABLE`) sends them to a
    /// table whose only route is `local 0.0.0.0/0 dev lo`, so the kernel delivers
    /// them locally instead of forwarding them to the pod the destination names.
    pub captured: u32,
    /// skb mark of a packet the last-hop gate (`mesh_gate`, a meshed pod veth's
    /// egress) handed back to the same veth's ingress: the ingress program then
    /// assigns it to an agent socket, or drops it. Routed locally like
    /// `captured`, and skipped by conntrack. A pod cannot set it (marks are
    /// cleared when a packet leaves a namespace).
    pub handoff: u32,
}

impl Marks {
    /// The marks made of the two lowest bits of `mask` (`agent` the lower,
    /// `captured` the higher, `handoff` both); `None` when `mask` has fewer
    /// than two bits.
    pub const fn from_mask(mask: u32) -> Option<Self> {
        if mask.count_ones() < 2 {
            return None;
        }
        let low = mask & mask.wrapping_neg();
        let rest = mask & !low;
        let high = rest & rest.wrapping_neg();
        Some(Self { mask, agent: low, captured: high, handoff: low | high })
    }
}

/// The default marks: agent `0x10`, captured `0x20`, handed off `0x30`.
pub const DEFAULT_MARKS: Marks = match Marks::from_mask(DEFAULT_MARK_MASK) {
    Some(m) => m,
    None => panic!("the default mark mask has two bits"),
};

/// Routing table holding the `local 0.0.0.0/0 dev lo` route.
pub const PROXY_ROUTE_TABLE: u32 = 15001;
/// Priority of the agent's policy-routing rule: before `lookup local` (0) is not
/// allowed, so right after it, ahead of `main` (32766).
pub const PROXY_RULE_PRIORITY: u32 = 90;

/// What the classifier does on an interface (the `role` of [`IfaceInfo`]).
pub mod role {
    /// Host-side veth of a local pod enrolled in the mesh: anti-spoof, then capture
    /// new outbound TCP connections into the outbound listener.
    pub const MESHED_POD: u32 = 1;
    /// Host-side veth of a local pod outside the mesh: anti-spoof, and deliver
    /// replies to the agent's own (transparent) upstream sockets; nothing captured.
    pub const UNMESHED_POD: u32 = 2;
    /// The node's uplink: no anti-spoof; for destinations that are local meshed
    /// pods, deliver to the agent's sockets and capture new connections into the
    /// inbound plaintext listener (PeerAuthentication decides there).
    pub const UPLINK: u32 = 3;
}

/// Value of the `IFACES` map, keyed by ifindex (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfaceInfo {
    /// The pod's IPv4 address in network byte order (as it appears on the wire);
    /// 0 on an uplink.
    pub pod_ip: u32,
    /// One of [`role`].
    pub role: u32,
}

/// Value of the single-entry `SETTINGS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Outbound listener address, network byte order. The listener is bound to a
    /// loopback address so that nothing can reach it except through capture (a pod
    /// dialing `node-ip:15001` directly must not loop the agent into itself).
    pub outbound_addr: u32,
    /// Outbound listener port, host byte order.
    pub outbound_port: u16,
    /// Inbound plaintext listener port (same address), host byte order.
    pub inbound_port: u16,
    /// Mark set on every assigned packet (see [`Marks::captured`]).
    pub mark: u32,
    /// Bits of the mark the agent owns.
    pub mark_mask: u32,
    /// Cookie of the node's network namespace: host clients are captured there
    /// only (the cgroup hooks see every namespace's sockets).
    pub netns_cookie: u64,
    /// Socket mark of the agent's own sockets (see [`Marks::agent`]).
    pub agent_mark: u32,
    /// 1 when host clients are captured (`cgroup/connect4`), else 0.
    pub host_capture: u32,
    /// Mark of packets handed back by the last-hop gate (see [`Marks::handoff`]).
    pub handoff_mark: u32,
    pub _pad: u32,
    /// cgroup v2 id of the kubelet (its directory's inode), or 0 when no
    /// process is exempt as the kubelet.
    pub kubelet_cgroup: u64,
}

/// An original destination, as the host-client capture records it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv4 address, network byte order.
    pub ip: u32,
    /// Port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Key of `PROBE_PORTS`: a local meshed pod's port that a probe in its Pod
/// spec names, which the kubelet reaches directly.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PodPort {
    /// IPv4 address, network byte order.
    pub ip: u32,
    /// Port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Key of `HOST_ORIG`: a host client's socket, as the agent sees its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostKey {
    /// IPv4 address, network byte order.
    pub ip: u32,
    /// Port, host byte order.
    pub port: u32,
}

/// Indices into the per-CPU `COUNTERS` array. Each counts packets.
pub mod counter {
    /// Packets seen by the classifier on an interface it knows.
    pub const SEEN: u32 = 0;
    /// Dropped: source address is not the pod IP registered for the interface.
    pub const SPOOF_DROPPED: u32 = 1;
    /// Assigned to an existing agent socket (established or half-open).
    pub const ASSIGNED_ESTABLISHED: u32 = 2;
    /// New connection (SYN) assigned to the outbound listener.
    pub const ASSIGNED_OUTBOUND: u32 = 3;
    /// New connection captured but the outbound listener was not found (agent not
    /// listening): the SYN was dropped so the client retries.
    pub const LISTENER_MISSING: u32 = 4;
    /// `bpf_sk_assign` failed; the packet was dropped.
    pub const ASSIGN_FAILED: u32 = 5;
    /// Packets passed untouched: not TCP, or not a meshed pod's and unreadable.
    pub const PASSED: u32 = 6;
    /// New plaintext connection to a local meshed pod assigned to the inbound listener.
    pub const ASSIGNED_INBOUND: u32 = 7;
    /// A host process's connection to a mesh Service VIP sent to the agent
    /// (`cgroup/connect4`; counts connections, not packets).
    pub const HOST_CAPTURED: u32 = 8;
    /// A TCP packet toward a meshed pod that did not come from the agent
    /// (another interface, a tunnel, DNAT, a node process), handed back by the
    /// last-hop gate to be assigned to the agent.
    pub const HANDED_OFF: u32 = 9;
    /// A handed-back packet that belongs to no agent socket and opens no
    /// connection (not a SYN): dropped.
    pub const GATE_DROPPED: u32 = 10;
    /// An IPv4 TCP fragment to or from a meshed pod: the ports and flags of a
    /// fragment cannot be trusted, so it is dropped.
    pub const FRAGMENT_DROPPED: u32 = 11;
    /// IPv6 to or from a meshed pod other than UDP and ICMPv6: dropped until
    /// the mesh carries IPv6.
    pub const IPV6_DROPPED: u32 = 12;
    /// A packet to or from a meshed pod whose headers could not be read whole.
    pub const UNPARSED_DROPPED: u32 = 13;
    /// A kubelet connection to a probe port of a local meshed pod, let
    /// through unproxied (counts connections).
    pub const PROBE_PASSED: u32 = 14;
    /// A meshed pod's DNS query (UDP to port 53) assigned to the agent's DNS proxy.
    pub const ASSIGNED_DNS: u32 = 15;
    /// A DNS query passed to its server because the agent's DNS socket was
    /// not there (fail open: the pod resolves as without the mesh).
    pub const DNS_PROXY_MISSING: u32 = 16;
    /// Number of counters.
    pub const LEN: u32 = 17;
    /// Names for the admin page, in index order.
    pub const NAMES: [&str; LEN as usize] = [
        "seen",
        "spoof_dropped",
        "assigned_established",
        "assigned_outbound",
        "listener_missing",
        "assign_failed",
        "passed",
        "assigned_inbound",
        "host_captured",
        "handed_off",
        "gate_dropped",
        "fragment_dropped",
        "ipv6_dropped",
        "unparsed_dropped",
        "probe_passed",
        "assigned_dns",
        "dns_proxy_missing",
    ];
}

const _: () = assert!(core::mem::size_of::<IfaceInfo>() == 8);
const _: () = assert!(core::mem::size_of::<Settings>() == 48);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 8);
const _: () = assert!(core::mem::size_of::<HostKey>() == 8);
const _: () = assert!(core::mem::size_of::<PodPort>() == 8);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers with no padding bytes left implicit.
    unsafe impl aya::Pod for super::IfaceInfo {}
    // SAFETY: as above; the two u16 ports fill the 4 bytes between the u32s,
    // the u64 cookie sits at offset 16 and the kubelet's cgroup id at 40.
    unsafe impl aya::Pod for super::Settings {}
    // SAFETY: a u32 and two u16s, no padding.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: two u32s.
    unsafe impl aya::Pod for super::HostKey {}
    // SAFETY: a u32 and two u16s, no padding.
    unsafe impl aya::Pod for super::PodPort {}
}
