//! The bench's results as an SVG chart, drawn from `latest.json` files: the
//! latency each scenario adds over direct, the agents' CPU per 1000
//! requests, and throughput as a share of direct, one bar per run, so that
//! runs before and after a change sit side by side.
use std::fmt::Write as _;

use serde_json::Value;

use super::*;

/// One run: its name in the legend, and its `latest.json`.
pub(super) struct Run {
    pub(super) name: String,
    pub(super) doc: Value,
}

impl Run {
    pub(super) fn read(path: &Path, name: Option<&str>) -> anyhow::Result<Run> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let doc = serde_json::from_str(&text).with_context(|| format!("{} is not the bench's JSON", path.display()))?;
        let name = name.map_or_else(|| path.display().to_string(), str::to_owned);
        Ok(Run { name, doc })
    }

    /// A row's value: `path` is `direct_cross_node`, `mesh_same_node`, ….
    fn value(&self, scenario: &str, metric: &str, path: &str) -> Option<f64> {
        let rows = self.doc.get("rows")?.as_array()?;
        let row = rows.iter().find(|r| r["scenario"] == scenario && r["metric"] == metric)?;
        row.get(path)?.as_f64().filter(|v| v.is_finite())
    }

    /// What the mesh adds over direct on `node` (`same_node`, `cross_node`).
    fn added(&self, scenario: &str, metric: &str, node: &str) -> Option<f64> {
        Some(
            self.value(scenario, metric, &format!("mesh_{node}"))?
                - self.value(scenario, metric, &format!("direct_{node}"))?,
        )
    }

    fn ratio(&self, scenario: &str, metric: &str, node: &str) -> Option<f64> {
        Some(
            self.value(scenario, metric, &format!("mesh_{node}"))?
                / self.value(scenario, metric, &format!("direct_{node}"))?,
        )
    }
}

/// A panel: a title, its unit, and rows of one value per run.
struct Panel {
    title: &'static str,
    unit: &'static str,
    rows: Vec<(String, Vec<Option<f64>>)>,
}

const COLOURS: [&str; 4] = ["#9e9e9e", "#1f77b4", "#ff7f0e", "#2ca02c"];
const LATENCY: [(&str, &str); 5] = [
    ("http1_1000rps", "HTTP/1.1 1000 rps"),
    ("http2_1000rps", "HTTP/2 1000 rps"),
    ("http1_1000rps_jwt", "HTTP/1.1 + JWT policy"),
    ("http1_1000rps_trace1", "HTTP/1.1, 1 % traced"),
    ("tcp_rr_1000mps", "TCP ping-pong 1000/s"),
];
const CPU: [(&str, &str); 5] = [
    ("http1_1000rps", "HTTP/1.1"),
    ("http2_1000rps", "HTTP/2"),
    ("http1_1000rps_jwt", "HTTP/1.1 + JWT policy"),
    ("http1_1000rps_l4dest", "HTTP/1.1, destination L4"),
    ("http1_1000rps_trace1", "HTTP/1.1, 1 % traced"),
];
const THROUGHPUT: [(&str, &str, &str); 7] = [
    ("http1_saturation", "rps", "HTTP/1.1 saturation"),
    ("http2_saturation", "rps", "HTTP/2 saturation"),
    ("new_connections", "rps", "new connections"),
    ("grpc_unary", "rps", "gRPC unary"),
    ("grpc_streaming", "rps", "gRPC streaming, messages"),
    ("tcp_1_stream", "gbit_per_s", "TCP, 1 stream"),
    ("tcp_8_streams", "gbit_per_s", "TCP, 8 streams"),
];

