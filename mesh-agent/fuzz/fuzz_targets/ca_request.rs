//! The CA service's request body (15012): JSON with an identity, a CSR in PEM
//! and a lifetime, judged and signed as a node with every identity allowed.
#![no_main]

use std::{sync::OnceLock, time::Duration};

static CA: OnceLock<mesh_agent::identity::Ca> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let ca = CA.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mesh-fuzz-ca-{}", std::process::id()));
        mesh_agent::identity::Ca::load_or_create(&dir, "cluster.local").expect("a CA in a temporary directory")
    });
    let _ = mesh_agent::ca_server::sign_request(ca, data, |_| true, Duration::from_secs(3600));
});
