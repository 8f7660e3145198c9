//! Core tests: bytes in, bytes out, simulated time.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::fuzzing::TestCore;
use crate::proto::allocation::{RelayId, RESERVATION_LIFETIME};
use crate::proto::auth::{
    long_term_key, mint_rest_credential, AuthReject, PasswordAlgorithm, RestConfig, StaticUser,
};
use crate::proto::codec::{self, attr, method, Class, Message, MessageWriter, HEADROOM, TAILROOM};
use crate::proto::discovery::NatDiscovery;
use crate::proto::error::EndReason;
use crate::proto::policy::{PeerPolicy, PolicyConfig};
use crate::proto::quota::QuotaKey;
use crate::proto::Transport;

const REALM: &str = "test.realm";
const SECRET: &[u8] = b"rest-secret";
const UNIX0: u64 = 1_800_000_000;

struct Harness {
    core: TestCore,
    shared: Arc<Shared>,
    t0: Instant,
    now: Instant,
    reply: Vec<u8>,
    txid_counter: u32,
}

fn limits() -> Limits {
    Limits {
        allocations_per_user: 2,
        total_allocations: 3,
        permissions_per_allocation: 4,
        channels_per_allocation: 2,
        unauth_replies_per_sec: 0,
        ..Limits::default()
    }
}

fn config(limits: Limits, allow_loopback: bool, with_v6: bool) -> CoreConfig {
    let mut users = HashMap::new();
    users.insert(
        "alice".to_string(),
        StaticUser::Password("wonderland".into()),
    );
    users.insert("bob".to_string(), StaticUser::Password("builder".into()));
    let auth = Authenticator::new(
        REALM.into(),
        users,
        Some(RestConfig {
            secrets: vec![b"old-secret".to_vec(), SECRET.to_vec()],
            separator: ':',
            max_ttl_secs: 48 * 3600,
        }),
    );
    let relay_ip: IpAddr = "192.0.2.10".parse().unwrap();
    let relay_v6: IpAddr = "2001:db8::10".parse().unwrap();
    let policy = PeerPolicy::new(PolicyConfig {
        allow: vec![
            "198.51.100.0/24".parse().unwrap(),
            "2001:db8:1::/48".parse().unwrap(),
        ],
        deny: vec![],
        allow_loopback,
        relay_ips: if with_v6 {
            vec![relay_ip, relay_v6]
        } else {
            vec![relay_ip]
        },
        external_ips: vec![],
        relay_ports: (49152, 65535),
        service_endpoints: vec!["0.0.0.0:3478".parse().unwrap()],
        host_ips: vec!["192.0.2.99".parse().unwrap()],
    });
    CoreConfig {
        software: None,
        auth,
        policy,
        limits,
        relay_v4: Some(RelayAddress {
            local: relay_ip,
            advertised: relay_ip,
        }),
        relay_v6: with_v6.then_some(RelayAddress {
            local: relay_v6,
            advertised: relay_v6,
        }),
        nat_discovery: Vec::new(),
    }
}

fn client(port: u16) -> FiveTuple {
    FiveTuple {
        transport: Transport::Udp,
        client: SocketAddr::new("203.0.113.7".parse().unwrap(), port),
        local: "192.0.2.10:3478".parse().unwrap(),
    }
}

/// A client session's credentials.
#[derive(Clone)]
struct Creds {
    user: String,
    key: Vec<u8>,
    sha256: bool,
}

fn alice() -> Creds {
    creds("alice", "wonderland")
}

fn creds(user: &str, password: &str) -> Creds {
    Creds {
        user: user.into(),
        key: long_term_key(PasswordAlgorithm::Md5, user, REALM, password)
            .as_bytes()
            .to_vec(),
        sha256: false,
    }
}

fn peer(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

impl Harness {
    fn new() -> Self {
        Self::with(config(limits(), false, true))
    }

    fn with(cfg: CoreConfig) -> Self {
        let t0 = Instant::now();
        let shared = Arc::new(Shared::new([9; 32], 600, t0, UNIX0));
        Harness {
            core: TestCore::new(Arc::new(cfg), Arc::clone(&shared), 42),
            shared,
            t0,
            now: t0,
            reply: Vec::new(),
            txid_counter: 0,
        }
    }

    fn advance(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
        self.core.handle_timeout(self.now);
    }

    fn txid(&mut self) -> [u8; 12] {
        self.txid_counter += 1;
        let mut t = [0xAB; 12];
        t[..4].copy_from_slice(&self.txid_counter.to_be_bytes());
        t
    }

    fn send(&mut self, ft: &FiveTuple, bytes: &[u8]) -> ClientAction {
        self.core
            .handle_client(self.now, ft, bytes, &mut self.reply)
    }

    /// Sends and returns the parsed reply's (class, error code).
    fn call(&mut self, ft: &FiveTuple, bytes: &[u8]) -> (Class, Option<u16>) {
        assert_eq!(
            self.send(ft, bytes),
            ClientAction::Reply { to: *ft },
            "expected a reply"
        );
        let m = Message::parse(&self.reply).expect("reply parses");
        let code = m
            .get(attr::ERROR_CODE)
            .map(|e| e.value[2] as u16 * 100 + e.value[3] as u16);
        (m.class, code)
    }

    fn reply_attr(&self, kind: u16) -> Option<Vec<u8>> {
        let m = Message::parse(&self.reply).unwrap();
        m.get(kind).map(|a| a.value.to_vec())
    }

    /// Gets a nonce the way a client does: an unauthenticated request answered with 401.
    fn nonce(&mut self, ft: &FiveTuple) -> Vec<u8> {
        let txid = self.txid();
        let mut buf = Vec::new();
        MessageWriter::new(&mut buf, method::ALLOCATE, Class::Request, txid)
            .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        let (class, code) = self.call(ft, &buf);
        assert_eq!((class, code), (Class::Error, Some(401)));
        self.reply_attr(attr::NONCE).unwrap()
    }

    /// Builds an authenticated request; `fill` adds the method's attributes.
    fn request(
        &mut self,
        m: u16,
        txid: [u8; 12],
        c: &Creds,
        nonce: &[u8],
        fill: impl FnOnce(&mut MessageWriter),
    ) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut w = MessageWriter::new(&mut buf, m, Class::Request, txid);
        fill(&mut w);
        w.attr(attr::USERNAME, c.user.as_bytes())
            .attr(attr::REALM, REALM.as_bytes())
            .attr(attr::NONCE, nonce);
        if c.sha256 {
            w.attr(attr::PASSWORD_ALGORITHM, &[0, 2, 0, 0])
                .attr(attr::PASSWORD_ALGORITHMS, &[0, 1, 0, 0, 0, 2, 0, 0])
                .integrity_sha256(&c.key);
        } else {
            w.integrity(&c.key);
        }
        buf
    }

    fn allocate_with(
        &mut self,
        ft: &FiveTuple,
        c: &Creds,
        fill: impl FnOnce(&mut MessageWriter),
    ) -> (Class, Option<u16>) {
        self.allocate_transport(ft, c, 17, fill)
    }

    /// An Allocate asking for REQUESTED-TRANSPORT `protocol` (17 UDP, 6 TCP).
    pub(super) fn allocate_transport(
        &mut self,
        ft: &FiveTuple,
        c: &Creds,
        protocol: u8,
        fill: impl FnOnce(&mut MessageWriter),
    ) -> (Class, Option<u16>) {
        let nonce = self.nonce(ft);
        let txid = self.txid();
        let req = self.request(method::ALLOCATE, txid, c, &nonce, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[protocol, 0, 0, 0]);
            fill(w);
        });
        self.call(ft, &req)
    }

    fn allocate(&mut self, ft: &FiveTuple) -> SocketAddr {
        let (class, code) = self.allocate_with(ft, &alice(), |_| {});
        assert_eq!((class, code), (Class::Success, None));
        self.relayed_address()
    }

    fn relayed_address(&self) -> SocketAddr {
        let m = Message::parse(&self.reply).unwrap();
        let a = m.get(attr::XOR_RELAYED_ADDRESS).unwrap();
        codec::decode_xor_address(a.value, &m.transaction_id()).unwrap()
    }

    fn authed(
        &mut self,
        ft: &FiveTuple,
        m: u16,
        fill: impl FnOnce(&mut MessageWriter),
    ) -> (Class, Option<u16>) {
        let nonce = self.nonce(ft);
        let txid = self.txid();
        let req = self.request(m, txid, &alice(), &nonce, fill);
        self.call(ft, &req)
    }

    fn permit(&mut self, ft: &FiveTuple, p: SocketAddr) -> (Class, Option<u16>) {
        self.authed(ft, method::CREATE_PERMISSION, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, p);
        })
    }

    fn bind(&mut self, ft: &FiveTuple, number: u16, p: SocketAddr) -> (Class, Option<u16>) {
        self.authed(ft, method::CHANNEL_BIND, |w| {
            w.attr(
                attr::CHANNEL_NUMBER,
                &[(number >> 8) as u8, number as u8, 0, 0],
            )
            .xor_address(attr::XOR_PEER_ADDRESS, p);
        })
    }

    fn refresh(&mut self, ft: &FiveTuple, lifetime: u32) -> (Class, Option<u16>) {
        self.authed(ft, method::REFRESH, |w| {
            w.u32_attr(attr::LIFETIME, lifetime);
        })
    }

    fn send_indication(&mut self, ft: &FiveTuple, p: SocketAddr, data: &[u8]) -> ClientAction {
        let mut buf = Vec::new();
        let txid = self.txid();
        MessageWriter::new(&mut buf, method::SEND, Class::Indication, txid)
            .xor_address(attr::XOR_PEER_ADDRESS, p)
            .attr(attr::DATA, data);
        self.send(ft, &buf)
    }

    /// A datagram from `from` on `relay`, as the I/O layer would hand it over.
    fn peer_sends(
        &mut self,
        relay: SocketAddr,
        from: SocketAddr,
        payload: &[u8],
    ) -> Option<(FiveTuple, Vec<u8>)> {
        let id = *self
            .core
            .relays()
            .open
            .iter()
            .find(|(_, a)| **a == relay)
            .expect("relay open")
            .0;
        let mut buf = vec![0u8; HEADROOM + payload.len() + TAILROOM];
        buf[HEADROOM..HEADROOM + payload.len()].copy_from_slice(payload);
        match self.core.handle_peer(
            self.now,
            id,
            from,
            &mut buf,
            HEADROOM,
            HEADROOM + payload.len(),
        ) {
            PeerAction::ToClient { to, start, end } => Some((to, buf[start..end].to_vec())),
            PeerAction::Drop => None,
        }
    }
}

