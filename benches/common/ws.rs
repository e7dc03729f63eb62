//! The client side of RFC 6455 and of the Centrifugo v2 JSON protocol, as much as the benches
//! need: masked client frames, an incremental decoder for server frames (partial frames,
//! several per read, fragmentation; a masked server frame is a protocol error), the upgrade
//! request and its check, and the connect + subscribe frame. No I/O here: hand-rolled so that a
//! connection costs a socket and a decoder, not a library's per-connection state.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};

static MASK_SEED: AtomicU32 = AtomicU32::new(0x9e37_79b9);

/// Appends one masked client frame (FIN set) to `out`.
pub fn encode_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | (opcode & 0x0f));
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    // xorshift: masks only need to be unpredictable-ish, not cryptographic.
    let mut x = MASK_SEED.fetch_add(0x6d2b_79f5, Ordering::Relaxed) | 1;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    let mask = x.to_be_bytes();
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

/// A parsed frame header: (fin, opcode, header_len, payload_len, mask).
pub struct FrameHdr {
    pub fin: bool,
    pub opcode: u8,
    pub hdr_len: usize,
    pub len: usize,
    pub mask: Option<[u8; 4]>,
}

/// Parses a frame header from `buf`; `Ok(None)` if more bytes are needed.
pub fn parse_frame_hdr(buf: &[u8]) -> Result<Option<FrameHdr>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    if buf[0] & 0x70 != 0 {
        return Err(format!("RSV bits set in frame byte 0x{:02x}", buf[0]));
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let l7 = (buf[1] & 0x7f) as usize;
    let (len, mut hdr) = match l7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let l = u64::from_be_bytes(b);
            if l > (1 << 31) {
                return Err(format!("absurd frame length {l}"));
            }
            (l as usize, 10)
        }
        n => (n, 2),
    };
    let mask = if masked {
        if buf.len() < hdr + 4 {
            return Ok(None);
        }
        let m = [buf[hdr], buf[hdr + 1], buf[hdr + 2], buf[hdr + 3]];
        hdr += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(FrameHdr {
        fin,
        opcode,
        hdr_len: hdr,
        len,
        mask,
    }))
}

/// What a complete message (after reassembly) turned out to be.
pub enum WsEvent<'a> {
    Text(&'a [u8]),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong,
    /// A Close frame with its status code, if it carried one.
    Close(Option<u16>),
}

/// Incremental per-connection frame decoder (handles partial frames, several
/// frames per read, fragmentation, masked frames).
#[derive(Default)]
pub struct WsDecoder {
    pub pending: Vec<u8>,
    frag: Vec<u8>,
    frag_op: u8,
    in_frag: bool,
}

impl WsDecoder {
    /// Feeds `data`; calls `f` for each complete message. Returns Err on a
    /// protocol violation.
    pub fn feed(&mut self, data: &[u8], f: &mut dyn FnMut(WsEvent)) -> Result<(), String> {
        if self.pending.is_empty() {
            let used = self.decode(data, f)?;
            self.pending.extend_from_slice(&data[used..]);
        } else {
            let mut buf = std::mem::take(&mut self.pending);
            buf.extend_from_slice(data);
            let used = self.decode(&buf, f)?;
            buf.drain(..used);
            self.pending = buf;
        }
        Ok(())
    }

    fn decode(&mut self, buf: &[u8], f: &mut dyn FnMut(WsEvent)) -> Result<usize, String> {
        let mut pos = 0;
        while let Some(h) = parse_frame_hdr(&buf[pos..])? {
            let start = pos + h.hdr_len;
            let end = start + h.len;
            if end > buf.len() {
                break;
            }
            if h.mask.is_some() {
                return Err("server sent a masked frame".into());
            }
            let payload = &buf[start..end];
            pos = end;
            match h.opcode {
                0x0 => {
                    if !self.in_frag {
                        return Err("continuation frame without start".into());
                    }
                    self.frag.extend_from_slice(payload);
                    if h.fin {
                        self.in_frag = false;
                        let msg = std::mem::take(&mut self.frag);
                        if self.frag_op == 1 {
                            f(WsEvent::Text(&msg));
                        } else {
                            f(WsEvent::Binary(&msg));
                        }
                    }
                }
                0x1 | 0x2 => {
                    if self.in_frag {
                        return Err("new data frame inside a fragmented message".into());
                    }
                    if h.fin {
                        if h.opcode == 1 {
                            f(WsEvent::Text(payload));
                        } else {
                            f(WsEvent::Binary(payload));
                        }
                    } else {
                        self.in_frag = true;
                        self.frag_op = h.opcode;
                        self.frag.clear();
                        self.frag.extend_from_slice(payload);
                    }
                }
                0x8 => f(WsEvent::Close(
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
                )),
                0x9 => f(WsEvent::Ping(payload)),
                0xA => f(WsEvent::Pong),
                op => return Err(format!("unknown opcode {op}")),
            }
        }
        Ok(pos)
    }
}

/// Splits a text message into its newline-separated JSON objects.
pub fn json_lines(msg: &[u8]) -> impl Iterator<Item = &[u8]> {
    msg.split(|&b| b == b'\n').filter_map(|l| {
        let l = l.trim_ascii();
        (!l.is_empty()).then_some(l)
    })
}

/// Is this Centrifugo JSON line a server ping (`{}`)?
pub fn is_ping_line(line: &[u8]) -> bool {
    line.iter()
        .filter(|b| !b.is_ascii_whitespace())
        .eq(b"{}".iter())
}

