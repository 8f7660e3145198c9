//! Two clients against one core in simulated time, with the I/O layer played by hand: every
//! command the core queues is asserted exactly, and answered (or failed) explicitly. The model is
//! quinn's two-endpoint `Pair` and firezone's command-sequence tests.

use super::*;
use crate::proto::server::{OpenRelay, OpenedRelay, RelayOpenError, RelaySource, RelayTransport};

const RELAY_IP: &str = "192.0.2.10";

struct Pair {
    core: Core,
    now: Instant,
    reply: Vec<u8>,
    txids: u32,
}

struct Client {
    ft: FiveTuple,
    creds: Creds,
    nonce: Vec<u8>,
}

impl Pair {
    fn new() -> Self {
        let t0 = Instant::now();
        let shared = Arc::new(Shared::new([9; 32], 600, t0, UNIX0));
        Pair {
            core: Core::new(Arc::new(config(limits(), false, true)), shared, 7),
            now: t0,
            reply: Vec::new(),
            txids: 0,
        }
    }

    fn txid(&mut self) -> [u8; 12] {
        self.txids += 1;
        let mut t = [0x5C; 12];
        t[..4].copy_from_slice(&self.txids.to_be_bytes());
        t
    }

    /// A client that has fetched its nonce from a 401 (which queues nothing).
    fn client(&mut self, port: u16, creds: Creds) -> Client {
        let ft = client(port);
        let mut req = Vec::new();
        MessageWriter::new(&mut req, method::ALLOCATE, Class::Request, self.txid());
        let action = self
            .core
            .handle_client(self.now, &ft, &req, &mut self.reply);
        assert_eq!(action, ClientAction::Reply { to: ft });
        assert_eq!(self.commands(), vec![]);
        let m = Message::parse(&self.reply).unwrap();
        let nonce = m.get(attr::NONCE).unwrap().value.to_vec();
        Client { ft, creds, nonce }
    }

    fn signed(&mut self, c: &Client, m: u16, fill: impl FnOnce(&mut MessageWriter)) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut w = MessageWriter::new(&mut buf, m, Class::Request, self.txid());
        fill(&mut w);
        w.attr(attr::USERNAME, c.creds.user.as_bytes())
            .attr(attr::REALM, REALM.as_bytes())
            .attr(attr::NONCE, &c.nonce)
            .integrity(&c.creds.key);
        buf
    }

    fn send(&mut self, c: &Client, bytes: &[u8]) -> ClientAction {
        self.core
            .handle_client(self.now, &c.ft, bytes, &mut self.reply)
    }

    fn commands(&mut self) -> Vec<Command> {
        std::iter::from_fn(|| self.core.poll_command()).collect()
    }

    /// The reply's class and error code.
    fn answer(&self) -> (Class, Option<u16>) {
        let m = Message::parse(&self.reply).unwrap();
        let code = m
            .get(attr::ERROR_CODE)
            .map(|e| e.value[2] as u16 * 100 + e.value[3] as u16);
        (m.class, code)
    }

    fn reply_addresses(&self, kind: u16) -> Vec<SocketAddr> {
        let m = Message::parse(&self.reply).unwrap();
        m.attributes()
            .filter(|a| a.kind == kind)
            .map(|a| codec::decode_xor_address(a.value, &m.transaction_id()).unwrap())
            .collect()
    }

    /// Sends an Allocate and returns the one OpenRelay it must queue, unanswered.
    fn allocate_until_open(
        &mut self,
        c: &Client,
        fill: impl FnOnce(&mut MessageWriter),
    ) -> OpenRelay {
        let req = self.signed(c, method::ALLOCATE, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
            fill(w);
        });
        assert_eq!(
            self.send(c, &req),
            ClientAction::Drop,
            "the answer waits for the socket"
        );
        match self.commands().as_slice() {
            [Command::OpenRelay(open)] => *open,
            other => panic!("expected one OpenRelay, got {other:?}"),
        }
    }

    fn opened(&mut self, open: &OpenRelay, port: u16, token: Option<u64>) -> ClientAction {
        let local = SocketAddr::new(RELAY_IP.parse().unwrap(), port);
        let result = Ok(OpenedRelay {
            local,
            reservation_token: token,
        });
        self.core
            .relay_opened(self.now, open.id, result, &mut self.reply)
    }

    /// A complete Allocate: the socket opened at `port`, the success read back.
    fn allocate(&mut self, c: &Client, port: u16) -> RelayId {
        let open = self.allocate_until_open(c, |_| {});
        assert_eq!(
            self.opened(&open, port, None),
            ClientAction::Reply { to: c.ft }
        );
        assert_eq!(self.answer(), (Class::Success, None));
        assert_eq!(
            self.commands(),
            vec![],
            "a granted Allocate queues nothing more"
        );
        open.id
    }

    fn advance(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
        self.core.handle_timeout(self.now);
    }
}

