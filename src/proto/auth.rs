//! Authentication building blocks of the sans-IO core: long-term keys, static
//! users, REST (time-limited) credentials and stateless nonces.
//!
//! Nothing here reads the clock, draws randomness or touches a socket: time and
//! secrets come in as arguments so tests are deterministic. Secrets and keys are
//! never printed: every `Debug` of a type that holds one is redacted.
//!
//! Passwords and realms are used as given (no SASLprep / OpaqueString): an
//! operator who needs non-ASCII passwords must configure the prepared form.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use md5::{Digest as _, Md5};
use ring::{digest, hmac};

use super::codec::constant_time_eq;
use super::mac;

/// RFC 8489 §18.5.1.1 PASSWORD-ALGORITHM values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasswordAlgorithm {
    Md5,
    Sha256,
}

impl PasswordAlgorithm {
    pub fn code(self) -> u16 {
        match self {
            Self::Md5 => 0x0001,
            Self::Sha256 => 0x0002,
        }
    }

    pub fn from_code(code: u16) -> Option<Self> {
        match code {
            0x0001 => Some(Self::Md5),
            0x0002 => Some(Self::Sha256),
            _ => None,
        }
    }
}

/// HMAC key for MESSAGE-INTEGRITY (16 bytes, MD5) or MESSAGE-INTEGRITY-SHA256
/// (32 bytes). Lives on the stack so the per-request path does not allocate.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LongTermKey {
    bytes: [u8; 32],
    len: u8,
}

impl LongTermKey {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    fn from_md5(k: [u8; 16]) -> Self {
        let mut bytes = [0u8; 32];
        bytes[..16].copy_from_slice(&k);
        Self { bytes, len: 16 }
    }

    fn from_sha256(k: [u8; 32]) -> Self {
        Self { bytes: k, len: 32 }
    }
}

impl fmt::Debug for LongTermKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LongTermKey(<redacted>)")
    }
}

/// key = MD5(username ":" realm ":" password), or SHA-256 of the same
/// (RFC 8489 §9.2.2). Hashed incrementally: no concatenated copy on the heap.
pub fn long_term_key(
    alg: PasswordAlgorithm,
    username: &str,
    realm: &str,
    password: &str,
) -> LongTermKey {
    let parts = [
        username.as_bytes(),
        b":",
        realm.as_bytes(),
        b":",
        password.as_bytes(),
    ];
    match alg {
        PasswordAlgorithm::Md5 => {
            let mut h = Md5::new();
            for p in parts {
                h.update(p);
            }
            LongTermKey::from_md5(h.finalize().into())
        }
        PasswordAlgorithm::Sha256 => {
            let mut ctx = digest::Context::new(&digest::SHA256);
            for p in parts {
                ctx.update(p);
            }
            let mut k = [0u8; 32];
            k.copy_from_slice(ctx.finish().as_ref());
            LongTermKey::from_sha256(k)
        }
    }
}

/// Configuration mistakes. Display texts never echo the offending value, since
/// that value may be a key or a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthConfigError {
    #[error("MD5 key must be 32 hex digits, optionally prefixed by 0x")]
    BadMd5KeyHex,
    #[error("REST credentials need at least one secret")]
    NoRestSecrets,
    #[error("a REST secret is empty")]
    EmptyRestSecret,
    #[error("REST username separator must not be a digit, whitespace or a control character")]
    BadRestSeparator,
}

/// Parses the MD5 key as coturn's `turnadmin -k` prints it: "0x" + 32 hex
/// digits. The prefix is optional, either case is accepted, and surrounding
/// whitespace (a trailing newline from a secrets file) is ignored.
pub fn parse_md5_key_hex(s: &str) -> Result<[u8; 16], AuthConfigError> {
    let s = s.trim();
    let hex = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s)
        .as_bytes();
    if hex.len() != 32 {
        return Err(AuthConfigError::BadMd5KeyHex);
    }
    let mut out = [0u8; 16];
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let hi = hex_val(pair[0]).ok_or(AuthConfigError::BadMd5KeyHex)?;
        let lo = hex_val(pair[1]).ok_or(AuthConfigError::BadMd5KeyHex)?;
        *o = (hi << 4) | lo;
    }
    Ok(out)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// A configured static user: a plaintext password, or a precomputed MD5 key
/// (coturn's `user=name:0x...` form), which can only serve MD5 integrity.
#[derive(Clone, PartialEq, Eq)]
pub enum StaticUser {
    Password(String),
    Md5Key([u8; 16]),
}

impl fmt::Debug for StaticUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Password(_) => f.write_str("Password(<redacted>)"),
            Self::Md5Key(_) => f.write_str("Md5Key(<redacted>)"),
        }
    }
}

/// Shared-secret (REST API) credentials. Several secrets allow rotation: any of
/// them may verify a request.
#[derive(Clone)]
pub struct RestConfig {
    pub secrets: Vec<Vec<u8>>,
    pub separator: char,
    pub max_ttl_secs: u64,
}

impl RestConfig {
    /// Checks what `Authenticator::new` cannot refuse: a secret must exist and be
    /// non-empty, and a digit separator would make "expiry:user" ambiguous.
    pub fn validate(&self) -> Result<(), AuthConfigError> {
        if self.secrets.is_empty() {
            return Err(AuthConfigError::NoRestSecrets);
        }
        if self.secrets.iter().any(|s| s.is_empty()) {
            return Err(AuthConfigError::EmptyRestSecret);
        }
        let c = self.separator;
        if c.is_ascii_digit() || c.is_whitespace() || c.is_control() {
            return Err(AuthConfigError::BadRestSeparator);
        }
        Ok(())
    }
}

impl fmt::Debug for RestConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RestConfig")
            .field(
                "secrets",
                &format_args!("<{} redacted>", self.secrets.len()),
            )
            .field("separator", &self.separator)
            .field("max_ttl_secs", &self.max_ttl_secs)
            .finish()
    }
}

