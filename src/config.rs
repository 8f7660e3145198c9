//! Configuration: the TOML schema, its defaults, validation, REST secret
//! loading and a redacted printout of the effective configuration.
//!
//! The file is read in two layers. The private `raw` types mirror the file one
//! to one (strings for addresses and CIDRs, `i64` for every integer), so serde
//! only ever reports syntax errors, wrong types and unknown keys. Everything
//! semantic happens while converting `raw` into the public types, where we
//! choose the wording, can name the key and find its line, and can keep secret
//! values out of every message. The same `raw` types, filled from a `Config`,
//! print the effective configuration, so the printout always re-parses.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use toml::de::{DeTable, DeValue};

/// What `to_redacted_toml` writes in place of a password or key.
pub const REDACTED: &str = "<redacted>";

/// Shortest REST secret accepted. REST passwords are HMAC-SHA1(secret,
/// username) and are handed to every web client, so anyone holding one
/// credential can brute-force a short secret offline and mint credentials at
/// will. 16 bytes of a random hex or base64 string is out of that reach.
pub const MIN_REST_SECRET_LEN: usize = 16;

/// STUN USERNAME must be fewer than 509 bytes (RFC 8489 section 14.3).
const MAX_USERNAME_BYTES: usize = 508;
/// REALM and SOFTWARE must be fewer than 128 characters (RFC 8489 14.9, 14.14).
const MAX_REALM_CHARS: usize = 127;
/// REALM may take up to 763 bytes once quoted-string escapes are decoded.
const MAX_REALM_BYTES: usize = 763;

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

/// The daemon's configuration, defaults filled in and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub realm: String,
    /// SOFTWARE attribute value; empty means the attribute is never sent.
    pub software: String,
    /// Number of I/O shards; 0 means one per CPU core.
    pub threads: usize,
    pub listen: Vec<SocketAddr>,
    pub log_format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive; only checked for being
    /// non-empty and printable here, the daemon parses it.
    pub log_level: String,
    /// Host name or address put in minted credentials' URIs; empty = the advertised relay address.
    pub public_host: String,
    /// On SIGTERM, how long existing allocations may keep relaying before the process exits.
    pub drain_secs: u64,
    pub relay: RelayConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub peers: PeersConfig,
    pub api: ApiConfig,
}

/// The HTTP control plane: health, metrics, credential minting and admin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// None = no HTTP listener at all.
    pub listen: Option<SocketAddr>,
    /// Bearer token for /api/v1; None = the /api/v1 routes are refused.
    pub token_file: Option<PathBuf>,
    pub default_ttl_secs: u64,
    pub max_ttl_secs: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: None,
            token_file: None,
            default_ttl_secs: 3600,
            max_ttl_secs: 86400,
        }
    }
}

/// Bearer tokens shorter than this are refused: the token guards credential minting.
pub const MIN_API_TOKEN_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    pub address: RelayAddress,
    pub address_v6: Option<Ipv6Addr>,
    pub external_address: Option<Ipv4Addr>,
    pub external_address_v6: Option<Ipv6Addr>,
    /// Inclusive relay port range.
    pub port_min: u16,
    pub port_max: u16,
}

/// The IPv4 address relay sockets bind to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayAddress {
    /// The address of the interface holding the default route; the daemon
    /// resolves it at start.
    Auto,
    Ip(Ipv4Addr),
}

impl fmt::Display for RelayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayAddress::Auto => f.write_str("auto"),
            RelayAddress::Ip(ip) => ip.fmt(f),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    pub nonce_lifetime_secs: u64,
    /// File of REST secrets. `Config::load` resolves a relative path against
    /// the config file's directory; `Config::parse` leaves it as written.
    pub secret_file: Option<PathBuf>,
    /// Environment variable holding REST secrets.
    pub secret_env: Option<String>,
    /// Separator between expiry and user in REST usernames.
    pub rest_separator: char,
    pub rest_max_ttl_secs: u64,
    pub users: Vec<UserEntry>,
}

/// A static long-term-credential user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    pub name: String,
    pub secret: UserSecret,
}

#[derive(Clone, PartialEq, Eq)]
pub enum UserSecret {
    /// Plain password; the key is MD5(name ":" realm ":" password).
    Password(String),
    /// The precomputed long-term key as 32 lowercase hex digits, without the
    /// `0x` prefix that coturn's `turnadmin -k` prints (it is accepted in the
    /// file). Bound to the realm it was computed for.
    Md5KeyHex(String),
}

impl UserSecret {
    /// The 16-byte long-term key for `Md5KeyHex`; `None` for passwords (the
    /// key then depends on name and realm, which is the auth module's job).
    pub fn md5_key(&self) -> Option<[u8; 16]> {
        match self {
            UserSecret::Password(_) => None,
            UserSecret::Md5KeyHex(hex) => decode_hex16(hex),
        }
    }
}

// Debug output lands in logs and panic messages; it must never carry a secret.
impl fmt::Debug for UserSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserSecret::Password(_) => write!(f, "Password({REDACTED})"),
            UserSecret::Md5KeyHex(_) => write!(f, "Md5KeyHex({REDACTED})"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// 0 = unlimited.
    pub allocations_per_user: u32,
    pub total_allocations: u32,
    pub permissions_per_allocation: u32,
    pub channels_per_allocation: u32,
    pub default_lifetime_secs: u64,
    pub max_lifetime_secs: u64,
    pub permission_lifetime_secs: u64,
    pub channel_lifetime_secs: u64,
    /// 0 = unlimited.
    pub allocation_bandwidth_bytes_per_sec: u64,
    /// 0 = unlimited.
    pub unauth_replies_per_sec: u32,
    pub unauth_replies_burst: u32,
}

/// Everything empty/false: the policy's default-deny list alone applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeersConfig {
    /// Normalised networks (no host bits, never an IPv4-in-IPv6 spelling).
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    pub allow_loopback_peers: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            realm: "turnpike".to_owned(),
            software: String::new(),
            threads: 0,
            listen: vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, 3478))],
            log_format: LogFormat::Text,
            log_level: "info".to_owned(),
            relay: RelayConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            peers: PeersConfig::default(),
            public_host: String::new(),
            drain_secs: 30,
            api: ApiConfig::default(),
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            address: RelayAddress::Auto,
            address_v6: None,
            external_address: None,
            external_address_v6: None,
            port_min: 49152,
            port_max: 65535,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            nonce_lifetime_secs: 600,
            secret_file: None,
            secret_env: None,
            rest_separator: ':',
            rest_max_ttl_secs: 48 * 3600,
            users: Vec::new(),
        }
    }
}

/// The defaults are the core's own (`crate::proto::server::Limits::default()`), so the file and
/// a core built in code cannot drift apart.
impl Default for LimitsConfig {
    fn default() -> Self {
        let l = crate::proto::server::Limits::default();
        LimitsConfig {
            allocations_per_user: l.allocations_per_user,
            total_allocations: l.total_allocations,
            permissions_per_allocation: u32::try_from(l.permissions_per_allocation)
                .unwrap_or(u32::MAX),
            channels_per_allocation: u32::try_from(l.channels_per_allocation).unwrap_or(u32::MAX),
            default_lifetime_secs: l.default_lifetime.as_secs(),
            max_lifetime_secs: l.max_lifetime.as_secs(),
            permission_lifetime_secs: l.permission_lifetime.as_secs(),
            channel_lifetime_secs: l.channel_lifetime.as_secs(),
            allocation_bandwidth_bytes_per_sec: l.bandwidth_bytes_per_sec,
            unauth_replies_per_sec: l.unauth_replies_per_sec,
            unauth_replies_burst: l.unauth_replies_burst,
        }
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// One problem in a config file, located as precisely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// The file name (or whatever `origin` was given to `Config::parse`).
    pub origin: String,
    /// 1-based line; `None` when the key is absent from the file (a default
    /// that conflicts with a value set elsewhere) or the error has no span.
    pub line: Option<usize>,
    /// Dotted key path such as `limits.max_lifetime_secs` or
    /// `auth.users[1].key`; empty for TOML syntax errors.
    pub key: String,
    /// The full message, naming the key; never contains a secret value.
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.origin, line, self.message),
            None => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// TOML syntax, a value of the wrong type, or an unknown key.
    #[error("{0}")]
    Syntax(Issue),
    /// Values that parse but are not acceptable; all of them, not just the first.
    #[error("{}", join_issues(.0))]
    Invalid(Vec<Issue>),
    #[error("auth.secret_file: cannot read {}: {error}", path.display())]
    SecretFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("auth.secret_env: environment variable {name} {reason}")]
    SecretEnv { name: String, reason: String },
    /// The file or variable exists but holds no secret; `what` names it.
    #[error("api.token_file: cannot read {}: {error}", path.display())]
    TokenFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "api.token_file {}: token is too short ({len} bytes, at least {MIN_API_TOKEN_LEN} required)",
        path.display()
    )]
    WeakToken { path: PathBuf, len: usize },
    #[error("no secrets in {what}")]
    NoSecrets { what: String },
    #[error(
        "{location}: REST secret is too short ({len} bytes, at least {MIN_REST_SECRET_LEN} \
         required; e.g. generate one with `openssl rand -hex 32`)"
    )]
    WeakSecret { location: String, len: usize },
}

impl ConfigError {
    /// The located issues behind a parse or validation failure (empty for
    /// I/O and secret errors).
    pub fn issues(&self) -> &[Issue] {
        match self {
            ConfigError::Syntax(issue) => std::slice::from_ref(issue),
            ConfigError::Invalid(issues) => issues,
            _ => &[],
        }
    }
}

