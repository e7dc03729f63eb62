//! Bad, slow and greedy clients: each gets a clear answer (error reply, documented close code or
//! HTTP status) and the node and its other clients carry on.

use crate::harness::*;
use serde_json::json;
use shardcast::ws::client_frame;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const M: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

/// Reads from a raw socket until the server's close frame; returns its code.
fn close_code(s: &mut TcpStream) -> Option<u16> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        // Walk complete frames looking for a close (0x88).
        let mut pos = 0;
        while pos + 2 <= buf.len() {
            let len = (buf[pos + 1] & 0x7f) as usize;
            let (hdr, len) = match len {
                126 if pos + 4 <= buf.len() => {
                    (4, u16::from_be_bytes([buf[pos + 2], buf[pos + 3]]) as usize)
                }
                126 | 127 => break,
                n => (2, n),
            };
            if pos + hdr + len > buf.len() {
                break;
            }
            if buf[pos] == 0x88 {
                let p = &buf[pos + hdr..pos + hdr + len];
                return (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
            }
            pos += hdr + len;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    None
}

/// A raw upgraded socket (101 read), nothing sent yet.
fn upgraded(server: &Server) -> TcpStream {
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(b"GET /connection/websocket HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let mut head = [0u8; 129];
    s.read_exact(&mut head).unwrap();
    assert!(head.starts_with(b"HTTP/1.1 101"));
    s
}

#[test]
fn frame_violations_get_documented_close_codes() {
    let mut server = Server::start(BASE_CONFIG, &[]);
    let (mut watcher, _) = Client::connected(&server, "watcher");
    watcher.command("subscribe", json!({"channel": "news"}));
    let mut rsv = client_frame(1, true, b"{}", M);
    rsv[0] |= 0x40;
    let mut oversized_ping = vec![0x89, 0x80 | 126, 0, 200];
    oversized_ping.extend_from_slice(&M);
    oversized_ping.extend(std::iter::repeat_n(0u8, 200));
    let mut frag_then_text = client_frame(1, false, b"{", M);
    frag_then_text.extend(client_frame(1, true, b"}", M));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("reserved bits", rsv, 1002),
        ("unknown data opcode", client_frame(3, true, b"x", M), 1002),
        (
            "unknown control opcode",
            client_frame(0xB, true, b"x", M),
            1002,
        ),
        ("unmasked frame", vec![0x81, 0x02, b'{', b'}'], 1002),
        ("fragmented ping", client_frame(9, false, b"p", M), 1002),
        ("oversized ping", oversized_ping, 1002),
        (
            "continuation without start",
            client_frame(0, true, b"x", M),
            1002,
        ),
        ("new message inside a fragmented one", frag_then_text, 1002),
        (
            "invalid UTF-8",
            client_frame(1, true, &[0xc3, 0x28], M),
            1007,
        ),
        (
            "bad close code",
            client_frame(8, true, &1005u16.to_be_bytes(), M),
            1002,
        ),
    ];
    for (what, bytes, want) in cases {
        let mut s = upgraded(&server);
        s.write_all(&bytes).unwrap();
        assert_eq!(close_code(&mut s), Some(want), "{what}");
    }
    // A 1 MB frame header alone is refused (1009) before its payload arrives.
    let mut s = upgraded(&server);
    let mut huge = vec![0x81, 0x80 | 127];
    huge.extend_from_slice(&(1u64 << 20).to_be_bytes());
    huge.extend_from_slice(&M);
    s.write_all(&huge).unwrap();
    assert_eq!(close_code(&mut s), Some(1009), "huge frame");
    // WebSocket pings are answered with the same payload.
    let mut s = upgraded(&server);
    s.write_all(&client_frame(9, true, b"hello", M)).unwrap();
    let mut pong = [0u8; 7];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"\x8a\x05hello");
    // Nobody else noticed.
    api(
        server.addr,
        "publish",
        &json!({"channel": "news", "data": 1}),
    );
    assert!(watcher.push(Duration::from_secs(5)).is_some());
    assert!(server.alive());
}

