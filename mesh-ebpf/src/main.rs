//! eBPF programs of the mesh data plane.
//!
//! `mesh_tc`: a TC (TCX on Linux ≥ 6.6) **ingress** classifier, attached by the agent
//! to the host-side veth of every local pod and to the node's uplink. It only
//! acts on interfaces listed in `IFACES`; the entry's `role` selects the behaviour:
//!
//! 1. anti-spoof (pod interfaces): an IPv4 packet whose source is not the pod IP
//!    registered for the interface is dropped and counted;
//! 2. a TCP packet that belongs to an existing socket in the node's network
//!    namespace (`bpf_skc_lookup_tcp`: established, request or time-wait) is assigned
//!    to it. This is how replies reach the agent's transparent upstream sockets, whose
//!    local address is a pod IP the kernel would otherwise forward to the pod;
//! 3. on a meshed pod's interface, a new connection (SYN without ACK) is assigned to
//!    the outbound listener (`bpf_sk_assign`), found by looking up the tuple with the
//!    listener's loopback address and port. The accepted socket's local address is then the original
//!    destination: no rewriting, no conntrack, no checksums;
//! 4. on the uplink and on un-meshed pods' interfaces, a new connection to a local
//!    meshed pod (`LOCAL_MESHED`) is assigned the same way to the inbound plaintext
//!    listener, where PeerAuthentication decides. The uplink ignores everything
//!    else (the node's own traffic is not the mesh's business).
//!
//! Every assigned packet gets the proxy mark, which the agent's policy-routing rule
//! sends to a table with `local 0.0.0.0/0 dev lo`, so it is delivered locally.
//! Every socket reference taken is released on every path.
//!
//! `mesh_connect4` (`cgroup/connect4`, on the cgroup v2 root) and `mesh_sockops`
//! (`sockops`, same cgroup) catch processes in the node's own network namespace
//! (node daemons, `hostNetwork` pods) that connect to a mesh Service VIP
//! (`SERVICE_VIPS`): the connect is redirected to the outbound listener and the
//! original destination recorded by socket cookie (`ORIG_BY_COOKIE`); when the
//! kernel has picked the source port, `mesh_sockops` moves it to `HOST_ORIG`
//! keyed by (source address, port), which the agent reads on accept. Other
//! namespaces (netns cookie) and the agent's own sockets (`AGENT_MARK`) are
//! left alone.
//!
//! Maps: `IFACES` (ifindex → [`IfaceInfo`]), `LOCAL_MESHED` (local meshed pod
//! IPv4 → 1), `SERVICE_VIPS` (Service VIP → 1), `ORIG_BY_COOKIE`, `HOST_ORIG`,
//! `SETTINGS` (ports, mark, netns cookie), `COUNTERS`
//! (per-CPU packet counters, see `mesh_common::counter`).
//! Minimum kernel: 5.7 (`bpf_sk_assign`, netns cookies in sock_addr programs),
//! 6.6 for TCX attachment.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_CURRENT_NETNS, BPF_SOCK_OPS_TCP_CONNECT_CB, TC_ACT_OK, TC_ACT_SHOT, bpf_sock, bpf_sock_tuple},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::{cgroup_sock_addr, classifier, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext, TcContext},
};
use mesh_common::{HostKey, IfaceInfo, OrigDst, Settings, counter, role};

#[map]
static IFACES: HashMap<u32, IfaceInfo> = HashMap::with_max_entries(4096, 0);

#[map]
static LOCAL_MESHED: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

#[map]
static SERVICE_VIPS: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);

#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65536, 0);

#[map]
static HOST_ORIG: LruHashMap<HostKey, OrigDst> = LruHashMap::with_max_entries(65536, 0);

#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const BPF_TCP_LISTEN: u32 = 10;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

#[classifier]
pub fn mesh_tc(ctx: TcContext) -> i32 {
    classify(&ctx)
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
    /// 0 for non-TCP.
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    is_tcp: bool,
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    if ethertype != ETH_P_IP {
        return None;
    }
    let ver_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
    if ver_ihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    let frag: u16 = u16::from_be(ctx.load(ETH_HLEN + 6).ok()?);
    let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
    let saddr: u32 = ctx.load(ETH_HLEN + 12).ok()?;
    let daddr: u32 = ctx.load(ETH_HLEN + 16).ok()?;
    // Only the first fragment carries the TCP header.
    if proto != IPPROTO_TCP || frag & 0x1fff != 0 {
        return Some(Packet { saddr, daddr, sport: 0, dport: 0, tcp_flags: 0, is_tcp: false });
    }
    let l4 = ETH_HLEN + ihl;
    let sport: u16 = ctx.load(l4).ok()?;
    let dport: u16 = ctx.load(l4 + 2).ok()?;
    let tcp_flags: u8 = ctx.load(l4 + 13).ok()?;
    Some(Packet { saddr, daddr, sport, dport, tcp_flags, is_tcp: true })
}

