//! Policy changes reach live connections (root): connections opened under one
//! policy — L4 on one node, an HBONE stream across nodes, plaintext through
//! the inbound listener, an upgraded HTTP (WebSocket) tunnel — are closed and
//! counted when a reload makes them ones policy refuses; the rest live on.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use mesh_tests::{
    Agent, Pod,
    agent::{CaService, metric},
    fixture::{Fixture, PodSpec},
    require_root, servers,
};

/// Namespace `demo` (meshed): `test`, `near` and `bystander` on node-1, `far` on node-2.
fn fixture() -> Fixture {
    let mut f = Fixture::two_nodes([&[], &[]]);
    f.namespace("demo", true);
    for (node, name, ip) in [
        (0, "test", Ipv4Addr::new(10, 244, 0, 2)),
        (0, "near", Ipv4Addr::new(10, 244, 0, 3)),
        (0, "bystander", Ipv4Addr::new(10, 244, 0, 4)),
        (1, "far", Ipv4Addr::new(10, 244, 1, 2)),
    ] {
        f.add_pod(node, name, ip, PodSpec::app("demo", &[("app", name)]));
    }
    f
}

/// Refuses `test` everywhere in `demo`, and plaintext.
const REFUSE: &str = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
    metadata: {name: no-test, namespace: demo}\n\
    spec: {action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/test]}}]}]}\n\
    ---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
    metadata: {name: default, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n";

/// An echo connection opened from `from`, checked to work.
fn echo_conn(from: &Pod, to: &str) -> TcpStream {
    let addr: SocketAddr = to.parse().unwrap();
    from.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(roundtrip(&mut s, b"ping"), Some(b"ping".to_vec()), "echo through {addr}");
        s
    })
}

fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> Option<Vec<u8>> {
    s.write_all(msg).ok()?;
    let mut buf = vec![0; msg.len()];
    s.read_exact(&mut buf).ok()?;
    Some(buf)
}

/// A WebSocket connection (HTTP/1.1 Upgrade, through the L7 path), checked to echo.
fn websocket(from: &Pod, to: &str) -> TcpStream {
    let addr: SocketAddr = to.parse().unwrap();
    from.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let req = format!(
            "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        assert!(ws_echo(&mut s), "WebSocket echo through {addr}");
        s
    })
}

/// One masked text frame out, its echo back.
fn ws_echo(s: &mut TcpStream) -> bool {
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | 4];
    frame.extend_from_slice(&mask);
    frame.extend(b"ping".iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    if s.write_all(&frame).is_err() {
        return false;
    }
    let mut back = [0u8; 6];
    s.read_exact(&mut back).is_ok() && back == [0x81, 4, b'p', b'i', b'n', b'g']
}

/// Whether the connection was closed (EOF or reset) within the read timeout.
fn closed(s: &mut TcpStream) -> bool {
    let _ = s.write_all(b"ping");
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

fn revoked(a: &Agent) -> f64 {
    metric(&a.metrics(), "mesh_tcp_connection_failures_total", &[("reason", "denied_after_policy_change")])
}

#[test]
fn a_new_deny_or_strict_closes_open_connections_it_refuses() {
    if !require_root("a_new_deny_or_strict_closes_open_connections_it_refuses") {
        return;
    }
    let f = fixture();
    let cfg = f.yaml("");
    let mut c = f.cluster;
    servers::echo(c.pod("near"), 7000);
    servers::websocket_echo(c.pod("near"), 8090);
    servers::echo(c.pod("far"), 7000);
    let lan = c.add_lan(0, "lan", "192.168.77");
    let ca = CaService::start(&c, &cfg);
    let agents: Vec<Agent> = (0..2).map(|i| Agent::start_on(&c, i, &cfg, &ca.agent_args(&c.nodes[i].name))).collect();

    let test = c.pod("test");
    let mut same_node = echo_conn(test, "10.244.0.3:7000");
    let mut across = echo_conn(test, "10.244.1.2:7000");
    let mut plaintext = echo_conn(&lan, "10.244.0.3:7000");
    let mut tunnel = websocket(test, "10.244.0.3:8090");
    let mut untouched = echo_conn(c.pod("bystander"), "10.244.0.3:7000");

    let before: Vec<f64> =
        agents.iter().map(|a| metric(&a.metrics(), "mesh_config_loads_total", &[("result", "success")])).collect();
    for a in &agents {
        a.write_config(&format!("{cfg}{REFUSE}"));
    }
    for (a, n) in agents.iter().zip(before) {
        a.wait_metrics(10, "reload", |m| metric(m, "mesh_config_loads_total", &[("result", "success")]) > n);
    }
    assert!(closed(&mut same_node), "same-node L4 connection from a now-denied client lives on");
    assert!(closed(&mut across), "HBONE stream from a now-denied client lives on");
    assert!(closed(&mut plaintext), "plaintext connection lives on under STRICT");
    tunnel.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(!ws_echo(&mut tunnel), "WebSocket tunnel from a now-denied client lives on");
    // A client the new policy admits keeps its connection.
    assert_eq!(roundtrip(&mut untouched, b"still"), Some(b"still".to_vec()), "an admitted connection was closed");
    // Node-1 closed the same-node, plaintext and tunnel connections; node-2 the stream.
    agents[0].wait_metrics(5, "closures counted on node-1", |m| {
        metric(m, "mesh_tcp_connection_failures_total", &[("reason", "denied_after_policy_change")]) >= 3.0
    });
    assert!(revoked(&agents[1]) >= 1.0, "{}", agents[1].metrics());
    // And new connections are refused, as before.
    let addr: SocketAddr = "10.244.0.3:7000".parse().unwrap();
    assert!(test.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        roundtrip(&mut s, b"ping").is_none()
    }));
}

#[test]
fn a_reload_keeps_a_same_node_connection_the_destination_stage_carries_as_tcp() {
    if !require_root("a_reload_keeps_a_same_node_connection_the_destination_stage_carries_as_tcp") {
        return;
    }
    // `near` has a policy with HTTP fields, so its connections go through the
    // destination's HTTP stage; bytes that are not HTTP are carried there as
    // TCP. Under STRICT, a reload must not take a same-node client (it has
    // an identity, from capture) for plaintext.
    let policy = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
        metadata: {name: default, namespace: demo}\nspec: {mtls: {mode: STRICT}}\n\
        ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
        metadata: {name: no-admin, namespace: demo}\n\
        spec: {selector: {matchLabels: {app: near}}, action: DENY,\n\
          rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/nobody]}}], to: [{operation: {paths: [/admin]}}]}]}\n";
    let f = fixture();
    let cfg = f.yaml(policy);
    let c = f.cluster;
    servers::echo(c.pod("near"), 7000);
    let ca = CaService::start(&c, &cfg);
    let a = Agent::start_on(&c, 0, &cfg, &ca.agent_args(&c.nodes[0].name));
    let mut opaque = echo_conn(c.pod("test"), "10.244.0.3:7000");

    let before = metric(&a.metrics(), "mesh_config_loads_total", &[("result", "success")]);
    a.write_config(&format!("{cfg}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: unrelated}}\n"));
    a.wait_metrics(10, "reload", |m| metric(m, "mesh_config_loads_total", &[("result", "success")]) > before);
    assert_eq!(
        roundtrip(&mut opaque, b"after the reload"),
        Some(b"after the reload".to_vec()),
        "a same-node connection was closed by an unrelated reload:\n{}",
        a.log_text()
    );
    assert_eq!(revoked(&a), 0.0, "{}", a.metrics());
}
