//! The first bytes of a stream that is not a socket (an HBONE stream, an
//! in-process pipe), read to tell its protocol and then given back in front
//! of the rest.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

use crate::routing::protocol::{self, Handling, Sniffed};

/// A stream with bytes already read from it put back in front.
pub(crate) struct Prefixed<I> {
    prefix: Vec<u8>,
    at: usize,
    inner: I,
}

/// Reads until the protocol shows (HTTP/1.x, the HTTP/2 preface, or
/// anything else), the client stops sending for `timeout`, or it closes.
pub(crate) async fn sniff<I: AsyncRead + Unpin>(mut io: I, timeout: Duration) -> (Prefixed<I>, Handling) {
    let mut buf = vec![0u8; 32];
    let mut n = 0;
    let deadline = tokio::time::Instant::now() + timeout;
    let handling = loop {
        match tokio::time::timeout_at(deadline, io.read(&mut buf[n..])).await {
            Ok(Ok(read)) if read > 0 => n += read,
            _ => break Handling::Tcp,
        }
        match protocol::sniff(&buf[..n]) {
            Sniffed::Http1 => break Handling::Http1,
            Sniffed::Http2 => break Handling::Http2,
            Sniffed::NeedMore if n < buf.len() => {}
            Sniffed::NeedMore | Sniffed::Other => break Handling::Tcp,
        }
    };
    buf.truncate(n);
    (Prefixed { prefix: buf, at: 0, inner: io }, handling)
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.prefix.len() {
            let n = (this.prefix.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
