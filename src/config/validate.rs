//! Validation: the raw file form into the typed `Config`, one `build_*` per
//! table. Every bad value becomes an `Issue` naming its key and line, and
//! checking goes on with the default in its place, so one run reports every
//! problem in the file. Secret values are never put in a message.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use ipnet::IpNet;

use super::locate::Locator;
use super::schema::raw;
use super::{
    ApiConfig, AuthConfig, Config, DiscoveryAddresses, FleetConfig, Issue, LimitsConfig, LogFormat,
    NatDiscoveryConfig, PeersConfig, ProxyProtocolConfig, RelayConfig, RelayIp, TlsConfig,
    UsageConfig, UserEntry, UserSecret,
};
use crate::proto::discovery::NatDiscovery;
use crate::proto::policy::{self, AddressClass, Ipv4Spelling, Openness};

/// STUN USERNAME must be fewer than 509 bytes (RFC 8489 section 14.3).
const MAX_USERNAME_BYTES: usize = 508;
/// REALM and SOFTWARE must be fewer than 128 characters (RFC 8489 14.9, 14.14).
const MAX_REALM_CHARS: usize = 127;
/// REALM may take up to 763 bytes once quoted-string escapes are decoded.
const MAX_REALM_BYTES: usize = 763;

/// The typed configuration, or every issue found, sorted by line (issues on
/// one line keep their order; those without a line come last).
pub(super) fn build(
    raw: raw::Config,
    locator: &Locator<'_>,
    origin: &str,
) -> Result<Config, Vec<Issue>> {
    let mut cx = Cx {
        origin,
        locator,
        issues: Vec::new(),
    };
    let config = build_config(raw, &mut cx);
    if cx.issues.is_empty() {
        Ok(config)
    } else {
        cx.issues.sort_by_key(|i| i.line.unwrap_or(usize::MAX));
        Err(cx.issues)
    }
}

