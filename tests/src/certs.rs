//! Test certificates made with the `openssl` command line: a CA and server
//! certificates it signs (for Gateway Secrets and external HTTPS servers).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// A directory of PEM files, removed on drop.
pub struct Certs {
    pub dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Certs {
    /// A fresh CA (`ca.crt`, `ca.key`) in a new directory named after `id`.
    pub fn new(id: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mesh-certs-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        openssl(&dir, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key"]);
        openssl(
            &dir,
            &["req", "-x509", "-new", "-key", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=mesh test CA"],
        );
        Self { dir }
    }

    /// A server certificate for `host` (a name or an IP address) signed by
    /// the CA: `<name>.crt`, `<name>.key`.
    pub fn server(&self, name: &str, host: &str) -> (PathBuf, PathBuf) {
        self.leaf(name, host, "serverAuth")
    }

    /// A client certificate naming `host`, signed by the CA.
    pub fn client(&self, name: &str, host: &str) -> (PathBuf, PathBuf) {
        self.leaf(name, host, "clientAuth")
    }

    fn leaf(&self, name: &str, host: &str, usage: &str) -> (PathBuf, PathBuf) {
        let (key, csr, crt, ext) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
        let san = match host.parse::<std::net::IpAddr>() {
            Ok(_) => format!("IP:{host}"),
            Err(_) => format!("DNS:{host}"),
        };
        std::fs::write(
            self.dir.join(&ext),
            format!("subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage={usage}\n"),
        )
        .unwrap();
        openssl(&self.dir, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &key]);
        openssl(&self.dir, &["req", "-new", "-key", &key, "-out", &csr, "-subj", &format!("/CN={host}")]);
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "1",
                "-extfile",
                &ext,
            ],
        );
        (self.dir.join(crt), self.dir.join(key))
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A file's text, indented for a YAML block scalar.
    pub fn yaml_block(path: &Path, indent: usize) -> String {
        let pad = " ".repeat(indent);
        std::fs::read_to_string(path).unwrap().lines().map(|l| format!("{pad}{l}\n")).collect()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
