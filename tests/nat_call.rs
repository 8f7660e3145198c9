//! Issue 3, end to end: two WebRTC clients, each behind its own symmetric NAT, cannot reach
//! each other with STUN alone and do connect through turnpike's TURN relay.
//!
//! The network is built from Linux network namespaces (see `tests/nat/netns.rs` for the
//! picture): turnpike (UDP 203.0.113.10:3478 and :3479) and the example signaling server
//! (203.0.113.10:8080) in `pub`; two NAT routers (nftables `masquerade random,fully-random`,
//! inbound only `ct state established,related`) each in front of one client namespace.
//! The peers are webrtc-rs peer connections running on threads moved into the client
//! namespaces with setns(2), each with its own tokio runtime, so every socket they open
//! (WebSocket, STUN, TURN, ICE) lives behind its NAT.
//!
//! In order, printing what it measures:
//! 1. The NATs are symmetric: one socket inside `cla`/`clb` gets a different mapped port for
//!    :3478 and for :3479, and the same one again for :3478.
//! 2. With the STUN server only, the two peers (offer/answer/candidates through the signaling
//!    server) gather server-reflexive candidates but do not connect.
//! 3. With the TURN credentials from the signaling server's welcome message they connect, over
//!    a candidate pair with a relay candidate; a DataChannel echoes 50 messages and a VP8
//!    track delivers at least 90 of 100 RTP packets; turnpike logged the allocations.
//!
//! Needs root, `ip` and `nft`. Where it cannot run it says so loudly on stderr and passes,
//! unless `CI` is set: then it fails. Namespaces are deleted however the test ends.
//! Needs `target/<profile>/examples/signaling` (`cargo build --release --examples`, which
//! scripts/test.sh runs first).

mod common;
#[macro_use]
mod nat;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nat::netns::{
    self, NsProcess, SetupError, Topology, CLA_IP, CLB_IP, NATA_PUBLIC, NATB_PUBLIC, SERVER_IP,
};
use nat::peer::{self, IceMode, PeerReport, PeerSpec, Role};
use serde_json::Value;
use stun::agent::TransactionId;
use stun::message::{Getter, Message, BINDING_REQUEST};
use stun::xoraddr::XorMappedAddress;
use turnpike::config::{Config, LogFormat, RelayIp};

const TEST: &str = "nat_call::symmetric_nats_connect_only_through_turn";
const SECRET: &str = "nat-call-test-rest-secret-0123456789";
const TURN_PORT: u16 = 3478;
const ALT_PORT: u16 = 3479;
const SIGNALING_PORT: u16 = 8080;
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Phase 2: ICE fails 3 + 5 s after checking starts (see peer.rs); this leaves margin.
const STUN_ONLY_WAIT: Duration = Duration::from_secs(12);
const TURN_WAIT: Duration = Duration::from_secs(15);
const DC_MESSAGES: usize = 50;
const RTP_PACKETS: usize = 100;
const RTP_MIN_RECEIVED: usize = 90;

