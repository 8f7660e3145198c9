//! The daemon's life under an init system: reload on SIGHUP while relaying, a refused broken
//! reload, warnings on reload about secrets others can read, the graceful drain on SIGTERM, and
//! the sd_notify conversation (READY, RELOADING, STOPPING, WATCHDOG) seen on a real Unix
//! datagram socket.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    channel_data, rest_credential, unix_now, Api, Daemon, EchoPeer, Options, TurnClient, PASSWORD,
    USER,
};

const CHANNEL: u16 = 0x4002;
const STEP: Duration = Duration::from_secs(3);

// ------------------------------------------------------------------ a continuous relay

/// A client that sends a numbered ChannelData frame every `interval` through an allocation to
/// an echo peer and counts the echoes, in two threads. Bounded: stops after `max_run`.
struct Stream {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    /// Arrival time of every echo, for gap and "still relaying at" checks.
    arrivals: Arc<Mutex<Vec<Instant>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Stream {
    fn start(c: &TurnClient, interval: Duration, max_run: Duration) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let server = c.server;
        let tx = c.sock.try_clone().unwrap();
        let rx = c.sock.try_clone().unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let deadline = Instant::now() + max_run;
        let (s_stop, s_sent) = (Arc::clone(&stop), Arc::clone(&sent));
        let sender = std::thread::spawn(move || {
            let mut seq: u64 = 0;
            let mut next = Instant::now();
            while !s_stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let payload = format!("seq {seq:08}");
                if tx
                    .send_to(&channel_data(CHANNEL, payload.as_bytes()), server)
                    .is_ok()
                {
                    s_sent.fetch_add(1, Ordering::Relaxed);
                }
                seq += 1;
                next += interval;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        });
        let (r_stop, r_count, r_arr) = (
            Arc::clone(&stop),
            Arc::clone(&received),
            Arc::clone(&arrivals),
        );
        let receiver = std::thread::spawn(move || {
            let mut buf = vec![0u8; 2048];
            let mut seen = std::collections::HashSet::new();
            // Keeps reading a little after the stop flag, so in-flight echoes are counted.
            let mut stopped_at: Option<Instant> = None;
            while Instant::now() < deadline + Duration::from_secs(1) {
                if r_stop.load(Ordering::Relaxed) {
                    let t = *stopped_at.get_or_insert_with(Instant::now);
                    if t.elapsed() > Duration::from_millis(300) {
                        break;
                    }
                }
                let Ok((n, from)) = rx.recv_from(&mut buf) else {
                    continue;
                };
                if from != server || n < 4 || buf[..2] != CHANNEL.to_be_bytes() {
                    continue;
                }
                let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
                let Some(payload) = buf.get(4..4 + len) else {
                    continue;
                };
                // Count each sequence number once (a duplicate would hide a loss).
                if payload.starts_with(b"seq ") && seen.insert(payload.to_vec()) {
                    r_count.fetch_add(1, Ordering::Relaxed);
                    r_arr.lock().unwrap().push(Instant::now());
                }
            }
        });
        Stream {
            stop,
            sent,
            received,
            arrivals,
            threads: vec![sender, receiver],
        }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    fn last_arrival(&self) -> Option<Instant> {
        self.arrivals.lock().unwrap().last().copied()
    }

    /// Stops sending, waits for stragglers; returns (sent, received, largest gap between echoes).
    fn finish(mut self) -> (u64, u64, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        let arrivals = self.arrivals.lock().unwrap();
        let gap = arrivals
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
            gap,
        )
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Allocates as the static user and binds a channel to a fresh echo peer.
fn relaying_client(d: &Daemon) -> (TurnClient, EchoPeer, SocketAddr) {
    let peer = EchoPeer::start();
    let mut c = TurnClient::new(d.addr, USER, PASSWORD);
    let relay = c.must_allocate();
    c.must_bind_channel(CHANNEL, peer.addr);
    c.echo_round_trips(CHANNEL, 2);
    (c, peer, relay)
}

fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ------------------------------------------------------------------ reload

#[test]
fn five_reloads_under_load_lose_no_allocation_and_apply_changes() {
    let mut opts = Options::with_api();
    let mut d = Daemon::with(opts.clone());
    let (c, _peer, _relay) = relaying_client(&d);
    let stream = Stream::start(&c, Duration::from_millis(10), Duration::from_secs(30));
    wait_until(STEP, "the first echoes", || stream.received() > 5);
    // Waits for the n-th reload, then lets the stream run a while under the new config.
    let reloaded = |d: &Daemon, n: usize| {
        d.wait_metric("turnpike_reloads_total{result=\"ok\"}", n as f64, STEP);
        std::thread::sleep(Duration::from_millis(150));
    };

    // 1: a second static user appears and can allocate.
    let mut bob = TurnClient::new(d.addr, "bob", "bob-password");
    assert_eq!(
        bob.allocate().code(),
        Some(401),
        "bob unknown before the reload"
    );
    opts.extra_users.push(("bob".into(), "bob-password".into()));
    d.reconfigure(&opts);
    d.sighup();
    reloaded(&d, 1);
    let mut bob = TurnClient::new(d.addr, "bob", "bob-password");
    bob.must_allocate();

    // 2: the peer policy changes: 127.0.0.2 is denied from now on.
    let mut probe = TurnClient::new(d.addr, USER, PASSWORD);
    probe.must_allocate();
    let other_peer: SocketAddr = "127.0.0.2:9".parse().unwrap();
    assert_eq!(probe.permit(other_peer).outcome(), (true, None));
    opts = opts.edit(|c| c.peers.deny = vec!["127.0.0.2/32".parse().unwrap()]);
    d.reconfigure(&opts);
    d.sighup();
    reloaded(&d, 2);
    assert_eq!(
        probe.permit(other_peer).code(),
        Some(403),
        "denied after the reload"
    );

    // 3: a limit changes: alice may hold 3 allocations (she holds 2: the stream and the probe).
    opts.allocations_per_user = 3;
    d.reconfigure(&opts);
    d.sighup();
    reloaded(&d, 3);
    let mut third = TurnClient::new(d.addr, USER, PASSWORD);
    third.must_allocate();
    assert_eq!(
        TurnClient::new(d.addr, USER, PASSWORD).allocate().code(),
        Some(486),
        "the lowered per-user quota applies"
    );

    // 4 and 5: unchanged file, plain reloads.
    d.sighup();
    reloaded(&d, 4);
    d.sighup();
    reloaded(&d, 5);
    assert_eq!(d.metric("turnpike_reloads_total{result=\"ok\"}"), 5.0);

    let before = stream.received();
    wait_until(STEP, "echoes after the last reload", || {
        stream.received() > before + 10
    });
    let (sent, received, gap) = stream.finish();
    let lost = sent - received;
    eprintln!("reload under load: sent {sent}, echoed {received}, lost {lost}, max gap {gap:?}");
    assert!(sent > 50, "the stream ran ({sent} sent)");
    assert!(
        lost <= sent / 100,
        "lost {lost} of {sent} echoes across reloads"
    );
    assert!(
        gap < Duration::from_millis(500),
        "relaying paused for {gap:?}"
    );
    // Every allocation is still there (the stream's, bob's, the probe's, the third), and the
    // stream's still relays.
    c.echo_round_trips(CHANNEL, 2);
    let sessions = d.api("GET", "/api/v1/sessions", None).json();
    let sessions = sessions["sessions"].as_array().unwrap();
    assert_eq!(
        sessions.len(),
        4,
        "an allocation ended during reloads: {sessions:?}"
    );
    let client = c.local().to_string();
    assert!(
        sessions.iter().any(|s| s["client"] == client.as_str()),
        "{sessions:?}"
    );
    assert!(d.is_running());
}

#[test]
fn a_broken_config_on_sighup_changes_nothing() {
    let mut opts = Options::with_api();
    opts.extra_users.push(("bob".into(), "bob-password".into()));
    let mut d = Daemon::with(opts.clone());
    let (c, _peer, _relay) = relaying_client(&d);
    let stream = Stream::start(&c, Duration::from_millis(10), Duration::from_secs(30));
    wait_until(STEP, "the first echoes", || stream.received() > 5);

    // An unknown key, and in the same file bob removed: nothing of it may apply.
    opts.extra_users.clear();
    let broken = opts.config_text(d.relay_ports) + "\n[limits2]\nbogus_key = 1\n";
    d.write_config(&broken);
    d.sighup();
    d.wait_metric("turnpike_reloads_total{result=\"failed\"}", 1.0, STEP);
    assert_eq!(d.metric("turnpike_reloads_total{result=\"failed\"}"), 1.0);
    assert_eq!(d.metric("turnpike_reloads_total{result=\"ok\"}"), 0.0);
    // The log is where the operator learns why: an ERROR naming the bad key.
    d.wait_log(STEP, "naming limits2", |l| {
        l.contains("\"ERROR\"") && l.contains("limits2")
    });

    // The old users still work, bob included; the stream never noticed.
    TurnClient::new(d.addr, "bob", "bob-password").must_allocate();
    TurnClient::new(d.addr, USER, PASSWORD).must_allocate();
    let (u, p) = rest_credential("carol", unix_now() + 600);
    TurnClient::new(d.addr, &u, &p).must_allocate();
    assert_eq!(d.get("/readyz").status, 200);

    // A bad value (not just an unknown key) is refused the same way.
    let bad_value = opts
        .config_text(d.relay_ports)
        .replace("threads = 2", "threads = -3");
    d.write_config(&bad_value);
    d.sighup();
    d.wait_metric("turnpike_reloads_total{result=\"failed\"}", 2.0, STEP);
    assert_eq!(d.metric("turnpike_reloads_total{result=\"ok\"}"), 0.0);

    // Fixing the file and reloading applies it: bob is gone now.
    d.reconfigure(&opts);
    d.sighup();
    d.wait_metric("turnpike_reloads_total{result=\"ok\"}", 1.0, STEP);
    assert_eq!(
        TurnClient::new(d.addr, "bob", "bob-password")
            .allocate()
            .code(),
        Some(401)
    );

    let (sent, received, gap) = stream.finish();
    eprintln!("broken reload: sent {sent}, echoed {received}, max gap {gap:?}");
    assert!(
        sent - received <= sent / 100,
        "lost {} of {sent}",
        sent - received
    );
    // The stream's, bob's, alice's and carol's allocations: none ended.
    let sessions = d.api("GET", "/api/v1/sessions", None).json();
    assert_eq!(
        sessions["sessions"].as_array().unwrap().len(),
        4,
        "{sessions}"
    );
    assert!(d.is_running());
}

/// WARN lines about `file` in `lines`.
fn permission_warnings<'a>(lines: &'a [String], file: &std::path::Path) -> Vec<&'a String> {
    let file = file.to_str().unwrap();
    lines
        .iter()
        .filter(|l| l.contains("\"WARN\"") && l.contains(file) && l.contains("chmod 600"))
        .collect()
}

