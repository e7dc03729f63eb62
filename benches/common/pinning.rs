//! CPU pinning: the bench pins its own threads to the client CPUs (by default the last one),
//! away from the server's executor cores, and reports every thread's affinity so a reader can
//! check that the server, not the client, was the bottleneck.

use super::args::Args;
use super::safety::fatal;
use std::io;

/// `--client-cpus L` (comma-separated CPUs), default the last of `ncpu` CPUs.
pub fn client_cpus(args: &Args, ncpu: usize) -> Vec<usize> {
    match args.str("client-cpus") {
        Some(s) => s
            .split(',')
            .map(|c| {
                c.trim()
                    .parse()
                    .unwrap_or_else(|_| fatal(&format!("bad --client-cpus {s:?}")))
            })
            .collect(),
        None => vec![ncpu - 1],
    }
}

/// Pins every bench thread to `cpus` (fatal if that fails) and warns when they overlap the
/// server's executor cores `0..shards`.
pub fn pin_bench_threads(cpus: &[usize], shards: usize) {
    if let Err(e) = pin_all_threads(cpus) {
        fatal(&format!("sched_setaffinity({cpus:?}): {e}"));
    }
    if cpus.iter().any(|&c| c < shards) {
        println!(
            "# WARNING: client CPUs {cpus:?} overlap the server's pinned executor cores 0..{}",
            shards - 1
        );
    }
}

/// `(thread name, tid, Cpus_allowed_list)` for every thread of `pid`.
pub fn thread_affinities(pid: i32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in rd.flatten() {
            let tid = e.file_name().to_string_lossy().to_string();
            let st = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            let get = |k: &str| {
                st.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            out.push((get("Name:"), tid, get("Cpus_allowed_list:")));
        }
    }
    out.sort_by(|a, b| a.1.len().cmp(&b.1.len()).then(a.1.cmp(&b.1)));
    out
}

/// Pins every existing thread of this process to `cpus` (threads spawned
/// later inherit the mask of the thread that spawns them).
pub fn pin_all_threads(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; tids come from /proc/self/task.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        for e in std::fs::read_dir("/proc/self/task")?.flatten() {
            if let Ok(tid) = e.file_name().to_string_lossy().parse::<libc::pid_t>() {
                if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
    }
    Ok(())
}

/// `name/tid:cpus` for every thread of `pid`, for the pinning report.
pub fn threads_of(pid: i32) -> String {
    thread_affinities(pid)
        .into_iter()
        .map(|(name, tid, cpus)| format!("{name}/{tid}:{cpus}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `name:cpus` for every thread of this process.
pub fn own_thread_affinities() -> String {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    thread_affinities(me)
        .into_iter()
        .map(|(name, _, cpus)| format!("{name}:{cpus}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Pins every existing thread of another process `pid` to `cpus` (the fanout bench's
/// `--redis-cost` puts its redis-server beside the node's shard this way, after it started).
#[allow(dead_code, reason = "fanout's --redis-cost; other benches leave their children unpinned")]
pub fn pin_process(pid: i32, cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; tids come from /proc/<pid>/task.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        for e in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
            if let Ok(tid) = e.file_name().to_string_lossy().parse::<libc::pid_t>() {
                if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
    }
    Ok(())
}
