//! The TURN server core: bytes and 5-tuples in, actions and commands out.
//!
//! One `Core` runs per I/O shard. It owns the allocations of the clients the kernel hashed to that
//! shard, so the packet path touches no lock. Cross-shard state is limited to what Allocate needs
//! (per-user and total allocation counts in [`Shared`]) and the nonce key.
//!
//! The core does no I/O. Requests are decoded once ([`crate::proto::request`]), handled into a
//! typed outcome ([`TurnError`] or a success), and answered at one exit ([`respond`]). Replies and
//! relayed datagrams leave as a [`ClientAction`] / [`PeerAction`] naming the 5-tuple; relay sockets
//! are opened and closed through queued [`Command`]s the I/O layer drains with
//! [`Core::poll_command`] and answers with [`Core::relay_opened`].
//!
//! - `allocate`: Allocate (with its wait for relay sockets) and Refresh.
//! - `permissions`: CreatePermission, ChannelBind, and the peer checks both share.
//! - `relay_path`: the hot path: ChannelData, Send indications, datagrams from peers.
//! - `credentials`: the long-term credential check.
//! - `respond`: the one exit every answer leaves by.
//! - `tcp_relay`: TCP allocations' peer connections (RFC 6062).

mod allocate;
mod command;
mod credentials;
mod permissions;
mod relay_path;
mod respond;
mod shared;
mod shrink;
mod tcp_relay;
mod usage;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::allocate::PendingAllocate;
pub use self::command::{
    Command, ConnectionId, OpenRelay, OpenedRelay, PeerConnectError, RelayOpenError, RelaySource,
    RelayTransport,
};
use self::respond::{Answer, Success};
pub use self::shared::{LiveRelayPorts, Shared};
pub use self::tcp_relay::{BIND_TIMEOUT, CONNECT_TIMEOUT, MAX_CONNECTIONS_PER_ALLOCATION};
pub use self::usage::{UsageKind, UsageRecord};
use super::allocation::{Allocation, Counters, Relay, RelayId};
use super::auth::{Authenticator, LongTermKey};
use super::codec::{attr, method, Class, Message, MessageWriter};
use super::discovery::NatDiscovery;
use super::error::{EndReason, TurnError};
use super::policy::PeerPolicy;
use super::request::{self, Binding};
pub use super::stats::Stats;
use super::timers::DeadlineQueue;
use super::{FiveTuple, Transport};

/// Limits and lifetimes the core enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// 0 = unlimited.
    pub allocations_per_user: u32,
    pub total_allocations: u32,
    pub permissions_per_allocation: usize,
    pub channels_per_allocation: usize,
    pub default_lifetime: Duration,
    pub max_lifetime: Duration,
    pub permission_lifetime: Duration,
    pub channel_lifetime: Duration,
    /// Per allocation and direction; 0 = unlimited.
    pub bandwidth_bytes_per_sec: u64,
    pub unauth_replies_per_sec: u32,
    pub unauth_replies_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            allocations_per_user: 10,
            total_allocations: 100_000,
            permissions_per_allocation: 64,
            channels_per_allocation: 64,
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            permission_lifetime: Duration::from_secs(300),
            channel_lifetime: Duration::from_secs(600),
            bandwidth_bytes_per_sec: 0,
            // About 100 bytes out per reply: a spoofed source's victim gets at most ~20 kB/s
            // from us, while 500 users behind one NAT can each allocate within a few seconds.
            unauth_replies_per_sec: 200,
            unauth_replies_burst: 500,
        }
    }
}

/// Where relay sockets of one address family live.
#[derive(Debug, Clone, Copy)]
pub struct RelayAddress {
    /// The local address relay sockets bind to.
    pub local: IpAddr,
    /// The address XOR-RELAYED-ADDRESS advertises (differs behind 1:1 NAT).
    pub advertised: IpAddr,
}

