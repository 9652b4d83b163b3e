//! Bidirectional byte copy with half-close and byte counters updated as data
//! moves (not only at close).
//!
//! Memory follows the flow, not the connection count: a direction that was
//! idle reads into one scratch buffer per worker thread and writes on at once;
//! only when the writer cannot take everything (backpressure) does it get a
//! buffer of its own, read into directly from then on, and freed as soon as
//! the reader has nothing more for now. An idle connection holds no buffer at
//! all, and a fast one reads up to [`SCRATCH`] bytes per call.
use std::{
    cell::RefCell,
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest single read.
const SCRATCH: usize = 256 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// Which socket operation failed, so logs say which side broke the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    ReadClient,
    WriteUpstream,
    ReadUpstream,
    WriteClient,
    /// No byte moved either way for the idle timeout.
    Idle,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Failed::ReadClient => "reading from the client",
            Failed::WriteUpstream => "writing to the upstream",
            Failed::ReadUpstream => "reading from the upstream",
            Failed::WriteClient => "writing to the client",
            Failed::Idle => "idle for the idle timeout",
        })
    }
}

/// Copies client→upstream (counted in `received`) and upstream→client (`sent`)
/// until both directions have seen EOF; `moved` gets each direction's bytes
/// (client→upstream, upstream→client), whatever the outcome. Each EOF is passed on as a write
/// shutdown (half-close). On an error the caller resets what it can (a TCP
/// socket gets RST; a tunnel stream is cancelled when dropped). With `idle`,
/// a connection that moves no byte either way for that long fails as
/// [`Failed::Idle`]: the timer is re-armed only when it fires (progress is
/// read from the counters), so a busy connection pays for no timer update.
pub async fn bidirectional<C, U>(
    client: &mut C,
    upstream: &mut U,
    received: &Counter,
    sent: &Counter,
    idle: Option<std::time::Duration>,
    moved: &mut [u64; 2],
) -> Result<(), (Failed, io::Error)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Direction::new((Failed::ReadClient, Failed::WriteUpstream));
    let mut down = Direction::new((Failed::ReadUpstream, Failed::WriteClient));
    let progress = || received.get() + sent.get();
    let mut timer = idle.map(|d| (d, Box::pin(tokio::time::sleep(d)), progress()));
    let result = poll_fn(|cx| {
        // Both directions are polled every time, so each registers its wakers.
        let b = down.poll(cx, upstream, client, sent)?;
        let a = match up.poll(cx, client, upstream, received) {
            // The upstream finished its answer (its end of stream is passed
            // on) and then took no more: it has closed, as a server closes
            // after `Connection: close`. The client gets its end of stream,
            // not a reset that would throw away the answer it has not read.
            Poll::Ready(Err((Failed::WriteUpstream, e))) if down.done => {
                tracing::debug!(error = %e, "the upstream closed after its answer; the client's further bytes are dropped");
                up.done = true;
                Poll::Ready(Ok(()))
            }
            other => other,
        }?;
        if let (Poll::Ready(()), Poll::Ready(())) = (a, b) {
            return Poll::Ready(Ok(()));
        }
        if let Some((d, sleep, seen)) = &mut timer {
            while sleep.as_mut().poll(cx).is_ready() {
                let now = progress();
                if now == *seen {
                    return Poll::Ready(Err((Failed::Idle, io::ErrorKind::TimedOut.into())));
                }
                *seen = now;
                sleep.as_mut().reset(tokio::time::Instant::now() + *d);
            }
        }
        Poll::Pending
    })
    .await;
    *moved = [up.moved, down.moved];
    result
}

/// One direction's progress.
struct Direction {
    /// The direction's own buffer while data flows: read into directly, so a
    /// partial write leaves the rest in place. Freed when the reader has
    /// nothing more for now, so an idle connection holds no buffer.
    buf: Vec<u8>,
    /// `buf[start..end]` is read and not yet written.
    start: usize,
    end: usize,
    eof: bool,
    done: bool,
    ops: (Failed, Failed),
    /// Bytes written on.
    moved: u64,
}

/// What one read (and the write tried at once) came to.
enum Step {
    /// Bytes moved (or parked in `buf`); go round again.
    Moved,
    /// End of stream.
    Eof,
}