fn join_issues(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(Issue::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

impl Config {
    /// Read, parse and validate a config file. A relative `auth.secret_file`
    /// is resolved against the file's directory, so the daemon finds it
    /// whatever its working directory (systemd starts it in `/`).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let mut config = Config::parse(&text, &path.display().to_string())?;
        if let Some(file) = &config.auth.secret_file {
            if file.is_relative() {
                let dir = path.parent().unwrap_or(Path::new(""));
                config.auth.secret_file = Some(dir.join(file));
            }
        }
        if let Some(file) = &config.api.token_file {
            if file.is_relative() {
                let dir = path.parent().unwrap_or(Path::new(""));
                config.api.token_file = Some(dir.join(file));
            }
        }
        Ok(config)
    }

    /// Parse and validate config text. `origin` names the source in messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let table = DeTable::parse(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            ConfigError::Syntax(Issue {
                origin: origin.to_owned(),
                line,
                key: String::new(),
                message: format!("invalid TOML: {}", e.message()),
            })
        })?;
        let locator = Locator::new(text, table.get_ref());
        let raw = raw::Config::deserialize(toml::de::Deserializer::from(table))
            .map_err(|e| ConfigError::Syntax(serde_issue(&e, &locator, origin)))?;
        let mut cx = Cx {
            origin,
            locator: &locator,
            issues: Vec::new(),
        };
        let config = build(raw, &mut cx);
        if cx.issues.is_empty() {
            Ok(config)
        } else {
            // Stable: issues on one line keep their order; unlocated ones last.
            cx.issues.sort_by_key(|i| i.line.unwrap_or(usize::MAX));
            Err(ConfigError::Invalid(cx.issues))
        }
    }

    /// Check a configuration built in code against the same rules as a file.
    /// Issues refer to lines of the generated TOML, origin `<config>`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Config::parse(&self.to_toml(false), "<config>").map(drop)
    }

    /// REST secrets from `auth.secret_file` and/or `auth.secret_env` (both
    /// may be set: the union, duplicates dropped, file first). `Ok(empty)`
    /// when neither is set. Errors name the file or variable but never carry
    /// secret bytes.
    /// The API bearer token from `api.token_file` (first non-empty line), if configured.
    pub fn load_api_token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.api.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::TokenFile {
            path: path.clone(),
            error,
        })?;
        let token = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .unwrap_or("");
        if token.len() < MIN_API_TOKEN_LEN {
            return Err(ConfigError::WeakToken {
                path: path.clone(),
                len: token.len(),
            });
        }
        Ok(Some(token.to_owned()))
    }

    pub fn load_rest_secrets(&self) -> Result<Vec<Vec<u8>>, ConfigError> {
        self.load_rest_secrets_with(|name| std::env::var_os(name))
    }

    fn load_rest_secrets_with(
        &self,
        getenv: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Vec<Vec<u8>>, ConfigError> {
        let mut secrets: Vec<Vec<u8>> = Vec::new();
        let mut add = |secret: &[u8], location: &dyn Fn() -> String| {
            if secret.len() < MIN_REST_SECRET_LEN {
                return Err(ConfigError::WeakSecret {
                    location: location(),
                    len: secret.len(),
                });
            }
            if !secrets.iter().any(|s| s == secret) {
                secrets.push(secret.to_vec());
            }
            Ok(())
        };

        if let Some(path) = &self.auth.secret_file {
            let bytes = std::fs::read(path).map_err(|error| ConfigError::SecretFile {
                path: path.clone(),
                error,
            })?;
            let mut found = 0;
            // Bytes, not text: a secret need not be UTF-8. trim_ascii also
            // strips the '\r' of CRLF files.
            for (index, line) in bytes.split(|&b| b == b'\n').enumerate() {
                let line = line.trim_ascii();
                if line.is_empty() || line.starts_with(b"#") {
                    continue;
                }
                found += 1;
                add(line, &|| format!("{}:{}", path.display(), index + 1))?;
            }
            if found == 0 {
                return Err(ConfigError::NoSecrets {
                    what: path.display().to_string(),
                });
            }
        }

        if let Some(name) = &self.auth.secret_env {
            let value = getenv(name).ok_or_else(|| ConfigError::SecretEnv {
                name: name.clone(),
                reason: "is not set".to_owned(),
            })?;
            let value = value.into_string().map_err(|_| ConfigError::SecretEnv {
                name: name.clone(),
                reason: "is not valid UTF-8".to_owned(),
            })?;
            let mut found = 0;
            for secret in value
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
            {
                found += 1;
                let n = found;
                add(secret.as_bytes(), &|| {
                    format!("environment variable {name}, secret #{n}")
                })?;
            }
            if found == 0 {
                return Err(ConfigError::NoSecrets {
                    what: format!("environment variable {name}"),
                });
            }
        }
        Ok(secrets)
    }

    /// Files holding secrets that users other than the owner may access, or that belong to
    /// neither root nor the user running turnpike: `auth.secret_file`, `api.token_file`, and the
    /// config file itself when it holds clear-text static user passwords. Files that cannot be
    /// inspected are skipped (loading them reports the error), and so are files systemd hands
    /// over with `LoadCredential=` (under `$CREDENTIALS_DIRECTORY` or `/run/credentials`):
    /// systemd restricts those itself, and its ACLs show up as group bits in the mode.
    /// For warnings only: a daemon with loose permissions still starts.
    pub fn permission_warnings(&self, config_path: &Path) -> Vec<PermissionWarning> {
        let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let mut out = Vec::new();
        let mut check = |key: &'static str, path: &Path, holds: &str, fix_hint: &str| {
            if path.starts_with("/run/credentials")
                || creds.as_deref().is_some_and(|dir| path.starts_with(dir))
            {
                return;
            }
            out.extend(permission_warning(key, path, holds, fix_hint));
        };
        if let Some(path) = &self.auth.secret_file {
            check(
                "auth.secret_file",
                path,
                "REST secrets (whoever reads them can mint TURN credentials)",
                "",
            );
        }
        if let Some(path) = &self.api.token_file {
            check(
                "api.token_file",
                path,
                "the HTTP API bearer token (whoever reads it can mint credentials and end sessions)",
                "",
            );
        }
        if self
            .auth
            .users
            .iter()
            .any(|u| matches!(u.secret, UserSecret::Password(_)))
        {
            check(
                "auth.users",
                config_path,
                "clear-text static user passwords (auth.users[].password)",
                ", or replace each password by its key (key = \"0x...\", MD5(name:realm:password))",
            );
        }
        out
    }

    /// The effective configuration (defaults filled in) as TOML, every
    /// password and key replaced by `"<redacted>"`. Secret file paths and
    /// variable names are not secrets and are shown.
    pub fn to_redacted_toml(&self) -> String {
        self.to_toml(true)
    }

    fn to_toml(&self, redact: bool) -> String {
        toml::to_string(&raw::Config::from_typed(self, redact))
            .expect("plain strings, integers, booleans and arrays always serialize")
    }
}

// ---------------------------------------------------------------------------
// Permissions of files that hold secrets
// ---------------------------------------------------------------------------

/// A file holding secrets that others may read or change. `Display` is the whole warning: the
/// key, the file, its mode or owner, and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionWarning {
    /// The key naming the file: `auth.secret_file`, `api.token_file`, or `auth.users` for the
    /// config file itself.
    pub key: &'static str,
    pub path: PathBuf,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub message: String,
}

impl fmt::Display for PermissionWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The warnings for one file: group/other permission bits, and an owner that is neither root
/// nor the effective user. None when the file is private (or cannot be inspected).
fn permission_warning(
    key: &'static str,
    path: &Path,
    holds: &str,
    fix_hint: &str,
) -> Option<PermissionWarning> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.mode() & 0o7777;
    let uid = meta.uid();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mut problems = Vec::new();
    let mut fixes = Vec::new();
    if mode & 0o077 != 0 {
        let mut who = Vec::new();
        if mode & 0o070 != 0 {
            who.push("its group");
        }
        if mode & 0o007 != 0 {
            who.push("all other users");
        }
        problems.push(format!(
            "has mode {mode:04o} (open to {})",
            who.join(" and ")
        ));
        fixes.push(format!("chmod 600 {}", path.display()));
    }
    if uid != 0 && uid != me {
        problems.push(format!(
            "is owned by uid {uid}, neither root nor the user running turnpike (uid {me}), \
             who can read and replace it"
        ));
        let owner = if me == 0 {
            "root".to_owned()
        } else {
            me.to_string()
        };
        fixes.push(format!("chown {owner} {}", path.display()));
    }
    if problems.is_empty() {
        return None;
    }
    Some(PermissionWarning {
        key,
        path: path.to_owned(),
        mode,
        uid,
        message: format!(
            "{key}: {} holds {holds} but {}; fix: {}{fix_hint}",
            path.display(),
            problems.join(" and "),
            fixes.join(" && "),
        ),
    })
}

// ---------------------------------------------------------------------------
// The file layer
// ---------------------------------------------------------------------------

mod raw {
    //! Mirrors of the file's tables. Defaults come from the public types'
    //! `Default`, so there is one source of truth for them.

