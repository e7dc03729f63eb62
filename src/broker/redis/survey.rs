//! Cluster-wide `/api/channels` in Redis mode: a survey over pub/sub, as Centrifugo answers it.
//!
//! Every node with at least one channel listens on `PREFIX:survey` (a node without channels has
//! nothing to add and holds no subscription for it). The asking node listens on
//! `PREFIX:survey:UID` while it has a survey open, gathers its own shards and, once that
//! subscription is confirmed, publishes the question on `PREFIX:survey`; PUBLISH's reply says
//! how many nodes heard it. Each of them gathers its shards and publishes its channel counts to
//! the asker (the asker hears its own question too when it listens, and counts it). The asker
//! sums the counts by channel and answers once its own part and every node that heard the
//! question answered. A node that dies meanwhile never answers: the call then fails with the
//! shard's request timeout (`limits.broker_reply_timeout_ms`). Surveys open at once are bounded
//! (`redis_options.max_pending_surveys`); the lease loop forgets those older than the request
//! timeout, and the asker stops listening when none is open.
//!
//! Runs on the multiplexer's thread; no borrow is held across a call that may answer a shard.

use super::mux::{GatherTarget, Mux};
use super::replies::Waiter;
use super::resp::Command;
use crate::bus::{BrokerError, BrokerReply, Part, Query, ReplyTo};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
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
    pattern: Option<Arc<str>>,
    /// The question is published (or being published).
    asked: bool,
    /// Nodes that heard the question (PUBLISH's reply), once known.
    expected: Option<u64>,
    /// Answers received, plus our own question heard back.
    heard: u64,
    local_done: bool,
    counts: HashMap<Arc<str>, u32>,
}

/// Whether this node listens on its answers channel.
#[derive(Default, PartialEq, Eq)]
enum Listening {
    #[default]
    Off,
    /// SUBSCRIBE sent, confirmation awaited.
    Requested,
    On,
}

/// The surveys this node is waiting on.
#[derive(Default)]
pub(super) struct Surveys {
    pending: HashMap<u64, Survey>,
    next: u64,
    listening: Listening,
    /// SUBSCRIBEs of the answers channel not confirmed yet (an old one may still come back
    /// after an UNSUBSCRIBE: only the last one counts).
    subscribes_in_flight: u32,
}

