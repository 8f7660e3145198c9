//! coturn's own test clients (Debian package `coturn`) against the real daemon. Without the
//! tools these tests fail when `CI` is set and skip loudly otherwise.

mod common;

use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{field, Daemon, Options, PASSWORD, SECRET, USER};

const TOOLS: [&str; 4] = [
    "turnutils_uclient",
    "turnutils_peer",
    "turnutils_stunclient",
    "turnutils_natdiscovery",
];
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// Messages per client and clients per run: `-n MSGS -m CLIENTS`.
const MSGS: u64 = 50;
const CLIENTS: u64 = 2;

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn tools_available() -> bool {
    let missing: Vec<_> = TOOLS.iter().filter(|t| !on_path(t)).collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "coturn tools not found on PATH: {missing:?} (install Debian's `coturn` package, or run scripts/test.sh)"
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}; CI is set, so this is a failure, not a skip");
    }
    // Written to the real stderr: libtest captures eprintln! output of passing tests.
    let _ = writeln!(std::io::stderr(), "SKIPPING coturn client test: {msg}");
    false
}

/// Runs a command to completion, killing it after [`TOOL_TIMEOUT`].
fn run_bounded(cmd: &mut Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(TOOL_TIMEOUT) {
        Ok(out) => out.expect("wait for tool"),
        Err(_) => {
            // SAFETY: kill(2) on our own child, which has not been reaped (the waiter still waits).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let out = rx.recv().unwrap().expect("wait for tool");
            panic!(
                "{cmd:?} ran past {TOOL_TIMEOUT:?}; output:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// uclient's output, insisting it exited 0, and its final summary line (not the per-client
/// progress lines, which carry `msz=`).
fn uclient_totals(out: &Output) -> (String, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "uclient failed ({}):\n{text}",
        out.status
    );
    let summary = text
        .lines()
        .rfind(|l| l.contains("tot_send_msgs=") && !l.contains("msz="))
        .unwrap_or_else(|| panic!("no totals in uclient output:\n{text}"))
        .to_owned();
    (text, summary)
}

/// `turnutils_peer`, an echo server on a loopback address; killed on drop.
struct EchoPeer {
    child: std::process::Child,
    ip: &'static str,
    port: u16,
}

impl EchoPeer {
    /// `ip` is "127.0.0.1" or "::1".
    fn start(ip: &'static str) -> EchoPeer {
        // Learn a free port from the kernel, then hand it to the tool (tiny race, retried below).
        for _ in 0..5 {
            let port = UdpSocket::bind((ip, 0))
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = Command::new("turnutils_peer")
                .args(["-L", ip, "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn turnutils_peer");
            let mut peer = EchoPeer { child, ip, port };
            if peer.echoes() {
                return peer;
            }
            let _ = peer.child.kill();
        }
        panic!("turnutils_peer never echoed on loopback");
    }

    fn echoes(&mut self) -> bool {
        let s = UdpSocket::bind((self.ip, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..15 {
            let _ = s.send_to(b"ping", (self.ip, self.port));
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                return &buf[..n] == b"ping";
            }
        }
        false
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `turnutils_uclient` with `auth` and `mode` flags and checks that every message came
/// back, by the tool's own count and by the daemon's per-allocation counters.
fn uclient_relays_everything(auth: &[&str], mode: &[&str], expect_user: impl Fn(&str) -> bool) {
    uclient_relays_everything_on("127.0.0.1", auth, mode, expect_user);
}

/// Whether `mode` asks uclient for TURN over TCP (`-t`) or TLS (`-S`).
fn over_tcp(mode: &[&str]) -> bool {
    mode.contains(&"-t") || over_tls(mode)
}

/// `-S` alone would be DTLS over UDP; with `-t` it is TLS over TCP.
fn over_tls(mode: &[&str]) -> bool {
    mode.contains(&"-S") && mode.contains(&"-t")
}

/// Which listener a run uses: plain TCP to the TLS port when `mode` says `PLAIN_ON_TLS_PORT`.
const PLAIN_ON_TLS_PORT: &str = "plain-tcp-on-the-tls-port";

/// The same over `ip` ("127.0.0.1" or "::1"): client, server, relay and echo peer all on it.
fn uclient_relays_everything_on(
    ip: &'static str,
    auth: &[&str],
    mode: &[&str],
    expect_user: impl Fn(&str) -> bool,
) {
    if !tools_available() {
        return;
    }
    let tcp_listen: SocketAddr = SocketAddr::new(ip.parse().unwrap(), 0);
    let cert = common::TestCert::new();
    // Client to client: every message must be delivered inside the process (checked below),
    // within a shard or handed over to the shard whose relay it is for; four shards make most
    // pairs cross.
    let client_to_client = mode.contains(&"-y");
    let d = Daemon::with(
        Options {
            ipv6: ip == "::1",
            threads: if client_to_client { 4 } else { 2 },
            ..Options::with_api()
        }
        .edit(move |c| c.tcp_listen = vec![tcp_listen])
        .edit(cert.listen_on(ip)),
    );
    let plain_on_tls_port = mode.contains(&PLAIN_ON_TLS_PORT);
    let mode: Vec<&str> = mode
        .iter()
        .copied()
        .map(|m| if m == PLAIN_ON_TLS_PORT { "-t" } else { m })
        .collect();
    let mode = &mode[..];
    let port = if over_tls(mode) || plain_on_tls_port {
        d.tls_addr.expect("a TLS listener").port()
    } else if over_tcp(mode) {
        d.tcp_addr.expect("a TCP listener").port()
    } else {
        d.addr.port()
    };
    let peer = EchoPeer::start(ip);
    let out = run_bounded(
        Command::new("turnutils_uclient")
            .args(["-p", &port.to_string()])
            .args(auth)
            .args(mode)
            .args(["-n", &MSGS.to_string(), "-m", &CLIENTS.to_string()])
            .args(["-l", "160", "-z", "5", "-c"])
            .args(["-e", ip, "-r", &peer.port.to_string()])
            .arg(ip),
    );
    let (text, summary) = uclient_totals(&out);
    let total = MSGS * CLIENTS;
    if over_tls(mode) {
        // uclient counts one message per SSL_read: a TLS record carrying two frames (the daemon
        // writes what is queued in one go) counts once, so its receive count is a lower bound
        // (coturn shows the same, see bench/README.md). The daemon's own per-allocation counts
        // below are the check that every message came back.
        assert!(
            summary.contains(&format!("tot_send_msgs={total}, tot_recv_msgs=")),
            "uclient totals: {summary:?}\n{text}"
        );
    } else {
        assert!(
            summary.ends_with(&format!("tot_send_msgs={total}, tot_recv_msgs={total}")),
            "uclient totals: {summary:?}\n{text}"
        );
        assert!(
            text.contains("Total lost packets 0 ("),
            "uclient lost packets:\n{text}"
        );
    }

    // The clients delete their allocations before exiting; the daemon's counters must agree.
    // Over TCP and TLS uclient may also open (and allocate on) connections it drops before
    // sending: only the allocations that carried traffic are the run's.
    let ended = d.wait_events(
        "allocation ended",
        CLIENTS as usize,
        Duration::from_secs(5),
        |e| !over_tcp(mode) || e["to_peer_packets"].as_u64() != Some(0),
    );
    for e in &ended {
        // Over TCP a client may close its connection before or after its Refresh 0.
        let reason = field(e, "reason");
        assert!(
            reason == "deleted by client" || (over_tcp(mode) && reason == "connection closed"),
            "{e}"
        );
        if over_tcp(mode) {
            let want = if over_tls(mode) { "tls" } else { "tcp" };
            assert_eq!(field(e, "transport"), want, "{e}");
        }
        assert!(expect_user(field(e, "user")), "user in {e}");
        assert_eq!(e["dropped_packets"], 0, "{e}");
    }
    // The relays are in the family of the peer (RFC 6156): "[::1]:port" or "127.0.0.1:port".
    for e in &ended {
        let relay: std::net::SocketAddr =
            field(e, "relay").parse().unwrap_or_else(|_| panic!("{e}"));
        assert_eq!(relay.ip().to_string(), ip, "relay family in {e}");
    }
    let sum = |k: &str| ended.iter().map(|e| e[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("to_peer_packets"), total);
    assert_eq!(sum("to_client_packets"), total);
    assert_eq!(sum("to_peer_bytes"), total * 160);
    let in_process = d.metric("turnpike_relay_to_relay_packets_total");
    assert_eq!(
        in_process,
        if client_to_client { total as f64 } else { 0.0 }
    );
    // Counted as sent to the client above, and none of it dropped on the way out.
    for t in ["tcp", "tls"] {
        let dropped = d.metric(&format!(
            "turnpike_stream_frames_dropped_total{{transport=\"{t}\"}}"
        ));
        assert_eq!(dropped, 0.0, "{t} frames dropped");
    }
}

#[test]
fn uclient_static_user_channels() {
    uclient_relays_everything(&["-u", USER, "-w", PASSWORD], &[], |u| u == USER);
}

#[test]
fn uclient_rest_secret_channels() {
    // -W makes the tool mint `expiry:user` credentials from the shared secret itself.
    uclient_relays_everything(&["-u", "restuser", "-W", SECRET], &[], |u| {
        u.ends_with(":restuser") && u.split(':').next().unwrap().parse::<u64>().is_ok()
    });
}

#[test]
fn uclient_client_to_client() {
    // -y: clients relay to each other's relayed addresses (relay to relay).
    uclient_relays_everything(&["-u", USER, "-w", PASSWORD], &["-y"], |u| u == USER);
}

#[test]
fn uclient_send_indications() {
    // -s: Send/Data indications instead of ChannelData.
    uclient_relays_everything(&["-u", USER, "-w", PASSWORD], &["-s"], |u| u == USER);
}

#[test]
fn uclient_over_tcp_channels() {
    // RFC 8656 §3.1: TURN over TCP to the server, UDP relays to the peers.
    uclient_relays_everything(&["-u", USER, "-w", PASSWORD], &["-t"], |u| u == USER);
}

#[test]
fn uclient_over_tcp_send_indications() {
    uclient_relays_everything(&["-u", USER, "-w", PASSWORD], &["-t", "-s"], |u| u == USER);
}

#[test]
fn uclient_over_tcp_client_to_client() {
    uclient_relays_everything(&["-u", USER, "-w", PASSWORD], &["-t", "-y"], |u| u == USER);
}

#[test]
fn uclient_over_tcp_on_ipv6() {
    uclient_relays_everything_on("::1", &["-u", USER, "-w", PASSWORD], &["-t"], |u| u == USER);
}

#[test]
fn uclient_over_tls_channels() {
    // turns: TLS to the server, UDP relays to the peers.
    uclient_relays_everything(&["-u", USER, "-w", PASSWORD], &["-t", "-S"], |u| u == USER);
}

// No client-to-client run over TLS: uclient -y -S cycles through TLS versions on connect and
// starts sending before its partner's permission exists, losing ~10% against coturn too.
#[test]
fn uclient_over_tls_send_indications() {
    uclient_relays_everything(&["-u", USER, "-w", PASSWORD], &["-t", "-S", "-s"], |u| {
        u == USER
    });
}

#[test]
fn uclient_over_tcp_send_client_to_client() {
    uclient_relays_everything(&["-u", USER, "-w", PASSWORD], &["-t", "-s", "-y"], |u| {
        u == USER
    });
}

#[test]
fn uclient_over_tls_on_ipv6() {
    uclient_relays_everything_on("::1", &["-u", USER, "-w", PASSWORD], &["-t", "-S"], |u| {
        u == USER
    });
}

#[test]
fn uclient_plain_tcp_on_the_tls_port() {
    // One port for both: the TLS listener tells plain TURN from TLS by the first byte.
    uclient_relays_everything(&["-u", USER, "-w", PASSWORD], &[PLAIN_ON_TLS_PORT], |u| {
        u == USER
    });
}

#[test]
fn uclient_over_ipv6_gets_ipv6_relays() {
    // RFC 6156: an IPv6 client relaying to an IPv6 peer through IPv6 relay addresses.
    uclient_relays_everything_on("::1", &["-u", USER, "-w", PASSWORD], &[], |u| u == USER);
}

/// RFC 6062 with coturn's client: `-T` makes every client pair TCP-relay to each other (one
/// Connects to the other's relayed address, which announces it with a ConnectionAttempt; both
/// bind data connections). Two shards, so data connections also land on the shard that does
/// not own their peer connection and are moved. Every message must come back. (`-P`, a plain
/// TCP peer, counts only one direction: coturn's own server shows 50% lost with it, so the
/// active-peer path is tested by the raw client in errors_and_policy.rs.)
#[test]
fn uclient_tcp_relay_client_to_client() {
    if !tools_available() {
        return;
    }
    let tcp_listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let d = Daemon::with(Options::default().edit(move |c| c.tcp_listen = vec![tcp_listen]));
    let port = d.tcp_addr.expect("a TCP listener").port();
    let out = run_bounded(
        Command::new("turnutils_uclient")
            .args(["-p", &port.to_string()])
            .args(["-u", USER, "-w", PASSWORD, "-T"])
            .args(["-n", &MSGS.to_string(), "-m", &CLIENTS.to_string()])
            .args(["-l", "160", "-z", "5"])
            .arg("127.0.0.1"),
    );
    let (text, summary) = uclient_totals(&out);
    let total = MSGS * CLIENTS;
    assert!(
        summary.ends_with(&format!("tot_send_msgs={total}, tot_recv_msgs={total}")),
        "uclient totals: {summary:?}\n{text}"
    );
    assert!(
        text.contains("Total lost packets 0 ("),
        "uclient lost packets:\n{text}"
    );
    let created = d.events("allocation created");
    assert!(!created.is_empty(), "no allocation logged");
    for e in &created {
        assert_eq!(field(e, "transport"), "tcp", "{e}");
    }
}

#[test]
fn stunclient_gets_reflexive_address() {
    if !tools_available() {
        return;
    }
    let d = Daemon::start();
    let out = run_bounded(
        Command::new("turnutils_stunclient")
            .args(["-p", &d.addr.port().to_string()])
            .arg("127.0.0.1"),
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stunclient failed:\n{text}");
    let line = text
        .lines()
        .find(|l| l.contains("UDP reflexive addr:"))
        .unwrap_or_else(|| panic!("no reflexive address in:\n{text}"));
    let addr = line.rsplit(' ').next().unwrap();
    let addr: std::net::SocketAddr = addr.parse().unwrap_or_else(|_| panic!("{line:?}"));
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0);
    assert_ne!(addr.port(), d.addr.port(), "that is the server's own port");
    // A Binding request allocates nothing.
    assert!(d.events("allocation created").is_empty());
}

/// RFC 5780 on loopback (127.0.0.1 and 127.0.0.2 with two ports): coturn's discovery client
/// finds the alternate address in OTHER-ADDRESS, gets the change-IP-and-port answer from it, and
/// classifies loopback as it is: no NAT, so endpoint-independent mapping and filtering.
#[test]
fn natdiscovery_classifies_loopback_as_endpoint_independent() {
    if !tools_available() {
        return;
    }
    let disc = common::Discovery::pick();
    let d = Daemon::with(disc.options());
    assert_eq!(
        d.ready["nat_discovery"],
        serde_json::json!([{
            "primary": disc.primary.to_string(),
            "alternate": disc.alternate.to_string(),
            "tcp": true,
        }])
    );
    let out = run_bounded(
        Command::new("turnutils_natdiscovery")
            .args(["-m", "-f", "-L", "127.0.0.1"])
            .args(["-p", &disc.primary.port().to_string()])
            .arg("127.0.0.1"),
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "natdiscovery failed:\n{text}");
    for line in [
        "NAT with Endpoint Independent Mapping!".to_owned(),
        "NAT with Endpoint Independent Filtering!".to_owned(),
        "No ALG: Mapped == XOR-Mapped".to_owned(),
        format!("Other addr: : {}", disc.alternate),
        // The mapping test's second probe goes to IP2:P1 and is answered there.
        format!("Response origin: : {}", disc.at(true, false)),
        // The filtering test's change-IP-and-port answer comes from IP2:P2.
        format!("Response origin: : {}", disc.alternate),
    ] {
        assert!(text.contains(&line), "{line:?} missing in:\n{text}");
    }
    for wrong in ["Dependent", "timeout", "error"] {
        assert!(!text.contains(wrong), "{wrong:?} in:\n{text}");
    }
    assert!(d.events("allocation created").is_empty());
}
