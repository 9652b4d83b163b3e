//! The agent's HTTP surfaces, as ztunnel lays them out:
//!
//! - admin, 127.0.0.1:15000 in the node's network namespace: everything below,
//!   and `/config_dump` (JSON of the current state), `/connections` (the
//!   connections policy watches), `/logging` (GET the log filter; POST
//!   `?level=` to change it);
//! - stats, the node's addresses :15020: `/metrics` and `/stats/prometheus`
//!   (Prometheus text), for a scraper in the cluster;
//! - readiness, the node's addresses :15021: `/healthz/ready` (200 once
//!   capture is attached and configuration loaded; 503 while draining), for
//!   the kubelet.
//!
//! `/healthz` (200 while the process serves, draining included: a liveness
//! probe must not kill an agent that is draining) is on every surface.
use std::{convert::Infallible, sync::Arc};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, header, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::Context;

/// Which paths a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    Admin,
    Stats,
    Readiness,
}

impl Surface {
    /// Its socket's name in a handover.
    pub fn name(self) -> &'static str {
        match self {
            Surface::Admin => "admin",
            Surface::Stats => "stats",
            Surface::Readiness => "readiness",
        }
    }
}

/// Serves until the process exits (it stays up during drain so `/ready` can
/// report 503 and metrics stay scrapeable).
pub async fn serve(ctx: Arc<Context>, listener: TcpListener, surface: Surface) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(respond(&ctx, &req, surface)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await
            {
                tracing::debug!(error = %e, "admin connection");
            }
        });
    }
}

fn respond<B>(ctx: &Context, req: &Request<B>, surface: Surface) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let served = match surface {
        Surface::Admin => true,
        Surface::Stats => matches!(path, "/metrics" | "/stats/prometheus" | "/healthz" | "/"),
        Surface::Readiness => matches!(path, "/healthz/ready" | "/healthz" | "/"),
    };
    if !served {
        return text(StatusCode::NOT_FOUND, format!("not found: try {}\n", index(surface)));
    }
    if path == "/logging" && req.method() == Method::POST {
        return set_logging(req.uri().query());
    }
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET (and POST /logging)\n".into());
    }
    match path {
        "/ready" | "/healthz/ready" => {
            if ctx.is_ready() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
            }
        }
        "/healthz" | "/healthz/live" => text(StatusCode::OK, "alive\n".into()),
        "/metrics" | "/stats/prometheus" => {
            let mut r = text(StatusCode::OK, ctx.inputs.metrics.encode());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            r
        }
        "/config_dump" => {
            let dump = serde_json::json!({
                "node": ctx.inputs.node,
                "config_source": ctx.source,
                "ready": ctx.is_ready(),
                "last_config_error": ctx.last_config_error(),
                "active_connections": ctx.inputs.active.count(),
                "capture": ctx.capture(),
                "certificates": ctx.inputs.certs.dump(),
                "gateway_listeners": ctx.gateway_status(),
                "gateway_conflicts": ctx.gateway_conflicts(),
                "state": &*ctx.inputs.state(),
            });
            json(&dump)
        }
        "/connections" => json(&ctx.inputs.conns.dump(&ctx.inputs.state())),
        "/logging" => text(StatusCode::OK, format!("{}\n", crate::telemetry::logging::filter())),
        "/" => text(StatusCode::OK, format!("mesh-agent: {}\n", index(surface))),
        _ => text(StatusCode::NOT_FOUND, format!("not found: try {}\n", index(surface))),
    }
}

fn index(surface: Surface) -> &'static str {
    match surface {
        Surface::Admin => "/ready /healthz /metrics /config_dump /connections /logging",
        Surface::Stats => "/metrics /stats/prometheus /healthz",
        Surface::Readiness => "/healthz/ready /healthz",
    }
}

/// `POST /logging?level=<filter>`: the new filter takes effect for the next
/// line logged (ztunnel's `/logging`).
fn set_logging(query: Option<&str>) -> Response<Full<Bytes>> {
    let level = query.unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("level="));
    let Some(level) = level.filter(|l| !l.is_empty()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "expected ?level=<filter> (error, warn, info, debug, trace, or target=level,…)\n".into(),
        );
    };
    let level = crate::identity::jwt::percent_decode(level);
    match crate::telemetry::logging::set_filter(&level) {
        Ok(now) => {
            tracing::info!(filter = %now, "log filter changed");
            text(StatusCode::OK, format!("{now}\n"))
        }
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{level:?}: {e}\n")),
    }
}

fn json<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    let mut r = text(StatusCode::OK, body + "\n");
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}
