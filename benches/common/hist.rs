//! Latency statistics for the output lines: a log-linear histogram (~1.6 % relative precision,
//! fixed size, merged across reader threads) for p50/p99/max, and nanoseconds printed as µs or
//! ms.

const SUB_BITS: u32 = 7;
const HALF: u64 = 1 << (SUB_BITS - 1);

#[derive(Clone)]
pub struct Hist {
    counts: Vec<u64>,
    pub n: u64,
    pub max: u64,
    pub sum: u128,
}

impl Default for Hist {
    fn default() -> Self {
        Self::new()
    }
}

impl Hist {
    pub fn new() -> Hist {
        Hist {
            counts: vec![0; 64 * HALF as usize + 2 * HALF as usize],
            n: 0,
            max: 0,
            sum: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < 2 * HALF {
            v as usize
        } else {
            let e = 63 - v.leading_zeros() as u64; // >= SUB_BITS
            let shift = e - (SUB_BITS as u64 - 1);
            (shift * HALF + (v >> shift)) as usize
        }
    }

    /// Highest value that maps to bucket `i`.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * HALF {
            i
        } else {
            let shift = i / HALF - 1;
            let m = i - shift * HALF;
            ((m + 1) << shift) - 1
        }
    }

    pub fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.n += 1;
        self.max = self.max.max(v);
        self.sum += v as u128;
    }

    #[allow(
        dead_code,
        reason = "fanout merges its readers' histograms; recovery has one"
    )]
    pub fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.n += o.n;
        self.max = self.max.max(o.max);
        self.sum += o.sum;
    }

    pub fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut acc = 0;
        for (i, c) in self.counts.iter().enumerate() {
            acc += c;
            if acc >= rank {
                return Self::upper(i).min(self.max);
            }
        }
        self.max
    }
}

/// Formats nanoseconds as µs or ms.
pub fn fmt_ns(ns: u64) -> String {
    if ns >= 10_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else {
        format!("{:.0} µs", ns as f64 / 1e3)
    }
}
