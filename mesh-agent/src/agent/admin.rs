//! Admin server on 127.0.0.1:15000 in the node's network namespace:
//! `/ready` (200 once capture is attached and config loaded; 503 while
//! draining), `/healthz` (200 while the process serves, draining included:
//! a liveness probe must not kill an agent that is draining), `/metrics`
//! (Prometheus text), `/config_dump` (JSON of the current state).
use std::{convert::Infallible, sync::Arc};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, header, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::Context;

/// Serves until the process exits (it stays up during drain so `/ready` can
/// report 503 and metrics stay scrapeable).
pub async fn serve(ctx: Arc<Context>, listener: TcpListener) {
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
                async move { Ok::<_, Infallible>(respond(&ctx, &req)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await
            {
                tracing::debug!(error = %e, "admin connection");
            }
        });
    }
}

fn respond<B>(ctx: &Context, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
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
            let body = serde_json::to_string_pretty(&dump).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
            let mut r = text(StatusCode::OK, body + "\n");
            r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
            r
        }
        "/" => text(StatusCode::OK, "mesh-agent admin: /ready /healthz /metrics /config_dump\n".into()),
        _ => text(StatusCode::NOT_FOUND, "not found: try /ready /healthz /metrics /config_dump\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}
