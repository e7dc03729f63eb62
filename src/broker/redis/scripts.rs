//! The Lua scripts the multiplexer runs in Redis, by name, each with the one function that lays
//! out its KEYS and ARGV.
//!
//! Scripts are loaded on connect (SCRIPT LOAD) and run by SHA1 (EVALSHA); after NOSCRIPT
//! (Redis restarted or flushed its cache) they are loaded again and the command is repeated
//! (see `replies`). Their texts are a protocol between nodes sharing one Redis: what they write
//! (stream entries, meta hash, pub/sub payloads) must stay as it is. Pure encoding, run on the
//! multiplexer's thread; the callers allocate nothing here but the numbers' digits on the stack.

use super::keys::Keys;
use super::resp::Command;

// The end of both presence scripts: the entries of KEYS[1] whose owner is in `live`; the others
// are removed.
macro_rules! presence_filter {
    () => {
        r#"local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local v = all[i + 1]
  local sep = string.find(v, '|', 1, true)
  if sep and live[string.sub(v, 1, sep - 1)] then
    table.insert(out, string.sub(v, sep + 1))
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return out
"#
    };
}

// Presence entries of a channel whose owning node still holds its lease; entries of dead nodes
// are removed on the way.
// KEYS[1] presence hash, KEYS[2] lease zset. ARGV[1] now (ms).
// Returns the live entries' client info JSON documents.
const PRESENCE: &str = concat!(
    r#"
local live = {}
for _, uid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[1], '+inf')) do live[uid] = true end
"#,
    presence_filter!()
);

// Redis Cluster: the presence hash and the lease zset live in different slots, so the live
// node uids come as arguments (read from the lease zset just before, see `registry`).
// KEYS[1] presence hash. ARGV: the uids of the nodes holding their lease now.
const PRESENCE_LIVE: &str = concat!(
    r#"
local live = {}
for i = 1, #ARGV do live[ARGV[i]] = true end
"#,
    presence_filter!()
);

// A new epoch for a channel whose stream fell behind what nodes delivered (writes lost in a
// failover), unless another node gave it one already. Run rarely, with EVAL (not loaded).
// KEYS[1] meta hash. ARGV[1] the epoch the stream still has, ARGV[2] the offset delivered,
// ARGV[3] the new epoch. Returns the channel's epoch after the call.
pub const NEW_EPOCH: &str = r#"
local e = redis.call('HGET', KEYS[1], 'e')
local top = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
if e == ARGV[1] and top < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'e', ARGV[3])
  return ARGV[3]
end
return e or ''
"#;

// The registry entries of every live node, dropping lapsed leases.
// KEYS[1] lease zset. ARGV[1] now (ms), ARGV[2] node key prefix.
// Returns the live nodes' registry entries (JSON documents).
const NODES: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
local out = {}
for _, uid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local v = redis.call('GET', ARGV[2] .. uid)
  if v then table.insert(out, v) end
end
return out
"#;

// Publish into a channel: next offset, XADD, TTLs and PUBLISH in one step, so the live path and
// the history never disagree. The payload completes the open publication object exactly as
// `crate::protocol::publication` does (its tests pin the bytes).
// KEYS[1] stream, KEYS[2] meta hash, KEYS[3] idempotency key.
// ARGV[1] pub/sub channel, ARGV[2] open publication object, ARGV[3] push prefix, ARGV[4] history
// size (0 = no history), ARGV[5] history TTL secs, ARGV[6] meta TTL secs, ARGV[7] a new epoch
// (used if the channel has none), ARGV[8] idempotency window secs (0 = no key).
// Returns {repeated 0|1, "OFFSET:EPOCH" or ""}.
const PUBLISH: &str = r#"
if ARGV[8] ~= '0' then
  local prev = redis.call('GET', KEYS[3])
  if prev then return {1, prev} end
end
local result = ''
if ARGV[4] == '0' then
  redis.call('PUBLISH', ARGV[1], ARGV[3] .. ARGV[2] .. '}}}')
