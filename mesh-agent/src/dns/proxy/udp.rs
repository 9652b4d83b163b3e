//! DNS over UDP: the socket the classifier assigns pods' queries to (on the
//! outbound listener's address, port 15053, transparent, told each query's
//! original destination), answers sent back from that destination (the
//! pod's nameserver, port 53), and queries forwarded to the node's resolvers.
use std::{
    collections::HashMap,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
    sync::Arc,
};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg};
use tokio::{io::Interest, sync::Semaphore};

use super::DnsProxy;

/// Queries answered at once; more wait in the socket's buffer.
const IN_FLIGHT: usize = 1024;
/// Answering sockets kept, one per nameserver address pods use.
const MAX_SOURCES: usize = 64;

/// The socket pods' queries are assigned to: transparent (it takes
/// datagrams addressed elsewhere), with their original destination, in a
/// port group a replacement agent can join during a handover.
pub fn bind() -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_ip_transparent_v4(true)?;
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv4OrigDstAddr, &true)?;
    s.set_mark(crate::marks::get().agent)?;
    s.set_nonblocking(true)?;
    let addr = SocketAddrV4::new(Ipv4Addr::from(mesh_common::OUTBOUND_ADDR), mesh_common::DNS_PORT);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Answers the queries on `socket` for as long as the agent runs.
pub async fn serve(proxy: Arc<DnsProxy>, socket: UdpSocket) -> io::Result<()> {
    let socket = tokio::net::UdpSocket::from_std(socket)?;
    let limit = Arc::new(Semaphore::new(IN_FLIGHT));
    let replies = Arc::new(Replies::default());
    let mut buf = vec![0u8; 4096];
    loop {
        let fd = socket.as_raw_fd();
        let (n, client, orig) = match socket.async_io(Interest::READABLE, || receive(fd, &mut buf)).await {
            Ok(Some(got)) => got,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "DNS proxy receive");
                continue;
            }
        };
        let Ok(permit) = limit.clone().acquire_owned().await else { return Ok(()) };
        let (proxy, replies, query) = (proxy.clone(), replies.clone(), buf[..n].to_vec());
        tokio::spawn(async move {
            if let Some(answer) = proxy.answer(*client.ip(), &query, false).await
                && let Err(e) = replies.send(orig, client, &answer)
            {
                tracing::debug!(%client, %orig, error = %e, "DNS proxy reply");
            }
            drop(permit);
        });
    }
}

/// One datagram: its length, sender and original destination.
fn receive(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddrV4, SocketAddrV4)>> {
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(libc::sockaddr_in);
    let msg = recvmsg::<SockaddrIn>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())?;
    let Some(from) = msg.address.map(|a| SocketAddrV4::new(a.ip(), a.port())) else { return Ok(None) };
    let orig = msg.cmsgs()?.find_map(|c| match c {
        ControlMessageOwned::Ipv4OrigDstAddr(a) => {
            Some(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)), u16::from_be(a.sin_port)))
        }
        _ => None,
    });
    Ok(orig.map(|orig| (msg.bytes, from, orig)))
}

/// Sockets bound to the nameserver addresses pods asked (transparent), to
/// answer from the address and port the query went to.
#[derive(Default)]
struct Replies {
    by_source: std::sync::Mutex<HashMap<SocketAddrV4, Arc<UdpSocket>>>,
}

impl Replies {
    fn send(&self, from: SocketAddrV4, to: SocketAddrV4, answer: &[u8]) -> io::Result<()> {
        let socket = {
            let mut by = self.by_source.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match by.get(&from) {
                Some(s) => s.clone(),
                None => {
                    if by.len() >= MAX_SOURCES {
                        by.clear();
                    }
                    let s = Arc::new(bound_to(from)?);
                    by.insert(from, s.clone());
                    s
                }
            }
        };
        socket.send_to(answer, to).map(|_| ())
    }
}

fn bound_to(addr: SocketAddrV4) -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_ip_transparent_v4(true)?;
    s.set_mark(crate::marks::get().agent)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Asks `upstream` over UDP; its answer to `id`.
pub async fn ask(upstream: SocketAddr, query: &[u8], id: u16) -> io::Result<Vec<u8>> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    s.set_mark(crate::marks::get().agent)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into())?;
    let socket = tokio::net::UdpSocket::from_std(s.into())?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Another ID is a stray (or spoofed) answer: keep waiting.
        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}
