//! Hardening against abuse and exhaustion, seen from raw clients on loopback: the limit on
//! unauthenticated replies across shards, EVEN-PORT reservations, per-user quotas with shared
//! credentials, a big NAT under default limits, a reflection flood, log flooding by failed relay
//! opens, and LIFETIME = 0 on Allocate. And, in a network namespace of their own (root only),
//! the server's own addresses as peers: another address of the host behind a wildcard listener,
//! and embedded-IPv4 spellings of the relay address.
//!
//! Every test starts its own daemon through `tests/common`, sends only to loopback or inside a
//! namespace it created (198.18.0.0/15 and 2001:db8::/32 there), bounds every load loop in
//! count and time, and asserts counts, never speed. The tests take a lock so that their loads
//! do not overlap: what one measures is its own daemon.
//!
//! The namespace tests need root and `ip`; where they cannot run they say so loudly and pass,
//! unless `CI` is set: then they fail (as `tests/nat_call.rs` does). The namespace is deleted
//! however the test ends (`tests/nat/netns.rs`).

mod common;
#[macro_use]
#[path = "nat/netns.rs"]
mod netns;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{
    out_text, rest_credential, run_cli, unix_now, Api, Daemon, Options, Reply, TurnClient,
};
use netns::{Netns, SetupError};
use turnpike::config::LimitsConfig;
use turnpike::proto::codec::{attr, method, Class, Message, MessageWriter};

/// One load test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Checks that `d`'s config keeps the shipped `unauth_*` limits.
fn assert_unauth_defaults(d: &Daemon) {
    let (set, shipped) = (d.config().limits, LimitsConfig::default());
    assert_eq!(
        (set.unauth_replies_per_sec, set.unauth_replies_burst),
        (shipped.unauth_replies_per_sec, shipped.unauth_replies_burst),
        "the config changes an unauth_* limit"
    );
}

/// The daemon's effective `[limits]` as `check-config` prints them for its config file.
fn effective_limits(d: &Daemon) -> toml::Table {
    let path = d.config_path();
    let out = run_cli(&["check-config", "--config", path.to_str().unwrap()], None);
    let (stdout, stderr) = out_text(&out);
    assert!(out.status.success(), "check-config failed: {stderr}");
    let table: toml::Table = toml::from_str(&stdout)
        .unwrap_or_else(|e| panic!("check-config output is not TOML ({e}):\n{stdout}"));
    table
        .get("limits")
        .and_then(|l| l.as_table())
        .cloned()
        .unwrap_or_else(|| panic!("no [limits] in check-config output:\n{stdout}"))
}

fn limit(limits: &toml::Table, key: &str) -> u64 {
    limits
        .get(key)
        .and_then(|v| v.as_integer())
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or_else(|| panic!("no integer limits.{key} in {limits:?}"))
}

/// An unauthenticated Allocate (what a client sends first, and what a flood sends).
fn unauth_allocate(txid: [u8; 12]) -> Vec<u8> {
    let mut req = Vec::new();
    MessageWriter::new(&mut req, method::ALLOCATE, Class::Request, txid)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    req
}

fn txid(a: u32, b: u32) -> [u8; 12] {
    let mut t = [0x5A; 12];
    t[..4].copy_from_slice(&a.to_be_bytes());
    t[4..8].copy_from_slice(&b.to_be_bytes());
    t
}

/// Whether `buf` is a STUN error response with code 401.
fn is_401(buf: &[u8]) -> bool {
    Message::parse(buf).is_ok() && Reply(buf.to_vec()).code() == Some(401)
}

/// Raises the soft RLIMIT_NOFILE to at least `want` (up to the hard limit).
fn raise_nofile(want: libc::rlim_t) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < want {
            rl.rlim_cur = want.min(rl.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

/// A client whose socket is bound to `ip` (any of 127.0.0.0/8 is local on Linux).
fn client_from(d: &Daemon, ip: &str, user: &str, password: &str) -> TurnClient {
    let mut c = TurnClient::new(d.addr, user, password);
    c.sock = UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}:0: {e}"));
    c
}

fn allocate_even_port_reserve(c: &mut TurnClient) -> Reply {
    c.request(method::ALLOCATE, |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(attr::EVEN_PORT, &[0x80]);
    })
}

/// Polls `f` until it returns `want` or `within` passes; the last value.
fn poll_until(within: Duration, want: f64, f: impl Fn() -> f64) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let v = f();
        if v == want || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

const PORTS_FREE: &str = "turnpike_relay_ports_free";

// ------------------------------------------------------------------ 1. one limit for all shards

