//! The `turnpike` command line: parse, call the library, print.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use turnpike::config::{Config, LogFormat};
use turnpike::control::{api, client, credentials, unix_now};
use turnpike::logging;

#[derive(Parser)]
#[command(name = "turnpike", version, about = "A STUN/TURN relay daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum CredentialFormat {
    /// {"iceServers":[...],"ttl":..,"expires_at":".."} for new RTCPeerConnection(...)
    Ice,
    /// draft-uberti TURN REST shape {"username","password","ttl","uris"}
    Rest,
    /// shell variable assignments
    Env,
}

#[derive(Subcommand)]
enum Command {
    /// Run the STUN/TURN server.
    Serve {
        /// Configuration file.
        #[arg(short, long, default_value = "turnserver.toml")]
        config: PathBuf,
        /// Log format (overrides log_format in the config).
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
        /// Log filter, e.g. "debug" or "turnpike=trace" (overrides log_level in the config).
        #[arg(long)]
        log_level: Option<String>,
        /// Once every listener, the relay range and the HTTP API are bound (when READY=1 goes
        /// to systemd), write this JSON file: {"pid", "listen": [{"transport", "addr"}], "api",
        /// "relay": [{"local", "advertised"}], "relay_ports": {"min", "max"}}, ports as bound.
        /// Written once (a reload cannot change what it names) by renaming a temp file beside
        /// it; removed when the daemon stops. Start fails if it cannot be written.
        #[arg(long, value_name = "PATH")]
        ready_file: Option<PathBuf>,
    },
    /// Validate a configuration file and print the effective configuration, secrets redacted.
    CheckConfig {
        #[arg(short, long, default_value = "turnserver.toml")]
        config: PathBuf,
    },
    /// Mint a short-lived REST credential with the configured secret.
    Credentials {
        #[arg(short, long, default_value = "turnserver.toml")]
        config: PathBuf,
        /// The user the credential is for (counted by the per-user quota).
        #[arg(long)]
        user: String,
        /// Lifetime: seconds, or with a unit: 90s, 30m, 1h, 2d. Default: api.default_ttl_secs.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<u64>,
        /// URI to list (repeatable), e.g. turn:turn.example.com:3478?transport=udp.
        /// Default: STUN and TURN on every listener port of the public host.
        #[arg(long = "uri")]
        uris: Vec<String>,
        #[arg(long, value_enum, default_value = "ice")]
        format: CredentialFormat,
    },
    /// Say whether the configuration accepts a username/password pair, and if not, why.
    /// The password comes from standard input (`--password -`) or a file (`--password-file`),
    /// never from the command line, where every local user can read it.
    #[command(group(clap::ArgGroup::new("password_source").required(true)))]
    VerifyCredential {
        #[arg(short, long, default_value = "turnserver.toml")]
        config: PathBuf,
        #[arg(long)]
        username: String,
        /// Only "-": read the password from standard input (one line).
        #[arg(long, group = "password_source", value_name = "-")]
        password: Option<String>,
        /// Read the password from this file (its first line).
        #[arg(long, group = "password_source", value_name = "PATH")]
        password_file: Option<PathBuf>,
        /// The realm the client uses, if known.
        #[arg(long)]
        realm: Option<String>,
    },
    /// Check STUN/TURN servers from the outside, coturn included: Binding, Allocate (with the
    /// 401 round), two allocations relaying to each other, this host's UDP socket as a peer,
    /// RTTs. Exit status 0 when every check passes, 1 when one fails, 2 for bad arguments.
    Probe(ProbeArgs),
    /// List or end sessions through the daemon's HTTP API (api.listen, api.token_file).
    Sessions {
        #[arg(short, long, default_value = "turnserver.toml", global = true)]
        config: PathBuf,
        #[command(subcommand)]
        action: SessionsAction,
    },
    /// Revoke a user through the daemon's HTTP API: end her allocations and refuse her REST
    /// credentials minted so far; a static user of that name is refused until `unrevoke` or a
    /// reload that changes or removes her password or key.
    Revoke {
        #[arg(short, long, default_value = "turnserver.toml")]
        config: PathBuf,
        user: String,
    },
    /// Lift a revocation through the daemon's HTTP API.
    Unrevoke {
        #[arg(short, long, default_value = "turnserver.toml")]
        config: PathBuf,
        user: String,
    },
}

