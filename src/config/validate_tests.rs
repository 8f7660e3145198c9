//! Validation rules, table by table: each bad value names its key and line.

use std::path::PathBuf;

use ipnet::IpNet;

use crate::config::test_support::{err, fails, parse, FULL};
use crate::config::{
    DiscoveryAddresses, LogFormat, NatDiscoveryConfig, RelayConfig, RelayIp, UserEntry, UserSecret,
};

#[test]
fn full_file() {
    let c = parse(FULL).unwrap();
    assert_eq!(c.realm, "example.org");
    assert_eq!(c.threads, 4);
    assert_eq!(c.listen.len(), 4);
    assert_eq!(c.log_format, LogFormat::Json);
    assert_eq!(c.relay.address, RelayIp::Ip("192.0.2.10".parse().unwrap()));
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
fn api_keys_drain_and_public_host() {
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
}

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
fn tcp_listen_rules() {
    // The same rules as `listen`, named by their own key; none at all is fine.
    assert!(parse("").unwrap().tcp_listen.is_empty());
    fails(
        "tcp_listen = [\"localhost:3478\"]\n",
        1,
        "tcp_listen[0] = \"localhost:3478\" is invalid",
    );
    fails(
        "tcp_listen = [\"0.0.0.0:3478\", \"0.0.0.0:3478\"]\n",
        1,
        "tcp_listen[1] = \"0.0.0.0:3478\" is invalid: duplicate of tcp_listen[0]",
    );
    fails(
        "tcp_listen = [\"0.0.0.0:50000\"]\n",
        1,
        "tcp_listen[0] = \"0.0.0.0:50000\" is invalid: port 50000 lies inside the relay port range",
    );
    // UDP and TCP on one port is the usual setup.
    let c = parse("listen = [\"0.0.0.0:3478\"]\ntcp_listen = [\"0.0.0.0:3478\", \"[::]:3478\"]\n")
        .unwrap();
    assert_eq!(c.tcp_listen.len(), 2);
}

/// A config with `listen` and `[nat_discovery]` lines; line 3 holds the first discovery key.
fn discovery(listen: &str, keys: &str) -> String {
    format!("listen = [{listen}]\n[nat_discovery]\n{keys}")
}

#[test]
fn nat_discovery_is_off_by_default_and_takes_both_families() {
    assert_eq!(
        parse("").unwrap().nat_discovery,
        NatDiscoveryConfig::default()
    );
    let c = parse(&discovery(
        r#""192.0.2.1:3478", "[2001:db8::1]:3478""#,
        "primary = \"192.0.2.1:3478\"\nalternate = \"192.0.2.2:3479\"\n\
         primary_v6 = \"[2001:db8::1]:3478\"\nalternate_v6 = \"[2001:db8::2]:3479\"\n",
    ))
    .unwrap();
    let addrs = |p: &str, a: &str| DiscoveryAddresses {
        primary: p.parse().unwrap(),
        alternate: a.parse().unwrap(),
    };
    assert_eq!(
        c.nat_discovery,
        NatDiscoveryConfig {
            v4: Some(addrs("192.0.2.1:3478", "192.0.2.2:3479")),
            v6: Some(addrs("[2001:db8::1]:3478", "[2001:db8::2]:3479")),
        }
    );
    // The printout reads back as the same configuration.
    assert_eq!(parse(&c.to_toml()).unwrap(), c);
}

#[test]
fn nat_discovery_rules() {
    let v4 = r#""192.0.2.1:3478""#;
    let keys = |p: &str, a: &str| format!("primary = \"{p}\"\nalternate = \"{a}\"\n");
    // Both keys of a family or neither.
    fails(
        &discovery(v4, "alternate = \"192.0.2.2:3479\"\n"),
        3,
        "nat_discovery.alternate = \"192.0.2.2:3479\" is invalid: needs nat_discovery.primary",
    );
    fails(
        &discovery(v4, "primary_v6 = \"[2001:db8::1]:3478\"\n"),
        3,
        "nat_discovery.primary_v6 = \"[2001:db8::1]:3478\" is invalid: needs nat_discovery.alternate_v6",
    );
    // The primary is a concrete UDP listener with a fixed port, in its own key's family.
    fails(
        &discovery(v4, &keys("192.0.2.9:3478", "192.0.2.2:3479")),
        3,
        "nat_discovery.primary = \"192.0.2.9:3478\" is invalid: is not one of the `listen` entries",
    );
    fails(
        &discovery(r#""0.0.0.0:3478""#, &keys("0.0.0.0:3478", "192.0.2.2:3479")),
        3,
        "nat_discovery.primary = \"0.0.0.0:3478\" is invalid: must be one concrete address",
    );
    fails(
        &discovery(r#""192.0.2.1:0""#, &keys("192.0.2.1:0", "192.0.2.2:3479")),
        3,
        "nat_discovery.primary = \"192.0.2.1:0\" is invalid: needs a fixed port",
    );
    fails(
        &discovery(v4, &keys("[2001:db8::1]:3478", "192.0.2.2:3479")),
        3,
        "is invalid: is not IPv4; put it in nat_discovery.primary_v6",
    );
    fails(
        &discovery(
            v4,
            "primary_v6 = \"192.0.2.1:3478\"\nalternate_v6 = \"192.0.2.2:3479\"\n",
        ),
        3,
        "nat_discovery.primary_v6 = \"192.0.2.1:3478\" is invalid: is not IPv6; put it in nat_discovery.primary",
    );
    fails(
        &discovery(v4, &keys("192.0.2.1:3478", "nowhere:3479")),
        4,
        "nat_discovery.alternate = \"nowhere:3479\" is invalid: expected IPv4 IP:port",
    );
    // The alternate differs in IP and in port, and its port is no relay port.
    fails(
        &discovery(v4, &keys("192.0.2.1:3478", "192.0.2.1:3479")),
        4,
        "nat_discovery.alternate = \"192.0.2.1:3479\" is invalid: has the IP address of nat_discovery.primary",
    );
    fails(
        &discovery(v4, &keys("192.0.2.1:3478", "192.0.2.2:3478")),
        4,
        "nat_discovery.alternate = \"192.0.2.2:3478\" is invalid: has the port of nat_discovery.primary",
    );
    fails(
        &discovery(v4, &keys("192.0.2.1:3478", "192.0.2.2:50000")),
        4,
        "nat_discovery.alternate = \"192.0.2.2:50000\" is invalid: port 50000 lies inside the relay port range",
    );
    fails(
        &discovery(v4, &keys("192.0.2.1:3478", "192.0.2.2:0")),
        4,
        "nat_discovery.alternate = \"192.0.2.2:0\" is invalid: needs a fixed port",
    );
    fails(
        &discovery(v4, &keys("192.0.2.1:3478", "[::ffff:192.0.2.2]:3479")),
        4,
        "nat_discovery.alternate = \"[::ffff:192.0.2.2]:3479\" is invalid: is not IPv4",
    );
    // The three extra listeners must not collide with configured ones.
    fails(
        &discovery(
            r#""192.0.2.1:3478", "0.0.0.0:3479""#,
            &keys("192.0.2.1:3478", "192.0.2.2:3479"),
        ),
        4,
        "is invalid: discovery listens on 192.0.2.1:3479 itself, which the listen entry \"0.0.0.0:3479\" already covers",
    );
    fails(
        &discovery(
            r#""192.0.2.1:3478", "192.0.2.2:3478""#,
            &keys("192.0.2.1:3478", "192.0.2.2:3479"),
        ),
        4,
        "discovery listens on 192.0.2.2:3478 itself, which the listen entry \"192.0.2.2:3478\"",
    );
    // TCP counts where TCP discovery listeners are bound: tcp_listen holds the primary.
    let tcp = |tcp: &str| {
        format!(
            "tcp_listen = [{tcp}]\n{}",
            discovery(v4, &keys("192.0.2.1:3478", "192.0.2.2:3479"))
        )
    };
    fails(
        &tcp(r#""192.0.2.1:3478", "192.0.2.2:3479""#),
        5,
        "which the tcp_listen entry \"192.0.2.2:3479\" already covers",
    );
    parse(&tcp(r#""192.0.2.2:3479""#)).unwrap();
    parse(&tcp(r#""192.0.2.1:3478""#)).unwrap();
    // Another family's listener on the same port is no collision.
    parse(&discovery(
        r#""192.0.2.1:3478", "[::]:3479""#,
        &keys("192.0.2.1:3478", "192.0.2.2:3479"),
    ))
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

#[test]
fn relay_address_rules() {
    assert_eq!(
        parse("[relay]\naddress = \"auto\"\n")
            .unwrap()
            .relay
            .address,
        RelayIp::Auto
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
        m.contains("t.toml:3: relay.port_max = 2000 is invalid: must be >= relay.port_min (49152)"),
        "{m}"
    );
    let c = parse("[relay]\nport_min = 50000\nport_max = 50000\n").unwrap();
    assert_eq!((c.relay.port_min, c.relay.port_max), (50000, 50000));
}

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
        "[auth]\nnonce_key_env = \"1ABC\"\n",
        2,
        "auth.nonce_key_env = \"1ABC\" is invalid",
    );
    fails(
        "[auth]\nnonce_key_file = \"a\\u0000b\"\n",
        2,
        "auth.nonce_key_file",
    );
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
    fails(
        "[[auth.users]]\nname = \"a\"\npassword = \"\"\n",
        3,
        "auth.users[0].password is invalid: must not be empty",
    );
    // Padding or a doubled prefix is a typo, not a key.
    for key in [
        "0x0x0123456789abcdef0123456789ab",
        "0x0123456789abcdef0123456789abcde ",
        " 0123456789abcdef0123456789abcdef",
    ] {
        fails(
            &format!("[[auth.users]]\nname = \"a\"\nkey = \"{key}\"\n"),
            3,
            "auth.users[0].key is invalid",
        );
    }
    // Key without 0x, any case, is accepted and normalised.
    let c = parse("[[auth.users]]\nname = \"a\"\nkey = \"0123456789ABCDEF0123456789ABCDEF\"\n")
        .unwrap();
    assert_eq!(
        c.auth.users[0].secret,
        UserSecret::Md5KeyHex("0123456789abcdef0123456789abcdef".into())
    );
}

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
    // The wording comes from the policy's class table.
    for (entry, message) in [
        (
            "0.0.0.0/8",
            "\"this network\" (0.0.0.0/8) is never a valid peer and cannot be allowed",
        ),
        (
            "::",
            "the unspecified address is never a valid peer and cannot be allowed",
        ),
        (
            "169.254.0.0/16",
            "link-local (this includes cloud metadata) is never a valid peer",
        ),
        ("ff02::/16", "multicast is never a valid peer"),
        (
            "::ffff:10.0.0.0/104",
            "is an IPv4-mapped IPv6 spelling of IPv4 addresses; peers are checked by their \
             IPv4 address, so write the IPv4 range",
        ),
    ] {
        fails(
            &format!("[peers]\nallow = [\"{entry}\"]\n"),
            2,
            &format!("peers.allow[0] = \"{entry}\" is invalid: {message}"),
        );
    }
    // The deny list may name loopback, never-open and IPv4-compatible space (it acts on
    // the spelling as written).
    parse("[peers]\ndeny = [\"127.0.0.0/8\", \"169.254.0.0/16\", \"::/96\"]\n").unwrap();
    // Broad entries that merely include never-open space are fine; the
    // policy still keeps those parts closed.
    parse("[peers]\nallow = [\"0.0.0.0/0\", \"::/0\"]\ndeny = [\"169.254.0.0/16\"]\n").unwrap();
}
