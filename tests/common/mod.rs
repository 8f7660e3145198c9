//! Test harness: runs the real `turnpike` binary on loopback (or inside a network namespace a
//! test made: [`Options::netns`]) with a config written to a temp dir, learns its ports from the
//! file `serve --ready-file` writes, and stops it on drop. Its stderr is kept for the tests of
//! what it logs and for failure reports. Also: signals, config rewrites,
//! exit status, an sd_notify socket, a tiny HTTP client for the control plane, a Prometheus text
//! parser, a raw TURN client over UDP and a UDP echo peer.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use turnpike::config::{Config, DiscoveryAddresses, LogFormat, RelayIp, UserEntry, UserSecret};
use turnpike::proto::auth::{long_term_key, PasswordAlgorithm};
use turnpike::proto::codec::{attr, decode_xor_address, method, Class, Message, MessageWriter};

pub const REALM: &str = "turnpike.test";
pub const USER: &str = "alice";
pub const PASSWORD: &str = "wonderland";
/// REST secret (>= 16 bytes, as the daemon requires).
pub const SECRET: &str = "0123456789abcdef-integration-secret";
/// Default `auth.rest_max_ttl_secs`.
pub const REST_MAX_TTL_SECS: u64 = 172_800;
/// Bearer token written to `api.token_file` when [`Api::Token`] is chosen.
pub const API_TOKEN: &str = "api-token-0123456789abcdef-integration";

/// Relay ports are handed out in blocks of this size inside 20000-29999: below the kernel's
/// ephemeral range (32768+), where the daemon's port-0 listener and the tests' own sockets land.
const RELAY_BLOCK: u16 = 200;
const RELAY_BLOCKS: u32 = 50;
const READY_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_GRACE: Duration = Duration::from_secs(3);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Settings a test may vary; everything else is fixed by [`Daemon::start`].
#[derive(Clone, Debug)]
pub struct Options {
    pub allow_loopback_peers: bool,
    pub allocations_per_user: u32,
    /// `threads`: 2 by default.
    pub threads: u32,
    /// `[relay] port_min` and `port_max`. None (default): a block of 200 ports inside
    /// 20000-29999 that the harness picks per daemon. Either way [`Daemon::relay_ports`] is the
    /// range in the config.
    pub relay_ports: Option<(u16, u16)>,
    /// `limits.unauth_replies_per_sec`. `Some(0)` (default) = no rate limit on 401/438, so
    /// tests that need many nonces are not throttled; None keeps the daemon's own default.
    pub unauth_replies_per_sec: Option<u32>,
    /// `drain_secs`; 0 (default) stops at once on SIGTERM.
    pub drain_secs: u64,
    /// The HTTP control plane: off (default), on without a token file, or on with [`API_TOKEN`].
    pub api: Api,
    /// Static users besides [`USER`], as `(name, password)`.
    pub extra_users: Vec<(String, String)>,
    /// Extra environment variables for the daemon. NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID
    /// are removed from the inherited environment unless set here or by `notify_socket`.
    pub env: Vec<(String, String)>,
    /// Bind a Unix datagram socket in the temp dir and pass it as NOTIFY_SOCKET.
    pub notify_socket: bool,
    /// Start through `sh -c '<prefix>; exec turnpike serve ...'`, so the prefix can use the
    /// daemon's own pid as `$$` (e.g. `export WATCHDOG_PID=$$`).
    pub sh_prefix: Option<String>,
    /// Listen on [::1] instead of 127.0.0.1 and add an IPv6 relay on ::1 (RFC 6156); the IPv4
    /// relay on 127.0.0.1 stays.
    pub ipv6: bool,
    /// The one UDP listener (`listen`). None (default): `127.0.0.1:0`, or `[::1]:0` with
    /// `ipv6`. [`Daemon::addr`] is what the ready file names, so a wildcard stays one there.
    pub listen: Option<SocketAddr>,
    /// `relay.address`. None (default): 127.0.0.1.
    pub relay_address: Option<Ipv4Addr>,
    /// `relay.address_v6`. None (default): `::1` with `ipv6`, else no IPv6 relay.
    pub relay_address_v6: Option<Ipv6Addr>,
    /// `api.listen` when `api` is not [`Api::Off`]. None (default): `127.0.0.1:0`.
    pub api_listen: Option<SocketAddr>,
    /// Run the daemon inside this network namespace (`ip netns exec NS ...`; see
    /// `tests/nat/netns.rs`). None (default): this process's own.
    pub netns: Option<String>,
    /// Changes to the config past the settings above, applied last, in order: [`Options::edit`].
    pub edits: Edits,
}

/// A change a test makes to the [`Config`] the harness builds.
pub type Edit = Arc<dyn Fn(&mut Config) + Send + Sync>;

#[derive(Clone, Default)]
pub struct Edits(Vec<Edit>);

impl std::fmt::Debug for Edits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Edits({})", self.0.len())
    }
}

/// How the `[api]` table is configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Off,
    /// `listen = "127.0.0.1:0"`, no `token_file`: the /api/v1 routes answer 403.
    NoToken,
    /// `listen = "127.0.0.1:0"`, `token_file` holding [`API_TOKEN`].
    Token,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            allow_loopback_peers: true,
            allocations_per_user: 10,
            threads: 2,
            relay_ports: None,
            unauth_replies_per_sec: Some(0),
            drain_secs: 0,
            api: Api::Off,
            extra_users: Vec::new(),
            env: Vec::new(),
            notify_socket: false,
            sh_prefix: None,
            ipv6: false,
            listen: None,
            relay_address: None,
            relay_address_v6: None,
            api_listen: None,
            netns: None,
            edits: Edits::default(),
        }
    }
}

impl Options {
    /// Options with the API on and [`API_TOKEN`] configured.
    pub fn with_api() -> Options {
        Options {
            api: Api::Token,
            ..Options::default()
        }
    }

    /// Adds a change to the config, applied after the settings above and earlier edits.
    pub fn edit(mut self, f: impl Fn(&mut Config) + Send + Sync + 'static) -> Options {
        self.edits.0.push(Arc::new(f));
        self
    }

    /// The config these options produce, for a daemon whose relay ports are `relay_ports`
    /// unless [`Options::relay_ports`] says otherwise. `secret.txt` and `api.token` are
    /// relative to the file's directory.
    pub fn config(&self, relay_ports: (u16, u16)) -> Config {
        let (port_min, port_max) = self.relay_ports.unwrap_or(relay_ports);
        let password = |name: &str, password: &str| UserEntry {
            name: name.into(),
            secret: UserSecret::Password(password.into()),
        };
        let mut c = Config {
            realm: REALM.into(),
            threads: self.threads as usize,
            listen: vec![self.listen.unwrap_or(if self.ipv6 {
                (Ipv6Addr::LOCALHOST, 0).into()
            } else {
                (Ipv4Addr::LOCALHOST, 0).into()
            })],
            log_format: LogFormat::Json,
            // TURNPIKE_TEST_LOG=debug (or trace) when a test needs the daemon's reasons.
            log_level: std::env::var("TURNPIKE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            drain_secs: self.drain_secs,
            ..Config::default()
        };
        c.relay.address = RelayIp::Ip(self.relay_address.unwrap_or(Ipv4Addr::LOCALHOST));
        c.relay.address_v6 = self
            .relay_address_v6
            .or(self.ipv6.then_some(Ipv6Addr::LOCALHOST));
        (c.relay.port_min, c.relay.port_max) = (port_min, port_max);
        c.auth.secret_file = Some("secret.txt".into());
        c.auth.users = std::iter::once(password(USER, PASSWORD))
            .chain(self.extra_users.iter().map(|(n, p)| password(n, p)))
            .collect();
        c.limits.allocations_per_user = self.allocations_per_user;
        if let Some(n) = self.unauth_replies_per_sec {
            c.limits.unauth_replies_per_sec = n;
        }
        c.peers.allow_loopback_peers = self.allow_loopback_peers;
        if self.api != Api::Off {
            c.api.listen = Some(self.api_listen.unwrap_or((Ipv4Addr::LOCALHOST, 0).into()));
        }
        if self.api == Api::Token {
            c.api.token_file = Some("api.token".into());
        }
        for edit in &self.edits.0 {
            edit(&mut c);
        }
        c
    }

    /// [`Options::config`] as a file.
    pub fn config_text(&self, relay_ports: (u16, u16)) -> String {
        config_toml(&self.config(relay_ports))
    }
}

/// RFC 5780 discovery on loopback: the primary 127.0.0.1:P1 (UDP and TCP) and the alternate
/// 127.0.0.2:P2, two ports the kernel handed out free on both addresses for both transports
/// (released again before the daemon binds them: a tiny race).
pub struct Discovery {
    pub primary: SocketAddr,
    pub alternate: SocketAddr,
}

impl Discovery {
    pub fn pick() -> Discovery {
        let free_on_both = || -> u16 {
            for _ in 0..50 {
                let Ok(s) = UdpSocket::bind("127.0.0.1:0") else {
                    continue;
                };
                let port = s.local_addr().unwrap().port();
                let free = ["127.0.0.1", "127.0.0.2"].iter().all(|ip| {
                    (*ip == "127.0.0.1" || UdpSocket::bind((*ip, port)).is_ok())
                        && std::net::TcpListener::bind((*ip, port)).is_ok()
                });
                if free {
                    return port;
                }
            }
            panic!("no port free on 127.0.0.1 and 127.0.0.2");
        };
        let p1 = free_on_both();
        let p2 = loop {
            let p = free_on_both();
            if p != p1 {
                break p;
            }
        };
        Discovery {
            primary: (Ipv4Addr::LOCALHOST, p1).into(),
            alternate: (Ipv4Addr::new(127, 0, 0, 2), p2).into(),
        }
    }

