//! Minting short-lived REST credentials in the shapes clients paste, and explaining why a
//! credential is refused. Shared by `turnpike credentials`, `turnpike verify-credential` and the
//! HTTP API; pure functions of the configuration, the secrets and the time.

use std::net::{IpAddr, SocketAddr};

use serde_json::{json, Value};

use crate::config::{Config, UserSecret};
use crate::proto::auth::{
    mint_rest_credential, parse_rest_username, AuthReject, Authenticator, RestConfig, StaticUser,
};

/// A minted credential and where to use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Minted {
    pub username: String,
    pub password: String,
    pub ttl_secs: u64,
    pub expires_at_unix: u64,
    pub uris: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    #[error("no REST secret configured: set auth.secret_file or auth.secret_env")]
    NoSecret,
    #[error("user must be 1 to 128 printable characters")]
    BadUser,
    #[error("ttl must be between 1 and {max} seconds")]
    BadTtl { max: u64 },
}

/// The largest TTL the configuration lets a minted credential have: beyond `rest_max_ttl_secs`
/// the daemon itself would refuse it.
pub fn max_ttl(config: &Config) -> u64 {
    config.api.max_ttl_secs.min(config.auth.rest_max_ttl_secs)
}

/// The TTL of a credential minted without one.
pub fn default_ttl(config: &Config) -> u64 {
    config.api.default_ttl_secs.min(max_ttl(config))
}

/// Mints under the configuration's rules: its REST separator, and at most [`max_ttl`].
pub fn mint_for(
    config: &Config,
    secrets: &[Vec<u8>],
    user: &str,
    ttl_secs: u64,
    now_unix: u64,
    uris: Vec<String>,
) -> Result<Minted, MintError> {
    let (sep, max) = (config.auth.rest_separator, max_ttl(config));
    mint(secrets, sep, user, ttl_secs, max, now_unix, uris)
}

/// The host clients should use: `public_host`, else the advertised relay address.
pub fn public_host(config: &Config, advertised: Option<IpAddr>) -> String {
    if !config.public_host.is_empty() {
        return config.public_host.clone();
    }
    let ip = config
        .relay
        .external_address
        .map(IpAddr::V4)
        .or(advertised)
        .or_else(|| {
            config
                .listen
                .first()
                .map(|l| l.ip())
                .filter(|ip| !ip.is_unspecified())
        });
    match ip {
        Some(IpAddr::V6(v6)) => format!("[{v6}]"),
        Some(ip) => ip.to_string(),
        None => "localhost".into(),
    }
}

/// The daemon's TURN listeners by transport: as configured, or as bound once the daemon runs
/// (a configured port 0 is only known then).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listeners {
    pub udp: Vec<SocketAddr>,
    pub tcp: Vec<SocketAddr>,
    /// TLS listeners; each serves plain TCP on its port as well.
    pub tls: Vec<SocketAddr>,
}

impl Listeners {
    pub fn configured(config: &Config) -> Listeners {
        Listeners {
            udp: config.listen.clone(),
            tcp: config.tcp_listen.clone(),
            tls: config.tls_listen.clone(),
        }
    }
}

