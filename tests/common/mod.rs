//! Test harness: runs the real `turnpike` binary on loopback with a config written to a temp
//! dir, learns its port from the log, and stops it on drop.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const REALM: &str = "turnpike.test";
pub const USER: &str = "alice";
pub const PASSWORD: &str = "wonderland";
/// REST secret (>= 16 bytes, as the daemon requires).
pub const SECRET: &str = "0123456789abcdef-integration-secret";
/// Default `auth.rest_max_ttl_secs`.
pub const REST_MAX_TTL_SECS: u64 = 172_800;

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
    /// 0 = no rate limit on 401/438, so tests that need many nonces are not throttled.
    pub unauth_replies_per_sec: u32,
    /// Raw TOML appended to the `[limits]` table.
    pub extra_limits: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            allow_loopback_peers: true,
            allocations_per_user: 10,
            unauth_replies_per_sec: 0,
            extra_limits: String::new(),
        }
    }
}

/// A running daemon. Dropping it sends SIGTERM, then SIGKILL after a grace period.
pub struct Daemon {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub relay_ports: (u16, u16),
    log: Arc<Mutex<Vec<String>>>,
    dir: PathBuf,
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

/// The UDP listener in a log line such as `{"message":"listening","addr":"127.0.0.1:4242",
/// "transport":"udp",..}` (JSON) or `listening addr=127.0.0.1:4242 transport="udp"` (text,
/// maybe with colour codes).
fn listening_addr(line: &str) -> Option<SocketAddr> {
    if !line.contains("listening") {
        return None;
    }
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        // Only the UDP STUN/TURN listener, not an HTTP API that may log "listening" too.
        let transport = v
            .get("transport")
            .or_else(|| v.pointer("/fields/transport"));
        if transport.and_then(|t| t.as_str()) != Some("udp") {
            return None;
        }
        if let Some(a) = v.get("addr").and_then(|a| a.as_str()) {
            return a.parse().ok();
        }
        if let Some(a) = v.pointer("/fields/addr").and_then(|a| a.as_str()) {
            return a.parse().ok();
        }
    }
    let plain = strip_ansi(line);
    if !plain.contains("transport=\"udp\"") && !plain.contains("transport=udp") {
        return None;
    }
    let rest = &plain[plain.find("addr")? + 4..];
    let rest = rest.trim_start_matches([' ', '=', ':', '"']);
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '"' || c == ',')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI sequence: ESC [ params final-byte(@..~)
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::with(Options::default())
    }

    pub fn with(opts: Options) -> Daemon {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let block = (std::process::id().wrapping_mul(7).wrapping_add(n)) % RELAY_BLOCKS;
        let port_min = 20000 + block as u16 * RELAY_BLOCK;
        let relay_ports = (port_min, port_min + RELAY_BLOCK - 1);

        let dir = std::env::temp_dir().join(format!("turnpike-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        std::fs::write(dir.join("secret.txt"), format!("{SECRET}\n")).expect("write secret");
        // TURNPIKE_TEST_LOG=debug (or trace) when a test needs the daemon's reasons.
        let log_level = std::env::var("TURNPIKE_TEST_LOG").unwrap_or_else(|_| "info".into());
        let mut cfg = String::new();
        write!(
            cfg,
            r#"realm = "{REALM}"
threads = 2
listen = ["127.0.0.1:0"]
log_format = "json"
log_level = "{}"
drain_secs = 0 # tests stop the daemon at once, no graceful drain

[relay]
address = "127.0.0.1"
port_min = {}
port_max = {}

[auth]
secret_file = "secret.txt"

[[auth.users]]
name = "{USER}"
password = "{PASSWORD}"

[limits]
allocations_per_user = {}
unauth_replies_per_sec = {}
{}

[peers]
allow_loopback_peers = {}
"#,
            log_level,
            relay_ports.0,
            relay_ports.1,
            opts.allocations_per_user,
            opts.unauth_replies_per_sec,
            opts.extra_limits,
            opts.allow_loopback_peers,
        )
        .unwrap();
        let config = dir.join("turnpike.toml");
        std::fs::write(&config, cfg).expect("write config");

        let mut child = Command::new(env!("CARGO_BIN_EXE_turnpike"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
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

        let mut d = Daemon {
            child: Some(child),
            addr: "0.0.0.0:0".parse().unwrap(),
            relay_ports,
            log,
            dir,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let lines = d.log_lines();
            if let Some(a) = lines.iter().find_map(|l| listening_addr(l)) {
                d.addr = a;
            }
            if d.addr.port() != 0 && lines.iter().any(|l| l.contains("turnpike ready")) {
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

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
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
        self.child.as_ref().unwrap().id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on the pid of a child we spawned and have not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_GRACE;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
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