/// Declares [`AuthReject`] with `COUNT`, `ALL` and `as_str` from one list, so the list and
/// the labels cannot miss a variant.
macro_rules! auth_reject {
    ($($(#[$attr:meta])* $variant:ident => $label:literal,)*) => {
        /// Why a credential is refused: [`Authenticator::candidate_keys`] refuses the username,
        /// or no key derived from the password matches (`WrongPassword`). Display texts never
        /// contain a secret or password; `as_str` is the bounded metrics label, and
        /// `reason as usize` indexes [`ALL`](Self::ALL) and per-reason counters.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
        pub enum AuthReject {
            $($(#[$attr])* $variant,)*
        }

        impl AuthReject {
            pub const COUNT: usize = [$($label),*].len();
            pub const ALL: [AuthReject; Self::COUNT] = [$(AuthReject::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(AuthReject::$variant => $label,)*
                }
            }
        }
    };
}

auth_reject! {
    #[error("wrong password")]
    WrongPassword => "wrong_password",
    #[error("unknown user")]
    UnknownUser => "unknown_user",
    #[error("REST credential expired")]
    Expired => "expired",
    #[error("REST credential expiry is further ahead than the maximum TTL")]
    ExpiryTooFarAhead => "expiry_too_far_ahead",
    #[error("malformed REST username")]
    MalformedUsername => "malformed_username",
    #[error("password algorithm not supported for this user")]
    UnsupportedAlgorithm => "unsupported_algorithm",
    #[error("credential revoked")]
    Revoked => "revoked",
}

/// Keys for one static user, derived once: the realm is fixed for the life of
/// an `Authenticator`, and plaintext passwords need not stay in memory.
#[derive(Clone)]
struct StaticKeys {
    md5: LongTermKey,
    /// None for a user configured by MD5 key: SHA-256 needs the password.
    sha256: Option<LongTermKey>,
    /// Identifies the configured password or key (not the realm), so a reload can tell
    /// whether the credential of a revoked user changed.
    fingerprint: [u8; 32],
    /// Refused with `AuthReject::Revoked` until un-revoked, or until a reload changes or
    /// removes this user's credential.
    revoked: bool,
}

/// SHA-256 over a domain tag, the name and the configured password or key. Realm-independent:
/// changing the realm does not change "the credential" for revocation purposes.
fn credential_fingerprint(name: &str, user: &StaticUser) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"turnpike static credential\0");
    ctx.update(name.as_bytes());
    ctx.update(b"\0");
    match user {
        StaticUser::Password(p) => {
            ctx.update(b"password\0");
            ctx.update(p.as_bytes());
        }
        StaticUser::Md5Key(k) => {
            ctx.update(b"md5-key\0");
            ctx.update(k);
        }
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// What `Authenticator::unrevoke_user` lifted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Unrevoked {
    /// A REST revocation of this user part was in force.
    pub rest: bool,
    /// The static user of this name was revoked.
    pub static_user: bool,
}

#[derive(Clone)]
struct RestState {
    keys: Vec<mac::Sha1Key>,
    separator: char,
    max_ttl_secs: u64,
}

/// Maps a username to the keys that may verify its requests.
#[derive(Clone)]
pub struct Authenticator {
    realm: String,
    users: HashMap<String, StaticKeys>,
    rest: Option<RestState>,
    /// REST user part -> credentials with expiry <= this are refused.
    revoked: HashMap<String, u64>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("realm", &self.realm)
            .field("static_users", &self.users.len())
            .field("rest_secrets", &self.rest.as_ref().map(|r| r.keys.len()))
            .field("revoked_users", &self.revoked.len())
            .field(
                "revoked_static_users",
                &self.users.values().filter(|k| k.revoked).count(),
            )
            .finish()
    }
}

impl Authenticator {
    pub fn new(
        realm: String,
        users: HashMap<String, StaticUser>,
        rest: Option<RestConfig>,
    ) -> Self {
        let users = users
            .into_iter()
            .map(|(name, u)| {
                let fingerprint = credential_fingerprint(&name, &u);
                let keys = match u {
                    StaticUser::Password(p) => StaticKeys {
                        md5: long_term_key(PasswordAlgorithm::Md5, &name, &realm, &p),
                        sha256: Some(long_term_key(PasswordAlgorithm::Sha256, &name, &realm, &p)),
                        fingerprint,
                        revoked: false,
                    },
                    StaticUser::Md5Key(k) => StaticKeys {
                        md5: LongTermKey::from_md5(k),
                        sha256: None,
                        fingerprint,
                        revoked: false,
                    },
                };
                (name, keys)
            })
            .collect();
        let rest = rest.map(|r| RestState {
            keys: r.secrets.iter().map(|s| mac::sha1_key(s)).collect(),
            separator: r.separator,
            max_ttl_secs: r.max_ttl_secs,
        });
        Self {
            realm,
            users,
            rest,
            revoked: HashMap::new(),
        }
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// Whether `username` is one of the configured static users (whose one credential is often
    /// shared by every client of an app, so quotas count them per source address too).
    pub fn is_static_user(&self, username: &str) -> bool {
        self.users.contains_key(username)
    }

    /// The name quotas count by: a static user's name, or the user part of a REST username, so
    /// credentials minted with different expiries share one user's allocation quota. A bare
    /// expiry (no user part) counts as its whole username.
    pub fn quota_user<'a>(&self, username: &'a str) -> &'a str {
        if self.users.contains_key(username) {
            return username;
        }
        match &self.rest {
            Some(rest) => match parse_rest_username(username, rest.separator) {
                Some((_, user)) if !user.is_empty() => user,
                _ => username,
            },
            None => username,
        }
    }

    /// Fills `out` (cleared first) with every key that could verify a request
    /// from `username`: one for a static user, one per secret for a REST
    /// username (rotation). Static users win over REST parsing; a revoked static
    /// user is refused. Allocates only if `out` must grow, so a reused `out`
    /// makes the steady state heap-free.
    pub fn candidate_keys(
        &self,
        username: &str,
        alg: PasswordAlgorithm,
        unix_now: u64,
        out: &mut Vec<LongTermKey>,
    ) -> Result<(), AuthReject> {
        out.clear();
        if let Some(keys) = self.users.get(username) {
            if self.is_revoked(username) {
                return Err(AuthReject::Revoked);
            }
            let key = match alg {
                PasswordAlgorithm::Md5 => keys.md5,
                PasswordAlgorithm::Sha256 => keys.sha256.ok_or(AuthReject::UnsupportedAlgorithm)?,
            };
            out.push(key);
            return Ok(());
        }
        let rest = self.rest.as_ref().ok_or(AuthReject::UnknownUser)?;
        let (expiry, _) =
            parse_rest_username(username, rest.separator).ok_or(AuthReject::MalformedUsername)?;
        if expiry < unix_now {
            return Err(AuthReject::Expired);
        }
        if expiry > unix_now.saturating_add(rest.max_ttl_secs) {
            return Err(AuthReject::ExpiryTooFarAhead);
        }
        if self.is_revoked(username) {
            return Err(AuthReject::Revoked);
        }
        for key in &rest.keys {
            let mut buf = [0u8; REST_PASSWORD_LEN];
            let password = rest_password_into(key, username, &mut buf);
            out.push(long_term_key(alg, username, &self.realm, password));
        }
        Ok(())
    }

    /// Checks a plain password against the keys of [`candidate_keys`](Self::candidate_keys),
    /// the lookup a request's MESSAGE-INTEGRITY goes through, so a tool that holds a password
    /// rather than a signed request (`turnpike verify-credential`) gets the daemon's verdict.
    pub fn check_password(
        &self,
        username: &str,
        password: &str,
        unix_now: u64,
    ) -> Result<(), AuthReject> {
        let mut keys = Vec::new();
        self.candidate_keys(username, PasswordAlgorithm::Md5, unix_now, &mut keys)?;
        let given = long_term_key(PasswordAlgorithm::Md5, username, &self.realm, password);
        keys.iter()
            .any(|k| constant_time_eq(k.as_bytes(), given.as_bytes()))
            .then_some(())
            .ok_or(AuthReject::WrongPassword)
    }

    /// The separator REST usernames are split on; None without REST credentials.
    pub fn rest_separator(&self) -> Option<char> {
        self.rest.as_ref().map(|r| r.separator)
    }

    /// How far ahead a REST expiry may lie; None without REST credentials.
    pub fn rest_max_ttl_secs(&self) -> Option<u64> {
        self.rest.as_ref().map(|r| r.max_ttl_secs)
    }

    /// Refuses REST credentials of `user` (the user part, without expiry) whose
    /// expiry is <= `until_unix`. Revoking again can only extend the cut-off.
    pub fn revoke_user(&mut self, user: &str, until_unix: u64) {
        let until = self.revoked.entry(user.to_owned()).or_insert(until_unix);
        *until = (*until).max(until_unix);
    }

    /// Refuses the static user `name` (`AuthReject::Revoked`) until
    /// `unrevoke_user`, or until a reload whose configuration changes or
    /// removes her password or key. Returns false when `name` is no static user.
    pub fn revoke_static_user(&mut self, name: &str) -> bool {
        match self.users.get_mut(name) {
            Some(keys) => {
                keys.revoked = true;
                true
            }
            None => false,
        }
    }

    /// Lifts every revocation of `name`: the REST one of that user part and the
    /// static user of that name.
    pub fn unrevoke_user(&mut self, name: &str) -> Unrevoked {
        let rest = self.revoked.remove(name).is_some();
        let static_user = self
            .users
            .get_mut(name)
            .is_some_and(|keys| std::mem::replace(&mut keys.revoked, false));
        Unrevoked { rest, static_user }
    }

    /// The cut-off that refuses a REST credential of `user` expiring at
    /// `expiry`, if one does (the one rule `candidate_keys` applies, for
    /// callers that mint credentials and must not hand out refused ones).
    pub fn rest_refused_until(&self, user: &str, expiry: u64) -> Option<u64> {
        self.revoked
            .get(user)
            .copied()
            .filter(|&until| expiry <= until)
    }

    /// Whether credentials of `username` (as a client sends it) are refused as revoked: a revoked
    /// static user, or a REST username whose user part is revoked up to or past its expiry. The
    /// one revocation rule: requests (`candidate_keys`) and the API's revocation query use it.
    pub fn is_revoked(&self, username: &str) -> bool {
        if let Some(keys) = self.users.get(username) {
            return keys.revoked;
        }
        let Some(rest) = &self.rest else {
            return false;
        };
        parse_rest_username(username, rest.separator)
            .is_some_and(|(expiry, user)| self.rest_refused_until(user, expiry).is_some())
    }

    /// Whether `user` is under a revocation of either kind (REST or static), whatever its
    /// expiry: for the fleet's catch-up, which must not revoke the same user twice.
    pub fn is_user_revoked(&self, user: &str) -> bool {
        self.revoked.contains_key(user) || self.users.get(user).is_some_and(|k| k.revoked)
    }

    /// Whether the static user `name` is revoked.
    #[cfg(test)]
    fn is_static_revoked(&self, name: &str) -> bool {
        self.users.get(name).is_some_and(|k| k.revoked)
    }

    /// REST revocations that `prune_revocations(unix_now)` would drop.
    pub fn prunable_revocations(&self, unix_now: u64) -> usize {
        self.revoked.values().filter(|&&u| u < unix_now).count()
    }

    /// Drops REST revocations that can no longer matter: once `until < now`,
    /// every credential they cover is refused as expired anyway. Static
    /// revocations have no expiry and stay.
    pub fn prune_revocations(&mut self, unix_now: u64) {
        self.revoked.retain(|_, until| *until >= unix_now);
    }

    /// Copies the revocations of `old` into `self`, so a reload (which builds a
    /// fresh `Authenticator`) does not silently un-revoke anyone. REST
    /// revocations always carry over. A static revocation carries over only
    /// while the user keeps the same password or key: a reload that changes
    /// or removes her credential lifts it (a changed realm alone does not).
    pub fn carry_revocations_from(&mut self, old: &Self) {
        for (user, &until) in &old.revoked {
            self.revoke_user(user, until);
        }
        for (name, old_keys) in old.users.iter().filter(|(_, k)| k.revoked) {
            if let Some(keys) = self.users.get_mut(name) {
                if keys.fingerprint == old_keys.fingerprint {
                    keys.revoked = true;
                }
            }
        }
    }
}

/// Splits a REST (draft-uberti-behave-turn-rest) username into (expiry, user).
///
/// Accepted: "expiry<sep>user", "user<sep>expiry" and a bare "expiry" (user "").
/// The user part may contain the separator: if the text before the first
/// separator is a number the form is expiry-first and the rest is the user;
/// otherwise the text after the last separator must be the number. So
/// "123:456" is expiry 123 for user "456" (expiry-first wins, as in coturn).
/// An empty user next to a separator, a sign, whitespace or a number that
/// overflows u64 is refused.
pub fn parse_rest_username(username: &str, separator: char) -> Option<(u64, &str)> {
    let Some((head, tail)) = username.split_once(separator) else {
        return parse_expiry(username).map(|e| (e, ""));
    };
    if let Some(expiry) = parse_expiry(head) {
        return (!tail.is_empty()).then_some((expiry, tail));
    }
    let (user, last) = username.rsplit_once(separator)?;
    let expiry = parse_expiry(last)?;
    (!user.is_empty()).then_some((expiry, user))
}

/// Strict: ASCII digits only (`u64::from_str` alone would take a leading '+').
fn parse_expiry(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// base64 (standard, padded) of a 20-byte HMAC-SHA1 tag.
const REST_PASSWORD_LEN: usize = 28;

fn rest_password_into<'a>(
    key: &mac::Sha1Key,
    username: &str,
    buf: &'a mut [u8; REST_PASSWORD_LEN],
) -> &'a str {
    let tag = mac::sign_sha1(key, &[username.as_bytes()]);
    let n = STANDARD
        .encode_slice(tag, buf)
        .expect("28 bytes hold base64 of a 20-byte tag");
    std::str::from_utf8(&buf[..n]).expect("base64 is ASCII")
}

