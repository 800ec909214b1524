//! Percentile summaries and the per-process CPU and memory readings from `/proc`.

use serde::Serialize;
use std::time::Duration;

/// p50, p95, p99 and max of a set of millisecond figures (all zero when there are none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(crate) struct Percentiles {
    pub(crate) p50: f64,
    pub(crate) p95: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    /// How many figures the summary is made of.
    pub(crate) n: usize,
}

impl Percentiles {
    /// Summarises microsecond figures as milliseconds (sorts `us` in place).
    pub(crate) fn from_us(us: &mut [u32]) -> Self {
        if us.is_empty() {
            return Self::default();
        }
        us.sort_unstable();
        // Nearest-rank percentile.
        let at = |p: f64| {
            let rank = ((p / 100.0) * us.len() as f64).ceil() as usize;
            ms(us[rank.clamp(1, us.len()) - 1])
        };
        Self {
            p50: at(50.0),
            p95: at(95.0),
            p99: at(99.0),
            max: ms(us[us.len() - 1]),
            n: us.len(),
        }
    }

    /// Each figure minus `ms` (not below zero).
    pub(crate) fn minus(&self, ms: f64) -> Self {
        let f = |v: f64| round3((v - ms).max(0.0));
        Self {
            p50: f(self.p50),
            p95: f(self.p95),
            p99: f(self.p99),
            max: f(self.max),
            n: self.n,
        }
    }
}

fn ms(us: u32) -> f64 {
    round3(f64::from(us) / 1000.0)
}

/// Rounds to three decimals (microseconds when the unit is milliseconds).
pub(crate) fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Saturating microseconds of a duration.
pub(crate) fn us(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// One reading of a process: CPU time used so far and resident memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ProcSample {
    /// User and kernel CPU seconds.
    pub(crate) cpu_s: f64,
    /// The kernel's part of them: system calls, and on loopback also the peer's receive path,
    /// which the sender's system call runs.
    pub(crate) kernel_s: f64,
    pub(crate) rss_mib: f64,
}

impl ProcSample {
    /// The readings of several processes taken together (the nodes of a cluster).
    pub(crate) fn sum(samples: &[Self]) -> Self {
        samples.iter().fold(
            Self {
                cpu_s: 0.0,
                kernel_s: 0.0,
                rss_mib: 0.0,
            },
            |a, b| Self {
                cpu_s: a.cpu_s + b.cpu_s,
                kernel_s: a.kernel_s + b.kernel_s,
                rss_mib: a.rss_mib + b.rss_mib,
            },
        )
    }
}

/// `USER_HZ`: the unit of `utime`/`stime` in `/proc/<pid>/stat`. The kernel reports these in
/// USER_HZ, which is 100 on every Linux architecture we run on.
const USER_HZ: f64 = 100.0;

impl ProcSample {
    /// Reads `/proc/<pid>/stat` (user + system CPU) and `/proc/<pid>/status` (`VmRSS`).
    pub(crate) fn read(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let (user_s, kernel_s) = parse_stat_cpu(&stat)?;
        Some(Self {
            cpu_s: user_s + kernel_s,
            kernel_s,
            rss_mib: parse_status_rss_kib(&status)? / 1024.0,
        })
    }
}

/// CPU seconds the whole machine has been busy (all cores: everything but idle and iowait),
/// from the first line of `/proc/stat`. Compared with the bench's own processes it shows how
/// much of the machine other work took during a run.
pub(crate) fn machine_busy_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_busy(stat.lines().next()?)
}

fn parse_machine_busy(cpu_line: &str) -> Option<f64> {
    let mut fields = cpu_line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let v: Vec<f64> = fields.map(|f| f.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user]
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0.0);
    Some((total - idle) / USER_HZ)
}

/// The 1-minute load average.
pub(crate) fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// (utime, stime) in seconds. The command name (field 2) may hold spaces and parentheses, so
/// fields are counted after its closing parenthesis.
fn parse_stat_cpu(stat: &str) -> Option<(f64, f64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14, stime 15 (1-based over the whole line).
    let utime: f64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: f64 = fields.get(15 - 3)?.parse().ok()?;
    Some((utime / USER_HZ, stime / USER_HZ))
}

