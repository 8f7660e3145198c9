//! Peer address policy: which peer transport addresses a TURN allocation may reach.
//!
//! A TURN server relays for anyone who holds a credential, and credentials are handed
//! to browsers. Without a policy it is an open proxy into the server's own network:
//! cloud metadata (169.254.169.254), services on loopback, RFC 1918 neighbours, and
//! the server's own SSH or admin API. This module is the single place that decides,
//! and it runs on every path that reaches a peer (CreatePermission, ChannelBind,
//! Send, ChannelData), so it is allocation-free and reads no clock.
//!
//! Every range named below is a row of one table of address classes ([`class_of`],
//! [`AddressClass`]); config validation and the daemon's choice of relay address read
//! the same table, so a range is listed once.
//!
//! # Embedded IPv4 spellings
//!
//! The same IPv4 host can be written as an IPv6 address: IPv4-mapped
//! (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64 well-known prefix
//! (`64:ff9b::a.b.c.d`) and 6to4 (`2002:AABB:CCDD::/48`). Depending on the host's
//! stack and routes (dual-stack sockets, a `sit` tunnel, a NAT64 gateway) a packet
//! sent to such a spelling reaches the IPv4 host, so a check on the IPv6 form alone
//! is bypassable. [`canonical_ip`] reduces them, and every range check runs on both
//! the canonical address and the original spelling.
//!
//! # Decision order in [`PeerPolicy::check`]
//!
//! 1. Port 0 → `Deny(PortZero)`: never a valid destination.
//! 2. Never-open, whatever the configuration: unspecified (0.0.0.0/8, `::`),
//!    link-local (169.254.0.0/16 including cloud metadata, fe80::/10), multicast
//!    (224.0.0.0/4, ff00::/8) and broadcast 255.255.255.255. Checked on the canonical
//!    IP and on the original spelling. No configuration can reach these: not the
//!    allow list, not `allow_loopback`, not the relay addresses.
//! 3. External → local translation: a peer whose canonical IP is one of our advertised
//!    external addresses (1:1 NAT) is translated to the local relay address it maps
//!    to, so relay-to-relay traffic never depends on the cloud NAT hairpinning.
//! 4. Our own relay addresses (`relay_ips`, plus the local side of every external
//!    mapping): port inside `relay_ports` → `Allow` (relay to relay, the most common
//!    call, allowed even when the relay IP is private or loopback); any other port →
//!    `Deny(ServerOwn)` so the relay can never reach, say, the server's SSH, unless
//!    the relay address is loopback and `allow_loopback` is on (a single-host test
//!    rig): then steps 5-9 decide. A port that is also a service endpoint's port is denied even inside the relay range
//!    (a misconfiguration; the deny wins).
//! 5. Service endpoints (our listeners, HTTP API, metrics): same port and the same IP,
//!    or an unspecified endpoint IP (bound on all addresses) and a peer IP that is
//!    loopback, a relay IP, an external IP or any other address of this host →
//!    `Deny(ServerOwn)`. These never open, not even with `allow_loopback`. Any other
//!    port on a (non-loopback) host address is `Deny(ServerOwn)` too: whatever listens
//!    there is this server's business, not a TURN client's.
//! 6. Operator deny list, matched on the canonical IP and the original spelling →
//!    `Deny(Configured)`. It wins over the allow list and over `allow_loopback`.
//! 7. Loopback (127.0.0.0/8, `::1`, and every embedded spelling of them) → `Allow`
//!    only with `allow_loopback`, else `Deny(Loopback)`. The allow list cannot open
//!    loopback: an entry such as `0.0.0.0/0` must not silently expose local services.
//! 8. Default-denied ranges (the [`Openness::AllowList`] rows of the class table): private,
//!    shared address space, documentation, benchmarking, reserved, 6to4 relay anycast,
//!    ULA, site-local, Teredo, 6to4, NAT64 local-use, discard-only, ORCHID and SIIT
//!    IPv4-translated (`::ffff:0:0:0/96`). A range hit is re-opened by the operator
//!    allow list, with one tightening: a hit on the canonical IPv4 is re-opened only by
//!    an allow entry containing that IPv4. An IPv6 entry such as `::/0`,
//!    `::ffff:0:0/96`, `64:ff9b::/96` or `2002::/16` therefore never opens 10.0.0.1
//!    through one of its IPv6 spellings; write IPv4 ranges in IPv4 form. A hit on the
//!    IPv6 spelling itself (e.g. 6to4 `2002::/16`) is re-opened by an allow entry
//!    containing either the spelling or its canonical IPv4.
//! 9. Otherwise `Allow`.
//!
//! `send_to` is the peer address as given, except after translation (step 3), where it
//! is the local relay address with the peer's port, written in the peer's address
//! family where possible (an IPv4 local is written IPv4-mapped for an IPv6 peer).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

use AddressClass as C;

/// Operator-facing peer policy settings, as parsed from the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Re-opens default-denied ranges (private, CGNAT, documentation, benchmarking,
    /// ULA, site-local, reserved, Teredo, 6to4, ...). Cannot open loopback or the
    /// never-open ranges. IPv4 ranges must be written in IPv4 form to cover embedded
    /// spellings (see the module documentation, step 8).
    pub allow: Vec<IpNet>,
    /// Always wins over `allow` and `allow_loopback`; matched on the canonical IP and
    /// the original spelling.
    pub deny: Vec<IpNet>,
    /// The only way to open 127.0.0.0/8 and `::1` (the allow list cannot).
    pub allow_loopback: bool,
    /// Local addresses relay sockets are bound on. Must be concrete addresses: an
    /// unspecified entry matches no peer (unspecified peers are never-open anyway).
    pub relay_ips: Vec<IpAddr>,
    /// (advertised external address, local relay address it maps to): 1:1 NAT, e.g.
    /// cloud VMs. The local side counts as a relay address even if absent from
    /// `relay_ips`.
    pub external_ips: Vec<(IpAddr, IpAddr)>,
    /// Inclusive relay port range. A range with start > end is empty.
    pub relay_ports: (u16, u16),
    /// Our own listeners and control-plane (HTTP API, metrics) sockets. The IP may be
    /// unspecified (0.0.0.0 / `::`), meaning any of our addresses.
    pub service_endpoints: Vec<SocketAddr>,
    /// Every address of this host's interfaces (enumerated at start and on reload). A
    /// wildcard listener, the API and whatever else runs here answer on each of them, so
    /// none is a peer, whatever the port (relay addresses excepted: see `relay_ips`).
    pub host_ips: Vec<IpAddr>,
}

/// The outcome of a peer check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Relaying is allowed; send to `send_to`, which differs from the peer only after
    /// external → local translation. `canonical` is the one spelling of the destination
    /// that every later check compares (embedded IPv4 reduced, translation applied).
    Allow {
        send_to: SocketAddr,
        canonical: SocketAddr,
    },
    /// Relaying is refused; the reason is for logs and metrics (the client gets 403).
    Deny(DenyReason),
}

impl Verdict {
    #[cfg(test)]
    fn is_allow(&self) -> bool {
        matches!(self, Verdict::Allow { .. })
    }
}

/// Why a peer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// An address class the configuration leaves closed (never `AddressClass::Public`).
    Class(AddressClass),
    /// One of the server's own addresses outside the relay port range, or a service
    /// endpoint (listener, HTTP API, metrics).
    ServerOwn,
    /// The operator deny list.
    Configured,
    PortZero,
}

