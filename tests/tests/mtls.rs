//! Mutual TLS between node agents (root): HBONE with workload identities on the wire, the CA service, certificate rotation, and the HBONE connection pool.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use mesh_tests::{Cluster, agent::metric, mesh::*, require_root};

/// Dials node-2's agent at 15008 as `cert` (or no certificate), asks for
/// helloworld's identity, and tunnels to helloworld's echo server. Ok with the
/// echoed bytes, or Err naming the step that failed.
fn hbone_echo(
    c: &Cluster,
    roots: rustls::RootCertStore,
    cert: Option<mesh_agent::identity::WorkloadCert>,
) -> Result<Vec<u8>, String> {
    use http_body_util::Empty;
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let node2 = c.nodes[1].ip;
    mesh_tests::netns::enter_and_spawn(&c.net_ns, move || {
        runtime().block_on(async move {
            let config = mesh_agent::identity::tls::client_config(
                std::sync::Arc::new(roots),
                cert.map(|c| c.key.clone()),
                HELLO_ID.into(),
                &[b"h2"],
            )
            .map_err(|e| format!("config: {e}"))?;
            let name =
                rustls::pki_types::ServerName::try_from(mesh_agent::identity::server_name_for(HELLO_ID)).unwrap();
            let tcp = tokio::net::TcpStream::connect((node2, 15008)).await.map_err(|e| format!("tcp: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("h2: {e}"))?;
            tokio::spawn(conn);
            let req = hyper::Request::connect(format!("{HELLO_IP}:7000")).body(Empty::<Bytes>::new()).unwrap();
            let resp = send.send_request(req).await.map_err(|e| format!("CONNECT: {e}"))?;
            if resp.status() != 200 {
                return Err(format!("CONNECT answered {}", resp.status()));
            }
            let mut io = TokioIo::new(hyper::upgrade::on(resp).await.map_err(|e| format!("upgrade: {e}"))?);
            io.write_all(b"through the tunnel").await.map_err(|e| format!("write: {e}"))?;
            io.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
            let mut back = Vec::new();
            io.read_to_end(&mut back).await.map_err(|e| format!("read: {e}"))?;
            Ok(back)
        })
    })
    .join()
    .unwrap()
}

#[test]
fn cross_node_traffic_is_mtls_with_workload_identities() {
    if !require_root("cross_node_traffic_is_mtls_with_workload_identities") {
        return;
    }
    let m = Mesh::start("", &[]);
    let mut cap = Capture::start(&m.c);

    // Service VIP and pod IP, across nodes; the server sees the client pod's IP.
    for url in [format!("http://{VIP}:9095/hello"), format!("http://{HELLO_IP}:9095/hello")] {
        let (ok, out) = curl(m.pod("test"), &url);
        assert!(ok, "{url}: {out}");
        assert!(out.contains(&format!("hello from helloworld; client {TEST_IP}")), "{url}: {out}");
    }
    // A marker through the tunnel, both ways.
    let marker = b"MESH-MARKER-7f3a9c-never-in-clear".repeat(100);
    let back = m.pod("test").run({
        let marker = marker.clone();
        move || mesh_tests::clients::tcp_echo(format!("{VIP}:7000").parse().unwrap(), &marker).unwrap()
    });
    assert_eq!(back, marker);

    let bytes = cap.stop();
    assert!(bytes.len() > 1000, "capture is empty");
    let needle = b"MESH-MARKER-7f3a9c";
    assert!(!bytes.windows(needle.len()).any(|w| w == needle), "the marker crossed the cluster network in clear");
    let pod_packets = cap.read("net 10.244.0.0/16");
    assert!(pod_packets.trim().is_empty(), "pod addresses on the wire:\n{pod_packets}");
    let node_to_node = "tcp and host 172.18.0.2 and host 172.18.1.2";
    let other = cap.read(&format!("{node_to_node} and not port 15008"));
    assert!(other.trim().is_empty(), "node-to-node TCP other than 15008:\n{other}");
    assert!(!cap.read(&format!("{node_to_node} and port 15008")).trim().is_empty(), "no HBONE traffic captured");

    // Identities in the metrics of both sides.
    let dest = &m.agents[1];
    let labels = [
        ("reporter", "destination"),
        ("source_principal", TEST_ID),
        ("destination_principal", HELLO_ID),
        ("connection_security_policy", "mutual_tls"),
    ];
    // The destination agent sees tunnels (the two HTTP requests share one
    // pooled upstream connection; the echo has its own).
    let text = dest.wait_metrics(5, "destination metrics", |t| {
        metric(t, "istio_tcp_connections_closed_total", &labels) >= 1.0
            && metric(t, "istio_tcp_connections_opened_total", &labels) >= 2.0
    });
    assert!(metric(&text, "istio_tcp_received_bytes_total", &labels) >= marker.len() as f64, "{text}");
    let src_labels = [
        ("reporter", "source"),
        ("source_principal", TEST_ID),
        ("destination_principal", HELLO_ID),
        ("connection_security_policy", "mutual_tls"),
    ];
    let text = m.agents[0].wait_metrics(5, "source metrics", |t| {
        metric(t, "istio_tcp_connections_closed_total", &src_labels) >= 1.0
            && metric(t, "istio_requests_total", &src_labels) >= 2.0
    });
    let via_vip = [src_labels.as_slice(), &[("destination_service", "helloworld.demo.svc.cluster.local")]].concat();
    assert!(metric(&text, "istio_tcp_sent_bytes_total", &via_vip) >= marker.len() as f64, "{text}");
    let http_ok = [via_vip.as_slice(), &[("response_code", "200"), ("request_protocol", "http")]].concat();
    assert_eq!(metric(&text, "istio_requests_total", &http_ok), 1.0, "{text}");

    // Certificates in config_dump: identity, serial, expiry; never a key.
    let (_, dump) = dest.admin_get("/config_dump").unwrap();
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let certs = v["certificates"].as_array().unwrap();
    // One per identity of node-2's meshed pods (helloworld, ver) and node-2's
    // own, for its host clients.
    let ids: Vec<&str> = certs.iter().filter_map(|c| c["identity"].as_str()).collect();
    let node_id = "spiffe://cluster.local/ns/istio-system/sa/mesh-node-node-2";
    assert_eq!(ids, [HELLO_ID, "spiffe://cluster.local/ns/demo/sa/ver", node_id], "{dump}");
    assert!(certs[0]["serial"].as_str().is_some_and(|s| s.len() >= 16), "{dump}");
    assert!(certs[0]["not_after"].as_str().is_some(), "{dump}");
    assert!(!dump.contains("PRIVATE KEY"), "{dump}");
    // The node agent holds no CA key.
    assert!(!m.agents[0].dir.join("state").join("root-key.pem").exists());
}

#[test]
fn hbone_refuses_clients_without_a_valid_mesh_certificate() {
    if !require_root("hbone_refuses_clients_without_a_valid_mesh_certificate") {
        return;
    }
    let m = Mesh::start("", &[]);
    let td = "cluster.local";
    let now = std::time::SystemTime::now();
    let hour = Duration::from_secs(3600);
    let mesh_ca = mesh_agent::identity::Ca::load_or_create(&m.ca.ca_dir(), td).unwrap();
    let roots = || mesh_agent::identity::ca::load_roots(&m.ca.root_cert()).unwrap();

    // Hostile bytes on the HBONE and CA ports, and a peer that connects and
    // says nothing: each is dropped on its own, nothing else is disturbed.
    let (node2, ca_addr) = (m.c.nodes[1].ip, m.ca.addr.parse::<SocketAddr>().unwrap());
    let idle = mesh_tests::netns::enter_and_spawn(&m.c.net_ns, move || {
        for addr in [SocketAddr::from((node2, 15008)), ca_addr] {
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0, 1, 2, 3]);
            let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n");
        }
        TcpStream::connect((node2, 15008)).unwrap()
    })
    .join()
    .unwrap();

    // Control: a certificate from the mesh CA is admitted, end to end.
    let good = mesh_ca.issue(TEST_ID, now - hour, now + hour).unwrap();
    assert_eq!(hbone_echo(&m.c, roots(), Some(good)).unwrap(), b"through the tunnel");

    // No certificate, another root's, an expired one: all refused.
    let other_dir = std::env::temp_dir().join(format!("mesh-test-{}-other-ca", m.c.id));
    let other_ca = mesh_agent::identity::Ca::load_or_create(&other_dir, td).unwrap();
    let foreign = other_ca.issue(TEST_ID, now - hour, now + hour).unwrap();
    let expired = mesh_ca.issue(TEST_ID, now - 2 * hour, now - hour).unwrap();
    let _ = std::fs::remove_dir_all(&other_dir);
    for (what, cert) in [("no certificate", None), ("another root", Some(foreign)), ("expired", Some(expired))] {
        let result = hbone_echo(&m.c, roots(), cert);
        assert!(result.is_err(), "{what}: admitted: {result:?}");
    }
    let text = m.agents[1].wait_metrics(5, "refused handshakes", |t| {
        metric(t, "mesh_tcp_connection_failures_total", &[("reason", "tunnel_tls")]) >= 4.0
    });
    drop(idle);
    // Nothing reached the pod from the refused clients.
    let labels = [("reporter", "destination"), ("source_principal", TEST_ID)];
    assert_eq!(metric(&text, "istio_tcp_connections_opened_total", &labels), 1.0, "{text}");
}