#[test]
fn symmetric_nats_connect_only_through_turn() {
    let t_start = Instant::now();
    if let Err(reason) = netns::preflight() {
        netns::cannot_run(TEST, &reason);
        return;
    }
    let turnpike_bin = PathBuf::from(env!("CARGO_BIN_EXE_turnpike"));
    let signaling_bin = common::example_binary();

    netns::remove_stale();
    remove_stale_temp_dirs();
    // Declared first: dropped last, after the processes inside are stopped.
    let topo = match Topology::create() {
        Ok(t) => t,
        Err(SetupError::Unavailable(reason)) => {
            netns::cannot_run(
                TEST,
                &format!("cannot build the namespace network: {reason}"),
            );
            return;
        }
        Err(SetupError::Failed(e)) => panic!("building the namespace network failed: {e}"),
    };
    say!(
        "network: namespaces {}-{{pub,nata,natb,cla,clb}} built in {:?}; NAT rules in nata:\n{}",
        topo.prefix,
        t_start.elapsed(),
        topo.nat_rules("nata").trim_end()
    );

    let dir = TempDir::new();
    let config = write_config(&dir.0);
    let config_arg = config.to_str().expect("utf-8 temp path");
    let pub_ns = topo.ns("pub");
    let ready_file = dir.0.join("turnpike.ready");
    let mut turnpike = NsProcess::spawn(
        &pub_ns,
        "turnpike",
        &turnpike_bin,
        &[
            "serve",
            "--config",
            config_arg,
            "--ready-file",
            ready_file.to_str().expect("utf-8 temp path"),
        ],
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    turnpike
        .wait_for("its ready file", READY_TIMEOUT, || {
            std::fs::read_to_string(&ready_file).ok()
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let listen = format!("{SERVER_IP}:{SIGNALING_PORT}");
    let stun_url = format!("stun:{SERVER_IP}:{TURN_PORT}");
    let turn_url = format!("turn:{SERVER_IP}:{TURN_PORT}?transport=udp");
    let mut signaling = NsProcess::spawn(
        &pub_ns,
        "signaling",
        &signaling_bin,
        &[
            "--config",
            config_arg,
            "--listen",
            &listen,
            "--turn-url",
            &stun_url,
            "--turn-url",
            &turn_url,
        ],
        &[("RUST_LOG", "info")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    signaling
        .wait_for_line("\"signaling listening on\"", READY_TIMEOUT, |l| {
            l.starts_with("signaling listening on")
        })
        .unwrap_or_else(|e| panic!("{e}"));
    say!(
        "servers: turnpike and signaling up in pub after {:?}",
        t_start.elapsed()
    );

    // ---------------------------------------------------------------- 1. symmetric NATs
    let t1 = Instant::now();
    for (client, local_ip, public_ip) in
        [("cla", CLA_IP, NATA_PUBLIC), ("clb", CLB_IP, NATB_PUBLIC)]
    {
        let (local, mapped) = symmetric_nat_probe(&topo.ns(client), local_ip);
        say!(
            "1. {client}: socket {local} -> {SERVER_IP}:{TURN_PORT} mapped {}, \
             -> :{ALT_PORT} mapped {}, -> :{TURN_PORT} again mapped {}",
            mapped[0],
            mapped[1],
            mapped[2]
        );
        for m in &mapped {
            assert_eq!(
                m.ip(),
                std::net::IpAddr::V4(public_ip),
                "{client}: the server saw {m}, not the NAT's public address {public_ip}: \
                 traffic is not going through the NAT"
            );
        }
        assert_ne!(
            mapped[0].port(),
            mapped[1].port(),
            "{client}: same mapped port for two server ports: the NAT is not symmetric"
        );
        assert_eq!(
            mapped[0], mapped[2],
            "{client}: a second request to the same server got a new mapping: the NAT maps \
             per packet, not per destination"
        );
    }
    say!("1. symmetric NATs confirmed in {:?}", t1.elapsed());

    // ---------------------------------------------------------------- 2. STUN only: no call
    let t2 = Instant::now();
    let (a, b) = call(&topo, "nat-stun-only", IceMode::StunOnly, STUN_ONLY_WAIT);
    print_report("2.", &a);
    print_report("2.", &b);
    for r in [&a, &b] {
        assert!(
            r.connected_after.is_none(),
            "2. {} connected with STUN only: the NATs let a direct path through \
             (selected pair {:?})\n{r:#?}",
            r.label,
            r.selected_pair
        );
        assert_ne!(r.final_pc_state, "connected", "2. {}: {r:#?}", r.label);
        assert!(
            r.ice_urls.iter().all(|u| u.starts_with("stun:")),
            "2. {}: used {:?}",
            r.label,
            r.ice_urls
        );
        assert!(
            r.count_local("srflx") >= 1,
            "2. {} gathered no server-reflexive candidate: STUN through the NAT failed, so \
             this phase proves nothing\n{r:#?}",
            r.label
        );
        assert_eq!(r.count_local("relay"), 0, "2. {}: {r:#?}", r.label);
        assert!(
            r.count_remote("srflx") >= 1,
            "2. {} received no server-reflexive candidate of the other peer through the \
             signaling server\n{r:#?}",
            r.label
        );
    }
    say!(
        "2. STUN only: no connection after {:?} (caller ICE {}, callee ICE {})",
        t2.elapsed(),
        a.final_ice_state,
        b.final_ice_state
    );

    // ---------------------------------------------------------------- 3. TURN: a call
    let t3 = Instant::now();
    let (a, b) = call(&topo, "nat-turn", IceMode::Turn, TURN_WAIT);
    print_report("3.", &a);
    print_report("3.", &b);
    for r in [&a, &b] {
        assert!(
            r.ice_urls.iter().any(|u| u.starts_with("turn:")),
            "3. {}: no TURN URL in the welcome message: {:?}",
            r.label,
            r.ice_urls
        );
        assert!(
            r.count_local("relay") >= 1,
            "3. {} got no relay candidate from turnpike\n{r:#?}\nturnpike log:\n{}",
            r.label,
            turnpike.log()
        );
        assert!(
            r.connected_after.is_some(),
            "3. {} did not connect through TURN within {TURN_WAIT:?}\n{r:#?}\nturnpike log:\n{}",
            r.label,
            turnpike.log()
        );
        let pair = r
            .selected_pair
            .as_ref()
            .unwrap_or_else(|| panic!("3. {}: no selected candidate pair\n{r:#?}", r.label));
        assert!(
            pair.0 == "relay" || pair.2 == "relay",
            "3. {}: selected pair {pair:?} has no relay candidate: the NATs let a direct \
             path through",
            r.label
        );
    }
    assert_eq!(
        a.dc_echoed, DC_MESSAGES,
        "3. DataChannel echoed {} of {DC_MESSAGES} messages\n{a:#?}",
        a.dc_echoed
    );
    assert_eq!(a.rtp_sent, RTP_PACKETS, "3. RTP packets written\n{a:#?}");
    let told = a.rtp_received_by_remote.unwrap_or(0);
    assert!(
        told >= RTP_MIN_RECEIVED && b.rtp_received >= RTP_MIN_RECEIVED,
        "3. RTP: callee received {} (told the caller {told}) of {RTP_PACKETS}, want >= \
         {RTP_MIN_RECEIVED}\n{a:#?}\n{b:#?}",
        b.rtp_received
    );
    assert_eq!(
        b.remote_track_codec.as_deref(),
        Some("video/VP8"),
        "3. remote track codec"
    );

    // turnpike's side of the story: allocations from the NATs' public addresses.
    let created = events(&turnpike, "allocation created");
    let from_nats: Vec<&Value> = created
        .iter()
        .filter(|e| {
            let client = str_field(e, "client");
            client.starts_with(&format!("{NATA_PUBLIC}:"))
                || client.starts_with(&format!("{NATB_PUBLIC}:"))
        })
        .collect();
    for e in &created {
        say!(
            "3. turnpike: allocation created user={} client={} relay={}",
            str_field(e, "user"),
            str_field(e, "client"),
            str_field(e, "relay")
        );
    }
    assert!(
        !from_nats.is_empty(),
        "3. turnpike logged no allocation from the NATs' public addresses:\n{}",
        turnpike.log()
    );
    // The peers closed: their allocations end (Refresh lifetime 0) with traffic counters.
    let ended = wait_events(
        &turnpike,
        "allocation ended",
        created.len(),
        Duration::from_secs(5),
    );
    let mut relayed_to_clients = 0u64;
    for e in &ended {
        let num = |k: &str| e.get(k).and_then(Value::as_u64).unwrap_or(0);
        relayed_to_clients += num("to_client_packets");
        say!(
            "3. turnpike: allocation ended client={} reason={} to_peer={} pkts/{} B, \
             to_client={} pkts/{} B, dropped={}",
            str_field(e, "client"),
            str_field(e, "reason"),
            num("to_peer_packets"),
            num("to_peer_bytes"),
            num("to_client_packets"),
            num("to_client_bytes"),
            num("dropped_packets")
        );
    }
    if ended.len() < created.len() {
        say!(
            "3. turnpike: {} of {} allocations ended within 5 s of the peers closing",
            ended.len(),
            created.len()
        );
    }
    say!(
        "3. TURN: caller connected in {:?}, callee in {:?}; pairs caller {:?}, callee {:?}; \
         DataChannel {}/{DC_MESSAGES} echoed in {:?}; RTP {}/{RTP_PACKETS} received; \
         phase took {:?}",
        a.connected_after.unwrap(),
        b.connected_after.unwrap(),
        a.selected_pair.as_ref().unwrap(),
        b.selected_pair.as_ref().unwrap(),
        a.dc_echoed,
        a.dc_echo_time.unwrap_or_default(),
        b.rtp_received,
        t3.elapsed()
    );
    if !ended.is_empty() {
        say!(
            "3. turnpike relayed {relayed_to_clients} packets to the clients in ended allocations"
        );
    }

    if std::env::var_os("TURNPIKE_TEST_LOG").is_some() {
        say!("---- turnpike log ----\n{}\n----", turnpike.log());
    }
    drop(signaling);
    drop(turnpike);
    drop(topo);
    say!("total {:?}", t_start.elapsed());
}

// ------------------------------------------------------------------ phase 1

/// From inside `ns`, one socket on `local_ip` asks the server's :3478, :3479, then :3478
/// again for its mapped address. Retries (bounded) on the rare chance that the random
/// mappings for the two ports coincide.
fn symmetric_nat_probe(ns: &str, local_ip: Ipv4Addr) -> (SocketAddr, Vec<SocketAddr>) {
    let mut last = None;
    for _ in 0..3 {
        let probe = netns::spawn_in(ns, "stun-probe", move || -> Result<_, String> {
            // Binding the LAN address also proves this thread is inside the client namespace.
            let sock =
                UdpSocket::bind((local_ip, 0)).map_err(|e| format!("bind {local_ip}: {e}"))?;
            let local = sock.local_addr().map_err(|e| e.to_string())?;
            let mut mapped = Vec::new();
            for port in [TURN_PORT, ALT_PORT, TURN_PORT] {
                mapped.push(stun_binding(&sock, SocketAddr::from((SERVER_IP, port)))?);
            }
            Ok((local, mapped))
        })
        .unwrap_or_else(|e| panic!("1. {e}"));
        let (local, mapped) = probe
            .join(Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("1. {e}"))
            .unwrap_or_else(|e| panic!("1. STUN from {ns}: {e}"));
        if mapped[0].port() != mapped[1].port() {
            return (local, mapped);
        }
        say!("1. {ns}: both server ports mapped to the same port by chance; again");
        last = Some((local, mapped));
    }
    last.unwrap()
}

/// A STUN Binding request (the webrtc-rs `stun` crate's codec) to `server`, 4 tries of
/// 500 ms; the XOR-MAPPED-ADDRESS of the matching response.
fn stun_binding(sock: &UdpSocket, server: SocketAddr) -> Result<SocketAddr, String> {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    for _ in 0..4 {
        let mut req = Message::new();
        req.build(&[Box::new(TransactionId::new()), Box::new(BINDING_REQUEST)])
            .map_err(|e| e.to_string())?;
        sock.send_to(&req.raw, server)
            .map_err(|e| format!("send to {server}: {e}"))?;
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let mut resp = Message::new();
            if from != server || resp.unmarshal_binary(&buf[..n]).is_err() {
                continue;
            }
            if resp.transaction_id != req.transaction_id {
                continue;
            }
            let mut xor = XorMappedAddress::default();
            xor.get_from(&resp)
                .map_err(|e| format!("response from {server} without XOR-MAPPED-ADDRESS: {e}"))?;
            return Ok(SocketAddr::new(xor.ip, xor.port));
        }
    }
    Err(format!("no Binding response from {server} in 4 tries"))
}

// ------------------------------------------------------------------ phases 2 and 3

/// The callee in `clb` joins room `room`, the caller in `cla` offers; returns (caller,
/// callee) reports.
fn call(topo: &Topology, room: &str, mode: IceMode, wait: Duration) -> (PeerReport, PeerReport) {
    let spec = |label: &str, role, name: &str| PeerSpec {
        label: label.to_owned(),
        role,
        ws_url: format!("ws://{SERVER_IP}:{SIGNALING_PORT}/ws/{room}?name={name}"),
        mode,
        connect_within: wait,
        dc_messages: DC_MESSAGES,
        rtp_packets: RTP_PACKETS,
    };
    let limit = wait + Duration::from_secs(40);
    let callee_spec = spec("clb (callee)", Role::Callee, "clb");
    let caller_spec = spec("cla (caller)", Role::Caller, "cla");
    let callee = netns::spawn_in(&topo.ns("clb"), "peer-clb", move || {
        peer::run_blocking(callee_spec, limit)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let caller = netns::spawn_in(&topo.ns("cla"), "peer-cla", move || {
        peer::run_blocking(caller_spec, limit)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let join = |t: netns::NsThread<Result<PeerReport, String>>| {
        t.join(limit + Duration::from_secs(5))
            .and_then(|r| r)
            .unwrap_or_else(|e| panic!("{room}: {e}"))
    };
    let a = join(caller);
    let b = join(callee);
    (a, b)
}

fn print_report(phase: &str, r: &PeerReport) {
    say!("{phase} {}: ICE servers {:?}", r.label, r.ice_urls);
    say!(
        "{phase} {}: local candidates {:?}",
        r.label,
        r.local_candidates
    );
    say!(
        "{phase} {}: remote candidates {:?}",
        r.label,
        r.remote_candidates
    );
    let states: Vec<String> = r
        .ice_states
        .iter()
        .map(|(t, s)| format!("{s}@{}ms", t.as_millis()))
        .collect();
    say!(
        "{phase} {}: ICE states {states:?}; final ICE {}, peer connection {}; connected after {:?}",
        r.label,
        r.final_ice_state,
        r.final_pc_state,
        r.connected_after
    );
    if let Some((lt, la, rt, ra)) = &r.selected_pair {
        say!(
            "{phase} {}: selected pair local {lt} {la} <-> remote {rt} {ra}",
            r.label
        );
    }
    if r.dc_echoed > 0 || r.rtp_sent > 0 || r.rtp_received > 0 {
        say!(
            "{phase} {}: DataChannel echoed {} in {:?}; RTP sent {}, remote says received {:?}; \
             RTP received {} ({:?})",
            r.label,
            r.dc_echoed,
            r.dc_echo_time,
            r.rtp_sent,
            r.rtp_received_by_remote,
            r.rtp_received,
            r.remote_track_codec
        );
    }
    for n in &r.notes {
        say!("{phase} {}: note: {n}", r.label);
    }
}

// ------------------------------------------------------------------ servers

fn write_config(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("rest-secret"), format!("{SECRET}\n")).expect("write secret");
    let mut c = Config {
        realm: "turnpike.nat".into(),
        threads: 2,
        listen: vec![(SERVER_IP, TURN_PORT).into(), (SERVER_IP, ALT_PORT).into()],
        log_format: LogFormat::Json,
        // TURNPIKE_TEST_LOG=debug (or trace) when the daemon's reasons are needed, as in
        // tests/common.
        log_level: std::env::var("TURNPIKE_TEST_LOG").unwrap_or_else(|_| "info".into()),
        drain_secs: 0,
        ..Config::default()
    };
    c.relay.address = RelayIp::Ip(SERVER_IP);
    c.auth.secret_file = Some("rest-secret".into());
    // The test hosts use documentation ranges; re-open them so they count as public.
    c.peers.allow = ["203.0.113.0/24", "192.0.2.0/24", "198.51.100.0/24"]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
    let config = dir.join("turnpike.toml");
    std::fs::write(&config, common::config_toml(&c)).expect("write config");
    config
}

/// JSON log lines of turnpike whose message is `message`.
fn events(p: &NsProcess, message: &str) -> Vec<Value> {
    p.lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v.get("message")
                .or_else(|| v.pointer("/fields/message"))
                .and_then(Value::as_str)
                == Some(message)
        })
        .collect()
}

fn wait_events(p: &NsProcess, message: &str, count: usize, within: Duration) -> Vec<Value> {
    let until = Instant::now() + within;
    loop {
        let found = events(p, message);
        if found.len() >= count || Instant::now() > until {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn str_field<'a>(e: &'a Value, name: &str) -> &'a str {
    e.get(name)
        .or_else(|| e.get("fields").and_then(|f| f.get(name)))
        .and_then(Value::as_str)
        .unwrap_or("")
}

const TEMP_PREFIX: &str = "turnpike-nat-call-";

struct TempDir(PathBuf);

/// Temp dirs of earlier runs killed before their `Drop` (the watchdog only removes
/// namespaces).
fn remove_stale_temp_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(TEMP_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.starts_with("nat_call"));
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("{TEMP_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
