//! The reader loop: one thread that watches many nonblocking WebSocket connections with epoll,
//! decodes what the server sends, answers its pings (app-level `{}` lines with a masked `{}`,
//! control pings with a pong frame) and hands everything else to a [`Handler`]. Density holds
//! idle connections with it, fanout times every delivery, heartbeat counts and answers the ping
//! rounds. The handler runs on the reader thread; it must not block.

use super::connect::WsConn;
use super::net::Epoll;
use super::safety::fatal;
use super::ws::{encode_client_frame, is_ping_line, json_lines, WsDecoder, WsEvent, PROTOBUF_PING};
use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

/// What the reader reports to its owner, per connection (`conn` = the [`WsConn::id`]).
pub trait Handler: Send + 'static {
    /// A JSON line other than a ping.
    fn on_line(&mut self, conn: usize, line: &[u8], now_ns: u64);
    /// `n` app-level pings arrived in one read; false leaves them unanswered.
    fn on_pings(&mut self, _conn: usize, _n: u32) -> bool {
        true
    }
    /// The answers to `n` pings were written in full.
    fn on_pongs(&mut self, _conn: usize, _n: u32) {}
    /// A binary message (the protocol here is JSON text).
    fn on_binary(&mut self, _conn: usize, _len: usize) {}
    /// A read, write or protocol error (also counted in [`ReaderStats`]).
    fn on_error(&mut self, _conn: usize, _msg: &str) {}
    /// The connection ended: a Close frame with its code, or EOF / an error (`None` and
    /// `eof` true).
    fn on_closed(&mut self, _conn: usize, _code: Option<u16>, _eof: bool) {}
    /// Called after each epoll_wait batch has been processed.
    fn flush(&mut self) {}
}

struct RConn {
    id: usize,
    stream: TcpStream,
    dec: WsDecoder,
    open: bool,
}

#[derive(Default, Debug, Clone)]
pub struct ReaderStats {
    pub conns: usize,
    pub closed: usize,
    /// App-level pings answered.
    pub pings: u64,
    /// WebSocket control pings answered with a pong frame.
    pub ctrl_pings: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// Shared view of the reader's live counters.
#[derive(Default)]
pub struct ReaderLive {
    pub closed: AtomicUsize,
    /// Connections handed to the reader so far.
    pub conns: AtomicUsize,
    pub pings: AtomicU64,
    /// read() calls that returned data, and the WebSocket messages they carried (added after
    /// each epoll batch): messages per read tells whether the reader keeps up by batching.
    pub reads: AtomicU64,
    pub messages: AtomicU64,
    /// Microseconds to sleep between epoll batches (0: none), so that each read() collects
    /// the frames that arrived meanwhile; set by the owner at any time.
    pub pause_us: AtomicU64,
}

pub struct Reader<H: Handler> {
    add: mpsc::Sender<Vec<WsConn>>,
    pub live: Arc<ReaderLive>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<(ReaderStats, H)>>,
}

impl<H: Handler> Reader<H> {
    pub fn spawn(name: &str, mut handler: H) -> Reader<H> {
        let (tx, rx) = mpsc::channel::<Vec<WsConn>>();
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(ReaderLive::default());
        let (stop2, live2) = (stop.clone(), live.clone());
        let handle = thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let stats = Loop::new(&live2, &mut handler).run(rx, &stop2);
                (stats, handler)
            })
            .expect("spawn reader");
        Reader {
            add: tx,
            live,
            stop,
            handle: Some(handle),
        }
    }

    /// Hands connections to the reader (fatal if its thread is gone).
    pub fn add(&self, batch: Vec<WsConn>) {
        if self.add.send(batch).is_err() {
            fatal("reader thread gone");
        }
    }

    pub fn stop(mut self) -> (ReaderStats, H) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().unwrap().join().expect("reader panicked")
    }
}

/// Bytes read per read() call.
const READ_BUF_BYTES: usize = 256 * 1024;
/// Reads per readiness event before the next connection gets its turn.
const READS_PER_EVENT: usize = 4;

struct Loop<'a, H: Handler> {
    ep: Epoll,
    conns: Vec<RConn>,
    stats: ReaderStats,
    live: &'a ReaderLive,
    handler: &'a mut H,
    replies: Vec<u8>,
    /// Reads and messages since the last publication to `live`.
    reads: u64,
    messages: u64,
}

