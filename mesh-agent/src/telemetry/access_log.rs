//! Where access log lines go: MeshConfig `accessLogFile` (`/dev/stdout`, a
//! path, or `""` for none), or, when MeshConfig does not say, the agent's
//! `--access-log off|stdout|PATH` (stdout by default). The lines themselves
//! are Envoy's ([`crate::state::log_format`]).
//!
//! A worker thread never writes: lines go into a bounded queue that one
//! writer thread drains, so a slow or blocked stdout (a full pipe, a stalled
//! log collector) costs requests nothing. When the queue is full the line is
//! dropped and counted (`mesh_limit_refusals_total{listener="access_log"}`).
//!
//! The queue holds memory only for the lines in it: a channel of linked
//! blocks of 31 lines, freed as the writer empties them, with the bound kept
//! by a count. (`sync_channel(8192)` allocated and wrote all 8 192 slots, 448
//! KiB, at start, with the access log off as much as on.)
use crate::state::telemetry::Logging;
use std::{
    collections::{HashMap, HashSet},
    io::Write as _,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc::{Receiver, Sender},
    },
};

/// Lines waiting for the writer at most.
const QUEUE: usize = 8192;

/// Where a line goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Off,
    Stdout,
    /// A file, appended to (opened by the writer on first use).
    File(Arc<str>),
}

pub struct AccessLog {
    queue: Queue,
    /// `--access-log`: where lines go when MeshConfig does not say.
    default: Sink,
}

impl AccessLog {
    /// `off`, `stdout`, or a file path (appended to; checked to open now).
    pub fn open(spec: &str) -> std::io::Result<AccessLog> {
        let default = match spec {
            "off" => Sink::Off,
            "stdout" | "-" | "/dev/stdout" => Sink::Stdout,
            path => {
                std::fs::OpenOptions::new().create(true).append(true).open(path)?;
                Sink::File(path.into())
            }
        };
        let (queue, rx) = Queue::new();
        let queued = queue.queued.clone();
        std::thread::Builder::new().name("access-log".into()).spawn(move || write_lines(&rx, &queued))?;
        Ok(AccessLog { queue, default })
    }

    /// Where a side's lines go: MeshConfig's `accessLogFile` (`None`: not
    /// set, the agent's flag decides), unless its Telemetry turns logging off,
    /// or on with the built-in `envoy` provider (stdout when nothing else is
    /// named, as Istio's provider writes to `/dev/stdout`).
    pub fn sink(&self, mesh_file: Option<&Arc<str>>, logging: Logging) -> Sink {
        let configured = match mesh_file.map(|f| &**f) {
            None => self.default.clone(),
            Some("") => Sink::Off,
            Some("/dev/stdout") => Sink::Stdout,
            Some(_) => Sink::File(mesh_file.cloned().unwrap_or_else(|| "".into())),
        };
        match (logging, configured) {
            (Logging::Off, _) => Sink::Off,
            (Logging::On, Sink::Off) => Sink::Stdout,
            (_, sink) => sink,
        }
    }

    /// Queues a line; `false` when it was dropped because the writer is behind.
    pub fn write(&self, sink: &Sink, line: String) -> bool {
        if *sink == Sink::Off {
            return true;
        }
        self.queue.send((sink.clone(), line))
    }
}

/// The lines between the workers and the writer, at most [`QUEUE`].
struct Queue {
    tx: Sender<(Sink, String)>,
    /// Lines sent and not yet taken by the writer.
    queued: Arc<AtomicUsize>,
}

impl Queue {
    fn new() -> (Queue, Receiver<(Sink, String)>) {
        let (tx, rx) = std::sync::mpsc::channel();
        (Queue { tx, queued: Arc::default() }, rx)
    }

    /// `false` when the queue is full (the line is dropped). A writer that
    /// has gone takes nothing and is not the queue being full.
    fn send(&self, item: (Sink, String)) -> bool {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= QUEUE {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        if self.tx.send(item).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
        true
    }
}

/// What the writer does with each line it takes: the queue has room again.
fn taken<T>(item: T, queued: &AtomicUsize) -> T {
    queued.fetch_sub(1, Ordering::Relaxed);
    item
}

/// The writer thread: every line to its sink, written out whenever the
/// queue is drained so that lines are not held.
fn write_lines(rx: &Receiver<(Sink, String)>, queued: &AtomicUsize) {
    let mut stdout = std::io::BufWriter::new(std::io::stdout());
    let mut files: HashMap<Arc<str>, std::io::BufWriter<std::fs::File>> = HashMap::new();
    let mut failed: HashSet<Arc<str>> = HashSet::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(taken(first, queued));
        while let Some((sink, line)) = next.take() {
            // A full disk or a closed stdout must not stop the agent.
            match sink {
                Sink::Off => {}
                Sink::Stdout => drop(stdout.write_all(line.as_bytes())),
                Sink::File(path) => {
                    if !files.contains_key(&path) && !failed.contains(&path) {
                        match std::fs::OpenOptions::new().create(true).append(true).open(&*path) {
                            Ok(f) => drop(files.insert(path.clone(), std::io::BufWriter::new(f))),
                            Err(e) => {
                                tracing::warn!(path = %path, error = %e, "access log file cannot be opened; its lines are dropped");
                                failed.insert(path.clone());
                            }
                        }
                    }
                    if let Some(f) = files.get_mut(&path) {
                        let _ = f.write_all(line.as_bytes());
                    }
                }
            }
            next = rx.try_recv().ok().map(|item| taken(item, queued));
        }
        let _ = stdout.flush();
        for f in files.values_mut() {
            let _ = f.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_lines_until_the_writer_takes_one() {
        let (queue, rx) = Queue::new();
        let line = || (Sink::Stdout, "line\n".to_owned());
        for i in 0..QUEUE {
            assert!(queue.send(line()), "line {i} of {QUEUE} was dropped");
        }
        assert!(!queue.send(line()), "line {QUEUE} went past the bound");
        assert!(!queue.send(line()));
        let _ = taken(rx.try_recv().expect("a line queued"), &queue.queued);
        assert!(queue.send(line()), "room again after the writer took one");
        assert!(!queue.send(line()));
        // Dropped lines were never queued: exactly QUEUE wait.
        assert_eq!(rx.try_iter().count(), QUEUE);
    }
}
