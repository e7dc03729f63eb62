//! CPU time per process, read from /proc and getrusage: a server's utime+stime (clock-tick
//! resolution) and schedstat on-CPU nanoseconds over all its threads, and the bench's own.
//! Sampled before and after a measurement window; the caller subtracts.

fn sysconf_or(name: libc::c_int, default: u64) -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(name) };
    if n < 1 {
        default
    } else {
        n as u64
    }
}

pub fn online_cpus() -> usize {
    sysconf_or(libc::_SC_NPROCESSORS_ONLN, 1) as usize
}

pub fn clk_tck() -> f64 {
    sysconf_or(libc::_SC_CLK_TCK, 100) as f64
}

/// utime+stime of a whole process, in seconds (from /proc/<pid>/stat).
pub fn cpu_secs(pid: i32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // fields after ")" start at field 3 (state); utime = field 14, stime = 15.
    let ut: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let st: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    (ut + st) as f64 / clk_tck()
}

/// Sum of on-CPU nanoseconds over all live threads (/proc/<pid>/task/*/schedstat).
/// Finer-grained cross-check of [`cpu_secs`] (which has clock-tick resolution).
pub fn sched_ns(pid: i32) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in rd.flatten() {
            if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
                total += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
}

/// CPU seconds (user+sys) used by this process so far.
pub fn self_cpu_secs() -> f64 {
    // SAFETY: rusage is plain data.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// One thread of this process: (utime+stime in seconds, on-CPU nanoseconds from schedstat),
/// from /proc/self/task/<tid>/ (the same sources as [`cpu_secs`] and [`sched_ns`]).
#[allow(dead_code, reason = "fanout's floor thread; other benches measure processes")]
pub fn thread_cpu(tid: i32) -> (f64, u64) {
    let dir = format!("/proc/self/task/{tid}");
    let s = std::fs::read_to_string(format!("{dir}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ut: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let st: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    let ns = std::fs::read_to_string(format!("{dir}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    ((ut + st) as f64 / clk_tck(), ns)
}

/// Context switches (voluntary + involuntary) summed over all live threads of `pid`, from
/// /proc/<pid>/task/*/status: every wake-up of a thread that had parked is one voluntary
/// switch, so the delta over a measurement counts the process's wake-ups.
#[allow(dead_code, reason = "fanout's --redis-cost; other benches do not count wake-ups")]
pub fn ctx_switches(pid: i32) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in rd.flatten() {
            let st = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            for l in st.lines() {
                if let Some(v) = l
                    .strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                {
                    total += v.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    total
}

/// On-CPU nanoseconds (schedstat) of the live threads of `pid` by role: shard executors
/// (`shardcast-shard-*`), the broker thread (`shardcast-broke*`) and every other thread.
#[allow(dead_code, reason = "fanout's --redis-cost; other benches measure whole processes")]
pub fn sched_ns_by_role(pid: i32) -> [u64; 3] {
    let mut out = [0; 3];
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in rd.flatten() {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            let ns = std::fs::read_to_string(e.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
            let role = if comm.starts_with("shardcast-shard") {
                0
            } else if comm.starts_with("shardcast-broke") {
                1
            } else {
                2
            };
            out[role] += ns;
        }
    }
    out
}
