//! Many nodes on a Redis reached over TLS (`rediss://`): a real `redis-server` with its TLS
//! port on, a CA and certificates made in the test.

use crate::harness::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA,
/// written as PEM files into a temporary directory (alive as long as this).
pub(crate) struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub(crate) fn make(ca_name: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, ca_name);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |name: &str, file: &str| {
            let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.path().join(format!("{file}.crt")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{file}.key")), key.serialize_pem()).unwrap();
        };
        std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
        leaf("127.0.0.1", "server");
        leaf("shardcast-node", "client");
        Pki { dir }
    }

    pub(crate) fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A redis-server whose TLS port checks clients against `pki`'s CA when `auth_clients`; its
/// plain port (loopback, for the harness's readiness check and redis-cli) stays on too.
fn tls_redis(pki: &Pki, auth_clients: bool) -> (Redis, u16) {
    let tls_port = process_free_port();
    let args = [
        "--tls-port".to_string(),
        tls_port.to_string(),
        "--tls-cert-file".into(),
        s(&pki.path("server.crt")),
        "--tls-key-file".into(),
        s(&pki.path("server.key")),
        "--tls-ca-cert-file".into(),
        s(&pki.path("ca.crt")),
        "--tls-auth-clients".into(),
        if auth_clients { "yes" } else { "no" }.into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (Redis::start(&args), tls_port)
}

pub(crate) fn process_free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn node_config(tls_port: u16, tls_options: &str) -> String {
    format!(
        "redis = \"rediss://127.0.0.1:{tls_port}\"\n{BASE_CONFIG}{HISTORY_NAMESPACES}\
         [redis_options]\nbackoff_initial_ms = 50\nbackoff_max_ms = 500\n{tls_options}"
    )
}

fn redis_state(node: &Server) -> serde_json::Value {
    let (_, info) = api(node.addr, "info", &json!({}));
    info["result"]["nodes"][0]["redis"]["state"].clone()
}

/// Clients connected to Redis over TLS: `CLIENT LIST` names the node's connections, and they
/// arrived on the TLS port (`laddr`).
fn tls_clients(redis: &Redis, tls_port: u16) -> usize {
    redis
        .cli(&["CLIENT", "LIST"])
        .iter()
        .filter(|l| l.contains("name=shardcast-") && l.contains(&format!(":{tls_port} ")))
        .count()
}

#[test]
fn two_nodes_on_a_tls_redis_deliver_across_nodes_and_keep_history() {
    let pki = Pki::make("shardcast redis test CA");
    let (redis, tls_port) = tls_redis(&pki, false);
    let cfg = node_config(
        tls_port,
        &format!("tls_ca_file = {:?}\n", s(&pki.path("ca.crt"))),
    );
    let a = Server::start(&cfg, &[]);
    let b = Server::start(&cfg, &[]);
    eventually(Duration::from_secs(10), "both links up", || {
        redis_state(&a) == "connected" && redis_state(&b) == "connected"
    });
    // Both connections of both nodes (command and subscriber) are on the TLS port.
    assert_eq!(
        tls_clients(&redis, tls_port),
        4,
        "{:?}",
        redis.cli(&["CLIENT", "LIST"])
    );
    let (mut on_a, _) = Client::connected(&a, "alice");
    let (mut on_b, _) = Client::connected(&b, "bob");
    for c in [&mut on_a, &mut on_b] {
        assert!(c.command("subscribe", json!({"channel": "feed:x"}))["subscribe"].is_object());
    }
    for i in 0..10 {
        let node = if i % 2 == 0 { a.addr } else { b.addr };
        let (status, body) = api(
            node,
            "publish",
            &json!({"channel": "feed:x", "data": {"n": i}}),
        );
        assert_eq!(
            (status, &body),
            (
                200,
                &json!({"result": {"offset": i + 1, "epoch": body["result"]["epoch"]}})
            ),
            "{body}"
        );
    }
    for c in [&mut on_a, &mut on_b] {
        for i in 0..10 {
            let p = c.push(Duration::from_secs(5)).expect("publication");
            assert_eq!(p["push"]["pub"]["data"]["n"], i, "{p}");
        }
    }
    let (_, body) = api(
        b.addr,
        "history",
        &json!({"channel": "feed:x", "limit": 100}),
    );
    let pubs = body["result"]["publications"].as_array().expect("history");
    let ns: Vec<i64> = pubs
        .iter()
        .map(|p| p["data"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, (0..10).collect::<Vec<_>>(), "{body}");
    // A dropped TLS connection comes back over TLS.
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    eventually(
        Duration::from_secs(10),
        "subscriber connections back over TLS",
        || tls_clients(&redis, tls_port) == 4 && redis_state(&a) == "connected",
    );
    eventually(Duration::from_secs(10), "delivery resumes", || {
        api(
            b.addr,
            "publish",
            &json!({"channel": "feed:x", "data": {"n": 99}}),
        );
        on_a.push(Duration::from_millis(300))
            .is_some_and(|p| p["push"]["pub"]["data"]["n"] == 99)
    });
}

#[test]
fn a_client_certificate_required_by_redis_is_presented() {
    let pki = Pki::make("shardcast redis test CA");
    let (_redis, tls_port) = tls_redis(&pki, true);
    let with_cert = node_config(
        tls_port,
        &format!(
            "tls_ca_file = {:?}\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
            s(&pki.path("ca.crt")),
            s(&pki.path("client.crt")),
            s(&pki.path("client.key"))
        ),
    );
    let a = Server::start(&with_cert, &[]);
    eventually(
        Duration::from_secs(10),
        "link up with a client certificate",
        || redis_state(&a) == "connected",
    );
    let (mut c, _) = Client::connected(&a, "x");
    assert!(c.command("subscribe", json!({"channel": "news"}))["subscribe"].is_object());
    assert_eq!(
        api(a.addr, "publish", &json!({"channel": "news", "data": 1})).1,
        json!({"result": {}})
    );
    assert_eq!(
        c.push(Duration::from_secs(5)).unwrap()["push"]["pub"]["data"],
        1
    );
    // Without one, Redis refuses the node: its link stays down.
    let without = node_config(
        tls_port,
        &format!("tls_ca_file = {:?}\n", s(&pki.path("ca.crt"))),
    );
    let b = Server::start(&without, &[]);
    eventually(Duration::from_secs(10), "the refusal logged", || {
        b.stderr.lock().unwrap().contains("CertificateRequired")
    });
    assert_eq!(redis_state(&b), "down", "{}", b.stderr.lock().unwrap());
    let (_, body) = api(b.addr, "publish", &json!({"channel": "news", "data": 2}));
    assert_eq!(
        (
            body["error"]["code"].clone(),
            body["error"]["temporary"].clone()
        ),
        (json!(100), json!(true)),
        "{body}"
    );
    assert_eq!(redis_state(&a), "connected");
}

#[test]
fn a_redis_certificate_from_another_ca_is_refused() {
    let pki = Pki::make("shardcast redis test CA");
    let other = Pki::make("another CA");
    let (redis, tls_port) = tls_redis(&pki, false);
    let good = Server::start(
        &node_config(
            tls_port,
            &format!("tls_ca_file = {:?}\n", s(&pki.path("ca.crt"))),
        ),
        &[],
    );
    let wrong = Server::start(
        &node_config(
            tls_port,
            &format!("tls_ca_file = {:?}\n", s(&other.path("ca.crt"))),
        ),
        &[],
    );
    eventually(
        Duration::from_secs(10),
        "the trusting node's link up",
        || redis_state(&good) == "connected",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !wrong.stderr.lock().unwrap().contains("UnknownIssuer")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = wrong.stderr.lock().unwrap().clone();
    assert!(
        log.contains("TLS handshake with 127.0.0.1")
            && log.contains("invalid peer certificate: UnknownIssuer"),
        "{log}"
    );
    assert_eq!(redis_state(&wrong), "down");
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
    let (mut c, _) = Client::connected(&wrong, "x");
    let r = c.command("publish", json!({"channel": "chat:y", "data": 1}));
    assert_eq!(r["error"]["code"], 100, "{r}");
    // The trusting node is not affected, and the refused one never reached Redis.
    let (mut sub, _) = Client::connected(&good, "y");
    assert!(sub.command("subscribe", json!({"channel": "news"}))["subscribe"].is_object());
    assert_eq!(
        api(good.addr, "publish", &json!({"channel": "news", "data": 7})).1,
        json!({"result": {}})
    );
    assert_eq!(
        sub.push(Duration::from_secs(5)).unwrap()["push"]["pub"]["data"],
        7
    );
    assert_eq!(tls_clients(&redis, tls_port), 2);
    assert_eq!(redis_state(&wrong), "down");
}

#[test]
fn a_missing_tls_file_stops_the_node_at_start_naming_the_key() {
    let cfg = node_config(6399, "tls_ca_file = \"/nonexistent/ca.pem\"\n");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shardcast.toml");
    std::fs::write(&path, cfg).unwrap();
    let ran = run_bounded(
        std::process::Command::new(env!("CARGO_BIN_EXE_shardcast"))
            .arg("--config")
            .arg(&path),
        Duration::from_secs(20),
    );
    assert!(ran.status.is_some_and(|s| !s.success()), "{}", ran.stderr);
    assert!(
        ran.stderr.contains("redis_options.tls_ca_file")
            && ran.stderr.contains("/nonexistent/ca.pem"),
        "{}",
        ran.stderr
    );
}
