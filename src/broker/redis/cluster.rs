//! Redis Cluster, the pure part: key slots (CRC16-XMODEM of the hash tag or key, mod 16384),
//! the `CLUSTER SHARDS` reply, the `MOVED`/`ASK` redirects, and the key a command is routed by.
//! The connections are in [`super::link`]; the multiplexer routes each command by slot
//! ([`super::mux::Mux::route`]).

use redis_protocol::resp2::types::BytesFrame;

/// Slots in a Redis Cluster.
pub const SLOTS: usize = 16384;

/// CRC16-XMODEM (polynomial 0x1021, initial value 0), the checksum Redis Cluster hashes keys
/// with.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The part of `key` that is hashed: between the first `{` and the first `}` after it when that
/// is not empty, else the whole key.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The slot of `key`.
pub fn slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) % SLOTS as u16
}

/// One shard of the cluster as `CLUSTER SHARDS` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Slot ranges, inclusive.
    pub slots: Vec<(u16, u16)>,
    /// The master's endpoint and port (the TLS port when `tls`).
    pub master: (String, u16),
    /// Replicas' endpoints.
    pub replicas: Vec<(String, u16)>,
}

fn text(frame: &BytesFrame) -> Option<String> {
    match frame {
        BytesFrame::BulkString(b) | BytesFrame::SimpleString(b) => {
            Some(String::from_utf8_lossy(b).into_owned())
        }
        _ => None,
    }
}

fn int(frame: &BytesFrame) -> Option<i64> {
    match frame {
        BytesFrame::Integer(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

/// A RESP2 flat map (`[key, value, key, value ...]`): the value of `name`.
fn field<'a>(items: &'a [BytesFrame], name: &str) -> Option<&'a BytesFrame> {
    items
        .chunks(2)
        .find(|kv| text(&kv[0]).as_deref() == Some(name))
        .and_then(|kv| kv.get(1))
}

/// Parses a `CLUSTER SHARDS` reply (Redis 7). `tls`: the nodes are reached on their
/// `tls-port`. Shards without slots or without a live master are left out.
pub fn parse_shards(frame: &BytesFrame, tls: bool) -> Result<Vec<Shard>, String> {
    let BytesFrame::Array(shards) = frame else {
        return Err(match frame {
            BytesFrame::Error(e) => format!("CLUSTER SHARDS refused: {e}"),
            other => format!("CLUSTER SHARDS: unexpected reply {other:?}"),
        });
    };
    let mut out = Vec::new();
    for shard in shards {
        let BytesFrame::Array(shard) = shard else {
            return Err("CLUSTER SHARDS: a shard is not a map".into());
        };
        let mut slots = Vec::new();
        if let Some(BytesFrame::Array(list)) = field(shard, "slots") {
            for pair in list.chunks(2) {
                let (Some(a), Some(b)) = (int(&pair[0]), pair.get(1).and_then(int)) else {
                    return Err("CLUSTER SHARDS: bad slot range".into());
                };
                if !(0..SLOTS as i64).contains(&a) || !(a..SLOTS as i64).contains(&b) {
                    return Err(format!("CLUSTER SHARDS: slot range {a}-{b} out of bounds"));
                }
                slots.push((a as u16, b as u16));
            }
        }
        let mut master = None;
        let mut replicas = Vec::new();
        if let Some(BytesFrame::Array(nodes)) = field(shard, "nodes") {
            for node in nodes {
                let BytesFrame::Array(node) = node else {
                    continue;
                };
                let get = |k: &str| field(node, k).and_then(text);
                let port = field(node, if tls { "tls-port" } else { "port" }).and_then(int);
                let host = get("endpoint")
                    .filter(|e| !e.is_empty() && e != "?")
                    .or_else(|| get("ip"));
                let (Some(host), Some(port)) = (host, port) else {
                    continue;
                };
                let Ok(port) = u16::try_from(port) else {
                    continue;
                };
                let online = get("health").is_none_or(|h| h == "online");
                match get("role").as_deref() {
                    Some("master") if online => master = Some((host, port)),
                    Some("replica") => replicas.push((host, port)),
                    _ => {}
                }
            }
        }
        if let (false, Some(master)) = (slots.is_empty(), master) {
            out.push(Shard {
                slots,
                master,
                replicas,
            });
        }
    }
    if out.is_empty() {
        return Err("CLUSTER SHARDS: no shard with slots and a live master".into());
    }
    Ok(out)
}

/// A cluster redirect: `MOVED <slot> <host>:<port>` (the slot lives there now) or
/// `ASK <slot> <host>:<port>` (ask there once, after `ASKING`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub ask: bool,
    pub slot: u16,
    pub host: String,
    pub port: u16,
}

