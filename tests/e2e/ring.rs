//! The io_uring data path, end to end: one thread per shard, both shards serving through their
//! rings, partial writes to a client that reads slowly, and receive-buffer exhaustion (ENOBUFS)
//! recovered without losing a byte.

use crate::harness::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};
use tungstenite::Message;

/// Thread names of a process (`comm`, cut by the kernel at 15 bytes), counted.
fn threads(pid: u32) -> BTreeMap<String, usize> {
    let mut names = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
        let comm = std::fs::read_to_string(task.unwrap().path().join("comm")).unwrap_or_default();
        *names.entry(comm.trim().to_string()).or_insert(0) += 1;
    }
    names
}

/// A node counter from `/api/info` (summed over shards, published once a second).
fn counter(server: &Server, name: &str) -> u64 {
    let (_, info) = api(server.addr, "info", &json!({}));
    info["result"]["nodes"][0]["counters"][name]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn two_shards_serve_through_their_rings_on_one_thread_each() {
    let mut server = Server::start(BASE_CONFIG, &[]);
    let pid = server.child.id();
    // Two connections on each shard, each subscribed; a publication reaches all four.
    let mut clients = clients_on_every_shard(&server, 2, 2);
    for c in &mut clients {
        let r = c.command("subscribe", json!({ "channel": "both" }));
        assert!(r.get("subscribe").is_some(), "{r}");
    }
    for n in 0..3 {
        let (status, _) = api(
            server.addr,
            "publish",
            &json!({"channel": "both", "data": {"n": n}}),
        );
        assert_eq!(status, 200);
    }
    for c in &mut clients {
        for n in 0..3 {
            let p = c.push(Duration::from_secs(5)).expect("publication");
            assert_eq!(p["push"]["pub"]["data"]["n"], n, "{p}");
        }
    }
    // Ends through the ring from both sides: a server-side disconnect (close frame, then the
    // half-close) and a client that just goes away.
    let (mut leaver, reply) = Client::connected(&server, "leaver");
    let client_id = reply["connect"]["client"].as_str().unwrap().to_string();
    let (status, _) = api(
        server.addr,
        "disconnect",
        &json!({"user": "leaver", "client": client_id}),
    );
    assert_eq!(status, 200);
    let closed = leaver.closed(Duration::from_secs(5)).expect("close frame");
    assert_eq!(closed.code, 3503, "force no reconnect");
    drop(leaver);
    drop(clients.pop());
    let (mut gone, _) = Client::connected(&server, "gone");
    gone.ws.close(None).ok();
    drop(gone);
    eventually(Duration::from_secs(5), "connections ended", || {
        counter(&server, "ended_peer_closed") + counter(&server, "ended_peer_close_frame") >= 2
            && counter(&server, "ended_command") == 1
    });
    // One thread per shard, the broker, the metrics listener and the main thread (which only
    // waits for signals): no relay thread, no glommio blocking pool, no io_uring worker.
    let names = threads(pid);
    let expected: BTreeMap<String, usize> = [
        ("shardcast", 1),
        ("shardcast-shard", 2),
        ("shardcast-broke", 1),
        ("shardcast-metri", 1),
    ]
    .into_iter()
    .map(|(n, c)| (n.to_string(), c))
    .collect();
    assert_eq!(names, expected, "threads of the node");
    assert!(server.alive());
}

/// A raw WebSocket client whose socket has a tiny receive buffer.
fn slow_client(server: &Server) -> tungstenite::WebSocket<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (ws, _) = tungstenite::client::client(server.ws_url().as_str(), stream).expect("upgrade");
    ws
}

