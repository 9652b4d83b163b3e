//! Hostile clients and upstreams next to a well-behaved client (root, two
//! nodes): the agents stay up, their memory stays bounded, and the
//! well-behaved client keeps getting answers throughout (its errors must be
//! zero; its latency is reported, not asserted). Bounded in time and count,
//! and only against the test's own namespaces.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    io::Write as _,
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_tests::{Agent, agent::metric, mesh::*, require_root};

/// The agent's resident memory, MiB.
fn rss_mib(a: &Agent) -> f64 {
    mesh_tests::agent::rss_mib(a.pid().unwrap())
}

/// A well-behaved client in pod `test`: one request to helloworld (across
/// nodes, over mTLS) every 50 ms until stopped; (errors, latencies).
fn well_behaved(m: &Mesh, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(usize, Vec<Duration>)> {
    let url = format!("http://{VIP}:9095/hello");
    m.pod("test").spawn(move || {
        polite(stop, || std::process::Command::new("curl").args(["-sSf", "--max-time", "5", &url]).output())
    })
}

/// Runs `request` every 50 ms until stopped: (errors, latencies).
fn polite(
    stop: Arc<AtomicBool>,
    request: impl Fn() -> std::io::Result<std::process::Output>,
) -> (usize, Vec<Duration>) {
    let (mut errors, mut took) = (0, Vec::new());
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let ok = request().is_ok_and(|o| o.status.success());
        took.push(start.elapsed());
        if !ok {
            errors += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (errors, took)
}

/// Runs `attack` while the well-behaved client runs; asserts it saw no error
/// and reports its latency.
fn under_attack(m: &Mesh, what: &str, attack: impl FnOnce()) {
    let stop = Arc::new(AtomicBool::new(false));
    let client = well_behaved(m, stop.clone());
    judge(what, stop, client, attack);
}

/// As [`under_attack`], with a well-behaved client already started.
fn judge(
    what: &str,
    stop: Arc<AtomicBool>,
    client: std::thread::JoinHandle<(usize, Vec<Duration>)>,
    attack: impl FnOnce(),
) {
    std::thread::sleep(Duration::from_millis(300));
    attack();
    stop.store(true, Ordering::Relaxed);
    let (errors, mut took) = client.join().unwrap();
    took.sort();
    let pct = |p: f64| took.get(((took.len() as f64 - 1.0) * p) as usize).copied().unwrap_or_default();
    eprintln!(
        "{what}: well-behaved client: {} requests, {errors} errors, latency p50 {:?}, p99 {:?}, max {:?}",
        took.len(),
        pct(0.5),
        pct(0.99),
        took.last().copied().unwrap_or_default()
    );
    assert_eq!(errors, 0, "{what}: the well-behaved client got errors");
    assert!(took.len() >= 3, "{what}: too few well-behaved requests to tell");
}

#[test]
fn ten_thousand_silent_or_preface_only_connections() {
    if !require_root("ten_thousand_silent_or_preface_only_connections") {
        return;
    }
    mesh_agent::privileges::raise_fd_limit();
    let m = Mesh::start("", &[]);
    let before = rss_mib(&m.agents[0]);
    let held = std::sync::Mutex::new(Vec::new());
    under_attack(&m, "10 000 idle connections", || {
        let opened = m.pod("sleep").run(|| {
            let mut open = Vec::new();
            for i in 0..10_000 {
                let Ok(mut s) =
                    TcpStream::connect_timeout(&SocketAddr::from(([10, 96, 0, 11], 80)), Duration::from_secs(2))
                else {
                    continue;
                };
                if i % 2 == 0 {
                    let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
                }
                open.push(s);
            }
            open
        });
        held.lock().unwrap().extend(opened);
        std::thread::sleep(Duration::from_secs(2));
    });
    let after = rss_mib(&m.agents[0]);
    let text = m.agents[0].metrics();
    let refused = metric(&text, "mesh_limit_refusals_total", &[("listener", "outbound"), ("reason", "source_full")]);
    eprintln!(
        "agent RSS {before:.1} → {after:.1} MiB with 10 000 hostile connections; {refused} refused over the per-source limit"
    );
    assert!(after < 512.0, "agent memory {after:.1} MiB above the 512 MiB bound");
    assert!(refused >= 1_000.0, "the per-source limit (8 192) turned away {refused}");
    drop(held);
}

#[test]
fn slowloris_and_http2_rapid_reset() {
    if !require_root("slowloris_and_http2_rapid_reset") {
        return;
    }
    mesh_agent::privileges::raise_fd_limit();
    let m = Mesh::start("", &[]);
    under_attack(&m, "slowloris (500 connections, a header byte each 500 ms)", || {
        let conns = m.pod("sleep").run(|| {
            (0..500)
                .filter_map(|_| {
                    TcpStream::connect_timeout(&SocketAddr::from(([10, 96, 0, 11], 80)), Duration::from_secs(2)).ok()
                })
                .collect::<Vec<_>>()
        });
        let mut conns = conns;
        for c in &mut conns {
            let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: api\r\nX-Slow: ");
        }
        for _ in 0..6 {
            std::thread::sleep(Duration::from_millis(500));
            for c in &mut conns {
                let _ = c.write_all(b"a");
            }
        }
    });
    under_attack(&m, "HTTP/2 rapid reset (20 000 streams opened and cancelled)", || {
        m.pod("sleep").run(|| {
            runtime().block_on(async {
                use http_body_util::Empty;
                use hyper::body::Bytes;
                for _ in 0..4 {
                    let Ok(tcp) = tokio::net::TcpStream::connect((API_VIP, 80)).await else { continue };
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let Ok((send, conn)) =
                        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await
                    else {
                        continue;
                    };
                    tokio::spawn(conn);
                    for _ in 0..5_000 {
                        let mut send = send.clone();
                        let req =
                            hyper::Request::get(format!("http://{API_VIP}/hello")).body(Empty::<Bytes>::new()).unwrap();
                        // Sent, then dropped: the stream is reset at once.
                        let fut = send.send_request(req);
                        let _ = tokio::time::timeout(Duration::from_micros(1), fut).await;
                    }
                }
            })
        });
    });
    assert!(m.agents[0].pid().is_some(), "the agent is gone");
}

#[test]
fn two_thousand_handshakes_at_15008_leave_peer_agents_served() {
    if !require_root("two_thousand_handshakes_at_15008_leave_peer_agents_served") {
        return;
    }
    mesh_agent::privileges::raise_fd_limit();
    let m = Mesh::start("", &[]);
    let node2 = m.c.nodes[1].ip;
    let held = std::sync::Mutex::new(Vec::new());
    under_attack(&m, "2 000 TLS handshakes left hanging at node-2's 15008", || {
        let conns = mesh_tests::netns::enter_and_spawn(&m.c.net_ns, move || {
            let mut open = Vec::new();
            for _ in 0..2_000 {
                if let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::from((node2, 15008)), Duration::from_secs(2))
                {
                    // A ClientHello's first bytes, then nothing.
                    let _ = s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]);
                    open.push(s);
                }
            }
            open
        })
        .join()
        .unwrap();
        held.lock().unwrap().extend(conns);
        std::thread::sleep(Duration::from_secs(3));
    });
    let text = m.agents[1].metrics();
    let refused = metric(&text, "mesh_limit_refusals_total", &[("listener", "hbone"), ("reason", "handshakes_full")]);
    eprintln!("node-2 turned away {refused} handshakes over the limit");
    assert!(refused >= 1.0, "no handshake was refused: {text}");
    drop(held);
}

