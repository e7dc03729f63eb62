//! The kernel floor of a fan-out: the bench itself stands in for the server. It opens as many
//! loopback TCP pairs as there are subscribers (client ends from the same source addresses,
//! server ends accepted by the bench), and one "server" thread, pinned where the server's shard
//! would be, writes each publication's frame to every server end with a bare `send()` loop.
//! The client ends go to the same readers as the server's subscribers, so latency is measured
//! the same way, and the thread's own CPU (utime+stime and schedstat) is what a server cannot
//! go below for the same frames on the same sockets.

use super::connect::WsConn;
use super::cpu::thread_cpu;
use super::net::{src_addr, tcp_connect};
use super::safety::fatal;
use super::ws::WsDecoder;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// One paced run: `rate` publications per second for `dur`; `make()` returns the next
/// publication's push (the JSON text a subscriber receives, built when it is due).
pub struct Job {
    pub rate: f64,
    pub dur: Duration,
    pub make: Box<dyn FnMut() -> Vec<u8> + Send>,
}

/// What a run did.
#[derive(Default, Debug)]
pub struct Sent {
    pub publications: u64,
    pub sends: u64,
    /// send() calls that took only part of the frame (the rest followed at once).
    pub partial: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Frame size on the wire (header included), bytes.
    pub frame_bytes: usize,
}

/// The sender thread and its sockets.
pub struct Floor {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Sent>,
    /// The sender thread's id, for [`Floor::cpu`].
    pub tid: i32,
    pub cpu: usize,
}

impl Floor {
    /// Opens `n` loopback pairs (client ends from 127.0.0.2.. over `n_src` addresses, ids
    /// `first..first + n`) and starts the sender thread pinned to `cpu`. Returns the client
    /// ends, ready for a reader.
    pub fn start(n: usize, first: usize, n_src: usize, cpu: usize) -> (Floor, Vec<WsConn>) {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| fatal(&format!("floor: bind: {e}")));
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::with_capacity(n);
        let mut servers = Vec::with_capacity(n);
        for i in 0..n {
            let c = tcp_connect(addr, Some(src_addr(first + i, n_src)), Duration::from_secs(5))
                .unwrap_or_else(|e| fatal(&format!("floor: connect #{i}: {e}")));
            let (s, _) = listener
                .accept()
                .unwrap_or_else(|e| fatal(&format!("floor: accept #{i}: {e}")));
            let _ = s.set_nodelay(true);
            clients.push(WsConn {
                id: first + i,
                stream: c,
                dec: WsDecoder::default(),
            });
            servers.push(s);
        }
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel::<Sent>();
        let (tid_tx, tid_rx) = mpsc::channel::<i32>();
        thread::Builder::new()
            .name("floor-sender".into())
            .spawn(move || {
                pin_self(cpu);
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
                let _ = tid_tx.send(tid);
                while let Ok(job) = job_rx.recv() {
                    if done_tx.send(run(&servers, job)).is_err() {
                        break;
                    }
                }
            })
            .unwrap_or_else(|e| fatal(&format!("floor: spawn: {e}")));
        let tid = tid_rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| fatal("floor: sender thread did not start"));
        (
            Floor {
                jobs,
                done,
                tid,
                cpu,
            },
            clients,
        )
    }

    /// Runs one paced job on the sender thread and waits for it.
    pub fn run(&self, job: Job) -> Sent {
        if self.jobs.send(job).is_err() {
            fatal("floor: sender thread gone");
        }
        self.done
            .recv()
            .unwrap_or_else(|_| fatal("floor: sender thread gone"))
    }

    /// The sender thread's (utime+stime seconds, schedstat nanoseconds).
    pub fn cpu(&self) -> (f64, u64) {
        thread_cpu(self.tid)
    }
}

/// Pins the calling thread to `cpu` (the bench's other threads stay where they are).
fn pin_self(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; 0 = the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            fatal(&format!(
                "floor: sched_setaffinity({cpu}): {}",
                std::io::Error::last_os_error()
            ));
        }
    }
}

/// A server-to-client WebSocket text frame (unmasked) around `payload`.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 10);
    f.push(0x81);
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= 0xFFFF => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// The paced loop: publication k is due at start + k/rate; a late one goes at once. Each is
/// one blocking `send()` per socket (a partial send continues with the rest).
fn run(socks: &[TcpStream], mut job: Job) -> Sent {
    let mut out = Sent::default();
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / job.rate);
    let mut k: u32 = 0;
    loop {
        let due = start + interval * k;
        if due >= start + job.dur {
            break;
        }
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        let f = frame(&(job.make)());
        out.frame_bytes = f.len();
        for s in socks {
            let fd = s.as_raw_fd();
            let mut off = 0;
            while off < f.len() {
                // SAFETY: the slice is valid for its length; fd is an open socket.
                let r = unsafe {
                    libc::send(
                        fd,
                        f[off..].as_ptr() as *const libc::c_void,
                        f.len() - off,
                        libc::MSG_NOSIGNAL,
                    )
                };
                out.sends += 1;
                if r < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    out.errors += 1;
                    out.first_error.get_or_insert_with(|| format!("send: {e}"));
                    break;
                }
                off += r as usize;
                if off < f.len() {
                    out.partial += 1;
                }
            }
        }
        out.publications += 1;
        k += 1;
    }
    out
}