/// STUN and TURN URIs for every listener port on the public host: `stun:` and
/// `turn:?transport=udp` per UDP port, `turn:?transport=tcp` per TCP port, `turns:` per TLS
/// port. The host must be the certificate's name for `turns:` to verify.
pub fn default_uris(listeners: &Listeners, host: &str) -> Vec<String> {
    let ports = |listeners: &[SocketAddr]| {
        let mut ports: Vec<u16> = listeners.iter().map(|l| l.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    };
    let (udp, tcp, tls) = (
        ports(&listeners.udp),
        ports(&listeners.tcp),
        ports(&listeners.tls),
    );
    let mut uris = Vec::new();
    for port in &udp {
        uris.push(format!("stun:{host}:{port}"));
    }
    for port in &udp {
        uris.push(format!("turn:{host}:{port}?transport=udp"));
    }
    for port in &tcp {
        uris.push(format!("turn:{host}:{port}?transport=tcp"));
    }
    for port in &tls {
        uris.push(format!("turns:{host}:{port}?transport=tcp"));
    }
    uris
}

/// Mints with the first secret (the newest, by the file's convention); every configured secret
/// verifies, so rotation is: prepend the new secret, reload, later drop the old one.
pub fn mint(
    secrets: &[Vec<u8>],
    separator: char,
    user: &str,
    ttl_secs: u64,
    max_ttl_secs: u64,
    now_unix: u64,
    uris: Vec<String>,
) -> Result<Minted, MintError> {
    let secret = secrets.first().ok_or(MintError::NoSecret)?;
    if user.is_empty() || user.chars().count() > 128 || user.chars().any(char::is_control) {
        return Err(MintError::BadUser);
    }
    if ttl_secs == 0 || ttl_secs > max_ttl_secs {
        return Err(MintError::BadTtl { max: max_ttl_secs });
    }
    let expires_at_unix = now_unix + ttl_secs;
    let (username, password) = mint_rest_credential(secret, user, expires_at_unix, separator);
    Ok(Minted {
        username,
        password,
        ttl_secs,
        expires_at_unix,
        uris,
    })
}

/// `{"iceServers":[...],"ttl":..,"expires_at":".."}`, ready for `new RTCPeerConnection(...)`.
pub fn ice_json(m: &Minted) -> Value {
    json!({
        "iceServers": [{
            "urls": m.uris,
            "username": m.username,
            "credential": m.password,
        }],
        "ttl": m.ttl_secs,
        "expires_at": rfc3339(m.expires_at_unix),
    })
}

/// The draft-uberti-behave-turn-rest response shape.
pub fn rest_json(m: &Minted) -> Value {
    json!({
        "username": m.username,
        "password": m.password,
        "ttl": m.ttl_secs,
        "uris": m.uris,
    })
}

/// Shell variable assignments, single-quoted so any byte survives `eval`.
pub fn env_text(m: &Minted) -> String {
    let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    format!(
        "TURN_USERNAME={}\nTURN_PASSWORD={}\nTURN_URIS={}\nTURN_TTL={}\nTURN_EXPIRES_AT={}\n",
        q(&m.username),
        q(&m.password),
        q(&m.uris.join(" ")),
        m.ttl_secs,
        q(&rfc3339(m.expires_at_unix)),
    )
}

/// UTC RFC 3339 for a unix time (civil-from-days, so no date crate is needed).
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86400) as i64;
    let secs = unix % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// A configured static user whose MD5 key does not parse (a validated file has none).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("auth.users {user}: bad key")]
pub struct BadUserKey {
    pub user: String,
}

/// The configuration's static users and REST rules, with `rest_secrets` already loaded, as the
/// core checks them.
pub fn authenticator(
    config: &Config,
    rest_secrets: Vec<Vec<u8>>,
) -> Result<Authenticator, BadUserKey> {
    let mut users = std::collections::HashMap::new();
    for u in &config.auth.users {
        let user = match &u.secret {
            UserSecret::Password(p) => StaticUser::Password(p.clone()),
            other => StaticUser::Md5Key(other.md5_key().ok_or_else(|| BadUserKey {
                user: u.name.clone(),
            })?),
        };
        users.insert(u.name.clone(), user);
    }
    let rest = (!rest_secrets.is_empty()).then_some(RestConfig {
        secrets: rest_secrets,
        separator: config.auth.rest_separator,
        max_ttl_secs: config.auth.rest_max_ttl_secs,
    });
    Ok(Authenticator::new(config.realm.clone(), users, rest))
}

/// Why a username/password pair is refused, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("wrong realm: the client uses {given:?}, this server's realm is {expected:?}")]
    WrongRealm { given: String, expected: String },
    #[error("wrong password for static user {0:?}")]
    WrongPassword(String),
    #[error("expired {ago} s ago (REST expiry {expiry})")]
    Expired { expiry: u64, ago: u64 },
    #[error(
        "expiry too far ahead: {ahead} s from now, the server accepts at most {max} s \
         (auth.rest_max_ttl_secs)"
    )]
    TooFarAhead { ahead: u64, max: u64 },
    #[error("no configured REST secret matches this password (minted with another secret?)")]
    NoSecretMatches,
    #[error("unknown user {0:?}: not a static user, and no REST secret is configured")]
    UnknownUser(String),
    #[error(
        "unknown user {0:?}: not a static user, and not a REST username \
         (\"<expiry>{1}<user>\" or \"<user>{1}<expiry>\")"
    )]
    NotRest(String, char),
    #[error("revoked: {0:?} is refused (POST /api/v1/unrevoke lifts a revocation)")]
    Revoked(String),
    #[error("{0}")]
    Rejected(AuthReject),
    #[error(transparent)]
    BadConfig(#[from] BadUserKey),
}

/// What kind of credential was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    StaticUser,
    Rest { user: String, expires_in_secs: u64 },
}

/// Checks a pair the way a daemon started on this configuration would. It knows no revocation
/// made through a running daemon's API: see [`verify_with`].
pub fn verify(
    config: &Config,
    secrets: &[Vec<u8>],
    username: &str,
    password: &str,
    realm: Option<&str>,
    now_unix: u64,
) -> Result<Accepted, Refusal> {
    let auth = authenticator(config, secrets.to_vec())?;
    verify_with(&auth, username, password, realm, now_unix)
}

