//! Live connections this agent authorized, so that a policy change reaches
//! them (as ztunnel's connection manager does): after each configuration
//! reload every one is judged again, and one that PeerAuthentication or
//! AuthorizationPolicy would now refuse is closed and counted
//! (`reason="denied_after_policy_change"`).
//!
//! A connection is registered where it was authorized — a direct connection
//! to a local meshed pod (same node, L4 or L7), a plaintext one through the
//! inbound listener, an HBONE stream — with a duplicate of its upstream
//! socket (and of its client's, where that is a TCP socket too). Closing
//! aborts those sockets (linger 0, shut down both ways), which ends whatever
//! drives them — a copy loop, a pooled HTTP connection, an upgraded tunnel —
//! with nothing on the data path listening for it (a `select!` there cost a
//! measured 12 µs per round trip). The [`Guard`] unregisters the connection
//! when it ends.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, Shutdown},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::{
    routing::policy::{Dest, Peer, Verdict, authorize, peer_mode},
    state::State,
    state::security::MtlsMode,
};

/// What a connection was authorized as: the inputs of the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized {
    /// The local meshed pod, and the port, connected to.
    pub dest_ip: Ipv4Addr,
    pub port: u16,
    /// The client's identity (mTLS, or capture on this node); `None` for plaintext.
    pub principal: Option<Arc<str>>,
    /// The client's address, as policy's `ipBlocks` saw it.
    pub peer_ip: Ipv4Addr,
    /// Plaintext from outside the mesh (the inbound listener): STRICT refuses it.
    pub plaintext: bool,
    /// The hostname of the Service the client's agent said it addressed
    /// (else the pod's Service for the port is found again in each snapshot).
    pub service: Option<Arc<str>>,
    /// For a tunnel upgraded from an HTTP request that the destination's
    /// request policy judged: that request, judged again on each reload.
    pub request: Option<Arc<RequestSnapshot>>,
}

/// What request policy saw of the request that opened an upgraded tunnel.
#[derive(Debug)]
pub struct RequestSnapshot {
    pub method: String,
    pub path: String,
    pub host: String,
    pub headers: http::HeaderMap,
    pub verified: Option<Arc<crate::identity::jwt::Verified>>,
}

