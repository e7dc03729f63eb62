//! Blocking connect + subscribe for many connections at once: a few threads each open their
//! share (from source addresses 127.0.0.2.., one retry each), verify the connect and subscribe
//! replies, and return the sockets with their decoders for a reader thread to hold.

use super::net::{src_addr, tcp_connect};
use super::ws::{
    answered_protobuf, check_handshake_response, connect_subscribe_frame,
    connect_subscribe_frame_protobuf, encode_client_frame, handshake_request_as, is_ping_line,
    json_lines, protobuf_replies, response_head_end, Format, WsDecoder, WsEvent, PROTOBUF_PING,
};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// Opens a WebSocket to `/connection/websocket`, sends connect + subscribe in
/// one frame and waits for both replies. Returns the stream (still blocking)
/// and any bytes read past the subscribe reply.
/// Opens a WebSocket to `dst` (from `src` when given), with `timeout` on every read and write;
/// returns the socket and any bytes the server sent after its handshake response.
#[allow(dead_code, reason = "each bench uses part of the shared code")]
pub fn ws_upgrade(
    dst: SocketAddr,
    src: Option<Ipv4Addr>,
    timeout: Duration,
) -> Result<(TcpStream, Vec<u8>), String> {
    ws_upgrade_as(dst, src, timeout, Format::Json)
}

