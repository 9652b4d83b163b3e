//! The source's span, in-process: the caller's trace continued, the
//! upstream told this agent's span, and the span exported with OTLP to a
//! receiver the test runs (behind a Service, as MeshConfig names it).
use std::{net::Ipv4Addr, time::Duration};

use super::*;
use crate::telemetry::trace::receiver::Receiver;

const COLLECTOR_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// An upstream answering with the `traceparent` it was sent; its port.
async fn traceparent_echo() -> u16 {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                let tp = req.headers().get("traceparent").map(|v| v.as_bytes().to_vec()).unwrap_or_default();
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(tp))))
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc));
        }
    });
    port
}

/// `hello` behind a prefix route; the collector's pod and Service; MeshConfig
/// tracing every request to it.
fn traced_cluster(port: u16, collector_port: u16) -> String {
    cluster(
        port,
        "{match: [{uri: {prefix: /api}}], route: [{destination: {host: hello}}]}, {route: [{destination: {host: hello}}]}",
    ) + &format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: otel, namespace: plain, labels: {{app: otel}}}}\n\
             spec: {{nodeName: n1}}\nstatus: {{podIP: {COLLECTOR_IP}, phase: Running}}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {{name: otel, namespace: plain}}\n\
             spec: {{clusterIP: 10.96.0.99, selector: {{app: otel}}, ports: [{{name: grpc, port: 4317, targetPort: {collector_port}}}]}}\n\
             ---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n    \
             extensionProviders:\n    - name: otel\n      opentelemetry: {{service: otel.plain.svc.cluster.local, port: 4317}}\n    \
             defaultProviders: {{tracing: [otel]}}\n    defaultConfig: {{tracing: {{sampling: 100}}}}\n"
    )
}

async fn get_with(t: &TestInputs, path: &str, traceparent: &str) -> String {
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(serve(t.inputs.clone(), server, downstream(), Handling::Http1));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client)).await.expect("handshake");
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "hello")
        .header("traceparent", traceparent)
        .header("user-agent", "curl/8")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    String::from_utf8_lossy(&resp.into_body().collect().await.expect("body").to_bytes()).into_owned()
}

#[tokio::test]
async fn the_source_continues_the_callers_trace_and_exports_its_span() {
    let receiver = Receiver::start((COLLECTOR_IP, 0).into()).await.expect("a receiver");
    let t = TestInputs::new(&traced_cluster(traceparent_echo().await, receiver.addr.port()));
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    // Not sampled by the caller: the decision travels on, no span is sent.
    let unsampled = get_with(&t, "/", &format!("00-{trace}-00f067aa0ba902b7-00")).await;
    assert!(unsampled.starts_with(&format!("00-{trace}-")) && unsampled.ends_with("-00"), "{unsampled}");
    // Sampled: the upstream's parent is the source's span, child of the caller's.
    let sent_on = get_with(&t, "/api/v1?x=1", &format!("00-{trace}-00f067aa0ba902b7-01")).await;
    let ours = sent_on.split('-').nth(2).expect("a span id").to_owned();
    assert!(sent_on.starts_with(&format!("00-{trace}-")) && sent_on.ends_with("-01"), "{sent_on}");
    assert_ne!(ours, "00f067aa0ba902b7");
    let spans = receiver.wait_for(Duration::from_secs(10), |s| !s.is_empty()).await;
    assert_eq!(spans.len(), 1, "only the sampled request's span: {spans:?}");
    let s = &spans[0];
    assert_eq!((s.trace_id(), s.span_id(), s.parent_span_id()), (trace.to_owned(), ours, "00f067aa0ba902b7".into()));
    assert_eq!(s.span.kind, 3, "CLIENT");
    // Istio's route decorator: the Service host and port, the matched prefix.
    assert_eq!(s.span.name, "hello.plain.svc.cluster.local:80/api*");
    assert_eq!(s.service, "unknown", "a client outside the registry");
    for (key, want) in [
        ("http.url", "http://hello/api/v1?x=1"),
        ("http.method", "GET"),
        ("http.protocol", "HTTP/1.1"),
        ("http.status_code", "200"),
        ("user_agent", "curl/8"),
        ("upstream_cluster", "outbound|80||hello.plain.svc.cluster.local"),
        ("component", "proxy"),
        ("istio.mesh_id", "cluster.local"),
        ("istio.cluster_id", "Kubernetes"),
    ] {
        assert_eq!(s.attribute(key), Some(want), "{key} of {s:?}");
    }
    assert!(s.attribute("guid:x-request-id").is_some_and(|id| id.len() == 36), "the id the source set");
    assert!(s.span.status.is_none(), "a 200 is no error");
    assert!(s.span.end_time_unix_nano >= s.span.start_time_unix_nano && s.span.start_time_unix_nano > 0);
    // Counted once the collector's answer is back.
    let exported = "mesh_trace_spans_total{result=\"exported\"} 1";
    for _ in 0..100 {
        if t.inputs.metrics.encode().contains(exported) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{}", t.inputs.metrics.encode());
}
