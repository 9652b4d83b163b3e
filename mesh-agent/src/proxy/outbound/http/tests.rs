//! The HTTP pipeline in-process: `l7::serve` on an in-memory client stream
//! (HTTP/1.1, HTTP/2, upgrades),
//! routing to a loopback upstream by the user's YAML, with paused time where
//! the behaviour is about time. No root, no eBPF, milliseconds per test.
use std::{
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{Request, Response, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;

use super::{Downstream, serve};
use crate::{proxy::inputs::testing::TestInputs, routing::protocol::Handling};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// An unmeshed namespace (no policy in the way), one pod on loopback behind
/// Service `hello` (port 80 → `port`), and `rules` as its VirtualService's
/// `http` routes.
fn cluster(port: u16, rules: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: plain}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: hello, namespace: plain, labels: {{app: hello}}}}\n\
         spec: {{nodeName: n1}}\nstatus: {{podIP: 127.0.0.1, phase: Running}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: hello, namespace: plain}}\n\
         spec: {{clusterIP: {VIP}, selector: {{app: hello}}, ports: [{{name: http, port: 80, targetPort: {port}}}]}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: hello, namespace: plain}}\n\
         spec: {{hosts: [hello], http: [{rules}]}}\n"
    )
}

/// An HTTP/1.1 upstream on loopback answering with `status(n)` for its n-th
/// request (`None`: never answers); returns its port and the request count.
async fn upstream(status: fn(usize) -> Option<StatusCode>) -> (u16, Arc<AtomicUsize>) {
    let up = upstream_on(Ipv4Addr::LOCALHOST, 0, status).await;
    (up.port, up.requests)
}

struct Upstream {
    port: u16,
    requests: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
}

/// As [`upstream`], on `ip:port` (0: any port), counting connections too.
async fn upstream_on(ip: Ipv4Addr, port: u16, status: fn(usize) -> Option<StatusCode>) -> Upstream {
    let listener = tokio::net::TcpListener::bind((ip, port)).await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let (requests, connections) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (seen, accepted) = (requests.clone(), connections.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let n = seen.fetch_add(1, Ordering::SeqCst);
                    async move {
                        match status(n) {
                            Some(s) => Ok::<_, Infallible>(
                                Response::builder().status(s).body(Full::new(Bytes::from("up"))).expect("response"),
                            ),
                            None => std::future::pending().await,
                        }
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    Upstream { port, requests, connections }
}

/// One GET through the pipeline, as a client connected to the Service VIP.
async fn get(t: &TestInputs) -> (StatusCode, String) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(serve(t.inputs.clone(), server, downstream(), Handling::Http1));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client)).await.expect("handshake");
    tokio::spawn(conn);
    let req = Request::get("/").header("host", "hello").body(Empty::<Bytes>::new()).expect("request");
    let resp = send.send_request(req).await.expect("response");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn retries_on_5xx_until_an_answer_succeeds() {
    let (port, count) = upstream(|n| Some(if n < 2 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK })).await;
    let t = TestInputs::new(&cluster(
        port,
        "{route: [{destination: {host: hello}}], retries: {attempts: 3, retryOn: 5xx}}",
    ));
    assert_eq!(get(&t).await, (StatusCode::OK, "up".into()));
    assert_eq!(count.load(Ordering::SeqCst), 3, "two failures and the success");
}

