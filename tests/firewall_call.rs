//! The firewall case, end to end: two WebRTC callers, each behind a NAT whose firewall drops
//! every UDP datagram (both ways) and lets out only TCP to the server's port 443, connect
//! through turnpike's TLS listener, which serves TLS and plain TCP on that one port.
//!
//! The network is `tests/nat/netns.rs`'s ([`NatKind::UdpBlocked`]): turnpike in `pub` on
//! 203.0.113.10 with UDP and TCP listeners on :3478 (there to show that they are *not*
//! reachable) and `tls_listen = ["203.0.113.10:443"]` with a certificate whose SAN is that IP,
//! signed by a CA made for the run (rcgen, `tests/common`); two NAT routers with the firewall;
//! one caller in each of `cla` and `clb`.
//!
//! The callers are aiortc peer connections (Python, `tests/nat/firewall_peer.py`): the
//! webrtc-rs stack the NAT test uses gathers relay candidates over UDP TURN only (webrtc-ice
//! 0.17 `gather_candidates_relay` skips `turn:?transport=tcp` and `turns:` as "Unable to handle
//! URL"), while aioice speaks TURN over TCP and over TLS, and verifies the certificate against
//! `SSL_CERT_FILE` and the IP in the URL. Signaling is the test itself (offer and answer over
//! the peers' stdin/stdout), so nothing but the TURN connection crosses the firewall.
//!
//! Each test, printing what it measures:
//! 1. The firewall holds, for both clients: a STUN Binding over UDP to :3478 gets no answer
//!    (the NAT's `udp_dropped` counter counts it; the same request from the NAT box itself is
//!    answered); a UDP datagram from the server's side to the client is dropped at the NAT too;
//!    TCP to :3478 does not connect (it does from the NAT box); TCP to :443 does, and a STUN
//!    Binding over it (plain TCP on the TLS port) maps to the NAT's public address.
//! 2. The two callers, given only `turns:203.0.113.10:443?transport=tcp` (first test) or only
//!    `turn:203.0.113.10:443?transport=tcp` (second), with `iceTransportPolicy: "relay"`,
//!    connect (ICE + DTLS + SCTP) and echo 20 DataChannel messages; each selected pair is
//!    relay/relay, its TURN stream goes to 203.0.113.10:443 (over TLS 1.2+ in the first test,
//!    in the clear in the second), and the Allocate maps the TURN stream (from the client's LAN address) to the NAT's public one.
//! 3. turnpike agrees: its "allocation created" lines have transport `tls` (resp. `tcp`) for
//!    clients at both NATs' public addresses and none has `udp`; `/metrics` showed two
//!    allocations of that transport at once during the call.
//!
//! Needs root, `ip`, `nft`, and Python 3 with aiortc 1.16 (scripts/test.sh makes a virtual
//! environment in `target/py-aiortc`; `TURNPIKE_PYTHON` names another interpreter). Where it
//! cannot run it says so loudly and passes, unless `CI` is set: then it fails. Namespaces and
//! processes are removed however the test ends.

mod common;
#[path = "nat/netns.rs"]
#[macro_use]
mod netns;
#[path = "nat/firewall_server.rs"]
mod firewall_server;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netns::{
    NatKind, NsProcess, SetupError, Topology, CLA_IP, CLB_IP, NATA_PUBLIC, NATB_PUBLIC, SERVER_IP,
};
use serde_json::Value;
use stun::agent::TransactionId;
use stun::message::{Getter, Message, BINDING_REQUEST};
use stun::xoraddr::XorMappedAddress;

use firewall_server::{in_ns, metrics, str_field, Server, BLOCKED_PORT, TLS_PORT};
/// A UDP request that gets nothing within this is taken as dropped.
const UDP_SILENCE: Duration = Duration::from_millis(1500);
const TCP_CONNECT: Duration = Duration::from_millis(1500);
/// Offer (the caller gathers: one TURN allocation over TCP/TLS) and answer.
const SDP_TIMEOUT: Duration = Duration::from_secs(20);
/// From the answer to both reports (connect, 20 echoes, close).
const CALL_TIMEOUT: Duration = Duration::from_secs(40);
/// What firewall_peer.py gives itself in all (--timeout).
const PEER_TIMEOUT_SECS: u64 = 50;
const DC_MESSAGES: u64 = 20;
const PYTHON_ENV: &str = "TURNPIKE_PYTHON";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scheme {
    /// `turns:IP:443?transport=tcp`
    Turns,
    /// `turn:IP:443?transport=tcp`
    TurnTcp,
}