    /// The address on the primary or alternate IP and port.
    pub fn at(&self, alternate_ip: bool, alternate_port: bool) -> SocketAddr {
        let ip = if alternate_ip {
            self.alternate
        } else {
            self.primary
        }
        .ip();
        let port = if alternate_port {
            self.alternate
        } else {
            self.primary
        }
        .port();
        SocketAddr::new(ip, port)
    }

    /// Options listening on the primary (UDP and TCP) with `[nat_discovery]` set.
    pub fn options(&self) -> Options {
        let (primary, alternate) = (self.primary, self.alternate);
        Options {
            listen: Some(primary),
            ..Options::default()
        }
        .edit(move |c| {
            c.tcp_listen = vec![primary];
            c.nat_discovery.v4 = Some(DiscoveryAddresses { primary, alternate });
        })
    }
}

/// `config` as a TOML file (`Config::to_toml`, secrets included), checked to read back as the
/// same config.
pub fn config_toml(config: &Config) -> String {
    let text = config.to_toml();
    match Config::parse(&text, "<test config>") {
        Ok(back) => assert_eq!(&back, config, "the file says something else:\n{text}"),
        Err(e) => panic!("the test built an invalid config: {e}\n{text}"),
    }
    text
}

/// Writes `secret.txt`, `api.token` and `turnpike.toml` for `opts` into `dir` (created if
/// needed); returns the config path. For CLI tests that need no running daemon.
pub fn write_config_dir(dir: &Path, opts: &Options, relay_ports: (u16, u16)) -> PathBuf {
    std::fs::create_dir_all(dir).expect("create config dir");
    std::fs::write(dir.join("secret.txt"), format!("{SECRET}\n")).expect("write secret");
    std::fs::write(dir.join("api.token"), format!("{API_TOKEN}\n")).expect("write token");
    let config = dir.join("turnpike.toml");
    std::fs::write(&config, opts.config_text(relay_ports)).expect("write config");
    config
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("turnpike-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test CA and a server certificate it signed, as PEM files in a temp dir: nothing private is
/// committed, every run makes its own.
pub struct TestCert {
    pub dir: TempDir,
    /// The CA certificate clients trust.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// DER of the server certificate, to tell which one a handshake got.
    pub cert_der: Vec<u8>,
}

impl TestCert {
    /// A certificate for loopback (127.0.0.1, ::1, localhost) and `turn.test`.
    pub fn new() -> TestCert {
        TestCert::with_names(&["127.0.0.1", "::1", "localhost", "turn.test"], 30)
    }

    /// A certificate for `names` (IP literals become IP SANs) valid for `days` from now (negative:
    /// expired that long ago).
    pub fn with_names(names: &[&str], days: i64) -> TestCert {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let dir = TempDir::new("cert");
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "turnpike test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut leaf =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        leaf.distinguished_name.push(DnType::CommonName, names[0]);
        // Negative `days`: a certificate that has expired.
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        let at = |unix: i64| epoch + Duration::from_secs(unix.max(0) as u64);
        let now = unix_now() as i64;
        let not_after = now + days * 86400;
        leaf.not_before = at(now.min(not_after) - 3600);
        leaf.not_after = at(not_after);
        let leaf = leaf.signed_by(&key, &ca, &ca_key).unwrap();
        let t = TestCert {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            cert_der: leaf.der().to_vec(),
            dir,
        };
        std::fs::write(&t.ca, ca.pem()).unwrap();
        std::fs::write(&t.cert, leaf.pem() + &ca.pem()).unwrap();
        std::fs::write(&t.key, key.serialize_pem()).unwrap();
        t
    }

    /// Options edit: a TLS listener on `ip` port 0 serving this certificate.
    pub fn listen_on(&self, ip: &str) -> impl Fn(&mut Config) + Send + Sync + 'static {
        let (cert, key) = (self.cert.clone(), self.key.clone());
        let addr = SocketAddr::new(ip.parse().unwrap(), 0);
        move |c: &mut Config| {
            c.tls_listen = vec![addr];
            c.tls.cert_file = Some(cert.clone());
            c.tls.key_file = Some(key.clone());
        }
    }
}

/// The built `turnpike` binary.
pub fn turnpike_bin() -> &'static str {
    env!("CARGO_BIN_EXE_turnpike")
}

/// Runs `turnpike ARGS` to completion (bounded: 20 s, then killed) with `stdin` fed to it.
pub fn run_cli(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(turnpike_bin())
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn turnpike");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        // A command that never reads its input may exit first: not the test's failure.
        if let Err(e) = pipe.write_all(input.as_bytes()) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
        }
    }
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&done);
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !flag.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !flag.load(Ordering::SeqCst) {
            // SAFETY: kill(2) on our own child, which has not been reaped (wait_with_output
            // below has not returned: `done` is still false).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output().expect("wait for turnpike");
    done.store(true, Ordering::SeqCst);
    let _ = watchdog.join();
    out
}

/// `(stdout, stderr)` of a CLI run as text.
pub fn out_text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A running daemon. Dropping it sends SIGTERM, then SIGKILL after a grace period.
pub struct Daemon {
    child: Option<Child>,
    /// The UDP STUN/TURN listener, as bound.
    pub addr: SocketAddr,
    /// The TCP listener as bound, when `tcp_listen` configures one.
    pub tcp_addr: Option<SocketAddr>,
    /// The TLS listener (TLS and plain TCP on one port) as bound, when `tls_listen` configures one.
    pub tls_addr: Option<SocketAddr>,
    /// The HTTP API listener as bound, when the API is on.
    pub api_addr: Option<SocketAddr>,
    /// The relay port range: [`Options::relay_ports`], or the block the harness picked.
    pub relay_ports: (u16, u16),
    /// The ready file's document, as the daemon wrote it.
    pub ready: serde_json::Value,
    pub opts: Options,
    log: Arc<Mutex<Vec<String>>>,
    dir: PathBuf,
    notify: Option<UnixDatagram>,
    pid: u32,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// `(username, password)` minted from [`SECRET`] the way a web app would.
pub fn rest_credential(user: &str, expiry_unix: u64) -> (String, String) {
    turnpike::proto::auth::mint_rest_credential(SECRET.as_bytes(), user, expiry_unix, ':')
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::with(Options::default())
    }

