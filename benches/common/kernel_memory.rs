//! Kernel memory figures from /proc: /proc/meminfo, TCP buffer pages (/proc/net/sockstat) and
//! slab caches (/proc/slabinfo, root only): what the kernel holds for each socket, sampled
//! between the stages of the density measurement.

use std::collections::HashMap;

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n >= 1 => n as u64,
        _ => 4096,
    }
}

/// /proc/meminfo as key → bytes.
pub fn meminfo() -> HashMap<String, u64> {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let mut it = v.split_whitespace();
            let n: u64 = it.next()?.parse().ok()?;
            let mult = if it.next() == Some("kB") { 1024 } else { 1 };
            Some((k.to_string(), n * mult))
        })
        .collect()
}

/// /proc/net/sockstat "TCP: ... mem N" in bytes (N is in pages).
pub fn sockstat_tcp_mem_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    for l in s.lines() {
        if let Some(rest) = l.strip_prefix("TCP:") {
            let f: Vec<&str> = rest.split_whitespace().collect();
            for w in f.windows(2) {
                if w[0] == "mem" {
                    return w[1].parse::<u64>().unwrap_or(0) * page_size();
                }
            }
        }
    }
    0
}

/// /proc/slabinfo: cache name → bytes held in objects (num_objs × objsize).
/// Empty if not readable (non-root).
pub fn slabinfo() -> HashMap<String, u64> {
    let s = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    s.lines()
        .skip(2)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let num: u64 = f.get(2)?.parse().ok()?;
            let size: u64 = f.get(3)?.parse().ok()?;
            Some((f[0].to_string(), num * size))
        })
        .collect()
}
