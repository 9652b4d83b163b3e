//! Istio's own Grafana dashboards against the mesh (root): Debian's
//! Prometheus scrapes both agents while the two-node mesh carries mixed
//! traffic, and every query of Istio's service, workload and mesh dashboards
//! (`tests/data/istio-dashboard-queries.tsv`, fetched from istio/istio) runs
//! through Prometheus's HTTP API with the dashboards' default picks. Each
//! must return data, but for the few listed in [`EMPTY_BY_DESIGN`] with why.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use mesh_tests::{mesh::*, prometheus::Prometheus, require_root};

const QUERIES: &str = include_str!("../data/istio-dashboard-queries.tsv");

/// Services for the traffic: `test` (so that calls to the test pod name a
/// Service), `ver-v2` (its one endpoint beside the client), and `raw-v2`,
/// ver-v2's HTTP server behind a port declared as TCP.
const SERVICES: &str = "---
apiVersion: v1
kind: Service
metadata: {name: test, namespace: demo}
spec: {clusterIP: 10.96.0.22, selector: {app: test}, ports: [{name: http, port: 9095}]}
---
apiVersion: v1
kind: Service
metadata: {name: ver-v2, namespace: demo}
spec: {clusterIP: 10.96.0.21, selector: {app: ver, version: v2}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: raw-v2, namespace: demo}
spec: {clusterIP: 10.96.0.23, selector: {app: ver, version: v2}, ports: [{name: tcp-raw, port: 80, targetPort: 8080}]}
";

/// The dashboards' variables, as a user picks them: the service dashboard
/// on helloworld, the workload dashboard on demo/test, every other picker at
/// "All"; the reporter picker (`$qrep`) is tried at both of its values.
const PICKS: &[(&str, &str)] = &[
    ("$__rate_interval", "20s"),
    ("$service", "helloworld.demo.svc.cluster.local"),
    ("$namespace", "demo"),
    ("$workload", "test"),
    ("$srcns", ".*"),
    ("$srcwl", ".*"),
    ("$dstns", ".*"),
    ("$dstwl", ".*"),
    ("$dstsvc", ".*"),
];

/// Queries that cannot return data here, by panel, with why (none today;
/// the list is where one would be explained).
const EMPTY_BY_DESIGN: &[(&str, &str)] = &[];

/// One round of the traffic: every kind the dashboards break down.
fn traffic(m: &Mesh) {
    let (test, outsider, ver_v1, sleep) = (m.pod("test"), m.pod("outsider"), m.pod("ver-v1"), m.pod("sleep"));
    // From test, across nodes over mTLS: 200s, a 404 and a 503; TCP bytes.
    for path in ["/hello", "/status/404", "/status/503"] {
        let _ = curl(test, &format!("http://{API_VIP}{path}"));
    }
    let _ = curl(test, &format!("http://{VIP}:9095/"));
    let _ = test.run(|| mesh_tests::clients::tcp_echo(format!("{VIP}:7000").parse().unwrap(), b"dashboards"));
    // From test on its own node (no mTLS on that hop): HTTP, and TCP.
    let _ = curl(test, "http://10.96.0.21/hello");
    let _ = test.run(|| {
        mesh_tests::clients::tcp_echo("10.96.0.23:80".parse().unwrap(), b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    });
    // From test to a pod outside the mesh (no identity to name).
    let _ = curl(test, &format!("http://{OUTSIDER_IP}:9095/"));
    // Into test: over mTLS from node-2, and plaintext from outside the mesh.
    let _ = curl(ver_v1, "http://10.96.0.22:9095/");
    let _ = curl(outsider, &format!("http://{TEST_IP}:9095/"));
    // Into test from a meshed pod of its node (no mTLS on that hop).
    let _ = curl(sleep, "http://10.96.0.22:9095/");
    // Into helloworld: plaintext from outside the mesh, and from a meshed
    // pod of its node (HTTP and TCP).
    let _ = curl(outsider, &format!("http://{HELLO_IP}:9095/"));
    let _ = curl(ver_v1, &format!("http://{VIP}:9095/"));
    let _ = ver_v1.run(|| mesh_tests::clients::tcp_echo(format!("{VIP}:7000").parse().unwrap(), b"same node"));
}

/// Whether a query's result holds a number (not only NaN, which a panel shows as no data).
fn has_data(result: &serde_json::Value) -> bool {
    result.as_array().is_some_and(|samples| {
        samples.iter().any(|s| s["value"][1].as_str().is_some_and(|v| v.parse::<f64>().is_ok_and(|f| !f.is_nan())))
    })
}

#[test]
fn istios_dashboards_show_the_mesh() {
    if !require_root("istios_dashboards_show_the_mesh") {
        return;
    }
    let mesh = Arc::new(Mesh::start(SERVICES, &[]));
    mesh_tests::servers::http_hello(mesh.pod("outsider"), 9095);
    let targets: Vec<String> = mesh.c.nodes.iter().map(|n| format!("{}:15020", n.ip)).collect();
    let Some(prometheus) = Prometheus::start(&mesh.c, &targets, "istios_dashboards_show_the_mesh") else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (mesh, stop) = (mesh.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                traffic(&mesh);
            }
        })
    };
    // Both targets scraped, and a few rounds of traffic seen.
    for target in &targets {
        prometheus.wait_for(&format!("up{{instance=\"{target}\"}} == 1"));
    }
    prometheus.wait_for("sum(irate(istio_requests_total{reporter=\"destination\"}[20s])) > 0");
    std::thread::sleep(Duration::from_secs(5));

    let (mut report, mut short) = (Vec::new(), Vec::new());
    let mut unexplained = Vec::new();
    // The reporter picker's default first.
    for (dashboard, qrep) in [
        ("service", "destination"),
        ("service", "source"),
        ("workload", "destination"),
        ("workload", "source"),
        ("mesh", "-"),
    ] {
        let (mut total, mut with_data) = (0, 0);
        for line in QUERIES.lines().filter(|l| !l.starts_with('#')) {
            let mut cols = line.splitn(3, '\t');
            let (Some(d), Some(panel), Some(query)) = (cols.next(), cols.next(), cols.next()) else { continue };
            if d != dashboard {
                continue;
            }
            total += 1;
            let query = PICKS.iter().fold(query.replace("$qrep", qrep), |q, (var, value)| q.replace(var, value));
            match prometheus.query(&query) {
                Ok(r) if has_data(&r) => with_data += 1,
                outcome => {
                    let explained = EMPTY_BY_DESIGN.iter().any(|(p, _)| *p == panel);
                    if !explained {
                        unexplained.push(format!("{dashboard} / {panel}: {query}\n  -> {outcome:?}"));
                    }
                }
            }
        }
        report.push(format!("{dashboard} (reporter picker: {qrep}): {with_data} of {total} queries with data"));
        if with_data * 10 < total * 9 {
            short.push(dashboard);
        }
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    eprintln!("{}", report.join("\n"));
    assert!(short.is_empty(), "under 90 % with data: {short:?}\n{}\n{}", report.join("\n"), unexplained.join("\n"));
    assert!(unexplained.is_empty(), "{}\n\nqueries without data:\n{}", report.join("\n"), unexplained.join("\n"));
}
