//! TCP relays (RFC 6062) against the core, the I/O layer played by `FakeRelays`: Connect and its
//! failures, incoming peers, ConnectionBind, the two 30-second timers, and what an allocation's
//! end closes.

use super::*;
use crate::proto::server::{ConnectionId, PeerConnectError, BIND_TIMEOUT, CONNECT_TIMEOUT};

const PEER: &str = "198.51.100.1:5000";

fn tcp_client(port: u16) -> FiveTuple {
    FiveTuple {
        transport: Transport::Tcp,
        ..client(port)
    }
}

impl Harness {
    /// An Allocate for a TCP relay; `fill` adds attributes.
    fn tcp_allocate(
        &mut self,
        ft: &FiveTuple,
        c: &Creds,
        fill: impl FnOnce(&mut MessageWriter),
    ) -> (Class, Option<u16>) {
        self.allocate_transport(ft, c, 6, fill)
    }

    /// A control connection with a TCP allocation; its relayed address.
    fn tcp_allocation(&mut self, ft: &FiveTuple) -> SocketAddr {
        assert_eq!(
            self.tcp_allocate(ft, &alice(), |_| {}),
            (Class::Success, None)
        );
        self.relayed_address()
    }

    /// Sends a Connect; a refusal is answered at once, a success only through `to_client`.
    fn connect(&mut self, ft: &FiveTuple, to: SocketAddr) -> ClientAction {
        let nonce = self.nonce(ft);
        let txid = self.txid();
        let req = self.request(method::CONNECT, txid, &alice(), &nonce, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, to);
        });
        self.send(ft, &req)
    }

    /// The one connection the core is connecting to `to`.
    fn connecting_to(&mut self, to: SocketAddr) -> ConnectionId {
        let ids: Vec<ConnectionId> = self
            .core
            .relays()
            .connecting
            .iter()
            .filter(|(_, (_, p))| *p == to)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(ids.len(), 1, "one connect to {to}");
        ids[0]
    }

    fn finish_connect(&mut self, id: ConnectionId, result: Result<(), PeerConnectError>) -> bool {
        let TestCore { core, relays } = &mut self.core;
        relays.finish_connect(core, self.now, id, result)
    }

    fn accept(&mut self, relay: SocketAddr, from: SocketAddr) -> Option<ConnectionId> {
        let id = self.relay_id(relay);
        let TestCore { core, relays } = &mut self.core;
        relays.accept(core, self.now, id, from)
    }

    fn relay_id(&mut self, relay: SocketAddr) -> RelayId {
        *self
            .core
            .relays()
            .open
            .iter()
            .find(|(_, a)| **a == relay)
            .expect("an open relay")
            .0
    }

    /// The last message sent outside a reply: to whom, class, method, error code, and
    /// CONNECTION-ID.
    fn last_to_client(&mut self) -> (FiveTuple, Class, u16, Option<u16>, Option<u32>) {
        let (to, bytes) = self.core.relays().to_client.last().cloned().expect("sent");
        let m = Message::parse(&bytes).unwrap();
        let code = m
            .get(attr::ERROR_CODE)
            .map(|e| e.value[2] as u16 * 100 + e.value[3] as u16);
        let id = m
            .get(attr::CONNECTION_ID)
            .map(|a| u32::from_be_bytes(a.value.try_into().unwrap()));
        (to, m.class, m.method, code, id)
    }

    fn connection_bind(&mut self, ft: &FiveTuple, c: &Creds, id: u32) -> ClientAction {
        let nonce = self.nonce(ft);
        let txid = self.txid();
        let req = self.request(method::CONNECTION_BIND, txid, c, &nonce, |w| {
            w.attr(attr::CONNECTION_ID, &id.to_be_bytes());
        });
        self.send(ft, &req)
    }

    fn reply_code(&self) -> (Class, Option<u16>) {
        let m = Message::parse(&self.reply).unwrap();
        let code = m
            .get(attr::ERROR_CODE)
            .map(|e| e.value[2] as u16 * 100 + e.value[3] as u16);
        (m.class, code)
    }
}