else
  local epoch = redis.call('HGET', KEYS[2], 'e')
  if not epoch then
    epoch = ARGV[7]
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[2], 'e', epoch)
  end
  local offset = redis.call('HINCRBY', KEYS[2], 's', 1)
  local pub = ARGV[2] .. ',"offset":' .. offset .. '}'
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], offset .. '-0', 'd', pub)
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  redis.call('PUBLISH', ARGV[1], offset .. ':' .. epoch .. ':' .. ARGV[3] .. pub .. '}}')
  result = offset .. ':' .. epoch
end
if ARGV[8] ~= '0' then redis.call('SET', KEYS[3], result, 'EX', ARGV[8]) end
return {0, result}
"#;

// A channel's position and a page of its stream, within the retained window (the last `size`
// offsets: `MAXLEN ~` may keep a few more, which never count).
// KEYS[1] stream, KEYS[2] meta hash.
// ARGV[1] since offset (-1 = none), ARGV[2] limit (0 = none, -1 = all), ARGV[3] reverse '1',
// ARGV[4] history size, ARGV[5] a new epoch (used if the channel has none), ARGV[6] meta TTL.
// Returns {epoch, top, id, pub, id, pub, ...}.
const READ: &str = r#"
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[5]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch)
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
local top = tonumber(redis.call('HGET', KEYS[2], 's') or '0')
local out = {epoch, top}
local limit = tonumber(ARGV[2])
local size = tonumber(ARGV[4])
if limit == 0 or top == 0 then return out end
if limit < 0 or limit > size then limit = size end
local floor = top - size + 1
if floor < 1 then floor = 1 end
local since = tonumber(ARGV[1])
local entries
if ARGV[3] == '1' then
  local hi = top
  if since >= 0 then hi = since - 1 end
  if hi < floor then return out end
  entries = redis.call('XREVRANGE', KEYS[1], hi .. '-0', floor .. '-0', 'COUNT', limit)
else
  local lo = floor
  if since >= 0 and since + 1 > lo then lo = since + 1 end
  if lo > top then return out end
  entries = redis.call('XRANGE', KEYS[1], lo .. '-0', '+', 'COUNT', limit)
end
for _, e in ipairs(entries) do
  table.insert(out, e[1])
  table.insert(out, e[2][2])
end
return out
"#;

/// A Lua script, run by its SHA1 (EVALSHA) once loaded.
pub struct Script {
    pub text: std::borrow::Cow<'static, str>,
    sha: String,
}

impl Script {
    fn new(text: impl Into<std::borrow::Cow<'static, str>>) -> Script {
        let text = text.into();
        use sha1::Digest;
        let digest = sha1::Sha1::digest(text.as_bytes());
        let sha = digest.iter().map(|b| format!("{b:02x}")).collect();
        Script { text, sha }
    }

    /// Starts `EVALSHA sha nkeys`, leaving room for `keys + args` arguments.
    fn call<'a>(&self, out: &'a mut Vec<u8>, keys: u64, args: usize) -> Command<'a> {
        let mut cmd = Command::new(out, 3 + keys as usize + args);
        cmd.arg(b"EVALSHA").arg(self.sha.as_bytes()).int(keys);
        cmd
    }
}

/// A publish through the publish script (history channels, idempotency keys).
pub struct Publish<'a> {
    pub channel: &'a str,
    /// The open publication object (`publication::open`).
    pub open: &'a [u8],
    /// The push prefix (`publication::push_prefix`).
    pub push_prefix: &'a [u8],
    pub history_size: u32,
    pub history_ttl_secs: u32,
    pub meta_ttl_secs: u32,
    pub new_epoch: &'a str,
    /// 0 = no idempotency key.
    pub idempotency_window_secs: u32,
    pub idempotency_key: &'a str,
}

/// A read through the read script.
pub struct Read<'a> {
    pub channel: &'a str,
    /// Entries after (before, with `reverse`) this offset.
    pub since: Option<u64>,
    /// 0 = position only, negative = all retained.
    pub limit: i64,
    pub reverse: bool,
    pub history_size: u32,
    pub new_epoch: &'a str,
    pub meta_ttl_secs: u32,
}

/// Every script of the multiplexer.
pub struct Scripts {
    pub publish: Script,
    pub read: Script,
    pub presence: Script,
    pub nodes: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts::with_mode(false)
    }
}

