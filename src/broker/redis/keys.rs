//! Redis names: every key and pub/sub channel the node reads or writes, in one place.
//!
//! - `PREFIX:ch:{CHANNEL}` pub/sub channel of an app channel
//! - `PREFIX:stream:{CHANNEL}` history stream
//! - `PREFIX:meta:{CHANNEL}` hash: epoch `e`, top offset `s`
//! - `PREFIX:idem:{CHANNEL}:KEY` result of an idempotent publish
//! - `PREFIX:presence:{CHANNEL}` presence hash
//! - `PREFIX:user:{USER}` a user's personal channel (control messages)
//! - `PREFIX:node:UID` a node's lease, and `PREFIX:nodes` the zset of leases by expiry; the
//!   same name is the node's pub/sub channel for emulation requests (pub/sub channels and keys
//!   are separate namespaces in Redis)
//!
//! The `{...}` hash tag keeps a channel's keys in one cluster slot. These shapes are a data
//! format: nodes of different versions share one Redis, so they must never change (a unit test
//! pins them). The prefixes are built once; a key is handed out as its parts ([`Key`]) and
//! written straight into the command being encoded, so the publish path formats nothing.
//! Pure, run on the multiplexer's thread.

/// A key as consecutive parts (prefix, name, closing part, suffix).
#[derive(Debug, Clone, Copy)]
pub struct Key<'a>(pub [&'a [u8]; 4]);

impl Key<'_> {
    /// Appends the whole key (for commands that carry many names, and for tests).
    pub fn write(&self, out: &mut Vec<u8>) {
        for part in self.0 {
            out.extend_from_slice(part);
        }
    }
}

