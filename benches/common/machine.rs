//! Machine-wide CPU time from /proc/stat: task time and irq+softirq time, in all and per CPU.
//! On loopback much of a delivery's cost is softirq work that no process's utime+stime shows,
//! and other processes' CPU tells whether the machine was quiet during a step.

use super::cpu::clk_tck;

/// Machine-wide CPU seconds from /proc/stat, all CPUs.
pub struct MachineCpu {
    /// user + nice + system + steal.
    #[allow(
        dead_code,
        reason = "fanout reads it (other processes' share); heartbeat does not"
    )]
    pub task: f64,
    /// irq + softirq. With IRQ time accounting (this kernel has it) softirq
    /// work, e.g. loopback TCP receive processing done while a process sends, is
    /// in the irq bucket and not in any process's utime+stime.
    pub irq: f64,
    /// irq + softirq of each CPU (`cpuN` lines).
    #[allow(dead_code, reason = "heartbeat prints it; fanout does not")]
    pub irq_per_cpu: Vec<f64>,
}

/// Reads /proc/stat once.
pub fn machine_cpu() -> MachineCpu {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let tck = clk_tck();
    let fields = |l: &str| -> Vec<u64> {
        l.split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0))
            .collect()
    };
    let g = |f: &[u64], i: usize| f.get(i).copied().unwrap_or(0);
    let all = fields(s.lines().next().unwrap_or(""));
    MachineCpu {
        task: (g(&all, 0) + g(&all, 1) + g(&all, 2) + g(&all, 7)) as f64 / tck,
        irq: (g(&all, 5) + g(&all, 6)) as f64 / tck,
        irq_per_cpu: s
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .map(|l| {
                let f = fields(l);
                (g(&f, 5) + g(&f, 6)) as f64 / tck
            })
            .collect(),
    }
}
