//! A connection to Redis: plain TCP (`redis://`) or TLS over TCP (`rediss://`, rustls through
//! futures-rustls, the configuration built once per node by [`tls_config`]).

use crate::config::{Config, RedisTarget};
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// One Redis connection's socket.
pub(super) enum RedisStream {
    Plain(TcpStream),
    Tls(Box<futures_rustls::client::TlsStream<TcpStream>>),
}

/// The node's TLS client for Redis: `None` for `redis://`. Trusts `redis_options.tls_ca_file`
/// (or the system's store) and presents the client certificate when one is configured.
pub(super) fn tls_config(
    cfg: &Config,
    target: &RedisTarget,
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    if !target.tls {
        return Ok(None);
    }
    let opts = &cfg.redis_options;
    let identity = opts.tls_identity().map_err(|e| e.to_string())?;
    let config = crate::backend::tls::build(&opts.tls_ca_file, identity)
        .map_err(|e| format!("redis_options.tls_ca_file: {e}"))?;
    Ok(Some(Arc::new(config)))
}

/// The name Redis's certificate must carry: the URL's host, a DNS name or an IP address.
pub(super) fn server_name(
    target: &RedisTarget,
) -> Result<rustls::pki_types::ServerName<'static>, String> {
    rustls::pki_types::ServerName::try_from(target.host.clone())
        .map_err(|e| format!("{:?} is not a TLS server name: {e}", target.host))
}

impl AsyncRead for RedisStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            RedisStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            RedisStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for RedisStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            RedisStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            RedisStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RedisStream::Plain(s) => Pin::new(s).poll_flush(cx),
            RedisStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RedisStream::Plain(s) => Pin::new(s).poll_close(cx),
            RedisStream::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}
