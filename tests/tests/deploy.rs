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
    validate(&rendered, "mesh-deploy");
    let kinds: Vec<String> =
        docs(&rendered).iter().map(|d| d["kind"].as_str().unwrap_or_default().to_owned()).collect();
    for kind in ["Namespace", "DaemonSet", "Deployment", "Service", "ClusterRole", "Role"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in deploy/: {kinds:?}");
    }
}

#[test]
fn the_cleanup_removes_the_plugin_then_capture_on_every_node() {
    let rendered = kustomize(&std::path::Path::new(DEPLOY).join("cleanup"));
    validate(&rendered, "mesh-cleanup");
    let all = docs(&rendered);
    let ds = all.iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], Value::Bool(true), "capture is in the node's network namespace");
    let steps: Vec<String> = pod["initContainers"]
        .as_sequence()
        .expect("init containers")
        .iter()
        .map(|c| {
            let words = c["command"].as_sequence().or(c["args"].as_sequence()).expect("command or args");
            words.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" ")
        })
        .collect();
    assert!(steps[0].starts_with("/usr/local/bin/mesh-cni uninstall"), "{steps:?}");
    assert!(steps[1].starts_with("uninstall --bpffs=/sys/fs/bpf"), "{steps:?}");
}

/// `kubernetes-validate --strict` for the oldest and newest Kubernetes supported.
fn validate(rendered: &str, name: &str) {
    let file = std::env::temp_dir().join(format!("{name}-{}.yaml", std::process::id()));
    std::fs::write(&file, rendered).expect("temp file");
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
    // No ports declared (a surge pod would not be scheduled beside the old
    // one: hostNetwork container ports are host ports); the kubelet probes
    // the readiness port by number on the node's address (no host: the
    // admin API stays on loopback), liveness on a path that stays 200 while
    // draining.
    assert!(agent.get("ports").is_none(), "declared ports block the surge: {:?}", agent["ports"]);
    let probe = |name: &str| &agent[name]["httpGet"];
    for name in ["readinessProbe", "livenessProbe", "startupProbe"] {
        assert_eq!(probe(name)["port"].as_u64(), Some(15021), "{name}");
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
    assert_eq!(caps("add"), ["NET_ADMIN", "BPF", "PERFMON"]);
    // The host's cgroup2 root and bpffs, and the projected token for the CA.
    let volumes = pod["volumes"].as_sequence().expect("volumes");
    let host = |path: &str| volumes.iter().any(|v| v["hostPath"]["path"].as_str() == Some(path));
    assert!(host("/sys/fs/cgroup") && host("/sys/fs/bpf"));
    let token = volumes.iter().find_map(|v| v["projected"]["sources"][0].get("serviceAccountToken")).expect("token");
    assert_eq!(token["audience"].as_str(), Some("mesh-ca"));
    // Surge: the new agent takes the old one's sockets over through the
    // state directory both share on the host; none is ever unavailable.
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!((rolling["maxSurge"].as_u64(), rolling["maxUnavailable"].as_u64()), (Some(1), Some(0)));
    assert!(args.contains(&"--state-dir=/var/run/mesh-agent"), "{args:?}");
    assert!(host("/var/run/mesh-agent"));
    // The CNI plugin installed by an init container into the host's CNI
    // directories, asking the agent on the socket in that state directory.
    assert!(host("/opt/cni/bin") && host("/etc/cni/net.d"));
    let init = &pod["initContainers"][0];
    let command: Vec<&str> = init["command"].as_sequence().expect("command").iter().filter_map(Value::as_str).collect();
    assert_eq!(command[..2], ["/usr/local/bin/mesh-cni", "install"]);
    assert!(command.contains(&"--socket=/var/run/mesh-agent/cni.sock"), "{command:?}");
    assert_eq!(init["securityContext"]["capabilities"]["drop"][0].as_str(), Some("ALL"));
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

/// deploy/ with `component`, rendered as a user's overlay outside deploy/
/// (kustomize refuses one inside its base).
fn with_component(component: &str) -> String {
    let dir = std::env::temp_dir().join(format!("mesh-deploy-overlay-{component}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let base = dir.join("base");
    let _ = std::fs::remove_file(&base);
    std::os::unix::fs::symlink(std::fs::canonicalize(DEPLOY).expect("deploy/"), &base).expect("symlink");
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [base]\n\
             components: [base/components/{component}]\n"
        ),
    )
    .expect("kustomization");
    let rendered = kustomize(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    rendered
}

#[test]
fn the_ingress_gateway_component_is_a_gateway_pod_behind_a_load_balancer() {
    let rendered = with_component("ingressgateway");
    validate(&rendered, "ingressgateway");
    let all = docs(&rendered);
    let deployment = all.iter().find(|d| d["kind"] == "Deployment").expect("a Deployment");
    let template = &deployment["spec"]["template"];
    // What the agent reads of its pods: gateway injection, the labels Istio's
    // Gateways select (`istio: ingressgateway`), and the identity Istio's
    // own install gives it.
    let pod = serde_yaml_ng::to_string(&serde_yaml_ng::Value::Mapping(
        [
            ("apiVersion".into(), "v1".into()),
            ("kind".into(), "Pod".into()),
            ("metadata".into(), {
                let mut m = template["metadata"].clone();
                m["name"] = "istio-ingressgateway-abc".into();
                m["namespace"] = deployment["metadata"]["namespace"].clone();
                m
            }),
            ("spec".into(), {
                let mut s = template["spec"].clone();
                s["nodeName"] = "n1".into();
                s
            }),
            ("status".into(), serde_yaml_ng::from_str("{podIP: 10.244.1.100, phase: Running}").expect("status")),
        ]
        .into_iter()
        .collect(),
    ))
    .expect("pod");
    let loaded = mesh_agent::config::load_text(
        "ingressgateway.yaml",
        &format!(
            "{pod}---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: ingress, namespace: istio-system}}\n\
         spec: {{selector: {{istio: ingressgateway}}, servers: [{{port: {{number: 80, name: http, protocol: HTTP}}, hosts: ['*']}}]}}\n"
        ),
        "cluster.local",
    );
    assert!(loaded.rejected.is_empty(), "{:?}", loaded.rejected);
    let state = loaded.state;
    let w = &state.workloads["istio-system/istio-ingressgateway-abc"];
    assert!(w.gateway && w.meshed, "{w:?}");
    assert_eq!(&*w.principal, "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account");
    assert_eq!(state.gateways_of(w).count(), 1);
    // Reached through a LoadBalancer Service selecting exactly those pods.
    let service = all.iter().find(|d| d["kind"] == "Service" && d["spec"]["type"] == "LoadBalancer").expect("a LB");
    let labels = &template["metadata"]["labels"];
    let selector = service["spec"]["selector"].as_mapping().expect("selector");
    assert!(selector.iter().all(|(k, v)| &labels[k] == v));
    let ports: Vec<u64> =
        service["spec"]["ports"].as_sequence().expect("ports").iter().filter_map(|p| p["port"].as_u64()).collect();
    assert_eq!(ports, [80, 443]);
}

#[test]
fn the_podmonitor_component_scrapes_what_the_annotations_name() {
    let all = docs(&with_component("podmonitor"));
    let ds = all.iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
    let monitor = all.iter().find(|d| d["kind"] == "PodMonitor").expect("a PodMonitor");
    assert_eq!(monitor["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    assert_eq!(monitor["metadata"]["namespace"], ds["metadata"]["namespace"]);
    // It selects the agents' pods and scrapes the annotated port (set as the
    // target's address: the pods declare none) on the annotated path.
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    let selector = monitor["spec"]["selector"]["matchLabels"].as_mapping().expect("matchLabels");
    assert!(selector.iter().all(|(k, v)| &labels[k] == v), "{selector:?} does not select {labels:?}");
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    let address = endpoint["relabelings"]
        .as_sequence()
        .expect("relabelings")
        .iter()
        .find(|r| r["targetLabel"] == "__address__")
        .expect("the address set to the stats port");
    assert_eq!(address["sourceLabels"][0].as_str(), Some("__meta_kubernetes_pod_ip"));
    let port = annotations["prometheus.io/port"].as_str().expect("port annotation");
    assert_eq!(address["replacement"].as_str(), Some(format!("$1:{port}").as_str()));
    assert_eq!(endpoint["path"], annotations["prometheus.io/path"]);
}

#[test]
fn the_controller_is_one_unprivileged_writer_of_status_and_gateway_deployments_alone() {
    let all = docs(&render());
    let deployment = all
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "mesh-controller")
        .expect("the controller's Deployment");
    assert_eq!(deployment["spec"]["replicas"], Value::from(1));
    assert_eq!(deployment["spec"]["strategy"]["type"], Value::from("Recreate"), "never two writers at once");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], Value::from("mesh-controller"));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], Value::Bool(true));
    let container = &pod["containers"][0];
    assert_eq!(container["args"][0], Value::from("controller"));
    assert_eq!(container["securityContext"]["capabilities"]["drop"][0], Value::from("ALL"));
    assert!(pod["hostNetwork"].is_null() && container["securityContext"]["privileged"].is_null());
    // Whatever it may write is a status subresource, or what automated
    // deployment makes (never Secrets, roles, pods directly, or the mesh's own kinds).
    let bound: Vec<String> = all
        .iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("ClusterRoleBinding" | "RoleBinding")))
        .filter(|b| b["subjects"].as_sequence().into_iter().flatten().any(|s| s["name"] == "mesh-controller"))
        .map(|b| b["roleRef"]["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(!bound.is_empty());
    for role in all.iter().filter(|d| matches!(d["kind"].as_str(), Some("ClusterRole" | "Role"))) {
        if !bound.iter().any(|b| role["metadata"]["name"].as_str() == Some(b.as_str())) {
            continue;
        }
        for rule in role["rules"].as_sequence().into_iter().flatten() {
            let verbs: Vec<&str> =
                rule["verbs"].as_sequence().into_iter().flatten().filter_map(Value::as_str).collect();
            if verbs.iter().all(|v| matches!(*v, "get" | "list" | "watch")) {
                continue;
            }
            assert!(!verbs.iter().any(|v| matches!(*v, "delete" | "deletecollection" | "*")), "{verbs:?}");
            for r in rule["resources"].as_sequence().into_iter().flatten().filter_map(Value::as_str) {
                let deployment = matches!(r, "serviceaccounts" | "services" | "deployments");
                assert!(r.ends_with("/status") || deployment, "the controller may write {r}");
            }
        }
    }
}

#[test]
fn what_automated_deployment_makes_for_a_gateway_is_valid_kubernetes() {
    let g = mesh_agent::config::GatewayDeployment {
        namespace: "demo".into(),
        name: "hello".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        uid: Some("0b8f1a6e-4f6c-4c3e-9a55-2f1e3c7d9b10".into()),
        class: "istio".into(),
        controller: "istio.io/gateway-controller".into(),
        listeners: vec![("http".into(), 80, "HTTP".into()), ("tls".into(), 443, "TLS".into())],
    };
    let config = mesh_agent::controller::DeployConfig { image: "registry.k8s.io/pause:3.10".into() };
    let objects = mesh_agent::controller::gateway_objects(&g, &config);
    let yaml: Vec<String> = objects.iter().map(|(_, o)| serde_yaml_ng::to_string(o).expect("YAML")).collect();
    validate(&yaml.join("---\n"), "mesh-gateway-deployment");
    let kinds: Vec<&str> = objects.iter().map(|(r, _)| r.kind.as_str()).collect();
    assert_eq!(kinds, ["ServiceAccount", "Deployment", "Service"]);
    // Istio's names, and the label that makes the pods the Gateway's.
    for (_, o) in &objects {
        assert_eq!(o["metadata"]["name"], "hello-istio");
    }
    let template = &objects[1].1["spec"]["template"];
    assert_eq!(template["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"], "hello");
    assert_eq!(template["spec"]["securityContext"]["runAsNonRoot"], true);
}
