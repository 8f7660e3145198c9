//! The measured loop: paced or flooding sends over the client sockets, echoes counted once by
//! sequence number, RTT from the send time each payload carries, then a drain for late answers.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Duration;

use turnpike::proto::codec::{method, Class, Message, MAGIC_COOKIE};

use crate::hist::Histogram;
use crate::stun::{self, Stamp, PAYLOAD_HEADER};
use crate::sys::{self, Batch, Epoll, TimerFd};

/// The pacing tick: 0.5 ms, so 20k msgs/s leave ten at a time, not twenty.
pub const TICK: Duration = Duration::from_micros(500);
/// How often a flood looks for clients whose window is stuck on lost messages.
const STALL_CHECK_NS: u64 = 10_000_000;

/// How a message is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    ChannelData,
    SendIndication,
    /// STUN Binding requests; the transaction id carries sequence number and send time.
    Binding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends, and counts its own payloads coming back.
    Sender,
    /// Client-to-client: sends back whatever its partner sent it.
    Echoer,
    /// Its allocation failed: anything arriving is a stray.
    Idle,
}

/// One client socket's part in the run.
pub struct Flow {
    pub fd: RawFd,
    pub role: Role,
    template: Vec<u8>,
    payload_at: usize,
    size: usize,
    in_window: u32,
    last_progress_ns: u64,
}