/// [`ws_upgrade`] in a wire format (protobuf: the subprotocol offered and checked).
#[allow(dead_code, reason = "each bench uses part of the shared code")]
pub fn ws_upgrade_as(
    dst: SocketAddr,
    src: Option<Ipv4Addr>,
    timeout: Duration,
    format: Format,
) -> Result<(TcpStream, Vec<u8>), String> {
    let mut s = tcp_connect(dst, src, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    let key = tungstenite::handshake::client::generate_key();
    s.write_all(handshake_request_as(dst, &key, format).as_bytes())
        .map_err(|e| format!("write handshake: {e}"))?;
    let mut buf = Vec::with_capacity(512);
    let mut tmp = [0u8; 2048];
    let hdr_end = loop {
        let n = s
            .read(&mut tmp)
            .map_err(|e| format!("read handshake: {e}"))?;
        if n == 0 {
            return Err("EOF during handshake".into());
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(end) = response_head_end(&buf)? {
            break end;
        }
    };
    check_handshake_response(&buf[..hdr_end], &key)?;
    if format == Format::Protobuf && !answered_protobuf(&buf[..hdr_end]) {
        return Err("the server did not answer the centrifuge-protobuf subprotocol".into());
    }
    Ok((s, buf.split_off(hdr_end)))
}

#[allow(dead_code, reason = "each bench uses part of the shared code")]
fn ws_connect_subscribe(
    dst: SocketAddr,
    src: Option<Ipv4Addr>,
    channel: &str,
    timeout: Duration,
    format: Format,
) -> Result<(TcpStream, WsDecoder), String> {
    let (mut s, mut data) = ws_upgrade_as(dst, src, timeout, format)?;
    let mut tmp = [0u8; 2048];
    let mut dec = WsDecoder::default();
    let hello = match format {
        Format::Json => connect_subscribe_frame(channel, None),
        Format::Protobuf => connect_subscribe_frame_protobuf(channel),
    };
    s.write_all(&hello)
        .map_err(|e| format!("write connect: {e}"))?;
    let (mut got_connect, mut got_sub) = (false, false);
    let mut err: Option<String> = None;
    let mut pings = 0;
    let mut closed = false;
    loop {
        let mut on = |ev: WsEvent| match ev {
            WsEvent::Text(msg) => {
                for line in json_lines(msg) {
                    if is_ping_line(line) {
                        pings += 1;
                        continue;
                    }
                    let v: serde_json::Value = match serde_json::from_slice(line) {
                        Ok(v) => v,
                        Err(e) => {
                            err = Some(format!("bad JSON reply {e}"));
                            continue;
                        }
                    };
                    if let Some(e) = v.get("error") {
                        err = Some(format!("error reply: {e}"));
                    }
                    match v.get("id").and_then(|x| x.as_u64()) {
                        Some(1) if v.get("connect").is_some() => got_connect = true,
                        Some(2) if v.get("subscribe").is_some() => got_sub = true,
                        _ => {}
                    }
                }
            }
            WsEvent::Binary(msg) if format == Format::Protobuf => {
                if msg == PROTOBUF_PING {
                    pings += 1;
                    return;
                }
                match protobuf_replies(msg) {
                    Ok(replies) => {
                        for r in replies {
                            if let Some(e) = &r.error {
                                err = Some(format!("error reply: {e:?}"));
                            }
                            match r.id {
                                1 if r.connect.is_some() => got_connect = true,
                                2 if r.subscribe.is_some() => got_sub = true,
                                _ => {}
                            }
                        }
                    }
                    Err(e) => err = Some(e),
                }
            }
            WsEvent::Close(_) => closed = true,
            _ => {}
        };
        dec.feed(&data, &mut on)?;
        if let Some(e) = err.take() {
            return Err(e);
        }
        if closed {
            return Err("server closed during connect/subscribe".into());
        }
        for _ in 0..pings {
            let mut out = Vec::new();
            match format {
                Format::Json => encode_client_frame(&mut out, 1, b"{}"),
                Format::Protobuf => encode_client_frame(&mut out, 2, PROTOBUF_PING),
            }
            s.write_all(&out).map_err(|e| format!("write pong: {e}"))?;
        }
        pings = 0;
        if got_connect && got_sub {
            return Ok((s, dec));
        }
        let n = s
            .read(&mut tmp)
            .map_err(|e| format!("read connect/subscribe reply: {e}"))?;
        if n == 0 {
            return Err("EOF before subscribe reply".into());
        }
        data.clear();
        data.extend_from_slice(&tmp[..n]);
    }
}

/// A connected, subscribed WebSocket: its index (`first + i` in [`connect_many`]), the
/// blocking stream, and the decoder holding any bytes read past the subscribe reply.
#[allow(dead_code, reason = "each bench uses part of the shared code")]
pub struct WsConn {
    pub id: usize,
    pub stream: TcpStream,
    pub dec: WsDecoder,
}

/// Connects `count` subscribers using `threads` blocking workers. Connection
/// `first + i` uses source address `src_addr(first + i, n_src)` and channel
/// `channel(first + i)`.
#[allow(dead_code, reason = "each bench uses part of the shared code")]
pub fn connect_many(
    dst: SocketAddr,
    first: usize,
    count: usize,
    threads: usize,
    n_src: usize,
    channel: Arc<dyn Fn(usize) -> String + Send + Sync>,
) -> Result<Vec<WsConn>, String> {
    connect_many_as(dst, first, count, threads, n_src, channel, Format::Json)
}

/// [`connect_many`] with clients of one wire format.
#[allow(dead_code, reason = "each bench uses part of the shared code")]
pub fn connect_many_as(
    dst: SocketAddr,
    first: usize,
    count: usize,
    threads: usize,
    n_src: usize,
    channel: Arc<dyn Fn(usize) -> String + Send + Sync>,
    format: Format,
) -> Result<Vec<WsConn>, String> {
    spread(first, count, threads, n_src, move |idx, src| {
        let (stream, dec) =
            ws_connect_subscribe(dst, Some(src), &channel(idx), Duration::from_secs(10), format)?;
        Ok(WsConn {
            id: idx,
            stream,
            dec,
        })
    })
}

/// Opens connections `first..first + count` with `threads` blocking workers (connection `idx`
/// from source address `src_addr(idx, n_src)`), each with one retry: a transient failure (e.g.
/// a SYN dropped on a full accept queue) should not kill a 20K-connection run. The first
/// failure stops every worker; the result is in connection order.
fn spread<T: Send + 'static>(
    first: usize,
    count: usize,
    threads: usize,
    n_src: usize,
    connect: impl Fn(usize, Ipv4Addr) -> Result<T, String> + Send + Sync + 'static,
) -> Result<Vec<T>, String> {
    let threads = threads.clamp(1, count.max(1));
    let abort = Arc::new(AtomicBool::new(false));
    let connect = Arc::new(connect);
    let mut handles = Vec::new();
    for t in 0..threads {
        let connect = connect.clone();
        let abort = abort.clone();
        handles.push(thread::spawn(move || {
            let mut out = Vec::new();
            let mut i = t;
            while i < count {
                if abort.load(Ordering::Relaxed) {
                    return Err(String::new());
                }
                let idx = first + i;
                let src = src_addr(idx, n_src);
                let made = connect(idx, src).or_else(|_| {
                    thread::sleep(Duration::from_millis(50));
                    connect(idx, src)
                });
                match made {
                    Ok(c) => out.push((idx, c)),
                    Err(e) => {
                        abort.store(true, Ordering::Relaxed);
                        return Err(format!("connection #{idx} from {src}: {e}"));
                    }
                }
                i += threads;
            }
            Ok(out)
        }));
    }
    let mut all = Vec::with_capacity(count);
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(v)) => all.extend(v),
            Ok(Err(e)) => {
                if !e.is_empty() && first_err.is_none() {
                    first_err = Some(e);
                }
            }
            Err(_) => first_err = Some("connect thread panicked".into()),
        }
    }
    if let Some(e) = first_err {
        return Err(format!("{e} ({} of {count} connected)", all.len()));
    }
    all.sort_by_key(|(idx, _)| *idx);
    Ok(all.into_iter().map(|(_, c)| c).collect())
}

