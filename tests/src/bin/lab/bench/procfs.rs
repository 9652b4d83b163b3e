//! What the bench reads from `/proc`: CPU time, context switches, resident
//! memory, and a process's children.
use super::*;

/// CPU seconds (user + system) a process has used.
pub(super) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// nginx's master and worker processes, from the pid file under `prefix`.
pub(super) fn nginx_pids(prefix: &Path) -> Vec<u32> {
    let pid_file = prefix.join("nginx.pid");
    let deadline = Instant::now() + Duration::from_secs(5);
    let master = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<u32>().ok()) {
            break pid;
        }
        if Instant::now() > deadline {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let parent = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse::<u32>().ok()
    };
    let mut pids = vec![master];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok())
            && parent(pid) == Some(master)
        {
            pids.push(pid);
        }
    }
    pids
}

/// Context switches (voluntary and not) of every thread of a process.
pub(super) fn context_switches(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return f64::NAN };
    let mut total = 0.0;
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .sum::<f64>();
    }
    total
}

/// Resident memory of a process in MiB.
pub(super) fn rss_mib(pid: u32) -> f64 {
    mesh_tests::agent::rss_mib(pid)
}

/// A `/proc/<pid>/status` size (`RssAnon:`, `RssFile:`) in MiB.
pub(super) fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status.lines().find_map(|l| l.strip_prefix(field)?.split_whitespace().next()?.parse::<f64>().ok());
    kib.map_or(f64::NAN, |k| k / 1024.0)
}

/// The agents' own counts of their machinery, summed over `agents`: heap
/// allocations, runtime workers going to sleep, and the seconds workers
/// were busy, as per-request sample names.
pub(super) fn machinery(agents: &[(u32, &Agent)]) -> [(&'static str, f64); 3] {
    let texts: Vec<String> = agents.iter().map(|(_, a)| a.metrics()).collect();
    let sum = |name: &str| texts.iter().map(|t| mesh_tests::agent::metric(t, name, &[])).sum::<f64>();
    [
        ("agent_allocations_per_request", sum("mesh_memory_allocations_total")),
        ("agent_parks_per_request", sum("mesh_runtime_worker_parks_total")),
        ("agent_busy_us_per_request", sum("mesh_runtime_worker_busy_seconds_total") * 1e6),
    ]
}
