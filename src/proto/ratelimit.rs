//! Bounded per-source rate limiting for unauthenticated replies (401, 438, 400, 420).
//!
//! Anyone can make the server answer 401 with a fresh nonce, and with UDP the source
//! can be spoofed, so the server must neither keep state per unauthenticated source
//! nor answer without limit (it would be a reflector). The limiter is a fixed table
//! of token buckets indexed by a keyed hash of the source: memory is fixed at
//! construction, a check allocates nothing, and an attacker who does not know the
//! key cannot aim many sources at one chosen victim's bucket. Colliding sources
//! share a bucket; size the table well above the number of concurrently misbehaving
//! sources you expect and collisions only make the limit slightly stricter.
//!
//! One table serves every shard: the kernel spreads one source's datagrams over the
//! shards by port, so a table per shard would multiply the limit by the shard count.
//! Each bucket is a GCRA cell (the token bucket written as one "theoretical arrival
//! time"), so a slot is a single atomic `u64` and a check is a load, a compare and a
//! compare-and-swap: no lock, and contention only between shards answering the same
//! misbehaving source.
//!
//! Source keys: an IPv4-mapped IPv6 source counts as its IPv4 address (a dual-stack
//! listener sees IPv4 clients that way), and an IPv6 source counts by its /64,
//! because one subscriber gets at least a /64 and could otherwise rotate through
//! 2^64 addresses to spread over every bucket.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::bucket::{nanos_since, Rate};

/// Token bucket per source IP in a fixed-size table indexed by a keyed hash of the IP
/// (colliding sources share a bucket: bounded memory, no per-client allocation, no
/// state kept for unauthenticated sources beyond the table). Shared by all shards.
#[derive(Debug)]
pub struct SourceRateLimiter {
    /// Tokens per second per bucket; 0 means unlimited.
    per_second: AtomicU64,
    burst: AtomicU64,
    /// Per slot: the theoretical arrival time of the next conforming request, in
    /// nanoseconds since `epoch`. 0 (or anything in the past) is a full bucket.
    slots: Box<[AtomicU64]>,
    k0: u64,
    k1: u64,
    /// The time origin: the core reads no clock, so the caller gives one.
    epoch: Instant,
}

impl SourceRateLimiter {
    /// `per_second` tokens refill per second per bucket, up to `burst` (see
    /// [`SourceRateLimiter::set_rate`]). `slots` is the table size (at least 1).
    /// `hash_key` should be random per process. `epoch` is any instant not after the
    /// first check.
    pub fn new(per_second: u32, burst: u32, slots: usize, hash_key: u64, epoch: Instant) -> Self {
        let limiter = SourceRateLimiter {
            per_second: AtomicU64::new(0),
            burst: AtomicU64::new(0),
            slots: (0..slots.max(1)).map(|_| AtomicU64::new(0)).collect(),
            k0: hash_key,
            // SipHash wants 128 bits of key; derive the second half so the API stays
            // one u64. The constant only decorrelates the halves; the secrecy is all
            // in `hash_key`.
            k1: hash_key.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15,
            epoch,
        };
        limiter.set_rate(per_second, burst);
        limiter
    }

    /// Changes the rate (a reload); buckets keep their state. A burst of 0 is taken as
    /// 1: a limiter that refuses everything is better expressed by not replying at all.
    /// `per_second == 0` means unlimited.
    pub fn set_rate(&self, per_second: u32, burst: u32) {
        self.per_second
            .store(u64::from(per_second), Ordering::Relaxed);
        self.burst.store(u64::from(burst), Ordering::Relaxed);
    }

    /// Whether a reply to `ip` may be sent now; consumes a token when it may.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let rate = Rate::new(
            self.per_second.load(Ordering::Relaxed),
            self.burst.load(Ordering::Relaxed),
        );
        if rate.is_unlimited() {
            return true;
        }
        let now_ns = nanos_since(self.epoch, now);
        let Some(cell) = self.slots.get(self.index(ip)) else {
            // Unreachable: index() reduces into the table and the table is non-empty.
            return false;
        };
        let mut tat = cell.load(Ordering::Relaxed);
        loop {
            let Some(next) = rate.admit(tat, now_ns, 1) else {
                return false;
            };
            match cell.compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(current) => tat = current,
            }
        }
    }

    fn index(&self, ip: IpAddr) -> usize {
        let hash = match SourceKey::of(ip) {
            SourceKey::V4(octets) => siphash24(self.k0, self.k1, &octets),
            SourceKey::V6Prefix(octets) => siphash24(self.k0, self.k1, &octets),
        };
        // Multiply-shift maps the hash onto 0..len without the bias or the division
        // of a modulo; the result is < len, so the cast back cannot truncate.
        ((u128::from(hash) * self.slots.len() as u128) >> 64) as usize
    }
}

/// What a source address is counted as, here and by per-source quotas. The two
/// variants hash different lengths (4 and 8 bytes), so an IPv4 address and an IPv6
/// prefix never collide by construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
}

impl SourceKey {
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip {
            IpAddr::V4(v4) => SourceKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(v4.octets()),
                None => {
                    let o = v6.octets();
                    SourceKey::V6Prefix([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
                }
            },
        }
    }
}

