//! `relay`: K allocations relaying to an echo peer (built in, or --peer), or K/2 pairs
//! relaying to each other; delivered msgs/s, loss, RTT, server CPU per message.

use std::os::fd::AsRawFd;

use serde_json::json;

use crate::cli::{RelayArgs, MAX_SIZE};
use crate::echo::{EchoPeer, Pace};
use crate::phase;
use crate::report::{self, round, us, Report};
use crate::setup::{self, Plan, CHANNEL};
use crate::stun::PAYLOAD_HEADER;
use crate::sys;
use crate::traffic::{self, Flow, Framing, Load, Role};
use crate::{Ctx, Failure};

const DEFAULT_DURATION_S: f64 = 5.0;
const FLOOD_WINDOW: u32 = 32;

fn validate(a: &RelayArgs) -> Result<(), Failure> {
    if a.clients == 0 {
        return Err(Failure::Usage("--clients must be at least 1".into()));
    }
    if a.client_to_client && a.clients % 2 != 0 {
        return Err(Failure::Usage(
            "--client-to-client needs an even --clients (pairs)".into(),
        ));
    }
    if a.client_to_client && a.peer.is_some() {
        return Err(Failure::Usage(
            "--peer and --client-to-client exclude each other".into(),
        ));
    }
    if !(PAYLOAD_HEADER..=MAX_SIZE).contains(&a.size) {
        return Err(Failure::Usage(format!(
            "--size must be {PAYLOAD_HEADER}..={MAX_SIZE} bytes"
        )));
    }
    if let Some(d) = a.duration_secs {
        if !(d > 0.0 && d < 86_400.0) {
            return Err(Failure::Usage("--duration-secs must be above 0".into()));
        }
    }
    if a.messages == Some(0) || a.in_flight == 0 {
        return Err(Failure::Usage(
            "--messages and --in-flight must be at least 1".into(),
        ));
    }
    Ok(())
}

