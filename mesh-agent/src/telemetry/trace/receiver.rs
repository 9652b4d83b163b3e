//! An OTLP/gRPC trace receiver for tests (the in-process ones and the
//! network-namespace suite): it keeps every span it is sent, with the
//! `service.name` of its resource, and answers as a collector does.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper::{Request, body::Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value,
    trace::v1::Span,
};
use tokio::sync::Notify;

/// A span as received, with its resource's `service.name`.
#[derive(Debug, Clone)]
pub struct Received {
    pub service: String,
    pub span: Span,
}

impl Received {
    /// A string attribute of the span.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        })
    }

    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Clone, Default)]
struct Collected {
    spans: Arc<Mutex<Vec<Received>>>,
    arrived: Arc<Notify>,
    /// Only count (a benchmark's load would fill the memory).
    count_only: bool,
    count: Arc<std::sync::atomic::AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Collected {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        let n = request.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len() as u64).sum();
        self.count.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        if self.count_only {
            return Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }));
        }
        let mut kept = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        for rs in request.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                kept.push(Received { service: service.clone(), span });
            }
        }
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// A receiver listening on `addr` (port 0: any); a clone reads the same spans.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    collected: Collected,
}

impl Receiver {
    pub async fn start(addr: SocketAddr) -> std::io::Result<Receiver> {
        Self::listen(addr, false).await
    }

    /// A receiver that only counts the spans it is sent.
    pub async fn counting(addr: SocketAddr) -> std::io::Result<Receiver> {
        Self::listen(addr, true).await
    }

    async fn listen(addr: SocketAddr, count_only: bool) -> std::io::Result<Receiver> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let collected = Collected { count_only, ..Default::default() };
        let server = TraceServiceServer::new(collected.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let server = server.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let mut server = server.clone();
                    async move { tower::Service::call(&mut server, req).await }
                });
                let h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                tokio::spawn(async move { h2.serve_connection(TokioIo::new(tcp), svc).await });
            }
        });
        Ok(Receiver { addr, collected })
    }

    /// How many spans it was sent.
    pub fn received(&self) -> u64 {
        self.collected.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every span received so far (none when only counting).
    pub fn spans(&self) -> Vec<Received> {
        self.collected.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The spans once `done` holds for them, or all received by `timeout`.
    pub async fn wait_for(&self, timeout: Duration, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.collected.arrived.notified();
            let spans = self.spans();
            if done(&spans) || tokio::time::Instant::now() >= deadline {
                return spans;
            }
            let _ = tokio::time::timeout_at(deadline, arrived).await;
        }
    }
}
