//! `cargo xtask scale [--pods N] [--services M]`: the model built from a
//! synthetic cluster as large as a big one (100 000 pods, 10 000 Services by
//! default), through the same object-by-object path as any configuration:
//! how long the parse and the build take, and how much memory the model holds.
//! A benchmark figure, never an assertion.
use std::{fmt::Write as _, time::Instant};

/// Namespaces the pods and Services are spread over.
const NAMESPACES: usize = 100;

pub fn run(pods: usize, services: usize) -> anyhow::Result<()> {
    let services = services.max(1);
    let mut yaml = String::new();
    yaml.push_str("apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\nstatus: {addresses: [{type: InternalIP, address: 172.18.0.2}]}\n");
    for ns in 0..NAMESPACES {
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{ns}, labels: {{istio.io/dataplane-mode: ambient}}}}\n"
        );
    }
    for s in 0..services {
        let (a, b) = (s / 250, s % 250);
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: ns-{}}}\n\
             spec: {{clusterIP: 10.96.{a}.{b}, selector: {{app: app-{s}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n",
            s % NAMESPACES
        );
    }
    for p in 0..pods {
        let s = p % services;
        let ip = 0x0a80_0000u32 + p as u32;
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{p}, namespace: ns-{}, labels: {{app: app-{s}, version: v1}}}}\n\
             spec: {{nodeName: node-{}, serviceAccountName: sa-{s}}}\nstatus: {{podIP: {}, phase: Running}}\n",
            s % NAMESPACES,
            1 + p % 50,
            std::net::Ipv4Addr::from(ip)
        );
    }
    eprintln!("scale: {pods} pods, {services} Services in {NAMESPACES} namespaces ({} MiB of YAML)", yaml.len() >> 20);
    let before = rss_mib();
    let start = Instant::now();
    let loaded = mesh_agent::config::load_text("scale.yaml", &yaml, "cluster.local");
    let took = start.elapsed();
    drop(yaml);
    let state = loaded.state;
    let held = rss_mib() - before;
    println!(
        "model from {} pods and {} Services: built in {:.2} s (parse and validation), {} objects rejected; \
         process memory grew {held:.0} MiB ({:.1} KiB per pod; the YAML parse included: RSS does not shrink after frees)",
        state.workloads.len(),
        state.services.len(),
        took.as_secs_f64(),
        loaded.rejected.len(),
        held * 1024.0 / pods.max(1) as f64
    );
    if let Some(e) = loaded.rejected.first() {
        anyhow::bail!("the synthetic cluster should be valid: {e}");
    }
    Ok(())
}

fn rss_mib() -> f64 {
    mesh_tests::agent::rss_mib(std::process::id())
}
