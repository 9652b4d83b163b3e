//! OpenTelemetry tracing through the real data path (root): both nodes'
//! agents and an ingress gateway send their spans with OTLP/gRPC to a
//! receiver the test runs in an un-meshed pod behind a Service, as
//! MeshConfig names it; curl's trace headers are continued (W3C and B3) and the spans link
//! up parent to child across the nodes.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::time::{Duration, Instant};

use mesh_agent::telemetry::trace::receiver::{Received, Receiver};
use mesh_tests::{agent::metric, fixture::PodSpec, mesh::*, require_root, servers};

/// The ingress gateway pod's LoadBalancer address.
const INGRESS: &str = "172.18.100.1";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// The ingress gateway (a pod on node-1) routing `/helloworld` to helloworld's API.
const GATEWAY: &str = r#"---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ingress, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hello-ingress, namespace: demo}
spec:
  hosts: ["*"]
  gateways: [istio-system/ingress]
  http:
  - match: [{uri: {prefix: /helloworld}}]
    route: [{destination: {host: api, port: {number: 80}}}]
"#;

/// The spans of `trace`, once `n` have arrived.
fn spans_of(r: &Receiver, trace: &str, n: usize) -> Vec<Received> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let spans: Vec<Received> = r.spans().into_iter().filter(|s| s.trace_id() == trace).collect();
        if spans.len() >= n || Instant::now() > deadline {
            return spans;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The one span of `spans` with this kind (2 SERVER, 3 CLIENT) and service.
fn find<'a>(spans: &'a [Received], kind: i32, service: &str) -> &'a Received {
    let found: Vec<&Received> = spans.iter().filter(|s| s.span.kind == kind && s.service == service).collect();
    assert_eq!(found.len(), 1, "one span of kind {kind} for {service} in {spans:#?}");
    found[0]
}

