//! Helpers shared by the config modules' tests.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Config, ConfigError};

pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "t.toml")
}

/// The error text for `text`, which must fail.
pub(super) fn err(text: &str) -> String {
    match parse(text) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// Asserts that `text` fails with a message naming `key` on `line`.
pub(super) fn fails(text: &str, line: usize, key: &str) -> String {
    let message = err(text);
    assert!(
        message.contains(&format!("t.toml:{line}: ")),
        "expected line {line} in: {message}"
    );
    assert!(message.contains(key), "expected {key} in: {message}");
    message
}

/// A file in the temporary directory, removed on drop.
pub(super) struct TempFile(pub(super) PathBuf);

impl TempFile {
    pub(super) fn new(contents: &[u8]) -> TempFile {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "turnpike-config-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A file that sets most keys away from their defaults, with two users holding secrets.
pub(super) const FULL: &str = r#"
realm = "example.org"
software = "turnpike"
threads = 4
listen = ["0.0.0.0:3478", "[::]:3478", "127.0.0.1:0", "127.0.0.1:0"]
log_format = "json"
log_level = "info,turnpike=debug"

[relay]
address = "192.0.2.10"
address_v6 = "2001:db8::10"
external_address = "203.0.113.7"
external_address_v6 = "2001:db8:1::7"
port_min = 40000
port_max = 40999

[auth]
nonce_lifetime_secs = 300
secret_file = "/etc/turnpike/secrets"
secret_env = "TURNPIKE_SECRETS"
rest_separator = "-"
rest_max_ttl_secs = 3600

[[auth.users]]
name = "alice"
password = "alice-pass"

[[auth.users]]
name = "bob"
key = "0x0123456789ABCDEF0123456789abcdef"

[limits]
allocations_per_user = 0
total_allocations = 5
permissions_per_allocation = 8
channels_per_allocation = 4096
default_lifetime_secs = 60
max_lifetime_secs = 86400
permission_lifetime_secs = 3600
channel_lifetime_secs = 3600
allocation_bandwidth_bytes_per_sec = 1000000
unauth_replies_per_sec = 0
unauth_replies_burst = 0

[peers]
allow = ["10.0.0.0/8", "203.0.113.0/24", "198.18.0.0/15", "fd00::/8", "192.168.1.5"]
deny = ["10.9.0.0/16", "2001:db8:dead::/48"]
allow_loopback_peers = true
"#;