#[test]
fn a_reload_warns_about_secrets_others_can_read() {
    let mut d = Daemon::with(Options::with_api());
    let secret = d.dir().join("secret.txt");
    let config = d.config_path();
    let chmod = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };

    // Private files: the reload says nothing about them (the start may have).
    chmod(&secret, 0o600);
    chmod(&config, 0o600);
    chmod(&d.dir().join("api.token"), 0o600);
    let start = d.start_log_len();
    d.sighup();
    // "configuration reloaded" is the reload's last line: every warning of it is read by then.
    d.wait_events("configuration reloaded", 1, STEP, |_| true);
    let after = d.log_lines()[start..].to_vec();
    assert!(permission_warnings(&after, &secret).is_empty(), "{after:?}");
    assert!(permission_warnings(&after, &config).is_empty(), "{after:?}");

    // World-readable: the next reload warns about each, and still applies (warn, don't refuse).
    chmod(&secret, 0o644);
    chmod(&config, 0o604);
    let start = d.log_lines().len();
    d.sighup();
    d.wait_events("configuration reloaded", 2, STEP, |_| true);
    let after = d.log_lines()[start..].to_vec();
    let w = permission_warnings(&after, &secret);
    assert_eq!(w.len(), 1, "{after:?}");
    assert!(
        w[0].contains("auth.secret_file") && w[0].contains("0644"),
        "{}",
        w[0]
    );
    let w = permission_warnings(&after, &config);
    assert_eq!(w.len(), 1, "{after:?}");
    assert!(
        w[0].contains("password") && w[0].contains("0604"),
        "{}",
        w[0]
    );
    assert!(!w[0].contains(PASSWORD), "{}", w[0]);
    assert_eq!(d.metric("turnpike_reloads_total{result=\"ok\"}"), 2.0);
    TurnClient::new(d.addr, USER, PASSWORD).must_allocate();
    assert!(d.is_running());
}

