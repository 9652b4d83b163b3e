//! A small HTTPS server that plays the Kubernetes API server inside a test
//! node's network namespace (lists, chunked watch streams, API discovery,
//! TokenReviews: `mesh_agent::discovery::testing::FakeApi` answers), named in
//! a kubeconfig, so the real agent binary runs with `--kubernetes` against it.
use std::{convert::Infallible, path::PathBuf, sync::Arc, time::Duration};

use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use mesh_agent::discovery::testing::FakeApi;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

use crate::{Cluster, certs::Certs, netns::enter_and_spawn};

pub struct ApiServer {
    /// The API server's objects: `apply` and `delete` reach the watches.
    pub fake: FakeApi,
    /// A kubeconfig naming the server, its CA and a bearer token.
    pub kubeconfig: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Bumped to cut every open connection.
    cut: tokio::sync::watch::Sender<u64>,
    thread: Option<std::thread::JoinHandle<()>>,
    _certs: Certs,
}

impl ApiServer {
    /// Serves on 127.0.0.1 in node `node`'s network namespace.
    pub fn start(cluster: &Cluster, node: usize) -> ApiServer {
        Self::start_in(cluster, &cluster.nodes[node].ns, "127.0.0.1")
    }

    /// Serves on 127.0.0.1 in this process's own network namespace (no root:
    /// `cargo xtask scale --kubernetes`).
    pub fn start_local(fake: FakeApi) -> ApiServer {
        let certs = Certs::new(&format!("kube-api-local-{}", std::process::id()));
        Self::serve_from(fake, certs, "127.0.0.1", std::thread::spawn)
    }

    /// Serves on `ip` in the network namespace `ns` (the cluster network's
    /// `172.18.0.1` is reached from every node and from the CA).
    pub fn start_in(cluster: &Cluster, ns: &str, ip: &str) -> ApiServer {
        let certs = Certs::new(&format!("kube-api-{}", cluster.id));
        let ns = ns.to_owned();
        Self::serve_from(FakeApi::default(), certs, ip, move |f| enter_and_spawn(&ns, f))
    }

    fn serve_from(
        fake: FakeApi,
        certs: Certs,
        ip: &str,
        spawn: impl FnOnce(Box<dyn FnOnce() + Send>) -> std::thread::JoinHandle<()>,
    ) -> ApiServer {
        let (crt, key) = certs.server("apiserver", ip);
        let addr: std::net::SocketAddr = format!("{ip}:0").parse().unwrap();
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let served = fake.clone();
        let thread = spawn(Box::new(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(serve(served, (crt, key), addr, port_tx, (stopped, cuts)));
        }));
        let port: u16 = port_rx.recv_timeout(Duration::from_secs(10)).expect("the API server's port");
        let kubeconfig = certs.dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters: [{{name: test, cluster: {{server: 'https://{ip}:{port}', certificate-authority: '{}'}}}}]\n\
                 users: [{{name: agent, user: {{token: test-token}}}}]\n\
                 contexts: [{{name: test, context: {{cluster: test, user: agent, namespace: default}}}}]\n\
                 current-context: test\n",
                certs.ca().display()
            ),
        )
        .unwrap();
        ApiServer { fake, kubeconfig, stop: Some(stop), cut, thread: Some(thread), _certs: certs }
    }

    /// Closes every open connection (as an API server restart or a load
    /// balancer does): clients must connect again.
    pub fn cut_connections(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    fake: FakeApi,
    (crt, key): (PathBuf, PathBuf),
    addr: std::net::SocketAddr,
    port: std::sync::mpsc::Sender<u16>,
    (mut stopped, cuts): (tokio::sync::oneshot::Receiver<()>, tokio::sync::watch::Receiver<u64>),
) {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&crt).unwrap().map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_file(&key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    port.send(listener.local_addr().unwrap().port()).unwrap();
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let (acceptor, fake, mut cut) = (acceptor.clone(), fake.clone(), cuts.clone());
                cut.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let fake = fake.clone();
                        async move {
                            let (parts, body) = request.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            Ok::<_, Infallible>(fake.handle(&parts.method, &parts.uri, &body))
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        }
    }
}
