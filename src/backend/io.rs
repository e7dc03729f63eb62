//! hyper's I/O traits over a futures-lite `AsyncRead + AsyncWrite` stream (glommio's
//! `TcpStream`, or futures-rustls's `TlsStream` over it). hyper-util's adapter is for tokio's
//! traits only; this one is safe code: reads land in a small stack buffer and are copied into
//! hyper's (a copy of at most 8 KiB per read, negligible next to a proxy round trip).

use futures_lite::io::{AsyncRead, AsyncWrite};
use hyper::rt::ReadBufCursor;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Largest read handed to the stream at once, bytes.
const READ_CHUNK_BYTES: usize = 8192;

/// A futures-lite stream seen through hyper's `Read`/`Write`.
pub struct HyperIo<T>(pub T);

impl<T: AsyncRead + Unpin> hyper::rt::Read for HyperIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let mut chunk = [0u8; READ_CHUNK_BYTES];
        let want = buf.remaining().min(READ_CHUNK_BYTES);
        match Pin::new(&mut self.0).poll_read(cx, &mut chunk[..want]) {
            Poll::Ready(Ok(n)) => {
                buf.put_slice(&chunk[..n]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> hyper::rt::Write for HyperIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}
