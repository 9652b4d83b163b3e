//! Trace headers as tables: what is continued, what starts a new trace,
//! and what the request sent on carries.
use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use super::{Carrier, Outgoing, Parent, extract, inject};

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).expect("a header name"),
            HeaderValue::from_str(v).expect("a header value"),
        );
    }
    h
}

const TRACE: [u8; 16] =
    [0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36];
const SPAN: [u8; 8] = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];

/// Request headers, and the parent read from them.
type Case<'a> = (Vec<(&'a str, &'a str)>, Option<Parent>);

#[test]
fn the_callers_context_is_read_from_w3c_then_b3() {
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let parent = |sampled, carrier| Some(Parent { trace_id: TRACE, span_id: SPAN, sampled, carrier });
    let mut short_trace = [0u8; 16];
    short_trace[8..].copy_from_slice(&TRACE[8..]);
    let cases: Vec<Case> = vec![
        (vec![("traceparent", tp)], parent(Some(true), Carrier::W3c)),
        (
            vec![("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")],
            parent(Some(false), Carrier::W3c),
        ),
        // A later version: its first fields, and whatever follows a dash.
        (
            vec![("traceparent", "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-not")],
            parent(Some(true), Carrier::W3c),
        ),
        // Not the format: ignored (a new trace starts).
        (vec![("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")], None),
        (vec![("traceparent", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")], None),
        (vec![("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01")], None),
        (vec![("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01")], None),
        (vec![("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01")], None),
        (vec![("traceparent", "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")], None),
        (vec![("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7")], None),
        // B3, one header: with and without a decision, with a parent.
        (vec![("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1")], parent(Some(true), Carrier::B3Single)),
        (vec![("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7")], parent(None, Carrier::B3Single)),
        (
            vec![("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0-05e3ac9a4f6e3b90")],
            parent(Some(false), Carrier::B3Single),
        ),
        (vec![("b3", "1")], None),
        (vec![("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-x")], None),
        // B3, several headers: a 64-bit trace id, debug, a bad decision.
        (
            vec![("x-b3-traceid", "a3ce929d0e0e4736"), ("x-b3-spanid", "00f067aa0ba902b7"), ("x-b3-sampled", "1")],
            Some(Parent { trace_id: short_trace, span_id: SPAN, sampled: Some(true), carrier: Carrier::B3Multi }),
        ),
        (
            vec![
                ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
                ("x-b3-spanid", "00f067aa0ba902b7"),
                ("x-b3-flags", "1"),
            ],
            parent(Some(true), Carrier::B3Multi),
        ),
        (
            vec![
                ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
                ("x-b3-spanid", "00f067aa0ba902b7"),
                ("x-b3-sampled", "yes"),
            ],
            None,
        ),
        (vec![("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736")], None),
        // W3C wins over B3.
        (
            vec![("x-b3-traceid", "a3ce929d0e0e4736"), ("x-b3-spanid", "1111111111111111"), ("traceparent", tp)],
            parent(Some(true), Carrier::W3c),
        ),
    ];
    for (pairs, want) in cases {
        assert_eq!(extract(&headers(&pairs)), want, "{pairs:?}");
    }
}

#[test]
fn the_request_sent_on_carries_the_agents_span() {
    let ours = [0x11; 8];
    let get = |h: &HeaderMap, k: &str| h.get(k).map(|v| v.to_str().expect("text").to_owned());
    // W3C: traceparent replaced, tracestate kept.
    let mut h = headers(&[
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("tracestate", "congo=t61rcWkgMzE"),
    ]);
    let parent = extract(&h).expect("a parent");
    inject(&mut h, Outgoing { trace_id: TRACE, span_id: ours, sampled: true, parent: Some(&parent) });
    assert_eq!(get(&h, "traceparent").as_deref(), Some("00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01"));
    assert_eq!(get(&h, "tracestate").as_deref(), Some("congo=t61rcWkgMzE"));
    // A tracestate longer than any vendor must carry is dropped.
    let long = "a=".to_owned() + &"x".repeat(600);
    let mut h =
        headers(&[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), ("tracestate", &long)]);
    let parent = extract(&h).expect("a parent");
    inject(&mut h, Outgoing { trace_id: TRACE, span_id: ours, sampled: true, parent: Some(&parent) });
    assert_eq!(get(&h, "tracestate"), None);
    // B3 headers are updated in the caller's form, and W3C's is added.
    let mut h = headers(&[
        ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("x-b3-spanid", "00f067aa0ba902b7"),
        ("x-b3-flags", "1"),
    ]);
    let parent = extract(&h).expect("a parent");
    inject(&mut h, Outgoing { trace_id: TRACE, span_id: ours, sampled: true, parent: Some(&parent) });
    assert_eq!(get(&h, "x-b3-spanid").as_deref(), Some("1111111111111111"));
    assert_eq!(get(&h, "x-b3-parentspanid").as_deref(), Some("00f067aa0ba902b7"));
    assert_eq!(get(&h, "x-b3-sampled").as_deref(), Some("1"));
    assert_eq!(get(&h, "x-b3-flags"), None);
    assert_eq!(get(&h, "traceparent").as_deref(), Some("00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01"));
    let mut h = headers(&[("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7")]);
    let parent = extract(&h).expect("a parent");
    inject(&mut h, Outgoing { trace_id: TRACE, span_id: ours, sampled: false, parent: Some(&parent) });
    assert_eq!(get(&h, "b3").as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-0-00f067aa0ba902b7"));
    assert_eq!(get(&h, "traceparent").as_deref(), Some("00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-00"));
    // Read from traceparent, B3 carried along: both say the agent's span.
    let mut h = headers(&[
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("x-b3-spanid", "00f067aa0ba902b7"),
    ]);
    let parent = extract(&h).expect("a parent");
    inject(&mut h, Outgoing { trace_id: TRACE, span_id: ours, sampled: true, parent: Some(&parent) });
    assert_eq!(get(&h, "x-b3-spanid").as_deref(), Some("1111111111111111"));
    assert_eq!(get(&h, "x-b3-parentspanid").as_deref(), Some("00f067aa0ba902b7"));
    // A new trace: W3C only; a stray tracestate (no valid traceparent) is dropped.
    let mut h = headers(&[("tracestate", "congo=t61rcWkgMzE")]);
    inject(&mut h, Outgoing { trace_id: TRACE, span_id: ours, sampled: true, parent: None });
    assert_eq!(get(&h, "tracestate"), None);
    assert!(get(&h, "x-b3-traceid").is_none() && get(&h, "b3").is_none());
    // Whatever came in is never echoed: the values written are re-read as the agent's own.
    assert_eq!(extract(&h).map(|p| (p.trace_id, p.span_id)), Some((TRACE, ours)));
}
