//! WIP until the lead wires the JWK Set fetch (`token_jwks_url` through the shard's HTTP client,
//! `[proxy] ca_file`): the real binary verifies RS256 and ES256 tokens with keys from a JWK Set
//! served over HTTPS by the test, from a CA the test makes.
//!
//! The test's JWKS server: rustls (ring) on a std thread, 127.0.0.1:0, HTTP/1.1 keep-alive,
//! `GET /jwks` answered with the current body, requests counted; it can change its body and
//! stop. `jwks_test_server_answers_over_https` checks the server alone with a rustls client.

use crate::harness::*;
use crate::keys::{self, Pair};
use jsonwebtoken::Algorithm;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A CA (its certificate, PEM and DER) and a server certificate for 127.0.0.1 signed by it.
struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivatePkcs8KeyDer<'static>,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "shardcast test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    Pki {
        ca_pem: ca.pem(),
        ca_der: ca.der().clone(),
        server_chain: vec![cert.der().clone()],
        server_key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    }
}

/// rustls with ring, as the server's HTTP client uses. (rustls 0.23.48 deprecates ring's
/// default provider for lacking post-quantum key exchange, which loopback tests do not need.)
#[allow(
    deprecated,
    reason = "ring, as the server's client; no post-quantum needed here"
)]
fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The test's HTTPS JWKS endpoint.
struct JwksServer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    requests: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl JwksServer {
    fn start(pki: &Pki, body: String) -> JwksServer {
        let provider = ring_provider();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                pki.server_chain.clone(),
                PrivateKeyDer::Pkcs8(pki.server_key.clone_key()),
            )
            .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(body));
        let requests = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, r, s) = (body.clone(), requests.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            let mut conns = Vec::new();
            // Polls accept until stopped (bounded by the test's lifetime); at most 64
            // connections, each served by its own thread until it closes or the server stops.
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) if conns.len() < 64 => {
                        let (config, b, r, s) = (config.clone(), b.clone(), r.clone(), s.clone());
                        conns.push(std::thread::spawn(move || {
                            serve(stream, config, &b, &r, &s)
                        }));
                    }
                    Ok(_) => {} // over the bound: dropped (closed)
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            drop(listener); // refuse connections from now on
            for c in conns {
                let _ = c.join();
            }
        });
        JwksServer {
            addr,
            body,
            requests,
            stop,
            accept: Some(accept),
        }
    }

    fn url(&self) -> String {
        format!("https://{}/jwks", self.addr)
    }

    fn requests(&self) -> u32 {
        self.requests.load(Ordering::SeqCst)
    }

    fn set_body(&self, body: String) {
        *self.body.lock().unwrap() = body;
    }

    /// Stops accepting, closes every connection, and waits for the threads.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves one connection: GET requests without bodies, answered in turn (keep-alive).
fn serve(
    stream: TcpStream,
    config: Arc<rustls::ServerConfig>,
    body: &Mutex<String>,
    requests: &AtomicU32,
    stop: &AtomicBool,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = BufReader::new(rustls::StreamOwned::new(conn, stream));
    let mut head = String::new();
    let started = Instant::now();
    // Bounded: a connection lives at most 5 minutes, and ends when the server stops.
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(300) {
        let mut line = String::new();
        match tls.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                head.push_str(&line);
                continue;
            }
            Err(_) => return,
        }
        head.push_str(&line);
        if head.len() > 16 * 1024 {
            return;
        }
        if !head.ends_with("\r\n\r\n") {
            continue;
        }
        let request_line = head.lines().next().unwrap_or("").to_string();
        head.clear();
        let (status, payload) = if request_line.starts_with("GET /jwks ") {
            requests.fetch_add(1, Ordering::SeqCst);
            ("200 OK", body.lock().unwrap().clone())
        } else {
            ("404 Not Found", String::new())
        };
        let reply = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
            payload.len()
        );
        if tls.get_mut().write_all(reply.as_bytes()).is_err() || tls.get_mut().flush().is_err() {
            return;
        }
    }
}