    pub fn with(opts: Options) -> Daemon {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let block = (std::process::id().wrapping_mul(7).wrapping_add(n)) % RELAY_BLOCKS;
        let port_min = 20000 + block as u16 * RELAY_BLOCK;
        let relay_ports = opts
            .relay_ports
            .unwrap_or((port_min, port_min + RELAY_BLOCK - 1));

        let dir = std::env::temp_dir().join(format!("turnpike-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = write_config_dir(&dir, &opts, relay_ports);

        let notify = opts.notify_socket.then(|| {
            let sock = UnixDatagram::bind(dir.join("notify.sock")).expect("bind notify socket");
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            sock
        });

        let ready_file = dir.join("ready.json");
        let mut argv: Vec<std::ffi::OsString> = match &opts.sh_prefix {
            None => vec![turnpike_bin().into(), "serve".into()],
            Some(prefix) => vec![
                "sh".into(),
                "-c".into(),
                format!("{prefix}; exec \"$0\" serve \"$@\"").into(),
                turnpike_bin().into(),
            ],
        };
        argv.extend([
            "--config".into(),
            config.clone().into(),
            "--ready-file".into(),
            ready_file.clone().into(),
        ]);
        if let Some(ns) = &opts.netns {
            // `ip netns exec` execs the program in its own process: the pid stays the daemon's.
            let mut wrapped: Vec<std::ffi::OsString> =
                vec!["ip".into(), "netns".into(), "exec".into(), ns.into()];
            wrapped.append(&mut argv);
            argv = wrapped;
        }
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            cmd.env_remove(var);
        }
        if opts.notify_socket {
            cmd.env("NOTIFY_SOCKET", dir.join("notify.sock"));
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn turnpike");

        // The reader thread owns stderr until EOF so the daemon never blocks on a full pipe.
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });

        let pid = child.id();
        let mut d = Daemon {
            child: Some(child),
            addr: "0.0.0.0:0".parse().unwrap(),
            tcp_addr: None,
            tls_addr: None,
            api_addr: None,
            relay_ports,
            ready: serde_json::Value::Null,
            opts,
            log,
            dir,
            notify,
            pid,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            // Written by rename: if it is there, it is whole.
            if let Ok(text) = std::fs::read_to_string(&ready_file) {
                d.learn_ports(&text);
                return d;
            }
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "turnpike exited during start ({status}); stderr:\n{}",
                    d.log()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "turnpike not ready within {READY_TIMEOUT:?}; stderr:\n{}",
                    d.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Takes the listener, API and relay range from the ready file's `text`; panics unless it
    /// is this daemon's and names what the options asked for.
    fn learn_ports(&mut self, text: &str) {
        let v: serde_json::Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("the ready file is not JSON ({e}): {text}"));
        assert_eq!(
            v["pid"], self.pid,
            "the ready file names another pid: {text}"
        );
        let addr = |a: &serde_json::Value| -> SocketAddr {
            a.as_str()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("not an address: {a} in {text}"))
        };
        let listen = v["listen"].as_array().expect("listen array");
        let of = |transport: &str| -> Vec<SocketAddr> {
            listen
                .iter()
                .filter(|l| l["transport"] == transport)
                .map(|l| addr(&l["addr"]))
                .collect()
        };
        let (udp, tcp, tls) = (of("udp"), of("tcp"), of("tls"));
        assert_eq!(udp.len(), 1, "one UDP listener: {text}");
        assert!(tcp.len() <= 1, "at most one TCP listener: {text}");
        assert!(tls.len() <= 1, "at most one TLS listener: {text}");
        assert_eq!(udp.len() + tcp.len() + tls.len(), listen.len(), "{text}");
        self.addr = udp[0];
        self.tcp_addr = tcp.first().copied();
        self.tls_addr = tls.first().copied();
        self.api_addr = (!v["api"].is_null()).then(|| addr(&v["api"]));
        assert_eq!(
            self.api_addr.is_some(),
            self.opts.api != Api::Off,
            "the API in the ready file: {text}"
        );
        let port = |p: &serde_json::Value| -> u16 {
            p.as_u64()
                .and_then(|p| p.try_into().ok())
                .unwrap_or_else(|| panic!("not a port: {p} in {text}"))
        };
        let ports = &v["relay_ports"];
        let ports = (port(&ports["min"]), port(&ports["max"]));
        assert_eq!(
            ports, self.relay_ports,
            "the configured relay range: {text}"
        );
        self.ready = v;
    }

    pub fn ready_file(&self) -> PathBuf {
        self.dir.join("ready.json")
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// How many log lines the daemon wrote while starting, once the reader has them all.
    /// Readiness comes from the ready file, which can appear before this process has read the
    /// start-up lines off the pipe; tests of what is logged at start, or only after it, wait
    /// here. The last start-up line is "turnpike ready".
    pub fn start_log_len(&self) -> usize {
        let ready = self.wait_log(READY_TIMEOUT, "\"turnpike ready\"", |l| {
            l.contains("turnpike ready")
        });
        1 + self
            .log_lines()
            .iter()
            .position(|l| *l == ready)
            .expect("the line just found")
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log_lines().join("\n")
    }

    /// Log lines whose message is exactly `message` (JSON logs).
    pub fn events(&self, message: &str) -> Vec<serde_json::Value> {
        self.log_lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("message").and_then(|m| m.as_str()) == Some(message))
            .collect()
    }

