//! State every shard's core shares: nonces, quotas, the live relay ports, the reply limiter.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Instant;

use super::Limits;
use crate::proto::auth::NonceIssuer;
use crate::proto::quota::{QuotaError, QuotaKey, Quotas};
use crate::proto::ratelimit::SourceRateLimiter;

/// The relay ports this server has open, per family: a peer on our own relay address is a valid
/// peer only at one of these (relay to relay). Any other port there belongs to some other local
/// process that happens to use a port inside the relay range (the kernel's ephemeral range
/// overlaps the default one), and is no business of a TURN client.
///
/// For a UDP relay it also says which shard owns the socket, so a datagram for it from another
/// shard's relay is handed over in-process (see `io::mailbox`). A UDP and a TCP relay may hold
/// the same port number at once: each has its own part of the entry.
pub struct LiveRelayPorts {
    /// Per port: [`TCP_LIVE`] and, in the low bits, the owning shard + 1 of a UDP relay (0: none).
    ports: [Box<[AtomicU16]>; 2],
}

const TCP_LIVE: u16 = 1 << 15;
const UDP_OWNER: u16 = TCP_LIVE - 1;

impl Default for LiveRelayPorts {
    fn default() -> Self {
        let table = || {
            (0..=u16::MAX)
                .map(|_| AtomicU16::new(0))
                .collect::<Box<[_]>>()
        };
        LiveRelayPorts {
            ports: [table(), table()],
        }
    }
}

impl LiveRelayPorts {
    fn entry(&self, addr: &SocketAddr) -> &AtomicU16 {
        &self.ports[addr.is_ipv6() as usize][addr.port() as usize]
    }

    /// A UDP relay of shard `shard` (`None`: a TCP relay) starts serving at `addr`.
    pub(super) fn insert(&self, addr: &SocketAddr, shard: Option<u8>) {
        let e = self.entry(addr);
        match shard {
            Some(shard) => {
                let owner = u16::from(shard) + 1;
                let _ = e.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v & TCP_LIVE | owner)
                });
            }
            None => {
                e.fetch_or(TCP_LIVE, Ordering::Relaxed);
            }
        }
    }

    /// The UDP (`udp`) or TCP relay at `addr` has ended.
    pub(super) fn remove(&self, addr: &SocketAddr, udp: bool) {
        let clear = if udp { UDP_OWNER } else { TCP_LIVE };
        self.entry(addr).fetch_and(!clear, Ordering::Relaxed);
    }

    pub fn contains(&self, addr: &SocketAddr) -> bool {
        self.entry(addr).load(Ordering::Relaxed) != 0
    }

    /// The shard whose UDP relay serves port `addr.port()` of this family, if one does.
    pub fn udp_owner(&self, addr: &SocketAddr) -> Option<u8> {
        let owner = self.entry(addr).load(Ordering::Relaxed) & UDP_OWNER;
        (owner != 0).then(|| (owner - 1) as u8)
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

    /// Nonce keys shared with the other instances of a fleet: the first issues, all verify
    /// (see [`NonceIssuer`]). An empty list keeps the keys in force.
    pub fn set_nonce_keys<K: AsRef<[u8]>>(&self, keys: &[K]) {
        self.nonces.set_keys(keys);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_udp_and_a_tcp_relay_on_one_port_end_independently() {
        let ports = LiveRelayPorts::default();
        let addr: SocketAddr = "192.0.2.1:50000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:50000".parse().unwrap();
        assert!(!ports.contains(&addr));
        ports.insert(&addr, None);
        ports.insert(&addr, Some(3));
        assert_eq!(ports.udp_owner(&addr), Some(3));
        assert!(!ports.contains(&v6), "families are apart");
        ports.remove(&addr, false);
        assert!(ports.contains(&addr), "the UDP relay still serves");
        assert_eq!(ports.udp_owner(&addr), Some(3));
        ports.insert(&addr, None);
        ports.remove(&addr, true);
        assert_eq!(ports.udp_owner(&addr), None);
        assert!(ports.contains(&addr), "the TCP relay still serves");
        ports.remove(&addr, false);
        assert!(!ports.contains(&addr));
        ports.insert(&v6, Some(255));
        assert_eq!(ports.udp_owner(&v6), Some(255));
    }
}
