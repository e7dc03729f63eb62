//! Standalone mode: the broker in process, on its own thread.
//!
//! One thread (`shardcast-broker`) serialises every publication of the node, so subscribers on
//! every shard see one order per channel. It blocks on its inbox when idle (0% CPU) and drains
//! in batches. It owns the history streams, the idempotency table and the interest masks; the
//! gather bookkeeping and the publication wire form are shared with the Redis broker
//! ([`super::gather`], [`crate::protocol::publication`]). It must never block on anything but
//! its inbox, and never wait for a shard (shard queues apply backpressure by waiting only when
//! full).

use super::gather::Gathers;
use super::history::Stream;
use super::Broker;
use crate::bus::{
    BrokerInbox, BrokerReply, BusStats, Part, PositionAnswer, Query, ReplyTo, ShardCommand,
    ShardLink, StreamPos, ToBroker, ToShard,
};
use crate::config::Config;
use crate::protocol::publication;
use crate::ws::{FrameBuf, OP_TEXT};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The in-process broker.
pub struct MemoryBroker {
    cfg: Arc<Config>,
    stats: Arc<BusStats>,
    /// CPU to pin the broker thread to (a core no shard uses), as the Redis multiplexer is.
    cpu: Option<usize>,
}

impl MemoryBroker {
    pub fn new(cfg: Arc<Config>, stats: Arc<BusStats>, cpu: Option<usize>) -> Self {
        MemoryBroker { cfg, stats, cpu }
    }
}

/// An idempotency key: the channel and the key.
type IdemKey = (Arc<str>, Box<str>);

/// Publish results remembered by idempotency key, oldest first (one window for all, so
/// insertion order is expiry order).
#[derive(Default)]
struct Idempotency {
    results: HashMap<IdemKey, Option<StreamPos>>,
    order: VecDeque<(Instant, IdemKey)>,
}

impl Idempotency {
    fn get(&self, channel: &Arc<str>, key: &str) -> Option<&Option<StreamPos>> {
        self.results.get(&(channel.clone(), Box::from(key)))
    }

    /// Remembers a result; returns how many keys were forgotten early to stay within `max`.
    fn insert(
        &mut self,
        channel: Arc<str>,
        key: Box<str>,
        pos: Option<StreamPos>,
        now: Instant,
        max: usize,
    ) -> u64 {
        let mut evicted = 0;
        while self.order.len() >= max {
            if let Some((_, k)) = self.order.pop_front() {
                self.results.remove(&k);
                evicted += 1;
            }
        }
        self.results.insert((channel.clone(), key.clone()), pos);
        self.order.push_back((now, (channel, key)));
        evicted
    }

    fn expire(&mut self, window: Duration, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < window {
                break;
            }
            let (_, k) = self.order.pop_front().expect("front exists");
            self.results.remove(&k);
        }
    }
}

struct State {
    cfg: Arc<Config>,
    shards: Vec<ShardLink>,
    /// History channels' streams (created on first publish or position read).
    streams: HashMap<Arc<str>, Stream>,
    /// Bytes of publications in every stream (bounded by `limits.max_history_bytes`).
    history_bytes: usize,
    idempotency: Idempotency,
    /// Channel → mask of shards with local subscribers.
    interest: super::Interest<Arc<str>>,
    /// Shards with protobuf subscribers, per channel (a subset of `interest`).
    protobuf: super::ProtobufInterest,
    gathers: Gathers<ReplyTo>,
    stats: Arc<BusStats>,
}

impl Broker for MemoryBroker {
    fn caps(&self) -> crate::bus::BrokerCaps {
        crate::bus::BrokerCaps::MEMORY
    }
    fn run(self: Box<Self>, inbox: BrokerInbox, shards: Vec<ShardLink>) {
        if let Some(id) = self.cpu {
            // Off the shards' cores: its wake-ups then never preempt a shard mid fan-out.
            if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
                tracing::warn!(cpu = id, "cannot pin the broker thread");
            }
        }
        let inbox = inbox.rx;
        let mut state = State::new(self.cfg, shards, self.stats);
        let sweep_every = Duration::from_secs(1);
        let mut last_sweep = Instant::now();
        // Blocks while idle (waking once a second to expire history); returns when every
        // shard has dropped its sender (shutdown).
        loop {
            match inbox.recv_timeout(sweep_every) {
                Ok(ToBroker::Stop) => break,
                Ok(msg) => state.handle(msg),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now.duration_since(last_sweep) >= sweep_every {
                last_sweep = now;
                state.sweep(now);
            }
        }
        tracing::debug!("memory broker stopped");
    }
}

