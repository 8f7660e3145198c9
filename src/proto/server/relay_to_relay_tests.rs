//! Relay to relay inside the process: two clients of one core talking through each other's relay
//! address get each other's datagrams as replies, with the receiving relay's permission, channel,
//! budget and counters applied as if its socket had read them.

use super::*;

/// Two allocations of one core, a and b, each permitted to the other's relay address.
struct Pair {
    h: Harness,
    a: FiveTuple,
    b: FiveTuple,
    relay_a: SocketAddr,
    relay_b: SocketAddr,
}

fn pair_with(cfg: CoreConfig, b: FiveTuple) -> Pair {
    let mut h = Harness::with(cfg);
    let a = client(1);
    let relay_a = h.allocate(&a);
    let relay_b = h.allocate(&b);
    assert_eq!(h.permit(&a, relay_b), (Class::Success, None));
    assert_eq!(h.permit(&b, relay_a), (Class::Success, None));
    Pair {
        h,
        a,
        b,
        relay_a,
        relay_b,
    }
}

fn pair() -> Pair {
    pair_with(config(limits(), false, false), client(2))
}

fn channel_data(number: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = number.to_be_bytes().to_vec();
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn channel_data_to_a_relay_of_this_core_is_delivered_as_the_other_clients_reply() {
    let mut p = pair();
    assert_eq!(p.h.bind(&p.a, 0x4000, p.relay_b), (Class::Success, None));
    assert_eq!(p.h.bind(&p.b, 0x4007, p.relay_a), (Class::Success, None));
    let before = *p.h.core.stats();
    assert_eq!(
        p.h.send(&p.a, &channel_data(0x4000, b"hello")),
        ClientAction::Reply { to: p.b }
    );
    // b reads it on its own channel to a, exactly what b's relay socket would have produced.
    assert_eq!(p.h.reply, channel_data(0x4007, b"hello"));
    let stats = p.h.core.stats();
    assert_eq!(stats.relayed_in_process, before.relayed_in_process + 1);
    assert_eq!(stats.to_peer_packets, before.to_peer_packets + 1);
    assert_eq!(stats.to_client_packets, before.to_client_packets + 1);
    assert_eq!(stats.to_client_bytes, before.to_client_bytes + 5);
    let sessions = p.h.core.sessions(p.h.now);
    let of = |ft: &FiveTuple| sessions.iter().find(|s| s.client == ft.client).unwrap();
    assert_eq!(of(&p.a).counters.to_peer_packets, 1);
    assert_eq!(of(&p.b).counters.to_client_packets, 1);
    assert_eq!(of(&p.b).counters.to_client_bytes, 5);
    // And back the other way.
    assert_eq!(
        p.h.send(&p.b, &channel_data(0x4007, b"hi")),
        ClientAction::Reply { to: p.a }
    );
    assert_eq!(p.h.reply, channel_data(0x4000, b"hi"));
}

#[test]
fn without_a_channel_the_receiver_gets_a_data_indication_naming_the_senders_relay() {
    let mut p = pair();
    assert_eq!(
        p.h.send_indication(&p.a, p.relay_b, b"ping"),
        ClientAction::Reply { to: p.b }
    );
    let m = Message::parse(&p.h.reply).unwrap();
    assert_eq!((m.method, m.class), (method::DATA, Class::Indication));
    let from = m.get(attr::XOR_PEER_ADDRESS).unwrap();
    assert_eq!(
        codec::decode_xor_address(from.value, &m.transaction_id()),
        Some(p.relay_a)
    );
    assert_eq!(m.get(attr::DATA).unwrap().value, b"ping");
}

#[test]
fn the_receivers_permission_is_checked_as_on_the_socket() {
    let mut h = Harness::new();
    let (a, b) = (client(1), client(2));
    h.allocate(&a);
    let relay_b = h.allocate(&b);
    // a may send to b's relay; b never permitted a.
    assert_eq!(h.bind(&a, 0x4000, relay_b), (Class::Success, None));
    let before = *h.core.stats();
    assert_eq!(h.send(&a, &channel_data(0x4000, b"x")), ClientAction::Drop);
    let stats = h.core.stats();
    assert_eq!(
        stats.dropped_no_permission,
        before.dropped_no_permission + 1
    );
    // The sender's relay sent it, whatever the receiver did with it.
    assert_eq!(stats.to_peer_packets, before.to_peer_packets + 1);
    assert_eq!(stats.to_client_packets, before.to_client_packets);
}

#[test]
fn the_receivers_bandwidth_cap_applies() {
    let mut l = limits();
    l.bandwidth_bytes_per_sec = 1000;
    let mut cfg = config(l, false, false);
    cfg.limits.bandwidth_bytes_per_sec = 1000;
    let mut p = pair_with(cfg, client(2));
    let payload = [7u8; 600];
    // The burst is one second's worth: the first 600 bytes pass, the second 600 do not, on
    // whichever side runs out first (both buckets hold 1000 bytes).
    assert_eq!(
        p.h.send_indication(&p.a, p.relay_b, &payload),
        ClientAction::Reply { to: p.b }
    );
    let before = *p.h.core.stats();
    assert_eq!(
        p.h.send_indication(&p.a, p.relay_b, &payload),
        ClientAction::Drop
    );
    assert_eq!(
        p.h.core.stats().dropped_bandwidth,
        before.dropped_bandwidth + 1
    );
}

#[test]
fn a_stream_receiver_gets_padded_channel_data() {
    let b = FiveTuple {
        transport: Transport::Tcp,
        ..client(2)
    };
    let mut p = pair_with(config(limits(), false, false), b);
    assert_eq!(p.h.bind(&p.a, 0x4000, p.relay_b), (Class::Success, None));
    assert_eq!(p.h.bind(&p.b, 0x4001, p.relay_a), (Class::Success, None));
    assert_eq!(
        p.h.send(&p.a, &channel_data(0x4000, b"abcde")),
        ClientAction::Reply { to: p.b }
    );
    let mut padded = channel_data(0x4001, b"abcde");
    padded.extend_from_slice(&[0, 0, 0]);
    assert_eq!(p.h.reply, padded);
}

#[test]
fn a_relay_of_another_shard_is_handed_over_and_delivered_there_as_on_its_socket() {
    let cfg = Arc::new(config(limits(), false, false));
    let mut h = Harness::with((*cfg).clone());
    let a = client(1);
    let relay_a = h.allocate(&a);
    // Another core sharing this one's state (shard 1) owns b's relay.
    let mut other = Harness {
        core: TestCore::new(Arc::clone(&cfg), Arc::clone(&h.shared), 7),
        shared: Arc::clone(&h.shared),
        t0: h.t0,
        now: h.now,
        reply: Vec::new(),
        txid_counter: 100,
    };
    other.core.set_shard(1);
    other.core.relays.next_port = 60_000;
    let b = client(2);
    let relay_b = other.allocate(&b);
    assert_eq!(h.bind(&a, 0x4000, relay_b), (Class::Success, None));
    let relay = match h.send(&a, &channel_data(0x4000, b"x")) {
        ClientAction::ToPeer { relay, peer, .. } => {
            assert_eq!(peer, relay_b);
            relay
        }
        other => panic!("{other:?}"),
    };
    // Not delivered by this core, but addressed to shard 1, from a's relay.
    assert_eq!(h.core.stats().relayed_in_process, 0);
    assert_eq!(h.core.handover_target(relay, &relay_b), Some((1, relay_a)));
    let deliver = |other: &mut Harness| {
        let mut buf = vec![0u8; HEADROOM + 1 + codec::TAILROOM];
        buf[HEADROOM] = b'x';
        let now = other.now;
        let action =
            other
                .core
                .deliver_from_shard(now, relay_b, relay_a, &mut buf, HEADROOM, HEADROOM + 1);
        (action, buf)
    };
    // b never permitted a: dropped as its socket would have dropped it.
    assert_eq!(deliver(&mut other).0, PeerAction::Drop);
    assert_eq!(other.core.stats().dropped_no_permission, 1);
    assert_eq!(other.permit(&b, relay_a), (Class::Success, None));
    let (action, buf) = deliver(&mut other);
    let PeerAction::ToClient { to, start, end } = action else {
        panic!("{action:?}");
    };
    assert_eq!(to, b);
    let m = Message::parse(&buf[start..end]).unwrap();
    assert_eq!((m.method, m.class), (method::DATA, Class::Indication));
    let from = m.get(attr::XOR_PEER_ADDRESS).unwrap();
    assert_eq!(
        codec::decode_xor_address(from.value, &m.transaction_id()),
        Some(relay_a)
    );
    assert_eq!(m.get(attr::DATA).unwrap().value, b"x");
    assert_eq!(other.core.stats().relayed_in_process, 2);
    let sessions = other.core.sessions(other.now);
    assert_eq!(sessions[0].counters.to_client_packets, 1);

    // This core's own relay, or the same port at someone else's address: no handover.
    assert_eq!(h.core.handover_target(relay, &relay_a), None);
    let stranger = SocketAddr::new("198.51.100.9".parse().unwrap(), relay_b.port());
    assert_eq!(h.core.handover_target(relay, &stranger), None);
    // b's allocation ends: its port is nobody's, and a late handover is dropped.
    assert_eq!(other.refresh(&b, 0), (Class::Success, None));
    assert_eq!(h.core.handover_target(relay, &relay_b), None);
    assert_eq!(deliver(&mut other).0, PeerAction::Drop);
}

#[test]
fn an_ended_relay_is_no_longer_delivered_to() {
    let mut p = pair();
    assert_eq!(p.h.bind(&p.a, 0x4000, p.relay_b), (Class::Success, None));
    assert_eq!(p.h.refresh(&p.b, 0), (Class::Success, None));
    // The channel outlives b's allocation; what it carries now goes to a dead port, through the
    // kernel, and never to whoever takes b's slot next.
    match p.h.send(&p.a, &channel_data(0x4000, b"x")) {
        ClientAction::ToPeer { peer, .. } => assert_eq!(peer, p.relay_b),
        other => panic!("{other:?}"),
    }
    let c = client(3);
    p.h.allocate(&c);
    assert!(!matches!(
        p.h.send(&p.a, &channel_data(0x4000, b"x")),
        ClientAction::Reply { .. }
    ));
}
