//! Protocol detection on a client's first bytes (any captured connection).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = mesh_agent::routing::protocol::sniff(data);
});
