//! HTTP versions and upgrades through the pipeline: HTTP/2 kept or chosen as
//! Istio would, Upgrade and WebSocket over HTTP/2, idle client connections.
use super::*;

/// An HTTP/1.1 upstream that accepts `Upgrade: websocket` (with the
/// WebSocket handshake headers too, when `handshake`) and echoes what
/// follows; its port.
async fn websocket_echo(handshake: bool) -> u16 {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| async move {
                let h = req.headers();
                let ok = req.method() == hyper::Method::GET
                    && h.get("upgrade").is_some_and(|v| v == "websocket")
                    && (!handshake
                        || h.get("sec-websocket-key").is_some_and(|k| k.len() == 24)
                            && h.get("sec-websocket-version").is_some_and(|v| v == "13"));
                let on = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    if let Ok(up) = on.await {
                        let mut io = TokioIo::new(up);
                        let mut buf = [0u8; 64];
                        while let Ok(n @ 1..) = tokio::io::AsyncReadExt::read(&mut io, &mut buf).await {
                            let _ = tokio::io::AsyncWriteExt::write_all(&mut io, &buf[..n]).await;
                        }
                    }
                });
                let resp = match ok {
                    true => Response::builder()
                        .status(StatusCode::SWITCHING_PROTOCOLS)
                        .header("connection", "upgrade")
                        .header("upgrade", "websocket")
                        .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
                    false => Response::builder().status(StatusCode::BAD_REQUEST),
                };
                Ok::<_, Infallible>(resp.body(Empty::<Bytes>::new()).expect("response"))
            });
            tokio::spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
                conn.with_upgrades().await
            });
        }
    });
    port
}

/// An h2c-only upstream answering `<version> <path>`; its port.
async fn h2_only() -> u16 {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                let body = format!("{:?} {}", req.version(), req.uri().path());
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            });
            let builder = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
            tokio::spawn(async move { builder.serve_connection(TokioIo::new(tcp), svc).await });
        }
    });
    port
}

/// A GET through the pipeline on a client connection of `version`.
async fn get_as(t: &TestInputs, h2: bool) -> (StatusCode, String) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let handling = if h2 { Handling::Http2 } else { Handling::Http1 };
    tokio::spawn(serve(t.inputs.clone(), server, downstream(), handling));
    let resp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(client))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        let req = Request::get("http://hello/v").body(Empty::<Bytes>::new()).expect("request");
        send.send_request(req).await.expect("response")
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client)).await.expect("handshake");
        tokio::spawn(conn);
        let req = Request::get("/v").header("host", "hello").body(Empty::<Bytes>::new()).expect("request");
        send.send_request(req).await.expect("response")
    };
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn with_pool(yaml: String, http: &str) -> String {
    format!(
        "{yaml}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: hello, namespace: plain}}\n\
         spec: {{host: hello, trafficPolicy: {{connectionPool: {{http: {{{http}}}}}}}}}\n"
    )
}

#[tokio::test]
async fn http2_stays_http2_to_an_upstream_declared_http2() {
    // An h2c upstream answering with the version it was asked in.
    let port = h2_only().await;
    let yaml = cluster(port, "{route: [{destination: {host: hello}}]}").replace("name: http,", "name: http2,");
    let t = TestInputs::new(&yaml);
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(serve(t.inputs.clone(), server, downstream(), Handling::Http2));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(client))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    // Two requests on one client connection, as gRPC clients multiplex them.
    for path in ["/one", "/two"] {
        let req = Request::get(format!("http://hello{path}")).body(Empty::<Bytes>::new()).expect("request");
        let resp = send.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(String::from_utf8_lossy(&body), format!("HTTP/2.0 {path}"));
    }
}

#[tokio::test]
async fn an_upgrade_joins_client_and_upstream_after_101() {
    let port = websocket_echo(false).await;
    let t = TestInputs::new(&cluster(port, "{route: [{destination: {host: hello}}]}"));
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(serve(t.inputs.clone(), server, downstream(), Handling::Http1));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client)).await.expect("handshake");
    tokio::spawn(conn.with_upgrades());
    let req = Request::get("/ws")
        .header("host", "hello")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.expect("upgraded"));
    echoes(&mut io, &["first frame", "second frame"]).await;
}

