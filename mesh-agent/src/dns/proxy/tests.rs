//! The DNS proxy in process, against a DNS server on loopback: the mesh's
//! own answers, forwarding, the cache, the bounds, hostile bytes.
use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hickory_resolver::proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata::A},
};

use super::{DnsProxy, ProxyMetrics, ProxySettings};

const YAML: &str = "\
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec: {nodeName: n1}
status: {podIP: 10.244.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: helloworld, namespace: demo}
spec: {clusterIP: 10.96.0.20, selector: {app: helloworld}, ports: [{port: 5000, name: http}]}
";

/// An upstream on loopback answering `A` with 192.0.2.1 (TTL 60) for any
/// name but `silent.example` (no answer); how many queries it got.
async fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let socket = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
    let addr = socket.local_addr().expect("address");
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            counter.fetch_add(1, Ordering::Relaxed);
            let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
            let question = q.queries[0].clone();
            if question.name().to_ascii() == "silent.example." {
                continue;
            }
            let mut m = Message::response(q.metadata.id, OpCode::Query);
            m.add_query(question.clone());
            m.add_answer(Record::from_rdata(question.name().clone(), 60, RData::A(A(Ipv4Addr::new(192, 0, 2, 1)))));
            let _ = socket.send_to(&m.to_vec().expect("encoded"), peer).await;
        }
    });
    (addr, asked)
}

fn proxy(upstream: SocketAddr, qps: u32) -> (DnsProxy, ProxyMetrics) {
    let state = Arc::new(crate::config::state_from_yaml(YAML));
    let metrics = ProxyMetrics::default();
    let settings =
        ProxySettings { upstream_timeout: Duration::from_millis(300), max_qps_per_pod: qps, cache_entries: 16 };
    (DnsProxy::new(Box::new(move || state.clone()), vec![upstream], settings, metrics.clone()), metrics)
}

fn query(id: u16, name: &str, kind: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name.parse::<Name>().expect("a name"), kind));
    m.to_vec().expect("encoded")
}

/// The addresses and TTLs of an answer, and its code.
fn read(answer: &[u8], id: u16) -> (ResponseCode, Vec<(Ipv4Addr, u32)>) {
    let m = Message::from_vec(answer).expect("an answer");
    assert_eq!(m.metadata.id, id, "the query's ID");
    let a = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((a.0, r.ttl)),
            _ => None,
        })
        .collect();
    (m.metadata.response_code, a)
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);

#[tokio::test]
async fn the_mesh_answers_its_names_and_forwards_the_rest_through_a_cache() {
    let (up, asked) = upstream().await;
    let (p, metrics) = proxy(up, 100);
    // A Service: answered here (ztunnel's TTL), never asked upstream.
    let a = p.answer(CLIENT, &query(1, "helloworld.demo.svc.cluster.local.", RecordType::A), false).await;
    assert_eq!(read(&a.expect("an answer"), 1), (ResponseCode::NoError, vec![(Ipv4Addr::new(10, 96, 0, 20), 30)]));
    // Its AAAA: known, with no IPv6 address (the client need not wait).
    let a = p.answer(CLIENT, &query(2, "helloworld.demo.svc.cluster.local.", RecordType::AAAA), false).await;
    assert_eq!(read(&a.expect("an answer"), 2), (ResponseCode::NoError, vec![]));
    assert_eq!(asked.load(Ordering::Relaxed), 0);
    // Anything else: the node's resolver's answer, then from the cache.
    let a = p.answer(CLIENT, &query(3, "www.example.com.", RecordType::A), false).await;
    assert_eq!(read(&a.expect("an answer"), 3), (ResponseCode::NoError, vec![(Ipv4Addr::new(192, 0, 2, 1), 60)]));
    let a = p.answer(CLIENT, &query(4, "WWW.example.com.", RecordType::A), true).await;
    let (code, answers) = read(&a.expect("an answer"), 4);
    assert_eq!((code, answers[0].0), (ResponseCode::NoError, Ipv4Addr::new(192, 0, 2, 1)));
    assert!(answers[0].1 <= 60);
    assert_eq!(asked.load(Ordering::Relaxed), 1, "the second came from the cache");
    assert_eq!(metrics.upstream_requests.get(), 1);
    // A resolver that does not answer: nothing (the client retries), counted.
    let a = p.answer(CLIENT, &query(5, "silent.example.", RecordType::A), false).await;
    assert!(a.is_none());
    assert_eq!(metrics.upstream_failures.get(), 1);
    let by_pod = crate::telemetry::DnsRequestLabels {
        source_workload: "client".into(),
        source_workload_namespace: "demo".into(),
    };
    assert_eq!(metrics.requests.get_or_create(&by_pod).get(), 5);
}

#[tokio::test]
async fn hostile_queries_get_formerr_and_a_pod_over_its_rate_is_dropped() {
    let (up, _) = upstream().await;
    let (p, metrics) = proxy(up, 3);
    // Garbage with an ID: FORMERR to that ID; too short for one: nothing.
    let a = p.answer(CLIENT, &[0xab, 0xcd, 0xff, 0xff, 0xff], false).await.expect("FORMERR");
    assert_eq!(read(&a, 0xabcd).0, ResponseCode::FormErr);
    assert!(p.answer(CLIENT, &[0x01], false).await.is_none());
    // A name that claims more labels than it has, a huge count of questions.
    let mut lying = query(7, "helloworld.demo.svc.cluster.local.", RecordType::A);
    lying[5] = 0xff;
    let a = p.answer(CLIENT, &lying, false).await;
    assert!(a.is_none_or(|a| read(&a, 7).0 == ResponseCode::FormErr));
    // The rate (3 a second, as many at once) is spent: the next is dropped.
    let other = Ipv4Addr::new(10, 244, 0, 9);
    for id in 10..13 {
        assert!(
            p.answer(other, &query(id, "helloworld.demo.svc.cluster.local.", RecordType::A), false).await.is_some()
        );
    }
    assert!(p.answer(other, &query(13, "helloworld.demo.svc.cluster.local.", RecordType::A), false).await.is_none());
    let limited = crate::telemetry::ReasonLabels { reason: "rate_limited" };
    assert_eq!(metrics.refusals.get_or_create(&limited).get(), 1);
    assert!(metrics.refusals.get_or_create(&crate::telemetry::ReasonLabels { reason: "malformed" }).get() >= 1);
}

#[tokio::test]
async fn dns_over_tcp_answers_each_framed_query_in_turn() {
    let (up, _) = upstream().await;
    let (p, _) = proxy(up, 100);
    let (mut client, server) = tokio::io::duplex(4096);
    let serving = tokio::spawn(async move { super::tcp::serve(&p, server, CLIENT).await });
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    for (id, name) in [(21u16, "helloworld.demo.svc.cluster.local."), (22, "www.example.com.")] {
        let q = query(id, name, RecordType::A);
        let len = u16::try_from(q.len()).expect("short");
        client.write_all(&len.to_be_bytes()).await.expect("write");
        client.write_all(&q).await.expect("write");
        let mut n = [0u8; 2];
        client.read_exact(&mut n).await.expect("length");
        let mut answer = vec![0u8; usize::from(u16::from_be_bytes(n))];
        client.read_exact(&mut answer).await.expect("answer");
        assert_eq!(read(&answer, id).0, ResponseCode::NoError);
    }
    drop(client);
    serving.await.expect("served").ok();
}