impl Mux {
    /// `/api/channels` in Redis mode: this node's shards and every node that hears the question.
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
        let (id, was_off, on) = {
            let mut s = self.surveys.borrow_mut();
            s.next += 1;
            let id = s.next;
            s.pending.insert(
                id,
                Survey {
                    reply,
                    started: Instant::now(),
                    pattern: pattern.clone(),
                    asked: false,
                    expected: None,
                    heard: 0,
                    local_done: false,
                    counts: HashMap::new(),
                },
            );
            let was_off = s.listening == Listening::Off;
            if was_off {
                s.listening = Listening::Requested;
                s.subscribes_in_flight += 1;
            }
            (id, was_off, s.listening == Listening::On)
        };
        if was_off {
            self.survey_listen(true);
        } else if on {
            self.survey_ask(id);
        }
        self.gather(Query::Channels(pattern), GatherTarget::Survey(id));
    }

    /// Starts or stops listening on this node's answers channel.
    fn survey_listen(&self, on: bool) {
        let key = self.keys.survey_answers(&self.node.uid);
        if !self.sub_up_at(&key) {
            return;
        }
        let verb = self.verb(if on { b"SUBSCRIBE" } else { b"UNSUBSCRIBE" });
        self.sub_command(|out| {
            Command::new(out, 2).arg(verb).arg(&key);
        });
    }

    /// Starts or stops listening for other nodes' questions (while the node has channels).
    /// Queued past `max_write_queue_bytes` if need be: one short command that comes with a
    /// channel's own SUBSCRIBE or UNSUBSCRIBE (whose bound resets a congested connection).
    pub(super) fn survey_questions(&self, on: bool) {
        let Some(link) = self.link_of_key(self.keys.survey()) else {
            return;
        };
        if !link.sub.borrow().is_up() {
            return;
        }
        let verb = self.verb(if on { b"SUBSCRIBE" } else { b"UNSUBSCRIBE" });
        link.sub.borrow_mut().push_unbounded(|out| {
            Command::new(out, 2).arg(verb).arg(self.keys.survey());
        });
    }

    /// A SUBSCRIBE of `name` was confirmed: true when it was this node's answers channel.
    pub(super) fn survey_subscribed(&self, name: &[u8]) -> bool {
        if name != &self.keys.survey_answers(&self.node.uid)[..] {
            return false;
        }
        let ask: Vec<u64> = {
            let mut s = self.surveys.borrow_mut();
            s.subscribes_in_flight = s.subscribes_in_flight.saturating_sub(1);
            if s.listening != Listening::Requested || s.subscribes_in_flight > 0 {
                return true;
            }
            s.listening = Listening::On;
            s.pending
                .iter()
                .filter(|(_, v)| !v.asked)
                .map(|(id, _)| *id)
                .collect()
        };
        for id in ask {
            self.survey_ask(id);
        }
        self.flush();
        true
    }

    /// Publishes survey `id`'s question; PUBLISH's reply says how many nodes heard it.
    fn survey_ask(&self, id: u64) {
        let pattern = {
            let mut s = self.surveys.borrow_mut();
            let Some(v) = s.pending.get_mut(&id) else {
                return;
            };
            v.asked = true;
            v.pattern.clone()
        };
        let question = Question {
            id,
            from: self.node.uid.clone(),
            pattern: pattern.as_deref().map(str::to_string),
        };
        let body = serde_json::to_vec(&question).expect("question");
        self.command(Waiter::SurveyAsked(id), |out| {
            Command::new(out, 3)
                .arg(self.verb(b"PUBLISH"))
                .arg(self.keys.survey())
                .arg(&body);
        });
    }

    /// PUBLISH's reply to survey `id`'s question: how many nodes heard it (`None`: it failed).
    pub(super) fn survey_asked(&self, id: u64, heard_by: Option<u64>) {
        match heard_by {
            Some(n) => {
                if let Some(v) = self.surveys.borrow_mut().pending.get_mut(&id) {
                    v.expected = Some(n);
                }
                self.survey_maybe_done(id);
            }
            None => {
                let failed = self.surveys.borrow_mut().pending.remove(&id);
                if let Some(v) = failed {
                    self.reply(v.reply, BrokerReply::Failed(BrokerError::Unavailable));
                }
                self.survey_quiet();
            }
        }
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
                    Command::new(out, 3)
                        .arg(self.verb(b"PUBLISH"))
                        .arg(&key)
                        .arg(&body);
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
                if q.from == self.node.uid {
                    // Our own question, counted in PUBLISH's reply.
                    if let Some(v) = self.surveys.borrow_mut().pending.get_mut(&q.id) {
                        v.heard += 1;
                    }
                    self.survey_maybe_done(q.id);
                } else {
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
                    s.heard += 1;
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
                Some(v) if v.local_done && v.expected.is_some_and(|e| v.heard >= e) => {
                    s.pending.remove(&id)
                }
                _ => None,
            }
        };
        if let Some(v) = done {
            let list = v.counts.into_iter().collect();
            self.reply(v.reply, BrokerReply::Gathered(Part::Channels(list)));
            self.survey_quiet();
        }
    }

    /// No survey open: stop listening for answers.
    fn survey_quiet(&self) {
        let stop = {
            let mut s = self.surveys.borrow_mut();
            let stop = s.pending.is_empty() && s.listening != Listening::Off;
            if stop {
                s.listening = Listening::Off;
            }
            stop
        };
        if stop {
            self.survey_listen(false);
            self.flush();
        }
    }

    /// Forgets surveys older than the shards' request timeout (their callers gave up).
    pub(super) fn sweep_surveys(&self, now: Instant) {
        let max = Duration::from_millis(self.cfg.limits.broker_reply_timeout_ms as u64);
        (self.surveys.borrow_mut().pending).retain(|_, s| now.duration_since(s.started) <= max);
        self.survey_quiet();
    }

    /// The subscriber connection is gone: open surveys fail (temporary error).
    pub(super) fn surveys_down(&self) {
        let failed: Vec<Survey> = {
            let mut s = self.surveys.borrow_mut();
            s.listening = Listening::Off;
            s.subscribes_in_flight = 0;
            s.pending.drain().map(|(_, v)| v).collect()
        };
        for v in failed {
            self.reply(v.reply, BrokerReply::Failed(BrokerError::Unavailable));
        }
    }
}

fn add(counts: &mut HashMap<Arc<str>, u32>, list: impl Iterator<Item = (Arc<str>, u32)>) {
    for (channel, n) in list {
        *counts.entry(channel).or_insert(0) += n;
    }
}
