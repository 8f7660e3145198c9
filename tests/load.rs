//! The `turnpike-load` binary against real servers on loopback: its command line, `alloc`,
//! `relay` (ChannelData, Send indications, client-to-client) and `binding` against a turnpike
//! daemon whose /metrics must agree, loss and duplicates against a fake server that drops and
//! repeats on purpose, clear failures, and `alloc` and `relay` against coturn.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Daemon, Options, PASSWORD, SECRET, USER};
use serde_json::Value;
use turnpike::proto::codec::{attr, method, parse_channel_data, Class, Message, MessageWriter};

/// Every run here is bounded by its own --timeout-secs; this is the backstop.
const KILL_AFTER: Duration = Duration::from_secs(90);

fn load_bin() -> &'static str {
    env!("CARGO_BIN_EXE_turnpike-load")
}

fn spawn_load(args: &[&str]) -> Child {
    Command::new(load_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn turnpike-load")
}

/// Waits for a run, killing it past [`KILL_AFTER`].
fn finish(mut child: Child) -> Output {
    let deadline = Instant::now() + KILL_AFTER;
    while matches!(child.try_wait(), Ok(None)) {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("wait for turnpike-load")
}

fn run_load(args: &[&str]) -> Output {
    finish(spawn_load(args))
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The one JSON object a successful `--json` run prints.
fn json_of(o: &Output) -> Value {
    let (out, err) = text(o);
    assert_eq!(o.status.code(), Some(0), "stdout: {out}\nstderr: {err}");
    assert_eq!(out.lines().count(), 1, "one line of JSON: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a count in {v}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

fn turnpike() -> Daemon {
    let mut opts = Options::with_api();
    opts.allocations_per_user = 0;
    Daemon::with(opts)
}

fn credential_args(d: &Daemon) -> Vec<String> {
    vec![
        "--server".into(),
        d.addr.to_string(),
        "--user".into(),
        USER.into(),
        "--password".into(),
        PASSWORD.into(),
        "--timeout-secs".into(),
        "40".into(),
    ]
}

/// `mode` (the first of `more`), then the common `base` options, then the rest of `more`.
fn with<'a>(base: &'a [String], more: &[&'a str]) -> Vec<&'a str> {
    let (mode, rest) = more.split_first().expect("a mode");
    std::iter::once(*mode)
        .chain(base.iter().map(String::as_str))
        .chain(rest.iter().copied())
        .collect()
}

const TO_PEER: &str = "turnpike_relayed_packets_total{direction=\"to_peer\"}";
const TO_CLIENT: &str = "turnpike_relayed_packets_total{direction=\"to_client\"}";
const UDP_ALLOCATIONS: &str = "turnpike_allocations{transport=\"udp\"}";

#[test]
fn bad_command_lines_exit_64_with_a_usage_message() {
    let cases: &[&[&str]] = &[
        &[],
        &["alloc"],
        &["alloc", "--server", "127.0.0.1:3478", "--bogus"],
        &["fly", "--server", "127.0.0.1:3478"],
        &["relay", "--server", "127.0.0.1:3478", "--rate", "fast"],
        &["relay", "--server", "127.0.0.1:3478", "--size", "8"],
        &[
            "relay",
            "--server",
            "127.0.0.1:3478",
            "--client-to-client",
            "--clients",
            "3",
        ],
        &[
            "relay",
            "--server",
            "127.0.0.1:3478",
            "--duration-secs",
            "1",
            "--messages",
            "5",
        ],
        &["alloc", "--server", "127.0.0.1:3478", "--user", "u"],
        &["alloc", "--server", "127.0.0.1:3478", "--password", "p"],
        &["alloc", "--server", "127.0.0.1:3478", "--count", "0"],
        &["binding", "--server", "no-such-host.invalid:3478"],
    ];
    for args in cases {
        let o = run_load(args);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {out} {err}");
        assert!(out.is_empty(), "{args:?}: nothing on stdout: {out}");
        assert!(
            err.contains("Usage") || err.contains("--help"),
            "{args:?}: a usage hint: {err}"
        );
    }
    let help = run_load(&["relay", "--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(text(&help).0.contains("--client-to-client"));
}

#[test]
fn alloc_against_turnpike_holds_every_allocation_and_the_metrics_agree() {
    let d = turnpike();
    let base = credential_args(&d);
    let pid = d.pid().to_string();
    let child = spawn_load(&with(
        &base,
        &[
            "alloc",
            "--count",
            "100",
            "--in-flight",
            "16",
            "--hold-secs",
            "3",
            "--json",
            "--server-pid",
            &pid,
        ],
    ));
    // While they are held the daemon counts all of them.
    d.wait_metric(UDP_ALLOCATIONS, 100.0, Duration::from_secs(30));
    let j = json_of(&finish(child));
    assert_eq!(j["mode"], "alloc");
    assert_eq!(u(&j, "ok"), 100, "{j}");
    assert_eq!(j["failed"], serde_json::json!({}), "{j}");
    assert!(f(&j, "allocs_per_sec") > 0.0, "{j}");
    assert!(f(&j["setup_us"], "p50") > 0.0 && f(&j["setup_us"], "p99") >= f(&j["setup_us"], "p50"));
    assert!(j["server_cpu_us_per_alloc"].as_f64().is_some(), "{j}");
    assert!(u(&j["rss_kib"], "held") > 0, "{j}");
    assert!(j["sockstat_udp_mem_pages"]["held"].is_u64(), "{j}");
    assert!(j["self_check"].is_string(), "{j}");
    assert_eq!(u(&j, "undeleted"), 0, "{j}");
    // Each allocation made once, and every one deleted at the end.
    assert_eq!(d.metric("turnpike_allocations_created_total"), 100.0);
    assert_eq!(d.metric("turnpike_allocations_ended_total"), 100.0);
    assert_eq!(d.metric(UDP_ALLOCATIONS), 0.0);
}

/// Runs `relay` with `extra` against `d`; returns its JSON and the daemon's relayed packets
/// (to peer, to client) during the run.
fn relay_run(d: &Daemon, clients: &str, extra: &[&str]) -> (Value, f64, f64) {
    let base = credential_args(d);
    let (p0, c0) = (d.metric(TO_PEER), d.metric(TO_CLIENT));
    let mut args = vec![
        "relay",
        "--clients",
        clients,
        "--messages",
        "1000",
        "--json",
    ];
    args.extend_from_slice(extra);
    let j = json_of(&run_load(&with(&base, &args)));
    (j, d.metric(TO_PEER) - p0, d.metric(TO_CLIENT) - c0)
}

fn assert_all_delivered(j: &Value) {
    assert_eq!(j["mode"], "relay");
    assert_eq!(u(j, "sent"), 1000, "{j}");
    assert_eq!(u(j, "delivered"), 1000, "{j}");
    assert_eq!(u(j, "lost"), 0, "{j}");
    assert_eq!(f(j, "loss_pct"), 0.0, "{j}");
    assert_eq!(u(j, "duplicates"), 0, "{j}");
    assert!(f(j, "msgs_per_sec") > 0.0, "{j}");
    let rtt = &j["rtt_us"];
    assert!(f(rtt, "p50") > 0.0, "{j}");
    assert!(
        f(rtt, "p50") <= f(rtt, "p90") && f(rtt, "p90") <= f(rtt, "p99"),
        "{j}"
    );
    assert!(f(rtt, "p99") <= f(rtt, "max"), "{j}");
    assert_eq!(u(j, "undeleted"), 0, "{j}");
}

#[test]
fn relay_against_turnpike_delivers_everything_in_every_mode() {
    let d = turnpike();

    let (j, to_peer, to_client) = relay_run(&d, "4", &["--rate", "2000"]);
    assert_all_delivered(&j);
    assert_eq!(j["framing"], "channel-data");
    assert_eq!((to_peer, to_client), (1000.0, 1000.0), "{j}");

    let (j, to_peer, to_client) = relay_run(
        &d,
        "4",
        &["--rate", "2000", "--send-indication", "--size", "1200"],
    );
    assert_all_delivered(&j);
    assert_eq!(j["framing"], "send-indication");
    assert_eq!((to_peer, to_client), (1000.0, 1000.0), "{j}");

    // Two pairs: each message goes sender -> server -> partner and back, two relay legs
    // each way.
    let (j, to_peer, to_client) = relay_run(&d, "4", &["--rate", "2000", "--client-to-client"]);
    assert_all_delivered(&j);
    assert_eq!(u(&j, "senders"), 2, "{j}");
    assert_eq!((to_peer, to_client), (2000.0, 2000.0), "{j}");

    // A flood with one message in flight: the RTT mode.
    let (j, _, _) = relay_run(&d, "1", &["--rate", "0", "--window", "1"]);
    assert_all_delivered(&j);

    // Nothing left behind on the server.
    d.wait_metric(
        "turnpike_allocations_ended_total",
        4.0 * 3.0 + 1.0,
        Duration::from_secs(10),
    );
    assert_eq!(d.metric(UDP_ALLOCATIONS), 0.0);
}

#[test]
fn relay_with_rest_credentials_mints_a_username_per_allocation() {
    let d = turnpike();
    let dir = common::TempDir::new("load-secret");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let addr = d.addr.to_string();
    let j = json_of(&run_load(&[
        "relay",
        "--server",
        &addr,
        "--user",
        "bench",
        "--secret-file",
        secret.to_str().unwrap(),
        "--clients",
        "3",
        "--messages",
        "300",
        "--json",
        "--timeout-secs",
        "40",
    ]));
    assert_eq!(u(&j, "delivered"), 300, "{j}");
}

#[test]
fn binding_counts_answers() {
    let d = turnpike();
    let addr = d.addr.to_string();
    let before = d.metric("turnpike_binding_requests_total");
    let j = json_of(&run_load(&[
        "binding",
        "--server",
        &addr,
        "--clients",
        "2",
        "--requests",
        "2000",
        "--json",
        "--timeout-secs",
        "40",
    ]));
    assert_eq!(j["mode"], "binding");
    assert_eq!(u(&j, "sent"), 2000, "{j}");
    assert_eq!(u(&j, "answered"), 2000, "{j}");
    assert!(f(&j, "per_sec") > 0.0, "{j}");
    assert!(f(&j["rtt_us"], "p99") >= f(&j["rtt_us"], "p50"), "{j}");
    // The 2000 and the probe that goes first (retransmitted at most twice).
    let counted = d.metric("turnpike_binding_requests_total") - before;
    assert!((2001.0..=2003.0).contains(&counted), "{counted}");
}

/// A TURN server that answers setup requests well enough and, of the ChannelData it gets,
/// echoes every even-numbered one twice and drops every odd-numbered one.
struct FakeServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl FakeServer {
    fn start() -> FakeServer {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut buf = [0u8; 2048];
            let mut out = Vec::new();
            let mut channel_data = 0u64;
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let dgram = &buf[..n];
                if parse_channel_data(dgram).is_some() {
                    channel_data += 1;
                    if channel_data % 2 == 1 {
                        let _ = sock.send_to(dgram, from);
                        let _ = sock.send_to(dgram, from);
                    }
                    continue;
                }
                let Ok(msg) = Message::parse(dgram) else {
                    continue;
                };
                if msg.class != Class::Request {
                    continue;
                }
                let txid = msg.transaction_id();
                if msg.method == method::ALLOCATE && !msg.has_integrity() {
                    MessageWriter::new(&mut out, method::ALLOCATE, Class::Error, txid)
                        .error_code(401, "Unauthorized")
                        .attr(attr::REALM, b"fake.test")
                        .attr(attr::NONCE, b"0123456789abcdef");
                } else {
                    let mut w = MessageWriter::new(&mut out, msg.method, Class::Success, txid);
                    if msg.method == method::ALLOCATE {
                        w.xor_address(attr::XOR_RELAYED_ADDRESS, "127.0.0.1:9".parse().unwrap())
                            .xor_address(attr::XOR_MAPPED_ADDRESS, from)
                            .u32_attr(attr::LIFETIME, 600);
                    }
                }
                let _ = sock.send_to(&out, from);
            }
            channel_data
        });
        FakeServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the server; returns how many ChannelData messages it got.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn loss_and_duplicates_are_counted_against_a_server_that_drops_on_purpose() {
    let fake = FakeServer::start();
    let addr = fake.addr.to_string();
    let j = json_of(&run_load(&[
        "relay",
        "--server",
        &addr,
        "--user",
        "u",
        "--password",
        "p",
        "--clients",
        "3",
        "--messages",
        "1000",
        "--rate",
        "5000",
        "--drain-ms",
        "300",
        "--json",
        "--timeout-secs",
        "30",
    ]));
    assert_eq!(fake.finish(), 1000);
    assert_eq!(u(&j, "sent"), 1000, "{j}");
    assert_eq!(u(&j, "delivered"), 500, "{j}");
    assert_eq!(u(&j, "lost"), 500, "{j}");
    assert_eq!(f(&j, "loss_pct"), 50.0, "{j}");
    assert_eq!(u(&j, "duplicates"), 500, "{j}");

    // A flood's windows must not stall on the lost half.
    let fake = FakeServer::start();
    let addr = fake.addr.to_string();
    let j = json_of(&run_load(&[
        "relay",
        "--server",
        &addr,
        "--user",
        "u",
        "--password",
        "p",
        "--clients",
        "2",
        "--messages",
        "400",
        "--rate",
        "0",
        "--window",
        "4",
        "--drain-ms",
        "100",
        "--json",
        "--timeout-secs",
        "30",
    ]));
    assert_eq!(fake.finish(), 400);
    assert_eq!((u(&j, "sent"), u(&j, "delivered")), (400, 200), "{j}");
}

#[test]
fn an_unreachable_server_fails_clearly() {
    // A port nobody listens on: the kernel answers with ICMP port unreachable.
    let closed = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // A socket that reads nothing: no answer at all.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    for server in [closed, silent_addr] {
        let s = server.to_string();
        for mode in [
            vec!["alloc", "--count", "5"],
            vec!["relay", "--clients", "2"],
            vec!["binding"],
        ] {
            let mut args = mode.clone();
            args.extend(["--server", &s, "--user", "u", "--password", "p"]);
            let o = run_load(&args);
            let (out, err) = text(&o);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {out} {err}");
            assert!(
                err.contains(&s) && err.contains("no answer"),
                "{args:?}: {err}"
            );
            assert_eq!(err.lines().count(), 1, "one line: {err}");
        }
    }
}

#[test]
fn bad_credentials_fail_clearly_and_a_timeout_exits_2() {
    let d = turnpike();
    let addr = d.addr.to_string();
    let o = run_load(&[
        "alloc",
        "--server",
        &addr,
        "--user",
        USER,
        "--password",
        "wrong",
        "--count",
        "4",
    ]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("401") && err.contains(&addr), "{err}");

    let started = Instant::now();
    let base = credential_args(&d);
    let mut args = with(&base, &["relay", "--clients", "2", "--duration-secs", "30"]);
    let t = args.iter().position(|a| *a == "--timeout-secs").unwrap();
    args[t + 1] = "2";
    let o = run_load(&args);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("timeout"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The abandoned run still asked the server to delete both allocations.
    d.wait_metric(
        "turnpike_allocations_ended_total",
        2.0,
        Duration::from_secs(10),
    );

    // The same when time runs out while allocations are held.
    let mut args = with(&base, &["alloc", "--count", "3", "--hold-secs", "30"]);
    args[t + 1] = "2";
    let o = run_load(&args);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o).1);
    d.wait_metric(
        "turnpike_allocations_ended_total",
        5.0,
        Duration::from_secs(10),
    );
    assert_eq!(d.metric(UDP_ALLOCATIONS), 0.0);
}

/// coturn's `turnserver` on loopback with a static user, stopped on drop.
struct Coturn {
    child: Child,
    addr: SocketAddr,
    _dir: common::TempDir,
}

impl Coturn {
    fn start() -> Option<Coturn> {
        if Command::new("turnserver").arg("--help").output().is_err() {
            println!("SKIPPED: turnserver (Debian coturn) is not installed");
            return None;
        }
        let dir = common::TempDir::new("load-coturn");
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let d = dir.path().display().to_string();
        let child = Command::new("turnserver")
            .args([
                "-n",
                "--listening-ip=127.0.0.1",
                &format!("--listening-port={port}"),
                "--relay-ip=127.0.0.1",
                // Below the kernel's ephemeral range, away from the turnpike tests' blocks.
                "--min-port=12000",
                "--max-port=12999",
                "--lt-cred-mech",
                &format!("--user={USER}:{PASSWORD}"),
                "--realm=coturn.test",
                "--allow-loopback-peers",
                "--no-cli",
                "--no-tls",
                "--no-dtls",
                "--no-stdout-log",
                &format!("--log-file={d}/turn.log"),
                &format!("--pidfile={d}/turn.pid"),
                &format!("--db={d}/turndb"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn turnserver");
        let c = Coturn {
            child,
            addr,
            _dir: dir,
        };
        c.wait_ready();
        Some(c)
    }

    /// Until it answers a STUN Binding.
    fn wait_ready(&self) {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut req = Vec::new();
        MessageWriter::new(&mut req, method::BINDING, Class::Request, [9; 12]);
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            let _ = sock.send_to(&req, self.addr);
            if sock.recv_from(&mut buf).is_ok() {
                return;
            }
        }
        panic!("turnserver did not answer on {} within 15 s", self.addr);
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn alloc_and_relay_against_coturn() {
    let Some(c) = Coturn::start() else { return };
    let s = c.addr.to_string();
    let pid = c.child.id().to_string();
    let base = [
        "--server",
        &s,
        "--user",
        USER,
        "--password",
        PASSWORD,
        "--timeout-secs",
        "40",
        "--server-pid",
        &pid,
        "--json",
    ];
    let run = |mode: &[&str]| {
        let mut args = mode.to_vec();
        args.extend_from_slice(&base);
        json_of(&run_load(&args))
    };
    let j = run(&["alloc", "--count", "50", "--hold-secs", "0.2"]);
    assert_eq!(u(&j, "ok"), 50, "{j}");
    assert_eq!(j["failed"], serde_json::json!({}), "{j}");
    assert!(j["server_cpu_us_per_alloc"].as_f64().is_some(), "{j}");

    let j = run(&[
        "relay",
        "--clients",
        "4",
        "--messages",
        "1000",
        "--rate",
        "2000",
    ]);
    assert_all_delivered(&j);
    let j = run(&[
        "relay",
        "--clients",
        "4",
        "--messages",
        "1000",
        "--rate",
        "2000",
        "--send-indication",
    ]);
    assert_all_delivered(&j);
    let j = run(&[
        "relay",
        "--clients",
        "4",
        "--messages",
        "1000",
        "--rate",
        "2000",
        "--client-to-client",
    ]);
    assert_all_delivered(&j);
    let j = run(&["binding", "--requests", "1000"]);
    assert_eq!(u(&j, "answered"), 1000, "{j}");
}
