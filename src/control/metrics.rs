//! Prometheus text exposition (format 0.0.4) of the summed shard counters. Labels are bounded
//! (transport, direction, reason): no per-user or per-address series.

use std::fmt::Write;

use crate::io::shard::ShardReport;
use crate::proto::server::AuthFailure;

/// Values the control plane adds to the shards' counters.
pub struct Extra {
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub relay_port_span: u64,
    pub draining: bool,
    pub shards_unresponsive: usize,
    pub uptime_secs: u64,
}

/// The shards' counters added up.
pub fn sum(reports: &[ShardReport]) -> ShardReport {
    let mut t = ShardReport::default();
    for r in reports {
        let (c, s) = (&mut t.core, &r.core);
        c.allocations_created += s.allocations_created;
        c.allocations_ended += s.allocations_ended;
        c.binding_requests += s.binding_requests;
        c.to_peer_packets += s.to_peer_packets;
        c.to_peer_bytes += s.to_peer_bytes;
        c.to_client_packets += s.to_client_packets;
        c.to_client_bytes += s.to_client_bytes;
        c.dropped_no_permission += s.dropped_no_permission;
        c.dropped_bandwidth += s.dropped_bandwidth;
        c.dropped_malformed += s.dropped_malformed;
        c.denied_peers += s.denied_peers;
        c.quota_rejections += s.quota_rejections;
        c.stale_nonces += s.stale_nonces;
        c.rate_limited += s.rate_limited;
        for (a, b) in c.auth_failures.iter_mut().zip(s.auth_failures) {
            *a += b;
        }
        t.allocations += r.allocations;
        t.relay_sockets += r.relay_sockets;
        t.send_errors += r.send_errors;
    }
    t
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(
            self.0,
            "# HELP turnpike_{name} {help}\n# TYPE turnpike_{name} {kind}"
        );
    }

    fn value(&mut self, name: &str, labels: &str, v: u64) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "turnpike_{name} {v}");
        } else {
            let _ = writeln!(self.0, "turnpike_{name}{{{labels}}} {v}");
        }
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, v: u64) {
        self.family(name, kind, help);
        self.value(name, "", v);
    }
}

pub fn render(reports: &[ShardReport], extra: &Extra) -> String {
    let t = sum(reports);
    let c = &t.core;
    let mut o = Out(String::with_capacity(4096));
    o.family("allocations", "gauge", "Allocations in force.");
    o.value("allocations", "transport=\"udp\"", t.allocations as u64);
    o.single(
        "allocations_created_total",
        "counter",
        "Allocations created.",
        c.allocations_created,
    );
    o.single(
        "allocations_ended_total",
        "counter",
        "Allocations ended (expired, deleted, killed, revoked).",
        c.allocations_ended,
    );
    o.single(
        "binding_requests_total",
        "counter",
        "STUN Binding requests answered.",
        c.binding_requests,
    );
    o.family(
        "auth_failures_total",
        "counter",
        "Requests whose credentials were refused, by reason.",
    );
    for reason in AuthFailure::ALL {
        o.value(
            "auth_failures_total",
            &format!("reason=\"{}\"", reason.as_str()),
            c.auth_failures[reason as usize],
        );
    }
    o.value(
        "auth_failures_total",
        "reason=\"stale_nonce\"",
        c.stale_nonces,
    );
    o.family(
        "relayed_packets_total",
        "counter",
        "Datagrams relayed, by direction.",
    );
    o.value(
        "relayed_packets_total",
        "direction=\"to_peer\"",
        c.to_peer_packets,
    );
    o.value(
        "relayed_packets_total",
        "direction=\"to_client\"",
        c.to_client_packets,
    );
    o.family(
        "relayed_bytes_total",
        "counter",
        "Payload bytes relayed, by direction.",
    );
    o.value(
        "relayed_bytes_total",
        "direction=\"to_peer\"",
        c.to_peer_bytes,
    );
    o.value(
        "relayed_bytes_total",
        "direction=\"to_client\"",
        c.to_client_bytes,
    );
    o.family(
        "dropped_packets_total",
        "counter",
        "Datagrams dropped, by reason.",
    );
    o.value(
        "dropped_packets_total",
        "reason=\"no_permission\"",
        c.dropped_no_permission,
    );
    o.value(
        "dropped_packets_total",
        "reason=\"bandwidth\"",
        c.dropped_bandwidth,
    );
    o.value(
        "dropped_packets_total",
        "reason=\"malformed\"",
        c.dropped_malformed,
    );
    o.single(
        "send_errors_total",
        "counter",
        "Sends that failed (unreachable peer, full buffer).",
        t.send_errors,
    );
    o.single(
        "denied_peers_total",
        "counter",
        "Peer addresses refused by the peer policy.",
        c.denied_peers,
    );
    o.single(
        "quota_rejections_total",
        "counter",
        "Requests refused by a quota or while draining.",
        c.quota_rejections,
    );
    o.single(
        "rate_limited_replies_total",
        "counter",
        "Unauthenticated replies suppressed by the per-source limit.",
        c.rate_limited,
    );
    o.single(
        "relay_sockets_open",
        "gauge",
        "Relay sockets open.",
        t.relay_sockets as u64,
    );
    o.single(
        "relay_ports_free",
        "gauge",
        "Relay ports of the configured range not used by this server.",
        extra.relay_port_span.saturating_sub(t.relay_sockets as u64),
    );
    o.family(
        "reloads_total",
        "counter",
        "Configuration reloads, by result.",
    );
    o.value("reloads_total", "result=\"ok\"", extra.reloads_ok);
    o.value("reloads_total", "result=\"failed\"", extra.reloads_failed);
    o.single(
        "draining",
        "gauge",
        "1 while the server drains before exit.",
        extra.draining as u64,
    );
    o.single(
        "shards",
        "gauge",
        "I/O shards (threads).",
        reports.len() as u64,
    );
    o.single(
        "shards_unresponsive",
        "gauge",
        "Shards that did not answer the last scrape.",
        extra.shards_unresponsive as u64,
    );
    o.single(
        "uptime_seconds",
        "gauge",
        "Seconds since start.",
        extra.uptime_secs,
    );
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_shards_and_every_line_is_well_formed() {
        let mut a = ShardReport::default();
        a.core.to_peer_packets = 3;
        a.core.auth_failures[AuthFailure::Expired as usize] = 2;
        a.allocations = 1;
        let mut b = a;
        b.core.to_peer_packets = 4;
        let extra = Extra {
            reloads_ok: 1,
            reloads_failed: 0,
            relay_port_span: 100,
            draining: false,
            shards_unresponsive: 0,
            uptime_secs: 5,
        };
        let text = render(&[a, b], &extra);
        assert!(text.contains("turnpike_relayed_packets_total{direction=\"to_peer\"} 7\n"));
        assert!(text.contains("turnpike_auth_failures_total{reason=\"expired\"} 4\n"));
        assert!(text.contains("turnpike_allocations{transport=\"udp\"} 2\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("turnpike_"), "{line}");
            value.parse::<u64>().unwrap();
        }
    }
}
