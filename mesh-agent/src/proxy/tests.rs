//! The L4 proxy in-process: the outbound listener on loopback, where the
//! accepted socket's own address stands for the original destination (as
//! eBPF capture makes it), routed by the user's YAML to a loopback server.
//! No root, no eBPF.
use std::net::{Ipv4Addr, SocketAddr};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{Direction, serve};
use crate::proxy::inputs::testing::{TestInputs, echo_server};

/// The Service's address: the listener is bound there, so a connection to it
/// looks to the proxy like one captured on its way to the Service.
const VIP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

#[tokio::test]
async fn a_captured_connection_reaches_the_service_endpoint_byte_for_byte() {
    let echo_port = echo_server().await;
    let listener = tokio::net::TcpListener::bind((VIP, 0)).await.expect("bind the Service address");
    let port = listener.local_addr().expect("address").port();
    let yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: plain}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: echo, namespace: plain, labels: {{app: echo}}}}\n\
         spec: {{nodeName: n1}}\nstatus: {{podIP: 127.0.0.1, phase: Running}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: plain}}\n\
         spec: {{clusterIP: {VIP}, selector: {{app: echo}}, ports: [{{name: tcp-echo, port: {port}, targetPort: {echo_port}}}]}}\n"
    );
    let t = TestInputs::new(&yaml);
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(serve(t.inputs.clone(), listener, Direction::Outbound, stopped));

    let mut client = tokio::net::TcpStream::connect(SocketAddr::from((VIP, port))).await.expect("connect");
    let sent: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = client.split();
    let write = async {
        w.write_all(&sent).await.expect("write");
        // Half-close: the echo server ends its side only after it sees ours.
        w.shutdown().await.expect("shutdown");
    };
    let mut back = Vec::new();
    let read = r.read_to_end(&mut back);
    let ((), got) = tokio::join!(write, read);
    got.expect("read");
    assert!(back == sent, "{} of {} bytes came back, or changed", back.len(), sent.len());

    let metrics = t.inputs.metrics.encode();
    let opened = metrics.lines().find(|l| {
        l.starts_with("istio_tcp_connections_opened_total{") && l.contains("destination_service_name=\"echo\"")
    });
    assert!(opened.is_some_and(|l| l.ends_with(" 1")), "{metrics}");
}

/// The YAML of an echo Service at `VIP:port` to the echo pod's `echo_port`.
fn echo_service(port: u16, echo_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: plain}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: echo, namespace: plain, labels: {{app: echo}}}}\n\
         spec: {{nodeName: n1}}\nstatus: {{podIP: 127.0.0.1, phase: Running}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: plain}}\n\
         spec: {{clusterIP: {VIP}, selector: {{app: echo}}, ports: [{{name: tcp-echo, port: {port}, targetPort: {echo_port}}}]}}\n"
    )
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let echo_port = echo_server().await;
    let listener = tokio::net::TcpListener::bind((VIP, 0)).await.expect("bind the Service address");
    let port = listener.local_addr().expect("address").port();
    let limits =
        crate::proxy::limits::Limits { idle_timeout: std::time::Duration::from_secs(600), ..Default::default() };
    let t = TestInputs::with_limits(&echo_service(port, echo_port), limits);
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(serve(t.inputs.clone(), listener, Direction::Outbound, stopped));
    let mut client = tokio::net::TcpStream::connect(SocketAddr::from((VIP, port))).await.expect("connect");
    client.write_all(b"ping").await.expect("write");
    let mut four = [0u8; 4];
    client.read_exact(&mut four).await.expect("echo");
    let quiet_since = tokio::time::Instant::now();
    // Nothing more either way: the agent closes it (paused time runs ahead).
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest).await;
    assert!(quiet_since.elapsed() >= std::time::Duration::from_secs(600), "closed after {:?}", quiet_since.elapsed());
    let metrics = t.inputs.metrics.encode();
    assert!(metrics.contains("mesh_tcp_connection_failures_total{reason=\"idle_timeout\"} 1"), "{metrics}");
}

#[tokio::test]
async fn a_source_past_its_connection_limit_is_turned_away_and_counted() {
    let echo_port = echo_server().await;
    let listener = tokio::net::TcpListener::bind((VIP, 0)).await.expect("bind the Service address");
    let port = listener.local_addr().expect("address").port();
    let limits = crate::proxy::limits::Limits { max_connections_per_source: 2, ..Default::default() };
    let t = TestInputs::with_limits(&echo_service(port, echo_port), limits);
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(serve(t.inputs.clone(), listener, Direction::Outbound, stopped));
    let addr = SocketAddr::from((VIP, port));
    let mut open = Vec::new();
    for i in 0..2 {
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"ok").await.expect("write");
        let mut two = [0u8; 2];
        c.read_exact(&mut two).await.unwrap_or_else(|e| panic!("connection {i}: {e}"));
        open.push(c);
    }
    // The third from the same address: reset, and counted.
    let mut third = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = third.write_all(b"no").await;
    let mut buf = [0u8; 2];
    assert!(!matches!(third.read(&mut buf).await, Ok(2)), "a third connection was served");
    let metrics = t.inputs.metrics.encode();
    assert!(metrics.contains("mesh_limit_refusals_total{listener=\"outbound\",reason=\"source_full\"} 1"), "{metrics}");
    // A place given back is a place for the next one.
    drop(open.pop());
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let mut again = tokio::net::TcpStream::connect(addr).await.expect("connect");
    again.write_all(b"ok").await.expect("write");
    again.read_exact(&mut buf).await.expect("served again");
}
