//! The load tools, each run in the client pod's namespace: iperf3, sockperf,
//! oha, h2load, nginx as the upstream, `perf record`, and idle connections.
use super::*;

/// `perf record -g` of the agents until dropped.
pub(super) struct Perf(std::process::Child);

impl Perf {
    pub(super) fn start(pids: &[u32], out: &Path) -> anyhow::Result<Perf> {
        let pids = pids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let child = Command::new("perf")
            .args(["record", "-F", "499", "--call-graph", "dwarf,16384", "-p", &pids, "-o"])
            .arg(out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("perf record (apt install linux-perf)")?;
        Ok(Perf(child))
    }
}

impl Perf {
    /// Stops recording, then folds the samples per process (`perf script`,
    /// inferno) into `<out>.folded` and draws `<out>.svg`; the frames with
    /// the most samples of their own, for the terminal.
    pub(super) fn finish(self, data: &Path, title: &str) -> anyhow::Result<Vec<(String, f64)>> {
        use inferno::collapse::Collapse as _;
        drop(self);
        // `+pid`: each sample names its process, so each agent is a tower of its own.
        let script =
            Command::new("perf").args(["script", "-F", "+pid", "-i"]).arg(data).output().context("perf script")?;
        let mut options = inferno::collapse::perf::Options::default();
        options.include_pid = true;
        let mut folded = Vec::new();
        inferno::collapse::perf::Folder::from(options).collapse(&script.stdout[..], &mut folded)?;
        std::fs::write(data.with_extension("folded"), &folded)?;
        let mut opts = inferno::flamegraph::Options::default();
        opts.title = title.to_owned();
        opts.count_name = "samples".to_owned();
        // Frames under a fifth of a percent are left out: a drawing to read, not an archive.
        opts.min_width = 2.4;
        let svg = std::fs::File::create(data.with_extension("svg"))?;
        inferno::flamegraph::from_reader(&mut opts, &folded[..], svg)?;
        Ok(self_time(&String::from_utf8_lossy(&folded)))
    }
}

/// Each leaf frame's share of all samples (folded stacks: `a;b;c count`), largest first.
fn self_time(folded: &str) -> Vec<(String, f64)> {
    let mut by_leaf: BTreeMap<String, f64> = BTreeMap::new();
    let mut total = 0.0;
    for line in folded.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else { continue };
        let Ok(count) = count.parse::<f64>() else { continue };
        let leaf = stack.rsplit(';').next().unwrap_or(stack);
        *by_leaf.entry(leaf.to_owned()).or_default() += count;
        total += count;
    }
    let mut leaves: Vec<(String, f64)> = by_leaf.into_iter().map(|(f, c)| (f, c / total.max(1.0))).collect();
    leaves.sort_by(|a, b| b.1.total_cmp(&a.1));
    leaves.truncate(25);
    leaves
}