fn relay_addr(port: u16) -> SocketAddr {
    SocketAddr::new(RELAY_IP.parse().unwrap(), port)
}

#[test]
fn an_allocate_asks_for_one_socket_and_is_answered_when_it_is_in() {
    let mut p = Pair::new();
    let alice = p.client(1, self::alice());
    let open = p.allocate_until_open(&alice, |_| {});
    assert_eq!(
        open,
        OpenRelay {
            id: RelayId {
                slot: 0,
                gen: 0,
                v6: false
            },
            transport: RelayTransport::Udp,
            source: RelaySource::Bind {
                ip: RELAY_IP.parse().unwrap(),
                even_port: false,
                reserve_next: false,
            },
            dont_fragment: false,
        }
    );
    assert_eq!(
        p.core.allocation_count(),
        0,
        "nothing is granted before the socket"
    );
    assert_eq!(
        p.opened(&open, 50_000, None),
        ClientAction::Reply { to: alice.ft }
    );
    assert_eq!(p.answer(), (Class::Success, None));
    assert_eq!(
        p.reply_addresses(attr::XOR_RELAYED_ADDRESS),
        vec![relay_addr(50_000)]
    );
    assert_eq!(p.core.allocation_count(), 1);
    assert_eq!(p.commands(), vec![]);
}

#[test]
fn a_retransmitted_allocate_while_its_socket_opens_gets_the_one_answer() {
    let mut p = Pair::new();
    let alice = p.client(1, self::alice());
    let req = p.signed(&alice, method::ALLOCATE, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert_eq!(p.send(&alice, &req), ClientAction::Drop);
    let [Command::OpenRelay(open)] = p.commands()[..] else {
        panic!("one OpenRelay")
    };
    assert_eq!(p.send(&alice, &req), ClientAction::Drop);
    assert_eq!(
        p.commands(),
        vec![],
        "no second socket for a retransmission"
    );
    // Another Allocate on the same 5-tuple meanwhile is a mismatch.
    let other = p.signed(&alice, method::ALLOCATE, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    });
    assert_eq!(p.send(&alice, &other), ClientAction::Reply { to: alice.ft });
    assert_eq!(p.answer(), (Class::Error, Some(437)));
    assert_eq!(
        p.opened(&open, 50_000, None),
        ClientAction::Reply { to: alice.ft }
    );
    let success = p.reply.clone();
    // Later retransmissions get the same bytes from the cache.
    assert_eq!(p.send(&alice, &req), ClientAction::Reply { to: alice.ft });
    assert_eq!(p.reply, success);
}

#[test]
fn two_clients_relay_to_each_other_through_their_relays() {
    let mut p = Pair::new();
    let alice = p.client(1, self::alice());
    let bob = p.client(2, creds("bob", "builder"));
    let a_relay = p.allocate(&alice, 50_000);
    let b_relay = p.allocate(&bob, 50_002);
    assert_ne!(a_relay, b_relay);
    let (a_addr, b_addr) = (relay_addr(50_000), relay_addr(50_002));

    // Each permits the other's relayed address (relay to relay is always a valid peer).
    let permit = |p: &mut Pair, c: &Client, peer: SocketAddr| {
        let req = p.signed(c, method::CREATE_PERMISSION, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        });
        assert_eq!(p.send(c, &req), ClientAction::Reply { to: c.ft });
        assert_eq!(p.answer(), (Class::Success, None));
    };
    permit(&mut p, &alice, b_addr);
    permit(&mut p, &bob, a_addr);
    let bind = p.signed(&alice, method::CHANNEL_BIND, |w| {
        w.attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0])
            .xor_address(attr::XOR_PEER_ADDRESS, b_addr);
    });
    assert_eq!(p.send(&alice, &bind), ClientAction::Reply { to: alice.ft });
    assert_eq!(p.answer(), (Class::Success, None));
    assert_eq!(p.commands(), vec![], "permissions and channels need no I/O");

    // Alice's ChannelData for Bob's relayed address reaches Bob as a Data indication at once:
    // both relays are this core's, so no socket is involved.
    let frame = [
        0x40, 0x00, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o', 0, 0, 0,
    ];
    assert_eq!(p.send(&alice, &frame), ClientAction::Reply { to: bob.ft });
    let m = Message::parse(&p.reply).unwrap();
    assert_eq!((m.class, m.method), (Class::Indication, method::DATA));
    assert_eq!(m.get(attr::DATA).unwrap().value, b"hello");
    let from = m.get(attr::XOR_PEER_ADDRESS).unwrap();
    assert_eq!(
        codec::decode_xor_address(from.value, &m.transaction_id()),
        Some(a_addr)
    );
    // The same datagram read by Bob's relay socket from Alice's (as from a relay of another
    // shard) is delivered the same way.
    let mut buf = vec![0u8; HEADROOM + 5 + TAILROOM];
    buf[HEADROOM..HEADROOM + 5].copy_from_slice(b"hello");
    let to_bob = p
        .core
        .handle_peer(p.now, b_relay, a_addr, &mut buf, HEADROOM, HEADROOM + 5);
    let PeerAction::ToClient { to, start, end } = to_bob else {
        panic!("expected delivery, got {to_bob:?}")
    };
    assert_eq!(to, bob.ft);
    assert_eq!(
        Message::parse(&buf[start..end])
            .unwrap()
            .get(attr::DATA)
            .unwrap()
            .value,
        b"hello"
    );
    assert_eq!(p.commands(), vec![]);
}

