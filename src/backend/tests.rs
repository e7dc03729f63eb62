//! The client against real HTTP/1.1 servers: std threads on 127.0.0.1 speaking HTTP (and HTTPS
//! through rustls), counting the connections they accept and recording what they receive.
//! Each test runs the client on its own glommio executor, as a shard does.

use super::{tls, CallError, Endpoint, HttpClient};
use crate::config::ProxyConfig;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the test backend answers each request.
#[derive(Clone, Copy, Debug)]
enum Behave {
    /// `{"result":{}}`, keep-alive.
    KeepAlive,
    /// Like `KeepAlive` after a pause (so calls overlap).
    Delay(Duration),
    /// Answers with `Connection: close` and closes.
    CloseWithHeader,
    /// Answers without saying so, then closes.
    CloseSilently,
    /// Reads the request and never answers (until the client goes away).
    Stall,
    /// A body of this many bytes with its `Content-Length`.
    Body(usize),
    /// A body of this many bytes, chunked (no length up front).
    Chunked(usize),
    /// This status, with a small body.
    Status(u16),
}

/// One request as the backend read it.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

#[derive(Default)]
struct Seen {
    accepts: AtomicUsize,
    /// Connections the client closed (read returned end of file or an error).
    closed_by_client: AtomicUsize,
    received: Mutex<Vec<Received>>,
}

/// A backend on its own threads; stops (and joins its accept thread) when dropped.
struct Backend {
    addr: SocketAddr,
    seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    fn start(behave: Behave) -> Backend {
        Self::start_with(behave, None)
    }

