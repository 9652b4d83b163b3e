//! Trace context on the wire: W3C Trace Context (`traceparent`,
//! `tracestate`) and Zipkin's B3 (multiple `x-b3-*` headers, or one `b3`),
//! read from a request and written on the request sent on.
//!
//! Headers come from clients: anything that is not exactly the format is
//! ignored (the request starts a new trace, as the W3C specification asks),
//! and nothing read is ever copied into a header unchecked.
use hyper::header::{HeaderMap, HeaderName, HeaderValue};

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
static B3: HeaderName = HeaderName::from_static("b3");
static B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
static B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
static B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
static B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
static B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// The longest `tracestate` passed on (the W3C specification's 512 characters
/// that a vendor must be able to propagate); a longer one is dropped.
const MAX_TRACESTATE: usize = 512;

/// Which header the caller's trace context was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    W3c,
    /// `x-b3-traceid`, `x-b3-spanid`, …
    B3Multi,
    /// One `b3` header.
    B3Single,
}

/// The caller's span: the parent of the span this agent makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The caller's sampling decision; none: this agent decides.
    pub sampled: Option<bool>,
    pub carrier: Carrier,
}

/// The caller's trace context: `traceparent` first, then B3.
pub fn extract(headers: &HeaderMap) -> Option<Parent> {
    if let Some(p) = headers.get(&TRACEPARENT).and_then(|v| traceparent(v.as_bytes())) {
        return Some(p);
    }
    if let Some(p) = headers.get(&B3).and_then(|v| b3_single(v.as_bytes())) {
        return Some(p);
    }
    b3_multi(headers)
}

/// `version-traceid-parentid-flags`, version `00` (a later version: its first
/// four fields, as the specification allows).
fn traceparent(v: &[u8]) -> Option<Parent> {
    if v.len() < 55 || (v.len() > 55 && (v[..2] == *b"00" || v[55] != b'-')) || v[..2] == *b"ff" {
        return None;
    }
    let (version, trace, span, flags) = (&v[..2], &v[3..35], &v[36..52], &v[53..55]);
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' || hex::<1>(version).is_none() {
        return None;
    }
    let trace_id = hex::<16>(trace).filter(|t| *t != [0; 16])?;
    let span_id = hex::<8>(span).filter(|s| *s != [0; 8])?;
    let flags = hex::<1>(flags)?[0];
    Some(Parent { trace_id, span_id, sampled: Some(flags & 1 == 1), carrier: Carrier::W3c })
}

/// `b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]` (a lone `0`/`1`/`d`
/// is a decision without a trace, which starts a new one).
fn b3_single(v: &[u8]) -> Option<Parent> {
    let mut parts = v.split(|b| *b == b'-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = hex::<8>(parts.next()?).filter(|s| *s != [0; 8])?;
    let sampled = match parts.next() {
        None => None,
        Some(s) => Some(b3_sampled(s)?),
    };
    if let Some(parent) = parts.next() {
        hex::<8>(parent)?;
    }
    parts.next().is_none().then_some(Parent { trace_id, span_id, sampled, carrier: Carrier::B3Single })
}

fn b3_multi(headers: &HeaderMap) -> Option<Parent> {
    let trace_id = b3_trace_id(headers.get(&B3_TRACE)?.as_bytes())?;
    let span_id = hex::<8>(headers.get(&B3_SPAN)?.as_bytes()).filter(|s| *s != [0; 8])?;
    let debug = headers.get(&B3_FLAGS).is_some_and(|f| f.as_bytes() == b"1");
    let sampled = match headers.get(&B3_SAMPLED) {
        _ if debug => Some(true),
        None => None,
        Some(s) => Some(b3_sampled(s.as_bytes())?),
    };
    Some(Parent { trace_id, span_id, sampled, carrier: Carrier::B3Multi })
}

/// A B3 trace id: 32 hex digits, or 16 (the high half zero).
fn b3_trace_id(v: &[u8]) -> Option<[u8; 16]> {
    let id = match v.len() {
        32 => hex::<16>(v)?,
        16 => {
            let mut id = [0; 16];
            id[8..].copy_from_slice(&hex::<8>(v)?);
            id
        }
        _ => return None,
    };
    (id != [0; 16]).then_some(id)
}

fn b3_sampled(v: &[u8]) -> Option<bool> {
    match v {
        b"1" | b"d" | b"true" => Some(true),
        b"0" | b"false" => Some(false),
        _ => None,
    }
}

/// Exactly `2 * N` lower-case hex digits (W3C and B3 both use lower case;
/// upper case is accepted from B3 clients, as Envoy does).
fn hex<const N: usize>(v: &[u8]) -> Option<[u8; N]> {
    if v.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in v.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

/// Lower-case hex of `bytes` into `out` (twice as long).
pub fn write_hex(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
}

fn hex_value<const L: usize>(bytes: &[u8]) -> HeaderValue {
    let mut out = [0u8; L];
    write_hex(bytes, &mut out);
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// This agent's span as the next hop's parent.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
    /// The caller's context, if there was one (its B3 form is kept up to date).
    pub parent: Option<&'a Parent>,
}

/// Sets the trace headers of the request sent on: `traceparent` (the
/// caller's `tracestate` stays as it came if its `traceparent` was valid,
/// else it is dropped with it), and the B3 headers the request carries, in
/// their form, with this agent's span (a hop that read `traceparent` keeps
/// B3 up to date too, for an app that reads only B3).
pub fn inject(headers: &mut HeaderMap, out: Outgoing<'_>) {
    let mut tp = *b"00-00000000000000000000000000000000-0000000000000000-00";
    write_hex(&out.trace_id, &mut tp[3..35]);
    write_hex(&out.span_id, &mut tp[36..52]);
    tp[54] = if out.sampled { b'1' } else { b'0' };
    if let Ok(v) = HeaderValue::from_bytes(&tp) {
        headers.insert(TRACEPARENT.clone(), v);
    }
    let w3c = out.parent.is_some_and(|p| p.carrier == Carrier::W3c);
    if !w3c || headers.get(&TRACESTATE).is_some_and(|s| s.len() > MAX_TRACESTATE) {
        headers.remove(&TRACESTATE);
    }
    let sampled = HeaderValue::from_static(if out.sampled { "1" } else { "0" });
    let parent = out.parent.map(|p| p.span_id);
    if headers.contains_key(&B3_TRACE) || headers.contains_key(&B3_SPAN) {
        headers.insert(B3_TRACE.clone(), hex_value::<32>(&out.trace_id));
        headers.insert(B3_SPAN.clone(), hex_value::<16>(&out.span_id));
        match parent {
            Some(p) => headers.insert(B3_PARENT.clone(), hex_value::<16>(&p)),
            None => headers.remove(&B3_PARENT),
        };
        headers.insert(B3_SAMPLED.clone(), sampled);
        headers.remove(&B3_FLAGS);
    }
    if headers.contains_key(&B3) {
        let mut v = [0u8; 32 + 1 + 16 + 3 + 16];
        write_hex(&out.trace_id, &mut v[..32]);
        v[32] = b'-';
        write_hex(&out.span_id, &mut v[33..49]);
        v[49..52].copy_from_slice(if out.sampled { b"-1-" } else { b"-0-" });
        let len = match parent {
            Some(p) => {
                write_hex(&p, &mut v[52..]);
                v.len()
            }
            None => 51,
        };
        if let Ok(v) = HeaderValue::from_bytes(&v[..len]) {
            headers.insert(B3.clone(), v);
        }
    }
}

#[cfg(test)]
mod tests;
