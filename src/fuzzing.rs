//! Harness shared by the cargo-fuzz targets (`fuzz/`) and the stable property tests
//! (`tests/props.rs`). Not API: hidden from the docs, free to change with the core.
//!
//! Every target is a `fn(&[u8])` in [`TARGETS`] that panics when an invariant breaks, so a
//! failing property-test input is a fuzz input and the other way round.
//!
//! - Codec targets: [`check_stun_message`], [`check_address`], [`check_channel_data`].
//! - Core targets: [`run_ops`] decodes the input into a sequence of [`Op`]s (structured requests
//!   the harness signs with a static user's key and a nonce from a 401 challenge, with mutated
//!   attributes and bytes; Send indications; ChannelData; peer datagrams; time; raw datagrams;
//!   admin calls), and [`run_datagram`] feeds one raw datagram to a core that already holds an
//!   allocation with a permission and a channel.
//!
//! The core harness keeps a model of what each client was granted, read off the replies alone,
//! and checks after every step: replies parse and answer the request, ranges lie inside their
//! buffers, relayed bytes are the bytes sent, nothing is relayed without a permission (and
//! nothing permitted is dropped), and allocation counts agree between the model,
//! `allocation_count`, `sessions`, `Stats`, `Shared` and the relay sockets left open.
//!
//! The one place that builds a [`Core`] is `new_core`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proto::allocation::RelayId;
use crate::proto::auth::{
    long_term_key, rest_password, Authenticator, PasswordAlgorithm, RestConfig, StaticUser,
};
use crate::proto::codec::{
    self, attr, method, Class, Message, MessageWriter, HEADER_LEN, HEADROOM, TAILROOM,
};
use crate::proto::discovery::NatDiscovery;
use crate::proto::error::EndReason;
use crate::proto::policy::{canonical_ip, PeerPolicy, PolicyConfig};
use crate::proto::server::{
    ClientAction, Command, ConnectionId, Core, CoreConfig, Limits, OpenRelay, OpenedRelay,
    PeerAction, PeerConnectError, RelayAddress, RelayOpenError, RelaySource, Shared,
};
use crate::proto::{FiveTuple, Transport};

pub const REALM: &str = "fuzz.realm";
pub const REST_SECRET: &[u8] = b"fuzz-rest-secret";
pub const REST_USER: &str = "restuser";
pub const UNIX0: u64 = 1_800_000_000;
const NONCE_SECRET: [u8; 32] = [9; 32];
const NONCE_LIFETIME_SECS: u64 = 600;
/// The harness asks for a new nonce once its cached one is this old.
const NONCE_REFRESH: Duration = Duration::from_secs(300);
const RELAY_V4: [u8; 4] = [192, 0, 2, 10];
const RELAY_V6: &str = "2001:db8::10";
pub const REUSE_TXID: u8 = 0b0000_1110;
pub const NO_METHOD_ATTRS: u8 = 0b0111_0000;
/// A count byte at or above these means 1-4 extra attributes / byte flips (else none).
const EXTRA_FROM: u8 = 0xE0;
const MUTATE_FROM: u8 = 0xF0;
/// Ops decoded from one input at most, so one input stays fast.
pub const MAX_OPS: usize = 48;
const MAX_PAYLOAD: usize = 1500;
const MAX_UDP_PAYLOAD: usize = 65_527;

/// A fuzz target: panics when an invariant breaks.
pub type Target = fn(&[u8]);

/// The fuzz targets by name: `fuzz/fuzz_targets/<name>.rs` calls the function.
pub const TARGETS: &[(&str, Target)] = &[
    ("stun_message", check_stun_message),
    ("address", check_address),
    ("channel_data", check_channel_data),
    ("core_ops", run_ops_unit),
    ("core_datagram", run_datagram),
];

fn run_ops_unit(data: &[u8]) {
    run_ops(data);
}

// ------------------------------------------------------------------ the core under test

/// Relay sockets as a map; asserts the core never opens an id twice nor closes one it did not
/// open. Also the core's unit tests' provider (`proto::server` tests).
#[derive(Default)]
pub struct FakeRelays {
    /// Where the next relay port is looked for (50000-64000): cores sharing one `Shared` in a
    /// test start apart, as the kernel would never give two shards the same port.
    pub next_port: u16,
    next_token: u64,
    pub open: HashMap<RelayId, SocketAddr>,
    pub reserved: HashMap<u64, SocketAddr>,
    /// The last few closed ids, for peer datagrams that race an allocation's end.
    pub closed: Vec<RelayId>,
    /// Reservations the core ended without a claim.
    pub dropped_reservations: Vec<u64>,
    /// Every open fails as if the relay range were full.
    pub exhausted: bool,
    /// TCP relays' peer connections the core asked for and has not been answered about.
    pub connecting: HashMap<ConnectionId, (SocketAddr, SocketAddr)>,
    /// Peer connections established (or accepted), not yet piped.
    pub established: HashMap<ConnectionId, SocketAddr>,
    /// Peer connections piped to a client data connection.
    pub piped: HashMap<ConnectionId, FiveTuple>,
    /// Peer connections the core closed, in order.
    pub closed_peers: Vec<ConnectionId>,
    /// Client connections the core moved to another shard, with that shard.
    pub handed_over: Vec<(FiveTuple, u8)>,
    /// Messages the core sent to clients outside a call's reply, in order.
    pub to_client: Vec<(FiveTuple, Vec<u8>)>,
}

impl FakeRelays {
    fn in_use(&self, addr: SocketAddr) -> bool {
        self.open
            .values()
            .chain(self.reserved.values())
            .any(|a| *a == addr)
    }

    fn free_port(&mut self, ip: IpAddr, even: bool, pair: bool) -> Option<u16> {
        for _ in 0..64 {
            if self.next_port < 50_000 || self.next_port > 64_000 {
                self.next_port = 50_000;
            }
            let p = self.next_port + u16::from(even && self.next_port % 2 == 1);
            self.next_port = p + 1 + u16::from(pair);
            let taken = |q: u16| self.in_use(SocketAddr::new(ip, q));
            if !(taken(p) || pair && taken(p + 1)) {
                return Some(p);
            }
        }
        None
    }
}

impl FakeRelays {
    /// Answers one [`Command::OpenRelay`] the way the I/O layer's relay table would.
    pub fn open(&mut self, req: &OpenRelay) -> Result<OpenedRelay, RelayOpenError> {
        let (local, reservation_token) = match req.source {
            RelaySource::Bind {
                ip,
                even_port,
                reserve_next,
            } => {
                if self.exhausted {
                    return Err(RelayOpenError::NoPort);
                }
                let port = self
                    .free_port(ip, even_port, reserve_next)
                    .ok_or(RelayOpenError::NoPort)?;
                let mut token = None;
                if reserve_next {
                    self.next_token += 1;
                    let t = 0x1122_3344_5566_0000 + self.next_token;
                    self.reserved.insert(t, SocketAddr::new(ip, port + 1));
                    token = Some(t);
                }
                (SocketAddr::new(ip, port), token)
            }
            RelaySource::Reserved(token) => {
                let local = self
                    .reserved
                    .remove(&token)
                    .ok_or(RelayOpenError::UnknownToken)?;
                (local, None)
            }
        };
        assert!(
            self.open.insert(req.id, local).is_none(),
            "relay id {:?} opened twice",
            req.id
        );
        Ok(OpenedRelay {
            local,
            reservation_token,
        })
    }

    pub fn close(&mut self, id: RelayId) {
        assert!(
            self.open.remove(&id).is_some(),
            "relay {id:?} closed twice or never opened"
        );
        if self.closed.len() == 8 {
            self.closed.remove(0);
        }
        self.closed.push(id);
    }

    pub fn drop_reservation(&mut self, token: u64) {
        assert!(
            self.reserved.remove(&token).is_some(),
            "reservation {token:#x} dropped twice or never made"
        );
        self.dropped_reservations.push(token);
    }

    /// Carries out every queued command at once, as the I/O layer does after each core call.
    /// Returns the action for an Allocate answered meanwhile.
    pub fn run_commands(
        &mut self,
        core: &mut Core,
        now: Instant,
        reply: &mut Vec<u8>,
    ) -> ClientAction {
        let mut answered = ClientAction::Drop;
        while let Some(command) = core.poll_command() {
            match command {
                Command::OpenRelay(req) => {
                    let result = self.open(&req);
                    let action = core.relay_opened(now, req.id, result, reply);
                    if action != ClientAction::Drop {
                        answered = action;
                    }
                }
                Command::CloseRelay(id) => self.close(id),
                Command::DropReservation(token) => self.drop_reservation(token),
                Command::ConnectPeer { id, from, peer } => {
                    let known = self.open.values().any(|a| *a == from);
                    assert!(known, "connect from {from}, which is no open relay");
                    let fresh = self.connecting.insert(id, (from, peer)).is_none();
                    assert!(
                        fresh && !self.established.contains_key(&id),
                        "id {id:#x} reused"
                    );
                }
                Command::ClosePeer(id) => {
                    let known = self.connecting.remove(&id).is_some()
                        | self.established.remove(&id).is_some()
                        | self.piped.remove(&id).is_some();
                    assert!(
                        known,
                        "peer connection {id:#x} closed twice or never opened"
                    );
                    self.closed_peers.push(id);
                }
                Command::Pipe { id, client } => {
                    let peer = self.established.remove(&id);
                    assert!(
                        peer.is_some(),
                        "pipe to peer connection {id:#x}, not established"
                    );
                    self.piped.insert(id, client);
                }
                Command::HandOver { client, shard } => self.handed_over.push((client, shard)),
                Command::ToClient { to, message } => self.to_client.push((to, message.into())),
            }
        }
        answered
    }

    /// Answers a [`Command::ConnectPeer`] as the I/O layer would when the connect completes.
    pub fn finish_connect(
        &mut self,
        core: &mut Core,
        now: Instant,
        id: ConnectionId,
        result: Result<(), PeerConnectError>,
    ) -> bool {
        let asked = self.connecting.remove(&id);
        let keep = core.peer_connected(now, id, result);
        if let (true, Some((_, peer))) = (keep, asked) {
            self.established.insert(id, peer);
        }
        self.run_commands(core, now, &mut Vec::new());
        keep
    }

    /// A peer connecting to a TCP relay, as the relay's accept loop reports it.
    pub fn accept(
        &mut self,
        core: &mut Core,
        now: Instant,
        relay: RelayId,
        peer: SocketAddr,
    ) -> Option<ConnectionId> {
        let id = core.peer_accepted(now, relay, peer);
        if let Some(id) = id {
            assert!(
                self.established.insert(id, peer).is_none(),
                "id {id:#x} reused"
            );
        }
        self.run_commands(core, now, &mut Vec::new());
        id
    }
}

/// A core whose commands a [`FakeRelays`] carries out at once, after every call: what the
/// shard's I/O loop does, without sockets. Reads go to the core through `Deref`.
pub struct TestCore {
    pub core: Core,
    pub relays: FakeRelays,
}

impl TestCore {
    pub fn new(config: Arc<CoreConfig>, shared: Arc<Shared>, seed: u64) -> Self {
        TestCore {
            core: Core::new(config, shared, seed),
            relays: FakeRelays::default(),
        }
    }

    pub fn relays(&mut self) -> &mut FakeRelays {
        &mut self.relays
    }

    pub fn handle_client(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        data: &[u8],
        reply: &mut Vec<u8>,
    ) -> ClientAction {
        let action = self.core.handle_client(now, ft, data, reply);
        match self.relays.run_commands(&mut self.core, now, reply) {
            ClientAction::Drop => action,
            answered => answered,
        }
    }

    pub fn handle_peer(
        &mut self,
        now: Instant,
        relay: RelayId,
        from: SocketAddr,
        buf: &mut [u8],
        start: usize,
        end: usize,
    ) -> PeerAction {
        self.core.handle_peer(now, relay, from, buf, start, end)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.core.handle_timeout(now);
        self.relays
            .run_commands(&mut self.core, now, &mut Vec::new());
    }

    pub fn end_session(&mut self, slot: u32, gen: u32, now: Instant, why: EndReason) -> bool {
        let ended = self.core.end_session(slot, gen, now, why);
        self.relays
            .run_commands(&mut self.core, now, &mut Vec::new());
        ended
    }

    pub fn end_user(&mut self, user: &str, now: Instant, why: EndReason) -> usize {
        let ended = self.core.end_user(user, now, why);
        self.relays
            .run_commands(&mut self.core, now, &mut Vec::new());
        ended
    }

