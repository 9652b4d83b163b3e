//! The source agent's side: pooled mTLS + HTTP/2 connections to other agents,
//! one CONNECT stream per proxied connection.
use super::*;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: Arc<str>,
    node: SocketAddrV4,
    dest: Arc<str>,
}

struct PoolEntry {
    sender: SendRequest<Empty<Bytes>>,
    /// Serial of the source certificate the connection was made with.
    serial: String,
    /// Tunnels open on it; at [`MAX_STREAMS`] another connection is made, as
    /// the peer would make a new stream wait.
    streams: Arc<AtomicUsize>,
}

impl PoolEntry {
    fn usable(&self, serial: &str, limit: usize) -> bool {
        self.serial == serial && !self.sender.is_closed() && self.streams.load(Ordering::Acquire) < limit
    }
}

pub struct TunnelPool {
    /// Streams per connection before another is made ([`MAX_STREAMS`]).
    stream_limit: usize,
    conns: Mutex<HashMap<PoolKey, Vec<PoolEntry>>>,
    /// TLS client configurations by (source certificate serial, destination
    /// identity): kept so that their session caches let a new connection to
    /// the same peer resume instead of a full handshake. A renewed source
    /// certificate has a new serial, so a new configuration and full handshakes.
    tls: Mutex<TlsConfigs>,
    /// Held while a connection to the key's peer is being made.
    /// Held while a connection to the key's peer is being made; remembers
    /// when the last attempt failed, and why.
    connecting: Mutex<HashMap<PoolKey, Arc<Gate>>>,
}

impl Default for TunnelPool {
    fn default() -> Self {
        TunnelPool::with_stream_limit(MAX_STREAMS as usize)
    }
}

impl TunnelPool {
    /// A pool that opens another connection to a peer at `limit` streams.
    pub fn with_stream_limit(limit: usize) -> Self {
        TunnelPool { stream_limit: limit, conns: Mutex::default(), tls: Mutex::default(), connecting: Mutex::default() }
    }
}

/// TLS client configurations by (source certificate serial, peer identity).
type TlsConfigs = HashMap<(String, Arc<str>), Arc<rustls::ClientConfig>>;

/// One connection attempt at a time; when the last one failed, and why.
type Gate = tokio::sync::Mutex<Option<(std::time::Instant, String)>>;

/// Configurations kept at most (one per source identity and peer identity).
const MAX_TLS_CONFIGS: usize = 4096;

