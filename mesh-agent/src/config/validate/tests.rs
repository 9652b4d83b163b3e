use std::{path::Path, sync::Arc};

use super::super::load::parse_text;
use crate::config::{ConfigError, Loaded, load_documents};

fn load(yaml: &str) -> Result<Loaded, Vec<ConfigError>> {
    let file: Arc<Path> = Path::new("cluster.yaml").into();
    let (mut docs, mut errors) = (Vec::new(), Vec::new());
    parse_text(&file, yaml, &mut docs, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let loaded = load_documents(&docs, "cluster.local");
    if loaded.rejected.is_empty() { Ok(loaded) } else { Err(loaded.rejected) }
}

/// The load, whatever was rejected.
fn admitted(yaml: &str) -> Loaded {
    let file: Arc<Path> = Path::new("cluster.yaml").into();
    let (mut docs, mut errors) = (Vec::new(), Vec::new());
    parse_text(&file, yaml, &mut docs, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    load_documents(&docs, "cluster.local")
}

fn error_of(yaml: &str) -> String {
    match load(yaml) {
        Ok(_) => panic!("expected an error for:\n{yaml}"),
        Err(errors) => errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"),
    }
}

const MESHED_NS: &str =
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n---\n";

#[test]
fn invalid_input_names_file_object_and_field() {
    let cases = [
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: demo}\nstatus: {podIP: 10.0.0.300}\n",
            "cluster.yaml (document 1): Pod demo/p: status.podIP: \"10.0.0.300\" is not an IPv4 address",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se, namespace: demo}\n\
             spec: {hosts: [a.example], addresses: [\"10.0.0.0/8\", \"2001:db8::/32\"], ports: [{number: 22, name: tcp, protocol: TCP}]}\n",
            "cluster.yaml (document 1): ServiceEntry demo/se: spec.addresses[1]: \"2001:db8::/32\": expected an IPv4 address or CIDR range (IPv6 is not supported by this version of mesh-agent)",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se, namespace: demo}\n\
             spec: {hosts: [a.internal], resolution: DNS, workloadSelector: {labels: {app: a}}, ports: [{number: 80, name: http, protocol: HTTP}]}\n",
            "cluster.yaml (document 1): ServiceEntry demo/se: spec.resolution: a workloadSelector's endpoints are its pods: resolution STATIC",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se, namespace: demo}\n\
             spec: {hosts: [a.internal], resolution: STATIC, workloadSelector: {labels: {}}, ports: [{number: 80, name: http, protocol: HTTP}]}\n",
            "cluster.yaml (document 1): ServiceEntry demo/se: spec.workloadSelector.labels: empty: it would select every pod of the namespace",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se, namespace: demo}\n\
             spec: {hosts: [a.example], subjectAltNames: [a.example], resolution: STATIC, endpoints: [{address: 192.0.2.1}], ports: [{number: 80, name: http, protocol: HTTP}]}\n",
            "cluster.yaml (document 1): ServiceEntry demo/se: spec.subjectAltNames: verified on the mesh's mTLS to the entry's pods: only with workloadSelector (other endpoints prove no identity; a DestinationRule's tls.subjectAltNames checks a server's certificate)",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se, namespace: demo}\n\
             spec: {hosts: [\"*.example\", a.example], resolution: DYNAMIC_DNS, ports: [{number: 80, name: http, protocol: HTTP}]}\n",
            "cluster.yaml (document 1): ServiceEntry demo/se: spec.hosts[1]: DYNAMIC_DNS resolves the host each request names: wildcard hosts only",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se, namespace: demo}\n\
             spec: {hosts: [\"*.example\"], resolution: DYNAMIC_DNS, ports: [{number: 22, name: ssh, protocol: TCP}]}\n",
            "cluster.yaml (document 1): ServiceEntry demo/se: spec.ports[0].protocol: DYNAMIC_DNS needs the host the traffic names: HTTP, HTTP2, GRPC, HTTPS or TLS",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se, namespace: demo}\n\
             spec: {hosts: [api.example], resolution: DNS, endpoints: [{address: \"not a name\"}], ports: [{number: 80, name: http, protocol: HTTP}]}\n",
            "cluster.yaml (document 1): ServiceEntry demo/se: spec.endpoints[0].address: \"not a name\" is neither an IPv4 address nor a host name",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se, namespace: demo}\n\
             spec: {hosts: [a.example], addresses: [\"10.0.0.0/33\"], ports: [{number: 22, name: tcp, protocol: TCP}]}\n",
            "cluster.yaml (document 1): ServiceEntry demo/se: spec.addresses[0]: \"10.0.0.0/33\": expected an IPv4 address or CIDR range (IPv6 is not supported by this version of mesh-agent)",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 70000}]}\n",
            "cluster.yaml (document 1): Service default/s: spec.ports[0].port: port 70000 is out of range 1-65535",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, targetPort: Bad_Name}]}\n",
            "cluster.yaml (document 1): Service default/s: spec.ports[0].targetPort: \"Bad_Name\" is neither a port number nor a valid port name",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: eighty}]}\n",
            "cluster.yaml (document 1): Service default/s: spec.ports[0].port: invalid type: string \"eighty\", expected i64",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: 10.0.0.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b}\nstatus: {podIP: 10.0.0.1}\n",
            "cluster.yaml (document 2): Pod default/b: status.podIP: 10.0.0.1 is already the IP of Pod default/a",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: x}\nspec: {clusterIP: 10.96.0.1}\n",
            "cluster.yaml (document 2): Service x/b: spec.clusterIP: 10.96.0.1 is already the clusterIP of Service default/a",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {istio.io/dataplane-mode: sidecar}}\n",
            "cluster.yaml (document 1): Pod default/p: metadata.labels[istio.io/dataplane-mode]: \"sidecar\": expected \"ambient\" or \"none\"",
        ),
        (
            "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t, namespace: demo}\nspec: {tracing: [{providers: [{name: jaeger}]}]}\n",
            "cluster.yaml (document 1): Telemetry demo/t: spec.tracing[0].providers[0].name: \"jaeger\": not an opentelemetry provider of MeshConfig's extensionProviders",
        ),
        (
            "apiVersion: networking.istio.io/v1alpha3\nkind: Sidecar\nmetadata: {name: s, namespace: demo}\n",
            "cluster.yaml (document 1): Sidecar demo/s: kind: networking.istio.io/v1alpha3 Sidecar is not supported by this version of mesh-agent",
        ),
        (
            "kind: Pod\nmetadata: {name: p}\n",
            "cluster.yaml (document 1): document: apiVersion: missing `apiVersion`: every document must be a Kubernetes object",
        ),
        (
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nstatus: {addresses: [{type: InternalIP, address: nope}]}\n",
            "cluster.yaml (document 1): Node n1: status.addresses[0].address: \"nope\" is not an IPv4 address",
        ),
        (
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDRs: [10.244.0.0/24, 10.9.0.0/33]}\n",
            "cluster.yaml (document 1): Node n1: spec.podCIDRs: \"10.9.0.0/33\": prefix length above 32",
        ),
    ];
    for (yaml, want) in cases {
        assert_eq!(error_of(yaml), want);
    }
}

