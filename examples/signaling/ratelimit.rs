//! Per-socket message budget: a token bucket, time passed in.

use std::time::Instant;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Starts full: `burst` messages at once, then `per_sec` sustained.
    pub fn new(burst: u32, per_sec: u32, now: Instant) -> Self {
        Self {
            capacity: f64::from(burst),
            per_sec: f64::from(per_sec),
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes one token; false when the budget is spent.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_sustained_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 50, t0);
        assert!((0..10).all(|_| b.allow(t0)));
        assert!(!b.allow(t0));
        // 50/s: one token every 20 ms.
        assert!(b.allow(t0 + Duration::from_millis(20)));
        assert!(!b.allow(t0 + Duration::from_millis(20)));
        // A long pause refills to the burst, no further.
        let t1 = t0 + Duration::from_secs(60);
        assert!((0..10).all(|_| b.allow(t1)));
        assert!(!b.allow(t1));
    }

    #[test]
    fn steady_50_per_second_is_allowed_forever() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 50, t0);
        for i in 1..10_000u64 {
            assert!(b.allow(t0 + Duration::from_millis(20 * i)), "message {i}");
        }
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let mut b = TokenBucket::new(1, 1, t0);
        assert!(b.allow(t0));
        assert!(!b.allow(t0 - Duration::from_secs(1)));
        assert!(b.allow(t0 + Duration::from_secs(1)));
    }
}
