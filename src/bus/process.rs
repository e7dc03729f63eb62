//! This process's resource use as Centrifugo's `info` shows it per node (`process`: `cpu`, a
//! percentage of one core, and `rss`, bytes), read from `/proc/self`.
//!
//! CPU is measured between two readings at least [`MIN_SAMPLE_GAP`] apart: the first reading
//! after start covers the whole life of the process, later ones the time since the previous
//! reading (a call sooner than the gap gets the previous figure again, so frequent `info`
//! calls and the lease refresh do not shrink the window to nothing). Any thread may call it;
//! the state is one short `Mutex` held for two small file reads at most.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The shortest window a CPU figure is measured over.
pub const MIN_SAMPLE_GAP: Duration = Duration::from_secs(1);

/// The last CPU reading and the figure it gave.
#[derive(Debug, Default)]
pub struct CpuSampler {
    last: Mutex<Option<Sample>>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    /// user + system time of the process, clock ticks.
    ticks: u64,
    /// The figure measured up to `at`, percent of one core.
    percent: f64,
}

/// The process figures of one node, as `info` shows them.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ProcessStats {
    /// CPU use, percent of one core (over 100 when several cores are busy).
    pub cpu: f64,
    /// Resident set size, bytes.
    pub rss: u64,
}

impl CpuSampler {
    /// The process's CPU use and RSS now; `None` where `/proc` cannot be read.
    pub fn stats(&self) -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let (ticks, start_ticks) = parse_stat(&stat)?;
        let rss = rss_bytes()?;
        let hz = clock_ticks_per_sec();
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let percent = match *last {
            Some(prev) if now.duration_since(prev.at) < MIN_SAMPLE_GAP => prev.percent,
            Some(prev) => {
                let secs = now.duration_since(prev.at).as_secs_f64();
                percent(ticks.saturating_sub(prev.ticks), hz, secs)
            }
            None => {
                // Since the process started: its age is the system's uptime minus its start.
                let uptime = std::fs::read_to_string("/proc/uptime")
                    .ok()
                    .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok())
                    .unwrap_or(0.0);
                let age = uptime - start_ticks as f64 / hz as f64;
                percent(ticks, hz, age)
            }
        };
        *last = Some(Sample {
            at: now,
            ticks,
            percent,
        });
        Some(ProcessStats { cpu: percent, rss })
    }
}

fn percent(ticks: u64, hz: u64, secs: f64) -> f64 {
    if secs <= 0.0 || hz == 0 {
        return 0.0;
    }
    let p = ticks as f64 / hz as f64 / secs * 100.0;
    // Two decimals are all a reader needs.
    (p * 100.0).round() / 100.0
}

/// `utime + stime` and `starttime` (fields 14, 15 and 22, clock ticks) of a `/proc/PID/stat`
/// line. The command name (field 2) may hold spaces and parentheses: fields are counted after
/// its last `)`.
fn parse_stat(line: &str) -> Option<(u64, u64)> {
    let rest = &line[line.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((field(14)? + field(15)?, field(22)?))
}

/// Resident set size from `/proc/self/statm` (pages) in bytes.
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(1) as u64)
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // pid (comm with ") x") state ppid ... utime=14 stime=15 ... starttime=22
        let line = "42 (a) b) c) S 1 2 3 4 5 6 7 8 9 10 111 222 13 14 15 16 17 18 999 20";
        assert_eq!(parse_stat(line), Some((333, 999)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_reports_its_rss_and_a_cpu_figure_that_grows_with_work() {
        let sampler = CpuSampler::default();
        let first = sampler.stats().expect("procfs");
        assert!(first.rss > 1 << 20, "{first:?}");
        assert!(first.cpu >= 0.0);
        // Within the gap: the same figure.
        assert_eq!(sampler.stats().unwrap().cpu, first.cpu);
        // Past the gap, after busy work on this thread: a positive figure.
        let end = Instant::now() + MIN_SAMPLE_GAP + Duration::from_millis(100);
        let mut x = 0u64;
        while Instant::now() < end {
            x = x.wrapping_mul(31).wrapping_add(std::hint::black_box(7));
        }
        std::hint::black_box(x);
        let busy = sampler.stats().unwrap();
        assert!(busy.cpu > 20.0, "{busy:?}");
    }
}