/// Reads lines of text frames until `want` of them are pushes; returns their `n` values.
fn read_pushes(ws: &mut tungstenite::WebSocket<TcpStream>, want: usize, pace: bool) -> Vec<u64> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < want && Instant::now() < deadline {
        match ws.read().expect("read") {
            Message::Text(t) => {
                for line in t.as_str().split('\n').filter(|l| !l.is_empty()) {
                    let v: Value = serde_json::from_str(line).unwrap();
                    if let Some(n) = v["push"]["pub"]["data"]["n"].as_u64() {
                        seen.push(n);
                    }
                }
            }
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
        if pace && seen.len() % 20 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    seen
}

#[test]
fn a_slow_reader_gets_everything_in_order_and_others_are_not_held_up() {
    let config = format!("{BASE_CONFIG}\n[limits]\nmax_outbox_bytes = 16777216\n")
        .replace("shards = 2", "shards = 1");
    let server = Server::start(&config, &[]);
    let connect = |ws: &mut tungstenite::WebSocket<TcpStream>, user: &str| {
        let t = token(user, Some(3600), SECRET);
        let cmds = format!(
            "{}\n{}",
            json!({"id": 1, "connect": {"token": t}}),
            json!({"id": 2, "subscribe": {"channel": "bulk"}})
        );
        ws.send(Message::text(cmds)).unwrap();
        let mut got = String::new();
        while !got.contains("\"id\":2") {
            if let Message::Text(t) = ws.read().unwrap() {
                got.push_str(t.as_str());
            }
        }
    };
    let mut slow = slow_client(&server);
    connect(&mut slow, "slow");
    let mut fast = Client::connect_ws(&server);
    let t = token("fast", Some(3600), SECRET);
    fast.command("connect", json!({ "token": t }));
    fast.command("subscribe", json!({ "channel": "bulk" }));

    // 700 publications of ~8 KiB: 5.6 MB, more than a loopback socket buffers on both ends
    // (its send buffer grows to 4 MiB at most: net.ipv4.tcp_wmem), so the server's
    // sends to it stop part-way while the slow client does not read.
    const N: u64 = 700;
    let filler = "x".repeat(8000);
    let publisher = {
        let addr = server.addr;
        std::thread::spawn(move || {
            for n in 0..N {
                let (status, _) = api(
                    addr,
                    "publish",
                    &json!({"channel": "bulk", "data": {"n": n, "f": filler}}),
                );
                assert_eq!(status, 200, "publish {n}");
            }
        })
    };
    // The fast client gets everything while the slow one has read nothing yet.
    let mut fast_seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while (fast_seen.len() as u64) < N && Instant::now() < deadline {
        if let Some(p) = fast.push(Duration::from_secs(1)) {
            fast_seen.push(p["push"]["pub"]["data"]["n"].as_u64().unwrap());
        }
    }
    publisher.join().unwrap();
    assert_eq!(fast_seen, (0..N).collect::<Vec<_>>(), "the fast client");
    // Now the slow client reads, slowly: every publication, in order, the connection intact.
    let slow_seen = read_pushes(&mut slow, N as usize, true);
    assert_eq!(slow_seen, (0..N).collect::<Vec<_>>(), "the slow client");
    assert_eq!(counter(&server, "slow_disconnects"), 0);
    assert!(
        counter(&server, "partial_writes") > 0,
        "the sends to the slow client stopped part-way"
    );
}

#[test]
fn exhausted_receive_buffers_lose_nothing_and_are_counted() {
    // Two 256-byte receive buffers for the whole shard, and 40 connections writing at once.
    let config = format!(
        "{BASE_CONFIG}\n[limits]\ncommand_rate_per_sec = 100000\ncommand_burst = 100000\n[ring]\nrecv_buffers = 2\nrecv_buffer_bytes = 256\n"
    )
    .replace("shards = 2", "shards = 1");
    let server = Server::start(&config, &[]);
    const CONNS: usize = 40;
    const CMDS: u32 = 30;
    let mut socks = Vec::new();
    for i in 0..CONNS {
        let (c, _) = Client::connected(&server, &format!("u{i}"));
        socks.push(c);
    }
    // Each connection sends its commands as separate frames in one burst (written before any
    // reply is read), so completions pile up far beyond two buffers.
    let mut bursts = Vec::new();
    for (i, c) in socks.iter().enumerate() {
        let mut burst = Vec::new();
        for id in 0..CMDS {
            let cmd = json!({"id": 100 + id, "subscribe": {"channel": format!("c{i}-{id}")}});
            burst.extend(client_frame(cmd.to_string().as_bytes()));
        }
        bursts.push((c.ws.get_ref().try_clone().unwrap(), burst));
    }
    let writers: Vec<_> = bursts
        .into_iter()
        .map(|(mut s, burst)| std::thread::spawn(move || s.write_all(&burst).unwrap()))
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    // Every command is answered, in order, on every connection.
    for c in &mut socks {
        for id in 0..CMDS {
            let r = c.reply(100 + id);
            assert!(r.get("subscribe").is_some(), "{r}");
        }
    }
    eventually(Duration::from_secs(5), "exhaustion counted", || {
        counter(&server, "recv_buffer_exhausted") > 0
    });
    let (_, info) = api(server.addr, "info", &json!({}));
    assert_eq!(
        info["result"]["nodes"][0]["gauges"]["recv_buffer_ring_bytes"], 512,
        "the ring's memory is reported"
    );
}

/// One masked client text frame (RFC 6455), for writing raw bursts.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [7u8, 1, 2, 3];
    let mut f = vec![0x81];
    if payload.len() < 126 {
        f.push(0x80 | payload.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend((payload.len() as u16).to_be_bytes());
    }
    f.extend(mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}
