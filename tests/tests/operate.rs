//! Operating a running agent (root): the stats and readiness ports as a
//! cluster's Prometheus and kubelet reach them, `mesh-agent inspect` against
//! the admin API, the log filter changed at run time, JSON logs, and a real
//! Prometheus (Debian's package) scraping the stats port.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Command, Output},
    time::Duration,
};

use mesh_tests::{
    Agent, Cluster,
    agent::{binary, metric},
    clients::{Curled, curl},
    fixture::{Fixture, hello_one_node},
    prometheus::Prometheus,
    require_root,
};

const NODE_IP: &str = "172.18.0.2";

/// Only `test` may call helloworld.
const ALLOW_TEST: &str = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
    metadata: {name: allow-test, namespace: demo}\n\
    spec: {selector: {matchLabels: {app: helloworld}}, action: ALLOW, \
    rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/test]}}]}]}\n";

/// Namespace `demo` (meshed) with `test` and helloworld-v1 (HTTP on 9095,
/// echo on 7000) behind the Service `helloworld`; `ALLOW_TEST` is added to
/// the agent's configuration.
fn cluster() -> Fixture {
    hello_one_node("helloworld-v1", &[("app", "helloworld"), ("version", "v1")])
}

/// curl from the cluster network (outside the node), as a Prometheus or a
/// kubelet on another host would reach the node.
fn from_network(c: &Cluster, url: &str) -> Curled {
    curl(|args| c.net_cmd(args), &[url])
}

