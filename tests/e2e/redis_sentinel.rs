//! Redis Sentinel: two nodes find the master through three real sentinels (1 master, 1 replica),
//! and follow a failover when the master is killed; the same over TLS (`rediss://` sentinels,
//! TLS replication), where a node that does not trust the CA is refused.

use crate::harness::*;
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MASTER: &str = "shardmaster";

/// A `redis-server --sentinel` on a free port, from a config file written here; killed (by its
/// PID, through `Child`) and reaped on drop.
struct Sentinel {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    fn start(master_port: u16) -> Sentinel {
        Sentinel::start_with(master_port, "")
    }

    /// A sentinel whose config file ends with `more` (e.g. its TLS settings).
    fn start_with(master_port: u16, more: &str) -> Sentinel {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {MASTER} 1000\n\
                 sentinel failover-timeout {MASTER} 3000\n{more}",
                dir.path().display()
            ),
        )
        .expect("write sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel runs");
        let s = Sentinel {
            port,
            child,
            _dir: dir,
        };
        eventually(Duration::from_secs(5), "the sentinel answers", || {
            s.cli(&["PING"]).first().map(String::as_str) == Some("PONG")
        });
        s
    }

    fn cli(&self, args: &[&str]) -> Vec<String> {
        redis_cli(self.port, args)
    }

    /// A numeric field of `SENTINEL master NAME` (flat key/value lines).
    fn master_field(&self, key: &str) -> u64 {
        let lines = self.cli(&["SENTINEL", "master", MASTER]);
        lines
            .iter()
            .position(|l| l == key)
            .and_then(|i| lines.get(i + 1))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// `SENTINEL FAILOVER`, until `sentinel` accepts it.
fn ask_failover(sentinel: &Sentinel) {
    eventually(
        Duration::from_secs(10),
        "a sentinel accepts the failover",
        || {
            sentinel
                .cli(&["SENTINEL", "FAILOVER", MASTER])
                .first()
                .map(String::as_str)
                == Some("OK")
        },
    );
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Nodes subscribed to `news` through Sentinel, delivery checked both ways.
struct Setup {
    master: Redis,
    replica: Redis,
    sentinels: Vec<Sentinel>,
    a: Server,
    b: Server,
    on_a: Client,
    on_b: Client,
}

fn numsub(r: &Redis) -> u64 {
    r.cli(&["PUBSUB", "NUMSUB", "shardcast:ch:{news}"])
        .get(1)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The node's `redis_failovers`, from `/api/info` and from `/metrics` (which must agree).
fn failovers(node: &Server) -> u64 {
    let (status, info) = api(node.addr, "info", &json!({}));
    assert_eq!(status, 200, "{info}");
    let entry = &info["result"]["nodes"][0];
    let from_info = entry["redis"]["failovers"]
        .as_u64()
        .unwrap_or_else(|| panic!("no redis.failovers in /api/info: {entry}"));
    let m: std::net::SocketAddr = entry["metrics_listen"]
        .as_str()
        .expect("metrics address in /api/info")
        .parse()
        .unwrap();
    let (status, body) = http(m, "GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200, "{body}");
    let from_metrics = body
        .lines()
        .find_map(|l| l.strip_prefix("shardcast_redis_failovers_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no shardcast_redis_failovers_total in /metrics"));
    assert_eq!(from_info, from_metrics, "/api/info and /metrics disagree");
    from_info
}

/// Server arguments for every Redis of these tests: a replica (the old master too, after a
/// failover) loads its master's data from the socket, writing no `dump.rdb` into the working
/// directory (the tests' own, the checkout).
const NO_RDB_FILE: [&str; 2] = ["--repl-diskless-load", "swapdb"];

fn setup() -> Setup {
    let master = Redis::start(&NO_RDB_FILE);
    let replica = Redis::start(&[
        NO_RDB_FILE[0],
        NO_RDB_FILE[1],
        "--replicaof",
        "127.0.0.1",
        &master.port.to_string(),
    ]);
    let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(master.port)).collect();
    // The sentinels know each other and the replica before the master dies.
    eventually(
        Duration::from_secs(10),
        "the sentinels see each other and the replica",
        || {
            sentinels.iter().all(|s| {
                s.master_field("num-other-sentinels") == 2 && s.master_field("num-slaves") == 1
            })
        },
    );
    let urls: Vec<String> = sentinels
        .iter()
        .map(|s| format!("\"redis://127.0.0.1:{}\"", s.port))
        .collect();
    let config = format!(
        "redis_sentinel = [{}]\nredis_sentinel_master = \"{MASTER}\"\n{BASE_CONFIG}",
        urls.join(", ")
    );
    let a = Server::start(&config, &[]);
    let b = Server::start(&config, &[]);
    let (mut on_a, _) = Client::connected(&a, "ua");
    let (mut on_b, _) = Client::connected(&b, "ub");
    for c in [&mut on_a, &mut on_b] {
        let r = c.command("subscribe", json!({"channel": "news"}));
        assert!(r["subscribe"].is_object(), "{r}");
    }
    // Both nodes subscribed on the master: cross-node delivery both ways.
    eventually(
        Duration::from_secs(10),
        "both nodes subscribed on the master",
        || numsub(&master) == 2,
    );
    for (from, data) in [(&a, "from a"), (&b, "from b")] {
        let (status, body) = api(
            from.addr,
            "publish",
            &json!({"channel": "news", "data": data}),
        );
        assert_eq!((status, &body), (200, &json!({"result": {}})));
        for c in [&mut on_a, &mut on_b] {
            let p = c
                .push(Duration::from_secs(5))
                .expect("delivery on both nodes");
            assert_eq!(p["push"]["pub"]["data"], data);
        }
    }
    Setup {
        master,
        replica,
        sentinels,
        a,
        b,
        on_a,
        on_b,
    }
}

#[test]
fn two_nodes_follow_a_sentinel_failover() {
    let Setup {
        mut master,
        replica,
        sentinels: _sentinels,
        a,
        b,
        mut on_a,
        mut on_b,
    } = setup();
    assert_eq!((failovers(&a), failovers(&b)), (0, 0), "no failover yet");
    // Kill the master; publish on b until a receives again through the promoted replica.
    master.kill();
    let killed = Instant::now();
    let mut n = 0u64;
    let resumed = loop {
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "no delivery within 20 s of the master's death"
        );
        n += 1;
        let _ = api(
            b.addr,
            "publish",
            &json!({"channel": "news", "data": {"n": n}}),
        );
        if let Some(p) = on_a.push(Duration::from_millis(100)) {
            assert!(p["push"]["pub"]["data"]["n"].is_u64(), "{p}");
            break killed.elapsed();
        }
    };
    println!(
        "sentinel failover: first cross-node delivery {} ms after the master was killed",
        resumed.as_millis()
    );
    assert_eq!(
        replica.cli(&["ROLE"]).first().map(String::as_str),
        Some("master")
    );
    // The other way too, and both nodes are subscribed on the new master.
    eventually(
        Duration::from_secs(10),
        "both nodes subscribed on the new master",
        || numsub(&replica) == 2,
    );
    while on_b.push(Duration::from_millis(200)).is_some() {}
    let (status, body) = api(
        a.addr,
        "publish",
        &json!({"channel": "news", "data": "after"}),
    );
    assert_eq!((status, &body), (200, &json!({"result": {}})));
    let p = on_b
        .push(Duration::from_secs(5))
        .expect("delivery from a after the failover");
    assert_eq!(p["push"]["pub"]["data"], "after");
    // Each node counted the move to the new master once.
    assert_eq!((failovers(&a), failovers(&b)), (1, 1), "one failover each");
}

/// A failover where the old master stays up (it turns replica): the nodes follow
/// `+switch-master` to the new master instead of staying on the old one.
#[test]
fn nodes_follow_switch_master_when_the_old_master_lives_on() {
    let Setup {
        master,
        replica,
        sentinels,
        a,
        b: _b,
        on_a: _on_a,
        mut on_b,
    } = setup();
    let started = Instant::now();
    ask_failover(&sentinels[0]);
    // Within 6 s: following +switch-master takes about 1 s; without it the nodes would only
    // leave the old master on a READONLY reply (the next lease refresh, about 10 s).
    eventually(
        Duration::from_secs(6),
        "both nodes subscribed on the new master",
        || numsub(&replica) == 2,
    );
    println!(
        "sentinel switch-master: both nodes on the new master {} ms after SENTINEL FAILOVER",
        started.elapsed().as_millis()
    );
    assert_eq!(
        replica.cli(&["ROLE"]).first().map(String::as_str),
        Some("master")
    );
    assert_eq!(numsub(&master), 0, "the nodes left the old master");
    assert_eq!(
        failovers(&a),
        1,
        "following +switch-master counts one failover"
    );
    let (status, body) = api(
        a.addr,
        "publish",
        &json!({"channel": "news", "data": "moved"}),
    );
    assert_eq!((status, &body), (200, &json!({"result": {}})));
    let p = on_b
        .push(Duration::from_secs(5))
        .expect("delivery after the switch");
    assert_eq!(p["push"]["pub"]["data"], "moved");
}

/// TLS settings shared by the master, the replica and the sentinels: the certificate of
/// 127.0.0.1 from `pki`, replication (and Sentinel's links to Redis and to each other) over TLS,
/// no client certificates asked.
fn tls_args(pki: &crate::redis_tls::Pki, tls_port: u16) -> Vec<String> {
    let p = |f: &str| pki.path(f).display().to_string();
    [
        "--tls-port".to_string(),
        tls_port.to_string(),
        "--tls-cert-file".into(),
        p("server.crt"),
        "--tls-key-file".into(),
        p("server.key"),
        "--tls-ca-cert-file".into(),
        p("ca.crt"),
        "--tls-auth-clients".into(),
        "no".into(),
        "--tls-replication".into(),
        "yes".into(),
        NO_RDB_FILE[0].into(),
        NO_RDB_FILE[1].into(),
    ]
    .to_vec()
}

/// Sentinel over TLS: the nodes reach the sentinels by `rediss://` URLs and the master they name
/// (its TLS port: the sentinels monitor it there) over TLS, deliver across nodes and follow a
/// failover; a node whose CA does not sign the sentinels' certificate is refused and says why.
/// Each Redis keeps a loopback plain port for the harness's readiness check and redis-cli.
#[test]
fn sentinels_and_redis_over_tls_deliver_and_refuse_a_wrong_ca() {
    use crate::redis_tls::{process_free_port, Pki};
    let pki = Pki::make("shardcast sentinel test CA");
    let other = Pki::make("another CA");
    let master_tls = process_free_port();
    let args = tls_args(&pki, master_tls);
    let master = Redis::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut args = tls_args(&pki, process_free_port());
    args.extend([
        "--replicaof".to_string(),
        "127.0.0.1".into(),
        master_tls.to_string(),
    ]);
    let replica = Redis::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    eventually(
        Duration::from_secs(10),
        "the replica in sync over TLS",
        || {
            replica
                .cli(&["INFO", "replication"])
                .iter()
                .any(|l| l.trim() == "master_link_status:up")
        },
    );
    let sentinel_tls: Vec<u16> = (0..3).map(|_| process_free_port()).collect();
    let sentinels: Vec<Sentinel> = sentinel_tls
        .iter()
        .map(|&port| {
            let p = |f: &str| pki.path(f).display().to_string();
            Sentinel::start_with(
                master_tls,
                &format!(
                    "tls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
                     tls-ca-cert-file {}\ntls-auth-clients no\ntls-replication yes\n",
                    p("server.crt"),
                    p("server.key"),
                    p("ca.crt")
                ),
            )
        })
        .collect();
    eventually(
        Duration::from_secs(10),
        "the sentinels see each other and the replica over TLS",
        || {
            sentinels.iter().all(|s| {
                s.master_field("num-other-sentinels") == 2 && s.master_field("num-slaves") == 1
            })
        },
    );
    let config = |ca: &str| {
        let urls: Vec<String> = sentinel_tls
            .iter()
            .map(|p| format!("\"rediss://127.0.0.1:{p}\""))
            .collect();
        format!(
            "redis_sentinel = [{}]\nredis_sentinel_master = \"{MASTER}\"\n{BASE_CONFIG}\
             [redis_options]\nbackoff_initial_ms = 50\nbackoff_max_ms = 500\ntls_ca_file = {ca:?}\n",
            urls.join(", ")
        )
    };
    let trusted = pki.path("ca.crt").display().to_string();
    let a = Server::start(&config(&trusted), &[]);
    let b = Server::start(&config(&trusted), &[]);
    let (mut on_a, _) = Client::connected(&a, "ua");
    let (mut on_b, _) = Client::connected(&b, "ub");
    for c in [&mut on_a, &mut on_b] {
        let r = c.command("subscribe", json!({"channel": "news"}));
        assert!(r["subscribe"].is_object(), "{r}");
    }
    eventually(
        Duration::from_secs(10),
        "both nodes subscribed on the master",
        || numsub(&master) == 2,
    );
    // Both connections of both nodes reached the master on its TLS port.
    let on_tls_port = |r: &Redis, port: u16| {
        r.cli(&["CLIENT", "LIST"])
            .iter()
            .filter(|l| l.contains("name=shardcast-") && l.contains(&format!(":{port} ")))
            .count()
    };
    assert_eq!(
        on_tls_port(&master, master_tls),
        4,
        "{:?}",
        master.cli(&["CLIENT", "LIST"])
    );
    for (from, data) in [(&a, "from a"), (&b, "from b")] {
        let (status, body) = api(
            from.addr,
            "publish",
            &json!({"channel": "news", "data": data}),
        );
        assert_eq!((status, &body), (200, &json!({"result": {}})));
        for c in [&mut on_a, &mut on_b] {
            let p = c.push(Duration::from_secs(5)).expect("delivery over TLS");
            assert_eq!(p["push"]["pub"]["data"], data);
        }
    }

    // A node that trusts another CA: the sentinels' certificates do not verify, it never finds
    // the master, says why, and its publishes answer a temporary error.
    let wrong = Server::start(&config(&other.path("ca.crt").display().to_string()), &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !wrong.stderr.lock().unwrap().contains("UnknownIssuer") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = wrong.stderr.lock().unwrap().clone();
    assert!(
        log.contains("cannot find the Redis master")
            && log.contains("invalid peer certificate: UnknownIssuer"),
        "{log}"
    );
    let (_, body) = api(
        wrong.addr,
        "publish",
        &json!({"channel": "news", "data": 1}),
    );
    assert_eq!(
        (
            body["error"]["code"].clone(),
            body["error"]["temporary"].clone()
        ),
        (json!(100), json!(true)),
        "{body}"
    );

    // A failover over TLS: the trusting nodes follow +switch-master (heard on a TLS
    // subscription to a sentinel) to the replica's TLS port.
    ask_failover(&sentinels[0]);
    eventually(
        Duration::from_secs(10),
        "both nodes subscribed on the new master",
        || numsub(&replica) == 2,
    );
    assert_eq!(
        replica.cli(&["ROLE"]).first().map(String::as_str),
        Some("master")
    );
    let (status, body) = api(
        a.addr,
        "publish",
        &json!({"channel": "news", "data": "moved"}),
    );
    assert_eq!((status, &body), (200, &json!({"result": {}})));
    let p = on_b
        .push(Duration::from_secs(5))
        .expect("delivery over TLS after the failover");
    assert_eq!(p["push"]["pub"]["data"], "moved");
    assert_eq!(failovers(&a), 1);
    // The refused node still never reached any Redis: nobody but a and b on the new master.
    assert_eq!(numsub(&replica), 2);
}
