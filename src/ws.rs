//! RFC 6455 framing over caller-owned buffers, with no I/O and no per-connection buffer while idle.
//!
//! Header parsing is tungstenite's ([`FrameHeader::parse`]); what is ours is the buffer policy
//! (DESIGN §3): the kernel receives into one of the shard's provided buffers, frames are parsed
//! and unmasked in place there,
//! and only the unparsed tail of a partial frame (or a fragmented message being reassembled) is
//! kept per connection, in a [`Partial`] that exists only while needed. Outbound frames are built
//! in one allocation with room for the header in front ([`FrameBuf`]), then shared as `Bytes`.
//!
//! Payload lengths: a 64-bit length with its most significant bit set (RFC 6455 §5.2 forbids
//! it) is refused at once with 1002, like any malformed header. Non-minimal length encodings (a
//! 16- or 64-bit field holding a length that would fit a shorter one) are accepted and decoded
//! exactly, as tungstenite and the Autobahn suite do: they cost nothing and refusing them would
//! break lenient clients for no safety gain (the message size limit applies either way).

use bytes::Bytes;
use std::io::Cursor;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Close codes we send (RFC 6455 §7.4.1).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const TOO_BIG: u16 = 1009;
}

/// Largest header a server frame needs: 2 bytes + 8 bytes of extended length (no mask).
pub const HEADROOM: usize = 10;

/// A frame being built: `HEADROOM` bytes reserved, then the payload.
pub struct FrameBuf(Vec<u8>);

impl FrameBuf {
    /// Starts a frame whose payload is expected to be about `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        let mut v = Vec::with_capacity(HEADROOM + capacity);
        v.resize(HEADROOM, 0);
        FrameBuf(v)
    }

    /// The buffer to append payload bytes to (the headroom is already in it).
    pub fn payload(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }

    /// Payload length so far.
    pub fn payload_len(&self) -> usize {
        self.0.len() - HEADROOM
    }

    /// Writes the header in front of the payload and returns the frame, without copying.
    pub fn finish(self, opcode: u8) -> Bytes {
        let mut v = self.0;
        let len = v.len() - HEADROOM;
        let start = if len < 126 {
            v[HEADROOM - 2] = 0x80 | opcode;
            v[HEADROOM - 1] = len as u8;
            HEADROOM - 2
        } else if len <= u16::MAX as usize {
            v[HEADROOM - 4] = 0x80 | opcode;
            v[HEADROOM - 3] = 126;
            v[HEADROOM - 2..HEADROOM].copy_from_slice(&(len as u16).to_be_bytes());
            HEADROOM - 4
        } else {
            v[0] = 0x80 | opcode;
            v[1] = 127;
            v[2..HEADROOM].copy_from_slice(&(len as u64).to_be_bytes());
            0
        };
        Bytes::from(v).slice(start..)
    }
}

/// Opcodes of the frames we send.
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PONG: u8 = 0xA;

/// A complete text frame holding `payload`.
pub fn text_frame(payload: &[u8]) -> Bytes {
    let mut f = FrameBuf::with_capacity(payload.len());
    f.payload().extend_from_slice(payload);
    f.finish(OP_TEXT)
}

/// A close frame with a code and a reason (truncated to fit a control frame).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut f = FrameBuf::with_capacity(2 + reason.len());
    f.payload().extend_from_slice(&code.to_be_bytes());
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    f.payload().extend_from_slice(&reason.as_bytes()[..end]);
    f.finish(OP_CLOSE)
}

/// A message or control frame decoded from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete message; `text` messages are valid UTF-8.
    Message {
        text: bool,
        payload: &'a [u8],
    },
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// The client started the close handshake; `None` when the close had no status code.
    Close(Option<(u16, &'a str)>),
}

/// What the consumer of events wants next.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop decoding (the connection is closing).
    Stop,
}

/// A framing violation: close the connection with this code.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

const fn violation(code: u16, reason: &'static str) -> Violation {
    Violation { code, reason }
}

