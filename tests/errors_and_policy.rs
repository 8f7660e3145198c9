//! Error codes, peer policy, quotas and robustness, seen from a raw STUN client on the wire.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{
    field, rest_credential, unix_now, Daemon, Options, Reply, TurnClient, REST_MAX_TTL_SECS,
};
use turnpike::proto::codec::{attr, decode_address, method, Class, MessageWriter, MAGIC_COOKIE};
use turnpike::proto::discovery::ChangeRequest;

const CHANNEL: u16 = 0x4000;

/// A strict client ([`TurnClient::new_strict`]): these tests look at the wire, so every
/// challenge is checked in full and a 438 reaches the test.
fn client(d: &Daemon, user: &str, password: &str) -> TurnClient {
    TurnClient::new_strict(d.addr, user, password)
}

fn static_user(d: &Daemon) -> TurnClient {
    client(d, common::USER, common::PASSWORD)
}

/// A peer socket the test drives by hand.
struct Peer(UdpSocket);

impl Peer {
    fn new() -> Peer {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        Peer(s)
    }
    fn addr(&self) -> SocketAddr {
        self.0.local_addr().unwrap()
    }
    fn recv(&self) -> Option<(Vec<u8>, SocketAddr)> {
        let mut buf = vec![0u8; 2048];
        let (n, from) = self.0.recv_from(&mut buf).ok()?;
        Some((buf[..n].to_vec(), from))
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn no_loopback() -> Options {
    Options {
        allow_loopback_peers: false,
        ..Options::default()
    }
}

/// Relays client → peer by Send indication, peer → client as a Data indication, then binds
/// a channel and does the same with ChannelData both ways. Checks sources and contents.
fn relay_round_trip(c: &mut TurnClient, relayed: SocketAddr) {
    let peer = Peer::new();
    assert_eq!(c.permit(peer.addr()).class_code(), (Class::Success, None));
    c.send_indication(peer.addr(), b"via send indication");
    let (got, from) = peer
        .recv()
        .expect("peer receives the Send indication's data");
    assert_eq!(
        (got.as_slice(), from),
        (&b"via send indication"[..], relayed)
    );
    peer.0.send_to(b"data indication back", relayed).unwrap();
    let ind = Reply(c.recv(Duration::from_secs(2)).expect("Data indication"));
    let m = ind.msg();
    assert_eq!((m.method, m.class), (method::DATA, Class::Indication));
    assert_eq!(ind.xor_addr(attr::XOR_PEER_ADDRESS), peer.addr());
    assert_eq!(ind.attr(attr::DATA).unwrap(), b"data indication back");

    assert_eq!(
        c.bind_channel(CHANNEL, peer.addr()).class_code(),
        (Class::Success, None)
    );
    c.send_channel_data(CHANNEL, b"via channel");
    let (got, from) = peer.recv().expect("peer receives ChannelData payload");
    assert_eq!((got.as_slice(), from), (&b"via channel"[..], relayed));
    peer.0.send_to(b"channel back", relayed).unwrap();
    let frame = c.recv(Duration::from_secs(2)).expect("ChannelData back");
    assert_eq!(&frame[..2], &CHANNEL.to_be_bytes());
    assert_eq!(usize::from(u16::from_be_bytes([frame[2], frame[3]])), 12);
    assert_eq!(&frame[4..16], b"channel back");
}

// ------------------------------------------------------------------ authentication

#[test]
fn wrong_password_and_unknown_user_get_401() {
    let d = Daemon::start();
    let mut wrong = client(&d, common::USER, "not-the-password");
    let r = wrong.allocate();
    assert_eq!(r.class_code(), (Class::Error, Some(401)));
    assert!(r.attr(attr::NONCE).is_some(), "a 401 carries a fresh nonce");
    assert!(r.attr(attr::MESSAGE_INTEGRITY).is_none());
    assert_eq!(
        client(&d, "mallory", "x").allocate().class_code(),
        (Class::Error, Some(401))
    );
    assert!(d.events("allocation created").is_empty());

    // The same exchange with the right password succeeds: the 401s above were the password.
    let mut ok = static_user(&d);
    let relayed = ok.must_allocate();
    assert!((d.relay_ports.0..=d.relay_ports.1).contains(&relayed.port()));
    let created = d.wait_events("allocation created", 1, Duration::from_secs(2), |_| true);
    assert_eq!(field(&created[0], "client"), ok.local().to_string());
}

#[test]
fn nonce_is_bound_to_the_client_port() {
    let d = Daemon::start();
    let mut a = static_user(&d);
    a.challenge();
    let mut b = static_user(&d);
    b.nonce = a.nonce.clone();
    let r = b.allocate();
    assert_eq!(
        r.class_code(),
        (Class::Error, Some(438)),
        "another port's nonce is stale"
    );
    assert_ne!(
        r.attr(attr::NONCE).unwrap(),
        a.nonce,
        "438 hands out a fresh nonce"
    );
    b.nonce = r.attr(attr::NONCE).unwrap();
    b.must_allocate();
}

/// Instances behind one name with the same `auth.nonce_key_file`: a nonce from one is good on
/// the other (no 438 when a client's next request lands elsewhere), an instance without those
/// keys refuses it, and a rotation by reload keeps the old key verifying.
#[test]
fn instances_sharing_nonce_keys_accept_each_others_nonces_across_a_rotation() {
    let dir = common::TempDir::new("nonce-keys");
    let (k1, k2) = ("1".repeat(64), "2".repeat(64));
    let write = |name: &str, keys: &[&str]| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("# first issues\n{}\n", keys.join("\n"))).unwrap();
        path
    };
    let with_keys = |path: std::path::PathBuf| {
        Options::default().edit(move |c| c.auth.nonce_key_file = Some(path.clone()))
    };
    let a = Daemon::with(with_keys(write("a", &[&k1])));
    let b_keys = write("b", &[&k1]);
    let mut b = Daemon::with(with_keys(b_keys.clone()));
    let c = Daemon::start();

