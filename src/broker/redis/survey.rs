//! Cluster-wide `/api/channels` in Redis mode: a survey over pub/sub, as Centrifugo answers it.
//!
//! The asking node reads the registry's live nodes, gathers its own shards and publishes the
//! question on `PREFIX:survey`; every other node gathers its shards and publishes its channel
//! counts on `PREFIX:survey:ASKER`; the asker sums them by channel and answers once its own
//! part and every other live node of the registry answered. A node that died but whose lease has not lapsed yet
//! never answers: the call then fails with the shard's request timeout
//! (`limits.broker_reply_timeout_ms`) until the lease lapses. Every node subscribes both
//! channels whenever its subscriber connection comes up. Surveys waiting are bounded
//! (`redis_options.max_pending_surveys`) and swept by the lease loop once older than the
//! request timeout.
//!
//! Runs on the multiplexer's thread; no borrow is held across a call that may answer a shard.

use super::mux::{GatherTarget, Mux};
use super::replies::Waiter;
use super::resp::Command;
use crate::bus::{BrokerError, BrokerReply, Part, Query, ReplyTo};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A question on `PREFIX:survey`.
#[derive(Serialize, Deserialize)]
struct Question {
    id: u64,
    from: String,
    #[serde(default)]
    pattern: Option<String>,
}

/// A node's answer on `PREFIX:survey:ASKER`.
#[derive(Serialize, Deserialize)]
struct Answer {
    id: u64,
    uid: String,
    channels: Vec<(String, u32)>,
}

/// One `/api/channels` call waiting for the cluster.
struct Survey {
    reply: ReplyTo,
    started: Instant,
    /// Nodes of the registry that have not answered yet (`None` until the registry is read).
    waiting_for: Option<HashSet<String>>,
    pattern: Option<Arc<str>>,
    local_done: bool,
    counts: HashMap<Arc<str>, u32>,
}

/// The surveys this node is waiting on.
#[derive(Default)]
pub(super) struct Surveys {
    pending: HashMap<u64, Survey>,
    next: u64,
}

impl Mux {
    /// `/api/channels` in Redis mode: this node's shards and every other node of the registry.
    pub(super) fn survey_channels(&self, pattern: Option<Arc<str>>, reply: ReplyTo) {
        if !self.is_up() || !self.sub_up() {
            self.reply(reply, BrokerReply::Failed(BrokerError::Unavailable));
            return;
        }
        if self.surveys.borrow().pending.len() >= self.cfg.redis_options.max_pending_surveys {
            self.stats.surveys_refused.fetch_add(1, Ordering::Relaxed);
            self.reply(reply, BrokerReply::Failed(BrokerError::Unavailable));
            return;
        }
        let id = {
            let mut s = self.surveys.borrow_mut();
            s.next += 1;
            let id = s.next;
            s.pending.insert(
                id,
                Survey {
                    reply,
                    started: Instant::now(),
                    waiting_for: None,
                    pattern: pattern.clone(),
                    local_done: false,
                    counts: HashMap::new(),
                },
            );
            id
        };
        self.eval_nodes(Waiter::SurveyNodes(id));
        self.gather(Query::Channels(pattern), GatherTarget::Survey(id));
    }

    /// The registry's live nodes for survey `id` (`None`: Redis could not say): the question
    /// goes to the others.
    pub(super) fn survey_nodes(&self, id: u64, nodes: Option<Vec<serde_json::Value>>) {
        let Some(nodes) = nodes else {
            if let Some(s) = self.surveys.borrow_mut().pending.remove(&id) {
                self.reply(s.reply, BrokerReply::Failed(BrokerError::Unavailable));
            }
            return;
        };
        let others: HashSet<String> = nodes
            .iter()
            .filter_map(|n| n["uid"].as_str().map(str::to_string))
            .filter(|uid| *uid != self.node.uid)
            .collect();
        let pattern = {
            let mut s = self.surveys.borrow_mut();
            let Some(survey) = s.pending.get_mut(&id) else {
                return;
            };
            survey.waiting_for = Some(others.clone());
            survey.pattern.clone()
        };
        if !others.is_empty() {
            let question = Question {
                id,
                from: self.node.uid.clone(),
                pattern: pattern.as_deref().map(str::to_string),
            };
            let body = serde_json::to_vec(&question).expect("question");
            self.command(Waiter::Ignore, |out| {
                Command::new(out, 3)
                    .arg(b"PUBLISH")
                    .arg(self.keys.survey())
                    .arg(&body);
            });
            self.flush();
        }
        self.survey_maybe_done(id);
    }