#[test]
fn an_upstream_sending_100_000_distinct_grpc_statuses_grows_no_metric() {
    if !require_root("an_upstream_sending_100_000_distinct_grpc_statuses_grows_no_metric") {
        return;
    }
    let m = Mesh::start("", &[]);
    // A hostile upstream in the helloworld pod: a new grpc-status every answer.
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    mesh_tests::servers::serve_async(m.pod("helloworld"), 9097, move |stream, _| {
        let n = n.clone();
        async move {
            let svc = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                let i = n.fetch_add(1, Ordering::Relaxed);
                async move {
                    let resp = hyper::Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", format!("hostile-{i}"))
                        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let builder = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
            let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
        }
    });
    let before = rss_mib(&m.agents[0]);
    let total = 100_000usize;
    let started = Instant::now();
    let answered = m.pod("test").run(move || {
        runtime().block_on(async move {
            use http_body_util::Empty;
            use hyper::body::Bytes;
            let tcp = tokio::net::TcpStream::connect((HELLO_IP, 9097)).await.unwrap();
            let io = hyper_util::rt::TokioIo::new(tcp);
            let (send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
            tokio::spawn(conn);
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let workers: Vec<_> = (0..64)
                .map(|_| {
                    let (mut send, next) = (send.clone(), next.clone());
                    tokio::spawn(async move {
                        let mut ok = 0usize;
                        while next.fetch_add(1, Ordering::Relaxed) < total {
                            let req = hyper::Request::post(format!("http://{HELLO_IP}:9097/x"))
                                .header("content-type", "application/grpc")
                                .body(Empty::<Bytes>::new())
                                .unwrap();
                            if send.send_request(req).await.is_ok() {
                                ok += 1;
                            }
                        }
                        ok
                    })
                })
                .collect();
            let mut ok = 0;
            for w in workers {
                ok += w.await.unwrap_or(0);
            }
            ok
        })
    });
    let after = rss_mib(&m.agents[0]);
    let text = m.agents[0].metrics();
    let statuses: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter_map(|l| l.split("grpc_response_status=\"").nth(1)?.split('"').next())
        .collect();
    eprintln!(
        "{answered} of {total} answered in {:?}; agent RSS {before:.1} → {after:.1} MiB; grpc_response_status values: {statuses:?}",
        started.elapsed()
    );
    assert!(answered >= total * 99 / 100, "only {answered} of {total} answered");
    assert!(statuses.len() <= 18, "{} distinct grpc_response_status values", statuses.len());
    assert!(after - before < 64.0, "agent memory grew {:.1} MiB", after - before);
}

#[test]
fn a_gateway_under_slowloris_and_hanging_tls_handshakes_keeps_serving() {
    if !require_root("a_gateway_under_slowloris_and_hanging_tls_handshakes_keeps_serving") {
        return;
    }
    mesh_agent::privileges::raise_fd_limit();
    let certs = mesh_tests::certs::Certs::new(&format!("overload-{}", std::process::id()));
    let (crt, key) = certs.server("edge", "edge.example");
    let yaml_block = mesh_tests::certs::Certs::yaml_block;
    let edge = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: edge-cert, namespace: istio-system}}\n\
         type: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}\
         ---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: edge, namespace: istio-system}}\n\
         spec:\n  selector: {{}}\n  servers:\n\
         \x20 - port: {{number: 80, name: http, protocol: HTTP}}\n    hosts: ['*']\n\
         \x20 - port: {{number: 443, name: https, protocol: HTTPS}}\n    hosts: [edge.example]\n\
         \x20   tls: {{mode: SIMPLE, credentialName: edge-cert}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: edge, namespace: demo}}\n\
         spec:\n  hosts: ['*']\n  gateways: [istio-system/edge]\n\
         \x20 http: [{{route: [{{destination: {{host: helloworld, port: {{number: 9095}}}}}}]}}]\n",
        yaml_block(&crt, 4),
        yaml_block(&key, 4)
    );
    // The gateway pod on node-1, behind its load balancer's address.
    let mut f = fixture();
    let lb = std::net::Ipv4Addr::new(172, 18, 100, 1);
    let spec = mesh_tests::fixture::PodSpec::gateway("istio-system", &[("istio", "edge")], "edge-gateway");
    f.gateway(0, "edge-gateway", std::net::Ipv4Addr::new(10, 244, 1, 100), spec, ("10.96.0.40", lb), &[80, 443]);
    let m = Mesh::start_with(f, &edge, &[]);
    let node1 = lb;
    // The attacker has an address of its own in the network outside the nodes.
    let attacker = std::net::Ipv4Addr::new(172, 18, 200, 9);
    assert!(m.c.net_cmd(&["ip", "addr", "add", &format!("{attacker}/32"), "dev", "lo"]).status.success());
    // A well-behaved client outside the mesh: HTTPS through the gateway.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let url = "https://edge.example/hello".to_owned();
    let resolve = format!("edge.example:443:{node1}");
    let ca = certs.ca();
    let net = m.c.net_ns.clone();
    let client = std::thread::spawn(move || {
        polite(flag, || {
            std::process::Command::new("ip")
                .args(["netns", "exec", &net, "curl", "-sSf", "--max-time", "5", "--resolve", &resolve, "--cacert"])
                .arg(&ca)
                .arg(&url)
                .output()
        })
    });
    let held = std::sync::Mutex::new(Vec::new());
    judge("2 000 hanging TLS handshakes and 500 slowloris connections at the gateway", stop, client, || {
        let conns = mesh_tests::netns::enter_and_spawn(&m.c.net_ns, move || {
            let connect = |port: u16| {
                let s = std::net::TcpStream::from(
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?,
                );
                let sock = socket2::SockRef::from(&s);
                sock.bind(&SocketAddr::from((attacker, 0)).into()).ok()?;
                sock.connect_timeout(&SocketAddr::from((node1, port)).into(), Duration::from_secs(2)).ok()?;
                Some(s)
            };
            let mut open = Vec::new();
            for _ in 0..2_000 {
                if let Some(mut s) = connect(443) {
                    let _ = s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]);
                    open.push(s);
                }
            }
            for _ in 0..500 {
                if let Some(mut s) = connect(80) {
                    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: edge.example\r\nX-Slow: ");
                    open.push(s);
                }
            }
            for _ in 0..6 {
                std::thread::sleep(Duration::from_millis(500));
                for s in open.iter_mut().skip(2_000) {
                    let _ = s.write_all(b"a");
                }
            }
            open
        })
        .join()
        .unwrap();
        held.lock().unwrap().extend(conns);
    });
    let text = m.agents[0].metrics();
    let refused = metric(&text, "mesh_limit_refusals_total", &[("listener", "gateway"), ("reason", "handshakes_full")]);
    eprintln!("node-1's gateway turned away {refused} handshakes over the limit");
    assert!(refused >= 1.0, "no handshake was refused");
    drop(held);
}

