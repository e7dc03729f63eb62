//! Per-shard figures of the backend calls: for each [`ProxyKind`] a latency histogram with fixed
//! buckets and error counters by [`ErrorClass`], plus `proxy_overloaded` (calls refused by the
//! in-flight bound). Plain cells bumped by the shard thread only; the shard publishes
//! [`ProxyStats::snapshot`] once a second and the metrics listener sums the shards.

use super::http::CallError;
use crate::bus::{ProxyKindSnapshot, ProxySnapshot};
use std::cell::Cell;
use std::time::Duration;

pub use crate::protocol::proxy::ProxyKind;

/// Why a call failed, as counted (the `error` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The whole call took longer than its timeout.
    Timeout,
    /// No TCP connection (refused, unreachable).
    Connect,
    /// The TLS handshake failed (certificate not trusted, name mismatch, ...).
    Tls,
    /// The backend answered with a status outside 2xx.
    Status,
    /// The response body was over `max_response_bytes`.
    TooLarge,
    /// Anything else on the HTTP level (bad response, connection lost mid-way).
    Http,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 6] = [
        ErrorClass::Timeout,
        ErrorClass::Connect,
        ErrorClass::Tls,
        ErrorClass::Status,
        ErrorClass::TooLarge,
        ErrorClass::Http,
    ];

    pub fn label(self) -> &'static str {
        ERROR_LABELS[self as usize]
    }

    /// The class of a call's error; `None` for [`CallError::Overloaded`] (no call was made:
    /// `proxy_overloaded` counts it).
    pub fn of(e: &CallError) -> Option<ErrorClass> {
        Some(match e {
            CallError::Overloaded => return None,
            CallError::Timeout => ErrorClass::Timeout,
            CallError::Connect(_) => ErrorClass::Connect,
            CallError::Tls(_) => ErrorClass::Tls,
            CallError::Http(_) => ErrorClass::Http,
            CallError::TooLarge => ErrorClass::TooLarge,
        })
    }
}

const ERROR_LABELS: [&str; 6] = ["timeout", "connect", "tls", "status", "too_large", "http"];

/// Upper bounds of the latency buckets, milliseconds (a last bucket takes the rest).
pub const LATENCY_BUCKETS_MS: [u64; 11] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500];

/// The same bounds in seconds, as Prometheus histograms are labelled.
const LATENCY_BUCKETS_SECS: [f64; 11] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// `/api/info` counter names: per kind `proxy_<kind>_calls`, then `proxy_<kind>_errors_<class>`
/// in [`ErrorClass::ALL`] order.
macro_rules! counter_names {
    ($($k:literal),*) => {
        [$([
            concat!("proxy_", $k, "_calls"),
            concat!("proxy_", $k, "_errors_timeout"),
            concat!("proxy_", $k, "_errors_connect"),
            concat!("proxy_", $k, "_errors_tls"),
            concat!("proxy_", $k, "_errors_status"),
            concat!("proxy_", $k, "_errors_too_large"),
            concat!("proxy_", $k, "_errors_http"),
        ]),*]
    };
}
const COUNTER_NAMES: [[&str; 7]; 7] = counter_names!(
    "connect",
    "refresh",
    "subscribe",
    "publish",
    "sub_refresh",
    "rpc",
    "jwks"
);

/// One kind's cells.
#[derive(Debug, Default)]
struct KindCells {
    /// Calls per latency bucket (not cumulative); the last one is over 2.5 s.
    buckets: [Cell<u64>; 12],
    /// Sum of the latencies, microseconds.
    sum_micros: Cell<u64>,
    errors: [Cell<u64>; 6],
}

/// One shard's backend-call figures.
#[derive(Debug, Default)]
pub struct ProxyStats {
    kinds: [KindCells; 7],
    overloaded: Cell<u64>,
}

fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

impl ProxyStats {
    /// Counts one finished call of `kind` that took `elapsed`: `Ok(status)` with the backend's
    /// status (outside 2xx counts as a `status` error), or the call's error. A
    /// [`CallError::Overloaded`] is not counted here: [`super::HttpClient::try_acquire`]
    /// counted it when it refused the permit.
    pub fn record(&self, kind: ProxyKind, elapsed: Duration, outcome: Result<u16, &CallError>) {
        let class = match outcome {
            Ok(status) if (200..300).contains(&status) => None,
            Ok(_) => Some(ErrorClass::Status),
            Err(e) => match ErrorClass::of(e) {
                Some(c) => Some(c),
                None => return,
            },
        };
        let cells = &self.kinds[kind as usize];
        // A call of exactly a bound's duration falls in that bucket (`le`).
        let micros = elapsed.as_micros() as u64;
        let slot = LATENCY_BUCKETS_MS
            .iter()
            .position(|&b| micros <= b * 1000)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        bump(&cells.buckets[slot]);
        cells.sum_micros.set(cells.sum_micros.get() + micros);
        if let Some(c) = class {
            bump(&cells.errors[c as usize]);
        }
    }