/// `turnpike probe`'s arguments.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("credential").required(false)))]
struct ProbeArgs {
    /// stun:HOST[:PORT], turn:HOST[:PORT][?transport=udp|tcp], turns:HOST[:PORT]
    #[arg(required = true, value_name = "URI")]
    uris: Vec<String>,
    /// The long-term credential's user; with --secret-file, the user part of the REST
    /// username minted for the probe.
    #[arg(long, default_value = "probe")]
    user: String,
    /// Only "-": read the password from standard input (one line).
    #[arg(long, group = "credential", value_name = "-")]
    password: Option<String>,
    /// Read the password from this file (its first line).
    #[arg(long, group = "credential", value_name = "PATH")]
    password_file: Option<PathBuf>,
    /// A TURN REST shared secret (first line of the file): the probe mints its own
    /// `EXPIRY:USER` credential, valid for 10 minutes.
    #[arg(long, group = "credential", value_name = "PATH")]
    secret_file: Option<PathBuf>,
    /// Seconds one answer may take.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    timeout_secs: u64,
    /// PEM file of the roots to trust for turns: (default: the system's).
    #[arg(long, value_name = "PATH")]
    ca_file: Option<PathBuf>,
    /// One JSON object on standard output instead of the report.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum SessionsAction {
    /// List allocations as JSON.
    List,
    /// End one allocation by id (from `sessions list`).
    Kill { id: String },
}

fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 3600, 90s, 30m, 1h, 2d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("unknown unit {unit:?} in {s:?}: use s, m, h or d")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Logging for `serve`: lines go out through a writer thread (see `turnpike::logging`) until the
/// guard is dropped.
fn init_logging(format: LogFormat, level: &str) -> anyhow::Result<logging::FlushGuard> {
    let filter =
        EnvFilter::try_new(level).with_context(|| format!("invalid log level {level:?}"))?;
    // Colour only for a person at a terminal: journald, log files and pipes would keep the
    // escape codes as text (and pay for writing them).
    let (writer, guard) = logging::batched(
        std::io::stderr(),
        logging::QUEUE_LIMIT,
        logging::dropped_log_lines,
    );
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer.clone());
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        writer.flush_now();
        previous(info);
    }));
    Ok(guard)
}

fn credentials_command(
    config: &Config,
    user: &str,
    ttl: Option<u64>,
    uris: Vec<String>,
    format: CredentialFormat,
) -> anyhow::Result<()> {
    let secrets = config.load_rest_secrets()?;
    let ttl = ttl.unwrap_or(credentials::default_ttl(config));
    let uris = if uris.is_empty() {
        let advertised = match config.relay.address {
            turnpike::config::RelayIp::Ip(ip) => Some(ip.into()),
            turnpike::config::RelayIp::Auto => turnpike::daemon::resolve_relays(config)
                .v4
                .map(|v| v.advertised),
        };
        credentials::default_uris(
            &credentials::Listeners::configured(config),
            &credentials::public_host(config, advertised),
        )
    } else {
        uris
    };
    let minted = credentials::mint_for(config, &secrets, user, ttl, unix_now(), uris)?;
    match format {
        CredentialFormat::Ice => println!(
            "{}",
            serde_json::to_string_pretty(&credentials::ice_json(&minted))?
        ),
        CredentialFormat::Rest => println!(
            "{}",
            serde_json::to_string_pretty(&credentials::rest_json(&minted))?
        ),
        CredentialFormat::Env => print!("{}", credentials::env_text(&minted)),
    }
    Ok(())
}

