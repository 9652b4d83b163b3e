//! Objects reduced on arrival to the fields the agent reads (as ztunnel and
//! Cilium strip theirs), so that memory follows what matters: a Pod keeps its
//! name, labels, owner, node, service account, ports, IP and readiness, not
//! its containers' images, environment, volumes or managed fields.
use kube::api::DynamicObject;
use serde_json::{Map, Value, json};

use super::Kind;

/// The Secret keys credentials are read from: `tls.crt`, `tls.key` (or
/// Istio's generic `cert`, `key`), the CA as `ca.crt` or `cacert`, and a
/// revocation list as `ca.crl`.
const SECRET_KEYS: &[&str] = &["tls.crt", "tls.key", "cert", "key", "ca.crt", "cacert", "ca.crl"];

/// The annotations the configuration builder reads.
const READ_ANNOTATIONS: &[&str] = &["inject.istio.io/templates", "ambient.istio.io/dns-capture"];

/// The object as the configuration builder reads it: `apiVersion`, `kind`,
/// the metadata it uses and the kind's fields it uses.
pub(super) fn reduce(kind: &Kind, obj: DynamicObject) -> Value {
    let meta = &obj.metadata;
    let mut metadata = Map::new();
    let mut put = |k: &str, v: Value| {
        if !v.is_null() {
            metadata.insert(k.to_owned(), v);
        }
    };
    put("name", json!(meta.name));
    put("namespace", json!(meta.namespace));
    put("uid", json!(meta.uid));
    put("generation", json!(meta.generation));
    put("creationTimestamp", json!(meta.creation_timestamp.as_ref().map(|t| t.0.to_string())));
    if let Some(labels) = meta.labels.as_ref().filter(|l| !l.is_empty()) {
        put("labels", json!(labels));
    }
    // Of the annotations, only those the agent reads (a Pod's gateway
    // injection template); `last-applied-configuration` and the like go.
    let kept = |k: &String| READ_ANNOTATIONS.contains(&k.as_str());
    if let Some(annotations) = meta.annotations.as_ref().filter(|a| a.keys().any(kept)) {
        put(
            "annotations",
            json!(annotations.iter().filter(|(k, _)| kept(k)).collect::<std::collections::BTreeMap<_, _>>()),
        );
    }
    if let Some(owners) = meta.owner_references.as_ref().filter(|o| !o.is_empty()) {
        let owners: Vec<Value> =
            owners.iter().map(|o| json!({"kind": o.kind, "name": o.name, "controller": o.controller})).collect();
        put("ownerReferences", Value::Array(owners));
    }
    let mut out = Map::new();
    out.insert("apiVersion".into(), Value::String(kind.api_version()));
    out.insert("kind".into(), Value::String(kind.kind.to_owned()));
    out.insert("metadata".into(), Value::Object(metadata));
    let data = obj.data;
    let field = |path: &[&str]| path.iter().try_fold(&data, |v, k| v.get(k)).cloned();
    let fields: &[(&str, &[&str])] = match kind.kind {
        "Pod" => &[("spec", &["nodeName", "serviceAccountName", "hostNetwork"]), ("status", &["podIP", "phase"])],
        "Service" => &[("spec", &["clusterIP", "selector"])],
        "Node" => &[("spec", &["podCIDR", "podCIDRs"]), ("status", &["addresses"])],
        "Namespace" => &[],
        "ConfigMap" => &[("data", &[])],
        // Only the keys a Gateway or DestinationRule credential is read
        // from: other secrets' contents never stay in a node agent's memory.
        "Secret" => &[("type", &[]), ("data", SECRET_KEYS), ("stringData", SECRET_KEYS)],
        _ => &[("spec", &[])],
    };
    for (top, keep) in fields {
        let Some(value) = field(&[top]) else { continue };
        let value = match (keep.is_empty(), value) {
            (true, v) => v,
            (false, Value::Object(m)) => {
                Value::Object(m.into_iter().filter(|(k, _)| keep.contains(&k.as_str())).collect())
            }
            (false, other) => other,
        };
        out.insert((*top).to_owned(), value);
    }
    match kind.kind {
        "Pod" => {
            for list in ["containers", "initContainers"] {
                let containers = field(&["spec", list]).and_then(|c| c.as_array().cloned()).unwrap_or_default();
                if list == "containers" || !containers.is_empty() {
                    set(&mut out, "spec", list, Value::Array(containers.iter().map(container).collect()));
                }
            }
            let conditions = field(&["status", "conditions"]).and_then(|c| c.as_array().cloned()).unwrap_or_default();
            let conditions: Vec<Value> =
                conditions.iter().map(|c| json!({"type": c.get("type"), "status": c.get("status")})).collect();
            set(&mut out, "status", "conditions", Value::Array(conditions));
        }
        "Service" => {
            let ports = field(&["spec", "ports"]).and_then(|c| c.as_array().cloned()).unwrap_or_default();
            let ports: Vec<Value> = ports
                .iter()
                .map(|p| {
                    let keep = ["name", "port", "targetPort", "protocol", "appProtocol"];
                    Value::Object(keep.iter().filter_map(|k| Some(((*k).to_owned(), p.get(*k)?.clone()))).collect())
                })
                .collect();
            set(&mut out, "spec", "ports", Value::Array(ports));
        }
        _ => {}
    }
    Value::Object(out)
}

