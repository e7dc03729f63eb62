//! The multiplexer's view of each history channel the node subscribes to: the last offset it
//! forwarded to its shards, gap repair, and position answers. Pure state, no I/O: it turns
//! events (a live publication, a stream read's result, a position request, the link going
//! down) into [`Action`]s the multiplexer carries out, so its rules are tested on their own.
//! Runs on the multiplexer's thread, inside its `RefCell`: it must never await or call back
//! into the multiplexer.
//!
//! The rules, per channel:
//! - Live publications are forwarded in offset order, each once: an offset at or below the last
//!   forwarded is a duplicate (dropped); one past it is forwarded; a later one is a gap.
//! - A gap, a (re)confirmed SUBSCRIBE and a recovery the cache cannot serve start one stream
//!   read. While it is in flight, live publications of the channel are held (bounded), then
//!   replayed through the same rules, so the shards see one ordered, gap-free sequence.
//! - A read returns the epoch, the top offset and the entries after the lowest position
//!   anyone needs: the node's own last offset (repair) and the recovering subscribers'. What
//!   the node missed is forwarded; if it cannot be (trimmed, other epoch), the channel's local
//!   subscribers are told to recover instead ([`Action::Insufficient`]).
//! - A position answer is queued to its shard after every publication up to the position it
//!   names, so the subscriber, added on receipt, misses nothing and gets nothing twice.
//! - Recent publications stay in memory for `recovery_cache_secs` after a read, so a reconnect
//!   storm costs one stream read per channel per node, not one per client.

use crate::broker::history;
use crate::bus::{BrokerError, BusStats, PositionAnswer, ShardId, StreamPos};
use crate::config::Config;
use bytes::Bytes;
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A publication of a history channel, as it reached the node.
#[derive(Debug, Clone)]
pub struct Live {
    pub offset: u64,
    pub epoch: Arc<str>,
    /// The complete WebSocket frame of its push.
    pub frame: Bytes,
    /// Its publication object (`{"data":..,"offset":N}`), for recovery.
    pub publication: Bytes,
}

/// A subscriber's position request.
#[derive(Debug, Clone)]
pub struct PosReq {
    pub shard: ShardId,
    pub token: u64,
    pub since: Option<StreamPos>,
}

/// What a stream read found.
#[derive(Debug, Clone)]
pub struct ReadResult {
    pub epoch: Arc<str>,
    pub top: u64,
    /// Ascending `(offset, publication)` entries after the position read from.
    pub entries: Vec<(u64, Bytes)>,
}

/// What the multiplexer must do.
#[derive(Debug)]
pub enum Action {
    /// Read the channel's stream: position, plus the entries after `since` when given.
    Read {
        channel: Arc<str>,
        gen: u64,
        since: Option<u64>,
    },
    /// Send a publication to the shards interested in `channel`.
    Forward { channel: Arc<str>, live: Live },
    /// Answer a position request.
    Answer {
        shard: ShardId,
        token: u64,
        channel: Arc<str>,
        answer: Result<PositionAnswer, BrokerError>,
    },
    /// Tell the channel's local subscribers to recover.
    Insufficient { channel: Arc<str> },
    /// The channel's first position is known: shards may reply to subscribers.
    Confirm { channel: Arc<str> },
    /// The stream in Redis is below what this node delivered under the same epoch (writes lost
    /// in a failover: replication is asynchronous): give the channel the epoch `new` in Redis
    /// unless another node did already (its meta must still say `old` with a top below
    /// `delivered`), so offsets are never reused with different data under one epoch.
    NewEpoch {
        channel: Arc<str>,
        old: Arc<str>,
        delivered: u64,
        new: Arc<str>,
    },
}

/// The node-wide bound of every channel's cache (`redis_options.recovery_cache_max_bytes`).
#[derive(Debug)]
struct Budget {
    used: Cell<usize>,
    cap: usize,
}

/// A channel's recent publications, contiguous, ending at the node's position.
#[derive(Debug)]
struct Cache {
    entries: VecDeque<(u64, Bytes)>,
    bytes: usize,
    /// Dropped at this time unless a recovery uses it again.
    until: Option<Instant>,
    budget: Rc<Budget>,
}

impl Cache {
    fn new(budget: Rc<Budget>) -> Cache {
        Cache {
            entries: VecDeque::new(),
            bytes: 0,
            until: None,
            budget,
        }
    }

    fn clear(&mut self) {
        self.budget.used.set(self.budget.used.get() - self.bytes);
        self.bytes = 0;
        self.entries = VecDeque::new();
    }

