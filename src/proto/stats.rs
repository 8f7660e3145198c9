//! What the core counts: per-shard counters the control plane sums and exposes.
//!
//! Every counter is declared once, in the `counters!` list below, together with the
//! Prometheus series it feeds: the struct field, the sum over shards (`AddAssign`) and the
//! exposition table all come from that one line, so a new counter can neither be summed as 0
//! nor be missing from `/metrics`.

use std::ops::AddAssign;

use super::auth::AuthReject;

/// Prometheus metric types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// One exposed series. Families (same `name`) share `kind` and `help`; labels are bounded
/// (at most one, with a fixed set of values), never per user or address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Series {
    /// Without the `turnpike_` prefix.
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub label: Option<(&'static str, &'static str)>,
    /// The `transport` label (`udp`, `tcp`, `tls`), for series split by it as well.
    pub transport: Option<&'static str>,
}

/// Declares [`Stats`], its `AddAssign` and [`Stats::for_each_series`] from one list of
/// `field: type => "series name" { label } "help";`. The label is empty, `key = "value"`, or
/// `key in LIST` for an array with one series per item of `LIST` (an enum list): the item's
/// `as usize` is its index, its `as_str()` the label value.
macro_rules! counters {
    (@add $a:expr, $b:expr, $key:ident in $all:expr) => {
        for (a, b) in $a.iter_mut().zip($b) {
            *a += b;
        }
    };
    (@add $a:expr, $b:expr, $($label:tt)*) => {
        $a += $b
    };
    (@visit $f:ident, $v:expr, $name:literal, $help:literal, $key:ident in $all:expr) => {
        for r in $all {
            let label = Some((stringify!($key), r.as_str()));
            $f(Series { name: $name, kind: Kind::Counter, help: $help, label, transport: None }, &mut $v[r as usize]);
        }
    };
    (@visit $f:ident, $v:expr, $name:literal, $help:literal, $key:ident = $value:literal) => {
        let label = Some((stringify!($key), $value));
        $f(Series { name: $name, kind: Kind::Counter, help: $help, label, transport: None }, &mut $v)
    };
    (@visit $f:ident, $v:expr, $name:literal, $help:literal,) => {
        $f(Series { name: $name, kind: Kind::Counter, help: $help, label: None, transport: None }, &mut $v)
    };
    ($(
        $(#[$doc:meta])*
        $field:ident: $ty:ty => $name:literal { $($label:tt)* } $help:literal;
    )*) => {
        /// Per-shard counters; the control plane sums them.
        #[derive(Debug, Clone, Copy, Default)]
        pub struct Stats {
            $($(#[$doc])* pub $field: $ty,)*
        }

        impl AddAssign for Stats {
            fn add_assign(&mut self, rhs: Stats) {
                $(counters!(@add self.$field, rhs.$field, $($label)*);)*
            }
        }

        impl Stats {
            /// Every series these counters feed, in declaration order, with its value (mutable,
            /// so a test can give each one its own).
            pub fn for_each_series(&mut self, mut f: impl FnMut(Series, &mut u64)) {
                $(counters!(@visit f, self.$field, $name, $help, $($label)*);)*
            }
        }
    };
}

counters! {
    allocations_created: u64 => "allocations_created_total" {} "Allocations created.";
    allocations_ended: u64 => "allocations_ended_total" {}
        "Allocations ended (expired, deleted, killed, revoked).";
    binding_requests: u64 => "binding_requests_total" {} "STUN Binding requests answered.";
    to_peer_packets: u64 => "relayed_packets_total" { direction = "to_peer" }
        "Datagrams relayed, by direction.";
    to_peer_bytes: u64 => "relayed_bytes_total" { direction = "to_peer" }
        "Payload bytes relayed, by direction.";
    to_client_packets: u64 => "relayed_packets_total" { direction = "to_client" }
        "Datagrams relayed, by direction.";
    to_client_bytes: u64 => "relayed_bytes_total" { direction = "to_client" }
        "Payload bytes relayed, by direction.";
    /// Also counted once each way in `relayed_packets_total`, as any relayed datagram.
    relayed_in_process: u64 => "relay_to_relay_packets_total" {}
        "Datagrams one of our relays sent to another of this shard, delivered without a kernel hop.";
    dropped_no_permission: u64 => "dropped_packets_total" { reason = "no_permission" }
        "Datagrams dropped, by reason.";
    dropped_bandwidth: u64 => "dropped_packets_total" { reason = "bandwidth" }
        "Datagrams dropped, by reason.";
    dropped_malformed: u64 => "dropped_packets_total" { reason = "malformed" }
        "Datagrams dropped, by reason.";
    denied_peers: u64 => "denied_peers_total" {} "Peer addresses refused by the peer policy.";
    quota_rejections: u64 => "quota_rejections_total" {}
        "Requests refused by a quota or while draining.";
    /// Refused credentials, indexed by [`AuthReject`] (`reason as usize`).
    auth_failures: [u64; AuthReject::COUNT] => "auth_failures_total"
        { reason in AuthReject::ALL }
        "Requests whose credentials were refused, by reason.";
    stale_nonces: u64 => "auth_failures_total" { reason = "stale_nonce" }
        "Requests whose credentials were refused, by reason.";
    rate_limited: u64 => "rate_limited_replies_total" {}
        "Unauthenticated replies suppressed by the per-source limit.";
    tcp_connects_ok: u64 => "tcp_peer_connects_total" { result = "ok" }
        "Connect requests of TCP allocations (RFC 6062), by result.";
    tcp_connects_failed: u64 => "tcp_peer_connects_total" { result = "failed" }
        "Connect requests of TCP allocations (RFC 6062), by result.";
    /// Counted as a pipe runs, every 256 KiB, and when it ends.
    tcp_piped_to_peer_bytes: u64 => "tcp_piped_bytes_total" { direction = "to_peer" }
        "Bytes passed through TCP relay connections (RFC 6062), by direction.";
    tcp_piped_to_client_bytes: u64 => "tcp_piped_bytes_total" { direction = "to_client" }
        "Bytes passed through TCP relay connections (RFC 6062), by direction.";
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gives every series its own value, from `base` up.
    fn numbered(base: u64) -> Stats {
        let mut s = Stats::default();
        let mut n = base;
        s.for_each_series(|_, v| {
            *v = n;
            n += 1;
        });
        s
    }

    fn values(mut s: Stats) -> Vec<u64> {
        let mut out = Vec::new();
        s.for_each_series(|_, v| out.push(*v));
        out
    }

    #[test]
    fn every_series_has_its_own_value_and_add_assign_sums_each() {
        let (a, b) = (numbered(1), numbered(1000));
        let distinct: std::collections::HashSet<u64> = values(a).into_iter().collect();
        assert_eq!(distinct.len(), values(a).len(), "two series read one value");
        let mut sum = a;
        sum += b;
        let want: Vec<u64> = values(a)
            .iter()
            .zip(values(b))
            .map(|(x, y)| x + y)
            .collect();
        assert_eq!(values(sum), want);
    }
}