fn parse_status_rss_kib(status: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU and memory cost of one process over the measured window, per call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(crate) struct ProcCost {
    /// CPU seconds used per minute of one call.
    pub(crate) cpu_s_per_call_min: f64,
    /// The kernel's part of `cpu_s_per_call_min`.
    pub(crate) kernel_cpu_s_per_call_min: f64,
    /// Resident memory added per call (RSS under load minus RSS before the first call).
    pub(crate) rss_mib_per_call: f64,
    /// CPU use over the window in cores (1.0 = one core busy).
    pub(crate) cpu_cores: f64,
    /// RSS before the first call.
    pub(crate) rss_mib_idle: f64,
    /// RSS at the end of the window, all calls up.
    pub(crate) rss_mib_loaded: f64,
}

impl ProcCost {
    /// From readings at idle, at the start and at the end of a window of `window` with `calls`
    /// calls up.
    pub(crate) fn new(
        idle: ProcSample,
        start: ProcSample,
        end: ProcSample,
        window: Duration,
        calls: usize,
    ) -> Self {
        let cpu = (end.cpu_s - start.cpu_s).max(0.0);
        let kernel = (end.kernel_s - start.kernel_s).max(0.0);
        let call_min = calls as f64 * window.as_secs_f64() / 60.0;
        let per_call_min = |v: f64| if call_min > 0.0 { v / call_min } else { 0.0 };
        let per_call = |v: f64| if calls == 0 { 0.0 } else { v / calls as f64 };
        Self {
            cpu_s_per_call_min: round3(per_call_min(cpu)),
            kernel_cpu_s_per_call_min: round3(per_call_min(kernel)),
            rss_mib_per_call: round3(per_call((end.rss_mib - idle.rss_mib).max(0.0))),
            cpu_cores: round3(cpu / window.as_secs_f64().max(1e-9)),
            rss_mib_idle: round3(idle.rss_mib),
            rss_mib_loaded: round3(end.rss_mib),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let mut v: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        let p = Percentiles::from_us(&mut v);
        assert_eq!(
            (p.p50, p.p95, p.p99, p.max, p.n),
            (50.0, 95.0, 99.0, 100.0, 100)
        );
        assert_eq!(Percentiles::from_us(&mut []), Percentiles::default());
        assert_eq!(p.minus(60.0).p50, 0.0);
        assert_eq!(p.minus(1.0).p99, 98.0);
    }

    #[test]
    fn proc_files_parse() {
        let stat = "1234 (tel coflow) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 8 0 100 0 0";
        assert_eq!(parse_stat_cpu(stat), Some((2.5, 0.5)));
        assert_eq!(
            parse_status_rss_kib("Name:\tx\nVmRSS:\t   2048 kB\n"),
            Some(2048.0)
        );
        assert_eq!(
            parse_machine_busy("cpu  100 0 50 1000 30 0 0 0 0 0"),
            Some(1.5)
        );
        assert_eq!(parse_machine_busy("cpu0 1 2 3"), None);
        assert!(machine_busy_s().is_some() && loadavg().is_some());
        let me = ProcSample::read(std::process::id()).expect("own /proc entry");
        assert!(me.rss_mib > 0.0);
    }

    #[test]
    fn cost_per_call_minute() {
        let s = |cpu_s, kernel_s, rss_mib| ProcSample {
            cpu_s,
            kernel_s,
            rss_mib,
        };
        let c = ProcCost::new(
            s(0.0, 0.0, 10.0),
            s(1.0, 0.5, 20.0),
            s(4.0, 2.0, 30.0),
            Duration::from_secs(30),
            10,
        );
        // 3 CPU seconds, 1.5 of them in the kernel, over 10 calls x 0.5 min.
        assert_eq!(c.cpu_s_per_call_min, 0.6);
        assert_eq!(c.kernel_cpu_s_per_call_min, 0.3);
        assert_eq!(c.rss_mib_per_call, 2.0);
        assert_eq!(c.cpu_cores, 0.1);
    }
}
