//! Upgrading the agent in place (root): a second agent started on the node
//! takes the running one's listening sockets over, so a client making a new
//! connection every few milliseconds sees no refusal across three
//! replacements (none refused, none slowed by a SYN retry), and a stream
//! opened before a replacement keeps working until the old agent's drain
//! timeout. A stop-then-start, as a DaemonSet without surge does, is the
//! control: the same load sees its gap.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_tests::{
    Agent,
    agent::{BpfFs, metric, rss_mib},
    clients,
    fixture::{Fixture, PodSpec, hello_one_node},
    netns::enter_and_spawn,
    require_root, servers,
};

const VIP: [u8; 4] = [10, 96, 0, 10];
const WS_PORT: u16 = 8081;
const GRPC_PORT: u16 = 50051;

/// Slower than this, a request's SYN went unanswered once (Linux retries after 1 s).
const SYN_RETRY: Duration = Duration::from_millis(900);

/// `test` calling helloworld (HTTP on 9095, echo on 7000) through the
/// Service, and node-1 running the ingress gateway pod (port 80) behind a
/// LoadBalancer address.
fn cluster() -> Fixture {
    let mut f = hello_one_node("helloworld", &[("app", "helloworld")]);
    let labels = [("istio", "ingressgateway")];
    let spec = PodSpec::gateway("istio-system", &labels, "istio-ingressgateway-service-account");
    f.gateway(0, "istio-ingressgateway", std::net::Ipv4Addr::new(10, 244, 0, 100), spec, ("10.96.0.40", LB), &[80]);
    f
}

const LB: std::net::Ipv4Addr = std::net::Ipv4Addr::new(172, 18, 100, 1);

const GATEWAY: &str = r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ingress, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ingress, namespace: demo}
spec:
  hosts: ["*"]
  gateways: [istio-system/ingress]
  http:
  - route: [{destination: {host: helloworld, port: {number: 9095}}}]
"#;

/// The gateway's port at its load balancer, from outside the node.
const INGRESS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(LB), 80);

/// One request on a new connection: `Ok` when helloworld answered 200.
fn request() -> Result<(), String> {
    request_to(SocketAddr::from((VIP, 9095)))
}

/// The same request to `addr` (the Service, or the node's gateway port).
fn request_to(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: helloworld\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| format!("read: {e}"))?;
    match out.starts_with("HTTP/1.1 200") {
        true => Ok(()),
        false => Err(format!("answer: {:?}", out.lines().next().unwrap_or_default())),
    }
}