#[test]
fn a_tcp_relay_is_offered_over_tcp_only_and_without_udp_attributes() {
    let mut h = Harness::new();
    // RFC 6062 §5.1: a UDP client asking for a TCP relay is a bad request.
    assert_eq!(
        h.tcp_allocate(&client(1), &alice(), |_| {}),
        (Class::Error, Some(400))
    );
    let ft = tcp_client(2);
    assert_eq!(
        h.tcp_allocate(&ft, &alice(), |w| {
            w.attr(attr::EVEN_PORT, &[0]);
        }),
        (Class::Error, Some(400))
    );
    assert_eq!(h.core.allocation_count(), 0);
    let relay = h.tcp_allocation(&ft);
    assert_eq!(relay.ip(), "192.0.2.10".parse::<IpAddr>().unwrap());
    assert_eq!(h.core.allocation_count(), 1, "counted like any allocation");
    // Channels and Send carry datagrams; a TCP relay carries none.
    assert_eq!(h.permit(&ft, peer(PEER)), (Class::Success, None));
    assert_eq!(h.bind(&ft, 0x4000, peer(PEER)), (Class::Error, Some(400)));
    assert_eq!(h.send_indication(&ft, peer(PEER), b"x"), ClientAction::Drop);
}

#[test]
fn a_connect_is_answered_with_a_connection_id_that_a_data_connection_binds() {
    let mut h = Harness::new();
    let ctl = tcp_client(1);
    let relay = h.tcp_allocation(&ctl);
    assert_eq!(h.connect(&ctl, peer(PEER)), ClientAction::Drop);
    let id = h.connecting_to(peer(PEER));
    assert_eq!(
        h.core.relays().connecting[&id].0,
        relay,
        "from the relayed address"
    );
    assert!(
        h.core.relays().to_client.is_empty(),
        "answered when connected"
    );
    assert!(h.finish_connect(id, Ok(())));
    assert_eq!(
        h.last_to_client(),
        (ctl, Class::Success, method::CONNECT, None, Some(id))
    );
    assert_eq!(h.core.stats().tcp_connects_ok, 1);

    let data = tcp_client(2);
    assert_eq!(
        h.connection_bind(&data, &alice(), id),
        ClientAction::Reply { to: data }
    );
    assert_eq!(h.reply_code(), (Class::Success, None));
    assert_eq!(h.core.relays().piped.get(&id), Some(&data));
    // A connection id binds once.
    let again = tcp_client(3);
    h.connection_bind(&again, &alice(), id);
    assert_eq!(h.reply_code(), (Class::Error, Some(400)));
    // The pipe's end (either side) is reported as the data connection's close; nothing is left
    // to close then.
    assert!(h.core.connection_closed(&data, h.now));
    assert!(h.core.relays().closed_peers.is_empty());
    assert_eq!(h.core.peer_connection_count(), 0);
    // The peer may be connected to again.
    assert_eq!(h.connect(&ctl, peer(PEER)), ClientAction::Drop);
}

#[test]
fn connect_refusals_carry_their_codes() {
    let mut h = Harness::new();
    let ctl = tcp_client(1);
    h.tcp_allocation(&ctl);
    // Denied by the peer policy.
    assert_eq!(
        h.connect(&ctl, peer("10.0.0.1:80")),
        ClientAction::Reply { to: ctl }
    );
    assert_eq!(h.reply_code(), (Class::Error, Some(403)));
    // The allocation has no IPv6 relay.
    assert_eq!(
        h.connect(&ctl, peer("[2001:db8:1::1]:80")),
        ClientAction::Reply { to: ctl }
    );
    assert_eq!(h.reply_code(), (Class::Error, Some(443)));
    // No XOR-PEER-ADDRESS.
    assert_eq!(
        h.authed(&ctl, method::CONNECT, |_| {}),
        (Class::Error, Some(400))
    );
    // A second Connect to a peer being connected to: 446.
    h.connect(&ctl, peer(PEER));
    let id = h.connecting_to(peer(PEER));
    assert_eq!(h.connect(&ctl, peer(PEER)), ClientAction::Reply { to: ctl });
    assert_eq!(h.reply_code(), (Class::Error, Some(446)));
    // The connection fails: 447, and the peer may be tried again.
    let refused = PeerConnectError::Os(std::io::ErrorKind::ConnectionRefused);
    assert!(!h.finish_connect(id, Err(refused)));
    assert_eq!(
        h.last_to_client(),
        (ctl, Class::Error, method::CONNECT, Some(447), None)
    );
    assert_eq!(h.core.stats().tcp_connects_failed, 1);
    assert_eq!(h.connect(&ctl, peer(PEER)), ClientAction::Drop);
    // Once connected the peer has its connection: 446 again.
    let id = h.connecting_to(peer(PEER));
    assert!(h.finish_connect(id, Ok(())));
    assert_eq!(h.connect(&ctl, peer(PEER)), ClientAction::Reply { to: ctl });
    assert_eq!(h.reply_code(), (Class::Error, Some(446)));
    // A UDP allocation has nothing to Connect with.
    let udp = client(9);
    h.allocate(&udp);
    assert_eq!(h.connect(&udp, peer(PEER)), ClientAction::Reply { to: udp });
    assert_eq!(h.reply_code(), (Class::Error, Some(400)));
}