/// Collects issues while converting.
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

    /// An optional file path ("" = none).
    fn opt_path(&mut self, key: &str, text: &str) -> Option<PathBuf> {
        if text.is_empty() {
            None
        } else if text.contains('\0') {
            self.invalid(key, Q(text), "contains a NUL character");
            None
        } else {
            Some(PathBuf::from(text))
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

fn build_config(raw: raw::Config, cx: &mut Cx<'_>) -> Config {
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
    if raw.listen.is_empty() {
        cx.invalid("listen", "[]", "at least one listener is required");
    }
    let listen = build_listen("listen", &raw.listen, &relay, cx);
    let tcp_listen = build_listen("tcp_listen", &raw.tcp_listen, &relay, cx);
    let tls_listen = build_listen("tls_listen", &raw.tls_listen, &relay, cx);
    // Both are TCP: one port cannot be both (a TLS listener already serves plain TCP too).
    for (i, addr) in tls_listen.iter().enumerate() {
        if let Some(j) = tcp_listen.iter().position(|t| same_socket(*t, *addr)) {
            cx.invalid(
                &format!("tls_listen[{i}]"),
                Q(&addr.to_string()),
                format!(
                    "overlaps tcp_listen[{j}]: a TLS listener also serves plain TCP on its \
                     port, so drop the tcp_listen entry"
                ),
            );
        }
    }
    let tls = build_tls(raw.tls, !tls_listen.is_empty(), cx);
    let proxy_protocol = build_proxy_protocol(raw.proxy_protocol, &tcp_listen, &tls_listen, cx);
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
    let listen = if listen.is_empty() {
        defaults.listen
    } else {
        listen
    };
    let nat_discovery = build_nat_discovery(raw.nat_discovery, &listen, &tcp_listen, &relay, cx);
    let fleet = build_fleet(raw.fleet, cx);
    let usage = UsageConfig {
        file: cx.opt_path("usage.file", &raw.usage.file),
        interval_secs: cx.int("usage.interval_secs", raw.usage.interval_secs, 0, 86400, 0),
    };

    Config {
        realm: raw.realm,
        software: raw.software,
        threads,
        listen,
        tcp_listen,
        tls_listen,
        log_format,
        log_level: raw.log_level,
        public_host: raw.public_host,
        drain_secs,
        relay,
        auth,
        limits,
        peers,
        api,
        tls,
        proxy_protocol,
        nat_discovery,
        usage,
        fleet,
    }
}

fn build_fleet(raw: raw::Fleet, cx: &mut Cx<'_>) -> FleetConfig {
    let redis_url = match raw.redis_url.as_str() {
        "" => None,
        url if url.starts_with("redis://") && redis::Client::open(url).is_ok() => {
            Some(url.to_owned())
        }
        url => {
            // Never echo it: the URL may hold a password.
            let _ = url;
            cx.invalid(
                "fleet.redis_url",
                Q("<redacted>"),
                "must be a redis://[user:password@]host[:port][/db] URL (rediss:// is not supported)",
            );
            None
        }
    };
    let instance = raw.instance.trim().to_owned();
    if !instance
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || instance.len() > 64
    {
        cx.invalid(
            "fleet.instance",
            Q(&raw.instance),
            "must be up to 64 letters, digits, '-', '_' or '.'",
        );
    }
    FleetConfig {
        redis_url,
        instance,
    }
}

/// Whether two listeners would fight over one socket: the same port and family, and the same
/// address or a wildcard on either side.
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn build_tls(raw: raw::Tls, needed: bool, cx: &mut Cx<'_>) -> TlsConfig {
    let d = TlsConfig::default();
    let cert_file = cx.opt_path("tls.cert_file", &raw.cert_file);
    let key_file = cx.opt_path("tls.key_file", &raw.key_file);
    if needed {
        for (key, value) in [("tls.cert_file", &cert_file), ("tls.key_file", &key_file)] {
            if value.is_none() && cx.issues.iter().all(|i| i.key != key) {
                cx.push(
                    key,
                    format!("{key} must be set: tls_listen needs a certificate and its key"),
                );
            }
        }
    }
    let handshake_timeout_secs = cx.int(
        "tls.handshake_timeout_secs",
        raw.handshake_timeout_secs,
        1,
        120,
        d.handshake_timeout_secs,
    );
    TlsConfig {
        cert_file,
        key_file,
        handshake_timeout_secs,
    }
}

fn build_proxy_protocol(
    raw: raw::ProxyProtocol,
    tcp_listen: &[SocketAddr],
    tls_listen: &[SocketAddr],
    cx: &mut Cx<'_>,
) -> ProxyProtocolConfig {
    let mut listeners = Vec::new();
    for (i, text) in raw.listeners.iter().enumerate() {
        let key = format!("proxy_protocol.listeners[{i}]");
        match text.parse::<SocketAddr>() {
            Ok(addr) if tcp_listen.contains(&addr) || tls_listen.contains(&addr) => {
                if listeners.contains(&addr) {
                    cx.invalid(&key, Q(text), "listed twice");
                } else {
                    listeners.push(addr);
                }
            }
            Ok(_) => cx.invalid(
                &key,
                Q(text),
                "is not an entry of tcp_listen or tls_listen (write it exactly as there)",
            ),
            Err(_) => cx.invalid(&key, Q(text), "expected IP:port, as in tcp_listen"),
        }
    }
    let trusted = raw
        .trusted
        .iter()
        .enumerate()
        .filter_map(|(i, text)| {
            let key = format!("proxy_protocol.trusted[{i}]");
            let net = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
            match net {
                Ok(net) => Some(net.trunc()),
                Err(_) => {
                    cx.invalid(
                        &key,
                        Q(text),
                        r#"expected a CIDR such as "10.0.0.0/8", or a single address"#,
                    );
                    None
                }
            }
        })
        .collect();
    ProxyProtocolConfig { listeners, trusted }
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

/// One list of listeners (`listen`, `tcp_listen`): each an IP:port outside the relay range,
/// none overlapping another of the same list.
fn build_listen(
    name: &str,
    raw: &[String],
    relay: &RelayConfig,
    cx: &mut Cx<'_>,
) -> Vec<SocketAddr> {
    let mut listen: Vec<(usize, SocketAddr)> = Vec::new();
    for (i, text) in raw.iter().enumerate() {
        let key = format!("{name}[{i}]");
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
            let clash = listen.iter().find(|(_, other)| same_socket(*other, addr));
            if let Some((j, other)) = clash {
                let reason = if *other == addr {
                    format!("duplicate of {name}[{j}]")
                } else {
                    format!(
                        "overlaps {name}[{j}] ({:?}): a wildcard address already \
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

fn build_nat_discovery(
    raw: raw::NatDiscovery,
    listen: &[SocketAddr],
    tcp_listen: &[SocketAddr],
    relay: &RelayConfig,
    cx: &mut Cx<'_>,
) -> NatDiscoveryConfig {
    let lists = Lists {
        listen,
        tcp_listen,
        relay,
    };
    NatDiscoveryConfig {
        v4: discovery_family(cx, &lists, "", &raw.primary, &raw.alternate),
        v6: discovery_family(cx, &lists, "_v6", &raw.primary_v6, &raw.alternate_v6),
    }
}

/// What the discovery addresses are checked against.
struct Lists<'a> {
    listen: &'a [SocketAddr],
    tcp_listen: &'a [SocketAddr],
    relay: &'a RelayConfig,
}

/// One family's `nat_discovery.primary*` and `nat_discovery.alternate*`: both or neither.
fn discovery_family(
    cx: &mut Cx<'_>,
    lists: &Lists<'_>,
    suffix: &str,
    primary_text: &str,
    alternate_text: &str,
) -> Option<DiscoveryAddresses> {
    let v6 = suffix == "_v6";
    let primary_key = format!("nat_discovery.primary{suffix}");
    let alternate_key = format!("nat_discovery.alternate{suffix}");
    match (primary_text.is_empty(), alternate_text.is_empty()) {
        (true, true) => return None,
        (true, false) => {
            cx.invalid(
                &alternate_key,
                Q(alternate_text),
                format!("needs {primary_key}: the UDP listener it is the alternate of"),
            );
            return None;
        }
        (false, true) => {
            cx.invalid(
                &primary_key,
                Q(primary_text),
                format!("needs {alternate_key}: RFC 5780 needs a second IP and port"),
            );
            return None;
        }
        (false, false) => {}
    }
    let primary = discovery_address(cx, &primary_key, primary_text, v6)?;
    if !lists.listen.contains(&primary) {
        cx.invalid(
            &primary_key,
            Q(primary_text),
            "is not one of the `listen` entries; the primary discovery address must be a UDP \
             listener with a concrete address and port",
        );
        return None;
    }
    let alternate = discovery_address(cx, &alternate_key, alternate_text, v6)?;
    let reason = if alternate.ip() == primary.ip() {
        Some(format!(
            "has the IP address of {primary_key}; RFC 5780 needs a second address of this host"
        ))
    } else if alternate.port() == primary.port() {
        Some(format!(
            "has the port of {primary_key}; RFC 5780 needs a second port"
        ))
    } else if (lists.relay.port_min..=lists.relay.port_max).contains(&alternate.port()) {
        Some(format!(
            "port {} lies inside the relay port range {}-{} (relay.port_min, relay.port_max)",
            alternate.port(),
            lists.relay.port_min,
            lists.relay.port_max
        ))
    } else {
        None
    };
    if let Some(reason) = reason {
        cx.invalid(&alternate_key, Q(alternate_text), reason);
        return None;
    }
    let addresses = NatDiscovery {
        primary,
        alternate,
        tcp: false,
    };
    // TCP listeners join in only where tcp_listen holds the primary (see the daemon).
    let mut taken: Vec<(&str, &SocketAddr)> = lists.listen.iter().map(|l| ("listen", l)).collect();
    if lists.tcp_listen.contains(&primary) {
        taken.extend(lists.tcp_listen.iter().map(|l| ("tcp_listen", l)));
    }
    for extra in addresses.extra_listeners() {
        let clash = taken.iter().find(|(_, l)| {
            l.port() == extra.port()
                && l.is_ipv4() == extra.is_ipv4()
                && (l.ip() == extra.ip() || l.ip().is_unspecified())
        });
        if let Some((list, l)) = clash {
            cx.invalid(
                &alternate_key,
                Q(alternate_text),
                format!(
                    "discovery listens on {extra} itself, which the {list} entry {:?} already \
                     covers",
                    l.to_string()
                ),
            );
            return None;
        }
    }
    Some(DiscoveryAddresses { primary, alternate })
}

/// A discovery address: IP:port of the key's family, concrete, with a fixed port.
fn discovery_address(cx: &mut Cx<'_>, key: &str, text: &str, v6: bool) -> Option<SocketAddr> {
    let (want, example) = if v6 {
        ("IPv6", "\"[2001:db8::1]:3478\"")
    } else {
        ("IPv4", "\"192.0.2.1:3478\"")
    };
    let reason = match text.parse::<SocketAddr>() {
        Err(_) => format!("expected {want} IP:port such as {example}"),
        Ok(a) if a.is_ipv6() != v6 => {
            let key = if v6 {
                key.trim_end_matches("_v6").to_owned()
            } else {
                format!("{key}_v6")
            };
            format!("is not {want}; put it in {key}")
        }
        Ok(a) if a.ip().is_unspecified() || a.ip().is_multicast() => {
            "must be one concrete address of this host (answers name it to clients)".to_owned()
        }
        Ok(SocketAddr::V6(a)) if a.ip().to_ipv4_mapped().is_some() => {
            "an IPv4-mapped address is IPv4; use the IPv4 key".to_owned()
        }
        Ok(a) if a.port() == 0 => {
            "needs a fixed port: clients are told it in OTHER-ADDRESS".to_owned()
        }
        Ok(a) => return Some(a),
    };
    cx.invalid(key, Q(text), reason);
    None
}

fn build_relay(raw: raw::Relay, cx: &mut Cx<'_>) -> RelayConfig {
    let d = RelayConfig::default();

    let address = if raw.address == "auto" {
        RelayIp::Auto
    } else {
        match raw.address.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => match unusable_relay_ip(ip.into()) {
                None => RelayIp::Ip(ip),
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

/// Why an address cannot be a relay address (bound or advertised), if it cannot.
fn unusable_relay_ip(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => Some("0.0.0.0 would advertise no usable address"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some(":: would advertise no usable address"),
        _ if ip.is_multicast() => Some("a multicast address cannot relay"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address cannot relay"),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            Some("an IPv4-mapped address is IPv4; use the IPv4 key")
        }
        _ => None,
    }
}

fn opt_v4(cx: &mut Cx<'_>, key: &str, text: &str) -> Option<Ipv4Addr> {
    match opt_relay_ip(cx, key, text, false)? {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    }
}

fn opt_v6(cx: &mut Cx<'_>, key: &str, text: &str) -> Option<Ipv6Addr> {
    match opt_relay_ip(cx, key, text, true)? {
        IpAddr::V6(ip) => Some(ip),
        IpAddr::V4(_) => None,
    }
}

/// An optional relay address of one family ("" = none).
fn opt_relay_ip(cx: &mut Cx<'_>, key: &str, text: &str, v6: bool) -> Option<IpAddr> {
    if text.is_empty() {
        return None;
    }
    let (want, other) = if v6 {
        ("IPv6", "IPv4")
    } else {
        ("IPv4", "IPv6")
    };
    let reason = match text.parse::<IpAddr>() {
        Ok(ip) if ip.is_ipv6() != v6 => format!("is {other}; this key takes an {want} address"),
        Ok(ip) => match unusable_relay_ip(ip) {
            None => return Some(ip),
            Some(why) => why.to_owned(),
        },
        Err(_) => format!("expected an {want} address, or \"\" for none"),
    };
    cx.invalid(key, Q(text), reason);
    None
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

    let secret_file = cx.opt_path("auth.secret_file", &raw.secret_file);
    let secret_env = env_name(cx, "auth.secret_env", &raw.secret_env);
    let nonce_key_file = cx.opt_path("auth.nonce_key_file", &raw.nonce_key_file);
    let nonce_key_env = env_name(cx, "auth.nonce_key_env", &raw.nonce_key_env);

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
        let Some(name) = user.name else {
            cx.push(&key, format!("{key} is invalid: missing name"));
            continue;
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
                // The length check first: the parser would also take a second
                // "0x" and surrounding spaces, which must not end up in the key.
                if hex.len() != 32 || crate::proto::auth::parse_md5_key_hex(hex).is_err() {
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
        nonce_key_file,
        nonce_key_env,
        rest_separator,
        rest_max_ttl_secs,
        users,
    }
}

/// `""` for none. std::env::var_os panics on names containing '=' or NUL; portable shell names
/// are all anyone needs.
fn env_name(cx: &mut Cx<'_>, key: &str, raw: &str) -> Option<String> {
    if raw.is_empty() {
        None
    } else if is_env_name(raw) {
        Some(raw.to_owned())
    } else {
        cx.invalid(
            key,
            Q(raw),
            "must be an environment variable name (letters, digits, '_'; not starting with a digit)",
        );
        None
    }
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
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
    let connections_total = cx.int32(
        "limits.connections_total",
        raw.connections_total,
        1,
        max,
        d.connections_total,
    );
    let connections_per_source = cx.int32(
        "limits.connections_per_source",
        raw.connections_per_source,
        0,
        max,
        d.connections_per_source,
    );
    let connection_idle_secs = cx.int(
        "limits.connection_idle_secs",
        raw.connection_idle_secs,
        5,
        3600,
        d.connection_idle_secs,
    );
    LimitsConfig {
        connections_total,
        connections_per_source,
        connection_idle_secs,
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
    let mut list = |name: &str, entries: &[String], allow: bool| -> Vec<IpNet> {
        entries
            .iter()
            .enumerate()
            .filter_map(|(i, text)| peer_net(cx, &format!("{name}[{i}]"), text, allow))
            .collect()
    };
    PeersConfig {
        allow: list("peers.allow", &raw.allow, true),
        deny: list("peers.deny", &raw.deny, false),
        allow_loopback_peers: raw.allow_loopback_peers,
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
    let token_file = cx.opt_path("api.token_file", &raw.token_file);
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

/// Parse one allow/deny entry. Entries the policy could never act on are
/// errors rather than silently dead lines: an operator who writes them
/// believes something is open (or closed) that is not. Which ranges those are
/// comes from the policy's own class table.
fn peer_net(cx: &mut Cx<'_>, key: &str, text: &str, allow: bool) -> Option<IpNet> {
    let parsed = text
        .parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
    let Ok(parsed) = parsed else {
        cx.invalid(
            key,
            Q(text),
            r#"expected a CIDR such as "10.0.0.0/8" or "2001:db8::/32", or a single address"#,
        );
        return None;
    };
    if parsed.trunc() != parsed {
        cx.invalid(
            key,
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
    let spelling_of_v4 = |cx: &mut Cx<'_>, spelling: Ipv4Spelling| {
        cx.invalid(
            key,
            Q(text),
            format!(
                "is an {} IPv6 spelling of IPv4 addresses; peers are checked by their \
                 IPv4 address, so write the IPv4 range",
                spelling.name()
            ),
        );
        None
    };
    let spelling = policy::ipv4_spelling(&parsed);
    if let Some(s @ (Ipv4Spelling::Mapped | Ipv4Spelling::Nat64)) = spelling {
        return spelling_of_v4(cx, s);
    }
    if !allow {
        return Some(parsed);
    }
    match policy::range_holding(&parsed) {
        Some((AddressClass::Loopback, _)) => {
            cx.invalid(
                key,
                Q(text),
                "loopback is opened only by peers.allow_loopback_peers = true",
            );
            return None;
        }
        Some((class, name)) if class.openness() == Openness::Never => {
            cx.invalid(
                key,
                Q(text),
                format!("{name} is never a valid peer and cannot be allowed"),
            );
            return None;
        }
        _ => {}
    }
    // After the checks above: `::` and `::1` lie in the IPv4-compatible space
    // too but are IPv6's own, and have their own messages.
    if let Some(s @ Ipv4Spelling::Compatible) = spelling {
        return spelling_of_v4(cx, s);
    }
    Some(parsed)
}

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;
