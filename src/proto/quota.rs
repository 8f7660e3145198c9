//! Allocation quotas, shared by every shard and touched only on Allocate and on an allocation's
//! end: per user, in total, and the EVEN-PORT reservations that hold a port without an allocation.
//!
//! Whom a quota counts: the user part of a REST username (credentials minted with different
//! expiries are one user), but a static user per source address too. A meeting app typically gives
//! one static credential to every client, so one count per static user would break calls as soon
//! as a few browsers hold relays at once; counted per source, one leaked credential still cannot
//! take more than the per-user cap from any one address. IPv6 sources count by /64, as the
//! unauthenticated-reply limit counts them.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};

use super::ratelimit::SourceKey;

/// What one quota counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QuotaKey {
    pub user: Box<str>,
    /// Set for static users: their count is per source.
    pub source: Option<SourceKey>,
}

impl QuotaKey {
    /// How the fleet names this key between instances: `u:USER` for a REST user, `s:USER@SOURCE`
    /// for a static user from one source (an IPv4 address or an IPv6 /64 in hex).
    pub fn fleet_name(&self) -> String {
        match self.source {
            None => format!("u:{}", self.user),
            Some(SourceKey::V4(o)) => {
                format!("s:{}@{}.{}.{}.{}", self.user, o[0], o[1], o[2], o[3])
            }
            Some(SourceKey::V6Prefix(o)) => {
                let hex: String = o.iter().map(|b| format!("{b:02x}")).collect();
                format!("s:{}@{hex}::/64", self.user)
            }
        }
    }

    pub fn rest(user: &str) -> Self {
        QuotaKey {
            user: user.into(),
            source: None,
        }
    }

    pub fn per_source(user: &str, source: IpAddr) -> Self {
        QuotaKey {
            user: user.into(),
            source: Some(SourceKey::of(source)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaError {
    /// The key holds `allocations_per_user` units (486).
    User,
    /// The server holds `total_allocations` units (508).
    Total,
}

/// Independent locks the per-key counts are spread over: shards allocating at once meet on the
/// same lock only when their keys hash alike (1 in 64), never on one table for the whole server.
const SHARDS: usize = 64;

/// Units held: one per live allocation and one per unclaimed port reservation.
#[derive(Debug)]
pub struct Quotas {
    /// Per-key counts, each key in the shard its hash picks.
    held: Box<[Mutex<HashMap<QuotaKey, u32>>]>,
    hasher: RandomState,
    /// Moved with compare-and-swap, so checking the cap takes no lock.
    total: AtomicU32,
    /// Reservation token -> the key its unit is held under (EVEN-PORT only: off the common path).
    reservations: Mutex<HashMap<u64, QuotaKey>>,
    /// What the fleet's other instances hold, by [`QuotaKey::fleet_name`]: added to the local
    /// count when a per-key cap is checked. Replaced whole by the fleet thread every few
    /// seconds; empty (and never looked into) without `[fleet]`.
    remote: RwLock<HashMap<String, u32>>,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            held: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            total: AtomicU32::new(0),
            reservations: Mutex::default(),
            remote: RwLock::default(),
        }
    }
}

impl Quotas {
    fn shard(&self, key: &QuotaKey) -> &Mutex<HashMap<QuotaKey, u32>> {
        // Multiply-shift onto 0..SHARDS: the high bits of the hash, no division.
        let h = self.hasher.hash_one(key);
        &self.held[((u128::from(h) * SHARDS as u128) >> 64) as usize]
    }

    /// Takes `units` for `key` if both caps allow them all (0 = no cap).
    pub fn take(
        &self,
        key: &QuotaKey,
        units: u32,
        per_key: u32,
        total: u32,
    ) -> Result<(), QuotaError> {
        let elsewhere = if per_key == 0 {
            0
        } else {
            self.held_elsewhere(key)
        };
        let mut held = lock(self.shard(key));
        let count = held.get_mut(key);
        let before = count.as_ref().map_or(0, |c| **c);
        if per_key != 0 && before + elsewhere + units > per_key {
            return Err(QuotaError::User);
        }
        self.take_total(units, total)?;
        match count {
            Some(c) => *c += units,
            // Only a key's first unit copies the key.
            None => {
                held.insert(key.clone(), units);
            }
        }
        Ok(())
    }

    /// The server-wide count moves by compare-and-swap: its cap is checked without a lock.
    fn take_total(&self, units: u32, cap: u32) -> Result<(), QuotaError> {
        self.total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (cap == 0 || t + units <= cap).then_some(t + units)
            })
            .map(drop)
            .map_err(|_| QuotaError::Total)
    }

