//! `shardcast doctor`: checks this box against the kernel profile (tuning/60-shardcast.conf)
//! and the configuration, prints each finding with its fix, then the capacity the box can hold.
//! Exit status 0 when the box is ready, 1 when something needs fixing.

use crate::config::Config;

/// User-space bytes per idle subscribed connection, measured by `cargo bench --bench density`
/// (RSS slope; the heap figure is pinned by a unit test).
pub const USER_BYTES_PER_CONNECTION: u64 = 250;
/// Kernel bytes per server socket, measured by the same bench (slab + idle TCP buffers).
pub const KERNEL_BYTES_PER_SOCKET: u64 = 4_500;
/// The connection count the profile is sized for.
pub const TARGET_CONNECTIONS: u64 = 500_000;

/// One check's outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Works, but below the profile: says what it limits.
    Warn,
    /// The node cannot do its job this way.
    Fail,
}

/// A finding: what was checked, what was seen, and the fix.
#[derive(Debug)]
pub struct Finding {
    pub verdict: Verdict,
    pub check: &'static str,
    pub seen: String,
    pub fix: String,
}

fn read_sys(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn read_num(path: &str) -> Option<u64> {
    read_sys(path)?.split_whitespace().next()?.parse().ok()
}

fn rlimit(resource: libc::__rlimit_resource_t) -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit on a local struct.
    unsafe { libc::getrlimit(resource, &mut lim) };
    (lim.rlim_cur, lim.rlim_max)
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// Runs every check for `cfg`.
pub fn check(cfg: &Config) -> (Vec<Finding>, u64) {
    let mut f = Vec::new();
    let mut add = |verdict, check, seen: String, fix: String| {
        f.push(Finding {
            verdict,
            check,
            seen,
            fix,
        })
    };
    let want = TARGET_CONNECTIONS.min(cfg.limits.max_connections as u64);

    let (_, nofile_hard) = rlimit(libc::RLIMIT_NOFILE);
    add(
        if nofile_hard >= want + 1024 {
            Verdict::Ok
        } else {
            Verdict::Warn
        },
        "open files (RLIMIT_NOFILE hard)",
        format!("{nofile_hard} (the server raises its soft limit to this)"),
        "LimitNOFILE=1048576 in the systemd unit, or tuning/limits.conf".into(),
    );
    for (key, path) in [
        ("fs.nr_open", "/proc/sys/fs/nr_open"),
        ("fs.file-max", "/proc/sys/fs/file-max"),
    ] {
        let v = read_num(path).unwrap_or(0);
        add(
            if v >= want + 1024 {
                Verdict::Ok
            } else {
                Verdict::Warn
            },
            key,
            v.to_string(),
            format!("sysctl -w {key}=2097152 (tuning/60-shardcast.conf)"),
        );
    }
    let somaxconn = read_num("/proc/sys/net/core/somaxconn").unwrap_or(0);
    add(
        if somaxconn >= cfg.backlog as u64 {
            Verdict::Ok
        } else {
            Verdict::Warn
        },
        "net.core.somaxconn vs backlog",
        format!("{somaxconn} (backlog {} is capped to it)", cfg.backlog),
        "sysctl -w net.core.somaxconn=65535".into(),
    );
    let syn = read_num("/proc/sys/net/ipv4/tcp_max_syn_backlog").unwrap_or(0);
    add(
        if syn >= cfg.backlog as u64 {
            Verdict::Ok
        } else {
            Verdict::Warn
        },
        "net.ipv4.tcp_max_syn_backlog",
        syn.to_string(),
        "sysctl -w net.ipv4.tcp_max_syn_backlog=65535".into(),
    );
    // tcp_mem is in pages: the high mark bounds all TCP buffer memory.
    let tcp_high = read_sys("/proc/sys/net/ipv4/tcp_mem")
        .and_then(|s| s.split_whitespace().nth(2)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096;
    let tcp_need = want * 4096; // one page of buffers per mostly idle socket
    add(
        if tcp_high >= tcp_need {
            Verdict::Ok
        } else {
            Verdict::Warn
        },
        "net.ipv4.tcp_mem (high)",
        format!("{} MiB", tcp_high >> 20),
        format!(
            "sysctl -w net.ipv4.tcp_mem='393216 786432 1572864' (≥ {} MiB for {want} connections)",
            tcp_need >> 20
        ),
    );
    let (memlock, _) = rlimit(libc::RLIMIT_MEMLOCK);
    add(
        if memlock == libc::RLIM_INFINITY || memlock >= 8 << 20 {
            Verdict::Ok
        } else {
            Verdict::Fail
        },
        "locked memory (RLIMIT_MEMLOCK)",
        if memlock == libc::RLIM_INFINITY {
            "unlimited".into()
        } else {
            format!("{} KiB", memlock >> 10)
        },
        "LimitMEMLOCK=infinity in the systemd unit (io_uring registers its rings)".into(),
    );
    let uring_disabled = read_num("/proc/sys/kernel/io_uring_disabled").unwrap_or(0);
    let uring_ok = uring_disabled == 0 && io_uring_works();
    add(
        if uring_ok { Verdict::Ok } else { Verdict::Fail },
        "io_uring",
        if uring_disabled != 0 {
            format!("kernel.io_uring_disabled = {uring_disabled}")
        } else if uring_ok {
            "available".into()
        } else {
            "io_uring_setup failed (seccomp, container or old kernel)".into()
        },
        "sysctl -w kernel.io_uring_disabled=0; allow io_uring_* syscalls (see systemd/shardcast.service)".into(),
    );
    // The data path's ring features (multishot receive, provided-buffer rings, ...): the same
    // check every shard makes before it starts.
    let data_path = if uring_ok {
        crate::shard::ring::check_kernel()
    } else {
        Ok(())
    };
    add(
        if uring_ok && data_path.is_ok() {
            Verdict::Ok
        } else {
            Verdict::Fail
        },
        "io_uring data path (multishot receive, buffer rings)",
        match &data_path {
            Ok(()) if uring_ok => {
                format!("available (Linux {})", crate::shard::ring::kernel_release())
            }
            Ok(()) => "not checked: io_uring is not available".into(),
            Err(e) => e.to_string(),
        },
        "Linux 6.0 or later (multishot receive and provided-buffer rings)".into(),
    );
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let shards = cfg.shard_count();
    add(
        if shards <= cpus {
            Verdict::Ok
        } else {
            Verdict::Warn
        },
        "cores vs shards",
        format!("{cpus} cores, {shards} shards"),
        "shards = 0 (one per core) or at most the core count".into(),
    );
    let ports = read_sys("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_default()
        .replace('\t', " ");
    add(
        Verdict::Ok,
        "net.ipv4.ip_local_port_range (load generators, proxies)",
        ports,
        "sysctl -w net.ipv4.ip_local_port_range='1024 65535' on load generators and proxies".into(),
    );
    let conntrack = read_num("/proc/sys/net/netfilter/nf_conntrack_max");
    if let Some(ct) = conntrack {
        add(
            if ct >= want {
                Verdict::Ok
            } else {
                Verdict::Warn
            },
            "net.netfilter.nf_conntrack_max",
            ct.to_string(),
            "sysctl -w net.netfilter.nf_conntrack_max=1048576, or exempt the port from conntrack"
                .into(),
        );
    }

    // Capacity: the smallest of what memory, file descriptors and TCP memory allow.
    let avail = meminfo("MemAvailable:").unwrap_or(0);
    let by_memory = avail / (USER_BYTES_PER_CONNECTION + KERNEL_BYTES_PER_SOCKET);
    let by_fds = nofile_hard.saturating_sub(1024);
    let by_tcp = tcp_high / 4096;
    let capacity = by_memory
        .min(by_fds)
        .min(by_tcp)
        .min(cfg.limits.max_connections as u64);
    (f, capacity)
}

fn io_uring_works() -> bool {
    // A throwaway executor: glommio sets up its rings, or fails.
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(64 * 1024)
        .make()
        .is_ok()
}

/// Prints the report; returns the process exit code.
pub fn run(cfg: &Config) -> u8 {
    let (findings, capacity) = check(cfg);
    let mut worst = 0u8;
    for f in &findings {
        let (tag, level) = match f.verdict {
            Verdict::Ok => ("ok  ", 0),
            Verdict::Warn => ("WARN", 1),
            Verdict::Fail => ("FAIL", 2),
        };
        worst = worst.max(level);
        println!("{tag} {:<48} {}", f.check, f.seen);
        if f.verdict != Verdict::Ok {
            println!("     fix: {}", f.fix);
        }
    }
    let avail = meminfo("MemAvailable:").unwrap_or(0);
    println!(
        "capacity: about {capacity} connections ({} MiB available at {} B user + {} B kernel per connection; fd and TCP-memory limits applied)",
        avail >> 20,
        USER_BYTES_PER_CONNECTION,
        KERNEL_BYTES_PER_SOCKET
    );
    match worst {
        0 => {
            println!("ready: this box matches the profile");
            0
        }
        1 => {
            println!("not ready: the warnings above limit how many connections this box can hold");
            1
        }
        _ => {
            println!("not ready: the failures above stop the server from working");
            1
        }
    }
}