impl Direction {
    fn new(ops: (Failed, Failed)) -> Self {
        Direction { buf: Vec::new(), start: 0, end: 0, eof: false, done: false, ops, moved: 0 }
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        counter: &Counter,
    ) -> Poll<Result<(), (Failed, io::Error)>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let write_op = self.ops.1;
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            // First what the writer could not take before.
            while self.start < self.end {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.buf[self.start..self.end]))
                    .map_err(|e| (write_op, e))?;
                if n == 0 {
                    return Poll::Ready(Err((write_op, io::ErrorKind::WriteZero.into())));
                }
                self.start += n;
            }
            (self.start, self.end) = (0, 0);
            if self.eof {
                // Every byte was written; a peer that has already gone (a
                // tunnel stream the other agent cancelled once it had the
                // whole answer) cannot take the half-close, and nothing is
                // lost by that.
                if let Err(e) = ready!(Pin::new(&mut *w).poll_shutdown(cx)) {
                    tracing::debug!(op = %write_op, error = %e, "half-close after the last byte failed: the peer is gone");
                }
                self.buf = Vec::new();
                self.done = true;
                continue;
            }
            let step = if self.buf.is_empty() {
                // Idle until now: read into the thread's scratch buffer and
                // keep (copy) only what the writer does not take at once.
                SCRATCH_BUF.with_borrow_mut(|scratch| self.read_and_write(cx, r, w, counter, scratch, true))
            } else {
                let mut buf = std::mem::take(&mut self.buf);
                let step = self.read_and_write(cx, r, w, counter, &mut buf, false);
                self.buf = buf;
                step
            };
            match step {
                Poll::Ready(Ok(Step::Moved)) => {}
                Poll::Ready(Ok(Step::Eof)) => self.eof = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing to read for now: hold no buffer, and make sure
                    // what the writer buffers (TLS, HTTP/2) goes out.
                    self.buf = Vec::new();
                    ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(|e| (write_op, e))?;
                    return Poll::Pending;
                }
            }
        }
    }

    /// One read into `into`, and a write of it at once. What the writer does
    /// not take stays in `self.buf[start..end]` (copied there when `into` is
    /// the scratch buffer).
    fn read_and_write<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        counter: &Counter,
        into: &mut [u8],
        scratch: bool,
    ) -> Poll<Result<Step, (Failed, io::Error)>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let (read_op, write_op) = self.ops;
        let mut rb = ReadBuf::new(into);
        ready!(Pin::new(&mut *r).poll_read(cx, &mut rb)).map_err(|e| (read_op, e))?;
        let n = rb.filled().len();
        if n == 0 {
            return Poll::Ready(Ok(Step::Eof));
        }
        counter.inc_by(n as u64);
        self.moved += n as u64;
        let taken = match Pin::new(&mut *w).poll_write(cx, &into[..n]) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err((write_op, io::ErrorKind::WriteZero.into()))),
            Poll::Ready(Ok(t)) => t,
            Poll::Ready(Err(e)) => return Poll::Ready(Err((write_op, e))),
            Poll::Pending => 0,
        };
        if scratch {
            if taken < n {
                // The flow meets backpressure: from now on it reads into a
                // buffer of its own, where partial writes cost no copy.
                let mut own = vec![0u8; SCRATCH];
                own[..n - taken].copy_from_slice(&into[taken..n]);
                self.buf = own;
                (self.start, self.end) = (0, n - taken);
            }
        } else {
            (self.start, self.end) = (taken, n);
        }
        Poll::Ready(Ok(Step::Moved))
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Every byte arrives in order both ways, through a writer slower than
    /// the reader (tiny duplex buffers force backpressure), and half-closes
    /// pass on.
    #[tokio::test]
    async fn copies_both_ways_under_backpressure() {
        let (mut client, mut client_side) = tokio::io::duplex(1024);
        let (mut upstream_side, mut upstream) = tokio::io::duplex(333);
        let (rx, tx) = (Counter::default(), Counter::default());
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let answer: Vec<u8> = data.iter().rev().copied().collect();
        let proxy = async {
            bidirectional(&mut client_side, &mut upstream_side, &rx, &tx, None, &mut [0; 2]).await.unwrap();
        };
        let (d, a) = (data.clone(), answer.clone());
        let app = async move {
            let (mut r, mut w) = tokio::io::split(&mut client);
            let send = async {
                w.write_all(&d).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let recv = r.read_to_end(&mut got);
            let (_, n) = tokio::join!(send, recv);
            n.unwrap();
            assert_eq!(got, a);
        };
        let server = async move {
            let mut got = Vec::new();
            let (mut r, mut w) = tokio::io::split(&mut upstream);
            r.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, data);
            w.write_all(&answer).await.unwrap();
            w.shutdown().await.unwrap();
        };
        tokio::join!(proxy, app, server);
        assert_eq!(rx.get(), 200_000);
        assert_eq!(tx.get(), 200_000);
    }

    /// A writer that fails is reported as such, naming the direction.
    #[tokio::test]
    async fn names_the_failed_operation() {
        let (client, mut client_side) = tokio::io::duplex(64);
        let (mut upstream_side, mut upstream) = tokio::io::duplex(64);
        drop(client);
        upstream.write_all(b"hello").await.unwrap();
        let (rx, tx) = (Counter::default(), Counter::default());
        let err = bidirectional(&mut client_side, &mut upstream_side, &rx, &tx, None, &mut [0; 2]).await.unwrap_err();
        assert_eq!(err.0, Failed::WriteClient);
    }

    /// An upstream that answers and closes (HTTP's `Connection: close`, an
    /// HBONE stream whose server is done) while the client still sends: the
    /// client reads the whole answer and its end, and the copy is no failure.
    #[tokio::test]
    async fn an_upstream_that_closes_after_answering_is_not_a_failure() {
        let (mut client, mut client_side) = tokio::io::duplex(64);
        let (mut upstream_side, mut upstream) = tokio::io::duplex(64);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let server = async move {
            let mut req = [0u8; 18];
            upstream.read_exact(&mut req).await.unwrap();
            upstream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
            drop(upstream);
        };
        let (rx, tx) = (Counter::default(), Counter::default());
        let mut moved = [0; 2];
        let proxy = bidirectional(&mut client_side, &mut upstream_side, &rx, &tx, None, &mut moved);
        let app = async {
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            // More from the client once the answer is in: the upstream is gone.
            client.write_all(b"more").await.unwrap();
            answer
        };
        let (result, answer, ()) = tokio::join!(proxy, app, server);
        result.unwrap();
        assert_eq!(answer, b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(moved[1], 19);
    }
}
