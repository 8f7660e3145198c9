//! Usage records: what each allocation carried, for billing and monitoring. One when an
//! allocation ends and, if the I/O layer asks (`Core::interim_usage`), one per live allocation
//! at each interval. Off unless the I/O layer turns them on: nothing is queued then.

use std::net::SocketAddr;
use std::time::Instant;

use super::Core;
use crate::proto::allocation::{Allocation, Counters};
use crate::proto::error::EndReason;
use crate::proto::Transport;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    pub kind: UsageKind,
    /// Unique per allocation (not secret); the same in its interim and end records, its log
    /// lines and `turnpike sessions`.
    pub id: u64,
    pub user: Box<str>,
    pub client: SocketAddr,
    pub transport: Transport,
    /// The advertised relay addresses (IPv4 first).
    pub relays: Vec<SocketAddr>,
    pub start_unix: u64,
    /// When the allocation ended (an end record) or when this interim record was taken.
    pub at_unix: u64,
    /// Totals since the allocation began.
    pub counters: Counters,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageKind {
    Interim,
    End(EndReason),
}

impl UsageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageKind::Interim => "interim",
            UsageKind::End(_) => "end",
        }
    }
}

impl Core {
    /// Queue usage records from now on (see [`Core::poll_usage`]), or stop.
    pub fn set_usage_records(&mut self, on: bool) {
        self.usage_on = on;
        if !on {
            self.usage.clear();
        }
    }

    /// The next usage record for the I/O layer; drain it with the commands.
    pub fn poll_usage(&mut self) -> Option<UsageRecord> {
        self.usage.pop_front()
    }

    /// Queues an interim record for every live allocation.
    pub fn interim_usage(&mut self, now: Instant) {
        if !self.usage_on {
            return;
        }
        let records: Vec<_> = self
            .slots
            .iter()
            .filter_map(|s| s.alloc.as_deref())
            .map(|a| self.usage_record(a, now, UsageKind::Interim))
            .collect();
        self.usage.extend(records);
    }

    pub(super) fn record_end(&mut self, a: &Allocation, now: Instant, why: EndReason) {
        if self.usage_on {
            let r = self.usage_record(a, now, UsageKind::End(why));
            self.usage.push_back(r);
        }
    }

    fn usage_record(&self, a: &Allocation, now: Instant, kind: UsageKind) -> UsageRecord {
        UsageRecord {
            kind,
            id: a.id,
            user: a.username.clone(),
            client: a.five_tuple.client,
            transport: a.five_tuple.transport,
            relays: a.relays.iter().flatten().map(|r| r.advertised).collect(),
            start_unix: self.shared.unix_time(a.created),
            at_unix: self.shared.unix_time(now),
            counters: a.counters,
        }
    }
}
