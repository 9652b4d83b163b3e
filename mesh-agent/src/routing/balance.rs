//! Load balancing, as pure functions: which of a destination's weighted
//! routes a request takes, which pick a DestinationRule's `loadBalancer` makes
//! for it (round robin, random, LEAST_REQUEST, consistent hashing), and which
//! eligible endpoint that pick lands on. The turns and random numbers come from
//! the data path's per-worker picker.
use std::net::SocketAddrV4;

use super::request::RequestView;
use crate::state::traffic::{HashKey, LoadBalancer, WeightedDestination};

/// How an endpoint is chosen among the eligible ones.
#[derive(Clone, Copy)]
pub enum Pick<'a> {
    /// The n-th (round robin, or a random number).
    Turn(usize),
    /// Envoy's LEAST_REQUEST: the less loaded of two random candidates.
    LeastRequest { random: u64, active: &'a dyn Fn(SocketAddrV4) -> u32 },
    /// Consistent hashing of a key (rendezvous hashing: when endpoints come
    /// and go, only the keys of those endpoints move).
    Hash(u64),
}

/// Mixes two numbers into one well-spread hash (splitmix64's finalizer).
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The index among `n` eligible endpoints (their addresses, in order, from
/// `eligible`) that `pick` lands on.
pub fn index<I: Iterator<Item = SocketAddrV4>>(pick: Pick<'_>, n: usize, eligible: impl Fn() -> I) -> usize {
    match pick {
        Pick::Turn(t) => t % n,
        Pick::LeastRequest { random, active } => {
            let (a, b) = ((random % n as u64) as usize, ((random >> 32) % n as u64) as usize);
            let load = |i| eligible().nth(i).map_or(u32::MAX, active);
            if load(b) < load(a) { b } else { a }
        }
        Pick::Hash(key) => eligible()
            .enumerate()
            .max_by_key(|(_, a)| mix(key, u64::from(u32::from(*a.ip())) << 16 | u64::from(a.port())))
            .map_or(0, |(i, _)| i),
    }
}

/// The endpoint choice a load-balancing policy makes for a request.
pub fn choose_endpoint<'a>(
    lb: &LoadBalancer,
    req: &RequestView<'_>,
    pick: usize,
    random: u64,
    active: &'a dyn Fn(SocketAddrV4) -> u32,
) -> Pick<'a> {
    let hash =
        |s: &str| s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    match lb {
        LoadBalancer::RoundRobin => Pick::Turn(pick),
        LoadBalancer::Random => Pick::Turn((random >> 16) as usize),
        LoadBalancer::LeastRequest => Pick::LeastRequest { random, active },
        LoadBalancer::ConsistentHash(key) => {
            let value = match key {
                HashKey::Header(h) => req.headers.get(h.as_str()).and_then(|v| v.to_str().ok()).map(hash),
                HashKey::QueryParameter(q) => req.path.split_once('?').and_then(|(_, qs)| {
                    qs.split('&').find_map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        (k == q).then(|| hash(v))
                    })
                }),
                HashKey::SourceIp => Some(u64::from(u32::from(req.client))),
            };
            // Without a key, Envoy picks at random.
            value.map_or(Pick::Turn((random >> 16) as usize), Pick::Hash)
        }
    }
}

/// A destination by weight (`random` spread over the total).
pub fn choose(routes: &[WeightedDestination], random: u64) -> Option<&WeightedDestination> {
    let total: u64 = routes.iter().map(|r| u64::from(r.weight)).sum();
    if total == 0 {
        return routes.first();
    }
    let mut x = random % total;
    for r in routes {
        if x < u64::from(r.weight) {
            return Some(r);
        }
        x -= u64::from(r.weight);
    }
    routes.last()
}