    fn start_with(behave: Behave, tls: Option<Arc<rustls::ServerConfig>>) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !st.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((sock, _)) => {
                        s.accepts.fetch_add(1, Ordering::SeqCst);
                        let (s, tls) = (s.clone(), tls.clone());
                        std::thread::spawn(move || {
                            sock.set_nonblocking(false).unwrap();
                            sock.set_read_timeout(Some(Duration::from_secs(10)))
                                .unwrap();
                            match tls {
                                None => serve(sock, behave, &s),
                                Some(cfg) => {
                                    let conn = rustls::ServerConnection::new(cfg).unwrap();
                                    serve(rustls::StreamOwned::new(conn, sock), behave, &s)
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Backend {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn endpoint(&self, path: &str) -> Endpoint {
        Endpoint::parse(&self.url(path)).unwrap()
    }

    fn accepts(&self) -> usize {
        self.seen.accepts.load(Ordering::SeqCst)
    }

    fn received(&self) -> Vec<Received> {
        self.seen.received.lock().unwrap().clone()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves requests on one connection until the client closes it (or the behaviour does).
fn serve<S: Read + Write>(mut sock: S, behave: Behave, seen: &Seen) {
    let mut buf = Vec::new();
    loop {
        let Some(req) = read_request(&mut sock, &mut buf) else {
            seen.closed_by_client.fetch_add(1, Ordering::SeqCst);
            return;
        };
        seen.received.lock().unwrap().push(req);
        let ok = b"{\"result\":{}}";
        let answer = |status: u16, extra: &str, body: &[u8]| {
            let mut out = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            out.extend_from_slice(body);
            out
        };
        let out = match behave {
            Behave::KeepAlive => answer(200, "", ok),
            Behave::Delay(d) => {
                std::thread::sleep(d);
                answer(200, "", ok)
            }
            Behave::CloseWithHeader => answer(200, "Connection: close\r\n", ok),
            Behave::CloseSilently => answer(200, "", ok),
            Behave::Stall => {
                // Wait for the client to give up: end of file (or the read timeout).
                let mut b = [0u8; 64];
                while matches!(sock.read(&mut b), Ok(n) if n > 0) {}
                seen.closed_by_client.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Behave::Body(n) => answer(200, "", &vec![b'a'; n]),
            Behave::Chunked(n) => {
                let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                for part in vec![b'a'; n].chunks(16) {
                    out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                    out.extend_from_slice(part);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
                out
            }
            Behave::Status(s) => answer(s, "", b"{\"error\":\"nope\"}"),
        };
        if sock.write_all(&out).and_then(|_| sock.flush()).is_err() {
            return;
        }
        if matches!(behave, Behave::CloseWithHeader | Behave::CloseSilently) {
            return; // dropping the socket closes it
        }
    }
}

/// One request (head and `Content-Length` body), or `None` at end of file.
fn read_request<S: Read>(sock: &mut S, buf: &mut Vec<u8>) -> Option<Received> {
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = req.parse(buf) {
            let headers: Vec<(String, String)> = req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_string(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let len: usize = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| v.parse().unwrap());
            let (method, path) = (req.method?.to_string(), req.path?.to_string());
            while buf.len() < head + len {
                let n = sock.read(&mut chunk).ok().filter(|&n| n > 0)?;
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[head..head + len].to_vec();
            buf.drain(..head + len);
            return Some(Received {
                method,
                path,
                headers,
                body,
            });
        }
        let n = sock.read(&mut chunk).ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Runs `f` on a fresh glommio executor (as a shard does) and returns its result.
fn on_executor<F, Fut, T>(f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
    T: Send + 'static,
{
    glommio::LocalExecutorBuilder::default()
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

fn client(opts: &ProxyConfig) -> Rc<HttpClient> {
    HttpClient::new(opts, tls::client_config(opts).unwrap())
}

const SECOND: Duration = Duration::from_secs(1);

async fn post(c: &HttpClient, ep: &Endpoint) -> Result<super::Response, CallError> {
    let permit = c.try_acquire().expect("permit");
    let none: [(&str, &str); 0] = [];
    c.post_json(permit, ep, &none, b"{}".to_vec(), 5 * SECOND)
        .await
}

#[test]
fn sequential_calls_share_one_keep_alive_connection() {
    let backend = Backend::start(Behave::KeepAlive);
    let ep = backend.endpoint("/centrifugo/connect");
    let (statuses, idle) = on_executor(move || async move {
        let c = client(&ProxyConfig::default());
        let mut statuses = Vec::new();
        for _ in 0..5 {
            let r = post(&c, &ep).await.unwrap();
            assert_eq!(&r.body[..], b"{\"result\":{}}");
            statuses.push(r.status);
        }
        (statuses, c.idle_connections(&ep))
    });
    assert_eq!(statuses, [200; 5]);
    assert_eq!(backend.accepts(), 1, "five calls, one connection");
    assert_eq!(backend.received().len(), 5);
    assert_eq!(idle, 1);
}

#[test]
fn parallel_calls_keep_at_most_max_idle_connections() {
    let backend = Backend::start(Behave::Delay(Duration::from_millis(150)));
    let ep = backend.endpoint("/p");
    let accepts = {
        let seen = backend.seen.clone();
        move || seen.accepts.load(Ordering::SeqCst)
    };
    let (first, idle_after, second) = on_executor(move || async move {
        let opts = ProxyConfig {
            max_idle_per_endpoint: 2,
            ..ProxyConfig::default()
        };
        let c = client(&opts);
        let burst = |c: Rc<HttpClient>, ep: Endpoint| async move {
            let tasks: Vec<_> = (0..5)
                .map(|_| {
                    let (c, ep) = (c.clone(), ep.clone());
                    glommio::spawn_local(async move { post(&c, &ep).await.map(|r| r.status) })
                })
                .collect();
            for t in tasks {
                assert_eq!(t.await, Ok(200));
            }
        };
        burst(c.clone(), ep.clone()).await;
        let first = accepts();
        let idle_after = c.idle_connections(&ep);
        burst(c.clone(), ep.clone()).await;
        (first, idle_after, accepts())
    });
    assert_eq!(first, 5, "five overlapping calls need five connections");
    assert_eq!(idle_after, 2, "only max_idle_per_endpoint are kept");
    assert_eq!(
        second, 8,
        "the second burst reuses the two kept, opens three"
    );
}

#[test]
fn a_backend_that_closes_after_each_answer_still_serves_every_call() {
    const CALLS: usize = 40;
    for behave in [Behave::CloseWithHeader, Behave::CloseSilently] {
        let backend = Backend::start(behave);
        let ep = backend.endpoint("/c");
        let results = on_executor(move || async move {
            let c = client(&ProxyConfig::default());
            let mut out = Vec::new();
            for i in 0..CALLS {
                out.push(post(&c, &ep).await.map(|r| r.status));
                if i % 2 == 1 {
                    // Give the closed connection's end of file time to arrive, too.
                    glommio::timer::sleep(Duration::from_millis(20)).await;
                }
            }
            out
        });
        assert_eq!(results, vec![Ok(200); CALLS], "{behave:?}");
        assert_eq!(
            backend.accepts(),
            CALLS,
            "{behave:?}: a new connection per call"
        );
        assert_eq!(
            backend.received().len(),
            CALLS,
            "{behave:?}: no request reached the backend twice"
        );
    }
}

#[test]
fn a_stalled_backend_times_out_without_blocking_the_executor() {
    let backend = Backend::start(Behave::Stall);
    let ep = backend.endpoint("/slow");
    let seen = backend.seen.clone();
    let (result, elapsed, ticks, idle, closed) = on_executor(move || async move {
        let c = client(&ProxyConfig::default());
        let ticks = Rc::new(std::cell::Cell::new(0u32));
        let t = ticks.clone();
        let ticker = glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(Duration::from_millis(10)).await;
                t.set(t.get() + 1);
            }
        });
        let started = Instant::now();
        let permit = c.try_acquire().unwrap();
        let none: [(&str, &str); 0] = [];
        let result = c
            .post_json(
                permit,
                &ep,
                &none,
                b"{}".to_vec(),
                Duration::from_millis(300),
            )
            .await;
        let elapsed = started.elapsed();
        let ticks = ticks.get();
        drop(ticker);
        // The timed-out connection is closed: the backend sees its end of file.
        let deadline = Instant::now() + 5 * SECOND;
        while seen.closed_by_client.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        let closed = seen.closed_by_client.load(Ordering::SeqCst);
        (result, elapsed, ticks, c.idle_connections(&ep), closed)
    });
    assert_eq!(result, Err(CallError::Timeout));
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < 3 * SECOND,
        "{elapsed:?}"
    );
    assert!(
        ticks >= 10,
        "another task ran meanwhile ({ticks} ticks of 10 ms)"
    );
    assert_eq!(idle, 0, "a timed-out connection is not pooled");
    assert_eq!(closed, 1, "and it is closed");
    assert_eq!(backend.received().len(), 1);
}

#[test]
fn the_in_flight_bound_refuses_then_admits_again() {
    let (a, b, c_none, overloaded, d, in_flight) = on_executor(|| async {
        let opts = ProxyConfig {
            max_in_flight: 2,
            ..ProxyConfig::default()
        };
        let c = client(&opts);
        let a = c.try_acquire();
        let b = c.try_acquire();
        let refused = c.try_acquire();
        let overloaded = c.stats().overloaded_count();
        let (a_some, b_some, refused_none) = (a.is_some(), b.is_some(), refused.is_none());
        drop(a);
        let d = c.try_acquire();
        (
            a_some,
            b_some,
            refused_none,
            overloaded,
            d.is_some(),
            c.in_flight(),
        )
    });
    assert!(a && b, "two permits under a bound of two");
    assert!(c_none, "the third is refused");
    assert_eq!(overloaded, 1, "and counted in proxy_overloaded");
    assert!(d, "a dropped permit makes room");
    assert_eq!(in_flight, 2);
}

#[test]
fn a_response_over_max_response_bytes_fails_and_statuses_pass_through() {
    let exact = Backend::start(Behave::Body(100));
    let declared = Backend::start(Behave::Body(101));
    let chunked = Backend::start(Behave::Chunked(101));
    let status = Backend::start(Behave::Status(503));
    let eps = [
        exact.endpoint("/"),
        declared.endpoint("/"),
        chunked.endpoint("/"),
        status.endpoint("/"),
    ];
    let (results, idle) = on_executor(move || async move {
        let opts = ProxyConfig {
            max_response_bytes: 100,
            ..ProxyConfig::default()
        };
        let c = client(&opts);
        let mut out = Vec::new();
        for ep in &eps {
            out.push(post(&c, ep).await.map(|r| (r.status, r.body.len())));
        }
        let idle: Vec<usize> = eps.iter().map(|e| c.idle_connections(e)).collect();
        (out, idle)
    });
    assert_eq!(results[0], Ok((200, 100)), "exactly the limit passes");
    assert_eq!(results[1], Err(CallError::TooLarge), "by Content-Length");
    assert_eq!(results[2], Err(CallError::TooLarge), "as the chunks arrive");
    assert_eq!(
        results[3],
        Ok((503, 16)),
        "a non-2xx status is the caller's to judge"
    );
    assert_eq!(
        idle,
        [1, 0, 0, 1],
        "a cut-off response's connection is closed"
    );
}

#[test]
fn the_backend_receives_exactly_the_request_sent() {
    let backend = Backend::start(Behave::KeepAlive);
    let ep = backend.endpoint("/centrifugo/connect?x=1");
    let host = backend.addr.to_string();
    let body = br#"{"client":"c1","transport":"websocket","protocol":"json","encoding":"json","data":{"\u00e9":"\n"}}"#.to_vec();
    let sent = body.clone();
    let get_ep = backend.endpoint("/.well-known/jwks.json");
    on_executor(move || async move {
        let c = client(&ProxyConfig::default());
        let headers = vec![
            ("Cookie".to_string(), "session=abc; x=y".to_string()),
            ("X-Real-Ip".to_string(), "10.0.0.1".to_string()),
            ("Bad Name".to_string(), "x".to_string()),
            ("X-Bad-Value".to_string(), "a\r\nInjected: 1".to_string()),
            ("Content-Length".to_string(), "999".to_string()),
            ("Host".to_string(), "evil.example".to_string()),
            ("Content-Type".to_string(), "text/plain".to_string()),
        ];
        let permit = c.try_acquire().unwrap();
        let r = c.post_json(permit, &ep, &headers, sent, 5 * SECOND).await;
        assert_eq!(r.map(|r| r.status), Ok(200));
        let permit = c.try_acquire().unwrap();
        let r = c.get(permit, &get_ep, 5 * SECOND).await;
        assert_eq!(r.map(|r| r.status), Ok(200));
    });
    let got = backend.received();
    assert_eq!(got.len(), 2);
    let post = &got[0];
    assert_eq!(post.method, "POST");
    assert_eq!(post.path, "/centrifugo/connect?x=1");
    assert_eq!(post.body, body, "the body arrives byte for byte");
    assert_eq!(post.header("content-type"), ["application/json"]);
    assert_eq!(post.header("content-length"), [body.len().to_string()]);
    assert_eq!(post.header("host"), [host.as_str()]);
    assert_eq!(
        post.header("user-agent"),
        [format!("shardcast/{}", crate::VERSION)]
    );
    assert_eq!(post.header("cookie"), ["session=abc; x=y"]);
    assert_eq!(post.header("x-real-ip"), ["10.0.0.1"]);
    assert!(post.header("x-bad-value").is_empty() && post.header("injected").is_empty());
    assert!(post.header("bad name").is_empty());
    let names: Vec<String> = post.headers.iter().map(|h| h.0.to_lowercase()).collect();
    let mut expected = [
        "host",
        "user-agent",
        "content-type",
        "content-length",
        "cookie",
        "x-real-ip",
    ];
    let mut sorted = names.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected, "no other header: {names:?}");
    let get = &got[1];
    assert_eq!(
        (get.method.as_str(), get.path.as_str()),
        ("GET", "/.well-known/jwks.json")
    );
    assert_eq!(get.header("accept"), ["application/json"]);
    assert!(get.body.is_empty() && get.header("content-type").is_empty());
}

#[test]
fn a_closed_port_is_a_connect_error() {
    // Bind then drop: the port is (almost certainly) closed for the test's duration.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ep = Endpoint::parse(&format!("http://127.0.0.1:{port}/x")).unwrap();
    let r = on_executor(move || async move { post(&client(&ProxyConfig::default()), &ep).await });
    assert!(matches!(r, Err(CallError::Connect(_))), "{r:?}");
}

/// A CA and a server certificate for `localhost` and 127.0.0.1 signed by it: (CA PEM, server
/// config).
fn test_pki() -> (String, Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "shardcast test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    #[allow(deprecated)] // ring on purpose, as in `tls`
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (ca.pem(), Arc::new(server))
}

#[test]
fn https_verifies_against_ca_file_and_refuses_another_ca() {
    let (ca_pem, server) = test_pki();
    let (other_ca_pem, _) = test_pki();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("ca.pem");
    let other = dir.path().join("other.pem");
    std::fs::write(&good, ca_pem).unwrap();
    std::fs::write(&other, other_ca_pem).unwrap();
    let backend = Backend::start_with(Behave::KeepAlive, Some(server));
    let port = backend.addr.port();
    let by_name = Endpoint::parse(&format!("https://localhost:{port}/connect")).unwrap();
    let by_ip = Endpoint::parse(&format!("https://127.0.0.1:{port}/connect")).unwrap();
    let opts = |path: &std::path::Path| ProxyConfig {
        ca_file: path.display().to_string(),
        ..ProxyConfig::default()
    };
    let (good_opts, other_opts) = (opts(&good), opts(&other));
    good_opts.validate().unwrap();
    let (ok, reused, refused) = on_executor(move || async move {
        let c = client(&good_opts);
        let ok = vec![
            post(&c, &by_name).await.map(|r| r.status),
            post(&c, &by_ip).await.map(|r| r.status),
            post(&c, &by_name).await.map(|r| r.status),
        ];
        let reused = c.idle_connections(&by_name);
        let refused = post(&client(&other_opts), &by_name).await;
        (ok, reused, refused)
    });
    assert_eq!(ok, vec![Ok(200); 3]);
    assert_eq!(reused, 1);
    assert_eq!(
        backend.accepts(),
        3,
        "one TLS connection per origin (name and IP differ), reused, and the refused one"
    );
    match refused {
        Err(CallError::Tls(m)) => assert!(m.contains("certificate"), "{m}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }
    assert_eq!(
        backend.received().len(),
        3,
        "nothing was sent on the refused connection"
    );
}

#[test]
fn endpoints_parse_with_defaults_and_clear_errors() {
    let e = Endpoint::parse("http://127.0.0.1:9000/centrifugo/connect?a=b").unwrap();
    assert!(!e.is_tls());
    assert_eq!((e.host(), e.port()), ("127.0.0.1", 9000));
    assert_eq!(e.path(), "/centrifugo/connect?a=b");
    assert_eq!(e.host_header(), "127.0.0.1:9000");
    assert_eq!(e.origin(), "http://127.0.0.1:9000");
    assert_eq!(e.addrs(), ["127.0.0.1:9000".parse().unwrap()]);
    let e = Endpoint::parse("https://localhost/x").unwrap();
    assert!(e.is_tls());
    assert_eq!(
        (e.port(), e.host_header(), e.path()),
        (443, "localhost", "/x")
    );
    assert!(e
        .addrs()
        .iter()
        .all(|a| a.ip().is_loopback() && a.port() == 443));
    let e = Endpoint::parse("http://localhost").unwrap();
    assert_eq!((e.port(), e.path()), (80, "/"));
    let e = Endpoint::parse("http://[::1]:8080/p").unwrap();
    assert_eq!((e.host(), e.host_header()), ("::1", "[::1]:8080"));
    let e = Endpoint::parse("https://127.0.0.1:443/").unwrap();
    assert_eq!(
        e.host_header(),
        "127.0.0.1",
        "the default port is left out of Host"
    );
    for (bad, says) in [
        ("ftp://127.0.0.1/x", "scheme `ftp`"),
        ("127.0.0.1:9000/x", "not an http:// or https:// URL"),
        ("localhost:9000/x", "scheme `localhost`"),
        ("http://", "not an http:// or https:// URL"),
        ("http://user:secret@127.0.0.1/", "user name or password"),
        ("http://127.0.0.1/x#frag", "fragment"),
        ("not a url", "not an http:// or https:// URL"),
        ("http://no-such-host.invalid/x", "does not resolve"),
    ] {
        let err = Endpoint::parse(bad).unwrap_err();
        assert!(err.contains(says), "{bad}: {err}");
        assert!(!err.contains("secret"), "{err}");
    }
}

#[test]
fn proxy_config_keys_are_checked() {
    use crate::config::Config;
    let base = "insecure = true\n[proxy]\n";
    let c = Config::from_toml(&format!(
        "{base}connect_endpoint = \"http://127.0.0.1:9000/connect\"\nrpc_endpoint = \"http://localhost:9000/rpc\"\ntimeout_ms = 250\nhttp_headers = [\"Cookie\", \"X-Real-Ip\"]\nmax_in_flight = 8\nmax_idle_per_endpoint = 2\nmax_response_bytes = 1024\n"
    ))
    .unwrap();
    c.validate().unwrap();
    let keys: Vec<&str> = c.proxy.endpoints().map(|(k, _)| k).collect();
    assert_eq!(keys, ["connect_endpoint", "rpc_endpoint"]);
    assert_eq!(c.proxy.timeout(), Duration::from_millis(250));
    assert_eq!(c.proxy.http_headers, ["Cookie", "X-Real-Ip"]);
    let d = Config::default().proxy;
    assert_eq!(
        (
            d.timeout_ms,
            d.max_in_flight,
            d.max_idle_per_endpoint,
            d.max_response_bytes
        ),
        (1000, 256, 16, 65536)
    );
    assert_eq!(d.endpoints().count(), 0, "every proxy is off by default");
    let err = Config::from_toml(&format!("{base}publish_endpoint = \"ftp://h/x\"\n"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("publish_endpoint") && err.contains("ftp"),
        "{err}"
    );
    for (toml, key) in [
        ("timeout_ms = 0", "proxy.timeout_ms"),
        ("max_in_flight = 0", "proxy.max_in_flight"),
        ("max_idle_per_endpoint = 0", "proxy.max_idle_per_endpoint"),
        ("max_response_bytes = 0", "proxy.max_response_bytes"),
        ("http_headers = [\"Bad Header\"]", "proxy.http_headers"),
        ("ca_file = \"/nonexistent/ca.pem\"", "proxy.ca_file"),
    ] {
        let c = Config::from_toml(&format!("{base}{toml}\n")).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains(key), "{toml}: {err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("x.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let c = Config::from_toml(&format!(
        "{base}ca_file = {:?}\n",
        not_pem.display().to_string()
    ))
    .unwrap();
    let err = c.validate().unwrap_err().to_string();
    assert!(
        err.contains("proxy.ca_file") && err.contains("no PEM"),
        "{err}"
    );
}