pub fn run(ctx: &Ctx, a: &RelayArgs) -> Result<Report, Failure> {
    validate(a)?;
    let echo = match (a.peer, a.client_to_client) {
        (None, false) => Some(EchoPeer::start(
            ctx.local_ip,
            Pace {
                tick: (a.rate > 0).then_some(traffic::TICK),
                tag: ctx.tag,
            },
        )?),
        _ => None,
    };
    let peer = a.peer.or(echo.as_ref().map(|e| e.addr));
    let framing = if a.send_indication {
        Framing::SendIndication
    } else {
        Framing::ChannelData
    };
    let plan = Plan {
        channel: !a.send_indication,
        pairs: a.client_to_client,
    };
    let opened = phase::open(ctx, a.clients, peer)?;
    let mut est = phase::establish(ctx, opened, a.in_flight, plan)?;
    let setup_failed = phase::failures_json(&est.sessions);

    let sessions = &est.sessions;
    let mut flows: Vec<Flow> = Vec::with_capacity(sessions.len());
    for (i, s) in sessions.iter().enumerate() {
        let usable = setup::is_ok(s) && (!a.client_to_client || setup::is_ok(&sessions[i ^ 1]));
        let role = match (usable, a.client_to_client) {
            (false, _) => Role::Idle,
            (true, true) if i % 2 == 1 => Role::Echoer,
            (true, _) => Role::Sender,
        };
        let target = s.peer.unwrap_or(ctx.server);
        flows.push(Flow::new(
            s.sock.as_raw_fd(),
            role,
            framing,
            CHANNEL,
            target,
            a.size,
        ));
    }
    let senders = flows.iter().filter(|f| f.role == Role::Sender).count();
    if senders == 0 {
        let _ = phase::delete_all(ctx, &mut est, a.in_flight);
        return Err(Failure::Run(format!(
            "no client pair could be set up at {}",
            ctx.server
        )));
    }
    let duration_s = match (a.duration_secs, a.messages) {
        (Some(d), _) => Some(d),
        (None, None) => Some(DEFAULT_DURATION_S),
        (None, Some(_)) => None,
    };
    let load = Load {
        framing,
        rate: a.rate,
        duration_ns: duration_s.map(|d| (d * 1e9) as u64),
        messages: a.messages,
        window: a
            .window
            .unwrap_or(if a.rate == 0 { FLOOD_WINDOW } else { 0 }),
        drain_ns: a.drain_ms * 1_000_000,
        deadline_ns: ctx.deadline_ns,
        tag: ctx.tag,
    };
    if a.rate == 0 && load.window == 0 {
        return Err(Failure::Usage(
            "a flood (--rate 0) needs --window of at least 1".into(),
        ));
    }
    let server0 = ctx.server_proc.sample();
    let load0 = sys::cpu_us(false);
    let peer0 = echo.as_ref().map_or(0, |e| e.cpu_us());
    let out = traffic::run(&mut est.poll, &mut flows, &load)
        .map_err(|e| Failure::Run(format!("relay: {e}")))?;
    let load1 = sys::cpu_us(false);
    let peer1 = echo.as_ref().map_or(0, |e| e.cpu_us());
    let echoed = echo.as_ref().map(|e| e.echoed());
    let server1 = ctx.server_proc.sample();
    if out.timed_out {
        setup::abandon(&mut est.sessions, &mut est.txids);
        return Err(ctx.timeout());
    }
    let undeleted = phase::delete_all(ctx, &mut est, a.in_flight)?;
    if out.delivered == 0 && out.refused {
        return Err(Failure::Run(format!(
            "nothing came back from {}: port unreachable",
            ctx.server
        )));
    }

    let send_s = (out.send_end_ns - out.start_ns) as f64 / 1e9;
    let msgs_per_sec = if send_s > 0.0 {
        out.delivered as f64 / send_s
    } else {
        0.0
    };
    let lost = out.sent.saturating_sub(out.delivered);
    let loss_pct = if out.sent > 0 {
        lost as f64 * 100.0 / out.sent as f64
    } else {
        0.0
    };
    let server_cpu_s = match (server0, server1) {
        (Some(x), Some(y)) => Some(y.cpu_us.saturating_sub(x.cpu_us) as f64 / 1e6),
        _ => None,
    };
    let per_msg = server_cpu_s
        .filter(|_| out.delivered > 0)
        .map(|c| c * 1e6 / out.delivered as f64);
    let load_cpu_s = load1.saturating_sub(load0) as f64 / 1e6;
    let peer_cpu_s = peer1.saturating_sub(peer0) as f64 / 1e6;
    let (check, warning) = report::self_check(load_cpu_s, server_cpu_s);
    let rtt = out.rtt.summary();
    let mode_name = match (a.client_to_client, a.send_indication) {
        (true, true) => "client-to-client, Send/Data indications",
        (true, false) => "client-to-client, ChannelData",
        (false, true) => "echo peer, Send/Data indications",
        (false, false) => "echo peer, ChannelData",
    };
    let mut r = Report::new(json!({
        "mode": "relay",
        "sent": out.sent,
        "delivered": out.delivered,
        "lost": lost,
        "loss_pct": round(loss_pct, 3),
        "msgs_per_sec": round(msgs_per_sec, 1),
        "rtt_us": {"p50": rtt.p50, "p90": rtt.p90, "p99": rtt.p99, "max": rtt.max},
        "server_cpu_us_per_msg": per_msg.map(|v| round(v, 3)),
        "server_cpu_s": server_cpu_s.map(|v| round(v, 4)),
        "load_cpu_s": round(load_cpu_s, 4),
        "self_check": check,
        "peer_cpu_s": round(peer_cpu_s, 4),
        "peer_echoed": echoed,
        "clients": a.clients,
        "senders": senders,
        "setup_failed": setup_failed,
        "rate": a.rate,
        "size": a.size,
        "framing": if a.send_indication { "send-indication" } else { "channel-data" },
        "client_to_client": a.client_to_client,
        "window": load.window,
        "send_s": round(send_s, 4),
        "duplicates": out.duplicates,
        "strays": out.strays,
        "send_errors": out.send_errors,
        "skipped": out.skipped,
        "undeleted": undeleted,
    }));
    r.warning = warning;
    r.line("server", ctx.server.to_string());
    r.line(
        "relay",
        format!(
            "{mode_name}, {senders} senders of {} clients, {} B payload",
            a.clients, a.size
        ),
    );
    r.line(
        "offered",
        if a.rate == 0 {
            format!("flood, window {}", load.window)
        } else {
            format!("{} msgs/s", a.rate)
        },
    );
    if !setup_failed.is_empty() {
        let f: Vec<String> = setup_failed
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        r.line("setup failed", f.join(", "));
    }
    r.line(
        "delivered",
        format!(
            "{} of {} sent ({msgs_per_sec:.0} msgs/s over {send_s:.3} s)",
            out.delivered, out.sent
        ),
    );
    r.line("lost", format!("{lost} ({loss_pct:.3}%)"));
    r.line(
        "RTT p50 / p90 / p99 / max",
        format!(
            "{} / {} / {} / {}",
            us(rtt.p50),
            us(rtt.p90),
            us(rtt.p99),
            us(rtt.max)
        ),
    );
    if let Some(c) = per_msg {
        r.line("server CPU", format!("{} per message", us(c)));
    }
    r.line(
        "CPU (send + drain)",
        match server_cpu_s {
            Some(s) => format!(
                "generator {load_cpu_s:.3} s (echo peer {peer_cpu_s:.3} s), server {s:.3} s"
            ),
            None => format!("generator {load_cpu_s:.3} s (echo peer {peer_cpu_s:.3} s)"),
        },
    );
    if out.duplicates + out.send_errors + out.skipped > 0 {
        r.line(
            "anomalies",
            format!(
                "{} duplicates, {} sends refused by the kernel, {} skipped (window full)",
                out.duplicates, out.send_errors, out.skipped
            ),
        );
    }
    if undeleted > 0 {
        r.line("not deleted", format!("{undeleted} allocations"));
    }
    Ok(r)
}