/// SipHash-2-4 (Aumasson and Bernstein), written out because std's keyed SipHash is
/// deprecated and the design budget is one dependency for this code.
fn siphash24(k0: u64, k1: u64, msg: &[u8]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let mut chunks = msg.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let m = u64::from_le_bytes(word);
        v[3] ^= m;
        sip_round(&mut v);
        sip_round(&mut v);
        v[0] ^= m;
    }
    let mut last = [0u8; 8];
    let rest = chunks.remainder();
    last[..rest.len()].copy_from_slice(rest);
    // The length byte is the message length mod 256, as the specification says.
    last[7] = msg.len() as u8;
    let m = u64::from_le_bytes(last);
    v[3] ^= m;
    sip_round(&mut v);
    sip_round(&mut v);
    v[0] ^= m;
    v[2] ^= 0xff;
    for _ in 0..4 {
        sip_round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[inline(always)]
fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test ip")
    }

    /// Counts how many of `n` back-to-back requests at `now` pass.
    fn passes(rl: &SourceRateLimiter, src: IpAddr, now: Instant, n: u32) -> u32 {
        (0..n).filter(|_| rl.allow(src, now)).count() as u32
    }

    #[test]
    fn burst_passes_exactly_then_refuses() {
        let t0 = Instant::now();
        for burst in [1, 2, 5, 20, 1000] {
            let rl = SourceRateLimiter::new(10, burst, 1024, 42, t0);
            let src = ip("198.51.100.1");
            assert_eq!(passes(&rl, src, t0, burst + 50), burst, "burst {burst}");
            assert!(!rl.allow(src, t0));
        }
    }

    #[test]
    fn refills_over_simulated_time() {
        let t0 = Instant::now();
        let rl = SourceRateLimiter::new(10, 5, 1024, 7, t0);
        let src = ip("198.51.100.1");
        assert_eq!(passes(&rl, src, t0, 10), 5);
        // One token every 100 ms.
        assert!(!rl.allow(src, t0 + Duration::from_millis(99)));
        assert!(rl.allow(src, t0 + Duration::from_millis(100)));
        assert!(!rl.allow(src, t0 + Duration::from_millis(150)));
        assert!(rl.allow(src, t0 + Duration::from_millis(200)));
        // 350 ms later: 3 more tokens (at 300, 400, 500 ms of the schedule).
        assert_eq!(passes(&rl, src, t0 + Duration::from_millis(550), 10), 3);
        // After a long idle period the bucket is full again, but never above burst.
        assert_eq!(passes(&rl, src, t0 + Duration::from_secs(3600), 100), 5);
    }

    #[test]
    fn sustained_rate_matches_per_second() {
        let t0 = Instant::now();
        let rl = SourceRateLimiter::new(50, 10, 64, 1, t0);
        let src = ip("2001:db8::1");
        // Hammer once per millisecond for 10 s: burst + rate * duration.
        let mut passed = 0;
        for ms in 0..10_000u64 {
            if rl.allow(src, t0 + Duration::from_millis(ms)) {
                passed += 1;
            }
        }
        // 10 up front, then one per 20 ms over the remaining 9.999 s.
        assert!((505..=511).contains(&passed), "passed {passed}");
    }

    #[test]
    fn different_sources_do_not_share_in_a_large_table() {
        let t0 = Instant::now();
        let rl = SourceRateLimiter::new(1, 3, 1 << 16, 0xdead_beef, t0);
        let a = ip("198.51.100.1");
        let b = ip("198.51.100.2");
        let c = ip("2001:db8:1::1");
        assert_eq!(passes(&rl, a, t0, 10), 3);
        assert_eq!(passes(&rl, b, t0, 10), 3);
        assert_eq!(passes(&rl, c, t0, 10), 3);
        assert!(!rl.allow(a, t0));
    }

    #[test]
    fn many_sources_mostly_independent() {
        // 1000 sources in 65536 slots: collisions are rare (birthday bound ~7.6 pairs
        // expected at worst), so nearly every source gets its own full burst.
        let t0 = Instant::now();
        let rl = SourceRateLimiter::new(1, 2, 1 << 16, 12345, t0);
        let mut full = 0;
        for i in 0..1000u32 {
            let src = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            if passes(&rl, src, t0, 2) == 2 {
                full += 1;
            }
        }
        assert!(full >= 970, "only {full} sources had their own bucket");
    }

    #[test]
    fn colliding_sources_share_a_bucket() {
        let t0 = Instant::now();
        let rl = SourceRateLimiter::new(1, 4, 1, 99, t0);
        assert_eq!(passes(&rl, ip("198.51.100.1"), t0, 2), 2);
        assert_eq!(passes(&rl, ip("203.0.113.9"), t0, 10), 2);
    }

    #[test]
    fn unlimited_mode() {
        let t0 = Instant::now();
        let rl = SourceRateLimiter::new(0, 0, 1024, 5, t0);
        let src = ip("198.51.100.1");
        assert_eq!(passes(&rl, src, t0, 100_000), 100_000);
    }

    #[test]
    fn degenerate_parameters_are_clamped() {
        let t0 = Instant::now();
        // burst 0 behaves as 1, slots 0 as 1.
        let rl = SourceRateLimiter::new(10, 0, 0, 5, t0);
        let src = ip("198.51.100.1");
        assert_eq!(passes(&rl, src, t0, 10), 1);
        assert!(rl.allow(src, t0 + Duration::from_millis(100)));
        // A rate beyond nanosecond resolution is unlimited.
        let fast = SourceRateLimiter::new(u32::MAX, 1, 16, 5, t0);
        assert_eq!(passes(&fast, src, t0, 1000), 1000);
    }

    #[test]
    fn time_going_backwards_does_not_refill_or_panic() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let rl = SourceRateLimiter::new(1, 2, 16, 5, t0);
        let src = ip("198.51.100.1");
        assert_eq!(passes(&rl, src, t0, 5), 2);
        assert!(!rl.allow(src, t0 - Duration::from_secs(5)));
        assert!(rl.allow(src, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn mapped_source_counts_as_ipv4() {
        let t0 = Instant::now();
        let rl = SourceRateLimiter::new(1, 2, 1 << 16, 5, t0);
        assert_eq!(passes(&rl, ip("198.51.100.1"), t0, 1), 1);
        assert_eq!(passes(&rl, ip("::ffff:198.51.100.1"), t0, 5), 1);
    }

    #[test]
    fn ipv6_sources_count_by_slash_64() {
        let t0 = Instant::now();
        let rl = SourceRateLimiter::new(1, 2, 1 << 16, 5, t0);
        assert_eq!(passes(&rl, ip("2001:db8:0:1::1"), t0, 1), 1);
        assert_eq!(passes(&rl, ip("2001:db8:0:1:ffff:1:2:3"), t0, 5), 1);
        // The neighbouring /64 is another source.
        assert_eq!(passes(&rl, ip("2001:db8:0:2::1"), t0, 5), 2);
    }

    #[test]
    fn hash_key_changes_the_slot_assignment() {
        // Two limiters with different keys should disagree on where most sources go.
        let t0 = Instant::now();
        let a = SourceRateLimiter::new(1, 1, 1 << 16, 1, t0);
        let b = SourceRateLimiter::new(1, 1, 1 << 16, 2, t0);
        let differ = (0..100u32)
            .map(|i| IpAddr::from(std::net::Ipv4Addr::from(0xc633_6400 + i)))
            .filter(|&src| a.index(src) != b.index(src))
            .count();
        assert!(differ > 95, "{differ}");
    }

    #[test]
    fn one_table_holds_across_threads() {
        // Eight shards answering one source: the burst holds in total, not per shard.
        let t0 = Instant::now();
        let rl = std::sync::Arc::new(SourceRateLimiter::new(20, 40, 1024, 3, t0));
        let src = ip("198.51.100.7");
        let passed: u32 = (0..8)
            .map(|_| {
                let rl = std::sync::Arc::clone(&rl);
                std::thread::spawn(move || passes(&rl, src, t0, 1000))
            })
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(passed, 40);
    }

    #[test]
    fn set_rate_takes_effect_without_a_new_table() {
        let t0 = Instant::now();
        let rl = SourceRateLimiter::new(0, 0, 64, 3, t0);
        let src = ip("198.51.100.7");
        assert_eq!(passes(&rl, src, t0, 500), 500);
        rl.set_rate(1, 3);
        assert_eq!(passes(&rl, src, t0, 10), 3);
        rl.set_rate(0, 0);
        assert_eq!(passes(&rl, src, t0, 10), 10);
    }

    #[test]
    fn siphash24_reference_vectors() {
        // From the SipHash paper / reference implementation: key 00..0f, message
        // 00..(len-1).
        let k0 = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
        let k1 = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        let msg: [u8; 64] = std::array::from_fn(|i| i as u8);
        let vectors: [(usize, u64); 18] = [
            (0, 0x726f_db47_dd0e_0e31),
            (1, 0x74f8_39c5_93dc_67fd),
            (2, 0x0d6c_8009_d9a9_4f5a),
            (3, 0x8567_6696_d7fb_7e2d),
            (4, 0xcf27_94e0_2771_87b7),
            (5, 0x1876_5564_cd99_a68d),
            (6, 0xcbc9_466e_58fe_e3ce),
            (7, 0xab02_00f5_8b01_d137),
            (8, 0x93f5_f579_9a93_2462),
            (9, 0x9e00_82df_0ba9_e4b0),
            (10, 0x7a5d_bbc5_94dd_b9f3),
            (11, 0xf4b3_2f46_226b_ada7),
            (12, 0x751e_8fbc_860e_e5fb),
            (13, 0x14ea_5627_c084_3d90),
            (14, 0xf723_ca90_8e7a_f2ee),
            (15, 0xa129_ca61_49be_45e5),
            (16, 0x3f2a_cc7f_57c2_9bdb),
            (24, 0xb8ad_50c6_f649_af94),
        ];
        for (len, want) in vectors {
            assert_eq!(siphash24(k0, k1, &msg[..len]), want, "len {len}");
        }
    }
}
