//! The JSON access log: one line per request, to stdout (the default), a
//! file, or nowhere (`--access-log off|stdout|PATH`).
//!
//! A worker thread never writes: lines go into a bounded queue that one
//! writer thread drains, so a slow or blocked stdout (a full pipe, a stalled
//! log collector) costs requests nothing. When the queue is full the line is
//! dropped and counted (`mesh_limit_refusals_total{listener="access_log"}`).
use std::{
    io::Write as _,
    path::PathBuf,
    sync::mpsc::{SyncSender, TrySendError},
    time::SystemTime,
};

/// Lines waiting for the writer at most.
const QUEUE: usize = 8192;

pub struct AccessLog(Option<SyncSender<String>>);

impl AccessLog {
    /// `off`, `stdout`, or a file path (appended to).
    pub fn open(spec: &str) -> std::io::Result<AccessLog> {
        let out: Box<dyn std::io::Write + Send> = match spec {
            "off" => return Ok(AccessLog(None)),
            "stdout" | "-" => Box::new(std::io::stdout()),
            path => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(PathBuf::from(path))?),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(QUEUE);
        std::thread::Builder::new().name("access-log".into()).spawn(move || {
            let mut out = std::io::BufWriter::new(out);
            while let Ok(line) = rx.recv() {
                // A full disk or a closed stdout must not stop the agent.
                let _ = out.write_all(line.as_bytes());
                // Write out whenever the queue is drained, so lines are not held.
                while let Ok(more) = rx.try_recv() {
                    let _ = out.write_all(more.as_bytes());
                }
                let _ = out.flush();
            }
        })?;
        Ok(AccessLog(Some(tx)))
    }

    /// Whether lines are written anywhere (requests skip building them if not).
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Queues a line; `false` when it was dropped because the writer is behind.
    pub fn write(&self, entry: &serde_json::Value) -> bool {
        let Some(tx) = &self.0 else { return true };
        let mut line = entry.to_string();
        line.push('\n');
        !matches!(tx.try_send(line), Err(TrySendError::Full(_)))
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t).format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}