/// Per-connection decoder state that exists only while a frame or message is incomplete.
#[derive(Debug, Default)]
pub struct Partial {
    /// Bytes of a frame whose end has not arrived yet.
    tail: Vec<u8>,
    /// A fragmented message being reassembled: payload so far.
    message: Vec<u8>,
    /// Whether `message` is in progress, and whether it is text.
    in_message: Option<bool>,
    /// Prefix of `message` already checked as UTF-8.
    utf8_checked: usize,
}

impl Partial {
    /// Heap bytes held (for accounting).
    pub fn capacity(&self) -> usize {
        self.tail.capacity() + self.message.capacity()
    }
}

/// Decodes client frames.
#[derive(Debug, Clone, Copy)]
pub struct Decoder {
    /// Largest message (frame payload, or reassembled fragments), bytes.
    pub max_message_bytes: usize,
}

impl Decoder {
    /// Decodes everything complete in `input` (freshly read bytes, mutable so payloads are
    /// unmasked in place), calling `on_event` per message or control frame. Incomplete bytes
    /// are kept in `partial`, which is dropped again once empty.
    pub fn feed(
        &self,
        partial: &mut Option<Box<Partial>>,
        input: &mut [u8],
        on_event: &mut dyn FnMut(Event<'_>) -> Flow,
    ) -> Result<Flow, Violation> {
        let result = match partial.as_mut() {
            Some(p) if !p.tail.is_empty() => {
                let mut buf = std::mem::take(&mut p.tail);
                buf.extend_from_slice(input);
                let r = self.decode(p, &mut buf, on_event);
                if let Ok((_, used)) = r {
                    buf.drain(..used);
                    p.tail = buf;
                }
                r
            }
            _ => {
                let p = partial.get_or_insert_with(Default::default);
                let r = self.decode(p, input, on_event);
                if let Ok((_, used)) = r {
                    p.tail.extend_from_slice(&input[used..]);
                }
                r
            }
        };
        if let Some(p) = partial.as_ref() {
            if p.tail.is_empty() && p.in_message.is_none() {
                *partial = None;
            }
        }
        result.map(|(flow, _)| flow)
    }

    /// Decodes complete frames at the start of `buf`; returns how many bytes were consumed.
    fn decode(
        &self,
        p: &mut Partial,
        buf: &mut [u8],
        on_event: &mut dyn FnMut(Event<'_>) -> Flow,
    ) -> Result<(Flow, usize), Violation> {
        let mut pos = 0;
        loop {
            let mut cursor = Cursor::new(&buf[pos..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok((Flow::Continue, pos)),
                Err(_) => return Err(violation(close::PROTOCOL_ERROR, "bad frame header")),
            };
            let header_len = cursor.position() as usize;
            // RFC 6455 §5.2: "the most significant bit MUST be 0". Refused from the header, so
            // no length near 2^64 reaches the arithmetic below (nor makes us wait for it).
            if len >> 63 != 0 {
                return Err(violation(close::PROTOCOL_ERROR, "bad frame length"));
            }
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Err(violation(close::PROTOCOL_ERROR, "reserved bits set"));
            }
            let Some(mask) = header.mask else {
                return Err(violation(close::PROTOCOL_ERROR, "client frame not masked"));
            };
            let is_control = matches!(header.opcode, OpCode::Control(_));
            if is_control && (len > 125 || !header.is_final) {
                return Err(violation(close::PROTOCOL_ERROR, "bad control frame"));
            }
            let so_far = if matches!(header.opcode, OpCode::Data(Data::Continue)) {
                p.message.len() as u64
            } else {
                0
            };
            if so_far.saturating_add(len) > self.max_message_bytes as u64 {
                return Err(violation(close::TOO_BIG, "message too big"));
            }
            let len = len as usize;
            let start = pos + header_len;
            if buf.len() - start < len {
                return Ok((Flow::Continue, pos));
            }
            let payload = &mut buf[start..start + len];
            unmask(payload, mask);
            pos = start + len;
            let flow = match header.opcode {
                OpCode::Control(Control::Ping) => on_event(Event::Ping(payload)),
                OpCode::Control(Control::Pong) => on_event(Event::Pong(payload)),
                OpCode::Control(Control::Close) => {
                    let event = parse_close(payload)?;
                    on_event(event);
                    Flow::Stop
                }
                OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                    return Err(violation(close::PROTOCOL_ERROR, "reserved opcode"))
                }
                OpCode::Data(Data::Text) | OpCode::Data(Data::Binary) => {
                    if p.in_message.is_some() {
                        return Err(violation(close::PROTOCOL_ERROR, "expected continuation"));
                    }
                    let text = matches!(header.opcode, OpCode::Data(Data::Text));
                    if header.is_final {
                        if text && std::str::from_utf8(payload).is_err() {
                            return Err(violation(close::INVALID_PAYLOAD, "invalid utf-8"));
                        }
                        on_event(Event::Message { text, payload })
                    } else {
                        p.in_message = Some(text);
                        p.message.extend_from_slice(payload);
                        p.utf8_checked = 0;
                        check_utf8_prefix(p)?;
                        Flow::Continue
                    }
                }
                OpCode::Data(Data::Continue) => {
                    let Some(text) = p.in_message else {
                        return Err(violation(close::PROTOCOL_ERROR, "unexpected continuation"));
                    };
                    p.message.extend_from_slice(payload);
                    check_utf8_prefix(p)?;
                    if header.is_final {
                        if text && std::str::from_utf8(&p.message[p.utf8_checked..]).is_err() {
                            return Err(violation(close::INVALID_PAYLOAD, "invalid utf-8"));
                        }
                        let message = std::mem::take(&mut p.message);
                        p.in_message = None;
                        p.utf8_checked = 0;
                        on_event(Event::Message {
                            text,
                            payload: &message,
                        })
                    } else {
                        Flow::Continue
                    }
                }
            };
            if flow == Flow::Stop {
                return Ok((Flow::Stop, pos));
            }
        }
    }
}

/// Fails fast on UTF-8 that can never become valid, allowing a sequence cut at the end.
fn check_utf8_prefix(p: &mut Partial) -> Result<(), Violation> {
    if p.in_message != Some(true) {
        return Ok(());
    }
    match std::str::from_utf8(&p.message[p.utf8_checked..]) {
        Ok(_) => p.utf8_checked = p.message.len(),
        Err(e) if e.error_len().is_none() => p.utf8_checked += e.valid_up_to(),
        Err(_) => return Err(violation(close::INVALID_PAYLOAD, "invalid utf-8")),
    }
    Ok(())
}

fn parse_close(payload: &[u8]) -> Result<Event<'_>, Violation> {
    match payload.len() {
        0 => Ok(Event::Close(None)),
        1 => Err(violation(close::PROTOCOL_ERROR, "bad close payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !valid {
                return Err(violation(close::PROTOCOL_ERROR, "bad close code"));
            }
            let reason = std::str::from_utf8(&payload[2..])
                .map_err(|_| violation(close::INVALID_PAYLOAD, "invalid utf-8"))?;
            Ok(Event::Close(Some((code, reason))))
        }
    }
}