    /// Waits until at least `count` log events named `message` satisfy `pred`; returns them.
    pub fn wait_events(
        &self,
        message: &str,
        count: usize,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let found: Vec<_> = self.events(message).into_iter().filter(&pred).collect();
            if found.len() >= count {
                return found;
            }
            if Instant::now() > deadline {
                panic!(
                    "expected {count} {message:?} events within {timeout:?}, got {}; stderr:\n{}",
                    found.len(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("turnpike.toml")
    }

    /// Replaces the config file with `text` (takes effect on [`Daemon::sighup`]).
    pub fn write_config(&self, text: &str) {
        // Write-then-rename, so a reload never reads a half-written file.
        let tmp = self.dir.join("turnpike.toml.new");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, self.config_path()).expect("replace config");
    }

    /// Rewrites the config from `opts` with this daemon's relay ports.
    pub fn reconfigure(&self, opts: &Options) {
        self.write_config(&opts.config_text(self.relay_ports));
    }

    /// The config file as it is now (relative paths as written).
    pub fn config(&self) -> Config {
        let text = std::fs::read_to_string(self.config_path()).expect("read config");
        Config::parse(&text, "turnpike.toml").expect("the config parses")
    }

    /// Changes the config file with `f` (takes effect on [`Daemon::sighup`]).
    pub fn edit_config(&self, f: impl FnOnce(&mut Config)) {
        let mut c = self.config();
        f(&mut c);
        self.write_config(&config_toml(&c));
    }

    /// A copy of the config for CLI commands run against this daemon: the UDP listener and the
    /// API listener carry the bound ports instead of 0. Returns its path.
    pub fn client_config(&self) -> PathBuf {
        let mut c = self.config();
        c.listen = vec![self.addr];
        c.api.listen = self.api_addr;
        let path = self.dir.join("client.toml");
        std::fs::write(&path, config_toml(&c)).expect("write client config");
        path
    }

    /// Sends `sig` to the daemon, unless it has already exited (and may have been reaped).
    pub fn signal(&mut self, sig: libc::c_int) {
        if self.is_running() {
            // SAFETY: kill(2) on our own child, which try_wait just found not yet reaped.
            unsafe { libc::kill(self.pid as libc::pid_t, sig) };
        }
    }

    pub fn sighup(&mut self) {
        self.signal(libc::SIGHUP);
    }

    pub fn sigterm(&mut self) {
        self.signal(libc::SIGTERM);
    }

    /// Waits up to `timeout` for the process to exit; its status, or None if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until a log line satisfies `pred`; panics with the log after `timeout`.
    pub fn wait_log(&self, timeout: Duration, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log_lines().into_iter().find(|l| pred(l)) {
                return l;
            }
            if Instant::now() > deadline {
                panic!(
                    "no log line {what} within {timeout:?}; stderr:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    // ------------------------------------------------------------ sd_notify

    /// The next sd_notify datagram, or None after `timeout`.
    pub fn notify_recv(&self, timeout: Duration) -> Option<String> {
        let sock = self.notify.as_ref().expect("started with notify_socket");
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        loop {
            if let Ok(n) = sock.recv(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            if Instant::now() >= deadline {
                return None;
            }
        }
    }

    /// Collects sd_notify datagrams until one satisfies `pred` (returned last), panicking after
    /// `timeout` with what arrived.
    pub fn notify_until(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Some(m) = self.notify_recv(left) {
                let done = pred(&m);
                got.push(m);
                if done {
                    return got;
                }
            }
        }
        panic!("sd_notify: awaited message not received within {timeout:?}; got {got:?}");
    }

    // ------------------------------------------------------------ HTTP API

    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr.expect("daemon started with the API on")
    }

    /// A request to the API with [`API_TOKEN`].
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
        http(
            self.api_addr(),
            method,
            path,
            &[("Authorization", &format!("Bearer {API_TOKEN}"))],
            body.map(str::as_bytes),
        )
    }

    /// A request to the API without any Authorization header.
    pub fn get(&self, path: &str) -> HttpResponse {
        http(self.api_addr(), "GET", path, &[], None)
    }

    /// `/metrics`, checked to be well-formed Prometheus text, as `name{labels}` -> value.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "/metrics: {}", r.body);
        parse_prometheus(&r.body).unwrap_or_else(|e| panic!("/metrics: {e}\n{}", r.body))
    }

    /// Polls `/metrics` until `series` reaches `at_least`; panics with its last value after
    /// `timeout`. How a test learns that a reload was applied or refused.
    pub fn wait_metric(&self, series: &str, at_least: f64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.metrics().get(series).copied();
            if now.is_some_and(|v| v >= at_least) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{series} is {now:?}, not {at_least} within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `/readyz` answers 503: SIGTERM's drain has begun.
    pub fn wait_draining(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.get("/readyz").status != 503 {
            assert!(
                Instant::now() < deadline,
                "/readyz not 503 within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One sample of `/metrics`, e.g. `turnpike_allocations{transport="udp"}`.
    pub fn metric(&self, series: &str) -> f64 {
        *self
            .metrics()
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in /metrics"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A test may have drained or stopped it already: never signal a reaped pid.
            // SIGTERM; a second one ends a drain at once; SIGKILL as the last resort.
            for grace in [Duration::from_secs(1), STOP_GRACE] {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                // SAFETY: plain kill(2) on the pid of a child we spawned and have not reaped.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                let deadline = Instant::now() + grace;
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- turnpike stderr ----\n{}\n----", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Value of a string field of a JSON log event.
pub fn field<'a>(event: &'a serde_json::Value, name: &str) -> &'a str {
    event.get(name).and_then(|v| v.as_str()).unwrap_or("")
}

// ---------------------------------------------------------------------------------- HTTP

/// A response from [`http`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    /// The `error` message of a JSON error body; panics unless the body is exactly that shape.
    pub fn error_message(&self) -> String {
        let v = self.json();
        let msg = v
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or_else(|| panic!("no string \"error\" in {:?}", self.body));
        assert!(!msg.trim().is_empty(), "empty error message");
        msg.to_owned()
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`), bounded by timeouts.
/// Write errors are ignored (a server may answer 413 and close before reading a big body), so
/// the response is still read.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HttpResponse {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to the API at {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or(b"");
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut wire = req.into_bytes();
    wire.extend_from_slice(body);
    let _ = s.write_all(&wire);
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // A reset after the response arrived (unread request body) still leaves the response.
            Err(e) if !raw.is_empty() => {
                eprintln!("http: read ended with {e} after {} bytes", raw.len());
                break;
            }
            Err(e) => panic!("{method} {path}: reading the response failed: {e}"),
        }
    }
    parse_http_response(&raw).unwrap_or_else(|| {
        panic!(
            "{method} {path}: malformed HTTP response {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

fn parse_http_response(raw: &[u8]) -> Option<HttpResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut out = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        loop {
            let eol = body.windows(2).position(|w| w == b"\r\n")?;
            let size_text = std::str::from_utf8(&body[..eol]).ok()?;
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            body = &body[eol + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(body.get(..size)?);
            body = body.get(size + 2..)?;
        }
    } else if let Some(len) = get("content-length") {
        let len: usize = len.parse().ok()?;
        out.extend_from_slice(body.get(..len)?);
    } else {
        out.extend_from_slice(body);
    }
    Some(HttpResponse {
        status,
        headers,
        body: String::from_utf8(out).ok()?,
    })
}

// ---------------------------------------------------------------------------------- Prometheus

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses Prometheus text exposition format 0.0.4 strictly enough to catch malformed output:
/// HELP/TYPE comments with valid names and types, every sample's family typed before it,
/// `name{label="value",...} value` samples with float values, no duplicate series.
/// Returns `name{labels}` (as written) -> value.
pub fn parse_prometheus(text: &str) -> Result<BTreeMap<String, f64>, String> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut out = BTreeMap::new();
    if !text.ends_with('\n') {
        return Err("exposition must end with a newline".into());
    }
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap_or("");
            let name = parts.next().unwrap_or("");
            match kind {
                "HELP" if !is_metric_name(name) => {
                    return Err(format!("line {n}: bad HELP name {name:?}"));
                }
                "TYPE" => {
                    let t = parts.next().unwrap_or("");
                    if !is_metric_name(name)
                        || !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t)
                    {
                        return Err(format!("line {n}: bad TYPE line {line:?}"));
                    }
                    if types.insert(name.to_owned(), t.to_owned()).is_some() {
                        return Err(format!("line {n}: second TYPE for {name}"));
                    }
                }
                _ => {}
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("line {n}: no value in {line:?}"))?;
        let v: f64 = value
            .parse()
            .map_err(|_| format!("line {n}: bad value {value:?}"))?;
        let name = match series.split_once('{') {
            None => series,
            Some((name, labels)) => {
                let labels = labels
                    .strip_suffix('}')
                    .ok_or_else(|| format!("line {n}: unterminated labels in {line:?}"))?;
                for pair in labels.split(',').filter(|p| !p.is_empty()) {
                    let (k, val) = pair
                        .split_once('=')
                        .ok_or_else(|| format!("line {n}: bad label {pair:?}"))?;
                    let quoted = val.len() >= 2 && val.starts_with('"') && val.ends_with('"');
                    if !is_metric_name(k) || k.contains(':') || !quoted {
                        return Err(format!("line {n}: bad label {pair:?}"));
                    }
                }
                name
            }
        };
        if !is_metric_name(name) {
            return Err(format!("line {n}: bad metric name {name:?}"));
        }
        let Some(t) = types.get(name) else {
            return Err(format!("line {n}: sample of {name} before its TYPE line"));
        };
        if t == "counter" && v < 0.0 {
            return Err(format!("line {n}: negative counter"));
        }
        if out.insert(series.to_owned(), v).is_some() {
            return Err(format!("line {n}: duplicate series {series}"));
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------- credentials

/// base64(HMAC-SHA1(SECRET, username)), computed here with ring and base64 directly (not with
/// turnpike's own helpers), as an independent check of minted passwords.
pub fn expected_rest_password(username: &str) -> String {
    use base64::Engine;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, SECRET.as_bytes());
    let tag = ring::hmac::sign(&key, username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
}

/// Unix time of a UTC RFC 3339 timestamp `YYYY-MM-DDTHH:MM:SSZ` (fractions and `+00:00`
/// accepted), or None if it is not one. Independent of turnpike's formatter.
pub fn parse_rfc3339_utc(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    if !matches!(rest, "Z" | "z" | "+00:00") {
        return None;
    }
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days from civil (H. Hinnant).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86400 + h * 3600 + mi * 60 + sec).ok()
}

// ---------------------------------------------------------------------------------- raw TURN client

const RTO: Duration = Duration::from_millis(300);
const RETRANSMITS: usize = 5;

/// A STUN response as received, parsed on demand.
#[derive(Clone)]
pub struct Reply(pub Vec<u8>);

impl Reply {
    pub fn msg(&self) -> Message<'_> {
        Message::parse(&self.0).expect("reply parses as STUN")
    }
    pub fn class(&self) -> Class {
        self.msg().class
    }
    pub fn code(&self) -> Option<u16> {
        self.attr(attr::ERROR_CODE)
            .map(|v| u16::from(v[2] & 7) * 100 + u16::from(v[3]))
    }
    pub fn attr(&self, kind: u16) -> Option<Vec<u8>> {
        self.msg().get(kind).map(|a| a.value.to_vec())
    }
    /// Every address attribute of `kind`, in order (a dual-stack Allocate answers with two
    /// XOR-RELAYED-ADDRESS attributes, RFC 8656 §7.1).
    pub fn xor_addrs(&self, kind: u16) -> Vec<SocketAddr> {
        let m = self.msg();
        m.attributes()
            .filter(|a| a.kind == kind)
            .map(|a| decode_xor_address(a.value, &m.transaction_id()).expect("address decodes"))
            .collect()
    }
    pub fn xor_addr(&self, kind: u16) -> SocketAddr {
        let m = self.msg();
        decode_xor_address(
            m.get(kind).expect("address attribute").value,
            &m.transaction_id(),
        )
        .expect("address decodes")
    }
    /// `(is success, error code)`.
    pub fn outcome(&self) -> (bool, Option<u16>) {
        (self.class() == Class::Success, self.code())
    }
    /// `(class, error code)` for compact assertions.
    pub fn class_code(&self) -> (Class, Option<u16>) {
        (self.class(), self.code())
    }
}

/// A minimal synchronous TURN client over UDP (one socket, one 5-tuple, long-term credentials,
/// MD5).
pub struct TurnClient {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub user: String,
    /// The long-term key requests are signed with.
    pub key: Vec<u8>,
    /// The nonce requests carry; empty until the first challenge.
    pub nonce: Vec<u8>,
    /// For tests of the wire protocol itself ([`TurnClient::new_strict`]): every challenge is
    /// checked in full, and a 438 goes back to the caller instead of being retried.
    strict: bool,
    n: u32,
}

impl TurnClient {
    pub fn new(server: SocketAddr, user: &str, password: &str) -> TurnClient {
        TurnClient::with_socket(
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            server,
            user,
            password,
        )
    }

    /// A client on a socket of the caller's (bound elsewhere, or inside a network namespace).
    pub fn with_socket(
        sock: UdpSocket,
        server: SocketAddr,
        user: &str,
        password: &str,
    ) -> TurnClient {
        TurnClient {
            sock,
            server,
            user: user.into(),
            key: long_term_key(PasswordAlgorithm::Md5, user, REALM, password)
                .as_bytes()
                .to_vec(),
            nonce: Vec::new(),
            strict: false,
            n: 0,
        }
    }

    /// A client that checks each 401 challenge in full (see [`TurnClient::challenge`]) and
    /// returns a 438 (stale nonce) to the caller rather than retrying with the new nonce.
    pub fn new_strict(server: SocketAddr, user: &str, password: &str) -> TurnClient {
        TurnClient {
            strict: true,
            ..TurnClient::new(server, user, password)
        }
    }

    pub fn local(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    /// A fresh transaction id.
    pub fn txid(&mut self) -> [u8; 12] {
        self.n += 1;
        let mut t = [0x6B; 12];
        t[..4].copy_from_slice(&self.n.to_be_bytes());
        t[4..8].copy_from_slice(&std::process::id().to_be_bytes());
        t
    }

    /// Sends a request and waits for the response with its transaction id, retransmitting.
    /// Other datagrams (relayed data) are discarded. None after all retransmissions.
    pub fn try_transact(&self, req: &[u8]) -> Option<Reply> {
        let txid = &req[8..20];
        let mut buf = vec![0u8; 2048];
        for _ in 0..RETRANSMITS {
            self.sock.send_to(req, self.server).unwrap();
            let deadline = Instant::now() + RTO;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                self.sock
                    .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                    .unwrap();
                let Ok((n, from)) = self.sock.recv_from(&mut buf) else {
                    break;
                };
                if from == self.server && n >= 20 && &buf[8..20] == txid {
                    return Some(Reply(buf[..n].to_vec()));
                }
            }
        }
        None
    }

    pub fn transact(&self, req: &[u8]) -> Reply {
        self.try_transact(req).unwrap_or_else(|| {
            panic!(
                "no response from the daemon to a request from {}",
                self.local()
            )
        })
    }

    pub fn binding(&mut self) -> Option<Reply> {
        let mut req = Vec::new();
        MessageWriter::new(&mut req, method::BINDING, Class::Request, self.txid());
        self.try_transact(&req)
    }

    /// Unauthenticated Allocate to fetch a nonce (expects 401). A strict client also checks
    /// that the 401 carries REALM, NONCE and PASSWORD-ALGORITHMS (MD5 and SHA-256), and no
    /// MESSAGE-INTEGRITY.
    pub fn challenge(&mut self) -> Reply {
        let mut req = Vec::new();
        MessageWriter::new(&mut req, method::ALLOCATE, Class::Request, self.txid())
            .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        let r = self.transact(&req);
        if self.strict {
            assert_eq!(r.class_code(), (Class::Error, Some(401)));
            assert_eq!(r.attr(attr::REALM).unwrap(), REALM.as_bytes());
            assert_eq!(
                r.attr(attr::PASSWORD_ALGORITHMS).unwrap(),
                [0, 1, 0, 0, 0, 2, 0, 0]
            );
            assert!(r.attr(attr::MESSAGE_INTEGRITY).is_none());
        } else {
            assert_eq!(r.code(), Some(401), "unauthenticated Allocate");
        }
        self.nonce = r.attr(attr::NONCE).expect("NONCE in 401");
        r
    }

    /// Appends USERNAME, REALM, NONCE and MESSAGE-INTEGRITY: signs `w` as this client.
    pub fn sign<'w, 'b>(&self, w: &'w mut MessageWriter<'b>) -> &'w mut MessageWriter<'b> {
        w.attr(attr::USERNAME, self.user.as_bytes())
            .attr(attr::REALM, REALM.as_bytes())
            .attr(attr::NONCE, &self.nonce)
            .integrity(&self.key)
    }

    /// An authenticated request; fetches a nonce first when it has none, and (unless strict)
    /// once more on 438.
    pub fn request(&mut self, m: u16, fill: impl Fn(&mut MessageWriter)) -> Reply {
        if self.nonce.is_empty() {
            self.challenge();
        }
        for _ in 0..2 {
            let mut req = Vec::new();
            let mut w = MessageWriter::new(&mut req, m, Class::Request, self.txid());
            fill(&mut w);
            self.sign(&mut w);
            let r = self.transact(&req);
            if r.code() == Some(438) && !self.strict {
                self.nonce = r.attr(attr::NONCE).expect("NONCE in 438");
                continue;
            }
            if r.class() == Class::Success {
                // Success responses are signed with the same long-term key.
                assert!(r.msg().verify_integrity(&self.key), "response integrity");
            }
            return r;
        }
        panic!("stale nonce twice in a row");
    }

    pub fn allocate(&mut self) -> Reply {
        self.request(method::ALLOCATE, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        })
    }

    /// A dual-stack Allocate (RFC 8656 §7.1): IPv4 plus ADDITIONAL-ADDRESS-FAMILY IPv6.
    pub fn allocate_dual(&mut self) -> Reply {
        self.request(method::ALLOCATE, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[0x02, 0, 0, 0]);
        })
    }

    /// Allocates and returns the relayed address; panics unless it succeeds.
    pub fn must_allocate(&mut self) -> SocketAddr {
        let r = self.allocate();
        assert_eq!(r.outcome(), (true, None), "Allocate as {}", self.user);
        r.xor_addr(attr::XOR_RELAYED_ADDRESS)
    }

    pub fn bind_channel(&mut self, channel: u16, peer: SocketAddr) -> Reply {
        self.request(method::CHANNEL_BIND, |w| {
            let c = channel.to_be_bytes();
            w.attr(attr::CHANNEL_NUMBER, &[c[0], c[1], 0, 0])
                .xor_address(attr::XOR_PEER_ADDRESS, peer);
        })
    }

    pub fn must_bind_channel(&mut self, channel: u16, peer: SocketAddr) {
        let r = self.bind_channel(channel, peer);
        assert_eq!(r.outcome(), (true, None), "ChannelBind to {peer}");
    }

    pub fn permit(&mut self, peer: SocketAddr) -> Reply {
        self.request(method::CREATE_PERMISSION, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        })
    }

    pub fn refresh(&mut self, lifetime: u32) -> Reply {
        self.request(method::REFRESH, |w| {
            w.u32_attr(attr::LIFETIME, lifetime);
        })
    }

    /// A Send indication carrying `data` to `peer`.
    pub fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) {
        let mut ind = Vec::new();
        MessageWriter::new(&mut ind, method::SEND, Class::Indication, self.txid())
            .xor_address(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, data);
        self.sock.send_to(&ind, self.server).unwrap();
    }

    /// The next datagram from the server, or None after `wait`.
    pub fn recv(&self, wait: Duration) -> Option<Vec<u8>> {
        self.sock.set_read_timeout(Some(wait)).unwrap();
        let mut buf = vec![0u8; 70_000];
        loop {
            let (n, from) = self.sock.recv_from(&mut buf).ok()?;
            if from == self.server {
                return Some(buf[..n].to_vec());
            }
        }
    }

    /// Discards whatever is queued (responses to junk, for instance).
    pub fn drain(&self) {
        while self.recv(Duration::from_millis(50)).is_some() {}
    }

    pub fn send_channel_data(&self, channel: u16, data: &[u8]) {
        self.sock
            .send_to(&channel_data(channel, data), self.server)
            .unwrap();
    }

    /// The payload of the next ChannelData frame on `channel`, or None after `wait`.
    pub fn recv_channel_data(&self, channel: u16, wait: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 70_000];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let Ok((n, from)) = self.sock.recv_from(&mut buf) else {
                return None;
            };
            if from == self.server && n >= 4 && buf[..2] == channel.to_be_bytes() {
                let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
                return buf.get(4..4 + len).map(<[u8]>::to_vec);
            }
        }
        None
    }

    /// Sends `count` distinct payloads on `channel` and checks each comes back (through an
    /// echo peer) before sending the next.
    pub fn echo_round_trips(&self, channel: u16, count: usize) {
        for i in 0..count {
            let payload = format!("round trip {i} from {}", self.local()).into_bytes();
            self.send_channel_data(channel, &payload);
            let back = self
                .recv_channel_data(channel, Duration::from_secs(2))
                .unwrap_or_else(|| panic!("no echo for round trip {i}"));
            assert_eq!(back, payload, "round trip {i}");
        }
    }
}

/// A ChannelData frame.
pub fn channel_data(channel: u16, data: &[u8]) -> Vec<u8> {
    let mut frame = channel.to_be_bytes().to_vec();
    frame.extend_from_slice(&(data.len() as u16).to_be_bytes());
    frame.extend_from_slice(data);
    frame
}

/// A UDP echo peer on loopback in its own thread; counts what it echoed. Stops on drop, or
/// after 120 s at the latest.
pub struct EchoPeer {
    pub addr: SocketAddr,
    pub echoed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoPeer {
    pub fn start() -> EchoPeer {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let echoed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, flag) = (Arc::clone(&echoed), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut buf = vec![0u8; 70_000];
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        EchoPeer {
            addr,
            echoed,
            stop,
            thread: Some(thread),
        }
    }

    pub fn count(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------------------ signaling example

/// `target/<profile>/examples/signaling`, next to the `turnpike` binary this test runs; panics
/// when it is missing or older than a file under `examples/signaling`.
pub fn example_binary() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_turnpike"));
    let path = bin
        .parent()
        .expect("binary directory")
        .join("examples")
        .join(format!("signaling{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "example binary {} is missing: build it with `cargo build --release --examples` \
         (scripts/test.sh does; `cargo build --example signaling` for a debug `cargo test`). \
         A plain `cargo test` builds it; `cargo test --test <name>` alone does not",
        path.display()
    );
    // Catch the other half of that trap: sources edited since the build. The pages are
    // embedded in the binary too: a stale build tests old JS.
    let built = path.metadata().and_then(|m| m.modified()).ok();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/signaling");
    if let (Some(built), Ok(entries)) = (built, walk(&src)) {
        for file in entries {
            let newer = file
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > built);
            assert!(
                !newer,
                "example binary {} is older than {}: rebuild with `cargo build --example \
                 signaling` (with --release for `cargo test --release`)",
                path.display(),
                file.display()
            );
        }
    }
    path
}

/// Every file below `dir`.
fn walk(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(walk(&path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}

/// Collects a child's piped stderr on a thread, as it comes.
pub fn collect_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let mut stderr = child.stderr.take().expect("stderr piped");
    let sink = Arc::clone(&buf);
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    buf
}

/// The address in the signaling example's `signaling listening on http://ADDR` line on its
/// piped stdout, or None when it prints none within `within`.
pub fn signaling_listen_addr(child: &mut Child, within: Duration) -> Option<String> {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.strip_prefix("signaling listening on http://") {
                let _ = tx.send(addr.trim().to_owned());
            }
        }
    });
    rx.recv_timeout(within).ok()
}

// ---------------------------------------------------------------------------------- TURN over TCP and TLS

/// A byte stream a [`StreamClient`] speaks TURN over: a plain `TcpStream`, or rustls over one.
pub trait Duplex: Read + Write + Send {}
impl<T: Read + Write + Send> Duplex for T {}

/// How long a stream client waits for a response before it calls the request lost.
const STREAM_REPLY_WAIT: Duration = Duration::from_secs(10);

/// The length of the whole frame at the start of `buf` as RFC 8656 §11.5 frames a stream: a
/// STUN message (20 + length) or ChannelData padded to 4 bytes. None until 4 bytes are there.
/// Computed here, independently of the daemon's codec.
pub fn stream_frame_len(buf: &[u8]) -> Option<usize> {
    let head = buf.get(..4)?;
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    Some(match head[0] >> 6 {
        0 => 20 + len,
        _ => 4 + len.div_ceil(4) * 4,
    })
}

/// A minimal synchronous TURN client over one TCP connection, plain or TLS (long-term
/// credentials, MD5). Frames that arrive while it waits for a response (relayed data) are kept
/// for [`StreamClient::recv_channel_data`] and [`StreamClient::recv_data`].
pub struct StreamClient {
    io: Box<dyn Duplex>,
    /// The socket under `io`, for read timeouts.
    tcp: TcpStream,
    buf: Vec<u8>,
    backlog: std::collections::VecDeque<Vec<u8>>,
    pub user: String,
    pub key: Vec<u8>,
    pub nonce: Vec<u8>,
    n: u32,
}

/// Connects to `addr` over TCP, within 5 s.
pub fn tcp_connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_nodelay(true).unwrap();
    s
}

/// Connects from `local` (an address of this host, port 0 for any) to `addr`.
pub fn tcp_connect_from(local: SocketAddr, addr: SocketAddr) -> TcpStream {
    tcp_connect_with(Some(local), None, addr)
}

/// Connects to `addr` from `local` (None: any) with a receive buffer of `rcvbuf` bytes (None:
/// the kernel's default; a small one makes a slow reader quickly).
pub fn tcp_connect_with(
    local: Option<SocketAddr>,
    rcvbuf: Option<usize>,
    addr: SocketAddr,
) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    if let Some(local) = local {
        s.bind(&local.into())
            .unwrap_or_else(|e| panic!("bind {local}: {e}"));
    }
    if let Some(size) = rcvbuf {
        s.set_recv_buffer_size(size).unwrap();
    }
    s.connect_timeout(&addr.into(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let s: TcpStream = s.into();
    s.set_nodelay(true).unwrap();
    s
}

impl StreamClient {
    /// Plain TURN over TCP to `addr`.
    pub fn plain(addr: SocketAddr) -> StreamClient {
        let tcp = tcp_connect(addr);
        StreamClient::over(Box::new(tcp.try_clone().unwrap()), tcp)
    }

    /// TURN over `io`, whose socket is `tcp` (a clone of it: the client sets its timeouts).
    pub fn over(io: Box<dyn Duplex>, tcp: TcpStream) -> StreamClient {
        StreamClient {
            io,
            tcp,
            buf: Vec::new(),
            backlog: Default::default(),
            user: USER.into(),
            key: long_term_key(PasswordAlgorithm::Md5, USER, REALM, PASSWORD)
                .as_bytes()
                .to_vec(),
            nonce: Vec::new(),
            n: 0,
        }
    }

    /// TURN over TLS to `addr` as `tls` says; the client and what the handshake settled.
    pub fn tls(addr: SocketAddr, tls: &TlsClient) -> (StreamClient, TlsInfo) {
        let tcp = tcp_connect(addr);
        StreamClient::tls_over(tcp, tls)
    }

    /// TLS on a connection the caller opened (and may have written a PROXY header to).
    pub fn tls_over(tcp: TcpStream, tls: &TlsClient) -> (StreamClient, TlsInfo) {
        let clone = tcp.try_clone().unwrap();
        let (stream, info) = tls
            .connect(tcp)
            .unwrap_or_else(|e| panic!("TLS handshake with the daemon: {e}"));
        (StreamClient::over(Box::new(stream), clone), info)
    }

    /// TLS whose ClientHello follows `prefix` in writes of at most `piece` bytes
    /// ([`TlsClient::connect_split`]).
    pub fn tls_split(
        tcp: TcpStream,
        tls: &TlsClient,
        prefix: &[u8],
        piece: usize,
    ) -> (StreamClient, TlsInfo) {
        let clone = tcp.try_clone().unwrap();
        let (stream, info) = tls
            .connect_split(tcp, prefix, piece)
            .unwrap_or_else(|e| panic!("TLS handshake with the daemon: {e}"));
        (StreamClient::over(Box::new(stream), clone), info)
    }

    pub fn local(&self) -> SocketAddr {
        self.tcp.local_addr().unwrap()
    }

    /// A fresh transaction id.
    pub fn txid(&mut self) -> [u8; 12] {
        self.n += 1;
        let mut t = [0x5A; 12];
        t[..4].copy_from_slice(&self.n.to_be_bytes());
        t[4..8].copy_from_slice(&std::process::id().to_be_bytes());
        t
    }

    /// Writes raw bytes as they are (a PROXY header, garbage, a frame).
    pub fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes)?;
        self.io.flush()
    }

    /// Writes one frame, ChannelData padded to 4 bytes as streams require.
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let mut padded = frame.to_vec();
        if frame[0] >> 6 == 1 {
            padded.resize(frame.len().div_ceil(4) * 4, 0);
        }
        self.write_raw(&padded)
    }

    /// The next frame, or Ok(None) after `wait`; an error when the stream ended or broke.
    pub fn read_frame(&mut self, wait: Duration) -> std::io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + wait;
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            if let Some(len) = stream_frame_len(&self.buf) {
                if self.buf.len() >= len {
                    return Ok(Some(self.buf.drain(..len).collect()));
                }
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Ok(None);
            };
            self.tcp
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            match self.io.read(&mut chunk) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends a request and waits for the response with its transaction id; other frames go to
    /// the backlog. An error when the connection ends or no response comes within 10 s.
    pub fn try_transact(&mut self, req: &[u8]) -> std::io::Result<Reply> {
        self.write_frame(req)?;
        let deadline = Instant::now() + STREAM_REPLY_WAIT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(frame) = self.read_frame(left)? else {
                break;
            };
            if frame[0] >> 6 == 0 && frame.len() >= 20 && frame[8..20] == req[8..20] {
                return Ok(Reply(frame));
            }
            self.backlog.push_back(frame);
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no response within 10 s",
        ))
    }

