//! `cargo xtask bench [--quick]`: the mesh measured against a direct connection,
//! in one run, on the two-node network-namespace cluster.
//!
//! Each round measures every scenario **direct** (agents stopped: plain routing
//! between the pods) and then through the mesh (agents running, release build):
//! **same-node** (client and server pods on node-1, one agent) and
//! **cross-node** (server on node-2: both agents, mTLS/HBONE). Rounds alternate
//! direct and mesh windows; the table reports medians over rounds, and the
//! ratio or difference to direct measured in the same rounds. Results are also
//! written to `target/bench/latest.json`.
//!
//! Tools: iperf3 (bulk TCP), sockperf (TCP ping-pong at a fixed rate), oha
//! (HTTP/1.1 and HTTP/2, fixed rate with latency correction, and saturation),
//! h2load (gRPC unary with a framed body), nginx-light (the HTTP upstream), the
//! test library's tonic server (gRPC upstream).
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tests::{
    Agent, Cluster, Pod,
    agent::CaService,
    fixture::{Fixture, PodSpec},
    grpc,
    netns::Background,
};

mod chart;
mod dns;
mod gateway;
mod handshakes;
mod node_pods;
mod parse;
mod procfs;
mod report;
mod streams;
mod tools;

use dns::*;
use gateway::*;
use handshakes::*;
use node_pods::*;
use parse::*;
use procfs::*;
use report::*;
use streams::*;
use tools::*;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
/// Servers whose policies need each request checked at the destination: a
/// RequestAuthentication (ES256 key) and an ALLOW needing a request
/// principal and a path, as `guarded_policy` says.
const GUARDED_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 4);
const GUARDED_REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 3);
const ISSUER: &str = "https://bench.example";
/// Servers whose Telemetry turns their reporting as servers off (no
/// request metrics, no access log): their destination carries bytes and
/// parses nothing, as before both reporters.
const QUIET_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const QUIET_REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 4);
const QUIET_TELEMETRY: &str = "---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: quiet, namespace: bench}\n\
    spec: {selector: {matchLabels: {app: quiet}}, metrics: [{overrides: [{match: {mode: SERVER}, disabled: true}]}],\n\
    \x20 accessLogging: [{match: {mode: SERVER}, disabled: true}]}\n";

/// Tracing: `traced-client` samples 1 % of its requests (Istio's default
/// rate), or all of them when oha sends a sampled `traceparent`; the
/// `traced` servers follow the decision that comes with each request. The
/// spans go to a collector in an un-meshed pod (node-1) that counts them.
const TRACED_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 6);
const TRACED_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 7);
const TRACED_REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);
const COLLECTOR: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 8);
const SAMPLED: &str = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// The Telemetries of the traced client and servers (the collector's
/// Service and MeshConfig come from `servers::otlp_collector_config`).
const TRACING: &str = "---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: traced-client, namespace: bench}\n\
    spec: {selector: {matchLabels: {app: traced-client}}, tracing: [{providers: [{name: otel}], randomSamplingPercentage: 1}]}\n\
    ---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: traced, namespace: bench}\n\
    spec: {selector: {matchLabels: {app: traced}}, tracing: [{providers: [{name: otel}], randomSamplingPercentage: 0}]}\n";

