//! Handing the listening sockets from a running agent to its replacement, so
//! that an upgrade refuses no connection (ztunnel cannot: istio/istio#51126).
//!
//! The running agent offers its listeners on a unix socket in the node's
//! state directory (`<state dir>/handover-<netns inode>.sock`). A starting agent that finds
//! one answering asks for them: it receives the same sockets (`SCM_RIGHTS`,
//! duplicates of the old agent's descriptors, so each keeps its accept
//! queue), starts accepting on them, and says `ready`. Only then does the old
//! agent stop accepting; it keeps serving what it has open and exits when
//! its connections end or the drain timeout passes. At every moment one of
//! the two accepts on each socket: no SYN meets a closed listener.
//!
//! The exchange, on one unix stream connection:
//!
//! 1. old → new: a JSON [`Manifest`] naming the sockets, with their
//!    descriptors attached in that order;
//! 2. new → old: `ready\n` once it accepts on them (or nothing, if it failed:
//!    the old agent then goes on as if no one had asked).
use std::{
    io::{self, BufRead as _, IoSlice, IoSliceMut, Write as _},
    net::SocketAddr,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

/// The most sockets one handover carries (the data path's three, the
/// admin surfaces, gateway ports).
const MAX_SOCKETS: usize = 64;

/// What the old agent sends before the descriptors.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    /// The sockets' names (`outbound`, `hbone`, `admin`, …), in the order
    /// of the descriptors.
    sockets: Vec<String>,
    /// A second frame follows with the workload certificates held (an
    /// agent that predates it neither sends nor reads it).
    #[serde(default)]
    certs: bool,
}

/// The most a certificate frame may hold (a node's identities' chains and keys).
const MAX_CERTS_FRAME: usize = 16 << 20;

/// The handover socket's path in a state directory, for this network
/// namespace: a unix socket's path crosses namespaces, and an agent of
/// another (a second node in one machine's test, sharing a directory) must
/// neither find nor replace this node's offer.
pub fn path(state_dir: &Path) -> PathBuf {
    use std::os::unix::fs::MetadataExt as _;
    let netns = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).unwrap_or_default();
    state_dir.join(format!("handover-{netns}.sock"))
}

/// Sockets received from a running agent, taken one by one by name; what is
/// not taken is closed on drop (the old agent still holds its copy).
pub struct Inherited {
    sockets: Vec<(String, OwnedFd)>,
    peer: UnixStream,
    /// The old agent's certificates (see [`Offer::with_certs`]), as it sent them.
    certs: Vec<u8>,
}

impl std::fmt::Debug for Inherited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inherited").field("sockets", &self.names()).finish()
    }
}

/// Asks the agent running on this node (if any) for its sockets. `Ok(None)`:
/// no agent answers at `path` (none runs, or one that died left the file).
pub fn take_over(path: &Path) -> io::Result<Option<Inherited>> {
    let peer = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(e),
    };
    same_user(&peer)?;
    peer.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (manifest, fds, leftover) = receive(&peer)?;
    if manifest.version != 1 || manifest.sockets.len() != fds.len() {
        return Err(io::Error::other(format!(
            "handover: manifest version {} names {} sockets, {} received",
            manifest.version,
            manifest.sockets.len(),
            fds.len()
        )));
    }
    let certs = if manifest.certs { read_frame(&peer, leftover)? } else { Vec::new() };
    Ok(Some(Inherited { sockets: manifest.sockets.into_iter().zip(fds).collect(), peer, certs }))
}

/// One certificate in the certificate frame: its chain (DER, leaf first) and
/// its key (PKCS#8), base64 in JSON.
#[derive(Debug, Serialize, Deserialize)]
struct CertEntry {
    chain: Vec<String>,
    key: String,
}

/// The certificate frame for `certs` (chain, key) pairs.
pub fn encode_certs(certs: Vec<(Vec<Vec<u8>>, Vec<u8>)>) -> Vec<u8> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let entries: Vec<CertEntry> = certs
        .into_iter()
        .map(|(chain, key)| CertEntry { chain: chain.iter().map(|c| b64.encode(c)).collect(), key: b64.encode(key) })
        .collect();
    serde_json::to_vec(&entries).unwrap_or_default()
}