    pub fn transact(&mut self, req: &[u8]) -> Reply {
        let local = self.local();
        self.try_transact(req)
            .unwrap_or_else(|e| panic!("request over the connection from {local}: {e}"))
    }

    /// A Binding request; its response, or why none came.
    pub fn binding(&mut self) -> std::io::Result<Reply> {
        let mut req = Vec::new();
        MessageWriter::new(&mut req, method::BINDING, Class::Request, self.txid());
        self.try_transact(&req)
    }

    /// XOR-MAPPED-ADDRESS of a successful Binding; panics otherwise.
    pub fn mapped(&mut self) -> SocketAddr {
        let r = self.binding().expect("Binding over the connection");
        assert_eq!(r.outcome(), (true, None), "Binding");
        r.xor_addr(attr::XOR_MAPPED_ADDRESS)
    }

    /// Unauthenticated Allocate for a nonce (expects 401).
    pub fn challenge(&mut self) -> Reply {
        let mut req = Vec::new();
        MessageWriter::new(&mut req, method::ALLOCATE, Class::Request, self.txid())
            .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        let r = self.transact(&req);
        assert_eq!(r.code(), Some(401), "unauthenticated Allocate");
        self.nonce = r.attr(attr::NONCE).expect("NONCE in 401");
        r
    }

