//! The front door of every accepted TCP connection, one task per connection until it is
//! upgraded or closed: one HTTP/1.1 request head decides whether it becomes a WebSocket
//! (`GET /connection/websocket`), an API call (`POST /api/...`, keep-alive) or a health check
//! (`GET /healthz`). Everything else gets a proper 4xx, never a hang: the head is bounded in
//! bytes, and the whole request (head and, for the API, body) in time: one deadline of
//! `limits.handshake_timeout_secs` from the request's first byte (from the accept for a
//! connection's first request), past which it gets 408 and is closed (`request_timeouts`).
//! API requests pipelined on a keep-alive connection and already read whole behind the
//! current one are served with it as one batch ([`pipelined`], [`api::answer_all`]): started
//! together, answered in order in one write.
//!
//! The HTTP pieces (heads, responses, the handshake and origin checks, the API) live in
//! [`crate::http`]; this task only puts them together with the shard's state: its counters, the
//! node's connection limit and drain flag, and the hand-over of an upgraded socket to the
//! shard's I/O ([`super::io::start`]). The request head lives in a transient buffer freed
//! before the WebSocket phase starts. Shard thread only; no `RefCell` borrow across an await.

use super::connection::{uni_connect_command, Wire};
use super::counters::bump;
use super::Shard;
use crate::http::{self, api, handshake, stream as hs, Head};
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Bytes the first read of a keep-alive connection's next request may take. Requests
/// pipelined behind it are served together only when this read brought them whole
/// ([`pipelined`]), so it is sized for a batch of small API calls (16 publishes of ~1 KiB);
/// the buffer lives only while the connection is in its HTTP phase (API clients, not idle
/// WebSockets).
const KEEP_ALIVE_READ_BYTES: usize = 16 * 1024;

/// Serves one accepted connection until it is upgraded, closed or times out.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream) {
    let limits = &shard.cfg.limits;
    let timeout = Duration::from_secs(limits.handshake_timeout_secs as u64);
    let mut buf: Vec<u8> = Vec::new();
    // The first request's deadline runs from the accept; a later one's from its first byte.
    let mut first_start = Some(Instant::now());
    loop {
        let start = match first_start.take() {
            Some(t) => t,
            None => {
                if buf.is_empty() {
                    // Idle keep-alive: the next request's first bytes within the timeout, or
                    // a silent close (no request was started).
                    let idle_until = Instant::now() + timeout;
                    if http::read_within(&mut stream, &mut buf, KEEP_ALIVE_READ_BYTES, idle_until)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Instant::now()
            }
        };
        let deadline = start + timeout;
        // Read one request head before the deadline.
        // Bytes of `buf` actually received: a read cut by the timeout leaves `buf` grown.
        let mut received = buf.len();
        let head = match glommio::timer::timeout(http::remaining(deadline), async {
            Ok(http::read_head(
                &mut stream,
                &mut buf,
                &mut received,
                limits.max_request_head_bytes,
            )
            .await)
        })
        .await
        {
            Ok(r) => r,
            Err(_) => {
                // Idle (nothing of a request yet): just close. A partial head: 408.
                if received > 0 {
                    bump(&shard.counters.request_timeouts);
                    let _ = stream.write_all(&http::request_timeout()).await;
                }
                return;
            }
        };
        let head = match head {
            Ok(Some(h)) => h,
            Ok(None) => return, // clean EOF between requests
            Err(status) => {
                let _ = stream
                    .write_all(&http::plain(status, "bad request head\n"))
                    .await;
                return;
            }
        };
        bump(&shard.counters.http_requests);
        let path = head.path.split('?').next().unwrap_or("").to_string();
        match (head.method.as_str(), path.as_str()) {
            (_, p)
                if p == "/connection/websocket"
                    || (!shard.cfg.conformance_echo_path.is_empty()
                        && p == shard.cfg.conformance_echo_path) =>
            {
                let echo_path = p != "/connection/websocket";
                // The headers the backend's proxies get, copied from this request.
                let copied: Vec<(String, Vec<u8>)> = (shard.cfg.proxy.http_headers.iter())
                    .filter_map(|name| head.header(name).map(|v| (name.clone(), v.to_vec())))
                    .collect();
                let early = buf.split_off(head.len);
                drop(buf);
                if let Some((stream, protobuf)) = upgrade(&shard, stream, &head).await {
                    let wire = match (echo_path, protobuf) {
                        (true, _) => Wire::Echo,
                        (false, true) => Wire::Protobuf,
                        (false, false) => Wire::Json,
                    };
                    hand_over(&shard, stream, early, wire, copied);
                }
                return;
            }
            (_, p) if Transport::of_path(p).is_some() => {
                let kind = Transport::of_path(p).expect("matched");
                if !kind.enabled(&shard.cfg.transports) {
                    let _ = stream.write_all(&http::plain(404, "not found\n")).await;
                    return;
                }
                Box::pin(serve_stream(shard, stream, head, buf, deadline, kind)).await;
                return;
            }
            ("GET" | "HEAD", "/healthz") => {
                let draining = shard.node.draining.load(Ordering::Relaxed);
                let (status, body) = if draining {
                    (503, "draining\n")
                } else {
                    (200, "ok\n")
                };
                let keep = head.keep_alive();
                let resp = http::response(status, "text/plain", body.as_bytes(), keep);
                if stream.write_all(&resp).await.is_err() || !keep {
                    return;
                }
                buf.drain(..head.len);
            }
            (_, http::emulation::PATH) => {
                let served =
                    http::emulation::serve(&*shard, &mut stream, &head, &mut buf, deadline);
                if !Box::pin(served).await {
                    return;
                }
            }
            (_, p) if is_api_path(p) => {
                let Some(first) =
                    Box::pin(api::read(&*shard, &mut stream, &head, &mut buf, deadline)).await
                else {
                    return;
                };
                let batch = pipelined(&shard, first, &mut buf);
                let answer = Box::pin(api::answer_all(&*shard, batch)).await;
                if stream.write_all(&answer.bytes).await.is_err() {
                    return;
                }
                match answer.after {
                    api::After::KeepAlive => {}
                    api::After::Close => return,
                    api::After::DiscardThenClose => {
                        let linger = timeout.min(http::MAX_LINGER);
                        let max = limits.max_api_body_bytes;
                        Box::pin(http::discard_then_close(&mut stream, linger, max)).await;
                        return;
                    }
                }
            }
            _ => {
                let _ = stream.write_all(&http::plain(404, "not found\n")).await;
                return;
            }
        }
    }
}

