//! Redis Cluster: two nodes on a real 3-master cluster with one replica each (made by
//! `redis-cli --cluster create`): sharded pub/sub on every master, history, recovery, presence,
//! and a master killed while channels of the other masters keep flowing.

use crate::harness::*;
use crate::redis_tls::{process_free_port as free_port, Pki};
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One `redis-server --cluster-enabled yes` on free ports; killed (by its PID, through
/// `Child`) and reaped on drop.
struct ClusterNode {
    port: u16,
    /// Its TLS port (the one the cluster announces) in a TLS cluster.
    tls_port: Option<u16>,
    child: Option<Child>,
}

impl ClusterNode {
    fn cli(&self, args: &[&str]) -> Vec<String> {
        redis_cli(self.port, args)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Six nodes, three masters with a replica each.
struct Cluster {
    nodes: Vec<ClusterNode>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::start_with(None)
    }

    /// With `pki`: TLS between the nodes (`tls-cluster`, `tls-replication`) and on each node's
    /// TLS port, which the cluster then announces; the plain port stays for redis-cli.
    fn start_with(pki: Option<&Pki>) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let port = free_port();
            let bus = free_port();
            let tls_port = pki.map(|_| free_port());
            let mut cmd = Command::new("redis-server");
            if let (Some(pki), Some(tls_port)) = (pki, tls_port) {
                cmd.args(["--tls-port", &tls_port.to_string()])
                    .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                    .arg("--tls-cert-file")
                    .arg(pki.path("server.crt"))
                    .arg("--tls-key-file")
                    .arg(pki.path("server.key"))
                    .arg("--tls-ca-cert-file")
                    .arg(pki.path("ca.crt"))
                    .args(["--tls-auth-clients", "no"]);
            }
            let child = cmd
                .args(["--port", &port.to_string()])
                .args(["--cluster-port", &bus.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(dir.path().join(format!("nodes-{port}.conf")))
                .args(["--cluster-node-timeout", "1000"])
                // The setting the README asks for: keys in other slots stay served while one
                // shard fails over (history channels there need it).
                .args(["--cluster-require-full-coverage", "no"])
                .args(["--save", "", "--appendonly", "no"])
                // Replicas sync at once (a replica that never synced does not fail over).
                .args(["--repl-diskless-sync-delay", "0"])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server runs");
            nodes.push(ClusterNode {
                port,
                tls_port,
                child: Some(child),
            });
        }
        for n in &nodes {
            eventually(Duration::from_secs(5), "a cluster node answers", || {
                n.cli(&["PING"]).first().map(String::as_str) == Some("PONG")
            });
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.tls_port.unwrap_or(n.port)))
            .collect();
        let mut create = Command::new("redis-cli");
        if let Some(pki) = pki {
            create.arg("--tls").arg("--cacert").arg(pki.path("ca.crt"));
        }
        let ran = run_bounded(
            create.args(["--cluster", "create"]).args(&addrs).args([
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ]),
            Duration::from_secs(30),
        );
        assert!(
            ran.status.is_some_and(|s| s.success()),
            "cluster create: {} {}",
            ran.stdout,
            ran.stderr
        );
        let c = Cluster { nodes, _dir: dir };
        eventually(
            Duration::from_secs(15),
            "cluster_state:ok on every node",
            || {
                c.nodes.iter().all(|n| {
                    n.cli(&["CLUSTER", "INFO"])
                        .iter()
                        .any(|l| l.trim() == "cluster_state:ok")
                })
            },
        );
        eventually(Duration::from_secs(15), "every replica in sync", || {
            let replicas = c.nodes.iter().filter(|n| {
                n.cli(&["INFO", "replication"])
                    .iter()
                    .any(|l| l.trim() == "role:slave")
            });
            replicas
                .map(|n| {
                    n.cli(&["INFO", "replication"])
                        .iter()
                        .any(|l| l.trim() == "master_link_status:up")
                })
                .filter(|up| *up)
                .count()
                == 3
        });
        c
    }

    /// Live masters: port → slot ranges (from `CLUSTER NODES` of a live node).
    fn masters(&self) -> Vec<(u16, Vec<(u16, u16)>)> {
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let lines = n.cli(&["CLUSTER", "NODES"]);
            if lines.is_empty() {
                continue;
            }
            let mut out = Vec::new();
            for l in lines {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() < 8 || !f[2].contains("master") || f[2].contains("fail") {
                    continue;
                }
                let port: u16 = f[1]
                    .split('@')
                    .next()
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                let ranges: Vec<(u16, u16)> = f[8..]
                    .iter()
                    .filter(|r| !r.starts_with('['))
                    .filter_map(|r| match r.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => r.parse().ok().map(|s| (s, s)),
                    })
                    .collect();
                if !ranges.is_empty() {
                    out.push((port, ranges));
                }
            }
            out.sort();
            return out;
        }
        Vec::new()
    }

    fn node(&self, port: u16) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.port == port || n.tls_port == Some(port))
            .expect("a node")
    }

    fn node_mut(&mut self, port: u16) -> &mut ClusterNode {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port || n.tls_port == Some(port))
            .expect("a node")
    }
}

