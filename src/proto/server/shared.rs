//! State every shard's core shares: nonces, quotas, the live relay ports, the reply limiter.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::Limits;
use crate::proto::auth::NonceIssuer;
use crate::proto::quota::{QuotaError, QuotaKey, Quotas};
use crate::proto::ratelimit::SourceRateLimiter;

/// The relay ports this server has open, per family: a peer on our own relay address is a valid
/// peer only at one of these (relay to relay). Any other port there belongs to some other local
/// process that happens to use a port inside the relay range (the kernel's ephemeral range
/// overlaps the default one), and is no business of a TURN client.
pub struct LiveRelayPorts {
    bits: [Box<[AtomicU64]>; 2],
}

impl Default for LiveRelayPorts {
    fn default() -> Self {
        let bitset = || (0..1024).map(|_| AtomicU64::new(0)).collect::<Box<[_]>>();
        LiveRelayPorts {
            bits: [bitset(), bitset()],
        }
    }
}

impl LiveRelayPorts {
    fn word(&self, addr: &SocketAddr) -> (&AtomicU64, u64) {
        let port = addr.port() as usize;
        (
            &self.bits[addr.is_ipv6() as usize][port / 64],
            1u64 << (port % 64),
        )
    }

    pub(super) fn insert(&self, addr: &SocketAddr) {
        let (w, bit) = self.word(addr);
        w.fetch_or(bit, Ordering::Relaxed);
    }

    pub(super) fn remove(&self, addr: &SocketAddr) {
        let (w, bit) = self.word(addr);
        w.fetch_and(!bit, Ordering::Relaxed);
    }

    pub fn contains(&self, addr: &SocketAddr) -> bool {
        let (w, bit) = self.word(addr);
        w.load(Ordering::Relaxed) & bit != 0
    }
}

/// State all shards share. Touched on Allocate, on an allocation's end and on unauthenticated
/// replies, never per relayed packet.
pub struct Shared {
    pub(super) nonces: NonceIssuer,
    anchor: Instant,
    anchor_unix: u64,
    pub(super) quotas: Quotas,
    pub(super) live_relays: LiveRelayPorts,
    /// One limit per source across every shard (the kernel spreads a source's ports over them).
    pub(super) limiter: SourceRateLimiter,
}

/// Buckets in the unauthenticated-reply table: 128 KiB, far above the sources that misbehave at once.
const LIMITER_SLOTS: usize = 16_384;

impl Shared {
    /// `anchor`/`anchor_unix` pin the monotonic clock to wall-clock time once, so the core can check
    /// REST expiries without reading a clock.
    pub fn new(
        nonce_secret: [u8; 32],
        nonce_lifetime_secs: u64,
        anchor: Instant,
        anchor_unix: u64,
    ) -> Self {
        // The limiter's hash key must be unpredictable; derive it from the (random) nonce key
        // one-way, so neither reveals the other.
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            &[b"turnpike rate limiter".as_slice(), &nonce_secret].concat(),
        );
        let hash_key = u64::from_le_bytes(digest.as_ref()[..8].try_into().unwrap_or_default());
        Shared {
            nonces: NonceIssuer::new(nonce_secret, nonce_lifetime_secs),
            anchor,
            anchor_unix,
            quotas: Quotas::default(),
            live_relays: LiveRelayPorts::default(),
            // No rate of its own: every core sets the configured one (`Core::new`, `set_config`).
            limiter: SourceRateLimiter::new(0, 0, LIMITER_SLOTS, hash_key, anchor),
        }
    }

    pub fn unix_time(&self, now: Instant) -> u64 {
        self.anchor_unix + now.saturating_duration_since(self.anchor).as_secs()
    }

    /// Quota units held: live allocations plus unclaimed port reservations.
    pub fn total_allocations(&self) -> u32 {
        self.quotas.total()
    }

    /// Relay ports held by EVEN-PORT reservations nobody has claimed yet.
    pub fn reserved_ports(&self) -> usize {
        self.quotas.reserved_ports()
    }

    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    pub(super) fn take_quota(
        &self,
        key: &QuotaKey,
        units: u32,
        limits: &Limits,
    ) -> Result<(), QuotaError> {
        self.quotas.take(
            key,
            units,
            limits.allocations_per_user,
            limits.total_allocations,
        )
    }
}
