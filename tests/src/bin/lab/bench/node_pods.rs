//! A 1 000-pod node's steady state (`pods_1000`): node-1 gets 1 000 more
//! meshed pods (namespace `scale`, 100 Services, 20 service accounts), each
//! with the host side of a veth pair and a /32 route, as a CNI plugin leaves
//! them; they send nothing. The agents start on that configuration; once
//! node-1's agent has every pod captured, the figures are its resident
//! memory, its CPU while the node is idle (the resync every second walks
//! every pod), its tasks, and then `http1_1000rps` through it as before.
use super::*;

pub(super) const EXTRA_PODS: usize = 1000;
const SERVICES: usize = 100;
const ACCOUNTS: usize = 20;

/// The `n`-th extra pod's address: 10.245.0.0/16, beside the bench's pods.
fn ip(n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 10)) + n as u32)
}

/// The veth pairs (both ends in node-1's namespace: nothing answers on
/// them) and routes; removed with the node's namespace.
pub(super) fn add_links(cluster: &Cluster) -> anyhow::Result<()> {
    let mut batch = String::new();
    for n in 0..EXTRA_PODS {
        let (host, peer) = (format!("vs{n}"), format!("vsp{n}"));
        batch += &format!("link add {host} type veth peer name {peer}\nlink set {host} up\nlink set {peer} up\n");
        batch += &format!("route add {}/32 dev {host}\n", ip(n));
    }
    let file = std::env::temp_dir().join(format!("mesh-bench-links-{}", cluster.id));
    std::fs::write(&file, batch)?;
    let out = cluster.node_cmd(&["ip", "-batch", &file.display().to_string()]);
    let _ = std::fs::remove_file(&file);
    if !out.status.success() {
        bail!("making {EXTRA_PODS} pod links: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The extra pods, their namespace and Services, as YAML documents.
pub(super) fn objects() -> String {
    let mut out = String::from(
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: scale, labels: {istio.io/dataplane-mode: ambient}}\n",
    );
    for s in 0..SERVICES {
        out += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: scale}}\n\
             spec: {{clusterIP: 10.97.0.{}, selector: {{app: app-{s}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n",
            s + 10
        );
    }
    for n in 0..EXTRA_PODS {
        let (s, a) = (n % SERVICES, n % ACCOUNTS);
        out += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{n}, namespace: scale, labels: {{app: app-{s}, version: v1}}}}\n\
             spec: {{nodeName: node-1, serviceAccountName: sa-{a}}}\n\
             status: {{podIP: {}, phase: Running, conditions: [{{type: Ready, status: \"True\"}}]}}\n",
            ip(n)
        );
    }
    out
}

/// Waits until `agent` has captured `n` pods or more; the seconds it took.
pub(super) fn wait_captured(agent: &Agent, n: usize, secs: u64) -> anyhow::Result<f64> {
    let start = Instant::now();
    loop {
        let dump = agent.admin_get("/config_dump").map(|(_, body)| body).unwrap_or_default();
        let attached = serde_json::from_str::<serde_json::Value>(&dump)
            .ok()
            .and_then(|d| Some(d["capture"]["attached"].as_array()?.len()))
            .unwrap_or(0);
        if attached >= n {
            return Ok(start.elapsed().as_secs_f64());
        }
        if start.elapsed() > Duration::from_secs(secs) {
            bail!("node-1's agent captured {attached} pods of {n} in {secs} s");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Node-1's agent at rest for `secs`: CPU, memory, tasks, context switches.
pub(super) fn steady(agent: &Agent, pid: u32, secs: u64) -> Sample {
    let (cpu0, switches0) = (cpu_seconds(pid), context_switches(pid));
    std::thread::sleep(Duration::from_secs(secs));
    let text = agent.metrics();
    // (An agent from before these metrics has none: not a zero.)
    let m = |name: &str| Some(mesh_tests::agent::metric(&text, name, &[])).filter(|v| *v > 0.0).unwrap_or(f64::NAN);
    Sample::from([
        ("idle_vcpu", (cpu_seconds(pid) - cpu0) / secs as f64),
        ("idle_switches_per_s", (context_switches(pid) - switches0) / secs as f64),
        ("rss_mib", rss_mib(pid)),
        ("anon_mib", status_mib(pid, "RssAnon:")),
        ("heap_mib", m("mesh_memory_heap_bytes") / 1048576.0),
        ("tasks", m("mesh_runtime_tasks")),
    ])
}

/// `pods_1000`: the agents on the configuration with 1 000 more pods on
/// node-1 (their links made once per run), node-1's agent at rest once
/// every pod is captured, then `http1_1000rps` through it.
pub(super) fn with_1000_pods(
    cluster: &Cluster,
    ca: &CaService,
    config: &str,
    plan: &Plan,
    options: &Options,
    links_made: &mut bool,
) -> anyhow::Result<Sample> {
    if !*links_made {
        add_links(cluster)?;
        *links_made = true;
    }
    let config = format!("{config}{}", objects());
    ca.write_config(&config);
    let agents = super::start_agents(cluster, ca, &config, options);
    let pid = agents[0].pid().context("node-1's agent has no pid")?;
    // The bench's own pods on node-1 (client, servers, collector) and the extra ones.
    let captured = wait_captured(&agents[0], EXTRA_PODS, 120)?;
    let mut sample = steady(&agents[0], pid, plan.secs);
    sample.insert("captured_s", captured);
    let cpu0 = cpu_seconds(pid);
    let start = Instant::now();
    let got = oha(cluster.pod("client"), &format!("http://{REMOTE}:8080/"), plan.secs, Some(1000), &[])?;
    let rps = got.get("rps").copied().unwrap_or(f64::NAN);
    sample.insert("http1_p50_ms", got.get("p50_ms").copied().unwrap_or(f64::NAN));
    sample.insert("http1_vcpu_per_1000rps", (cpu_seconds(pid) - cpu0) / start.elapsed().as_secs_f64() / (rps / 1000.0));
    // The bench's own configuration back for the CA (the next round's agents).
    let config_without = config.replace(&objects(), "");
    ca.write_config(&config_without);
    Ok(sample)
}