    /// Appends, keeping at most `size` entries; over the node's budget the cache is dropped
    /// (the next recovery reads the stream) and counted.
    fn push(&mut self, offset: u64, publication: Bytes, size: u64, stats: &BusStats) -> bool {
        let len = publication.len();
        if self.budget.used.get() + len > self.budget.cap {
            stats.recovery_cache_full.fetch_add(1, Ordering::Relaxed);
            self.clear();
            return false;
        }
        self.entries.push_back((offset, publication));
        self.bytes += len;
        self.budget.used.set(self.budget.used.get() + len);
        while self.entries.len() as u64 > size {
            if let Some((_, p)) = self.entries.pop_front() {
                self.bytes -= p.len();
                self.budget.used.set(self.budget.used.get() - p.len());
            }
        }
        true
    }

    fn front(&self) -> Option<&(u64, Bytes)> {
        self.entries.front()
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        self.clear();
    }
}

#[derive(Debug)]
struct Track {
    /// Changes whenever outstanding reads become meaningless (link down, channel dropped).
    gen: u64,
    /// Redis confirmed the SUBSCRIBE on the current link.
    confirmed: bool,
    /// Redis Cluster: its master's subscriber connection went down (or its slot moved) and no
    /// new SSUBSCRIBE is confirmed yet: position requests fail at once.
    lost: bool,
    /// A stream read is in flight (live publications are held).
    reading: bool,
    /// Last offset forwarded to the shards.
    pos: Option<StreamPos>,
    held: Vec<Live>,
    pending: Vec<PosReq>,
    /// Contiguous recent publications ending at `pos` (empty when not caching).
    cache: Cache,
}

impl Track {
    fn new(gen: u64, budget: &Rc<Budget>) -> Track {
        Track {
            gen,
            confirmed: false,
            lost: false,
            reading: false,
            pos: None,
            held: Vec::new(),
            pending: Vec::new(),
            cache: Cache::new(budget.clone()),
        }
    }
}

/// Every tracked channel of the node.
pub struct Tracker {
    cfg: Arc<Config>,
    stats: Arc<BusStats>,
    tracks: HashMap<Arc<str>, Track>,
    next_gen: u64,
    budget: Rc<Budget>,
    /// The subscriber connection is down: position requests fail at once instead of waiting.
    down: bool,
}

impl Tracker {
    pub fn new(cfg: Arc<Config>, stats: Arc<BusStats>) -> Tracker {
        let budget = Rc::new(Budget {
            used: Cell::new(0),
            cap: cfg.redis_options.recovery_cache_max_bytes,
        });
        Tracker {
            cfg,
            stats,
            tracks: HashMap::new(),
            next_gen: 1,
            budget,
            down: false,
        }
    }

    /// Whether `channel` keeps history (and so is tracked).
    pub fn is_history(&self, channel: &str) -> bool {
        self.cfg
            .namespace_of(channel)
            .is_some_and(|ns| ns.has_history())
    }

    fn size(&self, channel: &str) -> u64 {
        self.cfg
            .namespace_of(channel)
            .map_or(0, |ns| ns.history_size as u64)
    }

    fn gen(&mut self) -> u64 {
        self.next_gen += 1;
        self.next_gen
    }

    pub fn len(&self) -> usize {
        self.tracks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracks.is_empty()
    }

    /// The node's first subscriber of `channel` appeared (SUBSCRIBE sent).
    pub fn created(&mut self, channel: &Arc<str>) {
        let gen = self.gen();
        let budget = &self.budget;
        self.tracks
            .entry(channel.clone())
            .or_insert_with(|| Track::new(gen, budget));
    }

    /// Bytes held by every channel's cache.
    pub fn cache_bytes(&self) -> usize {
        self.budget.used.get()
    }

    /// The node's last subscriber of `channel` left.
    pub fn removed(&mut self, channel: &Arc<str>, out: &mut Vec<Action>) {
        if let Some(t) = self.tracks.remove(channel) {
            fail_pending(channel, t.pending, out);
        }
    }

    /// A new subscriber connection is up (its SUBSCRIBE confirmations follow).
    pub fn link_up(&mut self) {
        self.down = false;
    }

    /// Redis confirmed the SUBSCRIBE (first time, or again after a reconnect): read the stream
    /// to learn the position, or to repair what the node missed while the link was down.
    pub fn subscribed(&mut self, channel: &Arc<str>, out: &mut Vec<Action>) {
        self.down = false;
        let gen = self.gen();
        let budget = &self.budget;
        let t = self
            .tracks
            .entry(channel.clone())
            .or_insert_with(|| Track::new(gen, budget));
        t.confirmed = true;
        t.lost = false;
        if !t.reading {
            start_read(channel, t, out);
        }
    }