#[test]
fn deletes_and_expiries_close_exactly_their_sockets() {
    let mut p = Pair::new();
    let alice = p.client(1, self::alice());
    let bob = p.client(2, creds("bob", "builder"));
    let a_relay = p.allocate(&alice, 50_000);
    let b_relay = p.allocate(&bob, 50_002);

    let delete = p.signed(&alice, method::REFRESH, |w| {
        w.u32_attr(attr::LIFETIME, 0);
    });
    assert_eq!(
        p.send(&alice, &delete),
        ClientAction::Reply { to: alice.ft }
    );
    assert_eq!(p.commands(), vec![Command::CloseRelay(a_relay)]);

    // Bob goes quiet: nothing happens until his lifetime is up, then his one socket closes.
    p.advance(limits().default_lifetime.as_secs() - 1);
    assert_eq!(p.commands(), vec![]);
    p.advance(1);
    assert_eq!(p.commands(), vec![Command::CloseRelay(b_relay)]);
    assert_eq!(p.core.allocation_count(), 0);
    assert_eq!(p.core.poll_timeout(), None);
}

#[test]
fn a_reserved_port_is_dropped_when_nobody_claims_it() {
    let mut p = Pair::new();
    let alice = p.client(1, self::alice());
    let open = p.allocate_until_open(&alice, |w| {
        w.attr(attr::EVEN_PORT, &[0x80]);
    });
    assert_eq!(
        open.source,
        RelaySource::Bind {
            ip: RELAY_IP.parse().unwrap(),
            even_port: true,
            reserve_next: true,
        }
    );
    let token = 0xABCD;
    assert_eq!(
        p.opened(&open, 50_000, Some(token)),
        ClientAction::Reply { to: alice.ft }
    );
    let m = Message::parse(&p.reply).unwrap();
    assert_eq!(
        m.get(attr::RESERVATION_TOKEN).unwrap().value,
        token.to_be_bytes()
    );
    assert_eq!(p.core.shared().reserved_ports(), 1);
    p.advance(RESERVATION_LIFETIME.as_secs());
    assert_eq!(p.commands(), vec![Command::DropReservation(token)]);
    assert_eq!(p.core.shared().reserved_ports(), 0);
    assert_eq!(
        p.core.allocation_count(),
        1,
        "the allocation outlives its reservation"
    );
}

#[test]
fn a_claim_asks_for_the_reserved_socket() {
    let mut p = Pair::new();
    let alice = p.client(1, self::alice());
    let bob = p.client(2, creds("bob", "builder"));
    let open = p.allocate_until_open(&alice, |w| {
        w.attr(attr::EVEN_PORT, &[0x80]);
    });
    p.opened(&open, 50_000, Some(0x77));
    let claim = p.allocate_until_open(&bob, |w| {
        w.attr(attr::RESERVATION_TOKEN, &0x77u64.to_be_bytes());
    });
    assert_eq!(claim.source, RelaySource::Reserved(0x77));
    assert_eq!(
        p.opened(&claim, 50_001, None),
        ClientAction::Reply { to: bob.ft }
    );
    assert_eq!(p.answer(), (Class::Success, None));
    // Claimed: its expiry no longer drops it.
    p.advance(RESERVATION_LIFETIME.as_secs());
    assert_eq!(p.commands(), vec![]);
}