/// The slot of `key` (CRC16-XMODEM of its hash tag), as Redis Cluster computes it.
fn slot(key: &str) -> u16 {
    let k = key.as_bytes();
    let tag = match k.iter().position(|&b| b == b'{') {
        Some(o) => match k[o + 1..].iter().position(|&b| b == b'}') {
            Some(l) if l > 0 => &k[o + 1..o + 1 + l],
            _ => k,
        },
        None => k,
    };
    let mut crc: u16 = 0;
    for &b in tag {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// For each master, a channel `PREFIX-N` of namespace `ns` whose slot it holds.
fn channel_per_master(masters: &[(u16, Vec<(u16, u16)>)], ns: &str) -> Vec<(u16, String)> {
    masters
        .iter()
        .map(|(port, ranges)| {
            let name = (0..10_000)
                .map(|i| format!("{ns}:c{i}"))
                .find(|c| {
                    let s = slot(&format!("shardcast:ch:{{{c}}}"));
                    ranges.iter().any(|&(a, b)| (a..=b).contains(&s))
                })
                .expect("a channel on every master");
            (*port, name)
        })
        .collect()
}

fn shard_numsub(node: &ClusterNode, channel: &str) -> (u64, u64) {
    let name = format!("shardcast:ch:{{{channel}}}");
    let num = |cmd: &str| {
        node.cli(&["PUBSUB", cmd, &name])
            .get(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(u64::MAX)
    };
    (num("SHARDNUMSUB"), num("NUMSUB"))
}

fn config(seeds: &[u16]) -> String {
    config_with(seeds, "cluster_refresh_secs = 1\n")
}

/// A node on `seeds` with `options` as its `[redis_options]`.
fn config_with(seeds: &[u16], options: &str) -> String {
    let urls: Vec<String> = seeds
        .iter()
        .map(|p| format!("\"redis://127.0.0.1:{p}\""))
        .collect();
    format!(
        "redis_cluster = [{}]\n{BASE_CONFIG}{HISTORY_NAMESPACES}[redis_options]\n{options}",
        urls.join(", ")
    )
}

fn publish(server: &Server, channel: &str, data: Value) -> (u16, Value) {
    api(
        server.addr,
        "publish",
        &json!({"channel": channel, "data": data}),
    )
}

#[test]
fn two_nodes_share_a_redis_cluster_on_every_master() {
    let cluster = Cluster::start();
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "{masters:?}");
    let a = Server::start(&config(&[masters[0].0]), &[]);
    let b = Server::start(&config(&[masters[1].0, masters[2].0]), &[]);
    let channels = channel_per_master(&masters, "feed");
    let (mut on_a, _) = Client::connected(&a, "ua");
    let (mut on_b, _) = Client::connected(&b, "ub");
    for c in [&mut on_a, &mut on_b] {
        for (_, ch) in &channels {
            let r = c.command("subscribe", json!({"channel": ch}));
            assert!(r["subscribe"].is_object(), "{r}");
        }
    }
    // One sharded subscription per node per channel, on the master of its slot; none classic.
    for (port, ch) in &channels {
        eventually(
            Duration::from_secs(10),
            "both nodes SSUBSCRIBEd on the owning master",
            || shard_numsub(cluster.node(*port), ch) == (2, 0),
        );
    }
    // Cross-node delivery both ways, on every master's channel, with offsets.
    for (from, tag) in [(&a, "a"), (&b, "b")] {
        for (_, ch) in &channels {
            let (status, body) = publish(from, ch, json!({"from": tag}));
            assert_eq!(status, 200, "{body}");
            assert!(body["result"]["offset"].is_u64(), "{body}");
            for c in [&mut on_a, &mut on_b] {
                let p = c
                    .push(Duration::from_secs(5))
                    .expect("delivery on both nodes");
                assert_eq!(p["push"]["channel"], json!(ch), "{p}");
                assert_eq!(p["push"]["pub"]["data"]["from"], tag, "{p}");
            }
        }
    }
    // History through either node, and recovery of what a client missed.
    for (_, ch) in &channels {
        let (status, h) = api(b.addr, "history", &json!({"channel": ch, "limit": 10}));
        assert_eq!(status, 200, "{h}");
        assert_eq!(
            h["result"]["publications"].as_array().map(Vec::len),
            Some(2),
            "{h}"
        );
        let epoch = h["result"]["epoch"].as_str().unwrap().to_string();
        let (mut late, _) = Client::connected(&b, "late");
        let r = late.command(
            "subscribe",
            json!({"channel": ch, "recover": true, "offset": 1, "epoch": epoch}),
        );
        assert_eq!(r["subscribe"]["recovered"], true, "{r}");
        let pubs = r["subscribe"]["publications"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(pubs.len(), 1, "{r}");
        assert_eq!(pubs[0]["data"]["from"], "b");
    }
    // Presence across nodes (the lease zset and the presence hash live in different slots).
    let (mut pa, _) = Client::connected(&a, "pa");
    let (mut pb, _) = Client::connected(&b, "pb");
    for c in [&mut pa, &mut pb] {
        assert!(c.command("subscribe", json!({"channel": "chat:p"}))["subscribe"].is_object());
    }
    eventually(Duration::from_secs(5), "presence spans both nodes", || {
        api(a.addr, "presence_stats", &json!({"channel": "chat:p"})).1["result"]
            == json!({"num_clients": 2, "num_users": 2})
    });
    // The topology is refreshed every second (`cluster_refresh_secs = 1`), each time on the
    // one connection that answered first: node A's seed holds exactly one topology client.
    let refreshes = |s: &Server| {
        api(s.addr, "info", &json!({})).1["result"]["nodes"]
            .as_array()
            .and_then(|nodes| {
                nodes
                    .iter()
                    .find(|n| n["counters"]["redis_cluster_refreshes"].is_u64())
                    .map(|n| n["counters"]["redis_cluster_refreshes"].as_u64().unwrap())
            })
            .unwrap_or(0)
    };
    let before = refreshes(&a);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(refreshes(&a) >= before + 2, "periodic refreshes");
    let seed = cluster
        .nodes
        .iter()
        .find(|n| n.port == masters[0].0)
        .expect("a's seed");
    let topology_clients = seed
        .cli(&["CLIENT", "LIST"])
        .iter()
        .filter(|l| l.contains("-topology "))
        .count();
    assert_eq!(topology_clients, 1, "{:?}", seed.cli(&["CLIENT", "LIST"]));
    // /api/info names the mode and the masters.
    let (_, info) = api(a.addr, "info", &json!({}));
    let text = info.to_string();
    assert!(text.contains("\"mode\":\"cluster\""), "{info}");
    for (port, _) in &masters {
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{info}");
    }
}

#[test]
fn a_killed_master_is_followed_and_the_other_slots_never_stop() {
    let mut cluster = Cluster::start();
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "{masters:?}");
    let a = Server::start(&config(&[masters[0].0, masters[1].0]), &[]);
    let b = Server::start(&config(&[masters[1].0, masters[0].0]), &[]);
    // The victim is the third master, seed of neither node. On the two others: a plain and a
    // history channel each (history needs `cluster-require-full-coverage no`, see the README).
    let chat = channel_per_master(&masters, "chat");
    let feed = channel_per_master(&masters, "feed");
    let (victim_port, victim_ch) = chat[2].clone();
    let channels: Vec<(u16, String)> = chat.iter().chain(&feed[..2]).cloned().collect();
    let others: Vec<String> = channels
        .iter()
        .filter(|(p, _)| *p != victim_port)
        .map(|(_, c)| c.clone())
        .collect();
    let (mut on_a, _) = Client::connected(&a, "ua");
    for (_, ch) in &channels {
        let r = on_a.command("subscribe", json!({"channel": ch}));
        assert!(r["subscribe"].is_object(), "{r}");
    }
    for (port, ch) in &channels {
        eventually(Duration::from_secs(10), "a SSUBSCRIBEd", || {
            shard_numsub(cluster.node(*port), ch).0 == 1
        });
    }
    // b reaches every master: its publications arrive at a.
    for (_, ch) in &channels {
        eventually(
            Duration::from_secs(10),
            "b publishes to every master",
            || publish(&b, ch, json!({"warmup": true})).1["result"].is_object(),
        );
        let p = on_a.push(Duration::from_secs(5)).expect("warm-up delivery");
        assert_eq!(p["push"]["channel"], json!(ch), "{p}");
        while on_a.push(Duration::from_millis(100)).is_some() {}
    }
    cluster.node_mut(victim_port).kill();
    let killed = Instant::now();
    let mut n = 0u64;
    let mut errors_on_victim = 0u64;
    let mut next_other = vec![1u64; others.len()];
    let resumed = loop {
        assert!(
            killed.elapsed() < Duration::from_secs(25),
            "no delivery on the dead master's channel within 25 s; a's log:\n{}",
            a.stderr.lock().map(|s| s.clone()).unwrap_or_default()
        );
        n += 1;
        // The other masters' channels: every publication succeeds and arrives, in order.
        for (i, ch) in others.iter().enumerate() {
            let (status, body) = publish(&b, ch, json!({"n": next_other[i]}));
            assert_eq!(status, 200, "{body}");
            assert!(
                body["result"].is_object() && body.get("error").is_none(),
                "other slots undisturbed ({ch}, round {n}, {} ms after the kill): {body}; b's log:\n{}",
                killed.elapsed().as_millis(),
                b.stderr.lock().map(|s| s.clone()).unwrap_or_default()
            );
        }
        let started = Instant::now();
        let (status, body) = publish(&b, &victim_ch, json!({"v": n}));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "a publication to the failed slots must not hang"
        );
        assert_eq!(status, 200, "{body}");
        if body["error"]["code"] == 100 {
            errors_on_victim += 1;
        } else {
            assert_eq!(body, json!({"result": {}}), "{body}");
        }
        let mut seen_victim = false;
        let mut got = vec![false; others.len()];
        while let Some(p) = on_a.push(Duration::from_millis(50)) {
            let ch = p["push"]["channel"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if ch == victim_ch {
                seen_victim = true;
                continue;
            }
            let i = others
                .iter()
                .position(|o| *o == ch)
                .expect("a known channel");
            assert_eq!(
                p["push"]["pub"]["data"]["n"], next_other[i],
                "in order, no gap: {p}"
            );
            next_other[i] += 1;
            got[i] = true;
        }
        for (i, ch) in others.iter().enumerate() {
            if !got[i] {
                let p = on_a
                    .push(Duration::from_secs(3))
                    .unwrap_or_else(|| panic!("{ch}: a publication was not delivered"));
                assert_eq!(p["push"]["channel"], json!(ch), "{p}");
                assert_eq!(p["push"]["pub"]["data"]["n"], next_other[i], "{p}");
                next_other[i] += 1;
            }
        }
        if seen_victim {
            break killed.elapsed();
        }
    };
    println!(
        "cluster failover: first delivery on the dead master's channel {} ms after the kill \
         ({errors_on_victim} publications answered error 100 meanwhile; {} on the other \
         masters, all delivered in order)",
        resumed.as_millis(),
        next_other.iter().map(|n| n - 1).sum::<u64>()
    );
    assert!(
        errors_on_victim > 0,
        "the dead master's slots answered error 100 until the replica took over"
    );
    // Both nodes counted the failover they followed.
    for node in [&a, &b] {
        eventually(Duration::from_secs(10), "redis.failovers counted", || {
            let (_, info) = api(node.addr, "info", &json!({}));
            // (the first entry is the node's own)
            info["result"]["nodes"][0]["redis"]["failovers"].as_u64() >= Some(1)
        });
    }
    // The promoted replica holds the slot.
    let promoted = cluster.masters();
    assert_eq!(promoted.len(), 3, "{promoted:?}");
    assert!(!promoted.iter().any(|(p, _)| *p == victim_port));
}

/// Lost writes (Sentinel or Cluster failover: replication is asynchronous), here made by hand
/// on one Redis: the stream's top falls below what the node delivered under the same epoch.
/// The node tells its subscribers to recover and gives the channel a new epoch in Redis, so
/// the offsets published next are never taken for the ones delivered before.
#[test]
fn a_stream_behind_what_was_delivered_gets_a_new_epoch() {
    let redis = Redis::start(&[]);
    let cfg = format!(
        "redis = \"{}\"\n{BASE_CONFIG}{HISTORY_NAMESPACES}",
        redis.url()
    );
    let node = Server::start(&cfg, &[]);
    let (mut c, _) = Client::connected(&node, "alice");
    let r = c.command("subscribe", json!({"channel": "feed:lost"}));
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_string();
    for n in 1..=3 {
        let (_, body) = publish(&node, "feed:lost", json!({"n": n}));
        assert_eq!(body["result"]["offset"], n, "{body}");
        let p = c.push(Duration::from_secs(5)).expect("a publication");
        assert_eq!(p["push"]["pub"]["offset"], n, "{p}");
    }
    // The "promoted replica" never got publications 2 and 3.
    let meta = "shardcast:meta:{feed:lost}";
    assert_eq!(redis.cli(&["HSET", meta, "s", "1"]), ["0"]);
    let stream = "shardcast:stream:{feed:lost}";
    assert_eq!(redis.cli(&["XDEL", stream, "2-0", "3-0"]), ["2"]);
    assert_eq!(redis.cli(&["XSETID", stream, "1-0"]), ["OK"]);
    // The node's subscriber connection drops (as in a failover) and is repaired.
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    let p = c
        .push(Duration::from_secs(10))
        .expect("subscribers told to recover");
    assert_eq!(p["push"]["unsubscribe"]["code"], 2500, "{p}");
    eventually(Duration::from_secs(5), "a new epoch in Redis", || {
        redis
            .cli(&["HGET", meta, "e"])
            .first()
            .is_some_and(|e| *e != epoch)
    });
    let new_epoch = redis.cli(&["HGET", meta, "e"])[0].clone();
    // Offset 2 is taken again, under the new epoch only.
    let (_, body) = publish(&node, "feed:lost", json!({"n": "after"}));
    assert_eq!(body["result"]["offset"], 2, "{body}");
    assert_eq!(body["result"]["epoch"], json!(new_epoch), "{body}");
    // A client that saw offset 3 under the old epoch is told it did not recover.
    let (mut late, _) = Client::connected(&node, "bob");
    let r = late.command(
        "subscribe",
        json!({"channel": "feed:lost", "recover": true, "offset": 3, "epoch": epoch}),
    );
    assert_eq!(r["subscribe"]["was_recovering"], true, "{r}");
    assert!(r["subscribe"]["recovered"].is_null(), "{r}");
    assert_eq!(r["subscribe"]["epoch"], json!(new_epoch), "{r}");
}

/// A slot with subscribed channels moves to another master (`CLUSTER SETSLOT ... MIGRATING /
/// IMPORTING`, `MIGRATE`, `SETSLOT ... NODE`): the nodes follow the MOVED redirects, SSUBSCRIBE
/// on the new owner when the old one tells them (`sunsubscribe`), and the channel's history
/// goes on with the next offsets.
#[test]
fn a_migrated_slot_is_followed_and_resubscribed() {
    let cluster = Cluster::start();
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "{masters:?}");
    let a = Server::start(&config(&[masters[0].0]), &[]);
    let b = Server::start(&config(&[masters[1].0]), &[]);
    let (src, ch) = channel_per_master(&masters, "feed").remove(0);
    let dst = masters[1].0;
    let (mut on_a, _) = Client::connected(&a, "ua");
    let (mut on_b, _) = Client::connected(&b, "ub");
    for c in [&mut on_a, &mut on_b] {
        assert!(c.command("subscribe", json!({"channel": ch}))["subscribe"].is_object());
    }
    eventually(Duration::from_secs(10), "both nodes on the owner", || {
        shard_numsub(cluster.node(src), &ch) == (2, 0)
    });
    let (_, body) = publish(&a, &ch, json!({"n": 1}));
    assert_eq!(body["result"]["offset"], 1, "{body}");
    for c in [&mut on_a, &mut on_b] {
        let p = c.push(Duration::from_secs(5)).expect("before the move");
        assert_eq!(p["push"]["pub"]["offset"], 1, "{p}");
    }
    // A node of another deployment (its own prefix, so its own registry) that publishes on the
    // same channel name, without subscribers, and refreshes its topology only every minute:
    // after the move its slot table is stale, and only MOVED can tell it.
    let c = Server::start(
        &config_with(
            &[masters[2].0],
            "cluster_refresh_secs = 60\nprefix = \"other\"\n",
        ),
        &[],
    );
    eventually(Duration::from_secs(10), "c publishes", || {
        publish(&c, &ch, json!({"c": 1})).1["result"]["offset"] == 1
    });
    // Until every master's link is up, c reads the topology again within a second; after
    // that only every minute.
    let refreshes = || {
        api(c.addr, "info", &json!({})).1["result"]["nodes"][0]["counters"]
            ["redis_cluster_refreshes"]
            .as_u64()
    };
    eventually(Duration::from_secs(10), "c's topology settled", || {
        let before = refreshes();
        std::thread::sleep(Duration::from_millis(1200));
        refreshes() == before
    });
    // Move the channel's slot from `src` to `dst`, keys and all.
    let slot = slot(&format!("shardcast:ch:{{{ch}}}")).to_string();
    let id = |port: u16| cluster.node(port).cli(&["CLUSTER", "MYID"])[0].clone();
    let (src_id, dst_id) = (id(src), id(dst));
    let ok = |v: Vec<String>| assert_eq!(v, ["OK"]);
    ok(cluster
        .node(dst)
        .cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &src_id]));
    ok(cluster
        .node(src)
        .cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &dst_id]));
    let keys = cluster
        .node(src)
        .cli(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
    assert!(!keys.is_empty(), "the channel's stream and meta are there");
    let dst_port = dst.to_string();
    let mut migrate = vec!["MIGRATE", "127.0.0.1", &dst_port, "", "0", "5000", "KEYS"];
    migrate.extend(keys.iter().map(String::as_str));
    ok(cluster.node(src).cli(&migrate));
    for (port, _) in &masters {
        ok(cluster
            .node(*port)
            .cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &dst_id]));
    }
    // Publications go on at once (a stale slot table is corrected by MOVED).
    let (status, body) = publish(&b, &ch, json!({"n": 2}));
    assert_eq!(
        (status, &body["result"]["offset"]),
        (200, &json!(2)),
        "{body}"
    );
    let (status, body) = publish(&c, &ch, json!({"c": 2}));
    assert_eq!(
        (status, &body["result"]["offset"]),
        (200, &json!(2)),
        "{body}"
    );
    let (_, info) = api(c.addr, "info", &json!({}));
    let counters = &info["result"]["nodes"][0]["counters"];
    assert!(counters["redis_moved"].as_u64() >= Some(1), "{counters}");
    // Both nodes are subscribed on the new owner, none on the old one.
    eventually(
        Duration::from_secs(10),
        "both nodes SSUBSCRIBEd on the new owner",
        || {
            shard_numsub(cluster.node(dst), &ch) == (2, 0)
                && shard_numsub(cluster.node(src), &ch) == (0, 0)
        },
    );
    let (_, body) = publish(&a, &ch, json!({"n": 3}));
    assert_eq!(body["result"]["offset"], 3, "{body}");
    // Every subscriber has every publication in order: 2 live or repaired from the stream.
    for c in [&mut on_a, &mut on_b] {
        for n in 2..=3 {
            let p = c.push(Duration::from_secs(5)).expect("after the move");
            assert_eq!(p["push"]["pub"]["offset"], n, "{p}");
        }
    }
    let (_, info) = api(c.addr, "info", &json!({}));
    let counters = &info["result"]["nodes"][0]["counters"];
    println!(
        "slot migration: node c followed {} MOVED, {} ASK, {} topology refreshes",
        counters["redis_moved"], counters["redis_ask"], counters["redis_cluster_refreshes"]
    );
}