    /// The link went down: reads in flight are lost, waiting subscribers get a temporary
    /// error, held publications will be read again after the reconnect.
    pub fn link_down(&mut self, out: &mut Vec<Action>) {
        self.down = true;
        let mut gens = Vec::with_capacity(self.tracks.len());
        for _ in 0..self.tracks.len() {
            gens.push(self.gen());
        }
        for ((channel, t), gen) in self.tracks.iter_mut().zip(gens) {
            t.confirmed = false;
            t.reading = false;
            t.gen = gen;
            t.held.clear();
            fail_pending(channel, std::mem::take(&mut t.pending), out);
        }
    }

    /// Redis Cluster: the subscriber connection of the channels `on_link` picks went down, or
    /// their slot moved: as [`Tracker::link_down`] for those channels only (the others keep
    /// their live stream).
    pub fn lost_where(&mut self, on_link: impl Fn(&str) -> bool, out: &mut Vec<Action>) {
        let lost: Vec<Arc<str>> = self.tracks.keys().filter(|c| on_link(c)).cloned().collect();
        for channel in lost {
            let gen = self.gen();
            let Some(t) = self.tracks.get_mut(&channel) else {
                continue;
            };
            t.confirmed = false;
            t.lost = true;
            t.reading = false;
            t.gen = gen;
            t.held.clear();
            fail_pending(&channel, std::mem::take(&mut t.pending), out);
        }
    }

    /// A subscriber needs its position (and what it missed).
    pub fn position(&mut self, channel: &Arc<str>, req: PosReq, out: &mut Vec<Action>) {
        let size = self.size(channel);
        let keep = Duration::from_secs(self.cfg.redis_options.recovery_cache_secs as u64);
        let until = Instant::now() + keep;
        let Some(t) = self.tracks.get_mut(channel) else {
            out.push(answer(channel, &req, Err(BrokerError::Unavailable)));
            return;
        };
        if (self.down || t.lost) && !t.confirmed {
            // No live stream until the link is back: a temporary error, the SDK retries.
            out.push(answer(channel, &req, Err(BrokerError::Unavailable)));
            return;
        }
        if !t.confirmed || t.reading || t.pos.is_none() {
            t.pending.push(req);
            if t.confirmed && !t.reading {
                start_read(channel, t, out);
            }
            return;
        }
        match serve(t, &req, size, None, &self.stats, until) {
            Some(a) => out.push(answer(channel, &req, Ok(a))),
            None => {
                t.pending.push(req);
                start_read(channel, t, out);
            }
        }
    }

    /// A live publication arrived.
    pub fn live(&mut self, channel: &Arc<str>, live: Live, out: &mut Vec<Action>) {
        let max_held = self.cfg.redis_options.max_held_publications;
        let size = self.size(channel);
        let Some(t) = self.tracks.get_mut(channel) else {
            return; // nobody here subscribes to it any more
        };
        on_live(channel, t, live, size, max_held, &self.stats, out);
    }