#[test]
fn a_socket_that_cannot_be_opened_is_a_508_and_gives_everything_back() {
    let mut p = Pair::new();
    let alice = p.client(1, self::alice());
    let open = p.allocate_until_open(&alice, |_| {});
    let action = p
        .core
        .relay_opened(p.now, open.id, Err(RelayOpenError::NoPort), &mut p.reply);
    assert_eq!(action, ClientAction::Reply { to: alice.ft });
    assert_eq!(p.answer(), (Class::Error, Some(508)));
    assert_eq!(p.commands(), vec![]);
    assert_eq!(p.core.allocation_count(), 0);
    assert_eq!(
        p.core.shared().total_allocations(),
        0,
        "the quota unit came back"
    );
    // The slot moved on: a retry asks under a new generation.
    let retry = p.allocate_until_open(&alice, |_| {});
    assert_ne!(retry.id, open.id);
}

#[test]
fn half_a_dual_allocation_failing_closes_the_other_half() {
    let mut p = Pair::new();
    let alice = p.client(1, self::alice());
    let req = p.signed(&alice, method::ALLOCATE, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert_eq!(p.send(&alice, &req), ClientAction::Drop);
    let [Command::OpenRelay(v4), Command::OpenRelay(v6)] = p.commands()[..] else {
        panic!("two OpenRelay")
    };
    assert!(!v4.id.v6 && v6.id.v6);
    assert_eq!(
        p.opened(&v4, 50_000, None),
        ClientAction::Drop,
        "waits for the other half"
    );
    let action = p.core.relay_opened(
        p.now,
        v6.id,
        Err(RelayOpenError::Os(std::io::ErrorKind::Other)),
        &mut p.reply,
    );
    assert_eq!(action, ClientAction::Reply { to: alice.ft });
    assert_eq!(p.answer(), (Class::Error, Some(508)));
    assert_eq!(p.commands(), vec![Command::CloseRelay(v4.id)]);
}

#[test]
fn a_closed_stream_connection_ends_its_allocation_and_nothing_else() {
    let mut p = Pair::new();
    let mut alice = p.client(1, self::alice());
    alice.ft.transport = Transport::Tcp;
    // A nonce is bound to its transport: the TCP client fetches its own.
    let mut req = Vec::new();
    MessageWriter::new(&mut req, method::ALLOCATE, Class::Request, p.txid());
    p.send(&alice, &req);
    let m = Message::parse(&p.reply).unwrap();
    alice.nonce = m.get(attr::NONCE).unwrap().value.to_vec();
    let bob = p.client(2, creds("bob", "builder"));
    let a_relay = p.allocate(&alice, 50_000);
    p.allocate(&bob, 50_002);
    assert!(p.core.connection_closed(&alice.ft, p.now));
    assert_eq!(p.commands(), vec![Command::CloseRelay(a_relay)]);
    assert_eq!(p.core.allocation_count(), 1, "bob's UDP allocation stays");
    assert!(
        !p.core.connection_closed(&alice.ft, p.now),
        "nothing left to end"
    );
    // A connection that closes while its Allocate waits for the socket gives everything back.
    let open = p.allocate_until_open(&alice, |_| {});
    assert!(p.core.connection_closed(&alice.ft, p.now));
    assert_eq!(p.opened(&open, 50_004, None), ClientAction::Drop);
    assert_eq!(p.commands(), vec![Command::CloseRelay(open.id)]);
    assert_eq!(p.core.allocation_count(), 1);
}

#[test]
fn an_answer_nobody_waits_for_any_more_closes_its_socket() {
    let mut p = Pair::new();
    let alice = p.client(1, self::alice());
    let open = p.allocate_until_open(&alice, |w| {
        w.attr(attr::EVEN_PORT, &[0x80]);
    });
    p.core.close_all(p.now, EndReason::Shutdown);
    assert_eq!(p.commands(), vec![]);
    assert_eq!(p.core.shared().total_allocations(), 0);
    assert_eq!(p.opened(&open, 50_000, Some(9)), ClientAction::Drop);
    assert_eq!(
        p.commands(),
        vec![Command::CloseRelay(open.id), Command::DropReservation(9)]
    );
}
