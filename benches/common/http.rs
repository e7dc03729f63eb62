//! A minimal blocking HTTP/1.1 keep-alive client for the server's API (`POST /api/publish`,
//! `/api/info`): requests can be pipelined (`send` several, then `recv` each), responses need a
//! Content-Length.

use super::net::tcp_connect;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub struct HttpClient {
    stream: TcpStream,
    host: String,
    buf: Vec<u8>,
    req: Vec<u8>,
}

impl HttpClient {
    pub fn connect(dst: SocketAddr) -> io::Result<HttpClient> {
        let stream = tcp_connect(dst, None, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(HttpClient {
            stream,
            host: dst.to_string(),
            buf: Vec::with_capacity(4096),
            req: Vec::with_capacity(512),
        })
    }

    /// Writes one request (no response read).
    pub fn send(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<()> {
        self.req.clear();
        write!(
            self.req,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nX-API-Key: bench\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        )?;
        self.req.extend_from_slice(body);
        self.stream.write_all(&self.req)
    }

    /// Reads one response; returns (status, body).
    pub fn recv(&mut self) -> io::Result<(u16, Vec<u8>)> {
        let mut tmp = [0u8; 4096];
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(hlen)) => {
                    let code = resp.code.unwrap_or(0);
                    let mut clen: Option<usize> = None;
                    for h in resp.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            clen = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse().ok());
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            return Err(io::Error::other(
                                "chunked responses not supported by the bench client",
                            ));
                        }
                    }
                    let clen = clen.unwrap_or(0);
                    if self.buf.len() >= hlen + clen {
                        let body = self.buf[hlen..hlen + clen].to_vec();
                        self.buf.drain(..hlen + clen);
                        return Ok((code, body));
                    }
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(io::Error::other(format!("bad HTTP response: {e}"))),
            }
            let n = self.stream.read(&mut tmp)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed HTTP connection",
                ));
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }
}