impl PartialEq for RequestSnapshot {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for RequestSnapshot {}

impl Authorized {
    /// Whether `state` still admits this connection. A destination that is no
    /// longer a meshed pod is not policy's to judge (it is gone, or leaves
    /// the mesh), so it stays.
    pub fn still_allowed(&self, state: &State) -> bool {
        let Some(dest) = state.workload_by_ip(self.dest_ip).filter(|w| w.meshed) else { return true };
        if self.plaintext && peer_mode(state, dest, self.port) == MtlsMode::Strict {
            return false;
        }
        let peer = Peer { principal: self.principal.as_deref(), ip: self.peer_ip };
        let told = self.service.as_deref().and_then(|h| state.service_of_endpoint(dest, h, self.port));
        let service = told.or_else(|| state.service_port_of(dest, self.port).map(|(s, _)| s));
        let dest = Dest { pod: dest, service: service.map(|s| &**s) };
        let Some(r) = &self.request else {
            return authorize(state, dest, &peer, self.port) == Verdict::Allow;
        };
        // The upgrade request as policy saw it, under the new policy (DENY
        // and ALLOW; an external authorizer is not asked again).
        let auth = r.verified.as_deref().map(|v| crate::routing::policy::Auth {
            principal: &v.principal,
            audiences: &v.audiences,
            presenter: v.presenter.as_deref(),
            claims: &v.claims,
        });
        let request = crate::routing::policy::Request {
            method: &r.method,
            path: &r.path,
            host: &r.host,
            headers: &r.headers,
            auth,
            remote_ip: self.peer_ip,
        };
        let attributes = crate::routing::policy::Attributes { peer, port: self.port, request: Some(request) };
        crate::routing::policy::evaluate(state, dest, &attributes).verdict == Verdict::Allow
    }
}

struct Entry {
    authorized: Authorized,
    since: std::time::Instant,
    /// Duplicates of the upstream's (and the client's) descriptors: shutting
    /// them down reaches the connection whoever owns the originals.
    upstream: socket2::Socket,
    client: Option<socket2::Socket>,
}

impl Entry {
    fn abort(&self) {
        for s in std::iter::once(&self.upstream).chain(&self.client) {
            let _ = s.set_linger(Some(std::time::Duration::ZERO));
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// One live connection, as the admin API (`/connections`) shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnInfo {
    pub source: String,
    pub source_principal: Option<String>,
    pub destination: String,
    pub destination_workload: Option<String>,
    /// `mtls` (HBONE, or a meshed pod on this node) or `plaintext`.
    pub security: &'static str,
    /// `tcp`, or `websocket` for a tunnel upgraded from a judged request.
    pub protocol: &'static str,
    /// Bytes sent to the destination and acknowledged by it.
    pub bytes_sent: u64,
    /// Bytes received from the destination.
    pub bytes_received: u64,
    pub age_seconds: u64,
}

/// The kernel's `struct tcp_info` up to `tcpi_bytes_received` (Linux ≥ 4.1;
/// the layout only ever grows at the end).
#[repr(C)]
#[derive(Default)]
struct TcpInfo {
    _u8s: [u8; 8],
    _u32s: [u32; 24],
    _pacing_rate: u64,
    _max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
}

/// (bytes acknowledged by the peer, bytes received) of a TCP socket.
fn tcp_bytes(s: &socket2::Socket) -> Option<(u64, u64)> {
    let mut info = TcpInfo::default();
    let mut len = std::mem::size_of::<TcpInfo>() as libc::socklen_t;
    // SAFETY: a valid descriptor and an out-buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut TcpInfo).cast(),
            &mut len,
        )
    };
    (rc == 0 && len as usize >= std::mem::size_of::<TcpInfo>()).then_some((info.bytes_acked, info.bytes_received))
}

/// The registry.
#[derive(Default)]
pub struct Conns {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Entry>>,
}

/// A registered connection; dropping it unregisters the connection.
pub struct Guard {
    conns: Arc<Conns>,
    id: u64,
}

impl Conns {
    /// Registers a connection authorized as `authorized`, whose upstream is
    /// `upstream`. `None` if its socket cannot be duplicated (out of
    /// descriptors): the connection then fails rather than escape revocation.
    pub fn register(
        self: &Arc<Self>,
        authorized: Authorized,
        upstream: &tokio::net::TcpStream,
    ) -> std::io::Result<Guard> {
        let upstream = socket2::SockRef::from(upstream).try_clone()?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut live) = self.live.lock() {
            live.insert(id, Entry { authorized, since: std::time::Instant::now(), upstream, client: None });
        }
        Ok(Guard { conns: self.clone(), id })
    }

