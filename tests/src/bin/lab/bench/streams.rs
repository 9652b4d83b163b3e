//! gRPC bidirectional streaming (`grpc_streaming`): long-lived
//! `test.Echo/Bidi` streams multiplexed on one HTTP/2 connection, each
//! sending a message and waiting for its echo before the next (a chat, a
//! watch, a game server's stream), for the window. The mesh carries every
//! message inside streams it routed once: what it costs per message, not
//! per request.
use super::*;
use mesh_tests::grpc::EchoMsg;

/// Streams open at once on the client's one connection.
pub(super) const STREAMS: usize = 16;

/// Messages per second over all streams, and each message's round trip
/// (send to echo) in µs at p50 and p99.
pub(super) fn grpc_streaming(client: &Pod, ip: Ipv4Addr, secs: u64) -> anyhow::Result<Sample> {
    let uri = format!("http://{ip}:9090");
    let run = mesh_tests::netns::enter_and_spawn(&client.netns, move || -> anyhow::Result<(Vec<Duration>, f64)> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async move {
            let grpc = mesh_tests::grpc::client(uri).await;
            let start = Instant::now();
            let deadline = start + Duration::from_secs(secs);
            let streams: Vec<_> = (0..STREAMS)
                .map(|_| {
                    let mut grpc = grpc.clone();
                    tokio::spawn(async move {
                        let (tx, rx) = tokio::sync::mpsc::channel(1);
                        let mut replies = mesh_tests::grpc::bidi_open(&mut grpc, rx).await?;
                        let mut trips = Vec::new();
                        while Instant::now() < deadline {
                            let sent = Instant::now();
                            tx.send(EchoMsg { text: "ping".into(), fail_with: 0 }).await?;
                            replies.message().await?.context("the stream ended early")?;
                            trips.push(sent.elapsed());
                        }
                        anyhow::Ok(trips)
                    })
                })
                .collect();
            let mut trips = Vec::new();
            for s in streams {
                trips.extend(s.await??);
            }
            Ok((trips, start.elapsed().as_secs_f64()))
        })
    });
    let (mut trips, elapsed) = run.join().map_err(|_| anyhow::anyhow!("the streaming client panicked"))??;
    if trips.is_empty() {
        bail!("no message came back on any stream");
    }
    trips.sort();
    let at = |q: f64| trips[((trips.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    Ok(Sample::from([("rps", trips.len() as f64 / elapsed), ("p50_us", at(0.50)), ("p99_us", at(0.99))]))
}