/// The (chain, key) pairs of a certificate frame; what does not decode is left out.
pub fn decode_certs(frame: &[u8]) -> Vec<(Vec<Vec<u8>>, Vec<u8>)> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let entries: Vec<CertEntry> = serde_json::from_slice(frame).unwrap_or_default();
    entries
        .into_iter()
        .filter_map(|e| {
            let chain = e.chain.iter().map(|c| b64.decode(c).ok()).collect::<Option<Vec<_>>>()?;
            Some((chain, b64.decode(&e.key).ok()?))
        })
        .collect()
}

/// A length-prefixed frame (`u32` big-endian, then the bytes), some of which
/// may have been read already.
fn read_frame(mut stream: &UnixStream, mut have: Vec<u8>) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut chunk = [0u8; 64 * 1024];
    let mut want = None;
    loop {
        if want.is_none() && have.len() >= 4 {
            let len = u32::from_be_bytes([have[0], have[1], have[2], have[3]]) as usize;
            if len > MAX_CERTS_FRAME {
                return Err(io::Error::other(format!("handover: a {len}-byte certificate frame")));
            }
            have.drain(..4);
            want = Some(len);
        }
        if let Some(len) = want
            && have.len() >= len
        {
            have.truncate(len);
            return Ok(have);
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::other("handover: the certificate frame was cut short"));
        }
        have.extend_from_slice(&chunk[..n]);
    }
}

impl Inherited {
    /// The names received.
    pub fn names(&self) -> Vec<&str> {
        self.sockets.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The listening socket named `name`, if it was received and is bound to
    /// `want` (an agent whose address changed binds a new one instead).
    pub fn take(&mut self, name: &str, want: SocketAddr) -> Option<std::net::TcpListener> {
        let at = self.sockets.iter().position(|(n, fd)| n == name && local_addr(fd).is_some_and(|a| a == want))?;
        let (_, fd) = self.sockets.remove(at);
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true).ok()?;
        Some(listener)
    }

    /// The old agent's certificates, as [`Offer::with_certs`] made them
    /// (empty if it sent none); taken once.
    pub fn take_certs(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.certs)
    }

    /// Tells the old agent to stop accepting: this one accepts on every
    /// socket it took.
    pub fn ready(mut self) -> io::Result<()> {
        self.peer.write_all(b"ready\n")
    }
}

/// A duplicate of a listener's descriptor, to offer: the listener itself
/// goes on to its accept loop.
pub fn offered(name: &str, listener: &impl std::os::fd::AsFd) -> io::Result<(String, OwnedFd)> {
    Ok((name.to_owned(), listener.as_fd().try_clone_to_owned()?))
}

fn local_addr(fd: &OwnedFd) -> Option<SocketAddr> {
    socket2::SockRef::from(fd).local_addr().ok()?.as_socket()
}

/// The running agent's side: its listeners, offered to a replacement.
pub struct Offer {
    listener: tokio::net::UnixListener,
    sockets: Vec<(String, OwnedFd)>,
    /// Makes the certificate frame at the moment of a handover.
    certs: Option<Box<dyn Fn() -> Vec<u8> + Send + Sync>>,
    /// A replacement holds the sockets and has not said `ready` yet.
    taking: std::sync::atomic::AtomicBool,
}

