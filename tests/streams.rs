//! TURN over TCP and TLS against the real daemon on loopback: the PROXY protocol (v1, v2, over
//! TLS, bad and untrusted headers, the header address in quotas), TLS with a rustls client
//! (relaying both ways, ALPN, TLS 1.2 and 1.3, an untrusting client), certificate reload while a
//! client relays, abuse (stalled handshakes, connection limits, the idle timeout), Python's
//! aioice as an independent client, and IPv6 on `::1`. Edge cases past those: answers to the
//! requests a client sent just before closing its side, bad records after the handshake, a
//! client that stops reading, a PROXY header repeating a live 5-tuple, a drain over TLS.
//!
//! Every test starts its own daemon through `tests/common`, talks only to loopback, bounds each
//! loop in count and time, and waits on conditions (metrics, log lines, a closed socket) rather
//! than sleeping. The tests take a lock so that one's timeouts are not stretched by another's
//! load on a small machine.
//!
//! The aioice test needs `python3` with `aioice` (PyPI; `scripts/test.sh` installs it). Without
//! it the test fails when `CI` is set and skips loudly otherwise.

mod common;

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{
    tcp_connect, tcp_connect_from, Daemon, EchoPeer, Options, StreamClient, TestCert, TlsClient,
    TurnClient, PASSWORD, USER,
};
use turnpike::io::proxy::encode_v2;
use turnpike::proto::codec::{method, Class, MessageWriter};

/// One test at a time: their timeouts are seconds, the machine may have two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long a test waits for the server to close a connection it should close.
const CLOSE_WAIT: Duration = Duration::from_secs(15);
/// How long a test waits for a metric to reach the value it expects.
const METRIC_WAIT: Duration = Duration::from_secs(15);

/// `turnpike_NAME{transport="T"}` or `turnpike_NAME{transport="T",KEY="VALUE"}`.
fn series(name: &str, transport: &str, label: Option<(&str, &str)>) -> String {
    match label {
        None => format!("turnpike_{name}{{transport=\"{transport}\"}}"),
        Some((k, v)) => format!("turnpike_{name}{{transport=\"{transport}\",{k}=\"{v}\"}}"),
    }
}

fn setup_failures(transport: &str, reason: &str) -> String {
    series(
        "connection_setup_failures_total",
        transport,
        Some(("reason", reason)),
    )
}

fn refused(transport: &str, reason: &str) -> String {
    series(
        "connections_refused_total",
        transport,
        Some(("reason", reason)),
    )
}

fn open(transport: &str) -> String {
    series("connections_open", transport, None)
}

