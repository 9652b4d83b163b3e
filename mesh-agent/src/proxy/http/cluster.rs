//! Per-cluster state at the source agent (a cluster is a Service, or one of
//! its subsets): Envoy's circuit breakers from `connectionPool`, and outlier
//! detection, which leaves out endpoints that keep failing.
use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Instant,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::state::traffic::{Cluster, Policy};

#[derive(Default)]
pub struct Clusters {
    map: Mutex<HashMap<String, Arc<ClusterState>>>,
}

pub struct ClusterState {
    key: String,
    policy: Policy,
    /// Requests in flight (until their response is complete).
    active: AtomicU32,
    /// HTTP/1.1 requests waiting for a connection slot.
    pending: AtomicU32,
    connections: Option<Arc<Semaphore>>,
    hosts: Mutex<HashMap<SocketAddrV4, Host>>,
    /// Requests in flight per endpoint (for LEAST_REQUEST).
    load: Mutex<HashMap<SocketAddrV4, u32>>,
}

#[derive(Debug, Default)]
struct Host {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    /// How many times it was ejected: each ejection lasts that many base times.
    ejections: u32,
}

/// What a try ended with, for outlier detection.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Status(u16),
    ConnectFailure,
    /// Reset or timed out before answering.
    NoResponse,
}

/// A request admitted by the circuit breakers; dropping it frees its place.
pub struct Admission {
    state: Arc<ClusterState>,
    _connection: Option<OwnedSemaphorePermit>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Clusters {
    /// The state for `cluster`, made afresh when its policy changed.
    pub fn get(&self, cluster: &Cluster) -> Option<Arc<ClusterState>> {
        let mut map = self.map.lock().ok()?;
        if let Some(s) = map.get(&cluster.key).filter(|s| s.policy == cluster.policy) {
            return Some(s.clone());
        }
        let connections = cluster.policy.pool.max_connections.map(|n| Arc::new(Semaphore::new(n as usize)));
        let state = Arc::new(ClusterState {
            key: cluster.key.clone(),
            policy: cluster.policy.clone(),
            active: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            connections,
            hosts: Mutex::default(),
            load: Mutex::default(),
        });
        map.insert(cluster.key.clone(), state.clone());
        Some(state)
    }

    /// Whether outlier detection has `addr` out of `cluster` right now.
    pub fn is_ejected(&self, cluster: &str, addr: SocketAddrV4) -> bool {
        let Some(state) = self.state(cluster) else { return false };
        let now = Instant::now();
        state.hosts.lock().is_ok_and(|h| h.get(&addr).and_then(|h| h.ejected_until).is_some_and(|u| u > now))
    }

    fn state(&self, cluster: &str) -> Option<Arc<ClusterState>> {
        self.map.lock().ok().and_then(|m| m.get(cluster).cloned())
    }

    /// Forgets all state (on a configuration reload).
    pub fn clear(&self) {
        if let Ok(mut m) = self.map.lock() {
            m.clear();
        }
    }
}

impl crate::routing::http::EndpointState for Clusters {
    fn ejected(&self, cluster: &str, addr: SocketAddrV4) -> bool {
        self.is_ejected(cluster, addr)
    }

    fn active(&self, cluster: &str, addr: SocketAddrV4) -> u32 {
        self.state(cluster).and_then(|s| s.load.lock().ok().and_then(|l| l.get(&addr).copied())).unwrap_or(0)
    }
}

/// A request in flight to one endpoint; dropping it ends it.
pub struct InFlight {
    state: Arc<ClusterState>,
    addr: SocketAddrV4,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut load) = self.state.load.lock()
            && let Some(n) = load.get_mut(&self.addr)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                load.remove(&self.addr);
            }
        }
    }
}

impl ClusterState {
    /// Counts a request to `addr` until the returned guard is dropped.
    pub fn in_flight(self: &Arc<Self>, addr: SocketAddrV4) -> InFlight {
        if let Ok(mut load) = self.load.lock() {
            *load.entry(addr).or_default() += 1;
        }
        InFlight { state: self.clone(), addr }
    }

    /// Admits a request, or `None` when a limit overflows (the request is then
    /// answered 503 `UO`). HTTP/1.1 requests past `maxConnections` wait, up to
    /// `http1MaxPendingRequests` of them.
    pub async fn admit(self: &Arc<Self>, http1: bool) -> Option<Admission> {
        let pool = &self.policy.pool;
        let active = self.active.fetch_add(1, Ordering::AcqRel);
        // From here on, dropping the admission gives the place back.
        let mut admission = Admission { state: self.clone(), _connection: None };
        if pool.max_requests.is_some_and(|max| active >= max) {
            return None;
        }
        if let (true, Some(sem)) = (http1, &self.connections) {
            let permit = match sem.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    let max_pending = pool.max_pending.unwrap_or(u32::MAX);
                    if self.pending.fetch_add(1, Ordering::AcqRel) >= max_pending {
                        self.pending.fetch_sub(1, Ordering::AcqRel);
                        return None;
                    }
                    let p = sem.clone().acquire_owned().await;
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                    p.ok()?
                }
            };
            admission._connection = Some(permit);
        }
        Some(admission)
    }

    /// Counts a try's outcome against its endpoint and ejects it when it has
    /// failed too often in a row (never more than `maxEjectionPercent` of the
    /// cluster's `endpoints`, but at least one).
    pub fn report(&self, addr: SocketAddrV4, outcome: Outcome, endpoints: usize) {
        let Some(od) = &self.policy.outlier else { return };
        let Ok(mut hosts) = self.hosts.lock() else { return };
        let now = Instant::now();
        let ejected_now = hosts.values().filter(|h| h.ejected_until.is_some_and(|u| u > now)).count();
        let h = hosts.entry(addr).or_default();
        if h.ejected_until.is_some_and(|u| u <= now) {
            h.ejected_until = None;
        }
        let (is_5xx, is_gateway) = match outcome {
            Outcome::Status(s) => (s >= 500, (502..=504).contains(&s)),
            Outcome::ConnectFailure => (true, true),
            Outcome::NoResponse => (true, false),
        };
        h.consecutive_5xx = if is_5xx { h.consecutive_5xx + 1 } else { 0 };
        h.consecutive_gateway = if is_gateway { h.consecutive_gateway + 1 } else { 0 };
        let tripped = (od.consecutive_5xx > 0 && h.consecutive_5xx >= od.consecutive_5xx)
            || (od.consecutive_gateway > 0 && h.consecutive_gateway >= od.consecutive_gateway);
        let max = match od.max_ejection_percent {
            0 => 0,
            pct => (endpoints * pct as usize / 100).max(1),
        };
        if tripped && h.ejected_until.is_none() && ejected_now < max {
            h.ejections += 1;
            let length = od.base_ejection * h.ejections;
            h.ejected_until = Some(now + length);
            h.consecutive_5xx = 0;
            h.consecutive_gateway = 0;
            tracing::info!(cluster = %self.key, endpoint = %addr, ?length, "outlier detection: endpoint ejected");
        }
    }
}
