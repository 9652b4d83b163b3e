//! A route's filters in-process, as the network-namespace tests drive them
//! with curl: redirect, rewrite, header rules and mirroring, from the user's
//! VirtualService.
use super::*;

/// An upstream on `ip` that answers with the path it was asked for and the
/// `x-*` request headers it got (sorted), and sets `x-up: 1`; its port and
/// the requests it saw.
async fn echo_on(ip: Ipv4Addr) -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let log = log.clone();
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let mut headers: Vec<String> = req
                    .headers()
                    .iter()
                    .filter(|(k, _)| k.as_str().starts_with("x-") && k.as_str() != "x-request-id")
                    .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("?")))
                    .collect();
                headers.sort();
                let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("").to_owned();
                let line = format!("{} {host} {}", req.uri().path(), headers.join(" "));
                log.lock().expect("log").push(line.clone());
                async move {
                    Ok::<_, Infallible>(
                        Response::builder().header("x-up", "1").body(Full::new(Bytes::from(line))).expect("response"),
                    )
                }
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc));
        }
    });
    (port, seen)
}

/// One request through the pipeline with `headers`; the whole response.
async fn request(t: &TestInputs, path: &str, headers: &[(&str, &str)]) -> (StatusCode, hyper::HeaderMap, String) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(serve(t.inputs.clone(), server, downstream(), Handling::Http1));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client)).await.expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "hello");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send.send_request(req.body(Empty::<Bytes>::new()).expect("request")).await.expect("response");
    let (status, head) = (resp.status(), resp.headers().clone());
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn a_redirect_answers_from_the_agent_and_the_upstream_never_sees_it() {
    let (port, seen) = echo_on(Ipv4Addr::LOCALHOST).await;
    let rules = "{match: [{uri: {prefix: /old}}], redirect: {uri: /new, authority: moved.example, redirectCode: 308}}, \
                 {route: [{destination: {host: hello}}]}";
    let t = TestInputs::new(&cluster(port, rules));
    let (status, head, _) = request(&t, "/old/page?q=1", &[]).await;
    assert_eq!(status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(head.get("location").and_then(|l| l.to_str().ok()), Some("http://moved.example/new?q=1"));
    assert!(seen.lock().expect("log").is_empty(), "the upstream saw a redirected request");
    assert_eq!(request(&t, "/other", &[]).await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_rewrite_changes_the_path_and_authority_the_upstream_sees() {
    let (port, _) = echo_on(Ipv4Addr::LOCALHOST).await;
    let rules = "{match: [{uri: {prefix: /v1/}}], rewrite: {uri: /v2/, authority: backend.internal}, \
                 route: [{destination: {host: hello}}]}";
    let t = TestInputs::new(&cluster(port, rules));
    let (status, _, body) = request(&t, "/v1/items", &[]).await;
    assert_eq!(
        (status, body.split(' ').take(2).collect::<Vec<_>>()),
        (StatusCode::OK, vec!["/v2/items", "backend.internal"])
    );
}

#[tokio::test]
async fn header_rules_change_the_request_and_the_response() {
    let (port, _) = echo_on(Ipv4Addr::LOCALHOST).await;
    let rules = "{route: [{destination: {host: hello}}], \
                 headers: {request: {set: {x-set: s}, add: {x-add: a}, remove: [x-gone]}, \
                 response: {set: {x-resp: v}, remove: [x-up]}}}";
    let t = TestInputs::new(&cluster(port, rules));
    let (status, head, body) = request(&t, "/", &[("x-gone", "1"), ("x-set", "client")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "/ hello x-add=a x-set=s", "what the upstream got");
    assert_eq!(head.get("x-resp").and_then(|v| v.to_str().ok()), Some("v"));
    assert!(head.get("x-up").is_none(), "a response header the rule removes reached the client");
}

#[tokio::test]
async fn a_mirror_sends_a_copy_whose_answer_is_not_waited_for() {
    let (port, primary) = echo_on(Ipv4Addr::LOCALHOST).await;
    let (shadow_port, shadow) = echo_on(Ipv4Addr::new(127, 0, 0, 2)).await;
    let shadow_service = format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: shadow, namespace: plain, labels: {{app: shadow}}}}\n\
         spec: {{nodeName: n1}}\nstatus: {{podIP: 127.0.0.2, phase: Running}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: shadow, namespace: plain}}\n\
         spec: {{clusterIP: 10.96.0.11, selector: {{app: shadow}}, ports: [{{name: http, port: 80, targetPort: {shadow_port}}}]}}\n"
    );
    let rules = "{route: [{destination: {host: hello}}], mirror: {host: shadow}, mirrorPercentage: {value: 100}}";
    let t = TestInputs::new(&format!("{}{shadow_service}", cluster(port, rules)));
    let (status, _, body) = request(&t, "/copy-me", &[]).await;
    assert_eq!((status, body.split(' ').next()), (StatusCode::OK, Some("/copy-me")));
    for _ in 0..200 {
        if !shadow.lock().expect("log").is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let copies = shadow.lock().expect("log").clone();
    // Envoy's convention: the copy's authority carries `-shadow`.
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert!(copies[0].starts_with("/copy-me hello-shadow"), "{copies:?}");
    assert_eq!(primary.lock().expect("log").len(), 1);
}
