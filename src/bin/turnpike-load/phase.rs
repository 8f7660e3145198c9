//! The phases the TURN modes share: open the sockets and set the allocations up (failing the
//! run with a cause a person can act on when none could be), and delete them at the end.

use std::collections::BTreeMap;

use crate::setup::{self, Plan, Progress, Session, Stop, TxidSource};
use crate::sys::{self, Epoll};
use crate::{Ctx, Failure};

pub struct Established {
    pub poll: Epoll,
    pub sessions: Vec<Session>,
    pub txids: TxidSource,
    pub progress: Progress,
    pub ok: usize,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why not one allocation could be made, in one line.
fn cause(ctx: &Ctx, sessions: &[Session], p: &Progress, elapsed_s: f64) -> String {
    let failed = setup::failures(sessions);
    if p.answered == 0 {
        if failed.contains_key("unreachable") {
            return format!(
                "no answer from {} after {elapsed_s:.1} s: port unreachable (is a TURN server \
                 listening there?)",
                ctx.server
            );
        }
        return format!("no answer from {} after {elapsed_s:.1} s", ctx.server);
    }
    let list = failed
        .iter()
        .map(|(k, v)| format!("{k} x{v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let hint = match () {
        _ if failed.contains_key("401") && matches!(ctx.cred, crate::stun::Credential::None) => {
            " (the server wants credentials: --user with --password or --secret-file)"
        }
        _ if failed.contains_key("401") => " (bad credentials?)",
        _ if failed.contains_key("403") => " (peer address forbidden by the server's policy?)",
        _ if failed.contains_key("486") => " (allocation quota reached)",
        _ => "",
    };
    format!("every allocation failed at {}: {list}{hint}", ctx.server)
}

/// Client sockets opened, no request sent yet: opening 5000 sockets is not the server's work,
/// so the measured phase starts after this.
pub struct Opened {
    poll: Epoll,
    sessions: Vec<Session>,
}

/// Opens `count` client sockets, each to carry one allocation with `peer` as its peer.
pub fn open(
    ctx: &Ctx,
    count: usize,
    peer: Option<std::net::SocketAddr>,
) -> Result<Opened, Failure> {
    let poll = Epoll::new()?;
    let mut sessions = setup::open_sessions(
        &poll,
        count,
        ctx.local(),
        ctx.server,
        &ctx.cred,
        ctx.realm.as_deref(),
        unix_now(),
    )
    .map_err(|e| Failure::Run(format!("cannot open {count} client sockets: {e}")))?;
    for s in &mut sessions {
        s.peer = peer;
    }
    Ok(Opened { poll, sessions })
}

/// Sets up an allocation on each opened socket; an error unless at least one succeeded.
pub fn establish(
    ctx: &Ctx,
    opened: Opened,
    in_flight: usize,
    plan: Plan,
) -> Result<Established, Failure> {
    let Opened {
        mut poll,
        mut sessions,
    } = opened;
    let count = sessions.len();
    let mut txids = TxidSource::new(ctx.tag);
    let started = sys::now_ns();
    let progress = match setup::setup(
        &mut poll,
        &mut sessions,
        in_flight,
        plan,
        &mut txids,
        ctx.deadline_ns,
    ) {
        Ok(p) => p,
        Err(Stop::Deadline) => {
            setup::abandon(&mut sessions, &mut txids);
            return Err(ctx.timeout());
        }
        Err(Stop::Io(e)) => return Err(Failure::Run(format!("setup: {e}"))),
    };
    let ok = sessions.iter().filter(|s| setup::is_ok(s)).count();
    if ok == 0 && count > 0 {
        let elapsed = (sys::now_ns() - started) as f64 / 1e9;
        let why = cause(ctx, &sessions, &progress, elapsed);
        // Whatever was granted before the failure goes too.
        let _ = setup::teardown(
            &mut poll,
            &mut sessions,
            in_flight,
            &mut txids,
            ctx.deadline_ns,
        );
        return Err(Failure::Run(why));
    }
    Ok(Established {
        poll,
        sessions,
        txids,
        progress,
        ok,
    })
}

/// Deletes every allocation; returns how many could not be deleted.
pub fn delete_all(ctx: &Ctx, e: &mut Established, in_flight: usize) -> Result<u64, Failure> {
    match setup::teardown(
        &mut e.poll,
        &mut e.sessions,
        in_flight,
        &mut e.txids,
        ctx.deadline_ns,
    ) {
        Ok(_) => Ok(setup::undeleted(&e.sessions)),
        Err(Stop::Deadline) => {
            setup::abandon(&mut e.sessions, &mut e.txids);
            Err(ctx.timeout())
        }
        Err(Stop::Io(err)) => Err(Failure::Run(format!("delete: {err}"))),
    }
}

pub fn failures_json(sessions: &[Session]) -> BTreeMap<String, u64> {
    setup::failures(sessions)
}
