//! DNS over TCP (RFC 7766): each message behind its two-byte length. A
//! pod's connection to port 53 is handed here by the outbound listener;
//! queries to the node's resolvers whose UDP answer was truncated go so too.
use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::DnsProxy;

/// A client connection with no query for this long is closed.
const IDLE: Duration = Duration::from_secs(10);
/// Queries answered on one connection at most.
const MAX_QUERIES: usize = 1000;

/// Answers the queries of one client connection, in order, until it closes,
/// idles, or sends what is not a DNS message.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    proxy: &DnsProxy,
    mut conn: S,
    client: Ipv4Addr,
) -> io::Result<()> {
    for _ in 0..MAX_QUERIES {
        let Ok(read) = tokio::time::timeout(IDLE, read_message(&mut conn)).await else { break };
        let Some(query) = read? else { break };
        let Some(answer) = proxy.answer(client, &query, true).await else { break };
        write_message(&mut conn, &answer).await?;
    }
    conn.shutdown().await
}

/// Asks `upstream` over TCP; its answer to `id`.
pub async fn ask(upstream: SocketAddr, query: &[u8], id: u16) -> io::Result<Vec<u8>> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    // Marked as the agent's: a node-side capture leaves it alone.
    s.set_mark(crate::marks::get().agent)?;
    s.set_nonblocking(true)?;
    let mut conn = tokio::net::TcpSocket::from_std_stream(s.into()).connect(upstream).await?;
    write_message(&mut conn, query).await?;
    match read_message(&mut conn).await? {
        Some(reply) if reply.len() >= 2 && u16::from_be_bytes([reply[0], reply[1]]) == id => Ok(reply),
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "no answer to the query")),
    }
}

async fn read_message<S: AsyncRead + Unpin>(conn: &mut S) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match conn.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    conn.read_exact(&mut message).await?;
    Ok(Some(message))
}

async fn write_message<S: AsyncWrite + Unpin>(conn: &mut S, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "too long"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    conn.write_all(&framed).await
}
