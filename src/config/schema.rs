//! The configuration's two shapes, table by table: the public typed structs with
//! their defaults, and the private `raw` mirror of the file that serde reads and
//! writes. A key is declared here twice (typed field and default, raw field and
//! its `from_typed` line) and checked once, in `validate.rs`.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use ipnet::IpNet;

/// The daemon's configuration, defaults filled in and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub realm: String,
    /// SOFTWARE attribute value; empty means the attribute is never sent.
    pub software: String,
    /// Number of I/O shards; 0 means one per CPU core.
    pub threads: usize,
    /// UDP listeners.
    pub listen: Vec<SocketAddr>,
    /// TCP listeners (RFC 8656 stream framing; the relays stay UDP). Empty: none.
    pub tcp_listen: Vec<SocketAddr>,
    /// TLS listeners (`turns:`); each also serves plain TCP on its port. Empty: none.
    pub tls_listen: Vec<SocketAddr>,
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
    pub tls: TlsConfig,
    pub proxy_protocol: ProxyProtocolConfig,
    pub nat_discovery: NatDiscoveryConfig,
    pub usage: UsageConfig,
    pub fleet: FleetConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            realm: "turnpike".to_owned(),
            software: String::new(),
            threads: 0,
            listen: vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, 3478))],
            tcp_listen: Vec::new(),
            tls_listen: Vec::new(),
            log_format: LogFormat::Text,
            log_level: "info".to_owned(),
            public_host: String::new(),
            drain_secs: 30,
            relay: RelayConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            peers: PeersConfig::default(),
            api: ApiConfig::default(),
            tls: TlsConfig::default(),
            proxy_protocol: ProxyProtocolConfig::default(),
            nat_discovery: NatDiscoveryConfig::default(),
            usage: UsageConfig::default(),
            fleet: FleetConfig::default(),
        }
    }
}

/// The certificate the TLS listeners serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM chain, leaf first. `Config::load` resolves a relative path against the file's
    /// directory.
    pub cert_file: Option<PathBuf>,
    /// PEM private key, likewise.
    pub key_file: Option<PathBuf>,
    /// From accept until the PROXY header and the TLS handshake are done.
    pub handshake_timeout_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert_file: None,
            key_file: None,
            handshake_timeout_secs: 10,
        }
    }
}

/// Stream listeners behind a load balancer that speaks the PROXY protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyProtocolConfig {
    /// Entries of `tcp_listen` or `tls_listen` whose connections start with a PROXY header.
    pub listeners: Vec<SocketAddr>,
    /// Sources allowed to send the header; empty = any.
    pub trusted: Vec<IpNet>,
}

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
    pub address: RelayIp,
    pub address_v6: Option<Ipv6Addr>,
    pub external_address: Option<Ipv4Addr>,
    pub external_address_v6: Option<Ipv6Addr>,
    /// Inclusive relay port range.
    pub port_min: u16,
    pub port_max: u16,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            address: RelayIp::Auto,
            address_v6: None,
            external_address: None,
            external_address_v6: None,
            port_min: 49152,
            port_max: 65535,
        }
    }
}

/// `relay.address`: the IPv4 address relay sockets bind to, or "auto". (What the core gets, once
/// resolved, is a `proto::server::RelayAddress`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayIp {
    /// The address of the interface holding the default route; the daemon
    /// resolves it at start.
    Auto,
    Ip(Ipv4Addr),
}

impl fmt::Display for RelayIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayIp::Auto => f.write_str("auto"),
            RelayIp::Ip(ip) => ip.fmt(f),
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
    /// File of nonce keys shared by the instances of a fleet (first issues, all verify);
    /// resolved like `secret_file`. Neither this nor `nonce_key_env`: a random key per run.
    pub nonce_key_file: Option<PathBuf>,
    /// Environment variable holding nonce keys (comma- or space-separated).
    pub nonce_key_env: Option<String>,
    /// Separator between expiry and user in REST usernames.
    pub rest_separator: char,
    pub rest_max_ttl_secs: u64,
    pub users: Vec<UserEntry>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            nonce_lifetime_secs: 600,
            secret_file: None,
            secret_env: None,
            nonce_key_file: None,
            nonce_key_env: None,
            rest_separator: ':',
            rest_max_ttl_secs: 48 * 3600,
            users: Vec::new(),
        }
    }
}