impl Drop for Perf {
    fn drop(&mut self) {
        // SAFETY: signalling our own child; SIGINT makes perf write its file.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

pub(super) fn spawn_in(netns: &str, args: &[&str]) -> anyhow::Result<Background> {
    Background::spawn_in(netns, args).with_context(|| format!("starting {args:?}"))
}

pub(super) fn output_in(netns: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip").args(["netns", "exec", netns]).args(args).output()?;
    if !out.status.success() {
        bail!("{args:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// nginx-light serving a 1 KiB body: HTTP/1.1 on 8080, h2c on 8081.
pub(super) fn nginx(pod: &Pod, dir: &Path) -> anyhow::Result<Background> {
    let prefix = dir.join(&pod.name);
    std::fs::create_dir_all(prefix.join("logs"))?;
    let body = "x".repeat(1024);
    let conf = format!(
        "worker_processes 1;\nworker_rlimit_nofile 70000;\ndaemon off;\npid {p}/nginx.pid;\nerror_log {p}/logs/error.log;\n\
         events {{ worker_connections 65536; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
           client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n  fastcgi_temp_path {p}/fastcgi;\n\
           uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n\
           server {{ listen 8080; location / {{ return 200 \"{body}\"; }} }}\n\
           server {{ listen 8081 http2; location / {{ return 200 \"{body}\"; }} }}\n}}\n",
        p = prefix.display()
    );
    let file = prefix.join("nginx.conf");
    std::fs::write(&file, conf)?;
    let file = file.display().to_string();
    let prefix = prefix.display().to_string();
    spawn_in(&pod.netns, &["nginx", "-e", "stderr", "-p", &prefix, "-c", &file])
}

/// Waits until something accepts on `ip:port` inside `netns`.
pub(super) fn wait_port(netns: &str, ip: Ipv4Addr, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let netns = netns.to_owned();
    loop {
        let ns = netns.clone();
        let up = mesh_tests::netns::enter_and_spawn(&ns, move || {
            std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_millis(200)).is_ok()
        })
        .join()
        .unwrap_or(false);
        if up {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {ip}:{port} after 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// iperf3 for `secs`, `streams` parallel: received bits/s.
pub(super) fn iperf(client: &Pod, ip: Ipv4Addr, secs: u64, streams: u32) -> anyhow::Result<Sample> {
    let out = output_in(
        &client.netns,
        &["iperf3", "-c", &ip.to_string(), "-t", &secs.to_string(), "-P", &streams.to_string(), "-J"],
    )?;
    parse_iperf(&out)
}

/// sockperf ping-pong at 1000 messages/s: p50 and p99 round trip (µs).
pub(super) fn sockperf(client: &Pod, ip: Ipv4Addr, secs: u64) -> anyhow::Result<Sample> {
    let out = output_in(
        &client.netns,
        &[
            "sockperf",
            "ping-pong",
            "--tcp",
            "-i",
            &ip.to_string(),
            "-p",
            "11111",
            "-t",
            &secs.to_string(),
            "--mps",
            "1000",
        ],
    )?;
    parse_sockperf(&out)
}

/// oha against `url` for `secs`; `rate` None means as fast as it goes.
pub(super) fn oha(client: &Pod, url: &str, secs: u64, rate: Option<u32>, args: &[&str]) -> anyhow::Result<Sample> {
    let oha = oha_binary();
    let dur = format!("{secs}s");
    let mut v = vec![oha.as_str(), "--no-tui", "--output-format", "json", "-z", &dur];
    let q;
    match rate {
        Some(r) => {
            q = r.to_string();
            v.extend(["-q", &q, "--latency-correction", "-c", "16"]);
        }
        None => v.extend(["-c", "32"]),
    }
    v.extend_from_slice(args);
    v.push(url);
    let out = output_in(&client.netns, &v)?;
    parse_oha(&out)
}

pub(super) fn oha_binary() -> String {
    std::env::var("OHA").unwrap_or_else(|_| "oha".into())
}

/// h2load: gRPC unary calls (framed protobuf body) for `secs`.
pub(super) fn h2load(client: &Pod, ip: Ipv4Addr, secs: u64, body: &Path) -> anyhow::Result<Sample> {
    let url = format!("http://{ip}:9090/test.Echo/Unary");
    let out = output_in(
        &client.netns,
        &[
            "h2load",
            "-D",
            &secs.to_string(),
            "-c",
            "4",
            "-m",
            "16",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-d",
            &body.display().to_string(),
            &url,
        ],
    )?;
    parse_h2load(&out)
}

/// Opens `n` connections to `ip:8080` from the client pod and leaves them idle
/// (no byte sent, so the agents sniff, then proxy them as TCP); returns the
/// agents' added resident memory per connection in KiB, each (source first).
pub(super) fn idle_connections(
    client: &Pod,
    ip: Ipv4Addr,
    n: usize,
    agents: &[u32],
    proxied: impl Fn() -> f64,
) -> anyhow::Result<Vec<f64>> {
    let before: Vec<f64> = agents.iter().map(|p| rss_mib(*p)).collect();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<usize, String>>();
    let holder = mesh_tests::netns::enter_and_spawn(&client.netns, move || {
        let mut open = Vec::with_capacity(n);
        for _ in 0..n {
            match std::net::TcpStream::connect_timeout(&(ip, 8080).into(), Duration::from_secs(5)) {
                Ok(s) => open.push(s),
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("after {} connections: {e}", open.len())));
                    return;
                }
            }
        }
        let _ = ready_tx.send(Ok(open.len()));
        let _ = rx.recv();
        drop(open);
    });
    let opened = ready_rx.recv().context("idle connection thread")?;
    // Past protocol detection, every upstream opens: wait for the destination
    // agent to hold them all.
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxied() < n as f64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let held = proxied();
    let after: Vec<f64> = agents.iter().map(|p| rss_mib(*p)).collect();
    let _ = tx.send(());
    let _ = holder.join();
    let opened = opened.map_err(anyhow::Error::msg)?;
    if held < opened as f64 {
        bail!("only {held} of {opened} idle connections reached the destination agent");
    }
    Ok(after.iter().zip(&before).map(|(a, b)| (a - b) * 1024.0 / opened as f64).collect())
}

/// Raises this process's open-file limit (thousands of idle connections).
pub(super) fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid out-pointer, then the same struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// A gRPC request body: one framed `EchoMsg { text: "hi" }`.
pub(super) fn grpc_body(dir: &Path) -> anyhow::Result<PathBuf> {
    let msg = [0x0a, 0x02, b'h', b'i'];
    let mut framed = vec![0u8, 0, 0, 0, msg.len() as u8];
    framed.extend_from_slice(&msg);
    let path = dir.join("grpc-body.bin");
    std::fs::write(&path, framed)?;
    Ok(path)
}