fn classify(ctx: &TcContext) -> i32 {
    // SAFETY: the skb pointer is valid for the duration of the program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is copied out before any other map operation.
    let Some(info) = (unsafe { IFACES.get(&ifindex) }).copied() else {
        return TC_ACT_OK;
    };
    count(counter::SEEN);
    let Some(pkt) = parse(ctx) else {
        count(counter::PASSED);
        return TC_ACT_OK;
    };
    if info.role != role::UPLINK && pkt.saddr != info.pod_ip {
        count(counter::SPOOF_DROPPED);
        return TC_ACT_SHOT;
    }
    if !pkt.is_tcp {
        count(counter::PASSED);
        return TC_ACT_OK;
    }
    // SAFETY: only tested for presence.
    let to_local_meshed = unsafe { LOCAL_MESHED.get(&pkt.daddr) }.is_some();
    if info.role == role::UPLINK && !to_local_meshed {
        return TC_ACT_OK;
    }
    let Some(settings) = SETTINGS.get(0).copied() else {
        return TC_ACT_OK;
    };

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
            return assign(ctx, sk, &settings, counter::ASSIGNED_ESTABLISHED);
        }
        release(sk);
    }

    // 2. A new connection: from a meshed pod → the outbound listener; from
    //    anywhere else to a local meshed pod → the inbound plaintext listener.
    let is_syn = pkt.tcp_flags & TCP_FLAG_SYN != 0 && pkt.tcp_flags & TCP_FLAG_ACK == 0;
    if !is_syn {
        return TC_ACT_OK;
    }
    let (port, which) = if info.role == role::MESHED_POD {
        (settings.outbound_port, counter::ASSIGNED_OUTBOUND)
    } else if to_local_meshed {
        (settings.inbound_port, counter::ASSIGNED_INBOUND)
    } else {
        return TC_ACT_OK;
    };
    tuple.__bindgen_anon_1.ipv4.daddr = settings.outbound_addr;
    tuple.__bindgen_anon_1.ipv4.dport = port.to_be();
    let sk = lookup(ctx, &mut tuple, tuple_len);
    if sk.is_null() {
        count(counter::LISTENER_MISSING);
        return TC_ACT_SHOT;
    }
    // SAFETY: non-null socket returned by the lookup helper.
    if unsafe { (*sk).state } != BPF_TCP_LISTEN {
        release(sk);
        count(counter::LISTENER_MISSING);
        return TC_ACT_SHOT;
    }
    assign(ctx, sk, &settings, which)
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
fn assign(ctx: &TcContext, sk: *mut bpf_sock, settings: &Settings, which: u32) -> i32 {
    // SAFETY: `sk` is a referenced socket from a lookup; assign takes its own reference.
    let ret = unsafe { bpf_sk_assign(ctx.skb.skb.cast(), sk.cast(), 0) };
    release(sk);
    if ret != 0 {
        count(counter::ASSIGN_FAILED);
        return TC_ACT_SHOT;
    }
    // SAFETY: the skb pointer is valid; reading the current mark.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark((mark & !settings.mark_mask) | settings.mark);
    count(which);
    TC_ACT_OK
}

/// Allow the connect (1), possibly redirected to the outbound listener.
#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    connect4(&ctx);
    1
}

const IPPROTO_TCP_U32: u32 = 6;

fn connect4(ctx: &SockAddrContext) {
    let Some(settings) = SETTINGS.get(0).copied() else { return };
    if settings.host_capture == 0 {
        return;
    }
    // SAFETY: the context pointer is valid for the duration of the program.
    let addr = unsafe { &mut *ctx.sock_addr };
    if addr.protocol != IPPROTO_TCP_U32 {
        return;
    }
    // SAFETY: helper over this program's own context.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != settings.netns_cookie {
        return;
    }
    // Map keys must live on the stack, not in the context.
    // SAFETY: reading a field of the valid context.
    let dst_ip: u32 = unsafe { core::ptr::read_volatile(&addr.user_ip4) };
    // SAFETY: only tested for presence.
    if unsafe { SERVICE_VIPS.get(&dst_ip) }.is_none() {
        return;
    }
    // SAFETY: `sk` is always set for connect hooks.
    let sk = unsafe { addr.__bindgen_anon_1.sk };
    // SAFETY: checked non-null; `mark` is a readable field of bpf_sock.
    if sk.is_null() || unsafe { (*sk).mark } & settings.mark_mask == settings.agent_mark {
        return;
    }
    let orig = OrigDst { ip: dst_ip, port: u16::from_be(addr.user_port as u16), _pad: 0 };
    // SAFETY: helper over this program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
        return;
    }
    addr.user_ip4 = settings.outbound_addr;
    addr.user_port = u32::from(settings.outbound_port.to_be());
    count(counter::HOST_CAPTURED);
}

/// Once a redirected connect has its source port, records the original
/// destination under (source address, port) for the agent.
#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // SAFETY: helper over this program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: the value is copied out before the map is changed.
        if let Some(orig) = unsafe { ORIG_BY_COOKIE.get(&cookie) }.copied() {
            let key = HostKey { ip: ctx.local_ip4(), port: ctx.local_port() };
            let _ = HOST_ORIG.insert(&key, &orig, 0);
            let _ = ORIG_BY_COOKIE.remove(&cookie);
        }
    }
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
