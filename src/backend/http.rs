//! [`HttpClient`]: one shard's HTTP/1.1 client to the backend, on the shard's glommio executor.
//!
//! hyper's client connection API (`hyper::client::conn::http1`) does the HTTP; each connection's
//! driver future is a detached glommio task on the calling shard, over glommio's `TcpStream`
//! (and futures-rustls for `https://`). No other runtime, no thread per request: a call waits
//! on io_uring completions and glommio timers like every other task of the shard.
//!
//! Bounds, each with its overflow policy:
//! - **in flight** (`proxy.max_in_flight`): a call needs a [`Permit`] from
//!   [`HttpClient::try_acquire`]; at the bound it gets none (the caller answers error 100) and
//!   `proxy_overloaded` counts it.
//! - **idle keep-alive connections** (`proxy.max_idle_per_endpoint`, per origin): reused newest
//!   first (LIFO); one coming back to a full pool closes the oldest; one idle for
//!   [`IDLE_TIMEOUT`] or closed by the backend is dropped, never reused.
//! - **time** (the `timeout` of each call, `proxy.timeout_ms`): connect, TLS handshake, request
//!   and the whole response body; when it passes, the call fails with
//!   [`CallError::Timeout`] and its connection is closed (its task cancelled), never pooled.
//! - **response body** (`proxy.max_response_bytes`): a larger body (by its `Content-Length`,
//!   or as it arrives) fails the call with [`CallError::TooLarge`] and closes the connection.
//! - **response head**: at most [`MAX_HEAD_BYTES`] (hyper's read buffer), else
//!   [`CallError::Http`].
//!
//! A request on a reused connection that the backend had closed meanwhile (the keep-alive
//! race: the close crossed our request) fails before any response byte: not sent, the
//! connection closed before an answer, or the socket reset / its write side broken. Such a
//! call is retried once on a new connection (as Go's `net/http` does): a backend that closed
//! an idle connection did not read the request on it.
//!
//! Never holds a `RefCell` borrow across an `.await`.

use super::io::HyperIo;
use super::stats::ProxyStats;
use crate::config::{Endpoint, ProxyConfig};
use bytes::{Bytes, BytesMut};
use futures_lite::io::{AsyncRead, AsyncWrite};
use http_body::{Body, Frame, SizeHint};
use hyper::client::conn::http1;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Uri};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// How long an unused keep-alive connection is kept: backends commonly close idle ones after
/// 60 s or more (Go's `http.Server` without `IdleTimeout` never does), and reusing one the
/// backend is closing costs a retry; 30 s keeps the pool warm under steady traffic.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest response head (status line and headers) accepted, bytes: hyper's read buffer limit.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// `User-Agent` of every request.
const USER_AGENT: &str = concat!("shardcast/", env!("CARGO_PKG_VERSION"));

/// A backend's answer: its status (the caller decides what a non-2xx means) and whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

/// Why a call failed. Every variant means the caller got no usable answer (error 100 for a
/// client); `Display` is for logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No permit: `proxy.max_in_flight` calls were in flight (counted by `try_acquire`).
    #[error("too many backend calls in flight")]
    Overloaded,
    /// The whole call (connect, TLS, request, response body) passed its timeout.
    #[error("backend call timed out")]
    Timeout,
    /// No TCP connection to any of the endpoint's addresses.
    #[error("cannot connect to the backend: {0}")]
    Connect(String),
    /// The TLS handshake failed (for instance a certificate that does not verify).
    #[error("TLS handshake with the backend failed: {0}")]
    Tls(String),
    /// The HTTP exchange failed (bad response, connection lost mid-way, bad request path).
    #[error("HTTP exchange with the backend failed: {0}")]
    Http(String),
    /// The response body was over `proxy.max_response_bytes`.
    #[error("backend response body over proxy.max_response_bytes")]
    TooLarge,
}

/// Leave to make one call; the in-flight count drops when it is dropped.
#[derive(Debug)]
pub struct Permit {
    in_flight: Rc<Cell<usize>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
    }
}

/// A request body held whole in memory (one frame).
pub struct FullBody(Option<Bytes>);

