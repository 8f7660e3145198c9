//! `turnpike probe` from the outside against turnpike over UDP, TCP and TLS, and against
//! Debian's coturn; what it says about wrong credentials, a dead server, a peer policy that
//! refuses it, and bad arguments.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{run_cli, Daemon, Options, TestCert, PASSWORD, USER};

/// The probe's JSON report, its exit status.
fn probe(args: &[&str], stdin: Option<&str>) -> (serde_json::Value, i32) {
    let mut all = vec!["probe", "--json", "--timeout-secs", "2"];
    all.extend_from_slice(args);
    let out = run_cli(&all, stdin);
    let text = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "{e}: {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (report, out.status.code().unwrap_or(-1))
}

/// The result of `check` for the report's URI number `i`.
fn result<'a>(report: &'a serde_json::Value, i: usize, check: &str) -> &'a serde_json::Value {
    report["uris"][i]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == check)
        .unwrap_or_else(|| panic!("no {check} check in {report}"))
}

fn passed(report: &serde_json::Value, i: usize, checks: &[&str]) {
    for check in checks {
        assert_eq!(
            result(report, i, check)["result"],
            "pass",
            "{check}: {report}"
        );
    }
}

const ALL: [&str; 5] = [
    "binding",
    "allocate",
    "second allocate",
    "relay to relay",
    "direct peer",
];

#[test]
fn probes_turnpike_over_udp_tcp_and_tls() {
    let cert = TestCert::new();
    let tcp: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let d = Daemon::with(
        Options::default()
            .edit(move |c| c.tcp_listen = vec![tcp])
            .edit(cert.listen_on("127.0.0.1")),
    );
    let udp = format!("turn:{}", d.addr);
    let tcp = format!("turn:{}?transport=tcp", d.tcp_addr.unwrap());
    // The certificate names 127.0.0.1; the probe checks it against --ca-file.
    let tls = format!("turns:{}", d.tls_addr.unwrap());
    let stun = format!("stun:{}", d.addr);
    let ca = cert.ca.to_str().unwrap();
    let (report, code) = probe(
        &[
            &udp,
            &tcp,
            &tls,
            &stun,
            "--user",
            USER,
            "--password",
            "-",
            "--ca-file",
            ca,
        ],
        Some(PASSWORD),
    );
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["ok"], true);
    for i in 0..3 {
        passed(&report, i, &ALL);
    }
    passed(&report, 1, &["connect"]);
    passed(&report, 2, &["connect"]);
    assert_eq!(
        report["uris"][3]["checks"].as_array().unwrap().len(),
        1,
        "stun: Binding only"
    );
    // The relay round trip is timed; the allocations are gone again.
    assert!(result(&report, 0, "relay to relay")["ms"].as_f64().unwrap() >= 0.0);
    d.wait_events("allocation ended", 6, Duration::from_secs(5), |e| {
        e["reason"] == "deleted by client"
    });
}

#[test]
fn wrong_password_dead_server_refused_peer_and_bad_arguments() {
    let d = Daemon::with(Options {
        allow_loopback_peers: false,
        ..Options::default()
    });
    let uri = format!("turn:{}", d.addr);
    let (report, code) = probe(&[&uri, "--user", USER, "--password", "-"], Some("not it"));
    assert_eq!(code, 1, "{report}");
    let allocate = result(&report, 0, "allocate");
    assert_eq!(allocate["result"], "fail");
    assert!(
        allocate["detail"].as_str().unwrap().contains("401"),
        "{report}"
    );

    // A loopback peer is refused by this server's policy: skipped, said why, not a failure.
    let (report, code) = probe(&[&uri, "--user", USER, "--password", "-"], Some(PASSWORD));
    assert_eq!(code, 0, "{report}");
    let peer = result(&report, 0, "direct peer");
    assert_eq!(peer["result"], "skip", "{report}");
    assert!(peer["detail"].as_str().unwrap().contains("403"), "{report}");

    // Nobody there: the Binding fails and nothing else is tried.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead_uri = format!("turn:{}", dead.local_addr().unwrap());
    drop(dead);
    let (report, code) = probe(
        &[&dead_uri, "--user", USER, "--password", "-"],
        Some(PASSWORD),
    );
    assert_eq!(code, 1);
    assert_eq!(result(&report, 0, "binding")["result"], "fail", "{report}");
    assert_eq!(report["uris"][0]["checks"].as_array().unwrap().len(), 1);

    for args in [
        &["probe", "http://example.com", "--password", "-"][..],
        &["probe", "turns:h?transport=udp", "--password", "-"],
        &["probe", &uri], // a turn: URI and no credential
        &["probe", &uri, "--password", "on-the-command-line"],
    ] {
        let out = run_cli(args, Some(PASSWORD));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("turnpike probe: "), "{args:?}: {err}");
    }
}