impl Scheme {
    fn url(self) -> String {
        match self {
            Scheme::Turns => format!("turns:{SERVER_IP}:{TLS_PORT}?transport=tcp"),
            Scheme::TurnTcp => format!("turn:{SERVER_IP}:{TLS_PORT}?transport=tcp"),
        }
    }
    /// The transport turnpike logs and labels metrics with.
    fn transport(self) -> &'static str {
        match self {
            Scheme::Turns => "tls",
            Scheme::TurnTcp => "tcp",
        }
    }
}

#[test]
fn udp_blocked_callers_connect_over_turns_443() {
    firewall_call(
        "firewall_call::udp_blocked_callers_connect_over_turns_443",
        "fwtls",
        Scheme::Turns,
    );
}

#[test]
fn udp_blocked_callers_connect_over_turn_tcp_443() {
    firewall_call(
        "firewall_call::udp_blocked_callers_connect_over_turn_tcp_443",
        "fwtcp",
        Scheme::TurnTcp,
    );
}

fn firewall_call(test: &str, tag: &str, scheme: Scheme) {
    let t_start = Instant::now();
    if let Err(reason) = netns::preflight() {
        netns::cannot_run(test, &reason);
        return;
    }
    let python = match find_python() {
        Ok(p) => p,
        Err(reason) => {
            netns::cannot_run(test, &reason);
            return;
        }
    };
    netns::remove_stale();
    // Declared first: dropped last, after the processes inside are stopped.
    let topo = match Topology::create_with(tag, NatKind::UdpBlocked { tcp_port: TLS_PORT }) {
        Ok(t) => t,
        Err(SetupError::Unavailable(reason)) => {
            netns::cannot_run(
                test,
                &format!("cannot build the namespace network: {reason}"),
            );
            return;
        }
        Err(SetupError::Failed(e)) => panic!("building the namespace network failed: {e}"),
    };
    let t = tag;
    say!(
        "{t}: network {}-{{pub,nata,natb,cla,clb}} built in {:?}; firewall in nata:\n{}",
        topo.prefix,
        t_start.elapsed(),
        topo.nat_rules("nata").trim_end()
    );

    let server = Server::start(&topo, tag);
    say!("{t}: turnpike up after {:?}", t_start.elapsed());

    // ------------------------------------------------------------ 1. the firewall holds
    let t1 = Instant::now();
    for (client, nat, local_ip, public_ip) in [
        ("cla", "nata", CLA_IP, NATA_PUBLIC),
        ("clb", "natb", CLB_IP, NATB_PUBLIC),
    ] {
        firewall_holds(&topo, client, nat, local_ip, public_ip, t);
    }
    say!("{t}: 1. firewall checks passed in {:?}", t1.elapsed());

    // ------------------------------------------------------------ 2. the call
    let t2 = Instant::now();
    let (caller, callee, max_allocs) = call(&topo, &python, scheme, &server, t);
    for r in [&caller, &callee] {
        say!("{t}: 2. {} report: {r}", r["role"]);
    }
    let transport = scheme.transport();
    for (r, local_ip, public_ip) in [
        (&caller, CLA_IP, NATA_PUBLIC),
        (&callee, CLB_IP, NATB_PUBLIC),
    ] {
        let role = r["role"].as_str().unwrap_or("?");
        let ctx = || format!("{role}: {r:#}\nturnpike log:\n{}", server.log());
        assert!(r.get("error").is_none(), "2. {}", ctx());
        assert_eq!(r["final_state"], "connected", "2. {}", ctx());
        let locals: Vec<&str> = r["local_candidates"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert!(
            !locals.is_empty() && locals.iter().all(|c| c.starts_with("relay ")),
            "2. {role}: local candidates {locals:?}, want relay candidates only\n{}",
            ctx()
        );
        let sel = &r["selected"];
        assert_eq!(sel["local"]["type"], "relay", "2. {}", ctx());
        assert_eq!(sel["remote"]["type"], "relay", "2. {}", ctx());
        assert_eq!(
            sel["turn_server"],
            format!("{SERVER_IP}:{TLS_PORT}"),
            "2. {}",
            ctx()
        );
        assert_eq!(sel["turn_transport"], "tcp", "2. {}", ctx());
        assert_eq!(sel["turn_ssl"], scheme == Scheme::Turns, "2. {}", ctx());
        match scheme {
            Scheme::Turns => assert!(
                sel["tls_version"]
                    .as_str()
                    .is_some_and(|v| v == "TLSv1.3" || v == "TLSv1.2"),
                "2. {role}: the TURN stream is not TLS 1.2/1.3: {}",
                ctx()
            ),
            Scheme::TurnTcp => assert!(sel.get("tls_version").is_none(), "2. {}", ctx()),
        }
        // The TURN stream starts at the client's LAN address, and the Allocate's
        // XOR-MAPPED-ADDRESS is the NAT's public one: it went through the NAT.
        let stream_local = sel["turn_stream_local"].as_str().unwrap_or("");
        assert!(
            stream_local.starts_with(&format!("{local_ip}:")),
            "2. {role}: TURN stream from {stream_local}, want {local_ip}\n{}",
            ctx()
        );
        let mapped = sel["turn_mapped"].as_str().unwrap_or("");
        assert!(
            mapped.starts_with(&format!("{public_ip}:")),
            "2. {role}: Allocate mapped {mapped}, want the NAT's {public_ip}\n{}",
            ctx()
        );
    }
    assert_eq!(caller["echoed"], DC_MESSAGES, "2. caller: {caller:#}");
    assert_eq!(callee["echoed"], DC_MESSAGES, "2. callee: {callee:#}");
    // The two relays cross: each side's remote candidate is the other's relay.
    assert_eq!(
        caller["selected"]["remote"]["address"], callee["selected"]["local"]["address"],
        "2. the selected pairs do not cross"
    );
    assert_eq!(
        callee["selected"]["remote"]["address"], caller["selected"]["local"]["address"],
        "2. the selected pairs do not cross"
    );
    say!(
        "{t}: 2. {} only, relay policy: caller gathered in {} ms and connected {} ms after \
         starting, callee connected {} ms after the offer; {DC_MESSAGES} DataChannel echoes in \
         {} ms; caller pair {} <-> {} ({}), callee pair {} <-> {}; phase took {:?}",
        scheme.url(),
        caller["gather_ms"],
        caller["connected_ms"],
        callee["connected_ms"],
        caller["echo_ms"],
        caller["selected"]["local"]["address"],
        caller["selected"]["remote"]["address"],
        caller["selected"]["tls_version"]
            .as_str()
            .unwrap_or("plain TCP"),
        callee["selected"]["local"]["address"],
        callee["selected"]["remote"]["address"],
        t2.elapsed()
    );

    // ------------------------------------------------------------ 3. turnpike's side
    let created = server.events("allocation created");
    for e in &created {
        say!(
            "{t}: 3. turnpike: allocation created user={} client={} transport={} relay={}",
            str_field(e, "user"),
            str_field(e, "client"),
            str_field(e, "transport"),
            str_field(e, "relay")
        );
    }
    // One allocation per caller, from the address its Allocate was told (the NAT's public one).
    for (r, public_ip) in [(&caller, NATA_PUBLIC), (&callee, NATB_PUBLIC)] {
        let mapped = r["selected"]["turn_mapped"].as_str().unwrap_or("?");
        let relay = r["selected"]["local"]["address"].as_str().unwrap_or("?");
        assert!(
            created.iter().any(|e| {
                str_field(e, "transport") == transport
                    && str_field(e, "client") == mapped
                    && str_field(e, "relay").split(',').any(|x| x == relay)
            }),
            "3. no {transport} allocation for client {mapped} (at {public_ip}) with relay \
             {relay} in turnpike's log:\n{}",
            server.log()
        );
    }
    assert!(
        created
            .iter()
            .all(|e| str_field(e, "transport") == transport),
        "3. an allocation over another transport than {transport}:\n{}",
        server.log()
    );
    assert!(
        max_allocs >= 2.0,
        "3. turnpike_allocations{{transport=\"{transport}\"}} never reached 2 during the call \
         (max {max_allocs})"
    );
    let m = metrics(&topo).unwrap_or_else(|e| panic!("3. {e}"));
    say!(
        "{t}: 3. turnpike metrics: {transport} allocations peaked at {max_allocs} during the \
         call; connections accepted tls={} tcp={}; relayed to clients {} packets",
        m.get("turnpike_connections_accepted_total{transport=\"tls\"}")
            .copied()
            .unwrap_or(-1.0),
        m.get("turnpike_connections_accepted_total{transport=\"tcp\"}")
            .copied()
            .unwrap_or(-1.0),
        m.get("turnpike_relayed_packets_total{direction=\"to_client\"}")
            .copied()
            .unwrap_or(-1.0),
    );

    if std::env::var_os("TURNPIKE_TEST_LOG").is_some() {
        say!("---- turnpike log ----\n{}\n----", server.log());
    }
    drop(server);
    drop(topo);
    say!("{t}: total {:?}", t_start.elapsed());
}

// ------------------------------------------------------------------ 1. firewall checks

fn firewall_holds(
    topo: &Topology,
    client: &str,
    nat: &str,
    local_ip: Ipv4Addr,
    public_ip: Ipv4Addr,
    t: &str,
) {
    let server_udp = SocketAddr::from((SERVER_IP, BLOCKED_PORT));
    let server_tls = SocketAddr::from((SERVER_IP, TLS_PORT));
    let counter = |name: &str| {
        topo.nft_counter(nat, name)
            .unwrap_or_else(|e| panic!("1. {e}"))
    };

    // UDP out: nothing comes back, and the NAT's UDP rule is what dropped it.
    let before = counter("udp_dropped");
    let out = in_ns(&topo.ns(client), "udp-out", move || {
        let sock = UdpSocket::bind((local_ip, 0)).map_err(|e| format!("bind {local_ip}: {e}"))?;
        Ok(stun_binding_udp(&sock, server_udp, 3))
    })
    .unwrap_or_else(|e| panic!("1. {client}: {e}"));
    assert!(
        out.is_err(),
        "1. {client}: a STUN Binding over UDP to {server_udp} was answered ({out:?}): UDP is \
         not blocked"
    );
    let dropped_out = counter("udp_dropped") - before;
    assert!(
        dropped_out >= 3,
        "1. {client}: {nat}'s udp_dropped counter grew by {dropped_out}, want >= 3 (the \
         requests did not die at the firewall)"
    );
    // Control: the server answers UDP, from the NAT box itself (not forwarded).
    let control = in_ns(&topo.ns(nat), "udp-control", move || {
        let sock = UdpSocket::bind((public_ip, 0)).map_err(|e| format!("bind {public_ip}: {e}"))?;
        stun_binding_udp(&sock, server_udp, 4)
    })
    .unwrap_or_else(|e| panic!("1. {nat}: {e}"));
    assert_eq!(
        control.ip(),
        std::net::IpAddr::V4(public_ip),
        "1. {nat}: mapped {control}"
    );

    // UDP in: a datagram from the server's side to the client's socket never arrives.
    let listener = in_ns(&topo.ns(client), "udp-in", move || {
        UdpSocket::bind((local_ip, 0)).map_err(|e| format!("bind {local_ip}: {e}"))
    })
    .unwrap_or_else(|e| panic!("1. {client}: {e}"));
    let target = listener.local_addr().expect("local addr");
    let before = counter("udp_dropped");
    in_ns(&topo.ns("pub"), "udp-in-send", move || {
        let sock = UdpSocket::bind((SERVER_IP, 0)).map_err(|e| format!("bind {SERVER_IP}: {e}"))?;
        for i in 0..3u8 {
            sock.send_to(&[i; 32], target)
                .map_err(|e| format!("send to {target}: {e}"))?;
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("1. pub: {e}"));
    listener
        .set_read_timeout(Some(UDP_SILENCE))
        .expect("read timeout");
    let mut buf = [0u8; 64];
    let got = listener.recv_from(&mut buf);
    assert!(
        got.is_err(),
        "1. {client}: a UDP datagram from {SERVER_IP} reached {target} through the firewall: \
         {got:?}"
    );
    let dropped_in = counter("udp_dropped") - before;
    assert!(
        dropped_in >= 3,
        "1. {client}: {nat}'s udp_dropped counter grew by {dropped_in} for 3 datagrams sent in"
    );

    // TCP to another port: no connection (dropped, so it times out); from the NAT box it is.
    let other_before = counter("other_dropped");
    let tcp_blocked = SocketAddr::from((SERVER_IP, BLOCKED_PORT));
    let blocked = in_ns(&topo.ns(client), "tcp-blocked", move || {
        Ok(TcpStream::connect_timeout(&tcp_blocked, TCP_CONNECT).map(|_| ()))
    })
    .unwrap_or_else(|e| panic!("1. {client}: {e}"));
    assert!(
        blocked.is_err(),
        "1. {client}: TCP to {tcp_blocked} connected through the firewall"
    );
    assert!(
        counter("other_dropped") > other_before,
        "1. {client}: {nat}'s other_dropped counter did not count the TCP SYN to {tcp_blocked}"
    );
    in_ns(&topo.ns(nat), "tcp-control", move || {
        TcpStream::connect_timeout(&tcp_blocked, TCP_CONNECT)
            .map(|_| ())
            .map_err(|e| format!("TCP to {tcp_blocked} from the NAT box: {e}"))
    })
    .unwrap_or_else(|e| panic!("1. {nat}: {e}"));

    // TCP to 443 connects; plain STUN over it (TCP on the TLS port) shows the NAT's mapping.
    let mapped = in_ns(&topo.ns(client), "tcp-443", move || {
        let mut s = TcpStream::connect_timeout(&server_tls, Duration::from_secs(5))
            .map_err(|e| format!("TCP to {server_tls}: {e}"))?;
        stun_binding_tcp(&mut s)
    })
    .unwrap_or_else(|e| panic!("1. {client}: {e}"));
    assert_eq!(
        mapped.ip(),
        std::net::IpAddr::V4(public_ip),
        "1. {client}: Binding over TCP to {server_tls} mapped {mapped}, not {public_ip}"
    );
    say!(
        "{t}: 1. {client}: UDP to {server_udp}: no answer, {dropped_out} dropped at {nat} (from \
         {nat} itself: answered, {control}); UDP from {SERVER_IP} to {target}: not delivered, \
         {dropped_in} dropped; TCP to :{BLOCKED_PORT}: no connection; TCP to :{TLS_PORT}: \
         Binding answered, mapped {mapped}"
    );
}

fn binding_request() -> Result<Message, String> {
    let mut req = Message::new();
    req.build(&[Box::new(TransactionId::new()), Box::new(BINDING_REQUEST)])
        .map_err(|e| e.to_string())?;
    Ok(req)
}

fn mapped_of(req: &Message, raw: &[u8]) -> Result<Option<SocketAddr>, String> {
    let mut resp = Message::new();
    if resp.unmarshal_binary(raw).is_err() || resp.transaction_id != req.transaction_id {
        return Ok(None);
    }
    let mut xor = XorMappedAddress::default();
    xor.get_from(&resp)
        .map_err(|e| format!("response without XOR-MAPPED-ADDRESS: {e}"))?;
    Ok(Some(SocketAddr::new(xor.ip, xor.port)))
}

/// A STUN Binding over UDP to `server`, `tries` times [`UDP_SILENCE`] / `tries` each.
fn stun_binding_udp(
    sock: &UdpSocket,
    server: SocketAddr,
    tries: u32,
) -> Result<SocketAddr, String> {
    let each = UDP_SILENCE / tries;
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    for _ in 0..tries {
        let req = binding_request()?;
        sock.send_to(&req.raw, server)
            .map_err(|e| format!("send to {server}: {e}"))?;
        let until = Instant::now() + each;
        while Instant::now() < until {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            if from == server {
                if let Some(mapped) = mapped_of(&req, &buf[..n])? {
                    return Ok(mapped);
                }
            }
        }
    }
    Err(format!(
        "no Binding response from {server} in {tries} tries"
    ))
}

/// A STUN Binding over a TCP stream (RFC 8489 framing: the message as is).
fn stun_binding_tcp(s: &mut TcpStream) -> Result<SocketAddr, String> {
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let req = binding_request()?;
    s.write_all(&req.raw).map_err(|e| format!("write: {e}"))?;
    let mut head = [0u8; 20];
    s.read_exact(&mut head)
        .map_err(|e| format!("reading the Binding response header: {e}"))?;
    let len = u16::from_be_bytes([head[2], head[3]]) as usize;
    let mut raw = head.to_vec();
    raw.resize(20 + len, 0);
    s.read_exact(&mut raw[20..])
        .map_err(|e| format!("reading the Binding response body: {e}"))?;
    mapped_of(&req, &raw)?.ok_or_else(|| "not a Binding response to our request".into())
}

// ------------------------------------------------------------------ 2. the call

/// Callee in `clb`, caller in `cla`, each with only `scheme`'s URL; the test carries offer and
/// answer. Returns the caller's and callee's reports and the largest number of allocations of
/// the scheme's transport `/metrics` showed meanwhile.
fn call(
    topo: &Topology,
    python: &Path,
    scheme: Scheme,
    server: &Server,
    t: &str,
) -> (Value, Value, f64) {
    let ca = &server.cert.ca;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nat/firewall_peer.py");
    let url = scheme.url();
    let peer = |ns: &str, role: &str| {
        let (user, password) = server.credential(&format!("{t}-{role}"));
        let timeout = PEER_TIMEOUT_SECS.to_string();
        NsProcess::spawn_interactive(
            &topo.ns(ns),
            role,
            python,
            &[
                script.to_str().expect("utf-8 path"),
                "--role",
                role,
                "--url",
                &url,
                "--user",
                &user,
                "--credential",
                &password,
                "--timeout",
                &timeout,
            ],
            &[
                ("SSL_CERT_FILE", ca.to_str().expect("utf-8 path")),
                ("PYTHONUNBUFFERED", "1"),
                ("PYTHONDONTWRITEBYTECODE", "1"),
            ],
        )
        .unwrap_or_else(|e| panic!("2. {e}"))
    };
    let mut callee = peer("clb", "callee");
    let mut caller = peer("cla", "caller");
    let fail = |what: String, caller: &NsProcess, callee: &NsProcess| -> ! {
        panic!(
            "2. {what}\n---- caller ----\n{}\n---- callee ----\n{}\n---- turnpike ----\n{}",
            caller.log(),
            callee.log(),
            server.log()
        )
    };

    let offer = match caller.wait_for_line("an offer", SDP_TIMEOUT, |l| is_msg(l, "offer")) {
        Ok(l) => l,
        Err(e) => fail(e, &caller, &callee),
    };
    if let Err(e) = callee.send_line(&offer) {
        fail(e, &caller, &callee);
    }
    let answer = match callee.wait_for_line("an answer", SDP_TIMEOUT, |l| is_msg(l, "answer")) {
        Ok(l) => l,
        Err(e) => fail(e, &caller, &callee),
    };
    if let Err(e) = caller.send_line(&answer) {
        fail(e, &caller, &callee);
    }

    // Both reports; meanwhile, how many allocations of our transport the daemon holds.
    let series = format!(
        "turnpike_allocations{{transport=\"{}\"}}",
        scheme.transport()
    );
    let mut max_allocs = 0f64;
    let deadline = Instant::now() + CALL_TIMEOUT;
    let (a, b) = loop {
        if let Ok(m) = metrics(topo) {
            max_allocs = max_allocs.max(m.get(&series).copied().unwrap_or(0.0));
        }
        let a = report_of(&caller);
        let b = report_of(&callee);
        if let (Some(a), Some(b)) = (&a, &b) {
            break (a.clone(), b.clone());
        }
        if Instant::now() > deadline {
            fail(
                format!("no report from both peers within {CALL_TIMEOUT:?} of the answer"),
                &caller,
                &callee,
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for p in [&mut caller, &mut callee] {
        p.wait_exit(Duration::from_secs(5));
    }
    if a.get("error").is_some() || b.get("error").is_some() {
        fail(
            format!("a peer reported an error:\n{a:#}\n{b:#}"),
            &caller,
            &callee,
        );
    }
    (a, b, max_allocs)
}

fn parse_msg(line: &str) -> Option<Value> {
    serde_json::from_str(line.strip_prefix("FWPEER ")?).ok()
}

fn is_msg(line: &str, kind: &str) -> bool {
    parse_msg(line).is_some_and(|v| v["type"] == kind)
}

fn report_of(p: &NsProcess) -> Option<Value> {
    p.lines()
        .iter()
        .filter_map(|l| parse_msg(l))
        .find(|v| v["type"] == "report")
}

// ------------------------------------------------------------------ the Python peers

/// A Python that imports aiortc (see `common::find_python`).
fn find_python() -> Result<PathBuf, String> {
    let check = "import aiortc, aioice";
    let py = common::find_python(check).map_err(|why| {
        format!(
            "no Python with aiortc (scripts/test.sh installs aiortc==1.16.0 into \
             target/py-aiortc; or set {PYTHON_ENV}): {why}"
        )
    })?;
    say!("firewall_call: aiortc from {}", py.display());
    Ok(py)
}