impl Flow {
    /// `channel` for ChannelData, `peer` for Send indications.
    pub fn new(
        fd: RawFd,
        role: Role,
        framing: Framing,
        channel: u16,
        peer: SocketAddr,
        size: usize,
    ) -> Flow {
        let mut template = Vec::new();
        let payload_at = match framing {
            Framing::ChannelData => stun::channel_data_template(&mut template, channel, size),
            Framing::SendIndication => stun::send_indication_template(&mut template, peer, size),
            Framing::Binding => {
                template.extend_from_slice(&[0, 1, 0, 0]);
                template.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
                template.extend_from_slice(&[0; 12]);
                8
            }
        };
        Flow {
            fd,
            role,
            template,
            payload_at,
            size,
            in_window: 0,
            last_progress_ns: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Load {
    pub framing: Framing,
    /// Messages per second over all senders; 0 floods.
    pub rate: u64,
    pub duration_ns: Option<u64>,
    pub messages: Option<u64>,
    /// At most this many unanswered per sender; 0 means no limit.
    pub window: u32,
    pub drain_ns: u64,
    pub deadline_ns: u64,
    pub tag: u32,
}

#[derive(Default)]
pub struct Outcome {
    pub sent: u64,
    pub delivered: u64,
    pub duplicates: u64,
    /// Datagrams that were not an answer to this run's messages.
    pub strays: u64,
    /// Sends the kernel refused (full socket buffer): never on the wire, not loss.
    pub send_errors: u64,
    /// Paced sends left out because the sender's window was full.
    pub skipped: u64,
    pub rtt: Histogram,
    pub start_ns: u64,
    pub send_end_ns: u64,
    pub end_ns: u64,
    pub timed_out: bool,
    pub refused: bool,
}

/// Which sequence numbers came back.
struct Seen(Vec<u64>);

impl Seen {
    /// True the first time `seq` is seen.
    fn insert(&mut self, seq: u64) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if w >= self.0.len() {
            self.0.resize(w + 1024, 0);
        }
        let fresh = self.0[w] & (1 << b) == 0;
        self.0[w] |= 1 << b;
        fresh
    }
}

struct Run<'a> {
    load: &'a Load,
    flows: &'a mut [Flow],
    batch: Batch,
    out_batch: Batch,
    next_seq: u64,
    seen: Seen,
    out: Outcome,
}

impl Run<'_> {
    /// `now` is CLOCK_REALTIME ns, the clock of the kernel's receive stamps.
    fn write_message(&mut self, slot: usize, flow: usize, now: u64) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let f = &self.flows[flow];
        let len = f.template.len();
        let buf = self.out_batch.slot_mut(slot);
        buf[..len].copy_from_slice(&f.template);
        if self.load.framing == Framing::Binding {
            buf[8..12].copy_from_slice(&(seq as u32).to_be_bytes());
            buf[12..20].copy_from_slice(&now.to_be_bytes());
        } else {
            Stamp {
                tag: self.load.tag,
                client: flow as u32,
                seq,
                sent_ns: now,
                hold_ns: 0,
            }
            .write(&mut buf[f.payload_at..f.payload_at + PAYLOAD_HEADER]);
        }
        self.out_batch.set_len(slot, len);
        seq
    }

    /// Sends up to `n` new messages from sender `flow`; returns how many left.
    fn send_from(&mut self, flow: usize, n: u64, now: u64) -> u64 {
        let mut left = n.min(self.remaining());
        let mut sent_total = 0;
        while left > 0 {
            let k = left.min(self.out_batch.cap() as u64) as usize;
            let stamp_ns = sys::realtime_ns();
            for slot in 0..k {
                self.write_message(slot, flow, stamp_ns);
            }
            let sent = match self.out_batch.send(self.flows[flow].fd, k) {
                Ok(s) => s,
                Err(e) => {
                    if e.raw_os_error() == Some(libc::ECONNREFUSED) {
                        self.out.refused = true;
                    }
                    0
                }
            };
            self.out.sent += sent as u64;
            self.out.send_errors += (k - sent) as u64;
            sent_total += sent as u64;
            left -= k as u64;
            if sent < k {
                break;
            }
        }
        let f = &mut self.flows[flow];
        f.in_window += sent_total as u32;
        if f.last_progress_ns == 0 {
            f.last_progress_ns = now;
        }
        sent_total
    }

    fn remaining(&self) -> u64 {
        self.load.messages.map_or(u64::MAX, |m| {
            m.saturating_sub(self.out.sent + self.out.send_errors)
        })
    }

    fn top_up(&mut self, flow: usize, now: u64) {
        let f = &self.flows[flow];
        if f.role != Role::Sender || f.in_window >= self.load.window {
            return;
        }
        let want = u64::from(self.load.window - f.in_window);
        self.send_from(flow, want, now);
    }

    /// Reads everything queued on `flow`'s socket; echoes what an echoer received.
    fn receive(&mut self, flow: usize) {
        loop {
            let n = match self.batch.recv(self.flows[flow].fd, false) {
                Ok(n) => n,
                Err(e) => {
                    if e.raw_os_error() == Some(libc::ECONNREFUSED) {
                        self.out.refused = true;
                    }
                    0
                }
            };
            if n == 0 {
                return;
            }
            let now = sys::now_ns();
            let real_now = sys::realtime_ns();
            let mut echoes = 0;
            for d in 0..n {
                let rx = self.batch.rx_ns(d).unwrap_or(real_now);
                if self.flows[flow].role == Role::Echoer {
                    if self.stage_echo(flow, d, echoes, real_now.saturating_sub(rx)) {
                        echoes += 1;
                    }
                    continue;
                }
                match self.read_stamp(flow, d) {
                    Some(s)
                        if s.client as usize == flow && self.flows[flow].role == Role::Sender =>
                    {
                        self.count(flow, s, rx, now)
                    }
                    _ => self.out.strays += 1,
                }
            }
            if echoes > 0 {
                let fd = self.flows[flow].fd;
                let _ = self.out_batch.send(fd, echoes);
            }
            if n < self.batch.cap() {
                return;
            }
        }
    }

    fn read_stamp(&self, flow: usize, d: usize) -> Option<Stamp> {
        let dgram = self.batch.datagram(d);
        if self.load.framing == Framing::Binding {
            let msg = Message::parse(dgram).ok()?;
            if msg.method != method::BINDING || msg.class != Class::Success {
                return None;
            }
            let t = msg.transaction_id();
            let seq = u64::from(u32::from_be_bytes(t[0..4].try_into().ok()?));
            return (seq < self.next_seq).then_some(Stamp {
                tag: self.load.tag,
                client: flow as u32,
                seq,
                sent_ns: u64::from_be_bytes(t[4..12].try_into().ok()?),
                hold_ns: 0,
            });
        }
        let s = Stamp::read(stun::relayed_payload(dgram)?)?;
        (s.tag == self.load.tag && s.seq < self.next_seq).then_some(s)
    }

    /// `rx` is when the kernel received the echo (CLOCK_REALTIME), `now` the monotonic clock.
    fn count(&mut self, flow: usize, s: Stamp, rx: u64, now: u64) {
        if !self.seen.insert(s.seq) {
            self.out.duplicates += 1;
            return;
        }
        self.out.delivered += 1;
        let rtt = rx.saturating_sub(s.sent_ns).saturating_sub(s.hold_ns);
        self.out.rtt.record(rtt / 1000);
        let f = &mut self.flows[flow];
        f.in_window = f.in_window.saturating_sub(1);
        f.last_progress_ns = now;
    }

    /// Copies the payload of received datagram `d` into the echo batch behind `flow`'s own
    /// framing, addressed back to the partner.
    fn stage_echo(&mut self, flow: usize, d: usize, slot: usize, held_ns: u64) -> bool {
        let f = &self.flows[flow];
        match stun::relayed_payload(self.batch.datagram(d)) {
            Some(payload) if payload.len() == f.size => {
                let len = f.template.len();
                let buf = self.out_batch.slot_mut(slot);
                buf[..len].copy_from_slice(&f.template);
                let p = &mut buf[f.payload_at..f.payload_at + f.size];
                p.copy_from_slice(payload);
                stun::add_hold(p, self.load.tag, held_ns);
                self.out_batch.set_len(slot, len);
                true
            }
            _ => {
                self.out.strays += 1;
                false
            }
        }
    }
}

