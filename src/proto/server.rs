//! The TURN server core: bytes and 5-tuples in, actions out.
//!
//! One `Core` runs per I/O shard. It owns the allocations of the clients the kernel hashed to that
//! shard, so the packet path touches no lock. Cross-shard state is limited to what Allocate needs
//! (per-user and total allocation counts in [`Shared`]) and the nonce key.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::allocation::{Allocation, BindError, Counters, Relay, RelayId, TokenBucket};
use super::allocation::{Reservation, RESERVATION_LIFETIME};
use super::auth::{Authenticator, LongTermKey, NonceIssuer, NonceStatus, PasswordAlgorithm};
use super::codec::{
    self, attr, decode_xor_address, frame_channel_data, frame_data_indication, method, Class,
    Message, MessageWriter, CHANNEL_MAX, CHANNEL_MIN, HEADROOM,
};
use super::policy::{canonical_ip, PeerPolicy, Verdict};
use super::quota::{QuotaError, QuotaKey, Quotas};
use super::ratelimit::SourceRateLimiter;
pub use super::stats::{AuthFailure, Stats};
use super::timers::DeadlineQueue;
use super::FiveTuple;

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
}

/// The relay ports this server has open, per family: a peer on our own relay address is a valid
/// peer only at one of these (relay to relay). Any other port there belongs to some other local
/// process that happens to use a port inside the relay range (the kernel's ephemeral range
/// overlaps the default one), and is no business of a TURN client.
pub struct LiveRelayPorts {
    bits: [Box<[AtomicU64]>; 2],
}

impl Default for LiveRelayPorts {
    fn default() -> Self {
        let bitset = || (0..1024).map(|_| AtomicU64::new(0)).collect::<Box<[_]>>();
        LiveRelayPorts {
            bits: [bitset(), bitset()],
        }
    }
}

impl LiveRelayPorts {
    fn word(&self, addr: &SocketAddr) -> (&AtomicU64, u64) {
        let port = addr.port() as usize;
        (
            &self.bits[addr.is_ipv6() as usize][port / 64],
            1u64 << (port % 64),
        )
    }

    fn insert(&self, addr: &SocketAddr) {
        let (w, bit) = self.word(addr);
        w.fetch_or(bit, Ordering::Relaxed);
    }

    fn remove(&self, addr: &SocketAddr) {
        let (w, bit) = self.word(addr);
        w.fetch_and(!bit, Ordering::Relaxed);
    }

    pub fn contains(&self, addr: &SocketAddr) -> bool {
        let (w, bit) = self.word(addr);
        w.load(Ordering::Relaxed) & bit != 0
    }
}

/// State all shards share. Touched on Allocate, on an allocation's end and on unauthenticated
/// replies, never per relayed packet.
pub struct Shared {
    nonces: NonceIssuer,
    anchor: Instant,
    anchor_unix: u64,
    quotas: Quotas,
    live_relays: LiveRelayPorts,
    /// One limit per source across every shard (the kernel spreads a source's ports over them).
    limiter: SourceRateLimiter,
}

/// Buckets in the unauthenticated-reply table: 128 KiB, far above the sources that misbehave at once.
const LIMITER_SLOTS: usize = 16_384;

impl Shared {
    /// `anchor`/`anchor_unix` pin the monotonic clock to wall-clock time once, so the core can check
    /// REST expiries without reading a clock.
    pub fn new(
        nonce_secret: [u8; 32],
        nonce_lifetime_secs: u64,
        anchor: Instant,
        anchor_unix: u64,
    ) -> Self {
        // The limiter's hash key must be unpredictable; derive it from the (random) nonce key
        // one-way, so neither reveals the other.
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            &[b"turnpike rate limiter".as_slice(), &nonce_secret].concat(),
        );
        let hash_key = u64::from_le_bytes(digest.as_ref()[..8].try_into().unwrap_or_default());
        Shared {
            nonces: NonceIssuer::new(nonce_secret, nonce_lifetime_secs),
            anchor,
            anchor_unix,
            quotas: Quotas::default(),
            live_relays: LiveRelayPorts::default(),
            // No rate of its own: every core sets the configured one (`Core::new`, `set_config`).
            limiter: SourceRateLimiter::new(0, 0, LIMITER_SLOTS, hash_key, anchor),
        }
    }

    pub fn unix_time(&self, now: Instant) -> u64 {
        self.anchor_unix + now.saturating_duration_since(self.anchor).as_secs()
    }

    /// Quota units held: live allocations plus unclaimed port reservations.
    pub fn total_allocations(&self) -> u32 {
        self.quotas.total()
    }

    /// Relay ports held by EVEN-PORT reservations nobody has claimed yet.
    pub fn reserved_ports(&self) -> usize {
        self.quotas.reserved_ports()
    }

    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    fn take_quota(&self, key: &QuotaKey, units: u32, limits: &Limits) -> Result<(), QuotaError> {
        self.quotas.take(
            key,
            units,
            limits.allocations_per_user,
            limits.total_allocations,
        )
    }
}