// ------------------------------------------------------------------ Binding

#[test]
fn binding_returns_xor_mapped_address_and_fingerprint_only_when_asked() {
    let mut h = Harness::new();
    let ft = client(40000);
    let mut req = Vec::new();
    MessageWriter::new(&mut req, method::BINDING, Class::Request, [1; 12]);
    assert_eq!(h.call(&ft, &req), (Class::Success, None));
    let m = Message::parse(&h.reply).unwrap();
    let a = m.get(attr::XOR_MAPPED_ADDRESS).unwrap();
    assert_eq!(
        codec::decode_xor_address(a.value, &[1; 12]),
        Some(ft.client)
    );
    assert!(!m.has_fingerprint());
    assert!(m.get(attr::SOFTWARE).is_none());

    MessageWriter::new(&mut req, method::BINDING, Class::Request, [2; 12]).fingerprint();
    h.call(&ft, &req);
    assert!(Message::parse(&h.reply).unwrap().has_fingerprint());
}

#[test]
fn binding_with_unknown_comprehension_required_attribute_gets_420() {
    let mut h = Harness::new();
    let mut req = Vec::new();
    MessageWriter::new(&mut req, method::BINDING, Class::Request, [1; 12])
        .attr(0x7777, b"x")
        .attr(attr::CHANGE_REQUEST, &[0, 0, 0, 4]);
    assert_eq!(h.call(&client(1), &req), (Class::Error, Some(420)));
    let list = h.reply_attr(attr::UNKNOWN_ATTRIBUTES).unwrap();
    assert_eq!(list, vec![0x77, 0x77, 0x00, 0x03]);
    // Comprehension-optional unknowns and a no-op CHANGE-REQUEST are fine.
    MessageWriter::new(&mut req, method::BINDING, Class::Request, [1; 12])
        .attr(0xC001, b"x")
        .attr(attr::CHANGE_REQUEST, &[0, 0, 0, 0]);
    assert_eq!(h.call(&client(1), &req), (Class::Success, None));
}

// ------------------------------------------------------------------ RFC 5780 discovery

const IP1: &str = "192.0.2.10";
const IP2: &str = "192.0.2.11";

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn discovery_config(limits: Limits) -> CoreConfig {
    let mut cfg = config(limits, false, true);
    cfg.nat_discovery = vec![
        NatDiscovery {
            primary: at(IP1, 3478),
            alternate: at(IP2, 3479),
            tcp: true,
        },
        NatDiscovery {
            primary: "[2001:db8::10]:3478".parse().unwrap(),
            alternate: "[2001:db8::11]:3479".parse().unwrap(),
            tcp: false,
        },
    ];
    cfg
}

fn binding(txid: [u8; 12], change: Option<crate::proto::discovery::ChangeRequest>) -> Vec<u8> {
    let mut req = Vec::new();
    let mut w = MessageWriter::new(&mut req, method::BINDING, Class::Request, txid);
    if let Some(c) = change {
        w.attr(attr::CHANGE_REQUEST, &c.encode());
    }
    req
}

fn change(ip: bool, port: bool) -> Option<crate::proto::discovery::ChangeRequest> {
    Some(crate::proto::discovery::ChangeRequest { ip, port })
}

fn on(local: SocketAddr, transport: Transport) -> FiveTuple {
    let client = if local.is_ipv4() {
        "203.0.113.7:40000".parse().unwrap()
    } else {
        "[2001:db8:1::7]:40000".parse().unwrap()
    };
    FiveTuple {
        transport,
        client,
        local,
    }
}

impl Harness {
    /// Sends a Binding request and returns where the answer leaves from.
    fn binding_from(&mut self, ft: &FiveTuple, req: &[u8]) -> FiveTuple {
        match self.send(ft, req) {
            ClientAction::Reply { to } => to,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn reply_address(&self, kind: u16) -> Option<SocketAddr> {
        self.reply_attr(kind)
            .and_then(|v| codec::decode_address(&v))
    }
}

#[test]
fn binding_names_response_origin_and_other_address_only_when_configured() {
    let ft = on(at(IP1, 3478), Transport::Udp);
    let mut plain = Harness::new();
    assert_eq!(
        plain.call(&ft, &binding([1; 12], None)),
        (Class::Success, None)
    );
    for kind in [
        attr::MAPPED_ADDRESS,
        attr::RESPONSE_ORIGIN,
        attr::OTHER_ADDRESS,
    ] {
        assert!(
            plain.reply_attr(kind).is_none(),
            "{kind:#06x} without config"
        );
    }

    let mut h = Harness::with(discovery_config(limits()));
    assert_eq!(h.call(&ft, &binding([1; 12], None)), (Class::Success, None));
    let xor = h.reply_attr(attr::XOR_MAPPED_ADDRESS).unwrap();
    assert_eq!(codec::decode_xor_address(&xor, &[1; 12]), Some(ft.client));
    assert_eq!(h.reply_address(attr::MAPPED_ADDRESS), Some(ft.client));
    assert_eq!(h.reply_address(attr::RESPONSE_ORIGIN), Some(at(IP1, 3478)));
    assert_eq!(h.reply_address(attr::OTHER_ADDRESS), Some(at(IP2, 3479)));
    // 20 header + 4 attributes of 12: no more than the four addresses need.
    assert_eq!(h.reply.len(), 68);

    // A listener that is not one of the four answers as if discovery were off.
    let other = on(at("192.0.2.10", 5000), Transport::Udp);
    assert_eq!(
        h.call(&other, &binding([2; 12], None)),
        (Class::Success, None)
    );
    assert!(h.reply_attr(attr::OTHER_ADDRESS).is_none());
    assert!(h.reply_attr(attr::RESPONSE_ORIGIN).is_none());
}

#[test]
fn change_request_flags_pick_the_source_of_the_answer() {
    let mut h = Harness::with(discovery_config(limits()));
    let cases = [
        // (arrived on, change ip, change port, answer from, OTHER-ADDRESS)
        (at(IP1, 3478), false, false, at(IP1, 3478), at(IP2, 3479)),
        (at(IP1, 3478), true, false, at(IP2, 3478), at(IP2, 3479)),
        (at(IP1, 3478), false, true, at(IP1, 3479), at(IP2, 3479)),
        (at(IP1, 3478), true, true, at(IP2, 3479), at(IP2, 3479)),
        (at(IP2, 3478), false, false, at(IP2, 3478), at(IP1, 3479)),
        (at(IP2, 3479), true, true, at(IP1, 3478), at(IP1, 3478)),
        (
            "[2001:db8::10]:3478".parse().unwrap(),
            true,
            true,
            "[2001:db8::11]:3479".parse().unwrap(),
            "[2001:db8::11]:3479".parse().unwrap(),
        ),
    ];
    for (local, ip, port, source, other) in cases {
        let ft = on(local, Transport::Udp);
        let to = h.binding_from(&ft, &binding([3; 12], change(ip, port)));
        let case = format!("{local} ip={ip} port={port}");
        assert_eq!(
            to,
            FiveTuple {
                local: source,
                ..ft
            },
            "{case}"
        );
        assert_eq!(
            Message::parse(&h.reply).unwrap().class,
            Class::Success,
            "{case}"
        );
        assert_eq!(
            h.reply_address(attr::RESPONSE_ORIGIN),
            Some(source),
            "{case}"
        );
        assert_eq!(h.reply_address(attr::OTHER_ADDRESS), Some(other), "{case}");
        let xor = h.reply_attr(attr::XOR_MAPPED_ADDRESS).unwrap();
        assert_eq!(codec::decode_xor_address(&xor, &[3; 12]), Some(ft.client));
    }
}

#[test]
fn change_requests_that_cannot_be_honoured_are_refused() {
    let mut h = Harness::with(discovery_config(limits()));
    // A listener without alternate addresses: 420 naming CHANGE-REQUEST (RFC 5780 §6.1).
    let stranger = on(at(IP1, 5000), Transport::Udp);
    for (ip, port) in [(true, false), (false, true), (true, true)] {
        assert_eq!(
            h.call(&stranger, &binding([4; 12], change(ip, port))),
            (Class::Error, Some(420))
        );
        assert_eq!(h.reply_attr(attr::UNKNOWN_ATTRIBUTES).unwrap(), vec![0, 3]);
    }
    // Asking for nothing is no reason to refuse.
    assert_eq!(
        h.call(&stranger, &binding([4; 12], change(false, false))),
        (Class::Success, None)
    );
    // Over TCP the answer cannot leave from elsewhere: 400, on the connection it came in on.
    let tcp = on(at(IP1, 3478), Transport::Tcp);
    assert_eq!(
        h.call(&tcp, &binding([5; 12], change(true, false))),
        (Class::Error, Some(400))
    );
    // Without flags a TCP client still learns OTHER-ADDRESS (mapping discovery over TCP).
    assert_eq!(
        h.call(&tcp, &binding([5; 12], None)),
        (Class::Success, None)
    );
    assert_eq!(h.reply_address(attr::OTHER_ADDRESS), Some(at(IP2, 3479)));
    // The IPv6 set has no TCP listeners: its TCP answers are plain, its CHANGE-REQUEST a 420.
    let tcp6 = on("[2001:db8::10]:3478".parse().unwrap(), Transport::Tcp);
    assert_eq!(
        h.call(&tcp6, &binding([6; 12], None)),
        (Class::Success, None)
    );
    assert!(h.reply_attr(attr::OTHER_ADDRESS).is_none());
    assert_eq!(
        h.call(&tcp6, &binding([6; 12], change(false, true))),
        (Class::Error, Some(420))
    );
    // A malformed CHANGE-REQUEST is a bad request.
    let ft = on(at(IP1, 3478), Transport::Udp);
    let mut req = Vec::new();
    MessageWriter::new(&mut req, method::BINDING, Class::Request, [7; 12])
        .attr(attr::CHANGE_REQUEST, &[0, 4]);
    assert_eq!(h.call(&ft, &req), (Class::Error, Some(400)));
    // PADDING and RESPONSE-PORT are not supported: 420 naming them, with or without discovery.
    for kind in [attr::PADDING, attr::RESPONSE_PORT] {
        let mut req = Vec::new();
        MessageWriter::new(&mut req, method::BINDING, Class::Request, [8; 12]).attr(kind, &[0; 4]);
        for ft in [ft, stranger] {
            assert_eq!(h.call(&ft, &req), (Class::Error, Some(420)));
            assert_eq!(
                h.reply_attr(attr::UNKNOWN_ATTRIBUTES).unwrap(),
                kind.to_be_bytes().to_vec()
            );
        }
    }
}

#[test]
fn discovery_answers_are_rate_limited_per_source_and_plain_ones_are_not() {
    let mut l = limits();
    l.unauth_replies_per_sec = 1;
    l.unauth_replies_burst = 2;
    let mut h = Harness::with(discovery_config(l));
    let ft = on(at(IP1, 3478), Transport::Udp);
    let req = binding([9; 12], change(true, true));
    for _ in 0..2 {
        assert!(matches!(h.send(&ft, &req), ClientAction::Reply { .. }));
    }
    assert_eq!(h.send(&ft, &req), ClientAction::Drop);
    assert_eq!(h.core.stats().rate_limited, 1);
    // Plain Binding answers on other listeners (ICE, keepalives) stay unlimited.
    let plain = on(at(IP1, 5000), Transport::Udp);
    for _ in 0..5 {
        assert_eq!(
            h.send(&plain, &binding([9; 12], None)),
            ClientAction::Reply { to: plain }
        );
    }
    h.advance(1);
    assert!(matches!(h.send(&ft, &req), ClientAction::Reply { .. }));
}

#[test]
fn turn_requests_on_discovery_only_listeners_are_forbidden() {
    let mut h = Harness::with(discovery_config(limits()));
    for local in [at(IP1, 3479), at(IP2, 3478), at(IP2, 3479)] {
        let ft = on(local, Transport::Udp);
        let mut req = Vec::new();
        MessageWriter::new(&mut req, method::ALLOCATE, Class::Request, [1; 12])
            .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        assert_eq!(h.call(&ft, &req), (Class::Error, Some(403)), "{local}");
    }
    // The primary listener is an ordinary TURN listener.
    let ft = on(at(IP1, 3478), Transport::Udp);
    h.allocate(&ft);
    assert_eq!(h.core.allocation_count(), 1);
}

#[test]
fn software_is_sent_only_when_configured() {
    let mut cfg = config(limits(), false, false);
    cfg.software = Some("turnpike-test".into());
    let mut h = Harness::with(cfg);
    let mut req = Vec::new();
    MessageWriter::new(&mut req, method::BINDING, Class::Request, [1; 12]);
    h.call(&client(1), &req);
    assert_eq!(h.reply_attr(attr::SOFTWARE).unwrap(), b"turnpike-test");
}

// ------------------------------------------------------------------ Authentication

#[test]
fn unauthenticated_allocate_gets_401_with_realm_nonce_and_algorithms() {
    let mut h = Harness::new();
    let ft = client(1);
    let nonce = h.nonce(&ft);
    assert!(nonce.starts_with(b"obMatJos2"));
    assert_eq!(h.reply_attr(attr::REALM).unwrap(), REALM.as_bytes());
    assert_eq!(
        h.reply_attr(attr::PASSWORD_ALGORITHMS).unwrap(),
        vec![0, 1, 0, 0, 0, 2, 0, 0]
    );
    assert!(h.reply_attr(attr::MESSAGE_INTEGRITY).is_none());
    assert_eq!(h.core.allocation_count(), 0);
}

#[test]
fn wrong_password_gets_401_and_no_state() {
    let mut h = Harness::new();
    let ft = client(1);
    let (class, code) = h.allocate_with(&ft, &creds("alice", "WRONG"), |_| {});
    assert_eq!((class, code), (Class::Error, Some(401)));
    let (class, code) = h.allocate_with(&ft, &creds("mallory", "x"), |_| {});
    assert_eq!((class, code), (Class::Error, Some(401)));
    assert_eq!(h.core.allocation_count(), 0);
    let failures = h.core.stats().auth_failures;
    assert_eq!(failures[AuthReject::WrongPassword as usize], 1);
    // Not a static user and not shaped like a REST username.
    assert_eq!(failures[AuthReject::MalformedUsername as usize], 1);
}

#[test]
fn success_response_is_signed_with_the_users_key() {
    let mut h = Harness::new();
    let ft = client(1);
    h.allocate(&ft);
    let m = Message::parse(&h.reply).unwrap();
    assert!(m.verify_integrity(&alice().key));
    assert!(!m.verify_integrity(&creds("alice", "x").key));
}

#[test]
fn sha256_password_algorithm_and_message_integrity_sha256() {
    let mut h = Harness::new();
    let ft = client(1);
    let c = Creds {
        user: "alice".into(),
        key: long_term_key(PasswordAlgorithm::Sha256, "alice", REALM, "wonderland")
            .as_bytes()
            .to_vec(),
        sha256: true,
    };
    assert_eq!(h.allocate_with(&ft, &c, |_| {}), (Class::Success, None));
    let m = Message::parse(&h.reply).unwrap();
    assert!(m.verify_integrity_sha256(&c.key));
    assert!(!m.has_integrity());
}

#[test]
fn tampered_password_algorithms_list_is_refused() {
    let mut h = Harness::new();
    let ft = client(1);
    let nonce = h.nonce(&ft);
    let key = long_term_key(PasswordAlgorithm::Md5, "alice", REALM, "wonderland");
    let mut req = Vec::new();
    MessageWriter::new(&mut req, method::ALLOCATE, Class::Request, [5; 12])
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::USERNAME, b"alice")
        .attr(attr::REALM, REALM.as_bytes())
        .attr(attr::NONCE, &nonce)
        .attr(attr::PASSWORD_ALGORITHM, &[0, 1, 0, 0])
        // A downgrade attempt: the list we sent had SHA-256 in it.
        .attr(attr::PASSWORD_ALGORITHMS, &[0, 1, 0, 0])
        .integrity(key.as_bytes());
    assert_eq!(h.call(&ft, &req), (Class::Error, Some(400)));
}

#[test]
fn missing_realm_or_nonce_with_integrity_is_400() {
    let mut h = Harness::new();
    let mut req = Vec::new();
    MessageWriter::new(&mut req, method::ALLOCATE, Class::Request, [5; 12])
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::USERNAME, b"alice")
        .integrity(&alice().key);
    assert_eq!(h.call(&client(1), &req), (Class::Error, Some(400)));
}

