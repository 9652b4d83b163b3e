//! Host clients: processes in the node's own network namespace (node daemons,
//! `hostNetwork` pods) that connect to a mesh Service VIP or a meshed pod's IP
//! (carried as the node's identity, as ztunnel carries them). `mesh_connect4` on
//! the cgroup v2 root sends such a connect to the outbound listener and
//! `mesh_sockops` records its original destination under its source address
//! and port in `HOST_ORIG`, which the proxy reads when it accepts.
//!
//! The programs see every namespace's sockets (the cgroup is the machine's
//! root), so they act only in this node's namespace (its netns cookie), and
//! never on the agent's own sockets (the agent mark). The kubelet's probes are
//! the one exemption: a process in the kubelet's cgroup (`--kubelet-cgroup`)
//! reaches a local meshed pod directly on a port that a probe in the pod's
//! spec names (`PROBE_PORTS`), its socket marked so that the pod's last-hop
//! gate lets it pass; on every other port it is captured like any node process.
//! Links are pinned (see [`super::pins`]): they outlive the agent, and while no
//! agent listens a captured connect is refused.
use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps, links::FdLink},
};
use mesh_common::{HostKey, OrigDst, PodPort};

use super::{
    CaptureError, KeySet, map_err,
    pins::{Held, Pins},
    take_map,
};
use crate::state::State;

/// The original destinations of captured host connections, shared with the proxy.
pub struct HostOrig(Mutex<BpfHashMap<MapData, HostKey, OrigDst>>);

impl HostOrig {
    /// The original destination of a host connection accepted from `peer`
    /// (the entry is consumed).
    pub fn take(&self, peer: SocketAddrV4) -> Option<SocketAddrV4> {
        let key = HostKey { ip: u32::from_ne_bytes(peer.ip().octets()), port: u32::from(peer.port()) };
        let mut map = self.0.lock().ok()?;
        let orig = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(SocketAddrV4::new(Ipv4Addr::from(orig.ip.to_ne_bytes()), orig.port))
    }
}

/// The destinations the programs act on, kept in step with the configuration.
pub struct HostCapture {
    dests: KeySet<u32>,
    /// `HOST_RANGES`: ServiceEntry CIDR ranges, (prefix length, network in
    /// network byte order), and those last written.
    ranges: (aya::maps::lpm_trie::LpmTrie<aya::maps::MapData, u32, u32>, HashSet<(u32, u32)>),
    probes: KeySet<PodPort>,
    pub cgroup: PathBuf,
    links: Vec<Held>,
}

/// The cgroup v2 root: `/sys/fs/cgroup` on a unified host, else the hybrid
/// layout's `/sys/fs/cgroup/unified`. When `/sys/fs/cgroup` is an empty
/// directory, this process runs in a mount namespace with a fresh sysfs (as
/// `ip netns exec` makes): cgroup2 is mounted there, visible to this process
/// only and gone with it.
pub fn default_cgroup_root() -> PathBuf {
    let base = Path::new("/sys/fs/cgroup");
    for p in [base.to_path_buf(), base.join("unified")] {
        if p.join("cgroup.controllers").exists() {
            return p;
        }
    }
    let empty = std::fs::read_dir(base).is_ok_and(|mut d| d.next().is_none());
    if empty {
        // SAFETY: NUL-terminated constant strings; no data argument.
        let rc = unsafe {
            libc::mount(c"cgroup2".as_ptr(), c"/sys/fs/cgroup".as_ptr(), c"cgroup2".as_ptr(), 0, std::ptr::null())
        };
        if rc == 0 {
            tracing::info!("mounted cgroup2 on /sys/fs/cgroup in this process's mount namespace");
        } else {
            tracing::warn!(error = %std::io::Error::last_os_error(), "mounting cgroup2 on /sys/fs/cgroup failed");
        }
    }
    base.into()
}

/// The cookie of this process's network namespace (Linux ≥ 5.14).
pub fn netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a u64 out-buffer with its length.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 { Ok(cookie) } else { Err(std::io::Error::last_os_error()) }
}

/// Names of the host-client programs' pins (see [`super::pins`]).
pub const PINS: [&str; 2] = ["cgroup-connect4", "cgroup-sockops"];

