//! `mesh-cni`: a chained CNI plugin (after the cluster's own, which made the
//! pod's interface and address) that returns to the container runtime only
//! once the node's mesh agent has captured the pod, so that no packet of a new
//! pod leaves or arrives around the mesh — Istio's CNI plugin does the same
//! for ambient pods. If the agent does not confirm in time, the pod's sandbox
//! creation fails with the reason, and the kubelet retries it.
//!
//! Run by the runtime (`CNI_COMMAND` set; CNI specification 1.1):
//! - `ADD`: asks the agent over its unix socket to capture the pod (namespace
//!   and name from `CNI_ARGS`, addresses from `prevResult`); prints
//!   `prevResult` unchanged on success;
//! - `CHECK`: asks the agent whether the pod is captured;
//! - `DEL`: tells the agent (best effort; a delete never fails);
//! - `STATUS`: whether the agent answers; `VERSION`.
//!
//! Pods in `exclude_namespaces` (default `kube-system`) are not held when the
//! agent does not answer: the cluster's own components must start on a node
//! whose agent is not there yet.
//!
//! Run by hand or by the DaemonSet's init container: `mesh-cni install
//! --bin-dir DIR --conf-dir DIR` copies this binary into the CNI binary
//! directory and appends the plugin to the first network configuration list
//! (as Istio's install-cni does); `mesh-cni uninstall` removes both.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

mod install;

/// The agent's socket in its state directory, as the DaemonSet mounts it.
pub const DEFAULT_SOCKET: &str = "/var/run/mesh-agent/cni.sock";
const SUPPORTED: [&str; 6] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "1.1.1"];

/// CNI error codes (specification, "Error codes").
const ERR_INCOMPATIBLE_VERSION: u32 = 1;
const ERR_INVALID_CONFIG: u32 = 7;
const ERR_TRY_AGAIN: u32 = 11;
const ERR_NOT_AVAILABLE: u32 = 50;

/// This plugin's entry in the network configuration list.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct Conf {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
    agent_socket: PathBuf,
    /// How long `ADD` waits for the agent to confirm capture.
    timeout_seconds: f64,
    exclude_namespaces: Vec<String>,
}

impl Default for Conf {
    fn default() -> Self {
        Conf {
            cni_version: "1.0.0".into(),
            prev_result: None,
            agent_socket: DEFAULT_SOCKET.into(),
            timeout_seconds: 10.0,
            exclude_namespaces: vec!["kube-system".into()],
        }
    }
}

/// One request to the agent, one line of JSON (and one line back).
#[derive(Debug, Serialize)]
struct Request<'a> {
    command: &'a str,
    namespace: &'a str,
    name: &'a str,
    container_id: &'a str,
    ips: Vec<String>,
    timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
struct Reply {
    ok: bool,
    #[serde(default)]
    role: String,
    #[serde(default)]
    error: String,
}

/// A CNI error: printed as the specification's JSON on stdout, exit 1.
#[derive(Debug)]
struct Failure {
    code: u32,
    msg: String,
    details: String,
}

fn fail(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Failure {
    Failure { code, msg: msg.into(), details: details.into() }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Ok(command) = std::env::var("CNI_COMMAND") else {
        return install::main(&args);
    };
    let mut stdin = String::new();
    if command != "VERSION"
        && let Err(e) = std::io::stdin().read_to_string(&mut stdin)
    {
        return report("1.0.0", &fail(ERR_INVALID_CONFIG, "reading the network configuration", e.to_string()));
    }
    let conf: Conf = match stdin.trim() {
        "" => Conf::default(),
        text => match serde_json::from_str(text) {
            Ok(c) => c,
            Err(e) => return report("1.0.0", &fail(ERR_INVALID_CONFIG, "network configuration", e.to_string())),
        },
    };
    match run(&command, &conf) {
        Ok(out) => {
            if let Some(out) = out {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(f) => report(&conf.cni_version, &f),
    }
}

fn report(version: &str, f: &Failure) -> ExitCode {
    println!("{}", json!({"cniVersion": version, "code": f.code, "msg": f.msg, "details": f.details}));
    ExitCode::FAILURE
}

fn run(command: &str, conf: &Conf) -> Result<Option<Value>, Failure> {
    if command == "VERSION" {
        return Ok(Some(json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED})));
    }
    if !SUPPORTED.contains(&conf.cni_version.as_str()) {
        let msg = format!("CNI version {} is not supported", conf.cni_version);
        return Err(fail(ERR_INCOMPATIBLE_VERSION, msg, SUPPORTED.join(", ")));
    }
    let timeout = Duration::from_secs_f64(conf.timeout_seconds.clamp(0.1, 300.0));
    if command == "STATUS" {
        return match UnixStream::connect(&conf.agent_socket) {
            Ok(_) => Ok(None),
            Err(e) => Err(fail(ERR_NOT_AVAILABLE, "the mesh agent is not running", socket_error(conf, &e))),
        };
    }
    let (namespace, name) = pod_of(&std::env::var("CNI_ARGS").unwrap_or_default());
    let container_id = std::env::var("CNI_CONTAINERID").unwrap_or_default();
    let excluded = conf.exclude_namespaces.contains(&namespace);
    let ips = conf.prev_result.as_ref().map(addresses).unwrap_or_default();
    // The agent answers with its reason before this plugin stops waiting.
    let agent_wait = timeout.saturating_sub((timeout / 4).min(Duration::from_secs(1)));
    let request = Request {
        command,
        namespace: &namespace,
        name: &name,
        container_id: &container_id,
        ips,
        timeout_ms: agent_wait.as_millis() as u64,
    };
    match command {
        "ADD" => {
            let Some(prev) = &conf.prev_result else {
                return Err(fail(
                    ERR_INVALID_CONFIG,
                    "mesh-cni must be chained after the plugin that wires the pod",
                    "no prevResult",
                ));
            };
            if name.is_empty() {
                // Not a Kubernetes pod (no K8S_POD_NAME): nothing to capture.
                return Ok(Some(prev.clone()));
            }
            match ask(conf, &request, timeout) {
                Ok(_) => Ok(Some(prev.clone())),
                Err(_) if excluded => Ok(Some(prev.clone())),
                Err(f) => Err(f),
            }
        }
        "CHECK" if name.is_empty() || excluded => Ok(None),
        "CHECK" => ask(conf, &request, timeout).map(|_| None),
        // A delete never fails: the agent forgets the pod on its own when
        // the pod leaves the configuration.
        "DEL" => {
            if !name.is_empty() {
                let _ = ask(conf, &request, Duration::from_secs(2));
            }
            Ok(None)
        }
        "GC" => Ok(None),
        other => Err(fail(ERR_INVALID_CONFIG, format!("unknown CNI_COMMAND {other:?}"), "")),
    }
}

/// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from `CNI_ARGS` (`K=V;K=V`).
fn pod_of(args: &str) -> (String, String) {
    let get = |key: &str| {
        args.split(';').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v.to_owned()))
    };
    (get("K8S_POD_NAMESPACE").unwrap_or_default(), get("K8S_POD_NAME").unwrap_or_default())
}

