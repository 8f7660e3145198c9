//! Allocations: one client socket each, and the transactions that set them up (Allocate with
//! its 401 round, CreatePermission, ChannelBind, Refresh) and delete them (Refresh lifetime 0),
//! with a bounded number in flight and RFC 8489-style retransmission.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::Socket;
use turnpike::proto::auth::LongTermKey;

use crate::stun::{self, Answer, Auth, Credential, Request};
use crate::sys::{self, Batch, Epoll};

/// Waits after each try of a request: three tries, the last given longer to answer.
const RTO_MS: [u64; 3] = [100, 200, 800];
/// Channel number each allocation binds (channels are per allocation, so one number serves).
pub const CHANNEL: u16 = 0x4000;
/// Refresh asks for this lifetime; runs are bounded far below it.
const LIFETIME_SECS: u32 = 600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    NotStarted,
    Allocate {
        signed: bool,
    },
    /// Allocated; the peer (the partner's relayed address) is not known yet.
    WaitPeer,
    Permission,
    Channel,
    Refresh,
    Done,
    Failed,
    Deleting,
    Deleted,
}

/// How an allocation ended its setup; failures are keyed by error code or "timeout".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    Ok,
    Failed(String),
}

struct Txn {
    txid: [u8; 12],
    buf: Vec<u8>,
    tries: usize,
    due_ns: u64,
}

pub struct Session {
    pub sock: Socket,
    user: String,
    password: String,
    realm: String,
    /// --realm given: the key uses it whatever the 401 says.
    realm_fixed: bool,
    nonce: Vec<u8>,
    key: Option<LongTermKey>,
    step: Step,
    txn: Txn,
    stale_retried: bool,
    /// The kernel said the server's port is closed (ICMP port unreachable).
    refused: bool,
    pub allocated: bool,
    pub relayed: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    pub channel: Option<u16>,
    pub outcome: Outcome,
    /// Why the final Refresh(0) did not delete the allocation.
    pub delete_failed: Option<String>,
    started_ns: u64,
    pub setup_us: Option<u64>,
}

/// Which requests setup makes after Allocate.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// ChannelBind (not for Send/Data runs: a bound channel makes the server answer in
    /// ChannelData).
    pub channel: bool,
    /// Peers come from partners' relayed addresses (client-to-client): 2i and 2i+1.
    pub pairs: bool,
}

/// Counts from one run of the transaction engine.
#[derive(Debug, Default)]
pub struct Progress {
    /// First request sent to last answer received, in nanoseconds of the monotonic clock.
    pub first_ns: u64,
    pub last_ns: u64,
    /// Any answer at all came back (tells "unreachable" from "refuses everything").
    pub answered: u64,
    pub retransmits: u64,
}

impl Session {
    pub fn open(
        local: SocketAddr,
        server: SocketAddr,
        cred: Option<(String, String)>,
        realm: Option<&str>,
    ) -> io::Result<Session> {
        let (user, password) = cred.unwrap_or_default();
        Ok(Session {
            sock: sys::client_socket(local, server)?,
            user,
            password,
            realm: realm.unwrap_or_default().to_owned(),
            realm_fixed: realm.is_some(),
            nonce: Vec::new(),
            key: None,
            step: Step::NotStarted,
            txn: Txn {
                txid: [0; 12],
                buf: Vec::with_capacity(256),
                tries: 0,
                due_ns: 0,
            },
            stale_retried: false,
            refused: false,
            allocated: false,
            relayed: None,
            peer: None,
            channel: None,
            outcome: Outcome::Pending,
            delete_failed: None,
            started_ns: 0,
            setup_us: None,
        })
    }

    fn request(&self) -> Option<Request> {
        let peer = self.peer;
        match self.step {
            Step::Allocate { .. } => Some(Request::Allocate),
            Step::Permission => peer.map(Request::CreatePermission),
            Step::Channel => peer.map(|p| Request::ChannelBind(p, CHANNEL)),
            Step::Refresh => Some(Request::Refresh(LIFETIME_SECS)),
            Step::Deleting => Some(Request::Refresh(0)),
            _ => None,
        }
    }

    fn signed(&self) -> bool {
        !matches!(self.step, Step::Allocate { signed: false })
    }

