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
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use super::ratelimit::SourceKey;

/// What one quota counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QuotaKey {
    pub user: Box<str>,
    /// Set for static users: their count is per source.
    pub source: Option<SourceKey>,
}

impl QuotaKey {
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

/// Units held: one per live allocation and one per unclaimed port reservation.
#[derive(Debug, Default)]
pub struct Quotas {
    held: Mutex<HashMap<QuotaKey, u32>>,
    total: AtomicU32,
    /// Reservation token -> the key its unit is held under.
    reservations: Mutex<HashMap<u64, QuotaKey>>,
}

impl Quotas {
    /// Takes `units` for `key` if both caps allow them all (0 = no cap).
    pub fn take(
        &self,
        key: &QuotaKey,
        units: u32,
        per_key: u32,
        total: u32,
    ) -> Result<(), QuotaError> {
        let mut held = lock(&self.held);
        let count = held.get(key).copied().unwrap_or(0);
        if per_key != 0 && count + units > per_key {
            return Err(QuotaError::User);
        }
        // The total moves only under this lock, so the check and the add cannot race.
        if total != 0 && self.total.load(Ordering::Relaxed) + units > total {
            return Err(QuotaError::Total);
        }
        self.total.fetch_add(units, Ordering::Relaxed);
        *held.entry(key.clone()).or_insert(0) += units;
        Ok(())
    }

    pub fn give_back(&self, key: &QuotaKey, units: u32) {
        let mut held = lock(&self.held);
        if let Some(c) = held.get_mut(key) {
            let n = units.min(*c);
            *c -= n;
            if *c == 0 {
                held.remove(key);
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
        let key = lock(&self.reservations).remove(&token);
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
        lock(&self.held).get(key).copied().unwrap_or(0)
    }

    /// Every key and its units (the soak test's accounting check).
    #[cfg(test)]
    pub fn snapshot(&self) -> HashMap<QuotaKey, u32> {
        lock(&self.held).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
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
}