impl Scripts {
    /// Under Redis Cluster the publish script publishes with SPUBLISH (sharded pub/sub: its
    /// channel `PREFIX:ch:{C}` is in the same slot as the stream and meta it writes) and the
    /// presence script takes the live node uids as arguments (`PRESENCE_LIVE`).
    pub fn with_mode(cluster: bool) -> Scripts {
        if !cluster {
            return Scripts {
                publish: Script::new(PUBLISH),
                read: Script::new(READ),
                presence: Script::new(PRESENCE),
                nodes: Script::new(NODES),
            };
        }
        Scripts {
            publish: Script::new(PUBLISH.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")),
            read: Script::new(READ),
            presence: Script::new(PRESENCE_LIVE),
            nodes: Script::new(NODES),
        }
    }
}

impl Scripts {
    /// Every script, for SCRIPT LOAD.
    pub fn all(&self) -> [&Script; 4] {
        [&self.publish, &self.read, &self.presence, &self.nodes]
    }

    /// Appends the publish script's call.
    pub fn encode_publish(&self, out: &mut Vec<u8>, keys: &Keys, p: &Publish<'_>) {
        let mut cmd = self.publish.call(out, 3, 8);
        cmd.parts(&keys.stream(p.channel).0)
            .parts(&keys.meta(p.channel).0)
            .parts(&keys.idempotency(p.channel, p.idempotency_key).0)
            .parts(&keys.channel(p.channel).0)
            .arg(p.open)
            .arg(p.push_prefix)
            .int(p.history_size as u64)
            .int(p.history_ttl_secs as u64)
            .int(p.meta_ttl_secs as u64)
            .arg(p.new_epoch.as_bytes())
            .int(p.idempotency_window_secs as u64);
    }

    /// Appends the read script's call.
    pub fn encode_read(&self, out: &mut Vec<u8>, keys: &Keys, r: &Read<'_>) {
        let mut cmd = self.read.call(out, 2, 6);
        cmd.parts(&keys.stream(r.channel).0)
            .parts(&keys.meta(r.channel).0);
        match r.since {
            Some(s) => cmd.int(s),
            None => cmd.arg(b"-1"),
        };
        match u64::try_from(r.limit) {
            Ok(l) => cmd.int(l),
            Err(_) => cmd.arg(b"-1"),
        };
        cmd.arg(if r.reverse { b"1" } else { b"0" })
            .int(r.history_size as u64)
            .arg(r.new_epoch.as_bytes())
            .int(r.meta_ttl_secs as u64);
    }

    /// Appends the presence script's call for `channel`.
    pub fn encode_presence(&self, out: &mut Vec<u8>, keys: &Keys, channel: &str, now_ms: u64) {
        self.presence
            .call(out, 2, 1)
            .parts(&keys.presence(channel).0)
            .arg(keys.nodes())
            .int(now_ms);
    }

    /// Redis Cluster: appends the presence script's call for `channel` with the live uids.
    pub fn encode_presence_live(
        &self,
        out: &mut Vec<u8>,
        keys: &Keys,
        channel: &str,
        uids: &[bytes::Bytes],
    ) {
        let mut cmd = self.presence.call(out, 1, uids.len());
        cmd.parts(&keys.presence(channel).0);
        for uid in uids {
            cmd.arg(uid);
        }
    }

    /// Appends the new-epoch script's call (EVAL: it runs rarely, so it is never loaded).
    pub fn encode_new_epoch(
        out: &mut Vec<u8>,
        keys: &Keys,
        channel: &str,
        old: &str,
        delivered: u64,
        new: &str,
    ) {
        Command::new(out, 7)
            .arg(b"EVAL")
            .arg(NEW_EPOCH.as_bytes())
            .arg(b"1")
            .parts(&keys.meta(channel).0)
            .arg(old.as_bytes())
            .int(delivered)
            .arg(new.as_bytes());
    }

    /// Appends the nodes script's call.
    pub fn encode_nodes(&self, out: &mut Vec<u8>, keys: &Keys, now_ms: u64) {
        self.nodes
            .call(out, 1, 2)
            .arg(keys.nodes())
            .int(now_ms)
            .arg(keys.node_prefix());
    }
}

#[cfg(test)]
mod tests {
    use super::super::resp::encode;
    use super::*;