    pub fn connection_closed(&mut self, ft: &FiveTuple, now: Instant) -> bool {
        let known = self.core.connection_closed(ft, now);
        self.relays
            .run_commands(&mut self.core, now, &mut Vec::new());
        known
    }

    pub fn close_all(&mut self, now: Instant, why: EndReason) {
        self.core.close_all(now, why);
        self.relays
            .run_commands(&mut self.core, now, &mut Vec::new());
    }
}

impl std::ops::Deref for TestCore {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

impl std::ops::DerefMut for TestCore {
    fn deref_mut(&mut self) -> &mut Core {
        &mut self.core
    }
}

fn limits() -> Limits {
    Limits {
        allocations_per_user: 2,
        total_allocations: 3,
        permissions_per_allocation: 3,
        channels_per_allocation: 2,
        unauth_replies_per_sec: 0,
        ..Limits::default()
    }
}

fn core_config() -> CoreConfig {
    let users = HashMap::from([
        (
            "alice".to_string(),
            StaticUser::Password("wonderland".into()),
        ),
        ("bob".to_string(), StaticUser::Password("builder".into())),
    ]);
    let auth = Authenticator::new(
        REALM.into(),
        users,
        Some(RestConfig {
            secrets: vec![b"old-secret".to_vec(), REST_SECRET.to_vec()],
            separator: ':',
            max_ttl_secs: 48 * 3600,
        }),
    );
    let v4 = IpAddr::from(RELAY_V4);
    let v6: IpAddr = RELAY_V6.parse().unwrap_or(v4);
    let policy = PeerPolicy::new(PolicyConfig {
        allow: vec![
            "198.51.100.0/24".parse().expect("net"),
            "2001:db8:1::/48".parse().expect("net"),
        ],
        relay_ips: vec![v4, v6],
        relay_ports: (49152, 65535),
        service_endpoints: vec!["0.0.0.0:3478".parse().expect("addr")],
        ..PolicyConfig::default()
    });
    CoreConfig {
        software: None,
        auth,
        policy,
        limits: limits(),
        relay_v4: Some(RelayAddress {
            local: v4,
            advertised: v4,
        }),
        relay_v6: Some(RelayAddress {
            local: v6,
            advertised: v6,
        }),
        nat_discovery: vec![nat_discovery()],
    }
}

/// RFC 5780 addresses around the IPv4 clients' listener (TCP too), so CHANGE-REQUEST is honoured
/// for clients 0, 1 and refused for the IPv6 one (420) and the TCP one (400).
fn nat_discovery() -> NatDiscovery {
    NatDiscovery {
        primary: "192.0.2.10:3478".parse().expect("addr"),
        alternate: "192.0.2.11:3479".parse().expect("addr"),
        tcp: true,
    }
}

/// Builds the core every target drives: static users alice/wonderland and bob/builder, a REST
/// secret, small quotas, IPv4 and IPv6 relays, fixed nonce secret and wall-clock anchor (so a
/// nonce issued at `t0` is the same in every run). Adapt here when the core's constructors change.
fn new_core(t0: Instant) -> (TestCore, Arc<Shared>, Arc<CoreConfig>) {
    let shared = Arc::new(Shared::new(NONCE_SECRET, NONCE_LIFETIME_SECS, t0, UNIX0));
    let config = Arc::new(core_config());
    let core = TestCore::new(Arc::clone(&config), Arc::clone(&shared), 42);
    (core, shared, config)
}

/// The clients' 5-tuples: two ports of one IPv4 host, an IPv6 host, a TCP client.
fn five_tuple(c: usize) -> FiveTuple {
    let (transport, client, local) = match c {
        0 => (Transport::Udp, "203.0.113.7:40000", "192.0.2.10:3478"),
        1 => (Transport::Udp, "203.0.113.7:40001", "192.0.2.10:3478"),
        2 => (
            Transport::Udp,
            "[2001:db8:2::7]:40000",
            "[2001:db8::10]:3478",
        ),
        _ => (Transport::Tcp, "203.0.113.8:40000", "192.0.2.10:3478"),
    };
    FiveTuple {
        transport,
        client: client.parse().expect("addr"),
        local: local.parse().expect("addr"),
    }
}

pub const CLIENTS: usize = 4;

/// Peers: 0..=3 are plain allowed peers (the harness also checks nothing permitted is dropped),
/// then an IPv4-mapped spelling, denied ones, our own relay address (live port or not).
const PEERS: [&str; 10] = [
    "198.51.100.1:5000",
    "198.51.100.2:6000",
    "[2001:db8:1::1]:7000",
    "198.51.100.1:5001",
    "[::ffff:198.51.100.2]:6000",
    "10.0.0.1:80",
    "127.0.0.1:9",
    "", // a live relay address (relay to relay)
    "192.0.2.10:1",
    "198.51.100.77:0",
];
const PLAIN_PEERS: usize = 4;

/// Selectors lean on client 0 and the plain peers, so random steps meet each other's state.
fn client_index(sel: u8) -> usize {
    [0, 0, 0, 0, 1, 1, 2, 3][sel as usize % 8]
}

fn peer_index(sel: u8) -> usize {
    match sel as usize % 16 {
        i @ 0..=9 => [0, 1, 0, 1, 3, 0, 1, 2, 0, 3][i],
        i => i - 6,
    }
}

/// The selectors that pick client `c` and peer `i` (for scripted sessions).
fn client_sel(c: usize) -> u8 {
    (0..8).find(|&s| client_index(s) == c).unwrap_or(0)
}

fn peer_sel(i: usize) -> u8 {
    (0..16).find(|&s| peer_index(s) == i).unwrap_or(0)
}

/// How many peers a count byte means (in CreatePermission; ChannelBind takes the first).
const PEER_COUNTS: [u8; 8] = [1, 1, 1, 2, 2, 3, 0, 1];

const METHODS: [u16; 8] = [
    method::ALLOCATE,
    method::ALLOCATE,
    method::REFRESH,
    method::CREATE_PERMISSION,
    method::CREATE_PERMISSION,
    method::CHANNEL_BIND,
    method::CHANNEL_BIND,
    method::BINDING,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Auth {
    Md5,
    Sha256,
    Rest,
    Bob,
    None,
    WrongPassword,
    /// The cached nonce however old (stale after time passes).
    CachedNonce,
    BadNonce,
    UnknownUser,
    NoRealm,
    ExpiredRest,
}

const AUTH_MODES: [Auth; 24] = [
    Auth::Md5,
    Auth::Md5,
    Auth::Md5,
    Auth::Md5,
    Auth::Md5,
    Auth::Md5,
    Auth::Md5,
    Auth::Md5,
    Auth::Sha256,
    Auth::Sha256,
    Auth::Sha256,
    Auth::Rest,
    Auth::Rest,
    Auth::Bob,
    Auth::None,
    Auth::WrongPassword,
    Auth::CachedNonce,
    Auth::BadNonce,
    Auth::UnknownUser,
    Auth::NoRealm,
    Auth::ExpiredRest,
    Auth::Md5,
    Auth::Md5,
    Auth::Bob,
];

fn auth_index(a: Auth) -> u8 {
    AUTH_MODES.iter().position(|x| *x == a).unwrap_or(0) as u8
}

/// Attribute kinds an extra attribute picks from (a selector >= 0x8000 is taken as the kind itself).
const EXTRA_KINDS: [u16; 24] = [
    attr::LIFETIME,
    attr::XOR_PEER_ADDRESS,
    attr::DATA,
    attr::REQUESTED_TRANSPORT,
    attr::REQUESTED_ADDRESS_FAMILY,
    attr::ADDITIONAL_ADDRESS_FAMILY,
    attr::EVEN_PORT,
    attr::RESERVATION_TOKEN,
    attr::DONT_FRAGMENT,
    attr::CHANNEL_NUMBER,
    attr::USERNAME,
    attr::REALM,
    attr::NONCE,
    attr::PASSWORD_ALGORITHM,
    attr::PASSWORD_ALGORITHMS,
    attr::USERHASH,
    attr::SOFTWARE,
    attr::PRIORITY,
    attr::USE_CANDIDATE,
    attr::ICE_CONTROLLING,
    attr::CHANGE_REQUEST,
    attr::MESSAGE_INTEGRITY,
    0x7777, // unknown, comprehension-required
    0xC001, // unknown, comprehension-optional
];

const LIFETIMES: [Option<u32>; 8] = [
    None,
    None,
    Some(0),
    Some(1),
    Some(600),
    Some(3600),
    Some(86_400),
    Some(u32::MAX),
];

const ADVANCES: [u64; 16] = [
    0, 1, 2, 5, 29, 30, 31, 60, 299, 300, 301, 599, 600, 601, 3600, 3601,
];

// ------------------------------------------------------------------ operations

/// One step of a core session. Fields are raw selectors: what they mean is decided when the
/// step runs, so every byte string decodes to some valid sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Request(Request),
    Send {
        client: u8,
        peer: u8,
        len: u16,
    },
    /// `flags`: bits 0-1 trailing padding; `flags >> 5` 6: overlong length field, 7: cut header.
    ChannelData {
        client: u8,
        channel: u16,
        len: u16,
        flags: u8,
    },
    /// A peer datagram on an open relay (or a closed or unknown one).
    Peer {
        relay: u8,
        from: u8,
        len: u16,
    },
    Advance {
        secs: u16,
    },
    Raw {
        client: u8,
        bytes: Vec<u8>,
    },
    /// Resends the client's previous request, byte for byte.
    Retransmit {
        client: u8,
    },
    /// `what % 16`: 0-5 draining on (`arg & 7 == 7`) or off, 6-8 end a session, 9-10 end a
    /// user's allocations, 11 close all (`arg < 0x40`), else nothing.
    Admin {
        what: u8,
        arg: u8,
    },
}

/// A request the harness builds and signs. `params` mean, per method:
/// Allocate `[transport, family, even-port/token, lifetime]`, Refresh `[_, family, _, lifetime]`.
/// CreatePermission uses `peers`; ChannelBind `channel` and the first peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub client: u8,
    pub method: u8,
    pub auth: u8,
    pub params: [u8; 4],
    pub channel: u16,
    /// At most 3.
    pub peers: Vec<u8>,
    /// Added before the method's own attributes, so they win over them. At most 4.
    pub extra: Vec<(u16, Vec<u8>)>,
    /// Byte flips after signing: (position, xor). At most 4.
    pub mutations: Vec<(u16, u8)>,
    /// Bit 0 FINGERPRINT; [`REUSE_TXID`] bits all set: the client's previous transaction id;
    /// [`NO_METHOD_ATTRS`] bits all set: leave the method's own attributes out.
    pub flags: u8,
}

impl Request {
    /// A plain request of method `m` from client `client` (an index, not a selector).
    pub fn new(client: usize, m: u16) -> Self {
        Request {
            client: client_sel(client),
            method: METHODS.iter().position(|x| *x == m).unwrap_or(7) as u8,
            ..Request::default()
        }
    }

    pub fn sha256(mut self) -> Self {
        self.auth = auth_index(Auth::Sha256);
        self
    }

    pub fn unauthenticated(mut self) -> Self {
        self.auth = auth_index(Auth::None);
        self
    }

    /// Peers by index into the peer table.
    pub fn peers(mut self, peers: &[usize]) -> Self {
        self.peers = peers.iter().map(|i| peer_sel(*i)).collect();
        self
    }

    pub fn channel(mut self, number: u16) -> Self {
        self.channel = number;
        self
    }

    pub fn lifetime(mut self, index: u8) -> Self {
        self.params[3] = index;
        self
    }

    pub fn params(mut self, p: [u8; 4]) -> Self {
        self.params = p;
        self
    }

    pub fn fingerprint(mut self) -> Self {
        self.flags |= 1;
        self
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.at.min(self.data.len());
        let end = (start + n).min(self.data.len());
        self.at += n;
        &self.data[start..end]
    }

    fn done(&self) -> bool {
        self.at >= self.data.len()
    }
}

fn count(b: u8, threshold: u8) -> usize {
    if b >= threshold {
        (b & 3) as usize + 1
    } else {
        0
    }
}

impl Op {
    /// Decodes ops until the input runs out (at most [`MAX_OPS`]).
    pub fn decode_all(data: &[u8]) -> Vec<Op> {
        let mut r = Reader { data, at: 0 };
        let mut ops = Vec::new();
        while !r.done() && ops.len() < MAX_OPS {
            ops.push(Op::decode(&mut r));
        }
        ops
    }

