//! What the data path runs on, built by the agent and handed down: the
//! model's current snapshot, metrics, certificates, pools, the connection
//! registry and the capture facts the proxy needs (ztunnel's `ProxyInputs`).
//! The data path never imports the agent; the agent's own status (readiness,
//! capture and gateway status, the last configuration error) stays with it.
use std::{
    collections::HashSet,
    net::Ipv4Addr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

use crate::{identity::CertManager, state::State, telemetry::Metrics};

/// Shared by every connection's task.
pub struct Inputs {
    pub node: String,
    /// Bounds on what clients and peers can make the agent hold.
    pub limits: super::limits::Limits,
    pub connect_timeout: Duration,
    pub protocol_detection_timeout: Duration,
    pub metrics: Metrics,
    pub active: Arc<Active>,
    pub certs: Arc<CertManager>,
    pub hbone: crate::proxy::hbone::TunnelPool,
    pub http_pool: crate::proxy::http::pool::HttpPool,
    /// Connections authorized here, judged again after each reload.
    pub conns: Arc<super::conns::Conns>,
    pub clusters: crate::proxy::http::cluster::Clusters,
    /// TLS settings for the snapshot's TLS originations.
    pub originations: super::outbound::tls::Originations,
    pub access_log: crate::telemetry::access_log::AccessLog,
    /// Key sets fetched from RequestAuthentications' `jwksUri`.
    pub jwks: Arc<crate::identity::jwt::jwks::JwksCache>,
    /// End-user tokens already verified.
    pub jwt_verified: crate::identity::jwt::cache::VerifiedCache,
    /// gRPC channels to external authorizers (CUSTOM).
    pub ext_authz: crate::proxy::inbound::http::ext_authz::Channels,
    /// Span exporters, one per tracing provider.
    pub tracer: crate::telemetry::trace::Tracer,
    /// The gateway pods' ports this agent serves (kept by the agent's
    /// reconcile), looked up before a connection is handed to a pod.
    pub gateways: super::edge::GatewayPorts,
    /// The destination side's way out (to an external authorizer): the
    /// outbound direction's opening of a connection.
    pub(crate) dial: super::upstream::Dial,
    /// Original destinations of captured host clients (when that capture runs).
    pub host_orig: std::sync::OnceLock<crate::capture::host::HostOrig>,
    /// ServiceEntry names and their answers: each new state's DNS endpoints
    /// are handed to it (and filled from what it knows) as the state is set.
    pub dns: Arc<crate::dns::Resolver>,
    /// The DNS proxy, when meshed pods' DNS is captured (TCP queries reach
    /// it through the outbound listener).
    pub dns_proxy: std::sync::OnceLock<Arc<crate::dns::proxy::DnsProxy>>,
    state: Arc<RwLock<Arc<State>>>,
    captured_ips: RwLock<Arc<HashSet<Ipv4Addr>>>,
    /// Local meshed pods behind a last-hop gate.
    gated_ips: RwLock<Arc<HashSet<Ipv4Addr>>>,
}

/// The settings and resources [`Inputs`] is built from.
pub struct Settings {
    pub node: String,
    pub connect_timeout: Duration,
    pub protocol_detection_timeout: Duration,
    pub certs: Arc<CertManager>,
    pub access_log: crate::telemetry::access_log::AccessLog,
    pub state: State,
    pub limits: super::limits::Limits,
    /// Made before the data path (the configuration source counts into it).
    pub metrics: Metrics,
    pub jwks: Arc<crate::identity::jwt::jwks::JwksCache>,
    /// Its loop ([`crate::dns::Resolver::run`]) is the agent's to start.
    pub dns: Arc<crate::dns::Resolver>,
}

impl Inputs {
    pub fn new(s: Settings) -> Self {
        let state = Arc::<RwLock<Arc<State>>>::default();
        let tracer = crate::telemetry::trace::Tracer::new(
            collector_connect(state.clone(), s.connect_timeout),
            s.metrics.trace_spans.clone(),
        );
        let inputs = Inputs {
            gateways: Default::default(),
            node: s.node,
            limits: s.limits,
            connect_timeout: s.connect_timeout,
            protocol_detection_timeout: s.protocol_detection_timeout,
            metrics: s.metrics,
            active: Arc::default(),
            certs: s.certs,
            hbone: crate::proxy::hbone::TunnelPool::default(),
            http_pool: crate::proxy::http::pool::HttpPool::default(),
            conns: Arc::default(),
            clusters: crate::proxy::http::cluster::Clusters::default(),
            originations: Default::default(),
            access_log: s.access_log,
            jwks: s.jwks,
            jwt_verified: Default::default(),
            ext_authz: Default::default(),
            tracer,
            dial: super::outbound::open::dial,
            host_orig: std::sync::OnceLock::new(),
            dns: s.dns,
            dns_proxy: std::sync::OnceLock::new(),
            state,
            captured_ips: RwLock::default(),
            gated_ips: RwLock::default(),
        };
        inputs.set_state(s.state);
        inputs
    }

    pub fn state(&self) -> Arc<State> {
        self.state.read().map(|s| s.clone()).unwrap_or_default()
    }

    pub(crate) fn set_state(&self, state: State) {
        self.originations.rebuild(&state);
        self.dns.attach(&state);
        if let Ok(mut s) = self.state.write() {
            *s = Arc::new(state);
        }
    }

    /// Records which addresses capture covers (see [`Inputs::is_captured`]
    /// and [`Inputs::is_gated`]).
    pub(crate) fn set_captured(&self, captured: HashSet<Ipv4Addr>, gated: HashSet<Ipv4Addr>) {
        if let Ok(mut c) = self.captured_ips.write() {
            *c = Arc::new(captured);
        }
        if let Ok(mut g) = self.gated_ips.write() {
            *g = Arc::new(gated);
        }
    }

    /// Whether replies from `ip` come back through a captured interface.
    pub fn is_captured(&self, ip: Ipv4Addr) -> bool {
        self.captured_ips.read().is_ok_and(|s| s.contains(&ip))
    }

    /// Whether `ip` is a local meshed pod whose veth has the last-hop gate:
    /// packets to it reach the agent's sockets whichever way they arrive.
    pub fn is_gated(&self, ip: Ipv4Addr) -> bool {
        self.gated_ips.read().is_ok_and(|s| s.contains(&ip))
    }

    /// The next round-robin turn, counted per worker thread (as Envoy's
    /// workers do): no cache line shared between workers on every request.
    pub fn next_pick(&self) -> usize {
        PICKER.with(|p| {
            let (turn, seed) = p.get();
            p.set((turn.wrapping_add(1), seed));
            turn
        })
    }

    /// A pseudo-random number (splitmix64 over a per-thread counter seeded
    /// from the OS): for weights and random balancing, not for secrets.
    pub fn next_random(&self) -> u64 {
        PICKER.with(|p| {
            let (turn, seed) = p.get();
            let seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            p.set((turn, seed));
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
    }
}

/// How span exporters reach a provider's collector: an endpoint of its
/// Service, from the agent's own address (uncaptured, in plaintext: the
/// collector's port must accept plaintext from nodes).
fn collector_connect(state: Arc<RwLock<Arc<State>>>, timeout: Duration) -> crate::telemetry::trace::Connect {
    static TURN: AtomicUsize = AtomicUsize::new(0);
    Arc::new(move |p| {
        let current = state.read().map(|s| s.clone()).unwrap_or_default();
        let to = current.provider_endpoint(&p.service, p.port, TURN.fetch_add(1, Ordering::Relaxed));
        Box::pin(async move {
            let Some((addr, _)) = to else {
                return Err(std::io::Error::other("no ready endpoint for the collector's service and port"));
            };
            super::l4::connect(addr, None, timeout).await.map_err(std::io::Error::other)
        })
    })
}

thread_local! {
    /// Each worker's round-robin turn (starting at a random place, so workers
    /// do not move in step) and random state.
    static PICKER: std::cell::Cell<(usize, u64)> = std::cell::Cell::new({
        let seed = u64::from_ne_bytes(crate::identity::random_bytes::<8>().unwrap_or_default());
        (seed as usize >> 1, seed)
    });
}

/// Counts live proxied connections so shutdown can wait for them.
#[derive(Default)]
pub struct Active {
    count: AtomicUsize,
    idle: Notify,
}

impl Active {
    pub fn enter(self: &Arc<Self>) -> ActiveGuardOwned {
        self.count.fetch_add(1, Ordering::AcqRel);
        ActiveGuardOwned(self.clone())
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves when the count next drops to zero.
    pub async fn idle(&self) {
        self.idle.notified().await;
    }
}

/// Decrements the live-connection count when the connection's task ends.
pub struct ActiveGuardOwned(Arc<Active>);

impl Drop for ActiveGuardOwned {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Inputs for in-process tests: a state from YAML, an embedded CA in a
    //! directory of its own (removed on drop), no access log. No root, no eBPF.
    use std::{path::PathBuf, sync::Arc, time::Duration};

    use super::{Inputs, Settings};
    use crate::identity::{CertManager, ca::Ca, manager::CertSource};

    pub(crate) struct TestInputs {
        pub inputs: Arc<Inputs>,
        dir: PathBuf,
    }

    impl TestInputs {
        pub(crate) fn new(yaml: &str) -> Self {
            Self::with_limits(yaml, crate::proxy::limits::Limits::default())
        }

        pub(crate) fn with_limits(yaml: &str, limits: crate::proxy::limits::Limits) -> Self {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("mesh-inputs-{}-{n}", std::process::id()));
            let ca = Arc::new(Ca::load_or_create(&dir, "cluster.local").expect("a CA in a temporary directory"));
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.root_der().clone()).expect("the CA's root");
            let certs = Arc::new(CertManager::new(CertSource::Embedded(ca), roots, Duration::from_secs(3600)));
            let metrics = crate::telemetry::Metrics::new();
            let dns = crate::dns::Resolver::new(
                Arc::new(crate::dns::upstream::Unavailable("no DNS in these tests".into())),
                crate::dns::Settings::default(),
                metrics.dns_resolutions.clone(),
            );
            let inputs = Inputs::new(Settings {
                dns,
                node: "n1".into(),
                connect_timeout: Duration::from_secs(10),
                protocol_detection_timeout: Duration::from_millis(100),
                certs,
                access_log: crate::telemetry::access_log::AccessLog::open("off").expect("no access log"),
                state: crate::config::state_from_yaml(yaml),
                limits,
                metrics,
                jwks: Arc::new(crate::identity::jwt::jwks::JwksCache::new(rustls::RootCertStore::empty)),
            });
            TestInputs { inputs: Arc::new(inputs), dir }
        }
    }

    /// A TCP echo server on 127.0.0.1 that answers a half-close with one; its port.
    pub(crate) async fn echo_server() -> u16 {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        port
    }

    impl Drop for TestInputs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
