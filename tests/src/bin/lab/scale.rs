//! `cargo xtask scale [--pods N] [--services M] [--kubernetes]` (release build): the model
//! built from a synthetic cluster as large as a big one (100 000 pods, 10 000
//! Services by default), through the same object-by-object path as any
//! configuration: from YAML text, or (`--kubernetes`) listed and watched from
//! a stand-in API server over TLS on loopback, as the agent does, followed by
//! one rebuild after a change. How long each takes, and how much memory the
//! process gained. A benchmark figure, never an assertion.
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Namespaces the pods and Services are spread over.
const NAMESPACES: usize = 100;

fn objects(pods: usize, services: usize) -> Vec<Value> {
    let mut out = vec![json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.2"}]}})];
    for ns in 0..NAMESPACES {
        out.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns-{ns}"), "labels": {"istio.io/dataplane-mode": "ambient"}}}));
    }
    for s in 0..services {
        out.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{s}"), "namespace": format!("ns-{}", s % NAMESPACES)},
            "spec": {"clusterIP": format!("10.96.{}.{}", s / 250, s % 250), "selector": {"app": format!("app-{s}")},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}));
    }
    for p in 0..pods {
        out.push(pod(p, services, "Running"));
    }
    out
}

fn pod(p: usize, services: usize, phase: &str) -> Value {
    let s = p % services;
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("pod-{p}"), "namespace": format!("ns-{}", s % NAMESPACES),
                     "uid": format!("uid-{p}"), "labels": {"app": format!("app-{s}"), "version": "v1"}},
        "spec": {"nodeName": format!("node-{}", 1 + p % 50), "serviceAccountName": format!("sa-{s}")},
        "status": {"podIP": std::net::Ipv4Addr::from(0x0a80_0000u32 + p as u32).to_string(), "phase": phase}})
}

pub fn run(pods: usize, services: usize, kubernetes: bool) -> anyhow::Result<()> {
    let services = services.max(1);
    let objects = objects(pods, services);
    eprintln!("scale: {pods} pods, {services} Services in {NAMESPACES} namespaces");
    let (loaded, took, held) = if kubernetes { from_api(objects, pods, services)? } else { from_yaml(&objects)? };
    let state = &loaded.state;
    println!(
        "model from {} pods and {} Services: built in {:.2} s, {} objects rejected; process memory grew \
         {held:.0} MiB ({:.1} KiB per pod; measured after malloc_trim, so what stays: the model, and with --kubernetes the store of reduced objects)",
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

fn from_yaml(objects: &[Value]) -> anyhow::Result<(mesh_agent::config::Loaded, Duration, f64)> {
    let docs: Vec<String> = objects.iter().map(serde_yaml_ng::to_string).collect::<Result<_, _>>()?;
    let yaml = docs.join("---\n");
    eprintln!("scale: {} MiB of YAML, parsed and validated", yaml.len() >> 20);
    let before = rss_mib();
    let start = Instant::now();
    let loaded = mesh_agent::config::load_text("scale.yaml", &yaml, "cluster.local");
    let took = start.elapsed();
    drop(yaml);
    Ok((loaded, took, rss_mib() - before))
}

/// Through the agent's Kubernetes source, against a stand-in API server on
/// loopback (its own copy of the objects is in this process before the
/// measurement starts). Reports the first model and one rebuild.
fn from_api(
    objects: Vec<Value>,
    pods: usize,
    services: usize,
) -> anyhow::Result<(mesh_agent::config::Loaded, Duration, f64)> {
    use mesh_agent::discovery;
    let fake = discovery::testing::FakeApi::default();
    for o in objects {
        fake.apply(o);
    }
    let api = mesh_tests::kube_api::ApiServer::start_local(fake.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let kubeconfig = kube::config::Kubeconfig::read_from(&api.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        let client = kube::Client::try_from(config)?;
        let before = rss_mib();
        let start = Instant::now();
        let kinds = discovery::agent_kinds(&[]);
        let (mut models, task) =
            discovery::start(client, kinds, discovery::Settings::new("cluster.local"), Default::default()).await?;
        let first = discovery::first_model(&mut models).await?;
        let took = start.elapsed();
        let held = rss_mib() - before;
        eprintln!(
            "scale: first model from the API server (lists over TLS, reduction, build) in {:.2} s",
            took.as_secs_f64()
        );
        // One pod changes: the watch event, then a whole rebuild (after the 100 ms debounce).
        let start = Instant::now();
        fake.apply(pod(pods / 2, services, "Pending"));
        models.recv().await.ok_or(discovery::DiscoveryError::Stopped)?;
        println!("rebuild after one watch event: {:.2} s (100 ms of it the debounce)", start.elapsed().as_secs_f64());
        task.abort();
        Ok((first, took, held))
    })
}

/// Resident memory after glibc has returned freed memory to the system, so
/// that transient parse buffers do not count.
fn rss_mib() -> f64 {
    // SAFETY: malloc_trim has no preconditions; it only releases free memory.
    unsafe { libc::malloc_trim(0) };
    mesh_tests::agent::rss_mib(std::process::id())
}