/// What the relay socket layer is asked to do. The I/O layer binds real sockets; tests use a fake.
#[derive(Debug, Clone, Copy)]
pub struct RelayRequest {
    pub id: RelayId,
    pub ip: IpAddr,
    pub even_port: bool,
    /// Also reserve the next port (EVEN-PORT with the R bit) and hand back a token for it.
    pub reserve_next: bool,
    pub dont_fragment: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct OpenedRelay {
    pub local: SocketAddr,
    pub reservation_token: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RelayOpenError {
    #[error("every relay port is in use")]
    NoPort,
    #[error("unknown or expired reservation token")]
    UnknownToken,
    /// The operating system refused the socket (out of file descriptors, say).
    #[error("relay socket refused: {0}")]
    Os(std::io::ErrorKind),
}

/// Relay sockets, opened and closed on the core's word. The core decides every lifetime,
/// reservations' included; the provider only holds the sockets.
pub trait RelayProvider {
    fn open(&mut self, req: &RelayRequest) -> Result<OpenedRelay, RelayOpenError>;
    /// Takes the socket reserved under `token` (any shard may have reserved it). The core has
    /// already checked that the reservation is live.
    fn open_reserved(&mut self, id: RelayId, token: u64) -> Result<SocketAddr, RelayOpenError>;
    fn close(&mut self, id: RelayId);
    /// Closes the socket reserved under `token`, if nobody has claimed it.
    fn drop_reservation(&mut self, token: u64);
}

/// What the I/O layer does with a client datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAction {
    Drop,
    /// Send the reply buffer back on the same 5-tuple.
    Reply,
    /// Send `data[start..end]` from relay socket `relay` to `peer`.
    ToPeer {
        relay: RelayId,
        peer: SocketAddr,
        start: usize,
        end: usize,
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

/// How a response is protected.
#[derive(Clone, Copy)]
struct Signer {
    key: LongTermKey,
    sha256: bool,
}

struct Slot {
    gen: u32,
    alloc: Option<Allocation>,
}

pub struct Core<P> {
    config: Arc<CoreConfig>,
    shared: Arc<Shared>,
    relays: P,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    by_client: HashMap<FiveTuple, u32>,
    /// One deadline per live allocation slot: the sooner of its expiry and its reservation's.
    timers: DeadlineQueue,
    /// Failed relay opens not yet logged: an authenticated user must not be able to flood the log.
    relay_failures: LogThrottle,
    rng: u64,
    keys: Vec<LongTermKey>,
    stats: Stats,
    /// While draining, existing allocations keep working and new ones are refused.
    draining: bool,
}

/// One allocation as the admin API shows it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub slot: u32,
    pub gen: u32,
    pub username: String,
    pub client: SocketAddr,
    pub transport: &'static str,
    pub relays: Vec<SocketAddr>,
    pub age_secs: u64,
    pub expires_in_secs: u64,
    pub counters: Counters,
    pub permissions: usize,
    pub channels: usize,
}

/// Comprehension-required attributes the TURN methods understand.
const TURN_KNOWN: &[u16] = &[
    attr::USERNAME,
    attr::MESSAGE_INTEGRITY,
    attr::ERROR_CODE,
    attr::CHANNEL_NUMBER,
    attr::LIFETIME,
    attr::XOR_PEER_ADDRESS,
    attr::DATA,
    attr::REALM,
    attr::NONCE,
    attr::REQUESTED_ADDRESS_FAMILY,
    attr::EVEN_PORT,
    attr::REQUESTED_TRANSPORT,
    attr::DONT_FRAGMENT,
    attr::MESSAGE_INTEGRITY_SHA256,
    attr::PASSWORD_ALGORITHM,
    attr::RESERVATION_TOKEN,
];

/// Comprehension-required attributes of a Send indication. DONT-FRAGMENT is understood, though
/// not yet applied per datagram.
const SEND_KNOWN: &[u16] = &[attr::XOR_PEER_ADDRESS, attr::DATA, attr::DONT_FRAGMENT];

/// Binding requests may carry ICE and RFC 5780 attributes we can safely ignore.
const BINDING_KNOWN: &[u16] = &[
    attr::USERNAME,
    attr::MESSAGE_INTEGRITY,
    attr::MESSAGE_INTEGRITY_SHA256,
    attr::REALM,
    attr::NONCE,
    attr::PRIORITY,
    attr::USE_CANDIDATE,
    0x0026, // PADDING (RFC 5780): only inflates the request
];

const ALGORITHMS: [PasswordAlgorithm; 2] = [PasswordAlgorithm::Md5, PasswordAlgorithm::Sha256];

fn reason(code: u16) -> &'static str {
    match code {
        400 => "Bad Request",
        401 => "Unauthenticated",
        403 => "Forbidden",
        420 => "Unknown Attribute",
        437 => "Allocation Mismatch",
        438 => "Stale Nonce",
        440 => "Address Family not Supported",
        441 => "Wrong Credentials",
        442 => "Unsupported Transport Protocol",
        443 => "Peer Address Family Mismatch",
        486 => "Allocation Quota Reached",
        508 => "Insufficient Capacity",
        _ => "Error",
    }
}

fn password_algorithms_value() -> [u8; 8] {
    let mut v = [0u8; 8];
    for (i, a) in ALGORITHMS.iter().enumerate() {
        v[i * 4..i * 4 + 2].copy_from_slice(&a.code().to_be_bytes());
    }
    v
}

fn family_of(value: &[u8]) -> Option<u8> {
    (value.len() == 4).then(|| value[0])
}

impl<P: RelayProvider> Core<P> {
    pub fn new(config: Arc<CoreConfig>, shared: Arc<Shared>, relays: P, seed: u64) -> Self {
        let limits = &config.limits;
        shared
            .limiter
            .set_rate(limits.unauth_replies_per_sec, limits.unauth_replies_burst);
        Core {
            config,
            shared,
            relays,
            slots: Vec::new(),
            free_slots: Vec::new(),
            by_client: HashMap::new(),
            timers: DeadlineQueue::default(),
            relay_failures: LogThrottle::default(),
            rng: seed | 1,
            keys: Vec::with_capacity(4),
            stats: Stats::default(),
            draining: false,
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

    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    pub fn relays(&mut self) -> &mut P {
        &mut self.relays
    }

    /// The earliest instant `handle_timeout` has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// Ends every allocation whose lifetime has run out and every reservation nobody claimed.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(slot) = self.timers.pop_due(now) {
            let Some(a) = self.slots[slot as usize].alloc.as_mut() else {
                continue;
            };
            if let Some(r) = a.reservation.filter(|r| r.expires <= now) {
                a.reservation = None;
                self.end_reservation(r.token);
            }
            if self.alloc_mut(slot).expires <= now {
                self.end_allocation(slot, now, "expired");
            } else {
                self.arm(slot);
            }
        }
    }