    fn decode(r: &mut Reader) -> Op {
        // Requests are the most frequent step, then the relay paths.
        match r.u8() % 16 {
            0..=5 => {
                let mut q = Request {
                    client: r.u8(),
                    method: r.u8(),
                    auth: r.u8(),
                    params: [r.u8(), r.u8(), r.u8(), r.u8()],
                    channel: r.u16(),
                    ..Request::default()
                };
                let n = PEER_COUNTS[r.u8() as usize % PEER_COUNTS.len()];
                q.peers = (0..n).map(|_| r.u8()).collect();
                for _ in 0..count(r.u8(), EXTRA_FROM) {
                    let kind = r.u16();
                    let len = r.u8() as usize;
                    q.extra.push((kind, r.bytes(len).to_vec()));
                }
                for _ in 0..count(r.u8(), MUTATE_FROM) {
                    q.mutations.push((r.u16(), r.u8()));
                }
                q.flags = r.u8();
                Op::Request(q)
            }
            6 | 7 => Op::Send {
                client: r.u8(),
                peer: r.u8(),
                len: r.u16(),
            },
            8 | 9 => Op::ChannelData {
                client: r.u8(),
                channel: r.u16(),
                len: r.u16(),
                flags: r.u8(),
            },
            10 | 11 => Op::Peer {
                relay: r.u8(),
                from: r.u8(),
                len: r.u16(),
            },
            12 => Op::Advance { secs: r.u16() },
            13 => {
                let client = r.u8();
                let len = r.u8() as usize;
                Op::Raw {
                    client,
                    bytes: r.bytes(len).to_vec(),
                }
            }
            14 => Op::Retransmit { client: r.u8() },
            _ => Op::Admin {
                what: r.u8(),
                arg: r.u8(),
            },
        }
    }

    /// The bytes [`Op::decode_all`] reads back as `ops` (counts are clamped to what decodes).
    pub fn encode_all(ops: &[Op]) -> Vec<u8> {
        let mut out = Vec::new();
        for op in ops {
            op.encode(&mut out);
        }
        out
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::Request(q) => {
                out.push(0);
                out.extend_from_slice(&[q.client, q.method, q.auth]);
                out.extend_from_slice(&q.params);
                out.extend_from_slice(&q.channel.to_be_bytes());
                let peers = &q.peers[..q.peers.len().min(3)];
                let n = PEER_COUNTS.iter().position(|n| *n as usize == peers.len());
                out.push(n.unwrap_or(0) as u8);
                out.extend_from_slice(peers);
                let extra = &q.extra[..q.extra.len().min(4)];
                out.push(if extra.is_empty() {
                    0
                } else {
                    EXTRA_FROM - 1 + extra.len() as u8
                });
                for (kind, value) in extra {
                    let value = &value[..value.len().min(255)];
                    out.extend_from_slice(&kind.to_be_bytes());
                    out.push(value.len() as u8);
                    out.extend_from_slice(value);
                }
                let muts = &q.mutations[..q.mutations.len().min(4)];
                out.push(if muts.is_empty() {
                    0
                } else {
                    MUTATE_FROM - 1 + muts.len() as u8
                });
                for (pos, x) in muts {
                    out.extend_from_slice(&pos.to_be_bytes());
                    out.push(*x);
                }
                out.push(q.flags);
            }
            Op::Send { client, peer, len } => {
                out.extend_from_slice(&[6, *client, *peer]);
                out.extend_from_slice(&len.to_be_bytes());
            }
            Op::ChannelData {
                client,
                channel,
                len,
                flags,
            } => {
                out.extend_from_slice(&[8, *client]);
                out.extend_from_slice(&channel.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
                out.push(*flags);
            }
            Op::Peer { relay, from, len } => {
                out.extend_from_slice(&[10, *relay, *from]);
                out.extend_from_slice(&len.to_be_bytes());
            }
            Op::Advance { secs } => {
                out.push(12);
                out.extend_from_slice(&secs.to_be_bytes());
            }
            Op::Raw { client, bytes } => {
                let bytes = &bytes[..bytes.len().min(255)];
                out.extend_from_slice(&[13, *client, bytes.len() as u8]);
                out.extend_from_slice(bytes);
            }
            Op::Retransmit { client } => out.extend_from_slice(&[14, *client]),
            Op::Admin { what, arg } => out.extend_from_slice(&[15, *what, *arg]),
        }
    }
}

/// `secs` selector: mostly lifetimes' edges, sometimes a raw number of seconds.
fn advance_secs(secs: u16) -> u64 {
    if secs < 0xF000 {
        ADVANCES[secs as usize % ADVANCES.len()]
    } else {
        u64::from(secs & 0x0FFF) * 16
    }
}

fn payload_len(len: u16) -> usize {
    if len < 0xFF00 {
        len as usize % MAX_PAYLOAD
    } else {
        // Up to the largest UDP payload (IPv6), across the largest one a Data indication can carry.
        MAX_UDP_PAYLOAD - (len & 0xFF) as usize
    }
}

fn payload(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ salt)
        .collect()
}

/// Mostly one of four channels, else any number (valid or not).
fn channel_number(sel: u16) -> u16 {
    if sel < 0xC000 {
        0x4000 | (sel & 3)
    } else {
        sel.rotate_left(2)
    }
}

/// What the harness knows each step should produce beyond the generic checks.
enum Expect {
    Nothing,
    Send {
        pool: usize,
        peer: SocketAddr,
        payload: Vec<u8>,
    },
    Channel {
        number: u16,
        payload: Vec<u8>,
        well_formed: bool,
    },
}

/// Bounds on an expiry the model cannot always know exactly (a retransmitted request may have
/// been answered from the cache or anew): `lo` is certain, `hi` possible.
#[derive(Clone, Copy, Debug)]
struct Span {
    lo: Instant,
    hi: Instant,
}

impl Span {
    fn at(t: Instant) -> Self {
        Span { lo: t, hi: t }
    }

    fn refreshed(old: Option<Span>, t: Instant, maybe_cached: bool, now: Instant) -> Span {
        match (old, maybe_cached) {
            (_, false) => Span::at(t),
            (Some(s), true) => Span {
                lo: s.lo,
                hi: s.hi.max(t),
            },
            (None, true) => Span { lo: now, hi: t },
        }
    }
}

struct AllocModel {
    /// When the last relay ends, and the allocation with it.
    expires: Instant,
    quota_user: String,
    relays: Vec<SocketAddr>,
    /// Each relay's own expiry, beside `relays`: a Refresh with REQUESTED-ADDRESS-FAMILY moves
    /// or deletes one relay of a dual allocation (RFC 8656 §7.3).
    relay_expires: Vec<Instant>,
    permissions: HashMap<IpAddr, Span>,
    /// (number, peer) -> (peer is a plain one, expiry). One number may have candidates when a
    /// replayed answer left open which request it answered.
    channels: HashMap<(u16, SocketAddr), (bool, Span)>,
}

impl AllocModel {
    /// The index into `relays` of the family a Refresh names.
    fn relay_of_family(&self, v6: bool) -> Option<usize> {
        self.relays.iter().position(|r| r.is_ipv6() == v6)
    }

    /// `expires` after relay `i` moves to `until` (or goes, with `None`).
    fn expiry_if(&self, i: usize, until: Option<Instant>) -> Option<Instant> {
        let others = (0..self.relays.len())
            .filter(|&j| j != i)
            .map(|j| self.relay_expires[j]);
        others.chain(until).max()
    }

    fn set_relay(&mut self, i: usize, until: Option<Instant>) {
        match until {
            Some(t) => self.relay_expires[i] = t,
            None => {
                self.relays.remove(i);
                self.relay_expires.remove(i);
            }
        }
        if let Some(latest) = self.relay_expires.iter().max() {
            self.expires = *latest;
        }
    }

    fn has_relay_for(&self, peer: SocketAddr) -> bool {
        self.relays.iter().any(|r| r.is_ipv6() == peer.is_ipv6())
    }

    /// Whether `number` may be bound to `peer` (some spelling of it) now.
    fn may_be_bound(&self, number: u16, peer: SocketAddr, now: Instant) -> bool {
        self.channels
            .iter()
            .any(|((n, p), (_, s))| *n == number && canonical(*p) == canonical(peer) && s.hi > now)
    }
}

#[derive(Default)]
struct ClientModel {
    nonce: Option<(Vec<u8>, Instant)>,
    last_request: Option<Vec<u8>>,
    last_txid: Option<[u8; 12]>,
    /// Every reply this client got, by transaction id: a byte-identical answer may be a replay.
    replies: HashMap<[u8; 12], Vec<Vec<u8>>>,
    alloc: Option<AllocModel>,
}

/// What a run reached: the property tests assert the harness gets past authentication.
#[derive(Clone, Debug, Default)]
pub struct Coverage {
    pub allocations: u64,
    pub dual_allocations: u64,
    pub refreshes: u64,
    pub deletions: u64,
    pub expirations: u64,
    pub permissions: u64,
    pub channels: u64,
    pub sha256_successes: u64,
    pub rest_successes: u64,
    pub reservations: u64,
    pub replays: u64,
    pub to_peer_send: u64,
    pub to_peer_channel: u64,
    pub to_client_data: u64,
    pub to_client_channel: u64,
    /// Datagrams from one of the core's relays to another, delivered without the kernel.
    pub relayed_in_process: u64,
    pub admin_ends: u64,
    /// RFC 5780 answers sent from another of the server's addresses.
    pub moved_replies: u64,
    pub error_codes: BTreeMap<u16, u64>,
}

impl Coverage {
    pub fn add(&mut self, o: &Coverage) {
        self.allocations += o.allocations;
        self.dual_allocations += o.dual_allocations;
        self.refreshes += o.refreshes;
        self.deletions += o.deletions;
        self.expirations += o.expirations;
        self.permissions += o.permissions;
        self.channels += o.channels;
        self.sha256_successes += o.sha256_successes;
        self.rest_successes += o.rest_successes;
        self.reservations += o.reservations;
        self.replays += o.replays;
        self.to_peer_send += o.to_peer_send;
        self.to_peer_channel += o.to_peer_channel;
        self.to_client_data += o.to_client_data;
        self.to_client_channel += o.to_client_channel;
        self.relayed_in_process += o.relayed_in_process;
        self.admin_ends += o.admin_ends;
        self.moved_replies += o.moved_replies;
        for (k, v) in &o.error_codes {
            *self.error_codes.entry(*k).or_default() += v;
        }
    }
}

fn error_code(m: &Message) -> Option<u16> {
    m.get(attr::ERROR_CODE)
        .filter(|e| e.value.len() >= 4)
        .map(|e| u16::from(e.value[2] & 7) * 100 + u16::from(e.value[3]))
}

fn u32_attr(m: &Message, kind: u16) -> Option<u32> {
    m.get(kind)
        .and_then(|a| <[u8; 4]>::try_from(a.value).ok())
        .map(u32::from_be_bytes)
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_ip(addr.ip()), addr.port())
}

/// A core, its relays and the model, driven one [`Op`] at a time.
pub struct CoreHarness {
    pub core: TestCore,
    shared: Arc<Shared>,
    config: Arc<CoreConfig>,
    t0: Instant,
    now: Instant,
    reply: Vec<u8>,
    txid_counter: u32,
    clients: Vec<ClientModel>,
    reservation_token: Option<u64>,
    draining: bool,
    pub coverage: Coverage,
    /// When set, every datagram in and out (requests, replies, frames to clients) is kept here.
    pub trace: Option<Vec<Vec<u8>>>,
}

impl Default for CoreHarness {
    fn default() -> Self {
        Self::new()
    }
}

impl CoreHarness {
    pub fn new() -> Self {
        let t0 = Instant::now();
        let (core, shared, config) = new_core(t0);
        CoreHarness {
            core,
            shared,
            config,
            t0,
            now: t0,
            reply: Vec::with_capacity(512),
            txid_counter: 0,
            clients: (0..CLIENTS).map(|_| ClientModel::default()).collect(),
            reservation_token: None,
            draining: false,
            coverage: Coverage::default(),
            trace: None,
        }
    }

    fn unix_now(&self) -> u64 {
        UNIX0 + self.now.saturating_duration_since(self.t0).as_secs()
    }

    fn txid(&mut self) -> [u8; 12] {
        self.txid_counter += 1;
        let mut t = [0xF5; 12];
        t[8..].copy_from_slice(&self.txid_counter.to_be_bytes());
        t
    }

    fn peer_addr(&mut self, sel: u8) -> SocketAddr {
        let i = peer_index(sel);
        if PEERS[i].is_empty() {
            let mut live: Vec<_> = self.core.relays().open.iter().collect();
            live.sort_by_key(|(id, _)| (id.slot, id.gen, id.v6));
            return live
                .first()
                .map(|(_, a)| **a)
                .unwrap_or_else(|| SocketAddr::new(IpAddr::from(RELAY_V4), 50_000));
        }
        PEERS[i].parse().expect("peer")
    }

