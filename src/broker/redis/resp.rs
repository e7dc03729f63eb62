//! RESP2 on the wire, both directions.
//!
//! Out: a command is an array of bulk strings, encoded by hand straight into the batch buffer
//! ([`Command`]); an argument may be given in parts (a key's prefix, its channel, its closing
//! brace), so no key is assembled on its own and a publish allocates nothing here. In: frames
//! are decoded by `redis-protocol` ([`next_frame`]). Runs on the multiplexer's thread; pure
//! except for [`next_frame`], which reads its connection.

use bytes::BytesMut;
use futures_lite::AsyncReadExt;
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;

/// One command being appended to a buffer: `*N` then each argument as a bulk string. Exactly
/// `N` arguments must follow (checked in debug builds).
pub struct Command<'a> {
    out: &'a mut Vec<u8>,
    remaining: usize,
}

impl<'a> Command<'a> {
    /// Starts a command of `args` arguments.
    pub fn new(out: &'a mut Vec<u8>, args: usize) -> Command<'a> {
        out.push(b'*');
        out.extend_from_slice(itoa::Buffer::new().format(args).as_bytes());
        out.extend_from_slice(b"\r\n");
        Command {
            out,
            remaining: args,
        }
    }

    /// One argument.
    pub fn arg(&mut self, bytes: &[u8]) -> &mut Self {
        self.parts(&[bytes])
    }

    /// One argument given in consecutive parts.
    pub fn parts(&mut self, parts: &[&[u8]]) -> &mut Self {
        debug_assert!(self.remaining > 0, "more arguments than announced");
        self.remaining = self.remaining.wrapping_sub(1);
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.out.push(b'$');
        self.out
            .extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
        self.out.extend_from_slice(b"\r\n");
        for p in parts {
            self.out.extend_from_slice(p);
        }
        self.out.extend_from_slice(b"\r\n");
        self
    }

    /// One argument: a non-negative integer in decimal.
    pub fn int(&mut self, n: u64) -> &mut Self {
        self.arg(itoa::Buffer::new().format(n).as_bytes())
    }
}

impl Drop for Command<'_> {
    fn drop(&mut self) {
        debug_assert!(
            self.remaining == 0 || std::thread::panicking(),
            "{} announced arguments missing",
            self.remaining
        );
    }
}

/// Appends one RESP command.
pub fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    let mut cmd = Command::new(out, args.len());
    for a in args {
        cmd.arg(a);
    }
}

/// Reads until one RESP frame is complete.
pub async fn next_frame<R: futures_lite::AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut BytesMut,
) -> Result<BytesFrame, String> {
    loop {
        match decode_bytes_mut(buf) {
            Ok(Some((frame, _, _))) => return Ok(frame),
            Ok(None) => {}
            Err(e) => return Err(format!("bad RESP from Redis: {e:?}")),
        }
        let len = buf.len();
        buf.resize(len + 16 * 1024, 0);
        match stream.read(&mut buf[len..]).await {
            Ok(0) => {
                buf.truncate(len);
                return Err("Redis closed the connection".into());
            }
            Ok(n) => buf.truncate(len + n),
            Err(e) => {
                buf.truncate(len);
                return Err(format!("read from Redis: {e}"));
            }
        }
    }
}

/// The JSON documents in a script's array reply (entries that do not parse are skipped).
pub fn json_items<T: serde::de::DeserializeOwned>(items: &[BytesFrame]) -> Vec<T> {
    items
        .iter()
        .filter_map(|f| match f {
            BytesFrame::BulkString(b) => serde_json::from_slice(b).ok(),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis_protocol::resp2::encode::extend_encode_borrowed;
    use redis_protocol::resp2::types::BorrowedFrame;

    #[test]
    fn resp_encoding() {
        let mut out = Vec::new();
        encode(&mut out, &[b"PUBLISH", b"a", b"{\"x\":1}"]);
        assert_eq!(
            out,
            b"*3\r\n$7\r\nPUBLISH\r\n$1\r\na\r\n$7\r\n{\"x\":1}\r\n"
        );
    }

    #[test]
    fn parts_and_integers_encode_like_the_library() {
        let mut ours = Vec::new();
        Command::new(&mut ours, 5)
            .arg(b"SET")
            .parts(&[b"p:ch:{", "ü".as_bytes(), b"}"])
            .int(0)
            .int(18_446_744_073_709_551_615)
            .arg(b"");
        let args: [&[u8]; 5] = [
            b"SET",
            "p:ch:{ü}".as_bytes(),
            b"0",
            b"18446744073709551615",
            b"",
        ];
        let frames: Vec<BorrowedFrame<'_>> =
            args.iter().map(|a| BorrowedFrame::BulkString(a)).collect();
        let mut lib = BytesMut::new();
        extend_encode_borrowed(&mut lib, &BorrowedFrame::Array(&frames), false).unwrap();
        let mut mine = Vec::new();
        encode(&mut mine, &args);
        assert_eq!(mine, &lib[..]);
        assert_eq!(ours, &lib[..]);
    }
}