impl Body for FullBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
    }
}

/// One HTTP/1.1 connection: the handle requests are sent through and its driver task.
/// Dropping it cancels the task, which closes the socket.
struct Conn {
    sender: http1::SendRequest<FullBody>,
    task: glommio::task::JoinHandle<()>,
    /// Came from the pool (a failure before any response byte may be the keep-alive race).
    reused: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.cancel();
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Request headers a client may not set through `proxy.http_headers`: they frame the request
/// or are ours to set.
const RESERVED_HEADERS: [&str; 12] = [
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "user-agent",
];

/// One shard's client (see the module doc). `!Send`: it lives on its shard.
pub struct HttpClient {
    tls: futures_rustls::TlsConnector,
    max_in_flight: usize,
    in_flight: Rc<Cell<usize>>,
    max_idle: usize,
    max_response_bytes: usize,
    /// Idle connections by origin, oldest first (reuse pops the newest).
    pool: RefCell<HashMap<String, Vec<Idle>>>,
    stats: ProxyStats,
    /// Last TLS failure logged at `warn` (then at most one a second; the others at `debug`).
    last_tls_warn: Cell<Option<Instant>>,
}

impl HttpClient {
    /// A client with `opts`' bounds. `tls` is the node's one rustls configuration
    /// ([`super::tls::client_config`]), shared by every shard.
    pub fn new(opts: &ProxyConfig, tls: Arc<rustls::ClientConfig>) -> Rc<HttpClient> {
        Rc::new(HttpClient {
            tls: futures_rustls::TlsConnector::from(tls),
            max_in_flight: opts.max_in_flight,
            in_flight: Rc::new(Cell::new(0)),
            max_idle: opts.max_idle_per_endpoint,
            max_response_bytes: opts.max_response_bytes,
            pool: RefCell::new(HashMap::new()),
            stats: ProxyStats::default(),
            last_tls_warn: Cell::new(None),
        })
    }

    /// A permit for one call, or `None` (counted in `proxy_overloaded`) when
    /// `proxy.max_in_flight` calls are in flight.
    pub fn try_acquire(&self) -> Option<Permit> {
        let n = self.in_flight.get();
        if n >= self.max_in_flight {
            self.stats.overloaded();
            return None;
        }
        self.in_flight.set(n + 1);
        Some(Permit {
            in_flight: self.in_flight.clone(),
        })
    }

    /// Calls in flight (permits held).
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// This shard's backend-call figures (the caller records each call's kind and outcome).
    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }

    /// Idle connections kept for `ep`'s origin.
    pub fn idle_connections(&self, ep: &Endpoint) -> usize {
        self.pool.borrow().get(ep.origin()).map_or(0, Vec::len)
    }

    /// Closes idle connections unused for [`IDLE_TIMEOUT`] or closed by the backend. Calls do
    /// this for their own origin; the shard's one-second tick may call it for all.
    pub fn sweep_idle(&self) {
        let now = Instant::now();
        let mut pool = self.pool.borrow_mut();
        for list in pool.values_mut() {
            list.retain(|i| fresh(i, now));
        }
        pool.retain(|_, list| !list.is_empty());
    }

    /// POSTs `body` (JSON) to `ep`, with `Content-Type: application/json`, `Host`,
    /// `Content-Length`, `User-Agent: shardcast/VERSION` and the caller's `headers` (each
    /// name and value checked: a bad one, or one that would reframe the request such as
    /// `Content-Length` or `Host`, is skipped). `timeout` bounds the whole call.
    pub async fn post_json<N, V>(
        &self,
        permit: Permit,
        ep: &Endpoint,
        headers: &[(N, V)],
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Response, CallError>
    where
        N: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let _permit = permit;
        let mut extra = Vec::with_capacity(headers.len());
        for (name, value) in headers {
            match (
                HeaderName::from_bytes(name.as_ref()),
                HeaderValue::from_bytes(value.as_ref()),
            ) {
                (Ok(n), Ok(v)) if !RESERVED_HEADERS.contains(&n.as_str()) => extra.push((n, v)),
                _ => tracing::debug!(
                    name = %String::from_utf8_lossy(name.as_ref()),
                    "proxy request header skipped: invalid or reserved"
                ),
            }
        }
        let body = Bytes::from(body);
        let call = self.call(ep, Method::POST, &extra, Some(body));
        with_timeout(timeout, call).await
    }

