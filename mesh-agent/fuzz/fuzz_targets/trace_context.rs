//! The trace headers a client sends (`traceparent`, `tracestate`, `b3`,
//! `x-b3-*`), as the agent reads them and writes its own span over them. The
//! input is the seven values in that order, separated by NUL bytes. Whatever
//! came in, the headers sent on carry exactly the agent's span.
#![no_main]

use mesh_agent::telemetry::trace::context::{Outgoing, extract, inject};

const NAMES: [&str; 7] =
    ["traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags"];

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut headers = hyper::HeaderMap::new();
    for (name, value) in NAMES.iter().zip(data.split(|b| *b == 0)) {
        if let Ok(v) = hyper::header::HeaderValue::from_bytes(value) {
            headers.insert(*name, v);
        }
    }
    let parent = extract(&headers);
    let (trace_id, span_id) = ([7u8; 16], [9u8; 8]);
    let out = Outgoing { trace_id, span_id, sampled: parent.as_ref().and_then(|p| p.sampled).unwrap_or(true), parent: parent.as_ref() };
    inject(&mut headers, out);
    let again = extract(&headers).expect("the agent's own headers read back");
    assert_eq!((again.trace_id, again.span_id), (trace_id, span_id));
    if headers.contains_key("x-b3-spanid") {
        assert_eq!(headers["x-b3-spanid"].as_bytes(), b"0909090909090909");
    }
});