impl State {
    fn new(cfg: Arc<Config>, shards: Vec<ShardLink>, stats: Arc<BusStats>) -> State {
        State {
            cfg,
            shards,
            streams: HashMap::new(),
            history_bytes: 0,
            idempotency: Idempotency::default(),
            interest: Default::default(),
            protobuf: Default::default(),
            gathers: Gathers::default(),
            stats,
        }
    }

    /// Expires history and idempotency keys.
    fn sweep(&mut self, now: Instant) {
        let cfg = self.cfg.clone();
        let interest = &self.interest;
        let mut bytes = 0;
        self.streams.retain(|channel, stream| {
            let Some(ns) = cfg.namespace_of(channel) else {
                return false;
            };
            let ttl = Duration::from_secs(ns.history_ttl_secs as u64);
            let meta = Duration::from_secs(ns.history_meta_ttl_secs as u64);
            // A position nobody holds and nothing was published to is not worth keeping; one
            // that local subscribers hold stays (its epoch must not change under them).
            let held = interest.mask(channel) != 0;
            let unused = stream.top == 0 && !held;
            let keep = (stream.expire(ttl, meta, now) || held) && !unused;
            if keep {
                bytes += stream.bytes();
            }
            keep
        });
        self.history_bytes = bytes;
        self.stats
            .history_bytes
            .store(bytes as u64, Ordering::Relaxed);
        let window = Duration::from_secs(cfg.limits.idempotency_window_secs as u64);
        self.idempotency.expire(window, now);
    }