    /// (Re)sets a live slot's one timer entry to its next deadline.
    fn arm(&mut self, slot: u32) {
        let a = self.alloc_mut(slot);
        let at = a
            .reservation
            .map_or(a.expires, |r| r.expires.min(a.expires));
        self.timers.set(slot, at);
    }

    /// Ends a reservation (claimed, expired, or its allocation ended) and frees its port.
    fn end_reservation(&mut self, token: u64) {
        if self.shared.quotas.end_reservation(token) {
            self.relays.drop_reservation(token);
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
                username: a.username.to_string(),
                client: a.five_tuple.client,
                transport: a.five_tuple.transport.as_str(),
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
    pub fn end_session(&mut self, slot: u32, gen: u32, now: Instant, why: &str) -> bool {
        if self.slot(slot, gen).is_none() {
            return false;
        }
        self.end_allocation(slot, now, why);
        true
    }

    /// Ends every allocation of a user (by the name quotas count: a REST username's user part).
    pub fn end_user(&mut self, user: &str, now: Instant, why: &str) -> usize {
        let slots: Vec<u32> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.alloc.as_ref().is_some_and(|a| &*a.quota_user == user))
            .map(|(i, _)| i as u32)
            .collect();
        for &slot in &slots {
            self.end_allocation(slot, now, why);
        }
        slots.len()
    }

    /// Ends every allocation (shutdown).
    pub fn close_all(&mut self, now: Instant, why: &str) {
        let slots: Vec<u32> = self.by_client.values().copied().collect();
        for slot in slots {
            self.end_allocation(slot, now, why);
        }
    }

    fn slot(&self, slot: u32, gen: u32) -> Option<&Allocation> {
        self.slots
            .get(slot as usize)
            .filter(|s| s.gen == gen)
            .and_then(|s| s.alloc.as_ref())
    }

    fn alloc_mut(&mut self, slot: u32) -> &mut Allocation {
        self.slots[slot as usize]
            .alloc
            .as_mut()
            .expect("by_client points at a live slot")
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
            Some(0b01) => self.channel_data(now, ft, data),
            Some(0b00) => self.stun(now, ft, data, reply),
            _ => {
                self.stats.dropped_malformed += 1;
                ClientAction::Drop
            }
        }
    }

    fn channel_data(&mut self, now: Instant, ft: &FiveTuple, data: &[u8]) -> ClientAction {
        let Some(cd) = codec::parse_channel_data(data) else {
            self.stats.dropped_malformed += 1;
            return ClientAction::Drop;
        };
        let Some(&slot) = self.by_client.get(ft) else {
            return ClientAction::Drop;
        };
        let a = self.alloc_mut(slot);
        let target = a
            .channel(cd.channel, now)
            .map(|c| c.peer)
            .filter(|peer| a.has_permission(peer.ip(), now))
            .and_then(|peer| a.relay_for(&peer).map(|r| (r.id, peer)));
        let Some((relay, peer)) = target else {
            a.counters.dropped_packets += 1;
            self.stats.dropped_no_permission += 1;
            return ClientAction::Drop;
        };
        self.forward_to_peer(slot, now, relay, peer, cd.start, cd.end)
    }

    fn forward_to_peer(
        &mut self,
        slot: u32,
        now: Instant,
        relay: RelayId,
        peer: SocketAddr,
        start: usize,
        end: usize,
    ) -> ClientAction {
        let len = end - start;
        let a = self.alloc_mut(slot);
        if let Some(b) = a.to_peer_budget.as_mut() {
            if !b.take(len, now) {
                a.counters.dropped_packets += 1;
                self.stats.dropped_bandwidth += 1;
                return ClientAction::Drop;
            }
        }
        a.counters.to_peer_packets += 1;
        a.counters.to_peer_bytes += len as u64;
        self.stats.to_peer_packets += 1;
        self.stats.to_peer_bytes += len as u64;
        ClientAction::ToPeer {
            relay,
            peer,
            start,
            end,
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
            (Class::Indication, method::SEND) => self.send_indication(now, ft, &msg),
            (
                Class::Request,
                method::ALLOCATE
                | method::REFRESH
                | method::CREATE_PERMISSION
                | method::CHANNEL_BIND,
            ) => self.turn_request(now, ft, &msg, reply),
            (Class::Request, _) => {
                if !self.shared.limiter.allow(ft.client.ip(), now) {
                    self.stats.rate_limited += 1;
                    return ClientAction::Drop;
                }
                self.error(reply, &msg, 400, None);
                ClientAction::Reply
            }
            // Binding indications are keepalives; responses and other indications are not ours.
            _ => ClientAction::Drop,
        }
    }

    /// Unknown comprehension-required attributes, up to a handful (enough for a useful 420).
    fn unknown_attributes(msg: &Message, known: &[u16]) -> ([u16; 8], usize) {
        let mut out = [0u16; 8];
        let mut n = 0;
        for a in msg.attributes() {
            let ignorable_change_request =
                a.kind == attr::CHANGE_REQUEST && a.value.iter().all(|b| *b == 0);
            if attr::is_comprehension_required(a.kind)
                && !known.contains(&a.kind)
                && !ignorable_change_request
                && n < out.len()
                && !out[..n].contains(&a.kind)
            {
                out[n] = a.kind;
                n += 1;
            }
        }
        (out, n)
    }

    fn binding(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message,
        reply: &mut Vec<u8>,
    ) -> ClientAction {
        self.stats.binding_requests += 1;
        let (unknown, n) = Self::unknown_attributes(msg, BINDING_KNOWN);
        if n > 0 {
            if !self.shared.limiter.allow(ft.client.ip(), now) {
                self.stats.rate_limited += 1;
                return ClientAction::Drop;
            }
            self.unknown_attribute_error(reply, msg, &unknown[..n], None);
            return ClientAction::Reply;
        }
        let mut w =
            MessageWriter::new(reply, method::BINDING, Class::Success, msg.transaction_id());
        w.xor_address(attr::XOR_MAPPED_ADDRESS, ft.client);
        self.finish(&mut w, msg, None);
        ClientAction::Reply
    }

