//! The server name a TLS client asks for, read from its ClientHello without
//! decrypting anything (TLS passthrough routes on it). A pure function over the
//! bytes peeked so far; hostile input gives `NotTls`, never a panic.

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sni<'a> {
    /// A ClientHello naming this host.
    Found(&'a str),
    /// A ClientHello without the server_name extension.
    Absent,
    /// Not all of the ClientHello has arrived.
    NeedMore,
    /// Not a TLS ClientHello.
    NotTls,
}

/// A byte reader that fails instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3).map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }

    /// A length-prefixed block (`len` bytes of length).
    fn block(&mut self, len: usize) -> Option<Reader<'a>> {
        let n = match len {
            1 => self.u8()?,
            2 => self.u16()?,
            _ => self.u24()?,
        };
        self.take(n).map(Reader)
    }
}

/// Reads the SNI from the start of a TLS connection (the ClientHello must sit
/// in the first record, as every client sends it).
pub fn sni(buf: &[u8]) -> Sni<'_> {
    let mut r = Reader(buf);
    match r.take(1) {
        None => return Sni::NeedMore,
        Some([22]) => {}
        Some(_) => return Sni::NotTls,
    }
    let Some(version) = r.take(2) else { return Sni::NeedMore };
    if version[0] != 3 {
        return Sni::NotTls;
    }
    let Some(len) = r.u16() else { return Sni::NeedMore };
    let Some(record) = r.take(len) else { return Sni::NeedMore };
    client_hello(record).unwrap_or(Sni::NotTls)
}

fn client_hello(record: &[u8]) -> Option<Sni<'_>> {
    let mut r = Reader(record);
    if r.u8()? != 1 {
        return None;
    }
    let mut hello = r.block(3)?;
    hello.take(2 + 32)?; // version, random
    hello.block(1)?; // session id
    hello.block(2)?; // cipher suites
    hello.block(1)?; // compression methods
    let Some(mut exts) = hello.block(2) else { return Some(Sni::Absent) };
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let mut body = exts.block(2)?;
        if kind != 0 {
            continue;
        }
        let mut list = body.block(2)?;
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.block(2)?.0;
            if name_type == 0 {
                return std::str::from_utf8(name).ok().filter(|n| !n.is_empty()).map(Sni::Found);
            }
        }
    }
    Some(Sni::Absent)
}

/// The server name in the client's ClientHello, read without consuming it
/// (the bytes go upstream untouched).
pub(crate) async fn peek_sni(stream: &tokio::net::TcpStream, timeout: std::time::Duration) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return None,
        };
        match sni(&buf[..n]) {
            Sni::Found(name) => return Some(name.to_ascii_lowercase()),
            Sni::NeedMore if n < buf.len() => {
                // Wait for more bytes without spinning: forget the readiness
                // this peek saw, then wait for the next arrival.
                let _ = stream
                    .try_io(tokio::io::Interest::READABLE, || Err::<(), _>(std::io::ErrorKind::WouldBlock.into()));
                tokio::time::timeout_at(deadline, stream.readable()).await.ok()?.ok()?;
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello record with the given extensions.
    fn hello(exts: &[u8]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    fn server_name(host: &str) -> Vec<u8> {
        let mut entry = vec![0];
        entry.extend_from_slice(&(host.len() as u16).to_be_bytes());
        entry.extend_from_slice(host.as_bytes());
        let mut list = (entry.len() as u16).to_be_bytes().to_vec();
        list.extend_from_slice(&entry);
        let mut ext = vec![0, 0];
        ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
        ext.extend_from_slice(&list);
        ext
    }

    #[test]
    fn reads_the_server_name_and_waits_for_the_rest() {
        let mut exts = vec![0, 10, 0, 2, 0, 29]; // another extension first
        exts.extend(server_name("passthrough.example"));
        let rec = hello(&exts);
        assert_eq!(sni(&rec), Sni::Found("passthrough.example"));
        for cut in [0, 1, 4, 5, rec.len() - 1] {
            assert_eq!(sni(&rec[..cut]), Sni::NeedMore, "cut at {cut}");
        }
        assert_eq!(sni(&hello(&[0, 10, 0, 2, 0, 29])), Sni::Absent);
        assert_eq!(sni(b"GET / HTTP/1.1\r\n"), Sni::NotTls);
        // A lying inner length inside a complete record.
        let mut bad = rec.clone();
        bad[6] = 0xff;
        assert_eq!(sni(&bad), Sni::NotTls);
        // Every truncation of the record body, taken as a whole record, is refused cleanly.
        for cut in 5..rec.len() {
            let mut r = rec[..cut].to_vec();
            let len = (cut - 5) as u16;
            r[3..5].copy_from_slice(&len.to_be_bytes());
            let _ = sni(&r);
        }
    }
}
