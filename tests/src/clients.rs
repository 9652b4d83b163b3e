//! Blocking one-shot clients (gRPC with tonic, WebSocket with tokio-tungstenite,
//! raw TCP) for the demo and tests; run them inside a namespace with `Pod::run`.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// One `test.Echo/Unary` call to `uri` (`http://host:port`); the reply's text.
pub fn grpc_unary(uri: String, text: &str) -> Result<String, String> {
    let msg = crate::grpc::EchoMsg { text: text.into(), fail_with: 0 };
    runtime().block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(uri)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut grpc = tonic::client::Grpc::new(channel);
        crate::grpc::unary(&mut grpc, msg).await.map(|m| m.text).map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    })
}

/// A WebSocket to `url`: sends `text`, returns what came back, closes.
pub fn websocket_echo(url: String, text: &str) -> Result<String, String> {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let text = text.to_owned();
    runtime().block_on(async move {
        let connect = tokio_tungstenite::connect_async(url);
        let (mut ws, _) = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .map_err(|_| "handshake timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        ws.send(Message::text(text)).await.map_err(|e| e.to_string())?;
        let back = ws.next().await.ok_or("closed")?.map_err(|e| e.to_string())?;
        let _ = ws.close(None).await;
        Ok(back.into_text().map_err(|e| e.to_string())?.to_string())
    })
}

/// Sends `payload` to an echo server and returns what came back (half-close).
pub fn tcp_echo(addr: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(payload)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut back = Vec::new();
    s.read_to_end(&mut back)?;
    Ok(back)
}

/// What curl got: the HTTP status (0 when no answer), the body, curl's errors.
pub struct Curled {
    pub code: u16,
    pub body: String,
    pub stderr: String,
}

/// curl with `args`, run by `run` (e.g. `Pod::cmd`, in a namespace).
pub fn curl(run: impl Fn(&[&str]) -> std::process::Output, args: &[&str]) -> Curled {
    let mut v = vec!["curl", "-sS", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}"];
    v.extend_from_slice(args);
    let out = run(&v);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    Curled {
        code: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// What a long-lived stream went through: echoes, when the last came, and
/// how and when it ended.
#[derive(Debug, Default, Clone)]
pub struct StreamLife {
    pub echoes: u64,
    pub last_echo: Option<std::time::Instant>,
    pub ended: Option<(std::time::Instant, String)>,
}

type Life = std::sync::Arc<std::sync::Mutex<StreamLife>>;

fn echoed(life: &Life) {
    let mut l = life.lock().unwrap();
    l.echoes += 1;
    l.last_echo = Some(std::time::Instant::now());
}

fn ended(life: &Life, how: String) {
    life.lock().unwrap().ended = Some((std::time::Instant::now(), how));
}

/// Holds a WebSocket (`ws_url`) and a gRPC bidirectional stream
/// (`grpc_uri`, `test.Echo/Bidi`) open, a message and its echo on each every
/// `every`, until each ends; records each one's life. Blocks: run it in a
/// pod's thread.
pub fn hold_streams(ws_url: String, grpc_uri: String, every: Duration, ws: Life, grpc: Life) {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let patience = Duration::from_secs(5);
    let ws_side = async {
        let Ok(Ok((mut s, _))) = tokio::time::timeout(patience, tokio_tungstenite::connect_async(ws_url)).await else {
            return ended(&ws, "no handshake".into());
        };
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if let Err(e) = s.send(Message::text("ping")).await {
                return ended(&ws, format!("send: {e}"));
            }
            match tokio::time::timeout(patience, s.next()).await {
                Ok(Some(Ok(m))) if m.is_text() => echoed(&ws),
                Ok(Some(Ok(m))) if m.is_close() => return ended(&ws, "close frame".into()),
                Ok(Some(Ok(_))) => {}
                Ok(None) => return ended(&ws, "end of stream".into()),
                Ok(Some(Err(e))) => return ended(&ws, e.to_string()),
                Err(_) => return ended(&ws, "no echo within 5 s".into()),
            }
        }
    };
    let grpc_side = async {
        let channel =
            tonic::transport::Endpoint::from_shared(grpc_uri).unwrap().connect_timeout(patience).connect().await;
        let Ok(channel) = channel else { return ended(&grpc, "no connection".into()) };
        let mut client = tonic::client::Grpc::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut replies = match crate::grpc::bidi_open(&mut client, rx).await {
            Ok(r) => r,
            Err(s) => return ended(&grpc, format!("{:?}: {}", s.code(), s.message())),
        };
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let _ = tx.send(crate::grpc::EchoMsg { text: "ping".into(), fail_with: 0 }).await;
            match tokio::time::timeout(patience, replies.message()).await {
                Ok(Ok(Some(_))) => echoed(&grpc),
                Ok(Ok(None)) => return ended(&grpc, "end of stream".into()),
                Ok(Err(s)) => return ended(&grpc, format!("{:?}: {}", s.code(), s.message())),
                Err(_) => return ended(&grpc, "no echo within 5 s".into()),
            }
        }
    };
    runtime().block_on(async { tokio::join!(ws_side, grpc_side) });
}