/// Loads and attaches the host-client programs to `cgroup`, pinned. An earlier
/// run's links are removed first: their maps are not this run's, and while
/// neither is attached a node process's connection to a meshed pod meets the
/// pod's last-hop gate, which fails closed.
pub fn start(ebpf: &mut Ebpf, cgroup: &Path, pins: &Pins) -> Result<(HostCapture, HostOrig), CaptureError> {
    let dests = KeySet::take(ebpf, "HOST_DESTS")?;
    let ranges =
        aya::maps::lpm_trie::LpmTrie::try_from(take_map(ebpf, "HOST_RANGES")?).map_err(map_err("HOST_RANGES"))?;
    let orig = BpfHashMap::try_from(take_map(ebpf, "HOST_ORIG")?).map_err(map_err("HOST_ORIG"))?;
    let probes = KeySet::take(ebpf, "PROBE_PORTS")?;
    let dir = std::fs::File::open(cgroup).map_err(|e| CaptureError::Cgroup { path: cgroup.into(), source: e })?;
    for name in PINS {
        pins.remove(name);
    }
    let connect: &mut CgroupSockAddr =
        ebpf.program_mut("mesh_connect4").ok_or(aya::programs::ProgramError::UnexpectedProgramType)?.try_into()?;
    connect.load()?;
    // On Linux ≥ 5.7 this is a bpf_link, which always coexists with others on
    // the cgroup (each node's agent, other tools); the kernel refuses the
    // ALLOW_MULTI flag on links, so `Single` is the mode to ask for.
    let id = connect.attach(&dir, CgroupAttachMode::Single)?;
    let connect_link = pins.hold(PINS[0], FdLink::try_from(connect.take_link(id)?)?).map_err(CaptureError::Pin)?;
    let sockops: &mut SockOps =
        ebpf.program_mut("mesh_sockops").ok_or(aya::programs::ProgramError::UnexpectedProgramType)?.try_into()?;
    sockops.load()?;
    let id = sockops.attach(&dir, CgroupAttachMode::Single)?;
    let sockops_link = pins.hold(PINS[1], FdLink::try_from(sockops.take_link(id)?)?).map_err(CaptureError::Pin)?;
    tracing::info!(cgroup = %cgroup.display(), "host clients captured (cgroup/connect4 + sockops)");
    let links = vec![connect_link, sockops_link];
    let capture = HostCapture { dests, ranges: (ranges, HashSet::new()), probes, cgroup: cgroup.into(), links };
    Ok((capture, HostOrig(Mutex::new(orig))))
}

impl HostCapture {
    /// Detaches and unpins both programs.
    pub fn release(self) {
        for l in self.links {
            l.release();
        }
    }

    /// Makes `HOST_DESTS` hold exactly the mesh Services' VIPs, the
    /// ServiceEntry addresses (host clients get the same routes and policy as
    /// pods there) and the meshed pods' IPs (on every node: a host client
    /// reaches a remote one over HBONE), and `PROBE_PORTS` the probe ports of
    /// the meshed pods on `node`.
    pub fn sync(&mut self, state: &State, node: &str) -> Result<(), CaptureError> {
        let vips = state.services.values().filter(|s| s.external.is_none()).filter_map(|s| s.vip);
        let entries = state.external_by_addr.keys().copied();
        let vips = vips.chain(entries);
        let pods = state.workloads.values().filter(|w| w.meshed && !w.host_network).filter_map(|w| w.ip);
        self.dests.sync(vips.chain(pods).map(|ip| u32::from_ne_bytes(ip.octets())).collect())?;
        let want: HashSet<(u32, u32)> = state
            .external_by_range
            .iter()
            .map(|(r, _)| (u32::from(r.prefix), u32::from_ne_bytes(r.addr.octets())))
            .collect();
        let (map, held) = &mut self.ranges;
        for &(prefix, net) in want.difference(held) {
            let key = aya::maps::lpm_trie::Key::new(prefix, net);
            map.insert(&key, 1, 0).map_err(map_err("HOST_RANGES"))?;
        }
        for &(prefix, net) in held.difference(&want) {
            let _ = map.remove(&aya::maps::lpm_trie::Key::new(prefix, net));
        }
        *held = want;
        let want: HashSet<PodPort> = state
            .local_workloads(node)
            .filter(|w| w.meshed)
            .filter_map(|w| Some((w.ip?, &w.probe_ports)))
            .flat_map(|(ip, ports)| {
                ports.iter().map(move |&port| PodPort { ip: u32::from_ne_bytes(ip.octets()), port, _pad: 0 })
            })
            .collect();
        self.probes.sync(want)
    }
}

/// The kubelet's cgroup: `flag` (absolute, or under `root`; `none`: no
/// exemption), else `system.slice/kubelet.service` under `root` if it exists.
pub fn kubelet_cgroup(root: &Path, flag: Option<&Path>) -> Option<PathBuf> {
    match flag {
        Some(p) if p == Path::new("none") => None,
        Some(p) => Some(root.join(p)),
        None => Some(root.join("system.slice/kubelet.service")).filter(|p| p.is_dir()),
    }
}

/// The cgroup v2 id of a cgroup directory (its inode number), as
/// `bpf_get_current_cgroup_id` reports it for the processes inside.
pub fn cgroup_id(path: &Path) -> Result<u64, CaptureError> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).map(|m| m.ino()).map_err(|e| CaptureError::Cgroup { path: path.into(), source: e })
}
