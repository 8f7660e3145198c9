//! Showing a configuration: the effective file with secrets redacted, and a
//! `Debug` for secrets that never shows them (it lands in logs and panics).

use std::fmt;

use super::schema::raw;
use super::{Config, UserSecret};

/// What `to_redacted_toml` writes in place of a password or key.
pub const REDACTED: &str = "<redacted>";

impl Config {
    /// The effective configuration (defaults filled in) as TOML, every
    /// password and key replaced by `"<redacted>"`. Secret file paths and
    /// variable names are not secrets and are shown.
    pub fn to_redacted_toml(&self) -> String {
        self.to_toml_with(true)
    }

    /// The configuration as a file that loads back as the same `Config`, passwords and keys
    /// included: for programs that build a configuration (tests, provisioning), never for
    /// printing to a person.
    pub fn to_toml(&self) -> String {
        self.to_toml_with(false)
    }

    /// Every key of every table, since the raw mirror skips none (only a
    /// user's absent password or key).
    fn to_toml_with(&self, redact: bool) -> String {
        toml::to_string(&raw::Config::from_typed(self, redact))
            .expect("plain strings, integers, booleans and arrays always serialize")
    }
}

impl fmt::Debug for UserSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserSecret::Password(_) => write!(f, "Password({REDACTED})"),
            UserSecret::Md5KeyHex(_) => write!(f, "Md5KeyHex({REDACTED})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{parse, FULL};
    use super::*;

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
    fn redacted_toml_of_defaults_shows_every_key_and_reparses() {
        let out = Config::default().to_redacted_toml();
        assert_eq!(parse(&out).unwrap(), Config::default());
        // Empty values are printed too, so the printout lists what can be set.
        for key in [
            "software = \"\"",
            "address_v6 = \"\"",
            "users = []",
            "allow = []",
        ] {
            assert!(out.contains(key), "{key} missing in:\n{out}");
        }
    }
}