/// A keep-alive HTTPS client that trusts only `ca`.
struct HttpsClient(BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>);

impl HttpsClient {
    fn connect(addr: SocketAddr, ca: &CertificateDer<'static>) -> std::io::Result<HttpsClient> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(HttpsClient(BufReader::new(rustls::StreamOwned::new(
            conn, stream,
        ))))
    }

    /// One GET on the connection: (status line, body). Errors when the handshake fails.
    fn get(&mut self, path: &str) -> std::io::Result<(String, String)> {
        let tls = self.0.get_mut();
        write!(tls, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")?;
        tls.flush()?;
        let mut status = String::new();
        self.0.read_line(&mut status)?;
        let mut length = 0;
        loop {
            let mut line = String::new();
            self.0.read_line(&mut line)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        self.0.read_exact(&mut body)?;
        Ok((status.trim().to_string(), String::from_utf8(body).unwrap()))
    }
}

fn jwk(pair: &Pair, kid: &str) -> Value {
    let mut j = pair.jwk.clone();
    j["kid"] = json!(kid);
    j["use"] = json!("sig");
    j
}

#[test]
fn jwks_test_server_answers_over_https() {
    let pki = pki();
    let mut server = JwksServer::start(&pki, r#"{"keys":[]}"#.into());
    let mut client = HttpsClient::connect(server.addr, &pki.ca_der).unwrap();
    let (status, body) = client.get("/jwks").unwrap();
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.1 200 OK", r#"{"keys":[]}"#)
    );
    // Keep-alive: the same connection, the new body.
    server.set_body(r#"{"keys":[1]}"#.into());
    assert_eq!(client.get("/jwks").unwrap().1, r#"{"keys":[1]}"#);
    assert_eq!(client.get("/other").unwrap().0, "HTTP/1.1 404 Not Found");
    assert_eq!(server.requests(), 2);
    // A client trusting another CA refuses the certificate.
    let stranger = self::pki().ca_der;
    let mut refused = HttpsClient::connect(server.addr, &stranger).unwrap();
    assert!(refused.get("/jwks").is_err());
    assert_eq!(server.requests(), 2);
    // Stopping closes the open keep-alive connection and the listener, promptly.
    let started = Instant::now();
    server.stop();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(
        client.get("/jwks").is_err(),
        "the open connection was closed"
    );
    assert!(TcpStream::connect(server.addr).is_err(), "stopped");
}

/// Connects with `token`: `Ok(reply)` (a connect result or an error reply), or `Err(code)`
/// when the node closes the connection instead (0: closed without a code).
fn try_connect(node: &Server, token: &str) -> Result<Value, u16> {
    let mut c = Client::connect_ws(node);
    c.send_text(&json!({"id": 1, "connect": {"token": token}}).to_string());
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match c.ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                for line in t.as_str().split('\n').filter(|l| !l.is_empty()) {
                    let v: Value = serde_json::from_str(line).unwrap();
                    if v["id"] == 1 {
                        return Ok(v);
                    }
                }
            }
            Ok(tungstenite::Message::Close(frame)) => {
                return Err(frame.map_or(0, |f| u16::from(f.code)))
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Err(0),
        }
    }
    panic!("neither a reply nor a close within 10 s");
}

#[test]
fn tokens_verify_with_keys_from_a_jwks_over_https() {
    const INTERVAL: u64 = 2; // token_jwks_min_fetch_interval_secs
    let pki = pki();
    let (rsa, ec, rotated, stranger) =
        (keys::rsa(2048), keys::p256(), keys::p256(), keys::rsa(2048));
    let set = json!({"keys": [jwk(&rsa, "rk"), jwk(&ec, "ek")]});
    let mut jwks = JwksServer::start(&pki, set.to_string());
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    // One shard, so that the fetch counts are exact (each shard keeps its own copy).
    let node = Server::start(
        &format!(
            r#"
listen = "127.0.0.1:0"
shards = 1
api_key = "test-api-key"
metrics_listen = "127.0.0.1:0"
token_jwks_url = "{}"
token_jwks_min_fetch_interval_secs = {INTERVAL}
token_jwks_refresh_interval_secs = 3600
[proxy]
ca_file = {:?}
[namespaces.chat]
allow_subscribe_for_client = true
"#,
            jwks.url(),
            ca_file.display().to_string()
        ),
        &[],
    );
    let claims = json!({"sub": "alice", "exp": now_secs() + 600});
    let rs = keys::sign(&rsa, Algorithm::RS256, Some("rk"), &claims);
    let es = keys::sign(&ec, Algorithm::ES256, Some("ek"), &claims);
    // The shard fetches the set at start; then tokens with its kids connect.
    eventually(Duration::from_secs(10), "the shard fetched the set", || {
        jwks.requests() >= 1
    });
    eventually(Duration::from_secs(10), "an RS256 token connects", || {
        try_connect(&node, &rs).is_ok_and(|r| r["connect"]["client"].is_string())
    });
    let r = try_connect(&node, &es).unwrap();
    assert!(r["connect"]["client"].is_string(), "{r}");
    // A token from another key under a known kid: 3500, and no fetch.
    let fetched = jwks.requests();
    let forged = keys::sign(&stranger, Algorithm::RS256, Some("rk"), &claims);
    assert_eq!(try_connect(&node, &forged), Err(3500));
    assert_eq!(jwks.requests(), fetched, "a known kid is not fetched again");

    // Unknown kids: at most one fetch per interval, however many tokens name them.
    std::thread::sleep(Duration::from_secs(INTERVAL + 1));
    let before = jwks.requests();
    let started = Instant::now();
    for i in 0..5 {
        let bogus = keys::sign(
            &stranger,
            Algorithm::RS256,
            Some(&format!("bogus-{i}")),
            &claims,
        );
        assert_eq!(try_connect(&node, &bogus), Err(3500), "bogus kid {i}");
    }
    let during = jwks.requests() - before;
    if started.elapsed() < Duration::from_secs(INTERVAL) {
        assert_eq!(
            during, 1,
            "one fetch for five unknown kids within the interval"
        );
    } else {
        assert!(
            during <= 1 + (started.elapsed().as_secs() / INTERVAL) as u32,
            "{during}"
        );
    }

    // A key rotated in at the provider works with its first token (fetch, then verify again).
    let with_rotated = json!({"keys": [jwk(&rsa, "rk"), jwk(&ec, "ek"), jwk(&rotated, "ek2")]});
    jwks.set_body(with_rotated.to_string());
    std::thread::sleep(Duration::from_secs(INTERVAL + 1));
    let es2 = keys::sign(&rotated, Algorithm::ES256, Some("ek2"), &claims);
    let r = try_connect(&node, &es2).unwrap();
    assert!(r["connect"]["client"].is_string(), "rotated key: {r}");

    // A bad body does not wipe the set.
    jwks.set_body("<html>502 Bad Gateway</html>".into());
    std::thread::sleep(Duration::from_secs(INTERVAL + 1));
    let before = jwks.requests();
    let bogus = keys::sign(&stranger, Algorithm::RS256, Some("bogus-x"), &claims);
    assert_eq!(try_connect(&node, &bogus), Err(3500));
    assert_eq!(
        jwks.requests(),
        before + 1,
        "the unknown kid fetched the set"
    );
    assert!(try_connect(&node, &rs).is_ok_and(|r| r["connect"]["client"].is_string()));

    // The endpoint goes away: the keys fetched before keep verifying.
    jwks.stop();
    std::thread::sleep(Duration::from_secs(INTERVAL + 1));
    assert_eq!(
        try_connect(&node, &bogus),
        Err(3500),
        "unknown kid, endpoint down"
    );
    for (what, token) in [("RS256", &rs), ("ES256", &es), ("rotated ES256", &es2)] {
        let r = try_connect(&node, token).unwrap_or_else(|code| panic!("{what}: closed {code}"));
        assert!(r["connect"]["client"].is_string(), "{what}: {r}");
    }
    assert_eq!(try_connect(&node, &forged), Err(3500));
}