#[test]
fn node_token_obtains_only_its_own_pods_identities() {
    if !require_root("node_token_obtains_only_its_own_pods_identities") {
        return;
    }
    let m = Mesh::start("", &[]);
    let roots = std::sync::Arc::new(mesh_agent::identity::ca::load_roots(&m.ca.root_cert()).unwrap());
    let token = m.ca.token_file("node-1");
    let bad = std::env::temp_dir().join(format!("mesh-bad-token-{}", std::process::id()));
    std::fs::write(&bad, "not-a-token").unwrap();
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let addr = m.ca.addr.clone();
    let bad_token = bad.clone();
    let results = mesh_tests::netns::enter_and_spawn(&m.c.net_ns, move || {
        runtime().block_on(async move {
            let ask = |token: std::path::PathBuf, identity: &'static str| {
                let (roots, addr) = (roots.clone(), addr.clone());
                async move {
                    let client =
                        mesh_agent::identity::ca_service::CaClient::new(addr, roots, token, "cluster.local").unwrap();
                    let (_key, csr) = mesh_agent::identity::new_key_and_csr(identity).unwrap();
                    client.sign(identity, &csr, Duration::from_secs(600)).await.map_err(|e| e.to_string())
                }
            };
            (
                ask(token.clone(), TEST_ID).await.map(|chain| chain.len()),
                ask(token.clone(), HELLO_ID).await.map(|chain| chain.len()),
                ask(bad_token, TEST_ID).await.map(|chain| chain.len()),
            )
        })
    })
    .join()
    .unwrap();
    let _ = std::fs::remove_file(&bad);
    assert_eq!(results.0, Ok(1), "node-1's own pod identity");
    let refused = results.1.unwrap_err();
    assert!(refused.contains("403") && refused.contains("node-1"), "{refused}");
    let unknown = results.2.unwrap_err();
    assert!(unknown.contains("401"), "{unknown}");
}

