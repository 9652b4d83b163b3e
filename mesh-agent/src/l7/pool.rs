//! Upstream HTTP connections, pooled per (client pod, endpoint, HTTP version):
//! one multiplexed connection for HTTP/2, idle keep-alive connections for
//! HTTP/1.1 (each carries one exchange at a time).
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
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

/// Idle HTTP/1.1 connections older than this are closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle HTTP/1.1 connections kept per key.
const MAX_IDLE: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The client pod: connections from its address (and identity) are its own.
    pub client: Ipv4Addr,
    pub upstream: SocketAddrV4,
    pub h2: bool,
}

pub enum Sender {
    H1 { tx: http1::SendRequest<Body>, mtls: bool, generation: u64 },
    H2 { tx: http2::SendRequest<Body>, mtls: bool, generation: u64 },
}

impl Sender {
    /// Sends one request; the sender comes back for [`Pool::release`].
    pub async fn send(self, req: Request<Body>) -> Result<(Response<Incoming>, Sender), hyper::Error> {
        match self {
            Sender::H1 { mut tx, mtls, generation } => {
                tx.ready().await?;
                let resp = tx.send_request(req).await?;
                Ok((resp, Sender::H1 { tx, mtls, generation }))
            }
            Sender::H2 { mut tx, mtls, generation } => {
                tx.ready().await?;
                let resp = tx.send_request(req).await?;
                Ok((resp, Sender::H2 { tx, mtls, generation }))
            }
        }
    }
}

pub fn is_mtls(s: &Sender) -> bool {
    match s {
        Sender::H1 { mtls, .. } | Sender::H2 { mtls, .. } => *mtls,
    }
}

/// An idle HTTP/1.1 connection: its sender, whether it is an HBONE stream, and
/// since when it is idle.
type IdleH1 = (http1::SendRequest<Body>, bool, Instant);

#[derive(Default)]
pub struct Pool {
    h1: Mutex<HashMap<PoolKey, Vec<IdleH1>>>,
    h2: Mutex<HashMap<PoolKey, (http2::SendRequest<Body>, bool)>>,
    /// Bumped by [`Pool::clear`]: connections made before are not pooled again.
    generation: std::sync::atomic::AtomicU64,
}

impl Pool {
    /// A live connection for `key`: the shared HTTP/2 one, or an idle HTTP/1.1 one.
    pub fn take(&self, key: &PoolKey) -> Option<Sender> {
        if key.h2 {
            let map = self.h2.lock().ok()?;
            let (tx, mtls) = map.get(key).filter(|(tx, _)| !tx.is_closed())?;
            return Some(Sender::H2 { tx: tx.clone(), mtls: *mtls, generation: self.generation() });
        }
        let mut map = self.h1.lock().ok()?;
        let list = map.get_mut(key)?;
        list.retain(|(tx, _, at)| !tx.is_closed() && at.elapsed() < IDLE_TIMEOUT);
        let generation = self.generation();
        list.pop().map(|(tx, mtls, _)| Sender::H1 { tx, mtls, generation })
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Returns a sender after use: HTTP/2 at once (it multiplexes); HTTP/1.1
    /// once its exchange has finished, if the connection is still good.
    pub fn release(&self, ctx: &Arc<Context>, key: PoolKey, sender: Sender) {
        match sender {
            Sender::H1 { generation, .. } | Sender::H2 { generation, .. } if generation != self.generation() => {}
            Sender::H2 { tx, mtls, .. } => {
                if let Ok(mut map) = self.h2.lock() {
                    map.retain(|_, (tx, _)| !tx.is_closed());
                    map.entry(key).or_insert((tx, mtls));
                }
            }
            Sender::H1 { mut tx, mtls, generation } => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    if tx.ready().await.is_ok() && generation == ctx.http_pool.generation() {
                        ctx.http_pool.put_h1(key, tx, mtls);
                    }
                });
            }
        }
    }

    /// Forgets every pooled connection (they close once their exchanges end).
    pub fn clear(&self) {
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if let Ok(mut m) = self.h1.lock() {
            m.clear();
        }
        if let Ok(mut m) = self.h2.lock() {
            m.clear();
        }
    }

    fn put_h1(&self, key: PoolKey, tx: http1::SendRequest<Body>, mtls: bool) {
        let Ok(mut map) = self.h1.lock() else { return };
        // Forget keys whose connections all died.
        map.retain(|_, list| {
            list.retain(|(tx, _, _)| !tx.is_closed());
            !list.is_empty()
        });
        let list = map.entry(key).or_default();
        if list.len() < MAX_IDLE {
            list.push((tx, mtls, Instant::now()));
        }
    }
}

/// The HTTP handshake on a fresh upstream connection.
pub(crate) async fn handshake(io: Upstream, h2: bool, mtls: bool, generation: u64) -> Result<Sender, hyper::Error> {
    let io = TokioIo::new(io);
    if h2 {
        let (tx, conn) = http2::Builder::new(TokioExecutor::new()).timer(TokioTimer::new()).handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(Sender::H2 { tx, mtls, generation })
    } else {
        let (tx, conn) = http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(Sender::H1 { tx, mtls, generation })
    }
}
