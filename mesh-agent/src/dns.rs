//! DNS for ServiceEntries (`resolution: DNS` and `DNS_ROUND_ROBIN`): each
//! name the configuration asks about is looked up off the control loop, asked
//! again when its answer's TTL runs out (within [`Settings`]' bounds, as
//! Envoy's `respect_dns_ttl` with `dns_min_refresh_rate`), and its last good
//! answer is kept while lookups fail (retried with a doubling delay). Every
//! Service whose endpoints name it is updated as answers arrive. Loading a
//! configuration never waits on DNS: a name already known keeps its answer
//! across a reload, a new one has none until its first answer.
use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::Ipv4Addr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::{sync::Notify, task::JoinSet, time::Instant};

use crate::{
    state::{State, dns::DnsEndpoints},
    telemetry::DnsLabels,
};

pub mod proxy;
pub mod records;
pub mod upstream;

/// How answers are used and lookups bounded.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The shortest time an answer is used before the name is asked again
    /// (Envoy's `dns_min_refresh_rate`, 5 s).
    pub min_ttl: Duration,
    /// The longest: an answer with a longer TTL is still checked this often.
    pub max_ttl: Duration,
    /// The longest wait between two tries of a failing name (Istio's
    /// `dnsRefreshRate`, 60 s); the first retry comes after `min_ttl`.
    pub max_retry: Duration,
    /// How long one lookup may take.
    pub timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(300),
            max_retry: Duration::from_secs(60),
            timeout: Duration::from_secs(5),
        }
    }
}

impl Settings {
    /// How long an answer with `ttl` is used: its TTL within the bounds.
    fn hold(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.min_ttl, self.max_ttl.max(self.min_ttl))
    }
}

/// A name's IPv4 addresses and how long they may be used.
#[derive(Debug, Clone)]
pub struct Answer {
    pub addrs: Vec<Ipv4Addr>,
    pub ttl: Duration,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error("the name has no IPv4 address")]
    NoRecords,
    #[error("no answer in time")]
    Timeout,
    #[error("{0}")]
    Other(String),
}

impl LookupError {
    fn result(&self) -> &'static str {
        match self {
            LookupError::NoRecords => "no_records",
            LookupError::Timeout => "timeout",
            LookupError::Other(_) => "error",
        }
    }
}

/// Future of one lookup.
pub type LookupFuture<'a> = Pin<Box<dyn Future<Output = Result<Answer, LookupError>> + Send + 'a>>;

/// What answers questions: the node's resolvers ([`upstream::Upstream`]),
/// or a table in tests.
pub trait Lookup: Send + Sync + 'static {
    /// The IPv4 addresses of the fully qualified `name`.
    fn lookup<'a>(&'a self, name: &'a str) -> LookupFuture<'a>;
}

/// At most this many lookups at once.
const CONCURRENT: usize = 16;
/// At most this many names asked about by requests (`DYNAMIC_DNS`) are kept.
const ON_DEMAND: usize = 1024;

/// The names the configuration asks about, their answers, and the Services
/// that use them.
pub struct Resolver {
    table: Mutex<Table>,
    /// Names requests asked about (`DYNAMIC_DNS`): the last good answer and
    /// until when it is used.
    demand: Mutex<HashMap<Arc<str>, Held>>,
    wake: Notify,
    lookup: Arc<dyn Lookup>,
    settings: Settings,
    counters: Family<DnsLabels, Counter>,
}

#[derive(Default)]
struct Table {
    names: HashMap<Arc<str>, Name>,
    services: Vec<Arc<DnsEndpoints>>,
}

struct Name {
    /// The last good answer.
    addrs: Option<Arc<[Ipv4Addr]>>,
    /// When to ask again.
    due: Instant,
    /// Lookups failed in a row.
    failures: u32,
    asking: bool,
}

/// An answer and until when it is used.
type Held = (Arc<[Ipv4Addr]>, Instant);

type Lookups = JoinSet<(Arc<str>, Result<Answer, LookupError>)>;

impl Resolver {
    pub fn new(lookup: Arc<dyn Lookup>, settings: Settings, counters: Family<DnsLabels, Counter>) -> Arc<Self> {
        Arc::new(Resolver {
            table: Mutex::default(),
            demand: Mutex::default(),
            wake: Notify::new(),
            lookup,
            settings,
            counters,
        })
    }

    /// Takes over the DNS endpoints of `state` (about to be applied): fills
    /// them from the answers held now, forgets names no longer asked about,
    /// and has new names asked at once. Never waits for DNS.
    pub fn attach(&self, state: &State) {
        let services: Vec<Arc<DnsEndpoints>> = state.dns_services().iter().filter_map(|s| s.dns.clone()).collect();
        let wanted: HashSet<Arc<str>> = services.iter().flat_map(|d| d.names.iter().map(|(n, _)| n.clone())).collect();
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let Table { names, services: held } = &mut *table;
        names.retain(|n, _| wanted.contains(n));
        let now = Instant::now();
        let mut new = false;
        for n in wanted {
            names.entry(n).or_insert_with(|| {
                new = true;
                Name { addrs: None, due: now, failures: 0, asking: false }
            });
        }
        for d in &services {
            d.update(&|n| names.get(n).and_then(|x| x.addrs.clone()));
        }
        *held = services;
        drop(table);
        if new {
            self.wake.notify_one();
        }
    }