#[test]
fn stale_and_forged_nonces_get_438_with_a_fresh_nonce() {
    let mut h = Harness::new();
    let ft = client(1);
    let nonce = h.nonce(&ft);
    h.advance(601);
    let txid = h.txid();
    let req = h.request(method::ALLOCATE, txid, &alice(), &nonce, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert_eq!(h.call(&ft, &req), (Class::Error, Some(438)));
    let fresh = h.reply_attr(attr::NONCE).unwrap();
    assert_ne!(fresh, nonce);
    // A nonce issued to another client address is not valid here.
    let other = h.nonce(&client(2));
    let txid = h.txid();
    let req = h.request(method::ALLOCATE, txid, &alice(), &other, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert_eq!(h.call(&ft, &req), (Class::Error, Some(438)));
    // The fresh one works.
    let txid = h.txid();
    let req = h.request(method::ALLOCATE, txid, &alice(), &fresh, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert_eq!(h.call(&ft, &req), (Class::Success, None));
}

fn rest(user: &str, expiry: u64, secret: &[u8]) -> Creds {
    let (name, password) = mint_rest_credential(secret, user, expiry, ':');
    creds(&name, &password)
}

#[test]
fn rest_credentials_expiry_max_ttl_and_rotation() {
    let mut h = Harness::new();
    // Current secret and the previous one both verify (rotation).
    assert_eq!(
        h.allocate_with(&client(1), &rest("carol", UNIX0 + 3600, SECRET), |_| {}),
        (Class::Success, None)
    );
    assert_eq!(
        h.allocate_with(
            &client(2),
            &rest("carol", UNIX0 + 3600, b"old-secret"),
            |_| {}
        ),
        (Class::Success, None)
    );
    assert_eq!(
        h.allocate_with(&client(3), &rest("carol", UNIX0 + 3600, b"unknown"), |_| {}),
        (Class::Error, Some(401))
    );
    // Expired one second ago.
    assert_eq!(
        h.allocate_with(&client(4), &rest("dave", UNIX0 - 1, SECRET), |_| {}),
        (Class::Error, Some(401))
    );
    // Beyond the 48 h maximum TTL.
    assert_eq!(
        h.allocate_with(
            &client(5),
            &rest("dave", UNIX0 + 48 * 3600 + 10, SECRET),
            |_| {}
        ),
        (Class::Error, Some(401))
    );
    // user:expiry order works too.
    let password = crate::proto::auth::rest_password(SECRET, &format!("erin:{}", UNIX0 + 60));
    assert_eq!(
        h.allocate_with(
            &client(6),
            &creds(&format!("erin:{}", UNIX0 + 60), &password),
            |_| {}
        ),
        (Class::Success, None)
    );
    // The credential that was fine at first expires with simulated time.
    h.advance(3601);
    assert_eq!(
        h.allocate_with(&client(7), &rest("carol", UNIX0 + 3600, SECRET), |_| {}),
        (Class::Error, Some(401))
    );
}

#[test]
fn unauthenticated_replies_are_rate_limited_per_source() {
    let mut l = limits();
    l.unauth_replies_per_sec = 1;
    l.unauth_replies_burst = 3;
    let mut h = Harness::with(config(l, false, false));
    let ft = client(1);
    let mut req = Vec::new();
    MessageWriter::new(&mut req, method::ALLOCATE, Class::Request, [1; 12]);
    for _ in 0..3 {
        assert_eq!(h.send(&ft, &req), ClientAction::Reply { to: ft });
    }
    assert_eq!(h.send(&ft, &req), ClientAction::Drop);
    assert_eq!(h.core.stats().rate_limited, 1);
    h.advance(2);
    assert_eq!(h.send(&ft, &req), ClientAction::Reply { to: ft });
}

// ------------------------------------------------------------------ Allocate

#[test]
fn allocate_answers_relayed_mapped_and_lifetime() {
    let mut h = Harness::new();
    let ft = client(1);
    let relay = h.allocate(&ft);
    assert_eq!(relay.ip(), "192.0.2.10".parse::<IpAddr>().unwrap());
    let m = Message::parse(&h.reply).unwrap();
    let mapped = m.get(attr::XOR_MAPPED_ADDRESS).unwrap();
    assert_eq!(
        codec::decode_xor_address(mapped.value, &m.transaction_id()),
        Some(ft.client)
    );
    assert_eq!(h.reply_attr(attr::LIFETIME).unwrap(), 600u32.to_be_bytes());
    assert_eq!(h.core.allocation_count(), 1);
}

#[test]
fn allocate_lifetime_is_clamped_between_default_and_max() {
    let mut h = Harness::new();
    h.allocate_with(&client(1), &alice(), |w| {
        w.u32_attr(attr::LIFETIME, 99_999);
    });
    assert_eq!(h.reply_attr(attr::LIFETIME).unwrap(), 3600u32.to_be_bytes());
    h.allocate_with(&client(2), &alice(), |w| {
        w.u32_attr(attr::LIFETIME, 5);
    });
    assert_eq!(h.reply_attr(attr::LIFETIME).unwrap(), 600u32.to_be_bytes());
}

#[test]
fn retransmitted_allocate_gets_the_same_answer_not_a_second_allocation() {
    let mut h = Harness::new();
    let ft = client(1);
    let nonce = h.nonce(&ft);
    let req = h.request(method::ALLOCATE, [7; 12], &alice(), &nonce, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert_eq!(h.call(&ft, &req), (Class::Success, None));
    let first = h.reply.clone();
    assert_eq!(h.call(&ft, &req), (Class::Success, None));
    assert_eq!(h.reply, first);
    assert_eq!(h.core.allocation_count(), 1);
    assert_eq!(h.core.relays().open.len(), 1);
    // A new Allocate (other transaction) on the same 5-tuple is a mismatch.
    let (class, code) = h.allocate_with(&ft, &alice(), |_| {});
    assert_eq!((class, code), (Class::Error, Some(437)));
}

#[test]
fn allocate_transport_and_attribute_errors() {
    let mut h = Harness::new();
    let ft = client(1);
    let nonce = h.nonce(&ft);
    let run = |h: &mut Harness, fill: &dyn Fn(&mut MessageWriter)| {
        let txid = h.txid();
        let req = h.request(method::ALLOCATE, txid, &alice(), &nonce, |w| fill(w));
        h.call(&ft, &req)
    };
    // No REQUESTED-TRANSPORT.
    assert_eq!(run(&mut h, &|_| {}), (Class::Error, Some(400)));
    // A transport nobody relays.
    assert_eq!(
        run(&mut h, &|w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[132, 0, 0, 0]);
        }),
        (Class::Error, Some(442))
    );
    // Unknown comprehension-required attribute.
    assert_eq!(
        run(&mut h, &|w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr(0x0033, b"?");
        }),
        (Class::Error, Some(420))
    );
    assert_eq!(
        h.reply_attr(attr::UNKNOWN_ATTRIBUTES).unwrap(),
        vec![0, 0x33]
    );
    // Unknown address family.
    assert_eq!(
        run(&mut h, &|w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr(attr::REQUESTED_ADDRESS_FAMILY, &[9, 0, 0, 0]);
        }),
        (Class::Error, Some(440))
    );
    // RESERVATION-TOKEN together with EVEN-PORT.
    assert_eq!(
        run(&mut h, &|w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr(attr::EVEN_PORT, &[0])
                .attr(attr::RESERVATION_TOKEN, &[1; 8]);
        }),
        (Class::Error, Some(400))
    );
    // ADDITIONAL-ADDRESS-FAMILY must name IPv6.
    assert_eq!(
        run(&mut h, &|w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[1, 0, 0, 0]);
        }),
        (Class::Error, Some(400))
    );
    assert_eq!(h.core.allocation_count(), 0);
    assert_eq!(h.shared.total_allocations(), 0);
}

