//! `alloc`: N allocations held at once with M in flight, then deleted; allocations/s, setup
//! latency, server CPU per allocation, RSS and kernel socket memory idle, held and after.

use std::time::Duration;

use serde_json::json;

use crate::cli::AllocArgs;
use crate::echo::{EchoPeer, Pace};
use crate::hist::Histogram;
use crate::phase;
use crate::procstat::{self, Sample};
use crate::report::{self, round, us, Report};
use crate::setup::{self, Plan};
use crate::sys;
use crate::{Ctx, Failure};

/// RSS "after" is read this long after the last delete, so the server has freed what it will.
const SETTLE: Duration = Duration::from_secs(1);

/// Sleeps `d`, or until the run's deadline when that comes first (then a timeout).
fn sleep_until_deadline(ctx: &Ctx, d: Duration) -> Result<(), Failure> {
    let now = sys::now_ns();
    let end = now + d.as_nanos() as u64;
    if end > ctx.deadline_ns {
        std::thread::sleep(Duration::from_nanos(ctx.deadline_ns.saturating_sub(now)));
        return Err(ctx.timeout());
    }
    std::thread::sleep(d);
    Ok(())
}

pub fn run(ctx: &Ctx, a: &AllocArgs) -> Result<Report, Failure> {
    if a.count == 0 || a.in_flight == 0 {
        return Err(Failure::Usage(
            "--count and --in-flight must be at least 1".into(),
        ));
    }
    if !(a.hold_secs >= 0.0 && a.hold_secs < 86_400.0) {
        return Err(Failure::Usage(
            "--hold-secs must be between 0 and a day".into(),
        ));
    }
    // The permission target needs only an address; the built-in peer gives a real one.
    let echo = match a.peer {
        Some(_) => None,
        None => Some(EchoPeer::start(
            ctx.local_ip,
            Pace {
                tick: None,
                tag: ctx.tag,
            },
        )?),
    };
    let peer = a.peer.or(echo.as_ref().map(|e| e.addr));
    let plan = Plan {
        channel: true,
        pairs: false,
    };
    let opened = phase::open(ctx, a.count, peer)?;
    let idle: Option<Sample> = ctx.server_proc.sample();
    let pages_idle = procstat::udp_mem_pages();
    let load0 = sys::cpu_us(false);
    let mut est = phase::establish(ctx, opened, a.in_flight, plan)?;
    let load1 = sys::cpu_us(false);
    let held = ctx.server_proc.sample();
    let pages_held = procstat::udp_mem_pages();
    let p = &est.progress;
    let wall_s = (p.last_ns.saturating_sub(p.first_ns)) as f64 / 1e9;
    let ok = est.ok;
    let mut lat = Histogram::default();
    for s in est.sessions.iter().filter(|s| setup::is_ok(s)) {
        if let Some(v) = s.setup_us {
            lat.record(v);
        }
    }
    let failed = phase::failures_json(&est.sessions);
    let retransmits = p.retransmits;

    if let Err(timeout) = sleep_until_deadline(ctx, Duration::from_secs_f64(a.hold_secs)) {
        // Time is up while holding: still ask the server to delete every allocation.
        setup::abandon(&mut est.sessions, &mut est.txids);
        return Err(timeout);
    }
    let undeleted = phase::delete_all(ctx, &mut est, a.in_flight)?;
    sleep_until_deadline(ctx, SETTLE)?;
    let after = ctx.server_proc.sample();
    let pages_after = procstat::udp_mem_pages();
    drop(est);

    let allocs_per_sec = if wall_s > 0.0 {
        ok as f64 / wall_s
    } else {
        0.0
    };
    let server_cpu_s = match (idle, held) {
        (Some(i), Some(h)) => Some(h.cpu_us.saturating_sub(i.cpu_us) as f64 / 1e6),
        _ => None,
    };
    let load_cpu_s = load1.saturating_sub(load0) as f64 / 1e6;
    let cpu_per_alloc = server_cpu_s.map(|c| c * 1e6 / ok as f64);
    let rss = match (idle, held, after) {
        (Some(i), Some(h), Some(f)) => Some((i.rss_kib, h.rss_kib, f.rss_kib)),
        _ => None,
    };
    let rss_per_alloc = rss.map(|(i, h, _)| (h as f64 - i as f64) / ok as f64);
    let returned =
        rss.and_then(|(i, h, f)| (h > i).then(|| (h as f64 - f as f64) / (h as f64 - i as f64)));
    let (check, warning) = report::self_check(load_cpu_s, server_cpu_s);
    let lat_p50 = lat.quantile(0.5);
    let lat_p99 = lat.quantile(0.99);
    let mut r = Report::new(json!({
        "mode": "alloc",
        "ok": ok,
        "failed": failed,
        "allocs_per_sec": round(allocs_per_sec, 1),
        "setup_us": {"p50": lat_p50, "p99": lat_p99},
        "server_cpu_us_per_alloc": cpu_per_alloc.map(|v| round(v, 2)),
        "rss_kib": rss.map(|(i, h, f)| json!({"idle": i, "held": h, "after": f})),
        "rss_kib_per_alloc": rss_per_alloc.map(|v| round(v, 3)),
        "returned_fraction": returned.map(|v| round(v, 3)),
        "sockstat_udp_mem_pages": {"idle": pages_idle, "held": pages_held, "after": pages_after},
        "load_cpu_s": round(load_cpu_s, 4),
        "server_cpu_s": server_cpu_s.map(|v| round(v, 4)),
        "self_check": check,
        "count": a.count,
        "in_flight": a.in_flight,
        "setup_s": round(wall_s, 4),
        "retransmits": retransmits,
        "undeleted": undeleted,
    }));
    r.warning = warning;
    r.line("server", ctx.server.to_string());
    r.line(
        "allocations",
        format!("{ok} ok of {} ({} in flight)", a.count, a.in_flight),
    );
    if !failed.is_empty() {
        let f: Vec<String> = failed.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        r.line("failed", f.join(", "));
    }
    r.line(
        "rate",
        format!("{allocs_per_sec:.0} allocations/s over {wall_s:.3} s"),
    );
    r.line(
        "setup p50 / p99",
        format!("{} / {}", us(lat_p50), us(lat_p99)),
    );
    if retransmits > 0 {
        r.line("retransmits", retransmits.to_string());
    }
    if let Some(c) = cpu_per_alloc {
        r.line("server CPU", format!("{} per allocation", us(c)));
    }
    if let (Some((i, h, f)), Some(per)) = (rss, rss_per_alloc) {
        r.line(
            "server RSS",
            format!("idle {i} KiB, held {h} KiB, after {f} KiB ({per:.2} KiB per allocation)"),
        );
    }
    if let Some(ret) = returned {
        r.line("RSS returned", format!("{:.0}% of the growth", ret * 100.0));
    }
    r.line(
        "UDP socket memory",
        format!("idle {pages_idle}, held {pages_held}, after {pages_after} pages"),
    );
    r.line(
        "CPU (setup phase)",
        match server_cpu_s {
            Some(s) => format!("generator {load_cpu_s:.3} s, server {s:.3} s"),
            None => format!("generator {load_cpu_s:.3} s"),
        },
    );
    if undeleted > 0 {
        r.line("not deleted", format!("{undeleted} allocations"));
    }
    Ok(r)
}