    /// A stream read finished.
    pub fn read_done(
        &mut self,
        channel: &Arc<str>,
        gen: u64,
        since: Option<u64>,
        r: ReadResult,
        out: &mut Vec<Action>,
    ) {
        let size = self.size(channel);
        let max_held = self.cfg.redis_options.max_held_publications;
        let cache_secs = self.cfg.redis_options.recovery_cache_secs;
        let now = Instant::now();
        let Some(t) = self.tracks.get_mut(channel) else {
            return;
        };
        if t.gen != gen || !t.reading {
            return;
        }
        t.reading = false;
        let first = t.pos.is_none();
        let mut epoch = r.epoch.clone();
        match t.pos.clone() {
            None => {}
            Some(p) if *p.epoch == *r.epoch && r.top < p.offset => {
                // Lost writes: the new master's stream is behind what was delivered.
                insufficient(channel, t, &self.stats, out);
                let mut buf = [0; 16];
                epoch = Arc::from(history::new_epoch_in(&mut buf));
                out.push(Action::NewEpoch {
                    channel: channel.clone(),
                    old: r.epoch.clone(),
                    delivered: p.offset,
                    new: epoch.clone(),
                });
            }
            Some(p) if *p.epoch != *r.epoch || r.top < p.offset => {
                // The stream was lost and restarted: nothing can be repaired.
                insufficient(channel, t, &self.stats, out);
            }
            Some(p) if r.top > p.offset => {
                match history::recover(&p, &r.epoch, r.top, &r.entries) {
                    Some(pubs) => {
                        self.stats
                            .repaired_publications
                            .fetch_add(pubs.len() as u64, Ordering::Relaxed);
                        for (i, publication) in pubs.into_iter().enumerate() {
                            let live = Live {
                                offset: p.offset + 1 + i as u64,
                                epoch: r.epoch.clone(),
                                frame: crate::broker::push_frame(channel, &publication),
                                publication,
                            };
                            out.push(Action::Forward {
                                channel: channel.clone(),
                                live,
                            });
                        }
                    }
                    None => insufficient(channel, t, &self.stats, out),
                }
            }
            Some(_) => {}
        }
        t.pos = Some(StreamPos {
            offset: r.top,
            epoch,
        });
        // The entries read become the cache: the contiguous run that ends at the top.
        t.cache.clear();
        if r.entries.last().is_some_and(|(o, _)| *o == r.top) {
            let mut run: Vec<(u64, Bytes)> = Vec::new();
            for (o, p) in r.entries.into_iter().rev() {
                if run.last().is_some_and(|(prev, _)| *prev != o + 1) {
                    break;
                }
                run.push((o, p));
            }
            for (o, p) in run.into_iter().rev() {
                if !t.cache.push(o, p, size, &self.stats) {
                    break;
                }
            }
        }
        let keep = Duration::from_secs(cache_secs as u64);
        if first {
            out.push(Action::Confirm {
                channel: channel.clone(),
            });
        }
        // Answer whoever this read covers; a request that came in meanwhile with an older
        // position needs another read.
        let mut again = Vec::new();
        for req in std::mem::take(&mut t.pending) {
            match serve(t, &req, size, since, &self.stats, now + keep) {
                Some(a) => out.push(answer(channel, &req, Ok(a))),
                None => again.push(req),
            }
        }
        t.cache.until = (cache_secs > 0).then_some(now + keep);
        if cache_secs == 0 {
            t.cache.clear();
        }
        t.pending = again;
        if !t.pending.is_empty() {
            start_read(channel, t, out);
            return;
        }
        for live in std::mem::take(&mut t.held) {
            on_live(channel, t, live, size, max_held, &self.stats, out);
        }
    }

    /// A stream read failed (Redis answered an error): waiting subscribers get a temporary
    /// error and held publications go through the live rules (a gap reads again).
    pub fn read_failed(&mut self, channel: &Arc<str>, gen: u64, out: &mut Vec<Action>) {
        let size = self.size(channel);
        let max_held = self.cfg.redis_options.max_held_publications;
        let Some(t) = self.tracks.get_mut(channel) else {
            return;
        };
        if t.gen != gen || !t.reading {
            return;
        }
        t.reading = false;
        fail_pending(channel, std::mem::take(&mut t.pending), out);
        if t.pos.is_none() {
            t.held.clear();
            return;
        }
        for live in std::mem::take(&mut t.held) {
            on_live(channel, t, live, size, max_held, &self.stats, out);
        }
    }

    /// Drops caches whose time is up.
    pub fn sweep(&mut self, now: Instant) {
        for t in self.tracks.values_mut() {
            if t.cache.until.is_some_and(|u| u <= now) {
                t.cache.clear();
                t.cache.until = None;
            }
        }
    }
}

fn answer(channel: &Arc<str>, req: &PosReq, answer: Result<PositionAnswer, BrokerError>) -> Action {
    Action::Answer {
        shard: req.shard,
        token: req.token,
        channel: channel.clone(),
        answer,
    }
}

fn fail_pending(channel: &Arc<str>, pending: Vec<PosReq>, out: &mut Vec<Action>) {
    for req in pending {
        out.push(answer(channel, &req, Err(BrokerError::Unavailable)));
    }
}

fn start_read(channel: &Arc<str>, t: &mut Track, out: &mut Vec<Action>) {
    let mut since = t.pos.as_ref().map(|p| p.offset);
    for req in &t.pending {
        if let Some(s) = &req.since {
            since = Some(since.map_or(s.offset, |cur| cur.min(s.offset)));
        }
    }
    t.reading = true;
    out.push(Action::Read {
        channel: channel.clone(),
        gen: t.gen,
        since,
    });
}

fn insufficient(channel: &Arc<str>, t: &mut Track, stats: &BusStats, out: &mut Vec<Action>) {
    stats.insufficient_state.fetch_add(1, Ordering::Relaxed);
    t.cache.clear();
    out.push(Action::Insufficient {
        channel: channel.clone(),
    });
}

