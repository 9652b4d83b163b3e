//! The Kubernetes client, as kube-rs builds it from the inferred
//! configuration (base URI, credentials, TLS, timeouts), with one difference:
//! its sockets carry the agent's mark. The agent's cgroup/connect4 capture
//! sends host processes' connections to Service VIPs through the mesh, and
//! the API server is usually reached at one (the `kubernetes` Service):
//! unmarked, the agent's own reconnects would be captured, and an agent
//! starting under pinned capture could never list anything.
use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use hyper_util::rt::{TokioExecutor, TokioIo};
use kube::{Client, client::ConfigExt as _};
use tower::ServiceBuilder;

use super::DiscoveryError;

/// Which cluster to read, from the command line (`--kubeconfig`, `--context`).
#[derive(Debug, Clone, Default)]
pub struct KubeSelection {
    pub kubeconfig: Option<std::path::PathBuf>,
    pub context: Option<String>,
}

/// The process's choice, made once by the command line before any client.
static SELECTION: std::sync::OnceLock<KubeSelection> = std::sync::OnceLock::new();

/// Records the command line's choice of cluster (the first call wins).
pub fn select_cluster(selection: KubeSelection) {
    let _ = SELECTION.set(selection);
}

/// The configuration: from `--kubeconfig`/`--context` when given, else as
/// kube-rs infers it (in-cluster service account, else `$KUBECONFIG`).
async fn config() -> Result<kube::Config, DiscoveryError> {
    let err = |e: &dyn std::fmt::Display| DiscoveryError::Config(e.to_string());
    let selection = SELECTION.get().cloned().unwrap_or_default();
    if selection.kubeconfig.is_none() && selection.context.is_none() {
        return kube::Config::infer().await.map_err(|e| err(&e));
    }
    let kubeconfig = match &selection.kubeconfig {
        Some(path) => kube::config::Kubeconfig::read_from(path)
            .map_err(|e| DiscoveryError::Config(format!("--kubeconfig {}: {e}", path.display())))?,
        None => kube::config::Kubeconfig::read().map_err(|e| err(&e))?,
    };
    let options = kube::config::KubeConfigOptions { context: selection.context.clone(), ..Default::default() };
    kube::Config::from_custom_kubeconfig(kubeconfig, &options).await.map_err(|e| match &selection.context {
        Some(c) => DiscoveryError::Config(format!("--context {c}: {e}")),
        None => err(&e),
    })
}

/// The client for the selected cluster, its connections marked as the agent's.
pub async fn client() -> Result<Client, DiscoveryError> {
    let config = config().await?;
    let https = config.rustls_https_connector_with_connector(AgentConnector).map_err(DiscoveryError::Client)?;
    let mut connector = hyper_timeout::TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().map_err(DiscoveryError::Client)?)
        .map_err(tower::BoxError::from)
        .service(http);
    Ok(Client::new(service, config.default_namespace))
}

/// Plain TCP to the API server, from a socket marked as the agent's.
#[derive(Debug, Clone, Copy)]
struct AgentConnector;

impl tower::Service<http::Uri> for AgentConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| std::io::Error::other(format!("{uri}: no host")))?;
            let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("http") { 80 } else { 443 });
            let stream = crate::identity::connect_as_agent(host.trim_matches(['[', ']']), port).await?;
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(stream))
        })
    }
}
