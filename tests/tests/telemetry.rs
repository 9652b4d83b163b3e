//! Istio's standard metrics as both of its reporters give them (root): the
//! source and the destination agent each count every request and every
//! connection, across nodes, on one node and from plaintext clients.
#![expect(clippy::unwrap_used, reason = "tests")]

use mesh_tests::{agent::metric, mesh::*, require_root};

/// `aaa-hello` selects helloworld's HTTP port too and sorts first, so a
/// destination that guessed the Service from the port would name it;
/// `ver-v2` is a Service whose one endpoint is on the client's node.
const SERVICES: &str = "---
apiVersion: v1
kind: Service
metadata: {name: aaa-hello, namespace: demo}
spec: {clusterIP: 10.96.0.20, selector: {app: helloworld}, ports: [{name: http, port: 80, targetPort: 9095}]}
---
apiVersion: v1
kind: Service
metadata: {name: ver-v2, namespace: demo}
spec: {clusterIP: 10.96.0.21, selector: {app: ver, version: v2}, ports: [{name: http, port: 80, targetPort: 8080}]}
";

const HELLO_SVC: &str = "helloworld.demo.svc.cluster.local";

#[test]
fn both_reporters_count_every_request_and_connection() {
    if !require_root("both_reporters_count_every_request_and_connection") {
        return;
    }
    let m = Mesh::start(SERVICES, &[]);
    let test = m.pod("test");
    // Across nodes: two requests to helloworld, one to api; a TCP echo.
    for url in [format!("http://{VIP}:9095/"), format!("http://{VIP}:9095/"), format!("http://{API_VIP}/hello")] {
        let (ok, out) = curl(test, &url);
        assert!(ok, "{url}: {out}");
    }
    let marker = b"both-reporters".to_vec();
    let echoed = test.run({
        let marker = marker.clone();
        move || mesh_tests::clients::tcp_echo(format!("{VIP}:7000").parse().unwrap(), &marker).unwrap()
    });
    assert_eq!(echoed, marker);
    // On one node: test → ver-v2 (node-1).
    let (ok, out) = curl(test, "http://10.96.0.21/hello");
    assert!(ok, "{out}");
    // Plaintext from an un-meshed pod to helloworld's address.
    let (ok, out) = curl(m.pod("outsider"), &format!("http://{HELLO_IP}:9095/"));
    assert!(ok, "{out}");

    let mtls = [("source_principal", TEST_ID), ("connection_security_policy", "mutual_tls")];
    let dest = |svc: &'static str, code: &'static str| {
        [("reporter", "destination"), ("destination_service", svc), ("response_code", code)]
            .into_iter()
            .chain(mtls)
            .collect::<Vec<_>>()
    };
    let hello_at_dest = dest(HELLO_SVC, "200");
    let plaintext = [
        ("reporter", "destination"),
        ("source_workload", "outsider"),
        ("source_principal", "unknown"),
        ("connection_security_policy", "none"),
        ("response_code", "200"),
    ];
    let node2 = m.agents[1].wait_metrics(5, "the destination's request metrics", |t| {
        metric(t, "istio_requests_total", &hello_at_dest) >= 2.0
            && metric(t, "istio_requests_total", &plaintext) >= 1.0
            && metric(t, "istio_tcp_connections_closed_total", &[("reporter", "destination")]) >= 2.0
    });
    // The destination names the Service the source addressed, not the first
    // one selecting the port (aaa-hello), for requests and connections alike.
    assert_eq!(metric(&node2, "istio_requests_total", &hello_at_dest), 2.0, "{node2}");
    assert_eq!(metric(&node2, "istio_requests_total", &dest("api.demo.svc.cluster.local", "200")), 1.0, "{node2}");
    let dest_tcp = [("reporter", "destination"), ("destination_service", HELLO_SVC)];
    assert!(metric(&node2, "istio_tcp_received_bytes_total", &dest_tcp) >= marker.len() as f64, "{node2}");
    // The echo, and the pooled connection the two requests shared.
    assert_eq!(metric(&node2, "istio_tcp_connections_opened_total", &dest_tcp), 2.0, "{node2}");
    assert_eq!(metric(&node2, "istio_tcp_connections_opened_total", &[("destination_service", "unknown")]), 0.0);
    // The histograms count every request at the destination too.
    let count = |name: &str| metric(&node2, &format!("{name}_count"), &hello_at_dest);
    assert_eq!(count("istio_request_duration_milliseconds"), 2.0, "{node2}");
    assert_eq!(count("istio_response_bytes"), 2.0, "{node2}");

    // The source side: the requests, and the HTTP client connections' own TCP series.
    let node1 = m.agents[0].wait_metrics(5, "the source's metrics", |t| {
        metric(
            t,
            "istio_requests_total",
            &[("reporter", "destination"), ("destination_service", "ver-v2.demo.svc.cluster.local")],
        ) >= 1.0
    });
    let src = [("reporter", "source"), ("destination_service", HELLO_SVC), ("source_principal", TEST_ID)];
    assert_eq!(metric(&node1, "istio_requests_total", &[src.as_slice(), &[("response_code", "200")]].concat()), 2.0);
    let http_conns = [src.as_slice(), &[("connection_security_policy", "mutual_tls")]].concat();
    // Two curl connections and the echo.
    assert!(metric(&node1, "istio_tcp_connections_opened_total", &http_conns) >= 3.0, "{node1}");
    assert!(metric(&node1, "istio_tcp_received_bytes_total", &http_conns) > 2.0 * 70.0, "{node1}");
    assert!(metric(&node1, "istio_tcp_sent_bytes_total", &http_conns) > 2.0 * 100.0, "{node1}");
    // On one node the agent is both reporters, one count each.
    let same_node = |reporter| {
        [("reporter", reporter), ("destination_service", "ver-v2.demo.svc.cluster.local"), ("response_code", "200")]
    };
    assert_eq!(metric(&node1, "istio_requests_total", &same_node("source")), 1.0, "{node1}");
    assert_eq!(metric(&node1, "istio_requests_total", &same_node("destination")), 1.0, "{node1}");
    let dest_conns = [("reporter", "destination"), ("destination_service", "ver-v2.demo.svc.cluster.local")];
    assert!(metric(&node1, "istio_tcp_connections_opened_total", &dest_conns) >= 1.0, "{node1}");
}

