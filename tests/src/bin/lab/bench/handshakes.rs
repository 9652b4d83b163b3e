//! HBONE handshakes per second against an agent, with the mesh CA's client
//! certificate.
use super::*;

/// Client threads making new mTLS connections at once, each one at a time.
pub(super) const HANDSHAKE_CLIENTS: usize = 4;

/// New mTLS connections per second to node-2's agent (its HBONE port), from
/// [`HANDSHAKE_CLIENTS`] threads in the network between the nodes with a
/// client certificate the mesh CA signed (made with openssl): full
/// handshakes, then resumed ones; and the agent's CPU per handshake (whose
/// inverse is what one core accepts per second). A connection counts once
/// the agent's first HTTP/2 frame arrives: it has checked the client's
/// certificate by then. Source agents pool their HBONE connections, so no
/// request path makes one per client connection: this measures the handshake.
pub(super) fn hbone_handshakes(
    cluster: &Cluster,
    ca: &CaService,
    dir: &Path,
    secs: u64,
    agent: u32,
) -> anyhow::Result<Sample> {
    let ca_dir = ca.ca_dir();
    let (root, root_key) = (ca_dir.join("root-cert.pem"), ca_dir.join("root-key.pem"));
    let (key, csr, cert, ext) =
        (dir.join("client-key.pem"), dir.join("client.csr"), dir.join("client.pem"), dir.join("client.ext"));
    std::fs::write(
        &ext,
        "subjectAltName=URI:spiffe://cluster.local/ns/bench/sa/client\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth,serverAuth\n",
    )?;
    let openssl = |args: &[&str]| crate::run(Command::new("openssl").args(args).stdout(std::process::Stdio::null()));
    let p = |p: &Path| p.display().to_string();
    openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &p(&key)])?;
    openssl(&["req", "-new", "-key", &p(&key), "-subj", "/O=cluster.local", "-out", &p(&csr)])?;
    let (csr, root_key, ext, out) = (p(&csr), p(&root_key), p(&ext), p(&cert));
    let sign = ["x509", "-req", "-days", "1", "-in", &csr, "-CA", &p(&root), "-CAkey", &root_key, "-extfile", &ext];
    openssl(&[&sign[..], &["-out", &out]].concat()).context("signing the client certificate")?;
    let config = handshake::client_config(Some((&cert, &key)), b"h2")?;
    let target = std::net::SocketAddr::from((cluster.nodes[1].ip, 15008));
    let to = Target {
        netns: &cluster.net_ns,
        addr: target,
        server_name: handshake::SERVER_NAME,
        probe: handshake::Probe::H2,
    };
    connection_rates(&to, &config, secs, &[agent], ["full_per_s", "full_agent_us", "resumed_per_s", "resumed_agent_us"])
}

/// Where [`connection_rates`] connects, and how.
pub(super) struct Target<'a> {
    pub(super) netns: &'a str,
    pub(super) addr: std::net::SocketAddr,
    pub(super) server_name: &'static str,
    pub(super) probe: handshake::Probe,
}