fn panels(runs: &[Run]) -> Vec<Panel> {
    let each = |f: &dyn Fn(&Run) -> Option<f64>| runs.iter().map(f).collect::<Vec<_>>();
    let mut latency = Panel { title: "Latency added over direct, cross-node", unit: "ms", rows: Vec::new() };
    for (scenario, name) in LATENCY {
        let (metrics, scale) = match scenario.starts_with("tcp") {
            true => (["p50_us", "p99_us", ""], 1e-3),
            false => (["p50_ms", "p90_ms", "p99_ms"], 1.0),
        };
        for metric in metrics.into_iter().filter(|m| !m.is_empty()) {
            let label = format!("{name} {}", metric.split('_').next().unwrap_or(metric));
            latency.rows.push((label, each(&|r| Some(r.added(scenario, metric, "cross_node")? * scale))));
        }
    }
    let mut cpu = Panel { title: "CPU of each agent per 1000 requests", unit: "vCPU", rows: Vec::new() };
    for (scenario, name) in CPU {
        for (node, place) in [("cross_node", "cross-node"), ("same_node", "same-node")] {
            let row = each(&|r| r.value(scenario, "agent_vcpu_per_1000rps", &format!("mesh_{node}")));
            cpu.rows.push((format!("{name}, {place}"), row));
        }
    }
    let mut throughput =
        Panel { title: "Throughput as a share of direct, cross-node", unit: "× direct", rows: Vec::new() };
    for (scenario, metric, name) in THROUGHPUT {
        throughput.rows.push((name.to_owned(), each(&|r| r.ratio(scenario, metric, "cross_node"))));
    }
    let mut all = vec![latency, cpu, throughput];
    for p in &mut all {
        p.rows.retain(|(_, values)| values.iter().any(Option::is_some));
    }
    all.retain(|p| !p.rows.is_empty());
    all
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The chart of `runs` (the first is drawn grey: the baseline).
pub(super) fn draw(runs: &[Run]) -> String {
    const WIDTH: f64 = 760.0;
    const LABEL: f64 = 250.0;
    const BAR: f64 = 11.0;
    let plot = WIDTH - LABEL - 70.0;
    let panels = panels(runs);
    let mut body = String::new();
    let mut y = 20.0;
    // The legend: one swatch per run.
    let mut x = LABEL;
    for (i, run) in runs.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let _ = write!(body, r#"<rect x="{x}" y="{}" width="12" height="12" fill="{colour}"/>"#, y - 10.0);
        let _ = write!(body, r#"<text x="{}" y="{y}">{}</text>"#, x + 16.0, escape(&run.name));
        x += 24.0 + 7.0 * run.name.chars().count() as f64;
    }
    y += 16.0;
    for panel in &panels {
        y += 22.0;
        let _ = write!(body, r#"<text x="8" y="{y}" font-weight="bold">{} ({})</text>"#, panel.title, panel.unit);
        y += 8.0;
        let max = panel.rows.iter().flat_map(|(_, v)| v.iter().flatten()).fold(0.0_f64, |m, v| m.max(*v));
        let scale = if max > 0.0 { plot / max } else { 0.0 };
        for (label, values) in &panel.rows {
            let height = BAR * values.len() as f64 + 6.0;
            let _ = write!(
                body,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                LABEL - 6.0,
                y + height / 2.0 + 3.0,
                escape(label)
            );
            for (i, v) in values.iter().enumerate() {
                let top = y + 3.0 + BAR * i as f64;
                let colour = COLOURS[i % COLOURS.len()];
                let Some(v) = v else { continue };
                let w = (v.max(0.0) * scale).max(0.5);
                let _ = write!(
                    body,
                    r#"<rect x="{LABEL}" y="{top}" width="{w:.1}" height="{}" fill="{colour}"/>"#,
                    BAR - 1.0
                );
                let _ = write!(
                    body,
                    r#"<text x="{:.1}" y="{}" font-size="9">{}</text>"#,
                    LABEL + w + 3.0,
                    top + BAR - 2.0,
                    number(*v)
                );
            }
            y += height;
        }
    }
    let height = y + 12.0;
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\" \
         font-family=\"sans-serif\" font-size=\"11\"><rect width=\"100%\" height=\"100%\" fill=\"white\"/>{body}</svg>\n"
    )
}

fn number(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 1.0 => format!("{v:.2}"),
        _ => format!("{v:.3}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, p50: f64, vcpu: f64) -> Run {
        let doc = serde_json::json!({"rows": [
            {"scenario": "http1_1000rps", "metric": "p50_ms", "direct_cross_node": 0.1, "mesh_cross_node": 0.1 + p50,
             "direct_same_node": 0.1, "mesh_same_node": 0.2},
            {"scenario": "http1_1000rps", "metric": "agent_vcpu_per_1000rps", "direct_cross_node": null,
             "mesh_cross_node": vcpu, "direct_same_node": null, "mesh_same_node": null},
        ]});
        Run { name: name.into(), doc }
    }

    #[test]
    fn each_run_gets_a_bar_per_row_and_missing_values_none() {
        let runs = [run("before", 0.4, 0.15), run("after <x>", 0.2, 0.1)];
        let p = panels(&runs);
        assert_eq!(p.len(), 2, "latency and CPU; no throughput rows");
        let (label, values) = &p[0].rows[0];
        assert_eq!(label, "HTTP/1.1 1000 rps p50");
        assert!((values[0].expect("before") - 0.4).abs() < 1e-9 && (values[1].expect("after") - 0.2).abs() < 1e-9);
        assert_eq!(p[1].rows.len(), 1, "same-node CPU is null in both runs: left out");
        let svg = draw(&runs);
        assert!(svg.starts_with("<svg") && svg.contains("after &lt;x&gt;") && !svg.contains("<x>"), "{svg}");
        assert_eq!(svg.matches("<rect").count(), 1 + 2 + 2 * 2, "background, legend, two bars per row");
    }
}
