//! What loading a configuration can report. Every message names the key (and,
//! for file problems, the line) and none carries a secret value.

use std::fmt;
use std::path::PathBuf;

use super::secrets::MIN_API_TOKEN_LEN;

/// One problem in a config file, located as precisely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// The file name (or whatever `origin` was given to `Config::parse`).
    pub origin: String,
    /// 1-based line; `None` when the key is absent from the file (a default
    /// that conflicts with a value set elsewhere) or the error has no span.
    pub line: Option<usize>,
    /// Dotted key path such as `limits.max_lifetime_secs` or
    /// `auth.users[1].key`; empty for TOML syntax errors.
    pub key: String,
    /// The full message, naming the key; never contains a secret value.
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.origin, line, self.message),
            None => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// TOML syntax, a value of the wrong type, or an unknown key.
    #[error("{0}")]
    Syntax(Issue),
    /// Values that parse but are not acceptable; all of them, not just the first.
    #[error("{}", join_issues(.0))]
    Invalid(Vec<Issue>),
    /// `key` is `auth.secret_file` or `auth.nonce_key_file`.
    #[error("{key}: cannot read {}: {error}", path.display())]
    SecretFile {
        key: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    /// `key` is `auth.secret_env` or `auth.nonce_key_env`.
    #[error("{key}: environment variable {name} {reason}")]
    SecretEnv {
        key: &'static str,
        name: String,
        reason: String,
    },
    #[error("api.token_file: cannot read {}: {error}", path.display())]
    TokenFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "api.token_file {}: token is too short ({len} bytes, at least {MIN_API_TOKEN_LEN} required)",
        path.display()
    )]
    WeakToken { path: PathBuf, len: usize },
    /// The file or variable exists but holds no secret; `what` names it.
    #[error("no secrets in {what}")]
    NoSecrets { what: String },
    /// `what`: "REST secret" or "nonce key".
    #[error(
        "{location}: {what} is too short ({len} bytes, at least {min} required; e.g. generate \
         one with `openssl rand -hex 32`)"
    )]
    WeakSecret {
        location: String,
        what: &'static str,
        len: usize,
        min: usize,
    },
}

impl ConfigError {
    /// The located issues behind a parse or validation failure (empty for
    /// I/O and secret errors).
    pub fn issues(&self) -> &[Issue] {
        match self {
            ConfigError::Syntax(issue) => std::slice::from_ref(issue),
            ConfigError::Invalid(issues) => issues,
            _ => &[],
        }
    }
}

fn join_issues(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(Issue::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
