//! The standard `process_*` metrics (CPU, memory, file descriptors, start
//! time) that every Prometheus client library exports, so the dashboards and
//! alerts people already have for other services work on tripline too.
//! `prometheus-client` has no such collector; this one reads `/proc/self` at
//! scrape time. Elsewhere than Linux there is no `/proc/self` and nothing is
//! exported.
//!
//! The names carry no `tripline_` prefix, as in every other exporter, so they
//! live in a registry of their own that [`crate::metrics`] encodes first.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// A registry holding only [`ProcessCollector`], without a prefix.
pub fn registry() -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ProcessCollector));
    registry
}

#[derive(Debug)]
struct ProcessCollector;

/// What one scrape read from `/proc`: the standard set, so existing
/// process dashboards and alerts work unchanged.
#[derive(Debug, PartialEq)]
struct Sample {
    /// User plus system time: `rate()` of it is the cores in use.
    cpu_seconds: f64,
    /// What the kernel must keep in RAM; the figure memory limits act on.
    resident_bytes: u64,
    /// Address space reserved, a sign of leaks that RSS hides.
    virtual_bytes: u64,
    /// Unix time the process started, for restart detection; unknown when
    /// `/proc/stat` is hidden (systemd's `ProcSubset=pid`).
    start_time_seconds: Option<f64>,
    /// OS threads: tokio's workers plus the blocking pool.
    threads: u64,
    /// Sockets and files in use; with `max_fds`, how close to the limit.
    open_fds: Option<u64>,
    /// The soft `RLIMIT_NOFILE`; unknown when unlimited.
    max_fds: Option<u64>,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = read_sample() else {
            return Ok(());
        };
        encoder
            .encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&s.cpu_seconds, None)?;
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                Some(s.resident_bytes as f64),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                Some(s.virtual_bytes as f64),
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                s.start_time_seconds,
            ),
            (
                "process_threads",
                "Number of OS threads in the process.",
                Some(s.threads as f64),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                s.open_fds.map(|n| n as f64),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                s.max_fds.map(|n| n as f64),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                encoder
                    .encode_descriptor(name, help, None, MetricType::Gauge)?
                    .encode_gauge(&value)?;
            }
        }
        Ok(())
    }
}

fn read_sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot_time = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| parse_boot_time(&s));
    // SAFETY: sysconf only reads a system constant.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let mut sample = parse_stat(&stat, ticks as f64, page.max(0) as u64, boot_time)?;
    sample.open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64);
    sample.max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| parse_max_fds(&s));
    Some(sample)
}

/// `/proc/self/stat`: fields after the command name, which is in
/// parentheses and may itself hold spaces and parentheses (proc(5)).
fn parse_stat(
    stat: &str,
    ticks_per_second: f64,
    page_bytes: u64,
    boot_time: Option<f64>,
) -> Option<Sample> {
    if ticks_per_second <= 0.0 {
        return None;
    }
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // proc(5) numbers the fields from 1 with the state as field 3.
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let user = field(14)?;
    let system = field(15)?;
    Some(Sample {
        cpu_seconds: (user + system) as f64 / ticks_per_second,
        threads: field(20)?,
        start_time_seconds: match boot_time {
            Some(boot) => Some(boot + field(22)? as f64 / ticks_per_second),
            None => None,
        },
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page_bytes,
        open_fds: None,
        max_fds: None,
    })
}

/// `btime` of `/proc/stat`: the boot time the process start time counts from.
fn parse_boot_time(stat: &str) -> Option<f64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit of "Max open files" in `/proc/self/limits`; none when
/// it is `unlimited`.
fn parse_max_fds(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_the_command_name() {
        // Fields 3.. of a real /proc/<pid>/stat; the name is hostile.
        let stat = "4242 (tri) line (x)) S 1 4242 4242 0 -1 4194560 1500 0 0 0 250 50 0 0 20 0 7 0 12345 104857600 2560 18446744073709551615 1 1 0 0 0 0 0 4096 17663 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0";
        let s = parse_stat(stat, 100.0, 4096, Some(1_700_000_000.0)).unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.resident_bytes, 2560 * 4096);
        assert_eq!(s.virtual_bytes, 104_857_600);
        assert_eq!(s.threads, 7);
        let started = s.start_time_seconds.unwrap();
        assert!((started - 1_700_000_123.45).abs() < 1e-3, "{s:?}");
        // Without /proc/stat (ProcSubset=pid) only the start time is unknown.
        let s = parse_stat(stat, 100.0, 4096, None).unwrap();
        assert_eq!((s.start_time_seconds, s.threads), (None, 7));
    }

    #[test]
    fn truncated_stat_is_no_sample() {
        assert_eq!(
            parse_stat("4242 (tripline) S 1 2 3", 100.0, 4096, None),
            None
        );
        assert_eq!(parse_stat("garbage", 100.0, 4096, None), None);
    }

    #[test]
    fn limits_soft_value_or_none_when_unlimited() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \nMax cpu time              unlimited            unlimited            seconds   \nMax open files            1024                 524288               files     \n";
        assert_eq!(parse_max_fds(limits), Some(1024));
        assert_eq!(
            parse_max_fds(
                "Max open files            unlimited            unlimited            files"
            ),
            None
        );
        assert_eq!(
            parse_boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000.0)
        );
    }

    #[test]
    fn this_process_is_measured() {
        let text = {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &registry()).unwrap();
            out
        };
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_start_time_seconds ",
            "process_open_fds ",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
        assert!(!text.contains("tripline_"), "{text}");
    }
}