impl Offer {
    /// Listens at `path` (replacing the file an earlier agent left: a
    /// replacement binds a new one there once it took over), offering
    /// `sockets` (duplicates of the listeners' descriptors, see [`offered`]).
    pub fn bind(path: &Path, sockets: Vec<(String, OwnedFd)>) -> io::Result<Offer> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = tokio::net::UnixListener::bind(path)?;
        // Whoever holds these sockets carries the node's traffic: the file
        // is the agent's user's alone, and each peer is checked again.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        Ok(Offer { listener, sockets, certs: None, taking: false.into() })
    }

    /// Sends what `certs` makes (the workload certificates and keys held
    /// at that moment) with the sockets, so that the replacement does not
    /// ask the CA for them again. The channel is the sockets' own: a file
    /// only this agent's user may open, a peer checked to be that user.
    pub fn with_certs(mut self, certs: impl Fn() -> Vec<u8> + Send + Sync + 'static) -> Offer {
        self.certs = Some(Box::new(certs));
        self
    }

    /// Whether a replacement holds the sockets and is getting ready: this
    /// agent must go on accepting until it is (or gives up).
    pub fn taking_over(&self) -> bool {
        self.taking.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits for a replacement, gives it the sockets and returns once it
    /// accepts on them. A replacement that fails midway is logged, and the
    /// next one is waited for.
    pub async fn handed_over(&self) {
        loop {
            let stream = match self.listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "handover: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let sockets: io::Result<Vec<(String, OwnedFd)>> =
                self.sockets.iter().map(|(n, fd)| Ok((n.clone(), fd.try_clone()?))).collect();
            let exchange = sockets.and_then(|sockets| {
                let stream = stream.into_std()?;
                same_user(&stream)?;
                stream.set_nonblocking(false)?;
                Ok((stream, sockets))
            });
            let (stream, sockets) = match exchange {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "handover: cannot offer the sockets");
                    continue;
                }
            };
            self.taking.store(true, std::sync::atomic::Ordering::Release);
            let certs = self.certs.as_ref().map(|make| make());
            let given = tokio::task::spawn_blocking(move || give(&stream, &sockets, certs.as_deref())).await;
            if !matches!(given, Ok(Ok(()))) {
                self.taking.store(false, std::sync::atomic::Ordering::Release);
            }
            match given {
                Ok(Ok(())) => return,
                Ok(Err(e)) => tracing::warn!(error = %e, "handover: the replacement did not take over; serving on"),
                Err(e) => tracing::warn!(error = %e, "handover: exchange task failed; serving on"),
            }
        }
    }
}

/// Refuses a peer that runs as another user than this agent: the sockets
/// would let it take the node's traffic, and a fake offer would let it
/// listen beside this agent.
fn same_user(peer: &UnixStream) -> io::Result<()> {
    let cred = nix::sys::socket::getsockopt(peer, nix::sys::socket::sockopt::PeerCredentials)?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("handover peer (pid {}) runs as uid {}, not {me}", cred.pid(), cred.uid()),
        ));
    }
    Ok(())
}

/// Sends the manifest and descriptors (and the certificate frame), then
/// waits for `ready`.
fn give(stream: &UnixStream, sockets: &[(String, OwnedFd)], certs: Option<&[u8]>) -> io::Result<()> {
    let names = sockets.iter().map(|(n, _)| n.clone()).collect();
    let manifest = Manifest { version: 1, sockets: names, certs: certs.is_some() };
    let body = serde_json::to_vec(&manifest).map_err(io::Error::other)?;
    let fds: Vec<RawFd> = sockets.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let len = u32::try_from(body.len()).map_err(io::Error::other)?.to_be_bytes();
    let iov = [IoSlice::new(&len), IoSlice::new(&body)];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let sent = sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)?;
    if sent != len.len() + body.len() {
        return Err(io::Error::other("handover: manifest sent in part"));
    }
    if let Some(certs) = certs {
        let len = u32::try_from(certs.len()).map_err(io::Error::other)?.to_be_bytes();
        let mut w = stream;
        w.write_all(&len)?;
        w.write_all(certs)?;
    }
    // No deadline: the replacement loads its configuration, capture and
    // certificates meanwhile, and its exit closes the stream.
    stream.set_read_timeout(None)?;
    let mut line = String::new();
    io::BufReader::new(stream).read_line(&mut line)?;
    match line.trim() {
        "ready" => Ok(()),
        "" => Err(io::Error::other("the replacement closed the handover before it was ready")),
        other => Err(io::Error::other(format!("unexpected handover answer {other:?}"))),
    }
}

