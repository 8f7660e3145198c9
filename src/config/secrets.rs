//! Secrets the config points at but never holds: REST secrets from a file or
//! the environment, the API bearer token, and warnings for files holding them
//! that others can read or replace. Errors name the file or variable (and the
//! line) but never carry secret bytes.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use super::{Config, ConfigError, UserSecret};

/// Shortest REST secret accepted. REST passwords are HMAC-SHA1(secret,
/// username) and are handed to every web client, so anyone holding one
/// credential can brute-force a short secret offline and mint credentials at
/// will. 16 bytes of a random hex or base64 string is out of that reach.
pub const MIN_REST_SECRET_LEN: usize = 16;

/// Shortest nonce key accepted: whoever knows it can forge nonces for any client address (not
/// credentials: a request still needs the user's key), so it gets a REST secret's care and
/// twice its length.
pub const MIN_NONCE_KEY_LEN: usize = 32;

/// Bearer tokens shorter than this are refused: the token guards credential minting.
pub const MIN_API_TOKEN_LEN: usize = 16;

impl Config {
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

    /// REST secrets from `auth.secret_file` and/or `auth.secret_env` (both
    /// may be set: the union, duplicates dropped, file first). `Ok(empty)`
    /// when neither is set.
    pub fn load_rest_secrets(&self) -> Result<Vec<Vec<u8>>, ConfigError> {
        self.load_rest_secrets_with(|name| std::env::var_os(name))
    }