/// A static long-term-credential user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    pub name: String,
    pub secret: UserSecret,
}

/// `Debug` is written by hand in `print.rs`: it must never show the secret.
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
            UserSecret::Md5KeyHex(hex) => crate::proto::auth::parse_md5_key_hex(hex).ok(),
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
    /// TCP and TLS client connections open at once, on the whole server.
    pub connections_total: u32,
    /// Connections open at once from one source address (IPv6 by /64); 0 = unlimited.
    pub connections_per_source: u32,
    /// A connection without an allocation that sends nothing for this long is closed.
    pub connection_idle_secs: u64,
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
            // Connections are the I/O layer's, not the core's: their defaults live here.
            connections_total: 20_000,
            connections_per_source: 256,
            connection_idle_secs: 60,
        }
    }
}

/// Everything empty/false: the policy's default-deny list alone applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeersConfig {
    /// Normalised networks (no host bits, never an IPv4-in-IPv6 spelling).
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    pub allow_loopback_peers: bool,
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

/// `[fleet]`: several instances sharing revocations through Redis; off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetConfig {
    /// `redis://[user:password@]host[:port][/db]`; None = this instance works alone.
    pub redis_url: Option<String>,
    /// This instance's name in the fleet; empty = the host name.
    pub instance: String,
}

/// `[usage]`: usage records, one JSON line per allocation when it ends; off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageConfig {
    /// Where the records go (appended; reopened on SIGHUP, for logrotate). `Config::load`
    /// resolves a relative path against the config file's directory.
    pub file: Option<PathBuf>,
    /// Also a record for each live allocation this often; 0 = only when allocations end.
    pub interval_secs: u64,
}

/// `[nat_discovery]`: RFC 5780 NAT behaviour discovery, per family; off (both `None`) by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatDiscoveryConfig {
    pub v4: Option<DiscoveryAddresses>,
    pub v6: Option<DiscoveryAddresses>,
}

/// One family's RFC 5780 addresses: IP1:P1 and IP2:P2. The daemon also listens on IP1:P2 and
/// IP2:P1 (`proto::discovery::NatDiscovery` does the arithmetic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscoveryAddresses {
    /// One of the `listen` entries: a concrete address with a fixed port.
    pub primary: SocketAddr,
    /// Another IP and another port of this host, in the same family.
    pub alternate: SocketAddr,
}

impl NatDiscoveryConfig {
    pub fn families(&self) -> impl Iterator<Item = DiscoveryAddresses> + '_ {
        self.v4.iter().chain(self.v6.iter()).copied()
    }
}

pub(super) mod raw {
    //! Mirrors of the file's tables: strings for addresses, paths and CIDRs,
    //! `i64` for every integer, so serde only ever reports syntax errors, wrong
    //! types and unknown keys, and every semantic message is ours. Filled from a
    //! typed `Config` they also print it, so the printout always re-parses, and
    //! their defaults come from the typed ones, so each default is written once.

    use std::path::PathBuf;

    use serde::{Deserialize, Serialize};

