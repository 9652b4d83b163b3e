//! HBONE in-process: the pooled client and the server on loopback, with
//! workload certificates from an embedded CA. No root, no eBPF.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{Tunnel, TunnelPool, TunnelTo};
use crate::proxy::inputs::testing::{TestInputs, echo_server};
use crate::proxy::{hbone::GatewayHop, inbound::hbone::serve};

const CLIENT: &str = "spiffe://cluster.local/ns/mesh/sa/client";
const ECHO: &str = "spiffe://cluster.local/ns/mesh/sa/echo";

/// A meshed namespace: the client pod (not on loopback: only its identity
/// is used) and the echo pod on 127.0.0.1, both on this node (`n1`).
const CLUSTER: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}\n\
---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: mesh}\n\
spec: {nodeName: n1, serviceAccountName: client}\nstatus: {podIP: 10.244.1.2, phase: Running}\n\
---\napiVersion: v1\nkind: Pod\nmetadata: {name: echo, namespace: mesh}\n\
spec: {nodeName: n1, serviceAccountName: echo}\nstatus: {podIP: 127.0.0.1, phase: Running}\n";

/// The HBONE server of `t` on loopback, with no gateway hop; its address.
async fn hbone_server(t: &TestInputs) -> SocketAddrV4 {
    let ctx = &t.inputs;
    // The server answers for the identities whose certificates the agent holds.
    ctx.certs.get(&Arc::from(ECHO)).await.expect("the echo pod's certificate");
    let tls = crate::identity::tls::server_config(ctx.certs.roots(), ctx.certs.clone(), true, &[b"h2"])
        .expect("server TLS settings");
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let addr = match listener.local_addr().expect("address") {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("{other}"),
    };
    let no_hop: GatewayHop = Arc::new(|_, _| None);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    std::mem::forget(stop);
    tokio::spawn(serve(ctx.clone(), listener, tokio_rustls::TlsAcceptor::from(Arc::new(tls)), no_hop, stopped));
    addr
}

type Io = hyper_util::rt::TokioIo<Tunnel>;

async fn open(t: &TestInputs, pool: &TunnelPool, node: SocketAddrV4, port: u16) -> Io {
    let (source, dest) = (Arc::from(CLIENT), Arc::from(ECHO));
    let to = TunnelTo {
        source: &source,
        node,
        dest: &dest,
        target: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
        client_ip: Ipv4Addr::new(10, 244, 1, 2),
        service: None,
        connect_timeout: Duration::from_secs(5),
    };
    hyper_util::rt::TokioIo::new(pool.open(&t.inputs, to).await.expect("a tunnel"))
}

async fn round_trip(io: &mut Io, msg: &str) -> String {
    io.write_all(msg.as_bytes()).await.expect("write");
    let mut back = vec![0; msg.len()];
    io.read_exact(&mut back).await.expect("read");
    String::from_utf8_lossy(&back).into_owned()
}

