//! The TLS ClientHello reader (SNI) at TLS-passthrough gateways, on the bytes
//! a client outside the cluster sends first.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = mesh_agent::proxy::sni::sni(data);
});