    fn load_rest_secrets_with(
        &self,
        getenv: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Vec<Vec<u8>>, ConfigError> {
        SecretSource {
            what: "REST secret",
            min_len: MIN_REST_SECRET_LEN,
            file_key: "auth.secret_file",
            file: self.auth.secret_file.as_deref(),
            env_key: "auth.secret_env",
            env: self.auth.secret_env.as_deref(),
        }
        .load(getenv)
    }

    /// Whether `auth.nonce_key_file` or `auth.nonce_key_env` is set.
    pub fn nonce_keys_configured(&self) -> bool {
        self.auth.nonce_key_file.is_some() || self.auth.nonce_key_env.is_some()
    }

    /// Nonce keys from `auth.nonce_key_file` and/or `auth.nonce_key_env`, in that order: the
    /// first issues nonces, all of them verify. `Ok(empty)` when neither is set (the daemon then
    /// uses a random key of its own).
    pub fn load_nonce_keys(&self) -> Result<Vec<Vec<u8>>, ConfigError> {
        self.load_nonce_keys_with(|name| std::env::var_os(name))
    }

    fn load_nonce_keys_with(
        &self,
        getenv: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Vec<Vec<u8>>, ConfigError> {
        SecretSource {
            what: "nonce key",
            min_len: MIN_NONCE_KEY_LEN,
            file_key: "auth.nonce_key_file",
            file: self.auth.nonce_key_file.as_deref(),
            env_key: "auth.nonce_key_env",
            env: self.auth.nonce_key_env.as_deref(),
        }
        .load(getenv)
    }

    /// Files holding secrets that users other than the owner may access, or that belong to
    /// neither root nor the user running turnpike: `auth.secret_file`, `api.token_file`,
    /// `tls.key_file`, and the
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
        if let Some(path) = &self.auth.nonce_key_file {
            check(
                "auth.nonce_key_file",
                path,
                "nonce keys (whoever reads them can forge nonces for any client address)",
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
        if let Some(path) = &self.tls.key_file {
            check(
                "tls.key_file",
                path,
                "the TLS private key (whoever reads it can impersonate this server)",
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
}

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
    // Read access for a supplementary group of this process (systemd's SupplementaryGroups=,
    // how a DynamicUser service reads a certificate key a deploy hook installs) is how the file
    // is meant to be shared, not a leak. The primary group and root's group are not exempt.
    let shared_with_our_group = mode & 0o077 == 0o040 && in_supplementary_groups(meta.gid());
    if mode & 0o077 != 0 && !shared_with_our_group {
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

/// Whether `gid` is one of this process's supplementary groups, other than its effective group
/// and root's.
fn in_supplementary_groups(gid: u32) -> bool {
    // SAFETY: getegid cannot fail; getgroups writes at most `len` entries into the buffer.
    unsafe {
        if gid == 0 || libc::getegid() == gid {
            return false;
        }
        let mut groups = [0 as libc::gid_t; 256];
        let n = libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr());
        n > 0 && groups[..n as usize].contains(&gid)
    }
}

/// Secrets one per line of a file (`#` comments, blank lines and CRLF allowed) and/or
/// separated by commas or whitespace in an environment variable: the union, duplicates
/// dropped, file first.
struct SecretSource<'a> {
    what: &'static str,
    min_len: usize,
    file_key: &'static str,
    file: Option<&'a Path>,
    env_key: &'static str,
    env: Option<&'a str>,
}

impl SecretSource<'_> {
    fn load(&self, getenv: impl Fn(&str) -> Option<OsString>) -> Result<Vec<Vec<u8>>, ConfigError> {
        let mut secrets: Vec<Vec<u8>> = Vec::new();
        let mut add = |secret: &[u8], location: &dyn Fn() -> String| {
            if secret.len() < self.min_len {
                return Err(ConfigError::WeakSecret {
                    location: location(),
                    what: self.what,
                    len: secret.len(),
                    min: self.min_len,
                });
            }
            if !secrets.iter().any(|s| s == secret) {
                secrets.push(secret.to_vec());
            }
            Ok(())
        };

        if let Some(path) = self.file {
            let bytes = std::fs::read(path).map_err(|error| ConfigError::SecretFile {
                key: self.file_key,
                path: path.to_owned(),
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

        if let Some(name) = self.env {
            let error = |reason: &str| ConfigError::SecretEnv {
                key: self.env_key,
                name: name.to_owned(),
                reason: reason.to_owned(),
            };
            let value = getenv(name).ok_or_else(|| error("is not set"))?;
            let value = value
                .into_string()
                .map_err(|_| error("is not valid UTF-8"))?;
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
}

#[cfg(test)]
mod tests {
    use super::super::test_support::TempFile;
    use super::super::UserEntry;
    use super::*;

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

    // ---- nonce keys ------------------------------------------------------

    #[test]
    fn nonce_keys_in_order_from_file_then_env_with_their_own_length_rule() {
        assert!(Config::default().load_nonce_keys().unwrap().is_empty());
        assert!(!Config::default().nonce_keys_configured());
        let k1 = "a".repeat(32);
        let k2 = "b".repeat(64);
        let file = TempFile::new(format!("# current first\n{k1}\r\n\n{k2}\n").as_bytes());
        let mut c = Config::default();
        c.auth.nonce_key_file = Some(file.0.clone());
        c.auth.nonce_key_env = Some("TP_NONCE".to_owned());
        assert!(c.nonce_keys_configured());
        let k3 = "c".repeat(40);
        let got = c
            .load_nonce_keys_with(env("TP_NONCE", &format!("{k3},{k1}")))
            .unwrap();
        assert_eq!(
            got,
            vec![k1.clone().into_bytes(), k2.into_bytes(), k3.into_bytes()]
        );
        // A REST secret's 16 bytes are not enough for a nonce key; the key is never echoed.
        let short = "s".repeat(20);
        let m = c
            .load_nonce_keys_with(env("TP_NONCE", &short))
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("environment variable TP_NONCE, secret #1"),
            "{m}"
        );
        assert!(
            m.contains("nonce key is too short (20 bytes, at least 32"),
            "{m}"
        );
        assert!(!m.contains(&short), "{m}");
        c.auth.nonce_key_env = None;
        c.auth.nonce_key_file = Some(file.0.with_extension("missing"));
        let m = c.load_nonce_keys().unwrap_err().to_string();
        assert!(m.starts_with("auth.nonce_key_file: cannot read"), "{m}");
    }

    // ---- REST secrets ----------------------------------------------------

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

    // ---- the API token ---------------------------------------------------

    #[test]
    fn api_token_is_the_first_line_and_long_enough() {
        assert_eq!(Config::default().load_api_token().unwrap(), None);
        let mut c = Config::default();
        let file = TempFile::new(b"# the token\n\n  token-0123456789abcdef  \nsecond\n");
        c.api.token_file = Some(file.0.clone());
        assert_eq!(
            c.load_api_token().unwrap().as_deref(),
            Some("token-0123456789abcdef")
        );
        let short = TempFile::new(b"tiny-token\n");
        c.api.token_file = Some(short.0.clone());
        let m = c.load_api_token().unwrap_err().to_string();
        assert!(m.contains("too short (10 bytes"), "{m}");
        assert!(!m.contains("tiny-token"), "{m}");
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