/// Answers `req` from the node's position and cache; `None` when a stream read is needed.
/// `read_since` is the position the read that just finished started from: a request at or
/// after it that the entries do not serve cannot be served at all. A cache that serves a
/// recovery is kept until `keep_until`.
fn serve(
    t: &mut Track,
    req: &PosReq,
    size: u64,
    read_since: Option<u64>,
    stats: &BusStats,
    keep_until: Instant,
) -> Option<PositionAnswer> {
    let p = t.pos.as_ref()?;
    let unrecovered = PositionAnswer {
        epoch: p.epoch.clone(),
        top: p.offset,
        recovered: false,
        pubs: Vec::new(),
    };
    let Some(s) = &req.since else {
        return Some(unrecovered);
    };
    if *s.epoch != *p.epoch || p.offset.saturating_sub(s.offset) > size {
        return Some(unrecovered);
    }
    if s.offset > p.offset {
        // The client saw publications this node has not forwarded yet: it comes from a node
        // that is ahead on the live stream. The stream has them (the publish script appends
        // before it publishes), so read it; only a client still ahead after a read claims
        // offsets the stream never had.
        return read_since.map(|_| unrecovered);
    }
    let from = s.offset + 1;
    let covered = s.offset == p.offset || t.cache.front().is_some_and(|(o, _)| *o <= from);
    if covered {
        let skip = t.cache.front().map_or(0, |(o, _)| from.saturating_sub(*o)) as usize;
        let pubs: Vec<Bytes> = t
            .cache
            .entries
            .iter()
            .skip(skip)
            .map(|(_, b)| b.clone())
            .collect();
        if read_since.is_none() && !pubs.is_empty() {
            stats.recoveries_from_cache.fetch_add(1, Ordering::Relaxed);
            t.cache.until = t.cache.until.map(|u| u.max(keep_until));
        }
        return Some(PositionAnswer {
            recovered: true,
            pubs,
            ..unrecovered
        });
    }
    match read_since {
        Some(r) if s.offset >= r => Some(unrecovered), // read, and the stream lacks it
        _ => None,
    }
}

