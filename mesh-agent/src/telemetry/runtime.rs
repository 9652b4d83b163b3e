//! What the agent's own machinery costs, for finding where a request's time
//! goes: the heap (every allocation counted by [`CountingAllocator`], the
//! binary's global allocator) and the async runtime (tokio's stable
//! metrics: workers, live tasks, how often a worker went to sleep and how
//! long workers were busy). Read on each scrape; the bench divides their
//! growth over a window by the requests in it.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED: AtomicU64 = AtomicU64::new(0);
static FREED: AtomicU64 = AtomicU64::new(0);

/// The system allocator, counting: one relaxed add per allocation and per
/// free (a few nanoseconds against the tens of microseconds a request
/// costs). `mesh-agent`'s `main.rs` installs it; a program that does not
/// reports zeros.
pub struct CountingAllocator;

// SAFETY: every call is passed to `System` unchanged; the counters do not
// allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        ALLOCATED.fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        ALLOCATED.fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        FREED.fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A reallocation is an allocation of the new size and a free of the old.
        ALLOCATIONS.fetch_add(1, Relaxed);
        ALLOCATED.fetch_add(new_size as u64, Relaxed);
        FREED.fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// The counters' values now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heap {
    pub allocations: u64,
    /// Bytes asked for and not yet freed (the allocator's own overhead aside).
    pub in_use: u64,
}

pub fn heap() -> Heap {
    let (allocated, freed) = (ALLOCATED.load(Relaxed), FREED.load(Relaxed));
    Heap { allocations: ALLOCATIONS.load(Relaxed), in_use: allocated.saturating_sub(freed) }
}

/// Gives the allocator's free pages back to the kernel (glibc's
/// `malloc_trim`, every arena): what a burst freed — start-up's parsing,
/// Kubernetes lists, certificates; a reload's old model — stays resident
/// otherwise, between blocks still in use, where `free` cannot return it.
/// Envoy's overload manager does the same with tcmalloc (`shrink_heap`).
/// It walks the free lists under the arenas' locks: called after start-up
/// and after each reload, never per request. Returns whether anything was
/// released.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: no preconditions; 0 keeps no extra pad at the top.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Reads the heap counters and the runtime the scrape runs on.
#[derive(Debug, Default)]
pub struct RuntimeCollector;

fn counter<N>(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: N) -> std::fmt::Result
where
    ConstCounter<N>: EncodeMetric,
{
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> std::fmt::Result {
    let g = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for RuntimeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let h = heap();
        let e = &mut encoder;
        counter(e, "mesh_memory_allocations", "Heap allocations (and reallocations) made", h.allocations)?;
        gauge(e, "mesh_memory_heap_bytes", "Heap bytes allocated and not yet freed", h.in_use)?;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return Ok(()) };
        let m = runtime.metrics();
        let workers = m.num_workers();
        gauge(e, "mesh_runtime_workers", "Async runtime worker threads", workers as u64)?;
        gauge(
            e,
            "mesh_runtime_tasks",
            "Async tasks alive (connections, streams, timers, watches)",
            m.num_alive_tasks() as u64,
        )?;
        let parks: u64 = (0..workers).map(|w| m.worker_park_count(w)).sum();
        counter(
            e,
            "mesh_runtime_worker_parks",
            "Times a worker found nothing to do and went to sleep (each is then a wakeup)",
            parks,
        )?;
        let busy: f64 = (0..workers).map(|w| m.worker_total_busy_duration(w).as_secs_f64()).sum();
        counter(e, "mesh_runtime_worker_busy_seconds", "Time workers spent running tasks", busy)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_collector_reports_the_runtime_it_is_scraped_on() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().expect("runtime");
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(RuntimeCollector));
        let text = runtime.block_on(async {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &registry).expect("encoded");
            out
        });
        assert!(text.contains("\nmesh_runtime_workers 2\n"), "{text}");
        for name in [
            "mesh_runtime_worker_parks_total ",
            "mesh_runtime_worker_busy_seconds_total ",
            "mesh_memory_allocations_total ",
        ] {
            assert!(text.contains(name), "{name} missing from {text}");
        }
        // Outside a runtime: the heap alone.
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encoded");
        assert!(out.contains("mesh_memory_heap_bytes") && !out.contains("mesh_runtime_workers"), "{out}");
    }

    /// Resident bytes of this process (`/proc/self/statm`).
    fn resident() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
        let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("resident pages");
        pages * 4096
    }

    #[test]
    fn freed_memory_between_blocks_in_use_goes_back_to_the_kernel() {
        // 48 MiB in 64 KiB blocks (under the allocator's mmap threshold, so
        // from an arena), each followed by a 4 000-byte block that stays
        // (too large for the thread caches): freed, the large ones lie
        // between blocks in use, where `free` keeps them resident. Whatever
        // `free` did, they are not resident afterwards.
        let (large, small): (Vec<Vec<u8>>, Vec<Vec<u8>>) =
            (0..768).map(|i| (vec![i as u8; 64 * 1024], vec![1u8; 4000])).unzip();
        let live = resident();
        drop(large);
        release_free_memory();
        let after = resident();
        assert!(live.saturating_sub(after) > 24 << 20, "resident {live} -> {after}: under 24 MiB released");
        assert_eq!(small.len(), 768);
    }

    #[test]
    fn the_allocator_counts_what_it_is_asked_for() {
        let a = CountingAllocator;
        let before = heap();
        let layout = Layout::from_size_align(1000, 8).expect("layout");
        // SAFETY: a valid layout; the block is freed with the size it has.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            let q = a.realloc(p, layout, 3000);
            assert!(!q.is_null());
            a.dealloc(q, Layout::from_size_align(3000, 8).expect("layout"));
        }
        // Other tests' threads allocate through `System`, not this
        // allocator (the test binary does not install it): exact counts.
        let after = heap();
        assert_eq!(after.allocations - before.allocations, 2);
        assert_eq!(after.in_use, before.in_use);
    }
}
