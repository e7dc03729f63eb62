//! Readiness of a shard's WebSocket sockets: one edge-triggered epoll set per shard.
//!
//! Why not a glommio `TcpStream` per connection: an idle glommio socket costs a task and an
//! armed readiness `Source` (~700 heap bytes, measured by `glommio_idle_socket_heap_bytes`),
//! more than everything else a connection needs. Here an idle connection is a registration in
//! the kernel's epoll set and a ~150-byte struct in its shard; nothing in user space waits.
//!
//! A small relay thread (`shardcast-poll-N`, on the shard's core) blocks in `epoll_wait` and
//! hands the ready tokens to the shard through a bounded queue and at most one wake-up byte per
//! batch, the same mechanism the broker uses. All reads and writes happen on the shard thread
//! with non-blocking syscalls. The relay never touches connection state.

use crossbeam_channel::{Receiver, Sender};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Readiness bits reported for a token.
pub const READABLE: u32 = libc::EPOLLIN as u32;
pub const WRITABLE: u32 = libc::EPOLLOUT as u32;
pub const HANGUP: u32 = (libc::EPOLLHUP | libc::EPOLLRDHUP | libc::EPOLLERR) as u32;

/// Events taken from the kernel per `epoll_wait`.
const BATCH: usize = 256;

/// The shard's handle on its epoll set.
pub struct Poller {
    epfd: OwnedFd,
}

/// The shard's end of the relay: drain `rx` after clearing `notified`, when `wake` is readable.
pub struct ReadyInbox {
    pub rx: Receiver<(u64, u32)>,
    pub notified: Arc<AtomicBool>,
    pub wake: UnixStream,
}

impl Poller {
    /// Creates the epoll set and starts its relay thread (pinned to `cpu` when given).
    /// `capacity` bounds the ready queue, in events; when full the relay waits for the shard.
    pub fn start(
        shard: usize,
        cpu: Option<usize>,
        capacity: usize,
    ) -> io::Result<(Poller, ReadyInbox)> {
        // SAFETY: plain syscall; the fd is owned right away.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let epfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        let notified = Arc::new(AtomicBool::new(false));
        let relay_fd = epfd.try_clone()?;
        let relay_notified = notified.clone();
        std::thread::Builder::new()
            .name(format!("shardcast-poll-{shard}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
                }
                relay(relay_fd, tx, relay_notified, wake_tx)
            })?;
        Ok((
            Poller { epfd },
            ReadyInbox {
                rx,
                notified,
                wake: wake_rx,
            },
        ))
    }

    /// Watches `fd` (read, write and hang-up edges) under `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: token,
        };
        // SAFETY: valid epoll fd and event struct.
        let rc =
            unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Poller {
    /// Stops watching `fd`. Closing the fd alone is not enough while another reference to the
    /// socket exists (an io_uring poll left from the HTTP phase holds one until it completes).
    pub fn remove(&self, fd: RawFd) {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: valid epoll fd; an fd that is not registered just fails with ENOENT.
        unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut ev) };
    }
}

/// The relay thread: kernel readiness → the shard's queue, one wake-up per batch.
fn relay(epfd: OwnedFd, tx: Sender<(u64, u32)>, notified: Arc<AtomicBool>, wake: UnixStream) {
    let mut events: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; BATCH];
    loop {
        // SAFETY: the buffer holds BATCH events.
        let n =
            unsafe { libc::epoll_wait(epfd.as_raw_fd(), events.as_mut_ptr(), BATCH as i32, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %io::Error::last_os_error(), "epoll_wait failed; poller stops");
            return;
        }
        for ev in &events[..n as usize] {
            let (token, bits) = (ev.u64, ev.events);
            if tx.send((token, bits)).is_err() {
                return; // the shard is gone
            }
        }
        if !notified.swap(true, Ordering::AcqRel) {
            let _ = (&wake).write(&[1]);
        }
    }
}

/// Token of a connection: its slot and generation.
pub fn token(slot: u32, generation: u32) -> u64 {
    ((slot as u64) << 32) | generation as u64
}

/// The slot and generation in a token.
pub fn untoken(token: u64) -> (u32, u32) {
    ((token >> 32) as u32, token as u32)
}