/// The transports besides `/connection/websocket` ([`crate::config::TransportsConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Sse,
    HttpStream,
    UniSse,
    UniHttpStream,
    UniWebsocket,
}

impl Transport {
    fn of_path(path: &str) -> Option<Transport> {
        Some(match path {
            "/connection/sse" => Transport::Sse,
            "/connection/http_stream" => Transport::HttpStream,
            "/connection/uni_sse" => Transport::UniSse,
            "/connection/uni_http_stream" => Transport::UniHttpStream,
            "/connection/uni_websocket" => Transport::UniWebsocket,
            _ => return None,
        })
    }

    fn enabled(self, t: &crate::config::TransportsConfig) -> bool {
        match self {
            Transport::Sse => t.sse,
            Transport::HttpStream => t.http_stream,
            Transport::UniSse => t.uni_sse,
            Transport::UniHttpStream => t.uni_http_stream,
            Transport::UniWebsocket => t.uni_websocket,
        }
    }

    fn wire(self) -> Wire {
        match self {
            Transport::Sse => Wire::Sse,
            Transport::HttpStream => Wire::HttpStream,
            Transport::UniSse => Wire::UniSse,
            Transport::UniHttpStream => Wire::UniHttpStream,
            Transport::UniWebsocket => Wire::UniWebsocket,
        }
    }
}