/// `mesh-agent inspect <args>` run in the node's namespace.
fn inspect(c: &Cluster, args: &[&str]) -> Output {
    let bin = binary();
    let mut v = vec!["ip", "netns", "exec", c.node_ns.as_str(), bin.to_str().unwrap(), "inspect"];
    v.extend_from_slice(args);
    Command::new(v[0]).args(&v[1..]).output().unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "inspect failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn stats_readiness_and_inspect_of_a_running_agent() {
    if !require_root("stats_readiness_and_inspect_of_a_running_agent") {
        return;
    }
    let c = cluster();
    let mut a = Agent::start_on(&c, 0, &c.yaml(ALLOW_TEST), &["--log-format".into(), "json".into()]);
    let r = curl(|args| c.pod("test").cmd(args), &["http://10.96.0.10:9095/"]);
    assert_eq!(r.code, 200, "{}{}", r.body, r.stderr);

    // The stats port answers on the node's address, with Istio's metrics and
    // the process's; the admin API does not leave loopback.
    let stats = from_network(&c, &format!("http://{NODE_IP}:15020/stats/prometheus"));
    assert_eq!(stats.code, 200, "{}", stats.stderr);
    assert!(metric(&stats.body, "istio_requests_total", &[("response_code", "200")]) >= 1.0, "{}", stats.body);
    assert!(metric(&stats.body, "process_resident_memory_bytes", &[]) > 1e6, "{}", stats.body);
    assert!(metric(&stats.body, "process_open_fds", &[]) > 5.0, "{}", stats.body);
    assert!(metric(&stats.body, "process_cpu_seconds_total", &[]) > 0.0, "{}", stats.body);
    assert_eq!(metric(&stats.body, "istio_build", &[("component", "mesh-agent")]), 1.0, "{}", stats.body);
    assert_eq!(from_network(&c, &format!("http://{NODE_IP}:15020/metrics")).code, 200);
    assert_eq!(from_network(&c, &format!("http://{NODE_IP}:15020/config_dump")).code, 404);
    assert_eq!(
        from_network(&c, &format!("http://{NODE_IP}:15000/config_dump")).code,
        0,
        "admin reachable off the node"
    );
    let ready = from_network(&c, &format!("http://{NODE_IP}:15021/healthz/ready"));
    assert_eq!((ready.code, ready.body.as_str()), (200, "ready\n"));
    assert_eq!(from_network(&c, &format!("http://{NODE_IP}:15021/stats/prometheus")).code, 404);

    // A connection held open through the mesh, for `inspect connections`.
    let mut held = c
        .pod("test")
        .run(|| {
            let mut s = TcpStream::connect_timeout(&"10.96.0.10:7000".parse().unwrap(), Duration::from_secs(5))?;
            s.write_all(&[b'x'; 1000])?;
            let mut back = [0u8; 1000];
            s.read_exact(&mut back)?;
            std::io::Result::Ok(s)
        })
        .unwrap();

    // Each subcommand in each format.
    let table = stdout(&inspect(&c, &["workloads"]));
    assert!(table.starts_with("NAMESPACE  NAME"), "{table}");
    assert!(
        table.lines().any(|l| l.contains("helloworld-v1") && l.contains("10.244.0.3") && l.contains("HBONE")),
        "{table}"
    );
    let workloads: serde_json::Value =
        serde_json::from_str(&stdout(&inspect(&c, &["workloads", "-o", "json"]))).unwrap();
    assert!(
        workloads.as_array().unwrap().iter().any(|w| w["name"] == "test" && w["ip"] == "10.244.0.2"),
        "{workloads}"
    );
    let yaml = stdout(&inspect(&c, &["workloads", "-o", "yaml"]));
    assert!(yaml.contains("name: helloworld-v1"), "{yaml}");
    let services = stdout(&inspect(&c, &["services"]));
    assert!(
        services.lines().any(|l| l.contains("helloworld") && l.contains("10.96.0.10") && l.contains("9095/http")),
        "{services}"
    );
    let policies = stdout(&inspect(&c, &["policies"]));
    assert!(
        policies.lines().any(|l| l.contains("AuthorizationPolicy") && l.contains("allow-test") && l.contains("ALLOW")),
        "{policies}"
    );
    let certs: serde_json::Value =
        serde_json::from_str(&stdout(&inspect(&c, &["certificates", "-o", "json"]))).unwrap();
    let cert =
        certs.as_array().unwrap().iter().find(|c| c["identity"] == "spiffe://cluster.local/ns/demo/sa/helloworld");
    let cert = cert.unwrap_or_else(|| panic!("no helloworld certificate: {certs}"));
    assert!(cert["serial"].as_str().is_some_and(|s| !s.is_empty()) && cert["not_after"].is_string(), "{cert}");
    assert!(!cert["chain"].as_array().unwrap().is_empty(), "{cert}");
    assert!(stdout(&inspect(&c, &["certificates"])).contains("spiffe://cluster.local/ns/demo/sa/test"));
    let conns: serde_json::Value = serde_json::from_str(&stdout(&inspect(&c, &["connections", "-o", "json"]))).unwrap();
    let conn = conns.as_array().unwrap().iter().find(|c| c["destination"] == "10.244.0.3:7000");
    let conn = conn.unwrap_or_else(|| panic!("the held connection is not listed: {conns}"));
    assert_eq!(conn["source_principal"], "spiffe://cluster.local/ns/demo/sa/test", "{conn}");
    assert_eq!(conn["destination_workload"], "demo/helloworld-v1", "{conn}");
    assert!(conn["bytes_sent"].as_u64().unwrap() >= 1000 && conn["bytes_received"].as_u64().unwrap() >= 1000, "{conn}");
    assert!(stdout(&inspect(&c, &["connections"])).contains("10.244.0.3:7000"));
    let config = stdout(&inspect(&c, &["config"]));
    assert!(config.lines().any(|l| l.starts_with("node") && l.ends_with("node-1")), "{config}");
    let config: serde_json::Value = serde_json::from_str(&stdout(&inspect(&c, &["config", "-o", "json"]))).unwrap();
    assert_eq!(config["ready"], true);
    held.write_all(b"bye").unwrap();

    // The log filter, changed at run time, decides the very next line.
    let lines_with = |needle: &str| a.log_text().lines().filter(|l| l.contains(needle)).count();
    assert_eq!(stdout(&inspect(&c, &["log-level", "error"])).trim(), "error");
    assert_eq!(stdout(&inspect(&c, &["log-level"])).trim(), "error");
    assert_eq!(lines_with("log filter changed"), 0, "logged at info under an error filter");
    assert_eq!(stdout(&inspect(&c, &["log-level", "mesh_agent=info,warn"])).trim(), "mesh_agent=info,warn");
    assert_eq!(lines_with("log filter changed"), 1, "{}", a.log_text());
    assert!(!inspect(&c, &["log-level", "mesh_agent=loud"]).status.success(), "a bad filter was accepted");
    // Every line is a JSON object (`--log-format json`).
    for line in a.log_text().lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
    }

    // A stopped agent: a clear error naming the address.
    a.stop();
    let out = inspect(&c, &["workloads"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("127.0.0.1:15000") && err.contains("refused"), "{err}");
}

#[test]
fn prometheus_scrapes_the_stats_port() {
    if !require_root("prometheus_scrapes_the_stats_port") {
        return;
    }
    let c = cluster();
    let _a = Agent::start(&c, &c.yaml(ALLOW_TEST));
    let r = curl(|args| c.pod("test").cmd(args), &["http://10.96.0.10:9095/"]);
    assert_eq!(r.code, 200, "{}{}", r.body, r.stderr);

    // Scraped as Istio's own scrape configuration scrapes proxies: the
    // annotations' port and path.
    let Some(prometheus) = Prometheus::start(&c, &[format!("{NODE_IP}:15020")], "prometheus_scrapes_the_stats_port")
    else {
        return;
    };
    let up = prometheus.wait_for("up");
    assert_eq!(up["value"][1], "1", "the agent's target is not up: {up}");
    let requests = prometheus.wait_for("istio_requests_total{response_code=\"200\"}");
    assert_eq!(requests["metric"]["destination_workload"], "helloworld", "{requests}");
    let rss = prometheus.wait_for("process_resident_memory_bytes");
    let bytes: f64 = rss["value"][1].as_str().unwrap().parse().unwrap();
    assert!(bytes > 1e6, "{rss}");
}