    /// An authenticated request; fetches a nonce first when it has none, once more on 438.
    pub fn request(&mut self, m: u16, fill: impl Fn(&mut MessageWriter)) -> Reply {
        if self.nonce.is_empty() {
            self.challenge();
        }
        for _ in 0..2 {
            let mut req = Vec::new();
            let mut w = MessageWriter::new(&mut req, m, Class::Request, self.txid());
            fill(&mut w);
            w.attr(attr::USERNAME, self.user.as_bytes())
                .attr(attr::REALM, REALM.as_bytes())
                .attr(attr::NONCE, &self.nonce)
                .integrity(&self.key);
            let r = self.transact(&req);
            if r.code() == Some(438) {
                self.nonce = r.attr(attr::NONCE).expect("NONCE in 438");
                continue;
            }
            if r.class() == Class::Success {
                assert!(r.msg().verify_integrity(&self.key), "response integrity");
            }
            return r;
        }
        panic!("stale nonce twice in a row");
    }

    pub fn allocate(&mut self) -> Reply {
        self.request(method::ALLOCATE, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        })
    }

    /// Allocates; the relayed address. Panics unless it succeeds.
    pub fn must_allocate(&mut self) -> SocketAddr {
        let r = self.allocate();
        assert_eq!(r.outcome(), (true, None), "Allocate over a stream");
        r.xor_addr(attr::XOR_RELAYED_ADDRESS)
    }

    pub fn must_permit(&mut self, peer: SocketAddr) {
        let r = self.request(method::CREATE_PERMISSION, |w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        });
        assert_eq!(r.outcome(), (true, None), "CreatePermission for {peer}");
    }

    pub fn must_bind_channel(&mut self, channel: u16, peer: SocketAddr) {
        let r = self.request(method::CHANNEL_BIND, |w| {
            let c = channel.to_be_bytes();
            w.attr(attr::CHANNEL_NUMBER, &[c[0], c[1], 0, 0])
                .xor_address(attr::XOR_PEER_ADDRESS, peer);
        });
        assert_eq!(r.outcome(), (true, None), "ChannelBind to {peer}");
    }

    /// A Send indication carrying `data` to `peer`.
    pub fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) -> std::io::Result<()> {
        let mut ind = Vec::new();
        MessageWriter::new(&mut ind, method::SEND, Class::Indication, self.txid())
            .xor_address(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, data);
        self.write_frame(&ind)
    }

    pub fn send_channel_data(&mut self, channel: u16, data: &[u8]) -> std::io::Result<()> {
        self.write_frame(&channel_data(channel, data))
    }

    /// The next frame, from the backlog first.
    fn next_frame(&mut self, deadline: Instant) -> std::io::Result<Option<Vec<u8>>> {
        if let Some(f) = self.backlog.pop_front() {
            return Ok(Some(f));
        }
        match deadline.checked_duration_since(Instant::now()) {
            Some(left) => self.read_frame(left),
            None => Ok(None),
        }
    }

    /// The payload of the next ChannelData frame on `channel` (others are discarded), or
    /// None after `wait`.
    pub fn recv_channel_data(
        &mut self,
        channel: u16,
        wait: Duration,
    ) -> std::io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + wait;
        while let Some(f) = self.next_frame(deadline)? {
            if f[..2] == channel.to_be_bytes() {
                let len = usize::from(u16::from_be_bytes([f[2], f[3]]));
                return Ok(f.get(4..4 + len).map(<[u8]>::to_vec));
            }
        }
        Ok(None)
    }

    /// The peer and payload of the next Data indication (other frames are discarded), or None
    /// after `wait`.
    pub fn recv_data(&mut self, wait: Duration) -> std::io::Result<Option<(SocketAddr, Vec<u8>)>> {
        let deadline = Instant::now() + wait;
        while let Some(f) = self.next_frame(deadline)? {
            let Ok(m) = Message::parse(&f) else { continue };
            if m.method == method::DATA && m.class == Class::Indication {
                let peer = m
                    .get(attr::XOR_PEER_ADDRESS)
                    .and_then(|a| decode_xor_address(a.value, &m.transaction_id()))
                    .expect("XOR-PEER-ADDRESS in a Data indication");
                let data = m.get(attr::DATA).expect("DATA in a Data indication");
                return Ok(Some((peer, data.value.to_vec())));
            }
        }
        Ok(None)
    }

    /// Sends `count` distinct payloads on `channel` and checks each comes back (through an echo
    /// peer) within `wait`, before sending the next.
    pub fn echo_round_trips(&mut self, channel: u16, count: usize, wait: Duration) {
        for i in 0..count {
            let payload = format!("stream round trip {i} from {}", self.local()).into_bytes();
            self.send_channel_data(channel, &payload).expect("send");
            let back = self
                .recv_channel_data(channel, wait)
                .expect("the connection stays up")
                .unwrap_or_else(|| panic!("no echo for round trip {i}"));
            assert_eq!(back, payload, "round trip {i}");
        }
    }

    /// Waits until the server closes the connection (end of stream or reset): true, or false
    /// when it is still open after `wait`. Whatever arrives meanwhile is discarded.
    pub fn closed_by_server(&mut self, wait: Duration) -> bool {
        wait_closed(&mut *self.io, &self.tcp, wait)
    }
}

