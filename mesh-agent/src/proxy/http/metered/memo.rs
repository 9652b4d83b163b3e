//! The series a connection's last request was counted in, kept with the
//! connection: the next request with the same labels (nearly every one: a
//! connection's peers, Service and security do not change, and most
//! responses are alike) is counted without finding its four series again,
//! each a hash of some 25 label values and a lock on the registry's map.
use std::sync::Mutex;

use prometheus_client::metrics::{counter::Counter, histogram::Histogram};

use crate::{
    state::telemetry::MetricSet,
    telemetry::{Metrics, RequestLabels, TcpLabels},
};

/// Per downstream connection; shared by its requests (HTTP/2's run at once).
#[derive(Debug, Default)]
pub struct Memo(Mutex<Option<Series>>);

#[derive(Debug)]
struct Series {
    labels: RequestLabels,
    off: MetricSet,
    count: Option<Counter>,
    duration: Option<Histogram>,
    request: Option<Histogram>,
    response: Option<Histogram>,
}

/// One finished request, as its metrics record it.
pub(super) struct Counted<'a> {
    pub tcp: &'a TcpLabels,
    pub status: u16,
    pub grpc_status: &'static str,
    /// The metrics the Telemetries leave out.
    pub off: MetricSet,
    pub ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

impl Series {
    /// Finds (or makes) the series of `labels`, those `off` leaves out aside.
    fn find(m: &Metrics, labels: RequestLabels, off: MetricSet) -> Series {
        let on = |metric| !off.contains(metric);
        Series {
            count: on(MetricSet::REQUEST_COUNT).then(|| m.requests.get_or_create(&labels).clone()),
            duration: on(MetricSet::REQUEST_DURATION).then(|| m.request_duration.get_or_create(&labels).clone()),
            request: on(MetricSet::REQUEST_SIZE).then(|| m.request_bytes.get_or_create(&labels).clone()),
            response: on(MetricSet::RESPONSE_SIZE).then(|| m.response_bytes.get_or_create(&labels).clone()),
            labels,
            off,
        }
    }

    fn is(&self, c: &Counted<'_>) -> bool {
        let l = &self.labels;
        self.off == c.off
            && l.response_code == c.status
            && l.grpc_response_status == c.grpc_status
            && l.connection == *c.tcp
    }

    fn count(&self, c: &Counted<'_>) {
        if let Some(n) = &self.count {
            n.inc();
        }
        if let Some(h) = &self.duration {
            h.observe(c.ms);
        }
        if let Some(h) = &self.request {
            h.observe(c.request_bytes as f64);
        }
        if let Some(h) = &self.response {
            h.observe(c.response_bytes as f64);
        }
    }
}

impl Memo {
    /// Counts a request in Istio's four request metrics: in the series the
    /// connection's last request was counted in when its labels are the
    /// same, else in those of its own labels, which are kept for the next.
    pub(super) fn count(&self, m: &Metrics, c: &Counted<'_>) {
        let labels = || RequestLabels {
            response_code: c.status,
            grpc_response_status: c.grpc_status,
            connection: c.tcp.clone(),
        };
        let Ok(mut last) = self.0.lock() else {
            // A panic while holding it cannot leave a wrong series (each
            // is set whole), but do without rather than rely on that.
            return Series::find(m, labels(), c.off).count(c);
        };
        match &*last {
            Some(s) if s.is(c) => s.count(c),
            _ => {
                let s = Series::find(m, labels(), c.off);
                s.count(c);
                *last = Some(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Label;

    fn tcp(source: &str) -> TcpLabels {
        let mut t = TcpLabels::black_hole(None);
        t.source_workload = Label(source.into());
        t.request_protocol = "http";
        t
    }

    fn counted<'a>(tcp: &'a TcpLabels, status: u16, off: MetricSet) -> Counted<'a> {
        Counted { tcp, status, grpc_status: "-", off, ms: 1.0, request_bytes: 10, response_bytes: 20 }
    }

    #[test]
    fn each_request_lands_in_its_own_series_whatever_the_last_one_was() {
        let m = Metrics::new();
        let memo = Memo::default();
        let (a, b) = (tcp("a"), tcp("b"));
        let all = MetricSet::NONE;
        for c in [
            counted(&a, 200, all),
            counted(&a, 200, all),
            counted(&a, 503, all),
            counted(&b, 200, all),
            counted(&a, 200, all),
            // Durations off for this one (a Telemetry changed meanwhile).
            counted(&a, 200, MetricSet::REQUEST_DURATION),
        ] {
            memo.count(&m, &c);
        }
        let text = m.encode();
        let series = |name: &str, source: &str, code: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with(name)
                        && l.contains(&format!("source_workload=\"{source}\""))
                        && l.contains(&format!("response_code=\"{code}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(series("istio_requests_total{", "a", "200").as_deref(), Some("4"), "{text}");
        assert_eq!(series("istio_requests_total{", "a", "503").as_deref(), Some("1"));
        assert_eq!(series("istio_requests_total{", "b", "200").as_deref(), Some("1"));
        assert_eq!(series("istio_request_duration_milliseconds_count{", "a", "200").as_deref(), Some("3"));
        assert_eq!(series("istio_response_bytes_sum{", "a", "200").as_deref(), Some("80.0"));
    }
}
