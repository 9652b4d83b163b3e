//! The DNS proxy, as ztunnel's: meshed pods' queries to port 53 (UDP
//! assigned by the eBPF classifier to [`udp`]'s socket, TCP taken by the
//! outbound listener) are answered here for the names the mesh knows
//! ([`super::records`]: Services, ServiceEntry hosts with their listed or
//! allocated addresses, as the pod's namespace sees them), and forwarded to
//! the node's resolvers otherwise, their answers cached by TTL. Bounded: a
//! rate per pod, the cache's size, the upstream timeout; a malformed query
//! gets FORMERR, never a crash.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use hickory_resolver::proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{RData, Record, RecordType, rdata::A},
};
use prometheus_client::metrics::{counter::Counter, family::Family};

use crate::{
    state::State,
    telemetry::{DnsRequestLabels, ReasonLabels},
};

pub mod tcp;
pub mod udp;

/// TTL of the mesh's own answers (ztunnel's).
const LOCAL_TTL: u32 = 30;
/// The longest a forwarded answer is cached, whatever its TTL.
const MAX_CACHE_TTL: Duration = Duration::from_secs(300);
/// Clients remembered for their rate; beyond, idle ones are forgotten.
const MAX_CLIENTS: usize = 16_384;

/// The proxy's bounds.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Time for the node's resolvers to answer a forwarded query (each tried in turn).
    pub upstream_timeout: Duration,
    /// Queries a second from one pod (a burst of as many is allowed); more are dropped.
    pub max_qps_per_pod: u32,
    /// Forwarded answers kept at most.
    pub cache_entries: usize,
}

/// What the proxy counts (ztunnel's `istio_dns_*`, and refusals).
#[derive(Clone, Default)]
pub struct ProxyMetrics {
    pub requests: Family<DnsRequestLabels, Counter>,
    pub upstream_requests: Counter,
    pub upstream_failures: Counter,
    pub refusals: Family<ReasonLabels, Counter>,
}

/// A forwarded answer, when it was stored, and until when it is used.
type Cached = (Message, Instant, Instant);

type Snapshot = Box<dyn Fn() -> Arc<State> + Send + Sync>;

pub struct DnsProxy {
    state: Snapshot,
    upstreams: Vec<SocketAddr>,
    settings: ProxySettings,
    metrics: ProxyMetrics,
    cache: Mutex<HashMap<(String, u16), Cached>>,
    buckets: Mutex<HashMap<Ipv4Addr, (f64, Instant)>>,
}

impl DnsProxy {
    /// A proxy answering from `state()` (read per query) and forwarding to `upstreams`.
    pub fn new(state: Snapshot, upstreams: Vec<SocketAddr>, settings: ProxySettings, metrics: ProxyMetrics) -> Self {
        DnsProxy { state, upstreams, settings, metrics, cache: Mutex::default(), buckets: Mutex::default() }
    }

    /// The answer to `query` from the pod at `client`, or `None` (dropped:
    /// over its rate, not a query, or no upstream answered). `tcp`: the
    /// client can take an answer of any size.
    pub async fn answer(&self, client: Ipv4Addr, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        if !self.admit(client) {
            self.refuse("rate_limited");
            return None;
        }
        let state = (self.state)();
        let source = state.workload_by_ip(client);
        let labels = DnsRequestLabels {
            source_workload: source.map_or_else(|| "unknown".into(), |w| w.workload_name.to_string()),
            source_workload_namespace: source.map_or_else(|| "unknown".into(), |w| w.namespace.to_string()),
        };
        let msg = match local(&state, client, query) {
            Local::Answer(answer) => {
                self.metrics.requests.get_or_create(&labels).inc();
                return Some(answer);
            }
            Local::Malformed(answer) => {
                self.refuse("malformed");
                return answer;
            }
            Local::Ignore => return None,
            Local::Forward(msg) => msg,
        };
        self.metrics.requests.get_or_create(&labels).inc();
        drop(state);
        self.forward(&msg, query, tcp).await
    }