    // From one client socket (a nonce is bound to it): challenged by a, allocating on b.
    let mut client = static_user(&a);
    client.challenge();
    let from_a = client.nonce.clone();
    client.server = c.addr;
    let r = client.allocate();
    assert_eq!(
        r.class_code(),
        (Class::Error, Some(438)),
        "c has its own key"
    );
    client.server = b.addr;
    client.nonce = from_a;
    client.must_allocate();

    // Rotation on b: the new key first, the old one still verifying.
    std::fs::write(&b_keys, format!("{k2}\n{k1}\n")).unwrap();
    b.sighup();
    b.wait_log(Duration::from_secs(5), "the reload", |l| {
        l.contains("configuration reloaded")
    });
    let mut via_b = static_user(&b);
    via_b.challenge();
    let mut late = static_user(&a);
    late.challenge();
    // a still has only k1: b's new nonces are strangers there; a's are still good on b.
    via_b.server = a.addr;
    assert_eq!(via_b.allocate().class_code(), (Class::Error, Some(438)));
    late.server = b.addr;
    late.must_allocate();
}

#[test]
fn expired_rest_credential_gets_401() {
    let d = Daemon::start();
    let (user, pass) = rest_credential("carol", unix_now() - 60);
    assert_eq!(
        client(&d, &user, &pass).allocate().class_code(),
        (Class::Error, Some(401))
    );
    let (user, pass) = rest_credential("carol", unix_now() + 600);
    client(&d, &user, &pass).must_allocate();
}

#[test]
fn rest_expiry_beyond_max_ttl_gets_401() {
    let d = Daemon::start();
    let (user, pass) = rest_credential("dave", unix_now() + REST_MAX_TTL_SECS + 3600);
    assert_eq!(
        client(&d, &user, &pass).allocate().class_code(),
        (Class::Error, Some(401))
    );
    // Minted with a secret the daemon does not know: also 401.
    let user = format!("{}:dave", unix_now() + 600);
    let pass =
        turnpike::proto::auth::mint_rest_credential(b"some-other-secret-value", "dave", 0, ':').1;
    assert_eq!(
        client(&d, &user, &pass).allocate().class_code(),
        (Class::Error, Some(401))
    );
    let (user, pass) = rest_credential("dave", unix_now() + REST_MAX_TTL_SECS - 3600);
    client(&d, &user, &pass).must_allocate();
}

// ------------------------------------------------------------------ peer policy

#[test]
fn loopback_peers_are_forbidden_by_default() {
    let d = Daemon::with(no_loopback());
    let mut c = static_user(&d);
    let relayed = c.must_allocate();
    let peer = Peer::new();
    let mapped = SocketAddr::new("::ffff:127.0.0.1".parse().unwrap(), peer.addr().port());
    for p in [peer.addr(), mapped, sa("169.254.169.254:80"), d.addr] {
        assert_eq!(
            c.permit(p).class_code(),
            (Class::Error, Some(403)),
            "CreatePermission {p}"
        );
        assert_eq!(
            c.bind_channel(CHANNEL, p).class_code(),
            (Class::Error, Some(403)),
            "ChannelBind {p}"
        );
    }
    // Send indications take the same check: nothing reaches the loopback peer.
    c.send_indication(peer.addr(), b"must not arrive");
    peer.0
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(peer.recv().is_none(), "a denied peer received relayed data");
    // Our own relay addresses stay reachable (relay to relay), loopback or not.
    assert_eq!(c.permit(relayed).class_code(), (Class::Success, None));
}