    #[test]
    fn calls_lay_out_keys_and_args_as_before() {
        let (s, k) = (Scripts::default(), Keys::new("p"));
        let mut ours = Vec::new();
        s.encode_publish(
            &mut ours,
            &k,
            &Publish {
                channel: "h:1",
                open: b"{\"data\":1",
                push_prefix: b"PP",
                history_size: 10,
                history_ttl_secs: 300,
                meta_ttl_secs: 3600,
                new_epoch: "ep",
                idempotency_window_secs: 0,
                idempotency_key: "",
            },
        );
        let mut old = Vec::new();
        let sha = s.publish.sha.as_bytes();
        encode(
            &mut old,
            &[
                b"EVALSHA",
                sha,
                b"3",
                b"p:stream:{h:1}",
                b"p:meta:{h:1}",
                b"p:idem:{h:1}:",
                b"p:ch:{h:1}",
                b"{\"data\":1",
                b"PP",
                b"10",
                b"300",
                b"3600",
                b"ep",
                b"0",
            ],
        );
        assert_eq!(ours, old);

        let mut ours = Vec::new();
        let read = |since, limit, reverse| Read {
            channel: "h:1",
            since,
            limit,
            reverse,
            history_size: 10,
            new_epoch: "ep",
            meta_ttl_secs: 60,
        };
        s.encode_read(&mut ours, &k, &read(None, -1, true));
        s.encode_read(&mut ours, &k, &read(Some(4), 0, false));
        let mut old = Vec::new();
        let sha = s.read.sha.as_bytes();
        let (st, me): (&[u8], &[u8]) = (b"p:stream:{h:1}", b"p:meta:{h:1}");
        encode(
            &mut old,
            &[
                b"EVALSHA", sha, b"2", st, me, b"-1", b"-1", b"1", b"10", b"ep", b"60",
            ],
        );
        encode(
            &mut old,
            &[
                b"EVALSHA", sha, b"2", st, me, b"4", b"0", b"0", b"10", b"ep", b"60",
            ],
        );
        assert_eq!(ours, old);

        let mut ours = Vec::new();
        s.encode_presence(&mut ours, &k, "c", 7);
        s.encode_nodes(&mut ours, &k, 8);
        let mut old = Vec::new();
        let (pr, no) = (s.presence.sha.as_bytes(), s.nodes.sha.as_bytes());
        encode(
            &mut old,
            &[b"EVALSHA", pr, b"2", b"p:presence:{c}", b"p:nodes", b"7"],
        );
        encode(
            &mut old,
            &[b"EVALSHA", no, b"1", b"p:nodes", b"8", b"p:node:"],
        );
        assert_eq!(ours, old);
    }

    #[test]
    fn cluster_scripts_publish_sharded_and_take_live_uids() {
        let s = Scripts::with_mode(true);
        assert_eq!(s.publish.text.matches("redis.call('SPUBLISH'").count(), 2);
        assert!(!s.publish.text.contains("redis.call('PUBLISH'"));
        assert!(!s.presence.text.contains("KEYS[2]"));
        let plain = Scripts::default();
        assert_eq!(s.read.sha, plain.read.sha);
        assert_eq!(s.nodes.sha, plain.nodes.sha);
        let mut ours = Vec::new();
        s.encode_presence_live(&mut ours, &Keys::new("p"), "c", &["u1".into(), "u2".into()]);
        let mut want = Vec::new();
        let sha = s.presence.sha.as_bytes();
        encode(
            &mut want,
            &[b"EVALSHA", sha, b"1", b"p:presence:{c}", b"u1", b"u2"],
        );
        assert_eq!(ours, want);
    }

    #[test]
    fn scripts_are_the_ones_other_nodes_run() {
        // The texts (so their SHA1s) of this data format: a change here is a change of what
        // nodes sharing one Redis write, and needs a migration.
        let s = Scripts::default();
        let shas: Vec<&str> = s.all().iter().map(|x| x.sha.as_str()).collect();
        assert_eq!(
            shas,
            [
                "80ebe1cc6fae5643ebead2ee3cd3e4980b194221",
                "cea1837978e054677beea9f668d812b003cfddea",
                "a1d5c58109f04651ab7a4cb64eba4dc76e6a8ca8",
                "93d852525ed574e3d28fd09547b1477f0d44b32a",
            ]
        );
    }
}
