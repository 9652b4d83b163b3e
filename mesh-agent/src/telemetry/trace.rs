//! Tracing (OpenTelemetry): the spans the agent makes for the requests it
//! handles, and their export with OTLP over gRPC to the collector a
//! MeshConfig `opentelemetry` provider names.
//!
//! Each provider has a bounded queue and one task that sends the spans in
//! batches (up to [`BATCH`] spans, at least every [`FLUSH`]). A full queue
//! drops the span and counts it (`mesh_trace_spans{result="queue_full"}`);
//! nothing on a request's path ever waits for the collector. A batch the
//! collector does not take is dropped and counted (`export_failed`,
//! `rejected`), with a warning at most every [`WARN_EVERY`].
use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span as OtlpSpan, Status, span::SpanKind, status::StatusCode},
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::{net::TcpStream, sync::mpsc};

use super::ResultLabels;
use crate::state::trace::TraceProvider;

pub mod context;
#[cfg(any(test, feature = "testing"))]
pub mod receiver;

/// Spans waiting for export, per provider (the OpenTelemetry SDK's
/// `BatchSpanProcessor` default `max_queue_size`).
pub const QUEUE: usize = 2048;
/// Spans per export request (the SDK's `max_export_batch_size`).
pub const BATCH: usize = 512;
/// The longest a span waits for its batch (the SDK waits 5 s; spans are
/// sent sooner here so that a trace is complete in the collector quickly and
/// the queue stays short).
pub const FLUSH: Duration = Duration::from_secs(1);
/// How long one export may take (the OTLP exporter's default).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
const WARN_EVERY: Duration = Duration::from_secs(30);
/// An exporter with no span for this long ends.
const IDLE: Duration = Duration::from_secs(300);

/// OpenTelemetry's span kind, as Envoy uses it: `Server` for a request
/// received (destination, gateway), `Client` for a request sent on (source,
/// and a gateway's upstream span).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server,
    Client,
}

/// A finished span, as the exporter receives it.
#[derive(Debug, Clone)]
pub struct Span {
    /// The resource's `service.name`: the workload the span is for, as
    /// Istio names a proxy's (`<canonical service>.<namespace>`).
    pub service: Arc<str>,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub name: String,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(Cow<'static, str>, String)>,
    /// Envoy's `error` tag: the span's status is `ERROR`.
    pub error: bool,
}

/// Opens a TCP connection to a provider's collector (an endpoint of its
/// Service, from the agent's own uncaptured address).
pub type Connect =
    Arc<dyn Fn(&TraceProvider) -> Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>> + Send + Sync>;

/// The exporters, one per provider, started when a provider's first span comes.
pub struct Tracer {
    queues: Mutex<HashMap<Arc<TraceProvider>, mpsc::Sender<Span>>>,
    connect: Connect,
    counts: Family<ResultLabels, Counter>,
}

impl Tracer {
    pub fn new(connect: Connect, counts: Family<ResultLabels, Counter>) -> Self {
        Tracer { queues: Mutex::default(), connect, counts }
    }

    /// Queues `span` for `provider`'s collector, or drops and counts it.
    pub fn send(&self, provider: &Arc<TraceProvider>, span: Span) {
        let mut span = span;
        for _ in 0..2 {
            match self.queue(provider).try_send(span) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => break,
                // Its exporter ended, idle, just now: a new one takes it.
                Err(mpsc::error::TrySendError::Closed(s)) => span = s,
            }
        }
        count(&self.counts, "queue_full", 1);
    }

    /// The provider's queue; a new exporter when it has none (or its last
    /// ended, idle).
    fn queue(&self, provider: &Arc<TraceProvider>) -> mpsc::Sender<Span> {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = queues.get(provider).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        queues.retain(|_, tx| !tx.is_closed());
        let (tx, rx) = mpsc::channel(QUEUE);
        let exporter = Exporter {
            provider: provider.clone(),
            connect: self.connect.clone(),
            counts: self.counts.clone(),
            last_warning: None,
        };
        tokio::spawn(exporter.run(rx));
        queues.insert(provider.clone(), tx.clone());
        tx
    }
}

struct Exporter {
    provider: Arc<TraceProvider>,
    connect: Connect,
    counts: Family<ResultLabels, Counter>,
    last_warning: Option<tokio::time::Instant>,
}

