//! Servers that run inside a pod's namespace, on threads of the test process.
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
};

use crate::netns::Pod;

/// Binds `0.0.0.0:port` in the pod with a production-sized accept backlog (std
/// uses 128, which 200 simultaneous connections overflow).
fn listen(pod: &Pod, port: u16) -> TcpListener {
    pod.run(move || {
        let l = TcpListener::bind(("0.0.0.0", port)).unwrap();
        // SAFETY: listen() again on a listening socket only resizes its backlog.
        unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 4096) };
        l
    })
}

/// An HTTP/1.1 server on `port` answering every request with
/// `hello from <pod>; client <peer-ip>` (so tests see the source the server saw).
pub fn http_hello(pod: &Pod, port: u16) {
    let name = pod.name.clone();
    let listener = listen(pod, port);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let name = name.clone();
            std::thread::spawn(move || serve_hello(stream, &name));
        }
    });
}

fn serve_hello(mut s: TcpStream, name: &str) {
    let peer = s.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let body = format!("hello from {name}; client {peer}\n");
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes());
}

/// A TCP echo server on `port`: echoes everything, and half-closes its side
/// after the client half-closes.
pub fn echo(pod: &Pod, port: u16) {
    let listener = listen(pod, port);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = stream.try_clone().unwrap();
                let mut w = stream;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match r.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if w.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
}
