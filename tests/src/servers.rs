//! Servers that run inside a pod's namespace, on threads of the test process.
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
};

use crate::netns::Pod;

/// Binds `0.0.0.0:port` in the pod with a production-sized accept backlog (std
/// uses 128, which 200 simultaneous connections overflow).
fn listen(pod: &Pod, port: u16) -> TcpListener {
    pod.run(move || {
        let l = TcpListener::bind(("0.0.0.0", port)).unwrap();
        // SAFETY: listen() again on a listening socket only resizes its backlog.
        unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 4096) };
        l
    })
}

/// An HTTP/1.1 server on `port` answering every request with
/// `hello from <pod>; client <peer-ip>` (so tests see the source the server saw).
pub fn http_hello(pod: &Pod, port: u16) {
    let name = pod.name.clone();
    let listener = listen(pod, port);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let name = name.clone();
            std::thread::spawn(move || serve_hello(stream, &name));
        }
    });
}

fn serve_hello(mut s: TcpStream, name: &str) {
    let peer = s.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let body = format!("hello from {name}; client {peer}\n");
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes());
}

/// A TCP echo server on `port`: echoes everything, and half-closes its side
/// after the client half-closes.
pub fn echo(pod: &Pod, port: u16) {
    let listener = listen(pod, port);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = stream.try_clone().unwrap();
                let mut w = stream;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match r.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if w.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
}

type Body = http_body_util::combinators::BoxBody<hyper::body::Bytes, hyper::Error>;

/// An HTTP server on `port` taking HTTP/1.1 (keep-alive) and h2c alike:
/// - `/hello`: `hello from <pod>; client <ip>; <version>; x-request-id <id>`
/// - `/echo`: streams the request body back as it arrives
/// - `/status/<code>`: answers with that status
/// - `/delay/<ms>`: answers after that long
/// - `/fail-once/<id>`: 503 the first time, 200 after
/// - `/headers`: the request headers, one per line
/// - `/unhealthy-on/<pod>`: 503 from that pod, 200 from the others
/// - `/seen`: `<pod> <path> <host>` of every request this pod saw before
/// - `/upgrade` with `Upgrade:` (`101`) or an HTTP/2 extended CONNECT (`200`):
///   then echoes raw bytes (a WebSocket stand-in)
pub fn http_api(pod: &Pod, port: u16) {
    let name = pod.name.clone();
    serve_async(pod, port, move |stream, peer| {
        let name = name.clone();
        async move {
            let service = hyper::service::service_fn(move |req| {
                let name = name.clone();
                async move { Ok::<_, std::convert::Infallible>(api(&name, peer, req).await) }
            });
            let mut first = [0u8; 4];
            let _ = stream.peek(&mut first).await;
            let io = hyper_util::rt::TokioIo::new(stream);
            if &first == b"PRI " {
                let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .enable_connect_protocol()
                    .serve_connection(io, service)
                    .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).with_upgrades().await;
            }
        }
    });
}

/// Accepts on `port` in the pod, on a thread of its own with a tokio runtime,
/// each connection handled by `handle` in a task of its own.
pub fn serve_async<F, Fut>(pod: &Pod, port: u16, handle: F)
where
    F: Fn(tokio::net::TcpStream, std::net::SocketAddr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = listen(pod, port);
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, peer)) = listener.accept().await else { continue };
                tokio::spawn(handle(stream, peer));
            }
        });
    });
}