/// password = base64(HMAC-SHA1(secret, username)), standard alphabet, padded:
/// what coturn's `turnutils_uclient -W` and the usual REST snippets compute.
pub fn rest_password(secret: &[u8], username: &str) -> String {
    let key = mac::sha1_key(secret);
    let mut buf = [0u8; REST_PASSWORD_LEN];
    rest_password_into(&key, username, &mut buf).to_owned()
}

/// Mints ("expiry<sep>user", password). An empty `user` gives a bare expiry.
pub fn mint_rest_credential(
    secret: &[u8],
    user: &str,
    expiry_unix: u64,
    separator: char,
) -> (String, String) {
    let username = if user.is_empty() {
        expiry_unix.to_string()
    } else {
        format!("{expiry_unix}{separator}{user}")
    };
    let password = rest_password(secret, &username);
    (username, password)
}

/// RFC 8489 §9.2 nonce cookie.
const NONCE_COOKIE: &[u8; 9] = b"obMatJos2";
/// Security feature set 0x800000 (only "Password algorithms", bit 0 = MSB) in base64.
const NONCE_FEATURES: &[u8; 4] = b"gAAA";
const EXPIRY_HEX_LEN: usize = 16;
/// 128 of the 256 HMAC-SHA256 bits: above the 96-bit floor, short on the wire.
const TAG_BYTES: usize = 16;
const TAG_B64_LEN: usize = 22;
const PREFIX_LEN: usize = NONCE_COOKIE.len() + NONCE_FEATURES.len();
const MACED_LEN: usize = PREFIX_LEN + EXPIRY_HEX_LEN;
/// Every nonce we issue has exactly this length (51).
pub const NONCE_LEN: usize = MACED_LEN + TAG_B64_LEN;

/// An issued nonce, on the stack.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NonceBuf {
    buf: [u8; NONCE_LEN],
    len: u8,
}

impl NonceBuf {
    pub fn as_str(&self) -> &str {
        // Only `issue` builds one, from ASCII; the fallback is unreachable.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl fmt::Debug for NonceBuf {
    // Nonces travel in clear in every 401, so printing one reveals nothing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NonceBuf({:?})", self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonceStatus {
    Valid,
    /// Ours, but past its expiry: answer 438 so the client retries with a fresh one.
    Stale,
    /// Not ours, or not for this client: treat as if no nonce was sent.
    Invalid,
}

/// Stateless nonces: the nonce carries its expiry and a MAC binding it to the
/// client's transport address, so the server keeps no per-client state before
/// a request authenticates.
///
/// Instances that share their keys (`auth.nonce_key_file`) accept each other's nonces: a
/// client whose next request lands on another instance behind anycast or a UDP load balancer
/// is not sent round a 438 loop. The first key issues, every key verifies, so a rotation adds
/// the new key after the old one everywhere, then moves it first, then drops the old one.
pub struct NonceIssuer {
    /// Replaced whole on a reload; read (never contended but by a reload) per challenge and
    /// per authenticated request, not per relayed packet.
    keys: RwLock<Arc<[hmac::Key]>>,
    lifetime_secs: u64,
}

impl fmt::Debug for NonceIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NonceIssuer")
            .field("keys", &format_args!("<redacted>"))
            .field("lifetime_secs", &self.lifetime_secs)
            .finish()
    }
}

impl NonceIssuer {
    /// A nonce is valid for `lifetime_secs` seconds after issue (at least 1, so
    /// a zero in config cannot make every nonce stale on arrival).
    pub fn new(secret: [u8; 32], lifetime_secs: u64) -> Self {
        Self {
            keys: RwLock::new(nonce_keys(&[secret])),
            lifetime_secs: lifetime_secs.max(1),
        }
    }

    /// From now on the first of `keys` issues and each of them verifies. An empty list
    /// changes nothing.
    pub fn set_keys<K: AsRef<[u8]>>(&self, keys: &[K]) {
        if keys.is_empty() {
            return;
        }
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = nonce_keys(keys);
    }