#[test]
fn ipv6_and_dual_allocations() {
    let mut h = Harness::new();
    h.allocate_with(&client(1), &alice(), |w| {
        w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert!(h.relayed_address().is_ipv6());

    assert_eq!(
        h.allocate_with(&client(2), &alice(), |w| {
            w.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
        }),
        (Class::Success, None)
    );
    let m = Message::parse(&h.reply).unwrap();
    let relayed: Vec<SocketAddr> = m
        .attributes()
        .filter(|a| a.kind == attr::XOR_RELAYED_ADDRESS)
        .map(|a| codec::decode_xor_address(a.value, &m.transaction_id()).unwrap())
        .collect();
    assert_eq!(relayed.len(), 2);
    assert!(relayed[0].is_ipv4() && relayed[1].is_ipv6());

    // Without an IPv6 relay: 440 for IPv6, and IPv4 plus ADDRESS-ERROR-CODE for a dual request.
    let mut h = Harness::with(config(limits(), false, false));
    assert_eq!(
        h.allocate_with(&client(1), &alice(), |w| {
            w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
        }),
        (Class::Error, Some(440))
    );
    assert_eq!(
        h.allocate_with(&client(2), &alice(), |w| {
            w.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
        }),
        (Class::Success, None)
    );
    assert!(h.relayed_address().is_ipv4());
    let aec = h.reply_attr(attr::ADDRESS_ERROR_CODE).unwrap();
    assert_eq!(&aec[..4], &[2, 0, 4, 40]);
}

#[test]
fn even_port_reservation_token_is_usable_once() {
    let mut h = Harness::new();
    h.allocate_with(&client(1), &alice(), |w| {
        w.attr(attr::EVEN_PORT, &[0x80]);
    });
    let first = h.relayed_address();
    assert_eq!(first.port() % 2, 0);
    let token = h.reply_attr(attr::RESERVATION_TOKEN).unwrap();
    assert_eq!(token.len(), 8);
    let (class, _) = h.allocate_with(&client(2), &creds("bob", "builder"), |w| {
        w.attr(attr::RESERVATION_TOKEN, &token);
    });
    assert_eq!(class, Class::Success);
    assert_eq!(h.relayed_address().port(), first.port() + 1);
    // The token is spent.
    assert_eq!(
        h.allocate_with(&client(3), &creds("bob", "builder"), |w| {
            w.attr(attr::RESERVATION_TOKEN, &token);
        }),
        (Class::Error, Some(508))
    );
}

#[test]
fn per_user_quota_gives_486_and_total_gives_508() {
    let mut h = Harness::new();
    h.allocate(&client(1));
    h.allocate(&client(2));
    assert_eq!(
        h.allocate_with(&client(3), &alice(), |_| {}),
        (Class::Error, Some(486))
    );
    // Another user may still allocate, up to the total of 3.
    let bob = creds("bob", "builder");
    assert_eq!(
        h.allocate_with(&client(4), &bob, |_| {}),
        (Class::Success, None)
    );
    assert_eq!(
        h.allocate_with(&client(5), &bob, |_| {}),
        (Class::Error, Some(508))
    );
    // Deleting one frees the user's quota.
    assert_eq!(h.refresh(&client(1), 0), (Class::Success, None));
    assert_eq!(
        h.allocate_with(&client(3), &alice(), |_| {}),
        (Class::Success, None)
    );
    assert_eq!(h.core.stats().quota_rejections, 2);
}

#[test]
fn rest_quota_counts_the_user_part_not_the_whole_username() {
    let mut h = Harness::new();
    assert_eq!(
        h.allocate_with(&client(1), &rest("frank", UNIX0 + 60, SECRET), |_| {}),
        (Class::Success, None)
    );
    assert_eq!(
        h.allocate_with(&client(2), &rest("frank", UNIX0 + 61, SECRET), |_| {}),
        (Class::Success, None)
    );
    // A third credential with yet another expiry is still frank's third allocation.
    assert_eq!(
        h.allocate_with(&client(3), &rest("frank", UNIX0 + 62, SECRET), |_| {}),
        (Class::Error, Some(486))
    );
}

#[test]
fn no_relay_port_gives_508_and_releases_the_quota() {
    let mut h = Harness::new();
    h.core.relays().exhausted = true;
    assert_eq!(
        h.allocate_with(&client(1), &alice(), |_| {}),
        (Class::Error, Some(508))
    );
    assert_eq!(h.shared.total_allocations(), 0);
    h.core.relays().exhausted = false;
    h.allocate(&client(1));
}

// ------------------------------------------------------------------ Refresh and lifetimes

#[test]
fn allocation_expires_and_refresh_extends_it() {
    let mut h = Harness::new();
    let ft = client(1);
    h.allocate(&ft);
    assert_eq!(h.core.poll_timeout(), Some(h.t0 + Duration::from_secs(600)));
    h.advance(500);
    assert_eq!(h.refresh(&ft, 600), (Class::Success, None));
    h.advance(500);
    assert_eq!(h.core.allocation_count(), 1, "refresh extended it");
    h.advance(101);
    assert_eq!(h.core.allocation_count(), 0);
    assert_eq!(h.core.relays().closed.len(), 1);
    assert_eq!(h.shared.total_allocations(), 0);
    // Requests on the expired allocation are mismatches.
    assert_eq!(h.refresh(&ft, 600), (Class::Error, Some(437)));
}

#[test]
fn refresh_zero_deletes_and_family_mismatch_is_443() {
    let mut h = Harness::new();
    let ft = client(1);
    h.allocate(&ft);
    assert_eq!(
        h.authed(&ft, method::REFRESH, |w| {
            w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
        }),
        (Class::Error, Some(443))
    );
    assert_eq!(h.refresh(&ft, 0), (Class::Success, None));
    assert_eq!(h.reply_attr(attr::LIFETIME).unwrap(), 0u32.to_be_bytes());
    assert_eq!(h.core.allocation_count(), 0);
}

/// A dual allocation and its two relayed addresses, IPv4 first.
fn dual_allocation(h: &mut Harness, ft: &FiveTuple) -> (SocketAddr, SocketAddr) {
    let (class, _) = h.allocate_with(ft, &alice(), |w| {
        w.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert_eq!(class, Class::Success);
    let m = Message::parse(&h.reply).unwrap();
    let relayed: Vec<SocketAddr> = m
        .attributes()
        .filter(|a| a.kind == attr::XOR_RELAYED_ADDRESS)
        .map(|a| codec::decode_xor_address(a.value, &m.transaction_id()).unwrap())
        .collect();
    (relayed[0], relayed[1])
}

fn refresh_family(
    h: &mut Harness,
    ft: &FiveTuple,
    family: u8,
    lifetime: u32,
) -> (Class, Option<u16>) {
    h.authed(ft, method::REFRESH, |w| {
        w.u32_attr(attr::LIFETIME, lifetime)
            .attr(attr::REQUESTED_ADDRESS_FAMILY, &[family, 0, 0, 0]);
    })
}

#[test]
fn a_refresh_naming_a_family_deletes_only_that_relay_of_a_dual_allocation() {
    let mut h = Harness::new();
    let ft = client(1);
    let (v4, v6) = dual_allocation(&mut h, &ft);
    let (p4, p6) = (peer("198.51.100.1:5000"), peer("[2001:db8:1::1]:5000"));
    assert_eq!(h.permit(&ft, p4), (Class::Success, None));
    assert_eq!(h.permit(&ft, p6), (Class::Success, None));

    // RFC 8656 §7.3: LIFETIME 0 with REQUESTED-ADDRESS-FAMILY IPv6 deletes the IPv6 relay alone.
    assert_eq!(refresh_family(&mut h, &ft, 2, 0), (Class::Success, None));
    assert_eq!(h.reply_attr(attr::LIFETIME).unwrap(), 0u32.to_be_bytes());
    assert_eq!(h.core.allocation_count(), 1);
    assert_eq!(h.core.sessions(h.now)[0].relays, vec![v4]);
    let open: Vec<SocketAddr> = h.core.relays().open.values().copied().collect();
    assert_eq!(open, vec![v4]);
    assert!(h.peer_sends(v4, p4, b"still here").is_some());
    assert!(matches!(
        h.send_indication(&ft, p6, b"gone"),
        ClientAction::Drop
    ));
    assert!(matches!(
        h.send_indication(&ft, p4, b"kept"),
        ClientAction::ToPeer { .. }
    ));
    // The family is gone now: naming it again is 443, and deleting the last relay ends it all.
    assert_eq!(
        refresh_family(&mut h, &ft, 2, 600),
        (Class::Error, Some(443))
    );
    assert_eq!(refresh_family(&mut h, &ft, 1, 0), (Class::Success, None));
    assert_eq!(h.core.allocation_count(), 0);
    assert!(h.core.relays().open.is_empty());
    assert!(
        h.core.relays().closed.iter().any(|id| id.v6),
        "the IPv6 relay {v6} closed first"
    );
}

#[test]
fn a_refresh_naming_a_family_extends_only_that_relay() {
    let mut h = Harness::new();
    let ft = client(1);
    let (v4, v6) = dual_allocation(&mut h, &ft);
    let default = limits().default_lifetime.as_secs();
    h.advance(default - 100);
    assert_eq!(refresh_family(&mut h, &ft, 1, 3000), (Class::Success, None));
    // The IPv6 relay ends on its own lifetime; the IPv4 one and the allocation live on.
    h.advance(101);
    assert_eq!(h.core.allocation_count(), 1);
    assert_eq!(h.core.sessions(h.now)[0].relays, vec![v4]);
    let open: Vec<SocketAddr> = h.core.relays().open.values().copied().collect();
    assert_eq!(open, vec![v4]);
    assert!(!h.core.relays().open.values().any(|a| *a == v6));
    // A plain Refresh then extends what is left.
    assert_eq!(h.refresh(&ft, 600), (Class::Success, None));
    assert_eq!(h.core.allocation_count(), 1);
}

#[test]
fn dont_fragment_on_a_send_indication_asks_df_for_that_datagram() {
    let mut h = Harness::new();
    let ft = client(1);
    h.allocate(&ft);
    let p = peer("198.51.100.1:5000");
    assert_eq!(h.permit(&ft, p), (Class::Success, None));
    let send = |h: &mut Harness, df: bool| {
        let mut buf = Vec::new();
        let txid = h.txid();
        let mut w = MessageWriter::new(&mut buf, method::SEND, Class::Indication, txid);
        w.xor_address(attr::XOR_PEER_ADDRESS, p)
            .attr(attr::DATA, b"x");
        if df {
            w.attr(attr::DONT_FRAGMENT, &[]);
        }
        match h.send(&ft, &buf) {
            ClientAction::ToPeer { dont_fragment, .. } => dont_fragment,
            other => panic!("{other:?}"),
        }
    };
    assert!(send(&mut h, true));
    assert!(!send(&mut h, false));
}

#[test]
fn requests_without_allocation_get_437_and_other_user_gets_441() {
    let mut h = Harness::new();
    let ft = client(1);
    assert_eq!(h.refresh(&ft, 600), (Class::Error, Some(437)));
    assert_eq!(
        h.permit(&ft, peer("198.51.100.1:1")),
        (Class::Error, Some(437))
    );
    assert_eq!(
        h.bind(&ft, 0x4000, peer("198.51.100.1:1")),
        (Class::Error, Some(437))
    );
    h.allocate(&ft);
    let nonce = h.nonce(&ft);
    let txid = h.txid();
    let req = h.request(
        method::REFRESH,
        txid,
        &creds("bob", "builder"),
        &nonce,
        |_| {},
    );
    assert_eq!(h.call(&ft, &req), (Class::Error, Some(441)));
}

#[test]
fn unknown_request_method_gets_400() {
    let mut h = Harness::new();
    let mut req = Vec::new();
    MessageWriter::new(&mut req, 0x00F, Class::Request, [1; 12]);
    assert_eq!(h.call(&client(1), &req), (Class::Error, Some(400)));
}

// ------------------------------------------------------------------ Permissions, channels, relay

#[test]
fn create_permission_then_relay_both_ways_with_send_and_data() {
    let mut h = Harness::new();
    let ft = client(1);
    let relay = h.allocate(&ft);
    let p = peer("198.51.100.1:5000");
    // Without a permission nothing passes either way.
    assert_eq!(h.send_indication(&ft, p, b"hi"), ClientAction::Drop);
    assert!(h.peer_sends(relay, p, b"yo").is_none());

    assert_eq!(h.permit(&ft, p), (Class::Success, None));
    let mut buf = Vec::new();
    MessageWriter::new(&mut buf, method::SEND, Class::Indication, [3; 12])
        .xor_address(attr::XOR_PEER_ADDRESS, p)
        .attr(attr::DATA, b"hello");
    match h.send(&ft, &buf) {
        ClientAction::ToPeer {
            peer: to,
            start,
            end,
            relay: id,
            dont_fragment: false,
        } => {
            assert_eq!(to, p);
            assert_eq!(&buf[start..end], b"hello");
            assert!(!id.v6);
        }
        other => panic!("{other:?}"),
    }
    // The permission is per IP: another port of the same host may answer.
    let (to, frame) = h
        .peer_sends(relay, peer("198.51.100.1:6000"), b"world")
        .unwrap();
    assert_eq!(to, ft);
    let m = Message::parse(&frame).unwrap();
    assert_eq!((m.method, m.class), (method::DATA, Class::Indication));
    assert_eq!(m.get(attr::DATA).unwrap().value, b"world");
    let from = m.get(attr::XOR_PEER_ADDRESS).unwrap();
    assert_eq!(
        codec::decode_xor_address(from.value, &m.transaction_id()),
        Some(peer("198.51.100.1:6000"))
    );
    // Another IP has no permission.
    assert!(h
        .peer_sends(relay, peer("198.51.100.2:5000"), b"x")
        .is_none());
    let s = h.core.stats();
    assert_eq!((s.to_peer_packets, s.to_client_packets), (1, 1));
}

#[test]
fn permission_expires_after_300_seconds() {
    let mut h = Harness::new();
    let ft = client(1);
    let relay = h.allocate(&ft);
    let p = peer("198.51.100.1:5000");
    h.permit(&ft, p);
    h.advance(299);
    assert!(h.peer_sends(relay, p, b"x").is_some());
    h.advance(1);
    assert!(h.peer_sends(relay, p, b"x").is_none());
    assert_eq!(h.send_indication(&ft, p, b"x"), ClientAction::Drop);
}

#[test]
fn create_permission_errors_403_443_400_508() {
    let mut h = Harness::with(config(limits(), false, false));
    let ft = client(1);
    h.allocate(&ft);
    for denied in [
        "127.0.0.1:5000",
        "[::ffff:127.0.0.1]:5000",
        "10.0.0.1:5000",
        "169.254.169.254:80",
    ] {
        // ::ffff:127.0.0.1 reduces to IPv4 before the check: forbidden, not a family mismatch.
        assert_eq!(
            h.permit(&ft, peer(denied)),
            (Class::Error, Some(403)),
            "{denied}"
        );
    }
    // An IPv6 peer on an IPv4-only allocation.
    assert_eq!(
        h.permit(&ft, peer("[2001:db8:1::1]:5000")),
        (Class::Error, Some(443))
    );
    // No XOR-PEER-ADDRESS.
    assert_eq!(
        h.authed(&ft, method::CREATE_PERMISSION, |_| {}),
        (Class::Error, Some(400))
    );
    // All or nothing: one denied address in the list installs none.
    assert_eq!(
        h.authed(&ft, method::CREATE_PERMISSION, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer("198.51.100.9:1"))
                .xor_address(attr::XOR_PEER_ADDRESS, peer("127.0.0.1:1"));
        }),
        (Class::Error, Some(403))
    );
    // Quota of 4 permissions.
    assert_eq!(
        h.authed(&ft, method::CREATE_PERMISSION, |w| {
            for i in 1..=4 {
                w.xor_address(attr::XOR_PEER_ADDRESS, peer(&format!("198.51.100.{i}:1")));
            }
        }),
        (Class::Success, None)
    );
    assert_eq!(
        h.permit(&ft, peer("198.51.100.5:1")),
        (Class::Error, Some(508))
    );
    // Refreshing an existing one is fine at the quota.
    assert_eq!(
        h.permit(&ft, peer("198.51.100.1:9")),
        (Class::Success, None)
    );
}

#[test]
fn loopback_peer_is_allowed_only_with_allow_loopback() {
    let mut h = Harness::with(config(limits(), true, false));
    let ft = client(1);
    h.allocate(&ft);
    assert_eq!(
        h.permit(&ft, peer("127.0.0.1:5000")),
        (Class::Success, None)
    );
    // Our own listener stays closed.
    assert_eq!(
        h.permit(&ft, peer("127.0.0.1:3478")),
        (Class::Error, Some(403))
    );
}

#[test]
fn relay_to_relay_is_allowed_even_from_a_documentation_range() {
    let mut h = Harness::new();
    let a = client(1);
    let b = client(2);
    let relay_a = h.allocate(&a);
    let relay_b = h.allocate(&b);
    assert_eq!(h.permit(&a, relay_b), (Class::Success, None));
    assert_eq!(h.permit(&b, relay_a), (Class::Success, None));
    // Our relay IP on a port outside the relay range is the server itself.
    assert_eq!(
        h.permit(&a, SocketAddr::new(relay_b.ip(), 22)),
        (Class::Error, Some(403))
    );
    // Inside the relay range but not one of our relay sockets: some other local process.
    let unused = SocketAddr::new(relay_b.ip(), 60_000);
    assert_eq!(h.permit(&a, unused), (Class::Error, Some(403)));
    assert_eq!(h.bind(&a, 0x4000, unused), (Class::Error, Some(403)));
    // Once b's allocation ends, its port is no longer a peer either.
    assert_eq!(h.refresh(&b, 0), (Class::Success, None));
    assert_eq!(h.bind(&a, 0x4001, relay_b), (Class::Error, Some(403)));
}

#[test]
fn channel_bind_then_channel_data_both_ways() {
    let mut h = Harness::new();
    let ft = client(1);
    let relay = h.allocate(&ft);
    let p = peer("198.51.100.1:5000");
    assert_eq!(h.bind(&ft, 0x4001, p), (Class::Success, None));
    let frame = [0x40, 0x01, 0x00, 0x03, b'a', b'b', b'c', 0x00];
    match h.send(&ft, &frame) {
        ClientAction::ToPeer {
            peer: to,
            start,
            end,
            ..
        } => {
            assert_eq!(to, p);
            assert_eq!(&frame[start..end], b"abc");
        }
        other => panic!("{other:?}"),
    }
    let (_, back) = h.peer_sends(relay, p, b"xyz").unwrap();
    assert_eq!(back, [0x40, 0x01, 0x00, 0x03, b'x', b'y', b'z']);
    // Same IP, other port: no channel, so a Data indication (the permission is per IP).
    let (_, back) = h
        .peer_sends(relay, peer("198.51.100.1:5001"), b"xyz")
        .unwrap();
    assert!(codec::is_stun(&back));
    // RFC 5766 clients use numbers up to 0x7FFF.
    assert_eq!(
        h.bind(&ft, 0x7FFF, peer("198.51.100.2:5000")),
        (Class::Success, None)
    );
    assert!(matches!(
        h.send(&ft, &[0x7F, 0xFF, 0, 1, 9, 0, 0, 0]),
        ClientAction::ToPeer { .. }
    ));
    // Unbound channel number.
    assert_eq!(
        h.send(&ft, &[0x40, 0x02, 0, 1, 9, 0, 0, 0]),
        ClientAction::Drop
    );
}

#[test]
fn channel_bind_errors() {
    let mut h = Harness::new();
    let ft = client(1);
    h.allocate(&ft);
    let p1 = peer("198.51.100.1:5000");
    let p2 = peer("198.51.100.2:5000");
    assert_eq!(h.bind(&ft, 0x3FFF, p1), (Class::Error, Some(400)));
    assert_eq!(h.bind(&ft, 0x8000, p1), (Class::Error, Some(400)));
    assert_eq!(h.bind(&ft, 0xFFFF, p1), (Class::Error, Some(400)));
    assert_eq!(
        h.bind(&ft, 0x4000, peer("127.0.0.1:5000")),
        (Class::Error, Some(403))
    );
    assert_eq!(
        h.bind(&ft, 0x4000, peer("[2001:db8:1::1]:5000")),
        (Class::Error, Some(443))
    );
    assert_eq!(
        h.bind(&ft, 0x4000, peer("198.51.100.3:5000")),
        (Class::Success, None)
    );
    assert_eq!(h.bind(&ft, 0x4001, p1), (Class::Success, None));
    // Number bound to another peer; peer bound to another number.
    assert_eq!(h.bind(&ft, 0x4001, p2), (Class::Error, Some(400)));
    assert_eq!(h.bind(&ft, 0x4002, p1), (Class::Error, Some(400)));
    // Refresh of an existing binding is fine; a third channel exceeds the quota of 2.
    assert_eq!(h.bind(&ft, 0x4001, p1), (Class::Success, None));
    assert_eq!(h.bind(&ft, 0x4003, p2), (Class::Error, Some(508)));
    // Missing attributes.
    assert_eq!(
        h.authed(&ft, method::CHANNEL_BIND, |_| {}),
        (Class::Error, Some(400))
    );
}

#[test]
fn channel_expires_after_600_seconds_and_permission_after_300() {
    let mut h = Harness::new();
    let ft = client(1);
    let relay = h.allocate(&ft);
    h.refresh(&ft, 3600);
    let p = peer("198.51.100.1:5000");
    h.bind(&ft, 0x4000, p);
    let frame = [0x40, 0x00, 0x00, 0x01, 7, 0, 0, 0];
    h.advance(299);
    assert!(matches!(h.send(&ft, &frame), ClientAction::ToPeer { .. }));
    // The permission the binding installed lapses at 300 s unless refreshed.
    h.advance(1);
    assert_eq!(h.send(&ft, &frame), ClientAction::Drop);
    h.permit(&ft, p);
    assert!(matches!(h.send(&ft, &frame), ClientAction::ToPeer { .. }));
    h.advance(300);
    assert_eq!(
        h.send(&ft, &frame),
        ClientAction::Drop,
        "channel expired at 600 s"
    );
    assert!(h.peer_sends(relay, p, b"x").is_none());
    h.permit(&ft, p);
    let (_, back) = h.peer_sends(relay, p, b"x").unwrap();
    assert!(
        codec::is_stun(&back),
        "no channel any more: Data indication"
    );
}

#[test]
fn retransmitted_create_permission_gets_the_cached_answer() {
    let mut h = Harness::new();
    let ft = client(1);
    h.allocate(&ft);
    let nonce = h.nonce(&ft);
    let req = h.request(
        method::CREATE_PERMISSION,
        [0x55; 12],
        &alice(),
        &nonce,
        |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer("198.51.100.1:1"));
        },
    );
    h.call(&ft, &req);
    let first = h.reply.clone();
    h.call(&ft, &req);
    assert_eq!(h.reply, first);
}