    /// Units the fleet's other instances hold for `key` (0 without `[fleet]`).
    fn held_elsewhere(&self, key: &QuotaKey) -> u32 {
        let remote = self.remote.read().unwrap_or_else(PoisonError::into_inner);
        if remote.is_empty() {
            return 0;
        }
        remote.get(&key.fleet_name()).copied().unwrap_or(0)
    }

    /// The fleet's other instances' counts, replacing the last ones.
    pub fn set_held_elsewhere(&self, counts: HashMap<String, u32>) {
        *self.remote.write().unwrap_or_else(PoisonError::into_inner) = counts;
    }

    /// Every key's units held here, by fleet name: what this instance tells the others.
    pub fn held_here(&self) -> HashMap<String, u32> {
        let mut out = HashMap::new();
        for shard in self.held.iter() {
            for (key, &n) in lock(shard).iter() {
                *out.entry(key.fleet_name()).or_insert(0) += n;
            }
        }
        out
    }

    pub fn give_back(&self, key: &QuotaKey, units: u32) {
        let mut held = lock(self.shard(key));
        if let Some(c) = held.get_mut(key) {
            let n = units.min(*c);
            *c -= n;
            if *c == 0 {
                held.remove(key);
                shrink(&mut held);
            }
            self.total.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// Files a unit already taken for `key` under a reservation token.
    pub fn hold_for_reservation(&self, token: u64, key: &QuotaKey) {
        lock(&self.reservations).insert(token, key.clone());
    }

    /// Ends a reservation, claimed or not, and gives its unit back. False when the token is
    /// unknown: never issued, already claimed, or expired.
    pub fn end_reservation(&self, token: u64) -> bool {
        let key = {
            let mut reservations = lock(&self.reservations);
            let key = reservations.remove(&token);
            shrink(&mut reservations);
            key
        };
        match key {
            Some(key) => {
                self.give_back(&key, 1);
                true
            }
            None => false,
        }
    }

    /// Units held in total (allocations and reservations).
    pub fn total(&self) -> u32 {
        self.total.load(Ordering::Relaxed)
    }

    /// Ports held by reservations nobody has claimed yet.
    pub fn reserved_ports(&self) -> usize {
        lock(&self.reservations).len()
    }

    /// Units held by `key`.
    pub fn held_by(&self, key: &QuotaKey) -> u32 {
        lock(self.shard(key)).get(key).copied().unwrap_or(0)
    }

    /// Every key and its units (the soak test's accounting check).
    #[cfg(test)]
    pub fn snapshot(&self) -> HashMap<QuotaKey, u32> {
        self.held.iter().flat_map(|s| lock(s).clone()).collect()
    }

    /// Table slots allocated over every shard (the shrink test's check).
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.held.iter().map(|s| lock(s).capacity()).sum()
    }
}

/// Gives a table's memory back once it is mostly empty (a burst of users has left). Halving the
/// capacity only below a quarter full keeps the cost amortised: a table that shrank must fill
/// half way again before it grows.
fn shrink<K: Eq + Hash, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_fleets_other_instances_count_against_the_per_key_cap() {
        let q = Quotas::default();
        let alice = QuotaKey::rest("alice");
        let bob_here = QuotaKey::per_source("bob", ip("192.0.2.7"));
        let bob_v6 = QuotaKey::per_source("bob", ip("2001:db8:1:2::9"));
        assert_eq!(bob_here.fleet_name(), "s:bob@192.0.2.7");
        assert_eq!(bob_v6.fleet_name(), "s:bob@20010db800010002::/64");
        assert_eq!(alice.fleet_name(), "u:alice");
        q.set_held_elsewhere(HashMap::from([
            ("u:alice".to_owned(), 2),
            (bob_here.fleet_name(), 3),
        ]));
        assert_eq!(q.take(&alice, 1, 3, 0), Ok(()));
        assert_eq!(
            q.take(&alice, 1, 3, 0),
            Err(QuotaError::User),
            "2 elsewhere + 1 here"
        );
        assert_eq!(q.take(&bob_here, 1, 3, 0), Err(QuotaError::User));
        assert_eq!(
            q.take(&bob_v6, 1, 3, 0),
            Ok(()),
            "another source counts apart"
        );
        assert_eq!(
            q.take(&alice, 5, 0, 0),
            Ok(()),
            "no cap: the fleet is not consulted"
        );
        assert_eq!(
            q.held_here(),
            HashMap::from([("u:alice".to_owned(), 6), (bob_v6.fleet_name(), 1)])
        );
        // The other instances let go.
        q.set_held_elsewhere(HashMap::new());
        assert_eq!(q.take(&bob_here, 1, 3, 0), Ok(()));
    }