/// The IPv4 addresses of a previous result (`ips[].address`, CIDR form).
fn addresses(prev: &Value) -> Vec<String> {
    let ips = prev.get("ips").and_then(Value::as_array).cloned().unwrap_or_default();
    ips.iter()
        .filter_map(|ip| ip.get("address")?.as_str()?.split('/').next().map(str::to_owned))
        .filter(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
        .collect()
}

fn socket_error(conf: &Conf, e: &std::io::Error) -> String {
    format!("{}: {e}", conf.agent_socket.display())
}

/// Sends `request` and waits up to `timeout` for the agent's answer.
fn ask(conf: &Conf, request: &Request<'_>, timeout: Duration) -> Result<String, Failure> {
    let pod = format!("{}/{}", request.namespace, request.name);
    let start = Instant::now();
    let unavailable = |e: std::io::Error| {
        let msg = format!("the mesh agent did not capture pod {pod} (is mesh-agent running on this node?)");
        fail(ERR_TRY_AGAIN, msg, socket_error(conf, &e))
    };
    let mut stream = UnixStream::connect(&conf.agent_socket).map_err(unavailable)?;
    let left = timeout.saturating_sub(start.elapsed()).max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left)).map_err(unavailable)?;
    stream.set_write_timeout(Some(left)).map_err(unavailable)?;
    let mut line = serde_json::to_string(request).map_err(|e| fail(ERR_INVALID_CONFIG, "request", e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(unavailable)?;
    let mut answer = String::new();
    BufReader::new(stream.take(64 * 1024)).read_line(&mut answer).map_err(|e| {
        let msg = format!("the mesh agent did not confirm capture of pod {pod} within {timeout:?}");
        fail(ERR_TRY_AGAIN, msg, e.to_string())
    })?;
    let reply: Reply = serde_json::from_str(&answer).map_err(|e| {
        fail(ERR_TRY_AGAIN, format!("the mesh agent's answer for pod {pod}"), format!("{e}: {answer:?}"))
    })?;
    if reply.ok {
        Ok(reply.role)
    } else {
        Err(fail(ERR_TRY_AGAIN, format!("the mesh agent did not capture pod {pod}"), reply.error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_and_addresses_come_from_the_runtime() {
        let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=p0;K8S_POD_INFRA_CONTAINER_ID=abc";
        assert_eq!(pod_of(args), ("demo".into(), "p0".into()));
        assert_eq!(pod_of(""), (String::new(), String::new()));
        let prev = json!({"ips": [{"address": "10.244.0.7/32"}, {"address": "fd00::7/128"}]});
        assert_eq!(addresses(&prev), ["10.244.0.7"]);
    }

    #[test]
    fn version_lists_what_is_spoken_and_an_unknown_version_is_refused() {
        let conf = Conf::default();
        let v = run("VERSION", &conf).ok().flatten().unwrap_or_default();
        assert_eq!(v["supportedVersions"][3], "1.0.0");
        let old = Conf { cni_version: "0.2.0".into(), ..Conf::default() };
        assert_eq!(run("ADD", &old).err().map(|f| f.code), Some(ERR_INCOMPATIBLE_VERSION));
    }
}
