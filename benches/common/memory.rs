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

/// A field of /proc/<pid>/status given in kB (`RssAnon:`, `RssFile:`, ...), in bytes.
#[allow(dead_code, reason = "density splits the RSS; other benches read the total")]
pub fn status_bytes(pid: i32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// A field of /proc/<pid>/smaps_rollup given in kB (`AnonHugePages:`, ...), in bytes.
#[allow(dead_code, reason = "density reads huge pages; other benches read the total")]
pub fn smaps_rollup_bytes(pid: i32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}