/// Where the daemon's API listens (an unspecified address means localhost) and its token.
fn api_endpoint(config: &Config) -> anyhow::Result<(std::net::SocketAddr, String)> {
    let Some(mut addr) = config.api.listen else {
        bail!("api.listen is not set in the config: the daemon has no HTTP API to ask");
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let token = config
        .load_api_token()?
        .context("api.token_file is not set in the config")?;
    Ok((addr, token))
}

/// Whether the running daemon refuses `username` as revoked. Revocations live only in the daemon
/// (made through its API, kept across reloads, gone with the process), so without an API there
/// are none, and a daemon that cannot be asked is said so on stderr: the file's verdict stands.
fn daemon_revoked(config: &Config, username: &str) -> anyhow::Result<bool> {
    if config.api.listen.is_none() {
        return Ok(false);
    }
    let (addr, token) = api_endpoint(config)?;
    let body = serde_json::json!({ "username": username }).to_string();
    match client::request(addr, "POST", "/api/v1/revoked", Some(&token), Some(&body)) {
        Ok((200, answer)) => {
            let answer: serde_json::Value =
                serde_json::from_str(&answer).context("the API's answer is not JSON")?;
            Ok(answer["revoked"].as_bool().unwrap_or(false))
        }
        Ok((status, answer)) => {
            eprintln!(
                "note: the daemon's API answered {status} ({}); revocations were not checked",
                answer.trim()
            );
            Ok(false)
        }
        Err(e) => {
            eprintln!("note: {e}; revocations made through a running daemon were not checked");
            Ok(false)
        }
    }
}

fn sessions_command(config: &Config, action: SessionsAction) -> anyhow::Result<()> {
    // Only ids in the API's own format go into the request line: anything else (CR, LF, a
    // space, a slash) could change what the request does, with the operator's token.
    if let SessionsAction::Kill { id } = &action {
        if api::parse_session_id(id).is_none() {
            bail!(
                "{id:?} is not a session id: expected <shard>-<slot>-<generation> in decimal, \
                 as `turnpike sessions list` prints it (e.g. 0-12-3)"
            );
        }
    }
    let (addr, token) = api_endpoint(config)?;
    let (status, body) = match &action {
        SessionsAction::List => {
            client::request(addr, "GET", "/api/v1/sessions", Some(&token), None)?
        }
        SessionsAction::Kill { id } => client::request(
            addr,
            "DELETE",
            &format!("/api/v1/sessions/{id}"),
            Some(&token),
            None,
        )?,
    };
    match (action, status) {
        (SessionsAction::List, 200) => println!("{body}"),
        (SessionsAction::Kill { id }, 204) => println!("session {id} ended"),
        (_, status) => bail!("the API answered {status}: {}", body.trim()),
    }
    Ok(())
}

/// `turnpike revoke` / `unrevoke`: one POST with a JSON body; prints the API's JSON answer.
fn revocation_command(config: &Config, route: &str, user: &str) -> anyhow::Result<()> {
    if user.is_empty() {
        bail!("the user must not be empty");
    }
    let (addr, token) = api_endpoint(config)?;
    let body = serde_json::json!({ "user": user }).to_string();
    let (status, answer) = client::request(addr, "POST", route, Some(&token), Some(&body))?;
    if status != 200 {
        bail!("the API answered {status}: {}", answer.trim());
    }
    println!("{}", answer.trim());
    Ok(())
}

/// The password for `verify-credential`: from standard input (`--password -`) or a file, with
/// the line ending removed. A literal on the command line is refused: argv is public.
fn read_password(literal: Option<String>, file: Option<PathBuf>) -> anyhow::Result<String> {
    let text = match (literal.as_deref(), file) {
        (Some("-"), None) => {
            let mut p = String::new();
            std::io::stdin()
                .read_to_string(&mut p)
                .context("reading the password from standard input")?;
            p
        }
        (Some(_), _) => bail!(
            "refusing a password on the command line: every local user can read it in the \
             process list (and it lands in shell history). Pass `--password -` and write the \
             password to standard input, or use `--password-file PATH`"
        ),
        (None, Some(path)) => std::fs::read_to_string(&path)
            .with_context(|| format!("reading the password from {}", path.display()))?,
        (None, None) => bail!(
            "give the password with `--password -` (standard input) or `--password-file PATH`"
        ),
    };
    // One line: the password is what precedes the first line ending.
    Ok(text.split(['\r', '\n']).next().unwrap_or("").to_owned())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            config,
            log_format,
            log_level,
            ready_file,
        } => {
            let cfg = Config::load(&config)?;
            let format = match log_format {
                Some(LogFormatArg::Json) => LogFormat::Json,
                Some(LogFormatArg::Text) => LogFormat::Text,
                None => cfg.log_format,
            };
            let level = log_level.unwrap_or_else(|| cfg.log_level.clone());
            let _log = init_logging(format, &level)?;
            turnpike::control::warn_about_permissions(&cfg, &config);
            turnpike::daemon::serve(cfg, config, ready_file)?;
            Ok(())
        }
        Command::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            cfg.load_rest_secrets()?;
            cfg.load_nonce_keys()?;
            cfg.load_api_token()?;
            let certificate = turnpike::control::load_certificate(&cfg)
                .map_err(|e| anyhow::anyhow!("tls certificate: {e}"))?;
            // Warnings only: the file is valid, and the daemon starts with it.
            for w in cfg.permission_warnings(&config) {
                eprintln!("turnpike: WARN: {w}");
            }
            for w in certificate
                .iter()
                .flat_map(|c| turnpike::control::certificate_warnings(&cfg, c))
            {
                eprintln!("turnpike: WARN: {w}");
            }
            println!("# {}: valid", config.display());
            print!("{}", cfg.to_redacted_toml());
            Ok(())
        }
        Command::Credentials {
            config,
            user,
            ttl,
            uris,
            format,
        } => credentials_command(&Config::load(&config)?, &user, ttl, uris, format),
        Command::VerifyCredential {
            config,
            username,
            password,
            password_file,
            realm,
        } => {
            let password = read_password(password, password_file)?;
            let cfg = Config::load(&config)?;
            let secrets = cfg.load_rest_secrets()?;
            let verdict = credentials::verify(
                &cfg,
                &secrets,
                &username,
                &password,
                realm.as_deref(),
                unix_now(),
            );
            if verdict.is_ok() && daemon_revoked(&cfg, &username)? {
                bail!(
                    "refused: {username:?} is revoked in the running daemon (`turnpike unrevoke` \
                     lifts it)"
                );
            }
            match verdict {
                Ok(credentials::Accepted::StaticUser) => {
                    println!("accepted: static user {username:?}")
                }
                Ok(credentials::Accepted::Rest {
                    user,
                    expires_in_secs,
                }) => {
                    println!("accepted: REST credential for user {user:?}, expires in {expires_in_secs} s")
                }
                Err(why) => bail!("refused: {why}"),
            }
            Ok(())
        }
        Command::Sessions { config, action } => sessions_command(&Config::load(&config)?, action),
        Command::Probe(_) => unreachable!("main runs probe_command for its exit status"),
        Command::Revoke { config, user } => {
            revocation_command(&Config::load(&config)?, "/api/v1/revoke", &user)
        }
        Command::Unrevoke { config, user } => {
            revocation_command(&Config::load(&config)?, "/api/v1/unrevoke", &user)
        }
    }
}