/// Reads from `io` (on socket `tcp`) until the end of the stream or an error: true, or false
/// when neither came within `wait`.
pub fn wait_closed(io: &mut dyn Read, tcp: &TcpStream, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut chunk = [0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        tcp.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match io.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// A rustls client: which CA it trusts, the ALPN protocols it offers, the TLS versions it
/// speaks and the name it asks for.
#[derive(Clone)]
pub struct TlsClient {
    /// PEM file of the CA certificate(s) to trust.
    pub ca: PathBuf,
    pub alpn: Vec<Vec<u8>>,
    pub versions: Vec<&'static rustls::SupportedProtocolVersion>,
    /// An IP literal or a DNS name in the server's certificate.
    pub server_name: String,
}

/// What a TLS handshake settled.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    pub alpn: Option<Vec<u8>>,
    pub version: Option<rustls::ProtocolVersion>,
    /// DER of the leaf certificate the server presented.
    pub peer_cert: Vec<u8>,
}

impl TlsClient {
    /// Trusts `cert`'s CA, offers `stun.turn`, speaks TLS 1.2 and 1.3, asks for 127.0.0.1.
    pub fn new(cert: &TestCert) -> TlsClient {
        TlsClient {
            ca: cert.ca.clone(),
            alpn: vec![b"stun.turn".to_vec()],
            versions: vec![&rustls::version::TLS13, &rustls::version::TLS12],
            server_name: "127.0.0.1".into(),
        }
    }

    pub fn alpn(mut self, protocols: &[&[u8]]) -> TlsClient {
        self.alpn = protocols.iter().map(|p| p.to_vec()).collect();
        self
    }

    pub fn versions(mut self, v: &[&'static rustls::SupportedProtocolVersion]) -> TlsClient {
        self.versions = v.to_vec();
        self
    }

    pub fn server_name(mut self, name: &str) -> TlsClient {
        self.server_name = name.into();
        self
    }

    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.ca).expect("read the CA file") {
            roots.add(c.expect("CA PEM")).expect("CA certificate");
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&self.versions)
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = self.alpn.clone();
        Arc::new(config)
    }

    /// A client connection not yet started, for tests that drive the bytes themselves.
    pub fn connection(&self) -> rustls::ClientConnection {
        let name =
            rustls::pki_types::ServerName::try_from(self.server_name.clone()).expect("server name");
        rustls::ClientConnection::new(self.config(), name).expect("client connection")
    }

    /// The handshake on `tcp`, within 10 s.
    pub fn connect(
        &self,
        tcp: TcpStream,
    ) -> std::io::Result<(
        rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
        TlsInfo,
    )> {
        self.connect_split(tcp, &[], usize::MAX)
    }

    /// The handshake on `tcp`, its first flight (the ClientHello) sent after `prefix` (a PROXY
    /// header, say) in writes of at most `piece` bytes; the rest as [`TlsClient::connect`].
    pub fn connect_split(
        &self,
        mut tcp: TcpStream,
        prefix: &[u8],
        piece: usize,
    ) -> std::io::Result<(
        rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
        TlsInfo,
    )> {
        let mut conn = self.connection();
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
        let mut first = prefix.to_vec();
        while conn.wants_write() {
            conn.write_tls(&mut first)?;
        }
        for chunk in first.chunks(piece.max(1)) {
            tcp.write_all(chunk)?;
            tcp.flush()?;
        }
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        // Anything the handshake left to write (TLS 1.2's client Finished is written above).
        while conn.wants_write() {
            conn.write_tls(&mut tcp)?;
        }
        let info = TlsInfo {
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            version: conn.protocol_version(),
            peer_cert: conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec())
                .unwrap_or_default(),
        };
        Ok((rustls::StreamOwned::new(conn, tcp), info))
    }
}