    /// Runs one step and checks every invariant after it.
    pub fn step(&mut self, op: &Op) {
        if tracing_steps() {
            eprintln!(
                "[{:>5}s] {op:?}",
                self.now.duration_since(self.t0).as_secs()
            );
        }
        match op {
            Op::Request(q) => {
                let c = client_index(q.client);
                let bytes = self.build_request(q);
                self.client_send(c, &bytes, Expect::Nothing);
            }
            Op::Send { client, peer, len } => {
                let c = client_index(*client);
                let data = payload(payload_len(*len) % MAX_PAYLOAD, 0x53);
                let (bytes, expect) = self.send_indication(*peer, data);
                self.client_send(c, &bytes, expect);
            }
            Op::ChannelData {
                client,
                channel,
                len,
                flags,
            } => {
                let c = client_index(*client);
                let data = payload(payload_len(*len) % MAX_PAYLOAD, 0xCD);
                let (bytes, expect) = channel_data(channel_number(*channel), data, *flags);
                self.client_send(c, &bytes, expect);
            }
            Op::Peer { relay, from, len } => {
                let from_pool = peer_index(*from);
                let from = self.peer_addr(*from);
                let data = payload(payload_len(*len), 0x9E);
                let id = self.pick_relay(*relay);
                self.peer_send(id, from, from_pool, &data);
            }
            Op::Advance { secs } => self.advance(advance_secs(*secs)),
            Op::Raw { client, bytes } => {
                self.client_send(client_index(*client), bytes, Expect::Nothing)
            }
            Op::Retransmit { client } => {
                let c = client_index(*client);
                if let Some(bytes) = self.clients[c].last_request.clone() {
                    self.client_send(c, &bytes, Expect::Nothing);
                }
            }
            Op::Admin { what, arg } => self.admin(*what, *arg),
        }
        self.check_counts();
    }
}

fn channel_data(number: u16, data: Vec<u8>, flags: u8) -> (Vec<u8>, Expect) {
    let overlong = flags >> 5 == 6;
    // More than the padding below can cover.
    let extra = if overlong {
        4 + (flags >> 2 & 7) as usize
    } else {
        0
    };
    let mut buf = number.to_be_bytes().to_vec();
    buf.extend_from_slice(&((data.len() + extra) as u16).to_be_bytes());
    buf.extend_from_slice(&data);
    buf.extend_from_slice(&[0u8; 3][..(flags & 3) as usize]);
    let cut = flags >> 5 == 7;
    if cut {
        buf.truncate(3);
    }
    let expect = Expect::Channel {
        number,
        payload: data,
        well_formed: !overlong && !cut,
    };
    (buf, expect)
}

/// `TURNPIKE_FUZZ_TRACE=1` prints every step and the core's answer to stderr (for a reproducer).
fn tracing_steps() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TURNPIKE_FUZZ_TRACE").is_some_and(|v| v == "1"))
}

