//! The exporter's bounds, under paused time: a collector that never answers
//! costs the request path nothing; spans beyond the queue are dropped and
//! counted, and so is a batch the collector does not take.
use std::{sync::Arc, time::SystemTime};

use prometheus_client::metrics::{counter::Counter, family::Family};

use super::{BATCH, Connect, EXPORT_TIMEOUT, Kind, QUEUE, ResultLabels, Span, Tracer};
use crate::state::trace::TraceProvider;

fn span(n: u64) -> Span {
    Span {
        service: "web.demo".into(),
        trace_id: [1; 16],
        span_id: n.to_be_bytes(),
        parent_span_id: None,
        name: "hello.demo.svc.cluster.local:80/*".into(),
        kind: Kind::Client,
        start: SystemTime::now(),
        end: SystemTime::now(),
        attributes: vec![("http.status_code".into(), "200".into())],
        error: false,
    }
}

#[tokio::test(start_paused = true)]
async fn a_collector_that_hangs_costs_dropped_spans_never_a_wait() {
    // The collector's connection never completes.
    let connect: Connect = Arc::new(|_| Box::pin(std::future::pending()));
    let counts = Family::<ResultLabels, Counter>::default();
    let tracer = Tracer::new(connect, counts.clone());
    let provider =
        Arc::new(TraceProvider { name: "otel".into(), service: "otel.obs".into(), port: 4317, max_tag_length: None });
    let count = |result| counts.get_or_create(&ResultLabels { result }).get();
    // Sending never waits: the queue takes QUEUE spans, the rest are dropped.
    for n in 0..(QUEUE as u64 + 5) {
        tracer.send(&provider, span(n));
    }
    assert_eq!(count("queue_full"), 5);
    // The first batch waits for the collector until the export times out,
    // then is dropped and counted; the exporter goes on with the next.
    tokio::time::sleep(EXPORT_TIMEOUT * 2).await;
    assert!(count("export_failed") >= BATCH as u64, "{}", count("export_failed"));
    assert_eq!(count("exported"), 0);
    // Meanwhile the queue has room again.
    tracer.send(&provider, span(0));
    assert_eq!(count("queue_full"), 5);
}
