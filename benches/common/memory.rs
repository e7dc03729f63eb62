//! A process's memory: its resident set from /proc (smaps_rollup, else status), and MiB for the
//! output lines.

/// Resident set size in bytes: smaps_rollup `Rss`, else status `VmRSS`.
pub fn rss_bytes(pid: i32) -> u64 {
    let key_val = |path: String, key: &str| -> Option<u64> {
        let s = std::fs::read_to_string(path).ok()?;
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    key_val(format!("/proc/{pid}/smaps_rollup"), "Rss:")
        .or_else(|| key_val(format!("/proc/{pid}/status"), "VmRSS:"))
        .unwrap_or(0)
}

pub fn mib(b: f64) -> f64 {
    b / (1024.0 * 1024.0)
}
