//! A small blocking RESP2 client for looking into the bench's own redis-server: one command per
//! fresh connection (the benches ask a few times per run, never on a measured path), a parsed
//! reply, and the queries the benches read (`INFO commandstats`, `PUBSUB NUMSUB`).

use std::collections::BTreeMap;
use std::io::{self, BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// A parsed RESP2 reply.
#[derive(Debug)]
enum Resp {
    Simple,
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

fn resp_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut l = String::new();
    if r.read_line(&mut l)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "redis EOF"));
    }
    Ok(l.trim_end_matches(['\r', '\n']).to_string())
}

fn resp_read(r: &mut impl BufRead) -> io::Result<Resp> {
    let l = resp_line(r)?;
    let bad = || io::Error::other(format!("bad RESP line {l:?}"));
    let (t, rest) = l.split_at_checked(1).ok_or_else(bad)?;
    let num = || rest.parse::<i64>().map_err(|_| bad());
    Ok(match t {
        "+" => Resp::Simple,
        "-" => Resp::Error(rest.to_string()),
        ":" => Resp::Int(num()?),
        "$" => match num()? {
            n if n < 0 => Resp::Bulk(None),
            n => {
                let mut b = vec![0u8; n as usize + 2];
                r.read_exact(&mut b)?;
                b.truncate(n as usize);
                Resp::Bulk(Some(b))
            }
        },
        "*" => match num()? {
            n if n < 0 => Resp::Array(None),
            n => Resp::Array(Some(
                (0..n).map(|_| resp_read(r)).collect::<io::Result<_>>()?,
            )),
        },
        _ => return Err(bad()),
    })
}

/// One command on a fresh connection to the bench's redis-server.
fn redis_cmd(port: u16, args: &[&str]) -> Result<Resp, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("redis connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    (&s).write_all(req.as_bytes())
        .map_err(|e| format!("redis write: {e}"))?;
    let mut r = io::BufReader::new(&s);
    match resp_read(&mut r).map_err(|e| format!("redis read: {e}"))? {
        Resp::Error(e) => Err(format!("redis {args:?}: {e}")),
        v => Ok(v),
    }
}

/// `INFO commandstats` → command name → calls.
pub fn commandstats(port: u16) -> Result<BTreeMap<String, u64>, String> {
    let Resp::Bulk(Some(b)) = redis_cmd(port, &["INFO", "commandstats"])? else {
        return Err("INFO commandstats: unexpected reply".into());
    };
    Ok(String::from_utf8_lossy(&b)
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect())
}

/// `PUBSUB NUMSUB` of the channels' Redis names: nodes still subscribed.
pub fn pubsub_numsub(port: u16, channels: &[String]) -> Result<u64, String> {
    let names: Vec<String> = channels
        .iter()
        .map(|c| format!("shardcast:ch:{{{c}}}"))
        .collect();
    let mut args = vec!["PUBSUB", "NUMSUB"];
    args.extend(names.iter().map(String::as_str));
    let Resp::Array(Some(v)) = redis_cmd(port, &args)? else {
        return Err("PUBSUB NUMSUB: unexpected reply".into());
    };
    Ok(v.iter()
        .skip(1)
        .step_by(2)
        .map(|x| match x {
            Resp::Int(n) => *n as u64,
            _ => 0,
        })
        .sum())
}