/// Checks a pair against `auth` (the core's key lookup, expiry and revocation rules) and
/// explains a refusal with the numbers behind it.
pub fn verify_with(
    auth: &Authenticator,
    username: &str,
    password: &str,
    realm: Option<&str>,
    now_unix: u64,
) -> Result<Accepted, Refusal> {
    if let Some(given) = realm.filter(|r| *r != auth.realm()) {
        return Err(Refusal::WrongRealm {
            given: given.into(),
            expected: auth.realm().into(),
        });
    }
    let static_user = auth.is_static_user(username);
    let separator = auth.rest_separator();
    // Only for the explanation: the verdict is the authenticator's.
    let rest = separator
        .filter(|_| !static_user)
        .and_then(|sep| parse_rest_username(username, sep));
    let (expiry, user) = rest.unwrap_or_default();
    let why = match auth.check_password(username, password, now_unix) {
        Ok(()) if rest.is_some() => {
            return Ok(Accepted::Rest {
                user: user.into(),
                expires_in_secs: expiry.saturating_sub(now_unix),
            })
        }
        Ok(()) => return Ok(Accepted::StaticUser),
        Err(why) => why,
    };
    Err(match why {
        AuthReject::WrongPassword if static_user => Refusal::WrongPassword(username.into()),
        AuthReject::WrongPassword => Refusal::NoSecretMatches,
        AuthReject::UnknownUser => Refusal::UnknownUser(username.into()),
        AuthReject::MalformedUsername => {
            Refusal::NotRest(username.into(), separator.unwrap_or_default())
        }
        AuthReject::Expired => Refusal::Expired {
            expiry,
            ago: now_unix.saturating_sub(expiry),
        },
        AuthReject::ExpiryTooFarAhead => Refusal::TooFarAhead {
            ahead: expiry.saturating_sub(now_unix),
            max: auth.rest_max_ttl_secs().unwrap_or_default(),
        },
        AuthReject::Revoked => Refusal::Revoked(username.into()),
        AuthReject::UnsupportedAlgorithm => Refusal::Rejected(why),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::auth::{long_term_key, rest_password, PasswordAlgorithm};

    const NOW: u64 = 1_800_000_000;

    fn config() -> Config {
        Config::parse(
            r#"
realm = "r.example"
listen = ["0.0.0.0:3478", "[::]:3478"]
public_host = "turn.example.com"
[[auth.users]]
name = "alice"
password = "wonderland"
[[auth.users]]
name = "keyed"
key = "0x9e2a8a5e6d4a9f4d7c0d3f1f0a4b2c1d"
"#,
            "t.toml",
        )
        .unwrap()
    }

    fn secrets() -> Vec<Vec<u8>> {
        vec![
            b"new-secret-0123456789".to_vec(),
            b"old-secret-0123456789".to_vec(),
        ]
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_599), "2025-12-31T23:59:59Z");
    }

    #[test]
    fn every_transport_gets_its_uri_on_the_public_host() {
        let mut c = config();
        c.tcp_listen = vec!["0.0.0.0:3478".parse().unwrap()];
        c.tls_listen = vec!["0.0.0.0:443".parse().unwrap(), "[::]:443".parse().unwrap()];
        assert_eq!(
            default_uris(&Listeners::configured(&c), &public_host(&c, None)),
            [
                "stun:turn.example.com:3478",
                "turn:turn.example.com:3478?transport=udp",
                "turn:turn.example.com:3478?transport=tcp",
                "turns:turn.example.com:443?transport=tcp",
            ]
        );
    }

    #[test]
    fn minted_credential_verifies_and_shapes_parse() {
        let c = config();
        let uris = default_uris(&Listeners::configured(&c), &public_host(&c, None));
        assert_eq!(
            uris,
            [
                "stun:turn.example.com:3478",
                "turn:turn.example.com:3478?transport=udp"
            ]
        );
        let m = mint(&secrets(), ':', "bob", 600, max_ttl(&c), NOW, uris).unwrap();
        assert_eq!(m.username, format!("{}:bob", NOW + 600));
        assert_eq!(
            verify(&c, &secrets(), &m.username, &m.password, None, NOW),
            Ok(Accepted::Rest {
                user: "bob".into(),
                expires_in_secs: 600
            })
        );
        let ice = ice_json(&m);
        assert_eq!(ice["iceServers"][0]["username"], m.username.as_str());
        assert_eq!(ice["ttl"], 600);
        assert_eq!(ice["expires_at"], rfc3339(NOW + 600).as_str());
        let rest = rest_json(&m);
        assert_eq!(rest["password"], m.password.as_str());
        let env = env_text(&m);
        assert!(env.contains(&format!("TURN_USERNAME='{}'", m.username)));
    }

    #[test]
    fn mint_errors() {
        let c = config();
        assert_eq!(
            mint(&[], ':', "bob", 60, max_ttl(&c), NOW, vec![]),
            Err(MintError::NoSecret)
        );
        assert_eq!(
            mint(&secrets(), ':', "", 60, 100, NOW, vec![]),
            Err(MintError::BadUser)
        );
        assert_eq!(
            mint(&secrets(), ':', "bob", 101, 100, NOW, vec![]),
            Err(MintError::BadTtl { max: 100 })
        );
        assert_eq!(
            mint(&secrets(), ':', "bob", 0, 100, NOW, vec![]),
            Err(MintError::BadTtl { max: 100 })
        );
    }

    #[test]
    fn verify_names_every_reason() {
        let c = config();
        let s = secrets();
        assert_eq!(
            verify(&c, &s, "alice", "wonderland", None, NOW),
            Ok(Accepted::StaticUser)
        );
        assert_eq!(
            verify(&c, &s, "alice", "x", None, NOW),
            Err(Refusal::WrongPassword("alice".into()))
        );
        assert!(matches!(
            verify(&c, &s, "alice", "wonderland", Some("other"), NOW),
            Err(Refusal::WrongRealm { .. })
        ));
        let expired = format!("{}:bob", NOW - 5);
        let p = rest_password(&s[0], &expired);
        assert_eq!(
            verify(&c, &s, &expired, &p, None, NOW),
            Err(Refusal::Expired {
                expiry: NOW - 5,
                ago: 5
            })
        );
        let far = format!("{}:bob", NOW + 172_801);
        let p = rest_password(&s[0], &far);
        assert!(matches!(
            verify(&c, &s, &far, &p, None, NOW),
            Err(Refusal::TooFarAhead { .. })
        ));
        let fine = format!("{}:bob", NOW + 60);
        assert_eq!(
            verify(&c, &s, &fine, "bm90IGl0", None, NOW),
            Err(Refusal::NoSecretMatches)
        );
        // The old secret still verifies (rotation).
        let p = rest_password(&s[1], &fine);
        assert!(verify(&c, &s, &fine, &p, None, NOW).is_ok());
        assert_eq!(
            verify(&c, &[], &fine, &p, None, NOW),
            Err(Refusal::UnknownUser(fine.clone()))
        );
        assert!(matches!(
            verify(&c, &s, "mallory", "x", None, NOW),
            Err(Refusal::NotRest(..))
        ));
        // A turnadmin -k style key verifies the password it was made from, and only that.
        let key = long_term_key(PasswordAlgorithm::Md5, "keyed", "r.example", "pw");
        let hex: String = key.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        let mut c2 = c.clone();
        c2.auth.users[1].secret = UserSecret::Md5KeyHex(hex);
        assert_eq!(
            verify(&c2, &s, "keyed", "pw", None, NOW),
            Ok(Accepted::StaticUser)
        );
        assert!(verify(&c2, &s, "keyed", "pX", None, NOW).is_err());
    }

    #[test]
    fn verify_reports_a_revoked_user_as_revoked() {
        let c = config();
        let mut auth = authenticator(&c, secrets()).unwrap();
        let rest = format!("{}:bob", NOW + 60);
        let p = rest_password(&secrets()[0], &rest);
        assert!(verify_with(&auth, &rest, &p, None, NOW).is_ok());
        auth.revoke_user("bob", NOW + 3600);
        assert!(auth.revoke_static_user("alice"));
        assert_eq!(
            verify_with(&auth, &rest, &p, None, NOW),
            Err(Refusal::Revoked(rest.clone()))
        );
        assert_eq!(
            verify_with(&auth, "alice", "wonderland", None, NOW),
            Err(Refusal::Revoked("alice".into()))
        );
        // Revocation is checked before the password: a revoked user learns nothing more.
        assert_eq!(
            verify_with(&auth, "alice", "x", None, NOW),
            Err(Refusal::Revoked("alice".into()))
        );
        let text = Refusal::Revoked("alice".into()).to_string();
        assert!(text.starts_with("revoked"), "{text}");
        // Other users are untouched.
        let other = format!("{}:carol", NOW + 60);
        let p = rest_password(&secrets()[1], &other);
        assert!(verify_with(&auth, &other, &p, None, NOW).is_ok());
    }
}