    fn current_keys(&self) -> Arc<[hmac::Key]> {
        // A poisoned lock still holds a whole key list: it is only ever replaced whole.
        Arc::clone(&self.keys.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn lifetime_secs(&self) -> u64 {
        self.lifetime_secs
    }

    /// "obMatJos2" "gAAA" <expiry: 16 lowercase hex> <tag: 22 base64url chars>.
    pub fn issue(&self, unix_now: u64, transport: u8, client: &SocketAddr) -> NonceBuf {
        let expiry = unix_now.saturating_add(self.lifetime_secs);
        let mut buf = [0u8; NONCE_LEN];
        buf[..NONCE_COOKIE.len()].copy_from_slice(NONCE_COOKIE);
        buf[NONCE_COOKIE.len()..PREFIX_LEN].copy_from_slice(NONCE_FEATURES);
        for (i, b) in buf[PREFIX_LEN..MACED_LEN].iter_mut().enumerate() {
            let nibble = (expiry >> (4 * (EXPIRY_HEX_LEN - 1 - i))) & 0xf;
            *b = b"0123456789abcdef"[nibble as usize];
        }
        let tag = tag(
            &self.current_keys()[0],
            &buf[..MACED_LEN],
            transport,
            client,
        );
        // `tag` returns exactly TAG_B64_LEN base64url chars.
        buf[MACED_LEN..].copy_from_slice(&tag);
        NonceBuf {
            buf,
            len: NONCE_LEN as u8,
        }
    }

    pub fn check(
        &self,
        nonce: &[u8],
        unix_now: u64,
        transport: u8,
        client: &SocketAddr,
    ) -> NonceStatus {
        if nonce.len() != NONCE_LEN {
            return NonceStatus::Invalid;
        }
        // The MAC covers the cookie and feature set too: no separate check needed.
        let (maced, tag) = nonce.split_at(MACED_LEN);
        let mut expiry = 0u64;
        for &c in &maced[PREFIX_LEN..] {
            // Lowercase only: exactly what `issue` writes, so one expiry has one spelling.
            let v = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                _ => return NonceStatus::Invalid,
            };
            expiry = (expiry << 4) | u64::from(v);
        }
        let keys = self.current_keys();
        // Every key is tried, matched or not, so the time taken says nothing about which.
        let matched = keys.iter().fold(false, |found, key| {
            constant_time_eq(&self::tag(key, maced, transport, client), tag) | found
        });
        if !matched {
            return NonceStatus::Invalid;
        }
        if unix_now >= expiry {
            NonceStatus::Stale
        } else {
            NonceStatus::Valid
        }
    }

    /// True if `nonce` starts with the RFC 8489 cookie and its feature set has
    /// the "Password algorithms" bit (bit 0, the most significant) set.
    pub fn announces_password_algorithms(nonce: &[u8]) -> bool {
        let Some(rest) = nonce.strip_prefix(&NONCE_COOKIE[..]) else {
            return false;
        };
        let Some(features) = rest.get(..4) else {
            return false;
        };
        let mut bits = 0u32;
        for &c in features {
            let Some(v) = b64_std_value(c) else {
                return false;
            };
            bits = (bits << 6) | u32::from(v);
        }
        bits & 0x80_0000 != 0
    }
}

fn nonce_keys<K: AsRef<[u8]>>(keys: &[K]) -> Arc<[hmac::Key]> {
    keys.iter()
        .map(|k| hmac::Key::new(hmac::HMAC_SHA256, k.as_ref()))
        .collect()
}

/// The MAC covers the printable prefix (cookie, features, expiry) and the
/// client's transport, IP and port, so a nonce is useless from elsewhere.
fn tag(key: &hmac::Key, maced: &[u8], transport: u8, client: &SocketAddr) -> [u8; TAG_B64_LEN] {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(maced);
    ctx.update(&[transport]);
    match client.ip() {
        IpAddr::V4(ip) => {
            ctx.update(&[4]);
            ctx.update(&ip.octets());
        }
        IpAddr::V6(ip) => {
            ctx.update(&[6]);
            ctx.update(&ip.octets());
        }
    }
    ctx.update(&client.port().to_be_bytes());
    let full = ctx.sign();
    let mut out = [0u8; TAG_B64_LEN];
    URL_SAFE_NO_PAD
        .encode_slice(&full.as_ref()[..TAG_BYTES], &mut out)
        .expect("22 chars hold base64url of 16 bytes");
    out
}

fn b64_std_value(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    // ---- long-term keys -------------------------------------------------

    const MATRIX_USER: &str = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";

    #[test]
    fn rfc5769_long_term_key_md5() {
        // python3: hashlib.md5("マトリックス:example.org:TheMatrIX".encode()).hexdigest()
        let k = long_term_key(
            PasswordAlgorithm::Md5,
            MATRIX_USER,
            "example.org",
            "TheMatrIX",
        );
        assert_eq!(hex(k.as_bytes()), "e8ca7ad59d5eb0518e312911d2dab2a9");
    }

    #[test]
    fn rfc5769_long_term_key_verifies_the_rfc_message_integrity() {
        // RFC 5769 §2.4 request up to (excluding) MESSAGE-INTEGRITY; the header
        // length (0x60) already counts MESSAGE-INTEGRITY, as the HMAC requires.
        let msg: &[u8] = &[
            0x00, 0x01, 0x00, 0x60, 0x21, 0x12, 0xa4, 0x42, 0x78, 0xad, 0x34, 0x33, 0xc6, 0xad,
            0x72, 0xc0, 0x29, 0xda, 0x41, 0x2e, // header
            0x00, 0x06, 0x00, 0x12, 0xe3, 0x83, 0x9e, 0xe3, 0x83, 0x88, 0xe3, 0x83, 0xaa, 0xe3,
            0x83, 0x83, 0xe3, 0x82, 0xaf, 0xe3, 0x82, 0xb9, 0x00, 0x00, // USERNAME
            0x00, 0x15, 0x00, 0x1c, 0x66, 0x2f, 0x2f, 0x34, 0x39, 0x39, 0x6b, 0x39, 0x35, 0x34,
            0x64, 0x36, 0x4f, 0x4c, 0x33, 0x34, 0x6f, 0x4c, 0x39, 0x46, 0x53, 0x54, 0x76, 0x79,
            0x36, 0x34, 0x73, 0x41, // NONCE
            0x00, 0x14, 0x00, 0x0b, 0x65, 0x78, 0x61, 0x6d, 0x70, 0x6c, 0x65, 0x2e, 0x6f, 0x72,
            0x67, 0x00, // REALM
        ];
        let k = long_term_key(
            PasswordAlgorithm::Md5,
            MATRIX_USER,
            "example.org",
            "TheMatrIX",
        );
        let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, k.as_bytes());
        let mi = hmac::sign(&key, msg);
        assert_eq!(hex(mi.as_ref()), "f67024656dd64a3e02b8e0712e85c9a28ca89666");
    }

    #[test]
    fn rfc5769_user_sha256_key() {
        let k = long_term_key(
            PasswordAlgorithm::Sha256,
            MATRIX_USER,
            "example.org",
            "TheMatrIX",
        );
        assert_eq!(
            hex(k.as_bytes()),
            "dd295a613b9058c3c23d6dc7165bda072304d989c9d0af3a8c7e184b4f9bb4a1"
        );
    }

    #[test]
    fn ascii_long_term_keys_match_python_hashlib() {
        let md5 = long_term_key(PasswordAlgorithm::Md5, "user", "realm", "pass");
        assert_eq!(md5.as_bytes().len(), 16);
        assert_eq!(hex(md5.as_bytes()), "8493fbc53ba582fb4c044c456bdc40eb");
        let sha = long_term_key(PasswordAlgorithm::Sha256, "user", "realm", "pass");
        assert_eq!(sha.as_bytes().len(), 32);
        assert_eq!(
            hex(sha.as_bytes()),
            "07e934117abd40836e7c6329b54731b2b2d2a5f9a71f544922d75e0730d8251b"
        );
    }

    #[test]
    fn password_algorithm_codes() {
        assert_eq!(PasswordAlgorithm::Md5.code(), 1);
        assert_eq!(PasswordAlgorithm::Sha256.code(), 2);
        for alg in [PasswordAlgorithm::Md5, PasswordAlgorithm::Sha256] {
            assert_eq!(PasswordAlgorithm::from_code(alg.code()), Some(alg));
        }
        for code in [0u16, 3, 0x8001, u16::MAX] {
            assert_eq!(PasswordAlgorithm::from_code(code), None);
        }
    }

    #[test]
    fn parse_md5_key_hex_forms() {
        let want = [
            0x84, 0x93, 0xfb, 0xc5, 0x3b, 0xa5, 0x82, 0xfb, 0x4c, 0x04, 0x4c, 0x45, 0x6b, 0xdc,
            0x40, 0xeb,
        ];
        for s in [
            "0x8493fbc53ba582fb4c044c456bdc40eb",
            "0X8493FBC53BA582FB4C044C456BDC40EB",
            "8493fbc53ba582fb4c044c456bdc40eb",
            "8493FBC53ba582fb4c044c456bdc40EB",
            "  0x8493fbc53ba582fb4c044c456bdc40eb\n",
        ] {
            assert_eq!(parse_md5_key_hex(s), Ok(want), "{s:?}");
        }
        for s in [
            "",
            "0x",
            "0x8493fbc53ba582fb4c044c456bdc40e",   // 31 digits
            "0x8493fbc53ba582fb4c044c456bdc40eb0", // 33 digits
            "0x8493fbc53ba582fb4c044c456bdc40eg",
            "0x8493fbc53ba582fb 4c044c456bdc40eb",
            "0x0x8493fbc53ba582fb4c044c456bdc40",
            "+8493fbc53ba582fb4c044c456bdc40eb",
            "ééééééééééééééé€e", // 32 bytes of non-ASCII
        ] {
            assert_eq!(
                parse_md5_key_hex(s),
                Err(AuthConfigError::BadMd5KeyHex),
                "{s:?}"
            );
        }
    }