fn curl_with(pod: &mesh_tests::Pod, headers: &[&str], url: &str) -> (String, String) {
    let mut args = vec!["curl", "-s", "--max-time", "5", "-w", "\n%{http_code}"];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(url);
    let out = pod.cmd(&args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
    (body.to_owned(), code.to_owned())
}

#[test]
fn spans_link_source_destination_and_gateway_across_nodes() {
    if !require_root("spans_link_source_destination_and_gateway_across_nodes") {
        return;
    }
    let mut f = fixture();
    let labels = [("istio", "ingressgateway")];
    let spec = PodSpec::gateway("istio-system", &labels, "istio-ingressgateway-service-account");
    f.gateway(
        0,
        "istio-ingressgateway",
        "10.244.1.100".parse().unwrap(),
        spec,
        ("10.96.0.40", INGRESS.parse().unwrap()),
        &[80],
    );
    // The collector in the `outsider` pod (un-meshed); every request traced.
    let mesh = "    defaultProviders: {tracing: [otel]}\n    defaultConfig: {tracing: {sampling: 100}}\n";
    let collector = servers::otlp_collector_config("plain", "outsider", "10.96.0.30", mesh);
    let m = Mesh::start_with(f, &format!("{collector}{GATEWAY}"), &[]);
    let r = servers::otlp_collector(m.pod("outsider"), false);
    let test = m.pod("test");

    // W3C from the client, across nodes: the app sees the destination's span.
    let tp = format!("traceparent: 00-{TRACE}-{CALLER_SPAN}-01");
    let (headers, code) = curl_with(test, &[&tp, "tracestate: vendor=opaque"], &format!("http://{API_VIP}/headers"));
    assert_eq!(code, "200", "{headers}");
    let spans = spans_of(&r, TRACE, 2);
    let source = find(&spans, 3, "test.demo");
    let dest = find(&spans, 2, "helloworld.demo");
    assert_eq!(source.parent_span_id(), CALLER_SPAN);
    assert_eq!(dest.parent_span_id(), source.span_id(), "the destination continues the source's span");
    assert!(
        headers.contains(&format!("traceparent: 00-{TRACE}-{}-01", dest.span_id())),
        "the app is told the destination's span: {headers}"
    );
    assert!(headers.contains("tracestate: vendor=opaque"), "{headers}");
    assert_eq!(source.span.name, "api.demo.svc.cluster.local:80/*");
    assert_eq!(dest.span.name, "api.demo.svc.cluster.local:80/*");
    for s in [source, dest] {
        assert_eq!(s.attribute("http.status_code"), Some("200"), "{s:#?}");
        assert_eq!(s.attribute("http.method"), Some("GET"));
        assert_eq!(s.attribute("http.url"), Some(format!("http://{API_VIP}/headers").as_str()));
        assert!(s.span.status.is_none(), "{s:#?}");
    }
    assert_eq!(source.attribute("istio.canonical_service"), Some("test"));
    assert_eq!(dest.attribute("istio.canonical_service"), Some("helloworld"));
    assert_eq!(source.attribute("upstream_cluster"), Some("outbound|80||api.demo.svc.cluster.local"));
    assert_eq!(dest.attribute("upstream_cluster"), Some("inbound|8080||"));
    assert_eq!(dest.attribute("peer.address"), Some(TEST_IP.to_string().as_str()));
    // One x-request-id for the whole path.
    assert_eq!(source.attribute("guid:x-request-id"), dest.attribute("guid:x-request-id"));

    // B3 only, and an error: the trace continues in B3 too, both spans fail.
    let b3_trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let b3 = [format!("x-b3-traceid: {b3_trace}"), "x-b3-spanid: 1111111111111111".into(), "x-b3-sampled: 1".into()];
    let b3: Vec<&str> = b3.iter().map(String::as_str).collect();
    let (_, code) = curl_with(test, &b3, &format!("http://{API_VIP}/status/503"));
    assert_eq!(code, "503");
    let (headers, _) = curl_with(test, &b3, &format!("http://{API_VIP}/headers"));
    let spans = spans_of(&r, b3_trace, 4);
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let failed: Vec<&Received> = spans.iter().filter(|s| s.attribute("http.status_code") == Some("503")).collect();
    assert_eq!(failed.len(), 2, "{spans:#?}");
    for s in &failed {
        assert_eq!(s.span.status.as_ref().map(|st| st.code), Some(2), "ERROR: {s:#?}");
        assert_eq!(s.attribute("error"), Some("true"));
    }
    let dest = spans.iter().find(|s| s.span.kind == 2 && s.attribute("http.status_code") == Some("200")).unwrap();
    assert!(headers.contains(&format!("x-b3-spanid: {}", dest.span_id())), "{headers}");
    assert!(headers.contains(&format!("x-b3-traceid: {b3_trace}")), "{headers}");

    // Through the ingress gateway from outside the mesh: the gateway's span,
    // its upstream span under it, and the destination's under that.
    let gw_trace = "6bf92f3577b34da6a3ce929d0e0e4738";
    let out = m.c.net_cmd(&[
        "curl",
        "-sf",
        "--max-time",
        "5",
        "-H",
        &format!("traceparent: 00-{gw_trace}-{CALLER_SPAN}-01"),
        &format!("http://{INGRESS}/helloworld/headers"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let spans = spans_of(&r, gw_trace, 3);
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let server =
        spans.iter().find(|s| s.span.kind == 2 && s.parent_span_id() == CALLER_SPAN).expect("the gateway's span");
    let upstream = spans.iter().find(|s| s.span.kind == 3).expect("the gateway's upstream span");
    let dest = find(&spans, 2, "helloworld.demo");
    assert_eq!(upstream.parent_span_id(), server.span_id());
    assert_eq!(dest.parent_span_id(), upstream.span_id());
    assert_eq!(server.service, upstream.service);
    assert_eq!(server.span.name, "api.demo.svc.cluster.local:80/helloworld*");
    assert_eq!(upstream.span.name, "router outbound|80||api.demo.svc.cluster.local egress");

    // The gateway's own answer (no route): its span alone, no upstream span.
    let no_route = "7bf92f3577b34da6a3ce929d0e0e4739";
    let out = m.c.net_cmd(&[
        "curl",
        "-s",
        "--max-time",
        "5",
        "-H",
        &format!("traceparent: 00-{no_route}-{CALLER_SPAN}-01"),
        &format!("http://{INGRESS}/nothing-here"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let spans = spans_of(&r, no_route, 1);
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!((spans[0].span.kind, spans[0].attribute("http.status_code")), (2, Some("404")));

    // Every span was exported, none dropped, and the counters say so.
    for a in &m.agents {
        let text = a.metrics();
        assert!(metric(&text, "mesh_trace_spans_total", &[("result", "exported")]) >= 3.0, "{text}");
        for dropped in ["queue_full", "export_failed", "rejected"] {
            assert_eq!(metric(&text, "mesh_trace_spans_total", &[("result", dropped)]), 0.0, "{dropped}");
        }
    }
}