/// TLS to every cluster node: `rediss://` seeds, the cluster's announced TLS ports, a CA made
/// here; a node trusting another CA is refused and says why.
#[test]
fn tls_to_every_cluster_node_and_a_wrong_ca_refused() {
    let pki = Pki::make("shardcast cluster test CA");
    let other = Pki::make("another CA");
    let cluster = Cluster::start_with(Some(&pki));
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "{masters:?}");
    // The nodes are reached on their TLS ports (`tls-port` in CLUSTER SHARDS).
    let tls = |p: u16| cluster.node(p).tls_port.expect("a TLS port");
    let tls_config = |seed: u16, ca: &Pki| {
        format!(
            "redis_cluster = [\"rediss://127.0.0.1:{seed}\"]\n{BASE_CONFIG}{HISTORY_NAMESPACES}\
             [redis_options]\ncluster_refresh_secs = 1\ntls_ca_file = {:?}\n",
            ca.path("ca.crt").display().to_string()
        )
    };
    let a = Server::start(&tls_config(tls(masters[0].0), &pki), &[]);
    let b = Server::start(&tls_config(tls(masters[1].0), &pki), &[]);
    let channels = channel_per_master(&masters, "feed");
    let (mut on_a, _) = Client::connected(&a, "ua");
    for (_, ch) in &channels {
        assert!(on_a.command("subscribe", json!({"channel": ch}))["subscribe"].is_object());
    }
    for (port, ch) in &channels {
        eventually(Duration::from_secs(10), "a SSUBSCRIBEd over TLS", || {
            shard_numsub(cluster.node(*port), ch).0 == 1
        });
        let (_, body) = publish(&b, ch, json!({"tls": true}));
        assert_eq!(body["result"]["offset"], 1, "{body}");
        let p = on_a
            .push(Duration::from_secs(5))
            .expect("delivery over TLS");
        assert_eq!(p["push"]["channel"], json!(ch), "{p}");
    }
    // The wrong CA: no topology, every publication a temporary error, the reason logged.
    let wrong = Server::start(&tls_config(tls(masters[0].0), &other), &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !wrong.stderr.lock().unwrap().contains("UnknownIssuer") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = wrong.stderr.lock().unwrap().clone();
    assert!(
        log.contains("TLS handshake with 127.0.0.1") && log.contains("UnknownIssuer"),
        "{log}"
    );
    let (_, body) = publish(&wrong, &channels[0].1, json!(1));
    assert_eq!(body["error"]["code"], 100, "{body}");
    let (_, info) = api(wrong.addr, "info", &json!({}));
    assert_eq!(
        info["result"]["nodes"][0]["redis"]["state"], "down",
        "{info}"
    );
}
