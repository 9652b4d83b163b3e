//! The resolver against a scripted DNS, in paused time: answers reach the
//! Services, TTLs are bounded, failures keep the last good answer and back
//! off, reloads keep what is known and never wait.
use std::{
    collections::{HashMap, VecDeque},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use super::{Answer, Lookup, LookupError, LookupFuture, Resolver, Settings};
use crate::state::State;

type Counters = prometheus_client::metrics::family::Family<
    crate::telemetry::DnsLabels,
    prometheus_client::metrics::counter::Counter,
>;

/// One scripted answer; `None` never comes.
type Step = Option<Result<Answer, LookupError>>;

/// Answers per name, in order (the last one repeats); `None` never answers.
#[derive(Default)]
struct Script {
    answers: Mutex<HashMap<String, VecDeque<Step>>>,
    asked: Mutex<Vec<(String, Duration)>>,
    start: Mutex<Option<Instant>>,
}

impl Script {
    fn new(script: &[(&str, Vec<Step>)]) -> Arc<Script> {
        let s = Script { start: Mutex::new(Some(Instant::now())), ..Script::default() };
        *s.answers.lock().expect("lock") = script.iter().map(|(n, a)| ((*n).to_owned(), a.clone().into())).collect();
        Arc::new(s)
    }

    /// When `name` was asked, from the start.
    fn asked(&self, name: &str) -> Vec<u64> {
        let asked = self.asked.lock().expect("lock");
        asked.iter().filter(|(n, _)| n == name).map(|(_, t)| t.as_secs()).collect()
    }
}

impl Lookup for Script {
    fn lookup<'a>(&'a self, name: &'a str) -> LookupFuture<'a> {
        let start = self.start.lock().expect("lock").unwrap_or_else(Instant::now);
        self.asked.lock().expect("lock").push((name.to_owned(), start.elapsed()));
        let next = {
            let mut answers = self.answers.lock().expect("lock");
            let queue = answers.entry(name.to_owned()).or_default();
            if queue.len() > 1 { queue.pop_front().flatten() } else { queue.front().cloned().flatten() }
        };
        Box::pin(async move {
            match next {
                Some(r) => r,
                None => std::future::pending().await,
            }
        })
    }
}

fn ok(addrs: &[[u8; 4]], ttl: u64) -> Step {
    Some(Ok(Answer { addrs: addrs.iter().map(|a| Ipv4Addr::from(*a)).collect(), ttl: Duration::from_secs(ttl) }))
}

fn entry(name: &str, host: &str, resolution: &str, endpoints: &str) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: demo}}\n\
         spec: {{hosts: [{host}], ports: [{{number: 80, name: http, protocol: HTTP}}], resolution: {resolution}{endpoints}}}\n"
    )
}

fn state(yaml: &str) -> State {
    let loaded = crate::config::load_text("x.yaml", yaml, "cluster.local");
    assert!(loaded.rejected.is_empty(), "{:?}", loaded.rejected);
    loaded.state
}

/// The endpoint addresses of host `host` now.
fn addrs(state: &State, host: &str) -> Vec<String> {
    let s = state.services.get(&format!("demo/{host}")).expect("the host's Service");
    s.current_endpoints().iter().filter_map(|w| w.ip).map(|ip| ip.to_string()).collect()
}

fn start(script: &Arc<Script>) -> (Arc<Resolver>, Counters) {
    let counters = prometheus_client::metrics::family::Family::default();
    let r = Resolver::new(script.clone(), Settings::default(), counters.clone());
    tokio::spawn(r.clone().run());
    (r, counters)
}

fn count(counters: &Counters, host: &str, result: &'static str) -> u64 {
    counters.get_or_create(&crate::telemetry::DnsLabels { host: host.into(), result }).get()
}