    /// Counts a call refused by the in-flight bound.
    pub fn overloaded(&self) {
        bump(&self.overloaded);
    }

    /// Calls refused by the in-flight bound so far.
    pub fn overloaded_count(&self) -> u64 {
        self.overloaded.get()
    }

    /// Finished calls of `kind` so far.
    pub fn calls(&self, kind: ProxyKind) -> u64 {
        self.kinds[kind as usize]
            .buckets
            .iter()
            .map(Cell::get)
            .sum()
    }

    /// Errors of `class` among the calls of `kind`.
    pub fn errors(&self, kind: ProxyKind, class: ErrorClass) -> u64 {
        self.kinds[kind as usize].errors[class as usize].get()
    }

    /// The figures for the once-a-second shard snapshot (`/metrics`).
    pub fn snapshot(&self) -> ProxySnapshot {
        ProxySnapshot {
            overloaded: self.overloaded.get(),
            kinds: ProxyKind::ALL
                .iter()
                .map(|&k| {
                    let c = &self.kinds[k as usize];
                    ProxyKindSnapshot {
                        kind: k.label(),
                        bounds_secs: &LATENCY_BUCKETS_SECS,
                        buckets: c.buckets.iter().map(Cell::get).collect(),
                        sum_secs: c.sum_micros.get() as f64 / 1e6,
                        errors: ErrorClass::ALL
                            .iter()
                            .map(|&e| (e.label(), c.errors[e as usize].get()))
                            .collect(),
                    }
                })
                .collect(),
        }
    }

    /// Name → value, for `/api/info`'s counters (add them to the shard's `Part::Stats`
    /// counters only: `/metrics` shows these through [`ProxyStats::snapshot`], labelled).
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut all = vec![("proxy_overloaded", self.overloaded.get())];
        for k in ProxyKind::ALL {
            let names = &COUNTER_NAMES[k as usize];
            all.push((names[0], self.calls(k)));
            for e in ErrorClass::ALL {
                all.push((names[1 + e as usize], self.errors(k, e)));
            }
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_land_in_their_bucket_and_errors_in_their_class() {
        let s = ProxyStats::default();
        let ms = Duration::from_millis;
        s.record(ProxyKind::Connect, ms(3), Ok(200));
        s.record(ProxyKind::Connect, ms(5), Ok(503));
        s.record(ProxyKind::Connect, ms(4000), Err(&CallError::Timeout));
        s.record(ProxyKind::Rpc, ms(1), Err(&CallError::Tls("x".into())));
        s.record(ProxyKind::Rpc, ms(1), Err(&CallError::Overloaded));
        let snap = s.snapshot();
        let connect = &snap.kinds[0];
        assert_eq!(connect.kind, "connect");
        assert_eq!(connect.buckets[2], 2, "3 ms and 5 ms are both <= 5 ms");
        assert_eq!(connect.buckets[11], 1, "4 s is over the last bound");
        assert_eq!(connect.buckets.iter().sum::<u64>(), 3);
        assert!((connect.sum_secs - 4.008).abs() < 1e-9);
        assert_eq!(s.errors(ProxyKind::Connect, ErrorClass::Status), 1);
        assert_eq!(s.errors(ProxyKind::Connect, ErrorClass::Timeout), 1);
        assert_eq!(s.errors(ProxyKind::Rpc, ErrorClass::Tls), 1);
        assert_eq!(
            s.calls(ProxyKind::Rpc),
            1,
            "an overloaded call is not a call"
        );
        let counters = s.counters();
        let get = |n: &str| counters.iter().find(|(k, _)| *k == n).unwrap().1;
        assert_eq!(get("proxy_connect_calls"), 3);
        assert_eq!(get("proxy_connect_errors_status"), 1);
        assert_eq!(get("proxy_rpc_errors_tls"), 1);
        assert_eq!(get("proxy_sub_refresh_errors_too_large"), 0);
        assert_eq!(get("proxy_overloaded"), 0);
        assert_eq!(counters.len(), 1 + 7 * 7);
    }
}