/// A client stream that stops reading once told to (and never wakes again).
struct StopReading {
    inner: tokio::net::TcpStream,
    stopped: Arc<AtomicBool>,
}

impl tokio::io::AsyncRead for StopReading {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.stopped.load(Ordering::Relaxed) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for StopReading {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[test]
fn a_client_that_opens_a_huge_window_and_never_reads_costs_bounded_memory() {
    if !require_root("a_client_that_opens_a_huge_window_and_never_reads_costs_bounded_memory") {
        return;
    }
    let m = Mesh::start("", &[]);
    let before = rss_mib(&m.agents[0]);
    under_attack(&m, "50 streams × 8 MiB to a client with a 1 GiB window that never reads", || {
        let stopped = Arc::new(AtomicBool::new(false));
        let stop = stopped.clone();
        m.pod("sleep").run(move || {
            runtime().block_on(async move {
                use http_body_util::Empty;
                use hyper::body::Bytes;
                let tcp = tokio::net::TcpStream::connect((API_VIP, 80)).await.unwrap();
                let io = hyper_util::rt::TokioIo::new(StopReading { inner: tcp, stopped: stop.clone() });
                let (send, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .initial_stream_window_size(1 << 30)
                    .initial_connection_window_size(1 << 30)
                    .handshake(io)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let mut asked = Vec::new();
                for _ in 0..50 {
                    let mut send = send.clone();
                    let req = hyper::Request::get(format!("http://{API_VIP}/bytes/8388608"))
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    asked.push(tokio::spawn(async move { send.send_request(req).await.map(|_| ()) }));
                }
                // The requests are out: from now on nothing is read.
                tokio::time::sleep(Duration::from_millis(300)).await;
                stop.store(true, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(4)).await;
            })
        });
        let _ = stopped;
    });
    let after = rss_mib(&m.agents[0]);
    eprintln!("agent RSS {before:.1} → {after:.1} MiB with 400 MiB of responses nobody reads");
    assert!(after - before < 128.0, "agent memory grew {:.1} MiB", after - before);
}
