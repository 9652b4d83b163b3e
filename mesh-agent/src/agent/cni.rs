//! The agent's side of the `mesh-cni` plugin: a unix socket in the state
//! directory (`<state dir>/cni.sock`) on which the plugin, run by the
//! container runtime while it creates a pod's sandbox, asks for the pod to be
//! captured and waits for the answer. One request and one answer per
//! connection, each a line of JSON (see `mesh-cni/src/main.rs`).
//!
//! `ADD` waits (within the plugin's timeout) for the pod to be in the
//! configuration — the API server announces a pod before its sandbox is
//! made, and the watch may lag — then hands the pod's address from the
//! plugin to the capture loop, which attaches the programs and opens the pod
//! gate before it answers; the pod's first packet then meets capture.
//! `CHECK` answers whether the pod is captured, `DEL` forgets the address.
use std::{net::Ipv4Addr, path::PathBuf, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

use super::Context;

/// The longest an `ADD` waits, whatever the plugin asks.
const MAX_WAIT: Duration = Duration::from_secs(120);

pub fn path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("cni.sock")
}

#[derive(Debug, Deserialize)]
struct Request {
    command: String,
    namespace: String,
    name: String,
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    timeout_ms: u64,
}

#[derive(Debug, Serialize)]
struct Reply {
    ok: bool,
    #[serde(skip_serializing_if = "str::is_empty")]
    role: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
}

/// What the capture loop is asked to do for the plugin.
#[derive(Debug)]
pub enum Command {
    /// Capture pod `(namespace, name)` at this address; answer once done.
    Add { pod: (String, String), ip: Ipv4Addr, reply: oneshot::Sender<Result<&'static str, String>> },
    /// Whether the pod at this address is captured.
    Check { ip: Ipv4Addr, reply: oneshot::Sender<Result<&'static str, String>> },
    /// Forget the address the plugin gave.
    Del { pod: (String, String) },
}

/// Binds the socket (replacing one a previous agent left or still holds:
/// new plugin calls come here from now on) and serves it.
pub fn serve(ctx: Arc<Context>, path: PathBuf, node: String) -> std::io::Result<mpsc::Receiver<Command>> {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(handle(ctx.clone(), stream, node.clone(), tx.clone()));
        }
    });
    Ok(rx)
}

async fn handle(ctx: Arc<Context>, stream: tokio::net::UnixStream, node: String, tx: mpsc::Sender<Command>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(64 * 1024));
    let reply = match tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await {
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer(&ctx, req, &node, &tx).await,
            Err(e) => Err(format!("request: {e}")),
        },
        _ => Err("no request".into()),
    };
    let reply = match reply {
        Ok(role) => Reply { ok: true, role, error: String::new() },
        Err(error) => {
            tracing::warn!(%error, "CNI plugin request refused");
            Reply { ok: false, role: "", error }
        }
    };
    let mut out = serde_json::to_string(&reply).unwrap_or_default();
    out.push('\n');
    let _ = write.write_all(out.as_bytes()).await;
}

async fn answer(ctx: &Context, req: Request, node: &str, tx: &mpsc::Sender<Command>) -> Result<&'static str, String> {
    let pod = (req.namespace, req.name);
    let what = format!("pod {}/{}", pod.0, pod.1);
    let ip = req.ips.iter().find_map(|s| s.parse::<Ipv4Addr>().ok());
    let wait = Duration::from_millis(req.timeout_ms).clamp(Duration::from_millis(100), MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let (reply, rx) = oneshot::channel();
    let command = match req.command.as_str() {
        "ADD" => {
            let ip = ip.ok_or_else(|| format!("{what}: no IPv4 address in the plugin's prevResult"))?;
            wait_for_pod(ctx, &pod, node, deadline)
                .await
                .map_err(|()| format!("{what} is not in this agent's configuration for node {node} after {wait:?}"))?;
            tracing::info!(pod = %what, %ip, "CNI: capture requested");
            Command::Add { pod, ip, reply }
        }
        "CHECK" => Command::Check { ip: ip.ok_or_else(|| format!("{what}: no IPv4 address"))?, reply },
        "DEL" => {
            let _ = tx.send(Command::Del { pod }).await;
            return Ok("");
        }
        other => return Err(format!("unknown command {other:?}")),
    };
    tx.send(command).await.map_err(|_| "the agent is stopping".to_owned())?;
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(result)) => result.map_err(|e| format!("{what}: {e}")),
        _ => Err(format!("{what}: capture not confirmed within {wait:?}")),
    }
}

/// Waits until pod `(namespace, name)` of `node` is in the configuration.
async fn wait_for_pod(
    ctx: &Context,
    pod: &(String, String),
    node: &str,
    deadline: tokio::time::Instant,
) -> Result<(), ()> {
    loop {
        let state = ctx.inputs.state();
        let known = state.scheduled_workloads(node).any(|w| *w.namespace == *pod.0 && *w.name == *pod.1);
        if known {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