    // ---- REST credentials ---------------------------------------------------

    #[test]
    fn rest_password_matches_python_hmac() {
        // python3: base64.b64encode(hmac.new(secret, username, hashlib.sha1).digest())
        assert_eq!(
            rest_password(b"north-secret", "1700000000:alice"),
            "g+jb180fcj+xlpA/2mP60OdIgU0="
        );
        assert_eq!(
            rest_password(b"s2", "alice:1700003600"),
            "nJo94UuK+dFvp0pMYBjqRUFi9a4="
        );
        assert_eq!(
            rest_password(b"\x00\xffbin", "1700000000"),
            "cfj7HYuGAwGIamjW/we05iT+M64="
        );
    }

    #[test]
    fn mint_rest_credential_shapes() {
        let (u, p) = mint_rest_credential(b"north-secret", "alice", 1_700_000_000, ':');
        assert_eq!(u, "1700000000:alice");
        assert_eq!(p, "g+jb180fcj+xlpA/2mP60OdIgU0=");
        let (u, p) = mint_rest_credential(b"\x00\xffbin", "", 1_700_000_000, ':');
        assert_eq!(u, "1700000000");
        assert_eq!(p, "cfj7HYuGAwGIamjW/we05iT+M64=");
        let (u, _) = mint_rest_credential(b"k", "bob", 42, '|');
        assert_eq!(u, "42|bob");
        assert_eq!(parse_rest_username(&u, '|'), Some((42, "bob")));
    }

    #[test]
    fn parse_rest_username_orders_and_bare() {
        assert_eq!(
            parse_rest_username("1700000000:alice", ':'),
            Some((1_700_000_000, "alice"))
        );
        assert_eq!(
            parse_rest_username("alice:1700000000", ':'),
            Some((1_700_000_000, "alice"))
        );
        assert_eq!(
            parse_rest_username("1700000000", ':'),
            Some((1_700_000_000, ""))
        );
        assert_eq!(parse_rest_username("0", ':'), Some((0, "")));
        assert_eq!(parse_rest_username("0017", ':'), Some((17, "")));
    }

    #[test]
    fn parse_rest_username_custom_separator() {
        assert_eq!(
            parse_rest_username("1700000000|alice", '|'),
            Some((1_700_000_000, "alice"))
        );
        assert_eq!(
            parse_rest_username("alice|1700000000", '|'),
            Some((1_700_000_000, "alice"))
        );
        assert_eq!(parse_rest_username("alice:x|5", '|'), Some((5, "alice:x")));
        // With '|' configured, ':' is just part of a name and no number stands alone.
        assert_eq!(parse_rest_username("1700000000:alice", '|'), None);
        // Multi-byte separators split on char boundaries.
        assert_eq!(
            parse_rest_username("9\u{2016}bob", '\u{2016}'),
            Some((9, "bob"))
        );
        assert_eq!(
            parse_rest_username("bob\u{2016}9", '\u{2016}'),
            Some((9, "bob"))
        );
    }

    #[test]
    fn parse_rest_username_separator_inside_user() {
        // Expiry-first: everything after the first separator is the user.
        assert_eq!(
            parse_rest_username("100:alice:bob", ':'),
            Some((100, "alice:bob"))
        );
        // User-first: the user is everything before the last separator.
        assert_eq!(
            parse_rest_username("alice:bob:100", ':'),
            Some((100, "alice:bob"))
        );
        // Both ends numeric: expiry-first wins (same as coturn).
        assert_eq!(parse_rest_username("100:200", ':'), Some((100, "200")));
        assert_eq!(parse_rest_username("100:x:200", ':'), Some((100, "x:200")));
        // Number only in the middle is not a form we accept.
        assert_eq!(parse_rest_username("alice:100:bob", ':'), None);
    }

    #[test]
    fn parse_rest_username_garbage_empty_and_overflow() {
        for s in [
            "",
            ":",
            "::",
            "alice",
            "alice:bob",
            ":alice",
            "alice:",
            "100:",
            ":100",
            "alice:100:",
            "+100:alice",
            "alice:+100",
            "-1:alice",
            " 100:alice",
            "100 :alice",
            "alice: 100",
            "1e9:alice",
            "0x10:alice",
            "\u{0661}\u{0662}:alice", // Arabic-Indic digits are not ASCII digits
            "18446744073709551616:alice", // u64::MAX + 1
            "alice:18446744073709551616",
            "18446744073709551616",
            "99999999999999999999999999999999999999",
        ] {
            assert_eq!(parse_rest_username(s, ':'), None, "{s:?}");
        }
        assert_eq!(
            parse_rest_username("18446744073709551615:alice", ':'),
            Some((u64::MAX, "alice"))
        );
    }

    #[test]
    fn rest_config_validate() {
        let ok = RestConfig {
            secrets: vec![b"a".to_vec()],
            separator: ':',
            max_ttl_secs: 60,
        };
        assert_eq!(ok.validate(), Ok(()));
        let mut c = ok.clone();
        c.secrets.clear();
        assert_eq!(c.validate(), Err(AuthConfigError::NoRestSecrets));
        let mut c = ok.clone();
        c.secrets.push(Vec::new());
        assert_eq!(c.validate(), Err(AuthConfigError::EmptyRestSecret));
        for sep in ['7', ' ', '\n', '\0'] {
            let c = RestConfig {
                separator: sep,
                ..ok.clone()
            };
            assert_eq!(
                c.validate(),
                Err(AuthConfigError::BadRestSeparator),
                "{sep:?}"
            );
        }
    }

    // ---- Authenticator --------------------------------------------------

    const NOW: u64 = 1_700_000_000;
    const TTL: u64 = 86_400;

    fn auth(secrets: &[&[u8]]) -> Authenticator {
        let mut users = HashMap::new();
        users.insert("user".to_owned(), StaticUser::Password("pass".to_owned()));
        users.insert(
            "keyed".to_owned(),
            StaticUser::Md5Key(
                long_term_key(PasswordAlgorithm::Md5, "keyed", "realm", "pw")
                    .as_bytes()
                    .try_into()
                    .unwrap(),
            ),
        );
        // A static user whose name also parses as a REST username.
        users.insert(
            format!("{}:alice", NOW + 10),
            StaticUser::Password("static".to_owned()),
        );
        let rest = (!secrets.is_empty()).then(|| RestConfig {
            secrets: secrets.iter().map(|s| s.to_vec()).collect(),
            separator: ':',
            max_ttl_secs: TTL,
        });
        Authenticator::new("realm".to_owned(), users, rest)
    }

    fn keys(
        a: &Authenticator,
        user: &str,
        alg: PasswordAlgorithm,
        now: u64,
    ) -> Result<Vec<LongTermKey>, AuthReject> {
        let mut out = vec![LongTermKey::from_md5([0xAA; 16])]; // must be cleared
        a.candidate_keys(user, alg, now, &mut out).map(|()| out)
    }

    fn rest_key(secret: &[u8], username: &str, alg: PasswordAlgorithm) -> LongTermKey {
        long_term_key(alg, username, "realm", &rest_password(secret, username))
    }

    #[test]
    fn accessors() {
        let a = auth(&[b"s"]);
        assert_eq!(a.realm(), "realm");
    }

    #[test]
    fn check_password_goes_through_the_key_lookup() {
        let mut a = auth(&[b"new", b"old"]);
        assert_eq!(a.check_password("user", "pass", NOW), Ok(()));
        assert_eq!(
            a.check_password("user", "Pass", NOW),
            Err(AuthReject::WrongPassword)
        );
        assert_eq!(a.check_password("keyed", "pw", NOW), Ok(()));
        let name = format!("{}:bob", NOW + 60);
        for secret in [&b"new"[..], b"old"] {
            let p = rest_password(secret, &name);
            assert_eq!(a.check_password(&name, &p, NOW), Ok(()));
        }
        assert_eq!(
            a.check_password(&name, "x", NOW),
            Err(AuthReject::WrongPassword)
        );
        assert_eq!(
            a.check_password(&name, &rest_password(b"new", &name), NOW + 61),
            Err(AuthReject::Expired)
        );
        a.revoke_user("bob", NOW + 60);
        assert!(a.revoke_static_user("user"));
        assert_eq!(
            a.check_password(&name, &rest_password(b"new", &name), NOW),
            Err(AuthReject::Revoked)
        );
        assert_eq!(
            a.check_password("user", "pass", NOW),
            Err(AuthReject::Revoked)
        );
        assert_eq!(a.rest_separator(), Some(':'));
        assert_eq!(a.rest_max_ttl_secs(), Some(TTL));
        assert_eq!(auth(&[]).rest_separator(), None);
    }