impl Daemon {
    /// Polls `/metrics` until `series` satisfies `pred`; its value then. Panics with the last
    /// value after `timeout`.
    pub fn wait_metric_until(
        &self,
        series: &str,
        timeout: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.metrics().get(series).copied();
            if let Some(v) = now.filter(|v| pred(*v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{series} is {now:?}, still not as expected after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's resident set size in KiB (`VmRSS` in /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }
}

/// The Python for tests that need PyPI packages: `$TURNPIKE_PYTHON`, else
/// `target/py-aiortc/bin/python3` (scripts/test.sh makes that virtual environment, with aiortc
/// and its aioice), else `python3` on PATH; the first that runs `check` (a Python statement)
/// without error. Err lists why each candidate failed.
pub fn find_python(check: &str) -> Result<PathBuf, String> {
    let target = Path::new(env!("CARGO_BIN_EXE_turnpike"))
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"));
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("TURNPIKE_PYTHON") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(target.join("py-aiortc/bin/python3"));
    candidates.push(PathBuf::from("python3"));
    let mut why = Vec::new();
    for py in candidates {
        match Command::new(&py)
            .args(["-c", check])
            .stdin(Stdio::null())
            .output()
        {
            Ok(o) if o.status.success() => return Ok(py),
            Ok(o) => why.push(format!(
                "{}: {}",
                py.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => why.push(format!("{}: {e}", py.display())),
        }
    }
    Err(why.join("; "))
}