    use serde::{Deserialize, Serialize};

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub(super) struct Config {
        pub realm: String,
        pub software: String,
        pub threads: i64,
        pub listen: Vec<String>,
        pub log_format: String,
        pub log_level: String,
        pub public_host: String,
        pub drain_secs: i64,
        pub relay: Relay,
        pub auth: Auth,
        pub limits: Limits,
        pub peers: Peers,
        pub api: Api,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub(super) struct Api {
        pub listen: String,
        pub token_file: String,
        pub default_ttl_secs: i64,
        pub max_ttl_secs: i64,
    }

    impl Api {
        fn from_typed(a: &super::ApiConfig) -> Api {
            Api {
                listen: opt(&a.listen),
                token_file: a
                    .token_file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                default_ttl_secs: int(a.default_ttl_secs),
                max_ttl_secs: int(a.max_ttl_secs),
            }
        }
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub(super) struct Relay {
        pub address: String,
        pub address_v6: String,
        pub external_address: String,
        pub external_address_v6: String,
        pub port_min: i64,
        pub port_max: i64,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub(super) struct Auth {
        pub nonce_lifetime_secs: i64,
        pub secret_file: String,
        pub secret_env: String,
        pub rest_separator: String,
        pub rest_max_ttl_secs: i64,
        pub users: Vec<User>,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct User {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub password: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub key: Option<String>,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub(super) struct Limits {
        pub allocations_per_user: i64,
        pub total_allocations: i64,
        pub permissions_per_allocation: i64,
        pub channels_per_allocation: i64,
        pub default_lifetime_secs: i64,
        pub max_lifetime_secs: i64,
        pub permission_lifetime_secs: i64,
        pub channel_lifetime_secs: i64,
        pub allocation_bandwidth_bytes_per_sec: i64,
        pub unauth_replies_per_sec: i64,
        pub unauth_replies_burst: i64,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub(super) struct Peers {
        pub allow: Vec<String>,
        pub deny: Vec<String>,
        pub allow_loopback_peers: bool,
    }

    fn opt<T: ToString>(value: &Option<T>) -> String {
        value.as_ref().map(T::to_string).unwrap_or_default()
    }

    // Integers in the public types are bounded well below i64::MAX by
    // validation; saturate rather than wrap for configs built in code.
    fn int<T: TryInto<i64>>(value: T) -> i64 {
        value.try_into().unwrap_or(i64::MAX)
    }

    impl Config {
        pub fn from_typed(c: &super::Config, redact: bool) -> Config {
            Config {
                realm: c.realm.clone(),
                software: c.software.clone(),
                threads: int(c.threads),
                listen: c.listen.iter().map(ToString::to_string).collect(),
                log_format: c.log_format.to_string(),
                log_level: c.log_level.clone(),
                public_host: c.public_host.clone(),
                drain_secs: int(c.drain_secs),
                relay: Relay::from_typed(&c.relay),
                auth: Auth::from_typed(&c.auth, redact),
                limits: Limits::from_typed(&c.limits),
                peers: Peers::from_typed(&c.peers),
                api: Api::from_typed(&c.api),
            }
        }
    }

    impl Relay {
        fn from_typed(r: &super::RelayConfig) -> Relay {
            Relay {
                address: r.address.to_string(),
                address_v6: opt(&r.address_v6),
                external_address: opt(&r.external_address),
                external_address_v6: opt(&r.external_address_v6),
                port_min: r.port_min.into(),
                port_max: r.port_max.into(),
            }
        }
    }

    impl Auth {
        fn from_typed(a: &super::AuthConfig, redact: bool) -> Auth {
            let secret = |s: &String| {
                if redact {
                    super::REDACTED.to_owned()
                } else {
                    s.clone()
                }
            };
            Auth {
                nonce_lifetime_secs: int(a.nonce_lifetime_secs),
                secret_file: a
                    .secret_file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                secret_env: a.secret_env.clone().unwrap_or_default(),
                rest_separator: a.rest_separator.to_string(),
                rest_max_ttl_secs: int(a.rest_max_ttl_secs),
                users: a
                    .users
                    .iter()
                    .map(|u| match &u.secret {
                        super::UserSecret::Password(p) => User {
                            name: Some(u.name.clone()),
                            password: Some(secret(p)),
                            key: None,
                        },
                        super::UserSecret::Md5KeyHex(k) => User {
                            name: Some(u.name.clone()),
                            password: None,
                            key: Some(secret(&format!("0x{k}"))),
                        },
                    })
                    .collect(),
            }
        }
    }

    impl Limits {
        fn from_typed(l: &super::LimitsConfig) -> Limits {
            Limits {
                allocations_per_user: l.allocations_per_user.into(),
                total_allocations: l.total_allocations.into(),
                permissions_per_allocation: l.permissions_per_allocation.into(),
                channels_per_allocation: l.channels_per_allocation.into(),
                default_lifetime_secs: int(l.default_lifetime_secs),
                max_lifetime_secs: int(l.max_lifetime_secs),
                permission_lifetime_secs: int(l.permission_lifetime_secs),
                channel_lifetime_secs: int(l.channel_lifetime_secs),
                allocation_bandwidth_bytes_per_sec: int(l.allocation_bandwidth_bytes_per_sec),
                unauth_replies_per_sec: l.unauth_replies_per_sec.into(),
                unauth_replies_burst: l.unauth_replies_burst.into(),
            }
        }
    }

    impl Peers {
        fn from_typed(p: &super::PeersConfig) -> Peers {
            Peers {
                allow: p.allow.iter().map(ToString::to_string).collect(),
                deny: p.deny.iter().map(ToString::to_string).collect(),
                allow_loopback_peers: p.allow_loopback_peers,
            }
        }
    }

    macro_rules! default_from_typed {
        ($raw:ident, $typed:ident, $conv:expr) => {
            impl Default for $raw {
                fn default() -> Self {
                    $conv(&super::$typed::default())
                }
            }
        };
    }
    default_from_typed!(Config, Config, |c| Config::from_typed(c, false));
    default_from_typed!(Relay, RelayConfig, Relay::from_typed);
    default_from_typed!(Auth, AuthConfig, |a| Auth::from_typed(a, false));
    default_from_typed!(Limits, LimitsConfig, Limits::from_typed);
    default_from_typed!(Peers, PeersConfig, Peers::from_typed);
    default_from_typed!(Api, ApiConfig, Api::from_typed);
}

// ---------------------------------------------------------------------------
// Locating keys in the text
// ---------------------------------------------------------------------------

/// Every key and array element of the parsed document with its dotted path
/// and spans. Built from toml's own spanned parse tree, so dotted keys,
/// inline tables and `[[arrays]]` are located exactly, with no text search.
struct Locator<'t> {
    text: &'t str,
    entries: Vec<Entry>,
}

struct Entry {
    /// Path of the enclosing table, "" at top level.
    parent: String,
    /// The key itself, or `[i]` for an array element.
    name: String,
    key: Range<usize>,
    value: Range<usize>,
}

impl Entry {
    fn path(&self) -> String {
        if self.parent.is_empty() {
            self.name.clone()
        } else if self.name.starts_with('[') {
            format!("{}{}", self.parent, self.name)
        } else {
            format!("{}.{}", self.parent, self.name)
        }
    }
}

impl<'t> Locator<'t> {
    fn new(text: &'t str, table: &DeTable<'_>) -> Self {
        let mut locator = Locator {
            text,
            entries: Vec::new(),
        };
        locator.walk_table("", table);
        locator
    }

    fn walk_table(&mut self, parent: &str, table: &DeTable<'_>) {
        for (key, value) in table.iter() {
            let entry = Entry {
                parent: parent.to_owned(),
                name: key.get_ref().to_string(),
                key: key.span(),
                value: value.span(),
            };
            let path = entry.path();
            self.entries.push(entry);
            self.walk_value(&path, value.get_ref());
        }
    }

    fn walk_value(&mut self, path: &str, value: &DeValue<'_>) {
        match value {
            DeValue::Table(table) => self.walk_table(path, table),
            DeValue::Array(array) => {
                for (index, item) in array.iter().enumerate() {
                    let entry = Entry {
                        parent: path.to_owned(),
                        name: format!("[{index}]"),
                        key: item.span(),
                        value: item.span(),
                    };
                    let item_path = entry.path();
                    self.entries.push(entry);
                    self.walk_value(&item_path, item.get_ref());
                }
            }
            _ => {}
        }
    }

    /// The innermost entry whose key or value covers `pos`.
    fn at(&self, pos: usize) -> Option<&Entry> {
        let covers = |r: &Range<usize>| r.contains(&pos) || (r.is_empty() && r.start == pos);
        self.entries
            .iter()
            .flat_map(|e| [(e, &e.key), (e, &e.value)])
            .filter(|(_, r)| covers(r))
            .min_by_key(|(_, r)| r.len())
            .map(|(e, _)| e)
    }

    fn line(&self, path: &str) -> Option<usize> {
        self.entries
            .iter()
            .find(|e| e.path() == path)
            .map(|e| line_of(self.text, e.key.start))
    }

    fn has(&self, path: &str) -> bool {
        self.entries.iter().any(|e| e.path() == path)
    }
}

fn line_of(text: &str, pos: usize) -> usize {
    let pos = pos.min(text.len());
    text.as_bytes()[..pos]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// serde names Rust types; operators think in TOML types.
fn friendly(message: &str) -> String {
    let mut out = message
        .replace("expected i64", "expected an integer")
        .replace("expected a sequence", "expected an array")
        .replace("expected a boolean", "expected true or false");
    if let Some(at) = out.find("expected struct ") {
        let name_end = out[at + "expected struct ".len()..]
            .find(|c: char| !c.is_alphanumeric())
            .map_or(out.len(), |n| at + "expected struct ".len() + n);
        out.replace_range(at..name_end, "expected a table");
    }
    out
}

/// Turn a serde error (wrong type, unknown key) into an issue naming the key.
fn serde_issue(error: &toml::de::Error, locator: &Locator<'_>, origin: &str) -> Issue {
    let pos = error.span().map(|s| s.start);
    let entry = pos.and_then(|p| locator.at(p));
    let line = pos.map(|p| line_of(locator.text, p));
    let raw = error.message();
    let Some(entry) = entry else {
        return Issue {
            origin: origin.to_owned(),
            line,
            key: String::new(),
            message: raw.to_owned(),
        };
    };
    let path = entry.path();
    let unknown_prefix = format!("unknown field `{}`", entry.name);
    let message = if let Some(rest) = raw.strip_prefix(&unknown_prefix) {
        // serde: "unknown field `x`, expected one of `a`, `b`" (or "expected
        // `a` or `b`", or "there are no fields").
        let expected: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
        let table = if entry.parent.is_empty() {
            "the top-level table".to_owned()
        } else if entry.parent.ends_with(']') {
            entry.parent.clone()
        } else {
            format!("[{}]", entry.parent)
        };
        let mut message = format!("unknown key {:?} in {table}", entry.name);
        if let Some(guess) = closest(&entry.name, &expected) {
            message.push_str(&format!("; did you mean {guess:?}?"));
        }
        if !expected.is_empty() {
            message.push_str(&format!(" (expected one of: {})", expected.join(", ")));
        }
        message
    } else if path.starts_with("auth.users") && !path.ends_with(".name") {
        // serde quotes the offending value, and anything under a user entry
        // but its name may be a password or key. The "expected ..." tail
        // comes from our types, so it is safe to keep.
        let expected = raw.rfind(", expected ").map_or("", |i| &raw[i..]);
        format!(
            "{path}: invalid value (not shown, it may be a secret){}",
            friendly(expected)
        )
    } else {
        format!("{path}: {}", friendly(raw))
    };
    Issue {
        origin: origin.to_owned(),
        line,
        key: path,
        message,
    }
}

/// The expected key closest to a misspelt one, if it is close enough to be a
/// plausible typo.
fn closest<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(name, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (prev + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

// ---------------------------------------------------------------------------
// Validation: raw -> typed
// ---------------------------------------------------------------------------

/// Collects issues while converting, so one run reports every bad value.
struct Cx<'a> {
    origin: &'a str,
    locator: &'a Locator<'a>,
    issues: Vec<Issue>,
}

impl Cx<'_> {
    fn push(&mut self, key: &str, message: String) {
        self.issues.push(Issue {
            origin: self.origin.to_owned(),
            line: self.locator.line(key),
            key: key.to_owned(),
            message,
        });
    }

    fn invalid(&mut self, key: &str, value: impl fmt::Display, reason: impl fmt::Display) {
        self.push(key, format!("{key} = {value} is invalid: {reason}"));
    }

    /// For values that must never be echoed.
    fn invalid_secret(&mut self, key: &str, reason: impl fmt::Display) {
        self.push(key, format!("{key} is invalid: {reason}"));
    }

    fn int(&mut self, key: &str, value: i64, lo: u64, hi: u64, fallback: u64) -> u64 {
        match u64::try_from(value) {
            Ok(v) if (lo..=hi).contains(&v) => v,
            _ => {
                let reason = if hi >= i64::MAX as u64 {
                    format!("must be at least {lo}")
                } else {
                    format!("must be between {lo} and {hi}")
                };
                self.invalid(key, value, reason);
                fallback
            }
        }
    }

    fn int32(&mut self, key: &str, value: i64, lo: u32, hi: u32, fallback: u32) -> u32 {
        // hi <= u32::MAX, so the result fits.
        self.int(key, value, lo.into(), hi.into(), fallback.into()) as u32
    }

    /// `lo_key <= hi_key`. Blame whichever of the two the file sets (the
    /// upper one when both are), since that is the line the operator edits.
    fn ordered(&mut self, lo_key: &str, lo: u64, hi_key: &str, hi: u64) {
        if lo <= hi {
            return;
        }
        if self.locator.has(hi_key) || !self.locator.has(lo_key) {
            self.invalid(hi_key, hi, format!("must be >= {lo_key} ({lo})"));
        } else {
            self.invalid(lo_key, lo, format!("must be <= {hi_key} ({hi})"));
        }
    }
}

/// A string shown in a message: quoted and escaped like TOML.
struct Q<'a>(&'a str);

impl fmt::Display for Q<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

fn build(raw: raw::Config, cx: &mut Cx<'_>) -> Config {
    let defaults = Config::default();

    check_text(cx, "realm", &raw.realm, false);
    check_text(cx, "software", &raw.software, true);

    let threads = cx.int("threads", raw.threads, 0, 1024, 0) as usize;

    let log_format = match raw.log_format.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            cx.invalid("log_format", Q(other), r#"expected "text" or "json""#);
            LogFormat::Text
        }
    };
    if raw.log_level.trim().is_empty() {
        cx.invalid(
            "log_level",
            Q(&raw.log_level),
            r#"must not be empty (e.g. "info" or "info,turnpike=debug")"#,
        );
    } else if raw.log_level.chars().any(char::is_control) {
        cx.invalid(
            "log_level",
            Q(&raw.log_level),
            "contains control characters",
        );
    }

    let relay = build_relay(raw.relay, cx);
    let listen = build_listen(&raw.listen, &relay, cx);
    let auth = build_auth(raw.auth, cx);
    let limits = build_limits(raw.limits, cx);
    let peers = build_peers(raw.peers, cx);
    let drain_secs = cx.int("drain_secs", raw.drain_secs, 0, 86400, defaults.drain_secs);
    if raw
        .public_host
        .contains(|c: char| c.is_whitespace() || c.is_control() || "/?#@".contains(c))
    {
        cx.invalid(
            "public_host",
            Q(&raw.public_host),
            "must be a bare host name or address (no scheme, path or spaces)",
        );
    }
    let api = build_api(raw.api, cx);

    Config {
        realm: raw.realm,
        software: raw.software,
        threads,
        listen: if listen.is_empty() {
            defaults.listen
        } else {
            listen
        },
        log_format,
        log_level: raw.log_level,
        relay,
        auth,
        limits,
        peers,
        public_host: raw.public_host,
        drain_secs,
        api,
    }
}

fn build_api(raw: raw::Api, cx: &mut Cx<'_>) -> ApiConfig {
    let defaults = ApiConfig::default();
    let listen = if raw.listen.is_empty() {
        None
    } else {
        match raw.listen.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                cx.invalid(
                    "api.listen",
                    Q(&raw.listen),
                    r#"expected "IP:port", e.g. "127.0.0.1:9641""#,
                );
                None
            }
        }
    };
    let token_file = if raw.token_file.is_empty() {
        None
    } else if raw.token_file.contains('\0') {
        cx.invalid("api.token_file", Q(&raw.token_file), "contains a NUL byte");
        None
    } else {
        Some(PathBuf::from(raw.token_file))
    };
    // Minting also never exceeds auth.rest_max_ttl_secs (the daemon would refuse such a
    // credential); that cap is applied at mint time so the defaults stay independent.
    let max_ttl_secs = cx.int(
        "api.max_ttl_secs",
        raw.max_ttl_secs,
        60,
        365 * 86400,
        defaults.max_ttl_secs,
    );
    let default_ttl_secs = cx.int(
        "api.default_ttl_secs",
        raw.default_ttl_secs,
        60,
        max_ttl_secs,
        defaults.default_ttl_secs.min(max_ttl_secs),
    );
    ApiConfig {
        listen,
        token_file,
        default_ttl_secs,
        max_ttl_secs,
    }
}

/// REALM and SOFTWARE: sent on the wire, so RFC length limits and no control
/// characters (they end up in logs and in clients' UIs too).
fn check_text(cx: &mut Cx<'_>, key: &str, value: &str, may_be_empty: bool) {
    if value.is_empty() && !may_be_empty {
        cx.invalid(key, Q(value), "must not be empty");
    } else if value.chars().count() > MAX_REALM_CHARS || value.len() > MAX_REALM_BYTES {
        cx.invalid(
            key,
            Q(value),
            format!("must be at most {MAX_REALM_CHARS} characters (RFC 8489)"),
        );
    } else if value.chars().any(char::is_control) {
        cx.invalid(key, Q(value), "must be printable (no control characters)");
    }
}

fn build_listen(raw: &[String], relay: &RelayConfig, cx: &mut Cx<'_>) -> Vec<SocketAddr> {
    if raw.is_empty() {
        cx.invalid("listen", "[]", "at least one listener is required");
        return Vec::new();
    }
    let mut listen: Vec<(usize, SocketAddr)> = Vec::new();
    for (i, text) in raw.iter().enumerate() {
        let key = format!("listen[{i}]");
        let addr: SocketAddr = match text.parse() {
            Ok(addr) => addr,
            Err(_) => {
                cx.invalid(
                    &key,
                    Q(text),
                    r#"expected IP:port such as "0.0.0.0:3478" or "[::]:3478" (host names are not resolved)"#,
                );
                continue;
            }
        };
        if addr.ip().is_multicast() {
            cx.invalid(&key, Q(text), "a multicast address cannot be a listener");
            continue;
        }
        let port = addr.port();
        if port != 0 && (relay.port_min..=relay.port_max).contains(&port) {
            cx.invalid(
                &key,
                Q(text),
                format!(
                    "port {port} lies inside the relay port range {}-{} \
                     (relay.port_min, relay.port_max)",
                    relay.port_min, relay.port_max
                ),
            );
        }
        // Port 0 asks the kernel for a fresh port, so several of those never
        // collide. Otherwise the same port twice in one family collides, and
        // a wildcard next to a specific address is worse than a bind error:
        // with SO_REUSEPORT both bind and the kernel splits traffic between
        // them.
        if port != 0 {
            let clash = listen.iter().find(|(_, other)| {
                other.port() == port
                    && other.is_ipv4() == addr.is_ipv4()
                    && (other.ip() == addr.ip()
                        || other.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            });
            if let Some((j, other)) = clash {
                let reason = if *other == addr {
                    format!("duplicate of listen[{j}]")
                } else {
                    format!(
                        "overlaps listen[{j}] ({:?}): a wildcard address already \
                         covers every address on that port",
                        other.to_string()
                    )
                };
                cx.invalid(&key, Q(text), reason);
                continue;
            }
        }
        listen.push((i, addr));
    }
    listen.into_iter().map(|(_, a)| a).collect()
}

fn build_relay(raw: raw::Relay, cx: &mut Cx<'_>) -> RelayConfig {
    let d = RelayConfig::default();

    let address = if raw.address == "auto" {
        RelayAddress::Auto
    } else {
        match raw.address.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => match unusable_unicast_v4(ip) {
                None => RelayAddress::Ip(ip),
                Some(why) => {
                    cx.invalid(
                        "relay.address",
                        Q(&raw.address),
                        format!("{why}; use \"auto\" or this host's IPv4 address"),
                    );
                    d.address
                }
            },
            Ok(IpAddr::V6(_)) => {
                cx.invalid(
                    "relay.address",
                    Q(&raw.address),
                    "is IPv6; put it in relay.address_v6 (relay.address is IPv4 or \"auto\")",
                );
                d.address
            }
            Err(_) => {
                cx.invalid(
                    "relay.address",
                    Q(&raw.address),
                    r#"expected "auto" or an IPv4 address"#,
                );
                d.address
            }
        }
    };
    let address_v6 = opt_v6(cx, "relay.address_v6", &raw.address_v6);
    let external_address = opt_v4(cx, "relay.external_address", &raw.external_address);
    let external_address_v6 = opt_v6(cx, "relay.external_address_v6", &raw.external_address_v6);
    if external_address_v6.is_some() && address_v6.is_none() && raw.address_v6.is_empty() {
        cx.invalid(
            "relay.external_address_v6",
            Q(&raw.external_address_v6),
            "needs relay.address_v6: there are no IPv6 relays to advertise",
        );
    }

    let port_min = cx.int(
        "relay.port_min",
        raw.port_min,
        1024,
        65535,
        d.port_min.into(),
    ) as u16;
    let port_max = cx.int(
        "relay.port_max",
        raw.port_max,
        1024,
        65535,
        d.port_max.into(),
    ) as u16;
    cx.ordered(
        "relay.port_min",
        port_min.into(),
        "relay.port_max",
        port_max.into(),
    );
    RelayConfig {
        address,
        address_v6,
        external_address,
        external_address_v6,
        port_min,
        // Keep the range well formed for later checks that use it.
        port_max: port_max.max(port_min),
    }
}

/// Why an IPv4 address cannot be a relay address, if it cannot.
fn unusable_unicast_v4(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("0.0.0.0 would advertise no usable address")
    } else if ip.is_multicast() {
        Some("a multicast address cannot relay")
    } else if ip.is_broadcast() {
        Some("the broadcast address cannot relay")
    } else {
        None
    }
}

fn opt_v4(cx: &mut Cx<'_>, key: &str, text: &str) -> Option<Ipv4Addr> {
    if text.is_empty() {
        return None;
    }
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => match unusable_unicast_v4(ip) {
            None => Some(ip),
            Some(why) => {
                cx.invalid(key, Q(text), why);
                None
            }
        },
        Ok(IpAddr::V6(_)) => {
            cx.invalid(key, Q(text), "is IPv6; this key takes an IPv4 address");
            None
        }
        Err(_) => {
            cx.invalid(key, Q(text), "expected an IPv4 address, or \"\" for none");
            None
        }
    }
}