    fn send_indication(&mut self, now: Instant, ft: &FiveTuple, msg: &Message) -> ClientAction {
        let Some(&slot) = self.by_client.get(ft) else {
            return ClientAction::Drop;
        };
        // An indication cannot be answered with 420: one we do not fully understand is
        // discarded (RFC 8489 §6.3.2).
        if Self::unknown_attributes(msg, SEND_KNOWN).1 > 0 {
            self.stats.dropped_malformed += 1;
            return ClientAction::Drop;
        }
        let txid = msg.transaction_id();
        let peer = msg
            .get(attr::XOR_PEER_ADDRESS)
            .and_then(|a| decode_xor_address(a.value, &txid));
        let (Some(peer), Some(data)) = (peer, msg.get(attr::DATA)) else {
            self.stats.dropped_malformed += 1;
            return ClientAction::Drop;
        };
        let Some(peer) = self.peer_verdict(peer) else {
            return ClientAction::Drop;
        };
        let a = self.alloc_mut(slot);
        let relay = a.relay_for(&peer).map(|r| r.id);
        let Some(relay) = relay.filter(|_| a.has_permission(peer.ip(), now)) else {
            a.counters.dropped_packets += 1;
            self.stats.dropped_no_permission += 1;
            return ClientAction::Drop;
        };
        let start = data.offset;
        self.forward_to_peer(slot, now, relay, peer, start, start + data.value.len())
    }

    /// Allocate, Refresh, CreatePermission, ChannelBind: authenticated, answered, retransmission-safe.
    fn turn_request(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message,
        reply: &mut Vec<u8>,
    ) -> ClientAction {
        let txid = msg.transaction_id();
        let existing = self.by_client.get(ft).copied();
        if let Some(slot) = existing {
            let a = self.alloc_mut(slot);
            let cached = match &a.allocate_answer {
                Some((t, answer)) if *t == txid => Some(&answer[..]),
                _ => (a.last_txid == txid && !a.last_response.is_empty())
                    .then_some(&a.last_response[..]),
            };
            if let Some(answer) = cached {
                reply.clear();
                reply.extend_from_slice(answer);
                return ClientAction::Reply;
            }
        }
        let signer = match self.authenticate(now, ft, msg, reply) {
            Ok(s) => s,
            Err(action) => return action,
        };
        let username = msg
            .get(attr::USERNAME)
            .and_then(|a| std::str::from_utf8(a.value).ok())
            .unwrap_or_default();
        let (unknown, n) = Self::unknown_attributes(msg, TURN_KNOWN);
        if n > 0 {
            self.unknown_attribute_error(reply, msg, &unknown[..n], Some(&signer));
            return ClientAction::Reply;
        }
        if let Some(slot) = existing {
            if msg.method != method::ALLOCATE && *self.alloc_mut(slot).username != *username {
                self.error(reply, msg, 441, Some(&signer));
                return ClientAction::Reply;
            }
        }
        match msg.method {
            method::ALLOCATE => self.allocate(now, ft, msg, username, &signer, existing, reply),
            method::REFRESH => self.refresh(now, msg, &signer, existing, reply),
            method::CREATE_PERMISSION => self.create_permission(now, msg, &signer, existing, reply),
            _ => self.channel_bind(now, msg, &signer, existing, reply),
        }
        // Remember the answer for a retransmission of this request on this 5-tuple.
        if let Some(&slot) = self.by_client.get(ft) {
            let a = self.alloc_mut(slot);
            if existing.is_none() {
                a.allocate_answer = Some((txid, reply.as_slice().into()));
            }
            a.last_txid = txid;
            a.last_response.clear();
            a.last_response.extend_from_slice(reply);
        }
        ClientAction::Reply
    }

    /// Long-term credential check (RFC 8489 §9.2.4). On failure the reply (401/438/400) or a drop is the action.
    fn authenticate(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message,
        reply: &mut Vec<u8>,
    ) -> Result<Signer, ClientAction> {
        let sha256 = msg.has_integrity_sha256();
        if !msg.has_integrity() && !sha256 {
            return Err(self.challenge(now, ft, msg, reply, 401));
        }
        let username = msg.get(attr::USERNAME).map(|a| a.value);
        let realm = msg.get(attr::REALM);
        let nonce = msg.get(attr::NONCE);
        let (Some(username), Some(_), Some(nonce)) = (username, realm, nonce) else {
            return Err(self.unauthenticated_error(now, ft, msg, reply, 400));
        };
        let Ok(username) = std::str::from_utf8(username) else {
            return Err(self.unauthenticated_error(now, ft, msg, reply, 400));
        };
        let unix = self.shared.unix_time(now);
        match self
            .shared
            .nonces
            .check(nonce.value, unix, ft.transport.tag(), &ft.client)
        {
            NonceStatus::Valid => {}
            NonceStatus::Stale | NonceStatus::Invalid => {
                self.stats.stale_nonces += 1;
                return Err(self.challenge(now, ft, msg, reply, 438));
            }
        }
        let Some(algorithm) = self.password_algorithm(msg, nonce.value) else {
            return Err(self.unauthenticated_error(now, ft, msg, reply, 400));
        };
        let config = Arc::clone(&self.config);
        let mut keys = std::mem::take(&mut self.keys);
        let verdict = config
            .auth
            .candidate_keys(username, algorithm, unix, &mut keys)
            .map_err(|why| {
                tracing::debug!(client = %ft.client, reason = %why, "credentials refused");
                AuthFailure::from_reject(why)
            })
            .and_then(|()| {
                keys.iter()
                    .copied()
                    .find(|k| {
                        if sha256 {
                            msg.verify_integrity_sha256(k.as_bytes())
                        } else {
                            msg.verify_integrity(k.as_bytes())
                        }
                    })
                    .ok_or_else(|| {
                        tracing::debug!(client = %ft.client, "message integrity check failed");
                        AuthFailure::WrongPassword
                    })
            });
        self.keys = keys;
        match verdict {
            Ok(key) => Ok(Signer { key, sha256 }),
            Err(why) => {
                self.stats.auth_failures[why as usize] += 1;
                Err(self.challenge(now, ft, msg, reply, 401))
            }
        }
    }

