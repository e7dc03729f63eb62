//! A shard's counters: plain cells bumped on the hot path by the shard thread only, published
//! once a second as a [`crate::bus::ShardSnapshot`] and summed over shards for `/api/info`.
//!
//! Every counter is here, under the name it has in `/api/info` and `/metrics`
//! ([`Counters::snapshot`]); add one by adding a field and its line in the snapshot.

use super::reason::{self, Reason, SLOTS};
use std::cell::Cell;

/// Per-shard counters (plain cells: one thread).
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: Cell<u64>,
    pub ws_opened: Cell<u64>,
    pub http_requests: Cell<u64>,
    /// Connections closed because their outbox passed `limits.max_outbox_bytes`.
    pub slow_disconnects: Cell<u64>,
    /// Connections closed for not answering pings.
    pub no_pong_disconnects: Cell<u64>,
    /// WebSocket protocol violations (closed with 1002/1007/1009).
    pub protocol_violations: Cell<u64>,
    /// Upgrades refused with 503 because the node was full.
    pub refused_full: Cell<u64>,
    /// Commands refused because the broker queue was full.
    pub broker_queue_full: Cell<u64>,
    /// Must-deliver messages dropped because the shard's broker backlog was full
    /// (`limits.broker_backlog_capacity`).
    pub broker_backlog_drops: Cell<u64>,
    /// Frames queued to connections by fan-out.
    pub deliveries: Cell<u64>,
    /// Commands refused by the per-connection rate limit (error 111).
    pub rate_limited: Cell<u64>,
    /// Subscribes refused by `limits.max_channels_per_connection` (error 106).
    pub channel_limit_refusals: Cell<u64>,
    /// Subscribes refused by `limits.max_channel_name_bytes` (error 107).
    pub channel_name_refusals: Cell<u64>,
    /// WebSocket messages received from clients.
    pub messages_in: Cell<u64>,
    /// Bytes written to WebSocket clients.
    pub bytes_out: Cell<u64>,
    /// Sends completed to WebSocket clients (each carries every frame queued at the time).
    pub writes: Cell<u64>,
    /// Multishot receives ended because the shard's receive buffers were all in use (ENOBUFS);
    /// each was re-armed once buffers were handed back, nothing lost (`ring.recv_buffers`).
    pub recv_buffer_exhausted: Cell<u64>,
    /// Sends the socket took only part of (its buffer was full); the rest followed at once and
    /// waited in the kernel until the socket had room.
    pub partial_writes: Cell<u64>,
    /// Subscribes that recovered everything the client missed.
    pub recoveries: Cell<u64>,
    /// Subscribes that asked to recover and could not (`recovered: false` or error 112).
    pub recoveries_failed: Cell<u64>,
    /// Subscribers told to recover (unsubscribe 2500, or close 3010 with
    /// `insufficient_state = "disconnect"`).
    pub insufficient_unsubscribes: Cell<u64>,
    /// Subscriptions ended because their token expired without a `sub_refresh` (push 2501).
    pub sub_expired_unsubscribes: Cell<u64>,
    /// HTTP requests cut with 408: head and body not complete within
    /// `limits.handshake_timeout_secs`.
    pub request_timeouts: Cell<u64>,
    /// WebSocket upgrades refused with 403: an `Origin` neither the request's host nor in
    /// `allowed_origins`.
    pub origin_refusals: Cell<u64>,
    /// HTTP API requests found whole behind another in one read (pipelined on a keep-alive
    /// connection) and started together with it (`limits.max_pipelined_requests`).
    pub api_pipelined: Cell<u64>,
    /// Join and leave messages sent towards the broker (`join_leave` namespaces).
    pub join_leave_sent: Cell<u64>,
    /// Join and leave messages dropped because the broker queue was full (best effort, as in
    /// Centrifugo: never retried, never blocking the subscribe or unsubscribe).
    pub join_leave_dropped: Cell<u64>,
    /// Join and leave pushes queued to subscribers.
    pub join_leave_deliveries: Cell<u64>,
    /// Protobuf connections closed with 3501 for a text frame or a malformed command frame.
    pub protobuf_malformed: Cell<u64>,
    /// JSON frames transcoded to protobuf on the shard: a shared frame that came without its
    /// protobuf twin (once per shard per frame), or a frame built for one connection.
    pub protobuf_transcodes: Cell<u64>,
    /// `/emulation` POSTs accepted and handed over (answered 204).
    pub emulation_requests: Cell<u64>,
    /// `/emulation` POSTs refused: bad body (400), unknown node (404), too large (413),
    /// origin (403), broker queue full or Redis down (503).
    pub emulation_refused: Cell<u64>,
    /// Emulation requests that reached their shard for no live emulated connection (the
    /// stream ended, or the id is not one this shard gave): dropped.
    pub emulation_unknown_sessions: Cell<u64>,
    /// WebSocket connections ended, by [`Reason`] (`ended_<label>`, one slot per label).
    ended: [Cell<u64>; SLOTS],
}

impl Counters {
    /// Counts a connection's end.
    pub fn ended(&self, reason: Reason) {
        bump(&self.ended[reason.slot()]);
    }

    /// Connections ended for `reason`'s label so far.
    pub fn ended_count(&self, reason: Reason) -> u64 {
        self.ended[reason.slot()].get()
    }

    /// Name → value, for `/api/info` and the metrics snapshot.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let mut all = vec![
            ("accepted", self.accepted.get()),
            ("ws_opened", self.ws_opened.get()),
            ("http_requests", self.http_requests.get()),
            ("slow_disconnects", self.slow_disconnects.get()),
            ("no_pong_disconnects", self.no_pong_disconnects.get()),
            ("protocol_violations", self.protocol_violations.get()),
            ("refused_full", self.refused_full.get()),
            ("broker_queue_full", self.broker_queue_full.get()),
            ("broker_backlog_drops", self.broker_backlog_drops.get()),
            ("deliveries", self.deliveries.get()),
            ("rate_limited", self.rate_limited.get()),
            ("channel_limit_refusals", self.channel_limit_refusals.get()),
            ("channel_name_refusals", self.channel_name_refusals.get()),
            ("messages_in", self.messages_in.get()),
            ("bytes_out", self.bytes_out.get()),
            ("writes", self.writes.get()),
            ("recv_buffer_exhausted", self.recv_buffer_exhausted.get()),
            ("partial_writes", self.partial_writes.get()),
            ("recoveries", self.recoveries.get()),
            ("recoveries_failed", self.recoveries_failed.get()),
            (
                "insufficient_unsubscribes",
                self.insufficient_unsubscribes.get(),
            ),
            (
                "sub_expired_unsubscribes",
                self.sub_expired_unsubscribes.get(),
            ),
            ("request_timeouts", self.request_timeouts.get()),
            ("origin_refusals", self.origin_refusals.get()),
            ("api_pipelined", self.api_pipelined.get()),
            ("join_leave_sent", self.join_leave_sent.get()),
            ("join_leave_dropped", self.join_leave_dropped.get()),
            ("join_leave_deliveries", self.join_leave_deliveries.get()),
            ("protobuf_malformed", self.protobuf_malformed.get()),
            ("protobuf_transcodes", self.protobuf_transcodes.get()),
            ("emulation_requests", self.emulation_requests.get()),
            ("emulation_refused", self.emulation_refused.get()),
            (
                "emulation_unknown_sessions",
                self.emulation_unknown_sessions.get(),
            ),
        ];
        all.extend(
            reason::counter_names()
                .zip(&self.ended)
                .map(|(n, c)| (n, c.get())),
        );
        all
    }
}

/// Adds one to a counter.
pub fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}