/// XORs a client payload with its mask (RFC 6455 §5.3).
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let v = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Encodes a masked client frame (used by tests and benches that play the client).
pub fn client_frame(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[start..], mask);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum Owned {
        Msg(bool, Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<(u16, String)>),
    }

    fn run(dec: &Decoder, chunks: &[&[u8]]) -> (Vec<Owned>, Result<Flow, Violation>, bool) {
        let mut partial = None;
        let mut events = Vec::new();
        let mut last = Ok(Flow::Continue);
        for chunk in chunks {
            let mut c = chunk.to_vec();
            last = dec.feed(&mut partial, &mut c, &mut |e| {
                events.push(match e {
                    Event::Message { text, payload } => Owned::Msg(text, payload.to_vec()),
                    Event::Ping(p) => Owned::Ping(p.to_vec()),
                    Event::Pong(p) => Owned::Pong(p.to_vec()),
                    Event::Close(c) => Owned::Close(c.map(|(a, b)| (a, b.to_string()))),
                });
                Flow::Continue
            });
            if last.is_err() {
                break;
            }
        }
        (events, last, partial.is_none())
    }

    const M: [u8; 4] = [1, 2, 3, 4];
    fn dec() -> Decoder {
        Decoder {
            max_message_bytes: 1024,
        }
    }

    #[test]
    fn whole_and_split_frames() {
        let f = client_frame(1, true, b"hello", M);
        let (ev, r, idle) = run(&dec(), &[&f]);
        assert_eq!(ev, vec![Owned::Msg(true, b"hello".to_vec())]);
        assert!(r.is_ok() && idle);
        // Byte by byte: the tail is kept, then released.
        let chunks: Vec<&[u8]> = f.chunks(1).collect();
        let (ev, _, idle) = run(&dec(), &chunks);
        assert_eq!(ev, vec![Owned::Msg(true, b"hello".to_vec())]);
        assert!(idle, "no per-connection state once the frame is complete");
    }

    #[test]
    fn fragments_and_interleaved_ping() {
        let mut bytes = client_frame(1, false, b"he", M);
        bytes.extend(client_frame(9, true, b"p", M));
        bytes.extend(client_frame(0, false, b"ll", M));
        bytes.extend(client_frame(0, true, b"o", M));
        let (ev, r, idle) = run(&dec(), &[&bytes]);
        assert_eq!(
            ev,
            vec![
                Owned::Ping(b"p".to_vec()),
                Owned::Msg(true, b"hello".to_vec())
            ]
        );
        assert!(r.is_ok() && idle);
    }

    #[test]
    fn violations() {
        let d = dec();
        let unmasked = [0x81u8, 0x01, b'a'];
        assert_eq!(
            run(&d, &[&unmasked]).1.unwrap_err().code,
            close::PROTOCOL_ERROR
        );
        let mut rsv = client_frame(1, true, b"a", M);
        rsv[0] |= 0x40;
        assert_eq!(run(&d, &[&rsv]).1.unwrap_err().code, close::PROTOCOL_ERROR);
        let reserved_op = client_frame(3, true, b"a", M);
        assert_eq!(
            run(&d, &[&reserved_op]).1.unwrap_err().code,
            close::PROTOCOL_ERROR
        );
        let frag_ping = client_frame(9, false, b"a", M);
        assert_eq!(
            run(&d, &[&frag_ping]).1.unwrap_err().code,
            close::PROTOCOL_ERROR
        );
        let big_ping = client_frame(9, true, &[0u8; 126], M);
        assert_eq!(
            run(&d, &[&big_ping]).1.unwrap_err().code,
            close::PROTOCOL_ERROR
        );
        let bad_utf8 = client_frame(1, true, &[0xff, 0xfe], M);
        assert_eq!(
            run(&d, &[&bad_utf8]).1.unwrap_err().code,
            close::INVALID_PAYLOAD
        );
        let too_big = client_frame(1, true, &[b'a'; 1025], M);
        // Refused from the header alone, before the payload arrives.
        assert_eq!(
            run(&d, &[&too_big[..8]]).1.unwrap_err().code,
            close::TOO_BIG
        );
        // A 64-bit length with the most significant bit set: 1002 from the header alone, also
        // for a continuation whose length would overflow when added to the message so far.
        for (first, opcode) in [(None, 1u8), (Some(1u8), 0u8)] {
            let mut bytes = first.map_or_else(Vec::new, |op| client_frame(op, false, b"ab", M));
            bytes.extend([0x80 | opcode, 0x80 | 127]);
            bytes.extend_from_slice(&(u64::MAX - 1).to_be_bytes());
            bytes.extend_from_slice(&M);
            assert_eq!(
                run(&d, &[&bytes]).1.unwrap_err(),
                violation(close::PROTOCOL_ERROR, "bad frame length")
            );
        }
        let cont = client_frame(0, true, b"a", M);
        assert_eq!(run(&d, &[&cont]).1.unwrap_err().code, close::PROTOCOL_ERROR);
        let mut two_starts = client_frame(1, false, b"a", M);
        two_starts.extend(client_frame(1, true, b"b", M));
        assert_eq!(
            run(&d, &[&two_starts]).1.unwrap_err().code,
            close::PROTOCOL_ERROR
        );
        // Fragmented message over the limit.
        let mut frags = client_frame(1, false, &[b'a'; 600], M);
        frags.extend(client_frame(0, true, &[b'a'; 600], M));
        assert_eq!(run(&d, &[&frags]).1.unwrap_err().code, close::TOO_BIG);
        // Invalid UTF-8 fails on the first fragment, not at the end.
        let bad_first = client_frame(1, false, &[0xce, 0xba, 0xff], M);
        assert_eq!(
            run(&d, &[&bad_first]).1.unwrap_err().code,
            close::INVALID_PAYLOAD
        );
        // A code point cut between fragments is fine.
        let mut cut = client_frame(1, false, &[0xce], M);
        cut.extend(client_frame(0, true, &[0xba], M));
        assert_eq!(
            run(&d, &[&cut]).0,
            vec![Owned::Msg(true, "κ".as_bytes().to_vec())]
        );
    }

    #[test]
    fn close_frames() {
        let d = dec();
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend(b"bye");
        let (ev, r, _) = run(&d, &[&client_frame(8, true, &payload, M)]);
        assert_eq!(ev, vec![Owned::Close(Some((1000, "bye".into())))]);
        assert_eq!(r.unwrap(), Flow::Stop);
        let bad = client_frame(8, true, &1005u16.to_be_bytes(), M);
        assert_eq!(run(&d, &[&bad]).1.unwrap_err().code, close::PROTOCOL_ERROR);
        let one = client_frame(8, true, &[3], M);
        assert_eq!(run(&d, &[&one]).1.unwrap_err().code, close::PROTOCOL_ERROR);
    }

    #[test]
    fn frame_buf_lengths() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let f = text_frame(&vec![b'x'; len]);
            let mut c = Cursor::new(&f[..]);
            let (h, l) = FrameHeader::parse(&mut c).unwrap().unwrap();
            assert_eq!(l as usize, len);
            assert!(h.is_final && h.mask.is_none());
            assert_eq!(c.position() as usize + len, f.len());
        }
        let c = close_frame(3008, "slow");
        assert_eq!(&c[..], &[0x88, 6, 0x0b, 0xc0, b's', b'l', b'o', b'w']);
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 4096;

    /// A masked final frame whose length is written in the 7-bit (`encoding` 0), 16-bit (1) or
    /// 64-bit (2) form, whatever the length (so the longer forms may be non-minimal).
    fn frame_with_length_field(opcode: u8, payload: &[u8], mask: [u8; 4], encoding: u8) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        match encoding {
            0 => out.push(0x80 | payload.len() as u8),
            1 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            }
            _ => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        let start = out.len();
        out.extend_from_slice(payload);
        unmask(&mut out[start..], mask);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes, cut at arbitrary points: never a panic, and the per-connection
        /// state never holds more than one message's worth (plus one read).
        #[test]
        fn decoder_never_panics_and_stays_bounded(
            data in proptest::collection::vec(any::<u8>(), 0..20_000),
            cuts in proptest::collection::vec(1usize..3000, 1..20),
        ) {
            let dec = Decoder { max_message_bytes: MAX };
            let mut partial = None;
            let mut rest = &data[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                let mut chunk = rest[..n].to_vec();
                rest = &rest[n..];
                i += 1;
                let r = dec.feed(&mut partial, &mut chunk, &mut |e| {
                    if let Event::Message { payload, .. } = e {
                        assert!(payload.len() <= MAX);
                    }
                    Flow::Continue
                });
                if let Some(p) = partial.as_ref() {
                    // A frame tail (≤ header + MAX) plus the reassembled message (≤ MAX), each
                    // possibly grown by one read before it is judged.
                    prop_assert!(p.tail.len() <= 14 + MAX + 3000);
                    prop_assert!(p.message.len() <= MAX);
                }
                if r.is_err() {
                    break;
                }
            }
        }

        /// Every length encoding (7-bit, 16-bit, 64-bit, the longer ones also non-minimal)
        /// decodes to exactly the encoded length, consumes exactly the frame (the next frame
        /// decodes too), whatever the cuts between reads.
        #[test]
        fn every_length_encoding_decodes_exactly(
            len in 0usize..MAX,
            encoding in 0u8..3,
            mask in any::<[u8; 4]>(),
            cut in 1usize..64,
        ) {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            // 7-bit only fits below 126: fall back to the next encoding (non-minimal if so).
            let encoding = if encoding == 0 && len >= 126 { 1 } else { encoding };
            let mut bytes = frame_with_length_field(OP_BINARY, &payload, mask, encoding);
            bytes.extend(client_frame(OP_TEXT, true, b"next", mask));
            let dec = Decoder { max_message_bytes: MAX };
            let mut partial = None;
            let mut got = Vec::new();
            for chunk in bytes.chunks(cut) {
                let mut chunk = chunk.to_vec();
                dec.feed(&mut partial, &mut chunk, &mut |e| {
                    if let Event::Message { payload, .. } = e {
                        got.push(payload.to_vec());
                    }
                    Flow::Continue
                })
                .unwrap();
            }
            prop_assert_eq!(got.len(), 2);
            prop_assert_eq!(got[0].len(), len);
            prop_assert_eq!(&got[0], &payload);
            prop_assert_eq!(&got[1][..], b"next");
            prop_assert!(partial.is_none());
        }

        /// A 64-bit length with its most significant bit set is refused with 1002 from the
        /// header alone, for every opcode, including a continuation of a message in progress
        /// (where the length added to the bytes so far would overflow).
        #[test]
        fn msb_set_length_is_refused_at_once(
            low in any::<u64>(),
            opcode in prop::sample::select(vec![0u8, 1, 2, 8, 9, 10]),
            mask in any::<[u8; 4]>(),
        ) {
            let len = low | (1 << 63);
            // A message in progress first, so that a continuation is otherwise legal.
            let mut bytes = client_frame(OP_TEXT, false, b"start", mask);
            bytes.push(0x80 | opcode);
            bytes.push(0x80 | 127);
            bytes.extend_from_slice(&len.to_be_bytes());
            bytes.extend_from_slice(&mask);
            let mut partial = None;
            let r = Decoder { max_message_bytes: MAX }.feed(&mut partial, &mut bytes, &mut |_| Flow::Continue);
            prop_assert_eq!(r, Err(violation(close::PROTOCOL_ERROR, "bad frame length")));
        }

        /// Valid frames of any length up to the limit decode to exactly their payload.
        #[test]
        fn valid_frames_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..MAX), mask in any::<[u8; 4]>()) {
            let frame = client_frame(OP_BINARY, true, &payload, mask);
            let mut partial = None;
            let mut got = Vec::new();
            let mut bytes = frame.clone();
            Decoder { max_message_bytes: MAX }
                .feed(&mut partial, &mut bytes, &mut |e| {
                    if let Event::Message { payload, .. } = e {
                        got.push(payload.to_vec());
                    }
                    Flow::Continue
                })
                .unwrap();
            prop_assert_eq!(got, vec![payload]);
            prop_assert!(partial.is_none());
        }
    }
}
