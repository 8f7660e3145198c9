//! Configuration: the TOML schema, its defaults, validation, REST secret
//! loading and a redacted printout of the effective configuration.
//!
//! The file is read in two layers. The private raw mirror (`schema::raw`)
//! matches the file one to one (strings for addresses and CIDRs, `i64` for
//! every integer), so serde only ever reports syntax errors, wrong types and
//! unknown keys. Everything semantic happens while converting raw into the
//! public types (`validate`), where we choose the wording, can name the key
//! and find its line (`locate`), and can keep secret values out of every
//! message. The same raw types, filled from a `Config`, print the effective
//! configuration (`print`), so the printout always re-parses.
//!
//! Adding a key: its typed field, default, raw field and `from_typed` line in
//! `schema.rs`; its check in `validate.rs`; its documented default in
//! `turnserver.toml` (a test fails until it is there) and its line in the
//! README's summary.

mod error;
mod locate;
mod print;
mod schema;
mod secrets;
mod validate;

#[cfg(test)]
mod test_support;

use std::path::Path;

use serde::Deserialize;
use toml::de::DeTable;

pub use error::{ConfigError, Issue};
pub use print::REDACTED;
pub use schema::{
    ApiConfig, AuthConfig, Config, DiscoveryAddresses, FleetConfig, LimitsConfig, LogFormat,
    NatDiscoveryConfig, PeersConfig, ProxyProtocolConfig, RelayConfig, RelayIp, TlsConfig,
    UsageConfig, UserEntry, UserSecret,
};
pub use secrets::{PermissionWarning, MIN_API_TOKEN_LEN, MIN_NONCE_KEY_LEN, MIN_REST_SECRET_LEN};

impl Config {
    /// Read, parse and validate a config file. Relative `auth.secret_file`,
    /// `auth.nonce_key_file`, `api.token_file` and `tls` paths are resolved against the file's directory,
    /// so the daemon finds them whatever its working directory (systemd
    /// starts it in `/`).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let mut config = Config::parse(&text, &path.display().to_string())?;
        let dir = path.parent().unwrap_or(Path::new(""));
        for file in [
            &mut config.auth.secret_file,
            &mut config.auth.nonce_key_file,
            &mut config.api.token_file,
            &mut config.tls.cert_file,
            &mut config.tls.key_file,
            &mut config.usage.file,
        ]
        .into_iter()
        .flatten()
        {
            if file.is_relative() {
                *file = dir.join(&*file);
            }
        }
        Ok(config)
    }

    /// Parse and validate config text. `origin` names the source in messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let table = DeTable::parse(text)
            .map_err(|e| ConfigError::Syntax(locate::syntax_issue(&e, text, origin)))?;
        let locator = locate::Locator::new(text, table.get_ref());
        let raw = schema::raw::Config::deserialize(toml::de::Deserializer::from(table))
            .map_err(|e| ConfigError::Syntax(locator.serde_issue(&e, origin)))?;
        validate::build(raw, &locator, origin).map_err(ConfigError::Invalid)
    }

    /// Check a configuration built in code against the same rules as a file.
    /// Issues refer to lines of the generated TOML, origin `<config>`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Config::parse(&self.to_toml(), "<config>").map(drop)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::test_support::{parse, TempFile};
    use super::*;

    const SHIPPED_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/turnserver.toml");

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
        assert_eq!(
            parse("[relay]\n[auth]\n[limits]\n[peers]\n[api]\n").unwrap(),
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

    #[test]
    fn load_resolves_relative_secret_paths_against_config_dir() {
        let config = TempFile::new(
            b"[auth]\nsecret_file = \"secrets.txt\"\n[api]\ntoken_file = \"tok/en\"\n",
        );
        let c = Config::load(&config.0).unwrap();
        let dir = config.0.parent().unwrap();
        assert_eq!(c.auth.secret_file, Some(dir.join("secrets.txt")));
        assert_eq!(c.api.token_file, Some(dir.join("tok/en")));
        let absolute = TempFile::new(
            b"[auth]\nsecret_file = \"/etc/turnpike/secrets\"\n[api]\ntoken_file = \"/t\"\n",
        );
        let c = Config::load(&absolute.0).unwrap();
        assert_eq!(
            c.auth.secret_file,
            Some(PathBuf::from("/etc/turnpike/secrets"))
        );
        assert_eq!(c.api.token_file, Some(PathBuf::from("/t")));
        // Config::parse has no file to be relative to and leaves paths as written.
        let c = parse("[auth]\nsecret_file = \"secrets.txt\"\n").unwrap();
        assert_eq!(c.auth.secret_file, Some(PathBuf::from("secrets.txt")));
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

    #[test]
    fn validate_checks_configs_built_in_code() {
        let mut c = Config::default();
        c.limits.channels_per_allocation = 5000;
        let m = c.validate().unwrap_err().to_string();
        assert!(m.contains("limits.channels_per_allocation = 5000"), "{m}");
        assert!(m.starts_with("<config>:"), "{m}");
    }
}
