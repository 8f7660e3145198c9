//! Prometheus text exposition (format 0.0.4) of the summed shard counters. Labels are bounded
//! (transport, direction, reason, result): no per-user or per-address series.
//!
//! The core's counters describe their own series (`Stats::for_each_series`); this module adds
//! the shards' own values and the control plane's, and writes them all through one formatter.

use std::fmt::Write;

use crate::io::shard::ShardReport;
use crate::io::stream_stats::StreamCounters;
use crate::proto::stats::{Kind, Series};

/// Values the control plane adds to the shards' counters.
pub struct Extra {
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub relay_port_span: u64,
    pub draining: bool,
    pub shards_unresponsive: usize,
    pub uptime_secs: u64,
    /// When the served TLS certificate expires (unix seconds); None without TLS listeners.
    pub tls_not_after: Option<i64>,
    /// Whether the fleet's Redis is reachable; None without `[fleet]`.
    pub fleet_connected: Option<bool>,
}

/// The shards' counters added up.
pub fn sum(reports: &[ShardReport]) -> ShardReport {
    let mut t = ShardReport::default();
    for r in reports {
        // No `..`: a field added to ShardReport does not compile until it is summed here.
        let ShardReport {
            core,
            allocations,
            connections,
            relay_sockets,
            send_errors,
        } = *r;
        t.core += core;
        t.allocations += allocations;
        t.connections += connections;
        t.relay_sockets += relay_sockets;
        t.send_errors += send_errors;
    }
    t
}

const fn series(
    name: &'static str,
    kind: Kind,
    help: &'static str,
    label: Option<(&'static str, &'static str)>,
) -> Series {
    Series {
        name,
        kind,
        help,
        label,
        transport: None,
    }
}

fn by_transport(transport: &'static str, s: Series) -> Series {
    Series {
        transport: Some(transport),
        ..s
    }
}

/// The series of one stream transport's connection counters.
fn connection_series(transport: &'static str, c: &StreamCounters, out: &mut Vec<(Series, u64)>) {
    use Kind::{Counter, Gauge};
    // No `..`, as in `sum`: a counter that is not exposed does not compile.
    let StreamCounters {
        accepted,
        open,
        refused_total,
        refused_per_source,
        closed_idle,
        setup_timeouts,
        tls_errors,
        tls_closed_in_handshake,
        proxy_errors,
        bytes_in,
        bytes_out,
        frames_dropped,
    } = *c;
    const REFUSED: &str =
        "Connections turned away by a limit, by transport (the listener's) and limit.";
    const SETUP: &str = "Connections closed before their setup (PROXY header, TLS handshake) \
                         was done, by transport (the listener's for PROXY failures) and reason.";
    const BYTES: &str = "Bytes read from and written to client connections (TLS records \
                         included), by transport and direction.";
    let rows = [
        (
            series("connections_open", Gauge, "Client connections open, by transport.", None),
            open,
        ),
        (
            series(
                "connections_accepted_total",
                Counter,
                "Client connections set up (past any PROXY header and TLS handshake), by transport.",
                None,
            ),
            accepted,
        ),
        (series("connections_refused_total", Counter, REFUSED, Some(("reason", "total_limit"))), refused_total),
        (
            series("connections_refused_total", Counter, REFUSED, Some(("reason", "per_source_limit"))),
            refused_per_source,
        ),
        (series("connection_setup_failures_total", Counter, SETUP, Some(("reason", "timeout"))), setup_timeouts),
        (series("connection_setup_failures_total", Counter, SETUP, Some(("reason", "tls_error"))), tls_errors),
        (
            series("connection_setup_failures_total", Counter, SETUP, Some(("reason", "tls_hung_up"))),
            tls_closed_in_handshake,
        ),
        (series("connection_setup_failures_total", Counter, SETUP, Some(("reason", "proxy_header"))), proxy_errors),
        (
            series(
                "connections_closed_idle_total",
                Counter,
                "Connections closed for sending nothing without an allocation, by transport.",
                None,
            ),
            closed_idle,
        ),
        (series("connection_bytes_total", Counter, BYTES, Some(("direction", "in"))), bytes_in),
        (series("connection_bytes_total", Counter, BYTES, Some(("direction", "out"))), bytes_out),
        (
            series(
                "stream_frames_dropped_total",
                Counter,
                "Frames dropped for clients too far behind on reading their connection, by transport.",
                None,
            ),
            frames_dropped,
        ),
    ];
    out.extend(
        rows.into_iter()
            .map(|(s, v)| (by_transport(transport, s), v)),
    );
}

