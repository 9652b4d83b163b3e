//! ServiceEntries resolved by DNS (root): the agent asks the node's resolver
//! (a DNS server this test runs) off its control loop, follows changed
//! answers, keeps the last good one, never holds a reload for a hanging
//! lookup; `DYNAMIC_DNS` resolves the host each request names.
#![expect(clippy::unwrap_used)]

use std::net::Ipv4Addr;

use mesh_tests::{
    Agent, Pod,
    agent::metric,
    clients::curl,
    dns::{DnsServer, Reply},
    egress::{ResolvConf, outside_addresses, registry_only, test_and_outside, which_address},
    require_root,
};

#[test]
fn a_dns_service_entry_follows_its_answers_keeps_the_last_good_one_and_never_holds_a_reload() {
    if !require_root("a_dns_service_entry_follows_its_answers_keeps_the_last_good_one_and_never_holds_a_reload") {
        return;
    }
    // Outside: the node's DNS server (run by this test) at 172.18.0.1, and a
    // server on 8080 that says which of 172.18.5.1 and 172.18.6.1 it was reached at.
    let (c, outside) = test_and_outside();
    outside_addresses(&c, &["172.18.5.1", "172.18.6.1"]);
    let outside_a = Pod::namespace("outside-a", Ipv4Addr::new(172, 18, 5, 1), &c.net_ns);
    which_address(&outside_a, 9090);
    let dns = DnsServer::start(&outside);
    dns.set("api.outside.test", Reply::A(vec![Ipv4Addr::new(172, 18, 5, 1)], 1));
    let entry = |name: &str, host: &str, vip: &str, rest: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: demo}}\n\
             spec:\n  hosts: [{host}]\n  addresses: [{vip}]\n  ports: [{{number: 80, targetPort: 9090, name: http, protocol: HTTP}}]\n{rest}"
        )
    };
    let api = entry("api", "api.outside.test", "240.240.0.10", "  resolution: DNS\n");
    let resolv = ResolvConf::new("172.18.0.1");
    // Lookups may hang for a minute: a reload must not wait for one.
    let extra = resolv.args(&["--dns-min-ttl", "1s", "--dns-timeout", "60s"]);
    let mut a = Agent::start_on(&c, 0, &c.yaml(&registry_only(&api)), &extra);
    let test = c.pod("test");
    let reached = || {
        let r = curl(|args| test.cmd(args), &["-H", "Host: api.outside.test", "http://240.240.0.10/"]);
        (r.code == 200).then_some(r.body)
    };
    let wait_for = |want: &str, what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let got = reached();
            if got.as_deref() == Some(want) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{what}: got {got:?}\n{}", a.log_text());
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    wait_for("172.18.5.1", "the first answer");
    // The answer changes (TTL 1 s): new connections follow it.
    dns.set("api.outside.test", Reply::A(vec![Ipv4Addr::new(172, 18, 6, 1)], 1));
    wait_for("172.18.6.1", "the changed answer");
    // The server fails: the last good answer keeps serving.
    dns.set("api.outside.test", Reply::ServFail);
    let m = a.wait_metrics(15, "a failed lookup", |m| {
        metric(m, "mesh_dns_resolutions_total", &[("host", "api.outside.test"), ("result", "error")]) >= 1.0
    });
    assert!(metric(&m, "mesh_dns_resolutions_total", &[("host", "api.outside.test"), ("result", "changed")]) >= 2.0);
    assert_eq!(reached().as_deref(), Some("172.18.6.1"), "the last good answer after a failure");
    // A reload adds a name whose server never answers (and an entry with an
    // address, which shows the reload applied): the reload does not wait,
    // and the known name keeps its answer meanwhile.
    dns.set("slow.outside.test", Reply::Silent);
    let other = entry(
        "other",
        "other.outside.test",
        "240.240.0.12",
        "  resolution: STATIC\n  endpoints: [{address: 172.18.5.1}]\n",
    );
    let slow = entry("slow", "slow.outside.test", "240.240.0.11", "  resolution: DNS\n");
    a.write_config(&c.yaml(&registry_only(&format!("{api}{slow}{other}"))));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let r = curl(|args| test.cmd(args), &["-H", "Host: other.outside.test", "http://240.240.0.12/"]);
        if r.code == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the reload was held up:\n{}", a.log_text());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(dns.asked("slow.outside.test") >= 1, "the slow name was asked");
    assert_eq!(reached().as_deref(), Some("172.18.6.1"), "the known name during the hanging lookup");
    let r = curl(|args| test.cmd(args), &["-H", "Host: slow.outside.test", "http://240.240.0.11/"]);
    assert_ne!(r.code, 200, "a name with no answer yet has no endpoint: {}", r.body);
    a.stop();
}