// ------------------------------------------------------------------ drain

#[test]
fn sigterm_drains_for_drain_secs_then_exits_zero() {
    let mut d = Daemon::with(Options {
        drain_secs: 3,
        api: Api::Token,
        ..Options::default()
    });
    let (c, _peer, _relay) = relaying_client(&d);
    let stream = Stream::start(&c, Duration::from_millis(10), Duration::from_secs(15));
    wait_until(STEP, "the first echoes", || stream.received() > 5);
    assert_eq!(d.get("/readyz").status, 200);

    let t0 = Instant::now();
    d.sigterm();
    // During the drain: /readyz 503, the gauge says so, and new allocations get 508.
    d.wait_draining(STEP);
    assert_eq!(d.metric("turnpike_draining"), 1.0);
    assert_eq!(d.get("/healthz").status, 200, "alive while draining");
    let mut late = TurnClient::new(d.addr, USER, PASSWORD);
    assert_eq!(
        late.allocate().code(),
        Some(508),
        "Allocate during the drain"
    );
    let (u, p) = rest_credential("late", unix_now() + 600);
    assert_eq!(TurnClient::new(d.addr, &u, &p).allocate().code(), Some(508));
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "checks took too long"
    );

    // Exit within drain_secs + 2 s of the SIGTERM.
    let status = d
        .wait_exit(Duration::from_secs(3 + 2).saturating_sub(t0.elapsed()))
        .unwrap_or_else(|| panic!("still running {:?} after SIGTERM", t0.elapsed()));
    let exited = t0.elapsed();
    let last_echo = stream.last_arrival().expect("echoes");
    let (sent, received, _) = stream.finish();
    let relayed_for = last_echo.saturating_duration_since(t0);
    eprintln!(
        "drain: exited after {exited:?} with {status}; echoes until {relayed_for:?} after SIGTERM; sent {sent}, echoed {received}"
    );
    assert_eq!(status.code(), Some(0), "exit status after a drain");
    assert!(
        relayed_for > Duration::from_secs(2),
        "relaying stopped {relayed_for:?} after SIGTERM, drain_secs is 3"
    );
    assert!(
        exited >= Duration::from_millis(2800),
        "exited after {exited:?}, before drain_secs"
    );
}