/// The time of day of a log line (`…THH:MM:SS.ffffffZ …`), in seconds.
fn seconds_of_day(line: &str) -> Option<f64> {
    let t = line.split('T').nth(1)?.split('Z').next()?;
    let mut parts = t.split(':');
    let (h, m, s) =
        (parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

/// An echo round trip on an open stream.
fn echo(s: &mut TcpStream, what: &str) -> std::io::Result<String> {
    s.write_all(what.as_bytes())?;
    let mut buf = vec![0u8; what.len()];
    s.read_exact(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[test]
fn three_replacements_refuse_no_connection_and_open_streams_drain() {
    if !require_root("three_replacements_refuse_no_connection_and_open_streams_drain") {
        return;
    }
    let mut c = cluster();
    let daemon = c.node_process(0, "daemon");
    // The host's bpffs, as the DaemonSet's pods share it: each replacement
    // adopts the pinned capture and the shared maps.
    let bpf = BpfFs::mount(&c);
    let mut a = Agent::start_on(&c, 0, &c.yaml(GATEWAY), &bpf.agent_args());
    assert_eq!(c.pod("test").run(request), Ok(()), "{}", a.log_text());
    let net = c.net_ns.clone();
    assert_eq!(enter_and_spawn(&net, || request_to(INGRESS)).join().unwrap(), Ok(()), "{}", a.log_text());
    servers::websocket_echo(c.pod("helloworld"), WS_PORT);
    mesh_tests::grpc::serve(c.pod("helloworld"), GRPC_PORT);

    // A node process (a host client, captured by cgroup/connect4) calling
    // the Service in a loop, each call's status and time on a line.
    let host_log = a.dir.join("host-client.log");
    let host_stop = a.dir.join("host-client.stop");
    let script = format!(
        "while [ ! -e {stop} ]; do curl -s -o /dev/null --max-time 3 -w '%{{http_code}} %{{time_total}}\\n' \
         http://10.96.0.10:9095/ >> {log}; sleep 0.01; done",
        stop = host_stop.display(),
        log = host_log.display()
    );
    let first = daemon.cmd(&["curl", "-sS", "--max-time", "3", "http://10.96.0.10:9095/"]);
    assert!(
        first.status.success(),
        "the host client cannot call the Service: {}{}\n{}",
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&first.stderr),
        a.log_text()
    );
    let host_load = std::thread::spawn(move || daemon.cmd(&["sh", "-c", &script]));

    // New connections, one every 5 ms, for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(std::sync::Mutex::new(Vec::new())));
    let load = {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        c.pod("test").spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let at = Instant::now();
                match request() {
                    // A SYN that met no listener is retried after 1 s: as
                    // much a gap as a refusal.
                    Ok(()) if at.elapsed() >= SYN_RETRY => {
                        failed.lock().unwrap().push(format!("took {:?}", at.elapsed()))
                    }
                    Ok(()) => drop(done.fetch_add(1, Ordering::Relaxed)),
                    Err(e) => failed.lock().unwrap().push(e),
                };
                std::thread::sleep(Duration::from_millis(5).saturating_sub(at.elapsed()));
            }
        })
    };

    // And clients outside the node at its gateway port, one every 5 ms.
    let ingress_failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ingress_done = Arc::new(AtomicU64::new(0));
    let ingress = {
        let (stop, done, failed) = (stop.clone(), ingress_done.clone(), ingress_failed.clone());
        enter_and_spawn(&net, move || {
            while !stop.load(Ordering::Relaxed) {
                let at = Instant::now();
                match request_to(INGRESS) {
                    Ok(()) if at.elapsed() >= SYN_RETRY => {
                        failed.lock().unwrap().push(format!("took {:?}", at.elapsed()))
                    }
                    Ok(()) => drop(done.fetch_add(1, Ordering::Relaxed)),
                    Err(e) => failed.lock().unwrap().push(e),
                };
                std::thread::sleep(Duration::from_millis(5).saturating_sub(at.elapsed()));
            }
        })
    };

    for round in 1..=3 {
        // Streams opened through the agent about to be replaced: raw TCP,
        // a WebSocket and a gRPC bidirectional call, each echoing every 100 ms.
        let mut stream = c.pod("test").run(|| TcpStream::connect(SocketAddr::from((VIP, 7000)))).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(echo(&mut stream, "before").unwrap(), "before");
        let (ws, grpc) = (Arc::default(), Arc::default());
        let streams = {
            let (ws, grpc) = (Arc::clone(&ws), Arc::clone(&grpc));
            let hello = c.pod("helloworld").ip;
            let (ws_url, grpc_uri) = (format!("ws://{hello}:{WS_PORT}/"), format!("http://{hello}:{GRPC_PORT}"));
            c.pod("test").spawn(move || clients::hold_streams(ws_url, grpc_uri, Duration::from_millis(100), ws, grpc))
        };
        let wait = Instant::now();
        while [&ws, &grpc].iter().any(|l| l.lock().unwrap().echoes == 0) {
            assert!(
                wait.elapsed() < Duration::from_secs(10),
                "round {round}: streams not open: {ws:?} {grpc:?}\n{}",
                a.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let before = done.load(Ordering::Relaxed);

        let started = Instant::now();
        let mut b = a.replace(&c, 0, &bpf.agent_args());
        let handover = started.elapsed();
        let both = (rss_mib(a.pid().unwrap()), rss_mib(b.pid().unwrap()));
        // The old agent drains: the stream it carries still works.
        assert_eq!(echo(&mut stream, "during").unwrap(), "during", "round {round}:\n{}", a.log_text());
        let status = a.wait_exit(15);
        let exited = Instant::now();
        assert!(status.success(), "round {round}: the old agent exited with {status}:\n{}", a.log_text());
        assert!(a.log_text().contains("handed over"), "{}", a.log_text());
        // The new agent took the old one's certificates: it asked the CA for none.
        let new_log = b.log_text();
        assert!(
            !new_log.contains("workload certificate issued"),
            "round {round}: the replacement asked the CA:\n{new_log}"
        );
        assert!(
            new_log.lines().any(|l| l.contains("took the previous agent's workload certificates") && !l.contains("certificates=0")),
            "round {round}:\n{new_log}"
        );
        // Its drain timeout (2 s) has passed: the stream was ended cleanly
        // (end of stream, not a reset), and counted in its log.
        let mut buf = [0u8; 8];
        let closed = stream.read(&mut buf);
        assert!(matches!(closed, Ok(0)), "round {round}: the stream was not ended cleanly: {closed:?}");
        assert!(a.log_text().contains("drain deadline reached"), "{}", a.log_text());
        // The WebSocket and the gRPC call lived through the drain and ended
        // with it: echoes until the old agent's deadline, none hanging after.
        streams.join().unwrap();
        for (what, life) in [("WebSocket", &ws), ("gRPC stream", &grpc)] {
            let l = life.lock().unwrap().clone();
            let (end, how) = l.ended.clone().unwrap_or_else(|| panic!("round {round}: {what} never ended"));
            let lived = l.last_echo.map(|t| t.saturating_duration_since(started)).unwrap_or_default();
            assert!(
                lived >= handover + Duration::from_millis(1500),
                "round {round}: {what} stopped echoing {lived:?} into the replacement: {l:?}"
            );
            assert!(end <= exited + Duration::from_secs(2), "round {round}: {what} outlived its agent: {l:?}");
            // Clean: an end of stream (a FIN; for the WebSocket, whose frames
            // the agent does not parse after the upgrade, without a closing
            // handshake), never a TCP reset (os error 104) or a hang.
            assert!(
                !how.contains("os error") && !how.contains("no echo"),
                "round {round}: {what} did not end cleanly: {how}"
            );
            eprintln!(
                "round {round}: {what}: {} echoes, the last {lived:?} after the replacement started; ended: {how}",
                l.echoes
            );
        }

        // The new agent serves the load on its own.
        let wait = Instant::now();
        while done.load(Ordering::Relaxed) < before + 20 {
            assert!(wait.elapsed() < Duration::from_secs(10), "round {round}: no requests served\n{}", b.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        let served = metric(&b.metrics(), "istio_requests_total", &[("reporter", "source"), ("response_code", "200")]);
        assert!(served > 0.0, "round {round}: the new agent served no request:\n{}", b.log_text());
        // The gap between the old agent's last accepted connection and the
        // new one's first (negative: both accepted for a while), from their
        // logs of the host client's calls (one every ~25 ms).
        let accepts = |log: &str| {
            log.lines().filter(|l| l.contains("host client")).filter_map(seconds_of_day).collect::<Vec<f64>>()
        };
        let (old, new) = (accepts(&a.log_text()), accepts(&b.log_text()));
        let gap = match (old.last(), new.first()) {
            (Some(last), Some(first)) => format!("{:+.1} ms", (first - last) * 1000.0),
            _ => "not seen".into(),
        };
        eprintln!(
            "round {round}: started to took over {handover:?}; last accept of the old agent to first of the new: {gap}; overlap RSS old {:.1} MiB, new {:.1} MiB",
            both.0, both.1
        );
        std::mem::swap(&mut a, &mut b);
        drop(b);
    }
    std::fs::write(&host_stop, "").unwrap();
    host_load.join().unwrap();
    let host = std::fs::read_to_string(&host_log).unwrap();
    let host_failed: Vec<&str> = host
        .lines()
        .filter(|l| {
            let (code, secs) = l.split_once(' ').unwrap_or_default();
            code != "200" || secs.parse::<f64>().map_or(true, |t| t >= SYN_RETRY.as_secs_f64())
        })
        .collect();
    assert!(host.lines().count() > 20, "the host client made too few calls:\n{host}");
    assert!(host_failed.is_empty(), "host client calls that failed or waited across the replacements: {host_failed:?}");
    eprintln!("{} host client calls, none failed", host.lines().count());
    let replaced = done.load(Ordering::Relaxed);
    {
        let failed = failed.lock().unwrap();
        let n = failed.len();
        assert!(
            n == 0,
            "{n} of {} requests failed across three replacements: {:?}",
            replaced + n as u64,
            &failed[..n.min(10)]
        );
    }
    assert!(replaced > 100, "only {replaced} requests made");
    eprintln!("{replaced} requests across three replacements, none failed");
    {
        let failed = ingress_failed.lock().unwrap();
        let (n, done) = (failed.len(), ingress_done.load(Ordering::Relaxed));
        assert!(n == 0, "{n} of {} requests at the gateway port failed: {:?}", done + n as u64, &failed[..n.min(10)]);
        assert!(done > 100, "only {done} requests at the gateway port");
        eprintln!("{done} requests at the gateway port across three replacements, none failed");
    }

    // Control: stopping the agent and then starting one (a DaemonSet with
    // `maxSurge: 0`) leaves a gap, and the same load sees it.
    let config = c.yaml(GATEWAY);
    a.stop();
    let b = Agent::start_on(&c, 0, &config, &bpf.agent_args());
    let wait = Instant::now();
    while failed.lock().unwrap().is_empty() && wait.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    ingress.join().unwrap();
    let lost = failed.lock().unwrap().len();
    eprintln!("stop, then start: {lost} requests failed or waited for a SYN retry");
    assert!(lost > 0, "the load did not see the gap of a stop-then-start:\n{}", b.log_text());
}