#[test]
fn loopback_peers_open_with_allow_loopback_peers() {
    let d = Daemon::start();
    let mut c = static_user(&d);
    let relayed = c.must_allocate();
    relay_round_trip(&mut c, relayed);
    // Never-open ranges and the daemon's own listener stay closed.
    for p in [
        sa("169.254.169.254:80"),
        sa("[::ffff:169.254.169.254]:80"),
        sa("0.0.0.0:9"),
        d.addr,
    ] {
        assert_eq!(c.permit(p).class_code(), (Class::Error, Some(403)), "{p}");
    }
    // An IPv4-mapped spelling of loopback passes the policy (loopback is open) but this
    // allocation has no IPv6 relay to send from: Peer Address Family Mismatch.
    let mapped = sa("[::ffff:127.0.0.1]:9");
    assert_eq!(c.permit(mapped).class_code(), (Class::Error, Some(443)));
}

/// A client that sends data right after its CreatePermission succeeds (as ICE agents do) must
/// not lose it. Regression test: the shard once sent through tokio's `try_send_to`, which
/// refused (WouldBlock) on a relay socket the reactor had not polled yet, so data arriving in
/// the same wake as the Allocate was dropped.
#[test]
fn first_datagram_after_allocate_is_relayed() {
    let d = Daemon::start();
    let peer = Peer::new();
    peer.0
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut lost = Vec::new();
    for i in 0..20u8 {
        let mut c = static_user(&d);
        let relayed = c.must_allocate();
        assert_eq!(c.permit(peer.addr()).class_code(), (Class::Success, None));
        c.send_indication(peer.addr(), &[i; 8]);
        match peer.recv() {
            Some((data, from)) => assert_eq!((data, from), (vec![i; 8], relayed)),
            None => lost.push(i),
        }
        assert_eq!(c.refresh(0).class_code(), (Class::Success, None));
    }
    assert!(
        lost.is_empty(),
        "first datagram lost in rounds {lost:?} of 20"
    );
}

// ------------------------------------------------------------------ quotas and lifetime

#[test]
fn third_allocation_of_a_user_gets_486() {
    let d = Daemon::with(Options {
        allocations_per_user: 2,
        ..Options::default()
    });
    let mut first = static_user(&d);
    first.must_allocate();
    static_user(&d).must_allocate();
    let mut third = static_user(&d);
    let r = third.allocate();
    assert_eq!(r.class_code(), (Class::Error, Some(486)));
    // The 486 is authenticated: it proves the quota, not the credential, refused it.
    assert!(r.msg().verify_integrity(&third.key));
    // Other users are not affected by alice's quota.
    let (user, pass) = rest_credential("erin", unix_now() + 600);
    client(&d, &user, &pass).must_allocate();
    // Releasing one allocation frees a slot for the third client.
    assert_eq!(first.refresh(0).class_code(), (Class::Success, None));
    third.must_allocate();
}

