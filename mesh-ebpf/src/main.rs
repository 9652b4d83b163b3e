//! eBPF programs of the mesh data plane.
//!
//! `mesh_tc`: a TC (TCX on Linux ≥ 6.6) **ingress** classifier, attached by the agent
//! to the host-side veth of every local pod and to the node's uplink. It only
//! acts on interfaces listed in `IFACES`; the entry's `role` selects the behaviour:
//!
//! 1. anti-spoof (pod interfaces): an IPv4 packet whose source is not the pod IP
//!    registered for the interface is dropped and counted;
//! 2. what cannot be classified is dropped for a meshed pod, never passed: IPv4
//!    TCP fragments, IPv6 other than UDP and ICMPv6, unreadable headers;
//! 3. a TCP packet that belongs to an existing socket in the node's network
//!    namespace (`bpf_skc_lookup_tcp`: established, request or time-wait) is assigned
//!    to it. This is how replies reach the agent's transparent upstream sockets, whose
//!    local address is a pod IP the kernel would otherwise forward to the pod;
//! 4. on a meshed pod's interface, a new connection (SYN without ACK) is assigned to
//!    the outbound listener (`bpf_sk_assign`), found by looking up the tuple with the
//!    listener's loopback address and port. The accepted socket's local address is then the original
//!    destination: no rewriting, no conntrack, no checksums;
//!    Link-local destinations (169.254.0.0/16: cloud metadata services) are
//!    left alone: the pod reaches them as it would without the mesh;
//! 5. on the uplink and on un-meshed pods' interfaces, a new connection to a local
//!    meshed pod (`LOCAL_MESHED`) is assigned the same way to the inbound plaintext
//!    listener, where PeerAuthentication decides: the fast path for the common
//!    ways in. The uplink ignores everything else.
//!
//! `mesh_gate`: a TC **egress** program on each meshed pod's host-side veth, the
//! last hop toward the pod, where every path has converged after routing and
//! DNAT (a second interface, an overlay tunnel, kube-proxy, a node process).
//! Packets marked as the agent's (its own sockets, and the kubelet's probes)
//! pass, and so do the replies of the pod's own link-local
//! connections (not a SYN, from 169.254.0.0/16); IPv6 TCP, TCP fragments and unreadable headers are
//! dropped; any other TCP packet is handed back to the veth's ingress
//! (`bpf_redirect` with `BPF_F_INGRESS`, marked with the hand-off mark), where
//! `mesh_tc` assigns it to the agent socket it belongs to or, for a SYN, to the
//! inbound listener, and drops it otherwise. So a connection reaches a meshed
//! pod through the agent or not at all.
//!
//! Every assigned packet gets the proxy mark, which the agent's policy-routing rule
//! sends to a table with `local 0.0.0.0/0 dev lo`, so it is delivered locally.
//! Every socket reference taken is released on every path.
//!
//! `mesh_connect4` (`cgroup/connect4`, on the cgroup v2 root) and `mesh_sockops`
//! (`sockops`, same cgroup) catch processes in the node's own network namespace
//! (node daemons, `hostNetwork` pods) that connect to a mesh Service VIP or a
//! meshed pod (`HOST_DESTS`): the connect is redirected to the outbound listener and the
//! original destination recorded by socket cookie (`ORIG_BY_COOKIE`); when the
//! kernel has picked the source port, `mesh_sockops` moves it to `HOST_ORIG`
//! keyed by (source address, port), which the agent reads on accept. Other
//! namespaces (netns cookie) and the agent's own sockets (the agent mark) are
//! left alone; the kubelet's connections (its cgroup id in `SETTINGS`) to a
//! probe port of a local meshed pod (`PROBE_PORTS`, from the Pod specs) are
//! given the agent mark and go directly.
//!
//! 6. on a meshed pod's interface, a DNS query (UDP to port 53, any server)
//!    of a pod in `DNS_PODS` is assigned to the agent's DNS proxy socket
//!    (`bpf_sk_lookup_udp` on the outbound address, port 15053), which
//!    answers from the server's address; when that socket is missing the
//!    query goes to its server (fail open). TCP to port 53 is captured as
//!    any connection (4.) and told apart by the agent.
//!
//! Maps: `IFACES` (ifindex → [`IfaceInfo`]), `DNS_PODS` (meshed pod IPv4 →
//! 1: its DNS is proxied), `LOCAL_MESHED` (local meshed pod
//! IPv4 → 1), `HOST_DESTS` (VIPs and meshed pod IPs → 1), `PROBE_PORTS`
//! (local meshed pods' probe ports → 1), `ORIG_BY_COOKIE`, `HOST_ORIG`,
//! `V6_REFUSED` (meshed pods' ifindexes that refused IPv6),
//! `SETTINGS` (ports, marks, netns cookie), `COUNTERS`
//! (per-CPU packet counters, see `mesh_common::counter`).
//! Minimum kernel: 5.7 (`bpf_sk_assign`, netns cookies in sock_addr programs),
//! 6.6 for TCX attachment.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, BPF_F_INGRESS, TC_ACT_OK, TC_ACT_SHOT, bpf_sock, bpf_sock_tuple},
    helpers::{bpf_redirect, bpf_sk_assign, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use mesh_common::{DNS_PORT, HostKey, IfaceInfo, OrigDst, PodPort, Settings, counter, role};

mod host;

#[map]
static IFACES: HashMap<u32, IfaceInfo> = HashMap::with_max_entries(4096, 0);

#[map]
static LOCAL_MESHED: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Meshed pods (IPv4, network byte order) whose DNS queries the agent answers.
#[map]
static DNS_PODS: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

#[map]
static HOST_DESTS: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);

