//! The one token bucket, written as GCRA (the generic cell rate algorithm): the whole state is one
//! "theoretical arrival time", so a bucket is a single `u64` that fits an atomic (the shared
//! per-source reply limiter) as well as a plain field (an allocation's bandwidth budget). Time is
//! an argument, in nanoseconds since a caller's epoch.

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// A rate: `per_second` tokens refill per second, up to `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    per_second: u64,
    /// The burst as time: how far the arrival time may run ahead of now.
    burst_ns: u64,
}

impl Rate {
    /// `per_second == 0` means unlimited. A burst of 0 is taken as 1: a bucket that refuses
    /// everything is better expressed by not asking it.
    pub fn new(per_second: u64, burst: u64) -> Self {
        Rate {
            per_second,
            burst_ns: Self::nanos(burst.max(1), per_second),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.per_second == 0
    }

    fn nanos(tokens: u64, per_second: u64) -> u64 {
        let ns = u128::from(tokens) * NANOS_PER_SEC / u128::from(per_second.max(1));
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    /// The arrival time after taking `cost` tokens at `now_ns` from a bucket at `tat`, or `None`
    /// when the bucket holds fewer than `cost` (it is then left as it was).
    pub fn admit(&self, tat: u64, now_ns: u64, cost: u64) -> Option<u64> {
        if self.is_unlimited() {
            return Some(tat);
        }
        let next = tat
            .max(now_ns)
            .saturating_add(Self::nanos(cost, self.per_second));
        (next - now_ns <= self.burst_ns).then_some(next)
    }
}

/// A bucket of its own: starts full.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    rate: Rate,
    tat: u64,
    epoch: std::time::Instant,
}

impl TokenBucket {
    pub fn new(rate: Rate, now: std::time::Instant) -> Self {
        TokenBucket {
            rate,
            tat: 0,
            epoch: now,
        }
    }

    /// Takes `cost` tokens if the bucket holds them.
    pub fn take(&mut self, cost: u64, now: std::time::Instant) -> bool {
        let now_ns = nanos_since(self.epoch, now);
        match self.rate.admit(self.tat, now_ns, cost) {
            Some(tat) => {
                self.tat = tat;
                true
            }
            None => false,
        }
    }
}

/// `now` as nanoseconds since `epoch`; an earlier `now` (another thread's clock reading) counts
/// as the epoch rather than wrapping.
pub fn nanos_since(epoch: std::time::Instant, now: std::time::Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_bucket_starts_full_then_refills_at_its_rate_up_to_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Rate::new(50, 10), t0);
        assert!((0..10).all(|_| b.take(1, t0)));
        assert!(!b.take(1, t0));
        // 50/s: one token every 20 ms, none before.
        assert!(!b.take(1, t0 + Duration::from_millis(19)));
        assert!(b.take(1, t0 + Duration::from_millis(20)));
        // Frequent small waits still add up (no refill lost to rounding).
        let mut t = t0 + Duration::from_millis(20);
        let mut granted = 0;
        for _ in 0..200 {
            t += Duration::from_millis(5);
            granted += u32::from(b.take(1, t));
        }
        assert_eq!(
            granted, 50,
            "one second of 5 ms steps grants one second of tokens"
        );
        // A long pause refills to the burst, no further.
        let t1 = t + Duration::from_secs(60);
        assert!((0..10).all(|_| b.take(1, t1)));
        assert!(!b.take(1, t1));
    }

    #[test]
    fn costs_are_taken_whole_or_not_at_all() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Rate::new(1000, 1000), t0);
        assert!(b.take(600, t0));
        assert!(!b.take(600, t0), "400 left: a 600 cost must wait");
        assert!(b.take(400, t0));
        assert!(b.take(500, t0 + Duration::from_millis(500)));
        assert!(!b.take(1, t0 + Duration::from_millis(500)));
        // A cost above the burst never fits.
        assert!(!b.take(1001, t0 + Duration::from_secs(10)));
    }

    #[test]
    fn zero_is_unlimited_and_a_zero_burst_is_one() {
        let t0 = Instant::now();
        let mut free = TokenBucket::new(Rate::new(0, 0), t0);
        assert!((0..10_000).all(|_| free.take(u64::MAX, t0)));
        let mut one = TokenBucket::new(Rate::new(10, 0), t0);
        assert!(one.take(1, t0));
        assert!(!one.take(1, t0));
    }
}