    /// The last good addresses of `name`, if it is asked about.
    pub fn addresses(&self, name: &str) -> Option<Arc<[Ipv4Addr]>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner).names.get(name)?.addrs.clone()
    }

    /// The addresses of `name`, a host a request names (`DYNAMIC_DNS`):
    /// the answer held while its TTL (bounded as above) lasts, else asked
    /// now (within the timeout); when asking fails, the last good answer.
    /// Counted under `entry` (the entry's wildcard host: the names requests
    /// pick do not become metric labels).
    pub async fn resolve_now(&self, name: &str, entry: &str) -> Result<Arc<[Ipv4Addr]>, LookupError> {
        let now = Instant::now();
        let held = self.demand.lock().unwrap_or_else(PoisonError::into_inner).get(name).cloned();
        if let Some((addrs, until)) = &held
            && *until > now
        {
            return Ok(addrs.clone());
        }
        let s = &self.settings;
        let asked = tokio::time::timeout(s.timeout, self.lookup.lookup(name)).await;
        let result = asked
            .unwrap_or(Err(LookupError::Timeout))
            .and_then(|a| if a.addrs.is_empty() { Err(LookupError::NoRecords) } else { Ok(a) });
        let label = match &result {
            Ok(_) => "changed",
            Err(e) => e.result(),
        };
        self.counters.get_or_create(&DnsLabels { host: entry.to_owned(), result: label }).inc();
        match result {
            Ok(answer) => {
                let mut addrs = answer.addrs;
                dedup_keeping_order(&mut addrs);
                let addrs: Arc<[Ipv4Addr]> = addrs.into();
                let until = Instant::now() + s.hold(answer.ttl);
                let mut demand = self.demand.lock().unwrap_or_else(PoisonError::into_inner);
                if demand.len() >= ON_DEMAND {
                    demand.retain(|_, (_, u)| *u > now);
                    if demand.len() >= ON_DEMAND {
                        demand.clear();
                    }
                }
                demand.insert(name.into(), (addrs.clone(), until));
                Ok(addrs)
            }
            Err(e) => held.map(|(addrs, _)| addrs).ok_or(e),
        }
    }

    /// Asks about each name when it is due, for as long as the agent runs.
    pub async fn run(self: Arc<Self>) {
        let mut asking = Lookups::new();
        loop {
            let next = self.start_due(&mut asking);
            tokio::select! {
                Some(done) = asking.join_next(), if !asking.is_empty() => {
                    if let Ok((name, result)) = done {
                        self.answered(&name, result);
                    }
                }
                () = tokio::time::sleep_until(next) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// Starts the lookups that are due (up to [`CONCURRENT`] at once);
    /// when the next one is.
    fn start_due(&self, asking: &mut Lookups) -> Instant {
        let now = Instant::now();
        let mut next = now + Duration::from_secs(3600);
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        for (name, n) in table.names.iter_mut().filter(|(_, n)| !n.asking) {
            if n.due > now {
                next = next.min(n.due);
            } else if asking.len() < CONCURRENT {
                n.asking = true;
                let (lookup, name, timeout) = (self.lookup.clone(), name.clone(), self.settings.timeout);
                asking.spawn(async move {
                    let result = tokio::time::timeout(timeout, lookup.lookup(&name)).await;
                    (name, result.unwrap_or(Err(LookupError::Timeout)))
                });
            }
            // Else due, but as many lookups as allowed are out: the next to
            // finish wakes the loop.
        }
        next
    }

    /// Records an answer (or a failure), and updates the Services that use
    /// the name when its addresses changed.
    fn answered(&self, name: &Arc<str>, result: Result<Answer, LookupError>) {
        let now = Instant::now();
        let s = &self.settings;
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let Table { names, services } = &mut *table;
        // A name the configuration dropped meanwhile is forgotten.
        let Some(n) = names.get_mut(name) else { return };
        n.asking = false;
        let result = result.and_then(|a| if a.addrs.is_empty() { Err(LookupError::NoRecords) } else { Ok(a) });
        let (label, changed) = match result {
            Ok(answer) => {
                n.failures = 0;
                n.due = now + s.hold(answer.ttl);
                let mut addrs = answer.addrs;
                dedup_keeping_order(&mut addrs);
                // The same addresses in another order are the same answer
                // (a server that rotates them does not churn the endpoints).
                let same = n.addrs.as_ref().is_some_and(|old| same_set(old, &addrs));
                if !same {
                    n.addrs = Some(addrs.into());
                }
                (if same { "unchanged" } else { "changed" }, !same)
            }
            Err(e) => {
                n.failures = n.failures.saturating_add(1);
                let delay = s.min_ttl.saturating_mul(1 << (n.failures - 1).min(16)).min(s.max_retry.max(s.min_ttl));
                n.due = now + delay;
                let kept = n.addrs.as_ref().map_or(0, |a| a.len());
                if n.failures == 1 {
                    tracing::warn!(host = %name, error = %e, kept, retry_in = ?delay, "DNS lookup failed; the last good answer is kept");
                } else {
                    tracing::debug!(host = %name, error = %e, failures = n.failures, retry_in = ?delay, "DNS lookup failed again");
                }
                (e.result(), false)
            }
        };
        self.counters.get_or_create(&DnsLabels { host: name.to_string(), result: label }).inc();
        if changed {
            tracing::info!(host = %name, addresses = ?names.get(name).and_then(|n| n.addrs.clone()), "DNS answer changed");
            for d in services.iter().filter(|d| d.names.iter().any(|(x, _)| x == name)) {
                d.update(&|x| names.get(x).and_then(|n| n.addrs.clone()));
            }
        }
    }
}

fn dedup_keeping_order(addrs: &mut Vec<Ipv4Addr>) {
    let mut seen = HashSet::new();
    addrs.retain(|a| seen.insert(*a));
}

fn same_set(a: &[Ipv4Addr], b: &[Ipv4Addr]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.contains(x))
}

#[cfg(test)]
mod tests;