/// The node's key prefixes, built once from `redis_options.prefix`.
#[derive(Debug)]
pub struct Keys {
    channel: Box<[u8]>,
    stream: Box<[u8]>,
    meta: Box<[u8]>,
    idempotency: Box<[u8]>,
    presence: Box<[u8]>,
    user: Box<[u8]>,
    node: Box<[u8]>,
    nodes: Box<[u8]>,
    survey: Box<[u8]>,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys::with_mode(prefix, false)
    }

    /// Under Redis Cluster the node registry (`PREFIX:{nodes}:node:UID` and `PREFIX:{nodes}`,
    /// read together by the nodes script) lives in one fixed slot; every other name is as
    /// [`Keys::new`] makes it.
    pub fn with_mode(prefix: &str, cluster: bool) -> Keys {
        let p = |kind: &str| format!("{prefix}:{kind}").into_bytes().into_boxed_slice();
        if cluster {
            return Keys {
                node: p("{nodes}:node:"),
                nodes: p("{nodes}"),
                ..Keys::with_mode(prefix, false)
            };
        }
        Keys {
            channel: p("ch:{"),
            stream: p("stream:{"),
            meta: p("meta:{"),
            idempotency: p("idem:{"),
            presence: p("presence:{"),
            user: p("user:{"),
            node: p("node:"),
            nodes: p("nodes"),
            survey: p("survey"),
        }
    }

    fn tagged<'a>(prefix: &'a [u8], name: &'a str) -> Key<'a> {
        Key([prefix, name.as_bytes(), b"}", b""])
    }

    /// `PREFIX:ch:{CHANNEL}`
    pub fn channel<'a>(&'a self, channel: &'a str) -> Key<'a> {
        Self::tagged(&self.channel, channel)
    }

    /// `PREFIX:stream:{CHANNEL}`
    pub fn stream<'a>(&'a self, channel: &'a str) -> Key<'a> {
        Self::tagged(&self.stream, channel)
    }

    /// `PREFIX:meta:{CHANNEL}`
    pub fn meta<'a>(&'a self, channel: &'a str) -> Key<'a> {
        Self::tagged(&self.meta, channel)
    }

    /// `PREFIX:idem:{CHANNEL}:KEY`
    pub fn idempotency<'a>(&'a self, channel: &'a str, key: &'a str) -> Key<'a> {
        Key([&self.idempotency, channel.as_bytes(), b"}:", key.as_bytes()])
    }

    /// `PREFIX:presence:{CHANNEL}`
    pub fn presence<'a>(&'a self, channel: &'a str) -> Key<'a> {
        Self::tagged(&self.presence, channel)
    }

    /// `PREFIX:user:{USER}`
    pub fn user<'a>(&'a self, user: &'a str) -> Key<'a> {
        Self::tagged(&self.user, user)
    }

    /// `PREFIX:node:UID`
    pub fn node<'a>(&'a self, uid: &'a str) -> Key<'a> {
        Key([&self.node, uid.as_bytes(), b"", b""])
    }

    /// `PREFIX:node:UID` → `UID`: a message on a node's channel (emulation requests).
    pub fn node_of<'a>(&self, name: &'a [u8]) -> Option<&'a str> {
        std::str::from_utf8(name.strip_prefix(&self.node[..])?).ok()
    }

    /// `PREFIX:node:` (the nodes script appends each uid).
    pub fn node_prefix(&self) -> &[u8] {
        &self.node
    }

    /// `PREFIX:nodes`
    pub fn nodes(&self) -> &[u8] {
        &self.nodes
    }

    /// `PREFIX:survey`: the pub/sub channel every node hears cluster-wide questions on.
    pub fn survey(&self) -> &[u8] {
        &self.survey
    }

    /// `PREFIX:survey:UID`: where node `uid` hears the answers to its questions.
    pub fn survey_answers(&self, uid: &str) -> Vec<u8> {
        [&self.survey[..], b":", uid.as_bytes()].concat()
    }

    /// `PREFIX:ch:{CHANNEL}` → `CHANNEL`.
    pub fn channel_of<'a>(&self, name: &'a [u8]) -> Option<&'a str> {
        Self::untag(&self.channel, name)
    }

    /// `PREFIX:user:{USER}` → `USER`.
    pub fn user_of<'a>(&self, name: &'a [u8]) -> Option<&'a str> {
        Self::untag(&self.user, name)
    }

    fn untag<'a>(prefix: &[u8], name: &'a [u8]) -> Option<&'a str> {
        let inner = name.strip_prefix(prefix)?.strip_suffix(b"}")?;
        std::str::from_utf8(inner).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(k: Key<'_>) -> String {
        let mut v = Vec::new();
        k.write(&mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn key_shapes_are_those_redis_already_holds() {
        let k = Keys::new("sc");
        assert_eq!(text(k.channel("chat:1")), "sc:ch:{chat:1}");
        assert_eq!(text(k.stream("chat:1")), "sc:stream:{chat:1}");
        assert_eq!(text(k.meta("chat:1")), "sc:meta:{chat:1}");
        assert_eq!(text(k.idempotency("chat:1", "k-9")), "sc:idem:{chat:1}:k-9");
        assert_eq!(text(k.idempotency("chat:1", "")), "sc:idem:{chat:1}:");
        assert_eq!(text(k.presence("chat:1")), "sc:presence:{chat:1}");
        assert_eq!(text(k.user("alice")), "sc:user:{alice}");
        assert_eq!(text(k.node("uid-1")), "sc:node:uid-1");
        assert_eq!(k.node_prefix(), b"sc:node:");
        assert_eq!(k.node_of(b"sc:node:uid-1"), Some("uid-1"));
        assert_eq!(k.node_of(b"sc:user:{uid-1}"), None);
        assert_eq!(k.nodes(), b"sc:nodes");
    }

    #[test]
    fn cluster_registry_names_share_one_slot() {
        let k = Keys::with_mode("sc", true);
        assert_eq!(text(k.node("uid-1")), "sc:{nodes}:node:uid-1");
        assert_eq!(k.nodes(), b"sc:{nodes}");
        assert_eq!(k.node_of(b"sc:{nodes}:node:uid-1"), Some("uid-1"));
        let slot = super::super::cluster::slot;
        assert_eq!(slot(b"sc:{nodes}:node:uid-1"), slot(k.nodes()));
        assert_eq!(slot(b"sc:{nodes}:node:other"), slot(k.nodes()));
        // Everything else keeps its single-Redis shape.
        assert_eq!(text(k.channel("chat:1")), "sc:ch:{chat:1}");
        assert_eq!(text(k.presence("chat:1")), "sc:presence:{chat:1}");
    }

    #[test]
    fn names_map_back_to_channels_and_users() {
        let k = Keys::new("sc");
        assert_eq!(k.channel_of(b"sc:ch:{a{b}c}"), Some("a{b}c"));
        assert_eq!(k.channel_of(b"sc:user:{a}"), None);
        assert_eq!(k.channel_of(b"other:ch:{a}"), None);
        assert_eq!(k.channel_of(b"sc:ch:{a"), None);
        assert_eq!(k.user_of(b"sc:user:{alice}"), Some("alice"));
        assert_eq!(k.user_of(b"sc:ch:{alice}"), None);
    }
}