#[test]
fn bandwidth_cap_drops_excess() {
    let mut l = limits();
    l.bandwidth_bytes_per_sec = 1000;
    let mut h = Harness::with(config(l, false, false));
    let ft = client(1);
    h.allocate(&ft);
    h.bind(&ft, 0x4000, peer("198.51.100.1:5000"));
    let mut frame = vec![0x40, 0x00, 0x01, 0xF4];
    frame.resize(4 + 500, 0);
    assert!(matches!(h.send(&ft, &frame), ClientAction::ToPeer { .. }));
    assert!(matches!(h.send(&ft, &frame), ClientAction::ToPeer { .. }));
    assert_eq!(h.send(&ft, &frame), ClientAction::Drop);
    assert_eq!(h.core.stats().dropped_bandwidth, 1);
    h.advance(1);
    assert!(matches!(h.send(&ft, &frame), ClientAction::ToPeer { .. }));
}

#[test]
fn late_peer_packet_for_ended_allocation_is_dropped() {
    let mut h = Harness::new();
    let ft = client(1);
    h.allocate(&ft);
    let p = peer("198.51.100.1:5000");
    h.permit(&ft, p);
    let id = *h.core.relays().open.keys().next().unwrap();
    h.refresh(&ft, 0);
    // The slot is reused by a new allocation; the old id's generation no longer matches.
    h.allocate(&client(2));
    let mut buf = vec![0u8; HEADROOM + 1 + TAILROOM];
    assert_eq!(
        h.core
            .handle_peer(h.now, id, p, &mut buf, HEADROOM, HEADROOM + 1),
        PeerAction::Drop
    );
}