/// Relayed bytes must be the bytes sent (reported without dumping a 64 KiB payload).
fn same_bytes(got: &[u8], want: &[u8]) {
    if got != want {
        let at = got.iter().zip(want).take_while(|(a, b)| a == b).count();
        panic!(
            "relayed {} bytes, not the {} sent (first difference at {at})",
            got.len(),
            want.len()
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn static_password(user: &str) -> Option<&'static str> {
    match user {
        "alice" => Some("wonderland"),
        "bob" => Some("builder"),
        _ => None,
    }
}

/// The keys a reply to `username` may be signed with, computed without the core.
fn keys_for(username: &str, alg: PasswordAlgorithm) -> Vec<Vec<u8>> {
    let passwords = match static_password(username) {
        Some(p) => vec![p.to_string()],
        None => vec![
            rest_password(REST_SECRET, username),
            rest_password(b"old-secret", username),
        ],
    };
    passwords
        .iter()
        .map(|p| long_term_key(alg, username, REALM, p).as_bytes().to_vec())
        .collect()
}

fn permitted(a: &AllocModel, peer: SocketAddr, now: Instant) -> bool {
    let ip = canonical_ip(peer.ip());
    a.permissions
        .iter()
        .any(|(k, s)| canonical_ip(*k) == ip && s.hi > now)
}

fn certainly_permitted(a: &AllocModel, peer: SocketAddr, now: Instant) -> bool {
    a.permissions.get(&peer.ip()).is_some_and(|s| s.lo > now)
}

impl CoreHarness {
    /// A Send indication to peer `sel` carrying `data`.
    fn send_indication(&mut self, sel: u8, data: Vec<u8>) -> (Vec<u8>, Expect) {
        let peer = self.peer_addr(sel);
        let txid = self.txid();
        let mut buf = Vec::new();
        MessageWriter::new(&mut buf, method::SEND, Class::Indication, txid)
            .xor_address(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, &data);
        let expect = Expect::Send {
            pool: peer_index(sel),
            peer,
            payload: data,
        };
        (buf, expect)
    }

    /// A nonce for client `c`: the cached one while young, else one from a 401 challenge.
    fn fresh_nonce(&mut self, c: usize) -> Vec<u8> {
        if let Some((n, at)) = &self.clients[c].nonce {
            if self.now.saturating_duration_since(*at) < NONCE_REFRESH {
                return n.clone();
            }
        }
        let txid = self.txid();
        let mut buf = Vec::new();
        MessageWriter::new(&mut buf, method::ALLOCATE, Class::Request, txid)
            .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        self.client_send(c, &buf, Expect::Nothing);
        match &self.clients[c].nonce {
            Some((n, at)) if *at == self.now => n.clone(),
            _ => panic!("a TURN request without MESSAGE-INTEGRITY was not challenged with a nonce"),
        }
    }

    /// Builds, signs and then mutates the request `q` describes.
    fn build_request(&mut self, q: &Request) -> Vec<u8> {
        let c = client_index(q.client);
        let m = METHODS[q.method as usize % METHODS.len()];
        let auth = AUTH_MODES[q.auth as usize % AUTH_MODES.len()];
        let txid = match (
            q.flags & REUSE_TXID == REUSE_TXID,
            self.clients[c].last_txid,
        ) {
            (true, Some(t)) => t,
            _ => self.txid(),
        };
        let nonce = match auth {
            Auth::None => Vec::new(),
            Auth::CachedNonce => match self.clients[c].nonce.clone() {
                Some((n, _)) => n,
                None => self.fresh_nonce(c),
            },
            Auth::BadNonce => {
                let mut n = self.fresh_nonce(c);
                let i = n.len() / 2;
                n[i] ^= 1;
                n
            }
            _ => self.fresh_nonce(c),
        };
        let unix = self.unix_now();
        let (username, password) = match auth {
            Auth::Rest | Auth::ExpiredRest => {
                let expiry = if auth == Auth::Rest {
                    unix + 3600
                } else {
                    unix - 10
                };
                let u = format!("{expiry}:{REST_USER}");
                let p = rest_password(REST_SECRET, &u);
                (u, p)
            }
            Auth::Bob => ("bob".into(), "builder".into()),
            Auth::WrongPassword => ("alice".into(), "wrong".into()),
            Auth::UnknownUser => ("mallory".into(), "x".into()),
            _ => ("alice".into(), "wonderland".into()),
        };
        let peers: Vec<SocketAddr> = q.peers.iter().map(|p| self.peer_addr(*p)).collect();
        let token = self.reservation_token.unwrap_or(0);
        let mut buf = Vec::with_capacity(256);
        let mut w = MessageWriter::new(&mut buf, m, Class::Request, txid);
        for (kind, value) in &q.extra {
            let kind = match *kind {
                k if k < 0x8000 => EXTRA_KINDS[k as usize % EXTRA_KINDS.len()],
                k => k,
            };
            w.attr(kind, value);
        }
        if q.flags & NO_METHOD_ATTRS != NO_METHOD_ATTRS {
            method_attributes(&mut w, m, q, &peers, token);
        }
        if auth != Auth::None {
            w.attr(attr::USERNAME, username.as_bytes());
            if auth != Auth::NoRealm {
                w.attr(attr::REALM, REALM.as_bytes());
            }
            w.attr(attr::NONCE, &nonce);
            if auth == Auth::Sha256 {
                let key = long_term_key(PasswordAlgorithm::Sha256, &username, REALM, &password);
                w.attr(attr::PASSWORD_ALGORITHM, &[0, 2, 0, 0])
                    .attr(attr::PASSWORD_ALGORITHMS, &[0, 1, 0, 0, 0, 2, 0, 0])
                    .integrity_sha256(key.as_bytes());
            } else {
                let key = long_term_key(PasswordAlgorithm::Md5, &username, REALM, &password);
                w.integrity(key.as_bytes());
            }
        }
        if q.flags & 1 != 0 {
            w.fingerprint();
        }
        for &(pos, x) in &q.mutations {
            let i = pos as usize % buf.len();
            buf[i] ^= if x == 0 { 0xFF } else { x };
        }
        buf
    }

    /// One client datagram through the core, checked against the model.
    fn client_send(&mut self, c: usize, bytes: &[u8], expect: Expect) {
        let ft = five_tuple(c);
        self.reply.clear();
        self.reply.extend_from_slice(b"\xffstale reply");
        let action = self
            .core
            .handle_client(self.now, &ft, bytes, &mut self.reply);
        if tracing_steps() {
            let what = match action {
                ClientAction::Reply { .. } => Message::parse(&self.reply)
                    .map(|m| describe(&m))
                    .unwrap_or_else(|e| format!("unparsable reply: {e}")),
                a => format!("{a:?}"),
            };
            eprintln!("         client {c}: {} bytes -> {what}", bytes.len());
        }
        if let Some(t) = self.trace.as_mut() {
            t.push(bytes.to_vec());
        }
        match action {
            ClientAction::Reply { to } if self.reply.first().is_some_and(|b| b >> 6 == 1) => {
                self.on_in_process(c, to, &expect)
            }
            ClientAction::Reply { to }
                if Message::parse(&self.reply).is_ok_and(|m| m.class == Class::Indication) =>
            {
                self.on_in_process(c, to, &expect)
            }
            ClientAction::Reply { to } => {
                assert_eq!(
                    (to.transport, to.client),
                    (ft.transport, ft.client),
                    "a reply to someone else"
                );
                if to.local != ft.local {
                    // Only an RFC 5780 answer over UDP leaves from another of our addresses.
                    assert_eq!(ft.transport, Transport::Udp, "a stream reply moved");
                    assert!(
                        nat_discovery().position(to.local).is_some(),
                        "reply from {to:?}"
                    );
                    let m = Message::parse(&self.reply).expect("reply parses");
                    assert_eq!((m.class, m.method), (Class::Success, method::BINDING));
                    self.coverage.moved_replies += 1;
                }
                self.on_reply(c, bytes)
            }
            ClientAction::ToPeer {
                relay,
                peer,
                start,
                end,
                ..
            } => self.on_to_peer(c, bytes, relay, peer, (start, end), &expect),
            ClientAction::Drop => self.on_drop(c, &expect),
        }
        if let Ok(m) = Message::parse(bytes) {
            if m.class == Class::Request {
                self.clients[c].last_request = Some(bytes.to_vec());
                self.clients[c].last_txid = Some(m.transaction_id());
            }
        }
    }

    fn on_reply(&mut self, c: usize, request: &[u8]) {
        let reply = std::mem::take(&mut self.reply);
        if let Some(t) = self.trace.as_mut() {
            t.push(reply.clone());
        }
        let m = Message::parse(&reply)
            .unwrap_or_else(|e| panic!("reply does not parse ({e}): {}", hex(&reply)));
        let rq = Message::parse(request)
            .unwrap_or_else(|e| panic!("a reply to a datagram that does not parse ({e})"));
        assert_eq!(rq.class, Class::Request, "a reply to a non-request");
        assert!(
            matches!(m.class, Class::Success | Class::Error),
            "reply class {:?}",
            m.class
        );
        let txid = rq.transaction_id();
        assert_eq!(m.transaction_id(), txid, "reply transaction id");
        let replay = self.clients[c]
            .replies
            .get(&txid)
            .is_some_and(|r| r.contains(&reply));
        if replay {
            self.coverage.replays += 1;
        } else {
            assert_eq!(m.method, rq.method, "reply method");
            assert!(
                !rq.has_fingerprint() || m.has_fingerprint(),
                "FINGERPRINT in the request but not in the reply"
            );
        }
        let code = error_code(&m);
        if m.class == Class::Error {
            let code = code.unwrap_or_else(|| panic!("error reply without ERROR-CODE"));
            assert!((300..700).contains(&code), "error code {code}");
            *self.coverage.error_codes.entry(code).or_default() += 1;
            if matches!(code, 401 | 438) {
                assert!(m.get(attr::REALM).is_some(), "{code} without REALM");
                let nonce = m
                    .get(attr::NONCE)
                    .unwrap_or_else(|| panic!("{code} without NONCE"));
                self.clients[c].nonce = Some((nonce.value.to_vec(), self.now));
            }
        } else {
            assert!(code.is_none(), "success reply with ERROR-CODE");
        }
        let signed = m.has_integrity() || m.has_integrity_sha256();
        if m.class == Class::Success && m.method != method::BINDING {
            assert!(signed, "TURN success reply without MESSAGE-INTEGRITY");
        }
        if signed && !replay {
            let username = rq
                .get(attr::USERNAME)
                .and_then(|u| std::str::from_utf8(u.value).ok())
                .unwrap_or_else(|| panic!("signed reply to a request without USERNAME"));
            let sha256 = m.has_integrity_sha256();
            let alg = if sha256 {
                PasswordAlgorithm::Sha256
            } else {
                PasswordAlgorithm::Md5
            };
            let ok = keys_for(username, alg).iter().any(|k| {
                if sha256 {
                    m.verify_integrity_sha256(k)
                } else {
                    m.verify_integrity(k)
                }
            });
            assert!(ok, "reply integrity does not verify with {username}'s key");
        }
        if m.class == Class::Success {
            self.learn(c, &rq, &m, replay);
        }
        let seen = self.clients[c].replies.entry(txid).or_default();
        if !seen.contains(&reply) {
            seen.push(reply.clone());
        }
        self.reply = reply;
    }

    /// Updates the model from a success reply.
    fn learn(&mut self, c: usize, rq: &Message, m: &Message, replay: bool) {
        let now = self.now;
        let limits = &self.config.limits;
        let (perm_life, chan_life) = (limits.permission_lifetime, limits.channel_lifetime);
        let txid = rq.transaction_id();
        match m.method {
            method::ALLOCATE => {
                if self.clients[c].alloc.is_some() {
                    assert!(replay, "a second allocation on one 5-tuple");
                    return;
                }
                assert!(!self.draining, "allocation granted while draining");
                let lifetime = u32_attr(m, attr::LIFETIME).expect("Allocate success: LIFETIME");
                assert!(lifetime > 0, "Allocate success with LIFETIME 0");
                let relays: Vec<SocketAddr> = m
                    .attributes()
                    .filter(|a| a.kind == attr::XOR_RELAYED_ADDRESS)
                    .map(|a| codec::decode_xor_address(a.value, &txid).expect("relayed address"))
                    .collect();
                assert!((1..=2).contains(&relays.len()), "{} relays", relays.len());
                let open: Vec<SocketAddr> = self.core.relays().open.values().copied().collect();
                for r in &relays {
                    assert!(open.contains(r), "advertised relay {r} is no open socket");
                }
                let mapped = m
                    .get(attr::XOR_MAPPED_ADDRESS)
                    .and_then(|a| codec::decode_xor_address(a.value, &txid));
                assert_eq!(mapped, Some(five_tuple(c).client), "XOR-MAPPED-ADDRESS");
                if let Some(t) = m.get(attr::RESERVATION_TOKEN) {
                    let t = <[u8; 8]>::try_from(t.value).expect("8-byte token");
                    self.reservation_token = Some(u64::from_be_bytes(t));
                    self.coverage.reservations += 1;
                }
                let username = rq
                    .get(attr::USERNAME)
                    .and_then(|u| std::str::from_utf8(u.value).ok())
                    .unwrap_or_default();
                let quota_user = self.config.auth.quota_user(username).to_string();
                self.coverage.allocations += 1;
                self.coverage.dual_allocations += u64::from(relays.len() == 2);
                self.coverage.sha256_successes += u64::from(rq.has_integrity_sha256());
                self.coverage.rest_successes += u64::from(quota_user == REST_USER);
                let expires = now + Duration::from_secs(lifetime.into());
                self.clients[c].alloc = Some(AllocModel {
                    expires,
                    quota_user,
                    relay_expires: vec![expires; relays.len()],
                    relays,
                    permissions: HashMap::new(),
                    channels: HashMap::new(),
                });
            }
            method::REFRESH => {
                let lifetime = u32_attr(m, attr::LIFETIME).expect("Refresh success: LIFETIME");
                let session = self.session_expiry(c);
                let a = self.clients[c]
                    .alloc
                    .as_mut()
                    .unwrap_or_else(|| panic!("Refresh succeeded without an allocation"));
                let asked = now + Duration::from_secs(lifetime.into());
                let until = (lifetime > 0).then_some(asked);
                // Which relays the Refresh moves: one family's, or all of them.
                let family = rq
                    .get(attr::REQUESTED_ADDRESS_FAMILY)
                    .map(|f| f.value.first() == Some(&2));
                let targets: Vec<usize> = match family.map(|v6| a.relay_of_family(v6)) {
                    Some(Some(i)) => vec![i],
                    // A family deleted by this very Refresh: its cached success replayed.
                    Some(None) if replay => Vec::new(),
                    Some(None) => panic!("Refresh of a family with no relay"),
                    None => (0..a.relays.len()).collect(),
                };
                if targets.is_empty() {
                    assert_eq!(
                        session,
                        Some(a.expires),
                        "expiry after a replayed family delete"
                    );
                    return;
                }
                let whole = targets.len() == a.relays.len();
                if replay {
                    // Answered from the cache (no change) or anew: the core must hold one of the
                    // two, as its session list shows.
                    let anew = match (whole, until) {
                        (true, until) => until,
                        (false, until) => a.expiry_if(targets[0], until),
                    };
                    if session == anew && session != Some(a.expires) {
                        for &i in targets.iter().rev() {
                            a.set_relay(i, until);
                        }
                    }
                    assert!(
                        session.is_none() || session == Some(a.expires),
                        "expiry after a retransmitted Refresh"
                    );
                    if session.is_none() {
                        self.clients[c].alloc = None;
                    }
                } else if until.is_none() && whole {
                    self.clients[c].alloc = None;
                    self.coverage.deletions += 1;
                } else {
                    for &i in targets.iter().rev() {
                        a.set_relay(i, until);
                    }
                    if until.is_some() {
                        self.coverage.refreshes += 1;
                    } else {
                        self.coverage.deletions += 1;
                    }
                }
            }
            method::CREATE_PERMISSION if rq.method == method::CREATE_PERMISSION => {
                let a = self.clients[c]
                    .alloc
                    .as_mut()
                    .unwrap_or_else(|| panic!("CreatePermission succeeded without an allocation"));
                let peers: Vec<SocketAddr> = rq
                    .attributes()
                    .filter(|x| x.kind == attr::XOR_PEER_ADDRESS)
                    .filter_map(|x| codec::decode_xor_address(x.value, &txid))
                    .collect();
                assert!(
                    replay || !peers.is_empty(),
                    "CreatePermission without a peer"
                );
                for p in peers {
                    let old = a.permissions.get(&p.ip()).copied();
                    let span = Span::refreshed(old, now + perm_life, replay, now);
                    a.permissions.insert(p.ip(), span);
                }
                self.coverage.permissions += 1;
            }
            method::CHANNEL_BIND if rq.method == method::CHANNEL_BIND => {
                let a = self.clients[c]
                    .alloc
                    .as_mut()
                    .unwrap_or_else(|| panic!("ChannelBind succeeded without an allocation"));
                let number = rq
                    .get(attr::CHANNEL_NUMBER)
                    .filter(|x| x.value.len() >= 2)
                    .map(|x| u16::from_be_bytes([x.value[0], x.value[1]]));
                let peer = rq
                    .get(attr::XOR_PEER_ADDRESS)
                    .and_then(|x| codec::decode_xor_address(x.value, &txid));
                let (Some(number), Some(peer)) = (number, peer) else {
                    assert!(replay, "ChannelBind succeeded without a number and a peer");
                    return;
                };
                assert!(
                    replay || (codec::CHANNEL_MIN..=codec::CHANNEL_MAX).contains(&number),
                    "channel {number:#x} bound"
                );
                let plain = PEERS[..PLAIN_PEERS].iter().any(|p| p.parse() == Ok(peer));
                if !replay {
                    // The number and the peer are this binding's alone: a live binding of either
                    // to something else would have made this a 400.
                    a.channels.retain(|(n, p), (_, s)| {
                        let other = (*n == number) != (*p == peer);
                        assert!(
                            !(other && s.lo > now),
                            "ChannelBind {number:#x} -> {peer} beside live {n:#x} -> {p}"
                        );
                        !other
                    });
                }
                let old = a.channels.get(&(number, peer)).map(|(_, s)| *s);
                let span = Span::refreshed(old, now + chan_life, replay, now);
                a.channels.insert((number, peer), (plain, span));
                let old = a.permissions.get(&peer.ip()).copied();
                let span = Span::refreshed(old, now + perm_life, replay, now);
                a.permissions.insert(peer.ip(), span);
                self.coverage.channels += 1;
            }
            _ => {}
        }
    }

    /// What the core's session list says of client `c`'s expiry.
    fn session_expiry(&self, c: usize) -> Option<Instant> {
        let ft = five_tuple(c);
        self.core
            .sessions(self.now)
            .iter()
            .find(|s| s.client == ft.client && s.transport == ft.transport)
            .map(|s| self.now + Duration::from_secs(s.expires_in_secs))
    }

    fn on_to_peer(
        &mut self,
        c: usize,
        data: &[u8],
        relay: RelayId,
        peer: SocketAddr,
        (start, end): (usize, usize),
        expect: &Expect,
    ) {
        assert!(
            start <= end && end <= data.len(),
            "ToPeer range {start}..{end} outside a {}-byte datagram",
            data.len()
        );
        let now = self.now;
        let local = self.core.relays().open.get(&relay).copied();
        let local = local.unwrap_or_else(|| panic!("ToPeer on relay {relay:?}, which is not open"));
        let a = self.clients[c]
            .alloc
            .as_ref()
            .unwrap_or_else(|| panic!("ToPeer for a 5-tuple without an allocation"));
        assert!(
            a.relays.contains(&local),
            "ToPeer on another allocation's relay"
        );
        assert_eq!(
            local.is_ipv6(),
            peer.is_ipv6(),
            "relay family vs peer family"
        );
        assert!(
            permitted(a, peer, now),
            "relayed to {peer} without a permission"
        );
        let channel = match expect {
            Expect::Send {
                peer: p, payload, ..
            } => {
                same_bytes(&data[start..end], payload);
                assert_eq!(canonical(peer), canonical(*p), "relayed to another peer");
                self.coverage.to_peer_send += 1;
                None
            }
            Expect::Channel {
                number, payload, ..
            } => {
                same_bytes(&data[start..end], payload);
                self.coverage.to_peer_channel += 1;
                Some(*number)
            }
            Expect::Nothing if data.first().is_some_and(|b| b >> 6 == 1) => {
                self.coverage.to_peer_channel += 1;
                Some(u16::from_be_bytes([data[0], data[1]]))
            }
            Expect::Nothing => {
                self.coverage.to_peer_send += 1;
                None
            }
        };
        if let Some(number) = channel {
            assert!(
                a.may_be_bound(number, peer, now),
                "ChannelData on {number:#x} relayed to {peer}, not bound to it"
            );
        }
    }

    /// A Send or ChannelData to one of this core's own relays, delivered without the kernel:
    /// checked as a ToPeer from client `c` and as what the receiving relay's owner gets.
    fn on_in_process(&mut self, c: usize, to: FiveTuple, expect: &Expect) {
        let now = self.now;
        let frame = std::mem::take(&mut self.reply);
        let o = (0..CLIENTS)
            .find(|&o| five_tuple(o) == to)
            .unwrap_or_else(|| panic!("relayed in process to {to:?}, no client of ours"));
        let sender = self.clients[c]
            .alloc
            .as_ref()
            .unwrap_or_else(|| panic!("relayed in process for a 5-tuple without an allocation"));
        let receiver = self.clients[o]
            .alloc
            .as_ref()
            .expect("receiver's allocation");
        let policy = &self.config.policy;
        let names = |target: SocketAddr| [canonical(target), canonical(policy.present(target))];
        // The receiving relay is the one of the owner's relays the request named.
        let named = |target: SocketAddr| match expect {
            Expect::Send { peer, .. } => names(target).contains(&canonical(*peer)),
            Expect::Channel { number, .. } => names(target)
                .iter()
                .any(|&n| sender.may_be_bound(*number, n, now)),
            Expect::Nothing => true,
        };
        let (target, from) = receiver
            .relays
            .iter()
            .filter(|t| named(**t))
            .find_map(|&t| {
                let from = sender.relays.iter().find(|r| r.is_ipv6() == t.is_ipv6())?;
                Some((t, *from))
            })
            .unwrap_or_else(|| panic!("relayed in process to {to:?}, not to a relay it named"));
        assert!(
            names(target).iter().any(|&n| permitted(sender, n, now)),
            "relayed in process to {target} without a permission"
        );
        let data = match expect {
            Expect::Send { payload, .. } | Expect::Channel { payload, .. } => Some(payload.clone()),
            Expect::Nothing => None,
        };
        self.coverage.relayed_in_process += 1;
        self.check_to_client(o, from, &frame, data.as_deref());
    }

    /// A drop is checked only where the model is sure the datagram had to go through.
    fn on_drop(&mut self, c: usize, expect: &Expect) {
        let now = self.now;
        let Some(a) = self.clients[c].alloc.as_ref() else {
            return;
        };
        match expect {
            Expect::Send { pool, peer, .. } if *pool < PLAIN_PEERS => {
                let must = a.has_relay_for(*peer) && certainly_permitted(a, *peer, now);
                assert!(!must, "Send indication to permitted peer {peer} dropped");
            }
            Expect::Channel {
                number,
                well_formed: true,
                ..
            } => {
                for ((n, p), (plain, s)) in &a.channels {
                    let must = n == number
                        && *plain
                        && s.lo > now
                        && a.has_relay_for(*p)
                        && certainly_permitted(a, *p, now);
                    assert!(!must, "ChannelData on bound channel {number:#x} dropped");
                }
            }
            _ => {}
        }
    }

    fn pick_relay(&mut self, sel: u8) -> RelayId {
        let fr = self.core.relays();
        let mut ids: Vec<RelayId> = fr.open.keys().copied().collect();
        ids.sort_by_key(|id| (id.slot, id.gen, id.v6));
        ids.extend(fr.closed.iter().copied());
        ids.push(RelayId {
            slot: 7,
            gen: 0xDEAD,
            v6: false,
        });
        ids[sel as usize % ids.len()]
    }

    /// A peer datagram carrying `data` arrives on relay `id` from `from`.
    fn peer_send(&mut self, id: RelayId, from: SocketAddr, from_pool: usize, data: &[u8]) {
        let now = self.now;
        let mut buf = vec![0xEE; HEADROOM + data.len() + TAILROOM];
        buf[HEADROOM..HEADROOM + data.len()].copy_from_slice(data);
        let end = HEADROOM + data.len();
        let action = self
            .core
            .handle_peer(now, id, from, &mut buf, HEADROOM, end);
        let local = self.core.relays().open.get(&id).copied();
        let owner = local.and_then(|l| {
            (0..CLIENTS).find(|&c| {
                self.clients[c]
                    .alloc
                    .as_ref()
                    .is_some_and(|a| a.relays.contains(&l))
            })
        });
        assert!(
            local.is_none() || owner.is_some(),
            "open relay of no allocation"
        );
        match action {
            PeerAction::ToClient { to, start, end } => {
                assert!(
                    start <= end && end <= buf.len(),
                    "ToClient range {start}..{end} outside a {}-byte buffer",
                    buf.len()
                );
                let o = owner.unwrap_or_else(|| panic!("ToClient from relay {id:?}, not open"));
                assert_eq!(to, five_tuple(o), "ToClient to another client");
                let frame = buf[start..end].to_vec();
                self.check_to_client(o, from, &frame, Some(data));
            }
            PeerAction::Drop => {
                if let Some(o) = owner {
                    let a = self.clients[o].alloc.as_ref().expect("owner");
                    let must = from_pool < PLAIN_PEERS
                        && data.len() <= u16::MAX as usize - HEADROOM
                        && certainly_permitted(a, from, now);
                    assert!(!must, "data from permitted peer {from} dropped");
                }
            }
        }
    }

    /// A frame for client `o`'s relay from `from`, checked against the model: `data` is the
    /// payload when the model knows it.
    fn check_to_client(&mut self, o: usize, from: SocketAddr, frame: &[u8], data: Option<&[u8]>) {
        let now = self.now;
        if let Some(t) = self.trace.as_mut() {
            t.push(frame.to_vec());
        }
        let present = self.config.policy.present(from);
        let a = self.clients[o].alloc.as_ref().expect("owner");
        assert!(
            permitted(a, from, now),
            "peer data from {from} without a permission"
        );
        if frame.first().is_some_and(|b| b >> 6 == 1) {
            let cd = codec::parse_channel_data(frame).expect("ChannelData frame parses");
            if let Some(data) = data {
                same_bytes(&frame[cd.start..cd.end], data);
            }
            assert!(frame.len() - cd.end < 4, "ChannelData frame padding");
            assert!(
                a.may_be_bound(cd.channel, from, now),
                "data from {from} framed on {:#x}, not bound to it",
                cd.channel
            );
            self.coverage.to_client_channel += 1;
        } else {
            let m = Message::parse(frame)
                .unwrap_or_else(|e| panic!("Data indication does not parse ({e}): {}", hex(frame)));
            assert_eq!((m.method, m.class), (method::DATA, Class::Indication));
            let d = m.get(attr::DATA).expect("DATA");
            if let Some(data) = data {
                same_bytes(d.value, data);
            }
            let p = m.get(attr::XOR_PEER_ADDRESS).expect("XOR-PEER-ADDRESS");
            let p = codec::decode_xor_address(p.value, &m.transaction_id());
            assert_eq!(p, Some(present), "XOR-PEER-ADDRESS of a Data indication");
            let bound = a
                .channels
                .iter()
                .any(|((_, p), (plain, s))| *p == from && *plain && s.lo > now);
            assert!(!bound, "Data indication although a channel is bound");
            self.coverage.to_client_data += 1;
        }
    }

    /// Moves time on, firing timers the way an event loop does (at `poll_timeout`).
    fn advance(&mut self, secs: u64) {
        let target = self.now + Duration::from_secs(secs);
        let mut rounds = 0;
        while let Some(t) = self.core.poll_timeout() {
            if t > target {
                break;
            }
            rounds += 1;
            assert!(
                rounds < 1000,
                "poll_timeout stays at {t:?} after handle_timeout"
            );
            self.now = self.now.max(t);
            self.core.handle_timeout(self.now);
            self.expire_model();
            self.check_counts();
        }
        self.now = target;
        self.core.handle_timeout(target);
        self.expire_model();
    }

    fn expire_model(&mut self) {
        let now = self.now;
        for cm in &mut self.clients {
            if cm.alloc.as_ref().is_some_and(|a| a.expires <= now) {
                cm.alloc = None;
                self.coverage.expirations += 1;
            }
            // One family's relay past its own expiry goes alone.
            if let Some(a) = cm.alloc.as_mut() {
                while let Some(i) = a.relay_expires.iter().position(|t| *t <= now) {
                    a.set_relay(i, None);
                }
            }
        }
    }

    fn client_of(&self, client: SocketAddr, transport: Transport) -> usize {
        (0..CLIENTS)
            .find(|&c| {
                let ft = five_tuple(c);
                ft.client == client && ft.transport == transport
            })
            .unwrap_or_else(|| panic!("a session of unknown client {client}"))
    }

    fn admin(&mut self, what: u8, arg: u8) {
        let now = self.now;
        // Mostly harmless calls: a run that ends every allocation early reaches little.
        match what % 16 {
            0..=5 => {
                self.draining = arg & 7 == 7;
                self.core.set_draining(self.draining);
            }
            6..=8 => {
                let sessions = self.core.sessions(now);
                if sessions.is_empty() || arg == 0xFF {
                    assert!(
                        !self.core.end_session(9999, 0, now, EndReason::Admin),
                        "ended no session"
                    );
                    return;
                }
                let s = &sessions[arg as usize % sessions.len()];
                assert!(
                    self.core.end_session(s.slot, s.gen, now, EndReason::Admin),
                    "end_session"
                );
                assert!(
                    !self.core.end_session(s.slot, s.gen, now, EndReason::Admin),
                    "ended twice"
                );
                let c = self.client_of(s.client, s.transport);
                self.clients[c].alloc = None;
                self.coverage.admin_ends += 1;
            }
            9 | 10 => {
                let user = ["alice", "bob", REST_USER][arg as usize % 3];
                let mine =
                    |a: &Option<AllocModel>| a.as_ref().is_some_and(|a| a.quota_user == user);
                let expected = self.clients.iter().filter(|c| mine(&c.alloc)).count();
                assert_eq!(
                    self.core.end_user(user, now, EndReason::Admin),
                    expected,
                    "end_user({user})"
                );
                for cm in &mut self.clients {
                    if mine(&cm.alloc) {
                        cm.alloc = None;
                    }
                }
                self.coverage.admin_ends += expected as u64;
            }
            11 if arg < 0x40 => {
                self.core.close_all(now, EndReason::Admin);
                for cm in &mut self.clients {
                    cm.alloc = None;
                }
            }
            _ => {}
        }
    }

    /// The counts every part of the core keeps must agree with each other and with the model.
    fn check_counts(&mut self) {
        let now = self.now;
        let n = self.core.allocation_count();
        let model = self.clients.iter().filter(|c| c.alloc.is_some()).count();
        assert_eq!(n, model, "allocation_count vs the allocations granted");
        let st = *self.core.stats();
        assert_eq!(
            st.allocations_created - st.allocations_ended,
            n as u64,
            "allocations created - ended vs allocation_count"
        );
        let sessions = self.core.sessions(now);
        assert_eq!(sessions.len(), n, "sessions vs allocation_count");
        let mut relays = 0;
        for s in &sessions {
            let c = self.client_of(s.client, s.transport);
            let a = self.clients[c]
                .alloc
                .as_ref()
                .expect("session the model lacks");
            let (mut got, mut want) = (s.relays.clone(), a.relays.clone());
            got.sort();
            want.sort();
            assert_eq!(got, want, "relays of {}", s.client);
            let left = a.expires.saturating_duration_since(now).as_secs();
            assert_eq!(s.expires_in_secs, left, "expiry of {}", s.client);
            relays += s.relays.len();
        }
        let fr = self.core.relays();
        assert_eq!(
            fr.open.len(),
            relays,
            "relay sockets open vs relays of live allocations"
        );
        let reserved = fr.reserved.len();
        assert_eq!(self.shared.reserved_ports(), reserved, "reserved ports");
        assert_eq!(
            self.shared.total_allocations() as usize,
            n + reserved,
            "quota units vs allocations + reservations"
        );
        let earliest = self
            .clients
            .iter()
            .filter_map(|c| c.alloc.as_ref())
            .flat_map(|a| a.relay_expires.iter().copied())
            .min();
        if let Some(e) = earliest {
            let t = self.core.poll_timeout();
            assert!(
                t.is_some_and(|t| t <= e),
                "poll_timeout {t:?} after an expiry"
            );
        }
    }

    /// A core with a session: client 0 (alice, MD5) holds an IPv4 allocation with a permission
    /// for peers 0 and 3 and channel 0x4000 to peer 1; client 2 (SHA-256) a dual allocation
    /// with a permission for peer 2. No time passes, so the nonces are the same in every run.
    fn with_session() -> Self {
        let mut h = CoreHarness::new();
        for op in session_ops() {
            h.step(&op);
        }
        let cov = &h.coverage;
        assert!(
            cov.allocations == 2 && cov.permissions == 2 && cov.channels == 1,
            "session setup: {cov:?}"
        );
        h
    }

    fn relay_of(&mut self, c: usize) -> RelayId {
        let local = self.clients[c].alloc.as_ref().expect("allocation").relays[0];
        let fr = self.core.relays();
        *fr.open
            .iter()
            .find(|(_, a)| **a == local)
            .expect("relay open")
            .0
    }
}

fn method_attributes(w: &mut MessageWriter, m: u16, q: &Request, peers: &[SocketAddr], token: u64) {
    let p = q.params;
    let family = |w: &mut MessageWriter, kind: u16, f: u8| {
        w.attr(kind, &[f, 0, 0, 0]);
    };
    // Selectors mostly pick the plain request; the other values pick one variation each.
    match m {
        method::ALLOCATE => {
            if p[0] < 0xF8 {
                // 132 (SCTP) is a transport nobody serves: 442. TCP relays (6) are driven by
                // the core's own tests, not by this model.
                let transport = if p[0] % 8 == 7 { 132 } else { 17 };
                w.attr(attr::REQUESTED_TRANSPORT, &[transport, 0, 0, 0]);
            }
            match p[1] % 16 {
                10 => family(w, attr::REQUESTED_ADDRESS_FAMILY, 1),
                11 => family(w, attr::REQUESTED_ADDRESS_FAMILY, 2),
                12 => family(w, attr::ADDITIONAL_ADDRESS_FAMILY, 2),
                13 => family(w, attr::REQUESTED_ADDRESS_FAMILY, 3),
                14 => family(w, attr::ADDITIONAL_ADDRESS_FAMILY, 1),
                _ => {}
            }
            let token = token.to_be_bytes();
            let (kind, value): (u16, &[u8]) = match p[2] % 16 {
                10 => (attr::EVEN_PORT, &[0]),
                11 => (attr::EVEN_PORT, &[0x80]),
                12 => (attr::RESERVATION_TOKEN, &token),
                13 => (attr::RESERVATION_TOKEN, &[1; 8]),
                14 => (attr::DONT_FRAGMENT, &[]),
                _ => (0, &[]),
            };
            if kind != 0 {
                w.attr(kind, value);
            }
        }
        method::REFRESH => match p[1] % 16 {
            13 => family(w, attr::REQUESTED_ADDRESS_FAMILY, 1),
            14 => family(w, attr::REQUESTED_ADDRESS_FAMILY, 2),
            15 => family(w, attr::REQUESTED_ADDRESS_FAMILY, 3),
            _ => {}
        },
        method::CREATE_PERMISSION => {
            for peer in peers {
                w.xor_address(attr::XOR_PEER_ADDRESS, *peer);
            }
        }
        method::CHANNEL_BIND => {
            let n = channel_number(q.channel);
            w.attr(attr::CHANNEL_NUMBER, &[(n >> 8) as u8, n as u8, 0, 0]);
            if let Some(peer) = peers.first() {
                w.xor_address(attr::XOR_PEER_ADDRESS, *peer);
            }
        }
        _ => {}
    }
    if matches!(m, method::ALLOCATE | method::REFRESH) {
        if let Some(l) = LIFETIMES[p[3] as usize % LIFETIMES.len()] {
            w.u32_attr(attr::LIFETIME, l);
        }
    }
}

fn session_ops() -> Vec<Op> {
    vec![
        Op::Request(Request::new(0, method::ALLOCATE)),
        Op::Request(Request::new(0, method::CREATE_PERMISSION).peers(&[0, 3])),
        Op::Request(
            Request::new(0, method::CHANNEL_BIND)
                .channel(0x4000)
                .peers(&[1]),
        ),
        Op::Request(
            Request::new(2, method::ALLOCATE)
                .params([0, 12, 0, 0])
                .sha256(),
        ),
        Op::Request(
            Request::new(2, method::CREATE_PERMISSION)
                .peers(&[2])
                .sha256(),
        ),
    ]
}

// ------------------------------------------------------------------ core targets

/// Fuzz target `core_ops`: the input is a sequence of [`Op`]s. Returns what the run reached.
pub fn run_ops(data: &[u8]) -> Coverage {
    let mut h = CoreHarness::new();
    for op in Op::decode_all(data) {
        h.step(&op);
    }
    h.coverage
}

/// Fuzz target `core_datagram`: the input is one datagram from client 0 of
/// [`CoreHarness::with_session`], then the same bytes as a peer's payload on its relay.
pub fn run_datagram(data: &[u8]) {
    run_datagram_coverage(data);
}

/// [`run_datagram`], returning what the run reached (session setup included).
pub fn run_datagram_coverage(data: &[u8]) -> Coverage {
    let mut h = CoreHarness::with_session();
    h.client_send(0, data, Expect::Nothing);
    h.check_counts();
    if h.clients[0].alloc.is_some() {
        let id = h.relay_of(0);
        let from = PEERS[0].parse().expect("peer");
        h.peer_send(id, from, 0, data);
        h.check_counts();
    }
    h.coverage
}

// ------------------------------------------------------------------ codec targets

fn padded(len: usize) -> usize {
    (len + 3) & !3
}
const CODEC_KEY: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";

/// Fuzz target `stun_message`: `Message::parse`, the attribute walk, integrity, and a rebuild
/// of the protected attributes with `MessageWriter` that must parse and verify.
pub fn check_stun_message(data: &[u8]) {
    let Ok(m) = Message::parse(data) else {
        return;
    };
    assert!(codec::is_stun(data), "parsed but not STUN");
    assert_eq!(m.bytes(), data);
    assert_eq!(data.len() % 4, 0, "parsed an unpadded message");
    let txid = m.transaction_id();
    assert_eq!(&txid[..], &data[8..20]);
    let mut next = HEADER_LEN;
    let mut attrs = Vec::new();
    for a in m.attributes() {
        assert!(a.offset >= next + 4, "attribute overlaps the previous one");
        assert!(
            a.offset + a.value.len() <= data.len(),
            "attribute past the end"
        );
        assert_eq!(a.value, &data[a.offset..a.offset + a.value.len()]);
        let kind = u16::from_be_bytes([data[a.offset - 4], data[a.offset - 3]]);
        assert_eq!(kind, a.kind);
        assert!(
            a.kind != attr::MESSAGE_INTEGRITY && a.kind != attr::MESSAGE_INTEGRITY_SHA256,
            "integrity among the protected attributes"
        );
        let first = m
            .get(a.kind)
            .expect("get finds an attribute the walk found");
        assert!(first.offset <= a.offset);
        let _ = codec::decode_xor_address(a.value, &txid);
        let _ = codec::decode_address(a.value);
        next = a.offset + padded(a.value.len());
        attrs.push((a.kind, a.value));
    }
    let md5 = long_term_key(PasswordAlgorithm::Md5, "alice", REALM, "wonderland");
    for key in [CODEC_KEY, md5.as_bytes()] {
        assert!(m.verify_integrity(key) <= m.has_integrity());
        assert!(m.verify_integrity_sha256(key) <= m.has_integrity_sha256());
    }
    if data.len() > 60_000 {
        return;
    }
    let mut out = Vec::new();
    let mut w = MessageWriter::new(&mut out, m.method, m.class, txid);
    for (kind, value) in attrs.iter().filter(|(k, _)| *k != attr::FINGERPRINT) {
        w.attr(*kind, value);
    }
    w.integrity(CODEC_KEY)
        .integrity_sha256(CODEC_KEY)
        .fingerprint();
    let r = Message::parse(&out).unwrap_or_else(|e| panic!("rebuilt message: {e}"));
    assert_eq!((r.method, r.class), (m.method, m.class));
    assert!(r.verify_integrity(CODEC_KEY) && r.verify_integrity_sha256(CODEC_KEY));
    assert!(!r.verify_integrity(b"other") && !r.verify_integrity_sha256(b"other"));
    assert!(r.has_fingerprint());
    let back: Vec<(u16, &[u8])> = r.attributes().map(|a| (a.kind, a.value)).collect();
    let want: Vec<(u16, &[u8])> = attrs
        .iter()
        .copied()
        .filter(|(k, _)| *k != attr::FINGERPRINT)
        .collect();
    assert_eq!(back, want, "attributes after a rebuild");
    let mut flipped = out.clone();
    flipped[19] ^= 1;
    assert!(
        Message::parse(&flipped).is_err(),
        "FINGERPRINT missed a flipped bit"
    );
}

fn address_from(b: &[u8]) -> SocketAddr {
    let mut ip = [0u8; 16];
    for (i, x) in b.iter().skip(3).take(16).enumerate() {
        ip[i] = *x;
    }
    let port = u16::from_be_bytes([
        b.get(1).copied().unwrap_or(0),
        b.get(2).copied().unwrap_or(0),
    ]);
    if b.first().is_some_and(|x| x & 1 == 1) {
        SocketAddr::new(IpAddr::from(ip), port)
    } else {
        SocketAddr::new(IpAddr::from([ip[0], ip[1], ip[2], ip[3]]), port)
    }
}

fn written_address(addr: SocketAddr, txid: [u8; 12], xor: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = MessageWriter::new(&mut out, method::BINDING, Class::Success, txid);
    if xor {
        w.xor_address(attr::XOR_MAPPED_ADDRESS, addr);
    } else {
        w.address(attr::MAPPED_ADDRESS, addr);
    }
    out[HEADER_LEN + 4..].to_vec()
}

/// Fuzz target `address`: 12 bytes of transaction id, then an address attribute's value, decoded
/// both ways and written back; and an address made of the same bytes round-tripped.
pub fn check_address(data: &[u8]) {
    let mut txid = [0u8; 12];
    let n = data.len().min(12);
    txid[..n].copy_from_slice(&data[..n]);
    let value = data.get(12..).unwrap_or(&[]);
    let well_formed = matches!((value.get(1), value.len()), (Some(1), 8) | (Some(2), 20));
    for xor in [true, false] {
        let decoded = if xor {
            codec::decode_xor_address(value, &txid)
        } else {
            codec::decode_address(value)
        };
        assert_eq!(decoded.is_some(), well_formed, "decodes {}", hex(value));
        if let Some(a) = decoded {
            assert_eq!(a.is_ipv6(), value.len() == 20);
            let back = written_address(a, txid, xor);
            assert_eq!(&back[1..], &value[1..], "address written back");
        }
    }
    let addr = address_from(value);
    for xor in [true, false] {
        let v = written_address(addr, txid, xor);
        let back = if xor {
            codec::decode_xor_address(&v, &txid)
        } else {
            codec::decode_address(&v)
        };
        assert_eq!(back, Some(addr), "round trip of {addr}");
    }
}

/// Fuzz target `channel_data`: `parse_channel_data`, then the input's tail framed in place as
/// ChannelData and as a Data indication, both of which must parse back to the same payload.
pub fn check_channel_data(data: &[u8]) {
    match codec::parse_channel_data(data) {
        Some(cd) => {
            assert_eq!(data[0] & 0xC0, 0x40);
            assert_eq!(cd.channel, u16::from_be_bytes([data[0], data[1]]));
            let len = u16::from_be_bytes([data[2], data[3]]) as usize;
            assert_eq!((cd.start, cd.end), (4, 4 + len));
            assert!(cd.end <= data.len());
        }
        None => assert!(
            data.len() < 4
                || data[0] & 0xC0 != 0x40
                || 4 + u16::from_be_bytes([data[2], data[3]]) as usize > data.len()
        ),
    }
    let head = &data[..data.len().min(4)];
    let channel = 0x4000
        | (u16::from_be_bytes([
            head.first().copied().unwrap_or(0),
            head.get(1).copied().unwrap_or(0),
        ]) & 0x3FFF);
    let peer = address_from(data.get(2..).unwrap_or(&[]));
    let body = &data[head.len()..];
    let body = &body[..body.len().min(8192)];
    let len = body.len();
    let fresh = || {
        let mut buf = vec![0xEEu8; HEADROOM + len + TAILROOM];
        buf[HEADROOM..HEADROOM + len].copy_from_slice(body);
        buf
    };
    let mut buf = fresh();
    let (s, e) = codec::frame_channel_data(&mut buf, HEADROOM, HEADROOM + len, channel);
    assert!(s <= e && e <= buf.len());
    let cd = codec::parse_channel_data(&buf[s..e]).expect("framed ChannelData parses");
    assert_eq!(cd.channel, channel);
    same_bytes(&buf[s + cd.start..s + cd.end], body);
    let mut buf = fresh();
    let txid = [0x5A; 12];
    let (s, e) = codec::frame_data_indication(&mut buf, HEADROOM, HEADROOM + len, peer, &txid);
    assert!(s <= e && e <= buf.len());
    let m = Message::parse(&buf[s..e]).unwrap_or_else(|e| panic!("framed Data indication: {e}"));
    assert_eq!((m.method, m.class), (method::DATA, Class::Indication));
    assert_eq!(m.get(attr::DATA).map(|a| a.value), Some(body));
    let p = m.get(attr::XOR_PEER_ADDRESS).expect("XOR-PEER-ADDRESS");
    assert_eq!(codec::decode_xor_address(p.value, &txid), Some(peer));
}

// ------------------------------------------------------------------ seed corpus

/// RFC 5769 test vectors (§2.1-2.4).
const RFC5769: [(&str, &str); 4] = [
    (
        "rfc5769-request",
        "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74\
         002400046e0001ff80290008932ff9b151263b36000600096576746a3a6836765920202000080014\
         9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf",
    ),
    (
        "rfc5769-response-v4",
        "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f722000200008\
         0001a147e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d780280004c07d4c96",
    ),
    (
        "rfc5769-response-v6",
        "010100482112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f722000200014\
         0002a1470113a9faa5d3f179bc25f4b5bed2b9d900080014a382954e4be67bf11784c97c8292c275\
         bfe3ed4180280004c8fb0b4c",
    ),
    (
        "rfc5769-long-term",
        "000100602112a44278ad3433c6ad72c029da412e00060012e3839ee38388e383aae38383e382afe3\
         82b900000015001c662f2f3439396b39353464364f4c33346f4c394653547679363473410014000b\
         6578616d706c652e6f72670000080014f67024656dd64a3e02b8e0712e85c9a28ca89666",
    ),
];

fn unhex(s: &str) -> Vec<u8> {
    let s: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    s.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap_or("00"), 16).unwrap_or(0))
        .collect()
}