/// `turnpike probe`: 0 when every check of every URI passed, 1 when one failed, 2 when the
/// arguments are wrong.
fn probe_command(args: ProbeArgs) -> ExitCode {
    let ProbeArgs {
        uris,
        user,
        password,
        password_file,
        secret_file,
        timeout_secs,
        ca_file,
        json,
    } = args;
    use turnpike::control::probe::{probe, ProbeSettings, Scheme, Uri};
    let uris: Vec<Uri> = match uris.iter().map(|u| Uri::parse(u)).collect() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("turnpike probe: {e}");
            return ExitCode::from(2);
        }
    };
    let needs_credential = uris.iter().any(|u| u.scheme != Scheme::Stun);
    let credential = match (password, password_file, secret_file) {
        (None, None, None) if needs_credential => Err(anyhow::anyhow!(
            "turn: and turns: URIs need --password -, --password-file PATH or --secret-file PATH"
        )),
        (None, None, None) => Ok((user, String::new())),
        (None, None, Some(path)) => std::fs::read(&path)
            .with_context(|| format!("reading the secret from {}", path.display()))
            .and_then(|bytes| {
                let secret = bytes
                    .split(|&b| b == b'\n')
                    .next()
                    .unwrap_or(&[])
                    .trim_ascii();
                if secret.is_empty() {
                    bail!("{} holds no secret", path.display());
                }
                let expiry = unix_now() + 600;
                Ok(turnpike::proto::auth::mint_rest_credential(
                    secret, &user, expiry, ':',
                ))
            }),
        (literal, file, None) => read_password(literal, file).map(|p| (user, p)),
        _ => unreachable!("clap keeps the credential options apart"),
    };
    let (user, password) = match credential {
        Ok(c) => c,
        Err(e) => {
            eprintln!("turnpike probe: {e:#}");
            return ExitCode::from(2);
        }
    };
    let settings = ProbeSettings {
        user,
        password,
        timeout: Duration::from_secs(timeout_secs),
        ca_file,
    };
    let reports: Vec<_> = uris.iter().map(|u| probe(u, &settings)).collect();
    let ok = reports.iter().all(|r| r.ok());
    if json {
        let all: Vec<_> = reports.iter().map(|r| r.to_json()).collect();
        println!("{}", serde_json::json!({ "ok": ok, "uris": all }));
    } else {
        for r in &reports {
            print!("{}", r.to_text());
        }
        println!(
            "{}",
            if ok {
                "all checks passed"
            } else {
                "some checks FAILED"
            }
        );
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. }) {
        // A one-shot command whose reader went away (`check-config | head -1`) ends quietly, as
        // Unix tools do; Rust's runtime ignores SIGPIPE, which turns that into a print panic.
        // The daemon keeps ignoring it: a closed stdout must never stop a relay.
        // SAFETY: called before any thread exists; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Command::Probe(args) = cli.command {
        return probe_command(args);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("turnpike: {e:#}");
            ExitCode::FAILURE
        }
    }
}