/// What the agent reads of a container: its ports and where its probes connect.
fn container(c: &Value) -> Value {
    let ports = c.get("ports").and_then(Value::as_array).cloned().unwrap_or_default();
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| json!({"name": p.get("name"), "containerPort": p.get("containerPort"), "protocol": p.get("protocol")}))
        .map(without_nulls)
        .collect();
    let mut kept = json!({"name": c.get("name"), "ports": ports});
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = c.get(probe).map(probe_target) {
            kept[probe] = p;
        }
    }
    kept
}

/// What the agent reads of a probe: where its TCP handlers connect.
fn probe_target(probe: &Value) -> Value {
    let mut out = Map::new();
    for handler in ["httpGet", "tcpSocket", "grpc"] {
        if let Some(h) = probe.get(handler) {
            out.insert(handler.to_owned(), without_nulls(json!({"port": h.get("port"), "host": h.get("host")})));
        }
    }
    Value::Object(out)
}

fn set(out: &mut Map<String, Value>, top: &str, key: &str, value: Value) {
    let entry = out.entry(top.to_owned()).or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(m) = entry {
        m.insert(key.to_owned(), value);
    }
}

fn without_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.into_iter().filter(|(_, v)| !v.is_null()).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use kube::api::DynamicObject;
    use serde_json::json;

    use super::reduce;
    use crate::discovery::agent_kinds;

    #[test]
    fn a_secret_keeps_only_the_keys_credentials_are_read_from() {
        let secret: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "mixed", "namespace": "istio-system", "annotations": {"a": "b"}},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5", "ca.crt": "Y2E=", "ca.crl": "Y3Js", "db-password": "aHVudGVyMg=="},
            "stringData": {"api-token": "secret"},
        }))
        .expect("a Secret");
        let kind = agent_kinds(&["istio-system".to_owned()]).into_iter().find(|k| k.kind == "Secret").expect("Secrets");
        let reduced = reduce(&kind, secret);
        assert_eq!(
            reduced["data"],
            json!({"tls.crt": "Y2VydA==", "tls.key": "a2V5", "ca.crt": "Y2E=", "ca.crl": "Y3Js"})
        );
        assert_eq!(reduced["stringData"], json!({}));
        assert!(reduced["metadata"].get("annotations").is_none());
    }

    #[test]
    fn a_pod_keeps_its_ports_and_where_its_probes_connect() {
        let pod: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "demo"},
            "spec": {
                "containers": [{
                    "name": "app", "image": "app:1", "env": [{"name": "PASSWORD", "value": "x"}],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http", "httpHeaders": [{"name": "a", "value": "b"}]}, "periodSeconds": 5},
                    "livenessProbe": {"exec": {"command": ["true"]}},
                }],
                "initContainers": [{"name": "proxy", "restartPolicy": "Always", "startupProbe": {"tcpSocket": {"port": 9901}}}],
            },
        }))
        .expect("a Pod");
        let kind = agent_kinds(&[]).into_iter().find(|k| k.kind == "Pod").expect("Pods");
        let reduced = reduce(&kind, pod);
        assert_eq!(
            reduced["spec"]["containers"],
            json!([{"name": "app", "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"port": "http"}}, "livenessProbe": {}}])
        );
        assert_eq!(
            reduced["spec"]["initContainers"],
            json!([{"name": "proxy", "ports": [], "startupProbe": {"tcpSocket": {"port": 9901}}}])
        );
    }
}