#[test]
fn yaml_syntax_error_names_the_line() {
    let err = error_of("apiVersion: v1\nkind: Pod\nmetadata: {name: p\n");
    assert!(err.starts_with("cluster.yaml (document 1): document: -: YAML syntax:"), "{err}");
    assert!(err.contains("line"), "{err}");
}

#[test]
fn enrollment_follows_istio_ambient() {
    let yaml = format!(
        "{MESHED_NS}apiVersion: v1\nkind: Namespace\nmetadata: {{name: plain}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: in-ns, namespace: demo}}\nstatus: {{podIP: 10.0.0.1}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: opted-out, namespace: demo, labels: {{istio.io/dataplane-mode: none}}}}\nstatus: {{podIP: 10.0.0.2}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: plain-pod, namespace: plain}}\nstatus: {{podIP: 10.0.0.3}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: opted-in, namespace: plain, labels: {{istio.io/dataplane-mode: ambient}}}}\nstatus: {{podIP: 10.0.0.4}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: host, namespace: demo}}\nspec: {{hostNetwork: true}}\nstatus: {{podIP: 172.18.0.2}}\n"
    );
    let state = load(&yaml).expect("valid").state;
    let meshed = |k: &str| state.workloads[k].meshed;
    assert!(meshed("demo/in-ns"));
    assert!(!meshed("demo/opted-out"));
    assert!(!meshed("plain/plain-pod"));
    assert!(meshed("plain/opted-in"));
    assert!(!meshed("demo/host"), "hostNetwork pods are never captured");
}