#[test]
fn refresh_lifetime_zero_closes_the_relay_socket() {
    let d = Daemon::start();
    let mut c = static_user(&d);
    let relayed = c.must_allocate();
    assert_eq!(
        UdpSocket::bind(relayed).map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::AddrInUse),
        "the relay socket is open while the allocation lives"
    );
    let r = c.refresh(0);
    assert_eq!(r.class_code(), (Class::Success, None));
    assert_eq!(r.attr(attr::LIFETIME).unwrap(), [0, 0, 0, 0]);
    let ended = d.wait_events("allocation ended", 1, Duration::from_secs(2), |_| true);
    assert_eq!(field(&ended[0], "reason"), "deleted by client");
    assert_eq!(field(&ended[0], "relay"), relayed.to_string());

    // The port is released promptly (the shard closes the socket after the reply).
    let deadline = Instant::now() + Duration::from_secs(2);
    while UdpSocket::bind(relayed).is_err() {
        assert!(
            Instant::now() < deadline,
            "relay port {relayed} still bound"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The allocation is gone: requests on this 5-tuple are Allocation Mismatch.
    assert_eq!(
        c.permit(sa("127.0.0.1:9")).class_code(),
        (Class::Error, Some(437))
    );
    assert_eq!(c.refresh(600).class_code(), (Class::Error, Some(437)));
}

// ------------------------------------------------------------------ robustness

/// xorshift64*: reproducible junk without a dependency; the seed is printed on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const BURST: usize = 20_000;
const BURST_TIME: Duration = Duration::from_secs(20);

#[test]
fn garbage_burst_leaves_the_daemon_serving() {
    let d = Daemon::start();
    // A new seed per run widens coverage; TURNPIKE_JUNK_SEED=0x... replays a failing one.
    let seed = std::env::var("TURNPIKE_JUNK_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0x7e57_5eed ^ (u64::from(std::process::id()) << 16))
        | 1;
    eprintln!("junk seed {seed:#x} (replay with TURNPIKE_JUNK_SEED={seed:#x})");
    let mut rng = Rng(seed);

    // A live allocation with a permission and a channel, so junk also reaches the relay paths.
    let mut c = static_user(&d);
    let relayed = c.must_allocate();
    let peer = Peer::new();
    assert_eq!(c.permit(peer.addr()).class_code(), (Class::Success, None));
    assert_eq!(
        c.bind_channel(CHANNEL, peer.addr()).class_code(),
        (Class::Success, None)
    );

    // Well-formed templates to mutate.
    let mut templates = Vec::new();
    for m in [
        method::ALLOCATE,
        method::REFRESH,
        method::CREATE_PERMISSION,
        method::CHANNEL_BIND,
    ] {
        let mut req = Vec::new();
        let mut w = MessageWriter::new(&mut req, m, Class::Request, c.txid());
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .u32_attr(attr::LIFETIME, 600)
            .attr(attr::CHANNEL_NUMBER, &[0x40, 0x01, 0, 0])
            .xor_address(attr::XOR_PEER_ADDRESS, peer.addr());
        c.sign(&mut w).fingerprint();
        templates.push(req);
    }
    let mut ind = Vec::new();
    MessageWriter::new(&mut ind, method::SEND, Class::Indication, c.txid())
        .xor_address(attr::XOR_PEER_ADDRESS, peer.addr())
        .attr(attr::DATA, b"hello");
    templates.push(ind);
    let mut binding = Vec::new();
    MessageWriter::new(&mut binding, method::BINDING, Class::Request, c.txid()).fingerprint();
    templates.push(binding);

    // Junk comes from the allocation's own 5-tuple and from a few strangers.
    let strangers: Vec<UdpSocket> = (0..3)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let started = Instant::now();
    let mut sent = 0;
    while sent < BURST && started.elapsed() < BURST_TIME {
        let dgram: Vec<u8> = match rng.below(8) {
            0 => Vec::new(),
            1 => {
                let n = 1 + rng.below(1500);
                rng.bytes(n)
            }
            2 if rng.below(200) == 0 => rng.bytes(65_507), // the largest IPv4 UDP payload
            2 | 3 => {
                // A valid message with 1-4 bytes flipped.
                let mut m = templates[rng.below(templates.len())].clone();
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(m.len());
                    m[i] ^= 1 + rng.below(255) as u8;
                }
                m
            }
            4 => {
                let t = &templates[rng.below(templates.len())];
                t[..rng.below(t.len())].to_vec()
            }
            5 => {
                // ChannelData whose length field disagrees with the datagram.
                let ch = 0x4000 + rng.below(0x4000) as u16;
                let real = rng.below(300);
                let claimed = match rng.below(3) {
                    0 => real + 1 + rng.below(100),
                    1 => real.saturating_sub(1 + rng.below(4)),
                    _ => 0xFFFF,
                };
                let mut f = ch.to_be_bytes().to_vec();
                f.extend_from_slice(&(claimed as u16).to_be_bytes());
                f.extend(rng.bytes(real));
                f
            }
            6 => {
                // A STUN header that lies about its length, or an attribute that runs past the end.
                let mut m = templates[rng.below(templates.len())].clone();
                if rng.below(2) == 0 {
                    let l = rng.next() as u16;
                    m[2..4].copy_from_slice(&l.to_be_bytes());
                } else {
                    m[22..24].copy_from_slice(&0xFFFFu16.to_be_bytes());
                }
                m
            }
            _ => {
                // Random STUN-looking header with random attributes.
                let mut m = vec![0u8; 20];
                m[0] = (rng.next() as u8) & 0x3F;
                m[1] = rng.next() as u8;
                m[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                let words = rng.below(64);
                let body = rng.bytes(4 * words);
                m[2..4].copy_from_slice(&(body.len() as u16).to_be_bytes());
                m.extend(body);
                m
            }
        };
        let from = if rng.below(2) == 0 {
            &c.sock
        } else {
            &strangers[rng.below(3)]
        };
        // Loopback drops on a full socket buffer rather than blocking; a failed send is fine.
        let _ = from.send_to(&dgram, d.addr);
        sent += 1;
        if sent % 500 == 0 {
            // Let the daemon breathe so the junk is processed rather than dropped by the kernel.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    assert!(sent >= BURST / 2, "only {sent} datagrams in {BURST_TIME:?}");
    c.drain();
    peer.0
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    while peer.recv().is_some() {}

    let mut d = d;
    assert!(
        d.is_running(),
        "turnpike died under junk; stderr:\n{}",
        d.log()
    );
    assert!(
        !d.log().contains("panicked"),
        "a shard panicked:\n{}",
        d.log()
    );

    // Every shard still answers: SO_REUSEPORT spreads these 16 client ports over both shards.
    for _ in 0..16 {
        let mut probe = static_user(&d);
        let r = probe.binding().expect("Binding response");
        assert_eq!(r.class_code(), (Class::Success, None));
        assert_eq!(r.xor_addr(attr::XOR_MAPPED_ADDRESS), probe.local());
    }
    // The allocation the junk was aimed at still relays.
    c.send_channel_data(CHANNEL, b"still here");
    peer.0
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    assert_eq!(
        peer.recv().expect("relay after junk"),
        (b"still here".to_vec(), relayed)
    );
    // And a fresh client gets a working allocation.
    let mut fresh = static_user(&d);
    let fresh_relay = fresh.must_allocate();
    relay_round_trip(&mut fresh, fresh_relay);
}

/// A Binding request, with CHANGE-REQUEST when `change` is `Some((ip, port))`.
fn binding_request(txid: [u8; 12], change: Option<(bool, bool)>) -> Vec<u8> {
    let mut req = Vec::new();
    let mut w = MessageWriter::new(&mut req, method::BINDING, Class::Request, txid);
    if let Some((ip, port)) = change {
        let flags = ChangeRequest { ip, port }.encode();
        w.attr(attr::CHANGE_REQUEST, &flags);
    }
    req
}

fn address(r: &Reply, kind: u16) -> Option<SocketAddr> {
    r.attr(kind).and_then(|v| decode_address(&v))
}

/// RFC 5780 discovery as the I/O layer does it: each CHANGE-REQUEST answer really leaves from
/// the address RESPONSE-ORIGIN names (the kernel's source address, not only what the message
/// says), each of the four listeners answers from itself, TCP gets OTHER-ADDRESS and a 400 for a
/// change it cannot make, the discovery-only listeners refuse TURN, and no client may relay to
/// any of them.
#[test]
fn nat_discovery_answers_from_the_asked_address_and_its_listeners_are_no_peers() {
    let disc = common::Discovery::pick();
    let d = Daemon::with(disc.options());
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let me = sock.local_addr().unwrap();
    let mut n = 0u8;
    let mut ask = |to: SocketAddr, change: Option<(bool, bool)>| -> (SocketAddr, Reply) {
        n += 1;
        let txid = [n; 12];
        let mut buf = [0u8; 1500];
        sock.send_to(&binding_request(txid, change), to).unwrap();
        let (len, from) = sock.recv_from(&mut buf).expect("a Binding answer");
        assert_eq!(&buf[8..20], &txid, "answer to the request just sent");
        (from, Reply(buf[..len].to_vec()))
    };
    for (ip, port) in [(false, false), (true, false), (false, true), (true, true)] {
        let (from, r) = ask(disc.primary, Some((ip, port)));
        let case = format!("change ip={ip} port={port}");
        assert_eq!(r.class_code(), (Class::Success, None), "{case}");
        assert_eq!(from, disc.at(ip, port), "{case}: the datagram's source");
        assert_eq!(address(&r, attr::RESPONSE_ORIGIN), Some(from), "{case}");
        assert_eq!(
            address(&r, attr::OTHER_ADDRESS),
            Some(disc.alternate),
            "{case}"
        );
        assert_eq!(address(&r, attr::MAPPED_ADDRESS), Some(me), "{case}");
        assert_eq!(r.xor_addr(attr::XOR_MAPPED_ADDRESS), me, "{case}");
    }
    for (ip, port) in [(false, true), (true, false), (true, true)] {
        let listener = disc.at(ip, port);
        let (from, r) = ask(listener, None);
        assert_eq!(from, listener);
        assert_eq!(address(&r, attr::OTHER_ADDRESS), Some(disc.at(!ip, !port)));
        // TURN is for the configured listeners only.
        let mut req = Vec::new();
        MessageWriter::new(&mut req, method::ALLOCATE, Class::Request, [0xA0; 12])
            .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        sock.send_to(&req, listener).unwrap();
        let mut buf = [0u8; 1500];
        let (len, _) = sock.recv_from(&mut buf).unwrap();
        let refused = Reply(buf[..len].to_vec());
        assert_eq!(
            refused.class_code(),
            (Class::Error, Some(403)),
            "{listener}"
        );
    }

    // Over TCP: mapping discovery works on the alternate, a change is refused.
    let mut tcp = std::net::TcpStream::connect(disc.alternate).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut over_tcp = |change: Option<(bool, bool)>| -> Reply {
        use std::io::{Read, Write};
        tcp.write_all(&binding_request([0xB0; 12], change)).unwrap();
        let mut header = [0u8; 20];
        tcp.read_exact(&mut header).unwrap();
        let len = u16::from_be_bytes([header[2], header[3]]) as usize;
        let mut body = vec![0u8; len];
        tcp.read_exact(&mut body).unwrap();
        Reply([&header[..], &body].concat())
    };
    let r = over_tcp(None);
    assert_eq!(r.class_code(), (Class::Success, None));
    assert_eq!(address(&r, attr::RESPONSE_ORIGIN), Some(disc.alternate));
    assert_eq!(address(&r, attr::OTHER_ADDRESS), Some(disc.primary));
    assert_eq!(
        over_tcp(Some((true, false))).class_code(),
        (Class::Error, Some(400))
    );

    // Loopback peers are open in this daemon, yet its discovery listeners are not.
    let mut c = static_user(&d);
    c.must_allocate();
    for p in [disc.at(false, true), disc.at(true, false), disc.alternate] {
        assert_eq!(c.permit(p).class_code(), (Class::Error, Some(403)), "{p}");
    }
    let elsewhere = SocketAddr::new(disc.alternate.ip(), 9);
    assert_eq!(c.permit(elsewhere).class_code(), (Class::Success, None));
}

// ---------------------------------------------------------------------- TCP relays (RFC 6062)

/// A synchronous TURN client on one TCP (or TLS) connection to the server (long-term
/// credentials, MD5): a control connection, or a data connection until its ConnectionBind
/// succeeds.
struct TcpTurn<S = std::net::TcpStream> {
    s: S,
    key: Vec<u8>,
    nonce: Vec<u8>,
    n: u32,
    /// Indications that arrived while a response was awaited.
    indications: Vec<Reply>,
}

impl TcpTurn {
    fn open(server: SocketAddr) -> TcpTurn {
        let s = std::net::TcpStream::connect(server).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        TcpTurn::over(s)
    }
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

impl TcpTurn<TlsStream> {
    /// Over TLS, trusting the test CA in `ca`.
    fn open_tls(server: SocketAddr, ca: &std::path::Path) -> TcpTurn<TlsStream> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(ca).unwrap();
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let sock = std::net::TcpStream::connect(server).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        TcpTurn::over(rustls::StreamOwned::new(conn, sock))
    }
}

impl<S: std::io::Read + std::io::Write> TcpTurn<S> {
    fn over(s: S) -> TcpTurn<S> {
        let key = turnpike::proto::auth::long_term_key(
            turnpike::proto::auth::PasswordAlgorithm::Md5,
            common::USER,
            common::REALM,
            common::PASSWORD,
        );
        TcpTurn {
            s,
            key: key.as_bytes().to_vec(),
            nonce: Vec::new(),
            n: 0,
            indications: Vec::new(),
        }
    }

    fn txid(&mut self) -> [u8; 12] {
        self.n += 1;
        let mut t = [0x7C; 12];
        t[..4].copy_from_slice(&self.n.to_be_bytes());
        t
    }

    /// One STUN message from the stream (this client never receives ChannelData).
    fn read_message(&mut self) -> Reply {
        let mut head = [0u8; 20];
        self.s.read_exact(&mut head).expect("a STUN header");
        let len = u16::from_be_bytes([head[2], head[3]]) as usize;
        let mut msg = head.to_vec();
        msg.resize(20 + len, 0);
        self.s.read_exact(&mut msg[20..]).expect("a STUN body");
        Reply(msg)
    }

    fn transact(&mut self, req: &[u8]) -> Reply {
        self.s.write_all(req).unwrap();
        loop {
            let r = self.read_message();
            if r.class() != Class::Indication && r.0[8..20] == req[8..20] {
                return r;
            }
            self.indications.push(r);
        }
    }

    /// An authenticated request, fetching (or refreshing, on 438) the nonce as needed.
    fn request(&mut self, m: u16, fill: impl Fn(&mut MessageWriter)) -> Reply {
        if self.nonce.is_empty() {
            let mut req = Vec::new();
            MessageWriter::new(&mut req, m, Class::Request, self.txid());
            let r = self.transact(&req);
            assert_eq!(r.code(), Some(401), "unauthenticated request");
            self.nonce = r.attr(attr::NONCE).expect("NONCE in 401");
        }
        for _ in 0..2 {
            let mut req = Vec::new();
            let mut w = MessageWriter::new(&mut req, m, Class::Request, self.txid());
            fill(&mut w);
            w.attr(attr::USERNAME, common::USER.as_bytes())
                .attr(attr::REALM, common::REALM.as_bytes())
                .attr(attr::NONCE, &self.nonce)
                .integrity(&self.key);
            let r = self.transact(&req);
            if r.code() == Some(438) {
                self.nonce = r.attr(attr::NONCE).expect("NONCE in 438");
                continue;
            }
            return r;
        }
        panic!("stale nonce twice in a row");
    }

    fn allocate_tcp(&mut self, v6: bool) -> SocketAddr {
        let r = self.request(method::ALLOCATE, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]);
            if v6 {
                w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
            }
        });
        assert_eq!(r.class_code(), (Class::Success, None));
        r.xor_addr(attr::XOR_RELAYED_ADDRESS)
    }

    /// Binds this connection to `id`; afterwards it is a raw byte pipe.
    fn connection_bind(&mut self, id: &[u8]) -> Reply {
        self.request(method::CONNECTION_BIND, |w| {
            w.attr(attr::CONNECTION_ID, id);
        })
    }
}

fn tcp_daemon() -> Daemon {
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Daemon::with(Options::default().edit(move |c| c.tcp_listen = vec![listen]))
}

/// Reads until the peer closes (EOF or reset); false if it stays open past the timeout.
fn closes_within(s: &mut std::net::TcpStream, timeout: Duration) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn tcp_relay_connect_pipes_a_megabyte_to_a_tcp_echo_peer_and_back() {
    connect_pipes_a_megabyte_on("127.0.0.1");
}

#[test]
fn tcp_relay_connect_on_ipv6() {
    connect_pipes_a_megabyte_on("::1");
}

/// Client, server, relay and echo peer on `ip`.
fn connect_pipes_a_megabyte_on(ip: &'static str) {
    use std::io::{Read, Write};
    let listen = SocketAddr::new(ip.parse().unwrap(), 0);
    let d = Daemon::with(
        Options {
            ipv6: ip == "::1",
            ..Options::with_api()
        }
        .edit(move |c| c.tcp_listen = vec![listen]),
    );
    let server = d.tcp_addr.expect("a TCP listener");
    // The echo peer: one connection, everything back, until the relay closes it.
    let echo = std::net::TcpListener::bind((ip, 0)).unwrap();
    let echo_addr = echo.local_addr().unwrap();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, from) = echo.accept().unwrap();
        let mut buf = [0u8; 16 * 1024];
        let mut total = 0u64;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
            total += n as u64;
        }
        let _ = seen_tx.send((from, total));
    });

    let mut ctl = TcpTurn::open(server);
    let relayed = ctl.allocate_tcp(ip == "::1");
    assert_eq!(relayed.is_ipv6(), ip == "::1");
    let r = ctl.request(method::CONNECT, |w| {
        w.xor_address(attr::XOR_PEER_ADDRESS, echo_addr);
    });
    assert_eq!(r.class_code(), (Class::Success, None));
    assert!(
        r.msg().verify_integrity(&ctl.key),
        "signed like any response"
    );
    let id = r.attr(attr::CONNECTION_ID).expect("CONNECTION-ID");
    // A second Connect to the same peer: 446.
    let again = ctl.request(method::CONNECT, |w| {
        w.xor_address(attr::XOR_PEER_ADDRESS, echo_addr);
    });
    assert_eq!(again.class_code(), (Class::Error, Some(446)));

    let mut data = TcpTurn::open(server);
    assert_eq!(
        data.connection_bind(&id).class_code(),
        (Class::Success, None)
    );
    // From here on the data connection is the peer connection's other end.
    let payload: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut writer = data.s.try_clone().unwrap();
    let sent = payload.clone();
    let w = std::thread::spawn(move || writer.write_all(&sent).unwrap());
    let mut back = vec![0u8; payload.len()];
    data.s.read_exact(&mut back).expect("the echo comes back");
    w.join().unwrap();
    assert!(back == payload, "echoed bytes differ");
    // Closing the data connection closes the peer connection.
    drop(data);
    let (from, total) = seen_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the peer connection closed with the data connection");
    assert_eq!(from, relayed, "the peer sees the relayed address");
    assert_eq!(total, payload.len() as u64);
    // Counted once the pipe ends.
    let mib = payload.len() as f64;
    let timeout = Duration::from_secs(5);
    d.wait_metric(
        "turnpike_tcp_piped_bytes_total{direction=\"to_peer\"}",
        mib,
        timeout,
    );
    d.wait_metric(
        "turnpike_tcp_piped_bytes_total{direction=\"to_client\"}",
        mib,
        timeout,
    );
    assert_eq!(
        d.metric("turnpike_tcp_peer_connects_total{result=\"ok\"}"),
        1.0
    );
    // A ConnectionBind for a connection id that is gone: 400.
    let mut late = TcpTurn::open(server);
    assert_eq!(
        late.connection_bind(&id).class_code(),
        (Class::Error, Some(400))
    );
}