fn q(client: usize, m: u16) -> Request {
    Request::new(client, m)
}

fn req(r: Request) -> Op {
    Op::Request(r)
}

/// Scripted sessions: the `core_ops` seeds, whose traffic also seeds the codec targets.
fn scripted_sessions() -> Vec<(&'static str, Vec<Op>)> {
    use method::{ALLOCATE, BINDING, CHANNEL_BIND, CREATE_PERMISSION, REFRESH};
    let send = |client, peer| Op::Send {
        client: client_sel(client),
        peer: peer_sel(peer),
        len: 5,
    };
    let peer = |relay, from| Op::Peer {
        relay,
        from: peer_sel(from),
        len: 7,
    };
    let advance = |index: u16| Op::Advance { secs: index };
    let admin = |what, arg| Op::Admin { what, arg };
    let mut bad_attr = q(0, ALLOCATE);
    bad_attr.extra = vec![(
        EXTRA_KINDS.iter().position(|k| *k == 0x7777).unwrap_or(0) as u16,
        b"x".to_vec(),
    )];
    // CHANGE-REQUEST with change IP and port: honoured for client 0 (the answer moves), 420 for
    // the IPv6 client, 400 over TCP.
    let change = |client: usize| {
        let mut r = q(client, BINDING).unauthenticated();
        r.extra = vec![(
            EXTRA_KINDS
                .iter()
                .position(|k| *k == attr::CHANGE_REQUEST)
                .unwrap_or(0) as u16,
            vec![0, 0, 0, 6],
        )];
        r
    };
    let mut mutated = q(0, REFRESH);
    mutated.mutations = vec![(30, 0x40)];
    let mut reuse = q(0, CREATE_PERMISSION).peers(&[1]);
    reuse.flags = REUSE_TXID;
    let with_auth = |mut r: Request, auth: Auth| {
        r.auth = auth_index(auth);
        r
    };
    vec![
        (
            "relay-v4",
            vec![
                req(q(0, ALLOCATE).fingerprint()),
                req(q(0, CREATE_PERMISSION).peers(&[0])),
                send(0, 0),
                peer(0, 0),
                req(q(0, CHANNEL_BIND).channel(0x4000).peers(&[0])),
                Op::ChannelData {
                    client: 0,
                    channel: 0x4000,
                    len: 6,
                    flags: 2,
                },
                peer(0, 0),
                req(q(0, REFRESH).lifetime(4)),
                advance(10),
                send(0, 0),
                req(q(0, REFRESH).lifetime(2)),
            ],
        ),
        (
            "dual-sha256",
            vec![
                req(q(2, ALLOCATE).params([0, 12, 0, 0]).sha256()),
                req(q(2, CREATE_PERMISSION).peers(&[2, 0]).sha256()),
                send(2, 2),
                peer(1, 2),
                req(q(2, CHANNEL_BIND).channel(0x4001).peers(&[2]).sha256()),
                peer(1, 2),
                req(q(2, REFRESH).params([0, 14, 0, 4]).sha256()),
            ],
        ),
        (
            "quotas-rest",
            vec![
                req(q(0, ALLOCATE)),
                req(q(1, ALLOCATE)),
                req(with_auth(q(3, ALLOCATE), Auth::Rest)),
                req(with_auth(q(2, ALLOCATE), Auth::Bob)),
                admin(9, 0),
                req(with_auth(q(2, ALLOCATE), Auth::Bob)),
            ],
        ),
        (
            "expiry-stale-nonce",
            vec![
                req(q(0, ALLOCATE).lifetime(3)),
                advance(12),
                req(with_auth(q(0, REFRESH), Auth::CachedNonce)),
                req(q(0, REFRESH)),
                advance(15),
            ],
        ),
        (
            "even-port-reservation",
            vec![
                req(q(0, ALLOCATE).params([0, 0, 11, 0])),
                req(q(1, ALLOCATE).params([0, 0, 12, 0])),
                req(with_auth(q(3, ALLOCATE).params([0, 0, 12, 0]), Auth::Rest)),
                req(q(2, ALLOCATE).params([0, 0, 13, 0])),
                req(q(2, ALLOCATE).params([0, 0, 11, 0])),
                advance(6),
            ],
        ),
        (
            "retransmit",
            vec![
                req(q(0, ALLOCATE)),
                Op::Retransmit { client: 0 },
                req(q(0, REFRESH).lifetime(4)),
                advance(7),
                Op::Retransmit { client: 0 },
                req(reuse),
                admin(6, 0),
            ],
        ),
        (
            "errors",
            vec![
                req(bad_attr),
                req(with_auth(q(0, ALLOCATE), Auth::WrongPassword)),
                req(with_auth(q(0, ALLOCATE), Auth::NoRealm)),
                req(with_auth(q(0, ALLOCATE), Auth::UnknownUser)),
                req(with_auth(q(0, ALLOCATE), Auth::ExpiredRest)),
                req(with_auth(q(0, ALLOCATE), Auth::BadNonce)),
                req(q(0, ALLOCATE).params([7, 0, 0, 0])),
                req(q(0, ALLOCATE).params([0, 13, 0, 0])),
                req(q(0, ALLOCATE)),
                req(q(0, CREATE_PERMISSION).peers(&[5])),
                req(q(0, CREATE_PERMISSION).peers(&[8])),
                req(q(0, CHANNEL_BIND).channel(0x8001).peers(&[0])),
                req(q(0, CHANNEL_BIND).channel(0x4000).peers(&[2])),
                req(q(1, REFRESH)),
                req(mutated),
                req(q(0, BINDING).unauthenticated().fingerprint()),
            ],
        ),
        (
            "nat-discovery",
            vec![req(change(0)), req(change(2)), req(change(3))],
        ),
        (
            "admin-drain",
            vec![
                req(q(0, ALLOCATE)),
                req(q(2, ALLOCATE)),
                admin(1, 7),
                req(q(1, ALLOCATE)),
                admin(0, 0),
                admin(6, 1),
                admin(11, 0),
                req(q(1, ALLOCATE)),
            ],
        ),
        (
            "relay-to-relay-raw",
            vec![
                req(q(0, ALLOCATE)),
                req(q(1, ALLOCATE)),
                req(q(1, CREATE_PERMISSION).peers(&[7])),
                send(1, 7),
                // Both relays share one IP: client 0's permission for its own relay lets client
                // 1's datagrams in (delivered without the kernel), and its own come back to it.
                req(q(0, CREATE_PERMISSION).peers(&[7])),
                send(1, 7),
                send(0, 7),
                req(q(1, CHANNEL_BIND).channel(0x4001).peers(&[7])),
                Op::ChannelData {
                    client: client_sel(1),
                    channel: 0x4001,
                    len: 9,
                    flags: 0,
                },
                Op::Raw {
                    client: 0,
                    bytes: unhex(RFC5769[0].1),
                },
                Op::Raw {
                    client: 0,
                    bytes: vec![0x40, 0x00, 0x00, 0x02, 0xAB, 0xCD],
                },
            ],
        ),
    ]
}