    #[test]
    fn per_key_and_total_caps() {
        let q = Quotas::default();
        let a = QuotaKey::rest("alice");
        let b = QuotaKey::rest("bob");
        assert_eq!(q.take(&a, 2, 3, 4), Ok(()));
        assert_eq!(q.take(&a, 2, 3, 4), Err(QuotaError::User));
        assert_eq!(q.take(&a, 1, 3, 4), Ok(()));
        assert_eq!(q.take(&b, 1, 3, 4), Ok(()));
        assert_eq!(q.take(&b, 1, 3, 4), Err(QuotaError::Total));
        q.give_back(&a, 3);
        assert_eq!(q.held_by(&a), 0);
        assert_eq!(q.total(), 1);
        // Giving back more than is held never underflows the total.
        q.give_back(&b, 5);
        assert_eq!(q.total(), 0);
    }

    #[test]
    fn static_users_count_per_source_and_ipv6_per_slash_64() {
        let q = Quotas::default();
        let here = QuotaKey::per_source("app", ip("198.51.100.1"));
        let there = QuotaKey::per_source("app", ip("198.51.100.2"));
        assert_eq!(q.take(&here, 1, 1, 0), Ok(()));
        assert_eq!(q.take(&here, 1, 1, 0), Err(QuotaError::User));
        assert_eq!(q.take(&there, 1, 1, 0), Ok(()));
        let v6 = QuotaKey::per_source("app", ip("2001:db8:0:1::1"));
        let same_64 = QuotaKey::per_source("app", ip("2001:db8:0:1:ffff::9"));
        assert_eq!(v6, same_64);
        assert_eq!(
            QuotaKey::per_source("app", ip("::ffff:198.51.100.1")),
            here,
            "a mapped source is its IPv4 address"
        );
    }

    #[test]
    fn a_reservation_holds_a_unit_until_it_ends_once() {
        let q = Quotas::default();
        let a = QuotaKey::rest("alice");
        q.take(&a, 2, 0, 0).unwrap();
        q.hold_for_reservation(7, &a);
        assert_eq!(q.reserved_ports(), 1);
        assert!(q.end_reservation(7));
        assert!(!q.end_reservation(7), "a token ends once");
        assert_eq!((q.held_by(&a), q.reserved_ports()), (1, 0));
    }

    #[test]
    fn refusals_hold_nothing_and_the_user_cap_is_named_first() {
        let q = Quotas::default();
        let a = QuotaKey::rest("alice");
        assert_eq!(q.take(&a, 3, 2, 0), Err(QuotaError::User));
        assert_eq!(q.take(&a, 2, 2, 2), Ok(()));
        assert_eq!(
            q.take(&a, 1, 2, 2),
            Err(QuotaError::User),
            "both caps hit: 486"
        );
        assert_eq!(
            q.take(&QuotaKey::rest("bob"), 1, 2, 2),
            Err(QuotaError::Total)
        );
        assert_eq!(q.total(), 2);
        assert!(q.held_by(&QuotaKey::rest("bob")) == 0);
    }

    #[test]
    fn tables_shrink_after_many_users_leave() {
        let q = Quotas::default();
        let keys: Vec<QuotaKey> = (0..20_000)
            .map(|i| QuotaKey::rest(&format!("user{i}")))
            .collect();
        for k in &keys {
            q.take(k, 1, 1, 0).unwrap();
        }
        let full = q.capacity();
        for k in &keys {
            q.give_back(k, 1);
        }
        assert_eq!(q.total(), 0);
        // Each shard keeps at most the small table not worth shrinking.
        assert!(
            q.capacity() <= SHARDS * 64 && q.capacity() * 4 < full,
            "{} slots left of {full} after every user left",
            q.capacity()
        );
    }

    #[test]
    fn concurrent_takes_never_pass_the_total() {
        let q = Arc::new(Quotas::default());
        let granted: u32 = (0..4)
            .map(|t| {
                let q = Arc::clone(&q);
                std::thread::spawn(move || {
                    (0..500)
                        .filter(|i| {
                            q.take(&QuotaKey::rest(&format!("u{t}-{i}")), 1, 1, 1000)
                                .is_ok()
                        })
                        .count() as u32
                })
            })
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(granted, 1000);
        assert_eq!(q.total(), 1000);
    }
}
