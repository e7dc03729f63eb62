//! Boot and teardown of one node, in order: file limit, listeners, broker, shards, `READY`,
//! then wait for a signal and stop.
//!
//! Listeners are bound here, before any shard starts, so that `--listen 127.0.0.1:0` resolves to
//! one port that every shard's SO_REUSEPORT socket shares, and the `READY <ip>:<port>` line is
//! printed only once every shard accepts.

use crate::broker::{memory::MemoryBroker, redis::RedisBroker, Broker};
use crate::bus::{self, NodeInfo, RedisLink, ShardId};
use crate::config::Config;
use crate::shard::{self, ShardError, ShardParts};
use anyhow::Context;
use socket2::{Domain, Protocol, Socket, Type};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Raises the open-files soft limit to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

/// Binds one SO_REUSEPORT listening socket.
fn bind_listener(addr: SocketAddr, backlog: u32) -> anyhow::Result<Socket> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot bind {addr}"))?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket)
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64 ^ (std::process::id() as u64) << 32;
    }
    u64::from_ne_bytes(b)
}

/// Blocks SIGINT and SIGTERM in this thread (threads spawned later inherit the mask), so that
/// they are taken only by [`wait_for_signal`].
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local value, then pthread_sigmask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: sigwait on a set blocked in every thread.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// Runs a node until SIGINT/SIGTERM. Prints `READY <addr>` on stdout once every shard accepts.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    cfg.validate()?;
    // The token key files: a missing or bad one stops the node here, naming key and file (each
    // shard reads them again for its own verifier).
    crate::protocol::token::TokenVerifier::from_config(&cfg)?;
    // Refuse to start, naming the feature and the kernel, rather than fail in every shard.
    shard::ring::check_kernel()?;
    let sigset = block_signals();
    let nofile = raise_nofile_limit();
    let cfg = Arc::new(cfg);
    let shards = cfg.shard_count();
    if cfg.insecure {
        tracing::warn!("!!! INSECURE MODE: anonymous clients may connect, subscribe, publish and read presence in every channel. For local development only. !!!");
    }

    // Listeners: the first bind resolves port 0; the others share that port.
    let first = bind_listener(cfg.listen, cfg.backlog).context("listener")?;
    let addr: SocketAddr = first
        .local_addr()
        .context("listener address")?
        .as_socket()
        .context("listener has no socket address")?;
    let mut listeners = vec![first];
    for _ in 1..shards {
        listeners.push(bind_listener(addr, cfg.backlog).context("a shard's listener")?);
    }

    let node = Arc::new(
        NodeInfo::new(
            format!("{:016x}", random_u64()),
            cfg.node_name(),
            addr.to_string(),
            random_u64(),
        )
        .with_shards(shards),
    );
    let stats = node.bus.clone();
    let (to_broker, broker_inbox) =
        bus::broker_queue(cfg.limits.broker_queue_capacity, cfg.redis_mode())
            .context("the shards → broker queue (its wake-up socket)")?;
    let mut links = Vec::with_capacity(shards);
    let mut inboxes = Vec::with_capacity(shards);
    for _ in 0..shards {
        let (link, inbox) = bus::shard_link(cfg.limits.shard_queue_capacity, stats.clone())
            .context("a broker → shard queue (its wake-up socket)")?;
        links.push(link);
        inboxes.push(inbox);
    }

    let cpus: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    // The broker thread (memory broker or Redis multiplexer) goes to a core no shard uses,
    // when there is one to spare.
    let spare = (cfg.pin_shards && shards < cpus.len()).then(|| cpus[shards]);
    let broker: Box<dyn Broker> = if !cfg.redis_mode() {
        Box::new(MemoryBroker::new(cfg.clone(), stats.clone(), spare))
    } else {
        let cpu = match cfg.redis_options.cpu {
            c if c >= 0 => Some(c as usize),
            _ => spare,
        };
        Box::new(
            RedisBroker::new(cfg.clone(), node.clone(), stats.clone(), cpu)
                .map_err(|e| anyhow::anyhow!("redis: {e}"))?,
        )
    };
    let caps = broker.caps();
    let _ = node.broker_queue.set(broker_inbox.rx.clone());
    let broker_thread = std::thread::Builder::new()
        .name("shardcast-broker".into())
        .spawn(move || broker.run(broker_inbox, links))
        .context("cannot start the broker thread")?;

    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<ShardId, ShardError>>();
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::with_capacity(shards);
    for (id, (listener, inbox)) in listeners.into_iter().zip(inboxes).enumerate() {
        let cpu = (cfg.pin_shards && !cpus.is_empty()).then(|| cpus[id % cpus.len()]);
        let placement = match cpu {
            Some(c) => glommio::Placement::Fixed(c),
            None => glommio::Placement::Unbound,
        };
        let parts = ShardParts {
            id,
            cfg: cfg.clone(),
            node: node.clone(),
            to_broker: to_broker.clone(),
            caps,
            inbox,
            listener,
            ready: ready_tx.clone(),
            stop: stop.clone(),
        };
        let handle = glommio::LocalExecutorBuilder::new(placement)
            .name(&format!("shardcast-shard-{id}"))
            // A network-only server needs little registered I/O memory (default 10 MiB).
            .io_memory(256 * 1024)
            // No blocking-thread pool (glommio's default is one thread per executor): a shard
            // makes no file-system calls, so a node is one thread per core (DESIGN §2).
            .blocking_thread_pool_placement(glommio::PoolPlacement::Custom(Vec::new()))
            .spawn(move || shard::run(parts))
            .map_err(|e| anyhow::anyhow!("cannot start shard {id}: {e}"))?;
        handles.push(handle);
    }
    // Kept to tell the broker to leave the registry when draining, and for the queue's depth.
    let leave_tx = to_broker.clone();
    drop(to_broker);
    drop(ready_tx);
    for _ in 0..shards {
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .context("a shard did not report within 30 s")?
            .context("a shard did not start")?;
    }
    let broker_kind = if !cfg.redis_mode() { "memory" } else { "redis" };
    if cfg.redis_mode() {
        // Give the multiplexer its first connection attempt before clients arrive, so early
        // subscribes do not fail only because the link is still coming up.
        let wait = Duration::from_millis(cfg.redis_options.connect_timeout_ms as u64 * 2 + 500);
        let deadline = std::time::Instant::now() + wait;
        while node.redis_state.get() == RedisLink::Standalone
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    tracing::info!(%addr, shards, nofile, broker = broker_kind, "shardcast ready");
    node.rss_baseline
        .store(crate::metrics::rss_bytes(), Ordering::Relaxed);
    let metrics = crate::metrics::start(&cfg.metrics_listen, node.clone(), cfg.redis_mode());
    if let Some(m) = &metrics {
        tracing::info!(metrics = %m.addr, "metrics and status page listening");
        let _ = node.metrics_addr.set(m.addr.to_string());
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY {addr}")?;
    out.flush()?;
    drop(out);
    // systemd (Type=notify): ready once every shard accepts. A no-op outside systemd.
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("listening on {addr}, {shards} shards")),
    ]);

    let sig = wait_for_signal(&sigset);
    drain(&cfg, &node, &leave_tx, &sigset, sig);
    // Every thread ends, in order: the shards (their sweep sees `stop` within a second), then
    // the broker (its queue closes with the last shard's sender), then the metrics listener.
    stop.store(true, Ordering::SeqCst);
    let shard_joins = handles.into_iter().map(|h| move || drop(h.join()));
    join_within("shards", JOIN_WAIT, shard_joins.collect());
    // The shards are gone, so the queue has room for the last word.
    for _ in 0..100 {
        match leave_tx.try_send(bus::ToBroker::Stop) {
            Err(crossbeam_channel::TrySendError::Full(_)) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => break,
        }
    }
    drop(leave_tx);
    join_within(
        "broker",
        JOIN_WAIT,
        vec![move || drop(broker_thread.join())],
    );
    if let Some(m) = metrics {
        m.stop();
    }
    Ok(())
}

