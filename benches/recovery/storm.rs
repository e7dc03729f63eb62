//! The recovery bench's clients: nonblocking WebSocket connections driven by one epoll loop.
//! Each client connects from its own source address, upgrades, sends connect + subscribe in its
//! first frame (recovering from its recorded offset and epoch in the storm phase) and verifies
//! the reply; a connection that breaks before the reply is retried up to a limit. Runs on the
//! bench's main thread; nothing here blocks.

use crate::common::net::{src_addr, tcp_socket_from, Epoll};
use crate::common::safety::fatal;
use crate::common::ws::{
    check_handshake_response, connect_subscribe_frame, encode_client_frame, handshake_request,
    is_ping_line, json_lines, response_head_end, WsDecoder, WsEvent,
};
use serde_json::Value;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum St {
    Idle,
    Connecting,
    Handshake,
    Subscribing,
    /// Subscribe reply received and verified.
    Done,
    Failed,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Plain subscribe: record the position.
    Initial,
    /// Recovering subscribe from the recorded position; verify the reply.
    Recover,
}

/// Why a client failed (storm phase).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Fail {
    /// `recovered` missing/false.
    NotRecovered,
    /// recovered, but the publications (count, offsets, data) or position are wrong.
    WrongPubs,
    /// error reply, connection failures, protocol trouble.
    Error,
    /// no reply before the phase deadline.
    Timeout,
}

pub struct Client {
    pub node: usize,
    pub chan: usize,
    pub src: Ipv4Addr,
    pub stream: Option<TcpStream>,
    pub st: St,
    pub hbuf: Vec<u8>,
    pub key: String,
    pub dec: WsDecoder,
    pub attempts: u32,
    /// First connect() of this phase.
    pub t_start: Option<Instant>,
    pub t_reply: Option<Instant>,
    pub epoch: String,
    /// Last offset this client has (subscribe reply, then publications).
    pub offset: u64,
    pub fail: Option<(Fail, String)>,
    pub gaps: u64,
    pub dups: u64,
    /// Publications pushed after the subscribe reply.
    pub pushes: u64,
    pub closed_by_server: bool,
}

impl Client {
    pub fn new(node: usize, chan: usize, src: Ipv4Addr) -> Client {
        Client {
            node,
            chan,
            src,
            stream: None,
            st: St::Idle,
            hbuf: Vec::new(),
            key: String::new(),
            dec: WsDecoder::default(),
            attempts: 0,
            t_start: None,
            t_reply: None,
            epoch: String::new(),
            offset: 0,
            fail: None,
            gaps: 0,
            dups: 0,
            pushes: 0,
            closed_by_server: false,
        }
    }
}

/// Nonblocking connect from `src` (port picked at connect time) with TCP_NODELAY; the connection
/// completes later (EPOLLOUT).
pub fn connect_nonblocking(dst: SocketAddr, src: Ipv4Addr) -> io::Result<TcpStream> {
    let sock = tcp_socket_from(Some(src))?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    match sock.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(sock.into())
}

pub struct Storm {
    pub phase: Phase,
    pub ep: Epoll,
    pub dsts: Vec<SocketAddr>,
    pub channels: Vec<String>,
    /// Recover phase: publications each reply must carry; `missed_from` is the
    /// `m` of the first one.
    pub missed: u64,
    pub clients: Vec<Client>,
    pub next: usize,
    pub inflight: usize,
    pub max_inflight: usize,
    /// Connections started between two epoll_wait calls.
    pub launch_batch: usize,
    pub max_attempts: u32,
    pub settled: usize,
    pub failed: usize,
    pub retries: u64,
    pub pings: u64,
    pub unexpected: u64,
    pub first_unexpected: Option<String>,
    /// When the last client's first connect() was issued.
    pub last_launch: Option<Instant>,
    pub buf: Vec<u8>,
}

impl Storm {
    pub fn new(
        phase: Phase,
        dsts: Vec<SocketAddr>,
        channels: Vec<String>,
        missed: u64,
        clients: Vec<Client>,
        max_inflight: usize,
        max_attempts: u32,
    ) -> Storm {
        let ep = Epoll::new(1024).unwrap_or_else(|e| fatal(&format!("epoll_create1: {e}")));
        Storm {
            phase,
            ep,
            dsts,
            channels,
            missed,
            clients,
            next: 0,
            inflight: 0,
            max_inflight: max_inflight.max(1),
            launch_batch: 64,
            max_attempts: max_attempts.max(1),
            settled: 0,
            failed: 0,
            retries: 0,
            pings: 0,
            unexpected: 0,
            first_unexpected: None,
            last_launch: None,
            buf: vec![0u8; 256 * 1024],
        }
    }