    #[test]
    fn reject_list_matches_the_indexing() {
        for (i, r) in AuthReject::ALL.into_iter().enumerate() {
            assert_eq!(r as usize, i, "{r:?}");
        }
    }

    #[test]
    fn static_password_user() {
        let a = auth(&[]);
        let md5 = keys(&a, "user", PasswordAlgorithm::Md5, NOW).unwrap();
        assert_eq!(md5.len(), 1);
        assert_eq!(hex(md5[0].as_bytes()), "8493fbc53ba582fb4c044c456bdc40eb");
        let sha = keys(&a, "user", PasswordAlgorithm::Sha256, NOW).unwrap();
        assert_eq!(
            hex(sha[0].as_bytes()),
            "07e934117abd40836e7c6329b54731b2b2d2a5f9a71f544922d75e0730d8251b"
        );
        // Lookups are exact.
        assert_eq!(
            keys(&a, "User", PasswordAlgorithm::Md5, NOW),
            Err(AuthReject::UnknownUser)
        );
    }

    #[test]
    fn static_md5_key_user() {
        let a = auth(&[]);
        let k = keys(&a, "keyed", PasswordAlgorithm::Md5, NOW).unwrap();
        assert_eq!(
            k,
            vec![long_term_key(
                PasswordAlgorithm::Md5,
                "keyed",
                "realm",
                "pw"
            )]
        );
        let mut out = vec![LongTermKey::from_md5([0xAA; 16])];
        assert_eq!(
            a.candidate_keys("keyed", PasswordAlgorithm::Sha256, NOW, &mut out),
            Err(AuthReject::UnsupportedAlgorithm)
        );
        assert!(out.is_empty(), "a refusal leaves no stale key behind");
    }

    #[test]
    fn static_user_wins_over_rest_parsing() {
        let a = auth(&[b"s"]);
        let name = format!("{}:alice", NOW + 10);
        let k = keys(&a, &name, PasswordAlgorithm::Md5, NOW).unwrap();
        assert_eq!(
            k,
            vec![long_term_key(
                PasswordAlgorithm::Md5,
                &name,
                "realm",
                "static"
            )]
        );
        // Even when the REST form would be refused (here: expired).
        let k = keys(&a, &name, PasswordAlgorithm::Md5, NOW + 1000).unwrap();
        assert_eq!(k.len(), 1);
    }

    #[test]
    fn unknown_user_without_rest() {
        let a = auth(&[]);
        assert_eq!(
            keys(&a, "nobody", PasswordAlgorithm::Md5, NOW),
            Err(AuthReject::UnknownUser)
        );
        // A REST-looking name is still just unknown when REST is off.
        let name = format!("{}:alice", NOW + 60);
        assert_eq!(
            keys(&a, &name, PasswordAlgorithm::Md5, NOW),
            Err(AuthReject::UnknownUser)
        );
    }

    #[test]
    fn rest_valid_both_orders_and_algorithms() {
        let a = auth(&[b"secret"]);
        for name in [
            format!("{}:alice", NOW + 60),
            format!("alice:{}", NOW + 60),
            format!("{}", NOW + 60),
        ] {
            for alg in [PasswordAlgorithm::Md5, PasswordAlgorithm::Sha256] {
                let k = keys(&a, &name, alg, NOW).unwrap();
                assert_eq!(k, vec![rest_key(b"secret", &name, alg)], "{name} {alg:?}");
            }
        }
        // The minting helper and the verifier agree end to end.
        let (u, p) = mint_rest_credential(b"secret", "bob", NOW + 5, ':');
        let k = keys(&a, &u, PasswordAlgorithm::Md5, NOW).unwrap();
        assert_eq!(
            k,
            vec![long_term_key(PasswordAlgorithm::Md5, &u, "realm", &p)]
        );
    }

    #[test]
    fn rest_expiry_boundaries() {
        let a = auth(&[b"secret"]);
        let md5 = PasswordAlgorithm::Md5;
        let name = |e: u64| format!("{e}:alice");
        assert_eq!(keys(&a, &name(NOW - 1), md5, NOW), Err(AuthReject::Expired));
        assert_eq!(keys(&a, &name(NOW), md5, NOW).map(|k| k.len()), Ok(1));
        assert_eq!(keys(&a, &name(NOW + TTL), md5, NOW).map(|k| k.len()), Ok(1));
        assert_eq!(
            keys(&a, &name(NOW + TTL + 1), md5, NOW),
            Err(AuthReject::ExpiryTooFarAhead)
        );
        assert_eq!(keys(&a, &name(0), md5, NOW), Err(AuthReject::Expired));
        assert_eq!(
            keys(&a, &name(u64::MAX), md5, NOW),
            Err(AuthReject::ExpiryTooFarAhead)
        );
        // now + max_ttl saturates instead of wrapping.
        assert_eq!(
            keys(&a, &name(u64::MAX), md5, u64::MAX - 1).map(|k| k.len()),
            Ok(1)
        );
    }

    #[test]
    fn rest_malformed() {
        let a = auth(&[b"secret"]);
        for name in ["nobody", "alice:bob", "", ":", "alice:", "+1700000000:x"] {
            assert_eq!(
                keys(&a, name, PasswordAlgorithm::Md5, NOW),
                Err(AuthReject::MalformedUsername),
                "{name:?}"
            );
        }
    }

    #[test]
    fn rest_rotation_gives_one_key_per_secret_in_order() {
        let a = auth(&[b"old-secret", b"new-secret"]);
        let name = format!("{}:alice", NOW + 60);
        let k = keys(&a, &name, PasswordAlgorithm::Md5, NOW).unwrap();
        assert_eq!(k.len(), 2);
        // The client minted with the second secret: only the second key is right.
        let right = rest_key(b"new-secret", &name, PasswordAlgorithm::Md5);
        assert_ne!(k[0], right);
        assert_eq!(k[1], right);
        assert_eq!(k[0], rest_key(b"old-secret", &name, PasswordAlgorithm::Md5));
    }

    #[test]
    fn revocation() {
        let mut a = auth(&[b"secret"]);
        let md5 = PasswordAlgorithm::Md5;
        a.revoke_user("alice", NOW + 100);
        for name in [
            format!("{}:alice", NOW + 100),
            format!("alice:{}", NOW + 50),
        ] {
            assert_eq!(
                keys(&a, &name, md5, NOW),
                Err(AuthReject::Revoked),
                "{name}"
            );
        }
        // Credentials minted after the cut-off, and other users, still work.
        assert!(keys(&a, &format!("{}:alice", NOW + 101), md5, NOW).is_ok());
        assert!(keys(&a, &format!("{}:bob", NOW + 100), md5, NOW).is_ok());
        // A second, earlier revocation does not shorten the first.
        a.revoke_user("alice", NOW + 10);
        assert_eq!(
            keys(&a, &format!("{}:alice", NOW + 100), md5, NOW),
            Err(AuthReject::Revoked)
        );
        // The revocation query says the same as the key lookup.
        assert!(a.is_revoked(&format!("{}:alice", NOW + 100)));
        assert!(!a.is_revoked(&format!("{}:alice", NOW + 101)));
        assert!(!a.is_revoked(&format!("{}:bob", NOW + 100)));
        assert!(!a.is_revoked("no-such-user"));
        // Static users are not affected by REST revocation.
        a.revoke_user("user", u64::MAX);
        assert!(keys(&a, "user", md5, NOW).is_ok());
        assert!(!a.is_revoked("user"));
        let mut b = auth(&[b"secret"]);
        assert!(b.revoke_static_user("user"));
        assert!(b.is_revoked("user"));
        assert_eq!(keys(&b, "user", md5, NOW), Err(AuthReject::Revoked));

        // A reload carries revocations over.
        let mut fresh = auth(&[b"secret"]);
        fresh.carry_revocations_from(&a);
        assert_eq!(
            keys(&fresh, &format!("{}:alice", NOW + 100), md5, NOW),
            Err(AuthReject::Revoked)
        );

        // Pruning drops only what expiry already covers.
        a.prune_revocations(NOW + 100);
        assert_eq!(
            keys(&a, &format!("{}:alice", NOW + 100), md5, NOW),
            Err(AuthReject::Revoked)
        );
        a.prune_revocations(NOW + 101);
        assert!(keys(&a, &format!("{}:alice", NOW + 101), md5, NOW).is_ok());
        assert!(format!("{a:?}").contains("revoked_users: 1")); // "user" at u64::MAX stays
    }