#[test]
fn certificate_rotation_keeps_live_connections() {
    if !require_root("certificate_rotation_keeps_live_connections") {
        return;
    }
    let m = Mesh::start("", &["--cert-ttl", "4s"]);
    let started = Instant::now();
    let first = (serial(&m.agents[0], TEST_ID).unwrap(), serial(&m.agents[1], HELLO_ID).unwrap());
    let mut live = m.pod("test").run(|| {
        let s = TcpStream::connect_timeout(&SocketAddr::from(([10, 96, 0, 10], 7000)), Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    });
    let roundtrip = |s: &mut TcpStream, msg: &[u8]| {
        s.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    };
    roundtrip(&mut live, b"before rotation");
    // Renewal at half life (2 s) on both sides.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = (serial(&m.agents[0], TEST_ID), serial(&m.agents[1], HELLO_ID));
        if now.0.is_some_and(|s| s != first.0) && now.1.is_some_and(|s| s != first.1) {
            break;
        }
        assert!(Instant::now() < deadline, "certificates not renewed: still {first:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    roundtrip(&mut live, b"after rotation");
    // Past the first certificates' expiry, the live connection still works...
    std::thread::sleep(Duration::from_secs(5).saturating_sub(started.elapsed()));
    roundtrip(&mut live, b"after the first certificates expired");
    // ...and new connections use the current ones.
    let (ok, out) = curl(m.pod("test"), &format!("http://{VIP}:9095/"));
    assert!(ok, "{out}");
    live.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    live.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    for a in &m.agents {
        assert_eq!(failures(a, "copy_error"), 0.0, "{}", a.metrics());
    }
}

#[test]
fn more_tunnels_than_one_hbone_connection_carries() {
    if !require_root("more_tunnels_than_one_hbone_connection_carries") {
        return;
    }
    let m = Mesh::start("", &[]);
    // 1100 live connections from one pod to one destination identity on one
    // node: past the 1000 streams one HBONE connection may carry, so the pool
    // must open another; every connection, the last ones included, works.
    let echoed = m.pod("test").run(|| {
        let addr = SocketAddr::from(([10, 96, 0, 10], 7000));
        let mut conns: Vec<TcpStream> =
            (0..1100).map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap()).collect();
        let mut ok = 0;
        for (i, s) in conns.iter_mut().enumerate().rev().take(20) {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let msg = format!("connection {i}");
            s.write_all(msg.as_bytes()).unwrap();
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).unwrap();
            assert_eq!(back, msg.as_bytes());
            ok += 1;
        }
        ok
    });
    assert_eq!(echoed, 20);
    // Connections open on the source agent after protocol detection gives up
    // on their silence; the destination counts each tunnel as it arrives.
    let opened = |t: &str| metric(t, "istio_tcp_connections_opened_total", &[("reporter", "destination")]);
    let text = m.agents[1].wait_metrics(10, "1100 tunnels at the destination", |t| opened(t) >= 1100.0);
    assert!(opened(&text) >= 1100.0, "destination agent saw {} tunnels", opened(&text));
    // The second connection to the same peer resumed the first one's TLS session.
    let source = m.agents[0].metrics();
    let full = metric(&source, "mesh_hbone_connections_total", &[("handshake", "full")]);
    let resumed = metric(&source, "mesh_hbone_connections_total", &[("handshake", "resumed")]);
    assert!(full >= 1.0 && resumed >= 1.0, "HBONE handshakes: {full} full, {resumed} resumed");
}
