//! The webrtc-rs `turn` client (a TURN client nobody here wrote) against the real daemon:
//! allocate, relay both ways through an echo peer, release with Refresh lifetime 0.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{field, rest_credential, unix_now, Daemon, PASSWORD, REALM, USER};
use tokio::net::UdpSocket;
use tokio::time::timeout;
use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;

const ROUND_TRIPS: usize = 20;
const STEP: Duration = Duration::from_secs(5);

/// A UDP echo peer on loopback; records every source address it saw.
async fn echo_peer() -> (
    SocketAddr,
    Arc<Mutex<Vec<SocketAddr>>>,
    tokio::task::JoinHandle<()>,
) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        // Bounded: a few more than the test sends.
        for _ in 0..ROUND_TRIPS * 2 {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            record.lock().unwrap().push(from);
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    (addr, seen, task)
}

/// A webrtc-rs TURN client of the daemon on `sock`, listening.
async fn turn_client(d: &Daemon, sock: UdpSocket, username: &str, password: &str) -> Client {
    let client = Client::new(ClientConfig {
        stun_serv_addr: d.addr.to_string(),
        turn_serv_addr: d.addr.to_string(),
        username: username.into(),
        password: password.into(),
        realm: REALM.into(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(sock),
        vnet: None,
    })
    .await
    .expect("client");
    client.listen().await.expect("listen");
    client
}

/// Allocates as `username`, relays `ROUND_TRIPS` distinct payloads through the echo peer,
/// closes the relay, and checks the daemon logged the allocation's life with exact counters.
async fn relay_round_trips(d: &Daemon, username: &str, password: &str) {
    let (peer, seen, echo) = echo_peer().await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = sock.local_addr().unwrap();
    let client = turn_client(d, sock, username, password).await;

    let mapped = timeout(STEP, client.send_binding_request())
        .await
        .expect("binding timed out")
        .expect("binding");
    assert_eq!(mapped, local, "XOR-MAPPED-ADDRESS is our own address");

    let relay = timeout(STEP, client.allocate())
        .await
        .expect("allocate timed out")
        .expect("allocate");
    let relayed = relay.local_addr().unwrap();
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
    assert!(
        (d.relay_ports.0..=d.relay_ports.1).contains(&relayed.port()),
        "relay port {relayed} outside the configured range {:?}",
        d.relay_ports
    );

    let mut buf = vec![0u8; 2048];
    for i in 0..ROUND_TRIPS {
        // Distinct sizes and contents, so a stale or misrouted datagram cannot pass.
        let payload: Vec<u8> = (0..100 + i * 7).map(|b| (b * 31 + i) as u8).collect();
        relay.send_to(&payload, peer).await.expect("send_to");
        let (n, from) = timeout(STEP, relay.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no echo for message {i}"))
            .expect("recv_from");
        assert_eq!(from, peer, "message {i} comes from the peer");
        assert_eq!(&buf[..n], &payload[..], "message {i} contents");
    }
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), ROUND_TRIPS);
        assert!(
            seen.iter().all(|a| *a == relayed),
            "the peer must see the relayed address {relayed}, saw {seen:?}"
        );
    }

    // Sends Refresh with LIFETIME 0: the daemon must end the allocation now, not at expiry.
    relay.close().await.expect("close relay");
    let client_addr = local.to_string();
    let ended = tokio::task::block_in_place(|| {
        d.wait_events("allocation ended", 1, STEP, |e| {
            field(e, "client") == client_addr
        })
    });
    let e = &ended[0];
    assert_eq!(field(e, "user"), username);
    assert_eq!(field(e, "reason"), "deleted by client");
    assert_eq!(field(e, "relay"), relayed.to_string());
    assert_eq!(e["to_peer_packets"], ROUND_TRIPS as u64);
    assert_eq!(e["to_client_packets"], ROUND_TRIPS as u64);
    assert_eq!(e["dropped_packets"], 0);
    let created = d.events("allocation created");
    assert_eq!(
        created
            .iter()
            .filter(|c| field(c, "client") == client_addr)
            .count(),
        1
    );

    client.close().await.unwrap();
    echo.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_user_allocates_and_relays_both_ways() {
    let d = Daemon::start();
    relay_round_trips(&d, USER, PASSWORD).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_credential_allocates_and_relays_both_ways() {
    let d = Daemon::start();
    let (username, password) = rest_credential("webrtc-user", unix_now() + 3600);
    relay_round_trips(&d, &username, &password).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused() {
    let d = Daemon::start();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let client = turn_client(&d, sock, USER, "not-the-password").await;
    let err = match timeout(STEP, client.allocate()).await.expect("timed out") {
        Ok(_) => panic!("allocation with a wrong password succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("401"), "expected a 401, got: {err}");
    assert!(d.events("allocation created").is_empty());
    client.close().await.unwrap();
}