/// How long the node waits for its threads to end after the drain, per group.
const JOIN_WAIT: Duration = Duration::from_secs(5);

/// Runs `joins` (each waits for one thread) and returns when all are done or after `wait`,
/// whichever comes first: a thread stuck past it is logged and left to the process exit.
fn join_within<J: FnOnce() + Send + 'static>(what: &'static str, wait: Duration, joins: Vec<J>) {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let waiter = std::thread::Builder::new()
        .name("shardcast-join".into())
        .spawn(move || {
            for join in joins {
                join();
            }
            let _ = done_tx.send(());
        });
    match waiter {
        Ok(_) if done_rx.recv_timeout(wait).is_ok() => tracing::debug!(what, "threads ended"),
        Ok(_) => tracing::warn!(
            what,
            wait_ms = wait.as_millis() as u64,
            "threads still running at exit"
        ),
        Err(e) => tracing::warn!(what, error = %e, "cannot wait for threads"),
    }
}

/// The shutdown protocol, from the node's side (the shards pace their connections, see
/// `shard::Drain`): `/healthz` and new upgrades answer 503 at once, the node leaves the Redis
/// registry, and we wait until every connection is gone, a second signal comes, or the
/// deadline passes.
fn drain(
    cfg: &Config,
    node: &NodeInfo,
    leave_tx: &bus::BrokerTx,
    sigset: &libc::sigset_t,
    sig: i32,
) {
    let started = std::time::Instant::now();
    let deadline = Duration::from_secs(cfg.drain.deadline_secs as u64);
    tracing::info!(
        signal = sig,
        connections = node.connections.load(Ordering::Relaxed),
        window_secs = cfg.drain.window_secs,
        deadline_secs = cfg.drain.deadline_secs,
        "draining: /healthz answers 503, clients are told to reconnect"
    );
    node.draining.store(true, Ordering::SeqCst);
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("draining"),
    ]);
    if !cfg.redis_mode() {
        node.left_registry.store(true, Ordering::SeqCst);
    }
    if leave_tx.try_send(bus::ToBroker::Leave).is_err() {
        node.left_registry.store(true, Ordering::SeqCst); // broker gone or full: the lease lapses
    }
    // The registry removal gets a moment to reach Redis before an empty node exits.
    let leave_wait = Duration::from_secs(1);
    loop {
        let left = node.left_registry.load(Ordering::SeqCst) || started.elapsed() >= leave_wait;
        if node.connections.load(Ordering::Relaxed) == 0 && left {
            tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "drained");
            return;
        }
        if started.elapsed() >= deadline {
            tracing::warn!(
                left = node.connections.load(Ordering::Relaxed),
                "drain deadline: closing what is left"
            );
            return;
        }
        let wait = libc::timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        // SAFETY: sigtimedwait on the set blocked in every thread.
        let got = unsafe { libc::sigtimedwait(sigset, std::ptr::null_mut(), &wait) };
        if got > 0 {
            tracing::warn!(
                signal = got,
                left = node.connections.load(Ordering::Relaxed),
                "second signal: closing what is left"
            );
            return;
        }
    }
}
