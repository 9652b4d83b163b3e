//! A service graph, as Kiali draws one, from the agents' Istio metrics: who
//! called whom, with request rates, the share of 5xx answers and whether the
//! calls were mTLS, written as a self-contained SVG (`cargo xtask demo`).
//!
//! Edges come from the source reporter (each call counted once), and from
//! the destination reporter for clients no agent reports as a source
//! (plaintext from outside the mesh). A node is a workload as a client, and
//! what it called as a destination: the Service (`name.namespace`), else the
//! workload, else Istio's `PassthroughCluster`/`BlackHoleCluster`.
use std::collections::{BTreeMap, BTreeSet};

/// One caller → callee pair, summed over its series.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Edge {
    pub requests: f64,
    pub server_errors: f64,
    /// TCP connections opened (HTTP ones included).
    pub connections: f64,
    pub mtls: bool,
    pub plaintext: bool,
}

/// Edges by (caller, callee).
pub type Graph = BTreeMap<(String, String), Edge>;

/// A series' labels, parsed from the text format.
fn labels(line: &str) -> Option<(BTreeMap<&str, &str>, f64)> {
    let (head, value) = line.rsplit_once(' ')?;
    let (_, rest) = head.split_once('{')?;
    let body = rest.strip_suffix('}')?;
    let mut out = BTreeMap::new();
    for kv in body.split("\",") {
        let (k, v) = kv.split_once("=\"")?;
        out.insert(k.trim(), v.trim_end_matches('"'));
    }
    Some((out, value.parse().ok()?))
}

fn caller(l: &BTreeMap<&str, &str>) -> String {
    match (l.get("source_workload"), l.get("source_workload_namespace")) {
        (Some(&w), Some(&ns)) if w != "unknown" => format!("{w}\n{ns}"),
        _ => "unknown\noutside the mesh".into(),
    }
}

fn callee(l: &BTreeMap<&str, &str>) -> String {
    let get = |k| l.get(k).copied().unwrap_or("unknown");
    match (get("destination_service_name"), get("destination_service_namespace")) {
        (svc, ns) if svc != "unknown" && ns != "unknown" => format!("{svc}\n{ns}"),
        (svc, _) if svc != "unknown" => format!("{svc}\n"),
        _ if get("destination_workload") != "unknown" => {
            format!("{}\n{}", get("destination_workload"), get("destination_workload_namespace"))
        }
        _ => "unknown\nno route".into(),
    }
}

