//! Standalone mode: the broker in process, on its own thread.
//!
//! One thread serialises every publication of the node, so subscribers on every shard see one
//! order per channel. It blocks on its inbox when idle (0% CPU) and drains in batches.

use super::Broker;
use crate::bus::{
    BrokerInbox, BrokerReply, BusStats, Part, Query, ReplyTo, ShardCommand, ShardLink, ToBroker,
    ToShard,
};
use crate::protocol::reply;
use crate::ws::{FrameBuf, OP_TEXT};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The in-process broker.
pub struct MemoryBroker {
    stats: Arc<BusStats>,
}

impl MemoryBroker {
    pub fn new(stats: Arc<BusStats>) -> Self {
        MemoryBroker { stats }
    }
}

/// A query waiting for the parts of every shard.
struct Gathering {
    reply: ReplyTo,
    remaining: usize,
    merged: Part,
}

struct State {
    shards: Vec<ShardLink>,
    /// Channel → mask of shards with local subscribers.
    interest: super::Interest<Arc<str>>,
    gathers: HashMap<u64, Gathering>,
    next_gather: u64,
    stats: Arc<BusStats>,
}

impl Broker for MemoryBroker {
    fn run(self: Box<Self>, inbox: BrokerInbox, shards: Vec<ShardLink>) {
        let inbox = inbox.rx;
        let mut state = State {
            shards,
            interest: Default::default(),
            gathers: HashMap::new(),
            next_gather: 1,
            stats: self.stats,
        };
        // Blocks while idle; returns when every shard has dropped its sender (shutdown).
        while let Ok(msg) = inbox.recv() {
            state.handle(msg);
        }
        tracing::debug!("memory broker stopped");
    }
}

impl State {
    fn handle(&mut self, msg: ToBroker) {
        match msg {
            ToBroker::Subscribe { shard, channel } => {
                self.interest.add(channel, shard);
            }
            ToBroker::Unsubscribe { shard, channel } => {
                self.interest.remove(&channel, shard);
            }
            ToBroker::Publish {
                channel,
                data,
                info,
                reply,
            } => {
                self.stats.publications.fetch_add(1, Ordering::Relaxed);
                let mask = self.interest.mask(&channel);
                if mask != 0 {
                    let mut frame = FrameBuf::with_capacity(channel.len() + data.get().len() + 48);
                    reply::publication(frame.payload(), &channel, &data, info.as_ref());
                    let frame = frame.finish(OP_TEXT);
                    super::send_to(&self.shards, mask, || ToShard::Publication {
                        channel: channel.clone(),
                        frame: frame.clone(),
                    });
                }
                self.reply(reply, BrokerReply::Published(Ok(())));
            }
            ToBroker::Gather {
                query: Query::Nodes,
                reply,
            } => self.reply(reply, BrokerReply::Gathered(Part::Nodes(Vec::new()))),
            ToBroker::Gather { query, reply } => {
                let id = self.next_gather;
                self.next_gather += 1;
                let merged = Part::empty_for(&query);
                self.gathers.insert(
                    id,
                    Gathering {
                        reply,
                        remaining: self.shards.len(),
                        merged,
                    },
                );
                super::scatter(&self.shards, id, &query);
            }
            ToBroker::Part { gather, part } => {
                let Some(g) = self.gathers.get_mut(&gather) else {
                    return;
                };
                merge(&mut g.merged, part);
                g.remaining -= 1;
                if g.remaining == 0 {
                    let g = self.gathers.remove(&gather).expect("present");
                    let merged = finish(g.merged);
                    self.reply(g.reply, BrokerReply::Gathered(merged));
                }
            }
            ToBroker::Command(cmd) => self.broadcast(cmd),
            // Standalone: presence is read from the shards and user commands go to every shard.
            ToBroker::PresenceAdd { .. }
            | ToBroker::Leave
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
        if let Some(link) = self.shards.get(to.shard) {
            link.send(ToShard::Reply {
                token: to.token,
                reply,
            });
        }
    }
}

/// Adds one shard's part to a gather.
pub(crate) fn merge(into: &mut Part, part: Part) {
    match (into, part) {
        (Part::Presence(a), Part::Presence(b)) => a.extend(b),
        (Part::Channels(a), Part::Channels(b)) => a.extend(b),
        (Part::PresenceAll(a), Part::PresenceAll(b)) => a.extend(b),
        (
            Part::Stats {
                connections,
                subscriptions,
                users,
                counters,
            },
            Part::Stats {
                connections: c,
                subscriptions: s,
                users: u,
                counters: k,
            },
        ) => {
            *connections += c;
            *subscriptions += s;
            users.extend(u);
            for (name, v) in k {
                match counters.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, sum)) => *sum += v,
                    None => counters.push((name, v)),
                }
            }
        }
        _ => tracing::error!("gather part of the wrong kind ignored"),
    }
}

/// Combines per-shard entries: channel counts summed by name, users deduplicated.
pub(crate) fn finish(part: Part) -> Part {
    match part {
        Part::Channels(list) => {
            let mut sums: HashMap<Arc<str>, u32> = HashMap::new();
            for (name, n) in list {
                *sums.entry(name).or_insert(0) += n;
            }
            Part::Channels(sums.into_iter().collect())
        }
        Part::Stats {
            connections,
            subscriptions,
            mut users,
            counters,
        } => {
            users.sort_unstable();
            users.dedup();
            Part::Stats {
                connections,
                subscriptions,
                users,
                counters,
            }
        }
        other => other,
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
        (
            State {
                shards: links,
                interest: Default::default(),
                gathers: HashMap::new(),
                next_gather: 1,
                stats,
            },
            inboxes,
        )
    }

    fn publish(s: &mut State, channel: &str, token: u64) {
        s.handle(ToBroker::Publish {
            channel: channel.into(),
            data: RawValue::from_string("{\"n\":1}".into()).unwrap(),
            info: None,
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