    /// Builds and sends the current step's request as a new transaction.
    fn begin(&mut self, txids: &mut TxidSource, now: u64) {
        let Some(req) = self.request() else { return };
        self.txn.txid = txids.next();
        self.txn.tries = 0;
        let auth = match (&self.key, self.signed()) {
            (Some(key), true) => Some(Auth {
                user: &self.user,
                realm: &self.realm,
                nonce: &self.nonce,
                key,
            }),
            _ => None,
        };
        stun::write_request(&mut self.txn.buf, req, self.txn.txid, auth.as_ref());
        self.transmit(now);
    }

    fn transmit(&mut self, now: u64) {
        // A failed send is a lost packet: the retransmission timer covers it.
        let _ = sys::send_one(self.sock.as_raw_fd(), &self.txn.buf);
        self.txn.due_ns = now + RTO_MS[self.txn.tries.min(RTO_MS.len() - 1)] * 1_000_000;
        self.txn.tries += 1;
    }

    fn in_transaction(&self) -> bool {
        matches!(
            self.step,
            Step::Allocate { .. }
                | Step::Permission
                | Step::Channel
                | Step::Refresh
                | Step::Deleting
        )
    }

    fn fail(&mut self, why: String) {
        self.step = Step::Failed;
        self.outcome = Outcome::Failed(why);
    }

    fn learn(&mut self, a: &Answer) {
        if let Some(r) = &a.realm {
            if *r != self.realm && !self.realm_fixed {
                self.realm = r.clone();
                self.key = None;
            }
        }
        if self.key.is_none() {
            self.key = Some(stun::key(&self.user, &self.realm, &self.password));
        }
        if let Some(n) = &a.nonce {
            self.nonce = n.clone();
        }
    }

    /// The step after `step` succeeded.
    fn next_step(&self, plan: Plan) -> Step {
        match self.step {
            Step::Allocate { .. } if self.peer.is_none() && plan.pairs => Step::WaitPeer,
            Step::Allocate { .. } | Step::WaitPeer => Step::Permission,
            Step::Permission if plan.channel => Step::Channel,
            Step::Permission | Step::Channel => Step::Refresh,
            Step::Refresh => Step::Done,
            Step::Deleting => Step::Deleted,
            s => s,
        }
    }

    /// Acts on an answer to the current transaction.
    fn on_answer(&mut self, a: &Answer, plan: Plan, txids: &mut TxidSource, now: u64) {
        if !self.in_transaction() || a.txid != self.txn.txid {
            return; // a late answer to an earlier try or transaction
        }
        let first_round = self.step == Step::Allocate { signed: false };
        if a.success {
            self.stale_retried = false;
            if matches!(self.step, Step::Allocate { .. }) {
                self.allocated = true;
                self.relayed = a.relayed;
            }
            if self.step == Step::Channel {
                self.channel = Some(CHANNEL);
            }
            self.step = self.next_step(plan);
            match self.step {
                Step::Done => {
                    self.outcome = Outcome::Ok;
                    self.setup_us = Some(now.saturating_sub(self.started_ns) / 1000);
                }
                Step::Deleted | Step::WaitPeer => {}
                _ => self.begin(txids, now),
            }
            return;
        }
        let can_sign = !self.user.is_empty();
        match a.code {
            401 if first_round && can_sign && a.nonce.is_some() => {
                self.learn(a);
                self.step = Step::Allocate { signed: true };
                self.begin(txids, now);
            }
            438 if !self.stale_retried && a.nonce.is_some() => {
                self.stale_retried = true;
                self.learn(a);
                self.begin(txids, now);
            }
            // Deleting what the server no longer has is done.
            437 if self.step == Step::Deleting => self.step = Step::Deleted,
            code if self.step == Step::Deleting => {
                self.step = Step::Deleted;
                self.delete_failed = Some(code.to_string());
            }
            code => self.fail(code.to_string()),
        }
    }

    fn on_timeout(&mut self, now: u64, progress: &mut Progress) {
        if !self.in_transaction() || now < self.txn.due_ns {
            return;
        }
        if self.txn.tries >= RTO_MS.len() {
            let why = if self.refused {
                "unreachable"
            } else {
                "timeout"
            };
            if self.step == Step::Deleting {
                self.step = Step::Deleted;
                self.delete_failed = Some(why.to_string());
            } else {
                self.fail(why.to_string());
            }
            return;
        }
        progress.retransmits += 1;
        self.transmit(now);
    }

    fn finished(&self) -> bool {
        matches!(self.step, Step::Done | Step::Failed | Step::Deleted)
    }
}

