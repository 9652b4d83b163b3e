//! What the HBONE server (15008) reads from a CONNECT request: method, target
//! authority and `Forwarded`, as a peer agent (or a forged one) sends them.
//! The input is the three, separated by NUL bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let (method, uri, forwarded) = (parts.next(), parts.next(), parts.next());
    let Some(method) = method.and_then(|m| hyper::Method::from_bytes(m).ok()) else { return };
    let Some(uri) = uri.and_then(|u| hyper::Uri::try_from(u).ok()) else { return };
    let mut headers = hyper::HeaderMap::new();
    if let Some(v) = forwarded.and_then(|f| hyper::header::HeaderValue::from_bytes(f).ok()) {
        headers.insert("forwarded", v);
    }
    let _ = mesh_agent::proxy::hbone::connect_request(&method, &uri, &headers);
});