/// New connections per second from [`HANDSHAKE_CLIENTS`] threads, each one
/// at a time, with full handshakes and then resumed ones, and the CPU of
/// `agents` per connection, in µs; `keys` name the four figures (full
/// rate and CPU, resumed rate and CPU).
pub(super) fn connection_rates(
    to: &Target<'_>,
    config: &rustls::ClientConfig,
    secs: u64,
    agents: &[u32],
    keys: [&'static str; 4],
) -> anyhow::Result<Sample> {
    let mut sample = Sample::new();
    for (resume, rate_key, cpu_key) in [(false, keys[0], keys[1]), (true, keys[2], keys[3])] {
        let mut config = config.clone();
        if !resume {
            config.resumption = rustls::client::Resumption::disabled();
        }
        let config = std::sync::Arc::new(config);
        let cpu = || agents.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
        let cpu0 = cpu();
        let start = Instant::now();
        let deadline = start + Duration::from_secs(secs);
        let clients: Vec<_> = (0..HANDSHAKE_CLIENTS)
            .map(|_| {
                let (config, addr, name, probe) = (config.clone(), to.addr, to.server_name, to.probe);
                mesh_tests::netns::enter_and_spawn(to.netns, move || {
                    let mut made = 0u64;
                    while Instant::now() < deadline {
                        handshake::connect(&config, addr, name, probe)?;
                        made += 1;
                    }
                    anyhow::Ok(made)
                })
            })
            .collect();
        let mut made = 0;
        for c in clients {
            made += c.join().map_err(|_| anyhow::anyhow!("handshake client panicked"))??;
        }
        let (elapsed, made) = (start.elapsed().as_secs_f64(), made as f64);
        sample.insert(rate_key, made / elapsed);
        sample.insert(cpu_key, (cpu() - cpu0) / made * 1e6);
    }
    Ok(sample)
}

/// A bare mTLS client of an agent's HBONE port, for [`hbone_handshakes`].
pub(super) mod handshake {
    use std::{
        io::{Read as _, Write as _},
        net::{SocketAddr, TcpStream},
        path::Path,
        sync::Arc,
        time::Duration,
    };

    use anyhow::Context as _;
    use rustls::{
        ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
        pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
    };

    /// The server name under which node-2's agent holds the remote pod's certificate.
    pub const SERVER_NAME: &str = "server.bench.cluster.local.hbone";

    /// Checks the agent's signature (as a client must, for the CPU it costs)
    /// but not its certificate: the load generator trusts whom it measures.
    #[derive(Debug)]
    struct SignatureOnly(WebPkiSupportedAlgorithms);

    impl ServerCertVerifier for SignatureOnly {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_schemes()
        }
    }

    /// TLS 1.3 with the client certificate `cert` (if any) and ALPN `alpn`.
    pub fn client_config(cert: Option<(&Path, &Path)>, alpn: &[u8]) -> anyhow::Result<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(SignatureOnly(provider.signature_verification_algorithms));
        let builder = ClientConfig::builder_with_provider(provider as Arc<CryptoProvider>)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match cert {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
                let key = PrivateKeyDer::from_pem_file(key).context("the client key")?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }

    /// What a new connection does once its handshake is under way, to know
    /// the server has finished with it (a TLS 1.3 server checks a client
    /// certificate after the client's last flight).
    #[derive(Clone, Copy)]
    pub enum Probe {
        /// The HTTP/2 preface, until the agent's first frame (HBONE).
        H2,
        /// One HTTP/1.1 request for `/` with this `Host`, until the status line.
        Http1(&'static str),
    }

    /// One connection to `target` as `server_name`, the handshake and `probe`.
    pub fn connect(
        config: &Arc<ClientConfig>,
        target: SocketAddr,
        server_name: &'static str,
        probe: Probe,
    ) -> anyhow::Result<()> {
        let mut tcp = TcpStream::connect_timeout(&target, Duration::from_secs(5)).context("connecting")?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(server_name)?;
        let mut tls = ClientConnection::new(config.clone(), name)?;
        let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
        match probe {
            Probe::H2 => {
                // The preface and an empty SETTINGS frame.
                stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").context("the handshake")?;
                let mut first = [0u8; 9];
                stream.read_exact(&mut first).context("the agent's first frame")?;
                anyhow::ensure!(first[3] == 0x4, "the agent's first frame is not SETTINGS: {first:?}");
            }
            Probe::Http1(host) => {
                let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
                stream.write_all(request.as_bytes()).context("the handshake and request")?;
                let mut status = [0u8; 12];
                stream.read_exact(&mut status).context("the response")?;
                anyhow::ensure!(&status[9..] == b"200", "answered {:?}", String::from_utf8_lossy(&status));
            }
        }
        tls.send_close_notify();
        let _ = tls.complete_io(&mut tcp);
        Ok(())
    }
}
