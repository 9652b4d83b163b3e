//! The host-client programs: `mesh_connect4` (`cgroup/connect4`) and
//! `mesh_sockops` (`sockops`), on the cgroup v2 root (see the crate doc).
use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_SOCK_OPS_TCP_CONNECT_CB,
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_setsockopt},
    macros::{cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use mesh_common::{HostKey, OrigDst, PodPort, counter};

use crate::{HOST_DESTS, HOST_ORIG, HOST_RANGES, ORIG_BY_COOKIE, PROBE_PORTS, SETTINGS, count};

/// Allow the connect (1), possibly redirected to the outbound listener.
#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    connect4(&ctx);
    1
}

const IPPROTO_TCP_U32: u32 = 6;
const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;

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
    if unsafe { HOST_DESTS.get(&dst_ip) }.is_none()
        && HOST_RANGES.get(aya_ebpf::maps::lpm_trie::Key::new(32, dst_ip)).is_none()
    {
        return;
    }
    // SAFETY: `sk` is always set for connect hooks.
    let sk = unsafe { addr.__bindgen_anon_1.sk };
    // SAFETY: checked non-null; `mark` is a readable field of bpf_sock.
    if sk.is_null() || unsafe { (*sk).mark } & settings.mark_mask == settings.agent_mark {
        return;
    }
    let dst_port = u16::from_be(addr.user_port as u16);
    // The kubelet's probes reach a local meshed pod directly on the ports its
    // Pod spec's probes name, as in Istio ambient; the socket mark lets them
    // past the pod's last-hop gate. Any other port is captured like any node
    // process's connection.
    let probe = PodPort { ip: dst_ip, port: dst_port, _pad: 0 };
    // SAFETY: plain helper calls; the map is only tested for presence.
    if settings.kubelet_cgroup != 0
        && unsafe { bpf_get_current_cgroup_id() } == settings.kubelet_cgroup
        && unsafe { PROBE_PORTS.get(&probe) }.is_some()
    {
        let mut mark = settings.agent_mark;
        // SAFETY: a u32 option value on this program's stack, with its length.
        let rc = unsafe { bpf_setsockopt(ctx.as_ptr(), SOL_SOCKET, SO_MARK, (&mut mark as *mut u32).cast(), 4) };
        if rc == 0 {
            count(counter::PROBE_PASSED);
            return;
        }
    }
    let orig = OrigDst { ip: dst_ip, port: dst_port, _pad: 0 };
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