    /// This node's shards answered survey `id` (ours, or another node's question).
    pub(super) fn survey_part(&self, target: GatherTarget, part: Part) {
        let Part::Channels(list) = part else {
            return;
        };
        match target {
            GatherTarget::Survey(id) => {
                if let Some(s) = self.surveys.borrow_mut().pending.get_mut(&id) {
                    s.local_done = true;
                    add(&mut s.counts, list.into_iter());
                }
                self.survey_maybe_done(id);
            }
            GatherTarget::SurveyAnswer { id, to } => {
                let answer = Answer {
                    id,
                    uid: self.node.uid.clone(),
                    channels: list.into_iter().map(|(c, n)| (c.to_string(), n)).collect(),
                };
                let body = serde_json::to_vec(&answer).expect("answer");
                let key = self.keys.survey_answers(&to);
                self.command(Waiter::Ignore, |out| {
                    Command::new(out, 3).arg(b"PUBLISH").arg(&key).arg(&body);
                });
                self.flush();
            }
            _ => {}
        }
    }

    /// A message on `name` if it is a survey channel: true when it was one.
    pub(super) fn survey_message(&self, name: &[u8], payload: &[u8]) -> bool {
        if name == self.keys.survey() {
            if let Ok(q) = serde_json::from_slice::<Question>(payload) {
                if q.from != self.node.uid {
                    let target = GatherTarget::SurveyAnswer {
                        id: q.id,
                        to: Arc::from(q.from),
                    };
                    self.gather(Query::Channels(q.pattern.map(Arc::from)), target);
                }
            }
            return true;
        }
        if name == &self.keys.survey_answers(&self.node.uid)[..] {
            if let Ok(a) = serde_json::from_slice::<Answer>(payload) {
                if let Some(s) = self.surveys.borrow_mut().pending.get_mut(&a.id) {
                    if let Some(w) = s.waiting_for.as_mut() {
                        w.remove(&a.uid);
                    }
                    add(
                        &mut s.counts,
                        a.channels.into_iter().map(|(c, n)| (Arc::from(c), n)),
                    );
                }
                self.survey_maybe_done(a.id);
            }
            return true;
        }
        false
    }

    fn survey_maybe_done(&self, id: u64) {
        let done = {
            let mut s = self.surveys.borrow_mut();
            match s.pending.get(&id) {
                Some(v) if v.local_done && v.waiting_for.as_ref().is_some_and(|w| w.is_empty()) => {
                    s.pending.remove(&id)
                }
                _ => None,
            }
        };
        if let Some(v) = done {
            let list = v.counts.into_iter().collect();
            self.reply(v.reply, BrokerReply::Gathered(Part::Channels(list)));
        }
    }

    /// Forgets surveys older than the shards' request timeout (their callers gave up).
    pub(super) fn sweep_surveys(&self, now: Instant) {
        let max = Duration::from_millis(self.cfg.limits.broker_reply_timeout_ms as u64);
        (self.surveys.borrow_mut().pending).retain(|_, s| now.duration_since(s.started) <= max);
    }
}

fn add(counts: &mut HashMap<Arc<str>, u32>, list: impl Iterator<Item = (Arc<str>, u32)>) {
    for (channel, n) in list {
        *counts.entry(channel).or_insert(0) += n;
    }
}