/// Telemetry: helloworld reports nothing as a server (no metric, no access
/// log: its agent does not even parse its requests); sleep leaves
/// `istio_requests_total` out as a client; test's request count, as a
/// client, gains `request_host` and loses `destination_canonical_revision`.
const TELEMETRY: &str = "---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: quiet-server, namespace: demo}
spec:
  selector: {matchLabels: {app: helloworld}}
  metrics: [{providers: [{name: prometheus}], overrides: [{match: {metric: ALL_METRICS, mode: SERVER}, disabled: true}]}]
  accessLogging: [{match: {mode: SERVER}, disabled: true}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: no-count, namespace: other}
spec:
  metrics: [{overrides: [{match: {metric: REQUEST_COUNT, mode: CLIENT}, disabled: true}]}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: tagged, namespace: demo}
spec:
  selector: {matchLabels: {app: test}}
  metrics:
  - overrides:
    - match: {metric: REQUEST_COUNT, mode: CLIENT}
      tagOverrides: {request_host: {value: request.host}, destination_canonical_revision: {operation: REMOVE}}
";

#[test]
fn the_telemetry_api_turns_a_side_or_a_metric_off() {
    if !require_root("the_telemetry_api_turns_a_side_or_a_metric_off") {
        return;
    }
    let log = std::env::temp_dir().join(format!("mesh-test-telemetry-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let m = Mesh::start(TELEMETRY, &["--access-log", log.to_str().unwrap()]);
    for (pod, url) in [("test", format!("http://{VIP}:9095/")), ("sleep", format!("http://{VIP}:9095/"))] {
        let (ok, out) = curl(m.pod(pod), &url);
        assert!(ok, "{pod}: {out}");
    }
    // The positive control: ver-v1, on the same node, still reports as a server.
    let (ok, out) = curl(m.pod("test"), &format!("http://{VER_V1_IP}:8080/hello"));
    assert!(ok, "{out}");
    let ver = [("reporter", "destination"), ("destination_workload", "ver"), ("destination_version", "v1")];
    let node2 =
        m.agents[1].wait_metrics(5, "ver-v1's server metrics", |t| metric(t, "istio_requests_total", &ver) >= 1.0);
    let hello = [("reporter", "destination"), ("destination_workload", "helloworld")];
    for name in
        ["istio_requests_total", "istio_request_duration_milliseconds_count", "istio_tcp_connections_opened_total"]
    {
        assert_eq!(metric(&node2, name, &hello), 0.0, "{name} reported for helloworld as a server:\n{node2}");
    }
    // The clients' side is untouched, but for sleep's request count.
    let node1 = m.agents[0].wait_metrics(5, "the clients' metrics", |t| {
        metric(t, "istio_request_duration_milliseconds_count", &[("source_workload", "sleep")]) >= 1.0
    });
    let from = |w| [("reporter", "source"), ("source_workload", w), ("destination_workload", "helloworld")];
    assert_eq!(metric(&node1, "istio_requests_total", &from("test")), 1.0, "{node1}");
    // test's tag overrides: on its request count alone.
    let tagged =
        [from("test").as_slice(), &[("request_host", "10.96.0.10:9095"), ("destination_canonical_revision", "")]]
            .concat();
    assert_eq!(metric(&node1, "istio_requests_total", &tagged), 1.0, "{node1}");
    let duration = [from("test").as_slice(), &[("destination_canonical_revision", "v1")]].concat();
    assert_eq!(metric(&node1, "istio_request_duration_milliseconds_count", &duration), 1.0, "{node1}");
    assert!(!node1.lines().any(|l| l.starts_with("istio_request_duration") && l.contains("request_host")), "{node1}");
    assert_eq!(metric(&node1, "istio_requests_total", &from("sleep")), 0.0, "{node1}");
    assert!(metric(&node1, "istio_tcp_connections_opened_total", &from("sleep")) >= 1.0, "{node1}");
    // The access log: ver-v1's server line, none for helloworld as a server.
    let text = mesh_tests::agent::wait_for_log(&log, |t| t.contains("inbound|8080||"));
    let _ = std::fs::remove_file(&log);
    assert!(text.contains("inbound|8080||"), "{text}");
    assert!(!text.contains("inbound|9095||"), "helloworld logged as a server:\n{text}");
    assert!(text.contains("outbound|9095||helloworld.demo.svc.cluster.local"), "{text}");
}

#[test]
fn a_telemetry_attached_to_a_service_changes_only_its_traffic() {
    if !require_root("a_telemetry_attached_to_a_service_changes_only_its_traffic") {
        return;
    }
    // Attached to aaa-hello: helloworld's agent stops counting requests
    // addressed to it (their duration is still reported); requests to
    // helloworld's own Service, and the client's counts, are unchanged.
    let attached = "---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: aaa-quiet, namespace: demo}\n\
        spec: {targetRefs: [{kind: Service, name: aaa-hello}], metrics: [{overrides: [{match: {metric: REQUEST_COUNT, mode: SERVER}, disabled: true}]}]}\n";
    let m = Mesh::start(&format!("{SERVICES}{attached}"), &[]);
    let test = m.pod("test");
    for url in ["http://10.96.0.20/", "http://10.96.0.20/", &format!("http://{VIP}:9095/")] {
        let (ok, out) = curl(test, url);
        assert!(ok, "{url}: {out}");
    }
    let aaa = "aaa-hello.demo.svc.cluster.local";
    let at = |reporter, svc| [("reporter", reporter), ("destination_service", svc)];
    let node2 = m.agents[1].wait_metrics(5, "the destination's request metrics", |t| {
        metric(t, "istio_requests_total", &at("destination", HELLO_SVC)) >= 1.0
            && metric(t, "istio_request_duration_milliseconds_count", &at("destination", aaa)) >= 2.0
    });
    assert_eq!(metric(&node2, "istio_requests_total", &at("destination", aaa)), 0.0, "{node2}");
    assert_eq!(metric(&node2, "istio_requests_total", &at("destination", HELLO_SVC)), 1.0, "{node2}");
    let node1 = m.agents[0].wait_metrics(5, "the source's request metrics", |t| {
        metric(t, "istio_requests_total", &at("source", aaa)) >= 2.0
    });
    assert_eq!(metric(&node1, "istio_requests_total", &at("source", aaa)), 2.0, "{node1}");
}
