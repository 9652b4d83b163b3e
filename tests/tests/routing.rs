//! VirtualService routing across nodes (root), one behaviour per test on one
//! set of rules: weights, matches, timeouts, retries, faults, redirects,
//! rewrites, header rules, mirroring, TCP rules.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use mesh_tests::{Pod, agent::metric, mesh::*, require_root};

const RULES: &str = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ver, namespace: demo}
spec:
  host: ver
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ver, namespace: demo}
spec:
  hosts: [ver.demo.svc.cluster.local]
  http:
  - match: [{headers: {x-version: {exact: v2}}}]
    route: [{destination: {host: ver, subset: v2}}]
  - match: [{uri: {prefix: /delay}}]
    route: [{destination: {host: ver, subset: v1}}]
    timeout: 0.5s
  - match: [{uri: {prefix: /fail-once/retried}}]
    route: [{destination: {host: ver, subset: v1}}]
    retries: {attempts: 2, perTryTimeout: 1s, retryOn: 5xx}
  - match: [{uri: {prefix: /fail-once/}}]
    route: [{destination: {host: ver, subset: v1}}]
  - match: [{uri: {prefix: /old/}}]
    redirect: {uri: /new, authority: moved.example, redirectCode: 302}
  - match: [{uri: {prefix: /v1api/}}]
    rewrite: {uri: /}
    route: [{destination: {host: ver, subset: v2}}]
  - match: [{uri: {prefix: /mirrored}}]
    route: [{destination: {host: ver, subset: v1}}]
    mirror: {host: ver, subset: v2}
    mirrorPercentage: {value: 100}
  - match: [{uri: {exact: /teapot}}]
    route: [{destination: {host: ver, subset: v1}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
  - match: [{uri: {exact: /headers}}]
    route: [{destination: {host: ver, subset: v1}}]
    headers:
      request: {set: {x-set: one}, add: {x-added: two}, remove: [x-remove-me]}
      response: {set: {x-served-by: mesh}}
  - route:
    - {destination: {host: ver, subset: v1}, weight: 80}
    - {destination: {host: ver, subset: v2}, weight: 20}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hello-tcp, namespace: demo}
spec:
  hosts: [helloworld]
  tcp:
  - match: [{port: 7000}]
    route: [{destination: {host: ver, subset: v1, port: {number: 80}}}]
";

/// The status code of a GET to `ver`'s `path`.
fn code(test: &Pod, path: &str) -> String {
    let out = test.cmd(&["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{VER_VIP}{path}")]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits for request metrics at node-1's agent and returns them.
fn requests(m: &Mesh, at_least: f64) -> String {
    m.agents[0].wait_metrics(5, "request metrics", |t| {
        metric(t, "istio_requests_total", &[("destination_service", "ver.demo.svc.cluster.local")]) >= at_least
    })
}

#[test]
fn weights_split_requests_and_a_header_match_wins() {
    if !require_root("weights_split_requests_and_a_header_match_wins") {
        return;
    }
    let m = Mesh::start(RULES, &[]);
    let test = m.pod("test");
    let url = format!("http://{VER_VIP}/hello");
    // 80/20 over 500 requests (one keep-alive connection: routing is per request).
    let urls: Vec<&str> = std::iter::repeat_n(url.as_str(), 500).collect();
    let mut args = vec!["curl", "-sSf", "--max-time", "60"];
    args.extend(&urls);
    let out = test.cmd(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let body = String::from_utf8_lossy(&out.stdout);
    let v1 = body.matches("hello from ver-v1;").count();
    let v2 = body.matches("hello from ver-v2;").count();
    assert_eq!(v1 + v2, 500, "{body}");
    // 400 expected; ±50 is more than five standard deviations.
    assert!((350..=450).contains(&v1), "v1 got {v1} of 500 (80% ± 10% expected)");
    // v1 is on the other node: every one of those requests went over mTLS.
    let text = requests(&m, 500.0);
    let v1_ok = [("destination_version", "v1"), ("response_code", "200"), ("connection_security_policy", "mutual_tls")];
    assert_eq!(metric(&text, "istio_requests_total", &v1_ok), v1 as f64, "{text}");

    // A header match wins over the weights.
    let mut args = vec!["curl", "-sSf", "--max-time", "10", "-H", "x-version: v2"];
    let ten: Vec<&str> = std::iter::repeat_n(url.as_str(), 10).collect();
    args.extend(&ten);
    let out = test.cmd(&args);
    assert_eq!(String::from_utf8_lossy(&out.stdout).matches("hello from ver-v2;").count(), 10);
}

#[test]
fn a_route_timeout_answers_504_promptly() {
    if !require_root("a_route_timeout_answers_504_promptly") {
        return;
    }
    let m = Mesh::start(RULES, &[]);
    // A 2 s upstream under a 0.5 s route timeout.
    let start = Instant::now();
    assert_eq!(code(m.pod("test"), "/delay/2000"), "504");
    let took = start.elapsed();
    assert!(took < Duration::from_millis(1800), "504 after {took:?}");
    let text = requests(&m, 1.0);
    let timeouts =
        [("destination_service", "ver.demo.svc.cluster.local"), ("response_code", "504"), ("response_flags", "UT")];
    assert_eq!(metric(&text, "istio_requests_total", &timeouts), 1.0, "{text}");
}

#[test]
fn a_retry_turns_an_upstream_503_into_a_200() {
    if !require_root("a_retry_turns_an_upstream_503_into_a_200") {
        return;
    }
    let m = Mesh::start(RULES, &[]);
    assert_eq!(code(m.pod("test"), "/fail-once/retried-1"), "200");
    // Without retries the 503 stands.
    assert_eq!(code(m.pod("test"), "/fail-once/plain-1"), "503");
    let text = requests(&m, 2.0);
    let with = |code, flags| [("response_code", code), ("response_flags", flags)];
    assert_eq!(metric(&text, "istio_requests_total", &with("200", "-")), 1.0, "{text}");
    assert_eq!(metric(&text, "istio_requests_total", &with("503", "-")), 1.0, "{text}");
}

#[test]
fn an_abort_fault_is_answered_by_the_agent() {
    if !require_root("an_abort_fault_is_answered_by_the_agent") {
        return;
    }
    let m = Mesh::start(RULES, &[]);
    assert_eq!(code(m.pod("test"), "/teapot"), "418");
    let text = requests(&m, 1.0);
    let aborted = [("response_code", "418"), ("response_flags", "FI")];
    assert_eq!(metric(&text, "istio_requests_total", &aborted), 1.0, "{text}");
    // The upstream never saw it.
    let seen = m.pod("test").cmd(&["curl", "-sSf", &format!("http://{VER_V1_IP}:8080/seen")]);
    assert!(!String::from_utf8_lossy(&seen.stdout).contains("/teapot"));
}

#[test]
fn a_tcp_rule_routes_a_port_to_another_service() {
    if !require_root("a_tcp_rule_routes_a_port_to_another_service") {
        return;
    }
    let m = Mesh::start(RULES, &[]);
    // helloworld's echo port goes to ver-v1's HTTP server: the bytes are not
    // echoed but answered.
    let answer = m.pod("test").run(|| {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from(([10, 96, 0, 10], 7000)), Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /hello HTTP/1.1\r\nHost: ver\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    });
    let logs = || format!("{}\n{}", m.agents[0].log_text(), m.agents[1].log_text());
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("hello from ver-v1;"), "{answer}\n{}", logs());
}

#[test]
fn mirroring_sends_a_copy_with_the_shadow_authority() {
    if !require_root("mirroring_sends_a_copy_with_the_shadow_authority") {
        return;
    }
    let m = Mesh::start(RULES, &[]);
    let test = m.pod("test");
    // v1 answers, v2 gets a copy.
    for i in 0..3 {
        let (ok, out) = curl(test, &format!("http://{VER_VIP}/mirrored/{i}"));
        assert!(ok && out.contains("hello from ver-v1;"), "{out}");
    }
    m.agents[0].wait_metrics(5, "mirrored copies", |t| {
        metric(t, "mesh_http_mirrored_requests_total", &[("result", "sent")]) >= 3.0
    });
    let seen = test.cmd(&["curl", "-sSf", &format!("http://{VER_V2_IP}:8080/seen")]);
    let seen = String::from_utf8_lossy(&seen.stdout);
    for i in 0..3 {
        assert!(seen.contains(&format!("ver-v2 /mirrored/{i} {VER_VIP}-shadow")), "{seen}");
    }
}

#[test]
fn redirect_rewrite_and_header_rules() {
    if !require_root("redirect_rewrite_and_header_rules") {
        return;
    }
    let m = Mesh::start(RULES, &[]);
    let test = m.pod("test");
    // A redirect is answered by the agent.
    let out = test.cmd(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        &format!("http://{VER_VIP}/old/x"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "302 http://moved.example/new");
    // A rewrite changes the matched prefix.
    let (ok, out) = curl(test, &format!("http://{VER_VIP}/v1api/hello"));
    assert!(ok && out.contains("hello from ver-v2;"), "{out}");
    // Header rules on the way in and out.
    let out = test.cmd(&[
        "curl",
        "-sS",
        "-D",
        "-",
        "-H",
        "x-remove-me: 1",
        "-H",
        "x-added: one",
        &format!("http://{VER_VIP}/headers"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(text.contains("x-served-by: mesh"), "{text}");
    assert!(text.contains("x-set: one") && text.contains("x-added: one") && text.contains("x-added: two"), "{text}");
    assert!(!text.contains("x-remove-me"), "{text}");
}

#[test]
fn paths_are_normalised_before_the_rules_see_them() {
    if !require_root("paths_are_normalised_before_the_rules_see_them") {
        return;
    }
    let m = Mesh::start(RULES, &[]);
    let test = m.pod("test");
    // Sent as written (curl would otherwise resolve the dot segments itself):
    // the agent matches, and forwards, `/teapot`, whose rule aborts with 418.
    for sneaky in ["/fail-once/../teapot", "/fail-once/%2e%2e/teapot", "/old/.%2E/teapot"] {
        let out = test.cmd(&[
            "curl",
            "-s",
            "--path-as-is",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{VER_VIP}{sneaky}"),
        ]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "418", "{sneaky} was routed by its first segment");
    }
}

#[test]
fn a_service_entry_selecting_pods_sends_its_host_to_them_over_mtls() {
    if !require_root("a_service_entry_selecting_pods_sends_its_host_to_them_over_mtls") {
        return;
    }
    // helloworld's pod (node-2) behind a host and address of its own.
    let entry = r#"---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: hello-internal, namespace: demo}
spec:
  hosts: [hello.internal]
  addresses: [240.3.0.1]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 9095}]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {labels: {app: helloworld}}
"#;
    let m = Mesh::start(entry, &[]);
    let (ok, out) = curl(m.pod("test"), "http://240.3.0.1/hello");
    assert!(ok && out.contains("hello from helloworld"), "{out}");
    // The pod's identity, over mTLS, reported under the entry's host.
    let text = m.agents[0].wait_metrics(5, "the entry's request", |t| {
        metric(t, "istio_requests_total", &[("destination_service", "hello.internal"), ("response_code", "200")]) >= 1.0
    });
    let labels = [
        ("destination_service", "hello.internal"),
        ("destination_principal", HELLO_ID),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(metric(&text, "istio_requests_total", &labels) >= 1.0, "{text}");
}