#[test]
fn malformed_and_random_datagrams_never_panic_and_leave_the_core_serving() {
    let mut h = Harness::new();
    let ft = client(1);
    let relay = h.allocate(&ft);
    h.bind(&ft, 0x4000, peer("198.51.100.1:5000"));
    let mut s = 0x1234_5678_9ABC_DEF1u64;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let nonce = h.nonce(&ft);
    let valid = h.request(method::CREATE_PERMISSION, [9; 12], &alice(), &nonce, |w| {
        w.xor_address(attr::XOR_PEER_ADDRESS, peer("198.51.100.3:1"))
            .attr(attr::LIFETIME, &[0, 0, 1, 0]);
    });
    for i in 0..50_000 {
        let mut b = match i % 3 {
            0 => valid.clone(),
            1 => vec![0x40, 0x00, 0x00, 0x08, 1, 2, 3, 4, 5, 6, 7, 8],
            _ => (0..(rnd() % 64) as usize).map(|_| rnd() as u8).collect(),
        };
        for _ in 0..(rnd() % 4) {
            if !b.is_empty() {
                let j = rnd() as usize % b.len();
                b[j] = rnd() as u8;
            }
        }
        let cut = rnd() as usize % (b.len() + 1);
        b.truncate(cut);
        let from = client(1 + (rnd() % 3) as u16);
        let _ = h.send(&from, &b);
    }
    // Still serving: the allocation works and a new client can bind.
    assert!(h
        .peer_sends(relay, peer("198.51.100.1:5000"), b"ok")
        .is_some());
    let mut req = Vec::new();
    MessageWriter::new(&mut req, method::BINDING, Class::Request, [1; 12]);
    assert_eq!(h.call(&client(9), &req), (Class::Success, None));
}

#[test]
fn relay_ids_are_unique_and_all_closed_on_close_all() {
    let mut h = Harness::new();
    for port in 1..=3u16 {
        let user = if port == 3 {
            creds("bob", "builder")
        } else {
            alice()
        };
        h.allocate_with(&client(port), &user, |_| {});
    }
    let ids: HashSet<RelayId> = h.core.relays().open.keys().copied().collect();
    assert_eq!(ids.len(), 3);
    let now = h.now;
    h.core.close_all(now, EndReason::Shutdown);
    assert!(h.core.relays().open.is_empty());
    assert_eq!(h.shared.total_allocations(), 0);
}