    /// GETs `ep` (`Accept: application/json`), for the token key set. `timeout` bounds the
    /// whole call.
    pub async fn get(
        &self,
        permit: Permit,
        ep: &Endpoint,
        timeout: Duration,
    ) -> Result<Response, CallError> {
        let _permit = permit;
        let accept = [(header::ACCEPT, HeaderValue::from_static("application/json"))];
        with_timeout(timeout, self.call(ep, Method::GET, &accept, None)).await
    }

    /// One request and its whole response, on a pooled or new connection.
    async fn call(
        &self,
        ep: &Endpoint,
        method: Method,
        headers: &[(HeaderName, HeaderValue)],
        body: Option<Bytes>,
    ) -> Result<Response, CallError> {
        let uri: Uri = ep
            .path()
            .parse()
            .map_err(|e| CallError::Http(format!("bad request path {:?}: {e}", ep.path())))?;
        let mut retried = false;
        loop {
            let mut conn = match self.take_ready(ep).await {
                Some(c) => c,
                None => self.connect(ep).await?,
            };
            let req = build_request(ep, &method, &uri, headers, body.clone())?;
            match conn.sender.try_send_request(req).await {
                Ok(resp) => return self.read_response(ep, conn, resp).await,
                Err(mut e) => {
                    let unsent = e.take_message().is_some();
                    let err = e.into_error();
                    let closed_before_answer = unsent
                        || err.is_incomplete_message()
                        || err.is_canceled()
                        || is_reset(&err);
                    if conn.reused && !retried && closed_before_answer {
                        tracing::debug!(error = %err, backend = %ep, "pooled connection was closed; retrying on a new one");
                        retried = true;
                        continue;
                    }
                    return Err(CallError::Http(err.to_string()));
                }
            }
        }
    }

    /// The newest idle connection to `ep`'s origin that is still open and ready.
    async fn take_ready(&self, ep: &Endpoint) -> Option<Conn> {
        loop {
            let mut conn = {
                let mut pool = self.pool.borrow_mut();
                let list = pool.get_mut(ep.origin())?;
                let now = Instant::now();
                list.retain(|i| fresh(i, now));
                list.pop()?.conn
            };
            // Resolves at once for a live idle connection (its driver wants a request), and
            // with an error for one the backend closed.
            if conn.sender.ready().await.is_ok() {
                conn.reused = true;
                return Some(conn);
            }
        }
    }

    /// Returns a connection whose exchange ended cleanly to the pool (newest last); over the
    /// bound the oldest one is closed.
    fn put_idle(&self, ep: &Endpoint, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        let mut pool = self.pool.borrow_mut();
        let list = pool.entry(ep.origin().to_string()).or_default();
        if list.len() >= self.max_idle {
            list.remove(0);
        }
        list.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// A new connection to the first of `ep`'s addresses that accepts, TLS on top for
    /// `https://`, and its driver task spawned on this executor.
    async fn connect(&self, ep: &Endpoint) -> Result<Conn, CallError> {
        let mut last = String::from("no address");
        let mut stream = None;
        for addr in ep.addrs() {
            match glommio::net::TcpStream::connect(*addr).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        let Some(tcp) = stream else {
            return Err(CallError::Connect(last));
        };
        let _ = tcp.set_nodelay(true);
        if !ep.is_tls() {
            return handshake(HyperIo(tcp)).await;
        }
        let name = rustls::pki_types::ServerName::try_from(ep.host().to_string())
            .map_err(|e| self.tls_failed(ep, format!("bad server name: {e}")))?;
        match self.tls.connect(name, tcp).await {
            Ok(tls) => handshake(HyperIo(tls)).await,
            Err(e) => Err(self.tls_failed(ep, e.to_string())),
        }
    }

    /// Logs a TLS failure (`warn` at most once a second, else `debug`) and makes its error.
    fn tls_failed(&self, ep: &Endpoint, message: String) -> CallError {
        let now = Instant::now();
        let quiet = self
            .last_tls_warn
            .get()
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1));
        if quiet {
            tracing::debug!(backend = %ep, error = %message, "TLS handshake with the backend failed");
        } else {
            self.last_tls_warn.set(Some(now));
            tracing::warn!(backend = %ep, error = %message, "TLS handshake with the backend failed");
        }
        CallError::Tls(message)
    }

