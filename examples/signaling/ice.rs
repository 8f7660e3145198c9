//! Short-lived TURN credentials for the page, minted with the daemon's REST
//! secret (username "expiry<sep>user", password base64(HMAC-SHA1(secret,
//! username))). The secret stays in this process: only minted credentials
//! leave it.

use std::net::Ipv6Addr;

use serde::Serialize;
use turnpike::proto::auth::mint_rest_credential;

/// Shortest credential lifetime offered; below this a page could not even
/// finish ICE before its credential expires.
pub const MIN_TTL_SECS: u64 = 60;

/// `RTCIceServer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Body of `GET /api/ice` and the `ice` field of the welcome message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IceResponse {
    #[serde(rename = "iceServers")]
    pub ice_servers: Vec<IceServer>,
    /// Seconds the credential stays valid from now.
    pub ttl: u64,
}

enum Urls {
    /// `--turn-url` given: used as is.
    Fixed(Vec<String>),
    /// `stun:<host>:<port>` and `turn:<host>:<port>?transport=udp`, host
    /// taken from each request's Host header.
    Derived { port: u16 },
}

pub struct IceMinter {
    secret: Vec<u8>,
    separator: char,
    ttl_secs: u64,
    urls: Urls,
}

// Never print the secret, not even by accident in a panic message.
impl std::fmt::Debug for IceMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IceMinter")
            .field("secret", &"<redacted>")
            .field("separator", &self.separator)
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

impl IceMinter {
    /// `secret`: the daemon's first REST secret (any of them verifies).
    /// `turn_urls` empty means "derive from the Host header" on `port`.
    pub fn new(
        secret: Vec<u8>,
        separator: char,
        ttl_secs: u64,
        max_ttl_secs: u64,
        turn_urls: Vec<String>,
        port: u16,
    ) -> Result<Self, String> {
        if ttl_secs < MIN_TTL_SECS {
            return Err(format!("--ttl must be at least {MIN_TTL_SECS} seconds"));
        }
        if ttl_secs > max_ttl_secs {
            return Err(format!(
                "--ttl {ttl_secs} is longer than the daemon accepts (auth.rest_max_ttl_secs = \
                 {max_ttl_secs}): its credentials would be refused; lower --ttl or raise \
                 rest_max_ttl_secs"
            ));
        }
        for url in &turn_urls {
            check_url(url)?;
        }
        let urls = if turn_urls.is_empty() {
            Urls::Derived { port }
        } else {
            Urls::Fixed(turn_urls)
        };
        Ok(Self {
            secret,
            separator,
            ttl_secs,
            urls,
        })
    }

    pub fn ttl_secs(&self) -> u64 {
        self.ttl_secs
    }

    /// Credentials for `user` valid until `unix_now + ttl`, for a page that
    /// reached us as `host` (a hostname or bracketed IPv6 address, no port).
    pub fn mint(&self, host: &str, user: &str, unix_now: u64) -> IceResponse {
        let expiry = unix_now.saturating_add(self.ttl_secs);
        let (username, credential) =
            mint_rest_credential(&self.secret, user, expiry, self.separator);
        // The daemon listens on IPv4 by default, and "localhost" may resolve
        // to ::1 first.
        let host = if host == "localhost" {
            "127.0.0.1"
        } else {
            host
        };
        let urls = match &self.urls {
            Urls::Fixed(urls) => urls.clone(),
            Urls::Derived { port } => vec![
                format!("stun:{host}:{port}"),
                format!("turn:{host}:{port}?transport=udp"),
            ],
        };
        let (stun, turn): (Vec<String>, Vec<String>) =
            urls.into_iter().partition(|u| u.starts_with("stun"));
        let mut ice_servers = Vec::new();
        if !stun.is_empty() {
            ice_servers.push(IceServer {
                urls: stun,
                username: None,
                credential: None,
            });
        }
        if !turn.is_empty() {
            ice_servers.push(IceServer {
                urls: turn,
                username: Some(username),
                credential: Some(credential),
            });
        }
        IceResponse {
            ice_servers,
            ttl: self.ttl_secs,
        }
    }
}

fn check_url(url: &str) -> Result<(), String> {
    let scheme_ok = ["stun:", "stuns:", "turn:", "turns:"]
        .iter()
        .any(|s| url.starts_with(s));
    let chars_ok = url
        .chars()
        .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\'' | '<' | '>' | '\\'));
    if scheme_ok && chars_ok && url.len() <= 256 && url.len() > 6 {
        Ok(())
    } else {
        Err(format!(
            "--turn-url {url:?}: expected a stun:, stuns:, turn: or turns: URL such as \
             \"turn:turn.example.com:3478?transport=udp\""
        ))
    }
}

/// REST user part requested by a page: 1 to 64 of `A-Z a-z 0-9 _ . @ -`.
pub fn valid_rest_user(user: &str) -> bool {
    (1..=64).contains(&user.len())
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'))
}

