//! Loopback sockets for many connections: source addresses 127.0.0.2, 127.0.0.3, … (each
//! address has its own ephemeral port range; all of 127.0.0.0/8 is local on Linux), sockets bound
//! to them and blocking connects, the file-descriptor limit raised to its hard cap, and a small
//! epoll wrapper for the threads that watch thousands of sockets.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

/// Raises RLIMIT_NOFILE soft to hard; returns the hard limit.
pub fn raise_nofile() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &want);
        }
    }
    rl.rlim_max
}

/// Source address for connection `i`: 127.0.0.2, 127.0.0.3, … (spreads the
/// ephemeral port space; all of 127.0.0.0/8 is local on Linux).
pub fn src_addr(i: usize, n_src: usize) -> Ipv4Addr {
    let k = (i % n_src.max(1)) as u32 + 2;
    Ipv4Addr::from(0x7f00_0000u32 + k)
}

/// TCP connect from `src` (port chosen at connect time with
/// IP_BIND_ADDRESS_NO_PORT) with TCP_NODELAY.
pub fn tcp_connect(
    dst: SocketAddr,
    src: Option<Ipv4Addr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let sock = tcp_socket_from(src)?;
    sock.connect_timeout(&dst.into(), timeout)?;
    sock.set_tcp_nodelay(true)?;
    Ok(sock.into())
}

/// A TCP socket bound to `src` with the port left to connect time (IP_BIND_ADDRESS_NO_PORT),
/// so many source addresses give many ephemeral ports.
pub fn tcp_socket_from(src: Option<Ipv4Addr>) -> io::Result<socket2::Socket> {
    let sock = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if let Some(src) = src {
        let one: libc::c_int = 1;
        // SAFETY: valid fd and option pointer/len.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
    }
    Ok(sock)
}

/// An epoll instance and its event buffer; closed on drop.
#[allow(dead_code, reason = "the proxy bench uses blocking sockets, no epoll")]
pub struct Epoll {
    fd: RawFd,
    events: Vec<libc::epoll_event>,
}

#[allow(dead_code, reason = "the proxy bench uses blocking sockets, no epoll")]
impl Epoll {
    /// Up to `batch` events are returned per [`Epoll::wait`].
    pub fn new(batch: usize) -> io::Result<Epoll> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; batch.max(1)],
        })
    }

    /// Watches `sock` for `events` (`EPOLLIN | ...`); `token` comes back with each event.
    pub fn add(&self, sock: &impl AsRawFd, events: i32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: events as u32,
            u64: token,
        };
        // SAFETY: valid epoll fd, socket fd and event pointer.
        let rc =
            unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, sock.as_raw_fd(), &mut ev) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `sock` (closing it does that too).
    #[allow(
        dead_code,
        reason = "the reader keeps closed sockets; recovery closes its own"
    )]
    pub fn delete(&self, sock: &impl AsRawFd) {
        // SAFETY: valid fds; a null event is allowed for DEL.
        unsafe {
            libc::epoll_ctl(
                self.fd,
                libc::EPOLL_CTL_DEL,
                sock.as_raw_fd(),
                std::ptr::null_mut(),
            )
        };
    }

    /// Waits up to `timeout_ms` for events; returns how many [`Epoll::event`] can read (0 when
    /// a signal interrupted the wait).
    pub fn wait(&mut self, timeout_ms: i32) -> io::Result<usize> {
        // SAFETY: the events buffer is valid for its length.
        let n = unsafe {
            libc::epoll_wait(
                self.fd,
                self.events.as_mut_ptr(),
                self.events.len() as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        Ok(n as usize)
    }

    /// Event `k` of the last wait: (token, event bits).
    pub fn event(&self, k: usize) -> (u64, u32) {
        let ev = self.events[k];
        (ev.u64, ev.events)
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: closing our own epoll fd.
        unsafe { libc::close(self.fd) };
    }
}
