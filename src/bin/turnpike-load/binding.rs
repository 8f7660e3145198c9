//! `binding`: STUN Binding requests from K sockets, paced or flooding with a window; answers/s,
//! RTT and server CPU per request. One retransmitted probe first tells "unreachable" apart.

use std::os::fd::AsRawFd;
use std::time::Duration;

use serde_json::json;

use crate::cli::BindingArgs;
use crate::report::{self, round, us, Report};
use crate::stun::{self, Request};
use crate::sys::{self, Batch, Epoll};
use crate::traffic::{self, Flow, Framing, Load, Role};
use crate::{Ctx, Failure};

const DEFAULT_DURATION_S: f64 = 5.0;
/// The probe's tries: as for every request, three, the last given longer.
const PROBE_WAIT_MS: [u64; 3] = [100, 200, 800];

/// One Binding request, retransmitted, on the first socket.
fn probe(ctx: &Ctx, poll: &mut Epoll, sock: &socket2::Socket) -> Result<(), Failure> {
    let fd = sock.as_raw_fd();
    let mut buf = Vec::new();
    let mut txid = [0u8; 12];
    txid[..4].copy_from_slice(&ctx.tag.to_be_bytes());
    txid[4] = 0xFF; // never a load request's id (those start with a sequence number)
    stun::write_request(&mut buf, Request::Binding, txid, None);
    let mut batch = Batch::new(8, false);
    let mut tokens = Vec::new();
    let started = sys::now_ns();
    let mut refused = false;
    for wait in PROBE_WAIT_MS {
        let _ = sys::send_one(fd, &buf);
        let until = sys::now_ns() + wait * 1_000_000;
        while sys::now_ns() < until {
            let left = Duration::from_nanos(until.saturating_sub(sys::now_ns()));
            poll.wait(left.max(Duration::from_millis(1)), &mut tokens)?;
            let n = match batch.recv(fd, false) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    refused = true;
                    0
                }
                Err(e) => return Err(e.into()),
            };
            for d in 0..n {
                if stun::read_answer(batch.datagram(d)).is_some_and(|a| a.txid == txid) {
                    return Ok(());
                }
            }
        }
    }
    let secs = (sys::now_ns() - started) as f64 / 1e9;
    Err(Failure::Run(format!(
        "no answer from {} after {secs:.1} s{}",
        ctx.server,
        if refused {
            ": port unreachable (is a STUN server listening there?)"
        } else {
            ""
        }
    )))
}

pub fn run(ctx: &Ctx, a: &BindingArgs) -> Result<Report, Failure> {
    if a.clients == 0 || a.requests == Some(0) {
        return Err(Failure::Usage(
            "--clients and --requests must be at least 1".into(),
        ));
    }
    if a.rate == 0 && a.window == 0 {
        return Err(Failure::Usage(
            "a flood (--rate 0) needs --window of at least 1".into(),
        ));
    }
    if let Some(d) = a.duration_secs {
        if !(d > 0.0 && d < 86_400.0) {
            return Err(Failure::Usage("--duration-secs must be above 0".into()));
        }
    }
    if a.requests.is_some_and(|n| n > u64::from(u32::MAX)) {
        return Err(Failure::Usage("--requests is at most 2^32-1".into()));
    }
    let mut poll = Epoll::new()?;
    let mut socks = Vec::with_capacity(a.clients);
    for i in 0..a.clients {
        let s = sys::client_socket(ctx.local(), ctx.server)
            .map_err(|e| Failure::Run(format!("cannot open client socket: {e}")))?;
        poll.add(s.as_raw_fd(), i as u64)?;
        socks.push(s);
    }
    probe(ctx, &mut poll, &socks[0])?;
    let mut flows: Vec<Flow> = socks
        .iter()
        .map(|s| {
            Flow::new(
                s.as_raw_fd(),
                Role::Sender,
                Framing::Binding,
                0,
                ctx.server,
                0,
            )
        })
        .collect();
    let duration_s = match (a.duration_secs, a.requests) {
        (Some(d), _) => Some(d),
        (None, None) => Some(DEFAULT_DURATION_S),
        (None, Some(_)) => None,
    };
    let load = Load {
        framing: Framing::Binding,
        rate: a.rate,
        duration_ns: duration_s.map(|d| (d * 1e9) as u64),
        messages: a.requests,
        window: a.window,
        drain_ns: a.drain_ms * 1_000_000,
        deadline_ns: ctx.deadline_ns,
        tag: ctx.tag,
    };
    let server0 = ctx.server_proc.sample();
    let load0 = sys::cpu_us(false);
    let out = traffic::run(&mut poll, &mut flows, &load)
        .map_err(|e| Failure::Run(format!("binding: {e}")))?;
    let load1 = sys::cpu_us(false);
    let server1 = ctx.server_proc.sample();
    if out.timed_out {
        return Err(ctx.timeout());
    }
    let send_s = (out.send_end_ns - out.start_ns) as f64 / 1e9;
    let per_sec = if send_s > 0.0 {
        out.delivered as f64 / send_s
    } else {
        0.0
    };
    let server_cpu_s = match (server0, server1) {
        (Some(x), Some(y)) => Some(y.cpu_us.saturating_sub(x.cpu_us) as f64 / 1e6),
        _ => None,
    };
    let per_req = server_cpu_s
        .filter(|_| out.delivered > 0)
        .map(|c| c * 1e6 / out.delivered as f64);
    let load_cpu_s = load1.saturating_sub(load0) as f64 / 1e6;
    let (check, warning) = report::self_check(load_cpu_s, server_cpu_s);
    let rtt = out.rtt.summary();
    let unanswered = out.sent.saturating_sub(out.delivered);
    let mut r = Report::new(json!({
        "mode": "binding",
        "sent": out.sent,
        "answered": out.delivered,
        "per_sec": round(per_sec, 1),
        "rtt_us": {"p50": rtt.p50, "p99": rtt.p99, "p90": rtt.p90, "max": rtt.max},
        "server_cpu_us_per_req": per_req.map(|v| round(v, 3)),
        "server_cpu_s": server_cpu_s.map(|v| round(v, 4)),
        "load_cpu_s": round(load_cpu_s, 4),
        "self_check": check,
        "unanswered": unanswered,
        "clients": a.clients,
        "rate": a.rate,
        "window": a.window,
        "send_s": round(send_s, 4),
        "duplicates": out.duplicates,
        "send_errors": out.send_errors,
    }));
    r.warning = warning;
    r.line("server", ctx.server.to_string());
    r.line(
        "offered",
        if a.rate == 0 {
            format!("flood from {} sockets, window {}", a.clients, a.window)
        } else {
            format!("{} requests/s from {} sockets", a.rate, a.clients)
        },
    );
    r.line(
        "answered",
        format!(
            "{} of {} sent ({per_sec:.0} requests/s over {send_s:.3} s)",
            out.delivered, out.sent
        ),
    );
    r.line(
        "RTT p50 / p99",
        format!("{} / {}", us(rtt.p50), us(rtt.p99)),
    );
    if let Some(c) = per_req {
        r.line("server CPU", format!("{} per request", us(c)));
    }
    r.line(
        "CPU",
        match server_cpu_s {
            Some(s) => format!("generator {load_cpu_s:.3} s, server {s:.3} s"),
            None => format!("generator {load_cpu_s:.3} s"),
        },
    );
    Ok(r)
}