/// Every series with its value: the core's counters in their declaration order, then the
/// shards' and the control plane's values.
fn all_series(reports: &[ShardReport], extra: &Extra) -> Vec<(Series, u64)> {
    use Kind::{Counter, Gauge};
    // No `..` in either pattern, for the same reason as in `sum`.
    let ShardReport {
        mut core,
        allocations,
        connections,
        relay_sockets,
        send_errors,
    } = sum(reports);
    let Extra {
        reloads_ok,
        reloads_failed,
        relay_port_span,
        draining,
        shards_unresponsive,
        uptime_secs,
        tls_not_after,
        fleet_connected,
    } = *extra;
    let mut out = Vec::with_capacity(48);
    core.for_each_series(|s, v| out.push((s, *v)));
    let relay_sockets = relay_sockets as u64;
    const ALLOCATIONS: &str = "Allocations in force, by the transport their client uses.";
    for (transport, n) in [
        ("udp", allocations.udp),
        ("tcp", allocations.tcp),
        ("tls", allocations.tls),
    ] {
        let s = by_transport(transport, series("allocations", Gauge, ALLOCATIONS, None));
        out.push((s, n as u64));
    }
    connection_series("tcp", &connections.tcp, &mut out);
    connection_series("tls", &connections.tls, &mut out);
    if let Some(not_after) = tls_not_after {
        let s = series(
            "tls_certificate_expiry_seconds",
            Gauge,
            "When the served TLS certificate expires, in unix seconds.",
            None,
        );
        out.push((s, u64::try_from(not_after).unwrap_or(0)));
    }
    if let Some(connected) = fleet_connected {
        let s = series(
            "fleet_connected",
            Gauge,
            "1 while the fleet's Redis is reachable ([fleet]); 0: serving alone.",
            None,
        );
        out.push((s, u64::from(connected)));
    }
    out.extend([
        (
            series(
                "send_errors_total",
                Counter,
                "Sends that failed (unreachable peer, full buffer).",
                None,
            ),
            send_errors,
        ),
        (
            series("relay_sockets_open", Gauge, "Relay sockets open.", None),
            relay_sockets,
        ),
        (
            series(
                "relay_ports_free",
                Gauge,
                "Relay ports of the configured range not used by this server.",
                None,
            ),
            relay_port_span.saturating_sub(relay_sockets),
        ),
        (
            series(
                "reloads_total",
                Counter,
                "Configuration reloads, by result.",
                Some(("result", "ok")),
            ),
            reloads_ok,
        ),
        (
            series(
                "reloads_total",
                Counter,
                "Configuration reloads, by result.",
                Some(("result", "failed")),
            ),
            reloads_failed,
        ),
        (
            series(
                "draining",
                Gauge,
                "1 while the server drains before exit.",
                None,
            ),
            u64::from(draining),
        ),
        (
            series("shards", Gauge, "I/O shards (threads).", None),
            reports.len() as u64,
        ),
        (
            series(
                "shards_unresponsive",
                Gauge,
                "Shards that did not answer the last scrape.",
                None,
            ),
            shards_unresponsive as u64,
        ),
        (
            series("uptime_seconds", Gauge, "Seconds since start.", None),
            uptime_secs,
        ),
    ]);
    out
}

pub fn render(reports: &[ShardReport], extra: &Extra) -> String {
    let all = all_series(reports, extra);
    let mut o = String::with_capacity(4096);
    // The format wants a family's lines together under one HELP/TYPE, and a family's series
    // may come from different places (the core's auth failures and stale nonces).
    let mut written: Vec<&str> = Vec::new();
    for (family, _) in &all {
        if written.contains(&family.name) {
            continue;
        }
        written.push(family.name);
        let (name, kind) = (family.name, family.kind.as_str());
        let _ = writeln!(
            o,
            "# HELP turnpike_{name} {}\n# TYPE turnpike_{name} {kind}",
            family.help
        );
        for (s, v) in all.iter().filter(|(s, _)| s.name == name) {
            let _ = writeln!(o, "turnpike_{name}{} {v}", labels(s));
        }
    }
    o
}