fn on_live(
    channel: &Arc<str>,
    t: &mut Track,
    live: Live,
    size: u64,
    max_held: usize,
    stats: &BusStats,
    out: &mut Vec<Action>,
) {
    if !t.confirmed || t.reading || t.pos.is_none() {
        if t.held.len() >= max_held {
            // Dropped here; the next publication shows the gap and repairs it from the stream.
            stats.repair_overflows.fetch_add(1, Ordering::Relaxed);
            t.held.clear();
        }
        t.held.push(live);
        return;
    }
    let p = t.pos.as_mut().expect("checked");
    if *live.epoch != *p.epoch {
        // The stream restarted (Redis lost it): the subscribers' positions are void.
        *p = StreamPos {
            offset: live.offset,
            epoch: live.epoch.clone(),
        };
        insufficient(channel, t, stats, out);
        out.push(Action::Forward {
            channel: channel.clone(),
            live,
        });
        return;
    }
    if live.offset <= p.offset {
        return; // already forwarded (a repair got it first)
    }
    if live.offset == p.offset + 1 {
        p.offset = live.offset;
        if !t.cache.is_empty() {
            t.cache
                .push(live.offset, live.publication.clone(), size, stats);
        }
        out.push(Action::Forward {
            channel: channel.clone(),
            live,
        });
        return;
    }
    // A gap: hold this one and read what is missing.
    t.held.push(live);
    start_read(channel, t, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "insecure = true\n[redis_options]\nmax_held_publications = 4\n[namespaces.h]\nhistory_size = 5\nrecover = true\n";

    fn tracker() -> Tracker {
        let cfg = Config::from_toml(CFG).unwrap();
        cfg.validate().unwrap();
        Tracker::new(Arc::new(cfg), Arc::new(BusStats::default()))
    }

    fn live(offset: u64, epoch: &str) -> Live {
        let publication = Bytes::from(format!("{{\"data\":{offset},\"offset\":{offset}}}"));
        Live {
            offset,
            epoch: epoch.into(),
            frame: crate::broker::push_frame("h:1", &publication),
            publication,
        }
    }

    fn result(epoch: &str, top: u64, entries: std::ops::RangeInclusive<u64>) -> ReadResult {
        ReadResult {
            epoch: epoch.into(),
            top,
            entries: entries.map(|o| (o, live(o, epoch).publication)).collect(),
        }
    }

    fn pos(offset: u64, epoch: &str) -> StreamPos {
        StreamPos {
            offset,
            epoch: epoch.into(),
        }
    }

    /// Offsets forwarded, in order.
    fn forwarded(out: &[Action]) -> Vec<u64> {
        out.iter()
            .filter_map(|a| match a {
                Action::Forward { live, .. } => Some(live.offset),
                _ => None,
            })
            .collect()
    }

    fn read_of(out: &[Action]) -> (u64, Option<u64>) {
        out.iter()
            .find_map(|a| match a {
                Action::Read { gen, since, .. } => Some((*gen, *since)),
                _ => None,
            })
            .expect("a read")
    }

    fn answers(out: &[Action]) -> Vec<(u64, bool, u64, usize)> {
        out.iter()
            .filter_map(|a| match a {
                Action::Answer {
                    token,
                    answer: Ok(a),
                    ..
                } => Some((*token, a.recovered, a.top, a.pubs.len())),
                _ => None,
            })
            .collect()
    }

    /// A channel subscribed and synced at offset `top` of epoch "e".
    fn live_at(top: u64) -> (Tracker, Arc<str>) {
        let mut t = tracker();
        let ch: Arc<str> = "h:1".into();
        t.created(&ch);
        let mut out = Vec::new();
        t.subscribed(&ch, &mut out);
        let (gen, since) = read_of(&out);
        assert_eq!(since, None, "position only");
        let mut out = Vec::new();
        let empty = ReadResult {
            epoch: "e".into(),
            top,
            entries: Vec::new(),
        };
        t.read_done(&ch, gen, since, empty, &mut out);
        assert!(matches!(out[0], Action::Confirm { .. }));
        (t, ch)
    }

    #[test]
    fn live_in_order_duplicates_dropped_gap_repaired_once() {
        let (mut t, ch) = live_at(3);
        let mut out = Vec::new();
        t.live(&ch, live(4, "e"), &mut out);
        t.live(&ch, live(4, "e"), &mut out); // duplicate
        assert_eq!(forwarded(&out), [4]);
        let mut out = Vec::new();
        t.live(&ch, live(7, "e"), &mut out); // 5 and 6 lost on the way
        t.live(&ch, live(8, "e"), &mut out); // held while reading
        assert_eq!(forwarded(&out), Vec::<u64>::new());
        let (gen, since) = read_of(&out);
        assert_eq!(since, Some(4));
        let mut out = Vec::new();
        t.read_done(&ch, gen, since, result("e", 7, 5..=7), &mut out);
        assert_eq!(
            forwarded(&out),
            [5, 6, 7, 8],
            "repaired, then the held ones, once each"
        );
        assert_eq!(t.stats.repaired_publications.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn unrepairable_gap_and_new_epoch_tell_subscribers_to_recover() {
        let (mut t, ch) = live_at(3);
        let mut out = Vec::new();
        t.live(&ch, live(20, "e"), &mut out);
        let (gen, since) = read_of(&out);
        let mut out = Vec::new();
        t.read_done(&ch, gen, since, result("e", 20, 16..=20), &mut out);
        assert!(out.iter().any(|a| matches!(a, Action::Insufficient { .. })));
        assert_eq!(
            forwarded(&out),
            Vec::<u64>::new(),
            "20 is at the new position"
        );
        let mut out = Vec::new();
        t.live(&ch, live(21, "e"), &mut out);
        assert_eq!(forwarded(&out), [21]);
        let mut out = Vec::new();
        t.live(&ch, live(1, "f"), &mut out);
        assert!(matches!(out[0], Action::Insufficient { .. }));
        assert_eq!(forwarded(&out), [1]);
    }

    #[test]
    fn a_stream_behind_the_delivered_offset_gets_a_new_epoch() {
        // Delivered up to 10 under epoch "e"; the link goes down and, subscribed again on the
        // promoted replica, the stream ends at 7.
        let (mut t, ch) = live_at(10);
        let mut out = Vec::new();
        t.link_down(&mut out);
        t.link_up();
        let mut out = Vec::new();
        t.subscribed(&ch, &mut out);
        let (gen, since) = read_of(&out);
        assert_eq!(since, Some(10));
        let mut out = Vec::new();
        t.read_done(&ch, gen, since, result("e", 7, 3..=7), &mut out);
        assert!(out.iter().any(|a| matches!(a, Action::Insufficient { .. })));
        let new = out
            .iter()
            .find_map(|a| match a {
                Action::NewEpoch {
                    old,
                    delivered,
                    new,
                    ..
                } => {
                    assert_eq!((&**old, *delivered), ("e", 10));
                    Some(new.clone())
                }
                _ => None,
            })
            .expect("a new epoch is asked for");
        assert_ne!(&*new, "e");
        // The next publication under the new epoch follows on without another recovery.
        let mut out = Vec::new();
        t.live(&ch, live(8, &new), &mut out);
        assert_eq!(forwarded(&out), [8]);
        assert!(!out.iter().any(|a| matches!(a, Action::Insufficient { .. })));
        // A lost stream under another epoch is not "behind": no new epoch asked for.
        let (mut t, ch) = live_at(10);
        let mut out = Vec::new();
        t.live(&ch, live(12, "e"), &mut out);
        let (gen, since) = read_of(&out);
        let mut out = Vec::new();
        t.read_done(&ch, gen, since, result("f", 2, 1..=2), &mut out);
        assert!(!out.iter().any(|a| matches!(a, Action::NewEpoch { .. })));
    }

    #[test]
    fn position_answers_are_exact_and_recoveries_coalesce() {
        let (mut t, ch) = live_at(10);
        let req = |token, since: Option<StreamPos>| PosReq {
            shard: 0,
            token,
            since,
        };
        let mut out = Vec::new();
        t.position(&ch, req(1, None), &mut out);
        t.position(&ch, req(2, Some(pos(10, "e"))), &mut out);
        t.position(&ch, req(3, Some(pos(9, "x"))), &mut out);
        t.position(&ch, req(4, Some(pos(2, "e"))), &mut out); // outside the window of 5
        assert_eq!(
            answers(&out),
            [
                (1, false, 10, 0),
                (2, true, 10, 0),
                (3, false, 10, 0),
                (4, false, 10, 0)
            ]
        );
        // Two recoveries needing the stream: one read serves both (and later ones).
        let mut out = Vec::new();
        t.position(&ch, req(5, Some(pos(7, "e"))), &mut out);
        t.position(&ch, req(6, Some(pos(6, "e"))), &mut out);
        let reads = out
            .iter()
            .filter(|a| matches!(a, Action::Read { .. }))
            .count();
        assert_eq!(reads, 1);
        let (gen, since) = read_of(&out);
        assert_eq!(since, Some(7), "the read started before 6 arrived");
        let mut out = Vec::new();
        t.live(&ch, live(11, "e"), &mut out); // held during the read
        t.read_done(&ch, gen, since, result("e", 10, 8..=10), &mut out);
        assert_eq!(answers(&out), [(5, true, 10, 3)]);
        let (gen, since) = read_of(&out);
        assert_eq!(since, Some(6), "6 needs another read, 11 stays held");
        assert_eq!(forwarded(&out), Vec::<u64>::new());
        let mut out = Vec::new();
        t.read_done(&ch, gen, since, result("e", 10, 7..=10), &mut out);
        assert_eq!(answers(&out), [(6, true, 10, 4)]);
        assert_eq!(forwarded(&out), [11], "after every answer at 10");
        // From the cache now: no read.
        let mut out = Vec::new();
        t.position(&ch, req(7, Some(pos(8, "e"))), &mut out);
        assert_eq!(answers(&out), [(7, true, 11, 3)]);
        assert_eq!(t.stats.recoveries_from_cache.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_client_ahead_of_this_node_is_served_after_a_read() {
        // The client saw 12 on a node that is ahead; this one has forwarded up to 10.
        let (mut t, ch) = live_at(10);
        let mut out = Vec::new();
        let r = |token, offset| PosReq {
            shard: 0,
            token,
            since: Some(pos(offset, "e")),
        };
        t.position(&ch, r(1, 12), &mut out);
        assert_eq!(answers(&out), [], "not denied: read first");
        let (gen, since) = read_of(&out);
        assert_eq!(since, Some(10));
        let mut out = Vec::new();
        t.live(&ch, live(11, "e"), &mut out); // held during the read
        t.read_done(&ch, gen, since, result("e", 13, 11..=13), &mut out);
        assert_eq!(
            answers(&out),
            [(1, true, 13, 1)],
            "13 only: 11 and 12 it had"
        );
        assert_eq!(
            forwarded(&out),
            [11, 12, 13],
            "the node catches up, each once"
        );
        // A client claiming an offset the stream never had is told so after the read.
        let mut out = Vec::new();
        t.position(&ch, r(2, 40), &mut out);
        let (gen, since) = read_of(&out);
        let mut out = Vec::new();
        t.read_done(&ch, gen, since, result("e", 13, 9..=13), &mut out);
        assert_eq!(answers(&out), [(2, false, 13, 0)]);
    }

    #[test]
    fn a_stream_lacking_the_range_answers_unrecovered() {
        let (mut t, ch) = live_at(10);
        let mut out = Vec::new();
        let r = PosReq {
            shard: 1,
            token: 9,
            since: Some(pos(6, "e")),
        };
        t.position(&ch, r, &mut out);
        let (gen, since) = read_of(&out);
        let mut out = Vec::new();
        t.read_done(&ch, gen, since, result("e", 10, 9..=10), &mut out); // expired entries
        assert_eq!(answers(&out), [(9, false, 10, 0)]);
    }

    #[test]
    fn link_down_fails_waiters_and_reconnect_repairs() {
        let (mut t, ch) = live_at(5);
        let mut out = Vec::new();
        t.position(
            &ch,
            PosReq {
                shard: 0,
                token: 1,
                since: Some(pos(1, "e")),
            },
            &mut out,
        );
        let (old_gen, _) = read_of(&out);
        let mut out = Vec::new();
        t.link_down(&mut out);
        assert!(matches!(
            out[0],
            Action::Answer {
                answer: Err(BrokerError::Unavailable),
                ..
            }
        ));
        // While the link is down a new request fails at once (the SDK retries).
        let mut out = Vec::new();
        let req = PosReq {
            shard: 0,
            token: 2,
            since: None,
        };
        t.position(&ch, req, &mut out);
        assert!(matches!(
            out[0],
            Action::Answer {
                token: 2,
                answer: Err(BrokerError::Unavailable),
                ..
            }
        ));
        let mut out = Vec::new();
        t.link_up();
        t.live(&ch, live(9, "e"), &mut out); // cannot happen before SUBSCRIBE, but is held
        t.subscribed(&ch, &mut out);
        let (gen, since) = read_of(&out);
        assert_ne!(gen, old_gen);
        assert_eq!(since, Some(5));
        let mut stale = Vec::new();
        t.read_done(&ch, old_gen, Some(1), result("e", 9, 2..=9), &mut stale);
        assert!(stale.is_empty(), "a read from the old link is ignored");
        let mut out = Vec::new();
        t.read_done(&ch, gen, since, result("e", 9, 6..=9), &mut out);
        assert_eq!(forwarded(&out), [6, 7, 8, 9]);
    }

    #[test]
    fn caches_share_one_byte_budget() {
        let cfg = CFG.replace(
            "max_held_publications = 4\n",
            "max_held_publications = 4\nrecovery_cache_max_bytes = 100\n",
        );
        let cfg = Config::from_toml(&cfg).unwrap();
        let mut t = Tracker::new(Arc::new(cfg), Arc::new(BusStats::default()));
        let ch: Arc<str> = "h:1".into();
        t.created(&ch);
        let mut out = Vec::new();
        t.subscribed(&ch, &mut out);
        let (gen, since) = read_of(&out);
        // Each publication object is ~25 bytes: 3 fit in 100, 5 do not.
        let mut out = Vec::new();
        t.read_done(&ch, gen, since, result("e", 3, 1..=3), &mut out);
        assert!(t.cache_bytes() > 0 && t.cache_bytes() <= 100);
        let mut out = Vec::new();
        t.live(&ch, live(4, "e"), &mut out);
        t.live(&ch, live(5, "e"), &mut out);
        assert_eq!(
            forwarded(&out),
            [4, 5],
            "delivery does not depend on the cache"
        );
        assert_eq!(t.cache_bytes(), 0, "over the budget: dropped");
        assert_eq!(t.stats.recovery_cache_full.load(Ordering::Relaxed), 1);
        t.removed(&ch, &mut Vec::new());
        assert_eq!(t.cache_bytes(), 0);
    }

    #[test]
    fn held_publications_are_bounded() {
        let (mut t, ch) = live_at(1);
        let mut out = Vec::new();
        t.live(&ch, live(3, "e"), &mut out); // gap: read starts
        for o in 4..=10 {
            t.live(&ch, live(o, "e"), &mut out);
        }
        assert!(t.stats.repair_overflows.load(Ordering::Relaxed) >= 1);
        let (gen, since) = read_of(&out);
        let mut out = Vec::new();
        t.read_done(&ch, gen, since, result("e", 3, 2..=3), &mut out);
        // 2 and 3 repaired; what survived the overflow shows a gap and reads again.
        assert_eq!(forwarded(&out)[..2], [2, 3]);
        assert!(out.iter().any(|a| matches!(a, Action::Read { .. })));
    }
}
