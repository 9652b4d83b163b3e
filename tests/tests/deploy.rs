//! `deploy/` as Kubernetes would take it: rendered by `kubectl kustomize`,
//! valid against the API schemas (`kubernetes-validate --strict`), and a
//! DaemonSet with the properties the agent relies on. (The RBAC is checked
//! against the code's requests in mesh-agent's `discovery::tests::rbac`.)
use std::process::Command;

use serde::Deserialize as _;
use serde_yaml_ng::Value;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

fn render() -> String {
    kustomize(std::path::Path::new(DEPLOY))
}

fn kustomize(dir: &std::path::Path) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl (`kubectl kustomize` renders deploy/) must be installed");
    assert!(out.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml).map(|d| Value::deserialize(d).expect("YAML")).collect()
}

#[test]
fn deploy_renders_and_passes_strict_schema_validation() {
    let rendered = render();
    let file = std::env::temp_dir().join(format!("mesh-deploy-{}.yaml", std::process::id()));
    std::fs::write(&file, &rendered).expect("temp file");
    for version in ["1.33.0", "1.37.0"] {
        let out = Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "-k", version])
            .arg(&file)
            .output()
            .expect("kubernetes-validate (pip; `cargo xtask setup` installs it)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !text.contains("ERROR"), "Kubernetes {version}:\n{text}");
    }
    let _ = std::fs::remove_file(&file);
    let kinds: Vec<String> =
        docs(&rendered).iter().map(|d| d["kind"].as_str().unwrap_or_default().to_owned()).collect();
    for kind in ["Namespace", "DaemonSet", "Deployment", "Service", "ClusterRole", "Role"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in deploy/: {kinds:?}");
    }
}

