//! The tools' outputs read into samples; pure functions, tested on the
//! tools' own output.
use super::*;

pub(super) fn json(text: &str) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(text).with_context(|| format!("not JSON: {}", text.chars().take(300).collect::<String>()))
}

/// `123.45us`, `1.23ms`, `1.2s` → milliseconds.
pub(super) fn parse_h2load_time(s: &str) -> f64 {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => f64::NAN,
    }
}

/// iperf3 `-J`: received bits/s, as Gbit/s.
pub(super) fn parse_iperf(out: &str) -> anyhow::Result<Sample> {
    let v = json(out)?;
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3: no sum_received")?;
    Ok(BTreeMap::from([("gbit_per_s", bps / 1e9)]))
}

/// sockperf ping-pong: p50 and p99 round trip (µs).
pub(super) fn parse_sockperf(out: &str) -> anyhow::Result<Sample> {
    let pct = |p: &str| {
        out.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    // sockperf reports half the round trip; the round trip is twice that.
    let p50 = pct("50.000").context("sockperf: no p50")? * 2.0;
    let p99 = pct("99.000").context("sockperf: no p99")? * 2.0;
    Ok(BTreeMap::from([("p50_us", p50), ("p99_us", p99)]))
}

/// oha `--output-format json`: rate, latency percentiles (ms), success.
pub(super) fn parse_oha(out: &str) -> anyhow::Result<Sample> {
    let j = json(out)?;
    let summary = &j["summary"];
    let ok = summary["successRate"].as_f64().unwrap_or(0.0);
    let p = |k: &str| j["latencyPercentiles"][k].as_f64().map(|s| s * 1000.0).unwrap_or(f64::NAN);
    let codes = &j["statusCodeDistribution"];
    let good = codes["200"].as_f64().unwrap_or(0.0);
    let total: f64 = codes.as_object().map(|m| m.values().filter_map(|v| v.as_f64()).sum()).unwrap_or(0.0);
    Ok(BTreeMap::from([
        ("rps", summary["requestsPerSec"].as_f64().unwrap_or(0.0)),
        ("p50_ms", p("p50")),
        ("p90_ms", p("p90")),
        ("p99_ms", p("p99")),
        ("p99.9_ms", p("p99.9")),
        ("success", ok),
        ("non_200", total - good),
    ]))
}

/// h2load's summary: rate, mean request time (ms), failed requests.
pub(super) fn parse_h2load(out: &str) -> anyhow::Result<Sample> {
    let rps = out
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|s| s.trim().split(' ').next())
        .and_then(|s| s.parse::<f64>().ok())
        .context("h2load: no req/s")?;
    let failed = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| l.split(',').find(|p| p.contains("failed")))
        .and_then(|p| p.trim().split(' ').next())
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    let mean = out
        .lines()
        .find(|l| l.starts_with("time for request:"))
        .and_then(|l| l.split_whitespace().nth(5))
        .map(parse_h2load_time)
        .unwrap_or(f64::NAN);
    Ok(BTreeMap::from([("rps", rps), ("mean_ms", mean), ("failed", failed)]))
}

#[cfg(test)]
mod tests {
    //! Each parser on its tool's own output (captured from the versions
    //! `cargo xtask setup` installs), and on output it must refuse.
    use super::*;

    const SOCKPERF: &str = "\
sockperf: [Valid Duration] RunTime=0.548 sec; SentMessages=549; ReceivedMessages=549
sockperf: Summary: Latency is 32.777 usec
sockperf: ---> <MAX> observation = 1442.876
sockperf: ---> percentile 99.999 = 1442.876
sockperf: ---> percentile 99.900 =  380.818
sockperf: ---> percentile 99.000 =   53.369
sockperf: ---> percentile 90.000 =   32.067
sockperf: ---> percentile 50.000 =   29.203
sockperf: ---> <MIN> observation =    6.965
";

    const OHA: &str = r#"{"summary": {"successRate": 1.0, "total": 1.001489667, "requestsPerSec": 980.5393229284311},
"latencyPercentiles": {"p10": 0.00108694, "p50": 0.002123656, "p90": 0.00269957, "p99": 0.003571652, "p99.9": 0.004011704},
"statusCodeDistribution": {"200": 970, "503": 10}}"#;

    const H2LOAD: &str = "\
finished in 2.00s, 15890.50 req/s, 1.05MB/s
requests: 31781 total, 31781 started, 31781 done, 31779 succeeded, 2 failed, 2 errored, 0 timeout
status codes: 31779 2xx, 0 3xx, 0 4xx, 0 5xx
                     min         max         mean         sd        +/- sd
time for request:      263us     12.91ms      4.01ms      1.17ms    72.52%
";

    const IPERF: &str = r#"{"end": {"sum_received": {"start": 0, "end": 1.00026, "bytes": 3561226240,
"bits_per_second": 28482404494.831345, "sender": true}}}"#;

    /// A tool, what its parser made of its output, and numbers that must be in it.
    type Case<'a> = (&'a str, anyhow::Result<Sample>, &'a [(&'a str, f64)]);

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6 * b.abs().max(1.0)
    }

    #[test]
    fn reads_each_tools_output() {
        let cases: [Case<'_>; 4] = [
            ("sockperf", parse_sockperf(SOCKPERF), &[("p50_us", 58.406), ("p99_us", 106.738)]),
            (
                "oha",
                parse_oha(OHA),
                &[("rps", 980.5393229284311), ("p50_ms", 2.123656), ("p99.9_ms", 4.011704), ("non_200", 10.0)],
            ),
            ("h2load", parse_h2load(H2LOAD), &[("rps", 15890.5), ("mean_ms", 4.01), ("failed", 2.0)]),
            ("iperf3", parse_iperf(IPERF), &[("gbit_per_s", 28.482404494831345)]),
        ];
        for (tool, got, want) in cases {
            let got = got.unwrap_or_else(|e| panic!("{tool}: {e:#}"));
            for (key, value) in want {
                assert!(close(got[key], *value), "{tool} {key}: {} (want {value})", got[key]);
            }
        }
    }

    #[test]
    fn refuses_output_without_the_numbers() {
        assert!(parse_sockperf("sockperf: connection refused").is_err());
        assert!(parse_h2load("no servers could be reached").is_err());
        assert!(parse_iperf("{\"error\": \"unable to connect\"}").is_err());
        assert!(parse_oha("oha: error").is_err());
    }

    #[test]
    fn h2load_times_in_milliseconds() {
        for (text, ms) in [("263us", 0.263), ("12.91ms", 12.91), ("1.5s", 1500.0)] {
            assert!(close(parse_h2load_time(text), ms), "{text}");
        }
        assert!(parse_h2load_time("12min").is_nan());
    }
}
