//! Bounds on what clients, peers and upstreams can make the agent hold, with
//! defaults after Envoy's and ztunnel's (flags in `mesh-agent run --help`;
//! the table is in docs/limits.md). What a limit refuses is counted in
//! `mesh_limit_refusals_total{listener, reason}`.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::telemetry::{LimitLabels, Metrics};

/// The bounds, set once at start.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections open at once on one listener (capture, 15006, 15008, each gateway port).
    pub max_connections: usize,
    /// Of those, from one client address.
    pub max_connections_per_source: usize,
    /// TLS handshakes in progress at once on one listener (15008, HTTPS gateways).
    pub max_handshakes: usize,
    /// Of those, from one client address: one client cannot take every slot
    /// from the peer agents and the other clients.
    pub max_handshakes_per_source: usize,
    /// Time for a client to finish its TLS handshake.
    pub handshake_timeout: Duration,
    /// An HTTP/1 request's line and headers (Envoy's `max_request_headers_kb`: 60).
    pub max_request_headers: usize,
    /// Concurrent streams a client's HTTP/2 connection may open (Envoy's advice at an edge: 100).
    pub max_streams: u32,
    /// Bytes the agent buffers for one HTTP/2 stream's client before it stops reading upstream.
    pub h2_send_buffer: usize,
    /// HTTP/2 keep-alive pings on client connections, and how long an answer may take.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// A connection (L4, or HTTP between requests) with no byte either way for
    /// this long is closed (Istio's `idleTimeout` defaults: 1 h).
    pub idle_timeout: Duration,
    /// Time for a peer agent to answer an HBONE CONNECT.
    pub connect_answer_timeout: Duration,
    /// Time to read a request body the agent keeps (for retries or mirroring).
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 65_536,
            max_connections_per_source: 8_192,
            max_handshakes: 512,
            max_handshakes_per_source: 64,
            handshake_timeout: Duration::from_secs(10),
            max_request_headers: 60 * 1024,
            max_streams: 100,
            h2_send_buffer: 256 * 1024,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(3600),
            connect_answer_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// Places of one kind at a listener: so many in all, so many per client address.
struct Slots {
    max: usize,
    max_per_source: usize,
    taken: AtomicUsize,
    by_source: Mutex<HashMap<IpAddr, usize>>,
}

/// Which bound a place was refused by.
enum Full {
    All,
    Source,
}

impl Slots {
    fn new(max: usize, max_per_source: usize) -> Self {
        Slots { max, max_per_source, taken: AtomicUsize::new(0), by_source: Mutex::default() }
    }

    fn take(&self, source: IpAddr) -> Result<(), Full> {
        if self.taken.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.taken.fetch_sub(1, Ordering::AcqRel);
            return Err(Full::All);
        }
        let Ok(mut by_source) = self.by_source.lock() else {
            self.taken.fetch_sub(1, Ordering::AcqRel);
            return Err(Full::All);
        };
        let n = by_source.entry(source).or_default();
        if *n >= self.max_per_source {
            drop(by_source);
            self.taken.fetch_sub(1, Ordering::AcqRel);
            return Err(Full::Source);
        }
        *n += 1;
        Ok(())
    }

    fn give_back(&self, source: IpAddr) {
        if let Ok(mut by_source) = self.by_source.lock()
            && let Some(n) = by_source.get_mut(&source)
        {
            *n -= 1;
            if *n == 0 {
                by_source.remove(&source);
            }
        }
        self.taken.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One listener's admission: connections open, and TLS handshakes in
/// progress, in all and per client address.
pub struct Gate {
    listener: &'static str,
    connections: Slots,
    handshakes: Slots,
}

/// A TLS handshake's place; dropping it gives the place back.
pub struct Handshake {
    gate: Arc<Gate>,
    source: IpAddr,
}

/// A connection's place at its listener; dropping it gives the place back.
pub struct Ticket {
    gate: Arc<Gate>,
    source: IpAddr,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    ListenerFull,
    SourceFull,
    HandshakesFull,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::ListenerFull => "listener_full",
            Refusal::SourceFull => "source_full",
            Refusal::HandshakesFull => "handshakes_full",
        }
    }
}

impl Gate {
    pub fn new(listener: &'static str, limits: &Limits) -> Arc<Gate> {
        Arc::new(Gate {
            listener,
            connections: Slots::new(limits.max_connections, limits.max_connections_per_source),
            handshakes: Slots::new(limits.max_handshakes, limits.max_handshakes_per_source),
        })
    }

    fn count(&self, refusal: Refusal, metrics: &Metrics) -> Refusal {
        metrics.limit_refusals.get_or_create(&LimitLabels { listener: self.listener, reason: refusal.reason() }).inc();
        refusal
    }

    /// A place for a connection from `source`, or why there is none (counted).
    pub fn admit(self: &Arc<Self>, source: IpAddr, metrics: &Metrics) -> Result<Ticket, Refusal> {
        match self.connections.take(source) {
            Ok(()) => Ok(Ticket { gate: self.clone(), source }),
            Err(Full::All) => Err(self.count(Refusal::ListenerFull, metrics)),
            Err(Full::Source) => Err(self.count(Refusal::SourceFull, metrics)),
        }
    }

    /// A place for one TLS handshake from `source`, or `None` when as many
    /// are in progress as allowed, in all or from that address (counted).
    pub fn handshake(self: &Arc<Self>, source: IpAddr, metrics: &Metrics) -> Option<Handshake> {
        match self.handshakes.take(source) {
            Ok(()) => Some(Handshake { gate: self.clone(), source }),
            Err(_) => {
                self.count(Refusal::HandshakesFull, metrics);
                None
            }
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.connections.taken.load(Ordering::Acquire)
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.gate.handshakes.give_back(self.source);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.connections.give_back(self.source);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::{Gate, Limits, Refusal};
    use crate::telemetry::Metrics;

    #[test]
    fn a_listener_admits_up_to_its_limits_and_takes_places_back() {
        let metrics = Metrics::new();
        let limits = Limits { max_connections: 3, max_connections_per_source: 2, ..Limits::default() };
        let gate = Gate::new("test", &limits);
        let (a, b) = (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        let first = gate.admit(a, &metrics).expect("a's first");
        let _second = gate.admit(a, &metrics).expect("a's second");
        assert_eq!(gate.admit(a, &metrics).err(), Some(Refusal::SourceFull));
        let _third = gate.admit(b, &metrics).expect("b's first");
        assert_eq!(gate.admit(b, &metrics).err(), Some(Refusal::ListenerFull));
        drop(first);
        assert!(gate.admit(b, &metrics).is_ok(), "a place came back");
        let text = metrics.encode();
        assert!(text.contains("mesh_limit_refusals_total{listener=\"test\",reason=\"source_full\"} 1"), "{text}");
        assert!(text.contains("mesh_limit_refusals_total{listener=\"test\",reason=\"listener_full\"} 1"), "{text}");
    }
}