fn connections(t: &TestInputs) -> f64 {
    t.inputs
        .metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("mesh_hbone_connections_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn tunnels_share_a_connection_up_to_its_stream_limit() {
    let t = TestInputs::new(CLUSTER);
    let (port, node) = (echo_server().await, hbone_server(&t).await);
    let pool = TunnelPool::with_stream_limit(2);
    let mut tunnels = Vec::new();
    for i in 0..3 {
        let mut tunnel = open(&t, &pool, node, port).await;
        assert_eq!(round_trip(&mut tunnel, &format!("tunnel {i}")).await, format!("tunnel {i}"));
        tunnels.push(tunnel);
    }
    assert_eq!(connections(&t), 2.0, "two streams on the first connection, the third on a second");
    // A closed tunnel frees its slot: the next one needs no new connection.
    tunnels.remove(0);
    let mut again = open(&t, &pool, node, port).await;
    assert_eq!(round_trip(&mut again, "again").await, "again");
    assert_eq!(connections(&t), 2.0);
    // Every tunnel still carries its own bytes.
    for (i, tunnel) in tunnels.iter_mut().enumerate() {
        assert_eq!(round_trip(tunnel, &format!("still {i}")).await, format!("still {i}"));
    }
}

#[tokio::test]
async fn a_target_that_is_not_a_local_meshed_pod_is_refused() {
    let t = TestInputs::new(CLUSTER);
    let node = hbone_server(&t).await;
    let (source, dest) = (Arc::from(CLIENT), Arc::from(ECHO));
    let to = TunnelTo {
        source: &source,
        node,
        dest: &dest,
        target: SocketAddrV4::new(Ipv4Addr::new(10, 244, 9, 9), 80),
        client_ip: Ipv4Addr::new(10, 244, 1, 2),
        service: None,
        connect_timeout: Duration::from_secs(5),
    };
    match TunnelPool::default().open(&t.inputs, to).await {
        Err(super::HboneError::Status { status, .. }) => assert_eq!(status, hyper::StatusCode::NOT_FOUND),
        Err(e) => panic!("refused for the wrong reason: {e}"),
        Ok(_) => panic!("a tunnel to a pod that is not here"),
    }
}

#[tokio::test]
async fn a_peer_that_never_answers_connect_is_given_up_on() {
    let limits = crate::proxy::limits::Limits {
        connect_answer_timeout: std::time::Duration::from_millis(300),
        ..Default::default()
    };
    let t = TestInputs::with_limits(CLUSTER, limits);
    let ctx = &t.inputs;
    // An agent that completes mTLS and HTTP/2, then never answers a CONNECT.
    ctx.certs.get(&Arc::from(ECHO)).await.expect("the echo pod's certificate");
    let tls = crate::identity::tls::server_config(ctx.certs.roots(), ctx.certs.clone(), true, &[b"h2"])
        .expect("server TLS settings");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let node = match listener.local_addr().expect("address") {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("{other}"),
    };
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let never = hyper::service::service_fn(|_req: hyper::Request<hyper::body::Incoming>| async {
                    std::future::pending::<
                        Result<hyper::Response<http_body_util::Empty<hyper::body::Bytes>>, std::convert::Infallible>,
                    >()
                    .await
                });
                let builder = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), never).await;
            });
        }
    });
    let (source, dest) = (Arc::from(CLIENT), Arc::from(ECHO));
    let to = TunnelTo {
        source: &source,
        node,
        dest: &dest,
        target: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9),
        client_ip: Ipv4Addr::new(10, 244, 1, 2),
        service: None,
        connect_timeout: Duration::from_secs(5),
    };
    let started = std::time::Instant::now();
    match TunnelPool::default().open(&t.inputs, to).await {
        Err(super::HboneError::AnswerTimeout { .. }) => {}
        Err(e) => panic!("failed otherwise: {e}"),
        Ok(_) => panic!("a tunnel from a peer that never answered"),
    }
    assert!(started.elapsed() < Duration::from_secs(5), "gave up only after {:?}", started.elapsed());
}

#[test]
fn a_connect_names_its_target_client_and_service() {
    use hyper::{HeaderMap, Method, StatusCode, header::HeaderValue};
    let ask = |method: Method, uri: &str, forwarded: Option<&str>| {
        let mut headers = HeaderMap::new();
        if let Some(f) = forwarded {
            headers.insert("forwarded", HeaderValue::from_str(f).expect("header"));
        }
        super::connect_request(&method, &uri.parse().expect("uri"), &headers)
    };
    let target = SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 5), 8080);
    let client = Some(Ipv4Addr::new(10, 244, 1, 2));
    let host = |h: &str| Some(h.to_owned());
    // (Forwarded, client IP, service host): ours, ztunnel's, and what a peer may not get through.
    let cases = [
        (None, None, None),
        (Some("for=10.244.1.2"), client, None),
        (Some("for=10.244.1.2;host=hello.demo.svc.cluster.local"), client, host("hello.demo.svc.cluster.local")),
        (
            Some(r#"for="10.244.1.2:40000";host=Hello.demo.svc.cluster.local"#),
            client,
            host("hello.demo.svc.cluster.local"),
        ),
        (Some("host=a;for=10.244.1.2, for=10.0.0.9;host=b"), client, host("a")),
        (Some("for=not-an-ip;host="), None, None),
        (Some(&format!("for=10.244.1.2;host={}", "x".repeat(300))), client, None),
    ];
    for (forwarded, client_ip, service_host) in cases {
        let got = ask(Method::CONNECT, "10.244.2.5:8080", forwarded).expect("a CONNECT");
        assert_eq!(got, super::ConnectAsk { target, client_ip, service_host }, "{forwarded:?}");
    }
    assert_eq!(ask(Method::GET, "10.244.2.5:8080", None).expect_err("not CONNECT").0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(ask(Method::CONNECT, "hello:8080", None).expect_err("no IP").0, StatusCode::BAD_REQUEST);
    // What a source agent sends reads back as it was meant.
    let sent = super::forwarded_value(Ipv4Addr::new(10, 244, 1, 2), Some("hello.demo.svc.cluster.local"));
    assert_eq!(
        ask(Method::CONNECT, "10.244.2.5:8080", Some(&sent)).expect("ours").service_host,
        host("hello.demo.svc.cluster.local")
    );
}