#[test]
fn draining_refuses_new_allocations_and_keeps_existing_ones() {
    let mut h = Harness::new();
    let ft = client(1);
    let relay = h.allocate(&ft);
    h.permit(&ft, peer("198.51.100.1:5000"));
    h.core.set_draining(true);
    assert_eq!(
        h.allocate_with(&client(2), &alice(), |_| {}),
        (Class::Error, Some(508))
    );
    assert!(h
        .peer_sends(relay, peer("198.51.100.1:5000"), b"x")
        .is_some());
    assert_eq!(h.refresh(&ft, 600), (Class::Success, None));
}

#[test]
fn sessions_list_kill_and_end_user() {
    let mut h = Harness::new();
    h.allocate(&client(1));
    h.allocate_with(&client(2), &rest("gina", UNIX0 + 60, SECRET), |_| {});
    h.allocate_with(&client(3), &rest("gina", UNIX0 + 90, SECRET), |_| {});
    h.permit(&client(1), peer("198.51.100.1:1"));
    let now = h.now;
    let sessions = h.core.sessions(now);
    assert_eq!(sessions.len(), 3);
    let alice_session = sessions.iter().find(|s| s.username == "alice").unwrap();
    assert_eq!((alice_session.permissions, alice_session.channels), (1, 0));
    assert_eq!(alice_session.client, client(1).client);
    // REST users are ended by their user part, whatever the expiry in the username.
    assert_eq!(h.core.end_user("gina", now, EndReason::Revoked), 2);
    assert_eq!(h.core.allocation_count(), 1);
    assert!(h
        .core
        .end_session(alice_session.slot, alice_session.gen, now, EndReason::Admin));
    assert!(!h
        .core
        .end_session(alice_session.slot, alice_session.gen, now, EndReason::Admin));
    assert_eq!(h.core.allocation_count(), 0);
    assert_eq!(h.shared.total_allocations(), 0);
}

#[test]
fn one_to_one_nat_peer_at_our_external_address_reaches_the_local_relay() {
    // A cloud VM: relay sockets bind 192.0.2.10, clients are told 203.0.113.50.
    let mut cfg = config(limits(), false, false);
    let local: IpAddr = "192.0.2.10".parse().unwrap();
    let external: IpAddr = "203.0.113.50".parse().unwrap();
    cfg.relay_v4 = Some(RelayAddress {
        local,
        advertised: external,
    });
    cfg.policy = PeerPolicy::new(PolicyConfig {
        relay_ips: vec![local],
        external_ips: vec![(external, local)],
        relay_ports: (49152, 65535),
        ..PolicyConfig::default()
    });
    let mut h = Harness::with(cfg);
    let (a, b) = (client(1), client(2));
    let advertised_a = h.allocate(&a);
    let advertised_b = h.allocate(&b);
    assert_eq!(advertised_b.ip(), external);
    // a only knows b's advertised address; the core sends to b's local socket instead of
    // relying on the cloud NAT to hairpin.
    assert_eq!(h.bind(&a, 0x4000, advertised_b), (Class::Success, None));
    assert_eq!(h.permit(&b, advertised_a), (Class::Success, None));
    let local_b = SocketAddr::new(local, advertised_b.port());
    let local_a = SocketAddr::new(local, advertised_a.port());
    // Both relays are this core's: the datagram is b's reply at once, no kernel hop (and no
    // hairpin through the cloud's NAT).
    assert_eq!(
        h.send(&a, &[0x40, 0x00, 0x00, 0x01, 7, 0, 0, 0]),
        ClientAction::Reply { to: b }
    );
    // What b's relay receives from a's local socket is shown to b as a's advertised address.
    let m = Message::parse(&h.reply).unwrap();
    assert_eq!(m.get(attr::DATA).unwrap().value, [7]);
    // Had a's datagram come through the kernel, b would have seen the same.
    let (to, frame) = h.peer_sends(local_b, local_a, b"hi").unwrap();
    assert_eq!(to, b);
    let m = Message::parse(&frame).unwrap();
    let from = m.get(attr::XOR_PEER_ADDRESS).unwrap();
    assert_eq!(
        codec::decode_xor_address(from.value, &m.transaction_id()),
        Some(advertised_a)
    );
}

// ------------------------------------------------------------------ hardening (issue 7)

fn client_at(ip: &str, port: u16) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::new(ip.parse().unwrap(), port),
        ..client(port)
    }
}

#[test]
fn embedded_ipv4_spellings_of_our_relay_address_reach_only_live_relay_ports() {
    let mut h = Harness::new();
    let ft = client(1);
    assert_eq!(
        h.allocate_with(&ft, &alice(), |w| {
            w.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
        }),
        (Class::Success, None)
    );
    // 192.0.2.10 is the IPv4 relay address; 60000 is in the relay range but not open.
    for spelling in [
        "192.0.2.10:60000",
        "[::ffff:192.0.2.10]:60000",
        "[64:ff9b::c000:20a]:60000",
        "[2002:c000:20a::]:60000",
        "[::c000:20a]:60000",
    ] {
        assert_eq!(
            h.permit(&ft, peer(spelling)),
            (Class::Error, Some(403)),
            "CreatePermission {spelling}"
        );
        assert_eq!(
            h.bind(&ft, 0x4001, peer(spelling)),
            (Class::Error, Some(403)),
            "ChannelBind {spelling}"
        );
        assert_eq!(
            h.send_indication(&ft, peer(spelling), b"x"),
            ClientAction::Drop,
            "Send {spelling}"
        );
    }
    // A live relay port stays a peer, however it is spelt.
    let other = h.allocate(&client(2));
    let mapped = SocketAddr::new("::ffff:192.0.2.10".parse().unwrap(), other.port());
    assert_eq!(h.permit(&ft, mapped), (Class::Success, None));
}

#[test]
fn other_host_addresses_are_never_peers() {
    let mut h = Harness::new();
    let ft = client(1);
    h.allocate(&ft);
    // 192.0.2.99 is another address of this host (see `config`): our wildcard listener,
    // the API and anything else running here answer on it.
    for p in [
        "192.0.2.99:3478",
        "192.0.2.99:60000",
        "[::ffff:192.0.2.99]:22",
    ] {
        assert_eq!(h.permit(&ft, peer(p)), (Class::Error, Some(403)), "{p}");
    }
}

#[test]
fn unauthenticated_reply_limit_holds_across_shards() {
    let mut l = limits();
    l.unauth_replies_per_sec = 20;
    l.unauth_replies_burst = 40;
    let cfg = Arc::new(config(l, false, false));
    let t0 = Instant::now();
    let shared = Arc::new(Shared::new([9; 32], 600, t0, UNIX0));
    let mut shards: Vec<Core> = (0..8)
        .map(|i| Core::new(Arc::clone(&cfg), Arc::clone(&shared), i))
        .collect();
    let mut req = Vec::new();
    MessageWriter::new(&mut req, method::ALLOCATE, Class::Request, [1; 12])
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    let mut reply = Vec::new();
    let mut replies = 0;
    // One address over 256 source ports, which the kernel spreads over the shards.
    for port in 0..256u16 {
        for _ in 0..4 {
            let ft = client(1000 + port);
            let shard = &mut shards[port as usize % 8];
            if shard.handle_client(t0, &ft, &req, &mut reply) != ClientAction::Drop {
                replies += 1;
            }
        }
    }
    assert_eq!(replies, 40);
    // The rate applies in total too: one second later, 20 more.
    let t1 = t0 + Duration::from_secs(1);
    let mut later = 0;
    for port in 0..256u16 {
        let shard = &mut shards[port as usize % 8];
        if shard.handle_client(t1, &client(port), &req, &mut reply) != ClientAction::Drop {
            later += 1;
        }
    }
    assert_eq!(later, 20);
}

#[test]
fn refresh_keeps_one_timer_entry_and_delete_frees_it() {
    let mut h = Harness::new();
    let ft = client(1);
    h.allocate(&ft);
    let nonce = h.nonce(&ft);
    for _ in 0..20_000 {
        let txid = h.txid();
        let req = h.request(method::REFRESH, txid, &alice(), &nonce, |w| {
            w.u32_attr(attr::LIFETIME, 600);
        });
        assert_eq!(h.call(&ft, &req), (Class::Success, None));
    }
    assert_eq!(h.core.timers.len(), 1);
    assert_eq!(h.refresh(&ft, 0), (Class::Success, None));
    assert_eq!(h.core.timers.len(), 0);
    assert_eq!(h.core.poll_timeout(), None);
}

#[test]
fn allocate_with_lifetime_zero_gets_the_default_lifetime() {
    let mut h = Harness::new();
    assert_eq!(
        h.allocate_with(&client(1), &alice(), |w| {
            w.u32_attr(attr::LIFETIME, 0);
        }),
        (Class::Success, None)
    );
    assert_eq!(h.reply_attr(attr::LIFETIME).unwrap(), 600u32.to_be_bytes());
    assert_eq!(h.core.poll_timeout(), Some(h.t0 + Duration::from_secs(600)));
}

fn reserve(h: &mut Harness, ft: &FiveTuple, c: &Creds) -> Vec<u8> {
    assert_eq!(
        h.allocate_with(ft, c, |w| {
            w.attr(attr::EVEN_PORT, &[0x80]);
        }),
        (Class::Success, None)
    );
    h.reply_attr(attr::RESERVATION_TOKEN).unwrap()
}

#[test]
fn an_unclaimed_reservation_dies_with_its_allocation() {
    let mut l = limits();
    l.allocations_per_user = 10;
    l.total_allocations = 10;
    let mut h = Harness::with(config(l, false, true));
    let alice_key = QuotaKey::per_source("alice", client(1).client.ip());
    for round in 0..50 {
        let ft = client(1);
        let token = reserve(&mut h, &ft, &alice());
        assert_eq!(h.shared.reserved_ports(), 1);
        assert_eq!(h.shared.quotas().held_by(&alice_key), 2, "round {round}");
        assert_eq!(h.refresh(&ft, 0), (Class::Success, None));
        assert_eq!(h.shared.reserved_ports(), 0);
        assert_eq!(h.shared.total_allocations(), 0);
        assert!(h.core.relays().reserved.is_empty());
        // The token died with it.
        assert_eq!(
            h.allocate_with(&client(2), &creds("bob", "builder"), |w| {
                w.attr(attr::RESERVATION_TOKEN, &token);
            }),
            (Class::Error, Some(508))
        );
    }
    assert_eq!(h.core.relays().dropped_reservations.len(), 50);
}