/// Transaction ids: a random prefix per run, then a counter, so no two requests share one.
pub struct TxidSource {
    prefix: [u8; 4],
    n: u64,
}

impl TxidSource {
    pub fn new(seed: u32) -> TxidSource {
        TxidSource {
            prefix: seed.to_be_bytes(),
            n: 0,
        }
    }

    fn next(&mut self) -> [u8; 12] {
        self.n += 1;
        let mut t = [0u8; 12];
        t[..4].copy_from_slice(&self.prefix);
        t[4..].copy_from_slice(&self.n.to_be_bytes());
        t
    }
}

/// How many transactions at once, and until when.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    in_flight: usize,
    deadline_ns: u64,
}

/// Why the engine stopped early.
#[derive(Debug)]
pub enum Stop {
    Deadline,
    Io(io::Error),
}

/// Opens `count` client sockets and registers them with `poll` (token = index).
pub fn open_sessions(
    poll: &Epoll,
    count: usize,
    local: SocketAddr,
    server: SocketAddr,
    cred: &Credential,
    realm: Option<&str>,
    unix_now: u64,
) -> io::Result<Vec<Session>> {
    let mut v = Vec::with_capacity(count);
    for i in 0..count {
        let s = Session::open(local, server, cred.for_allocation(i, unix_now), realm)?;
        poll.add(s.sock.as_raw_fd(), i as u64)?;
        v.push(s);
    }
    Ok(v)
}

/// Drives transactions until every session in `todo` has finished or `deadline_ns` passes.
/// `start` moves a session into its first step.
fn drive(
    poll: &mut Epoll,
    sessions: &mut [Session],
    todo: &[usize],
    bounds: Bounds,
    plan: Plan,
    txids: &mut TxidSource,
    start: impl Fn(&mut Session),
) -> Result<Progress, Stop> {
    let Bounds {
        in_flight,
        deadline_ns,
    } = bounds;
    let mut progress = Progress::default();
    let mut batch = Batch::new(16, false);
    let mut tokens = Vec::new();
    let mut active: Vec<usize> = Vec::with_capacity(in_flight);
    let mut next = 0;
    let mut done = 0;
    let in_flight = in_flight.max(1);
    loop {
        let now = sys::now_ns();
        while active.len() < in_flight && next < todo.len() {
            let i = todo[next];
            next += 1;
            let s = &mut sessions[i];
            start(s);
            if progress.first_ns == 0 {
                progress.first_ns = now;
            }
            s.started_ns = now;
            s.begin(txids, now);
            active.push(i);
        }
        // Sessions waiting for their partner's relayed address hold no transaction.
        let mut k = 0;
        while k < active.len() {
            let s = &sessions[active[k]];
            if s.finished() {
                done += 1;
                active.swap_remove(k);
            } else if s.step == Step::WaitPeer {
                active.swap_remove(k);
            } else {
                k += 1;
            }
        }
        if done >= todo.len() {
            return Ok(progress);
        }
        if now >= deadline_ns {
            return Err(Stop::Deadline);
        }
        let due = active
            .iter()
            .map(|&i| sessions[i].txn.due_ns)
            .min()
            .unwrap_or(now + 10_000_000);
        let wait_ms = due.saturating_sub(now).div_ceil(1_000_000).clamp(1, 10);
        poll.wait(Duration::from_millis(wait_ms), &mut tokens)
            .map_err(Stop::Io)?;
        for &t in &tokens {
            let i = t as usize;
            if i >= sessions.len() {
                continue;
            }
            loop {
                let n = match batch.recv(sessions[i].sock.as_raw_fd(), false) {
                    Ok(n) => n,
                    Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                        sessions[i].refused = true;
                        0
                    }
                    Err(e) => return Err(Stop::Io(e)),
                };
                let now = sys::now_ns();
                for d in 0..n {
                    let Some(a) = stun::read_answer(batch.datagram(d)) else {
                        continue;
                    };
                    progress.answered += 1;
                    progress.last_ns = now;
                    let before = sessions[i].step;
                    sessions[i].on_answer(&a, plan, txids, now);
                    if plan.pairs {
                        after_step(sessions, i, before, txids, now, &mut active);
                    }
                }
                if n < batch.cap() {
                    break;
                }
            }
        }
        let now = sys::now_ns();
        for k in 0..active.len() {
            let i = active[k];
            let before = sessions[i].step;
            sessions[i].on_timeout(now, &mut progress);
            if plan.pairs {
                after_step(sessions, i, before, txids, now, &mut active);
            }
        }
    }
}

