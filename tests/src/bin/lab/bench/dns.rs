//! DNS at 1 000 queries a second from the client pod (a query, its answer,
//! then the next at its tick), to the node's resolver: directly in the
//! direct rounds, answered by the node's agent (captured at the veth) in
//! the mesh rounds; the latency of each answer.
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RecordType},
};

use super::*;

/// The node's resolver in the bench (a server the harness runs).
pub(super) const RESOLVER: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);
/// A name only the resolver knows (the agent forwards it, then answers from its cache).
pub(super) const OUTSIDE_NAME: &str = "www.bench.example";
/// A Service of the bench's configuration (the agent answers it itself).
pub(super) const MESH_NAME: &str = "collector.observability.svc.cluster.local";

/// Queries for `name` at 1 000 a second for `secs`: `rps` answered, `p50_us`, `p99_us`, `failed`.
pub(super) fn dns_load(client: &Pod, name: &'static str, secs: u64) -> anyhow::Result<Sample> {
    client.run(move || {
        let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.connect((RESOLVER, 53))?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        let fqdn: Name = format!("{name}.").parse()?;
        let (start, tick) = (Instant::now(), Duration::from_millis(1));
        let (mut latencies, mut failed, mut buf) = (Vec::new(), 0u32, [0u8; 1500]);
        for i in 0u32.. {
            let due = start + tick * i;
            if due.duration_since(start).as_secs() >= secs {
                break;
            }
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let id = (i % 65_536) as u16;
            let mut q = Message::new(id, MessageType::Query, OpCode::Query);
            q.metadata.recursion_desired = true;
            q.add_query(Query::query(fqdn.clone(), RecordType::A));
            let sent = Instant::now();
            socket.send(&q.to_vec()?)?;
            loop {
                match socket.recv(&mut buf) {
                    Ok(n) if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id => {
                        latencies.push(sent.elapsed().as_secs_f64() * 1e6);
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => {
                        failed += 1;
                        break;
                    }
                }
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        latencies.sort_by(f64::total_cmp);
        let at = |p: f64| latencies.get(((latencies.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(f64::NAN);
        Ok(Sample::from([
            ("rps", latencies.len() as f64 / elapsed),
            ("p50_us", at(0.50)),
            ("p99_us", at(0.99)),
            ("failed", f64::from(failed)),
        ]))
    })
}
