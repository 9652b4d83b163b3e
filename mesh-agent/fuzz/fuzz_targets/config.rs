//! The configuration loader on arbitrary text: parse, validate, admit. Nothing
//! an operator or a tenant writes may panic it (a VirtualService timeout of
//! 99999999999999999999s once did).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let loaded = mesh_agent::config::load_text("fuzz.yaml", text, "cluster.local");
        // The decisions over what was admitted must hold up too.
        let state = loaded.state;
        for w in state.workloads.values() {
            let _ = mesh_agent::routing::policy::peer_mode(&state, w, 80);
        }
    }
});