/// coturn started by this test on a free loopback port, stopped by PID when dropped.
struct Coturn(Child);

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn probes_coturn_with_a_static_user_and_a_rest_secret() {
    if Command::new("turnserver").arg("--help").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "turnserver missing in CI");
        eprintln!("skipped: Debian's coturn (turnserver) is not installed");
        return;
    }
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = common::TempDir::new("probe-coturn");
    let secret = "probe-rest-secret-0123456789";
    let start = |args: &[String]| {
        Coturn(
            Command::new("turnserver")
                .args(["-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1"])
                .arg(format!("--listening-port={port}"))
                .args(["--min-port=40000", "--max-port=40999", "--realm=probe"])
                .args([
                    "--allow-loopback-peers",
                    "--no-tls",
                    "--no-dtls",
                    "--no-cli",
                ])
                .arg(format!(
                    "--log-file={}",
                    dir.path().join("coturn.log").display()
                ))
                .arg(format!(
                    "--pidfile={}",
                    dir.path().join("coturn.pid").display()
                ))
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start turnserver"),
        )
    };
    let uris = [
        format!("turn:127.0.0.1:{port}"),
        format!("turn:127.0.0.1:{port}?transport=tcp"),
    ];
    let wait_probe = |args: &[&str], stdin: Option<&str>| {
        // coturn takes a moment to listen: retry the probe for a few seconds.
        for _ in 0..20 {
            let (report, code) = probe(args, stdin);
            if code == 0 || result(&report, 0, "binding")["result"] == "pass" {
                return (report, code);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("coturn never answered on port {port}");
    };
    {
        let _coturn = start(&["--lt-cred-mech".into(), format!("--user={USER}:{PASSWORD}")]);
        let (report, code) = wait_probe(
            &[&uris[0], &uris[1], "--user", USER, "--password", "-"],
            Some(PASSWORD),
        );
        assert_eq!(code, 0, "{report}");
        passed(&report, 0, &ALL);
        passed(&report, 1, &ALL);
        let sw = result(&report, 0, "binding")["detail"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(sw.contains("Coturn"), "{sw}");
    }
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let _coturn = start(&[
        "--use-auth-secret".into(),
        format!("--static-auth-secret={secret}"),
    ]);
    let secret_path = secret_file.to_str().unwrap();
    let (report, code) = wait_probe(&[&uris[0], "--secret-file", secret_path], None);
    assert_eq!(code, 0, "{report}");
    passed(&report, 0, &ALL);
}

/// A "server" that accepts, then drips one byte every 300 ms forever: the TLS handshake must
/// give up at the timeout instead of waiting on each byte afresh.
#[test]
fn a_server_dripping_bytes_does_not_hold_the_probe_past_its_timeout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::Write;
        if let Ok((mut conn, _)) = listener.accept() {
            // A TLS record header that never completes: handshake type, version, length.
            for b in [0x16u8, 0x03, 0x03, 0x40, 0x00].iter().cycle().take(200) {
                if conn.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    });
    let started = std::time::Instant::now();
    let (report, code) = probe(&[&format!("turns:{addr}"), "--password", "-"], Some("x"));
    assert_eq!(code, 1, "{report}");
    let connect = result(&report, 0, "connect");
    assert_eq!(connect["result"], "fail", "{report}");
    // --timeout-secs 2: well under the 60 s the drip would last.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}
