//! DestinationRule resilience across nodes (root): outlier detection and connection-pool limits.

use std::time::{Duration, Instant};

use mesh_tests::{agent::metric, mesh::*, require_root};

#[test]
fn destination_rule_outlier_detection_and_connection_pool_overflow() {
    if !require_root("destination_rule_outlier_detection_and_connection_pool_overflow") {
        return;
    }
    let rules = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ver, namespace: demo}
spec:
  host: ver
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: demo}
spec:
  host: api
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}}
";
    let m = Mesh::start(rules, &[]);
    let test = m.pod("test");

    // ver-v1 fails every request: after 3 in a row it is ejected and only
    // ver-v2 answers (one keep-alive connection, requests balanced one by one).
    let url = format!("http://{VER_VIP}/unhealthy-on/ver-v1");
    let urls: Vec<&str> = std::iter::repeat_n(url.as_str(), 30).collect();
    let mut args = vec!["curl", "-s", "--max-time", "20"];
    args.extend(&urls);
    let out = test.cmd(&args);
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 30, "{lines:?}");
    let failed = lines.iter().filter(|l| l.contains("answers 503")).count();
    assert_eq!(failed, 3, "{lines:?}");
    assert!(lines[10..].iter().all(|l| l == "ver-v2 answers 200"), "{lines:?}");

    // maxRequestsPerConnection 1: five keep-alive requests from the client are
    // five upstream connections (five tunnels at node-2).
    let hello = format!("http://{API_VIP}/hello");
    let five: Vec<&str> = std::iter::repeat_n(hello.as_str(), 5).collect();
    let mut args = vec!["curl", "-sSf", "--max-time", "10"];
    args.extend(&five);
    assert!(test.cmd(&args).status.success());
    let tunnels = [("reporter", "destination"), ("destination_app", "helloworld")];
    m.agents[1].wait_metrics(5, "one tunnel per request", |t| {
        metric(t, "istio_tcp_connections_opened_total", &tunnels) == 5.0
    });

    // api allows one request in flight and one waiting: of 8 slow requests at
    // once, the others are refused at once with 503 UO.
    let slow = format!("http://{API_VIP}/delay/1500");
    let slows: Vec<&str> = std::iter::repeat_n(slow.as_str(), 8).collect();
    let mut args = vec!["curl", "-s", "--parallel", "--parallel-immediate", "--parallel-max", "8", "-o", "/dev/null"];
    args.extend(["-w", "%{http_code}\n", "--max-time", "10"]);
    args.extend(&slows);
    let start = Instant::now();
    let out = test.cmd(&args);
    let codes = String::from_utf8_lossy(&out.stdout).into_owned();
    let ok = codes.lines().filter(|c| *c == "200").count();
    let overflow = codes.lines().filter(|c| *c == "503").count();
    assert_eq!(ok + overflow, 8, "{codes}");
    assert!((1..=2).contains(&ok), "{codes}");
    assert!(start.elapsed() < Duration::from_secs(6), "the waiting request should run after the first");
    let text = m.agents[0].wait_metrics(5, "overflow metrics", |t| {
        metric(t, "istio_requests_total", &[("response_code", "503"), ("response_flags", "UO")]) >= overflow as f64
    });
    assert_eq!(
        metric(
            &text,
            "istio_requests_total",
            &[("destination_service", "api.demo.svc.cluster.local"), ("response_flags", "UO")]
        ),
        overflow as f64,
        "{text}"
    );
}