/// Client-to-client bookkeeping after session `i` moved on from `before`: a pair goes on once
/// both halves are allocated, and a failed half takes its waiting partner with it.
fn after_step(
    sessions: &mut [Session],
    i: usize,
    before: Step,
    txids: &mut TxidSource,
    now: u64,
    active: &mut Vec<usize>,
) {
    let j = i ^ 1;
    if j >= sessions.len() || sessions[i].step == before {
        return;
    }
    match sessions[i].step {
        Step::WaitPeer if sessions[j].step == Step::Failed => {
            sessions[i].fail("partner failed".into());
        }
        Step::WaitPeer => pair_up(sessions, i, txids, now, active),
        Step::Failed if sessions[j].step == Step::WaitPeer => {
            sessions[j].fail("partner failed".into());
            // Back among the active ones, where finished sessions are counted.
            active.push(j);
        }
        _ => {}
    }
}

/// Client-to-client: once both of a pair are allocated, each gets the other's relayed address
/// as its peer and both go on with CreatePermission.
fn pair_up(
    sessions: &mut [Session],
    i: usize,
    txids: &mut TxidSource,
    now: u64,
    active: &mut Vec<usize>,
) {
    let j = i ^ 1;
    if j >= sessions.len() || sessions[j].step != Step::WaitPeer {
        return;
    }
    let (ri, rj) = (sessions[i].relayed, sessions[j].relayed);
    let (Some(ri), Some(rj)) = (ri, rj) else {
        sessions[i].fail("no relayed address".into());
        sessions[j].fail("no relayed address".into());
        return;
    };
    for (k, peer) in [(i, rj), (j, ri)] {
        let s = &mut sessions[k];
        s.peer = Some(peer);
        s.step = Step::Permission;
        s.begin(txids, now);
        if !active.contains(&k) {
            active.push(k);
        }
    }
}

/// Sets up every session: Allocate (401 round, then signed), CreatePermission, ChannelBind
/// when the plan says so, Refresh.
pub fn setup(
    poll: &mut Epoll,
    sessions: &mut [Session],
    in_flight: usize,
    plan: Plan,
    txids: &mut TxidSource,
    deadline_ns: u64,
) -> Result<Progress, Stop> {
    let todo: Vec<usize> = (0..sessions.len()).collect();
    let r = drive(
        poll,
        sessions,
        &todo,
        Bounds {
            in_flight,
            deadline_ns,
        },
        plan,
        txids,
        |s| s.step = Step::Allocate { signed: false },
    );
    // A partner that failed leaves its waiting half with nothing to do.
    for s in sessions.iter_mut() {
        if s.step == Step::WaitPeer {
            s.fail("partner failed".into());
        }
    }
    r
}

/// Deletes every allocation the server granted (Refresh with lifetime 0).
pub fn teardown(
    poll: &mut Epoll,
    sessions: &mut [Session],
    in_flight: usize,
    txids: &mut TxidSource,
    deadline_ns: u64,
) -> Result<Progress, Stop> {
    let todo: Vec<usize> = (0..sessions.len())
        .filter(|&i| sessions[i].allocated && sessions[i].key.is_some())
        .collect();
    let plan = Plan {
        channel: false,
        pairs: false,
    };
    drive(
        poll,
        sessions,
        &todo,
        Bounds {
            in_flight,
            deadline_ns,
        },
        plan,
        txids,
        |s| {
            s.step = Step::Deleting;
            s.stale_retried = false;
        },
    )
}

/// Best effort when time is up: one unanswered Refresh(0) per allocation still held.
pub fn abandon(sessions: &mut [Session], txids: &mut TxidSource) {
    let now = sys::now_ns();
    for s in sessions
        .iter_mut()
        .filter(|s| s.allocated && s.key.is_some())
    {
        s.step = Step::Deleting;
        s.begin(txids, now);
    }
}

/// Setup failures by reason.
pub fn failures(sessions: &[Session]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for s in sessions {
        if let Outcome::Failed(why) = &s.outcome {
            *m.entry(why.clone()).or_insert(0) += 1;
        }
    }
    m
}

/// Allocations the teardown could not delete.
pub fn undeleted(sessions: &[Session]) -> u64 {
    sessions
        .iter()
        .filter(|s| s.delete_failed.is_some())
        .count() as u64
}

pub fn is_ok(s: &Session) -> bool {
    s.outcome == Outcome::Ok
}