/// A REST user derived from a free-text display name (for the welcome
/// message): disallowed characters become '_'.
pub fn rest_user_from_name(name: &str) -> String {
    let user: String = name
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if user.is_empty() {
        "guest".to_owned()
    } else {
        user
    }
}

/// The hostname of a Host header value, without its port: a DNS name or
/// IPv4 address (lower-cased), or a bracketed IPv6 address. `None` for
/// anything else, so nothing odd ends up inside an ICE URL.
pub fn host_of(header: &str) -> Option<String> {
    let h = header.trim();
    let port_ok = |p: &str| p.parse::<u16>().is_ok();
    if let Some(rest) = h.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let ip: Ipv6Addr = ip.parse().ok()?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(port_ok)) {
            return None;
        }
        return Some(format!("[{ip}]"));
    }
    let host = match h.rsplit_once(':') {
        Some((host, port)) if port_ok(port) => host,
        Some(_) => return None,
        None => h,
    };
    let ok = (1..=253).contains(&host.len())
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && !host.starts_with(['.', '-']);
    ok.then(|| host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use turnpike::proto::auth::rest_password;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn minter(urls: Vec<String>) -> IceMinter {
        IceMinter::new(SECRET.to_vec(), ':', 600, 86400, urls, 3478).unwrap()
    }

    #[test]
    fn derived_urls_follow_the_host() {
        let r = minter(vec![]).mint("turn.example.com", "ada", 1_000);
        assert_eq!(r.ttl, 600);
        assert_eq!(r.ice_servers.len(), 2);
        assert_eq!(r.ice_servers[0].urls, ["stun:turn.example.com:3478"]);
        assert_eq!(r.ice_servers[0].username, None);
        assert_eq!(
            r.ice_servers[1].urls,
            ["turn:turn.example.com:3478?transport=udp"]
        );
        let user = r.ice_servers[1].username.as_deref().unwrap();
        assert_eq!(user, "1600:ada");
        assert_eq!(
            r.ice_servers[1].credential.as_deref(),
            Some(rest_password(SECRET, user).as_str())
        );
    }

    #[test]
    fn localhost_becomes_ipv4_loopback() {
        let r = minter(vec![]).mint("localhost", "u", 0);
        assert_eq!(r.ice_servers[0].urls, ["stun:127.0.0.1:3478"]);
    }

    #[test]
    fn fixed_urls_are_split_into_stun_and_turn() {
        let r = minter(vec![
            "turn:a.example:3478?transport=udp".into(),
            "stun:a.example:3478".into(),
            "turns:a.example:5349?transport=tcp".into(),
        ])
        .mint("ignored", "u", 0);
        assert_eq!(r.ice_servers[0].urls, ["stun:a.example:3478"]);
        assert_eq!(
            r.ice_servers[1].urls,
            [
                "turn:a.example:3478?transport=udp",
                "turns:a.example:5349?transport=tcp"
            ]
        );
    }

    #[test]
    fn json_never_carries_the_secret() {
        let r = minter(vec![]).mint("h", "u", 0);
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"iceServers\""));
        assert!(!json.contains(std::str::from_utf8(SECRET).unwrap()));
        assert!(!format!("{:?}", minter(vec![])).contains("0123456789abcdef"));
    }

    #[test]
    fn ttl_and_url_checks() {
        let new = |ttl, urls: Vec<&str>| {
            IceMinter::new(
                SECRET.to_vec(),
                ':',
                ttl,
                3600,
                urls.into_iter().map(String::from).collect(),
                3478,
            )
        };
        assert!(new(3600, vec![]).is_ok());
        assert!(new(3601, vec![]).unwrap_err().contains("rest_max_ttl_secs"));
        assert!(new(59, vec![]).is_err());
        assert!(new(600, vec!["http://x"]).is_err());
        assert!(new(600, vec!["turn:x y"]).is_err());
        assert!(new(600, vec!["turn:\"x"]).is_err());
        assert!(new(600, vec!["turns:x.example:443?transport=tcp"]).is_ok());
    }

    #[test]
    fn hosts() {
        assert_eq!(host_of("Example.COM:8080").as_deref(), Some("example.com"));
        assert_eq!(host_of("203.0.113.7").as_deref(), Some("203.0.113.7"));
        assert_eq!(host_of("[::1]:8080").as_deref(), Some("[::1]"));
        assert_eq!(host_of("[2001:DB8::1]").as_deref(), Some("[2001:db8::1]"));
        for bad in [
            "", "a b", "x:y", "[::1", "[zz]:1", "a/b", "-x", "a@b", "x:99999",
        ] {
            assert_eq!(host_of(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn users() {
        assert!(valid_rest_user("ada"));
        assert!(valid_rest_user("a.b@c-d_e"));
        assert!(!valid_rest_user(""));
        assert!(!valid_rest_user("a:b"));
        assert!(!valid_rest_user("a b"));
        assert!(!valid_rest_user(&"x".repeat(65)));
        assert_eq!(rest_user_from_name("Zoë M"), "Zo__M");
        assert_eq!(rest_user_from_name(""), "guest");
    }
}
