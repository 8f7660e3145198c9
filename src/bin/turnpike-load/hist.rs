//! A log-linear latency histogram in microseconds: exact below 2048 us, then 1024 buckets per
//! octave (under 0.1% error), so millions of samples cost a fixed 100 KiB and no sort.

const LINEAR: u64 = 2048;
const SUB_BITS: u32 = 10;
const SUB: u64 = 1 << SUB_BITS;
/// Octaves above the linear part: enough for u32::MAX microseconds (71 minutes).
const OCTAVES: usize = 22;

pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

fn index(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    // v >= 2^11: octave k >= 1 holds [2^(10+k), 2^(11+k)) in 1024 steps of 2^k.
    let msb = 63 - v.leading_zeros();
    let k = (msb - SUB_BITS) as u64;
    let sub = (v >> k) - SUB;
    (LINEAR + (k - 1) * SUB + sub) as usize
}

/// The lowest value bucket `i` holds.
fn value(i: usize) -> u64 {
    let i = i as u64;
    if i < LINEAR {
        return i;
    }
    let k = (i - LINEAR) / SUB + 1;
    let sub = (i - LINEAR) % SUB;
    (SUB + sub) << k
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; LINEAR as usize + OCTAVES * SUB as usize],
            total: 0,
            max: 0,
        }
    }
}

impl Histogram {
    pub fn record(&mut self, us: u64) {
        let i = index(us).min(self.counts.len() - 1);
        self.counts[i] += 1;
        self.total += 1;
        self.max = self.max.max(us);
    }

    /// The smallest recorded value at or below which a fraction `q` of the samples lie.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return value(i).min(self.max) as f64;
            }
        }
        self.max as f64
    }

    pub fn summary(&self) -> Summary {
        Summary {
            p50: self.quantile(0.50),
            p90: self.quantile(0.90),
            p99: self.quantile(0.99),
            max: self.max as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_monotonic() {
        for v in [
            0u64,
            1,
            2047,
            2048,
            2049,
            4095,
            4096,
            1 << 20,
            (1 << 20) + 12345,
        ] {
            let i = index(v);
            assert!(value(i) <= v, "{v}");
            assert!(value(i + 1) > v, "{v}");
        }
        assert_eq!(index(2048), 2048);
        assert_eq!(value(2048), 2048);
    }

    #[test]
    fn exact_percentiles_below_two_milliseconds() {
        let mut h = Histogram::default();
        for v in 1..=100 {
            h.record(v);
        }
        let s = h.summary();
        assert_eq!((s.p50, s.p90, s.p99, s.max), (50.0, 90.0, 99.0, 100.0));
    }

    #[test]
    fn large_values_within_a_tenth_of_a_percent() {
        let mut h = Histogram::default();
        h.record(1_000_003);
        let got = h.quantile(0.5);
        assert!((got - 1_000_003.0).abs() / 1_000_003.0 < 0.001, "{got}");
        assert_eq!(h.total, 1);
    }
}