fn opt_v6(cx: &mut Cx<'_>, key: &str, text: &str) -> Option<Ipv6Addr> {
    if text.is_empty() {
        return None;
    }
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => {
            let why = if ip.is_unspecified() {
                Some(":: would advertise no usable address")
            } else if ip.is_multicast() {
                Some("a multicast address cannot relay")
            } else if ip.to_ipv4_mapped().is_some() {
                Some("an IPv4-mapped address is IPv4; use the IPv4 key")
            } else {
                None
            };
            match why {
                None => Some(ip),
                Some(why) => {
                    cx.invalid(key, Q(text), why);
                    None
                }
            }
        }
        Ok(IpAddr::V4(_)) => {
            cx.invalid(key, Q(text), "is IPv4; this key takes an IPv6 address");
            None
        }
        Err(_) => {
            cx.invalid(key, Q(text), "expected an IPv6 address, or \"\" for none");
            None
        }
    }
}

fn build_auth(raw: raw::Auth, cx: &mut Cx<'_>) -> AuthConfig {
    let d = AuthConfig::default();
    let nonce_lifetime_secs = cx.int(
        "auth.nonce_lifetime_secs",
        raw.nonce_lifetime_secs,
        30,
        86400,
        d.nonce_lifetime_secs,
    );

    let secret_file = if raw.secret_file.is_empty() {
        None
    } else if raw.secret_file.contains('\0') {
        cx.invalid(
            "auth.secret_file",
            Q(&raw.secret_file),
            "contains a NUL character",
        );
        None
    } else {
        Some(PathBuf::from(&raw.secret_file))
    };

    // std::env::var_os panics on names containing '=' or NUL; portable
    // shell names are all anyone needs.
    let secret_env = if raw.secret_env.is_empty() {
        None
    } else if is_env_name(&raw.secret_env) {
        Some(raw.secret_env.clone())
    } else {
        cx.invalid(
            "auth.secret_env",
            Q(&raw.secret_env),
            "must be an environment variable name (letters, digits, '_'; not starting with a digit)",
        );
        None
    };

    let mut separator = raw.rest_separator.chars();
    let rest_separator = match (separator.next(), separator.next()) {
        (Some(c), None) if c.is_ascii_punctuation() => c,
        _ => {
            cx.invalid(
                "auth.rest_separator",
                Q(&raw.rest_separator),
                "must be a single ASCII punctuation character such as \":\" \
                 (not a letter, digit or space: it splits expiry from user name)",
            );
            d.rest_separator
        }
    };

    let rest_max_ttl_secs = cx.int(
        "auth.rest_max_ttl_secs",
        raw.rest_max_ttl_secs,
        60,
        365 * 86400,
        d.rest_max_ttl_secs,
    );

    let mut users: Vec<UserEntry> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, user) in raw.users.into_iter().enumerate() {
        let key = format!("auth.users[{i}]");
        let name = match user.name {
            None => {
                cx.push(&key, format!("{key} is invalid: missing name"));
                continue;
            }
            Some(name) => name,
        };
        let name_key = format!("{key}.name");
        if name.is_empty() {
            cx.invalid(&name_key, Q(&name), "must not be empty");
            continue;
        }
        if name.len() > MAX_USERNAME_BYTES {
            cx.invalid(
                &name_key,
                Q(&name),
                format!("must be at most {MAX_USERNAME_BYTES} bytes (RFC 8489 USERNAME)"),
            );
            continue;
        }
        if name.chars().any(char::is_control) {
            cx.invalid(&name_key, Q(&name), "must not contain control characters");
            continue;
        }
        if let Some(first) = seen.get(&name) {
            cx.invalid(
                &name_key,
                Q(&name),
                format!("same name as auth.users[{first}]"),
            );
            continue;
        }
        seen.insert(name.clone(), i);

        let secret = match (user.password, user.key) {
            (Some(_), Some(_)) => {
                cx.push(
                    &key,
                    format!(
                        "{key} (name {:?}) is invalid: sets both password and key; set exactly one",
                        name
                    ),
                );
                continue;
            }
            (None, None) => {
                cx.push(
                    &key,
                    format!(
                        "{key} (name {:?}) is invalid: needs a password or a key",
                        name
                    ),
                );
                continue;
            }
            (Some(password), None) => {
                if password.is_empty() {
                    cx.invalid_secret(&format!("{key}.password"), "must not be empty");
                    continue;
                }
                UserSecret::Password(password)
            }
            (None, Some(k)) => {
                let hex = k
                    .strip_prefix("0x")
                    .or_else(|| k.strip_prefix("0X"))
                    .unwrap_or(&k);
                if decode_hex16(hex).is_none() {
                    cx.invalid_secret(
                        &format!("{key}.key"),
                        "expected \"0x\" followed by 32 hex digits (the output of \
                         `turnadmin -k`)",
                    );
                    continue;
                }
                UserSecret::Md5KeyHex(hex.to_ascii_lowercase())
            }
        };
        users.push(UserEntry { name, secret });
    }

    AuthConfig {
        nonce_lifetime_secs,
        secret_file,
        secret_env,
        rest_separator,
        rest_max_ttl_secs,
        users,
    }
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn decode_hex16(hex: &str) -> Option<[u8; 16]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

