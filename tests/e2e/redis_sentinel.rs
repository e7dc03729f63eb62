//! Redis Sentinel: two nodes find the master through three real sentinels (1 master, 1 replica),
//! and follow a failover when the master is killed.

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
                 sentinel failover-timeout {MASTER} 3000\n",
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
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.to_string())
            .collect()
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

fn setup() -> Setup {
    let master = Redis::start(&[]);
    let replica = Redis::start(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
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
    eventually(
        Duration::from_secs(10),
        "a sentinel accepts the failover",
        || {
            sentinels[0]
                .cli(&["SENTINEL", "FAILOVER", MASTER])
                .first()
                .map(String::as_str)
                == Some("OK")
        },
    );
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