impl DenyReason {
    /// Stable snake_case label: used as a metrics label value and in logs, so renaming
    /// a variant must not change it.
    pub fn as_str(&self) -> &'static str {
        match self {
            DenyReason::Class(class) => class.as_str(),
            DenyReason::ServerOwn => "server_own",
            DenyReason::Configured => "configured",
            DenyReason::PortZero => "port_zero",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reduces IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`, but not `::`
/// or `::1`), NAT64 well-known prefix (`64:ff9b::/96`) and 6to4
/// (`2002:AABB:CCDD::/48` → A.B.C.D) spellings to the IPv4 address; other addresses
/// are returned unchanged.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
    }
}

const NAT64_WKP_TOP96: u128 = 0x0064_ff9b_0000_0000_0000_0000;

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(v6);
    let low32 = bits as u32;
    match bits >> 32 {
        0xffff => Some(Ipv4Addr::from(low32)),
        // `::` and `::1` share the IPv4-compatible prefix but are IPv6's own
        // unspecified and loopback addresses, not 0.0.0.0 and 0.0.0.1.
        0 if low32 > 1 => Some(Ipv4Addr::from(low32)),
        NAT64_WKP_TOP96 => Some(Ipv4Addr::from(low32)),
        _ if bits >> 112 == 0x2002 => Some(Ipv4Addr::from((bits >> 80) as u32)),
        _ => None,
    }
}

/// What an address is, as far as relaying to it goes. Every range that is not
/// `Public` is one row of [`CLASSES_V4`] / [`CLASSES_V6`], the one table of address
/// classes: the peer check, config validation and the daemon's choice of relay address
/// all read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressClass {
    /// In no row: a global unicast address.
    Public,
    Unspecified,
    Loopback,
    LinkLocal,
    Multicast,
    Broadcast,
    Private,
    /// 100.64.0.0/10 (carrier-grade NAT).
    SharedAddressSpace,
    Documentation,
    Benchmarking,
    Reserved,
    UniqueLocal,
    SiteLocal,
    Teredo,
    SixToFour,
    Nat64LocalUse,
    Discard,
}

/// How far configuration can open an address class (steps 2, 7 and 8 of the decision
/// order in the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Openness {
    /// Relayed to by default.
    Open,
    /// Denied unless the operator allow list re-opens it.
    AllowList,
    /// Denied unless `allow_loopback`; the allow list cannot open it.
    AllowLoopback,
    /// No configuration opens it.
    Never,
}

impl AddressClass {
    pub fn openness(self) -> Openness {
        match self {
            C::Public => Openness::Open,
            C::Unspecified | C::LinkLocal | C::Multicast | C::Broadcast => Openness::Never,
            C::Loopback => Openness::AllowLoopback,
            C::Private
            | C::SharedAddressSpace
            | C::Documentation
            | C::Benchmarking
            | C::Reserved
            | C::UniqueLocal
            | C::SiteLocal
            | C::Teredo
            | C::SixToFour
            | C::Nat64LocalUse
            | C::Discard => Openness::AllowList,
        }
    }

    /// Whether a host address of this class can be a relay address that other hosts
    /// reach (private networks included): not unspecified, loopback, link-local,
    /// multicast or broadcast.
    pub fn can_relay(self) -> bool {
        !matches!(self, AddressClass::Loopback) && self.openness() != Openness::Never
    }

    /// What a peer of this class is denied as; `None` for `Public`.
    fn deny_reason(self) -> Option<DenyReason> {
        (self != C::Public).then_some(DenyReason::Class(self))
    }

    /// Stable snake_case label (metrics label values and logs).
    pub fn as_str(self) -> &'static str {
        match self {
            C::Public => "public",
            C::Unspecified => "unspecified",
            C::Loopback => "loopback",
            C::LinkLocal => "link_local",
            C::Multicast => "multicast",
            C::Broadcast => "broadcast",
            C::Private => "private",
            C::SharedAddressSpace => "shared_address_space",
            C::Documentation => "documentation",
            C::Benchmarking => "benchmarking",
            C::Reserved => "reserved",
            C::UniqueLocal => "unique_local",
            C::SiteLocal => "site_local",
            C::Teredo => "teredo",
            C::SixToFour => "six_to_four",
            C::Nat64LocalUse => "nat64_local_use",
            C::Discard => "discard",
        }
    }
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The class of `ip`: of its canonical form (the class a human expects for
/// `::ffff:10.0.0.1` is private), else of the spelling itself (6to4 of a public IPv4 is
/// still 6to4).
pub fn class_of(ip: IpAddr) -> AddressClass {
    match spelling_class(canonical_ip(ip)) {
        AddressClass::Public => spelling_class(ip),
        class => class,
    }
}

/// A global unicast address: in no row of the class table, whatever its spelling.
pub fn is_public(ip: IpAddr) -> bool {
    class_of(ip) == AddressClass::Public
}

/// The class and name of the most specific table row that holds all of `net`; `None`
/// when no single row does (public space, or a net spanning several classes). `net` is
/// taken as written: no embedded IPv4 is reduced.
pub fn range_holding(net: &IpNet) -> Option<(AddressClass, &'static str)> {
    match net {
        IpNet::V4(n) => {
            let bits = u32::from(n.network());
            CLASSES_V4
                .iter()
                .find(|r| n.prefix_len() >= r.len && bits & r.mask == r.net)
                .map(|r| (r.class, r.name))
        }
        IpNet::V6(n) => {
            let bits = u128::from(n.network());
            CLASSES_V6
                .iter()
                .find(|r| n.prefix_len() >= r.len && bits & r.mask == r.net)
                .map(|r| (r.class, r.name))
        }
    }
}

/// The IPv6 spellings of IPv4 addresses that [`canonical_ip`] reduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv4Spelling {
    /// `::ffff:0:0/96`
    Mapped,
    /// `::/96` (whose `::` and `::1` are IPv6's own)
    Compatible,
    /// `64:ff9b::/96`
    Nat64,
    /// `2002::/16`
    SixToFour,
}

impl Ipv4Spelling {
    pub fn name(self) -> &'static str {
        match self {
            Ipv4Spelling::Mapped => "IPv4-mapped",
            Ipv4Spelling::Compatible => "IPv4-compatible",
            Ipv4Spelling::Nat64 => "NAT64",
            Ipv4Spelling::SixToFour => "6to4",
        }
    }
}

/// The embedded-IPv4 space that holds all of `net`, if one does.
pub fn ipv4_spelling(net: &IpNet) -> Option<Ipv4Spelling> {
    let IpNet::V6(n) = net else {
        return None;
    };
    let bits = u128::from(n.network());
    if n.prefix_len() >= 96 {
        match bits >> 32 {
            0xffff => return Some(Ipv4Spelling::Mapped),
            0 => return Some(Ipv4Spelling::Compatible),
            NAT64_WKP_TOP96 => return Some(Ipv4Spelling::Nat64),
            _ => {}
        }
    }
    (n.prefix_len() >= 16 && bits >> 112 == 0x2002).then_some(Ipv4Spelling::SixToFour)
}

/// One row of the class table, pre-masked so a lookup is one AND and one compare.
#[derive(Clone, Copy)]
struct V4Range {
    net: u32,
    mask: u32,
    len: u8,
    class: AddressClass,
    /// For messages: "{name} is never a valid peer".
    name: &'static str,
}

#[derive(Clone, Copy)]
struct V6Range {
    net: u128,
    mask: u128,
    len: u8,
    class: AddressClass,
    name: &'static str,
}

// The tables are consts, so these asserts turn a typo in a range (host bits set, which
// would make the entry never match) into a compile error.
const fn v4(addr: Ipv4Addr, len: u8, class: AddressClass, name: &'static str) -> V4Range {
    assert!(len <= 32);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    let net = u32::from_be_bytes(addr.octets());
    assert!(net & !mask == 0, "host bits set in a built-in IPv4 range");
    V4Range {
        net,
        mask,
        len,
        class,
        name,
    }
}

const fn v6(addr: Ipv6Addr, len: u8, class: AddressClass, name: &'static str) -> V6Range {
    assert!(len <= 128);
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    let net = u128::from_be_bytes(addr.octets());
    assert!(net & !mask == 0, "host bits set in a built-in IPv6 range");
    V6Range {
        net,
        mask,
        len,
        class,
        name,
    }
}

const fn a4(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

#[allow(clippy::too_many_arguments)]
const fn a6(a: u16, b: u16, c: u16, d: u16, e: u16, f: u16, g: u16, h: u16) -> Ipv6Addr {
    Ipv6Addr::new(a, b, c, d, e, f, g, h)
}

/// Every IPv4 range that is not public. A lookup takes the first row that matches, so a
/// row nested in another comes first (broadcast before reserved; a test checks this).
const CLASSES_V4: &[V4Range] = &[
    v4(
        a4(0, 0, 0, 0),
        8,
        C::Unspecified,
        "\"this network\" (0.0.0.0/8)",
    ),
    v4(
        a4(169, 254, 0, 0),
        16,
        C::LinkLocal,
        "link-local (this includes cloud metadata)",
    ),
    v4(a4(224, 0, 0, 0), 4, C::Multicast, "multicast"),
    v4(a4(255, 255, 255, 255), 32, C::Broadcast, "broadcast"),
    v4(a4(127, 0, 0, 0), 8, C::Loopback, "loopback"),
    v4(a4(10, 0, 0, 0), 8, C::Private, "private (RFC 1918)"),
    v4(a4(172, 16, 0, 0), 12, C::Private, "private (RFC 1918)"),
    v4(a4(192, 168, 0, 0), 16, C::Private, "private (RFC 1918)"),
    v4(
        a4(100, 64, 0, 0),
        10,
        C::SharedAddressSpace,
        "shared address space (carrier-grade NAT)",
    ),
    v4(
        a4(192, 0, 0, 0),
        24,
        C::Reserved,
        "IETF protocol assignments",
    ),
    v4(a4(192, 0, 2, 0), 24, C::Documentation, "documentation"),
    v4(a4(198, 51, 100, 0), 24, C::Documentation, "documentation"),
    v4(a4(203, 0, 113, 0), 24, C::Documentation, "documentation"),
    v4(a4(198, 18, 0, 0), 15, C::Benchmarking, "benchmarking"),
    v4(a4(192, 88, 99, 0), 24, C::SixToFour, "6to4 relay anycast"),
    v4(a4(240, 0, 0, 0), 4, C::Reserved, "reserved (240.0.0.0/4)"),
];

const CLASSES_V6: &[V6Range] = &[
    v6(
        Ipv6Addr::UNSPECIFIED,
        128,
        C::Unspecified,
        "the unspecified address",
    ),
    v6(
        a6(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
        C::LinkLocal,
        "link-local",
    ),
    v6(
        a6(0xff00, 0, 0, 0, 0, 0, 0, 0),
        8,
        C::Multicast,
        "multicast",
    ),
    v6(Ipv6Addr::LOCALHOST, 128, C::Loopback, "loopback"),
    v6(
        a6(0x2001, 0x0db8, 0, 0, 0, 0, 0, 0),
        32,
        C::Documentation,
        "documentation",
    ),
    v6(
        a6(0x3fff, 0, 0, 0, 0, 0, 0, 0),
        20,
        C::Documentation,
        "documentation",
    ),
    v6(
        a6(0x2001, 0x0002, 0, 0, 0, 0, 0, 0),
        48,
        C::Benchmarking,
        "benchmarking",
    ),
    v6(
        a6(0xfc00, 0, 0, 0, 0, 0, 0, 0),
        7,
        C::UniqueLocal,
        "unique local",
    ),
    v6(
        a6(0xfec0, 0, 0, 0, 0, 0, 0, 0),
        10,
        C::SiteLocal,
        "site-local",
    ),
    v6(a6(0x2001, 0, 0, 0, 0, 0, 0, 0), 32, C::Teredo, "Teredo"),
    v6(a6(0x2002, 0, 0, 0, 0, 0, 0, 0), 16, C::SixToFour, "6to4"),
    v6(
        a6(0x0064, 0xff9b, 0x0001, 0, 0, 0, 0, 0),
        48,
        C::Nat64LocalUse,
        "NAT64 local use",
    ),
    v6(
        a6(0x0100, 0, 0, 0, 0, 0, 0, 0),
        64,
        C::Discard,
        "discard-only",
    ),
    // IPv4-translated `::ffff:0:a.b.c.d` (RFC 2765 SIIT): one more IPv4 spelling, which a
    // translator on the path would deliver to the IPv4 host; not reduced, so deny it.
    v6(
        a6(0, 0, 0, 0, 0xffff, 0, 0, 0),
        96,
        C::Reserved,
        "IPv4-translated (SIIT)",
    ),
    // ORCHID (RFC 4843, deprecated) and ORCHIDv2 (RFC 7343): identifiers, not routable.
    v6(
        a6(0x2001, 0x0010, 0, 0, 0, 0, 0, 0),
        28,
        C::Reserved,
        "ORCHID",
    ),
    v6(
        a6(0x2001, 0x0020, 0, 0, 0, 0, 0, 0),
        28,
        C::Reserved,
        "ORCHIDv2",
    ),
];

/// The class of this exact spelling, no embedded IPv4 reduced.
fn spelling_class(ip: IpAddr) -> AddressClass {
    let row = match ip {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            CLASSES_V4
                .iter()
                .find(|r| bits & r.mask == r.net)
                .map(|r| r.class)
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            CLASSES_V6
                .iter()
                .find(|r| bits & r.mask == r.net)
                .map(|r| r.class)
        }
    };
    row.unwrap_or(AddressClass::Public)
}

/// `class`'s deny reason if configuration opens it only as far as `openness`.
fn denied_as(class: AddressClass, openness: Openness) -> Option<DenyReason> {
    if class.openness() == openness {
        class.deny_reason()
    } else {
        None
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    spelling_class(ip) == AddressClass::Loopback
}

fn in_list(list: &[IpNet], ip: IpAddr) -> bool {
    list.iter().any(|net| net.contains(&ip))
}

/// Writes `ip` in `like`'s family where that is possible, so a peer given as IPv6 gets
/// an IPv6 `send_to` and the relay socket chosen for it can still send.
fn in_family_of(ip: IpAddr, like: IpAddr) -> IpAddr {
    match (ip, like) {
        (IpAddr::V4(v4), IpAddr::V6(_)) => IpAddr::V6(v4.to_ipv6_mapped()),
        _ => ip,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NatMapping {
    /// Canonical forms, for matching.
    external: IpAddr,
    local: IpAddr,
    /// As configured, for the addresses we hand out.
    external_configured: IpAddr,
    local_configured: IpAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ServiceEndpoint {
    /// Canonical IP; `None` when bound on all addresses.
    ip: Option<IpAddr>,
    port: u16,
}

/// The compiled peer policy. Build once per configuration (and again on reload);
/// [`PeerPolicy::check`] is then allocation-free.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    allow_loopback: bool,
    /// Canonical relay IPs, including the local side of every NAT mapping.
    relay_ips: Vec<IpAddr>,
    nat: Vec<NatMapping>,
    relay_ports: (u16, u16),
    services: Vec<ServiceEndpoint>,
    /// Canonical; loopback excluded (step 7 and `allow_loopback` govern it).
    host_ips: Vec<IpAddr>,
}

impl PeerPolicy {
    pub fn new(cfg: PolicyConfig) -> Self {
        let nat: Vec<NatMapping> = cfg
            .external_ips
            .iter()
            .map(|&(external, local)| NatMapping {
                external: canonical_ip(external),
                local: canonical_ip(local),
                external_configured: external,
                local_configured: local,
            })
            .collect();
        let mut relay_ips: Vec<IpAddr> = cfg.relay_ips.iter().map(|&ip| canonical_ip(ip)).collect();
        // A NAT mapping's local side is by definition where relay sockets live; without
        // this a translated peer would fall through to the range checks and be denied.
        for m in &nat {
            if !relay_ips.contains(&m.local) {
                relay_ips.push(m.local);
            }
        }
        let services = cfg
            .service_endpoints
            .iter()
            .map(|ep| ServiceEndpoint {
                ip: if ep.ip().is_unspecified() {
                    None
                } else {
                    Some(canonical_ip(ep.ip()))
                },
                port: ep.port(),
            })
            .collect();
        let mut host_ips: Vec<IpAddr> = cfg
            .host_ips
            .iter()
            .map(|&ip| canonical_ip(ip))
            .filter(|ip| !is_loopback(*ip) && !ip.is_unspecified() && !relay_ips.contains(ip))
            .collect();
        host_ips.sort_unstable();
        host_ips.dedup();
        PeerPolicy {
            allow: cfg.allow,
            deny: cfg.deny,
            allow_loopback: cfg.allow_loopback,
            relay_ips,
            nat,
            relay_ports: cfg.relay_ports,
            services,
            host_ips,
        }
    }

    /// The decision for one peer transport address. Called on CreatePermission,
    /// ChannelBind, Send and ChannelData paths: cheap and allocation-free. See the
    /// module documentation for the decision order.
    pub fn check(&self, peer: SocketAddr) -> Verdict {
        let port = peer.port();
        if port == 0 {
            return Verdict::Deny(DenyReason::PortZero);
        }
        let orig = peer.ip();
        let canon = canonical_ip(orig);

        let canon_class = spelling_class(canon);
        let orig_class = if orig == canon {
            canon_class
        } else {
            spelling_class(orig)
        };
        // The canonical class first: the reason a human expects for `::ffff:169.254.0.1`
        // is link-local.
        for class in [canon_class, orig_class] {
            if let Some(reason) = denied_as(class, Openness::Never) {
                return Verdict::Deny(reason);
            }
        }

        let translated = self.translate(canon);
        let target = translated.map_or(canon, |m| m.local);
        let canonical = SocketAddr::new(target, port);

        if self.relay_ips.contains(&target) {
            if self.is_service(target, port) {
                return Verdict::Deny(DenyReason::ServerOwn);
            }
            if self.in_relay_range(port) {
                let send_to = match translated {
                    Some(m) => SocketAddr::new(in_family_of(m.local_configured, orig), port),
                    None => peer,
                };
                return Verdict::Allow { send_to, canonical };
            }
            // Another port on our own relay address is the server itself (its SSH, say),
            // unless it is loopback and the operator opened loopback explicitly (a test rig
            // on one host). A broad allow-list entry never opens it.
            if !(is_loopback(target) && self.allow_loopback) {
                return Verdict::Deny(DenyReason::ServerOwn);
            }
        }

        if self.is_service(canon, port) || self.host_ips.contains(&canon) {
            return Verdict::Deny(DenyReason::ServerOwn);
        }

        if in_list(&self.deny, canon) || (orig != canon && in_list(&self.deny, orig)) {
            return Verdict::Deny(DenyReason::Configured);
        }

        if canon_class == AddressClass::Loopback || orig_class == AddressClass::Loopback {
            return if self.allow_loopback {
                Verdict::Allow {
                    send_to: peer,
                    canonical,
                }
            } else {
                Verdict::Deny(DenyReason::Class(AddressClass::Loopback))
            };
        }

        // Only an entry covering the canonical IPv4 may re-open it: otherwise `::/0` in the
        // allow list would open all of RFC 1918 through `::ffff:` spellings.
        if let Some(reason) = denied_as(canon_class, Openness::AllowList) {
            if !in_list(&self.allow, canon) {
                return Verdict::Deny(reason);
            }
        }
        if let Some(reason) = denied_as(orig_class, Openness::AllowList) {
            if orig != canon && !in_list(&self.allow, orig) && !in_list(&self.allow, canon) {
                return Verdict::Deny(reason);
            }
        }

        Verdict::Allow {
            send_to: peer,
            canonical,
        }
    }

    /// Whether loopback peers were opened explicitly (`allow_loopback`).
    pub fn allows_loopback(&self) -> bool {
        self.allow_loopback
    }

    /// Inverse translation for showing a source to a client: a local relay IP that has
    /// an external address is shown as the external one (the client only knows the
    /// advertised address); anything else is returned unchanged.
    pub fn present(&self, addr: SocketAddr) -> SocketAddr {
        let canon = canonical_ip(addr.ip());
        match self.nat.iter().find(|m| m.local == canon) {
            Some(m) => SocketAddr::new(in_family_of(m.external_configured, addr.ip()), addr.port()),
            None => addr,
        }
    }

    fn translate(&self, canon: IpAddr) -> Option<&NatMapping> {
        self.nat.iter().find(|m| m.external == canon)
    }

    fn in_relay_range(&self, port: u16) -> bool {
        let (lo, hi) = self.relay_ports;
        lo <= port && port <= hi
    }

    /// `ip` must be canonical.
    fn is_service(&self, ip: IpAddr, port: u16) -> bool {
        self.services.iter().any(|s| {
            s.port == port
                && match s.ip {
                    Some(sip) => sip == ip,
                    None => self.is_own_ip(ip),
                }
        })
    }

    /// Addresses a socket bound on 0.0.0.0 / `::` is reachable on, as far as we know
    /// them. `ip` must be canonical.
    fn is_own_ip(&self, ip: IpAddr) -> bool {
        is_loopback(ip)
            || self.relay_ips.contains(&ip)
            || self.host_ips.contains(&ip)
            || self.nat.iter().any(|m| m.external == ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test socket address")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test ip")
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test net")
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| net(s)).collect()
    }

    fn default_policy() -> PeerPolicy {
        PeerPolicy::new(PolicyConfig {
            relay_ports: (49152, 65535),
            ..PolicyConfig::default()
        })
    }

    /// Everything opened that may be opened: loopback, allow-all in both families.
    fn wide_open() -> PeerPolicy {
        PeerPolicy::new(PolicyConfig {
            allow: nets(&["0.0.0.0/0", "::/0"]),
            allow_loopback: true,
            relay_ports: (49152, 65535),
            ..PolicyConfig::default()
        })
    }

    fn allowed(p: &PeerPolicy, peer: &str) -> bool {
        p.check(sa(peer)).is_allow()
    }

    fn denied_for(p: &PeerPolicy, peer: &str) -> Option<DenyReason> {
        match p.check(sa(peer)) {
            Verdict::Deny(r) => Some(r),
            Verdict::Allow { .. } => None,
        }
    }

    fn allow_to(peer: &str) -> Verdict {
        let peer = sa(peer);
        Verdict::Allow {
            send_to: peer,
            canonical: SocketAddr::new(canonical_ip(peer.ip()), peer.port()),
        }
    }

    // ---- the class table -----------------------------------------------------------

    const ALL_CLASSES: [AddressClass; 17] = [
        C::Public,
        C::Unspecified,
        C::Loopback,
        C::LinkLocal,
        C::Multicast,
        C::Broadcast,
        C::Private,
        C::SharedAddressSpace,
        C::Documentation,
        C::Benchmarking,
        C::Reserved,
        C::UniqueLocal,
        C::SiteLocal,
        C::Teredo,
        C::SixToFour,
        C::Nat64LocalUse,
        C::Discard,
    ];

    #[test]
    fn class_of_every_class() {
        let cases = [
            ("8.8.8.8", C::Public),
            ("2606:4700::1111", C::Public),
            ("0.0.0.0", C::Unspecified),
            ("0.255.255.255", C::Unspecified),
            ("::", C::Unspecified),
            ("127.0.0.1", C::Loopback),
            ("127.255.255.254", C::Loopback),
            ("::1", C::Loopback),
            ("169.254.169.254", C::LinkLocal),
            ("fe80::1", C::LinkLocal),
            ("febf:ffff::1", C::LinkLocal),
            ("224.0.0.1", C::Multicast),
            ("239.255.255.250", C::Multicast),
            ("ff02::1", C::Multicast),
            ("255.255.255.255", C::Broadcast),
            ("10.0.0.1", C::Private),
            ("172.31.255.254", C::Private),
            ("192.168.1.1", C::Private),
            ("100.64.0.1", C::SharedAddressSpace),
            ("192.0.2.1", C::Documentation),
            ("198.51.100.7", C::Documentation),
            ("203.0.113.5", C::Documentation),
            ("2001:db8::1", C::Documentation),
            ("3fff::1", C::Documentation),
            ("198.18.0.1", C::Benchmarking),
            ("2001:2::1", C::Benchmarking),
            ("192.0.0.8", C::Reserved),
            ("240.0.0.1", C::Reserved),
            ("255.255.255.254", C::Reserved),
            ("::ffff:0:a00:1", C::Reserved),
            ("2001:10::1", C::Reserved),
            ("2001:20::1", C::Reserved),
            ("fd12:3456::1", C::UniqueLocal),
            ("fec0::1", C::SiteLocal),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", C::Teredo),
            ("192.88.99.1", C::SixToFour),
            ("2002:808:808::1", C::SixToFour),
            ("64:ff9b:1::a00:1", C::Nat64LocalUse),
            ("100::1", C::Discard),
        ];
        for (addr, class) in cases {
            assert_eq!(class_of(ip(addr)), class, "{addr}");
        }
        for class in ALL_CLASSES {
            assert!(
                cases.iter().any(|(_, c)| *c == class),
                "{class:?} has no case"
            );
        }
    }

    #[test]
    fn class_of_reduces_embedded_ipv4_first() {
        let cases = [
            ("::ffff:10.0.0.1", C::Private),
            ("::10.0.0.1", C::Private),
            ("64:ff9b::a00:1", C::Private),
            ("2002:a00:1::", C::Private),
            ("::ffff:127.0.0.1", C::Loopback),
            ("::127.0.0.1", C::Loopback),
            ("64:ff9b::7f00:1", C::Loopback),
            ("2002:7f00:1::", C::Loopback),
            ("::ffff:169.254.169.254", C::LinkLocal),
            ("2002:a9fe:a9fe::", C::LinkLocal),
            ("::ffff:0.0.0.0", C::Unspecified),
            ("::0.0.0.2", C::Unspecified),
            ("::ffff:224.0.0.251", C::Multicast),
            ("::ffff:100.64.0.1", C::SharedAddressSpace),
            ("::ffff:8.8.8.8", C::Public),
            ("64:ff9b::808:808", C::Public),
            // A public IPv4 spelt as 6to4 is still 6to4 (the policy denies the spelling).
            ("2002:808:808::1", C::SixToFour),
        ];
        for (addr, class) in cases {
            assert_eq!(class_of(ip(addr)), class, "{addr}");
        }
    }

    /// A lookup takes the first matching row, so a row inside an earlier one would never
    /// be found: the more specific row must come first.
    #[test]
    fn nested_rows_come_first() {
        for (i, a) in CLASSES_V4.iter().enumerate() {
            for b in &CLASSES_V4[i + 1..] {
                let b_inside_a = b.len >= a.len && b.net & a.mask == a.net;
                assert!(!b_inside_a, "{} lies inside the earlier {}", b.name, a.name);
            }
        }
        for (i, a) in CLASSES_V6.iter().enumerate() {
            for b in &CLASSES_V6[i + 1..] {
                let b_inside_a = b.len >= a.len && b.net & a.mask == a.net;
                assert!(!b_inside_a, "{} lies inside the earlier {}", b.name, a.name);
            }
        }
    }

    #[test]
    fn openness_and_labels_of_every_class() {
        for class in ALL_CLASSES {
            let want = match class {
                C::Public => Openness::Open,
                C::Loopback => Openness::AllowLoopback,
                C::Unspecified | C::LinkLocal | C::Multicast | C::Broadcast => Openness::Never,
                _ => Openness::AllowList,
            };
            assert_eq!(class.openness(), want, "{class:?}");
            assert_eq!(
                class.can_relay(),
                matches!(want, Openness::Open | Openness::AllowList),
                "{class:?}"
            );
            match class.deny_reason() {
                None => assert_eq!((class, class.as_str()), (C::Public, "public")),
                Some(reason) => assert_eq!(class.to_string(), reason.as_str()),
            }
        }
    }

    #[test]
    fn public_and_relay_addresses_for_the_daemon() {
        for addr in ["8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(ip(addr)), "{addr}");
        }
        for addr in [
            "10.0.0.1",
            "100.64.0.1",
            "203.0.113.7",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(ip(addr)), "{addr}");
            assert!(class_of(ip(addr)).can_relay(), "{addr}");
        }
        for addr in [
            "127.0.0.1",
            "169.254.1.1",
            "0.0.0.0",
            "fe80::1",
            "::1",
            "::",
        ] {
            assert!(!class_of(ip(addr)).can_relay(), "{addr}");
        }
    }

    #[test]
    fn range_holding_whole_nets() {
        let cases = [
            (
                "169.254.169.254/32",
                Some((C::LinkLocal, "link-local (this includes cloud metadata)")),
            ),
            (
                "169.254.0.0/16",
                Some((C::LinkLocal, "link-local (this includes cloud metadata)")),
            ),
            ("169.254.0.0/15", None),
            (
                "0.0.0.0/8",
                Some((C::Unspecified, "\"this network\" (0.0.0.0/8)")),
            ),
            ("0.0.0.0/0", None),
            ("::/0", None),
            ("::/128", Some((C::Unspecified, "the unspecified address"))),
            ("::1/128", Some((C::Loopback, "loopback"))),
            ("127.1.0.0/16", Some((C::Loopback, "loopback"))),
            ("fe80::/64", Some((C::LinkLocal, "link-local"))),
            ("255.255.255.255/32", Some((C::Broadcast, "broadcast"))),
            (
                "255.255.255.0/24",
                Some((C::Reserved, "reserved (240.0.0.0/4)")),
            ),
            ("10.1.0.0/16", Some((C::Private, "private (RFC 1918)"))),
            ("8.8.8.0/24", None),
        ];
        for (text, want) in cases {
            assert_eq!(range_holding(&net(text)), want, "{text}");
        }
    }

    #[test]
    fn ipv4_spellings_of_whole_nets() {
        let cases = [
            ("::ffff:10.0.0.0/104", Some(Ipv4Spelling::Mapped)),
            ("::ffff:0:0/96", Some(Ipv4Spelling::Mapped)),
            ("::ffff:0:0/95", None),
            ("64:ff9b::a00:0/104", Some(Ipv4Spelling::Nat64)),
            ("64:ff9b:1::/48", None),
            ("::10.0.0.0/104", Some(Ipv4Spelling::Compatible)),
            ("::1/128", Some(Ipv4Spelling::Compatible)),
            ("2002::/16", Some(Ipv4Spelling::SixToFour)),
            ("2002:a00::/24", Some(Ipv4Spelling::SixToFour)),
            ("2002::/15", None),
            ("10.0.0.0/8", None),
            ("::ffff:0:a00:0/120", None),
        ];
        for (text, want) in cases {
            assert_eq!(ipv4_spelling(&net(text)), want, "{text}");
        }
    }

    // ---- canonical_ip -------------------------------------------------------------

    #[test]
    fn canonical_reduces_every_embedded_spelling() {
        let cases = [
            ("::ffff:127.0.0.1", "127.0.0.1"),
            ("::127.0.0.1", "127.0.0.1"),
            ("64:ff9b::7f00:1", "127.0.0.1"),
            ("2002:7f00:1::", "127.0.0.1"),
            ("2002:7f00:1:1234:5678::9", "127.0.0.1"),
            ("::ffff:10.0.0.1", "10.0.0.1"),
            ("2002:0a00:0001::", "10.0.0.1"),
            ("::ffff:0.0.0.0", "0.0.0.0"),
            ("::0.0.0.2", "0.0.0.2"),
            ("64:ff9b::8.8.8.8", "8.8.8.8"),
            ("2002:a9fe:a9fe::", "169.254.169.254"),
        ];
        for (input, want) in cases {
            assert_eq!(canonical_ip(ip(input)), ip(want), "{input}");
        }
    }

    #[test]
    fn canonical_leaves_other_addresses_alone() {
        for s in [
            "::",
            "::1",
            "8.8.8.8",
            "2606:4700::1111",
            "64:ff9b:1::a00:1", // local-use NAT64 prefix: not the well-known /96
            "::ffff:0:a00:1",   // IPv4-translated (SIIT), not a spelling we reduce
            "2001::1",
            "fe80::1",
            "2003::1",
        ] {
            assert_eq!(canonical_ip(ip(s)), ip(s), "{s}");
        }
    }

    // ---- never-open ---------------------------------------------------------------

    #[test]
    fn issue_addresses_denied_by_default() {
        let p = default_policy();
        let cases = [
            ("0.0.0.0:80", DenyReason::Class(AddressClass::Unspecified)),
            ("[::]:80", DenyReason::Class(AddressClass::Unspecified)),
            (
                "[::ffff:127.0.0.1]:80",
                DenyReason::Class(AddressClass::Loopback),
            ),
            (
                "[::127.0.0.1]:80",
                DenyReason::Class(AddressClass::Loopback),
            ),
            (
                "[64:ff9b::7f00:1]:80",
                DenyReason::Class(AddressClass::Loopback),
            ),
            (
                "[2002:7f00:1::]:80",
                DenyReason::Class(AddressClass::Loopback),
            ),
            (
                "169.254.169.254:80",
                DenyReason::Class(AddressClass::LinkLocal),
            ),
            ("[fe80::1]:80", DenyReason::Class(AddressClass::LinkLocal)),
            ("127.0.0.1:80", DenyReason::Class(AddressClass::Loopback)),
            ("[::1]:80", DenyReason::Class(AddressClass::Loopback)),
        ];
        for (peer, reason) in cases {
            assert_eq!(p.check(sa(peer)), Verdict::Deny(reason), "{peer}");
        }
    }

    #[test]
    fn loopback_spellings_open_only_with_allow_loopback() {
        let p = PeerPolicy::new(PolicyConfig {
            allow_loopback: true,
            ..PolicyConfig::default()
        });
        for peer in [
            "127.0.0.1:80",
            "127.1.2.3:80",
            "[::1]:80",
            "[::ffff:127.0.0.1]:80",
            "[::127.0.0.1]:80",
            "[64:ff9b::7f00:1]:80",
            "[2002:7f00:1::]:80",
        ] {
            assert_eq!(p.check(sa(peer)), allow_to(peer), "{peer}");
        }
    }

    #[test]
    fn never_open_stays_closed_with_everything_opened() {
        let p = wide_open();
        let cases = [
            ("0.0.0.0:80", DenyReason::Class(AddressClass::Unspecified)),
            ("0.1.2.3:80", DenyReason::Class(AddressClass::Unspecified)),
            ("[::]:80", DenyReason::Class(AddressClass::Unspecified)),
            (
                "[::ffff:0.0.0.0]:80",
                DenyReason::Class(AddressClass::Unspecified),
            ),
            (
                "[::0.0.0.2]:80",
                DenyReason::Class(AddressClass::Unspecified),
            ),
            (
                "169.254.169.254:80",
                DenyReason::Class(AddressClass::LinkLocal),
            ),
            (
                "[::ffff:169.254.169.254]:80",
                DenyReason::Class(AddressClass::LinkLocal),
            ),
            (
                "[64:ff9b::a9fe:a9fe]:80",
                DenyReason::Class(AddressClass::LinkLocal),
            ),
            (
                "[2002:a9fe:a9fe::]:80",
                DenyReason::Class(AddressClass::LinkLocal),
            ),
            ("[fe80::1]:80", DenyReason::Class(AddressClass::LinkLocal)),
            (
                "[febf:ffff::1]:80",
                DenyReason::Class(AddressClass::LinkLocal),
            ),
            ("224.0.0.1:80", DenyReason::Class(AddressClass::Multicast)),
            (
                "239.255.255.250:1900",
                DenyReason::Class(AddressClass::Multicast),
            ),
            (
                "[::ffff:224.0.0.251]:5353",
                DenyReason::Class(AddressClass::Multicast),
            ),
            ("[ff02::1]:80", DenyReason::Class(AddressClass::Multicast)),
            (
                "255.255.255.255:80",
                DenyReason::Class(AddressClass::Broadcast),
            ),
        ];
        for (peer, reason) in cases {
            assert_eq!(p.check(sa(peer)), Verdict::Deny(reason), "{peer}");
        }
    }

    #[test]
    fn never_open_beats_relay_addresses() {
        // A relay bound on a link-local address must still not make metadata reachable.
        let p = PeerPolicy::new(PolicyConfig {
            relay_ips: vec![ip("169.254.169.254"), ip("0.0.0.0")],
            relay_ports: (1, 65535),
            ..PolicyConfig::default()
        });
        assert_eq!(
            denied_for(&p, "169.254.169.254:80"),
            Some(DenyReason::Class(AddressClass::LinkLocal))
        );
        assert_eq!(
            denied_for(&p, "0.0.0.0:50000"),
            Some(DenyReason::Class(AddressClass::Unspecified))
        );
    }

    #[test]
    fn port_zero_denied() {
        let p = wide_open();
        assert_eq!(denied_for(&p, "8.8.8.8:0"), Some(DenyReason::PortZero));
        assert_eq!(
            denied_for(&p, "[2606:4700::1111]:0"),
            Some(DenyReason::PortZero)
        );
        let relay = PeerPolicy::new(PolicyConfig {
            relay_ips: vec![ip("10.0.0.5")],
            relay_ports: (0, 65535),
            ..PolicyConfig::default()
        });
        assert_eq!(denied_for(&relay, "10.0.0.5:0"), Some(DenyReason::PortZero));
    }

    // ---- public and default-denied ranges -----------------------------------------

    #[test]
    fn public_addresses_allowed() {
        let p = default_policy();
        for peer in [
            "8.8.8.8:53",
            "1.1.1.1:3478",
            "[2606:4700::1111]:443",
            "[2a00:1450::1]:19302",
            "[::ffff:8.8.8.8]:53",
            "[64:ff9b::808:808]:53",
            "100.63.255.255:80",
            "100.128.0.0:80",
            "172.15.255.255:80",
            "172.32.0.0:80",
            "192.167.255.255:80",
            "198.17.255.255:80",
            "198.20.0.0:80",
            "223.255.255.255:80",
        ] {
            assert_eq!(p.check(sa(peer)), allow_to(peer), "{peer}");
        }
    }

    #[test]
    fn default_denied_ranges_with_reasons() {
        let p = default_policy();
        let cases = [
            ("10.0.0.1:80", DenyReason::Class(AddressClass::Private)),
            (
                "10.255.255.255:80",
                DenyReason::Class(AddressClass::Private),
            ),
            ("172.16.0.1:80", DenyReason::Class(AddressClass::Private)),
            (
                "172.31.255.254:80",
                DenyReason::Class(AddressClass::Private),
            ),
            ("192.168.1.1:80", DenyReason::Class(AddressClass::Private)),
            (
                "100.64.0.1:80",
                DenyReason::Class(AddressClass::SharedAddressSpace),
            ),
            (
                "100.127.255.255:80",
                DenyReason::Class(AddressClass::SharedAddressSpace),
            ),
            ("192.0.0.8:80", DenyReason::Class(AddressClass::Reserved)),
            ("240.0.0.1:80", DenyReason::Class(AddressClass::Reserved)),
            (
                "255.255.255.254:80",
                DenyReason::Class(AddressClass::Reserved),
            ),
            (
                "192.0.2.1:80",
                DenyReason::Class(AddressClass::Documentation),
            ),
            (
                "198.51.100.7:80",
                DenyReason::Class(AddressClass::Documentation),
            ),
            (
                "203.0.113.5:80",
                DenyReason::Class(AddressClass::Documentation),
            ),
            (
                "198.18.0.1:80",
                DenyReason::Class(AddressClass::Benchmarking),
            ),
            (
                "198.19.255.255:80",
                DenyReason::Class(AddressClass::Benchmarking),
            ),
            ("192.88.99.1:80", DenyReason::Class(AddressClass::SixToFour)),
            (
                "[2001:db8::1]:80",
                DenyReason::Class(AddressClass::Documentation),
            ),
            (
                "[3fff::1]:80",
                DenyReason::Class(AddressClass::Documentation),
            ),
            (
                "[3fff:0fff::1]:80",
                DenyReason::Class(AddressClass::Documentation),
            ),
            (
                "[2001:2::1]:80",
                DenyReason::Class(AddressClass::Benchmarking),
            ),
            ("[fc00::1]:80", DenyReason::Class(AddressClass::UniqueLocal)),
            (
                "[fd12:3456::1]:80",
                DenyReason::Class(AddressClass::UniqueLocal),
            ),
            ("[fec0::1]:80", DenyReason::Class(AddressClass::SiteLocal)),
            ("[2001:0::1]:80", DenyReason::Class(AddressClass::Teredo)),
            (
                "[2001:0:4136:e378:8000:63bf:3fff:fdd2]:80",
                DenyReason::Class(AddressClass::Teredo),
            ),
            (
                "[2002:808:808::1]:80",
                DenyReason::Class(AddressClass::SixToFour),
            ),
            (
                "[64:ff9b:1::a00:1]:80",
                DenyReason::Class(AddressClass::Nat64LocalUse),
            ),
            ("[100::1]:80", DenyReason::Class(AddressClass::Discard)),
            ("[2001:10::1]:80", DenyReason::Class(AddressClass::Reserved)),
            ("[2001:20::1]:80", DenyReason::Class(AddressClass::Reserved)),
            (
                "[::ffff:0:a00:1]:80",
                DenyReason::Class(AddressClass::Reserved),
            ),
        ];
        for (peer, reason) in cases {
            assert_eq!(p.check(sa(peer)), Verdict::Deny(reason), "{peer}");
        }
    }

    #[test]
    fn range_edges_are_exact() {
        let p = default_policy();
        assert!(allowed(&p, "[3fff:1000::1]:80")); // just past 3fff::/20
        assert!(allowed(&p, "[2001:2:1::1]:80")); // just past 2001:2::/48
        assert!(allowed(&p, "[2001:1::1]:80")); // between Teredo and benchmarking
        assert!(allowed(&p, "[100:0:0:1::1]:80")); // past 100::/64
        assert!(allowed(&p, "[fe00::1]:80")); // between ULA and link-local
        assert!(allowed(&p, "[2001:30::1]:80")); // past ORCHIDv2
        assert!(allowed(&p, "192.88.98.255:80"));
        assert!(allowed(&p, "192.0.1.1:80"));
    }

    #[test]
    fn embedded_private_treated_like_ipv4() {
        let p = default_policy();
        assert_eq!(
            denied_for(&p, "[::ffff:10.0.0.1]:80"),
            Some(DenyReason::Class(AddressClass::Private))
        );
        assert_eq!(
            denied_for(&p, "[::10.0.0.1]:80"),
            Some(DenyReason::Class(AddressClass::Private))
        );
        assert_eq!(
            denied_for(&p, "[64:ff9b::a00:1]:80"),
            Some(DenyReason::Class(AddressClass::Private))
        );
        assert_eq!(
            denied_for(&p, "[2002:0a00:0001::]:80"),
            Some(DenyReason::Class(AddressClass::Private))
        );
        assert_eq!(
            denied_for(&p, "[2002:0a00:0001:ffff::1]:80"),
            Some(DenyReason::Class(AddressClass::Private))
        );
        assert_eq!(
            denied_for(&p, "[::ffff:100.64.0.1]:80"),
            Some(DenyReason::Class(AddressClass::SharedAddressSpace))
        );
    }

    #[test]
    fn allow_list_reopens_private_ranges() {
        let p = PeerPolicy::new(PolicyConfig {
            allow: nets(&[
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "100.64.0.0/10",
                "fc00::/7",
            ]),
            ..PolicyConfig::default()
        });
        for peer in [
            "10.0.0.1:80",
            "172.20.1.1:80",
            "192.168.1.1:80",
            "100.64.0.1:80",
            "[fd00::1]:80",
            "[::ffff:10.0.0.1]:80",
            "[64:ff9b::a00:1]:80",
        ] {
            assert_eq!(p.check(sa(peer)), allow_to(peer), "{peer}");
        }
        // Outside the allowed nets nothing changed.
        assert_eq!(
            denied_for(&p, "203.0.113.5:80"),
            Some(DenyReason::Class(AddressClass::Documentation))
        );
        assert_eq!(
            denied_for(&p, "[fec0::1]:80"),
            Some(DenyReason::Class(AddressClass::SiteLocal))
        );
        // 6to4 of an allowed IPv4 is re-opened too: the canonical address is allowed.
        assert!(allowed(&p, "[2002:0a00:0001::]:80"));
    }

    #[test]
    fn allow_list_narrow_entry_reopens_only_its_net() {
        let p = PeerPolicy::new(PolicyConfig {
            allow: nets(&["10.1.0.0/16"]),
            ..PolicyConfig::default()
        });
        assert!(allowed(&p, "10.1.2.3:80"));
        assert_eq!(
            denied_for(&p, "10.2.0.1:80"),
            Some(DenyReason::Class(AddressClass::Private))
        );
    }

    #[test]
    fn nat_test_ranges_reopened() {
        let p = default_policy();
        assert_eq!(
            denied_for(&p, "203.0.113.5:40000"),
            Some(DenyReason::Class(AddressClass::Documentation))
        );
        assert_eq!(
            denied_for(&p, "198.18.0.1:40000"),
            Some(DenyReason::Class(AddressClass::Benchmarking))
        );
        let p = PeerPolicy::new(PolicyConfig {
            allow: nets(&["203.0.113.0/24", "198.18.0.0/15"]),
            ..PolicyConfig::default()
        });
        assert_eq!(
            p.check(sa("203.0.113.5:40000")),
            allow_to("203.0.113.5:40000")
        );
        assert_eq!(
            p.check(sa("198.18.0.1:40000")),
            allow_to("198.18.0.1:40000")
        );
        assert_eq!(
            p.check(sa("198.19.1.1:40000")),
            allow_to("198.19.1.1:40000")
        );
    }

    #[test]
    fn ipv6_allow_entries_never_open_ipv4_through_spellings() {
        // `::/0` means "all IPv6"; it must not open RFC 1918 written as ::ffff:10.0.0.1.
        let p = PeerPolicy::new(PolicyConfig {
            allow: nets(&["::/0", "::ffff:0:0/96", "64:ff9b::/96", "2002::/16"]),
            ..PolicyConfig::default()
        });
        assert_eq!(
            denied_for(&p, "[::ffff:10.0.0.1]:80"),
            Some(DenyReason::Class(AddressClass::Private))
        );
        assert_eq!(
            denied_for(&p, "[::10.0.0.1]:80"),
            Some(DenyReason::Class(AddressClass::Private))
        );
        assert_eq!(
            denied_for(&p, "[64:ff9b::a00:1]:80"),
            Some(DenyReason::Class(AddressClass::Private))
        );
        assert_eq!(
            denied_for(&p, "[2002:0a00:0001::]:80"),
            Some(DenyReason::Class(AddressClass::Private))
        );
        assert_eq!(
            denied_for(&p, "[::ffff:203.0.113.5]:80"),
            Some(DenyReason::Class(AddressClass::Documentation))
        );
        // ...while IPv6's own ranges and 6to4 of public IPv4 do open.
        assert!(allowed(&p, "[fd00::1]:80"));
        assert!(allowed(&p, "[2001:db8::1]:80"));
        assert!(allowed(&p, "[2002:808:808::1]:80"));
        assert!(allowed(&p, "[::ffff:8.8.8.8]:80"));
    }

    #[test]
    fn allow_all_reopens_every_default_range_but_not_loopback() {
        let p = PeerPolicy::new(PolicyConfig {
            allow: nets(&["0.0.0.0/0", "::/0"]),
            ..PolicyConfig::default()
        });
        for peer in [
            "10.0.0.1:80",
            "100.64.0.1:80",
            "192.0.2.1:80",
            "198.18.0.1:80",
            "240.0.0.1:80",
            "192.88.99.1:80",
            "[fd00::1]:80",
            "[fec0::1]:80",
            "[2001::1]:80",
            "[2002:a00:1::]:80",
            "[64:ff9b:1::1]:80",
            "[100::1]:80",
            "[2001:10::1]:80",
            "[::ffff:10.0.0.1]:80",
        ] {
            assert!(allowed(&p, peer), "{peer}");
        }
        for peer in [
            "127.0.0.1:80",
            "[::1]:80",
            "[::ffff:127.0.0.1]:80",
            "[2002:7f00:1::]:80",
        ] {
            assert_eq!(
                denied_for(&p, peer),
                Some(DenyReason::Class(AddressClass::Loopback)),
                "{peer}"
            );
        }
    }

    // ---- deny list ----------------------------------------------------------------

    #[test]
    fn deny_list_beats_allow_list() {
        let p = PeerPolicy::new(PolicyConfig {
            allow: nets(&["10.0.0.0/8"]),
            deny: nets(&["10.0.5.0/24"]),
            ..PolicyConfig::default()
        });
        assert!(allowed(&p, "10.0.4.1:80"));
        assert_eq!(denied_for(&p, "10.0.5.1:80"), Some(DenyReason::Configured));
        assert_eq!(
            denied_for(&p, "[::ffff:10.0.5.1]:80"),
            Some(DenyReason::Configured)
        );
        assert_eq!(
            denied_for(&p, "[2002:a00:501::]:80"),
            Some(DenyReason::Configured)
        );
    }

    #[test]
    fn deny_list_applies_to_public_and_loopback() {
        let p = PeerPolicy::new(PolicyConfig {
            deny: nets(&["8.8.8.0/24", "2606:4700::/32", "127.0.0.0/8"]),
            allow_loopback: true,
            ..PolicyConfig::default()
        });
        assert_eq!(denied_for(&p, "8.8.8.8:53"), Some(DenyReason::Configured));
        assert_eq!(
            denied_for(&p, "[::ffff:8.8.8.8]:53"),
            Some(DenyReason::Configured)
        );
        assert_eq!(
            denied_for(&p, "[2606:4700::1111]:53"),
            Some(DenyReason::Configured)
        );
        assert_eq!(denied_for(&p, "127.0.0.1:53"), Some(DenyReason::Configured));
        assert!(allowed(&p, "[::1]:53"));
        assert!(allowed(&p, "8.8.4.4:53"));
    }

    #[test]
    fn deny_list_matches_original_spelling() {
        let p = PeerPolicy::new(PolicyConfig {
            deny: nets(&["2002::/16", "::ffff:0:0/96"]),
            ..PolicyConfig::default()
        });
        assert_eq!(
            denied_for(&p, "[2002:808:808::1]:53"),
            Some(DenyReason::Configured)
        );
        assert_eq!(
            denied_for(&p, "[::ffff:8.8.8.8]:53"),
            Some(DenyReason::Configured)
        );
        assert!(allowed(&p, "8.8.8.8:53"));
    }

    // ---- relay addresses ----------------------------------------------------------

    fn relay_policy(relay: &str) -> PeerPolicy {
        PeerPolicy::new(PolicyConfig {
            relay_ips: vec![ip(relay)],
            relay_ports: (49152, 65535),
            ..PolicyConfig::default()
        })
    }

    #[test]
    fn relay_to_relay_on_loopback() {
        let p = relay_policy("127.0.0.1");
        assert_eq!(p.check(sa("127.0.0.1:49152")), allow_to("127.0.0.1:49152"));
        assert_eq!(p.check(sa("127.0.0.1:65535")), allow_to("127.0.0.1:65535"));
        assert_eq!(
            p.check(sa("[::ffff:127.0.0.1]:50000")),
            allow_to("[::ffff:127.0.0.1]:50000")
        );
        assert_eq!(
            denied_for(&p, "127.0.0.1:49151"),
            Some(DenyReason::ServerOwn)
        );
        assert_eq!(denied_for(&p, "127.0.0.1:22"), Some(DenyReason::ServerOwn));
        // With loopback opened explicitly, other ports of a loopback relay address are
        // ordinary loopback peers (test rigs); service endpoints stay closed.
        let open = PeerPolicy::new(PolicyConfig {
            relay_ips: vec![ip("127.0.0.1")],
            relay_ports: (49152, 65535),
            allow_loopback: true,
            service_endpoints: vec![sa("127.0.0.1:3478")],
            ..PolicyConfig::default()
        });
        assert_eq!(
            open.check(sa("127.0.0.1:34790")),
            allow_to("127.0.0.1:34790")
        );
        assert_eq!(
            denied_for(&open, "127.0.0.1:3478"),
            Some(DenyReason::ServerOwn)
        );
        // Other loopback addresses are not our relay: plain loopback rules apply.
        assert_eq!(
            denied_for(&p, "127.0.0.2:50000"),
            Some(DenyReason::Class(AddressClass::Loopback))
        );
    }

    #[test]
    fn relay_to_relay_on_private_address() {
        let p = relay_policy("10.0.0.5");
        assert_eq!(p.check(sa("10.0.0.5:50000")), allow_to("10.0.0.5:50000"));
        assert_eq!(denied_for(&p, "10.0.0.5:22"), Some(DenyReason::ServerOwn));
        assert_eq!(denied_for(&p, "10.0.0.5:3478"), Some(DenyReason::ServerOwn));
        assert_eq!(
            denied_for(&p, "10.0.0.6:50000"),
            Some(DenyReason::Class(AddressClass::Private))
        );
        // Spelled as 6to4 or mapped: still our relay.
        assert!(allowed(&p, "[2002:a00:5::]:50000"));
        assert_eq!(
            denied_for(&p, "[::ffff:10.0.0.5]:22"),
            Some(DenyReason::ServerOwn)
        );
    }

    #[test]
    fn relay_ip_is_protected_even_when_public_and_allowed() {
        let p = PeerPolicy::new(PolicyConfig {
            relay_ips: vec![ip("198.51.100.10"), ip("2001:db8::10")],
            allow: nets(&["0.0.0.0/0", "::/0"]),
            relay_ports: (49152, 65535),
            ..PolicyConfig::default()
        });
        assert_eq!(
            denied_for(&p, "198.51.100.10:22"),
            Some(DenyReason::ServerOwn)
        );
        assert_eq!(
            denied_for(&p, "[2001:db8::10]:22"),
            Some(DenyReason::ServerOwn)
        );
        assert!(allowed(&p, "[2001:db8::10]:60000"));
        assert!(allowed(&p, "198.51.100.11:22"));
    }

    #[test]
    fn relay_to_relay_beats_deny_list() {
        let p = PeerPolicy::new(PolicyConfig {
            relay_ips: vec![ip("10.0.0.5")],
            deny: nets(&["10.0.0.0/8"]),
            relay_ports: (49152, 65535),
            ..PolicyConfig::default()
        });
        assert!(allowed(&p, "10.0.0.5:50000"));
        assert_eq!(denied_for(&p, "10.0.0.5:80"), Some(DenyReason::ServerOwn));
    }

    #[test]
    fn empty_relay_range_allows_no_relay_port() {
        let p = PeerPolicy::new(PolicyConfig {
            relay_ips: vec![ip("10.0.0.5")],
            relay_ports: (60000, 50000),
            ..PolicyConfig::default()
        });
        assert_eq!(
            denied_for(&p, "10.0.0.5:55000"),
            Some(DenyReason::ServerOwn)
        );
    }

    // ---- 1:1 NAT ------------------------------------------------------------------

    fn nat_policy() -> PeerPolicy {
        PeerPolicy::new(PolicyConfig {
            relay_ips: vec![ip("10.0.0.5")],
            external_ips: vec![(ip("203.0.113.7"), ip("10.0.0.5"))],
            relay_ports: (49152, 65535),
            service_endpoints: vec![sa("0.0.0.0:3478")],
            ..PolicyConfig::default()
        })
    }

    #[test]
    fn nat_external_address_translated_to_local_relay() {
        let p = nat_policy();
        assert_eq!(p.check(sa("203.0.113.7:50000")), allow_to("10.0.0.5:50000"));
        assert_eq!(p.check(sa("10.0.0.5:50000")), allow_to("10.0.0.5:50000"));
        // Mapped spelling: translated, and the answer stays in the peer's family.
        assert_eq!(
            p.check(sa("[::ffff:203.0.113.7]:50001")),
            allow_to("[::ffff:10.0.0.5]:50001")
        );
        assert_eq!(
            denied_for(&p, "203.0.113.7:22"),
            Some(DenyReason::ServerOwn)
        );
        assert_eq!(
            denied_for(&p, "203.0.113.7:3478"),
            Some(DenyReason::ServerOwn)
        );
        // Another host in the same documentation net is still default-denied.
        assert_eq!(
            denied_for(&p, "203.0.113.8:50000"),
            Some(DenyReason::Class(AddressClass::Documentation))
        );
    }

    #[test]
    fn nat_local_side_is_a_relay_address_without_relay_ips() {
        let p = PeerPolicy::new(PolicyConfig {
            external_ips: vec![(ip("198.51.100.1"), ip("172.31.0.9"))],
            relay_ports: (40000, 40100),
            ..PolicyConfig::default()
        });
        assert_eq!(
            p.check(sa("198.51.100.1:40050")),
            allow_to("172.31.0.9:40050")
        );
        assert_eq!(
            p.check(sa("172.31.0.9:40050")),
            allow_to("172.31.0.9:40050")
        );
        assert_eq!(
            denied_for(&p, "198.51.100.1:40101"),
            Some(DenyReason::ServerOwn)
        );
    }

    #[test]
    fn nat_present_maps_back() {
        let p = nat_policy();
        assert_eq!(p.present(sa("10.0.0.5:50000")), sa("203.0.113.7:50000"));
        assert_eq!(
            p.present(sa("[::ffff:10.0.0.5]:50000")),
            sa("[::ffff:203.0.113.7]:50000")
        );
        assert_eq!(p.present(sa("8.8.8.8:53")), sa("8.8.8.8:53"));
        assert_eq!(p.present(sa("203.0.113.7:50000")), sa("203.0.113.7:50000"));
        // Round trip: what check() sends to, present() shows as the advertised address.
        if let Verdict::Allow { send_to, .. } = p.check(sa("203.0.113.7:50000")) {
            assert_eq!(p.present(send_to), sa("203.0.113.7:50000"));
        } else {
            panic!("external relay address must be allowed");
        }
    }

    #[test]
    fn ipv6_nat_mapping() {
        let p = PeerPolicy::new(PolicyConfig {
            external_ips: vec![(ip("2001:db8::7"), ip("fd00::7"))],
            relay_ports: (49152, 65535),
            ..PolicyConfig::default()
        });
        assert_eq!(
            p.check(sa("[2001:db8::7]:50000")),
            allow_to("[fd00::7]:50000")
        );
        assert_eq!(p.present(sa("[fd00::7]:50000")), sa("[2001:db8::7]:50000"));
        assert_eq!(denied_for(&p, "[fd00::7]:22"), Some(DenyReason::ServerOwn));
    }

    // ---- service endpoints --------------------------------------------------------

    fn service_policy() -> PeerPolicy {
        PeerPolicy::new(PolicyConfig {
            allow: nets(&["0.0.0.0/0", "::/0"]),
            allow_loopback: true,
            relay_ips: vec![ip("10.0.0.5")],
            relay_ports: (49152, 65535),
            service_endpoints: vec![sa("0.0.0.0:3478"), sa("127.0.0.1:9090"), sa("[::]:5349")],
            ..PolicyConfig::default()
        })
    }

    #[test]
    fn every_host_address_is_ours_whatever_the_port_and_the_allow_list() {
        // A wildcard listener answers on a second address of the host too: TURN over TURN
        // through our own listener, or the API, must not be reachable that way.
        let p = PeerPolicy::new(PolicyConfig {
            allow: nets(&["0.0.0.0/0", "::/0"]),
            relay_ips: vec![ip("198.18.0.1")],
            relay_ports: (49152, 65535),
            service_endpoints: vec![sa("0.0.0.0:3478"), sa("[::]:8080")],
            host_ips: vec![
                ip("198.18.0.1"),
                ip("198.18.0.2"),
                ip("2001:db8::2"),
                ip("127.0.0.1"),
            ],
            ..PolicyConfig::default()
        });
        for peer in [
            "198.18.0.2:3478",
            "198.18.0.2:8080",
            "198.18.0.2:60000",
            "[::ffff:198.18.0.2]:3478",
            "[64:ff9b::c612:2]:3478",
            "[2001:db8::2]:3478",
            "[2001:db8::2]:60000",
            "198.18.0.1:3478",
        ] {
            assert_eq!(denied_for(&p, peer), Some(DenyReason::ServerOwn), "{peer}");
        }
        // The relay address keeps its relay-range ports (the core checks they are live).
        assert!(allowed(&p, "198.18.0.1:60000"));
        assert!(allowed(&p, "198.18.0.3:3478"));
    }

    #[test]
    fn service_endpoints_never_open() {
        let p = service_policy();
        for peer in [
            "127.0.0.1:3478",
            "127.9.9.9:3478",
            "[::1]:3478",
            "[::ffff:127.0.0.1]:3478",
            "10.0.0.5:3478",
            "127.0.0.1:9090",
            "[::ffff:127.0.0.1]:9090",
            "[2002:7f00:1::]:9090",
            "127.0.0.1:5349",
            "10.0.0.5:5349",
        ] {
            assert_eq!(denied_for(&p, peer), Some(DenyReason::ServerOwn), "{peer}");
        }
        // Same ports on hosts that are not ours are ordinary peers.
        assert!(allowed(&p, "8.8.8.8:3478"));
        assert!(allowed(&p, "10.0.0.6:3478"));
        // 9090 is bound on 127.0.0.1 only; another loopback address is not that socket.
        assert!(allowed(&p, "127.0.0.2:9090"));
        assert!(allowed(&p, "[::1]:9090"));
        // Loopback itself stays open on other ports.
        assert!(allowed(&p, "127.0.0.1:8080"));
    }

    #[test]
    fn service_port_inside_relay_range_still_denied() {
        let p = PeerPolicy::new(PolicyConfig {
            relay_ips: vec![ip("10.0.0.5")],
            relay_ports: (1024, 65535),
            service_endpoints: vec![sa("0.0.0.0:9090")],
            ..PolicyConfig::default()
        });
        assert_eq!(denied_for(&p, "10.0.0.5:9090"), Some(DenyReason::ServerOwn));
        assert!(allowed(&p, "10.0.0.5:9091"));
    }

    #[test]
    fn service_on_specific_public_ip() {
        let p = PeerPolicy::new(PolicyConfig {
            service_endpoints: vec![sa("198.51.100.20:443"), sa("[2606:4700::20]:443")],
            allow: nets(&["198.51.100.0/24"]),
            ..PolicyConfig::default()
        });
        assert_eq!(
            denied_for(&p, "198.51.100.20:443"),
            Some(DenyReason::ServerOwn)
        );
        assert_eq!(
            denied_for(&p, "[::ffff:198.51.100.20]:443"),
            Some(DenyReason::ServerOwn)
        );
        assert_eq!(
            denied_for(&p, "[2606:4700::20]:443"),
            Some(DenyReason::ServerOwn)
        );
        assert!(allowed(&p, "198.51.100.21:443"));
        assert!(allowed(&p, "[2606:4700::21]:443"));
    }

    #[test]
    fn unspecified_service_covers_external_address() {
        let p = PeerPolicy::new(PolicyConfig {
            external_ips: vec![(ip("203.0.113.7"), ip("10.0.0.5"))],
            relay_ports: (1024, 65535),
            service_endpoints: vec![sa("[::]:8443")],
            ..PolicyConfig::default()
        });
        assert_eq!(
            denied_for(&p, "203.0.113.7:8443"),
            Some(DenyReason::ServerOwn)
        );
        assert_eq!(denied_for(&p, "10.0.0.5:8443"), Some(DenyReason::ServerOwn));
    }

    // ---- labels -------------------------------------------------------------------

    #[test]
    fn deny_reason_labels_are_stable_and_unique() {
        let all = [
            (DenyReason::Class(AddressClass::Unspecified), "unspecified"),
            (DenyReason::Class(AddressClass::Loopback), "loopback"),
            (DenyReason::Class(AddressClass::LinkLocal), "link_local"),
            (DenyReason::Class(AddressClass::Multicast), "multicast"),
            (DenyReason::Class(AddressClass::Broadcast), "broadcast"),
            (DenyReason::Class(AddressClass::Private), "private"),
            (
                DenyReason::Class(AddressClass::SharedAddressSpace),
                "shared_address_space",
            ),
            (
                DenyReason::Class(AddressClass::Documentation),
                "documentation",
            ),
            (
                DenyReason::Class(AddressClass::Benchmarking),
                "benchmarking",
            ),
            (DenyReason::Class(AddressClass::Reserved), "reserved"),
            (DenyReason::Class(AddressClass::UniqueLocal), "unique_local"),
            (DenyReason::Class(AddressClass::SiteLocal), "site_local"),
            (DenyReason::Class(AddressClass::Teredo), "teredo"),
            (DenyReason::Class(AddressClass::SixToFour), "six_to_four"),
            (
                DenyReason::Class(AddressClass::Nat64LocalUse),
                "nat64_local_use",
            ),
            (DenyReason::Class(AddressClass::Discard), "discard"),
            (DenyReason::ServerOwn, "server_own"),
            (DenyReason::Configured, "configured"),
            (DenyReason::PortZero, "port_zero"),
        ];
        for (i, (r, label)) in all.iter().enumerate() {
            assert_eq!(r.as_str(), *label);
            assert_eq!(r.to_string(), *label);
            for (other, _) in &all[i + 1..] {
                assert_ne!(r.as_str(), other.as_str());
            }
        }
    }
}
