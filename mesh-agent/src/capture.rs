//! Traffic capture: loads the eBPF classifier, attaches it to the host-side veth
//! of each local pod (and the last-hop gate to each meshed pod's veth egress),
//! keeps the `IFACES` map in step with the configuration, and owns the
//! policy-routing rule that delivers assigned packets locally, the node
//! settings handed-back packets need (see [`node`]) and the notrack rule that
//! keeps DNAT'd connections working through the gate.
//!
//! Every link attached here is pinned (see [`pins`]): it outlives the process,
//! fails closed while no agent runs, and is adopted by the next one. Only an
//! uninstall detaches it all and removes the routing rule; a start replaces a
//! rule an earlier run left.
use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::FdLink,
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use mesh_common::{INBOUND_PORT, IfaceInfo, OUTBOUND_ADDR, OUTBOUND_PORT, Settings, counter, role};
use serde::Serialize;

use crate::state::State;

pub mod gate;
mod keyset;
pub use keyset::KeySet;
pub mod host;
pub mod netlink;
pub mod node;
pub mod pins;

/// The eBPF object built by build.rs from `mesh-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

const PROGRAM: &str = "mesh_tc";
const GATE: &str = "mesh_gate";

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("loading eBPF programs failed (is this kernel ≥ 6.6 with BTF, and are we root with CAP_BPF?): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error(transparent)]
    Netlink(#[from] netlink::NetlinkError),
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("cgroup {path}: {source} (is cgroup v2 mounted there? see --cgroup-root)")]
    Cgroup { path: std::path::PathBuf, source: std::io::Error },
    #[error("eBPF link: {0}")]
    Link(#[from] aya::programs::links::LinkError),
    #[error("{0}")]
    Pin(&'static str),
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> CaptureError {
    move |source| CaptureError::Map { name, source }
}

/// One interface the classifier is attached to.
#[derive(Debug, Clone, Serialize)]
pub struct Attached {
    pub ifname: String,
    pub info_role: &'static str,
    pub pod: String,
    pub pod_ip: Ipv4Addr,
    #[serde(skip)]
    info: IfaceInfo,
}

/// A local pod that should be captured but whose interface was not found (yet).
#[derive(Debug, Clone, Serialize)]
pub struct Pending {
    pub pod: String,
    pub pod_ip: Ipv4Addr,
    pub reason: &'static str,
}

pub struct Capture {
    ebpf: Ebpf,
    ifaces: BpfHashMap<MapData, u32, IfaceInfo>,
    /// Local meshed pod IPs (network order): plaintext to them goes to 15006.
    meshed_ips: KeySet<u32>,
    /// Meshed pods whose DNS queries the agent answers.
    dns_pods: KeySet<u32>,
    counters: PerCpuArray<MapData, u64>,
    handle: rtnetlink::Handle,
    lo: u32,
    attached: BTreeMap<u32, Attached>,
    /// TCX links by ifindex (kept apart: links are neither `Clone` nor `Serialize`).
    links: HashMap<u32, pins::Held>,
    /// The last-hop gates (egress) on meshed pods' veths, by ifindex.
    gates: HashMap<u32, pins::Held>,
    pins: pins::Pins,
    v6_refused: BpfHashMap<MapData, u32, u32>,
    /// Interfaces whose refused IPv6 was logged (once per pod).
    v6_logged: std::collections::HashSet<u32>,
    node: node::NodeSettings,
    pub pending: Vec<Pending>,
    host: Option<host::HostCapture>,
    host_orig: Option<host::HostOrig>,
    gate: gate::Gate,
    /// The node's pod ranges given on the command line (over the Node's).
    pub pod_cidrs: Vec<crate::state::security::Cidr>,
    /// Whether meshed pods' DNS is captured (`--dns-capture`; each pod may opt out).
    pub dns_capture: bool,
    /// Pods' addresses from the CNI plugin, by (namespace, name): known
    /// before the API server's pod status says them.
    pub cni_ips: HashMap<(String, String), Ipv4Addr>,
}

impl Capture {
    /// Loads the programs, fills the settings map and installs the routing rule.
    /// With `host_cgroup`, host clients are captured too (see [`host`]); if
    /// that fails, the rest works without it and the reason is logged.
    pub async fn start(
        host_cgroup: Option<&std::path::Path>,
        kubelet_cgroup: Option<&std::path::Path>,
        bpffs: &std::path::Path,
    ) -> Result<Self, CaptureError> {
        let pins = pins::Pins::open(bpffs);
        let mut loader = EbpfLoader::new();
        // Host clients' original destinations: written by the programs,
        // read by whichever agent accepts. During a replacement the old
        // agent still accepts while the new one's programs run, so the maps
        // are the node's, pinned, not each process's.
        for name in SHARED_MAPS {
            if let Some(path) = pins.map_path(name) {
                loader.map_pin_path(name, path);
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        let netns_cookie = match host_cgroup.map(|_| host::netns_cookie()) {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "no network namespace cookie (Linux ≥ 5.14): host clients are not captured");
                None
            }
            None => None,
        };
        let marks = crate::marks::get();
        let settings = Settings {
            outbound_addr: OUTBOUND_ADDR.to_be(),
            outbound_port: OUTBOUND_PORT,
            inbound_port: INBOUND_PORT,
            mark: marks.captured,
            mark_mask: marks.mask,
            netns_cookie: netns_cookie.unwrap_or(0),
            agent_mark: marks.agent,
            host_capture: u32::from(netns_cookie.is_some()),
            handoff_mark: marks.handoff,
            _pad: 0,
            kubelet_cgroup: kubelet_cgroup.map(host::cgroup_id).transpose()?.unwrap_or(0),
        };
        // Borrowed, not taken: the map must stay open until the program is loaded.
        let settings_map = ebpf.map_mut("SETTINGS").ok_or_else(|| missing_map("SETTINGS"))?;
        let mut settings_map: Array<_, Settings> = Array::try_from(settings_map).map_err(map_err("SETTINGS"))?;
        settings_map.set(0, settings, 0).map_err(map_err("SETTINGS"))?;
        let ifaces = BpfHashMap::try_from(take_map(&mut ebpf, "IFACES")?).map_err(map_err("IFACES"))?;
        let meshed_ips = KeySet::take(&mut ebpf, "LOCAL_MESHED")?;
        let dns_pods = KeySet::take(&mut ebpf, "DNS_PODS")?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, "COUNTERS")?).map_err(map_err("COUNTERS"))?;
        let v6_refused = BpfHashMap::try_from(take_map(&mut ebpf, "V6_REFUSED")?).map_err(map_err("V6_REFUSED"))?;
        program(&mut ebpf, PROGRAM)?.load()?;
        program(&mut ebpf, GATE)?.load()?;
        let (host, host_orig) = match (host_cgroup, netns_cookie) {
            (Some(cgroup), Some(_)) => match host::start(&mut ebpf, cgroup, &pins) {
                Ok((h, o)) => (Some(h), Some(o)),
                Err(e) => {
                    tracing::warn!(error = %e, detail = ?e, "host clients are not captured");
                    (None, None)
                }
            },
            _ => (None, None),
        };
        let handle = netlink::connect()?;
        let lo = loopback_index()?;
        netlink::install_proxy_routing(&handle, lo, &marks).await?;
        let node = node::NodeSettings::apply(&marks);
        Ok(Self {
            ebpf,
            ifaces,
            meshed_ips,
            dns_pods,
            dns_capture: false,
            counters,
            handle,
            lo,
            attached: BTreeMap::new(),
            links: HashMap::new(),
            gates: HashMap::new(),
            pins,
            v6_refused,
            v6_logged: Default::default(),
            node,
            pending: Vec::new(),
            host,
            host_orig,
            gate: gate::Gate::default(),
            pod_cidrs: Vec::new(),
            cni_ips: HashMap::new(),
        })
    }

    /// The host clients' original destinations, for the proxy (once).
    pub fn take_host_orig(&mut self) -> Option<host::HostOrig> {
        self.host_orig.take()
    }

    /// Attaches to, updates or detaches from interfaces so that exactly the local
    /// pods of `state` on `node` are handled, each with its current role.
    pub async fn reconcile(&mut self, state: &State, node: &str) -> Result<(), CaptureError> {
        let routes = netlink::pod_routes(&self.handle).await?;
        let names = netlink::link_names().map_err(CaptureError::Io)?;
        let mut desired: BTreeMap<u32, Attached> = BTreeMap::new();
        let mut pending = Vec::new();
        self.forget_departed_cni_pods(state, node);
        for w in state.scheduled_workloads(node) {
            let from_cni = match self.cni_ips.is_empty() {
                true => None,
                false => self.cni_ips.get(&(w.namespace.to_string(), w.name.to_string())).copied(),
            };
            // The plugin's address is the current sandbox's; the API's may be a
            // previous one's until the kubelet reports the new.
            let Some(ip) = from_cni.or(w.ip) else { continue };
            let pod = format!("{}/{}", w.namespace, w.name);
            let Some((&ifindex, ifname)) = routes.get(&ip).and_then(|i| names.get_key_value(i)) else {
                if w.meshed {
                    pending.push(Pending { pod, pod_ip: ip, reason: "no /32 route to the pod IP via an interface" });
                }
                continue;
            };
            let r = if w.meshed { role::MESHED_POD } else { role::UNMESHED_POD };
            let info = IfaceInfo { pod_ip: u32::from_ne_bytes(ip.octets()), role: r };
            let info_role = if w.meshed { "meshed" } else { "unmeshed" };
            desired.insert(ifindex, Attached { ifname: ifname.clone(), info_role, pod, pod_ip: ip, info });
        }
        // The node's uplink (the interface with its InternalIP): plaintext from
        // other nodes or outside to local meshed pods is captured there.
        let node_ip = state.nodes.get(node).and_then(|n| n.internal_ip);
        if let Some(node_ip) = node_ip {
            match netlink::link_with_address(&self.handle, node_ip).await? {
                Some(ifindex) if !desired.contains_key(&ifindex) => {
                    let ifname = names.get(&ifindex).cloned().unwrap_or_default();
                    let info = IfaceInfo { pod_ip: u32::from_ne_bytes(node_ip.octets()), role: role::UPLINK };
                    let pod = format!("node {node}");
                    desired.insert(ifindex, Attached { ifname, info_role: "uplink", pod, pod_ip: node_ip, info });
                }
                Some(_) => {}
                None => pending.push(Pending {
                    pod: format!("node {node}"),
                    pod_ip: node_ip,
                    reason: "no interface holds the node's InternalIP",
                }),
            }
        }
        self.sync_meshed_ips(state, node)?;
        if let Some(h) = &mut self.host {
            h.sync(state, node)?;
        }
        // Detach what is no longer wanted (pod removed, or its interface replaced).
        let stale: Vec<u32> = self
            .attached
            .iter()
            .filter(|(i, a)| desired.get(i).is_none_or(|d| d.ifname != a.ifname))
            .map(|(i, _)| *i)
            .collect();
        for ifindex in stale {
            self.detach(ifindex);
        }
        for (ifindex, want) in desired {
            if let Some(have) = self.attached.get_mut(&ifindex) {
                if have.info != want.info {
                    self.ifaces.insert(ifindex, want.info, 0).map_err(map_err("IFACES"))?;
                    have.info = want.info;
                    have.info_role = want.info_role;
                    have.pod = want.pod;
                    tracing::info!(ifname = %have.ifname, pod = %have.pod, role = have.info_role, "capture updated");
                }
            } else {
                // Map entry first: the program ignores interfaces it does not know.
                self.ifaces.insert(ifindex, want.info, 0).map_err(map_err("IFACES"))?;
                match self.attach_tc(PROGRAM, TcAttachType::Ingress, ifindex, &want.ifname) {
                    Ok(held) => {
                        self.links.insert(ifindex, held);
                        tracing::info!(ifname = %want.ifname, pod = %want.pod, role = want.info_role, "capture attached");
                        self.attached.insert(ifindex, want);
                    }
                    Err(e) => {
                        // The interface may have vanished between listing and attaching.
                        let _ = self.ifaces.remove(&ifindex);
                        tracing::warn!(ifname = %want.ifname, pod = %want.pod, error = %e, "attaching the classifier failed; will retry");
                        pending.push(Pending {
                            pod: want.pod,
                            pod_ip: want.pod_ip,
                            reason: "attaching the classifier failed",
                        });
                        continue;
                    }
                }
            }
            if let Err(reason) = self.sync_gate(ifindex) {
                let a = &self.attached[&ifindex];
                pending.push(Pending { pod: a.pod.clone(), pod_ip: a.pod_ip, reason });
            }
        }
        self.log_refused_v6();
        self.sweep_pins();
        self.sync_pod_gate(state, node);
        self.pending = pending;
        Ok(())
    }

    /// Attaches the last-hop gate to a meshed pod's veth (with the settings
    /// handed-back packets need), or detaches it from one no longer meshed.
    fn sync_gate(&mut self, ifindex: u32) -> Result<(), &'static str> {
        let Some(a) = self.attached.get(&ifindex) else { return Ok(()) };
        let want = a.info.role == role::MESHED_POD;
        match (want, self.gates.contains_key(&ifindex)) {
            (true, false) => {
                let ifname = a.ifname.clone();
                if let Err(e) = node::prepare_gated(&ifname) {
                    tracing::warn!(%ifname, error = %e, "interface settings for the last-hop gate; will retry");
                    return Err("setting accept_local/rp_filter on the pod's interface failed");
                }
                match self.attach_tc(GATE, TcAttachType::Egress, ifindex, &ifname) {
                    Ok(held) => {
                        self.gates.insert(ifindex, held);
                        tracing::info!(%ifname, "last-hop gate attached");
                    }
                    Err(e) => {
                        tracing::warn!(%ifname, error = %e, "attaching the last-hop gate failed; will retry");
                        return Err("attaching the last-hop gate failed");
                    }
                }
            }
            (false, true) => self.detach_gate(ifindex),
            _ => {}
        }
        Ok(())
    }

    /// Attaches `prog` to an interface, first in line, and pins the link; a
    /// link an earlier run pinned there gets this run's program in one atomic
    /// step instead, so capture never lapses across a restart.
    fn attach_tc(
        &mut self,
        prog: &str,
        attach: TcAttachType,
        ifindex: u32,
        ifname: &str,
    ) -> Result<pins::Held, CaptureError> {
        let name = pin_name(attach, ifindex);
        let program = program(&mut self.ebpf, prog)?;
        if let Some(old) = self.pins.adopt(&name) {
            let adopted = SchedClassifierLink::try_from(old)
                .map_err(CaptureError::from)
                .and_then(|link| Ok(program.attach_to_link(link)?))
                .and_then(|id| Ok(FdLink::try_from(program.take_link(id)?)?));
            match adopted {
                Ok(fd) => {
                    tracing::info!(%ifname, pin = %name, "adopted pinned capture");
                    return Ok(self.pins.held(&name, fd));
                }
                // Its interface was replaced, or the link is not TCX: attach
                // anew, ahead of it, and the new pin replaces the old.
                Err(e) => tracing::debug!(%ifname, error = %e, "pinned link not adopted"),
            }
        }
        let id = program.attach_with_options(ifname, attach, TcAttachOptions::TcxOrder(LinkOrder::first()))?;
        let fd = FdLink::try_from(program.take_link(id)?)?;
        self.pins.hold(&name, fd).map_err(CaptureError::Pin)
    }

    /// Removes pins that no held link accounts for: interfaces gone or no
    /// longer captured while no agent ran.
    fn sweep_pins(&self) {
        let held: std::collections::HashSet<String> = self
            .links
            .keys()
            .map(|i| pin_name(TcAttachType::Ingress, *i))
            .chain(self.gates.keys().map(|i| pin_name(TcAttachType::Egress, *i)))
            .chain(host::PINS.iter().filter(|_| self.host.is_some()).map(|n| (*n).to_owned()))
            .collect();
        for name in self.pins.names() {
            if !held.contains(&name) {
                tracing::info!(pin = %name, "stale pinned capture removed");
                self.pins.remove(&name);
            }
        }
    }

    fn detach_gate(&mut self, ifindex: u32) {
        if let Some(held) = self.gates.remove(&ifindex) {
            held.release();
        }
        let _ = self.v6_refused.remove(&ifindex);
        self.v6_logged.remove(&ifindex);
    }

    /// Logs, once per pod, that IPv6 to or from it was refused.
    fn log_refused_v6(&mut self) {
        let seen: Vec<u32> = self.v6_refused.keys().filter_map(Result::ok).collect();
        for ifindex in seen {
            if let Some(a) = self.attached.get(&ifindex)
                && self.v6_logged.insert(ifindex)
            {
                tracing::warn!(pod = %a.pod, ifname = %a.ifname, "IPv6 to or from a meshed pod refused (all but UDP and ICMPv6): the mesh carries IPv4 only");
            }
        }
    }

    fn sync_meshed_ips(&mut self, state: &State, node: &str) -> Result<(), CaptureError> {
        let want = state.local_workloads(node).filter(|w| w.meshed).filter_map(|w| w.ip);
        self.meshed_ips.sync(want.map(|ip| u32::from_ne_bytes(ip.octets())).collect())?;
        let dns = state.local_workloads(node).filter(|w| self.dns_capture && w.meshed && w.dns_capture);
        self.dns_pods.sync(dns.filter_map(|w| w.ip).map(|ip| u32::from_ne_bytes(ip.octets())).collect())
    }

    fn detach(&mut self, ifindex: u32) {
        self.detach_gate(ifindex);
        let Some(a) = self.attached.remove(&ifindex) else { return };
        if let Some(held) = self.links.remove(&ifindex) {
            held.release();
        }
        let _ = self.ifaces.remove(&ifindex);
        tracing::info!(ifname = %a.ifname, pod = %a.pod, "capture released");
    }

    /// The pod IPs behind a last-hop gate.
    pub fn gated(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.gates.keys().filter_map(|i| self.attached.get(i)).map(|a| a.pod_ip)
    }

    /// Interfaces currently captured, by ifindex.
    pub fn attached(&self) -> &BTreeMap<u32, Attached> {
        &self.attached
    }

    /// Per-program packet counters summed over CPUs, in `counter::NAMES` order.
    pub fn counters(&self) -> [u64; counter::LEN as usize] {
        let mut out = [0; counter::LEN as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }

    /// Stops this process's part. With `uninstall`, the mesh leaves the node:
    /// every program detached and unpinned, the routing rule, the notrack rule
    /// and the node settings undone. Without it (SIGTERM: an upgrade or a
    /// restart), pinned capture stays and fails closed until the next agent
    /// adopts it.
    pub async fn shutdown(mut self, uninstall: bool) -> Result<(), CaptureError> {
        if !uninstall {
            tracing::info!(
                "capture left in place (fail closed until an agent returns; `mesh-agent uninstall` removes it)"
            );
            return Ok(());
        }
        let all: Vec<u32> = self.attached.keys().copied().collect();
        for ifindex in all {
            self.detach(ifindex);
        }
        if let Some(h) = self.host.take() {
            h.release();
        }
        self.pins.remove_all();
        netlink::remove_proxy_routing(&self.handle, self.lo).await?;
        self.node.restore();
        drop(self.ebpf);
        tracing::info!("capture detached, routing rule removed");
        Ok(())
    }

    /// `mesh-agent uninstall`: removes what a stopped agent left in this
    /// network namespace and in `bpffs`. Returns how many pins were removed.
    pub async fn uninstall(bpffs: &std::path::Path) -> Result<usize, CaptureError> {
        let removed = pins::Pins::existing(bpffs).remove_all();
        let handle = netlink::connect()?;
        netlink::remove_proxy_routing(&handle, loopback_index()?).await?;
        node::NodeSettings::remove();
        Ok(removed)
    }
}

/// Maps pinned beside the links and reused by the next agent.
const SHARED_MAPS: [&str; 2] = ["ORIG_BY_COOKIE", "HOST_ORIG"];

fn pin_name(attach: TcAttachType, ifindex: u32) -> String {
    match attach {
        TcAttachType::Egress => format!("tc-egress-{ifindex}"),
        _ => format!("tc-ingress-{ifindex}"),
    }
}

fn missing_map(name: &'static str) -> CaptureError {
    map_err(name)(aya::maps::MapError::InvalidName { name: name.into() })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, CaptureError> {
    ebpf.take_map(name).ok_or_else(|| missing_map(name))
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier, CaptureError> {
    let prog = ebpf.program_mut(name).ok_or(aya::programs::ProgramError::UnexpectedProgramType)?;
    Ok(prog.try_into()?)
}

fn loopback_index() -> Result<u32, std::io::Error> {
    // SAFETY: a NUL-terminated constant string.
    let index = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if index == 0 { Err(std::io::Error::last_os_error()) } else { Ok(index) }
}