    fn refuse(&self, reason: &'static str) {
        self.metrics.refusals.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// A token from `client`'s bucket (`max_qps_per_pod` a second, as many at once).
    fn admit(&self, client: Ipv4Addr) -> bool {
        let now = Instant::now();
        let rate = f64::from(self.settings.max_qps_per_pod);
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_CLIENTS && !buckets.contains_key(&client) {
            buckets.retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(10));
        }
        let (tokens, at) = buckets.entry(client).or_insert((rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The cached answer, else the node's resolvers' (cached when it has
    /// records, for their shortest TTL).
    async fn forward(&self, msg: &Message, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let key = msg.queries.first().map(|q| (q.name().to_lowercase().to_ascii(), u16::from(q.query_type())));
        if let Some(key) = &key
            && let Some(hit) = self.cached(key, msg.metadata.id)
        {
            return Some(hit);
        }
        let reply = self.ask_upstreams(query, msg.metadata.id, tcp).await?;
        if let (Some(key), Ok(parsed)) = (key, Message::from_vec(&reply)) {
            self.keep(key, parsed);
        }
        Some(reply)
    }

    fn cached(&self, key: &(String, u16), id: u16) -> Option<Vec<u8>> {
        let now = Instant::now();
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let (message, stored, _) = cache.get(key).filter(|(_, _, until)| *until > now)?;
        let mut m = message.clone();
        m.metadata.id = id;
        // The TTLs left, as a resolver's cache gives them.
        let gone = u32::try_from(now.duration_since(*stored).as_secs()).unwrap_or(u32::MAX);
        for r in m.answers.iter_mut() {
            r.ttl = r.ttl.saturating_sub(gone);
        }
        m.to_vec().ok()
    }

    fn keep(&self, key: (String, u16), reply: Message) {
        if reply.metadata.response_code != ResponseCode::NoError
            || reply.answers.is_empty()
            || reply.metadata.truncation
        {
            return;
        }
        let ttl = reply.answers.iter().map(|r| r.ttl).min().unwrap_or(0);
        let ttl = Duration::from_secs(u64::from(ttl)).min(MAX_CACHE_TTL);
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= self.settings.cache_entries {
            cache.retain(|_, (_, _, until)| *until > now);
            if cache.len() >= self.settings.cache_entries {
                return;
            }
        }
        cache.insert(key, (reply, now, now + ttl));
    }

    /// Each of the node's resolvers in turn, over UDP (over TCP for a TCP
    /// client whose answer came back truncated).
    async fn ask_upstreams(&self, query: &[u8], id: u16, tcp: bool) -> Option<Vec<u8>> {
        for upstream in &self.upstreams {
            self.metrics.upstream_requests.inc();
            let asked = tokio::time::timeout(self.settings.upstream_timeout, async {
                let reply = udp::ask(*upstream, query, id).await?;
                match tcp && truncated(&reply) {
                    true => tcp::ask(*upstream, query, id).await,
                    false => Ok(reply),
                }
            })
            .await;
            match asked {
                Ok(Ok(reply)) => return Some(reply),
                Ok(Err(e)) => tracing::debug!(%upstream, error = %e, "DNS upstream failed"),
                Err(_) => tracing::debug!(%upstream, "DNS upstream did not answer in time"),
            }
            self.metrics.upstream_failures.inc();
        }
        None
    }
}

/// What the mesh makes of a query on its own.
pub enum Local {
    /// The mesh's answer.
    Answer(Vec<u8>),
    /// Not the mesh's name (or not a plain question): for the node's resolvers.
    Forward(Box<Message>),
    /// Unreadable: FORMERR when it has an ID to answer.
    Malformed(Option<Vec<u8>>),
    /// Not a query (an answer sent to the proxy): no reply.
    Ignore,
}

/// Reads `query` from the pod at `client` and answers it when the name is
/// the mesh's (the fuzzed entry point: any bytes, never a panic).
pub fn local(state: &State, client: Ipv4Addr, query: &[u8]) -> Local {
    let msg = match Message::from_vec(query) {
        Ok(m) if m.metadata.message_type == MessageType::Query => m,
        Ok(_) => return Local::Ignore,
        Err(_) => return Local::Malformed(format_error(query)),
    };
    if msg.metadata.op_code == OpCode::Query
        && let [q] = msg.queries.as_slice()
    {
        let namespace = state.workload_by_ip(client).map(|w| &*w.namespace);
        if let Some(addrs) = super::records::local_answer(state, namespace, &q.name().to_ascii())
            && let Ok(answer) = local_reply(&msg, &addrs).to_vec()
        {
            return Local::Answer(answer);
        }
    }
    Local::Forward(Box::new(msg))
}

/// The TC bit of a DNS message's header.
fn truncated(reply: &[u8]) -> bool {
    reply.get(2).is_some_and(|b| b & 0x02 != 0)
}

/// The mesh's answer: `addrs` for an `A` question, no record for any other
/// type of a name the mesh knows (IPv6 is not carried).
fn local_reply(query: &Message, addrs: &[Ipv4Addr]) -> Message {
    let mut m = Message::response(query.metadata.id, OpCode::Query);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.authoritative = true;
    if let Some(q) = query.queries.first() {
        m.add_query(q.clone());
        if q.query_type() == RecordType::A {
            for ip in addrs {
                m.add_answer(Record::from_rdata(q.name().clone(), LOCAL_TTL, RData::A(A(*ip))));
            }
        }
    }
    m
}

/// FORMERR for a query that could not be read, when it has an ID to answer.
fn format_error(query: &[u8]) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec().ok()
}

#[cfg(test)]
mod tests;