impl Exporter {
    async fn run(mut self, mut rx: mpsc::Receiver<Span>) {
        let client = self.client();
        let mut batch = Vec::with_capacity(BATCH);
        // An exporter with nothing to send for a while ends (a provider the
        // configuration dropped leaves nothing behind).
        while let Ok(Some(first)) = tokio::time::timeout(IDLE, rx.recv()).await {
            batch.push(first);
            let flush_at = tokio::time::Instant::now() + FLUSH;
            while batch.len() < BATCH {
                tokio::select! {
                    next = rx.recv() => match next {
                        Some(s) => batch.push(s),
                        None => break,
                    },
                    () = tokio::time::sleep_until(flush_at) => break,
                }
            }
            let n = batch.len() as u64;
            let request = export_request(std::mem::take(&mut batch));
            let mut client = client.clone();
            let sent = tokio::time::timeout(EXPORT_TIMEOUT, client.export(request)).await;
            let failure = match sent {
                Ok(Ok(resp)) => {
                    let rejected = resp.into_inner().partial_success.map_or(0, |p| p.rejected_spans.max(0) as u64);
                    count(&self.counts, "exported", n - rejected.min(n));
                    (rejected > 0).then(|| ("rejected", rejected.min(n), "the collector rejected spans".to_owned()))
                }
                Ok(Err(status)) => Some(("export_failed", n, status.to_string())),
                Err(_) => Some(("export_failed", n, "timed out".to_owned())),
            };
            if let Some((result, dropped, why)) = failure {
                count(&self.counts, result, dropped);
                self.warn(dropped, &why);
            }
        }
    }

    fn warn(&mut self, dropped: u64, why: &str) {
        let now = tokio::time::Instant::now();
        if self.last_warning.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            return;
        }
        self.last_warning = Some(now);
        let p = &self.provider;
        tracing::warn!(provider = %p.name, collector = %format!("{}:{}", p.service, p.port), dropped, "span export failed: {why}");
    }

    /// A gRPC client whose connections the connector makes (the URI only
    /// names the authority).
    fn client(&self) -> TraceServiceClient<tonic::transport::Channel> {
        let (connect, provider) = (self.connect.clone(), self.provider.clone());
        let connector = tower::service_fn(move |_: hyper::Uri| {
            let opened = connect(&provider);
            async move { opened.await.map(hyper_util::rt::TokioIo::new) }
        });
        let endpoint = tonic::transport::Endpoint::from_static("http://otel-collector").connect_timeout(EXPORT_TIMEOUT);
        TraceServiceClient::new(endpoint.connect_with_connector_lazy(connector))
    }
}

/// Adds `n` spans to `mesh_trace_spans_total{result}`.
fn count(counts: &Family<ResultLabels, Counter>, result: &'static str, n: u64) {
    if n > 0 {
        counts.get_or_create(&ResultLabels { result }).inc_by(n);
    }
}

/// Spans grouped by the workload they are for (one OTLP resource each).
fn export_request(spans: Vec<Span>) -> ExportTraceServiceRequest {
    let mut by_service: BTreeMap<Arc<str>, Vec<OtlpSpan>> = BTreeMap::new();
    for s in spans {
        by_service.entry(s.service.clone()).or_default().push(otlp(s));
    }
    let scope = InstrumentationScope {
        name: "mesh-agent".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    let resource_spans = by_service
        .into_iter()
        .map(|(service, spans)| ResourceSpans {
            resource: Some(Resource { attributes: vec![attribute("service.name", &service)], ..Default::default() }),
            scope_spans: vec![ScopeSpans { scope: Some(scope.clone()), spans, schema_url: String::new() }],
            schema_url: String::new(),
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

fn attribute(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_owned())) }),
        ..Default::default()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn otlp(s: Span) -> OtlpSpan {
    let kind = match s.kind {
        Kind::Server => SpanKind::Server,
        Kind::Client => SpanKind::Client,
    };
    let status = s.error.then(|| Status { code: StatusCode::Error as i32, message: String::new() });
    OtlpSpan {
        trace_id: s.trace_id.to_vec(),
        span_id: s.span_id.to_vec(),
        parent_span_id: s.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
        // Sampled (W3C trace flags), as the SDKs set it.
        flags: 1,
        name: s.name,
        kind: kind as i32,
        start_time_unix_nano: unix_nanos(s.start),
        end_time_unix_nano: unix_nanos(s.end),
        attributes: s.attributes.into_iter().map(|(k, v)| attribute(&k, &v)).collect(),
        status,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