/// Everything reloadable that decides how requests are answered.
#[derive(Clone)]
pub struct CoreConfig {
    pub software: Option<String>,
    pub auth: Authenticator,
    pub policy: PeerPolicy,
    pub limits: Limits,
    pub relay_v4: Option<RelayAddress>,
    pub relay_v6: Option<RelayAddress>,
    /// RFC 5780 discovery addresses, at most one set per family; empty (the default) = Binding
    /// answers carry XOR-MAPPED-ADDRESS alone and CHANGE-REQUEST gets 420.
    pub nat_discovery: Vec<NatDiscovery>,
}

/// What the I/O layer does with a client datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAction {
    /// Nothing to send now: the datagram was dropped, or its answer waits for a relay socket the
    /// I/O layer is opening (see [`Command::OpenRelay`]).
    Drop,
    /// Send the reply buffer to the client of this 5-tuple, from its local address.
    Reply { to: FiveTuple },
    /// Send `data[start..end]` from relay socket `relay` to `peer`.
    ToPeer {
        relay: RelayId,
        peer: SocketAddr,
        start: usize,
        end: usize,
        /// DONT-FRAGMENT on this Send indication: set DF on this one datagram.
        dont_fragment: bool,
    },
}

/// What the I/O layer does with a datagram a relay socket received from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerAction {
    Drop,
    /// Send `buf[start..end]` to the client of this 5-tuple.
    ToClient {
        to: FiveTuple,
        start: usize,
        end: usize,
    },
}

struct Slot {
    gen: u32,
    /// Boxed: the table keeps 16 bytes per slot, and an ended allocation's memory goes back
    /// to the allocator at once instead of staying in the table until the slot is reused.
    alloc: Option<Box<Allocation>>,
}

pub struct Core {
    config: Arc<CoreConfig>,
    shared: Arc<Shared>,
    slots: Vec<Slot>,
    /// Lowest first, so live allocations pack at the front and the table's tail can be cut.
    free_slots: BinaryHeap<Reverse<u32>>,
    /// The generation a slot appended to the table starts at: above every generation a cut
    /// slot of the same index ever had, so no old id reaches the new occupant.
    fresh_gen: u32,
    /// The slot table's tail is cut only once live allocations number at most this (see
    /// `shrink`).
    shrink_below: usize,
    by_client: HashMap<FiveTuple, u32>,
    /// This core's UDP relay sockets by bound address: a datagram for one of them from another
    /// of our allocations is delivered here, without a kernel hop (see `relay_path`).
    own_relays: HashMap<SocketAddr, RelayId>,
    /// One deadline per live allocation slot: the soonest of its relays' expiries and its
    /// reservation's.
    timers: DeadlineQueue,
    /// Allocations waiting for the I/O layer to open their relay sockets.
    pending: Vec<PendingAllocate>,
    /// Slow-path effects for the I/O layer, drained by `poll_command`.
    commands: VecDeque<Command>,
    /// Usage records for the I/O layer (see `usage`), queued only while `usage_on`.
    usage: VecDeque<UsageRecord>,
    usage_on: bool,
    /// Failed relay opens not yet logged: an authenticated user must not be able to flood the log.
    relay_failures: LogThrottle,
    rng: u64,
    keys: Vec<LongTermKey>,
    stats: Stats,
    /// While draining, existing allocations keep working and new ones are refused.
    draining: bool,
    /// TCP allocations' peer connections (RFC 6062).
    tcp: tcp_relay::TcpConnections,
    /// The low byte of every connection id this core hands out (see [`ConnectionId`]).
    shard: u8,
}

/// A count for each transport clients reach us on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByTransport {
    pub udp: usize,
    pub tcp: usize,
    pub tls: usize,
}

impl ByTransport {
    pub fn of(&mut self, transport: Transport) -> &mut usize {
        match transport {
            Transport::Udp => &mut self.udp,
            Transport::Tcp => &mut self.tcp,
            Transport::Tls => &mut self.tls,
        }
    }

    pub fn total(&self) -> usize {
        self.udp + self.tcp + self.tls
    }
}

impl std::ops::AddAssign for ByTransport {
    fn add_assign(&mut self, o: Self) {
        self.udp += o.udp;
        self.tcp += o.tcp;
        self.tls += o.tls;
    }
}

