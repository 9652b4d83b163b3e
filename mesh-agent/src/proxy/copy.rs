//! Bidirectional byte copy with half-close, bounded buffers that grow with the
//! flow, and byte counters updated as data moves (not only at close).
use std::io;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// First buffer size; small so idle connections stay cheap.
const INITIAL_BUF: usize = 4 * 1024;
/// Largest buffer a direction grows to while reads keep filling it.
const MAX_BUF: usize = 256 * 1024;

/// Which socket operation failed, so logs say which side broke the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    ReadClient,
    WriteUpstream,
    ReadUpstream,
    WriteClient,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Failed::ReadClient => "reading from the client",
            Failed::WriteUpstream => "writing to the upstream",
            Failed::ReadUpstream => "reading from the upstream",
            Failed::WriteClient => "writing to the client",
        })
    }
}

/// Copies client→upstream (counted in `received`) and upstream→client (`sent`)
/// until both directions have seen EOF. Each EOF is passed on as a write
/// shutdown (half-close). On an error the caller resets what it can (a TCP
/// socket gets RST; a tunnel stream is cancelled when dropped).
pub async fn bidirectional<C, U>(
    client: &mut C,
    upstream: &mut U,
    received: &Counter,
    sent: &Counter,
) -> Result<(), (Failed, io::Error)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    tokio::try_join!(
        one_way(&mut cr, &mut uw, received, (Failed::ReadClient, Failed::WriteUpstream)),
        one_way(&mut ur, &mut cw, sent, (Failed::ReadUpstream, Failed::WriteClient))
    )
    .map(|_| ())
}

async fn one_way<R, W>(
    r: &mut R,
    w: &mut W,
    counter: &Counter,
    ops: (Failed, Failed),
) -> Result<u64, (Failed, io::Error)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; INITIAL_BUF];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await.map_err(|e| (ops.0, e))?;
        if n == 0 {
            // Every byte was written; a peer that has already gone (a tunnel
            // stream the other agent cancelled once it had the whole answer)
            // cannot take the half-close, and nothing is lost by that.
            if let Err(e) = w.shutdown().await {
                tracing::debug!(op = %ops.1, error = %e, "half-close after the last byte failed: the peer is gone");
            }
            return Ok(total);
        }
        w.write_all(&buf[..n]).await.map_err(|e| (ops.1, e))?;
        counter.inc_by(n as u64);
        total += n as u64;
        if n == buf.len() && buf.len() < MAX_BUF {
            buf.resize(buf.len() * 2, 0);
        }
    }
}