fn build_limits(raw: raw::Limits, cx: &mut Cx<'_>) -> LimitsConfig {
    let d = LimitsConfig::default();
    let max = u32::MAX;
    let allocations_per_user = cx.int32(
        "limits.allocations_per_user",
        raw.allocations_per_user,
        0,
        max,
        d.allocations_per_user,
    );
    let total_allocations = cx.int32(
        "limits.total_allocations",
        raw.total_allocations,
        1,
        max,
        d.total_allocations,
    );
    let permissions_per_allocation = cx.int32(
        "limits.permissions_per_allocation",
        raw.permissions_per_allocation,
        1,
        max,
        d.permissions_per_allocation,
    );
    // Channel numbers are 0x4000..=0x4FFF: 4096 of them.
    let channels_per_allocation = cx.int32(
        "limits.channels_per_allocation",
        raw.channels_per_allocation,
        1,
        4096,
        d.channels_per_allocation,
    );
    let default_lifetime_secs = cx.int(
        "limits.default_lifetime_secs",
        raw.default_lifetime_secs,
        60,
        86400,
        d.default_lifetime_secs,
    );
    let max_lifetime_secs = cx.int(
        "limits.max_lifetime_secs",
        raw.max_lifetime_secs,
        60,
        86400,
        d.max_lifetime_secs,
    );
    cx.ordered(
        "limits.default_lifetime_secs",
        default_lifetime_secs,
        "limits.max_lifetime_secs",
        max_lifetime_secs,
    );
    // Clients are never told these two lifetimes: they refresh on the RFC 8656
    // schedule (permissions 300 s, channels 600 s). Anything shorter drops
    // working calls, so the RFC values are the floor.
    let permission_lifetime_secs = cx.int(
        "limits.permission_lifetime_secs",
        raw.permission_lifetime_secs,
        300,
        3600,
        d.permission_lifetime_secs,
    );
    let channel_lifetime_secs = cx.int(
        "limits.channel_lifetime_secs",
        raw.channel_lifetime_secs,
        600,
        3600,
        d.channel_lifetime_secs,
    );
    let allocation_bandwidth_bytes_per_sec = cx.int(
        "limits.allocation_bandwidth_bytes_per_sec",
        raw.allocation_bandwidth_bytes_per_sec,
        0,
        i64::MAX as u64,
        d.allocation_bandwidth_bytes_per_sec,
    );
    let unauth_replies_per_sec = cx.int32(
        "limits.unauth_replies_per_sec",
        raw.unauth_replies_per_sec,
        0,
        max,
        d.unauth_replies_per_sec,
    );
    let unauth_replies_burst = cx.int32(
        "limits.unauth_replies_burst",
        raw.unauth_replies_burst,
        0,
        max,
        d.unauth_replies_burst,
    );
    if unauth_replies_per_sec > 0 && unauth_replies_burst == 0 && raw.unauth_replies_burst == 0 {
        cx.invalid(
            "limits.unauth_replies_burst",
            0,
            format!(
                "must be at least 1 while limits.unauth_replies_per_sec is above 0 (it is \
                 {unauth_replies_per_sec}; a zero burst would never let a reply out); set both \
                 to 0 to turn the limit off"
            ),
        );
    }
    LimitsConfig {
        allocations_per_user,
        total_allocations,
        permissions_per_allocation,
        channels_per_allocation,
        default_lifetime_secs,
        max_lifetime_secs,
        permission_lifetime_secs,
        channel_lifetime_secs,
        allocation_bandwidth_bytes_per_sec,
        unauth_replies_per_sec,
        unauth_replies_burst,
    }
}

fn build_peers(raw: raw::Peers, cx: &mut Cx<'_>) -> PeersConfig {
    let allow = raw
        .allow
        .iter()
        .enumerate()
        .filter_map(|(i, text)| peer_net(cx, "peers.allow", i, text, true))
        .collect();
    let deny = raw
        .deny
        .iter()
        .enumerate()
        .filter_map(|(i, text)| peer_net(cx, "peers.deny", i, text, false))
        .collect();
    PeersConfig {
        allow,
        deny,
        allow_loopback_peers: raw.allow_loopback_peers,
    }
}

fn net(text: &str) -> IpNet {
    text.parse().expect("constant CIDR")
}

