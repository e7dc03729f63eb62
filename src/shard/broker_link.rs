//! The shard's sending side towards the broker: the bounded shards → broker queue, and a
//! bounded, ordered backlog for messages the broker must get.
//!
//! Shard thread only; it never blocks (the broker may itself be waiting on this shard's inbox,
//! so a shard that waited on the broker could deadlock the node). Ordinary messages
//! ([`BrokerLink::send`]) fail fast when the queue is full: the command that caused them gets a
//! temporary error. Must-deliver messages ([`BrokerLink::send_must`]: interest withdrawals,
//! presence and user-interest changes, gather parts) wait in order in the backlog, retried on
//! every inbox batch and every tick.
//!
//! Overflow policy of the backlog (`limits.broker_backlog_capacity` messages): a must-deliver
//! message that does not fit is **dropped and counted** (`broker_backlog_drops`, logged at
//! warn). Why not close the connection that caused it: most of these messages are the
//! consequences of a connection that is already ending (its last channel or presence entry
//! going away) or of no connection at all (a gather part), and closing more connections would
//! only queue more withdrawals. What a drop costs, all bounded: a lost interest withdrawal
//! leaves the broker sending that channel to this shard, which discards it (no local
//! subscriber) until the shard subscribes and leaves again; a lost presence or user-interest
//! change leaves the node's view stale until the presence TTL or lease runs out; a lost gather
//! part makes that one query time out with a temporary error.

use super::counters::{bump, Counters};
use crate::bus::{BrokerTx, ToBroker};
use crate::protocol::ErrorCode;
use crossbeam_channel::TrySendError;
use std::cell::RefCell;
use std::collections::VecDeque;

/// The shards → broker queue with this shard's must-deliver backlog.
pub struct BrokerLink {
    tx: BrokerTx,
    /// Must-deliver messages waiting for room in the queue, oldest first.
    backlog: RefCell<VecDeque<ToBroker>>,
    /// Most messages the backlog holds (`limits.broker_backlog_capacity`).
    capacity: usize,
}

impl BrokerLink {
    pub fn new(tx: BrokerTx, capacity: usize) -> BrokerLink {
        BrokerLink {
            tx,
            backlog: RefCell::default(),
            capacity,
        }
    }

    /// Sends to the broker without blocking; a full queue is counted and reported.
    ///
    /// While must-deliver messages wait in the backlog, later messages may not overtake them
    /// (an overtaking Subscribe could be undone by an older Unsubscribe), so they are refused
    /// too.
    pub fn send(&self, msg: ToBroker, counters: &Counters) -> Result<(), ErrorCode> {
        if !self.backlog.borrow().is_empty() {
            self.flush_backlog();
            if !self.backlog.borrow().is_empty() {
                bump(&counters.broker_queue_full);
                return Err(ErrorCode::Internal);
            }
        }
        match self.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                bump(&counters.broker_queue_full);
                Err(ErrorCode::Internal)
            }
            Err(TrySendError::Disconnected(_)) => Err(ErrorCode::Internal),
        }
    }

    /// Sends a message the broker must get: at once when the queue has room and nothing waits
    /// before it, else at the end of the backlog, else (backlog full) dropped and counted.
    pub fn send_must(&self, msg: ToBroker, counters: &Counters) {
        let mut backlog = self.backlog.borrow_mut();
        let msg = if backlog.is_empty() {
            match self.tx.try_send(msg) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => return,
                Err(TrySendError::Full(m)) => {
                    bump(&counters.broker_queue_full);
                    m
                }
            }
        } else {
            msg
        };
        if backlog.len() < self.capacity {
            backlog.push_back(msg);
            return;
        }
        bump(&counters.broker_backlog_drops);
        let drops = counters.broker_backlog_drops.get();
        if drops.is_power_of_two() {
            tracing::warn!(
                drops,
                capacity = self.capacity,
                "broker backlog full: must-deliver message dropped (limits.broker_backlog_capacity)"
            );
        }
    }

    /// Retries the must-deliver backlog in order.
    pub fn flush_backlog(&self) {
        let mut backlog = self.backlog.borrow_mut();
        while let Some(msg) = backlog.pop_front() {
            match self.tx.try_send(msg) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(m)) => {
                    backlog.push_front(m);
                    return;
                }
            }
        }
    }

    /// Messages waiting in the backlog.
    pub fn backlog_len(&self) -> usize {
        self.backlog.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsub(ch: &str) -> ToBroker {
        ToBroker::Unsubscribe {
            shard: 0,
            channel: ch.into(),
        }
    }

    #[test]
    fn a_full_backlog_drops_and_counts_keeping_the_order_of_the_rest() {
        let (tx, inbox) = crate::bus::broker_queue(1, false).unwrap();
        let link = BrokerLink::new(tx, 2);
        let counters = Counters::default();
        for ch in ["a", "b", "c", "d"] {
            link.send_must(unsub(ch), &counters);
        }
        // "a" in the queue, "b" and "c" in the backlog, "d" dropped.
        assert_eq!(link.backlog_len(), 2);
        assert_eq!(counters.broker_backlog_drops.get(), 1);
        let mut got = Vec::new();
        for _ in 0..3 {
            match inbox.rx.try_recv().unwrap() {
                ToBroker::Unsubscribe { channel, .. } => got.push(channel.to_string()),
                other => panic!("{other:?}"),
            }
            link.flush_backlog();
        }
        assert_eq!(got, ["a", "b", "c"]);
        assert!(
            inbox.rx.try_recv().is_err(),
            "the dropped one never arrives"
        );
        assert_eq!(link.backlog_len(), 0);
    }
}
