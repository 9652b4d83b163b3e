//! The agent's listening sockets: taken over from an agent already running
//! on the node (an upgrade: each keeps its accept queue, no SYN is refused;
//! see [`super::handover`]) or bound anew, and offered to the next one.
use std::{
    net::{Ipv4Addr, SocketAddr},
    os::fd::OwnedFd,
    path::PathBuf,
};

use tokio::net::TcpListener;

use super::{RunConfig, RunError, admin, handover};

/// The handover's two ends for this agent: the sockets it took from the
/// agent it replaces (told `ready` once this one accepts), and where it
/// offers its own to the next.
pub(super) struct Handover {
    pub path: PathBuf,
    pub inherited: Option<handover::Inherited>,
}

/// Every listener the agent serves on, and the handover they came by.
pub(super) struct Acquired {
    pub outbound: TcpListener,
    pub inbound: TcpListener,
    pub hbone: TcpListener,
    pub admin: Vec<(admin::Surface, TcpListener)>,
    pub handover: Handover,
}

/// The capture listeners (15001, 15006), HBONE (15008) and the admin
/// surfaces: the running agent's, where one hands them over, else new.
pub(super) async fn acquire(cfg: &RunConfig) -> Result<Acquired, RunError> {
    let path = handover::path(&cfg.identity.state_dir);
    let mut inherited = take_over(path.clone()).await;
    let mut listen = |name: &str,
                      what: &'static str,
                      addr: SocketAddr,
                      bind: &dyn Fn() -> std::io::Result<std::net::TcpListener>| {
        let listener = match inherited.as_mut().and_then(|i| i.take(name, addr)) {
            Some(l) => Ok(l),
            None => bind(),
        };
        listener.and_then(TcpListener::from_std).map_err(|source| RunError::Bind {
            what,
            addr: addr.to_string(),
            source,
        })
    };
    let capture_addr = |port| SocketAddr::from((Ipv4Addr::from(mesh_common::OUTBOUND_ADDR), port));
    let (out_port, in_port) = (mesh_common::OUTBOUND_PORT, mesh_common::INBOUND_PORT);
    let outbound =
        listen("outbound", "the outbound listener", capture_addr(out_port), &|| crate::proxy::bind_capture(out_port))?;
    let inbound = listen("inbound", "the inbound plaintext listener", capture_addr(in_port), &|| {
        crate::proxy::bind_capture(in_port)
    })?;
    let hbone_addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, mesh_common::HBONE_PORT));
    let hbone = listen("hbone", "the HBONE listener", hbone_addr, &|| bind_tcp(hbone_addr))?;
    let mut admin = Vec::new();
    let surfaces = [
        (admin::Surface::Admin, "the admin server", Some(cfg.admin_addr)),
        (admin::Surface::Stats, "the stats port", cfg.stats_addr),
        (admin::Surface::Readiness, "the readiness port", cfg.readiness_addr),
    ];
    for (surface, what, addr) in surfaces {
        let Some(addr) = addr else { continue };
        admin.push((surface, listen(surface.name(), what, addr, &|| bind_tcp(addr))?));
    }
    Ok(Acquired { outbound, inbound, hbone, admin, handover: Handover { path, inherited } })
}

/// The running agent's sockets, if one answers at `path`.
async fn take_over(path: PathBuf) -> Option<handover::Inherited> {
    let at = path.clone();
    match tokio::task::spawn_blocking(move || handover::take_over(&at)).await {
        Ok(Ok(Some(i))) => {
            tracing::info!(sockets = ?i.names(), "taking over from the agent running on this node");
            Some(i)
        }
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, path = %path.display(), "handover from the running agent failed; binding anew");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "handover task failed; binding anew");
            None
        }
    }
}

/// Binds a listening socket as the admin surfaces and HBONE do (Tokio's
/// settings: `SO_REUSEADDR`, a backlog of 1024).
fn bind_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Duplicates of the listeners' descriptors, offered to the next agent.
pub(super) fn offered(
    outbound: &TcpListener,
    inbound: &TcpListener,
    hbone: &TcpListener,
    admin: &[(admin::Surface, TcpListener)],
) -> std::io::Result<Vec<(String, OwnedFd)>> {
    let mut out = vec![
        handover::offered("outbound", outbound)?,
        handover::offered("inbound", inbound)?,
        handover::offered("hbone", hbone)?,
    ];
    for (surface, listener) in admin {
        out.push(handover::offered(surface.name(), listener)?);
    }
    Ok(out)
}
