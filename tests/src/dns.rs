//! A DNS server run by a test (UDP, in a pod's namespace, on a thread of the
//! test process): answers `A` questions from a table the test changes as it
//! goes, and can answer SERVFAIL or nothing at all.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, UdpSocket},
    sync::{Arc, Mutex},
};

use hickory_proto::{
    op::{Message, OpCode, ResponseCode},
    rr::{RData, Record, RecordType, rdata::A},
};

use crate::netns::Pod;

/// What the server answers for a name.
#[derive(Debug, Clone)]
pub enum Reply {
    /// These addresses, with this TTL (seconds).
    A(Vec<Ipv4Addr>, u32),
    ServFail,
    /// Nothing: the client waits until it gives up.
    Silent,
}

#[derive(Clone, Default)]
pub struct DnsServer {
    table: Arc<Mutex<HashMap<String, Reply>>>,
    asked: Arc<Mutex<Vec<String>>>,
}

impl DnsServer {
    /// Serves on `0.0.0.0:53` in `pod`; unknown names get NXDOMAIN.
    pub fn start(pod: &Pod) -> DnsServer {
        let server = DnsServer::default();
        let socket = pod.run(|| UdpSocket::bind(("0.0.0.0", 53)).unwrap());
        let s = server.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok((n, peer)) = socket.recv_from(&mut buf) {
                if let Some(reply) = s.answer(&buf[..n]) {
                    let _ = socket.send_to(&reply, peer);
                }
            }
        });
        server
    }

    /// From now on, `name` is answered with `reply`.
    pub fn set(&self, name: &str, reply: Reply) {
        self.table.lock().unwrap().insert(name.trim_end_matches('.').to_owned(), reply);
    }

    /// How many questions about `name` arrived.
    pub fn asked(&self, name: &str) -> usize {
        self.asked.lock().unwrap().iter().filter(|n| *n == name).count()
    }

    fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let q = Message::from_vec(query).ok()?;
        let question = q.queries.first()?.clone();
        let name = question.name().to_ascii().trim_end_matches('.').to_owned();
        self.asked.lock().unwrap().push(name.clone());
        let reply = self.table.lock().unwrap().get(&name).cloned();
        let mut m = Message::response(q.metadata.id, OpCode::Query);
        m.metadata.recursion_desired = q.metadata.recursion_desired;
        m.metadata.recursion_available = true;
        m.add_query(question.clone());
        match reply {
            Some(Reply::Silent) => return None,
            Some(Reply::ServFail) => m.metadata.response_code = ResponseCode::ServFail,
            None => m.metadata.response_code = ResponseCode::NXDomain,
            Some(Reply::A(addrs, ttl)) => {
                if question.query_type() == RecordType::A {
                    for a in addrs {
                        m.add_answer(Record::from_rdata(question.name().clone(), ttl, RData::A(A(a))));
                    }
                }
            }
        }
        m.to_vec().ok()
    }
}
