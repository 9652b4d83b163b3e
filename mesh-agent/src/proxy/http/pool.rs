//! Upstream HTTP connections, pooled per (client pod, endpoint, HTTP version):
//! one multiplexed connection for HTTP/2 (its own task), idle keep-alive
//! connections for HTTP/1.1 (each carries one exchange at a time, driven by
//! the request that holds it: no task, no hand-off per request).
use std::{
    collections::HashMap,
    future::{Future, poll_fn},
    net::{Ipv4Addr, SocketAddrV4},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    task::{Context as TaskContext, Poll},
    time::{Duration, Instant},
};

use hyper::{
    Request, Response,
    body::{Body as _, Bytes, Frame, Incoming, SizeHint},
    client::conn::{http1, http2},
    header,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::Body;
use crate::proxy::{Inputs, upstream::Upstream};

/// How long an unused connection is kept when no DestinationRule says
/// (`connectionPool.http.idleTimeout`).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle HTTP/1.1 connections kept per key.
const MAX_IDLE: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The client pod: connections from its address are its own.
    pub client: Ipv4Addr,
    /// The identity requests leave with (a pod's, or a gateway's): a
    /// connection authorized for one is never used for another, whatever
    /// client address they share (two gateways behind one listener do).
    pub source: Option<std::sync::Arc<str>>,
    pub upstream: SocketAddrV4,
    pub h2: bool,
    /// TLS originated by the agent (DestinationRule `tls.mode: SIMPLE`).
    pub tls: bool,
    /// The Service the connection is for (its hostname), which the
    /// destination is told when the connection opens and reports every
    /// request on it under: as Envoy's pools are per cluster, a connection
    /// is never shared between two Services that select one pod.
    pub service: Option<std::sync::Arc<str>>,
}

/// What the DestinationRule's `connectionPool` says about upstream connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connect_timeout: Duration,
    /// `http.maxRequestsPerConnection`: a connection that served this many is not reused.
    pub max_requests_per_connection: Option<u32>,
    /// `http.idleTimeout`: an unused connection is dropped after this long.
    pub idle_timeout: Duration,
}

/// About one upstream connection (shared by the clones of an HTTP/2 sender).
#[derive(Debug, Clone)]
pub struct Meta {
    /// An HBONE stream (mutual TLS).
    pub mtls: bool,
    generation: u64,
    /// Requests sent on it.
    uses: Arc<AtomicU32>,
}

impl Meta {
    /// Served `maxRequestsPerConnection` requests: not to be pooled again.
    fn spent(&self, limits: &Limits) -> bool {
        limits.max_requests_per_connection.is_some_and(|m| self.uses.load(Ordering::Acquire) >= m)
    }
}

/// An HTTP/1.1 connection's own future (it reads and writes the socket; an
/// upgrade leaves through it).
type H1Conn = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

pub enum Sender {
    /// HTTP/1.1: no task of its own; whoever holds the sender drives the
    /// connection (the request's task while it sends, then the response
    /// body as it is read), so an exchange costs no hand-off between tasks.
    H1 {
        tx: http1::SendRequest<Body>,
        conn: H1Conn,
        meta: Meta,
    },
    H2 {
        tx: http2::SendRequest<Body>,
        meta: Meta,
    },
}

/// Why a request got no response.
pub enum SendError {
    /// The connection had closed (a pooled one, while idle): the request was
    /// not handed over and may go on another connection.
    Stale(Box<Request<Body>>, hyper::Error),
    /// Sent, and the connection failed before the response head.
    Failed(hyper::Error),
}

/// Where a sender goes back after its exchange.
pub struct Release {
    pub ctx: Arc<Inputs>,
    pub key: PoolKey,
    pub limits: Limits,
}

/// Polls an HTTP/1.1 connection's future; `None` once it has ended.
fn drive(conn: &mut Option<H1Conn>, cx: &mut TaskContext<'_>) {
    if let Some(c) = conn
        && let Poll::Ready(result) = c.as_mut().poll(cx)
    {
        if let Err(e) = result {
            tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
        }
        *conn = None;
    }
}

impl Sender {
    fn meta(&self) -> &Meta {
        match self {
            Sender::H1 { meta, .. } | Sender::H2 { meta, .. } => meta,
        }
    }

