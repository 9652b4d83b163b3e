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
    let pid = a.pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// A well-behaved client in pod `test`: one request to helloworld (across
/// nodes, over mTLS) every 50 ms until stopped; (errors, latencies).
fn well_behaved(m: &Mesh, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(usize, Vec<Duration>)> {
    let url = format!("http://{VIP}:9095/hello");
    m.pod("test").spawn(move || {
        let (mut errors, mut took) = (0, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            let start = Instant::now();
            let ok = std::process::Command::new("curl")
                .args(["-sSf", "--max-time", "5", &url])
                .output()
                .is_ok_and(|o| o.status.success());
            took.push(start.elapsed());
            if !ok {
                errors += 1;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (errors, took)
    })
}

/// Runs `attack` while the well-behaved client runs; asserts it saw no error
/// and reports its latency.
fn under_attack(m: &Mesh, what: &str, attack: impl FnOnce()) {
    let stop = Arc::new(AtomicBool::new(false));
    let client = well_behaved(m, stop.clone());
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