/// `{transport="tcp",reason="x"}`, or nothing for a series without labels.
fn labels(s: &Series) -> String {
    let pairs: Vec<String> = s
        .transport
        .map(|t| ("transport", t))
        .into_iter()
        .chain(s.label)
        .map(|(key, value)| format!("{key}=\"{value}\""))
        .collect();
    if pairs.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", pairs.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::auth::AuthReject;

    fn extra() -> Extra {
        Extra {
            reloads_ok: 1,
            reloads_failed: 0,
            relay_port_span: 100,
            draining: false,
            shards_unresponsive: 0,
            uptime_secs: 5,
            tls_not_after: Some(1_900_000_000),
            fleet_connected: Some(true),
        }
    }

    #[test]
    fn sums_shards_and_every_line_is_well_formed() {
        let mut a = ShardReport::default();
        a.core.to_peer_packets = 3;
        a.core.auth_failures[AuthReject::Expired as usize] = 2;
        a.allocations.udp = 1;
        a.connections.tls.bytes_in = 5;
        let mut b = a;
        b.core.to_peer_packets = 4;
        let text = render(&[a, b], &extra());
        assert!(text.contains("turnpike_relayed_packets_total{direction=\"to_peer\"} 7\n"));
        assert!(text.contains("turnpike_auth_failures_total{reason=\"expired\"} 4\n"));
        assert!(text.contains("turnpike_allocations{transport=\"udp\"} 2\n"));
        assert!(text
            .contains("turnpike_connection_bytes_total{transport=\"tls\",direction=\"in\"} 10\n"));
        let mut types = Vec::new();
        let mut family = "";
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let (name, kind) = t.split_once(' ').unwrap();
                assert!(!types.contains(&name), "{name} declared twice");
                assert!(kind == "counter" || kind == "gauge", "{line}");
                types.push(name);
                family = name;
            } else if !line.starts_with('#') {
                let (name, value) = line.rsplit_once(' ').unwrap();
                let base = name.split_once('{').map_or(name, |(n, _)| n);
                assert_eq!(base, family, "{line} is outside its family's block");
                value.parse::<u64>().unwrap();
            }
        }
    }

    #[test]
    fn every_series_appears_summed_with_its_own_value() {
        let mut a = ShardReport {
            allocations: crate::proto::server::ByTransport {
                udp: 7001,
                tcp: 7011,
                tls: 7021,
            },
            relay_sockets: 7002,
            send_errors: 7003,
            ..ShardReport::default()
        };
        a.connections.tcp.accepted = 7031;
        a.connections.tls.frames_dropped = 7041;
        let mut n = 1;
        a.core.for_each_series(|_, v| {
            *v = n;
            n += 1;
        });
        let text = render(&[a, a], &extra());
        let mut checked = 0;
        for (s, v) in all_series(&[a, a], &extra()) {
            let line = format!("turnpike_{}{} {v}\n", s.name, labels(&s));
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
            checked += 1;
        }
        // And the core's counters are really the sum of both shards, each its own value.
        a.core.for_each_series(|s, v| {
            let line = format!("turnpike_{}{} {}\n", s.name, labels(&s), 2 * *v);
            assert!(text.contains(&line), "missing {line:?}");
        });
        assert_eq!(
            text.lines().filter(|l| !l.starts_with('#')).count(),
            checked
        );
        assert!(text.contains("turnpike_allocations{transport=\"udp\"} 14002\n"));
        assert!(text.contains("turnpike_allocations{transport=\"tls\"} 14042\n"));
        assert!(text.contains("turnpike_connections_accepted_total{transport=\"tcp\"} 14062\n"));
        assert!(text.contains("turnpike_stream_frames_dropped_total{transport=\"tls\"} 14082\n"));
        assert!(text.contains("turnpike_tls_certificate_expiry_seconds 1900000000\n"));
        assert!(text.contains("turnpike_relay_sockets_open 14004\n"));
        assert!(text.contains("turnpike_send_errors_total 14006\n"));
    }

    #[test]
    fn families_agree_on_kind_and_help() {
        let all = all_series(&[ShardReport::default()], &extra());
        for (a, _) in &all {
            for (b, _) in all.iter().filter(|(b, _)| b.name == a.name) {
                assert_eq!((a.kind, a.help), (b.kind, b.help), "{}", a.name);
            }
        }
    }

    /// Operators' dashboards and tests/control_plane.rs read these names and labels.
    #[test]
    fn series_names_and_labels_stay_as_published() {
        let text = render(&[ShardReport::default()], &extra());
        let got: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.rsplit_once(' ').unwrap().0)
            .collect();
        let mut got_sorted = got.clone();
        got_sorted.sort_unstable();
        let mut want = vec![
            "turnpike_allocations{transport=\"udp\"}",
            "turnpike_allocations{transport=\"tcp\"}",
            "turnpike_allocations{transport=\"tls\"}",
            "turnpike_tls_certificate_expiry_seconds",
            "turnpike_fleet_connected",
            "turnpike_allocations_created_total",
            "turnpike_allocations_ended_total",
            "turnpike_binding_requests_total",
            "turnpike_auth_failures_total{reason=\"wrong_password\"}",
            "turnpike_auth_failures_total{reason=\"unknown_user\"}",
            "turnpike_auth_failures_total{reason=\"expired\"}",
            "turnpike_auth_failures_total{reason=\"expiry_too_far_ahead\"}",
            "turnpike_auth_failures_total{reason=\"malformed_username\"}",
            "turnpike_auth_failures_total{reason=\"unsupported_algorithm\"}",
            "turnpike_auth_failures_total{reason=\"revoked\"}",
            "turnpike_auth_failures_total{reason=\"stale_nonce\"}",
            "turnpike_relay_to_relay_packets_total",
            "turnpike_relayed_packets_total{direction=\"to_peer\"}",
            "turnpike_relayed_packets_total{direction=\"to_client\"}",
            "turnpike_relayed_bytes_total{direction=\"to_peer\"}",
            "turnpike_relayed_bytes_total{direction=\"to_client\"}",
            "turnpike_dropped_packets_total{reason=\"no_permission\"}",
            "turnpike_dropped_packets_total{reason=\"bandwidth\"}",
            "turnpike_dropped_packets_total{reason=\"malformed\"}",
            "turnpike_send_errors_total",
            "turnpike_denied_peers_total",
            "turnpike_quota_rejections_total",
            "turnpike_rate_limited_replies_total",
            "turnpike_tcp_peer_connects_total{result=\"ok\"}",
            "turnpike_tcp_peer_connects_total{result=\"failed\"}",
            "turnpike_tcp_piped_bytes_total{direction=\"to_peer\"}",
            "turnpike_tcp_piped_bytes_total{direction=\"to_client\"}",
            "turnpike_relay_sockets_open",
            "turnpike_relay_ports_free",
            "turnpike_reloads_total{result=\"ok\"}",
            "turnpike_reloads_total{result=\"failed\"}",
            "turnpike_draining",
            "turnpike_shards",
            "turnpike_shards_unresponsive",
            "turnpike_uptime_seconds",
        ];
        let mut connection_series = Vec::new();
        for t in ["tcp", "tls"] {
            for name in [
                "connections_open".to_owned(),
                "connections_accepted_total".to_owned(),
                "connections_closed_idle_total".to_owned(),
                "stream_frames_dropped_total".to_owned(),
            ] {
                connection_series.push(format!("turnpike_{name}{{transport=\"{t}\"}}"));
            }
            for (name, label) in [
                ("connections_refused_total", "reason=\"total_limit\""),
                ("connections_refused_total", "reason=\"per_source_limit\""),
                ("connection_setup_failures_total", "reason=\"timeout\""),
                ("connection_setup_failures_total", "reason=\"tls_error\""),
                ("connection_setup_failures_total", "reason=\"tls_hung_up\""),
                ("connection_setup_failures_total", "reason=\"proxy_header\""),
                ("connection_bytes_total", "direction=\"in\""),
                ("connection_bytes_total", "direction=\"out\""),
            ] {
                connection_series.push(format!("turnpike_{name}{{transport=\"{t}\",{label}}}"));
            }
        }
        want.extend(connection_series.iter().map(String::as_str));
        want.sort_unstable();
        assert_eq!(got_sorted, want);
        for (name, kind) in [
            ("allocations", "gauge"),
            ("relay_sockets_open", "gauge"),
            ("relay_ports_free", "gauge"),
            ("draining", "gauge"),
            ("fleet_connected", "gauge"),
            ("shards", "gauge"),
            ("shards_unresponsive", "gauge"),
            ("uptime_seconds", "gauge"),
            ("auth_failures_total", "counter"),
            ("send_errors_total", "counter"),
            ("reloads_total", "counter"),
        ] {
            assert!(
                text.contains(&format!("# TYPE turnpike_{name} {kind}\n")),
                "{name}"
            );
        }
    }
}
