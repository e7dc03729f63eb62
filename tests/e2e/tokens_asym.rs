//! RS256 and ES256 connection and subscription tokens against the real binary, with the public
//! keys in PEM files (`token_rsa_public_key_file`, `token_ecdsa_public_key_file`): accepted,
//! refused with 3500 when signed by another key or by an HMAC secret the node does not have,
//! error 109 when expired; and a bad key file stops the node at start, naming key and file.
//! Keys are made in the test.

use crate::harness::*;
use crate::keys::{self, Pair};
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

/// A node whose only token key is `key_line` (`token_..._file = "<path>"`), no HMAC secret.
fn config(key_line: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
shards = 2
api_key = "test-api-key"
metrics_listen = "127.0.0.1:0"
{key_line}
[namespaces.chat]
allow_subscribe_for_client = true
"#
    )
}

fn write_key(dir: &tempfile::TempDir, name: &str, pem: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, pem).unwrap();
    path.display().to_string()
}

/// Connects with `token`; the reply (a connect result or an error).
fn connect(server: &Server, token: &str) -> (Client, Value) {
    let mut c = Client::connect_ws(server);
    let reply = c.command("connect", json!({ "token": token }));
    (c, reply)
}

/// Connects with `token`, which the node must refuse by closing with 3500 "invalid token".
fn assert_refused(server: &Server, token: &str, what: &str) {
    let mut c = Client::connect_ws(server);
    c.send_text(&json!({"id": 1, "connect": {"token": token}}).to_string());
    assert_eq!(
        c.closed(Duration::from_secs(5)),
        Some(Closed {
            code: 3500,
            reason: "invalid token".into()
        }),
        "{what}"
    );
}

/// Accepts tokens from `key` with `alg`, refuses others (3500) and expired ones (109), and
/// takes subscription tokens signed the same way.
fn check_node(server: &Server, key: &Pair, other: &Pair, alg: Algorithm) {
    let exp = now_secs() + 600;
    let claims = json!({"sub": "alice", "exp": exp, "info": {"name": "Alice"}});
    let (mut c, reply) = connect(server, &keys::sign(key, alg, None, &claims));
    assert!(reply["connect"]["client"].is_string(), "{alg:?}: {reply}");
    assert_eq!(reply["connect"]["expires"], true, "{reply}");
    // A private channel with a subscription token signed the same way.
    let sub = json!({"sub": "alice", "channel": "chat:$room", "exp": exp});
    let r = c.command(
        "subscribe",
        json!({"channel": "chat:$room", "token": keys::sign(key, alg, None, &sub)}),
    );
    assert_eq!(r["subscribe"]["expires"], true, "{alg:?}: {r}");
    let r = c.command(
        "subscribe",
        json!({"channel": "chat:$other", "token": keys::sign(other, alg, None, &json!({"sub": "alice", "channel": "chat:$other"}))}),
    );
    assert_eq!(
        r["error"]["code"], 103,
        "another key's subscription token: {r}"
    );

    let forged = keys::sign(other, alg, None, &claims);
    assert_refused(server, &forged, &format!("{alg:?} from another key"));
    // No HMAC secret on this node: an HS256 token signed with the public key's PEM (which
    // anybody may know) is refused, not checked with the public key as a secret.
    let confused = shardcast::protocol::token::sign(&key.public_pem, &claims);
    assert_refused(
        server,
        &confused,
        &format!("HS256 with the {alg:?} public key"),
    );
    let expired = keys::sign(
        key,
        alg,
        None,
        &json!({"sub": "alice", "exp": now_secs() - 5}),
    );
    let (_, reply) = connect(server, &expired);
    assert_eq!(reply["error"]["code"], 109, "{alg:?}: {reply}");
}

#[test]
fn rs256_tokens_with_an_rsa_public_key_file() {
    let (key, other) = (keys::rsa(2048), keys::rsa(2048));
    let dir = tempfile::tempdir().unwrap();
    let path = write_key(&dir, "rsa.pem", &key.public_pem);
    let server = Server::start(
        &config(&format!("token_rsa_public_key_file = {path:?}")),
        &[],
    );
    check_node(&server, &key, &other, Algorithm::RS256);
    // A PKCS#1 file works the same.
    let path = write_key(&dir, "rsa1.pem", &key.pkcs1_pem);
    let server = Server::start(
        &config(&format!("token_rsa_public_key_file = {path:?}")),
        &[],
    );
    let t = keys::sign(&key, Algorithm::PS512, None, &json!({"sub": "bob"}));
    let (_, reply) = connect(&server, &t);
    assert!(reply["connect"]["client"].is_string(), "{reply}");
}

#[test]
fn es256_tokens_with_an_ecdsa_public_key_file() {
    let (key, other) = (keys::p256(), keys::p256());
    let dir = tempfile::tempdir().unwrap();
    let path = write_key(&dir, "ec.pem", &key.public_pem);
    let server = Server::start(
        &config(&format!("token_ecdsa_public_key_file = {path:?}")),
        &[],
    );
    check_node(&server, &key, &other, Algorithm::ES256);
}

#[test]
fn a_bad_key_file_stops_the_node_at_start_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let ec = keys::p256();
    let cases = [
        (
            format!(
                "token_rsa_public_key_file = {:?}",
                write_key(&dir, "ec-as-rsa.pem", &ec.public_pem)
            ),
            "token_rsa_public_key_file",
            "ec-as-rsa.pem",
        ),
        (
            format!(
                "token_ecdsa_public_key_file = {:?}",
                dir.path().join("missing.pem").display().to_string()
            ),
            "token_ecdsa_public_key_file",
            "missing.pem",
        ),
    ];
    for (line, key, file) in cases {
        let cfg = dir.path().join("shardcast.toml");
        std::fs::write(&cfg, config(&line)).unwrap();
        let ran = run_bounded(
            Command::new(env!("CARGO_BIN_EXE_shardcast"))
                .arg("--config")
                .arg(&cfg),
            Duration::from_secs(20),
        );
        let status = ran.status.expect("the node exits by itself");
        assert!(!status.success(), "{line}");
        assert!(!ran.stdout.contains("READY"), "{}", ran.stdout);
        assert!(
            ran.stderr.contains(key) && ran.stderr.contains(file),
            "{line}: {}",
            ran.stderr
        );
    }
}