    /// [`Conns::register`] with the upstream's descriptor already duplicated.
    pub fn register_socket(self: &Arc<Self>, authorized: Authorized, upstream: socket2::Socket) -> Guard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut live) = self.live.lock() {
            live.insert(id, Entry { authorized, since: std::time::Instant::now(), upstream, client: None });
        }
        Guard { conns: self.clone(), id }
    }

    /// Judges every live connection against `state`; closes those it refuses.
    /// Returns how many were closed.
    pub fn revalidate(&self, state: &State) -> usize {
        let Ok(mut live) = self.live.lock() else { return 0 };
        let refused: Vec<u64> =
            live.iter().filter(|(_, e)| !e.authorized.still_allowed(state)).map(|(id, _)| *id).collect();
        for id in &refused {
            if let Some(e) = live.remove(id) {
                tracing::info!(dest = %e.authorized.dest_ip, port = e.authorized.port, client = %e.authorized.peer_ip,
                    principal = e.authorized.principal.as_deref().unwrap_or("-"), "connection closed: denied after policy change");
                e.abort();
            }
        }
        refused.len()
    }

    /// Ends every live connection with a FIN each way (the drain deadline):
    /// both peers read the end of the stream, not a reset, and the copies
    /// between them finish. Returns how many.
    pub fn close_all(&self) -> usize {
        let Ok(mut live) = self.live.lock() else { return 0 };
        let n = live.len();
        for (_, e) in live.drain() {
            for s in std::iter::once(&e.upstream).chain(&e.client) {
                let _ = s.shutdown(Shutdown::Write);
            }
        }
        n
    }

    /// The live connections, oldest first, for the admin API: who, to
    /// where, how, and the bytes the kernel counted on the upstream socket.
    pub fn dump(&self, state: &State) -> Vec<ConnInfo> {
        let Ok(live) = self.live.lock() else { return Vec::new() };
        let mut out: Vec<(u64, ConnInfo)> = live
            .iter()
            .map(|(id, e)| {
                let a = &e.authorized;
                let (sent, received) = tcp_bytes(&e.upstream).unwrap_or_default();
                let dest = state.workload_by_ip(a.dest_ip);
                (
                    *id,
                    ConnInfo {
                        source: a.peer_ip.to_string(),
                        source_principal: a.principal.as_deref().map(str::to_owned),
                        destination: format!("{}:{}", a.dest_ip, a.port),
                        destination_workload: dest.map(|w| format!("{}/{}", w.namespace, w.name)),
                        security: if a.plaintext { "plaintext" } else { "mtls" },
                        protocol: if a.request.is_some() { "websocket" } else { "tcp" },
                        bytes_sent: sent,
                        bytes_received: received,
                        age_seconds: e.since.elapsed().as_secs(),
                    },
                )
            })
            .collect();
        out.sort_by_key(|(id, _)| *id);
        out.into_iter().map(|(_, c)| c).collect()
    }

    /// Connections registered now.
    pub fn len(&self) -> usize {
        self.live.lock().map(|l| l.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Guard {
    /// Closes `client` too when policy closes the connection (its client is
    /// a TCP socket: reset rather than left half-open).
    pub fn and_client(self, client: &tokio::net::TcpStream) -> std::io::Result<Self> {
        let dup = socket2::SockRef::from(client).try_clone()?;
        if let Ok(mut live) = self.conns.live.lock()
            && let Some(e) = live.get_mut(&self.id)
        {
            e.client = Some(dup);
        }
        Ok(self)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(mut live) = self.conns.live.lock() {
            live.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::state_from_yaml;

    const POD: &str = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: hello, namespace: demo, labels: {app: hello}}\n\
        spec: {nodeName: n1, serviceAccountName: hello}\nstatus: {podIP: 10.244.0.2}\n";
    const MESHED: &str =
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n";
    const UNMESHED: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n";

    fn conn(principal: Option<&str>, peer: [u8; 4], plaintext: bool) -> Authorized {
        Authorized {
            dest_ip: Ipv4Addr::new(10, 244, 0, 2),
            port: 9095,
            principal: principal.map(Arc::from),
            peer_ip: Ipv4Addr::from(peer),
            plaintext,
            service: None,
            request: None,
        }
    }

    #[test]
    fn a_reload_judges_open_connections_as_new_ones() {
        let test = Some("spiffe://cluster.local/ns/demo/sa/test");
        let other = Some("spiffe://cluster.local/ns/demo/sa/other");
        let strict = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
            metadata: {name: default, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n";
        let deny_test = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
            metadata: {name: no-test, namespace: demo}\n\
            spec: {action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/test]}}]}]}\n";
        let allow_block = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
            metadata: {name: lan, namespace: demo}\nspec: {rules: [{from: [{source: {ipBlocks: [192.168.0.0/16]}}]}]}\n";
        #[rustfmt::skip]
        let table: &[(&str, &str, &str, Authorized, bool)] = &[
            ("no policy",               MESHED,   "",          conn(test, [10, 244, 0, 9], false),  true),
            ("STRICT, mesh client",     MESHED,   strict,      conn(test, [10, 244, 0, 9], false),  true),
            ("STRICT, plaintext",       MESHED,   strict,      conn(None, [192, 168, 1, 2], true),  false),
            ("DENY names the client",   MESHED,   deny_test,   conn(test, [10, 244, 0, 9], false),  false),
            ("DENY names another",      MESHED,   deny_test,   conn(other, [10, 244, 0, 9], false), true),
            ("ALLOW by block, inside",  MESHED,   allow_block, conn(None, [192, 168, 1, 2], true),  true),
            ("ALLOW by block, outside", MESHED,   allow_block, conn(test, [10, 244, 0, 9], false),  false),
            ("pod left the mesh",       UNMESHED, strict,      conn(None, [192, 168, 1, 2], true),  true),
        ];
        for (what, ns, extra, c, want) in table {
            let state = state_from_yaml(&format!("{ns}{POD}{extra}"));
            assert_eq!(c.still_allowed(&state), *want, "{what}");
        }
    }
}