#[test]
fn slowloris_and_silent_upgrades_are_cut() {
    let cfg = format!("{BASE_CONFIG}[limits]\nhandshake_timeout_secs = 1\n");
    let mut server = Server::start(&cfg, &[]);
    // A request head that never completes: closed after the handshake timeout (408).
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(b"GET /connection/websocket HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out:?}");
    assert!(t.elapsed() < Duration::from_secs(3));
    // A connection that sends nothing at all is closed too.
    let mut idle = TcpStream::connect(server.addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(idle.read(&mut b).unwrap_or(0), 0, "idle socket closed");
    // Upgraded but never sends connect: closed with 3502 (stale) within the timeout + a tick.
    let mut s = upgraded(&server);
    assert_eq!(close_code(&mut s), Some(3502));
    assert!(server.alive());
}

#[test]
fn command_flood_gets_111_then_3013() {
    let cfg = format!("{BASE_CONFIG}[limits]\ncommand_rate_per_sec = 5\ncommand_burst = 5\nmax_refused_commands = 20\n");
    let server = Server::start(&cfg, &[]);
    let (mut c, _) = Client::connected(&server, "flood"); // connect took one token
    let batch: Vec<String> = (10..20)
        .map(|id| json!({"id": id, "ping": {}}).to_string())
        .collect();
    c.send_text(&batch.join("\n"));
    let mut limited = 0;
    for id in 10..20 {
        let r = c.reply(id);
        if r["error"]["code"] == 111 {
            assert_eq!(r["error"]["temporary"], true);
            limited += 1;
        }
    }
    assert!(
        (5..=6).contains(&limited),
        "burst of 5 (minus connect) then 111: {limited} limited"
    );
    // Persistent abuse: disconnected with 3013.
    let flood: Vec<String> = (100..130)
        .map(|id| json!({"id": id, "ping": {}}).to_string())
        .collect();
    c.send_text(&flood.join("\n"));
    let closed = c.closed(Duration::from_secs(5)).expect("flooder closed");
    assert_eq!(
        closed,
        Closed {
            code: 3013,
            reason: "too many requests".into()
        }
    );
    let (_, info) = api(server.addr, "info", &json!({}));
    assert!(
        info["result"]["nodes"][0]["counters"]["rate_limited"]
            .as_u64()
            .unwrap()
            >= 20,
        "{info}"
    );
}

#[test]
fn private_and_user_limited_channels() {
    let server = Server::start(BASE_CONFIG, &[]);
    let (mut alice, _) = Client::connected(&server, "alice");
    let r = alice.command("subscribe", json!({"channel": "$secret"}));
    assert_eq!(
        r["error"]["code"], 103,
        "private channel without a token: {r}"
    );
    let sub_token = |user: &str, channel: &str, secret: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &json!({"sub": user, "channel": channel}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let r = alice.command(
        "subscribe",
        json!({"channel": "$secret", "token": sub_token("alice", "$other", SECRET)}),
    );
    assert_eq!(r["error"]["code"], 103, "token for another channel: {r}");
    let r = alice.command(
        "subscribe",
        json!({"channel": "$secret", "token": sub_token("alice", "$secret", "forged")}),
    );
    assert_eq!(r["error"]["code"], 103, "forged token: {r}");
    let r = alice.command(
        "subscribe",
        json!({"channel": "$secret", "token": sub_token("alice", "$secret", SECRET)}),
    );
    assert!(r["subscribe"].is_object(), "valid subscription token: {r}");
    // User-limited channels accept only the users they name.
    let r = alice.command("subscribe", json!({"channel": "dm#alice,bob"}));
    assert!(r["subscribe"].is_object(), "{r}");
    let (mut eve, _) = Client::connected(&server, "eve");
    let r = eve.command("subscribe", json!({"channel": "dm#alice,bob"}));
    assert_eq!(r["error"]["code"], 103, "{r}");
    // Channel limits.
    let cfg = format!(
        "{BASE_CONFIG}[limits]\nmax_channels_per_connection = 2\nmax_channel_name_bytes = 16\n"
    );
    let limited = Server::start(&cfg, &[]);
    let (mut c, _) = Client::connected(&limited, "c");
    assert!(c.command("subscribe", json!({"channel": "a"}))["subscribe"].is_object());
    assert!(c.command("subscribe", json!({"channel": "b"}))["subscribe"].is_object());
    assert_eq!(
        c.command("subscribe", json!({"channel": "c"}))["error"]["code"],
        106
    );
    assert_eq!(
        c.command("subscribe", json!({"channel": "x".repeat(17)}))["error"]["code"],
        107
    );
    let (_, info) = api(limited.addr, "info", &json!({}));
    let counters = &info["result"]["nodes"][0]["counters"];
    assert_eq!(counters["channel_limit_refusals"], 1, "{info}");
    assert_eq!(counters["channel_name_refusals"], 1, "{info}");
}