/// An HBONE tunnel (one HTTP/2 CONNECT stream); its connection's stream count
/// goes down when it is dropped.
pub struct Tunnel {
    io: Upgraded,
    streams: Arc<AtomicUsize>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl hyper::rt::Read for Tunnel {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Tunnel {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// What a tunnel is for: the pod `target` on the node whose agent is `node`,
/// running as `dest`, on behalf of `source` whose pod IP is `client_ip`,
/// which addressed the Service `service` (its hostname), if any.
#[derive(Debug, Clone, Copy)]
pub struct TunnelTo<'a> {
    pub source: &'a Arc<str>,
    pub node: SocketAddrV4,
    pub dest: &'a Arc<str>,
    pub target: SocketAddrV4,
    pub client_ip: Ipv4Addr,
    pub service: Option<&'a str>,
    pub connect_timeout: Duration,
}

impl TunnelPool {
    /// Opens a tunnel (an HTTP/2 CONNECT stream), on a pooled connection when
    /// one is live.
    pub async fn open(&self, ctx: &Inputs, to: TunnelTo<'_>) -> Result<Tunnel, HboneError> {
        let TunnelTo { source, node, dest, connect_timeout, .. } = to;
        let cert = ctx.certs.get(source).await?;
        let key = PoolKey { source: source.clone(), node, dest: dest.clone() };
        let serial = &cert.info.serial;
        if let Some(r) = self.on_pooled(&key, serial, &to, ctx.limits.connect_answer_timeout).await {
            return r;
        }
        // One handshake at a time per peer: a burst of new connections waits
        // for the first and shares it, instead of each making its own.
        let gate = self.connecting.lock().ok().map(|mut m| m.entry(key.clone()).or_default().clone());
        let waiting_since = std::time::Instant::now();
        let mut turn = match &gate {
            Some(g) => Some(g.lock().await),
            None => None,
        };
        // The attempt this opener waited for failed: fail with it rather than
        // each waiter waiting out its own connect timeout. Later openers try.
        if let Some(Some((when, why))) = turn.as_deref()
            && *when >= waiting_since
        {
            return Err(HboneError::Connect { addr: node, error: std::io::Error::other(why.clone()) });
        }
        // Another opener connected while this one waited: use that, without
        // holding the gate over the CONNECT.
        if self.usable(&key, serial) {
            turn = None;
            if let Some(r) = self.on_pooled(&key, serial, &to, ctx.limits.connect_answer_timeout).await {
                return r;
            }
        }
        // Boxed: a handshake's state (~6.5 KB) is needed once per peer, not by
        // every tunnel opened on a pooled connection.
        let handshake = Box::pin(connect(ctx, self.tls_config(ctx, &cert, node, dest)?, node, dest, connect_timeout));
        let sender = match handshake.await {
            Ok(s) => s,
            Err(e) => {
                if let Some(t) = turn.as_deref_mut() {
                    *t = Some((std::time::Instant::now(), e.to_string()));
                }
                return Err(e);
            }
        };
        if let Some(t) = turn.as_deref_mut() {
            *t = None;
        }
        let streams = Arc::new(AtomicUsize::new(1));
        if let Ok(mut m) = self.conns.lock() {
            for entries in m.values_mut() {
                entries.retain(|e| !e.sender.is_closed());
            }
            m.retain(|_, entries| !entries.is_empty());
            if let Ok(mut gates) = self.connecting.lock() {
                // Gates nobody waits on, for peers with no connection left.
                gates.retain(|k, g| Arc::strong_count(g) > 1 || m.contains_key(k));
            }
            let entry =
                PoolEntry { sender: sender.clone(), serial: cert.info.serial.clone(), streams: streams.clone() };
            m.entry(key).or_default().push(entry);
        }
        drop(turn);
        match send_connect(sender, &to, ctx.limits.connect_answer_timeout).await {
            Ok(io) => Ok(Tunnel { io, streams }),
            Err(e) => {
                streams.fetch_sub(1, Ordering::AcqRel);
                Err(e)
            }
        }
    }
}

impl TunnelPool {
    fn usable(&self, key: &PoolKey, serial: &str) -> bool {
        self.conns
            .lock()
            .is_ok_and(|m| m.get(key).is_some_and(|v| v.iter().any(|e| e.usable(serial, self.stream_limit))))
    }

    /// A tunnel on a usable pooled connection (a stream slot is taken before
    /// sending, so that concurrent opens spread). `None`: there is none, or
    /// the one tried has died since it was last used (the peer agent
    /// restarted), and a fresh connection is for the caller to make.
    async fn on_pooled(
        &self,
        key: &PoolKey,
        serial: &str,
        to: &TunnelTo<'_>,
        answer_timeout: Duration,
    ) -> Option<Result<Tunnel, HboneError>> {
        let (sender, streams) = self.conns.lock().ok().and_then(|m| {
            let e = m.get(key)?.iter().find(|e| e.usable(serial, self.stream_limit))?;
            e.streams.fetch_add(1, Ordering::AcqRel);
            Some((e.sender.clone(), e.streams.clone()))
        })?;
        match send_connect(sender, to, answer_timeout).await {
            Ok(io) => Some(Ok(Tunnel { io, streams })),
            Err(e) => {
                streams.fetch_sub(1, Ordering::AcqRel);
                if matches!(e, HboneError::Http { .. }) {
                    tracing::debug!(node = %to.node, "pooled HBONE connection failed; reconnecting");
                    return None;
                }
                Some(Err(e))
            }
        }
    }

    fn tls_config(
        &self,
        ctx: &Inputs,
        cert: &identity::WorkloadCert,
        node: SocketAddrV4,
        dest: &Arc<str>,
    ) -> Result<Arc<rustls::ClientConfig>, HboneError> {
        let key = (cert.info.serial.clone(), dest.clone());
        if let Some(c) = self.tls.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(c);
        }
        let config = identity::tls::client_config(ctx.certs.roots(), Some(cert.key.clone()), dest.clone(), &[b"h2"])
            .map_err(|e| HboneError::Tls { addr: node, expected: dest.clone(), error: std::io::Error::other(e) })?;
        let config = Arc::new(config);
        if let Ok(mut m) = self.tls.lock() {
            if m.len() >= MAX_TLS_CONFIGS {
                m.clear();
            }
            m.insert(key, config.clone());
        }
        Ok(config)
    }
}

/// Sends `CONNECT target` on an HTTP/2 connection and returns the tunnel.
async fn send_connect(
    mut sender: SendRequest<Empty<Bytes>>,
    to: &TunnelTo<'_>,
    answer_timeout: Duration,
) -> Result<Upgraded, HboneError> {
    let (node, target) = (to.node, to.target);
    let http = |error| HboneError::Http { addr: node, error };
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .header("forwarded", super::forwarded_value(to.client_ip, to.service))
        .body(Empty::new())
        .map_err(|e| HboneError::Status {
            addr: node,
            target,
            status: StatusCode::BAD_REQUEST,
            reason: e.to_string(),
        })?;
    // A peer that never answers must not hold the connection (and its client) forever.
    let answer = async {
        sender.ready().await.map_err(http)?;
        sender.send_request(req).await.map_err(http)
    };
    let resp = match tokio::time::timeout(answer_timeout, answer).await {
        Ok(r) => r?,
        Err(_) => return Err(HboneError::AnswerTimeout { addr: node, target }),
    };
    if resp.status() != StatusCode::OK {
        let reason =
            resp.headers().get("x-mesh-reason").and_then(|v| v.to_str().ok()).unwrap_or("no reason given").to_owned();
        return Err(HboneError::Status { addr: node, target, status: resp.status(), reason });
    }
    hyper::upgrade::on(resp).await.map_err(http)
}

async fn connect(
    ctx: &Inputs,
    config: Arc<rustls::ClientConfig>,
    node: SocketAddrV4,
    dest: &Arc<str>,
    connect_timeout: Duration,
) -> Result<SendRequest<Empty<Bytes>>, HboneError> {
    let tcp = match proxy::l4::connect(node, None, connect_timeout).await {
        Ok(s) => s,
        Err(ProxyError::ConnectTimeout { .. }) => return Err(HboneError::ConnectTimeout { addr: node }),
        Err(ProxyError::Connect { error, .. }) => return Err(HboneError::Connect { addr: node, error }),
        Err(other) => return Err(HboneError::Connect { addr: node, error: std::io::Error::other(other.to_string()) }),
    };
    let tls_err = |error| HboneError::Tls { addr: node, expected: dest.clone(), error };
    let name = rustls::pki_types::ServerName::try_from(identity::server_name_for(dest))
        .map_err(|e| tls_err(std::io::Error::other(e)))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(r) => r.map_err(tls_err)?,
        Err(_) => return Err(tls_err(std::io::ErrorKind::TimedOut.into())),
    };
    let handshake = match tls.get_ref().1.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => "resumed",
        _ => "full",
    };
    ctx.metrics.hbone_connections.get_or_create(&crate::telemetry::HandshakeLabels { handshake }).inc();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .keep_alive_interval(KEEPALIVE)
        .keep_alive_while_idle(false)
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|error| HboneError::Http { addr: node, error })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%node, error = %e, "HBONE connection ended");
        }
    });
    tracing::debug!(%node, dest = %dest, handshake, "HBONE connection established");
    Ok(sender)
}