    /// Starts (another) connection attempt of client `i`.
    fn begin(&mut self, i: usize) {
        let now = Instant::now();
        let c = &mut self.clients[i];
        c.attempts += 1;
        c.t_start.get_or_insert(now);
        c.hbuf.clear();
        c.dec = WsDecoder::default();
        c.stream = None;
        let dst = self.dsts[c.node];
        match connect_nonblocking(dst, c.src) {
            Ok(s) => {
                let events = libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET;
                let token = ((c.attempts as u64) << 32) | i as u64;
                if let Err(e) = self.ep.add(&s, events, token) {
                    return self.lost(i, format!("epoll_ctl: {e}"));
                }
                c.stream = Some(s);
                c.st = St::Connecting;
            }
            Err(e) => {
                let msg = format!("connect {} -> {dst}: {e}", c.src);
                self.lost(i, msg);
            }
        }
    }

    /// The connection broke before the subscribe reply: retry or fail.
    fn lost(&mut self, i: usize, msg: String) {
        let c = &mut self.clients[i];
        c.stream = None;
        if c.attempts < self.max_attempts {
            self.retries += 1;
            self.begin(i);
        } else {
            self.settle_fail(i, Fail::Error, msg);
        }
    }

    fn settle_fail(&mut self, i: usize, kind: Fail, msg: String) {
        let c = &mut self.clients[i];
        if matches!(c.st, St::Done | St::Failed) {
            return;
        }
        c.stream = None;
        c.st = St::Failed;
        c.fail = Some((kind, msg));
        self.inflight -= 1;
        self.settled += 1;
        self.failed += 1;
    }

    fn settle_ok(&mut self, i: usize) {
        self.clients[i].st = St::Done;
        self.inflight -= 1;
        self.settled += 1;
    }

    /// Launches up to `batch` new clients within the in-flight limit.
    fn launch(&mut self, batch: usize) {
        let mut k = 0;
        while k < batch && self.next < self.clients.len() && self.inflight < self.max_inflight {
            let i = self.next;
            self.next += 1;
            self.inflight += 1;
            self.begin(i);
            k += 1;
            if self.next == self.clients.len() {
                self.last_launch = Some(Instant::now());
            }
        }
    }

