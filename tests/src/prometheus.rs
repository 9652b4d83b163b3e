//! Debian's Prometheus, run in the cluster network's namespace and
//! scraping agents as Istio's scrape configuration does (the stats port's
//! `/stats/prometheus`), with its HTTP API queried by curl from there.
use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::Cluster;

/// A Prometheus server on 127.0.0.1:9090 of the cluster network, killed
/// (and its data removed) on drop.
pub struct Prometheus<'c> {
    child: Child,
    dir: std::path::PathBuf,
    c: &'c Cluster,
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl<'c> Prometheus<'c> {
    /// Scrapes `targets` (`host:port`) every second. `None` (with a note)
    /// when Prometheus is not installed, outside CI: CI must have it.
    pub fn start(c: &'c Cluster, targets: &[String], test: &str) -> Option<Prometheus<'c>> {
        if Command::new("prometheus").arg("--version").output().is_err() {
            assert!(std::env::var("CI").is_err(), "prometheus is not installed (cargo xtask setup installs it)");
            eprintln!("\n*** SKIPPED {test}: no prometheus (cargo xtask setup) ***\n");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("mesh-test-{}-prometheus", c.id));
        std::fs::create_dir_all(&dir).expect("Prometheus directory");
        let list = targets.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", ");
        let config = format!(
            "global: {{scrape_interval: 1s}}\nscrape_configs:\n- job_name: mesh-agents\n  metrics_path: /stats/prometheus\n  \
             static_configs: [{{targets: [{list}]}}]\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("Prometheus configuration");
        let child = Command::new("ip")
            .args(["netns", "exec", &c.net_ns, "prometheus", "--web.listen-address=127.0.0.1:9090"])
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("Prometheus log"))
            .spawn()
            .expect("prometheus");
        Some(Prometheus { child, dir, c })
    }

    /// One instant query: the API's answer, or why there is none.
    pub fn query(&self, query: &str) -> Result<serde_json::Value, String> {
        let out = self.c.net_cmd(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-G",
            "--data-urlencode",
            &format!("query={query}"),
            "http://127.0.0.1:9090/api/v1/query",
        ]);
        let body = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{e}: {body}{}", String::from_utf8_lossy(&out.stderr)))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].clone())
    }

    /// The first sample of `query`, waiting up to 40 s for one.
    pub fn wait_for(&self, query: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let got = self.query(query);
            if let Some(sample) = got.as_ref().ok().and_then(|r| r.as_array()).and_then(|a| a.first()) {
                return sample.clone();
            }
            assert!(Instant::now() < deadline, "Prometheus has no {query}: {got:?}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}