#[tokio::test(start_paused = true)]
async fn answers_reach_the_service_and_are_refreshed_by_their_ttl_within_bounds() {
    let script = Script::new(&[(
        "api.example",
        vec![
            ok(&[[192, 0, 2, 1]], 1),                      // TTL 1 s: used for the 5 s minimum
            ok(&[[192, 0, 2, 2], [192, 0, 2, 3]], 86_400), // a day: checked after 300 s
            ok(&[[192, 0, 2, 3], [192, 0, 2, 2]], 30),     // the same, rotated
        ],
    )]);
    let (r, counters) = start(&script);
    let s = state(&entry("api", "api.example", "DNS", ""));
    assert_eq!(addrs(&s, "api.example"), Vec::<String>::new(), "nothing before the first answer");
    r.attach(&s);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(addrs(&s, "api.example"), ["192.0.2.1"]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(addrs(&s, "api.example"), ["192.0.2.2", "192.0.2.3"], "the new answer replaces the old");
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(addrs(&s, "api.example"), ["192.0.2.2", "192.0.2.3"], "a rotated answer changes nothing");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(script.asked("api.example"), [0, 5, 305, 335]);
    assert_eq!(count(&counters, "api.example", "changed"), 2);
    assert_eq!(count(&counters, "api.example", "unchanged"), 2);
    assert_eq!(r.addresses("api.example").map(|a| a.len()), Some(2));
}

#[tokio::test(start_paused = true)]
async fn a_failing_name_keeps_its_last_good_answer_and_is_retried_with_a_doubling_delay() {
    let fail = || Some(Err(LookupError::Other("SERVFAIL".into())));
    let script = Script::new(&[(
        "api.example",
        vec![
            ok(&[[192, 0, 2, 1]], 10),
            fail(),
            fail(),
            fail(),
            fail(),
            fail(),
            fail(),
            fail(),
            Some(Err(LookupError::NoRecords)),
            ok(&[[192, 0, 2, 9]], 10),
        ],
    )]);
    let (r, counters) = start(&script);
    let s = state(&entry("api", "api.example", "DNS", ""));
    r.attach(&s);
    tokio::time::sleep(Duration::from_secs(10) + Duration::from_millis(1)).await;
    assert_eq!(addrs(&s, "api.example"), ["192.0.2.1"]);
    // Failures from 10 s: retried after 5, 10, 20, 40, then every 60 s.
    tokio::time::sleep(Duration::from_secs(5 + 10 + 20 + 40 + 60 + 60 + 60 + 60 - 1)).await;
    assert_eq!(addrs(&s, "api.example"), ["192.0.2.1"], "the last good answer is kept");
    assert_eq!(script.asked("api.example"), [0, 10, 15, 25, 45, 85, 145, 205, 265]);
    assert_eq!(count(&counters, "api.example", "error"), 7);
    assert_eq!(count(&counters, "api.example", "no_records"), 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(addrs(&s, "api.example"), ["192.0.2.9"], "the first good answer after failures is used");
}

#[tokio::test(start_paused = true)]
async fn a_reload_keeps_known_answers_and_never_waits_for_a_hanging_server() {
    let script = Script::new(&[("api.example", vec![ok(&[[192, 0, 2, 1]], 60)]), ("slow.example", vec![None])]);
    let (r, counters) = start(&script);
    let first = state(&entry("api", "api.example", "DNS", ""));
    r.attach(&first);
    tokio::time::sleep(Duration::from_millis(1)).await;
    // A reload adds a name whose server never answers: the new model has the
    // known answer at once, and the slow name nothing (bounded by the timeout).
    let second =
        state(&format!("{}{}", entry("api", "api.example", "DNS", ""), entry("slow", "slow.example", "DNS", "")));
    r.attach(&second);
    assert_eq!(addrs(&second, "api.example"), ["192.0.2.1"], "a known answer across the reload");
    assert_eq!(addrs(&second, "slow.example"), Vec::<String>::new());
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(count(&counters, "slow.example", "timeout"), 1, "the hanging lookup timed out");
    assert_eq!(script.asked("api.example"), [0], "the reload did not ask a known name again");
    // A name the configuration drops is forgotten.
    r.attach(&first);
    assert_eq!(r.addresses("slow.example"), None);
    assert!(r.addresses("api.example").is_some());
}

#[tokio::test(start_paused = true)]
async fn endpoints_named_by_dns_keep_their_labels_and_round_robin_takes_the_first_address() {
    let script = Script::new(&[
        ("a.backend", vec![ok(&[[192, 0, 2, 1], [192, 0, 2, 2]], 60)]),
        ("b.backend", vec![ok(&[[192, 0, 2, 2], [192, 0, 2, 3]], 60)]),
    ]);
    let (r, _) = start(&script);
    let eps = ", endpoints: [{address: a.backend, labels: {v: a}}, {address: 198.51.100.1}, {address: b.backend, labels: {v: b}}]";
    let s = state(&format!(
        "{}{}",
        entry("strict", "strict.example", "DNS", eps),
        entry("logical", "logical.example", "DNS_ROUND_ROBIN", eps)
    ));
    r.attach(&s);
    tokio::time::sleep(Duration::from_millis(1)).await;
    // The listed address first, then each name's; an address two names share is one endpoint.
    assert_eq!(addrs(&s, "strict.example"), ["198.51.100.1", "192.0.2.1", "192.0.2.2", "192.0.2.3"]);
    let strict = s.services.get("demo/strict.example").expect("Service");
    let labels: Vec<_> = strict.current_endpoints().iter().map(|w| w.labels.get("v").cloned()).collect();
    assert_eq!(labels, [None, Some("a".into()), Some("a".into()), Some("b".into())]);
    assert_eq!(addrs(&s, "logical.example"), ["198.51.100.1", "192.0.2.1", "192.0.2.2"]);
    // An entry's addresses route like any endpoint's: a client that dialed
    // a resolved address directly is on the entry.
    let dst = std::net::SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 3), 80);
    match crate::routing::l4::route(&s, dst, Some("demo"), 0) {
        crate::routing::l4::Route::Service { service, .. } => assert_eq!(&*service.name, "strict.example"),
        other => panic!("{other:?}"),
    }
}
