//! Gathers: a query scattered to every shard of the node, its parts merged into one answer.
//!
//! Shared by both brokers and run on the broker thread. A gather waits for one part per shard
//! (the shards always answer a `Collect`, possibly with an empty part), merges each part as it
//! comes and hands the merged answer back with whatever the caller attached to it (a reply
//! address, or the multiplexer's own use). No I/O beyond the scatter itself.

use crate::bus::{Part, Query, ShardLink};
use std::collections::HashMap;
use std::sync::Arc;

/// A query waiting for the parts of every shard.
struct Gathering<T> {
    target: T,
    remaining: usize,
    merged: Part,
}

/// The gathers in flight, by id; `T` is what a finished gather is for.
pub(crate) struct Gathers<T> {
    pending: HashMap<u64, Gathering<T>>,
    next: u64,
}

impl<T> Default for Gathers<T> {
    fn default() -> Self {
        Gathers {
            pending: HashMap::new(),
            next: 1,
        }
    }
}

impl<T> Gathers<T> {
    /// Asks every shard for its part of `query`, for `target`.
    pub fn start(&mut self, query: &Query, target: T, shards: &[ShardLink]) {
        let id = self.next;
        self.next += 1;
        self.pending.insert(
            id,
            Gathering {
                target,
                remaining: shards.len(),
                merged: Part::empty_for(query),
            },
        );
        super::scatter(shards, id, query);
    }

    /// Adds one shard's part; the merged answer and its target once every shard answered.
    pub fn part(&mut self, id: u64, part: Part) -> Option<(T, Part)> {
        let g = self.pending.get_mut(&id)?;
        merge(&mut g.merged, part);
        g.remaining -= 1;
        if g.remaining > 0 {
            return None;
        }
        let g = self.pending.remove(&id).expect("present");
        Some((g.target, finish(g.merged)))
    }

    /// Gathers waiting for parts.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pending.len()
    }
}

/// Adds one shard's part to a gather.
fn merge(into: &mut Part, part: Part) {
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
fn finish(part: Part) -> Part {
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
    use crate::bus::{shard_link, BusStats, ToShard};

    #[test]
    fn stats_are_summed_and_users_deduplicated_once_every_shard_answered() {
        let stats = Arc::new(BusStats::default());
        let (links, inboxes): (Vec<_>, Vec<_>) = (0..2)
            .map(|_| shard_link(4, stats.clone()).unwrap())
            .unzip();
        let mut g = Gathers::<&str>::default();
        g.start(&Query::Stats, "lease", &links);
        let id = match inboxes[1].rx.try_recv().unwrap() {
            ToShard::Collect { gather, .. } => gather,
            other => panic!("{other:?}"),
        };
        let part = |c, users: &[&str], k| Part::Stats {
            connections: c,
            subscriptions: c * 2,
            users: users.iter().map(|u| Arc::from(*u)).collect(),
            counters: vec![("x", k)],
        };
        assert!(g.part(id, part(1, &["a", "b"], 5)).is_none());
        assert_eq!(g.len(), 1);
        let (target, merged) = g.part(id, part(2, &["b"], 7)).expect("complete");
        assert_eq!(target, "lease");
        match merged {
            Part::Stats {
                connections,
                subscriptions,
                users,
                counters,
            } => {
                assert_eq!((connections, subscriptions), (3, 6));
                assert_eq!(users, vec![Arc::from("a"), Arc::from("b")]);
                assert_eq!(counters, vec![("x", 12)]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(g.len(), 0);
        assert!(
            g.part(id, part(1, &[], 0)).is_none(),
            "late parts are ignored"
        );
    }
}