/// One allocation as the admin API shows it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub slot: u32,
    pub gen: u32,
    /// The allocation's own random id (its usage records and log lines carry it).
    pub allocation_id: u64,
    pub username: String,
    pub client: SocketAddr,
    pub transport: Transport,
    pub relays: Vec<SocketAddr>,
    pub age_secs: u64,
    pub expires_in_secs: u64,
    pub counters: Counters,
    pub permissions: usize,
    pub channels: usize,
}

impl Core {
    pub fn new(config: Arc<CoreConfig>, shared: Arc<Shared>, seed: u64) -> Self {
        let limits = &config.limits;
        shared
            .limiter
            .set_rate(limits.unauth_replies_per_sec, limits.unauth_replies_burst);
        Core {
            config,
            shared,
            slots: Vec::new(),
            free_slots: BinaryHeap::new(),
            fresh_gen: 0,
            shrink_below: 0,
            by_client: HashMap::new(),
            own_relays: HashMap::new(),
            timers: DeadlineQueue::default(),
            pending: Vec::new(),
            commands: VecDeque::new(),
            usage: VecDeque::new(),
            usage_on: false,
            relay_failures: LogThrottle::default(),
            rng: seed | 1,
            keys: Vec::with_capacity(4),
            stats: Stats::default(),
            draining: false,
            tcp: tcp_relay::TcpConnections::default(),
            shard: 0,
        }
    }

