//! The table of medians and ratios to direct, and `target/bench/latest.json`.
use super::*;

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Agent memory: idle, and per idle proxied connection (both agents, cross-node).
pub(super) struct Idle {
    pub(super) rss_mib: f64,
    /// Of which anonymous (heap, stacks, relocated data): the agent's own.
    pub(super) anon_mib: f64,
    /// The heap bytes the agent's allocator counts as in use.
    pub(super) heap_mib: f64,
    pub(super) kib_per_connection: f64,
    pub(super) source_kib: f64,
    pub(super) destination_kib: f64,
    pub(super) connections: usize,
}

/// The table, and `target/bench/latest.json`.
pub(super) fn report(results: &Results, idle: &Idle, quick: bool, took: Duration) -> anyhow::Result<()> {
    let med = |path: &str, scenario: &str, key: &str| {
        let samples = results.get(path).and_then(|s| s.get(scenario)).map(Vec::as_slice).unwrap_or(&[]);
        median(samples.iter().filter_map(|s| s.get(key).copied()).collect())
    };
    let rows: [(&str, &str, &str, bool); 49] = [
        ("tcp_1_stream", "gbit_per_s", "Gbit/s", true),
        ("tcp_8_streams", "gbit_per_s", "Gbit/s", true),
        ("tcp_rr_1000mps", "p50_us", "µs p50", false),
        ("tcp_rr_1000mps", "p99_us", "µs p99", false),
        ("http1_1000rps", "p50_ms", "ms p50", false),
        ("http1_1000rps", "p90_ms", "ms p90", false),
        ("http1_1000rps", "p99_ms", "ms p99", false),
        ("http1_1000rps", "p99.9_ms", "ms p99.9", false),
        ("http1_1000rps_jwt", "p50_ms", "ms p50", false),
        ("http1_1000rps_jwt", "p99_ms", "ms p99", false),
        ("http1_saturation", "rps", "req/s", true),
        ("http2_1000rps", "p50_ms", "ms p50", false),
        ("http2_1000rps", "p90_ms", "ms p90", false),
        ("http2_1000rps", "p99_ms", "ms p99", false),
        ("http2_saturation", "rps", "req/s", true),
        ("new_connections", "rps", "conn/s", true),
        ("grpc_unary", "rps", "req/s", true),
        ("grpc_unary", "mean_ms", "ms mean", false),
        ("grpc_streaming", "rps", "msg/s", true),
        ("grpc_streaming", "p50_us", "µs p50", false),
        ("grpc_streaming", "p99_us", "µs p99", false),
        ("grpc_streaming", "agent_vcpu_per_1000rps", "vCPU/1k msg", false),
        ("http1_saturation", "non_200", "errors", false),
        ("http1_1000rps", "agent_vcpu_per_1000rps", "vCPU/1k rps", false),
        ("http1_1000rps_jwt", "agent_vcpu_per_1000rps", "vCPU/1k rps", false),
        ("http1_1000rps_l4dest", "p50_ms", "ms p50", false),
        ("http1_1000rps_l4dest", "agent_vcpu_per_1000rps", "vCPU/1k rps", false),
        ("http1_1000rps_trace1", "p50_ms", "ms p50", false),
        ("http1_1000rps_trace1", "agent_vcpu_per_1000rps", "vCPU/1k rps", false),
        ("http1_1000rps_trace100", "p50_ms", "ms p50", false),
        ("http1_1000rps_trace100", "agent_vcpu_per_1000rps", "vCPU/1k rps", false),
        ("http1_1000rps_jwt", "non_200", "errors", false),
        ("http2_1000rps", "agent_vcpu_per_1000rps", "vCPU/1k rps", false),
        ("http1_1000rps", "server_vcpu_per_1000rps", "nginx vCPU/1k", false),
        ("http2_1000rps", "server_vcpu_per_1000rps", "nginx vCPU/1k", false),
        ("http1_1000rps", "agent_switches_per_request", "switches/req", false),
        ("http2_1000rps", "agent_switches_per_request", "switches/req", false),
        ("http1_1000rps", "agent_parks_per_request", "parks/req", false),
        ("http1_1000rps", "agent_allocations_per_request", "allocs/req", false),
        ("http1_1000rps", "agent_busy_us_per_request", "busy µs/req", false),
        ("http1_saturation", "agent_allocations_per_request", "allocs/req", false),
        ("http2_1000rps", "agent_allocations_per_request", "allocs/req", false),
        ("grpc_unary", "failed", "failed", false),
        ("dns_1000qps", "p50_us", "µs p50", false),
        ("dns_1000qps", "p99_us", "µs p99", false),
        ("dns_1000qps", "agent_vcpu_per_1000rps", "vCPU/1k q", false),
        ("dns_1000qps_mesh", "p50_us", "µs p50", false),
        ("dns_1000qps_mesh", "p99_us", "µs p99", false),
        ("dns_1000qps_mesh", "agent_vcpu_per_1000rps", "vCPU/1k q", false),
    ];
    println!(
        "\n{:<18} {:<12} {:>10} {:>10} {:>8} {:>10} {:>10} {:>8}",
        "scenario", "unit", "direct", "same-node", "ratio", "direct", "cross-node", "ratio"
    );
    println!("{:<31} {:>29} {:>30}", "", "(node-1 → node-1)", "(node-1 → node-2)");
    let mut table = Vec::new();
    for (scenario, key, unit, higher_better) in rows {
        let d1 = med("direct_same_node", scenario, key);
        let m1 = med("mesh_same_node", scenario, key);
        let d2 = med("direct_cross_node", scenario, key);
        let m2 = med("mesh_cross_node", scenario, key);
        if [d1, m1, d2, m2].iter().all(|v| v.is_nan()) {
            continue; // not run (`--only`)
        }
        // Throughputs as a ratio to direct; latencies as the time added.
        let cmp = |d: f64, m: f64| if higher_better { format!("{:.2}x", m / d) } else { format!("{:+.3}", m - d) };
        println!(
            "{scenario:<18} {unit:<12} {d1:>10.3} {m1:>10.3} {:>8} {d2:>10.3} {m2:>10.3} {:>8}",
            cmp(d1, m1),
            cmp(d2, m2)
        );
        table.push(serde_json::json!({
            "scenario": scenario, "metric": key, "unit": unit,
            "direct_same_node": d1, "mesh_same_node": m1,
            "direct_cross_node": d2, "mesh_cross_node": m2,
        }));
    }
    // An agent's CPU per request against nginx's (one socket in, one out) in
    // the direct run: the ratio travels between machines better than vCPU does.
    for scenario in ["http1_1000rps", "http2_1000rps"] {
        let nginx = |path| med(path, scenario, "server_vcpu_per_1000rps");
        let agent = |path| med(path, scenario, "agent_vcpu_per_1000rps");
        let (same, cross) = (
            agent("mesh_same_node") / nginx("direct_same_node"),
            agent("mesh_cross_node") / nginx("direct_cross_node"),
        );
        if same.is_finite() || cross.is_finite() {
            println!("{scenario}: CPU per request, each agent / nginx: same-node {same:.1}x, cross-node {cross:.1}x");
        }
    }
    // Request policy at the destination (HTTP parsed there, a JWT checked,
    // the policy judged): its cost over the same requests without it.
    let cost = |path: &str, key: &str| med(path, "http1_1000rps_jwt", key) - med(path, "http1_1000rps", key);
    if cost("mesh_cross_node", "agent_vcpu_per_1000rps").is_finite() {
        println!(
            "request policy at the destination (JWT ES256 + L7 ALLOW), over http1_1000rps: \
             same-node {:+.3} vCPU/1k rps {:+.3} ms p50, cross-node {:+.3} vCPU/1k rps (per agent) {:+.3} ms p50",
            cost("mesh_same_node", "agent_vcpu_per_1000rps"),
            cost("mesh_same_node", "p50_ms"),
            cost("mesh_cross_node", "agent_vcpu_per_1000rps"),
            cost("mesh_cross_node", "p50_ms"),
        );
    }
    // Both reporters: the destination parsing and counting each request,
    // over the same requests to a server whose Telemetry turns that off.
    let parsed = |path: &str, key: &str| med(path, "http1_1000rps", key) - med(path, "http1_1000rps_l4dest", key);
    if parsed("mesh_cross_node", "agent_vcpu_per_1000rps").is_finite() {
        println!(
            "reporting at the destination (HTTP parsed, requests counted), over http1_1000rps_l4dest: \
             same-node {:+.3} vCPU/1k rps {:+.3} ms p50, cross-node {:+.3} vCPU/1k rps (per agent) {:+.3} ms p50",
            parsed("mesh_same_node", "agent_vcpu_per_1000rps"),
            parsed("mesh_same_node", "p50_ms"),
            parsed("mesh_cross_node", "agent_vcpu_per_1000rps"),
            parsed("mesh_cross_node", "p50_ms"),
        );
    }
    // Tracing at Istio's 1 % and at 100 %, over the same requests untraced.
    for (scenario, rate) in [("http1_1000rps_trace1", "1 %"), ("http1_1000rps_trace100", "100 %")] {
        let traced = |path: &str, key: &str| med(path, scenario, key) - med(path, "http1_1000rps", key);
        let relative =
            |path: &str| traced(path, "agent_vcpu_per_1000rps") / med(path, "http1_1000rps", "agent_vcpu_per_1000rps");
        if traced("mesh_cross_node", "agent_vcpu_per_1000rps").is_finite() {
            println!(
                "tracing at {rate}, over http1_1000rps: same-node {:+.3} vCPU/1k rps ({:+.0} %) {:+.3} ms p50, \
                 cross-node {:+.3} vCPU/1k rps (per agent, {:+.0} %) {:+.3} ms p50",
                traced("mesh_same_node", "agent_vcpu_per_1000rps"),
                100.0 * relative("mesh_same_node"),
                traced("mesh_same_node", "p50_ms"),
                traced("mesh_cross_node", "agent_vcpu_per_1000rps"),
                100.0 * relative("mesh_cross_node"),
                traced("mesh_cross_node", "p50_ms"),
            );
        }
    }
    let hs = |key: &str| med("mesh_cross_node", "hbone_handshakes", key);
    if hs("full_per_s").is_finite() {
        let (full, resumed) = (hs("full_agent_us"), hs("resumed_agent_us"));
        println!(
            "new mTLS connections to node-2's agent ({HANDSHAKE_CLIENTS} client threads on the same CPUs): \
             full {:.0}/s ({full:.0} µs of agent CPU each: {:.0}/s per core), \
             resumed {:.0}/s ({resumed:.0} µs: {:.0}/s per core)",
            hs("full_per_s"),
            1e6 / full,
            hs("resumed_per_s"),
            1e6 / resumed
        );
    }
    let gw = |key: &str| med("mesh_cross_node", "gateway_https", key);
    if gw("simple_p50_ms").is_finite() {
        for mode in ["simple", "mutual"] {
            let k = |what: &str| gw(&format!("{mode}_{what}"));
            println!(
                "HTTPS at the ingress gateway, {} (to node-2's server over HBONE): 1000 rps p50 {:.3} ms p99 {:.3} ms, \
                 {:.3} vCPU/1k rps per agent; new connections with one request: full handshakes {:.0}/s \
                 ({:.0} µs of agents' CPU each), resumed {:.0}/s ({:.0} µs)",
                mode.to_uppercase(),
                k("p50_ms"),
                k("p99_ms"),
                k("vcpu_per_1000rps"),
                k("full_per_s"),
                k("full_agent_us"),
                k("resumed_per_s"),
                k("resumed_agent_us"),
            );
        }
    }
    let big = |key: &str| med("mesh_same_node", "pods_1000", key);
    if big("rss_mib").is_finite() {
        println!(
            "a node with {EXTRA_PODS} more pods (node-1's agent): all captured {:.1} s after start; at rest {:.4} vCPU, \
             {:.1} context switches/s, RSS {:.1} MiB (anonymous {:.1}, heap in use {:.1}), {:.0} tasks; \
             http1_1000rps cross-node through it: p50 {:.3} ms, {:.3} vCPU/1k rps (node-1's agent)",
            big("captured_s"),
            big("idle_vcpu"),
            big("idle_switches_per_s"),
            big("rss_mib"),
            big("anon_mib"),
            big("heap_mib"),
            big("tasks"),
            big("http1_p50_ms"),
            big("http1_vcpu_per_1000rps"),
        );
    }
    println!(
        "agent RSS idle: {:.1} MiB (anonymous {:.1}, of which heap in use {:.1}; the rest is the binary's and libraries' \
         pages, mapped from the page cache); {} idle connections cross-node: {:.2} KiB per connection (both agents: \
         source {:.2}, destination {:.2})",
        idle.rss_mib,
        idle.anon_mib,
        idle.heap_mib,
        idle.connections,
        idle.kib_per_connection,
        idle.source_kib,
        idle.destination_kib
    );
    let out = crate::workspace_root()?.join("target/bench");
    std::fs::create_dir_all(&out)?;
    let doc = serde_json::json!({
        "quick": quick,
        "seconds": took.as_secs(),
        "agent_rss_idle_mib": idle.rss_mib,
        "agent_anonymous_idle_mib": idle.anon_mib,
        "agent_heap_idle_mib": idle.heap_mib,
        "idle_connections": idle.connections,
        "agent_kib_per_idle_connection": idle.kib_per_connection,
        "source_agent_kib_per_idle_connection": idle.source_kib,
        "destination_agent_kib_per_idle_connection": idle.destination_kib,
        "rows": table,
        "samples": results,
    });
    let file = out.join("latest.json");
    std::fs::write(&file, serde_json::to_string_pretty(&doc)?)?;
    let svg = out.join("latest.svg");
    std::fs::write(&svg, super::chart::draw(&[super::chart::Run { name: "this run".into(), doc }]))?;
    println!("written: {} and {} ({} s)", file.display(), svg.display(), took.as_secs());
    Ok(())
}