    fn static_auth(realm: &str, users: &[(&str, StaticUser)]) -> Authenticator {
        let users = users
            .iter()
            .map(|(n, u)| ((*n).to_owned(), u.clone()))
            .collect();
        Authenticator::new(realm.to_owned(), users, None)
    }

    #[test]
    fn static_revocation_holds_until_unrevoke_or_a_changed_credential() {
        let md5 = PasswordAlgorithm::Md5;
        let pw = |p: &str| StaticUser::Password(p.to_owned());
        let key = StaticUser::Md5Key([0x42; 16]);
        let mut a = auth(&[b"secret"]);
        assert!(!a.revoke_static_user("nobody"), "not a static user");
        assert!(a.revoke_static_user("user"));
        assert!(a.is_static_revoked("user"));
        for alg in [md5, PasswordAlgorithm::Sha256] {
            assert_eq!(keys(&a, "user", alg, NOW), Err(AuthReject::Revoked));
        }
        // Not by time: no clock value lets her back in, and pruning keeps it.
        a.prune_revocations(u64::MAX);
        assert_eq!(keys(&a, "user", md5, u64::MAX), Err(AuthReject::Revoked));
        // Other static users and REST users are untouched.
        assert!(keys(&a, "keyed", md5, NOW).is_ok());
        assert!(keys(&a, &format!("{}:user", NOW + 60), md5, NOW).is_ok());
        assert!(format!("{a:?}").contains("revoked_static_users: 1"));
        // An explicit un-revoke lifts it.
        assert_eq!(
            a.unrevoke_user("user"),
            Unrevoked {
                rest: false,
                static_user: true
            }
        );
        assert!(keys(&a, "user", md5, NOW).is_ok());
        assert_eq!(a.unrevoke_user("user"), Unrevoked::default());

        // Reloads: the same credential stays revoked, whatever else changed (even the realm).
        let mut old = static_auth("realm", &[("eve", pw("one")), ("kay", key.clone())]);
        old.revoke_static_user("eve");
        old.revoke_static_user("kay");
        let mut same = static_auth("other-realm", &[("eve", pw("one")), ("kay", key.clone())]);
        same.carry_revocations_from(&old);
        assert_eq!(keys(&same, "eve", md5, NOW), Err(AuthReject::Revoked));
        assert_eq!(keys(&same, "kay", md5, NOW), Err(AuthReject::Revoked));
        // A changed password or key lifts it; so does a removal (and a later re-add).
        let mut changed = static_auth(
            "realm",
            &[("eve", pw("two")), ("kay", StaticUser::Md5Key([0x43; 16]))],
        );
        changed.carry_revocations_from(&same);
        assert!(keys(&changed, "eve", md5, NOW).is_ok());
        assert!(keys(&changed, "kay", md5, NOW).is_ok());
        let mut removed = static_auth("realm", &[("kay", key.clone())]);
        removed.carry_revocations_from(&same);
        assert_eq!(keys(&removed, "kay", md5, NOW), Err(AuthReject::Revoked));
        let mut readded = static_auth("realm", &[("eve", pw("one")), ("kay", key.clone())]);
        readded.carry_revocations_from(&removed);
        assert!(keys(&readded, "eve", md5, NOW).is_ok());
        assert_eq!(keys(&readded, "kay", md5, NOW), Err(AuthReject::Revoked));
        // A password that equals the old key's hex is still another credential.
        assert_ne!(
            credential_fingerprint("kay", &key),
            credential_fingerprint("kay", &pw(&"42".repeat(16)))
        );
        assert_ne!(
            credential_fingerprint("eve", &pw("one")),
            credential_fingerprint("eva", &pw("one"))
        );
    }

    #[test]
    fn unrevoke_and_prune_rest_revocations() {
        let md5 = PasswordAlgorithm::Md5;
        let mut a = auth(&[b"secret"]);
        a.revoke_user("alice", NOW + 100);
        a.revoke_user("bob", NOW + 200);
        assert_eq!(a.rest_refused_until("alice", NOW + 100), Some(NOW + 100));
        assert_eq!(a.rest_refused_until("alice", NOW + 101), None);
        assert_eq!(a.rest_refused_until("carol", NOW), None);
        assert_eq!(
            a.unrevoke_user("alice"),
            Unrevoked {
                rest: true,
                static_user: false
            }
        );
        assert!(keys(&a, &format!("{}:alice", NOW + 50), md5, NOW).is_ok());
        // Pruning counts and drops only entries whose covered credentials have all expired.
        a.revoke_user("alice", NOW + 100);
        a.revoke_static_user("user");
        assert_eq!(a.prunable_revocations(NOW + 100), 0);
        assert_eq!(a.prunable_revocations(NOW + 101), 1);
        assert_eq!(a.prunable_revocations(NOW + 201), 2);
        a.prune_revocations(NOW + 101);
        assert!(format!("{a:?}").contains("revoked_users: 1"), "{a:?}");
        assert_eq!(a.rest_refused_until("bob", NOW + 200), Some(NOW + 200));
        a.prune_revocations(NOW + 201);
        assert!(format!("{a:?}").contains("revoked_users: 0"), "{a:?}");
        assert_eq!(a.prunable_revocations(u64::MAX), 0);
        assert!(
            a.is_static_revoked("user"),
            "static revocations are not pruned"
        );
    }

    #[test]
    fn candidate_keys_reuses_the_callers_vec() {
        let a = auth(&[b"one", b"two"]);
        let name = format!("{}:alice", NOW + 60);
        let mut out = Vec::with_capacity(4);
        let ptr = out.as_ptr();
        for _ in 0..3 {
            a.candidate_keys(&name, PasswordAlgorithm::Sha256, NOW, &mut out)
                .unwrap();
            assert_eq!(out.len(), 2);
            a.candidate_keys("user", PasswordAlgorithm::Md5, NOW, &mut out)
                .unwrap();
            assert_eq!(out.len(), 1);
        }
        assert_eq!(out.as_ptr(), ptr);
        assert_eq!(out.capacity(), 4);
    }

    // ---- redaction ------------------------------------------------------