#[test]
fn kubectl_output_loads_with_unused_fields_ignored() {
    let yaml = r#"
apiVersion: v1
kind: List
metadata: {resourceVersion: ""}
items:
- apiVersion: v1
  kind: Pod
  metadata:
    name: helloworld-v1-7d8f9c6b5-x2x9z
    namespace: default
    uid: 0b4b7d2e-5a9b-4e7c-9a3e-1d6f1c2b3a4d
    labels: {app: helloworld, version: v1, pod-template-hash: 7d8f9c6b5}
    ownerReferences:
    - {apiVersion: apps/v1, kind: ReplicaSet, name: helloworld-v1-7d8f9c6b5, controller: true, uid: x}
  spec:
    nodeName: node-1
    serviceAccountName: helloworld
    containers:
    - name: helloworld
      image: docker.io/istio/examples-helloworld-v1
      ports: [{containerPort: 5000, protocol: TCP}]
      resources: {requests: {cpu: 100m}}
  status:
    phase: Running
    podIP: 10.244.1.5
    podIPs: [{ip: 10.244.1.5}]
    conditions: [{type: Ready, status: "True", lastTransitionTime: null}]
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: helloworld-v1}
"#;
    let loaded = load(yaml).expect("valid");
    let w = &loaded.state.workloads["default/helloworld-v1-7d8f9c6b5-x2x9z"];
    assert_eq!(&*w.workload_name, "helloworld-v1");
    assert_eq!(&*w.app, "helloworld");
    assert_eq!(&*w.version, "v1");
    assert_eq!(&*w.principal, "spiffe://cluster.local/ns/default/sa/helloworld");
    assert!(w.ready);
    assert_eq!(loaded.notes.len(), 1, "{:?}", loaded.notes);
    assert!(
        loaded.notes[0].contains("Deployment default/helloworld-v1: apps/v1 not used by mesh-agent, skipped"),
        "{:?}",
        loaded.notes
    );
}