#[tokio::test]
async fn an_http_port_gets_http1_from_an_h2c_client_as_istio_sends_it() {
    // An HTTP/1.1-only upstream behind a port named `http`.
    let (port, _) = upstream(|_| Some(StatusCode::OK)).await;
    let t = TestInputs::new(&cluster(port, "{route: [{destination: {host: hello}}]}"));
    assert_eq!(get_as(&t, true).await, (StatusCode::OK, "up".into()));
}

#[tokio::test]
async fn destination_rules_can_ask_for_the_clients_protocol_or_an_upgrade_to_h2() {
    let port = h2_only().await;
    let yaml = || cluster(port, "{route: [{destination: {host: hello}}]}");
    // useClientProtocol: the h2c client's HTTP/2 goes through.
    let t = TestInputs::new(&with_pool(yaml(), "useClientProtocol: true"));
    assert_eq!(get_as(&t, true).await, (StatusCode::OK, "HTTP/2.0 /v".into()));
    // h2UpgradePolicy UPGRADE: an HTTP/1.1 client's request goes as HTTP/2.
    let t = TestInputs::new(&with_pool(yaml(), "h2UpgradePolicy: UPGRADE"));
    assert_eq!(get_as(&t, false).await, (StatusCode::OK, "HTTP/2.0 /v".into()));
    // Without either, the h2-only upstream cannot be reached on an `http` port.
    let t = TestInputs::new(&yaml());
    assert_eq!(get_as(&t, false).await.0, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn websocket_over_http2_becomes_an_http1_upgrade_upstream() {
    // The upstream insists on the WebSocket handshake headers RFC 8441 leaves out.
    let port = websocket_echo(true).await;
    let t = TestInputs::new(&cluster(port, "{route: [{destination: {host: hello}}]}"));
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(serve(t.inputs.clone(), server, downstream(), Handling::Http2));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(client))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let mut req = Request::connect("http://hello/ws").body(Empty::<Bytes>::new()).expect("request");
    req.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.expect("upgraded"));
    echoes(&mut io, &["over h2", "and h1"]).await;
}

#[tokio::test(start_paused = true)]
async fn an_idle_keep_alive_client_connection_is_closed() {
    let (port, _) = upstream(|_| Some(StatusCode::OK)).await;
    let t = TestInputs::new(&cluster(port, "{route: [{destination: {host: hello}}]}"));
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(serve(t.inputs.clone(), server, downstream(), Handling::Http1));
    tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\nhost: hello\r\n\r\n").await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::io::AsyncReadExt::read(&mut client, &mut buf).await.expect("an answer");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Then nothing: the agent lets the connection go.
    let idle_since = tokio::time::Instant::now();
    let n = tokio::io::AsyncReadExt::read(&mut client, &mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "more bytes on an idle connection");
    // HTTP/1.1: hyper's header read timeout, 30 s, runs between requests too.
    let idle = idle_since.elapsed();
    assert!(idle >= std::time::Duration::from_secs(30) && idle < std::time::Duration::from_secs(31), "{idle:?}");
}

#[tokio::test(start_paused = true)]
async fn an_idle_http2_client_connection_is_closed_after_the_idle_timeout() {
    let (port, _) = upstream(|_| Some(StatusCode::OK)).await;
    let limits = crate::proxy::limits::Limits {
        idle_timeout: std::time::Duration::from_secs(600),
        // No pings in the way: only the idle timer may close it.
        keepalive_interval: std::time::Duration::from_secs(100_000),
        ..Default::default()
    };
    let t = TestInputs::with_limits(&cluster(port, "{route: [{destination: {host: hello}}]}"), limits);
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(serve(t.inputs.clone(), server, downstream(), Handling::Http2));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(client))
            .await
            .expect("h2 handshake");
    let closed = tokio::spawn(conn);
    let req = Request::get("http://hello/").body(Empty::<Bytes>::new()).expect("request");
    assert_eq!(send.send_request(req).await.expect("response").status(), StatusCode::OK);
    let idle_since = tokio::time::Instant::now();
    let _ = closed.await;
    let idle = idle_since.elapsed();
    assert!(idle >= std::time::Duration::from_secs(600) && idle < std::time::Duration::from_secs(1300), "{idle:?}");
}

/// Each message written to the upgraded stream comes back whole.
async fn echoes(io: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin), messages: &[&str]) {
    for msg in messages {
        tokio::io::AsyncWriteExt::write_all(io, msg.as_bytes()).await.expect("write");
        let mut back = vec![0; msg.len()];
        tokio::io::AsyncReadExt::read_exact(io, &mut back).await.expect("echo");
        assert_eq!(back, msg.as_bytes());
    }
}
