//! HTTP/1.1, HTTP/2, upgrades, WebSocket and gRPC through the mesh across
//! nodes (root), one behaviour per test.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use mesh_tests::{agent::metric, mesh::*, require_root};

/// The labels of a request from `test` to Service `api` over mTLS, with `code`.
fn api_request(code: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("reporter", "source"),
        ("destination_service", "api.demo.svc.cluster.local"),
        ("source_principal", TEST_ID),
        ("destination_principal", HELLO_ID),
        ("request_protocol", "http"),
        ("connection_security_policy", "mutual_tls"),
        ("response_code", code),
    ]
}

#[test]
fn http1_keep_alive_adds_a_request_id_and_keeps_trace_context() {
    if !require_root("http1_keep_alive_adds_a_request_id_and_keeps_trace_context") {
        return;
    }
    let m = Mesh::start("", &[]);
    let test = m.pod("test");
    let api = format!("http://{API_VIP}");
    // Two requests on one client connection; the agent adds x-request-id; the
    // server sees the client pod.
    let out = test.cmd(&["curl", "-sSfv", "--max-time", "5", &format!("{api}/hello"), &format!("{api}/hello")]);
    let (body, verbose) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{verbose}");
    assert_eq!(
        body.matches(&format!("hello from helloworld; client {TEST_IP}; HTTP/1.1; x-request-id ")).count(),
        2,
        "{body}"
    );
    assert!(!body.contains("x-request-id -"), "{body}");
    assert!(verbose.contains("Re-using existing connection"), "{verbose}");

    // Trace context passes untouched (W3C and B3); a request id the client sent is kept.
    let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let out = test.cmd(&[
        "curl",
        "-sSf",
        "-H",
        &format!("traceparent: {trace}"),
        "-H",
        "x-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7",
        "-H",
        "x-request-id: my-id-1",
        &format!("{api}/headers"),
    ]);
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(seen.contains(&format!("traceparent: {trace}")), "{seen}");
    assert!(seen.contains("x-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7"), "{seen}");
    assert!(seen.contains("x-request-id: my-id-1"), "{seen}");
}