/// The graph of the agents' metrics (`/stats/prometheus` texts).
pub fn from_metrics(texts: &[String]) -> Graph {
    let mut sources: Graph = BTreeMap::new();
    let mut destinations: Graph = BTreeMap::new();
    for text in texts {
        for line in text.lines() {
            let kind = if line.starts_with("istio_requests_total{") {
                0
            } else if line.starts_with("istio_tcp_connections_opened_total{") {
                1
            } else {
                continue;
            };
            let Some((l, value)) = labels(line) else { continue };
            let graph = match l.get("reporter") {
                Some(&"source") => &mut sources,
                Some(&"destination") => &mut destinations,
                _ => continue,
            };
            let e = graph.entry((caller(&l), callee(&l))).or_default();
            if kind == 0 {
                e.requests += value;
                if l.get("response_code").is_some_and(|c| c.starts_with('5')) {
                    e.server_errors += value;
                }
            } else {
                e.connections += value;
            }
            match l.get("connection_security_policy") {
                Some(&"mutual_tls") => e.mtls = true,
                _ => e.plaintext = true,
            }
        }
    }
    // Callers some agent reports as a source are counted there once.
    let reported: BTreeSet<String> = sources.keys().map(|(c, _)| c.clone()).collect();
    for (key, e) in destinations {
        if !reported.contains(&key.0) {
            sources.insert(key, e);
        }
    }
    sources
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The graph as SVG, in three columns as Kiali lays a small graph out:
/// clients only, nodes that are called and call on, and nodes only called;
/// each edge labelled with its calls, their rate over `secs` seconds, the
/// 5xx share and its security.
pub fn svg(graph: &Graph, secs: f64, title: &str) -> String {
    let called: BTreeSet<&str> = graph.keys().map(|(_, d)| d.as_str()).collect();
    let calling: BTreeSet<&str> = graph.keys().map(|(c, _)| c.as_str()).collect();
    let mut columns: [Vec<&str>; 3] = Default::default();
    for node in called.union(&calling) {
        let column = match (calling.contains(node), called.contains(node)) {
            (true, false) => 0,
            (true, true) => 1,
            _ => 2,
        };
        columns[column].push(node);
    }
    // Each column in the order of the average row of what calls into it.
    for i in 1..3 {
        let (done, rest) = columns.split_at_mut(i);
        let before: Vec<&str> = done.iter().flatten().copied().collect();
        let row = |n: &str| {
            let rows: Vec<f64> = graph
                .keys()
                .filter(|(_, d)| d == n)
                .filter_map(|(c, _)| before.iter().position(|b| b == c).map(|p| p as f64))
                .collect();
            if rows.is_empty() { f64::MAX } else { rows.iter().sum::<f64>() / rows.len() as f64 }
        };
        rest[0].sort_by(|a, b| row(a).total_cmp(&row(b)));
    }
    let (col_w, row_h, node_w, node_h, top) = (520.0, 78.0, 200.0, 40.0, 80.0);
    let rows = columns.iter().map(Vec::len).max().unwrap_or(1).max(1) as f64;
    // Calls within the middle column are arcs on its right, their labels in
    // a lane before the last column's.
    let arcs: Vec<(&str, &str)> = graph
        .keys()
        .map(|(c, d)| (c.as_str(), d.as_str()))
        .filter(|(c, d)| columns[1].contains(c) && columns[1].contains(d))
        .collect();
    let lane = if arcs.is_empty() { 0.0 } else { 60.0 + arcs.len() as f64 * 20.0 + 240.0 };
    let x_of = [30.0, 30.0 + col_w, 30.0 + 2.0 * col_w + lane];
    let (width, height) = (x_of[2] + node_w + 30.0, top + rows * row_h + 20.0);
    let mut at: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for (i, nodes) in columns.iter().enumerate() {
        // Centred in the height of the tallest column.
        let offset = (rows - nodes.len() as f64) * row_h / 2.0;
        for (j, n) in nodes.iter().enumerate() {
            at.insert(n, (x_of[i], top + offset + j as f64 * row_h));
        }
    }
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto\">\
         <path d=\"M0,0 L10,5 L0,10 z\" fill=\"#555\"/></marker></defs>\n\
         <text x=\"30\" y=\"28\" font-size=\"16\" font-weight=\"bold\">{}</text>\n\
         <text x=\"30\" y=\"48\" fill=\"#555\">each edge: calls (requests, else TCP connections) and their rate over {secs:.1} s · share of 5xx · \
         green: mTLS, orange: plaintext on some hop (one node, or outside the mesh)</text>\n",
        escape(title)
    );
    let mut labels = String::new();
    // Where each edge meets its nodes, spread along their sides in the
    // order of the other ends, and on which end its label sits: the end
    // with fewer edges, its labels stacked in the same order.
    let order = |ends: &mut Vec<(&str, &str)>, by_caller: bool| {
        ends.sort_by(|a, b| {
            let key = |e: &(&str, &str)| at[if by_caller { e.0 } else { e.1 }].1;
            key(a).total_cmp(&key(b))
        })
    };
    let slot = |list: &[(&str, &str)], edge: (&str, &str)| {
        let i = list.iter().position(|e| *e == edge).unwrap_or(0) as f64;
        i - (list.len() as f64 - 1.0) / 2.0
    };
    let ends = |node: &str, incoming: bool| {
        let mut list: Vec<(&str, &str)> = graph
            .keys()
            .map(|(c, d)| (c.as_str(), d.as_str()))
            .filter(|(c, d)| if incoming { *d == node } else { *c == node })
            .collect();
        order(&mut list, incoming);
        list
    };
    for ((c, d), e) in graph {
        let edge = (c.as_str(), d.as_str());
        let ((x1, y1), (x2, y2)) = (at[edge.0], at[edge.1]);
        let (outs, ins) = (ends(edge.0, false), ends(edge.1, true));
        let sy = y1 + node_h / 2.0 + slot(&outs, edge) * 5.0;
        let ey = y2 + node_h / 2.0 + slot(&ins, edge) * 5.0;
        let colour = if e.plaintext { "#e08a00" } else { "#2e8b57" };
        // Within a column (callers that are also called): an arc on its right.
        let (path, lx, ly, anchor) = if x1 == x2 {
            // Each arc its own width, so that arcs and labels do not meet.
            let k = arcs.iter().position(|a| *a == edge).unwrap_or(0) as f64;
            let (sx, bulge) = (x1 + node_w, x1 + node_w + 40.0 + k * 20.0);
            let path = format!("M{sx},{sy} C{bulge},{sy} {bulge},{ey} {sx},{ey}");
            let label_x = x1 + node_w + 60.0 + arcs.len() as f64 * 20.0;
            (path, label_x, (sy + ey) / 2.0 + if sy > ey { -3.0 } else { 11.0 }, "start")
        } else {
            let (sx, ex) = (x1 + node_w, x2);
            let mid = (sx + ex) / 2.0;
            let path = format!("M{sx},{sy} C{mid},{sy} {mid},{ey} {ex},{ey}");
            if ins.len() <= outs.len() {
                (path, ex - 10.0, y2 + node_h / 2.0 + slot(&ins, edge) * 14.0 - 4.0, "end")
            } else {
                (path, sx + 10.0, y1 + node_h / 2.0 + slot(&outs, edge) * 14.0 - 4.0, "start")
            }
        };
        out += &format!(
            "<path d=\"{path}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" marker-end=\"url(#arrow)\"/>\n"
        );
        let calls = if e.requests > 0.0 {
            format!("{} req, {:.1}/s", e.requests, e.requests / secs)
        } else {
            format!("{} conn, {:.1}/s", e.connections, e.connections / secs)
        };
        let errors = if e.requests > 0.0 {
            format!(" · {:.0}% 5xx", 100.0 * e.server_errors / e.requests)
        } else {
            String::new()
        };
        let security = match (e.mtls, e.plaintext) {
            (true, false) => " · mTLS",
            (true, true) => " · mTLS + plaintext",
            _ => " · plaintext",
        };
        let error_colour = if e.server_errors > 0.0 { "#c0392b" } else { "#333" };
        labels += &format!(
            "<text x=\"{lx}\" y=\"{ly}\" text-anchor=\"{anchor}\" fill=\"{error_colour}\" stroke=\"white\" stroke-width=\"3\" paint-order=\"stroke\">{calls}{errors}{security}</text>\n"
        );
    }
    for (node, (x, y)) in &at {
        let (name, ns) = node.split_once('\n').unwrap_or((node, ""));
        out += &format!(
            "<rect x=\"{x}\" y=\"{y}\" width=\"{node_w}\" height=\"{node_h}\" rx=\"8\" fill=\"#eef3fb\" stroke=\"#4a6fa5\"/>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-weight=\"bold\" font-size=\"12\">{}</text>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\" font-size=\"10\">{}</text>\n",
            x + node_w / 2.0,
            y + 17.0,
            escape(name),
            x + node_w / 2.0,
            y + 32.0,
            escape(ns)
        );
    }
    out + &labels + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = "istio_requests_total{response_code=\"200\",reporter=\"source\",source_workload=\"test\",source_workload_namespace=\"demo\",destination_workload=\"hello\",destination_workload_namespace=\"demo\",destination_service=\"hello.demo.svc.cluster.local\",destination_service_name=\"hello\",destination_service_namespace=\"demo\",connection_security_policy=\"mutual_tls\"} 8\n\
        istio_requests_total{response_code=\"503\",reporter=\"source\",source_workload=\"test\",source_workload_namespace=\"demo\",destination_workload=\"hello\",destination_workload_namespace=\"demo\",destination_service=\"hello.demo.svc.cluster.local\",destination_service_name=\"hello\",destination_service_namespace=\"demo\",connection_security_policy=\"mutual_tls\"} 2\n";
    const DEST: &str = "istio_requests_total{response_code=\"200\",reporter=\"destination\",source_workload=\"test\",source_workload_namespace=\"demo\",destination_workload=\"hello\",destination_workload_namespace=\"demo\",destination_service=\"hello.demo.svc.cluster.local\",destination_service_name=\"hello\",destination_service_namespace=\"demo\",connection_security_policy=\"mutual_tls\"} 8\n\
        istio_requests_total{response_code=\"200\",reporter=\"destination\",source_workload=\"unknown\",source_workload_namespace=\"unknown\",destination_workload=\"hello\",destination_workload_namespace=\"demo\",destination_service=\"hello.demo.svc.cluster.local\",destination_service_name=\"hello\",destination_service_namespace=\"demo\",connection_security_policy=\"none\"} 3\n";

    #[test]
    fn each_call_counts_once_and_outside_clients_come_from_the_destination() {
        let g = from_metrics(&[SOURCE.to_owned(), DEST.to_owned()]);
        let mesh = &g[&("test\ndemo".to_owned(), "hello\ndemo".to_owned())];
        assert_eq!((mesh.requests, mesh.server_errors, mesh.mtls, mesh.plaintext), (10.0, 2.0, true, false));
        let outside = &g[&("unknown\noutside the mesh".to_owned(), "hello\ndemo".to_owned())];
        assert_eq!((outside.requests, outside.plaintext), (3.0, true));
        assert_eq!(g.len(), 2);
        let svg = svg(&g, 10.0, "demo");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("10 req, 1.0/s · 20% 5xx · mTLS"), "{svg}");
        assert!(svg.contains("3 req, 0.3/s · 0% 5xx · plaintext"), "{svg}");
    }
}