    /// Reads the whole body within `max_response_bytes`; pools the connection after a clean end.
    async fn read_response(
        &self,
        ep: &Endpoint,
        conn: Conn,
        resp: hyper::Response<hyper::body::Incoming>,
    ) -> Result<Response, CallError> {
        let status = resp.status().as_u16();
        let limit = self.max_response_bytes;
        let declared = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(CallError::TooLarge);
        }
        let closing = resp
            .headers()
            .get(header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let mut body = resp.into_body();
        let mut whole: Option<Bytes> = None;
        let mut joined: Option<BytesMut> = None;
        let mut total = 0usize;
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let frame = frame.map_err(|e| CallError::Http(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            total += data.len();
            if total > limit {
                return Err(CallError::TooLarge);
            }
            // One frame (the usual small reply) is kept as it came; more are joined.
            match (&mut whole, &mut joined) {
                (None, None) => whole = Some(data),
                (Some(first), None) => {
                    let mut j = BytesMut::with_capacity(total);
                    j.extend_from_slice(first);
                    j.extend_from_slice(&data);
                    whole = None;
                    joined = Some(j);
                }
                (_, Some(j)) => j.extend_from_slice(&data),
            }
        }
        if !closing {
            self.put_idle(ep, conn);
        }
        let body = match joined {
            Some(j) => j.freeze(),
            None => whole.unwrap_or_default(),
        };
        Ok(Response { status, body })
    }
}

/// The socket was reset or its write side broken: what a request written onto a connection
/// the backend had just closed meets.
fn is_reset(err: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            );
        }
        source = e.source();
    }
    false
}

/// Still worth keeping: not idle too long, not closed by the backend.
fn fresh(i: &Idle, now: Instant) -> bool {
    now.duration_since(i.since) < IDLE_TIMEOUT && !i.conn.sender.is_closed()
}

/// The HTTP/1.1 handshake (no bytes exchanged) and the driver task on this executor.
async fn handshake<T>(io: HyperIo<T>) -> Result<Conn, CallError>
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let (sender, driver) = http1::Builder::new()
        .max_buf_size(MAX_HEAD_BYTES)
        .handshake(io)
        .await
        .map_err(|e| CallError::Http(e.to_string()))?;
    let task = glommio::spawn_local(async move {
        if let Err(e) = driver.await {
            tracing::debug!(error = %e, "backend connection ended with an error");
        }
    })
    .detach();
    Ok(Conn {
        sender,
        task,
        reused: false,
    })
}

fn build_request(
    ep: &Endpoint,
    method: &Method,
    uri: &Uri,
    headers: &[(HeaderName, HeaderValue)],
    body: Option<Bytes>,
) -> Result<Request<FullBody>, CallError> {
    let host = HeaderValue::from_str(ep.host_header())
        .map_err(|e| CallError::Http(format!("bad Host {:?}: {e}", ep.host_header())))?;
    let len = body.as_ref().map_or(0, Bytes::len);
    let mut req = Request::new(FullBody(body.filter(|b| !b.is_empty())));
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri.clone();
    let h = req.headers_mut();
    h.insert(header::HOST, host);
    h.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
    if method == Method::POST {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    for (n, v) in headers {
        h.append(n.clone(), v.clone());
    }
    Ok(req)
}

/// `call` bounded by `timeout`; when it passes, `call` is dropped with whatever connection it
/// held (whose task is cancelled).
async fn with_timeout<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, CallError>>,
) -> Result<T, CallError> {
    futures_lite::future::or(call, async {
        glommio::timer::Timer::new(timeout).await;
        Err(CallError::Timeout)
    })
    .await
}