#[test]
fn an_h2c_client_reaches_an_http_port_as_http1_upstream() {
    if !require_root("an_h2c_client_reaches_an_http_port_as_http1_upstream") {
        return;
    }
    let m = Mesh::start("", &[]);
    // As Istio: the client keeps HTTP/2, the `http` port gets HTTP/1.1.
    let out = m.pod("test").cmd(&[
        "curl",
        "-sSf",
        "--http2-prior-knowledge",
        "--max-time",
        "5",
        "-w",
        "client %{http_version}",
        &format!("http://{API_VIP}/hello"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("; HTTP/1.1;") && text.ends_with("client 2"), "{out:?}");
}

#[test]
fn bodies_stream_both_ways_on_http1_and_h2c() {
    if !require_root("bodies_stream_both_ways_on_http1_and_h2c") {
        return;
    }
    let m = Mesh::start("", &[]);
    // 8 MiB, chunked on HTTP/1.1 (with Expect: 100-continue, which curl sends
    // for large bodies) and on HTTP/2.
    let dir = std::env::temp_dir().join(format!("mesh-test-l7-{}", m.c.id));
    std::fs::create_dir_all(&dir).unwrap();
    let payload: Vec<u8> = (0..8u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let input = dir.join("in");
    std::fs::write(&input, &payload).unwrap();
    for (what, extra) in [("HTTP/1.1 chunked", "-HTransfer-Encoding: chunked"), ("h2c", "--http2-prior-knowledge")] {
        let output = dir.join("out");
        let out = m.pod("test").cmd(&[
            "curl",
            "-sSf",
            "--max-time",
            "20",
            extra,
            "--data-binary",
            &format!("@{}", input.display()),
            "-o",
            output.to_str().unwrap(),
            &format!("http://{API_VIP}/echo"),
        ]);
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(std::fs::read(&output).unwrap() == payload, "{what}: echoed body differs");
    }
    let _ = std::fs::remove_dir_all(&dir);
    // Counted as they streamed.
    let text = m.agents[0]
        .wait_metrics(5, "request metrics", |t| metric(t, "istio_requests_total", &api_request("200")) >= 2.0);
    assert!(metric(&text, "istio_request_bytes_sum", &api_request("200")) >= 2.0 * payload.len() as f64, "{text}");
    assert!(metric(&text, "istio_response_bytes_sum", &api_request("200")) >= 2.0 * payload.len() as f64, "{text}");
}

#[test]
fn an_upgrade_and_an_extended_connect_carry_bytes_both_ways() {
    if !require_root("an_upgrade_and_an_extended_connect_carry_bytes_both_ways") {
        return;
    }
    let m = Mesh::start("", &[]);
    let test = m.pod("test");
    // Upgrade (as WebSocket does): 101, then raw bytes both ways.
    let echoed = test.run(|| {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from(([10, 96, 0, 11], 80)), Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /upgrade HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let mut total = Vec::new();
        for round in 0..64u8 {
            let msg = vec![round; 16 * 1024];
            s.write_all(&msg).unwrap();
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).unwrap();
            total.extend_from_slice(&back);
        }
        total
    });
    assert_eq!(echoed.len(), 64 * 16 * 1024);
    assert!(echoed.chunks(16 * 1024).enumerate().all(|(i, c)| c.iter().all(|b| *b as usize == i)));

    // HTTP/2 extended CONNECT (RFC 8441, WebSocket over HTTP/2): a tunnel on
    // one stream, through the mesh.
    let echoed = test.run(|| {
        runtime().block_on(async {
            use http_body_util::Empty;
            use hyper::body::Bytes;
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let tcp = tokio::net::TcpStream::connect((API_VIP, 80)).await.unwrap();
            let io = hyper_util::rt::TokioIo::new(tcp);
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
            tokio::spawn(conn);
            let mut req =
                hyper::Request::connect(format!("http://{API_VIP}/upgrade")).body(Empty::<Bytes>::new()).unwrap();
            req.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
            let mut total = Vec::new();
            for round in 0..32u8 {
                let msg = vec![round; 8 * 1024];
                io.write_all(&msg).await.unwrap();
                let mut back = vec![0u8; msg.len()];
                io.read_exact(&mut back).await.unwrap();
                total.extend_from_slice(&back);
            }
            total
        })
    });
    assert_eq!(echoed.len(), 32 * 8 * 1024);
    assert!(echoed.chunks(8 * 1024).enumerate().all(|(i, c)| c.iter().all(|b| *b as usize == i)));
    // Each counted as one request: the 101 and the extended CONNECT's 200.
    let text = m.agents[0].wait_metrics(5, "request metrics", |t| {
        metric(t, "istio_requests_total", &api_request("101")) >= 1.0
            && metric(t, "istio_requests_total", &api_request("200")) >= 1.0
    });
    assert_eq!(metric(&text, "istio_requests_total", &api_request("101")), 1.0, "{text}");
    assert_eq!(metric(&text, "istio_requests_total", &api_request("200")), 1.0, "{text}");
}

/// MeshConfig's access log settings, for a test's YAML.
fn mesh_config(body: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\n\
         data:\n  mesh: |\n{}",
        body.lines().map(|l| format!("    {l}\n")).collect::<String>()
    )
}

/// The access log's lines once it has `n` (both agents write to `path`).
fn log_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let text = mesh_tests::agent::wait_for_log(path, |t| t.lines().count() >= n);
    text.lines().map(str::to_owned).collect()
}

