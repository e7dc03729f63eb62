//! API request bodies: the framing a request head declares (`Content-Length` or
//! `Transfer-Encoding: chunked`, ambiguous ones refused), and reading a body under the request's
//! deadline, bounded by `limits.max_api_body_bytes` in decoded bytes. The chunked decoder is
//! plain state fed whatever bytes arrived (no I/O), so pipelined requests already in the buffer
//! are decoded by the same code. Shard thread, inside the front door's task.

use super::{read_within, Head, ReadError};
use glommio::net::TcpStream;
use std::time::Instant;

/// How the body of a request is delimited.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Framing {
    /// `Content-Length` (0 when absent); `usize::MAX` for a number too big to hold.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// The body framing a head declares, or the status refusing it. Ambiguous framings (both
/// headers, or `Content-Length` values that disagree) are refused: a proxy in front could read
/// them differently (request smuggling).
pub(super) fn framing(head: &Head) -> Result<Framing, (u16, &'static str)> {
    let mut lengths = head.header_values("content-length");
    let length = match lengths.next() {
        None => None,
        Some(first) => {
            if lengths.any(|v| v.trim_ascii() != first.trim_ascii()) {
                return Err((400, "conflicting Content-Length headers\n"));
            }
            let digits = first.trim_ascii();
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return Err((400, "bad Content-Length\n"));
            }
            Some(
                std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| d.parse().ok())
                    .unwrap_or(usize::MAX),
            )
        }
    };
    let mut codings = head.header_values("transfer-encoding").peekable();
    if codings.peek().is_none() {
        return Ok(Framing::Length(length.unwrap_or(0)));
    }
    if length.is_some() {
        return Err((400, "both Content-Length and Transfer-Encoding\n"));
    }
    let mut only_chunked = true;
    let mut count = 0;
    for value in codings {
        for coding in value.split(|&b| b == b',') {
            count += 1;
            only_chunked &= coding.trim_ascii().eq_ignore_ascii_case(b"chunked");
        }
    }
    if !only_chunked || count != 1 {
        return Err((501, "only Transfer-Encoding: chunked is supported\n"));
    }
    Ok(Framing::Chunked)
}

/// One API request of a connection, read whole: a call to dispatch, or an answer decided
/// without the broker (a refusal from the head, a bad body, the deadline).
/// Why a body could not be read.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum BodyError {
    Closed,
    Timeout,
    /// Decoded chunks passed `limits.max_api_body_bytes`: 413.
    TooBig,
    /// Not valid chunked coding: 400.
    Malformed,
}

impl From<ReadError> for BodyError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Closed => BodyError::Closed,
            ReadError::Timeout => BodyError::Timeout,
        }
    }
}

/// A `Content-Length` body of `len` bytes: what `buf` holds, then the rest from the socket.
pub(super) async fn read_length(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    len: usize,
    deadline: Instant,
) -> Result<Vec<u8>, BodyError> {
    while buf.len() < len {
        let want = len - buf.len();
        read_within(stream, buf, want, deadline).await?;
    }
    let rest = buf.split_off(len);
    Ok(std::mem::replace(buf, rest))
}

/// Bytes read from the socket at a time while decoding a chunked body.
const CHUNKED_READ_BYTES: usize = 16 * 1024;

/// A chunked body, decoded as it arrives; at most `max` decoded bytes.
pub(super) async fn read_chunked(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
    line_max: usize,
    deadline: Instant,
) -> Result<Vec<u8>, BodyError> {
    let mut decoder = ChunkedBody::default();
    loop {
        let used = decoder.feed(buf, max, line_max)?;
        buf.drain(..used);
        if decoder.is_done() {
            return Ok(decoder.body);
        }
        read_within(stream, buf, CHUNKED_READ_BYTES, deadline).await?;
    }
}

/// Where a chunked decoder is (RFC 9112 §7.1).
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
enum ChunkState {
    /// Expecting a chunk-size line (`hex[;extensions]CRLF`).
    #[default]
    Size,
    /// Inside a chunk's data: bytes still to come.
    Data(usize),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty line.
    Trailer,
    Done,
}

/// Incremental decoder of a chunked body: no I/O, fed whatever bytes arrived. Bounded: decoded
/// bytes by `max` (→ [`BodyError::TooBig`] as soon as a chunk size would pass it), a size line
/// and the trailer section by `line_max` (→ [`BodyError::Malformed`]). Extensions and
/// trailers are read and ignored.
#[derive(Debug, Default)]
pub(super) struct ChunkedBody {
    state: ChunkState,
    pub(super) body: Vec<u8>,
    trailer_bytes: usize,
}