#[test]
fn routing_rules_are_validated_field_by_field() {
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: hello, namespace: demo}\n\
               spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}\n---\n";
    let vs = |spec: &str| {
        format!(
            "{svc}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v, namespace: demo}}\nspec: {spec}\n"
        )
    };
    let dr = |spec: &str| {
        format!(
            "{svc}apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d, namespace: demo}}\nspec: {spec}\n"
        )
    };
    let at = "cluster.yaml (document 2)";
    let cases = [
        (
            vs("{hosts: [nope], http: [{route: [{destination: {host: hello}}]}]}"),
            format!("{at}: VirtualService demo/v: spec.hosts[0]: \"nope\" is not a known Service"),
        ),
        (
            vs(
                "{hosts: [hello], http: [{route: [{destination: {host: hello}, weight: 70}, {destination: {host: hello}, weight: 20}]}]}",
            ),
            format!("{at}: VirtualService demo/v: spec.http[0].route: weights add up to 90, not 100"),
        ),
        (
            vs("{hosts: [hello], http: [{route: [{destination: {host: hello, port: {number: 81}}}]}]}"),
            format!(
                "{at}: VirtualService demo/v: spec.http[0].route[0].destination.port.number: Service demo/hello has no port 81"
            ),
        ),
        (
            vs("{hosts: [hello], http: [{route: [{destination: {host: hello}}], timeout: 5x}]}"),
            format!(
                "{at}: VirtualService demo/v: spec.http[0].timeout: \"5x\": unknown unit \"x\" (ns, us, ms, s, m or h)"
            ),
        ),
        (
            vs("{hosts: [hello], http: [{match: [{uri: {regex: \"(\"}}], route: [{destination: {host: hello}}]}]}"),
            format!("{at}: VirtualService demo/v: spec.http[0].match[0].uri.regex: \"(\": "),
        ),
        (
            vs(
                "{hosts: [hello], http: [{match: [{uri: {exact: /a, prefix: /b}}], route: [{destination: {host: hello}}]}]}",
            ),
            format!(
                "{at}: VirtualService demo/v: spec.http[0].match[0].uri: exactly one of exact, prefix or regex is required"
            ),
        ),
        (
            vs(
                "{hosts: [hello], http: [{mirrors: [{destination: {host: hello}}], route: [{destination: {host: hello}}]}]}",
            ),
            format!("{at}: VirtualService demo/v: spec.http[0].mirrors: not supported by this version of mesh-agent"),
        ),
        (
            vs("{hosts: [hello], http: [{mirror: {host: nope}, route: [{destination: {host: hello}}]}]}"),
            format!(
                "{at}: VirtualService demo/v: spec.http[0].mirror.destination.host: \"nope\" is not a known Service"
            ),
        ),
        (
            vs(
                "{hosts: [hello], http: [{fault: {abort: {percentage: {value: 50}}}, route: [{destination: {host: hello}}]}]}",
            ),
            format!("{at}: VirtualService demo/v: spec.http[0].fault.abort.httpStatus: required"),
        ),
        (
            vs(
                "{hosts: [hello], http: [{retries: {attempts: 2, retryOn: \"5xx,unavailable\"}, route: [{destination: {host: hello}}]}]}",
            ),
            format!(
                "{at}: VirtualService demo/v: spec.http[0].retries.retryOn: condition 2 \"unavailable\": supported are"
            ),
        ),
        (
            vs(
                "{hosts: [hello], http: [{headers: {request: {set: {\"bad name\": x}}}, route: [{destination: {host: hello}}]}]}",
            ),
            format!(
                "{at}: VirtualService demo/v: spec.http[0].headers.request.set.bad name: \"bad name\" is not a valid header name"
            ),
        ),
        (
            vs(
                "{hosts: [hello], http: [{headers: {response: {add: {x-ok: \"a\\nb\"}}}, route: [{destination: {host: hello}}]}]}",
            ),
            format!(
                "{at}: VirtualService demo/v: spec.http[0].headers.response.add.x-ok: \"a\\nb\" is not a valid header value"
            ),
        ),
        (
            vs("{hosts: [hello], http: [{rout: []}]}"),
            format!("{at}: VirtualService demo/v: spec.http[0].rout: unknown field `rout`"),
        ),
        (
            dr("{host: hello, trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}}"),
            format!(
                "{at}: DestinationRule demo/d: spec.trafficPolicy.loadBalancer.simple: PASSTHROUGH is not supported by this version of mesh-agent"
            ),
        ),
        (
            vs("{hosts: [hello], tcp: [{match: [{sourceLabels: {app: x}}], route: [{destination: {host: hello}}]}]}"),
            format!(
                "{at}: VirtualService demo/v: spec.tcp[0].match[0].sourceLabels: not supported by this version of mesh-agent"
            ),
        ),
        (
            dr("{host: hello, subsets: [{name: v1, labels: {version: v1}}, {name: v1}]}"),
            format!("{at}: DestinationRule demo/d: spec.subsets[1].name: subset \"v1\" is defined twice"),
        ),
        (
            dr("{host: hello.demo.svc.cluster.local, trafficPolicy: {outlierDetection: {minHealthPercent: 50}}}"),
            format!(
                "{at}: DestinationRule demo/d: spec.trafficPolicy.outlierDetection.minHealthPercent: not supported by this version of mesh-agent"
            ),
        ),
    ];
    for (yaml, want) in cases {
        let got = error_of(&yaml);
        assert!(got.starts_with(&want), "for:\n{yaml}\nwant: {want}\ngot:  {got}");
    }
    let ok = format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d, namespace: demo}}\n\
         spec: {{host: 10.96.0.10, subsets: [{{name: v1, labels: {{version: v1}}}}]}}\n",
        vs(
            "{hosts: [hello.demo], http: [{match: [{headers: {X-User: {prefix: a}}, port: 80}], route: [{destination: {host: hello.demo.svc, subset: v1}}], timeout: 250ms}]}"
        )
    );
    let loaded = load(&ok).expect("valid");
    let v = &loaded.state.virtual_services[0];
    assert_eq!(v.hosts, ["demo/hello"]);
    assert_eq!(v.http[0].matches[0].headers[0].0, "x-user");
    assert_eq!(v.http[0].timeout, Some(std::time::Duration::from_millis(250)));
    assert_eq!(loaded.state.destination_rules[0].service, "demo/hello");
}