/// ServiceEntry address ranges host clients are captured for (the key's
/// data: the network in network byte order, as the connect address is).
#[map]
static HOST_RANGES: LpmTrie<u32, u32> = LpmTrie::with_max_entries(4096, 0);

#[map]
static PROBE_PORTS: HashMap<PodPort, u32> = HashMap::with_max_entries(16384, 0);

#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65536, 0);

#[map]
static HOST_ORIG: LruHashMap<HostKey, OrigDst> = LruHashMap::with_max_entries(65536, 0);

/// Meshed pods' interfaces (ifindex) that refused IPv6, for the agent to log once.
#[map]
static V6_REFUSED: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: usize = 40;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const BPF_TCP_LISTEN: u32 = 10;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
/// IPv4 "more fragments" flag and fragment offset.
const IP_MF_OFFSET: u16 = 0x3fff;
const PACKET_HOST: u32 = 0;
const DNS_SERVER_PORT: u16 = 53;

/// Ingress of pod veths and the uplink: anti-spoof and capture (see the crate doc).
#[classifier]
pub fn mesh_tc(ctx: TcContext) -> i32 {
    classify(&ctx)
}

/// Egress of a meshed pod's host-side veth, toward the pod: the last hop, where
/// every path to the pod (any interface, tunnel, DNAT, a node process) has
/// converged after routing and DNAT. A TCP packet that did not come from the
/// agent's own sockets (their mark) is handed back to this veth's ingress,
/// where `mesh_tc` assigns it to an agent socket or drops it; IPv6 other than
/// UDP/ICMPv6, IPv4 TCP fragments and unreadable headers are dropped.
#[classifier]
pub fn mesh_gate(ctx: TcContext) -> i32 {
    gate(&ctx)
}

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

/// The IPv4/TCP fields the classifier needs, in network byte order.
struct Packet {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
}