    /// PASSWORD-ALGORITHM negotiation (RFC 8489 §9.2.4): absent means MD5; when present it must come
    /// with the PASSWORD-ALGORITHMS list we sent, unchanged (downgrade protection).
    fn password_algorithm(&self, msg: &Message, nonce: &[u8]) -> Option<PasswordAlgorithm> {
        let chosen = msg.get(attr::PASSWORD_ALGORITHM);
        let offered = msg.get(attr::PASSWORD_ALGORITHMS);
        match (chosen, offered) {
            (None, None) => Some(PasswordAlgorithm::Md5),
            (Some(c), Some(o)) if NonceIssuer::announces_password_algorithms(nonce) => {
                if o.value != password_algorithms_value() || c.value.len() < 4 {
                    return None;
                }
                let code = u16::from_be_bytes([c.value[0], c.value[1]]);
                PasswordAlgorithm::from_code(code).filter(|a| ALGORITHMS.contains(a))
            }
            _ => None,
        }
    }

    /// 401 or 438 with a fresh nonce, rate limited per source.
    fn challenge(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message,
        reply: &mut Vec<u8>,
        code: u16,
    ) -> ClientAction {
        if !self.shared.limiter.allow(ft.client.ip(), now) {
            self.stats.rate_limited += 1;
            return ClientAction::Drop;
        }
        let unix = self.shared.unix_time(now);
        let nonce = self
            .shared
            .nonces
            .issue(unix, ft.transport.tag(), &ft.client);
        let config = Arc::clone(&self.config);
        let mut w = MessageWriter::new(reply, msg.method, Class::Error, msg.transaction_id());
        w.error_code(code, reason(code))
            .attr(attr::REALM, config.auth.realm().as_bytes())
            .attr(attr::NONCE, nonce.as_bytes())
            .attr(attr::PASSWORD_ALGORITHMS, &password_algorithms_value());
        self.finish(&mut w, msg, None);
        ClientAction::Reply
    }

    fn unauthenticated_error(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message,
        reply: &mut Vec<u8>,
        code: u16,
    ) -> ClientAction {
        if !self.shared.limiter.allow(ft.client.ip(), now) {
            self.stats.rate_limited += 1;
            return ClientAction::Drop;
        }
        self.error(reply, msg, code, None);
        ClientAction::Reply
    }

    fn error(&self, reply: &mut Vec<u8>, msg: &Message, code: u16, signer: Option<&Signer>) {
        let mut w = MessageWriter::new(reply, msg.method, Class::Error, msg.transaction_id());
        w.error_code(code, reason(code));
        self.finish(&mut w, msg, signer);
    }

    fn unknown_attribute_error(
        &self,
        reply: &mut Vec<u8>,
        msg: &Message,
        unknown: &[u16],
        signer: Option<&Signer>,
    ) {
        let mut list = [0u8; 16];
        for (i, t) in unknown.iter().enumerate() {
            list[i * 2..i * 2 + 2].copy_from_slice(&t.to_be_bytes());
        }
        let mut w = MessageWriter::new(reply, msg.method, Class::Error, msg.transaction_id());
        w.error_code(420, reason(420))
            .attr(attr::UNKNOWN_ATTRIBUTES, &list[..unknown.len() * 2]);
        self.finish(&mut w, msg, signer);
    }

    /// SOFTWARE (if configured), integrity matching the request's, FINGERPRINT if the request had one.
    fn finish(&self, w: &mut MessageWriter, msg: &Message, signer: Option<&Signer>) {
        if let Some(s) = &self.config.software {
            w.attr(attr::SOFTWARE, s.as_bytes());
        }
        if let Some(s) = signer {
            if s.sha256 {
                w.integrity_sha256(s.key.as_bytes());
            } else {
                w.integrity(s.key.as_bytes());
            }
        }
        if msg.has_fingerprint() {
            w.fingerprint();
        }
    }