const TWO_PODS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n\
    ---\napiVersion: v1\nkind: Pod\nmetadata: {name: hello, namespace: demo, labels: {app: hello}}\n\
    spec: {nodeName: n1, serviceAccountName: hello}\nstatus: {podIP: 10.244.0.2}\n\
    ---\napiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: demo, labels: {app: db}}\n\
    spec: {nodeName: n1}\nstatus: {podIP: 10.244.0.3}\n";

#[test]
fn virtual_services_claiming_a_host_apply_oldest_first() {
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: hello, namespace: demo}\n\
               spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}\n";
    let vs = |name: &str, created: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n\
             metadata: {{name: {name}, namespace: demo{created}}}\n\
             spec: {{hosts: [hello], http: [{{route: [{{destination: {{host: hello}}}}]}}]}}\n"
        )
    };
    let yaml = format!(
        "{svc}{}{}{}",
        vs("a-newer", ", creationTimestamp: '2026-03-01T00:00:00Z'"),
        vs("b-older", ", creationTimestamp: '2025-01-01T00:00:00Z'"),
        vs("c-by-hand", ""),
    );
    let loaded = load(&yaml).unwrap_or_else(|e| panic!("{e:?}"));
    let order: Vec<&str> = loaded.state.virtual_services.iter().map(|v| &*v.name).collect();
    assert_eq!(order, ["b-older", "a-newer", "c-by-hand"]);
}

mod admission;
mod gateway_api;
mod gateway_status;
mod gateway_tls;
mod origination_tls;
mod security;

