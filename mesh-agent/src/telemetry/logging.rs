//! The process's log: text or JSON lines on stderr, and a filter the admin
//! API can change while the agent runs (`/logging`, as ztunnel's).
use std::sync::OnceLock;

use tracing_subscriber::{EnvFilter, Registry, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// tracing's human-readable lines.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`),
    /// for a log pipeline.
    Json,
}

/// Crates that are noisy at levels an operator asks for: kept at `error`
/// unless the filter names them (netlink-packet-route warns about every
/// attribute a newer kernel adds).
const QUIET: &str = "netlink_packet_route=error";

static HANDLE: OnceLock<(reload::Handle<EnvFilter, Registry>, std::sync::Mutex<String>)> = OnceLock::new();

/// Installs the global subscriber: `RUST_LOG` when set, else `level`.
pub fn init(format: LogFormat, level: &str) {
    let spec = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| level.to_owned());
    let (filter, spec) = match parse(&spec) {
        Ok(f) => (f, spec),
        Err(e) => {
            eprintln!("log filter {spec:?}: {e}; using info");
            (EnvFilter::new(with_quiet("info")), "info".to_owned())
        }
    };
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(false)).try_init(),
    };
    if installed.is_ok() {
        let _ = HANDLE.set((handle, std::sync::Mutex::new(spec)));
    }
}

fn with_quiet(spec: &str) -> String {
    if spec.contains("netlink_packet_route") { spec.to_owned() } else { format!("{spec},{QUIET}") }
}

fn parse(spec: &str) -> Result<EnvFilter, String> {
    EnvFilter::builder().parse(with_quiet(spec)).map_err(|e| e.to_string())
}

/// The filter in force, as it was given (`info`, `mesh_agent=debug,warn`, …).
pub fn filter() -> String {
    HANDLE.get().and_then(|(_, s)| s.lock().ok().map(|s| s.clone())).unwrap_or_else(|| "info".into())
}

/// Replaces the filter; the next line logged obeys it. Returns it.
pub fn set_filter(spec: &str) -> Result<String, String> {
    let filter = parse(spec)?;
    let (handle, current) = HANDLE.get().ok_or("logging is not initialised")?;
    handle.reload(filter).map_err(|e| e.to_string())?;
    if let Ok(mut c) = current.lock() {
        *c = spec.to_owned();
    }
    Ok(spec.to_owned())
}