    /// Over `limits.max_history_bytes`: drops the publications (not the positions) of the
    /// channels published to least recently, down to 7/8 of the bound, so evictions come in
    /// batches rather than on every publish.
    fn evict_history(&mut self) {
        let target = self.cfg.limits.max_history_bytes / 8 * 7;
        let mut by_age: Vec<(Instant, Arc<str>)> = self
            .streams
            .iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|(c, s)| (s.last_publish(), c.clone()))
            .collect();
        by_age.sort_unstable();
        for (_, channel) in by_age {
            if self.history_bytes <= target {
                break;
            }
            if let Some(stream) = self.streams.get_mut(&channel) {
                self.history_bytes = self.history_bytes.saturating_sub(stream.bytes());
                stream.clear();
                self.stats.history_evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The stream of a history channel, created with a new epoch when it has none.
    fn stream(&mut self, channel: &Arc<str>) -> Option<&mut Stream> {
        let ns = self.cfg.namespace_of(channel)?;
        if !ns.has_history() {
            return None;
        }
        Some(
            self.streams
                .entry(channel.clone())
                .or_insert_with(|| Stream::new(Instant::now())),
        )
    }

    fn handle(&mut self, msg: ToBroker) {
        match msg {
            ToBroker::Subscribe { shard, channel } => {
                self.interest.add(channel, shard);
            }
            ToBroker::Unsubscribe { shard, channel } => {
                self.interest.remove(&channel, shard);
                self.protobuf.left(&channel, shard);
            }
            ToBroker::ProtobufInterest { shard, channel, on } => {
                let mask = self.interest.mask(&channel);
                self.protobuf.set(channel, shard, on, mask);
            }
            ToBroker::Publish {
                channel,
                data,
                info,
                idempotency_key,
                extras,
                reply,
            } => {
                let extras = extras.as_deref();
                if let Some(key) = &idempotency_key {
                    if let Some(prev) = self.idempotency.get(&channel, key) {
                        self.stats
                            .idempotent_repeats
                            .fetch_add(1, Ordering::Relaxed);
                        let prev = prev.clone();
                        self.reply(reply, BrokerReply::Published(Ok(prev)));
                        return;
                    }
                }
                self.stats.publications.fetch_add(1, Ordering::Relaxed);
                let mask = self.interest.mask(&channel);
                let now = Instant::now();
                let size = self
                    .cfg
                    .namespace_of(&channel)
                    .map_or(0, |ns| ns.history_size as usize);
                let mut bytes_change = (0, 0);
                // `skip_history`: published as in a channel without history (no offset).
                let stream = match extras.is_some_and(|e| e.skip_history) {
                    true => None,
                    false => self.stream(&channel),
                };
                let pos = match stream {
                    Some(stream) => {
                        let offset = stream.next_offset();
                        let mut p = Vec::with_capacity(data.get().len() + 64);
                        publication::object(&mut p, &data, info.as_deref(), extras, Some(offset));
                        let object = bytes::Bytes::from(p);
                        let before = stream.bytes();
                        stream.push(object.clone(), size, now);
                        bytes_change = (before, stream.bytes());
                        let epoch = stream.epoch.clone();
                        if mask != 0 {
                            let frame = super::publication_frame(
                                super::push_frame(&channel, &object),
                                self.protobuf.mask(&channel) & mask != 0,
                                &self.stats,
                            );
                            super::send_to(&self.shards, mask, || ToShard::Publication {
                                channel: channel.clone(),
                                frame: frame.clone(),
                                offset,
                                epoch: Some(epoch.clone()),
                            });
                        }
                        Some(StreamPos { offset, epoch })
                    }
                    None => {
                        if mask != 0 {
                            let mut frame =
                                FrameBuf::with_capacity(channel.len() + data.get().len() + 48);
                            publication::push_new(
                                frame.payload(),
                                &channel,
                                &data,
                                info.as_deref(),
                                extras,
                            );
                            let frame = super::publication_frame(
                                frame.finish(OP_TEXT),
                                self.protobuf.mask(&channel) & mask != 0,
                                &self.stats,
                            );
                            super::send_to(&self.shards, mask, || ToShard::Publication {
                                channel: channel.clone(),
                                frame: frame.clone(),
                                offset: 0,
                                epoch: None,
                            });
                        }
                        None
                    }
                };
                self.history_bytes =
                    self.history_bytes.saturating_sub(bytes_change.0) + bytes_change.1;
                if self.history_bytes > self.cfg.limits.max_history_bytes {
                    self.evict_history();
                }
                if let Some(key) = idempotency_key {
                    let max = self.cfg.limits.max_idempotency_keys;
                    let evicted = self.idempotency.insert(channel, key, pos.clone(), now, max);
                    self.stats
                        .idempotency_evictions
                        .fetch_add(evicted, Ordering::Relaxed);
                }
                self.reply(reply, BrokerReply::Published(Ok(pos)));
            }
            ToBroker::Position {
                shard,
                token,
                channel,
                since,
            } => {
                let answer = match self.stream(&channel) {
                    Some(stream) => {
                        let recovered = since.as_ref().and_then(|s| stream.recover(s));
                        Ok(PositionAnswer {
                            epoch: stream.epoch.clone(),
                            top: stream.top,
                            recovered: recovered.is_some(),
                            pubs: recovered.unwrap_or_default(),
                        })
                    }
                    None => Err(crate::bus::BrokerError::Unavailable),
                };
                if let Some(link) = self.shards.get(shard) {
                    link.send(ToShard::Position {
                        token,
                        channel,
                        answer,
                    });
                }
            }
            ToBroker::History {
                channel,
                query,
                reply,
            } => {
                let page = match self.stream(&channel) {
                    Some(stream) => super::history::page(stream.entries(), &stream.epoch, &query)
                        .map(|pubs| crate::bus::HistoryPage {
                            pubs,
                            epoch: stream.epoch.clone(),
                            offset: stream.top,
                        }),
                    None => Err(crate::bus::BrokerError::Unavailable),
                };
                self.reply(reply, BrokerReply::History(page));
            }
            ToBroker::HistoryRemove { channel, reply } => {
                if let Some(stream) = self.stream(&channel) {
                    let before = stream.bytes();
                    stream.clear();
                    self.history_bytes = self.history_bytes.saturating_sub(before);
                }
                self.reply(reply, BrokerReply::Done);
            }
            ToBroker::Gather {
                query: Query::Nodes,
                reply,
            } => self.reply(reply, BrokerReply::Gathered(Part::Nodes(Vec::new()))),
            ToBroker::Gather { query, reply } => self.gathers.start(&query, reply, &self.shards),
            ToBroker::Part { gather, part } => {
                if let Some((reply, merged)) = self.gathers.part(gather, part) {
                    self.reply(reply, BrokerReply::Gathered(merged));
                }
            }
            ToBroker::Command(cmd) => self.broadcast(cmd),
            ToBroker::JoinLeave { channel, push } => {
                // Straight to the subscribed shards: no offset, no history.
                let mask = self.interest.mask(&channel);
                if mask != 0 {
                    let mut frame = FrameBuf::with_capacity(push.len());
                    frame.payload().extend_from_slice(&push);
                    let frame = frame.finish(OP_TEXT);
                    super::send_to(&self.shards, mask, || ToShard::JoinLeave {
                        channel: channel.clone(),
                        frame: frame.clone(),
                    });
                }
            }
            // Standalone: the only node is this one (the front door refused other nodes).
            ToBroker::Emulation(req) => req.route(&self.shards, &self.stats),
            // Standalone: presence is read from the shards and user commands go to every shard.
            ToBroker::PresenceAdd { .. }
            | ToBroker::Leave
            | ToBroker::Stop
            | ToBroker::PresenceRemove { .. }
            | ToBroker::UserInterest { .. } => {}
        }
    }

    fn broadcast(&self, cmd: ShardCommand) {
        for link in &self.shards {
            link.send(ToShard::Command(cmd.clone()));
        }
    }

    fn reply(&self, to: ReplyTo, reply: BrokerReply) {
        super::reply_to(&self.shards, to, reply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::shard_link;
    use serde_json::value::RawValue;

    fn setup(n: usize) -> (State, Vec<crate::bus::ShardInbox>) {
        let stats = Arc::new(BusStats::default());
        let mut links = Vec::new();
        let mut inboxes = Vec::new();
        for _ in 0..n {
            let (l, i) = shard_link(16, stats.clone()).unwrap();
            links.push(l);
            inboxes.push(i);
        }
        let cfg = Config::from_toml(
            "insecure = true\n[namespaces.h]\nhistory_size = 3\nrecover = true\n",
        )
        .unwrap();
        (State::new(Arc::new(cfg), links, stats), inboxes)
    }

    fn publish(s: &mut State, channel: &str, token: u64) {
        s.handle(ToBroker::Publish {
            channel: channel.into(),
            data: RawValue::from_string("{\"n\":1}".into()).unwrap(),
            info: None,
            idempotency_key: None,
            extras: None,
            reply: ReplyTo { shard: 0, token },
        });
    }

    #[test]
    fn publication_goes_once_to_each_interested_shard_sharing_one_frame() {
        let (mut s, inboxes) = setup(3);
        s.handle(ToBroker::Subscribe {
            shard: 1,
            channel: "c".into(),
        });
        s.handle(ToBroker::Subscribe {
            shard: 2,
            channel: "c".into(),
        });
        publish(&mut s, "c", 9);
        let mut ptrs = Vec::new();
        for i in [1, 2] {
            match inboxes[i].rx.try_recv().unwrap() {
                ToShard::Publication { frame, .. } => ptrs.push(frame.as_ptr()),
                other => panic!("{other:?}"),
            }
            assert!(inboxes[i].notified.load(Ordering::Acquire));
        }
        assert_eq!(ptrs[0], ptrs[1], "one encoding shared by reference");
        // Shard 0 only gets the publish acknowledgement.
        assert!(matches!(
            inboxes[0].rx.try_recv().unwrap(),
            ToShard::Reply { token: 9, .. }
        ));
        assert!(inboxes[0].rx.try_recv().is_err());
        // Last unsubscribe removes the interest.
        s.handle(ToBroker::Unsubscribe {
            shard: 1,
            channel: "c".into(),
        });
        s.handle(ToBroker::Unsubscribe {
            shard: 2,
            channel: "c".into(),
        });
        assert!(s.interest.is_empty());
    }

    #[test]
    fn protobuf_twin_is_made_once_and_only_while_a_shard_has_protobuf_subscribers() {
        let (mut s, inboxes) = setup(2);
        let sub = |s: &mut State, shard| {
            s.handle(ToBroker::Subscribe {
                shard,
                channel: "c".into(),
            })
        };
        let pb = |s: &mut State, shard, on| {
            s.handle(ToBroker::ProtobufInterest {
                shard,
                channel: "c".into(),
                on,
            })
        };
        let frames = |i: usize, inboxes: &[crate::bus::ShardInbox]| loop {
            match inboxes[i].rx.try_recv().unwrap() {
                ToShard::Publication { frame, .. } => {
                    return (frame.as_ptr(), crate::bus::publication_frames(&frame))
                }
                ToShard::Reply { .. } => continue,
                other => panic!("{other:?}"),
            }
        };
        sub(&mut s, 0);
        sub(&mut s, 1);
        publish(&mut s, "c", 1);
        let (_, (json, twin)) = frames(0, &inboxes);
        assert!(twin.is_none(), "no protobuf subscriber: JSON only");
        assert_eq!(json[0], 0x81);
        let _ = frames(1, &inboxes);
        assert_eq!(s.stats.protobuf_encodes.load(Ordering::Relaxed), 0);
        // Shard 1 gets a protobuf subscriber: one twin for the node, shared by both shards.
        pb(&mut s, 1, true);
        publish(&mut s, "c", 2);
        let (p0, (json0, twin0)) = frames(0, &inboxes);
        let (p1, (_, twin1)) = frames(1, &inboxes);
        assert_eq!(p0, p1, "one buffer for every shard");
        assert_eq!(s.stats.protobuf_encodes.load(Ordering::Relaxed), 1);
        assert_eq!(json0[0], 0x81);
        let twin = twin0.unwrap();
        assert_eq!(twin, twin1.unwrap());
        let (op, payload) = crate::protocol::protobuf::frame_payload(&twin).unwrap();
        assert_eq!(op, crate::ws::OP_BINARY);
        let mut payload = payload;
        let reply =
            <crate::protocol::pb::Reply as prost::Message>::decode_length_delimited(&mut payload)
                .unwrap();
        let push = reply.push.unwrap();
        assert_eq!(push.channel, "c");
        assert_eq!(push.r#pub.unwrap().data, br#"{"n":1}"#);
        // Its protobuf subscriber left: JSON only again.
        pb(&mut s, 1, false);
        publish(&mut s, "c", 3);
        assert!(frames(0, &inboxes).1 .1.is_none());
        // A stale "on" from a shard that already left the channel is ignored, and leaving the
        // channel clears a shard's protobuf interest too.
        pb(&mut s, 1, true);
        s.handle(ToBroker::Unsubscribe {
            shard: 1,
            channel: "c".into(),
        });
        pb(&mut s, 1, true);
        let _ = frames(1, &inboxes);
        publish(&mut s, "c", 4);
        assert!(frames(0, &inboxes).1 .1.is_none());
        assert_eq!(s.stats.protobuf_encodes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn history_is_bounded_in_bytes_oldest_channels_first() {
        let (mut s, _inboxes) = setup(1);
        s.cfg = Arc::new(
            Config::from_toml(
                "insecure = true\n[limits]\nmax_history_bytes = 120\n[namespaces.h]\nhistory_size = 3\n",
            )
            .unwrap(),
        );
        for (i, ch) in ["h:old", "h:old", "h:new", "h:new"].iter().enumerate() {
            publish(&mut s, ch, i as u64);
            std::thread::sleep(Duration::from_millis(2));
        }
        // Each publication object is 27 bytes: 4 fit in 120, a fifth passes it.
        assert_eq!(s.stats.history_evictions.load(Ordering::Relaxed), 0);
        publish(&mut s, "h:new", 5);
        publish(&mut s, "h:new", 6);
        assert!(s.history_bytes <= 120, "{}", s.history_bytes);
        assert!(
            s.streams["h:old"].is_empty(),
            "the oldest channel's history went"
        );
        assert_eq!(s.streams["h:old"].top, 2, "its position stayed");
        assert_eq!(s.streams["h:new"].len(), 3);
        assert_eq!(s.stats.history_evictions.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn gather_merges_all_shards() {
        let (mut s, inboxes) = setup(2);
        s.handle(ToBroker::Gather {
            query: Query::Channels(None),
            reply: ReplyTo { shard: 1, token: 5 },
        });
        let gather = match inboxes[0].rx.try_recv().unwrap() {
            ToShard::Collect { gather, .. } => gather,
            other => panic!("{other:?}"),
        };
        s.handle(ToBroker::Part {
            gather,
            part: Part::Channels(vec![("a".into(), 2)]),
        });
        assert!(inboxes[1].rx.try_recv().is_ok()); // its Collect
        assert!(inboxes[1].rx.try_recv().is_err()); // no answer yet
        s.handle(ToBroker::Part {
            gather,
            part: Part::Channels(vec![("a".into(), 3), ("b".into(), 1)]),
        });
        match inboxes[1].rx.try_recv().unwrap() {
            ToShard::Reply {
                token: 5,
                reply: BrokerReply::Gathered(Part::Channels(mut v)),
            } => {
                v.sort();
                assert_eq!(v, vec![("a".into(), 5), ("b".into(), 1)]);
            }
            other => panic!("{other:?}"),
        }
    }
}