/// The policies on the `guarded` servers, with the issuer's key set.
fn guarded_policy(jwks: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: guarded, namespace: bench}}\n\
         spec: {{selector: {{matchLabels: {{app: guarded}}}}, jwtRules: [{{issuer: \"{ISSUER}\", audiences: [bench], jwks: '{jwks}'}}]}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: guarded, namespace: bench}}\n\
         spec: {{selector: {{matchLabels: {{app: guarded}}}}, rules: [{{from: [{{source: {{requestPrincipals: [\"{ISSUER}/*\"]}}}}],\n\
         \x20 to: [{{operation: {{methods: [GET], paths: [\"/*\"]}}}}]}}]}}\n"
    )
}

/// How long each measurement window runs, and how many rounds.
pub(super) struct Plan {
    pub(super) secs: u64,
    rounds: usize,
    /// Idle connections held open to measure memory per connection.
    idle: usize,
    /// `Authorization: Bearer …` for the guarded servers.
    bearer: String,
}

/// What `cargo xtask bench` was asked for.
pub struct Options {
    pub quick: bool,
    /// Scenario names to run; empty: all.
    pub only: Vec<String>,
    /// `perf record` the agents during the mesh windows.
    pub perf: bool,
    /// Window length, overriding the plan's.
    pub secs: Option<u64>,
    /// Rounds, overriding the plan's.
    pub rounds: Option<usize>,
    /// Added to the agents' command line.
    pub agent_args: Vec<String>,
    /// Draw these runs' `latest.json` (`FILE` or `FILE=NAME`) into one
    /// chart at `chart_out` instead of measuring.
    pub charts: Vec<String>,
    pub chart_out: Option<PathBuf>,
}

impl Options {
    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
}

/// Every scenario, in the order they run; `idle` is the memory measurement.
const SCENARIOS: [&str; 20] = [
    "idle",
    "tcp_1_stream",
    "tcp_8_streams",
    "tcp_rr_1000mps",
    "http1_1000rps",
    "http1_1000rps_jwt",
    "http1_1000rps_l4dest",
    "http1_1000rps_trace1",
    "http1_1000rps_trace100",
    "http1_saturation",
    "http2_1000rps",
    "http2_saturation",
    "new_connections",
    "grpc_unary",
    "grpc_streaming",
    "hbone_handshakes",
    "gateway_https",
    "pods_1000",
    "dns_1000qps",
    "dns_1000qps_mesh",
];

/// One number from one window.
type Sample = BTreeMap<&'static str, f64>;

/// Every scenario against `ip`; `agents` are watched for CPU, context
/// switches, heap allocations and runtime wakeups during the request
/// windows, and `server` (nginx's processes at `ip`) for CPU: what one hop of
/// a fast server costs per request on this machine, in the same run.
#[expect(clippy::too_many_arguments, reason = "the pods and processes one round measures")]
fn scenarios(
    client: &Pod,
    traced_client: &Pod,
    ip: Ipv4Addr,
    plan: &Plan,
    options: &Options,
    body: &Path,
    agents: &[Agent],
    server: &[u32],
) -> anyhow::Result<BTreeMap<&'static str, Sample>> {
    let agents: Vec<(u32, &Agent)> = agents.iter().filter_map(|a| Some((a.pid()?, a))).collect();
    let s = plan.secs;
    let h1 = format!("http://{ip}:8080/");
    let h2 = format!("http://{ip}:8081/");
    // The same server behind request policy at its destination.
    let guarded = format!("http://{}:8080/", if ip == LOCAL { GUARDED_LOCAL } else { GUARDED_REMOTE });
    // The same server with its reporting as a server off.
    let quiet = format!("http://{}:8080/", if ip == LOCAL { QUIET_LOCAL } else { QUIET_REMOTE });
    // The same server with tracing (following the client's decision).
    let traced = format!("http://{}:8080/", if ip == LOCAL { TRACED_LOCAL } else { TRACED_REMOTE });
    let mut out = BTreeMap::new();
    let apart = ["idle", "hbone_handshakes", "gateway_https", "pods_1000"];
    // DNS is answered on the client's node (or by its resolver): one path.
    let here = |s: &&str| ip == LOCAL || !s.starts_with("dns");
    for scenario in SCENARIOS.into_iter().filter(|s| !apart.contains(s) && options.wants(s)).filter(here) {
        let cpu0: Vec<f64> = agents.iter().map(|(p, _)| cpu_seconds(*p)).collect();
        let switches0: f64 = agents.iter().map(|(p, _)| context_switches(*p)).sum();
        let machinery0 = machinery(&agents);
        let server0: f64 = server.iter().map(|p| cpu_seconds(*p)).sum();
        let start = Instant::now();
        let mut sample = match scenario {
            "tcp_1_stream" => iperf(client, ip, s, 1)?,
            "tcp_8_streams" => iperf(client, ip, s, 8)?,
            "tcp_rr_1000mps" => sockperf(client, ip, s)?,
            "http1_1000rps" => oha(client, &h1, s, Some(1000), &[])?,
            "http1_1000rps_jwt" => oha(client, &guarded, s, Some(1000), &["-H", &plan.bearer])?,
            "http1_1000rps_l4dest" => oha(client, &quiet, s, Some(1000), &[])?,
            "http1_1000rps_trace1" => oha(traced_client, &traced, s, Some(1000), &[])?,
            "http1_1000rps_trace100" => oha(traced_client, &traced, s, Some(1000), &["-H", SAMPLED])?,
            "http1_saturation" => oha(client, &h1, s, None, &[])?,
            "http2_1000rps" => oha(client, &h2, s, Some(1000), &["--http2"])?,
            "http2_saturation" => oha(client, &h2, s, None, &["--http2"])?,
            "new_connections" => oha(client, &h1, s, None, &["--disable-keepalive"])?,
            "grpc_unary" => h2load(client, ip, s, body)?,
            "grpc_streaming" => grpc_streaming(client, ip, s)?,
            "dns_1000qps" => dns_load(client, OUTSIDE_NAME, s)?,
            "dns_1000qps_mesh" => dns_load(client, MESH_NAME, s)?,
            other => bail!("no scenario {other}"),
        };
        let elapsed = start.elapsed().as_secs_f64();
        // (The guarded and quiet servers' nginx is not the one watched.)
        let watched = scenario.starts_with("http")
            && !["_jwt", "_l4dest", "_trace1", "_trace100"].iter().any(|x| scenario.ends_with(x));
        if let Some(rps) = sample.get("rps").copied().filter(|_| watched) {
            let used = server.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - server0;
            sample.insert("server_vcpu_per_1000rps", used / elapsed / (rps / 1000.0));
        }
        if let Some(rps) = sample.get("rps").copied().filter(|_| !agents.is_empty()) {
            let used: f64 = agents.iter().zip(&cpu0).map(|((p, _), c)| cpu_seconds(*p) - c).sum();
            let per_agent = used / agents.len() as f64;
            // vCPU per 1000 rps, per agent: CPU seconds per second, per thousand rps.
            sample.insert("agent_vcpu_per_1000rps", per_agent / elapsed / (rps / 1000.0));
            // Thread sleeps and wakes per request, per agent: what costs most at a fixed rate.
            let requests = agents.len() as f64 * rps * elapsed;
            let switches = agents.iter().map(|(p, _)| context_switches(*p)).sum::<f64>() - switches0;
            sample.insert("agent_switches_per_request", switches / requests);
            // Heap allocations and runtime wakeups per request, per agent
            // (what the agents' own metrics count; an agent from before
            // them reports none).
            for (key, before, after) in machinery0.iter().zip(machinery(&agents)).map(|((k, b), (_, a))| (k, b, a)) {
                if after > 0.0 {
                    sample.insert(key, (after - before) / requests);
                }
            }
        }
        out.insert(scenario, sample);
    }
    Ok(out)
}

/// Both nodes' agents on `config`, as deployed (no access log, the
/// default resync interval), with the options' extra arguments.
fn start_agents(cluster: &Cluster, ca: &CaService, config: &str, options: &Options) -> Vec<Agent> {
    let args = |i: usize| {
        let mut a = ca.agent_args(&cluster.nodes[i].name);
        a.extend(["--access-log", "off", "--resync-interval", "1s"].map(String::from));
        a.extend(options.agent_args.iter().cloned());
        a
    };
    (0..2).map(|i| Agent::start_on(cluster, i, config, &args(i))).collect()
}

/// The bench's files (nginx's prefixes, the gRPC body, the client
/// certificate), removed however the run ends.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Results by path (`direct_same_node`, `mesh_same_node`, …) → scenario → samples per round.
type Results = BTreeMap<&'static str, BTreeMap<&'static str, Vec<Sample>>>;

fn record(results: &mut Results, path: &'static str, got: BTreeMap<&'static str, Sample>) {
    for (scenario, sample) in got {
        results.entry(path).or_default().entry(scenario).or_default().push(sample);
    }
}

/// `--chart`: runs side by side, the first as the baseline.
fn chart(files: &[String], out: Option<&Path>) -> anyhow::Result<()> {
    let runs = files
        .iter()
        .map(|f| match f.split_once('=') {
            Some((file, name)) => chart::Run::read(Path::new(file), Some(name)),
            None => chart::Run::read(Path::new(f), None),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let out = match out {
        Some(o) => o.to_path_buf(),
        None => crate::workspace_root()?.join("target/bench/chart.svg"),
    };
    std::fs::write(&out, chart::draw(&runs)).with_context(|| format!("writing {}", out.display()))?;
    println!("chart: {}", out.display());
    Ok(())
}

pub fn run(options: Options) -> anyhow::Result<()> {
    if !options.charts.is_empty() {
        return chart(&options.charts, options.chart_out.as_deref());
    }
    let quick = options.quick;
    if let Some(unknown) = options.only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
        bail!("no scenario {unknown:?}; there are: {}", SCENARIOS.join(", "));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark creates network namespaces and loads eBPF: run it as root (sudo cargo xtask bench)");
    }
    for tool in ["iperf3", "sockperf", "nginx", "h2load"] {
        if !crate::succeeds(Command::new("sh").args(["-c", &format!("command -v {tool}")])) {
            bail!("{tool} not found: run `cargo xtask setup` first");
        }
    }
    if !crate::succeeds(Command::new(oha_binary()).arg("--version")) {
        bail!("oha not found: run `cargo xtask setup` first (it installs oha from crates.io)");
    }
    let signer = mesh_tests::jwt::Signer::ec("bench-1");
    let claims =
        serde_json::json!({"iss": ISSUER, "sub": "bench", "aud": "bench", "exp": mesh_tests::jwt::now() + 86400});
    let bearer = format!("Authorization: Bearer {}", signer.sign(&claims));
    let mut plan = if quick {
        Plan { secs: 2, rounds: 1, idle: 2000, bearer }
    } else {
        // Idle connections from one client pod: under the agent's
        // `--max-connections-per-source` (8 192), which refuses the rest.
        Plan { secs: 10, rounds: 3, idle: 8_000, bearer }
    };
    plan.secs = options.secs.unwrap_or(plan.secs);
    plan.rounds = options.rounds.unwrap_or(plan.rounds).max(1);
    raise_fd_limit();
    let root = crate::workspace_root()?;
    // A binary named in MESH_AGENT_BIN is measured as it is (another
    // commit's build, for a comparison in one session); else this tree's.
    let given = std::env::var_os("MESH_AGENT_BIN");
    if given.is_none() {
        crate::run(Command::new("cargo").args(["build", "--release", "--package", "mesh-agent"]).current_dir(&root))?;
    }
    let binary = given.map_or_else(|| root.join("target/release/mesh-agent"), PathBuf::from);
    eprintln!("bench: agent {}", binary.display());
    // SAFETY: still single-threaded; the harness reads these when it starts agents.
    unsafe {
        std::env::set_var("MESH_AGENT_BIN", binary);
        std::env::set_var("MESH_AGENT_LOG", "warn");
    }
    // Namespace `bench` (meshed): `client` and `local` on node-1, `remote` on node-2.
    let mut f = Fixture::two_nodes([&[], &[]]);
    let server = PodSpec::app("bench", &[("app", "server")]);
    let guarded = PodSpec::app("bench", &[("app", "guarded")]);
    f.namespace("bench", true)
        .add_pod(0, "client", CLIENT, PodSpec::app("bench", &[("app", "client")]))
        .add_pod(0, "local", LOCAL, server)
        .add_pod(1, "remote", REMOTE, PodSpec::app("bench", &[("app", "server"), ("bench-node", "two")]))
        .add_pod(0, "guarded-local", GUARDED_LOCAL, guarded)
        .add_pod(1, "guarded-remote", GUARDED_REMOTE, guarded)
        .add_pod(0, "quiet-local", QUIET_LOCAL, PodSpec::app("bench", &[("app", "quiet")]))
        .add_pod(1, "quiet-remote", QUIET_REMOTE, PodSpec::app("bench", &[("app", "quiet")]))
        .add_pod(0, "traced-client", TRACED_CLIENT, PodSpec::app("bench", &[("app", "traced-client")]))
        .add_pod(0, "traced-local", TRACED_LOCAL, PodSpec::app("bench", &[("app", "traced")]))
        .add_pod(1, "traced-remote", TRACED_REMOTE, PodSpec::app("bench", &[("app", "traced")]));
    f.namespace("observability", false).add_pod(
        0,
        "collector",
        COLLECTOR,
        PodSpec { service_account: None, ..PodSpec::app("observability", &[("app", "collector")]) },
    );
    gateway::add(&mut f);
    let gateway_tls = GatewayTls::new(&f.cluster.id);
    let policy = guarded_policy(&mesh_tests::jwt::jwks(&[&signer]));
    let otel = mesh_tests::servers::otlp_collector_config("observability", "collector", "10.96.0.50", "");
    let gateway = gateway_tls.config();
    let config = f.yaml(&format!("{policy}{QUIET_TELEMETRY}{otel}{TRACING}{gateway}"));
    let cluster = f.cluster;
    let work = WorkDir(std::env::temp_dir().join(format!("mesh-bench-{}", cluster.id)));
    std::fs::create_dir_all(&work.0)?;
    let work = &work.0;
    // The agents' resolver, by environment: an agent from before the DNS
    // proxy (an A/B run) ignores it.
    let resolv_conf = work.join("resolv.conf");
    std::fs::write(&resolv_conf, format!("nameserver {RESOLVER}\n"))?;
    // SAFETY: still single-threaded (no server started yet).
    unsafe { std::env::set_var("MESH_RESOLV_CONF", &resolv_conf) };
    let body = grpc_body(work)?;
    let mut servers = Vec::new();
    for (name, ip) in [("local", LOCAL), ("remote", REMOTE)] {
        let pod = cluster.pod(name);
        servers.push(spawn_in(&pod.netns, &["iperf3", "-s"])?);
        servers.push(spawn_in(&pod.netns, &["sockperf", "server", "--tcp", "-i", "0.0.0.0", "-p", "11111"])?);
        servers.push(nginx(pod, work)?);
        grpc::serve(pod, 9090);
        for port in [5201, 11111, 8080, 8081, 9090] {
            wait_port(&cluster.pod("client").netns, ip, port)?;
        }
    }
    let others = [
        ("guarded-local", GUARDED_LOCAL),
        ("guarded-remote", GUARDED_REMOTE),
        ("quiet-local", QUIET_LOCAL),
        ("quiet-remote", QUIET_REMOTE),
        ("traced-local", TRACED_LOCAL),
        ("traced-remote", TRACED_REMOTE),
    ];
    for (name, ip) in others {
        servers.push(nginx(cluster.pod(name), work)?);
        wait_port(&cluster.pod("client").netns, ip, 8080)?;
    }
    // The node's resolver, which the direct rounds ask and the agents forward to.
    let resolver = mesh_tests::dns::DnsServer::start(&Pod::namespace("resolver", RESOLVER, &cluster.net_ns));
    resolver.set(OUTSIDE_NAME, mesh_tests::dns::Reply::A(vec![Ipv4Addr::new(192, 0, 2, 80)], 300));
    resolver.set(MESH_NAME, mesh_tests::dns::Reply::A(vec![Ipv4Addr::new(10, 96, 0, 50)], 30));
    let nginx_local = nginx_pids(&work.join("local"));
    let nginx_remote = nginx_pids(&work.join("remote"));
    let collector = mesh_tests::servers::otlp_collector(cluster.pod("collector"), true);
    let ca = CaService::start(&cluster, &config);
    let (client, traced_client) = (cluster.pod("client"), cluster.pod("traced-client"));
    let mut results = Results::new();
    let mut agent_rss = Vec::new();
    let (mut agent_anon, mut agent_heap) = (Vec::new(), Vec::new());
    let mut per_conn = Vec::new();
    let started = Instant::now();
    let mut links_made = false;
    for round in 1..=plan.rounds {
        eprintln!("round {round}/{}: direct (no agent)", plan.rounds);
        record(
            &mut results,
            "direct_same_node",
            scenarios(client, traced_client, LOCAL, &plan, &options, &body, &[], &nginx_local)?,
        );
        record(
            &mut results,
            "direct_cross_node",
            scenarios(client, traced_client, REMOTE, &plan, &options, &body, &[], &nginx_remote)?,
        );
        eprintln!("round {round}/{}: through the mesh", plan.rounds);
        let agents = start_agents(&cluster, &ca, &config, &options);
        let pids: Vec<u32> = agents.iter().filter_map(Agent::pid).collect();
        std::thread::sleep(Duration::from_millis(500));
        agent_rss.extend(pids.iter().map(|p| rss_mib(*p)));
        // What is resident: the agent's own (anonymous: heap, stacks) and
        // the binary's pages mapped from the page cache.
        agent_anon.extend(pids.iter().map(|p| status_mib(*p, "RssAnon:")));
        let heap = |a: &Agent| mesh_tests::agent::metric(&a.metrics(), "mesh_memory_heap_bytes", &[]) / 1048576.0;
        agent_heap.extend(agents.iter().map(heap).filter(|h| *h > 0.0));
        // On fresh agents: a heap grown by the load runs would hide the cost.
        let active = |a: &Agent| mesh_tests::agent::metric(&a.metrics(), "mesh_tcp_active_connections", &[]);
        if options.wants("idle") {
            per_conn.push(idle_connections(client, REMOTE, plan.idle, &pids, || active(&agents[1]))?);
            // Let both agents finish closing them before anything is timed.
            let deadline = Instant::now() + Duration::from_secs(30);
            while agents.iter().any(|a| active(a) > 0.0) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        std::fs::create_dir_all(root.join("target/bench"))?;
        let perf = match options.perf {
            true => Some(Perf::start(&pids, &root.join("target/bench/perf.data"))?),
            false => None,
        };
        record(
            &mut results,
            "mesh_same_node",
            scenarios(client, traced_client, LOCAL, &plan, &options, &body, &agents[..1], &nginx_local)?,
        );
        record(
            &mut results,
            "mesh_cross_node",
            scenarios(client, traced_client, REMOTE, &plan, &options, &body, &agents, &nginx_remote)?,
        );
        if options.wants("hbone_handshakes") {
            let sample = hbone_handshakes(&cluster, &ca, work, plan.secs, pids[1])?;
            record(&mut results, "mesh_cross_node", BTreeMap::from([("hbone_handshakes", sample)]));
        }
        if options.wants("gateway_https") {
            let sample = gateway_https(&cluster, &gateway_tls, plan.secs, &pids)?;
            record(&mut results, "mesh_cross_node", BTreeMap::from([("gateway_https", sample)]));
        }
        if let Some(perf) = perf {
            let data = root.join("target/bench/perf.data");
            let top = perf.finish(&data, "mesh-agent, both agents, the mesh windows")?;
            eprintln!("flame graph: {}; most samples of their own:", data.with_extension("svg").display());
            for (frame, share) in top {
                eprintln!("  {:5.1} %  {frame}", share * 100.0);
            }
        }
        let dropped: f64 = agents
            .iter()
            .map(|a| {
                let text = a.metrics();
                ["queue_full", "export_failed", "rejected"]
                    .iter()
                    .map(|r| mesh_tests::agent::metric(&text, "mesh_trace_spans_total", &[("result", r)]))
                    .sum::<f64>()
            })
            .sum();
        eprintln!(
            "round {round}: the collector has {} spans; the agents dropped {}",
            collector.received(),
            dropped as u64
        );
        drop(agents);
        if options.wants("pods_1000") {
            let got = with_1000_pods(&cluster, &ca, &config, &plan, &options, &mut links_made)?;
            record(&mut results, "mesh_same_node", BTreeMap::from([("pods_1000", got)]));
        }
    }
    drop(ca);
    drop(servers);
    drop(cluster);
    let each = |i: usize| median(per_conn.iter().filter_map(|v: &Vec<f64>| v.get(i).copied()).collect());
    let idle = Idle {
        rss_mib: median(agent_rss),
        anon_mib: median(agent_anon),
        heap_mib: median(agent_heap),
        kib_per_connection: median(per_conn.iter().map(|v| v.iter().sum()).collect()),
        source_kib: each(0),
        destination_kib: each(1),
        connections: plan.idle,
    };
    report(&results, &idle, quick, started.elapsed())
}