    #[test]
    fn debug_output_redacts_secrets() {
        let k = long_term_key(PasswordAlgorithm::Md5, "user", "realm", "pass");
        let s = format!("{k:?}");
        assert_eq!(s, "LongTermKey(<redacted>)");

        let pw = StaticUser::Password("hunter2-password".to_owned());
        let mk = StaticUser::Md5Key([0xAB; 16]);
        let s = format!("{pw:?} {mk:?} {pw:#?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(!s.to_lowercase().contains("abab"), "{s}");
        assert!(!s.contains("171"), "{s}"); // 0xAB as decimal

        let rc = RestConfig {
            secrets: vec![b"topsecret-one".to_vec(), b"topsecret-two".to_vec()],
            separator: ':',
            max_ttl_secs: 60,
        };
        let s = format!("{rc:?} {rc:#?}");
        assert!(!s.contains("topsecret"), "{s}");
        assert!(!s.contains("116, 111, 112"), "{s}"); // "top" as a byte list
        assert!(s.contains("max_ttl_secs"), "{s}");

        let mut users = HashMap::new();
        users.insert("u".to_owned(), pw);
        let a = Authenticator::new("realm".to_owned(), users, Some(rc));
        let s = format!("{a:?}");
        assert!(!s.contains("hunter2") && !s.contains("topsecret"), "{s}");

        let n = NonceIssuer::new([0x5A; 32], 600);
        let s = format!("{n:?}");
        assert!(
            !s.contains("90") && !s.to_lowercase().contains("5a5a"),
            "{s}"
        );
    }

    #[test]
    fn reject_texts_hold_no_secret() {
        for r in AuthReject::ALL {
            assert!(!r.to_string().is_empty());
        }
        let e = parse_md5_key_hex("0xdeadbeefdeadbeefdeadbeefdeadbeeZ").unwrap_err();
        assert!(!e.to_string().contains("deadbeef"));
    }

    // ---- nonces ---------------------------------------------------------

    const UDP: u8 = 0;
    const TCP: u8 = 1;

    fn client4() -> SocketAddr {
        SocketAddr::new(Ipv4Addr::new(203, 0, 113, 7).into(), 50_000)
    }

    fn issuer() -> NonceIssuer {
        NonceIssuer::new([7u8; 32], 600)
    }

    #[test]
    fn nonce_format() {
        let n = issuer().issue(NOW, UDP, &client4());
        let s = n.as_str();
        assert_eq!(s.len(), NONCE_LEN);
        assert_eq!(n.as_bytes(), s.as_bytes());
        assert!(s.starts_with("obMatJos2gAAA"), "{s}");
        assert_eq!(&s[13..29], format!("{:016x}", NOW + 600));
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\'),
            "{s}"
        );
        assert!(s[29..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert!(NonceIssuer::announces_password_algorithms(n.as_bytes()));
        // Deterministic: same inputs, same nonce (no hidden randomness).
        assert_eq!(n, issuer().issue(NOW, UDP, &client4()));
        assert!(format!("{n:?}").contains("obMatJos2"));
    }

    #[test]
    fn nonce_issue_is_heap_free() {
        // Copy types cannot own heap memory, and the size bounds the stack cost.
        fn assert_copy<T: Copy>() {}
        assert_copy::<NonceBuf>();
        assert_copy::<LongTermKey>();
        assert!(std::mem::size_of::<NonceBuf>() <= 64);
    }

    #[test]
    fn instances_sharing_keys_accept_each_others_nonces_through_a_rotation() {
        let (old, new) = (
            b"old key: 32 bytes of randomness!",
            b"new key: 32 bytes of randomness!",
        );
        let (a, b) = (issuer(), issuer());
        a.set_keys(&[old]);
        b.set_keys(&[old]);
        let c = client4();
        let from_a = a.issue(NOW, UDP, &c);
        assert_eq!(b.check(from_a.as_bytes(), NOW, UDP, &c), NonceStatus::Valid);
        // Rotation, step 1 on b: the new key verifies, the old one still issues.
        b.set_keys(&[&old[..], &new[..]]);
        assert_eq!(b.issue(NOW, UDP, &c), from_a);
        assert_eq!(b.check(from_a.as_bytes(), NOW, UDP, &c), NonceStatus::Valid);
        // Step 2 on a: the new key issues; b accepts it, and a still accepts its old nonces.
        a.set_keys(&[&new[..], &old[..]]);
        let rotated = a.issue(NOW, UDP, &c);
        assert_ne!(rotated, from_a);
        assert_eq!(
            b.check(rotated.as_bytes(), NOW, UDP, &c),
            NonceStatus::Valid
        );
        assert_eq!(a.check(from_a.as_bytes(), NOW, UDP, &c), NonceStatus::Valid);
        // Step 3: the old key is gone, and with it its nonces.
        a.set_keys(&[new]);
        assert_eq!(
            a.check(from_a.as_bytes(), NOW, UDP, &c),
            NonceStatus::Invalid
        );
        assert_eq!(
            a.check(rotated.as_bytes(), NOW, UDP, &c),
            NonceStatus::Valid
        );
        // An instance with other keys refuses them all; an empty list changes nothing.
        let stranger = issuer();
        assert_eq!(
            stranger.check(rotated.as_bytes(), NOW, UDP, &c),
            NonceStatus::Invalid
        );
        a.set_keys::<&[u8]>(&[]);
        assert_eq!(
            a.check(rotated.as_bytes(), NOW, UDP, &c),
            NonceStatus::Valid
        );
    }

    #[test]
    fn nonce_round_trip_and_staleness() {
        let iss = issuer();
        let c6 = SocketAddr::new(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(), 3478);
        for (t, c) in [(UDP, client4()), (TCP, c6)] {
            let n = iss.issue(NOW, t, &c);
            assert_eq!(iss.check(n.as_bytes(), NOW, t, &c), NonceStatus::Valid);
            assert_eq!(
                iss.check(n.as_bytes(), NOW + 599, t, &c),
                NonceStatus::Valid
            );
            assert_eq!(
                iss.check(n.as_bytes(), NOW + 600, t, &c),
                NonceStatus::Stale
            );
            assert_eq!(
                iss.check(n.as_bytes(), NOW + 100_000, t, &c),
                NonceStatus::Stale
            );
        }
        assert_eq!(iss.lifetime_secs(), 600);
        assert_eq!(NonceIssuer::new([0; 32], 0).lifetime_secs(), 1);
    }

    #[test]
    fn nonce_bound_to_client_and_transport() {
        let iss = issuer();
        let c = client4();
        let n = iss.issue(NOW, UDP, &c);
        let b = n.as_bytes();
        let other_port = SocketAddr::new(c.ip(), c.port() + 1);
        let other_ip = SocketAddr::new(Ipv4Addr::new(203, 0, 113, 8).into(), c.port());
        let mapped = SocketAddr::new(
            Ipv4Addr::new(203, 0, 113, 7).to_ipv6_mapped().into(),
            c.port(),
        );
        assert_eq!(iss.check(b, NOW, UDP, &other_port), NonceStatus::Invalid);
        assert_eq!(iss.check(b, NOW, UDP, &other_ip), NonceStatus::Invalid);
        assert_eq!(iss.check(b, NOW, UDP, &mapped), NonceStatus::Invalid);
        assert_eq!(iss.check(b, NOW, TCP, &c), NonceStatus::Invalid);
        // Another server secret does not accept it either.
        assert_eq!(
            NonceIssuer::new([8u8; 32], 600).check(b, NOW, UDP, &c),
            NonceStatus::Invalid
        );
    }

    #[test]
    fn nonce_tampering_is_invalid() {
        let iss = issuer();
        let c = client4();
        let n = iss.issue(NOW, UDP, &c);
        let good = n.as_bytes();
        // Flip each character in turn, including the expiry and the tag.
        for i in 0..good.len() {
            let mut bad = good.to_vec();
            bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
            assert_eq!(
                iss.check(&bad, NOW, UDP, &c),
                NonceStatus::Invalid,
                "byte {i}"
            );
        }
        // Pushing the expiry forward (to dodge Stale) breaks the MAC.
        let mut later = good.to_vec();
        later[28] = if later[28] == b'f' { b'e' } else { b'f' };
        assert_eq!(
            iss.check(&later, NOW + 10_000, UDP, &c),
            NonceStatus::Invalid
        );
        // Uppercase hex is another spelling we never issue.
        let upper: Vec<u8> = good
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (13..29).contains(&i) {
                    b.to_ascii_uppercase()
                } else {
                    b
                }
            })
            .collect();
        if upper != good {
            assert_eq!(iss.check(&upper, NOW, UDP, &c), NonceStatus::Invalid);
        }
        // Truncated, extended, empty.
        for len in [0, 1, 9, 13, 29, NONCE_LEN - 1] {
            assert_eq!(
                iss.check(&good[..len], NOW, UDP, &c),
                NonceStatus::Invalid,
                "len {len}"
            );
        }
        let mut longer = good.to_vec();
        longer.push(b'A');
        assert_eq!(iss.check(&longer, NOW, UDP, &c), NonceStatus::Invalid);
        // Right length, junk content; non-UTF-8.
        let junk: Vec<u8> = (0..NONCE_LEN as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        assert_eq!(iss.check(&junk, NOW, UDP, &c), NonceStatus::Invalid);
        let mut non_utf8 = good.to_vec();
        non_utf8[40] = 0xff;
        assert_eq!(iss.check(&non_utf8, NOW, UDP, &c), NonceStatus::Invalid);
        assert_eq!(
            iss.check(&[0xff; NONCE_LEN], NOW, UDP, &c),
            NonceStatus::Invalid
        );
        // Same prefix and expiry, but a tag of the right shape made up.
        let mut forged = good[..29].to_vec();
        forged.extend_from_slice(&[b'A'; 22]);
        assert_eq!(iss.check(&forged, NOW, UDP, &c), NonceStatus::Invalid);
    }

    #[test]
    fn announces_password_algorithms_cases() {
        let yes = |s: &[u8]| NonceIssuer::announces_password_algorithms(s);
        assert!(yes(b"obMatJos2gAAA"));
        assert!(yes(b"obMatJos2/AAAxyz")); // other bits may also be set
        assert!(yes(b"obMatJos2wAAA")); // both features
        assert!(!yes(b"obMatJos2QAAA")); // only username anonymity (bit 1)
        assert!(!yes(b"obMatJos2AAAA"));
        assert!(!yes(b"obMatJos2gAA")); // too short
        assert!(!yes(b"obMatJos2g*AA"));
        assert!(!yes(b"obMatJos2"));
        assert!(!yes(b"obMatJos3gAAA"));
        assert!(!yes(b"gAAAobMatJos2"));
        assert!(!yes(b""));
        assert!(!yes(b"f//499k954d6OL34oL9FSTvy64sA")); // RFC 5769 nonce: no cookie
        assert!(!yes(&[0xff; 20]));
    }
}