    /// Runs until `done` holds or `until` passes; returns whether `done` held.
    pub fn run(&mut self, until: Instant, done: impl Fn(&Storm) -> bool) -> bool {
        loop {
            self.launch(self.launch_batch);
            if done(self) {
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            let more = self.next < self.clients.len() && self.inflight < self.max_inflight;
            let timeout = if more {
                0
            } else {
                (until - now).as_millis().clamp(1, 20) as i32
            };
            self.poll(timeout);
        }
    }

    /// Fails every client that has no outcome yet.
    pub fn time_out(&mut self) {
        for i in 0..self.clients.len() {
            let st = self.clients[i].st;
            if st == St::Idle {
                self.inflight += 1; // settle_fail counts it down
            }
            if !matches!(st, St::Done | St::Failed) {
                self.settle_fail(
                    i,
                    Fail::Timeout,
                    format!("no subscribe reply (state {st:?})"),
                );
            }
        }
    }

    fn poll(&mut self, timeout_ms: i32) {
        let n = self
            .ep
            .wait(timeout_ms)
            .unwrap_or_else(|e| fatal(&format!("epoll_wait: {e}")));
        for k in 0..n {
            let (tag, fl) = self.ep.event(k);
            let i = (tag & 0xffff_ffff) as usize;
            if i >= self.clients.len() || self.clients[i].attempts as u64 != tag >> 32 {
                continue; // an earlier attempt's socket
            }
            self.on_event(i, fl);
        }
    }

    fn on_event(&mut self, i: usize, fl: u32) {
        let err_bits = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
        if self.clients[i].st == St::Connecting {
            if fl & (libc::EPOLLOUT as u32 | err_bits) == 0 {
                return;
            }
            let c = &mut self.clients[i];
            let Some(mut s) = c.stream.as_ref() else {
                return;
            };
            match s.take_error() {
                Ok(None) if fl & err_bits == 0 => {}
                Ok(None) => return self.lost(i, "connect: hang-up".into()),
                Ok(Some(e)) | Err(e) => return self.lost(i, format!("connect: {e}")),
            }
            let dst = self.dsts[c.node];
            c.key = tungstenite::handshake::client::generate_key();
            let req = handshake_request(dst, &c.key);
            if let Err(e) = s.write_all(req.as_bytes()) {
                return self.lost(i, format!("write handshake: {e}"));
            }
            c.st = St::Handshake;
        }
        if matches!(
            self.clients[i].st,
            St::Handshake | St::Subscribing | St::Done
        ) && fl & (libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32 | err_bits) != 0
        {
            self.read_all(i);
        }
    }

    fn read_all(&mut self, i: usize) {
        let mut buf = std::mem::take(&mut self.buf);
        let attempt = self.clients[i].attempts;
        loop {
            let c = &self.clients[i];
            // Stop if this attempt's socket is gone (failed, retried, closed).
            if c.attempts != attempt || !matches!(c.st, St::Handshake | St::Subscribing | St::Done)
            {
                break;
            }
            let Some(mut s) = c.stream.as_ref() else {
                break;
            };
            match s.read(&mut buf) {
                Ok(0) => {
                    self.on_eof(i, "EOF".into());
                    break;
                }
                Ok(n) => self.on_bytes(i, &buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.on_eof(i, format!("read: {e}"));
                    break;
                }
            }
        }
        self.buf = buf;
    }

    fn on_eof(&mut self, i: usize, why: String) {
        let c = &mut self.clients[i];
        match c.st {
            St::Done => {
                c.closed_by_server = true;
                c.stream = None;
            }
            St::Handshake | St::Subscribing => {
                let st = c.st;
                self.lost(i, format!("{why} in state {st:?}"));
            }
            _ => {}
        }
    }

    fn on_bytes(&mut self, i: usize, data: &[u8]) {
        let now = Instant::now();
        let mut data = data.to_vec();
        if self.clients[i].st == St::Handshake {
            let c = &mut self.clients[i];
            c.hbuf.extend_from_slice(&data);
            let end = match response_head_end(&c.hbuf) {
                Ok(Some(end)) => end,
                Ok(None) => return,
                Err(e) => return self.lost(i, e),
            };
            if let Err(e) = check_handshake_response(&c.hbuf[..end], &c.key) {
                return self.lost(i, e);
            }
            data = c.hbuf.split_off(end);
            c.hbuf.clear();
            let channel = &self.channels[c.chan];
            let out = match self.phase {
                Phase::Initial => connect_subscribe_frame(channel, None),
                Phase::Recover => connect_subscribe_frame(channel, Some((c.offset, &c.epoch))),
            };
            let Some(mut s) = c.stream.as_ref() else {
                return;
            };
            if let Err(e) = s.write_all(&out) {
                return self.lost(i, format!("write connect/subscribe: {e}"));
            }
            c.st = St::Subscribing;
            if data.is_empty() {
                return;
            }
        }
        let mut lines: Vec<Vec<u8>> = Vec::new();
        let mut ctrl_pings: Vec<Vec<u8>> = Vec::new();
        let mut closed: Option<Option<u16>> = None;
        let mut binary: Option<usize> = None;
        let res = self.clients[i].dec.feed(&data, &mut |ev| match ev {
            WsEvent::Text(m) => lines.extend(json_lines(m).map(<[u8]>::to_vec)),
            WsEvent::Ping(p) => ctrl_pings.push(p.to_vec()),
            WsEvent::Close(code) => closed = closed.or(Some(code)),
            WsEvent::Binary(b) => binary = Some(b.len()),
            WsEvent::Pong => {}
        });
        if let Some(len) = binary {
            self.note_unexpected(i, format!("(a binary message of {len} bytes)").as_bytes());
        }
        for p in &ctrl_pings {
            let mut out = Vec::new();
            encode_client_frame(&mut out, 0xA, p);
            if let Some(mut s) = self.clients[i].stream.as_ref() {
                let _ = s.write_all(&out);
            }
        }
        for l in &lines {
            self.on_line(i, l, now);
        }
        if let Err(e) = res {
            return self.on_eof(i, format!("protocol: {e}"));
        }
        if let Some(code) = closed {
            self.on_eof(i, format!("close frame (code {code:?})"));
        }
    }

    fn note_unexpected(&mut self, i: usize, line: &[u8]) {
        self.unexpected += 1;
        if self.first_unexpected.is_none() {
            self.first_unexpected = Some(format!(
                "client #{i}: {}",
                String::from_utf8_lossy(&line[..line.len().min(300)])
            ));
        }
    }

    fn on_line(&mut self, i: usize, line: &[u8], now: Instant) {
        if is_ping_line(line) {
            self.pings += 1;
            let mut out = Vec::new();
            encode_client_frame(&mut out, 1, b"{}");
            if let Some(mut s) = self.clients[i].stream.as_ref() {
                let _ = s.write_all(&out);
            }
            return;
        }
        let v: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(_) => return self.note_unexpected(i, line),
        };
        if let Some(id) = v.get("id").and_then(Value::as_u64) {
            if let Some(e) = v.get("error") {
                return self.settle_fail(i, Fail::Error, format!("error reply to id {id}: {e}"));
            }
            match id {
                1 if v.get("connect").is_some() => {}
                2 if v.get("subscribe").is_some() && self.clients[i].st == St::Subscribing => {
                    self.on_subscribed(i, &v["subscribe"], now)
                }
                _ => self.note_unexpected(i, line),
            }
            return;
        }
        let Some(p) = v.pointer("/push/pub") else {
            return self.note_unexpected(i, line);
        };
        let c = &mut self.clients[i];
        let chan_ok = v.pointer("/push/channel").and_then(Value::as_str)
            == Some(self.channels[c.chan].as_str());
        let off = p.get("offset").and_then(Value::as_u64);
        let (true, Some(off), St::Done) = (chan_ok, off, c.st) else {
            return self.note_unexpected(i, line);
        };
        c.pushes += 1;
        match off.cmp(&(c.offset + 1)) {
            std::cmp::Ordering::Equal => c.offset = off,
            std::cmp::Ordering::Greater => {
                c.gaps += off - c.offset - 1;
                c.offset = off;
            }
            std::cmp::Ordering::Less => c.dups += 1,
        }
    }

