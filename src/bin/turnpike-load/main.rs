//! turnpike-load: a load generator for any TURN server over UDP (coturn included).
//! Exit status: 0 ok, 1 the run failed, 2 --timeout-secs hit, 64 usage error.

mod alloc;
mod binding;
mod cli;
mod echo;
mod hist;
mod phase;
mod procstat;
mod relay;
mod report;
mod setup;
mod stun;
mod sys;
mod traffic;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use cli::{Cli, Common, Mode};
use report::Report;
use stun::Credential;

/// How a run ends when it does not end well.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Run(String),
    #[error("{0}")]
    Timeout(String),
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 64,
            Failure::Run(_) => 1,
            Failure::Timeout(_) => 2,
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Run(e.to_string())
    }
}

/// What every mode needs: where the server is, who we are, what to sample, until when.
pub struct Ctx {
    pub server: SocketAddr,
    pub local_ip: IpAddr,
    pub cred: Credential,
    pub realm: Option<String>,
    pub server_proc: procstat::Server,
    pub timeout_secs: u64,
    pub deadline_ns: u64,
    /// Random per run: payload tag and transaction-id prefix.
    pub tag: u32,
}

impl Ctx {
    pub fn timeout(&self) -> Failure {
        Failure::Timeout(format!(
            "timeout: the run did not finish within {} s (--timeout-secs)",
            self.timeout_secs
        ))
    }

    pub fn local(&self) -> SocketAddr {
        SocketAddr::new(self.local_ip, 0)
    }
}

fn first_line(path: &std::path::Path, what: &str) -> Result<String, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("cannot read {what} {}: {e}", path.display())))?;
    let line = text.lines().next().unwrap_or("").trim().to_owned();
    if line.is_empty() {
        return Err(Failure::Usage(format!(
            "{what} {} is empty",
            path.display()
        )));
    }
    Ok(line)
}

fn credential(c: &Common) -> Result<Credential, Failure> {
    let user = c.user.clone();
    let password = match (&c.password, &c.password_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => Some(first_line(f, "password file")?),
        (None, None) => None,
    };
    let secret = match &c.secret_file {
        Some(f) => Some(first_line(f, "secret file")?),
        None => None,
    };
    match (user, password, secret) {
        (None, None, None) => Ok(Credential::None),
        (Some(user), Some(password), None) => Ok(Credential::Static { user, password }),
        (Some(user), None, Some(secret)) => Ok(Credential::Rest {
            user,
            secret: secret.into_bytes(),
        }),
        (Some(_), None, None) => Err(Failure::Usage(
            "--user needs --password, --password-file or --secret-file".into(),
        )),
        _ => Err(Failure::Usage(
            "--password, --password-file and --secret-file need --user".into(),
        )),
    }
}

fn resolve(server: &str) -> Result<SocketAddr, Failure> {
    server
        .to_socket_addrs()
        .map_err(|e| Failure::Usage(format!("--server {server}: {e}")))?
        .next()
        .ok_or_else(|| Failure::Usage(format!("--server {server}: no address")))
}

fn random_u32() -> u32 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    // Only a run tag: the clock is a fine fallback.
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return sys::now_ns() as u32;
    }
    u32::from_be_bytes(b)
}

fn context(c: &Common) -> Result<Ctx, Failure> {
    let server = resolve(&c.server)?;
    let cred = credential(c)?;
    let local_ip = match c.local_ip {
        Some(ip) => ip,
        None if server.ip().is_loopback() && server.is_ipv4() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        None if server.ip().is_loopback() => "::1".parse().expect("literal"),
        None => sys::route_source(server)
            .map_err(|e| Failure::Run(format!("no route to {server}: {e}")))?,
    };
    if local_ip.is_ipv4() != server.is_ipv4() {
        return Err(Failure::Usage(format!(
            "--local-ip {local_ip} and --server {server} are of different address families"
        )));
    }
    let server_proc = procstat::Server::new(c.server_pid).map_err(Failure::Run)?;
    if c.timeout_secs == 0 {
        return Err(Failure::Usage("--timeout-secs must be at least 1".into()));
    }
    Ok(Ctx {
        server,
        local_ip,
        cred,
        realm: c.realm.clone(),
        server_proc,
        timeout_secs: c.timeout_secs,
        deadline_ns: sys::now_ns() + c.timeout_secs * 1_000_000_000,
        tag: random_u32(),
    })
}

/// The run's own deadline is checked by its loops; this is the backstop for anything that
/// would still hang (a blocked syscall), a little later.
fn watchdog(timeout_secs: u64) {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(timeout_secs) + Duration::from_secs(3));
        eprintln!("turnpike-load: timeout: still running {timeout_secs} s after start, exiting");
        std::process::exit(2);
    });
}

fn run(mode: &Mode) -> Result<(Report, bool), Failure> {
    let common = match mode {
        Mode::Alloc(a) => &a.common,
        Mode::Relay(r) => &r.common,
        Mode::Binding(b) => &b.common,
    };
    let ctx = context(common)?;
    watchdog(ctx.timeout_secs);
    sys::raise_nofile();
    let report = match mode {
        Mode::Alloc(a) => alloc::run(&ctx, a)?,
        Mode::Relay(r) => relay::run(&ctx, r)?,
        Mode::Binding(b) => binding::run(&ctx, b)?,
    };
    Ok((report, common.json))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            let code = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
                _ => 64,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(&cli.mode) {
        Ok((report, json)) => {
            report.print(json);
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("turnpike-load: {f}");
            if let Failure::Usage(_) = f {
                eprintln!("Try 'turnpike-load --help' for more information.");
            }
            ExitCode::from(f.code())
        }
    }
}
