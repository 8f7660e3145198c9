//! turnpike as the firewall tests run it (`tests/firewall_call.rs`, `tests/browser_call.rs`):
//! inside `pub` of a [`NatKind::UdpBlocked`](crate::netns::NatKind) network, with a TLS listener
//! on 203.0.113.10:443 (TLS and plain TCP on one port) serving a certificate for that IP from a
//! CA made for the run, UDP and TCP listeners on :3478 that the firewall must keep the callers
//! from, REST credentials, and the control plane on the loopback of `pub`.
//!
//! The including test declares `mod common;` and `mod netns;` (tests/nat/netns.rs) at its root.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use turnpike::config::{Config, LogFormat, RelayIp};

use crate::common::{TempDir, TestCert};
use crate::netns::{self, NsProcess, Topology, SERVER_IP};

pub const SECRET: &str = "firewall-test-rest-secret-0123456789";
pub const TLS_PORT: u16 = 443;
/// UDP and TCP listeners the firewall must keep the callers from.
pub const BLOCKED_PORT: u16 = 3478;
/// The control plane, on the loopback of `pub`.
pub const API_ADDR: &str = "127.0.0.1:9641";
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// The running daemon. Drop it before the [`Topology`] (declare it after).
pub struct Server {
    pub turnpike: NsProcess,
    /// `cert.ca`: the CA the callers must trust; SAN of the leaf: 203.0.113.10.
    pub cert: TestCert,
    _dir: TempDir,
}

impl Server {
    pub fn start(topo: &Topology, tag: &str) -> Server {
        let cert = TestCert::with_names(&[&SERVER_IP.to_string()], 30);
        let dir = TempDir::new(&format!("firewall-{tag}"));
        let config = write_config(dir.path(), &cert);
        let ready_file = dir.path().join("turnpike.ready");
        let mut turnpike = NsProcess::spawn(
            &topo.ns("pub"),
            "turnpike",
            Path::new(env!("CARGO_BIN_EXE_turnpike")),
            &[
                "serve",
                "--config",
                config.to_str().expect("utf-8 temp path"),
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
        Server {
            turnpike,
            cert,
            _dir: dir,
        }
    }

    /// A REST credential (username, password) for `user`, valid for an hour.
    pub fn credential(&self, user: &str) -> (String, String) {
        turnpike::proto::auth::mint_rest_credential(
            SECRET.as_bytes(),
            user,
            crate::common::unix_now() + 3600,
            ':',
        )
    }

    /// JSON log lines of turnpike whose message is `message`.
    pub fn events(&self, message: &str) -> Vec<Value> {
        self.turnpike
            .lines()
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

    pub fn log(&self) -> String {
        self.turnpike.log()
    }
}

fn write_config(dir: &Path, cert: &TestCert) -> PathBuf {
    let secret = dir.join("rest-secret");
    std::fs::write(&secret, format!("{SECRET}\n")).expect("write secret");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod the secret");
    let mut c = Config {
        realm: "turnpike.firewall".into(),
        threads: 2,
        listen: vec![(SERVER_IP, BLOCKED_PORT).into()],
        tcp_listen: vec![(SERVER_IP, BLOCKED_PORT).into()],
        tls_listen: vec![(SERVER_IP, TLS_PORT).into()],
        log_format: LogFormat::Json,
        log_level: std::env::var("TURNPIKE_TEST_LOG").unwrap_or_else(|_| "info".into()),
        drain_secs: 0,
        ..Config::default()
    };
    c.tls.cert_file = Some(cert.cert.clone());
    c.tls.key_file = Some(cert.key.clone());
    c.relay.address = RelayIp::Ip(SERVER_IP);
    c.auth.secret_file = Some("rest-secret".into());
    c.api.listen = Some(API_ADDR.parse().unwrap());
    // The test hosts use documentation ranges; re-open them so they count as public.
    c.peers.allow = ["203.0.113.0/24", "192.0.2.0/24", "198.51.100.0/24"]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
    let config = dir.join("turnpike.toml");
    std::fs::write(&config, crate::common::config_toml(&c)).expect("write config");
    config
}

/// Runs `f` on a thread inside namespace `ns` and waits for it (bounded).
pub fn in_ns<T: Send + 'static>(
    ns: &str,
    what: &str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    netns::spawn_in(ns, what, f)?.join(Duration::from_secs(20))?
}

/// turnpike's `/metrics`, fetched from inside `pub`.
pub fn metrics(topo: &Topology) -> Result<BTreeMap<String, f64>, String> {
    let addr: SocketAddr = API_ADDR.parse().unwrap();
    let text = in_ns(&topo.ns("pub"), "metrics", move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: turnpike\r\nConnection: close\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .map_err(|e| format!("reading /metrics: {e}"))?;
        Ok(out)
    })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or("no HTTP body from /metrics")?;
    crate::common::parse_prometheus(body)
}

/// A field of a JSON log line (top level or under "fields"), or "".
pub fn str_field<'a>(e: &'a Value, name: &str) -> &'a str {
    e.get(name)
        .or_else(|| e.get("fields").and_then(|f| f.get(name)))
        .and_then(Value::as_str)
        .unwrap_or("")
}