    fn on_subscribed(&mut self, i: usize, s: &Value, now: Instant) {
        let missed = self.missed;
        let c = &mut self.clients[i];
        c.t_reply = Some(now);
        let epoch = s.get("epoch").and_then(Value::as_str).unwrap_or("");
        let offset = s.get("offset").and_then(Value::as_u64);
        let flag = |k: &str| s.get(k).and_then(Value::as_bool).unwrap_or(false);
        match self.phase {
            Phase::Initial => {
                let (Some(offset), false, true) = (offset, epoch.is_empty(), flag("recoverable"))
                else {
                    return self.settle_fail(
                        i,
                        Fail::Error,
                        format!("subscribe reply without recoverable position: {s}"),
                    );
                };
                c.epoch = epoch.to_string();
                c.offset = offset;
                self.settle_ok(i);
            }
            Phase::Recover => {
                let mut probs: Vec<String> = Vec::new();
                let mut kind = Fail::WrongPubs;
                if !flag("recovered") {
                    kind = Fail::NotRecovered;
                    probs.push("recovered is not true".into());
                }
                if !flag("was_recovering") {
                    probs.push("was_recovering is not true".into());
                }
                if epoch != c.epoch {
                    probs.push(format!("epoch {epoch:?}, expected {:?}", c.epoch));
                }
                if offset != Some(c.offset) {
                    probs.push(format!("offset {offset:?}, expected {}", c.offset));
                }
                let empty = Vec::new();
                let pubs = s
                    .get("publications")
                    .and_then(Value::as_array)
                    .unwrap_or(&empty);
                if pubs.len() as u64 != missed {
                    probs.push(format!("{} publications, expected {missed}", pubs.len()));
                }
                let mut last = c.offset;
                for (j, p) in pubs.iter().enumerate() {
                    let want = c.offset + 1 + j as u64;
                    let got = p.get("offset").and_then(Value::as_u64);
                    let m = p.pointer("/data/m").and_then(Value::as_u64);
                    if got != Some(want) || m != Some(j as u64 + 1) {
                        probs.push(format!(
                            "publication #{j}: offset {got:?} m {m:?}, expected offset {want} m {}",
                            j + 1
                        ));
                        break;
                    }
                    last = want;
                }
                c.offset = last;
                if probs.is_empty() {
                    self.settle_ok(i);
                } else {
                    let text = format!("{}; reply: {}", probs.join("; "), short(&s.to_string()));
                    self.settle_fail(i, kind, text);
                }
            }
        }
    }

    /// Sends a WebSocket close (1000) on every open connection and drops it.
    pub fn close_all(&mut self) {
        let mut frame = Vec::new();
        encode_client_frame(&mut frame, 0x8, &1000u16.to_be_bytes());
        for c in &mut self.clients {
            if let Some(mut s) = c.stream.take() {
                let _ = s.write_all(&frame);
            }
        }
    }
}

fn short(s: &str) -> String {
    if s.len() <= 400 {
        s.to_string()
    } else {
        let mut end = 400;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}... ({} bytes)", &s[..end], s.len())
    }
}

/// Source address of client `i` in `phase` (0 = initial, 1 = storm): each
/// phase has its own `n_src` addresses, so the storm's connections never meet
/// the first ones' TIME_WAIT ports.
pub fn phase_src(phase: usize, i: usize, n_src: usize) -> Ipv4Addr {
    src_addr(phase * n_src + i % n_src, 2 * n_src)
}
