//! The standard `process_*` metrics of Prometheus's client libraries (the
//! names and meanings of the Go and Python clients' process collectors), read
//! from `/proc/self` on each scrape, and Istio's `istio_build`.
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

/// Reads `/proc/self` when scraped; a file that cannot be read leaves its
/// metrics out of that scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

/// What one scrape reads of the process.
#[derive(Debug, Default, PartialEq)]
pub struct Sample {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    /// Seconds since the Unix epoch.
    pub start_time: f64,
}

impl Sample {
    /// Parses `/proc/self/stat` (`stat`) with the clock tick rate, the page
    /// size and the boot time (seconds since the epoch, from `/proc/stat`).
    pub fn parse(stat: &str, ticks_per_second: f64, page_size: u64, boot_time: u64) -> Option<Self> {
        // The command name (field 2) may hold spaces and parentheses: the
        // fields that follow start after its last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `fields[0]` is field 3 (state): field N is `fields[N - 3]`.
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        let ticks = (field(14)? + field(15)?) as f64;
        Some(Self {
            cpu_seconds: ticks / ticks_per_second,
            start_time: boot_time as f64 + field(22)? as f64 / ticks_per_second,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page_size,
        })
    }

    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let boot_time = boot.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
        // SAFETY: sysconf only reads a configuration value.
        let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        Self::parse(&stat, ticks.max(1) as f64, page.max(1) as u64, boot_time)
    }
}

fn open_fds() -> Option<i64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as i64)
}

fn max_fds() -> Option<i64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid out-pointer for the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then(|| i64::try_from(limit.rlim_cur).unwrap_or(i64::MAX))
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(s) = Sample::read() {
            let cpu = ConstCounter::new(s.cpu_seconds);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                cpu.metric_type(),
            )?)?;
            let gauges = [
                ("process_resident_memory_bytes", "Resident memory size in bytes.", s.resident_bytes as f64),
                ("process_virtual_memory_bytes", "Virtual memory size in bytes.", s.virtual_bytes as f64),
                ("process_start_time_seconds", "Start time of the process since unix epoch in seconds.", s.start_time),
            ];
            for (name, help, value) in gauges {
                let g = ConstGauge::new(value);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        let fds = [
            ("process_open_fds", "Number of open file descriptors.", open_fds()),
            ("process_max_fds", "Maximum number of open file descriptors.", max_fds()),
        ];
        for (name, help, value) in fds {
            if let Some(v) = value {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Sample;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A command name with a space and a parenthesis, as a process may
        // set it; utime 250 and stime 50 ticks, started 1000 ticks after
        // boot, 40 MiB virtual, 1000 pages resident.
        let stat = "4242 (mesh (agent) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 9 0 1000 \
                    41943040 1000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let s = Sample::parse(stat, 100.0, 4096, 1_700_000_000).expect("parsed");
        assert_eq!(
            s,
            Sample {
                cpu_seconds: 3.0,
                resident_bytes: 4_096_000,
                virtual_bytes: 41_943_040,
                start_time: 1_700_000_010.0
            }
        );
        assert_eq!(Sample::parse("4242 (no fields)", 100.0, 4096, 0), None);
    }
}