    fn lifetime(&self, msg: &Message) -> Duration {
        let limits = &self.config.limits;
        match msg
            .get(attr::LIFETIME)
            .filter(|a| a.value.len() == 4)
            .map(|a| u32::from_be_bytes([a.value[0], a.value[1], a.value[2], a.value[3]]))
        {
            Some(0) => Duration::ZERO,
            Some(secs) => Duration::from_secs(secs as u64)
                .min(limits.max_lifetime)
                .max(limits.default_lifetime),
            None => limits.default_lifetime,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn allocate(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message,
        username: &str,
        signer: &Signer,
        existing: Option<u32>,
        reply: &mut Vec<u8>,
    ) {
        if existing.is_some() {
            return self.error(reply, msg, 437, Some(signer));
        }
        if self.draining {
            // The server is shutting down: clients move on to the next ICE server.
            self.stats.quota_rejections += 1;
            return self.error(reply, msg, 508, Some(signer));
        }
        match msg.get(attr::REQUESTED_TRANSPORT).map(|a| a.value) {
            Some([17, _, _, _]) => {}
            Some([_, _, _, _]) => return self.error(reply, msg, 442, Some(signer)),
            _ => return self.error(reply, msg, 400, Some(signer)),
        }
        let requested_family = msg
            .get(attr::REQUESTED_ADDRESS_FAMILY)
            .map(|a| family_of(a.value));
        let additional_family = msg
            .get(attr::ADDITIONAL_ADDRESS_FAMILY)
            .map(|a| family_of(a.value));
        let token = msg.get(attr::RESERVATION_TOKEN).map(|a| a.value);
        let even_port = msg.get(attr::EVEN_PORT).map(|a| a.value);
        // RFC 8656 §7.2: these combinations are contradictory.
        let contradictory = (token.is_some()
            && (even_port.is_some() || requested_family.is_some()))
            || (additional_family.is_some() && (requested_family.is_some() || token.is_some()));
        if contradictory {
            return self.error(reply, msg, 400, Some(signer));
        }
        let token = match token {
            Some(t) if t.len() == 8 => Some(u64::from_be_bytes(t.try_into().unwrap_or_default())),
            Some(_) => return self.error(reply, msg, 400, Some(signer)),
            None => None,
        };
        let reserve_next = match even_port {
            Some([flags, ..]) => Some(flags & 0x80 != 0),
            Some([]) => return self.error(reply, msg, 400, Some(signer)),
            None => None,
        };
        let (want_v4, want_v6) = match (requested_family, additional_family) {
            (Some(Some(0x01)) | None, None) => (true, false),
            (Some(Some(0x02)), None) => (false, true),
            (None, Some(Some(0x02))) => (true, true),
            (Some(_), None) => return self.error(reply, msg, 440, Some(signer)),
            (_, Some(_)) => return self.error(reply, msg, 400, Some(signer)),
        };
        let config = Arc::clone(&self.config);
        let v4 = config.relay_v4.filter(|_| want_v4);
        let v6 = config.relay_v6.filter(|_| want_v6);
        // A dual request is served with the IPv4 relay alone when IPv6 is unavailable (ADDRESS-ERROR-CODE).
        if (want_v4 && v4.is_none()) || (want_v6 && !want_v4 && v6.is_none()) {
            return self.error(reply, msg, 440, Some(signer));
        }
        let quota_user = config.auth.quota_user(username);
        let quota_key = if config.auth.is_static_user(username) {
            QuotaKey::per_source(quota_user, ft.client.ip())
        } else {
            QuotaKey::rest(quota_user)
        };
        // A reserved neighbour port is capacity held for this user until it is claimed or dies
        // with this allocation, so it takes a unit of the quota too.
        let units = if reserve_next == Some(true) { 2 } else { 1 };
        if let Err(q) = self.shared.take_quota(&quota_key, units, &config.limits) {
            self.stats.quota_rejections += 1;
            let code = if q == QuotaError::User { 486 } else { 508 };
            return self.error(reply, msg, code, Some(signer));
        }
        // The reservation is ours to claim only while the core that made it still holds it.
        if let Some(t) = token {
            if !self.shared.quotas.end_reservation(t) {
                self.shared.quotas.give_back(&quota_key, units);
                return self.error(reply, msg, 508, Some(signer));
            }
        }
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot {
                    gen: 0,
                    alloc: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let gen = self.slots[slot as usize].gen;
        let dont_fragment = msg.get(attr::DONT_FRAGMENT).is_some();
        let mut relays = [None, None];
        let mut reservation = None;
        let mut failed = false;
        for (i, family) in [v4, v6].into_iter().enumerate() {
            let Some(family) = family else { continue };
            let id = RelayId {
                slot,
                gen,
                v6: i == 1,
            };
            let opened = match token {
                Some(t) => self.relays.open_reserved(id, t).map(|local| (local, None)),
                None => self
                    .relays
                    .open(&RelayRequest {
                        id,
                        ip: family.local,
                        even_port: reserve_next.is_some() && i == 0,
                        reserve_next: reserve_next == Some(true) && i == 0,
                        dont_fragment,
                    })
                    .map(|o| (o.local, o.reservation_token)),
            };
            match opened {
                Ok((local, tok)) => {
                    reservation = reservation.or(tok);
                    let advertised = SocketAddr::new(family.advertised, local.port());
                    relays[i] = Some(Relay {
                        id,
                        local,
                        advertised,
                    });
                }
                Err(e) => {
                    if let Some(suppressed) = self.relay_failures.should_log(now) {
                        tracing::warn!(
                            client = %ft.client,
                            error = %e,
                            similar_failures_not_logged = suppressed,
                            "allocation refused: relay socket unavailable"
                        );
                    }
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            for r in relays.iter().flatten() {
                self.relays.close(r.id);
            }
            if let Some(t) = reservation {
                self.relays.drop_reservation(t);
            }
            self.free_slots.push(slot);
            self.shared.quotas.give_back(&quota_key, units);
            return self.error(reply, msg, 508, Some(signer));
        }
        let reservation = reservation.map(|token| {
            self.shared.quotas.hold_for_reservation(token, &quota_key);
            Reservation {
                token,
                expires: now + RESERVATION_LIFETIME,
            }
        });
        if reserve_next == Some(true) && reservation.is_none() {
            // Nothing to hold for (the provider reserved no port): return the unit.
            self.shared.quotas.give_back(&quota_key, 1);
        }
        // RFC 8656 §7.2: a LIFETIME of 0 in an Allocate is no request at all: the default applies.
        let lifetime = match self.lifetime(msg) {
            Duration::ZERO => config.limits.default_lifetime,
            l => l,
        };
        let bw = config.limits.bandwidth_bytes_per_sec;
        let budget = (bw > 0).then(|| TokenBucket::new(bw, now));
        let allocation = Allocation {
            five_tuple: *ft,
            username: username.into(),
            quota_user: quota_user.into(),
            quota_key,
            reservation,
            created: now,
            expires: now + lifetime,
            relays,
            permissions: Vec::new(),
            channels: Vec::new(),
            last_txid: [0; 12],
            last_response: Vec::new(),
            allocate_answer: None,
            counters: Counters::default(),
            to_peer_budget: budget,
            to_client_budget: budget,
        };
        for r in relays.iter().flatten() {
            self.shared.live_relays.insert(&r.local);
        }
        self.slots[slot as usize].alloc = Some(allocation);
        self.by_client.insert(*ft, slot);
        self.arm(slot);
        self.stats.allocations_created += 1;
        tracing::info!(
            user = username,
            client = %ft.client,
            transport = ft.transport.as_str(),
            relay = %DisplayRelays(&relays),
            lifetime_secs = lifetime.as_secs(),
            "allocation created"
        );

        let mut w = MessageWriter::new(
            reply,
            method::ALLOCATE,
            Class::Success,
            msg.transaction_id(),
        );
        for r in relays.iter().flatten() {
            w.xor_address(attr::XOR_RELAYED_ADDRESS, r.advertised);
        }
        if want_v6 && want_v4 && relays[1].is_none() {
            // RFC 8656 §7.2: the IPv6 half of a dual allocation failed.
            let mut v = [0u8; 4 + 28];
            v[0] = 0x02;
            v[2] = 4;
            v[3] = 40;
            let r = reason(440).as_bytes();
            v[4..4 + r.len()].copy_from_slice(r);
            w.attr(attr::ADDRESS_ERROR_CODE, &v[..4 + r.len()]);
        }
        w.u32_attr(attr::LIFETIME, lifetime.as_secs() as u32);
        if let Some(r) = reservation {
            w.attr(attr::RESERVATION_TOKEN, &r.token.to_be_bytes());
        }
        w.xor_address(attr::XOR_MAPPED_ADDRESS, ft.client);
        self.finish(&mut w, msg, Some(signer));
    }

    fn refresh(
        &mut self,
        now: Instant,
        msg: &Message,
        signer: &Signer,
        existing: Option<u32>,
        reply: &mut Vec<u8>,
    ) {
        let Some(slot) = existing else {
            return self.error(reply, msg, 437, Some(signer));
        };
        if let Some(f) = msg.get(attr::REQUESTED_ADDRESS_FAMILY) {
            let index = match family_of(f.value) {
                Some(0x01) => 0,
                Some(0x02) => 1,
                _ => return self.error(reply, msg, 440, Some(signer)),
            };
            if self.alloc_mut(slot).relays[index].is_none() {
                return self.error(reply, msg, 443, Some(signer));
            }
        }
        let lifetime = self.lifetime(msg);
        if lifetime.is_zero() {
            self.end_allocation(slot, now, "deleted by client");
        } else {
            self.alloc_mut(slot).expires = now + lifetime;
            self.arm(slot);
        }
        let mut w =
            MessageWriter::new(reply, method::REFRESH, Class::Success, msg.transaction_id());
        w.u32_attr(attr::LIFETIME, lifetime.as_secs() as u32);
        self.finish(&mut w, msg, Some(signer));
    }

    /// Peer checks shared by CreatePermission and ChannelBind: family (443) and policy (403).
    /// The peer policy plus one rule it cannot know: on our own relay address, only ports we
    /// have open as relays are peers. Returns the address to send to.
    fn peer_verdict(&mut self, peer: SocketAddr) -> Option<SocketAddr> {
        // `canonical` is the one spelling every check compares (embedded IPv4 reduced, our
        // external address translated); `send_to` keeps the family the relay socket needs.
        let (send_to, canonical) = match self.config.policy.check(peer) {
            Verdict::Allow { send_to, canonical } => (send_to, canonical),
            Verdict::Deny(why) => {
                self.stats.denied_peers += 1;
                tracing::debug!(peer = %peer, reason = why.as_str(), "peer denied");
                return None;
            }
        };
        let config = &self.config;
        let ours = [config.relay_v4, config.relay_v6]
            .iter()
            .flatten()
            .any(|r| canonical_ip(r.local) == canonical.ip());
        // A loopback test rig that opened loopback explicitly keeps its echo peers.
        let opened_loopback = canonical.ip().is_loopback() && config.policy.allows_loopback();
        if ours && !opened_loopback && !self.shared.live_relays.contains(&canonical) {
            self.stats.denied_peers += 1;
            tracing::debug!(peer = %peer, "peer denied: our relay address, but not one of our relay ports");
            return None;
        }
        Some(send_to)
    }

    fn admit_peer(&mut self, slot: u32, peer: SocketAddr) -> Result<SocketAddr, u16> {
        let target = self.peer_verdict(peer).ok_or(403u16)?;
        if self.alloc_mut(slot).relay_for(&target).is_none() {
            return Err(443);
        }
        Ok(target)
    }

    fn create_permission(
        &mut self,
        now: Instant,
        msg: &Message,
        signer: &Signer,
        existing: Option<u32>,
        reply: &mut Vec<u8>,
    ) {
        let Some(slot) = existing else {
            return self.error(reply, msg, 437, Some(signer));
        };
        let txid = msg.transaction_id();
        let mut ips = [IpAddr::from([0u8; 4]); 32];
        let mut n = 0;
        for a in msg
            .attributes()
            .filter(|a| a.kind == attr::XOR_PEER_ADDRESS)
        {
            let Some(peer) = decode_xor_address(a.value, &txid) else {
                return self.error(reply, msg, 400, Some(signer));
            };
            if n == ips.len() {
                return self.error(reply, msg, 508, Some(signer));
            }
            match self.admit_peer(slot, peer) {
                Ok(target) => ips[n] = target.ip(),
                Err(code) => return self.error(reply, msg, code, Some(signer)),
            }
            n += 1;
        }
        if n == 0 {
            return self.error(reply, msg, 400, Some(signer));
        }
        let limits = &self.config.limits;
        let (limit, lifetime) = (
            limits.permissions_per_allocation,
            limits.permission_lifetime,
        );
        let a = self.alloc_mut(slot);
        if !a.can_permit_all(&ips[..n], now, limit) {
            self.stats.quota_rejections += 1;
            return self.error(reply, msg, 508, Some(signer));
        }
        for ip in &ips[..n] {
            a.permit(*ip, now + lifetime, now, limit);
        }
        let mut w = MessageWriter::new(reply, method::CREATE_PERMISSION, Class::Success, txid);
        self.finish(&mut w, msg, Some(signer));
    }

    fn channel_bind(
        &mut self,
        now: Instant,
        msg: &Message,
        signer: &Signer,
        existing: Option<u32>,
        reply: &mut Vec<u8>,
    ) {
        let Some(slot) = existing else {
            return self.error(reply, msg, 437, Some(signer));
        };
        let txid = msg.transaction_id();
        let number = msg
            .get(attr::CHANNEL_NUMBER)
            .filter(|a| a.value.len() == 4)
            .map(|a| u16::from_be_bytes([a.value[0], a.value[1]]));
        let peer = msg
            .get(attr::XOR_PEER_ADDRESS)
            .and_then(|a| decode_xor_address(a.value, &txid));
        let (Some(number), Some(peer)) = (number, peer) else {
            return self.error(reply, msg, 400, Some(signer));
        };
        if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&number) {
            return self.error(reply, msg, 400, Some(signer));
        }
        let target = match self.admit_peer(slot, peer) {
            Ok(t) => t,
            Err(code) => return self.error(reply, msg, code, Some(signer)),
        };
        let limits = &self.config.limits;
        let (channel_limit, channel_lifetime) =
            (limits.channels_per_allocation, limits.channel_lifetime);
        let (permission_limit, permission_lifetime) = (
            limits.permissions_per_allocation,
            limits.permission_lifetime,
        );
        let a = self.alloc_mut(slot);
        match a.check_bind(number, target, now, channel_limit) {
            Ok(()) => {}
            Err(BindError::Conflict) => return self.error(reply, msg, 400, Some(signer)),
            Err(BindError::Full) => {
                self.stats.quota_rejections += 1;
                return self.error(reply, msg, 508, Some(signer));
            }
        }
        // A channel binding also installs or refreshes the permission (RFC 8656 §12.2).
        if !a.permit(
            target.ip(),
            now + permission_lifetime,
            now,
            permission_limit,
        ) {
            self.stats.quota_rejections += 1;
            return self.error(reply, msg, 508, Some(signer));
        }
        a.bind(number, target, now + channel_lifetime, now);
        let mut w = MessageWriter::new(reply, method::CHANNEL_BIND, Class::Success, txid);
        self.finish(&mut w, msg, Some(signer));
    }

    fn end_allocation(&mut self, slot: u32, now: Instant, why: &str) {
        let Some(a) = self.slots[slot as usize].alloc.take() else {
            return;
        };
        let s = &mut self.slots[slot as usize];
        s.gen = s.gen.wrapping_add(1);
        self.free_slots.push(slot);
        self.timers.remove(slot);
        self.by_client.remove(&a.five_tuple);
        for r in a.relays.iter().flatten() {
            self.relays.close(r.id);
            self.shared.live_relays.remove(&r.local);
        }
        // An unclaimed reservation dies with the allocation that made it.
        if let Some(r) = a.reservation {
            self.end_reservation(r.token);
        }
        self.shared.quotas.give_back(&a.quota_key, 1);
        self.stats.allocations_ended += 1;
        let c = a.counters;
        tracing::info!(
            user = &*a.username,
            client = %a.five_tuple.client,
            transport = a.five_tuple.transport.as_str(),
            relay = %DisplayRelays(&a.relays),
            reason = why,
            duration_secs = now.saturating_duration_since(a.created).as_secs(),
            to_peer_bytes = c.to_peer_bytes,
            to_peer_packets = c.to_peer_packets,
            to_client_bytes = c.to_client_bytes,
            to_client_packets = c.to_client_packets,
            dropped_packets = c.dropped_packets,
            "allocation ended"
        );
    }

    // ---------------------------------------------------------------- peer side

    /// A datagram a relay socket received from `from`. The payload sits at `buf[start..end]` with at
    /// least [`HEADROOM`] bytes before it and [`codec::TAILROOM`] after, so the frame is written in place.
    pub fn handle_peer(
        &mut self,
        now: Instant,
        relay: RelayId,
        from: SocketAddr,
        buf: &mut [u8],
        start: usize,
        end: usize,
    ) -> PeerAction {
        debug_assert!(start >= HEADROOM && buf.len() >= end + codec::TAILROOM);
        // Field borrows, not `self` methods: the shared config is read in place (cloning its Arc
        // per packet would bounce one reference count between every shard's core).
        let Core {
            slots,
            config,
            stats,
            rng,
            ..
        } = self;
        let Some(a) = slots
            .get_mut(relay.slot as usize)
            .filter(|s| s.gen == relay.gen)
            .and_then(|s| s.alloc.as_mut())
        else {
            return PeerAction::Drop;
        };
        let len = end - start;
        if a.expires <= now || !a.has_permission(from.ip(), now) {
            a.counters.dropped_packets += 1;
            stats.dropped_no_permission += 1;
            return PeerAction::Drop;
        }
        if let Some(b) = a.to_client_budget.as_mut() {
            if !b.take(len, now) {
                a.counters.dropped_packets += 1;
                stats.dropped_bandwidth += 1;
                return PeerAction::Drop;
            }
        }
        // Each frame has a 16-bit length: a payload past what it can carry (possible only on
        // stream transports) would otherwise be framed with a wrapped length.
        let channel = a.channel_for_peer(from, now).map(|c| c.number);
        let limit = match channel {
            Some(_) => u16::MAX as usize,
            // A Data indication must still fit a UDP datagram after its header is added.
            None => u16::MAX as usize - HEADROOM,
        };
        if len > limit {
            a.counters.dropped_packets += 1;
            stats.dropped_malformed += 1;
            return PeerAction::Drop;
        }
        let (s, e) = match channel {
            Some(number) => frame_channel_data(buf, start, end, number),
            None => {
                let txid = random_txid(rng);
                frame_data_indication(buf, start, end, config.policy.present(from), &txid)
            }
        };
        a.counters.to_client_packets += 1;
        a.counters.to_client_bytes += len as u64;
        let to = a.five_tuple;
        stats.to_client_packets += 1;
        stats.to_client_bytes += len as u64;
        PeerAction::ToClient {
            to,
            start: s,
            end: e,
        }
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

/// xorshift64*: deterministic under test (seeded by the caller), unpredictable enough for Data
/// indication transaction ids, which nothing verifies.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn random_txid(state: &mut u64) -> [u8; 12] {
    let a = next_random(state).to_le_bytes();
    let b = next_random(state).to_le_bytes();
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&a);
    t[8..].copy_from_slice(&b[..4]);
    t
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
#[path = "server_tests.rs"]
mod tests;