/// Runs the load over `flows` and drains; `poll` already has every flow's socket with its
/// index as token.
pub fn run(poll: &mut Epoll, flows: &mut [Flow], load: &Load) -> std::io::Result<Outcome> {
    let senders: Vec<usize> = (0..flows.len())
        .filter(|&i| flows[i].role == Role::Sender)
        .collect();
    let mut r = Run {
        load,
        flows,
        batch: Batch::new(64, false),
        out_batch: Batch::new(64, false),
        next_seq: 0,
        seen: Seen(Vec::new()),
        out: Outcome::default(),
    };
    let timer = match load.rate {
        0 => None,
        _ => Some(TimerFd::periodic(TICK)?),
    };
    let start = sys::now_ns();
    r.out.start_ns = start;
    let send_until = load.duration_ns.map_or(u64::MAX, |d| start + d);
    let mut pacer = Pacer {
        rate: load.rate,
        start,
        until: send_until,
        scheduled: 0,
        rr: 0,
    };
    let mut drain_until = u64::MAX;
    let mut last_stall_check = start;
    let mut tokens = Vec::new();
    if load.rate == 0 {
        for &s in &senders {
            r.top_up(s, start);
        }
    }
    loop {
        let now = sys::now_ns();
        let sending = now < send_until && r.remaining() > 0 && !senders.is_empty();
        if !sending && drain_until == u64::MAX {
            r.out.send_end_ns = now;
            drain_until = now + load.drain_ns;
        }
        if !sending && (r.out.delivered >= r.out.sent || now >= drain_until) {
            r.out.end_ns = now;
            break;
        }
        if now >= load.deadline_ns {
            r.out.end_ns = now;
            r.out.timed_out = true;
            break;
        }
        if let (Some(timer), true) = (&timer, sending) {
            // Paced: one wake-up per tick sends what is due and takes every reply queued
            // since; the kernel's receive timestamps keep the RTTs exact.
            timer.wait();
            pacer.send_due(&mut r, &senders, sys::now_ns());
            poll.wait(Duration::ZERO, &mut tokens)?;
            for &t in &tokens {
                if (t as usize) < r.flows.len() {
                    r.receive(t as usize);
                }
            }
            continue;
        }
        let wait = if sending {
            Duration::from_millis(10)
        } else {
            Duration::from_nanos(drain_until - now).max(Duration::from_millis(1))
        };
        poll.wait(wait, &mut tokens)?;
        for &t in &tokens {
            let i = t as usize;
            if i >= r.flows.len() {
                continue;
            }
            r.receive(i);
            if sending {
                r.top_up(i, sys::now_ns());
            }
        }
        if sending {
            // A window full of lost messages would stop a client for good: after a drain's
            // worth of silence its outstanding ones are given up on (loss counts them anyway).
            let now = sys::now_ns();
            if now - last_stall_check > STALL_CHECK_NS {
                last_stall_check = now;
                for &s in &senders {
                    let f = &mut r.flows[s];
                    if f.in_window > 0 && now - f.last_progress_ns > load.drain_ns.max(50_000_000) {
                        f.in_window = 0;
                        f.last_progress_ns = now;
                        r.top_up(s, now);
                    }
                }
            }
        }
    }
    Ok(r.out)
}

/// Paced sending: everything due by now at `rate`, spread round-robin over the senders.
struct Pacer {
    rate: u64,
    start: u64,
    until: u64,
    scheduled: u64,
    rr: usize,
}

impl Pacer {
    fn send_due(&mut self, r: &mut Run, senders: &[usize], now: u64) {
        // Nothing is due past the end of the send phase.
        let elapsed = now.min(self.until) - self.start;
        let due = (u128::from(self.rate) * u128::from(elapsed) / 1_000_000_000) as u64;
        let due = due.min(r.load.messages.unwrap_or(u64::MAX));
        let mut n = due.saturating_sub(self.scheduled);
        self.scheduled = self.scheduled.max(due);
        let count = senders.len() as u64;
        let (per, extra) = (n / count, n % count);
        for k in 0..senders.len() {
            let s = senders[(self.rr + k) % senders.len()];
            let mut want = per + u64::from((k as u64) < extra);
            if want == 0 || n == 0 {
                break;
            }
            n -= want;
            if r.load.window > 0 {
                let room = u64::from(r.load.window.saturating_sub(r.flows[s].in_window));
                r.out.skipped += want.saturating_sub(room);
                want = want.min(room);
            }
            r.send_from(s, want, now);
        }
        self.rr = (self.rr + extra as usize) % senders.len();
    }
}