#[test]
fn an_unclaimed_reservation_expires_after_30_seconds_and_its_allocation_lives_on() {
    let mut h = Harness::new();
    let ft = client(1);
    let token = reserve(&mut h, &ft, &alice());
    assert_eq!(h.core.poll_timeout(), Some(h.t0 + RESERVATION_LIFETIME));
    h.advance(31);
    assert_eq!(h.shared.reserved_ports(), 0);
    assert_eq!(h.shared.total_allocations(), 1);
    assert_eq!(h.core.allocation_count(), 1);
    assert_eq!(h.core.timers.len(), 1);
    assert_eq!(h.core.poll_timeout(), Some(h.t0 + Duration::from_secs(600)));
    assert_eq!(
        h.allocate_with(&client(2), &creds("bob", "builder"), |w| {
            w.attr(attr::RESERVATION_TOKEN, &token);
        }),
        (Class::Error, Some(508))
    );
}

#[test]
fn a_reservation_counts_against_the_quota_until_claimed() {
    // limits(): two allocations per user. The reservation takes alice's second unit.
    let mut h = Harness::new();
    let token = reserve(&mut h, &client(1), &alice());
    assert_eq!(
        h.allocate_with(&client(2), &alice(), |_| {}),
        (Class::Error, Some(486))
    );
    // Bob claims it: the unit moves from alice's reservation to bob's allocation.
    assert_eq!(
        h.allocate_with(&client(3), &creds("bob", "builder"), |w| {
            w.attr(attr::RESERVATION_TOKEN, &token);
        }),
        (Class::Success, None)
    );
    assert_eq!(h.shared.reserved_ports(), 0);
    assert_eq!(h.shared.total_allocations(), 2);
    // Ending alice's allocation now leaves bob's claimed socket alone.
    assert_eq!(h.refresh(&client(1), 0), (Class::Success, None));
    assert!(h.core.relays().dropped_reservations.is_empty());
    assert_eq!(h.core.allocation_count(), 1);
}

#[test]
fn static_users_count_per_source_rest_users_across_sources() {
    let mut l = limits();
    l.total_allocations = 100;
    let mut h = Harness::with(config(l, false, false));
    // limits(): two per user. A static user is counted per source address.
    for (i, ip) in ["203.0.113.1", "203.0.113.2", "203.0.113.3"]
        .iter()
        .enumerate()
    {
        for port in 0..2u16 {
            let ft = client_at(ip, 100 * i as u16 + port);
            assert_eq!(
                h.allocate_with(&ft, &alice(), |_| {}),
                (Class::Success, None)
            );
        }
        let ft = client_at(ip, 100 * i as u16 + 50);
        assert_eq!(
            h.allocate_with(&ft, &alice(), |_| {}),
            (Class::Error, Some(486)),
            "{ip}"
        );
    }
    // A REST user part is one count wherever it comes from.
    let frank = rest("frank", UNIX0 + 60, SECRET);
    assert_eq!(
        h.allocate_with(&client_at("198.51.100.1", 1), &frank, |_| {}),
        (Class::Success, None)
    );
    assert_eq!(
        h.allocate_with(&client_at("198.51.100.2", 1), &frank, |_| {}),
        (Class::Success, None)
    );
    assert_eq!(
        h.allocate_with(&client_at("198.51.100.3", 1), &frank, |_| {}),
        (Class::Error, Some(486))
    );
}

#[test]
fn failed_relay_opens_are_logged_once_a_minute() {
    let t0 = Instant::now();
    let mut throttle = LogThrottle::default();
    assert_eq!(throttle.should_log(t0), Some(0));
    for s in 1..60 {
        assert_eq!(throttle.should_log(t0 + Duration::from_secs(s)), None);
    }
    assert_eq!(throttle.should_log(t0 + Duration::from_secs(60)), Some(59));
    assert_eq!(throttle.should_log(t0 + Duration::from_secs(61)), None);
}

#[path = "soak_tests.rs"]
mod soak;

#[test]
fn a_peer_payload_too_long_for_a_channel_data_length_is_dropped() {
    let mut h = Harness::new();
    let ft = client(1);
    let relay = h.allocate(&ft);
    let p = peer("198.51.100.1:4000");
    assert_eq!(h.bind(&ft, 0x4000, p), (Class::Success, None));
    assert!(h.peer_sends(relay, p, &vec![7u8; 65_535]).is_some());
    assert!(h.peer_sends(relay, p, &vec![7u8; 65_536]).is_none());
    assert_eq!(h.core.stats().dropped_malformed, 1);
}

#[test]
fn a_send_indication_with_an_unknown_comprehension_required_attribute_is_discarded() {
    let mut h = Harness::new();
    let ft = client(1);
    h.allocate(&ft);
    let p = peer("198.51.100.1:4000");
    assert_eq!(h.permit(&ft, p), (Class::Success, None));
    let mut buf = Vec::new();
    MessageWriter::new(&mut buf, method::SEND, Class::Indication, [3; 12])
        .xor_address(attr::XOR_PEER_ADDRESS, p)
        .attr(attr::DATA, b"hello")
        .attr(0x0077, b"?");
    assert_eq!(h.send(&ft, &buf), ClientAction::Drop);
    // DONT-FRAGMENT is understood, and a comprehension-optional unknown is ignored.
    let mut buf = Vec::new();
    MessageWriter::new(&mut buf, method::SEND, Class::Indication, [4; 12])
        .xor_address(attr::XOR_PEER_ADDRESS, p)
        .attr(attr::DATA, b"hello")
        .attr(attr::DONT_FRAGMENT, b"")
        .attr(0x8077, b"?");
    assert!(matches!(h.send(&ft, &buf), ClientAction::ToPeer { .. }));
}

#[test]
fn a_retransmitted_allocate_gets_its_success_even_after_later_requests() {
    let mut h = Harness::new();
    let ft = client(1);
    let nonce = h.nonce(&ft);
    let txid = h.txid();
    let allocate = h.request(method::ALLOCATE, txid, &alice(), &nonce, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert_eq!(h.call(&ft, &allocate), (Class::Success, None));
    let first = h.reply.clone();
    assert_eq!(
        h.permit(&ft, peer("198.51.100.1:4000")),
        (Class::Success, None)
    );
    assert_eq!(h.refresh(&ft, 600), (Class::Success, None));
    // The success was lost: the client retransmits its Allocate, unchanged.
    assert_eq!(h.call(&ft, &allocate), (Class::Success, None));
    assert_eq!(h.reply, first);
    assert_eq!(h.core.allocation_count(), 1);
    // A new Allocate on the same 5-tuple is still a mismatch.
    assert_eq!(
        h.allocate_with(&ft, &alice(), |_| {}),
        (Class::Error, Some(437))
    );
}

#[test]
fn a_request_with_attributes_after_message_integrity_is_answered() {
    let mut h = Harness::new();
    let ft = client(1);
    h.allocate(&ft);
    let nonce = h.nonce(&ft);
    let txid = h.txid();
    let mut req = h.request(method::REFRESH, txid, &alice(), &nonce, |w| {
        w.u32_attr(attr::LIFETIME, 600);
    });
    // SOFTWARE appended after MESSAGE-INTEGRITY (RFC 8489 §14.5: ignored, not fatal).
    req.extend_from_slice(&attr::SOFTWARE.to_be_bytes());
    req.extend_from_slice(&[0, 4]);
    req.extend_from_slice(b"late");
    let len = u16::from_be_bytes([req[2], req[3]]) + 8;
    req[2..4].copy_from_slice(&len.to_be_bytes());
    assert_eq!(h.call(&ft, &req), (Class::Success, None));
}

#[path = "scenario_tests.rs"]
mod scenarios;

#[path = "tcp_relay_tests.rs"]
mod tcp_relays;

#[path = "relay_to_relay_tests.rs"]
mod relay_to_relay;

#[test]
fn usage_records_count_what_each_allocation_carried_once_turned_on() {
    let mut h = Harness::new();
    let (a, b) = (client(5001), client(5002));
    let p = peer("198.51.100.1:4000");
    // Off by default: nothing is queued.
    h.allocate(&b);
    h.advance(1);
    assert_eq!(h.refresh(&b, 0), (Class::Success, None));
    assert_eq!(h.core.poll_usage(), None);

    h.core.set_usage_records(true);
    let relay = h.allocate(&a);
    let start = UNIX0 + 1;
    assert_eq!(h.bind(&a, 0x4000, p), (Class::Success, None));
    for payload in [&b"12345"[..], b"123"] {
        let mut frame = 0x4000u16.to_be_bytes().to_vec();
        frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        frame.extend_from_slice(payload);
        assert!(matches!(h.send(&a, &frame), ClientAction::ToPeer { .. }));
    }
    assert!(h.peer_sends(relay, p, b"back").is_some());
    h.advance(30);
    h.core.interim_usage(h.now);
    let interim = h.core.poll_usage().expect("an interim record");
    assert_eq!(h.core.poll_usage(), None, "one per live allocation");
    assert_eq!(interim.kind, UsageKind::Interim);
    assert_eq!((interim.start_unix, interim.at_unix), (start, start + 30));
    h.advance(10);
    assert_eq!(h.refresh(&a, 0), (Class::Success, None));
    let end = h.core.poll_usage().expect("an end record");
    assert_eq!(end.kind, UsageKind::End(EndReason::DeletedByClient));
    assert_eq!(end.id, interim.id);
    assert_eq!(&*end.user, "alice");
    assert_eq!((end.client, end.transport), (a.client, Transport::Udp));
    assert_eq!(end.relays, vec![relay]);
    assert_eq!((end.start_unix, end.at_unix), (start, start + 40));
    let c = end.counters;
    assert_eq!((c.to_peer_packets, c.to_peer_bytes), (2, 8));
    assert_eq!((c.to_client_packets, c.to_client_bytes), (1, 4));
    // Every allocation has its own id.
    let other = h.allocate(&client(5003));
    h.advance(600);
    let expired = h.core.poll_usage().expect("expiry ends it");
    assert_eq!(expired.kind, UsageKind::End(EndReason::Expired));
    assert_eq!(expired.relays, vec![other]);
    assert_ne!(expired.id, end.id);
}