/// Serves a request to one of the enabled stream transports: CORS (a refused origin gets 403,
/// a preflight its 204), the connect data (the `cf_connect` parameter or the body, at most
/// `limits.max_message_bytes`; a bad one gets 400 with its reason), the node's own limits
/// (draining, the connection limit: 503), then the response head, and the socket becomes a
/// connection of the shard's I/O with the connect command run at once. A uni WebSocket is an
/// ordinary upgrade whose first message (or `cf_connect`) is the connect request.
async fn serve_stream(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    head: Head,
    mut buf: Vec<u8>,
    deadline: Instant,
    kind: Transport,
) {
    let copied: Vec<(String, Vec<u8>)> = (shard.cfg.proxy.http_headers.iter())
        .filter_map(|name| head.header(name).map(|v| (name.clone(), v.to_vec())))
        .collect();
    let connect_param = hs::query_param(&head.path, hs::CONNECT_PARAM);
    if kind == Transport::UniWebsocket {
        let mut early = buf.split_off(head.len);
        drop(buf);
        let first = match connect_param
            .as_deref()
            .map(|r| uni_connect_command(r.as_bytes()))
        {
            Some(None) => {
                let _ = stream
                    .write_all(&http::plain(400, "invalid connect request\n"))
                    .await;
                return;
            }
            Some(Some(_)) => connect_param.as_deref(),
            None => None,
        };
        let Some((stream, _)) = upgrade(&shard, stream, &head).await else {
            return;
        };
        if let Some(request) = first {
            // The connect request of the URL goes first, as if it were the first message.
            let mut frame = crate::ws::client_frame(1, true, request.as_bytes(), [0; 4]);
            frame.append(&mut early);
            early = frame;
        }
        hand_over(&shard, stream, early, Wire::UniWebsocket, copied);
        return;
    }
    let cors = hs::cors(&head, &shard.cfg.allowed_origins);
    if cors == hs::Cors::Refused {
        bump(&shard.counters.origin_refusals);
        let _ = stream
            .write_all(&http::plain(403, "origin not allowed\n"))
            .await;
        return;
    }
    let refuse = |status: u16, reason: &str| {
        let mut r = http::plain(status, reason);
        let extra = hs::cors_headers(&cors);
        if !extra.is_empty() {
            // The CORS headers go in the head, so a browser page can read the reason.
            let at = r.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 2;
            r.splice(at..at, extra.into_bytes());
        }
        r
    };
    if head
        .header_str("content-type")
        .is_some_and(|t| t.starts_with("application/octet-stream"))
    {
        // The protobuf flavour of the streams is not served (JSON only).
        let _ = stream
            .write_all(&refuse(
                400,
                "protobuf is not supported on this transport\n",
            ))
            .await;
        return;
    }
    let data: Vec<u8> = match (head.method.as_str(), kind) {
        ("OPTIONS", _) => {
            let _ = stream.write_all(&hs::preflight(&head, &cors)).await;
            return;
        }
        ("GET", Transport::Sse | Transport::UniSse) => match connect_param {
            Some(c) => c.into_bytes(),
            None if kind == Transport::UniSse => Vec::new(),
            None => {
                let _ = stream
                    .write_all(&refuse(400, "no connect command (cf_connect)\n"))
                    .await;
                return;
            }
        },
        ("POST", _) => {
            buf.drain(..head.len);
            let max = shard.cfg.limits.max_message_bytes;
            match hs::read_body(&mut stream, &head, &mut buf, max, deadline).await {
                Ok(body) => body,
                Err(hs::BodyFailure::Status(status, reason)) => {
                    let _ = stream.write_all(&refuse(status, reason)).await;
                    return;
                }
                Err(hs::BodyFailure::Gone(http::ReadError::Timeout)) => {
                    bump(&shard.counters.request_timeouts);
                    let _ = stream.write_all(&http::request_timeout()).await;
                    return;
                }
                Err(hs::BodyFailure::Gone(_)) => return,
            }
        }
        _ => {
            let _ = stream.write_all(&refuse(405, "method not allowed\n")).await;
            return;
        }
    };
    drop(buf);
    let command = match kind {
        Transport::Sse | Transport::HttpStream => match hs::check_commands(&data) {
            Ok(text) => text.to_string(),
            Err(reason) => {
                let _ = stream.write_all(&refuse(400, reason)).await;
                return;
            }
        },
        _ => match uni_connect_command(&data) {
            Some(cmd) => cmd,
            None => {
                let _ = stream
                    .write_all(&refuse(400, "invalid connect request\n"))
                    .await;
                return;
            }
        },
    };
    if let Err(answer) = admit(&shard) {
        let _ = stream.write_all(&refuse(answer.0, answer.1)).await;
        return;
    }
    let sse = matches!(kind, Transport::Sse | Transport::UniSse);
    if stream
        .write_all(&hs::stream_head(sse, &cors))
        .await
        .is_err()
    {
        shard.node.connections.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    hand_over(&shard, stream, command.into_bytes(), kind.wire(), copied);
}

/// Hands a socket whose request was answered (a 101 or a stream's head) to the shard's I/O.
/// The WebSocket phase leaves glommio's socket type (and the front door's task): the shard
/// arms a multishot receive for it on its own ring, so an idle connection holds no task, no
/// future, no buffer and no glommio source.
fn hand_over(
    shard: &Shard,
    stream: TcpStream,
    early: Vec<u8>,
    wire: Wire,
    copied: Vec<(String, Vec<u8>)>,
) {
    // SAFETY: dup(2) of a socket we own; the copy is handed to the shard.
    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
    drop(stream);
    if fd < 0 {
        shard.node.connections.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    super::io::start(shard, fd, early, wire, copied);
}

/// The node's own limits on a new connection: refused while draining or at the connection
/// limit (503, reason), else counted in the node's connections.
fn admit(shard: &Shard) -> Result<(), (u16, &'static str)> {
    if shard.node.draining.load(Ordering::Relaxed) {
        return Err((503, "node is draining\n"));
    }
    let max = shard.cfg.limits.max_connections;
    if shard.node.connections.fetch_add(1, Ordering::Relaxed) >= max {
        shard.node.connections.fetch_sub(1, Ordering::Relaxed);
        bump(&shard.counters.refused_full);
        return Err((503, "connection limit reached\n"));
    }
    Ok(())
}

fn is_api_path(path: &str) -> bool {
    path.starts_with("/api/") || path == "/api"
}

/// The API requests served together with `first`: those that follow it whole in the bytes
/// already read (pipelined on the keep-alive connection), at most
/// `limits.max_pipelined_requests` in all (the rest waits for the next batch), drained from
/// `buf`. Nothing is read from the socket for them, so a batch is also bounded by what one
/// read brought; each body is bounded by `limits.max_api_body_bytes` as usual. The batch ends
/// after a request that closes the connection (a refusal, `Connection: close`), and before
/// anything that is not a complete API request: a partial one, another path, a bad or too big
/// head. That is left in `buf` for the loop, read and answered the ordinary way after this
/// batch's answers.
fn pipelined(shard: &Shard, first: api::Request, buf: &mut Vec<u8>) -> Vec<api::Request> {
    let limits = &shard.cfg.limits;
    let mut batch = vec![first];
    while batch.len() < limits.max_pipelined_requests
        && batch.last().is_some_and(api::Request::keeps_alive)
        && !buf.is_empty()
    {
        let Ok(Some(head)) = http::parse_head(buf) else {
            break;
        };
        let path = head.path.split('?').next().unwrap_or("");
        if head.len > limits.max_request_head_bytes || !is_api_path(path) {
            break;
        }
        let Some(next) = api::take_buffered(shard, &head, buf) else {
            break;
        };
        bump(&shard.counters.http_requests);
        bump(&shard.counters.api_pipelined);
        batch.push(next);
    }
    batch
}

/// Checks the upgrade ([`http::handshake`]), applies the node's own limits (draining, the
/// connection limit) and writes the 101. Returns the stream for the WebSocket phase and whether
/// it speaks protobuf, or `None` after having answered with an error status.
async fn upgrade(shard: &Shard, mut stream: TcpStream, head: &Head) -> Option<(TcpStream, bool)> {
    let accept = match handshake::accept(head, &shard.cfg.allowed_origins) {
        Ok(bytes) => bytes,
        Err(refusal) => {
            if refusal == handshake::Refusal::Origin {
                bump(&shard.counters.origin_refusals);
            }
            let _ = stream.write_all(&refusal.response()).await;
            return None;
        }
    };
    if let Err((status, reason)) = admit(shard) {
        let _ = stream.write_all(&http::plain(status, reason)).await;
        return None;
    }
    if stream.write_all(&accept.response).await.is_err() {
        shard.node.connections.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    Some((stream, accept.protobuf))
}

/// The API's view of the shard: configuration, node state and the broker.
impl api::ApiContext for Shard {
    fn config(&self) -> &crate::config::Config {
        &self.cfg
    }
    fn node(&self) -> &crate::bus::NodeInfo {
        &self.node
    }
    fn request(
        &self,
        make: impl FnOnce(crate::bus::ReplyTo) -> crate::bus::ToBroker,
    ) -> impl std::future::Future<Output = Result<crate::bus::BrokerReply, crate::protocol::ErrorCode>>
    {
        Shard::request(self, make)
    }
    fn send_command(
        &self,
        cmd: crate::bus::ShardCommand,
    ) -> Result<(), crate::protocol::ErrorCode> {
        Shard::send_command(self, cmd)
    }
    fn request_timed_out(&self) {
        bump(&self.counters.request_timeouts);
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;
    use crate::bus::NodeInfo;
    use crate::config::Config;
    use std::sync::Arc;

    /// An idle WebSocket connection is a `Connection` in its shard's table: its size is paid per
    /// connection, so it is pinned here (DESIGN §3). The HTTP phase's future lives only until
    /// the upgrade.
    #[test]
    fn per_connection_future_stays_small() {
        let sizes = glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let stream = glommio::net::TcpStream::connect(addr).await.unwrap();
                let cfg = Config {
                    insecure: true,
                    ..Config::default()
                };
                let node = Arc::new(NodeInfo::new("t".into(), "t".into(), "t".into(), 1));
                let (tx, _rx) = crate::bus::broker_queue(1, false).unwrap();
                let shard = Shard::new(0, Arc::new(cfg), node, tx);
                let stream_size = std::mem::size_of_val(&stream);
                let ws_size = std::mem::size_of::<crate::shard::connection::Connection>();
                let fut = serve(shard, stream);
                (std::mem::size_of_val(&fut), stream_size, ws_size)
            })
            .unwrap()
            .join()
            .unwrap();
        eprintln!(
            "serve (HTTP phase) future {} bytes, TcpStream {} bytes, WebSocket Connection {} bytes",
            sizes.0, sizes.1, sizes.2
        );
        assert!(
            sizes.2 <= 384,
            "WebSocket phase future grew to {} bytes",
            sizes.2
        );
        assert!(
            sizes.0 <= 2048,
            "HTTP phase future grew to {} bytes",
            sizes.0
        );
    }
}