#[test]
fn tcp_relay_incoming_peer_needs_a_permission_and_is_announced() {
    use std::io::{Read, Write};
    let d = tcp_daemon();
    let server = d.tcp_addr.expect("a TCP listener");
    let mut ctl = TcpTurn::open(server);
    let relayed = ctl.allocate_tcp(false);
    // No permission: the relay closes the connection.
    let mut stranger = std::net::TcpStream::connect(relayed).unwrap();
    assert!(closes_within(&mut stranger, Duration::from_secs(5)));
    let r = ctl.request(method::CREATE_PERMISSION, |w| {
        w.xor_address(attr::XOR_PEER_ADDRESS, "127.0.0.1:9".parse().unwrap());
    });
    assert_eq!(r.class_code(), (Class::Success, None));
    assert!(
        ctl.indications.is_empty(),
        "nothing announced for the stranger"
    );

    let mut peer = std::net::TcpStream::connect(relayed).unwrap();
    peer.write_all(b"sent before the bind").unwrap();
    let attempt = ctl.read_message();
    assert_eq!(
        (attempt.class(), attempt.msg().method),
        (Class::Indication, method::CONNECTION_ATTEMPT)
    );
    assert_eq!(
        attempt.xor_addr(attr::XOR_PEER_ADDRESS),
        peer.local_addr().unwrap()
    );
    let id = attempt.attr(attr::CONNECTION_ID).expect("CONNECTION-ID");
    let mut data = TcpTurn::open(server);
    assert_eq!(
        data.connection_bind(&id).class_code(),
        (Class::Success, None)
    );
    let mut got = [0u8; 20];
    data.s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"sent before the bind");
    data.s.write_all(b"and back").unwrap();
    let mut got = [0u8; 8];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"and back");
    // The peer hangs up: the data connection closes with it.
    drop(peer);
    assert!(closes_within(&mut data.s, Duration::from_secs(5)));
    // Data connections land on whichever shard accepts them; the ones that land on the shard
    // that does not own their peer connection are moved there. Eight pairs: all on the owner
    // by chance once in 128 runs.
    let mut pairs = Vec::new();
    for i in 0..8u8 {
        let mut peer = std::net::TcpStream::connect(relayed).unwrap();
        let attempt = ctl.read_message();
        let id = attempt.attr(attr::CONNECTION_ID).expect("CONNECTION-ID");
        let mut data = TcpTurn::open(server);
        assert_eq!(
            data.connection_bind(&id).class_code(),
            (Class::Success, None)
        );
        peer.write_all(&[i; 100]).unwrap();
        data.s.write_all(&[i + 100; 100]).unwrap();
        pairs.push((peer, data, i));
    }
    for (mut peer, mut data, i) in pairs {
        let mut got = [0u8; 100];
        data.s.read_exact(&mut got).unwrap();
        assert_eq!(got, [i; 100]);
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, [i + 100; 100]);
    }
    // The allocation's end closes what is left: a second peer's unbound connection.
    let mut second = std::net::TcpStream::connect(relayed).unwrap();
    let _ = ctl.read_message();
    drop(ctl);
    assert!(closes_within(&mut second, Duration::from_secs(5)));
}