/// With `threads = 8`, `unauth_replies_per_sec = 20`, `unauth_replies_burst = 40`: 256 sockets
/// of 127.0.0.1 (so the kernel spreads them over all 8 shards) send 4 unauthenticated Allocates
/// each (1024 in a burst); the 401s received within about 1 s after must be at most
/// burst + per_sec * elapsed + 2: the per-source limit is one limit for the source, however many
/// shards its ports hash to.
#[test]
fn unauth_reply_limit_holds_across_shards() {
    let _serial = serial();
    const PER_SEC: u32 = 20;
    const BURST: u64 = 40;
    const SOCKETS: u32 = 256;
    const EACH: u32 = 4;
    raise_nofile(4096);
    let d = Daemon::with(
        Options {
            api: Api::Token,
            threads: 8,
            unauth_replies_per_sec: Some(PER_SEC),
            ..Options::default()
        }
        .edit(|c| c.limits.unauth_replies_burst = BURST as u32),
    );
    assert_eq!(d.metric("turnpike_shards"), 8.0, "8 shards running");

    let socks: Vec<UdpSocket> = (0..SOCKETS)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let start = Instant::now();
    let mut sent = 0u32;
    for round in 0..EACH {
        for (i, s) in socks.iter().enumerate() {
            if s.send_to(&unauth_allocate(txid(round, i as u32)), d.addr)
                .is_ok()
            {
                sent += 1;
            }
        }
    }
    let sent_in = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(1);
    let (mut replies, mut others) = (0u64, 0u64);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        let mut got = false;
        for s in &socks {
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                if from != d.addr {
                    continue;
                }
                got = true;
                if is_401(&buf[..n]) {
                    replies += 1;
                } else {
                    others += 1;
                }
            }
        }
        if !got {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let bound = BURST as f64 + f64::from(PER_SEC) * elapsed + 2.0;
    eprintln!(
        "sent {sent} unauthenticated Allocates from {SOCKETS} ports in {sent_in:?}; \
         {replies} 401s (+{others} other replies) in {elapsed:.2} s; bound {bound:.1}; \
         rate_limited_replies_total {}",
        d.metric("turnpike_rate_limited_replies_total")
    );
    assert_eq!(sent, SOCKETS * EACH, "every request went out");
    assert!(replies >= 1, "the daemon answers at all");
    assert_eq!(others, 0, "only 401s come back");
    assert!(
        replies as f64 <= bound,
        "{replies} 401s to one source in {elapsed:.2} s, more than burst {BURST} + \
         {PER_SEC}/s * elapsed + 2 = {bound:.1}: each shard limits on its own"
    );
}

// ------------------------------------------------------------------ 2. EVEN-PORT reservations