#[test]
fn request_metrics_and_envoys_access_log_at_both_agents() {
    if !require_root("request_metrics_and_envoys_access_log_at_both_agents") {
        return;
    }
    let access_log = std::env::temp_dir().join(format!("mesh-test-access-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&access_log);
    // MeshConfig names no file: the agents' --access-log does; JSON encoding.
    let json = mesh_config("accessLogEncoding: JSON");
    let m = Mesh::start(&json, &["--access-log", access_log.to_str().unwrap()]);
    let test = m.pod("test");
    let (ok, out) = curl(test, &format!("http://{API_VIP}/hello"));
    assert!(ok, "{out}");
    // An upstream status passes through and is counted.
    let out =
        test.cmd(&["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{API_VIP}/status/503")]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "503");
    // A pod outside the mesh with nothing on the port: the source cannot connect.
    let refused = format!("http://{OUTSIDER_IP}:9999/closed");
    let out = test.cmd(&["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &refused]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "503");

    let text = m.agents[0].wait_metrics(5, "request metrics", |t| {
        metric(t, "istio_requests_total", &api_request("200")) >= 1.0
            && metric(t, "istio_requests_total", &api_request("503")) >= 1.0
    });
    assert_eq!(metric(&text, "istio_requests_total", &api_request("200")), 1.0, "{text}");
    assert_eq!(metric(&text, "istio_request_duration_milliseconds_count", &api_request("503")), 1.0, "{text}");

    // One line per request at each agent that handled it, Istio's JSON fields.
    let lines: Vec<serde_json::Value> =
        log_lines(&access_log, 5).iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5, "{lines:?}");
    let closed = lines.iter().find(|l| l["path"] == "/closed").expect("the refused request's line");
    assert_eq!(closed["response_code"], 503);
    assert_eq!(closed["response_flags"], "UF", "{closed}");
    let why = closed["upstream_transport_failure_reason"].as_str().unwrap_or_default();
    assert!(why.contains("refused"), "{closed}");
    let at = |cluster: &str| lines.iter().find(|l| l["path"] == "/status/503" && l["upstream_cluster"] == cluster);
    let source = at("outbound|80||api.demo.svc.cluster.local").expect("the source's line");
    assert_eq!(source["response_code"], 503);
    assert_eq!(source["response_code_details"], "via_upstream");
    assert_eq!(source["downstream_local_address"], format!("{API_VIP}:80"));
    assert_eq!(source["upstream_host"], "10.244.2.2:8080");
    assert_eq!(source["request_id"].as_str().map(str::len), Some(36), "{source}");
    assert_eq!(source["method"], "GET");
    assert_eq!(source["protocol"], "HTTP/1.1");
    assert_eq!(source["route_name"], "default");
    let dest = at("inbound|8080||").expect("the destination's line");
    // The same request, by its id.
    assert_eq!(dest["request_id"], source["request_id"]);
    assert_eq!(dest["response_code"], 503);

    // A custom TEXT format, a file named by MeshConfig, a token in the query
    // redacted, and TCP connections logged when they open and close.
    let custom_log = access_log.with_extension("custom");
    let _ = std::fs::remove_file(&custom_log);
    let format = "%ACCESS_LOG_TYPE% %REQ(:METHOD)% %REQ(:PATH)% %BYTES_RECEIVED% %UPSTREAM_CLUSTER%";
    m.set_config(&mesh_config(&format!("accessLogFile: {}\naccessLogFormat: \"{format}\"", custom_log.display())));
    let (ok, out) = curl(test, &format!("http://{API_VIP}/hello?access_token=secret-value&x=1"));
    assert!(ok, "{out}");
    let marker = b"logged".to_vec();
    let echoed = test.run(move || mesh_tests::clients::tcp_echo(format!("{VIP}:7000").parse().unwrap(), &marker));
    assert_eq!(echoed.unwrap(), b"logged");
    let custom = log_lines(&custom_log, 6);
    let _ = (std::fs::remove_file(&access_log), std::fs::remove_file(&custom_log));
    let want = [
        "DownstreamEnd GET /hello?access_token=REDACTED&x=1 0 outbound|80||api.demo.svc.cluster.local",
        "DownstreamEnd GET /hello?access_token=REDACTED&x=1 0 inbound|8080||",
        "TcpUpstreamConnected - - 0 outbound|7000||helloworld.demo.svc.cluster.local",
        "TcpConnectionEnd - - 6 outbound|7000||helloworld.demo.svc.cluster.local",
        "TcpUpstreamConnected - - 0 inbound|7000||",
        "TcpConnectionEnd - - 6 inbound|7000||",
    ];
    for line in want {
        assert!(custom.iter().any(|l| l == line), "no {line:?} in {custom:#?}");
    }
    assert!(!custom.iter().any(|l| l.contains("secret-value")), "{custom:#?}");
}

#[test]
fn upstream_connections_are_pooled_per_client_pod() {
    if !require_root("upstream_connections_are_pooled_per_client_pod") {
        return;
    }
    let m = Mesh::start("", &[]);
    // Requests on new client connections (a GET, a HEAD and a 204 with no body
    // to read, a GET) all go on one tunnel to node-2.
    let tunnels = [("reporter", "destination"), ("destination_app", "helloworld")];
    let opened = || metric(&m.agents[1].metrics(), "istio_tcp_connections_opened_total", &tunnels);
    let before = opened();
    for (flag, path) in [("-sSf", "/hello"), ("-sSfI", "/hello"), ("-sSf", "/status/204"), ("-sSf", "/hello")] {
        let out = m.pod("test").cmd(&["curl", flag, "--max-time", "5", &format!("http://{API_VIP}{path}")]);
        assert!(out.status.success(), "{path}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let after = opened();
    assert!(after - before <= 1.0, "{} new tunnels for 4 requests: upstream connections not reused", after - before);
}

#[test]
fn websocket_through_the_mesh_across_nodes() {
    if !require_root("websocket_through_the_mesh_across_nodes") {
        return;
    }
    let m = Mesh::start("", &[]);
    // A real WebSocket client (tokio-tungstenite) in the test pod: many small
    // messages and a large one, each echoed intact, then a clean close.
    let echoed = m.pod("test").run(|| {
        runtime().block_on(async {
            use futures_util::{SinkExt as _, StreamExt as _};
            use tokio_tungstenite::tungstenite::Message;
            let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{WS_VIP}/echo")).await.unwrap();
            assert_eq!(resp.status(), 101);
            let mut count = 0usize;
            for i in 0..200 {
                let text = format!("message {i}");
                ws.send(Message::text(text.clone())).await.unwrap();
                let back = ws.next().await.unwrap().unwrap();
                assert_eq!(back, Message::text(text));
                count += 1;
            }
            let big: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
            ws.send(Message::binary(big.clone())).await.unwrap();
            let back = ws.next().await.unwrap().unwrap();
            assert!(back.into_data() == big, "large message changed");
            ws.close(None).await.unwrap();
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() {
                    break;
                }
            }
            count + 1
        })
    });
    assert_eq!(echoed, 201);
    let labels = [
        ("destination_service", "ws.demo.svc.cluster.local"),
        ("response_code", "101"),
        ("connection_security_policy", "mutual_tls"),
    ];
    m.agents[0].wait_metrics(5, "the upgrade request", |t| metric(t, "istio_requests_total", &labels) == 1.0);
}

#[test]
fn grpc_through_the_mesh_across_nodes() {
    if !require_root("grpc_through_the_mesh_across_nodes") {
        return;
    }
    let m = Mesh::start("", &[]);
    let (ok, streamed, failed) = m.pod("test").run(|| {
        runtime().block_on(async {
            let mut c = mesh_tests::grpc::client(format!("http://{GRPC_VIP}")).await;
            let ok =
                mesh_tests::grpc::unary(&mut c, mesh_tests::grpc::EchoMsg { text: "hi".into(), fail_with: 0 }).await;
            let msgs = (0..100).map(|i| mesh_tests::grpc::EchoMsg { text: format!("m{i}"), fail_with: 0 }).collect();
            let streamed = mesh_tests::grpc::bidi(&mut c, msgs).await;
            let failed =
                mesh_tests::grpc::unary(&mut c, mesh_tests::grpc::EchoMsg { text: "x".into(), fail_with: 5 }).await;
            (ok, streamed, failed)
        })
    });
    assert_eq!(ok.unwrap().text, "helloworld: hi");
    let streamed = streamed.unwrap();
    assert_eq!(streamed.len(), 100);
    assert!(streamed.iter().enumerate().all(|(i, t)| *t == format!("M{i}")), "{streamed:?}");
    // A non-OK status arrives intact, message included.
    let status = failed.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "failing as asked: x");

    let base = [
        ("destination_service", "grpc.demo.svc.cluster.local"),
        ("request_protocol", "grpc"),
        ("response_code", "200"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let with = |s: &'static str| [base.as_slice(), &[("grpc_response_status", s)]].concat();
    let text = m.agents[0].wait_metrics(5, "gRPC metrics", |t| {
        metric(t, "istio_requests_total", &with("0")) >= 2.0 && metric(t, "istio_requests_total", &with("5")) >= 1.0
    });
    assert_eq!(metric(&text, "istio_requests_total", &with("0")), 2.0, "{text}");
    assert_eq!(metric(&text, "istio_requests_total", &with("5")), 1.0, "{text}");
}
