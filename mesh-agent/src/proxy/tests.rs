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