/// Waits until `peer` has counted `n` echoes (it counts after echoing, so the last echo can
/// arrive before its count).
fn wait_echoed(peer: &EchoPeer, n: u64) {
    let deadline = Instant::now() + METRIC_WAIT;
    while peer.count() < n {
        assert!(
            Instant::now() < deadline,
            "the peer echoed {}, not {n}",
            peer.count()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ip_port(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Options with the API (for /metrics), serving IPv6 clients when `ip` is `::1`.
fn options_on(ip: &str) -> Options {
    Options {
        ipv6: ip.contains(':'),
        ..Options::with_api()
    }
}

/// A daemon whose one TCP listener, on `ip`, expects PROXY headers.
fn proxied_tcp(
    ip: &str,
    more: impl Fn(&mut turnpike::config::Config) + Send + Sync + 'static,
) -> Daemon {
    let listen = ip_port(ip, 0);
    Daemon::with(options_on(ip).edit(move |c| {
        c.tcp_listen = vec![listen];
        c.proxy_protocol.listeners = vec![listen];
        more(c);
    }))
}

/// A PROXY v1 line for a TCP connection from `source` to `destination`.
fn v1_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
    .into_bytes()
}

/// A PROXY v2 LOCAL header (the balancer's own health check).
fn v2_local() -> Vec<u8> {
    let any: SocketAddr = "192.0.2.1:1".parse().unwrap();
    let mut h = encode_v2(any, any)[..12].to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    h
}

/// A plain TCP client that has sent `header` first.
fn plain_with_header(server: SocketAddr, header: &[u8]) -> StreamClient {
    let mut c = StreamClient::plain(server);
    c.write_raw(header).expect("write the PROXY header");
    c
}

/// A TLS client that has sent `header` before its ClientHello.
fn tls_with_header(server: SocketAddr, header: &[u8], tls: &TlsClient) -> StreamClient {
    let mut tcp = tcp_connect(server);
    tcp.write_all(header).expect("write the PROXY header");
    StreamClient::tls_over(tcp, tls).0
}

/// The address the test pretends a balancer saw the client at: documentation ranges.
fn claimed(ip: &str, port: u16) -> SocketAddr {
    if ip.contains(':') {
        SocketAddr::new("2001:db8::7".parse().unwrap(), port)
    } else {
        SocketAddr::new("198.51.100.7".parse().unwrap(), port)
    }
}

// ------------------------------------------------------------------------------ PROXY protocol

fn proxy_headers_name_the_client_over_tcp(ip: &str) {
    let _s = serial();
    let d = proxied_tcp(ip, |_| {});
    let server = d.tcp_addr.expect("a TCP listener");

    let mut v2 = plain_with_header(server, &encode_v2(claimed(ip, 40000), server));
    assert_eq!(v2.mapped(), claimed(ip, 40000), "v2 header");

    // The v1 line in two writes: the server must wait for the whole line.
    let line = v1_header(claimed(ip, 40001), server);
    let mut v1 = StreamClient::plain(server);
    v1.write_raw(&line[..9]).unwrap();
    v1.write_raw(&line[9..]).unwrap();
    assert_eq!(v1.mapped(), claimed(ip, 40001), "v1 header");

    // LOCAL: the balancer speaking for itself keeps the socket's own address.
    let mut local = plain_with_header(server, &v2_local());
    let own = local.local();
    assert_eq!(local.mapped(), own, "v2 LOCAL header");

    // A client of the other family behind a balancer of this one (HAProxy sends TCP4 for an
    // IPv4 client whatever its own connection to us is), allocating and relaying.
    let other: SocketAddr = if ip.contains(':') {
        "198.51.100.9:40005".parse().unwrap()
    } else {
        "[2001:db8::9]:40005".parse().unwrap()
    };
    let mut cross = plain_with_header(server, &encode_v2(other, server));
    assert_eq!(cross.mapped(), other, "header of the other family");
    let peer = EchoPeer::start();
    cross.must_allocate();
    cross.must_bind_channel(0x4000, peer.addr);
    cross.echo_round_trips(0x4000, 5, Duration::from_secs(5));
    let created = d.wait_events("allocation created", 1, METRIC_WAIT, |_| true);
    assert_eq!(common::field(&created[0], "client"), other.to_string());

    // Each connection keeps its own address.
    assert_eq!(v2.mapped(), claimed(ip, 40000));
    assert_eq!(v1.mapped(), claimed(ip, 40001));
    assert_eq!(
        d.metric(&series("connections_accepted_total", "tcp", None)),
        4.0
    );
    assert_eq!(d.metric(&setup_failures("tcp", "proxy_header")), 0.0);
}

#[test]
fn proxy_v1_and_v2_headers_name_the_client_over_tcp() {
    proxy_headers_name_the_client_over_tcp("127.0.0.1");
}

#[test]
fn proxy_v1_and_v2_headers_name_the_client_over_tcp_on_ipv6() {
    proxy_headers_name_the_client_over_tcp("::1");
}

fn proxy_headers_before_the_client_hello(ip: &'static str) {
    let _s = serial();
    let cert = TestCert::new();
    let listen = ip_port(ip, 0);
    let d = Daemon::with(options_on(ip).edit(cert.listen_on(ip)).edit(move |c| {
        c.proxy_protocol.listeners = vec![listen];
    }));
    let server = d.tls_addr.expect("a TLS listener");
    let tls = TlsClient::new(&cert).server_name(ip);

    let mut v2 = tls_with_header(server, &encode_v2(claimed(ip, 40000), server), &tls);
    assert_eq!(v2.mapped(), claimed(ip, 40000), "v2 header, then TLS");
    let mut v1 = tls_with_header(server, &v1_header(claimed(ip, 40001), server), &tls);
    assert_eq!(v1.mapped(), claimed(ip, 40001), "v1 header, then TLS");
    // Header and ClientHello in one write, and both a byte at a time.
    let header = encode_v2(claimed(ip, 40003), server);
    let (mut one, _) = StreamClient::tls_split(tcp_connect(server), &tls, &header, usize::MAX);
    assert_eq!(
        one.mapped(),
        claimed(ip, 40003),
        "header and ClientHello in one write"
    );
    let header = v1_header(claimed(ip, 40004), server);
    let (mut bytewise, _) = StreamClient::tls_split(tcp_connect(server), &tls, &header, 1);
    assert_eq!(
        bytewise.mapped(),
        claimed(ip, 40004),
        "header and ClientHello bytewise"
    );
    // Plain TCP after the header on the same port: told apart after the header, not before.
    let mut plain = plain_with_header(server, &encode_v2(claimed(ip, 40002), server));
    assert_eq!(
        plain.mapped(),
        claimed(ip, 40002),
        "v2 header, then plain TCP"
    );

    // A TLS client without the header is closed; the others keep working.
    let mut bare = tcp_connect(server);
    let hello = {
        let mut conn = tls.connection();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    };
    bare.write_all(&hello).unwrap();
    let probe = bare.try_clone().unwrap();
    assert!(
        common::wait_closed(&mut bare, &probe, CLOSE_WAIT),
        "a ClientHello without a PROXY header is closed"
    );
    d.wait_metric_until(&setup_failures("tls", "proxy_header"), METRIC_WAIT, |v| {
        v == 1.0
    });
    assert_eq!(v2.mapped(), claimed(ip, 40000));
    assert_eq!(v1.mapped(), claimed(ip, 40001));
    assert_eq!(
        d.metric(&series("connections_accepted_total", "tls", None)),
        4.0
    );
    assert_eq!(
        d.metric(&series("connections_accepted_total", "tcp", None)),
        1.0
    );
}

#[test]
fn proxy_headers_before_the_client_hello_on_a_tls_listener() {
    proxy_headers_before_the_client_hello("127.0.0.1");
}

#[test]
fn proxy_headers_before_the_client_hello_on_a_tls_listener_on_ipv6() {
    proxy_headers_before_the_client_hello("::1");
}

#[test]
fn bad_missing_and_stalled_proxy_headers_close_only_their_connection() {
    let _s = serial();
    let d = proxied_tcp("127.0.0.1", |c| c.tls.handshake_timeout_secs = 2);
    let server = d.tcp_addr.unwrap();
    let mut good = plain_with_header(server, &encode_v2(claimed("127.0.0.1", 1), server));
    assert_eq!(good.mapped(), claimed("127.0.0.1", 1));

    let mut bad_v2 = encode_v2(claimed("127.0.0.1", 2), server);
    bad_v2[12] = 0x31; // version 3
    let bad: [(&str, Vec<u8>); 3] = [
        ("garbage", b"GARBAGE / HTTP/1.1\r\n\r\n".to_vec()),
        ("v2 with version 3", bad_v2),
        (
            "v1 with a bad port",
            b"PROXY TCP4 198.51.100.7 127.0.0.1 99999 1\r\n".to_vec(),
        ),
    ];
    for (i, (what, header)) in bad.iter().enumerate() {
        let mut c = plain_with_header(server, header);
        assert!(c.closed_by_server(CLOSE_WAIT), "{what}: closed");
        d.wait_metric_until(&setup_failures("tcp", "proxy_header"), METRIC_WAIT, |v| {
            v == (i + 1) as f64
        });
    }
    // No header at all: a TURN client talking straight to the listener.
    let mut bare = StreamClient::plain(server);
    assert!(
        bare.binding().is_err(),
        "a Binding without a PROXY header gets no answer"
    );
    assert!(bare.closed_by_server(CLOSE_WAIT));
    d.wait_metric_until(&setup_failures("tcp", "proxy_header"), METRIC_WAIT, |v| {
        v == 4.0
    });

    // Half a header, then nothing: closed at the setup timeout, counted as one.
    let started = Instant::now();
    let mut stalled = plain_with_header(server, b"PROXY TCP4 198.51");
    assert!(
        stalled.closed_by_server(CLOSE_WAIT),
        "a stalled header is closed"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "closed after {:?}, before the 2 s setup timeout",
        started.elapsed()
    );
    d.wait_metric_until(&setup_failures("tcp", "timeout"), METRIC_WAIT, |v| v == 1.0);

    // The first client never noticed; a new one is served.
    assert_eq!(good.mapped(), claimed("127.0.0.1", 1));
    let mut next = plain_with_header(server, &v1_header(claimed("127.0.0.1", 3), server));
    assert_eq!(next.mapped(), claimed("127.0.0.1", 3));
    assert_eq!(d.metric(&setup_failures("tcp", "proxy_header")), 4.0);
    assert_eq!(d.metric(&open("tcp")), 2.0);
}

#[test]
fn a_proxy_header_from_an_untrusted_source_is_refused() {
    let _s = serial();
    let d = proxied_tcp("127.0.0.1", |c| {
        c.proxy_protocol.trusted = vec!["127.0.0.1/32".parse().unwrap()];
    });
    let server = d.tcp_addr.unwrap();
    let header = encode_v2(claimed("127.0.0.1", 5), server);

    let tcp = tcp_connect_from("127.0.0.2:0".parse().unwrap(), server);
    let mut untrusted = StreamClient::over(Box::new(tcp.try_clone().unwrap()), tcp);
    let _ = untrusted.write_raw(&header);
    assert!(
        untrusted.binding().is_err(),
        "an untrusted balancer gets no answer"
    );
    assert!(untrusted.closed_by_server(CLOSE_WAIT));
    d.wait_metric_until(&setup_failures("tcp", "proxy_header"), METRIC_WAIT, |v| {
        v == 1.0
    });

    let mut trusted = plain_with_header(server, &header);
    assert_eq!(trusted.mapped(), claimed("127.0.0.1", 5));
    assert_eq!(
        d.metric(&series("connections_accepted_total", "tcp", None)),
        1.0
    );
}

#[test]
fn quotas_count_the_address_in_the_proxy_header() {
    let _s = serial();
    let d = proxied_tcp("127.0.0.1", |c| {
        c.limits.connections_per_source = 2;
        c.limits.allocations_per_user = 1;
    });
    let server = d.tcp_addr.unwrap();
    let from = |ip: &str, port: u16| -> SocketAddr { format!("{ip}:{port}").parse().unwrap() };
    let connect = |source: SocketAddr| plain_with_header(server, &encode_v2(source, server));

    let mut a1 = connect(from("198.51.100.7", 1));
    let mut a2 = connect(from("198.51.100.7", 2));
    assert_eq!(a1.mapped(), from("198.51.100.7", 1));
    assert_eq!(a2.mapped(), from("198.51.100.7", 2));
    // A third connection claiming the same client is over connections_per_source...
    let mut a3 = connect(from("198.51.100.7", 3));
    assert!(
        a3.closed_by_server(CLOSE_WAIT),
        "third connection of 198.51.100.7"
    );
    d.wait_metric_until(&refused("tcp", "per_source_limit"), METRIC_WAIT, |v| {
        v == 1.0
    });
    // ...while another claimed client is not, though every socket comes from 127.0.0.1.
    let mut b = connect(from("198.51.100.8", 1));
    assert_eq!(b.mapped(), from("198.51.100.8", 1));

    // The static user's allocation quota is per user and source address: the header's.
    a1.must_allocate();
    assert_eq!(
        a2.allocate().code(),
        Some(486),
        "second allocation of 198.51.100.7"
    );
    b.must_allocate();
    let created = d.wait_events("allocation created", 2, METRIC_WAIT, |_| true);
    let clients: Vec<&str> = created.iter().map(|e| common::field(e, "client")).collect();
    assert_eq!(clients, ["198.51.100.7:1", "198.51.100.8:1"]);
    assert_eq!(d.metric("turnpike_allocations{transport=\"tcp\"}"), 2.0);
}

// ---------------------------------------------------------------------------------------- TLS

fn tls_client_relays_both_ways(ip: &'static str) {
    let _s = serial();
    let cert = TestCert::new();
    let d = Daemon::with(options_on(ip).edit(cert.listen_on(ip)));
    let peer = EchoPeer::start();
    let (mut c, info) =
        StreamClient::tls(d.tls_addr.unwrap(), &TlsClient::new(&cert).server_name(ip));
    assert_eq!(info.peer_cert, cert.cert_der, "the configured certificate");

    let relayed = c.must_allocate();
    let (lo, hi) = d.relay_ports;
    assert!((lo..=hi).contains(&relayed.port()), "relayed {relayed}");
    assert_eq!(d.metric("turnpike_allocations{transport=\"tls\"}"), 1.0);

    // Send indication out, Data indication back.
    c.must_permit(peer.addr);
    for i in 0..5 {
        let payload = format!("send indication {i}").into_bytes();
        c.send_indication(peer.addr, &payload).unwrap();
        let (from, data) = c
            .recv_data(Duration::from_secs(5))
            .expect("connection up")
            .unwrap_or_else(|| panic!("no Data indication for {i}"));
        assert_eq!((from, data), (peer.addr, payload));
    }
    // ChannelData both ways, including sizes that need padding.
    c.must_bind_channel(0x4000, peer.addr);
    c.echo_round_trips(0x4000, 20, Duration::from_secs(5));
    // Up to the largest datagram IPv4 carries: several TLS records per frame.
    for len in [1usize, 2, 3, 5, 1200, 4001, 16_000, 16_385, 40_000, 65_000] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        c.send_channel_data(0x4000, &payload).unwrap();
        let back = c
            .recv_channel_data(0x4000, Duration::from_secs(5))
            .unwrap()
            .unwrap_or_else(|| panic!("no echo of {len} bytes"));
        assert_eq!(back, payload, "{len} bytes");
    }
    wait_echoed(&peer, 35);
    assert!(
        d.metric(&series(
            "connection_bytes_total",
            "tls",
            Some(("direction", "in"))
        )) > 0.0
    );
    assert!(
        d.metric(&series(
            "connection_bytes_total",
            "tls",
            Some(("direction", "out"))
        )) > 0.0
    );

    // The allocation ends with its connection.
    drop(c);
    d.wait_metric_until(
        "turnpike_allocations{transport=\"tls\"}",
        METRIC_WAIT,
        |v| v == 0.0,
    );
    d.wait_metric_until(&open("tls"), METRIC_WAIT, |v| v == 0.0);
}

#[test]
fn a_tls_client_allocates_and_relays_both_ways() {
    tls_client_relays_both_ways("127.0.0.1");
}

#[test]
fn a_tls_client_allocates_and_relays_both_ways_on_ipv6() {
    tls_client_relays_both_ways("::1");
}

#[test]
fn alpn_stun_turn_is_negotiated_and_not_required() {
    let _s = serial();
    let cert = TestCert::new();
    let d = Daemon::with(Options::with_api().edit(cert.listen_on("127.0.0.1")));
    let server = d.tls_addr.unwrap();
    type Case<'a> = (&'a [&'a [u8]], Option<&'a [u8]>);
    let cases: [Case; 4] = [
        (&[b"stun.turn"], Some(b"stun.turn")),
        (&[b"h2", b"stun.turn"], Some(b"stun.turn")),
        (&[b"h2"], None),
        (&[], None),
    ];
    for (offer, want) in cases {
        let (mut c, info) = StreamClient::tls(server, &TlsClient::new(&cert).alpn(offer));
        assert_eq!(info.alpn.as_deref(), want, "offered {offer:?}");
        let own = c.local();
        assert_eq!(c.mapped(), own, "offered {offer:?}");
    }
    assert_eq!(
        d.metric(&series("connections_accepted_total", "tls", None)),
        4.0
    );
}

#[test]
fn tls12_only_and_tls13_only_clients_both_work() {
    let _s = serial();
    let cert = TestCert::new();
    let d = Daemon::with(Options::with_api().edit(cert.listen_on("127.0.0.1")));
    let peer = EchoPeer::start();
    for (version, want) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let tls = TlsClient::new(&cert).versions(&[version]);
        let (mut c, info) = StreamClient::tls(d.tls_addr.unwrap(), &tls);
        assert_eq!(info.version, Some(want));
        c.must_allocate();
        c.must_bind_channel(0x4001, peer.addr);
        c.echo_round_trips(0x4001, 5, Duration::from_secs(5));
    }
}

#[test]
fn a_client_that_does_not_trust_the_certificate_fails_and_is_counted() {
    let _s = serial();
    let cert = TestCert::new();
    let d = Daemon::with(Options::with_api().edit(cert.listen_on("127.0.0.1")));
    let server = d.tls_addr.unwrap();
    let failures = || {
        let m = d.metrics();
        let get = |s: &str| m.get(s).copied().unwrap_or_default();
        get(&setup_failures("tls", "tls_error")) + get(&setup_failures("tls", "tls_hung_up"))
    };
    assert_eq!(failures(), 0.0);

    let stranger = TestCert::new();
    let untrusting = TlsClient::new(&stranger);
    let Err(err) = untrusting.connect(tcp_connect(server)) else {
        panic!("a client that does not trust the CA connected");
    };
    assert!(err.to_string().contains("certificate"), "{err}");
    let deadline = Instant::now() + METRIC_WAIT;
    while failures() < 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(failures(), 1.0, "one setup failure for the unknown CA");

    // A name the certificate does not carry fails as well.
    let wrong_name = TlsClient::new(&cert).server_name("turn.example.org");
    assert!(
        wrong_name.connect(tcp_connect(server)).is_err(),
        "a wrong name fails"
    );
    let deadline = Instant::now() + METRIC_WAIT;
    while failures() < 2.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(failures(), 2.0, "one more setup failure for the wrong name");
    // rustls says why with an alert, which the daemon reads as a TLS error.
    assert_eq!(d.metric(&setup_failures("tls", "tls_error")), 2.0);

    // A client that hangs up after its ClientHello (as one that does not trust us without
    // saying so): counted as hung up.
    let mut quitter = tcp_connect(server);
    let mut hello = Vec::new();
    TlsClient::new(&cert)
        .connection()
        .write_tls(&mut hello)
        .unwrap();
    quitter.write_all(&hello).unwrap();
    quitter.shutdown(std::net::Shutdown::Write).unwrap();
    let probe = quitter.try_clone().unwrap();
    assert!(common::wait_closed(&mut quitter, &probe, CLOSE_WAIT));
    d.wait_metric_until(&setup_failures("tls", "tls_hung_up"), METRIC_WAIT, |v| {
        v == 1.0
    });
    assert_eq!(failures(), 3.0);

    // The daemon serves the next client, and none of the failures was counted as accepted.
    let (mut c, _) = StreamClient::tls(server, &TlsClient::new(&cert));
    c.must_allocate();
    assert_eq!(
        d.metric(&series("connections_accepted_total", "tls", None)),
        1.0
    );
    assert_eq!(d.metric(&open("tls")), 1.0);
}

#[test]
fn plain_tcp_and_tls_share_the_tls_port() {
    let _s = serial();
    let cert = TestCert::new();
    let d = Daemon::with(Options::with_api().edit(cert.listen_on("127.0.0.1")));
    let server = d.tls_addr.unwrap();
    let (mut tls, _) = StreamClient::tls(server, &TlsClient::new(&cert));
    let mut plain = StreamClient::plain(server);
    tls.must_allocate();
    plain.must_allocate();
    assert_eq!(d.metric("turnpike_allocations{transport=\"tls\"}"), 1.0);
    assert_eq!(d.metric("turnpike_allocations{transport=\"tcp\"}"), 1.0);
}

// ---------------------------------------------------------------------------- certificate reload

/// What the relaying thread saw.
#[derive(Debug, Default)]
struct RelayLog {
    round_trips: u64,
    /// The longest wait for one echo.
    slowest: Duration,
    failure: Option<String>,
}

/// Replaces `path` with `bytes` by write-then-rename, as a certificate renewal tool would.
fn replace_file(path: &std::path::Path, bytes: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn a_certificate_reload_under_load_keeps_relaying_and_refuses_a_broken_file() {
    let _s = serial();
    let first = TestCert::new();
    let mut d = Daemon::with(Options::with_api().edit(first.listen_on("127.0.0.1")));
    let server = d.tls_addr.unwrap();
    let peer = EchoPeer::start();

    // A client relays ChannelData round trips in a thread until told to stop (bounded: 60 s,
    // 100000 round trips).
    let (mut c, info) = StreamClient::tls(server, &TlsClient::new(&first));
    assert_eq!(info.peer_cert, first.cert_der);
    c.must_allocate();
    c.must_bind_channel(0x4000, peer.addr);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let (flag, count) = (Arc::clone(&stop), Arc::clone(&done));
    let relay = std::thread::spawn(move || {
        let mut log = RelayLog::default();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !flag.load(Ordering::Relaxed)
            && Instant::now() < deadline
            && log.round_trips < 100_000
        {
            let payload = format!("under reload {}", log.round_trips).into_bytes();
            let sent = Instant::now();
            if let Err(e) = c.send_channel_data(0x4000, &payload) {
                log.failure = Some(format!("send {}: {e}", log.round_trips));
                break;
            }
            match c.recv_channel_data(0x4000, Duration::from_secs(5)) {
                Ok(Some(back)) if back == payload => {}
                other => {
                    log.failure = Some(format!("round trip {}: {other:?}", log.round_trips));
                    break;
                }
            }
            log.slowest = log.slowest.max(sent.elapsed());
            log.round_trips += 1;
            count.store(log.round_trips, Ordering::Relaxed);
        }
        log
    });
    let wait_round_trips = |past: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while done.load(Ordering::Relaxed) < past + 50 {
            assert!(
                Instant::now() < deadline && !relay.is_finished(),
                "relaying stalled at {} round trips",
                done.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        done.load(Ordering::Relaxed)
    };
    let mut seen = wait_round_trips(0);

    // A renewal: new certificate and key in place, then SIGHUP.
    let second = TestCert::new();
    replace_file(&first.key, &std::fs::read(&second.key).unwrap());
    replace_file(&first.cert, &std::fs::read(&second.cert).unwrap());
    d.sighup();
    d.wait_metric("turnpike_reloads_total{result=\"ok\"}", 1.0, METRIC_WAIT);
    seen = wait_round_trips(seen);
    // New connections get the new certificate (a client trusting only the new CA).
    let (mut fresh, info) = StreamClient::tls(server, &TlsClient::new(&second));
    assert_eq!(
        info.peer_cert, second.cert_der,
        "the new certificate after the reload"
    );
    assert_ne!(info.peer_cert, first.cert_der);
    fresh.must_allocate();
    assert!(
        TlsClient::new(&first).connect(tcp_connect(server)).is_err(),
        "the old CA no longer verifies"
    );
    seen = wait_round_trips(seen);

    // A broken file: the reload is refused and the good certificate stays.
    replace_file(
        &first.cert,
        b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
    );
    d.sighup();
    d.wait_metric(
        "turnpike_reloads_total{result=\"failed\"}",
        1.0,
        METRIC_WAIT,
    );
    d.wait_log(METRIC_WAIT, "reload refused", |l| {
        l.contains("reload refused")
    });
    let (mut after, info) = StreamClient::tls(server, &TlsClient::new(&second));
    assert_eq!(
        info.peer_cert, second.cert_der,
        "the previous good certificate stays"
    );
    after.must_allocate();
    wait_round_trips(seen);
    assert_eq!(d.metric("turnpike_reloads_total{result=\"ok\"}"), 1.0);

    stop.store(true, Ordering::Relaxed);
    let log = relay.join().expect("the relaying thread");
    assert_eq!(log.failure, None, "relaying stopped: {log:?}");
    assert!(log.round_trips >= 200, "{log:?}");
    // The open connection kept its session throughout: the same one carried every round trip.
    assert_eq!(
        d.metric(&series("connections_accepted_total", "tls", None)),
        3.0
    );
}

// ------------------------------------------------------------------------------------- abuse

/// A socket the test watches for the server's close.
struct Watched {
    tcp: TcpStream,
    opened: Instant,
    closed_after: Option<Duration>,
}

#[test]
fn stalled_connections_time_out_without_piling_up() {
    let _s = serial();
    const SILENT: usize = 100;
    const PARTIAL: usize = 100;
    const TIMEOUT_SECS: u64 = 3;
    let cert = TestCert::new();
    let d = Daemon::with(
        Options::with_api()
            .edit(cert.listen_on("127.0.0.1"))
            .edit(|c| {
                c.tls.handshake_timeout_secs = TIMEOUT_SECS;
            }),
    );
    let server = d.tls_addr.unwrap();
    let tls = TlsClient::new(&cert);
    // Warm up, so the baseline includes what the first handshake allocates once.
    StreamClient::tls(server, &tls).0.mapped();
    d.wait_metric_until(&open("tls"), METRIC_WAIT, |v| v == 0.0);
    let rss_before = d.rss_kib();

    let hello = {
        let mut conn = tls.connection();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    };
    let mut watched: Vec<Watched> = (0..SILENT + PARTIAL)
        .map(|i| {
            let mut tcp = tcp_connect(server);
            if i >= SILENT {
                tcp.write_all(&hello[..hello.len() / 2]).unwrap();
            }
            Watched {
                tcp,
                opened: Instant::now(),
                closed_after: None,
            }
        })
        .collect();

    // Meanwhile the daemon serves others: UDP, and a new TLS client.
    let mut udp = TurnClient::new(d.addr, USER, PASSWORD);
    let binding = udp.binding().expect("UDP Binding while connections stall");
    assert_eq!(binding.class(), Class::Success);
    let (mut c, _) = StreamClient::tls(server, &tls);
    c.must_allocate();
    let rss_during = d.rss_kib();

    // Every stalled connection is closed, none before the timeout.
    let deadline = Instant::now() + Duration::from_secs(TIMEOUT_SECS + 30);
    for w in &watched {
        w.tcp.set_nonblocking(true).unwrap();
    }
    let mut buf = [0u8; 256];
    while watched.iter().any(|w| w.closed_after.is_none()) && Instant::now() < deadline {
        for w in watched.iter_mut().filter(|w| w.closed_after.is_none()) {
            if (&w.tcp).read_ok(&mut buf) == Some(true) {
                w.closed_after = Some(w.opened.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let open_still = watched.iter().filter(|w| w.closed_after.is_none()).count();
    assert_eq!(
        open_still, 0,
        "stalled connections still open after the timeout"
    );
    let earliest = watched.iter().filter_map(|w| w.closed_after).min().unwrap();
    assert!(
        earliest >= Duration::from_millis(TIMEOUT_SECS * 1000 - 100),
        "a stalled connection was closed after {earliest:?}, before the {TIMEOUT_SECS} s timeout"
    );
    d.wait_metric_until(&setup_failures("tls", "timeout"), METRIC_WAIT, |v| {
        v == (SILENT + PARTIAL) as f64
    });
    drop(watched);
    // The served client is the only connection left, and still relays.
    assert_eq!(d.metric(&open("tls")), 1.0);
    assert_eq!(c.mapped().ip(), c.local().ip());
    drop(c);
    d.wait_metric_until(&open("tls"), METRIC_WAIT, |v| v == 0.0);
    assert_eq!(d.metric(&open("tcp")), 0.0);
    let rss_after = d.rss_kib();
    eprintln!("daemon VmRSS: {rss_before} KiB before, {rss_during} KiB with 200 stalled, {rss_after} KiB after");
    // Generous: 200 stalled connections are a few MiB at most.
    assert!(
        rss_during < rss_before + 64 * 1024,
        "RSS grew from {rss_before} to {rss_during} KiB"
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS stayed at {rss_after} KiB (from {rss_before})"
    );
}

/// Non-blocking look at a socket: Some(true) when the peer closed it (EOF or reset), Some(false)
/// when data came, None when nothing is there yet.
trait ReadOk {
    fn read_ok(self, buf: &mut [u8]) -> Option<bool>;
}

impl ReadOk for &TcpStream {
    fn read_ok(mut self, buf: &mut [u8]) -> Option<bool> {
        use std::io::Read as _;
        match self.read(buf) {
            Ok(0) => Some(true),
            Ok(_) => Some(false),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => None,
            Err(_) => Some(true),
        }
    }
}

/// Opens `limit` connections, sees the next one closed and counted as `reason`, closes one and
/// sees a new one served.
fn a_connection_limit_holds(
    limit: usize,
    reason: &str,
    edit: impl Fn(&mut turnpike::config::Config) + Send + Sync + 'static,
) {
    let _s = serial();
    let listen = ip_port("127.0.0.1", 0);
    let d = Daemon::with(Options::with_api().edit(move |c| {
        c.tcp_listen = vec![listen];
        edit(c);
    }));
    let server = d.tcp_addr.unwrap();
    let mut held: Vec<StreamClient> = (0..limit).map(|_| StreamClient::plain(server)).collect();
    for c in &mut held {
        let own = c.local();
        assert_eq!(c.mapped(), own);
    }
    let mut over = StreamClient::plain(server);
    assert!(
        over.closed_by_server(CLOSE_WAIT),
        "connection {} is closed",
        limit + 1
    );
    d.wait_metric_until(&refused("tcp", reason), METRIC_WAIT, |v| v == 1.0);
    assert!(over.binding().is_err());
    // The held ones still work.
    for c in &mut held {
        assert!(c.binding().is_ok());
    }
    assert_eq!(d.metric(&open("tcp")), limit as f64);

    // One closes: once the daemon has seen it go, a new connection takes its place.
    drop(held.pop());
    d.wait_metric_until(&open("tcp"), METRIC_WAIT, |v| v == (limit - 1) as f64);
    let mut next = StreamClient::plain(server);
    let own = next.local();
    assert_eq!(next.mapped(), own, "a new connection after one closed");
    held.push(next);
    // And the limit holds again.
    let mut over = StreamClient::plain(server);
    assert!(over.closed_by_server(CLOSE_WAIT));
    d.wait_metric_until(&refused("tcp", reason), METRIC_WAIT, |v| v == 2.0);
    let other = if reason == "total_limit" {
        "per_source_limit"
    } else {
        "total_limit"
    };
    assert_eq!(d.metric(&refused("tcp", other)), 0.0);
}

#[test]
fn connections_per_source_is_a_limit() {
    a_connection_limit_holds(3, "per_source_limit", |c| {
        c.limits.connections_per_source = 3
    });
}

#[test]
fn connections_total_is_a_limit() {
    a_connection_limit_holds(5, "total_limit", |c| c.limits.connections_total = 5);
}

#[test]
fn idle_connections_without_an_allocation_are_closed() {
    let _s = serial();
    const IDLE_SECS: u64 = 5;
    let cert = TestCert::new();
    let listen = ip_port("127.0.0.1", 0);
    let d = Daemon::with(
        Options::with_api()
            .edit(cert.listen_on("127.0.0.1"))
            .edit(move |c| {
                c.tcp_listen = vec![listen];
                c.limits.connection_idle_secs = IDLE_SECS;
            }),
    );
    let server = d.tcp_addr.unwrap();
    // Silent from the start, one Binding then silence, and one over TLS: all idle.
    let silent_since = Instant::now();
    let mut silent = StreamClient::plain(server);
    let mut bound = StreamClient::plain(server);
    let own = bound.local();
    assert_eq!(bound.mapped(), own);
    let bound_since = Instant::now();
    let (mut tls_idle, _) = StreamClient::tls(d.tls_addr.unwrap(), &TlsClient::new(&cert));
    tls_idle.mapped();
    let tls_since = Instant::now();
    // One with an allocation, silent as well: it stays.
    let mut holder = StreamClient::plain(server);
    holder.must_allocate();
    let holder_since = Instant::now();

    for (what, c, since) in [
        ("silent", &mut silent, silent_since),
        ("after a Binding", &mut bound, bound_since),
        ("tls", &mut tls_idle, tls_since),
    ] {
        assert!(
            c.closed_by_server(Duration::from_secs(IDLE_SECS + 20)),
            "{what}: closed"
        );
        assert!(
            since.elapsed() >= Duration::from_millis(IDLE_SECS * 1000 - 100),
            "{what}: closed after {:?}, before the idle timeout",
            since.elapsed()
        );
    }
    d.wait_metric_until(
        &series("connections_closed_idle_total", "tcp", None),
        METRIC_WAIT,
        |v| v == 2.0,
    );
    d.wait_metric_until(
        &series("connections_closed_idle_total", "tls", None),
        METRIC_WAIT,
        |v| v == 1.0,
    );

    // The holder has been silent for two idle periods and is still served.
    while holder_since.elapsed() < Duration::from_secs(2 * IDLE_SECS + 1) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let own = holder.local();
    assert_eq!(
        holder.mapped(),
        own,
        "a connection with an allocation is not idle"
    );
    assert_eq!(d.metric(&open("tcp")), 1.0);
    assert_eq!(d.metric("turnpike_allocations{transport=\"tcp\"}"), 1.0);
}

// ---------------------------------------------------------------------------------- aioice

const AIOICE_TIMEOUT: Duration = Duration::from_secs(60);

/// A Python that imports aioice, or None (skipped loudly; a failure when `CI` is set).
fn aioice_python() -> Option<std::path::PathBuf> {
    let why = match common::find_python("import aioice") {
        Ok(py) => return Some(py),
        Err(why) => why,
    };
    let msg = format!(
        "no Python with aioice (scripts/test.sh installs it into target/py-aiortc; or set \
         TURNPIKE_PYTHON): {why}"
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}; CI is set, so this is a failure, not a skip");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPING aioice test: {msg}");
    None
}

/// Runs `tests/aioice_turn.py URI` against the echo peer, killed after [`AIOICE_TIMEOUT`];
/// its JSON report.
fn aioice(
    python: &std::path::Path,
    uri: &str,
    peer: SocketAddr,
    ca: &std::path::Path,
) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/aioice_turn.py");
    let child = Command::new(python)
        .arg(script)
        .args([uri, USER, PASSWORD, &peer.to_string()])
        .env("SSL_CERT_FILE", ca)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(AIOICE_TIMEOUT) {
        Ok(out) => out.expect("wait for python3"),
        Err(_) => {
            // SAFETY: kill(2) on our own child, not yet reaped (its waiter is still waiting).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let out = rx.recv().unwrap().expect("wait for python3");
            panic!(
                "aioice ran past {AIOICE_TIMEOUT:?} for {uri}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "aioice failed for {uri} ({}):\n{stdout}\n{stderr}",
        out.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("aioice printed no JSON ({e}) for {uri}:\n{stdout}\n{stderr}"))
}

#[test]
fn aioice_allocates_and_relays_over_tcp_and_tls() {
    let Some(python) = aioice_python() else {
        return;
    };
    let _s = serial();
    let cert = TestCert::new();
    let listen = ip_port("127.0.0.1", 0);
    let d = Daemon::with(
        Options::with_api()
            .edit(cert.listen_on("127.0.0.1"))
            .edit(move |c| {
                c.tcp_listen = vec![listen];
            }),
    );
    let peer = EchoPeer::start();
    let (tcp, tls) = (d.tcp_addr.unwrap(), d.tls_addr.unwrap());
    let runs = [
        (format!("turn:{tcp}?transport=tcp"), "tcp"),
        (format!("turns:{tls}?transport=tcp"), "tls"),
        // Plain TCP to the TLS port, the way one port 443 serves both.
        (format!("turn:{tls}?transport=tcp"), "tcp"),
    ];
    for (i, (uri, transport)) in runs.iter().enumerate() {
        let report = aioice(&python, uri, peer.addr, &cert.ca);
        assert_eq!(report["echoed"], true, "{uri}: {report}");
        let relayed: SocketAddr = report["relayed"].as_str().unwrap().parse().unwrap();
        let (lo, hi) = d.relay_ports;
        assert!(
            (lo..=hi).contains(&relayed.port()),
            "{uri}: relayed {relayed}"
        );
        let mapped: SocketAddr = report["mapped"].as_str().unwrap().parse().unwrap();
        assert_eq!(mapped.ip().to_string(), "127.0.0.1", "{uri}");
        let created = d.wait_events("allocation created", i + 1, METRIC_WAIT, |_| true);
        assert_eq!(common::field(&created[i], "transport"), *transport, "{uri}");
        assert_eq!(
            common::field(&created[i], "client"),
            mapped.to_string(),
            "{uri}"
        );
    }
    wait_echoed(&peer, 3);
    assert_eq!(
        d.metric(&series("connections_accepted_total", "tls", None)),
        1.0
    );
    assert_eq!(
        d.metric(&series("connections_accepted_total", "tcp", None)),
        2.0
    );
}

// ------------------------------------------------------------------------------ edge cases

/// A Binding request as bytes, with a transaction id of the caller's.
fn binding_request(txid: [u8; 12]) -> Vec<u8> {
    let mut req = Vec::new();
    MessageWriter::new(&mut req, method::BINDING, Class::Request, txid);
    req
}

/// Reads `io` to its end (bounded: 10 s); what came.
fn read_to_end_bounded(io: &mut dyn std::io::Read, tcp: &TcpStream) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        tcp.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match io.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    got
}

/// The whole frames at the start of `bytes`.
fn frames_in(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(len) = common::stream_frame_len(bytes).filter(|&l| l <= bytes.len()) {
        out.push(bytes[..len].to_vec());
        bytes = &bytes[len..];
    }
    out
}

/// Two Binding requests, then the client closes its side (`close` on the stream it wrote
/// to); both answers must still arrive before the server's close.
fn answered_after_close<S: std::io::Read + std::io::Write>(
    what: &str,
    mut stream: S,
    probe: &TcpStream,
    close: impl FnOnce(&mut S),
) {
    let txids = [[0x11; 12], [0x22; 12]];
    let mut bytes = binding_request(txids[0]);
    bytes.extend(binding_request(txids[1]));
    stream.write_all(&bytes).unwrap();
    close(&mut stream);
    let got = read_to_end_bounded(&mut stream, probe);
    let answers: Vec<[u8; 12]> = frames_in(&got)
        .iter()
        .map(|f| f[8..20].try_into().unwrap())
        .collect();
    assert_eq!(answers, txids, "{what}: answers before the server closed");
}

const CLOSE_TRIES: usize = 20;

#[test]
fn requests_sent_just_before_a_tcp_half_close_are_answered() {
    let _s = serial();
    let listen = ip_port("127.0.0.1", 0);
    let cert = TestCert::new();
    let d = Daemon::with(
        Options::with_api()
            .edit(cert.listen_on("127.0.0.1"))
            .edit(move |c| {
                c.tcp_listen = vec![listen];
            }),
    );
    for server in [d.tcp_addr.unwrap(), d.tls_addr.unwrap()] {
        for i in 0..CLOSE_TRIES {
            let tcp = tcp_connect(server);
            let probe = tcp.try_clone().unwrap();
            answered_after_close(&format!("{server} try {i}"), tcp, &probe, |t| {
                t.shutdown(std::net::Shutdown::Write).unwrap()
            });
        }
    }
}

#[test]
fn requests_sent_just_before_a_tls_close_notify_are_answered() {
    let _s = serial();
    let cert = TestCert::new();
    let d = Daemon::with(Options::with_api().edit(cert.listen_on("127.0.0.1")));
    let tls = TlsClient::new(&cert);
    for i in 0..CLOSE_TRIES {
        let (stream, _) = tls.connect(tcp_connect(d.tls_addr.unwrap())).unwrap();
        let probe = stream.sock.try_clone().unwrap();
        answered_after_close(&format!("try {i}"), stream, &probe, |s| {
            s.conn.send_close_notify();
            s.flush().unwrap();
        });
    }
}

#[test]
fn a_client_hello_a_byte_at_a_time_completes() {
    let _s = serial();
    let cert = TestCert::new();
    let d = Daemon::with(Options::with_api().edit(cert.listen_on("127.0.0.1")));
    let (mut c, info) = StreamClient::tls_split(
        tcp_connect(d.tls_addr.unwrap()),
        &TlsClient::new(&cert),
        &[],
        1,
    );
    assert_eq!(info.alpn.as_deref(), Some(&b"stun.turn"[..]));
    let own = c.local();
    assert_eq!(c.mapped(), own);
}

#[test]
fn a_bad_record_after_the_handshake_closes_the_connection_but_is_no_setup_failure() {
    let _s = serial();
    let cert = TestCert::new();
    let d = Daemon::with(Options::with_api().edit(cert.listen_on("127.0.0.1")));
    let server = d.tls_addr.unwrap();
    let tls = TlsClient::new(&cert);
    let (mut c, _) = StreamClient::tls(server, &tls);
    c.must_allocate();
    let (mut other, _) = StreamClient::tls(server, &tls);
    other.must_allocate();
    // A session set up and served (its Binding answered), then an application-data record
    // that does not decrypt, written under the TLS layer.
    let tcp = tcp_connect(server);
    let mut raw = tcp.try_clone().unwrap();
    let (mut bad, _) = StreamClient::tls_over(tcp, &tls);
    let own = bad.local();
    assert_eq!(bad.mapped(), own);
    let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x40];
    record.extend([0xAB; 0x40]);
    raw.write_all(&record).unwrap();
    assert!(bad.closed_by_server(CLOSE_WAIT), "closed");
    d.wait_metric_until(&open("tls"), METRIC_WAIT, |v| v == 2.0);
    assert_eq!(
        d.metric(&series("connections_accepted_total", "tls", None)),
        3.0
    );
    // Its setup was done: the setup-failure series stay at 0.
    for reason in ["tls_error", "tls_hung_up", "timeout", "proxy_header"] {
        assert_eq!(d.metric(&setup_failures("tls", reason)), 0.0, "{reason}");
    }
    // The others relay on.
    assert!(c.binding().is_ok() && other.binding().is_ok());
}

#[test]
fn a_proxy_header_repeating_a_live_clients_address_closes_only_the_newcomer() {
    let _s = serial();
    // One shard: each shard knows its own connections, and which shard accepts is the
    // kernel's choice (across shards both are served, each by its own core).
    let listen = ip_port("127.0.0.1", 0);
    let d = Daemon::with(
        Options {
            threads: 1,
            ..Options::with_api()
        }
        .edit(move |c| {
            c.tcp_listen = vec![listen];
            c.proxy_protocol.listeners = vec![listen];
        }),
    );
    let server = d.tcp_addr.unwrap();
    let header = encode_v2(claimed("127.0.0.1", 7), server);
    let mut first = plain_with_header(server, &header);
    first.must_allocate();
    let mut again = plain_with_header(server, &header);
    assert!(
        again.binding().is_err(),
        "the same 5-tuple twice gets no answer"
    );
    assert!(again.closed_by_server(CLOSE_WAIT));
    // The first one's allocation is untouched.
    assert_eq!(first.mapped(), claimed("127.0.0.1", 7));
    assert_eq!(d.metric("turnpike_allocations{transport=\"tcp\"}"), 1.0);
    assert_eq!(d.metric(&open("tcp")), 1.0);
}

/// A ChannelData payload the slow-reader test can check: its index, then a fill derived from it.
fn numbered(i: u32, len: usize) -> Vec<u8> {
    let mut p = i.to_be_bytes().to_vec();
    p.extend((4..len).map(|j| (i as usize + j) as u8));
    p
}

#[test]
fn a_client_that_stops_reading_loses_relayed_frames_whole_but_never_its_answers() {
    let _s = serial();
    let cert = TestCert::new();
    let d = Daemon::with(Options::with_api().edit(cert.listen_on("127.0.0.1")));
    let server = d.tls_addr.unwrap();
    let rss_before = d.rss_kib();
    let tcp = common::tcp_connect_with(None, Some(4096), server);
    let (mut c, _) = StreamClient::tls_over(tcp, &TlsClient::new(&cert));
    let relayed = c.must_allocate();
    let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    c.must_bind_channel(0x4000, peer.local_addr().unwrap());

    // The peer sends while the client reads nothing, until the daemon drops frames for it
    // (bounded: 40000 datagrams, 30 s).
    const LEN: usize = 1000;
    let dropped = series("stream_frames_dropped_total", "tls", None);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = 0u32;
    while d.metric(&dropped) == 0.0 {
        assert!(
            sent < 40_000 && Instant::now() < deadline,
            "no frame dropped after {sent} datagrams to a client that does not read"
        );
        for _ in 0..500 {
            peer.send_to(&numbered(sent, LEN), relayed).unwrap();
            sent += 1;
        }
    }
    // Small frames fill what room is left in its queue, then a request while the client is that
    // far behind, and more relayed data after it.
    for _ in 0..2000 {
        peer.send_to(&numbered(sent, 4), relayed).unwrap();
        sent += 1;
    }
    let mut req = Vec::new();
    let txid = c.txid();
    MessageWriter::new(&mut req, method::BINDING, Class::Request, txid);
    c.write_frame(&req).unwrap();
    for _ in 0..500 {
        peer.send_to(&numbered(sent, 4), relayed).unwrap();
        sent += 1;
    }
    let rss_congested = d.rss_kib();

    // Reading again: whole frames, in order, and the answer among them.
    let mut last: Option<u32> = None;
    let (mut frames, mut answered) = (0u32, false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Some(f) = c.read_frame(Duration::from_secs(2)).expect("connection up") else {
            break;
        };
        if f[0] >> 6 == 0 {
            assert_eq!(f[8..20], txid, "a STUN message other than the answer");
            answered = true;
            continue;
        }
        assert_eq!(f[..2], [0x40, 0x00], "channel");
        let len = usize::from(u16::from_be_bytes([f[2], f[3]]));
        assert!(len == LEN || len == 4, "frame {frames}: {len} bytes");
        let i = u32::from_be_bytes(f[4..8].try_into().unwrap());
        assert_eq!(
            &f[4..4 + len],
            &numbered(i, len)[..],
            "frame {frames} (datagram {i})"
        );
        assert!(last.is_none_or(|l| i > l), "datagram {i} after {last:?}");
        last = Some(i);
        frames += 1;
    }
    let dropped_n = d.metric(&dropped);
    eprintln!(
        "{sent} datagrams sent, {frames} frames read, {dropped_n} dropped; VmRSS {rss_before} KiB \
         before, {rss_congested} KiB congested"
    );
    assert!(
        answered,
        "the Binding answer was dropped for a client behind on reading"
    );
    assert!(frames > 0 && dropped_n > 0.0);
    assert!(
        rss_congested < rss_before + 64 * 1024,
        "RSS grew from {rss_before} to {rss_congested} KiB"
    );
    // Caught up, the client is served as before.
    let own = c.local();
    assert_eq!(c.mapped(), own);
}

#[test]
fn a_handshake_record_of_garbage_is_a_tls_setup_failure() {
    let _s = serial();
    let cert = TestCert::new();
    let d = Daemon::with(Options::with_api().edit(cert.listen_on("127.0.0.1")));
    let server = d.tls_addr.unwrap();
    // A handshake record header, then bytes that are no ClientHello.
    let mut c = StreamClient::plain(server);
    let mut junk = vec![0x16, 0x03, 0x01, 0x00, 0x40];
    junk.extend([0x5A; 0x40]);
    c.write_raw(&junk).unwrap();
    assert!(c.closed_by_server(CLOSE_WAIT), "closed");
    d.wait_metric_until(&setup_failures("tls", "tls_error"), METRIC_WAIT, |v| {
        v == 1.0
    });
    assert_eq!(
        d.metric(&series("connections_accepted_total", "tls", None)),
        0.0
    );
    let (mut ok, _) = StreamClient::tls(server, &TlsClient::new(&cert));
    ok.must_allocate();
}

#[test]
fn ipv6_clients_in_proxy_headers_are_counted_by_their_64() {
    let _s = serial();
    let d = proxied_tcp("::1", |c| c.limits.connections_per_source = 1);
    let server = d.tcp_addr.unwrap();
    let connect = |source: &str| {
        let source: SocketAddr = source.parse().unwrap();
        plain_with_header(server, &encode_v2(source, server))
    };
    let mut a = connect("[2001:db8:0:1::7]:1");
    assert_eq!(a.mapped(), "[2001:db8:0:1::7]:1".parse().unwrap());
    // Another address of the same /64 is the same source...
    let mut same_64 = connect("[2001:db8:0:1::8]:1");
    assert!(same_64.closed_by_server(CLOSE_WAIT), "same /64");
    d.wait_metric_until(&refused("tcp", "per_source_limit"), METRIC_WAIT, |v| {
        v == 1.0
    });
    // ...one in the next /64 is not.
    let mut next_64 = connect("[2001:db8:0:2::7]:1");
    assert_eq!(next_64.mapped(), "[2001:db8:0:2::7]:1".parse().unwrap());
}

#[test]
fn a_drain_keeps_tls_allocations_relaying_and_ends_when_their_connection_closes() {
    let _s = serial();
    let cert = TestCert::new();
    let mut d = Daemon::with(
        Options {
            drain_secs: 30,
            ..Options::with_api()
        }
        .edit(cert.listen_on("127.0.0.1")),
    );
    let server = d.tls_addr.unwrap();
    let tls = TlsClient::new(&cert);
    let peer = EchoPeer::start();
    let (mut c, _) = StreamClient::tls(server, &tls);
    c.must_allocate();
    c.must_bind_channel(0x4000, peer.addr);
    d.sigterm();
    d.wait_draining(METRIC_WAIT);
    // New allocations are refused, over TLS too; the one in force relays on.
    let (mut late, _) = StreamClient::tls(server, &tls);
    assert_eq!(
        late.allocate().code(),
        Some(508),
        "Allocate during the drain"
    );
    c.echo_round_trips(0x4000, 10, Duration::from_secs(5));
    assert!(
        d.wait_exit(Duration::from_millis(500)).is_none(),
        "waits for the TLS allocation"
    );
    // Its connection closes: the allocation ends with it, and so does the drain.
    let t0 = Instant::now();
    drop(c);
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("exits once the last allocation's connection closed");
    eprintln!("drain ended {:?} after the connection closed", t0.elapsed());
    assert_eq!(status.code(), Some(0));
}