    /// Swaps in a reloaded configuration; allocations, permissions and channels stay.
    pub fn set_config(&mut self, config: Arc<CoreConfig>) {
        let limits = &config.limits;
        self.shared
            .limiter
            .set_rate(limits.unauth_replies_per_sec, limits.unauth_replies_burst);
        self.config = config;
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn allocation_count(&self) -> usize {
        self.by_client.len()
    }

    /// Allocations by their client's transport; a walk over them, for metrics scrapes.
    pub fn allocations_by_transport(&self) -> ByTransport {
        let mut n = ByTransport::default();
        for ft in self.by_client.keys() {
            *n.of(ft.transport) += 1;
        }
        n
    }

    /// Whether this 5-tuple holds an allocation (or is about to).
    pub fn has_allocation(&self, ft: &FiveTuple) -> bool {
        self.by_client.contains_key(ft) || self.pending.iter().any(|p| p.ft == *ft)
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The next slow-path effect for the I/O layer. Drain it after every call into the core; the
    /// answer to an [`Command::OpenRelay`] goes to [`Core::relay_opened`].
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// The earliest instant `handle_timeout` has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.timers.next(), self.tcp.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Ends every relay whose lifetime has run out (the allocation with its last relay) and every
    /// reservation nobody claimed.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.tcp_timeouts(now);
        while let Some(slot) = self.timers.pop_due(now) {
            let Some(a) = self.slots[slot as usize].alloc.as_mut() else {
                continue;
            };
            if let Some(r) = a.reservation.filter(|r| r.expires <= now) {
                a.reservation = None;
                self.end_reservation(r.token);
            }
            let a = self.alloc_mut(slot);
            if a.expires <= now {
                self.end_allocation(slot, now, EndReason::Expired);
                continue;
            }
            // A dual allocation whose one family was not refreshed loses that relay alone.
            let expired = a.relays.map(|r| r.is_some_and(|r| r.expires <= now));
            for (family, _) in expired.iter().enumerate().filter(|(_, e)| **e) {
                self.end_relay(slot, family, now, EndReason::Expired);
            }
            self.arm(slot);
        }
        self.shrink_tables();
    }

    /// (Re)sets a live slot's one timer entry to its next deadline.
    fn arm(&mut self, slot: u32) {
        let a = self.alloc_mut(slot);
        let relays = a.relays.iter().flatten().map(|r| r.expires).min();
        let at = relays.unwrap_or(a.expires);
        let at = a.reservation.map_or(at, |r| r.expires.min(at));
        self.timers.set(slot, at);
    }

    /// Ends a reservation (claimed, expired, or its allocation ended) and frees its port.
    fn end_reservation(&mut self, token: u64) {
        if self.shared.quotas.end_reservation(token) {
            self.commands.push_back(Command::DropReservation(token));
        }
    }

    /// Stops granting new allocations; existing ones run on.
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    pub fn sessions(&self, now: Instant) -> Vec<SessionInfo> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.alloc.as_ref().map(|a| (i as u32, s.gen, a)))
            .map(|(slot, gen, a)| SessionInfo {
                slot,
                gen,
                allocation_id: a.id,
                username: a.username.to_string(),
                client: a.five_tuple.client,
                transport: a.five_tuple.transport,
                relays: a.relays.iter().flatten().map(|r| r.advertised).collect(),
                age_secs: now.saturating_duration_since(a.created).as_secs(),
                expires_in_secs: a.expires.saturating_duration_since(now).as_secs(),
                counters: a.counters,
                permissions: a.permissions.iter().filter(|p| p.expires > now).count(),
                channels: a.channels.iter().filter(|c| c.expires > now).count(),
            })
            .collect()
    }

    /// Ends one allocation (admin kill); false when it no longer exists.
    pub fn end_session(&mut self, slot: u32, gen: u32, now: Instant, why: EndReason) -> bool {
        if self.slot(slot, gen).is_none() {
            return false;
        }
        self.end_allocation(slot, now, why);
        true
    }

    /// Ends every allocation of a user (by the name quotas count: a REST username's user part).
    pub fn end_user(&mut self, user: &str, now: Instant, why: EndReason) -> usize {
        let slots: Vec<u32> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.alloc.as_ref().is_some_and(|a| &*a.quota_key.user == user))
            .map(|(i, _)| i as u32)
            .collect();
        for &slot in &slots {
            self.end_allocation(slot, now, why);
        }
        slots.len()
    }

    /// A stream client's connection closed: its allocation ends, and one still waiting for its
    /// relay sockets is abandoned; a data connection of a TCP relay (already closed with its
    /// pipe) is forgotten. False when the 5-tuple held none of these.
    pub fn connection_closed(&mut self, ft: &FiveTuple, now: Instant) -> bool {
        if self.data_connection_closed(ft) {
            return true;
        }
        if let Some(i) = self.pending.iter().position(|p| p.ft == *ft) {
            let p = self.pending.swap_remove(i);
            self.abandon(p);
            return true;
        }
        match self.by_client.get(ft).copied() {
            Some(slot) => {
                self.end_allocation(slot, now, EndReason::ConnectionClosed);
                true
            }
            None => false,
        }
    }

    /// Ends every allocation, and abandons those still waiting for relay sockets (shutdown).
    pub fn close_all(&mut self, now: Instant, why: EndReason) {
        for p in std::mem::take(&mut self.pending) {
            self.abandon(p);
        }
        let slots: Vec<u32> = self.by_client.values().copied().collect();
        for slot in slots {
            self.end_allocation(slot, now, why);
        }
    }

    fn slot(&self, slot: u32, gen: u32) -> Option<&Allocation> {
        self.slots
            .get(slot as usize)
            .filter(|s| s.gen == gen)
            .and_then(|s| s.alloc.as_deref())
    }

    fn alloc_mut(&mut self, slot: u32) -> &mut Allocation {
        self.slots[slot as usize]
            .alloc
            .as_mut()
            .expect("by_client points at a live slot")
    }

    /// A free slot and its generation, for an allocation about to be made.
    fn take_slot(&mut self) -> (u32, u32) {
        let slot = match self.free_slots.pop() {
            Some(Reverse(slot)) => slot,
            None => {
                self.slots.push(Slot {
                    gen: self.fresh_gen,
                    alloc: None,
                });
                self.slots_grew();
                (self.slots.len() - 1) as u32
            }
        };
        (slot, self.slots[slot as usize].gen)
    }

    /// A relay starts serving: it becomes a valid peer for every shard's clients and, when it
    /// is a UDP socket, a destination this core delivers to in-process.
    fn relay_live(&mut self, r: &Relay, tcp: bool) {
        let owner = (!tcp).then_some(self.shard);
        self.shared.live_relays.insert(&r.local, owner);
        if !tcp {
            self.own_relays.insert(r.local, r.id);
        }
    }

    fn relay_gone(&mut self, r: &Relay) {
        // Only UDP relays are in `own_relays`; a TCP relay may share the port number.
        let udp = self.own_relays.get(&r.local) == Some(&r.id);
        self.shared.live_relays.remove(&r.local, udp);
        if udp {
            self.own_relays.remove(&r.local);
        }
    }

    /// Returns a slot; its generation moves on, so nothing addressed to the old one reaches the
    /// next occupant.
    fn free_slot(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        s.gen = s.gen.wrapping_add(1);
        self.free_slots.push(Reverse(slot));
    }

    // ---------------------------------------------------------------- client side

    /// A datagram from a client. `data` is the whole datagram; a ToPeer range points into it.
    pub fn handle_client(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        data: &[u8],
        reply: &mut Vec<u8>,
    ) -> ClientAction {
        match data.first().map(|b| b >> 6) {
            Some(0b01) => self.channel_data(now, ft, data, reply),
            Some(0b00) => self.stun(now, ft, data, reply),
            _ => {
                self.stats.dropped_malformed += 1;
                ClientAction::Drop
            }
        }
    }

    fn stun(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        data: &[u8],
        reply: &mut Vec<u8>,
    ) -> ClientAction {
        let msg = match Message::parse(data) {
            Ok(m) => m,
            Err(_) => {
                self.stats.dropped_malformed += 1;
                return ClientAction::Drop;
            }
        };
        match (msg.class, msg.method) {
            (Class::Request, method::BINDING) => self.binding(now, ft, &msg, reply),
            (Class::Indication, method::SEND) => self.send_indication(now, ft, &msg, reply),
            (
                Class::Request,
                method::ALLOCATE
                | method::REFRESH
                | method::CREATE_PERMISSION
                | method::CHANNEL_BIND
                | method::CONNECT
                | method::CONNECTION_BIND,
            ) => self.turn_request(now, ft, &msg, reply),
            (Class::Request, _) => self.refuse(
                now,
                ft,
                &Answer::to(&msg),
                TurnError::BadRequest,
                None,
                reply,
            ),
            // Binding indications are keepalives; responses and other indications are not ours.
            _ => ClientAction::Drop,
        }
    }

    fn binding(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message,
        reply: &mut Vec<u8>,
    ) -> ClientAction {
        self.stats.binding_requests += 1;
        let answer = Answer::to(msg);
        let discovery = self.discovery_at(ft);
        let req = match Binding::parse(msg, discovery.is_some()) {
            Ok(req) => req,
            Err(e) => return self.refuse(now, ft, &answer, e, None, reply),
        };
        let origin = match discovery {
            // A connection's answers cannot leave from another address.
            Some(_) if req.change.changes_anything() && ft.transport != Transport::Udp => {
                return self.refuse(now, ft, &answer, TurnError::BadRequest, None, reply);
            }
            Some(d) => d.answer(ft.local, req.change),
            None => None,
        };
        // These answers are two to four times the size of the request and may come from an
        // address the client never sent to: rate limited per source like every other
        // unauthenticated reply.
        if origin.is_some() && !self.shared.limiter.allow(ft.client.ip(), now) {
            self.stats.rate_limited += 1;
            return ClientAction::Drop;
        }
        let mut w = MessageWriter::new(reply, method::BINDING, Class::Success, answer.txid);
        w.xor_address(attr::XOR_MAPPED_ADDRESS, ft.client);
        let mut to = *ft;
        if let Some(o) = origin {
            // RFC 5780 §6.1 wants MAPPED-ADDRESS beside XOR-MAPPED-ADDRESS: a client that sees
            // them differ has found a NAT rewriting addresses in payloads.
            w.address(attr::MAPPED_ADDRESS, ft.client)
                .address(attr::RESPONSE_ORIGIN, o.source)
                .address(attr::OTHER_ADDRESS, o.other);
            to.local = o.source;
        }
        self.finish(&mut w, &answer, None);
        ClientAction::Reply { to }
    }

    /// The discovery addresses `ft` arrived on, if it arrived on one of them over a transport
    /// that listens on all four.
    fn discovery_at(&self, ft: &FiveTuple) -> Option<NatDiscovery> {
        self.config
            .nat_discovery
            .iter()
            .find(|d| (ft.transport == Transport::Udp || d.tcp) && d.position(ft.local).is_some())
            .copied()
    }

    /// Whether `local` is one of the listeners only discovery binds: they answer Binding alone.
    fn is_discovery_only(&self, local: SocketAddr) -> bool {
        self.config
            .nat_discovery
            .iter()
            .any(|d| d.position(local).is_some_and(|p| p != (false, false)))
    }

    /// Allocate, Refresh, CreatePermission, ChannelBind: authenticated, answered, retransmission-safe.
    fn turn_request(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message,
        reply: &mut Vec<u8>,
    ) -> ClientAction {
        let answer = Answer::to(msg);
        if self.is_discovery_only(ft.local) {
            // Minted URIs never name these listeners; TURN on them would only widen what an
            // attacker can reach.
            return self.refuse(now, ft, &answer, TurnError::Forbidden, None, reply);
        }
        let existing = self.by_client.get(ft).copied();
        if let Some(slot) = existing {
            if let Some(bytes) = self.alloc_mut(slot).answers.get(&answer.txid) {
                reply.clear();
                reply.extend_from_slice(bytes);
                return ClientAction::Reply { to: *ft };
            }
        }
        if self
            .pending
            .iter()
            .any(|p| p.ft == *ft && p.answer.txid == answer.txid)
        {
            // A retransmission while its relay sockets are being opened: the answer follows.
            return ClientAction::Drop;
        }
        let signer = match self.authenticate(now, ft, msg) {
            Ok(s) => s,
            Err(e) => return self.refuse(now, ft, &answer, e, None, reply),
        };
        let username = msg
            .get(crate::proto::codec::attr::USERNAME)
            .and_then(|a| std::str::from_utf8(a.value).ok())
            .unwrap_or_default();
        let outcome = request::check_turn_attributes(msg)
            .and_then(|()| self.turn_method(now, ft, msg, &answer, username, &signer, existing));
        match outcome {
            Ok(Success::Pending) => return ClientAction::Drop,
            Ok(success) => self.succeed(reply, &answer, &signer, success),
            Err(e) => {
                self.refuse(now, ft, &answer, e, Some(&signer), reply);
            }
        }
        // Remember the answer for a retransmission of this request on this 5-tuple.
        if let Some(&slot) = self.by_client.get(ft) {
            self.alloc_mut(slot).answers.remember(answer.txid, reply);
        }
        ClientAction::Reply { to: *ft }
    }

    /// The method's own decisions, in RFC 8656 order: the 5-tuple's state first (437), then the
    /// request's attributes, then quotas and policy.
    #[allow(clippy::too_many_arguments)]
    fn turn_method(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message,
        answer: &Answer,
        username: &str,
        signer: &respond::Signer,
        existing: Option<u32>,
    ) -> Result<Success, TurnError> {
        use request::{Allocate, ChannelBind, Connect, ConnectionBind, CreatePermission, Refresh};
        let Some(slot) = existing else {
            if msg.method == method::CONNECTION_BIND {
                return self.connection_bind(ft, username, ConnectionBind::parse(msg)?);
            }
            if msg.method != method::ALLOCATE || self.pending.iter().any(|p| p.ft == *ft) {
                return Err(TurnError::AllocationMismatch);
            }
            if self.draining {
                // The server is shutting down: clients move on to the next ICE server.
                self.stats.quota_rejections += 1;
                return Err(TurnError::InsufficientCapacity);
            }
            let req = Allocate::parse(msg)?;
            return self.allocate(ft, answer, signer, username, req);
        };
        match msg.method {
            method::ALLOCATE => return Err(TurnError::AllocationMismatch),
            // RFC 6062 §5.4: a data connection is a connection without an allocation.
            method::CONNECTION_BIND => return Err(TurnError::BadRequest),
            _ => {}
        }
        if *self.alloc_mut(slot).username != *username {
            return Err(TurnError::WrongCredentials);
        }
        match msg.method {
            method::REFRESH => self.refresh(now, slot, Refresh::parse(msg)?),
            method::CREATE_PERMISSION => {
                self.create_permission(now, slot, &CreatePermission::parse(msg)?)
            }
            method::CONNECT => self.connect(now, ft, slot, Connect::parse(msg)?, answer, signer),
            // Channels carry datagrams; a TCP allocation has none to carry.
            _ if self.alloc_mut(slot).tcp => Err(TurnError::BadRequest),
            _ => self.channel_bind(now, slot, ChannelBind::parse(msg)?),
        }
    }

    /// LIFETIME as granted: the default when absent, else clamped to the configured range; 0
    /// stays 0 (a delete in Refresh).
    fn lifetime(&self, asked: Option<u32>) -> Duration {
        let limits = &self.config.limits;
        match asked {
            Some(0) => Duration::ZERO,
            Some(secs) => Duration::from_secs(secs as u64)
                .min(limits.max_lifetime)
                .max(limits.default_lifetime),
            None => limits.default_lifetime,
        }
    }

    /// Closes one family's relay of an allocation; the allocation ends with its last relay.
    fn end_relay(&mut self, slot: u32, family: usize, now: Instant, why: EndReason) {
        let a = self.alloc_mut(slot);
        if a.relays.iter().flatten().count() <= 1 {
            return self.end_allocation(slot, now, why);
        }
        let Some(r) = a.remove_relay(family) else {
            return;
        };
        tracing::debug!(user = &*a.username, relay = %r.advertised, reason = %why, "relay ended");
        self.close_peer_connections(slot, Some(r.id));
        self.commands.push_back(Command::CloseRelay(r.id));
        self.relay_gone(&r);
    }

    fn end_allocation(&mut self, slot: u32, now: Instant, why: EndReason) {
        let Some(a) = self.slots[slot as usize].alloc.take() else {
            return;
        };
        self.free_slot(slot);
        self.timers.remove(slot);
        self.by_client.remove(&a.five_tuple);
        self.close_peer_connections(slot, None);
        for r in a.relays.iter().flatten() {
            self.commands.push_back(Command::CloseRelay(r.id));
            self.relay_gone(r);
        }
        // An unclaimed reservation dies with the allocation that made it.
        if let Some(r) = a.reservation {
            self.end_reservation(r.token);
        }
        self.shared.quotas.give_back(&a.quota_key, 1);
        self.stats.allocations_ended += 1;
        self.record_end(&a, now, why);
        let c = a.counters;
        tracing::info!(
            allocation_id = %format_args!("{:016x}", a.id),
            user = &*a.username,
            client = %a.five_tuple.client,
            transport = a.five_tuple.transport.as_str(),
            relay = %DisplayRelays(&a.relays),
            reason = %why,
            duration_secs = now.saturating_duration_since(a.created).as_secs(),
            to_peer_bytes = c.to_peer_bytes,
            to_peer_packets = c.to_peer_packets,
            to_client_bytes = c.to_client_bytes,
            to_client_packets = c.to_client_packets,
            dropped_packets = c.dropped_packets,
            "allocation ended"
        );
    }
}

/// Lets one line through per interval and counts the rest, so a failure a client can trigger at
/// will (a full relay range, no file descriptors left) costs the log one line per minute.
#[derive(Debug, Default)]
struct LogThrottle {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    const INTERVAL: Duration = Duration::from_secs(60);

    /// `Some(lines suppressed since the last one)` when this one should be logged.
    fn should_log(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < Self::INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

struct DisplayRelays<'a>(&'a [Option<Relay>; 2]);

impl std::fmt::Display for DisplayRelays<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for r in self.0.iter().flatten() {
            if !first {
                f.write_str(",")?;
            }
            write!(f, "{}", r.advertised)?;
            first = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