/// Opens an idle SSE stream (`GET /connection/sse?cf_connect=...`, the bidirectional
/// emulation's stream, as the JS SDK's EventSource transport opens it) whose connect command
/// is followed by a subscribe to `channel`, and waits for both replies. Returns the socket
/// (still blocking).
#[allow(dead_code, reason = "each bench uses part of the shared code")]
pub fn sse_connect_subscribe(
    dst: SocketAddr,
    src: Option<Ipv4Addr>,
    channel: &str,
    timeout: Duration,
) -> Result<TcpStream, String> {
    let mut s = tcp_connect(dst, src, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    let commands = format!(
        "{{\"id\":1,\"connect\":{{}}}}\n{{\"id\":2,\"subscribe\":{{\"channel\":{}}}}}",
        serde_json::Value::from(channel)
    );
    let q = percent_encoding::utf8_percent_encode(&commands, percent_encoding::NON_ALPHANUMERIC);
    s.write_all(format!("GET /connection/sse?cf_connect={q} HTTP/1.1\r\nHost: {dst}\r\nAccept: text/event-stream\r\n\r\n").as_bytes())
        .map_err(|e| format!("write request: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    let mut tmp = [0u8; 2048];
    loop {
        let n = s.read(&mut tmp).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(format!("EOF before the subscribe reply: {}", String::from_utf8_lossy(&buf)));
        }
        buf.extend_from_slice(&tmp[..n]);
        let text = String::from_utf8_lossy(&buf);
        if !text.starts_with("HTTP/1.1 200") && text.contains("\r\n") {
            return Err(format!("refused: {}", text.lines().next().unwrap_or("")));
        }
        if let Some(at) = text.find("data: {\"id\":2,") {
            let reply = &text[at..];
            if reply.contains("\n\n") {
                if reply.contains("\"error\"") {
                    return Err(format!("subscribe failed: {reply}"));
                }
                return Ok(s);
            }
        }
    }
}

/// [`connect_many`] for idle SSE streams ([`sse_connect_subscribe`]), one retry each.
#[allow(dead_code, reason = "each bench uses part of the shared code")]
pub fn sse_connect_many(
    dst: SocketAddr,
    first: usize,
    count: usize,
    threads: usize,
    n_src: usize,
    channel: Arc<dyn Fn(usize) -> String + Send + Sync>,
) -> Result<Vec<TcpStream>, String> {
    spread(first, count, threads, n_src, move |idx, src| {
        sse_connect_subscribe(dst, Some(src), &channel(idx), Duration::from_secs(10))
    })
}
