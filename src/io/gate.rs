//! Admission of TCP and TLS connections: a cap on all of them and one per source address (IPv6
//! by /64, as the rate limiter counts). Every shard accepts from the same listening sockets, so
//! the counts are shared; they are touched once when a connection opens and once when it
//! closes, never per packet, so a mutex costs nothing that matters.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::proto::ratelimit::SourceKey;

#[derive(Debug, Default)]
pub struct ConnectionGate {
    total: AtomicUsize,
    max_total: AtomicU32,
    /// 0 = no per-source cap.
    max_per_source: AtomicU32,
    per_source: Mutex<HashMap<SourceKey, u32>>,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerSource,
}

/// Holds one place in the total until dropped.
#[derive(Debug)]
pub struct Admitted {
    gate: Arc<ConnectionGate>,
}

/// Holds one place under a source address until dropped.
#[derive(Debug)]
pub struct SourceAdmitted {
    gate: Arc<ConnectionGate>,
    key: SourceKey,
}

impl ConnectionGate {
    pub fn new(max_total: u32, max_per_source: u32) -> Arc<Self> {
        let gate = Arc::new(ConnectionGate::default());
        gate.set_limits(max_total, max_per_source);
        gate
    }

    /// Reloaded limits apply to new connections; those already open stay.
    pub fn set_limits(&self, max_total: u32, max_per_source: u32) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_source.store(max_per_source, Ordering::Relaxed);
    }

    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// A place in the total, taken at accept, before a byte is read.
    pub fn admit(self: &Arc<Self>) -> Result<Admitted, Refusal> {
        let max = self.max_total.load(Ordering::Relaxed) as usize;
        let taken = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(Admitted {
                gate: Arc::clone(self),
            }),
            Err(_) => Err(Refusal::Total),
        }
    }

    /// A place under the client's address: taken once the address is known, which behind a
    /// PROXY-protocol balancer is after its header.
    pub fn admit_source(self: &Arc<Self>, ip: IpAddr) -> Result<SourceAdmitted, Refusal> {
        let max = self.max_per_source.load(Ordering::Relaxed);
        let key = SourceKey::of(ip);
        let mut table = self.lock();
        let count = table.entry(key).or_insert(0);
        // A refused source already holds places (max >= 1), so its entry stays either way.
        if max != 0 && *count >= max {
            return Err(Refusal::PerSource);
        }
        *count += 1;
        Ok(SourceAdmitted {
            gate: Arc::clone(self),
            key,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SourceKey, u32>> {
        self.per_source.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.gate.total.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for SourceAdmitted {
    fn drop(&mut self) {
        let mut table = self.gate.lock();
        if let Some(count) = table.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                // An address that has gone costs nothing: the table holds only open sources.
                table.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_and_each_source_are_capped_and_places_come_back() {
        let gate = ConnectionGate::new(3, 2);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        let b_same_64: IpAddr = "2001:db8:0:1::ffff".parse().unwrap();
        let t: Vec<_> = (0..3).map(|_| gate.admit().unwrap()).collect();
        assert_eq!(gate.admit().unwrap_err(), Refusal::Total);
        assert_eq!(gate.open(), 3);
        drop(t);
        assert_eq!(gate.open(), 0);

        let a1 = gate.admit_source(a).unwrap();
        let _a2 = gate.admit_source(a).unwrap();
        assert_eq!(gate.admit_source(a).unwrap_err(), Refusal::PerSource);
        let _b1 = gate.admit_source(b).unwrap();
        let _b2 = gate.admit_source(b_same_64).unwrap();
        assert_eq!(gate.admit_source(b).unwrap_err(), Refusal::PerSource);
        drop(a1);
        let _a3 = gate.admit_source(a).unwrap();
    }

    #[test]
    fn closed_sources_leave_no_entry() {
        let gate = ConnectionGate::new(10, 0);
        for i in 0..100u8 {
            drop(gate.admit_source(IpAddr::from([198, 51, 100, i])).unwrap());
        }
        assert!(gate.lock().is_empty());
        // 0 = no per-source cap.
        let held: Vec<_> = (0..50)
            .map(|_| gate.admit_source("192.0.2.1".parse().unwrap()).unwrap())
            .collect();
        assert_eq!(gate.lock().len(), 1);
        drop(held);
        gate.set_limits(10, 1);
        let _one = gate.admit_source("192.0.2.1".parse().unwrap()).unwrap();
        assert!(gate.admit_source("192.0.2.1".parse().unwrap()).is_err());
        assert_eq!(gate.lock().len(), 1);
    }
}
