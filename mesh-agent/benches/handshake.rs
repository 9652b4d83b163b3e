//! The mTLS handshake between two agents, per connection: both sides' CPU
//! (client and server in one thread, bytes passed in memory), with the
//! agent's own TLS settings and certificates from its CA. A full handshake
//! (new peer) and a resumed one (the agent keeps a client config per peer, so
//! later connections resume). Its inverse bounds the new HBONE connections
//! per second one core can make and accept.
//!
//! `cargo bench -p mesh-agent --bench handshake` (add `-- --quick` for a
//! short run).
use std::{hint::black_box, sync::Arc};

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_agent::identity::{
    ca::Ca,
    server_name_for, spiffe_id,
    tls::{CertLookup, client_config, server_config},
};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, pki_types::ServerName,
    sign::CertifiedKey,
};

/// The destination agent's certificate, whatever the server name.
#[derive(Debug)]
struct One(Arc<CertifiedKey>);

impl CertLookup for One {
    fn by_server_name(&self, _: &str) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Client and server configs as two agents build them.
fn configs() -> (Arc<ClientConfig>, Arc<ServerConfig>, ServerName<'static>) {
    let dir = std::env::temp_dir().join(format!("mesh-bench-ca-{}", std::process::id()));
    let ca = Ca::load_or_create(&dir, "cluster.local").expect("CA");
    let _ = std::fs::remove_dir_all(&dir);
    let day = std::time::Duration::from_secs(86_400);
    let now = std::time::SystemTime::now();
    let issue = |sa: &str| ca.issue(&spiffe_id("cluster.local", "demo", sa), now - day, now + day).expect("issue");
    let (client, server) = (issue("client"), issue("server"));
    let mut roots = RootCertStore::empty();
    roots.add(ca.root_der().clone()).expect("root");
    let roots = Arc::new(roots);
    let client_config =
        client_config(roots.clone(), Some(client.key.clone()), server.identity.clone(), &[b"h2"]).expect("client");
    let server_config = server_config(roots, Arc::new(One(server.key.clone())), true, &[b"h2"]).expect("server");
    let name = ServerName::try_from(server_name_for(&server.identity)).expect("server name");
    (Arc::new(client_config), Arc::new(server_config), name)
}

/// One handshake to its end, both sides; panics if it fails.
fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>, name: &ServerName<'static>) {
    let mut c = ClientConnection::new(client.clone(), name.clone()).expect("client connection");
    let mut s = ServerConnection::new(server.clone()).expect("server connection");
    let mut wire = Vec::with_capacity(4096);
    while c.is_handshaking() || s.is_handshaking() || c.wants_write() || s.wants_write() {
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).expect("client write");
        }
        let mut rd = wire.as_slice();
        while !rd.is_empty() {
            s.read_tls(&mut rd).expect("server read");
            s.process_new_packets().expect("server handshake");
        }
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire).expect("server write");
        }
        let mut rd = wire.as_slice();
        while !rd.is_empty() {
            c.read_tls(&mut rd).expect("client read");
            c.process_new_packets().expect("client handshake");
        }
    }
    black_box((c.alpn_protocol().map(<[u8]>::len), s.alpn_protocol().map(<[u8]>::len)));
}

fn bench(c: &mut Criterion) {
    let (client, server, name) = configs();
    let mut fresh = (*client).clone();
    fresh.resumption = rustls::client::Resumption::disabled();
    let fresh = Arc::new(fresh);
    let mut g = c.benchmark_group("mtls_handshake");
    g.bench_function("full", |b| b.iter(|| handshake(&fresh, &server, &name)));
    // The first handshake leaves tickets in the client config's cache.
    handshake(&client, &server, &name);
    g.bench_function("resumed", |b| b.iter(|| handshake(&client, &server, &name)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