    pub fn is_mtls(&self) -> bool {
        self.meta().mtls
    }

    /// Sends one request. The sender goes back to the pool by itself: an
    /// HTTP/2 one at once, an HTTP/1.1 one when the response body has been
    /// read to its end (a request that upgrades the connection keeps it).
    pub async fn send(self, req: Request<Body>, release: Release) -> Result<Response<ResponseBody>, SendError> {
        match self {
            Sender::H1 { mut tx, conn, meta } => {
                let mut conn = Some(conn);
                // Idle in the pool, nothing polled the connection: whether
                // the server closed it shows now, before the request is given.
                if let Err(e) = poll_fn(|cx| {
                    drive(&mut conn, cx);
                    tx.poll_ready(cx)
                })
                .await
                {
                    return Err(SendError::Stale(Box::new(req), e));
                }
                meta.uses.fetch_add(1, Ordering::AcqRel);
                if req.headers().contains_key(header::UPGRADE) {
                    // The upgraded connection leaves through the connection's future.
                    if let Some(c) = conn.take() {
                        tokio::spawn(async move {
                            if let Err(e) = c.await {
                                tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
                            }
                        });
                    }
                    let resp = tx.send_request(req).await.map_err(SendError::Failed)?;
                    return Ok(resp.map(|body| ResponseBody { body, held: None }));
                }
                let mut response = std::pin::pin!(tx.send_request(req));
                let resp = poll_fn(|cx| {
                    drive(&mut conn, cx);
                    response.as_mut().poll(cx)
                })
                .await
                .map_err(SendError::Failed)?;
                let held = conn.map(|conn| Held { tx, conn: Some(conn), meta, release });
                let mut resp = resp.map(|body| ResponseBody { body, held });
                if resp.body().body.is_end_stream() {
                    // No body (HEAD, 204, 304, `content-length: 0`): nobody will read one.
                    resp.body_mut().done(None);
                }
                Ok(resp)
            }
            Sender::H2 { mut tx, meta } => {
                if let Err(e) = tx.ready().await {
                    return Err(SendError::Stale(Box::new(req), e));
                }
                meta.uses.fetch_add(1, Ordering::AcqRel);
                let resp = tx.send_request(req).await.map_err(SendError::Failed)?;
                release.ctx.http_pool.release_h2(release.key, tx, meta, &release.limits);
                Ok(resp.map(|body| ResponseBody { body, held: None }))
            }
        }
    }
}

/// An HTTP/1.1 connection lent to a response body, and where it goes back.
struct Held {
    tx: http1::SendRequest<Body>,
    conn: Option<H1Conn>,
    meta: Meta,
    release: Release,
}

impl Held {
    /// Pools the connection once its exchange has finished, if it is still good.
    fn release(mut self) {
        let Release { ctx, key, limits } = self.release;
        if self.meta.spent(&limits) || self.conn.is_none() || self.meta.generation != ctx.http_pool.generation() {
            return; // dropped: the connection closes
        }
        if self.tx.is_ready() {
            if let Some(conn) = self.conn {
                ctx.http_pool.put_h1(key, self.tx, conn, self.meta, limits.idle_timeout);
            }
            return;
        }
        // The connection has not yet seen its exchange end (or the request
        // body is still going up): drive it there on a task of its own.
        tokio::spawn(async move {
            let ready = poll_fn(|cx| {
                drive(&mut self.conn, cx);
                self.tx.poll_ready(cx)
            })
            .await;
            if let (Ok(()), Some(conn)) = (ready, self.conn)
                && self.meta.generation == ctx.http_pool.generation()
            {
                ctx.http_pool.put_h1(key, self.tx, conn, self.meta, limits.idle_timeout);
            }
        });
    }
}

/// A response body from upstream. On HTTP/1.1 it also drives the connection
/// it arrives on, and returns that connection to the pool at its end; dropped
/// before its end, the connection closes (the rest of the response is unread).
pub struct ResponseBody {
    body: Incoming,
    held: Option<Held>,
}