/// Receives the manifest and the descriptors sent with it, and whatever
/// bytes came after the manifest in the same read.
fn receive(stream: &UnixStream) -> io::Result<(Manifest, Vec<OwnedFd>, Vec<u8>)> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut space = nix::cmsg_space!([RawFd; MAX_SOCKETS]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel installed these descriptors in this
                // process for this message; nothing else owns them.
                fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::other("handover: more sockets than this agent takes"));
        }
        (msg.bytes, fds)
    };
    let Some((len, rest)) = buf[..n].split_first_chunk::<4>() else {
        return Err(io::Error::other("handover: short manifest"));
    };
    let len = u32::from_be_bytes(*len) as usize;
    let body = rest.get(..len).ok_or_else(|| io::Error::other("handover: manifest cut short"))?;
    let manifest = serde_json::from_slice(body).map_err(|e| io::Error::other(format!("handover manifest: {e}")))?;
    Ok((manifest, fds, rest[len..].to_vec()))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
    };

    use super::{Offer, offered, path, take_over};

    /// Two "agents" in one process: the old one's listener keeps its queue
    /// across the handover, and a connection made before it is accepted by
    /// the new one.
    #[tokio::test]
    async fn a_replacement_takes_the_same_listening_socket_and_the_old_one_learns_when() {
        let dir = std::env::temp_dir().join(format!("handover-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let at = path(&dir);
        assert!(take_over(&at).unwrap().is_none(), "no agent runs yet");

        let old = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = old.local_addr().unwrap();
        let frame = super::encode_certs(vec![(vec![b"leaf".to_vec(), b"intermediate".to_vec()], b"key".to_vec())]);
        let sent = frame.clone();
        let offer =
            Offer::bind(&at, vec![offered("outbound", &old).unwrap()]).unwrap().with_certs(move || sent.clone());
        let offer = std::sync::Arc::new(offer);
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&at).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "only the agent's user may ask for the sockets");
        assert!(!offer.taking_over());

        // A replacement that takes the sockets and dies before it is ready:
        // the old agent learns it (a SIGTERM then drains at once) and waits
        // for the next one.
        let at1 = at.clone();
        let quitter = std::thread::spawn(move || take_over(&at1).unwrap().unwrap());
        let waiting = offer.clone();
        let handed = tokio::spawn(async move { waiting.handed_over().await });
        let quitter = tokio::task::spawn_blocking(move || quitter.join().unwrap()).await.unwrap();
        assert!(offer.taking_over(), "a SIGTERM now must not stop accepting");
        drop(quitter);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while offer.taking_over() {
            assert!(std::time::Instant::now() < deadline, "the old agent did not notice the replacement quit");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!handed.is_finished());

        // A client connects while the handover is under way: it waits in the queue.
        let mut early = TcpStream::connect(addr).unwrap();
        let at2 = at.clone();
        let mut inherited = tokio::task::spawn_blocking(move || take_over(&at2)).await.unwrap().unwrap().unwrap();
        assert_eq!(inherited.names(), ["outbound"]);
        // The certificates came with the sockets, whole.
        let certs = inherited.take_certs();
        assert_eq!(certs, frame);
        let decoded = super::decode_certs(&certs);
        assert_eq!(decoded, [(vec![b"leaf".to_vec(), b"intermediate".to_vec()], b"key".to_vec())]);
        let wrong = "127.0.0.1:1".parse().unwrap();
        assert!(inherited.take("outbound", wrong).is_none(), "a socket bound elsewhere is not taken");
        let new = inherited.take("outbound", addr).expect("the same socket");
        assert!(!handed.is_finished(), "the old agent keeps accepting until the new one is ready");
        inherited.ready().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), handed).await.unwrap().unwrap();
        drop(old);

        new.set_nonblocking(false).unwrap();
        let (mut conn, _) = new.accept().unwrap();
        early.write_all(b"hi").unwrap();
        early.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = String::new();
        conn.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hi");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