/// Parse one allow/deny entry. Entries the policy could never act on are
/// errors rather than silently dead lines: an operator who writes them
/// believes something is open (or closed) that is not.
fn peer_net(cx: &mut Cx<'_>, list: &str, i: usize, text: &str, allow: bool) -> Option<IpNet> {
    let key = format!("{list}[{i}]");
    let parsed = text
        .parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
    let Ok(parsed) = parsed else {
        cx.invalid(
            &key,
            Q(text),
            r#"expected a CIDR such as "10.0.0.0/8" or "2001:db8::/32", or a single address"#,
        );
        return None;
    };
    if parsed.trunc() != parsed {
        cx.invalid(
            &key,
            Q(text),
            format!(
                "has bits set beyond the /{} prefix; did you mean \"{}\"?",
                parsed.prefix_len(),
                parsed.trunc()
            ),
        );
        return None;
    }
    // Peers are reduced to IPv4 before the check, so an IPv4-in-IPv6
    // spelling here would never match anything.
    let v4_spellings = [("::ffff:0:0/96", "IPv4-mapped"), ("64:ff9b::/96", "NAT64")];
    for (space, what) in v4_spellings {
        if net(space).contains(&parsed) {
            cx.invalid(
                &key,
                Q(text),
                format!(
                    "is an {what} IPv6 spelling of IPv4 addresses; peers are checked \
                     by their IPv4 address, so write the IPv4 range"
                ),
            );
            return None;
        }
    }
    if allow {
        let loopback = ["127.0.0.0/8", "::1/128"];
        if loopback.iter().any(|l| net(l).contains(&parsed)) {
            cx.invalid(
                &key,
                Q(text),
                "loopback is opened only by peers.allow_loopback_peers = true",
            );
            return None;
        }
        let never = [
            ("0.0.0.0/8", "\"this network\" (0.0.0.0/8)"),
            ("::/128", "the unspecified address"),
            (
                "169.254.0.0/16",
                "link-local (this includes cloud metadata)",
            ),
            ("fe80::/10", "link-local"),
            ("224.0.0.0/4", "multicast"),
            ("ff00::/8", "multicast"),
            ("255.255.255.255/32", "broadcast"),
        ];
        if let Some((_, what)) = never.iter().find(|(n, _)| net(n).contains(&parsed)) {
            cx.invalid(
                &key,
                Q(text),
                format!("{what} is never a valid peer and cannot be allowed"),
            );
            return None;
        }
        if let IpNet::V6(v6) = parsed {
            // IPv4-compatible (::a.b.c.d), checked after :: and ::1 above.
            if net("::/96").contains(&IpNet::V6(v6)) {
                cx.invalid(
                    &key,
                    Q(text),
                    "is an IPv4-compatible IPv6 spelling of IPv4 addresses; peers are \
                     checked by their IPv4 address, so write the IPv4 range",
                );
                return None;
            }
        }
    }
    Some(parsed)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const SHIPPED_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/turnserver.toml");

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "t.toml")
    }

    /// The error text for `text`, which must fail.
    fn err(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    /// Asserts that `text` fails with a message naming `key` on `line`.
    fn fails(text: &str, line: usize, key: &str) -> String {
        let message = err(text);
        assert!(
            message.contains(&format!("t.toml:{line}: ")),
            "expected line {line} in: {message}"
        );
        assert!(message.contains(key), "expected {key} in: {message}");
        message
    }

    struct TempFile(PathBuf);

    impl TempFile {
        fn new(contents: &[u8]) -> TempFile {
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

    fn with_secret_file(path: &Path) -> Config {
        let mut c = Config::default();
        c.auth.secret_file = Some(path.to_owned());
        c
    }

    fn with_secret_env(name: &str) -> Config {
        let mut c = Config::default();
        c.auth.secret_env = Some(name.to_owned());
        c
    }

    fn env<'a>(name: &'a str, value: &'a str) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |n| (n == name).then(|| OsString::from(value))
    }

    const S1: &str = "0123456789abcdef0123";
    const S2: &str = "fedcba9876543210fedc";
    const S3: &str = "secret-number-three!";

    // ---- defaults and the shipped file --------------------------------

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.realm, "turnpike");
        assert_eq!(c.software, "");
        assert_eq!(c.threads, 0);
        assert_eq!(c.listen, vec!["0.0.0.0:3478".parse().unwrap()]);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.log_level, "info");
        assert_eq!(c.relay.address, RelayAddress::Auto);
        assert_eq!(c.relay.address_v6, None);
        assert_eq!(c.relay.external_address, None);
        assert_eq!((c.relay.port_min, c.relay.port_max), (49152, 65535));
        assert_eq!(c.auth.nonce_lifetime_secs, 600);
        assert_eq!(c.auth.secret_file, None);
        assert_eq!(c.auth.secret_env, None);
        assert_eq!(c.auth.rest_separator, ':');
        assert_eq!(c.auth.rest_max_ttl_secs, 172800);
        assert!(c.auth.users.is_empty());
        // [limits] defaults are the core's: one place for each value.
        let core = crate::proto::server::Limits::default();
        let l = &c.limits;
        assert_eq!(l.allocations_per_user, core.allocations_per_user);
        assert_eq!(l.total_allocations, core.total_allocations);
        assert_eq!(
            l.permissions_per_allocation as usize,
            core.permissions_per_allocation
        );
        assert_eq!(
            l.channels_per_allocation as usize,
            core.channels_per_allocation
        );
        assert_eq!(l.default_lifetime_secs, core.default_lifetime.as_secs());
        assert_eq!(l.max_lifetime_secs, core.max_lifetime.as_secs());
        assert_eq!(
            l.permission_lifetime_secs,
            core.permission_lifetime.as_secs()
        );
        assert_eq!(l.channel_lifetime_secs, core.channel_lifetime.as_secs());
        assert_eq!(
            l.allocation_bandwidth_bytes_per_sec,
            core.bandwidth_bytes_per_sec
        );
        assert_eq!(l.unauth_replies_per_sec, core.unauth_replies_per_sec);
        assert_eq!(l.unauth_replies_burst, core.unauth_replies_burst);
        // The defaults pass the file's own range checks (e.g. burst >= 1 while a rate is set).
        assert!(l.unauth_replies_per_sec == 0 || l.unauth_replies_burst >= 1);
        assert!(c.peers.allow.is_empty() && c.peers.deny.is_empty());
        assert!(!c.peers.allow_loopback_peers);
        c.validate().unwrap();
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
        assert_eq!(
            parse("[relay]\n[auth]\n[limits]\n[peers]\n").unwrap(),
            Config::default()
        );
    }

    #[test]
    fn shipped_file_is_the_defaults() {
        let text = std::fs::read_to_string(SHIPPED_PATH).unwrap();
        assert_eq!(parse(&text).unwrap(), Config::default());
        assert_eq!(
            Config::load(Path::new(SHIPPED_PATH)).unwrap(),
            Config::default()
        );
    }

    /// Every key appears in the shipped file, commented out as `#key = value`
    /// with its default value: uncommenting all of them must give the
    /// defaults (plus the example user) and must mention every key.
    #[test]
    fn shipped_file_documents_every_key_with_its_default() {
        let text = std::fs::read_to_string(SHIPPED_PATH).unwrap();
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if !rest.is_empty() && !rest.starts_with([' ', '#']) => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let mut c = Config::parse(&uncommented, "uncommented turnserver.toml")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.auth.users.len(), 1, "[[auth.users]] example missing");
        c.auth.users.clear();
        assert_eq!(c, Config::default());

        let table: toml::Table = toml::from_str(&uncommented).unwrap();
        let defaults: toml::Table = toml::from_str(&Config::default().to_redacted_toml()).unwrap();
        for (section, value) in &defaults {
            assert!(table.contains_key(section), "{section} not in shipped file");
            if let toml::Value::Table(keys) = value {
                for key in keys.keys() {
                    assert!(
                        table[section].as_table().unwrap().contains_key(key),
                        "{section}.{key} not in shipped file"
                    );
                }
            }
        }
    }

    // ---- a full file ---------------------------------------------------

    const FULL: &str = r#"
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

    #[test]
    fn full_file() {
        let c = parse(FULL).unwrap();
        assert_eq!(c.realm, "example.org");
        assert_eq!(c.threads, 4);
        assert_eq!(c.listen.len(), 4);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            c.relay.address,
            RelayAddress::Ip("192.0.2.10".parse().unwrap())
        );
        assert_eq!(c.relay.address_v6, Some("2001:db8::10".parse().unwrap()));
        assert_eq!(
            c.relay.external_address,
            Some("203.0.113.7".parse().unwrap())
        );
        assert_eq!((c.relay.port_min, c.relay.port_max), (40000, 40999));
        assert_eq!(
            c.auth.secret_file,
            Some(PathBuf::from("/etc/turnpike/secrets"))
        );
        assert_eq!(c.auth.secret_env.as_deref(), Some("TURNPIKE_SECRETS"));
        assert_eq!(c.auth.rest_separator, '-');
        assert_eq!(
            c.auth.users,
            vec![
                UserEntry {
                    name: "alice".into(),
                    secret: UserSecret::Password("alice-pass".into())
                },
                UserEntry {
                    name: "bob".into(),
                    secret: UserSecret::Md5KeyHex("0123456789abcdef0123456789abcdef".into())
                },
            ]
        );
        assert_eq!(
            c.auth.users[1].secret.md5_key().unwrap()[..4],
            [0x01, 0x23, 0x45, 0x67]
        );
        assert_eq!(c.limits.allocations_per_user, 0);
        assert_eq!(c.limits.channels_per_allocation, 4096);
        assert_eq!(c.peers.allow[4], "192.168.1.5/32".parse::<IpNet>().unwrap());
        assert_eq!(c.peers.deny.len(), 2);
        assert!(c.peers.allow_loopback_peers);
    }

    #[test]
    fn dotted_keys_and_inline_tables() {
        let c = parse(
            "relay.port_min = 50000\nauth = { users = [{ name = \"a\", password = \"p\" }] }\n",
        )
        .unwrap();
        assert_eq!(c.relay.port_min, 50000);
        assert_eq!(c.auth.users.len(), 1);
        fails(
            "relay.port_min = 70000\n",
            1,
            "relay.port_min = 70000 is invalid",
        );
        fails(
            "\nauth = { users = [{ name = \"a\" }, { name = \"b\", password = \"\" }] }\n",
            2,
            "auth.users[1].password is invalid",
        );
    }

    // ---- syntax, types, unknown keys ------------------------------------

    #[test]
    fn syntax_error_has_line() {
        let m = err("realm = \"x\"\n\nlisten = [\"0.0.0.0:3478\"\n");
        assert!(m.starts_with("t.toml:"), "{m}");
        assert!(m.contains("invalid TOML"), "{m}");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let m = fails(
            "[limits]\n\ntotal_allocations = \"10\"\n",
            3,
            "limits.total_allocations",
        );
        assert!(m.contains("expected an integer"), "{m}");
        fails("threads = 1.5\n", 1, "threads");
        fails(
            "[peers]\nallow_loopback_peers = 1\n",
            2,
            "peers.allow_loopback_peers",
        );
        fails("listen = \"0.0.0.0:3478\"\n", 1, "listen");
        let m = fails("relay = 5\n", 1, "relay");
        assert!(
            m.ends_with("relay: invalid type: integer `5`, expected a table"),
            "{m}"
        );
    }

    #[test]
    fn unknown_top_level_key() {
        let m = fails("realm = \"x\"\nlistn = []\n", 2, "unknown key \"listn\"");
        assert!(m.contains("in the top-level table"), "{m}");
        assert!(m.contains("did you mean \"listen\"?"), "{m}");
        assert!(
            m.contains("expected one of: realm, software, threads, listen"),
            "{m}"
        );
    }

    #[test]
    fn unknown_key_in_every_table() {
        for (table, line) in [("relay", 3), ("auth", 3), ("limits", 3), ("peers", 3)] {
            let m = fails(
                &format!("\n[{table}]\nbogus = 1\n"),
                line,
                "unknown key \"bogus\"",
            );
            assert!(m.contains(&format!("in [{table}]")), "{m}");
        }
        let m = fails(
            "[[auth.users]]\nname = \"a\"\npasword = \"p\"\n",
            3,
            "unknown key \"pasword\" in auth.users[0]",
        );
        assert!(m.contains("did you mean \"password\"?"), "{m}");
        assert!(!m.contains("\"p\""), "{m}");
    }

    #[test]
    fn metrics_live_on_the_api_listener_and_api_keys_are_validated() {
        fails(
            "[metrics]\nlisten = \"127.0.0.1:9100\"\n",
            1,
            "unknown key \"metrics\"",
        );
        let c = parse("drain_secs = 5\npublic_host = \"turn.example.com\"\n[api]\nlisten = \"127.0.0.1:9641\"\ntoken_file = \"tok\"\ndefault_ttl_secs = 600\n").unwrap();
        assert_eq!(c.api.listen, Some("127.0.0.1:9641".parse().unwrap()));
        assert_eq!(c.api.token_file, Some(PathBuf::from("tok")));
        assert_eq!((c.api.default_ttl_secs, c.api.max_ttl_secs), (600, 86400));
        assert_eq!(
            (c.drain_secs, c.public_host.as_str()),
            (5, "turn.example.com")
        );
        fails("[api]\nlisten = \"localhost\"\n", 2, "api.listen");
        fails("[api]\nmax_ttl_secs = 10\n", 2, "api.max_ttl_secs");
        fails(
            "[api]\nmax_ttl_secs = 600\ndefault_ttl_secs = 3600\n",
            3,
            "api.default_ttl_secs",
        );
        fails("public_host = \"https://x\"\n", 1, "public_host");
        fails("drain_secs = -1\n", 1, "drain_secs");
        fails("[api]\nlistn = \"x\"\n", 2, "unknown key \"listn\"");
    }

    // ---- top-level values ------------------------------------------------

    #[test]
    fn realm_rules() {
        fails(
            "realm = \"\"\n",
            1,
            "realm = \"\" is invalid: must not be empty",
        );
        fails(&format!("realm = \"{}\"\n", "r".repeat(128)), 1, "realm");
        parse(&format!("realm = \"{}\"\n", "r".repeat(127))).unwrap();
        fails("realm = \"a\\u0007b\"\n", 1, "realm");
    }

    #[test]
    fn software_rules() {
        parse("software = \"turnpike 1.0\"\n").unwrap();
        fails(
            &format!("software = \"{}\"\n", "s".repeat(200)),
            1,
            "software",
        );
        fails("software = \"a\\nb\"\n", 1, "software");
    }

    #[test]
    fn threads_rules() {
        parse("threads = 1024\n").unwrap();
        fails(
            "threads = 1025\n",
            1,
            "threads = 1025 is invalid: must be between 0 and 1024",
        );
        fails("threads = -1\n", 1, "threads = -1 is invalid");
    }

    #[test]
    fn listen_rules() {
        fails("listen = []\n", 1, "listen = [] is invalid");
        fails(
            "listen = [\"localhost:3478\"]\n",
            1,
            "listen[0] = \"localhost:3478\" is invalid",
        );
        fails("listen = [\"0.0.0.0\"]\n", 1, "listen[0]");
        fails(
            "listen = [\n  \"0.0.0.0:3478\",\n  \"0.0.0.0:3478\",\n]\n",
            3,
            "listen[1] = \"0.0.0.0:3478\" is invalid: duplicate of listen[0]",
        );
        fails(
            "listen = [\"127.0.0.1:3478\", \"0.0.0.0:3478\"]\n",
            1,
            "listen[1] = \"0.0.0.0:3478\" is invalid: overlaps listen[0]",
        );
        fails("listen = [\"224.0.0.1:3478\"]\n", 1, "listen[0]");
        fails(
            "listen = [\"0.0.0.0:50000\"]\n",
            1,
            "listen[0] = \"0.0.0.0:50000\" is invalid: port 50000 lies inside the relay port range",
        );
        // Different families on one port, and several ephemeral ports, are fine.
        parse("listen = [\"0.0.0.0:3478\", \"[::]:3478\", \"127.0.0.1:0\", \"127.0.0.1:0\"]\n")
            .unwrap();
    }

    #[test]
    fn log_rules() {
        fails(
            "log_format = \"xml\"\n",
            1,
            "log_format = \"xml\" is invalid",
        );
        fails("log_level = \"\"\n", 1, "log_level = \"\" is invalid");
        parse("log_level = \"warn,turnpike::proto=trace\"\n").unwrap();
    }

    // ---- [relay] -----------------------------------------------------------

    #[test]
    fn relay_address_rules() {
        assert_eq!(
            parse("[relay]\naddress = \"auto\"\n")
                .unwrap()
                .relay
                .address,
            RelayAddress::Auto
        );
        fails(
            "[relay]\naddress = \"eth0\"\n",
            2,
            "relay.address = \"eth0\" is invalid",
        );
        fails(
            "[relay]\naddress = \"0.0.0.0\"\n",
            2,
            "relay.address = \"0.0.0.0\"",
        );
        fails(
            "[relay]\naddress = \"::1\"\n",
            2,
            "relay.address = \"::1\" is invalid: is IPv6",
        );
        fails("[relay]\naddress = \"239.1.1.1\"\n", 2, "relay.address");
        fails("[relay]\naddress = \"\"\n", 2, "relay.address");
        parse("[relay]\naddress = \"127.0.0.1\"\n").unwrap();
    }

    #[test]
    fn relay_optional_addresses() {
        fails(
            "[relay]\naddress_v6 = \"10.0.0.1\"\n",
            2,
            "relay.address_v6",
        );
        fails("[relay]\naddress_v6 = \"::\"\n", 2, "relay.address_v6");
        fails(
            "[relay]\naddress_v6 = \"::ffff:10.0.0.1\"\n",
            2,
            "relay.address_v6",
        );
        fails(
            "[relay]\nexternal_address = \"2001:db8::1\"\n",
            2,
            "relay.external_address",
        );
        fails(
            "[relay]\nexternal_address = \"nat.example\"\n",
            2,
            "relay.external_address",
        );
        fails(
            "[relay]\nexternal_address_v6 = \"2001:db8::1\"\n",
            2,
            "relay.external_address_v6 = \"2001:db8::1\" is invalid: needs relay.address_v6",
        );
        fails(
            "[relay]\nexternal_address_v6 = \"1.2.3.4\"\n",
            2,
            "relay.external_address_v6",
        );
        let c = parse("[relay]\naddress_v6 = \"\"\nexternal_address = \"\"\n").unwrap();
        assert_eq!(c.relay, RelayConfig::default());
    }

    #[test]
    fn relay_port_rules() {
        fails(
            "[relay]\nport_min = 80\n",
            2,
            "relay.port_min = 80 is invalid: must be between 1024 and 65535",
        );
        fails(
            "[relay]\nport_max = 65536\n",
            2,
            "relay.port_max = 65536 is invalid",
        );
        fails(
            "[relay]\nport_min = 60000\nport_max = 50000\n",
            3,
            "relay.port_max = 50000 is invalid: must be >= relay.port_min (60000)",
        );
        let m = err("[limits]\n[relay]\nport_max = 2000\n");
        assert!(
            m.contains(
                "t.toml:3: relay.port_max = 2000 is invalid: must be >= relay.port_min (49152)"
            ),
            "{m}"
        );
        let c = parse("[relay]\nport_min = 50000\nport_max = 50000\n").unwrap();
        assert_eq!((c.relay.port_min, c.relay.port_max), (50000, 50000));
    }

    // ---- [auth] --------------------------------------------------------------

    #[test]
    fn auth_scalar_rules() {
        fails(
            "[auth]\nnonce_lifetime_secs = 29\n",
            2,
            "auth.nonce_lifetime_secs = 29 is invalid",
        );
        fails(
            "[auth]\nnonce_lifetime_secs = 86401\n",
            2,
            "auth.nonce_lifetime_secs",
        );
        fails(
            "[auth]\nrest_separator = \"\"\n",
            2,
            "auth.rest_separator = \"\" is invalid",
        );
        fails(
            "[auth]\nrest_separator = \"::\"\n",
            2,
            "auth.rest_separator",
        );
        fails("[auth]\nrest_separator = \"x\"\n", 2, "auth.rest_separator");
        fails("[auth]\nrest_separator = \"7\"\n", 2, "auth.rest_separator");
        fails("[auth]\nrest_separator = \" \"\n", 2, "auth.rest_separator");
        fails(
            "[auth]\nrest_max_ttl_secs = 0\n",
            2,
            "auth.rest_max_ttl_secs = 0 is invalid",
        );
        fails(
            "[auth]\nrest_max_ttl_secs = 99999999999\n",
            2,
            "auth.rest_max_ttl_secs",
        );
        fails(
            "[auth]\nsecret_env = \"MY-VAR\"\n",
            2,
            "auth.secret_env = \"MY-VAR\" is invalid",
        );
        fails("[auth]\nsecret_env = \"A=B\"\n", 2, "auth.secret_env");
        fails("[auth]\nsecret_env = \"1ABC\"\n", 2, "auth.secret_env");
        fails(
            "[auth]\nsecret_file = \"a\\u0000b\"\n",
            2,
            "auth.secret_file",
        );
        let c = parse("[auth]\nsecret_file = \"\"\nsecret_env = \"\"\n").unwrap();
        assert_eq!((c.auth.secret_file, c.auth.secret_env), (None, None));
    }

    #[test]
    fn user_with_both_password_and_key() {
        let m = fails(
            "[auth]\n\n[[auth.users]]\nname = \"carol\"\npassword = \"hunter2\"\nkey = \"0x0123456789abcdef0123456789abcdef\"\n",
            3,
            "auth.users[0] (name \"carol\") is invalid: sets both password and key",
        );
        assert!(
            !m.contains("hunter2") && !m.contains("0123456789abcdef"),
            "{m}"
        );
    }

    #[test]
    fn user_with_neither_password_nor_key() {
        fails(
            "[[auth.users]]\nname = \"a\"\npassword = \"p\"\n[[auth.users]]\nname = \"dave\"\n",
            4,
            "auth.users[1] (name \"dave\") is invalid: needs a password or a key",
        );
    }

    #[test]
    fn user_name_rules() {
        fails(
            "[[auth.users]]\npassword = \"p\"\n",
            1,
            "auth.users[0] is invalid: missing name",
        );
        fails(
            "[[auth.users]]\nname = \"\"\npassword = \"p\"\n",
            2,
            "auth.users[0].name = \"\"",
        );
        fails(
            &format!(
                "[[auth.users]]\nname = \"{}\"\npassword = \"p\"\n",
                "n".repeat(509)
            ),
            2,
            "auth.users[0].name",
        );
        fails(
            "[[auth.users]]\nname = \"a\\tb\"\npassword = \"p\"\n",
            2,
            "auth.users[0].name",
        );
        fails(
            "[[auth.users]]\nname = \"eve\"\npassword = \"p\"\n[[auth.users]]\nname = \"eve\"\npassword = \"q\"\n",
            5,
            "auth.users[1].name = \"eve\" is invalid: same name as auth.users[0]",
        );
        // Anything else goes, the REST separator included (documented).
        parse("[[auth.users]]\nname = \"1700000000:frank\"\npassword = \"p\"\n").unwrap();
    }

    #[test]
    fn user_secret_errors_never_show_the_secret() {
        let m = fails(
            "[[auth.users]]\nname = \"a\"\nkey = \"0xnot-hex-SECRETVALUE\"\n",
            3,
            "auth.users[0].key is invalid",
        );
        assert!(!m.contains("SECRETVALUE"), "{m}");
        let m = fails(
            "[[auth.users]]\nname = \"a\"\nkey = \"0x0123\"\n",
            3,
            "auth.users[0].key",
        );
        assert!(!m.contains("0123"), "{m}");
        let m = fails(
            "[[auth.users]]\nname = \"a\"\npassword = 12345678\n",
            3,
            "auth.users[0].password",
        );
        assert!(!m.contains("12345678"), "{m}");
        let m = fails(
            "[[auth.users]]\nname = \"a\"\nkey = 987654321\n",
            3,
            "auth.users[0].key",
        );
        assert!(!m.contains("987654321"), "{m}");
        assert!(m.contains("expected a string"), "{m}");
        let m = fails("[auth]\nusers = [\"bob:hunter2\"]\n", 2, "auth.users[0]");
        assert!(
            !m.contains("hunter2") && m.contains("expected a table"),
            "{m}"
        );
        let m = fails("[auth]\nusers = \"bob:hunter2\"\n", 2, "auth.users");
        assert!(
            !m.contains("hunter2") && m.contains("expected an array"),
            "{m}"
        );
        fails(
            "[[auth.users]]\nname = \"a\"\npassword = \"\"\n",
            3,
            "auth.users[0].password is invalid: must not be empty",
        );
        // Key without 0x, any case, is accepted and normalised.
        let c = parse("[[auth.users]]\nname = \"a\"\nkey = \"0123456789ABCDEF0123456789ABCDEF\"\n")
            .unwrap();
        assert_eq!(
            c.auth.users[0].secret,
            UserSecret::Md5KeyHex("0123456789abcdef0123456789abcdef".into())
        );
    }

    #[test]
    fn debug_redacts_user_secrets() {
        let c = parse(FULL).unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("alice-pass"), "{debug}");
        assert!(
            !debug.to_lowercase().contains("0123456789abcdef"),
            "{debug}"
        );
        assert!(debug.contains(REDACTED));
    }

    // ---- [limits] ------------------------------------------------------------

    #[test]
    fn limits_rules() {
        let cases: &[(&str, &str)] = &[
            (
                "allocations_per_user = -1",
                "limits.allocations_per_user = -1 is invalid",
            ),
            (
                "allocations_per_user = 4294967296",
                "limits.allocations_per_user = 4294967296 is invalid: must be between 0 and 4294967295",
            ),
            (
                "total_allocations = 0",
                "limits.total_allocations = 0 is invalid: must be between 1 and 4294967295",
            ),
            (
                "permissions_per_allocation = 0",
                "limits.permissions_per_allocation = 0 is invalid",
            ),
            (
                "channels_per_allocation = 0",
                "limits.channels_per_allocation = 0 is invalid",
            ),
            (
                "channels_per_allocation = 4097",
                "limits.channels_per_allocation = 4097 is invalid: must be between 1 and 4096",
            ),
            (
                "default_lifetime_secs = 59",
                "limits.default_lifetime_secs = 59 is invalid",
            ),
            (
                "max_lifetime_secs = 86401",
                "limits.max_lifetime_secs = 86401 is invalid",
            ),
            (
                "max_lifetime_secs = 10",
                "limits.max_lifetime_secs = 10 is invalid",
            ),
            (
                "permission_lifetime_secs = 299",
                "limits.permission_lifetime_secs = 299 is invalid",
            ),
            (
                "permission_lifetime_secs = 3601",
                "limits.permission_lifetime_secs",
            ),
            (
                "channel_lifetime_secs = 599",
                "limits.channel_lifetime_secs = 599 is invalid",
            ),
            (
                "channel_lifetime_secs = 3601",
                "limits.channel_lifetime_secs",
            ),
            (
                "allocation_bandwidth_bytes_per_sec = -5",
                "limits.allocation_bandwidth_bytes_per_sec = -5",
            ),
            (
                "unauth_replies_per_sec = -1",
                "limits.unauth_replies_per_sec = -1",
            ),
            (
                "unauth_replies_burst = 0",
                "limits.unauth_replies_burst = 0 is invalid: must be at least 1 while",
            ),
            (
                "allocation_bandwidth_bytes_per_sec = -1",
                "limits.allocation_bandwidth_bytes_per_sec = -1 is invalid: must be at least 0",
            ),
        ];
        for (line, expected) in cases {
            fails(&format!("[limits]\n{line}\n"), 2, expected);
        }
        parse("[limits]\nunauth_replies_per_sec = 0\nunauth_replies_burst = 0\n").unwrap();
    }

    #[test]
    fn lifetime_order() {
        fails(
            "[limits]\ndefault_lifetime_secs = 600\nmax_lifetime_secs = 300\n",
            3,
            "limits.max_lifetime_secs = 300 is invalid: must be >= limits.default_lifetime_secs (600)",
        );
        fails(
            "[limits]\ndefault_lifetime_secs = 7200\n",
            2,
            "limits.default_lifetime_secs = 7200 is invalid: must be <= limits.max_lifetime_secs (3600)",
        );
    }

    #[test]
    fn all_issues_reported_at_once() {
        let e = parse("threads = -1\n[limits]\ntotal_allocations = 0\n").unwrap_err();
        let keys: Vec<&str> = e.issues().iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["threads", "limits.total_allocations"]);
        assert_eq!(e.issues()[1].line, Some(3));
        assert_eq!(e.to_string().lines().count(), 2);
        // Sorted by line, whatever order the checks ran in.
        let e = parse("[auth]\nusers = [{ name = \"x\" }]\nrest_separator = \"ab\"\n").unwrap_err();
        let lines: Vec<_> = e.issues().iter().map(|i| i.line).collect();
        assert_eq!(lines, [Some(2), Some(3)]);
    }

    // ---- [peers] -------------------------------------------------------------

    #[test]
    fn peer_rules() {
        fails(
            "[peers]\nallow = [\"10.0.0/8\"]\n",
            2,
            "peers.allow[0] = \"10.0.0/8\" is invalid",
        );
        fails(
            "[peers]\ndeny = [\"ten\"]\n",
            2,
            "peers.deny[0] = \"ten\" is invalid",
        );
        fails("[peers]\nallow = [\"10.0.0.0/33\"]\n", 2, "peers.allow[0]");
        let m = fails(
            "[peers]\nallow = [\"192.168.1.1/16\"]\n",
            2,
            "peers.allow[0]",
        );
        assert!(m.contains("did you mean \"192.168.0.0/16\"?"), "{m}");
        fails(
            "[peers]\nallow = [\"127.0.0.0/8\"]\n",
            2,
            "peers.allow_loopback_peers = true",
        );
        fails("[peers]\nallow = [\"::1\"]\n", 2, "peers.allow[0]");
        fails(
            "[peers]\nallow = [\"169.254.169.254\"]\n",
            2,
            "peers.allow[0] = \"169.254.169.254\" is invalid: link-local",
        );
        fails("[peers]\nallow = [\"0.0.0.0/8\"]\n", 2, "peers.allow[0]");
        fails("[peers]\nallow = [\"fe80::/64\"]\n", 2, "peers.allow[0]");
        fails("[peers]\nallow = [\"239.0.0.0/8\"]\n", 2, "peers.allow[0]");
        fails("[peers]\nallow = [\"255.255.255.255\"]\n", 2, "broadcast");
        fails(
            "[peers]\nallow = [\"::ffff:10.0.0.0/104\"]\n",
            2,
            "IPv4-mapped",
        );
        fails(
            "[peers]\ndeny = [\"::ffff:10.0.0.0/104\"]\n",
            2,
            "peers.deny[0]",
        );
        fails("[peers]\nallow = [\"64:ff9b::a00:0/104\"]\n", 2, "NAT64");
        fails(
            "[peers]\nallow = [\"::10.0.0.0/104\"]\n",
            2,
            "IPv4-compatible",
        );
        fails(
            "[peers]\nallow = [\n  \"10.0.0.0/8\",\n  \"bogus\",\n]\n",
            4,
            "peers.allow[1] = \"bogus\"",
        );
        // Broad entries that merely include never-open space are fine; the
        // policy still keeps those parts closed.
        parse("[peers]\nallow = [\"0.0.0.0/0\", \"::/0\"]\ndeny = [\"169.254.0.0/16\"]\n").unwrap();
    }

    // ---- REST secrets ------------------------------------------------------------

    #[test]
    fn secrets_none_configured() {
        assert!(Config::default().load_rest_secrets().unwrap().is_empty());
    }

    #[test]
    fn secrets_from_file_with_comments_blank_lines_and_crlf() {
        let file = TempFile::new(
            format!("# rotation: newest first\r\n\r\n{S1}\r\n   \n  {S2}  \n# {S3}\n{S1}\n")
                .as_bytes(),
        );
        let secrets = with_secret_file(&file.0).load_rest_secrets().unwrap();
        assert_eq!(
            secrets,
            vec![S1.as_bytes().to_vec(), S2.as_bytes().to_vec()]
        );
    }

    #[test]
    fn secrets_file_missing_names_path() {
        let path = std::env::temp_dir().join("turnpike-config-test-does-not-exist");
        let e = with_secret_file(&path).load_rest_secrets().unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, ConfigError::SecretFile { .. }), "{m}");
        assert!(m.contains(&path.display().to_string()), "{m}");
    }

    #[test]
    fn secrets_file_empty() {
        for contents in ["", "\n\n", "# only a comment\n\n"] {
            let file = TempFile::new(contents.as_bytes());
            let m = with_secret_file(&file.0)
                .load_rest_secrets()
                .unwrap_err()
                .to_string();
            assert_eq!(m, format!("no secrets in {}", file.0.display()));
        }
    }

    #[test]
    fn secrets_too_short_are_rejected_without_echo() {
        let file = TempFile::new(format!("{S1}\nshortpw\n").as_bytes());
        let m = with_secret_file(&file.0)
            .load_rest_secrets()
            .unwrap_err()
            .to_string();
        assert!(m.contains(&format!("{}:2", file.0.display())), "{m}");
        assert!(m.contains("too short (7 bytes"), "{m}");
        assert!(!m.contains("shortpw"), "{m}");

        let e = with_secret_env("S")
            .load_rest_secrets_with(env("S", &format!("{S1},tiny")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("environment variable S, secret #2"), "{e}");
        assert!(!e.contains("tiny"), "{e}");
    }

    #[test]
    fn secrets_from_env_comma_and_whitespace() {
        let c = with_secret_env("TP_SECRETS");
        let got = c
            .load_rest_secrets_with(env("TP_SECRETS", &format!("{S1},{S2}")))
            .unwrap();
        assert_eq!(got, vec![S1.as_bytes().to_vec(), S2.as_bytes().to_vec()]);
        let got = c
            .load_rest_secrets_with(env("TP_SECRETS", &format!(" {S1}\n\t{S2} ,, {S3}\n")))
            .unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[2], S3.as_bytes());
    }

    #[test]
    fn secrets_env_unset_or_empty() {
        let name = "TURNPIKE_CONFIG_TEST_SURELY_UNSET_7f3a";
        let m = with_secret_env(name)
            .load_rest_secrets()
            .unwrap_err()
            .to_string();
        assert_eq!(
            m,
            format!("auth.secret_env: environment variable {name} is not set")
        );
        let m = with_secret_env("E")
            .load_rest_secrets_with(env("E", " , \n"))
            .unwrap_err()
            .to_string();
        assert_eq!(m, "no secrets in environment variable E");
    }

    #[test]
    fn secrets_from_file_and_env_together() {
        let file = TempFile::new(format!("{S1}\n{S2}\n").as_bytes());
        let mut c = with_secret_file(&file.0);
        c.auth.secret_env = Some("TP".into());
        let got = c
            .load_rest_secrets_with(env("TP", &format!("{S2},{S3}")))
            .unwrap();
        assert_eq!(
            got,
            vec![
                S1.as_bytes().to_vec(),
                S2.as_bytes().to_vec(),
                S3.as_bytes().to_vec()
            ]
        );
    }

    #[test]
    fn load_resolves_relative_secret_file_against_config_dir() {
        let config = TempFile::new(b"[auth]\nsecret_file = \"secrets.txt\"\n");
        let c = Config::load(&config.0).unwrap();
        assert_eq!(
            c.auth.secret_file,
            Some(config.0.parent().unwrap().join("secrets.txt"))
        );
        let absolute = TempFile::new(b"[auth]\nsecret_file = \"/etc/turnpike/secrets\"\n");
        let c = Config::load(&absolute.0).unwrap();
        assert_eq!(
            c.auth.secret_file,
            Some(PathBuf::from("/etc/turnpike/secrets"))
        );
    }

    #[test]
    fn load_errors_name_the_file() {
        let path = std::env::temp_dir().join("turnpike-config-test-no-such-config.toml");
        let m = Config::load(&path).unwrap_err().to_string();
        assert!(
            m.starts_with("cannot read config file") && m.contains(&path.display().to_string()),
            "{m}"
        );
        let bad = TempFile::new(b"\n\nthreads = 99999\n");
        let m = Config::load(&bad.0).unwrap_err().to_string();
        assert!(
            m.starts_with(&format!("{}:3: threads = 99999", bad.0.display())),
            "{m}"
        );
    }

    // ---- redacted printout ---------------------------------------------------------

    #[test]
    fn redacted_toml_hides_secrets_and_reparses() {
        let c = parse(FULL).unwrap();
        let out = c.to_redacted_toml();
        assert!(!out.contains("alice-pass"), "{out}");
        assert!(!out.to_lowercase().contains("0123456789abcdef"), "{out}");
        assert_eq!(out.matches(REDACTED).count(), 2, "{out}");
        // Paths and variable names are not secrets.
        assert!(out.contains("/etc/turnpike/secrets") && out.contains("TURNPIKE_SECRETS"));
        let table: toml::Table = toml::from_str(&out).unwrap();
        assert_eq!(table["auth"]["users"][0]["name"].as_str(), Some("alice"));
        assert_eq!(table["limits"]["total_allocations"].as_integer(), Some(5));

        // Without users, the printout is itself a valid config equal to the input.
        let mut no_users = c.clone();
        no_users.auth.users.clear();
        assert_eq!(parse(&no_users.to_redacted_toml()).unwrap(), no_users);
    }

    #[test]
    fn redacted_toml_of_defaults_shows_every_key() {
        let out = Config::default().to_redacted_toml();
        assert_eq!(parse(&out).unwrap(), Config::default());
        for key in [
            "realm",
            "software",
            "threads",
            "listen",
            "log_format",
            "log_level",
            "address",
            "address_v6",
            "external_address",
            "external_address_v6",
            "port_min",
            "port_max",
            "nonce_lifetime_secs",
            "secret_file",
            "secret_env",
            "rest_separator",
            "rest_max_ttl_secs",
            "users",
            "allocations_per_user",
            "total_allocations",
            "permissions_per_allocation",
            "channels_per_allocation",
            "default_lifetime_secs",
            "max_lifetime_secs",
            "permission_lifetime_secs",
            "channel_lifetime_secs",
            "allocation_bandwidth_bytes_per_sec",
            "unauth_replies_per_sec",
            "unauth_replies_burst",
            "allow",
            "deny",
            "allow_loopback_peers",
        ] {
            assert!(
                out.contains(&format!("{key} = ")),
                "{key} missing in:\n{out}"
            );
        }
    }

    #[test]
    fn validate_checks_configs_built_in_code() {
        let mut c = Config::default();
        c.limits.channels_per_allocation = 5000;
        let m = c.validate().unwrap_err().to_string();
        assert!(m.contains("limits.channels_per_allocation = 5000"), "{m}");
        assert!(m.starts_with("<config>:"), "{m}");
    }

    // ---- permissions of files holding secrets ---------------------------

    fn chmod(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn permission_warnings_name_the_file_its_mode_and_the_fix() {
        let secret = TempFile::new(b"0123456789abcdef0123\n");
        let token = TempFile::new(b"token-0123456789abcdef\n");
        let config_file = TempFile::new(b"# the config\n");
        let mut c = with_secret_file(&secret.0);
        c.api.token_file = Some(token.0.clone());
        for f in [&secret, &token, &config_file] {
            chmod(&f.0, 0o600);
        }
        assert_eq!(c.permission_warnings(&config_file.0), Vec::new());

        chmod(&secret.0, 0o644);
        chmod(&token.0, 0o640);
        let w = c.permission_warnings(&config_file.0);
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!((w[0].key, w[0].mode), ("auth.secret_file", 0o644));
        let m = w[0].to_string();
        for part in [
            "auth.secret_file",
            &secret.0.display().to_string(),
            "0644",
            "all other users",
            &format!("chmod 600 {}", secret.0.display()),
        ] {
            assert!(m.contains(part), "{part:?} missing in: {m}");
        }
        assert_eq!((w[1].key, w[1].mode), ("api.token_file", 0o640));
        assert!(w[1].to_string().contains("its group"), "{}", w[1]);
        assert!(!w[1].to_string().contains("other users"), "{}", w[1]);
        // Write access alone is as bad: whoever writes the file chooses the secret.
        chmod(&secret.0, 0o602);
        chmod(&token.0, 0o600);
        assert_eq!(c.permission_warnings(&config_file.0).len(), 1);
        chmod(&secret.0, 0o400);
        assert_eq!(c.permission_warnings(&config_file.0), Vec::new());

        // The config file counts only when it holds clear-text passwords.
        chmod(&config_file.0, 0o644);
        assert_eq!(c.permission_warnings(&config_file.0), Vec::new());
        c.auth.users.push(UserEntry {
            name: "k".into(),
            secret: UserSecret::Md5KeyHex("00".repeat(16)),
        });
        assert_eq!(c.permission_warnings(&config_file.0), Vec::new());
        c.auth.users.push(UserEntry {
            name: "p".into(),
            secret: UserSecret::Password("hunter2-hunter2".into()),
        });
        let w = c.permission_warnings(&config_file.0);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].key, "auth.users");
        let m = w[0].to_string();
        assert!(m.contains("password") && m.contains("0644") && m.contains("chmod 600"));
        assert!(!m.contains("hunter2"), "{m}");
        chmod(&config_file.0, 0o600);
        assert_eq!(c.permission_warnings(&config_file.0), Vec::new());

        // A file that cannot be inspected is left to the loader to report.
        c.auth.secret_file = Some(PathBuf::from("/nonexistent/turnpike/secret"));
        assert_eq!(c.permission_warnings(&config_file.0), Vec::new());
    }

    #[test]
    fn permission_warnings_name_a_foreign_owner() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED permission_warnings_name_a_foreign_owner: needs root to chown");
            return;
        }
        let secret = TempFile::new(b"0123456789abcdef0123\n");
        chmod(&secret.0, 0o600);
        let c = with_secret_file(&secret.0);
        assert_eq!(c.permission_warnings(Path::new("/nonexistent")), Vec::new());
        std::os::unix::fs::chown(&secret.0, Some(65534), None).unwrap();
        let w = c.permission_warnings(Path::new("/nonexistent"));
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].uid, 65534);
        let m = w[0].to_string();
        assert!(m.contains("uid 65534") && m.contains("chown root "), "{m}");
    }
}
