//! The JSON access log: one line per request, to stdout (the default), a
//! file, or nowhere (`--access-log off|stdout|PATH`).
use std::{io::Write as _, path::PathBuf, sync::Mutex, time::SystemTime};

pub enum AccessLog {
    Off,
    Stdout,
    File(Mutex<std::fs::File>),
}

impl AccessLog {
    /// `off`, `stdout`, or a file path (appended to).
    pub fn open(spec: &str) -> std::io::Result<AccessLog> {
        Ok(match spec {
            "off" => AccessLog::Off,
            "stdout" | "-" => AccessLog::Stdout,
            path => AccessLog::File(Mutex::new(
                std::fs::OpenOptions::new().create(true).append(true).open(PathBuf::from(path))?,
            )),
        })
    }

    /// Whether lines are written anywhere (requests skip building them if not).
    pub fn enabled(&self) -> bool {
        !matches!(self, AccessLog::Off)
    }

    pub fn write(&self, entry: &serde_json::Value) {
        let mut line = entry.to_string();
        line.push('\n');
        // A full disk or a closed stdout must not fail the request.
        match self {
            AccessLog::Off => {}
            AccessLog::Stdout => {
                let _ = std::io::stdout().lock().write_all(line.as_bytes());
            }
            AccessLog::File(f) => {
                if let Ok(mut f) = f.lock() {
                    let _ = f.write_all(line.as_bytes());
                }
            }
        }
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t).format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}