#[tokio::test]
async fn retries_stop_at_the_attempts_given() {
    let (port, count) = upstream(|_| Some(StatusCode::SERVICE_UNAVAILABLE)).await;
    let t = TestInputs::new(&cluster(
        port,
        "{route: [{destination: {host: hello}}], retries: {attempts: 2, retryOn: 5xx}}",
    ));
    assert_eq!(get(&t).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(count.load(Ordering::SeqCst), 3, "the first try and two retries");
}

#[tokio::test(start_paused = true)]
async fn a_route_timeout_answers_504_when_the_upstream_hangs() {
    let (port, count) = upstream(|_| None).await;
    let t = TestInputs::new(&cluster(port, "{route: [{destination: {host: hello}}], timeout: 30s}"));
    let started = tokio::time::Instant::now();
    let (status, body) = get(&t).await;
    assert_eq!((status, body.as_str()), (StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n"));
    // Paused time: the 30 s passed on the clock, not on the wall.
    assert!(started.elapsed() >= std::time::Duration::from_secs(30));
    assert!(count.load(Ordering::SeqCst) <= 1);
}

#[tokio::test]
async fn upstream_connections_are_pooled_across_client_connections() {
    let up = upstream_on(Ipv4Addr::LOCALHOST, 0, |_| Some(StatusCode::OK)).await;
    let t = TestInputs::new(&cluster(up.port, "{route: [{destination: {host: hello}}]}"));
    for _ in 0..3 {
        assert_eq!(get(&t).await.0, StatusCode::OK);
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 3);
    assert_eq!(up.connections.load(Ordering::SeqCst), 1, "one pooled upstream connection for three clients");
}

#[tokio::test]
async fn outlier_detection_ejects_an_endpoint_after_consecutive_5xx() {
    // Two endpoints on one port: 127.0.0.1 always fails, 127.0.0.2 answers.
    let bad = upstream_on(Ipv4Addr::LOCALHOST, 0, |_| Some(StatusCode::SERVICE_UNAVAILABLE)).await;
    let good = upstream_on(Ipv4Addr::new(127, 0, 0, 2), bad.port, |_| Some(StatusCode::OK)).await;
    let second_pod = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: hello-2, namespace: plain, labels: {app: hello}}\n\
        spec: {nodeName: n1}\nstatus: {podIP: 127.0.0.2, phase: Running}\n\
        ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: hello, namespace: plain}\n\
        spec: {host: hello, trafficPolicy: {outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 300s}}}\n";
    let t = TestInputs::new(&format!("{}{second_pod}", cluster(bad.port, "{route: [{destination: {host: hello}}]}")));
    let mut codes = Vec::new();
    for _ in 0..8 {
        codes.push(get(&t).await.0);
    }
    assert_eq!(
        bad.requests.load(Ordering::SeqCst),
        1,
        "the failing endpoint got requests after its ejection: {codes:?}"
    );
    assert_eq!(good.requests.load(Ordering::SeqCst), 7);
    assert_eq!(codes.iter().filter(|c| **c == StatusCode::OK).count(), 7);
}

#[tokio::test]
async fn two_services_of_one_pod_do_not_share_upstream_connections() {
    // `hello` and `hello-too` select the same pod: a connection opened for
    // one names it to the destination, which reports every request on it so.
    let up = upstream_on(Ipv4Addr::LOCALHOST, 0, |_| Some(StatusCode::OK)).await;
    let too = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: hello-too, namespace: plain}}\n\
         spec: {{clusterIP: 10.96.0.11, selector: {{app: hello}}, ports: [{{name: http, port: 80, targetPort: {}}}]}}\n",
        up.port
    );
    let t = TestInputs::new(&format!("{}{too}", cluster(up.port, "{route: [{destination: {host: hello}}]}")));
    let via = |vip: Ipv4Addr, host: &'static str| {
        let inputs = t.inputs.clone();
        async move {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let down = Downstream { orig: SocketAddrV4::new(vip, 80), ..downstream() };
            tokio::spawn(serve(inputs, server, down, Handling::Http1));
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(client)).await.expect("handshake");
            tokio::spawn(conn);
            let req = Request::get("/").header("host", host).body(Empty::<Bytes>::new()).expect("request");
            let resp = send.send_request(req).await.expect("response");
            assert_eq!(resp.status(), StatusCode::OK);
            resp.into_body().collect().await.expect("body");
        }
    };
    via(VIP, "hello").await;
    via(Ipv4Addr::new(10, 96, 0, 11), "hello-too").await;
    via(VIP, "hello").await;
    assert_eq!(up.requests.load(Ordering::SeqCst), 3);
    assert_eq!(up.connections.load(Ordering::SeqCst), 2, "one pooled connection per Service");
}

/// The pipeline as a client connected to the Service VIP speaking `handling`.
fn downstream() -> Downstream {
    Downstream {
        principal: None,
        peer: SocketAddr::from(([10, 244, 1, 2], 40_000)),
        peer_ip: Ipv4Addr::new(10, 244, 1, 2),
        orig: SocketAddrV4::new(VIP, 80),
        source: None,
        gateways: None,
        server: None,
        first_pick: 0.into(),
        client_cert: None,
        memo: Default::default(),
    }
}

#[tokio::test]
async fn a_full_connection_pool_answers_503_overflow() {
    // The first request hangs upstream, holding the one connection allowed.
    let (port, count) = upstream(|n| if n == 0 { None } else { Some(StatusCode::OK) }).await;
    let pool = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: hello, namespace: plain}\n\
        spec: {host: hello, trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}}}\n";
    let t = TestInputs::new(&format!("{}{pool}", cluster(port, "{route: [{destination: {host: hello}}]}")));
    let first = tokio::spawn({
        let inputs = t.inputs.clone();
        async move { send(inputs).await }
    });
    while count.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    // Two more: one may wait for the connection, the other overflows.
    let (a, b) = (send(t.inputs.clone()), send(t.inputs.clone()));
    let overflowed = tokio::select! {
        r = a => r,
        r = b => r,
    };
    assert_eq!(overflowed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(overflowed.headers().get("x-envoy-overloaded").map(|v| v.as_bytes()), Some(&b"true"[..]));
    let metrics = t.inputs.metrics.encode();
    assert!(metrics.contains("response_flags=\"UO\""), "{metrics}");
    assert_eq!(count.load(Ordering::SeqCst), 1, "nothing past the limit reached the upstream");
    first.abort();
}

