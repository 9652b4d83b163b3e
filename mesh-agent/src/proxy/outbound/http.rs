//! HTTP at the source agent: HTTP/1.1 (keep-alive, chunked, `Expect: 100-continue`,
//! WebSocket through `Upgrade`) and HTTP/2 (h2c, gRPC), with hyper. Each request
//! is routed on its own (a Service's endpoints are balanced per request), sent
//! on a pooled upstream connection to the chosen endpoint (a direct connection
//! for this node, an HBONE stream for another node), streamed both ways without
//! buffering whole messages, and measured: `istio_requests_total`, duration and
//! size histograms, and a JSON access log line.
use std::{
    convert::Infallible,
    net::SocketAddrV4,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use http_body_util::{BodyExt as _, Full};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderMap, HeaderValue},
};

use crate::{
    proxy::{Inputs, LocalReply, ProxyError, Refused},
    routing::http as routing,
    routing::l4::Route,
    routing::sni::Fit,
    state::{Workload, traffic},
    telemetry::{Flags, TcpLabels},
};

mod filters;
mod gate;
mod mirror;
mod pipeline;
mod retry;
mod target;
#[cfg(test)]
mod tests;
mod upstream;

use pipeline::handle;
use target::{Target, target};
use upstream::*;

use crate::{
    proxy::http::{
        Body, Downstream, X_FORWARDED_CLIENT_CERT, X_REQUEST_ID, cluster,
        headers::*,
        metered::{About, Metered, Record},
        path,
        pool::{self, PoolKey, Sender},
        serve_http, strip_hop_by_hop, tunnel_upgrade,
    },
    proxy::upstream::{Hop, Upstream},
    routing::protocol::{self, Handling},
};

/// Serves one client connection until it closes.
pub async fn serve<I>(ctx: Arc<Inputs>, client: I, down: Downstream, handling: Handling)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let down = Arc::new(down);
    let peer = down.peer;
    let svc_ctx = ctx.clone();
    let service = hyper::service::service_fn(move |req| {
        let (ctx, down) = (svc_ctx.clone(), down.clone());
        async move { Ok::<_, Infallible>(handle(ctx, down, req).await) }
    });
    serve_http(&ctx.limits, client, peer, handling, service).await
}

/// A try that got no response.
enum Failure {
    /// No upstream connection (connect error, tunnel refused, policy).
    Connect(ProxyError),
    /// The upstream reset or closed before answering.
    Reset(hyper::Error),
    /// The per-try timeout passed.
    Timeout,
}

/// Routes a request: by the mesh's rules for the Service asked for, or at a
/// gateway by the rules bound to it. Also returns whose identity the request
/// leaves with. `None`: a gateway has no rule for it.
fn decide(
    ctx: &Inputs,
    state: &crate::state::State,
    down: &Downstream,
    view: &routing::RequestView<'_>,
    pick: usize,
) -> Option<(routing::Decision, Option<Arc<Workload>>)> {
    let random = ctx.next_random();
    match &down.gateways {
        None => {
            Some((routing::route_request(state, down.orig, view, pick, random, &ctx.clusters), down.source.clone()))
        }
        Some(gws) => {
            let bound = down.server.as_ref().and_then(|b| b.server());
            let (decision, _) =
                routing::route_gateway(state, gws, bound, down.orig, view, pick, random, &ctx.clusters)?;
            Some((decision, gate::gateway_pod(state, down)))
        }
    }
}