/// Relay range of exactly 100 ports (61000-61099, above the kernel's ephemeral range). While an
/// allocation holding an unclaimed EVEN-PORT (R) reservation is live, `relay_ports_free` counts
/// both its ports as used (baseline - 2); deleting it (Refresh LIFETIME = 0) frees both. Then
/// 50 rounds of Allocate with EVEN-PORT R + delete by one user leave `relay_ports_free` at its
/// baseline, and another user can then take 40 allocations and then the whole rest of the range
/// (every port of it that the test could bind before the daemon started) without a 508: a
/// reservation dies with its allocation. (40 alone would pass today too: 50 reserved odd ports
/// leave 50 even ones free.)
#[test]
fn even_port_reservations_die_with_their_allocation() {
    let _serial = serial();
    const LO: u16 = 61000;
    const HI: u16 = 61099;
    // Ports of the range nobody else holds right now.
    let bindable = (LO..=HI)
        .filter(|p| UdpSocket::bind(("127.0.0.1", *p)).is_ok())
        .count();
    eprintln!(
        "{bindable} of {} relay ports bindable before start",
        HI - LO + 1
    );
    assert!(
        bindable >= 60,
        "relay range {LO}-{HI} mostly taken by something else"
    );
    let d = Daemon::with(Options {
        api: Api::Token,
        allocations_per_user: 200,
        relay_ports: Some((LO, HI)),
        extra_users: vec![("bob".into(), "builder".into())],
        ..Options::default()
    });
    assert_eq!(d.relay_ports, (LO, HI));
    let free = || d.metric(PORTS_FREE);
    let baseline = free();
    eprintln!("baseline {PORTS_FREE} = {baseline}");
    assert_eq!(
        baseline,
        f64::from(HI - LO + 1),
        "an idle daemon uses no relay port"
    );

    // A live allocation with an unclaimed reservation holds two ports.
    let mut alice = TurnClient::new(d.addr, common::USER, common::PASSWORD);
    let r = allocate_even_port_reserve(&mut alice);
    assert_eq!(r.outcome(), (true, None), "Allocate with EVEN-PORT R");
    assert!(
        r.attr(attr::RESERVATION_TOKEN).is_some(),
        "a RESERVATION-TOKEN"
    );
    let relayed = r.xor_addr(attr::XOR_RELAYED_ADDRESS);
    assert_eq!(relayed.port() % 2, 0, "an even relay port: {relayed}");
    // Every phase runs; the problems are reported together at the end.
    let mut problems = Vec::new();
    let live = poll_until(Duration::from_secs(2), baseline - 2.0, free);
    if live != baseline - 2.0 {
        problems.push(format!(
            "{PORTS_FREE} = {live} while one allocation holds its port and an unclaimed \
             reserved one; want baseline - 2 = {}",
            baseline - 2.0
        ));
    }
    assert_eq!(alice.refresh(0).outcome(), (true, None), "delete");
    let after = poll_until(Duration::from_secs(2), baseline, free);
    if after != baseline {
        problems.push(format!(
            "{PORTS_FREE} = {after} after the allocation with a reservation was deleted; \
             want {baseline}"
        ));
    }

    // 50 rounds of reserve + delete.
    let mut failed = Vec::new();
    for round in 0..50 {
        let r = allocate_even_port_reserve(&mut alice);
        if r.outcome() != (true, None) {
            failed.push((round, r.code()));
            continue;
        }
        assert_eq!(
            alice.refresh(0).outcome(),
            (true, None),
            "delete in round {round}"
        );
    }
    if !failed.is_empty() {
        problems.push(format!(
            "EVEN-PORT R Allocates refused (round, code): {failed:?}"
        ));
    }
    let after = poll_until(Duration::from_secs(2), baseline, free);
    if after != baseline {
        problems.push(format!(
            "{PORTS_FREE} = {after} after 50 reserve + delete rounds; want {baseline}"
        ));
    }

    // Another user takes 40, then the rest of the range.
    let mut bobs = Vec::new();
    let mut refused = Vec::new();
    for i in 0..bindable {
        let mut c = TurnClient::new(d.addr, "bob", "builder");
        let r = c.allocate();
        if r.outcome() != (true, None) {
            refused.push((i, r.code()));
        }
        bobs.push(c);
    }
    let first_40 = refused.iter().filter(|(i, _)| *i < 40).count();
    if first_40 > 0 {
        problems.push(format!(
            "{first_40} of the first 40 allocations of another user refused"
        ));
    }
    if !refused.is_empty() {
        problems.push(format!(
            "{} of {bindable} allocations of another user refused after the 50 \
             reservations' allocations were deleted (reservations still hold ports); \
             first (index, code): {:?}",
            refused.len(),
            &refused[..refused.len().min(3)]
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ------------------------------------------------------------------ 3. static users per source

/// Default quotas (`allocations_per_user = 10`): one static user shared by 40 clients on 8
/// source addresses (127.0.0.2-127.0.0.9, 5 each) all allocate, since a static user is counted
/// per (user, source address); from one more source (127.0.0.10) the first 10 allocations
/// succeed and the 11th gets 486.
#[test]
fn shared_static_user_across_sources() {
    let _serial = serial();
    let d = Daemon::start();
    let cap = d.opts.allocations_per_user as usize;
    assert_eq!(cap, 10);
    let mut clients = Vec::new();
    let mut refused = Vec::new();
    for src in 2..=9 {
        let ip = format!("127.0.0.{src}");
        for _ in 0..5 {
            let mut c = client_from(&d, &ip, common::USER, common::PASSWORD);
            let r = c.allocate();
            if r.outcome() != (true, None) {
                refused.push((ip.clone(), r.code()));
            }
            clients.push(c);
        }
    }
    assert!(
        refused.is_empty(),
        "{} of 40 allocations of one static user from 8 sources refused: {refused:?}",
        refused.len()
    );
    let mut outcomes = Vec::new();
    for _ in 0..=cap {
        let mut c = client_from(&d, "127.0.0.10", common::USER, common::PASSWORD);
        outcomes.push(c.allocate().outcome());
        clients.push(c);
    }
    let mut want = vec![(true, None); cap];
    want.push((false, Some(486)));
    assert_eq!(
        outcomes, want,
        "from one source: {cap} allocations, then 486"
    );
}

/// The REST variant: one REST user part ("carol", credentials minted from the secret) on two
/// source addresses (127.0.0.11 and 127.0.0.12, 5 each) shares ONE cap of 10; the 11th
/// allocation, from either of those sources or a third one (127.0.0.13), gets 486.
#[test]
fn shared_rest_user_across_sources_shares_one_cap() {
    let _serial = serial();
    let d = Daemon::start();
    let cap = d.opts.allocations_per_user as usize;
    let (user, pass) = rest_credential("carol", unix_now() + 3600);
    let mut clients = Vec::new();
    let mut outcomes = Vec::new();
    for i in 0..cap {
        let ip = if i % 2 == 0 {
            "127.0.0.11"
        } else {
            "127.0.0.12"
        };
        let mut c = client_from(&d, ip, &user, &pass);
        outcomes.push(c.allocate().outcome());
        clients.push(c);
    }
    assert_eq!(
        outcomes,
        vec![(true, None); cap],
        "{cap} allocations of carol"
    );
    for ip in ["127.0.0.11", "127.0.0.12", "127.0.0.13"] {
        let mut c = client_from(&d, ip, &user, &pass);
        assert_eq!(
            c.allocate().outcome(),
            (false, Some(486)),
            "allocation {} of carol, from {ip}",
            cap + 1
        );
        clients.push(c);
    }
}

// ------------------------------------------------------------------ 4. a big NAT

/// Shipped default `[limits]` (`unauth_replies_per_sec: None`). 500 clients behind one address
/// (127.0.0.1, 500 sockets) each do one full Allocate (the 401 round, then the signed Allocate), started 20 ms
/// apart (50 per second, about 10 s in all): all 500 succeed. Credentials: REST, with 500
/// different user parts, so the per-user quota plays no part. Relay range 11000-11999.
#[test]
fn nat_of_500_clients_allocates_under_default_limits() {
    let _serial = serial();
    const CLIENTS: usize = 500;
    const WORKERS: usize = 25;
    const SPACING: Duration = Duration::from_millis(20);
    raise_nofile(4096);
    let d = Daemon::with(Options {
        unauth_replies_per_sec: None,
        relay_ports: Some((11000, 11999)),
        ..Options::default()
    });
    assert_unauth_defaults(&d);
    let limits = effective_limits(&d);
    eprintln!(
        "effective defaults: unauth_replies_per_sec = {}, unauth_replies_burst = {}",
        limit(&limits, "unauth_replies_per_sec"),
        limit(&limits, "unauth_replies_burst")
    );
    let server = d.addr;
    let expiry = unix_now() + 3600;
    let t0 = Instant::now() + Duration::from_millis(100);
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            std::thread::spawn(move || {
                let mut results = Vec::new();
                let mut keep = Vec::new();
                for i in (w..CLIENTS).step_by(WORKERS) {
                    let at = t0 + SPACING * i as u32;
                    if let Some(wait) = at.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let (user, pass) = rest_credential(&format!("nat-{i}"), expiry);
                    let mut c = TurnClient::new(server, &user, &pass);
                    let challenge = c.try_transact(&unauth_allocate(txid(0xC0DE, i as u32)));
                    let outcome = match challenge {
                        None => Err("no reply to the unauthenticated Allocate".to_string()),
                        Some(r) if r.code() != Some(401) => Err(format!("got {:?}", r.code())),
                        Some(r) => {
                            c.nonce = r.attr(attr::NONCE).expect("NONCE in 401");
                            match c.allocate().outcome() {
                                (true, None) => Ok(()),
                                other => Err(format!("signed Allocate: {other:?}")),
                            }
                        }
                    };
                    results.push((i, outcome));
                    keep.push(c);
                }
                (results, keep)
            })
        })
        .collect();
    let mut failures = Vec::new();
    let mut ok = 0;
    let mut clients = Vec::new();
    for w in workers {
        let (results, keep) = w.join().expect("worker thread");
        for (i, r) in results {
            match r {
                Ok(()) => ok += 1,
                Err(e) => failures.push((i, e)),
            }
        }
        clients.extend(keep);
    }
    failures.sort();
    eprintln!(
        "{ok} of {CLIENTS} allocated in {:.1} s; first failures: {:?}",
        t0.elapsed().as_secs_f64(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(
        ok,
        CLIENTS,
        "{} of {CLIENTS} clients behind one address failed under default limits",
        failures.len()
    );
    drop(clients);
}

// ------------------------------------------------------------------ 5. reflection flood

/// Shipped default limits. One source (127.0.0.1, 8 sockets) sends up to 200 000
/// unauthenticated Allocates as fast as it can (stopping after 5 s at the latest); the replies
/// must number at most burst + rate * elapsed + 5, with rate and burst the effective defaults
/// as `check-config` prints them. Prints requests, bytes in, replies, bytes out and the
/// amplification (bytes out / bytes in).
#[test]
fn spoofed_flood_gets_only_the_configured_share() {
    let _serial = serial();
    const MAX_REQUESTS: u64 = 200_000;
    const MAX_TIME: Duration = Duration::from_secs(5);
    const SOCKETS: usize = 8;
    let d = Daemon::with(Options {
        unauth_replies_per_sec: None,
        ..Options::default()
    });
    assert_unauth_defaults(&d);
    let limits = effective_limits(&d);
    let rate = limit(&limits, "unauth_replies_per_sec");
    let burst = limit(&limits, "unauth_replies_burst");
    assert!(rate > 0, "unauthenticated replies are limited by default");

    let socks: Vec<Arc<UdpSocket>> = (0..SOCKETS)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            Arc::new(s)
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let replies = Arc::new(AtomicU64::new(0));
    let bytes_out = Arc::new(AtomicU64::new(0));
    let server = d.addr;
    let receivers: Vec<_> = socks
        .iter()
        .map(|s| {
            let (s, stop, replies, bytes_out) = (
                Arc::clone(s),
                Arc::clone(&stop),
                Arc::clone(&replies),
                Arc::clone(&bytes_out),
            );
            std::thread::spawn(move || {
                let hard_stop = Instant::now() + MAX_TIME + Duration::from_secs(10);
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) && Instant::now() < hard_stop {
                    if let Ok((n, from)) = s.recv_from(&mut buf) {
                        if from == server {
                            replies.fetch_add(1, Ordering::Relaxed);
                            bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();

    let start = Instant::now();
    let (mut sent, mut bytes_in) = (0u64, 0u64);
    let mut n = 0u32;
    while sent < MAX_REQUESTS && start.elapsed() < MAX_TIME {
        for s in &socks {
            n = n.wrapping_add(1);
            let req = unauth_allocate(txid(0xF100D, n));
            if s.send_to(&req, server).is_ok() {
                sent += 1;
                bytes_in += req.len() as u64;
            }
        }
    }
    let send_time = start.elapsed();
    // Stragglers.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for r in receivers {
        r.join().expect("receiver thread");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (replies, bytes_out) = (
        replies.load(Ordering::Relaxed),
        bytes_out.load(Ordering::Relaxed),
    );
    let bound = burst as f64 + rate as f64 * elapsed + 5.0;
    eprintln!(
        "flood: {sent} requests ({bytes_in} bytes in) in {:.2} s; {replies} replies \
         ({bytes_out} bytes out) in {elapsed:.2} s; bytes out / bytes in = {:.6}; \
         limit rate {rate}/s burst {burst}: bound {bound:.0}",
        send_time.as_secs_f64(),
        bytes_out as f64 / bytes_in.max(1) as f64
    );
    assert!(replies >= 1, "the daemon answers at all");
    assert!(
        replies as f64 <= bound,
        "{replies} replies to one source in {elapsed:.2} s, more than burst {burst} + \
         {rate}/s * elapsed + 5 = {bound:.0}"
    );
}

// ------------------------------------------------------------------ 6. log flooding

/// Relay range of 2 ports (61200-61201), `allocations_per_user = 500`: 200 Allocates of one
/// static user, each from its own socket; at most 2 get a port, every other one gets 508, and
/// the daemon's log has at most 5 WARN lines about relay sockets or ports (not one or two per
/// failure).
#[test]
fn failed_relay_opens_do_not_flood_the_log() {
    let _serial = serial();
    const ATTEMPTS: usize = 200;
    let d = Daemon::with(Options {
        allocations_per_user: 500,
        relay_ports: Some((61200, 61201)),
        ..Options::default()
    });
    // Only what the Allocates cause: not the start-up warnings (a loopback relay address).
    let start = d.start_log_len();
    let mut clients = Vec::new();
    let (mut ok, mut no_port, mut other) = (0, 0, Vec::new());
    for _ in 0..ATTEMPTS {
        let mut c = TurnClient::new(d.addr, common::USER, common::PASSWORD);
        match c.allocate().outcome() {
            (true, None) => ok += 1,
            (false, Some(508)) => no_port += 1,
            o => other.push(o),
        }
        clients.push(c);
    }
    // Let the log reader catch up.
    std::thread::sleep(Duration::from_millis(300));
    let warns: Vec<String> = d
        .log_lines()
        .into_iter()
        .skip(start)
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .is_some_and(|v| v.get("level").and_then(|x| x.as_str()) == Some("WARN"))
        })
        .collect();
    let relay_warns: Vec<&String> = warns
        .iter()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("relay") || l.contains("port")
        })
        .collect();
    eprintln!(
        "{ok} allocated, {no_port} got 508, other {other:?}; {} WARN lines, {} about relay \
         ports; first: {:?}",
        warns.len(),
        relay_warns.len(),
        relay_warns.first()
    );
    assert!(ok <= 2, "{ok} allocations on 2 relay ports");
    assert!(
        other.is_empty(),
        "outcomes other than success or 508: {other:?}"
    );
    assert_eq!(ok + no_port, ATTEMPTS);
    assert!(
        relay_warns.len() <= 5,
        "{} WARN lines about relay ports for {no_port} failed opens",
        relay_warns.len()
    );
}

// ------------------------------------------------------------------ 7. LIFETIME = 0 on Allocate

/// An Allocate carrying LIFETIME = 0 succeeds, and the LIFETIME in its response is the default
/// lifetime: 600 s with the default config, 300 s with `limits.default_lifetime_secs = 300`
/// (not 1 s, not 0).
#[test]
fn allocate_with_lifetime_zero_gets_the_default() {
    let _serial = serial();
    for (set, want) in [(None, 600u32), (Some(300), 300)] {
        let d = Daemon::with(Options::default().edit(move |c| {
            if let Some(secs) = set {
                c.limits.default_lifetime_secs = secs;
            }
        }));
        let mut c = TurnClient::new(d.addr, common::USER, common::PASSWORD);
        let r = c.request(method::ALLOCATE, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .u32_attr(attr::LIFETIME, 0);
        });
        assert_eq!(
            r.outcome(),
            (true, None),
            "Allocate with LIFETIME 0 (default_lifetime_secs {set:?})"
        );
        let lifetime = r.attr(attr::LIFETIME).expect("LIFETIME in the response");
        let secs = u32::from_be_bytes(lifetime[..4].try_into().unwrap());
        assert_eq!(
            secs, want,
            "granted lifetime (default_lifetime_secs {set:?})"
        );
        // It is really allocated: a Refresh keeps it.
        assert_eq!(
            c.refresh(want).outcome(),
            (true, None),
            "Refresh after (default_lifetime_secs {set:?})"
        );
    }
}

// ------------------------------------------------------------------ 8. our own addresses as peers

/// The relay address of the namespace tests, on `v0`.
const NS_RELAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Another address of the same host (same interface), not a relay address.
const NS_OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Where the clients send from.
const NS_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// An address in the allowed range that is not ours (nothing answers there; permissions only).
const NS_STRANGER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
/// The IPv6 relay address, on `v0`.
const NS_RELAY6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const NS_STRANGER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99);
/// The namespace is fresh: fixed ports are free in it.
const NS_LISTEN_PORT: u16 = 3478;
const NS_API_PORT: u16 = 9641;
const NS_RELAY_PORTS: (u16, u16) = (40000, 40099);

/// A fresh namespace with `lo` up and a veth pair (both ends inside; `dummy` may be missing
/// from the kernel) whose `v0` carries 198.18.0.1/24, .2/24, .10/24 and 2001:db8::1/64 (nodad,
/// usable at once). None, after saying why, where this machine cannot do it (a failure with
/// `CI` set).
fn host_netns(test: &str, short: &str) -> Option<Netns> {
    if let Err(reason) = netns::preflight_ip() {
        netns::cannot_run(test, &reason);
        return None;
    }
    netns::remove_stale();
    let ns = match Netns::create(short) {
        Ok(ns) => ns,
        Err(SetupError::Unavailable(reason)) => {
            netns::cannot_run(
                test,
                &format!("cannot create a network namespace: {reason}"),
            );
            return None;
        }
        Err(SetupError::Failed(e)) => panic!("setting up the namespace failed: {e}"),
    };
    let setup = [
        "link add v0 type veth peer name v1".to_owned(),
        format!("addr add {NS_RELAY}/24 dev v0"),
        format!("addr add {NS_OTHER}/24 dev v0"),
        format!("addr add {NS_CLIENT}/24 dev v0"),
        format!("-6 addr add {NS_RELAY6}/64 dev v0 nodad"),
        "link set v1 up".to_owned(),
        "link set v0 up".to_owned(),
    ];
    for cmd in &setup {
        ns.ip(cmd)
            .unwrap_or_else(|e| panic!("namespace {}: {e}", ns.name));
    }
    Some(ns)
}

/// The daemon inside `ns`: UDP listener 0.0.0.0:3478, API (with a token) on 0.0.0.0:9641, relay
/// 198.18.0.1 (and `relay6`), ports 40000-40099, loopback peers closed, 198.18.0.0/15 and
/// 2001:db8::/32 opened by the allow list (so a 403 below is about the address being ours, not
/// about its range).
fn ns_daemon(ns: &Netns, relay6: Option<Ipv6Addr>) -> Daemon {
    let d = Daemon::with(
        Options {
            netns: Some(ns.name.clone()),
            listen: Some(SocketAddr::from((Ipv4Addr::UNSPECIFIED, NS_LISTEN_PORT))),
            relay_address: Some(NS_RELAY),
            relay_address_v6: relay6,
            relay_ports: Some(NS_RELAY_PORTS),
            allow_loopback_peers: false,
            api: Api::Token,
            api_listen: Some(SocketAddr::from((Ipv4Addr::UNSPECIFIED, NS_API_PORT))),
            ..Options::default()
        }
        .edit(|c| {
            c.peers.allow = vec![
                "198.18.0.0/15".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ]
        }),
    );
    assert_eq!(d.addr.port(), NS_LISTEN_PORT, "listener {}", d.addr);
    d
}

/// A client inside `ns`, sending from 198.18.0.10 to the listener at 198.18.0.1. The socket is
/// opened on a thread inside the namespace and then used from this one.
fn ns_client(ns: &Netns) -> TurnClient {
    let sock = ns
        .run_in("client socket", || UdpSocket::bind((NS_CLIENT, 0)))
        .unwrap_or_else(|e| panic!("bind {NS_CLIENT}:0 in the namespace: {e}"));
    TurnClient::with_socket(
        sock,
        SocketAddr::from((NS_RELAY, NS_LISTEN_PORT)),
        common::USER,
        common::PASSWORD,
    )
}

/// A port in the relay range that none of `live` holds.
fn unused_relay_port(live: &[SocketAddr]) -> u16 {
    (NS_RELAY_PORTS.0 + 17..=NS_RELAY_PORTS.1)
        .find(|p| live.iter().all(|a| a.port() != *p))
        .expect("a free port in the relay range")
}

/// `(is success, error code)` of CreatePermission and of ChannelBind on `channel` to `peer`.
fn permit_and_bind(c: &mut TurnClient, channel: u16, peer: SocketAddr) -> [(bool, Option<u16>); 2] {
    [
        c.permit(peer).outcome(),
        c.bind_channel(channel, peer).outcome(),
    ]
}

/// Inside a namespace whose interface carries 198.18.0.1 (the relay address), 198.18.0.2 and
/// 198.18.0.10 (the clients), the daemon listens on the wildcard 0.0.0.0:3478 with its API on
/// 0.0.0.0:9641, so both answer on 198.18.0.2 too. A client allocated through 198.18.0.1 gets
/// 403 on CreatePermission and on ChannelBind to 198.18.0.2 at the listener port (TURN over
/// TURN through our own listener), at the API port, at an unused port of the relay range and at
/// a live relay port's number, and to 198.18.0.1 at the listener and API ports; while
/// 198.18.0.99 (same allowed range, not ours) is permitted, and so is the live relay port of a
/// second allocation (relay to relay), through which data then flows both ways.
#[test]
fn wildcard_listener_is_not_a_peer_on_another_host_address() {
    const TEST: &str = "hardening::wildcard_listener_is_not_a_peer_on_another_host_address";
    let _serial = serial();
    // Declared first: dropped last, after the daemon inside it has stopped.
    let Some(ns) = host_netns(TEST, "hwild") else {
        return;
    };
    let d = ns_daemon(&ns, None);
    let mut alice = ns_client(&ns);
    let mut bob = ns_client(&ns);
    let alice_relay = alice.must_allocate();
    let bob_relay = bob.must_allocate();
    for r in [alice_relay, bob_relay] {
        assert_eq!(r.ip(), IpAddr::V4(NS_RELAY), "relayed address {r}");
    }
    let unused = unused_relay_port(&[alice_relay, bob_relay]);
    eprintln!(
        "daemon in {} listening on {}, API on {:?}; relays {alice_relay} and {bob_relay}; \
         unused relay port {unused}",
        ns.name, d.addr, d.api_addr
    );

    // Control: the allow list opens the range, so what follows is refused for being ours.
    let stranger = SocketAddr::from((NS_STRANGER, NS_LISTEN_PORT));
    assert_eq!(
        permit_and_bind(&mut alice, 0x4000, stranger),
        [(true, None); 2],
        "{stranger}: in the allowed range and not ours"
    );

    let ours = [
        (NS_OTHER, NS_LISTEN_PORT, "the wildcard STUN/TURN listener"),
        (NS_OTHER, NS_API_PORT, "the wildcard HTTP API"),
        (NS_OTHER, unused, "an unused relay-range port"),
        (NS_OTHER, bob_relay.port(), "a live relay port's number"),
        (
            NS_RELAY,
            NS_LISTEN_PORT,
            "the listener on the relay address",
        ),
        (NS_RELAY, NS_API_PORT, "the API on the relay address"),
    ];
    let mut wrong = Vec::new();
    for (i, (ip, port, what)) in ours.into_iter().enumerate() {
        let peer = SocketAddr::from((ip, port));
        let got = permit_and_bind(&mut alice, 0x4001 + i as u16, peer);
        if got != [(false, Some(403)); 2] {
            wrong.push(format!(
                "{peer} ({what}): CreatePermission {:?}, ChannelBind {:?}",
                got[0], got[1]
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "our own host's addresses accepted as peers (want 403 for both):\n{}",
        wrong.join("\n")
    );

    // Relay to relay stays open, and works.
    alice.must_bind_channel(0x4010, bob_relay);
    assert_eq!(
        bob.permit(alice_relay).outcome(),
        (true, None),
        "bob permits alice's relay {alice_relay}"
    );
    alice.send_channel_data(0x4010, b"relay to relay");
    let data = recv_data_indication(&bob, Duration::from_secs(2))
        .expect("bob gets alice's data from her relay");
    assert_eq!(data, (alice_relay, b"relay to relay".to_vec()));
}

/// The next Data indication at `c`: `(XOR-PEER-ADDRESS, DATA)`, or None after `wait`.
fn recv_data_indication(c: &TurnClient, wait: Duration) -> Option<(SocketAddr, Vec<u8>)> {
    let deadline = Instant::now() + wait;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let buf = c.recv(left.max(Duration::from_millis(1)))?;
        let Ok(m) = Message::parse(&buf) else {
            continue;
        };
        if m.method == method::DATA && m.class == Class::Indication {
            let r = Reply(buf.clone());
            return Some((r.xor_addr(attr::XOR_PEER_ADDRESS), r.attr(attr::DATA)?));
        }
    }
    None
}

/// The ways to write `v4` as an IPv6 address that the daemon reduces to IPv4: IPv4-mapped
/// (::ffff:A), NAT64 (64:ff9b::A), 6to4 (2002:AAAA:AAAA::) and IPv4-compatible (::A).
fn embedded_spellings(v4: Ipv4Addr) -> [(&'static str, IpAddr); 4] {
    let [a, b, c, d] = v4.octets();
    let (hi, lo) = (u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]));
    [
        ("IPv4-mapped", IpAddr::V6(v4.to_ipv6_mapped())),
        (
            "NAT64",
            IpAddr::V6(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, hi, lo)),
        ),
        (
            "6to4",
            IpAddr::V6(Ipv6Addr::new(0x2002, hi, lo, 0, 0, 0, 0, 0)),
        ),
        (
            "IPv4-compatible",
            IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, hi, lo)),
        ),
    ]
}

/// Inside a namespace: relay addresses 198.18.0.1 and 2001:db8::1, both opened by the allow
/// list. A dual-stack allocation (ADDITIONAL-ADDRESS-FAMILY IPv6, so neither family answers
/// 443) gets 403 on CreatePermission and on ChannelBind to 198.18.0.1 at a relay-range port no
/// allocation holds, written plain or as [::ffff:198.18.0.1], [64:ff9b::c612:1],
/// [2002:c612:1::] or [::c612:1], and to [2001:db8::1] at that port; while the live relay ports
/// of a second dual-stack allocation are permitted however they are written (ChannelBind checked
/// on the plain spellings), and so are 198.18.0.99 and 2001:db8::99 (allowed, not ours).
#[test]
fn embedded_ipv4_spellings_of_the_relay_address_are_refused() {
    const TEST: &str = "hardening::embedded_ipv4_spellings_of_the_relay_address_are_refused";
    let _serial = serial();
    // Declared first: dropped last, after the daemon inside it has stopped.
    let Some(ns) = host_netns(TEST, "hembed") else {
        return;
    };
    let _d = ns_daemon(&ns, Some(NS_RELAY6));
    let mut alice = ns_client(&ns);
    let mut bob = ns_client(&ns);
    let mut live = Vec::new();
    for c in [&mut alice, &mut bob] {
        let r = c.allocate_dual();
        assert_eq!(r.outcome(), (true, None), "dual-stack Allocate");
        let relays = r.xor_addrs(attr::XOR_RELAYED_ADDRESS);
        let families: Vec<IpAddr> = relays.iter().map(SocketAddr::ip).collect();
        assert_eq!(
            families,
            [IpAddr::V4(NS_RELAY), IpAddr::V6(NS_RELAY6)],
            "relayed addresses {relays:?}"
        );
        live.push(relays);
    }
    let (bob4, bob6) = (live[1][0], live[1][1]);
    let unused = unused_relay_port(&live.concat());
    eprintln!("relays {live:?}; unused relay port {unused}");

    // Controls: allowed, not ours.
    let mut channel = 0x4000;
    for ip in [IpAddr::V4(NS_STRANGER), IpAddr::V6(NS_STRANGER6)] {
        let peer = SocketAddr::new(ip, unused);
        assert_eq!(
            permit_and_bind(&mut alice, channel, peer),
            [(true, None); 2],
            "{peer}: in the allowed range and not ours"
        );
        channel += 1;
    }

    let mut refused = vec![
        ("plain IPv4", IpAddr::V4(NS_RELAY)),
        ("IPv6 relay address", IpAddr::V6(NS_RELAY6)),
    ];
    refused.extend(embedded_spellings(NS_RELAY));
    let mut wrong = Vec::new();
    for (what, ip) in &refused {
        let peer = SocketAddr::new(*ip, unused);
        let got = permit_and_bind(&mut alice, channel, peer);
        channel += 1;
        if got != [(false, Some(403)); 2] {
            wrong.push(format!(
                "{peer} ({what}): CreatePermission {:?}, ChannelBind {:?}",
                got[0], got[1]
            ));
        }
    }

    // Live relay ports stay peers, however they are written.
    let mut live_peers = vec![("plain IPv4", bob4), ("IPv6 relay address", bob6)];
    live_peers.extend(
        embedded_spellings(NS_RELAY).map(|(what, ip)| (what, SocketAddr::new(ip, bob4.port()))),
    );
    for (what, peer) in &live_peers {
        let got = alice.permit(*peer).outcome();
        if got != (true, None) {
            wrong.push(format!(
                "{peer} ({what}, a live relay port): CreatePermission {got:?}, want success"
            ));
        }
    }
    for peer in [bob4, bob6] {
        let got = alice.bind_channel(channel, peer).outcome();
        channel += 1;
        if got != (true, None) {
            wrong.push(format!(
                "{peer} (a live relay port): ChannelBind {got:?}, want success"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The HTTP API on an ephemeral port (`api.listen = "127.0.0.1:0"`) is one of our own service
/// endpoints at the port the kernel picked: with loopback peers opened (a test rig), a client
/// still cannot reach the API as a peer, while an ordinary loopback port stays a peer.
#[test]
fn api_on_an_ephemeral_port_is_not_a_peer() {
    let _serial = serial();
    let d = Daemon::with(Options::with_api());
    let api = d.api_addr.expect("api listening");
    assert_ne!(api.port(), 0);
    let mut c = client_from(&d, "127.0.0.1", common::USER, common::PASSWORD);
    c.must_allocate();
    assert_eq!(
        c.permit(api).outcome(),
        (false, Some(403)),
        "CreatePermission to the API at {api}"
    );
    let echo = common::EchoPeer::start();
    assert_eq!(c.permit(echo.addr).outcome(), (true, None));
}

/// Resident memory of `pid` in KiB (VmRSS).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// A measurement, not a check (run with `--ignored --nocapture`): the daemon's RSS before and
/// after `TURNPIKE_REFRESHES` (default 500,000) Refreshes of one allocation. Each Refresh used
/// to push a timer entry that stayed until its own expiry; now an allocation has one.
#[test]
#[ignore]
fn refresh_storm_memory() {
    let _serial = serial();
    let n: u64 = std::env::var("TURNPIKE_REFRESHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000);
    let d = Daemon::start();
    let mut c = client_from(&d, "127.0.0.1", common::USER, common::PASSWORD);
    c.must_allocate();
    let before = rss_kib(d.pid());
    for i in 0..n {
        assert_eq!(c.refresh(600).outcome(), (true, None), "refresh {i}");
    }
    let after = rss_kib(d.pid());
    eprintln!("refresh storm: {n} Refreshes, RSS {before} KiB before, {after} KiB after");
}