impl<'a, H: Handler> Loop<'a, H> {
    fn new(live: &'a ReaderLive, handler: &'a mut H) -> Self {
        let ep = Epoll::new(1024).unwrap_or_else(|e| fatal(&format!("epoll_create1: {e}")));
        Loop {
            ep,
            conns: Vec::new(),
            stats: ReaderStats::default(),
            live,
            handler,
            replies: Vec::new(),
            reads: 0,
            messages: 0,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Vec<WsConn>>, stop: &AtomicBool) -> ReaderStats {
        let mut buf = vec![0u8; READ_BUF_BYTES];
        loop {
            while let Ok(batch) = rx.try_recv() {
                let n = batch.len();
                for c in batch {
                    self.register(c);
                }
                self.live.conns.fetch_add(n, Ordering::Relaxed);
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let n = self
                .ep
                .wait(20)
                .unwrap_or_else(|e| fatal(&format!("epoll_wait: {e}")));
            for k in 0..n {
                let idx = self.ep.event(k).0 as usize;
                if self.conns[idx].open {
                    self.read_ready(idx, &mut buf);
                }
            }
            self.handler.flush();
            if self.reads > 0 {
                self.live.reads.fetch_add(self.reads, Ordering::Relaxed);
                self.live.messages.fetch_add(self.messages, Ordering::Relaxed);
                (self.reads, self.messages) = (0, 0);
            }
            let pause = self.live.pause_us.load(Ordering::Relaxed);
            if pause > 0 {
                thread::sleep(std::time::Duration::from_micros(pause));
            }
        }
        self.stats.conns = self.conns.len();
        self.stats
    }

    fn register(&mut self, c: WsConn) {
        if let Err(e) = c.stream.set_nonblocking(true) {
            fatal(&format!("set_nonblocking: {e}"));
        }
        let idx = self.conns.len();
        let events = libc::EPOLLIN | libc::EPOLLRDHUP;
        if let Err(e) = self.ep.add(&c.stream, events, idx as u64) {
            fatal(&format!("epoll_ctl ADD: {e}"));
        }
        let mut dec = c.dec;
        // Bytes read past the subscribe reply during setup.
        let pending = std::mem::take(&mut dec.pending);
        self.conns.push(RConn {
            id: c.id,
            stream: c.stream,
            dec,
            open: true,
        });
        if !pending.is_empty() {
            self.process(idx, &pending);
        }
    }

    /// Reads what connection `idx` has (a few reads at most; epoll reports the rest again).
    fn read_ready(&mut self, idx: usize, buf: &mut [u8]) {
        for _ in 0..READS_PER_EVENT {
            let fd = self.conns[idx].stream.as_raw_fd();
            // SAFETY: buf is valid for writes of its length.
            let r = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            if r == 0 {
                return self.finish(idx, None, true);
            }
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return,
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        self.error(idx, format!("read: {e}"));
                        return self.finish(idx, None, true);
                    }
                }
            }
            let r = r as usize;
            self.reads += 1;
            self.process(idx, &buf[..r]);
            if !self.conns[idx].open || r < buf.len() {
                return;
            }
        }
    }

    /// Decodes `data` from connection `idx`, answers its pings, reports the rest.
    fn process(&mut self, idx: usize, data: &[u8]) {
        let now = unix_ns();
        let (mut pings, mut ctrl_pings) = (0u32, Vec::<Vec<u8>>::new());
        // Protobuf connections' pings: a binary message holding one empty reply.
        let mut pb_pings = 0u32;
        let mut closed: Option<Option<u16>> = None;
        let c = &mut self.conns[idx];
        let id = c.id;
        let handler = &mut *self.handler;
        let messages = &mut self.messages;
        let res = c.dec.feed(data, &mut |ev| match ev {
            WsEvent::Text(m) => {
                *messages += 1;
                for l in json_lines(m) {
                    if is_ping_line(l) {
                        pings += 1;
                    } else {
                        handler.on_line(id, l, now);
                    }
                }
            }
            WsEvent::Ping(p) => ctrl_pings.push(p.to_vec()),
            WsEvent::Binary(b) if b == PROTOBUF_PING => pb_pings += 1,
            WsEvent::Binary(b) => handler.on_binary(id, b.len()),
            WsEvent::Pong => {}
            WsEvent::Close(code) => closed = closed.or(Some(code)),
        });
        if pings + pb_pings > 0 && !self.handler.on_pings(id, pings + pb_pings) {
            pings = 0;
            pb_pings = 0;
        }
        if pings > 0 || pb_pings > 0 || !ctrl_pings.is_empty() {
            self.replies.clear();
            for _ in 0..pings {
                encode_client_frame(&mut self.replies, 1, b"{}");
            }
            for _ in 0..pb_pings {
                encode_client_frame(&mut self.replies, 2, PROTOBUF_PING);
            }
            let pings = pings + pb_pings;
            for p in &ctrl_pings {
                encode_client_frame(&mut self.replies, 0xA, p);
            }
            self.stats.pings += pings as u64;
            self.stats.ctrl_pings += ctrl_pings.len() as u64;
            self.live.pings.fetch_add(pings as u64, Ordering::Relaxed);
            match (&self.conns[idx].stream).write_all(&self.replies) {
                Ok(()) if pings > 0 => self.handler.on_pongs(id, pings),
                Ok(()) => {}
                Err(e) => self.error(idx, format!("write pong: {e}")),
            }
        }
        if let Err(e) = res {
            self.error(idx, format!("protocol: {e}"));
            return self.finish(idx, None, false);
        }
        if let Some(code) = closed {
            self.finish(idx, code, false);
        }
    }

    fn error(&mut self, idx: usize, msg: String) {
        self.stats.errors += 1;
        self.handler.on_error(self.conns[idx].id, &msg);
        if self.stats.first_error.is_none() {
            self.stats.first_error = Some(msg);
        }
    }

    fn finish(&mut self, idx: usize, code: Option<u16>, eof: bool) {
        let c = &mut self.conns[idx];
        if !c.open {
            return;
        }
        c.open = false;
        self.ep.delete(&c.stream);
        self.stats.closed += 1;
        self.live.closed.fetch_add(1, Ordering::Relaxed);
        self.handler.on_closed(c.id, code, eof);
    }
}

/// Wall-clock nanoseconds since the Unix epoch (comparable across processes).
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