/// One GET to the Service on a client connection of its own; the response.
async fn send(inputs: Arc<crate::proxy::Inputs>) -> Response<hyper::body::Incoming> {
    send_to(inputs, "/").await
}

#[tokio::test]
async fn grpc_status_labels_from_upstreams_are_limited_to_grpcs_codes() {
    // A hostile upstream: a new grpc-status value on every answer.
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let n = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let n = n.clone();
            let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                let i = n.fetch_add(1, Ordering::SeqCst);
                async move {
                    let status = if i == 0 { "5".to_owned() } else { format!("junk-{i}") };
                    let resp = Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", status)
                        .body(Empty::<Bytes>::new())
                        .expect("response");
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc));
        }
    });
    let t = TestInputs::new(&cluster(port, "{route: [{destination: {host: hello}}]}"));
    for _ in 0..50 {
        assert_eq!(get(&t).await.0, StatusCode::OK);
    }
    let metrics = t.inputs.metrics.encode();
    let statuses: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter_map(|l| l.split("grpc_response_status=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(statuses, ["5", "other"].into(), "{metrics}");
}

/// An upstream answering with the path and query it was asked for; its port.
async fn path_echo() -> u16 {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                let asked = req.uri().path_and_query().map_or("", |p| p.as_str()).to_owned();
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(asked))))
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc));
        }
    });
    port
}

/// One GET of `path` to the Service.
async fn get_path(t: &TestInputs, path: &str) -> (StatusCode, String) {
    let resp = send_to(t.inputs.clone(), path).await;
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn send_to(inputs: Arc<crate::proxy::Inputs>, path: &str) -> Response<hyper::body::Incoming> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(serve(inputs, server, downstream(), Handling::Http1));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client)).await.expect("handshake");
    tokio::spawn(conn);
    let req = Request::get(path).header("host", "hello").body(Empty::<Bytes>::new()).expect("request");
    send.send_request(req).await.expect("response")
}

#[tokio::test]
async fn paths_are_normalised_before_routing_and_forwarded_so() {
    // /public goes through; anything else is refused by the second rule.
    let rules = "{match: [{uri: {prefix: /public}}], route: [{destination: {host: hello}}]}, \
                 {route: [{destination: {host: hello}}], fault: {abort: {httpStatus: 403, percentage: {value: 100}}}}";
    let port = path_echo().await;
    let t = TestInputs::new(&cluster(port, rules));
    assert_eq!(get_path(&t, "/public/x?q=1").await, (StatusCode::OK, "/public/x?q=1".into()));
    assert_eq!(get_path(&t, "/public/a/./b/%7Ec").await, (StatusCode::OK, "/public/a/b/~c".into()));
    for sneaky in ["/public/../admin", "/public/%2e%2e/admin", "/public/.%2E/admin", "/public/x/../../admin"] {
        assert_eq!(get_path(&t, sneaky).await.0, StatusCode::FORBIDDEN, "{sneaky} was routed as /public");
    }
    // MeshConfig pathNormalization NONE: paths as the client sent them.
    let none = "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\n\
                data: {mesh: 'pathNormalization: {normalization: NONE}'}\n";
    let t = TestInputs::new(&format!("{}{none}", cluster(port, rules)));
    assert_eq!(get_path(&t, "/public/../admin").await, (StatusCode::OK, "/public/../admin".into()));
}

#[tokio::test(start_paused = true)]
async fn a_body_kept_for_retries_that_never_arrives_is_answered_408() {
    let (port, count) = upstream(|_| Some(StatusCode::OK)).await;
    let t = TestInputs::new(&cluster(
        port,
        "{route: [{destination: {host: hello}}], retries: {attempts: 2, retryOn: 5xx}}",
    ));
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(serve(t.inputs.clone(), server, downstream(), Handling::Http1));
    // Ten bytes promised, five sent, then silence (a slowloris body).
    tokio::io::AsyncWriteExt::write_all(
        &mut client,
        b"POST / HTTP/1.1\r\nhost: hello\r\ncontent-length: 10\r\n\r\nhello",
    )
    .await
    .expect("write");
    let started = tokio::time::Instant::now();
    let mut answer = vec![0u8; 512];
    let n = tokio::io::AsyncReadExt::read(&mut client, &mut answer).await.expect("an answer");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(30));
    assert_eq!(count.load(Ordering::SeqCst), 0, "nothing went upstream");
}

mod filters;
mod protocols;
mod tracing;