fn describe(m: &Message) -> String {
    let name = match m.method {
        method::BINDING => "binding",
        method::ALLOCATE => "allocate",
        method::REFRESH => "refresh",
        method::SEND => "send",
        method::DATA => "data",
        method::CREATE_PERMISSION => "permission",
        method::CHANNEL_BIND => "channel-bind",
        _ => "other",
    };
    let class = match m.class {
        Class::Request => "request",
        Class::Indication => "indication",
        Class::Success => "success",
        Class::Error => "error",
    };
    match error_code(m) {
        Some(code) => format!("{name}-{code}"),
        None => format!("{name}-{class}"),
    }
}

/// The checked-in seed corpus: (target, file name, bytes). `tests/props.rs` writes it to
/// `fuzz/corpus/<target>/` (an ignored test) and replays what is there.
pub fn seed_corpus() -> Vec<(&'static str, String, Vec<u8>)> {
    use method::{ALLOCATE, BINDING, CHANNEL_BIND, CREATE_PERMISSION, REFRESH};
    let mut out = Vec::new();
    let mut traffic: Vec<Vec<u8>> = RFC5769.iter().map(|(_, h)| unhex(h)).collect();
    for (name, h) in RFC5769 {
        out.push(("stun_message", name.to_string(), unhex(h)));
        out.push(("core_datagram", name.to_string(), unhex(h)));
    }
    for (name, ops) in scripted_sessions() {
        let mut h = CoreHarness::new();
        h.trace = Some(Vec::new());
        for op in &ops {
            h.step(op);
        }
        traffic.extend(h.trace.take().unwrap_or_default());
        out.push(("core_ops", name.to_string(), Op::encode_all(&ops)));
    }

    // Datagrams for the session of `run_datagram`, signed with the nonce its client 0 holds.
    let mut h = CoreHarness::with_session();
    let datagrams = [
        ("refresh", req(q(0, REFRESH).lifetime(4))),
        ("refresh-delete", req(q(0, REFRESH).lifetime(2))),
        ("permission", req(q(0, CREATE_PERMISSION).peers(&[1]))),
        (
            "permission-sha256",
            req(q(0, CREATE_PERMISSION).peers(&[0, 3]).sha256()),
        ),
        (
            "channel-bind",
            req(q(0, CHANNEL_BIND).channel(0x4001).peers(&[3])),
        ),
        (
            "channel-rebind",
            req(q(0, CHANNEL_BIND).channel(0x4000).peers(&[1])),
        ),
        ("allocate-437", req(q(0, ALLOCATE).fingerprint())),
        ("allocate-401", req(q(0, ALLOCATE).unauthenticated())),
        ("binding", req(q(0, BINDING).unauthenticated())),
        (
            "binding-fingerprint",
            req(q(0, BINDING).unauthenticated().fingerprint()),
        ),
    ];
    for (name, op) in datagrams {
        let Op::Request(r) = op else { continue };
        out.push(("core_datagram", name.to_string(), h.build_request(&r)));
    }
    let (send, _) = h.send_indication(0, b"hello".to_vec());
    out.push(("core_datagram", "send-indication".into(), send));
    for (name, number) in [("channel-data", 0x4000), ("channel-data-unbound", 0x4003)] {
        let (cd, _) = channel_data(number, b"channel data".to_vec(), 0);
        out.push(("core_datagram", name.into(), cd));
    }

    // Codec seeds from the sessions' traffic: distinct kinds of message, frames, addresses.
    let mut seen = std::collections::BTreeSet::new();
    let mut addresses = std::collections::BTreeSet::new();
    for d in &traffic {
        if let Ok(m) = Message::parse(d) {
            let name = describe(&m);
            if seen.insert(name.clone()) {
                out.push(("stun_message", name, d.clone()));
            }
            let txid = m.transaction_id();
            for a in m.attributes() {
                if codec::decode_address(a.value).is_some() && addresses.len() < 12 {
                    let mut v = txid.to_vec();
                    v.extend_from_slice(a.value);
                    addresses.insert(v);
                }
            }
        } else if codec::parse_channel_data(d).is_some() && seen.insert(format!("cd-{}", d.len())) {
            out.push((
                "channel_data",
                format!("channel-data-{}", d.len()),
                d.clone(),
            ));
        }
    }
    for (i, v) in addresses.into_iter().enumerate() {
        out.push(("address", format!("address-{i:02}"), v));
    }
    let mut frames = 0;
    for d in traffic.iter().filter(|d| {
        Message::parse(d).is_ok_and(|m| m.method == method::DATA || m.method == method::SEND)
    }) {
        if frames < 4 {
            out.push(("channel_data", format!("indication-{frames}"), d.clone()));
            frames += 1;
        }
    }
    out
}
