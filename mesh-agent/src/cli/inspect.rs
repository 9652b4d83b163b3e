//! `mesh-agent inspect`: a running agent's state, read from its admin API
//! (`/config_dump`, `/connections`, `/logging`) and shown as a table, JSON or
//! YAML, as `istioctl ztunnel-config` shows ztunnel's.
use std::{net::SocketAddr, process::ExitCode, time::Duration};

use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, body::Bytes};
use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    #[command(subcommand)]
    what: What,
    /// The agent's admin API (on the node, or a port-forward to the pod's 15000).
    #[arg(long, global = true, env = "MESH_NODE_ADMIN", default_value = "127.0.0.1:15000")]
    node_admin: SocketAddr,
    /// Output format.
    #[arg(short = 'o', long, global = true, default_value = "table")]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// Pods (and node identities) the agent knows, and whether they are meshed.
    Workloads,
    /// Services and ServiceEntry hosts: VIP, ports, endpoints.
    Services,
    /// AuthorizationPolicies, PeerAuthentications and RequestAuthentications.
    Policies,
    /// The workload certificates the agent holds: identity, serial, validity, chain.
    Certificates,
    /// Connections into this node's meshed pods: who, how, bytes, age.
    Connections,
    /// The agent's status: node, configuration source, readiness, capture, gateways.
    Config,
    /// Show the log filter, or set it (`debug`, `mesh_agent=debug,info`, …).
    LogLevel { level: Option<String> },
}

pub fn main(args: InspectArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mesh-agent inspect: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(inspect(&args)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mesh-agent inspect: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn inspect(args: &InspectArgs) -> Result<String, String> {
    let admin = args.node_admin;
    if let What::LogLevel { level } = &args.what {
        let text = match level {
            None => fetch(admin, Method::GET, "/logging").await?,
            Some(l) => fetch(admin, Method::POST, &format!("/logging?level={}", query_escaped(l))).await?,
        };
        return Ok(match args.output {
            Output::Table => text,
            _ => render(args.output, &serde_json::json!({"level": text.trim()}))?,
        });
    }
    let (path, pick): (&str, fn(Value) -> Value) = match args.what {
        What::Connections => ("/connections", |v| v),
        What::Workloads => ("/config_dump", |v| values(&v["state"]["workloads"])),
        What::Services => ("/config_dump", |v| values(&v["state"]["services"])),
        What::Certificates => ("/config_dump", |mut v| v["certificates"].take()),
        What::Policies => ("/config_dump", policies),
        What::Config | What::LogLevel { .. } => ("/config_dump", |v| v),
    };
    let body = fetch(admin, Method::GET, path).await?;
    let value: Value =
        serde_json::from_str(&body).map_err(|e| format!("{admin}{path}: not the admin API's JSON: {e}"))?;
    let value = pick(value);
    match args.output {
        Output::Table => Ok(table(&args.what, &value)),
        other => render(other, &value),
    }
}

/// GETs (or POSTs) `path` on the admin API; an error names the address.
async fn fetch(admin: SocketAddr, method: Method, path: &str) -> Result<String, String> {
    let unreachable = |e: &dyn std::fmt::Display| {
        format!(
            "cannot reach the agent's admin API at {admin}: {e} (is mesh-agent running on this node? see --node-admin)"
        )
    };
    let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(admin))
        .await
        .map_err(|_| unreachable(&"timed out"))?
        .map_err(|e| unreachable(&e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(&e))?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, admin.to_string())
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| format!("{admin}{path}: no answer in 10s"))?
        .map_err(|e| format!("{admin}{path}: {e}"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| format!("{admin}{path}: {e}"))?.to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        return Err(format!("{admin}{path}: {status}: {}", text.trim()));
    }
    Ok(text)
}

fn query_escaped(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A JSON object's values as an array (maps keyed by `namespace/name`).
fn values(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Array(m.values().cloned().collect()),
        other => other.clone(),
    }
}

/// Every security policy, each with its kind.
fn policies(mut v: Value) -> Value {
    let mut out = Vec::new();
    for (key, kind) in [
        ("authorization_policies", "AuthorizationPolicy"),
        ("peer_authentications", "PeerAuthentication"),
        ("request_authentications", "RequestAuthentication"),
    ] {
        if let Value::Array(items) = v["state"][key].take() {
            for mut item in items {
                if let Value::Object(m) = &mut item {
                    m.insert("kind".into(), kind.into());
                }
                out.push(item);
            }
        }
    }
    Value::Array(out)
}

fn render(output: Output, value: &Value) -> Result<String, String> {
    match output {
        Output::Yaml => serde_yaml_ng::to_string(value).map_err(|e| e.to_string()),
        _ => serde_json::to_string_pretty(value).map(|s| s + "\n").map_err(|e| e.to_string()),
    }
}

/// A field as table text: strings bare, absent as `-`, lists joined.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// A table row from one object.
type RowFn = fn(&Value) -> Vec<String>;