    use crate::config::{self as typed, UserSecret, REDACTED};

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub(crate) struct Config {
        pub realm: String,
        pub software: String,
        pub threads: i64,
        pub listen: Vec<String>,
        pub tcp_listen: Vec<String>,
        pub tls_listen: Vec<String>,
        pub log_format: String,
        pub log_level: String,
        pub public_host: String,
        pub drain_secs: i64,
        pub relay: Relay,
        pub auth: Auth,
        pub limits: Limits,
        pub peers: Peers,
        pub api: Api,
        pub tls: Tls,
        pub proxy_protocol: ProxyProtocol,
        pub nat_discovery: NatDiscovery,
        pub usage: Usage,
        pub fleet: Fleet,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub(crate) struct Tls {
        pub cert_file: String,
        pub key_file: String,
        pub handshake_timeout_secs: i64,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub(crate) struct ProxyProtocol {
        pub listeners: Vec<String>,
        pub trusted: Vec<String>,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub(crate) struct Relay {
        pub address: String,
        pub address_v6: String,
        pub external_address: String,
        pub external_address_v6: String,
        pub port_min: i64,
        pub port_max: i64,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub(crate) struct Auth {
        pub nonce_lifetime_secs: i64,
        pub secret_file: String,
        pub secret_env: String,
        pub nonce_key_file: String,
        pub nonce_key_env: String,
        pub rest_separator: String,
        pub rest_max_ttl_secs: i64,
        pub users: Vec<User>,
    }

    /// No defaults: a missing name, password or key is reported, not filled in.
    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub(crate) struct User {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub password: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub key: Option<String>,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub(crate) struct Limits {
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
        pub connections_total: i64,
        pub connections_per_source: i64,
        pub connection_idle_secs: i64,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub(crate) struct Peers {
        pub allow: Vec<String>,
        pub deny: Vec<String>,
        pub allow_loopback_peers: bool,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub(crate) struct Api {
        pub listen: String,
        pub token_file: String,
        pub default_ttl_secs: i64,
        pub max_ttl_secs: i64,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub(crate) struct Fleet {
        pub redis_url: String,
        pub instance: String,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub(crate) struct Usage {
        pub file: String,
        pub interval_secs: i64,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    pub(crate) struct NatDiscovery {
        pub primary: String,
        pub alternate: String,
        pub primary_v6: String,
        pub alternate_v6: String,
    }

    /// `None` is written as "", which the validator reads back as `None`.
    fn opt<T: ToString>(value: &Option<T>) -> String {
        value.as_ref().map(T::to_string).unwrap_or_default()
    }

    fn opt_path(value: &Option<PathBuf>) -> String {
        value
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    // Integers in the public types are bounded well below i64::MAX by
    // validation; saturate rather than wrap for configs built in code.
    fn int<T: TryInto<i64>>(value: T) -> i64 {
        value.try_into().unwrap_or(i64::MAX)
    }

    impl Config {
        pub(crate) fn from_typed(c: &typed::Config, redact: bool) -> Config {
            Config {
                realm: c.realm.clone(),
                software: c.software.clone(),
                threads: int(c.threads),
                listen: c.listen.iter().map(ToString::to_string).collect(),
                tcp_listen: c.tcp_listen.iter().map(ToString::to_string).collect(),
                tls_listen: c.tls_listen.iter().map(ToString::to_string).collect(),
                log_format: c.log_format.to_string(),
                log_level: c.log_level.clone(),
                public_host: c.public_host.clone(),
                drain_secs: int(c.drain_secs),
                relay: Relay::from_typed(&c.relay),
                auth: Auth::from_typed(&c.auth, redact),
                limits: Limits::from_typed(&c.limits),
                peers: Peers::from_typed(&c.peers),
                api: Api::from_typed(&c.api),
                tls: Tls::from_typed(&c.tls),
                proxy_protocol: ProxyProtocol::from_typed(&c.proxy_protocol),
                nat_discovery: NatDiscovery::from_typed(&c.nat_discovery),
                usage: Usage::from_typed(&c.usage),
                fleet: Fleet::from_typed(&c.fleet, redact),
            }
        }
    }

    impl Tls {
        fn from_typed(t: &typed::TlsConfig) -> Tls {
            Tls {
                cert_file: opt_path(&t.cert_file),
                key_file: opt_path(&t.key_file),
                handshake_timeout_secs: int(t.handshake_timeout_secs),
            }
        }
    }

    impl ProxyProtocol {
        fn from_typed(p: &typed::ProxyProtocolConfig) -> ProxyProtocol {
            ProxyProtocol {
                listeners: p.listeners.iter().map(ToString::to_string).collect(),
                trusted: p.trusted.iter().map(ToString::to_string).collect(),
            }
        }
    }

    impl Fleet {
        fn from_typed(f: &typed::FleetConfig, redact: bool) -> Fleet {
            // A password in the URL is a secret: check-config prints it redacted.
            let url = match &f.redis_url {
                Some(u) if redact && u.contains('@') => REDACTED.to_owned(),
                u => opt(u),
            };
            Fleet {
                redis_url: url,
                instance: f.instance.clone(),
            }
        }
    }

    impl Usage {
        fn from_typed(u: &typed::UsageConfig) -> Usage {
            Usage {
                file: opt_path(&u.file),
                interval_secs: int(u.interval_secs),
            }
        }
    }

    impl NatDiscovery {
        fn from_typed(n: &typed::NatDiscoveryConfig) -> NatDiscovery {
            NatDiscovery {
                primary: opt(&n.v4.map(|a| a.primary)),
                alternate: opt(&n.v4.map(|a| a.alternate)),
                primary_v6: opt(&n.v6.map(|a| a.primary)),
                alternate_v6: opt(&n.v6.map(|a| a.alternate)),
            }
        }
    }

    impl Relay {
        fn from_typed(r: &typed::RelayConfig) -> Relay {
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
        fn from_typed(a: &typed::AuthConfig, redact: bool) -> Auth {
            let secret = |s: String| if redact { REDACTED.to_owned() } else { s };
            Auth {
                nonce_lifetime_secs: int(a.nonce_lifetime_secs),
                secret_file: opt_path(&a.secret_file),
                secret_env: opt(&a.secret_env),
                nonce_key_file: opt_path(&a.nonce_key_file),
                nonce_key_env: opt(&a.nonce_key_env),
                rest_separator: a.rest_separator.to_string(),
                rest_max_ttl_secs: int(a.rest_max_ttl_secs),
                users: a
                    .users
                    .iter()
                    .map(|u| {
                        let (password, key) = match &u.secret {
                            UserSecret::Password(p) => (Some(secret(p.clone())), None),
                            UserSecret::Md5KeyHex(k) => (None, Some(secret(format!("0x{k}")))),
                        };
                        User {
                            name: Some(u.name.clone()),
                            password,
                            key,
                        }
                    })
                    .collect(),
            }
        }
    }

    impl Limits {
        fn from_typed(l: &typed::LimitsConfig) -> Limits {
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
                connections_total: l.connections_total.into(),
                connections_per_source: l.connections_per_source.into(),
                connection_idle_secs: int(l.connection_idle_secs),
            }
        }
    }

    impl Peers {
        fn from_typed(p: &typed::PeersConfig) -> Peers {
            Peers {
                allow: p.allow.iter().map(ToString::to_string).collect(),
                deny: p.deny.iter().map(ToString::to_string).collect(),
                allow_loopback_peers: p.allow_loopback_peers,
            }
        }
    }

    impl Api {
        fn from_typed(a: &typed::ApiConfig) -> Api {
            Api {
                listen: opt(&a.listen),
                token_file: opt_path(&a.token_file),
                default_ttl_secs: int(a.default_ttl_secs),
                max_ttl_secs: int(a.max_ttl_secs),
            }
        }
    }

    macro_rules! default_from_typed {
        ($raw:ident, $typed:ident, $conv:expr) => {
            impl Default for $raw {
                fn default() -> Self {
                    $conv(&typed::$typed::default())
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
    default_from_typed!(Tls, TlsConfig, Tls::from_typed);
    default_from_typed!(
        ProxyProtocol,
        ProxyProtocolConfig,
        ProxyProtocol::from_typed
    );
    default_from_typed!(NatDiscovery, NatDiscoveryConfig, NatDiscovery::from_typed);
    default_from_typed!(Usage, UsageConfig, Usage::from_typed);
    default_from_typed!(Fleet, FleetConfig, |f| Fleet::from_typed(f, false));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.realm, "turnpike");
        assert_eq!(c.software, "");
        assert_eq!(c.threads, 0);
        assert_eq!(c.listen, vec!["0.0.0.0:3478".parse().unwrap()]);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.log_level, "info");
        assert_eq!(c.relay.address, RelayIp::Auto);
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
    fn md5_key_decodes_the_normalised_hex() {
        let key = UserSecret::Md5KeyHex("0123456789abcdef0123456789abcdef".into());
        assert_eq!(key.md5_key().unwrap()[..4], [0x01, 0x23, 0x45, 0x67]);
        assert_eq!(UserSecret::Password("p".into()).md5_key(), None);
    }
}