impl ResponseBody {
    fn done(&mut self, cx: Option<&mut TaskContext<'_>>) {
        let Some(mut held) = self.held.take() else { return };
        if let Some(cx) = cx {
            // Lets the connection take in the end of the exchange.
            drive(&mut held.conn, cx);
        }
        held.release();
    }
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(held) = &mut this.held {
            drive(&mut held.conn, cx);
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.body.is_end_stream(),
            _ => false,
        };
        if ended {
            this.done(Some(cx));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if self.body.is_end_stream() {
            self.done(None);
        }
    }
}

/// An idle HTTP/1.1 connection and when it stops being reusable.
type IdleH1 = (http1::SendRequest<Body>, H1Conn, Meta, Instant);
/// The shared HTTP/2 connection, and when it was last used.
type SharedH2 = (http2::SendRequest<Body>, Meta, Instant);

#[derive(Default)]
pub struct HttpPool {
    h1: Mutex<HashMap<PoolKey, Vec<IdleH1>>>,
    h2: Mutex<HashMap<PoolKey, SharedH2>>,
    /// Bumped by [`HttpPool::clear`]: connections made before are not pooled again.
    generation: AtomicU64,
}

impl HttpPool {
    /// A live connection for `key`: the shared HTTP/2 one, or an idle HTTP/1.1 one.
    pub fn take(&self, key: &PoolKey, limits: &Limits) -> Option<Sender> {
        let now = Instant::now();
        if key.h2 {
            let mut map = self.h2.lock().ok()?;
            let fresh = map.get(key).is_some_and(|(tx, _, used)| !tx.is_closed() && now - *used < limits.idle_timeout);
            if !fresh {
                map.remove(key);
                return None;
            }
            let (tx, meta, used) = map.get_mut(key)?;
            *used = now;
            return Some(Sender::H2 { tx: tx.clone(), meta: meta.clone() });
        }
        let mut map = self.h1.lock().ok()?;
        let list = map.get_mut(key)?;
        list.retain(|(tx, _, _, until)| !tx.is_closed() && *until > now);
        list.pop().map(|(tx, conn, meta, _)| Sender::H1 { tx, conn, meta })
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Pools an HTTP/2 sender after a request (it multiplexes); not one made
    /// before the last [`HttpPool::clear`], nor one that served
    /// `maxRequestsPerConnection` requests.
    fn release_h2(&self, key: PoolKey, tx: http2::SendRequest<Body>, meta: Meta, limits: &Limits) {
        let spent = meta.spent(limits);
        if meta.generation != self.generation() {
            return;
        }
        if let Ok(mut map) = self.h2.lock() {
            map.retain(|_, (tx, _, _)| !tx.is_closed());
            if spent {
                // Only if it is still this connection that is pooled.
                if map.get(&key).is_some_and(|(_, m, _)| Arc::ptr_eq(&m.uses, &meta.uses)) {
                    map.remove(&key);
                }
            } else {
                map.entry(key).or_insert((tx, meta, Instant::now()));
            }
        }
    }

    /// Forgets every pooled connection (they close once their exchanges end).
    pub fn clear(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut m) = self.h1.lock() {
            m.clear();
        }
        if let Ok(mut m) = self.h2.lock() {
            m.clear();
        }
    }

    fn put_h1(&self, key: PoolKey, tx: http1::SendRequest<Body>, conn: H1Conn, meta: Meta, idle: Duration) {
        let Ok(mut map) = self.h1.lock() else { return };
        // Forget keys whose connections all expired.
        let now = Instant::now();
        map.retain(|_, list| {
            list.retain(|(tx, _, _, until)| !tx.is_closed() && *until > now);
            !list.is_empty()
        });
        let list = map.entry(key).or_default();
        if list.len() < MAX_IDLE {
            list.push((tx, conn, meta, now + idle));
        }
    }
}

/// The HTTP handshake on a fresh upstream connection.
pub(crate) async fn handshake(io: Upstream, h2: bool, mtls: bool, generation: u64) -> Result<Sender, hyper::Error> {
    let io = TokioIo::new(io);
    let meta = Meta { mtls, generation, uses: Arc::default() };
    if h2 {
        let (tx, conn) = http2::Builder::new(TokioExecutor::new()).timer(TokioTimer::new()).handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(Sender::H2 { tx, meta })
    } else {
        let (tx, conn) = http1::Builder::new().handshake(io).await?;
        Ok(Sender::H1 { tx, conn: Box::pin(conn.with_upgrades()), meta })
    }
}