#[test]
fn a_connect_that_does_not_complete_in_30_seconds_fails_with_447() {
    let mut h = Harness::new();
    let ctl = tcp_client(1);
    h.tcp_allocation(&ctl);
    h.connect(&ctl, peer(PEER));
    let id = h.connecting_to(peer(PEER));
    h.advance(CONNECT_TIMEOUT.as_secs() - 1);
    assert!(h.core.relays().to_client.is_empty());
    h.advance(1);
    assert_eq!(
        h.last_to_client(),
        (ctl, Class::Error, method::CONNECT, Some(447), None)
    );
    assert_eq!(
        h.core.relays().closed_peers,
        vec![id],
        "the connect is abandoned"
    );
    // A connect that completes after all is not kept.
    assert!(!h.core.peer_connected(h.now, id, Ok(())));
    assert_eq!(h.core.peer_connection_count(), 0);
}

#[test]
fn a_permitted_incoming_peer_is_announced_and_others_are_closed() {
    let mut h = Harness::new();
    let ctl = tcp_client(1);
    let relay = h.tcp_allocation(&ctl);
    let from = peer("198.51.100.1:40000");
    assert_eq!(h.accept(relay, from), None, "no permission");
    assert!(h.core.relays().to_client.is_empty());
    assert_eq!(h.accept(relay, peer("10.0.0.1:4000")), None, "denied peer");
    assert_eq!(
        h.permit(&ctl, peer("198.51.100.1:1")),
        (Class::Success, None)
    );
    let id = h.accept(relay, from).expect("permitted");
    assert_eq!(
        h.last_to_client(),
        (
            ctl,
            Class::Indication,
            method::CONNECTION_ATTEMPT,
            None,
            Some(id)
        )
    );
    let (_, bytes) = h.core.relays().to_client.last().cloned().unwrap();
    let m = Message::parse(&bytes).unwrap();
    let announced = m.get(attr::XOR_PEER_ADDRESS).unwrap();
    assert_eq!(
        codec::decode_xor_address(announced.value, &m.transaction_id()),
        Some(from)
    );
    assert_eq!(
        h.accept(relay, from),
        None,
        "one connection per peer address"
    );
    let data = tcp_client(2);
    h.connection_bind(&data, &alice(), id);
    assert_eq!(h.reply_code(), (Class::Success, None));
    assert_eq!(h.core.relays().piped.get(&id), Some(&data));
}

#[test]
fn a_peer_connection_nobody_binds_is_closed_after_30_seconds() {
    let mut h = Harness::new();
    let ctl = tcp_client(1);
    let relay = h.tcp_allocation(&ctl);
    h.permit(&ctl, peer(PEER));
    let id = h.accept(relay, peer(PEER)).unwrap();
    h.advance(BIND_TIMEOUT.as_secs() - 1);
    assert!(h.core.relays().closed_peers.is_empty());
    h.advance(1);
    assert_eq!(h.core.relays().closed_peers, vec![id]);
    let data = tcp_client(2);
    h.connection_bind(&data, &alice(), id);
    assert_eq!(h.reply_code(), (Class::Error, Some(400)));
    // The same for one that was connected with Connect.
    h.connect(&ctl, peer("198.51.100.2:80"));
    let id = h.connecting_to(peer("198.51.100.2:80"));
    h.finish_connect(id, Ok(()));
    h.advance(BIND_TIMEOUT.as_secs());
    assert_eq!(h.core.relays().closed_peers.last(), Some(&id));
}