#[test]
fn a_tcp_relay_is_refused_to_a_udp_client() {
    let d = Daemon::start();
    let mut c = static_user(&d);
    c.challenge();
    let r = c.request(method::ALLOCATE, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]);
    });
    assert_eq!(r.class_code(), (Class::Error, Some(400)));
}

#[test]
fn tcp_relay_over_tls_control_and_data_connections() {
    use std::io::{Read, Write};
    let cert = common::TestCert::new();
    let d = Daemon::with(Options::default().edit(cert.listen_on("127.0.0.1")));
    let server = d.tls_addr.expect("a TLS listener");
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = echo.accept().unwrap();
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });

    let mut ctl = TcpTurn::open_tls(server, &cert.ca);
    let relayed = ctl.allocate_tcp(false);
    let r = ctl.request(method::CONNECT, |w| {
        w.xor_address(attr::XOR_PEER_ADDRESS, echo_addr);
    });
    assert_eq!(r.class_code(), (Class::Success, None));
    let id = r.attr(attr::CONNECTION_ID).expect("CONNECTION-ID");
    let mut data = TcpTurn::open_tls(server, &cert.ca);
    assert_eq!(
        data.connection_bind(&id).class_code(),
        (Class::Success, None)
    );
    // TLS records both ways from here on, through the pipe in plaintext to the peer.
    for round in 0..4u8 {
        let chunk: Vec<u8> = (0..16 * 1024).map(|i| (i as u8) ^ round).collect();
        data.s.write_all(&chunk).unwrap();
        let mut back = vec![0u8; chunk.len()];
        data.s.read_exact(&mut back).expect("the echo comes back");
        assert!(back == chunk, "round {round}");
    }

    // Incoming peers, each bound from a TLS data connection: some land on the other shard
    // and are moved there with their TLS session.
    let r = ctl.request(method::CREATE_PERMISSION, |w| {
        w.xor_address(attr::XOR_PEER_ADDRESS, "127.0.0.1:9".parse().unwrap());
    });
    assert_eq!(r.class_code(), (Class::Success, None));
    let mut pairs = Vec::new();
    for i in 0..6u8 {
        let mut peer = std::net::TcpStream::connect(relayed).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let attempt = ctl.read_message();
        assert_eq!(attempt.msg().method, method::CONNECTION_ATTEMPT);
        let id = attempt.attr(attr::CONNECTION_ID).expect("CONNECTION-ID");
        let mut data = TcpTurn::open_tls(server, &cert.ca);
        assert_eq!(
            data.connection_bind(&id).class_code(),
            (Class::Success, None)
        );
        peer.write_all(&[i; 100]).unwrap();
        data.s.write_all(&[i + 100; 100]).unwrap();
        pairs.push((peer, data, i));
    }
    for (mut peer, mut data, i) in pairs {
        let mut got = [0u8; 100];
        data.s.read_exact(&mut got).unwrap();
        assert_eq!(got, [i; 100]);
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, [i + 100; 100]);
    }
}