fn table(what: &What, value: &Value) -> String {
    let rows = value.as_array().cloned().unwrap_or_default();
    let (header, row): (&[&str], RowFn) = match what {
        What::Workloads => (&["NAMESPACE", "NAME", "ADDRESS", "NODE", "PROTOCOL", "SERVICE ACCOUNT", "READY"], |w| {
            let protocol = if w["meshed"] == Value::Bool(true) { "HBONE" } else { "TCP" };
            vec![
                cell(&w["namespace"]),
                cell(&w["name"]),
                cell(&w["ip"]),
                cell(&w["node"]),
                protocol.into(),
                cell(&w["service_account"]),
                cell(&w["ready"]),
            ]
        }),
        What::Services => (&["NAMESPACE", "NAME", "VIP", "PORTS", "ENDPOINTS"], |s| {
            let ports: Vec<String> = s["ports"]
                .as_array()
                .map(|ps| ps.iter().map(|p| format!("{}/{}", cell(&p["port"]), cell(&p["name"]))).collect())
                .unwrap_or_default();
            let endpoints = s["endpoints"].as_array().map_or(0, Vec::len);
            vec![
                cell(&s["namespace"]),
                cell(&s["name"]),
                cell(&s["vip"]),
                if ports.is_empty() { "-".into() } else { ports.join(",") },
                endpoints.to_string(),
            ]
        }),
        What::Policies => (&["KIND", "NAMESPACE", "NAME", "ACTION", "SELECTOR"], |p| {
            let selector = p["selector"].as_object().filter(|m| !m.is_empty()).map_or("(namespace)".into(), |m| {
                m.iter().map(|(k, v)| format!("{k}={}", cell(v))).collect::<Vec<_>>().join(",")
            });
            let action = match &p["action"] {
                Value::Null => cell(&p["mode"]),
                a => cell(a),
            };
            vec![cell(&p["kind"]), cell(&p["namespace"]), cell(&p["name"]), action, selector]
        }),
        What::Certificates => (&["IDENTITY", "SERIAL", "NOT AFTER", "RENEW AT", "CHAIN"], |c| {
            let chain: Vec<String> = c["chain"]
                .as_array()
                .map(|links| {
                    links.iter().map(|l| format!("{} <- {}", cell(&l["subject"]), cell(&l["issuer"]))).collect()
                })
                .unwrap_or_default();
            vec![
                cell(&c["identity"]),
                cell(&c["serial"]),
                cell(&c["not_after"]),
                cell(&c["renew_at"]),
                chain.join(" | "),
            ]
        }),
        What::Connections => (
            &[
                "SOURCE",
                "SOURCE IDENTITY",
                "DESTINATION",
                "WORKLOAD",
                "SECURITY",
                "PROTOCOL",
                "SENT",
                "RECEIVED",
                "AGE",
            ],
            |c| {
                vec![
                    cell(&c["source"]),
                    cell(&c["source_principal"]),
                    cell(&c["destination"]),
                    cell(&c["destination_workload"]),
                    cell(&c["security"]),
                    cell(&c["protocol"]),
                    cell(&c["bytes_sent"]),
                    cell(&c["bytes_received"]),
                    format!("{}s", cell(&c["age_seconds"])),
                ]
            },
        ),
        What::Config | What::LogLevel { .. } => return config_table(value),
    };
    let rows: Vec<Vec<String>> = rows.iter().map(row).collect();
    aligned(header, &rows)
}

fn config_table(v: &Value) -> String {
    let count = |x: &Value| x.as_array().map_or(0, Vec::len).to_string();
    let objects = |x: &Value| x.as_object().map_or(0, |m| m.len()).to_string();
    let state = &v["state"];
    let rows = [
        ("node", cell(&v["node"])),
        ("config source", cell(&v["config_source"])),
        ("ready", cell(&v["ready"])),
        ("last config error", cell(&v["last_config_error"])),
        ("connections watched", cell(&v["active_connections"])),
        ("pods captured", count(&v["capture"]["attached"])),
        ("pods pending capture", count(&v["capture"]["pending"])),
        ("certificates", count(&v["certificates"])),
        ("gateway listeners", count(&v["gateway_listeners"])),
        ("gateway conflicts", count(&v["gateway_conflicts"])),
        ("workloads", objects(&state["workloads"])),
        ("services", objects(&state["services"])),
        ("outbound traffic policy", cell(&state["outbound_policy"])),
    ];
    let rows: Vec<Vec<String>> = rows.into_iter().map(|(k, v)| vec![k.to_owned(), v]).collect();
    aligned(&["FIELD", "VALUE"], &rows)
}

/// Columns padded to their widest cell, two spaces apart.
fn aligned(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out += &line(r.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{What, table};

    #[test]
    fn tables_align_their_columns_and_mark_what_is_absent() {
        let workloads = json!([
            {"namespace": "demo", "name": "helloworld-v1", "ip": "10.244.0.3", "node": "node-1", "meshed": true,
             "service_account": "helloworld", "ready": true},
            {"namespace": "plain", "name": "outsider", "ip": null, "node": "node-1", "meshed": false,
             "service_account": "default", "ready": false},
        ]);
        assert_eq!(
            table(&What::Workloads, &workloads),
            "NAMESPACE  NAME           ADDRESS     NODE    PROTOCOL  SERVICE ACCOUNT  READY\n\
             demo       helloworld-v1  10.244.0.3  node-1  HBONE     helloworld       true\n\
             plain      outsider       -           node-1  TCP       default          false\n"
        );
    }
}