async fn api(
    name: &str,
    peer: std::net::SocketAddr,
    mut req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Body> {
    use http_body_util::BodyExt as _;
    let text = |status: u16, body: String| {
        let mut r = hyper::Response::new(http_body_util::Full::new(body.into()).map_err(|e| match e {}).boxed());
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
        r
    };
    let path = req.uri().path().to_owned();
    // Every request any api server saw: `<pod> <path> <host>`, for `/seen`.
    static SEEN_LOG: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let host = req.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("-").to_owned();
    if path == "/seen" {
        let log = SEEN_LOG.lock().unwrap();
        let mine: Vec<&str> = log.iter().filter(|l| l.starts_with(&format!("{name} "))).map(String::as_str).collect();
        return text(200, mine.join("\n") + "\n");
    }
    SEEN_LOG.lock().unwrap().push(format!("{name} {path} {host}"));
    let extended_connect =
        req.method() == hyper::Method::CONNECT && req.extensions().get::<hyper::ext::Protocol>().is_some();
    if path == "/upgrade" && (req.headers().contains_key(hyper::header::UPGRADE) || extended_connect) {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let io = hyper_util::rt::TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
            }
        });
        if extended_connect {
            // RFC 8441: 200 on the stream, which then carries the bytes.
            return text(200, String::new());
        }
        let mut r = text(101, String::new());
        r.headers_mut().insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("upgrade"));
        r.headers_mut().insert(hyper::header::UPGRADE, hyper::header::HeaderValue::from_static("websocket"));
        return r;
    }
    if path == "/echo" {
        return hyper::Response::new(req.into_body().boxed());
    }
    if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<usize>().ok()) {
        // `n` bytes, streamed in 64 KiB chunks (for slow-reader tests).
        let chunks = futures_util::stream::iter((0..n.div_ceil(65536)).map(move |i| {
            let len = (n - i * 65536).min(65536);
            Ok::<_, hyper::Error>(hyper::body::Frame::data(hyper::body::Bytes::from(vec![b'x'; len])))
        }));
        return hyper::Response::new(http_body_util::StreamBody::new(chunks).boxed());
    }
    if let Some(code) = path.strip_prefix("/status/").and_then(|c| c.parse::<u16>().ok()) {
        return text(code, format!("status {code}\n"));
    }
    if let Some(id) = path.strip_prefix("/fail-once/") {
        // 503 the first time an id is seen, 200 after: a flaky upstream.
        static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let mut seen = SEEN.lock().unwrap();
        if seen.iter().any(|s| s == id) {
            return text(200, format!("recovered {id}\n"));
        }
        seen.push(id.to_owned());
        return text(503, format!("failing {id} once\n"));
    }
    if let Some(who) = path.strip_prefix("/unhealthy-on/") {
        // 503 from the pod named, 200 from the others: one bad endpoint.
        let status = if who == name { 503 } else { 200 };
        return text(status, format!("{name} answers {status}\n"));
    }
    if path == "/headers" {
        let mut lines: Vec<String> =
            req.headers().iter().map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?"))).collect();
        lines.sort();
        return text(200, lines.join("\n") + "\n");
    }
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|c| c.parse::<u64>().ok()) {
        // Headers only after the delay, as a slow upstream.
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        return text(200, format!("after {ms} ms\n"));
    }
    let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
    text(200, format!("hello from {name}; client {}; {:?}; x-request-id {id}\n", peer.ip(), req.version()))
}

/// A WebSocket echo server on `port` (tokio-tungstenite): every message comes
/// back as it was sent; a close is answered with a close.
pub fn websocket_echo(pod: &Pod, port: u16) {
    serve_async(pod, port, |stream, _| async move {
        use futures_util::{SinkExt as _, StreamExt as _};
        let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                return;
            }
        }
        let _ = ws.close(None).await;
    });
}

/// An OTLP/gRPC trace collector on port 4317 in the pod: it keeps the spans
/// it is sent, or (`count_only`, for a benchmark's load) only counts them.
pub fn otlp_collector(pod: &Pod, count_only: bool) -> mesh_agent::telemetry::trace::receiver::Receiver {
    use mesh_agent::telemetry::trace::receiver::Receiver;
    let (tx, rx) = std::sync::mpsc::channel();
    pod.spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let addr = ([0, 0, 0, 0], 4317).into();
            let started = if count_only { Receiver::counting(addr).await } else { Receiver::start(addr).await };
            tx.send(started.unwrap()).unwrap();
            std::future::pending::<()>().await
        })
    });
    rx.recv().unwrap()
}

/// The collector's Service `otel-collector` (port 4317, `grpc-otlp`) in
/// front of the pods labelled `app: <app>` in `namespace`, and MeshConfig
/// with it as the `opentelemetry` provider `otel`, then `mesh` (more of
/// MeshConfig, indented as its lines).
pub fn otlp_collector_config(namespace: &str, app: &str, vip: &str, mesh: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: otel-collector, namespace: {namespace}}}\n\
         spec: {{clusterIP: {vip}, selector: {{app: {app}}}, ports: [{{name: grpc-otlp, port: 4317, targetPort: 4317}}]}}\n\
         ---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n    \
         extensionProviders:\n    - name: otel\n      opentelemetry: {{service: otel-collector.{namespace}.svc.cluster.local, port: 4317}}\n{mesh}"
    )
}
