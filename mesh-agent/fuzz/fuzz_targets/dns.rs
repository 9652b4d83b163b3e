//! The DNS proxy's reading of a meshed pod's query (any bytes a pod sends
//! to port 53), against a state with a Service and ServiceEntries to answer.
#![no_main]

use std::sync::LazyLock;

static STATE: LazyLock<mesh_agent::state::State> = LazyLock::new(|| {
    mesh_agent::config::load_text("fuzz.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n\
         spec: {clusterIP: 10.96.0.50, selector: {app: web}, ports: [{port: 80, name: http}]}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db, namespace: demo}\n\
         spec: {hosts: [db.internal], ports: [{number: 5432, name: tcp, protocol: TCP}], resolution: STATIC, endpoints: [{address: 192.0.2.5}]}\n",
        "cluster.local",
    )
    .state
});

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = mesh_agent::dns::proxy::local(&STATE, std::net::Ipv4Addr::new(10, 244, 0, 2), data);
});