#[test]
fn probe_ports_are_those_the_kubelet_connects_to() {
    let pod = |containers: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: demo}}\n\
             spec: {{nodeName: node-1, {containers}}}\nstatus: {{podIP: 10.244.0.9}}\n"
        )
    };
    let cases: [(&str, &[u16]); 6] = [
        (
            "containers: [{name: a, ports: [{name: http, containerPort: 8080}], readinessProbe: {httpGet: {port: http}}}]",
            &[8080],
        ),
        (
            "containers: [{name: a, livenessProbe: {tcpSocket: {port: 9000}}, startupProbe: {grpc: {port: 9001}}}]",
            &[9000, 9001],
        ),
        // A name is resolved in the probed container only, as the kubelet does.
        (
            "containers: [{name: a, readinessProbe: {httpGet: {port: metrics}}}, {name: b, ports: [{name: metrics, containerPort: 9090}]}]",
            &[],
        ),
        // Another host is probed, not the pod; exec runs inside the pod.
        (
            "containers: [{name: a, livenessProbe: {httpGet: {host: 10.0.0.1, port: 80}}, readinessProbe: {exec: {command: [\"true\"]}}}]",
            &[],
        ),
        ("containers: [{name: a, readinessProbe: {httpGet: {port: \"8081\"}}}]", &[8081]),
        ("initContainers: [{name: s, restartPolicy: Always, startupProbe: {tcpSocket: {port: 15021}}}]", &[15021]),
    ];
    for (containers, want) in cases {
        let loaded = load(&pod(containers)).unwrap_or_else(|e| panic!("{containers}: {e:?}"));
        let got: Vec<u16> = loaded.state.workloads["demo/p"].probe_ports.iter().copied().collect();
        assert_eq!(got, want, "{containers}");
    }
    let err = error_of(&pod("containers: [{name: a, readinessProbe: {tcpSocket: {port: 70000}}}]"));
    assert!(err.contains("spec.containers[0].readinessProbe.tcpSocket.port"), "{err}");
}

#[test]
fn a_nodes_pod_ranges_are_its_ipv4_pod_cidrs() {
    let node = |spec: &str| {
        let yaml = format!("apiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\nspec: {spec}\n");
        let cidrs = admitted(&yaml).state.nodes["n1"].pod_cidrs.clone();
        cidrs.iter().map(|c| format!("{}/{}", c.addr, c.prefix)).collect::<Vec<_>>()
    };
    assert_eq!(node("{podCIDR: 10.244.1.0/24}"), ["10.244.1.0/24"]);
    // podCIDRs wins (podCIDR is its first entry); IPv6 ranges are skipped.
    assert_eq!(node("{podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24, 'fd00:10::/64']}"), ["10.244.1.0/24"]);
    assert!(node("{}").is_empty());
}

#[test]
fn a_scheduled_pod_without_an_address_yet_is_known_to_its_node() {
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: demo, labels: {istio.io/dataplane-mode: ambient}}\nspec: {nodeName: n1}\n";
    let state = admitted(yaml).state;
    assert_eq!(state.scheduled_workloads("n1").map(|w| w.name.to_string()).collect::<Vec<_>>(), ["p"]);
    assert_eq!(state.local_workloads("n1").count(), 0, "not addressable yet");
}

#[test]
fn canonical_service_and_revision_follow_istio() {
    let pod = |labels: &str, owner: &str| {
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p-5d9f8c7b6-abcde, namespace: demo, labels: {{{labels}}}{owner}}}\n\
             spec: {{nodeName: n1}}\nstatus: {{podIP: 10.244.0.9}}\n"
        );
        let state = admitted(&yaml).state;
        let w = state.workloads.values().next().expect("the pod");
        (w.canonical_service.to_string(), w.canonical_revision.to_string())
    };
    let rs = ", ownerReferences: [{kind: ReplicaSet, name: reviews-v2-5d9f8c7b6, controller: true}]";
    let cases = [
        // Istio's own labels first, then app.kubernetes.io/*, then app/version.
        (
            "service.istio.io/canonical-name: c, app.kubernetes.io/name: k, app: a, service.istio.io/canonical-revision: r, version: v",
            "",
            ("c", "r"),
        ),
        ("app.kubernetes.io/name: k, app: a, app.kubernetes.io/version: '2', version: v", "", ("k", "2")),
        ("app: a, version: v", "", ("a", "v")),
        // No label: the workload's name (the Deployment's), and `latest`.
        ("", rs, ("reviews-v2", "latest")),
    ];
    for (labels, owner, want) in cases {
        assert_eq!(pod(labels, owner), (want.0.to_owned(), want.1.to_owned()), "{labels}");
    }
}