#[test]
fn the_daemonset_is_what_the_agent_needs_and_no_more() {
    let all = docs(&render());
    let ds = all.iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], Value::Bool(true));
    assert_eq!(pod["priorityClassName"].as_str(), Some("system-node-critical"));
    // Tolerates every taint.
    let tolerations = pod["tolerations"].as_sequence().expect("tolerations");
    assert!(tolerations.iter().any(|t| t["operator"] == "Exists" && t.get("key").is_none()), "{tolerations:?}");
    let agent = &pod["containers"][0];
    let args: Vec<&str> = agent["args"].as_sequence().expect("args").iter().filter_map(Value::as_str).collect();
    // The node's name from the downward API, read by the agent as NODE_NAME.
    assert!(args.contains(&"--kubernetes") && !args.iter().any(|a| a.starts_with("--node")), "{args:?}");
    let node_env =
        agent["env"].as_sequence().expect("env").iter().find(|e| e["name"] == "NODE_NAME").expect("NODE_NAME");
    assert_eq!(node_env["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some("spec.nodeName"));
    // The stats and readiness ports declared; the kubelet probes the
    // readiness port on the node's address (no host: the admin API stays on
    // loopback), liveness on a path that stays 200 while draining.
    let ports = agent["ports"].as_sequence().expect("ports");
    let port = |name: &str| ports.iter().find(|p| p["name"] == name).and_then(|p| p["containerPort"].as_u64());
    assert_eq!((port("stats"), port("readiness")), (Some(15020), Some(15021)));
    let probe = |name: &str| &agent[name]["httpGet"];
    for name in ["readinessProbe", "livenessProbe", "startupProbe"] {
        assert_eq!(probe(name)["port"].as_str(), Some("readiness"), "{name}");
        assert!(probe(name).get("host").is_none(), "{name}");
    }
    assert_eq!(probe("readinessProbe")["path"].as_str(), Some("/healthz/ready"));
    assert_eq!(probe("livenessProbe")["path"].as_str(), Some("/healthz"));
    // Scraped as Istio's proxies are: the annotations name the stats port.
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(annotations["prometheus.io/port"].as_str(), Some("15020"));
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/stats/prometheus"));
    // The grace period outlasts the drain.
    let drain: u64 = args
        .iter()
        .find_map(|a| a.strip_prefix("--drain-timeout="))
        .and_then(|d| d.strip_suffix('s'))
        .and_then(|d| d.parse().ok())
        .expect("--drain-timeout=Ns");
    assert!(pod["terminationGracePeriodSeconds"].as_u64().expect("grace period") > drain);
    // Exactly the capabilities used, nothing privileged.
    let security = &agent["securityContext"];
    assert_eq!(security["privileged"], Value::Bool(false));
    assert_eq!(security["allowPrivilegeEscalation"], Value::Bool(false));
    let caps = |k: &str| -> Vec<&str> {
        security["capabilities"][k].as_sequence().expect("capabilities").iter().filter_map(Value::as_str).collect()
    };
    assert_eq!(caps("drop"), ["ALL"]);
    assert_eq!(caps("add"), ["NET_ADMIN", "BPF", "PERFMON", "NET_BIND_SERVICE"]);
    // The host's cgroup2 root and bpffs, and the projected token for the CA.
    let volumes = pod["volumes"].as_sequence().expect("volumes");
    let host = |path: &str| volumes.iter().any(|v| v["hostPath"]["path"].as_str() == Some(path));
    assert!(host("/sys/fs/cgroup") && host("/sys/fs/bpf"));
    let token = volumes.iter().find_map(|v| v["projected"]["sources"][0].get("serviceAccountToken")).expect("token");
    assert_eq!(token["audience"].as_str(), Some("mesh-ca"));
    // No surge: two agents cannot share a node's ports.
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"].as_u64(), Some(0));
    // Requests set, no limits (see the comment in deploy/agent.yaml).
    assert!(agent["resources"]["requests"]["memory"].is_string() && agent["resources"].get("limits").is_none());
    // The agent's role only reads.
    for role in all.iter().filter(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "mesh-agent") {
        for rule in role["rules"].as_sequence().expect("rules") {
            let verbs: Vec<&str> =
                rule["verbs"].as_sequence().expect("verbs").iter().filter_map(Value::as_str).collect();
            assert!(verbs.iter().all(|v| ["get", "list", "watch"].contains(v)), "{verbs:?}");
            let resources = rule["resources"].as_sequence().expect("resources");
            assert!(!resources.iter().any(|r| r == "secrets"), "no cluster-wide Secrets");
        }
    }
}

#[test]
fn the_podmonitor_component_scrapes_what_the_annotations_name() {
    // An overlay outside deploy/ (kustomize refuses one inside its base),
    // as a user writes it.
    let dir = std::env::temp_dir().join(format!("mesh-deploy-overlay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let base = dir.join("base");
    let _ = std::fs::remove_file(&base);
    std::os::unix::fs::symlink(std::fs::canonicalize(DEPLOY).expect("deploy/"), &base).expect("symlink");
    std::fs::write(
        dir.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [base]\n\
         components: [base/components/podmonitor]\n",
    )
    .expect("kustomization");
    let all = docs(&kustomize(&dir));
    let _ = std::fs::remove_dir_all(&dir);
    let ds = all.iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
    let monitor = all.iter().find(|d| d["kind"] == "PodMonitor").expect("a PodMonitor");
    assert_eq!(monitor["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    assert_eq!(monitor["metadata"]["namespace"], ds["metadata"]["namespace"]);
    // It selects the agents' pods, by a port they declare, on the annotated path.
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    let selector = monitor["spec"]["selector"]["matchLabels"].as_mapping().expect("matchLabels");
    assert!(selector.iter().all(|(k, v)| &labels[k] == v), "{selector:?} does not select {labels:?}");
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    let ports = ds["spec"]["template"]["spec"]["containers"][0]["ports"].as_sequence().expect("ports");
    let port = ports.iter().find(|p| p["name"] == endpoint["port"]).expect("the PodMonitor's port is declared");
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(
        port["containerPort"].as_u64().map(|p| p.to_string()).as_deref(),
        annotations["prometheus.io/port"].as_str()
    );
    assert_eq!(endpoint["path"], annotations["prometheus.io/path"]);
}