#[test]
fn connection_bind_refusals() {
    let mut h = Harness::new();
    let ctl = tcp_client(1);
    let relay = h.tcp_allocation(&ctl);
    h.permit(&ctl, peer(PEER));
    let id = h.accept(relay, peer(PEER)).unwrap();
    let data = tcp_client(2);
    // An id nobody handed out (this shard's tag, so it is judged here).
    h.connection_bind(&data, &alice(), id ^ 0x100);
    assert_eq!(h.reply_code(), (Class::Error, Some(400)));
    // Someone else's connection.
    h.connection_bind(&data, &creds("bob", "builder"), id);
    assert_eq!(h.reply_code(), (Class::Error, Some(441)));
    // Not on a connection that holds an allocation, and never over UDP.
    h.connection_bind(&ctl, &alice(), id);
    assert_eq!(h.reply_code(), (Class::Error, Some(400)));
    h.connection_bind(&client(3), &alice(), id);
    assert_eq!(h.reply_code(), (Class::Error, Some(400)));
    // None of it bound anything.
    assert!(h.core.relays().piped.is_empty());
    h.connection_bind(&data, &alice(), id);
    assert_eq!(h.reply_code(), (Class::Success, None));
}

#[test]
fn a_connection_bind_for_another_shard_moves_the_connection_there() {
    let mut h = Harness::new();
    h.core.set_shard(3);
    let ctl = tcp_client(1);
    let relay = h.tcp_allocation(&ctl);
    h.permit(&ctl, peer(PEER));
    let id = h.accept(relay, peer(PEER)).unwrap();
    assert_eq!(id & 0xFF, 3, "the id names its shard");
    let data = tcp_client(2);
    let foreign = (id & !0xFF) | 5;
    assert_eq!(
        h.connection_bind(&data, &alice(), foreign),
        ClientAction::Drop
    );
    assert_eq!(h.core.relays().handed_over, vec![(data, 5)]);
    assert!(h.core.relays().piped.is_empty());
}

#[test]
fn an_allocation_ends_with_all_its_tcp_connections() {
    let mut h = Harness::new();
    let ctl = tcp_client(1);
    let relay = h.tcp_allocation(&ctl);
    h.permit(&ctl, peer(PEER));
    let unbound = h.accept(relay, peer(PEER)).unwrap();
    h.connect(&ctl, peer("198.51.100.2:80"));
    let connecting = h.connecting_to(peer("198.51.100.2:80"));
    h.connect(&ctl, peer("198.51.100.3:80"));
    let bound = h.connecting_to(peer("198.51.100.3:80"));
    h.finish_connect(bound, Ok(()));
    let data = tcp_client(2);
    h.connection_bind(&data, &alice(), bound);
    assert_eq!(h.reply_code(), (Class::Success, None));
    // Another allocation's connection stays.
    let other = tcp_client(5);
    let other_relay = h.tcp_allocation(&other);
    h.permit(&other, peer(PEER));
    let others = h.accept(other_relay, peer(PEER)).unwrap();

    assert!(h.core.connection_closed(&ctl, h.now));
    let TestCore { core, relays } = &mut h.core;
    relays.run_commands(core, h.now, &mut Vec::new());
    let mut closed = h.core.relays().closed_peers.clone();
    closed.sort();
    let mut want = vec![unbound, connecting, bound];
    want.sort();
    assert_eq!(closed, want);
    assert_eq!(h.core.peer_connection_count(), 1);
    assert!(h.core.relays().established.contains_key(&others));
    // The data connection is no longer one: its close is nobody's.
    assert!(!h.core.connection_closed(&data, h.now));
}