/// What a packet's headers say, as far as the programs need to know.
enum Parsed {
    /// Neither IPv4 nor IPv6 (ARP, …).
    NotIp,
    /// IPv6, with the protocol that follows the fixed header.
    V6 { next: u8 },
    /// IPv4 other than TCP.
    V4Other { saddr: u32 },
    /// An IPv4 TCP fragment: its ports and flags cannot be trusted.
    V4TcpFragment { saddr: u32 },
    /// A whole IPv4 TCP header.
    Tcp(Packet),
    /// An unfragmented IPv4 UDP datagram's addresses and ports (no flags).
    Udp(Packet),
    /// Headers that could not be read whole (truncated, bad lengths).
    Unparsed,
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Parsed {
    let Ok(ethertype) = ctx.load::<u16>(12) else { return Parsed::Unparsed };
    match u16::from_be(ethertype) {
        ETH_P_IP => parse_v4(ctx).unwrap_or(Parsed::Unparsed),
        ETH_P_IPV6 => match ctx.load::<u8>(ETH_HLEN + 6) {
            // Multicast listener reports (neighbour discovery's companions)
            // come behind a hop-by-hop header: look one header further.
            Ok(IPPROTO_HOPOPTS) => match ctx.load::<u8>(ETH_HLEN + IPV6_HLEN) {
                Ok(next) => Parsed::V6 { next },
                Err(_) => Parsed::Unparsed,
            },
            Ok(next) => Parsed::V6 { next },
            Err(_) => Parsed::Unparsed,
        },
        _ => Parsed::NotIp,
    }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext) -> Option<Parsed> {
    let ver_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let frag: u16 = u16::from_be(ctx.load(ETH_HLEN + 6).ok()?);
    let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
    let saddr: u32 = ctx.load(ETH_HLEN + 12).ok()?;
    let daddr: u32 = ctx.load(ETH_HLEN + 16).ok()?;
    if proto == IPPROTO_UDP && frag & IP_MF_OFFSET == 0 {
        let l4 = ETH_HLEN + ihl;
        let sport: u16 = ctx.load(l4).ok()?;
        let dport: u16 = ctx.load(l4 + 2).ok()?;
        return Some(Parsed::Udp(Packet { saddr, daddr, sport, dport, tcp_flags: 0 }));
    }
    if proto != IPPROTO_TCP {
        return Some(Parsed::V4Other { saddr });
    }
    // A first fragment may be too short to hold the flags, and a later one
    // holds none: neither can be classified, so neither is ever passed.
    if frag & IP_MF_OFFSET != 0 {
        return Some(Parsed::V4TcpFragment { saddr });
    }
    let l4 = ETH_HLEN + ihl;
    let sport: u16 = ctx.load(l4).ok()?;
    let dport: u16 = ctx.load(l4 + 2).ok()?;
    let tcp_flags: u8 = ctx.load(l4 + 13).ok()?;
    Some(Parsed::Tcp(Packet { saddr, daddr, sport, dport, tcp_flags }))
}

/// A SYN without ACK: the packet that opens a connection.
#[inline(always)]
fn is_syn(pkt: &Packet) -> bool {
    pkt.tcp_flags & TCP_FLAG_SYN != 0 && pkt.tcp_flags & TCP_FLAG_ACK == 0
}

/// 169.254.0.0/16 (an address in network byte order).
#[inline(always)]
fn is_link_local(addr: u32) -> bool {
    u32::from_be(addr) >> 16 == 0xa9fe
}

/// Drops and counts.
#[inline(always)]
fn drop_counted(which: u32) -> i32 {
    count(which);
    TC_ACT_SHOT
}

/// IPv6 the mesh lets through for a meshed pod: ICMPv6 (neighbour discovery)
/// and UDP. TCP, and anything behind another extension header, is refused
/// until the mesh carries IPv6.
#[inline(always)]
fn v6_allowed(next: u8) -> bool {
    next == IPPROTO_UDP || next == IPPROTO_ICMPV6
}

#[inline(always)]
fn skb_mark(ctx: &TcContext) -> u32 {
    // SAFETY: the skb pointer is valid for the duration of the program.
    unsafe { (*ctx.skb.skb).mark }
}

#[inline(always)]
fn iface(ctx: &TcContext) -> Option<(u32, IfaceInfo)> {
    // SAFETY: the skb pointer is valid for the duration of the program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is copied out before any other map operation.
    let info = (unsafe { IFACES.get(&ifindex) }).copied()?;
    Some((ifindex, info))
}

fn gate(ctx: &TcContext) -> i32 {
    let Some((ifindex, info)) = iface(ctx) else { return TC_ACT_OK };
    if info.role != role::MESHED_POD {
        return TC_ACT_OK;
    }
    let Some(settings) = SETTINGS.get(0).copied() else {
        // Not configured yet: nothing may pass unchecked.
        return drop_counted(counter::GATE_DROPPED);
    };
    let owner = skb_mark(ctx) & settings.mark_mask;
    if owner == settings.agent_mark {
        return TC_ACT_OK;
    }
    match parse(ctx) {
        Parsed::NotIp | Parsed::V4Other { .. } | Parsed::Udp(_) => TC_ACT_OK,
        Parsed::V6 { next } if v6_allowed(next) => TC_ACT_OK,
        Parsed::V6 { .. } => {
            seen_v6(ifindex);
            drop_counted(counter::IPV6_DROPPED)
        }
        Parsed::V4TcpFragment { .. } => drop_counted(counter::FRAGMENT_DROPPED),
        Parsed::Unparsed => drop_counted(counter::UNPARSED_DROPPED),
        // The replies of the pod's own link-local connections (see `classify`):
        // only a SYN could open a connection, and that one is handed back.
        Parsed::Tcp(pkt) if is_link_local(pkt.saddr) && !is_syn(&pkt) => TC_ACT_OK,
        Parsed::Tcp(_) => {
            ctx.set_mark((skb_mark(ctx) & !settings.mark_mask) | settings.handoff_mark);
            count(counter::HANDED_OFF);
            // SAFETY: plain helper call; returns TC_ACT_REDIRECT or TC_ACT_SHOT.
            unsafe { bpf_redirect(ifindex, u64::from(BPF_F_INGRESS)) as i32 }
        }
    }
}

/// Records that a meshed pod's interface saw IPv6 it refused, for the agent
/// to log once per pod.
#[inline(always)]
fn seen_v6(ifindex: u32) {
    // SAFETY: only tested for presence.
    if unsafe { V6_REFUSED.get(&ifindex) }.is_none() {
        let _ = V6_REFUSED.insert(&ifindex, &1, 0);
    }
}

fn classify(ctx: &TcContext) -> i32 {
    let Some((ifindex, info)) = iface(ctx) else { return TC_ACT_OK };
    count(counter::SEEN);
    let Some(settings) = SETTINGS.get(0).copied() else {
        return TC_ACT_OK;
    };
    let meshed = info.role == role::MESHED_POD;
    // Handed back by this veth's gate: the agent takes it, or nobody does.
    if meshed && skb_mark(ctx) & settings.mark_mask == settings.handoff_mark {
        return handed_off(ctx, &settings);
    }
    let parsed = match parse(ctx) {
        // A meshed pod's DNS query, from its own address: the agent answers.
        Parsed::Udp(pkt) if meshed && pkt.dport == DNS_SERVER_PORT.to_be() && pkt.saddr == info.pod_ip => {
            // SAFETY: only tested for presence.
            if unsafe { DNS_PODS.get(&pkt.saddr) }.is_some() {
                return dns(ctx, &pkt, &settings);
            }
            Parsed::V4Other { saddr: pkt.saddr }
        }
        Parsed::Udp(pkt) => Parsed::V4Other { saddr: pkt.saddr },
        other => other,
    };
    let pkt = match parsed {
        Parsed::Tcp(pkt) => pkt,
        Parsed::V4Other { saddr } | Parsed::V4TcpFragment { saddr }
            if info.role != role::UPLINK && saddr != info.pod_ip =>
        {
            return drop_counted(counter::SPOOF_DROPPED);
        }
        Parsed::V4TcpFragment { .. } if meshed => return drop_counted(counter::FRAGMENT_DROPPED),
        Parsed::V6 { next } if meshed && !v6_allowed(next) => {
            seen_v6(ifindex);
            return drop_counted(counter::IPV6_DROPPED);
        }
        Parsed::Unparsed if meshed => return drop_counted(counter::UNPARSED_DROPPED),
        _ => {
            count(counter::PASSED);
            return TC_ACT_OK;
        }
    };
    if info.role != role::UPLINK && pkt.saddr != info.pod_ip {
        return drop_counted(counter::SPOOF_DROPPED);
    }
    // Link-local destinations (cloud metadata services among them) are not
    // the mesh's to proxy: the pod's packets flow as without it, so hop
    // limits and the platform's own protections apply unchanged.
    if meshed && is_link_local(pkt.daddr) {
        count(counter::PASSED);
        return TC_ACT_OK;
    }
    // SAFETY: only tested for presence.
    let to_local_meshed = unsafe { LOCAL_MESHED.get(&pkt.daddr) }.is_some();
    if info.role == role::UPLINK && !to_local_meshed {
        return TC_ACT_OK;
    }
    // A new connection: from a meshed pod → the outbound listener; from
    // anywhere else to a local meshed pod → the inbound plaintext listener.
    let new_conn = if meshed {
        Some((settings.outbound_port, counter::ASSIGNED_OUTBOUND))
    } else if to_local_meshed {
        Some((settings.inbound_port, counter::ASSIGNED_INBOUND))
    } else {
        None
    };
    match steer(ctx, &pkt, settings.mark, &settings, new_conn) {
        Steered::Verdict(v) => v,
        // Not ours: routed as usual (to a local meshed pod, the gate decides).
        Steered::NoSocket => TC_ACT_OK,
    }
}

/// A packet the gate handed back: it belongs to an agent socket, or opens a
/// connection the inbound listener takes, or it is dropped. Never passed: it
/// would only come back to the gate.
fn handed_off(ctx: &TcContext, settings: &Settings) -> i32 {
    // The Ethernet destination is the pod's MAC: without this the stack would
    // take it for another host's packet and drop it.
    if ctx.change_type(PACKET_HOST).is_err() {
        return drop_counted(counter::GATE_DROPPED);
    }
    let Parsed::Tcp(pkt) = parse(ctx) else {
        return drop_counted(counter::UNPARSED_DROPPED);
    };
    match steer(ctx, &pkt, settings.handoff_mark, settings, Some((settings.inbound_port, counter::ASSIGNED_INBOUND))) {
        Steered::Verdict(v) => v,
        Steered::NoSocket => drop_counted(counter::GATE_DROPPED),
    }
}

enum Steered {
    /// Assigned to a socket (TC_ACT_OK) or dropped (TC_ACT_SHOT).
    Verdict(i32),
    /// Neither an existing socket's nor a new connection to take.
    NoSocket,
}

/// Assigns `pkt` to the agent socket it belongs to, else (a SYN, when
/// `new_conn` names a listener port) to that listener, and marks it `mark`
/// (both marks are routed locally; handed-back packets keep theirs so that
/// netfilter does not track them again).
#[inline(always)]
fn steer(ctx: &TcContext, pkt: &Packet, mark: u32, settings: &Settings, new_conn: Option<(u16, u32)>) -> Steered {
    // SAFETY: zeroed plain-old-data union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = pkt.saddr;
    tuple.__bindgen_anon_1.ipv4.daddr = pkt.daddr;
    tuple.__bindgen_anon_1.ipv4.sport = pkt.sport;
    tuple.__bindgen_anon_1.ipv4.dport = pkt.dport;
    let tuple_len = core::mem::size_of::<u32>() as u32 * 2 + core::mem::size_of::<u16>() as u32 * 2;

    // 1. An existing socket for this exact tuple (not a listener on the port).
    let sk = lookup(ctx, &mut tuple, tuple_len);
    if !sk.is_null() {
        // SAFETY: non-null socket returned by the lookup helper.
        if unsafe { (*sk).state } != BPF_TCP_LISTEN {
            return Steered::Verdict(assign(ctx, sk, mark, settings, counter::ASSIGNED_ESTABLISHED));
        }
        release(sk);
    }
    // 2. A new connection, to the listener that takes it.
    let Some((port, which)) = new_conn.filter(|_| is_syn(pkt)) else {
        return Steered::NoSocket;
    };
    tuple.__bindgen_anon_1.ipv4.daddr = settings.outbound_addr;
    tuple.__bindgen_anon_1.ipv4.dport = port.to_be();
    let sk = lookup(ctx, &mut tuple, tuple_len);
    if sk.is_null() {
        return Steered::Verdict(drop_counted(counter::LISTENER_MISSING));
    }
    // SAFETY: non-null socket returned by the lookup helper.
    if unsafe { (*sk).state } != BPF_TCP_LISTEN {
        release(sk);
        return Steered::Verdict(drop_counted(counter::LISTENER_MISSING));
    }
    Steered::Verdict(assign(ctx, sk, mark, settings, which))
}

/// Assigns a DNS query to the agent's DNS proxy socket; passes it on to its
/// server when the socket is missing (the agent is restarting).
fn dns(ctx: &TcContext, pkt: &Packet, settings: &Settings) -> i32 {
    // SAFETY: zeroed plain-old-data union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = pkt.saddr;
    tuple.__bindgen_anon_1.ipv4.sport = pkt.sport;
    tuple.__bindgen_anon_1.ipv4.daddr = settings.outbound_addr;
    tuple.__bindgen_anon_1.ipv4.dport = DNS_PORT.to_be();
    let len = core::mem::size_of::<u32>() as u32 * 2 + core::mem::size_of::<u16>() as u32 * 2;
    // SAFETY: the tuple lives on this program's stack for the call.
    let sk = unsafe { bpf_sk_lookup_udp(ctx.skb.skb.cast(), &mut tuple, len, BPF_F_CURRENT_NETNS as i64 as u64, 0) };
    if sk.is_null() {
        count(counter::DNS_PROXY_MISSING);
        return TC_ACT_OK;
    }
    assign(ctx, sk, settings.mark, settings, counter::ASSIGNED_DNS)
}

#[inline(always)]
fn lookup(ctx: &TcContext, tuple: &mut bpf_sock_tuple, len: u32) -> *mut bpf_sock {
    // SAFETY: the tuple lives on this program's stack for the call.
    unsafe { bpf_skc_lookup_tcp(ctx.skb.skb.cast(), tuple, len, BPF_F_CURRENT_NETNS as i64 as u64, 0) }
}

#[inline(always)]
fn release(sk: *mut bpf_sock) {
    // SAFETY: `sk` came from a lookup helper and is released exactly once.
    unsafe { bpf_sk_release(sk.cast()) };
}

#[inline(always)]
fn assign(ctx: &TcContext, sk: *mut bpf_sock, mark: u32, settings: &Settings, which: u32) -> i32 {
    // SAFETY: `sk` is a referenced socket from a lookup; assign takes its own reference.
    let ret = unsafe { bpf_sk_assign(ctx.skb.skb.cast(), sk.cast(), 0) };
    release(sk);
    if ret != 0 {
        count(counter::ASSIGN_FAILED);
        return TC_ACT_SHOT;
    }
    ctx.set_mark((skb_mark(ctx) & !settings.mark_mask) | mark);
    count(which);
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