#[test]
fn sigterm_without_allocations_exits_promptly() {
    let mut d = Daemon::with(Options {
        drain_secs: 30,
        ..Options::default()
    });
    let t0 = Instant::now();
    d.sigterm();
    let status = d
        .wait_exit(Duration::from_secs(5))
        .expect("exited after SIGTERM");
    let took = t0.elapsed();
    eprintln!("SIGTERM with no allocation: exited after {took:?}");
    assert_eq!(status.code(), Some(0));
    assert!(
        took < Duration::from_secs(1),
        "took {took:?} with nothing to drain"
    );
}

#[test]
fn drain_ends_early_when_the_last_allocation_goes() {
    let mut d = Daemon::with(Options {
        drain_secs: 30,
        api: Api::NoToken,
        ..Options::default()
    });
    let mut c = TurnClient::new(d.addr, USER, PASSWORD);
    c.must_allocate();
    d.sigterm();
    d.wait_draining(STEP);
    assert!(
        d.wait_exit(Duration::from_millis(500)).is_none(),
        "waits for the allocation"
    );
    let t0 = Instant::now();
    assert_eq!(
        c.refresh(0).outcome(),
        (true, None),
        "Refresh 0 during the drain"
    );
    let status = d
        .wait_exit(Duration::from_secs(2))
        .expect("exits once drained");
    eprintln!("drain ended {:?} after the last allocation", t0.elapsed());
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_second_sigterm_ends_the_drain_at_once() {
    let mut d = Daemon::with(Options {
        drain_secs: 30,
        api: Api::NoToken,
        ..Options::default()
    });
    let mut c = TurnClient::new(d.addr, USER, PASSWORD);
    c.must_allocate();
    d.sigterm();
    d.wait_draining(STEP);
    std::thread::sleep(Duration::from_millis(200));
    assert!(d.is_running(), "draining, not exited");
    let t0 = Instant::now();
    d.sigterm();
    let status = d
        .wait_exit(Duration::from_secs(5))
        .expect("exited after the second SIGTERM");
    let took = t0.elapsed();
    eprintln!("second SIGTERM: exited after {took:?} with {status}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(status.code(), Some(0));
}

// ------------------------------------------------------------------ sd_notify

fn lines(msg: &str) -> Vec<&str> {
    msg.lines().collect()
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

#[test]
fn sd_notify_ready_reloading_stopping_in_order() {
    let mut d = Daemon::with(Options {
        notify_socket: true,
        ..Options::default()
    });
    // READY=1 with a STATUS=, and by then the UDP listener answers Binding requests.
    let got = d.notify_until(STEP, |m| lines(m).contains(&"READY=1"));
    let ready = got.last().unwrap();
    assert!(
        lines(ready)
            .iter()
            .any(|l| l.starts_with("STATUS=") && l.len() > 7),
        "READY=1 comes with a STATUS=: {ready:?}"
    );
    let mut probe = TurnClient::new(d.addr, USER, PASSWORD);
    let t = Instant::now();
    let r = probe
        .binding()
        .expect("Binding answered once READY=1 was sent");
    assert!(r.outcome().0 && t.elapsed() < Duration::from_millis(250));
    assert!(
        got[..got.len() - 1]
            .iter()
            .all(|m| !m.contains("RELOADING") && !m.contains("STOPPING")),
        "{got:?}"
    );

    // SIGHUP: RELOADING=1 with MONOTONIC_USEC=, then READY=1.
    let before = monotonic_usec();
    d.sighup();
    let got = d.notify_until(STEP, |m| lines(m).contains(&"READY=1"));
    let after = monotonic_usec();
    let reloading: Vec<&String> = got
        .iter()
        .filter(|m| lines(m).contains(&"RELOADING=1"))
        .collect();
    assert_eq!(
        reloading.len(),
        1,
        "one RELOADING=1 before READY=1: {got:?}"
    );
    let usec: u64 = lines(reloading[0])
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC=: {:?}", reloading[0]))
        .parse()
        .expect("numeric MONOTONIC_USEC");
    assert!(
        (before..=after).contains(&usec),
        "MONOTONIC_USEC={usec} is CLOCK_MONOTONIC at the reload ({before}..{after})"
    );
    let pos_reloading = got
        .iter()
        .position(|m| lines(m).contains(&"RELOADING=1"))
        .unwrap();
    assert!(
        pos_reloading < got.len() - 1,
        "READY=1 follows RELOADING=1: {got:?}"
    );

    // A refused reload still ends with READY=1 (the old config serves), its STATUS says why.
    let text = std::fs::read_to_string(d.config_path()).unwrap();
    d.write_config(&(text.clone() + "\nnot_a_key = 1\n"));
    d.sighup();
    let got = d.notify_until(STEP, |m| lines(m).contains(&"READY=1"));
    let ready = got.last().unwrap();
    assert!(
        got.iter().any(|m| lines(m).contains(&"RELOADING=1")),
        "{got:?}"
    );
    assert!(ready.contains("STATUS=reload refused"), "{ready:?}");
    d.write_config(&text);

    // SIGTERM: STOPPING=1, and nothing but status and watchdog lines after it.
    d.sigterm();
    let got = d.notify_until(STEP, |m| lines(m).contains(&"STOPPING=1"));
    assert!(
        got.iter()
            .all(|m| !m.contains("READY=1") && !m.contains("RELOADING=1")),
        "{got:?}"
    );
    let status = d.wait_exit(STEP).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0));
    while let Some(m) = d.notify_recv(Duration::from_millis(50)) {
        assert!(!m.contains("READY=1"), "READY=1 after STOPPING=1: {m:?}");
    }
}

#[test]
fn sd_notify_watchdog_pings_when_watchdog_pid_is_ours() {
    let d = Daemon::with(Options {
        notify_socket: true,
        env: vec![("WATCHDOG_USEC".into(), "200000".into())],
        // The daemon's pid is only known once it runs: `sh` exports its own pid, then execs
        // the daemon, which keeps that pid.
        sh_prefix: Some("export WATCHDOG_PID=$$".into()),
        ..Options::default()
    });
    let t0 = Instant::now();
    let mut pings = Vec::new();
    while t0.elapsed() < Duration::from_secs(2) && pings.len() < 5 {
        if let Some(m) = d.notify_recv(Duration::from_millis(100)) {
            if lines(&m).contains(&"WATCHDOG=1") {
                pings.push(t0.elapsed());
            }
        }
    }
    eprintln!("WATCHDOG=1 at {pings:?}");
    assert!(
        pings.len() >= 5,
        "expected repeated WATCHDOG=1 (every 100 ms), got {pings:?}"
    );
    // Half of WatchdogSec: about every 100 ms. On average well within the 200 ms systemd
    // allows; one late tick on a loaded machine is tolerated, a missing schedule is not.
    let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    let mean = (pings[pings.len() - 1] - pings[0]) / (pings.len() as u32 - 1);
    assert!(
        mean < Duration::from_millis(150) && gaps.iter().all(|g| *g < Duration::from_millis(400)),
        "pings too far apart: mean {mean:?}, gaps {gaps:?}"
    );
}

#[test]
fn sd_notify_no_watchdog_for_another_pid() {
    let d = Daemon::with(Options {
        notify_socket: true,
        env: vec![
            ("WATCHDOG_USEC".into(), "200000".into()),
            // Meant for another process (as when systemd's env leaks into a child).
            ("WATCHDOG_PID".into(), "1".into()),
        ],
        ..Options::default()
    });
    let t0 = Instant::now();
    let mut got = Vec::new();
    while t0.elapsed() < Duration::from_millis(600) {
        if let Some(m) = d.notify_recv(Duration::from_millis(100)) {
            got.push(m);
        }
    }
    assert!(
        got.iter().any(|m| m.contains("READY=1")),
        "READY=1 still sent: {got:?}"
    );
    assert!(
        got.iter().all(|m| !m.contains("WATCHDOG=1")),
        "watchdog pings for a WATCHDOG_PID that is not ours: {got:?}"
    );
}

// ------------------------------------------------------------------ --ready-file

/// The harness learns every port from `--ready-file`; this checks the file's promise itself.
#[test]
fn the_ready_file_names_reachable_ports_while_serving_and_goes_with_sigterm() {
    let mut d = Daemon::with(Options::with_api());
    let v = d.ready.clone();
    assert_ne!(
        d.addr.port(),
        0,
        "the bound port, not the configured 0: {v}"
    );
    assert_ne!(d.api_addr().port(), 0, "{v}");
    assert_eq!(
        v["relay"],
        serde_json::json!([{"local": "127.0.0.1", "advertised": "127.0.0.1"}])
    );
    // What it names answers as soon as it is there.
    let mut c = TurnClient::new(d.addr, USER, PASSWORD);
    assert!(c.binding().expect("Binding answered").outcome().0);
    assert_eq!(d.get("/healthz").status, 200);
    let relay = c.must_allocate();
    assert_eq!(relay.ip().to_string(), v["relay"][0]["advertised"]);
    assert!((d.relay_ports.0..=d.relay_ports.1).contains(&relay.port()));
    let beside: Vec<_> = std::fs::read_dir(d.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("ready"))
        .collect();
    assert_eq!(beside, ["ready.json"], "no temp file left beside it");

    d.sigterm();
    let status = d.wait_exit(STEP).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0));
    assert!(
        !d.ready_file().exists(),
        "the ready file outlived the daemon"
    );
}