#[test]
fn dynamic_dns_sends_each_request_where_its_host_resolves_now() {
    if !require_root("dynamic_dns_sends_each_request_where_its_host_resolves_now") {
        return;
    }
    // Outside: the DNS server, a server on 9090 saying which address it was
    // reached at, and a TLS server (openssl) on 8443 at 172.18.0.1.
    let (c, outside) = test_and_outside();
    outside_addresses(&c, &["172.18.5.1", "172.18.6.1"]);
    which_address(&outside, 9090);
    let certs = mesh_tests::certs::Certs::new(&format!("dyn-{}", std::process::id()));
    let (crt, key) = certs.server("outside", "t.dyn.test");
    let (crt, key) = (crt.to_str().unwrap().to_owned(), key.to_str().unwrap().to_owned());
    let args = ["openssl", "s_server", "-quiet", "-www", "-accept", "8443", "-cert", &crt, "-key", &key];
    let _tls = mesh_tests::netns::Background::spawn_in(&c.net_ns, &args).expect("openssl s_server");
    let dns = DnsServer::start(&outside);
    dns.set("a.dyn.test", Reply::A(vec![Ipv4Addr::new(172, 18, 5, 1)], 30));
    dns.set("b.dyn.test", Reply::A(vec![Ipv4Addr::new(172, 18, 6, 1)], 30));
    dns.set("t.dyn.test", Reply::A(vec![Ipv4Addr::new(172, 18, 0, 1)], 30));
    let config = r#"---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dynamic, namespace: demo}
spec:
  hosts: ["*.dyn.test"]
  ports: [{number: 9090, name: http, protocol: HTTP}, {number: 8443, name: tls, protocol: TLS}]
  location: MESH_EXTERNAL
  resolution: DYNAMIC_DNS
"#;
    let resolv = ResolvConf::new("172.18.0.1");
    let a = Agent::start_on(&c, 0, &c.yaml(&registry_only(config)), &resolv.args(&[]));
    let test = c.pod("test");
    // The application dialed an address that leads nowhere (its own lookup
    // is not trusted): each request goes where its host resolves at the agent.
    let get = |host: &str| curl(|args| test.cmd(args), &["-H", &format!("Host: {host}"), "http://203.0.113.7:9090/"]);
    let r = get("a.dyn.test");
    assert_eq!((r.code, r.body.as_str()), (200, "172.18.5.1"), "{}\n{}", r.stderr, a.log_text());
    let r = get("b.dyn.test");
    assert_eq!((r.code, r.body.as_str()), (200, "172.18.6.1"), "{}", r.stderr);
    // A host under the wildcard that does not resolve: Envoy's answer.
    let r = get("gone.dyn.test");
    assert_eq!(r.code, 503, "{}", r.body);
    assert!(r.body.contains("DNS resolution failure"), "{}", r.body);
    // Not under the wildcard: REGISTRY_ONLY refuses it.
    let r = get("a.elsewhere.test");
    assert_eq!(r.code, 502, "{}", r.body);
    // TLS: the server name is resolved the same way (the certificate served
    // is the one at 172.18.0.1).
    let mut ok = false;
    for _ in 0..30 {
        let r = curl(
            |args| test.cmd(args),
            &[
                "--cacert",
                certs.ca().to_str().unwrap(),
                "--resolve",
                "t.dyn.test:8443:203.0.113.7",
                "https://t.dyn.test:8443/",
            ],
        );
        if r.code == 200 {
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(ok, "TLS to a DYNAMIC_DNS host\n{}", a.log_text());
    // Counted under the entry's host, not the names requests picked.
    let m = a.metrics();
    assert!(metric(&m, "mesh_dns_resolutions_total", &[("host", "*.dyn.test"), ("result", "changed")]) >= 3.0, "{m}");
    assert!(metric(&m, "mesh_dns_resolutions_total", &[("host", "*.dyn.test"), ("result", "no_records")]) >= 1.0);
    assert_eq!(dns.asked("a.dyn.test"), 1, "the answer is held for its TTL");
    let _ = get("a.dyn.test");
    assert_eq!(dns.asked("a.dyn.test"), 1, "the answer is held for its TTL");
}