/// The upgrade request for `/connection/websocket` on `host` with `key`.
#[allow(dead_code, reason = "each bench uses part of the shared code")]
pub fn handshake_request(host: SocketAddr, key: &str) -> String {
    handshake_request_as(host, key, Format::Json)
}

/// A client's wire format: the JSON protocol, or protobuf (`centrifuge-protobuf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code, reason = "each bench uses part of the shared code")]
pub enum Format {
    Json,
    Protobuf,
}

impl Format {
    #[allow(dead_code, reason = "each bench uses part of the shared code")]
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Protobuf => "protobuf",
        }
    }
}

/// The upgrade request, offering the protobuf subprotocol for [`Format::Protobuf`].
pub fn handshake_request_as(host: SocketAddr, key: &str, format: Format) -> String {
    let protocol = match format {
        Format::Json => "",
        Format::Protobuf => "Sec-WebSocket-Protocol: centrifuge-protobuf\r\n",
    };
    format!(
        "GET /connection/websocket HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{protocol}\r\n"
    )
}

/// Whether a 101 response head answered the protobuf subprotocol.
#[allow(dead_code, reason = "each bench uses part of the shared code")]
pub fn answered_protobuf(head: &[u8]) -> bool {
    String::from_utf8_lossy(head)
        .to_ascii_lowercase()
        .contains("sec-websocket-protocol: centrifuge-protobuf\r\n")
}

/// One binary frame with the protobuf `connect` (id 1) and `subscribe` to `channel` (id 2),
/// varint-delimited.
#[allow(dead_code, reason = "each bench uses part of the shared code")]
pub fn connect_subscribe_frame_protobuf(channel: &str) -> Vec<u8> {
    use prost::Message as _;
    use shardcast::protocol::pb;
    let mut payload = Vec::new();
    for cmd in [
        pb::Command {
            id: 1,
            connect: Some(pb::ConnectRequest::default()),
            ..Default::default()
        },
        pb::Command {
            id: 2,
            subscribe: Some(pb::SubscribeRequest {
                channel: channel.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        },
    ] {
        cmd.encode_length_delimited(&mut payload).expect("vec");
    }
    let mut out = Vec::with_capacity(payload.len() + 16);
    encode_client_frame(&mut out, 2, &payload);
    out
}

/// The protobuf replies of one binary message; `Err` when it is not varint-delimited replies.
#[allow(dead_code, reason = "each bench uses part of the shared code")]
pub fn protobuf_replies(mut msg: &[u8]) -> Result<Vec<shardcast::protocol::pb::Reply>, String> {
    use prost::Message as _;
    let mut out = Vec::new();
    while !msg.is_empty() {
        out.push(
            shardcast::protocol::pb::Reply::decode_length_delimited(&mut msg)
                .map_err(|e| format!("bad protobuf reply: {e}"))?,
        );
    }
    Ok(out)
}

/// The protobuf server ping: one empty reply.
#[allow(dead_code, reason = "each bench uses part of the shared code")]
pub const PROTOBUF_PING: &[u8] = &[0];

/// The longest response head accepted.
const MAX_RESPONSE_HEAD_BYTES: usize = 16384;

/// Where the response head in `buf` ends (after its blank line); `Ok(None)` if more bytes are
/// needed, an error once the head is too large.
pub fn response_head_end(buf: &[u8]) -> Result<Option<usize>, String> {
    match buf.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(p) => Ok(Some(p + 4)),
        None if buf.len() > MAX_RESPONSE_HEAD_BYTES => Err("handshake response too large".into()),
        None => Ok(None),
    }
}

/// Checks a complete response head: status 101 and the Sec-WebSocket-Accept for `key`.
pub fn check_handshake_response(head: &[u8], key: &str) -> Result<(), String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(head)
        .map_err(|e| format!("bad handshake response: {e}"))?;
    if resp.code != Some(101) {
        return Err(format!(
            "handshake status {:?}: {}",
            resp.code,
            String::from_utf8_lossy(&head[..head.len().min(200)])
        ));
    }
    let want = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let got = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|h| String::from_utf8_lossy(h.value).trim().to_string());
    if got.as_deref() != Some(want.as_str()) {
        return Err(format!("bad Sec-WebSocket-Accept {got:?}"));
    }
    Ok(())
}

/// One text frame with `connect` (id 1) and `subscribe` to `channel` (id 2), the subscribe
/// recovering from `(offset, epoch)` when given.
#[allow(dead_code, reason = "the proxy bench sends connect alone")]
pub fn connect_subscribe_frame(channel: &str, recover: Option<(u64, &str)>) -> Vec<u8> {
    let channel = serde_json::to_string(channel).unwrap();
    let cmd = match recover {
        None => format!(
            "{{\"id\":1,\"connect\":{{}}}}\n{{\"id\":2,\"subscribe\":{{\"channel\":{channel}}}}}"
        ),
        Some((offset, epoch)) => format!(
            "{{\"id\":1,\"connect\":{{}}}}\n{{\"id\":2,\"subscribe\":{{\"channel\":{channel},\
             \"recover\":true,\"offset\":{offset},\"epoch\":{}}}}}",
            serde_json::to_string(epoch).unwrap()
        ),
    };
    let mut out = Vec::with_capacity(cmd.len() + 16);
    encode_client_frame(&mut out, 1, cmd.as_bytes());
    out
}