impl Redirect {
    /// The redirect in an error reply's text, if it is one.
    pub fn parse(error: &str) -> Option<Redirect> {
        let mut parts = error.split_ascii_whitespace();
        let ask = match parts.next()? {
            "MOVED" => false,
            "ASK" => true,
            _ => return None,
        };
        let slot: u16 = parts.next()?.parse().ok()?;
        if slot as usize >= SLOTS {
            return None;
        }
        let (host, port) = parts.next()?.rsplit_once(':')?;
        let port = port.parse().ok()?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Some(Redirect {
            ask,
            slot,
            host: host.to_string(),
            port,
        })
    }
}

/// One RESP bulk argument of an encoded command at `at`: its bytes and where the next begins.
fn bulk_at(cmd: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = cmd.get(at..)?;
    if rest.first() != Some(&b'$') {
        return None;
    }
    let nl = rest.iter().position(|&b| b == b'\n')?;
    let len: usize = std::str::from_utf8(&rest[1..nl.checked_sub(1)?])
        .ok()?
        .parse()
        .ok()?;
    let start = at + nl + 1;
    let end = start.checked_add(len)?;
    Some((cmd.get(start..end)?, end + 2))
}

/// The key an encoded command (a RESP array of bulk strings) is routed by: the first key of
/// `EVALSHA`/`EVAL` (after the script and the key count), else its first argument. `None` for
/// a command without a key (`SCRIPT LOAD`, an `EVALSHA` with no keys).
pub fn route_key(cmd: &[u8]) -> Option<&[u8]> {
    let nl = cmd.iter().position(|&b| b == b'\n')?;
    let (name, next) = bulk_at(cmd, nl + 1)?;
    if name.eq_ignore_ascii_case(b"SCRIPT") {
        return None;
    }
    let (first, next) = bulk_at(cmd, next)?;
    if name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL") {
        let (count, next) = bulk_at(cmd, next)?;
        if count == b"0" {
            return None;
        }
        return Some(bulk_at(cmd, next)?.0);
    }
    Some(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn slots_follow_the_cluster_spec() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        // The hash tag: the first non-empty {...}.
        assert_eq!(hash_tag(b"{user1000}.following"), b"user1000");
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hash_tag(b"no tag"), b"no tag");
        assert_eq!(hash_tag(b"open{only"), b"open{only");
        assert_eq!(
            slot(b"sc:ch:{chat:1}"),
            slot(b"sc:stream:{chat:1}"),
            "a channel's names share its slot"
        );
        assert_eq!(slot(b"sc:ch:{chat:1}"), slot(b"chat:1"));
    }

    #[test]
    fn redirects_parse() {
        assert_eq!(
            Redirect::parse("MOVED 3999 127.0.0.1:6381"),
            Some(Redirect {
                ask: false,
                slot: 3999,
                host: "127.0.0.1".into(),
                port: 6381
            })
        );
        assert_eq!(
            Redirect::parse("ASK 3999 ::1:6381").map(|r| (r.ask, r.host, r.port)),
            Some((true, "::1".into(), 6381))
        );
        assert_eq!(Redirect::parse("MOVED 16384 h:1"), None);
        assert_eq!(Redirect::parse("MOVED x h:1"), None);
        assert_eq!(Redirect::parse("MOVED 1 h"), None);
        assert_eq!(Redirect::parse("ERR MOVED 1 h:1"), None);
        assert_eq!(Redirect::parse("CROSSSLOT Keys"), None);
    }

    fn bulk(s: &str) -> BytesFrame {
        BytesFrame::BulkString(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn node(id: &str, port: i64, role: &str, health: &str) -> BytesFrame {
        BytesFrame::Array(vec![
            bulk("id"),
            bulk(id),
            bulk("port"),
            BytesFrame::Integer(port),
            bulk("tls-port"),
            BytesFrame::Integer(port + 1000),
            bulk("ip"),
            bulk("127.0.0.1"),
            bulk("endpoint"),
            bulk("127.0.0.1"),
            bulk("role"),
            bulk(role),
            bulk("replication-offset"),
            BytesFrame::Integer(5),
            bulk("health"),
            bulk(health),
        ])
    }

    #[test]
    fn cluster_shards_parse() {
        let shard = |slots: Vec<i64>, nodes: Vec<BytesFrame>| {
            BytesFrame::Array(vec![
                bulk("slots"),
                BytesFrame::Array(slots.into_iter().map(BytesFrame::Integer).collect()),
                bulk("nodes"),
                BytesFrame::Array(nodes),
            ])
        };
        let reply = BytesFrame::Array(vec![
            shard(
                vec![0, 5460, 10923, 10923],
                vec![
                    node("a", 7000, "master", "online"),
                    node("d", 7003, "replica", "online"),
                ],
            ),
            // A failed master and its promoted replica.
            shard(
                vec![5461, 10922],
                vec![
                    node("b", 7001, "master", "failed"),
                    node("e", 7004, "master", "online"),
                ],
            ),
            // No slots: left out.
            shard(vec![], vec![node("f", 7005, "master", "online")]),
        ]);
        let shards = parse_shards(&reply, false).unwrap();
        assert_eq!(shards.len(), 2);
        assert_eq!(shards[0].slots, [(0, 5460), (10923, 10923)]);
        assert_eq!(shards[0].master, ("127.0.0.1".into(), 7000));
        assert_eq!(shards[0].replicas, [("127.0.0.1".into(), 7003)]);
        assert_eq!(shards[1].master, ("127.0.0.1".into(), 7004));
        let tls = parse_shards(&reply, true).unwrap();
        assert_eq!(tls[0].master.1, 8000, "the TLS port under rediss://");
        assert!(
            parse_shards(&BytesFrame::Error("ERR unknown command".into()), false)
                .unwrap_err()
                .contains("unknown command")
        );
        let bad = BytesFrame::Array(vec![shard(
            vec![0, 20000],
            vec![node("a", 1, "master", "online")],
        )]);
        assert!(parse_shards(&bad, false).is_err());
    }

    #[test]
    fn commands_route_by_their_key() {
        let enc = |args: &[&[u8]]| {
            let mut v = Vec::new();
            super::super::resp::encode(&mut v, args);
            v
        };
        assert_eq!(
            route_key(&enc(&[b"PUBLISH", b"sc:ch:{a}", b"x"])),
            Some(&b"sc:ch:{a}"[..])
        );
        assert_eq!(
            route_key(&enc(&[
                b"EVALSHA",
                b"abc",
                b"2",
                b"sc:stream:{a}",
                b"k2",
                b"v"
            ])),
            Some(&b"sc:stream:{a}"[..])
        );
        assert_eq!(route_key(&enc(&[b"EVALSHA", b"abc", b"0", b"v"])), None);
        assert_eq!(route_key(&enc(&[b"SCRIPT", b"LOAD", b"return 1"])), None);
        assert_eq!(
            route_key(&enc(&[b"CLUSTER", b"SHARDS"])),
            Some(&b"SHARDS"[..])
        );
        assert_eq!(route_key(b"garbage"), None);
    }
}
