//! Hardening against abuse and exhaustion, seen from raw clients on loopback: the limit on
//! unauthenticated replies across shards, EVEN-PORT reservations, per-user quotas with shared
//! credentials, a big NAT under default limits, a reflection flood, log flooding by failed relay
//! opens, and LIFETIME = 0 on Allocate.
//!
//! Every test starts its own daemon (ephemeral listener port) through `tests/common`, sends only
//! to loopback, bounds every load loop in count and time, and asserts counts, never speed. The
//! tests take a lock so that their loads do not overlap: what one measures is its own daemon.
//!
//! Keys the harness does not expose as options (`threads`, the relay port range, removing the
//! harness's `unauth_replies_per_sec = 0` so the shipped defaults apply) are edited in the config
//! file by a `sed` run through [`Options::sh_prefix`] just before the daemon starts; each test
//! checks that the edit took.

mod common;

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{
    out_text, rest_credential, run_cli, unix_now, Api, Daemon, Options, Reply, TurnClient,
};
use turnpike::proto::codec::{attr, method, Class, Message, MessageWriter};

/// One load test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A config edit made before the daemon starts.
enum Edit {
    /// Replace the line `KEY = ...` with `KEY = VALUE`.
    Set(&'static str, String),
    /// Remove the line `KEY = ...`.
    Delete(&'static str),
}

/// The `sh` prefix that applies `edits` to the config file (`$1`) with `sed`; a failed edit
/// exits 97 so the start fails loudly.
fn edit_prefix(edits: &[Edit]) -> String {
    let simple = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    };
    let mut cmd = String::from("sed -i");
    for e in edits {
        match e {
            Edit::Set(k, v) => {
                assert!(simple(k) && simple(v), "edit {k} = {v}");
                cmd.push_str(&format!(" -e 's/^{k} = .*/{k} = {v}/'"));
            }
            Edit::Delete(k) => {
                assert!(simple(k), "edit {k}");
                cmd.push_str(&format!(" -e '/^{k} = /d'"));
            }
        }
    }
    cmd.push_str(" \"$1\" || exit 97");
    cmd
}

/// Starts a daemon with `opts` and the config `edits`; checks that each edit is in the file.
fn start_edited(mut opts: Options, edits: &[Edit]) -> Daemon {
    assert!(opts.sh_prefix.is_none());
    if !edits.is_empty() {
        opts.sh_prefix = Some(edit_prefix(edits));
    }
    let d = Daemon::with(opts);
    let text = std::fs::read_to_string(d.config_path()).expect("read config");
    for e in edits {
        match e {
            Edit::Set(k, v) => assert!(
                text.lines().any(|l| l == format!("{k} = {v}")),
                "config edit {k} = {v} missing:\n{text}"
            ),
            Edit::Delete(k) => assert!(
                !text.lines().any(|l| l.starts_with(&format!("{k} = "))),
                "config line {k} not removed:\n{text}"
            ),
        }
    }
    d
}

fn relay_range(lo: u16, hi: u16) -> [Edit; 2] {
    [
        Edit::Set("port_min", lo.to_string()),
        Edit::Set("port_max", hi.to_string()),
    ]
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
    let d = start_edited(
        Options {
            api: Api::Token,
            unauth_replies_per_sec: PER_SEC,
            extra_limits: format!("unauth_replies_burst = {BURST}"),
            ..Options::default()
        },
        &[Edit::Set("threads", "8".into())],
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
    let d = start_edited(
        Options {
            api: Api::Token,
            allocations_per_user: 200,
            extra_users: vec![("bob".into(), "builder".into())],
            ..Options::default()
        },
        &relay_range(LO, HI),
    );
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

/// Shipped default `[limits]` (no `unauth_*` keys in the config; the harness's
/// `unauth_replies_per_sec = 0` is removed). 500 clients behind one address (127.0.0.1, 500
/// sockets) each do one full Allocate (the 401 round, then the signed Allocate), started 20 ms
/// apart (50 per second, about 10 s in all): all 500 succeed. Credentials: REST, with 500
/// different user parts, so the per-user quota plays no part. Relay range 11000-11999.
#[test]
fn nat_of_500_clients_allocates_under_default_limits() {
    let _serial = serial();
    const CLIENTS: usize = 500;
    const WORKERS: usize = 25;
    const SPACING: Duration = Duration::from_millis(20);
    raise_nofile(4096);
    let mut edits = vec![Edit::Delete("unauth_replies_per_sec")];
    edits.extend(relay_range(11000, 11999));
    let d = start_edited(Options::default(), &edits);
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
    let d = start_edited(
        Options::default(),
        &[Edit::Delete("unauth_replies_per_sec")],
    );
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
    let d = start_edited(
        Options {
            allocations_per_user: 500,
            ..Options::default()
        },
        &relay_range(61200, 61201),
    );
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
    // Only what the Allocates caused: not the start-up warnings (a loopback relay address).
    let lines = d.log_lines();
    let ready = lines
        .iter()
        .position(|l| l.contains("turnpike ready"))
        .expect("ready line");
    let warns: Vec<String> = lines
        .into_iter()
        .skip(ready + 1)
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
    for (extra, want) in [("", 600u32), ("default_lifetime_secs = 300", 300)] {
        let d = Daemon::with(Options {
            extra_limits: extra.into(),
            ..Options::default()
        });
        let mut c = TurnClient::new(d.addr, common::USER, common::PASSWORD);
        let r = c.request(method::ALLOCATE, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .u32_attr(attr::LIFETIME, 0);
        });
        assert_eq!(
            r.outcome(),
            (true, None),
            "Allocate with LIFETIME 0 ({extra:?})"
        );
        let lifetime = r.attr(attr::LIFETIME).expect("LIFETIME in the response");
        let secs = u32::from_be_bytes(lifetime[..4].try_into().unwrap());
        assert_eq!(secs, want, "granted lifetime ({extra:?})");
        // It is really allocated: a Refresh keeps it.
        assert_eq!(
            c.refresh(want).outcome(),
            (true, None),
            "Refresh after ({extra:?})"
        );
    }
}
