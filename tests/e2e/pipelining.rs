//! HTTP API requests pipelined on one keep-alive connection: written in one go, started
//! together (counter `api_pipelined`), answered in order, published in order; a request that
//! closes the connection ends the batch there.

use crate::harness::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn config() -> String {
    format!("{BASE_CONFIG}{HISTORY_NAMESPACES}")
}

/// A node counter from `/api/info` (summed over shards, published once a second).
fn counter(server: &Server, name: &str) -> u64 {
    let (_, info) = api(server.addr, "info", &json!({}));
    info["result"]["nodes"][0]["counters"][name]
        .as_u64()
        .unwrap_or(0)
}

/// `POST /api/<method>` with a `Content-Length` body; `extra` are more header lines.
fn request(method: &str, body: &Value, key: &str, extra: &str) -> String {
    let body = body.to_string();
    format!(
        "POST /api/{method} HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The same with a chunked body, cut in three chunks.
fn chunked_request(method: &str, body: &Value) -> String {
    let body = body.to_string();
    let (a, rest) = body.split_at(body.len() / 3);
    let (b, c) = rest.split_at(rest.len() / 2);
    let mut out = format!(
        "POST /api/{method} HTTP/1.1\r\nHost: t\r\nX-API-Key: {API_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    for part in [a, b, c] {
        out.push_str(&format!("{:x}\r\n{part}\r\n", part.len()));
    }
    out.push_str("0\r\n\r\n");
    out
}

/// One response: (status, `Connection` header, body). `None` at the end of the stream.
struct Response {
    status: u16,
    connection: String,
    body: String,
}

fn read_response(r: &mut BufReader<TcpStream>) -> Option<Response> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let status = line.split_whitespace().nth(1)?.parse().ok()?;
    let (mut length, mut connection) = (0, String::new());
    loop {
        let mut header = String::new();
        r.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().ok()?,
            "connection" => connection = value.trim().to_ascii_lowercase(),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body).ok()?;
    Some(Response {
        status,
        connection,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn keep_alive_connection(addr: SocketAddr) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

/// A publish to `channel` carrying `n`, padded so that requests have different sizes and some
/// cut across the server's reads.
fn publish_body(channel: &str, n: u64) -> Value {
    json!({"channel": channel, "data": {"n": n, "pad": "x".repeat((n as usize * 37) % 300)}})
}

/// 20 publishes to one channel in one write on one keep-alive connection (two of them
/// chunked): 20 answers in order with offsets 1..=20, the subscriber gets 1..=20 in order, the
/// connection stays usable, and the server started them together (`api_pipelined`).
fn twenty_pipelined_publishes(server: &Server) {
    let (mut sub, _) = Client::connected(server, "alice");
    let r = sub.command("subscribe", json!({"channel": "feed:pipe"}));
    let epoch = r["subscribe"]["epoch"]
        .as_str()
        .expect("an epoch")
        .to_string();
    let before = counter(server, "api_pipelined");

    let mut wire = String::new();
    for n in 1..=20 {
        let body = publish_body("feed:pipe", n);
        if n == 7 || n == 15 {
            wire.push_str(&chunked_request("publish", &body));
        } else {
            wire.push_str(&request("publish", &body, API_KEY, ""));
        }
    }
    let (mut s, mut r) = keep_alive_connection(server.addr);
    s.write_all(wire.as_bytes()).unwrap();
    for n in 1..=20u64 {
        let resp = read_response(&mut r).unwrap_or_else(|| panic!("answer {n}"));
        assert_eq!(resp.status, 200, "answer {n}: {}", resp.body);
        assert_eq!(resp.connection, "keep-alive", "answer {n}");
        let v: Value = serde_json::from_str(&resp.body).unwrap();
        assert_eq!(
            v["result"]["offset"], n,
            "answers come in request order: {v}"
        );
        assert_eq!(v["result"]["epoch"], epoch.as_str());
    }
    for n in 1..=20u64 {
        let p = sub.push(Duration::from_secs(10)).expect("a publication");
        assert_eq!(p["push"]["pub"]["offset"], n, "{p}");
        assert_eq!(
            p["push"]["pub"]["data"]["n"], n,
            "published in request order"
        );
    }
    // The connection still serves the next request.
    s.write_all(request("publish", &publish_body("feed:pipe", 21), API_KEY, "").as_bytes())
        .unwrap();
    let resp = read_response(&mut r).expect("answer 21");
    let v: Value = serde_json::from_str(&resp.body).unwrap();
    assert_eq!(v["result"]["offset"], 21, "{v}");

    // The server took the requests already read as batches: all but a few (each batch's first
    // request, and those cut across reads) were started with the ones before them.
    eventually(Duration::from_secs(5), "pipelined requests counted", || {
        counter(server, "api_pipelined") >= before + 10
    });
}

#[test]
fn pipelined_publishes_are_started_together_and_answered_in_order() {
    let server = Server::start(&config(), &[]);
    twenty_pipelined_publishes(&server);
}

#[test]
fn pipelined_publishes_keep_their_order_through_redis() {
    let redis = Redis::start(&[]);
    let cfg = format!("redis = \"{}\"\n{}", redis.url(), config());
    let server = Server::start(&cfg, &[]);
    twenty_pipelined_publishes(&server);
}

/// The top offset of a history channel.
fn top_offset(server: &Server, channel: &str) -> u64 {
    let (_, v) = api(server.addr, "history", &json!({"channel": channel}));
    v["result"]["offset"].as_u64().unwrap_or(u64::MAX)
}

/// Reads `n` answers with offsets 1..=n, then one more (returned).
fn answers_then_last(r: &mut BufReader<TcpStream>, n: u64) -> Response {
    for i in 1..=n {
        let resp = read_response(r).unwrap_or_else(|| panic!("answer {i}"));
        assert_eq!(resp.status, 200, "answer {i}: {}", resp.body);
        let v: Value = serde_json::from_str(&resp.body).unwrap();
        assert_eq!(v["result"]["offset"], i, "{v}");
    }
    read_response(r).expect("the request that ends the batch is answered")
}

#[test]
fn a_request_that_closes_the_connection_ends_the_batch() {
    let server = Server::start(&config(), &[]);

    // A wrong key in the middle: the five before it are served and answered in order, then
    // 401, then the connection closes; the three after it are not served.
    let mut wire = String::new();
    for n in 1..=5 {
        wire.push_str(&request(
            "publish",
            &publish_body("feed:refused", n),
            API_KEY,
            "",
        ));
    }
    wire.push_str(&request(
        "publish",
        &publish_body("feed:refused", 6),
        "wrong",
        "",
    ));
    for n in 7..=9 {
        wire.push_str(&request(
            "publish",
            &publish_body("feed:refused", n),
            API_KEY,
            "",
        ));
    }
    let (mut s, mut r) = keep_alive_connection(server.addr);
    s.write_all(wire.as_bytes()).unwrap();
    let refused = answers_then_last(&mut r, 5);
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert_eq!(refused.connection, "close");
    assert!(read_response(&mut r).is_none(), "closed after the 401");
    assert_eq!(
        top_offset(&server, "feed:refused"),
        5,
        "nothing after it ran"
    );

    // `Connection: close` on the fourth: it is served, the fifth is not.
    let mut wire = String::new();
    for n in 1..=5 {
        let extra = if n == 4 { "Connection: close\r\n" } else { "" };
        wire.push_str(&request(
            "publish",
            &publish_body("feed:close", n),
            API_KEY,
            extra,
        ));
    }
    let (mut s, mut r) = keep_alive_connection(server.addr);
    s.write_all(wire.as_bytes()).unwrap();
    let last = answers_then_last(&mut r, 3);
    assert_eq!((last.status, last.connection.as_str()), (200, "close"));
    let v: Value = serde_json::from_str(&last.body).unwrap();
    assert_eq!(v["result"]["offset"], 4, "{v}");
    assert!(read_response(&mut r).is_none(), "closed after the fourth");
    assert_eq!(top_offset(&server, "feed:close"), 4);
}

/// A broadcast sends one publish per channel, one after another: a publish pipelined behind
/// it still comes after all of them, and an `info` (three gathers) in the batch answers whole.
#[test]
fn a_call_sending_in_sequence_keeps_the_order_of_later_calls() {
    let server = Server::start(&config(), &[]);
    let mut wire = request(
        "broadcast",
        &json!({"channels": ["feed:b1", "feed:b2", "feed:b3"], "data": {"n": 1}}),
        API_KEY,
        "",
    );
    wire.push_str(&request(
        "publish",
        &publish_body("feed:b3", 2),
        API_KEY,
        "",
    ));
    wire.push_str(&request("info", &json!({}), API_KEY, ""));
    wire.push_str(&request(
        "publish",
        &publish_body("feed:b3", 3),
        API_KEY,
        "",
    ));
    let (mut s, mut r) = keep_alive_connection(server.addr);
    s.write_all(wire.as_bytes()).unwrap();
    let broadcast: Value = serde_json::from_str(&read_response(&mut r).unwrap().body).unwrap();
    let responses = broadcast["result"]["responses"].as_array().unwrap();
    assert_eq!(responses.len(), 3, "{broadcast}");
    assert_eq!(responses[2]["result"]["offset"], 1, "{broadcast}");
    let second: Value = serde_json::from_str(&read_response(&mut r).unwrap().body).unwrap();
    assert_eq!(
        second["result"]["offset"], 2,
        "after the broadcast: {second}"
    );
    let info: Value = serde_json::from_str(&read_response(&mut r).unwrap().body).unwrap();
    assert!(info["result"]["nodes"][0]["uid"].is_string(), "{info}");
    let third: Value = serde_json::from_str(&read_response(&mut r).unwrap().body).unwrap();
    assert_eq!(third["result"]["offset"], 3, "{third}");
}