impl ChunkedBody {
    pub(super) fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes what it can of `input`; returns how many bytes it consumed (the rest must be
    /// fed again with more bytes after it). Bytes after the end of the body are not consumed.
    pub(super) fn feed(
        &mut self,
        input: &[u8],
        max: usize,
        line_max: usize,
    ) -> Result<usize, BodyError> {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match self.state {
                ChunkState::Size => {
                    let Some(end) = find_crlf(rest, line_max)? else {
                        return Ok(pos);
                    };
                    let size = chunk_size(&rest[..end])?;
                    pos += end + 2;
                    if size == 0 {
                        self.state = ChunkState::Trailer;
                    } else if size > max.saturating_sub(self.body.len()) {
                        return Err(BodyError::TooBig);
                    } else {
                        self.body.reserve(size);
                        self.state = ChunkState::Data(size);
                    }
                }
                ChunkState::Data(left) => {
                    let take = left.min(rest.len());
                    self.body.extend_from_slice(&rest[..take]);
                    pos += take;
                    if take < left {
                        self.state = ChunkState::Data(left - take);
                        return Ok(pos);
                    }
                    self.state = ChunkState::DataEnd;
                }
                ChunkState::DataEnd => {
                    if rest.len() < 2 {
                        return Ok(pos);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(BodyError::Malformed);
                    }
                    pos += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailer => {
                    let budget = line_max.saturating_sub(self.trailer_bytes);
                    let Some(end) = find_crlf(rest, budget)? else {
                        return Ok(pos);
                    };
                    pos += end + 2;
                    self.trailer_bytes += end + 2;
                    if end == 0 {
                        self.state = ChunkState::Done;
                    }
                }
                ChunkState::Done => return Ok(pos),
            }
        }
    }
}

/// Position of the first CRLF in `bytes`; `None` when it has not arrived yet; malformed when
/// the line is already longer than `line_max`.
fn find_crlf(bytes: &[u8], line_max: usize) -> Result<Option<usize>, BodyError> {
    match bytes.windows(2).position(|w| w == b"\r\n") {
        Some(end) if end <= line_max => Ok(Some(end)),
        Some(_) => Err(BodyError::Malformed),
        None if bytes.len() > line_max + 1 => Err(BodyError::Malformed),
        None => Ok(None),
    }
}

/// The size of a chunk-size line (`hex[ws][;extensions]`); a size too big to hold is too big.
fn chunk_size(line: &[u8]) -> Result<usize, BodyError> {
    let digits = line.split(|&b| b == b';').next().unwrap_or(&[]);
    let digits = digits.trim_ascii_end();
    if digits.is_empty() {
        return Err(BodyError::Malformed);
    }
    let mut size: usize = 0;
    for &b in digits {
        let d = (b as char).to_digit(16).ok_or(BodyError::Malformed)? as usize;
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(d))
            .ok_or(BodyError::TooBig)?;
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(extra: &str) -> Head {
        let text = format!("POST /api/publish HTTP/1.1\r\nHost: t\r\n{extra}\r\n");
        super::super::parse_head(text.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn framing_is_read_from_the_head() {
        assert_eq!(framing(&head("")), Ok(Framing::Length(0)));
        assert_eq!(
            framing(&head("Content-Length: 12\r\n")),
            Ok(Framing::Length(12))
        );
        assert_eq!(
            framing(&head("Content-Length: 5\r\nContent-Length: 5\r\n")),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            framing(&head("Content-Length: 99999999999999999999999999\r\n")),
            Ok(Framing::Length(usize::MAX)),
            "a number too big to hold is too big, not malformed"
        );
        assert_eq!(
            framing(&head("Transfer-Encoding: Chunked\r\n")),
            Ok(Framing::Chunked)
        );
        for (bad, status) in [
            ("Content-Length: +5\r\n", 400),
            ("Content-Length: 5, 5\r\n", 400),
            ("Content-Length: \r\n", 400),
            ("Content-Length: 5\r\nContent-Length: 6\r\n", 400),
            ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400),
            ("Transfer-Encoding: gzip, chunked\r\n", 501),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                501,
            ),
            ("Transfer-Encoding: identity\r\n", 501),
        ] {
            assert_eq!(framing(&head(bad)).unwrap_err().0, status, "{bad:?}");
        }
    }

    /// Feeds `input` in pieces of `cut` bytes the way `read_chunked` does (unconsumed bytes
    /// stay in front of the next piece); returns the body and the bytes left after it.
    fn decode(input: &[u8], cut: usize, max: usize) -> Result<(Vec<u8>, Vec<u8>), BodyError> {
        let mut d = ChunkedBody::default();
        let mut buf = Vec::new();
        let mut pieces = input.chunks(cut.max(1));
        loop {
            let used = d.feed(&buf, max, 64)?;
            buf.drain(..used);
            if d.is_done() {
                buf.extend(pieces.flatten());
                return Ok((d.body, buf));
            }
            match pieces.next() {
                Some(p) => buf.extend_from_slice(p),
                None => return Err(BodyError::Closed),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_cuts() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\nPOST /next";
        for cut in [1, 2, 3, 7, 100] {
            let (body, rest) = decode(wire, cut, 1024).unwrap();
            assert_eq!(body, b"hello, world", "cut {cut}");
            assert_eq!(rest, b"POST /next", "cut {cut}");
        }
        let (body, _) = decode(b"A \r\n0123456789\r\n0\r\n\r\n", 3, 1024).unwrap();
        assert_eq!(body, b"0123456789");
    }

    #[test]
    fn chunked_bodies_are_bounded() {
        // Over the limit in decoded bytes: refused at the size line, before the data.
        assert_eq!(
            decode(b"8\r\n12345678\r\n8\r\n", 100, 10),
            Err(BodyError::TooBig)
        );
        assert_eq!(
            decode(b"ffffffffffffffffffff\r\n", 100, 10),
            Err(BodyError::TooBig)
        );
        // Exactly the limit passes.
        assert_eq!(
            decode(b"5\r\n12345\r\n5\r\n67890\r\n0\r\n\r\n", 4, 10)
                .unwrap()
                .0,
            b"1234567890"
        );
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\r\nhelloXY",
            b"5\nhello\r\n",
            b"-1\r\n",
        ] {
            assert_eq!(decode(bad, 100, 1024), Err(BodyError::Malformed), "{bad:?}");
        }
        // An endless size line (extensions) or trailer section is cut at 64 bytes.
        let long_ext = [b"5;".as_slice(), &[b'a'; 100]].concat();
        assert_eq!(decode(&long_ext, 7, 1024), Err(BodyError::Malformed));
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..20 {
            trailers.extend_from_slice(b"X: y\r\n");
        }
        assert_eq!(decode(&trailers, 5, 1024), Err(BodyError::Malformed));
    }
}
