//! Upstream HTTP connections, pooled per (client pod, endpoint, HTTP version):
//! one multiplexed connection for HTTP/2, idle keep-alive connections for
//! HTTP/1.1 (each carries one exchange at a time).
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::Body;
use crate::{agent::Context, proxy::Upstream};

/// How long an unused connection is kept when no DestinationRule says
/// (`connectionPool.http.idleTimeout`).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle HTTP/1.1 connections kept per key.
const MAX_IDLE: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The client pod: connections from its address (and identity) are its own.
    pub client: Ipv4Addr,
    pub upstream: SocketAddrV4,
    pub h2: bool,
    /// TLS originated by the agent (DestinationRule `tls.mode: SIMPLE`).
    pub tls: bool,
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

pub enum Sender {
    H1 { tx: http1::SendRequest<Body>, meta: Meta },
    H2 { tx: http2::SendRequest<Body>, meta: Meta },
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

    /// Sends one request; the sender comes back for [`Pool::release`].
    pub async fn send(self, req: Request<Body>) -> Result<(Response<Incoming>, Sender), hyper::Error> {
        self.meta().uses.fetch_add(1, Ordering::AcqRel);
        match self {
            Sender::H1 { mut tx, meta } => {
                tx.ready().await?;
                let resp = tx.send_request(req).await?;
                Ok((resp, Sender::H1 { tx, meta }))
            }
            Sender::H2 { mut tx, meta } => {
                tx.ready().await?;
                let resp = tx.send_request(req).await?;
                Ok((resp, Sender::H2 { tx, meta }))
            }
        }
    }
}

/// An idle HTTP/1.1 connection and when it stops being reusable.
type IdleH1 = (http1::SendRequest<Body>, Meta, Instant);
/// The shared HTTP/2 connection, and when it was last used.
type SharedH2 = (http2::SendRequest<Body>, Meta, Instant);

#[derive(Default)]
pub struct Pool {
    h1: Mutex<HashMap<PoolKey, Vec<IdleH1>>>,
    h2: Mutex<HashMap<PoolKey, SharedH2>>,
    /// Bumped by [`Pool::clear`]: connections made before are not pooled again.
    generation: AtomicU64,
}

impl Pool {
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
        list.retain(|(tx, _, until)| !tx.is_closed() && *until > now);
        list.pop().map(|(tx, meta, _)| Sender::H1 { tx, meta })
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Returns a sender after use: HTTP/2 at once (it multiplexes); HTTP/1.1
    /// once its exchange has finished, if the connection is still good. A
    /// connection made before the last [`Pool::clear`], or that served
    /// `maxRequestsPerConnection` requests, is not pooled again.
    pub fn release(&self, ctx: &Arc<Context>, key: PoolKey, sender: Sender, limits: &Limits) {
        let meta = sender.meta();
        let spent = limits.max_requests_per_connection.is_some_and(|m| meta.uses.load(Ordering::Acquire) >= m);
        if meta.generation != self.generation() {
            return;
        }
        match sender {
            Sender::H2 { tx, meta } => {
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
            Sender::H1 { .. } if spent => {}
            Sender::H1 { mut tx, meta } => {
                let ctx = ctx.clone();
                let idle = limits.idle_timeout;
                tokio::spawn(async move {
                    if tx.ready().await.is_ok() && meta.generation == ctx.http_pool.generation() {
                        ctx.http_pool.put_h1(key, tx, meta, idle);
                    }
                });
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

    fn put_h1(&self, key: PoolKey, tx: http1::SendRequest<Body>, meta: Meta, idle: Duration) {
        let Ok(mut map) = self.h1.lock() else { return };
        // Forget keys whose connections all died.
        map.retain(|_, list| {
            list.retain(|(tx, _, _)| !tx.is_closed());
            !list.is_empty()
        });
        let list = map.entry(key).or_default();
        if list.len() < MAX_IDLE {
            list.push((tx, meta, Instant::now() + idle));
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
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(Sender::H1 { tx, meta })
    }
}
